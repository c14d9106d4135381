"""Model and tokenizer loading: dtype, train mode, LoRA, checkpointing, quantisation, errors."""

from __future__ import annotations

import importlib.util
import re
import shutil

import pytest
import torch

from lat_lightning.config import LoraConfig, ModelConfig, QuantizationConfig
from lat_lightning.errors import ModelLoadError
from lat_lightning.models.layers import get_decoder_layers
from lat_lightning.models.loading import load_model, load_tokenizer, padding_side, resolve_model_path


def _cfg(path, **kwargs) -> ModelConfig:
    return ModelConfig(name_or_path=str(path), **kwargs)


def _ids():
    return torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_is_honoured(dtype, tiny_llama_dir):
    model = load_model(_cfg(tiny_llama_dir, dtype=dtype), train=False)
    expected = getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    with torch.no_grad():
        assert model(input_ids=_ids()).logits.dtype == expected


def test_train_mode_after_load(tiny_llama_dir):
    model = load_model(_cfg(tiny_llama_dir), train=True)
    assert model.training and all(m.training for m in model.modules())
    model = load_model(_cfg(tiny_llama_dir), train=False)
    assert not any(m.training for m in model.modules())


def test_attn_implementation_is_passed(tiny_llama_dir):
    model = load_model(_cfg(tiny_llama_dir, attn_implementation="eager"), train=False)
    assert model.config._attn_implementation == "eager"


def test_lora_settings_are_respected(tiny_llama_dir):
    lora = LoraConfig(
        enabled=True, r=4, alpha=12, dropout=0.0, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 3]
    )
    model = load_model(_cfg(tiny_llama_dir, lora=lora), train=True)
    assert type(model).__name__ == "PeftModelForCausalLM"
    peft_cfg = model.peft_config["default"]
    assert peft_cfg.r == 4 and peft_cfg.lora_alpha == 12
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"}

    adapted = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
            adapted.setdefault(layer, set()).add(name.rsplit(".", 1)[-1])
            assert module.lora_A["default"].weight.shape == (4, 64)
            assert module.scaling["default"] == pytest.approx(12 / 4)
    assert adapted == {1: {"q_proj", "v_proj"}, 3: {"q_proj", "v_proj"}}  # only the listed layers

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B, two modules, two layers


def test_lora_on_every_layer_by_default(tiny_llama_dir):
    model = load_model(_cfg(tiny_llama_dir, lora=LoraConfig(enabled=True, r=2)), train=False)
    for block in get_decoder_layers(model):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert hasattr(getattr(block.self_attn, proj), "lora_A")
    plain = load_model(_cfg(tiny_llama_dir, lora=LoraConfig(enabled=True, r=2)), train=False, with_lora=False)
    assert not any("lora_" in n for n, _ in plain.named_parameters())


def test_lora_dropout_is_active_after_train_load(tiny_llama_dir):
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.5)
    model = load_model(_cfg(tiny_llama_dir, lora=lora), train=True)
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(d, torch.nn.Dropout) and d.p == 0.5 and d.training for d in dropouts)
    with torch.no_grad():  # peft zero-initialises B; give the adapters an effect so dropout shows
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
        torch.manual_seed(0)
        a = model(input_ids=_ids()).logits
        b = model(input_ids=_ids()).logits
        assert not torch.equal(a, b)
        model.eval()
        assert torch.equal(model(input_ids=_ids()).logits, model(input_ids=_ids()).logits)


def test_bad_lora_target_is_a_model_load_error(tiny_llama_dir):
    lora = LoraConfig(enabled=True, target_modules=["no_such_proj"])
    with pytest.raises(ModelLoadError, match="LoRA config does not fit"):
        load_model(_cfg(tiny_llama_dir, lora=lora))


@pytest.mark.parametrize("with_lora", [False, True])
def test_gradient_checkpointing_non_reentrant(with_lora, tiny_llama_dir):
    cfg = _cfg(tiny_llama_dir, gradient_checkpointing=True, lora=LoraConfig(enabled=with_lora, r=2))
    model = load_model(cfg, train=True)
    layers = get_decoder_layers(model)
    assert all(block.gradient_checkpointing for block in layers)
    funcs = {block._gradient_checkpointing_func for block in layers}
    for func in funcs:
        assert func.keywords.get("use_reentrant") is False
    assert not model.config.use_cache
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_tokenizer_defaults(tiny_llama_dir):
    tok = load_tokenizer(_cfg(tiny_llama_dir))
    assert tok.padding_side == "right"
    assert tok.pad_token == "<pad>"
    assert tok.chat_template
    with padding_side(tok, "left"):
        assert tok.padding_side == "left"
        batch = tok(["a", "a b c d"], padding=True)
        assert batch["attention_mask"][0][0] == 0
    assert tok.padding_side == "right"


