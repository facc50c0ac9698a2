"""Multi-controller runs: ``jax.distributed`` start-up, per-host data, cross-host agreement.

Every host runs the same program (JAX multi-controller SPMD). ``initialize`` starts
``jax.distributed`` from the ``distributed.*`` config keys or the environment
(``MEMZOO_COORDINATOR_ADDRESS``, ``MEMZOO_NUM_PROCESSES``, ``MEMZOO_PROCESS_ID``), or with
JAX's cluster auto-detection (``distributed.auto=true``: TPU pods, SLURM, ...). A host that
stops sending heartbeats for ``distributed.heartbeat_timeout`` seconds is declared dead by the
coordination service and the others fail with an error instead of waiting forever.

Data: the global batch is the concatenation of ``S = distributed.data_shards`` (0: one per
process) shard streams of ``batch_size / S`` rows; shard ``s`` reads documents ``s::S``
(grain slicing). Each host builds only the shards that cover the batch rows its devices hold
(from the batch sharding) and hands its rows to ``jax.make_array_from_process_local_data``.
The global batch depends on S, not on the number of hosts, so a 1-process run with
``distributed.data_shards=2`` sees exactly the batches of a 2-process run.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from memzoo.config import Config, ConfigError
from memzoo.data import make_train_iterator


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def settings(cfg: Config) -> dict[str, Any] | None:
    """The ``jax.distributed.initialize`` arguments of the config (None: single process)."""
    d = cfg.distributed
    addr = d.coordinator_address or os.environ.get("MEMZOO_COORDINATOR_ADDRESS", "")
    kw: dict[str, Any] = {
        "initialization_timeout": d.initialization_timeout,
        "heartbeat_timeout_seconds": d.heartbeat_timeout,
        "shutdown_timeout_seconds": d.shutdown_timeout,
    }
    if addr:
        n = d.num_processes or _env_int("MEMZOO_NUM_PROCESSES", 0)
        pid = d.process_id if d.process_id >= 0 else _env_int("MEMZOO_PROCESS_ID", -1)
        if n < 1:
            raise ConfigError(
                "distributed.coordinator_address is set but distributed.num_processes is not "
                "(or MEMZOO_NUM_PROCESSES)"
            )
        if not 0 <= pid < n:
            raise ConfigError(
                f"distributed.process_id={pid} must be in [0, {n}) (or set MEMZOO_PROCESS_ID)"
            )
        return {**kw, "coordinator_address": addr, "num_processes": n, "process_id": pid}
    if d.auto:
        return kw
    return None


def initialize(cfg: Config) -> bool:
    """Start ``jax.distributed`` (once per process) when the config asks for it."""
    kw = settings(cfg)
    if kw is None:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(**kw)
    return True


def is_main() -> bool:
    """Whether this process writes run files (metrics, config, logs): process 0."""
    return jax.process_index() == 0


def allgather_json(obj: Any) -> list[Any]:
    """``obj`` (JSON-serialisable) of every process, in process order."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32)))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(every[i, : int(sizes[i, 0])]).decode()) for i in range(len(sizes))]


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).max())


def local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """The contiguous range of batch rows held by this process's devices under ``sharding``."""
    idx = sharding.addressable_devices_indices_map(shape).values()
    spans = sorted({(s[0].start or 0, shape[0] if s[0].stop is None else s[0].stop) for s in idx})
    lo, hi = spans[0][0], max(e for _, e in spans)
    covered = set()
    for a, b in spans:
        covered.update(range(a, b))
    if covered != set(range(lo, hi)):
        raise ConfigError(
            f"process {jax.process_index()} holds batch rows {spans}, not one contiguous range; "
            "use a mesh whose batch axes keep each host's devices together"
        )
    return lo, hi


class HostData:
    """This process's rows of each global training batch (see the module docstring)."""

    def __init__(self, cfg: Config, tokenizer: Any, sharding: NamedSharding):
        B, T = cfg.batch_size, cfg.seq_len
        S = cfg.distributed.data_shards or jax.process_count()
        if B % S:
            raise ConfigError(
                f"batch_size={B} is not divisible by the data shards ({S}; "
                "distributed.data_shards, 0 = one per process)"
            )
        self.num_shards, self.per = S, B // S
        self.lo, self.hi = local_rows(sharding, (B, T))
        first, last = self.lo // self.per, (self.hi - 1) // self.per
        self.shards = {
            s: make_train_iterator(
                cfg.data,
                tokenizer,
                batch_size=self.per,
                seq_len=T,
                seed=cfg.seed,
                shard_index=s,
                shard_count=S,
            )
            for s in range(first, last + 1)
        }
        self._offset = self.lo - first * self.per

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(self.shards[s]) for s in sorted(self.shards)]
        n = self.hi - self.lo
        if len(parts) == 1 and self._offset == 0 and n == self.per:
            return parts[0]
        return {
            k: np.concatenate([p[k] for p in parts])[self._offset : self._offset + n]
            for k in parts[0]
        }

    def get_state(self) -> dict[str, Any]:
        """Checkpoint entries (a collective with several processes): ``{"iterator": state}``
        for one shard (the single-process format), else ``{"shards": [state per shard]}``."""
        mine = {str(s): it.get_state() for s, it in self.shards.items()}
        if self.num_shards == 1 and jax.process_count() == 1:
            return {"iterator": mine["0"]}
        merged: dict[str, Any] = {}
        for states in allgather_json(mine):
            merged.update(states)
        return {"shards": [merged[str(s)] for s in range(self.num_shards)]}

    def set_state(self, saved: dict[str, Any]) -> None:
        if "shards" in saved:
            states = saved["shards"]
            if len(states) != self.num_shards:
                raise ConfigError(
                    f"the checkpoint's data has {len(states)} shards but this run reads "
                    f"{self.num_shards} (distributed.data_shards; 0 = one per process); set "
                    f"distributed.data_shards={len(states)} to resume"
                )
        else:
            if self.num_shards != 1:
                raise ConfigError(
                    f"the checkpoint's data has 1 shard but this run reads {self.num_shards}; "
                    "set distributed.data_shards=1 to resume"
                )
            states = [saved["iterator"]]
        for s, it in self.shards.items():
            it.set_state(states[s])

    def local_slice(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's rows of a global batch (held-out batches, built on every host)."""
        return {k: np.asarray(v)[self.lo : self.hi] for k, v in batch.items()}
