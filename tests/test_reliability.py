"""Nothing lost, nothing silently wrong (issue 31): run folders that are never clobbered, resumes that check their
data, outputs validated before they replace good ones, failures that end in one line. Each test is one finding of
the adversarial probe; real processes where signals or file-size limits are involved.
Run: python -m pytest -q tests/test_reliability.py"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from data.corpus import make_toy_corpus

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TOY = ["--preset=toy", "--bleu_sentences=-1", "--test_sentences=4", "--log_interval=1"]


def run(out, *flags):
    """train.main on the toy task into `out`."""
    train.main([*TOY, f"--out_dir={out}", *flags])
    return out


def one_line(call, pattern):
    """call() must stop with one line `error: ...` matching pattern; returns the message."""
    with pytest.raises(SystemExit) as e:
        call()
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and re.search(pattern, message), message
    return message


def files(folder) -> dict:
    """Every file under folder (lock files aside) -> its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


# -----------------------------------------------------------------------------
# 1. A resume checks the data it continues on


def test_resume_refuses_a_corpus_prepared_again_with_other_ids(tmp_path, monkeypatch):
    out = run(tmp_path / "run", "--max_steps=2")
    before = files(out)
    corpus = make_toy_corpus(seed=1337)
    itos = corpus.tgt_vocab.itos
    itos[5], itos[6] = itos[6], itos[5]  # the same size, two ids swapped: what preparing again can do
    monkeypatch.setattr(train, "load_data", lambda *args, **kwargs: corpus)
    one_line(lambda: run(out, "--resume=True", "--max_steps=4"), "other vocabularies than data")
    assert files(out) == before


def test_resume_refuses_other_sentences_with_the_same_vocabulary(tmp_path, monkeypatch):
    out = run(tmp_path / "run", "--max_steps=2")
    monkeypatch.setattr(train, "load_data", lambda *args, **kwargs: make_toy_corpus(seed=99))  # same symbols
    one_line(lambda: run(out, "--resume=True", "--max_steps=4"), "other sentences than data 'toy-reverse'")


def test_resume_refuses_a_vocabulary_of_another_size_in_one_line(tmp_path, monkeypatch):
    out = run(tmp_path / "run", "--max_steps=2")
    monkeypatch.setattr(train, "load_data", lambda *args, **kwargs: make_toy_corpus(vocab_size=20, seed=1337))
    one_line(lambda: run(out, "--resume=True", "--max_steps=4"), "other vocabularies than data")


# -----------------------------------------------------------------------------
# 2. A run folder has an owner: nothing is clobbered by starting again


def test_starting_again_in_a_finished_run_is_refused_and_overwrite_starts_over(tmp_path):
    out = run(tmp_path / "run", "--max_steps=3", "--test_sentences=3")
    before = files(out)
    one_line(lambda: run(out, "--max_steps=2"), "holds a train.py run .*--resume=True.*--overwrite=True")
    assert files(out) == before  # nothing deleted, nothing written
    (out / "hyps_test_extra.txt").write_text("a leftover of the old run\n")
    run(out, "--max_steps=2", "--overwrite=True", "--arch=smallest")  # another kind of run: nothing of the old one
    assert not (out / "hyps_test_extra.txt").exists() and not (out / "hyps_test_largest.txt").exists()
    assert (out / "hyps_test_model.txt").exists() and json.loads((out / "config.json").read_text())["arch"]
    one_line(lambda: run(out, "--resume=True", "--overwrite=True"), "pass one")
    run(out, "--resume=True", "--max_steps=3", "--arch=smallest")  # a run started with --overwrite resumes intact
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3 and (out / "hyps_test_model.txt").exists()


def test_an_interrupted_run_is_refused_too_and_a_folder_of_another_command(tmp_path):
    out = run(tmp_path / "run", "--max_steps=3")
    (out / "results.json").unlink()  # as if stopped before its final test: a checkpoint and no results
    one_line(lambda: run(out, "--max_steps=2"), "holds a train.py run \\(ckpt.pt\\)")
    other = tmp_path / "other"
    other.mkdir()
    (other / "owner.json").write_text(json.dumps({"command": "search.py", "inputs": {}}))
    (other / "results.json").write_text("{}")
    one_line(lambda: run(other, "--max_steps=2"), "holds a search.py run, not a train.py one")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine\n")
    one_line(lambda: run(stray, "--max_steps=2"), "holds entries no mos command wrote there \\(notes.txt\\)")
    assert (stray / "notes.txt").read_text() == "mine\n"


# -----------------------------------------------------------------------------
# 3. Limits checked up front, in one line, with nothing written


@pytest.mark.parametrize("flags, pattern", [
    (["--max_tokens=5"], "--max_tokens=5 is below the longest training sentence"),
    ([f"--seed={2**63}"], "--seed=9223372036854775808 must be in \\[0, 4294967295\\]"),
])
def test_limits_are_checked_before_anything_is_written(tmp_path, flags, pattern):
    one_line(lambda: run(tmp_path / "run", *flags), pattern)
    assert not (tmp_path / "run").exists() or not files(tmp_path / "run")


