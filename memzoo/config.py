"""Typed run configuration: one documented base, per-model overlays, key=value overrides.

Resolution order (MaxText style), validated once at start:

1. ``configs/base.yaml`` (documents every key),
2. the run file given on the command line (``configs/train/*.yaml``),
3. ``key=value`` overrides with dotted keys (``model.d_model=256 optim.lr=1e-3``).

``model: NAME`` (in a run file) or ``model=NAME`` (on the command line) swaps in
``configs/models/NAME.yaml`` at its ``tiny`` size; ``NAME:SIZE`` picks another size. A mapping
under ``model:`` may name ``preset: NAME[:SIZE]`` and override fields of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memzoo.data.config import DataConfig, validate_data_config

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config problem, reported as one line that names the key."""


@dataclass
class ModelConfig:
    name: str = "gated_deltanet"
    size: str = "tiny"
    vocab_size: int = 0
    d_model: int = 128
    n_layers: int = 4
    pattern: str = "M"
    memory: str = "gated_deltanet"
    num_heads: int = 4
    head_dim: int = 0
    expand_v: float = 1.0
    use_short_conv: bool = True
    conv_size: int = 4
    use_output_gate: bool = True
    chunk_size: int = 64
    impl: str = "auto"
    kernel_block_v: int = 0
    kernel_interpret: bool = False
    remat: bool = False
    gate_low_rank: int = 16
    hgrn_lower_bound: float = 0.0
    mlp_ratio: float = 2.6875
    attn_heads: int = 4
    attn_kv_heads: int = 0
    attn_window: int = 0
    rope_theta: float = 10000.0
    rope_scale: float = 1.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    mlp_type: str = "swiglu"
    norm_type: str = "rms"
    abs_pos_emb: bool = False
    max_seq_len: int = 2048
    mom_num_memories: int = 4
    mom_top_k: int = 2
    mom_shared_memory: bool = True
    mom_aux_loss_scale: float = 1e-3
    gam_num_slots: int = 512
    gam_local_kernel: int = 3
    gam_scaled: bool = False
    gm_arch: str | None = None
    gm_depth: int | None = None
    gm_expansion: float | None = None
    gm_activation: str | None = None
    gm_residual: bool | None = None
    gm_layer_norm: bool | None = None
    gm_loss: str | None = None
    gm_lp_p: float | None = None
    gm_retention: str | None = None
    gm_normalizer: str | None = None
    gm_norm_q: float | None = None
    gm_algorithm: str | None = None
    gm_ns_steps: int | None = None
    gm_window: int | None = None
    gm_feature_map: str | None = None
    gm_eta_max: float | None = None
    titans_memory: str = "titans_lmm"
    titans_segment: int = 512
    titans_detach: bool = False
    titans_persistent: int = 16


@dataclass
class OptimConfig:
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0


@dataclass
class TrainConfig:
    grad_accum: int = 1
    precision: str = "fp32"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10
    progress: bool = True
    init_from: str = ""


@dataclass
class ShardingRules:
    """Logical axis name -> mesh axes (None: replicated; a name; or a list of names).

    Every parameter carries logical names per dimension (``memzoo.layers.partitioning``);
    ``batch`` and ``length`` name activation dimensions (batch rows, time)."""

    batch: Any = field(default_factory=lambda: ["data", "fsdp"])
    length: Any = None
    embed: Any = "fsdp"
    vocab: Any = "tensor"
    mlp: Any = "tensor"
    heads: Any = "tensor"
    kv_heads: Any = "tensor"
    head_dim: Any = None
    gates: Any = None
    low_rank: Any = None
    norm: Any = None
    conv: Any = None
    memories: Any = None
    slots: Any = None
    state: Any = None
    persistent: Any = None
    position: Any = None


@dataclass
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: ShardingRules = field(default_factory=ShardingRules)


@dataclass
class DistributedConfig:
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    auto: bool = False
    data_shards: int = 0
    initialization_timeout: int = 300
    heartbeat_timeout: int = 100
    shutdown_timeout: int = 300


@dataclass
class SampleConfig:
    prompt: str = "def "
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0


@dataclass
class Config:
    run_name: str = "default"
    output_dir: str = "runs"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- resolution


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if isinstance(value, str) and tp in (int, float):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept any numeric literal.
        with contextlib.suppress(ValueError):
            value = float(value) if tp is float or not value.lstrip("+-").isdigit() else int(value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    return value


def _merge(target: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Set fields of a dataclass instance from a nested mapping, checking names and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' expects a mapping")
    hints = _field_types(type(target))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key(key, list(hints))
        tp = hints[name]
        if _is_dataclass_type(tp):
            _merge(getattr(target, name), value, key + ".")
        else:
            setattr(target, name, _coerce(key, value, tp))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def available_models() -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / "models").glob("*.yaml"))


