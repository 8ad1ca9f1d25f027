r"""Arbitrators on the paper-sized LibriSpeech Transformer transducer (Xie et al. 2022's setup).

The model of `experiments/librispeech_tt.py` (18 layers, d_model 512, chunked streaming attention)
with an acoustic arbitrator gating every layer's attention and feed-forward per frame, trained
jointly with the compute loss (Gumbel-sigmoid straight-through gates, temperature 1 -> 0.5). The
argument is the compute loss weight (default 20: nats per utterance for running the whole gated
encoder; LibriSpeech utterances are ~12 s, so the weight is larger than the spoken-commands
one), optionally followed by a local LibriSpeech directory:

  python scripts/train.py --config experiments/librispeech_arbitrator.py --workdir runs/ls_arb
  python scripts/train.py --config experiments/librispeech_arbitrator.py:20,/data/LibriSpeech \
      --workdir runs/ls_arb

The paper trains arbitrators and Transformer jointly from scratch; to warm-start from a trained
T-T instead (the spoken-commands recipe), add
`--config.train.init_from=runs/librispeech_tt --config.train.num_steps=20000
--config.train.compute_ramp="(0, 0)"` (from scratch the compute loss is delayed for half the run).
The sliding-window baseline is `experiments/librispeech_tt.py` with
`--config.model.left_chunks=N` (N < 4).
"""

from jaxspeech import pyfile


def get_config(arg: str | None = None):
    weight, _, local = (arg or "").partition(",")
    c = pyfile.sibling(__file__, "librispeech_tt").get_config(local or None)
    c.model.arbitrator = "acoustic"
    c.model.arbitrator_dim = 64
    c.model.gate_init_bias = 2.0
    c.model.compute_weight = float(weight) if weight else 20.0
    c.train.gate_temperature = (1.0, 0.5)
    # From scratch the compute loss waits half the run, then ramps in over a sixth: with it on
    # from the start the spoken-commands gates all switched off within 200 steps (the commands
    # recipe's (1200, 400) of 2400 steps, experiments/RESULTS.md). Warm-started: set (0, 0).
    c.train.compute_ramp = (c.train.num_steps // 2, c.train.num_steps // 6)
    return c
