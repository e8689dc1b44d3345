import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from plrd_jax.io.store import FamilyStore, StoreError

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
        assert m["ppl_after"]["eval"] < m["ppl_before"]["eval"]  # a bare array is the corpus "eval"
        assert set(m["parent_ppl"]) == {"eval"}
    assert members[1]["params"] < members[0]["params"]
    assert members[1]["config"]["linears"]["layers_0/mlp/up"]["rank"] == 12  # 0.25 · 48


def test_a_different_schedule_into_the_same_directory_is_refused(tmp_path):
    from family_run import CONFIG, SCHEDULE, tiny_data

    from plrd_jax.methods.plrd import Schedule, run_family
    from plrd_jax.nn.model import init_params

    heal, evals = tiny_data()
    store = FamilyStore(tmp_path / "fam")
    run_family("tiny", CONFIG, init_params(CONFIG), Schedule(SCHEDULE.stages[:1], batch_size=4, seq_len=16,
                                                             heal=SCHEDULE.heal), heal, evals, store)
    with pytest.raises(StoreError, match="another family run"):
        run_family("tiny", CONFIG, init_params(CONFIG), SCHEDULE, heal, evals, store)


def test_budget_fractions_on_the_command_line_keep_the_plrd_preset_settings():
    from plrd_jax.cli import build_parser, family_schedule
    from plrd_jax.methods.plrd import PRESETS

    schedule = family_schedule(build_parser().parse_args(["family", "--out", "x", "--schedule", "0.7,0.3",
                                                          "--one-shot"]))
    assert [s.budget_fraction for s in schedule.stages] == [0.7, 0.3]
    assert schedule.decomposition == PRESETS["plrd"].decomposition == "whitened"
    assert not schedule.progressive
    assert family_schedule(build_parser().parse_args(["family", "--out", "x", "--schedule", "0.5",
                                                      "--decomposition", "svd"])).decomposition == "svd"


def test_members_are_scored_on_every_corpus_and_the_previous_member_can_teach(tmp_path):
    """Each member's PPL per corpus equals an independent `perplexity` of the stored member on that corpus, the
    parent's PPL is recorded beside it, and distilling from the previous member runs the teacher it names."""
    from family_run import CONFIG, SCHEDULE, tiny_data

    from plrd_jax.evaluation.perplexity import perplexity
    from plrd_jax.methods.plrd import run_family
    from plrd_jax.nn.model import init_params
    from plrd_jax.io.store import load_member

    heal, evals = tiny_data()
    rng = np.random.default_rng(1)
    noise = rng.integers(0, CONFIG.vocab_size, (4, 32)).astype(np.int32)  # a corpus unlike the healing text
    corpora = {"periodic": evals, "noise": noise}
    schedule = dataclasses.replace(SCHEDULE, teacher="previous", heal=SCHEDULE.heal.replace(kd_weight=0.5))
    params = init_params(CONFIG)
    kd = {}
    store = FamilyStore(tmp_path / "fam")
    results = run_family("tiny", CONFIG, params, schedule, heal, corpora, store,
                         on_event=lambda kind, info: kd.setdefault(info["member"], info["kd"]) if kind == "step"
                         else None)
    store.close()
    # Member 1's first distillation term, computed independently: member 0 as stored is the teacher, the
    # student is member 0 cut to member 1's ranks, on member 1's first batch.
    from plrd_jax.nn.model import Decoder
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.training.losses import distill_loss
    from plrd_jax.transforms.compress import compress

    config0, member0, _ = load_member(f"{tmp_path / 'fam'}:0")
    plan = dataclasses.replace(schedule.stages[1].plan(count_params(params), schedule.matrices),
                               decomposition=schedule.decomposition)
    student, student_config, _ = compress(member0, plan, config0)
    batch = heal.batch_at(schedule.steps(schedule.stages[0]), schedule.batch_size, 0)  # stages read consecutive stretches
    want = distill_loss(Decoder(student_config).apply({"params": student}, batch),
                        Decoder(config0).apply({"params": member0}, batch))
    np.testing.assert_allclose(kd[1], float(want), rtol=1e-4)
    parent = {name: perplexity(CONFIG, params, w).ppl for name, w in corpora.items()}
    for r in results:
        config, member, meta = load_member(f"{tmp_path / 'fam'}:{r.member}")
        for name, windows in corpora.items():
            np.testing.assert_allclose(r.ppl_after[name], perplexity(config, member, windows).ppl, rtol=1e-5)
            np.testing.assert_allclose(meta["parent_ppl"][name], parent[name], rtol=1e-5)
    assert results[0].ppl_after["periodic"] < results[0].ppl_before["periodic"]
    with pytest.raises(ValueError, match="unknown teacher"):
        dataclasses.replace(SCHEDULE, teacher="grandparent")


