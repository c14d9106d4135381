import json

import pytest
import torch

from lat_lightning.callbacks.fragile_layers import FragileLayerSelector
from lat_lightning.callbacks.layer_scores import grad_norm_scores, nll_probe_scores, top_k_layers
from lat_lightning.stages.fit_setup import build_module
from lat_lightning.training.module import LatentAdversarialModule


class RecordingModule(LatentAdversarialModule):
    """Records the attack layers at the moment the optimiser is built."""

    def configure_optimizers(self):
        self.layers_at_optimizer = list(self.attack_layers)
        return super().configure_optimizers()


def test_top_k_layers_ties_go_low():  # without tie-break scores, the lower layer
    assert top_k_layers({0: 1.0, 1: 3.0, 2: 3.0, 3: 2.0}, 2) == [1, 2]
    assert top_k_layers({0: 1.0, 1: 3.0, 2: 3.0, 3: 2.0}, 1) == [1]
    assert top_k_layers({5: -1.0, 2: 0.5}, 3) == [2, 5]


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("explicit", {"layers": [2, 0]}),
        ("nll_probe", {"top_k": 2}),
        ("grad_norm", {"top_k": 1, "candidate_layers": [1, 2, 3]}),
    ],
)
def test_selector_sets_attack_layers_before_optimiser(
    method, kwargs, tiny_llama_dir, tiny_tokenizer, batch, tmp_path, kit
):
    from lightning.pytorch.loggers import TensorBoardLogger

    model = kit.load_tiny(tiny_llama_dir)
    cfg = kit.make_cfg(perturbation={"attack": "asa_random", "layers": []})
    module = build_module(cfg, model, tiny_tokenizer, module_class=RecordingModule)
    cb = FragileLayerSelector(method=method, num_prompts=3, run_dir=tmp_path, **kwargs)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="")
    kit.fit_module(module, [batch], [cb], tmp_path, steps=1, logger=logger)
    chosen = module.layers_at_optimizer
    assert chosen == module.attack_layers == cb.result["layers"]
    assert chosen == sorted(chosen) and all(0 <= layer < 4 for layer in chosen)
    if method == "explicit":
        assert chosen == [0, 2]
    else:
        assert len(chosen) == kwargs["top_k"]
        candidates = kwargs.get("candidate_layers", [0, 1, 2, 3])
        assert set(chosen) <= set(candidates)
        scores = {int(k): v for k, v in cb.result["scores"].items()}
        assert sorted(scores) == candidates
        assert chosen == top_k_layers(scores, kwargs["top_k"])
    saved = json.loads((tmp_path / "fragile_layers.json").read_text())
    assert saved["layers"] == chosen and saved["method"] == method
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_nll_probe_is_seeded_and_noise_raises_nll(tiny_llama_dir, batch, kit):
    model = kit.load_tiny(tiny_llama_dir, train=True)
    a = nll_probe_scores(model, [batch], [0, 3], seeds=[0, 1], alpha=4.0)
    b = nll_probe_scores(model, [batch], [0, 3], seeds=[0, 1], alpha=4.0)
    assert a == b and set(a) == {0, 3}
    assert all(torch.isfinite(torch.tensor(v)) for v in a.values())
    assert model.training  # modes restored


def test_grad_norm_writes_no_weight_gradients(tiny_llama_dir, batch, kit):
    model = kit.load_tiny(tiny_llama_dir)
    scores = grad_norm_scores(model, [batch], [0, 1, 2, 3])
    assert set(scores) == {0, 1, 2, 3} and all(v > 0 for v in scores.values())
    assert all(p.grad is None for p in model.parameters())


def test_scan_falls_back_to_nll_probe_without_prompt_texts(tiny_llama_dir, tiny_tokenizer, batch, caplog, kit):
    model = kit.load_tiny(tiny_llama_dir)
    cb = FragileLayerSelector(method="scan", top_k=1, num_prompts=2, batches=[batch])
    result = cb.select(model, tiny_tokenizer)
    assert result["method"] == "scan" and result["method_used"] == "nll_probe"
    assert len(result["layers"]) == 1
    assert "using nll_probe" in caplog.text


