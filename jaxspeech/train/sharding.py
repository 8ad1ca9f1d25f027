"""Device mesh and logical-axis sharding rules.

Model code names *logical* axes only ('batch', 'embed', 'mlp', ...); the config's mesh section maps
them to the mesh axes `data`, `fsdp` and `tensor`:

    mesh = make_mesh(config.mesh)
    rules = axis_rules(config.mesh)
    spec = logical_to_mesh(("embed", "mlp"), rules)   # PartitionSpec('fsdp', 'tensor')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | tuple[str, ...] | None]


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves the sizes of `MESH_AXES` (one may be -1 = fill) for `num_devices` devices."""
    shape = [int(sizes[a]) for a in MESH_AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(sizes)}")
    known = int(np.prod([s for s in shape if s != -1]))
    if fill:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not divide into mesh {shape}")
        shape[fill[0]] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs "
            f"{int(np.prod(shape))} devices, {num_devices} available"
        )
    return tuple(shape)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Builds the (data, fsdp, tensor) mesh from the config's mesh section."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape({a: mesh_cfg[a] for a in MESH_AXES}, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def axis_rules(mesh_cfg) -> dict[str, str | tuple[str, ...] | None]:
    """The config's `logical_axis_rules` list as a dict, validated against the mesh axes."""
    rules = {}
    for name, target in mesh_cfg.logical_axis_rules:
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise ValueError(f"logical axis {name!r} maps to unknown mesh axes {bad}")
        rules[name] = target if isinstance(target, str) or target is None else tuple(target)
    return rules


def logical_to_mesh(logical: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Maps a tuple of logical axis names to a PartitionSpec over mesh axes.

    Unknown names and None are replicated; a mesh axis is used at most once per array.
    """
    used, out = set(), []
    for name in logical:
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*out)


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide the dimension they shard (e.g. a vocab of 29)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if dim % size == 0 else None)
    return PartitionSpec(*out)


def tree_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedShardings for a pytree holding nnx Variables (their logical `out_sharding` names)."""
    logical = nnx.get_partition_spec(abstract_tree)
    is_spec = lambda x: isinstance(x, PartitionSpec)

    def to_mesh(spec, leaf):
        mesh_spec = logical_to_mesh(tuple(spec), rules) if spec is not None else PartitionSpec()
        return NamedSharding(mesh, _fit(mesh_spec, leaf.shape, mesh))

    specs = jax.tree.leaves(logical, is_leaf=is_spec)
    leaves, treedef = jax.tree.flatten(abstract_tree)
    if len(specs) != len(leaves):  # leaves without metadata come back as PartitionSpec() too
        raise ValueError("sharding spec tree does not match the state tree")
    return jax.tree.unflatten(treedef, [to_mesh(s, x) for s, x in zip(specs, leaves, strict=False)])


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
    """Sharding of the leading (batch) dimension of input arrays."""
    return NamedSharding(mesh, logical_to_mesh(("batch",), rules))


def batch_divisor(mesh: jax.sharding.Mesh, rules: Rules) -> int:
    """How many shards the batch dimension is split into (batch sizes must be multiples)."""
    (axes,) = tuple(logical_to_mesh(("batch",), rules)) or (None,)
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in names])) if names else 1


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Places this process's numeric batch arrays on the mesh (global batch = all processes')."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
        if np.asarray(v).dtype != object
    }
