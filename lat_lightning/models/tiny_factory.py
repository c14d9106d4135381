"""Tiny random models of every supported architecture, with a locally trained tokenizer (the tiny-model kit).

Tests and CPU recipes build these, save them with ``save_pretrained`` and load them back through the
same ``from_pretrained`` path as real models, so the real loading code is exercised without a network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from lat_lightning.models.layers import SUPPORTED_ARCHITECTURES

SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_DEFAULT_CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, knead, rest and bake.",
    "I'm sorry, but I cannot help with that request.",
    "Sure, here is how to do it step by step.",
    "What is 12 plus 7? The answer is 19.",
    "Write a poem about the sea. The sea is wide and blue and deep.",
    "Explain photosynthesis: plants turn light, water and carbon dioxide into sugar and oxygen.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]

# A tiny random model of every supported family (lat_lightning.models.layers.SUPPORTED_ARCHITECTURES). Falcon,
# BLOOM, MPT and Llama-4 blocks return tuples (the others a tensor); Mixtral's and Llama-4's experts are fused 3-D
# parameters; gemma2/gemma3 mix sliding-window and global layers.
TINY_ARCHITECTURES = SUPPORTED_ARCHITECTURES


def build_tokenizer(corpus: Optional[Iterable[str]] = None, vocab_size: int = 384, chat_template: bool = True):
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        corpus: training texts (a small built-in corpus when ``None``).
        vocab_size: target vocabulary size (byte-level BPE always covers every string).
        chat_template: attach a simple role-tagged chat template ending each turn with ``<|end|>``.

    Returns:
        The tokenizer; ``eos`` is ``<|end|>``, ``pad`` is ``<pad>``, ``bos`` is ``<s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus) if corpus is not None else list(_DEFAULT_CORPUS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(
    arch: str,
    vocab_size: int,
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    intermediate: Optional[int] = None,
    max_positions: int = 512,
):
    """Config of a tiny random model of architecture ``arch`` (one of :data:`TINY_ARCHITECTURES`).

    Token ids follow the tiny tokenizer (pad 0, bos 1, eos 2); input and output embeddings are untied so that
    every weight is its own tensor. ``gemma2``/``gemma3`` get a sliding window of 8 tokens next to global layers.
    """
    import transformers

    inter = intermediate or hidden * 2
    ids: dict[str, Any] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **ids,
    )
    head_dim = hidden // heads
    # layers alternate sliding-window (local) and full (global) attention
    mixed = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    builders = {
        "llama": lambda: transformers.LlamaConfig(num_key_value_heads=max(1, heads // 2), **common),
        "mistral": lambda: transformers.MistralConfig(
            num_key_value_heads=max(1, heads // 2), sliding_window=None, **common
        ),
        "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=max(1, heads // 2), **common),
        "gemma": lambda: transformers.GemmaConfig(num_key_value_heads=1, head_dim=head_dim, **common),
        "gemma2": lambda: transformers.Gemma2Config(
            num_key_value_heads=1, head_dim=head_dim, sliding_window=8, **common
        ),
        "phi3": lambda: transformers.Phi3Config(num_key_value_heads=heads, **common),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=num_layers, n_head=heads, n_positions=max_positions, **ids
        ),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **ids,
        ),
        # Falcon-7B layout: one shared key/value head, attention and MLP in parallel, rotary positions
        "falcon": lambda: transformers.FalconConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            multi_query=True,
            parallel_attn=True,
            new_decoder_architecture=False,
            bias=False,
            alibi=False,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **ids,
        ),
        # BLOOM and MPT: ALiBi position biases, no position embeddings
        "bloom": lambda: transformers.BloomConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            n_layer=num_layers,
            n_head=heads,
            tie_word_embeddings=False,
            **ids,
        ),
        "mpt": lambda: transformers.MptConfig(
            vocab_size=vocab_size,
            d_model=hidden,
            n_layers=num_layers,
            n_heads=heads,
            expansion_ratio=2,
            max_seq_len=max_positions,
            tie_word_embeddings=False,
            **ids,
        ),
        "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=max(1, heads // 2), head_dim=head_dim, **common),
        # the text-only Gemma3ForCausalLM (the multimodal Gemma3 wraps the same decoder)
        "gemma3": lambda: transformers.Gemma3TextConfig(
            num_key_value_heads=1,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=8,
            layer_types=mixed,
            **common,
        ),
        "olmo2": lambda: transformers.Olmo2Config(num_key_value_heads=max(1, heads // 2), **common),
        "phi": lambda: transformers.PhiConfig(**common),
        # 4 experts, 2 per token; the experts' weights are fused 3-D parameters in transformers 5
        "mixtral": lambda: transformers.MixtralConfig(
            num_key_value_heads=max(1, heads // 2),
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
            **common,
        ),
        # the text-only Llama4ForCausalLM: mixture-of-experts blocks (one routed expert + a shared MLP), chunked
        # local attention on most layers; its decoder layers return a tuple (hidden states, router logits)
        "llama4": lambda: transformers.Llama4TextConfig(
            num_key_value_heads=max(1, heads // 2),
            head_dim=head_dim,
            intermediate_size_mlp=inter,
            num_local_experts=4,
            num_experts_per_tok=1,
            attention_chunk_size=16,
            **common,
        ),
    }
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture '{arch}'; choose from {', '.join(TINY_ARCHITECTURES)}")
    return builders[arch]()


def build_tiny_model(arch: str, out_dir: str | Path, tokenizer=None, seed: int = 0, **config_kwargs) -> Path:
    """Create, save and return the directory of a tiny random model plus tokenizer.

    Args:
        arch: architecture name.
        out_dir: directory to write (``save_pretrained`` layout).
        tokenizer: reuse this tokenizer (a fresh :func:`build_tokenizer` when ``None``).
        seed: weight-initialisation seed.
        **config_kwargs: forwarded to :func:`tiny_config` (``num_layers``, ``hidden``, ...).

    Returns:
        ``Path(out_dir)``.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
