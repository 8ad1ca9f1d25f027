"""Streaming recognition: audio chunks in, new labels out, one jitted step of static shapes.

`StreamingRecognizer(model, feature_cfg)` holds an `nnx.split` copy of the model (eval mode) and
two jitted functions, `step` and `finalize`. The state carries, for a batch of `B` synchronous
streams (they share chunk boundaries, as in a server batching live streams):

- `audio_context [B, n_fft - hop]`: the audio before the chunk, for the causal log-mel framing
  (`jaxspeech.features.log_mel_chunk`; the first chunk sees zeros, exactly the offline left pad);
- `pending [B, C, F]`, `num_pending`: feature frames not yet encoded (`C = chunk_size * factor`,
  the model's `feat_chunk_size`); audio chunks need not be a multiple of the encoder chunk;
- `encoder`: the model's streaming encoder state (`model.encode_init_state`);
- `pred_state`, `pred_out`: the predictor after the labels emitted so far (`pred_out` projected);
- `score [B]`: the greedy path's log-probability so far.

`step` frames the new audio, appends the features to `pending`, runs `model.encode_step` (with
skipping execution of gated-off components, unless `skip=False`) on every
complete encoder chunk (at most `ceil(S / hop / C)`, skipped with `lax.cond` when not complete) and
greedy search (`greedy_search_with_state`) on the new encoder frames. `finalize` encodes the
remaining partial chunk, masked exactly as `model.encode` masks padding (`feat_chunk_lengths`).
For a chunk-causal encoder (`lookahead_chunks=0`) the labels of all steps plus `finalize` equal
offline `transducer_greedy` on `log_mel` of the whole utterance (tests/test_streaming.py).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxspeech.decoding.greedy import greedy_search_with_state, model_callables, start_predictor
from jaxspeech.features import FeatureConfig, log_mel_chunk


class StreamingState(NamedTuple):
    audio_context: jax.Array  # [B, n_fft - hop]
    pending: jax.Array  # [B, C, F] features not yet encoded
    num_pending: jax.Array  # int32 scalar, < C
    encoder: Any  # model.encode_init_state(B)
    pred_state: Any
    pred_out: jax.Array  # [B, J]
    score: jax.Array  # [B]


class StreamingRecognizer:
    """Chunk-by-chunk greedy transducer recognition (module docstring).

    Args:
      model: a `jaxspeech.models.TransformerTransducer` with `lookahead_chunks=0` (a copy of its
        parameters is taken now; rebuild the recognizer after updating the model).
      feature_cfg: the log-mel front end the model was trained with.
      max_symbols_per_frame, blank_id: greedy search options.
      skip: for a gated encoder (arbitrators or static pruning), gated-off components are not
        executed (`jaxspeech.models.encoder`, skipping execution: the same outputs, less work);
        False runs the masked computation. No effect on an ungated encoder.

    Usage::

      rec = StreamingRecognizer(model, FeatureConfig())
      state = rec.init(batch)
      for chunk in chunks:                     # each [B, S], S a multiple of hop_length
        state, tokens, num = rec.step(state, chunk)
      state, tokens, num = rec.finalize(state)

    `tokens [B, K]` holds `num [B]` new labels per stream (then zeros). A last chunk shorter than
    `S` is zero-padded and passed with `num_samples=` its true length; then call `finalize`.
    """

    def __init__(
        self,
        model,
        feature_cfg: FeatureConfig | None = None,
        *,
        max_symbols_per_frame: int = 3,
        blank_id: int = 0,
        skip: bool = True,
    ):
        if model.cfg.lookahead_chunks:
            raise ValueError("streaming needs a chunk-causal encoder (lookahead_chunks=0)")
        self.feature_cfg = feature_cfg = feature_cfg or FeatureConfig(n_mels=model.cfg.num_mels)
        if feature_cfg.n_mels != model.cfg.num_mels:
            raise ValueError(f"feature n_mels {feature_cfg.n_mels} != model {model.cfg.num_mels}")
        self.feat_chunk = model.feat_chunk_size
        self.skip = skip
        self.graphdef, self.params = nnx.split(model)
        opts = dict(max_symbols_per_frame=max_symbols_per_frame, blank_id=blank_id)
        self._init = jax.jit(
            functools.partial(self._init_impl, blank_id=blank_id), static_argnums=1
        )
        self._step = jax.jit(functools.partial(self._step_impl, **opts))
        self._finalize = jax.jit(functools.partial(self._finalize_impl, **opts))

    def _model(self, params):
        model = nnx.merge(self.graphdef, params)
        model.eval()
        return model

    # Public API (jitted) ----------------------------------------------------------------------

    def init(self, batch: int) -> StreamingState:
        """The state before the first audio sample of `batch` streams."""
        return self._init(self.params, batch)

    def step(self, state: StreamingState, audio_chunk: jax.Array, num_samples=None):
        """Consume `audio_chunk [B, S]` (S a multiple of hop; `num_samples` valid, default S).

        Returns `(state, new_tokens [B, K], num_new [B])`, `K = ceil(S / hop / C) * chunk_size *
        max_symbols_per_frame` (enough for any output). One compilation per chunk shape.
        """
        if audio_chunk.shape[1] % self.feature_cfg.hop_length:
            raise ValueError(f"chunk of {audio_chunk.shape[1]} samples is not a multiple of hop")
        n = audio_chunk.shape[1] if num_samples is None else num_samples
        return self._step(self.params, state, audio_chunk, jnp.asarray(n, jnp.int32))

    def finalize(self, state: StreamingState):
        """Encode and decode the buffered features: `(state, new_tokens [B, K'], num_new [B])`."""
        return self._finalize(self.params, state)

    def transcribe(self, audio, chunk_samples: int, num_samples: int | None = None):
        """Stream `audio [B, N]` in chunks of `chunk_samples`: a list of label lists and scores.

        A convenience driver (the loop is over chunks, on the host); `num_samples` (default N)
        valid samples, shared by the streams.
        """
        audio = np.asarray(audio, np.float32)
        n = audio.shape[1] if num_samples is None else int(num_samples)
        out = [[] for _ in range(audio.shape[0])]
        state = self.init(audio.shape[0])
        for start in range(0, n, chunk_samples):
            valid = min(chunk_samples, n - start)
            chunk = np.zeros((audio.shape[0], chunk_samples), np.float32)
            chunk[:, :valid] = audio[:, start : start + valid]
            state, toks, num = self.step(state, chunk, valid)
            _extend(out, toks, num)
        state, toks, num = self.finalize(state)
        _extend(out, toks, num)
        return out, np.asarray(state.score)

    # Implementations ------------------------------------------------------------------------------

    def _init_impl(self, params, batch: int, *, blank_id: int) -> StreamingState:
        model = self._model(params)
        pred_step, _ = model_callables(model)
        pred_state, pred_out = start_predictor(
            model.predictor.init_state(batch), pred_step, batch, blank_id
        )
        cfg = self.feature_cfg
        return StreamingState(
            audio_context=jnp.zeros((batch, cfg.left_context), jnp.float32),
            pending=jnp.zeros((batch, self.feat_chunk, cfg.n_mels), jnp.float32),
            num_pending=jnp.zeros((), jnp.int32),
            encoder=model.encode_init_state(batch),
            pred_state=pred_state,
            pred_out=pred_out,
            score=jnp.zeros((batch,), jnp.float32),
        )

    def _decode(self, model, state: StreamingState, enc, num_frames, **opts):
        """Greedy search on new encoder frames enc [B, T, D] (the first `num_frames` valid)."""
        pred_step, joint_fn = model_callables(model)
        batch = enc.shape[0]
        res = greedy_search_with_state(
            model.joint.project_encoder(enc),
            jnp.full((batch,), num_frames, jnp.int32),
            state.pred_state,
            state.pred_out,
            pred_step,
            joint_fn,
            **opts,
        )
        state = state._replace(
            pred_state=res.pred_state, pred_out=res.pred_out, score=state.score + res.scores
        )
        return state, res.tokens, res.lengths

    def _step_impl(self, params, state: StreamingState, audio_chunk, num_samples, **opts):
        model = self._model(params)
        c = self.feat_chunk
        feats, context = log_mel_chunk(state.audio_context, audio_chunk, self.feature_cfg)
        batch, n_new, n_mels = feats.shape
        max_chunks = (c - 1 + n_new) // c
        buf = jnp.zeros((batch, (max_chunks + 1) * c + n_new, n_mels), jnp.float32)
        buf = lax.dynamic_update_slice(buf, state.pending, (0, 0, 0))
        buf = lax.dynamic_update_slice(buf, feats, (0, state.num_pending, 0))
        total = state.num_pending + jnp.minimum(num_samples // self.feature_cfg.hop_length, n_new)
        num_chunks = total // c

        def encode_chunk(enc_state, j):
            chunk = lax.dynamic_slice_in_dim(buf, j * c, c, axis=1)

            def run(s):
                return model.encode_step(s, chunk, skip=self.skip)

            def skip(s):
                out = jax.eval_shape(run, s)[1]
                return s, jnp.zeros(out.shape, out.dtype)

            return lax.cond(j < num_chunks, run, skip, enc_state)

        enc_state, enc = lax.scan(encode_chunk, state.encoder, jnp.arange(max_chunks))
        enc = jnp.swapaxes(enc, 0, 1).reshape(batch, -1, enc.shape[-1])  # [B, chunks * size, D]
        state = state._replace(
            audio_context=context,
            pending=lax.dynamic_slice_in_dim(buf, num_chunks * c, c, axis=1),
            num_pending=total - num_chunks * c,
            encoder=enc_state,
        )
        return self._decode(model, state, enc, num_chunks * model.cfg.chunk_size, **opts)

    def _finalize_impl(self, params, state: StreamingState, **opts):
        model = self._model(params)
        batch = state.pending.shape[0]
        lengths = jnp.full((batch,), state.num_pending, jnp.int32)
        enc_state, enc = model.encode_step(state.encoder, state.pending, lengths, skip=self.skip)
        state = state._replace(
            pending=jnp.zeros_like(state.pending),
            num_pending=jnp.zeros((), jnp.int32),
            encoder=enc_state,
        )
        num_frames = lengths[0] // model.cfg.subsampling_factor
        return self._decode(model, state, enc, num_frames, **opts)


def _extend(out: list[list[int]], tokens, num) -> None:
    tokens, num = np.asarray(tokens), np.asarray(num)
    for i, row in enumerate(out):
        row.extend(int(v) for v in tokens[i, : num[i]])
