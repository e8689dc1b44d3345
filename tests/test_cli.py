"""The command line fails well: every user error is one line on stderr (`error: ...`, naming what is wrong),
raised before the model loads where it can be known up front, with nothing half-written; Ctrl-C is one line and
exit status 130; a rerun of a finished `compress --out` finds its member instead of storing it twice."""
import ast
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from plrd_jax import cli

ROOT = Path(__file__).resolve().parents[1]
CATS = "the cat sat on the mat while the dog slept by the door. " * 40
CODE = "def f(x):\n    return x * 2  # doubles its argument\n" * 20


def tiny_tokenizer():
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    from plrd_jax.io.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<bos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([CATS, CODE] * 5, trainer)
    return Tokenizer(backend, bos_token_id=1, eos_token_id=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny HF checkpoint with a tokenizer (context 64) and two small text files."""
    from plrd_jax.io.hf import save_hf
    from plrd_jax.nn.config import ModelConfig
    from plrd_jax.nn.model import init_params

    root = tmp_path_factory.mktemp("cli")
    config = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=64)
    save_hf(init_params(config, seed=0), config, root / "tiny", tokenizer=tiny_tokenizer())
    (root / "cats.txt").write_text(CATS)
    (root / "code.txt").write_text(CODE)
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command loads a model: the error must come before that."""
    import plrd_jax.io.load

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(plrd_jax.io.load, "load_model", refuse)


def one_line_error(capsys, *names) -> str:
    """stderr is exactly one line starting with `error: ` and naming every one of `names`; returns that line with
    the names (paths, which hold the test's name) taken out, for checks of what it says about them."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    line = lines[0]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
        line = line.replace(str(name), "<name>")
    return re.sub(r"\S*pytest-of-\S*", "<path>", line)


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def unwritable(path: Path, monkeypatch):
    """`path` (a directory) made unwritable: by its mode, or (as root, whom modes do not stop) by failing every
    temporary file created in it."""
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == path.resolve():
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# ---- 1. an empty (or truncated) model.safetensors -------------------------------------------------
@pytest.mark.parametrize("size", [0, 1000])
def test_empty_or_truncated_safetensors_names_the_file(files, tmp_path, capsys, size):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((files / "tiny" / name).read_bytes())
    (broken / "model.safetensors").write_bytes((files / "tiny" / "model.safetensors").read_bytes()[:size])
    assert cli.main(["info", str(broken)]) == 2
    line = one_line_error(capsys, broken / "model.safetensors")
    assert ("empty" if size == 0 else "truncated") in line


# ---- 2. --seq-len 0 ----------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--seq-len", "0"), ("--max-tokens", "-5"), ("--batch-size", "x")])
def test_non_positive_ints_are_refused_when_parsing(files, capsys, no_model, flag, value):
    argv = ["eval", "--model", str(files / "tiny"), "--data", str(files / "cats.txt"), "--seq-len", "16",
            "--max-tokens", "512", flag, value]
    assert cli.main(argv) == 2
    line = one_line_error(capsys, flag)
    assert "integer" in line and "--help" in line


# ---- 3. export into an unwritable place ---------------------------------------------------------------
def test_export_under_a_plain_file_or_into_an_unwritable_directory(files, tmp_path, capsys, monkeypatch, no_model):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert cli.main(["export", "--model", str(files / "tiny"), "--out", str(plain / "out")]) == 2
    assert "is a file" in one_line_error(capsys, plain)
    unwritable(tmp_path / "locked", monkeypatch)
    assert cli.main(["export", "--model", str(files / "tiny"), "--out", str(tmp_path / "locked" / "out")]) == 2
    assert "not writable" in one_line_error(capsys, tmp_path / "locked")
    assert listing(tmp_path) == ["locked", "plain.txt"] and plain.read_text() == "x"


# ---- 4. compress --out unwritable: found before the model loads ------------------------------------------
def test_compress_checks_its_output_before_loading_the_model(files, tmp_path, capsys, monkeypatch, no_model):
    unwritable(tmp_path / "locked", monkeypatch)
    common = ["compress", "--model", str(files / "tiny"), "--reduction", "0.3", "--decomposition", "svd",
              "--calibration-data", str(files / "cats.txt"), "--eval-data", str(files / "code.txt")]
    assert cli.main([*common, "--out", str(tmp_path / "locked" / "fam")]) == 2
    assert "not writable" in one_line_error(capsys, "--out", tmp_path / "locked")
    (tmp_path / "plain").write_text("x")
    assert cli.main([*common, "--out", str(tmp_path / "plain" / "fam")]) == 2
    one_line_error(capsys, "--out", tmp_path / "plain")
    assert listing(tmp_path) == ["locked", "plain"]


# ---- 5. config.json that is not JSON; a data file that is not UTF-8 --------------------------------------------
def test_config_json_that_is_not_json_names_the_file(files, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in (files / "tiny").iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "config.json").write_text("{oops")
    assert cli.main(["info", str(broken)]) == 2
    assert "not valid JSON" in one_line_error(capsys, broken / "config.json")


def test_data_file_that_is_not_utf8_names_the_file_before_the_model_loads(files, tmp_path, capsys, no_model):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    assert cli.main(["eval", "--model", str(files / "tiny"), "--data", str(latin), "--seq-len", "16"]) == 2
    assert "not UTF-8" in one_line_error(capsys, latin)


# ---- 6. a truncated GGUF -------------------------------------------------------------------------------
def write_small_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.embedding_length", 32)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    writer.add_tensor("output_norm.weight", np.ones((32,), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0.5, 0.99, 200])
def test_truncated_gguf_is_named_and_called_truncated(tmp_path, capsys, keep):
    whole = write_small_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:int(keep * len(whole)) if keep < 1 else keep])
    assert cli.main(["info", str(cut)]) == 2
    assert "truncated" in one_line_error(capsys, cut)


def test_truncated_embedded_parent_head(tmp_path, capsys):
    """The first kilobyte of the real parent (the 'index 0 is out of bounds' case)."""
    from plrd_jax.io.hf import CheckpointError
    from plrd_jax.io.load import embedded_path

    try:
        parent = embedded_path("smollm2-135m")
    except CheckpointError:
        pytest.skip("the embedded parent is not installed")
    with open(parent, "rb") as f:
        (tmp_path / "head.gguf").write_bytes(f.read(1000))
    assert cli.main(["info", str(tmp_path / "head.gguf")]) == 2
    assert "truncated" in one_line_error(capsys, tmp_path / "head.gguf")


# ---- 7. --reduction outside (0, 1) ------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1.5", "0", "1", "-0.2", "abc"])
def test_reduction_is_checked_when_parsing(capsys, no_model, value):
    assert cli.main(["compress", "--reduction", value]) == 2
    one_line_error(capsys, "--reduction", value)


# ---- 8. --max-tokens beyond the data --------------------------------------------------------------------
def test_max_tokens_beyond_the_data_scores_what_exists_and_says_how_much(files, capsys):
    assert cli.main(["eval", "--model", str(files / "tiny"), "--data", str(files / "code.txt"), "--seq-len", "16",
                     "--max-tokens", "100000"]) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"model {files / 'tiny'}  data {files / 'code.txt'}  window 16  ")
    scored = int(out[0].split("tokens scored ")[1].split()[0])
    notices = [line for line in captured.err.replace("\r", "\n").splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and f"scored {scored} tokens" in notices[0] and "--max-tokens 100000" in notices[0]
    assert "Traceback" not in captured.err


# ---- 9. export into an existing directory: --force ---------------------------------------------------------
def test_export_into_an_existing_directory_names_force(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", "--model", str(files / "tiny"), "--out", str(out)]) == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["export", "--model", str(files / "tiny"), "--out", str(out)]) == 2
    line = one_line_error(capsys, out, "--force")
    assert "overwrite=True" not in line
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert cli.main(["export", "--model", str(files / "tiny"), "--out", str(out), "--force"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out"] and (out / "config.json").is_file()
    notes = tmp_path / "notes"  # --force never replaces a directory that is no checkpoint
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["export", "--model", str(files / "tiny"), "--out", str(notes), "--force"]) == 2
    one_line_error(capsys, notes)
    assert (notes / "keep.txt").read_text() == "mine"


# ---- 10. Ctrl-C ---------------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_and_exit_status_130(files, tmp_path, capsys, monkeypatch):
    import plrd_jax.io.load

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plrd_jax.io.load, "load_model", interrupt)
    assert cli.main(["info", str(files / "tiny")]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert cli.main(["family", "--parent", str(files / "tiny"), "--out", str(tmp_path / "fam"), "--data",
                     str(files / "cats.txt"), "--eval-data", str(files / "code.txt")]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"


def test_sigint_in_a_real_process_leaves_no_traceback(files):
    """A real SIGINT to `python -m plrd_jax` while it works (here: while it 'loads' the model)."""
    code = ("import time, sys, plrd_jax.io.load as L\n"
            "def slow(*a, **k):\n    print('loading', flush=True); time.sleep(60)\n"
            "L.load_model = slow\n"
            "from plrd_jax.cli import main\n"
            f"sys.exit(main(['info', {str(files / 'tiny')!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == "loading"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


# ---- 11. compress --out: an interrupted save, and reruns -----------------------------------------------------------
def test_compress_rerun_finds_its_member_and_an_interrupted_save_is_cleaned_up(files, tmp_path, capsys, monkeypatch):
    from plrd_jax.io.store import FamilyStore

    fam = tmp_path / "fam"
    common = ["compress", "--model", str(files / "tiny"), "--decomposition", "svd", "--calibration-data",
              str(files / "cats.txt"), "--eval-data", str(files / "code.txt"), "--eval-seq-len", "16",
              "--calibration-seq-len", "16", "--eval-tokens", "64", "--out", str(fam)]
    assert cli.main([*common, "--reduction", "0.3"]) == 0
    save = FamilyStore.save

    def interrupted_save(self, step, *args, **kwargs):  # what Ctrl-C in the middle of Orbax's save leaves
        tmp = Path(self.directory) / f"{step}.orbax-checkpoint-tmp"
        (tmp / "params.orbax-checkpoint-tmp").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(FamilyStore, "save", interrupted_save)
    capsys.readouterr()
    assert cli.main([*common, "--reduction", "0.4"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert (fam / "1.orbax-checkpoint-tmp").is_dir()
    monkeypatch.setattr(FamilyStore, "save", save)
    assert cli.main([*common, "--reduction", "0.4"]) == 0  # the unfinished member is computed again
    assert not any(".orbax-checkpoint-tmp" in name for name in os.listdir(fam))
    assert "wrote member 1 (svd-uniform-40%)" in capsys.readouterr().out

    import plrd_jax.io.load

    loads = []
    real_load = plrd_jax.io.load.load_model
    monkeypatch.setattr(plrd_jax.io.load, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    for reduction, member in (("0.3", 0), ("0.4", 1)):  # the same commands again: found, nothing computed
        assert cli.main([*common, "--reduction", reduction]) == 0
        out = capsys.readouterr().out
        assert out.strip() == (f"member {member} (svd-uniform-{round(100 * float(reduction))}%) is already in {fam}, "
                               f"stored by this same command; load it as {fam}:{member}")
    assert loads == []
    store = FamilyStore(fam, read_only=True)
    assert [m["name"] for m in store.members()] == ["svd-uniform-30%", "svd-uniform-40%"]
    store.close()
    # another command that would store a second 'svd-uniform-30%': refused before any work
    assert cli.main([*common, "--reduction", "0.3", "--eval-tokens", "32"]) == 2
    one_line_error(capsys, fam, "svd-uniform-30%", "different command")
    assert loads == []
    config, params, tokenizer = real_load(f"{fam}:svd-uniform-40%")
    assert tokenizer is not None and config.max_seq_len == 64


def test_a_store_written_before_fingerprints_still_loads(files, tmp_path):
    """Members stored without a command fingerprint (earlier versions) load as before."""
    from plrd_jax.io.load import load_model
    from plrd_jax.io.store import FamilyStore

    config, params, _ = load_model(files / "tiny")
    store = FamilyStore(tmp_path / "old")
    store.save(0, params, {"member": 0, "name": "svd-uniform-30%", "method": "compress", "step": 0, "final": True,
                           "config": config.to_dict()})
    store.close()
    loaded, restored, _ = load_model(f"{tmp_path / 'old'}:svd-uniform-30%")
    assert loaded == config and np.array_equal(restored["embed"]["embedding"], params["embed"]["embedding"])


# ---- the module itself ----------------------------------------------------------------------------------
def test_python_dash_m_reports_parse_errors_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "plrd_jax", "eval", "--seq-len", "0", "--max-tokens", "512"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: argument --seq-len: 0 must be a positive integer (see python -m plrd_jax eval --help)"]


def test_cli_modules_stay_small():
    """One module per command; no function over 80 lines, no module over 400."""
    folder = ROOT / "plrd_jax" / "cli"
    for path in folder.glob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 400, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, f"{path.name}:{node.name}"
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert list(commands) == ["eval", "info", "generate", "export", "family", "compress", "shear", "pretrain", "plan",
                              "zeroshot", "tables"]


def test_the_command_line_restarts_once_with_malloc_keeping_freed_memory():
    """On the host CPU the CLI runs with KEEP_FREED_MEMORY (set once, read by glibc at start-up); a
    GLIBC_TUNABLES already set, even empty, is left alone."""
    import platform
    import subprocess
    import sys

    from plrd_jax.cli import KEEP_FREED_MEMORY

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    code = ("import os; from plrd_jax.cli import keep_freed_memory; keep_freed_memory(); "
            "print(repr(os.environ.get('GLIBC_TUNABLES')))")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == repr(KEEP_FREED_MEMORY), out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GLIBC_TUNABLES": ""}, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == repr("")
