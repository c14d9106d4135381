import copy

import pytest
import torch

from lat_lightning.training.interpolation import (
    choose_lambda,
    interpolate_state,
    interpolated_params,
    lambda_search,
    merged_state_dict,
    save_merged,
    scale_lora,
    trainable_state,
)
from tests.helpers.weights import perturb_weights, set_lora_b


def _load(model_dir, lora=False):
    from lat_lightning.config import LoraConfig, ModelConfig
    from lat_lightning.models.loading import load_model

    cfg = ModelConfig(name_or_path=str(model_dir), lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0))
    return load_model(cfg, train=False)


def _scalings(model):
    return [dict(m.scaling) for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]


def _peft_merged(model):
    """The trained model's merged weights, computed by peft itself on a copy."""
    return {k: v.clone() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}


# ----------------------------------------------------------------------------------------- pure maths
def test_interpolate_state_endpoints_are_exact_and_midpoint_is_linear():
    torch.manual_seed(0)
    original = {"a": torch.randn(5, 3), "b": torch.randn(4).to(torch.bfloat16), "n": torch.arange(3)}
    trained = {"a": torch.randn(5, 3), "b": torch.randn(4).to(torch.bfloat16), "n": torch.arange(3)}
    at0, at1 = interpolate_state(original, trained, 0.0), interpolate_state(original, trained, 1.0)
    for k in original:
        assert torch.equal(at0[k], original[k]) and torch.equal(at1[k], trained[k])
        assert at0[k] is not original[k] and at1[k] is not trained[k]
    mid = interpolate_state(original, trained, 0.3)
    torch.testing.assert_close(mid["a"], 0.3 * trained["a"] + 0.7 * original["a"])
    assert mid["b"].dtype == torch.bfloat16
    with pytest.raises(KeyError):
        interpolate_state(original, {"a": trained["a"]}, 0.5)
    with pytest.raises(ValueError):
        interpolate_state(original, trained, 1.5)


def test_choose_lambda_picks_largest_within_tolerance():
    curve = {0.0: 0.80, 0.1: 0.79, 0.2: 0.76, 0.3: 0.74, 0.4: 0.70, 0.5: 0.78}
    # the largest qualifying λ, even past a dip
    assert choose_lambda(curve, 0.80, 0.05) == 0.5
    assert choose_lambda({0.0: 0.8, 0.1: 0.76, 0.2: 0.74, 0.3: 0.7}, 0.8, 0.05) == 0.1
    assert choose_lambda([(0.0, 0.8), (0.5, 0.9)], 0.8, 0.0) == 0.5  # better than baseline qualifies
    assert choose_lambda({0.0: 0.8, 0.3: float("nan")}, 0.8, 0.05) == 0.0
    assert choose_lambda({0.2: 0.1}, 0.8, 0.05) == 0.0  # nothing qualifies: the original
    with pytest.raises(ValueError):
        choose_lambda(curve, float("nan"), 0.05)


# ----------------------------------------------------------------------------------------- full fine-tuning
def test_full_ft_interpolation_exact_endpoints_and_restore(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    original = trainable_state(model)
    perturb_weights(model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with interpolated_params(model, original, 0.0):
        assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    with interpolated_params(model, original, 1.0):
        assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    with interpolated_params(model, original, 0.25):
        expected = interpolate_state(original, trained, 0.25)
        assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())  # trained weights restored


# ----------------------------------------------------------------------------------------- LoRA
def test_lora_scaling_equals_interpolating_merged_weights(tiny_llama_dir):
    model = _load(tiny_llama_dir, lora=True)
    base = {k: v.clone() for k, v in _load(tiny_llama_dir).state_dict().items()}
    set_lora_b(model)
    trained_merged = _peft_merged(model)
    scalings = _scalings(model)
    with scale_lora(model, 0.0):
        at0 = merged_state_dict(model)
    with scale_lora(model, 1.0):
        at1 = merged_state_dict(model)
    assert set(at0) == set(base) == set(trained_merged)
    assert all(torch.equal(at0[k], base[k]) for k in base)
    assert all(torch.equal(at1[k], trained_merged[k]) for k in base)
    assert any(not torch.equal(base[k], trained_merged[k]) for k in base)
    with scale_lora(model, 0.3):
        mid = merged_state_dict(model)
    expected = interpolate_state(base, trained_merged, 0.3)
    for k in base:
        torch.testing.assert_close(mid[k], expected[k], atol=1e-6, rtol=1e-5)
    # scalings restored exactly, adapter weights untouched
    assert _scalings(model) == scalings
    with pytest.raises(RuntimeError), scale_lora(model, 0.5):
        raise RuntimeError("restores on error")
    assert _scalings(model) == scalings


def test_lambda_search_scores_each_interpolant(tiny_llama_dir):
    model = _load(tiny_llama_dir, lora=True)
    set_lora_b(model)
    ref = next(m for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "scaling"))
    full = ref.get_delta_weight("default").norm().item()

    def score(m):  # utility falls linearly with the size of the adapter delta: 1 - λ
        return 1.0 - ref.get_delta_weight("default").norm().item() / full

    result = lambda_search(model, [0.5, 0.1, 0.3, 0.2], score, tolerance=0.25)
    assert [p["lambda"] for p in result["curve"]] == [0.0, 0.1, 0.2, 0.3, 0.5]
    for p in result["curve"]:
        assert p["score"] == pytest.approx(1 - p["lambda"], abs=1e-5)
    assert result["chosen_lambda"] == 0.2 and result["baseline"] == pytest.approx(1.0)
    assert score(model) == pytest.approx(0.0, abs=1e-6)  # back at the trained model


@pytest.mark.parametrize("lora", [False, True])
def test_saved_interpolated_model_loads_with_same_logits(tiny_llama_dir, tiny_tokenizer, tmp_path, lora):
    from transformers import AutoModelForCausalLM

    model = _load(tiny_llama_dir, lora=lora)
    original = None if lora else trainable_state(model)
    (set_lora_b if lora else perturb_weights)(model)
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    ctx = scale_lora(model, 0.4) if lora else interpolated_params(model, original, 0.4)
    with ctx, torch.no_grad():
        expected = model(input_ids=ids).logits
        save_merged(model, tiny_tokenizer, tmp_path / "interpolated")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "interpolated")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    if lora:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    else:
        assert torch.equal(got, expected)
    assert (tmp_path / "interpolated" / "tokenizer_config.json").exists()
