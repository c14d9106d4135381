"""The coherence check's clean pass alone: from the attacked layer up against every block, on the same answers.

One batched attacked generation (ASA random, every layer of every prompt, states captured), then the coherence
NLLs of its answers with a fresh :class:`~lat_lightning.eval.coherence.CoherenceScorer` each time, from the
captured states and over every block, alternating ``--repeats`` times (medians). Same model loading as
``benchmarks.scan_throughput`` (``--model smollm2``: SmolLM2-135M-Instruct from the PyPI wheel).

Usage: ``python -m benchmarks.coherence_cost [--model smollm2] [--prompts 8] [--max-new-tokens 16]``.
Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.scan_throughput import DEFAULT_MODEL, load, load_prompts
from lat_lightning.eval.coherence import CoherenceScorer, CoherenceSettings
from lat_lightning.eval.generation import AttackPlan, GenerationSettings, RowKeys, encode_prompts, generate_under_attack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    n_layers = model.config.get_text_config().num_hidden_layers
    ids = encode_prompts(tok, load_prompts(args.prompts))
    rows = [i for i in range(len(ids)) for _ in range(n_layers)]
    layers = [l for _ in ids for l in range(n_layers)]
    t0 = time.perf_counter()
    res = generate_under_attack(
        model,
        tok,
        [ids[i] for i in rows],
        layers,
        AttackPlan(kind="noise", alpha=1.0),
        rows=RowKeys(prompt_keys=rows),
        settings=GenerationSettings(max_new_tokens=args.max_new_tokens),
        capture_states=True,
    )
    generation_s = time.perf_counter() - t0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = [ids[i] for i in rows]
    times: dict[str, list[float]] = {"from_layer": [], "full": []}
    nlls: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, on in (("from_layer", True), ("full", False)):
            scorer = CoherenceScorer(model, CoherenceSettings(from_attacked_layer=on), pad, 256)
            t0 = time.perf_counter()
            nlls[name] = scorer.nll(prompts, res.token_ids, res.clean_states, layers)
            times[name].append(time.perf_counter() - t0)
    diffs = [abs(a - b) for a, b in zip(nlls["from_layer"], nlls["full"]) if a is not None and b is not None]
    fast, full = statistics.median(times["from_layer"]), statistics.median(times["full"])
    result = {
        "model": args.model,
        "answers": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "generation_s": round(generation_s, 2),
        "from_layer_s": [round(t, 2) for t in times["from_layer"]],
        "full_s": [round(t, 2) for t in times["full"]],
        "from_layer_over_full": round(fast / full, 3),
        "max_nll_diff": max(diffs, default=0.0),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
