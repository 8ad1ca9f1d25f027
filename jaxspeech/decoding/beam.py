"""Batched transducer beam search: alignment-length synchronous decoding (ALSD) with merging.

Algorithm (Saon, Tüske and Audhkhasi, "Alignment-length synchronous decoding for RNN transducer",
ICASSP 2020), in static shapes. Iteration `i` holds up to `beam_size` hypotheses per batch row, all
with alignment length `t + u = i` (`t` frames consumed, `u` labels emitted), so hypotheses sitting
on different frames compete on an equal footing. Each hypothesis is expanded by one lattice arc:

- blank: score `+ log p(blank | t, prefix)`, moves to frame `t + 1` (predictor unchanged);
- label `v`: score `+ log p(v | t, prefix)`, stays on frame `t` (predictor advanced by `v`).

Before pruning, a label expansion `prefix_k + [v]` that equals another hypothesis `j`'s blank
expansion (same labels; then also the same lattice node) is merged into it by log-add, so the beam
never holds two copies of a label sequence and a hypothesis' score is the log of the summed
probability of all its alignments that survived pruning. The best `beam_size` of the `K * V`
candidates survive (`lax.top_k`). A hypothesis whose blank reaches its row's last frame is final
and moves to a pool of the best `beam_size` final hypotheses.

Score optimized: `log P(y | x) = log sum_alignments prod p(arc)`, the RNN-T objective (the same
arcs the training loss sums over), approximated by the beam. With a beam at least as large as the
number of label sequences of length `<= max_output_len` (tiny vocabularies) the search is exact MAP
decoding over them; `tests/test_beam.py` checks this by brute force. With `beam_size=1` it is
exactly `greedy_search` (whose score is one alignment's log-probability).

Stopping: a row stops when its `nbest`-th best final score is at least the log-sum-exp of its live
hypotheses' scores. No live hypothesis can later produce a final score above that bound (extensions
only multiply by probabilities, and merging only re-adds mass already counted), so stopping early
returns the same best (or n-best) list as running to the last possible iteration `T + L`.

`max_symbols_per_frame` bounds the labels a hypothesis emits on its current frame (a safety bound,
as in greedy search); a merged hypothesis takes the count of its blank-arrived part (zero).
Predictor states are carried per hypothesis, flattened to `[B * beam_size, ...]` and gathered by
source beam.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxspeech.decoding.greedy import (
    JointFn,
    PredStep,
    StaticGraph,
    at_least_one_frame,
    run_model_search,
    select_rows,
    start_predictor,
)

NEG_INF = -jnp.inf


class _Beam(NamedTuple):
    score: jax.Array  # [B, K]; -inf marks an empty slot
    t: jax.Array  # [B, K] frames consumed
    u: jax.Array  # [B, K] labels emitted
    n_frame: jax.Array  # [B, K] labels emitted on the current frame
    tokens: jax.Array  # [B, K, L], 0 beyond u
    pred_state: Any  # leaves [B * K, ...]
    pred_out: jax.Array  # [B * K, P]


class _Final(NamedTuple):
    score: jax.Array  # [B, K]
    u: jax.Array  # [B, K]
    tokens: jax.Array  # [B, K, L]


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, K, ...], idx [B, N] -> [B, N, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _expand(beam: _Beam, enc_proj, pred_step, joint_fn, *, blank_id, max_symbols, max_len):
    """One ALSD iteration: score all one-arc expansions, merge duplicates, keep the best K."""
    batch, num_frames, _ = enc_proj.shape
    k = beam.score.shape[1]
    live = beam.score > NEG_INF
    frame = enc_proj[jnp.arange(batch)[:, None], jnp.minimum(beam.t, num_frames - 1)]
    logits = joint_fn(frame.reshape(batch * k, -1), beam.pred_out)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = logp.shape[-1]
    cand = beam.score[..., None] + logp.reshape(batch, k, vocab)  # [B, K, V]
    sym_ok = live & (beam.n_frame < max_symbols) & (beam.u < max_len)
    is_label = jnp.arange(vocab) != blank_id
    cand_sym = jnp.where(sym_ok[..., None] & is_label, cand, NEG_INF)
    cand_blank = jnp.where(live, cand[..., blank_id], NEG_INF)

    # Merge: j's blank expansion equals k's expansion by v iff tokens_j = tokens_k + [v].
    positions = jnp.arange(beam.tokens.shape[-1])
    same = beam.tokens[:, :, None, :] == beam.tokens[:, None, :, :]  # [B, j, k, L]
    prefix = jnp.all(same | (positions >= beam.u[:, None, :, None]), axis=-1)
    ext = (
        prefix
        & (beam.u[:, :, None] == beam.u[:, None, :] + 1)
        & (beam.t[:, :, None] + 1 == beam.t[:, None, :])
        & live[:, :, None]
        & live[:, None, :]
    )
    last = jnp.take_along_axis(beam.tokens, jnp.maximum(beam.u - 1, 0)[..., None], -1)[..., 0]
    idx = jnp.broadcast_to(last[:, :, None, None], (batch, k, k, 1))
    from_k = jnp.take_along_axis(jnp.broadcast_to(cand_sym[:, None], (batch, k, k, vocab)), idx, -1)
    absorbed = jnp.max(jnp.where(ext, from_k[..., 0], NEG_INF), axis=2)  # [B, j]
    cand_blank = jnp.logaddexp(cand_blank, absorbed)
    taken = jnp.einsum("bjk,bjv->bkv", ext.astype(jnp.float32), jax.nn.one_hot(last, vocab)) > 0
    cand_sym = jnp.where(taken, NEG_INF, cand_sym)

    flat = cand_sym.at[..., blank_id].set(cand_blank).reshape(batch, k * vocab)
    score, best = lax.top_k(flat, k)
    src, tok = best // vocab, (best % vocab).astype(jnp.int32)
    emit = (tok != blank_id) & (score > NEG_INF)
    u_src = _gather(beam.u, src)
    tokens = _gather(beam.tokens, src)
    tokens = jnp.where(emit[..., None] & (positions == u_src[..., None]), tok[..., None], tokens)

    flat_src = (jnp.arange(batch)[:, None] * k + src).reshape(-1)
    state = jax.tree.map(lambda x: x[flat_src], beam.pred_state)
    out = beam.pred_out[flat_src]
    emit_flat = emit.reshape(-1)

    def advance(args):
        st, po = args
        new_st, new_po = pred_step(st, jnp.where(emit_flat, tok.reshape(-1), blank_id))
        return select_rows(emit_flat, (new_st, new_po.astype(po.dtype)), (st, po))

    state, out = lax.cond(jnp.any(emit_flat), advance, lambda a: a, (state, out))
    return _Beam(
        score=score,
        t=_gather(beam.t, src) + ~emit,
        u=u_src + emit,
        n_frame=jnp.where(emit, _gather(beam.n_frame, src) + 1, 0),
        tokens=tokens,
        pred_state=state,
        pred_out=out,
    )


def _collect(beam: _Beam, final: _Final, enc_lengths):
    """Move hypotheses that consumed their row's last frame into the final pool (best K kept)."""
    k = beam.score.shape[1]
    done = (beam.t >= enc_lengths[:, None]) & (beam.score > NEG_INF)
    scores = jnp.concatenate([final.score, jnp.where(done, beam.score, NEG_INF)], axis=1)
    score, idx = lax.top_k(scores, k)
    final = _Final(
        score=score,
        u=_gather(jnp.concatenate([final.u, beam.u], 1), idx),
        tokens=_gather(jnp.concatenate([final.tokens, beam.tokens], 1), idx),
    )
    return beam._replace(score=jnp.where(done, NEG_INF, beam.score)), final


