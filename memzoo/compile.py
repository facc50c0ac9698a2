"""``memzoo compile CONFIG [key=value ...] topology=v5e:16x16 [--json PATH]``: compile the full
train step for a TPU pod topology on this (CPU) host and report whether it fits.

Nothing is allocated: the model and optimizer state are built abstractly (``nnx.eval_shape`` /
``jax.eval_shape``), the topology's devices come from libtpu (``pallas_kernels.aot.tpu_devices``),
the mesh and shardings from the config (``memzoo.train.sharding``), and the jitted train step
(``memzoo.train.step.make_train_step``) is lowered with ``ShapeDtypeStruct`` inputs and compiled
by the TPU compiler. The report holds:

- per-device memory from ``memory_analysis()`` (arguments, outputs, aliased (donated), temps,
  generated code, total = arguments + outputs - aliased + temps + code) against the chip's HBM;
  a step that does not fit is an error (exit status 3);
- FLOPs per step from ``cost_analysis()`` (per device: the partitioned program is one device's;
  total = per device x devices). XLA's cost analysis counts a while loop's body once, whatever
  its trip count, so the chunk / segment scans of the memories are under-counted; the report
  also gives the matmul FLOPs of the traced step with every ``scan`` body multiplied by its
  length (``traced_flops``), and the analytic model FLOPs (``memzoo.train.metrics``);
- a roofline step time per chip, ``max(FLOPs / peak, bytes accessed / HBM bandwidth)`` (FLOPs:
  the larger of XLA's and the traced count per device; bytes: XLA's, a lower bound for the same
  reason), and the MFU it implies: model FLOPs per step / (chips x peak x step time).

``model.impl``: compile uses ``impl="xla"`` (the chunked XLA ops) unless the config or the
command line sets ``model.impl``. With ``auto`` the choice follows ``jax.default_backend()``,
which is "cpu" on this host, so ``auto`` already means xla here; on a TPU host it picks the
Pallas kernels (inside ``shard_map`` on a multi-device mesh, ``memzoo.layers.partitioning.
kernel_op``). Fixing xla makes the compile the same on any host; ``model.impl=pallas_tpu``
compiles the kernels into the step instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from memzoo.config import Config, ConfigError, load_config, parse_override

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's per-chip figures (public spec sheets)."""

    name: str
    hbm_gib: float  # HBM capacity per chip, GiB
    peak_tflops: float  # peak bf16 dense TFLOP/s per chip
    hbm_gbps: float  # HBM bandwidth per chip, GB/s

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * GIB

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32, 275, 1200),
    "v5e": Chip("TPU v5e", 16, 197, 819),
    "v5p": Chip("TPU v5p", 95, 459, 2765),
    "v6e": Chip("TPU v6e", 32, 918, 1640),
}


class TopologyError(ConfigError):
    """A topology string that is not ``<generation>:<AxB[xC]>`` with a known generation."""


class CompileError(RuntimeError):
    """The step could not be built or compiled for the topology (one line)."""


class DoesNotFitError(CompileError):
    """The compiled step needs more memory per device than the chip's HBM."""

    def __init__(self, msg: str, report: dict[str, Any]):
        super().__init__(msg)
        self.report = report


# ----------------------------------------------------------------------------- topology


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
    """``"v5e:16x16"`` -> ``("v5e", (16, 16))``; a one-line :class:`TopologyError` otherwise."""
    gens = ", ".join(sorted(CHIPS))
    m = re.fullmatch(r"\s*([a-z0-9]+):(\d+(?:x\d+){1,2})\s*", str(topology))
    if m is None:
        raise TopologyError(
            f"bad topology {topology!r}: expected <generation>:<shape>, e.g. v5e:16x16 or "
            f"v5p:4x4x4 (generations: {gens})"
        )
    gen, shape = m.group(1), tuple(int(s) for s in m.group(2).split("x"))
    if gen not in CHIPS:
        raise TopologyError(f"bad topology {topology!r}: unknown TPU generation {gen!r} ({gens})")
    if min(shape) < 1:
        raise TopologyError(f"bad topology {topology!r}: every dimension must be >= 1")
    return gen, shape


def split_topology(overrides: list[str]) -> tuple[str | None, list[str]]:
    """Take ``topology=...`` out of ``key=value`` overrides (it is not a config key)."""
    topology, rest = None, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "topology":
            topology = value.strip()
        else:
            rest.append(item)
    return topology, rest