def model_preset(spec: str) -> dict[str, Any]:
    """The fields of ``configs/models/NAME.yaml`` at a size: ``NAME`` (tiny) or ``NAME:SIZE``."""
    name, _, size = spec.partition(":")
    size = size or "tiny"
    path = CONFIG_ROOT / "models" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"model '{name}' has no config file configs/models/{name}.yaml; "
            f"available: {', '.join(available_models())}"
        )
    data = _read_yaml(path)
    sizes = data.pop("sizes", {}) or {}
    if size not in sizes:
        raise ConfigError(
            f"model '{name}' has no size '{size}'; sizes: {', '.join(sorted(sizes)) or 'none'}"
        )
    data.update(sizes[size] or {})
    data["name"] = name
    data["size"] = size
    return data


def _apply_model_section(cfg: Config, section: Any, key: str) -> None:
    if isinstance(section, str):
        cfg.model = ModelConfig()
        _merge(cfg.model, model_preset(section), "model.")
    elif isinstance(section, dict):
        section = dict(section)
        preset = section.pop("preset", None)
        if preset is not None:
            cfg.model = ModelConfig()
            _merge(cfg.model, model_preset(str(preset)), "model.")
        _merge(cfg.model, section, "model.")
    else:
        raise ConfigError(f"config key '{key}' expects a model name or a mapping")


def _apply_mapping(cfg: Config, data: dict[str, Any]) -> None:
    data = dict(data)
    if "model" in data:
        _apply_model_section(cfg, data.pop("model"), "model")
    _merge(cfg, data)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(cfg: Config, key: str, value: Any) -> None:
    if key == "model":
        _apply_model_section(cfg, str(value), key)
        return
    parts = key.split(".")
    target: Any = cfg
    for i, part in enumerate(parts):
        hints = _field_types(type(target))
        sub = ".".join(parts[: i + 1])
        if part not in hints:
            raise _unknown_key(sub, list(hints))
        if i == len(parts) - 1:
            if _is_dataclass_type(hints[part]):
                _merge(getattr(target, part), value, sub + ".")
            else:
                setattr(target, part, _coerce(sub, value, hints[part]))
        else:
            if not _is_dataclass_type(hints[part]):
                raise ConfigError(f"config key '{sub}' is not a section; cannot set '{key}'")
            target = getattr(target, part)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: str | Path | None = None,
) -> Config:
    """Resolve base.yaml + run file + overrides into a validated :class:`Config`."""
    cfg = Config()
    base_path = Path(base) if base else CONFIG_ROOT / "base.yaml"
    if base_path.is_file():
        _apply_mapping(cfg, _read_yaml(base_path))
    if path is not None:
        _apply_mapping(cfg, _read_yaml(Path(path)))
    items = [parse_override(o) for o in overrides or []]
    # A model swap comes first so that model.* overrides apply on top of it.
    for key, value in sorted(items, key=lambda kv: kv[0] != "model"):
        apply_override(cfg, key, value)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from a saved resolved dict (e.g. runs/NAME/config.yaml)."""
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def layer_kinds(m: ModelConfig) -> list[str]:
    """Expand the layer pattern into one mixer name per layer.

    ``pattern`` is either letters (``M`` = ``model.memory``, ``A`` = softmax attention; e.g.
    ``MMMA`` is a 3:1 hybrid) or comma-separated mixer names (``gated_deltanet,attention``). It
    repeats to fill ``n_layers``.
    """
    pat = m.pattern.strip()
    if pat and set(pat) <= {"M", "A"}:
        names = [m.memory if ch == "M" else "attention" for ch in pat]
    else:
        names = [p.strip() for p in pat.split(",") if p.strip()]
    if not names:
        raise ConfigError("model.pattern is empty")
    if m.n_layers % len(names):
        raise ConfigError(
            f"model.n_layers={m.n_layers} is not a multiple of the pattern length "
            f"{len(names)} ('{m.pattern}')"
        )
    return names * (m.n_layers // len(names))


def gm_overrides(m: ModelConfig) -> dict[str, Any]:
    """The model's gm_* keys that are set, as overrides of a gradient-memory preset."""
    return {
        f.name[3:]: getattr(m, f.name)
        for f in dataclasses.fields(m)
        if f.name.startswith("gm_") and getattr(m, f.name) is not None
    }


