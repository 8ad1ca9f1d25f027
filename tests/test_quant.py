"""jaxspeech.quant: quantizer levels and STE, squash functions, regularizer, QAT tree transform."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxspeech.quant import qat
from jaxspeech.quant import squash as sq
from jaxspeech.quant.fake_quant import channel_max_abs, dequantize, fake_quant, levels, quantize


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_exactly_2_pow_bits_symmetric_midrise_levels(bits):
    w = jnp.linspace(-1.0, 1.0, 20001)[:, None] * jnp.array([[1.0, 0.25]])  # 2 channels
    q = np.asarray(fake_quant(w, bits))
    for c, s in enumerate([1.0, 0.25]):
        got = np.unique(q[:, c])
        assert got.size == 2**bits
        np.testing.assert_array_equal(got, np.asarray(levels(bits, s)))
        np.testing.assert_allclose(got, -got[::-1], rtol=0, atol=1e-7)  # symmetric, no zero
        assert np.all(got != 0)
        np.testing.assert_allclose(np.diff(got), 2 * s / 2**bits, rtol=1e-5)
        assert got.max() == pytest.approx(s - s / 2**bits)
    # a uniform input fills every bin equally
    mid = (jnp.arange(4096.0) + 0.5) / 2048 - 1  # bin-aligned uniform grid on (-1, 1)
    codes = np.asarray(quantize(mid, bits, jnp.float32(1.0)))
    np.testing.assert_array_equal(np.bincount(codes, minlength=2**bits), 4096 // 2**bits)


def test_fake_quant_is_dequantize_of_quantize_eager_and_jit():
    w = jax.random.normal(jax.random.key(0), (3, 17, 9))
    ref = dequantize(quantize(w, 3, channel_max_abs(w, (-1,))), 3, channel_max_abs(w, (-1,)))
    np.testing.assert_array_equal(fake_quant(w, 3), ref)
    np.testing.assert_array_equal(jax.jit(fake_quant, static_argnums=1)(w, 3), ref)
    # the scale is per output channel only
    s = channel_max_abs(w, (-1,))
    assert s.shape == (1, 1, 9)
    np.testing.assert_allclose(s.ravel(), np.abs(np.asarray(w)).max(axis=(0, 1)))
    assert channel_max_abs(w, (-2, -1)).shape == (1, 17, 9)


def test_straight_through_gradient():
    w = jax.random.normal(jax.random.key(1), (64, 8))
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, 2)))(w)
    np.testing.assert_array_equal(g, np.ones_like(g))  # default scale = max|w|: all inside
    scale = jnp.full((1, 8), 1.0)
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, 2, scale=scale) * 3.0))(w)
    inside = np.abs(np.asarray(w)) <= 1.0
    assert 0 < inside.mean() < 1
    np.testing.assert_array_equal(g, np.where(inside, 3.0, 0.0))
    # outside the clipping range the value saturates at the outer level
    q = fake_quant(jnp.array([[5.0], [-5.0]]), 2, scale=jnp.ones((1, 1)))
    np.testing.assert_array_equal(q.ravel(), [0.75, -0.75])


def _ks_uniform(x):
    """Kolmogorov-Smirnov distance of samples in (-1, 1) from U(-1, 1)."""
    u = np.sort((np.asarray(x, np.float64).ravel() + 1) / 2)
    n = u.size
    return max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))


def test_gaussian_cdf_squash_is_uniform_tanh_less_so():
    theta = jax.random.normal(jax.random.key(2), (200_000,))
    ks_cdf = _ks_uniform(sq.squash_fn(theta, "cdf"))
    ks_cdf_s = _ks_uniform(sq.squash_fn(0.3 * theta, "cdf", sigma=0.3))
    var = sq.default_target_var("tanh")
    ks_tanh = _ks_uniform(sq.squash_fn(math.sqrt(var) * theta, "tanh"))
    ks_tanh_1 = _ks_uniform(sq.squash_fn(theta, "tanh"))
    assert ks_cdf < 0.006 and ks_cdf_s < 0.006  # ~1.36/sqrt(n) = 0.003 at 5%
    assert ks_tanh > 5 * ks_cdf and ks_tanh_1 > 5 * ks_cdf
    assert ks_tanh < ks_tanh_1  # the pi^2/12 target is the better variance for tanh


@pytest.mark.parametrize("squash", ["tanh", "cdf"])
def test_inverse_transform_warm_start(squash):
    w = 0.05 * jax.random.normal(jax.random.key(3), (128, 16))
    a = sq.init_amplitude(w, "max")
    theta = sq.init_theta(w, a, squash, sigma=0.7)
    back = sq.reparameterize(theta, a, squash, sigma=0.7)
    # exact except for the clip at |w/a| <= 1 - eps (the per-channel max elements)
    np.testing.assert_allclose(back, w, rtol=0, atol=1.01e-3 * float(a.max()))
    assert np.all(np.isfinite(np.asarray(sq.init_theta(w, 0.5 * a, squash))))
    a_std = sq.init_amplitude(w, "std")
    np.testing.assert_allclose(a_std.ravel(), math.sqrt(3) * np.std(np.asarray(w), 0), rtol=1e-5)


def test_regularizer_gradient_pulls_mean_and_var_to_targets():
    theta0 = 3.0 + 0.2 * jax.random.normal(jax.random.key(4), (4096,))
    mu, s2 = -0.5, 0.8
    grad = jax.grad(sq.moment_penalty)(theta0, mu, s2)
    assert float(jnp.mean(grad)) > 0  # descent lowers the mean toward mu
    theta = theta0
    step = jax.jit(lambda t: t - 0.2 * jax.grad(sq.moment_penalty)(t, mu, s2) * t.size)
    for _ in range(300):
        theta = step(theta)
    assert float(jnp.mean(theta)) == pytest.approx(mu, abs=1e-3)
    assert float(jnp.var(theta)) == pytest.approx(s2, abs=1e-2)


def _tree(key):
    k = jax.random.split(key, 5)
    return {
        "encoder": {
            "layers": [
                {"mlp": {"kernel": 0.1 * jax.random.normal(k[i], (16, 32)), "bias": jnp.zeros(32)}}
                for i in range(2)
            ],
            "norm": {"scale": jnp.ones(16)},
        },
        "predictor": {
            "embed": {"embedding": jax.random.normal(k[2], (11, 16))},
            "conv": {"kernel": jax.random.normal(k[3], (3, 16, 16))},
        },
        "joint": {"out": {"kernel": jax.random.normal(k[4], (16, 11))}},
    }


RULES = (
    qat.QuantRule(r"embed", None),
    qat.QuantRule(r"joint", 3, "identity"),
    qat.QuantRule(r"conv/kernel$", 4, "cdf", sigma=0.5, learn_scale=False),
    qat.QuantRule(r"kernel$", 2, "tanh", warmup_steps=5),
)


def test_rules_select_kernels_only():
    params = _tree(jax.random.key(5))
    sel = qat.selected(params, RULES)
    assert {p: r.bits for p, r in sel.items()} == {
        "encoder/layers/0/mlp/kernel": 2,
        "encoder/layers/1/mlp/kernel": 2,
        "predictor/conv/kernel": 4,
        "joint/out/kernel": 3,
    }
    assert set(qat.selected(params, qat.default_rules(4))) == set(sel)
    with pytest.raises(ValueError, match="bits"):
        qat.QuantRule("kernel", 9)
    assert qat.QuantRule("kernel", 2, channel_axes=-1).channel_axes == (-1,)


def test_qat_apply_warmup_in_one_program_and_gradients():
    params = _tree(jax.random.key(6))
    qp = qat.qat_init(params, RULES)
    assert set(qp.amplitudes) == {
        "encoder/layers/0/mlp/kernel",
        "encoder/layers/1/mlp/kernel",
        "predictor/conv/kernel",
    }
    apply = jax.jit(qat.qat_apply, static_argnums=1)
    before, after = apply(qp, RULES, jnp.int32(4)), apply(qp, RULES, jnp.int32(5))
    assert apply._cache_size() == 1  # the traced step: one compiled program
    k = "encoder", "layers", 0, "mlp", "kernel"

    def get(t):
        return t[k[0]][k[1]][k[2]][k[3]][k[4]]

    assert np.unique(np.asarray(get(before))).size > 100  # float during warm-up
    np.testing.assert_allclose(get(before), get(params), atol=1e-3 * 0.5)
    a0 = qp.amplitudes["encoder/layers/0/mlp/kernel"][0, 0]
    assert set(np.unique(np.asarray(get(after))[:, 0])) <= set(np.asarray(levels(2, a0)))
    assert np.unique(np.asarray(after["predictor"]["conv"]["kernel"])[:, :, 0]).size <= 16
    for t in (before, after):  # float leaves untouched
        np.testing.assert_array_equal(
            t["predictor"]["embed"]["embedding"], params["predictor"]["embed"]["embedding"]
        )
        np.testing.assert_array_equal(
            t["encoder"]["norm"]["scale"], params["encoder"]["norm"]["scale"]
        )

    def loss(qp):
        p = qat.qat_apply(qp, RULES, 10)
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))

    g = jax.grad(loss)(qp)
    assert float(jnp.abs(get(g.params)).min()) > 0  # STE reaches theta
    assert float(jnp.abs(g.amplitudes["encoder/layers/0/mlp/kernel"]).min()) > 0  # learned a
    np.testing.assert_array_equal(g.amplitudes["predictor/conv/kernel"], 0)  # frozen a
    assert float(jnp.abs(g.params["joint"]["out"]["kernel"]).min()) > 0


def test_bin_occupancy_entropy():
    u = jax.random.uniform(jax.random.key(7), (4096, 4), minval=-1, maxval=1)
    g = jax.random.normal(jax.random.key(7), (4096, 4))
    for bits in (2, 3, 4):
        h_u = float(qat.bin_occupancy_entropy(u, bits, scale=jnp.ones((1, 4))))
        h_g = float(qat.bin_occupancy_entropy(g, bits))
        assert bits - 0.01 < h_u <= bits + 1e-6
        assert h_g < bits - 0.2
    assert float(qat.bin_occupancy_entropy(jnp.full((8, 2), 0.5), 3)) == 0.0


def _train_toy(squash, bits=2, steps=300, reg=1.0, seed=0):
    """Least squares y = x W with a fake-quantized 32x32 W, Adam, from a Gaussian init."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (256, 32))
    y = x @ (jax.random.normal(k2, (32, 32)) / math.sqrt(32))
    rules = (qat.QuantRule("kernel", bits, squash),)
    qp = qat.qat_init({"dense": {"kernel": jax.random.normal(k3, (32, 32)) / math.sqrt(32)}}, rules)
    opt = optax.adam(1e-2)

    def mse(qp):
        return jnp.mean((x @ qat.qat_apply(qp, rules, 0)["dense"]["kernel"] - y) ** 2)

    @jax.jit
    def step(qp, state):
        g = jax.grad(lambda p: mse(p) + qat.qat_regularizer(p, rules, reg))(qp)
        updates, state = opt.update(g, state, qp)
        return optax.apply_updates(qp, updates), state

    mse0, state = float(mse(qp)), opt.init(qp)
    for _ in range(steps):
        qp, state = step(qp, state)
    return qat.kernel_entropies(qp, rules)["dense/kernel"], float(mse(qp)), mse0


