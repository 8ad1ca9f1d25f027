"""Bit-packed export of a QAT model to one artifact file, and exact reload.

File layout (all integers little-endian):

    b"JXSQUANT"            8 bytes  magic
    header_nbytes          8 bytes  uint64
    header                 UTF-8 JSON (below)
    payload                payload_nbytes bytes: the blobs, each at its own offset

Header fields: ``format`` (``"jaxspeech.quant"``), ``version`` (``FORMAT_VERSION``),
``payload_nbytes``, ``sha256`` and ``entries``, one per parameter leaf in flattening order:
``path`` ("/"-joined), ``keys`` (the key parts), ``shape``, ``dtype``, ``kind`` and either
  - ``kind="quantized"``: ``bits``, ``squash``, ``channel_axes``, ``codes`` (a blob of
    ``pack.pack_codes`` bytes) and ``scale`` (a float32 blob of shape ``scale_shape``), or
  - ``kind="float"``: ``data`` (the raw leaf bytes, C order).
A blob is ``{"offset", "nbytes"}`` into the payload. ``sha256`` is the SHA-256 of the canonical JSON
of the header without ``sha256`` (sorted keys, no spaces) followed by the payload, so corruption of
either is detected.

``load_quantized`` rebuilds each quantized leaf as ``fake_quant.dequantize(codes, bits, scale)``,
the very function (and float32 arithmetic) of the QAT forward pass, so the loaded tree equals
``qat_apply(qparams, rules, step)`` for any step past the warm-up, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.quant import pack
from jaxspeech.quant.fake_quant import dequantize, quantize
from jaxspeech.quant.qat import (
    QATParams,
    QuantRule,
    effective_kernel,
    match_rule,
    path_parts,
    qat_init,
)

MAGIC = b"JXSQUANT"
FORMAT = "jaxspeech.quant"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sQ")


class ArtifactError(ValueError):
    """A quantized artifact is corrupt, truncated, or does not match the expected tree."""


@dataclasses.dataclass(frozen=True)
class ExportReport:
    path: str
    nbytes: int  # the whole artifact file
    float32_nbytes: int  # every leaf stored as float32
    kernel_nbytes: int  # packed codes + scales of the quantized kernels
    kernel_float32_nbytes: int  # the same kernels as float32
    num_quantized: int
    num_float: int

    @property
    def ratio(self) -> float:
        """float32 size / artifact size (whole model, header included)."""
        return self.float32_nbytes / self.nbytes

    @property
    def kernel_ratio(self) -> float:
        """float32 size / packed size of the quantized kernels alone (scales included)."""
        return self.kernel_float32_nbytes / max(self.kernel_nbytes, 1)


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _checksum(header: dict, payload: bytes) -> str:
    body = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(_canonical(body) + payload).hexdigest()


@functools.partial(jax.jit, static_argnums=1)
def _quantized_parts(qparams: QATParams, rules: tuple[QuantRule, ...]):
    """Codes and scales of every selected kernel, computed as ``qat_apply`` computes them."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(qparams.params)[0]:
        path = "/".join(str(p) for p in path_parts(kp))
        rule = match_rule(path, leaf, rules)
        if rule is not None:
            w, scale = effective_kernel(leaf, qparams.amplitudes.get(path), rule)
            out[path] = (quantize(w, rule.bits, scale), scale.astype(jnp.float32))
    return out


def export_quantized(params: Any, rules, path: str | os.PathLike) -> ExportReport:
    """Write ``params`` quantized by ``rules`` to one artifact at ``path``; report its size.

    ``params`` is the trained ``QATParams`` (``qat_init`` output, trained); a plain float tree is
    accepted too and quantized after ``qat_init`` (post-training quantization of a float model).
    """
    rules = tuple(rules)
    qparams = params if isinstance(params, QATParams) else qat_init(params, rules)
    parts = _quantized_parts(qparams, rules)
    entries, blobs, offset = [], [], 0
    f32 = kern = kern_f32 = 0

    def add_blob(data: bytes) -> dict:
        nonlocal offset
        blobs.append(data)
        offset += len(data)
        return {"offset": offset - len(data), "nbytes": len(data)}

    for kp, leaf in jax.tree_util.tree_flatten_with_path(qparams.params)[0]:
        keys = path_parts(kp)
        p = "/".join(str(k) for k in keys)
        leaf = np.asarray(leaf)
        e = {"path": p, "keys": keys, "shape": list(leaf.shape), "dtype": str(leaf.dtype)}
        f32 += leaf.size * 4
        if p in parts:
            rule = match_rule(p, leaf, rules)
            codes, scale = (np.asarray(x) for x in parts[p])
            e.update(
                kind="quantized",
                bits=rule.bits,
                squash=rule.squash,
                channel_axes=list(rule.channel_axes),
                scale_shape=list(scale.shape),
            )
            e["codes"] = add_blob(pack.pack_codes(codes, rule.bits).tobytes())
            e["scale"] = add_blob(np.ascontiguousarray(scale, np.float32).tobytes())
            kern += e["codes"]["nbytes"] + e["scale"]["nbytes"]
            kern_f32 += leaf.size * 4
        else:
            e.update(kind="float", data=add_blob(np.ascontiguousarray(leaf).tobytes()))
        entries.append(e)
    if len({e["path"] for e in entries}) != len(entries):
        raise ArtifactError("two parameter leaves have the same '/'-joined path")
    payload = b"".join(blobs)
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "payload_nbytes": len(payload),
        "entries": entries,
    }
    header["sha256"] = _checksum(header, payload)
    hbytes = _canonical(header)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, len(hbytes)))
        f.write(hbytes)
        f.write(payload)
    os.replace(tmp, path)
    nq = sum(e["kind"] == "quantized" for e in entries)
    return ExportReport(
        os.fspath(path), os.path.getsize(path), f32, kern, kern_f32, nq, len(entries) - nq
    )


