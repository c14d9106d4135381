"""``python -m benchmarks.gpu_check --tiny``: the prepared GPU check's code, run on the CPU so it cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration  # a whole benchmark in a subprocess


def test_gpu_check_tiny_runs_every_section():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--repeats", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["failed_sections"] == [] and result["mode"] == "tiny"
    assert set(result["steps"]) == {"sft", "lapt", "asagrad_at", "lat"}
    for variant, s in result["steps"].items():
        assert s["step_s"] > 0 and s["tokens_per_s"] > 0 and s["tflops_per_step"] > 0, variant
        assert math.isfinite(s["achieved_tflops"]), variant
    # The attacks do real work: ASAgrad adds a forward-backward, PGD k steps; LoRA trains far fewer weights.
    flops = {v: s["tflops_per_step"] for v, s in result["steps"].items()}
    assert flops["asagrad_at"] > flops["sft"] and flops["lat"] > flops["asagrad_at"]
    assert result["steps"]["lat"]["trainable_params"] < result["steps"]["sft"]["trainable_params"]
    scan = result["scan"]
    assert scan["cells"] == scan["prompts"] * (scan["layers"] + 1) and scan["cells_per_s"] > 0
    assert result["fsdp2"] == {**result["fsdp2"], "ok": True, "global_step": 2}
    assert result["qlora"]["ok"] and result["qlora"]["quantised_linears"] > 0
