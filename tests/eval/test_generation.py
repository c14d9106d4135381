"""Batched per-row-layer generation under attack: layout independence, positions, clean rows, EOS."""

from __future__ import annotations

import pytest
import torch

import lat_lightning.attacks.plan as plan_mod
from lat_lightning.eval.generation import (
    AttackPlan,
    GenerationSettings,
    RowKeys,
    RowPerturber,
    encode_prompts,
    generate_under_attack,
    teacher_forced_logits,
)

PROMPTS = ["How do I bake bread at home?", "Tell me a poem about the sea, please, right now.", "Hi"]
G = 6


@pytest.fixture()
def setup(tiny_llama):
    model, tok = tiny_llama
    return model, tok, encode_prompts(tok, PROMPTS)


def _noise(seed=0, **kw):
    return AttackPlan(kind="noise", seed=seed, **kw)


def test_batched_row_layers_equal_per_layer_generation(setup):
    model, tok, ids = setup
    layers = [-1, 0, 1, 2, 3]
    rows = [(i, l) for i in range(len(ids)) for l in layers]
    mixed = generate_under_attack(
        model,
        tok,
        [ids[i] for i, _ in rows],
        [l for _, l in rows],
        _noise(3),
        rows=RowKeys(prompt_keys=[i for i, _ in rows]),
        settings=GenerationSettings(max_new_tokens=G),
    )
    for l in layers:  # one generation per layer, every prompt at that layer
        per_layer = generate_under_attack(
            model,
            tok,
            ids,
            [l] * len(ids),
            _noise(3),
            rows=RowKeys(prompt_keys=range(len(ids))),
            settings=GenerationSettings(max_new_tokens=G),
        )
        for i in range(len(ids)):
            assert mixed.token_ids[rows.index((i, l))] == per_layer.token_ids[i], (i, l)
    # and row by row at batch size 1 (no padding at all)
    for r in (1, 7, 13):
        i, l = rows[r]
        single = generate_under_attack(
            model,
            tok,
            [ids[i]],
            [l],
            _noise(3),
            rows=RowKeys(prompt_keys=[i]),
            settings=GenerationSettings(max_new_tokens=G),
        )
        assert single.token_ids[0] == mixed.token_ids[r]
    # the attack changes something, the clean rows equal a clean generation
    clean = generate_under_attack(model, tok, ids, settings=GenerationSettings(max_new_tokens=G))
    assert [mixed.token_ids[rows.index((i, -1))] for i in range(3)] == clean.token_ids
    assert any(mixed.token_ids[rows.index((i, l))] != clean.token_ids[i] for i in range(3) for l in layers[1:])


def test_clean_generation_matches_hf_generate(setup):
    model, tok, ids = setup
    ours = generate_under_attack(model, tok, ids, eos_token_id=[], settings=GenerationSettings(max_new_tokens=G))
    for i, p in enumerate(ids):
        ref = model.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=G,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=None,
        )
        assert ours.token_ids[i] == ref[0, len(p) :].tolist()


def test_keyed_noise_is_layout_independent(setup):
    model, tok, ids = setup
    # Same rows, different order and chunking: identical outputs.
    rows = [(0, 1), (1, 2), (2, 1), (1, 1)]
    base = generate_under_attack(
        model,
        tok,
        [ids[i] for i, _ in rows],
        [l for _, l in rows],
        _noise(5),
        rows=RowKeys(prompt_keys=[i for i, _ in rows]),
        settings=GenerationSettings(max_new_tokens=G),
    )
    perm = [3, 1, 0, 2]
    other = generate_under_attack(
        model,
        tok,
        [ids[rows[p][0]] for p in perm],
        [rows[p][1] for p in perm],
        _noise(5),
        rows=RowKeys(prompt_keys=[rows[p][0] for p in perm]),
        settings=GenerationSettings(max_new_tokens=G, batch_size=2),
    )
    for j, p in enumerate(perm):
        assert other.token_ids[j] == base.token_ids[p]
    # The deltas themselves: a row's delta depends only on (seed, prompt key, layer, position).
    hidden = torch.randn(4, 1, 64)
    plan = _noise(5)
    a = RowPerturber(plan, torch.tensor([1, 1, 2, 1]), torch.tensor([5, 9, 7, 5]), torch.tensor([0, 1, 2, 3]))
    b = RowPerturber(plan, torch.tensor([1, 1]), torch.tensor([5, 5]), torch.tensor([3, 0]))
    a.positions = torch.tensor([[6], [10], [8], [6]])
    b.positions = torch.tensor([[6], [6]])
    out_a, out_b = a.edit(1, hidden) - hidden, b.edit(1, hidden[[3, 0]]) - hidden[[3, 0]]
    torch.testing.assert_close(out_b[0], out_a[3], rtol=0, atol=0)
    torch.testing.assert_close(out_b[1], out_a[0], rtol=0, atol=0)
    assert not torch.equal(out_a[0], out_a[3])  # other prompt key: other noise (same position and layer)