def test_minitron_members_live_beside_plrd_members_in_one_store(tmp_path):
    """A Minitron schedule prunes each member to its budget (a plain dense model equal to the masked parent is
    tested in test_minitron.py), heals it, and stores it at its own member numbers and step ids, so a PLRD
    family in the same directory is neither overwritten nor refused."""
    from family_run import CONFIG, SCHEDULE, tiny_data

    from plrd_jax.methods.plrd import MEMBER_BASE, Schedule, Stage, run_family
    from plrd_jax.nn.model import init_params
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.io.store import load_member

    heal, evals = tiny_data()
    params = init_params(CONFIG)
    store = FamilyStore(tmp_path / "fam")
    plrd = run_family("tiny", CONFIG, params, SCHEDULE, heal, evals, store)
    minitron = Schedule((Stage("m-70%", budget_fraction=0.7, heal_tokens=2 * 4 * 16),), batch_size=4, seq_len=16,
                        method="minitron", progressive=False, heal=SCHEDULE.heal.replace(kd_weight=1.0))
    (result,) = run_family("tiny", CONFIG, params, minitron, heal, evals, store)
    store.close()
    assert result.member == MEMBER_BASE["minitron"]
    config, member, meta = load_member(f"{tmp_path / 'fam'}:m-70%")
    assert meta["method"] == "minitron" and all(spec.kind == "dense" for _, spec in config.linears)
    assert abs(count_params(member) - 0.7 * count_params(params)) <= 0.01 * count_params(params)
    _, _, first = load_member(f"{tmp_path / 'fam'}:0")
    assert first["name"] == plrd[0].name and first["ppl_after"] == plrd[0].ppl_after  # untouched
    with pytest.raises(ValueError, match="budget_fraction"):
        Schedule((Stage("r", rank=4),), method="minitron")


def test_family_command_on_mixtures_scores_every_corpus_and_refuses_overlap(tmp_path, capsys):
    """The family command on a tiny parent: a weighted healing mixture (with the parent's own samples), two
    evaluation corpora (one sharing a domain with the healing text, one unseen), a summary with a column per
    corpus and a ratios plot; Minitron members beside it; an evaluation corpus that is healing text is a
    one-line error before anything runs."""
    from plrd_jax.cli import main
    from plrd_jax.nn.config import ModelConfig
    from plrd_jax.io.hf import save_hf
    from plrd_jax.nn.model import init_params
    from test_hf import small_tokenizer

    config = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=64)
    save_hf(init_params(config, seed=0), config, tmp_path / "parent",
            tokenizer=small_tokenizer(full_byte_alphabet=True))
    (tmp_path / "cats-heal.txt").write_text("the cat sat on the mat while the dog slept by the door. " * 60)
    (tmp_path / "cats-eval.txt").write_text("a cat ran to the mat and the dog woke up at the door. " * 20)
    (tmp_path / "code.txt").write_text("def f(x):\n    return x * 2  # doubles its argument\n" * 20)
    heal, cats, code = (str(tmp_path / n) for n in ("cats-heal.txt", "cats-eval.txt", "code.txt"))
    common = ["--parent", str(tmp_path / "parent"), "--schedule", "0.8", "--heal-tokens", "256", "--batch-size", "2",
              "--seq-len", "32", "--calibration-windows", "4", "--eval-seq-len", "32", "--eval-tokens", "64",
              "--save-every", "0"]
    out = tmp_path / "fam"
    assert main(["family", *common, "--data", f"{heal}=3,parent-samples=1", "--eval-data", f"{cats},{code}",
                 "--kd-weight", "1", "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert f"{cats} PPL" in summary and f"{code} (unseen) PPL" in summary and "geo-mean" in summary
    assert (out / "ppl_ratios.png").stat().st_size > 0 and list(out.glob("parent_samples_*.npy"))
    assert main(["family", *common, "--method", "minitron", "--data", heal, "--eval-data", f"{cats},{code}",
                 "--out", str(out)]) == 0
    assert "minitron-80%" in (out / "minitron_summary.md").read_text()
    capsys.readouterr()
    assert main(["family", *common, "--data", heal, "--eval-data", f"{cats},{heal}", "--out",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is also calibration / healing text" in err[0]
    assert not (tmp_path / "bad").exists()


def test_a_scanned_family_equals_an_unrolled_one(tmp_path):
    """The layout is how a member is computed, not what: the same family with layers scanned (params stored
    stacked) and unrolled ends with the same members (each matrix A·B; a factor's singular vectors may differ in
    sign) and PPLs to float32 round-off, carried through two decompositions and 11 Adam steps: each matrix to
    1e-4 of its largest entry (Adam's 1/√v grows a round-off difference in a near-zero gradient; 3e-5 seen)."""
    import jax

    from family_run import CONFIG, SCHEDULE, tiny_data

    from plrd_jax.io.store import load_member
    from plrd_jax.methods.plrd import run_family
    from plrd_jax.nn.layout import unstack_layers
    from plrd_jax.nn.model import init_params
    from plrd_jax.transforms.factorize import densify

    heal, evals = tiny_data()
    results = {}
    for layout in ("scanned", "unrolled"):
        store = FamilyStore(tmp_path / layout)
        results[layout] = run_family("tiny", CONFIG, init_params(CONFIG), SCHEDULE, heal, evals, store,
                                     scan_layers=layout == "scanned")
        store.close()
    for k, (a, b) in enumerate(zip(results["scanned"], results["unrolled"])):
        assert a.ranks == b.ranks and a.params == b.params
        for when in ("ppl_before", "ppl_after"):
            np.testing.assert_allclose(getattr(a, when)["eval"], getattr(b, when)["eval"], rtol=1e-5)
        ca, pa, _ = load_member(f"{tmp_path / 'scanned'}:{k}")
        cb, pb, _ = load_member(f"{tmp_path / 'unrolled'}:{k}")
        assert ca.scan_layers and "layers" in pa and not cb.scan_layers and "layers_1" in pb
        da, _ = densify(unstack_layers(pa), ca)
        db, _ = densify(pb, cb)
        for x, y in zip(jax.tree.leaves(da), jax.tree.leaves(db)):
            assert float(np.abs(x - y).max()) <= 1e-4 * float(np.abs(y).max())
