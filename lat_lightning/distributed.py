"""Map ``trainer.strategy`` to a Lightning strategy.

- ``auto``, ``ddp``, ``ddp_spawn``, ``ddp_fork``: passed through to Lightning (``ddp`` also works under
  ``torchrun`` and SLURM, which Lightning detects).
- ``fsdp2``: FSDP2 (``fully_shard`` per decoder layer) through Lightning's ``ModelParallelStrategy``; runs
  on CPU with gloo too.
- ``fsdp``: Lightning's FSDP1 ``FSDPStrategy`` (GPUs only): ``use_orig_params``, wrapping and activation
  checkpointing by decoder-layer class.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lat_lightning.errors import ConfigError

PASS_THROUGH = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "single_device")


def _cuda_requested(cfg: DictConfig) -> bool:
    import torch

    accelerator = cfg.trainer.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def build_strategy(cfg: DictConfig):
    """Return what ``pl.Trainer(strategy=...)`` takes for ``cfg.trainer.strategy``.

    Raises:
        ConfigError: unknown strategy, or FSDP1 requested without CUDA.
    """
    name = cfg.trainer.strategy
    if name in PASS_THROUGH:
        return name
    if name == "fsdp":
        if not _cuda_requested(cfg):
            raise ConfigError("trainer.strategy=fsdp (FSDP1) needs CUDA GPUs; on CPU use trainer.strategy=fsdp2 "
                              "(FSDP2 through ModelParallelStrategy, runs with gloo)")
        from lightning.pytorch.strategies import FSDPStrategy

        from lat_lightning.distributed_fsdp import decoder_layer_classes

        layer_cls = decoder_layer_classes(cfg)
        return FSDPStrategy(
            auto_wrap_policy=layer_cls or None,
            activation_checkpointing_policy=layer_cls if cfg.model.gradient_checkpointing else None,
            use_orig_params=True,
            state_dict_type=cfg.trainer.fsdp_state_dict_type,
        )
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)
    raise ConfigError(f"unknown trainer.strategy '{name}'; choose from {', '.join(PASS_THROUGH + ('fsdp', 'fsdp2'))}")
