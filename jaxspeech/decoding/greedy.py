"""Batched greedy transducer search: one `lax.while_loop`, static shapes.

The search is a plain function on arrays and callables, so any JAX project can use it:

- `pred_step(state, tokens [B] int32) -> (state, pred_out [B, P])` advances the prediction network
  by one label per batch row. `state` is any pytree whose leaves all have the batch as axis 0.
  `pred_out` is whatever `joint_fn` takes as its second argument; for speed, fold the joint's
  predictor projection into `pred_step` (as `model_callables` does for a `TransformerTransducer`),
  so it is computed once per emitted label rather than once per joint evaluation.
- `joint_fn(enc_frame [N, J], pred_out [N, P]) -> logits [N, V]` (unnormalized; the search applies
  `log_softmax`). `N` is the batch for greedy search and `batch * beam` for beam search.

Each batch row keeps its own frame pointer `t` (alignment-length synchronous), so one loop iteration
is one joint evaluation for every row: a row emits a label (and stays on its frame) or a blank (and
moves on). The loop runs `max_b(T_b + U_b)` iterations, not `T * (max_symbols + 1)`.

Score: the log-probability of the single RNN-T alignment the search follows, i.e. the sum of
`log_softmax(joint)` over every emitted label *and* every blank (one per frame, including the
blank that is forced when `max_symbols_per_frame` or `max_output_len` is reached). This is the same
quantity beam search (`jaxspeech.decoding.beam`) sums over merged alignments, so the two compare.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

PredStep = Callable[[Any, jax.Array], tuple[Any, jax.Array]]
JointFn = Callable[[jax.Array, jax.Array], jax.Array]


def select_rows(mask: jax.Array, new: Any, old: Any) -> Any:
    """Per-row `where` on pytrees whose leaves have the batch as axis 0."""

    def sel(n, o):
        return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(sel, new, old)


def start_predictor(pred_state: Any, pred_step: PredStep, batch: int, blank_id: int = 0):
    """Feed the blank start symbol: returns `(state, pred_out)` for the empty label prefix."""
    return pred_step(pred_state, jnp.full((batch,), blank_id, jnp.int32))


class GreedyResult(NamedTuple):
    tokens: jax.Array  # [B, L] int32, 0 beyond lengths
    lengths: jax.Array  # [B] int32
    scores: jax.Array  # [B] float32, alignment log-probability
    pred_state: Any  # predictor state after the last emitted label
    pred_out: jax.Array  # [B, P] predictor output for the emitted prefix


def at_least_one_frame(enc_proj: jax.Array) -> jax.Array:
    """`enc_proj [B, T, J]`, with one (invalid, never read) frame where T is 0: the searches
    index a frame per step, which an empty axis cannot give even where no step runs."""
    if enc_proj.shape[1]:
        return enc_proj
    return jnp.zeros((enc_proj.shape[0], 1, enc_proj.shape[2]), enc_proj.dtype)


class _Carry(NamedTuple):
    t: jax.Array  # [B] current frame
    n_frame: jax.Array  # [B] labels emitted on the current frame
    length: jax.Array  # [B] labels emitted so far
    tokens: jax.Array  # [B, L]
    score: jax.Array  # [B]
    pred_state: Any
    pred_out: jax.Array


def greedy_search_with_state(
    enc_proj: jax.Array,
    enc_lengths: jax.Array,
    pred_state: Any,
    pred_out: jax.Array,
    pred_step: PredStep,
    joint_fn: JointFn,
    *,
    blank_id: int = 0,
    max_symbols_per_frame: int = 3,
    max_output_len: int | None = None,
) -> GreedyResult:
    """Greedy search from a given predictor state *and output*; returns the final predictor too.

    This is the resumable form used by streaming: `pred_out` is the predictor output for the
    labels emitted so far (for a fresh utterance, from `start_predictor`).
    """
    enc_proj = at_least_one_frame(enc_proj)
    batch, num_frames, _ = enc_proj.shape
    max_len = max_output_len if max_output_len is not None else num_frames * max_symbols_per_frame
    max_len = max(int(max_len), 1)
    enc_lengths = jnp.minimum(enc_lengths.astype(jnp.int32), num_frames)
    rows = jnp.arange(batch)
    positions = jnp.arange(max_len)[None, :]

    def cond(c: _Carry):
        return jnp.any(c.t < enc_lengths)

    def body(c: _Carry) -> _Carry:
        active = c.t < enc_lengths
        frame = enc_proj[rows, jnp.minimum(c.t, num_frames - 1)]
        logp = jax.nn.log_softmax(joint_fn(frame, c.pred_out).astype(jnp.float32), axis=-1)
        best = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        may_emit = (c.n_frame < max_symbols_per_frame) & (c.length < max_len)
        tok = jnp.where(may_emit, best, blank_id)
        emit = active & (tok != blank_id)
        score = c.score + jnp.where(active, jnp.take_along_axis(logp, tok[:, None], -1)[:, 0], 0.0)
        tokens = jnp.where(emit[:, None] & (positions == c.length[:, None]), tok[:, None], c.tokens)

        def advance(args):
            state, out = args
            new_state, new_out = pred_step(state, jnp.where(emit, tok, blank_id))
            return select_rows(emit, (new_state, new_out.astype(out.dtype)), (state, out))

        state, out = lax.cond(jnp.any(emit), advance, lambda a: a, (c.pred_state, c.pred_out))
        return _Carry(
            t=c.t + (active & ~emit),
            n_frame=jnp.where(emit, c.n_frame + 1, 0),
            length=c.length + emit,
            tokens=tokens,
            score=score,
            pred_state=state,
            pred_out=out,
        )

    zeros = jnp.zeros((batch,), jnp.int32)
    init = _Carry(
        t=zeros,
        n_frame=zeros,
        length=zeros,
        tokens=jnp.zeros((batch, max_len), jnp.int32),
        score=jnp.zeros((batch,), jnp.float32),
        pred_state=pred_state,
        pred_out=pred_out,
    )
    c = lax.while_loop(cond, body, init)
    return GreedyResult(c.tokens, c.length, c.score, c.pred_state, c.pred_out)


def greedy_search(
    enc_proj: jax.Array,
    enc_lengths: jax.Array,
    pred_state: Any,
    pred_step: PredStep,
    joint_fn: JointFn,
    *,
    blank_id: int = 0,
    max_symbols_per_frame: int = 3,
    max_output_len: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy transducer decoding of a batch.

    Args:
      enc_proj: `[B, T, J]` encoder output, already projected for the joint.
      enc_lengths: `[B]` valid frames; frames at or beyond them emit nothing and add no score.
      pred_state: initial predictor state *before* the blank start symbol (e.g.
        `model.predictor.init_state(B)`); the search feeds `blank_id` once to start.
      pred_step, joint_fn: the callables described in the module docstring.
      blank_id: the blank label.
      max_symbols_per_frame: most labels emitted on one frame; then a blank is forced (and scored).
      max_output_len: static length `L` of the output buffer (default `T * max_symbols_per_frame`,
        which never truncates). When a row's buffer is full it only emits blanks.

    Returns:
      `(tokens [B, L] int32 padded with 0, lengths [B] int32, scores [B] float32)`, scores being the
      log-probability of the followed alignment (module docstring). Jit the caller; the callables
      are traced, not static.
    """
    state, out = start_predictor(pred_state, pred_step, enc_proj.shape[0], blank_id)
    res = greedy_search_with_state(
        enc_proj,
        enc_lengths,
        state,
        out,
        pred_step,
        joint_fn,
        blank_id=blank_id,
        max_symbols_per_frame=max_symbols_per_frame,
        max_output_len=max_output_len,
    )
    return res.tokens, res.lengths, res.scores


