"""A tiny Sheared run used by tests/test_sheared.py (in a subprocess, so that it can be killed with SIGKILL).

    python tests/shear_run.py OUT_DIR [--plrd] [KILL_PHASE KILL_STEP]
With --plrd a one-stage PLRD family goes into OUT_DIR first (so that both methods share the store). Then one
Sheared member: pruning 6 steps, continued training 5, checkpoints every 2. Writes OUT_DIR/result.npz with the member's
params and OUT_DIR/weights.json with its domain-weight history when it finishes.
"""
import json
import os
import signal
import sys

import jax
import numpy as np

import plrd_jax.data.dynamic_loading as dl
import plrd_jax.nn.masks as M
from plrd_jax.nn.config import ModelConfig
from plrd_jax.data.windows import TokenDataset
from plrd_jax.methods.plrd import Schedule, Stage, run_family
from plrd_jax.nn.model import init_params
from plrd_jax.methods.sheared import L0Config, ShearMember, ShearSchedule, run_shear
from plrd_jax.io.store import FamilyStore, load_member
from plrd_jax.training.optim import HealConfig

CONFIG = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=3,
                     head_dim=8, max_seq_len=64, tie_embeddings=True)
PLRD = Schedule((Stage("plrd-a", rank_fraction=0.5, heal_tokens=2 * 4 * 16),), batch_size=4, seq_len=16,
                heal=HealConfig(lr=3e-3, warmup_steps=1, total_steps=1))
SHEAR = ShearSchedule(
    (ShearMember("sheared-a", M.TargetShape(1, 40, 4, 64, 2), prune_tokens=6 * 4 * 16, continue_tokens=5 * 4 * 16),),
    dl.Domains(("periodic", "noise"), (0.5, 0.5), update_every=2), batch_size=4, seq_len=16,
    prune=HealConfig(lr=3e-3, warmup_steps=0, total_steps=1), heal=HealConfig(lr=3e-3, warmup_steps=0, total_steps=1),
    l0=L0Config(), continue_update_every=2, validation_windows=2)


def tiny_domains(seed=0):
    rng = np.random.default_rng(seed)
    periodic = (np.arange(3000) * 7 + rng.integers(0, 3, 3000)) % CONFIG.vocab_size
    noise = rng.integers(0, CONFIG.vocab_size, 3000)
    evals = ((np.arange(512) * 7 + rng.integers(0, 3, 512)) % CONFIG.vocab_size).reshape(16, 32)
    return ({"periodic": periodic[:1600].reshape(100, 16).astype(np.int32),
             "noise": noise[:1600].reshape(100, 16).astype(np.int32)}, evals.astype(np.int32))


def main(out, *args):
    plrd = "--plrd" in args
    kill_phase, kill_step = ([a for a in args if a != "--plrd"] + [None, None])[:2]
    domains, evals = tiny_domains()

    def on_event(kind, info):
        if kind == "step" and info.get("phase") == kill_phase and info["step"] == int(kill_step):
            os.kill(os.getpid(), signal.SIGKILL)

    store = FamilyStore(out)
    parent = init_params(CONFIG, seed=0)
    heal = TokenDataset(domains["periodic"], {"source": "periodic"})
    if plrd:
        run_family("tiny", CONFIG, parent, PLRD, heal, evals, store)
    results = run_shear("tiny", CONFIG, parent, SHEAR, domains, evals, store, save_every=2, on_event=on_event)
    store.close()
    _, params, meta = load_member(f"{out}:{results[0].member}")
    leaves = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(out, "result.npz"), **leaves)
    with open(os.path.join(out, "weights.json"), "w") as f:
        json.dump(meta["result"]["domain_weights"], f)


if __name__ == "__main__":
    main(*sys.argv[1:])
