"""`memzoo compile`: the roofline / MFU arithmetic, topology parsing, the traced FLOP count, and
(marked ``tpu_compile``, skipped without libtpu) real compiles for a v5e:2x2 topology."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from memzoo.cli import main
from memzoo.compile import (
    CHIPS,
    GIB,
    TopologyError,
    format_report,
    implied_mfu,
    memory_figures,
    parse_topology,
    roofline,
    split_topology,
    traced_matmul_flops,
)

# a tiny 1:1 Gated DeltaNet / attention hybrid: every kind of layer of the pod configs' hybrid
TINY = [
    "model=hybrid_gdn",
    "model.pattern=MA",
    "model.n_layers=2",
    "model.d_model=64",
    "model.num_heads=2",
    "model.attn_heads=2",
    "model.vocab_size=512",
    "batch_size=8",
    "seq_len=128",
]


def test_roofline_compute_and_memory_bound():
    v5e = CHIPS["v5e"]
    # 197 TFLOP at 197 TFLOP/s = 1 s; 81.9 GB at 819 GB/s = 0.1 s: compute-bound, 1 s
    r = roofline(197e12, 81.9e9, v5e)
    assert r["compute_s"] == pytest.approx(1.0)
    assert r["memory_s"] == pytest.approx(0.1)
    assert r["step_s"] == pytest.approx(1.0) and r["bound"] == "compute"
    # the other way round on a v5p: 2765 GB at 2765 GB/s = 1 s beats 45.9 TFLOP (0.1 s)
    r = roofline(45.9e12, 2765e9, CHIPS["v5p"])
    assert r["step_s"] == pytest.approx(1.0) and r["bound"] == "memory"
    assert r["compute_s"] == pytest.approx(0.1)


def test_implied_mfu():
    v6e = CHIPS["v6e"]
    # 256 chips x 918 TFLOP/s x 2 s = 470 PFLOP of capacity; 117.5 PFLOP of model work = 25%
    capacity = 256 * 918e12 * 2.0
    assert implied_mfu(0.25 * capacity, 256, 2.0, v6e) == pytest.approx(0.25)
    # a compute-bound step whose FLOPs are all model FLOPs runs at 100% MFU
    step = roofline(4 * 197e12, 0.0, CHIPS["v5e"])["step_s"]
    assert implied_mfu(16 * 4 * 197e12, 16, step, CHIPS["v5e"]) == pytest.approx(1.0)
    assert implied_mfu(1e12, 4, 0.0, v6e) == 0.0


def test_chip_table():
    assert {k: (c.hbm_gib, c.peak_tflops, c.hbm_gbps) for k, c in CHIPS.items()} == {
        "v4": (32, 275, 1200),
        "v5e": (16, 197, 819),
        "v5p": (95, 459, 2765),
        "v6e": (32, 918, 1640),
    }
    assert CHIPS["v5e"].hbm_bytes == 16 * GIB


def test_memory_figures_total_counts_donated_buffers_once():
    stats = SimpleNamespace(
        argument_size_in_bytes=100,
        output_size_in_bytes=90,
        alias_size_in_bytes=80,
        temp_size_in_bytes=50,
        generated_code_size_in_bytes=5,
    )
    assert memory_figures(stats)["total"] == 100 + 90 - 80 + 50 + 5


def test_parse_and_split_topology():
    assert parse_topology("v5e:16x16") == ("v5e", (16, 16))
    assert parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
    for bad in ("v5e", "v5e:16", "v5e:2x2x2x2", "v7:2x2", "v5e:0x2", "tpu:2x2"):
        with pytest.raises(TopologyError) as e:
            parse_topology(bad)
        assert "\n" not in str(e.value) and repr(bad) in str(e.value)
    assert split_topology(["a=1", "topology=v5e:2x2", "b=2"]) == ("v5e:2x2", ["a=1", "b=2"])
    assert split_topology(["a=1"]) == (None, ["a=1"])


def test_traced_matmul_flops_multiplies_scan_bodies():
    x, w = jnp.ones((8, 32)), jnp.ones((32, 32))
    one = 2 * 8 * 32 * 32  # one [8, 32] @ [32, 32]

    def g(x, w):
        y = x @ w
        c, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), y, None, length=5)
        return jax.lax.cond(c.sum() > 0, lambda a: a @ w @ w, lambda a: a @ w, c)

    # 1 + 5 scan steps + the costlier cond branch (2)
    assert traced_matmul_flops(jax.make_jaxpr(g)(x, w)) == (8 * one, 0)
    # inside jit and under grad: 2 forward matmuls, 3 backward (x needs no gradient)
    loss = lambda w: jnp.sum(jax.jit(lambda w: jnp.tanh(x @ w) @ w)(w))
    assert traced_matmul_flops(jax.make_jaxpr(jax.grad(loss))(w))[0] == 5 * one
    # a while loop's trip count is unknown: its body counts once, and is reported
    h = lambda x, w: jax.lax.while_loop(lambda c: c[0, 0] < 3, lambda c: c @ w, x)
    assert traced_matmul_flops(jax.make_jaxpr(h)(x, w)) == (one, 1)


def test_format_report_states_the_verdict():
    r = {
        "config": "m:tiny",
        "topology": "v5e:2x2",
        "chip": {"name": "TPU v5e", "hbm_gib": 16, "peak_tflops": 197, "hbm_gbps": 819},
        "devices": 4,
        "mesh": {"data": 4, "fsdp": 1, "tensor": 1},
        "sharding": "replicated",
        "impl": "xla",
        "precision": "fp32",
        "params": 1e6,
        "params_non_embedding": 9e5,
        "batch_size": 8,
        "seq_len": 128,
        "grad_accum": 1,
        "tokens_per_step": 1024,
        "memory_per_device": {k: GIB for k in ("arguments", "outputs", "aliased", "temps")}
        | {"code": 0, "total": 2 * GIB},
        "fits": True,
        "hbm_fraction": 0.125,
        "flops": {
            "xla_per_device": 1e9,
            "xla_total": 4e9,
            "traced_matmul_total": 4e9,
            "traced_matmul_per_device": 1e9,
            "model_per_step": 2e9,
            "model_per_token": 2e6,
        },
        "bytes_accessed_per_device": 1e9,
        "roofline": {"compute_s": 5e-6, "memory_s": 1.2e-3, "step_s": 1.2e-3, "bound": "memory"},
        "tokens_per_s": 8.5e5,
        "mfu": 0.001,
        "seconds": {"trace_and_lower": 1.0, "compile": 2.0},
    }
    text = format_report(r)
    assert "total 2.00 GiB of 16 GiB HBM (12.5%): FITS" in text
    assert "memory-bound" in text
    r["fits"] = False
    assert "DOES NOT FIT" in format_report(r)
    # the compiler gave up (HBM overflow): no memory figures, its message instead
    for k in ("memory_per_device", "roofline", "mfu", "hbm_fraction"):
        del r[k]
    r["compiler_error"] = "RESOURCE_EXHAUSTED: Ran out of memory on HBM (17.2G)"
    text = format_report(r)
    assert "Ran out of memory on HBM (17.2G)" in text and "DOES NOT FIT" in text


def test_cli_bad_topology_is_one_line_error(capsys):
    assert main(["compile", "configs/train/quickstart.yaml", "topology=v5e:banana"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memzoo: error: bad topology 'v5e:banana'") and "\n" not in err
    assert main(["compile", "configs/train/quickstart.yaml"]) == 2
    assert "needs a topology" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real compiles


@pytest.mark.tpu_compile
def test_compile_tiny_for_v5e_2x2(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(
        ["compile", "configs/train/quickstart.yaml", *TINY, "topology=v5e:2x2"]
        + ["--json", str(out)]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "on v5e:2x2 (4 x TPU v5e" in text and ": FITS" in text
    r = json.loads(out.read_text())
    mem = r["memory_per_device"]
    assert r["devices"] == 4 and r["fits"] is True
    assert mem["arguments"] > 0 and mem["outputs"] > 0 and mem["total"] > 0
    assert mem["total"] < CHIPS["v5e"].hbm_bytes
    assert r["flops"]["xla_per_device"] > 0 and r["flops"]["traced_matmul_total"] > 0
    assert r["flops"]["xla_total"] == pytest.approx(4 * r["flops"]["xla_per_device"])
    assert r["impl"] == "xla"
    assert r["roofline"]["step_s"] > 0 and 0 < r["mfu"] < 1
    # per device: data parallel over 4 chips, each runs a quarter of the traced matmuls
    assert r["flops"]["xla_per_device"] == pytest.approx(
        r["flops"]["traced_matmul_per_device"], rel=0.5
    )


@pytest.mark.tpu_compile
def test_compile_too_large_for_the_chip_fails_clearly(tmp_path, capsys):
    # 2.1B embedding parameters (fp32 + two Adam moments + gradients), replicated: > 16 GiB
    big = [o for o in TINY if not o.startswith(("model.vocab_size", "model.d_model"))]
    big += ["model.vocab_size=262144", "model.d_model=8192", "model.num_heads=64"]
    big += ["model.attn_heads=64", "batch_size=4", "seq_len=64"]
    code = main(["compile", "configs/train/quickstart.yaml", *big, "topology=v5e:2x2"])
    cap = capsys.readouterr()
    assert code == 3, cap.out + cap.err
    err = cap.err.strip().splitlines()[-1]
    assert err.startswith("memzoo: error: hybrid_gdn:tiny does not fit v5e:2x2")
    assert "16 GiB HBM" in err


@pytest.mark.tpu_compile
def test_topology_libtpu_rejects_is_one_line_error(capsys):
    assert main(["compile", "configs/train/quickstart.yaml", *TINY, "topology=v5e:3x5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memzoo: error: libtpu does not accept topology 'v5e:3x5'")
    assert "\n" not in err


def test_pod_configs_split_over_both_slices():
    from pathlib import Path

    from memzoo.config import CONFIG_ROOT, load_config
    from memzoo.train.sharding import mesh_sizes

    files = sorted(Path(CONFIG_ROOT, "pods").glob("*.yaml"))
    names = {f.stem for f in files}
    assert names == {
        f"{m}_{s}"
        for m in ("titans_mac", "hybrid_gdn", "mom")
        for s in ("170m", "340m", "760m", "1.3b")
    }
    for f in files:
        cfg = load_config(f)
        assert f"{cfg.model.name}_{cfg.model.size}" == f.stem
        assert cfg.model.vocab_size == 32000 and cfg.train.precision == "bf16"
        for chips in (256, 64):  # v5e:16x16, v5p:4x4x4
            (data, fsdp, tensor), _ = mesh_sizes(cfg, chips)
            assert data * fsdp * tensor == chips
            assert cfg.batch_size % (data * fsdp * cfg.train.grad_accum) == 0
