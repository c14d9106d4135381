"""Bad input and faults, as a hostile user would try them against the command line.

The catalogue (:data:`CATALOGUE`, listed in ``docs/errors.md``) runs each case in-process through
``lat_lightning.cli.main`` and asserts the exit status, ONE ``error:`` line on stderr that names the key or file,
no traceback, and that nothing was written: no run directory, no cache entry (``$LAT_LIGHTNING_CACHE`` points at an
empty folder: the organism and ``tiny:`` models are described from their recipes, never built, by the checks).

The fault tests send a real SIGTERM to this process while the organism is being built, while a scan runs and while
the durability suite fine-tunes, and check exit status 143, the line saying what was saved and how to resume, that
no temporary folder is left, and that resuming finishes the run. One test runs ``train.py`` for real to prove the
process exit codes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from lat_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = ["--recipe", "lat_tiny", "trainer.max_steps=1", "perturbation.steps=1", "logging.tensorboard=false"]


class _CurrentStderr:
    """A stream that always writes to whatever ``sys.stderr`` is now."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def library_log_handlers_follow_capsys(capsys):
    """Library log handlers (lightning, transformers) keep the stderr of the test that imported them, closed
    since; make them write to the current one so this test's capsys sees them."""
    import logging

    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    saved = {
        h: h.stream
        for lg in loggers
        for h in lg.handlers
        if type(h) is logging.StreamHandler and h.stream is not sys.__stdout__
    }
    for h in saved:
        h.stream = _CurrentStderr()  # not setStream(): it flushes the old, possibly closed, stream
    yield
    for h, stream in saved.items():
        h.stream = stream


def fail(capsys, argv, fragment: str, code: int = 2) -> str:
    """Run main(argv); check the exit status and that stderr ends with one error line containing fragment."""
    status = main(list(argv))
    err = capsys.readouterr().err
    assert status == code, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, last
    return last


def no_run_dir(root: Path) -> bool:
    return not any(root.rglob("config.yaml"))


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ================================================================================================= catalogue
@dataclass(frozen=True)
class Case:
    """One bad input: ``args`` after ``--recipe recipe logging.root_dir=<tmp>`` (``{files}``: a folder of helper
    files, ``{runs}``: the run root); ``names``: what the error line must contain (the key or file)."""

    id: str
    args: tuple[str, ...]
    names: str
    recipe: str = "lat_tiny"
    setup: Optional[str] = (
        None  # "previous_run": a run of lat_tiny exists; "no_bitsandbytes"; "unusable_cache"; "corrupt_checkpoint"
    )


def C(id, *args, names, recipe="lat_tiny", setup=None):  # noqa: N802 - reads like a table row
    return Case(id, tuple(args), names, recipe, setup)


SCAN, DUR, CMP = "asa_scan_tiny", "durability_tiny", "compare_defences"

