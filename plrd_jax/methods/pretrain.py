"""Pretraining from scratch: the GaLore-benchmark LLaMA presets, each method's recipe, token streams, a resumable run.

Presets (GaLore's configs/llama_*.json: LLaMA blocks, vocab 32000, untied LM head, RMSNorm ε 1e-6):

  preset      hidden  intermediate  heads  layers  steps   r (d/4)  SLTrain α  CoLA lr, warmup
  llama-20m   256     688           4      4       10K     64       16         6e-3, 20 %   (the CPU-scale shape)
  llama-60m   512     1376          8      8       10K     128      32         6e-3, 20 %
  llama-130m  768     2048          12     12      20K     256      16         3e-3, 10 %
  llama-350m  1024    2736          16     24      60K     256      16         3e-3, 10 %   (+ only_lr_act)
  llama-1b    2048    5461          32     24      100K    512      8          2e-3, 10 %   (+ only_lr_act)

Methods (every q, k, v, o, gate, up, down; embeddings, norms and the head stay dense, as in all three papers):

  full     dense K                         AdamW lr 1e-3, wd 0, no clipping, 10 % warmup (GaLore's baseline)
  lowrank  x A B                           as full (GaLore's "low-rank" row; its recipe is not published: ours)
  cola     σ(x A) B                        lr per preset, wd 0.01, clip 0.5, warmup per preset (CoLA)
  cola-m   cola, remat "bottleneck"        as cola (CoLA-M: only the r-dim activations are kept for backward)
  sltrain  x ((α/r) A B + S), δ = 0.03     lr 3e-3, wd 0, no clipping, 10 % warmup (SLTrain)

Common to all: 512 sequences × 256 tokens per step, cosine decay to 10 % of the peak lr, AdamW β = (0.9, 0.999),
ε = 1e-8 (PyTorch's defaults, which the reference code uses), bfloat16 compute on float32 master weights. Dense
kernels start N(0, 0.02) as in the papers' HF LLaMA code; factorized ones keep their papers' inits (linears.py).
The step is `plrd_jax.training.step.make_heal_step`, the store `plrd_jax.io.store.FamilyStore` (member 0 is the finished
model, so `load_model("DIR:0")` reads it back).

Data: a local corpus (`WindowBatches`: packed windows in a seeded per-epoch order, resumable from the step) or a
streamed source such as `tfds:c4/en` (`StreamedBatches`: documents in file order, cut into chunks of
`chunk_documents` documents, each chunk packed into windows and shuffled with rng([seed, chunk]); the position
is (chunk, window) and is saved with every checkpoint, so a resumed run skips documents without tokenizing
them). GaLore truncates and pads each C4 document to 256 tokens; we pack documents joined by EOS instead, so a
step holds 131,072 real tokens (GaLore's 1.1B tokens for 60M are its non-pad tokens of 10K steps).
Evaluation: perplexity on windows of a disjoint source (C4's validation split, or another local text).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from plrd_jax.configs import Presets
from plrd_jax.evaluation.perplexity import perplexity
from plrd_jax.io.store import FamilyStore, StoreError
from plrd_jax.nn.config import MATRIX_KINDS, ModelConfig
from plrd_jax.nn.linears import factorized_spec
from plrd_jax.nn.model import abstract_params
from plrd_jax.nn.model import init_params as init_model_params
from plrd_jax.nn.sharding import make_mesh, param_shardings
from plrd_jax.training.compile import compile_train_step
from plrd_jax.training.loop import run_stage, state_layout
from plrd_jax.training.optim import HealConfig, make_optimizer
from plrd_jax.training.state import TrainState, init_train_state

METHODS = ("full", "lowrank", "cola", "cola-m", "sltrain")


class PretrainError(ValueError):
    """A preset, method, recipe or run that cannot be used."""


# ---- presets and recipes ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    steps: int
    rank: int  # CoLA's d/4, also SLTrain's and the low-rank baseline's r
    sltrain_alpha: float
    cola_lr: float
    cola_warmup: float  # fraction of the steps
    only_lr_act: bool = False
    vocab_size: int = 32000


PRESETS = Presets("pretrain", Preset)  # plrd_jax/configs/pretrain/*.toml


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one model is pretrained: method, its parameterization and its optimizer, the step budget."""

    method: str
    lr: float
    steps: int
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    clip: float | None = None
    rank: int | None = None
    density: float | None = None  # sltrain
    alpha: float | None = None  # sltrain
    only_lr_act: bool = False  # cola
    remat: str = "none"
    batch_size: int = 512  # sequences per step (all micro-batches together)
    seq_len: int = 256
    dtype: str = "bfloat16"  # compute dtype; master weights stay float32

    def __post_init__(self):
        if self.method not in METHODS:
            raise PretrainError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.steps < 1 or not 0 <= self.warmup_fraction <= 1:
            raise PretrainError(f"need steps >= 1 (got {self.steps}) and warmup_fraction in [0, 1] "
                                f"(got {self.warmup_fraction})")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.steps)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def heal_config(self, grad_accum: int = 1) -> HealConfig:
        return HealConfig(lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.steps, end_lr_fraction=0.1,
                          b1=0.9, b2=0.999, eps=1e-8, weight_decay=self.weight_decay, clip=self.clip,
                          grad_accum=grad_accum, dtype=self.dtype)

    def replace(self, **kw) -> "Recipe":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PretrainError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def recipe(preset: str, method: str, **overrides) -> Recipe:
    """The published recipe of `method` at `preset` (module docstring), with `overrides` (Recipe fields)."""
    p = get_preset(preset)
    if method in ("full", "lowrank"):
        r = Recipe(method, lr=1e-3, steps=p.steps, rank=p.rank if method == "lowrank" else None)
    elif method in ("cola", "cola-m"):
        r = Recipe(method, lr=p.cola_lr, steps=p.steps, warmup_fraction=p.cola_warmup, weight_decay=0.01, clip=0.5,
                   rank=p.rank, only_lr_act=p.only_lr_act, remat="bottleneck" if method == "cola-m" else "none")
    elif method == "sltrain":
        r = Recipe(method, lr=3e-3, steps=p.steps, rank=p.rank, density=0.03, alpha=p.sltrain_alpha)
    else:
        raise PretrainError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return r.replace(**overrides)


