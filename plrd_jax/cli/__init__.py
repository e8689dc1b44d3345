"""Command line: `python -m plrd_jax {eval,info,generate,export,family,compress,shear,pretrain,zeroshot,tables} ...`.

Every `--model` takes the embedded parent's short name (`smollm2-135m`), a .gguf file, a Hugging Face
safetensors directory, or a stored family member `FAMILY_DIR:N` / `FAMILY_DIR:NAME`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict

import jax

DEFAULT_MODEL = "smollm2-135m"


# ---- commands -----------------------------------------------------------------------------------
def cmd_eval(args):
    from plrd_jax.data.corpora import load_dataset
    from plrd_jax.evaluation.perplexity import perplexity
    from plrd_jax.io.load import load_model

    config, params, tokenizer = load_model(args.model, dtype=args.dtype)
    check_seq_len(args.seq_len, config.max_seq_len)
    windows = -(-args.max_tokens // args.seq_len) if args.max_tokens else None
    names = [n.strip() for n in args.data.split(",")]
    data = {}
    for name in names:  # every corpus read (and checked) before the model runs
        data[name] = load_dataset(name, tokenizer, args.seq_len, data_dir=args.data_dir, max_windows=windows)
    for name, corpus in data.items():
        with progress_bar(len(corpus), f"eval {name}", "win") as bar:
            result = perplexity(config, params, corpus.windows, batch_size=args.batch_size,
                                progress=lambda done, total: bar.update(done - bar.n))
        print(f"model {args.model}  data {name}  window {result.seq_len}  windows {result.windows}  "
              f"tokens scored {result.tokens}  mean NLL {result.nll:.4f}  PPL {result.ppl:.3f}")
        if args.json:
            print(json.dumps({"model": args.model, "data": corpus.spec, **result.to_dict()}))


def cmd_info(args):
    from plrd_jax.io.load import load_model

    config, params, _ = load_model(args.model)
    print(f"model {args.model}")
    for key, value in config.to_dict().items():
        if key != "linears":
            print(f"  {key:20s} {value}")
    print("  parameters by matrix kind:")
    for kind, (count, ranks) in params_by_kind(params).items():
        note = f"  ranks {min(ranks)}–{max(ranks)}" if ranks else ""
        print(f"    {kind:12s} {count:>14,d}{note}")
    print(f"    {'total':12s} {sum(x.size for x in jax.tree.leaves(params)):>14,d}")


def cmd_generate(args):
    from plrd_jax.evaluation.generate import generate
    from plrd_jax.io.load import load_model

    config, params, tokenizer = load_model(args.model, dtype=args.dtype)
    text = args.prompt
    if args.chat:
        text = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    prompt = tokenizer.encode(text)
    if tokenizer.bos_token_id is not None and args.bos:
        prompt = [tokenizer.bos_token_id] + prompt
    print(args.prompt, end="", flush=True)
    stop = tokenizer.eos_token_id
    new, start, shown = [], time.perf_counter(), ""
    for token in generate(config, params, prompt, args.max_new_tokens, args.temperature, args.seed,
                          stop_token=stop):
        if token == stop:
            break
        new.append(token)
        text = tokenizer.decode(new)
        print(text[len(shown):], end="", flush=True)
        shown = text
    elapsed = time.perf_counter() - start
    print(f"\n[{len(new)} tokens in {elapsed:.1f}s, {len(new) / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)


def cmd_export(args):
    from plrd_jax.io.hf import save_hf
    from plrd_jax.io.load import load_model

    config, params, tokenizer = load_model(args.model)
    save_hf(params, config, args.out, tokenizer=tokenizer)
    print(f"wrote {args.out} (dense safetensors + config.json)")


def family_schedule(args):
    """The preset named by --schedule (or budget fractions), with the command line's overrides."""
    from plrd_jax.methods.plrd import PRESETS, _stages

    if args.schedule in PRESETS:
        schedule = PRESETS[args.schedule]
    else:
        try:
            fractions = [float(x) for x in args.schedule.split(",")]
        except ValueError:
            raise ValueError(f"--schedule {args.schedule!r} is neither a preset ({', '.join(PRESETS)}) "
                             "nor comma-separated budget fractions like 0.9,0.75") from None
        method = args.method or "plrd"  # budget fractions: the method's preset's settings at other sizes
        base = PRESETS[method]
        schedule = dataclasses.replace(base, stages=_stages(fractions, base.stages[0].heal_tokens, method))
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
        tokens = [int(x) for x in str(args.heal_tokens).split(",")]
        if len(tokens) not in (1, len(stages)):
            raise ValueError(f"--heal-tokens {args.heal_tokens}: give one number or one per member ({len(stages)})")
        stages = tuple(dataclasses.replace(s, heal_tokens=tokens[min(i, len(tokens) - 1)])
                       for i, s in enumerate(stages))
    return dataclasses.replace(schedule, stages=stages, progressive=schedule.progressive and not args.one_shot,
                               heal=schedule.heal.replace(**heal), **top)


# The main job's calibration and healing text: the training splits of three domains and, in equal share, text
# the parent writes itself (experiments/results/heal_data.md measures the choice); tiny-shakespeare and pydoc
# stay unseen.
DEFAULT_HEAL_DATA = "wikitext2-heal,books-heal,speeches-heal,parent-samples"
DEFAULT_EVAL_DATA = "wikitext2-eval,books-eval,speeches-eval,tinyshakespeare,pydoc"


