import jax
import numpy as np
import pytest

from plrd_jax.nn.config import LinearSpec, ModelConfig
from plrd_jax.nn.model import init_params
from plrd_jax.io.store import FamilyStore, StoreError, load_member

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, tie_embeddings=True)


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def meta(member, step, final, config=TINY):
    return {"member": member, "name": f"m{member}", "step": step, "final": final, "config": config.to_dict()}


def test_final_members_survive_restarts_and_periodic_ones_rotate(tmp_path):
    params = init_params(TINY)
    store = FamilyStore(tmp_path / "fam", keep_latest=2)
    for step in range(6):  # members 0 and 1, three steps each, the last one final
        store.save(step, params, meta(step // 3, step, step % 3 == 2))
    store.close()
    store = FamilyStore(tmp_path / "fam", keep_latest=2)  # a new process must not forget the finals
    for step in (6, 7, 8):
        store.save(step, params, meta(2, step, False))
    assert store.steps() == [2, 5, 7, 8]
    assert [m["member"] for m in store.members()] == [0, 1]


def test_member_loads_by_index_and_name_with_its_parameterization(tmp_path):
    lowrank = TINY.with_linears({"layers_1/mlp/up": LinearSpec("lowrank", rank=4)})
    params = init_params(lowrank, seed=3)
    store = FamilyStore(tmp_path / "fam")
    store.save(0, params, meta(0, 0, True, lowrank))
    store.close()
    for ref in ("0", "m0"):
        config, restored, info = load_member(f"{tmp_path / 'fam'}:{ref}")
        assert config == lowrank and info["member"] == 0
        assert same(restored, params)
        assert restored["layers_1"]["mlp"]["up"]["A"].shape == (32, 4)


def test_unknown_member_and_missing_directory_fail_clearly(tmp_path):
    store = FamilyStore(tmp_path / "fam")
    store.save(0, init_params(TINY), meta(0, 0, True))
    store.close()
    with pytest.raises(StoreError, match="no member '5'.*0 \\(m0\\)"):
        load_member(f"{tmp_path / 'fam'}:5")
    with pytest.raises(StoreError, match="does not exist"):
        FamilyStore(tmp_path / "nope", read_only=True)


def test_load_model_reads_a_member_with_the_family_tokenizer(tmp_path):
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    from plrd_jax.io.load import load_model
    from plrd_jax.io.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({f"w{i}": i for i in range(10)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    store = FamilyStore(tmp_path / "fam")
    params = init_params(TINY)
    store.save(7, params, meta(0, 7, True))
    store.close()
    Tokenizer(backend, None, None).save(tmp_path / "fam" / "tokenizer")
    config, restored, tokenizer = load_model(f"{tmp_path / 'fam'}:m0", dtype="bfloat16")
    assert config.param_dtype == "bfloat16" and restored["embed"]["embedding"].dtype == "bfloat16"
    assert tokenizer.encode("w3 w5") == [3, 5]
