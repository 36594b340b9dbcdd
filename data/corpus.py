"""
The text side of the data: subword text, vocabularies, the prepared corpus as id arrays, and a toy task.

    from data.corpus import load_corpus            # data.prepare.load_data prepares it first if needed
    corpus = load_corpus("data/multi30k")
    src, tgt = corpus.splits["train"]              # lists of int arrays, each ending with EOS
    corpus.tgt_vocab.decode(tgt[0])                # the target sentence as text, BPE undone

Every sentence is stored as its token ids followed by EOS and without BOS (data/batching.py adds BOS when it
collates a batch); the special symbols and their ids are data/batching.py's SPECIALS.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path

import numpy as np

from data.batching import BOS, EOS, PAD, SPECIALS, UNK
from runs.files import atomic_open

BPE_SEPARATOR = "@@"  # subword-nmt's continuation marker: "walk@@ ing" is the word "walking"

# -----------------------------------------------------------------------------
# text and vocabulary


def remove_bpe(line):
    """Undo subword-nmt segmentation ("walk@@ ing" -> "walking"), including a dangling final "@@"."""
    return re.sub(f"({re.escape(BPE_SEPARATOR)} )|({re.escape(BPE_SEPARATOR)} ?$)", "", line)


class Vocab:
    """Token <-> id mapping; ids 0..3 are SPECIALS, the rest are ordered by training count."""

    def __init__(self, tokens=(), counts=None):
        kept = [(t, c) for t, c in zip(tokens, [0] * len(tokens) if counts is None else counts) if t not in SPECIALS]
        self.itos = list(SPECIALS) + [t for t, _ in kept]
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.counts = [0] * len(SPECIALS) + [c for _, c in kept]  # training counts; 0 for the specials

    @classmethod
    def build(cls, lines):
        """Count whitespace tokens; most frequent first, ties broken alphabetically so the ids are reproducible."""
        items = sorted(Counter(tok for line in lines for tok in line.split()).items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([t for t, _ in items], [c for _, c in items])

    @classmethod
    def load(cls, path):
        """Read "token count" lines. A fairseq dict.txt (specials implicit) loads too: SPECIALS are prepended."""
        pairs = [line.rsplit(" ", 1) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
        return cls([t for t, _ in pairs], [int(c) for _, c in pairs])

    def save(self, path):
        """Write one "token count" line per id, SPECIALS first (count 0), atomically."""
        with atomic_open(path) as f:
            f.writelines(f"{tok} {cnt}\n" for tok, cnt in zip(self.itos, self.counts))

    def __len__(self):
        return len(self.itos)

    def encode(self, line):
        """Whitespace-split `line` into ids; unknown tokens map to UNK. No EOS is added."""
        return [self.stoi.get(tok, UNK) for tok in line.split()]

    def decode(self, ids, bpe=False):
        """Ids -> text, stopping at the first EOS and skipping PAD/BOS. The BPE is undone unless `bpe=True`."""
        ids = takewhile(lambda i: i != EOS, map(int, ids))
        line = " ".join(self.itos[i] for i in ids if i not in (PAD, BOS))
        return line if bpe else remove_bpe(line)


# -----------------------------------------------------------------------------
# corpus


@dataclass
class Corpus:
    """A source->target corpus held as id arrays: splits[name] = (src_seqs, tgt_seqs), each sentence ending in EOS."""
    name: str
    src_vocab: Vocab
    tgt_vocab: Vocab
    splits: dict  # split -> (list of np int arrays, list of np int arrays)
    refs: dict = field(default_factory=dict)  # split -> tokenised, un-BPE'd target lines for BLEU


def encode_corpus(name, lines, src_vocab, tgt_vocab, refs=None):
    """Turn lines[split] = (src_lines, tgt_lines) of BPE'd text into a Corpus (ids + EOS). Refs default to the
    un-BPE'd target lines."""
    ids = lambda vocab, line: np.array(vocab.encode(line) + [EOS], dtype=np.int64)
    splits = {split: ([ids(src_vocab, s) for s in src], [ids(tgt_vocab, t) for t in tgt])
              for split, (src, tgt) in lines.items()}
    refs = refs if refs is not None else {split: [remove_bpe(t) for t in tgt] for split, (_, tgt) in lines.items()}
    return Corpus(name, src_vocab, tgt_vocab, splits, refs)


def load_corpus(folder):
    """Load what data/prepare.py wrote to `folder` (corpus.npz + vocab.{src,tgt}.txt + {split}.tok.{tgt})."""
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    src, tgt = summary["src_lang"], summary["tgt_lang"]
    vocabs = {lang: Vocab.load(folder / f"vocab.{lang}.txt") for lang in (src, tgt)}

    def cut(z, split, lang):
        """One flat array per split and side, cut into sentences by offsets (views, no copies)."""
        ids = z[f"{split}.{lang}.ids"].astype(np.int64)
        if len(ids) and ids.max() >= len(vocabs[lang]):  # a vocabulary file emptied or replaced after preparing
            raise ValueError(f"corpus.npz holds id {ids.max()} but vocab.{lang}.txt {len(vocabs[lang])} tokens")
        return np.split(ids, z[f"{split}.{lang}.offsets"][1:-1])
    with np.load(folder / "corpus.npz", allow_pickle=False) as z:
        splits = {split: (cut(z, split, src), cut(z, split, tgt)) for split in summary["pairs"]}
    refs = {split: path.read_text(encoding="utf-8").split("\n")[:-1] for split in summary["pairs"]
            if (path := folder / f"{split}.tok.{tgt}").exists()}  # tokenised target lines for BLEU
    return Corpus(summary["dataset"], vocabs[src], vocabs[tgt], splits, refs)


def make_toy_corpus(vocab_size=16, n_train=4000, n_valid=200, n_test=200, min_len=3, max_len=12, seed=0):
    """A synthetic task that needs no files: translate a random sequence over symbols a0..a{vocab_size-1} into its
    reversal. Source and target vocabularies hold the same symbols, so the ids line up too."""
    rng = np.random.default_rng(seed)
    symbols = [f"a{i}" for i in range(vocab_size)]
    lines = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        lengths = rng.integers(min_len, max_len + 1, size=n)
        src = [" ".join(symbols[k] for k in rng.integers(0, vocab_size, size=L)) for L in lengths]
        lines[split] = (src, [" ".join(reversed(s.split())) for s in src])
    counts = Counter(tok for line in lines["train"][0] + lines["train"][1] for tok in line.split())
    vocab = Vocab(symbols, [counts[s] for s in symbols])  # ids in symbol order: the same vocabulary for every seed
    return encode_corpus("toy-reverse", lines, vocab, vocab)
