"""Refusal-direction attacks: the difference-in-means direction, directional ablation, activation addition.

The planted model: a tiny Llama whose refusal is decided by ONE direction, ``e_0``. Token embeddings have no
``e_0`` component except two marker tokens (``HARM`` at ``+c``, ``OK`` at ``-c``, otherwise identical); no block
reads ``e_0`` (zero input columns) or writes it (zero output rows), and the LM head reads ``e_0`` only for the
refusal token. A prompt ending in ``HARM`` then carries ``+c·e_0`` at every layer and is refused; the same
prompt ending in ``OK`` carries ``-c·e_0`` and is not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lat_lightning.attacks import build_attack
from lat_lightning.attacks.plan import RowPerturber
from lat_lightning.attacks.refusal_direction import refusal_directions
from lat_lightning.config import PerturbationConfig
from lat_lightning.eval.generation import GenerationSettings, generate_under_attack
from lat_lightning.models.hooks import capture_residual
from lat_lightning.models.layers import EMBED, num_layers
from tests.helpers.batches import safety_batch

HARM, OK, REFUSE = 100, 101, 102
C = 4.0


def plant_refusal_direction(model, c: float = C, big: float = 50.0) -> None:
    """Make ``e_0`` the one direction that decides refusal (see the module docstring)."""
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[OK] = emb[HARM]
        emb[HARM, 0], emb[OK, 0] = c, -c
        for block in model.model.layers:
            for lin in (
                block.self_attn.q_proj,
                block.self_attn.k_proj,
                block.self_attn.v_proj,
                block.mlp.gate_proj,
                block.mlp.up_proj,
            ):
                lin.weight[:, 0] = 0.0  # nothing reads e_0 ...
            block.self_attn.o_proj.weight[0, :] = 0.0  # ... or writes it
            block.mlp.down_proj.weight[0, :] = 0.0
        head = model.lm_head.weight
        head[:, 0] = 0.0
        head[REFUSE] = 0.0
        head[REFUSE, 0] = big


def _prompts(n: int = 6, length: int = 5):
    gen = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(10, 90, (length,), generator=gen).tolist() for _ in range(n)]
    return [p + [HARM] for p in prefixes], [p + [OK] for p in prefixes]


@pytest.fixture()
def planted(tiny_llama):
    model, tok = tiny_llama
    plant_refusal_direction(model)
    return model, tok


def _settings(**kw):
    return dataclasses.replace(PerturbationConfig(), positions="all", **kw)


def _first_tokens(model, tok, prompts, layers=None, plan=None):
    res = generate_under_attack(
        model, tok, prompts, layers, plan, settings=GenerationSettings(max_new_tokens=1, use_chat_template=False)
    )
    return [t[0] for t in res.token_ids]


def test_the_planted_direction_is_found_at_every_layer(planted):
    model, _ = planted
    harmful, harmless = _prompts()
    layers = [EMBED] + list(range(num_layers(model)))
    dirs = refusal_directions(model, harmful, harmless, layers)
    e0 = torch.zeros(model.config.hidden_size)
    e0[0] = 1.0
    for layer in layers:
        r = dirs[layer]
        assert float(r.norm()) == pytest.approx(2 * C, rel=1e-5), layer
        assert float(torch.dot(r / r.norm(), e0)) > 1 - 1e-6, layer


def test_planted_model_refuses_by_that_direction_and_the_attacks_flip_it(planted):
    model, tok = planted
    harmful, harmless = _prompts()
    assert all(t == REFUSE for t in _first_tokens(model, tok, harmful))
    assert not any(t == REFUSE for t in _first_tokens(model, tok, harmless))
    rows = list(range(len(harmful)))
    ablation = build_attack("refusal_ablation", _settings())
    ablation.set_contrast_prompts(harmful, harmless)
    plan = ablation.plan(model, harmful, [[]] * len(harmful), rows, [1] * len(rows), seed=0)
    assert not any(t == REFUSE for t in _first_tokens(model, tok, harmful, [1] * len(rows), plan))
    bypass = build_attack("refusal_addition", _settings(direction_scale=-1.0))
    bypass.set_contrast_prompts(harmful, harmless)
    plan = bypass.plan(model, harmful, [[]] * len(harmful), rows, [2] * len(rows), seed=0)
    assert not any(t == REFUSE for t in _first_tokens(model, tok, harmful, [2] * len(rows), plan))
    induce = build_attack("refusal_addition", _settings(direction_scale=1.0))
    induce.set_contrast_prompts(harmful, harmless)
    plan = induce.plan(model, harmless, [[]] * len(harmless), rows, [0] * len(rows), seed=0)
    assert all(t == REFUSE for t in _first_tokens(model, tok, harmless, [0] * len(rows), plan))


def _projection_left(captured: dict, r_hat: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |h·r̂| / ‖h‖ over every layer and masked position."""
    worst = 0.0
    for h in captured.values():
        h = h.float()
        coef = (h @ r_hat).abs() / h.norm(dim=-1).clamp(min=1e-12)
        worst = max(worst, float(coef[mask].max()))
    return worst


