"""`shear`: Sheared-LLaMA members: targeted structured pruning + continued training."""
from __future__ import annotations

import dataclasses
import os
import sys

from plrd_jax.cli.common import (DEFAULT_EVAL_DATA, DEFAULT_MODEL, DTYPES, MESH_HELP, StepBars, check_out_dir,
                                 check_seq_len, check_sources, evaluation_corpora, nonnegative_int, positive_int,
                                 print_summary)

RESUMES = True


def register(subparsers) -> None:
    s = subparsers.add_parser("shear", help="Sheared-LLaMA members: targeted structured pruning + continued training")
    s.add_argument("--parent", default=DEFAULT_MODEL)
    s.add_argument("--preset", default="sheared-smollm2",
                   help="sheared-smollm2 (CPU), llama2-7b-1.3b, llama2-7b-2.7b (TPU scale; give --source per domain); "
                        "plrd_jax/configs/sheared/")
    s.add_argument("--config", default=None, metavar="FILE",
                   help="a Sheared schedule file in the presets' format (TOML or JSON; replaces --preset); flags "
                        "override")
    s.add_argument("--out", required=True, help="family directory (may already hold PLRD members)")
    s.add_argument("--target", action="append", default=None,
                   help="LAYERS,HIDDEN,HEADS,KV_HEADS,INTERMEDIATE (repeat for several members; replaces the preset's)")
    _domain_flags(s)
    _training_flags(s)
    s.add_argument("--eval-data", default=DEFAULT_EVAL_DATA,
                   help="evaluation corpora, comma-separated, disjoint from every domain")
    s.add_argument("--eval-seq-len", type=positive_int, default=512)
    s.add_argument("--eval-tokens", type=positive_int, default=4096)
    s.add_argument("--data-dir", default=None, help="TFDS data_dir")
    s.add_argument("--mesh", default="1,-1,1", help=MESH_HELP)
    s.add_argument("--save-every", type=nonnegative_int, default=0, help="checkpoint every N steps (resume)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run, resumes=RESUMES)


def _domain_flags(s) -> None:
    s.add_argument("--domains", default=None,
                   help="comma-separated domain names (local: wikitext, books, speeches, shakespeare, pydoc; "
                        "default the preset's: wikitext, books, speeches)")
    s.add_argument("--source", default=None, help="NAME=SOURCE,... data source of a domain (file glob or tfds:NAME)")
    s.add_argument("--weights", default=None, help="initial domain weights, comma-separated, summing to 1")
    s.add_argument("--reference-losses", default=None,
                   help="NAME=LOSS,... for every domain (default: the preset's, else measured on the parent)")
    s.add_argument("--clamp", action="store_true", help="clamp the loss gap at 0 (the paper's rule)")
    s.add_argument("--update-every", type=positive_int, default=None,
                   help="domain-weight update interval while pruning")
    s.add_argument("--continue-update-every", type=positive_int, default=None, help="... while continuing")
    s.add_argument("--validation-windows", type=positive_int, default=None, help="held-out windows per domain")


def _training_flags(s) -> None:
    s.add_argument("--prune-tokens", type=nonnegative_int, default=None)
    s.add_argument("--continue-tokens", type=nonnegative_int, default=None)
    s.add_argument("--batch-size", type=positive_int, default=None)
    s.add_argument("--seq-len", type=positive_int, default=None)
    s.add_argument("--lr", type=float, default=None, help="model learning rate of both phases")
    s.add_argument("--temperature", type=float, default=None, help="hard-concrete β (code 2/3, paper 0.83)")
    s.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype")


def shear_schedule(args, parent_config):
    """The --preset Sheared schedule with the command line's overrides (targets, domains, budgets), checked
    against the parent before any data is read."""
    from plrd_jax.configs import build, load_config
    from plrd_jax.methods.sheared import PRESETS, ShearSchedule

    if getattr(args, "config", None):
        schedule = build(ShearSchedule, load_config(args.config), args.config)
    elif args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    else:
        schedule = PRESETS[args.preset]
    members = [dataclasses.replace(m, target=m.target.resolve(parent_config),
                                   prune_tokens=m.prune_tokens if args.prune_tokens is None else args.prune_tokens,
                                   continue_tokens=m.continue_tokens if args.continue_tokens is None
                                   else args.continue_tokens) for m in _targets(args, schedule)]
    top = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                             ("continue_update_every", args.continue_update_every),
                             ("validation_windows", args.validation_windows)) if v is not None}
    l0 = schedule.l0 if args.temperature is None else dataclasses.replace(schedule.l0, temperature=args.temperature)
    phase = {k: v for k, v in (("lr", args.lr), ("dtype", args.dtype)) if v is not None}
    return dataclasses.replace(schedule, members=tuple(members), domains=_domains(args, schedule.domains), l0=l0,
                               prune=schedule.prune.replace(**phase), heal=schedule.heal.replace(**phase), **top)


