"""The coherence check's clean pass from the attacked layer up (lat_lightning/eval/clean_states.py): the NLLs, and so
every coherence record and verdict, equal those of the clean pass over every block.

Tolerance: the fast path takes blocks ``0..l`` from states computed during generation (one token per decode call
against a KV cache), the full pass computes them for all answer tokens in one call; the same arithmetic in a
different order, so the NLLs agree to float rounding (float32: far below 1e-4 nats per token), not bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scan_helpers import scan

import lat_lightning.eval.coherence as coherence_mod
from lat_lightning.config import PerturbationConfig
from lat_lightning.eval.coherence import CoherenceScorer, CoherenceSettings, assess
from lat_lightning.eval.generation import AttackPlan, GenerationSettings, RowKeys, encode_prompts, generate_under_attack
from lat_lightning.eval.judges import KeywordJudge
from lat_lightning.models.hooks import capture_residual
from lat_lightning.models.tiny_factory import TINY_ARCHITECTURES

PROMPTS = ["How do I bake bread at home?", "Hi", "Tell me a poem about the sea, please, right now, with rhymes."]
TARGETS = ["Sure, here is how to bake bread", "Sure, hello", "Sure, the sea is wide and blue"]
TOL = 1e-4  # nats per token; see the module docstring
RECORD_TOL = TOL + 1e-4  # a coherence record rounds the NLL to 4 decimals: one more unit either side


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


class FromLayerCounter:
    """Counts the pairs the clean pass scored from an attacked layer."""

    def __init__(self, monkeypatch):
        self.pairs = 0
        real = coherence_mod.last_block_from_layer

        def spy(model, prefixes, prompts, continuations, *args, **kwargs):
            self.pairs += len(continuations)
            return real(model, prefixes, prompts, continuations, *args, **kwargs)

        monkeypatch.setattr(coherence_mod, "last_block_from_layer", spy)


def _coherence(from_layer: bool) -> CoherenceSettings:
    return CoherenceSettings(from_attacked_layer=from_layer)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_scan_from_attacked_layer_equals_the_full_clean_pass(arch, tiny_model_dirs, tiny_tokenizer, monkeypatch):
    """Every family of the tiny kit (their caches, position schemes and block outputs differ): a scan of three
    prompts of different lengths x every layer x two seeds, ASA random and a gradient attack, with the fast clean
    pass and with the full one: the same tokens, coherence records (NLL to ``TOL``) and verdicts."""
    model = _load(tiny_model_dirs[arch])
    counter = FromLayerCounter(monkeypatch)
    kw = dict(
        layers=None,
        attacks=["asa_random", "asagrad"],
        seeds=[0, 1],
        judges={"keyword": KeywordJudge()},
        perturbation=PerturbationConfig(steps=2, lr=0.5, init="random"),
        max_new_tokens=6,
        batch_size=64,  # a chunk holds every cell: 6 per layer, above coherence.MIN_PAIRS_PER_LAYER
        bootstrap_samples=0,
        progress=False,
        figures=False,
        tensorboard=False,
        asabench_test_fraction=None,
    )
    fast = scan(model, tiny_tokenizer, PROMPTS, TARGETS, coherence=_coherence(True), **kw)
    assert counter.pairs > 0  # the fast path ran
    counter.pairs = 0
    full = scan(model, tiny_tokenizer, PROMPTS, TARGETS, coherence=_coherence(False), **kw)
    assert counter.pairs == 0
    assert fast.records.keys() == full.records.keys()
    pairs = []
    for k, r in fast.records.items():
        s = full.records[k]
        assert r["token_ids"] == s["token_ids"] and r["verdicts"] == s["verdicts"], k
        a, b = dict(r["coherence"]), dict(s["coherence"])
        na, nb = a.pop("nll"), b.pop("nll")
        assert a == b, k
        assert (na is None) == (nb is None) and (na is None or abs(na - nb) <= RECORD_TOL), (k, na, nb)
        if na is not None:
            pairs.append((r["response"], na, nb))
    # A random tiny model's NLLs sit far above any useful threshold; judged at their median (a threshold that
    # splits them), the two paths still give every answer the same coherence verdict.
    median = CoherenceSettings(max_nll=sorted(nb for _, _, nb in pairs)[len(pairs) // 2])
    fast_ok = [assess(t, na, median)["coherent"] for t, na, _ in pairs]
    assert fast_ok == [assess(t, nb, median)["coherent"] for t, _, nb in pairs]
    assert any(fast_ok) and not all(fast_ok)


def test_captured_states_are_the_clean_models_hidden_states(tiny_llama, monkeypatch):
    """The states captured at each row's layer during an attacked generation equal ``h[l]`` of a clean forward of
    the prompt and the generated tokens (and ``from_attacked_layer`` NLLs equal the full pass's)."""
    model, tok = tiny_llama
    ids = encode_prompts(tok, PROMPTS)
    rows, layers = [0, 0, 1, 2, 2], [0, 3, 1, 2, -1]
    res = generate_under_attack(
        model,
        tok,
        [ids[i] for i in rows],
        layers,
        AttackPlan(kind="noise", alpha=1.0, seed=0),
        rows=RowKeys(prompt_keys=rows),
        settings=GenerationSettings(max_new_tokens=5),
        capture_states=True,
    )
    assert res.clean_states[4] is None  # the clean row
    for j, (i, l) in enumerate(zip(rows, layers)):
        if l < 0:
            continue
        seq = ids[i] + res.token_ids[j]
        want = capture_residual(model, [l], input_ids=torch.tensor([seq]))[l][0, len(ids[i]) - 1 : len(seq) - 1]
        got = res.clean_states[j]
        assert got is not None and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    scorer = CoherenceScorer(model, _coherence(True), pad_id=tok.pad_token_id)
    scorer.min_pairs_per_layer = 1  # 4 answers over 4 layers: let the pass from the layers run anyway
    full = CoherenceScorer(model, _coherence(False), pad_id=tok.pad_token_id)
    prompts = [ids[i] for i in rows]
    counter = FromLayerCounter(monkeypatch)
    fast_nll = scorer.nll(prompts, res.token_ids, res.clean_states, layers)
    assert counter.pairs == 4  # every attacked row from its layer
    full_nll = full.nll(prompts, res.token_ids, res.clean_states, layers)
    assert all(abs(a - b) <= TOL for a, b in zip(fast_nll, full_nll))  # type: ignore[operator]


def test_ablation_and_clean_rows_capture_nothing(tiny_llama):
    """An attack that edits every layer (``ablation``) leaves no block clean: no state is captured, and the
    coherence check runs the full pass."""
    model, tok = tiny_llama
    ids = encode_prompts(tok, PROMPTS[:1])
    d = model.config.hidden_size
    plan = AttackPlan(kind="ablation", alpha=1.0, vectors=[torch.nn.functional.normalize(torch.ones(d), dim=0)] * 2)
    res = generate_under_attack(
        model,
        tok,
        ids * 2,
        [1, 2],
        plan,
        settings=GenerationSettings(max_new_tokens=3),
        capture_states=True,
    )
    assert res.clean_states == [None, None]
    clean = generate_under_attack(model, tok, ids, capture_states=True, settings=GenerationSettings(max_new_tokens=3))
    assert clean.clean_states == [None]


def test_the_switch_is_not_part_of_a_scans_fingerprint(tiny_llama, tmp_path):
    """``from_attacked_layer`` says how the NLL is computed, not what: a scan resumes across it."""
    model, tok = tiny_llama
    kw = dict(layers=[1], max_new_tokens=3, bootstrap_samples=0, progress=False, figures=False, tensorboard=False)
    first = scan(model, tok, PROMPTS[:1], out_dir=tmp_path, coherence=_coherence(True), **kw)
    again = scan(model, tok, PROMPTS[:1], out_dir=tmp_path, coherence=_coherence(False), resume=True, **kw)
    assert again.cells_resumed == len(first.records) and again.cells_run == 0
    assert dataclasses.asdict(_coherence(True)).keys() - first.summary["settings"]["coherence"].keys() == {
        "from_attacked_layer"
    }


def test_a_scan_runs_its_prompt_prefixes_once(tiny_llama, monkeypatch):
    """Within a scan the clean prompt prefixes of a chunk run once (``kv_cache.reused_prefixes``): the clean
    answers, their coherence check, the attacked generation and its check all start from that one forward."""
    model, tok = tiny_llama
    ids = encode_prompts(tok, PROMPTS)
    prefix_shape = (len(PROMPTS), max(len(p) for p in ids) - 1)
    seen = []
    real = model.forward

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    kw = dict(layers=[1, 2], max_new_tokens=4, bootstrap_samples=0, progress=False, figures=False, tensorboard=False)
    res = scan(model, tok, PROMPTS, asabench_test_fraction=None, **kw)
    assert seen.count(prefix_shape) == 1
    assert all("nll" in r["coherence"] for r in res.records.values())
