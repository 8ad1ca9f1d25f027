r"""Arbitrators (compute-cost amortized Transformer) on the spoken-commands transducer (issue 5).

Fine-tunes the main job's trained model (`runs/commands_tt`, from `experiments/commands_tt.py`) for
a fixed number of steps. The argument picks the cell, comma-separated:

  none              the baseline: the same fine-tuning, no arbitrators, full attention context
  arbitrator,W      arbitrators trained jointly with compute loss weight W (nats per utterance
                    for running the whole gated encoder; the sweep's knob)
  window,N          the sliding-window baseline: attention sees N left chunks instead of 4
                    (a window of N + 1 chunks of 8 frames, 320 ms each)
  static,ATTN,FFN   the static-pruning baseline: one '0'/'1' per layer for attention and for
                    the feed-forward network, '0' = off on every frame (`model.static_attention`,
                    `model.static_ffn`), e.g. `static,0001,1101`: the components the per-chunk
                    arbitrators learned to drop, removed by hand

Options for `arbitrator` cells: `block` (the arbitrator also reads each block's input,
`acoustic+block`), `st` / `gumbel_soft` (other gate estimators than Gumbel-sigmoid
straight-through), `chunk` (one gate decision per 8-frame attention chunk, `model.gate_per_chunk`:
streaming skips whole chunks), `chunk_attn` (per chunk for attention only, the feed-forward
gates per frame: `model.ffn_per_frame`), `priced` (per-frame gates, the compute loss priced
per chunk: a component costs its whole 8-frame chunk if it is on for any frame of it,
`model.price_per_chunk`, as streaming one utterance spends time; `priced=S` pays only the
share S per chunk and 1 - S per frame the component runs on, `model.chunk_price_share`),
`whole` (one gate per block and frame: attention and feed-forward network on or off together,
`model.whole_block_gates`, so the budget buys whole blocks, the structure of a shallower encoder),
`ramp` (fine-tuning: the compute loss off for the first steps, then ramped in,
`FINETUNE_COMPUTE_RAMP`, so the encoder adapts while the gates switch components off),
`tiny` (the tiny model from scratch, a few steps: tests, demos).
`distill` (`arbitrator` and `static` cells): in-place self-distillation, each step also trains
the ungated encoder on the batch (`model.full_pass_weight` = 1) and pulls the gated encoder's
CTC posteriors towards its (`model.distill_weight` = `DISTILL_WEIGHT`): twice the encoder work
per training step, the same inference.
`deep` (any cell) doubles the encoder to 8 Transformer blocks (`DEEP_LAYERS`; fine-tuning cells
start from `DEEP_BASE_WORKDIR`, which `none,scratch,deep` trains): a test of the paper's premise
that an over-parameterized encoder has components to amortize; static strings then need 8 digits.
`scratch` (any cell) trains from random weights with the main job's whole recipe
(`experiments/commands_tt.py`: same steps, learning rate and schedule) instead of fine-tuning,
the arbitrators jointly from the first step (the paper's setting), the compute loss off for the
first half and ramped in after (`SCRATCH_COMPUTE_RAMP`); `none,scratch` is the main job.

`budget=C` (`arbitrator` cells): a compute budget instead of a price (`model.compute_target`
= C): the loss pays the weight times the batch's mean executed fraction in excess of C, nothing
within it, so the gates settle at the budget and stay there; from scratch the compute loss then
ramps in earlier (`SCRATCH_BUDGET_RAMP`: a budget cannot collapse the gates). `anneal` (with
`budget=C` and `scratch`) lowers the budget gradually instead, from 1 to C over the steps of
`SCRATCH_BUDGET_ANNEAL` (`train.budget_anneal`, the cubic schedule of gradual pruning): the gates
drop components one by one while the encoder adapts. E.g. 38% of the deep encoder's compute:

  python scripts/train.py \
      --config experiments/commands_arbitrator.py:arbitrator,64,scratch,deep,budget=0.38 \
      --workdir runs/arb_deep_budget38

  python scripts/train.py --config experiments/commands_arbitrator.py:arbitrator,4 \
      --workdir runs/arbitrator/arbitrator_4

The best operating point measured (16 blocks, four seeds; experiments/RESULTS.md, sections
"Whole-block gates" to "A longer hard-gate phase"): whole-block gates at budget 0.38, the last
800 steps hard, distilled from the ungated 16-block run of the same seed; its gates end static,
so export it as the plain 6-block model (62.5% saved, +4% WER against the ungated model, level
with a dense 6-block model, streaming 0.24-0.27x):

  python scripts/train.py --config experiments/commands_arbitrator.py:none,scratch,deep \
      --workdir runs/commands_tt_deep16 --config.model.num_layers=16   # baseline and teacher
  C=experiments/commands_arbitrator.py:arbitrator,64,scratch,deep,priced,whole,budget=0.38
  python scripts/train.py --config $C --workdir runs/arb_whole --config.model.num_layers=16 \
      --config.train.hard_gate_steps=800 \
      --config.train.teacher=runs/commands_tt_deep16 --config.train.teacher_weight=0.1
  python scripts/export_static.py --workdir runs/arb_whole   # writes runs/arb_whole_static

The sweep (compute weights and window sizes; the table, the WER-vs-compute and wall-time plots):

  python scripts/sweep_arbitrator.py --base runs/commands_tt --out runs/arbitrator
"""

