"""Layer 7, the training run: the loop (``trainer``) and its phases (``state``, ``step``,
``monitor``, ``saving``), the twin EMA (``ema``), the checks before the first write
(``preflight``), the locked run folder (``runfolder``, ``runlock``), when a run may continue
(``resume``) and what it reports (``tracking``). Imports layers 0-6.
"""
