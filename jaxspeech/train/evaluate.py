"""Evaluation: transducer decoding of batches, WER (substitutions, deletions, insertions) via jiwer,
and the real-time factor (decode wall time / audio duration).

    recognizer = Recognizer(model, feature_cfg, decoder="greedy")
    report = evaluate(recognizer, batches, tokenizer)  # {'wer', 'substitutions', 'rtf', ...}
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jiwer
import ml_collections
import numpy as np
from flax import nnx

from jaxspeech import decoding, features


def normalize_text(text: str) -> str:
    return " ".join(text.lower().split())


def wer_stats(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus WER with its error counts. Empty references are allowed (every hyp word inserts)."""
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    s = d = i = h = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        if not ref:  # jiwer rejects empty references
            i += len(hyp.split())
            continue
        out = jiwer.process_words(ref, hyp)
        s, d, i, h = s + out.substitutions, d + out.deletions, i + out.insertions, h + out.hits
    n = s + d + h
    return {
        "wer": (s + d + i) / max(n, 1),
        "substitutions": s,
        "deletions": d,
        "insertions": i,
        "hits": h,
        "num_words": n,
        "num_utterances": len(refs),
    }


def _decode_output(out):
    """(tokens, lengths) from a decoder's return value (a tuple whose first two are those)."""
    tokens, lengths = out[0], out[1]
    return tokens, lengths


DECODERS = ("greedy", "beam")


def check_decoder(decoder: str, field: str = "decoder") -> None:
    if decoder not in DECODERS:
        raise ValueError(f"{field} must be one of {DECODERS}, got {decoder!r}")


class Recognizer:
    """A jitted audio -> token ids function for a TransformerTransducer (eval mode)."""

    def __init__(
        self,
        model,
        feature_cfg: features.FeatureConfig | None = None,
        *,
        decoder: str = "greedy",
        beam_size: int = 4,
        max_symbols_per_frame: int = 3,
        max_output_len: int | None = None,
    ):
        check_decoder(decoder)
        self.feature_cfg = feature_cfg or features.FeatureConfig(n_mels=model.cfg.num_mels)
        if self.feature_cfg.n_mels != model.cfg.num_mels:
            raise ValueError(
                f"feature n_mels {self.feature_cfg.n_mels} != the model's num_mels "
                f"{model.cfg.num_mels}: pass FeatureConfig(n_mels={model.cfg.num_mels})"
            )
        model.eval()
        self.graphdef, self.state = nnx.split(model)
        feature_cfg = self.feature_cfg

        def decode(state, audio, audio_lengths):
            model = nnx.merge(self.graphdef, state)
            feats, feat_lengths = features.log_mel(audio, audio_lengths, feature_cfg)
            options = dict(max_symbols_per_frame=max_symbols_per_frame)
            if max_output_len:
                options["max_output_len"] = max_output_len
            if decoder == "beam":
                out = decoding.transducer_beam(
                    model, feats, feat_lengths, beam_size=beam_size, **options
                )
            else:
                out = decoding.transducer_greedy(model, feats, feat_lengths, **options)
            return _decode_output(out)

        self._decode = jax.jit(decode)

    def set_model(self, model) -> None:
        """Swaps in new weights of the same model (no recompilation)."""
        model.eval()
        self.state = nnx.state(model)

    def __call__(self, audio, audio_lengths) -> list[list[int]]:
        tokens, lengths = self._decode(
            self.state, jnp.asarray(audio, jnp.float32), jnp.asarray(audio_lengths, jnp.int32)
        )
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        return [t[:n].tolist() for t, n in zip(tokens, lengths, strict=False)]


def recognizer_for(model, config, feature_cfg=None, **overrides) -> Recognizer:
    """A Recognizer decoding as the config's `eval` section says; keyword overrides that are not
    None (decoder, beam_size, max_symbols_per_frame, max_output_len) take precedence."""
    options = {k: config.eval[k] for k in ("decoder", "beam_size", "max_symbols_per_frame")}
    options["max_output_len"] = config.eval.max_output_len
    options.update({k: v for k, v in overrides.items() if v is not None})
    return Recognizer(model, feature_cfg, **options)


