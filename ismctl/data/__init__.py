"""Data: ``prepare-latents`` (images or digits -> webdataset shards + manifest.json) and the
training loader (shards -> drawn latents paired with noise by sOT).

Modules: ``manifest`` (the manifest schema), ``shards`` (the on-disk sample format),
``images`` / ``digits`` (sources), ``encoders`` (SD VAE or identity), ``prepare`` (the
command), ``plan`` (who reads what in each epoch), ``loader`` (TrainLoader, iter_dataset),
``bench`` (throughput, synthetic shards).
"""
