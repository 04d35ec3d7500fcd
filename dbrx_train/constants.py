"""What data/ and model/ agree on, below both: the label that no loss reads, and the next-token shift."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a label position no loss or metric reads (padding, prompts not trained on)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target of each position `(batch, seq)`: the next position's label; `IGNORE_INDEX` at the last."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets
