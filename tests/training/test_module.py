"""The training step: attack inner loop, defence outer update, accumulation, logging."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from lat_lightning.config import ModelConfig, RunConfig
from lat_lightning.models.loading import load_model
from lat_lightning.stages.fit_setup import build_module
from lat_lightning.training.module import cosine_with_warmup
from tests.helpers.batches import safety_batch, safety_examples


def _cfg(**overrides):
    cfg = OmegaConf.structured(RunConfig)
    base = {
        "trainer": {"max_steps": 1, "lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant", "gradient_clip_val": 1.0}
    }
    return OmegaConf.merge(cfg, base, overrides)


def _trainer(tmp_path, max_steps, logger=False):
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )


def _fit(cfg, model, tok, batches, tmp_path, logger=False):
    module = build_module(cfg, model, tok)
    trainer = _trainer(tmp_path, cfg.trainer.max_steps, logger)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module, trainer


@pytest.mark.parametrize("strategy", ["none", "pgd"])
def test_four_micro_batches_equal_one_batch_of_four(tiny_llama_dir, tiny_tokenizer, tmp_path, strategy):
    examples = safety_examples(4)
    pert = {
        "attack": strategy,
        "layers": [1],
        "optimizer": "sign",
        "steps": 2,
        "eps": 1.0,
        "lr": 0.1,
        "positions": "prompt",
    }
    base = load_model(ModelConfig(name_or_path=str(tiny_llama_dir)), train=True)
    weights = {}
    for name, bsz, acc in (("micro", 1, 4), ("full", 4, 1)):
        model = copy.deepcopy(base)
        cfg = _cfg(perturbation=pert, trainer={"accumulate_grad_batches": acc})
        batches = [safety_batch(tiny_tokenizer, examples=examples[i : i + bsz]) for i in range(0, 4, bsz)]
        _, trainer = _fit(cfg, model, tiny_tokenizer, batches, tmp_path / name)
        assert trainer.global_step == 1
        weights[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed = 0
    for n, w in weights["full"].items():
        torch.testing.assert_close(weights["micro"][n], w, atol=2e-6, rtol=1e-4)
        changed += int(not torch.equal(w, base.state_dict()[n]))
    assert changed > 0


def test_global_step_counts_optimizer_steps_and_lr_follows_them(tiny_llama_dir, tiny_tokenizer, tmp_path):
    model = load_model(ModelConfig(name_or_path=str(tiny_llama_dir)), train=True)
    cfg = _cfg(trainer={"max_steps": 3, "accumulate_grad_batches": 2, "scheduler": "cosine", "warmup_ratio": 0.0})
    batches = [safety_batch(tiny_tokenizer, n=2) for _ in range(10)]
    module, trainer = _fit(cfg, model, tiny_tokenizer, batches, tmp_path)
    assert trainer.global_step == 3
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6
    expected = 1e-3 * cosine_with_warmup(3, 0.0, "cosine")(3)
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(expected)


def test_logged_step_axis_and_progress_bar_count_optimizer_steps(tiny_llama_dir, tiny_tokenizer, tmp_path):
    """Under gradient accumulation (2 micro-batches per step) TensorBoard's x-axis is optimiser steps (1, 2, 3),
    each point the mean of its step's micro-batches, and the fit's bar ends at 3/3 steps, not 6 micro-batches."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lat_lightning.training.progress import StepProgressBar

    model = load_model(ModelConfig(name_or_path=str(tiny_llama_dir)), train=True)
    cfg = _cfg(trainer={"max_steps": 3, "accumulate_grad_batches": 2, "scheduler": "cosine"})
    module = build_module(cfg, model, tiny_tokenizer)
    bar = StepProgressBar("fit")
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(tmp_path), "tb", ""),
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=[bar, Losses()],
    )
    examples = safety_examples(20)
    batches = [safety_batch(tiny_tokenizer, examples=examples[i : i + 2]) for i in range(0, 20, 2)]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3 and len(losses) == 6
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3]
    for e, pair in zip(events, [losses[0:2], losses[2:4], losses[4:6]]):
        assert e.value == pytest.approx(sum(pair) / 2, rel=1e-5)
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2, 3]
    assert bar.train_progress_bar.n == 3 and bar.train_progress_bar.total == 3


