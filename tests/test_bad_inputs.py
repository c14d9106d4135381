"""A catalogue of bad inputs: each ends with ONE actionable ``error:`` line on stderr and a non-zero exit,
with no traceback unless ``--debug`` is given, and never overwrites an earlier run.

Cases run in-process through ``lat_lightning.cli.main`` (the exit status is its return value); two run
``train.py`` for real to prove the process exit code and the ``--debug`` traceback. Errors that the config
and the model's ``config.json`` can decide (layers, eps, PGD steps, strategy, model path, quantisation)
fire before a run directory is created or training starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

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

    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    saved = {h: h.stream for lg in loggers for h in lg.handlers
             if type(h) is logging.StreamHandler and h.stream is not sys.__stdout__}
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


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the config itself ----------------------------------------------------------------------------------


def test_unknown_recipe(capsys):
    fail(capsys, ["--recipe", "lat_tinyy"], "did you mean 'lat_tiny'")


def test_unknown_override_key(capsys):
    fail(capsys, [*RECIPE, "trainer.max_stepz=3"], "did you mean 'trainer.max_steps'")


def test_wrong_value_type(capsys):
    fail(capsys, [*RECIPE, "trainer.max_steps=lots"], "trainer.max_steps")


def test_unknown_distributed_strategy(capsys, tmp_path):
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", "trainer.strategy=deepspeed"], "choose from auto, ddp")
    assert no_run_dir(tmp_path)


# --- settings that need the model's config: fail before any run directory or training ----------------


@pytest.mark.parametrize("override,fragment", [
    ("perturbation.layers=[1,9]", "perturbation.layers index 9 out of range: this model has layers 0..3"),
    ("perturbation.eps=0", "perturbation.eps must be > 0"),
    ("perturbation.eps=-1.5", "perturbation.eps must be > 0"),
    ("perturbation.steps=0", "perturbation.steps must be >= 1"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be >= 1"),
], ids=["layer_out_of_range", "zero_eps", "negative_eps", "pgd_steps_0", "accumulate_0"])
def test_model_dependent_settings_fail_before_anything_is_written(capsys, tmp_path, monkeypatch, override, fragment):
    from lat_lightning.training import fit as train

    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("training must not start"))
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", override], fragment)
    assert no_run_dir(tmp_path)


def test_model_path_that_does_not_exist(capsys, tmp_path):
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", f"model.name_or_path={tmp_path / 'no_such_model'}"],
         "does not exist; set model.name_or_path")
    assert no_run_dir(tmp_path)


def test_quantisation_without_bitsandbytes(capsys, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", "model.quantization.load_in_4bit=true"],
         "pip install 'lat-lightning[quant]'")
    assert no_run_dir(tmp_path)


def test_fsdp1_on_cpu_points_at_fsdp2(capsys, tmp_path):
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", "trainer.strategy=fsdp", "trainer.accelerator=cpu"],
         "use trainer.strategy=fsdp2")
    assert no_run_dir(tmp_path)


def test_early_stopping_attack_under_a_sharded_strategy(capsys, tmp_path):
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", "trainer.strategy=fsdp2",
                  "perturbation.early_stop_loss=0.1"], "set it to null")


# --- data ---------------------------------------------------------------------------------------------


def test_empty_dataset(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", f"data.harmful={empty}"], "no examples in")


def test_missing_columns(capsys, tmp_path):
    data = jsonl(tmp_path / "cols.jsonl", [{"request": "How?", "answer": "Like this."}])
    last = fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", f"data.harmful={data}"], "missing column(s) 'prompt'")
    assert "data.harmful_columns.prompt=<column>" in last


def test_data_file_not_found(capsys, tmp_path):
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", f"data.harmful={tmp_path / 'nope.jsonl'}"],
         "data file not found")


def test_prompt_longer_than_max_length(capsys, tmp_path):
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", "data.max_length=8"], "> data.max_length=8")


@pytest.fixture(scope="module")
def no_template_model(tmp_path_factory):
    from lat_lightning.testing.tiny_models import build_tiny_model, build_tokenizer

    return build_tiny_model("llama", tmp_path_factory.mktemp("no_template"),
                            tokenizer=build_tokenizer(chat_template=False))


def test_tokenizer_without_chat_template_errors_when_required(capsys, tmp_path, no_template_model):
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", f"model.name_or_path={no_template_model}",
                  "model.require_chat_template=true"], "has no chat template but model.require_chat_template")


def test_tokenizer_without_chat_template_falls_back_with_a_warning(no_template_model, caplog):
    from lat_lightning.config import ModelConfig
    from lat_lightning.models.loading import load_tokenizer

    with caplog.at_level("WARNING"):
        tok = load_tokenizer(ModelConfig(name_or_path=str(no_template_model)))
    assert tok is not None and "prompts are formatted as plain text" in caplog.text


# --- training and run directories ---------------------------------------------------------------------


def test_nan_loss_stops_with_a_checkpoint(capsys, tmp_path):
    last = fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", "perturbation.attack=asa_random",
                         "perturbation.alpha=1e30", "perturbation.positions=all"], "loss is not finite at step 0")
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
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", "logging.version=version_0"],
         "already exists; pick another logging.version or use --resume")
    assert (first / "results.json").read_text() == "precious"


def test_resume_with_nothing_to_resume(capsys, tmp_path):
    fail(capsys, [*RECIPE, f"logging.root_dir={tmp_path}", "--resume", "last"], "--resume last: no earlier run")


# --- real processes: the exit code, and --debug --------------------------------------------------------


def _train_py(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_process_exit_code_and_single_line():
    proc = _train_py("--recipe", "lat_tinyy", "trainer.max_steps=1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: unknown recipe 'lat_tinyy' (did you mean 'lat_tiny'?); see --list-recipes"]


def test_debug_shows_the_traceback():
    proc = _train_py("--recipe", "lat_tinyy", "--debug")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "ConfigError: unknown recipe" in proc.stderr
