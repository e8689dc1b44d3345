"""An lm-evaluation-harness model: `lm_eval --model plrd_jax --model_args model=FAMILY_DIR:N ...`.

Registration. The package declares `plrd_jax = "plrd_jax.evaluation.lm_eval_model:PlrdJaxLM"` in the entry-point
group `lm_eval.models` (pyproject.toml), the group lm-eval's plugin discovery reads (`load_plugins` in
lm_eval/api/registry.py, EleutherAI/lm-evaluation-harness PR #4013: `get_model` registers every entry point of the
group as a lazy placeholder, so this module is imported only when `--model plrd_jax` is asked for). lm-eval releases
up to 0.4.13 (and 0.5.0.dev1) read no entry points; with them, importing this module registers the model
(`@register_model`), so
  - in Python: `import plrd_jax.evaluation.lm_eval_model` before `lm_eval.simple_evaluate(model="plrd_jax", ...)`
    (or pass `PlrdJaxLM(model=...)` itself as `model=`);
  - on the command line: `plrd-jax-lm-eval ARGS` (or `python -m plrd_jax.evaluation.lm_eval_model ARGS`), which
    is `lm_eval ARGS` with this model registered.
Only this module imports lm_eval; nothing else in the package imports this module.

Requests (all three scored on the member as stored, factorized matrices included, compute dtype `dtype`):
  loglikelihood          (context, continuation) -> (Σ_{t ∈ cont} log p(x_t | x_<t), all of cont greedy), the
                         pair tokenized as lm-eval's HF model does (`zeroshot.encode_pair`), scored by
                         `zeroshot.loglikelihoods`: sorted by length, right-padded to power-of-two buckets, one
                         jitted forward per (batch_size, bucket), left-truncated to max_length + 1 tokens.
  loglikelihood_rolling  text -> Σ_t log p(x_t | x_<t) over all its tokens, the first conditioned on the prefix
                         token (BOS, else EOS): lm-eval's disjoint rolling windows of max_length tokens
                         (`get_rolling_token_windows`, context_len 1), scored as loglikelihood pairs, batched.
  generate_until         (context, gen_kwargs) -> text: `generate_batch` decodes batch_size prompts together with
                         one KV cache (one jitted prefill, one jitted step per position), greedy unless do_sample;
                         a row stops at EOS, at max_gen_toks, or once its text holds a stop string; the text is cut
                         at the first stop string, as lm-eval's HF model cuts it.
"""
from __future__ import annotations

import json
import logging
import sys
from functools import partial

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  the built-in models' placeholders, before ours makes the registry non-empty
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import MODEL_REGISTRY, register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from plrd_jax.evaluation.generate import decode_step
from plrd_jax.evaluation.zeroshot import encode_pair, loglikelihoods
from plrd_jax.io.load import load_model
from plrd_jax.nn.accounting import count_params
from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import Decoder, init_cache

MODEL_NAME = "plrd_jax"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF default
log = logging.getLogger(__name__)


# ---- batched KV-cache generation ---------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("config", "temperature"))
def prefill(config: ModelConfig, params, prompt, cache, key, temperature: float):
    """prompt [B, m] (real tokens of every row) written at positions 0..m−1 of the cache; returns (the token each
    row would write at position m, (B,), picked greedily or at `temperature`; the cache)."""
    positions = jnp.broadcast_to(jnp.arange(prompt.shape[1]), prompt.shape)
    logits, cache = Decoder(config).apply({"params": params}, prompt, cache=cache, positions=positions)
    last = logits[:, -1].astype(jnp.float32)
    token = jnp.argmax(last, -1) if temperature == 0.0 else jax.random.categorical(key, last / temperature, -1)
    return token, cache


def prefill_length(shortest: int) -> int:
    """How many prompt tokens the batched prefill takes: `shortest` rounded down to 8 steps per octave
    (16, 18, ..., 30, 32, 36, ...), so few prefill shapes compile and at most 1/8 of it is stepped instead."""
    if shortest < 16:
        return shortest
    step = 1 << (shortest.bit_length() - 4)
    return shortest - shortest % step


def _cache_length(needed: int, limit: int) -> int:
    return min(limit, max(16, 1 << (needed - 1).bit_length()))


