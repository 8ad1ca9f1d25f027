"""`TransducerConfig` and the small conventions shared by every model module.

Logical axis names (ARCHITECTURE.md): `batch`, `frames`, `embed`, `mlp`, `heads`, `kv`, `vocab`,
`joint`, `conv_in`, `conv_out`. Model code never names mesh axes; the trainer maps these names to
mesh axes with `nnx.logical_axis_rules` / `nnx.get_partition_spec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.quant.fake_quant import fake_quant_activations


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransducerConfig:
    """Hyperparameters of a `TransformerTransducer` (all sizes in model units, not mesh units).

    chunk_size is in encoder frames (40 ms each with 4x subsampling). left_chunks=-1 means unlimited
    left context; streaming then keeps a cache of `max_stream_frames` encoder frames (see
    `jaxspeech.models.encoder`), beyond which the oldest frames fall out of the attention window.
    `max_stream_frames` is an addition to the ARCHITECTURE.md field list; it is unused when
    left_chunks >= 0. `ctc_weight` > 0 adds an auxiliary CTC loss on the encoder (see
    `TransformerTransducer.loss`).
    """

    num_mels: int = 80
    vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    num_layers: int = 6
    subsampling_factor: int = 4
    subsampling_channels: int = 64
    chunk_size: int = 8
    left_chunks: int = 4
    lookahead_chunks: int = 0
    dropout: float = 0.1
    predictor: str = "lstm"
    predictor_dim: int = 256
    predictor_layers: int = 1
    stateless_context: int = 2
    joint_dim: int = 256
    dtype: str = "float32"
    param_dtype: str = "float32"
    max_stream_frames: int = 1024
    # Weight of an auxiliary CTC loss on the encoder output (a linear head to the vocabulary,
    # used in training only); 0 = none (no head is created).
    ctc_weight: float = 0.0
    # Fake-quantize the input of every weight matmul (dense, attention projections, convolutions)
    # to this many bits, per token (symmetric, dynamic max-abs scale over the feature axis;
    # straight-through gradients): the activation half of quantization-aware training (see
    # `jaxspeech.quant.fake_quant.fake_quant_activations`). 0 = float activations.
    activation_bits: int = 0
    # Arbitrators (jaxspeech.models.arbitrator): "none", "acoustic" or "acoustic+block"; their
    # hidden width; the binary-gate estimator ("gumbel_st", "st", "gumbel_soft"); the initial
    # bias of the gate logits (positive: components start on); and the weight of the compute loss
    # (executed gated-encoder FLOPs as a fraction of the ungated encoder's, jaxspeech.models.flops)
    # added to each utterance's loss in nats.
    arbitrator: str = "none"
    arbitrator_dim: int = 32
    gate_estimator: str = "gumbel_st"
    gate_init_bias: float = 4.0
    compute_weight: float = 0.0
    # The compute loss's price of an attention FLOP relative to a feed-forward FLOP (1: the loss
    # is the FLOP fraction; s > 1: attention takes s times longer per FLOP on the target
    # hardware, as measured by `scripts/bench_arbitrator.py --component_costs`).
    attention_cost: float = 1.0
    # A compute budget instead of a price (0 = off: the loss is `compute_weight` * the executed
    # fraction, the paper's form). With a target c in (0, 1], the compute loss is
    # `compute_weight` * max(0, mean fraction over the batch - c): no pressure once the batch's
    # mean executed compute is within the budget, so the weight can be large and on early
    # without the gates collapsing below it, and utterances may spend more or less than c as
    # long as the batch's mean does not (`flops.budget_excess`).
    compute_target: float = 0.0
    # One gate decision per attention chunk (`chunk_size` frames, from the mean of the chunk's
    # frame logits) instead of per frame: streaming then runs or skips whole chunks.
    gate_per_chunk: bool = False
    # With `gate_per_chunk`: only attention decides per chunk, the feed-forward gates stay per
    # frame. Streaming skips attention for whole chunks (its time per FLOP is the dearer one)
    # while the feed-forward networks keep the per-frame choice.
    ffn_per_frame: bool = False
    # One gate per layer and frame (or chunk) for the whole block: attention and feed-forward
    # network switch on and off together, from the mean of the two components' logits. The
    # compute loss prices the block at both components' cost, so a budget buys whole blocks
    # (24 d^2 per frame) instead of cheap attention layers (8 d^2) before feed-forward networks
    # (16 d^2): the structure of a shallower dense encoder, chosen per frame. Measured on the
    # 16-block commands encoder at a budget of 0.38: the gates settle on six blocks, the same on
    # almost every frame, as good as a dense 6-block model (experiments/RESULTS.md, "Whole-block
    # gates").
    whole_block_gates: bool = False
    # The compute loss prices each component per chunk instead of per frame: in a chunk of
    # `chunk_size` frames, a component costs the whole chunk's FLOPs if it is on for any of the
    # chunk's frames (the chunk's largest gate value), nothing otherwise. That is what streaming
    # one utterance costs in time, where a component's weight reads, not its rows, set the time
    # of a chunk (experiments/RESULTS.md, "Where a streamed chunk's time goes"). The gates stay
    # per frame; the reported FLOPs (`flops.encoder_flops`) are unchanged.
    price_per_chunk: bool = False
    # With `price_per_chunk`: the share S of a component's chunk price that is paid once per chunk
    # in which it runs (its weight reads); the rest, 1 - S, is paid per frame it runs on (its
    # rows). 1 prices whole chunks only; 0 is the per-frame price. `scripts/bench_arbitrator.py
    # --frame_costs` fits S to the streaming loop's time: 0.36 for the 16-block encoder at batch 1
    # on the 2-core CPU (experiments/RESULTS.md, "Seed 2 for every gated cell").
    chunk_price_share: float = 1.0
    # Static pruning (the baseline arbitrators must beat): one '0'/'1' per layer, '0' = that
    # layer's self-attention (`static_attention`) or feed-forward (`static_ffn`) is off on every
    # frame, exactly as an arbitrator gate that is always off ("" = all on). Needs arbitrator
    # "none"; executed FLOPs, skipping streaming and gathered execution treat it as fixed gates.
    static_attention: str = ""
    static_ffn: str = ""
    # In-place self-distillation of a gated encoder (arbitrators or static pruning; the
    # `TransformerTransducer.loss_terms` docstring): each training step also runs the ungated
    # encoder on the same batch. `full_pass_weight` weighs that pass's own task loss (RNN-T plus
    # `ctc_weight` * CTC), so the shared weights keep serving the whole encoder; `distill_weight`
    # weighs the KL divergence from its CTC-head posteriors (the teacher, no gradient) to the
    # gated pass's, summed over frames (needs `ctc_weight` > 0). 0 = off.
    full_pass_weight: float = 0.0
    distill_weight: float = 0.0

    def __post_init__(self):
        f = self.subsampling_factor
        if f < 1 or f & (f - 1):
            raise ValueError(f"subsampling_factor must be a power of two, got {f}")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError("d_model / num_heads must be an even integer (rotary embeddings)")
        if self.predictor not in ("lstm", "stateless"):
            raise ValueError(f"predictor must be 'lstm' or 'stateless', got {self.predictor!r}")
        if self.left_chunks < -1 or self.lookahead_chunks < 0 or self.chunk_size < 1:
            raise ValueError("need chunk_size >= 1, left_chunks >= -1, lookahead_chunks >= 0")
        if self.ctc_weight < 0:
            raise ValueError(f"ctc_weight must be >= 0, got {self.ctc_weight}")
        if self.arbitrator not in ("none", "acoustic", "acoustic+block"):
            raise ValueError(
                "arbitrator must be 'none', 'acoustic' or 'acoustic+block', "
                f"got {self.arbitrator!r}"
            )
        if self.gate_estimator not in ("gumbel_st", "st", "gumbel_soft"):
            raise ValueError(
                "gate_estimator must be 'gumbel_st', 'st' or 'gumbel_soft', "
                f"got {self.gate_estimator!r}"
            )
        if self.compute_weight < 0 or self.arbitrator_dim < 1 or self.attention_cost <= 0:
            raise ValueError("need compute_weight >= 0, arbitrator_dim >= 1, attention_cost > 0")
        if not 0 <= self.compute_target <= 1:
            raise ValueError(
                f"compute_target must be 0 (off) or a fraction in (0, 1], got {self.compute_target}"
            )
        if self.compute_target and self.arbitrator == "none":
            raise ValueError(
                "compute_target (a compute budget) needs arbitrators (model.arbitrator)"
            )
        if self.ffn_per_frame and not self.gate_per_chunk:
            raise ValueError(
                "ffn_per_frame keeps the feed-forward gates per frame while attention decides "
                "per chunk: set model.gate_per_chunk = True as well"
            )
        if self.whole_block_gates and self.arbitrator == "none":
            raise ValueError(
                "whole_block_gates ties the arbitrators' attention and FFN gates: "
                "set model.arbitrator as well"
            )
        if self.whole_block_gates and self.ffn_per_frame:
            raise ValueError(
                "whole_block_gates makes one decision per block, ffn_per_frame a separate one "
                "for the FFN: set only one of them"
            )
        if not 0 <= self.chunk_price_share <= 1:
            raise ValueError(f"chunk_price_share must lie in [0, 1], got {self.chunk_price_share}")
        if self.chunk_price_share != 1 and not self.price_per_chunk:
            raise ValueError(
                "chunk_price_share splits the price of model.price_per_chunk between chunks "
                "and frames: set model.price_per_chunk = True as well"
            )
        if self.price_per_chunk and self.arbitrator == "none":
            raise ValueError(
                "price_per_chunk prices the arbitrators' gates in the compute loss: "
                "set model.arbitrator as well"
            )
        for name in ("static_attention", "static_ffn"):
            value = getattr(self, name)
            if value and (len(value) != self.num_layers or set(value) - {"0", "1"}):
                raise ValueError(
                    f"{name} must be '' or {self.num_layers} characters '0'/'1' (one per "
                    f"layer, '0' = off), got {value!r}"
                )
            if value and self.arbitrator != "none":
                raise ValueError(f"{name} (static pruning) needs arbitrator 'none'")
        if self.full_pass_weight < 0 or self.distill_weight < 0:
            raise ValueError("need full_pass_weight >= 0 and distill_weight >= 0")
        if (self.full_pass_weight or self.distill_weight) and not (
            self.arbitrator != "none" or self.static_gates
        ):
            raise ValueError(
                "full_pass_weight / distill_weight (self-distillation) need a gated encoder: "
                "set model.arbitrator or model.static_attention / model.static_ffn"
            )
        if self.distill_weight and not self.ctc_weight:
            raise ValueError(
                "distill_weight distills the CTC head's posteriors: set model.ctc_weight > 0"
            )
        if not 0 <= self.activation_bits <= 8:
            raise ValueError(
                f"activation_bits must be 0 (float) or 1..8, got {self.activation_bits}"
            )

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def static_gates(self) -> tuple[tuple[bool, bool], ...] | None:
        """Per layer (attention on, FFN on) from `static_attention`/`static_ffn`, or None when
        neither prunes anything."""
        if "0" not in self.static_attention + self.static_ffn:
            return None
        attn = self.static_attention or "1" * self.num_layers
        ffn = self.static_ffn or "1" * self.num_layers
        return tuple((a == "1", f == "1") for a, f in zip(attn, ffn, strict=True))

    @property
    def num_subsampling_layers(self) -> int:
        return self.subsampling_factor.bit_length() - 1


_ZEROS = nnx.initializers.zeros_init()


def partitioned(init: nnx.Initializer, axes: Sequence[str | None]) -> nnx.Initializer:
    """`nnx.with_partitioning(init, axes)`, usable with or without a mesh.

    Under an active mesh (`jax.set_mesh`) with `nnx.use_eager_sharding(True)` (the Flax default)
    parameters are created sharded through the active `nnx.logical_axis_rules`; without a mesh the
    logical names are only recorded as metadata (read them with `nnx.get_partition_spec`), so
    the model can be built on a laptop, in tests or under `nnx.eval_shape`.
    """
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=eager)


def dense_init(axes: Sequence[str | None]) -> nnx.Initializer:
    """LeCun-normal (fan-in) kernel initializer with logical axes."""
    return partitioned(nnx.initializers.lecun_normal(), axes)


def zeros_init(axes: Sequence[str | None]) -> nnx.Initializer:
    return partitioned(nnx.initializers.zeros_init(), axes)


def ones_init(axes: Sequence[str | None]) -> nnx.Initializer:
    return partitioned(nnx.initializers.ones_init(), axes)


def layer_norm(dim: int, cfg: TransducerConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over `embed` with logical-axis metadata on scale and bias."""
    return nnx.LayerNorm(
        dim,
        epsilon=1e-5,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        scale_init=ones_init(("embed",)),
        bias_init=zeros_init(("embed",)),
        rngs=rngs,
    )


