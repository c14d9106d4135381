"""Time and peak memory of one training step per training attack, as ratios to plain SFT.

Model: tiny random Llama, 8 layers, hidden 256; batch 8, sequences of 128 tokens. Variants:
``none`` (SFT), ``asa_random``, ``asagrad``, ``pgd`` (k=5 at layer 4, from the cached
lower layers, gradients on the perturbation only) and ``pgd_naive``: the structure of the public LAT code
(whole model from the embeddings every step, separate toward/away passes, and ``loss.backward()`` so
weight gradients are computed in every attack backward). The naive variant exists only here, as a
baseline. Runs are interleaved (variant order rotates each round) and the median of ``--repeats`` is
reported. Peak memory: on CUDA ``max_memory_allocated`` above the memory held before the step; on CPU a
fresh subprocess per variant runs a warm-up step (so optimiser state and caches exist), then one step,
and reports peak RSS minus the RSS before that step (large tensors are mmap-allocated and returned to
the OS when freed, so this tracks the step's transient memory; approximate).

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

import torch
from omegaconf import OmegaConf

from lat_lightning.attacks.base import Perturbation
from lat_lightning.attacks.positions import position_mask
from lat_lightning.config import ModelConfig, RunConfig
from lat_lightning.losses import causal_lm_loss, log_one_minus_p_loss
from lat_lightning.models.loading import load_model, load_tokenizer
from lat_lightning.testing.tiny_models import build_tiny_model
from lat_lightning.training.fit import build_module

VARIANTS = ("none", "asa_random", "asagrad", "pgd", "pgd_naive")
LAYER = 4


def make_batch(vocab: int, bsz: int = 8, seq: int = 128, prompt: int = 64, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for prefix in ("safe", "harmful"):
        ids = torch.randint(10, vocab, (bsz, seq), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = -100
        batch.update({f"{prefix}_input_ids": ids, f"{prefix}_attention_mask": torch.ones_like(ids),
                      f"{prefix}_labels": labels})
    batch["harmful_input_ids"][:, :prompt] = batch["safe_input_ids"][:, :prompt]
    batch["prompt_lengths"] = torch.full((bsz,), prompt)
    return batch


def make_module(model, variant: str):
    strategy = "pgd" if variant == "pgd_naive" else variant
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {
        "perturbation": {"attack": strategy, "layers": [LAYER], "steps": 5, "eps": 6.0, "lr": 1e-3,
                         "toward_harmful": 0.5, "away_from_safe": 0.5, "positions": "prompt"},
        "loss": {"toward_safe": 0.5, "away_from_harmful": 0.5}})
    return build_module(cfg, model)


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
    batch = make_batch(model.config.vocab_size)
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
    out = subprocess.run([sys.executable, "-m", "benchmarks.step_cost", "--memory-child", variant,
                          "--model-dir", model_dir, "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
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
    times = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            one_step(modules[v], batch, opts[v], v)
            if device == "cuda":
                torch.cuda.synchronize()
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    mem = {v: peak_memory_mb(modules[v], batch, opts[v], v, path, args.threads) for v in VARIANTS}
    tmp.cleanup()
    result = {
        "device": device, "threads": args.threads, "repeats": args.repeats,
        "batch": 8, "seq": 128, "layers": 8, "hidden": 256,
        "median_step_s": {v: round(t, 4) for v, t in med.items()},
        "time_ratio_to_sft": {v: round(med[v] / med["none"], 3) for v in VARIANTS},
        "pgd_speedup_vs_naive": round(med["pgd_naive"] / med["pgd"], 3),
        "peak_mem_mb": {v: round(m, 1) for v, m in mem.items()},
        "peak_mem_ratio_to_sft": {v: round(mem[v] / mem["none"], 3) if mem["none"] > 0 else None for v in VARIANTS},
        "targets": {"gaussian_time_ratio_max": 1.10, "pgd_speedup_min": 1.5, "peak_mem_ratio_max": 1.3},
    }
    result["met"] = {
        "gaussian": result["time_ratio_to_sft"]["asa_random"] <= 1.10,
        "pgd_speedup": result["pgd_speedup_vs_naive"] >= 1.5,
        "peak_mem": all(r is not None and r <= 1.3 for k, r in result["peak_mem_ratio_to_sft"].items()
                        if k != "pgd_naive"),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
