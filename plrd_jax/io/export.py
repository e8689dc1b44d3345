"""Export a model (family member, HF directory, GGUF, the embedded parent) for other runtimes, factors kept.

`export_model(params, config, out, ...)` writes a directory:

  hf, factorized  model.safetensors with, per factorized matrix, `<module>.A.weight` (r, d_in) and
                  `<module>.B.weight` (d_out, r) (HF's (out, in) layout of our A (d_in, r), B (r, d_out)), for a
                  sparse-plus-low-rank (sltrain) one also `<module>.sparse_values` (nnz,) and
                  `<module>.sparse_indices` (nnz,) int32; config.json with model_type "plrd_llama", the per-matrix
                  kinds and ranks in `plrd_linears` {module: {kind, rank[, nnz, alpha]}} and an `auto_map` to
                  modeling_plrd.py (copied in: transformers' LLaMA with those linears factorized), so that
                  `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it as it is
  hf, all dense   a plain LlamaForCausalLM directory (no custom code), as `save_hf` writes
  gguf            model.gguf (`plrd_jax.io.gguf.save_gguf`): dense matrices only
and in each README.md (a model card: parent, method, sizes, ranks, healing, evaluation, the command), the
tokenizer files, and for hf generation_config.json. `load_model(DIR)` reads any of them back.

Before writing, `densify` multiplies factors out (K = A B; sltrain K = (α/r) A B + S):
  auto  the matrices whose factors hold at least as many weights as K: r(d_in + d_out) (+ nnz) ≥ d_in·d_out, i.e.
        r ≥ d_in·d_out/(d_in + d_out), the break-even rank (dense is then no larger and one matmul, not two)
  all   every factorized matrix (what a GGUF needs)     none  none

Files go to a temporary sibling `.NAME.XXXXXX` that is renamed to `out` only once complete, so a failure (disk
full included) leaves no half-written directory where `out` was asked for.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from plrd_jax.io.hf import EXPORTABLE_KINDS, SINGLE_FILE, config_to_hf, hf_state_dict, linears_to_hf
from plrd_jax.io.output import staged_directory, OutputError, check_writable
from plrd_jax.nn.accounting import count_params
from plrd_jax.nn.config import DTYPES, ConfigError, LinearSpec, ModelConfig
from plrd_jax.nn.layout import unstack_layers

FORMATS = ("hf", "gguf")
DENSIFY_MODES = ("auto", "all", "none")
EXPORT_DTYPES = (*DTYPES, "q8_0")  # q8_0: GGUF only
MODEL_TYPE, MODELING_FILE, GGUF_FILE = "plrd_llama", "modeling_plrd.py", "model.gguf"
AUTO_MAP = {"AutoConfig": "modeling_plrd.PlrdLlamaConfig", "AutoModelForCausalLM": "modeling_plrd.PlrdLlamaForCausalLM"}


# ---- which matrices stay factorized ---------------------------------------------------------------
def break_even_rank(d_in: int, d_out: int) -> float:
    """d_in·d_out/(d_in + d_out): the rank at which factors A (d_in × r), B (r × d_out) hold as many weights as K."""
    return d_in * d_out / (d_in + d_out)


def densify_paths(config: ModelConfig, mode: str = "auto") -> list[str]:
    """The factorized matrices `mode` writes dense (see the module docstring)."""
    if mode not in DENSIFY_MODES:
        raise ConfigError(f"densify mode {mode!r} is not one of {', '.join(DENSIFY_MODES)}")
    out = []
    for path, spec in config.linears:
        d_in, d_out = config.matrix_shape(path)
        factored = spec.rank * (d_in + d_out) + (spec.nnz or 0)
        if mode == "all" or (mode == "auto" and factored >= d_in * d_out):
            out.append(path)
    return out


def dense_kernel(node: dict, spec: LinearSpec, d_in: int, d_out: int) -> np.ndarray:
    """K (d_in, d_out) float32 of a factorized node: A B, (α/r) A B + S for sltrain (S from values, indices)."""
    k = np.asarray(node["A"], np.float32) @ np.asarray(node["B"], np.float32)
    if spec.kind == "sltrain":
        k *= spec.alpha / spec.rank
        k.reshape(-1)[np.asarray(node["indices"])] += np.asarray(node["values"], np.float32)
    return k


def densify_params(params: dict, config: ModelConfig, paths: list[str]) -> tuple[dict, ModelConfig]:
    """`paths` multiplied out into dense kernels (float32), their specs reset to dense; other nodes shared."""
    params = dict(params)
    for path in paths:
        keys, node = path.split("/"), params
        for key in keys[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        old = node[keys[-1]]
        node[keys[-1]] = {"kernel": dense_kernel(old, config.linear(path), *config.matrix_shape(path)),
                          **({"bias": old["bias"]} if "bias" in old else {})}
    return params, config.with_linears({p: LinearSpec() for p in paths})


def cast_params(params, dtype: str):
    """Every floating leaf as a numpy array of `dtype` (float32 / bfloat16 / float16); integer leaves unchanged."""
    target = np.dtype(DTYPES[dtype])
    if isinstance(params, dict):
        return {k: cast_params(v, dtype) for k, v in params.items()}
    array = np.asarray(params)
    return array if array.dtype.kind in "iu" else np.asarray(array, np.float32).astype(target)


# ---- config.json ----------------------------------------------------------------------------------
def hf_config(config: ModelConfig) -> dict[str, Any]:
    """config.json: plain LLaMA when every matrix is dense, else the plrd_llama model with its `plrd_linears`."""
    hf = config_to_hf(config)
    if config.linears:
        hf.update(architectures=["PlrdLlamaForCausalLM"], model_type=MODEL_TYPE, auto_map=dict(AUTO_MAP),
                  plrd_linears=linears_to_hf(config))
    return hf


def generation_config(config: ModelConfig) -> dict[str, Any]:
    """generation_config.json: the bos/eos ids `generate()` starts and stops with (greedy by default)."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}


