"""An arbitrator model whose gates end static, exported as the plain model they chose.

On the spoken-commands corpus whole-block arbitrators end as a learned static pruning: each block
runs on 0% or 100% of the frames (experiments/RESULTS.md, "Whole-block gates"). Such a model runs
faster without its arbitrators and without a conditional per layer and chunk. `export_static`
keeps each component (a layer's attention or feed-forward network) that a calibration set runs
on at least `threshold` of its valid frames, drops the layers that keep neither, and writes a new
workdir: the ungated model over the kept layers (static pruning, `model.static_attention` /
`model.static_ffn`, for a layer that keeps one component only), its parameters copied, ready for
`scripts/evaluate.py`, `scripts/bench_arbitrator.py`, streaming, and `train.init_from` (a dense
fine-tune). Its encoder output equals the gated model's run with the static gates
(`static_gates`) exactly; it equals the gated model's own output wherever the arbitrators decide
as the static choice, and `agreement` is the share of valid component-frames of the calibration
set where they do.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspeech.models import TransducerConfig, TransformerTransducer
from jaxspeech.models.attention import length_mask
from jaxspeech.train import gate_stats

# The model fields of gating and of its losses: reset to their defaults in the exported model.
GATING_FIELDS = (
    "arbitrator",
    "arbitrator_dim",
    "gate_estimator",
    "gate_init_bias",
    "compute_weight",
    "attention_cost",
    "compute_target",
    "gate_per_chunk",
    "ffn_per_frame",
    "whole_block_gates",
    "price_per_chunk",
    "chunk_price_share",
    "full_pass_weight",
    "distill_weight",
    "static_attention",
    "static_ffn",
)


# A component on (or off) on all but this share of the frames counts as static (here and in
# `scripts/gate_analysis.py`).
STATIC_SLACK = 0.01


@dataclasses.dataclass(frozen=True)
class StaticChoice:
    """Per layer of the gated model: whether its attention / FFN is kept, and the calibration
    statistics (fraction of valid frames each runs on; share of decisions the choice matches)."""

    attn: tuple[bool, ...]
    ffn: tuple[bool, ...]
    attn_on: tuple[float, ...]
    ffn_on: tuple[float, ...]
    agreement: float

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers kept (any component kept), in order."""
        return tuple(i for i, (a, f) in enumerate(zip(self.attn, self.ffn, strict=True)) if a or f)

    def partial(self, margin: float = STATIC_SLACK) -> list[tuple[str, int, float]]:
        """(component, layer, on-rate) of the components whose gates the calibration set found
        neither off nor on: on-rate in (margin, 1 - margin). There the exported model runs a
        component on frames the gates had it off (kept) or drops it where they had it on."""
        return [
            (name, i, r)
            for name, rates in (("attention", self.attn_on), ("ffn", self.ffn_on))
            for i, r in enumerate(rates)
            if margin < r < 1 - margin
        ]


def gate_rates(model: TransformerTransducer, batches) -> tuple[np.ndarray, np.ndarray, float]:
    """Per layer, the fraction of valid frames whose attention / FFN the model's hard gates run
    on, over `batches` of (feats [B, T, F], feat_lengths [B]); and the valid frame count."""
    totals = gate_stats.executed(model, batches)
    return totals["attn_on"], totals["ffn_on"], totals["frames"]


def static_choice(model: TransformerTransducer, batches, threshold: float = 0.5) -> StaticChoice:
    """The components the model's gates run on at least `threshold` of the valid frames of
    `batches` (read once), with the agreement of that choice."""
    if not model.encoder.gated:
        raise ValueError(
            "the model has no gates (no arbitrator, no static pruning): nothing to fix"
        )
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    attn_on, ffn_on, _ = gate_rates(model, batches)
    attn, ffn = attn_on >= threshold, ffn_on >= threshold
    # a component kept runs where the gate was off (1 - rate), one dropped where it was on
    miss = np.where(attn, 1 - attn_on, attn_on).sum() + np.where(ffn, 1 - ffn_on, ffn_on).sum()
    return StaticChoice(
        tuple(bool(a) for a in attn),
        tuple(bool(f) for f in ffn),
        tuple(round(float(r), 6) for r in attn_on),
        tuple(round(float(r), 6) for r in ffn_on),
        float(1 - miss / (2 * len(attn_on))),
    )


