"""A frozen trained transducer as a distillation teacher (`train.teacher`, `train.teacher_weight`).

The teacher is any trained workdir of the same task: it must share this run's tokenizer (the
lattices are over the same labels), and it may differ in every other way (depth, width,
arbitrators). Its state is placed on this run's mesh with its own logical shardings, never
trained and never checkpointed with the student; each train step runs it in eval mode
(`train.step.make_train_step(teacher=...)`).
"""

from __future__ import annotations

import filecmp
import os

import jax
from flax import nnx

from jaxspeech.train import evaluate as evaluate_lib
from jaxspeech.train import sharding as sharding_lib


def _same_tokenizer(source: str, workdir: str) -> bool:
    a, b = os.path.join(source, "tokenizer"), os.path.join(workdir, "tokenizer")
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors


def load_teacher(tc, workdir: str, mesh, rules):
    """(graphdef, state, shardings) of `train.teacher` (a trained workdir) on `mesh`, or None
    when no teacher is set. Call after this run's tokenizer exists in `workdir`."""
    source = tc.get("teacher", "")
    if not source:
        return None
    if not os.path.isdir(os.path.join(source, "tokenizer")):
        raise FileNotFoundError(
            f"train.teacher={source!r} is not a trained workdir: no {source}/tokenizer"
        )
    if not _same_tokenizer(source, workdir):
        raise ValueError(
            f"train.teacher={source!r} has a different tokenizer from this run's "
            f"({workdir}/tokenizer): distillation compares lattices over the same labels. "
            "Train the teacher on the same data config, or start this run's workdir with a copy "
            f"of {source}/tokenizer"
        )
    if float(tc.get("teacher_weight", 0.0)) <= 0:
        raise ValueError(
            f"train.teacher={source!r} needs train.teacher_weight > 0, got "
            f"{tc.get('teacher_weight')!r}"
        )
    trained = evaluate_lib.load_trained(source)
    graphdef, state = nnx.split(trained.model)
    shardings = sharding_lib.tree_shardings(state, mesh, rules)
    return graphdef, jax.device_put(state, shardings), shardings