# ---- the output directory -------------------------------------------------------------------------
def check_export_target(out: str | os.PathLike, force: bool = False, hint: str = "pass force=True") -> None:
    """Refuse, before any work: a file where `out` should be, a non-empty `out` without `force` (the error says
    `hint`), a non-empty `out` that holds no exported model (no config.json, no .gguf) even with it, an
    unwritable location."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} already exists and is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputError(f"{out} already exists and is not empty; {hint} to replace it")
        if not (out / "config.json").is_file() and not any(out.glob("*.gguf")):
            raise OutputError(f"{out} is a directory but holds no exported model (no config.json or .gguf); "
                              f"refusing to replace it")
    check_writable(out.parent if out.exists() else out)


def weight_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the weight files (safetensors, gguf) in `directory`."""
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.suffix in (".safetensors", ".gguf"))


# ---- writing --------------------------------------------------------------------------------------
def write_hf(directory: Path, params, config: ModelConfig, tokenizer=None) -> None:
    """model.safetensors (HF names, `hf_layout`), config.json, generation_config.json, modeling_plrd.py when
    some matrix is factorized, and the tokenizer files, into `directory`."""
    save_file(hf_state_dict(params, config), str(directory / SINGLE_FILE), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    if config.linears:
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), directory / MODELING_FILE)
    if tokenizer is not None:
        tokenizer.save(directory)


def check_options(format: str = "hf", dtype: str | None = None, densify: str = "auto") -> None:
    """Refuse an unknown format, dtype or densify mode, and q8_0 outside a GGUF (all knowable without a model)."""
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    if dtype == "q8_0" and format != "gguf":
        raise ConfigError("dtype q8_0 is a GGUF tensor type; for --format hf use float32, bfloat16 or float16")
    if densify not in DENSIFY_MODES:
        raise ConfigError(f"densify mode {densify!r} is not one of {', '.join(DENSIFY_MODES)}")


