"""Presets as data (plrd_jax/configs): every file builds its dataclass, user files in the same format, errors."""
import json
import sys
from pathlib import Path

import pytest

from plrd_jax.configs import ConfigFileError, build, load_config, load_preset, preset_names, to_data
from plrd_jax.methods.plrd import PRESETS as FAMILY
from plrd_jax.methods.plrd import Schedule, Stage
from plrd_jax.methods.pretrain import PRESETS as PRETRAIN
from plrd_jax.methods.sheared import PRESETS as SHEARED

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import papers  # noqa: E402


@pytest.mark.parametrize("registry,names", [
    (FAMILY, {"plrd", "plrd-tpu", "minitron", "mistral-7b-3.1b", "llama2-7b-3.3b"}),
    (SHEARED, {"sheared-smollm2", "llama2-7b-1.3b", "llama2-7b-2.7b"}),
    (PRETRAIN, {"llama-20m", "llama-60m", "llama-130m", "llama-350m", "llama-1b"}),
    (papers.PRESETS, {"plrd-llama2-7b", "plrd-mistral-7b", "sheared-llama2-7b-1.3b", "sheared-llama2-7b-2.7b",
                      "galore-60m", "galore-130m", "galore-350m", "galore-1b"}),
])
def test_every_preset_file_builds_and_round_trips(registry, names):
    assert set(registry) == names and len(registry) == len(names)
    for name in registry:
        preset = registry[name]
        assert build(type(preset), to_data(preset)) == preset


def test_the_main_job_preset_is_the_documented_schedule():
    s = FAMILY["plrd"]
    assert [st.budget_fraction for st in s.stages] == [0.9, 0.75, 0.6, 0.5, 0.4]
    assert {st.heal_tokens for st in s.stages} == {8 * 4 * 256} and s.progressive
    assert (s.decomposition, s.allocation, s.heal.kd_weight, s.heal.lr) == ("whitened", "uniform", 0.5, 2e-4)
    assert isinstance(s.stages, tuple) and isinstance(s.stages[0], Stage) and s.matrices == ("attn", "mlp")
    assert SHEARED["sheared-smollm2"].members[0].target.num_layers == 28
    assert PRETRAIN["llama-60m"].hidden_size == 512 and PRETRAIN["llama-350m"].only_lr_act


def test_user_files_in_toml_and_json_give_the_same_schedule(tmp_path):
    (tmp_path / "s.toml").write_text('stages = [{name = "a", rank = 8, heal_tokens = 1024}]\nbatch_size = 2\n'
                                     '[heal]\nlr = 1e-3\nkd_weight = 1\n')
    (tmp_path / "s.json").write_text(json.dumps({"stages": [{"name": "a", "rank": 8, "heal_tokens": 1024}],
                                                 "batch_size": 2, "heal": {"lr": 0.001, "kd_weight": 1}}))
    a, b = build(Schedule, load_config(tmp_path / "s.toml")), build(Schedule, load_config(tmp_path / "s.json"))
    assert a == b and a.stages == (Stage("a", rank=8, heal_tokens=1024),) and a.heal.kd_weight == 1.0
    assert isinstance(a.heal.kd_weight, float)


def test_bad_files_and_names_are_one_line_errors_naming_the_thing(tmp_path):
    (tmp_path / "typo.toml").write_text('stages = []\nbatch_sise = 2\n')
    with pytest.raises(ConfigFileError, match="unknown field.*batch_sise"):
        build(Schedule, load_config(tmp_path / "typo.toml"))
    (tmp_path / "broken.toml").write_text('stages = [\n')
    with pytest.raises(ConfigFileError, match="broken.toml is not valid toml"):
        load_config(tmp_path / "broken.toml")
    (tmp_path / "latin1.toml").write_bytes("name = 'caf\xe9'".encode("latin-1"))
    with pytest.raises(ConfigFileError, match="latin1.toml"):
        load_config(tmp_path / "latin1.toml")
    with pytest.raises(ConfigFileError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigFileError, match="unknown family preset 'plrdd'; expected one of .*plrd"):
        load_preset("family", "plrdd")
    assert "plrdd" not in FAMILY and "plrd" in preset_names("family")


def test_cli_config_file_is_the_preset_format_and_flags_override(tmp_path, capsys):
    import shutil

    from plrd_jax.cli import build_parser, main
    from plrd_jax.cli.family import family_schedule
    from plrd_jax.configs import HERE

    shutil.copy(HERE / "family" / "plrd.toml", tmp_path / "mine.toml")
    parser = build_parser()
    from_file = family_schedule(parser.parse_args(["family", "--out", "x", "--config", str(tmp_path / "mine.toml")]))
    from_preset = family_schedule(parser.parse_args(["family", "--out", "x", "--preset", "plrd"]))
    assert from_file == from_preset == FAMILY["plrd"]
    overridden = family_schedule(parser.parse_args(["family", "--out", "x", "--config", str(tmp_path / "mine.toml"),
                                                    "--lr", "1e-3", "--heal-tokens", "2048"]))
    assert overridden.heal.lr == 1e-3 and {s.heal_tokens for s in overridden.stages} == {2048}
    (tmp_path / "bad.toml").write_text("stages = [{name = 'a', rank = 4}]\nheal = {lr = 'fast'}\n[heal]\n")
    assert main(["family", "--out", str(tmp_path / "out"), "--config", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.toml" in err[0] and not (tmp_path / "out").exists()
