"""Config resolution: base.yaml + run file + key=value overrides, model presets and sizes,
typed coercion, one-line ConfigErrors naming the key, layer patterns, and that every model
file resolves at every size it lists and round-trips through a dict and YAML."""

import re
from pathlib import Path

import pytest
import yaml

from memzoo.config import (
    Config,
    ConfigError,
    ModelConfig,
    available_models,
    config_from_dict,
    layer_kinds,
    load_config,
    model_preset,
    save_config,
)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "train" / "quickstart.yaml"
MODEL_FILES = sorted((REPO / "configs" / "models").glob("*.yaml"))


def quick(*overrides):
    return load_config(QUICKSTART, list(overrides))


def model_sizes():
    out = []
    for path in MODEL_FILES:
        sizes = yaml.safe_load(path.read_text())["sizes"]
        out += [(path.stem, size) for size in sizes]
    return out


# ----------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=str)
def test_every_shipped_training_config_validates(path):
    cfg = load_config(path)
    assert cfg.run_name == path.stem  # run_name decides where the outputs go
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw.get("model"), dict):  # a model spelled out, not a preset name
        for key, value in raw["model"].items():
            if key != "preset":
                assert getattr(cfg.model, key) == value, f"{path.name}: model.{key}"


def test_base_plus_quickstart_resolves():
    cfg = quick()
    raw = yaml.safe_load(QUICKSTART.read_text())
    assert isinstance(cfg, Config)
    # every value of the run file lands in its (typed) field
    for key, value in raw.items():
        if key == "model":
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                assert getattr(getattr(cfg, key), sub) == v, f"{key}.{sub}"
        else:
            assert getattr(cfg, key) == value, key
    assert cfg.run_name == "quickstart"
    assert cfg.run_dir == Path("runs") / "quickstart"
    # `model: hybrid_gdn` swapped in the preset at its tiny size
    assert raw["model"] == "hybrid_gdn"
    assert cfg.model.name == "hybrid_gdn" and cfg.model.size == "tiny"
    assert cfg.model.memory == "gated_deltanet" and cfg.model.pattern == "MMMA"
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.num_heads) == (128, 4, 4)
    # keys the run file leaves alone come from base.yaml
    base = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    assert cfg.data.source == base["data"]["source"] == "stdlib"
    assert cfg.data.tokenizer == "byte"
    assert cfg.mesh.data == base["mesh"]["data"] == -1
    assert cfg.optim.schedule == base["optim"]["schedule"]
    assert cfg.seed == base["seed"]


def test_base_only_resolves_without_run_file():
    cfg = load_config(None, [])
    assert cfg.run_name == "default" and cfg.steps == 1000
    assert cfg.model.memory == "gated_deltanet" and cfg.model.pattern == "M"


def test_dotted_overrides_are_typed():
    cfg = quick(
        "steps=7",
        "model.d_model=64",
        "optim.lr=0.0005",
        "model.expand_v=2",
        "train.progress=false",
        "data.shuffle=False",
        "sample.prompt=123",
        "run_name=my_run",
    )
    assert cfg.steps == 7 and type(cfg.steps) is int
    assert cfg.model.d_model == 64 and type(cfg.model.d_model) is int
    assert cfg.optim.lr == 0.0005 and type(cfg.optim.lr) is float
    assert cfg.model.expand_v == 2.0 and type(cfg.model.expand_v) is float
    assert cfg.train.progress is False
    assert cfg.data.shuffle is False
    assert cfg.sample.prompt == "123"
    assert cfg.run_name == "my_run"


@pytest.mark.parametrize("value,expected", [("3.0e-3", 3e-3), ("1.0e-4", 1e-4), ("0.01", 0.01)])
def test_float_override_yaml_forms(value, expected):
    cfg = quick(f"optim.lr={value}")
    assert cfg.optim.lr == pytest.approx(expected) and type(cfg.optim.lr) is float


def test_float_override_exponent_without_dot():
    # YAML 1.1 reads "1e-3" as a string; the documented `optim.lr=1e-3` must still work
    cfg = quick("optim.lr=1e-3", "model.norm_eps=1e-5", "steps=+12")
    assert cfg.optim.lr == pytest.approx(1e-3) and type(cfg.optim.lr) is float
    assert cfg.model.norm_eps == pytest.approx(1e-5)
    assert cfg.steps == 12 and type(cfg.steps) is int
    with pytest.raises(ConfigError, match="config key 'steps' expects an integer, got '1e3x'"):
        quick("steps=1e3x")


def test_model_swap_takes_preset():
    cfg = quick("model=gla")
    m = cfg.model
    assert (m.name, m.size, m.memory, m.pattern) == ("gla", "tiny", "gla", "M")
    assert (m.d_model, m.n_layers, m.num_heads) == (128, 4, 4)
    # fields not named by the preset go back to their defaults
    assert m.attn_kv_heads == ModelConfig().attn_kv_heads
    # the rest of the run file still applies
    assert cfg.run_name == "quickstart" and cfg.steps == quick().steps


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=gla", "model.d_model=64", "model.n_layers=2"],
        ["model.d_model=64", "model.n_layers=2", "model=gla"],
        ["model.n_layers=2", "model=gla", "model.d_model=64"],
    ],
)
def test_model_overrides_apply_on_top_of_swap_in_any_order(overrides):
    m = quick(*overrides).model
    assert m.memory == "gla" and m.name == "gla"
    assert m.d_model == 64 and m.n_layers == 2
    assert m.num_heads == 4  # from the preset


