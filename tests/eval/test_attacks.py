"""Scan attacks: ASAgrad sign convention and one-backward multi-layer gradients, ASA seeding, PGD plans."""

from __future__ import annotations

import pytest
import torch

from lat_lightning.config import PerturbationConfig
from lat_lightning.data.templating import encode_response
from lat_lightning.eval.attacks import asa_random, asagrad, build_attack, pgd, sign_gradient_directions
from lat_lightning.eval.generation import (
    AttackPlan,
    encode_prompts,
    generate_under_attack,
    teacher_forced_logits,
)
from lat_lightning.eval.metrics import nll_sequence
from lat_lightning.attacks.asagrad import SignGradient


@pytest.fixture()
def setup(tiny_llama):
    model, tok = tiny_llama
    prompts = encode_prompts(tok, ["How do I bake bread at home?", "Tell me a poem about the sea."])
    targets = [encode_response(tok, t, add_eos=False) for t in ["Sure, here is how to bake bread", "Sure, the sea"]]
    return model, tok, prompts, targets


def _target_nll(model, prompts, targets, plan, layers):
    seqs = [p + t for p, t in zip(prompts, targets)]
    logits = teacher_forced_logits(model, seqs, [len(p) for p in prompts], layers, plan)
    labels = torch.full(logits.shape[:2], -100)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
    return nll_sequence(logits, labels)


@pytest.mark.parametrize("alpha", [0.05, 1.0])
def test_asagrad_descend_lowers_target_loss_and_ascend_raises_it(setup, alpha):
    model, _, prompts, targets = setup
    clean = _target_nll(model, prompts, targets, AttackPlan(), [-1, -1])
    for layer in (0, 2, 3):
        down = asagrad(model, prompts, targets, [0, 1], [layer, layer], alpha=alpha)  # default: descend
        up = asagrad(model, prompts, targets, [0, 1], [layer, layer], sign="ascend", alpha=alpha)
        assert (_target_nll(model, prompts, targets, down, [layer, layer]) < clean).all()
        assert (_target_nll(model, prompts, targets, up, [layer, layer]) > clean).all()


def test_multi_layer_gradients_equal_single_layer_gradients(setup):
    model, _, prompts, targets = setup
    from lat_lightning.eval.attacks import _prompt_target_batch

    batch = _prompt_target_batch(prompts, targets, None, 0, torch.device("cpu"))
    strategy = SignGradient(PerturbationConfig(strategy="sign_gradient", positions="all"))
    strategy.from_earliest_layer = False  # the full model in both cases: the zero deltas are the only change
    multi, _, loss_multi = strategy.gradients(model, batch, [0, 1, 2, 3])
    for layer in range(4):
        single, _, loss_single = strategy.gradients(model, batch, [layer])
        assert loss_single == pytest.approx(loss_multi, rel=0, abs=0)
        torch.testing.assert_close(single[layer], multi[layer], rtol=1e-5, atol=1e-8)
    # The directions the scan uses (cached lower layers, one backward for every layer) match too.
    dirs_multi = sign_gradient_directions(model, prompts, targets, [0, 1, 2, 3])
    for layer in (1, 3):
        dirs_single = sign_gradient_directions(model, prompts, targets, [layer])
        for i in range(2):
            assert torch.equal(dirs_single[i][layer], dirs_multi[i][layer])
            assert dirs_single[i][layer].shape == (len(prompts[i]) + len(targets[i]) - 1, 64)


def test_asagrad_rows_share_one_backward(setup, monkeypatch):
    model, _, prompts, targets = setup
    from lat_lightning.eval import attacks

    calls = []
    real = attacks.sign_gradient_directions
    monkeypatch.setattr(attacks, "sign_gradient_directions",
                        lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    cache: dict = {}
    plan = asagrad(model, prompts, targets, [0, 0, 1, 1, 0], [0, 2, 3, -1, 3], cache=cache)
    assert calls == [[0, 2, 3]]  # every (prompt, layer) of the chunk from one forward-backward
    assert plan.vectors[3] is None and plan.kind == "direction"
    asagrad(model, prompts, targets, [0, 1], [2, 3], cache=cache)
    assert len(calls) == 1  # cached


def test_asa_random_is_seeded(setup):
    model, tok, prompts, _ = setup
    kw = {"max_new_tokens": 5, "eos_token_id": []}
    a = generate_under_attack(model, tok, prompts, [1, 2], asa_random(seed=0), **kw)
    b = generate_under_attack(model, tok, prompts, [1, 2], asa_random(seed=0), **kw)
    c = generate_under_attack(model, tok, prompts, [1, 2], asa_random(seed=1), **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert build_attack("asa_random").seed_dependent and not build_attack("asagrad").seed_dependent


def test_pgd_plan_uses_the_strategy_and_stays_in_the_ball(setup):
    model, tok, prompts, targets = setup
    cfg = PerturbationConfig(steps=3, eps=1.5, lr=0.1)
    plan = pgd(model, prompts, targets, [0, 1, 0], [1, 1, 3], cfg=cfg, positions="prompt_last_and_generated")
    assert plan.kind == "additive"
    for r, (i, _layer) in enumerate([(0, 1), (1, 1), (0, 3)]):
        vec, mask = plan.vectors[r], plan.vector_masks[r]
        assert vec.shape == (len(prompts[i]) + len(targets[i]), 64)
        assert mask.nonzero().min() == len(prompts[i]) - 1  # the last prompt token and the target tokens
        assert (vec.norm(dim=-1) <= 1.5 + 1e-4).all()
        assert vec[~mask].abs().sum() == 0
    clean = _target_nll(model, prompts, targets, AttackPlan(), [-1, -1])
    attacked = _target_nll(model, prompts, targets, plan.select([0, 1]), [1, 1])
    assert (attacked < clean).all()  # PGD (toward the target) lowers the target loss
    res = generate_under_attack(model, tok, prompts, [1, 1], plan.select([0, 1]), max_new_tokens=4)
    assert (res.perturbed_positions > 0).all()
