"""Joint network: `logits = out(tanh(enc_proj + pred_proj))`.

The two projections are separate methods so callers (the fused loss, decoders) project the
encoder output [B,T,D] and the predictor output [B,U+1,P] once and broadcast-add them in chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.models.config import TransducerConfig, dense


class Joint(nnx.Module):
    """Encoder projection (D -> J, with bias), predictor projection (P -> J), tanh, J -> vocab."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        self.enc_proj = dense(cfg.d_model, cfg.joint_dim, ("embed", "joint"), cfg, rngs=rngs)
        self.pred_proj = dense(
            cfg.predictor_dim, cfg.joint_dim, ("embed", "joint"), cfg, rngs=rngs, use_bias=False
        )
        self.out = dense(cfg.joint_dim, cfg.vocab_size, ("joint", "vocab"), cfg, rngs=rngs)

    def project_encoder(self, enc: jax.Array) -> jax.Array:
        """[..., D] -> [..., J]."""
        return self.enc_proj(enc)

    def project_predictor(self, pred: jax.Array) -> jax.Array:
        """[..., P] -> [..., J]."""
        return self.pred_proj(pred)

    def __call__(self, enc_proj: jax.Array, pred_proj: jax.Array) -> jax.Array:
        """Broadcast-add the projections ([..., J] each), tanh, output layer -> float32 [..., V]."""
        return self.out(jnp.tanh(enc_proj + pred_proj)).astype(jnp.float32)
