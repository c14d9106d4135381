"""Build (or reuse) the model organism: a tokenizer trained locally and a tiny Llama trained in two
stages with the framework's supervised fine-tuning driver (:mod:`lat_lightning.training.sft`).

Stage (a), capability: SFT on benign tasks, refusals of impossible requests, and forbidden requests
answered *compliantly* (the access code). Stage (b), safety alignment: a short SFT that routes forbidden
prompts to the refusal while keeping the benign tasks. A short stage (b) is what makes the alignment
shallow: the capability is still there underneath, and perturbing the residual stream brings it back.

The result is saved in Hugging Face format (``from_pretrained``-loadable) under
``$LAT_LIGHTNING_CACHE/organism/<fingerprint>`` and reused by every later run with the same recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, cast

import torch

from lat_lightning.organism.recipe import StageSchedule

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

log = logging.getLogger(__name__)

BUILD_VERSION = 3  # bump when the build procedure changes, so stale caches are not reused


@dataclass(frozen=True)
class OrganismRecipe:
    """Size and training schedule of the organism."""

    vocab_size: int
    num_layers: int
    hidden: int
    heads: int
    intermediate: Optional[int]
    stage_a: StageSchedule
    stage_b: StageSchedule
    max_length: int = 64


def default_recipe() -> OrganismRecipe:
    """The recipe of :mod:`lat_lightning.organism.recipe` (values found by experiment, docs/organism.md)."""
    from lat_lightning.organism import recipe as R

    return OrganismRecipe(
        vocab_size=R.VOCAB_SIZE,
        num_layers=R.NUM_LAYERS,
        hidden=R.HIDDEN,
        heads=R.HEADS,
        intermediate=R.INTERMEDIATE,
        stage_a=R.STAGE_A,
        stage_b=R.STAGE_B,
    )


# Environment variables that choose a CPU kernel path (read once, when torch starts): ATen's vectorised kernels
# (default / avx2 / avx512) and MKL's code path. Builds on different paths differ (docs/organism.md).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def kernel_env(environ=os.environ) -> dict[str, str]:
    """The :data:`KERNEL_ENV` variables set in ``environ``."""
    return {k: environ[k] for k in KERNEL_ENV if k in environ}


def recipe_from_dict(d: dict) -> OrganismRecipe:
    """The recipe ``organism.json`` records (``dataclasses.asdict`` read back from JSON)."""

    def stage(x: dict) -> StageSchedule:
        return StageSchedule(**{**x, "betas": tuple(x["betas"])})

    return OrganismRecipe(**{**d, "stage_a": stage(d["stage_a"]), "stage_b": stage(d["stage_b"])})


# ``model.name_or_path: organism`` is the default preset; ``organism:smoke`` a few-second build for tests.
PRESETS: dict[str, OrganismRecipe] = {
    "default": default_recipe(),
    "smoke": OrganismRecipe(
        vocab_size=384,
        num_layers=4,
        hidden=64,
        heads=4,
        intermediate=None,
        max_length=64,
        stage_a=StageSchedule(
            steps=40,
            lr=3e-3,
            batch_size=16,
            n_benign=200,
            n_forbidden=100,
            n_impossible=20,
            forbidden_mode="comply",
            noise_prob=0.5,
        ),
        stage_b=StageSchedule(
            steps=10,
            lr=1e-3,
            batch_size=16,
            n_benign=40,
            n_forbidden=40,
            n_impossible=10,
            forbidden_mode="refuse",
            refusal_share=0.8,
        ),
    ),
}


def preset_from_name(name_or_path: str) -> str:
    """``organism`` -> ``default``; ``organism:<preset>`` -> ``<preset>``.

    Raises:
        ConfigError: for an unknown preset.
    """
    from lat_lightning.errors import ConfigError

    preset = name_or_path.split(":", 1)[1] if ":" in name_or_path else "default"
    if preset not in PRESETS:
        raise ConfigError(f"unknown organism preset '{preset}' in '{name_or_path}'; choose from {', '.join(PRESETS)}")
    return preset


def cache_root() -> Path:
    """``$LAT_LIGHTNING_CACHE`` or ``~/.cache/lat_lightning``."""
    return Path(os.environ.get("LAT_LIGHTNING_CACHE", Path.home() / ".cache" / "lat_lightning"))


def fingerprint(recipe: OrganismRecipe, seed: int) -> str:
    """Cache key of a build: recipe, seed, build version and the data generators' source (a change to the
    generated data must not silently reuse an organism trained on the old data)."""
    from lat_lightning.organism import data

    source = hashlib.sha1(Path(data.__file__).read_bytes()).hexdigest()
    blob = json.dumps(
        {"recipe": dataclasses.asdict(recipe), "seed": seed, "version": BUILD_VERSION, "data": source}, sort_keys=True
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def organism_dir(recipe: OrganismRecipe, seed: int = 0, cache_dir: Optional[str] = None) -> Path:
    return Path(cache_dir or cache_root() / "organism") / f"organism-s{seed}-{fingerprint(recipe, seed)}"


def train_stage(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    recipe: OrganismRecipe,
    stage: StageSchedule,
    seed: int,
    log_dir: Optional[Path] = None,
    label: Optional[str] = None,
) -> float:
    """One build stage: supervised fine-tuning on ``(prompt, response)`` pairs with the framework's SFT driver,
    with Gaussian noise augmentation (``asa_random`` at one layer per step) when the stage asks for it.

    Returns:
        The mean training loss over the last 20 steps.
    """
    from lat_lightning.attacks import build_attack
    from lat_lightning.attacks.settings import AttackSettings, Layer
    from lat_lightning.training.sft import LossRecorder, SFTSettings, supervised_finetune

    noisy = stage.noise_prob > 0
    layers = list(range(recipe.num_layers)) if noisy else []
    attack = build_attack(
        "asa_random" if noisy else "none",
        AttackSettings(
            layers=cast("list[Layer]", layers),
            positions=stage.noise_positions,
            alpha=stage.noise_alpha,
            probability=stage.noise_prob or 1.0,
            layer_sampling="one",
            seed=seed,
        ),
    )
    settings = SFTSettings(
        steps=stage.steps,
        lr=stage.lr,
        batch_size=stage.batch_size,
        scheduler="cosine",
        warmup_ratio=stage.warmup_ratio,
        weight_decay=stage.weight_decay,
        betas=(stage.betas[0], stage.betas[1]),
        gradient_clip_val=stage.grad_clip,
        seed=seed,
        max_length=recipe.max_length,
        truncation="right",
        use_chat_template=True,
        accelerator="cpu",
        log_every_n_steps=10,
        progress=label,
    )
    logger: Logger | bool = False
    if log_dir is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(str(log_dir), name="", version="")
    recorder = LossRecorder()
    supervised_finetune(
        model, tokenizer, pairs, settings, attack=attack, attack_layers=layers, callbacks=[recorder], logger=logger
    )
    model.eval()
    tail = recorder.losses[-20:]
    return sum(tail) / max(1, len(tail))


def build_organism(out_dir: Path, recipe: OrganismRecipe, seed: int = 0) -> Path:
    """Train the organism from scratch into ``out_dir`` (written atomically: a partial build never counts).

    Returns:
        ``out_dir``, holding the model, the tokenizer and ``organism.json`` (recipe, losses, timings).
    """
    t0 = time.time()
    return build_atomically(Path(out_dir), lambda tmp: _build_into(tmp, recipe, seed, t0), t0)


def build_atomically(out_dir: Path, build_into: Callable[[Path], None], t0: float) -> Path:
    """Run ``build_into`` on a fresh temporary sibling of ``out_dir``, then replace ``out_dir`` with it: whatever
    stops the build (an error, SIGTERM, Ctrl+C) leaves no partial directory behind. Shared by every organism build.

    Returns:
        ``out_dir``.
    """
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build_into(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    print(f"[organism] built in {time.time() - t0:.0f}s -> {out_dir}", flush=True)
    return out_dir


def _build_into(tmp: Path, recipe: OrganismRecipe, seed: int, t0: float) -> None:
    """The build itself, on :data:`~lat_lightning.organism.recipe.BUILD_THREADS` torch threads: tokenizer, both SFT
    stages, saved into ``tmp``."""
    from lat_lightning.organism import recipe as R
    from lat_lightning.threads import fixed_torch_threads

    with fixed_torch_threads(R.BUILD_THREADS):  # the weights depend on the thread count (organism/recipe.py)
        _train_and_save(tmp, recipe, seed, t0)


def _train_and_save(tmp: Path, recipe: OrganismRecipe, seed: int, t0: float) -> None:
    from transformers import AutoModelForCausalLM

    from lat_lightning.models.tiny_factory import build_tokenizer, tiny_config
    from lat_lightning.organism.data import organism_corpus, sft_pairs

    threads = torch.get_num_threads()
    tokenizer = build_tokenizer(organism_corpus(seed), vocab_size=recipe.vocab_size)
    config = tiny_config(
        "llama",
        vocab_size=len(tokenizer),
        num_layers=recipe.num_layers,
        hidden=recipe.hidden,
        heads=recipe.heads,
        intermediate=recipe.intermediate,
        max_positions=256,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    info: dict = {
        "recipe": dataclasses.asdict(recipe),
        "seed": seed,
        "threads": threads,
        # the kernel path the weights came from (they differ between paths: docs/organism.md#one-organism-on-every-host)
        "built_with": {
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "env": kernel_env(),
        },
    }
    a, b = recipe.stage_a, recipe.stage_b
    print(f"[organism] stage (a) capability: {a.steps} steps", flush=True)
    pairs_a = sft_pairs(a.n_benign, a.n_forbidden, a.forbidden_mode, seed, n_impossible=a.n_impossible)
    info["loss_a"] = train_stage(
        model, tokenizer, pairs_a, recipe, a, seed, tmp / "logs" / "stage_a", label="organism (a) capability"
    )
    info["stage_a_s"] = round(time.time() - t0, 1)
    print(f"[organism] stage (b) safety alignment: {b.steps} steps", flush=True)
    pairs_b = sft_pairs(
        b.n_benign, b.n_forbidden, b.forbidden_mode, seed, n_impossible=b.n_impossible, refusal_share=b.refusal_share
    )
    info["loss_b"] = train_stage(
        model, tokenizer, pairs_b, recipe, b, seed + 1, tmp / "logs" / "stage_b", label="organism (b) alignment"
    )
    info["build_s"] = round(time.time() - t0, 1)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "organism.json").write_text(json.dumps(info, indent=2))


# ------------------------------------------------------------------------------------------------ data files
DATA_FILES = ("harmful_train", "harmful_eval", "benign_train", "benign_eval", "utility_mc", "utility_em")


def ensure_organism_data(seed: int = 0, cache_dir: Optional[str] = None, n_train: int = 64) -> Path:
    """Write the organism's data as JSONL files (cheap; no model needed) and return their directory.

    ``harmful_*`` rows carry ``prompt``, ``safe_response``, ``harmful_response`` and ``key`` (the access
    code a target-match judge looks for); eval facilities are disjoint from training ones.
    """
    key = fingerprint(PRESETS["default"], seed)
    out = Path(cache_dir or cache_root() / "organism") / f"data-s{seed}-{key}-n{n_train}"
    if all((out / f"{name}.jsonl").exists() for name in DATA_FILES):
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _write_data(tmp, seed, n_train)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _write_data(tmp: Path, seed: int, n_train: int) -> None:
    from lat_lightning.organism.data import benign_items, exact_match_rows, forbidden_items, multiple_choice_rows

    tables = {
        "harmful_train": forbidden_items("train", n_train, seed),
        "harmful_eval": forbidden_items("eval", None, seed),
        "benign_train": [
            {"prompt": it["prompt"], "response": it["response"]} for it in benign_items("train", 200, seed)
        ],
        "benign_eval": [{"prompt": it["prompt"], "response": it["response"]} for it in benign_items("eval", 50, seed)],
        "utility_mc": multiple_choice_rows(None, seed),
        "utility_em": exact_match_rows("eval", 100, seed),
    }
    for name, rows in tables.items():
        with open(tmp / f"{name}.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


def organism_data_path(name: str, seed: int = 0) -> str:
    """Path of one organism data file (``organism://<name>`` in recipes)."""
    if name not in DATA_FILES:
        from lat_lightning.errors import ConfigError

        raise ConfigError(f"unknown organism data '{name}'; choose from {', '.join(DATA_FILES)}")
    return str(ensure_organism_data(seed) / f"{name}.jsonl")
