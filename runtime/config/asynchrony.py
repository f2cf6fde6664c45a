"""ASYNC and FAULT: freshness against throughput, and the timeouts and restarts that keep a run alive."""

from __future__ import annotations

from typing import Literal

from runtime.config.fields import NonNeg, NonNegF, Pos, PosF, Section


class AsyncConfig(Section):
    """ASYNC: freshness against throughput, and the timeouts that keep the loop from hanging."""

    max_staleness: NonNeg = 1  # policy versions; 0 = synchronous on-policy
    # what a weight update does to requests in flight. keep: frozen between decode steps, they
    # continue on their KV cache (needs an engine that dates each token, as the embedded one does);
    # recompute: they end, and are re-sent with the tokens so far, re-prefilled under the new weights
    partial_rollout_mode: Literal["keep", "recompute"] = "keep"
    over_sampling_batch_size: Pos | None = None  # prompts in flight per rollout batch (APRIL); default: no extra
    # recompute: generated again from its prompt; drop: dropped; mask: carried on, its tokens past the
    # bound kept as context but masked from the loss (Miles's --mask-offpolicy-in-partial-rollout, per token)
    partial_expiry: Literal["recompute", "drop", "mask"] = "recompute"  # over-sampled groups past their deadline
    buffer_capacity: Pos | None = None  # groups; default (max_staleness + 1) * groups per step
    engine_timeout: PosF = 120.0  # seconds for one engine call
    engine_start_timeout: PosF = 180.0  # seconds for an engine to load and answer /health_generate
    weight_sync_timeout: PosF = 120.0  # seconds for pause + load + continue on every engine
    stall_timeout: PosF = 600.0  # no learner step for this long ends the run with a dump

    @property
    def pause_mode(self) -> str:
        """The engines' /pause_generation mode for ``partial_rollout_mode``."""
        return "in_place" if self.partial_rollout_mode == "keep" else "abort"


class FaultConfig(Section):
    """FAULT: engine health checks, restarts, and fault injection (chaos) for testing them."""

    health_check_interval: NonNegF = 2.0  # seconds between probes of every engine; 0: no probes
    health_check_timeout: PosF = 10.0  # a probe slower than this marks the engine hung
    engine_progress_timeout: PosF = 60.0  # requests in flight and none finished for this long: hung
    max_engine_restarts: NonNeg = 5  # per engine within --engine-restart-window; one more ends the run
    engine_restart_window: PosF = 300.0  # seconds
    # samples failing in a row on one cause (engine errors, reward errors or timeouts) that end the
    # run with the first error, instead of spinning until --stall-timeout; 0: never
    max_consecutive_failures: NonNeg = 256
    chaos_kill_interval: NonNegF = 0.0  # fault injection: SIGKILL a random engine every N seconds; 0: off
    chaos_hang_at: NonNegF = 0.0  # fault injection: SIGSTOP one engine once, N seconds in; 0: off
    chaos_seed: int = 0