def tpu_topology_devices(topology: str) -> list[Any]:
    """The devices of ``topology`` from libtpu (put ``.venv/libtpu`` on ``sys.path`` when it is
    installed there but not importable), with one-line errors."""
    parse_topology(topology)
    import os

    from pallas_kernels.aot import libtpu_available, libtpu_dir, tpu_devices

    # no TPU is attached: let several compiling processes load libtpu at once (its lockfile
    # guards real chips, which an ahead-of-time compile never opens)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    if not libtpu_available() and (libtpu_dir() / "libtpu").is_dir():
        sys.path.insert(0, str(libtpu_dir()))
    if not libtpu_available():
        try:
            tpu_devices(topology)  # raises aot.py's message: how to install libtpu
        except RuntimeError as e:
            raise CompileError(str(e)) from None
    try:
        devices = tpu_devices(topology)
    except Exception as e:  # libtpu rejects the shape
        msg = " ".join(str(e).split())[:300]
        raise TopologyError(f"libtpu does not accept topology {topology!r}: {msg}") from None
    return devices


# ----------------------------------------------------------------------------- arithmetic


def roofline(flops_per_device: float, bytes_per_device: float, chip: Chip) -> dict[str, Any]:
    """Roofline step time of one chip: ``max(FLOPs / peak, bytes / HBM bandwidth)``."""
    compute_s = flops_per_device / chip.peak_flops
    memory_s = bytes_per_device / chip.hbm_bytes_per_s
    return {
        "compute_s": compute_s,
        "memory_s": memory_s,
        "step_s": max(compute_s, memory_s),
        "bound": "compute" if compute_s >= memory_s else "memory",
    }


def implied_mfu(model_flops_per_step: float, n_chips: int, step_s: float, chip: Chip) -> float:
    """Model FLOPs utilisation of a step taking ``step_s`` on ``n_chips`` chips."""
    if step_s <= 0:
        return 0.0
    return model_flops_per_step / (n_chips * chip.peak_flops * step_s)


def memory_figures(stats: Any) -> dict[str, int]:
    """Per-device bytes from a ``CompiledMemoryStats``; ``total`` = arguments + outputs -
    aliased (donated buffers reused for outputs) + temps + generated code."""
    f = {
        "arguments": int(stats.argument_size_in_bytes),
        "outputs": int(stats.output_size_in_bytes),
        "aliased": int(stats.alias_size_in_bytes),
        "temps": int(stats.temp_size_in_bytes),
        "code": int(stats.generated_code_size_in_bytes),
    }
    f["total"] = f["arguments"] + f["outputs"] - f["aliased"] + f["temps"] + f["code"]
    return f


def _prod(xs: Any) -> int:
    return int(math.prod(int(x) for x in xs))


