import pytest
import torch
from omegaconf import OmegaConf

from lat_lightning.attacks import build_attack
from lat_lightning.attacks.asagrad import target_gradients
from lat_lightning.config import PerturbationConfig
from lat_lightning.losses import causal_lm_loss
from tests.helpers.batches import safety_batch


def _attack(settings):
    return build_attack(settings.attack, settings)


def _cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(PerturbationConfig), {"attack": "asagrad", **kw})


def _harmful_loss(model, batch, pert=None):
    kwargs = dict(input_ids=batch["harmful_input_ids"], attention_mask=batch["harmful_attention_mask"])
    with torch.no_grad():
        if pert is None:
            return float(causal_lm_loss(model(**kwargs).logits, batch["harmful_labels"]))
        with pert.applied(model):
            return float(causal_lm_loss(model(**kwargs).logits, batch["harmful_labels"]))


@pytest.mark.parametrize("layer", [0, 2])
def test_default_sign_step_lowers_harmful_target_loss(tiny_llama, layer):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=4)
    clean = _harmful_loss(model, batch)
    descend = _attack(_cfg(positions="all", alpha=0.5)).make(model, batch, [layer])
    ascend = _attack(_cfg(positions="all", alpha=0.5, sign="ascend")).make(model, batch, [layer])
    assert _harmful_loss(model, batch, descend) < clean < _harmful_loss(model, batch, ascend)


def test_sign_gradient_leaves_weight_grads_untouched(tiny_llama):
    model, tok = tiny_llama
    model.train()
    batch = safety_batch(tok, n=2)
    _attack(_cfg()).make(model, batch, [1, 3])
    assert all(p.grad is None for p in model.parameters())


def test_earliest_layer_gradients_equal_full_model(tiny_llama):
    model, tok = tiny_llama
    batch = safety_batch(tok, n=3)
    fast, _, loss_fast = target_gradients(model, batch, [1, 3], "all")
    full, _, loss_full = target_gradients(model, batch, [1, 3], "all", from_earliest_layer=False)
    assert loss_fast == pytest.approx(loss_full, abs=1e-6)
    for layer in (1, 3):
        torch.testing.assert_close(fast[layer], full[layer], atol=1e-6, rtol=1e-5)
