"""Run logging: metrics.jsonl (one JSON object per logged step), TensorBoard, FLOPs estimate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memzoo.config import Config, layer_kinds


def flops_per_token(cfg: Config, n_params_non_embedding: int) -> float:
    """Analytic training FLOPs per token (forward + backward = 3x forward).

    6 N for the dense matmuls (N = non-embedding parameters, plus the output head), plus per
    attention layer 6 * d_model * T_eff (scores and values; T_eff = seq_len / 2 for causal, or
    the window), plus per memory layer the chunked-op work, about
    6 * H * (2 dk dv + C (dk + dv) / 2) (state read/write and the intra-chunk products).
    An estimate for throughput reporting, not a measured count.
    """
    m = cfg.model
    n = n_params_non_embedding + m.vocab_size * m.d_model
    total = 6.0 * n
    dk = m.head_dim or m.d_model // m.num_heads
    dv = dk * m.expand_v
    t_eff = min(cfg.seq_len / 2, m.attn_window) if m.attn_window else cfg.seq_len / 2
    for kind in layer_kinds(m):
        if kind == "attention":
            total += 6.0 * 2 * m.d_model * t_eff
        else:
            c = min(m.chunk_size, cfg.seq_len)
            total += 6.0 * m.num_heads * (2 * dk * dv + c * (dk + dv) / 2)
    return total


class MetricsWriter:
    def __init__(self, run_dir: Path, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                self._tb = None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the restored checkpoint by the interrupted run."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
