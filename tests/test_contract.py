"""The run-folder contract (runs/folders.py, issue 40): no mos command changes a file it did not write, refuses an
impossible target or one of its inputs before anything is written, and checks every input first. Every test runs in
a scratch copy of the project (never in the checkout), in-process.
Run: python -m pytest -q tests/test_contract.py (about a minute)"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import latency
import mos
import search
import train
from data import prepare
from runs import files, folders
from test_reliability import one_line  # call() stops with one line `error: ...` matching a pattern

ROOT = Path(__file__).resolve().parent.parent
TOY = ["--preset=toy", "--bleu_sentences=-1", "--test_sentences=4", "--save_interval=0"]
QUICK_SEARCH = ["--valid_sentences=10", "--threads=1", "--final_iters=1", "--final_repeats=1", "--final_warmup=0",
                "--search_iters=1", "--search_warmup=0", "--population=4", "--parents=2", "--mutations=1",
                "--crossovers=1", "--iterations=1", "--floor_samples=10"]
QUICK_LATENCY = ["--iters=1", "--warmup=0", "--threads=1"]


def hashes(root: Path) -> dict:
    """Every regular file under root (symlinks not followed) -> its sha256."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def unchanged(before: dict, after: dict) -> list:
    """The files of `before` that are gone or changed in `after` (new files are allowed)."""
    return [name for name, digest in before.items() if after.get(name) != digest]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A scratch copy of the project (its source, a .git folder and an untracked notes file), with a toy supernet
    run folder `sup`, a latency dataset and predictor in `lat`, and a tiny Multi30k source in `src`."""
    root = tmp_path_factory.mktemp("project")
    for path in [*ROOT.glob("*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("runs/*.py"), ROOT / "README.md"]:
        (root / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / path.relative_to(ROOT))
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "notes.txt").write_text("my untracked notes\n")
    old = os.getcwd()
    os.chdir(root)
    try:
        train.main([*TOY, "--max_steps=2", "--out_dir=sup"])
        latency.main(["dataset", "--ckpt=sup/ckpt.pt", "--n=12", "--out=lat/latency.csv", *QUICK_LATENCY])
        latency.main(["fit", "--out=lat/latency.csv", "--predictor=lat/predictor.json", "--mlp_steps=5"])
        (root / "src").mkdir()
        for stem in ("train", "val", "test_2016_flickr"):
            for lang, words in (("de", "ein hund läuft über die wiese"), ("en", "a dog runs across the meadow")):
                (root / "src" / f"{stem}.lc.norm.tok.{lang}").write_text(
                    "".join(f"{words} {i} .\n" for i in range(30)))
    finally:
        os.chdir(old)
    return root


# Every writer (item 4 of the issue), as a function of its output target and of --overwrite
WRITERS = {
    "train.py --out_dir": lambda t, o: train.main([*TOY, "--init=sup/ckpt.pt", "--arch=smallest", "--max_steps=2",
                                                   f"--out_dir={t}", *o]),
    "search.py --out_dir": lambda t, o: search.main(["--ckpt=sup/ckpt.pt", "--predictor=lat/predictor.json",
                                                     "--budgets=[100000]", *QUICK_SEARCH, f"--out_dir={t}", *o]),
    "data/prepare.py --out": lambda t, o: prepare.main(["multi30k", "--source=src", f"--out={t}", "--merges=20",
                                                        *(["--force"] if o else [])]),
}
FILE_WRITERS = {
    "latency.py dataset --out": lambda t: latency.main(["dataset", "--ckpt=sup/ckpt.pt", "--n=2", f"--out={t}",
                                                        *QUICK_LATENCY]),
    "latency.py fit --predictor": lambda t: latency.main(["fit", "--out=lat/latency.csv", f"--predictor={t}",
                                                          "--mlp_steps=5"]),
    "latency.py --log": lambda t: latency.main(["--space=tiny", "--repeats=1", *QUICK_LATENCY, f"--log={t}"]),
}
INPUT = {"train.py --out_dir": "sup", "search.py --out_dir": "sup", "data/prepare.py --out": "src"}
FILE_INPUT = {"latency.py dataset --out": "sup/ckpt.pt", "latency.py fit --predictor": "lat/latency.csv",
              "latency.py --log": "sup/ckpt.pt"}


def targets(scratch: Path, case: str):
    """The folders each writer is pointed at: empty, the project itself, a folder with one foreign file, the
    writer's input folder, a symlink to it, and a fresh folder."""
    (scratch / "foreign").mkdir(exist_ok=True)
    (scratch / "foreign" / "notes.md").write_text("not mos's\n")
    slug = re.sub(r"\W+", "_", case)
    link = scratch / f"link_{slug}"
    if not link.exists():
        link.symlink_to(scratch / INPUT[case], target_is_directory=True)
    return {"": False, ".": False, "foreign": False, INPUT[case]: False, link.name: False, f"fresh_{slug}": True}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", list(WRITERS))
