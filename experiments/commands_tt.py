r"""Transformer-transducer on the offline spoken-commands corpus (espeak-ng speech).

The default variant builds the `spoken_commands/default` corpus, trains a small streaming
Transformer-transducer for ~1.2 epochs and evaluates it (beam search): 10.95% test WER in 17 min
13 s on 2 CPU cores from a fresh clone, set-up and corpus build included:

  python scripts/train.py --config experiments/commands_tt.py --workdir runs/commands_tt

Smoke run in seconds (the `tiny` corpus, a two-layer model, a handful of steps):

  python scripts/train.py --config experiments/commands_tt.py:tiny --workdir /tmp/commands_tiny

Any field can be overridden, e.g. `--config.train.num_steps=2000 --config.data.batch_size=32`;
the config is locked, so a misspelled key is an error.
"""

import ml_collections

from jaxspeech.train import quantize

# The numbers that decide the run's cost and quality, in one place. Measured on 2 CPU cores
# (validation WER after 1 epoch, experiments/RESULTS.md): batch 8 learns more per epoch than 16 at
# the same audio seconds per second; an auxiliary CTC loss on the encoder (weight 1.0) and no
# SpecAugment or dropout (regularizers only pay after several epochs) learn much faster; an LSTM
# predictor (an internal character language model) instead of a stateless one, 27.4% -> 18.1%
# test WER, and beam search, 14.9% -> 11.0% on the calibrated corpus.
STEPS, BATCH, D_MODEL, LAYERS, LR, CTC = 2400, 8, 144, 4, 2e-3, 1.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r}; use commands_tt.py or commands_tt.py:tiny")
    corpus = "tiny" if tiny else "default"
    c = ml_collections.ConfigDict()

    # TransducerConfig fields (jaxspeech.models); vocab_size=-1 is filled from the tokenizer.
    c.model = ml_collections.ConfigDict(
        dict(
            num_mels=80,
            vocab_size=-1,
            d_model=32 if tiny else D_MODEL,
            num_heads=2 if tiny else 4,
            mlp_dim=64 if tiny else 4 * D_MODEL,
            num_layers=1 if tiny else LAYERS,
            subsampling_factor=4,
            subsampling_channels=8 if tiny else 32,
            chunk_size=8,
            left_chunks=4,
            lookahead_chunks=0,
            dropout=0.0,
            predictor="lstm",  # an LSTM: the internal language model that spells the vocabulary
            predictor_dim=32 if tiny else D_MODEL,
            predictor_layers=1,
            stateless_context=2,
            ctc_weight=0.0 if tiny else CTC,
            activation_bits=0,  # 8: 8-bit activations (QAT, see jaxspeech.models.config)
            # Arbitrators (experiments/commands_arbitrator.py; jaxspeech.models.arbitrator).
            arbitrator="none",
            arbitrator_dim=32,
            gate_estimator="gumbel_st",
            gate_init_bias=4.0,
            compute_weight=0.0,
            attention_cost=1.0,  # the compute loss's price of an attention FLOP (vs FFN)
            gate_per_chunk=False,  # one gate decision per attention chunk (streaming skips)
            static_attention="",  # static pruning, one '0'/'1' per layer ('' = all on)
            static_ffn="",
            compute_target=0.0,  # a compute budget instead of a price (jaxspeech.models.config)
            full_pass_weight=0.0,  # in-place self-distillation of a gated encoder
            distill_weight=0.0,  # (jaxspeech.models.config; the `distill` option)
            joint_dim=32 if tiny else D_MODEL,
            dtype="float32",
            param_dtype="float32",
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            # Source specs (jaxspeech.data.sources): tfds:<name>[/<config>]:<split>,
            # librispeech_dir:<root>:<split> or manifest:<path.jsonl>. The spoken-commands corpus
            # is built on first use.
            train=f"tfds:spoken_commands/{corpus}:train",
            validation=f"tfds:spoken_commands/{corpus}:validation",
            test=f"tfds:spoken_commands/{corpus}:test",
            tfds_data_dir="",  # '' = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
            tokenizer="char",  # 'char' | 'sentencepiece'
            vocab_size=0,  # sentencepiece only
            bucket_seconds=() if tiny else (2.0, 3.0, 4.5, 6.0),  # + max_duration
            batch_size=4 if tiny else BATCH,
            eval_batch_size=4 if tiny else 32,
            max_duration=4.5 if tiny else 6.0,
            max_label_length=96,
            num_norm_utterances=16 if tiny else 300,
            num_eval_utterances=8 if tiny else 200,  # periodic validation subset (-1 = all)
            eval_split="validation",  # which of train/validation/test the periodic eval uses
            num_workers=0,
            spec_augment=ml_collections.ConfigDict(
                dict(
                    enabled=False,  # pays off in runs of many epochs
                    num_freq_masks=2,
                    max_freq_width=10,
                    num_time_masks=2,
                    max_time_frac=0.05,
                )
            ),
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=3e-3 if tiny else LR,
            warmup_steps=2 if tiny else 300,
            schedule="cosine",  # 'cosine' | 'rsqrt' | 'constant'
            end_lr_fraction=0.05,
            b1=0.9,
            b2=0.98,
            eps=1e-9,
            weight_decay=1e-2,
            grad_clip_norm=1.0,
            arbitrator_lr_scale=1.0,  # learning-rate multiplier of arbitrator parameters
            theta_lr_scale=1.0,  # learning-rate multiplier of squashed kernels' theta
        )
    )

    c.mesh = ml_collections.ConfigDict(
        dict(
            data=-1,  # -1: all remaining devices
            fsdp=1,
            tensor=1,
            # logical axis name -> mesh axis (or a tuple of mesh axes, or None = replicated)
            logical_axis_rules=[
                ("batch", ("data", "fsdp")),
                ("frames", None),
                ("embed", "fsdp"),
                ("mlp", "tensor"),
                ("heads", "tensor"),
                ("kv", None),
                ("vocab", "tensor"),
                ("joint", "tensor"),
                ("conv_in", None),
                ("conv_out", "tensor"),
            ],
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            num_steps=6 if tiny else STEPS,
            log_every=2 if tiny else 25,
            eval_every=6 if tiny else 800,
            checkpoint_every=6 if tiny else 800,
            keep_checkpoints=2,
            bf16=False,
            seed=0,
            nonfinite="fail",  # NaN/Inf loss or gradient: 'fail' (naming step, batch) or 'skip'
            init_from="",  # a trained workdir to warm-start from (params, normalization, tokenizer)
            teacher="",  # a trained workdir to distill from (same tokenizer; train/teacher.py)
            teacher_weight=0.0,  # its lattice distillation term's weight (nats per utterance)
            gate_temperature=(1.0, 1.0),  # arbitrator gates: (start, end), exponential anneal
            hard_gate_steps=0,  # arbitrators: the last N steps train with the inference gates
            budget_anneal=(0, 0),  # arbitrators: (start, steps) lowering a budget from 1
        )
    )

    c.eval = ml_collections.ConfigDict(
        # max_output_len=0: T * max_symbols_per_frame (never truncates)
        # Beam search: 10.95% test WER vs 14.91% greedy for the same model (experiments/RESULTS.md).
        dict(
            decoder="greedy" if tiny else "beam",
            beam_size=4,
            max_symbols_per_frame=3,
            max_output_len=0,
        )
    )
    # Quantization-aware training (squashed weights); off here (experiments/commands_squashed.py).
    c.quant = quantize.default_config(enabled=False)
    return c
