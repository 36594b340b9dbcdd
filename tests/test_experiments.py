"""The harness under experiments/: every script runs both as `python experiments/X.py` and as
`python -m experiments.X` from the repository root; a resumable experiment (gap.py on the toy preset) stopped with
SIGTERM continues to the numbers of an uninterrupted run; experiments/latency_checks.py's side-by-side measurement
(with a fake timer), its `remeasure` command and its benchmark on HAT's published latency CSVs.
Run: python -m pytest -q tests/test_experiments.py"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from runs import machine
from runs.files import read_jsonl
from experiments import latency_checks
from mos import FEATURE_NAMES, SPACES

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # the reference run uses the same thread count
SCRIPTS = ("gap", "fronts", "reproduce", "bench", "latency_checks")
FORMS = {"script": lambda name: [f"experiments/{name}.py"], "module": lambda name: ["-m", f"experiments.{name}"]}
FAST_CLI = ["--threads=1", "--warmup=1", "--iters=3", "--src_vocab=30", "--tgt_vocab=30"]
TIMEOUT = 300  # seconds any one process may take before the test fails instead of hanging


def command(form, name, *args):
    """The command line of experiments/<name>.py in one of the two FORMS, run from the repository root."""
    return [sys.executable, *FORMS[form](name), *map(str, args)]


# -----------------------------------------------------------------------------
# Both command forms


def test_both_command_forms_end_a_bad_flag_in_one_error_line():
    """Every script in both forms (imports resolve either way) stops with exit status 1 and one line on stderr. The
    ten processes run at once: each spends its ~2 s importing torch."""
    procs = {(name, form): subprocess.Popen(command(form, name, "--bogus=1"), cwd=ROOT, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
             for name in SCRIPTS for form in FORMS}
    failed = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=TIMEOUT)
        if not (proc.returncode == 1 and out == "" and err.startswith("error: unknown setting --bogus;")
                and err.count("\n") == 1):
            failed[key] = (proc.returncode, (out + err)[-2000:])
    assert not failed, failed


# -----------------------------------------------------------------------------
# A resumable experiment resumes after the move: gap.py's standalone stage, stopped by SIGTERM, continued as a module


def logged_step(out):
    """The last training step train_log.jsonl has recorded (0 before the first)."""
    return max([r["step"] for r in read_jsonl(out / "train_log.jsonl")], default=0)


def without_timing(rows, drop=("tok_per_s", "train_seconds", "decode_seconds", "epoch")):
    """Records with the wall-clock fields removed, recursively: what must repeat exactly."""
    clean = lambda r: {k: clean(v) if isinstance(v, dict) else v for k, v in r.items() if k not in drop}
    return [clean(r) for r in rows]


def test_gap_stopped_by_sigterm_resumes_to_the_uninterrupted_numbers(tmp_path):
    """`python experiments/gap.py` on the toy preset up to its standalone stage (a 2-arch panel: the tiny space's
    smallest and largest), SIGTERM while the second arch trains: it saves, exits 143; `python -m experiments.gap`
    with the same flags skips the finished arch and continues the other from its step, to the losses, weights and
    test scores of train.py run once without a stop."""
    out = tmp_path / "gap"
    extra = ["--preset=toy", "--max_steps=40", "--bleu_sentences=-1", "--save_interval=0", "--eval_interval=1000",
             "--log_interval=1"]
    flags = ["--preset=toy", f"--out={out}", "--panel_size=2", "--candidates=2", "--until=standalone",
             "--test_sentences=10", "--extra=[" + ",".join(repr(f) for f in extra) + "]"]
    first, second = out / "standalone" / "arch0", out / "standalone" / "arch1"
    proc = subprocess.Popen(command("script", "gap", *flags), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + TIMEOUT
    while not (second / "train_log.jsonl").exists() or logged_step(second) < 10:
        assert proc.poll() is None, f"exited before it could be stopped: {proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, "timed out waiting for the moment to stop it"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=TIMEOUT)[0]
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in output, output[-3000:]
    assert "Traceback" not in output and not (second / "results.json").exists()
    stopped_at = torch.load(second / "ckpt.pt", weights_only=True)["step"]
    assert 10 <= stopped_at < 40 and stopped_at == logged_step(second)
    finished = (first / "results.json").stat().st_mtime_ns

    r = subprocess.run(command("module", "gap", *flags), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"[done] {first}" in r.stdout and f"resuming at step {stopped_at}" in r.stdout + r.stderr
    assert (first / "results.json").stat().st_mtime_ns == finished  # the finished arch was not trained again

    reference = tmp_path / "reference"
    r = subprocess.run([sys.executable, "train.py", *extra, "--space=tiny", "--test_sentences=10",
                        f"--arch={out / 'panel' / 'arch1.json'}", f"--out_dir={reference}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for name in ("train_log.jsonl", "log.jsonl"):
        assert without_timing(read_jsonl(second / name)) == without_timing(read_jsonl(reference / name)), name
    a, b = (torch.load(p / "ckpt.pt", weights_only=True)["model"] for p in (reference, second))
    assert all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((p / "results.json").read_text()) for p in (second, reference)]
    assert without_timing(results)[0] == without_timing(results)[1]
    assert (second / "hyps_test_model.txt").read_text() == (reference / "hyps_test_model.txt").read_text()


# -----------------------------------------------------------------------------
# experiments/latency_checks.py: side-by-side (interleaved) measurement, robust to a machine whose load comes and goes


def test_interleaved_measurement_with_a_fake_timer(monkeypatch):
    """Round-robin order, the reference leading each round; a load spike in one round slows every model alike, so
    the ratios to the reference stay exact, the medians ignore the spike, and the drift and the load are reported."""
    base = {"R": 10.0, "A": 25.0, "B": 40.0}  # the models' true ms
    load_of_round = [1.0, 3.0, 1.0]  # round 2: another job takes the cores
    calls = []

    def fake_measure(model, warmup, iters, **protocol):
        """A clock that times `model` (a letter) at its true ms times this round's load."""
        timed_rounds = sum(1 for c in calls if c[1] > 1) // len(base)
        calls.append((model, iters))
        return {"median_ms": base[model] * (load_of_round[timed_rounds] if iters > 1 else 1.0)}

    monkeypatch.setattr(machine.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    warned = []
    r = latency_checks.measure_interleaved({"a": "A", "ref": "R", "b": "B"}, "ref", rounds=3, warmup=4, iters=7,
                                           measure=fake_measure, log=warned.append, threads=1)
    assert [m for m, _ in calls] == ["R", "A", "B"] + ["R", "A", "B"] * 3  # warm-ups, then rounds led by the reference
    assert [n for _, n in calls] == [1] * 3 + [7] * 9
    a = r["models"]["a"]
    assert a["rounds_ms"] == [25.0, 75.0, 25.0] and a["median_ms"] == 25.0 and a["spread"] == pytest.approx(2.0)
    assert a["ratio_to_reference"] == pytest.approx(2.5) and a["ratio_spread"] == pytest.approx(0.0)
    assert r["models"]["b"]["ratio_to_reference"] == pytest.approx(4.0)
    assert len(warned) == 1 and "varied by 200%" in warned[0] and r["warnings"] == [w[9:] for w in warned]

    monkeypatch.setattr(machine.os, "getloadavg", lambda: (3.5, 3.0, 3.0))  # 2.5 runnable beyond our one thread
    quiet = latency_checks.measure_interleaved({"ref": "R", "a": "A"}, "ref", rounds=2, warmup=0, iters=3, threads=1,
                                               measure=lambda m, warmup, iters, **p: {"median_ms": base[m]},
                                               log=warned.append)  # (too short a window for the CPU readings)
    assert quiet["before"]["others"] == 2.5 and "other work loads the cores" in quiet["warnings"][0]
    with pytest.raises(SystemExit, match="reference"):
        latency_checks.measure_interleaved({"a": "A"}, "ref", measure=fake_measure)
    # over a long enough window the CPU other processes took decides, not a load average that lags a minute
    readings = iter([(100.0, 10.0, 0.0), (106.0, 11.0, 2.0)])  # machine busy s, own s, clock: others took 2.5 cores
    monkeypatch.setattr(machine, "cpu_clock", lambda: next(readings))
    busy = latency_checks.measure_interleaved({"ref": "R", "a": "A"}, "ref", rounds=2, warmup=0, iters=3, threads=1,
                                              measure=lambda m, warmup, iters, **p: {"median_ms": base[m]})
    assert "other processes took 2.5 cores while it ran" in busy["warnings"][0]
    readings = iter([(100.0, 10.0, 0.0), (102.2, 12.0, 2.0)])  # the load average says busy, the CPU says quiet
    calm = latency_checks.measure_interleaved({"ref": "R", "a": "A"}, "ref", rounds=2, warmup=0, iters=3, threads=1,
                                              measure=lambda m, warmup, iters, **p: {"median_ms": base[m]})
    assert calm["warnings"] == []


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_remeasure_command_times_archs_side_by_side(tmp_path):
    arch = tmp_path / "mid.json"
    arch.write_text(json.dumps(SPACES["tiny"].middle().to_dict()))
    log = tmp_path / "remeasure.jsonl"
    r = latency_checks.main(["remeasure", "--space=tiny", f"--archs=[largest,{arch}]", "--rounds=2", f"--log={log}",
                             *FAST_CLI])
    assert list(r["models"]) == ["smallest", "largest", str(arch)]  # the reference first
    assert all(len(m["rounds_ms"]) == 2 and m["median_ms"] > 0 for m in r["models"].values())
    assert r["models"]["smallest"]["ratio_to_reference"] == 1.0
    stored = json.loads(log.read_text().splitlines()[-1])
    assert stored["space"] == "tiny" and set(stored["before"]) >= {"load_1min", "cores", "others"}
    with pytest.raises(SystemExit, match="--archs"):
        latency_checks.main(["remeasure", "--space=tiny", *FAST_CLI])


# -----------------------------------------------------------------------------
# experiments/latency_checks.py hat: latency.py's predictor recipe on HAT's published latency CSVs


HAT_DIR = Path(latency_checks.ChecksConfig.hat_dir)
HAT_COLUMNS = ["encoder_embed_dim", "encoder_layer_num", "encoder_ffn_embed_dim_avg",
               "encoder_self_attention_heads_avg", "decoder_embed_dim", "decoder_layer_num",
               "decoder_ffn_embed_dim_avg", "decoder_self_attention_heads_avg", "decoder_ende_attention_heads_avg",
               "decoder_arbitrary_ende_attn_avg", "latency_mean_encoder", "latency_mean_decoder",
               "latency_std_encoder", "latency_std_decoder"]  # HAT's CSV header


def test_hat_benchmark_on_a_csv_in_hats_format_lands_beside_the_predictor(tmp_path):
    """A CSV in HAT's format (raw sizes; latency = encoder mean + decoder mean) is read and fit; the report goes to
    hat_benchmark.json in --predictor's folder. An exact linear relation is found by the linear predictor."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "hat"
    folder.mkdir()
    with open(folder / "toy_cpu_all.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HAT_COLUMNS)
        for _ in range(60):
            feats = rng.uniform(1, 8, len(FEATURE_NAMES))
            writer.writerow([*feats, 1 + feats[0], 2 * feats[5], 0.1, 0.2])  # encoder, decoder ms
    predictor = tmp_path / "out" / "predictor.json"
    results = latency_checks.main(["hat", f"--hat_dir={folder}", f"--predictor={predictor}", "--mlp_steps=5",
                                   "--threads=1"])
    X, y = latency_checks.read_hat_csv(folder / "toy_cpu_all.csv")
    assert X.shape == (60, 10) and np.allclose(y, 1 + X[:, 0] + 2 * X[:, 5])
    assert json.loads((tmp_path / "out" / "hat_benchmark.json").read_text()) == json.loads(json.dumps(results))
    assert list(results) == ["toy_cpu_all"] and results["toy_cpu_all"]["test"]["linear"]["rmse_ms"] < 1e-6
    assert not predictor.exists()  # only the benchmark is written


def test_hat_without_csv_files_is_one_line_error(tmp_path, capsys):
    """The sweep's case for `hat`: an empty --hat_dir stops with one line and writes nothing."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        latency_checks.main(["hat", f"--hat_dir={tmp_path / 'empty'}", f"--predictor={tmp_path / 'out' / 'p.json'}"])
    message = e.value.code
    assert message.startswith("error: no CSV files in ") and "\n" not in message and "--hat_dir" in message
    assert "Traceback" not in "".join(capsys.readouterr())
    assert [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []
    for argv, pattern in ((["bogus"], "unknown command 'bogus'"), (["--rounds=0"], "--rounds=0 must be >= 1"),
                          (["--space=huge"], "--space=huge; choose one of"), (["--iters=0"], "--iters=0 must be >= 1")):
        with pytest.raises(SystemExit, match=pattern):
            latency_checks.main(argv)


@pytest.mark.skipif(not HAT_DIR.exists(), reason="HAT's latency CSVs are not here")
def test_hat_csv_recomputes_the_committed_linear_benchmark(tmp_path):
    """HAT's published IWSLT14 GPU CSV, read in its own format, gives the committed linear predictor's test scores
    (experiments/results/latency/hat_benchmark.json; least squares is deterministic for the seed's split)."""
    name = "iwslt14deen_gpu_titanxp_all"
    X, y = latency_checks.read_hat_csv(HAT_DIR / f"{name}.csv")
    assert X.shape == (2000, 10) and (y > 0).all()
    (tmp_path / "hat").mkdir()
    (tmp_path / "hat" / f"{name}.csv").write_bytes((HAT_DIR / f"{name}.csv").read_bytes())
    results = latency_checks.main(["hat", f"--hat_dir={tmp_path / 'hat'}", f"--predictor={tmp_path / 'p.json'}",
                                   "--mlp_steps=1", "--threads=1"])
    committed = json.loads((ROOT / "experiments" / "results" / "latency" / "hat_benchmark.json").read_text())[name]
    assert results[name]["test"]["linear"] == pytest.approx(committed["test"]["linear"])
    assert results[name]["valid_rmse_ms"]["linear"] == pytest.approx(committed["valid_rmse_ms"]["linear"])
    assert (results[name]["n_train"], results[name]["n_valid"]) == (committed["n_train"], committed["n_valid"])


def test_bench_never_times_emulated_bf16_and_says_what_it_is_timing(tmp_path, monkeypatch, capsys):
    """On a CPU that emulates bf16 (~100x slower) the benchmark times fp32 only and says so; every section announces
    itself before it starts, so a long run is never silent."""
    from experiments import bench
    from runs import loop
    monkeypatch.setattr(bench, "fast_bf16", lambda device: False)
    monkeypatch.setattr(loop, "fast_bf16", lambda device: False)  # (the precision train.py would choose: fp32, untimed)
    out = tmp_path / "bench.json"
    bench.main(["--data=toy", "--space=tiny", "--repeats=1", "--warmup=0", "--decode_sentences=8", f"--out={out}"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["precisions_timed"] == ["fp32"] and "timing fp32 only" in printed
    assert "sandwich_bf16" not in report and "bf16_speedup" not in report and "bf16" not in str(report["vs_peer"])
    assert "cached_bf16_sentences_per_s" not in report["beam_search"] and report["default_precision"]["bf16"] is False
    assert printed.count("timing ") >= 4 and printed.index("timing 0.") < printed.index("largest subnet's step")
