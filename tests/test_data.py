"""Tests for data/prepare.py, corpus.py and batching.py (issue 2). Run: python -m pytest -q tests/test_data.py"""

import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, whatever pytest's cwd
from data import prepare  # noqa: E402
from data.batching import BOS, EOS, PAD, SPECIALS, UNK, TokenBatcher, collate  # noqa: E402
from data.corpus import Vocab, atomic_open, encode_corpus, load_corpus, make_toy_corpus  # noqa: E402
from data.prepare import DataError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
MULTI30K_TOK = SHARED / "multi30k" / "tok"
IWSLT_PREPARED = SHARED / "iwslt14.de-en"
need_multi30k = pytest.mark.skipif(not MULTI30K_TOK.is_dir(), reason="../shared/data/multi30k/tok not present")
need_iwslt = pytest.mark.skipif(not IWSLT_PREPARED.is_dir(), reason="../shared/data/iwslt14.de-en not present")

# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def multi30k(tmp_path_factory):
    """The real Multi30k, prepared once per session (about 5 s)."""
    if not MULTI30K_TOK.is_dir():
        pytest.skip("../shared/data/multi30k/tok not present")
    out = tmp_path_factory.mktemp("multi30k")
    summary = prepare.prepare_multi30k(source=MULTI30K_TOK, out=out)
    return out, summary


@pytest.fixture(scope="session")
def multi30k_corpus(multi30k):
    return load_corpus(multi30k[0])


