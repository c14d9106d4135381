"""Lightning data module: safety batches with an optional benign stream zipped in.

Order is a pure function of ``(seed, epoch)``: the sampler draws one permutation per stream, epoch
and cycle from a seed derived from those integers, so a resumed run (Lightning restores the epoch and
calls ``set_epoch``) sees the same order, and so does every dataloader worker. Nothing is persistent
between epochs other than the epoch number.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
from lat_lightning.data.settings import DataSettings
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
        seed: base seed (the run config's ``seed``).
    """

    def __init__(self, num_safety: int, num_benign: int = 0, shuffle: bool = True, seed: int = 0):
        if num_safety < 1:
            raise ValueError("ZippedSampler needs at least one safety item")
        self.num_safety = num_safety
        self.num_benign = num_benign
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size, self.batch_size = 0, 1, 1
        self._skip: tuple[int, int] = (-1, 0)  # (epoch, items of this rank's share to skip once)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields (Lightning calls this every epoch)."""
        self.epoch = int(epoch)

    def shard(self, rank: int, world_size: int, batch_size: int) -> None:
        """Data parallelism: this rank yields its ``batch_size`` slice of every global batch.

        Global batch ``g`` is items ``[g·B·W, (g+1)·B·W)`` of the epoch's order (``B`` = per-rank batch,
        ``W`` = world size) and rank ``r`` gets ``[g·B·W + r·B, g·B·W + (r+1)·B)``, so ``W`` processes with
        batch ``B`` see exactly the batches one process with batch ``B·W`` sees. With ``W > 1`` the last
        global batch is completed from the start of the order, so every rank runs the same number of steps.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)

    def skip_once(self, epoch: int, items: int) -> None:
        """Resume: in ``epoch`` only, start after the first ``items`` of this rank's share."""
        self._skip = (int(epoch), int(items))

    def __len__(self) -> int:
        total = max(self.num_safety, self.num_benign)
        if self.world_size == 1:
            return total
        step = self.batch_size * self.world_size
        return -(-total // step) * self.batch_size

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
        total = max(self.num_safety, self.num_benign)
        safety = self._stream(_SAFETY_STREAM, self.num_safety, total)
        benign = self._stream(_BENIGN_STREAM, self.num_benign, total) if self.num_benign else [NO_BENIGN] * total
        pairs = list(zip(safety, benign))
        if self.world_size > 1:
            step, b = self.batch_size * self.world_size, self.batch_size
            while len(pairs) % step:
                pairs.append(pairs[len(pairs) % total])
            mine = range(self.rank * b, (self.rank + 1) * b)
            pairs = [pairs[g + i] for g in range(0, len(pairs), step) for i in mine]
        skip_epoch, skip_items = self._skip
        if skip_epoch == self.epoch:
            pairs = pairs[skip_items:]
            self._skip = (-1, 0)
        return iter(pairs)


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


@dataclass(frozen=True)
class DataModuleSettings:
    """What :class:`SafetyDataModule` reads (built from the run config by ``stages.settings.datamodule_settings``).

    Attributes:
        data: sources, column maps, row filter, default target, length policy, batch size, workers, shuffle.
        seed: keys the sampler's order (``seed`` of the run config).
        use_chat_template / system_prompt: prompt formatting (the ``model`` section's).
        validate_without_prompts: with no held-out harmful prompts, still run one (empty) validation batch, so the
            validation loop scores over-refusal and utility (set when ``data.eval_benign`` or
            ``evaluation.utility_data`` is).
        validation_prompts: the validation loop attacks the first this many held-out harmful prompts (``None``:
            all; ``evaluation.validation_prompts``, checked there).
    """

    data: DataSettings = field(default_factory=DataSettings)
    seed: int = 0
    use_chat_template: bool = True
    system_prompt: str | None = None
    validate_without_prompts: bool = False
    validation_prompts: int | None = None


class SafetyDataModule(LightningDataModule):
    """Safety (+ benign) training data and optional held-out harmful prompts for validation.

    Reads :class:`DataModuleSettings`. Examples come from the
    configured sources, or from the lists passed in (the model organism builds its own), which take
    precedence. Everything is tokenised once, in the first :meth:`setup` call.

    ``train_dataloader`` yields :func:`collate_safety` batches; with benign data each batch also carries
    ``benign_*`` keys (the shorter stream cycles). ``val_dataloader`` yields plain lists of
    :class:`SafetyExample` (held-out harmful prompts from ``data.eval_harmful``, or ``eval_examples``) for a
    validation step to generate from (see :func:`collate.prompt_batch`); it is an empty list when there
    are none.

    Args:
        settings: the data settings, seed and prompt formatting.
        tokenizer: the model's tokenizer.
        safety_examples: use these instead of loading ``data.harmful``.
        benign_examples: use these instead of loading ``data.benign``.
        eval_examples: use these instead of loading ``data.eval_harmful``.
        require_target: training needs a harmful target per example (ASAgrad, PGD, ``loss.away_from_harmful``):
            prompt-only data without ``data.default_target`` is then an error. Otherwise prompt-only examples
            train on the refusal alone (LAPT with Gaussian noise).
    """

    def __init__(
        self,
        settings: DataModuleSettings,
        tokenizer,
        safety_examples: Sequence[SafetyExample] | None = None,
        benign_examples: Sequence[BenignExample] | None = None,
        eval_examples: Sequence[SafetyExample] | None = None,
        require_target: bool = True,
    ):
        super().__init__()
        self.require_target = bool(require_target)
        self.settings = settings
        self.data_settings = settings.data
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
        data = self.data_settings
        if self.safety_examples is None:
            # An ASABench export trains each instance at its own layer (its layer_idx column).
            source = data.asabench or data.harmful
            if not source:
                raise DataError(
                    "data.harmful is not set; point it at a .jsonl/.json/.csv file, a saved dataset "
                    "directory or a datasets name (or data.asabench at an ASABench export)"
                )
            self.safety_examples = load_safety_examples(
                source,
                data.harmful_split,
                dict(data.harmful_columns or {}),
                data.default_safe_response,
                data.max_examples,
                default_target=data.default_target,
                require_target=self.require_target,
                row_filter=dict(data.filter or {}),
            )
        if self.benign_examples is None and data.benign:
            self.benign_examples = load_benign_examples(
                data.benign, data.benign_split, dict(data.benign_columns or {}), data.max_examples
            )
        if self.eval_examples is None and data.eval_harmful:
            self.eval_examples = load_safety_examples(  # validation generates from the prompts: no target needed
                data.eval_harmful,
                data.harmful_split,
                dict(data.harmful_columns or {}),
                data.default_safe_response,
                default_target=data.default_target,
                require_target=False,
                row_filter=dict(data.filter or {}),
            )
        safety = self._encode_safety(self.safety_examples)
        benign = self._encode_benign(self.benign_examples or [])
        self.train_dataset = EncodedSafetyDataset(safety, benign)
        self.sampler = ZippedSampler(len(safety), len(benign), shuffle=bool(data.shuffle), seed=int(self.settings.seed))

    def _encode_kwargs(self) -> dict[str, Any]:
        return {
            "max_length": int(self.data_settings.max_length),
            "truncation": str(self.data_settings.truncation),
            "use_chat_template": bool(self.settings.use_chat_template),
            "system_prompt": self.settings.system_prompt,
        }

    def _encode_safety(self, examples: Sequence[SafetyExample]) -> list[dict[str, Any]]:
        if not examples:
            raise DataError("no safety examples to train on")
        items = [
            encode_safety_example(self.tokenizer, ex, stats=self.safety_stats, **self._encode_kwargs())
            for ex in examples
        ]
        kept = [it for it in items if it is not None]
        self._report("safety", len(examples), self.safety_stats)
        if not kept:
            raise DataError(
                f"all {len(examples)} safety examples were dropped by data.truncation=drop at "
                f"data.max_length={self.data_settings.max_length}; raise max_length or use right/left"
            )
        return kept

    def _encode_benign(self, examples: Sequence[BenignExample]) -> list[dict[str, Any]]:
        if not examples:
            return []
        items = [
            encode_benign_example(self.tokenizer, ex, stats=self.benign_stats, index=i, **self._encode_kwargs())
            for i, ex in enumerate(examples)
        ]
        kept = [it for it in items if it is not None]
        self._report("benign", len(examples), self.benign_stats)
        if not kept:
            raise DataError(
                f"all {len(examples)} benign examples were dropped by data.truncation=drop at "
                f"data.max_length={self.data_settings.max_length}; raise max_length or use right/left"
            )
        return kept

    def _report(self, kind: str, total: int, stats: TruncationStats) -> None:
        policy, max_length = self.data_settings.truncation, self.data_settings.max_length
        msg = (
            f"{kind} data: {total} examples, {stats.truncated} truncated, {stats.dropped} dropped "
            f"(data.truncation={policy}, data.max_length={max_length})"
        )
        if stats.truncated or stats.dropped:
            shown = ", ".join(str(i) for i in stats.examples[:10]) + (" ..." if len(stats.examples) > 10 else "")
            log.warning("%s; affected examples: %s", msg, shown)
        else:
            log.info(msg)

    # ----------------------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        """Safety batches (``collate_safety``), benign pairs zipped in when configured.

        Under data parallelism each rank gets its slice of every global batch (:meth:`ZippedSampler.shard`);
        after a resume the restored epoch starts at the next unseen batch.
        """
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None and self.sampler is not None  # setup made both
        trainer = self._trainer_or_none()
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.sampler.shard(rank, world, int(self.data_settings.batch_size))
        if self._resume_position is not None:
            self._apply_resume_position(self._resume_position)
            self._resume_position = None
        workers = int(self.data_settings.num_workers)
        # Its own generator: starting an epoch's iterator must not draw from the global RNG (dropout), or a
        # run resumed at an epoch boundary would see different dropout masks than the uninterrupted run.
        generator = torch.Generator().manual_seed(_derived_seed(int(self.settings.seed), 0x10ADE4))
        return DataLoader(
            self.train_dataset,
            batch_size=int(self.data_settings.batch_size),
            sampler=self.sampler,
            collate_fn=partial(collate_safety, pad_id=self.pad_id),
            num_workers=workers,
            persistent_workers=False,
            drop_last=False,
            generator=generator,
        )

    def val_dataloader(self):
        """Held-out harmful prompts as batches of :class:`SafetyExample` lists (``[]`` when none): the first
        ``settings.validation_prompts`` of them (all when ``None``)."""
        if self.train_dataset is None:
            self.setup("validate")
        cap = self.settings.validation_prompts
        examples = (self.eval_examples or [])[: None if cap is None else int(cap)]
        if not examples:
            if self.settings.validate_without_prompts:
                # One empty batch so the validation epoch runs and scores over-refusal and utility.
                return DataLoader([[]], batch_size=None, collate_fn=list)
            return []
        return DataLoader(
            examples,
            batch_size=int(self.data_settings.batch_size),
            shuffle=False,
            collate_fn=list,
            num_workers=0,
        )

    # ----------------------------------------------------------------------------------------- state
    _DATA_KEYS = ("seed", "num_safety", "num_benign")
    _resume_position: dict[str, Any] | None = None

    def _trainer_or_none(self):
        try:
            return self.trainer
        except RuntimeError:  # not attached
            return None

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: what defines the order, and the position in it (epoch, samples consumed).

        ``samples_consumed`` counts global samples of the current epoch (batches done on each rank × per-rank
        batch × world size), so a resume with another world size still continues at the right sample.
        """
        if self.train_dataset is None:
            return {}
        state = {
            "seed": int(self.settings.seed),
            "num_safety": len(self.train_dataset.safety),
            "num_benign": len(self.train_dataset.benign),
        }
        trainer = self._trainer_or_none()
        if trainer is not None and self.sampler is not None:
            done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            state.update(
                epoch=int(trainer.current_epoch),
                samples_consumed=done * self.sampler.batch_size * self.sampler.world_size,
            )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data position (applied when the train loader is built); warn when the data differ."""
        if state_dict and self.train_dataset is not None:
            ours = {k: v for k, v in self.state_dict().items() if k in self._DATA_KEYS}
            theirs = {k: v for k, v in state_dict.items() if k in self._DATA_KEYS}
            if ours != theirs:
                log.warning(
                    "resumed data differs from the checkpoint's (%s vs %s): the sample order will differ", ours, theirs
                )
        if state_dict and "samples_consumed" in state_dict:
            self._resume_position = {
                "epoch": int(state_dict["epoch"]),
                "samples_consumed": int(state_dict["samples_consumed"]),
            }

    def _apply_resume_position(self, position: dict[str, int]) -> None:
        assert self.sampler is not None  # called by train_dataloader, after setup
        per_global_batch = self.sampler.batch_size * self.sampler.world_size
        consumed = position["samples_consumed"]
        if consumed % per_global_batch:
            log.warning(
                "resuming with a different global batch (%d) than the checkpoint's: restarting at sample "
                "%d of the epoch instead of %d",
                per_global_batch,
                consumed - consumed % per_global_batch,
                consumed,
            )
        per_rank = (consumed // per_global_batch) * self.sampler.batch_size
        if per_rank < len(self.sampler):  # an epoch that ended is simply over
            self.sampler.skip_once(position["epoch"], per_rank)


__all__ = ["NO_BENIGN", "DataModuleSettings", "EncodedSafetyDataset", "SafetyDataModule", "ZippedSampler"]
