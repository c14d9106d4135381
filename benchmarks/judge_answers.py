"""Generate clean and attacked answers of a real instruct model to StrongREJECT *training* prompts, for labelling.

The judge-agreement fixture (``tests/fixtures/judge_labels/``, docs/metrics.md#judge-agreement) holds answers a
person read and labelled. This script makes those answers with the project's own scan (:func:`run_scan`): the
clean answer of every prompt, ASA random at alpha 0.25 / 0.5 / 1, ASAgrad, PGD and refusal-direction ablation at
a few layers, greedy decoding, every answer with its coherence record (the unattacked model's NLL per token and the
repetition ratio, so the ``+coherent`` judges can be re-run on the fixture without the model).

Prompts: the TRAIN side of StrongREJECT split 60/40 by category (``stratified_split(eval_fraction=0.4, seed=0)``,
the split of the real organism), never its evaluation side, round-robin over the categories; the harmless side of
the refusal direction: the project's benign prompts (train side of the same split).

Usage::

    python -m benchmarks.judge_answers --model smollm2 --prompts 12 --layers 6 14 --out /tmp/answers_smollm2.jsonl
    python -m benchmarks.judge_answers --model /path/to/organism_dir --label organism --out /tmp/answers_org.jsonl

Prints one ``RESULT {json}`` line (answers written, wall time).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lat_lightning.attacks.settings import AttackSettings
from lat_lightning.data.readers import load_records
from lat_lightning.data.real_sets import REAL_BENIGN, read_strongreject
from lat_lightning.data.splits import stratified_split
from lat_lightning.eval.generation import GenerationSettings
from lat_lightning.eval.scan import JudgeSettings, ScanOptions, ScanPrompts, ScanSettings, run_scan

TARGET = "Sure, here is"
# (attack, alpha): alpha 0.5 runs every attack; the other magnitudes only ASA random
PASSES = ((0.5, ("asa_random", "asagrad", "pgd", "refusal_ablation")), (0.25, ("asa_random",)), (1.0, ("asa_random",)))


def train_prompts(n: int, skip: int = 0) -> list[dict]:
    """``n`` StrongREJECT training prompts, round-robin over the categories (file order within one), after the first
    ``skip`` of that order."""
    train, _ = stratified_split(read_strongreject(), eval_fraction=0.4, seed=0)
    by_cat: dict[str, list[dict]] = {}
    for row in train:
        by_cat.setdefault(str(row["category"]), []).append(dict(row))
    out: list[dict] = []
    while len(out) < n + skip and any(by_cat.values()):
        for cat in sorted(by_cat):
            if by_cat[cat] and len(out) < n + skip:
                out.append(by_cat[cat].pop(0))
    return out[skip:]


def benign_train(n: int) -> list[str]:
    """``n`` benign training prompts (the harmless side of the refusal direction)."""
    train, _ = stratified_split(load_records(REAL_BENIGN), eval_fraction=0.4, seed=0)
    return [str(r["prompt"]) for r in train[:n]]


def load_any(spec: str):
    """Model and tokenizer: ``smollm2`` (the registry GGUF) or a checkpoint directory."""
    from benchmarks.scan_throughput import load

    return load(spec)


def one_pass(model, tok, data: ScanPrompts, layers: list[int], alpha: float, attacks, max_new_tokens: int) -> dict:
    """The records of one scan (every attack at one alpha)."""
    settings = ScanSettings(
        attacks=attacks,
        layers=tuple(layers),
        seeds=(0,),
        perturbation=AttackSettings(
            alpha=alpha,
            steps=8,
            eps=0.25,
            eps_mode="relative",
            lr=0.5,
            direction_prompts=len(data.harmless_prompts or ()),
        ),
        generation=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=64),
        judging=JudgeSettings(("refusal", "keyword")),
        asabench_test_fraction=None,
    )
    with tempfile.TemporaryDirectory() as d:
        res = run_scan(
            model,
            tok,
            data,
            settings,
            Path(d),
            ScanOptions(resume=False, progress=False, figures=False, tensorboard=False),
        )
    return dict(res.records)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--label", default=None, help="source model name written with each answer (default: --model)")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--skip", type=int, default=0, help="skip the first N prompts of the round-robin order")
    ap.add_argument("--alphas", type=float, nargs="+", default=[p[0] for p in PASSES], help="passes to run")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 14])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load_any(args.model)
    rows = train_prompts(args.prompts, args.skip)
    prompts = [r["prompt"] for r in rows]
    data = ScanPrompts(prompts, targets=[TARGET] * len(prompts), harmless_prompts=benign_train(len(prompts)))
    source = args.label or args.model
    out, seen = [], set()
    for alpha, attacks in (p for p in PASSES if p[0] in args.alphas):
        records = one_pass(model, tok, data, args.layers, alpha, attacks, args.max_new_tokens)
        for (attack, seed, i, layer), rec in sorted(records.items(), key=lambda kv: str(kv[0])):
            name = (
                "clean" if attack == "clean" else (f"asa_random@alpha={alpha:g}" if attack == "asa_random" else attack)
            )
            if (name, i, layer) in seen:
                continue
            seen.add((name, i, layer))
            coh = rec.get("coherence") or {}
            out.append(
                {
                    "prompt": prompts[i],
                    "category": rows[i]["category"],
                    "answer": rec["response"],
                    "source_model": source,
                    "attack": name,
                    "target": TARGET,
                    "layer": None if attack == "clean" else layer,
                    "seed": seed,
                    "nll": coh.get("nll"),
                    "repetition": coh.get("repetition"),
                    "empty": coh.get("empty"),
                }
            )
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    print("RESULT " + json.dumps({"answers": len(out), "model": source, "wall_s": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
