"""Run directories: ``<root>/<name>/version_<n>``, claimed atomically, never overwritten, with the config saved.

* :func:`check_location` refuses names that would leave the run root (``logging.name`` / ``logging.version`` are
  single directory names) and a root that cannot hold directories, before anything is written.
* :func:`find_run_dir` is the directory a ``--resume`` continues, found without writing anything;
  :func:`check_resume` compares the config saved there with the new one and refuses any change outside
  :data:`lat_lightning.config.SAFE_ON_RESUME`, listing the changed keys.
* :func:`create_run_dir` claims a fresh ``version_<n>`` with an exclusive ``mkdir`` (retrying with the next number
  when another run took it first), or reopens the resumed one, and saves the config.
* :func:`discard_if_empty` removes a fresh run directory that a failed run left holding nothing but its config and
  log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lat_lightning.config import SAFE_ON_RESUME, RunConfig
from lat_lightning.errors import ConfigError

CONFIG_FILE = "config.yaml"
RESUMED_CONFIG_FILE = "config.resumed.yaml"
# What a run writes before it computes anything (its settings, its log, the LoRA targets it chose): not results.
BOOKKEEPING = (CONFIG_FILE, RESUMED_CONFIG_FILE, "run.log", "lora_targets.json")
_MISSING = "<absent>"


def _versions(parent: Path) -> list[int]:
    if not parent.is_dir():
        return []
    return sorted(int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name)))


def run_name(cfg: DictConfig, recipe: str) -> str:
    """``logging.name``, else the recipe's file name without its suffix."""
    return str(cfg.logging.name or Path(recipe).stem)


def _check_component(value: str, key: str) -> None:
    if not value or value in (".", "..") or any(c in value for c in ("/", "\\", "\0")) or value != value.strip():
        raise ConfigError(
            f"{key} '{value}' must be a single directory name inside the run root (no '/', not '..', "
            f"no surrounding spaces), e.g. {key}=my_run"
        )


def _cannot_create_in(directory: Path) -> Optional[str]:
    """Why no directory can be created in the existing ``directory`` (``None``: one can). Tried for real, with an
    empty probe directory removed at once: permission bits say nothing for root or for a read-only or virtual file
    system (``/proc``)."""
    import tempfile

    if not os.access(directory, os.W_OK | os.X_OK):
        return "not writable"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lat-lightning-probe-", dir=directory))
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


IS_A_FILE = "is a file"  # what _creation_obstacle says of an ancestor that is a file


def _creation_obstacle(target: Path) -> Optional[tuple[Path, str]]:
    """Why ``target`` (a directory, created with its parents) cannot be made: its nearest existing ancestor (itself
    included) and :data:`IS_A_FILE` or the reason nothing can be created in it (:func:`_cannot_create_in`);
    ``None`` when it can."""
    for path in (target, *target.parents):
        if path.exists():
            if not path.is_dir():
                return path, IS_A_FILE
            problem = _cannot_create_in(path)
            return (path, problem) if problem else None
    return None


def check_cache_dir() -> None:
    """``$LAT_LIGHTNING_CACHE``, when set, is a directory the run can create entries in (models built or
    converted once, the organism).

    Raises:
        ConfigError: it is a file, or nothing can be created where it points.
    """
    value = os.environ.get("LAT_LIGHTNING_CACHE")
    if not value:
        return
    obstacle = _creation_obstacle(Path(os.path.expanduser(value)))
    if obstacle is None:
        return
    path, problem = obstacle
    if problem == IS_A_FILE:
        raise ConfigError(
            f"LAT_LIGHTNING_CACHE '{value}': '{path}' is a file, not a directory; point "
            "LAT_LIGHTNING_CACHE at a writable directory (or unset it for ~/.cache/lat_lightning)"
        )
    raise ConfigError(
        f"LAT_LIGHTNING_CACHE '{value}': cannot create a directory in '{path}' ({problem}); "
        "point it at a writable directory (or unset it for ~/.cache/lat_lightning)"
    )


def check_location(cfg: DictConfig, recipe: str, resume: Optional[str] = None) -> None:
    """The run directory can be created where the config says, without leaving the run root.

    Raises:
        ConfigError: ``logging.name`` / ``logging.version`` that is not a single directory name, a
            ``logging.root_dir`` (or a directory inside it) that is a file or not writable, or an explicit
            ``logging.version`` that already exists in a fresh run.
    """
    _check_component(run_name(cfg, recipe), "logging.name" if cfg.logging.name else "the recipe's file name")
    if cfg.logging.version is not None:
        _check_component(str(cfg.logging.version), "logging.version")
    root = Path(os.path.expanduser(str(cfg.logging.root_dir)))
    parent = root / run_name(cfg, recipe)
    obstacle = _creation_obstacle(parent)
    if obstacle is not None:
        path, problem = obstacle
        if problem == IS_A_FILE:
            raise ConfigError(
                f"logging.root_dir '{cfg.logging.root_dir}': '{path}' is a file, not a directory; "
                "point logging.root_dir at a directory"
            )
        raise ConfigError(
            f"logging.root_dir '{cfg.logging.root_dir}': cannot create a directory in '{path}' "
            f"({problem}); point logging.root_dir at a writable directory"
        )
    from lat_lightning.training.distributed import launch_rank

    # Ranks > 0 of a launch follow the directory rank 0 creates (under this very name).
    if (
        not resume
        and cfg.logging.version is not None
        and (parent / str(cfg.logging.version)).exists()
        and launch_rank() == 0
    ):
        raise ConfigError(
            f"run directory {parent / str(cfg.logging.version)} already exists; pick another "
            "logging.version or use --resume"
        )


