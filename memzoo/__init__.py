"""memzoo: a JAX model zoo for sequence models with learned memory.

import memzoo
cfg = memzoo.load_config_file("configs/train/quickstart.yaml", ["steps=10"])
model = memzoo.build_model(cfg.model)            # an nnx.Module: model(tokens) -> (logits, _)
model, cfg = memzoo.load("runs/quickstart")      # a trained run, parameters only
"""

from memzoo.api import load, load_config  # noqa: I001
from memzoo.config import Config, ConfigError, ModelConfig
from memzoo.config import load_config as load_config_file
from memzoo.generate import generate
from memzoo.models.lm import LM, build_model, count_params

__all__ = [
    "LM",
    "Config",
    "ConfigError",
    "ModelConfig",
    "build_model",
    "count_params",
    "generate",
    "load",
    "load_config",
    "load_config_file",
]
