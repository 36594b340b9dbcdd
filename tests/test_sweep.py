"""The adversarial sweep (issue 16): every command against typo'd flags, wrong types, zero or negative sizes, bad data
files, checkpoints that are broken or not ours, bad arch files, output folders it cannot write and a GPU that is not
there. Each case must end in one line `error: ...` with no traceback, and leave every file as it was and nothing new
behind but lock files. In-process main(argv) calls (SystemExit caught); a few through the real command line.
Run: python -m pytest -q tests/test_sweep.py"""

import argparse
import functools
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data.prepare
import latency
import search
import train
from data import prepare
from experiments import bench, reproduce
from data.corpus import make_toy_corpus
from mos import FEATURE_NAMES, SPACES
from runs import loop
from runs.checkpoints import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TOY = ["--preset=toy", "--bleu_sentences=-1", "--test_sentences=4", "--log_interval=1"]
QUICK = ["--iters=1", "--warmup=0", "--repeats=1", "--threads=1"]  # latency.py
UNWRITABLE = "/sys/mos_sweep_out"  # mkdir fails there even for root (sysfs)
COMMANDS = {"train": train.main, "search": search.main, "latency": latency.main, "bench": bench.main,
            "precision": bench.precision, "reproduce": reproduce.main, "prepare": prepare.main}


toy_corpus = functools.lru_cache()(make_toy_corpus)


@pytest.fixture(autouse=True)
def no_gpu_and_a_quick_toy_corpus(monkeypatch):
    """Every case sees no CUDA GPU (also where there is one), and builds the synthetic corpus once."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(data.prepare, "make_toy_corpus", toy_corpus)


def fingerprint(*folders) -> dict:
    """Every file under the folders (lock files aside) -> (size, modification time in ns)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def one_line_error(capsys, folders, command, argv):
    """Run the command: it must stop with one line `error: ...` (returned), no traceback, and leave the files
    under `folders` as they were (lock files aside)."""
    before = fingerprint(*folders)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        COMMANDS[command](argv)
    out, err = capsys.readouterr()
    message = e.value.code if isinstance(e.value.code, str) else err.strip()
    assert e.value.code not in (0, None), "it stopped with success"
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in out + err
    assert fingerprint(*folders) == before, "it wrote or changed files"
    return message


# -----------------------------------------------------------------------------
# Inputs: a real toy checkpoint and its broken variants, arch files, data files and folders


