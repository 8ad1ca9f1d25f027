"""Character and SentencePiece tokenizers: normalization, round trips, save/load, errors."""

import json
import os
import pickle
import subprocess
import sys

import pytest

from jaxspeech.data.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    normalize_text,
)

TRANSCRIPTS = [
    "He hoped there would be stew for dinner, turnips and carrots.",
    "Stuff it into you, his belly counselled him!",
    "After early nightfall the yellow lamps would light up, here and there.",
    "The squalid quarter of the brothels; don't you think so?",
    "Hello bertie, any good in your mind?",
    "Number ten, fresh nelly is waiting on you.",
    "Good night, husband.",
    "The music came nearer and he recalled the words.",
    "Just jumping over six lazy foxes quickly.",
] * 4


def test_normalize_text():
    assert normalize_text("Don\u2019t  STOP -- me,\tnow!") == "don't stop me now"
    assert normalize_text("  Well-known.  ") == "well known"
    assert normalize_text("caf\u00e9 N\u00ba 5") == "café no 5"  # NFKC: º -> o
    assert normalize_text("?!.") == ""


@pytest.fixture(scope="module", params=["char", "sentencepiece"])
def tokenizer(request):
    if request.param == "char":
        return CharTokenizer.from_transcripts(TRANSCRIPTS)
    return SentencePieceTokenizer.train(TRANSCRIPTS, vocab_size=64)


def test_round_trip(tokenizer):
    for text in TRANSCRIPTS[:9] + ["he would hop over the dinner", "stew"]:
        ids = tokenizer.encode(text)
        assert ids and min(ids) >= 1 and max(ids) < tokenizer.vocab_size
        assert tokenizer.decode(ids) == normalize_text(text)
        # Blanks (and 0 label padding) are ignored by decode.
        assert tokenizer.decode([0] + ids + [0, 0]) == normalize_text(text)


def test_vocab_size(tokenizer):
    if isinstance(tokenizer, CharTokenizer):
        chars = sorted(set("".join(normalize_text(t) for t in TRANSCRIPTS)))
        assert tokenizer.chars == chars and tokenizer.vocab_size == len(chars) + 1
    else:
        assert tokenizer.vocab_size == 64
        # Sub-word units: fewer tokens than characters on training text.
        text = normalize_text(TRANSCRIPTS[0])
        assert len(tokenizer.encode(text)) < len(text)


def test_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    desc = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert desc["kind"] == tokenizer.kind
    restored = load_tokenizer(tmp_path / "tok")
    assert type(restored) is type(tokenizer)
    clone = pickle.loads(pickle.dumps(tokenizer))  # grain worker processes pickle it
    assert clone.encode(TRANSCRIPTS[0]) == tokenizer.encode(TRANSCRIPTS[0])
    assert restored.vocab_size == tokenizer.vocab_size
    for text in TRANSCRIPTS[:9]:
        assert restored.encode(text) == tokenizer.encode(text)


def test_fingerprint(tokenizer, tmp_path):
    """Equal for the same vocabulary (also saved and loaded), different for another."""
    tokenizer.save(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").fingerprint() == tokenizer.fingerprint()
    if isinstance(tokenizer, CharTokenizer):
        other = CharTokenizer(tokenizer.chars + ["#"])
    else:
        other = SentencePieceTokenizer.train(TRANSCRIPTS, vocab_size=48)
    assert other.fingerprint() != tokenizer.fingerprint()


def test_saved_vocabulary_is_utf8_whatever_the_locale(tmp_path):
    """A vocabulary with non-ASCII characters saved and loaded in an ASCII locale (LC_ALL=C, no
    UTF-8 mode) reads back the same, and the file is UTF-8."""
    code = (
        "import sys; from jaxspeech.data.tokenizers import CharTokenizer, load_tokenizer;"
        "t = CharTokenizer.from_transcripts(['caf\\u00e9 cr\\u00e8me', 'na\\u00efve']);"
        "t.save(sys.argv[1]);"
        "print(load_tokenizer(sys.argv[1]).chars == t.chars)"
    )
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0")
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "tok")], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr[-2000:]
    desc = json.loads((tmp_path / "tok" / "tokenizer.json").read_bytes().decode("utf-8"))
    assert {"é", "è", "ï"} <= set(desc["chars"])


def test_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"'Room #7'.*character '7'"):
        tokenizer.encode("Room #7")
    with pytest.raises(ValueError, match="empty transcript"):
        tokenizer.encode(" ... ")
    with pytest.raises(ValueError, match=f"token id {tokenizer.vocab_size} is outside"):
        tokenizer.decode([1, tokenizer.vocab_size])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")


def test_training_errors():
    with pytest.raises(ValueError, match="all empty"):
        CharTokenizer.from_transcripts(["", "?!"])
    with pytest.raises(ValueError, match="all empty"):
        SentencePieceTokenizer.train(["..."], vocab_size=10)
    with pytest.raises(ValueError, match=r"vocab_size=500 \(blank included, so 499 pieces\)"):
        SentencePieceTokenizer.train(["hello world"] * 3, vocab_size=500)
    with pytest.raises(ValueError, match="distinct single characters"):
        CharTokenizer(["a", "a"])
