"""Command line: ``python train.py --recipe NAME [overrides]`` and the ``lat-lightning`` console script.

Overrides come in three spellings, all equivalent: ``a.b=v``, ``--a.b=v`` and ``--a.b v``. Unknown keys and
values of the wrong type exit with status 2 and one line naming the key and the closest valid key.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lat_lightning.config import REMOVED_KEYS, RENAMED_KEYS, STAGES, RunConfig
from lat_lightning.errors import ConfigError, LatLightningError
from lat_lightning.interrupts import StopRequested, signal_name, stop_on_signals

DEFAULT_RECIPE = "default"
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
FLAGS_WITH_VALUE = ("--recipe", "--resume")
FLAGS_BOOLEAN = ("--print-config", "--list-recipes", "--debug", "-h", "--help")

USAGE = """usage: python train.py [--recipe NAME|PATH] [--print-config] [--list-recipes] [--resume PATH|last]
                      [--debug] [key=value | --key=value | --key value ...]

Runs the stages a recipe names (fit, scan, evaluate, interpolate, ...). With no --recipe, runs the
default recipe: the CPU model-organism pipeline. `--list-recipes` shows the recipes shipped."""


def recipes_dir() -> Path:
    """Directory holding the shipped recipes (``lat_lightning.recipes``)."""
    return Path(str(resources.files("lat_lightning.recipes")))


def list_recipes() -> list[tuple[str, str]]:
    """Return ``(name, first comment line)`` for every shipped recipe, sorted by name."""
    out = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        first = ""
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                first = line.lstrip("#").strip()
                break
        out.append((path.stem, first))
    return out


def resolve_recipe(name: str) -> Path:
    """Find a recipe by shipped name or by path.

    Raises:
        ConfigError: if neither a shipped recipe nor an existing file matches.
    """
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    shipped = recipes_dir() / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = [n for n, _ in list_recipes()]
    hint = difflib.get_close_matches(name, names, n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else f"; available: {', '.join(names)}"
    raise ConfigError(f"unknown recipe '{name}'{suggestion}; see --list-recipes")


def split_argv(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Separate CLI flags from config overrides.

    Returns:
        ``(flags, dotlist)`` where dotlist entries are normalised to ``key=value``.

    Raises:
        ConfigError: on a dangling ``--key`` with no value.
    """
    flags: dict[str, Any] = {
        "recipe": None,
        "resume": None,
        "print_config": False,
        "list_recipes": False,
        "debug": False,
        "help": False,
    }
    dotlist: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        tok = args[i]
        name = tok.split("=", 1)[0]
        if name in FLAGS_WITH_VALUE:
            if "=" in tok:
                value = tok.split("=", 1)[1]
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"{tok} needs a value")
                i += 1
                value = args[i]
            key = name.lstrip("-").replace("-", "_")
            if flags[key] is not None:  # silently taking the last would run something else than asked
                raise ConfigError(f"{name} given twice ('{flags[key]}' and '{value}'); give it once")
            if not value:
                raise ConfigError(f"{name} needs a value")
            flags[key] = value
        elif tok in FLAGS_BOOLEAN:
            key = "help" if tok in ("-h", "--help") else tok.lstrip("-").replace("-", "_")
            flags[key] = True
        elif tok.startswith("--"):
            body = tok[2:]
            if "=" in body:
                dotlist.append(body)
            else:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError(f"override '{tok}' has no value; write --{body}=VALUE or {body}=VALUE")
                i += 1
                dotlist.append(f"{body}={args[i]}")
        elif "=" in tok:
            dotlist.append(tok)
        else:
            raise ConfigError(f"cannot parse argument '{tok}'; overrides look like key=value (see --help)")
        i += 1
    return flags, dotlist


def _schema_children(node_type: Any) -> Optional[dict[str, Any]]:
    """Field name -> type for a dataclass type, else ``None`` (free-form dicts, scalars)."""
    if is_dataclass(node_type):
        return {f.name: f.type for f in fields(node_type)}
    return None