def test_no_writer_changes_a_file_it_did_not_write(scratch, case, overwrite, monkeypatch):
    monkeypatch.chdir(scratch)
    flags = ["--overwrite=True"] if overwrite else []
    for target, allowed in targets(scratch, case).items():
        name = f"{target}_{overwrite}" if allowed else target
        before = hashes(scratch)
        if allowed:
            WRITERS[case](name, flags)
            assert (scratch / name / folders.OWNER).exists(), case
        else:
            one_line(lambda: WRITERS[case](target, flags), "mos never writes|entries no mos command wrote|is empty")
        assert not unchanged(before, hashes(scratch)), (case, target, unchanged(before, hashes(scratch)))


@pytest.mark.parametrize("case", list(FILE_WRITERS))
def test_no_single_file_writer_changes_a_file_of_another_kind(scratch, case, monkeypatch):
    monkeypatch.chdir(scratch)
    (scratch / "foreign").mkdir(exist_ok=True)
    (scratch / "foreign" / "notes.md").write_text("not mos's\n")
    link = scratch / f"link_{case.split()[1]}"
    if not link.exists():
        link.symlink_to((scratch / FILE_INPUT[case]).parent, target_is_directory=True)
    refused = ["", ".", "foreign", "foreign/notes.md", FILE_INPUT[case], f"{link.name}/{Path(FILE_INPUT[case]).name}",
               "sup/new_file", "mos.py", "notes.txt"]
    for target in refused:
        before = hashes(scratch)
        if case == "latency.py --log" and target == "":  # --log's default: no log at all
            FILE_WRITERS[case](target)
        else:
            one_line(lambda: FILE_WRITERS[case](target), "mos never writes|is not a|run folder|is empty")
        assert not unchanged(before, hashes(scratch)), (case, target)
    before = hashes(scratch)
    FILE_WRITERS[case](f"fresh/{case.split()[1]}.out")
    assert not unchanged(before, hashes(scratch)) and (scratch / "fresh" / f"{case.split()[1]}.out").exists()


# -----------------------------------------------------------------------------
# The findings of the issue, one test each (each failed on main before the contract)


