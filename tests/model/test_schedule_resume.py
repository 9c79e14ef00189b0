"""``optim.schedule`` in the training loop: stepped per optimizer step, saved and restored on resume."""

from __future__ import annotations

import pytest

from pipeline import checkpoint as ckpt
from pipeline.config import IngestConfig, load_config
from pipeline.data.ingest import ingest
from pipeline.data.synthetic import SyntheticReader
from pipeline.train.schedule import lr_factor
from pipeline.train.trainer import fit

SIZE = 32
LR = 0.003


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    ingest(
        SyntheticReader(96, 0, "train", image_size=SIZE),
        str(root),
        "train",
        IngestConfig(workers=1, shard_size=16),
        progress=False,
    )
    return root


def test_cosine_schedule_is_checkpointed_and_resumed(data, tmp_path):
    def run(epochs: int) -> dict:
        config = load_config(
            None,
            [
                f"data.train={data}/train",
                f"data.image_size={SIZE}",
                "data.loader_workers=0",
                "data.shuffle_buffer=32",
                "trainer.batch_size=16",
                f"trainer.storage={tmp_path}/ckpt",
                f"optim.lr={LR}",
                "trainer.backend=local",
                "tracking.enabled=false",
                "optim.schedule=cosine",
                "optim.warmup_steps=2",
                "trainer.run_name=sched",
                f"trainer.epochs={epochs}",
            ],
        )
        fit("classifier", config, progress=False)
        return ckpt.load_checkpoint(str(tmp_path / "ckpt" / "sched" / "last.pt"))[0]

    first = run(1)  # 6 optimizer steps (96 / 16) of a 6-step cosine
    assert first["scheduler"]["last_epoch"] == 6
    assert first["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # end of its cosine
    second = run(3)  # resumes at step 6 and runs to 18 (the schedule's length is now 18 steps)
    assert second["step"] == 18 and second["scheduler"]["last_epoch"] == 18  # a fresh scheduler would say 12
    assert second["optimizer"]["param_groups"][0]["lr"] == pytest.approx(LR * lr_factor(18, "cosine", 2, 18), abs=1e-12)
