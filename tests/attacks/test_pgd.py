import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lat_lightning.attacks import build_attack
from lat_lightning.attacks.positions import position_mask
from lat_lightning.config import PerturbationConfig
from tests.helpers.batches import safety_batch


def _attack(settings):
    return build_attack(settings.attack, settings)


def _cfg(**kw):
    base = {"attack": "pgd", "steps": 4, "eps": 1.0, "lr": 0.1, "positions": "prompt"}
    return OmegaConf.merge(OmegaConf.structured(PerturbationConfig), {**base, **kw})


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    norm=st.sampled_from(["l2", "linf"]),
    scope=st.sampled_from(["token", "sequence"]),
    eps=st.floats(0.05, 3.0),
    optimizer=st.sampled_from(["adamw", "sign"]),
    init=st.sampled_from(["zero", "random"]),
    eps_mode=st.sampled_from(["absolute", "relative"]),
)
def test_pgd_stays_within_eps_on_every_step(tiny_llama, norm, scope, eps, optimizer, init, eps_mode):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=2)
    strat = _attack(
        _cfg(norm=norm, norm_scope=scope, eps=eps, optimizer=optimizer, init=init, eps_mode=eps_mode, steps=3, lr=1.0)
    )
    seen = []

    def check(step, deltas):
        seen.append(step)
        for layer, delta in deltas.items():
            mask = position_mask("prompt", batch["prompt_lengths"], delta.shape[1])
            assert torch.all(delta[~mask] == 0)
            if eps_mode == "absolute":
                radius = torch.tensor(eps)
            else:
                inputs = dict(input_ids=batch["harmful_input_ids"], attention_mask=batch["harmful_attention_mask"])
                from lat_lightning.models.hooks import capture_residual

                h = capture_residual(model, [layer], **inputs)[layer]
                radius = eps * (
                    h.flatten(1).norm(dim=-1)[:, None, None] if scope == "sequence" else h.norm(dim=-1, keepdim=True)
                )
            if norm == "linf":
                assert torch.all(delta.abs() <= radius * (1 + 1e-5) + 1e-6)
            elif scope == "sequence":
                assert torch.all(delta.flatten(1).norm(dim=-1)[:, None, None] <= radius * (1 + 1e-5) + 1e-6)
            else:
                assert torch.all(delta.norm(dim=-1, keepdim=True) <= radius * (1 + 1e-5) + 1e-6)

    strat.step_callback = check
    strat.make(model, batch, [1, 2])
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("away", [0.0, 0.5])
def test_pgd_lowers_attack_loss_and_leaves_weights_alone(tiny_llama, away):
    model, tok = tiny_llama
    model.train()
    batch = safety_batch(tok, n=3)
    pert = _attack(_cfg(away_from_safe=away, steps=6, eps=4.0, lr=0.2)).make(model, batch, [1])
    assert pert.stats["attack_loss_after"] < pert.stats["attack_loss_before"]
    assert all(p.grad is None for p in model.parameters())
    assert not pert.normalise


def test_pgd_earliest_layer_equals_full_model(tiny_llama):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=2)
    fast = _attack(_cfg(steps=3, away_from_safe=0.5))
    slow = _attack(_cfg(steps=3, away_from_safe=0.5))
    slow.from_earliest_layer = False
    a, b = fast.make(model, batch, [2, 3]), slow.make(model, batch, [2, 3])
    for layer in (2, 3):
        torch.testing.assert_close(a.vectors[layer], b.vectors[layer], atol=1e-5, rtol=1e-4)


def test_pgd_early_stop(tiny_llama):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=2)
    pert = _attack(_cfg(steps=10, early_stop_loss=1e9)).make(model, batch, [1])
    assert pert.stats["attack_steps"] == 1


@pytest.mark.parametrize(
    "bad", [{"steps": 0}, {"eps": 0.0}, {"eps": -1.0}, {"toward_harmful": 0.0, "away_from_safe": 0.0}]
)
def test_pgd_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        _attack(_cfg(**bad))
