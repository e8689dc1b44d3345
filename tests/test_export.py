"""`export`: factorized members as Hugging Face directories that transformers loads with trust_remote_code, dense
ones as plain LLaMA directories or GGUF files, each checked against transformers' torch models (float32, CPU)."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from plrd_jax import cli
from plrd_jax.io.export import break_even_rank, densify_params, densify_paths, export_model
from plrd_jax.io.hf import load_hf
from plrd_jax.io.load import load_model
from plrd_jax.nn.config import ConfigError, ModelConfig
from plrd_jax.nn.linears import factorized_spec
from plrd_jax.nn.model import Decoder, init_params
from plrd_jax.transforms.factorize import factorize

ROOT = Path(__file__).resolve().parents[1]
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 24))
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
             max_seq_len=64)


def member(tie=True, ranks=None, seed=0, rank=8, **kw):
    """A tiny factorized member: random parent with norms away from 1, every matrix at `rank` (or `ranks`)."""
    config = ModelConfig(**{**SHAPE, **kw}, tie_embeddings=tie)
    params = init_params(config, seed=seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * (1 + 0.5 * np.sin(np.arange(x.size))) if "scale" in str(path[-1]) else x, params)
    ranks = ranks if ranks is not None else {path: rank for path in config.matrix_paths()}
    return factorize(params, ranks, config)


def ours(config, params, tokens=TOKENS):
    return np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(tokens)), np.float32)


def theirs(directory, tokens=TOKENS, **kw):
    model = AutoModelForCausalLM.from_pretrained(directory, **{"dtype": torch.float32, **kw}).eval()
    with torch.no_grad():
        return model, model(torch.tensor(tokens)).logits.float().numpy()


def rel_error(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def same_tree(a, b):
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(flat_a, flat_b))


# ---- factorized HF directories ---------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_lowrank_member_loads_in_transformers_with_equal_logits(tmp_path, tie):
    params, config = member(tie=tie)
    summary = export_model(params, config, tmp_path / "out")
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["README.md", "config.json", "generation_config.json", "model.safetensors", "modeling_plrd.py"]
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["model_type"] == "plrd_llama" and hf["auto_map"]["AutoModelForCausalLM"].startswith("modeling_plrd.")
    assert hf["plrd_linears"]["model.layers.1.self_attn.k_proj"] == {"kind": "lowrank", "rank": 8}
    assert ("lm_head" in hf["plrd_linears"]) == (not tie) and summary["factorized"] == len(config.linears)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.A.weight"].shape == (8, 64)
    assert tensors["model.layers.0.mlp.up_proj.B.weight"].shape == (96, 8)
    assert not any(name.endswith("up_proj.weight") for name in tensors)
    model, logits = theirs(tmp_path / "out", trust_remote_code=True)
    assert type(model).__name__ == "PlrdLlamaForCausalLM"
    assert rel_error(logits, ours(config, params)) <= 1e-4
    generated = model.generate(torch.tensor(TOKENS[:1, :5]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 11)
    # greedy decoding with the KV cache picks what full forwards of the same prefixes pick (eos barred by min_new)
    with torch.no_grad():
        full = model(generated[:, :-1]).logits[0, 4:]
    full[:, config.eos_token_id] = -torch.inf
    assert full.argmax(-1).tolist() == generated[0, 5:].tolist()


def test_save_pretrained_round_trips_and_load_model_reads_the_export_unchanged(tmp_path):
    params, config = member(tie=False)
    export_model(params, config, tmp_path / "out")
    model, _ = theirs(tmp_path / "out", trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    first, again = (load_file(tmp_path / d / "model.safetensors") for d in ("out", "again"))
    assert sorted(first) == sorted(again) and all(np.array_equal(first[k], again[k]) for k in first)
    assert (tmp_path / "again" / "modeling_plrd.py").read_text() == (tmp_path / "out" / "modeling_plrd.py").read_text()
    written, saved = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("out", "again"))
    legacy = ("rope_theta", "torch_dtype")  # transformers 4.x spellings of rope_parameters and dtype
    assert {k: v for k, v in written.items() if k not in legacy} == {k: saved[k] for k in written if k not in legacy}
    for directory in ("out", "again"):
        loaded, restored = load_hf(tmp_path / directory)
        assert loaded == config.replace(head_dim=16)
        assert same_tree(restored, params)
    _, restored, _ = load_model(tmp_path / "out")
    assert rel_error(ours(loaded, restored), ours(config, params)) == 0


def test_weight_bytes_are_the_parameter_count_times_the_dtype_size(tmp_path):
    params, config = member(vocab_size=512, hidden_size=256, intermediate_size=512, rank=32)
    count = sum(x.size for x in jax.tree.leaves(params))
    for dtype, size in (("float32", 4), ("bfloat16", 2), ("float16", 2)):
        summary = export_model(params, config, tmp_path / dtype, dtype=dtype)
        on_disk = (tmp_path / dtype / "model.safetensors").stat().st_size
        assert summary["params"] == count and summary["weight_bytes"] == on_disk
        assert count * size <= on_disk <= 1.02 * count * size, (dtype, on_disk, count * size)
        assert json.loads((tmp_path / dtype / "config.json").read_text())["dtype"] == dtype


def test_bfloat16_export_matches_a_bfloat16_rounding_of_the_member(tmp_path):
    params, config = member(tie=False)
    export_model(params, config, tmp_path / "out", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert model.dtype == torch.bfloat16
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    with torch.no_grad():
        logits = model.float()(torch.tensor(TOKENS)).logits.numpy()
    assert rel_error(logits, ours(config, rounded)) <= 1e-4  # the same weights; only the rounding differs
    assert rel_error(logits, ours(config, params)) <= 3e-2  # measured 6e-3: bfloat16 weights alone


def test_sparse_plus_low_rank_member(tmp_path):
    config = ModelConfig(**SHAPE, tie_embeddings=True)
    specs = {p: factorized_spec("sltrain", *config.matrix_shape(p), 8, density=0.05, alpha=16.0, path=p)
             for p in config.matrix_paths() if p.endswith(("/q", "/v", "/up", "/down"))}
    config = config.with_linears(specs)
    params = init_params(config, seed=1)  # B starts at zero: give the low-rank part some weight
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(jax.random.key(3), x.shape) * 0.05 if path[-1].key == "B" else x, params)
    export_model(params, config, tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    spec = hf["plrd_linears"]["model.layers.0.mlp.up_proj"]
    assert spec == {"kind": "sltrain", "rank": 8, "nnz": int(0.05 * 64 * 96), "alpha": 16.0}
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.sparse_indices"].dtype == np.int32
    _, logits = theirs(tmp_path / "out", trust_remote_code=True)
    assert rel_error(logits, ours(config, params)) <= 1e-4
    loaded, restored = load_hf(tmp_path / "out")
    assert loaded.linears == config.linears and same_tree(restored, params)
    export_model(params, config, tmp_path / "dense", densify="all")  # (α/r) A B + S multiplied out
    _, logits = theirs(tmp_path / "dense")
    assert rel_error(logits, ours(config, params)) <= 1e-4


def test_a_tampered_config_json_is_refused_by_name(tmp_path):
    from plrd_jax.io.hf import CheckpointError

    params, config = member()
    export_model(params, config, tmp_path / "out")
    file = tmp_path / "out" / "config.json"
    good = json.loads(file.read_text())
    for module, spec, message in [
            ("model.layers.0.mlp.up_proj", {"kind": "lowrank", "rank": 9},
             r"model\.layers\.0\.mlp\.up_proj\.A\.weight has shape \(8, 64\); the config implies \(9, 64\)"),
            ("model.embed_tokens", {"kind": "lowrank", "rank": 8}, "entry 'model.embed_tokens'"),
            ("model.layers.5.mlp.up_proj", {"kind": "lowrank", "rank": 8}, "unknown matrix 'layers_5/mlp/up'"),
            ("model.layers.0.mlp.up_proj", {"kind": "cola", "rank": 8}, "not a lowrank or sltrain spec")]:
        file.write_text(json.dumps({**good, "plrd_linears": {**good["plrd_linears"], module: spec}}))
        with pytest.raises(CheckpointError, match=message):
            load_hf(tmp_path / "out")


# ---- densify -----------------------------------------------------------------------------------------
def test_densify_auto_writes_dense_exactly_the_matrices_at_or_above_break_even(tmp_path):
    config = ModelConfig(**SHAPE)
    be = {p: break_even_rank(*config.matrix_shape(p)) for p in config.matrix_paths()}
    assert be["layers_0/attn/q"] == 32 and round(be["layers_0/mlp/up"], 2) == 38.4
    ranks = {"layers_0/attn/q": 32, "layers_0/attn/k": 21, "layers_0/mlp/up": 38, "layers_1/mlp/down": 39}
    params, config = member(tie=False, ranks=ranks)
    assert densify_paths(config, "auto") == ["layers_0/attn/q", "layers_1/mlp/down"]
    summary = export_model(params, config, tmp_path / "auto")
    hf = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert sorted(hf["plrd_linears"]) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.k_proj"]
    assert summary["densified"] == ["layers_0/attn/q", "layers_1/mlp/down"]
    _, logits = theirs(tmp_path / "auto", trust_remote_code=True)
    assert rel_error(logits, ours(config, params)) <= 1e-4
    export_model(params, config, tmp_path / "none", densify="none")
    assert len(json.loads((tmp_path / "none" / "config.json").read_text())["plrd_linears"]) == 4


def test_densify_all_is_a_plain_llama_directory(tmp_path):
    params, config = member(tie=True)
    export_model(params, config, tmp_path / "out", densify="all")
    assert "modeling_plrd.py" not in os.listdir(tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["model_type"] == "llama" and "auto_map" not in hf and "plrd_linears" not in hf
    model, logits = theirs(tmp_path / "out")  # no trust_remote_code needed
    assert type(model).__name__ == "LlamaForCausalLM"
    assert rel_error(logits, ours(config, params)) <= 1e-4


# ---- GGUF ------------------------------------------------------------------------------------------
# Largest |Δlogit| / logit scale between the GGUF and the float32 member (measured on these tiny random
# members, whose logits are small: F16 ≈ 8e-4, BF16 ≈ 6e-3, Q8_0 ≈ 2–5e-2); float32 holds the densified weights
# bit for bit, and our reader and transformers' agree to 1e-4 at every type (they dequantize alike).
GGUF_TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2, "q8_0": 1e-1}


@pytest.mark.parametrize("dtype,tie", [(dtype, True) for dtype in GGUF_TOLERANCE] + [("float32", False),
                                                                                       ("q8_0", False)])
def test_gguf_reads_back_in_plrd_jax_and_transformers(tmp_path, dtype, tie):
    params, config = member(tie=tie)
    export_model(params, config, tmp_path / "out", format="gguf", dtype=dtype, densify="all")
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "model.gguf"]
    reference = ours(config, params)
    loaded, restored, _ = load_model(tmp_path / "out" / "model.gguf")
    assert loaded.tie_embeddings == tie and not loaded.linears
    from_dir, _, _ = load_model(tmp_path / "out")  # the export directory itself opens too
    assert from_dir == loaded
    back = ours(loaded, restored)
    _, logits = theirs(tmp_path / "out", gguf_file="model.gguf")
    assert rel_error(back, reference) <= GGUF_TOLERANCE[dtype]
    assert rel_error(logits, back) <= 1e-4
    if dtype == "float32":  # exactly the densified member's weights
        dense, _ = densify_params(params, config, densify_paths(config, "all"))
        assert same_tree(restored, jax.tree.map(lambda x: np.asarray(x, np.float32), dense))


def test_gguf_carries_the_tokenizer(tmp_path):
    from test_cli import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    params, config = member(vocab_size=320)
    export_model(params, config, tmp_path / "out", format="gguf", densify="all", tokenizer=tokenizer)
    _, _, back = load_model(tmp_path / "out" / "model.gguf")
    text = "the cat sat on the mat while 42 dogs slept"
    assert back.encode(text) == tokenizer.encode(text) and back.decode(tokenizer.encode(text)) == text
    assert (back.bos_token_id, back.eos_token_id, back.vocab_size) == (1, 0, 320)


def test_factorized_member_as_gguf_and_q8_0_as_hf_are_refused_before_writing(tmp_path):
    params, config = member()
    with pytest.raises(ConfigError, match=r"stay factorized .* pass --densify all, or export HF"):
        export_model(params, config, tmp_path / "out", format="gguf")
    with pytest.raises(ConfigError, match="q8_0 is a GGUF tensor type"):
        export_model(params, config, tmp_path / "out", dtype="q8_0")
    assert os.listdir(tmp_path) == []


# ---- the command line, the model card, bad input ------------------------------------------------------
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A family directory with one stored factorized member (and its metadata) and the family tokenizer."""
    from plrd_jax.io.store import FamilyStore
    from test_cli import tiny_tokenizer

    root = tmp_path_factory.mktemp("family")
    params, config = member(vocab_size=320, tie=True)
    meta = {"member": 0, "name": "plrd-50%", "method": "plrd", "parent": "tiny-parent", "step": 3, "final": True,
            "config": config.to_dict(), "params": sum(x.size for x in jax.tree.leaves(params)), "compression": 0.5,
            "tokens": 4096, "data": {"heal": {"source": "wikitext2-heal=1,books-heal=1"}},
            "ppl_after": {"wikitext2-eval": 30.0, "pydoc": 12.5}, "parent_ppl": {"wikitext2-eval": 20.0}}
    store = FamilyStore(root / "fam")
    store.save(3, params, meta)
    store.close()
    tiny_tokenizer().save(root / "fam" / "tokenizer")
    return root / "fam", params, config


