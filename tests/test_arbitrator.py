"""Arbitrators: gate semantics, the three executions (masked, gathered, skipping), the compute
loss's gradient, the gate estimators and the FLOP counter against brute force and XLA."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxspeech.models import TransducerConfig, TransformerTransducer, flops
from jaxspeech.models.arbitrator import compute_ramp, relaxed_gates, temperature_schedule
from jaxspeech.models.attention import chunk_mask
from jaxspeech.train import loop
from jaxspeech.train import step as step_lib

CFG = TransducerConfig(
    vocab_size=12,
    d_model=32,
    num_heads=2,
    mlp_dim=48,
    num_layers=2,
    subsampling_channels=4,
    chunk_size=4,
    left_chunks=2,
    predictor_dim=16,
    joint_dim=16,
    arbitrator="acoustic+block",
    arbitrator_dim=8,
    gate_init_bias=0.0,
)
LENGTHS = jnp.array([128, 90])


def _model(**overrides) -> TransformerTransducer:
    fields = {**CFG.__dict__, **overrides}
    return TransformerTransducer(TransducerConfig(**fields), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def feats():
    return jax.random.normal(jax.random.key(1), (2, 128, CFG.num_mels))


def encode(m, feats, lengths=LENGTHS, capacity=None):
    """`m.encode_with_trace` in eval mode, compiled once (eager op-by-op dispatch is slow)."""
    m.eval()
    graphdef, state = nnx.split(m)
    run = lambda s, x, n: nnx.merge(graphdef, s).encode_with_trace(x, n, capacity=capacity)
    return jax.jit(run)(state, feats, lengths)


@pytest.fixture(scope="module")
def model():
    m = _model()
    m.eval()
    return m


@pytest.fixture(scope="module")
def masked(model, feats):
    """(enc, enc_lengths, trace) of the gated model's masked execution."""
    return encode(model, feats)


def test_all_gates_on_is_the_ungated_model_exactly(feats):
    gated, plain = _model(gate_init_bias=50.0), _model(arbitrator="none")
    gated.eval(), plain.eval()
    # Op by op (no jit: XLA may fuse the two programs differently, at the last bit).
    x, lengths = plain.subsampling(plain._normalize(feats, LENGTHS), LENGTHS)
    enc, trace = gated.encoder.forward(x, lengths)
    valid = np.arange(enc.shape[1])[None] < np.asarray(lengths)[:, None]
    assert np.all(np.asarray(trace.attn)[:, valid] == 1) and np.all(np.asarray(trace.ffn) <= 1)
    # (padded frames differ by design: their gates are 0)
    np.testing.assert_array_equal(enc[valid], plain.encoder(x, lengths)[valid])


def test_all_gates_off_is_residual_pass_through(feats):
    m = _model(gate_init_bias=-50.0)
    enc, enc_lengths, trace = encode(m, feats)
    assert float(jnp.max(trace.attn)) == 0 and float(jnp.max(trace.ffn)) == 0
    x, _ = m.subsampling(m._normalize(feats, LENGTHS), LENGTHS)
    valid = (jnp.arange(x.shape[1])[None] < enc_lengths[:, None])[..., None]
    np.testing.assert_allclose(enc, jnp.where(valid, m.encoder.norm(x), 0.0), atol=1e-6)
    # ... and costs only the arbitrator
    f = flops.encoder_flops(m.cfg, enc_lengths, x.shape[1], trace.attn, trace.ffn)
    np.testing.assert_allclose(f["gated"], f["arbitrator"])


def test_gathered_execution_equals_masked_and_counts_overflow(model, feats, masked):
    enc, _, trace = masked
    on = np.asarray(trace.attn > 0.5), np.asarray(trace.ffn > 0.5)
    assert 0.2 < on[0].mean() < 0.8  # a real mixture of on and off frames (bias 0)
    t = enc.shape[1]
    gathered, _, gtrace = encode(model, feats, capacity=t)
    np.testing.assert_allclose(gathered, enc, atol=1e-5)
    assert np.all(np.asarray(gtrace.dropped) == 0)
    np.testing.assert_array_equal(gtrace.attn, trace.attn)
    # A capacity below the busiest layer's active count drops frames and says how many. (The
    # arbitrator reads each block's input, so later layers' gates may change once frames drop:
    # compare the first layer's count, which does not depend on earlier drops.)
    k = int(min(on[0][0].sum(1).min(), on[1][0].sum(1).min())) - 2
    _, _, small = encode(model, feats, capacity=k)
    first_layer = sum(np.maximum(o[0].sum(1) - k, 0) for o in on)
    assert np.all(np.asarray(small.dropped) >= first_layer) and np.all(first_layer > 0)


