"""Tiny random models for tests: a causal LM and a tokenizer made in code, without any download.

:func:`tiny_random_model` builds a seeded Llama or Qwen2 of a few hundred thousand parameters
whose vocabulary matches a real tokenizer; :func:`byte_tokenizer` is a tokenizer that needs no
model package at all. Both are also importable from :mod:`agents.models`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch/transformers are imported lazily: importing this module stays cheap
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> "PreTrainedTokenizerBase":
    """A byte-level tokenizer made in code: 256 byte tokens + ChatML specials, no merges.

    Needs no model package and no download; for tests that only need *a* tokenizer with a chat
    template (``<|im_start|>``, ``<|im_end|>`` = EOS, ``<|endoftext|>`` = pad).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = _CHATML
    return tokenizer


def tiny_random_model(
    vocab_from: "str | PreTrainedTokenizerBase" = "small",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    architecture: Literal["llama", "qwen2"] = "llama",
    seed: int = 0,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """A tiny randomly initialised causal LM with a real tokenizer, built without any download.

    ``vocab_from`` is a tokenizer, ``"bytes"`` (:func:`byte_tokenizer`, always available), or an
    embedded name read with :func:`agents.models.load_tokenizer` (``"small"``: ~0.1 s once
    cached, a few seconds the very first time; raises :class:`agents.models.MissingModelPackage`
    if not installed). The model's vocabulary matches ``len(tokenizer)``; its weights are seeded
    and the global torch RNG is left untouched. Returned in eval mode, float32, on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from agents.models import ensure_pad_token, load_tokenizer  # here: agents.models imports this module

    if isinstance(vocab_from, str):
        tokenizer = byte_tokenizer() if vocab_from == "bytes" else load_tokenizer(vocab_from)
    else:
        tokenizer = vocab_from
    ensure_pad_token(tokenizer)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,  # fewer: grouped-query attention
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