def test_clean_rows_unaffected_by_perturbed_rows(setup):
    model, _, ids = setup
    seqs = [ids[0] + [5, 6, 7], ids[0] + [5, 6, 7], ids[1] + [8, 9]]
    p_len = [len(ids[0]), len(ids[0]), len(ids[1])]
    clean_only = teacher_forced_logits(model, seqs, p_len, [-1, -1, -1], AttackPlan())
    mixed = teacher_forced_logits(model, seqs, p_len, [-1, 2, 1], _noise(1))
    torch.testing.assert_close(mixed[0], clean_only[0])
    assert not torch.allclose(mixed[1, p_len[1] - 1 : len(seqs[1])], clean_only[1, p_len[1] - 1 : len(seqs[1])])
    # positions before the last prompt token are untouched under the paper's policy (causality + policy)
    torch.testing.assert_close(mixed[1, : p_len[1] - 1], clean_only[1, : p_len[1] - 1])


@pytest.mark.parametrize(
    ("policy", "k"), [("first_k", 3), ("first_k", 1), ("prompt_last_and_generated", 1), ("all", 1), ("response", 1)]
)
def test_perturbs_exactly_the_claimed_positions(setup, monkeypatch, policy, k):
    model, tok, ids = setup
    drawn: list[tuple] = []
    real = plan_mod.keyed_normal

    def spy(d, *key, **kw):
        drawn.append(key)
        return real(d, *key, **kw)

    monkeypatch.setattr(plan_mod, "keyed_normal", spy)
    res = generate_under_attack(
        model,
        tok,
        ids[:2],
        [2, -1],
        _noise(0, positions=policy, first_k=k),
        eos_token_id=[],
        rows=RowKeys(prompt_keys=[0, 1]),
        settings=GenerationSettings(max_new_tokens=G),
    )
    p = len(ids[0])
    expected = {
        "first_k": set(range(p - 1, p - 1 + k)),
        "prompt_last_and_generated": set(range(p - 1, p - 1 + G)),
        "all": set(range(p - 1 + G)),
        "response": set(range(p, p - 1 + G)),
    }[policy]
    assert {key[3] for key in drawn} == expected  # (seed, prompt, layer, position)
    assert len(drawn) == len(expected)  # one draw (one hook application) per perturbed position
    assert all(key[1] == 0 and key[2] == 2 for key in drawn)  # only the attacked row, at its layer
    assert res.perturbed_positions.tolist() == [len(expected), 0]


def test_refresh_fixed_draws_once_per_prompt(setup, monkeypatch):
    model, tok, ids = setup
    drawn = []
    real = plan_mod.keyed_normal
    monkeypatch.setattr(plan_mod, "keyed_normal", lambda d, *key, **kw: drawn.append(key) or real(d, *key, **kw))
    res = generate_under_attack(
        model,
        tok,
        ids[:1],
        [1],
        _noise(0, refresh="fixed"),
        eos_token_id=[],
        settings=GenerationSettings(max_new_tokens=G),
    )
    assert drawn == [(0, 0, 1, -1)]
    assert res.perturbed_positions.tolist() == [G]


def test_teacher_forcing_reproduces_attacked_generation(setup):
    """Generation and teacher forcing put the same keyed noise on the same tokens."""
    model, tok, ids = setup
    plan = _noise(2)
    res = generate_under_attack(
        model, tok, ids, [1, 3, 0], plan, eos_token_id=[], settings=GenerationSettings(max_new_tokens=G)
    )
    seqs = [p + t for p, t in zip(ids, res.token_ids)]
    logits = teacher_forced_logits(model, seqs, [len(p) for p in ids], [1, 3, 0], plan)
    for r, p in enumerate(ids):
        greedy = logits[r, len(p) - 1 : len(p) - 1 + G].argmax(-1).tolist()
        assert greedy == res.token_ids[r]


def test_rows_stop_at_eos_and_are_padded(setup):
    model, tok, ids = setup
    first = generate_under_attack(model, tok, ids, eos_token_id=[], settings=GenerationSettings(max_new_tokens=G))
    eos = first.token_ids[0][2]
    res = generate_under_attack(
        model, tok, ids, eos_token_id=eos, pad_token_id=0, settings=GenerationSettings(max_new_tokens=G)
    )
    for r in range(len(ids)):
        full = first.token_ids[r]
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert res.token_ids[r] == full[:cut]
        assert res.lengths[r] == cut
        assert res.new_tokens[r, cut:].eq(0).all()


def test_direction_and_additive_plans(setup):
    model, tok, ids = setup
    d = 64
    vec = torch.randn(len(ids[0]) + 2, d)
    direction = AttackPlan(kind="direction", vectors=[vec, None], alpha=0.5)
    res = generate_under_attack(
        model, tok, ids[:2], [1, -1], direction, eos_token_id=[], settings=GenerationSettings(max_new_tokens=G)
    )
    assert res.perturbed_positions.tolist() == [G, 0]  # the last vector is reused past its length
    mask = torch.zeros(len(ids[0]), dtype=torch.bool)
    mask[:3] = True  # additive vectors only where their own mask says (prompt positions here)
    additive = AttackPlan(kind="additive", vectors=[torch.randn(len(ids[0]), d), None], vector_masks=[mask, None])
    res = generate_under_attack(
        model, tok, ids[:2], [1, -1], additive, eos_token_id=[], settings=GenerationSettings(max_new_tokens=G)
    )
    assert res.perturbed_positions.tolist() == [3, 0]


