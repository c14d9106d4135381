"""Wall time of one training step per defence of the comparison, as a ratio to plain refusal SFT.

Model: a tiny random Llama of the default organism's shape (6 blocks, hidden 128, vocabulary 384), full
fine-tuning; batch 8 safety rows of 64 tokens (32 prompt) with their benign rows, as the ``compare_defences``
recipe trains. Each variant is the comparison's own training (:data:`lat_lightning.stages.defences.DEFENCES`,
the recipe's loss weights and PGD knobs, utility CE 1.0 for every defence): one step = the attack (if any), the
defence's loss terms, backward, AdamW step. Every variant has its own copy of the model and optimiser; rounds are
interleaved (the variant order rotates each round) after one warm-up step each, and each variant's time and
ratio to ``sft`` of the same round are reported as medians over ``--repeats`` rounds.

Usage: ``python -m benchmarks.defence_cost [--repeats 7] [--threads 1] [--defences sft,lat,...]``.
Last line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from typing import Optional, cast

import torch
from omegaconf import DictConfig, OmegaConf

from benchmarks.step_cost import make_batch
from lat_lightning.cli import load_config
from lat_lightning.models.layers import vocab_size
from lat_lightning.models.loading import load_model
from lat_lightning.models.settings import ModelSettings
from lat_lightning.models.tiny_factory import build_tiny_model, build_tokenizer
from lat_lightning.stages.defences import DEFENCES, defence_config
from lat_lightning.stages.fit_setup import build_module

LAYER = 3  # the layer the organism's comparison trains at (its ASA-random peak)


def make_module(model, name: str):
    """The training module of defence ``name`` as ``compare_defences`` configures it (layer fixed)."""
    cfg = defence_config(load_config("compare_defences"), name, attack_layers=[LAYER])
    cfg = cast(DictConfig, OmegaConf.merge(cfg, {"callbacks": {"weight_interpolation": {"enabled": False}}}))
    module = build_module(cfg, model)
    module.setup("fit")  # the objective's frozen reference
    opt = module.configure_optimizers()["optimizer"]
    return module, opt


def one_step(module, opt, batch) -> float:
    """Seconds for one defence step: attack, loss terms, backward, optimiser step."""
    t0 = time.perf_counter()
    perturbation = module.run_attack(batch)
    terms = module.defence_losses(batch, perturbation)
    torch.stack(list(terms.values())).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--defences", default=",".join(DEFENCES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.defences.split(",") if n.strip()]
    if "sft" not in names:
        names.insert(0, "sft")
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer()
        path = build_tiny_model("llama", f"{tmp}/m", tokenizer=tok, num_layers=6, hidden=128, heads=4)
        base = load_model(ModelSettings(name_or_path=str(path)), train=True)
    base.train()
    batch = make_batch(int(vocab_size(base) or 384), bsz=8, seq=64, prompt=32)
    batch["benign_prompt_lengths"] = batch["prompt_lengths"].clone()  # refat's harmless side
    runs = {n: make_module(copy.deepcopy(base), n) for n in names}
    for n in names:  # warm-up: optimiser state, allocator, autograd caches
        one_step(runs[n][0], runs[n][1], batch)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        this = {n: one_step(runs[n][0], runs[n][1], batch) for n in order}
        for n in names:
            times[n].append(this[n])
            ratios[n].append(this[n] / this["sft"])
    result = {
        "model": "tiny llama 6x128, vocab 384, full fine-tuning",
        "batch": "8 x 64 tokens (+ 8 benign rows)",
        "threads": args.threads,
        "repeats": args.repeats,
        "seconds_per_step": {n: round(statistics.median(times[n]), 4) for n in names},
        "x_sft": {n: round(statistics.median(ratios[n]), 2) for n in names},
    }
    for n in names:
        print(f"{n:18s} {result['seconds_per_step'][n]:.4f} s/step   {result['x_sft'][n]:.2f} x SFT")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