import ml_collections

from jaxspeech import pyfile

METHODS = ("none", "arbitrator", "window", "static")
# Fine-tuning recipe (the squashed-QAT sweep's, experiments/commands_squashed.py): 600 steps from
# the trained model at LR 5e-4.
STEPS, LR, WARMUP = 600, 5e-4, 50
# Arbitrator: hidden width, the initial gate-logit bias (sigmoid(2) = 0.88: components start on,
# and a Gumbel-sigmoid sample is off 12% of the time), the temperature annealed from 1 to 0.5, and
# the arbitrator's learning-rate multiplier (fresh gates must move far in 600 steps; at 1x the
# executed compute fell only from 95% to 90% with weight 16, experiments/RESULTS.md).
ARB_DIM, GATE_BIAS, TEMPERATURE, ARB_LR_SCALE = 32, 2.0, (1.0, 0.5), 20.0
BASE_WORKDIR = "runs/commands_tt"
# The `deep` option: twice the main job's Transformer blocks, and the workdir of its ungated
# from-scratch run (`none,scratch,deep`), which the deep fine-tuning cells start from.
DEEP_LAYERS, DEEP_BASE_WORKDIR = 8, "runs/commands_tt_deep"
# From scratch the peak learning rate is the main job's (2e-3): this multiplier gives the
# arbitrators the fine-tuning recipe's learning rate, 1e-2.
SCRATCH_ARB_LR_SCALE = 5.0
# From scratch the compute loss waits (train.compute_ramp = (delay, ramp) steps): with it on from
# step 0 every gate switched off within 200 steps, before the transducer loss could defend any
# component (test WER 21.89%, experiments/RESULTS.md). Half the run ungated, then a linear ramp.
SCRATCH_COMPUTE_RAMP = (1200, 400)
# With a compute budget (`budget=C`) the gates stop at the budget, so the compute loss can come
# earlier: off for 400 steps, ramped in over 400 (of (0,0), (100,100), (200,200), (400,400) and
# (800,400) at budget 0.38 and weight 64, the lowest test WER; experiments/RESULTS.md).
SCRATCH_BUDGET_RAMP = (400, 400)
# The `anneal` option: the budget falls from 1 at step 400 to C at step 1600 (train.budget_anneal
# = (start, steps)), then holds for the last third, where `hard_gate_steps=800` trains with the
# inference gates. Measured on 16 blocks, 4 seeds: no better than the fixed budget (+12.3% pooled
# against the ungated models, +1.9% paired against the fixed budget; experiments/RESULTS.md).
SCRATCH_BUDGET_ANNEAL = (400, 1200)
# The `ramp` option for fine-tuning: at full weight from step 0 the gates settle within 100 of the
# 600 steps (experiments/RESULTS.md), before the encoder can adapt to what it loses. With the ramp,
# 100 steps without the compute loss (the gates still sample: component dropout), then 300 steps
# of linear ramp, then 200 at full weight.
FINETUNE_COMPUTE_RAMP = (100, 300)
# The `distill` option: the KL term's weight (nats per utterance, like the CTC term at weight 1).
DISTILL_WEIGHT = 1.0


def _commands_tt(arg):
    return pyfile.sibling(__file__, "commands_tt").get_config(arg)


