"""Each defence objective's own invariant, on a tiny random Llama, in a few plain optimiser steps (no Trainer)."""

import pytest
import torch
import torch.nn.functional as F

from lat_lightning.config import ModelConfig
from lat_lightning.models.loading import load_model
from lat_lightning.models.tiny_factory import build_tiny_model
from lat_lightning.training.objectives import (
    OBJECTIVES,
    Booster,
    BoosterSettings,
    CircuitBreakers,
    CircuitBreakersSettings,
    RepNoise,
    RepNoiseSettings,
    Vaccine,
    VaccineSettings,
)
from lat_lightning.training.objectives.base import hidden_states, seq_inputs, token_mask
from lat_lightning.training.objectives.booster import look_ahead
from lat_lightning.training.objectives.circuit_breakers import schedule, target_layers
from lat_lightning.training.objectives.repnoise import mlp_outputs, mmd2
from lat_lightning.training.objectives.vaccine import attention_gradients, perturbed_loss, worst_case_perturbation
from tests.helpers.batches import safety_batch


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    return build_tiny_model("llama", tmp_path_factory.mktemp("objectives") / "llama", tokenizer=tiny_tokenizer)


@pytest.fixture()
def model(llama_dir):
    m = load_model(ModelConfig(name_or_path=str(llama_dir)), train=True)
    m.train()
    return m


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    return safety_batch(tiny_tokenizer, n=4, with_benign=True)