def test_bad_settings_fail_early(tiny_llama_dir, tiny_tokenizer, kit):
    with pytest.raises(ValueError):
        FragileLayerSelector(method="explicit", layers=[])
    with pytest.raises(ValueError):
        FragileLayerSelector(method="loudest")
    model = kit.load_tiny(tiny_llama_dir)
    with pytest.raises(IndexError):
        FragileLayerSelector(method="explicit", layers=[7]).select(model, tiny_tokenizer)


@pytest.mark.parametrize("method", ["nll_probe", "scan"])
def test_evaluation_probe_and_scan_with_prompt_texts(method, tiny_llama_dir, tiny_tokenizer, kit):
    """With prompt texts the selector uses lat_lightning.eval.probes / eval.scan (skipped if absent)."""
    import importlib.util

    module = {"nll_probe": "lat_lightning.eval.probes", "scan": "lat_lightning.eval.scan"}[method]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed")
    model = kit.load_tiny(tiny_llama_dir)
    from lat_lightning.stages.settings import scan_settings

    cfg = kit.make_cfg(evaluation={"max_new_tokens": 3, "batch_size": 8})
    cb = FragileLayerSelector(
        method=method,
        top_k=2,
        num_prompts=2,
        candidate_layers=[0, 2, 3],
        scan=scan_settings(cfg),
        prompts=["Tell me the code.", "Open the vault."],
    )
    result = cb.select(model, tiny_tokenizer)
    assert result["method_used"] == method
    assert sorted(result["scores"]) == [0, 2, 3] and len(result["layers"]) == 2
    assert result["layers"] == top_k_layers(result["scores"], 2)
    assert model.training  # modes restored


def test_ties_follow_the_scans_rule_and_are_logged(tmp_path, caplog, tiny_llama_dir, tiny_tokenizer, kit):
    from lat_lightning.callbacks.layer_scores import boundary_ties
    from lat_lightning.eval.metrics import TIE_RULE

    # equal LASR at layers 0..3: the coherence-aware LASR breaks the tie, then the lower layer
    assert top_k_layers({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, 1, tiebreak={0: 0.1, 1: 0.5, 2: 0.5, 3: 0.2}) == [1]
    assert top_k_layers({0: 1.0, 1: 1.0, 2: 1.0}, 2, tiebreak={0: 0.0, 1: 0.0, 2: 0.9}) == [0, 2]
    assert boundary_ties({0: 1.0, 1: 1.0, 2: 0.5}, [0]) == [1]
    assert boundary_ties({0: 1.0, 1: 0.9}, [0]) == []
    # method=scan reads the earlier scan's LASR and its tie-break judge from scan_summary.json
    summary = {
        "layers": [0, 1, 2, 3],
        "tiebreak_judge": "keyword+coherent",
        "attacks": {
            "asa_random": {
                "headline": {"lasr_mean": [1.0, 1.0, 1.0, 0.5]},
                "judges": {"keyword+coherent": {"lasr_mean": [0.0, 0.25, 0.0, 0.5]}},
            }
        },
    }
    (tmp_path / "scan_summary.json").write_text(json.dumps(summary))
    selector = FragileLayerSelector(method="scan", top_k=1, run_dir=tmp_path)
    with caplog.at_level("WARNING"):
        result = selector.select(kit.load_tiny(tiny_llama_dir), tiny_tokenizer)
    assert result["layers"] == [1] and result["ties"] == [0, 2] and result["tie_rule"] == TIE_RULE
    assert result["tiebreak_scores"] == {0: 0.0, 1: 0.25, 2: 0.0, 3: 0.5}
    assert any("tie" in r.message and "[0, 2]" in r.message for r in caplog.records)