def _targets(args, schedule):
    """The preset's members, or one per --target (budgets from the preset's first member)."""
    from plrd_jax.methods.sheared import ShearMember
    from plrd_jax.nn.masks import TargetShape

    if not args.target:
        return schedule.members
    members = []
    for spec in args.target:
        try:
            layers, hidden, heads, kv, inter = (int(x) for x in spec.split(","))
        except ValueError:
            raise ValueError(f"--target {spec!r}: expected LAYERS,HIDDEN,HEADS,KV_HEADS,INTERMEDIATE") from None
        first = schedule.members[0]  # budgets from the preset's first member unless given
        members.append(ShearMember(f"sheared-{layers}x{hidden}-{heads}h{kv}kv-{inter}",
                                   TargetShape(layers, hidden, heads, inter, kv), first.prune_tokens,
                                   first.continue_tokens))
    return members


def _domains(args, domains):
    import plrd_jax.data.dynamic_loading as dl

    names = args.domains.split(",") if args.domains else list(domains.names)
    try:
        weights = [float(x) for x in args.weights.split(",")] if args.weights else (
            list(domains.weights) if names == list(domains.names) else None)
    except ValueError:
        raise ValueError(f"--weights {args.weights!r}: expected numbers, comma-separated") from None
    refs = dict(_pairs(args.reference_losses, "--reference-losses", float)) if args.reference_losses else (
        dict(zip(domains.names, domains.reference_losses)) if domains.reference_losses and names == list(
            domains.names) else None)
    return dl.Domains.build(names, weights, refs, update_every=args.update_every or domains.update_every,
                            smoothing=domains.smoothing, clamp=args.clamp or domains.clamp)


def _pairs(text, flag, cast=str):
    out = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE")
        try:
            out.append((name, cast(value)))
        except ValueError:
            raise ValueError(f"{flag} {item!r}: {value!r} is not a {cast.__name__}") from None
    return out