def parameterize(config: ModelConfig, method: str, rank: int | None = None, density: float | None = None,
                 alpha: float | None = None) -> ModelConfig:
    """`config` with every attention and MLP matrix parameterized for `method` (full: all dense)."""
    if method not in METHODS:
        raise PretrainError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "full":
        return config
    kind = "cola" if method == "cola-m" else method
    if rank is None:
        raise PretrainError(f"method {method!r} needs a rank")
    specs = {path: factorized_spec(kind, *config.matrix_shape(path), rank, density=density, alpha=alpha, path=path)
             for path in config.matrix_paths(include_head=False)}
    return config.with_linears(specs)


def model_config(preset: str, rcp: Recipe, vocab_size: int | None = None, **overrides) -> ModelConfig:
    """The preset's decoder parameterized by the recipe (rank, density, alpha, only_lr_act, remat)."""
    p = get_preset(preset)
    config = ModelConfig(vocab_size=vocab_size or p.vocab_size, hidden_size=p.hidden_size,
                         intermediate_size=p.intermediate_size, num_layers=p.num_layers, num_heads=p.num_heads,
                         num_kv_heads=p.num_heads, rms_norm_eps=1e-6, max_seq_len=max(1024, rcp.seq_len),
                         tie_embeddings=False, bos_token_id=None, eos_token_id=None, only_lr_act=rcp.only_lr_act,
                         remat=rcp.remat).replace(**overrides)
    return parameterize(config, rcp.method, rcp.rank, rcp.density, rcp.alpha)