def test_training_face_ablation_removes_the_direction_from_every_layer_output(tiny_llama):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=3, with_benign=True)
    attack = build_attack("refusal_ablation", _settings())
    pert = attack.make(model, batch, [2], step=0)
    assert pert.layers == [EMBED] + list(range(num_layers(model)))
    r_hat = pert.vectors[2].float()
    ids, att = batch["safe_input_ids"], batch["safe_attention_mask"]
    clean = capture_residual(model, pert.layers, input_ids=ids, attention_mask=att)
    assert _projection_left(clean, r_hat, att.bool()) > 1e-2  # the direction is there before
    with pert.applied(model):
        ablated = capture_residual(model, pert.layers, input_ids=ids, attention_mask=att)
    assert _projection_left(ablated, r_hat, att.bool()) < 1e-5
    # exactly the projection: h_ablated = h' - (h'·r̂) r̂ where h' is what the block produced from ablated input
    assert pert.norm_stats() == {}


def test_generation_face_ablation_removes_the_direction_from_every_layer_output(tiny_llama):
    model, tok = tiny_llama
    harmful, harmless = _prompts(4)
    attack = build_attack("refusal_ablation", _settings())
    attack.set_contrast_prompts(harmful, harmless)
    seqs = [harmful[0], harmless[1], harmful[2]]
    row_layers = torch.tensor([3, 1, -1])  # the third row is clean
    plan = attack.plan(model, seqs, [[]] * 3, [0, 1, 2], row_layers.tolist(), seed=0)
    lengths = torch.tensor([len(s) for s in seqs])
    perturber = RowPerturber(plan, row_layers, lengths, torch.arange(3))
    width = int(lengths.max())
    ids = torch.tensor(seqs)
    perturber.positions = torch.arange(width)[None, :].expand(3, width)
    layers = [EMBED] + list(range(num_layers(model)))
    with perturber.hooked(model):
        captured = capture_residual(model, layers, input_ids=ids)
    full = torch.ones(width, dtype=torch.bool)
    for r in (0, 1):
        r_hat = plan.vectors[r].float()
        assert _projection_left({l: h[r : r + 1] for l, h in captured.items()}, r_hat, full[None]) < 1e-5
    clean = capture_residual(model, layers, input_ids=ids)
    for layer in layers:  # the clean row is untouched
        torch.testing.assert_close(captured[layer][2], clean[layer][2])
    assert perturber.applied.tolist() == [width, width, 0]  # counted once per position, at the row's layer