def check_exportable(config: ModelConfig, format: str = "hf", dtype: str | None = None,
                     densify: str = "auto") -> list[str]:
    """What `export_model` would refuse, raised before any work (a bad format / dtype / densify mode, a cola
    linear, a factorized matrix left for a GGUF or a Qwen2); returns the matrices `densify` writes dense."""
    check_options(format, dtype, densify)
    for path, spec in config.linears:
        if spec.kind not in EXPORTABLE_KINDS:
            raise ConfigError(f"{path} is a {spec.kind} linear (σ(x A) B is no product of matrices); only dense, "
                              f"lowrank and sltrain matrices can be exported")
    dense = densify_paths(config, densify)
    left = [path for path, _ in config.linears if path not in dense]
    if left and format == "gguf":
        raise ConfigError(f"{len(left)} matrices ({left[0]}, ...) stay factorized with densify {densify!r}, and a "
                          f"GGUF holds dense matrices only: pass --densify all, or export HF (--format hf)")
    if left and config.qkv_bias:
        raise ConfigError(f"{len(left)} matrices ({left[0]}, ...) stay factorized, and the factorized export is a "
                          f"LLaMA without Qwen2's q/k/v bias: pass --densify all")
    return dense


def export_model(params, config: ModelConfig, out: str | os.PathLike, *, tokenizer=None, format: str = "hf",
                 dtype: str | None = None, densify: str = "auto", force: bool = False, meta: dict | None = None,
                 source: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Write `params` (a `config` model) to the directory `out` as `format` ("hf" or "gguf", see the module
    docstring), weights in `dtype` (default the params' own; "q8_0" for GGUF only), factors multiplied out as
    `densify` says, a model card from the family metadata `meta`. Returns a summary: out, format, dtype, params
    (weights written), weight_bytes, factorized and dense (matrix counts), densified (paths)."""
    densified = check_exportable(config, format, dtype, densify)
    check_export_target(out, force)
    params, config = unstack_layers(params), config.replace(scan_layers=False)  # files hold one tensor per layer
    dtype = dtype or config.param_dtype
    stored = dtype if format == "hf" else "float32"  # GGUF encodes (rounds, quantizes) float32 itself
    params, config = densify_params(params, config, densified)
    params = cast_params(params, stored)
    config = config.replace(param_dtype=stored, dtype=stored)
    name = (meta or {}).get("name") or Path(os.fspath(source or out)).name
    factorized = len(config.linears)
    summary = {"out": str(out), "name": name, "format": format, "dtype": dtype, "densify": densify,
               "densified": densified, "params": count_params(params), "factorized": factorized,
               "dense": sum(1 for _ in config.matrix_paths()) - factorized}
    with staged_directory(out) as tmp:
        if format == "hf":
            write_hf(tmp, params, config, tokenizer)
        else:
            from plrd_jax.io.gguf import save_gguf

            save_gguf(params, config, tmp / GGUF_FILE, tokenizer, dtype, name=summary["name"])
        summary["weight_bytes"] = weight_bytes(tmp)
        (tmp / "README.md").write_text(model_card(config, summary, meta, source, command))
    return summary


def load_for_export(spec: str | os.PathLike) -> tuple[ModelConfig, dict, Any, dict | None]:
    """(config, params, tokenizer, member metadata or None) of any `load_model` spec; a family member's metadata
    (and so a missing member's error) is read before its params."""
    from plrd_jax.io.load import load_model
    from plrd_jax.io.store import FamilyStore, split_member_spec

    parsed = split_member_spec(os.fspath(spec))
    meta = None
    if parsed is not None and not Path(spec).exists():
        meta = FamilyStore(parsed[0], read_only=True).find_member(parsed[1])
    config, params, tokenizer = load_model(spec)
    return config, params, tokenizer, meta


# ---- the model card -------------------------------------------------------------------------------
def _ranks_table(config: ModelConfig, densified: list[str]) -> list[str]:
    """One row per projection kind: shape, how many of its matrices are factorized, their ranks, break-even."""
    rows = ["| matrix | d_in × d_out | factorized | ranks min–max (mean) | break-even rank | densified |",
            "|---|---|---|---|---|---|"]
    groups: dict[str, list[str]] = {}
    for path in config.matrix_paths():
        groups.setdefault(path.rsplit("/", 1)[-1], []).append(path)
    for name, paths in groups.items():
        d_in, d_out = config.matrix_shape(paths[0])
        ranks = [config.linear(p).rank for p in paths if config.linear(p).kind != "dense"]
        span = f"{min(ranks)}–{max(ranks)} ({sum(ranks) / len(ranks):.0f})" if ranks else "dense"
        rows.append(f"| {name} | {d_in} × {d_out} | {len(ranks)} of {len(paths)} | {span} | "
                    f"{break_even_rank(d_in, d_out):.0f} | {sum(p in densified for p in paths)} |")
    return rows


def _eval_table(meta: dict) -> list[str]:
    """Per-corpus PPL after healing (or the member's eval PPL) and its ratio to the parent's, when recorded."""
    ppl = meta.get("ppl_after") or meta.get("eval_ppl") or (meta.get("result") or {}).get("ppl_after")
    if ppl is None:
        return ["No evaluation is recorded for this model."]
    ppl = ppl if isinstance(ppl, dict) else {"eval": ppl}
    parent = meta.get("parent_ppl") if isinstance(meta.get("parent_ppl"), dict) else {}
    rows = ["| corpus | PPL | parent PPL | × parent |", "|---|---|---|---|"]
    for corpus, value in ppl.items():
        base = parent.get(corpus)
        ratio = f"{value / base:.2f}×" if base else "–"
        rows.append(f"| {corpus} | {value:.2f} | {f'{base:.2f}' if base else '–'} | {ratio} |")
    return rows


def model_card(config: ModelConfig, summary: dict, meta: dict | None = None, source: str | None = None,
               command: str | None = None) -> str:
    """README.md of an export: what the model is (parent, method, size, ranks, healing), how it evaluated, how to
    load it, and the command that wrote it (markdown)."""
    meta, name = meta or {}, summary.get("name") or Path(summary["out"]).name
    heal = meta.get("data", {}).get("heal", {}) if isinstance(meta.get("data"), dict) else {}
    share = f" ({100 * meta['compression']:.1f} % of the parent)" if meta.get("compression") else ""
    facts = [("source", source), ("parent", meta.get("parent")), ("method", meta.get("method")),
             ("member", f"{meta['member']} ({meta.get('name')})" if "member" in meta else None),
             ("parameters", f"{meta['params']:,}{share}" if meta.get("params") else None),
             ("exported", f"{summary['params']:,} weights in {summary['dtype']}, {summary['weight_bytes']:,} bytes "
                          f"({summary['format']})"),
             ("matrices", f"{summary['factorized']} factorized, {summary['dense']} dense (densify "
                          f"{summary['densify']}: {len(summary['densified'])} multiplied out)"),
             ("healing", f"{meta['tokens']:,} tokens of {heal.get('source', 'unrecorded data')}"
              if meta.get("tokens") is not None else None)]
    where = f"path/to/{Path(summary['out']).name}"
    if summary["format"] == "gguf":
        use = f'AutoModelForCausalLM.from_pretrained("{where}", gguf_file="{GGUF_FILE}")  # or llama.cpp'
    else:
        use = f'AutoModelForCausalLM.from_pretrained("{where}"{", trust_remote_code=True" if config.linears else ""})'
    lines = [f"# {name}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts if v is not None), "",
             "## Ranks", "", *_ranks_table(config, summary["densified"]), "", "## Evaluation", "",
             *_eval_table(meta), "", "## Use", "", "```python", "from transformers import AutoModelForCausalLM",
             "", f"model = {use}", "```", ""]
    if command:
        lines += ["## Made with", "", "```", command, "```", ""]
    return "\n".join(lines)
