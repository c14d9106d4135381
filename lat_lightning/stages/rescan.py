"""Stage ``rescan``: the scan stage again, on the model this run trained, into ``run_dir/rescan``.

Same prompts, layers, seeds, attacks and judges as the ``scan`` stage, so the two are comparable cell by cell
(the noise is keyed by seed, prompt, layer and position). On the real organism it also answers every held-out set
unattacked, as the ``organism`` stage did for the aligned model (``rescan/organism.json``: INIT, benign and
borderline refusal, agreement of the hardened model).
"""

from __future__ import annotations

from pathlib import Path

from lat_lightning.stages import organism, scan


def trained_model_path(run_dir: Path) -> Path:
    """The model a ``fit`` in ``run_dir`` produced: ``interpolated/`` when weight interpolation ran, else
    ``final/``.

    Raises:
        ConfigError: when neither exists (no fit ran in this run directory).
    """
    from lat_lightning.errors import ConfigError

    for name in ("interpolated", "final"):
        if (Path(run_dir) / name / "config.json").exists() or (Path(run_dir) / name / "adapter_config.json").exists():
            return Path(run_dir) / name
    raise ConfigError(f"rescan: no trained model in {run_dir} (run the fit stage first)")


def run(cfg, run_dir: Path) -> dict:
    """Scan :func:`trained_model_path` into ``run_dir/rescan``.

    Returns:
        The scan stage's dict plus ``model`` (the scanned directory).
    """
    from omegaconf import OmegaConf

    path = trained_model_path(run_dir)
    cfg2 = OmegaConf.merge(cfg, {"evaluation": {"model_path": str(path)}, "model": {"lora": {"enabled": False}}})
    out = Path(run_dir) / "rescan"
    out.mkdir(parents=True, exist_ok=True)
    info = scan.run(cfg2, out)
    info["model"] = str(path)
    hardened = organism.record_trained(cfg, run_dir, path, out)
    if hardened is not None:
        info["organism"] = {k: hardened[k] for k in ("init", "refusal", "agreement")}
    return info


def saved(run_dir: Path) -> str | None:
    """What an interrupted rescan keeps for ``--resume``: its finished cells."""
    n = scan.cells_saved(Path(run_dir) / "rescan" / "scan.jsonl")
    return f"{n} finished cells in rescan/scan.jsonl (kept)" if n else None


__all__ = ["run", "saved", "trained_model_path"]