def stream(model, feats, skip):
    """The encoder output of `model.encode_step` fed chunk by chunk."""
    n = model.feat_chunk_size
    step = nnx.jit(lambda m, s, f, lens: m.encode_step(s, f, lens, skip=skip))
    state, outs = model.encode_init_state(2), []
    for i in range(feats.shape[1] // n):
        lens = jnp.clip(LENGTHS - i * n, 0, n).astype(jnp.int32)
        state, out = step(model, state, feats[:, i * n : (i + 1) * n], lens)
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


def test_skipping_streaming_equals_masked_streaming_and_offline(model, feats, masked):
    offline, enc_lengths, _ = masked
    skipped, masked = stream(model, feats, True), stream(model, feats, False)
    valid = (jnp.arange(offline.shape[1])[None] < enc_lengths[:, None])[..., None]
    np.testing.assert_allclose(jnp.where(valid, skipped, 0), jnp.where(valid, masked, 0), atol=1e-5)
    np.testing.assert_allclose(jnp.where(valid, skipped, 0), offline, atol=1e-5)


def test_active_slots_are_the_stable_order_of_active_then_inactive_frames():
    from jaxspeech.models.gathering import active_slots

    rng = np.random.default_rng(0)
    for t, p in ((8, 0.3), (8, 1.0), (33, 0.0), (33, 0.6)):
        on = rng.random((3, t)) < p
        for k in (0, 1, t // 2, t):
            slots = active_slots(jnp.asarray(on), k)
            idx = np.argsort(~on, axis=1, kind="stable")[:, :k]
            np.testing.assert_array_equal(slots.idx, idx)
            np.testing.assert_array_equal(slots.filled, np.arange(k)[None] < on.sum(1)[:, None])
            np.testing.assert_array_equal(slots.dropped, np.maximum(on.sum(1) - k, 0))
            of_frame = np.full(on.shape, k)  # the inverse of idx on the filled slots
            for b, j in zip(*np.nonzero(np.asarray(slots.filled)), strict=True):
                of_frame[b, idx[b, j]] = j
            np.testing.assert_array_equal(slots.of_frame, of_frame)


def test_skipping_step_equals_masked_step_at_every_active_count(model):
    """One block's skipping step against its masked step, on random on/off patterns of every
    active count of a 2-stream chunk: each capacity's branch (0: nothing run, gathered, the full
    one: masked), per component and with one switch for the whole block (`whole`, equal gates).
    Outputs and caches (keys/values of the valid frames, validity) agree."""
    block, c, b, size = model.encoder.blocks[0], model.cfg.chunk_size, 2, 8
    heads, dim = model.cfg.num_heads, model.cfg.d_model
    k0, k1, k2 = jax.random.split(jax.random.key(4), 3)
    shape = (b, size, heads, dim // heads)
    cache = (jax.random.normal(k0, shape), jax.random.normal(k1, shape), jnp.ones((b, size), bool))
    state = (cache, jnp.zeros((b, 0, dim)))
    x = jax.random.normal(k2, (b, c, dim))
    positions = jnp.arange(size, size + c, dtype=jnp.int32)
    mask = jnp.ones((b, 1, 1, size + c), bool)
    capacities = model.encoder.stream_capacities(b)

    def step(ga, gf, whole):
        caps = dict(capacities=capacities, whole=whole)
        return block.step(state, x, positions, mask, attn_gate=ga, ffn_gate=gf, **caps)

    skipping = jax.jit(step, static_argnums=2)
    masked = jax.jit(
        lambda ga, gf: block.step(state, x, positions, mask, attn_gate=ga, ffn_gate=gf)
    )
    rng = np.random.default_rng(0)

    def pattern(count):
        on = np.zeros(b * c, np.float32)
        on[rng.permutation(b * c)[:count]] = 1
        return jnp.asarray(on.reshape(b, c))

    def check(got, want):
        (cache_got, _), y_got = got
        (cache_want, _), y_want = want
        np.testing.assert_allclose(y_got, y_want, atol=1e-5)
        np.testing.assert_array_equal(cache_got[2], cache_want[2])
        for a, w in zip(cache_got[:2], cache_want[:2], strict=True):
            valid = np.asarray(cache_want[2])[..., None, None]
            np.testing.assert_allclose(np.where(valid, a, 0), np.where(valid, w, 0), atol=1e-5)

    for count in range(b * c + 1):
        ga, gf = pattern(count), pattern(b * c - count)
        check(skipping(ga, gf, False), masked(ga, gf))
        check(skipping(ga, ga, True), masked(ga, ga))


def test_stream_capacities_hold_any_count_with_bounded_waste(model):
    c = model.cfg.chunk_size
    for batch in (1, 2, 16):
        sizes = np.array(model.encoder.stream_capacities(batch))
        full = batch * c
        assert sizes[0] == 0 and sizes[-1] == full and np.all(np.diff(sizes) > 0)
        for count in range(full + 1):  # the branch `_step_skipping` takes for `count` frames
            size = sizes[np.searchsorted(sizes, count)]
            assert count <= size <= max(2 * count, count + max(c, full // 8))


@pytest.mark.parametrize("ffn_per_frame", [False, True])
def test_per_chunk_gates_decide_once_per_chunk_and_stream_exactly(feats, ffn_per_frame):
    """`gate_per_chunk`: one decision per chunk; with `ffn_per_frame`, for attention only."""
    m = _model(gate_per_chunk=True, ffn_per_frame=ffn_per_frame)
    m.eval()
    c = m.cfg.chunk_size
    # Brute force: a frame's gate is 1[mean logit of its chunk's valid frames > 0]; with
    # ffn_per_frame the feed-forward gate (index 1) is the frame's own 1[logit > 0].
    logits = jax.random.normal(jax.random.key(3), (2, 2, 10))  # [gates, B, T]; T % c != 0
    lengths = np.array([10, 6])
    valid = np.arange(10)[None] < lengths[:, None]
    got = np.asarray(m.encoder.arbitrator.gates(logits, jnp.asarray(valid)))
    pooled = np.zeros(got.shape)
    for b, n in enumerate(lengths):
        for k in range(0, n, c):
            frames = slice(k, min(k + c, n))
            pooled[:, b, frames] = (np.asarray(logits)[:, b, frames].mean(-1) > 0)[:, None]
    want = pooled.copy()
    if ffn_per_frame:
        want[1] = np.where(valid, np.asarray(logits)[1] > 0, 0)
        assert np.any(want[1] != pooled[1])  # the two rules differ on these logits
    np.testing.assert_array_equal(got, want)
    # Training (sampled gates): the attention gate is still one sample per chunk.
    m.train()
    sampled = np.asarray(m.encoder.arbitrator.gates(logits, jnp.asarray(valid)))
    m.eval()
    assert sampled.shape == got.shape
    for b, n in enumerate(lengths):
        for k in range(0, n, c):
            chunk = sampled[:, b, k : min(k + c, n)]
            assert np.all(chunk[0] == chunk[0, 0])
            assert ffn_per_frame or np.all(chunk == chunk[:, :1])
    # Offline: whole chunks on or off (the FFN's per frame with ffn_per_frame), a real mixture;
    # streaming with skipping equals it.
    offline, enc_lengths, trace = encode(m, feats)
    t = offline.shape[1]
    for name in ("attn", "ffn"):
        gates = np.asarray(getattr(trace, name))[:, 0, : t // c * c]
        gates = gates.reshape(m.cfg.num_layers, -1, c)
        per_chunk = bool(np.all(gates == gates[..., :1]))
        assert per_chunk == (name == "attn" or not ffn_per_frame) and 0.2 < gates.mean() < 0.8
    valid = (jnp.arange(t)[None] < enc_lengths[:, None])[..., None]
    np.testing.assert_allclose(jnp.where(valid, stream(m, feats, True), 0), offline, atol=1e-5)


@pytest.mark.parametrize("per_chunk", [False, True])
def test_whole_block_gates_switch_both_components_together(feats, per_chunk):
    """`whole_block_gates`: one decision per layer and frame (or chunk), 1[mean of the two
    logits > 0], for attention and FFN alike; streaming with skipping equals it; the compute
    loss's gradient reaches both logit units, half each."""
    m = _model(whole_block_gates=True, gate_per_chunk=per_chunk)
    m.eval()
    c = m.cfg.chunk_size if per_chunk else 1
    logits = jax.random.normal(jax.random.key(3), (2, 2, 10))  # [gates, B, T]
    lengths = np.array([10, 6])
    valid = np.arange(10)[None] < lengths[:, None]
    got = np.asarray(m.encoder.arbitrator.gates(logits, jnp.asarray(valid)))
    block = np.asarray(logits).mean(0)
    want = np.zeros(got.shape)
    for b, n in enumerate(lengths):
        for k in range(0, n, c):
            frames = slice(k, min(k + c, n))
            want[:, b, frames] = block[b, frames].mean() > 0
    assert np.any((np.asarray(logits)[0] > 0) != (np.asarray(logits)[1] > 0))  # they disagree
    np.testing.assert_array_equal(got, want)
    offline, enc_lengths, trace = encode(m, feats)
    np.testing.assert_array_equal(trace.attn, trace.ffn)
    valid = jnp.arange(offline.shape[1])[None] < enc_lengths[:, None]
    on = np.asarray(trace.attn)[:, np.asarray(valid)]
    assert on.min() == 0 and on.max() == 1  # a real mixture of skipped and run blocks
    valid = valid[..., None]
    np.testing.assert_allclose(jnp.where(valid, stream(m, feats, True), 0), offline, atol=1e-5)

    m.train()
    labels, label_lengths = jnp.array([[1, 2, 3], [4, 5, 0]]), jnp.array([3, 2])
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def compute(p):
        model = nnx.merge(graphdef, p, rest, copy=True)
        return jnp.mean(model.loss_terms(feats, LENGTHS, labels, label_lengths)["compute"])

    kernel = np.asarray(
        jax.jit(jax.grad(compute))(params)["encoder"]["arbitrator"]["logits"]["kernel"]
    )
    attn, ffn = kernel[:, 0::2], kernel[:, 1::2]  # [A, 2 L]: (attention, FFN) per layer
    assert np.all(np.abs(attn).sum(0) > 0)
    np.testing.assert_allclose(attn, ffn, rtol=1e-6)


def test_static_pruning_removes_components_on_every_frame(feats):
    """`static_attention`/`static_ffn` against the blocks run by hand without the pruned
    components; half the components off = half the encoder's FLOPs; skipping stream = offline."""
    m = _model(arbitrator="none", static_attention="01", static_ffn="10")
    enc, enc_lengths, trace = encode(m, feats)
    x, lengths = m.subsampling(m._normalize(feats, LENGTHS), LENGTHS)
    t = x.shape[1]
    first, second = m.encoder.blocks
    x = x + first.ffn(first.ffn_norm(x))  # layer 0: feed-forward only
    mask, positions = m.encoder.attention_mask(lengths, t), jnp.arange(t)
    x = x + second.attn(second.attn_norm(x), mask, positions)  # layer 1: attention only
    valid = np.arange(t)[None] < np.asarray(enc_lengths)[:, None]
    np.testing.assert_allclose(enc[valid], m.encoder.norm(x)[valid], atol=1e-5)
    np.testing.assert_array_equal(trace.attn[0], 0)
    np.testing.assert_array_equal(trace.attn[1], valid)
    np.testing.assert_array_equal(trace.ffn, np.stack([valid, 0 * valid]))
    f = flops.encoder_flops(m.cfg, enc_lengths, t, trace.attn, trace.ffn)
    np.testing.assert_allclose(f["gated"], f["gated_full"] / 2, rtol=1e-6)
    assert m.encoder.gated and not _model(arbitrator="none").encoder.gated
    skipped = stream(m, feats, True)
    np.testing.assert_allclose(jnp.where(valid[..., None], skipped, 0), enc, atol=1e-5)


def test_gated_streaming_refuses_lookahead(feats):
    m = _model(lookahead_chunks=1)
    m.eval()
    with pytest.raises(ValueError, match="lookahead_chunks = 0"):
        m.encode_step(m.encode_init_state(2), feats[:, : m.feat_chunk_size])


def test_compute_loss_gradient_reaches_the_arbitrator(feats):
    m = _model()
    m.train()
    labels, label_lengths = jnp.array([[1, 2, 3], [4, 5, 0]]), jnp.array([3, 2])
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def term(p, r, name):
        model = nnx.merge(graphdef, p, r, copy=True)  # dropout advances its RNG in this trace
        return jnp.mean(model.loss_terms(feats, LENGTHS, labels, label_lengths)[name])

    @jax.jit
    def both(p, r):
        fraction, compute = jax.value_and_grad(term)(p, r, "compute")
        return fraction, compute, jax.grad(term)(p, r, "rnnt")

    fraction, *grads = both(params, rest)
    for name, g in zip(("compute", "rnnt"), grads, strict=True):
        g = g["encoder"]["arbitrator"]
        norms = {k: float(optax_norm(v)) for k, v in g.items() if k != "temperature"}
        assert norms["logits"] > 0 and norms["hidden"] > 0, (name, norms)
    assert 0.2 < float(fraction) < 1.0


def test_compute_ramp_delays_the_compute_loss(feats):
    """train.compute_ramp = (delay, ramp): the compute term's weight is 0 during the delay, then
    rises linearly; the train step's loss sums use the scaled weight and report the raw term."""
    ramp = compute_ramp(3, 4)
    steps = (0, 2, 3, 4, 6, 7, 100)
    np.testing.assert_allclose([ramp(s) for s in steps], [0, 0, 0.25, 0.5, 1, 1, 1])
    np.testing.assert_allclose([compute_ramp(2, 0)(s) for s in (0, 1, 2)], [0, 0, 1])
    with pytest.raises(ValueError, match="compute_ramp"):
        compute_ramp(-1, 10)
    m = _model(compute_weight=50.0, gate_estimator="st", dropout=0.0)
    m.train()  # straight-through gates: a gradient; deterministic: the same gates at every scale
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    batch = {
        "labels": jnp.array([[1, 2, 3], [4, 5, 0]]),
        "label_lengths": jnp.array([3, 2]),
        "audio_lengths": jnp.array([1, 1]),
    }

    @jax.jit
    def sums(p, scale):
        return step_lib._loss_sums(nnx.merge(graphdef, p, rest), batch, feats, LENGTHS, scale)

    def arbitrator_grad(loss):
        g = jax.grad(loss)(params)["encoder"]["arbitrator"]
        g = {k: v for k, v in g.items() if k != "temperature"}
        return np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)])

    (off, _, _, t_off), (half, _, _, t_half) = sums(params, 0.0), sums(params, 0.5)
    assert float(t_off["compute"]) > 0 and t_off["compute"] == t_half["compute"]  # raw term
    np.testing.assert_allclose(off, t_off["rnnt"], rtol=1e-6)
    np.testing.assert_allclose(half, t_off["rnnt"] + 25.0 * t_off["compute"], rtol=1e-5)
    g_rnnt = arbitrator_grad(lambda p: sums(p, 0.0)[3]["rnnt"])
    g_off, g_on = (arbitrator_grad(lambda p, s=s: sums(p, s)[0]) for s in (0.0, 1.0))
    np.testing.assert_allclose(g_off, g_rnnt, rtol=1e-5, atol=1e-6)  # the compute term held off
    assert np.linalg.norm(g_on - g_off) > 0.1 * np.linalg.norm(g_off)
    assert loop._compute_ramp(m.cfg, {"compute_ramp": (0, 0)}) is None  # the default: no ramp
    assert float(loop._compute_ramp(m.cfg, {"compute_ramp": (3, 4)})(4)) == 0.5


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_gate_estimators():
    logits = jnp.linspace(-3.0, 3.0, 13)
    key = jax.random.key(0)
    for estimator in ("gumbel_st", "st"):
        g = relaxed_gates(logits, estimator, 0.5, key)
        assert set(np.unique(np.asarray(g))) <= {0.0, 1.0}
    # Deterministic straight-through: forward 1[l > 0], gradient of sigmoid(l / tau).
    g = relaxed_gates(logits, "st", 0.5, None)
    np.testing.assert_array_equal(g, (logits > 0).astype(jnp.float32))
    grad = jax.grad(lambda x: jnp.sum(relaxed_gates(x, "st", 0.5, None)))(logits)
    s = jax.nn.sigmoid(logits / 0.5)
    np.testing.assert_allclose(grad, s * (1 - s) / 0.5, rtol=1e-5)
    # Gumbel-sigmoid: the on-rate of many samples is sigmoid(logit).
    many = relaxed_gates(jnp.full((20000,), 1.0), "gumbel_st", 1.0, key)
    assert abs(float(many.mean()) - float(jax.nn.sigmoid(1.0))) < 0.015
    soft = relaxed_gates(logits, "gumbel_soft", 1.0, key)
    assert 0 < float(soft.min()) and float(soft.max()) < 1
    with pytest.raises(ValueError, match="gate_estimator"):
        relaxed_gates(logits, "reinforce", 1.0, key)
    tau = temperature_schedule(1.0, 0.25, 100)
    np.testing.assert_allclose([tau(0), tau(50), tau(100), tau(500)], [1.0, 0.5, 0.25, 0.25])


def test_flop_counter_matches_a_brute_force_count(model, masked):
    """Executed FLOPs by brute force, and the compute loss with attention priced 1x and 3x."""
    _, enc_lengths, trace = masked
    t = trace.attn.shape[-1]
    f = flops.encoder_flops(model.cfg, enc_lengths, t, trace.attn, trace.ffn)
    d, m, a, n = CFG.d_model, CFG.mlp_dim, CFG.arbitrator_dim, CFG.num_layers
    attn, ffn = np.asarray(trace.attn) > 0.5, np.asarray(trace.ffn) > 0.5

    def attention(layer_on, b, q, frames):
        keys = [
            k
            for k in range(frames)
            if layer_on[b, k] and 0 <= q // CFG.chunk_size - k // CFG.chunk_size <= CFG.left_chunks
        ]
        return 4 * 2 * d * d + 2 * 2 * d * len(keys)

    for b in range(2):
        frames = int(enc_lengths[b])
        arb = frames * (2 * d * a + 2 * a * 2 * n + n * 2 * d * 2)  # arbitrator, every frame
        cost = {"attn": 0, "ffn": 0, "attn_full": 0, "ffn_full": 0}
        everywhere = np.ones_like(attn[0])
        for layer in range(n):
            for q in range(frames):
                cost["ffn_full"] += 2 * d * m + 2 * m * d
                cost["ffn"] += (2 * d * m + 2 * m * d) * ffn[layer, b, q]
                cost["attn_full"] += attention(everywhere, b, q, frames)
                if attn[layer, b, q]:
                    cost["attn"] += attention(attn[layer], b, q, frames)
        total = arb + cost["attn"] + cost["ffn"]
        assert float(f["gated"][b]) == pytest.approx(total, rel=1e-6)
        hard = (jnp.asarray(attn, jnp.float32), jnp.asarray(ffn, jnp.float32))
        for price in (1.0, 3.0):
            cfg = dataclasses.replace(model.cfg, attention_cost=price)
            want = (price * cost["attn"] + cost["ffn"] + arb) / (
                price * cost["attn_full"] + cost["ffn_full"]
            )
            got = flops.compute_fraction(cfg, enc_lengths, *hard)[b]
            assert float(got) == pytest.approx(want, rel=1e-6)


def test_chunk_priced_compute_is_the_per_frame_count_of_whole_chunks():
    """`price_per_chunk`: the compute loss on per-frame gates equals the per-frame loss on the
    gates of an OR over each chunk's valid frames (built by loops here); the gradient of a chunk
    with every frame on is split equally (each frame pays the per-frame price), and a chunk's
    last frame on carries the whole chunk's price."""
    cfg = dataclasses.replace(CFG, price_per_chunk=True)
    per_frame = dataclasses.replace(CFG, price_per_chunk=False)
    n, t, c = cfg.num_layers, 30, cfg.chunk_size
    lengths = jnp.array([30, 17])  # 17: a partial last chunk; frames 17-29 of row 1 are padding
    rng = np.random.default_rng(0)
    attn = (rng.random((n, 2, t)) < 0.3).astype(np.float32)
    ffn = (rng.random((n, 2, t)) < 0.2).astype(np.float32)
    ffn[:, 1, 17:] = 1.0  # padding gates are ignored
    want = []
    for g in (attn, ffn):
        ored = np.zeros_like(g)
        for layer, b, k in np.ndindex(n, 2, -(-t // c)):
            frames = range(k * c, min((k + 1) * c, int(lengths[b])))
            if any(g[layer, b, f] for f in frames):
                ored[layer, b, list(frames)] = 1.0
        want.append(jnp.asarray(ored))
    got = flops.compute_fraction(cfg, lengths, jnp.asarray(attn), jnp.asarray(ffn))
    ref = flops.compute_fraction(per_frame, lengths, *want)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6)
    assert bool(jnp.all(got > flops.compute_fraction(per_frame, lengths, attn, ffn)))

    def ffn_cost(cfg, g):
        return flops.compute_fraction(cfg, lengths, jnp.zeros_like(g), g)[0]

    g = np.zeros((n, 2, t), np.float32)
    g[0, 0, 0:c] = 1.0  # chunk 0 of layer 0: every frame on
    g[0, 0, c + 1] = 1.0  # chunk 1: one frame on
    grad = np.asarray(jax.grad(ffn_cost, argnums=1)(cfg, jnp.asarray(g)))
    price = float(jax.grad(ffn_cost, argnums=1)(per_frame, jnp.asarray(g))[0, 0, 0])
    np.testing.assert_allclose(grad[0, 0, :c], price, rtol=1e-6)
    np.testing.assert_allclose(grad[0, 0, c + 1], c * price, rtol=1e-6)
    assert float(jnp.sum(jnp.abs(grad[0, 0, c : 2 * c]))) == pytest.approx(c * price, rel=1e-6)


def test_chunk_price_share_pays_part_per_chunk_and_part_per_frame():
    """`chunk_price_share` S: a feed-forward network on k of a full chunk's frames costs
    S + (1 - S) k / chunk of the chunk's price (brute force over k), the per-frame price at S = 0
    and the whole-chunk price at S = 1."""
    c, t = CFG.chunk_size, 2 * CFG.chunk_size
    lengths = jnp.array([t])

    def cost(cfg, k, frames=slice(c, None)):  # layer 0's FFN on the first k of `frames`
        ffn = np.zeros((CFG.num_layers, 1, t), np.float32)
        ffn[0, 0, frames][:k] = 1.0
        return float(flops.compute_fraction(cfg, lengths, jnp.zeros_like(ffn), ffn)[0])

    per_frame = dataclasses.replace(CFG, price_per_chunk=False)
    arbitrator = cost(per_frame, 0)  # the arbitrator's own FLOPs, always paid
    chunk_price = (cost(per_frame, t, slice(None)) - arbitrator) / 2  # one chunk of one FFN
    assert chunk_price > 0
    for share in (0.0, 0.4, 1.0):
        cfg = dataclasses.replace(CFG, price_per_chunk=True, chunk_price_share=share)
        for k in range(c + 1):
            want = chunk_price * ((share + (1 - share) * k / c) if k else 0.0)
            assert cost(cfg, k) - arbitrator == pytest.approx(want, rel=1e-5, abs=1e-9)
    with pytest.raises(ValueError, match="set model.price_per_chunk = True"):
        dataclasses.replace(CFG, chunk_price_share=0.5)
    with pytest.raises(ValueError, match=r"chunk_price_share must lie in \[0, 1\]"):
        dataclasses.replace(CFG, price_per_chunk=True, chunk_price_share=1.5)


def test_full_flop_count_matches_xla_cost_analysis():
    """The analytic count of the ungated encoder against XLA's count of the compiled blocks
    (full context, so XLA's dense T x T attention is exactly the counted work; XLA also counts
    elementwise work, which the analytic count leaves out by design: within 5%)."""
    cfg = TransducerConfig(
        vocab_size=8, d_model=128, num_heads=2, mlp_dim=512, num_layers=2, chunk_size=4,
        left_chunks=-1, lookahead_chunks=16, subsampling_channels=4,
    )  # fmt: skip
    m = TransformerTransducer(cfg, rngs=nnx.Rngs(0))
    m.eval()
    x = jnp.ones((1, 64, 128))
    lengths = jnp.array([64])
    graphdef, state = nnx.split(m.encoder)
    blocks = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x, lengths)[0])
    cost = blocks.lower(state, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    assert bool(jnp.all(chunk_mask(64, 4, -1, 16)))
    counted = flops.encoder_flops(cfg, lengths, 64)["gated_full"]
    assert float(counted[0]) == pytest.approx(float(cost["flops"]), rel=0.05)


def test_subsampling_flops_by_hand():
    # 80 mels, 2 layers of 4 channels: layer 1 makes 2 frames x 40 bins x 4 ch x 9 taps x 1 in,
    # layer 2 makes 1 frame x 20 bins x 4 ch x 9 taps x 4 in, projection 80 -> 32.
    expected = 2 * (2 * 40 * 4 * 9 * 1) + 2 * (20 * 4 * 9 * 4) + 2 * 80 * 32
    assert flops.subsampling_flops_per_frame(CFG) == expected


def test_config_validation():
    with pytest.raises(ValueError, match="arbitrator must be"):
        _model(arbitrator="oracle")
    with pytest.raises(ValueError, match="gate_estimator"):
        _model(gate_estimator="reinforce")
    with pytest.raises(ValueError, match="static_ffn must be '' or 2 characters"):
        _model(arbitrator="none", static_ffn="011")
    with pytest.raises(ValueError, match="needs arbitrator 'none'"):
        _model(static_attention="01")
    with pytest.raises(ValueError, match="attention_cost > 0"):
        _model(attention_cost=0.0)
    with pytest.raises(ValueError, match="set model.gate_per_chunk = True"):
        _model(ffn_per_frame=True)
    with pytest.raises(ValueError, match="price_per_chunk prices the arbitrators"):
        _model(arbitrator="none", price_per_chunk=True)
    with pytest.raises(ValueError, match="whole_block_gates ties"):
        _model(arbitrator="none", whole_block_gates=True)
    with pytest.raises(ValueError, match="set only one of them"):
        _model(whole_block_gates=True, gate_per_chunk=True, ffn_per_frame=True)


def test_hard_gate_phase_trains_with_the_inference_gates(feats):
    """train.hard_gate_steps = N: temperature 0 for the last N steps, where every estimator gives
    the inference gates 1[l > 0] (no noise, no gradient), so a training pass runs exactly the
    components the test runs and the loss has no gradient on the arbitrator."""
    tc = ml_collections.ConfigDict(
        {"num_steps": 10, "gate_temperature": (1.0, 0.5), "hard_gate_steps": 4}
    )
    tau = loop._gate_temperature(CFG, tc)
    assert float(tau(5)) > 0.5 and float(tau(6)) == 0.0 and float(tau(9)) == 0.0
    tc.hard_gate_steps = 11
    with pytest.raises(ValueError, match="hard_gate_steps"):
        loop._gate_temperature(CFG, tc)
    logits = jnp.linspace(-3.0, 3.0, 41)
    for estimator in ("gumbel_st", "st", "gumbel_soft"):
        grad = jax.grad(
            lambda x, e=estimator: jnp.sum(relaxed_gates(x, e, 0.0, jax.random.key(3)) * x)
        )(logits)
        np.testing.assert_array_equal(
            relaxed_gates(logits, estimator, 0.0, jax.random.key(3)), logits > 0
        )
        np.testing.assert_array_equal(grad, (logits > 0).astype(jnp.float32))  # only via "* x"
    m = _model(compute_weight=50.0, dropout=0.0)
    labels, label_lengths = jnp.array([[1, 2, 3], [4, 5, 0]]), jnp.array([3, 2])
    m.eval()
    _, _, test_gates = encode(m, feats)
    m.train()
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    rest = step_lib._with_temperature(rest, lambda step: 0.0, 0)

    @jax.jit
    def run(p, r):
        def loss(p):
            model = nnx.merge(graphdef, p, r, copy=True)
            terms = model.loss_terms(feats, LENGTHS, labels, label_lengths)
            return jnp.mean(terms["rnnt"] + 50.0 * terms["compute"])

        model = nnx.merge(graphdef, p, r, copy=True)
        return model.encode_with_trace(feats, LENGTHS)[2], jax.grad(loss)(p)

    train_gates, grads = run(params, rest)
    np.testing.assert_array_equal(train_gates.attn, test_gates.attn)
    np.testing.assert_array_equal(train_gates.ffn, test_gates.ffn)
    assert 0 < float(jnp.mean(test_gates.ffn)) < 1  # the gates differ by frame: a real check
    g = grads["encoder"]["arbitrator"]
    assert float(optax_norm({k: v for k, v in g.items() if k != "temperature"})) == 0.0
    assert float(optax_norm(grads["encoder"]["blocks"])) > 0  # the encoder still trains
