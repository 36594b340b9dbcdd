"""
Prepare German->English translation data for mos: Multi30k (task 1) or IWSLT14 De-En (fairseq's recipe).

    python data/prepare.py multi30k --source ../shared/data/multi30k/tok    # or no --source: download
    python data/prepare.py iwslt14 --source path/to/de-en.tgz              # or a URL, or a fairseq-prepared folder
    python data/prepare.py iwslt14 --source ../shared/data/iwslt14.de-en \
        --train_dir ../shared/data/iwslt14.de-en/train-sample --out data/iwslt14_sample   # the real 5% train sample

Writes to data/{multi30k,iwslt14}/ (or --out; claimed as runs/folders.py says): {split}.bpe.{de,en}, {split}.tok.en
(BLEU references), bpe.codes, vocab.{de,en}.txt, corpus.npz (flat ids + offsets: data.corpus.load_corpus) and,
last, summary.json: a run that dies early leaves none, so the next starts over; one of the same settings is reused
(--force redoes). Bad input raises DataError, printed as one line "error: ..." (exit 2). train.py calls `load_data`."""

import argparse
import functools
import json
import re
import shutil
import signal
import sys
import tarfile
import time
import urllib.request
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python data/prepare.py` can import data.*
from data.batching import EOS, SPECIALS, UNK  # noqa: E402
from data.corpus import Vocab, load_corpus, make_toy_corpus, remove_bpe  # noqa: E402
from runs.files import atomic_open, brief, releases_locks, write_lines  # noqa: E402
from runs.folders import check_target, claim_folder  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent
CLAIM = dict(command="data/prepare.py", inputs={}, legacy=("summary.json", "corpus.npz"), what="--out")  # runs/folders
DOWNLOADS = DATA_DIR / "downloads"
SRC, TGT = "de", "en"  # German source, English target
SPLITS = ("train", "valid", "test")

# Multi30k: the official repository's lowercased, normalised, Moses-tokenised files; our split -> their file stem
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/tok/"
MULTI30K_STEMS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
# 29k short captions: 4k joint merges give 3.2k de / 2.5k en types (see README): small for a CPU model, <0.1% unk
MULTI30K_MERGES = 4000

# IWSLT14, exactly as fairseq's examples/translation/prepare-iwslt14.sh
IWSLT14_URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
IWSLT14_MERGES = 10000
IWSLT14_DROP = ("<url>", "<talkid>", "<keywords>")  # the script's `grep -v` list: talk metadata lines
IWSLT14_STRIP = ("<title>", "</title>", "<description>", "</description>")  # tags removed, their text kept
IWSLT14_TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                     "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")  # concatenated into test, in this order
CLEAN_MIN, CLEAN_MAX, CLEAN_RATIO = 1, 175, 1.5  # clean-corpus-n.perl -ratio 1.5 ... 1 175 (train only)
VALID_EVERY = 23  # valid = every 23rd cleaned train line, train = the rest
TOKENIZE_CHUNK = 2000  # lines per multiprocessing task; smaller inputs are tokenised in-process


class DataError(ValueError):
    """A bad input, explained in one line that names the file and the fix."""


# -----------------------------------------------------------------------------
# reading and downloading


def decode_lines(data, name):
    """UTF-8 bytes -> lines (without "\\n"); a bad byte raises DataError with the file name and line number."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = data[: e.start].count(b"\n") + 1
        raise DataError(f"{name}: line {line_no} is not valid UTF-8; re-encode the file as UTF-8") from None
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines  # a final newline ends the last line, it doesn't start one


def download(url, dest):
    """Fetch `url` to `dest` with a progress bar (once: an existing `dest` is reused)."""
    if dest.exists():
        return dest
    from tqdm import tqdm  # only for downloads
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as r, atomic_open(dest, "wb") as f:
            with tqdm(total=int(r.headers.get("Content-Length", 0)) or None, unit="B", unit_scale=True,
                      desc=dest.name) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}); download it elsewhere and "
                        f"pass the local copy with --source PATH") from None
    return dest


def read_pair(de_path, en_path):
    """Read a parallel file pair, checking that both exist, decode and have the same number of lines."""
    if missing := [str(p) for p in (de_path, en_path) if not Path(p).is_file()]:
        raise DataError(f"missing split file(s): {', '.join(missing)}; check --source")
    de, en = decode_lines(Path(de_path).read_bytes(), de_path), decode_lines(Path(en_path).read_bytes(), en_path)
    check_aligned(de, en, de_path, en_path)
    return de, en


def check_aligned(de, en, de_name, en_name):
    """Both sides of a split must have one line per sentence pair."""
    if len(de) != len(en):
        raise DataError(f"line counts differ: {de_name} has {len(de)} lines, {en_name} has {len(en)}; "
                        f"the two sides must be aligned line by line")


def drop_empty(splits):
    """Drop pairs where either side is blank, in pairs so the sides stay aligned: ({split: (de, en)}, {split: n})."""
    kept, dropped = {}, {}
    for split, (de, en) in splits.items():
        keep = [i for i, (d, e) in enumerate(zip(de, en)) if d.strip() and e.strip()]
        kept[split], dropped[split] = ([de[i] for i in keep], [en[i] for i in keep]), len(de) - len(keep)
        if not keep:
            raise DataError(f"the {split} split has no sentence pairs (its files are empty or blank); check --source")
    return kept, dropped


# -----------------------------------------------------------------------------
# the IWSLT14 recipe (fairseq prepare-iwslt14.sh, with sacremoses in place of the Moses perl scripts)


def strip_train_tags(lines):
    """grep -v the metadata lines, then delete the title/description tags but keep their text."""
    lines = [line for line in lines if not any(tag in line for tag in IWSLT14_DROP)]
    for tag in IWSLT14_STRIP:
        lines = [line.replace(tag, "") for line in lines]
    return lines


def extract_segs(lines):
    """The `<seg id="N"> text </seg>` lines of an IWSLT .xml file, as text (the script also maps ’ to ')."""
    segs = [line for line in lines if "<seg id" in line]
    segs = [re.sub(r'<seg id="[0-9]*">\s*', "", line) for line in segs]
    return [re.sub(r"\s*</seg>\s*", "", line).replace("\u2019", "'") for line in segs]


@functools.lru_cache(maxsize=None)
def moses(lang):
    """One sacremoses tokenizer per language and process (loading its prefix lists takes a moment)."""
    from sacremoses import MosesTokenizer  # imported where used: most runs never tokenise
    return MosesTokenizer(lang=lang)


def _tokenize_chunk(args):
    """Moses-tokenise a list of lines like `tokenizer.perl -l lang` (default escaping of & < > ' " | [ ])."""
    lines, lang = args
    return [moses(lang).tokenize(line, escape=True, return_str=True) for line in lines]


def tokenize(lines, lang, workers):
    """Tokenise `lines` with `workers` processes (sacremoses is pure Python, so this is the slow step)."""
    chunks = [(lines[i : i + TOKENIZE_CHUNK], lang) for i in range(0, len(lines), TOKENIZE_CHUNK)]
    if workers <= 1 or len(chunks) <= 1:
        return [t for chunk in chunks for t in _tokenize_chunk(chunk)]
    with Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:  # Ctrl-C: main
        return [t for chunk in pool.map(_tokenize_chunk, chunks) for t in chunk]


def clean_corpus(de, en):
    """clean-corpus-n.perl: squeeze whitespace, drop pairs with a side outside CLEAN_MIN..CLEAN_MAX words or a
    word-count ratio above CLEAN_RATIO in either direction (empty sides are dropped first)."""
    kept_de, kept_en = [], []
    for d, e in zip(de, en):
        d, e = " ".join(d.replace("|", "").split()), " ".join(e.replace("|", "").split())  # |: Moses factors
        if not d or not e:
            continue
        nd, ne = len(d.split(" ")), len(e.split(" "))
        if not (CLEAN_MIN <= nd <= CLEAN_MAX and CLEAN_MIN <= ne <= CLEAN_MAX):
            continue
        if nd / ne > CLEAN_RATIO or ne / nd > CLEAN_RATIO:
            continue
        kept_de.append(d)
        kept_en.append(e)
    return kept_de, kept_en


def read_raw_iwslt14(source):
    """{file name: bytes} of the raw release, from de-en.tgz or from a folder holding its extracted files."""
    source = Path(source)
    if source.is_dir():
        return {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    try:
        with tarfile.open(source) as tar:
            return {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{source}: not a readable de-en.tgz ({' '.join(str(e).split())}); pass the IWSLT14 release "
                        f"with --source") from None


def iwslt14_splits(files, workers):
    """Run the recipe on the raw release: returns {split: (de_lines, en_lines)}, tokenised and lowercased."""
    names = [f"train.tags.de-en.{lang}" for lang in (SRC, TGT)]
    names += [f"{t}.de-en.{lang}.xml" for t in IWSLT14_TEST_SETS for lang in (SRC, TGT)]
    missing = [n for n in names if n not in files]
    if missing:
        raise DataError(f"the IWSLT14 release lacks {', '.join(missing)}; pass the original de-en.tgz with --source")
    read = lambda name: decode_lines(files[name], name)  # noqa: E731
    train = [tokenize(strip_train_tags(read(f"train.tags.de-en.{lang}")), lang, workers) for lang in (SRC, TGT)]
    check_aligned(*train, *names[:2])
    train = [[line.lower() for line in side] for side in clean_corpus(*train)]  # lowercase.perl after cleaning
    test = []
    for lang in (SRC, TGT):
        segs = [seg for t in IWSLT14_TEST_SETS for seg in extract_segs(read(f"{t}.de-en.{lang}.xml"))]
        test.append([line.lower() for line in tokenize(segs, lang, workers)])
    check_aligned(*test, "IWSLT14 test .de.xml files", "IWSLT14 test .en.xml files")
    # awk 'NR % 23 == 0' counts lines from 1: the 23rd, 46th, ... lines are valid
    valid = [[line for n, line in enumerate(side, 1) if n % VALID_EVERY == 0] for side in train]
    train = [[line for n, line in enumerate(side, 1) if n % VALID_EVERY != 0] for side in train]
    return {"train": tuple(train), "valid": tuple(valid), "test": tuple(test)}


def fairseq_folder(source, train_dir, dest):
    """Assemble a folder in fairseq's prepared layout at `dest`: {valid,test}.{de,en} and `code` copied from
    `source`, train.{de,en} from `train_dir` (e.g. the shared 5% sample, train-sample/). Returns dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = [(Path(train_dir) / f"train.{lang}") for lang in (SRC, TGT)]
    files += [Path(source) / name for name in (f"{s}.{lang}" for s in SPLITS[1:] for lang in (SRC, TGT))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"cannot assemble a fairseq folder: missing {', '.join(missing)}; check --source/--train_dir")
    for f in files + ([Path(source) / "code"] if (Path(source) / "code").is_file() else []):
        shutil.copyfile(f, dest / f.name)
    return dest


def read_prepared(folder):
    """The {train,valid,test}.{de,en} splits (BPE'd, fairseq layout) that exist in `folder`: {split: (de, en)}.
    Used to evaluate on the standard valid/test even where the train split is missing."""
    folder = Path(folder)
    return {split: read_pair(folder / f"{split}.{SRC}", folder / f"{split}.{TGT}") for split in SPLITS
            if (folder / f"{split}.{SRC}").exists() or (folder / f"{split}.{TGT}").exists()}


# -----------------------------------------------------------------------------
# BPE, vocabularies, binary corpus, summary


def learn_bpe(train_de, train_en, merges, codes_path):
    """Joint BPE codes learned on train de + en concatenated (as fairseq does), written to `codes_path`."""
    from subword_nmt.learn_bpe import learn_bpe as subword_learn_bpe  # imported where used: a reused run needs none
    with atomic_open(codes_path) as f:
        subword_learn_bpe(train_de + train_en, f, merges)


def apply_bpe(codes_path, lines):
    """Segment tokenised lines with the codes, continuation marker "@@ "."""
    from subword_nmt.apply_bpe import BPE  # imported where used, as in learn_bpe
    with open(codes_path, encoding="utf-8") as f:
        bpe = BPE(f)
    return [bpe.process_line(line) for line in lines]


def write_outputs(out, name, bpe_splits, refs, settings, dropped, t0):
    """Write the vocabularies, texts, corpus.npz and (last) summary.json for {split: (de_bpe, en_bpe)};
    refs[split] are the tokenised English lines before BPE (the BLEU references)."""
    (out / "summary.json").unlink(missing_ok=True)  # inputs read and checked: only now is the old corpus replaced
    vocabs = {lang: Vocab.build(bpe_splits["train"][k]) for k, lang in enumerate((SRC, TGT))}
    arrays, tokens, unk_rate = {}, {}, {}
    dtype = np.uint16 if max(map(len, vocabs.values())) <= np.iinfo(np.uint16).max else np.int32  # compact ids
    for split, sides in bpe_splits.items():
        tokens[split], unk_rate[split] = {}, {}
        for lang, lines in zip((SRC, TGT), sides):
            write_lines(out / f"{split}.bpe.{lang}", lines)
            ids = [vocabs[lang].encode(line) + [EOS] for line in lines]  # every sentence ends with EOS
            flat = np.fromiter((i for s in ids for i in s), dtype=dtype)
            arrays[f"{split}.{lang}.ids"] = flat
            arrays[f"{split}.{lang}.offsets"] = np.cumsum([0] + [len(s) for s in ids], dtype=np.int64)
            tokens[split][lang] = len(flat) - len(lines)  # BPE tokens, EOS not counted
            unk_rate[split][lang] = round(float((flat == UNK).sum()) / max(tokens[split][lang], 1), 5)
        write_lines(out / f"{split}.tok.{TGT}", refs[split])  # references for BLEU: tokenised, before BPE
    for lang, vocab in vocabs.items():
        vocab.save(out / f"vocab.{lang}.txt")
    with atomic_open(out / "corpus.npz", "wb") as f:
        np.savez(f, **arrays)
    summary = dict(dataset=name, src_lang=SRC, tgt_lang=TGT, specials=list(SPECIALS),
                   pairs={s: len(v[0]) for s, v in bpe_splits.items()}, tokens=tokens,
                   vocab={lang: len(v) for lang, v in vocabs.items()},
                   unk_rate={s: unk_rate[s] for s in ("valid", "test") if s in unk_rate},
                   empty_pairs_dropped=dropped, seconds=round(time.time() - t0, 1), settings=settings)
    with atomic_open(out / "summary.json") as f:
        json.dump(summary, f, indent=1)
    return summary


def reusable(out, settings):
    """The summary of a finished earlier run in `out` with the same settings, else None."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or unreadable: treat as unfinished
        return None
    return summary if summary.get("settings") == settings and (out / "corpus.npz").exists() else None


def start(out, settings, force, reads):
    """The summary of a finished run to reuse, or None, once `out` passed runs/folders.check_target (nothing is
    written before the inputs are read: then claim_folder(out, **CLAIM) takes it; the old corpus stays whole)."""
    check_target(out, "--out", reads)
    return None if force else reusable(Path(out), settings)


# -----------------------------------------------------------------------------
# the two datasets


@releases_locks
def prepare_multi30k(source=None, out=None, merges=MULTI30K_MERGES, force=False):
    """Multi30k task 1 de->en from the official tok files (a folder, or the repository URL by default)."""
    t0, out = time.time(), DATA_DIR / "multi30k" if out is None else out
    source = source or MULTI30K_URL
    is_url = re.match(r"https?://", str(source)) is not None
    source_id = str(source) if is_url else str(Path(source).resolve())
    settings = dict(dataset="multi30k", source=source_id, merges=merges)
    if summary := start(out, settings, force, reads=[] if is_url else [source]):
        return dict(summary, reused=True)
    out, splits = Path(out), {}
    for split, stem in MULTI30K_STEMS.items():
        paths = []
        for lang in (SRC, TGT):
            fname = f"{stem}.lc.norm.tok.{lang}"
            paths.append(download(source.rstrip("/") + "/" + fname, DOWNLOADS / "multi30k" / fname) if is_url
                         else Path(source) / fname)
        splits[split] = read_pair(*paths)
    return build(out, "multi30k", *drop_empty(splits), settings, merges, t0)


@releases_locks
def prepare_iwslt14(source=None, out=None, merges=IWSLT14_MERGES, force=False, workers=2, train_dir=None):
    """IWSLT14 de->en: from the raw de-en.tgz (a path or URL; fairseq's mirror by default) via fairseq's recipe,
    or from a folder already prepared in fairseq's layout (BPE'd {train,valid,test}.{de,en}), kept as is.
    With `train_dir`, the prepared folder is first assembled at out/fairseq from train_dir's train.{de,en} and
    the source folder's valid, test and code (fairseq_folder)."""
    t0, out = time.time(), DATA_DIR / "iwslt14" if out is None else out
    source = str(source or IWSLT14_URL)
    is_url = re.match(r"https?://", source) is not None
    prepared = not is_url and Path(source).is_dir() and not (Path(source) / f"train.tags.de-en.{SRC}").exists()
    settings = dict(dataset="iwslt14", source=source if is_url else str(Path(source).resolve()),
                    merges=None if prepared else merges)
    if train_dir and not prepared:
        raise DataError("--train_dir goes with a prepared --source folder (BPE'd valid and test in fairseq's layout)")
    if train_dir:
        settings["train_dir"] = str(Path(train_dir).resolve())
    if prepared:
        names = [f"{split}.{lang}" for split in SPLITS[1 if train_dir else 0:] for lang in (SRC, TGT)]
        missing = [name for name in names if not (Path(source) / name).exists()]
        if missing:
            raise DataError(f"{source} is a prepared folder without {', '.join(missing)}; add them (fairseq "
                            f"prepare-iwslt14.sh output), take train from --train_dir=DIR, or pass the raw "
                            f"de-en.tgz with --source")
    if summary := start(out, settings, force, reads=([] if is_url else [source]) + ([train_dir] if train_dir else [])):
        return dict(summary, reused=True)
    out = Path(out)
    if train_dir:
        claim_folder(out, **CLAIM)
        source = fairseq_folder(source, train_dir, out / "fairseq")
    if prepared:  # already tokenised, lowercased and BPE'd: keep the BPE, only count, encode and save
        splits, dropped = drop_empty(read_prepared(source))
        refs = {split: [remove_bpe(line) for line in en] for split, (_, en) in splits.items()}
        claim_folder(out, **CLAIM)
        summary, codes = write_outputs(out, "iwslt14", splits, refs, settings, dropped, t0), Path(source) / "code"
        if codes.exists():  # a by-product kept beside (load_corpus does not read it)
            with atomic_open(out / "bpe.codes") as f:
                f.write(codes.read_text(encoding="utf-8"))
        return summary
    tgz = download(source, DOWNLOADS / "de-en.tgz") if is_url else source
    splits = iwslt14_splits(read_raw_iwslt14(tgz), workers)
    return build(out, "iwslt14", *drop_empty(splits), settings, merges, t0)


def build(out, name, splits, dropped, settings, merges, t0):
    """Learn joint BPE on train, apply it to every split and write all outputs (the old corpus is unfinished now)."""
    claim_folder(out, **CLAIM)
    (out / "summary.json").unlink(missing_ok=True)
    learn_bpe(*splits["train"], merges, out / "bpe.codes")
    bpe_splits = {split: (apply_bpe(out / "bpe.codes", de), apply_bpe(out / "bpe.codes", en))
                  for split, (de, en) in splits.items()}
    refs = {split: en for split, (_, en) in splits.items()}
    return write_outputs(out, name, bpe_splits, refs, settings, dropped, t0)


def load_data(data: str, data_dir: str = "", data_source: str = "", seed: int = 0):
    """The corpus `data` (multi30k | iwslt14 | toy) for train.py, from data_dir (default data/<data>), prepared first
    from data_source (a folder, URL or tarball; default: the public download) if it is missing."""
    if data == "toy":
        return make_toy_corpus(seed=seed)
    folder = Path(data_dir or DATA_DIR / data)
    if not (folder / "summary.json").exists():
        print(f"{folder} is not prepared yet: running data/prepare.py {data}")
        try:
            {"multi30k": prepare_multi30k, "iwslt14": prepare_iwslt14}[data](source=data_source or None, out=folder)
        except DataError as e:
            raise SystemExit(f"error: {e} (from train.py: pass --data_source=PATH, e.g. "
                             f"--data_source=../shared/data/multi30k/tok)")
    try:
        return load_corpus(folder)
    except Exception as e:  # a missing, empty, truncated or non-UTF-8 file of the prepared folder
        raise SystemExit(f"error: cannot read the prepared corpus in {folder} ({brief(e)}); prepare it again with "
                         f"data/prepare.py --force")


def usage_error(message):
    """argparse's complaint as one line "error: ..." (its usage text is a --help away), exit status 2."""
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    """Command line entry point; DataError becomes "error: ..." and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)
    parser.add_argument("dataset", choices=["multi30k", "iwslt14"])
    parser.add_argument("--source", help="folder, file or URL to read (default: download)")
    parser.add_argument("--out", help="output folder (default: data/<dataset>)")
    parser.add_argument("--merges", type=int, help=f"BPE merges (default: multi30k {MULTI30K_MERGES}, "
                                                   f"iwslt14 {IWSLT14_MERGES})")
    parser.add_argument("--train_dir", help="iwslt14 from a prepared --source folder: take train.{de,en} from this "
                                            "folder (e.g. ../shared/data/iwslt14.de-en/train-sample)")
    parser.add_argument("--force", action="store_true", help="redo even if a finished run has the same settings")
    parser.error = usage_error  # one line, like every other error
    args = parser.parse_args(argv)
    if args.merges is not None and args.merges < 0:
        usage_error(f"--merges {args.merges} must be >= 0")
    if args.train_dir and args.dataset != "iwslt14":
        usage_error("--train_dir is for iwslt14 only")
    prepare = prepare_multi30k if args.dataset == "multi30k" else prepare_iwslt14
    kwargs = dict(source=args.source, out=args.out, force=args.force, **({"train_dir": args.train_dir} if
                  args.train_dir else {}), **({"merges": args.merges} if args.merges is not None else {}))
    try:
        summary = prepare(**kwargs)
    except KeyboardInterrupt:  # Ctrl-C: one line; summary.json is written last, so a rerun prepares the folder again
        print("error: interrupted; the folder is unfinished (no summary.json) and a rerun prepares it again",
              file=sys.stderr)
        sys.exit(130)
    except (DataError, OSError) as e:  # bad input, a full disk
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(("reused " if summary.get("reused") else "wrote ") + str(args.out or DATA_DIR / args.dataset))
    print(json.dumps({k: v for k, v in summary.items() if k != "reused"}, indent=1))
    print("pairs: " + " / ".join(f"{split} {n}" for split, n in summary["pairs"].items()))


if __name__ == "__main__":
    main()
