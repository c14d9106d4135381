"""Time and peak memory of one training step per training attack, as ratios to plain SFT.

Model: tiny random Llama, 8 layers, hidden 256; batch 8, sequences of 128 tokens. Variants:
``none`` (SFT), ``asa_random``, ``asagrad``, ``pgd`` (k=5 at layer 4, from the cached
lower layers, gradients on the perturbation only) and ``pgd_naive``: the structure of the public LAT code
(whole model from the embeddings every step, separate toward/away passes, and ``loss.backward()`` so
weight gradients are computed in every attack backward). The naive variant exists only here, as a
baseline. ``sft`` is a plain SFT step (one forward-backward) and ``lat`` issue 16's targeted-LAT step (PGD
k=5 at layer 4, toward + away attack; defence toward + away + utility, full fine-tuning); beside it the
benchmark measures the **floor** of that work from its unavoidable pieces (:func:`floor_parts`:
3 defence forward-backward passes + 5 attack steps over the blocks above the layer without weight gradients
+ the lower blocks once + the optimiser step) and reports the step as a ratio to SFT and to that floor.
Runs are interleaved (variant order rotates each round) and the median of ``--repeats`` is reported.
Peak memory: on CUDA ``max_memory_allocated`` above the memory held before the step; on CPU a fresh
subprocess per variant runs a warm-up step (so optimiser state and caches exist), then one step, and reports
peak RSS minus the RSS before that step (large tensors are mmap-allocated and returned to the OS when freed,
so this tracks the step's transient memory; approximate).

Usage: ``python -m benchmarks.step_cost [--repeats 7] [--threads 1]``. Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import cast

import torch
from omegaconf import DictConfig, OmegaConf

from lat_lightning.attacks.base import Perturbation
from lat_lightning.attacks.positions import position_mask
from lat_lightning.config import ModelConfig, RunConfig
from lat_lightning.losses import causal_lm_loss, log_one_minus_p_loss
from lat_lightning.models.layers import vocab_size
from lat_lightning.models.loading import load_model, load_tokenizer
from lat_lightning.models.tiny_factory import build_tiny_model
from lat_lightning.stages.fit_setup import build_module

VARIANTS = ("none", "asa_random", "asagrad", "pgd", "pgd_naive", "sft", "lat")
STEPS = 5
LAYER = 4


def make_batch(vocab: int, bsz: int = 8, seq: int = 128, prompt: int = 64, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for prefix in ("safe", "harmful", "benign"):
        ids = torch.randint(10, vocab, (bsz, seq), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = -100
        batch.update(
            {f"{prefix}_input_ids": ids, f"{prefix}_attention_mask": torch.ones_like(ids), f"{prefix}_labels": labels}
        )
    batch["harmful_input_ids"][:, :prompt] = batch["safe_input_ids"][:, :prompt]
    batch["prompt_lengths"] = torch.full((bsz,), prompt)
    return batch


def make_module(model, variant: str):
    """``sft``: plain SFT (CE toward the safe response, one forward-backward). ``lat``: issue 16's targeted-LAT
    step (PGD k=5 at layer 4, toward + away attack; defence toward + away + utility: three forward-backward
    passes). The others: toward + away defence under each attack (``none`` = no attack)."""
    strategy = {"pgd_naive": "pgd", "sft": "none", "lat": "pgd"}.get(variant, variant)
    loss = {"toward_safe": 0.5, "away_from_harmful": 0.5, "utility": 0.0}
    if variant == "sft":
        loss = {"toward_safe": 1.0, "away_from_harmful": 0.0, "utility": 0.0}
    elif variant == "lat":
        loss = {"toward_safe": 0.5, "away_from_harmful": 0.5, "utility": 1.0}
    cfg = cast(
        DictConfig,
        OmegaConf.merge(
            OmegaConf.structured(RunConfig),
            {
                "perturbation": {
                    "attack": strategy,
                    "layers": [LAYER],
                    "steps": STEPS,
                    "eps": 6.0,
                    "lr": 1e-3,
                    "toward_harmful": 0.5,
                    "away_from_safe": 0.5,
                    "positions": "prompt",
                },
                "loss": loss,
            },
        ),
    )
    return build_module(cfg, model)


# ------------------------------------------------------------------------- the floor of the LAT step's work
def floor_parts(module, batch, opt) -> dict[str, float]:
    """Times of the pieces the LAT step cannot do without, each measured once (call repeatedly, take medians):

    * ``fb_full``: one forward-backward of the whole model with weight gradients on the 8 x 128 batch (the
      defence does three: toward, away, utility; plain SFT one);
    * ``attack_step``: one PGD step's unavoidable work: forward of the blocks above the attacked layer and the
      LM head on the stacked harmful + safe sequences (16 x 128) from a cached ``h[l]``, backward to the
      perturbation only (no weight gradients);
    * ``lower``: the blocks up to the attacked layer once, no grad (the cache);
    * ``opt``: the AdamW step over all weights.
    """
    from lat_lightning.attacks.forward import cache_lower, perturbed_logits, stack_sequences

    model, attack = module.model, module.attack
    out = {}
    t0 = time.perf_counter()
    logits = model(
        input_ids=batch["safe_input_ids"], attention_mask=batch["safe_attention_mask"], use_cache=False
    ).logits
    causal_lm_loss(logits, batch["safe_labels"]).backward()
    out["fb_full"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out["opt"] = time.perf_counter() - t0
    inputs = stack_sequences(batch, ("harmful", "safe"))
    mask = position_mask("prompt", batch["prompt_lengths"], inputs.input_ids.shape[1]).float()
    t0 = time.perf_counter()
    cached = cache_lower(model, inputs, LAYER)
    out["lower"] = time.perf_counter() - t0
    delta = torch.zeros(
        inputs.input_ids.shape[0] // 2, inputs.input_ids.shape[1], model.config.hidden_size, requires_grad=True
    )
    t0 = time.perf_counter()
    logits = perturbed_logits(model, inputs, Perturbation({LAYER: delta}, mask, normalise=False), cached, LAYER)
    torch.autograd.grad(attack.attack_loss(logits, inputs), [delta])
    out["attack_step"] = time.perf_counter() - t0
    return out


def floor_seconds(parts: dict[str, float], defence_passes: int = 3, steps: int = STEPS) -> float:
    return defence_passes * parts["fb_full"] + steps * parts["attack_step"] + parts["lower"] + parts["opt"]


def naive_pgd(module, batch) -> Perturbation:
    """The public LAT structure: full model, separate toward/away passes, weight grads each step."""
    model, cfg = module.model, module.attack.settings
    bsz, seq = batch["harmful_input_ids"].shape
    d = model.config.hidden_size
    mask = position_mask("prompt", batch["prompt_lengths"], seq).float()
    delta = torch.zeros(bsz, seq, d, requires_grad=True)
    opt = torch.optim.AdamW([delta], lr=cfg.lr)
    for _ in range(cfg.steps):
        opt.zero_grad()
        pert = Perturbation({LAYER: delta}, mask, normalise=False)
        with pert.applied(model):
            out = model(input_ids=batch["harmful_input_ids"], attention_mask=batch["harmful_attention_mask"])
            (cfg.toward_harmful * causal_lm_loss(out.logits, batch["harmful_labels"])).backward()
            out = model(input_ids=batch["safe_input_ids"], attention_mask=batch["safe_attention_mask"])
            (cfg.away_from_safe * log_one_minus_p_loss(out.logits, batch["safe_labels"])).backward()
        opt.step()
        with torch.no_grad():
            delta.mul_(mask[..., None])
            norm = delta.norm(dim=-1, keepdim=True)
            delta.mul_(torch.clamp(cfg.eps / (norm + 1e-12), max=1.0))
        model.zero_grad(set_to_none=True)
    return Perturbation({LAYER: delta.detach()}, mask.bool(), normalise=False)


def one_step(module, batch, opt, variant: str) -> None:
    pert = naive_pgd(module, batch) if variant == "pgd_naive" else module.run_attack(batch)
    terms = module.defence_losses(batch, pert)
    torch.stack(list(terms.values())).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def memory_child(model_dir: str, variant: str, threads: int) -> None:
    """Subprocess entry: print the transient peak RSS (MB) of one training step of ``variant``."""
    import resource

    torch.set_num_threads(threads)
    model = load_model(ModelConfig(name_or_path=model_dir), train=True)
    module = make_module(model, variant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = vocab_size(model)
    assert vocab is not None
    batch = make_batch(vocab)
    one_step(module, batch, opt, variant)  # warm-up: optimiser state, allocator caches
    before = _rss_kb()
    one_step(module, batch, opt, variant)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(max(0, peak - before) / 1024)


def peak_memory_mb(module, batch, opt, variant: str, model_dir: str, threads: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_step(module, batch, opt, variant)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.step_cost",
            "--memory-child",
            variant,
            "--model-dir",
            model_dir,
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.model_dir, args.memory_child, args.threads)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = tempfile.TemporaryDirectory()
    path = str(build_tiny_model("llama", tmp.name, num_layers=8, hidden=256, heads=8, intermediate=688))
    base = load_model(ModelConfig(name_or_path=path), train=True).to(device)
    vocab = len(load_tokenizer(ModelConfig(name_or_path=path)))
    batch = {k: v.to(device) for k, v in make_batch(vocab).items()}
    modules, opts = {}, {}
    for v in VARIANTS:
        model = copy.deepcopy(base)
        modules[v] = make_module(model, v)
        opts[v] = torch.optim.AdamW(model.parameters(), lr=1e-5)
        one_step(modules[v], batch, opts[v], v)  # warm-up
    floor_module = make_module(copy.deepcopy(base), "lat")
    floor_opt = torch.optim.AdamW(floor_module.model.parameters(), lr=1e-5)
    floor_parts(floor_module, batch, floor_opt)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    parts: dict[str, list[float]] = {}
    for r in range(args.repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for v in order + ("floor",):
            if device == "cuda":
                torch.cuda.synchronize()
            if v == "floor":
                for k, t in floor_parts(floor_module, batch, floor_opt).items():
                    parts.setdefault(k, []).append(t)
                continue
            t0 = time.perf_counter()
            one_step(modules[v], batch, opts[v], v)
            if device == "cuda":
                torch.cuda.synchronize()
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    part_med = {k: statistics.median(v) for k, v in parts.items()}
    floor = floor_seconds(part_med)
    mem = {v: peak_memory_mb(modules[v], batch, opts[v], v, path, args.threads) for v in VARIANTS}
    tmp.cleanup()
    result = {
        "device": device,
        "threads": args.threads,
        "repeats": args.repeats,
        "batch": 8,
        "seq": 128,
        "layers": 8,
        "hidden": 256,
        "median_step_s": {v: round(t, 4) for v, t in med.items()},
        "time_ratio_to_sft": {v: round(med[v] / med["none"], 3) for v in VARIANTS},
        "pgd_speedup_vs_naive": round(med["pgd_naive"] / med["pgd"], 3),
        "lat": {
            "step_s": round(med["lat"], 4),
            "floor_s": round(floor, 4),
            "floor_parts_s": {k: round(v, 5) for k, v in part_med.items()},
            "floor_formula": f"3 fb_full + {STEPS} attack_step + lower + opt",
            "ratio_to_sft": round(med["lat"] / med["sft"], 3),
            "floor_ratio_to_sft": round(floor / med["sft"], 3),
            "ratio_to_floor": round(med["lat"] / floor, 3),
        },
        "peak_mem_mb": {v: round(m, 1) for v, m in mem.items()},
        "peak_mem_ratio_to_sft": {v: round(mem[v] / mem["none"], 3) if mem["none"] > 0 else None for v in VARIANTS},
        "targets": {
            "gaussian_time_ratio_max": 1.10,
            "pgd_speedup_min": 1.5,
            "peak_mem_ratio_max": 1.3,
            "lat_ratio_to_floor_max": 1.05,
        },
    }
    result["met"] = {
        "gaussian": result["time_ratio_to_sft"]["asa_random"] <= 1.10,
        "pgd_speedup": result["pgd_speedup_vs_naive"] >= 1.5,
        "peak_mem": all(
            r is not None and r <= 1.3
            for k, r in result["peak_mem_ratio_to_sft"].items()
            if k not in ("pgd_naive", "sft", "lat")
        ),
        "lat_floor": result["lat"]["ratio_to_floor"] <= 1.05,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
