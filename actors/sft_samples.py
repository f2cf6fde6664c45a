"""SFT samples: what the generator runs in place of engines when the loss is ``sft_loss``.

The generator admits, buffers and checkpoints an SFT group exactly as an RL group (so the buffer
holds the next batches while the learner trains: the prefetch, bounded by the buffer's capacity),
but its one sample is read, not generated: the conversation's tokens after the prompt, with the
assistant-only loss mask, dated with the group's admission version (the buffer's deadline keeps
staleness bounded as for any group; an SFT token has no behavior policy, so logprobs are 0).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from buffers.types import Prompt, Sample, Status


class SftSamples:
    """``example(cursor)``: the (token ids, assistant mask) of the conversation at that data cursor."""

    def __init__(self, example: Callable[[int], tuple[list[int], list[int]]]):
        self.example = example
        self.counters: Counter[str] = Counter()

    async def run_group(self, prompt: Prompt, samples: Sequence[Sample], *, base_version: int) -> list[Sample]:
        """Fill every sample from the data; returns none to score."""
        ids, mask = self.example(prompt.index)
        head = len(prompt.input_ids)
        if ids[:head] != list(prompt.input_ids):
            raise ValueError(f"prompt {prompt.index} is not the head of its conversation")
        for s in samples:
            if s.response_ids:  # resumed from a checkpoint: already filled
                continue
            s.add_segment(ids[head:], [0.0] * (len(ids) - head), base_version)
            s.loss_mask = list(mask[head:])
            s.status = Status.COMPLETED
        return []