def test_a_sentence_longer_than_the_position_table_is_one_line(tmp_path, monkeypatch):
    corpus = make_toy_corpus(seed=1337)
    corpus.splits["train"][0][3] = np.full(1500, 5)  # source sentence 3: 1,500 tokens, the table holds 1,024
    monkeypatch.setattr(train, "load_data", lambda *args, **kwargs: corpus)
    one_line(lambda: run(tmp_path / "run", "--max_tokens=4096"), "train source sentence 3 has 1500 tokens; the model "
                                                                 "has 1024 positions")
    assert not (tmp_path / "run").exists() or not files(tmp_path / "run")


def test_a_malformed_log_line_is_dropped_on_resume(tmp_path):
    out = run(tmp_path / "run", "--max_steps=2", "--eval_interval=2")
    with open(out / "train_log.jsonl", "a") as f:
        f.write('[1, 2]\n{"step": "x"}\n{"no step": 1}\n')
    run(out, "--resume=True", "--max_steps=3")
    assert [r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_a_full_disk_or_file_size_limit_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *TOY, "--max_steps=3", "--save_interval=1", f"--out_dir={out}"]
    ok = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    kept = (out / "ckpt.pt").read_bytes()
    limit_kb = len(kept) // 1024 // 2  # room for the logs, not for a whole checkpoint
    resume = " ".join(cmd[:-2] + ["--max_steps=6", f"--out_dir={out}", "--resume=True"])
    r = subprocess.run(["bash", "-c", f"ulimit -f {limit_kb}; exec {resume}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 1 and last.startswith("error: cannot write") and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (out / "ckpt.pt").read_bytes() == kept and not list(out.glob("*.tmp"))
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3


# -----------------------------------------------------------------------------
# 4. Contracts: SIGTERM in the final test exits 0 with the checkpoint saved; one "final" record per run


SLOW_TEST = """
import sys, time
sys.path.insert(0, {root!r})
import train
real = train.final_test
def slow(*args, **kwargs):
    print("final test", flush=True)
    time.sleep(30)
    return real(*args, **kwargs)
train.final_test = slow
from runs.signals import run
run(train.main)
"""


def test_sigterm_during_the_final_test_exits_0_with_the_checkpoint_saved(tmp_path):
    script, out = tmp_path / "slow_test.py", tmp_path / "run"
    script.write_text(SLOW_TEST.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), *TOY, "--max_steps=3", f"--out_dir={out}"], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("final test"):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "during the final test" in stderr, stderr[-2000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3 and not (out / "results.json").exists()
    run(out, "--resume=True")  # the test is what is left: a resume runs it
    assert json.loads((out / "results.json").read_text())["split"] == "test"


def test_a_finished_run_resumed_for_more_steps_keeps_one_final_record(tmp_path):
    out = run(tmp_path / "run", "--max_steps=2", "--eval_interval=2")
    run(out, "--resume=True", "--max_steps=4")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [("final" in r) for r in records] == [False, False, True]
    assert records[-1]["final"] == json.loads((out / "results.json").read_text())


# -----------------------------------------------------------------------------
# The other commands: validate, then replace; an owner per folder; one line for every failure


def latency_csv(path, rows=16, bad=None):
    """A latency dataset of `rows` tiny-space subnets whose latency is a linear function of the features, with
    one cell of row 5 replaced: bad = (column, value)."""
    import latency
    rng = np.random.default_rng(0)
    lines = [",".join(latency.HEADER)]
    for i in range(rows):
        features = rng.uniform(0.2, 1.0, len(latency.FEATURE_NAMES))
        cells = dict(zip(latency.FEATURE_NAMES, features), space="tiny", arch='"{}"', median_ms=5 + 10 * features[5],
                     trimmed_mean_ms=1, iqr_ms=1, encoder_ms=1, threads=1, iters=3, protocol="beam", beam=5, src_len=23,
                     tgt_len=23, warmup=0, device="cpu")
        if bad and i == 5:
            cells[bad[0]] = bad[1]
        lines.append(",".join(str(cells[name]) for name in latency.HEADER))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad, pattern", [
    (("median_ms", "nan"), "row 7 has a non-finite feature or a latency that is not a positive number \\(nan ms\\)"),
    (("median_ms", "-3"), "row 7 .* \\(-3.0 ms\\)"), (("median_ms", "0"), "row 7 .* \\(0.0 ms\\)"),
    (("dec_layers", "nan"), "row 7 has a non-finite feature"),
    (("space", "cpu"), "rows of several spaces or protocol settings"), (("beam", "4"), "several spaces or protocol"),
])
def test_latency_fit_validates_before_it_replaces_a_good_predictor(tmp_path, bad, pattern):
    import latency
    predictor = tmp_path / "predictor.json"
    latency.main(["fit", f"--out={latency_csv(tmp_path / 'good.csv')}", f"--predictor={predictor}", "--mlp_steps=5"])
    good = predictor.read_bytes()
    csv_path = latency_csv(tmp_path / "bad.csv", bad=bad)
    one_line(lambda: latency.main(["fit", f"--out={csv_path}", f"--predictor={predictor}", "--mlp_steps=5"]), pattern)
    assert predictor.read_bytes() == good


