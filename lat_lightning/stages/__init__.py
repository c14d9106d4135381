"""The pipeline's stages, one thin module per stage: read the run config, call the library, write or return.

Convention: the stage ``<name>`` (one of :data:`lat_lightning.config.STAGES`) is the function
``lat_lightning.stages.<name>.run(cfg, run_dir) -> dict``. The returned dict is recorded in the stage marker
``run_dir/stages/<name>.done.json``; everything else a stage produces is a file in the run directory.
:func:`lat_lightning.pipeline.get_stage` imports the module lazily. Adding a stage: one module here with a
``run`` function, plus its name in ``STAGES``.

Every stage that loads a model does so with :func:`lat_lightning.stages.common.load_stage_model`, which places
it on ``trainer.accelerator``. Stages are the only layer (with the pipeline and the CLI) that may import
:mod:`lat_lightning.organism`: before any stage runs, the pipeline replaces every organism name in the config by
a path (:func:`lat_lightning.stages.organism.resolve_organism`).
"""
