"""IWSLT14 on the real files in ../shared/data/iwslt14.de-en (issue 13): the prepared-folder route on a slice of them,
the full prepared corpus keeping every valid/test reference, and the line counts of IWSLT references in experiments/results/.
Skipped where ../shared is absent. Run: python -m pytest -q tests/test_iwslt_real.py (about 15 s)"""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data import prepare
from data.corpus import load_corpus
from data.prepare import load_data
import train
from runs.settings import parse_settings

ROOT = Path(__file__).resolve().parent.parent
IWSLT = ROOT.parent / "shared" / "data" / "iwslt14.de-en"
SAMPLE = IWSLT / "train-sample"
STANDARD_LINES = {"valid": 7283, "test": 6750}  # fairseq prepare-iwslt14.sh (SOURCE.md)
SLICE = 200

pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason="../shared/data/iwslt14.de-en/train-sample not present")


def head(path, n=SLICE):
    """The first n lines of a text file, each with its newline."""
    return path.read_text(encoding="utf-8").splitlines(keepends=True)[:n]


@pytest.fixture(scope="module")
def real_slice(tmp_path_factory):
    """The first 200 lines of every split as two folders: `dev` (valid, test, code) and `sample` (train)."""
    root = tmp_path_factory.mktemp("iwslt_slice")
    (root / "dev").mkdir()
    (root / "sample").mkdir()
    for lang in ("de", "en"):
        (root / "sample" / f"train.{lang}").write_text("".join(head(SAMPLE / f"train.{lang}")), encoding="utf-8")
        for split in STANDARD_LINES:
            (root / "dev" / f"{split}.{lang}").write_text("".join(head(IWSLT / f"{split}.{lang}")), encoding="utf-8")
    (root / "dev" / "code").write_bytes((IWSLT / "code").read_bytes())
    return root


def test_train_dir_assembles_a_fairseq_folder_that_prepares_like_the_real_files(real_slice, tmp_path):
    s = prepare.prepare_iwslt14(source=real_slice / "dev", train_dir=real_slice / "sample", out=tmp_path / "a")
    assert s["pairs"] == {"train": SLICE, "valid": SLICE, "test": SLICE} and s["settings"]["train_dir"]
    folder = tmp_path / "a" / "fairseq"  # fairseq's layout: {train,valid,test}.{de,en} + code
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["code"] + [f"{split}.{lang}" for split in ("train", "valid", "test") for lang in ("de", "en")])
    assert filecmp.cmp(folder / "train.de", real_slice / "sample" / "train.de", shallow=False)
    assert filecmp.cmp(tmp_path / "a" / "bpe.codes", IWSLT / "code", shallow=False)
    corpus = load_corpus(tmp_path / "a")
    src, tgt = corpus.splits["train"]
    train_en = [line.rstrip("\n") for line in head(SAMPLE / "train.en")]
    assert [corpus.tgt_vocab.decode(t, bpe=True) for t in tgt] == train_en  # ids round-trip: vocab built on train
    assert all(t[-1] == 2 and len(s) > 1 for s, t in zip(src, tgt))  # every sentence ends with EOS (id 2)


