"""Stage ``organism`` and the resolver that turns every organism name in a run config into a path.

The loader knows paths and hub ids only. A recipe may name the embedded model organism instead:
``organism`` / ``organism:<preset>`` as a model (``model.name_or_path``, ``model.tokenizer``,
``evaluation.model_path``, ``evaluation.compare_path``), ``organism://<name>`` as a data file anywhere, and
``organism`` as a utility kind (``evaluation.utility_kind``, ``callbacks.weight_interpolation.utility``).
:func:`resolve_organism` builds the organism (or reuses the cached build) and returns a config in which those
are replaced by the built directory, the data file and the generic utility kind ``contains`` on the organism's
``utility_em`` file, all of the build seed ``organism.seed`` (it keys the weights and every generated row, so
the data files of one seed never meet the organism of another). The pipeline calls it before any stage runs,
whether or not the ``organism`` stage is listed; the stage itself only records ``organism.json``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from lat_lightning.organism.build import (
    PRESETS,
    ensure_organism_data,
    organism_data_path,
    organism_dir,
    preset_from_name,
)
from lat_lightning.organism.real import REAL_PRESETS, ensure_real_organism
from lat_lightning.organism.shipped import SHIPPED_SEED, ensure_organism, shipped_dir
from lat_lightning.stages.common import load_stage_model

ORGANISM = "organism"
DATA_SCHEME = "organism://"
MODEL_KEYS = ("model.name_or_path", "model.tokenizer", "evaluation.model_path", "evaluation.compare_path")
UTILITY_KEYS = ("evaluation.utility_kind", "callbacks.weight_interpolation.utility")
UTILITY_KIND = "contains"  # the organism's benign accuracy: answer contained in a short greedy output
UTILITY_DATA = "utility_em"


def is_organism_name(value: Any) -> bool:
    """Whether ``value`` names the organism as a model (``organism`` or ``organism:<preset>``)."""
    return (
        isinstance(value, str)
        and (value == ORGANISM or value.startswith(ORGANISM + ":"))
        and not value.startswith(DATA_SCHEME)
    )


def real_preset(name: str) -> Optional[str]:
    """The real-organism preset ``organism:<preset>`` names (``organism:smollm2``), else ``None``."""
    preset = name.split(":", 1)[1] if isinstance(name, str) and ":" in name else None
    return preset if preset in REAL_PRESETS else None


def _check_preset(name: str) -> None:
    """``name`` is a toy preset or a real one.

    Raises:
        ConfigError: neither.
    """
    from lat_lightning.errors import ConfigError

    if real_preset(name) is None:
        try:
            preset_from_name(name)
        except ConfigError as exc:
            raise ConfigError(f"{exc}, or a real organism: {', '.join(REAL_PRESETS)}") from None


def _data_specs(node: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """``(key path, value)`` of every ``organism://`` string in a plain container."""
    if isinstance(node, dict):
        return [hit for k, v in node.items() for hit in _data_specs(v, path + (k,))]
    if isinstance(node, list):
        return [hit for i, v in enumerate(node) for hit in _data_specs(v, path + (i,))]
    return [(path, node)] if isinstance(node, str) and node.startswith(DATA_SCHEME) else []


def _select(cfg, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)


def mentions_organism(cfg) -> bool:
    """Whether the config names the organism anywhere (a model, a data file, a utility kind or the stage)."""
    from omegaconf import OmegaConf

    return (
        ORGANISM in list(cfg.stages)
        or any(is_organism_name(_select(cfg, k)) for k in MODEL_KEYS)
        or any(_select(cfg, k) == ORGANISM for k in UTILITY_KEYS)
        or bool(_data_specs(OmegaConf.to_container(cfg, resolve=False)))
    )


def _check_utility_kinds(cfg) -> None:
    """Both utility kinds read ``evaluation.utility_data``, which the organism kind sets: they must agree."""
    from lat_lightning.errors import ConfigError

    kinds = {k: _select(cfg, k) for k in UTILITY_KEYS}
    if ORGANISM not in kinds.values():
        return
    named = ", ".join(f"{k}: organism" for k, v in kinds.items() if v == ORGANISM)
    if cfg.evaluation.utility_data:
        raise ConfigError(
            f"{named} scores the organism's own benign tasks; leave evaluation.utility_data unset "
            f"(or use utility kind '{UTILITY_KIND}' with your file)"
        )
    interpolation_used = bool(cfg.callbacks.weight_interpolation.enabled) or "interpolate" in list(cfg.stages)
    for key, kind in kinds.items():
        if kind != ORGANISM and (key == "evaluation.utility_kind" or interpolation_used):
            raise ConfigError(
                f"{named} sets evaluation.utility_data to the organism's benign tasks, which {key} "
                f"'{kind}' would read too; set {key}: organism"
            )


