"""`TransformerTransducer`: feature normalization, subsampling, streaming encoder, predictor, joint.

Offline: `encode`, `predict`, `joint.*`, `loss` (fused RNN-T loss, never materializing the
[B,T,U+1,V] logits). Streaming: `encode_init_state(batch)`, `encode_step(state, feat_chunk)` with
static shapes (jittable); for lookahead_chunks = 0 the concatenated step outputs equal `encode`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxspeech.losses import rnnt_loss_fused
from jaxspeech.losses.distill import lattice_kd
from jaxspeech.losses.rnnt import lattice_nll
from jaxspeech.losses.rnnt_fused import lattice_logprobs
from jaxspeech.models import flops
from jaxspeech.models.attention import length_mask
from jaxspeech.models.config import TransducerConfig, dense
from jaxspeech.models.encoder import Encoder, GateTrace, LayerStreamState
from jaxspeech.models.joint import Joint
from jaxspeech.models.predictor import make_predictor
from jaxspeech.models.subsampling import ConvSubsampling, SubsamplingState


class FeatureStat(nnx.Variable):
    """Non-trainable feature statistic (not an `nnx.Param`, so optimizers skip it)."""


class FeatureNorm(nnx.Module):
    """Global mean/variance normalization `(x - mean) / std` with `mean`, `std` of shape [F].

    Defaults 0 / 1 (identity); the trainer sets them from training-data statistics, e.g.
    `model.feature_norm.mean[...] = mean`. They are saved with the model state.
    """

    def __init__(self, num_features: int):
        self.mean = FeatureStat(jnp.zeros((num_features,), jnp.float32))
        self.std = FeatureStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, feats: jax.Array) -> jax.Array:
        return (feats - self.mean[...]) / self.std[...]


class StreamState(NamedTuple):
    """Streaming encoder state (a pytree of fixed-shape arrays)."""

    subsampling: SubsamplingState  # per conv layer: previous input frame
    encoder: tuple[LayerStreamState, ...]  # per layer: KV cache (k, v, valid), pending [B,L*C,D]
    offset: jax.Array  # int32 scalar: encoder frames fed so far
    end: jax.Array  # int32 [B]: end of the valid frames once a partial chunk was fed, else max


class TransformerTransducer(nnx.Module):
    """Streaming Transformer transducer (see ARCHITECTURE.md, `jaxspeech.models`)."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.feature_norm = FeatureNorm(cfg.num_mels)
        self.subsampling = ConvSubsampling(cfg, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.predictor = make_predictor(cfg, rngs=rngs)
        self.joint = Joint(cfg, rngs=rngs)
        if cfg.ctc_weight > 0:  # auxiliary CTC head (training only; decoding never reads it)
            self.ctc_head = dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs)

    def _normalize(self, feats: jax.Array, feat_lengths: jax.Array) -> jax.Array:
        x = self.feature_norm(feats.astype(jnp.float32))
        return jnp.where(length_mask(feat_lengths, feats.shape[1])[..., None], x, 0.0)

    def encode(
        self,
        feats: jax.Array,
        feat_lengths: jax.Array,
        *,
        attn_gates: jax.Array | None = None,
        ffn_gates: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """feats [B,T,F], feat_lengths [B] -> (enc [B,T//4,D], enc_lengths [B] = feat_lengths//4).

        Encoder frames beyond enc_lengths are zero. Gates: [num_layers, B, T//4] or None (then
        the arbitrator's, if the model has one).
        """
        enc, enc_lengths, _ = self.encode_with_trace(
            feats, feat_lengths, attn_gates=attn_gates, ffn_gates=ffn_gates
        )
        return enc, enc_lengths

    def encode_with_trace(
        self,
        feats: jax.Array,
        feat_lengths: jax.Array,
        *,
        attn_gates: jax.Array | None = None,
        ffn_gates: jax.Array | None = None,
        capacity: int | None = None,
    ) -> tuple[jax.Array, jax.Array, GateTrace]:
        """`encode`, plus the gates used (`GateTrace`); `capacity`: gathered execution
        (`jaxspeech.models.encoder`), frames per utterance per component."""
        x, enc_lengths = self.subsampling(self._normalize(feats, feat_lengths), feat_lengths)
        enc, trace = self._blocks(
            x, enc_lengths, attn_gates=attn_gates, ffn_gates=ffn_gates, capacity=capacity
        )
        return enc, enc_lengths, trace

    def _blocks(self, x, enc_lengths, **gating) -> tuple[jax.Array, GateTrace]:
        """The Transformer stack on subsampled frames, frames beyond enc_lengths zeroed."""
        enc, trace = self.encoder.forward(x, enc_lengths, **gating)
        valid = length_mask(enc_lengths, enc.shape[1])[..., None]
        return jnp.where(valid, enc, jnp.zeros_like(enc)), trace

    def predict(self, labels: jax.Array) -> jax.Array:
        """labels int [B,U] -> [B,U+1,P]; position 0 is the blank start symbol."""
        return self.predictor(labels)

    def loss(
        self,
        feats: jax.Array,
        feat_lengths: jax.Array,
        labels: jax.Array,
        label_lengths: jax.Array,
    ) -> jax.Array:
        """Per-example training loss [B] (nats): the RNN-T negative log-likelihood (fused joint +
        loss), plus `ctc_weight * ctc` and `compute_weight * compute` (see `loss_terms`)."""
        return self.combine_loss_terms(self.loss_terms(feats, feat_lengths, labels, label_lengths))

    def combine_loss_terms(self, terms: dict[str, jax.Array]) -> jax.Array:
        """rnnt + ctc_weight * ctc + compute_weight * compute (or * compute_excess, with a compute
        budget) + the self-distillation terms (the terms present)."""
        loss = terms["rnnt"]
        if "ctc" in terms:
            loss = loss + self.cfg.ctc_weight * terms["ctc"]
        if "compute_excess" in terms:  # a compute budget (`cfg.compute_target`)
            loss = loss + self.cfg.compute_weight * terms["compute_excess"]
        elif "compute" in terms:
            loss = loss + self.cfg.compute_weight * terms["compute"]
        if "rnnt_full" in terms:
            full = terms["rnnt_full"]
            if "ctc_full" in terms:
                full = full + self.cfg.ctc_weight * terms["ctc_full"]
            loss = loss + self.cfg.full_pass_weight * full
        if "distill" in terms:
            loss = loss + self.cfg.distill_weight * terms["distill"]
        return loss

    def lattice(
        self,
        feats: jax.Array,
        feat_lengths: jax.Array,
        labels: jax.Array,
        label_lengths: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The output lattice's blank `[B,T//4,U+1]`, next-label `[B,T//4,U]` and rest
        `[B,T//4,U+1]` log-probs (`rnnt_fused.lattice_logprobs`): what a teacher gives lattice
        distillation."""
        enc, enc_lengths = self.encode(feats, feat_lengths)
        enc_proj = self.joint.project_encoder(enc)
        pred_proj = self.joint.project_predictor(self.predict(labels))
        return lattice_logprobs(
            enc_proj,
            pred_proj,
            self._joint_fn(),
            labels,
            enc_lengths,
            label_lengths,
            blank_id=0,
            with_rest=True,
        )

    def _joint_fn(self):
        """The joint as a function of (enc, pred), its parameters closed over (for the fused
        loss's `lax.map`)."""
        graphdef, joint_state = nnx.split(self.joint)

        def joint_fn(e: jax.Array, p: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, joint_state)(e, p)

        return joint_fn

    def loss_terms(
        self,
        feats: jax.Array,
        feat_lengths: jax.Array,
        labels: jax.Array,
        label_lengths: jax.Array,
        teacher: tuple[jax.Array, jax.Array, jax.Array] | None = None,
        compute_target: jax.Array | float | None = None,
    ) -> dict[str, jax.Array]:
        """Per-example loss terms [B]: `rnnt` (nats, never materializing the [B,T,U+1,V]
        logits); with `teacher` (a trained model's `lattice` on this batch), `teacher_kd`: the
        lattice distillation loss towards it (`losses.distill.lattice_kd`; weighted by the
        trainer, see `train.step`); with `cfg.ctc_weight` > 0, `ctc`: the CTC negative
        log-likelihood (nats, `optax.ctc_loss`, blank 0) of a linear head on the encoder output,
        an auxiliary target that makes the encoder frame-discriminative early in training; with
        arbitrators, `compute`: the
        executed gated-encoder FLOPs under the (relaxed) gates as a fraction of the ungated
        encoder's (`flops.compute_fraction`; differentiable in the gates); with a compute budget
        (`cfg.compute_target`), also `compute_excess` (`flops.budget_excess`), which then takes
        the compute term's place in the loss; `compute_target` (a scalar, possibly traced: an
        annealed budget, `arbitrator.budget_anneal`) replaces the configured budget's value.

        In-place self-distillation (`full_pass_weight` / `distill_weight` > 0, a gated encoder):
        the same batch also runs through the ungated encoder (every component on every frame,
        the same weights), giving `rnnt_full` (and `ctc_full`): that pass's task loss, which keeps
        the shared weights good for the whole encoder; and `distill`: sum over valid frames of
        KL(p_full || p_gated) between the CTC head's posteriors of the two passes, the teacher
        held fixed (stop-gradient), so the gated encoder learns to reproduce the whole encoder's
        frame decisions with the components it keeps. The predictor is shared by both passes.
        """
        # Subsampled once: an ungated pass (self-distillation) shares the front end.
        x, enc_lengths = self.subsampling(self._normalize(feats, feat_lengths), feat_lengths)
        enc, trace = self._blocks(x, enc_lengths)
        enc_proj = self.joint.project_encoder(enc)
        pred_proj = self.joint.project_predictor(self.predict(labels))
        joint_fn = self._joint_fn()
        lattice = lattice_logprobs(
            enc_proj,
            pred_proj,
            joint_fn,
            labels,
            enc_lengths,
            label_lengths,
            blank_id=0,
            with_rest=teacher is not None,
        )
        lengths = (enc_lengths.astype(jnp.int32), label_lengths.astype(jnp.int32))
        terms = {"rnnt": lattice_nll(*lattice[:2], *lengths)}
        if teacher is not None:
            terms["teacher_kd"] = lattice_kd(jax.lax.stop_gradient(teacher), lattice, *lengths)
        if self.cfg.ctc_weight > 0:
            terms["ctc"] = self.ctc_loss(enc, enc_lengths, labels, label_lengths)
        if self.encoder.arbitrator is not None:
            terms["compute"] = flops.compute_fraction(self.cfg, enc_lengths, trace.attn, trace.ffn)
            if self.cfg.compute_target > 0:
                target = self.cfg.compute_target if compute_target is None else compute_target
                terms["compute_excess"] = flops.budget_excess(
                    terms["compute"], enc_lengths > 0, target
                )
        if self.cfg.full_pass_weight > 0 or self.cfg.distill_weight > 0:
            terms.update(
                self._full_pass_terms(x, enc_lengths, enc, pred_proj, joint_fn, labels,
                                      label_lengths)
            )  # fmt: skip
        return terms

    def _full_pass_terms(self, x, enc_lengths, enc, pred_proj, joint_fn, labels, label_lengths):
        """The ungated pass of in-place self-distillation (see `loss_terms`), from the gated
        pass's subsampled frames `x` and encoder output `enc`."""
        on = jnp.ones((self.cfg.num_layers, *enc.shape[:2]), jnp.float32)
        full, _ = self._blocks(x, enc_lengths, attn_gates=on, ffn_gates=on)
        terms = {}
        if self.cfg.full_pass_weight > 0:
            terms["rnnt_full"] = rnnt_loss_fused(
                self.joint.project_encoder(full), pred_proj, joint_fn, labels, enc_lengths,
                label_lengths, blank_id=0,
            )  # fmt: skip
            if self.cfg.ctc_weight > 0:
                terms["ctc_full"] = self.ctc_loss(full, enc_lengths, labels, label_lengths)
        if self.cfg.distill_weight > 0:
            teacher = jax.nn.log_softmax(
                jax.lax.stop_gradient(self.ctc_head(full).astype(jnp.float32))
            )
            student = jax.nn.log_softmax(self.ctc_head(enc).astype(jnp.float32))
            kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)  # [B, T]
            valid = length_mask(enc_lengths, enc.shape[1])
            terms["distill"] = jnp.sum(jnp.where(valid, kl, 0.0), axis=1)
        return terms

    def ctc_loss(
        self, enc: jax.Array, enc_lengths: jax.Array, labels: jax.Array, label_lengths: jax.Array
    ) -> jax.Array:
        """Per-example CTC negative log-likelihood [B] (nats) of the auxiliary head on `enc`.

        An example whose labels cannot be aligned to its frames (fewer frames than labels plus
        adjacent repeats, which CTC must separate by a blank) contributes 0 rather than the
        huge finite value `optax.ctc_loss` gives it, so fast speech cannot derail training.
        """
        logits = self.ctc_head(enc).astype(jnp.float32)
        valid_labels = length_mask(label_lengths, labels.shape[1])
        frame_pad = (~length_mask(enc_lengths, enc.shape[1])).astype(jnp.float32)
        loss = optax.ctc_loss(logits, frame_pad, labels, (~valid_labels).astype(jnp.float32))
        repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & valid_labels[:, 1:], axis=1)
        return jnp.where(enc_lengths >= label_lengths + repeats, loss, 0.0)

    # Streaming ---------------------------------------------------------------------------------

    @property
    def feat_chunk_size(self) -> int:
        """Feature frames per `encode_step` call (`chunk_size * subsampling_factor`)."""
        return self.cfg.chunk_size * self.cfg.subsampling_factor

    @property
    def stream_delay_chunks(self) -> int:
        """Chunks by which `encode_step` outputs lag its inputs (num_layers * lookahead_chunks)."""
        return self.encoder.delay_chunks

    def encode_init_state(self, batch: int) -> StreamState:
        """Zero state: zero left padding for the convolutions, empty KV caches, offset 0."""
        return StreamState(
            subsampling=self.subsampling.init_state(batch),
            encoder=self.encoder.init_state(batch),
            offset=jnp.zeros((), jnp.int32),
            end=jnp.full((batch,), jnp.iinfo(jnp.int32).max, jnp.int32),
        )

    def encode_step(
        self,
        state: StreamState,
        feat_chunk: jax.Array,
        feat_chunk_lengths: jax.Array | None = None,
        *,
        skip: bool = False,
    ) -> tuple[StreamState, jax.Array]:
        """feat_chunk [B, chunk_size*factor, F] -> (state, enc [B, chunk_size, D]).

        Step k returns encoder chunk k - `stream_delay_chunks` (0 without lookahead; with
        lookahead, first outputs are not frames and the caller flushes with that many chunks of
        length 0). `feat_chunk_lengths` [B] (optional, an addition to the contract): valid feature
        frames in this chunk; once a chunk is partial, later frames are padding, masked exactly as
        `encode` masks frames beyond `feat_lengths`, so the valid outputs equal `encode`.
        `skip` (a model with arbitrators, in eval mode): gated-off components are not executed
        (`jaxspeech.models.encoder`, skipping execution); the outputs are the same.
        """
        b, n, _ = feat_chunk.shape
        if n != self.feat_chunk_size:
            raise ValueError(f"feat_chunk has {n} frames, expected {self.feat_chunk_size}")
        c, factor = self.cfg.chunk_size, self.cfg.subsampling_factor
        lengths = jnp.full((b,), n, jnp.int32) if feat_chunk_lengths is None else feat_chunk_lengths
        sub_state, x = self.subsampling.step(
            state.subsampling, self._normalize(feat_chunk, lengths)
        )
        frames = lengths // factor
        end = jnp.where(frames < c, jnp.minimum(state.end, state.offset + frames), state.end)
        enc_state, enc = self.encoder.step(state.encoder, x, state.offset, end, skip=skip)
        return StreamState(sub_state, enc_state, state.offset + c, end), enc
