"""Kill tests: SIGKILL train.py, search.py and reproduce.py at random moments (one of them in the middle of a
checkpoint write), and stop them and latency.py dataset with SIGTERM as a scheduler would; after each, what was
saved loads, and rerunning the same command ends exactly where an uninterrupted run ends (CPU, one thread, same
seed; wall-clock fields aside). A few minutes in all. Run: python -m pytest -q tests/test_kill.py"""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runs.files import read_jsonl
import latency
import train

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # the reference runs use the same thread count
TOY = ["--preset=toy", "--bleu_sentences=8", "--test_sentences=20", "--log_interval=1", "--eval_interval=25",
       "--save_interval=7", "--max_steps=60"]
TIMEOUT = 300  # seconds any one process may take before the test fails instead of hanging

# train.main with torch.save replaced by one that writes half of its N-th checkpoint and then SIGKILLs its own
# process: a kill that lands exactly in the middle of a checkpoint write
DIE_IN_SAVE = """
import io, os, signal, sys
sys.path.insert(0, {root!r})
import torch, train
real_save, calls = torch.save, []
def save_then_die(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == {n}:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)
torch.save = save_then_die
train.main(sys.argv[1:])
"""


def start(*cmd):
    """A process in its own session (a kill takes its children too), output discarded unless it fails."""
    return subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc):
    """Wait for a process and require success."""
    output = proc.communicate(timeout=TIMEOUT)[0]
    assert proc.returncode == 0, output[-3000:]


def kill_when(proc, ready):
    """SIGKILL the process group as soon as ready() holds (polled every few ms), or fail if it exits first."""
    wait_for(proc, ready)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def sigterm_when(proc, ready) -> str:
    """SIGTERM the process (as a scheduler does) as soon as ready() holds; wait for it to end; its output."""
    wait_for(proc, ready)
    os.kill(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=TIMEOUT)[0]
    assert "Traceback" not in output, output[-3000:]
    return output


def wait_for(proc, ready):
    """Poll ready() every few ms until it holds; fail if the process exits first or it takes TIMEOUT seconds."""
    deadline = time.time() + TIMEOUT
    while not ready():
        assert proc.poll() is None, f"exited before it could be stopped: {proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, "timed out waiting for the moment to stop it"
        time.sleep(0.005)


def logged_step(out):
    """The last training step train_log.jsonl has recorded (0 before the first)."""
    return max([r["step"] for r in read_jsonl(out / "train_log.jsonl")], default=0)


def without_timing(rows, drop=("tok_per_s", "train_seconds", "decode_seconds", "epoch")):
    """Log records with the wall-clock fields removed, recursively: what must repeat exactly."""
    clean = lambda r: {k: clean(v) if isinstance(v, dict) else v for k, v in r.items() if k not in drop}
    return [clean(r) for r in rows]


