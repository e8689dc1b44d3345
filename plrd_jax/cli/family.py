"""`family`: build a single-parent family (progressive low-rank decomposition)."""
from __future__ import annotations

import dataclasses
import os
import sys

import jax

from plrd_jax.cli.common import (ALLOCATIONS, DECOMPOSITIONS, DEFAULT_EVAL_DATA, DEFAULT_HEAL_DATA, DEFAULT_MODEL,
                                 DTYPES, MESH_HELP, StepBars, check_out_dir, check_seq_len, check_sources,
                                 evaluation_corpora, nonnegative_int, parent_samples, positive_int, print_summary,
                                 release_freed_memory)

RESUMES = True


def register(subparsers) -> None:
    f = subparsers.add_parser("family", help="build a single-parent family (progressive low-rank decomposition)")
    f.add_argument("--parent", default=DEFAULT_MODEL)
    f.add_argument("--schedule", "--preset", dest="schedule", default="plrd",
                   help="a preset (plrd, minitron, plrd-tpu, mistral-7b-3.1b, llama2-7b-3.3b: plrd_jax/configs/family/) "
                        "or budget fractions '0.9,0.75'")
    f.add_argument("--config", default=None, metavar="FILE",
                   help="a schedule file in the presets' format (TOML or JSON; replaces --schedule); flags override")
    f.add_argument("--out", required=True, help="family directory (Orbax store, tables, plot)")
    _data_flags(f)
    _healing_flags(f)
    _member_flags(f)
    f.set_defaults(func=run, resumes=RESUMES)


def _data_flags(f) -> None:
    f.add_argument("--data", "--heal-data", dest="data", default=DEFAULT_HEAL_DATA,
                   help="healing text: a source (see eval --data) or a weighted mixture A=w,B=w or a JSON file "
                        "{source: weight}; the source parent-samples is text the parent writes itself "
                        "(default: the training splits of WikiText-2, books and speeches, and parent-samples)")
    f.add_argument("--sample-temperature", type=float, default=1.0,
                   help="temperature of the parent-samples source (text the parent writes itself)")
    f.add_argument("--calibration-data", default=None,
                   help="text the decompositions calibrate on, a source or mixture (default: the healing text)")
    f.add_argument("--eval-data", default=DEFAULT_EVAL_DATA,
                   help="evaluation corpora, comma-separated, each disjoint from the healing and calibration text "
                        "(default: the held-out splits of the healing domains, and tinyshakespeare and pydoc, "
                        "which neither healing nor calibration sees)")
    f.add_argument("--data-dir", default=None, help="TFDS data_dir")
    f.add_argument("--eval-seq-len", type=positive_int, default=512)
    f.add_argument("--eval-tokens", type=positive_int, default=4096, help="evaluation windows: ceil(N / eval-seq-len)")


def _healing_flags(f) -> None:
    f.add_argument("--heal-tokens", default=None,
                   help="healing tokens per member, one number or one per member (overrides the preset)")
    f.add_argument("--method", choices=["plrd", "minitron"], default=None,
                   help="how members are cut: low-rank (plrd) or Minitron importance pruning (default: the preset's)")
    f.add_argument("--batch-size", type=positive_int, default=None)
    f.add_argument("--seq-len", type=positive_int, default=None, help="healing sequence length")
    f.add_argument("--grad-accum", type=positive_int, default=None)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--kd-weight", type=float, default=None, help="distillation weight (0 = cross-entropy only)")
    f.add_argument("--kd-temperature", type=float, default=None, help="distillation temperature (default 1)")
    f.add_argument("--kd-top-k", type=nonnegative_int, default=None,
                   help="distil from the teacher's top-k logits per position only (default 0: all logits)")
    f.add_argument("--teacher", choices=["parent", "previous"], default=None,
                   help="who distils into each member: the parent, or the healed previous member")
    f.add_argument("--dtype", choices=DTYPES, default=None, help="healing compute dtype")


def _member_flags(f) -> None:
    f.add_argument("--one-shot", action="store_true", help="every member straight from the parent")
    f.add_argument("--multiple-of", type=positive_int, default=None, help="round ranks to a multiple of this")
    f.add_argument("--mesh", default="1,-1,1", help=MESH_HELP)
    f.add_argument("--layers", choices=["scanned", "unrolled"], default="scanned",
                   help="scanned: the parent and every member whose layers share one shape run them under one "
                        "jax.lax.scan, params stored stacked (one compile per layer shape); unrolled: one "
                        "subtree and one traced copy per layer. The same family either way.")
    f.add_argument("--save-every", type=nonnegative_int, default=4, help="healing checkpoint every N steps (resume)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--decomposition", choices=DECOMPOSITIONS, default=None,
                   help="how each member's factors are computed (default: the preset's, whitened for plrd; "
                        "all but svd calibrate on the healing text first)")
    f.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="how ranks spread over the matrices at each member's budget (default uniform)")
    f.add_argument("--calibration-windows", type=positive_int, default=None,
                   help="calibrate on the first N healing windows (default 32)")


