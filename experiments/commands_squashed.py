r"""Squashed-weight low-bit QAT of the spoken-commands Transformer transducer (issue 6).

Fine-tunes the main job's trained float model (`runs/commands_tt`, from
`experiments/commands_tt.py`) with quantization-aware training for a fixed number of steps. The
argument picks the cell: a method (`float`, `identity` = plain QAT, `tanh`, `cdf`) and a bit width
(2, 3, 4, 8), comma-separated; `float` is the baseline, the same fine-tuning without quantization.
`a8` adds 8-bit activations (the input of every weight matmul, per token), e.g. `:tanh,2,a8`.
`mixed` quantizes only the Transformer blocks to BITS, the subsampling front end to 4 bits and the
predictor and the joint network to 8 bits (`MIXED_LAYER_BITS`), e.g. `:cdf,2,mixed`.

  python scripts/train.py --config experiments/commands_squashed.py:tanh,2 \
      --workdir runs/squashed/tanh_2
  python scripts/export_quantized.py --workdir runs/squashed/tanh_2   # packed artifact + sizes

The whole sweep (every method x bit width, the table, histograms and uniformity figure):

  python scripts/sweep_squashed.py --base runs/commands_tt --out runs/squashed

`scratch` (e.g. `:scratch,tanh,2`) trains from random weights with the main job's whole recipe
(`experiments/commands_tt.py`: same steps, learning rate and schedule), float for the first
`SCRATCH_FLOAT_STEPS` steps (w = a f(theta), unquantized), then quantization-aware: the paper's
setting. In both recipes the squashed kernels' theta learns at `THETA_LR_SCALE` times the learning
rate.
`:scratch,float` is the main job itself. The from-scratch sweep:

  python scripts/sweep_squashed.py --scratch --base runs/commands_tt --out runs/squashed_scratch

`tiny` (e.g. `:tiny,tanh,2`) trains the tiny model from scratch for a few steps (tests, demos).
"""

import ml_collections

from jaxspeech import pyfile
from jaxspeech.train import quantize

METHODS = ("float", "identity", "tanh", "cdf")
BITS = (2, 3, 4, 8)
# Fine-tuning recipe (measured in experiments/RESULTS.md): QAT from the float model's weights.
STEPS, LR, WARMUP, REG = 600, 5e-4, 50, 0.1
# Warm start of the squashed kernels: amplitude a = sqrt(3) std(w) per channel (the uniform law with
# the kernel's variance; weights beyond it are clipped), so that w = a f(theta) starts close to
# uniform. With a = max |w| the fine-tuning steps barely move theta toward its target variance
# (measured: bin-occupancy entropy unchanged from the float model's, experiments/RESULTS.md).
AMPLITUDE_INIT = "std"
BASE_WORKDIR = "runs/commands_tt"
# From scratch: float steps before quantization starts (the main job's learning-rate warm-up).
SCRATCH_FLOAT_STEPS = 300
# Learning-rate multiplier of the squashed kernels' theta (optim.theta_lr_scale), both recipes.
# Adam moves every parameter by ~lr per step; theta lives on a scale of ~1, a plain kernel on
# ~fan_in^-1/2 (~0.1 here), so unscaled thetas learn ~10x slower (measured from scratch: loss 144
# vs 90 at step 300, 2-bit test WER 32.33% vs 11.88% with the scale; fine-tuning tanh 2-bit: 12.95%
# vs 11.65%; experiments/RESULTS.md).
THETA_LR_SCALE = 10.0
# `mixed`: the layer types kept wider than BITS. At 2 bits (fine-tuning, CDF) they carry most of
# the gap to float: all-2-bit +10.4% relative, with these widths -0.5%, and the packed encoder
# stays 12.5x smaller than float32 (front end at 8 bits: 10.9x; experiments/RESULTS.md).
MIXED_LAYER_BITS = {"convolution": 4, "predictor": 8, "joint": 8}


def _commands_tt(arg):
    return pyfile.sibling(__file__, "commands_tt").get_config(arg)


def parse(arg: str | None) -> tuple[str, str, int, int, bool]:
    """'tiny,tanh,2,a8' -> (recipe, method, bits, activation bits, mixed); recipe: 'finetune'
    (the default), 'scratch' or 'tiny'; defaults: tanh, 2 bits, float activations, not mixed."""
    tokens = [t for t in (arg or "").split(",") if t]
    recipes = [t for t in tokens if t in ("tiny", "scratch")]
    act_bits = 8 if "a8" in tokens else 0
    rest = [t for t in tokens if t not in ("tiny", "scratch", "a8", "mixed")]
    method = next((t for t in rest if t in METHODS), "tanh")
    bits = [int(t) for t in rest if t.isdigit()]
    unknown = [t for t in rest if t not in METHODS and not t.isdigit()]
    if unknown or len(bits) > 1 or (bits and bits[0] not in range(1, 9)) or len(recipes) > 1:
        raise ValueError(
            f"unknown variant {arg!r}; use '[tiny|scratch,]METHOD[,BITS][,a8][,mixed]' with "
            f"METHOD in {METHODS} and BITS in 1..8, e.g. commands_squashed.py:tanh,2"
        )
    recipe = (recipes or ["finetune"])[0]
    return recipe, method, bits[0] if bits else 2, act_bits, "mixed" in tokens


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    recipe, method, bits, act_bits, mixed = parse(arg)
    tiny = recipe == "tiny"
    c = _commands_tt("tiny" if tiny else None)
    c.model.activation_bits = act_bits
    c.quant = quantize.default_config(
        enabled=method != "float",
        bits=bits,
        squash="identity" if method in ("float", "identity") else method,
        regularizer_weight=REG,
        amplitude_init=AMPLITUDE_INIT,
    )
    if mixed:
        c.quant.layer_bits.update(MIXED_LAYER_BITS)
    if tiny:  # from scratch, a handful of steps
        c.quant.warmup_steps = 2
        return c
    if method in ("tanh", "cdf"):  # plain kernels have no theta
        c.optim.theta_lr_scale = THETA_LR_SCALE
    if recipe == "scratch":  # the main job's recipe, quantized after a float warm-up
        c.quant.warmup_steps = SCRATCH_FLOAT_STEPS
        return c
    c.train.init_from = BASE_WORKDIR
    c.train.num_steps = STEPS
    c.train.eval_every = STEPS
    c.train.checkpoint_every = STEPS
    c.optim.learning_rate = LR
    c.optim.warmup_steps = WARMUP
    return c