CATALOGUE: list[Case] = [
    # --- the command line
    C("unknown-recipe", names="lat_tinyy", recipe="lat_tinyy"),
    C("recipe-given-twice", "--recipe", "asa_scan_tiny", names="--recipe given twice"),
    C("resume-given-twice", "--resume", "last", "--resume", "last", names="--resume given twice"),
    C("recipe-not-a-mapping", names="list.yaml", recipe="{files}/list.yaml"),
    C("recipe-bad-yaml", names="bad.yaml", recipe="{files}/bad.yaml"),
    C("unknown-key", "trainer.max_stepz=3", names="trainer.max_steps"),
    C("wrong-type", "trainer.max_steps=lots", names="trainer.max_steps"),
    C("broken-list-override", "perturbation.layers=[1,", names="perturbation.layers"),
    C("override-without-key", "=3", names="=3"),
    C("value-for-a-section", "trainer=3", names="'trainer'"),
    C("renamed-key", "perturbation.strategy=pgd", names="perturbation.attack"),
    C("invalid-choice", "trainer.scheduler=cosin", names="trainer.scheduler"),
    C("unknown-attack", "perturbation.attack=fgsm", names="perturbation.attack"),
    C("unknown-stage", "stages=[fitt]", names="'stages'"),
    C("invalid-precision", "trainer.precision=17", names="trainer.precision"),
    C("invalid-bnb-dtype", "model.quantization.bnb_4bit_compute_dtype=int3", names="bnb_4bit_compute_dtype"),
    # --- degenerate values: refused with the valid range
    C("max-steps-0", "trainer.max_steps=0", names="trainer.max_steps must be >= 1"),
    C("stages-empty", "stages=[]", names="stages is empty"),
    C("stages-repeated", "stages=[fit,fit]", names="stages lists fit more than once"),
    C("max-new-tokens-0", "evaluation.max_new_tokens=0", names="evaluation.max_new_tokens must be >= 1", recipe=SCAN),
    C(
        "max-new-tokens-beyond-context",
        "evaluation.max_new_tokens=1000000",
        names="evaluation.max_new_tokens=1000000 does not fit the context of model.name_or_path=tiny:llama (512",
        recipe=SCAN,
    ),
    C("seeds-empty", "evaluation.seeds=[]", names="evaluation.seeds is empty", recipe=SCAN),
    C("seeds-repeated", "evaluation.seeds=[0,0]", names="evaluation.seeds lists 0 more than once", recipe=SCAN),
    C("scan-layers-empty", "evaluation.layers=[]", names="evaluation.layers is empty", recipe=SCAN),
    C("alpha-negative", "perturbation.alpha=-1", names="perturbation.alpha must be > 0"),
    C("alpha-zero", "perturbation.alpha=0", names="perturbation.alpha must be > 0"),
    C("eps-zero", "perturbation.eps=0", names="perturbation.eps must be > 0"),
    C("eps-negative", "perturbation.eps=-1.5", names="perturbation.eps must be > 0"),
    C("eps-infinite", "perturbation.eps=.inf", names="perturbation.eps must be a finite number"),
    C("attack-lr-zero", "perturbation.lr=0", names="perturbation.lr must be > 0"),
    C("lr-negative", "trainer.lr=-1", names="trainer.lr must be > 0"),
    C("lr-nan", "trainer.lr=.nan", names="trainer.lr must be > 0"),
    C("pgd-steps-0", "perturbation.steps=0", names="perturbation.steps must be >= 1"),
    C("scan-pgd-steps-0", "perturbation.steps=0", names="perturbation.steps must be >= 1", recipe=SCAN),
    C("layer-negative", "perturbation.layers=[-1]", names="perturbation.layers: -1 is not a layer"),
    C("probability-0", "perturbation.probability=0", names="perturbation.probability must be in (0, 1]"),
    C(
        "test-fraction-1.5",
        "evaluation.split_test_fraction=1.5",
        names="evaluation.split_test_fraction must be in [0, 1)",
        recipe=SCAN,
    ),
    C("test-fraction-1", "evaluation.split_test_fraction=1.0", names="evaluation.split_test_fraction", recipe=SCAN),
    C("temperature-0", "evaluation.temperature=0", names="evaluation.temperature must be > 0", recipe=SCAN),
    C("num-prompts-0", "evaluation.num_prompts=0", names="evaluation.num_prompts must be >= 1", recipe=SCAN),
    C("validation-prompts-0", "evaluation.validation_prompts=0", names="evaluation.validation_prompts must be >= 1"),
    C("over-refusal-judge", "evaluation.over_refusal_judge=target_match", names="evaluation.over_refusal_judge"),
    C("lora-r-0", "model.lora.r=0", names="model.lora.r must be >= 1"),
    C("lora-dropout-1", "model.lora.dropout=1.0", names="model.lora.dropout must be in [0, 1)"),
    C("batch-size-0", "data.batch_size=0", names="data.batch_size must be >= 1"),
    C("max-length-0", "data.max_length=0", names="data.max_length must be >= 1"),
    C("accumulate-0", "trainer.accumulate_grad_batches=0", names="trainer.accumulate_grad_batches must be >= 1"),
    C("warmup-ratio-1", "trainer.warmup_ratio=1.0", names="trainer.warmup_ratio must be in [0, 1)"),
    C("grad-clip-negative", "trainer.gradient_clip_val=-1", names="trainer.gradient_clip_val must be >= 0"),
    C("betas-one-value", "trainer.betas=[0.9]", names="trainer.betas must hold two values"),
    C("betas-out-of-range", "trainer.betas=[0.9,1.5]", names="every entry of trainer.betas must be in [0, 1)"),
    C("logp-floor-0", "loss.away_logp_floor=0", names="loss.away_logp_floor must be < 0"),
    C(
        "lambdas-out-of-range",
        "callbacks.weight_interpolation.lambdas=[0.5,1.5]",
        names="callbacks.weight_interpolation.lambdas",
    ),
    C(
        "durability-seeds-empty",
        "evaluation.durability.random_seeds=[]",
        names="evaluation.durability.random_seeds is empty",
        recipe=DUR,
    ),
    C(
        "durability-max-k-0",
        "evaluation.durability.max_k=0",
        names="evaluation.durability.max_k must be >= 1",
        recipe=DUR,
    ),
    C(
        "durability-finetune-seeds-empty",
        "evaluation.durability.finetune_seeds=[]",
        names="evaluation.durability.finetune_seeds is empty",
        recipe=DUR,
    ),
    C(
        "durability-finetune-seed-negative",
        "evaluation.durability.finetune_seeds=[0,-1]",
        names="every entry of evaluation.durability.finetune_seeds must be >= 0",
        recipe=DUR,
    ),
    C(
        "durability-eval-every-0",
        "evaluation.durability.finetune_eval_every=0",
        names="evaluation.durability.finetune_eval_every must be >= 1",
        recipe=DUR,
    ),
    C(
        "durability-break-rate-0",
        "evaluation.durability.finetune_break_rate=0",
        names="evaluation.durability.finetune_break_rate must be in (0, 1]",
        recipe=DUR,
    ),
    C(
        "durability-break-rate-above-1",
        "evaluation.durability.finetune_break_rate=1.5",
        names="evaluation.durability.finetune_break_rate must be in (0, 1]",
        recipe=DUR,
    ),
    C("organism-seed-negative", "organism.seed=-1", names="organism.seed must be >= 0", recipe="default"),
    C("organism-seed-not-an-integer", "organism.seed=1.5", names="organism.seed", recipe="default"),
    # --- a stage without what it needs, settings that contradict each other
    C("interpolate-without-fit", "stages=[interpolate]", names="stage 'interpolate'"),
    C("rescan-without-fit", "stages=[rescan]", names="stage 'rescan'"),
    C("report-without-scan", "stages=[report]", names="stage 'report'"),
    C("durability-without-hardened-model", "stages=[durability]", names="evaluation.compare_path"),
    C("evaluate-without-data", "stages=[evaluate]", names="data.eval_harmful"),
    C("scan-without-prompts", "data.harmful=null", names="data.harmful", recipe=SCAN),
    C("fit-without-data", "data.harmful=null", names="data.harmful"),
    C(
        "primary-judge-not-a-judge",
        "evaluation.judges=[keyword]",
        "evaluation.primary_judge=target_match",
        names="evaluation.primary_judge",
        recipe=SCAN,
    ),
    C(
        "primary-judge-ontopic-of-unlisted",
        "evaluation.judges=[keyword]",
        "evaluation.primary_judge=refusal+ontopic",
        names="evaluation.primary_judge 'refusal+ontopic' is not in evaluation.judges",
        recipe=SCAN,
    ),
    C(
        "primary-judge-coherent-ontopic-without-check",
        "evaluation.primary_judge=keyword+coherent+ontopic",
        "evaluation.coherence.enabled=false",
        names="evaluation.coherence.enabled=true",
        recipe=SCAN,
    ),
    C("unknown-judge", "evaluation.judges=[keywrod]", names="evaluation.judges", recipe=SCAN),
    C("unknown-qualified-judge", "evaluation.judges=[keyword,refusl+ontopic]", names="'refusal'", recipe=SCAN),
    C(
        "listed-coherent-judge-without-check",
        "evaluation.judges=[keyword,keyword+coherent+ontopic]",
        "evaluation.coherence.enabled=false",
        names="evaluation.judges 'keyword+coherent+ontopic' reads the coherence check",
        recipe=SCAN,
    ),
    C(
        "classifier-without-path",
        "evaluation.judges=[keyword,classifier]",
        names="evaluation.classifier_path",
        recipe=SCAN,
    ),
    C(
        "qualified-classifier-without-path",
        "evaluation.judges=[keyword,classifier+ontopic]",
        names="evaluation.classifier_path",
        recipe=SCAN,
    ),
    C("bad-key-regex", "evaluation.target_key_pattern=(", names="evaluation.target_key_pattern", recipe=SCAN),
    C("training-positions-in-scan", "evaluation.positions=response", names="evaluation.positions", recipe=SCAN),
    C("nothing-to-train", "loss.toward_safe=0", "loss.away_from_harmful=0", names="loss.toward_safe"),
    C("utility-loss-without-benign", "loss.utility=1.0", "data.benign=null", names="data.benign"),
    C(
        "objective-with-training-attack",
        "perturbation.attack=pgd",
        names="loss.objective=circuit_breakers replaces the training attack",
        recipe="circuit_breakers_tiny",
    ),
    C("fragile-explicit-without-layers", "callbacks.fragile_layers.enabled=true", names="callbacks.fragile_layers"),
    C(
        "interpolation-without-utility-data",
        "callbacks.weight_interpolation.enabled=true",
        names="evaluation.utility_data",
    ),
    C("attack-without-layers", "perturbation.layers=[]", names="perturbation.layers is empty"),
    C(
        "pgd-with-no-loss",
        "perturbation.toward_harmful=0",
        "perturbation.away_from_safe=0",
        names="perturbation.toward_harmful",
    ),
    C(
        "asagrad-without-targets",
        "evaluation.attacks=[asagrad]",
        "data.harmful={files}/prompts_only.jsonl",
        names="prompts_only.jsonl",
        recipe=SCAN,
    ),
    C(
        "4bit-without-lora",
        "model.quantization.load_in_4bit=true",
        "model.lora.enabled=false",
        names="model.quantization.load_in_4bit",
    ),
    C(
        "8bit-without-lora",
        "model.quantization.load_in_8bit=true",
        "model.lora.enabled=false",
        names="model.quantization.load_in_8bit",
    ),
    C(
        "4bit-and-8bit",
        "model.quantization.load_in_4bit=true",
        "model.quantization.load_in_8bit=true",
        names="load_in_4bit / load_in_8bit",
    ),
    C(
        "quantisation-without-bitsandbytes",
        "model.quantization.load_in_4bit=true",
        names="lat-lightning[quant]",
        setup="no_bitsandbytes",
    ),
    C("unknown-strategy", "trainer.strategy=deepspeed", names="trainer.strategy"),
    C("fsdp1-on-cpu", "trainer.strategy=fsdp", names="trainer.strategy=fsdp2"),
    C(
        "early-stop-under-fsdp2",
        "trainer.strategy=fsdp2",
        "perturbation.early_stop_loss=0.1",
        names="perturbation.early_stop_loss",
    ),
    C("devices-above-cores", "trainer.accelerator=cpu", "trainer.devices=4096", names="trainer.devices=4096"),
    C("gpu-without-cuda", "trainer.accelerator=gpu", names="trainer.accelerator=gpu"),
    C(
        "unknown-durability-section",
        "evaluation.durability.sections=[rescan,nope]",
        names="evaluation.durability.sections",
        recipe=DUR,
    ),
    C(
        "unknown-rewrite",
        "evaluation.durability.rewrites=[pig_latin]",
        names="evaluation.durability.rewrites",
        recipe=DUR,
    ),
    C(
        "compare-unknown-defence",
        "compare.defences=[sft,lapd]",
        names="unknown defence 'lapd' in compare.defences",
        recipe=CMP,
    ),
    C(
        "compare-override-unlisted-defence",
        "compare.defences=[sft]",
        "compare.overrides.lat.perturbation.steps=4",
        names="compare.overrides.lat",
        recipe=CMP,
    ),
    C(
        "compare-override-shared-section",
        "compare.overrides.lat.model.lora.r=4",
        names="compare.overrides.lat.model",
        recipe=CMP,
    ),
    C(
        "compare-override-unknown-key",
        "compare.overrides.lat.perturbation.stepz=4",
        names="compare.overrides.lat.perturbation.stepz",
        recipe=CMP,
    ),
    C(
        "compare-override-bad-choice",
        "compare.overrides.lat.perturbation.norm=l3",
        names="perturbation.norm",
        recipe=CMP,
    ),
    C(
        "compare-override-bad-positions",
        "compare.overrides.lapt.perturbation.positions=bogus",
        names="perturbation.positions",
        recipe=CMP,
    ),
    C(
        "compare-override-out-of-range",
        "compare.overrides.lat.trainer.max_steps=0",
        names="trainer.max_steps",
        recipe=CMP,
    ),
    C("compare-utility-without-benign", "data.benign=null", names="compare.defences 'sft': loss.utility", recipe=CMP),
    C(
        "compare-refat-without-benign",
        "data.benign=null",
        "loss.utility=0",
        names="compare.defences 'refat'",
        recipe=CMP,
    ),
    C("compare-prefill-zero", "compare.prefill_tokens=[0]", names="compare.prefill_tokens", recipe=CMP),
    C("compare-unknown-embed-attack", "compare.embed_attacks=[pgdd]", names="compare.embed_attacks", recipe=CMP),
    # --- settings checked against the model's config.json (nothing is built)
    C(
        "layer-out-of-range",
        "perturbation.layers=[1,9]",
        names="perturbation.layers index 9 out of range: this model has layers 0..3",
    ),
    C("scan-layer-out-of-range", "evaluation.layers=[4]", names="evaluation.layers index 4", recipe=SCAN),
    C(
        "organism-layer-out-of-range",
        "model.name_or_path=organism:smoke",
        "evaluation.layers=[4]",
        names="evaluation.layers index 4",
        recipe=SCAN,
    ),
    C(
        "fragile-layer-out-of-range",
        "callbacks.fragile_layers.enabled=true",
        "callbacks.fragile_layers.layers=[7]",
        names="callbacks.fragile_layers.layers index 7",
    ),
    C("lora-target-not-in-model", "model.lora.target_modules=[q_proj,qkv]", names="model.lora.target_modules: 'qkv'"),
    C("lora-layer-out-of-range", "model.lora.layers_to_transform=[9]", names="model.lora.layers_to_transform"),
    C(
        "durability-fragile-out-of-range",
        "evaluation.durability.fragile_layers=[5]",
        names="evaluation.durability.fragile_layers index 5",
        recipe=DUR,
    ),
    C(
        "durability-layer-out-of-range",
        "evaluation.durability.layers=[2,9]",
        names="evaluation.durability.layers index 9",
        recipe=DUR,
    ),
    C(
        "durability-layer-not-a-layer",
        "evaluation.durability.layers=[-3]",
        names="evaluation.durability.layers",
        recipe=DUR,
    ),
    C(
        "durability-finetune-data-without-responses",
        "evaluation.durability.finetune_data=pkg://lat_lightning/resources/harmful_prompts.txt",
        names="evaluation.durability.finetune_data",
        recipe=DUR,
    ),
    C(
        "durability-lora-target-not-in-model",
        "evaluation.durability.finetune_target_modules=[c_attn]",
        names="evaluation.durability.finetune_target_modules",
        recipe=DUR,
    ),
    C(
        "hardened-model-other-depth",
        "stages=[durability]",
        "evaluation.compare_path=tiny:llama:2x64",
        names="evaluation.compare_path",
        recipe=DUR,
    ),
    C("bad-tiny-name", "model.name_or_path=tiny:llama:0x64", names="tiny:llama:0x64"),
    C("unknown-tiny-architecture", "model.name_or_path=tiny:bert", names="tiny architecture 'bert'"),
    C("unknown-organism-preset", "model.name_or_path=organism:huge", names="organism:huge", recipe=SCAN),
    C("unknown-organism-data", "data.harmful=organism://nope", names="data.harmful", recipe=SCAN),
    C("model-path-missing", "model.name_or_path={files}/no_such_model", names="model.name_or_path"),
    C(
        "scan-model-path-missing",
        "evaluation.model_path={files}/no_such_model",
        names="evaluation.model_path",
        recipe=SCAN,
    ),
    # --- files and run directories
    C("data-file-missing", "data.harmful={files}/nope.jsonl", names="nope.jsonl"),
    C("data-file-empty", "data.harmful={files}/empty.jsonl", names="empty.jsonl"),
    C("data-columns-missing", "data.harmful={files}/cols.jsonl", names="data.harmful_columns.prompt"),
    C("data-file-not-json", "data.harmful={files}/broken.jsonl", names="broken.jsonl line 1"),
    C("benign-file-missing", "data.benign={files}/nope_benign.jsonl", names="nope_benign.jsonl"),
    C("data-pip-name-unpinned", "data.harmful=pip://some-data/some_data/x.csv", names="pip://<package>==<version>"),
    C("scan-data-file-empty", "data.harmful={files}/empty.jsonl", names="empty.jsonl", recipe=SCAN),
    C(
        "utility-file-malformed",
        "stages=[evaluate]",
        "evaluation.utility_data={files}/mc_bad.jsonl",
        names="mc_bad.jsonl",
        recipe=SCAN,
    ),
    C(
        "hub-model-offline",
        "model.name_or_path=nobody/not-a-downloaded-model",
        names="model.name_or_path=nobody/not-a-downloaded-model is not a local path and not in the Hugging Face cache",
    ),
    C("root-dir-is-a-file", "logging.root_dir={files}/a_file", names="logging.root_dir"),
    C(
        "root-dir-not-creatable",
        "logging.root_dir=/proc/lat_lightning_runs",
        names="cannot create a directory in '/proc'",
    ),
    C("cache-not-creatable", names="LAT_LIGHTNING_CACHE '/proc/lat_lightning_cache'", setup="unusable_cache"),
    C("version-escapes-the-root", "logging.version=../../x", names="logging.version"),
    C("name-with-a-slash", "logging.name=a/b", names="logging.name"),
    C("version-exists", "logging.version=version_0", names="already exists", setup="previous_run"),
    C("resume-nothing", "--resume", "last", names="--resume last: no earlier run"),
    C("resume-corrupt-checkpoint", "--resume", "last", names="last.ckpt cannot be read", setup="corrupt_checkpoint"),
    C("resume-path-missing", "--resume", "{runs}/nowhere", names="nowhere"),
    C(
        "resume-changed-config",
        "--resume",
        "last",
        "perturbation.eps=1.0",
        "model.lora.r=4",
        names="model.lora.r: 8 -> 4; perturbation.eps: 2.0 -> 1.0",
        setup="previous_run",
    ),
    C(
        "resume-fewer-steps",
        "--resume",
        "last",
        "trainer.max_steps=1",
        names="trainer.max_steps: 4 -> 1",
        setup="previous_run",
    ),
    C(
        "resume-other-strategy",
        "--resume",
        "last",
        "trainer.strategy=ddp",
        names="trainer.strategy",
        setup="previous_run",
    ),
    C(
        "resume-other-organism-seed",
        "--resume",
        "last",
        "organism.seed=1",
        names="organism.seed: 0 -> 1",
        setup="previous_run",
    ),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_input_files")
    (d / "empty.jsonl").write_text("")
    (d / "broken.jsonl").write_text("{not json\n")
    (d / "a_file").write_text("not a directory")
    (d / "list.yaml").write_text("# a list, not a mapping\n- fit\n- scan\n")
    (d / "bad.yaml").write_text("stages: [fit\n")
    jsonl(d / "cols.jsonl", [{"request": "How?", "answer": "Like this."}])
    jsonl(d / "prompts_only.jsonl", [{"prompt": "Tell me the secret recipe."}, {"prompt": "Open the vault."}])
    jsonl(d / "mc_bad.jsonl", [{"question": "Where is milk kept?", "answerKey": "B"}])
    return d


def test_catalogue_is_large_and_unique():
    ids = [c.id for c in CATALOGUE]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


def test_docs_list_every_case():
    """docs/errors.md has one table row per case, in the same order."""
    text = (REPO / "docs" / "errors.md").read_text()
    table = text.split("| case | input | exit | the error line |", 1)[1]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines() if line.startswith("| `")]
    assert rows == [c.id for c in CATALOGUE]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input(case, capsys, tmp_path, monkeypatch, files):
    if case.id == "gpu-without-cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: trainer.accelerator=gpu is valid here")
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(cache))
    if case.setup == "previous_run":
        from lat_lightning.cli import load_config
        from lat_lightning.rundir import create_run_dir, mark_stage_done

        run = create_run_dir(load_config("lat_tiny", [f"logging.root_dir={runs}"]), "lat_tiny")
        mark_stage_done(run, "fit", {})
    if case.setup == "corrupt_checkpoint":  # a run whose fit stopped, with its last.ckpt overwritten
        from lat_lightning.cli import load_config
        from lat_lightning.rundir import create_run_dir

        run = create_run_dir(load_config("lat_tiny", [f"logging.root_dir={runs}"]), "lat_tiny")
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint, a few stray bytes" * 10)
    if case.setup == "unusable_cache":  # /proc takes no new directories, whoever asks (root included)
        monkeypatch.setenv("LAT_LIGHTNING_CACHE", "/proc/lat_lightning_cache")
    if case.setup == "no_bitsandbytes":
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
        )
    before_runs, before_cache = snapshot(runs), snapshot(cache)
    argv = [
        "--recipe",
        case.recipe.format(files=files),
        f"logging.root_dir={runs}",
        *(a.format(files=files, runs=runs) for a in case.args),
    ]
    fail(capsys, argv, case.names.format(files=files))
    assert snapshot(runs) == before_runs, "a run directory or file was written"
    assert snapshot(cache) == before_cache, "a cache entry was written"


