"""A warm start (`train.init_from`): the trained workdir a new run starts from, its tokenizer
(copied into the new workdir, or checked against the one there), and its model, checked to have
the new run's parameter shapes."""

from __future__ import annotations

import os
import shutil

from flax import nnx

from jaxspeech.data import tokenizers
from jaxspeech.train import checkpoint as checkpoint_lib
from jaxspeech.train import evaluate as evaluate_lib
from jaxspeech.train import state as state_lib


def source(tc, workdir: str) -> str | None:
    """`train.init_from` (a trained workdir), after copying its tokenizer into `workdir` (or
    checking that the tokenizer there is the same); None without one, or when `workdir` already
    has checkpoints (a resume does not read `init_from`, which may be gone)."""
    source = tc.get("init_from", "")
    if not source:
        return None
    theirs, mine = os.path.join(source, "tokenizer"), os.path.join(workdir, "tokenizer")
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints)):
        return None
    if not os.path.isdir(theirs):
        raise FileNotFoundError(f"train.init_from={source!r} is not a trained workdir: no {theirs}")
    if not os.path.exists(mine):
        shutil.copytree(theirs, mine)
    prints = {tokenizers.load_tokenizer(d).fingerprint() for d in (mine, theirs)}
    if len(prints) > 1:
        raise ValueError(
            f"train.init_from={source!r} has another tokenizer than this workdir's ({mine}): its "
            f"output layer would predict the wrong labels. Use a new workdir (its tokenizer is "
            f"copied from {theirs}), or remove {mine}"
        )
    return source


def load_model(source: str, description: dict):
    """The trained model of `source`, checked to have this run's parameter shapes. This run may
    add parameters (arbitrators on a trained transducer): those keep their initialization."""
    trained = evaluate_lib.load_trained(source)
    shapes = state_lib.param_shapes({"params": nnx.state(trained.model, nnx.Param)})
    target = description["param_shapes"]
    if any(target.get(path) != shape for path, shape in shapes.items()):
        diffs = checkpoint_lib.describe_differences(
            {"param_shapes": shapes},
            {"param_shapes": {k: v for k, v in target.items() if k in shapes}},
        )
        raise checkpoint_lib.IncompatibleCheckpointError(
            f"train.init_from={source!r} holds a different model (step {trained.step}); "
            "differences:\n  " + "\n  ".join(diffs)
        )
    return trained.model