def beam_search(
    enc_proj: jax.Array,
    enc_lengths: jax.Array,
    pred_state: Any,
    pred_step: PredStep,
    joint_fn: JointFn,
    *,
    beam_size: int = 4,
    blank_id: int = 0,
    max_symbols_per_frame: int = 3,
    max_output_len: int | None = None,
    return_nbest: bool = False,
):
    """ALSD beam search with hypothesis merging (module docstring); same callables as greedy.

    Args:
      enc_proj, enc_lengths, pred_state, pred_step, joint_fn, blank_id, max_symbols_per_frame,
        max_output_len: as in `jaxspeech.decoding.greedy.greedy_search`.
      beam_size: hypotheses kept per row (static).
      return_nbest: also return the `beam_size` best final hypotheses.

    Returns:
      `(tokens [B, L], lengths [B], scores [B])` of the best hypothesis, scores being
      `log P(y | x)` summed over the alignments kept in the beam. With `return_nbest=True`:
      `(tokens [B, K, L], lengths [B, K], scores [B, K])`, best first (empty slots score -inf).
    """
    enc_proj = at_least_one_frame(enc_proj)
    batch, num_frames, _ = enc_proj.shape
    k = int(beam_size)
    max_len = max_output_len if max_output_len is not None else num_frames * max_symbols_per_frame
    max_len = max(int(max_len), 1)
    enc_lengths = jnp.minimum(enc_lengths.astype(jnp.int32), num_frames)
    nth = k - 1 if return_nbest else 0

    state, out = start_predictor(pred_state, pred_step, batch, blank_id)
    zeros = jnp.zeros((batch, k), jnp.int32)
    beam = _Beam(
        score=jnp.full((batch, k), NEG_INF).at[:, 0].set(0.0),
        t=zeros,
        u=zeros,
        n_frame=zeros,
        tokens=jnp.zeros((batch, k, max_len), jnp.int32),
        pred_state=jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), state),
        pred_out=jnp.repeat(out, k, axis=0),
    )
    final = _Final(jnp.full((batch, k), NEG_INF), zeros, jnp.zeros((batch, k, max_len), jnp.int32))

    def finish(i, beam, final):
        beam, final = _collect(beam, final, enc_lengths)
        bound = jax.nn.logsumexp(beam.score, axis=1)
        done = (final.score[:, nth] >= bound) | jnp.all(beam.score == NEG_INF, axis=1)
        beam = beam._replace(score=jnp.where(done[:, None], NEG_INF, beam.score))
        return i, beam, final, done

    def cond(carry):
        i, _, _, done = carry
        return (i < num_frames + max_len) & ~jnp.all(done)

    def body(carry):
        i, beam, final, _ = carry
        beam = _expand(
            beam,
            enc_proj,
            pred_step,
            joint_fn,
            blank_id=blank_id,
            max_symbols=max_symbols_per_frame,
            max_len=max_len,
        )
        return finish(i + 1, beam, final)

    _, _, final, _ = lax.while_loop(cond, body, finish(jnp.int32(0), beam, final))
    if return_nbest:
        return final.tokens, final.u, final.score
    return final.tokens[:, 0], final.u[:, 0], final.score[:, 0]


def transducer_beam(model, feats: jax.Array, feat_lengths: jax.Array, beam_size: int = 4, **kw):
    """Beam search decoding of log-mel features with a `TransformerTransducer` (jit-compiled).

    `kw` are `beam_search` options (`max_symbols_per_frame`, `max_output_len`, `return_nbest`,
    `blank_id`). Returns what `beam_search` returns.
    """
    graphdef, params = nnx.split(model)
    options = tuple(sorted({**kw, "beam_size": int(beam_size)}.items()))
    return run_model_search(
        StaticGraph(graphdef), params, feats, feat_lengths, search=beam_search, options=options
    )
