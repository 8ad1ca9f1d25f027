"""Orbax checkpoints of the train state, the data-iterator state and the model description.

Each checkpoint step holds three items:
  state  the train-state dict (params, rest, opt_state, step); typed PRNG keys are stored as
         their raw key data and re-wrapped on restore
  data   the input iterator's state (JSON), so a resumed run continues with the next batch
  model  {'config': TransducerConfig fields, 'param_shapes': {...}} used to refuse resuming a
         checkpoint of a different model with a message naming the fields that differ

Saving is asynchronous (the loop continues while arrays are written); `wait()` blocks.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of a model that differs from the configured one."""


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree):
    def f(x):
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(f, tree)


def _data_to_keys(restored, like):
    def f(r, x):
        if not _is_key(x):
            return r
        impl = jax.random.key_impl(x) if isinstance(x, jax.Array) else None  # None: default impl
        return jax.random.wrap_key_data(r, impl=impl)

    return jax.tree.map(f, restored, like)


def _encode_iterator_state(state):
    if isinstance(state, bytes):
        return {"__bytes__": state.decode("utf-8")}
    return state


def _decode_iterator_state(state):
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return state["__bytes__"].encode("utf-8")
    return state


def model_description(cfg, param_shapes: dict, quant: dict | None = None) -> dict:
    """What a checkpoint must match: the model config, parameter shapes and the QAT setup."""
    return {"config": dataclasses.asdict(cfg), "param_shapes": param_shapes, "quant": quant or {}}


def _config_defaults() -> dict:
    from jaxspeech.models import TransducerConfig

    return {
        f.name: f.default
        for f in dataclasses.fields(TransducerConfig)
        if f.default is not dataclasses.MISSING
    }


def describe_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two `model_description`s."""
    diffs = []
    sc, cc = saved.get("config", {}), current.get("config", {})
    # A field added to TransducerConfig after the checkpoint was written: the model had its default.
    sc = {**{k: v for k, v in _config_defaults().items() if k in cc}, **sc} if sc else sc
    for k in sorted(set(sc) | set(cc)):
        if sc.get(k) != cc.get(k):
            diffs.append(f"model.{k}: checkpoint {sc.get(k)!r} vs config {cc.get(k)!r}")
    ss, cs = saved.get("param_shapes", {}), current.get("param_shapes", {})
    for k in sorted(set(ss) | set(cs)):
        if ss.get(k) != cs.get(k):
            diffs.append(f"param {k}: checkpoint {ss.get(k)} vs model {cs.get(k)}")
    sq, cq = saved.get("quant", {}), current.get("quant", {})
    if sq != cq:
        diffs.append(
            f"quant: checkpoint {sq or 'float (no QAT)'} vs config {cq or 'float (no QAT)'}"
        )
    return diffs


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` at `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(
                f"train.keep_checkpoints must be a positive int (checkpoints kept), got {keep!r}: "
                "0 would delete every checkpoint, the last one included"
            )
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state, *, data_state=None, model: dict | None = None, force: bool = False
    ) -> bool:
        args = {"state": ocp.args.StandardSave(_keys_to_data(state))}
        args["data"] = ocp.args.JsonSave({"iterator": _encode_iterator_state(data_state)})
        args["model"] = ocp.args.JsonSave(model or {})
        return self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)

    def read_model(self, step: int | None = None) -> dict | None:
        """The saved model description of a checkpoint (the latest by default), or None."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        path = os.path.join(self.directory, str(step), "model", "metadata")
        if os.path.exists(path):  # cheap path: read the JSON item directly
            with open(path) as f:
                return json.load(f)
        out = self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
        return dict(out["model"])

    def check_compatible(self, current: dict) -> None:
        saved = self.read_model()
        if not saved:
            return
        diffs = describe_differences(saved, current)
        if diffs:
            raise IncompatibleCheckpointError(
                f"{self.directory} holds a checkpoint (step {self.latest_step()}) of a different "
                "model; use a new --workdir or matching settings. Differences:\n  "
                + "\n  ".join(diffs)
            )

    def restore(self, abstract_state, step: int | None = None):
        """Restores (state, data_state) sharded like `abstract_state` (ShapeDtypeStructs with
        shardings, or arrays)."""
        step = self.latest_step() if step is None else step
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract_keys_to_data(target)),
            data=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        state = _data_to_keys(out["state"], abstract_state)
        return state, _decode_iterator_state(out["data"]["iterator"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