def run(args) -> None:
    import plrd_jax.data.dynamic_loading as dl
    from plrd_jax.evaluation.perplexity import perplexities
    from plrd_jax.io.load import load_model
    from plrd_jax.io.store import FamilyStore
    from plrd_jax.methods.sheared import run_shear
    from plrd_jax.nn.accounting import count_params

    check_out_dir(args.out)
    config, params, tokenizer = load_model(args.parent)
    schedule = shear_schedule(args, config)  # bad targets, domains, reference losses: errors before any compute
    sources = dl.resolve_sources(schedule.domains.names, dict(_pairs(args.source, "--source")) if args.source else {})
    check_sources(args.eval_data, *sources.values(), data_dir=args.data_dir)
    check_seq_len(max(args.eval_seq_len, schedule.seq_len), config.max_seq_len)
    corpora, unseen = evaluation_corpora(args, tokenizer, list(sources.values()))
    windows = _domain_windows(args, schedule, sources, tokenizer)
    eval_sets = {n: c.windows for n, c in corpora.items()}
    os.makedirs(args.out, exist_ok=True)
    store = FamilyStore(args.out)
    if tokenizer is not None and not os.path.isdir(os.path.join(args.out, "tokenizer")):
        tokenizer.save(os.path.join(args.out, "tokenizer"))
    parent_ppl = {n: r.ppl for n, r in perplexities(config, params, eval_sets, batch_size=4).items()}
    print(f"parent {args.parent}: {count_params(params):,} params, PPL "
          + ", ".join(f"{n} {v:.4g}" for n, v in parent_ppl.items()) + "; domains " + ", ".join(
              f"{n}={s} ({len(windows[n].windows)} windows)" for n, s in sources.items()), file=sys.stderr)
    data_spec = {"domains": {n: w.spec for n, w in windows.items()},
                 "eval": {n: c.spec for n, c in corpora.items()}, "unseen": unseen}
    events = ShearEvents(parent_ppl)
    try:
        results = run_shear(args.parent, config, params, schedule, {n: w.windows for n, w in windows.items()},
                            eval_sets, store, mesh_shape=tuple(int(x) for x in args.mesh.split(",")),
                            save_every=args.save_every, seed=args.seed, data_spec=data_spec, on_event=events)
    finally:
        events.close()  # an interrupted run's bar ends its line before the message
    store.close()
    print_summary(args.out, "shear_", results, count_params(params), parent_ppl, unseen,
                  "Sheared members, continued: PPL / parent's per corpus")
    for r in results:
        state = dl.LoaderState((), (), tuple((s, tuple(w)) for s, w in r.domain_weights))
        dl.plot_weights(os.path.join(args.out, f"domain_weights_{r.name}.png"), state, schedule.domains.names,
                        title=f"Domain weights, {r.name}")
    print(f"wrote {args.out}/domain_weights_*.png")


def _domain_windows(args, schedule, sources, tokenizer):
    """Each domain's text in windows of the schedule's length (streamed sources: as many as the run reads)."""
    from plrd_jax.data.windows import load_dataset

    steps = sum(schedule.prune_steps(m) * schedule.batch_size + schedule.continue_steps(m) * (
        schedule.continue_batch_size or schedule.batch_size) for m in schedule.members)
    return {name: load_dataset(src, tokenizer, schedule.seq_len, data_dir=args.data_dir,
                               max_windows=steps + schedule.validation_windows if src.startswith("tfds:") else None)
            for name, src in sources.items()}


class ShearEvents(StepBars):
    """run_shear's on_event: reference losses, a progress bar per phase, domain weights, a line per member."""

    def __init__(self, parent_ppl):
        super().__init__()
        self.parent_ppl = parent_ppl

    def __call__(self, kind, info):
        if kind == "references":
            print("reference losses " + ", ".join(f"{n} {x:.3f}" for n, x in zip(info["names"], info["losses"])),
                  file=sys.stderr)
        elif kind == "stage":
            self.open(info["member"], info["steps"], f"{info['name']} {info['phase']}", info["resume_step"] or 0)
        elif kind == "step":
            self.step(info)
        elif kind == "weights":
            print(f"  step {info['step']} domain weights " + ", ".join(
                f"{n} {w:.3f}" for n, w in zip(info["names"], info["weights"])), file=sys.stderr)
        elif kind == "member":
            self.member(info)

    def step(self, info):
        bar = self.bars[info["member"]]
        post = {"loss": f"{info['loss']:.3f}", "tok_s": f"{info['tokens'] / info['seconds']:.0f}"}
        if info["phase"] == "prune":
            post["size"] = f"{info['expected_size'] / info['target_size']:.2f}×target"
        bar.set_postfix(post)
        bar.update(1)
        if info["step"] == info["steps"]:
            self.bars.pop(info["member"]).close()

    def member(self, info):
        from plrd_jax.evaluation.perplexity import geomean_ratio

        r = info["result"]
        print(f"  member {r.member} {r.name}: {r.params:,} params ({100 * r.fraction:.1f}%), PPL × parent "
              f"(geo-mean) pruned {geomean_ratio(r.ppl_before, self.parent_ppl):.2f} -> continued "
              f"{geomean_ratio(r.ppl_after, self.parent_ppl):.2f}" + (" (stored earlier)" if info["restored"] else ""),
              file=sys.stderr)
