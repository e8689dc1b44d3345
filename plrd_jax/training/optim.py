"""The optimizer of every training run: clip → AdamW with warmup + cosine decay, configured by HealConfig."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from plrd_jax.nn.config import DTYPES
from plrd_jax.nn.layout import STACK


@dataclasses.dataclass(frozen=True)
class HealConfig:
    """Hyper-parameters of one healing run. One step sees grad_accum × B × T tokens. The learning rate warms up
    linearly from 0 (so step 0 makes no update when warmup_steps > 0), then decays by a cosine."""

    lr: float = 2e-4
    warmup_steps: int = 10
    total_steps: int = 100
    end_lr_fraction: float = 0.1  # cosine decay from lr to end_lr_fraction · lr at total_steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0  # on 2-D matrices except the embedding table (see `decay_mask`)
    clip: float | None = 1.0  # global gradient-norm clip; None = no clipping
    grad_accum: int = 1  # micro-batches per step
    kd_weight: float = 0.0  # loss = (1 − w)·CE + w·KD; 0 = cross-entropy only
    kd_temperature: float = 1.0
    kd_top_k: int = 0  # KD on the teacher's top-k tokens + a rest bucket (`distill_top_k_loss`); 0 = full logits
    dtype: str = "float32"  # compute dtype; params stay float32

    def __post_init__(self):
        if not 0 <= self.warmup_steps <= self.total_steps or self.total_steps <= 0:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), "
                             "total_steps > 0")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight {self.kd_weight} must lie in [0, 1]")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum {self.grad_accum} must be >= 1")
        if isinstance(self.kd_top_k, bool) or int(self.kd_top_k) != self.kd_top_k or self.kd_top_k < 0:
            raise ValueError(f"kd_top_k {self.kd_top_k} must be an integer >= 0 (0 = distill on the full logits)")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature {self.kd_temperature} must be positive")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown compute dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")

    def replace(self, **kw) -> "HealConfig":
        return dataclasses.replace(self, **kw)


def learning_rate_schedule(heal_config: HealConfig) -> optax.Schedule:
    """0 → lr linearly over warmup_steps, then cosine to end_lr_fraction · lr at total_steps (constant after)."""
    h = heal_config
    # optax needs a cosine of at least one step; with no steps left after warmup it is never reached anyway.
    decay_steps = max(h.total_steps, h.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, h.lr, h.warmup_steps, decay_steps, h.lr * h.end_lr_fraction)


def decay_mask(params) -> Any:
    """True for the leaves weight decay applies to: every 2-D matrix (dense kernels, low-rank factors A and B,
    an untied lm_head) except the embedding table; not norms, biases or SLTrain's sparse values.
    (On a factorized matrix, decay of A and B penalizes ‖A‖² + ‖B‖², i.e. bounds the nuclear norm of AB.)
    In the stacked layout (`nn.layout.stack_layers`) a layer's matrix is a 3-D leaf under `layers`."""
    def decays(key_path, x):
        stacked = getattr(key_path[0], "key", None) == STACK
        return x is not None and x.ndim == 2 + stacked and getattr(key_path[-1], "key", None) != "embedding"
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(heal_config: HealConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) → AdamW(schedule, b1, b2, eps, weight_decay on `decay_mask`).

    Apply it to `trainable(params)` (floating leaves; others are None)."""
    h = heal_config
    clip = optax.clip_by_global_norm(h.clip) if h.clip else optax.identity()
    adamw = optax.adamw(learning_rate_schedule(h), h.b1, h.b2, h.eps, weight_decay=h.weight_decay, mask=decay_mask)
    return optax.chain(clip, adamw)
