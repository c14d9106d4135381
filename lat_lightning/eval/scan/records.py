"""The scan's records on disk: ``scan.jsonl`` (streamed, resumable), the settings guard ``scan_settings.json``, a
distributed scan's per-rank streams and their merge, and the reuse of an earlier scan's cells.

A record is one cell's answer, keyed ``(attack, seed, prompt_idx, layer)`` (:func:`cell_key`; the clean answers
are ``attack='clean'``, ``seed=None``, ``layer=-1``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from lat_lightning.eval.generation import CLEAN

log = logging.getLogger(__name__)

SCAN_FILE = "scan.jsonl"
SETTINGS_FILE = "scan_settings.json"
CLEAN_ATTACK = "clean"


def cell_key(attack: str, seed: int | None, prompt_idx: int, layer: int) -> tuple:
    """The key of one cell's record: ``(attack, seed or None, prompt_idx, layer)`` as plain ints."""
    return (attack, None if seed is None else int(seed), int(prompt_idx), int(layer))


def read_records(path: Path) -> dict[tuple, dict]:
    """Records of a ``scan.jsonl``; a torn last line (interrupted write) is ignored; later lines win."""
    out: dict[tuple, dict] = {}
    if not path.is_file():
        return out
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                log.warning("%s: ignoring a torn last line (interrupted write)", path)
                continue
            raise ValueError(f"{path} line {n + 1} is not JSON; the scan file is corrupt") from None
        out[cell_key(rec["attack"], rec.get("seed"), rec["prompt_idx"], rec["layer"])] = rec
    return out


class RecordSink:
    """Appends records to ``scan.jsonl`` line by line, flushed (and fsynced) per chunk."""

    def __init__(self, path: Path | None):
        self.path = path
        self.fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file() and path.stat().st_size:
                with open(path, "rb+") as fh:  # drop a torn last line so appends start on a fresh line
                    data = fh.read()
                    if not data.endswith(b"\n"):
                        cut = data.rfind(b"\n") + 1
                        fh.truncate(cut)
            self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open while the scan streams

    def write(self, records: Sequence[dict]) -> None:
        if self.fh is None:
            return
        for rec in records:
            self.fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.fh.flush()
        try:
            os.fsync(self.fh.fileno())
        except OSError:  # pragma: no cover - e.g. some network filesystems
            pass

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


# ----------------------------------------------------------------------------------------------- distributed
SHARD_FILE = "scan.rank{rank}.jsonl"  # a distributed scan's per-rank record stream, merged by rank 0
SHARD_GLOB = "scan.rank*.jsonl"


def barrier() -> None:
    """Wait for every rank of the process group."""
    import torch.distributed as dist

    dist.barrier()


def all_gather(obj) -> list:
    """``obj`` of every rank, in rank order."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def read_all_records(out_path: Path) -> dict[tuple, dict]:
    """``scan.jsonl`` and every rank's stream (a resumed distributed scan, any world size); later lines win."""
    records = read_records(out_path / SCAN_FILE)
    for shard_file in sorted(out_path.glob(SHARD_GLOB)):
        records.update(read_records(shard_file))
    return records


def write_records(path: Path, records: Mapping[tuple, dict]) -> None:
    """Write ``records`` as one ``scan.jsonl`` (clean rows first, then attack, seed, prompt, layer), atomically."""

    def order(rec: dict) -> tuple:
        return (
            rec["attack"] != CLEAN_ATTACK,
            rec["attack"],
            -1 if rec.get("seed") is None else int(rec["seed"]),
            int(rec["prompt_idx"]),
            int(rec["layer"]),
        )

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in sorted(records.values(), key=order):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(path)


