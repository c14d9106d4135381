"""The shipped default organism: it is this code's build (cache key and checksum), a stale or damaged copy is refused
and built instead, ``organism.weights: build`` still builds, and the pipeline resolves the default organism to it.

That the shipped weights are bit-identical to what the pinned build produces on a host is a 2.5-minute build, too
slow for the suite: ``python -m benchmarks.shipped_organism`` does it (docs/organism.md#one-organism-on-every-host).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lat_lightning.organism import build as B
from lat_lightning.organism import recipe as R
from lat_lightning.organism import shipped as S
from lat_lightning.organism.build import PRESETS, build_organism, fingerprint, organism_dir
from lat_lightning.organism.shipped import ensure_organism


def test_the_shipped_organism_is_this_codes_default_build():
    """Fails when the recipe, BUILD_VERSION or organism/data.py changed since the weights were built: refresh them
    with ``python -m benchmarks.shipped_organism --write``."""
    path, why = S.shipped_organism(PRESETS["default"], S.SHIPPED_SEED)
    assert path == S.shipped_dir(), why
    info = S.shipped_info()
    assert info is not None and info["fingerprint"] == fingerprint(PRESETS["default"], S.SHIPPED_SEED)
    assert info["threads"] == R.BUILD_THREADS and info["model_sha256"] == S.sha256_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (R.NUM_LAYERS, R.HIDDEN)
    weights = load_file(str(path / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], R.HIDDEN)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


@pytest.fixture(scope="module")
def smoke_shipped(tmp_path_factory):
    """A smoke-preset build exported the way the default one is shipped, as a stand-in shipped folder."""
    root = tmp_path_factory.mktemp("shipped")
    build = build_organism(root / "build", PRESETS["smoke"], seed=0)
    S.export_build(build, root / "shipped")
    return root / "shipped"


@pytest.fixture
def shipped_copy(smoke_shipped, tmp_path, monkeypatch):
    """A writable copy of the stand-in, installed as the package's shipped folder, and an empty cache."""
    copy = tmp_path / S.SHIPPED_DIRNAME
    shutil.copytree(smoke_shipped, copy)
    monkeypatch.setattr(S, "shipped_dir", lambda: copy)
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return copy


@pytest.fixture
def builds(monkeypatch):
    """Records the builds ``ensure_organism`` asks for instead of running them (the real build is
    tests/organism/test_build.py's and the ``smoke_shipped`` fixture's)."""
    calls = []

    def fake_build(out_dir, recipe, seed=0):
        calls.append((out_dir, recipe, seed))
        out_dir.mkdir(parents=True, exist_ok=True)  # a rebuild replaces the directory
        (out_dir / "organism.json").write_text(json.dumps({"seed": seed}))
        return out_dir

    monkeypatch.setattr(B, "build_organism", fake_build)
    return calls


def test_shipped_weights_are_used_instead_of_a_build(smoke_shipped, shipped_copy, builds):
    assert ensure_organism(0, preset="smoke") == shipped_copy and builds == []
    exported, built = smoke_shipped / "model.safetensors", smoke_shipped.parent / "build" / "model.safetensors"
    assert exported.read_bytes() == built.read_bytes()  # the export is the build's weights, bit for bit
    # another build seed has no shipped weights: it is built, without a word about the shipped ones
    assert S.shipped_organism(PRESETS["smoke"], 1) == (None, "")
    assert ensure_organism(1, preset="smoke") == organism_dir(PRESETS["smoke"], 1)
    assert [(out, seed) for out, _, seed in builds] == [(organism_dir(PRESETS["smoke"], 1), 1)]


def test_weights_build_and_rebuild_build_on_this_host(shipped_copy, builds):
    built = ensure_organism(0, preset="smoke", weights="build")
    assert built == organism_dir(PRESETS["smoke"], 0) != shipped_copy and len(builds) == 1
    assert ensure_organism(0, preset="smoke", weights="build") == built and len(builds) == 1  # cached: reused
    assert ensure_organism(0, preset="smoke", rebuild=True) == built and len(builds) == 2  # rebuild implies build


def test_stale_shipped_weights_are_refused_and_built(shipped_copy, builds, capsys):
    info = json.loads((shipped_copy / "organism.json").read_text())
    (shipped_copy / "organism.json").write_text(json.dumps({**info, "fingerprint": "0123456789ab"}))
    path, why = S.shipped_organism(PRESETS["smoke"], 0)
    assert path is None and "0123456789ab" in why and "benchmarks.shipped_organism --write" in why
    assert ensure_organism(0, preset="smoke") == organism_dir(PRESETS["smoke"], 0) and len(builds) == 1
    assert "not using the shipped weights" in capsys.readouterr().out


def test_damaged_shipped_weights_are_refused(shipped_copy):
    with open(shipped_copy / "model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        last = fh.read(4)
        fh.seek(-4, 2)
        fh.write(bytes(b ^ 0xFF for b in last))
    path, why = S.shipped_organism(PRESETS["smoke"], 0)
    assert path is None and "SHA-256" in why
    (shipped_copy / "tokenizer.json").unlink()
    assert "lacks tokenizer.json" in S.shipped_organism(PRESETS["smoke"], 0)[1]


def test_the_pipeline_resolves_the_default_organism_to_the_shipped_one(tmp_path, monkeypatch):
    from lat_lightning.cli import load_config
    from lat_lightning.stages.organism import recipe_name, resolve_organism

    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path))
    out = resolve_organism(load_config(None, []))
    assert out.model.name_or_path == str(S.shipped_dir()) and recipe_name(out.model.name_or_path) == "organism"
    assert not (tmp_path / "organism" / organism_dir(PRESETS["default"], 0).name).exists()  # not built
