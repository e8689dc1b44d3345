"""`pretrain`: train a GaLore-benchmark model from scratch (full, lowrank, cola, cola-m, sltrain)."""
from __future__ import annotations

import math
import os
import sys

import jax

from plrd_jax.cli.common import DTYPES, MESH_HELP, check_out_dir, nonnegative_int, positive_int, progress_bar

RESUMES = True


def register(subparsers) -> None:
    t = subparsers.add_parser("pretrain", help="train a GaLore-benchmark model from scratch (full, lowrank, cola, "
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
    t.add_argument("--eval-tokens", type=positive_int, default=10_000_000,
                   help="evaluation windows: ceil(N / seq-len)")
    _schedule_flags(t)
    t.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default bf16)")
    t.add_argument("--eval-every", type=nonnegative_int, default=1000)
    t.add_argument("--save-every", type=nonnegative_int, default=1000)
    t.add_argument("--mesh", default="1,-1,1", help=MESH_HELP)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run, resumes=RESUMES)


def _schedule_flags(t) -> None:
    t.add_argument("--steps", type=positive_int, default=None, help="schedule length (default the preset's)")
    t.add_argument("--stop-after", type=positive_int, default=None, help="stop (resumably) after this many steps")
    t.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (default 512)")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step")
    t.add_argument("--seq-len", type=positive_int, default=None, help="default 256")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default the method's)")
    t.add_argument("--rank", type=positive_int, default=None, help="factor rank (default d/4)")
    t.add_argument("--density", type=float, default=None, help="SLTrain's sparse density (default 0.03)")
    t.add_argument("--remat", default=None, help="none, full, dots, bottleneck (cola-m: bottleneck)")


def run(args) -> None:
    from plrd_jax.io.store import FamilyStore
    from plrd_jax.data.batches import load_tokenizer
    from plrd_jax.methods.pretrain import PretrainError, model_config, pretrain, recipe

    accelerator = jax.default_backend() != "cpu"
    data = args.data or ("tfds:c4/en" if accelerator else "wikitext2-heal")
    eval_source = args.eval_data or ("tfds:c4/en:validation" if accelerator else "wikitext2-eval")
    if eval_source == data:
        raise PretrainError(f"--eval-data {eval_source!r} is the training text; give a disjoint source")
    overrides = {k: v for k, v in vars(args).items() if k in ("steps", "lr", "batch_size", "seq_len", "dtype",
                                                             "remat", "rank", "density") and v is not None}
    rcp = recipe(args.preset, args.method, **overrides)
    check_out_dir(args.out)
    tokenizer, vocab = load_tokenizer(args.tokenizer or ("t5-base" if accelerator else "smollm2-135m"))
    config = model_config(args.preset, rcp, vocab_size=vocab)
    train, evaluation = _data(args, data, eval_source, tokenizer, rcp)
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


def _data(args, data, eval_source, tokenizer, rcp):
    """(training batches, evaluation windows): streamed for tfds: sources, else windows read once."""
    from plrd_jax.data.windows import load_dataset
    from plrd_jax.data.batches import StreamedBatches, WindowBatches

    if data.startswith("tfds:"):
        train = StreamedBatches(data, tokenizer, rcp.seq_len, args.data_dir, seed=args.seed)
    else:
        loaded = load_dataset(data, tokenizer, rcp.seq_len, data_dir=args.data_dir)
        train = WindowBatches(loaded.windows, loaded.spec, seed=args.seed)
    evaluation = load_dataset(eval_source, tokenizer, rcp.seq_len, data_dir=args.data_dir,
                              max_windows=math.ceil(args.eval_tokens / rcp.seq_len))
    return train, evaluation
