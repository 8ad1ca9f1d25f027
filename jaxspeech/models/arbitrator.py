"""Arbitrators: per-frame gates that switch encoder components off (compute-cost amortization).

Xie et al., "Compute cost amortized Transformer for streaming ASR" (Interspeech 2022). The paper
does not publish the arbitrator's size or inputs, the estimator for the binary decisions or the
exact compute loss; jaxspeech's choices, all in `TransducerConfig`:

Inputs (`arbitrator`):
  "acoustic"        one small network on the subsampled acoustic frames (the encoder's input)
                    emits the gate logits of every gated component of every layer at once:
                    LayerNorm -> Linear(D, A) -> GELU -> Linear(A, 2 * num_layers).
  "acoustic+block"  as above, plus, per layer, Linear(D, 2) on the layer's (normalized) block input
                    added to that layer's logits, so a gate can also react to what the encoder has
                    computed so far.
Both are strictly per frame, hence exactly streamable. Gate order per layer: (attention, FFN).

Estimators (`gate_estimator`) for the binary decision g in {0, 1} (on = 1) from a logit l:
  "gumbel_st"   (default) g = 1[l + n > 0], n ~ Logistic(0, 1) (a Gumbel-sigmoid sample), with the
                straight-through gradient of sigmoid((l + n) / tau);
  "st"          deterministic straight-through: g = 1[l > 0], gradient of sigmoid(l / tau);
  "gumbel_soft" relaxed: g = sigmoid((l + n) / tau) itself in training (the forward pass sees
                fractional gates; a frame counts as a key/value iff g > 0.5).
With `gate_per_chunk` the decision is made once per attention chunk (frames [k C, (k + 1) C), the
chunks streaming feeds) from the mean logit of the chunk's valid frames, and every frame of the
chunk takes it: streaming then executes or skips a component for a whole chunk (per-frame gates
mostly leave partial chunks, whose branch still runs). Gradients reach every frame's logit through
the mean. With `ffn_per_frame` as well, only the attention gates decide per chunk and the
feed-forward gates stay per frame. With `whole_block_gates` a layer's two components share one
decision, made from the mean of their two logits: the block runs or is skipped as a whole. At
inference (`model.eval()`) every estimator gives the hard gate 1[l > 0]. The temperature tau
lives in the model (`GateTemperature`) and the train step anneals it (`temperature_schedule`); for
the last `train.hard_gate_steps` it sets tau = 0, which trains with the inference gates themselves
(`with_hard_phase`). A compute budget (`compute_target`) can be lowered gradually from 1 during
training (`budget_anneal`).
Gates of padded frames are 0. `gate_init_bias` (the output bias, default 4: P(on) ~ 0.98) makes a
fresh arbitrator keep nearly everything on, so warm-starting from a trained T-T starts from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.models.config import TransducerConfig, dense, layer_norm

ARBITRATORS = ("none", "acoustic", "acoustic+block")
ESTIMATORS = ("gumbel_st", "st", "gumbel_soft")


class GateTemperature(nnx.Variable):
    """The relaxation temperature tau (a non-trainable scalar, set by the train step)."""


def temperature_schedule(start: float, end: float, num_steps: int):
    """tau(step): exponential interpolation from `start` (step 0) to `end` (step num_steps)."""

    def schedule(step):
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0.0, 1.0)
        return start * (end / start) ** frac

    return schedule


def with_hard_phase(schedule, num_steps: int, hard_steps: int):
    """The temperature schedule with its last `hard_steps` of `num_steps` at 0: the train step
    then samples no gates but uses the inference gates 1[l > 0] (`relaxed_gates`), so the
    encoder's last steps train exactly the computation the test runs (relaxed gates are
    stochastic: a component whose logit is 2 runs on 88% of the frames in training and on all
    of them at test). The arbitrators get no gradient; only weight decay and Adam's momentum
    still move them."""
    if not 0 <= hard_steps <= num_steps:
        raise ValueError(
            f"train.hard_gate_steps must be in [0, train.num_steps = {num_steps}], got {hard_steps}"
        )
    if hard_steps == 0:
        return schedule
    start = num_steps - hard_steps

    def hard_phase(step):
        return jnp.where(jnp.asarray(step) >= start, 0.0, schedule(step))

    return hard_phase


def compute_ramp(delay: int, ramp: int):
    """scale(step) of the compute loss weight: 0 for the first `delay` steps, then linear to 1 over
    `ramp` steps (1 from step `delay + ramp` on). From scratch, the transducer loss cannot yet tell
    a useful component from a useless one, so without a delay the compute loss switches every gate
    off before the encoder has learned anything (measured: experiments/RESULTS.md)."""
    if delay < 0 or ramp < 0:
        raise ValueError(f"train.compute_ramp needs (delay, ramp) >= 0, got ({delay}, {ramp})")

    def schedule(step):
        done = jnp.asarray(step, jnp.float32) - delay
        if ramp == 0:
            return (done >= 0).astype(jnp.float32)
        return jnp.clip((done + 1) / ramp, 0.0, 1.0)

    return schedule


def budget_anneal(target: float, start: int, steps: int, num_steps: int, hard_steps: int = 0):
    """budget(step) of a compute budget lowered gradually (`train.budget_anneal` = (start,
    steps)), the schedule of gradual magnitude pruning (Zhu & Gupta, "To prune, or not to
    prune", 2017): 1 (no constraint) until `start`, then target + (1 - target) (1 - p)^3 at
    p = (step - start) / steps, `target` from `start + steps` on. The cube takes the most
    components early, while many are redundant, and the last ones slowly, so the encoder adapts
    as it loses them; a fixed budget instead drops everything it will drop as soon as the
    compute loss ramps in. The anneal must end before the hard-gate phase (`hard_steps`, the
    last steps of `num_steps`), which gives the arbitrators no gradient. On the spoken-commands
    corpus it did no better than a fixed budget (experiments/RESULTS.md, "Gradual pruning")."""
    if not 0 < target <= 1:
        raise ValueError(
            f"train.budget_anneal needs a compute budget (model.compute_target in (0, 1]), "
            f"got compute_target={target}"
        )
    if start < 0 or steps <= 0 or start + steps > num_steps - hard_steps:
        raise ValueError(
            f"train.budget_anneal = ({start}, {steps}) must have start >= 0, steps > 0 and end "
            f"(start + steps) by step {num_steps - hard_steps} (train.num_steps = {num_steps} "
            f"less train.hard_gate_steps = {hard_steps}, where the gates stop learning)"
        )

    def schedule(step):
        p = jnp.clip((jnp.asarray(step, jnp.float32) - start) / steps, 0.0, 1.0)
        return target + (1.0 - target) * (1.0 - p) ** 3

    return schedule


def frame_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[..., T] -> [..., N, chunk], N = ceil(T / chunk): the frames of each chunk (frames
    [k chunk, (k + 1) chunk)), the last chunk padded with zeros (False for a mask)."""
    t = x.shape[-1]
    n = -(-t // chunk)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * chunk - t)])
    return padded.reshape(*x.shape[:-1], n, chunk)


def chunk_mean(logits: jax.Array, valid: jax.Array, chunk: int) -> jax.Array:
    """logits [..., B, T], valid [B, T] -> the mean logit over each chunk's valid frames
    [..., B, N] (0 for a chunk without any), N = ceil(T / chunk)."""
    w = frame_chunks(valid, chunk)
    count = jnp.sum(w, axis=-1)
    total = jnp.sum(jnp.where(w, frame_chunks(logits, chunk), 0.0), axis=-1)
    return total / jnp.maximum(count, 1).astype(logits.dtype)


def hard(gate: jax.Array) -> jax.Array:
    """The binary decision of a gate value (forward value > 0.5), without gradient."""
    return jax.lax.stop_gradient(gate) > 0.5


def relaxed_gates(
    logits: jax.Array, estimator: str, temperature, key: jax.Array | None
) -> jax.Array:
    """Training-time gate values from logits (see the module docstring); key None = no noise.

    Temperature 0 (a traced value may be 0: `with_hard_phase`) gives the inference gates
    1[l > 0] instead, without noise and without gradient: the encoder then trains with exactly
    the components it will run at test time, and no gradient reaches the arbitrators."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"gate_estimator must be one of {ESTIMATORS}, got {estimator!r}")
    temperature = jnp.asarray(temperature, jnp.float32)
    relaxing = temperature > 0
    tau = jnp.where(relaxing, temperature, 1.0)  # no 0-division in the branch not taken
    noisy = logits
    if estimator != "st" and key is not None:
        noisy = logits + jax.random.logistic(key, logits.shape, logits.dtype)
    soft = jax.nn.sigmoid(noisy / tau)
    if estimator == "gumbel_soft":
        g = soft
    else:
        g = (noisy > 0).astype(soft.dtype) + (soft - jax.lax.stop_gradient(soft))  # exactly 0/1
    inference = (logits > 0).astype(g.dtype)  # a step: no gradient flows through it
    return jnp.where(relaxing, g, inference)


class Arbitrator(nnx.Module):
    """Gate logits for the attention and feed-forward components of every encoder layer."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        if cfg.arbitrator not in ARBITRATORS[1:]:
            raise ValueError(f"arbitrator must be one of {ARBITRATORS}, got {cfg.arbitrator!r}")
        d, a, n = cfg.d_model, cfg.arbitrator_dim, cfg.num_layers
        self.num_layers = n
        self.estimator = cfg.gate_estimator
        self.norm = layer_norm(d, cfg, rngs=rngs)
        self.hidden = dense(d, a, ("embed", None), cfg, rngs=rngs)
        self.logits = dense(
            a, 2 * n, (None, None), cfg, rngs=rngs,
            bias_init=nnx.initializers.constant(cfg.gate_init_bias),
        )  # fmt: skip
        self.block = (
            nnx.List([dense(d, 2, ("embed", None), cfg, rngs=rngs) for _ in range(n)])
            if cfg.arbitrator == "acoustic+block"
            else None
        )
        self.chunk = cfg.chunk_size if cfg.gate_per_chunk else 1
        self.ffn_per_frame = cfg.ffn_per_frame
        self.whole_block = cfg.whole_block_gates
        self.temperature = GateTemperature(jnp.ones((), jnp.float32))
        self.deterministic = False  # model.eval() sets True: hard gates, no noise
        self.rngs = rngs["gates"].fork()

    def acoustic_logits(self, x: jax.Array) -> jax.Array:
        """x [B,T,D] (subsampled frames) -> logits [num_layers, 2, B, T] (2: attention, FFN)."""
        h = jax.nn.gelu(self.hidden(self.norm(x)))
        logits = self.logits(h).astype(jnp.float32)  # [B, T, 2L]
        b, t, _ = logits.shape
        return jnp.moveaxis(logits.reshape(b, t, self.num_layers, 2), (2, 3), (0, 1))

    def block_logits(self, layer: int, x_normed: jax.Array) -> jax.Array | None:
        """Layer `layer`'s additive logits [2, B, T] from its normalized block input, or None."""
        if self.block is None:
            return None
        return jnp.moveaxis(self.block[layer](x_normed).astype(jnp.float32), -1, 0)

    def gates(self, logits: jax.Array, valid: jax.Array) -> jax.Array:
        """Gate values (same shape as logits [2, B, T]: attention, FFN); valid [B, T] bool
        (padding -> 0). Per chunk (`gate_per_chunk`), T is frames from a chunk boundary on.
        Whole-block gates: both rows are one decision, from the mean of the two logits."""
        t = valid.shape[-1]
        if self.whole_block:
            logits = jnp.mean(logits, axis=0, keepdims=True)
        if self.chunk == 1:
            g = self._decide(logits)
        else:
            per_chunk = logits[:1] if self.ffn_per_frame else logits  # ffn_per_frame: attention
            g = self._decide(chunk_mean(per_chunk, valid, self.chunk))
            g = jnp.repeat(g, self.chunk, axis=-1)[..., :t]
            if self.ffn_per_frame:
                g = jnp.concatenate([g, self._decide(logits[1:])], axis=0)
        g = jnp.broadcast_to(g, (2, *g.shape[1:]))
        return jnp.where(valid, g, 0.0)

    def _decide(self, logits: jax.Array) -> jax.Array:
        """Gate values from logits: hard 1[l > 0] at inference, the estimator's in training."""
        if self.deterministic:
            return (logits > 0).astype(jnp.float32)
        key = self.rngs() if self.estimator != "st" else None
        return relaxed_gates(logits, self.estimator, self.temperature[...], key)
