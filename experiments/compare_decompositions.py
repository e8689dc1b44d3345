"""Decompositions × rank allocations on the embedded parent: WikiText-2 perplexity at 10–50 % parameter reduction
before healing, then after one small healing budget for the best two (and plain SVD), sparse-plus-low-rank
members, and the reproduction of the reference numbers of docs/methods.md §7.

    python experiments/compare_decompositions.py [--out experiments/results] [--cache /tmp/plrd_decompositions]
        [--reductions 0.1,0.2,0.3,0.4,0.5] [--decompositions svd,whitened,asvd,fisher]
        [--allocations uniform,energy,sensitivity] [--extra whitened/sensitivity-fisher] [--heal-steps 24]
        [--no-heal] [--no-reference]

Setup (fixed, so the numbers compare):
  parent       smollm2-135m (the embedded GGUF, dequantized to float32), 134.5M parameters
  calibration  wikitext2-heal (the first 31 articles of wiki.test.raw), its first 32 windows of 512 tokens
               (16,384 tokens), XᵀX, mean |x| and per-window Fisher rows (`plrd_jax.transforms.calibrate`, fisher=True)
  evaluation   wikitext2-eval (the other 31 articles, disjoint), its first 8 windows of 512 tokens:
               mean NLL over 8 × 511 = 4,088 predicted tokens (`plrd_jax.evaluation.perplexity.perplexity`)
  members      every q, k, v, o, gate, up, down of the 30 layers may be factorized (or kept dense); ranks are
               multiples of 8; a member at reduction x has (1 − x) · 134.5M parameters (embeddings included),
               within 1 % (`allocate_ranks`)
  allocation   uniform (one rank fraction), energy (one spectrum-energy level of the decomposition's own
               spectrum), sensitivity (Σ relative output error ‖X(K − K_r)‖²/‖XK‖² minimized, greedy);
               extra pairs (--extra): sensitivity-fisher (the Fisher estimate of the loss increase, greedy)
  healing      the best two (decomposition, allocation) pairs by the geometric mean of their PPL over the
               reductions (and plain svd/uniform with --heal-baseline), at 20 % and 40 %: factorized members,
               next-token CE, AdamW lr 2e-4 (4 warmup steps, cosine to 10 %), betas (0.9, 0.95), wd 0, clip 1,
               4 × 256 tokens per step from the start of wikitext2-heal, `--heal-steps` steps
Members are scored as their dense reconstruction K_r = A B (the same function, one compiled model for all);
`check` in the results compares that with the factorized member once.
Writes decompositions.{md,csv,json}, decompositions_ppl.png and decompositions_ranks_*.png under --out; the
run resumes from --cache/results.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # LAPACK's own threads fight XLA's on a small CPU

import argparse
import gc
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

SEQ_LEN, EVAL_WINDOWS, CALIB_WINDOWS, MULTIPLE_OF = 512, 8, 32, 8
HEAL_BATCH, HEAL_SEQ = 4, 256
MATRICES = ("attn", "mlp")
# WikiText-2 PPL of LLaMA-7B at 20 % parameter reduction, no healing (SVD-LLM, Table 1; docs/methods.md §6).
PUBLISHED_20 = {"dense": 5.68, "svd": 20061, "fisher": 1727, "asvd": 11.14, "whitened": 7.94}
# The reference numbers of docs/methods.md §7 (HF transformers + torch, float64 whitening).
REFERENCE = {("svd", 256): 1.1e7, ("whitened", 256): 526, ("svd", 128): 1.4e7, ("whitened", 128): 13200}


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def set_node(tree, path, node):
    """A copy of `tree` with the dict at `path` replaced (only the dicts on the way are copied)."""
    key, _, rest = path.partition("/")
    out = dict(tree)
    out[key] = node if not rest else set_node(tree[key], rest, node)
    return out


def get_node(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def reconstructed(params, spectra, ranks):
    """params with each kernel in `ranks` replaced by its rank-r approximation left_r · diag(s_r) · right_r."""
    for path, r in ranks.items():
        sp = spectra[path]
        kernel = jnp.matmul(sp.left[:, :r] * sp.s[:r], sp.right[:r], precision="highest")
        params = set_node(params, path, {**get_node(params, path), "kernel": kernel.astype(jnp.float32)})
    return params


def densified(params, ranks):
    """Sparse-plus-low-rank / low-rank member -> dense kernels A B (+ S) for the paths in ranks."""
    for path in ranks:
        node = get_node(params, path)
        kernel = jnp.matmul(node["A"], node["B"], precision="highest")
        if "values" in node:
            kernel = kernel.reshape(-1).at[node["indices"]].add(node["values"]).reshape(kernel.shape)
        params = set_node(params, path, {"kernel": kernel})
    return params


def allocation_args(name):
    """"sensitivity-fisher" -> allocation "sensitivity" with the Fisher cost; other names as they are."""
    allocation, _, sensitivity = name.partition("-")
    return {"allocation": allocation, **({"sensitivity": sensitivity} if sensitivity else {})}


def geometric_mean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def fmt(x):
    if x is None:
        return ""
    return f"{x:.3g}" if x < 1e5 else f"{x:.2e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--cache", default="/tmp/plrd_decompositions")
    ap.add_argument("--reductions", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--decompositions", default="svd,whitened,asvd,fisher")
    ap.add_argument("--allocations", default="uniform,energy,sensitivity")
    ap.add_argument("--extra", default="whitened/sensitivity-fisher", help="more decomposition/allocation pairs")
    ap.add_argument("--heal-steps", type=int, default=24)
    ap.add_argument("--heal-reductions", default="0.2,0.4")
    ap.add_argument("--sparse-density", type=float, default=0.02)
    ap.add_argument("--no-heal", action="store_true")
    ap.add_argument("--heal-baseline", action="store_true", help="also heal plain svd / uniform")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--calib-windows", type=int, default=CALIB_WINDOWS, help="fewer for a quick check only")
    ap.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS, help="fewer for a quick check only")
    args = ap.parse_args()

    from plrd_jax.transforms.calibrate import MatrixStats, calibrate
    from plrd_jax.data.corpora import load_documents
    from plrd_jax.data.windows import load_dataset, pack, tokenize
    from plrd_jax.evaluation.perplexity import perplexity
    from plrd_jax.io.load import load_model
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.reporting.plots import plot_rank_heatmap
    from plrd_jax.transforms.decompositions import describe_scaling
    from plrd_jax.transforms.factorize import factorize
    from plrd_jax.transforms.sparse import sparse_plus_lowrank
    from plrd_jax.transforms.allocate import allocate_ranks, compute_spectra, selected_paths

    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    results_path = os.path.join(args.cache, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}

    def save():
        with open(results_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(results_path + ".tmp", results_path)

    config, params, tokenizer = load_model("smollm2-135m")
    n_parent = count_params(params)
    eval_data = load_dataset("wikitext2-eval", tokenizer, SEQ_LEN, max_windows=args.eval_windows)
    calib_data = load_dataset("wikitext2-heal", tokenizer, SEQ_LEN, max_windows=args.calib_windows)
    results["setup"] = {"parent": "smollm2-135m", "parent_params": n_parent, "eval": eval_data.spec,
                        "calibration": calib_data.spec, "multiple_of": MULTIPLE_OF, "matrices": list(MATRICES)}

    def ppl(model_params, model_config=config):
        return perplexity(model_config, model_params, eval_data.windows, batch_size=4).ppl

    if "parent_ppl" not in results:
        results["parent_ppl"] = ppl(params)
        save()
    log(f"parent: {n_parent:,} params, PPL {results['parent_ppl']:.3f}")

    stats_path = os.path.join(args.cache, "stats.npz")
    if os.path.exists(stats_path) and "calibration_s" in results:
        stored = np.load(stats_path)
        stats = {p: MatrixStats(*(jnp.asarray(stored[f"{p}|{f}"]) for f in MatrixStats._fields))
                 for p in {k.split("|")[0] for k in stored.files}}
    else:
        t = time.perf_counter()
        stats = calibrate(config, params, calib_data.windows, batch_size=4, fisher=True,
                          progress=lambda done, total: log(f"calibration {done}/{total} windows"))
        jax.block_until_ready(stats)
        results["calibration_s"] = round(time.perf_counter() - t, 1)
        np.savez(stats_path, **{f"{p}|{f}": np.asarray(getattr(s, f)) for p, s in stats.items()
                                for f in MatrixStats._fields})
        save()
    log(f"calibration with Fisher rows: {results['calibration_s']} s")

    reductions = [float(x) for x in args.reductions.split(",")]
    decompositions = args.decompositions.split(",")
    allocations = args.allocations.split(",")
    combos = [(d, a) for d in decompositions for a in allocations]
    combos += [tuple(c.split("/")) for c in args.extra.split(",") if c and tuple(c.split("/")) not in combos]
    paths = selected_paths(params, MATRICES)
    members = results.setdefault("members", {})
    shapes = {p: config.matrix_shape(p) for p in config.matrix_paths()}

    # ---- the grid, before healing ----
    for dec in dict.fromkeys(d for d, _ in combos):
        todo = [(a, x) for d, a in combos if d == dec for x in reductions if f"{dec}/{a}/{x}" not in members]
        if not todo:
            continue
        t = time.perf_counter()
        spectra = compute_spectra(params, paths, dec, stats)
        jax.block_until_ready(spectra)
        kinds: dict[str, int] = {}
        for p in paths:
            kind = describe_scaling(spectra[p].scaling)
            kinds[kind] = kinds.get(kind, 0) + 1
        results.setdefault("scalings", {})[dec] = kinds
        results.setdefault("spectra_s", {})[dec] = round(time.perf_counter() - t, 1)
        log(f"{dec}: spectra of {len(paths)} matrices in {results['spectra_s'][dec]} s, scalings {kinds}")
        for alloc, x in todo:
            t = time.perf_counter()
            budget = int(round((1 - x) * n_parent))
            result = allocate_ranks(params, budget, multiple_of=MULTIPLE_OF, decomposition=dec, stats=stats,
                                    spectra=spectra, **allocation_args(alloc))
            value = ppl(reconstructed(params, spectra, result.ranks))
            members[f"{dec}/{alloc}/{x}"] = {"decomposition": dec, "allocation": alloc, "reduction": x,
                                             "params": result.params, "ppl": value, "ranks": result.ranks,
                                             "seconds": round(time.perf_counter() - t, 1)}
            log(f"{dec}/{alloc} at {x:.0%}: {result.params:,} params, PPL {value:.4g}")
            save()
        if "check" not in results and dec == "whitened":  # the dense reconstruction is the factorized member
            key = f"whitened/{allocations[0]}/{reductions[1 if len(reductions) > 1 else 0]}"
            member, member_config = factorize(params, members[key]["ranks"], config, stats=stats,
                                              decomposition="whitened")
            results["check"] = {"member": key, "reconstruction_ppl": members[key]["ppl"],
                                "factorized_ppl": ppl(member, member_config),
                                "factorized_params": count_params(member)}
            log(f"check {results['check']}")
            save()
        del spectra

    score = {c: geometric_mean([members[f"{c[0]}/{c[1]}/{x}"]["ppl"] for x in reductions]) for c in combos}
    ranking = sorted(combos, key=score.get)
    results["ranking"] = [{"decomposition": d, "allocation": a, "geometric_mean_ppl": score[(d, a)]}
                          for d, a in ranking]
    best = ranking[0]
    save()
    for x in (0.2, 0.4):
        key = f"{best[0]}/{best[1]}/{x}"
        if key in members:
            plot_rank_heatmap(os.path.join(args.out, f"decompositions_ranks_{best[0]}_{best[1]}_{round(x * 100)}.png"),
                              members[key]["ranks"], shapes,
                              f"{best[0]} + {best[1]} at {x:.0%} reduction: ranks (– dense)")

    # ---- sparse-plus-low-rank members of the best decomposition ----
    sparse = results.setdefault("sparse", {})
    spectra = None
    for x in [float(v) for v in args.heal_reductions.split(",")]:
        for alloc in dict.fromkeys(["uniform", best[1]]):
            key = f"{best[0]}/{alloc}/{x}/{args.sparse_density}"
            if key in sparse:
                continue
            if spectra is None:
                spectra = compute_spectra(params, paths, best[0], stats)
            budget = int(round((1 - x) * n_parent))
            result = allocate_ranks(params, budget, multiple_of=MULTIPLE_OF, decomposition=best[0], stats=stats,
                                    spectra=spectra, sparse_density=args.sparse_density, **allocation_args(alloc))
            member, _ = sparse_plus_lowrank(params, result.ranks, density=args.sparse_density, support="activation",
                                            decomposition=best[0], stats=stats, spectra=spectra)
            value = ppl(densified(member, result.ranks))
            sparse[key] = {"decomposition": best[0], "allocation": alloc, "reduction": x,
                           "density": args.sparse_density, "support": "activation",
                           "params": count_params(member), "ppl": value}
            log(f"sparse {key}: {count_params(member):,} params, PPL {value:.4g}")
            save()
    del spectra

    # ---- healing ----
    if not args.no_heal:
        from plrd_jax.nn.sharding import make_mesh
        from plrd_jax.training.loop import heal as heal_params
        from plrd_jax.training.optim import HealConfig

        heal_data = load_dataset("wikitext2-heal", tokenizer, HEAL_SEQ)
        heal = HealConfig(lr=2e-4, warmup_steps=min(4, args.heal_steps), total_steps=args.heal_steps, b1=0.9,
                          b2=0.95, weight_decay=0.0, clip=1.0)
        mesh = make_mesh((1, -1, 1))
        healed = results.setdefault("healed", {})
        jax.clear_caches()  # the grid's compiled models; healing compiles one step per member
        gc.collect()
        for dec, alloc in dict.fromkeys([*ranking[:2], *([("svd", "uniform")] if args.heal_baseline else [])]):
            for x in [float(v) for v in args.heal_reductions.split(",")]:
                key = f"{dec}/{alloc}/{x}/{args.heal_steps}"
                if key in healed or f"{dec}/{alloc}/{x}" not in members:
                    continue
                t = time.perf_counter()
                member, member_config = factorize(params, members[f"{dec}/{alloc}/{x}"]["ranks"], config,
                                                  stats=stats, decomposition=dec)
                healed_params, history = heal_params(member_config, member, heal, lambda k: heal_data.batch_at(
                    k, HEAL_BATCH)[None], steps=args.heal_steps, mesh=mesh)
                losses = [m["loss"] for m in history]
                value = ppl(healed_params, member_config)
                healed[key] = {"decomposition": dec, "allocation": alloc, "reduction": x,
                               "params": count_params(healed_params), "ppl_before": members[f"{dec}/{alloc}/{x}"]["ppl"],
                               "ppl_after": value, "steps": args.heal_steps,
                               "tokens": args.heal_steps * HEAL_BATCH * HEAL_SEQ, "losses": losses,
                               "seconds": round(time.perf_counter() - t, 1)}
                log(f"healed {key}: PPL {members[f'{dec}/{alloc}/{x}']['ppl']:.4g} -> {value:.4g}")
                save()

    # ---- the reference setup of docs/methods.md §7 ----
    if not args.no_reference and "reference" not in results:
        tokens = tokenize(load_documents("wikitext2-test"), tokenizer)
        windows = pack(tokens, SEQ_LEN)[:EVAL_WINDOWS]
        calib = tokens[150_000:150_000 + CALIB_WINDOWS * SEQ_LEN].reshape(CALIB_WINDOWS, SEQ_LEN)
        ref_stats = calibrate(config, params, calib, batch_size=4)
        ref_paths = [p for p in paths if p.rsplit("/", 1)[1] in ("q", "o", "gate", "up", "down")]
        reference = {"parent_ppl": perplexity(config, params, windows, batch_size=4).ppl, "members": []}
        for dec in ("svd", "whitened"):
            spectra = compute_spectra(params, ref_paths, dec, ref_stats)
            for r in (256, 128):
                ranks = {p: r for p in ref_paths}
                value = perplexity(config, reconstructed(params, spectra, ranks), windows, batch_size=4).ppl
                reference["members"].append({"decomposition": dec, "rank": r, "ppl": value,
                                             "reference_ppl": REFERENCE[(dec, r)],
                                             "params": int(n_parent - sum(
                                                 np.prod(shapes[p]) - r * sum(shapes[p]) for p in ref_paths))})
                log(f"reference {dec} r={r}: PPL {value:.4g} (torch: {REFERENCE[(dec, r)]:.4g})")
            del spectra
        results["reference"] = reference
        save()

    write_report(results, args, reductions, combos, ranking)


def write_report(results, args, reductions, combos, ranking):
    from plrd_jax.reporting.tables import markdown_table, write_csv

    members, n_parent = results["members"], results["setup"]["parent_params"]
    cols = ["decomposition", "allocation"] + [f"{x:.0%}" for x in reductions]
    rows = [[d, a] + [fmt(members[f"{d}/{a}/{x}"]["ppl"]) for x in reductions] for d, a in combos]
    size_row = ["(parameters)", ""] + [f"{members[f'{combos[0][0]}/{combos[0][1]}/{x}']['params'] / 1e6:.1f}M"
                                       for x in reductions]
    write_csv(os.path.join(args.out, "decompositions.csv"), rows, cols)
    with open(os.path.join(args.out, "decompositions.json"), "w") as f:
        json.dump(results, f, indent=1)

    # plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"svd": "tab:gray", "whitened": "tab:blue", "asvd": "tab:orange", "fisher": "tab:green"}
    styles = {"uniform": "-", "energy": "--", "sensitivity": ":", "sensitivity-fisher": "-."}
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    for d, a in combos:
        ax.plot([100 * x for x in reductions], [members[f"{d}/{a}/{x}"]["ppl"] for x in reductions],
                color=colors.get(d), linestyle=styles.get(a, "-"), marker="o", markersize=3, label=f"{d} / {a}")
    for h in results.get("healed", {}).values():
        ax.plot([100 * h["reduction"]], [h["ppl_after"]], color=colors.get(h["decomposition"]), marker="*",
                markersize=11, linestyle="none")
    ax.axhline(results["parent_ppl"], color="black", linewidth=0.8, label="parent")
    ax.set_yscale("log")
    ax.set_xlabel("parameter reduction (% of 134.5M, embeddings included)")
    ax.set_ylabel("WikiText-2 PPL (8 × 512 tokens, eval half)")
    ax.set_title("SmolLM2-135M, one-shot, before healing (stars: after healing)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "decompositions_ppl.png"), dpi=110)
    plt.close(fig)

    # markdown
    s = results["setup"]
    lines = ["# Decompositions and rank allocations on SmolLM2-135M", "",
             "Produced by `python experiments/compare_decompositions.py` (setup in its docstring). Parent "
             f"{n_parent:,} parameters, PPL {results['parent_ppl']:.3f} on the evaluation text "
             f"({s['eval']['source']}, {s['eval']['windows']} windows of {s['eval']['seq_len']} tokens). "
             f"Calibration: {s['calibration']['source']}, {s['calibration']['windows']} × "
             f"{s['calibration']['seq_len']} tokens (disjoint from the evaluation text), "
             f"{results['calibration_s']} s with Fisher rows on this shared 2-core CPU.", "",
             "## WikiText-2 perplexity before healing, by parameter reduction", ""]
    table_rows = rows + ([size_row] if size_row else [])
    lines.append(markdown_table(table_rows, cols))
    gap = []
    for x in (0.2, 0.4):
        if f"svd/uniform/{x}" in members:
            plain = members[f"svd/uniform/{x}"]["ppl"]
            d, a = min(combos, key=lambda c: members[f"{c[0]}/{c[1]}/{x}"]["ppl"])
            b = members[f"{d}/{a}/{x}"]["ppl"]
            gap.append(f"- {x:.0%} reduction: best {d} / {a} PPL {fmt(b)} vs plain svd / uniform {fmt(plain)} "
                       f"({plain / b:.3g}× lower; ΔNLL {math.log(plain / b):.2f} nats/token)")
    lines += ["Best against plain SVD (uniform ranks):", ""] + gap + [""]
    lines += ["Ranking by the geometric mean of PPL over the reductions: " + ", ".join(
        f"{r['decomposition']}/{r['allocation']} {fmt(r['geometric_mean_ppl'])}" for r in results["ranking"][:4]) + ".",
        "", "Whitening factors used: " + "; ".join(
            f"{d}: " + ", ".join(f"{k} × {v}" for k, v in kinds.items()) for d, kinds in results.get("scalings", {}).items()
            if d == "whitened") + ".", ""]
    if "check" in results:
        c = results["check"]
        lines += [f"Check: {c['member']} scored as its dense reconstruction gives PPL {fmt(c['reconstruction_ppl'])}, "
                  f"as the factorized member {fmt(c['factorized_ppl'])} ({c['factorized_params']:,} parameters).", ""]
    if results.get("healed"):
        h_rows = [[h["decomposition"], h["allocation"], f"{h['reduction']:.0%}", f"{h['params'] / 1e6:.1f}M",
                   fmt(h["ppl_before"]), fmt(h["ppl_after"]), f"{h['tokens']:,}"] for h in results["healed"].values()]
        lines += ["## After the same small healing budget", "",
                  markdown_table(h_rows, ["decomposition", "allocation", "reduction", "params", "PPL before",
                                          "PPL after", "healing tokens"])]
    if results.get("sparse"):
        sp_rows = [[v["decomposition"], v["allocation"], f"{v['reduction']:.0%}", f"{v['density']:.0%}",
                    f"{v['params'] / 1e6:.1f}M", fmt(v["ppl"]),
                    fmt(members.get(f"{v['decomposition']}/{v['allocation']}/{v['reduction']}", {}).get("ppl"))]
                   for v in results["sparse"].values()]
        lines += ["## Sparse-plus-low-rank members (A B + S, values and int32 indices counted), before healing", "",
                  markdown_table(sp_rows, ["decomposition", "allocation", "reduction", "density", "params",
                                           "PPL", "PPL low-rank only, same size"])]
    pub = PUBLISHED_20
    ours = {d: members.get(f"{d}/uniform/0.2", {}).get("ppl") for d in ("svd", "fisher", "asvd", "whitened")}
    ours["dense"] = results["parent_ppl"]

    def ratio(table, key):
        return f"{table['svd'] / table[key]:.3g}×" if table.get(key) and table.get("svd") else ""

    lines += ["## Beside the published trend on LLaMA-7B (20 % reduction, WikiText-2, no healing)", "",
              markdown_table([[name, fmt(pub[key]), ratio(pub, key), fmt(ours.get(key)), ratio(ours, key)]
                              for name, key in (("plain SVD", "svd"), ("FWSVD (fisher)", "fisher"), ("ASVD", "asvd"),
                                                ("SVD-LLM whitening (whitened)", "whitened"), ("dense", "dense"))],
                             ["method", "LLaMA-7B PPL", "lower than plain SVD", "SmolLM2-135M PPL (uniform)",
                              "lower than plain SVD"]),
              "Numbers from SVD-LLM (Wang et al., 2024), Table 1, as listed in docs/methods.md §6; the 7B model is "
              "far from full rank where a 576-wide model is not, so the absolute numbers do not transfer, only the "
              "ordering.", ""]
    if "reference" in results:
        ref = results["reference"]
        lines += ["## Reproduction of docs/methods.md §7 (wikitext2-test, first 8 × 512; q, o, gate, up, down)", "",
                  f"Parent PPL here {ref['parent_ppl']:.3f} (reference 30.148).", "",
                  markdown_table([[m["decomposition"], str(m["rank"]), f"{m['params'] / 1e6:.1f}M", fmt(m["ppl"]),
                                   fmt(m["reference_ppl"])] for m in ref["members"]],
                                 ["decomposition", "rank", "params", "PPL (ours, float32)", "PPL (torch, float64)"])]
    bench = os.path.join(args.out, "decompositions_bench_calibrate.json")
    if os.path.exists(bench):
        b = json.load(open(bench))
        lines += ["## Calibration benchmark (`benchmarks/bench_calibrate.py`)", "",
                  markdown_table([["yes" if r["fisher"] else "no", f"{r['tokens']:,}", f"{r['first_call_s']}",
                                   f"{r['second_call_s']}", f"{r['tokens_per_s']}"] for r in b["runs"]],
                                 ["Fisher rows", "tokens", "first call s (compile + run)", "second call s",
                                  "tokens/s"])]
    lines += ["![PPL by reduction](decompositions_ppl.png)", ""]
    with open(os.path.join(args.out, "decompositions.md"), "w") as f:
        f.write("\n".join(lines))
    log(f"wrote {args.out}/decompositions.md, .csv, .json, decompositions_ppl.png")


if __name__ == "__main__":
    main()
