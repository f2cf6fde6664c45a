"""Causal LMs built from a config with random weights, saved as HF checkpoints engines can load."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, Qwen3Config


def qwen3_config(
    *,
    vocab_size: int,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    ffn_hidden_size: int,
    max_position_embeddings: int,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    kv_channels: int = 0,
) -> Qwen3Config:
    """kv_channels: the head size (Megatron's name; Qwen3-0.6B: 16 heads x 128 over hidden 1024); 0:
    hidden_size // num_attention_heads."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=ffn_hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_query_groups,
        head_dim=kv_channels or hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def write_random_checkpoint(
    out_dir: Path, config: Qwen3Config, tokenizer: PreTrainedTokenizerBase, *, seed: int
) -> Path:
    """Save a random-init model and its tokenizer as an HF directory; returns ``out_dir``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