VARIANTS = {  # name -> (make(good checkpoint) -> an object torch.load(weights_only=True) loads, its error)
    "empty dict": (lambda g: {}, "without a 'kind' entry"),
    "bare tensor": (lambda g: torch.zeros(3), "holds a Tensor without a 'kind' entry; it is not a mos checkpoint"),
    "list": (lambda g: [1, 2], "holds a list without a 'kind' entry"),
    "no kind": (lambda g: {k: v for k, v in g.items() if k != "kind"}, "without a 'kind' entry"),
    **{f"no {key}": (lambda g, key=key: {k: v for k, v in g.items() if k != key}, f"has no '{key}' entry")
       for key in ("model", "model_args", "config", "vocab", "step")},
    "weird kind": (lambda g: {**g, "kind": "banana"}, "of kind 'banana'"),
    "snapshot": (lambda g: dict(kind="snapshot", model=g["model"], step=1), "of kind 'snapshot'"),
    "string step": (lambda g: {**g, "step": "7"}, "has step '7' \\(a count >= 0\\)"),
    "weights not tensors": (lambda g: {**g, "model": {**g["model"], "shared.out_proj.weight": [1.0]}},
                            "does not fit its model_args .*shared.out_proj.weight"),
    "wrong shape": (lambda g: {**g, "model": {**g["model"], "shared.out_proj.weight": torch.zeros(3, 3)}},
                    "size mismatch for shared.out_proj.weight: copying a param with shape torch.Size\\(\\[3, 3\\]\\)"),
    "missing weight": (lambda g: {**g, "model": {k: v for k, v in g["model"].items() if "out_proj" not in k}},
                       "Missing key\\(s\\) in state_dict: \"shared.out_proj.weight\""),
    "NaN weights": (lambda g: {**g, "model": {**g["model"], "shared.out_proj.weight": g["model"]["shared.out_proj.weight"]
                                              * float("nan")}}, "non-finite values .* 'shared.out_proj.weight'"),
    "bigger space": (lambda g: {**g, "model_args": {**g["model_args"], "space": SPACES["cpu"].to_dict()}},
                     "does not fit its model_args .*(Missing key|size mismatch)"),
    "garbage model_args": (lambda g: {**g, "model_args": {"space": 3}}, "does not fit its model_args"),
    "standalone kind": (lambda g: {**g, "kind": "standalone"}, "does not fit its model_args"),
    "unknown setting": (lambda g: {**g, "config": {**g["config"], "colour": 1}}, "unknown setting --colour"),
    "wrong setting type": (lambda g: {**g, "config": {**g["config"], "max_steps": "many"}},
                           "--max_steps='many' should be a int"),
    "short vocab": (lambda g: {**g, "vocab": {**g["vocab"], "tgt": g["vocab"]["tgt"][:-1]}}, "tgt vocabulary of"),
    "optimizer of another model": (lambda g: {**g, "optimizer": {**g["optimizer"], "state": {
        **g["optimizer"]["state"], 0: {**g["optimizer"]["state"][0], "exp_avg": torch.zeros(2)}}}},
        "optimizer state of other shapes than the model's"),
    "bad data position": (lambda g: {**g, "data": {"epoch": -1, "batch": 0}}, "data position"),
}
FILES = {"zero bytes": "cannot load checkpoint .* safely", "truncated": "cannot load checkpoint .* safely",
         "random bytes": "cannot load checkpoint .* safely", "pickled object": "cannot load checkpoint .* safely",
         "flipped bytes": "does not match the checksum", "a folder": "is a folder", "missing": "does not exist"}
