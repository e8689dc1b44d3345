"""Command line: `python -m plrd_jax {eval,info,generate,export,family} ...`.

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
    from plrd_jax.data import load_dataset
    from plrd_jax.evaluate import perplexity
    from plrd_jax.io.load import load_model

    config, params, tokenizer = load_model(args.model, dtype=args.dtype)
    check_seq_len(args.seq_len, config.max_seq_len)
    windows = -(-args.max_tokens // args.seq_len) if args.max_tokens else None
    data = load_dataset(args.data, tokenizer, args.seq_len, data_dir=args.data_dir, max_windows=windows)
    with progress_bar(len(data), "eval", "win") as bar:
        result = perplexity(config, params, data.windows, batch_size=args.batch_size, progress=lambda done, total: bar.update(done - bar.n))
    print(f"model {args.model}  data {args.data}  window {result.seq_len}  windows {result.windows}  "
          f"tokens scored {result.tokens}  mean NLL {result.nll:.4f}  PPL {result.ppl:.3f}")
    if args.json:
        print(json.dumps({"model": args.model, "data": data.spec, **result.to_dict()}))


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
    from plrd_jax.generate import generate
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
    from plrd_jax.family import PRESETS, Schedule, _stages

    if args.schedule in PRESETS:
        schedule = PRESETS[args.schedule]
    else:
        try:
            fractions = [float(x) for x in args.schedule.split(",")]
        except ValueError:
            raise ValueError(f"--schedule {args.schedule!r} is neither a preset ({', '.join(PRESETS)}) "
                             "nor comma-separated budget fractions like 0.9,0.75") from None
        schedule = Schedule(_stages(fractions, PRESETS["plrd"].stages[0].heal_tokens))
    heal = {k: v for k, v in (("lr", args.lr), ("kd_weight", args.kd_weight), ("dtype", args.dtype),
                              ("grad_accum", args.grad_accum)) if v is not None}
    top = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len),
                             ("multiple_of", args.multiple_of)) if v is not None}
    stages = schedule.stages
    if args.heal_tokens is not None:
        stages = tuple(dataclasses.replace(s, heal_tokens=args.heal_tokens) for s in stages)
    return dataclasses.replace(schedule, stages=stages, progressive=not args.one_shot,
                               heal=schedule.heal.replace(**heal), **top)


def cmd_family(args):
    from plrd_jax.data import load_dataset
    from plrd_jax.evaluate import perplexity
    from plrd_jax.family import run_family
    from plrd_jax.io.load import load_model
    from plrd_jax.model import count_params
    from plrd_jax.report import family_rows, markdown_table, plot_ppl_vs_params, write_csv
    from plrd_jax.store import FamilyStore

    schedule = family_schedule(args)
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    config, params, tokenizer = load_model(args.parent)
    check_seq_len(max(args.eval_seq_len, schedule.seq_len), config.max_seq_len)
    streamed = args.data.startswith("tfds:")  # read only as many windows as the schedule consumes
    needed = sum(schedule.steps(s) for s in schedule.stages) * schedule.batch_size * schedule.heal.grad_accum
    heal_data = load_dataset(args.data, tokenizer, schedule.seq_len, data_dir=args.data_dir,
                             max_windows=max(needed, 1) if streamed else None)
    eval_data = load_dataset(args.eval_data, tokenizer, args.eval_seq_len, data_dir=args.data_dir,
                             max_windows=-(-args.eval_tokens // args.eval_seq_len))
    os.makedirs(args.out, exist_ok=True)
    store = FamilyStore(args.out)
    if tokenizer is not None and not os.path.isdir(os.path.join(args.out, "tokenizer")):
        tokenizer.save(os.path.join(args.out, "tokenizer"))  # members load with it as FAMILY_DIR:N
    parent_ppl = perplexity(config, params, eval_data.windows, batch_size=4).ppl
    print(f"parent {args.parent}: {count_params(params):,} params, PPL {parent_ppl:.3f} on {args.eval_data} "
          f"({eval_data.spec['windows']} windows of {args.eval_seq_len})", file=sys.stderr)
    bars = {}

    def on_event(kind, info):
        if kind == "stage":
            from tqdm.auto import tqdm

            bars[info["member"]] = tqdm(total=info["steps"], 
                                        desc=f"member {info['member']} {info['name']}", unit="step",
                                        file=sys.stderr, dynamic_ncols=True)
        elif kind == "step":
            bar = bars[info["member"]]
            bar.n = info["step"] - 1
            bar.set_postfix(loss=f"{info['loss']:.3f}", tok_s=f"{info['tokens'] / info['seconds']:.0f}")
            bar.update(1)
        elif kind == "eval":
            print(f"  member {info['member']} PPL {info['when']} heal: {info['ppl']:.4g}", file=sys.stderr)
        elif kind == "member":
            r = info["result"]
            if r.member in bars:
                bars.pop(r.member).close()
            print(f"  member {r.member} {r.name}: {r.params:,} params ({100 * r.fraction:.1f}%), "
                  f"PPL {r.ppl_before:.4g} -> {r.ppl_after:.4g}" + (" (stored earlier)" if info["restored"] else ""),
                  file=sys.stderr)

    data_spec = {"heal": heal_data.spec, "eval": eval_data.spec}
    results = run_family(args.parent, config, params, schedule, heal_data, eval_data.windows, store,
                         mesh_shape=mesh_shape, save_every=args.save_every, seed=args.seed, data_spec=data_spec,
                         on_event=on_event)
    store.close()
    rows = family_rows(results, count_params(params), parent_ppl)
    table = markdown_table(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table)
    write_csv(os.path.join(args.out, "summary.csv"), rows)
    label = "progressive" if schedule.progressive else "one-shot"
    plot_ppl_vs_params(os.path.join(args.out, "ppl_vs_params.png"),
                       {f"{label}, before heal": [(r.params, r.ppl_before) for r in results],
                        f"{label}, healed": [(r.params, r.ppl_after) for r in results]},
                       (count_params(params), parent_ppl))
    print(table)
    print(f"wrote {args.out}/summary.md, summary.csv, ppl_vs_params.png")


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
                   help="pydoc, wikitext2-test, wikitext2-heal, wikitext2-eval, tinyshakespeare, a file/glob, tfds:NAME")
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
                   help="a preset (plrd, plrd-tpu, mistral-7b-3.1b, llama2-7b-3.3b) or budget fractions '0.9,0.75'")
    f.add_argument("--out", required=True, help="family directory (Orbax store, tables, plot)")
    f.add_argument("--data", default="wikitext2-heal", help="healing text (see eval --data)")
    f.add_argument("--eval-data", default="wikitext2-eval", help="evaluation text, disjoint from --data")
    f.add_argument("--data-dir", default=None, help="TFDS data_dir")
    f.add_argument("--eval-seq-len", type=int, default=512)
    f.add_argument("--eval-tokens", type=int, default=4096, help="evaluation windows: ceil(N / eval-seq-len)")
    f.add_argument("--heal-tokens", type=int, default=None, help="healing tokens per member (overrides preset)")
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--seq-len", type=int, default=None, help="healing sequence length")
    f.add_argument("--grad-accum", type=int, default=None)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--kd-weight", type=float, default=None, help="distillation weight (0 = cross-entropy only)")
    f.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="healing compute dtype")
    f.add_argument("--one-shot", action="store_true", help="every member straight from the parent")
    f.add_argument("--multiple-of", type=int, default=None, help="round ranks to a multiple of this")
    f.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor mesh shape (-1: the rest)")
    f.add_argument("--save-every", type=int, default=4, help="healing checkpoint every N steps (resume)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_family)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except known_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