def parse(arg: str | None) -> dict:
    """'arbitrator,4,block' -> {'tiny': False, 'method': 'arbitrator', 'value': 4.0, ...}."""
    tokens = [t for t in (arg or "").split(",") if t]
    budgets = [t for t in tokens if t.startswith("budget=")]
    shares = [t for t in tokens if t.startswith("priced=")]
    tokens = [t for t in tokens if not t.startswith(("budget=", "priced="))]
    tokens += ["priced"] if shares else []
    try:
        budget = float(budgets[0].split("=", 1)[1]) if budgets else 0.0
    except ValueError:
        budget = -1.0  # rejected below
    try:
        share = float(shares[0].split("=", 1)[1]) if shares else 1.0
    except ValueError:
        share = -1.0  # rejected below
    flags = {"tiny", "scratch", "block", "st", "gumbel_soft", "chunk", "chunk_attn", "deep"}
    flags |= {"ramp", "distill", "priced", "anneal", "whole"}
    rest = [t for t in tokens if t not in flags]
    method = rest[0] if rest else "arbitrator"
    values = rest[1:]
    pruning = ("", "")
    if method == "static":  # two per-layer on/off strings, checked by TransducerConfig
        ok = len(values) == 2 and all(set(v) <= {"0", "1"} for v in values)
        pruning, values = tuple(values) if ok else pruning, []
    ok = method in METHODS and len(values) <= 1 and (method != "static" or bool(pruning[0]))
    try:
        value = float(values[0]) if values else (4.0 if method == "arbitrator" else 1.0)
    except ValueError:
        ok = False
    ok = ok and not ("tiny" in tokens and "scratch" in tokens)
    ok = ok and not ("chunk" in tokens and "chunk_attn" in tokens)
    ok = ok and not ("priced" in tokens and method != "arbitrator")
    ok = ok and not ("whole" in tokens and (method != "arbitrator" or "chunk_attn" in tokens))
    ok = ok and not ("ramp" in tokens and "scratch" in tokens)  # scratch has its own ramp
    ok = ok and not ("distill" in tokens and method not in ("arbitrator", "static"))
    ok = ok and len(budgets) <= 1 and (not budgets or (method == "arbitrator" and 0 < budget <= 1))
    ok = ok and len(shares) <= 1 and 0 <= share <= 1
    ok = ok and not ("anneal" in tokens and not (budgets and "scratch" in tokens))
    if not ok or (method == "window" and (value != int(value) or value < 0)):
        raise ValueError(
            f"unknown variant {arg!r}; use 'none', "
            "'arbitrator[,WEIGHT][,block][,chunk|chunk_attn][,priced|priced=SHARE][,whole][,ramp]"
            "[,distill]"
            "[,st|gumbel_soft]"
            "[,budget=FRACTION[,anneal]]' "
            "'window,LEFT_CHUNKS' or 'static,ATTN,FFN[,distill]' (e.g. static,0001,1101; "
            "optionally with 'tiny', 'scratch' or 'deep'), e.g. "
            "commands_arbitrator.py:"
            "arbitrator,4"
        )
    estimator = "st" if "st" in tokens else "gumbel_soft" if "gumbel_soft" in tokens else None
    return dict(
        tiny="tiny" in tokens,
        scratch="scratch" in tokens,
        method=method,
        value=value,
        block="block" in tokens,
        chunk="chunk" in tokens or "chunk_attn" in tokens,
        ffn_per_frame="chunk_attn" in tokens,
        whole="whole" in tokens,
        priced="priced" in tokens,
        chunk_price_share=share,
        deep="deep" in tokens,
        ramp="ramp" in tokens,
        distill="distill" in tokens,
        estimator=estimator or "gumbel_st",
        static=pruning,
        budget=budget,
        anneal="anneal" in tokens,
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    p = parse(arg)
    c = _commands_tt("tiny" if p["tiny"] else None)
    if p["deep"]:
        c.model.num_layers = 2 * c.model.num_layers if p["tiny"] else DEEP_LAYERS
    if p["method"] == "arbitrator":
        c.model.arbitrator = "acoustic+block" if p["block"] else "acoustic"
        c.model.arbitrator_dim = 8 if p["tiny"] else ARB_DIM
        c.model.gate_estimator = p["estimator"]
        c.model.gate_per_chunk = p["chunk"]
        c.model.ffn_per_frame = p["ffn_per_frame"]
        c.model.whole_block_gates = p["whole"]
        c.model.price_per_chunk = p["priced"]
        c.model.chunk_price_share = p["chunk_price_share"]
        c.model.gate_init_bias = GATE_BIAS
        c.model.compute_weight = p["value"]
        c.model.compute_target = p["budget"]
        c.train.gate_temperature = TEMPERATURE
        c.train.compute_ramp = (0, 0)  # (delay, ramp) steps of the compute loss weight
        c.optim.arbitrator_lr_scale = ARB_LR_SCALE
    elif p["method"] == "window":
        c.model.left_chunks = int(p["value"])
    elif p["method"] == "static":
        c.model.static_attention, c.model.static_ffn = p["static"]
    if p["distill"]:
        c.model.full_pass_weight = 1.0
        c.model.distill_weight = DISTILL_WEIGHT
    if p["tiny"]:
        return c
    if p["scratch"]:
        if p["method"] == "arbitrator":
            c.optim.arbitrator_lr_scale = SCRATCH_ARB_LR_SCALE
            c.train.compute_ramp = SCRATCH_BUDGET_RAMP if p["budget"] else SCRATCH_COMPUTE_RAMP
            if p["anneal"]:
                c.train.budget_anneal = SCRATCH_BUDGET_ANNEAL
        return c
    if p["method"] == "arbitrator" and p["ramp"]:
        c.train.compute_ramp = FINETUNE_COMPUTE_RAMP
    c.train.init_from = DEEP_BASE_WORKDIR if p["deep"] else BASE_WORKDIR
    c.train.num_steps = STEPS
    c.train.eval_every = STEPS
    c.train.checkpoint_every = STEPS
    c.optim.learning_rate = LR
    c.optim.warmup_steps = WARMUP
    return c