def read_artifact(path: str | os.PathLike) -> tuple[dict, bytes]:
    """The verified header and payload of an artifact; ``ArtifactError`` if it is damaged."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < _PREFIX.size:
        raise ArtifactError(f"{path}: truncated: {len(raw)} bytes, shorter than the file prefix")
    magic, hlen = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise ArtifactError(f"{path}: not a jaxspeech quantized artifact (field 'magic' {magic!r})")
    if _PREFIX.size + hlen > len(raw):
        raise ArtifactError(
            f"{path}: truncated: field 'header_nbytes' says {hlen} bytes, "
            f"the file holds {len(raw) - _PREFIX.size} after the prefix"
        )
    try:
        header = json.loads(raw[_PREFIX.size : _PREFIX.size + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: corrupt: field 'header' is not valid JSON ({err})") from None
    for field in ("format", "version", "payload_nbytes", "entries", "sha256"):
        if field not in header:
            raise ArtifactError(f"{path}: corrupt: header field {field!r} missing")
    if header["format"] != FORMAT or header["version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: unsupported field 'format'/'version': "
            f"{header['format']!r} v{header['version']!r}, expected "
            f"{FORMAT!r} v{FORMAT_VERSION}"
        )
    payload = raw[_PREFIX.size + hlen :]
    if len(payload) != header["payload_nbytes"]:
        what = "truncated" if len(payload) < header["payload_nbytes"] else "corrupt"
        raise ArtifactError(
            f"{path}: {what}: field 'payload_nbytes' says "
            f"{header['payload_nbytes']} bytes, the file holds {len(payload)}"
        )
    if _checksum(header, payload) != header["sha256"]:
        raise ArtifactError(f"{path}: corrupt: field 'sha256' does not match the contents")
    return header, payload


def _decode(e: dict, payload: bytes) -> jax.Array:
    shape, dtype = tuple(e["shape"]), jnp.dtype(e["dtype"])

    def blob(name):
        b = e[name]
        return payload[b["offset"] : b["offset"] + b["nbytes"]]

    if e["kind"] == "float":
        return jnp.asarray(np.frombuffer(blob("data"), dtype).reshape(shape))
    count = int(np.prod(shape, dtype=np.int64))
    codes = pack.unpack_codes(np.frombuffer(blob("codes"), np.uint8), e["bits"], count)
    scale = np.frombuffer(blob("scale"), np.float32).reshape(e["scale_shape"])
    return dequantize(jnp.asarray(codes.reshape(shape)), e["bits"], jnp.asarray(scale), dtype)


def load_quantized(path: str | os.PathLike, template: Any = None) -> Any:
    """The parameter tree stored at ``path`` (quantized kernels dequantized exactly).

    Without ``template`` the tree is nested dicts keyed by the stored key parts. With
    ``template`` (the float parameter tree, an ``nnx.State``, or ``jax.eval_shape`` structs) the
    artifact must hold exactly its leaf paths with the same shapes and dtypes, else
    ``ArtifactError`` names the path and field; the result has the template's structure.
    """
    header, payload = read_artifact(path)
    entries = {e["path"]: e for e in header["entries"]}
    if template is None:
        tree: dict = {}
        for e in header["entries"]:
            node = tree
            for k in e["keys"][:-1]:
                node = node.setdefault(k, {})
            node[e["keys"][-1]] = _decode(e, payload)
        return tree
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves, seen = [], set()
    for kp, leaf in flat:
        p = "/".join(str(k) for k in path_parts(kp))
        if p not in entries:
            raise ArtifactError(f"{path}: mismatched: template leaf {p!r} missing from artifact")
        e, seen = entries[p], seen | {p}
        if tuple(e["shape"]) != tuple(leaf.shape):
            raise ArtifactError(
                f"{path}: mismatched: leaf {p!r} field 'shape' is "
                f"{tuple(e['shape'])} in the artifact, {tuple(leaf.shape)} in "
                "the template"
            )
        if jnp.dtype(e["dtype"]) != jnp.dtype(leaf.dtype):
            raise ArtifactError(
                f"{path}: mismatched: leaf {p!r} field 'dtype' is {e['dtype']} in "
                f"the artifact, {jnp.dtype(leaf.dtype)} in the template"
            )
        leaves.append(_decode(e, payload))
    extra = sorted(set(entries) - seen)
    if extra:
        raise ArtifactError(f"{path}: mismatched: artifact leaves not in the template: {extra}")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def component_nbytes(path: str | os.PathLike, prefixes: dict[str, tuple[str, ...]]) -> dict:
    """``{name: {"nbytes": stored, "float32_nbytes": as float32}}`` of the leaves whose path
    starts with one of ``prefixes[name]`` (payload bytes: codes + scales or raw data)."""
    header, _ = read_artifact(path)
    out = {name: {"nbytes": 0, "float32_nbytes": 0} for name in prefixes}
    for e in header["entries"]:
        for name, starts in prefixes.items():
            if e["path"].startswith(tuple(starts)):
                blobs = ("codes", "scale") if e["kind"] == "quantized" else ("data",)
                out[name]["nbytes"] += sum(e[b]["nbytes"] for b in blobs)
                out[name]["float32_nbytes"] += 4 * int(np.prod(e["shape"], dtype=np.int64))
    return out
