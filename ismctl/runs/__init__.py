"""Layer 5, a run on disk: checkpoint folders (weights, optimiser state, metadata), their digests
(``integrity``) and loading them for sampling (``checkpoint.load_for_sampling``). Imports
layers 0-4.
"""
