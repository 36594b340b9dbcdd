"""experiments/gap.py: the panel's stratification, the gap and ranking statistics on hand-made numbers, the paired
test over source sentences, the arms' updates and training cost, and the whole pipeline on the toy task."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest

import mos
from runs.machine import machine
import train
from data.corpus import make_toy_corpus, remove_bpe
from experiments import gap
from runs.settings import parse_settings
from train import PRESETS, TrainConfig, bleu_score


def test_stratify_spreads_over_the_latency_range():
    lat = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    assert gap.stratify(lat, 3, lo=1.0, hi=9.0) == [3, 0, 4]  # targets 3, 5, 7 ms
    assert gap.stratify(lat, 5, lo=0.0, hi=9.6) == [5, 3, 0, 4, 6]  # targets 1.6, 3.2, 4.8, 6.4, 8 ms
    # candidates crowd in the middle: a target whose closest candidate is taken gets the next closest
    assert gap.stratify([5.0, 5.1, 5.2, 6.0], 2, lo=2.0, hi=11.0) == [0, 3]  # targets 5, 8 ms
    assert gap.stratify([5.0, 5.1, 5.2], 2, lo=0.0, hi=15.0) == [0, 2]  # targets 5, 10 ms
    with pytest.raises(SystemExit, match="candidates"):
        gap.stratify([1.0, 2.0], 3, lo=0.0, hi=3.0)


def test_gap_statistics_on_hand_made_numbers():
    standalone = [dict(bleu=b, loss=l) for b, l in [(10, 3.0), (20, 2.5), (30, 2.0), (40, 1.5)]]
    same_order = [dict(bleu=b, loss=l) for b, l in [(12, 3.1), (18, 2.6), (33, 2.2), (41, 1.6)]]
    s = gap.gap_statistics(same_order, standalone, n_boot=200)
    assert s["mean_gap_bleu"] == pytest.approx(1.0) and s["mean_abs_gap_bleu"] == pytest.approx(2.0)  # +2 -2 +3 +1
    assert s["mean_gap_loss"] == pytest.approx(0.125) and s["mean_abs_gap_loss"] == pytest.approx(0.125)
    assert s["kendall_bleu"] == s["spearman_bleu"] == s["kendall_loss"] == pytest.approx(1.0)
    assert s["kendall_bleu_ci"] == [pytest.approx(1.0), pytest.approx(1.0)]  # every resample ranks alike

    one_swap = [dict(bleu=b, loss=l) for b, l in [(20, 2.5), (10, 3.0), (30, 2.0), (40, 1.5)]]
    s = gap.gap_statistics(one_swap, standalone, n_boot=200)
    assert s["kendall_bleu"] == pytest.approx(4 / 6)  # 5 of 6 pairs concordant, 1 discordant
    assert s["spearman_bleu"] == pytest.approx(1 - 6 * 2 / (4 * 15))  # 1 - 6 sum d^2 / (n (n^2 - 1))
    lo, hi = s["kendall_bleu_ci"]
    assert -1 <= lo <= s["kendall_bleu"] <= hi <= 1

    reversed_ = list(reversed(standalone))
    s = gap.gap_statistics(reversed_, standalone, n_boot=0)
    assert s["kendall_bleu"] == pytest.approx(-1.0) and s["spearman_loss"] == pytest.approx(-1.0)
    assert s["mean_gap_bleu"] == pytest.approx(0.0) and s["mean_abs_gap_bleu"] == pytest.approx(20.0)


def test_spearman_with_ties():
    # ranks of a: 0, 1.5, 1.5, 3; of b: 0, 1, 2, 3 -> covariance 4.5, variances 4.5 and 5
    assert gap.spearman_rho([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(gap.spearman_rho([1, 1, 1], [1, 2, 3]))  # a constant has no ranking


def test_paired_test_finds_the_better_system():
    refs = ["a b c d e f", "g h i j k", "l m n o p q r"] * 20
    worse = ["a b x d e y", "g h i z k", "l m n o"] * 20
    close = worse[:-1] + ["l m n o p"]  # one sentence of 60 a little better
    result = gap.paired_bootstrap({"base": worse, "better": list(refs), "close": close}, refs, n_samples=200)
    assert result["base"]["p_value"] is None  # the baseline is not tested against itself
    assert result["better"]["bleu"] == pytest.approx(100.0) and result["base"]["bleu"] < 90
    assert result["better"]["p_value"] < 0.05 and result["close"]["p_value"] > 0.05
    assert result["base"]["bleu"] == pytest.approx(bleu_score(worse, refs)[0])
    # one decode per sentence: sacrebleu's own paired bootstrap, every number
    named = [("base", worse), ("better", list(refs)), ("close", close)]
    _, scores = PairedTest(named, {"BLEU": BLEU(tokenize="none", force=True)}, [refs], test_type="bs",
                           n_samples=200)()
    for (name, _), r in zip(named, scores["BLEU"]):
        assert (result[name]["bleu"], result[name]["p_value"], result[name]["ci"]) == (r.score, r.p_value, r.ci)
    with pytest.raises(SystemExit, match="59 translations for 60 references"):
        gap.paired_bootstrap({"base": worse, "short": worse[:-1]}, refs, n_samples=10)


def test_paired_test_resamples_source_sentences_not_lines():
    """K = 8 archs decoding 20 sentences alike: the line-level test takes the 160 lines as independent and finds a
    difference that the 20 sentences do not support; resampled by sentence, it is the test of one decode each."""
    refs = ["a b c d e f", "g h i j k", "l m n o p q r", "s t u v w"] * 5  # 20 sentences
    base = ["a b x d e y", "g h i z k", "l m n o", "s t u v q"] * 5
    better = base[:-3] + ["g h i j k", "l m n o p q", "s t u v q"]  # 2 of the 20 sentences better
    k, systems = 8, {"base": base * 8, "better": better * 8}  # (K * N lines): each arch's block in turn
    by_line = gap.paired_bootstrap(systems, refs * k, n_samples=1000)  # 160 "sentences"
    by_sentence = gap.paired_bootstrap(systems, refs, n_samples=1000)  # 20 sentences, their 8 decodes together
    one_decode = gap.paired_bootstrap({"base": base, "better": better}, refs, n_samples=1000)
    assert by_line["better"]["p_value"] < 0.01 < 0.05 < by_sentence["better"]["p_value"]
    assert by_sentence["better"]["p_value"] == pytest.approx(one_decode["better"]["p_value"])
    assert by_sentence["better"]["ci"] > 2 * by_line["better"]["ci"]  # the interval of 20 draws, not of 160
    for name, lines in systems.items():  # the full set's BLEU: sacrebleu's corpus BLEU of every line
        corpus = BLEU(tokenize="none", force=True).corpus_score(lines, [refs * k]).score
        assert by_sentence[name]["bleu"] == by_line[name]["bleu"] == corpus


def test_concatenated_bleu_is_sacrebleus_corpus_score():
    refs = ["a b c d e f", "g h i j k", "l m n o p q r"]
    decodes = {"base": ["a b x d e y", "g h i z k", "l m n o", "a b c d e", "g h i j", "l m n o p q r"],
               "other": ["a b c d e f", "g h k", "l m o p q r", "x b c d e f", "g h i j k", "l n o p q"]}
    result = gap.paired_bootstrap(decodes, refs, n_samples=20)  # two archs' decodes of 3 sentences
    for name, lines in decodes.items():
        assert result[name]["bleu"] == BLEU(tokenize="none", force=True).corpus_score(lines, [refs * 2]).score
    with pytest.raises(SystemExit, match="5 translations for 3 references"):
        gap.paired_bootstrap({"base": decodes["base"][:5], "other": decodes["other"][:5]}, refs, n_samples=10)


def test_paired_groups_test_mos_against_both_baselines():
    # the router's own effect is MoS against hat_sandwich (same sampling); every arm is also tested against hat
    assert gap.paired_groups(("hat", "neuron", "hat_sandwich", "layer")) == {
        "hat": ["neuron", "hat_sandwich", "layer"], "hat_sandwich": ["neuron", "layer"], "neuron": ["layer"]}
    assert gap.paired_groups(("neuron", "hat_sandwich", "layer")) == {"hat_sandwich": ["neuron", "layer"],
                                                                       "neuron": ["layer"]}
    assert gap.paired_groups(("hat", "hat_sandwich")) == {"hat": ["hat_sandwich"]}  # nothing left for the second
    assert gap.paired_groups(("neuron", "layer")) == {"neuron": ["layer"]}  # the two routers, against each other
    assert gap.paired_groups(("neuron", "hat_flops")) == {"hat_flops": ["neuron"]}  # a baseline, tested once
    # the compute-matched HAT against both: more updates alone (hat), the sandwich rule at equal passes (hat_sandwich);
    # and the MoS arms against it (MoS against HAT at equal subnet passes)
    assert gap.paired_groups(tuple(gap.ARMS)) == {"hat": ["neuron", "hat_sandwich", "layer", "hat_flops"],
                                                   "hat_sandwich": ["neuron", "layer", "hat_flops"],
                                                   "hat_flops": ["neuron", "layer"], "neuron": ["layer"]}


def test_hat_flops_makes_the_sandwich_arms_subnet_passes_as_updates():
    extra = ["--preset=toy", "--max_steps=30"]
    run = parse_settings(TrainConfig, extra, presets=PRESETS)
    for arm in gap.ARMS:  # only hat_flops gets its own update count; every other arm keeps the experiment's
        cfg = parse_settings(TrainConfig, [*extra, *gap.arm_flags(arm, run, run.max_steps)], presets=PRESETS)
        assert cfg.max_steps == (90 if arm == "hat_flops" else 30)
    cfg = parse_settings(TrainConfig, [*extra, *gap.arm_flags("hat_flops", run, run.max_steps)], presets=PRESETS)
    sandwich = parse_settings(TrainConfig, [*extra, *gap.arm_flags("hat_sandwich", run, run.max_steps)],
                              presets=PRESETS)
    space = mos.SPACES["tiny"]
    costs = [gap.training_cost(dict(config=vars(c), model_args=dict(space=space.to_dict()), step=c.max_steps,
                                    train_seconds=1.0), make_toy_corpus(seed=0)) for c in (cfg, sandwich)]
    assert costs[0]["updates"] == costs[0]["subnet_passes"] == costs[1]["subnet_passes"] == 90
    assert gap.arm_flags("hat_flops", TrainConfig(), 1500)[-1] == "--max_steps=4500"  # Multi30k: 3 x 1,500


def test_training_cost_counts_the_sampled_subnets():
    corpus = make_toy_corpus(seed=0)
    space = mos.SPACES["tiny"]
    for sampling, per_step in (("random", 1), ("sandwich", 3)):
        cfg = parse_settings(TrainConfig, ["--preset=toy", f"--sampling={sampling}", "--n_random=1"], presets=PRESETS)
        ckpt = dict(config=vars(cfg), model_args=dict(space=space.to_dict()), step=7, train_seconds=12.34)
        cost = gap.training_cost(ckpt, corpus)
        assert cost["updates"] == 7 and cost["subnet_passes"] == 7 * per_step and cost["train_seconds"] == 12.3
        assert cost["machine"] == machine()
        archs = [a for step in range(7) for a in train.subnets_for(step, cfg, space)]
        smallest = mos.num_params(space.smallest(), space, 0, 0, embeddings=False)
        assert cost["train_flops"] > 6 * len(archs) * smallest  # at least the smallest subnet per pass


def test_gap_pipeline_on_the_toy_task(tmp_path):
    """Every stage end to end on the toy task with two arms and two seeds: the panel, the standalone runs, the
    supernets, the inherited scores and their translations, the report; a rerun resumes a half-scored supernet."""
    out = tmp_path / "gap"
    flags = [f"--out={out}", "--preset=toy", "--panel_size=3", "--candidates=5", "--arms=['hat','neuron']",
             "--seeds=[1,2]", "--test_sentences=12", "--bootstrap=50",
             "--extra=['--preset=toy','--max_steps=8','--bleu_sentences=-1','--save_interval=0']"]
    panel = gap.main([*flags, "--until=panel"])
    assert not (out / "standalone").exists()  # --until=panel stops after the panel
    space = mos.SPACES["tiny"]
    archs = [mos.ArchConfig.from_dict(e["arch"]) for e in panel]
    assert len(panel) == 3 and archs[0] == space.smallest() and archs[-1] == space.largest()
    inner = [e["latency_ms"] for e in panel[1:-1]]
    assert inner == sorted(inner) and len({json.dumps(e["arch"]) for e in panel}) == 3
    assert json.loads((out / "panel" / "arch1.json").read_text()) == panel[1]["arch"]

    summary = gap.main(flags)
    assert set(summary) == {"hat", "neuron"} and all(s["seeds"] == [1, 2] for s in summary.values())
    report = json.loads((out / "gap.json").read_text())
    corpus = make_toy_corpus(seed=parse_settings(TrainConfig, ["--preset=toy"], presets=PRESETS).seed)
    refs = corpus.refs["test"][:12]
    standalone = [json.loads((out / "standalone" / e["name"] / "results.json").read_text())["model"] for e in panel]
    for arm in ("hat", "neuron"):
        for seed in (1, 2):
            folder = out / f"supernet_{arm}_s{seed}"
            inherited = json.loads((folder / "inherited.json").read_text())
            for e in panel:  # every BLEU comes from translations kept beside it
                hyps = (folder / f"hyps_test_{e['name']}.txt").read_text().splitlines()
                assert len(hyps) == 12 and bleu_score(hyps, refs)[0] == pytest.approx(inherited[e["name"]]["bleu"])
            row = next(r for r in report["runs"] if r["arm"] == arm and r["seed"] == seed)
            again = gap.gap_statistics([inherited[e["name"]] for e in panel], standalone, n_boot=50)
            assert row["kendall_loss"] == pytest.approx(again["kendall_loss"])
            assert row["mean_abs_gap_bleu"] == pytest.approx(again["mean_abs_gap_bleu"])
            assert row["subnet_passes"] == 8 * (1 if arm == "hat" else 3)
    mean = np.mean([r["mean_abs_gap_loss"] for r in report["runs"] if r["arm"] == "neuron"])
    assert summary["neuron"]["mean_abs_gap_loss"]["mean"] == pytest.approx(mean)
    assert set(report["paired_bootstrap"]) == {"1", "2"} and (out / "gap.png").exists()
    for seed in ("1", "2"):  # neuron against hat only: hat_sandwich did not run
        tested = report["paired_bootstrap"][seed]
        assert list(tested) == ["hat"] and tested["hat"]["hat"]["p_value"] is None
        assert 0 <= tested["hat"]["neuron"]["p_value"] <= 1
    assert "| neuron | 2 |" in (out / "gap.md").read_text()

    # resume: a supernet whose scoring stopped after some archs scores only the rest, to the same numbers
    path = out / "supernet_neuron_s2" / "inherited.json"
    before = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in before.items() if k != "arch2"}))
    gap.main(flags)
    after = json.loads(path.read_text())
    assert after["arch2"]["loss"] == pytest.approx(before["arch2"]["loss"]) and after["arch0"] == before["arch0"]

    # a fresh checkout has the committed scores but no checkpoints (they stay out of git): a rerun needs none
    for ckpt in out.glob("supernet_*/ckpt.pt"):
        ckpt.unlink()
    assert gap.main(flags) == summary

    # the report alone, asked for an arm and a seed with no run yet: it reports what there is and trains nothing
    settings = (out / "settings.json").read_text()
    again = gap.main([*flags, "--arms=['hat','neuron','hat_flops']", "--seeds=[1,2,3]", "--report_only=True"])
    assert again == summary and not list(out.glob("supernet_hat_flops_*")) + list(out.glob("supernet_*_s3"))
    assert set(json.loads((out / "gap.json").read_text())["paired_bootstrap"]) == {"1", "2"}
    assert (out / "settings.json").read_text() == settings  # the settings of the command that trained
    # the report covers every scored run in the folder: a rerun that names one arm and one seed keeps the others
    results = lambda: {k: v for k, v in json.loads((out / "gap.json").read_text()).items() if k != "settings"}
    before = results()
    assert gap.main([*flags, "--arms=['hat']", "--seeds=[2]", "--report_only=True"]) == summary
    assert results() == before  # (its settings record the command that wrote it)


def test_stops_score_one_run_at_several_update_counts(tmp_path):
    """--stops: every run trains on through each stop, one folder each; a later stop is exactly the run trained that
    long at once; hat_flops keeps three updates per sandwich update; every score records its precision and machine;
    convergence.json reads the claims at each stop; another experiment can score the same panel (--panel_from)."""
    out = tmp_path / "gap"
    extra = ["--preset=toy", "--bleu_sentences=-1", "--save_interval=0", "--eval_interval=1000"]
    flags = [f"--out={out}", "--preset=toy", "--panel_size=3", "--candidates=5", "--arms=['hat_sandwich','hat_flops']",
             "--seeds=[1]", "--test_sentences=12", "--bootstrap=20", "--stops=[8,12]", f"--extra={extra}"]
    gap.main(flags)
    once = tmp_path / "once"  # standalone arch1 trained for 12 steps in one go
    train.main([*extra, "--space=tiny", "--test_sentences=12", f"--arch={out / 'panel' / 'arch1.json'}",
                "--max_steps=12", f"--out_dir={once}"])
    results = json.loads((out / "step12" / "standalone" / "arch1" / "results.json").read_text())
    assert results["model"]["loss"] == json.loads((once / "results.json").read_text())["model"]["loss"]
    assert (out / "step12" / "standalone" / "arch1" / "hyps_test_model.txt").read_text() == \
        (once / "hyps_test_model.txt").read_text()
    assert results["precision"] == "fp32" and results["machine"] == machine()
    for stop, updates in ((8, 24), (12, 36)):
        folder = out / f"step{stop}" / "supernet_hat_flops_s1"
        assert json.loads((folder / "cost.json").read_text())["updates"] == updates
        scores = json.loads((folder / "inherited.json").read_text())
        assert all(r["precision"] == "fp32" and r["machine"] == machine() for r in scores.values())
    assert train.load_checkpoint(out / "step8" / "supernet_hat_flops_s1" / "ckpt.pt")["step"] == 24  # kept as it was
    report = json.loads((out / "convergence.json").read_text())
    claim = next(c for c in report["claims"] if (c["a"], c["b"], c["key"]) == ("hat_flops", "hat_sandwich", "bleu"))
    step8 = json.loads((out / "step8" / "gap.json").read_text())["inherited"]
    mean_difference = np.mean([step8["hat_flops_s1"][e]["bleu"] - step8["hat_sandwich_s1"][e]["bleu"]
                               for e in step8["hat_flops_s1"]])
    assert claim["by_stop"]["8"] == pytest.approx(mean_difference)
    assert not next(c for c in report["claims"] if c["b"] == "hat")["judged"]  # hat did not run
    assert "| 2 | hat_flops - hat_sandwich | bleu | 1 |" in (out / "convergence.md").read_text()
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same panel in another experiment; and a stop whose earlier stop lost its checkpoint is refused, named
    other = tmp_path / "other"
    assert gap.main([f"--out={other}", "--preset=toy", f"--panel_from={out / 'panel.json'}", "--until=panel"]) == \
        json.loads((out / "panel.json").read_text())["panel"]
    assert (other / "panel" / "arch2.json").read_text() == (out / "panel" / "arch2.json").read_text()
    (out / "step8" / "standalone" / "arch0" / "ckpt.pt").unlink()
    for path in sorted((out / "step12" / "standalone" / "arch0").iterdir()):
        path.unlink()
    with pytest.raises(SystemExit, match="has no ckpt.pt to continue into"):
        gap.main(flags)


def bleu_against(refs):
    """train.bleu_score's corpus BLEU against fixed references whose n-grams sacrebleu counts once, not per call (the
    committed-score tests score hundreds of files against the same references)."""
    metric = BLEU(tokenize="none", force=True, references=[[remove_bpe(r) for r in refs]])
    return lambda hyps: metric.corpus_score([remove_bpe(h) for h in hyps], None).score


def test_bleu_against_fixed_references_is_bleu_score():
    refs = ["a b@@ c d e", "the cat sat on the mat", "x y z"]
    hyps = ["a bc d", "the cat sat on a mat", "x y z w"]
    assert bleu_against(refs)(hyps) == bleu_score(hyps, refs)[0] > 0


def test_every_committed_gap_bleu_recomputes_from_its_translations():
    """experiments/results/gap: each standalone run's and each supernet's per-arch test BLEU is what its committed
    translations score against the Multi30k test references (../shared/data/multi30k), so no score stands without
    the decodes behind it; and the report's per-seed concatenated BLEU is what the eight archs' files give."""
    root = Path(__file__).resolve().parent.parent
    refs_path = root.parent / "shared" / "data" / "multi30k" / "tok" / "test_2016_flickr.lc.norm.tok.en"
    if not refs_path.exists():
        pytest.skip("../shared/data/multi30k/tok not present")
    refs = refs_path.read_text(encoding="utf-8").splitlines()
    folder = root / "experiments" / "results" / "gap"
    report = json.loads((folder / "gap.json").read_text())
    lines, checked = gap.read_lines, 0
    bleu, bleu_of_all = bleu_against(refs), {}  # bleu_of_all[n]: against the references n times over
    for name, score in report["standalone"].items():
        assert bleu(lines(folder / "standalone" / name / "hyps_test_model.txt")) == \
            pytest.approx(score["bleu"], abs=1e-9)
        checked += 1
    for run, scores in report["inherited"].items():
        hyps = {arch: lines(folder / f"supernet_{run}" / f"hyps_test_{arch}.txt") for arch in scores}
        for arch, score in scores.items():
            assert bleu(hyps[arch]) == pytest.approx(score["bleu"], abs=1e-9), (run, arch)
            checked += 1
        arm, seed = run.rsplit("_s", 1)
        if len(hyps) not in bleu_of_all:
            bleu_of_all[len(hyps)] = bleu_against(refs * len(hyps))
        concatenated = bleu_of_all[len(hyps)]([h for arch in sorted(hyps) for h in hyps[arch]])
        assert concatenated == pytest.approx(report["paired_bootstrap"][seed]["hat"][arm]["bleu"], abs=1e-9), run
    assert checked >= 8 * 11  # the standalone reference and at least ten scored supernets


def test_every_committed_convergence_bleu_recomputes_from_its_translations():
    """experiments/results/gap_convergence/ (issue 42): every committed score of every stop, standalone and inherited,
    is what its translations score against the Multi30k test references, and all were decoded in one precision
    (bf16, as trained), on a recorded machine; a stop's report, where written, quotes the same scores."""
    root = Path(__file__).resolve().parent.parent
    refs_path = root.parent / "shared" / "data" / "multi30k" / "tok" / "test_2016_flickr.lc.norm.tok.en"
    if not refs_path.exists():
        pytest.skip("../shared/data/multi30k/tok not present")
    bleu, checked = bleu_against(refs_path.read_text(encoding="utf-8").splitlines()), 0
    folder = root / "experiments" / "results" / "gap_convergence"
    for results in sorted(folder.glob("step*/standalone/*/results.json")):
        scores = json.loads(results.read_text())
        assert scores["precision"] == "bf16" and scores["machine"], results
        hyps = gap.read_lines(results.parent / "hyps_test_model.txt")
        assert bleu(hyps) == pytest.approx(scores["model"]["bleu"], abs=1e-9), results
        checked += 1
    for inherited in sorted(folder.glob("step*/supernet_*/inherited.json")):
        for arch, score in json.loads(inherited.read_text()).items():
            assert score["precision"] == "bf16" and score["machine"], (inherited, arch)
            hyps = gap.read_lines(inherited.parent / f"hyps_test_{arch}.txt")
            assert bleu(hyps) == pytest.approx(score["bleu"], abs=1e-9), (inherited, arch)
            checked += 1
    for report in sorted(folder.glob("step*/gap.json")):
        quoted = json.loads(report.read_text())
        for arch, score in quoted["standalone"].items():
            committed = json.loads((report.parent / "standalone" / arch / "results.json").read_text())["model"]
            assert score["bleu"] == committed["bleu"], (report, arch)
        for run, scores in quoted["inherited"].items():
            assert scores == json.loads((report.parent / f"supernet_{run}" / "inherited.json").read_text()), run
    assert checked >= 1  # the experiment has begun: its first standalone run is committed


