"""``trainer.devices=2`` starts two processes through Lightning's launcher for the whole pipeline: the scan, the
comparison (rank 0 only) and the durability re-scans of a ``devices=2`` run equal the one-process run record for
record, and the run says how many processes it had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lat_lightning.cli import main
from lat_lightning.eval.scan import read_records

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration  # a second process tree (Lightning's launcher re-runs train.py)

# asa_scan_tiny, then a one-defence comparison and the durability re-scans of the original against a perturbed
# copy, all tiny: the scan and the re-scans share their prompts over the processes, the comparison runs on rank 0
# between them (so the re-scans also check that rank 1 waits for it).
TINY = [
    "stages=[scan,compare,durability]",
    "evaluation.num_prompts=4",
    "evaluation.attacks=[asa_random,pgd]",
    "evaluation.layers=[1,2]",
    "evaluation.seeds=[0]",
    "evaluation.batch_size=8",
    "evaluation.max_new_tokens=4",
    "evaluation.bootstrap_samples=10",
    "perturbation.steps=2",
    "data.benign=pkg://lat_lightning/resources/tiny_benign.jsonl",
    "data.batch_size=4",
    "trainer.max_steps=1",
    "compare.defences=[sft]",
    "compare.embed_attacks=[]",
    "compare.prefill_tokens=[]",
    "compare.finetune=false",
    "evaluation.utility_data=pkg://lat_lightning/resources/tiny_mc.jsonl",
    "evaluation.utility_kind=multiple_choice",
    "callbacks.weight_interpolation.utility=multiple_choice",
    "callbacks.weight_interpolation.lambdas=[0.0,1.0]",
    "callbacks.fragile_layers.method=explicit",
    "callbacks.fragile_layers.layers=[1]",
    "evaluation.durability.sections=[rescan]",
    "evaluation.durability.random_seeds=[0]",
    "evaluation.durability.fragile_layers=[1]",
    "logging.tensorboard=false",
]


def _env() -> dict[str, str]:
    """This environment without any launcher's variables (the test itself may run under one)."""
    drop = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "LAT_LIGHTNING_RUN_DIR")
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PL_", "SLURM_", "TORCHELASTIC_"))
    }
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def hardened(tmp_path_factory, tiny_llama_dir) -> Path:
    """A copy of the tiny Llama with every weight nudged: the durability suite's second model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("hardened")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def _records(run: Path) -> dict[str, dict]:
    """Every scan record file of a run (the scan, the comparison's batteries, the durability re-scans)."""
    return {str(p.relative_to(run)): read_records(p) for p in sorted(run.rglob("scan.jsonl"))}


def test_two_devices_equal_one_process(hardened, tmp_path):
    args = [f"evaluation.compare_path={hardened}", *TINY]
    assert main(["--recipe", "asa_scan_tiny", f"logging.root_dir={tmp_path / 'one'}", *args]) == 0
    cmd = [sys.executable, "train.py", "--recipe", "asa_scan_tiny", f"logging.root_dir={tmp_path / 'two'}", *args]
    cmd += ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (tmp_path / name / "asa_scan_tiny" / "version_0" for name in ("one", "two"))

    # The same records: the scan, the comparison's batteries (rank 0 alone) and the durability re-scans.
    ra, rb = _records(one), _records(two)
    assert {"scan.jsonl", "original/scan.jsonl", "hardened/scan.jsonl"} <= ra.keys()
    assert any(k.startswith("compare/") for k in ra) and ra.keys() == rb.keys()
    for name in ra:
        assert ra[name] and ra[name] == rb[name], name
    assert not list(two.rglob("scan.rank*.jsonl"))  # every rank's stream was merged by rank 0, then removed
    ca, cb = (json.loads((d / "compare" / "compare_summary.json").read_text()) for d in (one, two))
    assert ca["table"] == cb["table"]
    da, db = (json.loads((d / "durability_summary.json").read_text()) for d in (one, two))
    assert da["rows"] == db["rows"] and da["rows"]

    # Two processes ran, started by Lightning's launcher, and the run says so.
    scan_two = json.loads((two / "scan_summary.json").read_text())
    assert scan_two["world_size"] == 2 and json.loads((one / "scan_summary.json").read_text())["world_size"] == 1
    assert db["world_size"] == 2 and da["world_size"] == 1
    for stage, ranks in (("scan", 2), ("compare", 1), ("durability", 2)):
        marker = json.loads((two / "stages" / f"{stage}.done.json").read_text())
        assert marker["launch"]["world_size"] == 2 and marker["launch"]["ranks"] == ranks, (stage, marker)
        assert "rank" not in marker  # rank 0's record, not a share's
    line = "[launch] world size 2: 2 processes started by Lightning's script launcher"
    assert proc.stdout.count(line) == 1 and line in (two / "run.log").read_text()
    assert proc.stdout.count("[compare] runs on rank 0 only") == 1
    assert proc.stdout.count("[scan] asa_random:") == 1 and proc.stdout.count("run directory:") == 1
    marker = json.loads((one / "stages" / "scan.done.json").read_text())
    assert marker["launch"] == {"world_size": 1, "devices": 1, "num_nodes": 1, "launcher": "one process", "ranks": 1}


def test_devices_with_no_stage_that_shares_runs_one_process_and_says_so(tmp_path, capsys):
    """``stages=[report]``-like runs: a request for 2 processes that nothing would use starts none."""
    from lat_lightning.cli import load_config
    from lat_lightning.stages.settings import trainer_settings
    from lat_lightning.training.launch import plan_world

    cfg = load_config("asa_scan_tiny", ["trainer.devices=2", "trainer.accelerator=cpu"])
    world = plan_world(trainer_settings(cfg), [], ["evaluate"])
    assert world.size == 1 and "none of the stages to run (evaluate) shares its work" in world.describe()
    shared = plan_world(trainer_settings(cfg), ["scan"], ["scan"])
    assert shared.size == 2 and shared.launcher == "Lightning's script launcher"


def test_torchrun_environment_wins(monkeypatch):
    """Under torchrun the launcher's world is used and nothing is launched, whatever trainer.devices says."""
    from lat_lightning.cli import load_config
    from lat_lightning.stages.settings import trainer_settings
    from lat_lightning.training.launch import Launch, plan_world

    for key, value in {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    trainer = trainer_settings(load_config("asa_scan_tiny", ["trainer.devices=2", "trainer.accelerator=cpu"]))
    world = plan_world(trainer, ["scan"], ["scan"])
    assert (world.size, world.rank, world.launcher) == (4, 3, "torchrun")
    assert "torchrun started 4 processes" in world.describe()
    launch = Launch(world, trainer)
    assert launch.start() == world and launch.children() == []  # no Fabric, no process started


def test_rank_zero_that_fails_stops_its_children_and_is_not_killed_by_lightnings_observer():
    """Rank 0 stopping with an error sends SIGTERM to the processes it started; Lightning's observer, which
    SIGKILLs the main process when a child exits non-zero, is retired first (else this test process would die)."""
    import signal
    import time

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    from lat_lightning.cli import load_config
    from lat_lightning.stages.settings import trainer_settings
    from lat_lightning.training.launch import Launch, World

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    observer = _ChildProcessObserver(main_pid=os.getpid(), child_processes=[child], sleep_period=0.05)
    observer.start()
    launch = Launch(World(1, 0, 1, 1, "one process"), trainer_settings(load_config("asa_scan_tiny")))
    launch.children = lambda: [child]  # type: ignore[method-assign] - the one Lightning would have started
    launch.finish(failed=True)
    assert child.returncode == -signal.SIGTERM
    observer.join(timeout=5)
    time.sleep(0.2)
    assert not observer.is_alive()  # it ended without killing this process


def test_a_stopped_multi_process_scan_counts_the_cells_of_every_rank(tmp_path):
    """The stop line of a multi-process scan counts what every rank streamed (kept for --resume), not only the
    merged ``scan.jsonl`` (which a stop before the merge leaves empty)."""
    from lat_lightning.stages.scan import cells_saved, saved

    assert saved(tmp_path) is None
    (tmp_path / "scan.rank0.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    (tmp_path / "scan.rank1.jsonl").write_text('{"a": 3}\n{"a": 4')  # a torn last line is not a cell
    assert cells_saved(tmp_path / "scan.jsonl") == 3 and saved(tmp_path) == "3 finished cells in scan.jsonl (kept)"


def test_devices_inside_a_one_task_slurm_job_is_refused(monkeypatch):
    """In a SLURM job Lightning leaves starting processes to srun; asking for 2 devices from one task would run one
    process, so it is bad input (before anything is written)."""
    from lat_lightning.cli import load_config
    from lat_lightning.errors import ConfigError
    from lat_lightning.stages.settings import trainer_settings
    from lat_lightning.training.launch import Launch, plan_world

    for key in ("LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    trainer = trainer_settings(load_config("asa_scan_tiny", ["trainer.devices=2", "trainer.accelerator=cpu"]))
    world = plan_world(trainer, ["scan"], ["scan"])
    assert world.size == 2  # not srun's launch (one task): the request stands
    with pytest.raises(ConfigError, match="inside a SLURM job with one task"):
        Launch(world, trainer)
