"""The generation face of the attacks (plans the scan applies): ASAgrad sign convention and one-backward
multi-layer gradients, ASA seeding, PGD plans."""

from __future__ import annotations

import pytest
import torch

from lat_lightning.attacks import asagrad as asagrad_module
from lat_lightning.attacks import build_attack
from lat_lightning.attacks.asagrad import sign_gradient_directions, target_gradients
from lat_lightning.attacks.forward import prompt_target_batch
from lat_lightning.config import PerturbationConfig
from lat_lightning.data.templating import encode_response
from lat_lightning.eval.generation import (
    AttackPlan,
    GenerationSettings,
    encode_prompts,
    generate_under_attack,
    teacher_forced_logits,
)
from lat_lightning.eval.token_metrics import nll_sequence


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
        labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
    return nll_sequence(logits, labels)


@pytest.mark.parametrize("alpha", [0.05, 1.0])
def test_asagrad_descend_lowers_target_loss_and_ascend_raises_it(setup, alpha):
    model, _, prompts, targets = setup
    clean = _target_nll(model, prompts, targets, AttackPlan(), [-1, -1])
    for layer in (0, 2, 3):
        down = build_attack("asagrad", alpha=alpha).plan(model, prompts, targets, [0, 1], [layer, layer], 0)
        up = build_attack("asagrad", sign="ascend", alpha=alpha).plan(
            model, prompts, targets, [0, 1], [layer, layer], 0
        )
        assert (_target_nll(model, prompts, targets, down, [layer, layer]) < clean).all()
        assert (_target_nll(model, prompts, targets, up, [layer, layer]) > clean).all()


def test_multi_layer_gradients_equal_single_layer_gradients(setup):
    model, _, prompts, targets = setup
    batch = prompt_target_batch(prompts, targets, None, 0, torch.device("cpu"))
    # The full model in both cases (from_earliest_layer=False): the zero deltas are the only change.
    multi, _, loss_multi = target_gradients(model, batch, [0, 1, 2, 3], "all", from_earliest_layer=False)
    for layer in range(4):
        single, _, loss_single = target_gradients(model, batch, [layer], "all", from_earliest_layer=False)
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
    calls = []
    real = asagrad_module.sign_gradient_directions
    monkeypatch.setattr(asagrad_module, "sign_gradient_directions", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    attack = build_attack("asagrad")
    plan = attack.plan(model, prompts, targets, [0, 0, 1, 1, 0], [0, 2, 3, -1, 3], 0)
    assert calls == [[0, 2, 3]]  # every (prompt, layer) of the chunk from one forward-backward
    assert plan.vectors[3] is None and plan.kind == "direction"
    attack.plan(model, prompts, targets, [0, 1], [2, 3], 0)
    assert len(calls) == 1  # cached


def test_asa_random_is_seeded(setup):
    model, tok, prompts, _ = setup
    kw = {"settings": GenerationSettings(max_new_tokens=5), "eos_token_id": []}
    attack = build_attack("asa_random")
    a = generate_under_attack(model, tok, prompts, [1, 2], attack.plan(model, prompts, [], [0, 1], [1, 2], 0), **kw)
    b = generate_under_attack(model, tok, prompts, [1, 2], attack.plan(model, prompts, [], [0, 1], [1, 2], 0), **kw)
    c = generate_under_attack(model, tok, prompts, [1, 2], attack.plan(model, prompts, [], [0, 1], [1, 2], 1), **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert build_attack("asa_random").seed_dependent and not build_attack("asagrad").seed_dependent


def test_pgd_plan_uses_the_strategy_and_stays_in_the_ball(setup):
    model, tok, prompts, targets = setup
    cfg = PerturbationConfig(steps=3, eps=1.5, lr=0.1)
    attack = build_attack("pgd", cfg, positions="prompt_last_and_generated")
    plan = attack.plan(model, prompts, targets, [0, 1, 0], [1, 1, 3], 0)
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
    res = generate_under_attack(
        model, tok, prompts, [1, 1], plan.select([0, 1]), settings=GenerationSettings(max_new_tokens=4)
    )
    assert (res.perturbed_positions > 0).all()
