"""Uniform random-access sources and the `open_source` factory.

A source has ``__len__`` and ``__getitem__(i) -> record`` where a record is a dict with ``audio``
(float32 16 kHz mono numpy), ``text`` (str), ``id`` (str) and source extras. Sources are
picklable (grain worker processes re-open TFDS handles lazily).

Source specs (strings; `SourceSpec.parse`)::

    tfds:<name>[/<config>]:<split>      a prepared TFDS dataset, e.g.
                                        ``tfds:librispeech:dev_clean``,
                                        ``tfds:spoken_commands/tiny:train``; the split may use TFDS
                                        slicing and ``+`` (``train_clean100+train_clean360``)
    librispeech_dir:<root>:<split>      a local LibriSpeech-layout directory, e.g.
                                        ``librispeech_dir:/data/LibriSpeech:dev-clean``; prepared
                                        once into array_record (see `jaxspeech.data.librispeech`)
    manifest:<path>                     a JSON-lines manifest (see `jaxspeech.data.manifest`)

`open_source` wraps every source in `SkipCorrupt` (unless ``skip_corrupt=False``): a record whose
audio cannot be decoded is logged with its file, counted, and returned as ``None``; the input
pipeline (`jaxspeech.data.pipeline`) filters ``None`` records. So a corrupt file in a large corpus
is skipped and counted, never a crash hours into training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import os
import threading
from typing import Any

import numpy as np

from jaxspeech.data.audio import SAMPLE_RATE, AudioDecodeError, to_float32

__all__ = [
    "ConcatSource",
    "SubsetSource",
    "SkipCorrupt",
    "SourceSpec",
    "TfdsSource",
    "example_to_record",
    "open_source",
]

log = logging.getLogger(__name__)

# Importing these modules registers their TFDS builders.
_BUILDER_MODULES = {
    "librispeech_local": "jaxspeech.data.librispeech",
    "spoken_commands": "jaxspeech.data.commands",
}


def _to_python(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_to_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def example_to_record(example: dict, sample_rate: int | None = SAMPLE_RATE) -> dict:
    """A TFDS example as a record: the ``audio`` (or ``speech``) feature as float32 in [-1, 1]
    (integer PCM scaled by 1/32768, whatever its storage dtype), resampled from ``sample_rate``
    if needed, bytes -> str, numpy scalars -> Python."""
    record = {k: _to_python(v) for k, v in example.items() if k not in ("audio", "speech")}
    audio = np.asarray(example["audio"] if "audio" in example else example["speech"])
    if np.issubdtype(audio.dtype, np.integer):
        audio = audio.astype(np.float32) / 32768.0
    name = str(record.get("id", "<tfds example>"))
    record["audio"] = to_float32(audio, sample_rate or SAMPLE_RATE, name=name)
    return record


class TfdsSource:
    """A prepared TFDS dataset read with ``tfds.data_source`` (array_record; no TensorFlow).

    Never downloads or prepares: if the data is not there, the error says where it was expected.
    ``data_dir`` may be any path TFDS understands, including ``gs://``.
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None):
        self.name, self.split = name, split
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self._source = None
        self._sample_rate = SAMPLE_RATE
        self._open()

    def _open(self):
        import tensorflow_datasets as tfds

        module = _BUILDER_MODULES.get(self.name.split("/")[0])
        if module is not None:
            importlib.import_module(module)
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ValueError(f"unknown TFDS dataset {self.name!r}: {e}") from None
        where = os.fspath(builder.data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {self.name!r} is not prepared: expected it under {where} "
                f"(data_dir={self.data_dir or tfds.core.constants.DATA_DIR!r}); prepare it with "
                f"tfds.builder({self.name!r}, data_dir=...).download_and_prepare()"
            )
        known = list(builder.info.splits.keys())
        for part in self.split.split("+"):
            if part.split("[")[0] not in known:
                raise ValueError(
                    f"TFDS dataset {self.name!r} at {where} has no split {part!r}; "
                    f"it has {sorted(known)}"
                )
        features = builder.info.features
        audio = features["audio"] if "audio" in features else features["speech"]
        self._sample_rate = getattr(audio, "sample_rate", None) or SAMPLE_RATE
        self._source = builder.as_data_source(split=self.split)
        self._where, self._version = where, str(builder.info.version)

    def __len__(self) -> int:
        return len(self._source)

    def fingerprint(self) -> str:
        """Identifies the prepared split (a TFDS version is immutable): caches of its record
        lengths are keyed by it."""
        return f"tfds:{self._where}:{self.split}:{self._version}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        return example_to_record(self._source[int(index)], self._sample_rate)

    def __getstate__(self):
        return {"name": self.name, "split": self.split, "data_dir": self.data_dir}

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"