def test_pad_token_set_when_missing(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None  # really saved without one

    loaded = load_tokenizer(_cfg(tiny_llama_dir, tokenizer=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "<|end|>"
    assert loaded.pad_token_id == loaded.eos_token_id
    assert loaded.padding_side == "right"


def test_tokenizer_without_pad_or_eos_is_an_error(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.pad_token = None
    tok.eos_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="neither a pad nor an eos"):
        load_tokenizer(_cfg(tmp_path))


def test_missing_chat_template(tiny_llama_dir, tmp_path):
    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.chat_template = None
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(tmp_path)
    assert not load_tokenizer(_cfg(tmp_path)).chat_template  # a warning, not an error
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_tokenizer(_cfg(tmp_path, require_chat_template=True))
    load_tokenizer(_cfg(tmp_path, require_chat_template=True, use_chat_template=False))


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_nonexistent_local_path_is_one_line_error(loader, tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError) as info:
        loader(_cfg(missing))
    message = str(info.value)
    assert "\n" not in message and str(missing) in message and "does not exist" in message


def test_unreachable_hub_id_offline_is_one_line_error():
    with pytest.raises(ModelLoadError) as info:
        load_model(_cfg("lat-lightning-test/definitely-not-a-model"))
    message = str(info.value)
    assert "\n" not in message and "definitely-not-a-model" in message and "HF_HUB_OFFLINE" in message


def test_hub_ids_pass_through_resolution():
    assert resolve_model_path("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"


def test_the_loader_does_not_know_the_organism(tmp_path, monkeypatch):
    """``organism[:<preset>]`` and ``organism://`` are resolved by the pipeline (stages.organism), never here:
    the loader treats them like any other name and builds nothing."""
    from lat_lightning.config import ModelConfig
    from lat_lightning.resources import resource_path

    monkeypatch.setenv("LAT_LIGHTNING_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="cannot load 'organism:smoke'"):
        load_tokenizer(ModelConfig(name_or_path="organism:smoke"))
    assert resolve_model_path("organism") == "organism"
    assert resource_path("organism://harmful_train") == "organism://harmful_train"
    assert not list(tmp_path.iterdir())  # nothing built


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_quantisation_without_bitsandbytes_names_the_extra(flag, tiny_llama_dir, monkeypatch):
    real = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "bitsandbytes" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    cfg = _cfg(tiny_llama_dir, quantization=QuantizationConfig(**{flag: True}))
    with pytest.raises(ModelLoadError, match=re.escape("lat-lightning[quant]")) as info:
        load_model(cfg)
    assert "\n" not in str(info.value)


def test_both_quantisation_flags_is_an_error(tiny_llama_dir):
    cfg = _cfg(tiny_llama_dir, quantization=QuantizationConfig(load_in_4bit=True, load_in_8bit=True))
    with pytest.raises(ModelLoadError, match="not both"):
        load_model(cfg)


def _bnb_cpu_problem() -> str | None:
    """Why bitsandbytes cannot run 4-bit on this CPU, or ``None`` when it can (checked, not assumed)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'lat-lightning[quant]')"
    try:
        import bitsandbytes.functional as F

        w = torch.randn(64, 64)
        q, state = F.quantize_4bit(w, quant_type="nf4")
        F.dequantize_4bit(q, state)
    except Exception as exc:  # noqa: BLE001 - any failure here means no CPU backend
        return f"bitsandbytes has no working CPU 4-bit backend here: {type(exc).__name__}: {exc}"
    return None


def test_real_4bit_load_on_cpu(tiny_llama_dir):
    problem = _bnb_cpu_problem()
    if problem:
        pytest.skip(problem)
    import bitsandbytes as bnb

    quant = QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype="float32")
    cfg = _cfg(tiny_llama_dir, quantization=quant, lora=LoraConfig(enabled=True, r=2))
    model = load_model(cfg, train=True)
    q_proj = get_decoder_layers(model)[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.dtype == torch.uint8
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
