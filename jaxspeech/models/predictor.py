"""Prediction networks: an LSTM stack and a stateless (last-k labels) predictor.

Both share one interface:
  `__call__(labels [B,U]) -> [B, U+1, P]`: output u is the prediction after the label history
      (blank, y_1, ..., y_u); position 0 is the blank start symbol (token 0).
  `init_state(batch)`, `step(state, tokens [B]) -> (state, out [B,P])`: starting from
      `init_state`, stepping tokens (0, y_1, ..., y_u) reproduces `__call__` outputs 0..u.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.models.config import TransducerConfig, dense, partitioned
from jaxspeech.quant.fake_quant import fake_quant_activations


def _embed(cfg: TransducerConfig, features: int, *, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(
        cfg.vocab_size,
        features,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        embedding_init=partitioned(nnx.initializers.normal(1.0), ("vocab", "embed")),
        rngs=rngs,
    )


def _with_start(labels: jax.Array, width: int = 1) -> jax.Array:
    """Prepend `width` blanks: [B,U] -> [B,U+width]."""
    return jnp.pad(labels, ((0, 0), (width, 0)))


def _forget_gate_bias(key, shape, dtype=jnp.float32):
    """Zeros, with 1 on the forget-gate quarter (gate order i, f, g, o)."""
    del key
    return jnp.zeros(shape, dtype).at[shape[0] // 4 : shape[0] // 2].set(1.0)


def _lstm_cell(carry, gates_in, recurrent_kernel, dtype, act_bits=0):
    c, h = carry
    h_in = fake_quant_activations(h, act_bits) if act_bits else h  # as `recurrent_proj`'s input
    rec = jnp.dot(h_in, recurrent_kernel.astype(dtype), preferred_element_type=jnp.float32)
    i, f, g, o = jnp.split(gates_in.astype(jnp.float32) + rec, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = (jax.nn.sigmoid(o) * jnp.tanh(c)).astype(dtype)
    return (c, h), h


LSTMState = tuple[tuple[jax.Array, jax.Array], ...]  # per layer (c, h), each [B,P]


class LSTMLayer(nnx.Module):
    """One LSTM layer (gate order i, f, g, o; forget-gate bias initialized to 1)."""

    def __init__(self, d_in: int, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        p = cfg.predictor_dim
        self.hidden = p
        self.dtype = cfg.compute_dtype
        self.input_proj = dense(
            d_in, 4 * p, ("embed", "mlp"), cfg, rngs=rngs, bias_init=_forget_gate_bias
        )
        self.recurrent_proj = dense(p, 4 * p, ("embed", "mlp"), cfg, rngs=rngs, use_bias=False)

    def cell(self, carry: tuple[jax.Array, jax.Array], gates_in: jax.Array):
        """One time step: carry (c float32 [B,P], h [B,P]), gates_in = input_proj(x) [B,4P]."""
        kernel, bits = self.recurrent_proj.kernel[...], self.recurrent_proj.act_bits
        return _lstm_cell(carry, gates_in, kernel, self.dtype, bits)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B,T,d_in] -> [B,T,P] from the zero state (input projection vectorized over T).

        The scan closes over the recurrent kernel as an array (not over the module), so the
        layer also works when the module itself is closed over by `jax.jit`.
        """
        gates_in = jnp.swapaxes(self.input_proj(x), 0, 1)  # [T,B,4P]
        kernel, bits = self.recurrent_proj.kernel[...], self.recurrent_proj.act_bits
        _, hs = jax.lax.scan(
            lambda carry, g: _lstm_cell(carry, g, kernel, self.dtype, bits),
            self.init_state(x.shape[0]),
            gates_in,
        )
        return jnp.swapaxes(hs, 0, 1)

    def init_state(self, batch: int) -> tuple[jax.Array, jax.Array]:
        return jnp.zeros((batch, self.hidden), jnp.float32), jnp.zeros(
            (batch, self.hidden), self.dtype
        )


class LSTMPredictor(nnx.Module):
    """Embedding of the previous label, `predictor_layers` LSTM layers, dropout."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        p = cfg.predictor_dim
        self.embed = _embed(cfg, p, rngs=rngs)
        self.layers = nnx.List([LSTMLayer(p, cfg, rngs=rngs) for _ in range(cfg.predictor_layers)])
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, labels: jax.Array) -> jax.Array:
        x = self.dropout(self.embed(_with_start(labels)))
        for layer in self.layers:
            x = layer(x)
        return self.dropout(x)

    def init_state(self, batch: int) -> LSTMState:
        return tuple(layer.init_state(batch) for layer in self.layers)

    def step(self, state: LSTMState, tokens: jax.Array) -> tuple[LSTMState, jax.Array]:
        x = self.dropout(self.embed(tokens))
        new_state = []
        for layer, carry in zip(self.layers, state, strict=True):
            carry, x = layer.cell(carry, layer.input_proj(x))
            new_state.append(carry)
        return tuple(new_state), self.dropout(x)


class StatelessPredictor(nnx.Module):
    """Embeddings of the last `stateless_context` labels (blank-padded), concatenated, projected.

    The state is the label window itself, int32 [B, k] (oldest first).
    """

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        p, k = cfg.predictor_dim, cfg.stateless_context
        self.context = k
        self.embed = _embed(cfg, p, rngs=rngs)
        self.proj = dense(k * p, p, ("mlp", "embed"), cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def _output(self, window: jax.Array) -> jax.Array:
        """window int [..., k] -> [..., P]."""
        e = self.dropout(self.embed(window))
        return self.dropout(self.proj(e.reshape(*window.shape[:-1], -1)))

    def __call__(self, labels: jax.Array) -> jax.Array:
        k, u1 = self.context, labels.shape[1] + 1
        full = _with_start(labels, k)  # [B, U+k]; output u reads full[u : u+k]
        windows = jnp.stack([full[:, i : i + u1] for i in range(k)], axis=-1)  # [B, U+1, k]
        return self._output(windows)

    def init_state(self, batch: int) -> jax.Array:
        return jnp.zeros((batch, self.context), jnp.int32)

    def step(self, state: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        state = jnp.concatenate([state[:, 1:], tokens[:, None].astype(state.dtype)], axis=1)
        return state, self._output(state)


def make_predictor(cfg: TransducerConfig, *, rngs: nnx.Rngs) -> LSTMPredictor | StatelessPredictor:
    if cfg.predictor == "lstm":
        return LSTMPredictor(cfg, rngs=rngs)
    return StatelessPredictor(cfg, rngs=rngs)
