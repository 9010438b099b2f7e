"""Layer 6, turning a network into samples: the Euler shortcut sampler (``sampler``), how each
objective family is sampled and its remembered guidance (``protocol``), images from a run
(``generate``), and outputs that stream to disk (``streamout``, ``pngdir``) after a check that
they fit (``fits``). Imports layers 0-5.
"""
