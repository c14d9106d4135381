"""Rebuild the default organism on this host and compare it with the weights shipped in the package.

Usage: ``python -m benchmarks.shipped_organism [--native] [--write] [--keep DIR]``.

Builds the default preset with build seed 0 (:data:`lat_lightning.organism.shipped.SHIPPED_SEED`) from scratch in a
fresh temporary cache, with the build's thread pin, and compares its ``model.safetensors`` with
``lat_lightning/resources/organism-s0-shipped/`` tensor by tensor: bit-identical, or the largest absolute difference
and how many tensors differ. The build runs in a child process on the CPU kernel path the shipped weights were built
on (their ``organism.json`` ``built_with.env``, e.g. ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``: those
variables take effect only before torch starts); ``--native`` builds on this process's path instead (this host's
default, or whatever the environment sets). docs/organism.md#one-organism-on-every-host. Takes the build's time
(~2.5 min on a quiet 2-core machine).

``--write`` then replaces the shipped files with this build (after a change to the recipe, the build or the data
generators made them stale: ``tests/organism/test_shipped.py`` fails until then). Ends with ``RESULT {json}``; exit
status 0 when the rebuild equals the shipped weights (or ``--write`` wrote them), 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def compare_weights(a: Path, b: Path) -> dict:
    """Two ``model.safetensors`` files compared: ``identical``, ``differing_tensors``, ``max_abs_diff``."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return {"identical": False, "differing_tensors": None, "max_abs_diff": None, "keys_differ": True}
    differing = [k for k in x if not torch.equal(x[k], y[k])]
    worst = max((float((x[k] - y[k]).abs().max()) for k in differing), default=0.0)
    return {"identical": not differing, "differing_tensors": len(differing), "max_abs_diff": worst, "tensors": len(x)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the shipped files with this build")
    parser.add_argument("--keep", help="build into this directory (kept) instead of a temporary one")
    parser.add_argument("--native", action="store_true", help="build on this process's kernel path")
    args = parser.parse_args(argv)
    if not args.native:
        return _on_shipped_path(argv if argv is not None else sys.argv[1:])

    import torch

    from lat_lightning.organism.build import PRESETS, build_organism
    from lat_lightning.organism.shipped import SHIPPED_SEED, export_build, shipped_dir, shipped_info

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="shipped-organism-"))
    os.environ["LAT_LIGHTNING_CACHE"] = str(root / "cache")  # nothing cached is reused
    t0 = time.time()
    built = build_organism(root / "build", PRESETS["default"], seed=SHIPPED_SEED)
    result: dict = {
        "build_s": round(time.time() - t0, 1),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {
            k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR") if k in os.environ
        },
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "build_dir": str(built),
    }
    target = shipped_dir()
    if shipped_info(target) is not None:
        result["shipped_built_with"] = shipped_info(target).get("built_with")  # type: ignore[union-attr]
        result.update(compare_weights(built / "model.safetensors", target / "model.safetensors"))
    else:
        result["identical"] = False
    if args.write:
        result["written"] = export_build(built, target)["model_sha256"]
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if result["identical"] or args.write else 1


def _on_shipped_path(argv: list[str]) -> int:
    """Run this script again with ``--native`` in a child whose environment selects the shipped build's kernel
    path."""
    from lat_lightning.organism.build import KERNEL_ENV
    from lat_lightning.organism.shipped import shipped_info

    recorded = ((shipped_info() or {}).get("built_with") or {}).get("env") or {}
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_ENV} | recorded
    print(f"[shipped_organism] building on the shipped weights' kernel path: {recorded or 'this host default'}")
    return subprocess.call([sys.executable, "-m", "benchmarks.shipped_organism", "--native", *argv], env=env)


if __name__ == "__main__":
    sys.exit(main())
