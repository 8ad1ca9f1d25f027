"""`train_and_evaluate(config, workdir)`: the whole training run, resumable.

Phases (each fails with a clear message before training time is spent when its inputs are bad):
  1. workdir     writable? config.json written
  2. data        tokenizer (built from training transcripts, saved in the workdir) and pipelines
  3. model       TransducerConfig; an existing checkpoint must describe the same model
  4. state       global feature normalization from training audio, sharded train state
                 (or the latest checkpoint with its data-iterator position)
  5. train       jitted steps; metrics.jsonl / TensorBoard / progress bar; periodic validation
                 WER and asynchronous checkpoints
  6. evaluate    test WER (S/D/I) and real-time factor -> eval.json
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import numpy as np

from jaxspeech import features
from jaxspeech.models import arbitrator as arbitrator_lib
from jaxspeech.train import checkpoint as checkpoint_lib
from jaxspeech.train import data as data_lib
from jaxspeech.train import evaluate as evaluate_lib
from jaxspeech.train import metrics as metrics_lib
from jaxspeech.train import quantize, warm_start
from jaxspeech.train import sharding as sharding_lib
from jaxspeech.train import state as state_lib
from jaxspeech.train import step as step_lib
from jaxspeech.train import teacher as teacher_lib


def ensure_writable(workdir: str) -> None:
    """Creates `workdir` and checks that files can be written there."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"cannot write to workdir {workdir!r}: {e.strerror or e}") from e


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf."""


NONFINITE_POLICIES = ("fail", "skip")


def _check_finite(history: list[tuple[int, dict]], policy: str, batch_ids=None) -> int:
    """The number of non-finite steps in `history`; raises under policy 'fail'.

    The train step never applies a non-finite update (it keeps the parameters and optimizer
    state), so 'skip' only counts. `batch_ids` maps a step to the utterance ids of its batch."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(
            f"unknown train.nonfinite policy {policy!r}; use one of {NONFINITE_POLICIES}"
        )
    bad = [(step, m) for step, m in history if not m["finite"]]
    if bad and policy == "fail":
        step, m = bad[0]
        ids = [i for i in (batch_ids or {}).get(step, ()) if i]
        shown = ", ".join(ids[:8]) + (f" (+{len(ids) - 8} more)" if len(ids) > 8 else "")
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: loss={m['loss']}, grad_norm={m['grad_norm']}"
            + (f"; batch utterances: {shown}" if ids else "")
            + " (the update of that step was not applied; the last checkpoint is intact; "
            "--config.train.nonfinite=skip skips such steps and counts them)"
        )
    return len(bad)


