"""Fixtures shared by the weight-transport tests."""

from __future__ import annotations

import pytest

from policies.model import qwen3_config, write_random_checkpoint


@pytest.fixture(scope="module")
def checkpoints(copy_task, tmp_path_factory):
    """Two random checkpoints (versions 0 and 1) of a tiny Qwen3 on the copy task's tokenizer, and its pad id."""
    tok = copy_task.tokenizer
    cfg = qwen3_config(vocab_size=len(tok), num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=1,
                       ffn_hidden_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    root = tmp_path_factory.mktemp("ckpts")
    return [write_random_checkpoint(root / f"v{i}", cfg, tok, seed=i) for i in range(2)], tok.pad_token_id