def evaluation_corpora(args, tokenizer, train_specs, seq_len=None):
    """(corpora {name: TokenDataset}, unseen names) for --eval-data, after checking that no corpus shares text
    with the calibration / healing sources (`train_specs`: mixture specs) — before any model runs."""
    from plrd_jax.data.corpora import check_disjoint, domain_of, load_corpora, parse_mixture

    train = [name for spec in train_specs for name in parse_mixture(spec)]
    corpora = load_corpora(args.eval_data, tokenizer, seq_len or args.eval_seq_len, args.eval_tokens,
                           data_dir=args.data_dir)
    check_disjoint(corpora, train, data_dir=args.data_dir)
    seen_domains = {domain_of(n) for n in train}
    unseen = [n for n in corpora if domain_of(n) not in seen_domains]
    return corpora, unseen


def print_summary(out_dir, prefix, results, parent_params, parent_ppl, unseen, title):
    """The members' table (a column per corpus, ratios to the parent, geometric mean) and the plot, written to
    OUT/{prefix}summary.md, .csv and OUT/{prefix}ppl_ratios.png."""
    from plrd_jax.reporting.summary import markdown_table, plot_ratios, summary_columns, summary_rows, write_csv

    columns = summary_columns(list(parent_ppl), unseen)
    rows = summary_rows(results, parent_params, parent_ppl, unseen)
    table = markdown_table(rows, columns)
    with open(os.path.join(out_dir, f"{prefix}summary.md"), "w") as f:
        f.write(table)
    write_csv(os.path.join(out_dir, f"{prefix}summary.csv"), rows, columns)
    plot_ratios(os.path.join(out_dir, f"{prefix}ppl_ratios.png"), results, parent_params, parent_ppl, unseen, title)
    print(table)
    print(f"wrote {out_dir}/{prefix}summary.md, {prefix}summary.csv, {prefix}ppl_ratios.png")


def parent_samples(model, config, params, tokenizer, count, seq_len, temperature, seed, out_dir=None):
    """`count` windows the parent writes itself at `temperature` (the mixture source parent-samples); with
    out_dir they are generated once and kept in OUT/parent_samples_*.npy (a rerun reads them back). None when
    count is 0."""
    import hashlib

    import numpy as np

    from plrd_jax.evaluation.generate import sample_windows

    if count == 0:
        return None
    start = tokenizer.token_to_id("<|endoftext|>") if hasattr(tokenizer, "token_to_id") else None
    start = start if start is not None else (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                             else tokenizer.eos_token_id)
    key = hashlib.sha256(json.dumps([model, count, seq_len, temperature, seed, start]).encode()).hexdigest()[:16]
    path = None if out_dir is None else os.path.join(out_dir, f"parent_samples_{key}.npy")
    if path is not None and os.path.isfile(path):
        return np.load(path)
    print(f"sampling {count} windows of {seq_len} tokens from the parent (temperature {temperature})",
          file=sys.stderr)
    windows = np.asarray(sample_windows(config, params, count, seq_len, start, temperature, seed))
    if path is not None and jax.process_index() == 0:
        np.save(path + ".tmp.npy", windows)
        os.replace(path + ".tmp.npy", path)
    return windows


def cmd_family(args):
    from plrd_jax.data.corpora import PARENT_SAMPLES, load_mixture, parse_mixture, sampled_share
    from plrd_jax.evaluation.perplexity import geomean_ratio, ratios_to_parent
    from plrd_jax.methods.plrd import run_family
    from plrd_jax.io.load import load_model
    from plrd_jax.nn.model import count_params
    from plrd_jax.io.store import FamilyStore

    schedule = family_schedule(args)
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    config, params, tokenizer = load_model(args.parent)
    check_seq_len(max(args.eval_seq_len, schedule.seq_len), config.max_seq_len)
    calibration_spec = args.calibration_data or args.data
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
        from plrd_jax.training.distributed import ProcessLocalData
        from plrd_jax.nn.sharding import batch_sharding, make_mesh

        heal_data = ProcessLocalData(heal_data, batch_sharding(make_mesh(mesh_shape)))
    store = FamilyStore(args.out)
    if tokenizer is not None and not os.path.isdir(os.path.join(args.out, "tokenizer")) and jax.process_index() == 0:
        tokenizer.save(os.path.join(args.out, "tokenizer"))  # members load with it as FAMILY_DIR:N
    print(f"parent {args.parent}: {count_params(params):,} params; healing on {args.data} "
          f"({len(heal_data)} windows of {schedule.seq_len}), calibrating on {calibration_spec}; evaluating on "
          + ", ".join(f"{n}{' (unseen)' if n in unseen else ''}" for n in corpora)
          + f" ({args.eval_tokens} tokens each in windows of {args.eval_seq_len})", file=sys.stderr)
    bars = {}

    def on_event(kind, info):
        if kind == "parent":
            print("  parent PPL " + ", ".join(f"{n} {v:.4g}" for n, v in info["ppl"].items()), file=sys.stderr)
        elif kind == "stage":
            from tqdm.auto import tqdm

            bars[info["member"]] = tqdm(total=info["steps"],
                                        desc=f"member {info['member']} {info['name']}", unit="step",
                                        file=sys.stderr, dynamic_ncols=True)
        elif kind == "step":
            bar = bars[info["member"]]
            bar.n = info["step"] - 1
            bar.set_postfix(loss=f"{info['loss']:.3f}", tok_s=f"{info['tokens'] / info['seconds']:.0f}")
            bar.update(1)
        elif kind == "member":
            r, parent_ppl = info["result"], info["parent_ppl"]
            if r.member in bars:
                bars.pop(r.member).close()
            print(f"  member {r.member} {r.name}: {r.params:,} params ({100 * r.fraction:.1f}%), PPL × parent "
                  f"(geo-mean) {geomean_ratio(r.ppl_before, parent_ppl):.2f} -> "
                  f"{geomean_ratio(r.ppl_after, parent_ppl):.2f}: "
                  + ", ".join(f"{n} {v:.2f}×" for n, v in ratios_to_parent(r.ppl_after, parent_ppl).items())
                  + (" (stored earlier)" if info["restored"] else ""), file=sys.stderr)

    parent_info = {}
    data_spec = {"heal": heal_data.spec, "calibration": calibration.spec if calibration is not heal_data else "heal",
                 "eval": {n: c.spec for n, c in corpora.items()}, "unseen": unseen}
    results = run_family(args.parent, config, params, schedule, heal_data, {n: c.windows for n, c in corpora.items()},
                         store, calibration_windows=calibration.windows[:schedule.calibration_windows],
                         mesh_shape=mesh_shape, save_every=args.save_every, seed=args.seed, data_spec=data_spec,
                         on_event=lambda kind, info: (parent_info.update(info) if kind == "parent" else None,
                                                      on_event(kind, info)))
    store.close()
    label = ("progressive " if schedule.progressive else "one-shot ") + schedule.method
    print_summary(args.out, "" if schedule.method == "plrd" else f"{schedule.method}_", results,
                  count_params(params), parent_info["ppl"], unseen, f"{label} family, healed: PPL / parent's per corpus")
    from plrd_jax.transforms import plot_rank_heatmap

    shapes = {p: config.matrix_shape(p) for p in config.matrix_paths()}
    for r in (results if schedule.method == "plrd" else []):  # ranks by layer and matrix kind, one per member
        plot_rank_heatmap(os.path.join(args.out, f"ranks_{r.name}.png"), r.ranks, shapes,
                          f"{r.name} ({schedule.decomposition}, {schedule.allocation}): ranks (– dense)")
    if schedule.method == "plrd":
        print(f"wrote {args.out}/ranks_*.png")


