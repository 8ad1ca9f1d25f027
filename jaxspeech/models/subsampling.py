"""Causal convolutional subsampling: log-mel frames [B, T, F] -> encoder inputs [B, T // factor, D].

`factor = 2**n` is realized by n Conv2D layers (kernel 3x3, stride 2 in time and frequency, ReLU)
followed by a linear projection of (channels x remaining mel bins) to `d_model`.

Causality: every layer pads time on the left only (one frame), so its output frame t reads its
input frames 2t-1, 2t, 2t+1 and has `T_in // 2` output frames. Composed over n layers, encoder
frame t depends only on feature frames < factor * (t + 1), and
`enc_lengths = feat_lengths // factor`.

Streaming: each layer carries the last input frame of the previous chunk (zeros at the start,
exactly the offline left padding), so a chunk of `chunk_size * factor` feature frames yields
`chunk_size` encoder frames equal to the offline ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.models.config import Conv, TransducerConfig, dense, dense_init, zeros_init

SubsamplingState = tuple[jax.Array, ...]  # per conv layer: last input frame [B, 1, F_l, C_l]


def _freq_sizes(num_mels: int, num_layers: int) -> list[int]:
    sizes = [num_mels]
    for _ in range(num_layers):
        sizes.append((sizes[-1] + 1) // 2)  # kernel 3, stride 2, padding (1, 1)
    return sizes


class ConvSubsampling(nnx.Module):
    """Causal stride-2 Conv2D stack plus output projection; see the module docstring."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        self.num_layers = cfg.num_subsampling_layers
        self.factor = cfg.subsampling_factor
        self.dtype = cfg.compute_dtype
        self.freq_sizes = _freq_sizes(cfg.num_mels, self.num_layers)
        channels = [1] + [cfg.subsampling_channels] * self.num_layers
        self.channels = channels
        self.convs = nnx.List(
            [
                Conv(
                    channels[i],
                    channels[i + 1],
                    act_bits=cfg.activation_bits,
                    kernel_size=(3, 3),
                    strides=(2, 2),
                    padding=((0, 0), (1, 1)),  # time padding is done by hand (causal / streamed)
                    dtype=cfg.compute_dtype,
                    param_dtype=cfg.params_dtype,
                    kernel_init=dense_init((None, None, "conv_in", "conv_out")),
                    bias_init=zeros_init(("conv_out",)),
                    rngs=rngs,
                )
                for i in range(self.num_layers)
            ]
        )
        self.proj = dense(
            channels[-1] * self.freq_sizes[-1], cfg.d_model, (None, "embed"), cfg, rngs=rngs
        )
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def _layers(self, x: jax.Array, left: SubsamplingState) -> tuple[jax.Array, SubsamplingState]:
        """x [B, T, F, 1]; `left[i]` is the frame that precedes layer i's input."""
        new_left = []
        for conv, prev in zip(self.convs, left, strict=True):
            new_left.append(x[:, -1:])
            x = jax.nn.relu(conv(jnp.concatenate([prev.astype(x.dtype), x], axis=1)))
        return x, tuple(new_left)

    def _project(self, x: jax.Array) -> jax.Array:
        b, t, f, c = x.shape
        return self.dropout(self.proj(x.reshape(b, t, f * c)))  # (not -1: t may be 0)

    def __call__(self, feats: jax.Array, feat_lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """feats [B, T, F] -> (x [B, T // factor, D], lengths [B] = feat_lengths // factor).

        T is cut to a multiple of `factor` first (the trailing frames cannot form an output frame).
        """
        b, t, _ = feats.shape
        t = t - t % self.factor
        x = feats[:, :t, :, None].astype(self.dtype)
        x, _ = self._layers(x, self.init_state(b))
        return self._project(x), feat_lengths // self.factor

    def init_state(self, batch: int) -> SubsamplingState:
        return tuple(
            jnp.zeros((batch, 1, f, c), self.dtype)
            for f, c in zip(self.freq_sizes[:-1], self.channels[:-1], strict=True)
        )

    def step(
        self, state: SubsamplingState, feat_chunk: jax.Array
    ) -> tuple[SubsamplingState, jax.Array]:
        """feat_chunk [B, n * factor, F] -> (state, x [B, n, D]), equal to the offline frames."""
        if feat_chunk.shape[1] % self.factor:
            raise ValueError(
                f"chunk length {feat_chunk.shape[1]} is not a multiple of {self.factor}"
            )
        x, state = self._layers(feat_chunk[..., None].astype(self.dtype), state)
        return state, self._project(x)
