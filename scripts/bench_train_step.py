r"""Train-step throughput: audio seconds per second and model FLOPs utilization (MFU).

  python scripts/bench_train_step.py --config experiments/commands_tt.py
  python scripts/bench_train_step.py --config experiments/librispeech_tt.py \
      --config.data.batch_size=64 --seconds 15 --steps 20

FLOPs per step come from XLA's cost analysis of the compiled step
(`jax.jit(...).lower(...).compile().cost_analysis()`); the peak is a large matmul timed in the same
run on the same devices (in the compute dtype), so MFU = step FLOP/s / measured matmul FLOP/s.
Caveat: XLA's cost analysis counts a `while`/`scan` body once, not once per iteration, so work
inside loops (the fused loss's time chunks, the lattice recursion) is under-counted; the MFU is a
lower bound.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxspeech import features
from jaxspeech.train import sharding
from jaxspeech.train import state as state_lib
from jaxspeech.train import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/commands_tt.py", "Config file.")
_SECONDS = flags.DEFINE_float("seconds", 0.0, "Utterance length (default: data.max_duration).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size when config.model has -1.")
_LABEL_RATE = flags.DEFINE_float(
    "labels_per_second",
    0.0,
    "Label length per second of audio (default: 15 for characters, 4 for SentencePiece units).",
)
_MATMUL = flags.DEFINE_integer(
    "matmul_size", 0, "Peak matmul size (default: 8192 GPU/TPU, 2048 CPU)."
)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))


def matmul_peak(n: int, dtype, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matmul on every device at once (sharded along rows)."""
    mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.P("d"))
    a = jax.device_put(jnp.ones((n * jax.device_count(), n), dtype), rows)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b, out_shardings=rows)
    f(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a, b)
    out.block_until_ready()
    return 2.0 * n**3 * jax.device_count() * repeats / (time.perf_counter() - start)


def main(argv):
    del argv
    config = _CONFIG.value
    mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config.mesh)
    vocab = _VOCAB.value or (config.model.vocab_size if config.model.vocab_size > 0 else 32)
    model_cfg = state_lib.model_config(config.model, vocab_size=vocab, bf16=config.train.bf16)
    tx, schedule = state_lib.make_optimizer(config.optim, config.train.num_steps)
    graphdef, state, shardings = state_lib.create_train_state(model_cfg, tx, mesh, rules)
    bsharding = sharding.batch_sharding(mesh, rules)
    train_step = step_lib.make_train_step(
        graphdef,
        tx,
        schedule,
        feature_cfg=features.FeatureConfig(n_mels=model_cfg.num_mels),
        spec_augment_cfg=config.data.spec_augment,
        state_shardings=shardings,
        batch_sharding=bsharding,
    )

    seconds = _SECONDS.value or float(config.data.max_duration)
    batch_size = int(config.data.batch_size) * jax.process_count()
    rate = _LABEL_RATE.value or (15.0 if config.data.tokenizer == "char" else 4.0)
    n, u = int(seconds * 16000), max(8, int(seconds * rate))
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch(
        {
            "audio": (0.1 * rng.standard_normal((batch_size, n))).astype(np.float32),
            "audio_lengths": np.full((batch_size,), n, np.int32),
            "labels": rng.integers(1, vocab, (batch_size, u)).astype(np.int32),
            "label_lengths": np.full((batch_size,), u, np.int32),
        },
        bsharding,
    )

    with jax.set_mesh(mesh):
        start = time.perf_counter()
        compiled = train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        step_flops = _flops(compiled)
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        start = time.perf_counter()
        for _ in range(_STEPS.value):
            state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        step_s = (time.perf_counter() - start) / _STEPS.value

    platform = jax.devices()[0].platform
    size = _MATMUL.value or (2048 if platform == "cpu" else 8192)
    dtype = jnp.bfloat16 if config.train.bf16 else jnp.float32
    peak = matmul_peak(size, dtype)
    report = {
        "platform": platform,
        "devices": jax.device_count(),
        "batch_size": batch_size,
        "utterance_seconds": seconds,
        "label_length": u,
        "params": state_lib.count_params(state),
        "compile_seconds": round(compile_s, 2),
        "step_seconds": step_s,
        "audio_sec_per_sec": batch_size * seconds / step_s,
        "step_tflops": step_flops / 1e12,
        "achieved_tflops_per_sec": step_flops / step_s / 1e12,
        "matmul_peak_tflops_per_sec": peak / 1e12,
        "matmul_dtype": jnp.dtype(dtype).name,
        "mfu": step_flops / step_s / peak,
        "loss": float(m["loss"]),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
