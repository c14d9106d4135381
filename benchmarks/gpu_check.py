"""Prepared GPU check: training-step throughput, MFU and peak memory on a Llama-3.1-8B-shaped model, scan
throughput, and FSDP2 / QLoRA smoke steps. No download (random weights, a locally trained tokenizer).

    python -m benchmarks.gpu_check            # one H100/H200 (sized to finish well inside 8 min)
    python -m benchmarks.gpu_check --tiny     # the same code on the CPU with a tiny Llama (< 1 min; make test)

Sections (each one measured on the same model, in one process):

* ``steps``: one training step of the framework's module (``LatentAdversarialModule``: attack, defence losses,
  backward, AdamW) for ``sft`` (no attack), ``lapt`` (``asa_random`` at one layer on the response tokens),
  ``asagrad_at`` (``asagrad`` at one layer) and ``lat`` (``pgd``, k=16 at 4 layers, LoRA r=64 on
  q/k/v/o/up/down, toward/away 0.5). Per variant: median step time over ``--repeats`` steps after a warm-up,
  tokens/s (the defence tokens of a step), the FLOPs actually executed in one step (counted with
  ``torch.utils.flop_counter.FlopCounterMode``: matmuls and attention, forward and backward), model FLOPs
  utilisation = FLOPs / time / the chip's bf16 dense peak (CUDA only), and peak memory
  (``torch.cuda.max_memory_allocated``; CPU: not measured).
* ``scan``: ``run_scan`` with ASA random over every layer (cells/s, cells = prompts × layers + clean rows).
* ``fsdp2``: two fit steps through the fit driver with ``trainer.strategy=fsdp2`` on one device.
* ``qlora``: the model saved and re-loaded 4-bit (bitsandbytes NF4) with LoRA, one training step.

The final line is ``RESULT {json}``. A section that fails records its error instead of stopping the check; the
process exits 1 when any section failed, so ``--tiny`` in the test suite cannot rot silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import torch

# Dense bf16 peak of common chips in TFLOP/s (no sparsity), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "H800": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "B200": 2250.0,
}


@dataclass
class Shape:
    """The model and the work sizes of one mode of the check."""

    config: dict[str, Any]
    dtype: torch.dtype
    device: str
    batch: int  # sequences per training step
    prompt_len: int  # prompt tokens per sequence
    response_len: int  # response tokens per sequence
    lapt_layer: int
    lat_layers: list[int]
    lat_steps: int
    lora_r: int
    scan_prompts: int
    scan_new_tokens: int
    scan_batch: int
    smoke_layers: int  # decoder layers of the (smaller) FSDP2 / QLoRA smoke model
    repeats: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


def llama3_8b(repeats: int) -> Shape:
    """Llama-3.1-8B's shape (32 layers, 4096 wide, GQA 32/8, 128k vocabulary), bf16 on CUDA."""
    cfg = dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return Shape(
        cfg,
        torch.bfloat16,
        "cuda",
        batch=4,
        prompt_len=256,
        response_len=256,
        lapt_layer=16,
        lat_layers=[8, 16, 24, 30],
        lat_steps=16,
        lora_r=64,
        scan_prompts=32,
        scan_new_tokens=50,
        scan_batch=128,
        smoke_layers=2,
        repeats=repeats,
    )


def tiny(repeats: int) -> Shape:
    """A 4-layer, 64-wide Llama in fp32 on the CPU: the same code paths in seconds."""
    cfg = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return Shape(
        cfg,
        torch.float32,
        "cpu",
        batch=2,
        prompt_len=16,
        response_len=16,
        lapt_layer=2,
        lat_layers=[1, 3],
        lat_steps=2,
        lora_r=4,
        scan_prompts=4,
        scan_new_tokens=8,
        scan_batch=64,
        smoke_layers=2,
        repeats=repeats,
    )


def peak_tflops(override: float | None) -> float | None:
    """The bf16 dense peak of this CUDA device (``None`` on the CPU or an unknown chip without ``override``)."""
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value
    return None


