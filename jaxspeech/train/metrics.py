"""Workdir metric writers: config.json, metrics.jsonl, TensorBoard events and a tqdm progress bar.

Only process 0 writes; on other processes every method is a no-op, so the training loop can call
them unconditionally.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import jax
import numpy as np


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic | np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    return x


def write_json(path: str, obj) -> None:
    """Writes `obj` as indented JSON atomically (write + rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard, and draws a progress bar."""

    def __init__(
        self, workdir: str, *, total_steps: int, initial_step: int = 0, progress: bool = True
    ):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self._tb = self._bar = self._jsonl = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm.auto import tqdm

        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            self._bar = tqdm(
                total=total_steps,
                initial=initial_step,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def write_config(self, config) -> None:
        if self.enabled:
            cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            write_json(os.path.join(self.workdir, "config.json"), cfg)
            self._tb.add_text("config", "```\n" + json.dumps(_jsonable(cfg), indent=2) + "\n```")

    def write_scalars(self, step: int, scalars: Mapping[str, float], *, prefix: str = "") -> None:
        """One JSON line `{"step": step, **scalars}` (prefixed keys) plus TensorBoard scalars."""
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        for k, v in scalars.items():
            row[prefix + k] = float(v)
            self._tb.add_scalar(prefix + k, float(v), int(step))
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._bar is not None and "loss" in scalars:
            self._bar.set_postfix(loss=f"{float(scalars['loss']):.3f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close_progress(self) -> None:
        """Closes the progress bar (before the final evaluation's output)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, message: str) -> None:
        """A line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.close_progress()
        self._tb.close()
        self._jsonl.close()
