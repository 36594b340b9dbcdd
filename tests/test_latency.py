"""Tests of latency.py: the measurement is sane and sees decoder depth, the dataset resumes, the predictor recipe
ranks a known linear relation, the CLI runs (CPU, one thread so a busy machine does not stall them; seconds).
Run: python -m pytest -q tests/test_latency.py"""

import csv
import json

import numpy as np
import pytest

import latency
from latency import fit_predictor, kendall_tau, measure_latency, predict, with_dec_layers
from mos import FEATURE_NAMES, SPACES, Transformer
from runs.latency_files import write_predictor

QUICK = dict(warmup=1, iters=5, threads=1)
FAST_CLI = ["--threads=1", "--warmup=1", "--iters=3", "--src_vocab=30", "--tgt_vocab=30"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_measure_latency_is_sane():
    space = SPACES["tiny"]
    r = measure_latency(Transformer(space.largest(), 30, 30, space.qkv_dim), **QUICK)
    assert 0 < r["encoder_ms"] < r["min_ms"] <= r["median_ms"] < 1000
    assert r["iqr_ms"] >= 0 and r["threads"] == 1 and (r["beam"], r["src_len"], r["tgt_len"]) == (5, 23, 23)


def test_default_latency_is_the_real_beam_search_with_its_bookkeeping(monkeypatch):
    space = SPACES["tiny"]
    model = Transformer(space.smallest(), 30, 30, space.qkv_dim)
    calls, real = [], latency.mos.beam_search
    monkeypatch.setattr(latency.mos, "beam_search", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    r = measure_latency(model, **QUICK)
    assert r["protocol"] == "beam" and len(calls) == 1 + 5  # warm-up + timed runs, each one real beam_search call
    hyps, _ = real(*calls[0][0], **calls[0][1])
    assert len(hyps) == 1 and len(hyps[0]) == 22  # forced: 22 tokens + EOS = 23 decoder steps, as HAT's protocol
    assert measure_latency(model, **QUICK, protocol="hat")["protocol"] == "hat"  # the model-only option remains


def test_measure_latency_times_one_encoder_pass_and_tgt_len_decoder_steps(monkeypatch):
    # a fake clock that the model advances: 2 ms per encoder pass, 1 ms per decoder step (beam 5 in one batch)
    space, clock = SPACES["tiny"], [0.0]
    model = Transformer(space.smallest(), 30, 30, space.qkv_dim)
    encode, decode = model.encode, model.decode
    model.encode = lambda *a: (clock.__setitem__(0, clock[0] + 2e-3), encode(*a))[1]
    model.decode = lambda tokens, *a: (clock.__setitem__(0, clock[0] + 1e-3), decode(tokens, *a))[1]
    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock[0])
    r = measure_latency(model, warmup=2, iters=5, threads=1)
    assert r["encoder_ms"] == pytest.approx(2.0) and r["median_ms"] == pytest.approx(2.0 + 23)
    assert r["min_ms"] == pytest.approx(25.0) and r["trimmed_mean_ms"] == pytest.approx(25.0)
    assert r["iqr_ms"] == pytest.approx(0.0)


def test_deeper_decoder_takes_longer():
    # HAT's space at full width: 1 vs 6 decoder layers is a gap far beyond timing noise (HAT: ~4x on a GPU). The two
    # are timed in alternation and the fastest of the rounds is compared, so a load that comes and goes (other jobs
    # on the machine) slows both alike or neither
    space = SPACES["iwslt14"]
    models = [Transformer(with_dec_layers(space.smallest(), n), 100, 100, space.qkv_dim) for n in (1, 6)]
    rounds = [[measure_latency(m, **QUICK)["min_ms"] for m in models] for _ in range(3)]
    shallow, deep = (min(times) for times in zip(*rounds))
    assert deep > 2 * shallow, rounds


def test_kendall_tau():
    x = np.arange(10.0)
    assert kendall_tau(x, x) == pytest.approx(1.0) and kendall_tau(x, -x) == pytest.approx(-1.0)
    assert kendall_tau(x, np.r_[x[:5], x[5:][::-1]]) < 1.0


def test_predictor_ranks_a_linear_relation():
    rng = np.random.default_rng(0)
    X = rng.uniform(0.3, 1.0, (300, len(FEATURE_NAMES)))
    y = 20 + X @ rng.uniform(0, 10, len(FEATURE_NAMES)) + 60 * X[:, 5] + rng.normal(0, 0.5, 300)
    cfg = latency.LatencyConfig(mlp_steps=200, mlp_lr=1e-3)
    predictor, report, test = fit_predictor(X, y, cfg)
    assert report["chosen"] == "linear" and report["test"]["linear"]["kendall_tau"] >= 0.9
    assert report["test"]["linear"]["mean_rel_error"] < 0.02
    assert set(report["test"]) == {"linear", "mlp"} and np.isfinite(predict(fit_predictor(X, y, cfg)[0], X)).all()


def test_mlp_predictor_survives_json(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.uniform(0.3, 1.0, (50, len(FEATURE_NAMES))), rng.uniform(10, 20, 50)
    mlp = latency.fit_mlp(X, y, steps=5, lr=1e-3, seed=0)
    write_predictor(tmp_path / "p.json", mlp, space="tiny")
    loaded = latency.load_predictor(tmp_path / "p.json")
    assert loaded["space"] == "tiny" and np.allclose(predict(loaded, X), predict(mlp, X), rtol=1e-5)


def test_dataset_resumes_and_fit_writes_outputs(tmp_path):
    out = tmp_path / "lat.csv"
    latency.main(["dataset", "--space=tiny", "--n=3", f"--out={out}", *FAST_CLI])
    first = out.read_text()
    assert out.read_bytes().count(b"\r\n") == out.read_bytes().count(b"\n") == 4  # header, 3 rows: csv's line ends
    latency.main(["dataset", "--space=tiny", "--n=5", f"--out={out}", *FAST_CLI])  # appends rows 4 and 5 only
    assert out.read_text().startswith(first) and len(list(csv.DictReader(open(out)))) == 5
    complete = out.read_text()
    out.write_text(complete[:-25])  # a kill in the middle of writing row 5: that row is measured again
    latency.main(["dataset", "--space=tiny", "--n=5", f"--out={out}", *FAST_CLI])
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 5 and out.read_text().startswith(complete[:complete.rindex("\n", 0, -1) + 1])
    assert all(r["iters"] for r in rows)  # every row whole
    with pytest.raises(SystemExit, match="other subnets"):
        latency.main(["dataset", "--space=tiny", "--n=5", "--seed=1", f"--out={out}", *FAST_CLI])
    with pytest.raises(SystemExit, match="measured with other settings .*--protocol=beam"):  # no mixing in one file
        latency.main(["dataset", "--space=tiny", "--n=6", "--protocol=hat", f"--out={out}", *FAST_CLI])
    # fit needs more rows than a quick test measures: append synthetic ones in the same format
    rows = list(csv.DictReader(open(out)))
    rng = np.random.default_rng(0)
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        for _ in range(60):
            feats = rng.uniform(0.5, 1.0, len(FEATURE_NAMES))
            writer.writerow({**rows[0], **dict(zip(FEATURE_NAMES, feats)), "median_ms": 5 + 10 * feats[5]})
    pred_path = tmp_path / "predictor.json"
    latency.main(["fit", f"--out={out}", f"--predictor={pred_path}", "--mlp_steps=20", "--threads=1"])
    saved = json.loads(pred_path.read_text())
    assert saved["space"] == "tiny" and saved["kind"] in ("linear", "mlp") and pred_path.with_suffix(".png").exists()
    X, y, _, protocol = latency.read_latency_csv(out)
    assert protocol == "beam" and saved["protocol"] == "beam"
    assert np.allclose(predict(latency.load_predictor(pred_path), X).shape, y.shape)


def test_cli_measure_and_depth(tmp_path):
    log = tmp_path / "log.jsonl"
    r = latency.main(["--space=tiny", "--arch=smallest", "--repeats=2", f"--log={log}", *FAST_CLI])
    assert r["median_ms"] > 0 and len(r["runs"]) == 2 and r["spread"] >= 0
    assert json.loads(log.read_text())["label"] == "smallest"
    depth = latency.main(["depth", "--space=tiny", "--repeats=1", *FAST_CLI])
    assert [d["arch"]["dec_layers"] for d in depth] == [1, 2]
    with pytest.raises(SystemExit, match="unknown setting"):
        latency.main(["--itters=3"])