def test_arm_differences_per_seed_on_hand_made_scores():
    """Each arm against each baseline at every seed both ran: mean (arm - baseline) over archs, archs ahead."""
    names = ["a0", "a1"]
    score = lambda b0, b1, l0, l1: dict(inherited={"a0": dict(bleu=b0, loss=l0), "a1": dict(bleu=b1, loss=l1)})
    runs = {("hat", 1): score(20, 30, 3.0, 2.0), ("hat_sandwich", 1): score(25, 29, 2.5, 2.1),
            ("layer", 1): score(26, 31, 2.4, 2.0), ("hat_sandwich", 2): score(24, 30, 2.6, 2.0),
            ("layer", 2): score(23, 30, 2.5, 2.1)}  # no hat at seed 2
    d = gap.arm_differences(runs, names)
    assert list(d) == ["hat", "hat_sandwich"] and list(d["hat"]) == ["hat_sandwich", "layer"]
    assert d["hat"]["layer"] == [dict(seed=1, bleu=3.5, loss=pytest.approx(-0.3), archs=2, ahead_bleu=2,
                                      ahead_loss=1)]
    assert [r["seed"] for r in d["hat_sandwich"]["layer"]] == [1, 2]
    assert d["hat_sandwich"]["layer"][0]["bleu"] == 1.5 and d["hat_sandwich"]["layer"][1]["bleu"] == -0.5
    assert d["hat_sandwich"]["layer"][1]["ahead_bleu"] == 0 and d["hat_sandwich"]["layer"][1]["ahead_loss"] == 1