# ================================================================================= failures inside a stage
def test_data_errors_found_while_encoding_leave_no_run_directory(capsys, tmp_path, tiny_llama_dir):
    """Sequence lengths need the tokenizer, so the fit finds them; the run directory it claimed (holding only its
    config, run.log and an empty TensorBoard file) is removed."""
    fail(
        capsys,
        [
            "--recipe",
            "lat_tiny",
            f"logging.root_dir={tmp_path}",
            f"model.name_or_path={tiny_llama_dir}",
            "data.max_length=8",
        ],
        "> data.max_length=8",
    )
    assert snapshot(tmp_path) == ["lat_tiny"]


@pytest.fixture(scope="module")
def no_template_model(tmp_path_factory):
    from lat_lightning.models.tiny_factory import build_tiny_model, build_tokenizer

    return build_tiny_model(
        "llama", tmp_path_factory.mktemp("no_template"), tokenizer=build_tokenizer(chat_template=False)
    )


def test_tokenizer_without_chat_template_errors_when_required(capsys, tmp_path, no_template_model):
    fail(
        capsys,
        [
            *RECIPE,
            f"logging.root_dir={tmp_path}",
            f"model.name_or_path={no_template_model}",
            "model.require_chat_template=true",
        ],
        "has no chat template but model.require_chat_template",
    )
    assert no_run_dir(tmp_path)


