"""Head-to-head on the embedded parent: Sheared-LLaMA (prune + continue) against PLRD (plain SVD) and PLRD with
whitened (SVD-LLM) factors, at ≈75% and ≈50% of the parent's non-embedding parameters and equal total tokens.

    python experiments/shear_vs_plrd.py [--steps 32] [--prune-steps 12] [--batch 4] [--seq-len 128]
        [--lr 2e-4] [--work /tmp/shear_vs_plrd] [--out experiments/results] [--skip-domains]

Each member starts from the parent (SmolLM2-135M-Instruct, 30 layers, d 576, 9 heads / 3 kv, 1536) and trains
for the same number of tokens, `steps × batch × seq_len`, on the same text (WikiText-2's healing half, packed in
windows of seq_len), with the same model optimizer (AdamW lr, 10% warmup, cosine to 10%, betas (0.9, 0.95),
clip 1.0):
  sheared          pruning on the tokens of `prune_steps` steps, read as batches of `prune_batch` (default the
                   same batch; 1 gives four times as many mask updates on the same tokens), with learned masks
                   and the Lagrangian (plrd_jax.methods.sheared); the final masks folded into a dense model of exactly the
                   target shape, then `steps − prune_steps` steps of continued training; one domain, so dynamic
                   loading has nothing to move
  plrd-svd         a rank plan over every attention and MLP matrix with the Sheared member's exact parameter count
                   (`RankPlan(budget=...)`), plain truncated SVD, then `steps` healing steps
  plrd-whitened    the same ranks from whitened factors (SVD-LLM; XᵀX over 16 × 512 tokens of the healing text)
Targets (layers, hidden, heads / kv heads, intermediate): 75% = (28, 528, 6/3, 1408): every group keeps 2 of its
3 query heads; 50% = (22, 480, 6/2, 1344): a whole kv group dropped per layer. (Hidden sizes are multiples of
the head count: transformers' LlamaConfig refuses others even with head_dim given.) Evaluation: WikiText-2's other half (the
last 31 articles), first 8 windows of 512 tokens, disjoint from every training text.
Unless --skip-domains, one more Sheared member at 50% reads three domains (wikitext, shakespeare, pydoc) by
dynamic batch loading with the parent's per-domain losses as references (its domain weights are plotted).
The Sheared members are exported to Hugging Face safetensors and their transformers logits compared with ours.
Writes shear_vs_plrd.{md,csv,json,png} and shear_domain_weights.png into --out; resumes from --work.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

PARENT = "smollm2-135m"
TARGETS = {"75%": (28, 528, 6, 3, 1408), "50%": (22, 480, 6, 2, 1344)}  # layers, hidden, heads, kv, inter


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def non_embedding(params) -> int:
    return sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params) if p[0].key != "embed")


def heal_member(config, params, heal_data, args, seed=0):
    """`args.steps` healing steps (plrd_jax.training.loop.heal) on heal_data's windows in order; returns healed
    params."""
    from plrd_jax.training.loop import heal
    from plrd_jax.training.optim import HealConfig

    config_heal = HealConfig(lr=args.lr, warmup_steps=max(1, round(0.1 * args.steps)), total_steps=args.steps)

    def report(kind, info):
        if kind == "step" and (info["step"] % 8 == 1 or info["step"] == args.steps):
            log(f"    step {info['step']}/{args.steps} loss {info['loss']:.3f}")
    params, _ = heal(config, params, config_heal,
                     lambda t: heal_data.batch_at(t, args.batch, seed).reshape(1, args.batch, args.seq_len),
                     on_event=report)
    return params


def hf_logits_check(member_dir, config, params, tokenizer, windows) -> float:
    """Max |logit difference| between transformers (the exported checkpoint) and us on `windows`."""
    import torch
    from transformers import AutoModelForCausalLM

    from plrd_jax.io.hf import save_hf
    from plrd_jax.nn.model import Decoder

    save_hf(params, config, member_dir, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(member_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(windows, dtype=torch.long)).logits.numpy()
    ours = np.asarray(Decoder(config).apply({"params": params}, windows))
    return float(np.abs(theirs - ours).max()), float(np.abs(ours).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=32, help="training steps per member (all methods)")
    ap.add_argument("--prune-steps", type=int, default=12, help="of which Sheared prunes (in token terms)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prune-batch", type=int, default=4,
                    help="Sheared's pruning batch: prune_steps × batch / prune_batch mask updates on the same tokens")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", default="/tmp/shear_vs_plrd")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--skip-domains", action="store_true")
    args = ap.parse_args()

    import plrd_jax.data.dynamic_loading as dl
    import plrd_jax.nn.masks as M
    from plrd_jax.transforms.calibrate import calibrate
    from plrd_jax.data.windows import load_dataset
    from plrd_jax.evaluation.perplexity import perplexity
    from plrd_jax.io.load import load_model
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.reporting.plots import plot_ppl_vs_params
    from plrd_jax.reporting.tables import markdown_table, write_csv
    from plrd_jax.methods.sheared import ShearMember, ShearSchedule, run_shear
    from plrd_jax.io.store import FamilyStore, load_member
    from plrd_jax.training.optim import HealConfig
    from plrd_jax.transforms.factorize import reduce_rank
    from plrd_jax.transforms.plan import RankPlan

    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    state_path = os.path.join(args.work, "results.json")
    done = json.load(open(state_path)) if os.path.exists(state_path) else {}

    def record(key, row):
        done[key] = row
        with open(state_path, "w") as f:
            json.dump(done, f, indent=1)

    config, params, tokenizer = load_model(PARENT)
    parent_count, parent_nonembed = count_params(params), non_embedding(params)
    heal_data = load_dataset("wikitext2-heal", tokenizer, args.seq_len)
    evals = load_dataset("wikitext2-eval", tokenizer, 512, max_windows=8).windows
    tokens = args.steps * args.batch * args.seq_len
    if "parent" not in done:
        record("parent", {"ppl": perplexity(config, params, evals, batch_size=4).ppl})
    log(f"parent {parent_count:,} params ({parent_nonembed:,} non-embedding), PPL {done['parent']['ppl']:.3f}; "
        f"{tokens:,} tokens per member")

    # ---- Sheared: one run, both sizes, one domain (the same text as PLRD) ----
    heal = HealConfig(lr=args.lr, warmup_steps=0, total_steps=1)
    prune_tokens = args.prune_steps * args.batch * args.seq_len
    members = tuple(ShearMember(f"sheared-{size}", M.TargetShape(L, d, H, m, kv), prune_tokens,
                                tokens - prune_tokens) for size, (L, d, H, kv, m) in TARGETS.items())
    schedule = ShearSchedule(members, dl.Domains(("wikitext",), (1.0,), update_every=10 ** 6),
                             batch_size=args.prune_batch, continue_batch_size=args.batch, seq_len=args.seq_len, prune=heal, heal=heal,
                             prune_warmup_fraction=0.1, continue_warmup_fraction=0.1, continue_update_every=10 ** 6,
                             validation_windows=4)
    family = os.path.join(args.work, "family")
    store = FamilyStore(family)
    if not os.path.isdir(os.path.join(family, "tokenizer")):
        tokenizer.save(os.path.join(family, "tokenizer"))

    def on_event(kind, info):
        if kind == "step" and (info["step"] % 4 == 0 or info["step"] == info["steps"]):
            extra = (f" expected size {info['expected_size'] / info['target_size']:.2f}× target"
                     if info["phase"] == "prune" else "")
            log(f"    {info['name']} {info['phase']} {info['step']}/{info['steps']} CE {info['ce']:.3f}{extra}")
        elif kind in ("eval", "weights", "member", "stage"):
            log(f"  {kind}: " + ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("result",)))

    t0 = time.perf_counter()
    results = run_shear(PARENT, config, params, schedule, {"wikitext": heal_data.windows}, evals, store,
                        seed=0, on_event=on_event, data_spec={"heal": heal_data.spec})
    store.close()
    for r in results:
        size = r.name.split("-")[1]
        if f"sheared/{size}" not in done:
            mconfig, member_params, _ = load_member(f"{family}:{r.name}")
            diff, scale = hf_logits_check(os.path.join(args.work, "hf", r.name), mconfig, member_params, tokenizer,
                                          evals[:1, :128])
            record(f"sheared/{size}", {"method": "sheared", "size": size, "params": r.params,
                                       "non_embedding": non_embedding(member_params), "ppl_before": r.ppl_before["eval"],
                                       "ppl_after": r.ppl_after["eval"], "tokens": r.tokens, "wall_s": r.wall_s,
                                       "shape": r.shape, "prune_tokens": r.prune_tokens,
                                       "hf_max_abs_logit_diff": diff, "max_abs_logit": scale})
            log(f"  {r.name}: shape {r.shape} exported; transformers logits differ by at most {diff:.2e}")
    log(f"sheared done in {time.perf_counter() - t0:.0f}s")

    # ---- PLRD: the same parameter counts, plain SVD and whitened factors ----
    stats = None
    for size in TARGETS:
        count = done[f"sheared/{size}"]["params"]
        for method in ("svd", "whitened"):
            key = f"plrd-{method}/{size}"
            if key in done:
                continue
            t0 = time.perf_counter()
            if method == "whitened" and stats is None:
                calib = load_dataset("wikitext2-heal", tokenizer, 512, max_windows=16).windows
                stats = calibrate(config, params, calib, batch_size=4)
            member, mconfig = reduce_rank(params, RankPlan(("attn", "mlp"), budget=count), config,
                                          stats=stats if method != "svd" else None, decomposition=method)
            before = perplexity(mconfig, member, evals, batch_size=4).ppl
            log(f"  {key}: {count_params(member):,} params, PPL before healing {before:.4g}")
            member = heal_member(mconfig, member, heal_data, args)
            after = perplexity(mconfig, member, evals, batch_size=4).ppl
            ranks = sorted({s.rank for _, s in mconfig.linears})
            record(key, {"method": f"plrd-{method}", "size": size, "params": count_params(member),
                         "non_embedding": non_embedding(member), "ppl_before": before, "ppl_after": after,
                         "tokens": tokens, "wall_s": time.perf_counter() - t0, "ranks": [min(ranks), max(ranks)]})
            log(f"  {key}: PPL {before:.4g} -> {after:.4g} in {time.perf_counter() - t0:.0f}s")

    # ---- Sheared with dynamic batch loading over three domains (50%) ----
    if not args.skip_domains and "sheared-domains/50%" not in done:
        sources = dl.resolve_sources(dl.LOCAL_DOMAINS)
        windows = {n: load_dataset(s, tokenizer, args.seq_len).windows for n, s in sources.items()}
        multi = dataclasses.replace(schedule, members=(dataclasses.replace(members[1], name="sheared-50%-3dom"),),
                                    domains=dl.Domains(tuple(sources), (1 / 3,) * 3, update_every=8),
                                    continue_update_every=5)
        store = FamilyStore(os.path.join(args.work, "family-domains"))
        t0 = time.perf_counter()
        (r,) = run_shear(PARENT, config, params, multi, windows, evals, store, seed=0, on_event=on_event)
        store.close()
        record("sheared-domains/50%", {"method": "sheared, 3 domains", "size": "50%", "params": r.params,
                                       "ppl_before": r.ppl_before["eval"], "ppl_after": r.ppl_after["eval"], "tokens": r.tokens,
                                       "wall_s": r.wall_s, "shape": r.shape, "domains": list(sources),
                                       "domain_weights": r.domain_weights})

    # ---- table, plot ----
    rows, series = [["parent", "", f"{parent_count:,}", "100.0", f"{done['parent']['ppl']:.2f}", "", "0", ""]], {}
    for key, row in done.items():
        if key == "parent":
            continue
        rows.append([row["method"], row["size"], f"{row['params']:,}",
                     f"{100 * (row['params'] - (parent_count - parent_nonembed)) / parent_nonembed:.1f}",
                     f"{row['ppl_before']:.4g}", f"{row['ppl_after']:.4g}", f"{row['tokens']:,}",
                     f"{row['wall_s']:.0f}"])
        series.setdefault(f"{row['method']}, trained", []).append((row["params"], row["ppl_after"]))
    columns = ("method", "target", "params", "% of parent non-embedding", "PPL after transform", "PPL after training",
               "tokens", "wall s")
    table = markdown_table(rows, columns)
    with open(os.path.join(args.out, "shear_vs_plrd.md"), "w") as f:
        f.write(table)
    write_csv(os.path.join(args.out, "shear_vs_plrd.csv"), rows, columns)
    with open(os.path.join(args.out, "shear_vs_plrd.json"), "w") as f:
        json.dump({"settings": vars(args), "targets": TARGETS, "results": done}, f, indent=1)
    plot_ppl_vs_params(os.path.join(args.out, "shear_vs_plrd.png"), series, (parent_count, done["parent"]["ppl"]),
                       title=f"Sheared vs PLRD at {tokens:,} training tokens")
    if "sheared-domains/50%" in done:
        row = done["sheared-domains/50%"]
        history = tuple((s, tuple(w)) for s, w in row["domain_weights"])
        dl.plot_weights(os.path.join(args.out, "shear_domain_weights.png"), dl.LoaderState((), (), history),
                        row["domains"], title="Dynamic batch loading, sheared-50% (pruning, then continued)")
    print(table)


if __name__ == "__main__":
    main()
