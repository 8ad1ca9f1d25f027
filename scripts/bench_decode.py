r"""Decoding speed: greedy, beam and streaming search against the encoder forward pass.

  python scripts/bench_decode.py --config experiments/commands_tt.py
  python scripts/bench_decode.py --config experiments/librispeech_tt.py --vocab_size 1024 \
      --batch_size 16 --seconds 15

In one process, on the same batch of `--batch_size` utterances of `--seconds` seconds (median of
`--reps` interleaved rounds after a warm-up):
  * `encoder`: jitted log-mel + `model.encode` + the joint's encoder projection: the work every
    decoder must do, the baseline of the ratios;
  * `greedy`, `beam`: `jaxspeech.train.evaluate.Recognizer` (log-mel, encoder, search: one jit);
  * `stream`: one `StreamingRecognizer.step` on a chunk of one encoder chunk of audio
    (`chunk_size * subsampling_factor` feature frames), for B streams at once and for one stream;
    its real-time factor is the step time over the chunk's duration.
The weights are random (or `--workdir`'s), the audio is noise: an untrained model emits up to
`max_symbols_per_frame` labels on most frames, the worst case for the label loops, so the search
ratios are upper bounds of what a trained model costs.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from jaxspeech import features
from jaxspeech.decoding.streaming import StreamingRecognizer
from jaxspeech.models import TransformerTransducer
from jaxspeech.train import evaluate as evaluate_lib
from jaxspeech.train import state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/commands_tt.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (default: random weights).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Utterances per batch.")
_SECONDS = flags.DEFINE_float("seconds", 0.0, "Utterance length (default: data.max_duration).")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size when config.model has -1.")
_BEAM = flags.DEFINE_integer("beam_size", 4, "Beam width.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed rounds.")


def _median_times(fns: dict, reps: int) -> dict:
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _model(config):
    if _WORKDIR.value:
        return evaluate_lib.load_trained(_WORKDIR.value).model
    vocab = _VOCAB.value or (config.model.vocab_size if config.model.vocab_size > 0 else 32)
    cfg = state_lib.model_config(config.model, vocab_size=vocab, bf16=config.train.bf16)
    return TransformerTransducer(cfg, rngs=nnx.Rngs(0))


def main(argv):
    del argv
    config = _CONFIG.value
    model = _model(config)
    model.eval()
    feature_cfg = features.FeatureConfig(n_mels=model.cfg.num_mels)
    seconds = _SECONDS.value or float(config.data.max_duration)
    batch, n = _BATCH.value, int(seconds * feature_cfg.sample_rate)
    rng = np.random.default_rng(0)
    audio = jnp.asarray(0.1 * rng.standard_normal((batch, n)), jnp.float32)
    lengths = jnp.full((batch,), n, jnp.int32)
    opts = dict(max_symbols_per_frame=int(config.eval.max_symbols_per_frame))

    graphdef, params = nnx.split(model)

    @jax.jit
    def encode(params, audio, lengths):
        m = nnx.merge(graphdef, params)
        feats, feat_lengths = features.log_mel(audio, lengths, feature_cfg)
        enc, enc_lengths = m.encode(feats, feat_lengths)
        return m.joint.project_encoder(enc), enc_lengths

    greedy = evaluate_lib.Recognizer(model, feature_cfg, decoder="greedy", **opts)
    beam = evaluate_lib.Recognizer(
        model, feature_cfg, decoder="beam", beam_size=_BEAM.value, **opts
    )
    stream = StreamingRecognizer(model, feature_cfg, **opts)
    chunk = stream.feat_chunk * feature_cfg.hop_length
    chunk_audio = np.asarray(audio[:, :chunk])
    states = {b: stream.init(b) for b in (batch, 1)}

    def stream_step(b):
        return lambda: jax.block_until_ready(stream.step(states[b], chunk_audio[:b]))

    fns = {
        "encoder": lambda: jax.block_until_ready(encode(params, audio, lengths)),
        "greedy": lambda: greedy._decode(greedy.state, audio, lengths)[0].block_until_ready(),
        "beam": lambda: beam._decode(beam.state, audio, lengths)[0].block_until_ready(),
        f"stream_step_b{batch}": stream_step(batch),
        "stream_step_b1": stream_step(1),
    }
    t = _median_times(fns, _REPS.value)
    audio_s = batch * seconds
    chunk_s = chunk / feature_cfg.sample_rate
    report = {
        "device": jax.devices()[0].device_kind,
        "batch_size": batch,
        "utterance_seconds": seconds,
        "chunk_seconds": chunk_s,
        "params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
        "ms": {k: round(v * 1e3, 3) for k, v in t.items()},
        "rtf": {
            "encoder": t["encoder"] / audio_s,
            "greedy": t["greedy"] / audio_s,
            "beam": t["beam"] / audio_s,
            f"stream_b{batch}": t[f"stream_step_b{batch}"] / (batch * chunk_s),
            "stream_b1": t["stream_step_b1"] / chunk_s,
        },
        "ratio_to_encoder": {
            "greedy": t["greedy"] / t["encoder"],
            "beam": t["beam"] / t["encoder"],
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
