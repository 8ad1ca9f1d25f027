"""jaxspeech.quant: bit packing and the quantized artifact (exact reload, sizes, refusals)."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.quant import export, pack, qat


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 13, 1001, 4099])
def test_pack_roundtrip_every_width_odd_lengths(bits, n):
    codes = np.random.default_rng(bits * 10_000 + n).integers(0, 2**bits, n, dtype=np.uint8)
    packed = pack.pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-n * bits // 8)
    np.testing.assert_array_equal(pack.unpack_codes(packed, bits, n), codes)


def test_pack_layout_is_a_dense_little_endian_bit_stream():
    codes = np.random.default_rng(0).integers(0, 8, 803)
    stream = ((codes[:, None] >> np.arange(3)) & 1).astype(np.uint8).reshape(-1)
    np.testing.assert_array_equal(pack.pack_codes(codes, 3), np.packbits(stream, bitorder="little"))
    assert pack.pack_codes(np.arange(8), 3).size == 3  # 8 codes in 3 bytes, not 4
    np.testing.assert_array_equal(
        pack.pack_codes(np.arange(8), 3), [0b10001000, 0b11000110, 0b11111010]
    )
    with pytest.raises(ValueError, match="out of range"):
        pack.pack_codes(np.array([4]), 2)
    with pytest.raises(ValueError, match="need 2 bytes"):
        pack.unpack_codes(np.zeros(3, np.uint8), 3, 5)


RULES = (
    qat.QuantRule(r"embed", None),
    qat.QuantRule(r"joint", 3, "identity"),
    qat.QuantRule(r"conv/kernel$", 4, "cdf", sigma=0.5),
    qat.QuantRule(r"kernel$", 2, "tanh", warmup_steps=100),
)


def _qparams(seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    params = {
        "encoder": {
            "layers": [
                {
                    "attn": {"query": {"kernel": 0.1 * jax.random.normal(k[i], (16, 4, 8))}},
                    "mlp": {
                        "kernel": 0.1 * jax.random.normal(k[i + 2], (16, 33)),
                        "bias": jnp.arange(33.0),
                    },
                }
                for i in range(2)
            ],
            "norm": {"scale": jnp.ones(16, jnp.bfloat16)},
        },
        "predictor": {
            "embed": {"embedding": jax.random.normal(k[4], (11, 16))},
            "conv": {"kernel": jax.random.normal(k[5], (3, 16, 16))},
        },
        "joint": {"out": {"kernel": jnp.zeros((16, 11)).at[0, :5].set(1.0)}},
        "step_count": jnp.int32(7),
    }
    qp = qat.qat_init(params, RULES)
    # move theta and the amplitudes away from the warm start, as training would
    qp = jax.tree.map(lambda x: x * 1.1 if jnp.issubdtype(x.dtype, jnp.floating) else x, qp)
    return params, qp


def _assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_load_reproduces_qat_params_bit_exactly(tmp_path):
    params, qp = _qparams()
    report = export.export_quantized(qp, RULES, tmp_path / "model.jxq")
    assert report.nbytes == (tmp_path / "model.jxq").stat().st_size
    assert report.num_quantized == 6 and report.num_float == 5
    loaded = export.load_quantized(tmp_path / "model.jxq", template=params)
    jitted = jax.jit(qat.qat_apply, static_argnums=1)(qp, RULES, jnp.int32(10_000))
    _assert_trees_identical(loaded, jitted)
    _assert_trees_identical(loaded, qat.qat_apply(qp, RULES, 10_000))
    # the same inference output: a forward pass through quantized kernels
    x = jnp.ones((2, 16))

    def fwd(p):
        return (
            x @ p["encoder"]["layers"][1]["mlp"]["kernel"]
            + p["encoder"]["layers"][1]["mlp"]["bias"]
        )

    np.testing.assert_array_equal(fwd(loaded), fwd(jitted))
    # without a template: nested dicts keyed by the stored key parts
    plain = export.load_quantized(tmp_path / "model.jxq")
    np.testing.assert_array_equal(
        plain["encoder"]["layers"][0]["attn"]["query"]["kernel"],
        jitted["encoder"]["layers"][0]["attn"]["query"]["kernel"],
    )
    assert plain["encoder"]["norm"]["scale"].dtype == jnp.bfloat16
    assert int(plain["step_count"]) == 7


def test_export_of_a_float_tree_is_post_training_quantization(tmp_path):
    params, _ = _qparams()
    export.export_quantized(params, RULES, tmp_path / "ptq.jxq")
    loaded = export.load_quantized(tmp_path / "ptq.jxq", template=params)
    _assert_trees_identical(loaded, qat.qat_apply(qat.qat_init(params, RULES), RULES, 10_000))


def test_two_bit_artifact_is_over_12x_smaller_than_float32(tmp_path):
    w = 0.02 * jax.random.normal(jax.random.key(1), (1024, 1024))
    rules = (qat.QuantRule("kernel", 2, "tanh"),)
    report = export.export_quantized({"ffn": {"kernel": w}}, rules, tmp_path / "big.jxq")
    assert report.float32_nbytes == 4 * 1024 * 1024
    assert report.kernel_nbytes == 1024 * 1024 // 4 + 4 * 1024  # codes + per-channel scales
    assert report.ratio >= 12 and report.kernel_ratio >= 12
    r3 = export.export_quantized(
        {"ffn": {"kernel": w}}, (qat.QuantRule("kernel", 3, "tanh"),), tmp_path / "big3.jxq"
    )
    assert r3.kernel_nbytes == 3 * 1024 * 1024 // 8 + 4 * 1024  # real 3-bit packing


def _rewrite_header(path, fn):
    raw = path.read_bytes()
    _, hlen = struct.unpack_from("<8sQ", raw)
    header = json.loads(raw[16 : 16 + hlen])
    fn(header)
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<8sQ", b"JXSQUANT", len(hb)) + hb + raw[16 + hlen :])


def test_corrupt_and_truncated_artifacts_are_refused(tmp_path):
    params, qp = _qparams()
    good = tmp_path / "good.jxq"
    export.export_quantized(qp, RULES, good)
    raw = good.read_bytes()
    bad = tmp_path / "bad.jxq"
    cases = [
        (raw[:-1] + bytes([raw[-1] ^ 1]), "field 'sha256'"),  # one payload bit flipped
        (raw[:-10], "truncated: field 'payload_nbytes'"),
        (raw[:100], "truncated: field 'header_nbytes'"),
        (raw[:5], "truncated"),
        (b"NOTQUANT" + raw[8:], "field 'magic'"),
        (raw + b"\0", "corrupt: field 'payload_nbytes'"),
    ]
    for data, msg in cases:
        bad.write_bytes(data)
        with pytest.raises(export.ArtifactError, match=msg):
            export.load_quantized(bad, template=params)
    # a consistent-looking header edit (bits changed) still breaks the checksum
    bad.write_bytes(raw)
    _rewrite_header(bad, lambda h: h["entries"][1].update(bits=4))
    with pytest.raises(export.ArtifactError, match="field 'sha256'"):
        export.load_quantized(bad)
    bad.write_bytes(raw)
    _rewrite_header(bad, lambda h: h.update(version=99))
    with pytest.raises(export.ArtifactError, match="'version'"):
        export.load_quantized(bad)


def test_mismatched_template_is_refused(tmp_path):
    params, qp = _qparams()
    path = tmp_path / "m.jxq"
    export.export_quantized(qp, RULES, path)
    wrong_shape = jax.tree.map(lambda x: x, params)
    wrong_shape["joint"]["out"]["kernel"] = jnp.zeros((16, 12))
    with pytest.raises(export.ArtifactError, match=r"'joint/out/kernel' field 'shape'"):
        export.load_quantized(path, template=wrong_shape)
    wrong_dtype = jax.tree.map(lambda x: x, params)
    wrong_dtype["encoder"]["norm"]["scale"] = jnp.ones(16)
    with pytest.raises(export.ArtifactError, match=r"'encoder/norm/scale' field 'dtype'"):
        export.load_quantized(path, template=wrong_dtype)
    extra = dict(params, extra={"kernel": jnp.zeros((2, 2))})
    with pytest.raises(export.ArtifactError, match=r"'extra/kernel' missing"):
        export.load_quantized(path, template=extra)
    fewer = {k: v for k, v in params.items() if k != "joint"}
    with pytest.raises(export.ArtifactError, match=r"not in the template: \['joint/out/kernel'\]"):
        export.load_quantized(path, template=fewer)
    # shape-only templates work (jax.eval_shape)
    shapes = jax.eval_shape(lambda: params)
    _assert_trees_identical(
        export.load_quantized(path, shapes), export.load_quantized(path, params)
    )


def test_nnx_state_roundtrip(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(11, 8, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
            self.out = nnx.Linear(8, 11, rngs=rngs)

        def __call__(self, t):
            x = self.embed(t)
            for layer in self.layers:
                x = jnp.tanh(layer(x))
            return self.out(x)

    model = Net(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rules = qat.default_rules(bits=3, squash="cdf")
    qp = qat.qat_init(params, rules)
    export.export_quantized(qp, rules, tmp_path / "nnx.jxq")
    loaded = export.load_quantized(tmp_path / "nnx.jxq", template=params)
    tokens = jnp.arange(6)[None] % 11
    np.testing.assert_array_equal(
        nnx.merge(graphdef, loaded)(tokens),
        nnx.merge(graphdef, qat.qat_apply(qp, rules, 0))(tokens),
    )