def traced_matmul_flops(jaxpr: Any) -> tuple[float, int]:
    """Matmul / convolution FLOPs of a (closed) jaxpr, each ``scan`` body counted ``length``
    times and a ``cond`` as its costliest branch. Returns ``(flops, while_loops)``: a
    ``while`` body (trip count unknown here) is counted once and reported."""
    from jax.extend import core as jcore

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total, whiles = 0.0, 0

    def subs(value: Any) -> list[Any]:
        if isinstance(value, (jcore.ClosedJaxpr, jcore.Jaxpr)):
            return [value]
        if isinstance(value, (tuple, list)):
            return [j for v in value for j in subs(v)]
        return []

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * _prod(eqn.outvars[0].aval.shape) * _prod(lhs[i] for i in lhs_contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_feat = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * _prod(eqn.outvars[0].aval.shape) * _prod(rhs) / max(out_feat, 1)
        if name == "scan":
            f, w = traced_matmul_flops(eqn.params["jaxpr"])
            total, whiles = total + eqn.params["length"] * f, whiles + w
        elif name == "cond":
            counts = [traced_matmul_flops(b) for b in eqn.params["branches"]]
            total += max(c[0] for c in counts)
            whiles += max(c[1] for c in counts)
        else:
            if name == "while":
                whiles += 1
            for value in eqn.params.values():
                for sub in subs(value):
                    f, w = traced_matmul_flops(sub)
                    total, whiles = total + f, whiles + w
    return total, whiles


# ----------------------------------------------------------------------------- the compile


def _impl_set_by_user(config: str | Path | None, overrides: list[str]) -> bool:
    if any(parse_override(o)[0] == "model.impl" for o in overrides):
        return True
    if config is None:
        return False
    import yaml

    data = yaml.safe_load(Path(config).read_text()) or {}
    model = data.get("model") if isinstance(data, dict) else None
    return isinstance(model, dict) and "impl" in model


def _mesh_and_shardings(cfg: Config, devices: list[Any], params: Any, opt_state: Any):
    """(mesh, param shardings, opt shardings, batch sharding, rules) from
    ``memzoo.train.sharding``; parameters replicated (data parallel) when that module is
    absent."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    try:
        from memzoo.train import sharding as sh
    except ImportError:
        sh = None
    if sh is not None:
        mesh = sh.build_mesh(cfg, devices)
        if hasattr(sh, "validate_shardings"):
            sh.validate_shardings(mesh, params, cfg)
        p_sh = sh.param_shardings(mesh, params, cfg)
        opt_fn = getattr(sh, "opt_shardings", sh.param_shardings)
        o_sh = opt_fn(mesh, opt_state, cfg)
        b_sh = sh.batch_sharding(mesh, cfg)
        return mesh, p_sh, o_sh, b_sh, sh.rules(cfg), "memzoo.train.sharding (mesh.rules)"
    import numpy as np
    from jax.sharding import Mesh

    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // math.prod(s for s in sizes if s != -1)
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} != {len(devices)} devices")
    mesh = Mesh(np.asarray(devices).reshape(sizes), ("data", "fsdp", "tensor"))
    rep = NamedSharding(mesh, P())
    p_sh = jax.tree.map(lambda _: rep, params)
    o_sh = jax.tree.map(lambda _: rep, opt_state)
    return mesh, p_sh, o_sh, NamedSharding(mesh, P(("data", "fsdp"))), None, "replicated"


def _resolve_vocab(cfg: Config) -> None:
    if cfg.model.vocab_size == 0:
        from memzoo.data import build_tokenizer

        cfg.model.vocab_size = build_tokenizer(cfg.data).vocab_size


def compile_report(
    cfg: Config,
    topology: str,
    *,
    devices: list[Any] | None = None,
    impl_note: str = "",
    log: Any = None,
) -> dict[str, Any]:
    """Compile ``cfg``'s train step for ``topology`` and return the report dict (raises
    :class:`DoesNotFitError`, carrying the report, when it exceeds the chip's HBM)."""
    import inspect

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from memzoo.models.lm import build_model
    from memzoo.train.metrics import flops_per_token
    from memzoo.train.optim import make_optimizer
    from memzoo.train.step import make_train_step

    say = log or (lambda msg: None)
    gen, _ = parse_topology(topology)
    chip = CHIPS[gen]
    devices = tpu_topology_devices(topology) if devices is None else devices
    _resolve_vocab(cfg)
    t0 = time.perf_counter()
    model = nnx.eval_shape(
        lambda: build_model(cfg.model, seed=cfg.seed, precision=cfg.train.precision)
    )
    graphdef, params = nnx.split(model)
    n_params = sum(_prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_embed = _prod(model.embed.embedding.shape)
    del model
    tx, _ = make_optimizer(cfg)
    opt_state = jax.eval_shape(tx.init, params)
    mesh, p_sh, o_sh, b_sh, rules, how = _mesh_and_shardings(cfg, devices, params, opt_state)

    def sds(x: Any, s: Any) -> Any:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    params_in = jax.tree.map(sds, params, p_sh)
    opt_in = jax.tree.map(sds, opt_state, o_sh)
    B, T = cfg.batch_size, cfg.seq_len
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32}
    dtypes["loss_mask"] = jnp.float32
    batch_in = {k: jax.ShapeDtypeStruct((B, T), d, sharding=b_sh) for k, d in dtypes.items()}

    kw: dict[str, Any] = {}
    accepted = inspect.signature(make_train_step).parameters
    if "param_sharding" in accepted and rules is not None:
        kw = {
            "mesh": mesh,
            "rules": rules,
            "param_sharding": p_sh,
            "opt_sharding": o_sh,
            "batch_sharding": b_sh,
        }
    step = make_train_step(graphdef, tx, cfg.train.grad_accum, **kw)
    say(f"tracing the train step ({n_params / 1e6:.1f}M parameters, {len(devices)} devices)")
    traced = step.trace(params_in, opt_in, batch_in)
    traced_flops, while_loops = traced_matmul_flops(traced.jaxpr)
    lowered = traced.lower()
    t_lower = time.perf_counter() - t0
    say(f"lowered in {t_lower:.1f}s; compiling for {topology} ({chip.name})")
    n = len(devices)
    tokens = B * T
    fpt = flops_per_token(cfg, n_params - n_embed)
    model_flops = fpt * tokens
    report: dict[str, Any] = {
        "config": f"{cfg.model.name}:{cfg.model.size}",
        "topology": topology,
        "chip": dataclasses.asdict(chip),
        "devices": n,
        "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
        "sharding": how,
        "impl": cfg.model.impl,
        "impl_note": impl_note,
        "precision": cfg.train.precision,
        "params": n_params,
        "params_non_embedding": n_params - n_embed,
        "batch_size": B,
        "seq_len": T,
        "grad_accum": cfg.train.grad_accum,
        "tokens_per_step": tokens,
        "hbm_bytes": int(chip.hbm_bytes),
        "flops": {
            "traced_matmul_total": traced_flops,
            "traced_matmul_per_device": traced_flops / n,
            "traced_while_loops": while_loops,
            "model_per_step": model_flops,
            "model_per_token": fpt,
        },
    }
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler's own message (e.g. an HBM overflow)
        msg = " ".join(str(e).split())
        if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
            report["fits"] = False
            report["compiler_error"] = msg[:2000]
            report["seconds"] = {
                "trace_and_lower": t_lower,
                "compile": time.perf_counter() - t1,
            }
            raise DoesNotFitError(
                f"{report['config']} does not fit {topology} ({chip.hbm_gib:g} GiB HBM per "
                f"chip): the TPU compiler ran out of memory: {msg[:400]}",
                report,
            ) from None
        raise CompileError(f"compiling for {topology} failed: {msg[:600]}") from None
    t_compile = time.perf_counter() - t1

    mem = memory_figures(compiled.memory_analysis())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0))
    xla_bytes = float(cost.get("bytes accessed", 0.0))
    flops_dev = max(xla_flops, traced_flops / n)
    roof = roofline(flops_dev, xla_bytes, chip)
    report.update(
        {
            "memory_per_device": mem,
            "fits": mem["total"] <= chip.hbm_bytes,
            "hbm_fraction": mem["total"] / chip.hbm_bytes,
            "bytes_accessed_per_device": xla_bytes,
            "roofline": {**roof, "flops_per_device": flops_dev},
            "tokens_per_s": tokens / roof["step_s"] if roof["step_s"] > 0 else 0.0,
            "mfu": implied_mfu(model_flops, n, roof["step_s"], chip),
            "seconds": {"trace_and_lower": t_lower, "compile": t_compile},
        }
    )
    report["flops"].update({"xla_per_device": xla_flops, "xla_total": xla_flops * n})
    if not report["fits"]:
        raise DoesNotFitError(
            f"{report['config']} does not fit {topology}: {_gib(mem['total'])} per device "
            f"> {chip.hbm_gib:g} GiB HBM of a {chip.name} chip (arguments "
            f"{_gib(mem['arguments'])}, temps {_gib(mem['temps'])}); shard more (mesh.fsdp, "
            "mesh.tensor), lower batch_size or seq_len, or raise train.grad_accum",
            report,
        )
    return report