def test_overwrite_in_an_empty_or_current_folder_deletes_nothing(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    before = hashes(scratch)
    for out_dir in ("", ".", str(scratch), str(Path.home())):
        one_line(lambda: train.main([*TOY, "--max_steps=1", f"--out_dir={out_dir}", "--overwrite=True"]),
                 "is empty|current folder|home folder|mos never writes")
    assert hashes(scratch) == before


def test_overwrite_never_deletes_the_input_it_reads(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    before = hashes(scratch / "sup")
    one_line(lambda: search.main(["--ckpt=sup/ckpt.pt", "--out_dir=sup", "--overwrite=True", "--budgets=[100000]",
                                  "--predictor=lat/predictor.json", *QUICK_SEARCH]), "contains an input")
    one_line(lambda: train.main([*TOY, "--init=sup/ckpt.pt", "--arch=smallest", "--out_dir=sup", "--overwrite=True"]),
             "contains an input")
    one_line(lambda: latency.main(["fit", "--out=lat/latency.csv", "--predictor=sup/ckpt.pt"]), "run folder")
    one_line(lambda: latency.main(["--space=tiny", "--log=sup/results.json"]), "run folder")
    assert hashes(scratch / "sup") == before


def test_overwrite_deletes_only_the_owners_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main([*TOY, "--max_steps=1", "--out_dir=run"])
    (tmp_path / "run" / "mine.txt").write_text("keep me")
    one_line(lambda: train.main([*TOY, "--max_steps=1", "--out_dir=run", "--overwrite=True"]),
             r"entries no mos command wrote there \(mine.txt\)")
    assert (tmp_path / "run" / "ckpt.pt").exists() and (tmp_path / "run" / "mine.txt").read_text() == "keep me"
    (tmp_path / "run" / "mine.txt").unlink()
    (tmp_path / "run" / "hyps_mine.txt").mkdir()  # a folder under a file's name is not train.py's file
    one_line(lambda: train.main([*TOY, "--max_steps=1", "--out_dir=run", "--overwrite=True"]), r"\(hyps_mine.txt\)")
    (tmp_path / "run" / "hyps_mine.txt").rmdir()
    folders.record_files(tmp_path / "run", ["scores_*.json"])  # an experiment's files beside the run
    (tmp_path / "run" / "scores_1.json").write_text("{}")
    train.main([*TOY, "--max_steps=1", "--out_dir=run", "--overwrite=True"])
    assert not (tmp_path / "run" / "scores_1.json").exists() and (tmp_path / "run" / "results.json").exists()


def test_a_finetune_honours_dropout_and_resumes_without_its_supernet(scratch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(scratch / "sup", tmp_path / "sup")
    ft = [*TOY, "--init=sup/ckpt.pt", "--arch=largest", "--save_interval=2", "--eval_interval=100"]
    for p in (0.0, 0.3):  # the supernet was trained at the toy preset's 0.1
        cfg = train.TrainConfig(**{**train.PRESETS["toy"], "init": "sup/ckpt.pt", "arch": "smallest", "dropout": p})
        model, _, model_args, space, arch = train.build_model(cfg, train.load_data("toy", seed=cfg.seed), {})
        assert (model.enc_dropout, model.dec_dropout) == mos.scaled_dropout(p, arch, space)
        assert model_args["dropout"] == p
        assert all(layer.dropout == model.dec_dropout for layer in model.decoder)
    train.main([*ft, "--max_steps=4", "--out_dir=straight"])
    train.main([*ft, "--max_steps=2", "--out_dir=pieces"])
    shutil.rmtree(tmp_path / "sup")  # the supernet moved away: the finetune's checkpoint holds every weight
    train.main([*ft, "--max_steps=4", "--out_dir=pieces", "--resume=True"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("straight", "pieces"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, pieces = ({k: v for k, v in json.loads((tmp_path / d / "results.json").read_text())["model"].items()
                         if k != "decode_seconds"} for d in ("straight", "pieces"))  # (a clock reading aside)
    assert straight == pieces


def test_a_latency_dataset_is_one_protocol_and_fit_keeps_a_good_predictor(scratch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["dataset", "--space=tiny", "--out=lat.csv", *QUICK_LATENCY]
    latency.main([*base, "--n=3"])
    header = (tmp_path / "lat.csv").read_text().splitlines()[0].split(",")
    assert header[-len(latency.SETTINGS):] == latency.SETTINGS
    for flag in ("--beam=2", "--tgt_len=5", "--src_len=5", "--threads=2", "--iters=2", "--warmup=1"):
        one_line(lambda: latency.main([*base, "--n=4", flag]), f"measured with other settings .*{flag.split('=')[0]}")
    one_line(lambda: latency.main([*base, "--n=2"]), r"already holds 3 subnets, more than --n=2")
    shutil.copy(scratch / "lat" / "predictor.json", tmp_path / "predictor.json")
    good = (tmp_path / "predictor.json").read_bytes()
    rows = (scratch / "lat" / "latency.csv").read_text().splitlines()
    (tmp_path / "same.csv").write_text("\n".join([rows[0]] + [rows[1]] * 20) + "\n")  # 20 identical rows
    one_line(lambda: latency.main(["fit", "--out=same.csv", "--predictor=predictor.json"]), "1 distinct subnets")
    assert (tmp_path / "predictor.json").read_bytes() == good
    zero = dict(kind="linear", weight=[0.0] * len(latency.FEATURE_NAMES), bias=0.0, space="tiny", protocol="beam")
    (tmp_path / "zero.json").write_text(json.dumps(zero))  # every budget would be "met"
    one_line(lambda: latency.load_predictor(tmp_path / "zero.json"), "not positive latencies")


def test_settings_are_checked_before_anything_is_written(scratch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flag, pattern in (("--lr=1e999", "--lr=inf must be > 0"), ("--lr=0", "--lr=0.0 must be > 0"),
                          ("--dropout=1.0", r"--dropout=1.0 must be in \[0, 1\)"),
                          ("--label_smoothing=1.0", r"--label_smoothing=1.0 must be in \[0, 1\)")):
        one_line(lambda: train.main([*TOY, flag, "--out_dir=run"]), pattern)
    one_line(lambda: search.main([f"--ckpt={scratch / 'sup' / 'ckpt.pt'}", "--protocol=fast", "--out_dir=s"]),
             r"--protocol=fast; choose one of \['beam', 'hat'\]")
    one_line(lambda: search.main([f"--ckpt={scratch / 'sup' / 'ckpt.pt'}", "--budgets=[1e999]", "--out_dir=s"]),
             "finite, positive numbers")
    assert list(tmp_path.iterdir()) == []  # nothing was written, not even a folder


def test_resume_refuses_fewer_steps_than_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main([*TOY, "--max_steps=4", "--out_dir=run"])
    config = (tmp_path / "run" / "config.json").read_bytes()
    one_line(lambda: train.main([*TOY, "--max_steps=2", "--out_dir=run", "--resume=True"]),
             r"--max_steps=2 is below the step of checkpoint .* \(4\); give --max_steps=4 or more")
    assert (tmp_path / "run" / "config.json").read_bytes() == config


@pytest.mark.parametrize("owner", ["[1, 2]", '{"command": "train.py", "inputs": [1]}', '"x"', "\xff\xfe"])
def test_a_damaged_owner_record_is_one_line_naming_it(tmp_path, monkeypatch, owner):
    monkeypatch.chdir(tmp_path)
    train.main([*TOY, "--max_steps=1", "--out_dir=run"])
    (tmp_path / "run" / "owner.json").write_bytes(owner.encode("latin-1"))
    before = hashes(tmp_path)
    for flags in (["--resume=True"], ["--overwrite=True"], []):
        one_line(lambda: train.main([*TOY, "--max_steps=2", "--out_dir=run", *flags]), r"run/owner.json is damaged")
    assert hashes(tmp_path) == before


def test_a_log_with_bad_bytes_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main([*TOY, "--max_steps=2", "--out_dir=run", "--log_interval=1", "--save_interval=1"])
    with open(tmp_path / "run" / "train_log.jsonl", "ab") as f:
        f.write(b"\xff\xfe not a record\n[1, 2]\n")
    train.main([*TOY, "--max_steps=3", "--out_dir=run", "--log_interval=1", "--resume=True"])
    assert [r["step"] for r in files.read_jsonl(tmp_path / "run" / "train_log.jsonl")] == [1, 2, 3]


def test_the_stop_hint_quotes_its_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train.main([*TOY, "--max_steps=5", "--out_dir=my run", "--max_minutes=1e-9"])
    printed = capsys.readouterr()
    assert "continue with --resume=True --out_dir='my run'" in printed.out + printed.err


def test_prepare_refuses_a_training_folder(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    before = hashes(scratch)
    one_line(lambda: prepare.main(["multi30k", "--source=src", "--out=sup"]),
             "sup holds a train.py run, not a data/prepare.py one; give another folder$")
    one_line(lambda: prepare.main(["multi30k", "--source=src", "--out="]), "--out is empty")
    assert hashes(scratch) == before
