"""
Latency-BLEU fronts and the retraining saving, on the supernets of the gap experiment (gap.py): does the search use
its budget, and do MoS subnets need less retraining than HAT's to reach their standalone quality?

    python experiments/fronts.py --data_source=../shared/data/multi30k/tok   # after gap.py scored the seed's arms
    python experiments/fronts.py --until=latency                       # stage 1 only (needs no supernet)
    python experiments/fronts.py --arms=[layer] --until=supernets      # one arm's stages 2, 3 and 5a
    python experiments/fronts.py --arms=[layer] --until=scratch        # and its winners from scratch (5b)
    python experiments/fronts.py --scratch=False                       # stage 4 and the report before 5b is done
    python experiments/fronts.py --remeasure_sessions=2                # in a later session: time the winners again
    python experiments/fronts.py --preset=toy --gap=out_gap_toy --out=out_fronts_toy   # on the synthetic task
    python -m experiments.fronts --preset=toy --gap=out_gap_toy --out=out_fronts_toy   # the same, as a module

Stages (rerun the same command after a stop: a finished stage is skipped, a training run resumes from its checkpoint,
the latency dataset and the search caches continue where they stopped):
  1. latency.csv, predictor.json: `latency_n` random subnets of the space timed (random weights: latency depends on
     the shapes only; run it on a quiet machine) and the predictor fit on them. The budgets are the `percentiles` of
     those measured latencies (in ms, rounded to 2 decimals), so that every budget excludes part of the space.
  Then, arm by arm, everything that needs the arm's supernet (seed `seed`). Where its checkpoint is gone (they stay
  out of git, so a fresh checkout has none), the same run is trained again from its stored settings into
  supernet_ARM_sSEED/, and regenerated.json says whether it repeated the first run number for number:
  2. search_ARM: search.py on the arm's supernet under those budgets, fitness on the full valid split.
  3. noise.json: the fitness noise floor per arm: a winner's valid loss under another batching (evaluation order),
     its bootstrap spread over valid sentences, and the paired spread of the highest budget's winner minus the
     lowest's.
  5a. finetune_ARM_pP: each winner with inherited weights (0 steps), then finetuned from its supernet for each of
     `finetune_steps`. Test loss and BLEU at every point, translations kept.
  Then, needing no supernet:
  5b. scratch_HASH: each winner's arch from scratch for each of `scratch_steps` (the last is the gap experiment's
     full budget), scored as in 5a. --until=scratch stops here, so that the arms whose winners are known can be
     trained from scratch before the other arms have theirs; --scratch=False skips it for one run (the report
     then shows the scratch runs that have finished, and the next full run trains the rest).
  After all arms:
  4. remeasure.jsonl: every winner of every arm and the gap panel's archs timed side by side
     (latency_checks.measure_interleaved, every round led by the panel's arch0, the space's smallest subnet), one
     line per session; --remeasure_sessions=2 in a later session adds a second. It runs after all training, on a
     quiet machine.
  6. fronts.json, fronts.md (with the retraining saving: each winner finetuned minus its arch's full scratch run),
     fronts.png (latency against test BLEU, one line per arm, the gap panel's standalone archs as reference) and
     steps.png (test BLEU against training steps, finetuned and from scratch).
Settings are the FrontsConfig fields, changed with --key=value as in train.py. The default --gap and --out are the
committed evidence, experiments/results/gap and experiments/results/fronts (give a toy run out*/ folders);
checkpoints (*.pt) stay out of git.
"""

