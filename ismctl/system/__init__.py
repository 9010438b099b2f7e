"""Layer 2, where the code runs: processes and ranks (``distributed``), devices, threads,
precision and compilation (``runtime``), stop signals (``preemption``) and torchrun launches
(``launch``). Imports utils and config.
"""
