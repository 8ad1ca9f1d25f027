"""Model modules: shapes, parameter counts, predictors, joint, loss, jit/grad, dtypes, axes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.models import (
    LSTMPredictor,
    StatelessPredictor,
    TransducerConfig,
    TransformerTransducer,
)

CFG = TransducerConfig(
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
    predictor_layers=1,
    joint_dim=20,
    dropout=0.1,
)
LOGICAL_AXES = {
    "batch",
    "frames",
    "embed",
    "mlp",
    "heads",
    "kv",
    "vocab",
    "joint",
    "conv_in",
    "conv_out",
    None,
}


@pytest.fixture(scope="module")
def model():
    m = TransformerTransducer(CFG, rngs=nnx.Rngs(0))
    m.eval()
    return m


@pytest.fixture(scope="module")
def batch():
    k1, k2 = jax.random.split(jax.random.key(1))
    feats = jax.random.normal(k1, (2, 40, CFG.num_mels))
    feat_lengths = jnp.array([40, 29], jnp.int32)
    labels = jnp.array([[1, 2, 3, 4], [5, 6, 0, 0]], jnp.int32)
    label_lengths = jnp.array([4, 2], jnp.int32)
    return feats, feat_lengths, labels, label_lengths


def _count(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_shapes(model, batch):
    feats, feat_lengths, labels, _ = batch
    enc, enc_lengths = jax.jit(model.encode)(feats, feat_lengths)
    assert enc.shape == (2, 10, CFG.d_model) and enc.dtype == jnp.float32
    np.testing.assert_array_equal(enc_lengths, [10, 7])
    np.testing.assert_array_equal(enc[1, 7:], 0.0)  # frames beyond enc_lengths are zeroed
    pred = model.predict(labels)
    assert pred.shape == (2, 5, CFG.predictor_dim)
    logits = model.joint(
        model.joint.project_encoder(enc)[:, :, None], model.joint.project_predictor(pred)[:, None]
    )
    assert logits.shape == (2, 10, 5, CFG.vocab_size) and logits.dtype == jnp.float32


def test_param_counts_by_hand(model):
    d, m, f, c, p, j, v = 32, 64, 16, 4, 24, 20, 11  # (q, k, v, out sizes do not depend on H)
    conv = (9 * 1 * c + c) + (9 * c * c + c)
    sub = conv + (c * (f // 4) * d + d)
    attn = 4 * (d * d + d)  # q, k, v [D,H,K] + bias [H,K]; out [H,K,D] + bias [D]
    block = attn + (d * m + m) + (m * d + d) + 2 * (2 * d)
    enc = 2 * block + 2 * d
    lstm = v * p + (p * 4 * p + 4 * p) + p * 4 * p
    joint = (d * j + j) + p * j + (j * v + v)
    assert _count(model.subsampling) == sub
    assert _count(model.encoder.blocks[0].attn) == attn
    assert _count(model.encoder) == enc
    assert _count(model.predictor) == lstm
    assert _count(model.joint) == joint
    assert _count(model) == sub + enc + lstm + joint  # feature_norm holds no Param
    assert jax.tree.leaves(nnx.state(model.feature_norm, nnx.Param)) == []


def test_stateless_param_count():
    cfg = dataclasses.replace(CFG, predictor="stateless", stateless_context=3)
    pred = StatelessPredictor(cfg, rngs=nnx.Rngs(0))
    assert _count(pred) == 11 * 24 + (3 * 24 * 24 + 24)


@pytest.mark.parametrize("kind", ["lstm2", "stateless"])
def test_predictor_step_matches_call(kind):
    if kind == "lstm2":
        pred = LSTMPredictor(dataclasses.replace(CFG, predictor_layers=2), rngs=nnx.Rngs(3))
    else:
        pred = StatelessPredictor(dataclasses.replace(CFG, stateless_context=3), rngs=nnx.Rngs(3))
    pred.eval()
    labels = jnp.array([[3, 1, 4, 1, 5], [9, 2, 6, 0, 0]], jnp.int32)
    full = pred(labels)
    assert full.shape == (2, 6, 24)
    state, outs = pred.init_state(2), []
    step = jax.jit(lambda s, t: pred.step(s, t))
    for tokens in jnp.concatenate([jnp.zeros((2, 1), jnp.int32), labels], axis=1).T:
        state, out = step(state, tokens)
        outs.append(out)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), full, atol=1e-5)
    # Output u depends only on labels < u (changing the last label leaves outputs 0..U-1 alone).
    changed = pred(labels.at[:, -1].set(7))
    np.testing.assert_allclose(changed[:, :-1], full[:, :-1], atol=1e-6)
    assert not np.allclose(changed[0, -1], full[0, -1])


def test_joint_broadcasts(model):
    e = jax.random.normal(jax.random.key(2), (2, 3, CFG.d_model))
    p = jax.random.normal(jax.random.key(3), (2, 4, CFG.predictor_dim))
    ep, pp = model.joint.project_encoder(e), model.joint.project_predictor(p)
    logits = model.joint(ep[:, :, None], pp[:, None])
    ref = model.joint.out(jnp.tanh(ep[:, 1] + pp[:, 2]))
    np.testing.assert_allclose(logits[:, 1, 2], ref, atol=1e-5)


def _reference_nll(logits, t_len, labels):
    """Independent float64 alpha recursion over the T x (U+1) lattice for one example."""
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
    u_len = len(labels)
    alpha = np.full((t_len, u_len + 1), -np.inf)
    alpha[0, 0] = 0.0
    for t in range(t_len):
        for u in range(u_len + 1):
            if t > 0:
                alpha[t, u] = np.logaddexp(alpha[t, u], alpha[t - 1, u] + logp[t - 1, u, 0])
            if u > 0:
                alpha[t, u] = np.logaddexp(
                    alpha[t, u], alpha[t, u - 1] + logp[t, u - 1, labels[u - 1]]
                )
    return -(alpha[t_len - 1, u_len] + logp[t_len - 1, u_len, 0])


def test_loss_matches_reference_lattice(model, batch):
    feats, feat_lengths, labels, label_lengths = batch
    loss = jax.jit(model.loss)(feats, feat_lengths, labels, label_lengths)
    assert loss.shape == (2,)
    enc, enc_lengths = jax.jit(model.encode)(feats, feat_lengths)
    logits = model.joint(
        model.joint.project_encoder(enc)[:, :, None],
        model.joint.project_predictor(model.predict(labels))[:, None],
    )
    for i in range(2):
        ref = _reference_nll(
            logits[i], int(enc_lengths[i]), np.asarray(labels[i, : label_lengths[i]])
        )
        np.testing.assert_allclose(loss[i], ref, rtol=1e-4)


def test_jit_grad_through_split_merge(batch):
    model = TransformerTransducer(CFG, rngs=nnx.Rngs(4))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_grad(params, rest, batch):
        def f(params):  # copy=True: dropout advances its RNG count inside this (grad) trace
            return nnx.merge(graphdef, params, rest, copy=True).loss(*batch).mean()

        return jax.value_and_grad(f)(params)

    loss, grads = loss_and_grad(params, rest, batch)
    assert np.isfinite(loss)
    pure = nnx.to_pure_dict(grads)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(pure))
    for path in [
        ("joint", "out", "kernel"),
        ("joint", "enc_proj", "kernel"),
        ("predictor", "embed", "embedding"),
        ("encoder", "blocks", 0, "attn", "query", "kernel"),
        ("subsampling", "convs", 0, "kernel"),
    ]:
        g = pure
        for key in path:
            g = g[key]
        assert float(jnp.abs(g).max()) > 0, path
    # Dropout is active in train mode and off in eval mode (checked on one block).
    block = model.encoder.blocks[0]
    x = jax.random.normal(jax.random.key(6), (2, 4, CFG.d_model))
    assert not np.allclose(block.ffn(x), block.ffn(x))
    model.eval()
    np.testing.assert_array_equal(block.ffn(x), block.ffn(x))


def test_bfloat16_compute(batch):
    cfg = dataclasses.replace(CFG, dtype="bfloat16", predictor="stateless")
    model = TransformerTransducer(cfg, rngs=nnx.Rngs(5))
    model.eval()
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    enc, _ = jax.jit(model.encode)(batch[0], batch[1])
    assert enc.dtype == jnp.bfloat16
    assert model.predict(batch[2]).dtype == jnp.bfloat16
    loss = jax.jit(lambda *a: model.loss(*a))(*batch)
    assert loss.dtype == jnp.float32 and np.all(np.isfinite(loss))


def test_logical_axes_metadata(model):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert leaves and all(isinstance(s, jax.sharding.PartitionSpec) for s in leaves)
    for spec in leaves:
        assert len(spec) >= 1 and set(spec) <= LOGICAL_AXES, spec
    attn = model.encoder.blocks[0].attn
    assert attn.query.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "kv")
    assert attn.out.kernel.get_metadata()["out_sharding"] == ("heads", "kv", "embed")
    assert model.encoder.blocks[0].ffn.up.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert model.joint.out.kernel.get_metadata()["out_sharding"] == ("joint", "vocab")


def test_feature_norm(model, batch):
    feats, feat_lengths = batch[:2]
    assert not isinstance(model.feature_norm.mean, nnx.Param)
    enc, _ = jax.jit(model.encode)(feats, feat_lengths)
    mean, std = jnp.linspace(-1, 1, CFG.num_mels), jnp.linspace(0.5, 2, CFG.num_mels)
    model.feature_norm.mean[...], model.feature_norm.std[...] = mean, std
    try:
        shifted, _ = jax.jit(model.encode)(feats * std + mean, feat_lengths)
    finally:
        model.feature_norm.mean[...] = jnp.zeros(CFG.num_mels)
        model.feature_norm.std[...] = jnp.ones(CFG.num_mels)
    np.testing.assert_allclose(shifted, enc, atol=1e-4)


def test_eager_sharding_under_mesh_and_rules():
    """Under a mesh and logical-axis rules the parameters are created sharded by the rules."""
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 1), ("data", "tensor"), axis_types=auto)
    rules = [
        ("embed", None),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("vocab", None),
        ("joint", "tensor"),
        ("conv_in", None),
        ("conv_out", None),
    ]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = TransformerTransducer(CFG, rngs=nnx.Rngs(0))
        kernel = model.encoder.blocks[0].ffn.up.kernel[...]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert specs["joint"]["out"]["kernel"].get_value() == jax.sharding.PartitionSpec("tensor", None)