def _check_gradient_memory(m: ModelConfig, kinds: list[str]) -> None:
    from memzoo.memories.gradient import PRESETS, preset_with

    names = [k for k in kinds if k in PRESETS]
    if m.titans_memory not in PRESETS:
        raise ConfigError(
            f"model.titans_memory '{m.titans_memory}' is not a gradient memory; "
            f"known: {', '.join(sorted(PRESETS))}"
        )
    over = gm_overrides(m)
    if over and not names and not any(k.startswith("titans_") for k in kinds):
        raise ConfigError(
            f"model.gm_* keys ({', '.join('gm_' + k for k in over)}) are set but no layer is a "
            f"gradient memory ({', '.join(sorted(PRESETS))})"
        )
    for name in names or [m.titans_memory]:
        try:
            p = preset_with(name, over)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.gm_*: {e}") from None
        _check(
            p.arch in ("linear", "mlp", "gated_mlp"),
            f"model.gm_arch '{p.arch}' is not linear, mlp or gated_mlp",
        )
        _check(
            p.loss in ("dot", "l2", "lp", "huber"),
            f"model.gm_loss '{p.loss}' is not dot, l2, lp or huber",
        )
        _check(
            p.normalizer in ("none", "lq", "softmax"),
            f"model.gm_normalizer '{p.normalizer}' is not none, lq or softmax",
        )
        _check(p.arch != "mlp" or p.depth >= 2, "model.gm_depth must be >= 2 for an mlp memory")
        _check(p.window >= 1, f"model.gm_window must be >= 1, got {p.window}")
        _check(p.eta_max > 0, f"model.gm_eta_max must be > 0, got {p.eta_max}")
        _check(
            p.retention != "channel" or p.arch == "linear",
            "model.gm_retention=channel needs model.gm_arch=linear",
        )
    _check(m.titans_segment >= 1, f"model.titans_segment must be >= 1, got {m.titans_segment}")
    _check(m.titans_persistent >= 0, "model.titans_persistent must be >= 0")