class Preemption:
    """Turns SIGTERM into a request to checkpoint and stop at the next step boundary.

    One process: a SIGTERM handler sets a flag (installed only from the main thread; the previous
    handler is restored on exit). Several processes: JAX's preemption sync point, so that every
    process stops at the same step (the coordination service relays the notice to all of them);
    there no Python handler is installed, since it would replace the one JAX's preemption notifier
    registered.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        single = jax.process_count() == 1
        if single and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def eval_pipeline(
    config, split: str, tokenizer, *, max_utterances=-1, pipelines=None, cache_dir=None
):
    """The eval pipeline of `split` (`data.eval_pipeline`: with `max_utterances` > 0, that many
    records spread over the split), built once per (split, max_utterances) in `pipelines`."""
    pipelines = {} if pipelines is None else pipelines
    key = (split, max_utterances if max_utterances > 0 else -1)
    if key not in pipelines:
        pipelines[key] = data_lib.eval_pipeline(
            config.data, split, tokenizer, cache_dir=cache_dir, max_utterances=key[1]
        )
    return pipelines[key]


def evaluate_split(
    recognizer,
    config,
    split: str,
    tokenizer,
    *,
    max_utterances: int = -1,
    pipelines: dict | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Decodes `split` (train/validation/test, a source spec or a .jsonl; with `max_utterances`
    > 0, that many of its records spread evenly over it) and scores it; the report's `left_out`
    counts the records that no batch holds (empty, unreadable ...). `pipelines` (a dict) keeps
    the built pipelines for the next call."""
    pipeline = eval_pipeline(
        config,
        split,
        tokenizer,
        max_utterances=max_utterances,
        pipelines=pipelines,
        cache_dir=cache_dir,
    )
    report = evaluate_lib.evaluate(
        recognizer, iter(pipeline), tokenizer, max_utterances=max_utterances
    )
    report["left_out"] = data_lib.left_out(pipeline)  # records the WER does not cover
    return report


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns eval.json."""
    # 1. workdir ---------------------------------------------------------------------------------
    ensure_writable(workdir)
    tc = config.train
    for name in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
        value = tc.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train.{name} must be a positive number of steps, got {value!r}")

    # 2. data ------------------------------------------------------------------------------------
    init = warm_start.source(tc, workdir)
    tokenizer = data_lib.build_tokenizer(config.data, workdir)
    mesh = sharding_lib.make_mesh(config.mesh)
    rules = sharding_lib.axis_rules(config.mesh)

    # 3. model and checkpoint compatibility --------------------------------------------------------
    model_cfg = state_lib.model_config(config.model, vocab_size=tokenizer.vocab_size, bf16=tc.bf16)
    quant_rules = quantize.rules_from_config(config.get("quant"))
    abstract = state_lib.abstract_model(model_cfg, tc.seed)
    description = checkpoint_lib.model_description(
        model_cfg,
        state_lib.param_shapes({"params": _params(abstract)}),
        quantize.describe(config.get("quant")),
    )
    ckpt = checkpoint_lib.Checkpointer(workdir, keep=tc.keep_checkpoints)
    ckpt.check_compatible(description)
    latest = ckpt.latest_step()
    init_model = None
    if latest is None and init is not None:
        init_model = warm_start.load_model(init, description)

    divisor = sharding_lib.batch_divisor(mesh, rules)
    cache_dir = os.path.join(workdir, "cache")
    feature_cfg = features.FeatureConfig(n_mels=model_cfg.num_mels)
    train_pipe = data_lib.train_pipeline(
        config.data,
        tokenizer,
        seed=tc.seed,
        batch_divisor=divisor,
        cache_dir=cache_dir,
        min_samples=feature_cfg.hop_length * model_cfg.subsampling_factor,  # one encoder frame
    )
    eval_pipelines = {}
    writer = metrics_lib.MetricWriter(workdir, total_steps=tc.num_steps, initial_step=latest or 0)
    left = data_lib.format_left_out(data_lib.left_out(train_pipe))
    writer.log(f"train data: {len(train_pipe.lengths)} records, left out: {left}")
    evaluate_lib.check_decoder(config.eval.decoder, "eval.decoder")
    validation = {  # the periodic evaluation's options
        "max_utterances": config.data.num_eval_utterances,
        "pipelines": eval_pipelines,
        "cache_dir": cache_dir,
    }
    # built now, so that a wrong data.eval_split fails before any training
    eval_pipeline(config, config.data.eval_split, tokenizer, **validation)

    # 4. state -----------------------------------------------------------------------------------
    mean = std = None
    if latest is None and init_model is None:
        mean, std = data_lib.feature_statistics(
            train_pipe.source, config.data.num_norm_utterances, feature_cfg
        )
    tx, schedule = state_lib.make_optimizer(config.optim, tc.num_steps, quant_rules)
    graphdef, state, shardings = state_lib.create_train_state(
        model_cfg,
        tx,
        mesh,
        rules,
        seed=tc.seed,
        feature_mean=mean,
        feature_std=std,
        quant_rules=quant_rules,
        init_model=init_model,
    )
    train_iter = iter(train_pipe)
    if latest is not None:
        state, data_state = ckpt.restore(state, latest)
        if data_state is not None:
            try:
                train_iter.set_state(data_state)
            except ValueError as e:
                raise ValueError(
                    f"the checkpoint in {ckpt.directory} was written with another training input "
                    f"({e}): the batches depend on data.train, data.batch_size, the buckets "
                    "(data.bucket_seconds, data.max_duration), data.max_label_length and "
                    f"train.seed. Resume with the values in {workdir}/config.json, or use a new "
                    "workdir"
                ) from e
        writer.log(f"resumed from {ckpt.directory} at step {latest}")
        change = _schedule_change(workdir, config, latest, schedule)
        if change:
            writer.log(change)
    writer.write_config(config)  # once the checkpoint (if any) has restored into this config
    if latest is None:
        writer.log(f"model: {state_lib.count_params(state):,} parameters; mesh {dict(mesh.shape)}")
        if init_model is not None:
            writer.log(f"warm start from {init}")
    step = int(jax.device_get(state["step"]))

    teacher = teacher_lib.load_teacher(tc, workdir, mesh, rules)
    if teacher is not None and latest is None:
        writer.log(f"distilling from train.teacher={tc.teacher} (weight {tc.teacher_weight})")

    # 5. train -----------------------------------------------------------------------------------
    bsharding = sharding_lib.batch_sharding(mesh, rules)
    train_step = step_lib.make_train_step(
        graphdef,
        tx,
        schedule,
        feature_cfg=feature_cfg,
        spec_augment_cfg=config.data.spec_augment,
        seed=tc.seed,
        state_shardings=shardings,
        batch_sharding=bsharding,
        quant_rules=quant_rules,
        quant_weight=float(config.quant.regularizer_weight) if quant_rules else 0.0,
        gate_temperature=_gate_temperature(model_cfg, tc),
        compute_ramp=_compute_ramp(model_cfg, tc),
        compute_budget=_compute_budget(model_cfg, tc),
        teacher=teacher,
        teacher_weight=float(tc.get("teacher_weight", 0.0)),
    )
    recognizer = None
    history, batch_ids, audio_seconds, t0 = [], {}, 0.0, time.perf_counter()
    last_log_step = step
    _check_finite([], tc.nonfinite)  # an unknown policy fails now, not at the first log

    def log_interval():
        """Writes the mean metrics of the steps since the last log (finite steps only)."""
        nonlocal history, batch_ids, audio_seconds, t0, last_log_step
        history = [(s, jax.device_get(m)) for s, m in history]
        skipped = _check_finite(history, tc.nonfinite, batch_ids)
        elapsed = time.perf_counter() - t0
        finite = [m for _, m in history if m["finite"]] or [m for _, m in history]
        scalars = {k: float(np.mean([m[k] for m in finite])) for k in history[0][1]}
        scalars.pop("finite")
        scalars["learning_rate"] = float(history[-1][1]["learning_rate"])
        scalars["steps_per_sec"] = (step - last_log_step) / elapsed
        scalars["audio_sec_per_sec"] = audio_seconds / elapsed
        if tc.nonfinite == "skip":
            scalars["skipped_steps"] = float(skipped)
        writer.write_scalars(step, scalars)
        history, batch_ids, audio_seconds = [], {}, 0.0
        t0, last_log_step = time.perf_counter(), step

    with jax.set_mesh(mesh), Preemption() as preemption:
        try:
            while step < tc.num_steps:
                batch = next(train_iter)
                audio_seconds += float(batch["audio_lengths"].sum()) / feature_cfg.sample_rate
                arrays = sharding_lib.shard_batch(
                    {k: batch[k] for k in step_lib.BATCH_KEYS}, bsharding
                )
                state, metrics = train_step(state, arrays)
                step += 1
                history.append((step, metrics))
                batch_ids[step] = batch.get("id", ())
                writer.advance()
                if step % tc.log_every == 0 or step == tc.num_steps:
                    log_interval()
                if step % tc.eval_every == 0 or step == tc.num_steps:
                    eval_start = time.perf_counter()
                    recognizer = _recognizer(
                        recognizer, graphdef, state, config, feature_cfg, quant_rules
                    )
                    report = evaluate_split(
                        recognizer, config, config.data.eval_split, tokenizer, **validation
                    )
                    writer.write_scalars(
                        step, {k: report[k] for k in ("wer", "rtf")}, prefix="eval/"
                    )
                    writer.log(
                        f"step {step}: {config.data.eval_split} WER {100 * report['wer']:.2f}% "
                        f"on {report['num_utterances']} utterances"
                    )
                    t0 += time.perf_counter() - eval_start  # throughput excludes evaluation
                saved = step % tc.checkpoint_every == 0 or step == tc.num_steps
                if saved:
                    ckpt.save(step, state, data_state=train_iter.get_state(), model=description)
                if step < tc.num_steps and preemption.should_stop(step):
                    if history:
                        log_interval()
                    if not saved:
                        ckpt.save(step, state, data_state=train_iter.get_state(), model=description)
                    ckpt.wait()
                    writer.close_progress()
                    writer.log(
                        f"preempted (SIGTERM) at step {step}: checkpoint written to "
                        f"{ckpt.directory}; rerun the same command to resume"
                    )
                    writer.close()
                    return {"preempted": True, "step": step}
        finally:  # also on errors: let pending asynchronous saves finish
            ckpt.close()
        writer.close_progress()

        # 6. evaluate ----------------------------------------------------------------------------
        recognizer = _recognizer(recognizer, graphdef, state, config, feature_cfg, quant_rules)
        report = evaluate_split(
            recognizer, config, "test", tokenizer, pipelines=eval_pipelines, cache_dir=cache_dir
        )
    report.update(step=step, split="test", decoder=config.eval.decoder)
    metrics_lib.write_json(os.path.join(workdir, "eval.json"), report)
    writer.log(
        f"test WER {100 * report['wer']:.2f}% "
        f"(S {report['substitutions']}, D {report['deletions']}, "
        f"I {report['insertions']}, {report['num_words']} words)"
        f", RTF {report['rtf']:.4f}"
    )
    writer.close()
    return report


def _params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def _schedule_change(workdir: str, config, step: int, schedule) -> str | None:
    """A note when a resume changes the learning rate at `step` (another train.num_steps
    stretches a cosine schedule; another optim section), read against the `config.json` the
    checkpoint was written with; None when the rate is the same (or that config lacks fields)."""
    try:
        old = evaluate_lib.load_config(workdir)
        before = float(state_lib.learning_rate_schedule(old.optim, int(old.train.num_steps))(step))
    except (FileNotFoundError, AttributeError, KeyError, ValueError):
        return None
    after = float(schedule(step))
    if np.isclose(before, after, rtol=1e-6, atol=0.0):
        return None
    return (
        f"note: the learning rate at step {step} changes from {before:.3g} to {after:.3g} on this "
        f"resume (train.num_steps {old.train.num_steps} -> {config.train.num_steps}, or the optim "
        "section): the rest of the run follows the new schedule, not the one it started with"
    )


def _gate_temperature(model_cfg, tc):
    """The arbitrator gate temperature schedule (train.gate_temperature = (start, end),
    exponential over the run; 0 for the last train.hard_gate_steps: the inference
    gates, no gradient to the arbitrators), or None for a model without arbitrators."""
    if model_cfg.arbitrator == "none":
        return None
    start, end = tc.get("gate_temperature", (1.0, 1.0))
    tau = arbitrator_lib.temperature_schedule(float(start), float(end), tc.num_steps)
    return arbitrator_lib.with_hard_phase(tau, tc.num_steps, int(tc.get("hard_gate_steps", 0)))


def _compute_ramp(model_cfg, tc):
    """The compute loss weight's ramp (train.compute_ramp = (delay, ramp) steps), or None: no
    arbitrators, or no ramp ((0, 0), the default)."""
    delay, ramp = (int(v) for v in tc.get("compute_ramp", (0, 0)))
    if model_cfg.arbitrator == "none" or (delay, ramp) == (0, 0):
        return None
    return arbitrator_lib.compute_ramp(delay, ramp)


def _compute_budget(model_cfg, tc):
    """The annealed compute budget (train.budget_anneal = (start, steps): from 1 down to
    model.compute_target, `arbitrator.budget_anneal`), or None: no anneal ((0, 0), the default;
    the budget is model.compute_target from step 0)."""
    start, steps = (int(v) for v in tc.get("budget_anneal", (0, 0)))
    if (start, steps) == (0, 0):
        return None
    if model_cfg.arbitrator == "none":
        raise ValueError(
            f"train.budget_anneal = ({start}, {steps}) anneals a compute budget, but the model has "
            "no arbitrators (model.arbitrator = 'none'); set it to (0, 0) or add arbitrators"
        )
    return arbitrator_lib.budget_anneal(
        float(model_cfg.compute_target),
        start,
        steps,
        int(tc.get("num_steps")),
        int(tc.get("hard_gate_steps", 0)),
    )


def _recognizer(recognizer, graphdef, state, config, feature_cfg, quant_rules=None):
    model = state_lib.merge_model(graphdef, state, quant_rules)
    if recognizer is None:
        return evaluate_lib.recognizer_for(model, config, feature_cfg)
    recognizer.set_model(model)
    return recognizer