def test_search_refuses_a_training_folder_and_measures_without_a_fitting_predictor(tiny, tmp_path):
    """(The budget is far above any subnet's latency: the test holds on a machine of any speed, busy or not.)"""
    import search
    out = run(tmp_path / "train_run", "--max_steps=1", "--test_sentences=2")
    before = files(out)
    quick = [f"--ckpt={tiny / 'ckpt.pt'}", "--budgets=[100000]", "--valid_sentences=20", "--threads=1", "--final_iters=2",
             "--final_repeats=1", "--final_warmup=0", "--search_iters=2", "--search_warmup=0", "--population=4",
             "--parents=2", "--mutations=1", "--crossovers=1", "--iterations=1", "--floor_samples=10"]
    one_line(lambda: search.main([*quick, f"--predictor={tiny / 'predictor.json'}", f"--out_dir={out}"]),
             "holds a train.py run, not a search.py one")
    assert files(out) == before
    other_space = tmp_path / "cpu_predictor.json"  # a predictor of another space where the default one would be
    other_space.write_text(json.dumps({**json.loads((tiny / "predictor.json").read_text()), "space": "cpu"}))
    found = search.main([*quick, "--latency=measured", f"--predictor={other_space}", f"--out_dir={tmp_path / 's'}"])
    assert found[0]["predicted_ms"] is None and (tmp_path / "s" / "arch_100000ms.json").exists()
    one_line(lambda: search.main([*quick, "--latency=measured", f"--predictor={other_space}", "--budgets=[200000]",
                                  f"--out_dir={tmp_path / 's'}"]), "holds a search.py run made with another budgets")


def test_an_emptied_vocabulary_file_is_one_line(tmp_path):
    from data import prepare
    source = tmp_path / "source"
    source.mkdir()
    for stem in ("train", "val", "test_2016_flickr"):
        for lang, words in (("de", "ein hund läuft über die wiese"), ("en", "a dog runs across the meadow")):
            (source / f"{stem}.lc.norm.tok.{lang}").write_text("".join(f"{words} {i} .\n" for i in range(30)))
    prepare.prepare_multi30k(source=source, out=tmp_path / "corpus", merges=20)
    (tmp_path / "corpus" / "vocab.en.txt").write_text("")
    one_line(lambda: prepare.load_data("multi30k", str(tmp_path / "corpus")), "cannot read the prepared corpus .*"
             "corpus.npz holds id .* but vocab.en.txt 4 tokens")


MULTI30K = ROOT.parent / "shared" / "data" / "multi30k" / "tok"


SLOW_PREPARE = """
import sys, time
sys.path.insert(0, {root!r})
from data import prepare
real = prepare.learn_bpe
def slow(*args, **kwargs):
    print("learning", flush=True)  # the folder is locked by now
    time.sleep(60)
    return real(*args, **kwargs)
prepare.learn_bpe = slow
prepare.main(sys.argv[1:])
"""


@pytest.mark.skipif(not MULTI30K.exists(), reason="needs ../shared/data/multi30k")
def test_prepare_takes_the_folder_lock_and_ctrl_c_is_one_line(tmp_path):
    script, out = tmp_path / "slow_prepare.py", tmp_path / "m30k"
    script.write_text(SLOW_PREPARE.format(root=str(ROOT)))
    args = ["multi30k", f"--source={MULTI30K}", f"--out={out}"]
    first = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,  # Ctrl-C as in a terminal, even where a background
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # job ignores it
    assert first.stdout.readline() == "learning\n"
    second = subprocess.run([sys.executable, "data/prepare.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode != 0 and second.stderr.startswith("error: ") and second.stderr.count("\n") == 1
    assert "is being written by process" in second.stderr, second.stderr
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130 and stderr.startswith("error: interrupted") and stderr.count("\n") == 1, stderr
    assert not (out / "summary.json").exists()


def test_preparing_again_from_a_bad_source_leaves_the_prepared_corpus_whole(tmp_path):
    from data import prepare
    from data.corpus import load_corpus
    source, out = tmp_path / "source", tmp_path / "corpus"
    source.mkdir()
    for stem in ("train", "val", "test_2016_flickr"):
        for lang, words in (("de", "ein hund läuft über die wiese"), ("en", "a dog runs across the meadow")):
            (source / f"{stem}.lc.norm.tok.{lang}").write_text("".join(f"{words} {i} .\n" for i in range(30)))
    prepare.prepare_multi30k(source=source, out=out, merges=20)
    before = files(out)
    (source / "val.lc.norm.tok.de").unlink()
    with pytest.raises(prepare.DataError, match="missing split file"):
        prepare.prepare_multi30k(source=source, out=out, merges=20, force=True)
    assert files(out) == before and len(load_corpus(out).splits["valid"][0]) == 30