# ----------------------------------------------------------------------------- output


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB / 2 else f"{b / 1024**2:.1f} MiB"


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report (what ``memzoo compile`` prints)."""
    fl, chip = r["flops"], r["chip"]
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"{r['config']} on {r['topology']} ({r['devices']} x {chip['name']}; mesh {mesh}; "
        f"params: {r['sharding']})",
        f"  params {r['params'] / 1e6:.1f}M ({r['params_non_embedding'] / 1e6:.1f}M "
        f"non-embedding); batch {r['batch_size']} x {r['seq_len']} = "
        f"{r['tokens_per_step']:,} tokens/step; grad_accum {r['grad_accum']}; "
        f"precision {r['precision']}; impl {r['impl']}",
    ]
    mem = r.get("memory_per_device")
    if mem is None:  # the compiler gave up: its message says how much it needed
        lines += [
            "memory per device: the TPU compiler ran out of HBM:",
            f"  {r.get('compiler_error', '')[:300]}",
            f"  of {chip['hbm_gib']:g} GiB HBM: DOES NOT FIT",
        ]
    else:
        lines += [
            "memory per device (memory_analysis):",
            f"  arguments {_gib(mem['arguments'])}  outputs {_gib(mem['outputs'])}  "
            f"aliased {_gib(mem['aliased'])}  temps {_gib(mem['temps'])}  "
            f"code {_gib(mem['code'])}",
            f"  total {_gib(mem['total'])} of {chip['hbm_gib']:g} GiB HBM "
            f"({100 * r['hbm_fraction']:.1f}%): {'FITS' if r['fits'] else 'DOES NOT FIT'}",
        ]
    lines.append("FLOPs per step:")
    if "xla_per_device" in fl:
        lines.append(
            f"  XLA cost_analysis: {_si(fl['xla_per_device'])}FLOP per device, "
            f"{_si(fl['xla_total'])}FLOP total (while-loop bodies counted once)"
        )
    lines += [
        f"  traced matmuls (scan bodies x length): {_si(fl['traced_matmul_total'])}FLOP total, "
        f"{_si(fl['traced_matmul_per_device'])}FLOP per device",
        f"  model (6N + attention + memory, metrics.flops_per_token): "
        f"{_si(fl['model_per_step'])}FLOP ({_si(fl['model_per_token'])}FLOP/token)",
    ]
    roof = r.get("roofline")
    if roof is not None:
        lines += [
            f"roofline per chip ({chip['peak_tflops']:g} TFLOP/s bf16, "
            f"{chip['hbm_gbps']:g} GB/s HBM):",
            f"  compute {roof['compute_s'] * 1e3:.1f} ms, memory "
            f"{roof['memory_s'] * 1e3:.1f} ms ({_si(r['bytes_accessed_per_device'])}B accessed) "
            f"-> step {roof['step_s'] * 1e3:.1f} ms ({roof['bound']}-bound), "
            f"{r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%",
        ]
    sec = r.get("seconds", {})
    if sec:
        lines.append(
            f"  (trace+lower {sec['trace_and_lower']:.1f}s, compile {sec['compile']:.1f}s)"
        )
    if r.get("impl_note"):
        lines.append(f"  note: {r['impl_note']}")
    return "\n".join(lines)


def run(
    config: str | None,
    overrides: list[str],
    *,
    topology: str | None = None,
    json_path: str | None = None,
) -> int:
    """``memzoo compile``: returns the exit status (0 fits, 3 does not fit; one-line errors
    raise ConfigError / CompileError)."""
    topo_kv, overrides = split_topology(list(overrides))
    topology = topology or topo_kv
    if not topology:
        raise TopologyError("memzoo compile needs a topology: topology=v5e:16x16 (or --topology)")
    parse_topology(topology)
    cfg = load_config(config, overrides)
    note = ""
    if not _impl_set_by_user(config, overrides):
        cfg.model.impl = "xla"
        note = (
            "model.impl=xla (compile's default: the chunked XLA ops, the same on any host; "
            "model.impl=pallas_tpu compiles the Pallas kernels instead)"
        )
    elif cfg.model.impl == "auto":
        note = "model.impl=auto resolves to xla on this CPU host (jax.default_backend()='cpu')"

    def log(msg: str) -> None:
        print(f"[compile] {msg}", file=sys.stderr, flush=True)

    try:
        report = compile_report(cfg, topology, impl_note=note, log=log)
        code, err = 0, None
    except DoesNotFitError as e:
        report, code, err = e.report, 3, str(e)
    print(format_report(report))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    if err:
        print(f"memzoo: error: {err}", file=sys.stderr)
    return code


def _cmd_compile(args: argparse.Namespace) -> int:
    try:
        return run(args.config, args.overrides, topology=args.topology, json_path=args.json)
    except CompileError as e:
        print(f"memzoo: error: {e}", file=sys.stderr)
        return 1


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser(
        "compile",
        help="compile the train step for a TPU topology on this host (memory, FLOPs, roofline)",
        description="memzoo compile CONFIG [key=value ...] topology=v5e:16x16 [--json PATH]: "
        "ahead-of-time compile of the full train step for a TPU pod topology with libtpu "
        "(make tpu-tools), on a CPU host; prints per-device memory vs HBM (exit 3 when it "
        "does not fit), FLOPs per step, and a roofline step time and MFU.",
    )
    p.add_argument("config", help="run config, e.g. configs/pods/titans_mac_170m.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides and topology=GEN:SHAPE")
    p.add_argument("--topology", default=None, help="e.g. v5e:16x16, v5p:4x4x4 (or topology=)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.set_defaults(func=_cmd_compile)
