"""tables: our members and results beside the published rows, with the scale of each; bad inputs are one line."""
import json

import numpy as np
import pytest

from plrd_jax import cli
from plrd_jax.io.store import FamilyStore
from plrd_jax.reporting.papers import PUBLISHED, TableError, collect, render


def make_family(directory):
    store = FamilyStore(directory)
    params = {"w": np.zeros((2, 2), np.float32)}
    common = {"method": "plrd", "parent": "smollm2-135m", "data": {"heal": {"source": "wikitext2-heal"}},
              "final": True}
    store.save(3, params, {**common, "member": 0, "name": "plrd-90%", "step": 3, "params": 121_000_000,
                           "tokens": 8192, "ppl_before": 60.0, "ppl_after": 41.5})
    store.save(7, params, {**common, "member": 1, "name": "plrd-75%", "step": 7, "params": 101_300_000,
                           "tokens": 8192, "ppl_before": 300.0, "ppl_after": 88.25})
    store.save(8, params, {**common, "member": 1, "name": "plrd-75%", "step": 8, "final": False})
    store.close()
    return directory


def test_members_and_zeroshot_results_beside_the_published_rows(tmp_path):
    family = make_family(tmp_path / "fam")
    zs = tmp_path / "zs.json"
    zs.write_text(json.dumps({"model": f"{family}:1", "tasks": {
        "boolq": {"acc": 0.625, "acc_norm": 0.625}, "winogrande": {"acc": 0.5, "acc_norm": 0.5}}}))
    results = tmp_path / "pretrain_study.json"
    results.write_text(json.dumps({"settings": {"steps": 80, "batch_size": 8, "seq_len": 256}, "results": {
        "cola": {"method": "cola", "counts": {"total": 9_000_000}, "tokens": 163840, "eval_ppl": 512.5}}}))
    rows = collect([family, results], [zs])
    assert [(r.method, r.model, r.params, r.tokens) for r in rows] == [
        ("plrd", "fam:plrd-90%", 121e6, 8192), ("plrd", "fam:plrd-75%", 101.3e6, 8192),
        ("cola", "cola", 9e6, 163840)]
    assert rows[0].metrics == {"ppl": 41.5}
    assert rows[1].metrics == {"ppl": 88.25, "boolq acc": 62.5, "boolq acc_norm": 62.5, "winogrande acc": 50.0,
                               "winogrande acc_norm": 50.0, "avg acc": 56.25}
    assert rows[0].scale == "parent smollm2-135m, data wikitext2-heal"
    table = render(rows)
    lines = table.splitlines()
    assert "### PLRD: a family from one parent (progressive low-rank decomposition + short healing)" in lines
    assert ("| ours | plrd | fam:plrd-75% | 101M | 8.19K | 88.25 | 62.5 | 62.5 | 50 | 50 | 56.25 | parent "
            "smollm2-135m, data wikitext2-heal |") in lines
    assert any(line.startswith("| PLRD (arXiv 2406.19995) | plrd | LLaMA-2-7B → 3.3B | 3.3B | 1B |") for line in lines)
    # the pretraining table: GaLore's full-rank 60M row (34.06) above ours
    galore = next(line for line in lines if "| full | LLaMA-60M |" in line)
    assert "| 34.06 |" in galore and lines.index(galore) < lines.index(next(l for l in lines if "| ours | cola |" in l))
    assert "Sheared-LLaMA" not in table  # no run of ours in that setting


def test_published_rows_state_their_scale():
    assert all(r.scale and r.source != "ours" for r in PUBLISHED)
    assert {r.setting for r in PUBLISHED} == {"plrd", "sheared", "pretrain"}


def test_bad_inputs(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TableError, match="is neither a family store"):
        collect([tmp_path])
    with pytest.raises(TableError, match="does not exist"):
        collect([tmp_path / "missing"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TableError, match="bad.json is not a zero-shot result file"):
        collect([], [tmp_path / "bad.json"])
    with pytest.raises(TableError, match="no results with a 'method'"):
        collect([tmp_path / "bad.json"])
    assert cli.main(["tables", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'} does not exist\n"


def test_cli_writes_the_markdown(tmp_path, capsys):
    family = make_family(tmp_path / "fam")
    assert cli.main(["tables", str(family), "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() in capsys.readouterr().out


def test_every_paper_preset_is_commands_the_cli_accepts():
    """experiments/papers.py: each step of each preset, at both scales, parses with the CLI's own parser."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import papers

    parser = cli.build_parser()
    values = {"out": "/tmp/o", "parent": "/tmp/p", "data_dir": "gs://bucket-x/tfds", "sources": "cc=tfds:c4/en"}
    seen = set()
    for name, preset in papers.PRESETS.items():
        for scale in ("full", "cpu"):
            if not getattr(preset, scale):
                continue
            for step in papers.commands(name, scale, values):
                if step[:3] == ["python", "-m", "plrd_jax"]:
                    args = parser.parse_args(step[3:])
                    seen.add(args.command)
    assert seen == {"family", "zeroshot", "tables", "shear", "pretrain"}