def init_params(config: ModelConfig, seed: int = 0, dense_std: float = 0.02) -> dict:
    """Params for pretraining: `plrd_jax.nn.model.init_params`, with every dense kernel redrawn N(0, dense_std²)
    (the papers' HF LLaMA init; the embedding already is N(0, 0.02²), factorized matrices keep theirs)."""
    params = init_model_params(config, seed)
    key = jax.random.key(seed + 1)

    def redraw(key_path, x):
        if getattr(key_path[-1], "key", None) != "kernel":
            return x
        name = "/".join(str(k.key) for k in key_path)
        leaf_key = jax.random.fold_in(key, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        return dense_std * jax.random.normal(leaf_key, x.shape, x.dtype)

    return jax.tree_util.tree_map_with_path(redraw, params)


def count_trainable(params) -> int:
    """Parameters that train: the floating leaves (SLTrain's integer support indices are not parameters)."""
    return sum(x.size for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))


def parameter_counts(params) -> dict[str, int]:
    """Trainable parameters by role: embedding, the attention/MLP matrices, LM head, norms; and `total`."""
    counts = {"embedding": 0, "matrices": 0, "lm_head": 0, "norms": 0}
    for key_path, x in jax.tree_util.tree_leaves_with_path(params):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        keys = [str(k.key) for k in key_path]
        role = ("embedding" if keys[0] == "embed" else "lm_head" if keys[0] == "lm_head" else
                "norms" if keys[-1] == "scale" else "matrices" if len(keys) > 2 and keys[-2] in MATRIX_KINDS else "norms")
        counts[role] += x.size
    counts["total"] = sum(counts.values())
    return counts