def test_tokenizer_without_chat_template_falls_back_with_a_warning(no_template_model, caplog):
    from lat_lightning.config import ModelConfig
    from lat_lightning.models.loading import load_tokenizer

    with caplog.at_level("WARNING"):
        tok = load_tokenizer(ModelConfig(name_or_path=str(no_template_model)))
    assert tok is not None and "prompts are formatted as plain text" in caplog.text


def test_nan_loss_stops_with_a_checkpoint(capsys, tmp_path):
    last = fail(
        capsys,
        [
            *RECIPE,
            f"logging.root_dir={tmp_path}",
            "perturbation.attack=asa_random",
            "perturbation.alpha=1e30",
            "perturbation.positions=all",
        ],
        "loss is not finite at step 0",
    )
    ckpt = tmp_path / "lat_tiny" / "version_0" / "checkpoints" / "diverged.ckpt"
    assert ckpt.exists() and str(ckpt) in last and "lower trainer.lr or perturbation.eps/alpha" in last
    assert torch.load(ckpt, weights_only=False)["state_dict"]


def test_existing_run_directory_is_never_overwritten(capsys, tmp_path):
    from lat_lightning.cli import load_config
    from lat_lightning.rundir import create_run_dir

    cfg = load_config("lat_tiny", [f"logging.root_dir={tmp_path}"])
    first = create_run_dir(cfg, "lat_tiny")
    (first / "results.json").write_text("precious")
    assert create_run_dir(cfg, "lat_tiny") == first.parent / "version_1"  # a new version, not the old one
    fail(
        capsys,
        [*RECIPE, f"logging.root_dir={tmp_path}", "logging.version=version_0"],
        "already exists; pick another logging.version or use --resume",
    )
    assert (first / "results.json").read_text() == "precious"