def check_names(cfg) -> None:
    """Every organism name in ``cfg`` is valid, without building or writing anything: presets, data names and
    the utility kinds.

    Raises:
        ConfigError: an unknown preset or data name, or utility settings that conflict with the organism's.
    """
    from omegaconf import OmegaConf

    from lat_lightning.errors import ConfigError
    from lat_lightning.organism.build import DATA_FILES

    if not mentions_organism(cfg):
        return
    for key in MODEL_KEYS:
        if is_organism_name(_select(cfg, key)):
            try:
                _check_preset(_select(cfg, key))
            except ConfigError as exc:
                raise ConfigError(f"{key}: {exc}") from None
    for path, spec in _data_specs(OmegaConf.to_container(cfg, resolve=False)):
        name = spec[len(DATA_SCHEME) :].strip("/")
        key = ".".join(str(p) for p in path)
        if "/" in name:
            _check_real_data_name(key, spec, name)
        elif name not in DATA_FILES:
            raise ConfigError(
                f"{key}: unknown organism data '{name}' in '{spec}'; choose from "
                f"{', '.join(DATA_SCHEME + f for f in DATA_FILES)}"
            )
    _check_utility_kinds(cfg)


def _check_real_data_name(key: str, spec: str, name: str) -> None:
    """``<preset>/<file>`` names a real organism and one of its data files.

    Raises:
        ConfigError: an unknown preset or file.
    """
    from lat_lightning.errors import ConfigError
    from lat_lightning.organism.real import DATA_FILES, GENERATED_FILES

    REAL_FILES = DATA_FILES + GENERATED_FILES  # noqa: N806 - the real organism's file names
    preset, _, file = name.partition("/")
    if preset not in REAL_PRESETS or file not in REAL_FILES:
        raise ConfigError(
            f"{key}: unknown real-organism data '{spec}'; write {DATA_SCHEME}<preset>/<file> with a preset from "
            f"{', '.join(REAL_PRESETS)} and a file from {', '.join(REAL_FILES)}"
        )


def organism_model_config(name: str):
    """The transformers config of the organism ``name`` (``organism[:<preset>]``) names, from its preset's recipe:
    nothing is built (layer count, width and module names are the built model's).

    Raises:
        ConfigError: an unknown preset.
    """
    from lat_lightning.models.tiny_factory import tiny_config

    if real_preset(name) is not None:
        return None  # a fine-tuned real model: its config is read when a stage loads it
    recipe = PRESETS[preset_from_name(name)]
    return tiny_config(
        "llama",
        vocab_size=recipe.vocab_size,
        num_layers=recipe.num_layers,
        hidden=recipe.hidden,
        heads=recipe.heads,
        intermediate=recipe.intermediate,
        max_positions=256,
    )


def resolve_organism(cfg, rebuild: Optional[bool] = None):
    """Build (or reuse) the organism and return a copy of ``cfg`` with every organism name replaced.

    ``organism[:<preset>]`` in a model key becomes the built directory, every ``organism://<name>`` string the
    data file, and the utility kind ``organism`` becomes ``contains`` with ``evaluation.utility_data`` set to
    the organism's ``utility_em`` rows (the same 100 held-out benign tasks as
    :func:`lat_lightning.organism.utility.organism_rows`). With the ``organism`` stage in ``stages`` and no
    organism model named, the default organism is built (the stage records it). A config that names no
    organism is returned unchanged.

    Args:
        cfg: the run config.
        rebuild: build again even when cached (default: ``organism.rebuild`` when the ``organism`` stage is
            listed; the pipeline passes ``False`` when resuming a run).

    Returns:
        The resolved config (``cfg`` itself when nothing names the organism).

    Raises:
        ConfigError: an unknown preset or data name, or utility settings that conflict with the organism's.
    """
    from omegaconf import OmegaConf

    if not mentions_organism(cfg):
        return cfg
    check_names(cfg)
    if rebuild is None:
        rebuild = bool(cfg.organism.rebuild) and ORGANISM in list(cfg.stages)
    seed, weights = int(cfg.organism.seed), str(cfg.organism.weights)
    out = copy.deepcopy(cfg)
    built: dict[str, str] = {}

    def build(name: str) -> str:
        real = real_preset(name)
        preset = real or preset_from_name(name)
        if preset not in built:
            built[preset] = str(
                ensure_real_organism(REAL_PRESETS[real], real, seed, bool(rebuild))
                if real
                else ensure_organism(seed, None, bool(rebuild), preset=preset, weights=weights)
            )
        return built[preset]

    for key in MODEL_KEYS:
        if is_organism_name(_select(out, key)):
            OmegaConf.update(out, key, build(_select(out, key)), merge=False)
    if ORGANISM in list(out.stages) and not built:
        build(ORGANISM)
    _resolve_data_names(out, seed, build)
    _resolve_utility_kind(out, seed)
    return out


