"""Build the spoken-commands corpus (TFDS `spoken_commands`) into a data dir; print time and hours.

    python scripts/build_corpus.py --config tiny --data_dir /tmp/tfds        # seconds
    python scripts/build_corpus.py --config default --data_dir ~/tensorflow_datasets  # minutes
    python scripts/build_corpus.py --config default --num_train 2000 --seed 3 --name small_s3

Neither building (TFDS 4.9.10, array_record) nor reading imports TensorFlow; older TFDS may
need it to build (`pip install -e .[build]`). Read with
`tfds.data_source("spoken_commands/<config>", split=..., data_dir=...)` after
`import jaxspeech.data.commands`. A config with overridden sizes/seed gets its own name (--name),
so it never collides with the registered `tiny`/`default` in the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="default", choices=["tiny", "default"])
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (TFDS default if unset)")
    parser.add_argument("--num_workers", type=int, default=None, help="synthesis processes")
    for field in ("num_train", "num_validation", "num_test", "seed"):
        parser.add_argument(f"--{field}", type=int, default=None)
    parser.add_argument("--name", default=None, help="config name when sizes/seed are overridden")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    from jaxspeech.data.commands import builder as corpus

    config = next(c for c in corpus.CONFIGS if c.name == args.config)
    overrides = {
        f: getattr(args, f)
        for f in ("num_train", "num_validation", "num_test", "seed")
        if getattr(args, f) is not None
    }
    if overrides:
        config = dataclasses.replace(config, name=args.name or f"{args.config}_custom", **overrides)
    if args.num_workers is not None:  # does not change the data: no new name needed
        config = dataclasses.replace(config, num_workers=args.num_workers)

    start = time.perf_counter()
    builder = corpus.SpokenCommands(config=config, data_dir=args.data_dir)
    builder.download_and_prepare()
    elapsed = time.perf_counter() - start
    print(f"spoken_commands/{config.name} ready in {builder.data_dir}")
    print(f"build time {elapsed:.1f} s ({config.num_workers} workers)")
    for split in ("train", "validation", "test"):
        hours = corpus.total_hours(builder, split)
        count = builder.info.splits[split].num_examples
        print(f"  {split:<10} {count:>6} utterances  {hours:6.2f} h")


if __name__ == "__main__":
    main()
