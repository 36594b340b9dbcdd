"""experiments/fronts.py: a curve of step counts equals straight runs, the per-sentence losses equal the search's
fitness, and (slow) the whole pipeline on gap.py's toy supernets."""

import json

import numpy as np
import pytest
import torch

import latency
import mos
import train
from data.batching import split_batches
from data.corpus import make_toy_corpus
from runs.files import read_jsonl
from experiments import fronts, gap
from runs.settings import parse_settings
from train import PRESETS, TrainConfig, bleu_score


def test_train_curve_equals_straight_runs(tmp_path):
    """One run continued from 3 to 6 steps keeps each step count's scores, and its model after 6 steps is the
    model of a straight 6-step run: the same weights, loss and translations."""
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(mos.SPACES["tiny"].smallest().to_dict()))
    flags = ["--preset=toy", f"--arch={arch}", "--bleu_sentences=-1", "--test_sentences=10", "--save_interval=0"]
    scores = fronts.train_curve(tmp_path / "curve", flags, (3, 6))
    train.main([*flags, "--max_steps=6", f"--out_dir={tmp_path / 'straight'}"])
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())["model"]
    assert set(scores) == {3, 6} and scores[6]["loss"] == straight["loss"] and scores[6]["bleu"] == straight["bleu"]
    assert scores[3]["loss"] != scores[6]["loss"]
    for s in (3, 6):
        kept = (tmp_path / "curve" / f"hyps_test_step{s}.txt").read_text().splitlines()
        assert len(kept) == 10
    assert (tmp_path / "curve" / "hyps_test_step6.txt").read_text() == \
        (tmp_path / "straight" / "hyps_test_model.txt").read_text()
    a = train.load_checkpoint(tmp_path / "curve" / "ckpt.pt")["model"]
    b = train.load_checkpoint(tmp_path / "straight" / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fronts.train_curve(tmp_path / "curve", flags, (3, 6)) == scores  # finished: read back, nothing trained


def test_sentence_losses_add_up_to_the_fitness():
    """The noise floor resamples per-sentence losses; their token-weighted mean is search.py's fitness."""
    corpus = make_toy_corpus(seed=0)
    torch.manual_seed(0)
    space = mos.SPACES["tiny"]
    model = mos.SuperTransformer(space, len(corpus.src_vocab), len(corpus.tgt_vocab)).subnet(space.largest()).eval()
    sums, ntok = fronts.sentence_losses(model, corpus, "valid", max_tokens=512)
    assert len(sums) == len(corpus.splits["valid"][0]) and (ntok > 0).all()
    assert ntok.tolist() == [len(t) for t in corpus.splits["valid"][1]]  # every target token (EOS included)
    fitness = train.valid_loss(model, split_batches(corpus, "valid", 512, "cpu"))
    assert sums.sum() / ntok.sum() == pytest.approx(fitness, rel=1e-6)


def test_compare_runs_finds_the_first_difference_and_ignores_timings(tmp_path):
    """regenerated.json's comparison: equal logs with other timings are identical; one changed loss is found."""
    log = [dict(step=50, lr=1e-4, L=6.7, S=7.8, tok_per_s=100), dict(step=100, lr=2e-4, L=6.0, S=7.1, tok_per_s=90)]
    results = dict(split="test", largest=dict(loss=2.3, bleu=26.2, decode_seconds=29.1))
    for name, records, res in (("a", log, results), ("b", [dict(r, tok_per_s=5) for r in log],
                                                      dict(results, largest=dict(loss=2.3, bleu=26.2,
                                                                                 decode_seconds=3.0)))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    same = fronts.compare_runs(tmp_path / "a", tmp_path / "b")
    assert same["identical"] and same["max_abs_diff"] == 0 and same["numbers"] == 2 * 4 + 2
    (tmp_path / "b" / "train_log.jsonl").write_text(json.dumps(log[0]) + "\n" + json.dumps(dict(log[1], S=7.25)) + "\n")
    parted = fronts.compare_runs(tmp_path / "a", tmp_path / "b")
    assert not parted["identical"] and parted["first_difference"] == "train_log step 100 S"
    assert parted["max_abs_diff"] == pytest.approx(0.15)


def test_until_scratch_without_scratch_is_refused(tmp_path):
    """--until=scratch --scratch=False would run no stage: a one-line error before anything is written."""
    with pytest.raises(SystemExit, match="no stage to run"):
        fronts.main(["--until=scratch", "--scratch=False", f"--out={tmp_path / 'fronts'}"])
    assert not (tmp_path / "fronts").exists()


@pytest.mark.slow
def test_fronts_pipeline_on_the_toy_task(tmp_path):
    """gap.py's toy supernets (one seed, two arms), then every fronts.py stage (one arm up to its supernet stages,
    then its scratch runs, then all); a rerun reads everything back, and --remeasure_sessions=2 adds a second
    interleaved session."""
    out_gap, out = tmp_path / "gap", tmp_path / "fronts"
    gap.main([f"--out={out_gap}", "--preset=toy", "--panel_size=3", "--candidates=5", "--arms=['hat','neuron']",
              "--seeds=[1337]", "--test_sentences=12", "--bootstrap=20",
              "--extra=['--preset=toy','--max_steps=8','--bleu_sentences=-1','--save_interval=0']"])
    flags = ["--preset=toy", f"--gap={out_gap}", f"--out={out}", "--seed=1337"]
    (out_gap / "supernet_neuron_s1337" / "ckpt.pt").unlink()  # as in a fresh checkout: trained again from its settings
    first = fronts.main([*flags, "--arms=['neuron']", "--until=supernets"])  # one arm's supernet stages only
    assert [r["name"] for r in first] == ["neuron_p50", "neuron_p90"] and not (out / "remeasure.jsonl").exists()
    assert not list(out.glob("scratch_*"))
    scratch = fronts.main([*flags, "--arms=['neuron']", "--until=scratch"])  # its winners from scratch, no more
    assert scratch == first and not (out / "remeasure.jsonl").exists() and not (out / "fronts.json").exists()
    folders = {fronts.scratch_folder(out, r["arch"]) for r in first}
    assert set(out.glob("scratch_*")) == folders
    assert all((f / f"results_step{s}.json").exists() and (f / f"hyps_test_step{s}.txt").exists()
               for f in folders for s in (4, 8))
    early = fronts.main([*flags, "--scratch=False"])  # hat's supernet stages, stage 4 and the report, no 5b
    assert set(out.glob("scratch_*")) == folders and len(read_jsonl(out / "remeasure.jsonl")) == 1
    assert (out / "fronts.json").exists() and all(r["scratch"] for r in early if r["arm"] == "neuron")
    assert all(bool(r["scratch"]) == (fronts.scratch_folder(out, r["arch"]) in folders) for r in early)  # hat: none yet
    rows = fronts.main(flags)  # hat's winners from scratch; the session of stage 4 is kept, the report redone
    assert len(read_jsonl(out / "remeasure.jsonl")) == 1
    regenerated = json.loads((out / "supernet_neuron_s1337" / "regenerated.json").read_text())
    assert regenerated["identical"] and regenerated["same_length"] and regenerated["numbers"] > 0
    assert not (out / "supernet_hat_s1337").exists()  # its checkpoint was there
    measured = latency.read_latency_csv(out / "latency.csv")[1]  # the random subnets' median_ms
    corpus = make_toy_corpus(seed=parse_settings(TrainConfig, ["--preset=toy"], presets=PRESETS).seed)
    refs = corpus.refs["test"][:30]
    noise = json.loads((out / "noise.json").read_text())
    assert [r["name"] for r in rows] == ["hat_p50", "hat_p90", "neuron_p50", "neuron_p90"]
    for r in rows:
        assert r["budget_ms"] == round(float(np.percentile(measured, r["percentile"])), 2)  # stage 1's percentiles
        assert r["predicted_ms"] <= r["budget_ms"]  # the search's hard constraint
        assert set(r["finetune"]) == {0, 4, 8} and set(r["scratch"]) == {4, 8}
        for step in (0, 4, 8):  # every BLEU comes from translations kept beside it
            hyps = (out / f"finetune_{r['name']}" / f"hyps_test_step{step}.txt").read_text().splitlines()
            assert bleu_score(hyps, refs)[0] == pytest.approx(r["finetune"][step]["bleu"])
    for arm in ("hat", "neuron"):  # the fitness is the whole valid split: the noise floor rescored it
        low, high = [r for r in rows if r["arm"] == arm]
        assert noise[arm]["valid_loss"] == [pytest.approx(low["valid_loss"]), pytest.approx(high["valid_loss"])]
        assert noise[arm]["rebatched_delta"] < 1e-4 and noise[arm]["bootstrap_std"][0] > 0
        assert noise[arm]["paired_diff"] == pytest.approx(high["valid_loss"] - low["valid_loss"], abs=1e-5)
    report = json.loads((out / "fronts.json").read_text())
    session = report["remeasure_sessions"][0]
    assert set(session["models"]) == {"arch0", "arch1", "arch2", *[r["name"] for r in rows]}  # panel and winners
    assert session["reference"] == "arch0" and report["latency_across_sessions"]["arch1"]["panel_ms"] > 0
    check = next(c for c in report["budget_checks"] if c["arm"] == "neuron")
    ratios = [h / l for h, l in zip(session["models"]["neuron_p90"]["rounds_ms"],
                                    session["models"]["neuron_p50"]["rounds_ms"])]
    assert check["slower_ratio_median"] == pytest.approx(float(np.median(ratios)))
    assert check["slower_rounds"] == [sum(q > 1 for q in ratios), 2]  # toy: 2 rounds
    assert check["bleu_step0"]["low"] == pytest.approx(rows[2]["finetune"][0]["bleu"])
    assert [c["name"] for c in report["retraining"]] == [r["name"] for r in rows]  # all have the full scratch run
    for c, r in zip(report["retraining"], rows):  # finetuned minus the same arch's full scratch run, per step count
        assert c["scratch_bleu"] == pytest.approx(r["scratch"][8]["bleu"])
        for step in (0, 4, 8):
            assert c["minus_scratch"][str(step)] == pytest.approx(r["finetune"][step]["bleu"] - r["scratch"][8]["bleu"])
            assert 0 <= c["p_value"][str(step)] <= 1
        reached = [s for s in (0, 4, 8) if r["finetune"][s]["bleu"] >= r["scratch"][8]["bleu"]]
        assert c["steps_to_scratch"] == (min(reached) if reached else None)
    for name in ("fronts.png", "steps.png", "fronts.md"):
        assert (out / name).exists()

    again = fronts.main([*flags, "--remeasure_sessions=2"])  # nothing retrained; one more interleaved session
    assert [r["finetune"] for r in again] == [r["finetune"] for r in rows]
    assert len(read_jsonl(out / "remeasure.jsonl")) == 2
    report = json.loads((out / "fronts.json").read_text())
    assert len(report["winners"][0]["interleaved_sessions_ms"]) == 2
    # a later checkout again: neither checkpoint, one finetuning point missing -> trained again, the same numbers
    for ckpt in (out / "supernet_neuron_s1337" / "ckpt.pt", out / "finetune_neuron_p90" / "ckpt.pt"):
        ckpt.unlink()
    kept = out / "finetune_neuron_p90" / "results_step8.json"
    before = json.loads(kept.read_text())
    kept.unlink()
    fronts.main([*flags, "--arms=['neuron']", "--until=supernets"])
    assert json.loads((out / "supernet_neuron_s1337" / "regenerated.json").read_text())["identical"]
    untimed = lambda result: {k: v for k, v in result["model"].items() if k not in fronts.TIMING_KEYS}
    assert untimed(json.loads(kept.read_text())) == untimed(before)  # (decode_seconds is the clock's, not the run's)
    ms = report["latency_across_sessions"]["hat_p50"]["ms"]
    spread = report["latency_across_sessions"]["hat_p50"]["ms_spread"]
    assert spread == pytest.approx((max(ms) - min(ms)) / np.median(ms))
