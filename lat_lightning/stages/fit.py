"""Stage ``fit``: train as the run config says (:func:`lat_lightning.stages.fit_setup.fit`), resuming from this run's
checkpoint when there is one. Outputs: ``checkpoints/``, ``final/`` (and ``final_merged/`` for LoRA),
``tensorboard/`` and whatever the callbacks write (``fragile_layers.json``, ``interpolated/``, ...)."""

from __future__ import annotations

from pathlib import Path


def run(cfg, run_dir: Path) -> dict:
    """Train into ``run_dir``.

    Returns:
        ``{"final": path of final/, "attack_layers": [...], "global_step": int}``.
    """
    import torch

    from lat_lightning.stages.fit_setup import fit, has_held_out_data
    from lat_lightning.stages.settings import scan_settings, validation_settings
    from lat_lightning.training.resume import checkpoint_to_resume

    torch.set_float32_matmul_precision("high")
    ckpt = checkpoint_to_resume(run_dir)  # --resume's checkpoint, else last.ckpt when the run has one
    # Built only where used: a fit without held-out data or layer selection does not depend on the scan's keys.
    module = fit(
        cfg,
        run_dir,
        resume=str(ckpt) if ckpt is not None else None,
        scan=scan_settings(cfg, probes=False) if cfg.callbacks.fragile_layers.enabled else None,
        validation=validation_settings(cfg) if has_held_out_data(cfg) else None,
    )
    return {
        "final": str(run_dir / "final"),
        "attack_layers": list(module.attack_layers),
        "global_step": int(module.trainer_ref.global_step),
    }


def saved(run_dir: Path) -> str | None:
    """What an interrupted fit keeps for ``--resume``: its last checkpoint, if it wrote one."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    return f"checkpoint {last} (training continues from it)" if last.is_file() else None


__all__ = ["run", "saved"]
