"""Hard-concrete L0 masks for targeted structured pruning (Sheared-LLaMA; Louizos, Welling & Kingma 2018).

Each mask type has its own learned `log α` of the mask's shape (where each one applies: plrd_jax/model.py):

  z_layer [L]      a whole layer (its attention and MLP outputs)
  z_head  [L, H]   one query head's attention output
  z_int   [L, m]   one intermediate (SwiGLU) dimension
  z_hidden [d]     one hidden dimension, everywhere in the residual stream

Pure functions over dicts name -> array. With γ = −0.1, ζ = 1.1, ε = 1e-6 and temperature β:

  sample            u ~ U(ε, 1−ε),  s = σ((log u − log(1−u) + log α) / β),  z = clip(s (ζ − γ) + γ, 0, 1)
  prob_nonzero      P(z > 0) = 1 − σ(β log(−γ/ζ) − log α)
  soft_scores       σ(0.8 · log α / β), the value a kept unit keeps in the deterministic mask
  deterministic     soft scores on the kept units, 0 elsewhere; the kept units are the highest-scoring ones,
                    exactly the target's counts (or, without a target, round(Σ P(z > 0)) per row)
  expected_size     E[#matrix params] = Σ_l p_layer[l] (2·hd·D·(Σ_h p_head[l,h] + Σ_g P(group g kept))
                                                          + 3·D·Σ_j p_int[l,j]),   D = Σ_i p_hidden[i]
                    (per head 4d²/H for MHA; embeddings and norms are not counted)

Temperature: the reference code uses β = 2/3 (`TEMPERATURE`), the paper's appendix says 0.83; every function
takes it as an argument.

GQA (the decision): `z_head` masks query heads. A target keeps `kv` whole key/value groups with the same number
`g = heads / kv` of query heads in each (g at most the parent's H/KV). The final mask picks, per layer, the g
best query heads of every group, then the kv groups whose picked heads score highest; a group's k and v
columns go with it. So the pruned model is always a valid GQA model (MHA when g = 1), and both "drop whole kv
groups" (g = H/KV) and "drop query heads evenly from every group" (kv = KV) are special cases. In the expected
size a group's k/v count with P(kept) = 1 − Π_h (1 − p_head[h]) over its query heads (`group_prob`). The
pruning phase also constrains how full the groups are (`group_fill`, plrd_jax/shear.py), so that the heads it
learns to keep come as whole groups of g when the target drops groups, and g in every group when it does not.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from plrd_jax.nn.config import ModelConfig

GAMMA, ZETA, EPSILON = -0.1, 1.1, 1e-6
TEMPERATURE = 2.0 / 3.0  # the reference code's β; the paper's appendix says 0.83
SOFT_SCALE = 0.8  # the deterministic mask's σ(0.8 · log α / β), as in the reference code
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # log α is clamped here after every step
MASK_NAMES = ("z_layer", "z_head", "z_int", "z_hidden")

Masks = dict[str, jax.Array]


class ShapeError(ValueError):
    """A target shape that the parent cannot be pruned to."""


# ---- target shape -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TargetShape:
    """The pruned model's shape. num_kv_heads None: num_heads for an MHA parent, the parent's kv heads for GQA.
    head_dim stays the parent's, so hidden_size need not be heads × head_dim; but transformers' LlamaConfig
    refuses a hidden_size that is not a multiple of num_heads, so keep it one for a model to export."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None

    def resolve(self, parent: ModelConfig) -> "TargetShape":
        """This shape with num_kv_heads filled in, checked against the parent (raises ShapeError)."""
        kv = self.num_kv_heads
        if kv is None:
            kv = self.num_heads if parent.num_heads == parent.num_kv_heads else parent.num_kv_heads
        shape = dataclasses.replace(self, num_kv_heads=kv)
        shape.check(parent)
        return shape

    def check(self, parent: ModelConfig) -> None:
        """Raise ShapeError unless every dimension lies in [1, parent's] and the heads form valid GQA groups."""
        if self.num_kv_heads is None:
            raise ShapeError("num_kv_heads is unresolved; call TargetShape.resolve(parent)")
        dims = (("num_layers", parent.num_layers), ("hidden_size", parent.hidden_size),
                ("num_heads", parent.num_heads), ("num_kv_heads", parent.num_kv_heads),
                ("intermediate_size", parent.intermediate_size))
        for name, full in dims:
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= full:
                raise ShapeError(f"target {name} {value} must be an integer in [1, {full}] (the parent's {name})")
        if self.num_heads % self.num_kv_heads:
            raise ShapeError(f"target num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        group, parent_group = self.num_heads // self.num_kv_heads, parent.num_heads // parent.num_kv_heads
        if group > parent_group:
            raise ShapeError(f"target {self.num_heads} heads over {self.num_kv_heads} kv heads is {group} query "
                             f"heads per kv group, more than the parent's {parent_group}: pruning keeps whole kv "
                             f"groups with an equal number of their query heads (use num_kv_heads >= "
                             f"{-(-self.num_heads // parent_group)})")

    def config(self, parent: ModelConfig) -> ModelConfig:
        """The parent's config with this shape (head_dim kept, and stated explicitly)."""
        return parent.replace(num_layers=self.num_layers, hidden_size=self.hidden_size, num_heads=self.num_heads,
                              num_kv_heads=self.num_kv_heads, intermediate_size=self.intermediate_size,
                              head_dim=parent.head_dim_, linears=())

    def counts(self) -> dict[str, int]:
        """Kept units per row of each mask: layers, heads per layer, intermediate dims per layer, hidden dims."""
        return {"z_layer": self.num_layers, "z_head": self.num_heads, "z_int": self.intermediate_size,
                "z_hidden": self.hidden_size}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def target_sparsity(target: TargetShape, parent: ModelConfig) -> dict[str, float]:
    """Per mask type, the fraction of units the target removes: 1 − kept / parent's."""
    full = mask_shapes(parent)
    return {name: 1.0 - kept / full[name][-1] for name, kept in target.counts().items()}


# ---- parameters, sampling, scores ---------------------------------------------------------------
def mask_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    L, H, m, d = config.num_layers, config.num_heads, config.intermediate_size, config.hidden_size
    return {"z_layer": (L,), "z_head": (L, H), "z_int": (L, m), "z_hidden": (d,)}


def init_log_alpha(key: jax.Array, config: ModelConfig, mean: float = 5.0, std: float = 0.01) -> Masks:
    """log α ~ N(mean, std²) for every mask of `config` (float32); mean 5 starts with every unit on."""
    keys = jax.random.split(key, len(MASK_NAMES))
    return {name: mean + std * jax.random.normal(k, shape, jnp.float32)
            for k, (name, shape) in zip(keys, mask_shapes(config).items())}


def clamp_log_alpha(log_alpha: Masks, bounds: tuple[float, float] = LOG_ALPHA_RANGE) -> Masks:
    return {name: jnp.clip(a, *bounds) for name, a in log_alpha.items()}


def sample(log_alpha: Masks, key: jax.Array, temperature: float = TEMPERATURE) -> Masks:
    """One hard-concrete sample per unit: z = clip(σ((logit u + log α)/β)(ζ − γ) + γ, 0, 1), u ~ U(ε, 1−ε).
    Differentiable in log α (reparameterized)."""
    out = {}
    for k, name in zip(jax.random.split(key, len(log_alpha)), sorted(log_alpha)):
        a = log_alpha[name]
        u = jax.random.uniform(k, a.shape, jnp.float32, EPSILON, 1.0 - EPSILON)
        s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + a) / temperature)
        out[name] = jnp.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    return out