def test_squashed_training_fills_quantization_bins():
    """The issue's required check: after QAT, squashed weights use the 2-bit levels more evenly
    (bin-occupancy entropy nearer 2 bits) than plain QAT weights trained identically."""
    h_plain, mse_plain, mse0 = _train_toy("identity")
    h_tanh, mse_tanh, _ = _train_toy("tanh")
    h_cdf, mse_cdf, _ = _train_toy("cdf")
    assert h_plain < 1.8 and h_tanh > 1.9 and h_cdf > 1.9
    assert h_tanh > h_plain + 0.15 and h_cdf > h_plain + 0.15
    for m in (mse_plain, mse_tanh, mse_cdf):  # all actually fit the regression
        assert m < 0.5 * mse0
    assert max(mse_tanh, mse_cdf) < 1.2 * mse_plain


class _TinyNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 11, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = x + jnp.tanh(b(x))
        return self.out(self.norm(x))


def test_qat_on_nnx_state_train_step():
    model = _TinyNet(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rules = qat.default_rules(bits=2, squash="tanh")
    assert set(qat.selected(params, rules)) == {"blocks/0/kernel", "blocks/1/kernel", "out/kernel"}
    qp = qat.qat_init(params, rules)
    tokens = jnp.arange(12).reshape(2, 6) % 11
    opt = optax.adam(1e-2)
    state = opt.init(qp)

    @jax.jit
    def train_step(qp, state, step):
        def loss_fn(qp):
            m = nnx.merge(graphdef, qat.qat_apply(qp, rules, step))
            logp = jax.nn.log_softmax(m(tokens))
            nll = -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1))
            return nll + qat.qat_regularizer(qp, rules, 0.1)

        loss, g = jax.value_and_grad(loss_fn)(qp)
        updates, state = opt.update(g, state, qp)
        return optax.apply_updates(qp, updates), state, loss

    losses = []
    for i in range(30):
        qp, state, loss = train_step(qp, state, i)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    eff = nnx.merge(graphdef, qat.qat_apply(qp, rules, 30))
    assert np.unique(np.asarray(eff.out.kernel[...])[:, 3]).size <= 4
    np.testing.assert_array_equal(eff.embed.embedding[...], qp.params["embed"]["embedding"][...])
    assert not np.array_equal(eff.embed.embedding[...], model.embed.embedding[...])  # trained