def _resolve_type(cls: Any, name: str) -> Any:
    import typing

    hints = typing.get_type_hints(cls)
    return hints[name]


def check_keys(data: Any, schema_cls: type = RunConfig, prefix: str = "") -> None:
    """Reject keys in ``data`` (a nested dict) that the schema does not define.

    Raises:
        ConfigError: naming the first unknown key and the closest valid key.
    """
    if not isinstance(data, dict):
        return
    valid = [f.name for f in fields(schema_cls)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in RENAMED_KEYS:
            raise ConfigError(f"config key '{full}' was renamed '{RENAMED_KEYS[full]}'")
        if full in REMOVED_KEYS:
            raise ConfigError(f"config key '{full}' was removed: {REMOVED_KEYS[full]}")
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            where = f" in '{prefix[:-1]}'" if prefix else ""
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys{where}: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        sub = _resolve_type(schema_cls, key)
        if isinstance(sub, type) and is_dataclass(sub) and isinstance(value, dict):  # a hint: a class
            check_keys(value, sub, prefix=f"{full}.")
        elif is_dataclass(sub) and value is not None:
            children = [f.name for f in fields(sub)]
            raise ConfigError(
                f"'{full}' is a config section, not a value; set one of its keys, e.g. "
                f"'{full}.{children[0]}' (keys: {', '.join(children)})"
            )


def _dotlist_to_dict(dotlist: list[str]) -> dict[str, Any]:
    for item in dotlist:  # one at a time, so that the error names the override that does not parse
        key, _, value = item.partition("=")
        if not key.strip():
            raise ConfigError(f"override '{item}' has no key; overrides look like key=value")
        try:
            OmegaConf.from_dotlist([item])
        except Exception as exc:  # noqa: BLE001 - omegaconf and yaml errors; the first line is the useful part
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"cannot parse the value of '{key}': {value!r} is not valid YAML ({first}); quote "
                "it for the shell, e.g. 'perturbation.layers=[1,2]'"
            ) from None
    conf = OmegaConf.from_dotlist(dotlist)
    return OmegaConf.to_container(conf)  # type: ignore[return-value]