def assert_same_run(out, reference):
    """The same losses every step, the same validations, the same final weights and test BLEU."""
    for name in ("train_log.jsonl", "log.jsonl"):
        assert without_timing(read_jsonl(out / name)) == without_timing(read_jsonl(reference / name)), name
    a, b = (torch.load(p / "ckpt.pt", weights_only=True)["model"] for p in (reference, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    results, expected = (json.loads((p / "results.json").read_text()) for p in (out, reference))
    assert without_timing([results]) == without_timing([expected])  # test loss and BLEU, not decode_seconds


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
    """One uninterrupted toy training run, the reference of the interrupted ones."""
    reference = tmp_path_factory.mktemp("train") / "reference"
    finish(start("train.py", *TOY, f"--out_dir={reference}"))
    return reference


def test_train_killed_at_random_moments_resumes_to_the_uninterrupted_run(train_reference, tmp_path):
    rng = random.Random(0)
    out = tmp_path / "killed"
    resume = ["train.py", *TOY, f"--out_dir={out}", "--resume=True"]

    # 1. a kill at a random step, after the first checkpoint (step 7)
    proc = start("train.py", *TOY, f"--out_dir={out}")
    at = rng.randint(8, 30)
    kill_when(proc, lambda: logged_step(out) >= at)
    first = train.load_checkpoint(out / "ckpt.pt")  # always loads
    assert 7 <= first["step"] <= logged_step(out)

    # 2. a kill in the middle of the second checkpoint this run writes: ckpt.pt is still the last complete one
    script = tmp_path / "die_in_save.py"
    script.write_text(DIE_IN_SAVE.format(root=str(ROOT), n=2))
    proc = subprocess.Popen([sys.executable, str(script), *resume[1:]], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "ckpt.pt.tmp").exists()  # the half-written file the kill left behind
    second = train.load_checkpoint(out / "ckpt.pt")
    assert second["step"] > first["step"]

    # 3. another kill at a random step, then the run to its end
    proc = start(*resume)
    at = rng.randint(second["step"] + 1, 55)
    kill_when(proc, lambda: logged_step(out) >= at)
    train.load_checkpoint(out / "ckpt.pt")
    finish(start(*resume))
    assert_same_run(out, train_reference)


def test_train_stopped_by_sigterm_saves_its_step_and_resumes_to_the_uninterrupted_run(train_reference, tmp_path):
    out = tmp_path / "sigterm"
    for at in (random.Random(3).randint(2, 20), 24):  # step 25 validates: a signal then waits for it, one step
        proc = start("train.py", *TOY, f"--out_dir={out}", *(["--resume=True"] if (out / "ckpt.pt").exists() else []))
        output = sigterm_when(proc, lambda: logged_step(out) >= at)
        saved = train.load_checkpoint(out / "ckpt.pt")["step"]
        assert proc.returncode == 0 and f"stopped at step {saved} (SIGTERM)" in output, output[-3000:]
        assert f"continue with --resume=True --out_dir={out}" in output
        assert at <= saved == logged_step(out)  # it finished the step it was in, saved it, and lost nothing
    finish(start("train.py", *TOY, f"--out_dir={out}", "--resume=True"))
    assert_same_run(out, train_reference)


def search_cmd(tiny, out):
    """search.py on the tiny supernet with predicted (deterministic) latency, small enough for a test."""
    return ["search.py", f"--ckpt={tiny / 'ckpt.pt'}", f"--predictor={tiny / 'predictor.json'}", f"--out_dir={out}",
            "--budgets=[8,20]", "--valid_sentences=100", "--threads=1", "--final_iters=3", "--final_repeats=1",
            "--final_warmup=1", "--population=8", "--parents=2", "--mutations=3", "--crossovers=3", "--iterations=5"]


def cached(out, kind="valid_loss"):
    """search.py's cache of scored subnets, {arch: value}."""
    path = out / "cache.json"
    return json.loads(path.read_text())["values"].get(kind, {}) if path.exists() else {}


@pytest.fixture(scope="module")
def search_reference(tiny, tmp_path_factory):
    """One uninterrupted search, the reference of the interrupted ones."""
    reference = tmp_path_factory.mktemp("search") / "reference"
    finish(start(*search_cmd(tiny, reference)))
    return reference


def assert_same_search(out, reference):
    """The same subnets, losses and convergence history, and the same subnets scored to the same losses."""
    result, expected = (json.loads((p / "results.json").read_text())["results"] for p in (out, reference))
    pick = lambda results: [(r["arch"], r["valid_loss"], r["history"]) for r in results]
    assert pick(result) == pick(expected)
    assert cached(out) == cached(reference)


def test_search_killed_at_random_moments_keeps_its_cache_and_finds_the_same_subnets(tiny, search_reference,
                                                                                   tmp_path):
    rng = random.Random(1)
    out = tmp_path / "killed"
    total = len(cached(search_reference))
    kept = {}
    for _ in range(2):  # two kills at random points of the search
        proc = start(*search_cmd(tiny, out))
        at = rng.randint(len(kept) + 1, total - 1)
        kill_when(proc, lambda: len(cached(out)) >= at)
        now = cached(out)  # valid JSON, and every subnet scored before the kill is still there, unchanged
        assert {k: now[k] for k in kept} == kept and len(now) >= at
        kept = now
    finish(start(*search_cmd(tiny, out)))
    assert_same_search(out, search_reference)


def test_search_stopped_by_sigterm_keeps_its_cache_and_finds_the_same_subnets(tiny, search_reference, tmp_path):
    out = tmp_path / "sigterm"
    at = random.Random(4).randint(2, len(cached(search_reference)) - 2)
    proc = start(*search_cmd(tiny, out))
    output = sigterm_when(proc, lambda: len(cached(out)) >= at)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM; rerun the same command to continue" in output
    assert len(cached(out)) >= at  # the cache is whole JSON and holds every subnet scored before the signal
    finish(start(*search_cmd(tiny, out)))
    assert_same_search(out, search_reference)


def test_latency_dataset_stopped_by_sigterm_keeps_whole_rows_and_continues(tmp_path):
    cmd = ["latency.py", "dataset", "--space=tiny", "--n=12", "--threads=1", "--warmup=0", "--iters=8",
           "--src_vocab=30", "--tgt_vocab=30"]
    finish(start(*cmd, f"--out={tmp_path / 'reference.csv'}"))
    out = tmp_path / "stopped.csv"
    proc = start(*cmd, f"--out={out}")
    output = sigterm_when(proc, lambda: len(csv_rows(out)) >= 3)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in output, output[-3000:]
    assert 3 <= len(csv_rows(out)) < 12 and out.read_text().endswith("\n")  # whole rows only
    finish(start(*cmd, f"--out={out}"))
    reference = csv_rows(tmp_path / "reference.csv")
    assert len(reference) == 12 and all(len(r) == len(latency.HEADER) for r in csv_rows(out))
    described = latency.HEADER.index("median_ms")  # space, arch, features: what precedes the timings
    assert [r[:described] for r in csv_rows(out)] == [r[:described] for r in reference]


def csv_rows(path):
    """The whole rows of a latency CSV (a row still being written is left out), header aside."""
    text = path.read_text() if path.exists() else ""
    return list(csv.reader(text[:text.rfind("\n") + 1].splitlines()))[1:]


def test_reproduction_killed_at_random_moments_continues_stage_by_stage(tmp_path):
    rng = random.Random(2)
    out = tmp_path / "repro"
    cmd = ["experiments/reproduce.py", "--preset=toy", f"--out={out}", "--extra=['--preset=toy','--max_steps=60',"
           "'--bleu_sentences=-1','--test_sentences=20','--save_interval=10','--log_interval=1']"]
    supernet = out / "supernet_mos"
    at = rng.randint(15, 50)  # 1. during the first supernet's training
    kill_when(start(*cmd), lambda: logged_step(supernet) >= at)
    assert train.load_checkpoint(supernet / "ckpt.pt")["step"] >= 10
    at = rng.randint(at + 2, 55)  # 1b. SIGTERM in the same training: it saves its step, reproduce.py stops (143)
    proc = start(*cmd)
    output = sigterm_when(proc, lambda: logged_step(supernet) >= at)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in output, output[-3000:]
    assert train.load_checkpoint(supernet / "ckpt.pt")["step"] == logged_step(supernet) >= at
    proc = start(*cmd)  # 1c. SIGTERM once the latency dataset has rows (or later): a clean stop, whole rows
    output = sigterm_when(proc, lambda: len(csv_rows(out / "latency.csv")) >= 3)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in output, output[-3000:]
    assert (out / "latency.csv").read_text().endswith("\n")
    at = rng.randint(3, 10)  # 2. in the middle of the MoS supernet's search
    kill_when(start(*cmd), lambda: len(cached(out / "search_mos")) >= at)
    done = {p: p.stat().st_mtime_ns for p in out.glob("*/results.json")}
    assert set(done) == {out / "supernet_mos" / "results.json", out / "supernet_hat" / "results.json"}
    kill_when(start(*cmd), lambda: logged_step(out / "finetune_mos_1000ms") >= 5)  # 3. during a finetune
    finish(start(*cmd))
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["supernet"] for r in rows] == ["mos", "hat"] and all(r["test_bleu"] >= 0 for r in rows)
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished stages were not run again

    # the supernet trained in four pieces equals one uninterrupted training with the same flags
    reference = tmp_path / "reference"
    flags = json.loads((out / "settings.json").read_text())["extra"]
    finish(start("train.py", *flags, "--router=neuron", "--num_experts=2", "--sampling=sandwich",
                 f"--out_dir={reference}"))
    assert without_timing(read_jsonl(supernet / "train_log.jsonl")) == \
           without_timing(read_jsonl(reference / "train_log.jsonl"))
