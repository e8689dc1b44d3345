"""`compress`: one member straight from a model: decomposition × rank allocation.

With --out the member is stored under a name that spells its settings, beside a fingerprint of the whole
command line: a rerun of the same command finds the finished member and says so instead of computing (and
storing) it again; another command that would store a second member of the same name is refused up front.
"""
from __future__ import annotations

import hashlib
import json
import os

from plrd_jax.cli.common import (ALLOCATIONS, DECOMPOSITIONS, DEFAULT_EVAL_DATA, DEFAULT_HEAL_DATA, DEFAULT_MODEL,
                                 check_out_dir, check_seq_len, check_sources, density_fraction, evaluation_corpora,
                                 parent_samples, positive_int, progress_bar, reduction_fraction)

RESUMES = False


def register(subparsers) -> None:
    c = subparsers.add_parser("compress", help="one member straight from a model: decomposition × rank allocation")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--reduction", type=reduction_fraction, required=True,
                   help="fraction of all parameters removed, e.g. 0.2")
    _member_flags(c)
    _data_flags(c)
    c.add_argument("--out", default=None, help="store the member here (loads as OUT:N)")
    c.set_defaults(func=run, resumes=RESUMES)


def _member_flags(c) -> None:
    c.add_argument("--decomposition", choices=DECOMPOSITIONS, default="whitened")
    c.add_argument("--alpha", type=float, default=0.5, help="asvd exponent")
    c.add_argument("--allocation", choices=ALLOCATIONS, default="uniform")
    c.add_argument("--matrices", default="attn,mlp", help="groups, globs or re: patterns, comma-separated")
    c.add_argument("--multiple-of", type=positive_int, default=8)
    c.add_argument("--sparse-density", type=density_fraction, default=0.0,
                   help="also keep a sparse part S (this fraction of each matrix's entries): A B + S members")
    c.add_argument("--sparse-method", choices=["auto", "scatter", "gather"], default="gather",
                   help="how the member applies S: gather (never a dense matrix), or by shape / via a dense "
                        "temporary (faster for long inputs on CPU)")


def _data_flags(c) -> None:
    c.add_argument("--calibration-data", default=DEFAULT_HEAL_DATA,
                   help="a source or weighted mixture (A=w,B=w), disjoint from every --eval-data corpus")
    c.add_argument("--calibration-windows", type=positive_int, default=32)
    c.add_argument("--sample-temperature", type=float, default=1.0,
                   help="temperature of the parent-samples source (text the parent writes itself)")
    c.add_argument("--sequential", action="store_true",
                   help="calibrate layer by layer: each layer's statistics from the inputs the already compressed "
                        "layers before it produce (ranks still from the one-pass statistics)")
    c.add_argument("--calibration-seq-len", type=positive_int, default=512)
    c.add_argument("--eval-data", default=DEFAULT_EVAL_DATA, help="evaluation corpora, comma-separated")
    c.add_argument("--eval-seq-len", type=positive_int, default=512)
    c.add_argument("--eval-tokens", type=positive_int, default=4096)
    c.add_argument("--data-dir", default=None, help="TFDS data_dir")


# ---- before any work ----------------------------------------------------------------------------
def member_name(args) -> str:
    return (f"{args.decomposition}-{args.allocation}{'-sequential' if args.sequential else ''}-"
            f"{round(100 * args.reduction)}%" + (f"-sparse{args.sparse_density:g}" if args.sparse_density else ""))


