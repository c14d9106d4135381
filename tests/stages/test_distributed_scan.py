"""A scan shared out over 2 gloo processes (torchrun) equals the 1-process scan record for record, and a killed
distributed scan resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lat_lightning.cli import main
from lat_lightning.eval.scan import read_records

REPO = Path(__file__).resolve().parents[2]
# ASA random over 2 seeds, ASAgrad and PGD, every layer of the tiny Llama; small chunks so the kill lands mid-scan.
OVERRIDES = ["evaluation.num_prompts=6", "evaluation.batch_size=4", "evaluation.max_new_tokens=10"]

pytestmark = pytest.mark.integration  # two processes under torchrun


def _env() -> dict[str, str]:
    drop = (
        "LOCAL_RANK",
        "RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "LAT_LIGHTNING_RUN_DIR",
        "TORCHELASTIC_RUN_ID",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "SLURM_PROCID",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PL_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _torchrun(root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "train.py",
        "--recipe",
        "asa_scan_tiny",
        f"logging.root_dir={root}",
        "logging.version=dist",
        *OVERRIDES,
        *extra,
    ]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scan_one")
    assert main(["--recipe", "asa_scan_tiny", f"logging.root_dir={root}", *OVERRIDES]) == 0
    return root / "asa_scan_tiny" / "version_0"


def _same_scan(a: Path, b: Path) -> None:
    ra, rb = read_records(a / "scan.jsonl"), read_records(b / "scan.jsonl")
    assert len(ra) == 6 * (1 + 4 * 2 + 4 + 4) and ra.keys() == rb.keys()
    for key in ra:
        assert ra[key] == rb[key], key
    sa, sb = (json.loads((d / "scan_summary.json").read_text()) for d in (a, b))
    assert sa["attacks"] == sb["attacks"] and sa["init"] == sb["init"]
    assert not list(b.glob("scan.rank*.jsonl"))  # merged into scan.jsonl by rank 0, then removed


def test_two_processes_equal_one(one_process, tmp_path):
    proc = subprocess.run(_torchrun(tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "asa_scan_tiny" / "dist"
    _same_scan(one_process, run)
    assert proc.stdout.count("[scan] asa_random:") == 1  # rank 0 reports


def test_killed_distributed_scan_resumes_to_the_same_result(one_process, tmp_path):
    run = tmp_path / "asa_scan_tiny" / "dist"
    proc = subprocess.Popen(
        _torchrun(tmp_path),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill once both ranks have streamed some records
        streams = list(run.glob("scan.rank*.jsonl"))
        if len(streams) == 2 and all(len(p.read_text().splitlines()) >= 8 for p in streams):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the scan finished before it could be killed: make it longer"
    import psutil

    # torchrun starts its workers in their own process groups: kill the whole tree, workers first.
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    partial = sum(len(read_records(p)) for p in run.glob("scan.rank*.jsonl"))
    assert 16 <= partial < 6 * 17 and not (run / "scan_summary.json").exists()
    resumed = subprocess.run(
        _torchrun(tmp_path, "--resume", str(run)), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_scan(one_process, run)
    marker = json.loads((run / "stages" / "scan.done.json").read_text())
    # the records of the killed run were kept, not recomputed (a torn last line may be dropped)
    assert partial - 2 <= marker["cells_resumed"] <= partial, resumed.stdout[-2000:]
    assert marker["cells_run"] + marker["cells_resumed"] == 6 * 17