def find_run_dir(cfg: DictConfig, recipe: str, resume: str) -> Path:
    """The run directory ``--resume`` names (nothing is written).

    ``'last'`` is the newest version of this run name; a path is a run directory or anything inside one (a
    checkpoint: :func:`create_run_dir` then loads that one instead of ``last.ckpt``).

    Raises:
        ConfigError: if there is nothing to resume.
    """
    parent = Path(os.path.expanduser(str(cfg.logging.root_dir))) / run_name(cfg, recipe)
    if resume == "last":
        versions = _versions(parent)
        if not versions:
            raise ConfigError(f"--resume last: no earlier run under {parent}")
        return parent / f"version_{versions[-1]}"
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume: '{resume}' does not exist")
    found = [p for p in (path, *path.parents) if (p / CONFIG_FILE).is_file()]
    if not found:
        raise ConfigError(f"--resume: no run directory (with {CONFIG_FILE}) contains '{resume}'")
    return found[0]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def schema_defaults() -> dict[str, Any]:
    """Every key of the run-config schema with its default, flat."""
    return _flatten(OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=True))


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The config the run last ran with (``config.resumed.yaml`` after a resume, else ``config.yaml``), flat."""
    run_dir = Path(run_dir)
    path = run_dir / RESUMED_CONFIG_FILE if (run_dir / RESUMED_CONFIG_FILE).is_file() else run_dir / CONFIG_FILE
    try:
        return _flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    except Exception as exc:  # noqa: BLE001 - a damaged file is the user's to fix
        raise ConfigError(f"--resume: cannot read {path}: {str(exc).splitlines()[0]}") from None


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, new value)`` for every flat key whose value differs (absent keys included)."""
    keys = sorted(set(saved) | set(new))
    return {
        k: (saved.get(k, _MISSING), new.get(k, _MISSING))
        for k in keys
        if saved.get(k, _MISSING) != new.get(k, _MISSING)
    }


def _saved_value(key: str, value: Any, defaults: dict[str, Any]) -> str:
    """A saved value as the refusal shows it: an absent key says what it meant (its default in ``defaults``)."""
    if value != _MISSING:
        return repr(value)
    return f"{_MISSING} (the run predates the key: its default {defaults[key]!r})" if key in defaults else _MISSING


