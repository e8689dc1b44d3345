import os
import subprocess
import sys

import numpy as np
import pytest

from plrd_jax.store import FamilyStore, StoreError

HERE = os.path.dirname(__file__)


def run(out, *kill):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    return subprocess.run([sys.executable, os.path.join(HERE, "family_run.py"), str(out), *map(str, kill)],
                          env=env, capture_output=True, text=True, timeout=600)


def test_progressive_family_then_kill_and_resume_gives_bitwise_the_same_members(tmp_path):
    clean = run(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed = run(tmp_path / "resumed", 1, 3)  # SIGKILL in member 1, after its 3rd step (checkpoint at 2)
    assert killed.returncode == -9
    resumed = run(tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = np.load(tmp_path / "clean" / "result.npz"), np.load(tmp_path / "resumed" / "result.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    store = FamilyStore(tmp_path / "clean", read_only=True)
    members = store.members()
    assert [m["name"] for m in members] == ["a", "b"]
    for m in members:  # healing lowered the loss on held-out text, sizes shrink
        assert m["ppl_after"] < m["ppl_before"]
    assert members[1]["params"] < members[0]["params"]
    assert members[1]["config"]["linears"]["layers_0/mlp/up"]["rank"] == 12  # 0.25 · 48


def test_a_different_schedule_into_the_same_directory_is_refused(tmp_path):
    from family_run import CONFIG, SCHEDULE, tiny_data

    from plrd_jax.family import Schedule, run_family
    from plrd_jax.model import init_params

    heal, evals = tiny_data()
    store = FamilyStore(tmp_path / "fam")
    run_family("tiny", CONFIG, init_params(CONFIG), Schedule(SCHEDULE.stages[:1], batch_size=4, seq_len=16,
                                                             heal=SCHEDULE.heal), heal, evals, store)
    with pytest.raises(StoreError, match="another family run"):
        run_family("tiny", CONFIG, init_params(CONFIG), SCHEDULE, heal, evals, store)


def test_budget_fractions_on_the_command_line_keep_the_plrd_preset_settings():
    from plrd_jax.cli import build_parser, family_schedule
    from plrd_jax.family import PRESETS

    schedule = family_schedule(build_parser().parse_args(["family", "--out", "x", "--schedule", "0.7,0.3",
                                                          "--one-shot"]))
    assert [s.budget_fraction for s in schedule.stages] == [0.7, 0.3]
    assert schedule.decomposition == PRESETS["plrd"].decomposition == "whitened"
    assert not schedule.progressive
    assert family_schedule(build_parser().parse_args(["family", "--out", "x", "--schedule", "0.5",
                                                      "--decomposition", "svd"])).decomposition == "svd"
