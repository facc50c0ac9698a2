"""The language model: token embedding, a stack of pre-norm blocks, output head.

    h = Embed(tokens) (+ PosEmbed(position) with model.abs_pos_emb)
    for each layer l:  h = h + Mixer_l(Norm(h));  h = h + FFN(Norm(h))
    logits = Head(Norm(h))               (tied: Embed^T)

Norm is RMSNorm (default) or LayerNorm (``model.norm_type=layer``); FFN is SwiGLU (default) or
a GELU MLP (``model.mlp_type=gelu``, GAM's pre-LN block).

``Mixer_l`` is a :class:`MemoryLayer` or softmax :class:`Attention`, from the config's layer
pattern (``MMMA`` = three memory layers then one attention layer, repeated), so pure models,
24:1 ... 3:1 hybrids and a pure Transformer are configs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.config import ModelConfig, gm_overrides, layer_kinds
from memzoo.layers.attention import Attention
from memzoo.layers.memory_layer import MemoryLayer
from memzoo.layers.mlp import SwiGLU
from memzoo.layers.norms import RMSNorm
from memzoo.layers.partitioning import constrain, dense, meta
from memzoo.layers.rope import segment_positions
from memzoo.memories.gradient import PRESETS as GRADIENT_PRESETS

Array = jax.Array


def mlp_hidden(cfg: ModelConfig) -> int:
    """SwiGLU width: mlp_ratio * d_model rounded up to a multiple of 32."""
    return int(math.ceil(cfg.mlp_ratio * cfg.d_model / 32) * 32)


class GeluMLP(nnx.Module):
    """Transformer FFN ``y = W2 GELU(W1 x + b1) + b2`` (tanh-approximate GELU)."""

    def __init__(self, d_model: int, hidden_dim: int, *, dtype, param_dtype, rngs):
        self.dtype = dtype
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.up = nnx.Linear(d_model, hidden_dim, **kw, **dense("embed", "mlp"))
        self.down = nnx.Linear(hidden_dim, d_model, **kw, **dense("mlp", "embed"))

    def __call__(self, x: Array) -> Array:
        return self.down(jax.nn.gelu(self.up(x.astype(self.dtype))))


def build_norm(cfg: ModelConfig, *, dtype, param_dtype, rngs):
    if cfg.norm_type == "layer":
        return nnx.LayerNorm(
            cfg.d_model,
            epsilon=cfg.norm_eps,
            dtype=dtype,
            param_dtype=param_dtype,
            scale_metadata=meta("norm"),
            bias_metadata=meta("norm"),
            rngs=rngs,
        )
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def mixer_options(kind: str, cfg: ModelConfig) -> dict[str, Any]:
    """Config keys only some memories take."""
    if kind == "mom":
        return dict(
            num_memories=cfg.mom_num_memories,
            top_k=cfg.mom_top_k,
            shared_memory=cfg.mom_shared_memory,
            aux_loss_scale=cfg.mom_aux_loss_scale,
        )
    if kind == "gam":
        return dict(
            num_slots=cfg.gam_num_slots, local_kernel=cfg.gam_local_kernel, scaled=cfg.gam_scaled
        )
    if kind in GRADIENT_PRESETS:
        return dict(gm_overrides=gm_overrides(cfg))
    return {}


def memory_layer_options(cfg: ModelConfig, layer_idx: int) -> dict[str, Any]:
    """The config keys of a MemoryLayer and its memory (shared by every mixer that has one)."""
    return dict(
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        expand_v=cfg.expand_v,
        use_short_conv=cfg.use_short_conv,
        conv_size=cfg.conv_size,
        use_output_gate=cfg.use_output_gate,
        norm_eps=cfg.norm_eps,
        init_std=cfg.init_std,
        layer_idx=layer_idx,
        n_layers=cfg.n_layers,
        chunk_size=cfg.chunk_size,
        impl=cfg.impl,
        kernel_options={"block_v": cfg.kernel_block_v, "interpret": cfg.kernel_interpret},
        gate_low_rank=cfg.gate_low_rank,
    )


def build_mixer(kind: str, cfg: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs):
    from memzoo.layers.titans import TITANS_KINDS, build_titans

    if kind in TITANS_KINDS:
        return build_titans(kind, cfg, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kind == "attention":
        return Attention(
            cfg.d_model,
            cfg.attn_heads,
            cfg.attn_kv_heads or cfg.attn_heads,
            window=cfg.attn_window,
            rope_theta=cfg.rope_theta,
            rope_scale=cfg.rope_scale,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    return MemoryLayer(
        kind,
        d_model=cfg.d_model,
        **memory_layer_options(cfg, layer_idx),
        hgrn_lower_bound=cfg.hgrn_lower_bound,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **mixer_options(kind, cfg),
    )


class Block(nnx.Module):
    def __init__(self, kind: str, cfg: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.kind = kind
        self.norm1 = build_norm(cfg, **kw)
        self.mixer = build_mixer(kind, cfg, layer_idx, **kw)
        self.norm2 = build_norm(cfg, **kw)
        if cfg.mlp_type == "gelu":
            self.mlp = GeluMLP(cfg.d_model, mlp_hidden(cfg), **kw)
        else:
            self.mlp = SwiGLU(cfg.d_model, mlp_hidden(cfg), **kw)

    def __call__(self, h: Array, *, segment_ids=None, cache=None) -> tuple[Array, Any]:
        y, cache = self.mixer(self.norm1(h), segment_ids=segment_ids, cache=cache)
        h = h + y.astype(h.dtype)
        h = h + self.mlp(self.norm2(h)).astype(h.dtype)
        return h, cache


class LM(nnx.Module):
    """Decoder-only LM over any mix of memories and attention layers."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the LM")
        self.label = f"{cfg.name}:{cfg.size}"
        self.dtype = dtype
        self.kinds = tuple(layer_kinds(cfg))
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nnx.initializers.normal(cfg.init_std),
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_metadata=meta("vocab", "embed"),
            rngs=rngs,
        )
        self.blocks = nnx.List(
            [
                Block(kind, cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for i, kind in enumerate(self.kinds)
            ]
        )
        self.final_norm = build_norm(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.abs_pos_emb = cfg.abs_pos_emb
        self.remat = cfg.remat
        if cfg.abs_pos_emb:
            self.max_seq_len = cfg.max_seq_len
            self.pos_embed = nnx.Embed(
                cfg.max_seq_len,
                cfg.d_model,
                embedding_init=nnx.initializers.normal(cfg.init_std),
                dtype=dtype,
                param_dtype=param_dtype,
                embedding_metadata=meta("position", "embed"),
                rngs=rngs,
            )
        if not cfg.tie_embeddings:
            self.head = nnx.Linear(
                cfg.d_model,
                cfg.vocab_size,
                use_bias=False,
                kernel_init=nnx.initializers.normal(cfg.init_std),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
                **dense("embed", "vocab"),
            )
        else:
            self.head = None

    def init_cache(self, batch_size: int, max_len: int) -> list:
        """Per-layer caches: KV buffers for attention, conv tail + state for memories; with
        absolute position embeddings a last entry ``{"pos": int32 []}`` (tokens seen)."""
        caches = [b.mixer.init_cache(batch_size, max_len, self.dtype) for b in self.blocks]
        if self.abs_pos_emb:
            caches.append({"pos": jnp.zeros((), jnp.int32)})
        return caches

    def __call__(
        self,
        tokens: Array,
        *,
        segment_ids: Array | None = None,
        cache: list | None = None,
    ) -> tuple[Array, list | None]:
        """tokens int [B, T] -> (logits fp32 [B, T, V], updated cache or None)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        h = self.embed(tokens)
        if self.abs_pos_emb:
            T = tokens.shape[1]
            if segment_ids is not None:
                pos = segment_positions(segment_ids)  # restarts at every document
            else:
                start = jnp.zeros((), jnp.int32) if cache is None else cache[-1]["pos"]
                pos = (start + jnp.arange(T, dtype=jnp.int32))[None, :]
            # positions past max_seq_len clip to the last embedding (documented limit)
            h = h + self.pos_embed(jnp.minimum(pos, self.max_seq_len - 1)).astype(h.dtype)
        new_cache = None if cache is None else []
        # block boundaries: rows over the batch axes (identity outside activation_sharding)
        h = constrain(h, "batch", "length", None)
        for i, block in enumerate(self.blocks):
            if self.remat and cache is None:  # keep block inputs only; recompute in backward
                h, c = nnx.remat(_run_block)(block, h, segment_ids)
            else:
                h, c = block(h, segment_ids=segment_ids, cache=None if cache is None else cache[i])
            h = constrain(h, "batch", "length", None)
            if new_cache is not None:
                new_cache.append(c)
        if new_cache is not None and self.abs_pos_emb:
            new_cache.append({"pos": cache[-1]["pos"] + tokens.shape[1]})
        h = self.final_norm(h)
        logits = self.embed.attend(h) if self.head is None else self.head(h)
        return logits.astype(jnp.float32), new_cache


def _run_block(block: nnx.Module, h: Array, segment_ids: Array | None) -> tuple[Array, Any]:
    return block(h, segment_ids=segment_ids, cache=None)


def set_rope_scale(model: nnx.Module, scale: float) -> int:
    """Sets the RoPE position multiplier (``model.rope_scale``) of every attention module in
    ``model``, in place; returns how many there are. A changed scale is part of the graph
    definition, so jitted functions of ``nnx.split(model)`` recompile for it."""
    if not scale > 0:
        raise ValueError(f"rope scale must be > 0, got {scale}")
    n = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Attention):
            module.rope_scale = float(scale)
            n += 1
    return n


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def build_model(cfg: ModelConfig, *, seed: int = 0, precision: str = "fp32") -> LM:
    """Build the LM for a model config; ``precision="bf16"`` computes in bf16 with fp32 params."""
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    return LM(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(params=seed))


def describe(model: LM) -> str:
    n = count_params(model)
    emb = model.embed.embedding[...].size
    pattern = "".join("A" if k == "attention" else "M" for k in model.kinds)
    return (
        f"model {model.label}  layers {pattern}  "
        f"params {n / 1e6:.2f}M ({(n - emb) / 1e6:.2f}M non-embedding)"
    )