def validate(cfg: Config) -> None:
    """Check every cross-field constraint once, at start, with one-line errors."""
    from memzoo.memories import memory_names  # local: keeps `import memzoo.config` light

    m = cfg.model
    _check(cfg.steps >= 0, f"steps must be >= 0, got {cfg.steps}")
    _check(cfg.batch_size > 0, f"batch_size must be > 0, got {cfg.batch_size}")
    _check(cfg.seq_len > 0, f"seq_len must be > 0, got {cfg.seq_len}")
    _check(bool(cfg.run_name) and "/" not in cfg.run_name, f"run_name '{cfg.run_name}' is invalid")
    _check(m.d_model > 0 and m.n_layers > 0, "model.d_model and model.n_layers must be > 0")
    _check(
        m.d_model % m.num_heads == 0,
        f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}",
    )
    _check(m.chunk_size > 0, f"model.chunk_size must be > 0, got {m.chunk_size}")
    _check(m.conv_size >= 1, f"model.conv_size must be >= 1, got {m.conv_size}")
    _check(m.expand_v > 0, f"model.expand_v must be > 0, got {m.expand_v}")
    dk = m.head_dim or m.d_model // m.num_heads
    _check(
        float(dk * m.expand_v).is_integer(),
        f"model.expand_v={m.expand_v} times head_dim={dk} is not an integer",
    )
    _check(m.impl in ("auto", "scan", "xla", "pallas_tpu", "pallas_gpu"), f"model.impl '{m.impl}'")
    _check(m.kernel_block_v >= 0, f"model.kernel_block_v must be >= 0, got {m.kernel_block_v}")
    _check(
        not m.kernel_interpret or m.impl in ("pallas_tpu", "pallas_gpu"),
        f"model.kernel_interpret=true runs a Pallas kernel in interpret mode; it needs "
        f"model.impl=pallas_tpu or pallas_gpu, got model.impl={m.impl}",
    )
    kinds = layer_kinds(m)
    from memzoo.layers.titans import TITANS_KINDS

    known = set(memory_names()) | {"attention"} | set(TITANS_KINDS)
    for k in kinds:
        _check(
            k in known,
            f"unknown memory '{k}' in model.pattern/model.memory; "
            f"known: {', '.join(sorted(known))}",
        )
    if "attention" in kinds:
        kv = m.attn_kv_heads or m.attn_heads
        _check(
            m.d_model % m.attn_heads == 0,
            f"model.attn_heads={m.attn_heads} does not divide model.d_model={m.d_model}",
        )
        _check(
            m.attn_heads % kv == 0,
            f"model.attn_kv_heads={kv} does not divide model.attn_heads={m.attn_heads}",
        )
        _check(
            m.rope_theta == 0 or (m.d_model // m.attn_heads) % 2 == 0,
            "attention head dim must be even for RoPE (or model.rope_theta=0 for NoPE)",
        )
    _check(
        m.rope_theta == 0 or m.rope_theta > 1,
        f"model.rope_theta must be > 1 (or 0 for no positional encoding), got {m.rope_theta}",
    )
    _check(m.rope_scale > 0, f"model.rope_scale must be > 0, got {m.rope_scale}")
    _check(m.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    _check(m.mlp_type in ("swiglu", "gelu"), f"model.mlp_type '{m.mlp_type}' is not swiglu or gelu")
    _check(m.norm_type in ("rms", "layer"), f"model.norm_type '{m.norm_type}' is not rms or layer")
    if m.abs_pos_emb:
        _check(
            m.max_seq_len >= cfg.seq_len,
            f"model.max_seq_len={m.max_seq_len} is smaller than seq_len={cfg.seq_len} "
            "(needed with model.abs_pos_emb=true)",
        )
    _check(
        1 <= m.mom_top_k <= m.mom_num_memories,
        f"model.mom_top_k={m.mom_top_k} must be in [1, model.mom_num_memories="
        f"{m.mom_num_memories}]",
    )
    _check(m.mom_aux_loss_scale >= 0, "model.mom_aux_loss_scale must be >= 0")
    _check(m.gam_num_slots >= 1, f"model.gam_num_slots must be >= 1, got {m.gam_num_slots}")
    _check(m.gam_local_kernel >= 1, "model.gam_local_kernel must be >= 1")
    _check(0.0 <= m.hgrn_lower_bound < 1.0, "model.hgrn_lower_bound must be in [0, 1)")
    _check_gradient_memory(m, kinds)
    o = cfg.optim
    _check(
        o.schedule in ("cosine", "wsd", "constant"),
        f"optim.schedule '{o.schedule}' is not one of cosine, wsd, constant",
    )
    _check(o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be > 0, got {o.lr}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _check(0.0 <= o.decay_fraction <= 1.0, "optim.decay_fraction must be in [0, 1]")
    t = cfg.train
    _check(t.grad_accum >= 1, "train.grad_accum must be >= 1")
    _check(
        cfg.batch_size % t.grad_accum == 0,
        f"train.grad_accum={t.grad_accum} does not divide batch_size={cfg.batch_size}",
    )
    _check(t.precision in ("fp32", "bf16"), f"train.precision '{t.precision}' is not fp32 or bf16")
    _check(t.on_nonfinite in ("stop", "skip"), "train.on_nonfinite must be 'stop' or 'skip'")
    for k in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _check(getattr(t, k) > 0, f"train.{k} must be > 0, got {getattr(t, k)}")
    _check(t.eval_batches >= 0, "train.eval_batches must be >= 0")
    _check_mesh(cfg)
    try:
        validate_data_config(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None


MESH_AXES = ("data", "fsdp", "tensor")


def _check_mesh(cfg: Config) -> None:
    """Mesh sizes and sharding rules (what needs no devices; the device count, divisibility of
    parameter dims and the batch are checked by ``memzoo.train.sharding`` once the mesh
    exists)."""
    mesh = cfg.mesh
    ici = [getattr(mesh, a) for a in MESH_AXES]
    _check(
        ici.count(-1) <= 1,
        "mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1",
    )
    for a in MESH_AXES:
        v = getattr(mesh, a)
        _check(v == -1 or v >= 1, f"mesh.{a} must be >= 1 or -1, got {v}")
        d = getattr(mesh, f"dcn_{a}")
        _check(d >= 1, f"mesh.dcn_{a} must be >= 1, got {d}")
    for f in dataclasses.fields(mesh.rules):
        value = getattr(mesh.rules, f.name)
        names = [value] if isinstance(value, str) else value
        _check(
            value is None or isinstance(names, (list, tuple)),
            f"mesh.rules.{f.name} must be null, a mesh axis name or a list of them, got {value!r}",
        )
        for n in names or []:
            _check(
                n in MESH_AXES,
                f"mesh.rules.{f.name}: unknown mesh axis {n!r} (mesh axes: {', '.join(MESH_AXES)})",
            )
        _check(
            len(set(names or [])) == len(names or []),
            f"mesh.rules.{f.name} names a mesh axis twice: {value!r}",
        )
    dist = cfg.distributed
    _check(dist.num_processes >= 0, "distributed.num_processes must be >= 0")
    _check(dist.process_id >= -1, "distributed.process_id must be >= -1")
    _check(dist.data_shards >= 0, "distributed.data_shards must be >= 0")
    for k in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
        _check(getattr(dist, k) > 0, f"distributed.{k} must be > 0, got {getattr(dist, k)}")
