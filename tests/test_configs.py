"""Every experiment config loads, builds its TransducerConfig and optimizer, and is locked
(a misspelled key is an error, in Python and on the command line)."""

import os
import subprocess
import sys

import ml_collections
import pytest

from jaxspeech import pyfile
from jaxspeech.train import quantize, sharding
from jaxspeech.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [
    ("commands_tt.py", None),
    ("commands_tt.py", "tiny"),
    ("librispeech_tt.py", None),
    ("librispeech_tt.py", "/data/LibriSpeech"),
    ("commands_arbitrator.py", None),
    ("commands_arbitrator.py", "none"),
    ("commands_arbitrator.py", "window,1"),
    ("commands_arbitrator.py", "arbitrator,8,block,st"),
    ("commands_arbitrator.py", "tiny,arbitrator,2"),
    ("commands_arbitrator.py", "arbitrator,32,scratch"),
    ("commands_arbitrator.py", "arbitrator,32,scratch,chunk"),
    ("commands_arbitrator.py", "static,0001,1101,scratch"),
    ("commands_arbitrator.py", "arbitrator,32,deep,chunk"),
    ("commands_arbitrator.py", "arbitrator,64,deep,chunk,ramp"),
    ("commands_arbitrator.py", "arbitrator,64,scratch,deep,distill"),
    ("commands_arbitrator.py", "static,0001,1101,scratch,distill"),
    ("commands_arbitrator.py", "arbitrator,64,scratch,deep,budget=0.38"),
    ("commands_arbitrator.py", "arbitrator,64,scratch,deep,chunk_attn,budget=0.38"),
    ("commands_arbitrator.py", "arbitrator,64,scratch,deep,priced,budget=0.38"),
    ("commands_arbitrator.py", "arbitrator,64,scratch,deep,priced,budget=0.38,anneal"),
    ("commands_arbitrator.py", "arbitrator,64,scratch,deep,priced,whole,budget=0.38"),
    ("librispeech_arbitrator.py", None),
    ("librispeech_arbitrator.py", "30,/data/LibriSpeech"),
    ("commands_squashed.py", None),
    ("commands_squashed.py", "identity,3"),
    ("commands_squashed.py", "scratch,cdf,2"),
    ("commands_squashed.py", "tiny,tanh,2,a8"),
    ("commands_squashed.py", "cdf,2,mixed"),
]


def load(name, arg):
    module = pyfile.load(os.path.join(ROOT, "experiments", name))
    return module, module.get_config(arg)


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_builds(name, arg):
    module, config = load(name, arg)
    assert "python scripts/train.py --config experiments/" + name in module.__doc__
    assert {"model", "data", "optim", "mesh", "train", "eval"} <= set(config.keys())
    model_cfg = state_lib.model_config(config.model, vocab_size=30, bf16=config.train.bf16)
    assert model_cfg.vocab_size == 30
    tx, schedule = state_lib.make_optimizer(config.optim, config.train.num_steps)
    assert float(schedule(config.optim.warmup_steps)) == pytest.approx(
        config.optim.learning_rate, rel=1e-3
    )
    rules = sharding.axis_rules(config.mesh)
    assert set(rules) >= {"batch", "embed", "mlp", "heads", "vocab", "joint"}
    for split in ("train", "validation", "test"):
        assert ":" in config.data[split]