ARCHS = {"empty": ("", "cannot read arch file"), "not JSON": ("{enc_embed_dim: 64", "cannot read arch file"),
         "list": ("[1, 2]", "JSON object"), "nested": ("[" * 100_000 + "]" * 100_000, "cannot read arch file"),
         "missing key": (None, "missing keys \\['dec_layers'\\]"), "extra key": (None, "unknown keys \\['ffn'\\]"),
         "outside the space": (None, "not in space 'tiny'"), "not UTF-8": ("\udcff", "arch file .*utf-8"),
         "missing file": (None, "cannot read arch file")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny):
    """name -> path of every input the cases below name in braces, e.g. {good}; "ckpt <variant>" and
    "arch <name>" for the broken checkpoints and arch files."""
    folder = tmp_path_factory.mktemp("sweep")
    train.main([*TOY, "--max_steps=1", f"--out_dir={folder / 'supernet'}"])
    train.main([*TOY, "--max_steps=1", "--arch=smallest", f"--out_dir={folder / 'standalone'}"])
    paths = dict(good=folder / "supernet" / "ckpt.pt", standalone=folder / "standalone" / "ckpt.pt", inputs=folder,
                 predictor=tiny / "predictor.json", a_file=folder / "a_file", empty=folder / "empty",
                 text=folder / "text.txt", latin1=folder / "latin1.txt", cpu_predictor=folder / "cpu_predictor.json",
                 small_csv=folder / "small.csv", empty_dir=folder / "empty_dir")
    paths["a_file"].write_text("in the way\n")
    paths["empty"].write_text("")
    paths["text"].write_text("a1 a2 a3\n")
    paths["latin1"].write_bytes("ein hund läuft\n".encode("latin-1"))
    paths["cpu_predictor"].write_text(json.dumps({**json.loads(paths["predictor"].read_text()), "space": "cpu"}))
    paths["small_csv"].write_text(",".join(latency.HEADER) + "\n" + "".join(
        f'tiny,"{{}}",{",".join(["0.5"] * len(FEATURE_NAMES))},{i + 1},1,1,1,1,3\n' for i in range(3)))
    paths["empty_dir"].mkdir()
    good = torch.load(paths["good"], weights_only=True)
    for name, (make, _) in VARIANTS.items():
        path = paths[f"ckpt {name}"] = folder / f"{name.replace(' ', '_')}.pt"
        obj = make(good)
        (save_checkpoint if isinstance(obj, dict) else torch.save)(obj, path)  # dicts get a valid checksum
    raw = paths["good"].read_bytes()
    weight = good["model"]["shared.out_proj.weight"].numpy().tobytes()
    at = raw.find(weight) + len(weight) // 2  # 4 bytes in the middle of this tensor's data
    for name, data in {"zero bytes": b"", "truncated": raw[: len(raw) // 2], "random bytes": random.Random(0).randbytes(5000),
                       "flipped bytes": raw[:at] + bytes(b ^ 0xFF for b in raw[at:at + 4]) + raw[at + 4:]}.items():
        paths[f"ckpt {name}"] = folder / f"{name.replace(' ', '_')}.pt"
        paths[f"ckpt {name}"].write_bytes(data)
    paths["ckpt pickled object"] = folder / "pickled.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, paths["ckpt pickled object"])
    paths["ckpt a folder"], paths["ckpt missing"] = paths["empty_dir"], folder / "nope.pt"
    arch = SPACES["tiny"].smallest().to_dict()
    texts = {"missing key": json.dumps({k: v for k, v in arch.items() if k != "dec_layers"}),
             "extra key": json.dumps({**arch, "ffn": 64}), "outside the space": json.dumps({**arch, "enc_embed_dim": 9})}
    for name, (text, _) in ARCHS.items():
        paths[f"arch {name}"] = folder / f"arch_{name.replace(' ', '_')}.json"
        if name != "missing file":
            paths[f"arch {name}"].write_bytes((texts[name] if text is None else text).encode("utf-8", "surrogateescape"))
    prepared_data(folder, paths)
    return paths


def prepared_data(folder: Path, paths: dict):
    """A small Multi30k-layout source, prepared by data/prepare.py, and broken copies of both."""
    source = paths["source"] = folder / "source"
    source.mkdir()
    for stem in ("train", "val", "test_2016_flickr"):
        for lang, words in (("de", "ein hund läuft über die wiese"), ("en", "a dog runs across the meadow")):
            (source / f"{stem}.lc.norm.tok.{lang}").write_text("".join(f"{words} {i} .\n" for i in range(30)))
    paths["corpus"] = folder / "corpus"
    prepare.prepare_multi30k(source=source, out=paths["corpus"], merges=20)
    broken = {"corpus_truncated": ("corpus", "corpus.npz", "half"), "corpus_empty": ("corpus", "corpus.npz", b""),
              "corpus_missing": ("corpus", "corpus.npz", None), "summary_empty": ("corpus", "summary.json", b""),
              "vocab_latin1": ("corpus", "vocab.de.txt", "läuft 3\n".encode("latin-1")),
              "source_latin1": ("source", "val.lc.norm.tok.de", "läuft\n".encode("latin-1") * 30),
              "source_truncated": ("source", "val.lc.norm.tok.de", b"ein hund .\n" * 29),
              "source_empty": ("source", None, b"")}
    for name, (original, file, data) in broken.items():
        paths[name] = folder / name
        shutil.copytree(paths[original], paths[name])
        for path in [paths[name] / file] if file else sorted(paths[name].iterdir()):
            if data is None:
                path.unlink()
            else:
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if data == "half" else data)