def test_version_claims_are_exclusive(tmp_path):
    """Runs started in the same instant each get their own version directory (exclusive mkdir, then retry)."""
    from concurrent.futures import ThreadPoolExecutor

    from lat_lightning.cli import load_config
    from lat_lightning.rundir import create_run_dir

    cfg = load_config("lat_tiny", [f"logging.root_dir={tmp_path}"])
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: create_run_dir(cfg, "lat_tiny"), range(16)))
    assert len(set(dirs)) == 16 and sorted(d.name for d in dirs) == sorted(f"version_{i}" for i in range(16))


# ==================================================================================== the console and run.log
def test_known_warnings_stay_off_the_console_and_go_to_run_log(tmp_path, capsys):
    """Third-party noise (KNOWN_NOISE) is kept out of the console but written to run.log; other warnings are
    shown as before."""
    import logging
    import warnings

    from lat_lightning.runlog import run_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []  # as in a plain process: no handler on the root logger
    try:
        with run_logging() as runlog:
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'."
            )
            logging.getLogger("transformers.utils.generic").warning(
                "`past_key_values`/`cache_params` are deprecated. Use `cache` instead."
            )
            with warnings.catch_warnings():  # shown even if an earlier test triggered it (the once-registry)
                warnings.simplefilter("always")
                warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
            logging.getLogger("lat_lightning.test").warning("a warning that matters")
            runlog.attach(tmp_path)
            logging.getLogger("lat_lightning.test").info("an info line for the file only")
    finally:
        root.handlers, root.level = handlers, level
    err = capsys.readouterr().err
    assert "a warning that matters" in err
    assert "gemm_4bit_forward" not in err and "past_key_values" not in err and "is_gradient_checkpointing" not in err
    text = (tmp_path / "run.log").read_text()
    for line in (
        "gemm_4bit_forward",
        "past_key_values",
        "is_gradient_checkpointing",
        "a warning that matters",
        "an info line for the file only",
    ):
        assert line in text, line