def write_multi30k_layout(folder, pairs_per_split, overrides=None):
    """A tiny folder in the Multi30k tok layout; overrides[file name] = raw bytes replaces a file."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in zip(("train", "val", "test_2016_flickr"), pairs_per_split):
        for lang, words in (("de", "ein hund läuft über die wiese"), ("en", "a dog runs across the meadow")):
            lines = [f"{words} {stem} {i} ." for i in range(n)]
            (folder / f"{stem}.lc.norm.tok.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, data in (overrides or {}).items():
        (folder / name).write_bytes(data)
    return folder


# -----------------------------------------------------------------------------
# Multi30k


@need_multi30k
def test_multi30k_counts_and_outputs(multi30k):
    out, s = multi30k
    assert s["pairs"] == {"train": 29000, "valid": 1014, "test": 1000}
    assert s["empty_pairs_dropped"] == {"train": 0, "valid": 0, "test": 0}
    for name in ["bpe.codes", "vocab.de.txt", "vocab.en.txt", "corpus.npz", "summary.json"] + \
            [f"{sp}.bpe.{l}" for sp in ("train", "valid", "test") for l in ("de", "en")] + \
            [f"{sp}.tok.en" for sp in ("train", "valid", "test")]:
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    assert s["unk_rate"]["valid"]["en"] < 0.01 and s["unk_rate"]["test"]["de"] < 0.01
    first4 = (out / "vocab.en.txt").read_text(encoding="utf-8").splitlines()[:4]
    assert [line.split()[0] for line in first4] == list(SPECIALS)
    # the references are the tokenised input, byte for byte
    assert (out / "valid.tok.en").read_bytes() == (MULTI30K_TOK / "val.lc.norm.tok.en").read_bytes()


@need_multi30k
def test_multi30k_reuse_and_cli(multi30k):
    out, _ = multi30k
    mtime = (out / "corpus.npz").stat().st_mtime_ns
    assert prepare.prepare_multi30k(source=MULTI30K_TOK, out=out)["reused"]
    r = subprocess.run([sys.executable, "data/prepare.py", "multi30k", "--source", str(MULTI30K_TOK), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "reused" in r.stdout and "train 29000 / valid 1014 / test 1000" in r.stdout
    assert (out / "corpus.npz").stat().st_mtime_ns == mtime


@need_multi30k
def test_load_corpus_fast_and_consistent(multi30k):
    out, s = multi30k
    t0 = time.process_time()  # this process's CPU time: other jobs on the machine do not count
    c = load_corpus(out)
    assert time.process_time() - t0 < 2.0
    src, tgt = c.splits["valid"]
    assert len(src) == len(tgt) == len(c.refs["valid"]) == 1014
    assert all(x[-1] == EOS and BOS not in x for x in src[:100] + tgt[:100])
    assert sum(len(x) - 1 for x in c.splits["train"][0]) == s["tokens"]["train"]["de"]
    assert c.tgt_vocab.decode(tgt[0]) == " ".join(c.refs["valid"][0].split())
    assert len(c.src_vocab) == s["vocab"]["de"] and len(c.tgt_vocab) == s["vocab"]["en"]


@need_multi30k
def test_padding_fraction_multi30k(multi30k_corpus):
    src, tgt = multi30k_corpus.splits["train"]
    b = TokenBatcher([len(x) for x in src], [len(x) for x in tgt], max_tokens=4096, seed=0)
    assert b.padding_fraction(b.batches(0)) < 0.10


# -----------------------------------------------------------------------------
# bad input: one-line DataErrors, nothing half-written


def test_missing_split_file(tmp_path):
    src = write_multi30k_layout(tmp_path / "src", (30, 5, 5))
    (src / "val.lc.norm.tok.en").unlink()
    with pytest.raises(DataError, match=r"missing split file.*val\.lc\.norm\.tok\.en"):
        prepare.prepare_multi30k(source=src, out=tmp_path / "out")


def test_line_count_mismatch_names_both(tmp_path):
    src = write_multi30k_layout(tmp_path / "src", (30, 5, 5), {"test_2016_flickr.lc.norm.tok.de": b"a\nb\nc\n"})
    with pytest.raises(DataError) as e:
        prepare.prepare_multi30k(source=src, out=tmp_path / "out")
    msg = str(e.value)
    assert "test_2016_flickr.lc.norm.tok.de has 3 lines" in msg and "test_2016_flickr.lc.norm.tok.en has 5" in msg
    assert "\n" not in msg


def test_non_utf8_line(tmp_path):
    src = write_multi30k_layout(tmp_path / "src", (30, 5, 5), {"train.lc.norm.tok.en": b"ok\nok\nbad \xff byte\n"})
    with pytest.raises(DataError, match=r"train\.lc\.norm\.tok\.en: line 3 is not valid UTF-8"):
        prepare.prepare_multi30k(source=src, out=tmp_path / "out")


def test_unreachable_download(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "DOWNLOADS", tmp_path / "downloads")
    # port 9 (discard) on localhost: refused at once, and nothing leaves the machine
    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:9/.*--source"):
        prepare.prepare_multi30k(source="http://127.0.0.1:9/tok/", out=tmp_path / "out")
    assert not [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()]  # no partial download


def test_cli_error_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "data/prepare.py", "iwslt14", "--source", str(tmp_path / "nothing.tgz"),
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr and "--source" in r.stderr


def test_empty_lines_dropped_in_pairs(tmp_path):
    src = write_multi30k_layout(tmp_path / "src", (30, 5, 5))
    de = (src / "train.lc.norm.tok.de").read_text(encoding="utf-8").split("\n")
    de[3], de[7] = "", "   "
    (src / "train.lc.norm.tok.de").write_text("\n".join(de), encoding="utf-8")
    s = prepare.prepare_multi30k(source=src, out=tmp_path / "out", merges=20)
    assert s["pairs"]["train"] == 28 and s["empty_pairs_dropped"]["train"] == 2
    c = load_corpus(tmp_path / "out")
    # still aligned: sentence k of each side carries the same number
    assert [c.src_vocab.decode(x).split()[-2] for x in c.splits["train"][0]] == \
           [c.tgt_vocab.decode(y).split()[-2] for y in c.splits["train"][1]]


def test_interrupted_run_is_not_reused(tmp_path, monkeypatch):
    src, out = write_multi30k_layout(tmp_path / "src", (30, 5, 5)), tmp_path / "out"
    prepare.prepare_multi30k(source=src, out=out, merges=20)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_multi30k(source=src, out=out, merges=30)  # new settings: a rebuild that dies half-way
    assert not (out / "summary.json").exists() and not list(out.glob("*.tmp"))
    monkeypatch.undo()
    s = prepare.prepare_multi30k(source=src, out=out, merges=30)
    assert "reused" not in s and s["settings"]["merges"] == 30


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("new, half")
            raise RuntimeError("disk full")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError):
        with atomic_open(path) as f:
            f.write("new")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


# -----------------------------------------------------------------------------
# IWSLT14: fairseq's recipe end to end on a tiny raw de-en.tgz


def iwslt_raw_pairs():
    """(de, en, kept) raw training pairs: numbered sentences plus the cases clean-corpus-n must drop or keep."""
    # "hier." not "{i}.": German Moses keeps a number's period (an ordinal, "1." = "first")
    pairs = [(f"Das ist Satz {i} hier.", f"This is sentence {i} here.", True) for i in range(60)]
    pairs[5] = ("Er sagt: Es ist gut.", "He says: It's good.", True)  # 7 vs 7 words after tokenising
    pairs[10] = (" ".join(["wort"] * 176), " ".join(["word"] * 176), False)  # 176 > 175 words
    pairs[11] = (" ".join(["wort"] * 175), " ".join(["word"] * 175), True)  # exactly 175
    pairs[12] = ("Ja ja ja", "Yes yes yes yes yes", False)  # 5/3 > 1.5
    pairs[13] = ("Ja ja", "Yes yes yes", True)  # 3/2 = 1.5 is allowed
    pairs[14] = ("Ja ja ja ja ja", "Yes yes yes", False)  # ratio checked both ways
    pairs[15] = ("", "Nothing on the left.", False)  # empty side
    return pairs


def expected_tok(line):
    """What tokenizer.perl + lowercase.perl make of the simple test sentences."""
    return line.lower().replace(".", " .").replace(":", " :").replace("it's", "it &apos;s")


TEST_SETS = ["IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
             "IWSLT14.TED.tst2012"]


def make_de_en_tgz(path):
    """Write a de-en.tgz in the release's layout: train.tags with talk metadata, test sets as .xml with <seg>s."""
    files = {}
    pairs = iwslt_raw_pairs()
    for k, lang in enumerate(("de", "en")):
        meta = ["<url>http://www.ted.com/talks/a.html</url>", "<keywords>talks, science</keywords>",
                "<talkid>1</talkid>"]
        title = "<title>Titel Eins</title>" if lang == "de" else "<title>Title One</title>"
        desc = "<description>TED: Kurz.</description>" if lang == "de" else "<description>TED: Short.</description>"
        lines = meta + [title, desc] + [p[k] for p in pairs[:30]] + meta + [p[k] for p in pairs[30:]]
        files[f"train.tags.de-en.{lang}"] = "\n".join(lines) + "\n"
        for name in TEST_SETS:  # 2 segments per set; dev2010 has a curly apostrophe
            word = "Satz" if lang == "de" else "Line"
            segs = [f'<seg id="{i}"> {name} {word} {i} ok. </seg>' for i in (1, 2)]
            if name.endswith("dev2010"):
                segs[1] = '<seg id="2"> Don\u2019t stop. </seg>'
            body = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", f'<srcset setid="{name}" srclang="de">',
                    '<doc docid="1" genre="lectures">', "<url>http://x</url>", "<talkid>1</talkid>",
                    "<title>T</title>", *segs, "</doc>", "</srcset>", "</mteval>"]
            files[f"{name}.de-en.{lang}.xml"] = "\n".join(body) + "\n"
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(files, reverse=True):  # tar order must not matter
            data = files[name].encode("utf-8")
            info = tarfile.TarInfo(f"de-en/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_iwslt14_recipe_end_to_end(tmp_path):
    tgz = make_de_en_tgz(tmp_path / "de-en.tgz")
    s = prepare.prepare_iwslt14(source=tgz, out=tmp_path / "out", merges=100, workers=2)
    out = tmp_path / "out"
    kept = [("titel eins", "title one"), ("ted : kurz .", "ted : short .")]
    kept += [(expected_tok(d), expected_tok(e)) for d, e, keep in iwslt_raw_pairs() if keep]
    valid = [p for n, p in enumerate(kept, 1) if n % 23 == 0]
    train = [p for n, p in enumerate(kept, 1) if n % 23 != 0]
    assert s["pairs"] == {"train": len(train), "valid": len(valid), "test": 10} and len(valid) == 2
    refs = lambda split: (out / f"{split}.tok.en").read_text(encoding="utf-8").splitlines()  # noqa: E731
    assert refs("train") == [e for _, e in train] and refs("valid") == [e for _, e in valid]
    unbpe = lambda f: [x.replace("@@ ", "") for x in (out / f).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    assert unbpe("train.bpe.de") == [d for d, _ in train] and unbpe("valid.bpe.de") == [d for d, _ in valid]
    test_en = [f"{name.lower()} line {i} ok ." for name in TEST_SETS for i in (1, 2)]
    test_en[1] = "don &apos;t stop ."
    assert refs("test") == test_en
    assert unbpe("test.bpe.de")[2] == "iwslt14.tedx.dev2012 satz 1 ok ."


@need_iwslt
def test_prepared_folder_without_train(tmp_path):
    with pytest.raises(DataError, match=r"prepared folder without train\.de, train\.en.*--source"):
        prepare.prepare_iwslt14(source=IWSLT_PREPARED, out=tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()


@need_iwslt
def test_prepared_valid_test_load(tmp_path):
    splits = prepare.read_prepared(IWSLT_PREPARED)
    assert sorted(splits) == ["test", "valid"]
    assert [len(splits["valid"][0]), len(splits["test"][1])] == [7283, 6750]
    src_vocab = Vocab.load(IWSLT_PREPARED / "fairseq-dict" / "dict.de.txt")  # fairseq dicts: specials implicit
    tgt_vocab = Vocab.load(IWSLT_PREPARED / "fairseq-dict" / "dict.en.txt")
    c = encode_corpus("iwslt14", splits, src_vocab, tgt_vocab)
    assert len(tgt_vocab) == 6628 + len(SPECIALS) and tgt_vocab.itos[: len(SPECIALS)] == list(SPECIALS)
    ids = np.concatenate(c.splits["valid"][1])
    assert (ids == UNK).mean() < 0.01
    tok_valid_en = (IWSLT_PREPARED / "tok" / "valid.en").read_text(encoding="utf-8").splitlines()
    assert c.refs["valid"] == tok_valid_en  # un-BPE'd refs are the tokenised text, as SOURCE.md says


# -----------------------------------------------------------------------------
# vocabulary, toy task, batching


def test_vocab_round_trip(tmp_path):
    v = Vocab.build(["a b@@ c a", "a d"])
    assert v.itos[: len(SPECIALS)] == list(SPECIALS) and (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    assert v.itos[len(SPECIALS)] == "a" and v.counts[len(SPECIALS)] == 3
    v.save(tmp_path / "v.txt")
    w = Vocab.load(tmp_path / "v.txt")
    assert (w.itos, w.counts) == (v.itos, v.counts)
    ids = w.encode("a b@@ c zzz")
    assert ids[-1] == UNK and w.decode(ids + [EOS] + ids, bpe=True) == "a b@@ c <unk>"
    assert w.decode([BOS] + w.encode("b@@ c d") + [EOS, PAD]) == "bc d"


def test_toy_corpus_deterministic():
    a, b, c = make_toy_corpus(seed=3), make_toy_corpus(seed=3), make_toy_corpus(seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.splits["train"][0], b.splits["train"][0]))
    assert not all(np.array_equal(x, y) for x, y in zip(a.splits["train"][0], c.splits["train"][0]))
    src, tgt = a.splits["valid"]
    assert all(np.array_equal(s[:-1][::-1], t[:-1]) and t[-1] == EOS for s, t in zip(src, tgt))
    assert a.refs["valid"][0] == a.tgt_vocab.decode(tgt[0])
    assert a.src_vocab.itos == c.src_vocab.itos  # one vocabulary for every seed: models of any seed score on any


@pytest.fixture(scope="module")
def lens():
    """Length pairs (incl. EOS) of a skewed synthetic corpus, so batches differ a lot in size."""
    rng = np.random.default_rng(0)
    src = rng.integers(2, 60, size=3000)
    return src, np.clip(src + rng.integers(-5, 6, size=3000), 2, None)


def test_batcher_every_pair_once_within_budget(lens):
    b = TokenBatcher(*lens, max_tokens=500, seed=1)
    batches = b.batches(0)
    assert sorted(i for batch in batches for i in batch) == list(range(3000)) and len(batches) == len(b)
    assert all(len(x) * max(lens[0][x].max(), lens[1][x].max()) <= 500 for x in batches)


def test_batcher_deterministic_and_reshuffled(lens):
    a, b = TokenBatcher(*lens, max_tokens=500, seed=1), TokenBatcher(*lens, max_tokens=500, seed=1)
    assert a.batches(3) == b.batches(3)
    assert a.batches(3) != a.batches(4) and len(a.batches(4)) == len(a)
    assert a.batches(3) != TokenBatcher(*lens, max_tokens=500, seed=2).batches(3)


def test_batcher_ranks_disjoint_and_complete(lens):
    world = 3
    full = TokenBatcher(*lens, max_tokens=500, seed=1).batches(2)
    shards = [TokenBatcher(*lens, max_tokens=500, seed=1, rank=r, world_size=world).batches(2) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal steps per rank
    seen = [i for s in shards for batch in s for i in batch]
    assert len(seen) == len(set(seen))  # disjoint
    kept = len(full) // world * world  # the documented remainder: the last len % world_size batches are dropped
    assert sorted(seen) == sorted(i for batch in full[:kept] for i in batch)


def test_batcher_too_long_sentence():
    with pytest.raises(ValueError, match="sentence 1 has 50 tokens > max_tokens=40"):
        TokenBatcher([3, 50, 4], [3, 4, 60], max_tokens=40)


def test_collate_shift():
    src_seqs = [np.array([5, 6, EOS]), np.array([7, EOS])]
    tgt_seqs = [np.array([8, EOS]), np.array([9, 10, 11, EOS])]
    src, tgt_in, tgt_out = collate(src_seqs, tgt_seqs, [1, 0])
    assert src.tolist() == [[7, EOS, PAD], [5, 6, EOS]]
    assert tgt_in.tolist() == [[BOS, 9, 10, 11], [BOS, 8, PAD, PAD]]
    assert tgt_out.tolist() == [[9, 10, 11, EOS], [8, EOS, PAD, PAD]]
