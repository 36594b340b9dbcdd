"""
The paper's central claim, measured: how far is a subnet with weights inherited from a supernet (no retraining) from
the same architecture trained from scratch, and does the supernet rank subnets the way standalone training does?
HAT's weight sharing against MoS, on a fixed panel of architectures.

    python experiments/gap.py --data_source=../shared/data/multi30k/tok   # Multi30k, cpu_wide: many CPU hours
    python experiments/gap.py --until=panel                 # only stage 1: choose and write the panel
    python experiments/gap.py --report_only=True            # only stage 4, from what is finished: trains nothing
    python experiments/gap.py --preset=toy --out=out_gap_toy   # the same stages on the synthetic task, a minute or two
    python -m experiments.gap --preset=toy --out=out_gap_toy   # the same, as a module
    python experiments/gap.py --preset=toy --out=out_gap_stops --stops=[20,30]   # each run scored at 20 and 30 updates

Stages (rerun the same command after a stop: a finished stage is skipped, a training run resumes from its checkpoint,
a half-scored supernet continues with its next arch):
  1. panel.json: K architectures stratified over the space's latency range, fixed before any supernet is scored;
  2. standalone/archI: each panel arch trained from scratch with one budget (train.py --arch), its translations kept;
  3. supernet_ARM_sSEED: every arm (ARMS) for every seed, the same data and recipe, the same updates but for
     hat_flops (PASS_MATCHED: the sandwich arms' subnet passes as updates); right after each one, inherited.json:
     every panel arch cut from it (no retraining), test loss and BLEU, translations kept;
  4. gap.json, gap.md, gap.png: per arm, inherited against standalone: mean |gap|, Kendall tau and Spearman rho of the
     two rankings with a bootstrap interval over archs, the arm's training cost, a paired bootstrap over source
     sentences (paired_bootstrap) of each arm against HAT, against HAT with the sandwich rule and against HAT with
     as many subnet passes, and layer-wise against neuron-wise MoS (BASELINES), on the same archs; each arm's mean
     difference per seed (arm_differences) and whether it holds beyond the seed range (seed_range). Written after
     every scored supernet, from every scored supernet in the folder (whatever --arms and --seeds ask for now), so
     a partial run reports what it has and a rerun of one seed keeps the others.
With --stops=[S1,S2,...] every run trains on through each stop (one folder per stop, out/stepS/, each a whole gap
report of the run's state after S updates), and stage 5 writes convergence.json, convergence.md and convergence.png:
the stops side by side and each claim of the reading (CLAIMS) at each.
Settings are the GapConfig fields, changed with --key=value as in train.py. The default --out is the committed
evidence, experiments/results/gap (give a toy run an out*/ folder); checkpoints (*.pt) stay out of git.
"""