def cmd_compress(args):
    """One member straight from a model: calibrate, allocate ranks for a parameter budget, decompose."""
    from plrd_jax.transforms.calibrate import calibrate
    from plrd_jax.data.corpora import load_mixture, sampled_share
    from plrd_jax.evaluation.perplexity import geometric_mean, perplexities
    from plrd_jax.io.load import load_model
    from plrd_jax.nn.model import count_params
    from plrd_jax.io.store import FamilyStore
    from plrd_jax.transforms import Decomposition, RankPlan, plot_rank_heatmap
    from plrd_jax.transforms.allocate import compress

    config, params, tokenizer = load_model(args.model)
    check_seq_len(max(args.eval_seq_len, args.calibration_seq_len), config.max_seq_len)
    if not 0 < args.reduction < 1:
        raise ValueError(f"--reduction {args.reduction} must lie strictly between 0 and 1 (0.2 = 20% fewer params)")
    if not 0 <= args.sparse_density < 1:
        raise ValueError(f"--sparse-density {args.sparse_density} must lie in [0, 1)")
    if args.sequential and (args.sparse_density or args.decomposition == "svd"):
        raise ValueError("--sequential calibrates layer by layer for a data-aware decomposition without a sparse part; "
                         "drop --sparse-density, or choose --decomposition whitened, asvd or fisher")
    corpora, unseen = evaluation_corpora(args, tokenizer, [args.calibration_data])
    decomposition = Decomposition(args.decomposition, alpha=args.alpha)
    plan = RankPlan(args.matrices.split(","), budget=int(round((1 - args.reduction) * count_params(params))),
                    multiple_of=args.multiple_of, decomposition=decomposition)
    stats = None
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
    if args.sparse_density:  # A B + S: ranks chosen with the sparse part's values and indices counted
        from plrd_jax.transforms import sparse_plus_lowrank
        from plrd_jax.transforms.allocate import allocate_ranks

        chosen = allocate_ranks(params, plan.budget, args.allocation, matrices=plan.matrices,
                                multiple_of=plan.multiple_of, decomposition=decomposition, stats=stats,
                                sparse_density=args.sparse_density)
        member, member_config = sparse_plus_lowrank(params, chosen.ranks, config, density=args.sparse_density,
                                                    support="activation" if stats is not None else "residual",
                                                    decomposition=decomposition, stats=stats)
        member_config = member_config.replace(sparse_method=args.sparse_method)
        report = {"decomposition": decomposition.method, "allocation": args.allocation,
                  "sparse_density": args.sparse_density}
    elif args.sequential:  # ranks from the one-pass statistics, factors from sequential ones
        from plrd_jax.transforms.sequential import sequential_compress
        from plrd_jax.transforms.allocate import allocate_ranks, ranks_by_layer
        from plrd_jax.transforms.plan import resolve_ranks

        ranks = resolve_ranks(params, plan) if args.allocation == "uniform" else allocate_ranks(
            params, plan.budget, args.allocation, matrices=plan.matrices, multiple_of=plan.multiple_of,
            decomposition=decomposition, stats=stats).ranks
        with progress_bar(None, "sequential calibration", "group") as bar:
            def progress(done, total):
                bar.total = total
                bar.update(done - bar.n)
            member, member_config = sequential_compress(params, config, calib.windows, ranks, decomposition,
                                                        progress=progress)
        report = {"decomposition": decomposition.method, "allocation": args.allocation, "sequential": True,
                  "ranks_by_layer": ranks_by_layer(ranks)}
    else:
        member, member_config, report = compress(params, plan, config, allocation=args.allocation, stats=stats)
    windows = {name: c.windows for name, c in corpora.items()}
    parent_ppl = {k: v.ppl for k, v in perplexities(config, params, windows, batch_size=4).items()}
    member_ppl = {k: v.ppl for k, v in perplexities(member_config, member, windows, batch_size=4).items()}
    n, n_member = count_params(params), count_params(member)
    ratios = {k: member_ppl[k] / parent_ppl[k] for k in windows}
    print(f"parent {args.model}: {n:,} params; member ({args.decomposition}, {args.allocation}): {n_member:,} params "
          f"({100 * n_member / n:.1f}%), calibrated on {args.calibration_data}; PPL (windows of {args.eval_seq_len}, "
          f"{args.eval_tokens} tokens per corpus):")
    for k in windows:
        print(f"  {k}{' (unseen)' if k in unseen else ''}: parent {parent_ppl[k]:.4g}, member {member_ppl[k]:.4g} "
              f"({ratios[k]:.2f}×)")
    print(f"  geometric mean of the ratios: {geometric_mean(ratios.values()):.2f}×")
    if report.get("scalings"):
        print("input scalings: " + ", ".join(f"{k} × {v}" for k, v in report["scalings"].items()))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"{args.decomposition}-{args.allocation}{'-sequential' if args.sequential else ''}-" \
               f"{round(100 * args.reduction)}%" + (
            f"-sparse{args.sparse_density:g}" if args.sparse_density else "")
        store = FamilyStore(args.out)
        step = max(store.steps(), default=-1) + 1
        store.save(step, member, {"member": step, "name": name, "method": "compress", "parent": args.model,
                                  "step": step, "final": True, "config": member_config.to_dict(), "params": n_member,
                                  "compression": n_member / n, "ppl_before": member_ppl, "ppl_after": member_ppl,
                                  "parent_ppl": parent_ppl, "eval": {k: c.spec for k, c in corpora.items()},
                                  "unseen": unseen, "calibration": args.calibration_data,
                                  "decomposition_report": report})
        store.close()
        if tokenizer is not None and not os.path.isdir(os.path.join(args.out, "tokenizer")):
            tokenizer.save(os.path.join(args.out, "tokenizer"))
        ranks = {p: s.rank for p, s in member_config.linears if s.rank is not None}
        plot_rank_heatmap(os.path.join(args.out, f"ranks_{name}.png"), ranks,
                          {p: config.matrix_shape(p) for p in config.matrix_paths()}, f"{name}: ranks (– dense)")
        print(f"wrote member {step} ({name}) to {args.out}; load it as {args.out}:{step}")


