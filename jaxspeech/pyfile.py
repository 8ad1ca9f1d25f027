"""Load a Python file by path as a module: experiment configs and sibling scripts are files, not
packages (`experiments/commands_arbitrator.py` builds on `experiments/commands_tt.py`, the sweeps
call the configs and benches they drive)."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType


def load(path: str, name: str | None = None) -> ModuleType:
    """The module of the Python file at `path` (named `name`, default the file's stem), freshly
    executed (not cached in `sys.modules`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such Python file")
    spec = importlib.util.spec_from_file_location(name or os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling(file: str, name: str) -> ModuleType:
    """The module `name`.py in the folder of `file` (pass `__file__`)."""
    return load(os.path.join(os.path.dirname(os.path.abspath(file)), f"{name}.py"), name)