# ------------------------------------------------------------------------------------------------ the model
def build_model(shape: Shape, num_layers: int | None = None):
    """A random-weight Llama of ``shape`` (optionally fewer layers) on the device, in the shape's dtype."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = dict(shape.config, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    torch.manual_seed(0)
    with torch.device(shape.device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=shape.dtype)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


def make_batch(shape: Shape, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training-contract batch: ``safe_*``, ``harmful_*`` (same prompt), ``prompt_lengths``, ``index``."""
    gen = torch.Generator().manual_seed(seed)
    b, p, r, vocab = shape.batch, shape.prompt_len, shape.response_len, shape.config["vocab_size"]
    prompt = torch.randint(3, vocab, (b, p), generator=gen)
    batch: dict[str, torch.Tensor] = {}
    for prefix in ("safe", "harmful"):
        ids = torch.cat([prompt, torch.randint(3, vocab, (b, r), generator=gen)], dim=1)
        labels = ids.clone()
        labels[:, :p] = -100
        batch.update(
            {f"{prefix}_input_ids": ids, f"{prefix}_attention_mask": torch.ones_like(ids), f"{prefix}_labels": labels}
        )
    batch["prompt_lengths"] = torch.full((b,), p)
    batch["index"] = torch.arange(b)
    batch["layer"] = torch.full((b,), -1)
    return {k: v.to(shape.device) for k, v in batch.items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ training steps
VARIANTS = ("sft", "lapt", "asagrad_at", "lat")


def build_variant(model, shape: Shape, variant: str):
    """The framework's training module for ``variant`` (LoRA wraps the model for ``lat``)."""
    from lat_lightning.attacks import build_attack
    from lat_lightning.config import LoraConfig, LossConfig, ModelConfig, PerturbationConfig
    from lat_lightning.models.loading import apply_lora
    from lat_lightning.training.module import LatentAdversarialModule, OptimSettings

    optim = OptimSettings(max_steps=1000, lr=1e-5, warmup_ratio=0.0, scheduler="constant")
    if variant == "sft":
        return LatentAdversarialModule(model, build_attack("none"), [], LossConfig(), optim)
    if variant == "lapt":
        attack = build_attack("asa_random", PerturbationConfig(positions="response"))
        return LatentAdversarialModule(model, attack, [shape.lapt_layer], LossConfig(), optim)
    if variant == "asagrad_at":
        attack = build_attack("asagrad", PerturbationConfig(positions="response"))
        return LatentAdversarialModule(model, attack, [shape.lapt_layer], LossConfig(), optim)
    lora = LoraConfig(
        enabled=True,
        r=shape.lora_r,
        alpha=2 * shape.lora_r,
        dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    )
    wrapped = apply_lora(model, ModelConfig(lora=lora))
    attack = build_attack(
        "pgd",
        PerturbationConfig(
            steps=shape.lat_steps, eps=6.0, lr=1e-3, positions="prompt", toward_harmful=0.5, away_from_safe=0.5
        ),
    )
    return LatentAdversarialModule(
        wrapped, attack, shape.lat_layers, LossConfig(toward_safe=0.5, away_from_harmful=0.5), optim
    )


def train_step(module, batch, opt) -> None:
    """One manual-optimisation step: attack, defence losses, backward, optimiser step."""
    perturbation = module.run_attack(batch)
    terms = module.defence_losses(batch, perturbation)
    torch.stack(list(terms.values())).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (tiny and 8B numbers both stay readable)."""
    return float(f"{x:.{digits}g}")


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs executed by ``fn`` (matmuls, convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure_variant(shape: Shape, variant: str, peak: float | None) -> dict[str, Any]:
    """Step time, tokens/s, FLOPs, MFU and peak memory of one variant on a fresh model."""
    model = build_model(shape)
    model.train()
    module = build_variant(model, shape, variant)
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    batch = make_batch(shape)
    train_step(module, batch, opt)  # warm-up: optimiser state, kernels, allocator
    _sync(shape.device)
    if shape.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(shape.repeats):
        t0 = time.perf_counter()
        train_step(module, batch, opt)
        _sync(shape.device)
        times.append(time.perf_counter() - t0)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if shape.device == "cuda" else None
    flops = count_flops(functools.partial(train_step, module, batch, opt))
    step_s = statistics.median(times)
    tokens = shape.batch * (shape.prompt_len + shape.response_len)
    out = {
        "step_s": _sig(step_s),
        "tokens_per_s": _sig(tokens / step_s),
        "tflops_per_step": _sig(flops / 1e12),
        "achieved_tflops": _sig(flops / step_s / 1e12),
        "mfu": _sig(flops / step_s / 1e12 / peak) if peak else None,
        "peak_mem_gib": round(peak_mem, 2) if peak_mem is not None else None,
        "trainable_params": sum(p.numel() for p in params),
    }
    del module, model, opt, batch
    gc.collect()
    if shape.device == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ scan
def measure_scan(shape: Shape) -> dict[str, Any]:
    """ASA random over every layer of ``scan_prompts`` prompts: cells/s of the framework's scan."""
    from lat_lightning.config import RunConfig
    from lat_lightning.eval.judges import KeywordJudge
    from lat_lightning.eval.scan import JudgeSettings, ScanOptions, ScanPrompts, run_scan
    from lat_lightning.models.tiny_factory import build_tokenizer
    from lat_lightning.stages.settings import scan_settings

    tokenizer = build_tokenizer(vocab_size=min(384, shape.config["vocab_size"]))
    model = build_model(shape).eval()
    prompts = [
        f"Question {i}: how would one open the vault number {i} without the key?" for i in range(shape.scan_prompts)
    ]
    layers = list(range(shape.config["num_hidden_layers"]))
    # A default run's scan (ASA random, seed 0) at this shape's length and batch, without intervals or exports.
    base = scan_settings(RunConfig(), attacks=["asa_random"], layers=layers, seeds=[0], probes=False)
    settings = dataclasses.replace(
        base,
        judging=JudgeSettings({"keyword": KeywordJudge()}),
        bootstrap_samples=0,
        asabench_test_fraction=None,
        generation=dataclasses.replace(
            base.generation, max_new_tokens=shape.scan_new_tokens, batch_size=shape.scan_batch
        ),
    )
    _sync(shape.device)
    t0 = time.perf_counter()
    result = run_scan(
        model,
        tokenizer,
        ScanPrompts(prompts),
        settings,
        None,
        ScanOptions(progress=False, figures=False, tensorboard=False),
    )
    _sync(shape.device)
    seconds = time.perf_counter() - t0
    cells = len(result.records)
    del model
    return {
        "prompts": len(prompts),
        "layers": len(layers),
        "new_tokens": shape.scan_new_tokens,
        "cells": cells,
        "seconds": round(seconds, 2),
        "cells_per_s": round(cells / seconds, 2),
    }


# ------------------------------------------------------------------------------------------------ smoke tests
def smoke_fsdp2(shape: Shape, work: Path) -> dict[str, Any]:
    """Two fit steps with ``trainer.strategy=fsdp2`` on one device, through the fit driver."""
    from omegaconf import DictConfig, OmegaConf

    from lat_lightning.config import RunConfig
    from lat_lightning.models.tiny_factory import build_tokenizer
    from lat_lightning.stages.fit_setup import fit

    model_dir = work / "fsdp2_model"
    tokenizer = build_tokenizer(vocab_size=min(384, shape.config["vocab_size"]))
    small = build_model(shape, num_layers=shape.smoke_layers)
    small.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del small
    cfg = cast(
        DictConfig,
        OmegaConf.merge(
            OmegaConf.structured(RunConfig),
            {
                "model": {
                    "name_or_path": str(model_dir),
                    "dtype": "bfloat16" if shape.dtype == torch.bfloat16 else "float32",
                },
                "data": {
                    "harmful": "pkg://lat_lightning/resources/tiny_harmful.jsonl",
                    "batch_size": 2,
                    "max_length": 128,
                    "truncation": "right",
                },
                "perturbation": {"attack": "asa_random", "layers": [0]},
                "trainer": {
                    "max_steps": 2,
                    "strategy": "fsdp2",
                    "devices": 1,
                    "accelerator": "gpu" if shape.device == "cuda" else "cpu",
                    "log_every_n_steps": 1,
                },
                "logging": {"tensorboard": False},
            },
        ),
    )
    from lat_lightning.resources import resource_path

    cfg.data.harmful = resource_path(cfg.data.harmful)
    t0 = time.perf_counter()
    module = fit(cfg, work / "fsdp2_run")
    return {
        "ok": int(module.trainer_ref.global_step) == 2,
        "global_step": int(module.trainer_ref.global_step),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def smoke_qlora(shape: Shape, work: Path) -> dict[str, Any]:
    """The smoke model re-loaded 4-bit (NF4, bitsandbytes) with LoRA; one training step."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"ok": False, "skipped": "bitsandbytes is not installed (pip install 'lat-lightning[quant]')"}
    from lat_lightning.config import LoraConfig, ModelConfig, QuantizationConfig
    from lat_lightning.models.loading import load_model

    model_dir = work / "qlora_model"
    build_model(shape, num_layers=shape.smoke_layers).save_pretrained(model_dir)
    compute = "bfloat16" if shape.dtype == torch.bfloat16 else "float32"
    mcfg = ModelConfig(
        name_or_path=str(model_dir),
        dtype=compute,
        lora=LoraConfig(
            enabled=True, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
        quantization=QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute),
    )
    t0 = time.perf_counter()
    model = load_model(mcfg, train=True)
    if shape.device == "cuda" and next(model.parameters()).device.type != "cuda":
        model = model.to("cuda")
    small_shape = Shape(**{**shape.__dict__, "lapt_layer": 0, "lat_layers": [0]})
    module = build_variant(model, small_shape, "sft")
    params = [p for p in module.model.parameters() if p.requires_grad]
    before = {id(p): p.detach().clone() for p in params}
    opt = torch.optim.AdamW(params, lr=1e-3)
    train_step(module, make_batch(small_shape), opt)
    changed = sum(not torch.equal(before[id(p)], p.detach()) for p in params)
    quantised = sum("4bit" in type(m).__name__.lower() for m in model.modules())
    return {
        "ok": changed > 0 and quantised > 0,
        "lora_tensors_updated": changed,
        "quantised_linears": quantised,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ------------------------------------------------------------------------------------------------ main
def run_section(name: str, fn: Callable[[], dict], result: dict, failures: list[str]) -> None:
    t0 = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as exc:  # noqa: BLE001 - a failed section is reported, the others still run
        traceback.print_exc()
        result[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        failures.append(name)
    print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (the test-suite mode)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak, if the chip is unknown")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: steps,scan,fsdp2,qlora")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --tiny for the CPU self-test", file=sys.stderr)
        return 2
    shape = tiny(args.repeats) if args.tiny else llama3_8b(args.repeats)
    if shape.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_tflops(args.peak_tflops) if shape.device == "cuda" else None
    skip = {s for s in args.skip.split(",") if s}
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "mode": "tiny" if args.tiny else "llama3_8b_shape",
        "device": torch.cuda.get_device_name() if shape.device == "cuda" else "cpu",
        "dtype": str(shape.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "peak_bf16_tflops": peak,
        "model": shape.config,
        "batch": shape.batch,
        "seq": shape.prompt_len + shape.response_len,
        "lat": {"layers": shape.lat_layers, "pgd_steps": shape.lat_steps, "lora_r": shape.lora_r},
    }
    failures: list[str] = []
    if "steps" not in skip:
        steps: dict[str, Any] = {}
        for variant in [v for v in args.variants.split(",") if v]:
            run_section(variant, functools.partial(measure_variant, shape, variant, peak), steps, failures)
        result["steps"] = steps
        if "sft" in steps and "step_s" in steps["sft"]:
            result["time_ratio_to_sft"] = {
                v: round(s["step_s"] / steps["sft"]["step_s"], 2) for v, s in steps.items() if "step_s" in s
            }
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        if "scan" not in skip:
            run_section("scan", lambda: measure_scan(shape), result, failures)
        if "fsdp2" not in skip:
            run_section("fsdp2", lambda: smoke_fsdp2(shape, Path(tmp)), result, failures)
        if "qlora" not in skip:
            run_section("qlora", lambda: smoke_qlora(shape, Path(tmp)), result, failures)
    for name in ("fsdp2", "qlora"):
        if name in result and not result[name].get("ok") and "skipped" not in result[name] and name not in failures:
            failures.append(name)
    result["failed_sections"] = failures
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print("RESULT " + json.dumps(result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
