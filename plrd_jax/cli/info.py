"""`info`: config and parameter counts per matrix kind."""
from __future__ import annotations

from collections import defaultdict

import jax

from plrd_jax.cli.common import DEFAULT_MODEL

RESUMES = False


def register(subparsers) -> None:
    i = subparsers.add_parser("info", help="config and parameter counts per matrix kind")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    i.set_defaults(func=run, resumes=RESUMES)


def run(args) -> None:
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