def one_line_error(capsys, *names):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(str(n) in err[0] for n in names), err[0]
    return err[0]


def test_cli_exports_a_family_member_with_its_model_card(family, tmp_path, capsys):
    fam, params, config = family
    out = tmp_path / "m0"
    assert cli.main(["export", "--model", f"{fam}:0", "--out", str(out), "--dtype", "float32"]) == 0
    assert "factorized HF" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    for text in ("# plrd-50%", "| parent | tiny-parent |", "| method | plrd |", "50.0 % of the parent",
                 "4,096 tokens of wikitext2-heal=1,books-heal=1", "| wikitext2-eval | 30.00 | 20.00 | 1.50× |",
                 "| pydoc | 12.50 | – | – |", "| gate | 64 × 96 | 2 of 2 | 8–8 (8) | 38 | 0 |",
                 "trust_remote_code=True", f"python -m plrd_jax export --model {fam}:0 --out {out}"):
        assert text in card, text
    loaded, restored, tokenizer = load_model(out)
    assert loaded.linears == config.linears and same_tree(restored, params) and tokenizer.vocab_size == 300
    text = "the dog sat by the door"
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    _, logits = theirs(out, tokens=TOKENS, trust_remote_code=True)
    assert rel_error(logits, ours(config, params)) <= 1e-4


