import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lat_lightning.callbacks import FragileLayerSelector, KLTeacher, WeightInterpolation
from lat_lightning.stages.fit_setup import build_module, build_training_callbacks, weight_interpolation_callback
from lat_lightning.training.interpolation import interpolated_params, scale_lora


def _distance_score(model, original):
    """1 − ‖θ − θ_orig‖ / ‖θ_trained − θ_orig‖ is 1 − λ on the interpolation line (set `scale` first)."""
    params = dict(model.named_parameters())
    sq = sum(float((params[n].detach() - o).pow(2).sum()) for n, o in original.items())
    return 1.0 - sq**0.5 / _distance_score.scale


def test_full_ft_fit_searches_lambda_saves_and_restores(tiny_llama_dir, tiny_tokenizer, batch, tmp_path, kit):
    from lightning.pytorch.loggers import TensorBoardLogger
    from transformers import AutoModelForCausalLM

    model = kit.load_tiny(tiny_llama_dir)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshot = {}

    class Snapshot(Callback):  # the trained weights, taken before on_fit_end
        def on_train_end(self, trainer, pl_module):
            snapshot.update({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})
            sq = sum(float((snapshot[n] - o).pow(2).sum()) for n, o in original.items())
            _distance_score.scale = sq**0.5

    cfg = kit.make_cfg()
    module = build_module(cfg, model, tiny_tokenizer)
    cb = WeightInterpolation(
        lambdas=[0.0, 0.25, 0.5, 1.0], tolerance=0.3, run_dir=tmp_path, score_fn=lambda m: _distance_score(m, original)
    )
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="")
    kit.fit_module(module, [batch], [Snapshot(), cb], tmp_path, steps=2, logger=logger)

    curve = {p["lambda"]: p["score"] for p in cb.result["curve"]}
    for lam, score in curve.items():
        assert score == pytest.approx(1 - lam, abs=1e-4)
    assert cb.result["chosen_lambda"] == 0.25 and cb.result["mode"] == "full"
    # trained weights are back in the module (the final/ export must be the trained model)
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    saved = json.loads((tmp_path / "interpolation.json").read_text())
    assert saved["chosen_lambda"] == 0.25 and len(saved["curve"]) == 4
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # interpolated/ is the in-memory θ(0.25), loadable as a plain model
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "interpolated")).eval()
    ids = batch["safe_input_ids"][:2]
    model.eval()
    with interpolated_params(model, original, 0.25), torch.no_grad():
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_lora_search_scales_the_adapter(tiny_llama_dir, tiny_tokenizer, tmp_path, kit):
    from transformers import AutoModelForCausalLM

    model = kit.load_tiny(tiny_llama_dir, lora=True, train=False)
    kit.perturb_lora_b(model)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    module = SimpleNamespace(model=model, tokenizer=tiny_tokenizer)
    layer = next(m for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "scaling"))
    full = layer.get_delta_weight("default").norm().item()
    cb = WeightInterpolation(
        lambdas=[0.1, 0.2, 0.3, 0.4, 0.5],
        tolerance=0.35,
        run_dir=tmp_path,
        score_fn=lambda m: 1.0 - layer.get_delta_weight("default").norm().item() / full,
    )
    cb.setup(None, module, "fit")
    result = cb.run(model, tiny_tokenizer, tmp_path)
    assert result["mode"] == "lora" and result["chosen_lambda"] == 0.3
    assert all(torch.equal(p, adapter[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert layer.get_delta_weight("default").norm().item() == pytest.approx(full)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "interpolated")).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with scale_lora(model, 0.3), torch.no_grad():
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_missing_utility_data_fails_in_setup(tiny_llama_dir, tiny_tokenizer, kit):
    from lat_lightning.errors import ConfigError

    cfg = kit.make_cfg(callbacks={"weight_interpolation": {"enabled": True}})
    cb = weight_interpolation_callback(cfg)
    module = SimpleNamespace(model=torch.nn.Linear(2, 2), tokenizer=tiny_tokenizer)
    with pytest.raises(ConfigError, match="evaluation.utility_data"):
        cb.setup(None, module, "fit")


def test_build_training_callbacks_order(tmp_path, kit):
    cfg = kit.make_cfg(
        callbacks={
            "kl_teacher": {"enabled": True},
            "fragile_layers": {"enabled": True, "method": "nll_probe"},
            "weight_interpolation": {"enabled": True},
        }
    )
    from lat_lightning.stages.settings import scan_settings

    cbs = build_training_callbacks(cfg, tmp_path, scan_settings(cfg))
    assert [type(c) for c in cbs] == [FragileLayerSelector, KLTeacher, WeightInterpolation]
    with pytest.raises(ValueError, match="scan settings"):  # the layer selector is handed the run's scan settings
        build_training_callbacks(cfg, tmp_path)
    assert build_training_callbacks(kit.make_cfg(), tmp_path) == []
