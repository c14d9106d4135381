import pytest
import torch

from lat_lightning.callbacks.kl_teacher import KLTeacher, kl_divergence_chunked, labelled_logit_mask
from lat_lightning.stages.fit_setup import build_module, kl_teacher_callback

DIRECTIONS = ("teacher_student", "student_teacher")


def _reference_kl(student, teacher, mask, direction):
    s, t = torch.log_softmax(student.double(), -1), torch.log_softmax(teacher.double(), -1)
    kl = (t.exp() * (t - s)).sum(-1) if direction == "teacher_student" else (s.exp() * (s - t)).sum(-1)
    return kl[mask].mean()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_kl_is_exactly_zero_for_identical_logits(direction):
    logits = torch.randn(2, 7, 50) * 3
    mask = torch.rand(2, 7) > 0.3
    for chunk in (1, 3, 128):
        kl = kl_divergence_chunked(logits, logits.clone(), mask, direction, chunk)
        assert kl.item() == 0.0


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_equals_unchunked_and_reference(direction):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 9, 40), torch.randn(3, 9, 40)
    mask = torch.rand(3, 9) > 0.4
    whole = kl_divergence_chunked(student, teacher, mask, direction, chunk_size=10_000)
    for chunk in (1, 2, 5):
        torch.testing.assert_close(kl_divergence_chunked(student, teacher, mask, direction, chunk), whole)
    reference = _reference_kl(student, teacher, mask, direction)
    torch.testing.assert_close(whole.double(), reference, atol=1e-6, rtol=1e-5)
    # The two directions differ for different distributions.
    other = "student_teacher" if direction == "teacher_student" else "teacher_student"
    assert not torch.allclose(whole, kl_divergence_chunked(student, teacher, mask, other))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_masked_positions_are_ignored(direction):
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 6, 30, requires_grad=True), torch.randn(2, 6, 30)
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 1, 1]], dtype=torch.bool)
    kl = kl_divergence_chunked(student, teacher, mask, direction, chunk_size=2)
    changed = teacher.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    assert kl_divergence_chunked(student, changed, mask, direction, 2).item() == kl.item()
    kl.backward()
    assert torch.all(student.grad[~mask] == 0)
    assert student.grad[mask].abs().sum() > 0
    empty = kl_divergence_chunked(student, teacher, torch.zeros(2, 6, dtype=torch.bool), direction)
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_analytic_chunked_backward_matches_autograd(direction):
    torch.manual_seed(2)
    student = torch.randn(2, 4, 6, dtype=torch.double, requires_grad=True)
    teacher = torch.randn(2, 4, 6, dtype=torch.double, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda s, t: kl_divergence_chunked(s, t, mask, direction, chunk_size=2), (student, teacher), fast_mode=True
    )


def test_labelled_logit_mask_shifts_labels():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 3, 4, -100, -100]])
    assert labelled_logit_mask(labels).tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]


def test_lora_teacher_is_the_adapter_disabled_model(tiny_llama_dir, tiny_tokenizer, batch, kit):
    model = kit.load_tiny(tiny_llama_dir, lora=True)
    module = build_module(kit.make_cfg(), model, tiny_tokenizer)
    cb = KLTeacher(weight=0.5, direction="teacher_student", chunk_size=4)
    cb.attach(module)
    assert cb.uses_adapters and cb.teacher is None  # no second copy of the model
    assert module.loss_terms == [cb.loss_term]
    n_params = sum(p.numel() for p in module.parameters())
    assert n_params == sum(p.numel() for p in model.parameters())
    # LoRA B starts at zero: student == teacher, KL exactly zero.
    assert cb.kl(model, batch).item() == 0.0
    kit.perturb_lora_b(model)
    kl = cb.kl(model, batch)
    assert kl.item() > 0
    terms = cb.loss_term(module, batch)
    assert set(terms) == {"kl"}
    torch.testing.assert_close(terms["kl"], 0.5 * kl)
    terms["kl"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_kl_falls_back_to_safe_response_tokens(tiny_tokenizer, batch):
    from tests.helpers.batches import safety_batch

    plain = safety_batch(tiny_tokenizer, n=2)
    ids, attn, labels = KLTeacher.sequences(plain)
    assert ids is plain["safe_input_ids"] and attn is plain["safe_attention_mask"]
    assert labels is plain["safe_labels"]
    assert labelled_logit_mask(labels).sum() == (labels != -100).sum()  # every response token is covered
    ids, _, labels = KLTeacher.sequences(batch)
    assert ids is batch["benign_input_ids"] and labels is batch["benign_labels"]


def test_full_ft_teacher_is_frozen_and_never_checkpointed(tiny_llama_dir, tiny_tokenizer, batch, tmp_path, kit):
    from lightning.pytorch.callbacks import Callback

    model = kit.load_tiny(tiny_llama_dir, lora=False)
    cfg = kit.make_cfg(loss={"toward_safe": 1.0}, callbacks={"kl_teacher": {"enabled": True, "weight": 1.0}})
    module = build_module(cfg, model, tiny_tokenizer)
    cb = kl_teacher_callback(cfg)
    seen = {}

    class Inspect(Callback):
        def on_train_end(self, trainer, pl_module):
            seen["teacher"] = cb.teacher
            seen["state_dict"] = set(pl_module.state_dict())
            seen["in_modules"] = any(cb.teacher is m for m in pl_module.modules())
            path = tmp_path / "c.ckpt"
            trainer.save_checkpoint(str(path))
            seen["ckpt"] = torch.load(path, weights_only=False)

    trainer = kit.fit_module(module, [batch], [cb, Inspect()], tmp_path, steps=1)
    assert "train/loss_kl" in trainer.callback_metrics  # the training step used the term
    assert cb.teacher is None and module.loss_terms == []  # released at teardown
    teacher = seen["teacher"]
    assert teacher is not None and teacher is not model
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    student_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in student_ptrs for p in teacher.parameters())
    # Not a submodule of the LightningModule: its state dict and the checkpoint hold the student only.
    assert not seen["in_modules"]
    assert seen["state_dict"] == {f"model.{k}" for k in model.state_dict()}
    ckpt = seen["ckpt"]
    assert set(ckpt["state_dict"]) == {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}
    assert not any(
        isinstance(v, torch.Tensor)
        for state in ckpt.get("callbacks", {}).values()
        for v in (state.values() if isinstance(state, dict) else [])
    )
    # The teacher is the starting model; the trained student has moved away from it.
    fresh = kit.load_tiny(tiny_llama_dir, lora=False)
    for (n, p), (_, q) in zip(teacher.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    ids, attn, labels = KLTeacher.sequences(batch)
    with torch.no_grad():
        kl = kl_divergence_chunked(
            model(input_ids=ids, attention_mask=attn).logits,
            teacher(input_ids=ids, attention_mask=attn).logits,
            labelled_logit_mask(labels),
        )
    assert kl.item() > 0