import hashlib
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python experiments/fronts.py` finds the core
import latency  # noqa: E402
import search  # noqa: E402
import train  # noqa: E402
from data.batching import TokenBatcher, collate, split_batches  # noqa: E402
from runs.folders import claim_folder, record_files  # noqa: E402
from runs.machine import machine  # noqa: E402
from runs.files import (append_jsonl, atomic_open, lock_folder, read_json, read_jsonl,  # noqa: E402
                        json_key, releases_locks, write_json)
from experiments.gap import ARMS, inherited_scores, paired_bootstrap, read_lines  # noqa: E402
from experiments.latency_checks import measure_interleaved, spread  # noqa: E402
from experiments.reproduce import TOY_LATENCY, TOY_SEARCH, train_stage  # noqa: E402
from data.prepare import load_data  # noqa: E402
from mos import PAD, SPACES, ArchConfig, Transformer  # noqa: E402
from runs.plots import pyplot  # noqa: E402
from runs.settings import check_settings, literal, parse_settings  # noqa: E402
from runs.signals import run  # noqa: E402

# -----------------------------------------------------------------------------
# Settings


@dataclass
class FrontsConfig:
    """Every setting of the command line; the defaults follow gap.py's Multi30k experiment on SPACES['cpu_wide']."""
    preset: str = "multi30k"  # multi30k | toy (see PRESETS)
    gap: str = "experiments/results/gap"  # gap.py's folder: the supernets supernet_ARM_sSEED and the panel
    out: str = "experiments/results/fronts"
    seed: int = 1338  # whose supernets are searched (one seed suffices here; see experiments/results/fronts/README.md)
    arms: tuple = ("hat", "neuron", "hat_sandwich", "layer")  # gap.py's ARMS but hat_flops (its fronts: not run)
    until: str = "all"  # latency: stage 1 only (a quiet machine) | supernets: up to 5a | scratch: up to 5b | all
    scratch: bool = True  # False: skip stage 5b in this run (stage 4 and the report take the scratch runs finished)
    percentiles: tuple = (25, 50, 75)  # the budgets: these percentiles of the random subnets' measured latencies
    latency_n: int = 240  # random subnets timed for the predictor and the percentiles
    latency_warmup: int = 10
    latency_iters: int = 20
    threads: int = 2
    remeasure_sessions: int = 1  # interleaved measurements of all winners to hold, one per run of stage 4
    remeasure_rounds: int = 10  # round spreads of 9-42% on this VM (experiments/results/fronts/README.md): more rounds
    remeasure_iters: int = 20
    noise_bootstrap: int = 1000  # resamples of the valid sentences for the noise floor (and of the paired test)
    finetune_steps: tuple = (250, 500, 1000)  # from the supernet's weights, one run continued to each in turn
    finetune_lr: float = 5e-4  # reproduce.py's finetuning recipe
    finetune_warmup: int = 100
    scratch_steps: tuple = (250, 500, 1000, 1500)  # the same arch from scratch; 1,500 = gap.py's standalone budget
    test_sentences: int = 0  # BLEU on the first N test sentences; 0 = all
    data_source: str = ""  # where train.py prepares the corpus from if it is not prepared (folder, URL, tarball)
    extra: tuple = ("--max_minutes=0", "--bleu_sentences=-1")  # train.py flags for every run (as gap.py's)


PRESETS = {
    "multi30k": dict(),
    # the synthetic task on the tiny space, on gap.py's toy supernets: every stage in seconds (tests). Budgets at
    # the 50th and 90th percentiles: a predictor fit on 12 subnets timed 3 times predicted even the fastest subnet
    # above the 25th percentile of the measured ones once, and the search rightly refused that budget
    "toy": dict(gap="out_gap_toy", arms=("hat", "neuron"), percentiles=(50, 90), latency_n=12, latency_warmup=1,
                latency_iters=2, threads=1, remeasure_rounds=2, remeasure_iters=2, noise_bootstrap=50,
                finetune_steps=(4, 8), finetune_lr=1e-3, finetune_warmup=2, scratch_steps=(4, 8), test_sentences=30,
                extra=("--preset=toy", "--bleu_sentences=-1", "--save_interval=0", "--eval_interval=1000")),
}
# the settings' checks (check_settings): numbers >= 0 but these, and the choices
BOUNDS = dict(latency_n=12, latency_iters=1, threads=1, remeasure_sessions=1, remeasure_rounds=1, remeasure_iters=1,
              noise_bootstrap=1)
CHOICES = dict(until=("latency", "supernets", "scratch", "all"))


# -----------------------------------------------------------------------------
# Training to several step counts in one run


def train_curve(folder: Path, flags, steps) -> dict:
    """train.py in `folder` up to each of `steps` in turn, as one run resumed with a larger --max_steps each time.
    The learning rate (inverse square root after warm-up) does not depend on max_steps and a resumed run continues
    exactly, so the model after S steps is the model of a run of S steps. Each S's results.json and translations
    are kept as results_stepS.json and hyps_test_stepS.txt. Returns S -> the test scores."""
    scores = {}
    for s in steps:
        kept = folder / f"results_step{s}.json"
        if not kept.exists():  # (a results.json already there is this step count's, tested but not yet renamed)
            train_stage(folder, [*flags, f"--max_steps={s}"])  # resumes from the previous step count's checkpoint
            record_files(folder, FRONTS_FILES)  # what this function keeps beside train.py's files
            if (folder / "hyps_test_model.txt").exists():  # (a stop between the two renames has moved it)
                os.replace(folder / "hyps_test_model.txt", folder / f"hyps_test_step{s}.txt")
            os.replace(folder / "results.json", kept)
        scores[s] = read_json(kept, "results")["model"]
    return scores


def arch_name(arch: ArchConfig) -> str:
    """A short stable name for an arch (its scratch-training folder): 8 hex digits of its JSON's SHA-1."""
    return hashlib.sha1(json_key(arch).encode()).hexdigest()[:8]


# what fronts.py writes in train.py's run folders (arch.json: folders from before the arch files moved to archs/)
FRONTS_FILES = ("results_step*.json", "hyps_test_step*.txt", "arch.json")


def arch_file(out: Path, folder: Path) -> Path:
    """The arch file a run folder trains (out/archs/<folder>.json): outside the folder, since train.py never
    writes where its inputs are."""
    return out / "archs" / f"{folder.name}.json"


def write_arch(out: Path, folder: Path, arch: dict):
    """Write the arch file of a run folder (arch_file)."""
    arch_file(out, folder).parent.mkdir(exist_ok=True)
    write_json(arch_file(out, folder), arch)


def scratch_folder(out: Path, arch: dict) -> Path:
    """Where an arch (its JSON dict) is trained from scratch: one folder per arch, shared by the winners that are it."""
    return out / f"scratch_{arch_name(ArchConfig.from_dict(arch))}"


def budgets_of(latency_csv: Path, percentiles) -> list:
    """The latency budgets, in ms rounded to 2 decimals: these percentiles of the measured latencies (median_ms) of
    the random subnets in stage 1's latency dataset, so that every budget excludes part of the space."""
    measured = latency.read_latency_csv(latency_csv)[1]
    return [round(float(np.percentile(measured, q)), 2) for q in percentiles]


# -----------------------------------------------------------------------------
# A supernet whose checkpoint is gone


TIMING_KEYS = ("tok_per_s", "train_seconds", "decode_seconds")  # differ between two runs of the same training


def supernet_checkpoint(gap_run: Path, out: Path) -> Path:
    """The checkpoint of gap.py's supernet run `gap_run`: its own if it is still there, else the same run trained
    again into out/<its name> from the settings it stored (config.json). Checkpoints stay out of git, so a fresh
    checkout has none. Training is seeded throughout, so the second run should repeat the first: regenerated.json
    compares their training logs and test losses (on another kind of machine, float rounding may part them)."""
    if (gap_run / "ckpt.pt").exists():
        return gap_run / "ckpt.pt"
    folder = out / gap_run.name
    if not (folder / "ckpt.pt").exists():  # (a run regenerated in an earlier checkout: its evidence, no checkpoint)
        for name in ("results.json", "regenerated.json"):
            (folder / name).unlink(missing_ok=True)
    stored = read_json(gap_run / "config.json", "training settings")
    as_flag = lambda k, v: f"--{k}={v}" if literal(str(v)) == v else f"--{k}={v!r}"  # '1' a string
    train_stage(folder, [as_flag(k, v) for k, v in stored.items() if k not in ("out_dir", "resume")])
    if not (folder / "regenerated.json").exists():
        write_json(folder / "regenerated.json", compare_runs(gap_run, folder))
    return folder / "ckpt.pt"


def compare_runs(first: Path, second: Path) -> dict:
    """How far two runs of one training setting part: every number of their training logs (step by step) and of
    their results.json, timings left out. identical = not one number differs."""
    def numbers(record, prefix=""):
        """{'largest.loss': 2.33, ...}: every number of a (nested) record, by its path."""
        flat = {}
        for k, v in record.items():
            if isinstance(v, dict):
                flat.update(numbers(v, f"{prefix}{k}."))
            elif isinstance(v, (int, float)) and k not in TIMING_KEYS:
                flat[prefix + k] = v
        return flat

    logs = [read_jsonl(run / "train_log.jsonl") for run in (first, second)]
    pairs = [(f"train_log step {a.get('step')}", numbers(a), numbers(b)) for a, b in zip(*logs)]
    pairs.append(("results.json", *(numbers(read_json(run / "results.json", "results")) for run in (first, second))))
    diffs = [(where, key, abs(a[key] - b[key])) for where, a, b in pairs for key in sorted(a.keys() & b.keys())]
    first_diff = next(((where, key) for where, key, d in diffs if d), None)
    return dict(first=str(first), second=str(second), records=len(pairs), same_length=len(logs[0]) == len(logs[1]),
                numbers=len(diffs), identical=len(logs[0]) == len(logs[1]) and first_diff is None,
                max_abs_diff=max((d for *_, d in diffs), default=0.0),
                first_difference=" ".join(first_diff) if first_diff else None)


# -----------------------------------------------------------------------------
# The fitness noise floor


@torch.inference_mode()
def sentence_losses(model, corpus, split: str, max_tokens: int):
    """(loss sums (N,), target tokens (N,)) of every sentence of a split, nats, no smoothing (search's fitness is
    loss sums / tokens over the split)."""
    src, tgt = corpus.splits[split]
    sums, ntok = np.zeros(len(src)), np.zeros(len(src))
    batcher = TokenBatcher([len(s) for s in src], [len(t) for t in tgt], max_tokens, shuffle=False)
    for idx in batcher.batches(0):
        s, tgt_in, tgt_out = collate(src, tgt, idx)  # (B, S), (B, T), (B, T)
        logits = model(s, tgt_in)  # (B, T, V)
        nll = F.cross_entropy(logits.transpose(1, 2), tgt_out, ignore_index=PAD, reduction="none")  # (B, T)
        sums[idx], ntok[idx] = nll.sum(1).numpy(), (tgt_out != PAD).sum(1).numpy()
    return sums, ntok


def noise_floor(supernet, winners: list, corpus, max_tokens: int, n_boot: int, seed=0) -> dict:
    """How much of a fitness difference is noise. Evaluation is dropout-free, so a repeat differs only by the batching
    (float rounding): `rebatched_delta`. The valid split is a sample of sentences: `bootstrap_std` of each winner's
    loss over resampled sentences, and the paired std and 95% interval of (last winner - first winner), both winners
    scored on the same resampled sentences."""
    rng = np.random.default_rng(seed)
    models = [supernet.subnet(ArchConfig.from_dict(w["arch"])).eval() for w in winners]
    losses = [sentence_losses(m, corpus, "valid", max_tokens) for m in models]  # per winner: (N,), (N,)
    n = len(losses[0][0])
    resamples = rng.integers(0, n, (n_boot, n))  # (n_boot, N) sentence indices
    boot = np.array([[s[i].sum() / t[i].sum() for i in resamples] for s, t in losses])  # (winners, n_boot)
    full = [float(s.sum() / t.sum()) for s, t in losses]
    rebatched = train.valid_loss(models[0], split_batches(corpus, "valid", max_tokens // 4, "cpu"))
    diff = boot[-1] - boot[0]  # (n_boot,) paired: the same sentences for both
    return dict(valid_loss=full, bootstrap_std=[float(b.std()) for b in boot],
                rebatched_delta=abs(rebatched - full[0]), paired_diff=full[-1] - full[0], paired_std=float(diff.std()),
                paired_ci=[float(v) for v in np.percentile(diff, (2.5, 97.5))], n_sentences=n, n_boot=n_boot)


# -----------------------------------------------------------------------------
# The report


def scores_of(folder: Path, steps) -> dict:
    """S -> test scores of every step count that has finished in a train_curve folder."""
    return {s: read_json(folder / f"results_step{s}.json", "results")["model"]
            for s in steps if (folder / f"results_step{s}.json").exists()}


def report(out: Path, cfg: FrontsConfig, rows, noise, sessions, corpus, panel):
    """fronts.json, fronts.md, fronts.png and steps.png from the finished stages."""
    across = latency_across_sessions(sessions, panel)
    for r in rows:  # the interleaved measurement: every session's figure, the first one plotted
        r["interleaved_sessions_ms"] = across[r["name"]]["ms"] if r["name"] in across else []
        r["interleaved_ms"] = r["interleaved_sessions_ms"][0] if r["interleaved_sessions_ms"] else None
    refs = corpus.refs["test"][:cfg.test_sentences or len(corpus.refs["test"])]  # the sentences every run scored
    checks = [budget_check(cfg, arm, [r for r in rows if r["arm"] == arm], noise.get(arm), sessions, refs, out)
              for arm in cfg.arms if sum(r["arm"] == arm for r in rows) > 1]
    retraining = retraining_check(cfg, rows, refs, out)
    write_json(out / "fronts.json", dict(settings=asdict(cfg), machine=machine(), winners=rows, noise=noise,
                                         remeasure_sessions=sessions, latency_across_sessions=across,
                                         budget_checks=checks, retraining=retraining))
    write_markdown(out / "fronts.md", cfg, rows, noise, sessions, checks, across, retraining)
    plot(out, cfg, rows, sessions, panel)


def latency_across_sessions(sessions, panel) -> dict:
    """Per arch timed in the interleaved sessions: its ms and its ratio to the round's reference in each session,
    with their spreads ((max - min) / median) over sessions; for a panel arch also gap.py's figure (`panel_ms`)."""
    earlier = {e["name"]: e["latency_ms"] for e in panel}
    across = {}
    for name in (sessions[0]["models"] if sessions else {}):
        ms = [s["models"][name]["median_ms"] for s in sessions if name in s["models"]]
        ratio = [s["models"][name]["ratio_to_reference"] for s in sessions if name in s["models"]]
        every = ms + ([earlier[name]] if name in earlier else [])
        across[name] = dict(panel_ms=earlier.get(name), ms=ms, ratio=ratio, ms_spread=spread(every),
                            ratio_spread=spread(ratio))
    return across


def budget_check(cfg, arm, rows, noise, sessions, refs, out) -> dict:
    """The acceptance: is the highest budget's winner measurably slower, and no worse within noise, than the
    lowest's? Slower: its time over the lowest winner's, per interleaved round (all rounds of all sessions).
    No worse: the valid-loss difference against its paired bootstrap interval, and test BLEU (inherited and after
    the longest finetuning) with sacrebleu's paired bootstrap."""
    lo, hi = rows[0], rows[-1]
    ratios = [h / l for s in sessions if lo["name"] in s["models"]
              for h, l in zip(s["models"][hi["name"]]["rounds_ms"], s["models"][lo["name"]]["rounds_ms"])]
    check = dict(arm=arm, low=lo["name"], high=hi["name"], same_arch=lo["arch"] == hi["arch"],
                 slower_ratio_median=float(np.median(ratios)) if ratios else None,
                 slower_ratio_min=float(min(ratios)) if ratios else None,
                 slower_rounds=[sum(q > 1 for q in ratios), len(ratios)])  # in how many rounds it was slower
    if noise:
        check.update(valid_loss_diff=noise["paired_diff"], valid_loss_diff_ci=noise["paired_ci"])
    for step in (0, cfg.finetune_steps[-1]):
        files = [out / f"finetune_{r['name']}" / f"hyps_test_step{step}.txt" for r in (lo, hi)]
        if all(f.exists() for f in files):
            test = paired_bootstrap({"low": read_lines(files[0]), "high": read_lines(files[1])}, refs,
                                    cfg.noise_bootstrap)
            check[f"bleu_step{step}"] = dict(low=test["low"]["bleu"], high=test["high"]["bleu"],
                                             p_value=test["high"]["p_value"])
    return check


def retraining_check(cfg, rows, refs, out) -> list:
    """The retraining saving, per winner whose arch has finished its full scratch run (the last of scratch_steps,
    the standalone budget): its test BLEU inherited and after each finetuning step count minus that run's, each with
    sacrebleu's paired bootstrap against the scratch run's translations (the same test sentences), and the fewest
    finetuning steps that reach the scratch run's BLEU (None: not within the longest finetuning)."""
    full = cfg.scratch_steps[-1]
    checks = []
    for r in rows:
        scratch_hyps = scratch_folder(out, r["arch"]) / f"hyps_test_step{full}.txt"
        if full not in r["scratch"] or not scratch_hyps.exists():
            continue
        steps = [s for s in (0, *cfg.finetune_steps) if s in r["finetune"]]
        systems = {"scratch": read_lines(scratch_hyps)}
        systems.update({f"ft {s}": read_lines(out / f"finetune_{r['name']}" / f"hyps_test_step{s}.txt")
                        for s in steps})
        test = paired_bootstrap(systems, refs, cfg.noise_bootstrap)  # each finetuning point against the scratch run
        target = r["scratch"][full]["bleu"]
        reached = [s for s in steps if r["finetune"][s]["bleu"] >= target]
        checks.append(dict(name=r["name"], arm=r["arm"], scratch_steps=full, scratch_bleu=target,
                           steps_to_scratch=min(reached) if reached else None,
                           minus_scratch={s: r["finetune"][s]["bleu"] - target for s in steps},
                           p_value={s: test[f"ft {s}"]["p_value"] for s in steps}))
    return checks


def write_markdown(path: Path, cfg, rows, noise, sessions, checks, across, retraining):
    """The tables of fronts.md: the winners, the noise floor, the budget checks, the retraining saving and the
    latency across sessions."""
    f1 = lambda x: "" if x is None else f"{x:.1f}"
    f2 = lambda x: "" if x is None else f"{x:.2f}"
    lines = ["| arm | percentile | budget ms | predicted ms | search re-measured ms | interleaved ms (sessions) | "
             "params (no emb.) | valid loss | " + " | ".join(f"BLEU ft {s}" for s in (0, *cfg.finetune_steps))
             + " | " + " | ".join(f"BLEU scratch {s}" for s in cfg.scratch_steps) + " |",
             "|---" * (8 + 1 + len(cfg.finetune_steps) + len(cfg.scratch_steps)) + "|"]
    for r in rows:
        ft = [f2(r["finetune"].get(s, {}).get("bleu")) for s in (0, *cfg.finetune_steps)]
        sc = [f2(r["scratch"].get(s, {}).get("bleu")) for s in cfg.scratch_steps]
        lines.append(f"| {r['arm']} | {r['percentile']} | {r['budget_ms']:.1f} | {f1(r['predicted_ms'])} | "
                     f"{r['measured_ms']:.1f} | {' / '.join(f'{m:.1f}' for m in r['interleaved_sessions_ms'])} | "
                     f"{r['params_no_emb'] / 1e6:.2f}M | {r['valid_loss']:.4f} | {' | '.join(ft)} | "
                     f"{' | '.join(sc)} |")
    lines += ["", "Fitness noise floor (valid split, nats/token): a winner evaluated under another batching, the "
                  "bootstrap std over valid sentences, and the highest budget's winner minus the lowest's (paired)", "",
              "| arm | rebatched delta | bootstrap std | paired diff | paired 95% interval |", "|---|---|---|---|---|"]
    lines += [f"| {arm} | {n['rebatched_delta']:.1e} | {max(n['bootstrap_std']):.4f} | {n['paired_diff']:+.4f} | "
              f"[{n['paired_ci'][0]:+.4f}, {n['paired_ci'][1]:+.4f}] |" for arm, n in noise.items()]
    lines += ["", "Highest against lowest budget, per arm", "",
              "| arm | same arch | slower: ms ratio, median [min] over rounds (rounds slower) | "
              "valid loss diff [95%] | inherited BLEU low / high (p) | finetuned BLEU low / high (p) |",
              "|---|---|---|---|---|---|"]
    for c in checks:
        bleu = lambda key: (f"{c[key]['low']:.2f} / {c[key]['high']:.2f} (p = {c[key]['p_value']:.3f})"
                            if key in c and c[key]["p_value"] is not None else "")
        ci = c.get("valid_loss_diff_ci")
        slower = (f"{f2(c['slower_ratio_median'])} [{f2(c['slower_ratio_min'])}] "
                  f"({c['slower_rounds'][0]} of {c['slower_rounds'][1]})")
        lines.append(f"| {c['arm']} | {c['same_arch']} | {slower} | {c.get('valid_loss_diff', float('nan')):+.4f}"
                     + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "") + f" | {bleu('bleu_step0')} | "
                     f"{bleu(f'bleu_step{cfg.finetune_steps[-1]}')} |")
    if retraining:
        steps = (0, *cfg.finetune_steps)
        lines += ["", f"Retraining: test BLEU finetuned from the supernet minus the same arch from scratch for "
                      f"{cfg.scratch_steps[-1]} steps (paired bootstrap p), and the fewest finetuning steps that "
                      f"reach it", "",
                  "| winner | scratch BLEU | " + " | ".join(f"ft {s} minus scratch" for s in steps)
                  + " | steps to reach scratch |", "|---" * (3 + len(steps)) + "|"]
        for c in retraining:
            cells = [f"{c['minus_scratch'][s]:+.2f} (p = {c['p_value'][s]:.3f})" if s in c["minus_scratch"] else ""
                     for s in steps]
            reach = f"> {cfg.finetune_steps[-1]}" if c["steps_to_scratch"] is None else str(c["steps_to_scratch"])
            lines.append(f"| {c['name']} | {c['scratch_bleu']:.2f} | {' | '.join(cells)} | {reach} |")
        means = []  # per arm, over its winners with a full scratch run: the mean of each column
        for arm in cfg.arms:
            mine = [c for c in retraining if c["arm"] == arm]
            cols = [f"ft {s} {np.mean([c['minus_scratch'][s] for c in mine]):+.2f}" for s in steps
                    if mine and all(s in c["minus_scratch"] for c in mine)]
            if cols:
                means.append(f"{arm} ({len(mine)} winners): {', '.join(cols)}")
        lines += ["", "Mean minus scratch per arm: " + "; ".join(means)]
    if sessions:
        lines += ["", "Latency across sessions, ms (ratio to arch0 of the same round); the panel's first figure is "
                      "gap.py's, measured one arch after the other when the panel was chosen", "",
                  "| arch | panel.json | " + " | ".join(f"session {i + 1}" for i in range(len(sessions)))
                  + " | spread of ms (all figures) | spread of ratio |", "|---" * (4 + len(sessions)) + "|"]
        lines += [f"| {name} | {f1(a['panel_ms'])} | " + " | ".join(
                  f"{m:.1f} (x{q:.2f})" for m, q in zip(a["ms"], a["ratio"])) +
                  f" | {a['ms_spread']:.1%} | {a['ratio_spread']:.1%} |" for name, a in across.items()]
    for i, s in enumerate(sessions):
        lines.append(f"\nInterleaved session {i + 1}: {s['time']}, {s['machine']}, load {s['before']['load_1min']} "
                     f"before / {s['after']['load_1min']} after" + "".join(f"; warning: {w}" for w in s["warnings"]))
    with atomic_open(path) as f:
        f.write("\n".join(lines) + "\n")


def plot(out: Path, cfg, rows, sessions, panel):
    """fronts.png: interleaved latency against test BLEU, inherited (dashed) and finetuned (solid) per arm, with the
    gap panel's standalone archs; steps.png: test BLEU against training steps, finetuned and from scratch."""
    plt = pyplot()  # headless
    colours = dict(zip(ARMS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    last = cfg.finetune_steps[-1]
    fig, ax = plt.subplots(figsize=(7, 5))
    for e in panel:
        result = Path(cfg.gap) / "standalone" / e["name"] / "results.json"
        if result.exists():  # at the latency measured beside the winners
            ms = sessions[0]["models"][e["name"]]["median_ms"] if sessions else e["latency_ms"]
            steps = read_json(result.with_name("config.json"), "settings")["max_steps"]  # the runs' own count
            ax.scatter(ms, read_json(result, "results")["model"]["bleu"], color="grey", marker="x",
                       label=f"gap panel, standalone {steps:,} steps" if e["name"] == "arch0" else None)
    for arm in cfg.arms:
        mine = [r for r in rows if r["arm"] == arm and r["interleaved_ms"] is not None]
        for step, style in ((0, "--"), (last, "-")):
            points = sorted((r["interleaved_ms"], r["finetune"][step]["bleu"]) for r in mine if step in r["finetune"])
            if points:
                ax.plot(*zip(*points), style, marker="o", color=colours[arm],
                        label=f"{arm}, {'inherited' if step == 0 else f'finetuned {step} steps'}")
    ax.set(xlabel="latency, ms (interleaved re-measurement)", ylabel="test BLEU", title="latency against BLEU")
    ax.legend(fontsize=7)
    fig.savefig(out / "fronts.png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    fig, axes = plt.subplots(1, len(cfg.arms), figsize=(4 * len(cfg.arms), 4), sharey=True, squeeze=False)
    markers = dict(zip(cfg.percentiles, "os^vD<>"))
    for ax, arm in zip(axes[0], cfg.arms):
        for r in (r for r in rows if r["arm"] == arm):
            for curve, style, how in ((r["finetune"], "-", "finetuned"), (r["scratch"], ":", "from scratch")):
                points = sorted((s, v["bleu"]) for s, v in curve.items())
                if points:
                    ax.plot(*zip(*points), style, marker=markers[r["percentile"]], color=colours[arm],
                            alpha=1.0 if how == "finetuned" else 0.5, label=f"p{r['percentile']}, {how}")
        ax.set(title=arm, xlabel="training steps (0 = inherited)")
        ax.legend(fontsize=6)
    axes[0][0].set(ylabel="test BLEU")
    fig.suptitle("retraining: finetuned from the supernet (solid) against from scratch (dotted)", y=1.03)  # above
    # the panels' own titles
    fig.savefig(out / "steps.png", dpi=150, bbox_inches="tight")
    plt.close(fig)


# -----------------------------------------------------------------------------
# The stages in order


@releases_locks
def main(argv):
    """Run every stage that has not finished, then the report."""
    cfg = parse_settings(FrontsConfig, argv, presets=PRESETS)
    check_settings(cfg, BOUNDS, CHOICES)
    if [arm for arm in cfg.arms if arm not in ARMS] or not cfg.arms:
        raise SystemExit(f"error: --arms={list(cfg.arms)}; give one or more arms of {list(ARMS)}")
    if sorted(set(cfg.percentiles)) != list(cfg.percentiles) or not all(1 <= q <= 99 for q in cfg.percentiles):
        raise SystemExit(f"error: --percentiles={list(cfg.percentiles)}; give increasing integers 1-99, "
                         f"e.g. [25,50,75]")
    if cfg.until == "scratch" and not cfg.scratch:
        raise SystemExit("error: --until=scratch with --scratch=False has no stage to run; drop one of the two")
    for name in ("finetune_steps", "scratch_steps"):
        steps = getattr(cfg, name)
        if not steps or sorted(set(steps)) != list(steps) or steps[0] < 1:
            raise SystemExit(f"error: --{name}={list(steps)}; give increasing positive step counts, e.g. [250,500]")
    extra = [*cfg.extra, *([f"--data_source={cfg.data_source}"] if cfg.data_source else [])]
    run = parse_settings(train.TrainConfig, extra, presets=train.PRESETS)  # a bad train.py flag fails now
    gap, out, toy = Path(cfg.gap), Path(cfg.out), cfg.preset == "toy"
    if not (gap / "panel.json").exists():
        raise SystemExit(f"error: {gap / 'panel.json'} not found: run gap.py first, or pass --gap=FOLDER")
    panel_file = read_json(gap / "panel.json", "panel")
    space, panel = panel_file["space"], panel_file["panel"]  # the gap experiment's space and archs
    lock_folder(out)  # one writer per folder
    write_json(out / "settings.json", asdict(cfg))
    corpus = load_data(run.data, run.data_dir, run.data_source, run.seed)
    threads = torch.get_num_threads()  # latency.py and search.py pin their own thread count

    # 1. the latency dataset (random weights, quiet machine) and the predictor; its percentiles are the budgets
    predictor = out / "predictor.json"
    if not predictor.exists():
        data = [f"--space={space}", f"--src_vocab={len(corpus.src_vocab)}", f"--tgt_vocab={len(corpus.tgt_vocab)}",
                f"--out={out / 'latency.csv'}", f"--predictor={predictor}", f"--threads={cfg.threads}"]
        quick = TOY_LATENCY if toy else (f"--warmup={cfg.latency_warmup}", f"--iters={cfg.latency_iters}")
        latency.main(["dataset", *data, f"--n={cfg.latency_n}", *quick])
        latency.main(["fit", *data, *quick])
        torch.set_num_threads(threads)
    budgets = budgets_of(out / "latency.csv", cfg.percentiles)
    print(f"budgets: percentiles {list(cfg.percentiles)} of the measured random subnets -> {budgets} ms")
    if cfg.until == "latency":
        return dict(zip(cfg.percentiles, budgets))
    runs = {arm: gap / f"supernet_{arm}_s{cfg.seed}" for arm in cfg.arms}
    missing = [str(run) for run in runs.values() if not inherited_scores(run, panel)[1]]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not trained and scored yet: run gap.py first "
                         f"(--seeds=[{cfg.seed}] suffices)")

    # 2, 3 and 5a, arm by arm: everything that needs the arm's supernet, so that it is loaded (or, where its
    # checkpoint is gone, trained again) once, and a stop loses at most one arm's supernet
    n_valid = len(corpus.splits["valid"][0])
    train_flags = [*extra, f"--space={space}", f"--test_sentences={cfg.test_sentences}"]
    path = out / "noise.json"
    noise = read_json(path, "noise") if path.exists() else {}
    winners = {}
    for arm in cfg.arms:
        search_dir = out / f"search_{arm}"
        done = (search_dir / "results.json").exists() and arm in noise and all(
            (out / f"finetune_{arm}_p{q}" / f"results_step{s}.json").exists()
            for q in cfg.percentiles for s in (0, *cfg.finetune_steps))
        ckpt = None if done else supernet_checkpoint(runs[arm], out)  # (finished arms need no supernet)
        # 2. the search: the same budgets for every arm, fitness on the full valid split
        if not (search_dir / "results.json").exists():
            search.main([f"--ckpt={ckpt}", f"--predictor={predictor}", f"--out_dir={search_dir}",
                         f"--budgets=[{','.join(repr(b) for b in budgets)}]",
                         f"--threads={cfg.threads}", *(TOY_SEARCH if toy else ()), f"--valid_sentences={n_valid}"])
            torch.set_num_threads(threads)
        found = read_json(search_dir / "results.json", "search results")["results"]
        winners[arm] = [dict(arm=arm, name=f"{arm}_p{q}", percentile=q, **{k: r[k] for k in (
            "budget_ms", "arch", "valid_loss", "predicted_ms", "measured_ms", "params_no_emb")})
            for q, r in zip(cfg.percentiles, found)]
        if done:
            continue
        supernet = train.model_from_checkpoint(train.load_checkpoint(ckpt)).eval()
        # 3. the fitness noise floor
        if arm not in noise:
            noise[arm] = noise_floor(supernet, [winners[arm][0], winners[arm][-1]], corpus, run.max_tokens,
                                     cfg.noise_bootstrap)
            write_json(path, noise)
        # 5a. every winner with inherited weights (0 steps: cut from the supernet, scored as is), then finetuned
        for w in winners[arm]:
            folder = out / f"finetune_{w['name']}"
            if not (folder / "results_step0.json").exists():
                # train_curve's run folder (train.py's), with the step-0 scores beside its own files
                claim_folder(folder, "train.py", {}, legacy=("config.json",), also=FRONTS_FILES)
                write_arch(out, folder, w["arch"])
                result = train.evaluate(supernet.subnet(ArchConfig.from_dict(w["arch"])), corpus, "test",
                                        torch.device("cpu"), run.max_tokens, cfg.test_sentences, run.beam,
                                        run.lenpen, hyps_path=folder / "hyps_test_step0.txt")
                write_json(folder / "results_step0.json", dict(split="test", model=result))
        del supernet
        for w in winners[arm]:
            folder = out / f"finetune_{w['name']}"
            train_curve(folder, [*train_flags, f"--arch={arch_file(out, folder)}", f"--init={ckpt}",
                                 f"--lr={cfg.finetune_lr}", f"--warmup={cfg.finetune_warmup}"], cfg.finetune_steps)
    rows = [w for ws in winners.values() for w in ws]
    if cfg.until == "supernets":  # e.g. one arm whose supernet is here now; the rest wants every arm's winners
        return rows

    # 5b. the same archs from scratch (no supernet needed: the arms given, as soon as their winners are known)
    for w in rows if cfg.scratch else ():  # an arch that several winners share is trained from scratch once
        folder = claim_folder(scratch_folder(out, w["arch"]), "train.py", {}, legacy=("config.json",),
                              also=FRONTS_FILES)  # train.py's run folder, with train_curve's results beside
        write_arch(out, folder, w["arch"])
        train_curve(folder, [*train_flags, f"--arch={arch_file(out, folder)}"], cfg.scratch_steps)
    if cfg.until == "scratch":
        return rows

    # 4. every winner timed side by side, once per session
    path = out / "remeasure.jsonl"
    sessions = read_jsonl(path) if path.exists() else []
    if len(sessions) < cfg.remeasure_sessions:
        archs = {e["name"]: e["arch"] for e in panel}  # arch0, the space's smallest, leads every round
        archs.update({w["name"]: w["arch"] for w in rows})
        models = {name: Transformer(ArchConfig.from_dict(a), len(corpus.src_vocab), len(corpus.tgt_vocab),
                                    SPACES[space].qkv_dim).eval() for name, a in archs.items()}
        r = measure_interleaved(models, panel[0]["name"], cfg.remeasure_rounds, cfg.latency_warmup,
                                cfg.remeasure_iters, threads=cfg.threads)
        append_jsonl(path, dict(r, machine=machine(), time=r["before"]["time"]))
        sessions = read_jsonl(path)
        torch.set_num_threads(threads)

    for w in rows:
        w["finetune"] = scores_of(out / f"finetune_{w['name']}", (0, *cfg.finetune_steps))
        w["scratch"] = scores_of(scratch_folder(out, w["arch"]), cfg.scratch_steps)

    # 6. the report
    report(out, cfg, rows, noise, sessions, corpus, panel)
    print(f"fronts complete -> {out}/fronts.md, fronts.png, steps.png")
    return rows


if __name__ == "__main__":
    run(main)
