"""Model configuration: shapes, dtypes and one `LinearSpec` per matrix.

Config is data. Every projection of the decoder has a stable path (see `MATRIX_KINDS` and
`ModelConfig.matrix_paths`) and the parameterization of each one is looked up here by that path, so the
transforms in `plrd_jax.transforms` change a model by returning a new config next to the new params.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

import jax.numpy as jnp

# Projection name -> the block it lives in. Path of layer i's projection: f"layers_{i}/{block}/{name}".
MATRIX_KINDS = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
LINEAR_KINDS = ("dense", "lowrank", "cola", "sltrain")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Activation rematerialization of each block (see plrd_jax.nn.model.remat_policy): none, full (recompute the block),
# dots (keep matmul outputs), bottleneck (keep only the r-dim activations of factorized linears: CoLA-M).
REMAT_POLICIES = ("none", "full", "dots", "bottleneck")
# How the sparse part S of an sltrain linear is applied (plrd_jax.nn.linears): by shape, dense temporary, or gather
# (never forms a d_in × d_out matrix).
SPARSE_METHODS = ("auto", "scatter", "gather")


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """How one matrix `K (d_in × d_out)`, `y = x K`, is parameterized.

    dense: `kernel`; lowrank: `x A B` with `A (d_in × r)`, `B (r × d_out)`; cola: `σ(x A) B`;
    sltrain: `(alpha/r) x A B + x S` with `S` given by `values` on a fixed support of `nnz` positions.
    """

    kind: str = "dense"
    rank: int | None = None
    nnz: int | None = None  # sparse entries (sltrain)
    alpha: float | None = None  # sltrain scale numerator (alpha / rank)
    activation: bool = True  # cola: apply SiLU to x A

    def __post_init__(self):
        if self.kind not in LINEAR_KINDS:
            raise ConfigError(f"unknown linear kind {self.kind!r}; expected one of {', '.join(LINEAR_KINDS)}")
        if self.kind != "dense" and (self.rank is None or self.rank <= 0):
            raise ConfigError(f"a {self.kind} linear needs a positive rank, got {self.rank}")
        if self.kind == "sltrain" and (self.nnz is None or self.nnz < 0):
            raise ConfigError("an sltrain linear needs nnz >= 0")


DENSE = LinearSpec()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family decoder (LLaMA-2/3, Mistral, SmolLM2, Qwen2 shapes)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # Non-dense matrices only: ((path, spec), ...) sorted by path; every other matrix is dense.
    linears: tuple[tuple[str, LinearSpec], ...] = ()
    remat: str = "none"  # one of REMAT_POLICIES
    only_lr_act: bool = False  # CoLA: the MLP is down(gate(x) · up(x)), no SiLU of its own on the gate
    sparse_method: str = "auto"  # one of SPARSE_METHODS
    # Run consecutive layers of identical specs under one jax.lax.scan (traced and compiled once per run of
    # layers). When every layer shares one shape the params are stored stacked (`nn.layout.stack_layers`, a
    # leading layer axis); otherwise they stay one subtree per layer and each run is stacked at compute time.
    scan_layers: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim_ % 2:
            raise ConfigError(f"head_dim {self.head_dim_} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"unknown remat policy {self.remat!r}; expected one of {', '.join(REMAT_POLICIES)}")
        if self.sparse_method not in SPARSE_METHODS:
            raise ConfigError(f"unknown sparse method {self.sparse_method!r}; expected one of "
                              f"{', '.join(SPARSE_METHODS)}")
        for name in (self.param_dtype, self.dtype):
            if name not in DTYPES:
                raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
        paths = set(self.matrix_paths())
        for path, spec in self.linears:
            if path not in paths:
                raise ConfigError(f"linear spec for unknown matrix {path!r}")
            if spec.kind != "dense":
                d_in, d_out = self.matrix_shape(path)
                if spec.rank >= min(d_in, d_out) and spec.kind != "lowrank":
                    raise ConfigError(f"rank {spec.rank} for {path} must be below min({d_in}, {d_out})")
                if spec.rank > min(d_in, d_out):
                    raise ConfigError(f"rank {spec.rank} for {path} exceeds min({d_in}, {d_out})")
                if spec.kind == "sltrain" and spec.nnz > d_in * d_out:
                    raise ConfigError(f"nnz {spec.nnz} for {path} exceeds {d_in}×{d_out}")

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    def matrix_paths(self, include_head: bool = True) -> Iterator[str]:
        """Paths of all projections, layer by layer, then the LM head when it is untied."""
        for i in range(self.num_layers):
            for name, block in MATRIX_KINDS.items():
                yield f"layers_{i}/{block}/{name}"
        if include_head and not self.tie_embeddings:
            yield "lm_head"

    def matrix_shape(self, path: str) -> tuple[int, int]:
        """(d_in, d_out) of the kernel at `path`."""
        d, m, hd = self.hidden_size, self.intermediate_size, self.head_dim_
        if path == "lm_head":
            return d, self.vocab_size
        name = path.rsplit("/", 1)[-1]
        return {
            "q": (d, self.num_heads * hd),
            "k": (d, self.num_kv_heads * hd),
            "v": (d, self.num_kv_heads * hd),
            "o": (self.num_heads * hd, d),
            "gate": (d, m),
            "up": (d, m),
            "down": (m, d),
        }[name]

    def linear(self, path: str) -> LinearSpec:
        for p, spec in self.linears:
            if p == path:
                return spec
        return DENSE

    def with_linears(self, updates: dict[str, LinearSpec]) -> "ModelConfig":
        """A copy with the given matrices' specs replaced (dense specs are dropped: dense is the default)."""
        merged = dict(self.linears)
        merged.update(updates)
        linears = tuple(sorted((p, s) for p, s in merged.items() if s.kind != "dense"))
        return dataclasses.replace(self, linears=linears)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["linears"] = {p: dataclasses.asdict(s) for p, s in self.linears}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(sorted(unknown))}")
        d["linears"] = tuple(sorted((p, LinearSpec(**s)) for p, s in d.get("linears", {}).items()))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)
