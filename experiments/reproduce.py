"""
The small-scale reproduction, stage by stage: MoS against HAT's weight sharing under latency budgets.

    python experiments/reproduce.py              # Multi30k on a CPU, every stage (a few hours on 2 cores)
    python experiments/reproduce.py --preset=toy --out=out_repro_toy    # the synthetic task, ~1 minute
    python -m experiments.reproduce --preset=toy --out=out_repro_toy    # the same, as a module

Stages, each one command of train.py / latency.py / search.py run in this process:
  1. train two supernets on the same budget: neuron-wise MoS (sandwich rule) and HAT (one expert, random sampling);
  2. measure a latency dataset on the MoS supernet's subnets and fit the latency predictor;
  3. evolutionary search under every latency budget, on each supernet;
  4. finetune every chosen subnet (its weights cut from its supernet), test BLEU with beam search;
  5. summary.json / summary.md / summary.png: latency against BLEU, MoS against HAT.

Rerun the same command after a crash, a kill or Ctrl-C: a stage whose output exists is skipped, a training stage
resumes from its checkpoint, the latency dataset and the search cache continue where they stopped.
Settings are the ReproConfig fields, changed with --key=value as in train.py.
"""

import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python experiments/reproduce.py` finds the core
import latency  # noqa: E402
import search  # noqa: E402
import train  # noqa: E402
from runs.files import atomic_open, lock_folder, read_json, releases_locks, write_json  # noqa: E402
from runs.plots import pyplot  # noqa: E402
from runs.settings import check_settings, parse_settings  # noqa: E402
from runs.signals import run  # noqa: E402
from runs import signals  # noqa: E402

# -----------------------------------------------------------------------------
# Settings


@dataclass
class ReproConfig:
    """Every setting of the command line; the defaults are the Multi30k CPU reproduction."""
    preset: str = "multi30k"  # multi30k | toy (see PRESETS)
    out: str = "out_repro"  # every stage writes below this folder
    budgets: tuple = (18.0, 27.0, 36.0)  # ms (search.py's defaults for the cpu space on 2 cores)
    latency_n: int = 300  # subnets in the latency dataset
    finetune_steps: int = 500  # updates for each chosen subnet, from its supernet's weights
    finetune_lr: float = 5e-4
    finetune_warmup: int = 100
    extra: tuple = ()  # more --key=value flags for every train.py stage, e.g. ["--max_minutes=30"]


PRESETS = {
    "multi30k": dict(),
    # the synthetic task on the tiny space: every stage in seconds (tests)
    "toy": dict(budgets=(1000.0,), latency_n=12, finetune_steps=20, finetune_lr=1e-3, finetune_warmup=5,
                extra=("--preset=toy", "--max_steps=60", "--bleu_sentences=-1", "--test_sentences=20",
                       "--save_interval=10")),
}
# the quick measurement and search settings of the toy preset (the multi30k preset uses the tools' defaults)
TOY_LATENCY = ("--iters=3", "--warmup=1", "--threads=1", "--mlp_steps=50")
TOY_SEARCH = ("--population=8", "--parents=2", "--mutations=3", "--crossovers=3", "--iterations=3",
              "--valid_sentences=100", "--threads=1", "--search_iters=2", "--final_iters=3", "--final_repeats=1")

SUPERNETS = {  # the two methods compared, as train.py flags
    "mos": ("--router=neuron", "--num_experts=2", "--sampling=sandwich"),
    "hat": ("--router=none", "--num_experts=1", "--sampling=random"),
}


# -----------------------------------------------------------------------------
# Stages


def train_stage(out_dir: Path, flags):
    """train.py into out_dir unless it has finished (results.json); resumes from its checkpoint if it has one."""
    if (out_dir / "results.json").exists():
        print(f"[done] {out_dir}")
        return
    resume = ["--resume=True"] if (out_dir / "ckpt.pt").exists() else []
    flags = list({flag.split("=", 1)[0]: flag for flag in flags}.values())  # a flag given twice: its last value
    print(f"[run] train.py {' '.join(flags)} --out_dir={shlex.quote(str(out_dir))} {' '.join(resume)}")
    train.main([*flags, f"--out_dir={out_dir}", *resume])
    if not (out_dir / "results.json").exists():  # Ctrl-C or SIGTERM: train.py saved its checkpoint and returned
        raise signals.Stopped(signals.received[-1]) if signals.received else SystemExit(
            f"stopped during {out_dir}; rerun the same command to continue")


@releases_locks
def main(argv):
    """Run every stage that has not finished yet, then write the summary."""
    cfg = parse_settings(ReproConfig, argv, presets=PRESETS)  # --preset first, then --key=value, as train.py
    check_settings(cfg, dict(latency_n=12), {})  # numbers >= 0, latency_n >= 12
    search.check_budgets(cfg.budgets)
    if not all(isinstance(flag, str) for flag in cfg.extra):
        raise SystemExit(f"error: --extra={list(cfg.extra)}; give train.py flags as strings, e.g. ['--max_steps=60']")
    parse_settings(train.TrainConfig, list(cfg.extra), presets=train.PRESETS)  # a bad train.py flag fails now
    out, toy = Path(cfg.out), cfg.preset == "toy"
    lock_folder(out)  # one writer per reproduction folder: a second reproduce.py here stops, naming this pid
    write_json(out / "settings.json", asdict(cfg))
    t0, threads = time.time(), torch.get_num_threads()  # latency.py and search.py pin their own thread count

    # 1. the supernets
    for name, flags in SUPERNETS.items():
        train_stage(out / f"supernet_{name}", [*cfg.extra, *flags])
    mos_ckpt = out / "supernet_mos" / "ckpt.pt"

    # 2. latency dataset (resumes by itself) and predictor, on the MoS supernet's extracted subnets
    predictor = out / "predictor.json"
    if not predictor.exists():
        data = [f"--ckpt={mos_ckpt}", f"--out={out / 'latency.csv'}", f"--predictor={predictor}"]
        quick = TOY_LATENCY if toy else ()
        latency.main(["dataset", *data, f"--n={cfg.latency_n}", *quick])
        latency.main(["fit", *data, *quick])
        torch.set_num_threads(threads)

    # 3. search each supernet under every budget (search.py's cache resumes a killed search)
    budgets = "[" + ",".join(f"{b:g}" for b in cfg.budgets) + "]"
    for name in SUPERNETS:
        folder = out / f"search_{name}"
        if not (folder / "results.json").exists():
            search.main([f"--ckpt={out / f'supernet_{name}' / 'ckpt.pt'}", f"--predictor={predictor}",
                         f"--budgets={budgets}", f"--out_dir={folder}", *(TOY_SEARCH if toy else ())])
            torch.set_num_threads(threads)

    # 4. finetune every chosen subnet from its supernet's weights
    rows = []
    for name in SUPERNETS:
        found = read_json(out / f"search_{name}" / "results.json", "search results")["results"]
        for r in found:
            budget = f"{r['budget_ms']:g}"
            folder = out / f"finetune_{name}_{budget}ms"
            train_stage(folder, [*cfg.extra, f"--arch={out / f'search_{name}' / f'arch_{budget}ms.json'}",
                                 f"--init={out / f'supernet_{name}' / 'ckpt.pt'}", f"--max_steps={cfg.finetune_steps}",
                                 f"--lr={cfg.finetune_lr}", f"--warmup={cfg.finetune_warmup}"])
            test = read_json(folder / "results.json", "finetuning results")["model"]
            rows.append(dict(supernet=name, budget_ms=r["budget_ms"], measured_ms=r["measured_ms"],
                             supernet_valid_loss=r["valid_loss"], test_bleu=test["bleu"], arch=r["arch"]))

    # 5. the summary
    write_summary(out, rows, cfg)
    print(f"reproduction complete in {time.time() - t0:.0f} s (this invocation) -> {out}/summary.md")
    return rows


def write_summary(out: Path, rows, cfg):
    """summary.json, a Markdown table and the latency-BLEU plot of the finetuned subnets."""
    write_json(out / "summary.json", dict(settings=asdict(cfg), rows=rows))
    lines = ["| supernet | budget (ms) | measured (ms) | supernet valid loss | test BLEU after finetuning |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['supernet']} | {r['budget_ms']:g} | {r['measured_ms']:.1f} | {r['supernet_valid_loss']:.4f} | "
              f"{r['test_bleu']:.2f} |" for r in rows]
    with atomic_open(out / "summary.md") as f:
        f.write("\n".join(lines) + "\n")
    plt = pyplot()  # headless
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in SUPERNETS:
        points = sorted((r["measured_ms"], r["test_bleu"]) for r in rows if r["supernet"] == name)
        if points:
            ax.plot(*zip(*points), marker="o", label=name.upper())
    ax.set(xlabel="measured latency, ms", ylabel="test BLEU after finetuning", title="latency against BLEU")
    ms = [r["measured_ms"] for r in rows] or [0.0]
    pad = max(0.05 * (max(ms) - min(ms)), 0.02 * max(ms), 0.1)  # winners a few microseconds apart stay readable
    ax.set_xlim(min(ms) - pad, max(ms) + pad)
    ax.ticklabel_format(axis="x", useOffset=False)  # plain ms on the axis, no "+2.5e1" offset
    ax.legend()
    fig.savefig(out / "summary.png", dpi=150, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    run(main)
