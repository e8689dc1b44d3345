"""Text <-> token ids: a thin `Tokenizer` over the `tokenizers` library.

Built from an HF `tokenizer.json`, or from a GGUF's vocabulary:
  "gpt2"  byte-level BPE from `tokenizer.ggml.tokens` + `merges`, pre-tokenized as `tokenizer.ggml.pre` says
          ("smollm": every digit on its own, then GPT-2's byte-level split, as SmolLM2's own tokenizer does);
  "llama" SentencePiece-style BPE (▁ for spaces, byte fallback), merges ranked by the score of the merged piece.
Tokens of type CONTROL become special added tokens, USER_DEFINED plain added tokens (matched whole in text).
`encode` never adds special tokens unless asked (`add_bos`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from plrd_jax.io.gguf import metadata, open_gguf
from plrd_jax.io.hf import CheckpointError, read_json

NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4  # llama.cpp token types
_GPT2_BYTE_LEVEL = dict(add_prefix_space=False, trim_offsets=True, use_regex=True)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> the pre-tokenizer its merges were learned with.
BYTE_LEVEL_PRE = {
    "default": lambda: pre_tokenizers.ByteLevel(**_GPT2_BYTE_LEVEL),
    "gpt2": lambda: pre_tokenizers.ByteLevel(**_GPT2_BYTE_LEVEL),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(**_GPT2_BYTE_LEVEL)]),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """`encode(text) -> ids` (no BOS unless `add_bos`), `decode(ids) -> text`, `bos/eos_token_id`, `vocab_size`."""

    def __init__(self, backend: Backend, bos_token_id: int | None = None, eos_token_id: int | None = None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    # ---- use ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        prefix = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        return [prefix + e.ids for e in encodings]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer's full definition and its bos/eos ids."""
        text = self.backend.to_str() + json.dumps([self.bos_token_id, self.eos_token_id])
        return hashlib.sha256(text.encode()).hexdigest()

    # ---- files -------------------------------------------------------------------------------------
    def gguf_fields(self, vocab_size: int) -> dict:
        """llama.cpp's `tokenizer.ggml.*` of a byte-level BPE tokenizer (the only kind `Tokenizer.from_gguf` rebuilds
        from tokens + merges): tokens by id padded to `vocab_size` with UNUSED "[PADi]", token types (special added
        tokens CONTROL, other added tokens USER_DEFINED), merges "a b", and the pre-tokenizer's llama.cpp name."""
        spec = json.loads(self.backend.to_str())
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
        if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise CheckpointError(f"a {model.get('type')} tokenizer without a ByteLevel decoder cannot be written to "
                                  f"GGUF; only byte-level BPE tokenizers can")
        names = [n for n in _PRE_NAMES if json.loads(_with_pre(Backend(models.BPE()), BYTE_LEVEL_PRE[n]()))
                 .get("pre_tokenizer") == pre]
        if not names:
            raise CheckpointError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:80]} matches none that GGUF "
                                  f"names ({', '.join(_PRE_NAMES)})")
        tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
        typed = [(t, i, NORMAL) for t, i in model["vocab"].items()]
        typed += [(a["content"], a["id"], CONTROL if a.get("special") else USER_DEFINED)
                  for a in spec.get("added_tokens", [])]
        for token, i, kind in typed:
            if i >= vocab_size:
                raise CheckpointError(f"tokenizer token {token!r} has id {i}, beyond the model's {vocab_size} "
                                      f"embedding rows")
            tokens[i], types[i] = token, kind
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return {"tokens": tokens, "types": types, "merges": merges, "pre": names[0]}

    def save(self, out_dir: str | os.PathLike) -> None:
        """tokenizer.json + tokenizer_config.json, readable by transformers' AutoTokenizer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        bos, eos = (None if i is None else self.backend.id_to_token(i) for i in (self.bos_token_id, self.eos_token_id))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                  "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_hf(cls, path: str | os.PathLike, bos_token_id: int | None = None,
                eos_token_id: int | None = None) -> "Tokenizer":
        """From an HF directory (or its tokenizer.json). bos/eos come from tokenizer_config.json when it names
        them, else from the arguments."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no tokenizer.json at {path}")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise CheckpointError(f"{file} is not a readable tokenizer.json: {e}") from None
        config_file = file.parent / "tokenizer_config.json"
        ids = {"bos_token": bos_token_id, "eos_token": eos_token_id}
        if config_file.is_file():
            config = read_json(config_file)
            if not isinstance(config, dict):
                raise CheckpointError(f"{config_file} is not a JSON object")
            for key in ids:
                token = config.get(key)
                token = token.get("content") if isinstance(token, dict) else token
                if token is not None and backend.token_to_id(token) is not None:
                    ids[key] = backend.token_to_id(token)
        return cls(backend, ids["bos_token"], ids["eos_token"])

    @classmethod
    def from_gguf(cls, source) -> "Tokenizer":
        """From a GGUF's `tokenizer.ggml.*` metadata (a path or an open `GGUFReader`)."""
        reader = open_gguf(source)
        meta = metadata(reader)
        fields = reader.fields
        if "tokenizer.ggml.tokens" not in fields:
            raise CheckpointError("GGUF has no tokenizer (no tokenizer.ggml.tokens)")
        tokens = fields["tokenizer.ggml.tokens"].contents()
        types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else None
        kind = meta.get("tokenizer.ggml.model")
        if kind == "gpt2":
            merges = fields["tokenizer.ggml.merges"].contents() if "tokenizer.ggml.merges" in fields else None
            if not merges:
                raise CheckpointError("GGUF byte-level (gpt2) tokenizer has no tokenizer.ggml.merges")
            backend, tokens = byte_level_backend(tokens, merges, meta.get("tokenizer.ggml.pre", "default"))
        elif kind == "llama":
            scores = fields["tokenizer.ggml.scores"].contents() if "tokenizer.ggml.scores" in fields else None
            if scores is None:
                raise CheckpointError("GGUF sentencepiece (llama) tokenizer has no tokenizer.ggml.scores")
            backend = sentencepiece_backend(tokens, scores, types, meta.get("tokenizer.ggml.unknown_token_id"),
                                            meta.get("tokenizer.ggml.add_space_prefix", True))
        else:
            raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported; expected 'gpt2' or 'llama'")
        if types is not None:
            add_typed_tokens(backend, tokens, types, byte_level=kind == "gpt2")
        return cls(backend, meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"))


# ---- builders ------------------------------------------------------------------------------------
def byte_level_backend(tokens: list[str], merges: list[str], pre: str) -> tuple[Backend, list[str]]:
    """GPT-2-style byte-level BPE; returns the backend and the tokens as spelled in its vocabulary."""
    if pre not in BYTE_LEVEL_PRE:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported; expected one of "
                              f"{', '.join(BYTE_LEVEL_PRE)}")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token spelled outside the byte alphabet (a raw added token) is re-spelled byte by byte.
    tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = BYTE_LEVEL_PRE[pre]()
    backend.decoder = decoders.ByteLevel()
    return backend, tokens


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges (left, right) for every split of a token into two tokens, best merged-token score first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def sentencepiece_backend(tokens, scores, types, unk_id, add_space_prefix) -> Backend:
    """LLaMA/SentencePiece BPE: spaces as ▁, a ▁ prepended to the text, unknown bytes as <0xNN> tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[unk_id] if unk_id is not None else None
    backend = Backend(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores), unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    prepend = "first" if add_space_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def add_typed_tokens(backend: Backend, tokens: list[str], types: list[int], byte_level: bool) -> None:
    """CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens (matched whole)."""
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k == CONTROL and (alphabet is None or set(t) <= alphabet)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


_PRE_NAMES = ("gpt2", "smollm", "llama-bpe", "qwen2")  # llama.cpp pre-tokenizer names we can recognize


def _with_pre(backend, pre_tokenizer) -> str:
    backend.pre_tokenizer = pre_tokenizer
    return backend.to_str()
