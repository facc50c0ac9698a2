"""The learning-rate schedule and the check that a resumed run keeps the schedule it was
saved with (raising ``steps`` under a decaying schedule rebuilds the decay)."""

import dataclasses

import numpy as np
import pytest

from memzoo.config import OptimConfig, load_config
from memzoo.train.optim import SCHEDULE_KEYS, lr_schedule, schedule_change

QUICKSTART = "configs/train/quickstart.yaml"


def cfg_with(*overrides):
    return load_config(QUICKSTART, list(overrides))


def saved_of(cfg):
    """What config.yaml records of the schedule."""
    return {"steps": cfg.steps, "optim": dataclasses.asdict(cfg.optim)}


def test_schedules_warm_up_then_decay_or_hold():
    o = cfg_with("optim.lr=1e-3", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1").optim
    at = np.array([0, 5, 10, 55, 100, 150])
    cos = np.asarray(lr_schedule(dataclasses.replace(o, schedule="cosine"), 100)(at))
    np.testing.assert_allclose(cos, [0, 5e-4, 1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-5)
    const = np.asarray(lr_schedule(dataclasses.replace(o, schedule="constant"), 100)(at))
    np.testing.assert_allclose(const, [0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    # wsd: plateau, then a linear decay over the last 20% of the 90 post-warmup steps
    wsd = lr_schedule(dataclasses.replace(o, schedule="wsd", decay_fraction=0.2), 100)
    np.testing.assert_allclose(np.asarray(wsd(np.array([82, 91, 100]))), [1e-3, 5.5e-4, 1e-4])


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_raising_steps_of_a_decaying_schedule_is_reported(schedule):
    saved = saved_of(cfg_with(f"optim.schedule={schedule}", "steps=2500"))
    extended = cfg_with(f"optim.schedule={schedule}", "steps=5000")
    msg = schedule_change(saved, extended, 2500)
    assert msg is not None and "steps 2500 -> 5000" in msg and "at step 2500" in msg
    # mid-run: cosine differs at once, wsd only where the saved run began to decay
    # wsd decays from step 30 + 2470 - round(0.2 * 2470) = 2006: 2007 is its first lower lr
    first = "1200" if schedule == "cosine" else "2007"
    assert f"at step {first} " in schedule_change(saved, extended, 1200)


def test_an_unchanged_or_constant_schedule_is_not_reported():
    cfg = cfg_with("optim.schedule=cosine", "steps=2500")
    assert schedule_change(saved_of(cfg), cfg, 1200) is None  # a plain resume
    assert schedule_change(saved_of(cfg), cfg, 2500) is None  # rerun of a finished run
    const = cfg_with("optim.schedule=constant", "steps=2500")
    longer = cfg_with("optim.schedule=constant", "steps=5000")
    assert schedule_change(saved_of(const), longer, 2500) is None
    assert schedule_change(saved_of(const), longer, 10) is None  # in the 30-step warmup


def test_changed_optimiser_settings_are_named():
    saved = saved_of(cfg_with("optim.schedule=constant", "optim.lr=1e-3"))
    msg = schedule_change(saved, cfg_with("optim.schedule=constant", "optim.lr=2e-3"), 300)
    assert msg is not None and "optim.lr 0.001 -> 0.002" in msg and "gives lr 0.002" in msg
    # a setting the schedule does not read is not named as part of it
    other = cfg_with("optim.schedule=constant", "optim.lr=2e-3", "optim.weight_decay=0.5")
    msg = schedule_change(saved, other, 300)
    assert msg is not None and "optim.lr 0.001 -> 0.002" in msg and "weight_decay" not in msg
    assert schedule_change(saved, cfg_with("optim.schedule=constant", "optim.lr=1e-3",
                                           "optim.weight_decay=0.5"), 300) is None  # fmt: skip
    # a key missing from an old config.yaml counts as its default, not as the new value
    old = saved_of(cfg_with())
    del old["optim"]["min_lr_ratio"]
    assert schedule_change(old, cfg_with(), 10) is None
    assert "optim.min_lr_ratio 0.1 -> 0.5" in schedule_change(
        old, cfg_with("optim.min_lr_ratio=0.5"), 10
    )


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(OptimConfig)])
def test_schedule_keys_are_the_fields_the_schedule_reads(field):
    """SCHEDULE_KEYS (what the resume warning names) must follow ``lr_schedule``: a field
    changes the schedule exactly when it is listed."""
    base = OptimConfig(schedule="wsd")
    value = getattr(base, field)
    changed = dataclasses.replace(
        base, **{field: "cosine" if isinstance(value, str) else value * 2}
    )
    at = np.arange(1000)
    moved = not np.allclose(lr_schedule(base, 1000)(at), lr_schedule(changed, 1000)(at))
    assert moved == (field in SCHEDULE_KEYS)