class SkipCorrupt:
    """Wraps a source: `AudioDecodeError` in ``__getitem__`` -> logged, counted, ``None``.

    ``num_skipped`` and ``skipped`` (the first ``keep`` file names) count failures seen by this
    process (each grain worker process counts its own).
    """

    def __init__(self, source, keep: int = 100):
        self.source = source
        self.keep = keep
        self.num_skipped = 0
        self.skipped: list[str] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return self.source[index]
        except AudioDecodeError as e:
            with self._lock:
                self.num_skipped += 1
                if len(self.skipped) < self.keep:
                    self.skipped.append(e.path)
                count = self.num_skipped
            log.warning("skipping record %d (corrupt audio, %d so far): %s", index, count, e)
            return None

    def __getattr__(self, name):  # durations, path, ... of the wrapped source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __getstate__(self):
        return {"source": self.source, "keep": self.keep}

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"SkipCorrupt({self.source!r}, skipped={self.num_skipped})"


class ConcatSource:
    """Several sources read as one (index ranges laid end to end)."""

    def __init__(self, sources):
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def fingerprint(self) -> str | None:
        """Its sources' fingerprints joined (None if one of them has none)."""
        prints = [getattr(s, "fingerprint", lambda: None)() for s in self.sources]
        return None if None in prints else "+".join(prints)

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self._ends, index, side="right"))
        start = 0 if k == 0 else int(self._ends[k - 1])
        return self.sources[k][index - start]


class SubsetSource:
    """The records `indices` of a source, in that order (a fixed evaluation subset)."""

    def __init__(self, source, indices):
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        if self.indices.size and not (0 <= self.indices.min() and self.indices.max() < len(source)):
            raise IndexError(f"subset indices outside [0, {len(source)})")

    @classmethod
    def evenly_spaced(cls, source, count: int):
        """`count` records spread evenly over the source (all of it if it has no more): a
        subset that follows the source's mix even where the source is sorted."""
        n = len(source)
        if count >= n:
            return cls(source, np.arange(n))
        return cls(source, np.unique(np.linspace(0, n - 1, count).round().astype(np.int64)))

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[int(index)])]

    def fingerprint(self) -> str | None:
        inner = getattr(self.source, "fingerprint", lambda: None)()
        if inner is None:
            return None
        return f"{inner}[{hashlib.sha1(self.indices.tobytes()).hexdigest()[:16]}]"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec: ``kind`` in {'tfds', 'librispeech_dir', 'manifest'}."""

    kind: str
    location: str  # TFDS name[/config], LibriSpeech root, or manifest path
    split: str | None = None

    @classmethod
    def parse(cls, spec: str) -> SourceSpec:
        kind, sep, rest = spec.partition(":")
        if not sep or not rest:
            raise ValueError(f"bad source spec {spec!r}: expected 'kind:...' ({_SYNTAX})")
        if kind == "manifest":
            return cls(kind, rest)
        if kind in ("tfds", "librispeech_dir"):
            # A TFDS name has no ':' (its split may: 'train[:10%]'); a root directory might.
            cut = rest.partition if kind == "tfds" else rest.rpartition
            location, sep, split = cut(":")
            if not sep or not location or not split:
                raise ValueError(f"bad source spec {spec!r}: missing ':<split>' ({_SYNTAX})")
            return cls(kind, location, split)
        raise ValueError(f"bad source spec {spec!r}: unknown kind {kind!r} ({_SYNTAX})")

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}" + (f":{self.split}" if self.split else "")


_SYNTAX = "tfds:<name>[/<config>]:<split> | librispeech_dir:<root>:<split> | manifest:<path>"


def open_source(
    spec: str | SourceSpec,
    *,
    data_dir: str | os.PathLike | None = None,
    on_missing: str = "error",
    skip_corrupt: bool = True,
):
    """Opens a source from a spec (see the module docstring).

    Args:
      data_dir: TFDS data directory (``tfds:``; default TFDS's own), or where a
        ``librispeech_dir:`` split is prepared (default ``<root>/_tfds``).
      on_missing: missing audio files in a manifest: ``'error'`` or ``'skip'`` (counted, logged).
      skip_corrupt: wrap in `SkipCorrupt` (records with undecodable audio become ``None``).
    """
    spec = SourceSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.kind == "manifest":
        from jaxspeech.data.manifest import ManifestSource

        source = ManifestSource(spec.location, on_missing=on_missing)
    elif spec.kind == "tfds":
        source = TfdsSource(spec.location, spec.split, data_dir)
    elif spec.kind == "librispeech_dir":
        from jaxspeech.data.librispeech import open_librispeech_dir

        source = open_librispeech_dir(spec.location, spec.split, data_dir=data_dir)
    else:
        raise ValueError(f"unknown source kind {spec.kind!r} ({_SYNTAX})")
    return SkipCorrupt(source) if skip_corrupt else source