def generate_batch(config: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int,
                   temperature: float = 0.0, seed: int = 0, stop_token: int | None = None,
                   done=None) -> list[list[int]]:
    """New tokens for each prompt (token lists of any lengths ≥ 1), all rows decoded together.

    Every row's first m = prefill_length(shortest prompt) tokens go through one jitted prefill; then one jitted
    `decode_step` per position s writes every row's token at s: its own prompt token while s < its length
    (teacher forcing writes the cache slot a prefill would), its last new token after. The causal mask hides
    slots > s, so each row attends to exactly its own prompt and continuation, as alone; greedy decoding gives
    `generate`'s tokens. A row ends at `stop_token` (not returned), after max_new_tokens, or once
    `done(row, new_tokens)` is true. Shapes: prefill [B, m], the step [B] with a cache of a power-of-two length.
    """
    if not prompts or min(map(len, prompts)) < 1 or max_new_tokens < 1:
        raise ValueError("generate_batch needs non-empty prompts and max_new_tokens >= 1")
    lengths = [len(p) for p in prompts]
    end = max(lengths) + max_new_tokens - 1  # the last position that is ever written
    if end >= config.max_seq_len:
        raise ValueError(f"prompt ({max(lengths)}) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"of {config.max_seq_len} tokens")
    m = prefill_length(min(lengths))
    key = jax.random.key(seed)
    cache = init_cache(config, len(prompts), _cache_length(end + 1, config.max_seq_len))
    key, sub = jax.random.split(key)
    token, cache = prefill(config, params, jnp.asarray([p[:m] for p in prompts], jnp.int32), cache, sub, temperature)
    out = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for position in range(m, end + 1):
        picked = np.asarray(token)
        for i, n in enumerate(lengths):
            if finished[i] or position < n:  # still reading its prompt: the pick is not a new token
                continue
            if int(picked[i]) == stop_token:
                finished[i] = True
                continue
            out[i].append(int(picked[i]))
            finished[i] = len(out[i]) >= max_new_tokens or (done is not None and done(i, out[i]))
        if all(finished):
            break
        feed = [p[position] if position < n else (o[-1] if o else 0) for p, n, o in zip(prompts, lengths, out)]
        key, sub = jax.random.split(key)
        token, cache = decode_step(config, params, jnp.asarray(feed, jnp.int32), position, cache, sub, temperature)
    return out


# ---- generation kwargs as lm-eval gives them -----------------------------------------------------------------
def generation_settings(gen_kwargs: dict, default_max_gen_toks: int,
                        eos_text: str | None) -> tuple[list[str], int, float]:
    """(stop strings with the EOS text added, max new tokens, temperature) from a request's gen_kwargs, read as
    lm-eval's HF model reads them: `until` a string or list; max_gen_toks > max_new_tokens > max_tokens;
    temperature only with do_sample (or, without do_sample, when > 0). Other keys (top_p, ...) are ignored."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    if eos_text and eos_text not in until:
        until.append(eos_text)
    limit = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
                  if kwargs.get(k) is not None), default_max_gen_toks)
    temperature = float(kwargs.get("temperature") or 0.0)
    do_sample = kwargs.get("do_sample")
    if do_sample is False or (do_sample is None and temperature <= 0.0):
        temperature = 0.0
    ignored = sorted(set(kwargs) - {"max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens",
                                    "temperature", "do_sample"})
    if ignored:
        log.warning("plrd_jax ignores the generation settings %s", ", ".join(ignored))
    return until, int(limit), temperature


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first occurrence of each stop string in turn (lm-eval's postprocessing)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _batch_size(value) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    value = int(value)
    if value < 1:
        raise ValueError(f"batch_size {value} must be >= 1")
    return value


# ---- the model -------------------------------------------------------------------------------------------------
class PlrdJaxLM(LM):
    """lm-eval's LM over `load_model(model)`: a family member "FAMILY_DIR:N" (or NAME), an HF dir, a GGUF or
    "smollm2-135m".

    model_args: model (or pretrained), dtype (param and compute dtype; default as stored), batch_size (rows per
    jitted call; "auto" means 16), max_length (context in tokens; default the model's max_seq_len),
    max_gen_toks (default 256), add_bos_token (prepend BOS to every request, default False). lm-eval's device
    and max_batch_size are accepted and ignored: JAX runs on its default device. A scoring batch holds
    batch_size × bucket × vocab float32 log-probs (as lm-eval's HF model does): for rolling windows of the full
    context (SmolLM2: 8192 tokens × 49152) pass a small batch_size or a smaller max_length.
    """

    def __init__(self, model: str | None = None, pretrained: str | None = None, dtype: str | None = None,
                 batch_size=None, max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: bool = False, device=None, max_batch_size=None, seed: int = 0) -> None:
        super().__init__()
        if (model is None) == (pretrained is None):
            raise ValueError("give the model as model=SPEC (or pretrained=SPEC): FAMILY_DIR:N, an HF dir, a GGUF or "
                             "smollm2-135m")
        self.spec = str(model if model is not None else pretrained)
        dtype = None if dtype in (None, "auto") else dtype
        self.config, self.params, self.tokenizer = load_model(self.spec, dtype=dtype)
        if self.tokenizer is None:
            raise ValueError(f"{self.spec} carries no tokenizer; lm-eval's requests are text")
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or self.config.max_seq_len)
        if not 2 <= self.max_length <= self.config.max_seq_len:
            raise ValueError(f"max_length {self.max_length} must lie in [2, {self.config.max_seq_len}]")
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.seed = int(seed)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling text's first token) is conditioned on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def get_model_info(self) -> dict:
        return {"model_spec": self.spec, "model_num_parameters": count_params(self.params),
                "model_dtype": self.config.dtype, "factorized_matrices": len(self.config.linears or {})}

    # ---- requests -------------------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        return loglikelihoods(self.config, self.params, pairs, batch_size=self.batch_size, max_length=self.max_length)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """[(Σ log p(continuation | context), is_greedy)] for requests with args (context, continuation)."""
        pairs = [encode_pair(self.tokenizer, ctx, cont, self.add_bos_token) for ctx, cont in (r.args for r in requests)]
        ll, greedy = self._score(pairs)
        out = [(float(x), bool(g)) for x, g in zip(ll, greedy)]
        for request, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """[Σ_t log p(x_t | x_<t) over the whole text] for requests with args (text,): lm-eval's rolling windows
        of max_length tokens, each token predicted once, all windows of all texts scored in shared batches."""
        windows, owners = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            tokens = self.tokenizer.encode(text, add_bos=self.add_bos_token)
            for window in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(k)
        totals = np.zeros(len(requests), np.float64)
        if windows:
            ll, _ = self._score(windows)
            np.add.at(totals, np.asarray(owners), ll)
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """[generated text] for requests with args (context, gen_kwargs): requests with equal gen_kwargs, longest
        prompts first, decoded batch_size at a time by `generate_batch`; see `generation_settings`."""
        eos = self.tokenizer.eos_token_id
        eos_text = None if eos is None else self.tokenizer.decode([eos])
        groups: dict[str, list[int]] = {}
        for k, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(k)
        out: list[str | None] = [None] * len(requests)
        for group in groups.values():
            until, max_new, temperature = generation_settings(requests[group[0]].args[1], self.max_gen_toks, eos_text)
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} must be below max_length {self.max_length}")
            room = self.max_length - max_new  # prompts are left-truncated to leave room for max_new tokens
            prompts = {k: self.tokenizer.encode(requests[k].args[0], add_bos=self.add_bos_token)[-room:] for k in group}
            order = sorted(group, key=lambda k: -len(prompts[k]))
            for b in range(0, len(order), self.batch_size):
                rows = order[b:b + self.batch_size]
                texts = self._generate_rows([prompts[k] or [self.prefix_token_id] for k in rows], max_new,
                                            temperature, until, eos)
                for k, text in zip(rows, texts):
                    out[k] = text
                    self.cache_hook.add_partial("generate_until", requests[k].args, text)
        return out

    def _generate_rows(self, prompts: list[list[int]], max_new: int, temperature: float, until: list[str],
                       eos: int | None) -> list[str]:
        """Texts of `generate_batch` over prompts padded to batch_size rows (one step shape per batch size)."""
        padded = prompts + [prompts[-1]] * (self.batch_size - len(prompts))

        def done(row: int, tokens: list[int]) -> bool:
            if row >= len(prompts):
                return True
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            return any(stop and stop in text for stop in until)

        new = generate_batch(self.config, self.params, padded, max_new, temperature, self.seed, eos, done)
        return [cut_at_stop(self.tokenizer.decode(t, skip_special_tokens=True), until) for t in new[:len(prompts)]]


if __name__ != "__main__" and MODEL_NAME not in MODEL_REGISTRY:
    # Not twice: when lm-eval loads this module through its `lm_eval.models` entry point, the alias already holds
    # that placeholder, which lm-eval replaces by this class itself.
    register_model(MODEL_NAME)(PlrdJaxLM)


def main() -> None:
    """`lm_eval` with this model registered (the command line for lm-eval releases without entry-point plugins)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    import importlib

    sys.argv[0] = "plrd-jax-lm-eval"
    importlib.import_module("plrd_jax.evaluation.lm_eval_model").main()
