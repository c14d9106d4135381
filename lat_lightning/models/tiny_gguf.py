"""Write a tiny Llama model of the tiny-model kit as a GGUF file, so GGUF loading is tested without a download.

The file follows llama.cpp's layout for the ``llama`` architecture: tensor names ``token_embd``,
``blk.<i>.attn_q`` ..., the query and key rows reordered the way llama.cpp stores them (each head's rotary pairs
interleaved; transformers undoes this on load), and the byte-level BPE tokenizer as ``tokenizer.ggml.*`` metadata
(tokens, merges, token types, special ids, chat template). Tensors are written as float32 (lossless: the loaded
model equals the source bitwise) or quantised to ``Q8_0`` (8-bit blocks of 32, as real GGUF files are).
Needs the ``gguf`` package (the ``gguf`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np

_BLOCK_TENSORS = {  # transformers name inside a decoder layer -> llama.cpp name
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _interleave_rotary_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection in llama.cpp's order: per head, ``[x0, x_half, x1, x_half+1, ...]``.

    transformers' rotary embedding rotates the first half of a head against the second; llama.cpp's rotates
    adjacent pairs. Storing the rows interleaved makes both compute the same attention.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // heads
    return weight.reshape(heads, 2, head_dim // 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def write_tiny_gguf(model_dir: str | Path, out_path: str | Path, quantization: str = "F32") -> Path:
    """Write the tiny Llama saved in ``model_dir`` (:func:`~lat_lightning.models.tiny_factory.build_tiny_model`)
    with its tokenizer as a GGUF file.

    Args:
        model_dir: a tiny ``llama`` directory (``save_pretrained`` layout, byte-level BPE tokenizer).
        out_path: the ``.gguf`` file to write.
        quantization: ``F32`` (lossless) or ``Q8_0`` for the 2-D weights (norms stay float32, as in llama.cpp).

    Returns:
        ``Path(out_path)``.
    """
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise ValueError(f"write_tiny_gguf writes Llama models only, not {config.model_type}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    head_dim = config.hidden_size // config.num_attention_heads

    writer = gguf.GGUFWriter(str(out_path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    # the byte-level BPE tokenizer: vocabulary in id order, merges, special tokens marked as control tokens
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens: list[str | None] = [None] * len(tokenizer)
    for token, index in list(vocab.items()) + [(t["content"], t["id"]) for t in state["added_tokens"]]:
        tokens[index] = token
    special = {t["id"] for t in state["added_tokens"] if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(cast("list[str]", tokens))  # every id has its token: the vocabulary covers them all
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    names = dict(_TOP_TENSORS)
    for layer in range(config.num_hidden_layers):
        names.update({f"model.layers.{layer}.{hf}": f"blk.{layer}.{cpp}" for hf, cpp in _BLOCK_TENSORS.items()})
    for hf_name, cpp_name in names.items():
        array = weights[hf_name].astype(np.float32)
        if cpp_name.endswith("attn_q.weight"):
            array = _interleave_rotary_halves(array, config.num_attention_heads)
        elif cpp_name.endswith("attn_k.weight"):
            array = _interleave_rotary_halves(array, config.num_key_value_heads)
        if quantization == "Q8_0" and array.ndim == 2:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(cpp_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        elif quantization in ("F32", "Q8_0"):
            writer.add_tensor(cpp_name, array)
        else:
            raise ValueError(f"quantization must be F32 or Q8_0, not {quantization}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)


__all__ = ["write_tiny_gguf"]