def test_squashed_from_scratch_is_the_main_job_recipe():
    """The from-scratch squashed sweep reuses the main job as its float cell: same recipe."""
    _, main = load("commands_tt.py", None)
    module, scratch_float = load("commands_squashed.py", "scratch,float")
    sweep = pyfile.load(os.path.join(ROOT, "scripts", "sweep_squashed.py"))
    assert sweep.same_recipe(scratch_float, main) == []
    older = ml_collections.ConfigDict(main.to_dict())  # a workdir from before these fields
    del older.optim["theta_lr_scale"], older.model["gate_per_chunk"]
    assert sweep.same_recipe(scratch_float, older) == []
    newer = ml_collections.ConfigDict(main.to_dict())
    newer.model.gate_per_chunk = True  # a field one side lacks compares by its default
    assert sweep.same_recipe(newer, older) == ["model.gate_per_chunk"]
    older.optim.learning_rate *= 2
    assert sweep.same_recipe(scratch_float, older) == ["optim.learning_rate"]
    _, tanh = load("commands_squashed.py", "scratch,tanh,2")
    assert tanh.quant.enabled and tanh.quant.squash == "tanh" and tanh.quant.bits == 2
    assert tanh.quant.warmup_steps == module.SCRATCH_FLOAT_STEPS
    assert tanh.optim.theta_lr_scale == module.THETA_LR_SCALE
    _, plain = load("commands_squashed.py", "scratch,identity,2")  # no theta to scale
    assert plain.optim.theta_lr_scale == main.optim.theta_lr_scale
    assert not tanh.train.init_from and tanh.train.num_steps == main.train.num_steps
    _, finetune = load("commands_squashed.py", "float")  # the fine-tuning recipe differs
    assert {"train.init_from", "train.num_steps"} <= set(sweep.same_recipe(finetune, main))
    _, mixed = load("commands_squashed.py", "cdf,2,mixed")  # 2-bit blocks, wider rest
    assert dict(mixed.quant.layer_bits) == {
        "attention": -1, "feed_forward": -1, "convolution": 4, "predictor": 8, "joint": 8
    }  # fmt: skip
    bits = {r.pattern.split("/")[0]: r.bits for r in quantize.rules_from_config(mixed.quant)}
    assert bits["^subsampling"] == 4 and bits["^predictor"] == bits["^(joint|ctc_head)"] == 8
    assert bits[r"^encoder"] == 2
    _, cdf = load("commands_squashed.py", "cdf,3")  # fine-tuning scales theta too
    assert cdf.optim.theta_lr_scale == module.THETA_LR_SCALE and cdf.train.init_from
    with pytest.raises(ValueError, match="tiny.scratch"):
        load("commands_squashed.py", "tiny,scratch,tanh")


def test_static_pruning_variant():
    _, config = load("commands_arbitrator.py", "static,0001,1101,scratch")
    model_cfg = state_lib.model_config(config.model, vocab_size=30, bf16=False)
    assert model_cfg.arbitrator == "none" and not config.train.init_from
    assert model_cfg.static_gates == ((False, True), (False, True), (False, False), (True, True))
    for bad in ("static", "static,0001", "static,01x1,1111", "static,0001,1101,2"):
        with pytest.raises(ValueError, match="unknown variant"):
            load("commands_arbitrator.py", bad)
    with pytest.raises(ValueError, match="unknown variant"):  # distill needs a gated encoder
        load("commands_arbitrator.py", "window,1,distill")
    model_cfg = state_lib.model_config(
        load("commands_arbitrator.py", "static,0001,1101,scratch,distill")[1].model, vocab_size=30
    )
    assert (model_cfg.full_pass_weight, model_cfg.distill_weight) == (1.0, 1.0)
    with pytest.raises(ValueError, match="static_ffn must be"):  # 4 layers, not 3
        cfg = load("commands_arbitrator.py", "static,0001,110")[1]
        state_lib.model_config(cfg.model, vocab_size=30)


