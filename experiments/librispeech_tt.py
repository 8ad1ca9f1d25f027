r"""Paper-sized streaming Transformer-transducer on LibriSpeech 960 h.

Model after Zhang et al. 2020 ("Transformer Transducer"): 18 pre-LN Transformer encoder layers,
d_model 512, 8 heads, FFN 2048, chunked causal attention (here 8 x 40 ms chunks, 4 chunks of left
context), a one-layer LSTM predictor, SentencePiece 1024 output units. bf16 compute on
accelerators.

From the prepared TFDS `librispeech` dataset (`$TFDS_DATA_DIR` or ~/tensorflow_datasets):

  python scripts/train.py --config experiments/librispeech_tt.py --workdir runs/librispeech_tt

From a local LibriSpeech-layout directory (train-clean-100/, dev-clean/, ...):

  python scripts/train.py --config experiments/librispeech_tt.py:/data/LibriSpeech \
      --workdir runs/librispeech_tt

On a pod slice, shard parameters too, e.g. `--config.mesh.fsdp=8` (data fills the rest).
"""

import ml_collections

from jaxspeech.train import quantize


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    local = arg or ""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        dict(
            num_mels=80,
            vocab_size=-1,
            d_model=512,
            num_heads=8,
            mlp_dim=2048,
            num_layers=18,
            subsampling_factor=4,
            subsampling_channels=256,
            chunk_size=8,
            left_chunks=4,
            lookahead_chunks=0,
            dropout=0.1,
            predictor="lstm",
            predictor_dim=640,
            predictor_layers=1,
            stateless_context=2,
            ctc_weight=0.0,
            activation_bits=0,  # 8: 8-bit activations (QAT, see jaxspeech.models.config)
            # Arbitrators (experiments/librispeech_arbitrator.py; jaxspeech.models.arbitrator).
            arbitrator="none",
            arbitrator_dim=64,
            gate_estimator="gumbel_st",
            gate_init_bias=4.0,
            compute_weight=0.0,
            attention_cost=1.0,
            gate_per_chunk=False,  # one gate decision per attention chunk (streaming skips)
            static_attention="",  # static pruning, one '0'/'1' per layer ('' = all on)
            static_ffn="",
            compute_target=0.0,  # a compute budget instead of a price (jaxspeech.models.config)
            full_pass_weight=0.0,  # in-place self-distillation of a gated encoder
            distill_weight=0.0,  # (jaxspeech.models.config; the `distill` option)
            joint_dim=640,
            dtype="float32",
            param_dtype="float32",
        )
    )

    if local:
        train = "train-clean-100+train-clean-360+train-other-500"
        splits = dict(
            train=f"librispeech_dir:{local}:{train}",
            validation=f"librispeech_dir:{local}:dev-clean",
            test=f"librispeech_dir:{local}:test-clean",
        )
    else:
        splits = dict(
            train="tfds:librispeech:train_clean100+train_clean360+train_other500",
            validation="tfds:librispeech:dev_clean",
            test="tfds:librispeech:test_clean",
        )
    c.data = ml_collections.ConfigDict(
        dict(
            **splits,
            tfds_data_dir="",
            tokenizer="sentencepiece",
            vocab_size=1024,
            bucket_seconds=(4.0, 8.0, 12.0, 16.0),
            batch_size=64,
            eval_batch_size=64,
            max_duration=17.0,
            max_label_length=256,
            num_norm_utterances=500,
            num_eval_utterances=1000,
            eval_split="validation",
            num_workers=8,
            spec_augment=ml_collections.ConfigDict(
                dict(
                    enabled=True,
                    num_freq_masks=2,
                    max_freq_width=27,
                    num_time_masks=10,
                    max_time_frac=0.05,
                )
            ),
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            warmup_steps=10_000,
            schedule="rsqrt",
            end_lr_fraction=0.0,
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
            data=-1,
            fsdp=1,
            tensor=1,
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
            num_steps=200_000,
            log_every=100,
            eval_every=5_000,
            checkpoint_every=2_000,
            keep_checkpoints=3,
            bf16=True,
            seed=0,
            nonfinite="fail",
            init_from="",  # a trained workdir to warm-start from (params, normalization, tokenizer)
            gate_temperature=(1.0, 1.0),  # arbitrator gates: (start, end), exponential anneal
            hard_gate_steps=0,  # arbitrators: the last N steps train with the inference gates
            budget_anneal=(0, 0),  # arbitrators: (start, steps) lowering a budget from 1
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(decoder="beam", beam_size=4, max_symbols_per_frame=3, max_output_len=256)
    )
    # Quantization-aware training (squashed weights); off here (experiments/commands_squashed.py).
    c.quant = quantize.default_config(enabled=False)
    return c