def test_lat_step_runs_each_block_only_as_often_as_its_floor(tiny_llama_dir, tiny_tokenizer):
    """PGD k=3 at layer 1 of 4, toward + away attack, defence toward + away + utility: the blocks up to the attacked
    layer run once for the cache plus once per defence pass; the blocks above once per attack step plus once per
    defence pass. No other forward (the final attack loss is read off the defence's perturbed passes)."""
    model = load_model(ModelConfig(name_or_path=str(tiny_llama_dir)), train=True)
    cfg = _cfg(
        perturbation={"attack": "pgd", "layers": [1], "steps": 3, "away_from_safe": 0.5, "positions": "prompt"},
        loss={"toward_safe": 0.5, "away_from_harmful": 0.5, "utility": 1.0},
    )
    module = build_module(cfg, model, tiny_tokenizer)
    calls = {0: 0, 1: 0, 2: 0, 3: 0}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    batch = safety_batch(tiny_tokenizer, n=2, with_benign=True)
    perturbation = module.run_attack(batch)
    terms = module.defence_losses(batch, perturbation)
    assert set(terms) == {"toward_safe", "away_from_harmful", "utility"}
    assert calls == {0: 1 + 3, 1: 1 + 3, 2: 3 + 3, 3: 3 + 3}
    assert perturbation.stats["attack_loss_after"] < perturbation.stats["attack_loss_before"]


def test_defence_updates_only_trainable_weights(tiny_llama_dir, tiny_tokenizer, tmp_path):
    mcfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        {"name_or_path": str(tiny_llama_dir), "lora": {"enabled": True, "r": 4, "alpha": 8}},
    )
    model = load_model(mcfg, train=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(perturbation={"attack": "asa_random", "layers": [1]}, trainer={"max_steps": 2})
    _fit(cfg, model, tiny_tokenizer, [safety_batch(tiny_tokenizer, n=2) for _ in range(2)], tmp_path)
    for n, p in model.named_parameters():
        if p.requires_grad:
            continue
        assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_logs_every_term_attack_stats_and_lr(tiny_llama_dir, tiny_tokenizer, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = load_model(ModelConfig(name_or_path=str(tiny_llama_dir)), train=True)
    cfg = _cfg(
        perturbation={"attack": "pgd", "layers": [1, 2], "steps": 2, "away_from_safe": 0.5, "positions": "prompt"},
        loss={"toward_safe": 0.5, "away_from_harmful": 0.5, "utility": 1.0},
        trainer={"max_steps": 2},
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    batches = [safety_batch(tiny_tokenizer, n=2, with_benign=True) for _ in range(2)]
    _fit(cfg, model, tiny_tokenizer, batches, tmp_path, logger=logger)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/loss_toward_safe",
        "train/loss_away_from_harmful",
        "train/loss_utility",
        "train/lr",
        "attack/attack_loss_before",
        "attack/attack_loss_after",
        "attack/norm_layer1",
        "attack/norm_layer2",
    ):
        assert tag in tags, (tag, sorted(tags))


def test_nan_loss_saves_checkpoint_and_raises(tiny_llama_dir, tiny_tokenizer, tmp_path):
    from lat_lightning.errors import TrainingDivergedError

    model = load_model(ModelConfig(name_or_path=str(tiny_llama_dir)), train=True)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    cfg = _cfg(trainer={"max_steps": 1})
    with pytest.raises(TrainingDivergedError, match="not finite"):
        _fit(cfg, model, tiny_tokenizer, [safety_batch(tiny_tokenizer, n=2)], tmp_path)
    assert (tmp_path / "checkpoints" / "diverged.ckpt").exists()


def test_mask_prompt_false_trains_on_prompt_tokens_too(tiny_llama, tiny_tokenizer):
    """``loss.mask_prompt=false`` (the reference code's CE) counts every real token but the first; the default
    counts the response only. Both are checked against a CE computed by hand."""
    import torch.nn.functional as F

    model, _ = tiny_llama
    batch = safety_batch(tiny_tokenizer, n=3)
    with torch.no_grad():
        logits = model(input_ids=batch["safe_input_ids"], attention_mask=batch["safe_attention_mask"]).logits
    ids, att = batch["safe_input_ids"], batch["safe_attention_mask"].bool()

    def by_hand(count: torch.Tensor) -> float:  # count: [B, T] which target positions the CE covers
        ce = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)
        m = count[:, 1:]
        return float((ce * m).sum() / m.sum())

    response_only = batch["safe_labels"] != -100
    terms = {}
    for mask_prompt in (True, False):
        module = build_module(_cfg(loss={"mask_prompt": mask_prompt}), model, tiny_tokenizer)
        with torch.no_grad():
            terms[mask_prompt] = float(module.defence_losses(batch, module.attack.empty())["toward_safe"])
    assert terms[True] == pytest.approx(by_hand(response_only), rel=1e-5)
    assert terms[False] == pytest.approx(by_hand(att), rel=1e-5)
    assert int(att[:, 1:].sum()) > int(response_only[:, 1:].sum())  # the two CEs cover different tokens