def fill(argv, inputs, tmp_path):
    """argv with {name} replaced by the input of that name, {out} by tmp_path/out, {tmp} by tmp_path."""
    names = {k.replace(" ", "_"): v for k, v in inputs.items()}
    return [re.sub(r"\{(\w+)\}", lambda m: str(tmp_path / "out" if m[1] == "out" else tmp_path if m[1] == "tmp"
                                                 else names.get(m[1], m[0])), arg) for arg in argv]


# -----------------------------------------------------------------------------
# Checkpoints that do not load, or load but are not a whole mos checkpoint of their model: every command that reads one


LOADERS = {  # how each command is given {ckpt}; "resume" finds it as out/ckpt.pt
    "resume": ("train", [*TOY, "--resume=True", "--out_dir={out}"]),
    "eval_only": ("train", [*TOY, "--eval_only=True", "--init={ckpt}"]),
    "translate": ("train", [*TOY, "--translate={text}", "--init={ckpt}"]),
    "finetune": ("train", [*TOY, "--arch=smallest", "--init={ckpt}", "--out_dir={out}"]),
    "search": ("search", ["--ckpt={ckpt}", "--predictor={predictor}", "--out_dir={out}"]),
    "latency": ("latency", ["measure", "--ckpt={ckpt}", *QUICK]),
    "bench precision": ("precision", ["--fp32={ckpt}", "--out={out}/precision.json"]),
}


@pytest.mark.parametrize("variant", [*VARIANTS, *FILES])
@pytest.mark.parametrize("loader", LOADERS)
def test_broken_and_foreign_checkpoints_give_one_line_errors(inputs, tmp_path, capsys, loader, variant):
    ckpt = inputs[f"ckpt {variant}"]
    if loader == "resume":  # the run folder holds the checkpoint (or a folder of that name, or nothing)
        (tmp_path / "out").mkdir()
        ckpt, source = tmp_path / "out" / "ckpt.pt", ckpt
        if source.is_dir():
            ckpt.mkdir()
        elif source.exists():
            shutil.copy(source, ckpt)
    command, argv = LOADERS[loader]
    argv = [a.replace("{ckpt}", str(ckpt)) for a in fill(argv, inputs, tmp_path)]
    message = one_line_error(capsys, [tmp_path, inputs["inputs"]], command, argv)
    pattern = VARIANTS[variant][1] if variant in VARIANTS else FILES[variant]
    assert re.search(pattern, message) and str(ckpt) in message, message


def test_a_checkpoint_without_checksum_loads_with_a_warning(inputs, tmp_path, capsys):
    old = {k: v for k, v in torch.load(inputs["good"], weights_only=True).items() if k != "checksum"}
    torch.save(old, tmp_path / "old.pt")  # as checkpoints were saved before checksums
    assert train.load_checkpoint(tmp_path / "old.pt")["step"] == old["step"]
    assert re.fullmatch(r"warning: checkpoint .*old.pt has no checksum .*\n", capsys.readouterr().err)
    train.load_checkpoint(inputs["good"])
    assert capsys.readouterr().err == ""


# -----------------------------------------------------------------------------
# Arch files: every command that reads one


