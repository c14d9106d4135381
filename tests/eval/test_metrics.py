"""ASABench metrics on hand-made success matrices, bootstrap intervals and the NLL / KL probes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lat_lightning.eval.metrics import (
    bootstrap_ci,
    failure_counts,
    init_rate,
    lasr,
    masr,
    pasr,
    summarise,
    summarise_seeds,
)
from lat_lightning.eval.token_metrics import kl_by_position, nll_sequence, position_kl

NAN = float("nan")
# 4 prompts x 3 layers. LASR = [1/4, 1/4, 2/4]; PASR = 0.5 at layer index 2; prompts 0, 1, 2 are broken
# at some layer, prompt 3 never: MASR = 3/4.
S = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=float)
CLEAN = np.array([1, 0, 0, 0], dtype=float)  # INIT = 1/4
# With judge failures (NaN): LASR = [1/3, 0/2, 1/2]; MASR over prompts 0, 1, 3 (prompt 2 all failed) = 2/3.
S_FAIL = np.array([[1, NAN, 0], [0, 0, 1], [NAN, NAN, NAN], [0, 0, NAN]])


def test_metrics_on_hand_matrix():
    np.testing.assert_allclose(lasr(S), [0.25, 0.25, 0.5])
    assert pasr(S) == (0.5, 2)
    assert masr(S) == 0.75
    assert init_rate(CLEAN) == 0.25


def test_metrics_accept_tensors_and_break_ties_to_lowest_layer():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert pasr(s) == (0.5, 0)
    assert masr(s) == 1.0


def test_failures_leave_the_denominator_and_are_counted():
    np.testing.assert_allclose(lasr(S_FAIL), [1 / 3, 0.0, 0.5])
    assert pasr(S_FAIL) == (0.5, 2)
    assert masr(S_FAIL) == pytest.approx(2 / 3)
    assert init_rate([1, NAN, 0, 0]) == pytest.approx(1 / 3)
    counts = failure_counts(S_FAIL)
    assert counts == {"total": 5, "per_layer": [1, 2, 2], "judged_per_layer": [3, 2, 2], "prompts_all_failed": 1}


def test_all_failed_layer_is_nan_not_zero():
    s = np.array([[1, NAN], [0, NAN]])
    rates = lasr(s)
    assert rates[0] == 0.5 and math.isnan(rates[1])
    assert pasr(s) == (0.5, 0)
    assert math.isnan(masr(np.full((2, 2), NAN)))


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        lasr([[0.5, 1.0]])
    with pytest.raises(ValueError, match="2 dimensions"):
        lasr([1.0, 0.0])


def test_bootstrap_ci_contains_point_and_is_reproducible():
    rng = np.random.default_rng(1)
    s = (rng.random((60, 5)) < np.linspace(0.1, 0.6, 5)).astype(float)
    for fn, data in ((masr, s), (init_rate, s[:, 0])):
        lo, hi = bootstrap_ci(fn, data, samples=500, seed=3)
        assert lo <= fn(data) <= hi and hi - lo > 0
    lo_l, hi_l = bootstrap_ci(lasr, s, samples=500, seed=3)
    point = lasr(s)
    assert lo_l.shape == (5,) and np.all(lo_l <= point) and np.all(point <= hi_l)
    again = bootstrap_ci(lasr, s, samples=500, seed=3)
    np.testing.assert_array_equal(again[0], lo_l)
    narrow = bootstrap_ci(masr, s, samples=500, seed=3, alpha=0.5)
    wide = bootstrap_ci(masr, s, samples=500, seed=3, alpha=0.05)
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]
    assert bootstrap_ci(masr, np.ones((10, 2)), samples=50) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci(masr, s, samples=0)


def test_summarise_is_json_and_matches_metrics():
    out = summarise(S_FAIL, clean=[1, NAN, 0, 0], layer_ids=[4, 8, 12], samples=200, seed=0)
    text = json.dumps(out, allow_nan=False)  # NaN must have become null
    assert json.loads(text) == out
    assert out["lasr"] == pytest.approx([1 / 3, 0.0, 0.5])
    assert out["pasr"] == 0.5 and out["pasr_layer"] == 12 and out["pasr_layer_index"] == 2
    assert out["masr"] == pytest.approx(2 / 3)
    assert out["init"] == pytest.approx(1 / 3)
    assert out["failures"]["total"] == 5 and out["failures"]["clean"] == 1 and out["failures"]["judged_clean"] == 3
    assert len(out["lasr_ci"]) == 3 and out["pasr_ci"][0] <= out["pasr_ci"][1]
    assert out["masr_ci"][0] <= out["masr"] <= out["masr_ci"][1]
    assert out["bootstrap"]["samples"] == 200
    no_ci = summarise(S, samples=0)
    assert no_ci["lasr_ci"] is None and no_ci["init"] is None
    with pytest.raises(ValueError, match="layer_ids"):
        summarise(S, layer_ids=[1, 2])


def test_summarise_seeds_mean_and_std():
    other = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]], dtype=float)  # PASR .75 @0, MASR .75
    s = np.stack([S, other], axis=2)
    out = summarise_seeds(s, clean=CLEAN, layer_ids=[2, 4, 6], samples=50, seed_ids=[0, 7])
    json.dumps(out, allow_nan=False)
    assert out["n_seeds"] == 2 and out["seed_ids"] == [0, 7]
    assert out["pasr_mean"] == pytest.approx(0.625)
    assert out["pasr_std"] == pytest.approx(0.25 / math.sqrt(2))
    assert out["masr_mean"] == pytest.approx(0.75) and out["masr_std"] == 0.0
    assert out["init_mean"] == 0.25 and out["init_std"] == 0.0
    assert out["lasr_mean"] == pytest.approx([0.5, 0.125, 0.25])
    assert out["pasr_layers"] == [6, 2]
    assert out["pasr_of_mean_lasr"] == 0.5 and out["pasr_of_mean_lasr_layer"] == 2
    assert out["masr_any_seed"] == 1.0
    assert out["per_seed"][1]["pasr"] == 0.75
    single = summarise_seeds(S, samples=0)
    assert single["n_seeds"] == 1 and single["pasr_std"] == 0.0


def test_nll_sequence_matches_manual_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, -100, -100, -100, -100]])
    logp = F.log_softmax(logits, dim=-1)
    manual = -(logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5])  # position t predicts label t+1
    got = nll_sequence(logits, labels, chunk_size=2)
    assert got[0].item() == pytest.approx(manual.item(), rel=1e-5)
    assert got[1].item() == 0.0
    assert torch.allclose(nll_sequence(logits.bfloat16(), labels), nll_sequence(logits.bfloat16().float(), labels))
    assert nll_sequence(logits.bfloat16(), labels).dtype == torch.float32


def test_position_kl_zero_for_identical_positive_otherwise():
    torch.manual_seed(0)
    a = torch.randn(2, 6, 50)
    assert torch.equal(position_kl(a, a.clone()), torch.zeros(2, 6))
    b = a.clone()
    b[:, 3:] += torch.randn(2, 3, 50)
    kl = position_kl(a, b, chunk_size=4)
    assert torch.all(kl[:, :3] == 0) and torch.all(kl[:, 3:] > 0)
    manual = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, manual, atol=1e-6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    masked = position_kl(a, b, mask)
    assert torch.all(masked[0, 4:] == 0) and torch.equal(masked[1], kl[1])
    prof = kl_by_position(masked, mask)
    assert prof[5].item() == pytest.approx(kl[1, 5].item())


def test_position_kl_fits_a_large_vocabulary_in_bf16():
    torch.manual_seed(0)
    a = torch.randn(1, 3, 128_256, dtype=torch.bfloat16)
    kl = position_kl(a, (a.float() * 1.5).bfloat16(), chunk_size=1)
    assert kl.dtype == torch.float32 and torch.all(kl > 0)


def test_metric_invariants_on_random_matrices():
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    @settings(max_examples=60, deadline=None)
    @given(arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 5)), elements=st.sampled_from([0.0, 1.0])))
    def check(s):
        rates = lasr(s)
        peak, idx = pasr(s)
        assert peak == rates.max() == rates[idx]
        # A prompt broken at the peak layer is broken at some layer; MASR cannot exceed the sum of the LASRs.
        assert peak <= masr(s) <= min(1.0, rates.sum()) + 1e-12
        assert masr(s) == s.max(axis=1).mean()

    check()


def test_tied_peak_and_the_documented_tie_rule():
    from lat_lightning.eval.metrics import TIE_RULE, choose_peak, rank_layers, tied_peak

    assert tied_peak([0.5, 1.0, None, 1.0, float("nan")]) == [1, 3]
    assert tied_peak([None, float("nan")]) == []
    unique = choose_peak([0, 1, 2], [0.1, 0.7, 0.2])
    assert unique["layer"] == 1 and unique["tied_layers"] == [1] and unique["decided_by"] == "unique"
    # 30 layers all at 1.0 (the saturated keyword scan of the issue): a tie, not "peak layer 0"
    flat = choose_peak(list(range(30)), [1.0] * 30)
    assert flat["tied_layers"] == list(range(30)) and flat["decided_by"] == "lowest layer" and flat["layer"] == 0
    broken = choose_peak(list(range(4)), [1.0, 1.0, 1.0, 0.5], tiebreak=[0.1, 0.4, 0.2, 0.9])
    assert broken["layer"] == 1 and broken["tied_layers"] == [0, 1, 2] and broken["decided_by"] == "tie-break score"
    both = choose_peak([-2, 0, 1], [1.0, 1.0, 1.0], tiebreak=[0.0, 0.5, 0.5])
    assert both["layer"] == 0 and both["decided_by"] == "tie-break score, then lowest layer"
    assert choose_peak([0, 1], [None, None])["layer"] is None and TIE_RULE in flat["rule"]
    assert rank_layers({0: 1.0, 1: 1.0, 2: 0.5, 3: 1.0}, {3: 0.9}) == [3, 0, 1, 2]


def test_judge_agreement_and_kappa():
    from lat_lightning.eval.metrics import judge_agreement

    a = np.array([1, 1, 0, 0, 1, np.nan])
    b = np.array([1, 0, 0, 0, 1, 1])
    out = judge_agreement(a, b)
    assert out["cells"] == 5 and out["agreement"] == pytest.approx(0.8)
    # Cohen's kappa: po = 0.8, pa = 0.6, pb = 0.4, pe = 0.6*0.4 + 0.4*0.6 = 0.48 -> (0.8 - 0.48) / 0.52
    assert out["kappa"] == pytest.approx(0.32 / 0.52)
    assert out["only_a"] == 1 and out["only_b"] == 0
    constant = judge_agreement([1, 1, 1], [1, 1, 1])
    assert constant["agreement"] == 1.0 and constant["kappa"] is None  # undefined, not a fake 1.0
    assert judge_agreement([np.nan], [1])["cells"] == 0


def test_summarise_seeds_lists_every_tied_layer():
    from lat_lightning.eval.metrics import summarise_seeds

    s = np.ones((3, 4, 2))
    s[:, 3, :] = 0
    out = summarise_seeds(s, None, [5, 6, 7, 8], samples=0)
    assert out["pasr_of_mean_lasr_tied_layers"] == [5, 6, 7] and out["pasr_of_mean_lasr_layer"] == 5