def cmd_pretrain(args):
    import math

    from plrd_jax.data.corpora import load_dataset
    from plrd_jax.methods.pretrain import (PretrainError, StreamedBatches, WindowBatches, load_tokenizer, model_config,
                                   pretrain, recipe)
    from plrd_jax.io.store import FamilyStore

    accelerator = jax.default_backend() != "cpu"
    data = args.data or ("tfds:c4/en" if accelerator else "wikitext2-heal")
    eval_source = args.eval_data or ("tfds:c4/en:validation" if accelerator else "wikitext2-eval")
    if eval_source == data:
        raise PretrainError(f"--eval-data {eval_source!r} is the training text; give a disjoint source")
    overrides = {k: v for k, v in vars(args).items() if k in ("steps", "lr", "batch_size", "seq_len", "dtype",
                                                             "remat", "rank", "density") and v is not None}
    rcp = recipe(args.preset, args.method, **overrides)
    tokenizer, vocab = load_tokenizer(args.tokenizer or ("t5-base" if accelerator else "smollm2-135m"))
    config = model_config(args.preset, rcp, vocab_size=vocab)
    if data.startswith("tfds:"):
        train = StreamedBatches(data, tokenizer, rcp.seq_len, args.data_dir, seed=args.seed)
    else:
        loaded = load_dataset(data, tokenizer, rcp.seq_len, data_dir=args.data_dir)
        train = WindowBatches(loaded.windows, loaded.spec, seed=args.seed)
    evaluation = load_dataset(eval_source, tokenizer, rcp.seq_len, data_dir=args.data_dir,
                              max_windows=math.ceil(args.eval_tokens / rcp.seq_len))
    store = FamilyStore(args.out)
    if not os.path.isdir(os.path.join(args.out, "tokenizer")):
        tokenizer.save(os.path.join(args.out, "tokenizer"))  # the model loads back as OUT:0
    bar = progress_bar(args.stop_after or rcp.steps, f"pretrain {args.preset} {args.method}", "step")

    def on_event(kind, info):
        if kind == "compiled":
            bar.bar.n = info["resume_step"]
            print(f"compiled step: peak {info['memory']['peak'] / 2**30:.2f} GiB (XLA memory analysis)",
                  file=sys.stderr)
        elif kind == "step":
            bar.bar.set_postfix(loss=f"{info['loss']:.3f}", tok_s=f"{rcp.tokens_per_step / info['seconds']:.0f}")
            bar.bar.update(1)
        elif kind == "eval":
            print(f"  step {info['step']}: eval PPL {info['ppl']:.3f}", file=sys.stderr)

    with bar:
        _, result = pretrain(config, rcp, train, evaluation.windows, store, grad_accum=args.grad_accum,
                             mesh_shape=tuple(int(x) for x in args.mesh.split(",")), seed=args.seed,
                             eval_every=args.eval_every, save_every=args.save_every, stop_after=args.stop_after,
                             on_event=on_event)
    store.close()
    print(f"{args.preset} {args.method}: {result.params:,} params, {result.tokens:,} tokens, "
          f"{result.tokens_per_s:,.0f} tokens/s, eval PPL {result.eval_ppl:.3f} on {eval_source}; "
          f"stored as {args.out}:0" + ("" if result.steps >= rcp.steps else f" (step {result.steps}, resumable)"))