def command_settings(args) -> dict:
    """Everything on the command line that shapes the member and its scores (all but where it is stored)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "func", "resumes", "command")}


def fingerprint(args) -> str:
    return hashlib.sha256(json.dumps(command_settings(args), sort_keys=True, default=str).encode()).hexdigest()[:16]


def stored_member(args) -> dict | None:
    """The finished member this very command stored in --out before (None if there is none); a member of the
    same name from another command is an error, before any work (two would make OUT:NAME ambiguous)."""
    from plrd_jax.io.store import FamilyStore

    if not args.out or not os.path.isdir(args.out) or not os.listdir(args.out):
        return None
    store = FamilyStore(args.out, read_only=True)
    try:
        same_name = store.members_named(member_name(args))
    finally:
        store.close()
    for member in same_name:
        if member.get("fingerprint") == fingerprint(args):
            return member
    if same_name:
        raise ValueError(f"{args.out} already holds member {same_name[0]['member']} named {member_name(args)!r} "
                         f"from a different command; give another --out so that {args.out}:{member_name(args)} "
                         f"stays unambiguous")
    return None


def check_args(args) -> None:
    if args.sequential and (args.sparse_density or args.decomposition == "svd"):
        raise ValueError("--sequential calibrates layer by layer for a data-aware decomposition without a sparse part; "
                         "drop --sparse-density, or choose --decomposition whitened, asvd or fisher")
    if args.out:
        check_out_dir(args.out)


# ---- the command --------------------------------------------------------------------------------
def run(args) -> None:
    """One member straight from a model: calibrate, allocate ranks for a parameter budget, decompose."""
    from plrd_jax.evaluation.perplexity import perplexities
    from plrd_jax.io.load import load_model
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.transforms.decompositions import Decomposition
    from plrd_jax.transforms.plan import RankPlan

    check_args(args)
    done = stored_member(args)
    if done is not None:
        print(f"member {done['member']} ({done['name']}) is already in {args.out}, stored by this same command; "
              f"load it as {args.out}:{done['member']}")
        return
    check_sources(args.calibration_data, args.eval_data, data_dir=args.data_dir)
    config, params, tokenizer = load_model(args.model)
    check_seq_len(max(args.eval_seq_len, args.calibration_seq_len), config.max_seq_len)
    corpora, unseen = evaluation_corpora(args, tokenizer, [args.calibration_data])
    decomposition = Decomposition(args.decomposition, alpha=args.alpha)
    plan = RankPlan(args.matrices.split(","), budget=int(round((1 - args.reduction) * count_params(params))),
                    multiple_of=args.multiple_of, decomposition=decomposition)
    stats, calib = calibration(args, config, params, tokenizer, decomposition)
    member, member_config, report = decompose(args, config, params, plan, decomposition, stats, calib)
    windows = {name: c.windows for name, c in corpora.items()}
    parent_ppl = {k: v.ppl for k, v in perplexities(config, params, windows, batch_size=4).items()}
    member_ppl = {k: v.ppl for k, v in perplexities(member_config, member, windows, batch_size=4).items()}
    n, n_member = count_params(params), count_params(member)
    print_scores(args, n, n_member, parent_ppl, member_ppl, unseen, report)
    if args.out:
        store_member(args, config, tokenizer, member, member_config, report, {
            "params": n_member, "compression": n_member / n, "ppl_before": member_ppl, "ppl_after": member_ppl,
            "parent_ppl": parent_ppl, "eval": {k: c.spec for k, c in corpora.items()}, "unseen": unseen})


def calibration(args, config, params, tokenizer, decomposition):
    """(statistics or None, calibration windows or None): what the decomposition and the allocation need."""
    from plrd_jax.data.mixture import load_mixture, sampled_share
    from plrd_jax.transforms.calibrate import calibrate

    stats = calib = None
    if decomposition.needs_stats or args.allocation != "uniform":
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        samples = parent_samples(args.model, config, params, tokenizer,
                                 sampled_share(args.calibration_data, args.calibration_windows),
                                 args.calibration_seq_len, args.sample_temperature, 0, args.out)
        calib = load_mixture(args.calibration_data, tokenizer, args.calibration_seq_len, data_dir=args.data_dir,
                             max_windows=args.calibration_windows, samples=samples)
        if not (args.sequential and args.allocation == "uniform"):  # sequential takes its own statistics
            with progress_bar(len(calib), "calibrate", "win") as bar:
                stats = calibrate(config, params, calib.windows, fisher=decomposition.needs_fisher,
                                  progress=lambda done, total: bar.update(done - bar.n))
    return stats, calib


def decompose(args, config, params, plan, decomposition, stats, calib):
    """(member params, member config, report) by the method the flags choose."""
    from plrd_jax.transforms.allocate import allocate_ranks
    from plrd_jax.transforms.compress import compress

    if args.sparse_density:  # A B + S: ranks chosen with the sparse part's values and indices counted
        from plrd_jax.transforms.sparse import sparse_plus_lowrank

        chosen = allocate_ranks(params, plan.budget, args.allocation, matrices=plan.matrices,
                                multiple_of=plan.multiple_of, decomposition=decomposition, stats=stats,
                                sparse_density=args.sparse_density)
        member, member_config = sparse_plus_lowrank(params, chosen.ranks, config, density=args.sparse_density,
                                                    support="activation" if stats is not None else "residual",
                                                    decomposition=decomposition, stats=stats)
        member_config = member_config.replace(sparse_method=args.sparse_method)
        return member, member_config, {"decomposition": decomposition.method, "allocation": args.allocation,
                                       "sparse_density": args.sparse_density}
    if args.sequential:  # ranks from the one-pass statistics, factors from sequential ones
        return sequential(args, config, params, plan, decomposition, stats, calib)
    return compress(params, plan, config, allocation=args.allocation, stats=stats)


def sequential(args, config, params, plan, decomposition, stats, calib):
    from plrd_jax.transforms.allocate import allocate_ranks, ranks_by_layer
    from plrd_jax.transforms.plan import resolve_ranks
    from plrd_jax.transforms.sequential import sequential_compress

    ranks = resolve_ranks(params, plan) if args.allocation == "uniform" else allocate_ranks(
        params, plan.budget, args.allocation, matrices=plan.matrices, multiple_of=plan.multiple_of,
        decomposition=decomposition, stats=stats).ranks
    with progress_bar(None, "sequential calibration", "group") as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)
        member, member_config = sequential_compress(params, config, calib.windows, ranks, decomposition,
                                                    progress=progress)
    return member, member_config, {"decomposition": decomposition.method, "allocation": args.allocation,
                                   "sequential": True, "ranks_by_layer": ranks_by_layer(ranks)}


def print_scores(args, n, n_member, parent_ppl, member_ppl, unseen, report) -> None:
    from plrd_jax.evaluation.perplexity import geometric_mean
    from plrd_jax.transforms.decompositions import describe_fallbacks

    ratios = {k: member_ppl[k] / parent_ppl[k] for k in parent_ppl}
    print(f"parent {args.model}: {n:,} params; member ({args.decomposition}, {args.allocation}): {n_member:,} params "
          f"({100 * n_member / n:.1f}%), calibrated on {args.calibration_data}; PPL (windows of {args.eval_seq_len}, "
          f"{args.eval_tokens} tokens per corpus):")
    for k in parent_ppl:
        print(f"  {k}{' (unseen)' if k in unseen else ''}: parent {parent_ppl[k]:.4g}, member {member_ppl[k]:.4g} "
              f"({ratios[k]:.2f}×)")
    print(f"  geometric mean of the ratios: {geometric_mean(ratios.values()):.2f}×")
    if report.get("scalings"):
        print("input scalings: " + ", ".join(f"{k} × {v}" for k, v in report["scalings"].items()))
    if describe_fallbacks(report):
        print(describe_fallbacks(report))


def store_member(args, config, tokenizer, member, member_config, report, scores) -> None:
    """The member into the --out store, its tokenizer and rank plot beside it. The member is saved last: once
    it is there the command is finished (a rerun finds it); an interrupted save leaves only Orbax's temporary
    directory, which the next open of the store removes."""
    from plrd_jax.io.store import FamilyStore
    from plrd_jax.reporting.plots import plot_rank_heatmap

    name = member_name(args)
    os.makedirs(args.out, exist_ok=True)
    if tokenizer is not None and not os.path.isdir(os.path.join(args.out, "tokenizer")):
        tokenizer.save(os.path.join(args.out, "tokenizer"))
    ranks = {p: s.rank for p, s in member_config.linears if s.rank is not None}
    plot_rank_heatmap(os.path.join(args.out, f"ranks_{name}.png"), ranks,
                      {p: config.matrix_shape(p) for p in config.matrix_paths()}, f"{name}: ranks (– dense)")
    store = FamilyStore(args.out)
    step = max(store.steps(), default=-1) + 1
    store.save(step, member, {"member": step, "name": name, "method": "compress", "parent": args.model,
                              "step": step, "final": True, "config": member_config.to_dict(), **scores,
                              "calibration": args.calibration_data, "decomposition_report": report,
                              "fingerprint": fingerprint(args), "command": command_settings(args)})
    store.close()
    print(f"wrote member {step} ({name}) to {args.out}; load it as {args.out}:{step}")
