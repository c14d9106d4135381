"""SafetyDataModule: loading from a run config, length policy reporting, deterministic zipped order."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from lat_lightning.config import RunConfig
from lat_lightning.data.datamodule import NO_BENIGN, SafetyDataModule, ZippedSampler
from lat_lightning.data.schema import BenignExample, SafetyExample
from lat_lightning.errors import DataError
from lat_lightning.stages.settings import datamodule_settings

SAFETY_ROWS = [{"goal": f"Harmful request number {i}", "target": f"Sure, here is answer {i}"} for i in range(5)]
BENIGN_ROWS = [{"question": f"What is {i} plus 1?", "answer": f"It is {i + 1}."} for i in range(3)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make_cfg(tmp_path, benign=True, **data):
    cfg = RunConfig(seed=3)
    cfg.data.harmful = write_jsonl(tmp_path / "harmful.jsonl", SAFETY_ROWS)
    cfg.data.benign = write_jsonl(tmp_path / "benign.jsonl", BENIGN_ROWS) if benign else None
    cfg.data.batch_size = 2
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def batch_indices(loader):
    return [b["index"].tolist() for b in loader]


def flat(batches):
    return [i for batch in batches for i in batch]


def test_train_batches_zip_the_benign_stream(tmp_path, tiny_tokenizer):
    dm = SafetyDataModule(datamodule_settings(make_cfg(tmp_path)), tiny_tokenizer)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # ceil(max(5 safety, 3 benign) / 2)
    for b in batches:
        assert {
            "safe_input_ids",
            "harmful_labels",
            "prompt_lengths",
            "layer",
            "index",
            "benign_input_ids",
            "benign_attention_mask",
            "benign_labels",
        } <= set(b)
        assert b["benign_input_ids"].shape[0] == b["safe_input_ids"].shape[0]
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(5))  # each safety example once
    # The shorter benign stream cycles: 5 draws cover all 3 examples.
    benign_texts = {
        tiny_tokenizer.decode([t for t in row.tolist() if t != -100]) for b in batches for row in b["benign_labels"]
    }
    assert benign_texts == {r["answer"] + tiny_tokenizer.eos_token for r in BENIGN_ROWS}
    assert all(b["layer"].eq(-1).all() for b in batches)


def test_order_is_a_function_of_seed_and_epoch(tmp_path, tiny_tokenizer):
    cfg = make_cfg(tmp_path)
    first = SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer)
    second = SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer)
    for dm in (first, second):
        dm.setup("fit")
    epoch0 = batch_indices(first.train_dataloader())
    assert batch_indices(second.train_dataloader()) == epoch0
    first.sampler.set_epoch(1)
    epoch1 = batch_indices(first.train_dataloader())
    assert epoch1 != epoch0 and sorted(flat(epoch1)) == list(range(5))
    first.sampler.set_epoch(0)  # a resumed run that restores the epoch replays the same order
    assert batch_indices(first.train_dataloader()) == epoch0
    cfg.seed = 4
    other = SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer)
    other.setup()
    assert batch_indices(other.train_dataloader()) != epoch0


def test_sampler_cycles_with_fresh_permutations():
    sampler = ZippedSampler(num_safety=2, num_benign=7, shuffle=True, seed=0)
    pairs = list(sampler)
    assert len(pairs) == len(sampler) == 7
    safety = [s for s, _ in pairs]
    assert sorted(safety[:2]) == sorted(safety[2:4]) == [0, 1] and safety.count(0) + safety.count(1) == 7
    assert sorted(b for _, b in pairs) == list(range(7))
    assert list(ZippedSampler(3, 0, shuffle=False)) == [(0, NO_BENIGN), (1, NO_BENIGN), (2, NO_BENIGN)]


def test_unshuffled_order_and_workers_agree(tmp_path, tiny_tokenizer):
    dm = SafetyDataModule(datamodule_settings(make_cfg(tmp_path, benign=False, shuffle=False)), tiny_tokenizer)
    dm.setup()
    plain = list(dm.train_dataloader())
    assert [b["index"].tolist() for b in plain] == [[0, 1], [2, 3], [4]]
    assert "benign_input_ids" not in plain[0]
    # items and collate function must survive worker processes (the settings are frozen: a changed copy)
    dm.data_settings = dataclasses.replace(dm.data_settings, num_workers=2)
    with_workers = list(dm.train_dataloader())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(plain, with_workers) for k in a)


def test_truncation_counts_are_logged_and_empty_after_drop_fails(tmp_path, tiny_tokenizer, caplog):
    from lat_lightning.data.templating import encode_prompt, encode_response

    rows = SAFETY_ROWS[:2] + [{"goal": "A much longer harmful request " * 6, "target": "Sure"}]
    refusal = encode_response(tiny_tokenizer, RunConfig().data.default_safe_response)
    fits = max(len(encode_prompt(tiny_tokenizer, r["goal"])) for r in rows[:2]) + len(refusal)
    cfg = make_cfg(tmp_path, benign=False, truncation="drop", max_length=fits)
    cfg.data.harmful = write_jsonl(tmp_path / "long.jsonl", rows)
    dm = SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="lat_lightning.data.datamodule"):
        dm.setup()
    assert (
        f"safety data: 3 examples, 0 truncated, 1 dropped (data.truncation=drop, data.max_length={fits})" in caplog.text
    )
    assert "affected examples: 2" in caplog.text
    assert sorted(flat(batch_indices(dm.train_dataloader()))) == [0, 1]
    cfg.data.max_length = 5
    with pytest.raises(DataError, match="all 3 safety examples were dropped"):
        SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer).setup()
    cfg.data.truncation = "error"
    with pytest.raises(DataError, match="tokens > data.max_length=5"):
        SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer).setup()


def test_prebuilt_examples_and_validation_batches(tmp_path, tiny_tokenizer):
    cfg = RunConfig(seed=0)
    cfg.data.batch_size = 2
    cfg.model.use_chat_template = False
    safety = [SafetyExample(f"prompt {i}", "No.", f"Yes {i}", layer=i % 2, index=100 + i) for i in range(3)]
    dm = SafetyDataModule(
        datamodule_settings(cfg), tiny_tokenizer, safety_examples=safety, benign_examples=[BenignExample("hi", "hello")]
    )
    dm.setup()
    batches = list(dm.train_dataloader())
    assert sorted(flat(b["index"].tolist() for b in batches)) == [100, 101, 102]
    assert all(
        layer == (index - 100) % 2 for b in batches for index, layer in zip(b["index"].tolist(), b["layer"].tolist())
    )
    first = batches[0]["safe_input_ids"][0]
    assert tiny_tokenizer.decode(first).startswith("prompt ")  # no chat template when switched off
    assert dm.val_dataloader() == []
    cfg.data.eval_harmful = write_jsonl(tmp_path / "eval.jsonl", SAFETY_ROWS[:3])
    dm = SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer, safety_examples=safety)
    val = list(dm.val_dataloader())
    assert [len(b) for b in val] == [2, 1] and isinstance(val[0][0], SafetyExample)
    assert val[1][0].prompt == SAFETY_ROWS[2]["goal"]


def test_missing_harmful_source_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match="data.harmful is not set"):
        SafetyDataModule(datamodule_settings(RunConfig()), tiny_tokenizer).setup()


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_lightning_fit_sees_the_sampler_order(tmp_path, tiny_tokenizer):
    """Lightning keeps the sampler, calls set_epoch each epoch and accepts the empty validation list."""
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["index"].tolist())
            return (self.weight * batch["safe_attention_mask"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cfg = make_cfg(tmp_path)
    dm = SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer)
    module = Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    expected = []
    for epoch in (0, 1):
        reference = SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer)
        reference.setup()
        reference.sampler.set_epoch(epoch)
        expected += batch_indices(reference.train_dataloader())
    assert module.seen == expected


def test_prompt_only_data_trains_on_the_refusal_when_no_target_is_needed(tmp_path, tiny_tokenizer):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Harmful request number {i}\n" for i in range(4)), encoding="utf-8")
    cfg = make_cfg(tmp_path, benign=False, harmful=str(prompts))
    with pytest.raises(DataError, match="or set data.default_target"):
        SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer).setup("fit")  # by default a target is required
    # LAPT: the Gaussian noise needs none
    dm = SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer, require_target=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "safe_input_ids" in batch and not any(k.startswith("harmful_") for k in batch)
    cfg.data.default_target = "Sure, here is"
    dm = SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer)
    dm.setup("fit")
    assert "harmful_input_ids" in next(iter(dm.train_dataloader()))


def test_the_row_filter_applies_to_training_and_held_out_prompts(tmp_path, tiny_tokenizer):
    rows = [dict(r, split="keep" if i % 2 else "drop") for i, r in enumerate(SAFETY_ROWS)]
    cfg = make_cfg(tmp_path, benign=False, filter={"split": "keep"})
    cfg.data.harmful = cfg.data.eval_harmful = write_jsonl(tmp_path / "rows.jsonl", rows)
    dm = SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer)
    dm.setup("fit")
    assert sorted(e.index for e in dm.safety_examples) == [1, 3]
    assert [e.index for e in dm.eval_examples] == [1, 3]


def test_validation_prompts_caps_the_validation_loop_to_the_first_prompts(tmp_path, tiny_tokenizer):
    """``evaluation.validation_prompts=N``: the validation loop attacks the first N held-out prompts, in order."""
    cfg = make_cfg(tmp_path, benign=False)
    cfg.model.use_chat_template = False
    cfg.data.eval_harmful = write_jsonl(tmp_path / "eval.jsonl", SAFETY_ROWS)  # 5 held-out prompts
    goals = [r["goal"] for r in SAFETY_ROWS]
    every = flat(SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer).val_dataloader())
    assert [e.prompt for e in every] == goals  # no cap: all of them
    cfg.evaluation.validation_prompts = 3
    capped = list(SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer).val_dataloader())
    assert [len(b) for b in capped] == [2, 1]
    assert [e.prompt for e in flat(capped)] == goals[:3]
    cfg.evaluation.validation_prompts = 50  # more than there are: all of them
    assert len(flat(SafetyDataModule(datamodule_settings(cfg), tiny_tokenizer).val_dataloader())) == len(goals)
