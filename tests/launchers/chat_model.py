"""A tiny Hugging Face model directory built in the test: a random Qwen3-shaped model, a
word-level tokenizer with a ChatML-like chat template, and a generation config whose
``eos_token_id`` lists the end-of-turn token (as chat models do). No download."""

from __future__ import annotations

import json
from pathlib import Path

from policies.model import qwen3_config, write_random_checkpoint
from policies.tokenizer import word_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = [str(d) for d in range(10)] + ["+", "=", "what", "is", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def build_chat_model(path: Path, *, seed: int = 0, max_positions: int = 64) -> Path:
    tok = word_tokenizer(WORDS)
    tok.chat_template = TEMPLATE
    end = tok.convert_tokens_to_ids("<|end|>")
    config = qwen3_config(vocab_size=len(tok), num_layers=1, hidden_size=32, num_attention_heads=2,
                          num_query_groups=1, ffn_hidden_size=64, max_position_embeddings=max_positions,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    write_random_checkpoint(path, config, tok, seed=seed)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, end]}))
    return path