def _check_attack_lists(cfg: DictConfig) -> None:
    from lat_lightning.attacks import check_attack_name

    lists = {
        "evaluation.attacks": cfg.evaluation.attacks,
        "evaluation.validation_attacks": cfg.evaluation.validation_attacks,
        "evaluation.durability.adaptive_attacks": cfg.evaluation.durability.adaptive_attacks,
        "evaluation.durability.depth_attacks": cfg.evaluation.durability.depth_attacks,
    }
    try:
        check_attack_name(str(cfg.perturbation.attack), "perturbation.attack")
        for key, names in lists.items():
            for name in names:
                check_attack_name(str(name), key, scan=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_harmless_data(cfg, lists)


def _check_harmless_data(cfg: DictConfig, lists: dict) -> None:
    """The refusal-direction attacks contrast harmful with harmless prompts: the config must name some."""
    from lat_lightning.attacks import attack_class

    if attack_class(str(cfg.perturbation.attack)).needs_harmless and "fit" in cfg.stages and not cfg.data.benign:
        raise ConfigError(
            f"perturbation.attack={cfg.perturbation.attack} contrasts each batch's harmful prompts with "
            "harmless ones: set data.benign (harmless prompt/response pairs)"
        )
    for key, names in lists.items():
        for name in names:
            if attack_class(str(name)).needs_harmless and not (cfg.data.benign or cfg.data.eval_benign):
                raise ConfigError(
                    f"{key}: attack '{name}' needs harmless prompts for the refusal direction: set "
                    "data.eval_benign or data.benign"
                )


# Config keys holding layer lists (block indices or "embed"); checked for form here, against the model later.
LAYER_LIST_KEYS = (
    "perturbation.layers",
    "evaluation.layers",
    "callbacks.fragile_layers.layers",
    "callbacks.fragile_layers.candidate_layers",
    "evaluation.durability.fragile_layers",
    "evaluation.durability.layers",
)


def _check_layer_lists(cfg: DictConfig) -> None:
    from lat_lightning.models.layers import parse_layers

    for key in LAYER_LIST_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is not None:
            try:
                parse_layers(list(value), key)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


def _check_choices(cfg: DictConfig) -> None:
    _check_attack_lists(cfg)
    _check_layer_lists(cfg)
    from lat_lightning.preflight import check_choices

    check_choices(cfg)
    for stage in cfg.stages:
        if stage not in STAGES:
            close = difflib.get_close_matches(str(stage), STAGES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown stage '{stage}' in 'stages'; valid stages: {', '.join(STAGES)}{hint}")


def load_config(recipe: Optional[str], overrides: Sequence[str] = ()) -> DictConfig:
    """Build the resolved, validated run config from a recipe and dotlist overrides.

    Args:
        recipe: shipped recipe name or path to a YAML file (``None`` = the default recipe).
        overrides: ``key=value`` strings, applied after the recipe.

    Returns:
        A structured ``DictConfig`` typed by :class:`RunConfig` (struct mode: new keys are refused).

    Raises:
        ConfigError: unknown recipe, unknown key, wrong type or a value outside its allowed choices.
    """
    path = resolve_recipe(recipe or DEFAULT_RECIPE)
    try:
        recipe_cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry multi-line context; keep the first line
        raise ConfigError(f"cannot read recipe {path}: {str(exc).splitlines()[0]}") from None
    recipe_dict = OmegaConf.to_container(recipe_cfg) or {}
    if not isinstance(recipe_dict, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping of config keys")
    check_keys(recipe_dict)
    override_dict = _dotlist_to_dict(list(overrides))
    check_keys(override_dict)
    schema = OmegaConf.structured(RunConfig)
    try:
        cfg = cast(DictConfig, OmegaConf.merge(schema, recipe_dict, override_dict))  # merged into a mapping
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = (str(getattr(exc, "msg", None) or exc).splitlines() or ["?"])[0]
        raise ConfigError(f"invalid value for '{key}': {msg}") from None
    OmegaConf.set_struct(cfg, True)
    _check_choices(cfg)
    return cfg


def _one_line(exc: BaseException) -> str:
    return " ".join((str(exc).strip().splitlines() or [""])[0].split()) if str(exc).strip() else type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point shared by ``train.py`` and the ``lat-lightning`` console script.

    Returns:
        Process exit status: 0 success, 2 bad input (:class:`~lat_lightning.errors.LatLightningError`, before
        anything is written), 130 / 143 a run stopped by SIGINT / SIGTERM (what was saved and how to resume is in
        the error line), 1 an internal error. See docs/errors.md.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    with stop_on_signals():  # SIGTERM / SIGINT while parsing: one line too (the pipeline handles its own)
        return _main(argv, debug)


def _main(argv: list[str], debug: bool) -> int:
    try:
        flags, dotlist = split_argv(argv)
        if flags["help"]:
            print(USAGE)
            return 0
        if flags["list_recipes"]:
            for name, first in list_recipes():
                print(f"{name:28s} {first}")
            return 0
        cfg = load_config(flags["recipe"], dotlist)
        if flags["print_config"]:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        from lat_lightning.pipeline import run_pipeline

        run_pipeline(cfg, recipe=flags["recipe"] or DEFAULT_RECIPE, resume=flags["resume"], debug=debug)
        return 0
    except LatLightningError as exc:
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_BAD_INPUT)  # 128 + signal for a run stopped by SIGTERM/SIGINT
    except (StopRequested, KeyboardInterrupt) as exc:  # before the run started (parsing, imports)
        signum = exc.signum if isinstance(exc, StopRequested) else int(signal.SIGINT)
        print(f"error: stopped by {signal_name(signum)} before the run started; nothing was saved", file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line unless --debug
        if debug:
            raise
        print(
            f"error: {type(exc).__name__}: {_one_line(exc)} (an internal error, not your input: rerun with "
            "--debug for the traceback, which the run directory's run.log also holds)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def entry() -> None:
    """Console-script wrapper that turns :func:`main`'s status into the process exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
