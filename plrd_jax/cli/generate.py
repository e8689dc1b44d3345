"""`generate`: let the model talk (KV cache, greedy or sampled)."""
from __future__ import annotations

import sys
import time

from plrd_jax.cli.common import DEFAULT_MODEL, DTYPES, nonnegative_int

RESUMES = False


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="let the model talk (KV cache, greedy or sampled)")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=nonnegative_int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the ChatML template (SmolLM2-Instruct)")
    g.add_argument("--bos", action="store_true", help="prepend the BOS token")
    g.add_argument("--dtype", choices=DTYPES, default=None)
    g.set_defaults(func=run, resumes=RESUMES)


def run(args) -> None:
    from plrd_jax.evaluation.generate import generate
    from plrd_jax.io.load import load_model

    config, params, tokenizer = load_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise ValueError(f"{args.model} carries no tokenizer; generating text needs one")
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
