"""``optim.schedule``: cosine with warm-up gives the expected lr per optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import WysiwycError
from pipeline.train.schedule import build_scheduler, lr_factor, total_optimizer_steps


def _lrs(schedule: str, warmup: int, total: int, steps: int, lr: float = 0.1) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=lr)
    scheduler = build_scheduler(optimizer, schedule, warmup, total)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])  # the lr this optimizer step uses
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return seen


def test_cosine_with_warmup():
    lrs = _lrs("cosine", warmup=4, total=14, steps=16)
    assert lrs[0] == pytest.approx(0.1 / 4)
    assert lrs[1] == pytest.approx(0.1 * 2 / 4)
    assert lrs[3] == pytest.approx(0.1)  # end of warm-up: full lr
    assert lrs[4] == pytest.approx(0.1)  # cosine starts at the top
    assert lrs[9] == pytest.approx(0.05)  # half-way through the decay
    assert lrs[6] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 10)))
    assert lrs[14] == pytest.approx(0.0, abs=1e-12) and lrs[15] == pytest.approx(0.0, abs=1e-12)


def test_constant_without_warmup_is_no_scheduler():
    param = torch.nn.Parameter(torch.zeros(1))
    assert build_scheduler(torch.optim.Adam([param]), "constant", 0, None) is None
    assert _lrs("constant", warmup=2, total=10, steps=4) == pytest.approx([0.05, 0.1, 0.1, 0.1])


def test_scheduler_state_round_trips():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=0.1)
    sched = build_scheduler(opt, "cosine", 2, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    opt2 = torch.optim.Adam([param], lr=0.1)
    sched2 = build_scheduler(opt2, "cosine", 2, 10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(5, "cosine", 2, 10))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(6, "cosine", 2, 10))


def test_total_steps_and_config():
    assert total_optimizer_steps(3, 100, 2, 10, 1, None) == 15
    assert total_optimizer_steps(3, 100, 1, 10, 2, 12) == 12
    c = load_config(None, ["optim.schedule=cosine", "optim.warmup_steps=5"])
    assert (c.optim.schedule, c.optim.warmup_steps) == ("cosine", 5)
    with pytest.raises(WysiwycError, match="optim.schedule"):
        load_config(None, ["optim.schedule=linear"])
