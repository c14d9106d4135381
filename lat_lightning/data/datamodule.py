"""Lightning data module: safety batches with an optional benign stream zipped in.

Order is a pure function of ``(cfg.seed, epoch)``: the sampler draws one permutation per stream, epoch
and cycle from a seed derived from those integers, so a resumed run (Lightning restores the epoch and
calls ``set_epoch``) sees the same order, and so does every dataloader worker. Nothing is persistent
between epochs other than the epoch number.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from lat_lightning.data.collate import (
    collate_safety,
    encode_benign_example,
    encode_safety_example,
    resolve_pad_id,
)
from lat_lightning.data.loaders import load_benign_examples, load_safety_examples
from lat_lightning.data.schema import BenignExample, SafetyExample
from lat_lightning.data.templating import TruncationStats
from lat_lightning.errors import DataError

log = logging.getLogger(__name__)

_SAFETY_STREAM, _BENIGN_STREAM = 0, 1
NO_BENIGN = -1


def _derived_seed(*key: int) -> int:
    """A 63-bit seed from integers; stable across processes (unlike ``hash``)."""
    digest = hashlib.blake2b(",".join(str(int(k)) for k in key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ZippedSampler(Sampler):
    """Yields ``(safety_index, benign_index)`` pairs; the shorter stream cycles.

    An epoch has ``max(num_safety, num_benign)`` pairs (``num_safety`` without benign data, where the
    benign index is :data:`NO_BENIGN`). Each pass over a stream is a fresh permutation seeded by
    ``(seed, epoch, stream, cycle)``, so a cycled stream does not repeat the same order.

    Args:
        num_safety: number of safety items.
        num_benign: number of benign items (0 for none).
        shuffle: permute; otherwise both streams run in order.
        seed: base seed (``cfg.seed``).
    """

    def __init__(self, num_safety: int, num_benign: int = 0, shuffle: bool = True, seed: int = 0):
        if num_safety < 1:
            raise ValueError("ZippedSampler needs at least one safety item")
        self.num_safety = num_safety
        self.num_benign = num_benign
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields (Lightning calls this every epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(self.num_safety, self.num_benign)

    def _stream(self, stream: int, size: int, total: int) -> list[int]:
        order: list[int] = []
        cycle = 0
        while len(order) < total:
            if self.shuffle:
                gen = torch.Generator().manual_seed(_derived_seed(self.seed, self.epoch, stream, cycle))
                order.extend(torch.randperm(size, generator=gen).tolist())
            else:
                order.extend(range(size))
            cycle += 1
        return order[:total]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        total = len(self)
        safety = self._stream(_SAFETY_STREAM, self.num_safety, total)
        benign = (self._stream(_BENIGN_STREAM, self.num_benign, total) if self.num_benign
                  else [NO_BENIGN] * total)
        return iter(list(zip(safety, benign)))


class EncodedSafetyDataset(Dataset):
    """Encoded safety items, indexed by ``(safety_index, benign_index)`` pairs from :class:`ZippedSampler`.

    Args:
        safety: outputs of :func:`encode_safety_example`.
        benign: outputs of :func:`encode_benign_example` (may be empty).
    """

    def __init__(self, safety: Sequence[dict[str, Any]], benign: Sequence[dict[str, Any]] = ()):
        self.safety = list(safety)
        self.benign = list(benign)

    def __len__(self) -> int:
        return len(self.safety)

    def __getitem__(self, key) -> dict[str, Any]:
        s, b = key if isinstance(key, tuple) else (key, NO_BENIGN)
        item = self.safety[s]
        if b != NO_BENIGN:
            item = {**item, "benign": self.benign[b]}
        return item


class SafetyDataModule(LightningDataModule):
    """Safety (+ benign) training data and optional held-out harmful prompts for validation.

    Reads ``cfg.data`` (sources, column maps, length policy, batch size, workers, shuffle),
    ``cfg.model.use_chat_template``, ``cfg.model.system_prompt`` and ``cfg.seed``. Examples come from the
    configured sources, or from the lists passed in (the model organism builds its own), which take
    precedence. Everything is tokenised once, in the first :meth:`setup` call.

    ``train_dataloader`` yields :func:`collate_safety` batches; with benign data each batch also carries
    ``benign_*`` keys (the shorter stream cycles). ``val_dataloader`` yields plain lists of
    :class:`SafetyExample` (held-out harmful prompts from ``data.eval_harmful``, or ``eval_examples``) for a
    validation step to generate from (see :func:`collate.prompt_batch`); it is an empty list when there
    are none.

    Args:
        cfg: a run config (``RunConfig`` or its ``DictConfig``).
        tokenizer: the model's tokenizer.
        safety_examples: use these instead of loading ``data.harmful``.
        benign_examples: use these instead of loading ``data.benign``.
        eval_examples: use these instead of loading ``data.eval_harmful``.
    """

    def __init__(self, cfg, tokenizer, safety_examples: Sequence[SafetyExample] | None = None,
                 benign_examples: Sequence[BenignExample] | None = None,
                 eval_examples: Sequence[SafetyExample] | None = None):
        super().__init__()
        self.cfg = cfg
        self.data_cfg = cfg.data
        self.tokenizer = tokenizer
        self.pad_id = resolve_pad_id(tokenizer)
        self.safety_examples = list(safety_examples) if safety_examples is not None else None
        self.benign_examples = list(benign_examples) if benign_examples is not None else None
        self.eval_examples = list(eval_examples) if eval_examples is not None else None
        self.safety_stats = TruncationStats()
        self.benign_stats = TruncationStats()
        self.train_dataset: EncodedSafetyDataset | None = None
        self.sampler: ZippedSampler | None = None

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Load (unless given) and tokenise all data; a no-op after the first call.

        Raises:
            DataError: no safety source is configured, a source fails to load, a sequence violates the
                ``error`` length policy, or nothing is left after dropping.
        """
        if self.train_dataset is not None:
            return
        data = self.data_cfg
        if self.safety_examples is None:
            if not data.harmful:
                raise DataError("data.harmful is not set; point it at a .jsonl/.json/.csv file, a saved dataset "
                                "directory or a datasets name")
            self.safety_examples = load_safety_examples(
                data.harmful, data.harmful_split, dict(data.harmful_columns or {}), data.default_safe_response,
                data.max_examples)
        if self.benign_examples is None and data.benign:
            self.benign_examples = load_benign_examples(data.benign, data.benign_split,
                                                        dict(data.benign_columns or {}), data.max_examples)
        if self.eval_examples is None and data.eval_harmful:
            self.eval_examples = load_safety_examples(
                data.eval_harmful, data.harmful_split, dict(data.harmful_columns or {}),
                data.default_safe_response)
        safety = self._encode_safety(self.safety_examples)
        benign = self._encode_benign(self.benign_examples or [])
        self.train_dataset = EncodedSafetyDataset(safety, benign)
        self.sampler = ZippedSampler(len(safety), len(benign), shuffle=bool(data.shuffle), seed=int(self.cfg.seed))

    def _encode_kwargs(self) -> dict[str, Any]:
        return {"max_length": int(self.data_cfg.max_length), "truncation": str(self.data_cfg.truncation),
                "use_chat_template": bool(self.cfg.model.use_chat_template),
                "system_prompt": self.cfg.model.system_prompt}

    def _encode_safety(self, examples: Sequence[SafetyExample]) -> list[dict[str, Any]]:
        if not examples:
            raise DataError("no safety examples to train on")
        items = [encode_safety_example(self.tokenizer, ex, stats=self.safety_stats, **self._encode_kwargs())
                 for ex in examples]
        kept = [it for it in items if it is not None]
        self._report("safety", len(examples), self.safety_stats)
        if not kept:
            raise DataError(f"all {len(examples)} safety examples were dropped by data.truncation=drop at "
                            f"data.max_length={self.data_cfg.max_length}; raise max_length or use right/left")
        return kept

    def _encode_benign(self, examples: Sequence[BenignExample]) -> list[dict[str, Any]]:
        if not examples:
            return []
        items = [encode_benign_example(self.tokenizer, ex, stats=self.benign_stats, index=i,
                                       **self._encode_kwargs()) for i, ex in enumerate(examples)]
        kept = [it for it in items if it is not None]
        self._report("benign", len(examples), self.benign_stats)
        if not kept:
            raise DataError(f"all {len(examples)} benign examples were dropped by data.truncation=drop at "
                            f"data.max_length={self.data_cfg.max_length}; raise max_length or use right/left")
        return kept

    def _report(self, kind: str, total: int, stats: TruncationStats) -> None:
        policy, max_length = self.data_cfg.truncation, self.data_cfg.max_length
        msg = (f"{kind} data: {total} examples, {stats.truncated} truncated, {stats.dropped} dropped "
               f"(data.truncation={policy}, data.max_length={max_length})")
        if stats.truncated or stats.dropped:
            shown = ", ".join(str(i) for i in stats.examples[:10]) + (" ..." if len(stats.examples) > 10 else "")
            log.warning("%s; affected examples: %s", msg, shown)
        else:
            log.info(msg)

    # ----------------------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        """Safety batches (``collate_safety``), benign pairs zipped in when configured."""
        if self.train_dataset is None:
            self.setup("fit")
        workers = int(self.data_cfg.num_workers)
        return DataLoader(self.train_dataset, batch_size=int(self.data_cfg.batch_size), sampler=self.sampler,
                          collate_fn=partial(collate_safety, pad_id=self.pad_id), num_workers=workers,
                          persistent_workers=False, drop_last=False)

    def val_dataloader(self):
        """Held-out harmful prompts as batches of :class:`SafetyExample` lists (``[]`` when none)."""
        if self.train_dataset is None:
            self.setup("validate")
        if not self.eval_examples:
            if self.data_cfg.eval_benign or self.cfg.evaluation.utility_data:
                # One empty batch so the validation epoch runs and scores over-refusal and utility.
                return DataLoader([[]], batch_size=None, collate_fn=list)
            return []
        return DataLoader(self.eval_examples, batch_size=int(self.data_cfg.batch_size), shuffle=False,
                          collate_fn=list, num_workers=0)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints so a resume can check it reproduces the same data order."""
        if self.train_dataset is None:
            return {}
        return {"seed": int(self.cfg.seed), "num_safety": len(self.train_dataset.safety),
                "num_benign": len(self.train_dataset.benign)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when the resumed data differs from the checkpoint's (the order would differ too)."""
        if state_dict and self.train_dataset is not None and state_dict != self.state_dict():
            log.warning("resumed data differs from the checkpoint's (%s vs %s): the sample order will differ",
                        self.state_dict(), state_dict)


__all__ = ["NO_BENIGN", "EncodedSafetyDataset", "SafetyDataModule", "ZippedSampler"]