# ---- the run ------------------------------------------------------------------------------------
@dataclasses.dataclass
class PretrainResult:
    method: str
    params: int
    steps: int
    tokens: int
    wall_s: float  # training steps only (no compile, no evaluation), this run and any it resumed
    tokens_per_s: float
    eval_nll: float
    eval_ppl: float
    memory: dict[str, int]  # compiled step, see `memory_stats`
    history: list[dict[str, float]]  # per step: step, tokens, loss, grad_norm, lr, seconds
    evals: list[dict[str, float]]  # step, tokens, nll, ppl

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_fingerprint(config: ModelConfig, rcp: Recipe, data_spec, seed: int) -> str:
    blob = json.dumps({"config": config.to_dict(), "recipe": rcp.to_dict(), "data": data_spec, "seed": seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _resume_point(store: FamilyStore | None, run_id: str):
    """(step id to resume, steps done, data position, history, evals, wall seconds) of the newest checkpoint of
    this run in `store`, or a fresh start; a store of another run is a StoreError."""
    saved = store.steps() if store is not None else []
    if not saved:
        return None, 0, None, [], [], 0.0
    meta = store.metadata(saved[-1])
    if meta.get("run") != run_id:
        raise StoreError(f"{store.directory} holds checkpoints of another run (config, recipe, data or seed "
                         "differ); choose a new output directory")
    return saved[-1], meta["step"], meta.get("data_state"), meta["history"], meta["evals"], meta["wall_s"]


def pretrain(config: ModelConfig, rcp: Recipe, data, eval_windows: np.ndarray, store: FamilyStore | None = None,
             *, grad_accum: int = 1, mesh_shape=(1, -1, 1), seed: int = 0, eval_every: int = 0,
             save_every: int = 0, eval_batch_size: int = 8, stop_after: int | None = None,
             on_event: Callable[[str, dict], None] = lambda kind, info: None):
    """Train `config` from scratch by `rcp` on `data` (WindowBatches or StreamedBatches) → (params, result).

    Resumes from the newest checkpoint in `store` (same config, recipe, data and seed, else StoreError);
    checkpoints every `save_every` steps and at the end (member 0, final). `eval_every` steps (and at the end)
    the perplexity of `eval_windows` [N, T] is measured. `stop_after` ends the run after that many steps in
    all (a checkpoint is written there; the schedule is still `rcp.steps`), e.g. to split a run in pieces.
    on_event(kind, info): "compiled" (memory), "step", "eval", "saved"."""
    if rcp.batch_size % grad_accum:
        raise PretrainError(f"batch_size {rcp.batch_size} is not a multiple of grad_accum {grad_accum}")
    if data.seq_len != rcp.seq_len:
        raise PretrainError(f"data windows are {data.seq_len} tokens, the recipe wants {rcp.seq_len}")
    micro, heal, mesh = rcp.batch_size // grad_accum, rcp.heal_config(grad_accum), make_mesh(mesh_shape)
    run_id = run_fingerprint(config, rcp, data.spec, seed)
    base_meta = {"member": 0, "name": rcp.method, "method": rcp.method, "run": run_id, "recipe": rcp.to_dict(),
                 "config": config.to_dict(), "data": data.spec, "seed": seed}
    last = stop_after if stop_after is not None else rcp.steps
    shardings = param_shardings(abstract_params(config), mesh)
    layout = state_layout(abstract_params(config), make_optimizer(heal), mesh, shardings)
    saved = store.steps() if store is not None else []
    resume, done, data_state, history, evals, wall = _resume_point(store, run_id)
    compiled, memory = compile_train_step(config, heal, micro, rcp.seq_len, mesh, shardings, layout)
    on_event("compiled", {"memory": memory, "resume_step": done})
    batches = data.batches(rcp.batch_size, done, data_state)

    def batch_at(t):
        nonlocal data_state
        batch, data_state = next(batches)
        return batch.reshape(grad_accum, micro, rcp.seq_len)

    def evaluate(state, step):
        r = perplexity(config, state.params, eval_windows, batch_size=eval_batch_size)
        evals.append({"step": step, "tokens": step * rcp.tokens_per_step, "nll": r.nll, "ppl": r.ppl})
        on_event("eval", evals[-1])

    def after_step(step, state, metrics):
        nonlocal wall
        wall += metrics["seconds"]
        history.append({"step": step, "tokens": step * rcp.tokens_per_step, "loss": metrics["loss"],
                        "grad_norm": metrics["grad_norm"], "lr": metrics["lr"], "seconds": metrics["seconds"]})
        on_event("step", history[-1])
        if not math.isfinite(metrics["loss"]):
            raise PretrainError(f"loss became {metrics['loss']} at step {step}; lower the learning rate")
        if eval_every and step % eval_every == 0 and step < rcp.steps:
            evaluate(state, step)

    def checkpoint_meta(step, _run=None, final=False):
        if store is not None:
            on_event("saved", {"step": step, "final": final})
        return {**base_meta, "step": step, "final": final, "tokens": step * rcp.tokens_per_step,
                "data_state": data_state, "history": history, "evals": evals, "wall_s": wall,
                "params": count_trainable(layout.params)}

    if done >= last:  # finished before: the model alone (a final checkpoint holds no optimizer state)
        params, _ = store.restore(resume, layout.params)
        init, resume = (lambda: TrainState(jnp.asarray(done, jnp.int32), params, None)), None
    else:
        init = lambda: init_train_state(init_params(config, seed), heal, mesh, shardings)  # noqa: E731
    run = run_stage(compiled, steps=last if done < last else 0, batch_at=batch_at, store=store, resume=resume,
                    save_every=save_every, init=init, layout=layout, after_step=after_step,
                    checkpoint_meta=checkpoint_meta,
                    evaluate=lambda state: None if evals and evals[-1]["step"] == last else evaluate(state, last))
    state = run.state
    if store is not None and (done < last or not saved):  # the end of this run: final, or a piece of it
        final = last >= rcp.steps
        store.save(last, state.params, checkpoint_meta(last, final=final), opt_state=None if final else state.opt_state)
    timed = history[1:]  # the first step of a run also pays for warming up the executable
    result = PretrainResult(rcp.method, count_trainable(state.params), last, last * rcp.tokens_per_step, wall,
                            len(timed) * rcp.tokens_per_step / sum(h["seconds"] for h in timed) if timed else 0.0,
                            evals[-1]["nll"], evals[-1]["ppl"], memory, history, evals)
    return state.params, result