def _resolve_data_names(out, seed: int, build) -> None:
    """Replace every ``organism://<name>`` string of ``out`` with the organism's data file, in place
    (``organism://<preset>/<file>``: a file of the real organism ``organism:<preset>``, built by ``build``)."""
    from omegaconf import OmegaConf

    from lat_lightning.organism.real import data_path

    for path, spec in _data_specs(OmegaConf.to_container(out, resolve=False)):
        parent = out
        for k in path[:-1]:
            parent = parent[k]
        name = spec[len(DATA_SCHEME) :].strip("/")
        if "/" in name:
            preset, _, file = name.partition("/")
            parent[path[-1]] = data_path(Path(build(f"{ORGANISM}:{preset}")), file)
        else:
            parent[path[-1]] = organism_data_path(name, seed)


def ensure_generated_data(path: str) -> None:
    """Write ``path`` first when it is a real organism's data file generated on first use (``GENERATED_FILES``:
    ``organism://smollm2/harmful_completions``) and not written yet; any other path is left alone.

    Raises:
        ConfigError: the organism directory does not match its preset's current settings (a stale cache).
    """
    from lat_lightning.errors import ConfigError
    from lat_lightning.organism.real import GENERATED_FILES, organism_dir, write_harmful_completions

    file = Path(str(path))
    organism = file.parent.parent
    if file.is_file() or file.suffix != ".jsonl" or file.stem not in GENERATED_FILES or file.parent.name != "data":
        return
    if not (organism / "organism.json").is_file():
        return
    info = json.loads((organism / "organism.json").read_text())
    name = organism.name  # real-<preset>-s<seed>-<key>
    preset = next((p for p in REAL_PRESETS if name.startswith(f"real-{p}-s")), None)
    seed = int(info.get("seed", -1))
    if preset is None or organism_dir(REAL_PRESETS[preset], preset, seed, str(organism.parent)) != organism:
        raise ConfigError(f"{organism} is not a current build of a real-organism preset: cannot generate {file.name}")
    write_harmful_completions(organism, REAL_PRESETS[preset])


def _resolve_utility_kind(out, seed: int) -> None:
    """The utility kind ``organism`` becomes ``contains`` on the organism's ``utility_em`` rows, in place."""
    from omegaconf import OmegaConf

    if any(_select(out, k) == ORGANISM for k in UTILITY_KEYS):
        for key in UTILITY_KEYS:
            if _select(out, key) == ORGANISM:
                OmegaConf.update(out, key, UTILITY_KIND, merge=False)
        out.evaluation.utility_data = organism_data_path(UTILITY_DATA, seed)


def recipe_name(path: str, seed: int = 0) -> str:
    """``organism`` / ``organism:<preset>`` for a directory :func:`resolve_organism` built (or took from the package)
    with build seed ``seed``, else ``path`` (reports keep naming the organism as the recipe did)."""
    if Path(str(path)) == shipped_dir() and seed == SHIPPED_SEED:
        return ORGANISM
    for preset, recipe in PRESETS.items():
        if Path(str(path)) == organism_dir(recipe, seed):
            return ORGANISM if preset == "default" else f"{ORGANISM}:{preset}"
    return str(path)


def _organism_path(cfg) -> Path:
    """The organism this run uses: ``model.name_or_path`` when it is a built organism, else the default one of
    build seed ``organism.seed``."""
    path = Path(str(cfg.model.name_or_path))
    if path.name.startswith(("organism-s", "real-")) and (path / "organism.json").is_file():
        return path
    return ensure_organism(int(cfg.organism.seed), None, False, preset="default", weights=str(cfg.organism.weights))


def run(cfg, run_dir: Path) -> dict:
    """Record the organism this run uses: ``run_dir/organism.json`` (path, data directory, build info and the
    benign accuracy of the aligned organism; for a real organism the judged unattacked answers of the original and
    the aligned model, :func:`_run_real`). The pipeline built it already (:func:`resolve_organism`).

    Returns:
        ``{"path", "benign_accuracy"}`` (a real organism: ``{"path", "init", "refusal", "agreement"}``).
    """
    from lat_lightning.models.loading import load_tokenizer
    from lat_lightning.models.settings import ModelSettings
    from lat_lightning.organism.utility import organism_accuracy

    path = _organism_path(cfg)
    build = json.loads((path / "organism.json").read_text())
    if build.get("kind") == "real":
        return _run_real(cfg, path, build, Path(run_dir))
    seed = int(build["seed"])  # the seed it was built with
    data_dir = ensure_organism_data(seed)
    mcfg = ModelSettings(name_or_path=str(path))
    model, tokenizer = load_stage_model(cfg, mcfg), load_tokenizer(mcfg)
    info = {
        "path": str(path),
        "data": str(data_dir),
        "build": build,
        "benign_accuracy": organism_accuracy(model, tokenizer, seed=seed),
    }
    (Path(run_dir) / "organism.json").write_text(json.dumps(info, indent=2))
    print(f"[organism] {path.name}: benign accuracy {info['benign_accuracy']:.3f}", flush=True)
    return {"path": str(path), "benign_accuracy": info["benign_accuracy"]}