def pruned_config(cfg: TransducerConfig, choice: StaticChoice) -> TransducerConfig:
    """The ungated config over the kept layers (static pruning where a layer keeps one)."""
    if not choice.layers:
        raise ValueError("the static choice keeps no component: lower the threshold")
    fields = {f.name: f.default for f in dataclasses.fields(TransducerConfig)}
    fields = {name: fields[name] for name in GATING_FIELDS}  # the defaults: no gates
    attn = "".join("1" if choice.attn[i] else "0" for i in choice.layers)
    ffn = "".join("1" if choice.ffn[i] else "0" for i in choice.layers)
    if "0" in attn + ffn:
        fields.update(static_attention=attn, static_ffn=ffn)
    return dataclasses.replace(cfg, **fields, num_layers=len(choice.layers))


def pruned_model(
    model: TransformerTransducer, choice: StaticChoice, seed: int = 0
) -> TransformerTransducer:
    """The plain model of `pruned_config`, holding `model`'s parameters and feature statistics
    (the kept layers' blocks; the arbitrators dropped)."""
    from jaxspeech.train.evaluate import inference_state

    source = nnx.to_pure_dict(inference_state(model))
    with nnx.use_eager_sharding(False):  # as `train.state` builds models (warm starts)
        out = TransformerTransducer(pruned_config(model.cfg, choice), rngs=nnx.Rngs(seed))
    state = inference_state(out)
    tree = nnx.to_pure_dict(state)
    for key, value in source.items():
        if key != "encoder":
            tree[key] = value
    encoder = source["encoder"]
    tree["encoder"] = {k: v for k, v in encoder.items() if k not in ("blocks", "arbitrator")}
    tree["encoder"]["blocks"] = {j: encoder["blocks"][i] for j, i in enumerate(choice.layers)}
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(out, state)
    out.eval()
    return out


def static_gates(choice: StaticChoice, lengths: jax.Array, num_frames: int):
    """The gated model's gates [num_layers, B, T] (attention, FFN) of the static choice: the
    gates with which its output equals the pruned model's."""
    valid = length_mask(lengths, num_frames).astype(jnp.float32)
    return tuple(
        jnp.asarray(on, jnp.float32)[:, None, None] * valid for on in (choice.attn, choice.ffn)
    )


def export_static(workdir: str, out: str, batches, threshold: float = 0.5, trained=None) -> dict:
    """Writes the workdir `out` (config.json, tokenizer, one checkpoint at the trained step) of
    the statically pruned model of `workdir` (or of `trained`, its `evaluate.load_trained`),
    chosen on `batches`; returns the report also written to `out/static_export.json`."""
    from jaxspeech.train import checkpoint, evaluate, sharding
    from jaxspeech.train import state as state_lib
    from jaxspeech.train.metrics import write_json

    trained = evaluate.load_trained(workdir) if trained is None else trained
    if trained.quant_rules is not None:
        raise ValueError(f"{workdir} is a QAT workdir: static export takes a float run")
    if os.path.exists(os.path.join(out, "checkpoints")):
        raise FileExistsError(f"{out} already holds checkpoints: give a new --out")
    choice = static_choice(trained.model, batches, threshold)
    model = pruned_model(trained.model, choice, seed=int(trained.config.train.seed))
    config = trained.config.copy_and_resolve_references()
    with config.unlocked():  # every field set, also one an older config.json lacks
        for name in GATING_FIELDS + ("num_layers",):
            config.model[name] = getattr(model.cfg, name)
    os.makedirs(out, exist_ok=True)
    shutil.copytree(
        os.path.join(workdir, "tokenizer"), os.path.join(out, "tokenizer"), dirs_exist_ok=True
    )
    write_json(os.path.join(out, "config.json"), config.to_dict())
    tx, _ = state_lib.make_optimizer(config.optim, int(config.train.num_steps))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config.mesh)
    _, state, _ = state_lib.create_train_state(
        model.cfg, tx, mesh, rules, seed=int(config.train.seed), init_model=model
    )
    state = dict(state, step=jnp.asarray(trained.step, jnp.int32))
    description = checkpoint.model_description(
        model.cfg, state_lib.param_shapes({"params": state["params"]})
    )
    ckpt = checkpoint.Checkpointer(out, keep=1, async_save=False)
    ckpt.save(trained.step, state, model=description, force=True)
    ckpt.close()
    report = {
        "source_step": trained.step,
        "threshold": threshold,
        "layers": list(choice.layers),
        "attn": list(choice.attn),
        "ffn": list(choice.ffn),
        "attn_on": list(choice.attn_on),
        "ffn_on": list(choice.ffn_on),
        "agreement": choice.agreement,
        "partial": [
            {"component": c, "layer": i, "on": r, "kept": (choice.attn, choice.ffn)[c == "ffn"][i]}
            for c, i, r in choice.partial()
        ],
        "num_layers": model.cfg.num_layers,
        "static_attention": model.cfg.static_attention,
        "static_ffn": model.cfg.static_ffn,
    }
    write_json(os.path.join(out, "static_export.json"), report)
    return report