def family_schedule(args):
    """The preset named by --schedule (or budget fractions, or the --config file), with the command line's
    overrides."""
    from plrd_jax.configs import build, load_config
    from plrd_jax.methods.plrd import PRESETS, Schedule, Stage

    if getattr(args, "config", None):
        schedule = build(Schedule, load_config(args.config), args.config)
    elif args.schedule in PRESETS:
        schedule = PRESETS[args.schedule]
    else:
        try:
            fractions = [float(x) for x in args.schedule.split(",")]
        except ValueError:
            raise ValueError(f"--schedule {args.schedule!r} is neither a preset ({', '.join(PRESETS)}) "
                             "nor comma-separated budget fractions like 0.9,0.75") from None
        method = args.method or "plrd"  # budget fractions: the method's preset's settings at other sizes
        base = PRESETS[method]
        tokens = base.stages[0].heal_tokens
        schedule = dataclasses.replace(base, stages=tuple(
            Stage(f"{method}-{round(f * 100)}%", budget_fraction=f, heal_tokens=tokens) for f in fractions))
    heal = {k: v for k, v in (("lr", args.lr), ("kd_weight", args.kd_weight), ("dtype", args.dtype),
                              ("grad_accum", args.grad_accum), ("kd_temperature", args.kd_temperature),
                              ("kd_top_k", args.kd_top_k)) if v is not None}
    top = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                             ("multiple_of", args.multiple_of), ("decomposition", args.decomposition),
                             ("allocation", args.allocation), ("calibration_windows", args.calibration_windows),
                             ("teacher", args.teacher), ("method", args.method))
           if v is not None}
    stages = schedule.stages
    if args.heal_tokens is not None:  # one number for every member, or one per member
        try:
            tokens = [int(x) for x in str(args.heal_tokens).split(",")]
        except ValueError:
            raise ValueError(f"--heal-tokens {args.heal_tokens}: give whole numbers, comma-separated") from None
        if len(tokens) not in (1, len(stages)):
            raise ValueError(f"--heal-tokens {args.heal_tokens}: give one number or one per member ({len(stages)})")
        stages = tuple(dataclasses.replace(s, heal_tokens=tokens[min(i, len(tokens) - 1)])
                       for i, s in enumerate(stages))
    return dataclasses.replace(schedule, stages=stages, progressive=schedule.progressive and not args.one_shot,
                               heal=schedule.heal.replace(**heal), **top)


def run(args) -> None:
    from plrd_jax.io.load import load_model
    from plrd_jax.io.store import FamilyStore
    from plrd_jax.methods.plrd import run_family
    from plrd_jax.nn.accounting import count_params

    schedule = family_schedule(args)
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    calibration_spec = args.calibration_data or args.data
    check_out_dir(args.out)
    check_sources(args.data, calibration_spec, args.eval_data, data_dir=args.data_dir)
    config, params, tokenizer = load_model(args.parent)
    check_seq_len(max(args.eval_seq_len, schedule.seq_len), config.max_seq_len)
    heal_data, calibration, corpora, unseen = _family_data(args, schedule, calibration_spec, config, params,
                                                           tokenizer, mesh_shape)
    store = FamilyStore(args.out)
    if tokenizer is not None and not os.path.isdir(os.path.join(args.out, "tokenizer")) and jax.process_index() == 0:
        tokenizer.save(os.path.join(args.out, "tokenizer"))  # members load with it as FAMILY_DIR:N
    print(f"parent {args.parent}: {count_params(params):,} params; healing on {args.data} "
          f"({len(heal_data)} windows of {schedule.seq_len}), calibrating on {calibration_spec}; evaluating on "
          + ", ".join(f"{n}{' (unseen)' if n in unseen else ''}" for n in corpora)
          + f" ({args.eval_tokens} tokens each in windows of {args.eval_seq_len})", file=sys.stderr)
    events = FamilyEvents(args.save_every)
    data_spec = {"heal": heal_data.spec, "calibration": calibration.spec if calibration is not heal_data else "heal",
                 "eval": {n: c.spec for n, c in corpora.items()}, "unseen": unseen}
    try:
        results = run_family(args.parent, config, params, schedule, heal_data,
                             {n: c.windows for n, c in corpora.items()}, store,
                             calibration_windows=calibration.windows[:schedule.calibration_windows],
                             mesh_shape=mesh_shape, save_every=args.save_every, seed=args.seed, data_spec=data_spec,
                             on_event=events, scan_layers=args.layers == "scanned")
    finally:
        events.close()  # an interrupted run's bar ends its line before the message
    store.close()
    label = ("progressive " if schedule.progressive else "one-shot ") + schedule.method
    print_summary(args.out, "" if schedule.method == "plrd" else f"{schedule.method}_", results,
                  count_params(params), events.parent_ppl, unseen, f"{label} family, healed: PPL / parent's per corpus")
    _plot_ranks(args.out, config, schedule, results)