# Model-level helpers ---------------------------------------------------------------------------


def model_callables(model) -> tuple[PredStep, JointFn]:
    """`(pred_step, joint_fn)` for a `jaxspeech.models.TransformerTransducer`.

    `pred_step` is `model.predictor.step` followed by `model.joint.project_predictor` (so `pred_out`
    is the projected predictor output, [B, J]); `joint_fn` is `model.joint` on projected inputs.
    The initial state is `model.predictor.init_state(B)`.
    """

    def pred_step(state, tokens):
        state, out = model.predictor.step(state, tokens)
        return state, model.joint.project_predictor(out)

    return pred_step, model.joint


def encode_projected(model, feats: jax.Array, feat_lengths: jax.Array):
    """`model.encode` then `model.joint.project_encoder`: `(enc_proj [B, T', J], enc_lengths)`."""
    enc, enc_lengths = model.encode(feats, feat_lengths)
    return model.joint.project_encoder(enc), enc_lengths


class StaticGraph:
    """An `nnx.GraphDef` usable as a static jit argument, compared by value.

    (A model's GraphDef may hold lists among its static attributes, which makes it unhashable.)
    """

    def __init__(self, graphdef):
        self.graphdef = graphdef

    def __hash__(self):
        return 0  # equal graphs must hash equal; `__eq__` tells them apart

    def __eq__(self, other):
        return isinstance(other, StaticGraph) and self.graphdef == other.graphdef


@functools.partial(jax.jit, static_argnames=("graph", "search", "options"))
def run_model_search(graph, params, feats, feat_lengths, *, search, options):
    """Jitted `encode -> project -> search` on an `nnx.split` model (in eval mode).

    `graph` is a `StaticGraph`, `search` is `greedy_search` or `beam_search`, `options` a sorted
    tuple of its keyword arguments. One compilation per (model structure, search, options, input
    shapes); new parameter values or new batches of the same shapes do not recompile.
    """
    model = nnx.merge(graph.graphdef, params)
    model.eval()  # the merged copy only: decoding never applies dropout
    enc_proj, enc_lengths = encode_projected(model, feats, feat_lengths)
    pred_step, joint_fn = model_callables(model)
    state = model.predictor.init_state(feats.shape[0])
    return search(enc_proj, enc_lengths, state, pred_step, joint_fn, **dict(options))


def transducer_greedy(model, feats: jax.Array, feat_lengths: jax.Array, **kw):
    """Greedy decoding of log-mel features with a `TransformerTransducer` (jit-compiled).

    feats [B, T, F], feat_lengths [B]; `kw` are `greedy_search` options (`max_symbols_per_frame`,
    `max_output_len`, `blank_id`). Returns `(tokens [B, L], lengths [B], scores [B])`.
    """
    graphdef, params = nnx.split(model)
    return run_model_search(
        StaticGraph(graphdef),
        params,
        feats,
        feat_lengths,
        search=greedy_search,
        options=tuple(sorted(kw.items())),
    )
