"""Exact resume: a run stopped by a signal and resumed logs the same per-step losses, bit for bit (CPU, fp32).

The setting exercises everything a resume must restore: LoRA dropout (global RNG), PGD with a random start
(noise keyed by the step), the KL teacher on benign data, shuffled data crossing an epoch boundary, and
gradient accumulation with the stop in the middle of an accumulation window.
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest
import torch

from lat_lightning.cli import load_config, main
from lat_lightning.stages import fit_setup as train
from lat_lightning.training.fit import human_size
from lat_lightning.training.resume import TrainingInterrupted

# 8 examples, batch 2: 4 micro-batches per epoch; accumulate 2: an epoch is 2 optimiser steps.
OVERRIDES = [
    "model.lora.dropout=0.1",
    "perturbation.init=random",
    "trainer.accumulate_grad_batches=2",
    "trainer.max_steps=3",
    "trainer.checkpoint_every_n_steps=1",
    "logging.tensorboard=false",
]


class Recorder(pl.Callback):
    """Per micro-batch: (global step, batch index in the epoch, epoch, loss)."""

    def __init__(self):
        self.rows: list[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((trainer.global_step, batch_idx, trainer.current_epoch, float(outputs["loss"])))


class SendSignal(pl.Callback):
    """Sends a real signal to this process after micro-batch ``at`` (counted over the whole run)."""

    def __init__(self, signum: int, at: int):
        self.signum, self.at, self.seen = signum, at, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.seen == self.at:
            os.kill(os.getpid(), self.signum)
        self.seen += 1


def _cfg(root):
    return load_config("lat_tiny", OVERRIDES + [f"logging.root_dir={root}"])


def _trainable(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume_a")
    rec = Recorder()
    module = train.fit(_cfg(run_dir), run_dir, extra_callbacks=[rec])
    return run_dir, rec.rows, _trainable(module)


def test_sigterm_mid_window_then_resume_reproduces_every_loss(uninterrupted, tmp_path):
    _, expected, weights = uninterrupted
    assert len(expected) == 6 and {r[2] for r in expected} == {0, 1}  # crosses an epoch boundary
    cfg = _cfg(tmp_path)
    first = Recorder()
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 1") as err:
        train.fit(cfg, tmp_path, extra_callbacks=[first, SendSignal(signal.SIGTERM, at=2)])
    assert err.value.exit_code == 128 + signal.SIGTERM
    assert len(first.rows) == 3  # stopped after the 3rd micro-batch: inside the 2nd accumulation window
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["lat_lightning"]
    assert ckpt["global_step"] == 1 and state["micro_step"] == 1 and state["accumulated_grads"]
    assert {"torch", "python"} <= set(state["rng"]) and state["noise"]["seed"] == cfg.perturbation.seed
    assert all("lora_" in k for k in ckpt["state_dict"]), "trainable weights only"
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["SafetyDataModule"]["samples_consumed"] == 3 * 2 and ckpt["SafetyDataModule"]["epoch"] == 0

    second = Recorder()
    module = train.fit(cfg, tmp_path, resume=str(tmp_path), extra_callbacks=[second])
    assert first.rows + second.rows == expected  # bitwise: same batches, noise, dropout, updates
    for name, w in module.model.named_parameters():
        if w.requires_grad:
            assert torch.equal(w.detach(), weights[name]), name


def test_resume_from_a_named_checkpoint_at_an_epoch_boundary(uninterrupted, tmp_path):
    run_a, expected, weights = uninterrupted
    rec = Recorder()
    module = train.fit(
        _cfg(tmp_path), tmp_path, resume=str(run_a / "checkpoints" / "step2.ckpt"), extra_callbacks=[rec]
    )
    assert rec.rows == expected[4:]  # epoch 1 from its first batch
    assert all(torch.equal(p.detach(), weights[n]) for n, p in module.model.named_parameters() if p.requires_grad)


def test_sigint_saves_last_ckpt_exits_130_and_resume_last_finishes(tmp_path, monkeypatch, capsys):
    # What the process had before: Python's default_int_handler, or SIG_IGN when the suite runs as a background
    # job of a shell without job control (`make test &`), which starts it with SIGINT ignored.
    before = signal.getsignal(signal.SIGINT)
    original = train.build_callbacks
    monkeypatch.setattr(
        train,
        "build_callbacks",
        lambda cfg, run_dir, scan=None: original(cfg, run_dir, scan) + [SendSignal(signal.SIGINT, at=0)],
    )
    argv = [
        "--recipe",
        "lat_tiny",
        f"logging.root_dir={tmp_path}",
        "trainer.max_steps=2",
        "logging.tensorboard=false",
        "perturbation.steps=1",
    ]
    assert main(argv) == 130
    err = capsys.readouterr().err
    run_dir = tmp_path / "lat_tiny" / "version_0"
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert last.startswith("error: stopped by SIGINT at step 1") and f"--resume {run_dir}" in last
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    monkeypatch.setattr(train, "build_callbacks", original)
    assert main(argv + ["--resume", "last"]) == 0
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
    assert (run_dir / "config.resumed.yaml").exists() and (run_dir / "final" / "adapter_config.json").exists()


def test_history_checkpoints_and_last_is_a_link_not_a_copy(uninterrupted):
    run_a, _, _ = uninterrupted
    ckpts = run_a / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step1.ckpt", "step2.ckpt", "step3.ckpt"]
    assert (ckpts / "last.ckpt").is_symlink() and (ckpts / "last.ckpt").resolve() == (ckpts / "step3.ckpt").resolve()


def test_one_checkpoint_per_run_by_default_with_its_size_in_the_log(tmp_path, capsys):
    overrides = [o for o in OVERRIDES if not o.startswith("trainer.checkpoint_every_n_steps")]
    cfg = load_config("lat_tiny", overrides + [f"logging.root_dir={tmp_path}", "trainer.max_steps=2"])
    train.fit(cfg, tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["last.ckpt"] and not (ckpts / "last.ckpt").is_symlink()
    state = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    size = (ckpts / "last.ckpt").stat().st_size
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[fit] checkpoint"))
    assert str(ckpts / "last.ckpt") in line and line.endswith(human_size(size))


def test_a_larger_max_steps_on_resume_continues_a_finished_fit(tmp_path, capsys):
    """Resuming a finished run with a larger trainer.max_steps trains on from its last checkpoint (it used to say
    "already done"); a smaller one is refused, since training cannot be undone."""
    argv = ["--recipe", "lat_tiny", f"logging.root_dir={tmp_path}", "logging.tensorboard=false", "perturbation.steps=1"]
    assert main(argv + ["trainer.max_steps=2"]) == 0
    run_dir = tmp_path / "lat_tiny" / "version_0"
    adapter = (run_dir / "final" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(argv + ["trainer.max_steps=3", "--resume", "last"]) == 0
    out = capsys.readouterr().out
    assert "trainer.max_steps grew to 3: fit run again" in out and "already done" not in out
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert (run_dir / "final" / "adapter_model.safetensors").read_bytes() != adapter  # the export is the new model
    assert main(argv + ["trainer.max_steps=2", "--resume", "last"]) == 2
    assert "trainer.max_steps: 3 -> 2" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
