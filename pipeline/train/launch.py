"""The training stages: one process (``trainer.backend=local``) or Ray Train (``ray``, the default)."""

from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.train.distributed import fit_ray
from pipeline.train.trainer import fit

log = logging.getLogger(__name__)


def _train(kind: str, config: Config) -> dict:
    if config.trainer.backend == "local":
        if config.trainer.num_workers > 1:
            log.warning(
                "trainer.backend=local trains in one process: trainer.num_workers=%d is ignored",
                config.trainer.num_workers,
            )
        return fit(kind, config)
    return fit_ray(kind, config)


def train_classifier(config: Config) -> dict:
    """Stage: fine-tune / train the Explanandum with BCE on ``data.train``."""
    return _train("classifier", config)


def train_explainer(config: Config) -> dict:
    """Stage: train an Explainer for the frozen Explanandum ``explanandum.model``."""
    return _train("explainer", config)
