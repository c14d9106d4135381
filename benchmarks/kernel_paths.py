"""Which CPU kernel setting changes the organism's weights? A shortened default-width build once per setting.

Usage: ``python -m benchmarks.kernel_paths [--steps-a 20] [--steps-b 5]``.

Each setting runs in its own child process (the variables take effect only before torch starts): this host's
default, a second process of it (the build must repeat bitwise), ``ATEN_CPU_CAPABILITY=avx2`` / ``default``,
``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``MKL_CBWR=AVX2`` / ``COMPATIBLE`` and oneDNN off. Each builds the default recipe
(width, batch, seed 0, the one-thread pin) with its stages shortened to ``--steps-a`` + ``--steps-b`` steps and
reports the weights' SHA-256 and, against the host default, how many tensors differ and by how much at most.
Prints a table, then ``RESULT {json}``. About 30 s per setting on a quiet 2-core machine.
docs/organism.md#one-organism-on-every-host has the measured table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS: dict[str, dict[str, str]] = {
    "host default": {},
    "host default, second process": {},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "MKL_ENABLE_INSTRUCTIONS=AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "MKL_CBWR=AVX2": {"MKL_CBWR": "AVX2"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "oneDNN off": {"KERNEL_PATHS_MKLDNN": "0"},
}


def build_once(steps_a: int, steps_b: int, out: Path) -> None:
    """The child: the shortened build into ``out`` (``model.safetensors``, ``organism.json``)."""
    import torch

    if os.environ.get("KERNEL_PATHS_MKLDNN") == "0":
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a ContextProp to mypy, a flag at runtime
    from lat_lightning.organism.build import build_organism, default_recipe

    d = default_recipe()
    recipe = dataclasses.replace(
        d,
        stage_a=dataclasses.replace(d.stage_a, steps=steps_a),
        stage_b=dataclasses.replace(d.stage_b, steps=steps_b),
    )
    build_organism(out, recipe, seed=0)


def compare(reference: Path, other: Path) -> tuple[int, float]:
    """(tensors that differ, largest absolute difference) between two ``model.safetensors``."""
    from safetensors.torch import load_file

    a, b = load_file(str(reference)), load_file(str(other))
    diffs = [float((a[k] - b[k]).abs().max()) for k in a]
    return sum(d > 0 for d in diffs), max(diffs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-a", type=int, default=20)
    parser.add_argument("--steps-b", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: build into this directory
    args = parser.parse_args(argv)
    if args.child:
        build_once(args.steps_a, args.steps_b, Path(args.child))
        return 0
    root = Path(tempfile.mkdtemp(prefix="kernel-paths-"))
    rows = {}
    for i, (name, env) in enumerate(SETTINGS.items()):
        out = root / f"s{i}"
        child = [sys.executable, "-m", "benchmarks.kernel_paths", f"--steps-a={args.steps_a}"]
        child += [f"--steps-b={args.steps_b}", f"--child={out}"]
        subprocess.run(child, env={**os.environ, **env}, check=True, capture_output=True)
        info = json.loads((out / "organism.json").read_text())
        rows[name] = {
            "cpu_capability": info["built_with"]["cpu_capability"],
            "sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16],
            "loss_a": info["loss_a"],
        }
        differing, worst = compare(root / "s0" / "model.safetensors", out / "model.safetensors")
        rows[name].update(tensors_differing=differing, max_abs_diff=worst)
        r = rows[name]
        print(
            f"{name:<30} {r['cpu_capability']:<8} {r['sha256']} differ {differing:>3}  max|dw| {worst:.2g}", flush=True
        )
    print("RESULT " + json.dumps({"steps": [args.steps_a, args.steps_b], "settings": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