def pad_audio(waves: Sequence[np.ndarray], multiple: int = 16000) -> tuple[np.ndarray, np.ndarray]:
    """Pads waveforms into one [B, N] batch (N rounded up to `multiple` to limit recompiles)."""
    lengths = np.array([len(w) for w in waves], np.int32)
    n = max(int(-(-lengths.max() // multiple) * multiple), multiple)
    audio = np.zeros((len(waves), n), np.float32)
    for row, w in zip(audio, waves, strict=False):
        row[: len(w)] = w
    return audio, lengths


def evaluate(
    recognizer: Recognizer,
    batches: Iterable[Mapping[str, np.ndarray]],
    tokenizer,
    *,
    max_utterances: int = -1,
    sample_rate: int = 16000,
    keep_utterances: bool = False,
) -> dict:
    """Decodes every batch (dicts with audio, audio_lengths, text) and scores the WER.

    Returns the `wer_stats` fields plus `rtf` (decode seconds / audio seconds, after a warm-up
    batch per shape is excluded from timing), `audio_seconds`, `decode_seconds` and a few examples;
    with `keep_utterances`, also `utterances`: every `{"id", "ref", "hyp"}` in order.
    """
    refs, hyps, ids, seen_shapes = [], [], [], set()
    decode_s = audio_s = 0.0
    for batch in batches:
        audio, lengths = np.asarray(batch["audio"]), np.asarray(batch["audio_lengths"])
        valid = lengths > 0
        if audio.shape not in seen_shapes:  # compile outside the timed region
            seen_shapes.add(audio.shape)
            recognizer(audio, lengths)
        start = time.perf_counter()
        out = recognizer(audio, lengths)
        decode_s += time.perf_counter() - start
        audio_s += float(lengths[valid].sum()) / sample_rate
        for k in np.flatnonzero(valid):
            refs.append(str(batch["text"][k]))
            hyps.append(tokenizer.decode(out[k]))
            ids.append(str(batch["id"][k]) if "id" in batch else str(len(ids)))
        if 0 <= max_utterances <= len(refs):
            break
    if max_utterances >= 0:
        refs, hyps, ids = refs[:max_utterances], hyps[:max_utterances], ids[:max_utterances]
    report = wer_stats(refs, hyps)
    report.update(
        rtf=decode_s / max(audio_s, 1e-9),
        audio_seconds=audio_s,
        decode_seconds=decode_s,
        examples=[{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps, strict=False))[:5]],
    )
    if keep_utterances:
        report["utterances"] = [
            {"id": i, "ref": r, "hyp": h} for i, r, h in zip(ids, refs, hyps, strict=True)
        ]
    return report


# ---- a trained workdir: model + tokenizer, for scripts/evaluate.py and scripts/transcribe.py ----


class Trained(NamedTuple):
    model: object  # TransformerTransducer with the weights it runs with (fake-quantized if QAT)
    tokenizer: object
    config: ml_collections.ConfigDict
    step: int
    params: object = None  # the trained parameters as stored (the QAT trainable tree under QAT)
    quant_rules: tuple | None = None  # the QAT rules (None: a float model)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a training workdir: no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_trained(workdir: str, step: int | None = None) -> Trained:
    """The model of `workdir`'s latest (or given) checkpoint, its tokenizer and config."""
    from jaxspeech.data import tokenizers
    from jaxspeech.train import checkpoint, quantize, sharding
    from jaxspeech.train import state as state_lib

    config = load_config(workdir)
    tokenizer = tokenizers.load_tokenizer(os.path.join(workdir, "tokenizer"))
    ckpt = checkpoint.Checkpointer(workdir, keep=int(config.train.keep_checkpoints))
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    model_cfg = state_lib.model_config(
        config.model, vocab_size=tokenizer.vocab_size, bf16=bool(config.train.bf16)
    )
    rules = quantize.rules_from_config(config.get("quant"))
    tx, _ = state_lib.make_optimizer(config.optim, int(config.train.num_steps), rules)
    mesh = sharding.make_mesh(config.mesh)
    graphdef, abstract, _ = state_lib.abstract_train_state(
        model_cfg,
        tx,
        mesh,
        sharding.axis_rules(config.mesh),
        seed=int(config.train.seed),
        quant_rules=rules,
    )
    state, _ = ckpt.restore(abstract, step)
    ckpt.close()
    model = state_lib.merge_model(graphdef, state, rules)
    return Trained(model, tokenizer, config, int(step), state["params"], rules)


def inference_state(model):
    """The model state an exported artifact holds: parameters and feature statistics."""
    from jaxspeech.models.transducer import FeatureStat

    return nnx.state(model, nnx.Any(nnx.Param, FeatureStat))


def artifact_path(args) -> str:
    """`args.artifact` as given, or relative to `args.workdir` when that is where it exists."""
    inside = os.path.join(args.workdir, args.artifact)
    return args.artifact if os.path.exists(args.artifact) or not os.path.exists(inside) else inside


def load_artifact(workdir: str, artifact: str) -> Trained:
    """A model whose weights come from a quantized artifact (`scripts/export_quantized.py`), with
    the config and tokenizer of the `workdir` it was exported from (no checkpoint is read). Its
    outputs equal those of the QAT model the artifact was exported from, bit for bit."""
    from jaxspeech.data import tokenizers
    from jaxspeech.models import TransformerTransducer
    from jaxspeech.quant import export
    from jaxspeech.train import state as state_lib

    config = load_config(workdir)
    tokenizer = tokenizers.load_tokenizer(os.path.join(workdir, "tokenizer"))
    model_cfg = state_lib.model_config(
        config.model, vocab_size=tokenizer.vocab_size, bf16=bool(config.train.bf16)
    )
    model = TransformerTransducer(model_cfg, rngs=nnx.Rngs(int(config.train.seed)))
    state = inference_state(model)
    loaded = export.load_quantized(artifact, template=nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, loaded)
    nnx.update(model, state)
    return Trained(model, tokenizer, config, -1)


def transcribe_files(
    recognizer: Recognizer, tokenizer, paths: Sequence[str], *, batch_size: int = 8
) -> list[str]:
    """Transcripts of audio files (any format `jaxspeech.data.audio.load_audio` reads)."""
    from jaxspeech.data import audio as audio_lib

    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"audio files not found: {', '.join(missing)}")
    out = []
    for start in range(0, len(paths), batch_size):
        waves = [audio_lib.load_audio(p) for p in paths[start : start + batch_size]]
        audio, lengths = pad_audio(waves)
        out.extend(tokenizer.decode(ids) for ids in recognizer(audio, lengths))
    return out