def prob_nonzero(log_alpha: Masks, temperature: float = TEMPERATURE) -> Masks:
    """P(z > 0) = 1 − σ(β log(−γ/ζ) − log α) for every unit."""
    shift = temperature * math.log(-GAMMA / ZETA)
    return {name: 1.0 - jax.nn.sigmoid(shift - a) for name, a in log_alpha.items()}


def soft_scores(log_alpha: Masks, temperature: float = TEMPERATURE) -> Masks:
    """σ(0.8 · log α / β): the ranking score of each unit and the value it keeps in the deterministic mask."""
    return {name: jax.nn.sigmoid(a / temperature * SOFT_SCALE) for name, a in log_alpha.items()}


def expected_sparsity(scores: Masks) -> Masks:
    """1 − mean score along the last axis: a scalar for z_layer / z_hidden, one per layer for z_head / z_int."""
    return {name: 1.0 - jnp.mean(s, axis=-1) for name, s in scores.items()}


# ---- deterministic masks ------------------------------------------------------------------------
def _ranks(scores: jax.Array) -> jax.Array:
    """Rank of each entry along the last axis, 0 = highest score (ties: lower index first)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def _keep_heads(scores: jax.Array, num_kv_heads: int, heads: int, kv_heads: int) -> jax.Array:
    """(L, H) bool: per layer the `heads // kv_heads` best query heads of each group, in the `kv_heads`
    groups whose picked heads score highest (the GQA rule in the module docstring)."""
    L, H = scores.shape
    grouped = scores.reshape(L, num_kv_heads, H // num_kv_heads)
    picked = _ranks(grouped) < heads // kv_heads
    group_scores = jnp.sum(jnp.where(picked, grouped, 0.0), axis=-1)
    kept_groups = _ranks(group_scores) < kv_heads
    return (picked & kept_groups[..., None]).reshape(L, H)


def deterministic(log_alpha: Masks, config: ModelConfig, target: TargetShape | None = None,
                  temperature: float = TEMPERATURE) -> Masks:
    """The eval-time masks: soft scores on the kept units, 0 elsewhere.

    With a (resolved) target: exactly its counts, heads by the GQA rule; every kept layer keeps the same
    numbers, so `prune` gives exactly `target.config(config)`. Without one: per row the round(Σ P(z > 0))
    highest-scoring units (the current model while pruning)."""
    scores = soft_scores(log_alpha, temperature)
    out = {}
    if target is not None:
        target.check(config)
        counts = target.counts()
    else:
        probs = prob_nonzero(log_alpha, temperature)
        counts = {name: jnp.round(jnp.sum(p, axis=-1, keepdims=True)) for name, p in probs.items()}
    for name, s in scores.items():
        if name == "z_head" and target is not None:
            keep = _keep_heads(s, config.num_kv_heads, target.num_heads, target.num_kv_heads)
        else:
            keep = _ranks(s) < counts[name]
        out[name] = jnp.where(keep, s, 0.0)
    return out


# ---- expected size ------------------------------------------------------------------------------
def group_prob(head_probs: jax.Array, num_kv_heads: int) -> jax.Array:
    """(L, H) query-head keep probabilities -> (L, KV): P(a kv group keeps any head) = 1 − Π_h (1 − p_h)."""
    L, H = head_probs.shape
    return 1.0 - jnp.prod(1.0 - head_probs.reshape(L, num_kv_heads, H // num_kv_heads), axis=-1)


def group_fill(head_probs: jax.Array, num_kv_heads: int, heads_per_group: int) -> jax.Array:
    """(L, H) query-head keep probabilities -> (L, KV): min(1, Σ_{h ∈ group} p_h / g), g = the target's query
    heads per group: 1 for a group holding g expected heads, ≈ 0 for a dropped one."""
    L, H = head_probs.shape
    return jnp.minimum(1.0, head_probs.reshape(L, num_kv_heads, H // num_kv_heads).sum(-1) / heads_per_group)


def expected_size(scores: Masks, config: ModelConfig) -> jax.Array:
    """Expected count of attention and MLP matrix params given per-unit keep probabilities (P(z > 0), or 0/1
    for a fixed mask); a missing mask counts as all ones. GQA-aware (module docstring)."""
    L, H, KV, m, d = (config.num_layers, config.num_heads, config.num_kv_heads, config.intermediate_size,
                      config.hidden_size)
    hd = config.head_dim_
    layer = scores.get("z_layer", jnp.ones((L,)))
    head = scores.get("z_head", jnp.ones((L, H)))
    inter = scores.get("z_int", jnp.ones((L, m)))
    hidden_dims = jnp.sum(scores.get("z_hidden", jnp.ones((d,))))
    group_kept = group_prob(head, KV)
    attn = 2 * hd * hidden_dims * (jnp.sum(head, axis=-1) + jnp.sum(group_kept, axis=-1))
    mlp = 3 * hidden_dims * jnp.sum(inter, axis=-1)
    return jnp.sum(layer * (attn + mlp))


def matrix_size(config: ModelConfig) -> int:
    """Attention and MLP matrix params of a dense `config`: L · (d·hd·(2H + 2KV) + 3·d·m)."""
    c = config
    return c.num_layers * (c.hidden_size * c.head_dim_ * 2 * (c.num_heads + c.num_kv_heads)
                           + 3 * c.hidden_size * c.intermediate_size)
