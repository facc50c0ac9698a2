"""One tiny trained run (3 steps, seq_len 32) shared by the eval tests."""

import pytest
from tiny_runs import QUICKSTART, TINY_DATA, TINY_HYBRID

TINY = [*TINY_HYBRID, *TINY_DATA, "optim.warmup_steps=1", "steps=3"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from memzoo.config import load_config
    from memzoo.train.loop import train

    out = tmp_path_factory.mktemp("eval_runs")
    summary = train(load_config(QUICKSTART, [*TINY, f"output_dir={out}"]))
    assert summary["final_step"] == 3
    return out / "quickstart"
