"""GGUF files: loaded through transformers, dequantised to model.dtype, converted once into the cache, saved as
ordinary checkpoints; pip:// names of files inside wheels; one-line errors. (The real SmolLM2 GGUF:
tests/test_real_model.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lat_lightning.config import ModelConfig
from lat_lightning.errors import ModelLoadError
from lat_lightning.models import gguf as gguf_module
from lat_lightning.models import pypi_files
from lat_lightning.models.loading import load_model, load_tokenizer, resolve_model_source
from lat_lightning.models.tiny_gguf import write_tiny_gguf

TEXTS = ["How do I bake bread at home? Mix flour", "The sea"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, tiny_model_dirs):
    root = tmp_path_factory.mktemp("gguf")
    return {q: write_tiny_gguf(tiny_model_dirs["llama"], root / f"tiny-{q}.gguf", q) for q in ("F32", "Q8_0")}


def _logits(model, tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_a_gguf_file_loads_like_its_source_and_saves_as_a_plain_checkpoint(
    gguf_files, tiny_model_dirs, cache, tmp_path
):
    cfg = ModelConfig(name_or_path=str(gguf_files["F32"]))
    model, tokenizer = load_model(cfg, train=False), load_tokenizer(cfg)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    ref_tok = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    assert tokenizer(TEXTS)["input_ids"] == ref_tok(TEXTS)["input_ids"]
    assert tokenizer.chat_template == ref_tok.chat_template and tokenizer.padding_side == "right"
    assert torch.equal(_logits(model, tokenizer), _logits(ref_model, ref_tok))  # float32 GGUF: lossless
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None)
    converted = resolve_model_source(cfg)
    assert converted.startswith(str(cache / "gguf"))
    source = json.loads(
        (gguf_module.conversion_dir(gguf_files["F32"].resolve(), "float32") / gguf_module.SOURCE_FILE).read_text()
    )
    assert source["gguf_file"] == str(gguf_files["F32"].resolve()) and source["dtype"] == "float32"
    model.save_pretrained(tmp_path / "saved")  # a GGUF-loaded model refuses this unless dequantised properly
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(again, tokenizer), _logits(model, tokenizer))


def test_converted_once_then_read_from_the_cache(gguf_files, cache, monkeypatch):
    cfg = ModelConfig(name_or_path=str(gguf_files["F32"]))
    first = resolve_model_source(cfg)
    monkeypatch.setattr(gguf_module, "_load_dequantised", lambda *a: pytest.fail("converted twice"))
    assert resolve_model_source(cfg) == first
    load_model(cfg, train=False)


def test_gguf_file_in_a_folder_quantised_weights_and_dtype(gguf_files, tiny_model_dirs, cache):
    path = gguf_files["Q8_0"]
    cfg = ModelConfig(name_or_path=str(path.parent), gguf_file=path.name, dtype="bfloat16")
    model, tokenizer = load_model(cfg, train=False), load_tokenizer(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    got, want = _logits(model, tokenizer).float(), _logits(ref, tokenizer)
    assert not torch.equal(got, want)  # 8-bit blocks and bfloat16 round
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    assert resolve_model_source(cfg).endswith("-bfloat16")


def test_missing_gguf_package_is_one_line(gguf_files, cache, monkeypatch):
    monkeypatch.setattr(gguf_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ModelLoadError,
        match=r"^loading a \.gguf model needs the gguf package: "
        r"pip install 'lat-lightning\[gguf\]'",
    ) as info:
        load_model(ModelConfig(name_or_path=str(gguf_files["F32"])))
    assert "\n" not in str(info.value)


def test_bad_gguf_names(tmp_path, cache):
    with pytest.raises(ModelLoadError, match="GGUF file .*missing.gguf' does not exist"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "missing.gguf")))
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="'model.gguf' is not in .*; .gguf files there: other.gguf"):
        load_model(ModelConfig(name_or_path=str(tmp_path), gguf_file="model.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match=r"is a \.bin file; model.name_or_path takes a directory"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "weights.bin")))


def test_pip_names(cache, monkeypatch):
    spec = "pip://llm-demo==1.2.0/llm_demo/model.gguf"
    assert pypi_files.cached_path(spec) == cache / "pypi" / "llm-demo-1.2.0" / "llm_demo" / "model.gguf"
    for bad in ("pip://llm-demo/llm_demo/model.gguf", "pip://llm-demo>=1.0/x.gguf", "pip://llm-demo==1.0"):
        with pytest.raises(ModelLoadError, match="pip://<package>==<version>/<path in the wheel>"):
            pypi_files.cached_path(bad)
    target = pypi_files.cached_path(spec)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"gguf")
    monkeypatch.setattr(pypi_files.pypi.subprocess, "run", lambda *a, **k: pytest.fail("downloaded although cached"))
    assert pypi_files.fetch_wheel_file(spec) == target
