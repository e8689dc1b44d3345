import json
import re
import shutil
import sys
import types

import numpy as np
import pytest

import plrd_jax.data.corpora as data
import plrd_jax.data.mixture as mixtures
import plrd_jax.data.windows as packing
from plrd_jax.data.corpora import DataError


class CharTokenizer:
    """One token per character (code point mod 250, plus 1); EOS is 0."""

    eos_token_id = 0
    bos_token_id = None
    fingerprint = "char-mod-250"

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return [ord(c) % 250 + 1 for c in text]


def chars(text):
    return [ord(c) % 250 + 1 for c in text]


def shared_file(name):
    path = data.shared_data_dir() / data.SHARED_FILES[name][0]
    if not path.is_file():
        pytest.skip(f"shared corpus {path} is absent (set PLRD_SHARED_DATA to the shared data folder)")
    return path


# ---- packing ------------------------------------------------------------------------------------
def test_pack_cuts_non_overlapping_windows_and_drops_the_tail():
    tokens = np.arange(10)
    np.testing.assert_array_equal(packing.pack(tokens, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(packing.pack(tokens, 4, drop_last=False)[-1], [8, 9, -1, -1])
    assert packing.pack(tokens, 4).dtype == np.int32


def test_documents_are_joined_by_eos():
    np.testing.assert_array_equal(packing.tokenize(["ab", "c"], CharTokenizer()), chars("ab") + [0] + chars("c"))
    np.testing.assert_array_equal(packing.tokenize("abc", CharTokenizer()), chars("abc"))


def test_streamed_windows_equal_packed_windows():
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdef "), size=rng.integers(0, 40))) for _ in range(30)]
    tok = CharTokenizer()
    streamed = np.stack(list(packing.stream_windows(iter(docs), tok, 7)))
    np.testing.assert_array_equal(streamed, packing.pack(packing.tokenize(docs, tok), 7))


# ---- order --------------------------------------------------------------------------------------
def test_batch_at_equals_the_kth_batch_of_a_full_iteration():
    windows = np.arange(23 * 3).reshape(23, 3)
    full = list(packing.batches(windows, 5, seed=7, num_steps=14))  # 4 steps per epoch: 3.5 epochs
    for k, batch in enumerate(full):
        np.testing.assert_array_equal(packing.batch_at(windows, k, 5, seed=7), batch)
    np.testing.assert_array_equal(np.stack(list(packing.batches(windows, 5, seed=7, start_step=9, num_steps=5))),
                                  np.stack(full[9:]))


def test_each_epoch_is_a_seeded_permutation_and_unseeded_order_is_file_order():
    windows = np.arange(20)[:, None] * np.ones((1, 2), np.int64)
    epoch = np.concatenate([packing.batch_at(windows, k, 4, seed=3)[:, 0] for k in range(5)])
    np.testing.assert_array_equal(np.sort(epoch), np.arange(20))
    np.testing.assert_array_equal(epoch, np.random.default_rng([3, 0]).permutation(20))
    next_epoch = np.concatenate([packing.batch_at(windows, k, 4, seed=3)[:, 0] for k in range(5, 10)])
    assert not np.array_equal(epoch, next_epoch)
    in_order = np.concatenate([packing.batch_at(windows, k, 4)[:, 0] for k in range(6)])
    np.testing.assert_array_equal(in_order, np.r_[np.arange(20), np.arange(4)])


def test_dataset_is_deterministic(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    make = lambda: packing.load_dataset(str(tmp_path / "a.txt"), CharTokenizer(), seq_len=16)
    a, b = make(), make()
    np.testing.assert_array_equal(a.windows, b.windows)
    np.testing.assert_array_equal(a.batch_at(11, 4, seed=1), b.batch_at(11, 4, seed=1))
    assert a.spec == b.spec
    assert a.spec["windows"] == len(a) == 880 // 16 and a.spec["tokens"] == len(a) * 16 and a.seq_len == 16
    json.dumps(a.spec)


# ---- sources ------------------------------------------------------------------------------------
def test_txt_jsonl_and_glob_sources(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "third", "body": "x"}\n\n{"text": "fourth", "body": "y"}\n')
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "c.txt").write_text("line one\r\nline two\n")
    assert data.load_documents(str(tmp_path / "*.jsonl")) == ["first", "second", "third", "fourth"]
    assert data.load_documents(str(tmp_path / "b.jsonl"), text_field="body") == ["x", "y"]
    assert data.load_documents(str(tmp_path / "c.txt")) == ["line one\nline two\n"]  # universal newlines
    assert data.load_text(str(tmp_path / "a.jsonl")) == "first\n\nsecond"
    ds = packing.load_dataset(str(tmp_path / "*.jsonl"), CharTokenizer(), seq_len=4, max_windows=3)
    np.testing.assert_array_equal(ds.windows.reshape(-1), (chars("first") + [0] + chars("second") + [0])[:12])


def test_pydoc_source_is_the_bundled_topics():
    from pydoc_data.topics import topics
    (text,) = data.load_documents("pydoc")
    assert len(text) > 100_000
    assert text.startswith(topics[min(topics)]) and text.endswith(topics[max(topics)])


def test_tokenizers_library_tokenizer_and_token_cache(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "[EOS]": 1, "the": 2, "cat": 3, "sat": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()

    class Wrapped:
        eos_token_id = 1
        calls = 0

        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def encode(self, text):
            Wrapped.calls += 1
            return self.tokenizer.encode(text).ids

    docs = ["the cat sat", "the dog"]
    np.testing.assert_array_equal(packing.tokenize(docs, backend), [2, 3, 4, 2, 0])  # Encoding.ids, no EOS attr
    first = packing.tokenize(docs, Wrapped(backend), cache_dir=tmp_path)
    calls = Wrapped.calls
    again = packing.tokenize(docs, Wrapped(backend), cache_dir=tmp_path)
    np.testing.assert_array_equal(first, [2, 3, 4, 1, 2, 0])
    np.testing.assert_array_equal(again, first)
    assert Wrapped.calls == calls and len(list(tmp_path.glob("tokens-*.npy"))) == 1
    packing.tokenize(docs + ["cat"], Wrapped(backend), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2


def fake_tfds(monkeypatch, records):
    seen = {}

    def load(name, split, data_dir, shuffle_files, download):
        seen.update(name=name, split=split, data_dir=data_dir, shuffle_files=shuffle_files)
        return records

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(load=load, as_numpy=iter))
    return seen


def test_tfds_source_streams_documents_joined_by_eos(monkeypatch):
    texts = ["alpha beta", "gamma", "delta epsilon zeta", "eta theta"]
    seen = fake_tfds(monkeypatch, [{"text": t.encode()} for t in texts])
    ds = packing.load_dataset("tfds:c4/en:validation", CharTokenizer(), seq_len=5, data_dir="gs://bucket/tfds",
                           max_windows=4)
    assert seen == {"name": "c4/en", "split": "validation", "data_dir": "gs://bucket/tfds", "shuffle_files": False}
    np.testing.assert_array_equal(ds.windows, packing.pack(packing.tokenize(texts, CharTokenizer()), 5)[:4])
    assert ds.spec["source"] == "tfds:c4/en:validation" and ds.spec["text_sha256"] is None
    data.load_documents("tfds:c4/en:3.1.0")
    assert seen["name"] == "c4/en:3.1.0" and seen["split"] == "train"


# ---- shared corpora -----------------------------------------------------------------------------
def test_wikitext_halves_are_disjoint_and_cover_every_article():
    raw = shared_file("wikitext2-test").read_bytes().decode("utf-8").replace("\r\n", "\n")
    titles = re.findall(r"^ = ([^=].*?) = $", raw, flags=re.M)  # one '=' each side
    (test,) = data.load_documents("wikitext2-test")
    (heal,) = data.load_documents("wikitext2-heal")
    (evaluation,) = data.load_documents("wikitext2-eval")
    assert test == raw and "\r" not in test
    assert heal + evaluation == test
    starts = lambda text: [line[3:-3] for line in text.split("\n") if re.fullmatch(r" = [^=].* = ", line)]
    assert len(titles) == 62
    assert starts(heal) == titles[:31] and starts(evaluation) == titles[31:]
    assert heal.startswith(" = " + titles[0] + " = \n") and evaluation.startswith(" = " + titles[31] + " = \n")
    assert 0.9 < len(heal) / len(evaluation) < 1.1


def test_sub_headings_do_not_start_articles():
    text = " = A = \n a \n = = Sub = = \n b \n = = = Deeper = = = \n = B = \n c \n"
    assert data.wikitext_articles(text) == [" = A = \n a \n = = Sub = = \n b \n = = = Deeper = = = \n",
                                            " = B = \n c \n"]
    assert data.wikitext_halves(text) == (" = A = \n a \n = = Sub = = \n b \n = = = Deeper = = = \n",
                                          " = B = \n c \n")


def test_sha256_check_catches_a_corrupted_copy(tmp_path, monkeypatch):
    original = shared_file("tinyshakespeare")
    rel = data.SHARED_FILES["tinyshakespeare"][0]
    (tmp_path / rel).parent.mkdir(parents=True)
    shutil.copyfile(original, tmp_path / rel)
    monkeypatch.setenv("PLRD_SHARED_DATA", str(tmp_path))
    assert data.load_documents("tinyshakespeare")[0].startswith("First Citizen")
    corrupted = bytearray(original.read_bytes())
    corrupted[1000] ^= 1
    (tmp_path / rel).write_bytes(bytes(corrupted))
    with pytest.raises(DataError, match="SHA-256 .* does not match 86c4e6aa"):
        data.load_documents("tinyshakespeare")


# ---- errors -------------------------------------------------------------------------------------
def test_errors_name_what_is_wrong(tmp_path, monkeypatch):
    tok = CharTokenizer()
    with pytest.raises(DataError, match="unknown source 'wikitext'; known: pydoc, tinyshakespeare"):
        data.load_documents("wikitext")
    with pytest.raises(DataError, match="file .*missing.txt not found"):
        data.load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="no files match"):
        data.load_documents(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(DataError, match="has no text"):
        data.load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(DataError, match="3 tokens are fewer than one window of seq_len 8"):
        packing.load_dataset(str(tmp_path / "short.txt"), tok, seq_len=8)
    with pytest.raises(DataError, match="seq_len 1 must be at least 2"):
        packing.load_dataset(str(tmp_path / "short.txt"), tok, seq_len=1)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        data.load_documents(str(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no field 'text' \(has: body\)"):
        data.load_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="batch_size 9 must be between 1 and the number of windows 2"):
        packing.batch_at(np.zeros((2, 4)), 0, 9)
    monkeypatch.setenv("PLRD_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="shared data folder .*nowhere not found; set PLRD_SHARED_DATA"):
        data.load_documents("wikitext2-eval")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(DataError, match="needs tensorflow_datasets"):
        data.load_documents("tfds:c4/en")
    with pytest.raises(DataError, match="needs max_windows"):
        packing.load_dataset("tfds:c4/en", tok, seq_len=8)


# ---- mixtures, splits and evaluation corpora ----------------------------------------------------------
def test_interleave_follows_the_weights_and_stops_when_a_source_runs_out():
    owners = mixtures.interleave([100, 100, 100], [2.0, 1.0, 1.0])
    counts = np.bincount(owners, minlength=3)
    assert counts[0] == 100 and counts[1] == counts[2] == 50  # source 0 ran out first, at twice the others' rate
    # every prefix is within one window of the weights' shares
    for n in (4, 10, 37, 200):
        c = np.bincount(owners[:n], minlength=3)
        assert np.all(np.abs(c - n * np.array([0.5, 0.25, 0.25])) <= 1.0), (n, c)


def test_a_mixture_packs_each_source_alone_and_interleaves_their_windows(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 40)
    b.write_text("b" * 80)
    mix = mixtures.load_mixture(f"{a}=1,{b}=1", CharTokenizer(), 8)
    # a: 5 windows, b: 10; equal weights alternate a, b until a runs out
    assert [chr(w[0] - 1) for w in mix.windows] == ["a", "b"] * 5
    assert [c["windows_used"] for c in mix.spec["components"]] == [5, 5]
    assert all(c["text_sha256"] for c in mix.spec["components"])
    single = mixtures.load_mixture(str(a), CharTokenizer(), 8)
    np.testing.assert_array_equal(single.windows, packing.load_dataset(str(a), CharTokenizer(), 8).windows)
    (tmp_path / "mix.json").write_text(json.dumps({str(a): 1, str(b): 3}))
    assert mixtures.parse_mixture(str(tmp_path / "mix.json")) == {str(a): 1.0, str(b): 3.0}
    for bad, message in ((f"{a}=0", "must be positive"), (f"{a}=x", "not a number"), (f"{a},{a}", "twice")):
        with pytest.raises(DataError, match=message):
            mixtures.parse_mixture(bad)


def test_interleave_chunks_round_robins_and_loses_nothing():
    docs = ["A" * 10 + "\n\n" + "A" * 10 + "\n", "B" * 3 + "\n", "C" * 8 + "\n\n" + "C\n"]
    chunks = data.interleave_chunks(docs, chunk_chars=5)
    assert [c[0] for c in chunks] == ["A", "B", "C", "A", "C"]
    assert "".join(c for c in chunks if c[0] == "A") == docs[0]
    assert "".join(c for c in chunks if c[0] == "C") == docs[2]


def _needs_shared_folder(name):
    if not (data.shared_data_dir() / name).is_dir():
        pytest.skip(f"shared corpus folder {name} is absent (set PLRD_SHARED_DATA to the shared data folder)")


@pytest.mark.parametrize("corpus", ["books", "speeches"])
def test_book_and_speech_splits_are_disjoint_and_cover_the_corpus(corpus):
    _needs_shared_folder(corpus)
    whole = data.load_text(corpus)
    heal, held = data.load_documents(f"{corpus}-heal"), data.load_documents(f"{corpus}-eval")
    assert sum(map(len, heal)) + sum(map(len, held)) == sum(map(len, data.load_documents(corpus)))
    assert 0.05 < sum(map(len, held)) / len(whole) < 0.3
    if corpus == "books":  # no licence text survives
        assert "*** START OF" not in whole and "*** END OF" not in whole and "Gutenberg License" not in whole
    data.check_disjoint([f"{corpus}-eval"], [f"{corpus}-heal"])  # disjoint by construction: no error
    with pytest.raises(DataError, match=f"'{corpus}' overlaps"):
        data.check_disjoint([corpus], [f"{corpus}-heal"])


def test_evaluation_corpora_errors_name_the_corpus(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(DataError, match="evaluation corpus .*short.txt.*fewer than one window"):
        mixtures.load_corpora(f"pydoc,{short}", CharTokenizer(), 64, max_tokens=128)
    with pytest.raises(DataError, match="twice"):
        mixtures.load_corpora("pydoc,pydoc", CharTokenizer(), 64, max_tokens=128)
    with pytest.raises(DataError, match="is also calibration / healing text"):
        data.check_disjoint(["pydoc"], ["pydoc"])
    copy = tmp_path / "copy.txt"
    copy.write_text(data.load_text("pydoc")[:20000])
    with pytest.raises(DataError, match="copy.txt' overlaps the calibration / healing text"):
        data.check_disjoint([str(copy)], ["pydoc"])
    assert data.domain_of("books-eval") == data.domain_of("books-heal") == "books"