def shear_schedule(args, parent_config):
    """The --preset Sheared schedule with the command line's overrides (targets, domains, budgets), checked
    against the parent before any data is read."""
    import plrd_jax.data.dynamic_loading as dl
    from plrd_jax.nn.masks import TargetShape
    from plrd_jax.methods.sheared import PRESETS, ShearMember

    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    schedule = PRESETS[args.preset]
    members = schedule.members
    if args.target:
        members = []
        for i, spec in enumerate(args.target):
            try:
                layers, hidden, heads, kv, inter = (int(x) for x in spec.split(","))
            except ValueError:
                raise ValueError(f"--target {spec!r}: expected LAYERS,HIDDEN,HEADS,KV_HEADS,INTERMEDIATE") from None
            first = schedule.members[0]  # budgets from the preset's first member unless given
            members.append(ShearMember(f"sheared-{layers}x{hidden}-{heads}h{kv}kv-{inter}",
                                       TargetShape(layers, hidden, heads, inter, kv), first.prune_tokens,
                                       first.continue_tokens))
    members = [dataclasses.replace(m, target=m.target.resolve(parent_config),
                                   prune_tokens=m.prune_tokens if args.prune_tokens is None else args.prune_tokens,
                                   continue_tokens=m.continue_tokens if args.continue_tokens is None
                                   else args.continue_tokens) for m in members]
    domains = schedule.domains
    names = args.domains.split(",") if args.domains else list(domains.names)
    weights = [float(x) for x in args.weights.split(",")] if args.weights else (
        list(domains.weights) if names == list(domains.names) else None)
    refs = dict(_pairs(args.reference_losses, "--reference-losses", float)) if args.reference_losses else (
        dict(zip(domains.names, domains.reference_losses)) if domains.reference_losses and names == list(
            domains.names) else None)
    domains = dl.Domains.build(names, weights, refs, update_every=args.update_every or domains.update_every,
                               smoothing=domains.smoothing, clamp=args.clamp or domains.clamp)
    top = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                             ("continue_update_every", args.continue_update_every),
                             ("validation_windows", args.validation_windows)) if v is not None}
    l0 = schedule.l0 if args.temperature is None else dataclasses.replace(schedule.l0, temperature=args.temperature)
    phase = {k: v for k, v in (("lr", args.lr), ("dtype", args.dtype)) if v is not None}
    return dataclasses.replace(schedule, members=tuple(members), domains=domains, l0=l0,
                               prune=schedule.prune.replace(**phase), heal=schedule.heal.replace(**phase), **top)


def _pairs(text, flag, cast=str):
    out = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE")
        out.append((name, cast(value)))
    return out


def cmd_shear(args):
    import plrd_jax.data.dynamic_loading as dl
    from plrd_jax.data.corpora import load_dataset
    from plrd_jax.evaluation.perplexity import geomean_ratio, perplexities
    from plrd_jax.io.load import load_model
    from plrd_jax.nn.model import count_params
    from plrd_jax.methods.sheared import run_shear
    from plrd_jax.io.store import FamilyStore

    config, params, tokenizer = load_model(args.parent)
    schedule = shear_schedule(args, config)  # bad targets, domains, reference losses: errors before any compute
    sources = dl.resolve_sources(schedule.domains.names, dict(_pairs(args.source, "--source")) if args.source else {})
    check_seq_len(max(args.eval_seq_len, schedule.seq_len), config.max_seq_len)
    corpora, unseen = evaluation_corpora(args, tokenizer, list(sources.values()))
    steps = sum(schedule.prune_steps(m) * schedule.batch_size + schedule.continue_steps(m) * (
        schedule.continue_batch_size or schedule.batch_size) for m in schedule.members)
    windows = {name: load_dataset(src, tokenizer, schedule.seq_len, data_dir=args.data_dir,
                                  max_windows=steps + schedule.validation_windows if src.startswith("tfds:") else None)
               for name, src in sources.items()}
    eval_sets = {n: c.windows for n, c in corpora.items()}
    os.makedirs(args.out, exist_ok=True)
    store = FamilyStore(args.out)
    if tokenizer is not None and not os.path.isdir(os.path.join(args.out, "tokenizer")):
        tokenizer.save(os.path.join(args.out, "tokenizer"))
    parent_ppl = {n: r.ppl for n, r in perplexities(config, params, eval_sets, batch_size=4).items()}
    print(f"parent {args.parent}: {count_params(params):,} params, PPL "
          + ", ".join(f"{n} {v:.4g}" for n, v in parent_ppl.items()) + "; domains " + ", ".join(f"{n}={s} ({len(windows[n].windows)} windows)" for n, s in sources.items()),
          file=sys.stderr)
    bars = {}

    def on_event(kind, info):
        from tqdm.auto import tqdm

        if kind == "references":
            print("reference losses " + ", ".join(f"{n} {x:.3f}" for n, x in zip(info["names"], info["losses"])),
                  file=sys.stderr)
        elif kind == "stage":
            bars[info["member"]] = tqdm(total=info["steps"], desc=f"{info['name']} {info['phase']}", unit="step",
                                        file=sys.stderr, dynamic_ncols=True, initial=info["resume_step"] or 0)
        elif kind == "step":
            bar = bars[info["member"]]
            post = {"loss": f"{info['loss']:.3f}", "tok_s": f"{info['tokens'] / info['seconds']:.0f}"}
            if info["phase"] == "prune":
                post["size"] = f"{info['expected_size'] / info['target_size']:.2f}×target"
            bar.set_postfix(post)
            bar.update(1)
            if info["step"] == info["steps"]:
                bars.pop(info["member"]).close()
        elif kind == "weights":
            print(f"  step {info['step']} domain weights " + ", ".join(
                f"{n} {w:.3f}" for n, w in zip(info["names"], info["weights"])), file=sys.stderr)
        elif kind == "member":
            r = info["result"]
            print(f"  member {r.member} {r.name}: {r.params:,} params ({100 * r.fraction:.1f}%), PPL × parent "
                  f"(geo-mean) pruned {geomean_ratio(r.ppl_before, parent_ppl):.2f} -> continued "
                  f"{geomean_ratio(r.ppl_after, parent_ppl):.2f}" + (" (stored earlier)" if info["restored"] else ""),
                  file=sys.stderr)

    data_spec = {"domains": {n: w.spec for n, w in windows.items()},
                 "eval": {n: c.spec for n, c in corpora.items()}, "unseen": unseen}
    results = run_shear(args.parent, config, params, schedule, {n: w.windows for n, w in windows.items()},
                        eval_sets, store, mesh_shape=tuple(int(x) for x in args.mesh.split(",")),
                        save_every=args.save_every, seed=args.seed, data_spec=data_spec, on_event=on_event)
    store.close()
    print_summary(args.out, "shear_", results, count_params(params), parent_ppl, unseen,
                  "Sheared members, continued: PPL / parent's per corpus")
    for r in results:
        state = dl.LoaderState((), (), tuple((s, tuple(w)) for s, w in r.domain_weights))
        dl.plot_weights(os.path.join(args.out, f"domain_weights_{r.name}.png"), state, schedule.domains.names,
                        title=f"Domain weights, {r.name}")
    print(f"wrote {args.out}/domain_weights_*.png")


