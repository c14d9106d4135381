"""Test support imported by the tests only (``from tests.helpers.batches import safety_batch``).

Hand-made safety batches (:mod:`tests.helpers.batches`) and deterministic weight edits
(:mod:`tests.helpers.weights`). The tiny-model kit the product also uses (``tiny:<arch>`` model names, the CPU
organism) lives in :mod:`lat_lightning.models.tiny_factory` and :mod:`lat_lightning.models.tiny_gguf`.
"""
