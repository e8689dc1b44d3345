"""A tiny family run used by tests/test_plrd.py (in a subprocess, so that it can be killed with SIGKILL).

    python tests/family_run.py OUT_DIR [KILL_AT_MEMBER KILL_AT_STEP]
Writes OUT_DIR/result.npz with the last member's params when it finishes.
"""
import os
import signal
import sys

import jax
import numpy as np

from plrd_jax.nn.config import ModelConfig
from plrd_jax.data.windows import TokenDataset
from plrd_jax.methods.plrd import Schedule, Stage
from plrd_jax.methods.plrd import run_family
from plrd_jax.nn.model import init_params
from plrd_jax.io.store import FamilyStore
from plrd_jax.training.optim import HealConfig

CONFIG = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=64, tie_embeddings=True)
SCHEDULE = Schedule((Stage("a", rank_fraction=0.5, heal_tokens=6 * 4 * 16),
                     Stage("b", rank_fraction=0.25, heal_tokens=5 * 4 * 16)),
                    batch_size=4, seq_len=16, heal=HealConfig(lr=3e-3, warmup_steps=2, total_steps=2))


def tiny_data(seed=0):
    rng = np.random.default_rng(seed)
    # A learnable stream: a noisy periodic sequence.
    stream = (np.arange(4000) * 7 + rng.integers(0, 3, 4000)) % CONFIG.vocab_size
    heal = TokenDataset(stream[: 64 * 16].reshape(64, 16).astype(np.int32), {"source": "synthetic"})
    evals = stream[2000: 2000 + 8 * 32].reshape(8, 32).astype(np.int32)
    return heal, evals


def main(out, kill_member=None, kill_step=None):
    heal, evals = tiny_data()

    def on_event(kind, info):
        if kind == "step" and info["member"] == kill_member and info["step"] == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    store = FamilyStore(out)
    results = run_family("tiny", CONFIG, init_params(CONFIG, seed=0), SCHEDULE, heal, evals, store,
                         save_every=2, eval_batch_size=4, on_event=on_event)
    store.close()
    from plrd_jax.io.store import load_member
    _, params, _ = load_member(f"{out}:{len(results) - 1}")
    leaves = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(out, "result.npz"), **leaves)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], *(int(a) for a in args[1:]))