# ====================================================================================== faults: SIGTERM
def _signal_at(monkeypatch, owner, name: str, at: int, signum=signal.SIGTERM):
    """Send ``signum`` to this process on the ``at``-th call of ``owner.name`` (counted from 0), before it runs."""
    real = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        if len(calls) == at:
            os.kill(os.getpid(), signum)
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def _leftovers(*roots: Path) -> list[str]:
    return [str(p) for root in roots if root.exists() for p in root.rglob("*") if ".tmp" in p.name]


def test_sigterm_while_building_the_organism(capsys, tmp_path, monkeypatch):
    """SIGTERM inside the organism's Lightning SFT: exit 143, nothing saved, no organism-*.tmp<pid> left."""
    from lat_lightning.training.sft import LossRecorder

    cache, runs = tmp_path / "cache", tmp_path / "runs"
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(cache))
    before = signal.getsignal(signal.SIGTERM)
    calls = _signal_at(monkeypatch, LossRecorder, "on_train_batch_end", at=3)
    last = fail(
        capsys,
        [
            "--recipe",
            SCAN,
            f"logging.root_dir={runs}",
            "model.name_or_path=organism:smoke",
            "stages=[organism,scan]",
            "evaluation.attacks=[asa_random]",
            "evaluation.max_new_tokens=2",
        ],
        "stopped by SIGTERM while building the organism",
        code=143,
    )
    assert len(calls) < 20, "Lightning must stop at the batch after the signal"
    assert "nothing was saved" in last and "partial organism build was removed" in last
    assert _leftovers(cache, runs) == [] and not list(cache.rglob("organism-s*")) and no_run_dir(runs)
    assert signal.getsignal(signal.SIGTERM) == before  # the run's handlers are gone