def test_cli_prepared_folder_route_gives_the_same_corpus(real_slice, tmp_path):
    prepare.prepare_iwslt14(source=real_slice / "dev", train_dir=real_slice / "sample", out=tmp_path / "a")
    r = subprocess.run([sys.executable, "data/prepare.py", "iwslt14", f"--source={tmp_path / 'a' / 'fairseq'}",
                        f"--out={tmp_path / 'b'}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "a" / "corpus.npz") as a, np.load(tmp_path / "b" / "corpus.npz") as b:
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)


def test_slice_refs_are_the_tokenised_lowercased_text_without_bpe(real_slice, tmp_path):
    prepare.prepare_iwslt14(source=real_slice / "dev", train_dir=real_slice / "sample", out=tmp_path / "a")
    refs = load_corpus(tmp_path / "a").refs
    for split in STANDARD_LINES:
        assert refs[split] == [line.rstrip("\n") for line in head(IWSLT / "tok" / f"{split}.en")]
        assert all(r == r.lower() and "@@" not in r for r in refs[split])


def test_full_prepared_corpus_keeps_every_valid_and_test_sentence(tmp_path):
    s = prepare.prepare_iwslt14(source=IWSLT, train_dir=SAMPLE, out=tmp_path / "full")
    assert s["pairs"] == {"train": 8720, **STANDARD_LINES} and s["empty_pairs_dropped"] == dict.fromkeys(s["pairs"], 0)
    for split, n in STANDARD_LINES.items():
        ref = tmp_path / "full" / f"{split}.tok.en"
        assert filecmp.cmp(ref, IWSLT / "tok" / f"{split}.en", shallow=False)  # byte for byte, all n lines
        assert len(ref.read_text(encoding="utf-8").splitlines()) == n
    assert max(s["unk_rate"]["test"].values()) < 0.01  # a vocabulary from 5% of train still covers the test BPE


def test_train_py_loads_the_slice_and_scores_it_against_the_refs(real_slice, tmp_path):
    import torch
    from mos import SPACES, SuperTransformer

    prepare.prepare_iwslt14(source=real_slice / "dev", train_dir=real_slice / "sample", out=tmp_path / "data")
    cfg = parse_settings(train.TrainConfig, ["--preset=iwslt14", f"--data_dir={tmp_path / 'data'}", "--beam=2"], presets=train.PRESETS)
    corpus = load_data(cfg.data, cfg.data_dir)  # what train.py trains and evaluates on
    assert {k: len(v[0]) for k, v in corpus.splits.items()} == {"train": SLICE, "valid": SLICE, "test": SLICE}
    torch.manual_seed(0)
    model = SuperTransformer(SPACES["tiny"], len(corpus.src_vocab), len(corpus.tgt_vocab), router_hidden=32)
    r = train.run_evaluate(model.subnet(SPACES["tiny"].smallest()), corpus, "test", cfg, torch.device("cpu"), n_bleu=3)
    assert abs(r["loss"] - torch.log(torch.tensor(len(corpus.tgt_vocab))).item()) < 1.0  # untrained: ~uniform
    assert 0 <= r["bleu"] < 5 and "tok:none" in r["bleu_signature"]


def test_committed_iwslt_references_and_test_runs_cover_the_standard_sets():
    """Files under experiments/results/iwslt14*/ named {valid,test}.ref / .hyp or hyps_{valid,test}_NAME.txt (train.py's, one
    sentence per line) must have the standard line counts, and every committed IWSLT training run must have scored
    the whole test set (test_sentences=0)."""
    folders = sorted(p for p in (ROOT / "experiments" / "results").glob("iwslt14*") if p.is_dir())
    texts = [p for f in folders for p in f.rglob("*") if p.suffix in (".ref", ".hyp") and p.stem in STANDARD_LINES]
    texts += [p for f in folders for p in f.rglob("hyps_*.txt")]
    configs = [p for f in folders for p in f.rglob("config.json") if json.loads(p.read_text()).get("data") == "iwslt14"]
    if not texts and not configs:
        pytest.skip("no IWSLT14 results committed yet")
    for p in texts:
        split = p.stem.split("_")[1] if p.stem.startswith("hyps_") else p.stem
        assert len(p.read_text(encoding="utf-8").splitlines()) == STANDARD_LINES[split], p
    for p in configs:
        cfg = json.loads(p.read_text())
        if cfg.get("split", "test") == "test" and (p.parent / "results.json").exists():
            assert cfg["test_sentences"] == 0, f"{p}: test BLEU on only {cfg['test_sentences']} sentences"


def test_committed_iwslt_sample_bleu_is_recomputed_from_its_translations_and_the_standard_test_file():
    """experiments/results/iwslt14_sample/: each test BLEU in results.json is what its committed translations score against the
    standard tokenised, lowercased test references (../shared/data/iwslt14.de-en/tok/test.en), both conventions."""
    folder = ROOT / "experiments" / "results" / "iwslt14_sample"
    if not (folder / "results.json").exists():
        pytest.skip("experiments/results/iwslt14_sample not committed yet")
    refs = (IWSLT / "tok" / "test.en").read_text(encoding="utf-8").splitlines()
    results = json.loads((folder / "results.json").read_text())
    names = [k for k, v in results.items() if isinstance(v, dict)]
    assert names and results["split"] == "test"
    for name in names:
        hyps = (folder / f"hyps_test_{name}.txt").read_text(encoding="utf-8").splitlines()
        assert len(hyps) == len(refs) == STANDARD_LINES["test"]
        assert train.bleu_score(hyps, refs)[0] == pytest.approx(results[name]["bleu"], abs=1e-6)
        assert train.bleu_score(hyps, refs, compound_split=True)[0] == pytest.approx(
            results[name]["bleu_compound_split"], abs=1e-6)
