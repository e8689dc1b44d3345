"""HF safetensors in and out, checked against transformers' own torch models (float32)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
    Qwen2ForCausalLM

from plrd_jax.nn.config import LinearSpec
from plrd_jax.io.hf import CheckpointError, load_hf, save_hf
from plrd_jax.io.load import load_model
from plrd_jax.io.tokenizer import Tokenizer
from plrd_jax.nn.model import Decoder

TOKENS = np.array([[3, 17, 42, 5, 63, 0, 9, 31, 12, 50, 7, 2]])
SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64)


def hf_llama(seed=0, **kw):
    torch.manual_seed(seed)
    config = LlamaConfig(**{**SHAPE, "num_attention_heads": 4, "num_key_value_heads": 2, **kw})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that a swapped norm shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def our_logits(config, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(tokens)))


def assert_close_logits(ours, ref, rel=1e-4):
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= rel * scale, (np.abs(ours - ref).max(), scale)


LLAMA_CASES = {
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0),
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0),
    "mqa-tied-headdim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                             rope_theta=100.0),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_logits_match_transformers(tmp_path, case):
    model = hf_llama(**LLAMA_CASES[case])
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path)
    kw = LLAMA_CASES[case]
    assert (config.num_kv_heads, config.tie_embeddings, config.rope_theta) == (
        kw["num_key_value_heads"], kw["tie_word_embeddings"], kw["rope_theta"])
    assert ("lm_head" in params) == (not config.tie_embeddings)
    assert_close_logits(our_logits(config, params), hf_logits(model))


def test_long_sequence_logits_match_transformers(tmp_path):
    """256 tokens: attention skips the fully masked key blocks of 4 query blocks (model.causal_blocks)."""
    model = hf_llama(**LLAMA_CASES["gqa-untied"], max_position_embeddings=256)
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 256))
    assert_close_logits(our_logits(config, params, tokens), hf_logits(model, tokens))


def test_sharded_checkpoint(tmp_path):
    model = hf_llama(**LLAMA_CASES["gqa-untied"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    config, params = load_hf(tmp_path)
    assert_close_logits(our_logits(config, params), hf_logits(model))


def test_qwen2_logits_match_transformers(tmp_path):
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False, rope_theta=1e6)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path)
    assert config.qkv_bias and "bias" in params["layers_1"]["attn"]["k"]
    assert_close_logits(our_logits(config, params), hf_logits(model))


def test_bfloat16_dtype(tmp_path):
    hf_llama().save_pretrained(tmp_path)
    config, params = load_hf(tmp_path, dtype="bfloat16")
    assert config.param_dtype == config.dtype == "bfloat16"
    assert params["layers_0"]["mlp"]["up"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("case", ["gqa-untied", "mha-tied"])
def test_round_trip_through_transformers(tmp_path, case):
    model = hf_llama(**LLAMA_CASES[case])
    model.save_pretrained(tmp_path / "in")
    config, params = load_hf(tmp_path / "in")
    save_hf(params, config, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert_close_logits(hf_logits(reloaded), hf_logits(model))


def test_qwen2_export_loads_as_qwen2(tmp_path):
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_attention_heads=4, num_key_value_heads=2)).eval()
    model.save_pretrained(tmp_path / "in")
    config, params = load_hf(tmp_path / "in")
    save_hf(params, config, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    assert_close_logits(hf_logits(reloaded), hf_logits(model))


def test_lowrank_export_is_the_product(tmp_path):
    """A lowrank q and down export as K = A B: transformers' logits equal our factorized model's."""
    hf_llama(**LLAMA_CASES["gqa-untied"]).save_pretrained(tmp_path / "in")
    config, params = load_hf(tmp_path / "in")
    rng = np.random.default_rng(0)
    specs = {}
    for path in ("layers_0/attn/q", "layers_1/mlp/down"):
        d_in, d_out = config.matrix_shape(path)
        layer, block, name = path.split("/")
        params[layer][block][name] = {"A": jnp.asarray(rng.normal(0, 0.3, (d_in, 4)), jnp.float32),
                                      "B": jnp.asarray(rng.normal(0, 0.3, (4, d_out)), jnp.float32)}
        specs[path] = LinearSpec("lowrank", rank=4)
    config = config.with_linears(specs)
    save_hf(params, config, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert_close_logits(hf_logits(reloaded), our_logits(config, params))


def test_cola_cannot_be_exported(tmp_path):
    hf_llama().save_pretrained(tmp_path / "in")
    config, params = load_hf(tmp_path / "in")
    config = config.with_linears({"layers_1/mlp/up": LinearSpec("cola", rank=4)})
    with pytest.raises(CheckpointError, match="layers_1/mlp/up is a cola linear; only dense and lowrank"):
        save_hf(params, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def small_tokenizer(full_byte_alphabet=False) -> Tokenizer:
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_byte_alphabet else []
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<eos>", "<bos>"], initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator(["the cat sat on the mat, the dog sat on the log"] * 20, trainer)
    return Tokenizer(backend, bos_token_id=1, eos_token_id=0)


def test_export_with_tokenizer_loads_in_transformers(tmp_path):
    hf_llama().save_pretrained(tmp_path / "in")
    config, params = load_hf(tmp_path / "in")
    tokenizer = small_tokenizer()
    save_hf(params, config, tmp_path / "out", tokenizer=tokenizer)
    text = "the cat sat on the log"
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert theirs.bos_token_id == 1 and theirs.eos_token_id == 0
    _, _, ours = load_model(tmp_path / "out")
    assert ours.encode(text, add_bos=True) == [1, *tokenizer.encode(text)] and ours.eos_token_id == 0


def test_save_is_atomic(tmp_path):
    hf_llama().save_pretrained(tmp_path / "in")
    config, params = load_hf(tmp_path / "in")

    class Failing:
        def save(self, out_dir):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_hf(params, config, tmp_path / "out", tokenizer=Failing())
    assert sorted(os.listdir(tmp_path)) == ["in"]
    save_hf(params, config, tmp_path / "out")
    with pytest.raises(CheckpointError, match="already exists"):
        save_hf(params, config, tmp_path / "out")
    save_hf(params, config, tmp_path / "out", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


# ---- errors ----------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    hf_llama(**LLAMA_CASES["gqa-untied"]).save_pretrained(tmp_path / "m", max_shard_size="20KB")
    return tmp_path / "m"


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no Hugging Face checkpoint directory"):
        load_hf(tmp_path / "nothing")


def test_missing_config_and_weights(tmp_path, saved):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf(tmp_path / "empty")


def test_missing_shard(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} listed in .* is missing"):
        load_hf(saved)


def test_shape_mismatch_names_the_tensor(saved):
    edit_config(saved, intermediate_size=40)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape "
                                              r"\((48, 32|32, 48)\); the config implies \((40, 32|32, 40)\)"):
        load_hf(saved)


def test_unsupported_rope_scaling(saved):
    edit_config(saved, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(CheckpointError, match="rope scaling type 'yarn' is not supported"):
        load_hf(saved)
    edit_config(saved, rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(CheckpointError, match="rope scaling type 'linear'"):
        load_hf(saved)


def test_unsupported_model_type(saved):
    edit_config(saved, model_type="gpt_neox")
    with pytest.raises(CheckpointError, match="model_type 'gpt_neox' is not supported"):
        load_hf(saved)


def test_tokenizer_larger_than_vocab(saved):
    small_tokenizer(full_byte_alphabet=True).save(saved)  # 258 tokens > the model's 64 embedding rows
    with pytest.raises(CheckpointError, match=r"tokenizer has \d+ tokens but the model's embedding has only 64"):
        load_model(saved)


def test_a_loaded_checkpoint_in_the_stacked_layout_matches_transformers(tmp_path):
    """HF in, stacked (layers scanned), logits equal to transformers'; saved from the stacked layout, the same
    weights come back."""
    from plrd_jax.nn.layout import arrange_layers

    model = hf_llama(**LLAMA_CASES["gqa-untied"])
    model.save_pretrained(tmp_path / "in")
    config, params = arrange_layers(*load_hf(tmp_path / "in"), scan=True)
    assert config.scan_layers and params["layers"]["attn"]["q"]["kernel"].shape == (2, 32, 32)
    assert_close_logits(our_logits(config, params), hf_logits(model))
    save_hf(params, config, tmp_path / "out")
    assert_close_logits(hf_logits(LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()), hf_logits(model))