def test_model_size_selection():
    m = quick("model=gated_deltanet:340m").model
    assert (m.name, m.size, m.memory) == ("gated_deltanet", "340m", "gated_deltanet")
    assert (m.d_model, m.n_layers, m.num_heads, m.expand_v) == (1024, 24, 4, 2.0)


def test_run_file_model_mapping_with_preset(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("run_name: mapped\nmodel:\n  preset: gla:340m\n  n_layers: 2\n")
    cfg = load_config(run, [])
    assert cfg.run_name == "mapped"
    assert (cfg.model.memory, cfg.model.size, cfg.model.d_model) == ("gla", "340m", 1024)
    assert cfg.model.n_layers == 2


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=gla:7b"], "model 'gla' has no size '7b'; sizes: 1.3b, 340m, tiny"),
        (["model=mamba9"], "model 'mamba9' has no config file configs/models/mamba9.yaml"),
        (
            ["model.d_modle=3"],
            "unknown config key 'model.d_modle' (did you mean 'model.d_model'?)",
        ),
        (["stepz=3"], "unknown config key 'stepz' (did you mean 'steps'?)"),
        (["optim.nonsense_xyz=1"], "unknown config key 'optim.nonsense_xyz'"),
        (["steps.foo=1"], "config key 'steps' is not a section"),
        (["steps=abc"], "config key 'steps' expects an integer, got 'abc'"),
        (["steps=1.5"], "config key 'steps' expects an integer"),
        (["optim.lr=fast"], "config key 'optim.lr' expects a number"),
        (["train.progress=maybe"], "config key 'train.progress' expects true/false"),
        (["model.num_heads=3"], "model.num_heads=3 does not divide model.d_model=128"),
        (["train.grad_accum=3"], "train.grad_accum=3 does not divide batch_size=8"),
        (["model.pattern=MMA"], "model.n_layers=4 is not a multiple of the pattern length 3"),
        (
            ["model.pattern=gated_deltanet,mamba", "model.n_layers=4"],
            "unknown memory 'mamba' in model.pattern",
        ),
        (["model.memory=mamba"], "unknown memory 'mamba'"),
        (["model.attn_kv_heads=3"], "model.attn_kv_heads=3 does not divide model.attn_heads=4"),
        (["model.attn_heads=3"], "model.attn_heads=3 does not divide model.d_model=128"),
        (["optim.schedule=linear"], "optim.schedule 'linear'"),
        (["train.precision=fp16"], "train.precision 'fp16'"),
        (["train.on_nonfinite=ignore"], "train.on_nonfinite"),
        (["steps"], "override 'steps' is not of the form key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        quick(*overrides)
    assert "\n" not in str(exc.value)


def test_missing_run_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", [])


def test_unknown_key_in_run_file(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  log_evry: 3\n")
    with pytest.raises(
        ConfigError, match=re.escape("'train.log_evry' (did you mean 'train.log_every'")
    ):
        load_config(run, [])


def test_model_preset_errors_directly():
    assert model_preset("gla")["size"] == "tiny"
    with pytest.raises(ConfigError, match="has no size 'huge'"):
        model_preset("hgrn:huge")


# ----------------------------------------------------------------------------- layer patterns


def test_layer_kinds_letter_pattern():
    m = ModelConfig(pattern="MMMA", n_layers=8, memory="gla")
    kinds = layer_kinds(m)
    assert kinds == ["gla", "gla", "gla", "attention"] * 2
    assert kinds.count("gla") == 6 and kinds.count("attention") == 2


def test_layer_kinds_comma_pattern():
    m = ModelConfig(pattern="deltanet, attention,gla", n_layers=6)
    assert layer_kinds(m) == ["deltanet", "attention", "gla"] * 2
    assert layer_kinds(ModelConfig(pattern="A", n_layers=3)) == ["attention"] * 3


def test_layer_kinds_errors():
    with pytest.raises(ConfigError, match="not a multiple of the pattern length 4"):
        layer_kinds(ModelConfig(pattern="MMMA", n_layers=6))
    with pytest.raises(ConfigError, match="empty"):
        layer_kinds(ModelConfig(pattern=" , ", n_layers=2))


# ----------------------------------------------------------------------------- model files


def test_model_files_are_listed():
    assert available_models() == [p.stem for p in MODEL_FILES]
    assert len(MODEL_FILES) >= 9


@pytest.mark.parametrize("name,size", model_sizes(), ids=lambda x: str(x))
def test_every_model_size_resolves_and_round_trips(name, size, tmp_path):
    cfg = quick(f"model={name}:{size}")  # validates; builds nothing
    declared = yaml.safe_load((REPO / "configs" / "models" / f"{name}.yaml").read_text())
    assert (cfg.model.name, cfg.model.size) == (name, size)
    for key, value in (declared["sizes"][size] or {}).items():
        assert getattr(cfg.model, key) == value, key
    assert cfg.model.memory == declared["memory"]
    assert layer_kinds(cfg.model)  # the pattern expands

    assert config_from_dict(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    reloaded = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert reloaded == cfg
