"""Transformers code for plrd_jax's factorized exports: a LLaMA whose listed linears hold low-rank factors.

This file is copied verbatim into every factorized export directory and named by its config.json's `auto_map`,
so that `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads the factors as they are,
without multiplying them out (the point of the export: a rank-r matrix costs r·(d_in + d_out) weights and
multiply-adds per token instead of d_in·d_out). It imports torch and transformers only, never plrd_jax.

Everything is transformers' LLaMA (`LlamaConfig`, `LlamaForCausalLM`) except the linears that
`config.plrd_linears` lists, by module name ("model.layers.3.mlp.up_proj"), each one replaced by a
`FactorizedLinear`:

  lowrank  {"kind": "lowrank", "rank": r}                 y = B(A(x)) = x Aᵀ Bᵀ
           A.weight (r, d_in), B.weight (d_out, r): two bias-free nn.Linear, HF's (out, in) layout
  sltrain  {"kind": "sltrain", "rank": r, "nnz": n, "alpha": α}
                                                          y = (α/r)·B(A(x)) + x S
           S (d_in, d_out) is zero except S.flatten()[sparse_indices] = sparse_values, the indices (n,) int32
           being flat row-major positions in (d_in, d_out) (fixed support; a persistent buffer, never trained)
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

FACTORIZED_KINDS = ("lowrank", "sltrain")


class PlrdLlamaConfig(LlamaConfig):
    """LlamaConfig plus `plrd_linears` ({module name: {"kind", "rank"[, "nnz", "alpha"]}}), kept as an extra
    attribute (every transformers version stores unknown config.json keys as attributes)."""

    model_type = "plrd_llama"


class FactorizedLinear(nn.Module):
    """A bias-free linear d_in -> d_out as rank-r factors (and, for sltrain, a fixed-support sparse part).

    x (..., d_in) -> y (..., d_out): lowrank y = x Aᵀ Bᵀ; sltrain y = (α/r) x Aᵀ Bᵀ + x S (S formed dense for
    the matmul from its n values, as the reference SLTrain implementation does)."""

    def __init__(self, in_features: int, out_features: int, spec: dict, device=None, dtype=None):
        super().__init__()
        kind, rank = spec.get("kind"), int(spec.get("rank") or 0)
        if kind not in FACTORIZED_KINDS or not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"plrd_linears entry {spec} is not a lowrank/sltrain spec of rank 1.."
                             f"{min(in_features, out_features)}")
        self.in_features, self.out_features, self.kind, self.rank = in_features, out_features, kind, rank
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        if kind == "sltrain":
            nnz = int(spec["nnz"])
            self.scale = float(spec["alpha"]) / rank
            self.sparse_values = nn.Parameter(torch.zeros(nnz, device=device, dtype=dtype))
            self.register_buffer("sparse_indices", torch.zeros(nnz, device=device, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.B(self.A(x))
        if self.kind == "lowrank":
            return y
        flat = x.new_zeros(self.in_features * self.out_features)
        s = flat.index_put((self.sparse_indices.long(),), self.sparse_values.to(x.dtype))
        return self.scale * y + x @ s.view(self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, rank={self.rank}"


def replace_linears(model: nn.Module, linears: dict) -> None:
    """Swap each listed nn.Linear of `model` for a FactorizedLinear of the same shape, dtype and device."""
    for name, spec in (linears or {}).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"plrd_linears names {name!r}, which is no linear layer of this model")
        setattr(parent, child, FactorizedLinear(old.in_features, old.out_features, spec,
                                                device=old.weight.device, dtype=old.weight.dtype))


class PlrdLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with `config.plrd_linears` factorized; generation, caching and saving are LLaMA's."""

    config_class = PlrdLlamaConfig

    def __init__(self, config: PlrdLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)  # LlamaForCausalLM.__init__, linears swapped before post_init
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        replace_linears(self, getattr(config, "plrd_linears", None))
        self.post_init()


__all__ = ["PlrdLlamaConfig", "PlrdLlamaForCausalLM", "FactorizedLinear"]