def input_quantized(cls, feature_axes: int = 1):
    """A subclass of the flax layer `cls` whose call fake-quantizes its input to `act_bits` bits
    (0: unchanged), one scale per position over the last `feature_axes` axes (a 2-D conv's
    input [B, T, F, C]: over frequency and channels, per frame; per channel alone, its first
    layer's single channel would give every value its own scale, quantizing nothing).
    Parameters and their paths are those of `cls`."""

    class InputQuantized(cls):
        def __init__(self, *args, act_bits: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.act_bits = int(act_bits)

        def __call__(self, x, *args, **kwargs):
            if self.act_bits:
                x = fake_quant_activations(x, self.act_bits, feature_axes)
            return super().__call__(x, *args, **kwargs)

    InputQuantized.__name__ = InputQuantized.__qualname__ = f"InputQuantized{cls.__name__}"
    return InputQuantized


Linear = input_quantized(nnx.Linear)
Einsum = input_quantized(nnx.Einsum)
Conv = input_quantized(nnx.Conv, feature_axes=2)


def dense(
    d_in: int,
    d_out: int,
    axes: tuple[str | None, str | None],
    cfg: TransducerConfig,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    bias_init: nnx.Initializer = _ZEROS,
) -> nnx.Linear:
    """`nnx.Linear` in the config's dtypes; logical axes `(in, out)` on kernel, `(out,)` on bias;
    its input fake-quantized to `cfg.activation_bits` when set."""
    return Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        kernel_init=dense_init(axes),
        bias_init=partitioned(bias_init, (axes[1],)),
        act_bits=cfg.activation_bits,
        rngs=rngs,
    )