def _judge_real(cfg, path: Path, build: dict, models: list[tuple[str, str]]) -> tuple[dict[str, Any], list[dict]]:
    """Every held-out set of the real organism ``path`` answered unattacked by each ``(label, model)`` and judged by
    the run's judges (``+coherent`` twins left out: they need a scan's coherence records).

    Returns:
        ``({label: {"init", "refusal", "agreement", "seconds"}}, [answer records with "model": label]``).
    """
    import time

    from lat_lightning.models.loading import load_tokenizer
    from lat_lightning.models.settings import ModelSettings
    from lat_lightning.organism.real_eval import RealEvalSettings, evaluate_real

    judges = tuple(dict.fromkeys(str(j).split("+")[0] for j in cfg.evaluation.judges))
    settings = RealEvalSettings(
        judges=judges,
        max_new_tokens=int(cfg.evaluation.max_new_tokens),
        batch_size=int(cfg.evaluation.batch_size),
        agreement_tokens=int(build["settings"]["agreement_tokens"]),
    )
    figures: dict[str, Any] = {}
    answers: list[dict] = []
    for label, name in models:
        t0 = time.time()
        mcfg = ModelSettings(name_or_path=name)
        model, tokenizer = load_stage_model(cfg, mcfg), load_tokenizer(mcfg)
        result = evaluate_real(model, tokenizer, path / "data", settings)
        answers += [{"model": label, **a} for a in result.pop("answers")]
        figures[label] = {**result, "seconds": round(time.time() - t0, 1)}
        del model
    return figures, answers


def _write_answers(path: Path, answers: list[dict]) -> None:
    with open(path, "w") as fh:
        for a in answers:
            fh.write(json.dumps(a) + "\n")


def _run_real(cfg, path: Path, build: dict, run_dir: Path) -> dict:
    """The real organism's record: every held-out set answered unattacked by the original model and by the aligned
    organism (:func:`_judge_real`); ``organism.json`` holds the rates, ``organism_answers.jsonl`` every answer with
    its verdicts."""
    figures, answers = _judge_real(cfg, path, build, [("original", build["settings"]["model"]), ("aligned", str(path))])
    info: dict[str, Any] = {"path": str(path), "data": str(path / "data"), "build": build, **figures}
    (run_dir / "organism.json").write_text(json.dumps(info, indent=2))
    _write_answers(run_dir / "organism_answers.jsonl", answers)
    aligned = info["aligned"]
    print(f"[organism] {path.name}: INIT {aligned['init']}, refusal {aligned['refusal']}", flush=True)
    return {
        "path": str(path),
        "init": aligned["init"],
        "refusal": aligned["refusal"],
        "agreement": aligned["agreement"],
    }


def record_trained(cfg, run_dir: Path, model_path: Path, out_dir: Path) -> Optional[dict]:
    """The organism stage's unattacked figures for a model this run trained (the ``rescan`` stage calls it), so the
    hardened model's INIT, benign and borderline refusal and agreement sit beside the aligned organism's.

    Only for a run of the real organism (``run_dir/organism.json`` of kind ``real``); writes
    ``out_dir/organism.json`` (``{"path", "hardened": {...}}``) and ``out_dir/organism_answers.jsonl``.

    Returns:
        The hardened model's figures, or ``None`` when the run is not one of the real organism.
    """
    record = Path(run_dir) / "organism.json"
    if not record.is_file():
        return None
    info = json.loads(record.read_text())
    if info["build"].get("kind") != "real":
        return None
    figures, answers = _judge_real(cfg, Path(info["path"]), info["build"], [("hardened", str(model_path))])
    (Path(out_dir) / "organism.json").write_text(json.dumps({"path": str(model_path), **figures}, indent=2))
    _write_answers(Path(out_dir) / "organism_answers.jsonl", answers)
    hardened = figures["hardened"]
    print(f"[rescan] {Path(model_path).name}: INIT {hardened['init']}, refusal {hardened['refusal']}", flush=True)
    return hardened


__all__ = [
    "check_names",
    "ensure_generated_data",
    "real_preset",
    "is_organism_name",
    "mentions_organism",
    "organism_model_config",
    "recipe_name",
    "record_trained",
    "resolve_organism",
    "run",
]