def _scan_records(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "scan.jsonl").read_text().splitlines()]
    return {(r["attack"], r["seed"], r["prompt_idx"], r["layer"]): r["token_ids"] for r in rows}


SCAN_ARGS = [
    "evaluation.attacks=[asa_random,pgd]",
    "evaluation.seeds=[0,1]",
    "evaluation.max_new_tokens=4",
    "evaluation.batch_size=8",
    "evaluation.num_prompts=4",
    "perturbation.steps=2",
    "evaluation.bootstrap_samples=0",
    "logging.tensorboard=false",
]


def test_sigterm_during_a_scan_then_resume_gives_the_same_records(capsys, tmp_path, monkeypatch):
    import lat_lightning.eval.scan.cells as scan_lib  # the module whose generation calls are counted

    full = tmp_path / "full"
    assert main(["--recipe", SCAN, f"logging.root_dir={full}", *SCAN_ARGS]) == 0
    expected = _scan_records(full / SCAN / "version_0")

    runs = tmp_path / "runs"
    argv = ["--recipe", SCAN, f"logging.root_dir={runs}", *SCAN_ARGS]
    capsys.readouterr()
    with monkeypatch.context() as m:
        _signal_at(m, scan_lib, "generate_under_attack", at=3)
        last = fail(capsys, argv, "stopped by SIGTERM during stage 'scan'", code=143)
    run = runs / SCAN / "version_0"
    saved = len((run / "scan.jsonl").read_text().splitlines())
    assert 0 < saved < len(expected) and f"{saved} finished cells in scan.jsonl" in last
    assert last.endswith(f"continue with --resume {run}") and not (run / "stages" / "scan.done.json").exists()
    assert main([*argv, "--resume", "last"]) == 0
    assert _scan_records(run) == expected  # the resumed scan keeps the saved cells and runs the rest identically
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


