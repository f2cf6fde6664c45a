"""RUN, MODEL, CKPT and LOGGING: what runs, from which model, and where it reads and writes."""

from __future__ import annotations

from typing import Literal

from runtime.config.fields import NonNeg, Pos, Section


class RunConfig(Section):
    """RUN: what to run and where it writes."""

    recipe: str = "default"  # a built-in recipe (launchers.recipes)
    run_dir: str = ""  # default: runs/<recipe>-<timestamp>
    overwrite: bool = False  # replace the run recorded in a non-empty --run-dir (refused without it, or --load)
    backend: Literal["local", "ray"] = "local"  # ray: every long-lived part a Ray actor (pip install -e '.[ray]')
    ray_address: str = ""  # an existing Ray cluster (host:port); empty: $RAY_ADDRESS, else start a local one
    seed: int = 1234
    progress: Literal["auto", "rich", "bar", "lines", "off"] = "auto"  # auto: rich (or bar) on a terminal, else lines


class ModelConfig(Section):
    """MODEL: the shape of the random-init model built when no ``--hf-checkpoint`` is given."""

    num_layers: Pos = 2
    hidden_size: Pos = 64
    num_attention_heads: Pos = 4
    num_query_groups: Pos = 2  # key/value heads
    kv_channels: NonNeg = 0  # the head size; 0: hidden-size / num-attention-heads (Qwen3-0.6B: 128 over 1024)
    ffn_hidden_size: Pos = 128
    max_position_embeddings: Pos = 64
    vocab_size: NonNeg = 0  # 0: the tokenizer's; larger pads the embedding (e.g. 151936, Qwen3's)


class CkptConfig(Section):
    """CKPT: model and tokenizer source."""

    hf_checkpoint: str = ""  # a local HF directory; empty: build the recipe's model from MODEL
    save: str = ""  # directory for resumable checkpoints; empty: none
    save_interval: NonNeg = 0  # learner steps between checkpoints; 0: only at the end
    load: str = ""  # resume from the latest checkpoint in this directory
    ref_load: str = ""  # HF directory of the KL reference (--use-kl-loss); default: the initial policy


class LogConfig(Section):
    """LOGGING: where metrics and the timeline go (metrics.jsonl is always written)."""

    trace: bool = True  # write trace.json, a timeline of every actor (open it in ui.perfetto.dev)
    trace_max_events: Pos = 2_000_000  # events past this are counted, not written
    use_tensorboard: bool = False  # also write TensorBoard event files to <run-dir>/tensorboard
    use_wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "asyncrl"
    wandb_group: str = ""
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: $WANDB_MODE, else online
    metrics_sink: str = ""  # module:function returning an extra sink (write(step, metrics), close())