def settings_fingerprint(settings: dict) -> str:
    """A short hash of a JSON-able dict (prompts and prompt keys are stored as this, not in full)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_settings(out_dir: Path, settings: dict, resume: bool, write: bool = True) -> None:
    """Refuse to resume in ``out_dir`` when its ``scan_settings.json`` differs from ``settings``; then (``write``)
    store ``settings`` there.

    Raises:
        ValueError: naming the settings that changed.
    """
    path = out_dir / SETTINGS_FILE
    if resume and path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(
                f"cannot resume the scan in {out_dir}: settings changed ({', '.join(diff)}); "
                "use a fresh output directory"
            )
    if write:
        path.write_text(json.dumps(settings, indent=2, default=str))


REUSE_SETTINGS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "best_of_n",
    "use_chat_template",
    "system_prompt",
    "coherence",
)


def reusable_records(
    source: str | Path,
    settings: dict,
    prompts: Sequence[str],
    prompt_keys: Sequence[int],
    source_prompt_keys: Sequence[int],
    layers: Sequence[int],
) -> dict[tuple, dict]:
    """The finished cells of another scan of the same model (``source``: its directory) that this scan would
    generate identically: same generation settings, same settings of the cell's attack, the same prompt text
    and noise key at the same index, a layer this scan covers (coherence settings included, so a record's
    coherence score holds here too). Their verdicts, the best-of-N samples' too, are dropped (this scan judges
    them with its own judges). ``source_prompt_keys`` are the source scan's prompt keys, checked against the
    fingerprint it recorded.

    Returns:
        ``key -> record`` (empty when the source is missing or its settings differ).
    """
    path = Path(source) / SETTINGS_FILE
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if any(old.get(k) != settings.get(k) for k in REUSE_SETTINGS) or old.get("prompt_keys") != settings_fingerprint(
        {"k": [int(k) for k in source_prompt_keys]}
    ):
        return {}
    same = {a for a, d in settings["attacks"].items() if old.get("attacks", {}).get(a) == d}
    wanted = {int(l) for l in layers} | {CLEAN}
    out = {}
    for key, rec in read_all_records(Path(source)).items():
        i = int(rec["prompt_idx"])
        if (
            i >= len(prompts)
            or i >= len(source_prompt_keys)
            or rec["prompt"] != prompts[i]
            or int(source_prompt_keys[i]) != int(prompt_keys[i])
            or int(rec["layer"]) not in wanted
            or (rec["attack"] != CLEAN_ATTACK and rec["attack"] not in same)
        ):
            continue
        rec = {k: v for k, v in rec.items() if k != "verdicts"}
        if rec.get("samples"):  # best-of-N samples carry verdicts of their own
            rec["samples"] = [{k: v for k, v in smp.items() if k != "verdicts"} for smp in rec["samples"]]
        out[key] = rec
    return out


def open_records(
    out_path: Path, settings: dict, prompts: Sequence[str], resume: bool, shard: tuple[int, int]
) -> dict[tuple, dict]:
    """Check (and store) the scan's settings in ``out_path`` and read back the records of an interrupted scan there.

    Only the settings of attacks already present must match: adding attacks, layers or seeds to a scan is fine.
    Every rank of a distributed scan checks alike (so every one refuses, none hangs); rank 0 alone rewrites the
    settings and, without ``resume``, deletes the old records.

    Args:
        out_path: the scan's directory (created).
        settings: the scan's settings record (``scan_settings.json``).
        prompts: the scan's prompts (records of other prompts are refused).
        resume: keep and return the finished cells (else start afresh).
        shard: ``(rank, world_size)``.

    Returns:
        The records read back (empty without ``resume``).

    Raises:
        ValueError: changed settings, or records of prompts that are not this scan's.
    """
    rank, world = shard
    out_path.mkdir(parents=True, exist_ok=True)
    old_path = out_path / SETTINGS_FILE
    settings_to_check = settings
    if resume and old_path.is_file():
        merged_attacks = dict(json.loads(old_path.read_text()).get("attacks", {}))
        for name, s in settings["attacks"].items():
            if name in merged_attacks and merged_attacks[name] != s:
                raise ValueError(
                    f"cannot resume the scan in {out_path}: settings of attack '{name}' changed "
                    f"({merged_attacks[name]} -> {s}); use a fresh output directory"
                )
            merged_attacks[name] = s
        settings_to_check = dict(settings, attacks=merged_attacks)
    check_settings(out_path, settings_to_check, resume, write=False)  # every rank refuses alike: no hang
    if world > 1:
        barrier()  # every rank has read the old settings before rank 0 rewrites them
    if rank == 0:
        if not resume:
            (out_path / SCAN_FILE).unlink(missing_ok=True)
            for old_shard in out_path.glob(SHARD_GLOB):
                old_shard.unlink()
        check_settings(out_path, settings_to_check, resume)
    if world > 1:
        barrier()
    if not resume:
        return {}
    records = read_all_records(out_path)
    for rec in records.values():
        i = int(rec["prompt_idx"])
        if i >= len(prompts) or rec["prompt"] != prompts[i]:
            raise ValueError(
                f"{out_path / SCAN_FILE} holds prompt {i} = {rec['prompt'][:60]!r}, which is "
                "not this scan's prompt; use a fresh output directory"
            )
    return records


def merge_ranks(out_path: Path, rank: int, expected: Sequence[tuple]) -> dict[tuple, dict]:
    """After every rank of a distributed scan streamed its cells: every rank reads all of them; rank 0 writes them
    as the one ``scan.jsonl`` and deletes the per-rank streams.

    Args:
        out_path: the scan's directory.
        rank: this process's rank.
        expected: the keys of every cell of the scan (all ranks').

    Returns:
        Every record.

    Raises:
        RuntimeError: a cell no rank wrote.
    """
    barrier()
    records = read_all_records(out_path)
    missing = [k for k in expected if k not in records]
    if missing:
        raise RuntimeError(
            f"distributed scan: {len(missing)} cells missing after every rank finished (e.g. {missing[0]})"
        )
    barrier()  # every rank has read the shard files
    if rank == 0:
        write_records(out_path / SCAN_FILE, records)
        for shard_file in out_path.glob(SHARD_GLOB):
            shard_file.unlink()
    return records


__all__ = [
    "CLEAN_ATTACK",
    "REUSE_SETTINGS",
    "SCAN_FILE",
    "SETTINGS_FILE",
    "SHARD_FILE",
    "SHARD_GLOB",
    "RecordSink",
    "all_gather",
    "barrier",
    "cell_key",
    "check_settings",
    "merge_ranks",
    "open_records",
    "read_all_records",
    "read_records",
    "reusable_records",
    "settings_fingerprint",
    "write_records",
]
