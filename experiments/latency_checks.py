"""
Latency checks the experiments make beyond latency.py: subnets timed side by side, and latency.py's predictor recipe
benchmarked on HAT's published latency datasets.

    python experiments/latency_checks.py remeasure --space=cpu_wide --archs=[a.json,b.json] --log=remeasure.jsonl
    python experiments/latency_checks.py hat        # HAT's CSVs in --hat_dir -> hat_benchmark.json beside --predictor

  * `remeasure`: --archs (JSON arch files or largest | smallest | middle) timed in interleaved rounds, each round
    led by --reference (measure_interleaved): a busy or drifting machine then slows all of them alike, so their
    ratios to the reference hold where single figures taken at different times do not. fronts.py's stage 4 uses it.
  * `hat`: latency.fit_predictor (linear against HAT's MLP, the same split) on each of HAT's 2,000-subnet CSVs.
Settings are latency.py's (LatencyConfig) plus those of ChecksConfig below, changed with --key=value; the first
bare word is the command.
"""

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python experiments/latency_checks.py` can import the core
import latency  # noqa: E402
from runs.files import brief, releases_locks, writable_folder, write_json  # noqa: E402
from latency import fit_predictor, measure_latency, protocol_args, subnet_maker  # noqa: E402
from runs.machine import busy_warning, machine_state  # noqa: E402
from mos import FEATURE_NAMES, ArchConfig  # noqa: E402
from runs.settings import check_settings, get_device, parse_settings, read_arch  # noqa: E402
from runs.signals import run  # noqa: E402

DRIFT = 0.10  # the reference subnet's spread over rounds above which the machine changed during a measurement
COMMANDS = ("remeasure", "hat")


@dataclass
class ChecksConfig(latency.LatencyConfig):
    """latency.py's settings (what is timed, the protocol, --log, --predictor) and these."""
    command: str = "remeasure"  # remeasure | hat
    # remeasure: several subnets interleaved in rounds, each round led by a fixed reference subnet
    archs: tuple = ()  # JSON arch files or largest | smallest | middle
    reference: str = "smallest"
    rounds: int = 5
    # hat: the folder of HAT's published latency CSVs
    hat_dir: str = str(ROOT.parent / "shared" / "data" / "hat-latency")


BOUNDS = dict(latency.BOUNDS, rounds=1)  # the settings' checks (runs.settings.check_settings): latency.py's, and rounds >= 1


# -----------------------------------------------------------------------------
# Side-by-side (interleaved) measurement


def spread(values) -> float:
    """(max - min) / median: how far repeated figures of one thing disagree."""
    return float((max(values) - min(values)) / np.median(values))


def measure_interleaved(models: dict, reference: str, rounds=5, warmup=20, iters=20, measure=None, log=print,
                        **protocol) -> dict:
    """Latency of several plain models measured side by side, so that a busy or drifting machine hits them all
    alike: after one warm-up each, `rounds` round-robin passes time every model once (`iters` runs, median), the
    reference model first. Per model: the median over rounds of its ms and of its ratio to the same round's
    reference, and their spreads ((max - min) / median). Warns when other work loads the cores or the reference
    drifts by more than DRIFT. `measure` is latency.measure_latency unless a test passes a fake timer."""
    measure = measure or measure_latency
    threads = protocol.get("threads", 2)
    before = machine_state(threads)
    if reference not in models:
        raise SystemExit(f"error: reference {reference!r} is not one of the models {list(models)}")
    order = [reference] + [name for name in models if name != reference]
    for name in order:  # build oneDNN primitives and fill caches before any timed round
        measure(models[name], warmup=warmup, iters=1, **protocol)
    ms = {name: [] for name in order}  # name -> per-round median ms
    for _ in range(rounds):
        for name in order:
            ms[name].append(measure(models[name], warmup=1, iters=iters, **protocol)["median_ms"])
    after = machine_state(threads)
    results = {}
    for name in order:
        ratio = [m / r for m, r in zip(ms[name], ms[reference])]  # (rounds,) relative to the same round
        results[name] = dict(median_ms=float(np.median(ms[name])), spread=spread(ms[name]), rounds_ms=ms[name],
                             ratio_to_reference=float(np.median(ratio)), ratio_spread=spread(ratio))
    warnings = [busy] if (busy := busy_warning(before, after, threads)) else []
    if results[reference]["spread"] > DRIFT:
        warnings.append(f"the reference {reference!r} varied by {results[reference]['spread']:.0%} over {rounds} "
                        f"rounds: the machine's state changed during the measurement")
    for w in warnings:
        log(f"warning: {w}")
    return dict(reference=reference, rounds=rounds, iters=iters, before=before, after=after, warnings=warnings,
                models=results, protocol={k: str(v) for k, v in protocol.items()})


def cmd_remeasure(cfg: ChecksConfig) -> dict:
    """Time --archs side by side (measure_interleaved) under one machine state: the way to compare subnets measured
    for different searches or supernets. Latency depends on the shapes only, so random weights do."""
    if not cfg.archs:
        raise SystemExit("error: remeasure needs --archs=[a.json,b.json,...] (JSON arch files or largest|smallest)")
    space, make = subnet_maker(cfg)
    names = list(dict.fromkeys([cfg.reference, *cfg.archs]))  # the reference first, each arch once
    models = {name: make(read_arch(name, space, ArchConfig)) for name in names}
    timing = protocol_args(cfg)
    warmup, iters = timing.pop("warmup"), timing.pop("iters")
    r = measure_interleaved(models, cfg.reference, cfg.rounds, warmup, iters, **timing)
    for name, m in r["models"].items():
        print(f"{name}: {m['median_ms']:.1f} ms (spread {m['spread']:.0%} over {cfg.rounds} rounds) | "
              f"x{m['ratio_to_reference']:.2f} the reference (spread {m['ratio_spread']:.0%})")
    print(f"load average {r['before']['load_1min']} before, {r['after']['load_1min']} after | {cfg.protocol} protocol, "
          f"{cfg.device}, {cfg.threads} threads")
    if cfg.log:
        with open(cfg.log, "a") as f:
            f.write(json.dumps({**r, "ckpt": cfg.ckpt, "space": space.name}) + "\n")
    return r


# -----------------------------------------------------------------------------
# The predictor recipe on HAT's published latency datasets


def read_hat_csv(path):
    """(features (n, 10), latency ms (n,)) of one of HAT's latency CSVs, whose latency is the encoder's mean plus the
    decoder's and whose features are raw sizes (both predictors rescale them anyway); a CSV of `latency.py dataset`
    is read as latency.read_latency_csv reads it."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if "median_ms" in rows[0]:  # one of ours
            return latency.read_latency_csv(path)[:2]
        names = list(rows[0])[:len(FEATURE_NAMES)]
        return (np.array([[float(r[n]) for n in names] for r in rows]),
                np.array([float(r["latency_mean_encoder"]) + float(r["latency_mean_decoder"]) for r in rows]))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:  # missing, empty, not UTF-8, other columns
        raise SystemExit(f"error: cannot read latency CSV {path} ({brief(e, 100)}); give one that HAT (or "
                         f"`python latency.py dataset`) wrote")


def cmd_hat(cfg: ChecksConfig) -> dict:
    """The same recipe on HAT's published latency datasets (2000 subnets each) as an external benchmark; the test
    scores of both predictors per CSV go to hat_benchmark.json beside --predictor."""
    results = {}
    for path in sorted(Path(cfg.hat_dir).glob("*.csv")):
        X, y = read_hat_csv(path)
        _, report, _ = fit_predictor(X, y, cfg)
        results[path.stem] = report
        print(f"{path.stem:32s} " + " | ".join(f"{k} tau {s['kendall_tau']:.3f} RMSE {s['rmse_ms']:.1f} ms "
                                               f"rel {s['mean_rel_error']:.1%}" for k, s in report["test"].items())
              + f" | chosen {report['chosen']}")
    if not results:
        raise SystemExit(f"error: no CSV files in {cfg.hat_dir}; pass --hat_dir=FOLDER")
    out = Path(cfg.predictor).with_name("hat_benchmark.json")
    write_json(out, results)
    print(f"-> {out}")
    return results


@releases_locks
def main(argv):
    """Run one command; returns what it measured (for tests and notebooks)."""
    cfg = parse_settings(ChecksConfig, argv, command_field="command")
    check_settings(cfg, BOUNDS, latency.CHOICES)
    if cfg.command not in COMMANDS:
        raise SystemExit(f"error: unknown command {cfg.command!r}; use {' or '.join(COMMANDS)} (latency.py has "
                         f"measure, depth, dataset and fit)")
    get_device(cfg.device)
    for path in (cfg.log, cfg.predictor if cfg.command == "hat" else ""):
        if path:  # an output that cannot be written fails now, not after the measurements
            writable_folder(Path(path).parent)
    torch.set_num_threads(cfg.threads)
    return cmd_remeasure(cfg) if cfg.command == "remeasure" else cmd_hat(cfg)


if __name__ == "__main__":
    run(main)