def test_sigterm_during_the_durability_fine_tune(capsys, tmp_path, monkeypatch):
    """The fine-tuning attack is a Lightning SFT: it stops at the next batch; the re-scans it saved are kept."""
    from lat_lightning.training.sft import LossRecorder

    runs = tmp_path / "runs"
    argv = [
        "--recipe",
        DUR,
        f"logging.root_dir={runs}",
        "trainer.max_steps=2",
        "evaluation.max_new_tokens=3",
        "evaluation.durability.random_seeds=[0]",
        "evaluation.durability.sections=[rescan,finetune]",
        "evaluation.durability.num_prompts=3",
        "evaluation.durability.finetune_steps=6",
        "evaluation.durability.finetune_seeds=[0]",
        "evaluation.bootstrap_samples=0",
        "logging.tensorboard=false",
    ]
    with monkeypatch.context() as m:
        _signal_at(m, LossRecorder, "on_train_batch_end", at=2)
        last = fail(capsys, argv, "stopped by SIGTERM during stage 'durability'", code=143)
    run = runs / DUR / "version_0"
    assert "stages fit done" in last and "re-scan cells in original/ and hardened/" in last
    assert last.endswith(f"continue with --resume {run}") and _leftovers(runs) == []
    assert main([*argv, "--resume", "last"]) == 0
    out = capsys.readouterr().out
    assert "[fit] already done" in out and (run / "durability_summary.json").is_file()


def test_process_exit_codes_and_single_lines(tmp_path):
    """Real processes: bad input exits 2 with one line; SIGTERM sent from outside during a scan exits 143 with the
    line saying how to resume."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    bad = subprocess.run(
        [sys.executable, "train.py", "--recipe", "lat_tinyy"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: unknown recipe 'lat_tinyy' (did you mean 'lat_tiny'?); see --list-recipes"
    ]

    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "--recipe",
            SCAN,
            f"logging.root_dir={tmp_path}",
            "evaluation.max_new_tokens=40",
            "evaluation.seeds=[0,1,2,3,4,5,6,7]",
            "evaluation.attacks=[asa_random]",
            "evaluation.batch_size=4",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # the scan has started: its stage line is printed
        if line.startswith("[scan] starting") or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "cell/s" not in ln]
    assert proc.returncode == 143, err
    assert lines[-1].startswith("error: stopped by SIGTERM during stage 'scan'"), err
    assert "Traceback" not in err


def test_debug_shows_the_traceback():
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, "train.py", "--recipe", "lat_tinyy", "--debug"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "ConfigError: unknown recipe" in proc.stderr


def test_sigterm_before_the_run_started(capsys, monkeypatch):
    """A signal while the command line is parsed: one line, exit 143, the previous handler back in place."""
    import lat_lightning.cli as cli

    before = signal.getsignal(signal.SIGTERM)
    real = cli.load_config
    monkeypatch.setattr(cli, "load_config", lambda *a: (os.kill(os.getpid(), signal.SIGTERM), real(*a))[1])
    fail(capsys, ["--recipe", "lat_tiny"], "stopped by SIGTERM before the run started; nothing was saved", code=143)
    assert signal.getsignal(signal.SIGTERM) == before
