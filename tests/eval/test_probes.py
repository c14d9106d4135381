"""NLL probe and position KL: zero without a perturbation, positive with one, per layer, same noise as
generation."""

from __future__ import annotations

import numpy as np

from lat_lightning.eval.generation import GenerationSettings, encode_prompts, generate_under_attack
from lat_lightning.eval.probes import ProbeSettings, nll_probe_layers, response_probe

PROMPTS = ["How do I bake bread at home?", "Tell me a poem about the sea.", "Hi"]


def test_nll_probe_layers_ranks_every_layer(tiny_llama):
    model, tok = tiny_llama
    ranking, result = nll_probe_layers(
        model,
        tok,
        PROMPTS,
        seeds=[0, 1],
        return_result=True,
        generation=GenerationSettings(max_new_tokens=6, batch_size=16),
    )
    assert sorted(ranking) == [0, 1, 2, 3]
    assert all(np.isfinite(v) for v in ranking.values())
    assert result.nll_perturbed.shape == (3, 4, 2)
    assert np.mean(list(ranking.values())) > 0  # Eq.1-sized noise makes the clean answer less likely
    zero = nll_probe_layers(
        model,
        tok,
        PROMPTS,
        layers=[1, 3],
        generation=GenerationSettings(max_new_tokens=6, batch_size=16),
        probe=ProbeSettings(alpha=0.0),
    )
    assert zero == {1: 0.0, 3: 0.0}  # no perturbation, no change (exactly)


def test_position_kl_curves(tiny_llama):
    model, tok = tiny_llama
    ids = encode_prompts(tok, PROMPTS)
    clean = generate_under_attack(model, tok, ids, eos_token_id=[], settings=GenerationSettings(max_new_tokens=5))
    res = response_probe(model, ids, clean.token_ids, [0, 2], [0], settings=ProbeSettings(batch_size=2))
    assert res.kl.shape == (3, 2, 1, 5)
    assert (res.kl > 0).all()
    curves = res.kl_curves()
    assert set(curves) == {0, 2} and all(len(c) == 5 for c in curves.values())
    summary = res.summary()
    assert summary["peak_delta_nll_layer"] in (0, 2) and set(summary["position_kl"]) == {"0", "2"}
    off = response_probe(model, ids, clean.token_ids, [0], [0], settings=ProbeSettings(alpha=0.0))
    assert np.all(off.kl == 0) and np.all(off.delta_nll == 0)
    # batching rows differently does not change the values
    again = response_probe(model, ids, clean.token_ids, [0, 2], [0], settings=ProbeSettings(batch_size=16))
    np.testing.assert_allclose(again.nll_perturbed, res.nll_perturbed, rtol=1e-5)


def test_prefix_shared_probe_equals_the_whole_sequence_probe(tiny_model_dirs, tiny_tokenizer):
    """The probe from each prompt's shared prefix cache gives the whole-sequence probe's values (float rounding
    aside), on a RoPE model and on one with learned absolute positions."""
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "gpt2"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch])
        ids = encode_prompts(tiny_tokenizer, PROMPTS)
        clean = generate_under_attack(
            model, tiny_tokenizer, ids, eos_token_id=[], settings=GenerationSettings(max_new_tokens=5)
        )
        kw = dict(layers=[0, 2, 3], seeds=[0, 1])
        shared = response_probe(
            model, ids, clean.token_ids, settings=ProbeSettings(batch_size=4, share_prefix=True), **kw
        )
        whole = response_probe(
            model, ids, clean.token_ids, settings=ProbeSettings(batch_size=4, share_prefix=False), **kw
        )
        np.testing.assert_allclose(shared.nll_clean, whole.nll_clean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(shared.nll_perturbed, whole.nll_perturbed, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(shared.kl, whole.kl, rtol=1e-3, atol=1e-5)
        assert (shared.kl > 0).all() and np.isfinite(shared.nll_perturbed).all()
