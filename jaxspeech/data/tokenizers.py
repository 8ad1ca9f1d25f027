"""Tokenizers for transducer labels: characters and SentencePiece, both with blank = id 0.

Both normalize text the same way (`normalize_text`) before encoding, so transcripts in any case
and punctuation style map to the same labels, and `decode` returns normalized text (compare
references with `normalize_text` applied when scoring WER).

A tokenizer is saved to a directory as ``tokenizer.json`` (a small descriptor: kind, version,
character vocabulary) plus ``tokenizer.model`` for SentencePiece; `load_tokenizer` restores either.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence

import sentencepiece as spm

__all__ = [
    "BLANK_ID",
    "CharTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "normalize_text",
]

BLANK_ID = 0
_DESCRIPTOR = "tokenizer.json"
_SP_MODEL = "tokenizer.model"
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The label normalization: NFKC, lowercase, typographic apostrophes -> ``'``, every other
    punctuation or symbol character -> space, whitespace collapsed to single spaces and stripped.

    ``"Don’t  STOP -- me, now!"`` -> ``"don't stop me now"``. Letters, digits and marks of any
    script are kept (whether the tokenizer can represent them is its vocabulary's business).
    """
    text = unicodedata.normalize("NFKC", text).lower().translate(_APOSTROPHES)
    kept = [" " if c != "'" and unicodedata.category(c)[0] in "PSZC" else c for c in text]
    return _SPACES.sub(" ", "".join(kept)).strip()


def _normalized_or_raise(text: str) -> str:
    norm = normalize_text(text)
    if not norm:
        raise ValueError(f"empty transcript after normalization: {text!r}")
    return norm


class Tokenizer(abc.ABC):
    """Interface shared by the tokenizers: ids are >= 1, id 0 is the blank."""

    kind: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids including the blank (the model's output size)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Normalized ``text`` -> ids (>= 1); ``ValueError`` if empty or not representable."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> normalized text; blanks (0, also label padding) are skipped."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Writes the tokenizer to ``directory`` (read back with `load_tokenizer`)."""

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        """Drops blanks (and label padding, which is 0); rejects ids outside the vocabulary."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i != BLANK_ID:
                out.append(i)
        return out

    def fingerprint(self) -> str:
        """Identifies what `encode` does (kind, normalization, vocabulary): caches of label
        lengths are keyed by it."""
        return hashlib.sha1(self.kind.encode() + b"|v1|" + self._vocabulary()).hexdigest()[:16]

    @abc.abstractmethod
    def _vocabulary(self) -> bytes:
        """The vocabulary, serialized (for `fingerprint`)."""

    def _write_descriptor(self, directory, **fields) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, _DESCRIPTOR), "w", encoding="utf-8") as f:
            json.dump(
                {"kind": self.kind, "version": 1, "normalization": "v1", **fields},
                f,
                ensure_ascii=False,
                indent=1,
            )


class CharTokenizer(Tokenizer):
    """One id per character of the normalized text (space included): ids ``1..len(chars)``."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError(f"chars must be distinct single characters, got {chars!r}")
        self.chars = list(chars)
        self._ids = {c: i + 1 for i, c in enumerate(self.chars)}

    @classmethod
    def from_transcripts(cls, texts: Iterable[str]) -> CharTokenizer:
        """The characters of the normalized training transcripts, sorted (deterministic)."""
        chars = set()
        for text in texts:
            chars.update(normalize_text(text))
        if not chars:
            raise ValueError("no characters in the training transcripts (all empty?)")
        return cls(sorted(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        norm = _normalized_or_raise(text)
        try:
            return [self._ids[c] for c in norm]
        except KeyError as e:
            c = e.args[0]
            raise ValueError(
                f"cannot encode {text!r}: character {c!r} (U+{ord(c):04X}) is not in the "
                f"vocabulary of {len(self.chars)} characters"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i - 1] for i in self._check_ids(ids))

    def save(self, directory: str | os.PathLike) -> None:
        self._write_descriptor(directory, chars=self.chars)

    def _vocabulary(self) -> bytes:
        return json.dumps(self.chars).encode()


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with ids shifted by one: token id = piece id + 1, so 0 is the blank.

    The model has no bos/eos/pad; its ``<unk>`` piece occupies id 1 but `encode` never emits it:
    text with a character the model does not cover raises ``ValueError`` instead.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self._unk = self.sp.unk_id()

    def __getstate__(self):  # picklable for grain worker processes
        return {"model_proto": self.model_proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    def _vocabulary(self) -> bytes:
        return self.model_proto

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        model_type: str = "unigram",
        max_sentences: int = 2_000_000,
        **trainer_kwargs,
    ) -> SentencePieceTokenizer:
        """Trains on the normalized transcripts. ``vocab_size`` counts the blank, so the model has
        ``vocab_size - 1`` pieces. Every character of the training text is covered
        (``character_coverage=1.0``). Extra keyword arguments go to ``SentencePieceTrainer``."""
        sentences = [s for s in (normalize_text(t) for t in texts) if s]
        if not sentences:
            raise ValueError("no training transcripts for SentencePiece (all empty?)")
        model = io.BytesIO()
        options = dict(
            model_type=model_type,
            vocab_size=vocab_size - 1,
            character_coverage=1.0,
            normalization_rule_name="identity",
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
        options.update(trainer_kwargs)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=model, **options
            )
        except RuntimeError as e:
            raise ValueError(
                f"SentencePiece training failed for vocab_size={vocab_size} (blank included, so "
                f"{vocab_size - 1} pieces) on {len(sentences)} transcripts: {e}"
            ) from None
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + 1

    def encode(self, text: str) -> list[int]:
        norm = _normalized_or_raise(text)
        pieces = self.sp.encode(norm, out_type="proto").pieces
        for p in pieces:
            if p.id == self._unk:
                c = p.surface[0] if p.surface else p.piece[0]
                raise ValueError(
                    f"cannot encode {text!r}: character {c!r} (U+{ord(c):04X}) is not covered "
                    "by the SentencePiece model"
                )
        return [p.id + 1 for p in pieces]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i - 1 for i in self._check_ids(ids)])

    def save(self, directory: str | os.PathLike) -> None:
        self._write_descriptor(directory, model_file=_SP_MODEL)
        with open(os.path.join(directory, _SP_MODEL), "wb") as f:
            f.write(self.model_proto)


def load_tokenizer(directory: str | os.PathLike) -> CharTokenizer | SentencePieceTokenizer:
    """Restores a tokenizer written by ``save(directory)``."""
    path = os.path.join(directory, _DESCRIPTOR)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer in {directory!s}: expected {path}")
    with open(path, encoding="utf-8") as f:
        desc = json.load(f)
    kind = desc.get("kind")
    if kind == CharTokenizer.kind:
        return CharTokenizer(desc["chars"])
    if kind == SentencePieceTokenizer.kind:
        with open(os.path.join(directory, desc["model_file"]), "rb") as f:
            return SentencePieceTokenizer(f.read())
    raise ValueError(
        f"{path}: unknown tokenizer kind {kind!r} (expected 'char' or 'sentencepiece')"
    )