def test_sampling_is_seeded_and_layout_independent(setup):
    model, tok, ids = setup
    kw = {"settings": GenerationSettings(max_new_tokens=G, do_sample=True, temperature=1.5), "eos_token_id": []}
    a = generate_under_attack(model, tok, ids, [0, -1, 2], _noise(4), rows=RowKeys(row_seeds=[4, 4, 4]), **kw)
    b = generate_under_attack(model, tok, ids[::-1], [2, -1, 0], _noise(4), rows=RowKeys(prompt_keys=[2, 1, 0]), **kw)
    assert a.token_ids == b.token_ids[::-1]
    c = generate_under_attack(model, tok, ids, [0, -1, 2], _noise(9), **kw)
    assert c.token_ids != a.token_ids


def test_bad_inputs(setup):
    model, tok, ids = setup
    with pytest.raises(IndexError):
        generate_under_attack(model, tok, ids[:1], [7], _noise(), settings=GenerationSettings(max_new_tokens=2))
    with pytest.raises(ValueError):
        AttackPlan(kind="noise", positions="everywhere")
    with pytest.raises(ValueError):
        generate_under_attack(model, tok, ids, [0], _noise(), settings=GenerationSettings(max_new_tokens=2))


@pytest.mark.parametrize("share_prefix", [True, False])
def test_decode_steps_pass_the_returned_cache_under_its_current_name(
    tiny_model_dirs, tiny_tokenizer, monkeypatch, share_prefix
):
    """Every tiny architecture takes the KV cache as ``cache`` (``past_key_values`` is deprecated, removed in
    transformers 5.40): each decode step receives the DynamicCache the previous forward returned, and no
    deprecation warning is logged. With a shared prefix, one more forward (the prefix) comes first."""
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache
    from transformers.utils import logging as hf_logging

    from lat_lightning.eval.generation import cache_argument

    warned = []
    monkeypatch.setattr(
        hf_logging.get_logger("transformers.utils.generic"), "warning_once", lambda msg, *a, **k: warned.append(msg)
    )
    for arch, path in tiny_model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        assert cache_argument(model) == "cache", arch
        seen = []
        real = model.forward

        def spy(*args, _real=real, _seen=seen, **kwargs):
            assert "past_key_values" not in kwargs
            out = _real(*args, **kwargs)
            _seen.append((kwargs.get("cache"), out.get("cache")))
            return out

        monkeypatch.setattr(model, "forward", spy)
        res = generate_under_attack(
            model,
            tiny_tokenizer,
            PROMPTS[:2],
            eos_token_id=[],
            settings=GenerationSettings(max_new_tokens=4, share_prefix=share_prefix),
        )
        assert res.lengths.tolist() == [4, 4], arch
        assert seen[0][0] is None and len(seen) == 4 + share_prefix, arch
        for (_, returned), (passed, _) in zip(seen, seen[1:]):  # step t+1 gets exactly what step t returned
            assert isinstance(returned, DynamicCache) and passed is returned, arch
    assert not [m for m in warned if "past_key_values" in str(m)]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_forward_that_only_knows_past_key_values_still_works(setup, share_prefix):
    """Remote-code models written for older transformers take ``past_key_values``: it is passed under that
    name, and the generations equal the ones through ``cache``."""
    from torch import nn
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from lat_lightning.eval.generation import cache_argument

    model, tok, ids = setup

    class OldStyle(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config, self.generation_config = inner, inner.config, inner.generation_config
            self.calls = 0

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
            self.calls += past_key_values is not None
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=past_key_values,
                use_cache=use_cache,
            )
            return CausalLMOutputWithPast(logits=out.logits, past_key_values=out.cache)  # as such code writes it

    old = OldStyle(model)
    assert cache_argument(old) == "past_key_values"
    ours = generate_under_attack(
        old, tok, ids, eos_token_id=[], settings=GenerationSettings(max_new_tokens=G, share_prefix=share_prefix)
    )
    assert old.calls == G - 1 + share_prefix  # a shared prefix: the last prompt token also runs on the cache
    assert (
        ours.token_ids
        == generate_under_attack(
            model, tok, ids, eos_token_id=[], settings=GenerationSettings(max_new_tokens=G)
        ).token_ids
    )


def test_the_old_separate_keywords_are_gone(setup):
    """Decoding and row keys travel only in GenerationSettings / RowKeys: the old separate keywords raise."""
    model, tok, ids = setup
    with pytest.raises(TypeError, match="max_new_tokens"):
        generate_under_attack(model, tok, ids, max_new_tokens=4)
    with pytest.raises(TypeError, match="prompt_keys"):
        generate_under_attack(model, tok, ids, prompt_keys=[0, 1, 2])
