"""Heal-step throughput and model FLOP utilization against an HF transformers (torch) AdamW step, side by side;
then forward latency of low-rank members against their FLOP ratio to the parent.

    python benchmarks/bench_heal.py [--family runs/plrd-progressive | --fractions 0.75,0.5,0.25
        | --budgets 0.6,0.5,0.4 --multiple-of 1,16] [--skip-torch | --forward-only | --no-attention-core]
        [--config-json CONFIG]
        [--batch 4] [--seq-len 256] [--steps 3] [--dtype float32] [--peak-gflops 165] [--json OUT]

On a GPU (e.g. an H100/H200 without the checkpoint at hand):
    python benchmarks/bench_heal.py --config-json smollm2_config.json --dtype bfloat16 --batch 32 \
        --seq-len 1024 --steps 5 --peak-gflops 989000

Heal: the same parent (embedded GGUF, dequantized), batch, length and optimizer (AdamW, clip 1.0), plain
cross-entropy; each side in a process of its own (so neither runtime's idle worker threads take the cores
during the other's step), the two taking turns for --steps rounds after a warm-up step each; median step time.
MFU = tokens/s · model FLOPs per token (6N + attention, `plrd_jax.training.step.model_flops_per_token`) / the machine's
peak (--peak-gflops: measured float32 matmul peak of this CPU, or the accelerator's dense bf16 peak).
--config-json: random weights of that `ModelConfig` instead of the checkpoint (speed does not depend on the
values). bfloat16: compute in bf16 with float32 master weights on both sides (torch: `autocast`); on a GPU torch
runs on CUDA with its default SDPA attention.
Members: those of --family DIR (e.g. the main job's), or uniform rank = fraction · 576 on every attention and
MLP matrix (k/v only where it saves); forward of batch×seq_len tokens, and per-token latency of greedy decoding
(batch 1, the last positions of a seq_len KV cache), medians of ≥ 5 rounds in which the models take turns;
"FLOP ratio" = parent forward FLOPs / member forward FLOPs per token (the same for both).
The script restarts itself once with glibc malloc keeping freed memory (`timing.KEEP_FREED_MEMORY`, for it and
its workers); run it with GLIBC_TUNABLES= to time with glibc's defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from timing import keep_freed_memory, process_round_robin, round_robin_medians


DECODE_STEPS = 16  # per timed call of the decode latency


def values_passthrough(q, k, v, positions, k_pos, z_head, dtype, blocks=1):
    """Stands in for `plrd_jax.nn.model.masked_attention` in --no-attention-core: no scores, softmax or P·V, only
    q plus the mean of k + v over the keys (so that no projection is optimized away), in its output shape."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    kv = (k + v).astype(q.dtype).mean(axis=1)  # (B, KV, hd)
    return q.reshape(B, T, KV, H // KV, hd) + kv[:, None, :, None, :]


def decode_steps(config, params, cache_len: int, steps: int):
    """Argument-less: `steps` greedy generation steps (`plrd_jax.evaluation.generate.decode_step`, batch 1) at the last
    positions of a KV cache of `cache_len`, waited for."""
    from plrd_jax.evaluation.generate import decode_step
    from plrd_jax.nn.model import init_cache

    state = {"token": jnp.zeros((1,), jnp.int32), "cache": init_cache(config, 1, cache_len)}
    key = jax.random.key(0)

    def run():
        for position in range(cache_len - steps, cache_len):
            state["token"], state["cache"] = decode_step(config, params, state["token"], position, state["cache"],
                                                         key, 0.0)
        jax.block_until_ready(state["token"])
    return run


def load_parent(args):
    """(config, params) of the parent: the checkpoint (--model), or random weights of --config-json; laid out
    as --layers says."""
    from plrd_jax.nn.config import ModelConfig
    from plrd_jax.io.load import load_model
    from plrd_jax.nn.layout import arrange_layers
    from plrd_jax.nn.model import init_params

    if args.config_json:
        with open(args.config_json) as f:
            config = ModelConfig.from_dict(json.load(f)).replace(param_dtype="float32", dtype="float32",
                                                                 scan_layers=False)
        params = init_params(config)
    else:
        config, params, _ = load_model(args.model)
    return arrange_layers(config, params, args.layers == "scanned")


def plrd_jax_heal_step(args, tokens):
    """One plrd_jax heal step (`make_heal_step`: AdamW, clip 1.0, cross-entropy) on tokens (1, B, T), as a
    function, after a warm-up step."""
    from plrd_jax.nn.sharding import make_mesh, param_shardings
    from plrd_jax.training.optim import HealConfig
    from plrd_jax.training.state import init_train_state
    from plrd_jax.training.step import make_heal_step

    config, params = load_parent(args)
    mesh = make_mesh((1, -1, 1))
    heal = HealConfig(lr=1e-5, warmup_steps=0, total_steps=100, dtype=args.dtype)
    shardings = param_shardings(params, mesh)
    step = make_heal_step(config, heal, mesh, shardings)
    box = [init_train_state(params, heal, mesh, shardings)]

    def run():
        box[0], metrics = step(box[0], tokens, None)
        jax.block_until_ready(metrics)

    run()
    return run


def torch_heal_step(args, tokens):
    """One HF transformers AdamW step (clip 1.0, its own cross-entropy) on tokens (1, B, T), as a function,
    after a warm-up step. On a GPU float32 master weights and bf16 autocast (as ours); on the CPU weights in the
    compute dtype."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from plrd_jax.io.hf import config_to_hf
    from plrd_jax.io.load import embedded_path

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    weights_dtype = torch.float32 if device == "cuda" else dtype
    if args.config_json:
        config, _ = load_parent(args)
        hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(config))).to(device=device, dtype=weights_dtype).train()
    else:
        path = str(embedded_path(args.model))
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=weights_dtype).to(device).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    t_tokens = torch.from_numpy(tokens[0].astype(np.int64)).to(device)
    autocast = (torch.autocast("cuda", dtype=dtype) if device == "cuda" and dtype != torch.float32
                else contextlib.nullcontext())

    def run():
        with autocast:
            loss = hf(t_tokens, labels=t_tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--fractions", default="0.75,0.5,0.25",
                    help="members: uniform rank = fraction · d on every attention and MLP matrix")
    ap.add_argument("--family", default=None, help="members: those of this family directory instead")
    ap.add_argument("--budgets", default=None, help="members: at these fractions of the parent's parameters instead")
    ap.add_argument("--multiple-of", default="1", help="with --budgets: round ranks to a multiple of each of these")
    ap.add_argument("--peak-gflops", type=float, default=165.0)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--also-default-malloc", action="store_true",
                    help="also time each heal step with glibc's default malloc, in the same round robin")
    ap.add_argument("--forward-only", action="store_true", help="time the members only, no heal steps")
    ap.add_argument("--no-attention-core", action="store_true",
                    help="time the members with the attention core (QKᵀ, softmax, P·V) replaced by a pass-through "
                         "and the FLOP ratio without its FLOPs: what the rest of the model gains, not a model "
                         "(no heal steps)")
    ap.add_argument("--layers", choices=["scanned", "unrolled"], default="scanned",
                    help="how our side runs the parent's and every member's layers (members whose layers differ "
                         "run unrolled either way), as `family --layers` does")
    ap.add_argument("--json", default=None)
    ap.add_argument("--config-json", default=None, help="random weights of this ModelConfig JSON (speed only)")
    args = ap.parse_args()
    keep_freed_memory()  # restarts this script once, with malloc keeping freed memory (see timing.py)

    from plrd_jax.io.load import cast, load_model
    from plrd_jax.nn.layout import arrange_layers, unstack_layers
    from plrd_jax.nn.model import Decoder
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.nn.accounting import model_flops_per_token
    from plrd_jax.transforms.factorize import factorize
    from plrd_jax.transforms.plan import RankPlan

    if args.config_json and not os.path.isfile(args.config_json):
        raise SystemExit(f"error: --config-json {args.config_json}: no such file")
    forward_only = args.forward_only or args.no_attention_core  # heal figures would not be the ablation's
    if forward_only and args.also_default_malloc:
        raise SystemExit("error: --also-default-malloc times heal steps, which --forward-only and "
                         "--no-attention-core skip")
    if args.no_attention_core and jax.default_backend() == "gpu" and args.dtype != "float32":
        raise SystemExit("error: --no-attention-core stands in for masked_attention, which bf16 on a GPU does not use "
                         "(cuDNN's fused attention)")
    if args.seq_len < DECODE_STEPS:
        raise SystemExit(f"error: --seq-len {args.seq_len}: the decode latency needs at least {DECODE_STEPS} positions")
    if args.family:  # checked before the minutes of heal steps
        from plrd_jax.io.store import FamilyStore, StoreError

        try:
            if not FamilyStore(args.family, read_only=True).members():
                raise StoreError(f"family directory {args.family} holds no members")
        except StoreError as e:
            raise SystemExit(f"error: --family: {e}") from None
    config, params = load_parent(args)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (1, args.batch, args.seq_len)).astype(np.int32)
    n_tokens = args.batch * args.seq_len
    out = {"model": args.config_json or args.model, "batch": args.batch, "seq_len": args.seq_len,
           "dtype": args.dtype, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "attention_core": not args.no_attention_core}

    # Heal steps first, while this process holds nothing but the parent (its threads stay idle).
    steps = {} if forward_only else {"plrd_jax": (plrd_jax_heal_step, (args, tokens))}
    if not (args.skip_torch or forward_only):
        steps["torch"] = (torch_heal_step, (args, tokens))
    if args.also_default_malloc:
        steps.update({f"{name}_default_malloc": (*step, "") for name, step in list(steps.items())})
    heal = process_round_robin(steps, rounds=args.steps) if steps else {}
    flops = model_flops_per_token(config, args.seq_len, training=True)
    for name, (s, faults) in heal.items():
        out[f"{name}_heal_tokens_per_s"] = n_tokens / s
        out[f"{name}_heal_mfu"] = n_tokens / s * flops / (args.peak_gflops * 1e9)
        out[f"{name}_heal_page_faults_per_step"] = int(faults)
    if "torch" in heal:
        out["heal_ratio"] = heal["torch"][0] / heal["plrd_jax"][0]
    if "torch_default_malloc" in heal:
        out["heal_ratio_default_malloc"] = heal["torch_default_malloc"][0] / heal["plrd_jax_default_malloc"][0]

    # Forward latency of members against their FLOP ratio.
    x = jnp.asarray(tokens[0])
    rows = []
    flop_len = 0 if args.no_attention_core else args.seq_len  # T = 0: 2N, the matmuls' FLOPs alone
    parent_flops = model_flops_per_token(config, flop_len, training=False)
    def members():
        scan = args.layers == "scanned"
        yield "parent", config, params
        if args.family:  # the members of a stored family, by name
            from plrd_jax.io.store import FamilyStore

            for meta in FamilyStore(args.family, read_only=True).members():
                cfg, p, _ = load_model(f"{args.family}:{meta['member']}")
                yield meta["name"], *arrange_layers(cfg, p, scan)
            return
        per_layer, per_layer_config = unstack_layers(params), config.replace(scan_layers=False)
        if args.budgets:  # members at these fractions of the parent's parameters, ranks rounded to --multiple-of
            n = count_params(params)
            for budget in [float(f) for f in args.budgets.split(",")]:
                for multiple in [int(m) for m in args.multiple_of.split(",")]:
                    plan = RankPlan(("attn", "mlp"), budget=int(budget * n), multiple_of=multiple)
                    p, cfg = factorize(per_layer, plan, per_layer_config)
                    yield f"{round(100 * budget)}% (ranks × {multiple})", *arrange_layers(cfg, p, scan)
            return
        for fraction in [float(f) for f in args.fractions.split(",") if f]:
            p, cfg = factorize(per_layer, RankPlan(("attn", "mlp"), fraction=fraction), per_layer_config)
            yield f"rank {round(fraction * config.hidden_size)}", *arrange_layers(cfg, p, scan)

    compiled = []
    ablation = (mock.patch("plrd_jax.nn.model.masked_attention", values_passthrough) if args.no_attention_core
                else contextlib.nullcontext())
    with ablation:  # traced (and compiled) inside: the executables keep the stand-in
        for name, cfg, p in members():
            if args.dtype != "float32":
                cfg, p = cast(cfg, p, args.dtype)
            fwd = jax.jit(lambda p, t, cfg=cfg: Decoder(cfg).apply({"params": p}, t))
            fwd(p, x).block_until_ready()
            decode = decode_steps(cfg, p, args.seq_len, DECODE_STEPS)
            decode()
            compiled.append((name, cfg, p, fwd, decode))
    # round robin, so that a slow spell of the machine hits every member
    rounds = max(args.steps, 5)
    seconds = round_robin_medians({name: (lambda p=p, fwd=fwd: fwd(p, x).block_until_ready())
                                   for name, _, p, fwd, _ in compiled}, rounds)
    decode_seconds = round_robin_medians({name: decode for name, *_, decode in compiled}, rounds)
    for name, cfg, *_ in compiled:
        rows.append({"member": name, "seconds": seconds[name], "decode_seconds": decode_seconds[name] / DECODE_STEPS,
                     "flop_ratio": parent_flops / model_flops_per_token(cfg, flop_len, training=False)})
    del compiled
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
        r["speedup_over_flop_ratio"] = r["speedup"] / r["flop_ratio"]
        r["decode_speedup_over_flop_ratio"] = rows[0]["decode_seconds"] / r["decode_seconds"] / r["flop_ratio"]
    out["members"] = rows

    if "plrd_jax" in heal:
        print(f"heal step {args.batch}×{args.seq_len} {args.dtype} on {out['device']}: plrd_jax MFU "
              f"{100 * out['plrd_jax_heal_mfu']:.0f}% of {args.peak_gflops:.0f} GFLOP/s"
              + (f", ratio to HF torch {out['heal_ratio']:.2f}×" if "heal_ratio" in out else ""))
    for name in heal:
        print(f"  {name}: {out[f'{name}_heal_tokens_per_s']:.0f} tok/s, "
              f"{out[f'{name}_heal_page_faults_per_step']} page faults per step")
    if "heal_ratio_default_malloc" in out:
        print(f"  ratio with glibc's default malloc: {out['heal_ratio_default_malloc']:.2f}×")
    if args.no_attention_core:
        print("members without the attention core (a pass-through in its place; FLOP ratio without its FLOPs):")
    print("| member | forward s | speed-up | FLOP ratio | speed-up / FLOP ratio | decode ms/token | decode speed-up / "
          "FLOP ratio |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['member']} | {r['seconds']:.3f} | {r['speedup']:.2f} | {r['flop_ratio']:.2f} | "
              f"{r['speedup_over_flop_ratio']:.2f} | {1e3 * r['decode_seconds']:.1f} | "
              f"{r['decode_speedup_over_flop_ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