def check_resume(run_dir: Path, cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Compare the run's saved config with ``cfg``.

    Returns:
        The changes, all in :data:`~lat_lightning.config.SAFE_ON_RESUME`.

    Raises:
        ConfigError: listing every other changed key (old -> new) and how to proceed; also a smaller
            ``trainer.max_steps`` (training cannot be undone).
    """
    changes = config_changes(saved_config(run_dir), _flatten(OmegaConf.to_container(cfg, resolve=True)))
    # A key the saved config lacks was added to the schema after the run started; the run behaved as its default
    # (a new key's default keeps the old behaviour), so the default is no change.
    defaults = schema_defaults()
    changes = {k: v for k, v in changes.items() if not (v[0] == _MISSING and k in defaults and v[1] == defaults[k])}
    refused = [k for k in changes if k not in SAFE_ON_RESUME]
    steps = changes.get("trainer.max_steps")
    if steps is not None and isinstance(steps[0], int) and isinstance(steps[1], int) and steps[1] < steps[0]:
        refused.insert(0, "trainer.max_steps")
    if refused:
        shown = "; ".join(f"{k}: {_saved_value(k, changes[k][0], defaults)} -> {changes[k][1]!r}" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(
            f"--resume {run_dir}: the config differs from the one the run was started with ({shown}"
            f"{more}); a resumed run keeps its settings (trainer.max_steps may only grow), so restore "
            "these values or start a fresh run without --resume"
        )
    return changes


def create_run_dir(cfg: DictConfig, recipe: str, resume: Optional[str] = None) -> Path:
    """Claim (or reopen) the run directory and save the config into it.

    A fresh run always gets a new ``version_<n>`` directory, created with an exclusive ``mkdir`` (two runs started
    at the same instant never share one), so earlier results are never overwritten. ``resume='last'`` reuses the
    newest version of this run name; ``resume=PATH`` reuses a run directory (or the run directory containing a
    checkpoint, which is then the one loaded instead of ``last.ckpt``). The config is saved as ``config.yaml``
    (``config.resumed.yaml`` when resuming). In a multi-process launch every rank gets rank 0's directory (see
    :mod:`lat_lightning.training.distributed`).

    Raises:
        ConfigError: see :func:`check_location` and :func:`find_run_dir`.
    """
    from lat_lightning.training.distributed import follower_run_dir, launch_rank, launch_version, publish_run_dir
    from lat_lightning.training.resume import remember_checkpoint

    check_location(cfg, recipe, resume)
    parent = Path(os.path.expanduser(str(cfg.logging.root_dir))) / run_name(cfg, recipe)
    follower = None if resume else follower_run_dir(parent, cfg.logging.version)  # ranks > 0: rank 0's choice
    if follower is not None:
        return follower
    shared = launch_version() if cfg.logging.version is None and not resume else None
    if shared is not None:  # torchrun/SLURM: named after the launch; a requeued job reuses it
        run_dir = parent / shared
        if launch_rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
    elif resume:
        run_dir = find_run_dir(cfg, recipe, resume)
        if resume != "last" and Path(resume) != run_dir:  # --resume RUN/checkpoints/step2.ckpt: that checkpoint
            remember_checkpoint(run_dir, Path(resume))
    elif cfg.logging.version is not None:
        run_dir = parent / str(cfg.logging.version)
        if launch_rank() == 0:
            parent.mkdir(parents=True, exist_ok=True)
            try:
                run_dir.mkdir()
            except FileExistsError:
                raise ConfigError(
                    f"run directory {run_dir} already exists; pick another logging.version or use --resume"
                ) from None
    else:
        run_dir = _claim_version(parent)
    if launch_rank() != 0:  # resuming on a rank > 0: the same directory, written by rank 0 only
        return run_dir
    target = run_dir / (RESUMED_CONFIG_FILE if (run_dir / CONFIG_FILE).exists() else CONFIG_FILE)
    OmegaConf.save(cfg, target, resolve=True)
    publish_run_dir(run_dir)
    return run_dir


def _claim_version(parent: Path, attempts: int = 1000) -> Path:
    """Create the next free ``version_<n>`` exclusively; when another process creates it first, try the next."""
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        versions = _versions(parent)
        run_dir = parent / f"version_{(versions[-1] + 1) if versions else 0}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise ConfigError(f"could not claim a new version directory under {parent} after {attempts} attempts")


def _tfevents_records(path: Path) -> int:
    """Records in a TensorBoard event file (TFRecord framing: length, CRC, data, CRC)."""
    data, n, i = path.read_bytes(), 0, 0
    while i + 12 <= len(data):
        i += 12 + int.from_bytes(data[i : i + 8], "little") + 4
        n += 1
    return n


def holds_results(run_dir: Path) -> bool:
    """Whether anything besides the config, the log, empty folders and empty TensorBoard event files (only the
    header record a logger writes when it starts) is in ``run_dir``."""
    for root, _, files in os.walk(run_dir):
        for name in files:
            if Path(root) == Path(run_dir) and name in BOOKKEEPING:
                continue
            if name.startswith("events.out.tfevents.") and _tfevents_records(Path(root) / name) <= 1:
                continue
            return True
    return False


def discard_if_empty(run_dir: Optional[Path]) -> bool:
    """Remove a fresh run directory that holds no results (a run that failed or was stopped before writing any).

    Returns:
        Whether it was removed.
    """
    from lat_lightning.training.distributed import launch_rank

    if run_dir is None or launch_rank() != 0 or not Path(run_dir).is_dir() or holds_results(run_dir):
        return False  # only rank 0 owns the directory
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def stage_done(run_dir: Path, stage: str) -> bool:
    """Whether ``stage`` finished in this run directory (its marker file exists)."""
    return (run_dir / "stages" / f"{stage}.done.json").exists()


def reopen_stage(run_dir: Path, stage: str) -> None:
    """Forget that ``stage`` finished, so a resumed run runs it again."""
    (Path(run_dir) / "stages" / f"{stage}.done.json").unlink(missing_ok=True)


def mark_stage_done(run_dir: Path, stage: str, info: Optional[dict] = None) -> None:
    """Record that ``stage`` finished, with a small JSON payload (written atomically)."""
    out = run_dir / "stages"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{stage}.{os.getpid()}.tmp"  # per process: every rank of a launch marks the stage
    tmp.write_text(json.dumps(info or {}, indent=2, default=str))
    tmp.replace(out / f"{stage}.done.json")


__all__ = [
    "check_cache_dir",
    "check_location",
    "check_resume",
    "config_changes",
    "create_run_dir",
    "discard_if_empty",
    "find_run_dir",
    "holds_results",
    "mark_stage_done",
    "reopen_stage",
    "run_name",
    "saved_config",
    "stage_done",
]
