import torch
from omegaconf import OmegaConf

from lat_lightning.attacks import build_attack
from lat_lightning.attacks.base import normalise_to
from lat_lightning.attacks.positions import position_mask
from lat_lightning.config import PerturbationConfig
from tests.helpers.batches import safety_batch


def _attack(settings):
    return build_attack(settings.attack, settings)


def test_eq1_output_has_target_mean_and_std():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 64) * 4 + 2.5
    delta = torch.randn(3, 5, 64) * 0.01 - 7
    out = normalise_to(delta, h)
    torch.testing.assert_close(out.mean(-1), h.mean(-1), atol=1e-3, rtol=0)
    # σ(δ) = 0.01 here, so the 1e-6 guard shrinks the std by a factor σ/(σ+eps) = 1 - 1e-4.
    expected_std = h.std(-1) * delta.std(-1) / (delta.std(-1) + 1e-6)
    torch.testing.assert_close(out.std(-1), expected_std, atol=1e-3, rtol=1e-4)


def test_eq1_preserves_direction_of_standardised_noise():
    torch.manual_seed(1)
    h = torch.randn(64)
    delta = torch.randn(64)
    out = normalise_to(delta, h)
    z = (delta - delta.mean()) / delta.std()
    w = (out - h.mean()) / h.std()
    torch.testing.assert_close(w, z, atol=1e-4, rtol=1e-4)


def test_position_policies():
    p = torch.tensor([3, 1])
    assert position_mask("response", p, 5).tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert position_mask("prompt", p, 5).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert position_mask("prompt_last_and_generated", p, 5).tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert position_mask("first_k", p, 5, first_k=2).tolist() == [[0, 0, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert position_mask("all", p, 5).all()


def _cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(PerturbationConfig), kw)


def test_gaussian_perturbs_only_response_positions_with_activation_stats(tiny_llama):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=3)
    pert = _attack(_cfg(attack="asa_random", positions="response")).make(model, batch, [1], step=0)
    h = torch.randn(3, batch["safe_input_ids"].shape[1], 64) * 3 + 1
    delta = pert.delta(1, h)
    mask = position_mask("response", batch["prompt_lengths"], h.shape[1])
    assert torch.all(delta[~mask] == 0)
    sel = delta[mask]
    torch.testing.assert_close(sel.mean(-1), h[mask].mean(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(sel.std(-1), h[mask].std(-1), atol=1e-3, rtol=1e-3)


def test_gaussian_refresh_step_vs_fixed_and_seeded(tiny_llama):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=2)
    step_strategy = _attack(_cfg(attack="asa_random", refresh="step", seed=3))
    a0, a0b, a1 = (step_strategy.make(model, batch, [0], step=s).vectors[0] for s in (0, 0, 1))
    assert torch.equal(a0, a0b)  # same (seed, step) -> same noise: resumable
    assert not torch.equal(a0, a1)
    fixed = _attack(_cfg(attack="asa_random", refresh="fixed", seed=3))
    first, later = (fixed.make(model, batch, [0], step=s).vectors[0] for s in (0, 5))
    assert torch.equal(first, later)


def test_gaussian_changes_logits_and_restores_them(tiny_llama):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=2)
    kwargs = dict(input_ids=batch["safe_input_ids"], attention_mask=batch["safe_attention_mask"])
    clean = model(**kwargs).logits
    pert = _attack(_cfg(attack="asa_random")).make(model, batch, [1, 2], step=0)
    with pert.applied(model):
        noisy = model(**kwargs).logits
    assert not torch.allclose(noisy, clean)
    assert torch.equal(model(**kwargs).logits, clean)


def test_per_row_layers_from_asabench(tiny_llama):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=4)
    batch["layer"] = torch.tensor([0, 2, 2, 3])
    pert = _attack(_cfg(attack="asa_random")).make(model, batch, [], step=0)
    assert pert.layers == [0, 2, 3]
    assert pert.layer_mask(2).any(dim=1).tolist() == [False, True, True, False]


def test_probability_and_one_layer_sampling_are_seeded_per_step(tiny_llama):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=2)
    strat = _attack(_cfg(attack="asa_random", probability=0.5, layer_sampling="one", seed=1))
    picks = [tuple(strat.make(model, batch, [0, 1, 2, 3], step=s).layers) for s in range(40)]
    assert picks == [tuple(strat.make(model, batch, [0, 1, 2, 3], step=s).layers) for s in range(40)]
    clean = sum(p == () for p in picks)
    assert 8 <= clean <= 32  # about half the steps are left clean
    assert all(len(p) == 1 for p in picks if p)
    assert len({p for p in picks if p}) > 1


def test_noise_is_keyed_by_example_not_batch_position(tiny_llama):
    from tests.helpers.batches import safety_examples

    model, tok = tiny_llama
    examples = safety_examples(3)
    strat = _attack(_cfg(attack="asa_random", seed=2))
    full = strat.make(model, safety_batch(tok, examples=examples), [1], step=4).vectors[1]
    alone = strat.make(model, safety_batch(tok, examples=examples[2:]), [1], step=4).vectors[1]
    width = min(full.shape[1], alone.shape[1])
    assert torch.equal(full[2, :width], alone[0, :width])