ARCH_READERS = {
    "train": ("train", [*TOY, "--arch={arch}", "--out_dir={out}"]),
    "finetune": ("train", [*TOY, "--arch={arch}", "--init={good}", "--out_dir={out}"]),
    "eval_only": ("train", [*TOY, "--eval_only=True", "--arch={arch}", "--init={good}"]),
    "translate": ("train", [*TOY, "--translate={text}", "--arch={arch}", "--init={good}"]),
    "latency measure": ("latency", ["measure", "--space=tiny", "--arch={arch}", *QUICK]),
    "latency depth": ("latency", ["depth", "--ckpt={good}", "--arch={arch}", *QUICK]),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("reader", ARCH_READERS)
def test_bad_arch_files_give_one_line_errors(inputs, tmp_path, capsys, reader, arch):
    command, argv = ARCH_READERS[reader]
    argv = [a.replace("{arch}", str(inputs[f"arch {arch}"])) for a in fill(argv, inputs, tmp_path)]
    message = one_line_error(capsys, [tmp_path, inputs["inputs"]], command, argv)
    assert re.search(ARCHS[arch][1], message), message


# -----------------------------------------------------------------------------
# Flags, values, data files, output folders and devices, command by command


CASES = [  # (command, argv, pattern of the error)
    # train.py
    ("train", [*TOY, "--max_step=3"], "unknown setting --max_step;"),
    ("train", ["max_steps=3"], "bad argument 'max_steps=3'"),
    ("train", [*TOY, "--max_steps=many"], "--max_steps=many should be a int"),
    ("train", [*TOY, "--max_tokens=1.5"], "--max_tokens=1.5 should be a int"),
    ("train", [*TOY, "--bf16=maybe"], "--bf16=maybe should be a bool"),
    ("train", [*TOY, "--max_tokens=0", "--out_dir={out}"], "--max_tokens=0 must be >= 1"),
    ("train", [*TOY, "--max_tokens=-5", "--out_dir={out}"], "--max_tokens=-5 must be >= 1"),
    ("train", [*TOY, "--eval_interval=0", "--out_dir={out}"], "--eval_interval=0 must be >= 1"),
    ("train", [*TOY, "--log_interval=0", "--out_dir={out}"], "--log_interval=0 must be >= 1"),
    ("train", [*TOY, "--max_steps=-1", "--out_dir={out}"], "--max_steps=-1 must be >= 0"),
    ("train", [*TOY, "--num_experts=0", "--out_dir={out}"], "--num_experts=0 must be >= 1"),
    ("train", [*TOY, "--seed=-1", "--out_dir={out}"], "--seed=-1 must be in \\[0, 4294967295\\]"),
    ("train", [*TOY, "--lr=-0.1", "--out_dir={out}"], "--lr=-0.1 must be > 0"),
    ("train", [*TOY, "--dropout=1.5", "--out_dir={out}"], "--dropout=1.5 must be in \\[0, 1\\)"),
    ("train", [*TOY, "--test_sentences=-1", "--out_dir={out}"], "--test_sentences=-1 must be >= 0"),
    ("train", [*TOY, "--data=wmt", "--out_dir={out}"], "--data=wmt; choose one of"),
    ("train", [*TOY, "--space=huge", "--out_dir={out}"], "--space=huge; choose one of"),
    ("train", [*TOY, "--router=moe", "--out_dir={out}"], "--router=moe; choose one of"),
    ("train", [*TOY, "--sampling=all", "--out_dir={out}"], "--sampling=all; choose one of"),
    ("train", [*TOY, "--router=none", "--out_dir={out}"], "add --num_experts=1"),
    ("train", [*TOY, "--device=cuda", "--out_dir={out}"], "--device=cuda but torch sees no CUDA GPU"),
    ("train", [*TOY, "--device=cuda:1", "--out_dir={out}"], "--device=cuda:1 but torch sees no CUDA GPU"),
    ("train", [*TOY, "--device=tpu", "--out_dir={out}"], "--device=tpu; use cpu or cuda"),
    ("train", [*TOY, "--max_steps=1", "--out_dir={a_file}"], "a_file is a file, not a folder"),
    ("train", [*TOY, "--max_steps=1", "--out_dir={a_file}/run"], "cannot write to folder .*a_file/run"),
    ("train", [*TOY, "--max_steps=1", f"--out_dir={UNWRITABLE}"], "cannot write to folder /sys"),
    ("train", [*TOY, "--resume=True", "--out_dir={tmp}/never_ran"], "never_ran does not exist"),
    ("train", [*TOY, "--resume=True", "--out_dir={empty_dir}"], "checkpoint .*empty_dir/ckpt.pt does not exist"),
    ("train", [*TOY, "--eval_only=True"], "need --init=CHECKPOINT"),
    ("train", [*TOY, "--eval_only=True", "--init={good}", "--split=dev"], "--split=dev; choose one of"),
    ("train", [*TOY, "--eval_only=True", "--init={good}", "--space=cpu"], "--space=cpu \\(it has tiny\\)"),
    ("train", [*TOY, "--arch=smallest", "--init={standalone}", "--out_dir={out}"], "holds a standalone model"),
    ("train", [*TOY, "--init={good}", "--out_dir={out}"], "--init=.* without --arch: finetuning extracts"),
    ("train", [*TOY, "--translate={tmp}/nope.txt", "--init={good}"], "cannot read --translate=.*nope.txt"),
    ("train", [*TOY, "--translate={latin1}", "--init={good}"], "cannot read --translate=.*utf-8"),
    ("train", [*TOY, "--eval_only=True", "--init={good}", "--data=multi30k", "--data_dir={corpus}"],
     "other vocabularies than data 'multi30k'"),
    # train.py with a missing, empty, truncated or non-UTF-8 prepared corpus
    ("train", ["--preset=toy", "--data=multi30k", "--data_dir={tmp}/none", "--data_source={tmp}/nowhere",
               "--out_dir={out}"], "missing split file.*--data_source"),
    *[("train", ["--preset=toy", "--data=multi30k", f"--data_dir={{{name}}}", "--out_dir={out}"],
       "cannot read the prepared corpus in .*" + name)
      for name in ("corpus_truncated", "corpus_empty", "corpus_missing", "summary_empty", "vocab_latin1")],
    # latency.py
    ("latency", ["--iter=3"], "unknown setting --iter;"),
    ("latency", ["--iters=x"], "--iters=x should be a int"),
    ("latency", ["--space=tiny", "--iters=0"], "--iters=0 must be >= 1"),
    ("latency", ["--space=tiny", "--repeats=-1"], "--repeats=-1 must be >= 1"),
    ("latency", ["--space=tiny", "--threads=0"], "--threads=0 must be >= 1"),
    ("latency", ["--space=tiny", "--src_vocab=2"], "--src_vocab=2 must be >= 5"),
    ("latency", ["--space=huge"], "--space=huge; choose one of"),
    ("latency", ["bogus"], "unknown command 'bogus'"),
    ("latency", ["--space=tiny", "--device=cuda", *QUICK], "--device=cuda but torch sees no CUDA GPU"),
    ("latency", ["--space=tiny", "--log={a_file}/log.jsonl", *QUICK], "cannot write to folder .*a_file"),
    ("latency", ["dataset", "--space=tiny", "--n=2", f"--out={UNWRITABLE}/x.csv", *QUICK], "cannot write to folder"),
    ("latency", ["dataset", "--space=tiny", "--n=2", "--out={a_file}/x.csv", *QUICK], "cannot write to folder"),
    ("latency", ["dataset", "--space=tiny", "--n=2", "--out={empty_dir}", *QUICK], "empty_dir is a folder; give a file path"),
    ("latency", ["dataset", "--space=tiny", "--n=2", "--out={latin1}", *QUICK], "latin1.txt exists and is not a latency dataset"),
    ("latency", ["dataset", "--space=tiny", "--n=2", "--out={text}", *QUICK], "is not a latency dataset"),
    ("latency", ["dataset", "--space=tiny", "--n=2", "--out={small_csv}", *QUICK], "holds other subnets"),
    ("latency", ["fit", "--out={tmp}/none.csv", "--predictor={out}/p.json"], "cannot read latency CSV"),
    ("latency", ["fit", "--out={empty}", "--predictor={out}/p.json"], "cannot read latency CSV"),
    ("latency", ["fit", "--out={latin1}", "--predictor={out}/p.json"], "cannot read latency CSV"),
    ("latency", ["fit", "--out={text}", "--predictor={out}/p.json"], "cannot read latency CSV"),
    ("latency", ["fit", "--out={small_csv}", "--predictor={out}/p.json"], "holds 1 distinct subnets; fitting a predictor needs at least 12"),
    ("latency", ["fit", "--out={small_csv}", "--predictor={a_file}/p.json"], "cannot write to folder"),
    # search.py
    ("search", ["--budget=[5]"], "unknown setting --budget;"),
    ("search", ["--budgets=abc"], "--budgets=abc should be a tuple"),
    ("search", ["--budgets=[]"], "--budgets=\\[\\]; give a list of finite, positive numbers"),
    ("search", ["--budgets=[-5]"], "give a list of finite, positive numbers"),
    ("search", ["--budgets=['x']"], "give a list of finite, positive numbers"),
    ("search", ["--budgets=[1e999]"], "give a list of finite, positive numbers"),
    ("search", ["--population=0"], "--population=0 must be >= 1"),
    ("search", ["--parents=1"], "--parents=1 must be >= 2"),
    ("search", ["--mutate_prob=1.5"], "--mutate_prob=1.5 must be in \\[0, 1\\]"),
    ("search", ["--final_iters=0"], "--final_iters=0 must be >= 1"),
    ("search", ["--latency=fast"], "--latency=fast; choose one of"),
    ("search", ["--population=9"], "population 9 != parents"),
    ("search", ["--ckpt={good}", "--device=cuda"], "--device=cuda but torch sees no CUDA GPU"),
    ("search", ["--ckpt={good}", "--predictor={predictor}", "--budgets=[30]", "--out_dir={a_file}"],
     "a_file is a file, not a folder"),
    ("search", ["--ckpt={good}", "--predictor={predictor}", "--budgets=[30]", f"--out_dir={UNWRITABLE}"],
     "cannot write to folder"),
    ("search", ["--ckpt={good}", "--predictor={predictor}", "--latency_csv={tmp}/none.csv", "--out_dir={out}"],
     "cannot read latency CSV .*none.csv"),
    ("search", ["--ckpt={standalone}", "--predictor={predictor}", "--out_dir={out}"], "holds a standalone model"),
    ("search", ["--ckpt={good}", "--predictor={tmp}/none.json", "--out_dir={out}"], "--latency=predicted needs"),
    ("search", ["--ckpt={good}", "--predictor={empty}", "--out_dir={out}"], "cannot read latency predictor"),
    ("search", ["--ckpt={good}", "--predictor={arch_nested}", "--out_dir={out}"], "cannot read latency predictor"),
    ("search", ["--ckpt={good}", "--predictor={arch_list}", "--out_dir={out}"], "is not one `python latency.py fit`"),
    ("search", ["--ckpt={good}", "--predictor={small_csv}", "--out_dir={out}"], "cannot read latency predictor"),
    ("search", ["--ckpt={good}", "--predictor={cpu_predictor}", "--out_dir={out}"], "was fit on space 'cpu'"),
    # bench.py
    ("bench", ["--repeat=3"], "unknown setting --repeat;"),
    ("bench", ["repeats=3"], "bad argument 'repeats=3'"),
    ("bench", ["--repeats=x"], "--repeats=x should be a int"),
    ("bench", ["--repeats=0"], "--repeats=0 must be >= 1"),
    ("bench", ["--decode_batch=-1"], "--decode_batch=-1 must be >= 1"),
    ("bench", ["--data=wmt"], "--data=wmt; choose one of"),
    ("bench", ["--space=huge"], "--space=huge; choose one of"),
    ("bench", ["--out={a_file}/bench.json"], "cannot write to folder"),
    ("bench", ["--device=cuda", "--out={out}/bench.json"], "--device=cuda but torch sees no CUDA GPU"),
    ("precision", ["--fp=x"], "unknown setting --fp;"),
    ("precision", ["--samples=0"], "--samples=0 must be >= 1"),
    ("precision", ["--fp32={good}", "--out={a_file}/p.json"], "cannot write to folder"),
    # reproduce.py
    ("reproduce", ["--outt=x"], "unknown setting --outt;"),
    ("reproduce", ["--preset=wmt"], "unknown preset 'wmt'"),
    ("reproduce", ["--budgets=[]"], "give a list of finite, positive numbers"),
    ("reproduce", ["--budgets=[-1]"], "give a list of finite, positive numbers"),
    ("reproduce", ["--latency_n=0"], "--latency_n=0 must be >= 12"),
    ("reproduce", ["--finetune_steps=-1"], "--finetune_steps=-1 must be >= 0"),
    ("reproduce", ["--extra=[1]"], "give train.py flags as strings"),
    ("reproduce", ["--extra=['--bogus=1']"], "unknown setting --bogus;"),
    ("reproduce", ["--preset=toy", "--out={a_file}"], "cannot write to folder"),
    ("reproduce", ["--preset=toy", f"--out={UNWRITABLE}"], "cannot write to folder"),
    # data/prepare.py
    ("prepare", ["multi30k", "--sourc=x"], "unrecognized arguments: --sourc=x"),
    ("prepare", ["wmt"], "invalid choice: 'wmt'"),
    ("prepare", ["multi30k", "--merges=x"], "invalid int value: 'x'"),
    ("prepare", ["multi30k", "--merges=-1"], "--merges -1 must be >= 0"),
    ("prepare", ["multi30k", "--source={tmp}/none", "--out={out}"], "missing split file"),
    ("prepare", ["multi30k", "--source={source_latin1}", "--out={out}"], "line 1 is not valid UTF-8"),
    ("prepare", ["multi30k", "--source={source_truncated}", "--out={out}"], "line counts differ"),
    ("prepare", ["multi30k", "--source={source_empty}", "--out={out}"], "no sentence pairs"),
    ("prepare", ["multi30k", "--source={source}", "--out={a_file}"], "a_file is a file, not a folder"),
    ("prepare", ["iwslt14", "--source={text}", "--out={out}"], "not a readable de-en.tgz"),
]


@pytest.mark.parametrize("command, argv, pattern", CASES, ids=[" ".join([c, *a[-2:]])[:70] for c, a, _ in CASES])
def test_bad_flags_values_files_and_folders_give_one_line_errors(inputs, tmp_path, capsys, command, argv, pattern):
    if any(UNWRITABLE in a for a in argv) and not Path("/sys").is_dir():
        pytest.skip("no /sys to be refused by")
    message = one_line_error(capsys, [tmp_path, inputs["inputs"]], command, fill(argv, inputs, tmp_path))
    assert re.search(pattern, message), message


def test_emulated_bf16_warns_and_runs(inputs, capsys, monkeypatch):
    translate = [*TOY, "--bf16=True", f"--translate={inputs['text']}", f"--init={inputs['good']}"]
    monkeypatch.setattr(loop, "fast_bf16", lambda device: False)  # as on a CPU without AVX-512 BF16 / AMX
    train.main(translate)
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "~100x slower than fp32" in warnings[0] and len(out.splitlines()) == 1  # it ran
    monkeypatch.setattr(loop, "fast_bf16", lambda device: True)  # native bf16: no warning
    train.main(translate)
    assert "warning" not in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The same through the real command lines: exit status, one line on stderr, no traceback


@pytest.mark.parametrize("script, args, status", [
    ("train.py", ["--max_step=3"], 1), ("search.py", ["--ckpt={ckpt NaN weights}"], 1),
    ("latency.py", ["--iters=0"], 1), ("experiments/bench.py", ["--repeats=x"], 1), ("experiments/reproduce.py", ["--budgets=[]"], 1),
    ("data/prepare.py", ["wmt"], 2)])
def test_command_lines_end_in_one_error_line(inputs, tmp_path, script, args, status):
    args = [a.replace("{ckpt NaN weights}", str(inputs["ckpt NaN weights"])) for a in args]
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == status and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