def cmd_zeroshot(args):
    from plrd_jax.io.load import load_model
    from plrd_jax.reporting.summary import markdown_table
    from plrd_jax.evaluation.zeroshot import evaluate_task, load_task, task_names

    tasks = [load_task(name, args.data_dir, args.limit) for name in task_names(args.task)]  # all checked first
    config, params, tokenizer = load_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise ValueError(f"{args.model} carries no tokenizer; zero-shot scoring needs one")
    results = []
    for task in tasks:
        with progress_bar(None, task.name, "req") as bar:
            def progress(done, total, bar=bar):
                bar.total = total
                bar.update(done - bar.n)
            results.append(evaluate_task(config, params, tokenizer, task, batch_size=args.batch_size,
                                         add_bos=args.bos, progress=progress))
    rows = [[r.task, str(r.examples), f"{100 * r.acc:.2f}", f"{100 * r.acc_norm:.2f}", f"{100 * r.acc_stderr:.2f}",
             t.source] for r, t in zip(results, tasks)]
    print(f"model {args.model}, zero-shot, lm-eval scoring{' (BOS prepended)' if args.bos else ''}")
    print(markdown_table(rows, ("task", "examples", "acc %", "acc_norm %", "± stderr", "data")))
    if args.out and jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "bos": args.bos,
                       "tasks": {r.task: {**r.summary(), "source": t.source, "lls": r.lls, "golds": r.golds}
                                 for r, t in zip(results, tasks)}}, f)
        print(f"wrote {args.out}")


def cmd_tables(args):
    from plrd_jax.reporting.papers import collect, render

    table = render(collect(args.paths, args.zeroshot))
    print(table)
    if args.out and jax.process_index() == 0:
        with open(args.out, "w") as f:
            f.write(table)
        print(f"wrote {args.out}")


# ---- helpers ------------------------------------------------------------------------------------
def params_by_kind(params) -> dict[str, tuple[int, list[int]]]:
    """Parameter count per matrix kind (embed, q, k, ..., norm) and the ranks of factorized ones."""
    out: dict[str, list] = defaultdict(lambda: [0, []])
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", str(k)) for k in path]
        kind = "norm" if keys[-1] == "scale" else ("embed" if keys[0] == "embed" else keys[-2])
        out[kind][0] += leaf.size
        if keys[-1] == "A":
            out[kind][1].append(leaf.shape[1])
    return {k: (v[0], v[1]) for k, v in out.items()}


def check_seq_len(seq_len: int, context: int):
    if seq_len > context:
        raise ValueError(f"--seq-len {seq_len} is larger than the model's context of {context} tokens")


