"""Learning-rate schedules (``optim.schedule``), as a ``LambdaLR`` stepped once per optimizer step.

* ``constant``: the configured lr (after the warm-up, if any);
* ``cosine``: cosine decay from the lr to 0 over the run's optimizer steps (after the warm-up).

Warm-up (``optim.warmup_steps`` = W > 0): optimizer step ``s`` (0-based) uses ``lr * (s + 1) / W``
for ``s < W``, so the first step uses ``lr / W`` and step ``W - 1`` the full lr. Cosine then uses
``lr * 0.5 * (1 + cos(pi * (s - W) / (T - W)))`` for ``W <= s < T`` (``T`` = total optimizer steps)
and 0 from ``T`` on. The scheduler's state goes into the checkpoint next to the optimizer's.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int | None) -> float:
    """The multiplier of the base lr at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        if not total_steps:
            raise ValueError("a cosine schedule needs the total number of optimizer steps")
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; use constant or cosine")


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int | None
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A ``LambdaLR`` for the schedule, or None for a constant lr without warm-up (nothing to do)."""
    if schedule == "constant" and warmup_steps <= 0:
        return None
    lr_factor(0, schedule, warmup_steps, total_steps)  # fail early on a bad schedule
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, warmup_steps, total_steps)
    )


def total_optimizer_steps(
    epochs: int, samples: int, world: int, batch_size: int, grad_accum: int, max_steps: int | None
) -> int:
    """Optimizer steps the run will take: ``max_steps``, or all epochs' batches per rank / accumulation."""
    per_epoch = max(1, math.ceil(samples / world / batch_size) // grad_accum)
    total = epochs * per_epoch
    return min(total, max_steps) if max_steps is not None else total
