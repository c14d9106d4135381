"""ASABench-schema export and import of successful (prompt, layer) attack instances.

One instance per attacked cell judged a success: the prompt, the layer, the model's clean answer and its
answer under the attack, in the reference schema

    {"prompt_idx": int, "prompt": str, "layer_idx": int, "original_response": str, "steered_response": str}

LAPT training reads these files (``data.asabench``) to attack each instance at its own layer.

Splits:
  - ``prompt`` (default): prompt-disjoint. The prompts are shuffled (seeded) and a ``test_fraction`` of
    them go to test with ALL their instances, so no prompt appears in both files.
  - ``layer_stratified``: the reference's split. Within every layer a ``test_fraction`` of that layer's
    instances go to test. The same prompt (at other layers) then usually appears in both files, so test
    numbers measure memorisation of prompts as much as generalisation; it exists for comparison only.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from lat_lightning.errors import DataError

ASABENCH_FIELDS = ("prompt_idx", "prompt", "layer_idx", "original_response", "steered_response")
SPLIT_MODES = ("prompt", "layer_stratified")


def make_instance(prompt_idx: int, prompt: str, layer_idx: int, original_response: str, steered_response: str) -> dict:
    """One instance in the reference schema (field order as in the reference files)."""
    return {
        "prompt_idx": int(prompt_idx),
        "prompt": str(prompt),
        "layer_idx": int(layer_idx),
        "original_response": str(original_response),
        "steered_response": str(steered_response),
    }


def _n_test(n: int, test_fraction: float) -> int:
    if n <= 1 or test_fraction <= 0:
        return 0 if test_fraction < 1 else n
    k = round(n * test_fraction)
    return min(max(k, 1), n - 1) if test_fraction < 1 else n


def split_instances(
    instances: Sequence[Mapping], test_fraction: float = 0.4, mode: str = "prompt", seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Split instances into ``(train, test)`` (see the module docstring for the two modes).

    Args:
        instances: ASABench-schema dicts.
        test_fraction: fraction of prompts (``prompt`` mode) or of each layer's instances
            (``layer_stratified``) that go to test; at least one and at most all but one when there are
            two or more.
        mode: ``prompt`` or ``layer_stratified``.
        seed: shuffling seed.

    Raises:
        ValueError: unknown mode or a fraction outside [0, 1].
    """
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split mode '{mode}'; choose from {', '.join(SPLIT_MODES)}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    rng = random.Random(seed)
    items = [dict(x) for x in instances]
    if mode == "prompt":
        prompts = sorted({int(x["prompt_idx"]) for x in items})
        rng.shuffle(prompts)
        test_prompts = set(prompts[: _n_test(len(prompts), test_fraction)])
        train = [x for x in items if int(x["prompt_idx"]) not in test_prompts]
        test = [x for x in items if int(x["prompt_idx"]) in test_prompts]
        return train, test
    train, test = [], []
    for layer in sorted({int(x["layer_idx"]) for x in items}):
        idx = [i for i, x in enumerate(items) if int(x["layer_idx"]) == layer]
        rng.shuffle(idx)
        chosen = set(idx[: _n_test(len(idx), test_fraction)])
        for i in sorted(idx):
            (test if i in chosen else train).append(items[i])
    order = {id(x): i for i, x in enumerate(items)}
    return sorted(train, key=lambda x: order[id(x)]), sorted(test, key=lambda x: order[id(x)])


def write_jsonl(rows: Iterable[Mapping], path: Path) -> Path:
    """Write rows as JSON lines (atomically: a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({k: row[k] for k in ASABENCH_FIELDS}, ensure_ascii=False) + "\n" for row in rows)
        tmp.replace(path)
    finally:  # stopped half-way (an error, SIGTERM): no temp file left behind
        tmp.unlink(missing_ok=True)
    return path


def export_asabench(
    instances: Sequence[Mapping],
    out_dir: Path,
    test_fraction: float = 0.4,
    split_mode: str = "prompt",
    seed: int = 0,
    prefix: str = "asabench",
) -> dict:
    """Split and write ``<prefix>_train.jsonl`` / ``<prefix>_test.jsonl`` into ``out_dir``.

    Returns:
        ``{"train_path", "test_path", "n_train", "n_test", "n_instances", "train_prompts", "test_prompts",
        "split_mode", "test_fraction", "prompt_disjoint"}``.
    """
    train, test = split_instances(instances, test_fraction, split_mode, seed)
    out = Path(out_dir)
    train_path = write_jsonl(train, out / f"{prefix}_train.jsonl")
    test_path = write_jsonl(test, out / f"{prefix}_test.jsonl")
    tr_p = {int(x["prompt_idx"]) for x in train}
    te_p = {int(x["prompt_idx"]) for x in test}
    return {
        "train_path": str(train_path),
        "test_path": str(test_path),
        "n_train": len(train),
        "n_test": len(test),
        "n_instances": len(instances),
        "train_prompts": len(tr_p),
        "test_prompts": len(te_p),
        "split_mode": split_mode,
        "test_fraction": test_fraction,
        "prompt_disjoint": not (tr_p & te_p),
    }


def load_asabench(path: str | Path) -> list[dict]:
    """Read an ASABench-schema JSONL (or JSON list) file, checking every field.

    Raises:
        DataError: missing file, unparsable line, or a row without the schema's fields.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ASABench file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"cannot parse {path} line {lineno}: {exc.msg}") from None
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ASABENCH_FIELDS if k not in row]
        if missing:
            raise DataError(f"{path} row {i}: missing ASABench field(s) {', '.join(missing)}")
        out.append(
            make_instance(
                row["prompt_idx"], row["prompt"], row["layer_idx"], row["original_response"], row["steered_response"]
            )
        )
    return out


def instances_from_records(
    records: Iterable[Mapping], clean_responses: Mapping[int, str], judge: str, attacks: Sequence[str] | None = None
) -> list[dict]:
    """Successful scan cells (``verdicts[judge].success``) as ASABench instances, one per (prompt, layer).

    When several attacks or seeds broke the same (prompt, layer), the first in ``attacks`` order (then the
    lowest seed) is kept. Clean cells (layer ``-1``) and input-embedding cells (``embed``, layer ``-2``) are left
    out: an ASABench instance names a decoder block.
    """
    order = {a: k for k, a in enumerate(attacks)} if attacks is not None else {}
    best: dict[tuple[int, int], tuple] = {}
    for rec in records:
        if rec.get("layer", -1) < 0 or (attacks is not None and rec["attack"] not in order):
            continue
        verdict = (rec.get("verdicts") or {}).get(judge) or {}
        if verdict.get("success") is not True:
            continue
        key = (int(rec["prompt_idx"]), int(rec["layer"]))
        rank = (order.get(rec["attack"], 0), rec.get("seed") or 0)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, rec)
    out = []
    for (i, l), (_, rec) in sorted(best.items()):
        out.append(make_instance(i, rec["prompt"], l, clean_responses.get(i, ""), rec["response"]))
    return out


__all__ = [
    "ASABENCH_FIELDS",
    "SPLIT_MODES",
    "export_asabench",
    "instances_from_records",
    "load_asabench",
    "make_instance",
    "split_instances",
    "write_jsonl",
]
