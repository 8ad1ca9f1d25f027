r"""Transcribes audio files with a trained workdir's latest checkpoint (greedy decoding).

  python scripts/transcribe.py --workdir runs/commands_tt a.wav b.flac

Prints one line per file: `<path>\t<transcript>`. `--artifact FILE` takes the weights from a
quantized artifact (scripts/export_quantized.py) instead of the checkpoint.
"""

import argparse
import os

from absl import logging

from jaxspeech.train import evaluate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--decoder", choices=evaluate.DECODERS, default="greedy")
    p.add_argument(
        "--artifact", default=None, help="quantized artifact (a path, or a file in the workdir)"
    )
    p.add_argument("files", nargs="+", help="audio files (wav, flac, ...; resampled to 16 kHz)")
    args = p.parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:  # before the model is loaded
        raise FileNotFoundError(f"audio files not found: {', '.join(missing)}")

    if args.artifact:
        trained = evaluate.load_artifact(args.workdir, evaluate.artifact_path(args))
    else:
        trained = evaluate.load_trained(args.workdir)
    recognizer = evaluate.Recognizer(
        trained.model, decoder=args.decoder, beam_size=trained.config.eval.beam_size
    )
    for path, text in zip(
        args.files,
        evaluate.transcribe_files(recognizer, trained.tokenizer, args.files),
        strict=True,
    ):
        print(f"{path}\t{text}", flush=True)


if __name__ == "__main__":
    main()