import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sacrebleu.metrics import BLEU
from sacrebleu.significance import estimate_ci
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python experiments/gap.py` finds the core
import mos  # noqa: E402
import train  # noqa: E402
from data.batching import TokenBatcher  # noqa: E402
from data.corpus import remove_bpe  # noqa: E402
from runs.folders import OWNER, record_files  # noqa: E402
from runs.files import atomic_open, lock_folder, read_json, releases_locks, write_json  # noqa: E402
from experiments.reproduce import train_stage  # noqa: E402
from latency import kendall_tau, measure_latency  # noqa: E402
from runs.machine import machine  # noqa: E402
from data.prepare import load_data  # noqa: E402
from mos import SPACES, ArchConfig, Transformer  # noqa: E402
from runs.checkpoints import check_vocab  # noqa: E402
from runs.plots import pyplot  # noqa: E402
from runs.settings import check_settings, parse_settings  # noqa: E402
from runs.signals import run  # noqa: E402

# -----------------------------------------------------------------------------
# Settings

ARMS = {  # the supernets compared, as train.py flags (the order they train in: HAT against neuron-wise MoS first)
    "hat": ("--router=none", "--num_experts=1", "--sampling=random"),  # HAT: one random subnet per update
    "neuron": ("--router=neuron", "--num_experts=2", "--sampling=sandwich"),  # neuron-wise MoS
    "hat_sandwich": ("--router=none", "--num_experts=1", "--sampling=sandwich"),  # HAT's weights, MoS's sampling
    "layer": ("--router=layer", "--num_experts=2", "--sampling=sandwich"),  # layer-wise MoS
    "hat_flops": ("--router=none", "--num_experts=1", "--sampling=random"),  # HAT for the sandwich's subnet passes
}
PASS_MATCHED = ("hat_flops",)  # given a sandwich arm's subnet passes as updates (arm_flags): what compute alone buys
BASELINES = ("hat", "hat_sandwich", "hat_flops", "neuron")  # the paired test: every arm against HAT (the paper's
# baseline), then the rest against HAT with MoS's sampling (for the MoS arms the router is the only difference; for
# hat_flops, the sampling rule at equal subnet passes), then the MoS arms against HAT at equal subnet passes, then
# the two routers against each other
BOOTSTRAP_SEED = 12345  # sacrebleu's default SACREBLEU_SEED: with one decode per sentence, its paired test exactly
STAGES = ("panel", "standalone")  # --until: stop after this stage (default: all)
PANEL_SEED = 0  # the random candidates the panel is chosen from
CI = (2.5, 97.5)  # percentiles of the bootstrap interval


@dataclass
class GapConfig:
    """Every setting of the command line; the defaults are the Multi30k CPU experiment on SPACES['cpu_wide']."""
    preset: str = "multi30k"  # multi30k | toy (see PRESETS)
    out: str = "experiments/results/gap"  # every stage writes below this folder (checkpoints are git-ignored)
    space: str = "cpu_wide"
    panel_size: int = 8  # K archs; the space's smallest and largest are always two of them
    candidates: int = 64  # random archs whose latency is measured to choose the panel from
    seeds: tuple = (1337, 1338, 1339)  # each arm trained once per seed (initialisation, data order, sampled subnets)
    arms: tuple = tuple(ARMS)
    until: str = "all"  # panel | standalone | all
    report_only: bool = False  # only stage 4, from the finished runs' files: trains, measures and scores nothing
    test_sentences: int = 0  # BLEU on the first N test sentences; 0 = all
    bootstrap: int = 1000  # resamples for the intervals over archs and for the paired test
    latency_warmup: int = 5  # the panel's latency measurement (latency.measure_latency, beam protocol)
    latency_iters: int = 20
    threads: int = 2
    data_source: str = ""  # where train.py prepares the corpus from if it is not prepared (folder, URL, tarball)
    extra: tuple = ("--max_minutes=0", "--bleu_sentences=-1")  # train.py flags for every run (standalone, supernet)
    stops: tuple = ()  # update counts to score every run at, one folder each (out/stepS/): each run trains on
    # through them (resumed, exactly); () = once, at train.py's --max_steps, in out/ itself
    panel_from: str = ""  # a panel.json to score (copied to out/, with its arch files) instead of choosing a new one


PRESETS = {
    "multi30k": dict(),
    # the synthetic task on the tiny space: the whole pipeline in about a minute (tests)
    "toy": dict(space="tiny", panel_size=4, candidates=12, seeds=(1337, 1338), test_sentences=30, bootstrap=100,
                latency_warmup=1, latency_iters=2, threads=1,
                extra=("--preset=toy", "--max_steps=30", "--bleu_sentences=-1", "--save_interval=0",
                       "--eval_interval=1000")),
}


# -----------------------------------------------------------------------------
# Stage 1: the panel


def stratify(latencies, k: int, lo: float, hi: float) -> list:
    """Indices of k candidates spread evenly inside the latency range [lo, hi]: for each of k equally spaced targets
    strictly between lo and hi, the not yet chosen candidate closest to it. Sorted by latency."""
    lat = np.asarray(latencies, dtype=float)
    if k > len(lat):
        raise SystemExit(f"error: a panel of {k} inner archs needs at least {k} candidates, got {len(lat)}; "
                         f"raise --candidates")
    chosen = []
    for target in np.linspace(lo, hi, k + 2)[1:-1]:
        free = [i for i in range(len(lat)) if i not in chosen]
        chosen.append(min(free, key=lambda i: abs(lat[i] - target)))
    return sorted(chosen, key=lambda i: lat[i])


def choose_panel(cfg: GapConfig, corpus, path: Path) -> list:
    """The panel's archs: measure the latency of the space's smallest, largest and `candidates` random archs (random
    weights, this corpus's vocabularies), keep `panel_size` of them spread over the range. Written once to `path`."""
    space = SPACES[cfg.space]
    rng, candidates = random.Random(PANEL_SEED), [space.smallest(), space.largest()]
    while len(candidates) < cfg.candidates + 2:
        arch = space.sample(rng)
        candidates += [arch] if arch not in candidates else []
    measured = []
    for arch in tqdm(candidates, desc="panel latency", dynamic_ncols=True):
        model = Transformer(arch, len(corpus.src_vocab), len(corpus.tgt_vocab), space.qkv_dim)
        measured.append(measure_latency(model, warmup=cfg.latency_warmup, iters=cfg.latency_iters,
                                        threads=cfg.threads)["median_ms"])
    # the ends are the space's smallest and largest archs; the others spread between their latencies
    chosen = [0] + [2 + i for i in stratify(measured[2:], cfg.panel_size - 2, measured[0], measured[1])] + [1]
    panel = [dict(name=f"arch{j}", arch=candidates[i].to_dict(), latency_ms=measured[i],
                  params=mos.num_params(candidates[i], space, len(corpus.src_vocab), len(corpus.tgt_vocab)))
             for j, i in enumerate(chosen)]
    write_panel_archs(panel, path.parent / "panel")  # panel.json last, as the stage's mark
    measured_all = [dict(arch=a.to_dict(), latency_ms=m) for a, m in zip(candidates, measured)]
    write_json(path, dict(space=cfg.space, machine=machine(), threads=cfg.threads, protocol="beam",
                          note="latency of random weights, median of latency_iters runs; chosen before any supernet "
                               "was scored", panel=panel, candidates=measured_all))
    return panel


def copy_panel(source: Path, path: Path):
    """Score another experiment's panel: its panel.json copied to `path` as it is, with its archs' files."""
    if not source.is_file():
        raise SystemExit(f"error: --panel_from={source} is not a file; give another gap experiment's panel.json")
    write_panel_archs(read_json(source, "panel")["panel"], path.parent / "panel")
    shutil.copyfile(source, path)  # last, as the stage's mark


def write_panel_archs(panel, folder: Path):
    """One JSON arch file per panel arch in `folder`, what train.py --arch reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in panel:
        write_json(folder / f"{entry['name']}.json", entry["arch"])


# -----------------------------------------------------------------------------
# Stages 2 and 3: training, and scoring the panel with inherited weights


def arm_flags(arm: str, run: train.TrainConfig, updates: int) -> list:
    """train.py flags of an arm, for runs of `run`'s settings trained for `updates`. A PASS_MATCHED arm (one random
    subnet per update) gets as many updates as a sandwich arm makes subnet passes: updates x (largest + smallest +
    n_random)."""
    return [*ARMS[arm], f"--max_steps={updates * (2 + run.n_random) if arm in PASS_MATCHED else updates}"]


def continue_run(earlier: Path, folder: Path):
    """Start the run folder `folder` as the run in `earlier` stands, its checkpoint and logs, so that training it to
    more updates continues that run (train.py resumes exactly, and the learning rate does not depend on --max_steps):
    the next stop of one run. Nothing to do once `folder` has its checkpoint; the checkpoint comes last (a hard link:
    train.py saves by replacing the file, so `earlier`'s stays as it is)."""
    if (folder / "ckpt.pt").exists() or (folder / "results.json").exists():
        return
    if not (earlier / "ckpt.pt").exists():  # checkpoints are never committed: a fresh clone has none
        raise SystemExit(f"error: {earlier} has no ckpt.pt to continue into {folder}; train that stop again (move "
                         f"{earlier} aside) or run on the machine that has it")
    folder.mkdir(parents=True, exist_ok=True)
    for name in (OWNER, "train_log.jsonl", "log.jsonl"):  # the owner record: the same train.py run (runs/folders.py)
        if (earlier / name).exists():  # (train.py drops the earlier stop's final test from log.jsonl)
            shutil.copyfile(earlier / name, folder / name)
    partial = folder / "ckpt.pt.partial"  # (left by a stop between the next two lines: this function's own)
    partial.unlink(missing_ok=True)
    try:
        os.link(earlier / "ckpt.pt", partial)
    except OSError:  # a file system without hard links: a copy
        shutil.copyfile(earlier / "ckpt.pt", partial)
    os.replace(partial, folder / "ckpt.pt")


GAP_FILES = ("inherited.json", "cost.json")  # what gap.py writes in a supernet's run folder (hyps_*.txt: train.py's)


def inherited_scores(folder: Path, panel) -> tuple:
    """The supernet in `folder`'s inherited.json ({} before its first arch is scored) and whether it holds every
    panel arch: a fully scored supernet needs its checkpoint no more (checkpoints are never committed)."""
    path = folder / "inherited.json"
    scores = read_json(path, "scores") if path.exists() else {}
    return scores, all(entry["name"] in scores for entry in panel)


def score_inherited(folder: Path, panel, corpus, cfg: GapConfig) -> dict:
    """Test loss and BLEU of every panel arch cut from the supernet in `folder` (no retraining), the translations in
    hyps_test_archI.txt, decoded in the precision the supernet trained in (as train.py's own final test), recorded
    with the machine. Written to inherited.json after each arch, so a stopped scoring continues."""
    done, complete = inherited_scores(folder, panel)
    if complete:
        return done
    ckpt = train.load_checkpoint(folder / "ckpt.pt")
    check_vocab(ckpt, corpus, folder / "ckpt.pt")
    supernet, run = train.model_from_checkpoint(ckpt).eval(), ckpt["config"]
    record_files(folder, GAP_FILES)  # gap.py's files beside train.py's in the run folder (runs/folders.py)
    for entry in panel:
        if entry["name"] in done:
            continue
        t = time.time()
        subnet = supernet.subnet(ArchConfig.from_dict(entry["arch"]))
        done[entry["name"]] = train.evaluate(subnet, corpus, "test", torch.device("cpu"), run["max_tokens"],
                                             cfg.test_sentences, run["beam"], run["lenpen"], bool(run["bf16"]),
                                             hyps_path=folder / f"hyps_test_{entry['name']}.txt")
        done[entry["name"]].update(decode_seconds=round(time.time() - t, 1), machine=machine(),
                                   precision="bf16" if run["bf16"] else "fp32")
        write_json(folder / "inherited.json", done)
        print(f"{folder.name} {entry['name']}: inherited test loss {done[entry['name']]['loss']:.3f}, "
              f"BLEU {done[entry['name']]['bleu']:.2f}")
    return done


def training_cost(ckpt: dict, corpus) -> dict:
    """What training the supernet cost: updates, subnet forward-backward passes, an estimate of the FLOPs
    (6 x parameters x target tokens per pass, with the output projection, the embeddings' lookups not counted) and
    the wall time, with the machine (this one: where training finished, if it resumed across machines). The subnets
    of every step are sampled again exactly as train.py sampled them."""
    run = train.TrainConfig(**ckpt["config"])
    space, (src, tgt) = mos.SearchSpace.from_dict(ckpt["model_args"]["space"]), corpus.splits["train"]
    batches = TokenBatcher([len(s) for s in src], [len(t) for t in tgt], run.max_tokens, seed=run.seed).batches(0)
    tokens_per_update = sum(len(t) for t in tgt) / len(batches)  # mean target tokens of one batch
    V = len(corpus.tgt_vocab)
    params = [mos.num_params(a, space, 0, 0, embeddings=False) + a.dec_embed_dim * V
              for step in range(ckpt["step"]) for a in train.subnets_for(step, run, space)]
    return dict(updates=ckpt["step"], subnet_passes=len(params), train_flops=6 * tokens_per_update * sum(params),
                train_seconds=round(ckpt["train_seconds"], 1), machine=machine())


# -----------------------------------------------------------------------------
# Stage 4: the gap, the rankings, the paired test


def spearman_rho(a, b) -> float:
    """Spearman's rho: the correlation of the two rankings (tied values share their mean rank)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        return np.array([r[x == v].mean() for v in x])  # ties: the mean of their ranks
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def gap_statistics(inherited, standalone, n_boot: int, seed=0) -> dict:
    """inherited and standalone: per panel arch, dicts with 'bleu' and 'loss'. The mean gap (inherited minus
    standalone) and mean |gap| of BLEU and loss, and Kendall tau and Spearman rho between the inherited and the
    standalone ranking, each with a bootstrap interval over archs (resampled with replacement)."""
    stats, rng = {}, np.random.default_rng(seed)
    resamples = [rng.integers(0, len(standalone), len(standalone)) for _ in range(n_boot)]  # (K,) arch indices each
    for key in ("bleu", "loss"):
        x = np.array([r[key] for r in inherited])  # (K,)
        y = np.array([r[key] for r in standalone])  # (K,)
        stats[f"mean_gap_{key}"] = float((x - y).mean())
        stats[f"mean_abs_gap_{key}"] = float(np.abs(x - y).mean())
        for name, fn in (("kendall", kendall_tau), ("spearman", spearman_rho)):
            with np.errstate(invalid="ignore", divide="ignore"):  # a resample of one repeated arch has no ranking
                boot = [fn(x[i], y[i]) for i in resamples]
            stats[f"{name}_{key}"] = fn(x, y)
            stats[f"{name}_{key}_ci"] = [float(v) for v in np.nanpercentile(boot, CI)] if n_boot else None
    return stats


def paired_bootstrap(systems: dict, refs: list, n_samples: int) -> dict:
    """Paired bootstrap over source sentences, each system against the first (the baseline). systems: name -> BPE'd
    lines, K decodes of the N sentences of `refs` one block after the other (K x N lines: the panel's K archs).
    A resample draws N sentences with replacement and keeps a sentence's K decodes together, so K correlated decodes
    count as one draw, not K (the line-level test over K x N lines overstates the evidence). BLEU of a resample:
    sacrebleu's, from the summed per-line statistics (on the full set, corpus_score of the K x N lines). p-value and
    95% interval as sacrebleu's paired bootstrap (significance._paired_bs_test, after Koehn 2004): with d the real
    BLEU difference and d_i a resample's, p = (1 + #{|d_i| - mean |d_i| > |d|}) / (1 + n_samples), and the interval
    estimate_ci's; with K = 1 (one decode per sentence) it is sacrebleu's test to the digit. Returns
    name -> dict(bleu, p_value (None for the baseline), ci: half the 95% interval's width)."""
    base, n = next(iter(systems)), len(refs)
    for name, lines in systems.items():
        if len(lines) != len(systems[base]) or len(lines) % n or not lines:
            raise SystemExit(f"error: {name} has {len(lines)} translations for {n} references ({base} has "
                             f"{len(systems[base])}); score the same sentences (--test_sentences) everywhere")
    k, metric = len(systems[base]) // n, BLEU(tokenize="none", force=True)
    text = lambda lines: [remove_bpe(line) for line in lines]
    stats = {name: np.array(metric._extract_corpus_statistics(text(lines), [text(refs) * k]))  # (K*N, D) counts
             for name, lines in systems.items()}  # D = lengths + matches and totals per n-gram order
    bleu = {name: metric._compute_score_from_stats(s.sum(0).tolist()).score for name, s in stats.items()}
    per_sentence = {name: s.reshape(k, n, -1).sum(0).astype("float32") for name, s in stats.items()}  # (N, D),
    # float32 as sacrebleu's resamples (exact for these counts)
    draws = np.random.default_rng(BOOTSTRAP_SEED).choice(n, size=(n_samples, n), replace=True)  # sacrebleu's draw
    boot = {name: np.array([metric._compute_score_from_stats(s[i].sum(0)).score for i in draws])  # (n_samples,)
            for name, s in per_sentence.items()}
    out = {}
    for name in systems:
        diffs = np.abs(boot[name] - boot[base])  # (n_samples,)
        p = (np.sum(diffs - diffs.mean() > abs(bleu[name] - bleu[base])) + 1) / (n_samples + 1)
        out[name] = dict(bleu=float(bleu[name]), p_value=None if name == base else float(p),
                         ci=float(estimate_ci(boot[name])[1]))
    return out


def paired_groups(arms) -> dict:
    """baseline -> the arms paired-tested against it: for each of BASELINES that ran, every other arm except the
    baselines before it (they were already tested against it). ("hat", "neuron", "hat_sandwich", "layer") gives
    hat: neuron, hat_sandwich, layer; hat_sandwich: neuron, layer; and neuron: layer."""
    groups = {}
    for i, base in enumerate(BASELINES):
        others = [arm for arm in arms if arm not in BASELINES[:i + 1]]
        if base in arms and others:
            groups[base] = others
    return groups


def arm_differences(runs: dict, names) -> dict:
    """baseline -> arm -> one record per seed where both ran: the mean over the panel archs of (arm - baseline)
    inherited test BLEU and loss, and on how many archs the arm is ahead (higher BLEU, lower loss). Whether a claim
    holds beyond the seed range is read off these by seed_range."""
    out = {}
    for base, others in paired_groups(sorted({a for a, _ in runs}, key=list(ARMS).index)).items():
        for arm in others:
            for seed in sorted({s for a, s in runs if a == arm and (base, s) in runs}):
                a, b = runs[(arm, seed)]["inherited"], runs[(base, seed)]["inherited"]
                bleu, loss = (np.array([a[n][k] - b[n][k] for n in names]) for k in ("bleu", "loss"))  # (archs,)
                out.setdefault(base, {}).setdefault(arm, []).append(dict(
                    seed=seed, bleu=float(bleu.mean()), loss=float(loss.mean()), archs=len(names),
                    ahead_bleu=int((bleu > 0).sum()), ahead_loss=int((loss < 0).sum())))
    return out


def seed_range(differences: dict, runs: dict, names) -> dict:
    """baseline -> arm -> the reading of arm_differences fixed before the third seed (the gap README), for BLEU and
    loss: a claim "arm differs from baseline" holds if the sign is the same at every seed, and holds beyond the seed
    range if, besides, the smallest difference is larger than the baseline's own spread over those seeds (the largest
    minus the smallest of its per-seed means over the archs). One seed has no range: it is never beyond."""
    out = {}
    for base, by_arm in differences.items():
        for arm, per_seed in by_arm.items():
            seeds = [d["seed"] for d in per_seed]
            verdict = dict(seeds=len(seeds))
            for key in ("bleu", "loss"):
                own = [np.mean([runs[(base, s)]["inherited"][n][key] for n in names]) for s in seeds]  # (seeds,)
                diffs = np.array([d[key] for d in per_seed])  # (seeds,)
                same = bool((diffs > 0).all() or (diffs < 0).all())
                smallest, spread = float(np.abs(diffs).min()), float(max(own) - min(own))
                verdict[key] = dict(same_sign=same, smallest=smallest, baseline_spread=spread,
                                    beyond=same and len(seeds) > 1 and smallest > spread)
            out.setdefault(base, {})[arm] = verdict
    return out


def report(out: Path, cfg: GapConfig, panel, corpus):
    """gap.json, gap.md and gap.png from every finished standalone run and every fully scored supernet in the
    folder, seed by seed and in the order of ARMS."""
    names = [e["name"] for e in panel]
    standalone = {n: read_json(out / "standalone" / n / "results.json", "results")["model"]
                  for n in names if (out / "standalone" / n / "results.json").exists()}
    found = [f.name[len("supernet_"):].rpartition("_s") for f in out.glob("supernet_*_s*")]  # (arm, "_s", seed)
    runs = {}
    for arm, seed in sorted(((a, int(s)) for a, _, s in found if a in ARMS and s.isdigit()),
                            key=lambda k: (k[1], list(ARMS).index(k[0]))):
        folder = out / f"supernet_{arm}_s{seed}"
        scored, complete = inherited_scores(folder, panel)
        if complete and (folder / "cost.json").exists():
            runs[(arm, seed)] = dict(inherited=scored, cost=read_json(folder / "cost.json", "cost"))
    if len(standalone) < len(names) or not runs:
        print(f"report: {len(standalone)}/{len(names)} standalone runs and {len(runs)} scored supernets so far")
        return None
    ref = [standalone[n] for n in names]
    rows = [dict(arm=arm, seed=seed, **r["cost"], **gap_statistics([r["inherited"][n] for n in names], ref,
                                                                       cfg.bootstrap))
            for (arm, seed), r in runs.items()]
    n_test = cfg.test_sentences or len(corpus.refs["test"])
    refs = corpus.refs["test"][:n_test]  # each arm's hyps: the panel's len(names) archs, one block each
    arms, seeds = [a for a in ARMS if any(k[0] == a for k in runs)], sorted({s for _, s in runs})
    paired = {}  # seed -> baseline -> arm -> result
    for seed in seeds:  # the arms of one seed, decoding the same archs, against each baseline
        hyps = {arm: [line for n in names for line in read_lines(out / f"supernet_{arm}_s{seed}" /
                                                                  f"hyps_test_{n}.txt")]
                for arm in arms if (arm, seed) in runs}  # each arm's files read once, for every baseline
        groups = paired_groups(list(hyps))
        if groups:
            paired[seed] = {base: paired_bootstrap({arm: hyps[arm] for arm in (base, *others)}, refs,
                                                   cfg.bootstrap)
                            for base, others in groups.items()}
    method = (f"paired bootstrap over source sentences, {cfg.bootstrap:,} resamples (the {n_test:,} test sentences "
              f"drawn with replacement, each with its {len(names)} panel archs' decodes; p as sacrebleu's)")
    summary, differences = summarise(rows, arms), arm_differences(runs, names)
    verdicts = seed_range(differences, runs, names)
    write_json(out / "gap.json", dict(settings=asdict(cfg), panel=panel,  # (machines: panel.json, cost.json)
                                      standalone=standalone, runs=rows, per_arm=summary,
                                      inherited={f"{a}_s{s}": r["inherited"] for (a, s), r in runs.items()},
                                      arm_differences=differences, seed_range=verdicts,
                                      paired_method=method, paired_bootstrap={str(s): p for s, p in paired.items()}))
    write_markdown(out / "gap.md", panel, standalone, runs, rows, summary, paired, method, differences, verdicts)
    plot(out / "gap.png", panel, standalone, runs)
    print(f"report: {out / 'gap.md'} (the reading), {out / 'gap.json'} (every figure), {out / 'gap.png'}")
    return summary


def read_lines(path: Path) -> list:
    """The lines of a translations file."""
    return path.read_text(encoding="utf-8").splitlines()


def summarise(rows, arms) -> dict:
    """Per arm, over its seeds: the mean, the smallest and the largest of each statistic and cost."""
    keys = ("mean_abs_gap_bleu", "mean_abs_gap_loss", "mean_gap_bleu", "mean_gap_loss", "kendall_bleu",
            "spearman_bleu", "kendall_loss", "spearman_loss", "train_flops", "train_seconds", "subnet_passes")
    out = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if mine:
            out[arm] = dict(seeds=[r["seed"] for r in mine],
                            **{k: dict(mean=float(np.mean([r[k] for r in mine])),
                                       min=float(np.min([r[k] for r in mine])),
                                       max=float(np.max([r[k] for r in mine]))) for k in keys})
    return out


def write_markdown(path: Path, panel, standalone, runs, rows, summary, paired, method: str, differences, verdicts):
    """The tables of gap.md: per arm (mean over seeds, [min, max]), per run (the rankings' bootstrap intervals over
    archs), per arch, each arm against each baseline seed by seed with its seed-range verdict, the paired tests."""
    span = lambda s, f: f"{s['mean']:{f}} [{s['min']:{f}}, {s['max']:{f}}]"
    lines = ["| arm | seeds | mean abs gap BLEU | mean gap BLEU | mean abs gap loss | Kendall tau (BLEU) | "
             "Spearman rho (BLEU) | Kendall tau (loss) | subnet passes | train PFLOPs | mean train hours |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {len(s['seeds'])} | {span(s['mean_abs_gap_bleu'], '.2f')} | "
                     f"{span(s['mean_gap_bleu'], '.2f')} | {span(s['mean_abs_gap_loss'], '.3f')} | "
                     f"{span(s['kendall_bleu'], '.2f')} | {span(s['spearman_bleu'], '.2f')} | "
                     f"{span(s['kendall_loss'], '.2f')} | {s['subnet_passes']['mean']:.0f} | "
                     f"{s['train_flops']['mean'] / 1e15:.3g} | {s['train_seconds']['mean'] / 3600:.2f} |")
    ci = lambda r, key: f"{r[key]:.2f} [{r[key + '_ci'][0]:.2f}, {r[key + '_ci'][1]:.2f}]" if r[key + "_ci"] else \
        f"{r[key]:.2f}"
    lines += ["", "Per run, with 95% bootstrap intervals over the panel's archs", "",
              "| arm | seed | mean abs gap BLEU | mean abs gap loss | Kendall tau (BLEU) | Spearman rho (BLEU) | "
              "Kendall tau (loss) | Spearman rho (loss) | train hours | machine |", "|---" * 10 + "|"]
    lines += [f"| {r['arm']} | {r['seed']} | {r['mean_abs_gap_bleu']:.2f} | {r['mean_abs_gap_loss']:.3f} | "
              f"{ci(r, 'kendall_bleu')} | {ci(r, 'spearman_bleu')} | {ci(r, 'kendall_loss')} | "
              f"{ci(r, 'spearman_loss')} | {r['train_seconds'] / 3600:.2f} | {r.get('machine', 'not recorded')} |"
              for r in rows]
    keys = sorted(runs, key=lambda k: (list(summary).index(k[0]), k[1]))
    lines += ["", "Test BLEU per panel arch: standalone, then inherited from each supernet (arm_sSEED)", "",
              "| arch | latency ms | params | standalone | " + " | ".join(f"{a}_s{s}" for a, s in keys) + " |",
              "|---" * (4 + len(keys)) + "|"]
    for e in panel:
        lines.append(f"| {e['name']} | {e['latency_ms']:.1f} | {e['params'] / 1e6:.2f}M | "
                     f"{standalone[e['name']]['bleu']:.2f} | "
                     + " | ".join(f"{runs[k]['inherited'][e['name']]['bleu']:.2f}" for k in keys) + " |")
    lines += ["", "Each arm against each baseline, seed by seed: the mean over the panel archs of (arm - baseline) "
                  "inherited test BLEU and loss, and the archs on which the arm is ahead; the smallest |difference| "
                  "against the baseline's own spread over the seeds (seed_range)", "",
              "| arm | against | per seed: BLEU (archs ahead) | per seed: loss, nats (archs lower) | "
              "same sign at every seed (BLEU / loss) | smallest vs baseline's spread: BLEU; loss | "
              "beyond the seed range (BLEU / loss) |", "|---|---|---|---|---|---|---|"]
    yes = lambda flag: "yes" if flag else "no"
    for base, by_arm in differences.items():
        for arm, per_seed in by_arm.items():
            v = verdicts[base][arm]
            lines.append(f"| {arm} | {base} | " + ", ".join(f"s{d['seed']} {d['bleu']:+.2f} ({d['ahead_bleu']}/"
                         f"{d['archs']})" for d in per_seed) + " | " + ", ".join(
                         f"s{d['seed']} {d['loss']:+.3f} ({d['ahead_loss']}/{d['archs']})" for d in per_seed)
                         + f" | {yes(v['bleu']['same_sign'])} / {yes(v['loss']['same_sign'])} | "
                         f"{v['bleu']['smallest']:.2f} vs {v['bleu']['baseline_spread']:.2f}; "
                         f"{v['loss']['smallest']:.3f} vs {v['loss']['baseline_spread']:.3f} | "
                         f"{yes(v['bleu']['beyond'])} / {yes(v['loss']['beyond'])} |")
    for seed, by_base in paired.items():
        for base, result in by_base.items():
            tested = "; ".join(f"{n} {r['bleu']:.2f}" + ("" if r["p_value"] is None else
                                                          f" (p = {r['p_value']:.4f})") for n, r in result.items())
            lines += ["", f"P{method[1:]}, seed {seed}, every panel arch's test translations, against {base}: "
                          f"{tested}"]
    with atomic_open(path) as f:
        f.write("\n".join(lines) + "\n")


def plot(path: Path, panel, standalone, runs):
    """Inherited against standalone test BLEU and loss, one colour per arm, one marker per seed, the diagonal drawn."""
    plt = pyplot()  # headless
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = dict(zip(ARMS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    seeds = sorted({s for _, s in runs})
    for ax, key in zip(axes, ("bleu", "loss")):
        x = [standalone[e["name"]][key] for e in panel]
        for (arm, seed), r in sorted(runs.items()):
            ax.scatter(x, [r["inherited"][e["name"]][key] for e in panel], color=colours.get(arm),
                       marker="osD^v"[seeds.index(seed) % 5], label=f"{arm} seed {seed}", alpha=0.8)
        every = x + [r["inherited"][e["name"]][key] for r in runs.values() for e in panel]
        lo, hi = min(every), max(every)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, linestyle="--")  # inherited = standalone
        ax.set(xlabel=f"standalone test {key.upper() if key == 'bleu' else key}",
               ylabel=f"inherited (supernet) test {key.upper() if key == 'bleu' else key}")
    axes[0].legend(fontsize=7)
    fig.suptitle("panel archs: quality with inherited weights against the same arch trained from scratch")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


# -----------------------------------------------------------------------------
# Stage 5 (with --stops): the same runs at each stop, side by side

# The claims of the three-seed reading (experiments/results/gap/README.md) as read at each stop, with the criteria
# fixed before the stops were scored (experiments/results/gap_convergence/README.md): (claim, A, B, quantity, the
# three-seed spread it is held against, and whether gap/ found it "beyond" that spread or "within" it). A - B is the
# mean over the panel of A's minus B's inherited test BLEU or loss, or the difference of a gap statistic.
CLAIMS = (
    ("1", "hat_sandwich", "hat", "bleu", 2.00, "beyond"),
    ("1", "hat_sandwich", "hat", "loss", 0.039, "beyond"),
    ("2", "hat_flops", "hat_sandwich", "bleu", 0.40, "beyond"),
    ("2", "hat_flops", "hat_sandwich", "loss", 0.012, "beyond"),
    ("2", "layer", "hat_flops", "bleu", 0.79, "beyond"),
    ("2", "neuron", "hat_flops", "bleu", 0.79, "beyond"),
    ("3", "layer", "hat_sandwich", "loss", 0.012, "beyond"),
    ("3", "neuron", "hat_sandwich", "loss", 0.012, "beyond"),
    ("4", "layer", "hat_sandwich", "bleu", 0.40, "within"),
    ("4", "neuron", "hat_sandwich", "bleu", 0.40, "within"),
    ("5", "layer", "neuron", "bleu", 0.40, "within"),
    ("5", "layer", "neuron", "loss", 0.012, "within"),
    ("6", "layer", "hat_sandwich", "mean_abs_gap_loss", 0.008, "beyond"),
    ("6", "neuron", "hat_sandwich", "mean_abs_gap_loss", 0.008, "beyond"),
    ("6", "layer", "hat_sandwich", "mean_abs_gap_bleu", 0.46, "within"),
    ("6", "neuron", "hat_sandwich", "mean_abs_gap_bleu", 0.46, "within"),
    ("7", "hat_sandwich", "hat_flops", "kendall_loss", 1 / 14, "within"),  # one step of tau over eight archs: 2/28
    ("7", "layer", "hat_flops", "kendall_loss", 1 / 14, "within"),
    ("7", "neuron", "hat_flops", "kendall_loss", 1 / 14, "within"),
)
CONVERGED = dict(bleu=0.40, loss=0.012)  # the standalone panel's mean test gain over the last two stops below these


def compare_stops(out: Path, stops: dict, panel):
    """convergence.json, convergence.md and convergence.png in `out`: the reports of every stop (updates -> its
    folder) side by side, once every stop has one. Per panel arch the standalone test BLEU and loss and their gains;
    per arm and seed the gap statistics; per claim of CLAIMS A - B at each stop, whether its sign at the last stop is
    its sign at the first (survives), and against its spread: above it (firmly, for a claim gap/ found beyond the
    seed range) or at most it (level with the spread)."""
    paths = {n: where / "gap.json" for n, where in stops.items()}
    if len(stops) < 2 or not all(p.exists() for p in paths.values()):
        return None
    reports = {n: read_json(p, "gap report") for n, p in paths.items()}
    names, (first, *_, last) = [e["name"] for e in panel], list(stops)
    before = list(stops)[-2]
    standalone = {e: {n: reports[n]["standalone"][e] for n in stops} for e in names}
    gain = {k: float(np.mean([standalone[e][last][k] - standalone[e][before][k] for e in names])) for k in CONVERGED}
    converged = gain["bleu"] < CONVERGED["bleu"] and -gain["loss"] < CONVERGED["loss"]
    rows = {n: {(r["arm"], r["seed"]): r for r in reports[n]["runs"]} for n in stops}  # stop -> (arm, seed) -> row
    runs = sorted(set().union(*rows.values()), key=lambda k: (k[1], list(ARMS).index(k[0])))  # scored at any stop
    stats = {f"{a}_s{s}": {n: rows[n].get((a, s)) for n in stops} for a, s in runs}

    def difference(n, a, b, seed, key):  # A - B at stop n: of the inherited scores' mean over the panel, or a statistic
        if (a, seed) not in rows[n] or (b, seed) not in rows[n]:
            return None
        if key in ("bleu", "loss"):
            got = reports[n]["inherited"]
            return float(np.mean([got[f"{a}_s{seed}"][e][key] - got[f"{b}_s{seed}"][e][key] for e in names]))
        return float(rows[n][(a, seed)][key] - rows[n][(b, seed)][key])

    claims = []
    for claim, a, b, key, spread, found in CLAIMS:
        for seed in sorted({s for _, s in runs}):
            d = {n: difference(n, a, b, seed, key) for n in stops}
            if None in d.values():
                claims.append(dict(claim=claim, a=a, b=b, key=key, seed=seed, judged=False))
                continue
            survives = bool(np.sign(d[last]) == np.sign(d[first]) != 0)
            claims.append(dict(claim=claim, a=a, b=b, key=key, seed=seed, judged=True, by_stop=d, spread=spread,
                               gap_found=found, survives=survives, firmly=survives and abs(d[last]) > spread,
                               level=abs(d[last]) <= spread))
    write_json(out / "convergence.json", dict(stops=list(stops), standalone=standalone, standalone_gain=gain,
                                              converged=converged, gap_statistics=stats, claims=claims))
    write_convergence_markdown(out / "convergence.md", list(stops), names, standalone, gain, converged, stats, claims)
    plot_convergence(out / "convergence.png", list(stops), names, standalone, stats)
    return claims


def plot_convergence(path: Path, stops, names, standalone, stats):
    """Left: each panel arch's standalone test BLEU against updates. Then each supernet against the updates of a
    sandwich arm (hat_flops makes three per one of them): its mean gap in BLEU, signed (above zero: its subnets beat
    their standalone runs), and its mean |gap| in BLEU and in loss, the quantities the criteria read."""
    plt = pyplot()  # headless
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for e in names:
        axes[0].plot(stops, [standalone[e][n]["bleu"] for n in stops], marker="o", label=e)
    axes[0].set(xlabel="updates", ylabel="standalone test BLEU", title="the reference: still climbing?")
    for label, by_stop in stats.items():
        scored = [n for n in stops if by_stop[n] is not None]
        for ax, key in zip(axes[1:], ("mean_gap_bleu", "mean_abs_gap_bleu", "mean_abs_gap_loss")):
            ax.plot(scored, [by_stop[n][key] for n in scored], marker="o", label=label)
    axes[1].axhline(0, color="grey", linewidth=0.8)  # level with the standalone runs
    updates = "updates (a sandwich arm's; hat_flops x3)"
    axes[1].set(xlabel=updates, ylabel="mean gap, BLEU (inherited - standalone)", title="supernets")
    axes[2].set(xlabel=updates, ylabel="mean |gap|, BLEU")
    axes[3].set(xlabel=updates, ylabel="mean |gap|, loss (nats)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def write_convergence_markdown(path, stops, names, standalone, gain, converged, stats, claims):
    """The tables of convergence.md."""
    at = lambda n: f"{n:,} updates"
    lines = ["Standalone test BLEU / loss of each panel arch at each stop", "",
             "| arch | " + " | ".join(at(n) for n in stops) + " |", "|---" * (1 + len(stops)) + "|"]
    lines += [f"| {e} | " + " | ".join(f"{standalone[e][n]['bleu']:.2f} / {standalone[e][n]['loss']:.3f}"
                                        for n in stops) + " |" for e in names]
    lines += ["", f"Mean change from {at(stops[-2])} to {at(stops[-1])}: BLEU {gain['bleu']:+.2f}, loss "
                  f"{gain['loss']:+.3f} nats; converged by the criterion (a BLEU gain below {CONVERGED['bleu']} and a "
                  f"loss drop below {CONVERGED['loss']} nats): {'yes' if converged else 'no, still climbing'}", "",
              "Each supernet's gap statistics at each stop (mean |gap| BLEU / loss, mean gap BLEU, Kendall tau on "
              "loss / BLEU)", "", "| run | " + " | ".join(at(n) for n in stops) + " |", "|---" * (1 + len(stops)) + "|"]
    cell = lambda r: "not scored" if r is None else (f"{r['mean_abs_gap_bleu']:.2f} / {r['mean_abs_gap_loss']:.3f}, "
                                                     f"{r['mean_gap_bleu']:+.2f}, {r['kendall_loss']:.2f} / "
                                                     f"{r['kendall_bleu']:.2f}")
    lines += [f"| {run} | " + " | ".join(cell(by_stop[n]) for n in stops) + " |" for run, by_stop in stats.items()]
    lines += ["", "Each claim, A - B at each stop, read by the criteria fixed before scoring", "",
              "| claim | A - B | quantity | seed | " + " | ".join(at(n) for n in stops) +
              " | survives (same sign) | against the spread |", "|---" * (6 + len(stops)) + "|"]
    for c in claims:
        head = f"| {c['claim']} | {c['a']} - {c['b']} | {c['key']} | {c['seed']} | "
        if not c["judged"]:
            lines.append(head + " | ".join("" for _ in stops) + " | not judged (not scored at every stop) | |")
            continue
        size = f"abs(A - B) {'<=' if c['level'] else '>'} {c['spread']:.3g}"  # at the last stop
        verdict = (("firm" if c["firmly"] else "not firm") if c["gap_found"] == "beyond" else
                   ("level with the spread" if c["level"] else "beyond the spread")) + f" ({size})"
        lines.append(head + " | ".join(f"{c['by_stop'][n]:+.3f}" for n in stops) +
                     f" | {'yes' if c['survives'] else 'no'} | {verdict} |")
    with atomic_open(path) as f:
        f.write("\n".join(lines) + "\n")


# -----------------------------------------------------------------------------
# The stages in order


@releases_locks
def main(argv):
    """Run every stage that has not finished, up to --until, then the report (--report_only: the report alone)."""
    cfg = parse_settings(GapConfig, argv, presets=PRESETS)
    check_settings(cfg, dict(panel_size=2, candidates=1, latency_iters=1, threads=1),
                         dict(space=SPACES, until=(*STAGES, "all")))
    unknown = [arm for arm in cfg.arms if arm not in ARMS]
    if unknown or not cfg.arms or not cfg.seeds:
        raise SystemExit(f"error: --arms={list(cfg.arms)} --seeds={list(cfg.seeds)}; give one or more arms of "
                         f"{list(ARMS)} and one or more integer seeds")
    if not all(isinstance(flag, str) for flag in cfg.extra):
        raise SystemExit(f"error: --extra={list(cfg.extra)}; give train.py flags as strings, e.g. ['--max_steps=60']")
    if not all(type(s) is int and s > 0 for s in cfg.stops) or list(cfg.stops) != sorted(set(cfg.stops)):
        raise SystemExit(f"error: --stops={list(cfg.stops)}; give increasing update counts, e.g. [1500,3000]")
    extra = [*cfg.extra, *([f"--data_source={cfg.data_source}"] if cfg.data_source else [])]
    run = parse_settings(train.TrainConfig, extra, presets=train.PRESETS)  # a bad train.py flag fails now
    out = Path(cfg.out)
    lock_folder(out)  # one writer per experiment folder
    path = out / "panel.json"
    if cfg.report_only and not path.exists():
        raise SystemExit(f"error: {path} not found: --report_only=True reports finished runs; run the stages first")
    if not cfg.report_only:  # the settings of the command that trains (a report alone keeps them)
        write_json(out / "settings.json", asdict(cfg))
    corpus = load_data(run.data, run.data_dir, run.data_source, run.seed)  # every model is scored on it
    threads = torch.get_num_threads()  # measure_latency pins its own count and restores it

    # 1. the panel, fixed before anything is trained (or another experiment's, to score the same archs)
    if not path.exists() and cfg.panel_from:
        copy_panel(Path(cfg.panel_from), path)
    panel = read_json(path, "panel")["panel"] if path.exists() else choose_panel(cfg, corpus, path)
    print("panel: " + ", ".join(f"{e['name']} {e['latency_ms']:.1f} ms" for e in panel))
    stops = {s: out / f"step{s}" for s in cfg.stops} if cfg.stops else {run.max_steps: out}  # updates -> folder
    if cfg.report_only:
        summary = [report(where, cfg, panel, corpus) for where in stops.values()][-1]  # 4. alone
        compare_stops(out, stops, panel)
        return summary
    if cfg.until == "panel":
        return panel
    torch.set_num_threads(threads)
    train_flags = [*extra, f"--space={cfg.space}", f"--test_sentences={cfg.test_sentences}"]

    # 2. the standalone reference: every panel arch from scratch, one budget (each stop of it)
    for e in panel:
        earlier = None
        for updates, where in stops.items():
            folder = where / "standalone" / e["name"]
            if earlier is not None:
                continue_run(earlier, folder)
            train_stage(folder, [*train_flags, f"--arch={out / 'panel' / (e['name'] + '.json')}",
                                 f"--max_steps={updates}"])
            earlier = folder
    if cfg.until == "standalone":
        return panel

    # 3. the supernets, seed by seed (so that every arm has one seed before any has two), each scored when trained
    #    (at each stop, then trained on to the next)
    for seed in cfg.seeds:
        for arm in cfg.arms:
            earlier = None
            for updates, where in stops.items():
                folder = where / f"supernet_{arm}_s{seed}"
                if (folder / "cost.json").exists() and inherited_scores(folder, panel)[1]:
                    print(f"[done] {folder} (trained and scored)")
                    earlier = folder
                    continue
                if earlier is not None:
                    continue_run(earlier, folder)
                train_stage(folder, [*train_flags, *arm_flags(arm, run, updates), f"--seed={seed}"])
                score_inherited(folder, panel, corpus, cfg)
                if not (folder / "cost.json").exists():
                    record_files(folder, GAP_FILES)
                    write_json(folder / "cost.json", training_cost(train.load_checkpoint(folder / "ckpt.pt"), corpus))
                report(where, cfg, panel, corpus)  # 4. the report, over everything finished so far
                compare_stops(out, stops, panel)
                earlier = folder
    summary = [report(where, cfg, panel, corpus) for where in stops.values()][-1]
    compare_stops(out, stops, panel)  # 5. the stops side by side
    return summary


if __name__ == "__main__":
    run(main)