def test_budget_variant():
    """`budget=C`: the compute target, and from scratch the budget's earlier compute ramp."""
    module, config = load("commands_arbitrator.py", "arbitrator,64,scratch,deep,budget=0.38")
    model_cfg = state_lib.model_config(config.model, vocab_size=30, bf16=False)
    assert (model_cfg.compute_target, model_cfg.compute_weight) == (0.38, 64.0)
    assert tuple(config.train.compute_ramp) == module.SCRATCH_BUDGET_RAMP
    price = load("commands_arbitrator.py", "arbitrator,64,scratch,deep")[1]
    assert price.model.compute_target == 0.0
    assert tuple(price.train.compute_ramp) == module.SCRATCH_COMPUTE_RAMP
    assert not price.model.price_per_chunk
    priced = state_lib.model_config(
        load("commands_arbitrator.py", "arbitrator,64,priced")[1].model, vocab_size=30
    )
    assert priced.price_per_chunk and priced.chunk_price_share == 1.0
    shared = state_lib.model_config(
        load("commands_arbitrator.py", "arbitrator,64,priced=0.4,budget=0.38")[1].model,
        vocab_size=30,
    )
    assert (shared.price_per_chunk, shared.chunk_price_share) == (True, 0.4)
    assert tuple(config.train.budget_anneal) == (0, 0)  # a fixed budget by default
    annealed = load("commands_arbitrator.py", "arbitrator,64,scratch,deep,budget=0.38,anneal")[1]
    assert tuple(annealed.train.budget_anneal) == module.SCRATCH_BUDGET_ANNEAL
    assert tuple(annealed.train.compute_ramp) == module.SCRATCH_BUDGET_RAMP
    assert not shared.whole_block_gates
    whole = load("commands_arbitrator.py", "arbitrator,64,priced,whole,budget=0.38")[1]
    assert state_lib.model_config(whole.model, vocab_size=30).whole_block_gates
    for bad in ("arbitrator,64,budget=1.5", "arbitrator,64,budget=x", "window,1,budget=0.4",
                "static,0001,1101,budget=0.4", "arbitrator,64,budget=0.3,budget=0.4",
                "arbitrator,64,chunk,chunk_attn", "window,1,priced", "window,1,priced=0.4",
                "arbitrator,64,priced=1.5", "arbitrator,64,priced=x",
                "arbitrator,64,scratch,anneal", "arbitrator,64,budget=0.38,anneal",
                "window,1,whole", "static,0001,1101,whole",
                "arbitrator,64,chunk_attn,whole"):  # fmt: skip
        with pytest.raises(ValueError, match="unknown variant"):
            load("commands_arbitrator.py", bad)


def test_deep_variant():
    """`deep`: 8 blocks; fine-tuning cells start from the deep ungated run, not the main job."""
    module, main = load("commands_arbitrator.py", "none,scratch,deep")
    assert main.model.num_layers == module.DEEP_LAYERS == 8 and not main.train.init_from
    _, cell = load("commands_arbitrator.py", "arbitrator,32,deep,chunk")
    assert cell.train.init_from == module.DEEP_BASE_WORKDIR and cell.model.gate_per_chunk
    assert load("commands_arbitrator.py", "arbitrator,32")[1].train.init_from == "runs/commands_tt"
    _, static = load("commands_arbitrator.py", "static,00000001,11111101,deep")
    model_cfg = state_lib.model_config(static.model, vocab_size=30, bf16=False)
    assert len(model_cfg.static_gates) == 8 and model_cfg.static_gates[7] == (True, True)
    assert load("commands_arbitrator.py", "tiny,none,deep")[1].model.num_layers == 2


def test_finetune_ramp_variant():
    """`ramp`: fine-tuning cells ramp the compute loss in; without it, full weight from step 0."""
    module, cell = load("commands_arbitrator.py", "arbitrator,32,ramp")
    assert tuple(cell.train.compute_ramp) == module.FINETUNE_COMPUTE_RAMP
    assert sum(module.FINETUNE_COMPUTE_RAMP) < cell.train.num_steps  # ends at full weight
    assert tuple(load("commands_arbitrator.py", "arbitrator,32")[1].train.compute_ramp) == (0, 0)
    with pytest.raises(ValueError, match="unknown variant"):  # scratch ramps already
        load("commands_arbitrator.py", "arbitrator,32,scratch,ramp")


def test_locked_config_rejects_unknown_keys():
    _, config = load("commands_tt.py", "tiny")
    config.lock()
    with pytest.raises(AttributeError):
        config.train.num_stepz = 3
    with pytest.raises(ValueError, match="unknown variant"):
        load("commands_tt.py", "tiny2")


def test_unknown_key_on_the_command_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "--config",
            "experiments/commands_tt.py:tiny",
            "--workdir",
            str(tmp_path / "w"),
            "--config.train.num_stepz=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "num_stepz" in out.stderr
    assert not os.path.exists(tmp_path / "w")


def test_config_dict_round_trips_through_json():
    _, config = load("commands_tt.py", "tiny")
    again = ml_collections.ConfigDict(config.to_dict())
    assert again.model.d_model == config.model.d_model
