"""Layer 8, what the command line offers beyond train/sample/eval: ablations and their report, the
benchmark, the GPU check, exports, recipe inspection and the Python API (``api``). Imports
layers 0-7.
"""
