"""What keeps one client from stalling ``wysiwyc serve`` (pipeline.serve, the class rule), without a Ray: the
rule that never asks for more masks than the model has classes, the per-request deadline, the deployment's
queue limit. The endpoint itself runs in tests/integration/test_consumers.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from pipeline.errors import WysiwycError
from pipeline.method.class_rule import ClassRule
from pipeline.serve import answer_within, app

CLASSES = ["cat", "dog", "bird"]


def test_a_class_named_thousands_of_times_is_explained_once():
    rule = ClassRule.from_params({"classes": "fixed", "fixed_classes": ",".join(["cat"] * 4000 + ["dog", "cat"])})
    assert rule.fixed == ("cat", "dog")
    assert rule.fixed_indices(CLASSES) == (0, 1)
    assert rule.indices(torch.rand(2, 3), CLASSES) == [[0, 1], [0, 1]]
    assert ClassRule(mode="fixed", fixed=("dog", "dog", "bird")).fixed == ("dog", "bird")  # attribute's too
    with pytest.raises(WysiwycError, match=r"unknown: \['emu'\]"):
        ClassRule(mode="fixed", fixed=("emu",) * 4000).fixed_indices(CLASSES)


def test_a_request_past_its_deadline_is_answered_503_and_its_work_cancelled():
    cancelled = []

    async def slow():
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "late"

    async def fast():
        return "answer"

    started = time.perf_counter()
    late = asyncio.run(answer_within(0.2, slow()))
    assert time.perf_counter() - started < 2
    assert late.status_code == 503 and late.headers["retry-after"] == "1" and cancelled == [True]
    assert "serve.request_timeout_s=0.2" in json.loads(late.body)["error"]
    assert asyncio.run(answer_within(0.2, fast())) == "answer"


def test_the_deployment_caps_its_queue_and_the_settings_are_checked():
    application = app({"model": "models:/m@champion", "max_queued_requests": 7, "request_timeout_s": 3})
    deployment = application._bound_deployment
    assert deployment._deployment_config.max_queued_requests == 7
    assert deployment.init_args[0]["request_timeout_s"] == 3.0
    assert app({"model": "models:/m@champion"})._bound_deployment._deployment_config.max_queued_requests == 64
    for bad in ({"max_queued_requests": 0}, {"request_timeout_s": 0}):
        with pytest.raises(WysiwycError, match=next(iter(bad))):
            app({"model": "models:/m@champion", **bad})
