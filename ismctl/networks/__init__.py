"""Layer 3, the network F(x_t, t, d, c, w): the transformer (``model``), the DiT/SiT import
(``pretrained``) and the bare module under DDP/compile wrappers (``unwrap``). Imports layers
0-2.
"""
