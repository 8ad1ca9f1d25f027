"""Lattice distillation from a frozen teacher (`losses.distill.lattice_kd`, `train.teacher`): the
collapsed KL against a brute-force computation from the full V-way softmax (values and
gradients), its zero at teacher == student, the model's `teacher_kd` term, and the error for a
teacher with another tokenizer."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_arbitrator import CFG as ARB_CFG  # tests/test_arbitrator.py

from jaxspeech.losses.distill import lattice_kd, rest_logprobs
from jaxspeech.losses.rnnt import blank_label_logprobs
from jaxspeech.models import TransformerTransducer
from jaxspeech.train import step as step_lib
from jaxspeech.train import teacher as teacher_lib

B, T, U, V = 3, 6, 4, 7
LOGIT_LENGTHS = jnp.array([6, 4, 1])
LABEL_LENGTHS = jnp.array([4, 2, 0])


def _logits(seed, scale=2.0):
    return scale * jax.random.normal(jax.random.key(seed), (B, T, U + 1, V))


LABELS = jax.random.randint(jax.random.key(9), (B, U), 1, V)


def _brute_force(teacher_logits, student_logits):
    """Sum over valid nodes of KL over (blank, y_{u+1}, rest), each probability a sum of the
    full softmax's entries selected by a per-node group mask (no shortcut through the
    blank/label log-probs)."""
    groups = np.zeros((3, B, T, U + 1, V), np.float32)  # blank, next label, rest
    node = np.zeros((B, T, U + 1), np.float32)
    for b in range(B):
        for t in range(int(LOGIT_LENGTHS[b])):
            for u in range(int(LABEL_LENGTHS[b]) + 1):
                node[b, t, u] = 1
                groups[0, b, t, u, 0] = 1
                if u < int(LABEL_LENGTHS[b]):
                    groups[1, b, t, u, int(LABELS[b, u])] = 1
                groups[2, b, t, u] = 1 - groups[0, b, t, u] - groups[1, b, t, u]
    qt = jnp.sum(groups * jax.nn.softmax(teacher_logits, axis=-1), axis=-1)
    qs = jnp.sum(groups * jax.nn.softmax(student_logits, axis=-1), axis=-1)
    used = groups.sum(-1) > 0  # padded nodes have empty groups: keep log(0) out of the grads
    qt, qs = jnp.where(used, qt, 1.0), jnp.where(used, qs, 1.0)
    terms = jnp.where(used, qt * (jnp.log(qt) - jnp.log(qs)), 0.0)
    return jnp.sum(node * jnp.sum(terms, axis=0), axis=(1, 2))


def _lattice(logits, labels=LABELS, label_lengths=LABEL_LENGTHS):
    return (
        *blank_label_logprobs(logits, labels, 0),
        rest_logprobs(logits, labels, label_lengths, 0),
    )


def _collapsed_kd(teacher_logits, student_logits):
    teacher, student = _lattice(teacher_logits), _lattice(student_logits)
    return lattice_kd(teacher, student, LOGIT_LENGTHS, LABEL_LENGTHS)


def test_lattice_kd_matches_brute_force_values_and_gradients():
    teacher, student = _logits(0), _logits(1)
    weights = jnp.array([1.0, -0.4, 2.0])  # a non-uniform upstream cotangent
    fast = jax.value_and_grad(lambda s: jnp.sum(weights * _collapsed_kd(teacher, s)))(student)
    slow = jax.value_and_grad(lambda s: jnp.sum(weights * _brute_force(teacher, s)))(student)
    np.testing.assert_allclose(fast[0], slow[0], rtol=1e-5)
    np.testing.assert_allclose(fast[1], slow[1], rtol=1e-4, atol=1e-6)
    per = _collapsed_kd(teacher, student)
    assert float(per[2]) > 0  # one frame, no labels: blank vs the rest on one node
    # Nodes beyond the lengths get no gradient.
    grad = fast[1]
    assert (
        float(jnp.max(jnp.abs(grad[1, 4:]))) == 0.0 and float(jnp.max(jnp.abs(grad[1, :, 3:]))) == 0
    )
    assert float(jnp.max(jnp.abs(grad[2, 1:]))) == 0.0


def test_lattice_kd_is_zero_for_the_teacher_itself_and_rejects_other_lattices():
    logits = _logits(3)
    np.testing.assert_allclose(_collapsed_kd(logits, logits), 0.0, atol=1e-5)
    lattice = _lattice(logits)
    with pytest.raises(ValueError, match="same batch"):
        lattice_kd([x[:, :-1] for x in lattice], lattice, LOGIT_LENGTHS, LABEL_LENGTHS)


def test_lattice_kd_of_a_confident_student():
    """A student that leaves the rest ~1e-7 (a trained transducer's blanks): the KL and its
    gradient equal a float64 computation from the softmax. Rebuilding the rest as
    1 - p(blank) - p(label) in float32 loses it (rounds to 0 or below) and its gradient."""
    labels = jnp.array([[1]])  # B = 1, U = 1, one frame: nodes (0, 0) and (0, 1)
    teacher_p = np.array([0.4, 0.1, 0.25, 0.25])
    teacher = jnp.log(jnp.asarray(np.broadcast_to(teacher_p, (1, 1, 2, 4)), jnp.float32))
    student = np.array([[[[12.0, 0.0, -5.0, -5.0], list(np.log(teacher_p))]]])  # row 1 = teacher

    def reference(z):  # float64, node (0, 0) only (row 1 is the teacher's own: KL 0)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        q = np.array([p[0], p[1], p[2] + p[3]])
        t = np.array([teacher_p[0], teacher_p[1], teacher_p[2] + teacher_p[3]])
        return float(np.sum(t * np.log(t / q)))

    def kd(z):
        one = jnp.array([1])
        return lattice_kd(_lattice(teacher, labels, one), _lattice(z, labels, one), one, one)[0]

    value, grad = jax.value_and_grad(kd)(jnp.asarray(student, jnp.float32))
    z = student[0, 0, 0]
    eye = np.eye(4)
    want = [(reference(z + 1e-6 * eye[i]) - reference(z - 1e-6 * eye[i])) / 2e-6 for i in range(4)]
    np.testing.assert_allclose(float(value), reference(z), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grad)[0, 0, 0], want, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad)[0, 0, 1], 0.0, atol=1e-6)


CFG = dataclasses.replace(ARB_CFG, arbitrator="none", dropout=0.0)
FEAT_LENGTHS = jnp.array([128, 90])
MODEL_LABELS = jnp.array([[3, 4, 5, 6, 7], [1, 2, 3, 0, 0]])
MODEL_LABEL_LENGTHS = jnp.array([5, 3])


def test_model_teacher_kd_term():
    """`loss_terms(teacher=...)`: the same model as its own teacher adds a zero term and leaves
    the RNN-T loss unchanged; another model's lattice gives a positive term whose gradient reaches
    the student (and only the student: the teacher's lattice is data)."""
    feats = jax.random.normal(jax.random.key(1), (2, 128, CFG.num_mels))
    student = TransformerTransducer(CFG, rngs=nnx.Rngs(0))
    other = TransformerTransducer(dataclasses.replace(CFG, num_layers=1), rngs=nnx.Rngs(5))
    student.eval()
    other.eval()
    args = (feats, FEAT_LENGTHS, MODEL_LABELS, MODEL_LABEL_LENGTHS)
    plain = jax.jit(lambda: student.loss_terms(*args))()
    selfish = jax.jit(lambda: student.loss_terms(*args, teacher=student.lattice(*args)))()
    np.testing.assert_allclose(selfish["rnnt"], plain["rnnt"], rtol=1e-6)
    np.testing.assert_allclose(selfish["teacher_kd"], 0.0, atol=1e-3)
    lattice = jax.jit(lambda: other.lattice(*args))()

    graphdef, params, rest = nnx.split(student, nnx.Param, ...)

    def kd(p, teacher):
        return jnp.sum(
            nnx.merge(graphdef, p, rest).loss_terms(*args, teacher=teacher)["teacher_kd"]
        )

    value, grads = jax.jit(jax.value_and_grad(kd, argnums=(0, 1)))(params, lattice)
    assert float(value) > 1.0
    assert float(optax_norm(grads[0])) > 0
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads[1]))
    # The train step's loss adds teacher_weight * teacher_kd to the task loss.
    batch = {"labels": MODEL_LABELS, "label_lengths": MODEL_LABEL_LENGTHS,
             "audio_lengths": jnp.array([1, 1])}  # fmt: skip
    sums = jax.jit(
        lambda w: step_lib._loss_sums(student, batch, feats, FEAT_LENGTHS, None, lattice, w)
    )
    (with_kd, _, _, terms), (without, *_) = sums(0.25), sums(0.0)
    np.testing.assert_allclose(with_kd - without, 0.25 * terms["teacher_kd"], rtol=1e-4)
    np.testing.assert_allclose(terms["teacher_kd"], value, rtol=1e-5)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_teacher_errors_name_the_field_and_the_fix(tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    (teacher / "tokenizer").mkdir(parents=True)
    (student / "tokenizer").mkdir(parents=True)
    (teacher / "tokenizer" / "tokenizer.json").write_text('{"chars": "ab"}')
    (student / "tokenizer" / "tokenizer.json").write_text('{"chars": "abc"}')
    cfg = {"teacher": str(teacher), "teacher_weight": 0.01}
    assert teacher_lib.load_teacher({"teacher": ""}, str(student), None, None) is None
    with pytest.raises(ValueError, match="different tokenizer.*copy"):
        teacher_lib.load_teacher(cfg, str(student), None, None)
    with pytest.raises(FileNotFoundError, match="train.teacher=.*not a trained workdir"):
        teacher_lib.load_teacher(
            {**cfg, "teacher": str(tmp_path / "nowhere")}, str(student), None, None
        )
    shutil.copy(student / "tokenizer" / "tokenizer.json", teacher / "tokenizer" / "tokenizer.json")
    with pytest.raises(ValueError, match="teacher_weight > 0"):
        teacher_lib.load_teacher({**cfg, "teacher_weight": 0.0}, str(student), None, None)