def _train(objective, model, batch, steps, lr):
    objective.setup(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        opt.zero_grad()
        sum(objective.losses(model, batch, step, steps).values()).backward()
        opt.step()


def _cb_measure(model, batch, obj, layers):
    """``{sequence group: (mean cos to the frozen model, summed L2 distance / summed frozen norm)}`` at ``layers``."""
    out = {}
    with torch.no_grad():
        for prefix in ("harmful", "benign"):
            inputs, mask = seq_inputs(batch, prefix), token_mask(batch, prefix)
            h, h0 = hidden_states(model, inputs), hidden_states(model, inputs, obj.reference)
            cos = torch.stack([F.cosine_similarity(h[l + 1], h0[l + 1], dim=-1)[mask] for l in layers]).mean()
            dist = sum((h[l + 1] - h0[l + 1]).norm(dim=-1)[mask].sum() for l in layers)
            norm = sum(h0[l + 1].norm(dim=-1)[mask].sum() for l in layers)
            out[prefix] = (float(cos), float(dist / norm))
    return out


def test_circuit_breakers_reroute_harmful_and_retain_benign(llama_dir, batch, monkeypatch):
    from lat_lightning.training.objectives import circuit_breakers

    results = {}
    for retain in (True, False):
        model = load_model(ModelConfig(name_or_path=str(llama_dir)), train=True)
        model.train()
        obj = CircuitBreakers(CircuitBreakersSettings(alpha=10.0))
        layers = target_layers(model, [])
        assert layers == [0, 2]  # one and two thirds of 4 blocks
        if not retain:  # the ablation: rerouting alone (c_r = 0 throughout)
            monkeypatch.setattr(circuit_breakers, "schedule", lambda a, t, n: (a * (1 - min(1.0, t / n) / 2), 0.0))
        obj.setup(model)
        start = _cb_measure(model, batch, obj, layers)
        assert start["harmful"][0] == pytest.approx(1.0, abs=1e-5) and start["benign"][1] == pytest.approx(0, abs=1e-6)
        _train(obj, model, batch, steps=30, lr=1e-3)
        results[retain] = _cb_measure(model, batch, obj, layers)
    (harm_cos, harm_l2), (ben_cos, ben_l2) = results[True]["harmful"], results[True]["benign"]
    assert harm_cos < 0.2, f"harmful representations still aligned with the frozen model's (cos {harm_cos:.3f})"
    assert ben_cos > harm_cos + 0.3 and ben_l2 < 0.5 * harm_l2, results[True]
    # the retain term is what holds the benign rows: without it they move further
    assert ben_l2 < 0.7 * results[False]["benign"][1], results


def test_circuit_breakers_schedule_is_tied_to_the_step_count():
    assert schedule(10.0, 0, 40) == (10.0, 0.0)
    assert schedule(10.0, 40, 40) == (5.0, 5.0)
    assert schedule(10.0, 20, 40) == (7.5, 2.5)


def test_mmd_is_zero_for_equal_samples_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    assert float(mmd2(x, x)) == pytest.approx(0.0, abs=1e-6)
    near, far = float(mmd2(x, x + 0.1)), float(mmd2(x, x + 3.0))
    assert 0 < near < far


def test_repnoise_pulls_harmful_mlp_outputs_toward_noise(model, batch):
    obj = RepNoise(RepNoiseSettings(alpha=0.1, beta=1.0))

    def mean_mmd():
        with torch.no_grad():
            _, mlps = mlp_outputs(model, seq_inputs(batch, "harmful"))
            mask = token_mask(batch, "harmful", response_only=True)
            gen = torch.Generator().manual_seed(123)
            return float(torch.stack([mmd2(m[mask], torch.randn(m[mask].shape, generator=gen)) for m in mlps]).mean())

    before = mean_mmd()
    # the tiny model's MLP outputs start ~300x smaller than unit noise: the MMD falls once they have grown to it
    _train(obj, model, batch, steps=20, lr=1e-2)
    after = mean_mmd()
    assert after < 0.5 * before, (before, after)
    assert obj.stats["logit_lens_ce"] > 0


def test_vaccine_perturbation_has_norm_rho_and_is_an_ascent_direction(model, batch):
    inputs, labels = seq_inputs(batch, "safe"), batch["safe_labels"]
    clean, grads = attention_gradients(model, inputs, labels)
    assert all(p.grad is None for p in model.parameters()), "pass 1 writes no weight gradients"
    eps = worst_case_perturbation(grads, rho=0.5)
    assert len(eps) == 4
    total = torch.sqrt(sum((e**2).sum() for e in eps))
    assert float(total) == pytest.approx(0.5, rel=1e-5)
    with torch.no_grad():
        perturbed = perturbed_loss(model, inputs, labels, eps)
        opposite = perturbed_loss(model, inputs, labels, [-e for e in eps])
    assert float(perturbed) > float(clean) > float(opposite)  # the first-order worst case within the ball


def test_vaccine_minimises_the_loss_under_the_perturbation(model, batch):
    obj = Vaccine(VaccineSettings(rho=0.5))
    obj.losses(model, batch, 0, 1)
    before = obj.stats["perturbed_ce"]
    assert obj.stats["perturbation_norm"] == pytest.approx(0.5, rel=1e-5)
    _train(obj, model, batch, steps=8, lr=3e-3)
    obj.losses(model, batch, 0, 1)
    assert obj.stats["perturbed_ce"] < 0.7 * before, (before, obj.stats["perturbed_ce"])


def test_booster_shrinks_the_look_ahead_harmful_drop(model, batch):
    def drop():
        h, h_ahead = look_ahead(model, batch, 0.1)
        return float((h - h_ahead).detach())

    before = drop()
    assert before > 0, "one normalised harmful step lowers the harmful loss"
    _train(Booster(BoosterSettings(lam=5.0, step_size=0.1)), model, batch, steps=10, lr=1e-3)
    after = drop()
    assert after < 0.5 * before, (before, after)


def test_booster_gradient_is_the_paper_s(model, batch):
    """grad of the penalty = grad h(w) - grad h(w~): the step direction is held constant."""
    from lat_lightning.training.objectives.booster import harmful_loss

    params = [p for p in model.parameters() if p.requires_grad]
    h, h_ahead = look_ahead(model, batch, 0.1)
    got = torch.autograd.grad(h - h_ahead, params, allow_unused=True)
    g_w = torch.autograd.grad(harmful_loss(model, batch), params, allow_unused=True)
    g_w = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_w)]
    norm = torch.sqrt(sum((g**2).sum() for g in g_w))
    with torch.no_grad():
        for p, g in zip(params, g_w):
            p -= 0.1 * g / norm
    g_ahead = torch.autograd.grad(harmful_loss(model, batch), params, allow_unused=True)
    for a, b, c in zip(got, g_w, g_ahead):
        want = b - (torch.zeros_like(b) if c is None else c)
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, want, atol=1e-5, rtol=1e-4)


def test_every_objective_is_registered_with_its_settings():
    from lat_lightning.training.settings import LossSettings

    loss = LossSettings()
    for name, cls in OBJECTIVES.items():
        assert cls.name == name
        assert hasattr(loss, name), f"LossSettings has no {name} section"


def test_the_frozen_copy_is_no_part_of_the_module(llama_dir):
    """Full fine-tuning: the objective's frozen starting model is a plain attribute, never in a state dict (so never
    in a checkpoint, never optimised) and unchanged by training."""
    from omegaconf import OmegaConf

    from lat_lightning.config import RunConfig
    from lat_lightning.stages.fit_setup import build_module

    cfg = OmegaConf.merge(
        OmegaConf.structured(RunConfig), {"perturbation": {"attack": "none"}, "loss": {"objective": "circuit_breakers"}}
    )
    model = load_model(ModelConfig(name_or_path=str(llama_dir)), train=True)
    module = build_module(cfg, model)
    module.setup("fit")
    assert isinstance(module.objective, CircuitBreakers)
    assert set(module.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    assert {id(p) for p in module.parameters()} == {id(p) for p in model.parameters()}
    frozen = module.objective.reference._copy[0]
    assert all(not p.requires_grad for p in frozen.parameters())
    module.teardown("fit")
    assert not module.objective.reference._copy  # released after the fit