def test_addition_adds_scale_times_the_direction_at_its_layer_only(tiny_llama):
    model, tok = tiny_llama
    harmful, harmless = _prompts(4)
    attack = build_attack("refusal_addition", _settings(direction_scale=-2.0))
    attack.set_contrast_prompts(harmful, harmless)
    r = attack.generation_directions(model, [2])[2]
    pert_plan = attack.plan(model, [harmful[0]], [[]], [0], [2], seed=0)
    torch.testing.assert_close(pert_plan.vectors[0], r)
    assert pert_plan.kind == "vector" and pert_plan.alpha == -2.0
    ids = torch.tensor([harmful[0]])
    perturber = RowPerturber(pert_plan, torch.tensor([2]), torch.tensor([len(harmful[0])]), torch.tensor([0]))
    perturber.positions = torch.arange(ids.shape[1])[None]
    before = capture_residual(model, [1, 2], input_ids=ids)
    with perturber.hooked(model):
        after = capture_residual(model, [1, 2], input_ids=ids)
    torch.testing.assert_close(after[1], before[1])
    torch.testing.assert_close(after[2], before[2] - 2.0 * r[None, None, :], atol=1e-5, rtol=1e-5)


def test_training_direction_refreshes_every_n_steps_and_survives_a_checkpoint(tiny_llama):
    model, tok = tiny_llama
    b1 = safety_batch(tok, n=2, with_benign=True)
    b2 = safety_batch(tok, n=4, with_benign=True)
    attack = build_attack("refusal_ablation", _settings(direction_refresh=3))
    d0 = attack.make(model, b1, [1], step=0).vectors[1].clone()
    d1 = attack.make(model, b2, [1], step=2).vectors[1]  # within the refresh window: kept
    torch.testing.assert_close(d1, d0)
    d3 = attack.make(model, b2, [1], step=3).vectors[1]  # step 3: recomputed from this batch
    assert not torch.allclose(d3, d0)
    state = attack.state_dict()
    assert state["computed_at"] == 3
    resumed = build_attack("refusal_ablation", _settings(direction_refresh=3))
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.make(model, b1, [1], step=4).vectors[1], d3)  # the checkpoint's, not b1's


def test_training_face_needs_benign_rows_and_one_source_layer(tiny_llama):
    model, tok = tiny_llama
    attack = build_attack("refusal_ablation", _settings())
    with pytest.raises(ValueError, match="data.benign"):
        attack.make(model, safety_batch(tok, n=2), [1])
    with pytest.raises(ValueError, match="ONE direction"):
        attack.make(model, safety_batch(tok, n=2, with_benign=True), [1, 2])
    with pytest.raises(ValueError, match="direction_token"):
        build_attack("refusal_addition", _settings(direction_token=0))


def test_refusal_ablation_trains_one_step(tiny_llama, tmp_path):
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from lat_lightning.config import RunConfig
    from lat_lightning.stages.fit_setup import build_module

    model, tok = tiny_llama
    cfg = OmegaConf.merge(
        OmegaConf.structured(RunConfig),
        {
            "perturbation": {"attack": "refusal_ablation", "layers": [2], "positions": "all"},
            "loss": {"toward_safe": 1.0, "utility": 1.0},
            "trainer": {"max_steps": 1, "lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant"},
        },
    )
    module = build_module(cfg, model, tok)
    batch = safety_batch(tok, n=2, with_benign=True)
    with torch.no_grad():
        clean = float(module.defence_losses(batch, module.attack.empty())["toward_safe"])
        ablated = float(module.defence_losses(batch, module.run_attack(batch))["toward_safe"])
    assert ablated != pytest.approx(clean, rel=1e-4)  # the ablation reaches the defence loss
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1
    ckpt = {"state_dict": {}}
    module.on_save_checkpoint(ckpt)
    assert ckpt["lat_lightning"]["attack_state"]["directions"]


def test_config_refuses_refusal_attacks_without_harmless_prompts():
    from lat_lightning.cli import load_config
    from lat_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="data.benign"):
        load_config("asagrad_at_tiny", ["perturbation.attack=refusal_ablation", "data.benign=null"])
    with pytest.raises(ConfigError, match="harmless prompts"):
        load_config("asa_scan_tiny", ["evaluation.attacks=[refusal_addition]"])
    cfg = load_config(
        "asa_scan_tiny",
        ["evaluation.attacks=[refusal_addition]", "data.eval_benign=pkg://lat_lightning/resources/tiny_benign.jsonl"],
    )
    assert list(cfg.evaluation.attacks) == ["refusal_addition"]
