"""Layer-scan throughput: the framework's batched scan vs the reference code's loop, on the same cells.

Model: tiny random Llama, 8 layers, hidden 256 (``tiny:llama:8x256``, built once into the cache); the 8
prompts of ``lat_lightning/resources/tiny_harmful.jsonl``; every layer; ASA random, seed 0; greedy
decoding. Two ways to fill the same prompts x layers success matrix:

(a) **framework**: :func:`lat_lightning.eval.scan.run_scan`: the clean answer of each prompt once, then all
    (prompt, layer) cells as rows of ONE batched, left-padded, KV-cached generation, each row attacked at
    its own layer; results streamed to ``scan.jsonl`` and summarised (bootstrap CIs);
(b) **reference**: the structure of the public ASA code, written here as the baseline only: batch size 1,
    one (prompt, layer) cell at a time, ``model.generate`` for the clean answer AND for the attacked
    answer of every cell (the clean answer is regenerated for each layer), a forward hook on the layer
    that perturbs the last position of the prefill and the one token of every decode call.

Both draw the perturbation with :func:`keyed_normal` keyed by (seed, prompt, layer, position) and normalise
it with Eq. 1, so they must produce the same cells. A random model's gibberish never contains a refusal
marker, so the keyword judge alone would agree trivially; the success matrices are therefore compared
with a judge that can tell cells apart: ``agreement`` is the fraction of cells whose generated token ids
are identical AND whose keyword verdicts agree. Reported too: ``keyword_agreement``, ``token_agreement``,
and a ``changed`` judge (success = the attacked answer differs from that method's own clean answer).

Repetitions are interleaved (framework, reference, framework, ...) after one warm-up of each; the median
wall time is reported. One intra-op thread by default (``--threads``): two threads are slower for these
tiny matmuls when other processes share the CPU.

Usage: ``python -m benchmarks.scan_throughput [--reps 3] [--max-new-tokens 50]``. Last line:
``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lat_lightning.attacks.base import keyed_normal, normalise_to
from lat_lightning.config import ModelConfig
from lat_lightning.data.templating import encode_prompt
from lat_lightning.eval.judges import KeywordJudge
from lat_lightning.eval.scan import run_scan
from lat_lightning.models.hooks import residual_edit
from lat_lightning.models.loading import load_model, load_tokenizer
from lat_lightning.resources import resource_path

MODEL = "tiny:llama:8x256"
DATA = "pkg://lat_lightning/resources/tiny_harmful.jsonl"
SEED = 0


def load_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in Path(resource_path(DATA)).read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows][:n]


# --------------------------------------------------------------------------------- (b) the reference way
def reference_cell(model, prompt_ids: list[int], prompt_idx: int, layer: int, max_new_tokens: int) -> list[int]:
    """One attacked generation at batch size 1, the way the reference code runs it."""
    p_len = len(prompt_ids)
    state = {"calls": 0}

    def edit(_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        pos = p_len - 1 + state["calls"]  # prefill: last prompt token; decode call k: position P - 1 + k
        state["calls"] += 1
        noise = keyed_normal(hidden.shape[-1], SEED, prompt_idx, layer, pos)
        out = hidden.clone()
        out[0, -1] = hidden[0, -1] + normalise_to(noise, hidden[0, -1].float()).to(hidden.dtype)
        return out

    ids = torch.tensor([prompt_ids])
    with torch.no_grad(), residual_edit(model, [layer], edit):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, p_len:].tolist()


def reference_clean(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def run_reference(model, tok, prompts: list[str], layers: list[int], max_new_tokens: int) -> dict:
    judge = KeywordJudge()
    cells = {}
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(tok, prompt)
        for layer in layers:
            clean = reference_clean(model, ids, max_new_tokens)  # regenerated for every layer, as in the reference
            attacked = reference_cell(model, ids, i, layer, max_new_tokens)
            text = tok.decode(attacked, skip_special_tokens=True)
            verdict = judge([prompt], [text])[0]
            cells[(i, layer)] = {"ids": _strip(attacked, tok), "clean": _strip(clean, tok),
                                 "keyword": verdict.success}
    return cells


def _strip(ids: list[int], tok) -> list[int]:
    """New tokens up to and including the first EOS (HF pads finished rows; the framework stops)."""
    eos = tok.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


# --------------------------------------------------------------------------------- (a) the framework
def run_framework(model, tok, prompts: list[str], layers: list[int], max_new_tokens: int, out_dir: Path) -> dict:
    res = run_scan(model, tok, prompts, None, layers, ["asa_random"], [SEED], {"keyword": KeywordJudge()}, out_dir,
                   max_new_tokens=max_new_tokens, batch_size=len(prompts) * len(layers), resume=False, progress=False,
                   figures=False, tensorboard=False, asabench_test_fraction=None)
    cells = {}
    for i in range(len(prompts)):
        clean = res.records[("clean", None, i, -1)]["token_ids"]
        for layer in layers:
            rec = res.records[("asa_random", SEED, i, layer)]
            cells[(i, layer)] = {"ids": rec["token_ids"], "clean": clean,
                                 "keyword": rec["verdicts"]["keyword"]["success"]}
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = ModelConfig(name_or_path=MODEL)
    model, tok = load_model(cfg, train=False), load_tokenizer(cfg)
    layers = list(range(model.config.num_hidden_layers))
    prompts = load_prompts(args.prompts)
    n_cells = len(prompts) * len(layers)

    times = {"framework": [], "reference": []}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        def fw():
            return run_framework(model, tok, prompts, layers, args.max_new_tokens, Path(tmp) / "scan")

        def ref():
            return run_reference(model, tok, prompts, layers, args.max_new_tokens)

        fw()  # warm-up (first-call overheads), untimed
        reference_cell(model, encode_prompt(tok, prompts[0]), 0, 0, 2)
        for rep in range(args.reps):
            for name, fn in (("framework", fw), ("reference", ref)):
                t0 = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t0)
            print(f"rep {rep}: framework {times['framework'][-1]:.2f}s, reference {times['reference'][-1]:.2f}s",
                  flush=True)

    a, b = results["framework"], results["reference"]
    keys = sorted(a)
    same_ids = [a[k]["ids"] == b[k]["ids"] for k in keys]
    same_keyword = [a[k]["keyword"] == b[k]["keyword"] for k in keys]
    changed_a = [a[k]["ids"] != a[k]["clean"] for k in keys]
    changed_b = [b[k]["ids"] != b[k]["clean"] for k in keys]
    same_changed = [x == y for x, y in zip(changed_a, changed_b)]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "cells": n_cells, "prompts": len(prompts), "layers": len(layers), "max_new_tokens": args.max_new_tokens,
        "model": MODEL, "attack": "asa_random", "threads": args.threads, "reps": args.reps,
        "framework_s": round(med["framework"], 3), "reference_s": round(med["reference"], 3),
        "framework_cells_per_s": round(n_cells / med["framework"], 2),
        "reference_cells_per_s": round(n_cells / med["reference"], 2),
        "speedup": round(med["reference"] / med["framework"], 2),
        "agreement": round(sum(x and y for x, y in zip(same_ids, same_keyword)) / n_cells, 4),
        "token_agreement": round(sum(same_ids) / n_cells, 4),
        "keyword_agreement": round(sum(same_keyword) / n_cells, 4),
        "changed_agreement": round(sum(same_changed) / n_cells, 4),
        "changed_success_rate": round(sum(changed_a) / n_cells, 4),
        "keyword_success_rate": round(sum(bool(a[k]["keyword"]) for k in keys) / n_cells, 4),
        "clean_token_agreement": round(sum(a[k]["clean"] == b[k]["clean"] for k in keys) / n_cells, 4),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