def _family_data(args, schedule, calibration_spec, config, params, tokenizer, mesh_shape):
    """(healing data, calibration data, evaluation corpora, unseen names), all read and checked before any
    member is cut; the parent's own samples generated (or read back from OUT) when a mixture names them."""
    from plrd_jax.data.corpora import PARENT_SAMPLES
    from plrd_jax.data.mixture import load_mixture, parse_mixture, sampled_share

    corpora, unseen = evaluation_corpora(args, tokenizer, [args.data, calibration_spec])
    needed = sum(schedule.steps(s) for s in schedule.stages) * schedule.batch_size * schedule.heal.grad_accum
    needed = max(needed, schedule.calibration_windows, 1)
    os.makedirs(args.out, exist_ok=True)
    samples = parent_samples(args.parent, config, params, tokenizer, max(sampled_share(args.data, needed),
                             sampled_share(calibration_spec, schedule.calibration_windows)), schedule.seq_len,
                             args.sample_temperature, args.seed, args.out)
    heal_data = load_mixture(args.data, tokenizer, schedule.seq_len, data_dir=args.data_dir,
                             max_windows=needed if "tfds:" in args.data else None,
                             samples=samples if PARENT_SAMPLES in parse_mixture(args.data) else None)
    calibration = heal_data if calibration_spec == args.data else load_mixture(
        calibration_spec, tokenizer, schedule.seq_len, data_dir=args.data_dir, max_windows=schedule.calibration_windows,
        samples=samples if PARENT_SAMPLES in parse_mixture(calibration_spec) else None)
    if len(calibration) < schedule.calibration_windows:
        raise ValueError(f"--calibration-data {calibration_spec!r} has {len(calibration)} windows of "
                         f"{schedule.seq_len}; the schedule calibrates on {schedule.calibration_windows}")
    if jax.process_count() > 1:  # multi-host: each host feeds only its rows of every global batch
        from plrd_jax.nn.sharding import batch_sharding, make_mesh
        from plrd_jax.data.windows import ProcessLocalData

        heal_data = ProcessLocalData(heal_data, batch_sharding(make_mesh(mesh_shape)))
    return heal_data, calibration, corpora, unseen


class FamilyEvents(StepBars):
    """run_family's on_event: the parent's PPL, a progress bar per member, a line per finished member. Memory
    that malloc keeps (`release_freed_memory`) goes back after each member's first step (its compile), after each
    healing checkpoint, after each corpus scored and after each member: between phases, not between steps."""

    def __init__(self, save_every: int = 0):
        super().__init__()
        self.parent_ppl, self.save_every = None, save_every

    def __call__(self, kind, info):
        if kind == "parent":
            self.parent_ppl = info["ppl"]
            print("  parent PPL " + ", ".join(f"{n} {v:.4g}" for n, v in info["ppl"].items()), file=sys.stderr)
        elif kind == "stage":
            self.open(info["member"], info["steps"], f"member {info['member']} {info['name']}")
        elif kind == "step":
            bar = self.bars[info["member"]]
            bar.n = info["step"] - 1
            bar.set_postfix(loss=f"{info['loss']:.3f}", tok_s=f"{info['tokens'] / info['seconds']:.0f}")
            bar.update(1)
            if info["step"] == 1 or (self.save_every and (info["step"] - 1) % self.save_every == 0):
                release_freed_memory()
        elif kind == "member":
            self.member(info)
            release_freed_memory()
        elif kind == "eval":  # one corpus scored (its first also compiled the evaluation step)
            release_freed_memory()

    def member(self, info):
        from plrd_jax.evaluation.perplexity import geomean_ratio, ratios_to_parent
        from plrd_jax.transforms.decompositions import describe_fallbacks

        r, parent_ppl = info["result"], info["parent_ppl"]
        if r.member in self.bars:
            self.bars.pop(r.member).close()
        print(f"  member {r.member} {r.name}: {r.params:,} params ({100 * r.fraction:.1f}%), PPL × parent "
              f"(geo-mean) {geomean_ratio(r.ppl_before, parent_ppl):.2f} -> "
              f"{geomean_ratio(r.ppl_after, parent_ppl):.2f}: "
              + ", ".join(f"{n} {v:.2f}×" for n, v in ratios_to_parent(r.ppl_after, parent_ppl).items())
              + (" (stored earlier)" if info["restored"] else ""), file=sys.stderr)
        if describe_fallbacks(info.get("decomposition_report")):
            print(f"  member {r.member}: {describe_fallbacks(info['decomposition_report'])}", file=sys.stderr)


def _plot_ranks(out, config, schedule, results) -> None:
    """Ranks by layer and matrix kind, one heatmap per low-rank member."""
    from plrd_jax.reporting.plots import plot_rank_heatmap

    shapes = {p: config.matrix_shape(p) for p in config.matrix_paths()}
    for r in (results if schedule.method == "plrd" else []):
        plot_rank_heatmap(os.path.join(out, f"ranks_{r.name}.png"), r.ranks, shapes,
                          f"{r.name} ({schedule.decomposition}, {schedule.allocation}): ranks (– dense)")
    if schedule.method == "plrd":
        print(f"wrote {out}/ranks_*.png")
