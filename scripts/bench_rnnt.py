"""Benchmark the RNN-T loss: speed against the memory-bound pass and a naive scan, memory of the
fused path against the materialized one.

    python scripts/bench_rnnt.py            # all shapes (the big one needs ~6 GB of host memory)
    python scripts/bench_rnnt.py --quick    # the small shape only

For each shape, in the same process (warm-up, `block_until_ready`, median of `--reps` rounds in
which the candidates run in turn, so that load from other processes hits them alike):
  * `rnnt_loss`: jitted value-and-grad of `rnnt_loss(logits).sum()` w.r.t. the logits;
  * `membound`: value-and-grad of `logsumexp(logits, -1).sum()` on the same logits: one read for the
    value, one read and one write for the gradient, the floor for any loss that needs a softmax;
  * `naive`: log_softmax + gather + a plain `lax.scan` over T of the alpha recursion (the inner
    recursion over u in closed form with `cumlogsumexp`), differentiated by autodiff;
  * torchaudio / warp_rnnt on the same logits when importable.
Then gradient steps through a tanh joint (`[B,T,H] + [B,U+1,H] -> tanh -> [H,V]`) with
materialized logits vs `rnnt_loss_fused`: time (not at the big shape unless --time-fused-big) and
peak memory (arguments + outputs + temporaries from `compile().memory_analysis()`).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.losses import rnnt_loss, rnnt_loss_fused
from jaxspeech.losses.rnnt_fused import DEFAULT_TIME_CHUNK

# (B, T, U, V, H)
SHAPES = {
    "small": (4, 100, 20, 256, 256),
    "medium": (8, 200, 40, 512, 320),
    "big": (8, 400, 80, 1024, 512),
}


def naive_rnnt_loss(logits, logit_lengths, labels, label_lengths):
    """Reference-style implementation: autodiff through log_softmax and a scan over T."""
    b, _, u1, _ = logits.shape
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    blank = lp[..., 0]
    label = jnp.take_along_axis(lp[:, :, : u1 - 1], labels[:, None, :, None], axis=-1)[..., 0]

    def row(arrive, label_t):  # alpha[t, u] = logsumexp_k<=u arrive[k] + sum_{k<=j<u} label[t, j]
        c = jnp.concatenate([jnp.zeros((b, 1)), jnp.cumsum(label_t, axis=1)], axis=1)
        return c + jax.lax.cumlogsumexp(arrive - c, axis=1)

    arrive0 = jnp.where(jnp.arange(u1) == 0, 0.0, -jnp.inf) * jnp.ones((b, 1))
    alpha0 = row(arrive0, label[:, 0])

    def step(alpha, xs):
        blank_prev, label_t = xs
        alpha = row(alpha + blank_prev, label_t)
        return alpha, alpha

    xs = (jnp.moveaxis(blank[:, :-1], 1, 0), jnp.moveaxis(label[:, 1:], 1, 0))
    _, alphas = jax.lax.scan(step, alpha0, xs)
    alphas = jnp.concatenate([alpha0[None], alphas], axis=0)  # [T, B, U+1]
    bi = jnp.arange(b)
    end_t = logit_lengths - 1
    return -(alphas[end_t, bi, label_lengths] + blank[bi, end_t, label_lengths])


def time_interleaved(fns, *args, reps):
    """Median seconds per call of each function, the functions run in turn in every round so that
    load from other processes hits them alike."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def make_inputs(shape, dtype, seed=0):
    b, t, u, v, h = shape
    ks = jax.random.split(jax.random.key(seed), 4)
    logits = jax.random.normal(ks[0], (b, t, u + 1, v), dtype)
    labels = jax.random.randint(ks[1], (b, u), 1, v)
    # Realistic padding: lengths between 75% and 100% of the padded size.
    logit_lengths = jax.random.randint(ks[2], (b,), (3 * t) // 4, t + 1).at[0].set(t)
    label_lengths = jax.random.randint(ks[3], (b,), (3 * u) // 4, u + 1).at[0].set(u)
    return logits, logit_lengths, labels, label_lengths


def bench_speed(shape, dtype, reps):
    logits, tl, labels, ul = make_inputs(shape, dtype)

    def vg(loss):
        return jax.jit(jax.value_and_grad(lambda x: loss(x, tl, labels, ul).sum()))

    fns = {
        "membound": jax.jit(
            jax.value_and_grad(lambda x: jax.nn.logsumexp(x.astype(jnp.float32), axis=-1).sum())
        ),
        "rnnt_loss": vg(rnnt_loss),
        "naive": vg(naive_rnnt_loss),
    }
    ours, naive = fns["rnnt_loss"](logits)[0], fns["naive"](logits)[0]
    t = time_interleaved(fns, logits, reps=reps)
    times = "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in t.items())
    print(
        f"  {jnp.dtype(dtype).name:8s} {times}"
        f"  | rnnt_loss/membound {t['rnnt_loss'] / t['membound']:4.2f}"
        f"  rnnt_loss/naive {t['rnnt_loss'] / t['naive']:4.2f}"
        f"  (|loss - naive|/loss {float(jnp.abs(ours - naive) / naive):.0e})"
    )
    if dtype == jnp.float32:
        bench_torch(logits, tl, labels, ul, t["rnnt_loss"], reps)


def bench_torch(logits, tl, labels, ul, t_ours, reps):
    """torchaudio (CPU or CUDA) and warp_rnnt (CUDA only), when importable, on the same logits."""
    try:
        import torch
    except ImportError:
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    impls = {}
    try:
        import torchaudio

        impls["torchaudio"] = lambda x, *a: torchaudio.functional.rnnt_loss(
            x, *a, blank=0, reduction="sum"
        )
    except ImportError:
        pass
    try:
        import warp_rnnt

        if dev == "cuda":
            impls["warp_rnnt"] = lambda x, *a: warp_rnnt.rnnt_loss(
                torch.log_softmax(x, -1), *a, blank=0, reduction="sum"
            )
    except ImportError:
        pass
    x = torch.tensor(np.asarray(logits, np.float32), device=dev, requires_grad=True)
    args = [torch.tensor(np.asarray(a), dtype=torch.int32, device=dev) for a in (labels, tl, ul)]
    for name, impl in impls.items():

        def step(impl=impl):
            x.grad = None
            loss = impl(x, *args)
            loss.backward()
            if dev == "cuda":
                torch.cuda.synchronize()
            return float(loss)

        step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        print(
            f"  {name} ({dev}) {t * 1e3:8.1f} ms  rnnt_loss/{name} {t_ours / t:5.2f}  "
            f"(loss sum {step():.4f})"
        )


def bench_fused_speed(shape, time_chunk, reps, materialized=True):
    """Gradient step through the tanh joint: fused vs materialized logits."""
    b, t, u, v, h = shape
    ks = jax.random.split(jax.random.key(1), 4)
    params = {"w": jax.random.normal(ks[0], (h, v)) / h**0.5, "b": jnp.zeros((v,))}
    enc = jax.random.normal(ks[1], (b, t, h))
    pred = jax.random.normal(ks[2], (b, u + 1, h))
    _, tl, labels, ul = make_inputs((b, t, u, 2, h), jnp.float32)
    labels = jax.random.randint(ks[3], (b, u), 1, v)
    fns = {
        name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
        for name, fn in joint_losses(time_chunk).items()
    }
    if not materialized:  # too big to materialize: the fused step alone, with its FLOPs
        fused = fns["fused"]
        t_ = time_interleaved({"fused": fused}, params, enc, pred, labels, tl, ul, reps=reps)
        flops = 6 * b * t * (u + 1) * h * v  # joint output layer, forward + backward
        print(
            f"  fused joint+loss gradient step (time_chunk={time_chunk}): "
            f"{t_['fused'] * 1e3:8.1f} ms, output-layer matmuls {flops / 1e12:.2f} TFLOP "
            f"= {flops / t_['fused'] / 1e12:.1f} TFLOP/s"
        )
        return
    t_ = time_interleaved(fns, params, enc, pred, labels, tl, ul, reps=reps)
    mat, fus = t_["materialized"], t_["fused"]
    print(
        f"  joint+loss gradient step (time_chunk={time_chunk}): materialized {mat * 1e3:7.1f} ms"
        f"  fused {fus * 1e3:7.1f} ms  fused/materialized {fus / mat:4.2f}"
    )


def joint_losses(time_chunk):
    def joint(p, e, q):
        return jnp.tanh(e + q) @ p["w"] + p["b"]

    def materialized(p, enc, pred, labels, tl, ul):
        return rnnt_loss(joint(p, enc[:, :, None], pred[:, None]), tl, labels, ul).sum()

    def fused(p, enc, pred, labels, tl, ul):
        return rnnt_loss_fused(
            enc, pred, lambda e, q: joint(p, e, q), labels, tl, ul, time_chunk=time_chunk
        ).sum()

    return {"materialized": materialized, "fused": fused}


def bench_memory(shape, time_chunk):
    b, t, u, v, h = shape
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    specs = (
        {"w": f32(h, v), "b": f32(v)},
        f32(b, t, h),
        f32(b, u + 1, h),
        i32(b, u),
        i32(b),
        i32(b),
    )
    peaks = {}
    for name, fn in joint_losses(time_chunk).items():
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
        mem = step.lower(*specs).compile().memory_analysis()
        peaks[name] = (
            mem.temp_size_in_bytes
            + mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        )
    mat, fus = peaks["materialized"], peaks["fused"]
    print(
        f"  peak memory of a joint+loss gradient step: materialized {mat / 2**20:8.1f} MiB  "
        f"fused (time_chunk={time_chunk}) {fus / 2**20:8.1f} MiB  ratio 1/{mat / fus:.1f}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape only")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--time-chunk", type=int, default=DEFAULT_TIME_CHUNK)
    parser.add_argument(
        "--time-fused-big",
        action="store_true",
        help="also time the joint step at the big shape (~1 TFLOP per step)",
    )
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 timings")
    parser.add_argument(
        "--shape", default="", help="B,T,U,V,H: time only the fused joint+loss step at this shape"
    )
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, reps={args.reps}")
    if args.shape:
        shape = tuple(int(x) for x in args.shape.split(","))
        print("B={} T={} U={} V={} H={}".format(*shape))
        bench_fused_speed(shape, args.time_chunk, args.reps, materialized=False)
        return
    for name in ["small"] if args.quick else list(SHAPES):
        shape = SHAPES[name]
        print(f"{name}: B={shape[0]} T={shape[1]} U={shape[2]} V={shape[3]} H={shape[4]}")
        for dtype in [jnp.float32] + ([] if args.no_bf16 else [jnp.bfloat16]):
            bench_speed(shape, dtype, args.reps)
        if name != "big" or args.time_fused_big:
            bench_fused_speed(shape, args.time_chunk, args.reps)
        bench_memory(shape, args.time_chunk)


if __name__ == "__main__":
    main()