def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(family, tmp_path, capsys):
    fam, _, _ = family
    assert cli.main(["export", "--model", f"{fam}:7", "--out", str(tmp_path / "a")]) == 2
    assert "no member '7'" in one_line_error(capsys, fam)
    assert cli.main(["export", "--model", f"{fam}:0", "--out", str(tmp_path / "a"), "--format", "gguf"]) == 2
    assert "--densify all" in one_line_error(capsys)
    assert cli.main(["export", "--model", f"{fam}:0", "--out", str(tmp_path / "a"), "--dtype", "q8_0"]) == 2
    one_line_error(capsys, "q8_0")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert cli.main(["export", "--model", f"{fam}:0", "--out", str(busy)]) == 2
    assert "not empty" in one_line_error(capsys, busy, "--force")
    assert cli.main(["export", "--model", f"{fam}:0", "--out", str(busy), "--force"]) == 2
    assert "holds no exported model" in one_line_error(capsys, busy)
    assert sorted(os.listdir(tmp_path)) == ["busy"] and os.listdir(busy) == ["notes.txt"]
    assert cli.main(["export", "--model", f"{fam}:0", "--out", str(tmp_path / "gguf"), "--format", "gguf",
                     "--densify", "all", "--dtype", "q8_0"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--model", f"{fam}:0", "--out", str(tmp_path / "gguf"), "--force"]) == 0
    assert "model.gguf" not in os.listdir(tmp_path / "gguf")  # replaced whole
    assert sorted(os.listdir(tmp_path)) == ["busy", "gguf"]


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_disk_that_fills_midway_leaves_no_directory(family, tmp_path, fmt):
    fam, params, config = family
    source = tmp_path / "source"  # an HF export as the source: quicker to load in a fresh process
    export_model(params, config, source)
    size = (source / "model.safetensors").stat().st_size

    env = {**os.environ, "PLRD_COMPILATION_CACHE": "off", "PYTHONDONTWRITEBYTECODE": "1", "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "plrd_jax", "export", "--model", str(source), "--out", str(tmp_path / "out"),
            "--format", fmt, "--densify", "all" if fmt == "gguf" else "auto"]
    # files capped at a third of the weights (ulimit -f, in KiB); SIGXFSZ ignored, so a write past the cap fails
    # (EFBIG) the way it does on a full disk
    script = f"ulimit -f {size // 3 // 1024}; trap '' XFSZ; exec {shlex.join(argv)}"
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith(f"error: writing {tmp_path / 'out'} failed ("), \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "nothing was written" in lines[-1]
    assert sorted(os.listdir(tmp_path)) == ["source"]


def test_a_stacked_member_exports_the_same_files(tmp_path):
    """A member in the stacked layout (layers scanned) exports what its per-layer twin exports, and transformers
    computes its logits."""
    from plrd_jax.nn.layout import arrange_layers

    params, config = member()
    scanned_config, stacked = arrange_layers(config, params, scan=True)
    assert "layers" in stacked
    export_model(stacked, scanned_config, tmp_path / "stacked")
    export_model(params, config, tmp_path / "per-layer")
    a = load_file(tmp_path / "stacked" / "model.safetensors")
    b = load_file(tmp_path / "per-layer" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "stacked" / "config.json").read_text()) == json.loads(
        (tmp_path / "per-layer" / "config.json").read_text())
    _, logits = theirs(tmp_path / "stacked", trust_remote_code=True)
    assert rel_error(logits, ours(scanned_config, stacked)) <= 1e-4
