"""Loading trained runs for evaluation: ``model, cfg = memzoo.load("runs/quickstart")``."""

from __future__ import annotations

from pathlib import Path

import yaml
from flax import nnx

from memzoo.config import Config, config_from_dict
from memzoo.models.lm import LM, build_model
from memzoo.train.checkpoint import restore_params


def load_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a memzoo run directory (no config.yaml)")
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f))


def load(
    run_dir: str | Path, step: int | None = None, *, precision: str = "fp32"
) -> tuple[LM, Config]:
    """Rebuild the model of a run and restore its parameters only (no optimiser state).

    ``step=None`` takes the latest complete checkpoint. Raises FileNotFoundError naming the
    missing run, checkpoint directory or step.
    """
    cfg = load_config(run_dir)
    abstract = nnx.eval_shape(lambda: build_model(cfg.model, seed=cfg.seed, precision=precision))
    graphdef, template = nnx.split(abstract)
    params, step = restore_params(Path(run_dir) / "checkpoints", template, step)
    model = nnx.merge(graphdef, params)
    model.restored_step = step
    return model, cfg
