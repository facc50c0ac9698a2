"""The gradient-memory presets (TTT, Titans LMM / MAC / MAG / MAL, Moneta, Yaad, Memora,
OmegaNet, ATLAS, ATLAS++) as models: each tiny model trains with falling loss, the Miras four
choices combine through the gm_* config keys, and bad choices are one-line config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiers import CORE_GRADIENT_PRESETS, core_first
from tiny_runs import TINY_DATA

from memzoo.config import ConfigError, load_config
from memzoo.memories.gradient import PRESETS, GradientMemory, preset_with
from memzoo.models.lm import build_model
from memzoo.train.loop import train

V, T = 48, 24


def tiny(name: str, *extra: str):
    return load_config(
        None,
        [
            f"model={name}",
            "model.d_model=32",
            "model.n_layers=1",
            "model.num_heads=4",
            "model.chunk_size=4",
            "model.gm_expansion=2.0",
            *extra,
        ],
    )


def memories(model):
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, GradientMemory)]


TITANS = {  # the Titans combinations with attention, small segments and windows
    "titans_mac": ("model.titans_segment=8", "model.titans_persistent=2", "model.attn_heads=2"),
    "titans_mag": ("model.attn_window=8", "model.titans_persistent=2", "model.attn_heads=2"),
    "titans_mal": ("model.attn_window=8", "model.titans_persistent=2", "model.attn_heads=2"),
}


# titans_lmm, atlas and ttt_linear (tests/support/tiers.py) and the cheapest Titans
# combination train in the default tier; every preset in the full tier
@pytest.mark.parametrize(
    "name",
    core_first(
        sorted(PRESETS) + sorted(TITANS),
        heavy=[*PRESETS, *TITANS],
        core=[*CORE_GRADIENT_PRESETS, "titans_mal"],
    ),
)
def test_each_preset_trains_with_falling_loss(name):
    cfg = tiny(name, *TITANS.get(name, ()))
    cfg.model.vocab_size = V
    model = build_model(cfg.model, seed=0)
    assert len(memories(model)) == 1
    # a learnable sequence: every row repeats a random 6-token motif
    motif = jax.random.randint(jax.random.key(1), (4, 6), 0, V)
    tokens = jnp.tile(motif, (1, T // 6 + 1))[:, : T + 1]
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits, _ = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(12)]
    assert all(np.isfinite(losses)), (name, losses)
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), (name, losses)


def test_miras_choices_combine_through_config():
    cfg = tiny(
        "titans_lmm",
        "model.gm_loss=huber",
        "model.gm_algorithm=muon",
        "model.gm_window=2",
        "model.gm_arch=gated_mlp",
    )
    cfg.model.vocab_size = V
    model = build_model(cfg.model, seed=0)
    (mem,) = memories(model)
    spec = mem.spec
    assert (spec.loss, spec.muon, spec.window, spec.arch.kind) == ("huber", True, 2, "gated_mlp")
    assert spec.arch.expansion == 2.0
    logits, _ = model(jnp.zeros((2, 9), jnp.int32))
    assert logits.shape == (2, 9, V) and bool(jnp.all(jnp.isfinite(logits)))
    # a preset left alone keeps its own choices
    assert preset_with("moneta").loss == "lp" and preset_with("moneta").normalizer == "lq"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.gm_loss=l3", "gm_loss 'l3'"),
        ("model.gm_retention=channel", "gm_retention=channel needs model.gm_arch=linear"),
        ("model.gm_algorithm=adam", "unknown algorithm 'adam'"),
        ("model.gm_depth=1", "gm_depth must be >= 2"),
        ("model.titans_memory=gla", "not a gradient memory"),
    ],
)
def test_bad_choices_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny("titans_lmm", override)


def test_gm_keys_on_a_model_without_a_gradient_memory_are_an_error():
    with pytest.raises(ConfigError, match="no layer is a gradient memory"):
        load_config(None, ["model=gated_deltanet", "model.gm_loss=huber"])


def test_titans_trains_through_the_training_loop(tmp_path):
    # the pretraining loop (param filtering, optimiser state, checkpoints) on a gradient memory
    cfg = load_config(
        None,
        [
            "model=titans_lmm",
            "model.d_model=32",
            "model.n_layers=1",
            "model.num_heads=4",
            "model.chunk_size=4",
            *TINY_DATA,
            "optim.warmup_steps=2",
            "steps=8",
            f"output_dir={tmp_path}",
        ],
    )
    summary = train(cfg)
    losses = summary["losses"]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert np.isfinite(summary["heldout_loss"])
