"""Ahead-of-time plans (plrd_jax/training/aot.py, the `plan` command): bad topologies and meshes are one-line
errors before any compile; a tiny model's plan on 8 host devices reports the memory XLA assigns."""
import json
import subprocess
import sys

import pytest

from plrd_jax.cli import main
from plrd_jax.nn.config import ModelConfig
from plrd_jax.training.aot import PlanError, accelerator, check_mesh

TINY = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_seq_len=64)


def test_topologies_and_meshes_are_checked_before_compiling(capsys):
    assert accelerator("v5p-8").chips == 4 and accelerator("v5e-8").chips == 8
    with pytest.raises(PlanError, match="unknown topology 'v9-8'"):
        accelerator("v9-8")
    assert check_mesh(TINY, (1, -1, 1), 8, 8) == (1, 8, 1)
    with pytest.raises(PlanError, match="does not divide the slice's 8 chips"):
        check_mesh(TINY, (3, -1, 1), 8, 8)
    with pytest.raises(PlanError, match="a micro-batch of 4 sequences does not divide"):
        check_mesh(TINY, (1, -1, 1), 8, 4)
    with pytest.raises(PlanError, match="num_kv_heads 2 does not divide over tensor = 4"):
        check_mesh(TINY, (1, 2, 4), 8, 8)
    for argv, message in ((["plan", "--topology", "v9-8"], "unknown topology"),
                          (["plan", "--mesh", "1,3,1", "--batch-size", "8"], "does not divide the slice")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
from plrd_jax.nn.config import ModelConfig
from plrd_jax.training.aot import accelerator, plan_heal_step
from plrd_jax.training.optim import HealConfig
c = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                max_seq_len=64)
out = plan_heal_step(c, HealConfig(total_steps=2, warmup_steps=0), 8, 32, accelerator("v5e-8"))
print(json.dumps(out))
"""


def test_a_plan_reports_per_device_memory_and_flops():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    h = out["heal"]
    params = sum(x for x in (128 * 64, 2 * 64, 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96 + 2 * 64), 64 * 128))
    # the state (params + two Adam moments, float32) sharded 8 ways lies inside each device's arguments
    assert 3 * 4 * params / 8 <= h["argument"] <= 3 * 4 * params
    assert h["fits"] and h["flops"] > 0 and out["suggestion"] == "fits" and out["mesh"] == [1, 8, 1]


def test_plan_compiles_prune_heal_and_eval_steps_of_a_sheared_preset():
    """The plan command re-executes itself on 4 host devices and plans every step a Sheared member runs: its
    pruning step (the masked parent: the parent's params and Adam moments, plus masks) holds more per device
    than its continued-training step (the pruned model), which holds more than evaluation (params only)."""
    run = subprocess.run([sys.executable, "-m", "plrd_jax", "plan", "--preset", "sheared-smollm2", "--topology",
                          "v5p-8", "--members", "0", "--dtype", "float32"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("0 | ")]
    assert [r[2] for r in rows] == ["prune", "heal", "eval"]
    args = {r[2]: float(r[4]) for r in rows}
    assert args["prune"] > args["heal"] > args["eval"] > 0
    assert all(r[7] == "yes" and float(r[8]) > 0 for r in rows)


def test_plan_steps_are_checked_before_compiling(capsys):
    for argv, message in ((["plan", "--steps", "prune"], "prune is not a step of 'plrd'"),
                          (["plan", "--preset", "nope"], "--preset 'nope' is not one of"),
                          (["plan", "--topology", "v5p-8", "--eval-batch", "3"], "a micro-batch of 3 sequences"),
                          (["plan", "--topology", "v5p-8", "--members", "7"], "the preset has members 0..4"),
                          (["plan", "--topology", "v5p-8", "--members", "x"], "expected indices such as 0,2")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_every_preset_lists_its_steps_from_shapes_alone():
    """Every family and Sheared preset yields its members' steps without compiling: a member smaller than the
    parent for heal and eval, the parent itself for Sheared's pruning step."""
    from argparse import Namespace

    from plrd_jax.cli.plan import _planned_steps, parent_config
    from plrd_jax.methods.plrd import PRESETS
    from plrd_jax.methods.sheared import PRESETS as SHEARED
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.nn.model import abstract_params

    for name in [*PRESETS, *SHEARED]:
        sheared = name in SHEARED
        schedule = (SHEARED if sheared else PRESETS)[name]
        args = Namespace(model=None, dtype="bfloat16", eval_batch=None, members=None, batch_size=None)
        parent = parent_config(args, name)
        kinds = ["prune", "heal", "eval"] if sheared else ["heal", "eval"]
        steps = list(_planned_steps(args, schedule, sheared, kinds, parent, schedule.batch_size, 1))
        members = schedule.members if sheared else schedule.stages
        assert [s[2] for s in steps] == kinds * len(members), name
        counts = {}  # one abstract init per distinct config (7B ones take seconds each)
        full = counts.setdefault(parent, count_params(abstract_params(parent)))
        for _, _, kind, config, _ in steps:
            if config not in counts:
                counts[config] = count_params(abstract_params(config))
            assert (counts[config] == full) if kind == "prune" else (counts[config] < full), (name, kind)
