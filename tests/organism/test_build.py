"""The organism build is one organism per build seed, whatever the machine's thread count."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from lat_lightning.organism import recipe as R
from lat_lightning.organism.build import _train_and_save, build_organism, default_recipe


def _short_default():
    """The default organism's width and batch (where thread count changes the float sums: the smoke preset's
    64-wide, batch-16 steps come out the same on 1 and 2 threads) with a few steps."""
    d = default_recipe()
    return dataclasses.replace(
        d,
        stage_a=dataclasses.replace(d.stage_a, steps=6, n_benign=100, n_forbidden=60, n_impossible=20),
        stage_b=dataclasses.replace(d.stage_b, steps=2, n_benign=40, n_forbidden=40, n_impossible=10),
    )


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_build_does_not_depend_on_the_callers_thread_count(tmp_path):
    recipe = _short_default()
    before = torch.get_num_threads()
    try:
        unpinned, built = [], []
        for threads in (2, 1):
            torch.set_num_threads(threads)
            raw = tmp_path / f"raw{threads}"
            raw.mkdir()
            _train_and_save(raw, recipe, 0, 0.0)  # the training itself, without the build's thread pin
            unpinned.append(_weights(raw))
            out = build_organism(tmp_path / f"t{threads}", recipe, seed=0)
            assert torch.get_num_threads() == threads  # the caller's setting is restored
            built.append(_weights(out))
    finally:
        torch.set_num_threads(before)
    assert R.BUILD_THREADS == 1 and _same(*built)  # the guard: one organism per seed, whatever the threads
    if _same(*unpinned):
        # The hazard the pin guards against is a property of the host's CPU kernels: on the session-4 host the
        # unpinned 1- and 2-thread builds differed; on the 2026-12-07 host (quiet, and busy) they came out equal,
        # on the commit before issue 21 too. The guard above holds either way; only its motivation cannot be
        # shown here.
        pytest.skip(
            "this host's kernels give the same sums on 1 and 2 threads: the thread dependence the pin "
            "guards against does not show here (the pinned builds are identical, asserted above)"
        )
