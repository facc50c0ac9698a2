"""Subprocess entry points for the sharding / multi-host / fault tests (run as a script, so
that XLA_FLAGS such as --xla_force_host_platform_device_count apply before JAX starts).

    python train_workers.py meshes OUT_DIR          8 host devices: one short run per mesh
    python train_workers.py host OUT_DIR STOP_AT    one process of a multi-process run
    python train_workers.py slow_save OUT_DIR       trains; the 2nd checkpoint never commits

Each prints one line ``RESULT <json>`` on stdout."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tiny_runs import QUICKSTART, TINY_DATA, TINY_HYBRID

# A tiny run whose dims divide 8 devices on every axis (vocab 264 = 259 byte ids, padded).
BASE = [
    *TINY_HYBRID,
    *TINY_DATA,
    "batch_size=8",
    "model.vocab_size=264",
    "optim.schedule=constant",
    "optim.warmup_steps=2",
    "train.eval_batches=0",
    "train.log_every=1",
]
MESHES = {
    "data": ["mesh.data=8"],
    "fsdp": ["mesh.data=1", "mesh.fsdp=8"],
    "tensor": ["mesh.data=1", "mesh.tensor=8"],
    "mixed": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}
SPEC_LEAVES = (
    "embed.embedding",
    "blocks.0.mlp.up.kernel",
    "blocks.0.mlp.down.kernel",
    "blocks.0.mixer.in_proj.kernel",
    "blocks.0.mixer.o_proj.kernel",
    "blocks.1.mixer.k_proj.kernel",
    "blocks.0.norm1.scale",
)


def _flat_specs(tree) -> dict[str, str]:
    import jax

    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(
            str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path
        )
        out[name] = [str(tuple(x.sharding.spec)), list(x.addressable_shards[0].data.shape)]
    return out


def _restored_specs(cfg) -> dict:
    """Shardings of the final checkpoint restored into the config's sharded templates."""
    import jax
    from flax import nnx

    from memzoo.models.lm import build_model
    from memzoo.train.checkpoint import Checkpointer
    from memzoo.train.optim import make_optimizer
    from memzoo.train.sharding import build_mesh, opt_shardings, param_shardings

    mesh = build_mesh(cfg)
    abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model)))[1]
    tx, _ = make_optimizer(cfg)
    p_sh = param_shardings(mesh, abstract, cfg)
    o_sh = opt_shardings(mesh, jax.eval_shape(tx.init, abstract), cfg)
    params = jax.jit(lambda: nnx.split(build_model(cfg.model))[1], out_shardings=p_sh)()
    opt = jax.jit(tx.init, out_shardings=o_sh)(params)
    ckpt = Checkpointer(cfg.run_dir / "checkpoints")
    try:
        params, opt, _ = ckpt.restore(ckpt.latest_step(), params, opt)
    finally:
        ckpt.close()
    p = _flat_specs(params)
    o = _flat_specs(opt)
    mu = {k.split("mu.", 1)[1]: v for k, v in o.items() if ".mu." in f".{k}"}
    return {
        "params": {k: v for k, v in p.items() if k.removesuffix(".value") in SPEC_LEAVES},
        "mu": {k: v for k, v in mu.items() if k.removesuffix(".value") in SPEC_LEAVES},
    }


def meshes(out: str) -> dict:
    from memzoo.config import load_config
    from memzoo.train.loop import train

    res = {}
    for name, extra in MESHES.items():
        cfg = load_config(QUICKSTART, [*BASE, f"output_dir={out}/{name}", "steps=3", *extra])
        res[name] = {"losses": train(cfg)["losses"], **_restored_specs(cfg)}
    # the multi-host reference: 8 devices, 1 process, the 2 data shards of a 2-host run
    cfg = load_config(
        QUICKSTART,
        [*BASE, f"output_dir={out}/ref2", "steps=4", "mesh.data=8", "distributed.data_shards=2"],
    )
    res["two_shards"] = {"losses": train(cfg)["losses"]}
    return res


def host(out: str, stop_at: str, *extra: str) -> dict:
    from memzoo.config import load_config
    from memzoo.train.loop import train

    cfg = load_config(
        QUICKSTART,
        [*BASE, f"output_dir={out}", "mesh.data=4", "mesh.dcn_data=2", *extra],
    )
    s = train(cfg, stop_at=int(stop_at) if int(stop_at) > 0 else None)
    import jax

    return {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "start": s["start_step"],
        "final": s["final_step"],
        "losses": s["losses"],
    }


def slow_save(out: str) -> dict:
    """Train with checkpoints every 2 steps; the commit of step 4's checkpoint (orbax's atomic
    rename of the finished temporary directory) announces itself and then hangs, so the
    parent can SIGKILL the process in the middle of that checkpoint write."""
    from orbax.checkpoint._src.path import atomicity

    from memzoo.config import load_config
    from memzoo.train.loop import train

    marker = Path(out) / "WRITING"
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if Path(self.get_final()).name == "4":  # the commit of step 4's directory
            marker.write_text(str(self.get_final()))
            while True:
                time.sleep(1)
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    cfg = load_config(
        QUICKSTART, [*BASE, f"output_dir={out}", "steps=6", "train.checkpoint_every=2"]
    )
    train(cfg)
    return {}


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    result = {"meshes": meshes, "host": host, "slow_save": slow_save}[mode](*args)
    print("RESULT " + json.dumps(result), flush=True)
