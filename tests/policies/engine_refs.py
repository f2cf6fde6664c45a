"""What the engine's answers are checked against: HF's own forward on the same weights."""

from __future__ import annotations

import torch


def reference_logprobs(model, prompt, output_ids, temperature):
    """log_softmax(logits / T) of each generated token, from one unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + output_ids])).logits[0].float()
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(output_ids)]
    scaled = steps / (temperature if temperature > 0 else 1.0)
    chosen = torch.log_softmax(scaled, -1).gather(-1, torch.tensor(output_ids)[:, None])[:, 0]
    return chosen, steps