def test_seed_range_reads_the_differences_as_fixed_before_the_third_seed():
    """Same sign at every seed: holds; and the smallest difference above the baseline's own spread over the seeds
    (largest minus smallest of its per-seed mean over archs): beyond the seed range. One seed is never beyond."""
    names = ["a0", "a1"]
    score = lambda b0, b1, l0, l1: dict(inherited={"a0": dict(bleu=b0, loss=l0), "a1": dict(bleu=b1, loss=l1)})
    runs = {("hat_sandwich", 1): score(20, 30, 2.0, 2.0), ("hat_sandwich", 2): score(21, 30, 2.0, 2.2),  # spread 0.5
            ("layer", 1): score(21, 31, 1.9, 2.0), ("layer", 2): score(21.4, 30.2, 2.05, 2.2),  # BLEU +1, +0.3
            ("hat", 1): score(10, 20, 3.0, 3.0), ("neuron", 1): score(12, 20, 2.9, 3.0)}  # one seed
    verdicts = gap.seed_range(gap.arm_differences(runs, names), runs, names)
    v = verdicts["hat_sandwich"]["layer"]
    assert v["seeds"] == 2 and v["bleu"]["same_sign"] and not v["bleu"]["beyond"]  # +0.3 within the 0.5 spread
    assert v["bleu"]["smallest"] == pytest.approx(0.3) and v["bleu"]["baseline_spread"] == pytest.approx(0.5)
    assert not v["loss"]["same_sign"] and not v["loss"]["beyond"]  # -0.05 then +0.025
    runs[("layer", 2)] = score(22, 30.2, 1.9, 2.1)  # BLEU +0.6 at seed 2: now beyond the 0.5 spread
    assert gap.seed_range(gap.arm_differences(runs, names), runs, names)["hat_sandwich"]["layer"]["bleu"]["beyond"]
    one = verdicts["hat"]["neuron"]
    assert one["seeds"] == 1 and one["bleu"]["same_sign"] and not one["bleu"]["beyond"]  # +1 at one seed: no range