class progress_bar:
    """A tqdm bar on stderr (the library reports progress through callbacks; the CLI draws it)."""

    def __init__(self, total, desc, unit="it"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()


def known_errors() -> tuple[type[BaseException], ...]:
    """User-facing error classes: printed as one line, not as a traceback."""
    import importlib

    classes = [FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError]
    for module, name in ():
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m plrd_jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="perplexity over non-overlapping windows")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--data", default="wikitext2-test",
                   help="pydoc, wikitext2-test, wikitext2-heal, wikitext2-eval, tinyshakespeare, books[-heal|-eval], "
                        "speeches[-heal|-eval], a file/glob, tfds:NAME; several comma-separated")
    e.add_argument("--data-dir", default=None, help="TFDS data_dir (e.g. gs://bucket/tfds)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=None, help="score only the first ceil(N/seq_len) windows")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype")
    e.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="config and parameter counts per matrix kind")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    i.set_defaults(func=cmd_info)

    g = sub.add_parser("generate", help="let the model talk (KV cache, greedy or sampled)")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the ChatML template (SmolLM2-Instruct)")
    g.add_argument("--bos", action="store_true", help="prepend the BOS token")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("export", help="write a Hugging Face safetensors directory (dense weights)")
    x.add_argument("--model", default=DEFAULT_MODEL)
    x.add_argument("--out", required=True)
    x.set_defaults(func=cmd_export)

    f = sub.add_parser("family", help="build a single-parent family (progressive low-rank decomposition)")
    f.add_argument("--parent", default=DEFAULT_MODEL)
    f.add_argument("--schedule", default="plrd",
                   help="a preset (plrd, minitron, plrd-tpu, mistral-7b-3.1b, llama2-7b-3.3b) or budget fractions "
                        "'0.9,0.75'")
    f.add_argument("--out", required=True, help="family directory (Orbax store, tables, plot)")
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
    f.add_argument("--eval-seq-len", type=int, default=512)
    f.add_argument("--eval-tokens", type=int, default=4096, help="evaluation windows: ceil(N / eval-seq-len)")
    f.add_argument("--heal-tokens", default=None,
                   help="healing tokens per member, one number or one per member (overrides the preset)")
    f.add_argument("--method", choices=["plrd", "minitron"], default=None,
                   help="how members are cut: low-rank (plrd) or Minitron importance pruning (default: the preset's)")
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--seq-len", type=int, default=None, help="healing sequence length")
    f.add_argument("--grad-accum", type=int, default=None)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--kd-weight", type=float, default=None, help="distillation weight (0 = cross-entropy only)")
    f.add_argument("--kd-temperature", type=float, default=None, help="distillation temperature (default 1)")
    f.add_argument("--kd-top-k", type=int, default=None,
                   help="distil from the teacher's top-k logits per position only (default 0: all logits)")
    f.add_argument("--teacher", choices=["parent", "previous"], default=None,
                   help="who distils into each member: the parent, or the healed previous member")
    f.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="healing compute dtype")
    f.add_argument("--one-shot", action="store_true", help="every member straight from the parent")
    f.add_argument("--multiple-of", type=int, default=None, help="round ranks to a multiple of this")
    f.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor mesh shape (-1: the rest)")
    f.add_argument("--save-every", type=int, default=4, help="healing checkpoint every N steps (resume)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--decomposition", choices=["svd", "whitened", "asvd", "fisher"], default=None,
                   help="how each member's factors are computed (default: the preset's, whitened for plrd; "
                        "all but svd calibrate on the healing text first)")
    f.add_argument("--allocation", choices=["uniform", "energy", "sensitivity"], default=None,
                   help="how ranks spread over the matrices at each member's budget (default uniform)")
    f.add_argument("--calibration-windows", type=int, default=None,
                   help="calibrate on the first N healing windows (default 32)")
    f.set_defaults(func=cmd_family)

    c = sub.add_parser("compress", help="one member straight from a model: decomposition × rank allocation")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--reduction", type=float, required=True, help="fraction of all parameters removed, e.g. 0.2")
    c.add_argument("--decomposition", choices=["svd", "whitened", "asvd", "fisher"], default="whitened")
    c.add_argument("--alpha", type=float, default=0.5, help="asvd exponent")
    c.add_argument("--allocation", choices=["uniform", "energy", "sensitivity"], default="uniform")
    c.add_argument("--matrices", default="attn,mlp", help="groups, globs or re: patterns, comma-separated")
    c.add_argument("--multiple-of", type=int, default=8)
    c.add_argument("--sparse-density", type=float, default=0.0,
                   help="also keep a sparse part S (this fraction of each matrix's entries): A B + S members")
    c.add_argument("--sparse-method", choices=["auto", "scatter", "gather"], default="gather",
                   help="how the member applies S: gather (never a dense matrix), or by shape / via a dense "
                        "temporary (faster for long inputs on CPU)")
    c.add_argument("--calibration-data", default=DEFAULT_HEAL_DATA,
                   help="a source or weighted mixture (A=w,B=w), disjoint from every --eval-data corpus")
    c.add_argument("--calibration-windows", type=int, default=32)
    c.add_argument("--sample-temperature", type=float, default=1.0,
                   help="temperature of the parent-samples source (text the parent writes itself)")
    c.add_argument("--sequential", action="store_true",
                   help="calibrate layer by layer: each layer's statistics from the inputs the already compressed "
                        "layers before it produce (ranks still from the one-pass statistics)")
    c.add_argument("--calibration-seq-len", type=int, default=512)
    c.add_argument("--eval-data", default=DEFAULT_EVAL_DATA, help="evaluation corpora, comma-separated")
    c.add_argument("--eval-seq-len", type=int, default=512)
    c.add_argument("--eval-tokens", type=int, default=4096)
    c.add_argument("--data-dir", default=None, help="TFDS data_dir")
    c.add_argument("--out", default=None, help="store the member here (loads as OUT:N)")
    c.set_defaults(func=cmd_compress)

    s = sub.add_parser("shear", help="Sheared-LLaMA members: targeted structured pruning + continued training")
    s.add_argument("--parent", default=DEFAULT_MODEL)
    s.add_argument("--preset", default="sheared-smollm2",
                   help="sheared-smollm2 (CPU), llama2-7b-1.3b, llama2-7b-2.7b (TPU scale; give --source per domain)")
    s.add_argument("--out", required=True, help="family directory (may already hold PLRD members)")
    s.add_argument("--target", action="append", default=None,
                   help="LAYERS,HIDDEN,HEADS,KV_HEADS,INTERMEDIATE (repeat for several members; replaces the preset's)")
    s.add_argument("--domains", default=None,
                   help="comma-separated domain names (local: wikitext, books, speeches, shakespeare, pydoc; "
                        "default the preset's: wikitext, books, speeches)")
    s.add_argument("--source", default=None, help="NAME=SOURCE,... data source of a domain (file glob or tfds:NAME)")
    s.add_argument("--weights", default=None, help="initial domain weights, comma-separated, summing to 1")
    s.add_argument("--reference-losses", default=None,
                   help="NAME=LOSS,... for every domain (default: the preset's, else measured on the parent)")
    s.add_argument("--clamp", action="store_true", help="clamp the loss gap at 0 (the paper's rule)")
    s.add_argument("--update-every", type=int, default=None, help="domain-weight update interval while pruning")
    s.add_argument("--continue-update-every", type=int, default=None, help="... while continuing")
    s.add_argument("--validation-windows", type=int, default=None, help="held-out windows per domain")
    s.add_argument("--prune-tokens", type=int, default=None)
    s.add_argument("--continue-tokens", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--seq-len", type=int, default=None)
    s.add_argument("--lr", type=float, default=None, help="model learning rate of both phases")
    s.add_argument("--temperature", type=float, default=None, help="hard-concrete β (code 2/3, paper 0.83)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype")
    s.add_argument("--eval-data", default=DEFAULT_EVAL_DATA,
                   help="evaluation corpora, comma-separated, disjoint from every domain")
    s.add_argument("--eval-seq-len", type=int, default=512)
    s.add_argument("--eval-tokens", type=int, default=4096)
    s.add_argument("--data-dir", default=None, help="TFDS data_dir")
    s.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor mesh shape (-1: the rest)")
    s.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (resume)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_shear)

    t = sub.add_parser("pretrain", help="train a GaLore-benchmark model from scratch (full, lowrank, cola, "
                                        "cola-m, sltrain)")
    t.add_argument("--preset", default="llama-60m", help="llama-20m, llama-60m, llama-130m, llama-350m, llama-1b")
    t.add_argument("--method", default="full", help="full, lowrank, cola, cola-m, sltrain")
    t.add_argument("--out", required=True, help="run directory (Orbax store; the model loads back as OUT:0)")
    t.add_argument("--data", default=None, help="training text (default tfds:c4/en on GPU/TPU, else wikitext2-heal)")
    t.add_argument("--eval-data", default=None,
                   help="disjoint evaluation text (default tfds:c4/en:validation on GPU/TPU, else wikitext2-eval)")
    t.add_argument("--data-dir", default=None, help="TFDS data_dir")
    t.add_argument("--tokenizer", default=None, help="t5-base (default on GPU/TPU), smollm2-135m (default on CPU), "
                                                     "an HF directory or tokenizer.json")
    t.add_argument("--eval-tokens", type=int, default=10_000_000, help="evaluation windows: ceil(N / seq-len)")
    t.add_argument("--steps", type=int, default=None, help="schedule length (default the preset's)")
    t.add_argument("--stop-after", type=int, default=None, help="stop (resumably) after this many steps")
    t.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 512)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    t.add_argument("--seq-len", type=int, default=None, help="default 256")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default the method's)")
    t.add_argument("--rank", type=int, default=None, help="factor rank (default d/4)")
    t.add_argument("--density", type=float, default=None, help="SLTrain's sparse density (default 0.03)")
    t.add_argument("--remat", default=None, help="none, full, dots, bottleneck (cola-m: bottleneck)")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (default bf16)")
    t.add_argument("--eval-every", type=int, default=1000)
    t.add_argument("--save-every", type=int, default=1000)
    t.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor mesh shape (-1: the rest)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_pretrain)

    z = sub.add_parser("zeroshot", help="zero-shot multiple-choice accuracy (lm-eval scoring: acc, acc_norm)")
    z.add_argument("--model", default=DEFAULT_MODEL)
    z.add_argument("--task", action="append", required=True,
                   help="a .jsonl file, a task name (boolq, winogrande, hellaswag, piqa, arc_easy, arc_challenge, "
                        "sciq, logiqa, mmlu), tfds:NAME, or a suite (plrd, sheared); repeatable")
    z.add_argument("--data-dir", default=None, help="NAME.jsonl files of named tasks, or the TFDS data_dir")
    z.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    z.add_argument("--batch-size", type=int, default=16)
    z.add_argument("--bos", action="store_true", help="prepend BOS to every request (lm-eval add_bos_token=True)")
    z.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    z.add_argument("--out", default=None, help="JSON with every task's scores and per-choice log-likelihoods")
    z.set_defaults(func=cmd_zeroshot)

    tb = sub.add_parser("tables", help="Markdown tables of our runs beside the papers' published numbers")
    tb.add_argument("paths", nargs="+", help="family directories and experiment result .json files")
    tb.add_argument("--zeroshot", action="append", default=[], help="zeroshot --out JSON files (repeatable)")
    tb.add_argument("--out", default=None, help="also write the Markdown here")
    tb.set_defaults(func=cmd_tables)
    return p


def main(argv=None) -> int:
    from plrd_jax.training.distributed import initialize, main_process_output, report_error

    args = build_parser().parse_args(argv)
    try:
        initialize()  # a multi-host run when the environment says so (tpu/tpu.py launch); else nothing
        with main_process_output():  # logs and progress bars from process 0 only
            args.func(args)
    except known_errors() as err:
        report_error(f"error: {err}")
        return 2
    return 0
