"""Gradient memories as presets of the Miras four choices (Behrouz et al. 2025, "It's All
Connected"): memory architecture, attentional bias, retention, learning algorithm.

One class, :class:`GradientMemory`, runs the regime-C op ``pallas_kernels.gradient_memory``;
every named model is a :class:`GradientPreset` (a new variant is a config, not a file):

* ``ttt_linear`` / ``ttt_mlp`` (Sun et al. 2024): f(z) = z + LN(f_res(z)), l2, plain descent,
  eta = eta_max * sigmoid(W x) per head, mini-batch (chunk) 16.
* ``titans_lmm`` (Behrouz, Zhong, Mirrokni 2025, eqs. 12-14): 2-layer MLP memory (x4, GELU)
  z + LN(W1 act(W0 z)), l2, momentum ("surprise", eq. 10: our mu_t is the paper's eta_t, our
  eta_t its theta_t), forget gate a_t = 1 - alpha_t (eq. 13); gates sigmoid(W x) per head.
* ``moneta``: lp bias (p = 3), accumulator retention with the l_q normaliser (q = 4; Miras
  eqs. 24-25); ``yaad``: Huber bias with a learned radius delta_t (eq. 26); ``memora``: l2 with
  softmax (KL) retention over each weight row (eq. 27). Residual MLP memory, plain descent.
* ``omeganet``: the Omega rule (ATLAS eq. 9-10) over a window of c = 4 tokens with learned
  gamma_i in [0, 1], polynomial features (degree 2, coefficients initialised to 1/i!), linear
  memory with decay; ``atlas``: the same window with Muon (eqs. 32-33; eta outside NS_5, since
  Newton-Schulz is scale-invariant) on a residual MLP memory; ``atlas_pp``: the gated memory
  z + W1(act(W2 z) * W3 z).

Config keys ``gm_*`` of the model override any of the four choices of the preset.
choice: the polynomial map is the full degree-2 expansion [a1 z, a2 upper(z z^T)] of the
L2-normalised q, k, re-normalised; with it a residual memory adds the degree-1 block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.layers.norms import l2_normalize
from memzoo.layers.partitioning import dense, kernel_op, param
from memzoo.memories.base import Array, Gates, Memory, kernel_kwargs, register_memory
from pallas_kernels.ops.gradient_memory import (
    GradientMemorySpec,
    MemoryArch,
    gradient_memory,
    gradient_memory_step,
    init_state,
    read_weights,
)

ALGORITHMS = ("gd", "momentum", "muon")
RETENTIONS = ("none", "head", "channel")
FEATURE_MAPS = ("none", "poly")


@dataclasses.dataclass(frozen=True)
class GradientPreset:
    arch: str = "mlp"  # memory: linear | mlp | gated_mlp
    depth: int = 2
    expansion: float = 4.0
    activation: str = "gelu"
    residual: bool = True
    layer_norm: bool = True
    loss: str = "l2"  # attentional bias: dot | l2 | lp | huber
    lp_p: float = 3.0
    retention: str = "head"  # none | head | channel (a_t per head, or per key channel)
    normalizer: str = "none"  # none | lq | softmax
    norm_q: float = 4.0
    algorithm: str = "momentum"  # gd | momentum | muon
    ns_steps: int = 5
    window: int = 1  # Omega rule c
    feature_map: str = "none"  # none | poly
    eta_max: float = 1.0

    def __post_init__(self):
        for name, value, valid in (
            ("algorithm", self.algorithm, ALGORITHMS),
            ("retention", self.retention, RETENTIONS),
            ("feature_map", self.feature_map, FEATURE_MAPS),
        ):
            if value not in valid:
                raise ValueError(f"gradient memory: unknown {name} {value!r}; valid: {valid}")


PRESETS: dict[str, GradientPreset] = {
    "ttt_linear": GradientPreset(
        arch="linear", residual=False, layer_norm=True, algorithm="gd", retention="none"
    ),
    "ttt_mlp": GradientPreset(algorithm="gd", retention="none", eta_max=0.1),
    "titans_lmm": GradientPreset(),
    "moneta": GradientPreset(loss="lp", lp_p=3.0, normalizer="lq", norm_q=4.0, algorithm="gd"),
    "yaad": GradientPreset(loss="huber", algorithm="gd"),
    "memora": GradientPreset(normalizer="softmax", algorithm="gd", layer_norm=True),
    "omeganet": GradientPreset(
        arch="linear",
        residual=False,
        layer_norm=False,
        algorithm="gd",
        window=4,
        feature_map="poly",
    ),
    "atlas": GradientPreset(algorithm="muon", window=4, feature_map="poly", layer_norm=False),
    "atlas_pp": GradientPreset(
        arch="gated_mlp", algorithm="muon", window=4, feature_map="poly", layer_norm=False
    ),
}
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(GradientPreset))


def poly_dim(dk: int) -> int:
    return dk + dk * (dk + 1) // 2


class GradientMemory(Memory):
    """A memory that learns at test time (SPEC regime C); see the module docstring."""

    chunk_grid = True  # packed documents equal each alone when they start on the chunk grid

    def __init__(
        self,
        preset: GradientPreset,
        *,
        d_model: int,
        num_heads: int,
        dk: int,
        dv: int,
        chunk_size: int = 16,
        impl: str = "auto",
        kernel_options: dict[str, Any] | None = None,
        gate_low_rank: int = 16,
        init_std: float = 0.02,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **_: Any,
    ):
        p = preset
        self.preset = p
        self.num_heads, self.chunk_size, self.impl = num_heads, chunk_size, impl
        self.kernel_kw = kernel_kwargs(kernel_options)
        self.dk_in = dk
        dk_mem = poly_dim(dk) if p.feature_map == "poly" else dk
        self.dk, self.dv = dk_mem, dv
        residual = p.residual
        if residual and dk_mem < dv:
            raise ValueError(
                f"gradient memory: a residual memory needs dk >= dv, got {dk_mem} < {dv}"
            )
        arch = MemoryArch(
            p.arch,
            depth=p.depth,
            expansion=p.expansion,
            activation=p.activation,
            residual=residual,
            layer_norm=p.layer_norm,
        )
        if p.arch == "mlp" and p.depth < 2:
            raise ValueError("gradient memory: an mlp memory needs depth >= 2 (use arch=linear)")
        if p.retention == "channel" and p.arch != "linear":
            raise ValueError("gradient memory: per-channel retention needs the linear memory")
        self.spec = GradientMemorySpec(
            arch=arch,
            loss=p.loss,
            lp_p=p.lp_p,
            normalizer=p.normalizer,
            norm_q=p.norm_q,
            muon=p.algorithm == "muon",
            ns_steps=p.ns_steps,
            window=p.window,
        )
        H = num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=True)
        kw_lr = dict(kw, **dense("embed", "low_rank"))
        kw_lr2 = dict(kw, **dense("low_rank", "heads"))
        kw.update(dense("embed", "gates"))
        init = nnx.initializers.normal(init_std)
        self.w_eta = nnx.Linear(d_model, H, kernel_init=init, **kw)
        if p.retention == "head":
            self.w_a = nnx.Linear(
                d_model, H, kernel_init=init, bias_init=nnx.initializers.constant(-4.0), **kw
            )
        elif p.retention == "channel":
            self.w_a1 = nnx.Linear(d_model, gate_low_rank, kernel_init=init, **kw_lr)
            self.w_a2 = nnx.Linear(
                gate_low_rank,
                H * dk_mem,
                kernel_init=init,
                bias_init=nnx.initializers.constant(-4.0),
                **kw_lr2,
            )
        if p.algorithm != "gd":
            self.w_mu = nnx.Linear(
                d_model, H, kernel_init=init, bias_init=nnx.initializers.constant(2.0), **kw
            )
        if p.window > 1:
            self.w_gamma = nnx.Linear(
                d_model, H, kernel_init=init, bias_init=nnx.initializers.constant(2.0), **kw
            )
        if p.loss == "huber":
            self.w_delta = nnx.Linear(
                d_model, H, kernel_init=init, bias_init=nnx.initializers.constant(1.0), **kw
            )
        if p.feature_map == "poly":
            self.poly_coef = param(jnp.array([1.0, 0.5], param_dtype), None)  # 1/i!, i = 1, 2
        key = rngs.params()
        theta = arch.init(key, H, dk_mem, dv)
        if p.normalizer == "softmax":
            # Memora: log-weights N(0, 1), so the weights start on the simplex but not uniform
            # (uniform rows make every hidden unit equal and the memory's LayerNorm ill-posed)
            theta = {
                n: jax.random.normal(jax.random.fold_in(key, i), w.shape)
                for i, (n, w) in enumerate(sorted(theta.items()))
            }
        self.weight_names = tuple(sorted(theta))
        for n, w in theta.items():  # the reset (learned initial) memory weights, per head
            names = ("state",) + (None,) * (w.ndim - 1)  # [H, ...] per head
            setattr(self, f"theta_{n}", param(w.astype(param_dtype), *names))

    # -- features and gates --------------------------------------------------------------------

    def _poly(self, z: Array) -> Array:
        c = self.poly_coef[...].astype(jnp.float32)
        d = z.shape[-1]
        iu = jnp.triu_indices(d)
        outer = (z[..., :, None] * z[..., None, :])[..., iu[0], iu[1]]
        return l2_normalize(jnp.concatenate([c[0] * z, c[1] * outer], -1))

    def features(self, x: Array, q: Array, k: Array, v: Array) -> tuple[Array, Array, Array, Gates]:
        p = self.preset
        B, T = x.shape[:2]
        q, k = l2_normalize(q.astype(jnp.float32)), l2_normalize(k.astype(jnp.float32))
        if p.feature_map == "poly":
            q, k = self._poly(q), self._poly(k)
        f32 = jnp.float32
        gates: Gates = {"eta": p.eta_max * jax.nn.sigmoid(self.w_eta(x).astype(f32))}
        if p.retention == "head":
            gates["log_a"] = jax.nn.log_sigmoid(-self.w_a(x).astype(f32))  # a = 1 - alpha
        elif p.retention == "channel":
            z = self.w_a2(self.w_a1(x)).astype(f32).reshape(B, T, self.num_heads, self.dk)
            gates["log_a"] = jax.nn.log_sigmoid(-z)
        if p.algorithm != "gd":
            gates["mu"] = jax.nn.sigmoid(self.w_mu(x).astype(f32))
        if p.window > 1:
            gates["gamma"] = jax.nn.sigmoid(self.w_gamma(x).astype(f32))
        if p.loss == "huber":
            gates["delta"] = jax.nn.softplus(self.w_delta(x).astype(f32))
        return q, k, v, gates

    # -- execution paths -----------------------------------------------------------------------

    def _params(self) -> dict[str, Array]:
        return {n: getattr(self, f"theta_{n}")[...].astype(jnp.float32) for n in self.weight_names}

    def parallel(self, q, k, v, gates, *, initial_state=None, segment_ids=None):
        return kernel_op(
            gradient_memory,
            (q, k, v, gates["eta"]),
            dict(
                spec=self.spec,
                params=self._params(),
                mu=gates.get("mu"),
                log_a=gates.get("log_a"),
                gamma=gates.get("gamma"),
                delta=gates.get("delta"),
                initial_state=initial_state,
                segment_ids=segment_ids,
                chunk_size=self.chunk_size,
                impl=self.impl,
                **dict(self.kernel_kw),
            ),
        )

    def step(self, q, k, v, gates, state):
        return gradient_memory_step(
            q,
            k,
            v,
            gates["eta"],
            state,
            spec=self.spec,
            params=self._params(),
            mu=gates.get("mu"),
            log_a=gates.get("log_a"),
            gamma=gates.get("gamma"),
            delta=gates.get("delta"),
            chunk_size=self.chunk_size,
        )

    def read(self, q: Array, state: dict) -> Array:
        """M(q; W) at a fixed state, without writing (Titans' retrieval M*(q), eq. 15).

        q [B,T,H,dk] (already through :meth:`features`); returns [B,T,H,dv] fp32."""
        R = read_weights(self.spec, state["A"], state["anchor"])
        qh = jnp.moveaxis(q.astype(jnp.float32), 2, 1)  # [B,H,T,dk]
        y = self.spec.arch.apply(qh, lambda n, z: jnp.einsum("bhtd,bhde->bhte", z, R[n]))
        return jnp.moveaxis(y, 1, 2)

    def init_state(self, batch_size: int) -> dict:
        return init_state(
            self.spec,
            self._params(),
            batch_size,
            momentum=self.preset.algorithm == "momentum",
            dk=self.dk,
            dv=self.dv,
        )


def preset_with(name: str, overrides: dict[str, Any] | None = None) -> GradientPreset:
    """The named preset with some of its choices replaced (unknown names are an error)."""
    base = PRESETS[name]
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"gradient memory: unknown choice(s) {bad}; valid: {OVERRIDABLE}")
    return dataclasses.replace(base, **overrides)


def _factory(name: str):
    def build(*, gm_overrides: dict[str, Any] | None = None, **kw: Any) -> GradientMemory:
        return GradientMemory(preset_with(name, gm_overrides), **kw)

    return build


for _name in PRESETS:
    register_memory(_name, _factory(_name))

__all__ = ["OVERRIDABLE", "PRESETS", "GradientMemory", "GradientPreset", "poly_dim", "preset_with"]