@pytest.mark.slow  # compiles a transducer loss and its gradient (~30 s on 2 loaded cores)
def test_qat_on_transformer_transducer_forward_grad_and_export(tmp_path):
    from jaxspeech.models import TransducerConfig, TransformerTransducer
    from jaxspeech.quant.export import export_quantized, load_quantized

    cfg = TransducerConfig(
        num_mels=16,
        vocab_size=11,
        d_model=32,
        num_heads=2,
        mlp_dim=64,
        num_layers=2,
        subsampling_channels=4,
        chunk_size=2,
        left_chunks=2,
        predictor_dim=24,
        joint_dim=20,
        dropout=0.0,
    )
    model = TransformerTransducer(cfg, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rules = qat.default_rules(bits=2, squash="tanh", warmup_steps=1)
    sel = qat.selected(params, rules)
    assert sel["encoder/blocks/0/attn/query/kernel"].channel_axes == (-2, -1)
    assert "encoder/blocks/1/ffn/up/kernel" in sel and "joint/out/kernel" in sel
    assert not any("embed" in p or "norm" in p or p.endswith("bias") for p in sel)
    qp = qat.qat_init(params, rules)
    feats = jax.random.normal(jax.random.key(1), (2, 24, 16))
    batch = (feats, jnp.array([24, 17]), jnp.array([[1, 2, 3], [4, 5, 0]]), jnp.array([3, 2]))

    @jax.jit
    def loss_fn(p):
        return nnx.merge(graphdef, p, rest).loss(*batch).mean()

    @jax.jit
    @jax.value_and_grad
    def qat_loss(qp, step):
        return loss_fn(qat.qat_apply(qp, rules, step)) + qat.qat_regularizer(qp, rules, 0.01)

    loss, g = qat_loss(qp, jnp.int32(1))
    gq = g.params["encoder"]["blocks"][0]["attn"]["query"]["kernel"][...]
    assert np.isfinite(loss) and np.all(np.isfinite(gq)) and float(jnp.abs(gq).max()) > 0
    apply = jax.jit(qat.qat_apply, static_argnums=1)
    eff, eff0 = apply(qp, rules, jnp.int32(1)), apply(qp, rules, jnp.int32(0))
    assert loss_fn(eff) != loss_fn(eff0)  # quantized after the warm-up step only
    np.testing.assert_allclose(loss, loss_fn(eff) + qat.qat_regularizer(qp, rules, 0.01), rtol=1e-5)
    # inference from the artifact gives exactly the QAT model's outputs
    report = export_quantized(qp, rules, tmp_path / "tt.jxq")
    loaded = load_quantized(tmp_path / "tt.jxq", template=params)
    np.testing.assert_array_equal(loss_fn(loaded), loss_fn(eff))
    assert report.kernel_ratio > 10


def test_rules_from_config_per_layer_type():
    from jaxspeech.models import TransducerConfig, TransformerTransducer
    from jaxspeech.train import quantize

    cfg = TransducerConfig(
        num_mels=16, vocab_size=11, d_model=16, num_heads=2, mlp_dim=32, num_layers=1,
        subsampling_channels=4, predictor_dim=8, joint_dim=8, ctc_weight=0.5,
    )  # fmt: skip
    # shapes are all the selection needs (no eager initialization)
    params = nnx.state(
        nnx.eval_shape(lambda: TransformerTransducer(cfg, rngs=nnx.Rngs(0))), nnx.Param
    )
    assert quantize.rules_from_config(quantize.default_config(enabled=False)) is None
    quant = quantize.default_config(enabled=True, bits=3, squash="cdf")
    quant.layer_bits.feed_forward = 0
    quant.layer_bits.joint = 8
    sel = qat.selected(params, quantize.rules_from_config(quant))
    bits = {p: r.bits for p, r in sel.items()}
    assert bits["encoder/blocks/0/attn/query/kernel"] == 3
    assert sel["encoder/blocks/0/attn/query/kernel"].channel_axes == (-2, -1)
    assert sel["encoder/blocks/0/attn/out/kernel"].channel_axes == (-1,)
    assert bits["subsampling/convs/1/kernel"] == bits["predictor/layers/0/input_proj/kernel"] == 3
    assert bits["joint/out/kernel"] == bits["ctc_head/kernel"] == 8
    assert not any("ffn" in p or "embed" in p or "norm" in p or p.endswith("bias") for p in sel)
    assert {r.squash for r in sel.values()} == {"cdf"}
    rules = quantize.rules_from_config(quant)
    # weight decay: not on squashed thetas nor amplitudes; on float matrices as before
    trainable = jax.eval_shape(lambda p: quantize.to_trainable(p, rules), params)
    mask = quantize.decay_mask(trainable, rules)
    flat = {qat.path_str(kp): m for kp, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["theta/encoder/blocks/0/ffn/up/kernel"]  # float here: decayed as in float runs
    assert not flat["theta/encoder/blocks/0/attn/query/kernel"]
    assert not flat["theta/encoder/blocks/0/ffn/up/bias"]
    assert flat["amplitudes/encoder/blocks/0/attn/query/kernel"] is False
    assert set(quantize.as_qat_params(trainable).amplitudes) == set(sel)
    with pytest.raises(ValueError, match="convolutions"):  # a typo'd layer type is an error
        quantize.rules_from_config(quantize.default_config(True, layer_bits={"convolutions": 4}))


def test_activation_fake_quant_per_token():
    from jaxspeech.quant.fake_quant import fake_quant_activations

    x = jax.random.normal(jax.random.key(0), (2, 5, 64)) * jnp.arange(1, 6)[None, :, None]
    q = fake_quant_activations(x, 4)
    for row in np.asarray(q).reshape(-1, 64):  # <= 16 levels per token, each its own scale
        assert np.unique(row).size <= 16
    err = jnp.abs(q - x) / jnp.max(jnp.abs(x), -1, keepdims=True)
    assert float(jnp.max(err)) <= 2.0**-4 * (1 + 1e-5)  # half a step of 2 max / 16
    y = x.at[1].set(100.0 * x[1])  # another batch row changes nothing here
    np.testing.assert_array_equal(fake_quant_activations(y, 4)[0], q[0])
    g = jax.grad(lambda v: jnp.sum(fake_quant_activations(v, 8) * 3.0))(x)
    np.testing.assert_array_equal(g, jnp.full_like(x, 3.0))  # straight-through


def test_model_with_8bit_activations():
    from jaxspeech.models import TransducerConfig, TransformerTransducer, config
    from jaxspeech.quant.fake_quant import fake_quant_activations

    kw = dict(num_mels=16, vocab_size=11, d_model=32, num_heads=2, mlp_dim=64, num_layers=1)
    cfg8 = TransducerConfig(**kw, subsampling_channels=4, activation_bits=8)
    model = nnx.eval_shape(lambda: TransformerTransducer(cfg8, rngs=nnx.Rngs(0)))
    layers = [model.encoder.blocks[0].attn.query, model.encoder.blocks[0].attn.out]
    layers += [model.subsampling.convs[0], model.encoder.blocks[0].ffn.up, model.joint.out]
    assert all(layer.act_bits == 8 for layer in layers)  # every weight matmul's input
    # a layer computes its float self on the fake-quantized input
    cfg0 = TransducerConfig(**kw)
    dense8 = config.dense(32, 16, ("embed", "mlp"), cfg8, rngs=nnx.Rngs(0))
    dense0 = config.dense(32, 16, ("embed", "mlp"), cfg0, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 7, 32))
    np.testing.assert_array_equal(dense8(x), dense0(fake_quant_activations(x, 8)))
    assert not np.array_equal(dense8(x), dense0(x))
    np.testing.assert_allclose(dense8(x), dense0(x), atol=0.05)
    with pytest.raises(ValueError, match="activation_bits"):
        TransducerConfig(vocab_size=11, activation_bits=9)


def test_first_conv_and_lstm_recurrence_quantize_their_inputs():
    """The first conv's input has one channel: its scale spans each frame's frequencies and
    channels (a per-channel scale would give every value its own, quantizing nothing). The LSTM's
    recurrent matmul quantizes h as its `recurrent_proj` says."""
    from jaxspeech.models import TransducerConfig, TransformerTransducer
    from jaxspeech.quant.fake_quant import fake_quant_activations

    kw = dict(num_mels=16, vocab_size=11, d_model=32, num_heads=2, mlp_dim=64, num_layers=1)
    cfg2 = TransducerConfig(**kw, subsampling_channels=4, activation_bits=2, predictor="lstm")
    model = TransformerTransducer(cfg2, rngs=nnx.Rngs(0))
    conv = model.subsampling.convs[0]
    x = jax.random.normal(jax.random.key(1), (2, 6, 16, 1))
    q = fake_quant_activations(x, 2, feature_axes=2)
    assert all(np.unique(frame).size <= 4 for frame in np.asarray(q).reshape(12, -1))
    conv.act_bits = 0
    want, plain = conv(q), conv(x)
    conv.act_bits = 2
    np.testing.assert_array_equal(conv(x), want)
    assert float(jnp.max(jnp.abs(want - plain))) > 0.05

    layer = model.predictor.layers[0]
    assert layer.recurrent_proj.act_bits == 2
    inputs = jax.random.normal(jax.random.key(2), (2, 5, cfg2.predictor_dim))
    kernel = layer.recurrent_proj.kernel[...]
    c, h, outs = jnp.zeros((2, layer.hidden)), jnp.zeros((2, layer.hidden)), []
    gates_in = layer.input_proj(inputs)
    for t in range(5):  # the cell by hand, h quantized before the recurrent matmul
        gates = gates_in[:, t] + fake_quant_activations(h, 2) @ kernel
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        outs.append(h)
    np.testing.assert_allclose(layer(inputs), jnp.stack(outs, 1), atol=1e-5)


def test_theta_lr_scale_multiplies_only_squashed_theta_updates():
    import ml_collections

    from jaxspeech.train import quantize
    from jaxspeech.train import state as state_lib

    trainable = quantize.to_trainable(_tree(jax.random.key(7)), RULES)
    grads = jax.tree.map(jnp.ones_like, trainable)
    optim = dict(
        learning_rate=1e-2, warmup_steps=1, schedule="constant", end_lr_fraction=1.0,
        grad_clip_norm=1e9, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0,
    )  # fmt: skip

    def second_update(scale):
        cfg = ml_collections.ConfigDict(dict(optim, theta_lr_scale=scale))
        tx, _ = state_lib.make_optimizer(cfg, 10, RULES)
        _, state = tx.update(grads, tx.init(trainable), trainable)  # step 0: warm-up, rate 0
        updates, _ = tx.update(grads, state, trainable)
        return {qat.path_str(kp): u for kp, u in jax.tree_util.tree_flatten_with_path(updates)[0]}

    base, scaled = second_update(1.0), second_update(10.0)
    squashed = {f"theta/encoder/layers/{i}/mlp/kernel" for i in (0, 1)}
    squashed.add("theta/predictor/conv/kernel")
    for path, u in base.items():
        factor = 10.0 if path in squashed else 1.0  # joint: plain QAT; bias, norm, amplitudes
        np.testing.assert_allclose(scaled[path], factor * u, rtol=1e-6, err_msg=path)
    assert np.abs(base["theta/predictor/conv/kernel"]).max() > 0
