"""Layer 0, plain helpers every layer may use: one-line user errors, atomic file writes, YAML that
refuses repeated keys, progress bars, generator state. Imports nothing from ismctl.
"""
