"""What every stage that loads a model shares: loading it and placing it on the configured accelerator."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import nn


def _stage_device(accelerator: str) -> torch.device:
    """``cpu`` -> the CPU; ``mps`` -> Apple's GPU when available; anything else (``auto``, ``gpu``,
    ``cuda``) -> the first CUDA device when one is available, else the CPU."""
    accelerator = str(accelerator).lower()
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator == "mps":
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_stage_model(cfg, model_cfg: Any = None, loader: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """Load a stage's model in eval mode (LoRA adapters not attached) and place it on ``trainer.accelerator``.

    Args:
        cfg: the run config (reads ``trainer.accelerator``; and ``model`` when ``model_cfg`` is not given).
        model_cfg: what to load (a :class:`~lat_lightning.models.settings.ModelSettings`, or a section of the same
            shape); default ``cfg.model``. Loaded with ``load_model(model_cfg, train=False, with_lora=False)``.
        loader: a ``() -> model`` that loads it instead (e.g. a LoRA adapter merged into its base).

    Returns:
        The model, in eval mode, on the device: ``cpu`` -> CPU; ``auto`` / ``gpu`` / ``cuda`` -> CUDA when
        available (else CPU).
    """
    if loader is None:
        from lat_lightning.models.loading import load_model
        from lat_lightning.stages.settings import model_settings

        model = load_model(model_settings(cfg, model_cfg), train=False, with_lora=False)
    else:
        model = loader()
    device = _stage_device(cfg.trainer.accelerator)
    device_map = getattr(model, "hf_device_map", None)
    if device_map and len(set(device_map.values())) > 1:
        pass  # model.device_map placed (or offloaded) every module: accelerate's hooks move the activations
    elif next(model.parameters()).device.type != device.type:  # already there (e.g. quantised on load): keep it
        model = model.to(device)
    model.eval()
    return model


def process_shard(cfg) -> Optional[tuple[int, int]]:
    """``(rank, world_size)`` of this process when it is one of several (torchrun, ``srun``, or the processes
    Lightning's launcher started for ``trainer.devices=N``), with the default process group initialised from the
    launcher's environment if nobody did yet; ``None`` for a single process. Call it before loading the stage's model:
    on GPUs it selects this process's device (``LOCAL_RANK``).
    """
    import torch.distributed as dist
    from lightning.fabric.plugins.environments import (
        ClusterEnvironment,
        LightningEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return (dist.get_rank(), world) if world > 1 else None
    env: Optional[ClusterEnvironment] = next(
        (e() for e in (TorchElasticEnvironment, SLURMEnvironment) if e.detect()), None
    )
    if env is None and "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        env = LightningEnvironment()
    if env is None or env.world_size() <= 1:
        return None
    os.environ.setdefault("MASTER_ADDR", env.main_address)
    os.environ.setdefault("MASTER_PORT", str(env.main_port))
    gpu = _stage_device(cfg.trainer.accelerator).type == "cuda"
    if gpu:
        torch.cuda.set_device(env.local_rank())
    from lat_lightning.training.launch import GROUP_TIMEOUT

    # A rank that waits while rank 0 runs a stage alone may wait for hours (lat_lightning.training.launch).
    dist.init_process_group(
        "nccl" if gpu else "gloo", rank=env.global_rank(), world_size=env.world_size(), timeout=GROUP_TIMEOUT
    )
    return env.global_rank(), env.world_size()


__all__ = ["load_stage_model", "process_shard"]
