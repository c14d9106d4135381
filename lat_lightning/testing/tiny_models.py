"""Tiny random models of every supported architecture, with a locally trained tokenizer.

Tests and CPU recipes build these, save them with ``save_pretrained`` and load them back through the
same ``from_pretrained`` path as real models, so the real loading code is exercised without a network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch

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

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox")


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
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, num_layers: int = 4, hidden: int = 64, heads: int = 4,
                intermediate: Optional[int] = None, max_positions: int = 512):
    """Config of a tiny random model of architecture ``arch`` (one of :data:`TINY_ARCHITECTURES`)."""
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    inter = intermediate or hidden * 2
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=num_layers,
                  num_attention_heads=heads, max_position_embeddings=max_positions, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=max(1, heads // 2), **common)
    if arch == "mistral":
        return MistralConfig(num_key_value_heads=max(1, heads // 2), sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=max(1, heads // 2), **common)
    if arch == "gemma":
        return GemmaConfig(num_key_value_heads=1, head_dim=hidden // heads, **common)
    if arch == "gemma2":
        return Gemma2Config(num_key_value_heads=1, head_dim=hidden // heads, sliding_window=8, **common)
    if arch == "phi3":
        return Phi3Config(num_key_value_heads=heads, **common)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=num_layers, n_head=heads,
                          n_positions=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
                             num_hidden_layers=num_layers, num_attention_heads=heads,
                             max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             tie_word_embeddings=False)
    raise ValueError(f"unknown tiny architecture '{arch}'; choose from {', '.join(TINY_ARCHITECTURES)}")


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
