"""
Latency of a subnet, timed carefully; a latency dataset of random subnets; a latency predictor for the search.

What is timed: one dummy sentence of 23 tokens (IWSLT's mean length, HAT's choice) at batch size 1, translated with
`beam` = 5 hypotheses for exactly 23 decoder steps. Two protocols:
  * `beam` (the default): the real `mos.beam_search` call, forced to 23 output steps: what is deployed, with its
    bookkeeping (log-softmax, top-2K, finished hypotheses, KV-cache reordering). That bookkeeping is a larger share
    of a small subnet's time (measured: x1.63 HAT's figure for the smallest cpu subnet, x1.28 for the largest).
  * `hat`: HAT's model-only protocol: the encoder once, then 23 cached decoder steps over the beam with the output
    projection and no search bookkeeping; use it to compare with HAT's published numbers.
Timed unlike HAT: the extracted standalone subnet (MoS's mixing is done once, at extraction), eval() and
inference_mode() (HAT times dropout and autograd too), warm-up runs, perf_counter with CUDA synchronisation, a fixed
and recorded thread count, and the median with the IQR beside HAT's 10%-trimmed mean.

    python latency.py --space=cpu --arch=largest          # random weights: latency does not depend on their values
    python latency.py --space=cpu --arch=largest --protocol=hat   # HAT's model-only figure
    python latency.py --ckpt=out/ckpt.pt --arch=middle --repeats=3 --device=cpu
    python latency.py depth --ckpt=out/ckpt.pt            # the same subnet with 1, 2, ... decoder layers
    python latency.py dataset --space=cpu --n=300         # out_latency/latency.csv; appends, so a rerun resumes
    python latency.py fit                                 # linear vs HAT's MLP predictor: JSON, scatter plot, tau

Read top to bottom: the settings; the measurement (`measure_latency`); the dataset of random subnets
(`cmd_dataset`); the predictor (`fit_predictor`, `predict`, `cmd_fit`); the command line. The files' formats (the
dataset CSV that a rerun resumes, the predictor JSON), the outputs each command may write, and the plot are
runs/latency_files.py and runs/plots.py.
Settings are the LatencyConfig fields, changed with --key=value as in train.py; the first bare word is the command.
experiments/latency_checks.py adds side-by-side re-measurement and the benchmark on HAT's published latencies.
"""
import csv
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import mos
from mos import EOS, FEATURE_NAMES, SPACES, ArchConfig, Transformer
from runs.files import append_jsonl, json_key, releases_locks
from runs.latency_files import claim_outputs, read_dataset, read_predictor, resume_dataset, write_predictor
from runs.machine import synchronizer
from runs.plots import plot_predictor
from runs.settings import check_settings, get_device, parse_settings, read_arch
from runs.signals import run
from train import load_checkpoint, model_from_checkpoint

SRC_LEN = TGT_LEN = 23  # HAT: the mean IWSLT sentence length (30 for WMT)
BEAM = 5  # fairseq's default beam, which HAT's latency runs (and MoS's gold latency) use
PROTOCOLS = ("beam", "hat")  # what is timed: the real beam search (deployed) | HAT's model-only decoder steps
FILLER = mos.UNK + 1  # any ordinary token id fills the dummy sentence: latency does not depend on which one
TRIM = 0.1  # HAT's statistic drops the fastest and the slowest 10% of the runs
SPLIT = (0.7, 0.15)  # predictor data: train / valid (picks linear or MLP) / test (the rest, reported)
MLP_WIDTH, MLP_HIDDEN_LAYERS, MLP_BATCH = 400, 3, 128  # HAT's latency_predictor.py: 10 -> 400 -> 3 x 400 -> 1
# a dataset's columns: the subnet, its features, its latency and every setting of the protocol that timed it
SETTINGS = ["threads", "iters", "protocol", "beam", "src_len", "tgt_len", "warmup", "device"]
HEADER = ["space", "arch", *FEATURE_NAMES, "median_ms", "trimmed_mean_ms", "iqr_ms", "encoder_ms", *SETTINGS]
MIN_SUBNETS = 12  # distinct subnets `fit` needs: train / valid / test two each at least, and a tau on each


# -----------------------------------------------------------------------------
# Settings


@dataclass
class LatencyConfig:
    """Every setting of the command line; the defaults measure on this 2-core CPU."""
    command: str = "measure"  # measure | depth | dataset | fit
    # what to time
    ckpt: str = ""  # supernet (or standalone) checkpoint; empty: random weights of `space`
    space: str = "cpu"  # without a ckpt: cpu | cpu_wide | iwslt14 | tiny
    arch: str = "largest"  # largest | smallest | middle | a JSON arch file (search.py writes them)
    src_vocab: int = 3187  # without a ckpt: the Multi30k BPE vocabularies data/prepare.py builds (de, en)
    tgt_vocab: int = 2499
    # protocol
    device: str = "cpu"  # cpu | cuda
    threads: int = 2  # intra-op threads, recorded with every figure (this machine has 2 cores)
    src_len: int = SRC_LEN
    tgt_len: int = TGT_LEN  # incremental decoder steps
    beam: int = BEAM
    protocol: str = "beam"  # beam: the real beam_search call (deployed) | hat: HAT's model-only decoder steps
    warmup: int = 20  # untimed runs first (HAT: 5; here 5 left the first repeat of a new subnet ~10% slow)
    iters: int = 50  # timed runs (HAT: 300 for its README figures, 20 for its datasets)
    repeats: int = 3  # `measure`: the whole measurement this many times, to show it repeats
    log: str = ""  # also append every figure as one JSON line to this file
    # dataset and predictor
    n: int = 300  # `dataset`: random subnets to measure
    out: str = "out_latency/latency.csv"  # the latency dataset: `dataset` appends to it, `fit` reads it
    predictor: str = "out_latency/predictor.json"  # `fit` writes it (and the .png beside it); search.py reads it
    mlp_steps: int = 2000  # HAT: 5000 steps at lr 1e-5; fewer, faster steps fit as well here
    mlp_lr: float = 1e-4
    seed: int = 0


# the settings' checks (runs.settings.check_settings): numbers finite and >= 0 but these, and the choices
BOUNDS = dict(src_vocab=5, tgt_vocab=5, threads=1, src_len=1, tgt_len=1, beam=1, iters=1, repeats=1, n=1, mlp_steps=1,
              mlp_lr="(0, inf)")
CHOICES = dict(space=SPACES, protocol=PROTOCOLS)
COMMANDS = ("measure", "depth", "dataset", "fit")


# -----------------------------------------------------------------------------
# The measurement: one subnet, timed carefully


@torch.inference_mode()
def measure_latency(model: Transformer, src_len=SRC_LEN, tgt_len=TGT_LEN, beam=BEAM, warmup=20, iters=50,
                    device="cpu", threads=2, protocol="beam") -> dict:
    """Latency of a plain (extracted) Transformer in ms on one sentence of src_len tokens: the real beam search
    forced to tgt_len steps (protocol 'beam'), or HAT's encoder once plus tgt_len cached decoder steps over `beam`
    hypotheses (protocol 'hat'). Returns the median, HAT's trimmed mean, the spread and the protocol."""
    if protocol not in PROTOCOLS:
        raise SystemExit(f"error: --protocol={protocol}; choose one of {PROTOCOLS}")
    device, old_threads = torch.device(device), torch.get_num_threads()
    torch.set_num_threads(threads)  # the thread count changes CPU latency about 2x: fix it, record it
    model = model.to(device).eval()  # HAT leaves dropout on; we time what would be deployed
    src = torch.full((1, src_len), FILLER, device=device)  # (1, S) one sentence, no padding
    src[0, -1] = EOS
    token = torch.full((beam, 1), FILLER, device=device)  # (K, 1) the newest token of every hypothesis
    sync = synchronizer(device)  # a GPU runs kernels asynchronously: wait for them before reading the clock

    def run_once():
        """One timed unit; returns (encoder ms, total ms)."""
        sync()
        t0 = time.perf_counter()
        enc_outs, src_mask = model.encode(src)
        sync()
        t1 = time.perf_counter()
        if protocol == "beam":  # the deployed call (it encodes again): exactly tgt_len steps, EOS forced at the last
            mos.beam_search(model, src, beam=beam, max_len_a=0, max_len_b=tgt_len, min_len=tgt_len - 1)
        else:
            enc_outs = [m.expand(beam, -1, -1) for m in enc_outs]  # (1, S, C) -> (K, S, C): the beam's copies
            src_mask, cache = src_mask.expand(beam, -1, -1, -1), {}
            for _ in range(tgt_len):  # only the newest position is computed; keys/values of earlier ones are cached
                model.decode(token, enc_outs, src_mask, cache)  # (K, 1, V), the output projection included
        sync()
        return (t1 - t0) * 1e3, (time.perf_counter() - (t1 if protocol == "beam" else t0)) * 1e3  # beam: the call

    try:
        for _ in range(warmup):  # first calls build oneDNN primitives and fill the allocator's caches
            run_once()
        encoder, total = (np.array(x) for x in zip(*[run_once() for _ in range(iters)]))
    finally:
        torch.set_num_threads(old_threads)
    k, (q1, q3) = int(TRIM * iters), np.percentile(total, [25, 75])
    return dict(median_ms=float(np.median(total)), trimmed_mean_ms=float(np.sort(total)[k:iters - k].mean()),
                iqr_ms=float(q3 - q1), std_ms=float(total.std()), min_ms=float(total.min()),
                encoder_ms=float(np.median(encoder)), iters=iters, threads=threads, device=str(device),
                src_len=src_len, tgt_len=tgt_len, beam=beam, protocol=protocol)


def subnet_maker(cfg: LatencyConfig):
    """(space, make) where make(arch) is the plain Transformer to time: the checkpoint's extracted subnet, or
    without a checkpoint a randomly initialised one of the same shapes (timing does not depend on weights)."""
    if not cfg.ckpt:
        space = SPACES[cfg.space]
        return space, lambda arch: Transformer(space.validate(arch), cfg.src_vocab, cfg.tgt_vocab, space.qkv_dim)
    ckpt = load_checkpoint(cfg.ckpt)
    model, space = model_from_checkpoint(ckpt).eval(), mos.SearchSpace.from_dict(ckpt["model_args"]["space"])
    if ckpt["kind"] != "standalone":
        return space, model.subnet
    if cfg.command != "measure":  # a standalone checkpoint holds one fixed arch
        raise SystemExit(f"error: {cfg.ckpt} holds one standalone model; `{cfg.command}` needs a supernet "
                         f"checkpoint or --space")
    make = lambda arch: model
    make.arch = model.arch  # what main() times instead of --arch
    return space, make


def protocol_args(cfg: LatencyConfig) -> dict:
    """measure_latency's keyword arguments from the settings (SETTINGS, in that order)."""
    return {name: getattr(cfg, name) for name in SETTINGS}


def with_dec_layers(arch, n):
    """`arch` with n decoder layers, each like its first decoder layer."""
    per_layer = ("dec_ffn_dims", "dec_heads", "dec_cross_heads", "dec_cross_spans")
    return replace(arch, dec_layers=n, **{name: (getattr(arch, name)[0],) * n for name in per_layer})


def measure_repeated(cfg, make, arch, label) -> dict:
    """measure_latency `repeats` times; prints each, returns the median of the medians and their spread."""
    model, runs = make(arch), []
    for i in range(cfg.repeats):
        runs.append(r := measure_latency(model, **protocol_args(cfg)))
        print(f"{label} run {i + 1}: median {r['median_ms']:.1f} ms | trimmed mean {r['trimmed_mean_ms']:.1f} | "
              f"IQR {r['iqr_ms']:.1f} | encoder {r['encoder_ms']:.1f}")
    medians = [r["median_ms"] for r in runs]
    ms = float(np.median(medians))
    summary = dict(label=label, arch=arch.to_dict(), median_ms=ms, spread=float(np.ptp(medians)) / ms, runs=runs)
    print(f"{label}: {ms:.1f} ms (median of {cfg.repeats} repeats, spread {summary['spread']:.1%}) | "
          f"{cfg.protocol} protocol, {cfg.device}, {cfg.threads} threads, batch 1, beam {cfg.beam}, "
          f"{cfg.src_len}+{cfg.tgt_len} tokens")
    if cfg.log:
        append_jsonl(cfg.log, {**summary, "ckpt": cfg.ckpt, "space": cfg.space if not cfg.ckpt else None})
    return summary


# -----------------------------------------------------------------------------
# The dataset: random subnets of a space, each timed, one CSV row each


def cmd_dataset(cfg: LatencyConfig):
    """Measure cfg.n random subnets into a CSV, one row each as soon as it is measured, with every protocol setting,
    so a rerun resumes: it keeps the whole rows of the same subnets and settings, drops a row a kill cut short, and
    measures the rest (runs/latency_files.py). Rows measured otherwise are never mixed in: such a file is refused."""
    space, make = subnet_maker(cfg)
    rng = random.Random(cfg.seed)
    archs = [space.sample(rng) for _ in range(cfg.n)]  # the same list on every run: row i is always archs[i]
    settings = {k: str(v) for k, v in protocol_args(cfg).items()}  # SETTINGS, in that order
    done = resume_dataset(cfg.out, HEADER, [a.to_dict() for a in archs], settings,
                          draws=f"--space={space.name} --seed={cfg.seed}")
    with open(cfg.out, "a", newline="") as f:
        writer = csv.writer(f)
        for arch in tqdm(archs[done:], initial=done, total=cfg.n, desc="latency dataset"):
            r = measure_latency(make(arch), **protocol_args(cfg))
            writer.writerow([space.name, json_key(arch),
                             *[round(float(v), 6) for v in mos.arch_features(arch, space)],
                             *[round(r[k], 3) for k in ("median_ms", "trimmed_mean_ms", "iqr_ms", "encoder_ms")],
                             *settings.values()])
            f.flush()
    print(f"{cfg.n} subnets in {cfg.out}")


def read_latency_csv(path):
    """(features (n, 10), latency ms (n,): each row's median_ms, the predictor's target, space name, protocol) of a
    dataset CSV, checked in full: finite features, positive latencies, one space and one protocol with the same
    settings (runs/latency_files.py)."""
    return read_dataset(path, FEATURE_NAMES, SETTINGS)


# -----------------------------------------------------------------------------
# The predictor: linear least squares and HAT's MLP on the 10 architecture features, in plain dicts


def fit_linear(X, y) -> dict:
    """Least squares y ~ X w + b."""
    coef = np.linalg.lstsq(np.c_[X, np.ones(len(X))], y, rcond=None)[0]
    return {"kind": "linear", "weight": coef[:-1].tolist(), "bias": float(coef[-1])}


def fit_mlp(X, y, steps, lr, seed) -> dict:
    """HAT's MLP: MSE, Adam, batches of 128 drawn with replacement; features scaled by their maximum (HAT: fixed
    feature_norm) and the target by its maximum (HAT: a fixed lat_norm)."""
    torch.manual_seed(seed)
    x_scale, y_scale = np.abs(X).max(0) + 1e-12, float(np.abs(y).max())
    Xt, yt = torch.tensor(X / x_scale, dtype=torch.float32), torch.tensor(y / y_scale, dtype=torch.float32)
    widths = [X.shape[1]] + [MLP_WIDTH] * (MLP_HIDDEN_LAYERS + 1) + [1]
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    net = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())][:-1])  # no ReLU after the last
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(Xt), (MLP_BATCH,))
        opt.zero_grad()
        nn.functional.mse_loss(net(Xt[idx])[:, 0], yt[idx]).backward()
        opt.step()
    return {"kind": "mlp", "x_scale": x_scale.tolist(), "y_scale": y_scale,
            "layers": [{"weight": l.weight.detach().numpy(), "bias": l.bias.detach().numpy()} for l in layers]}


def kendall_tau(a, b) -> float:
    """Kendall's tau-b (ties allowed): the share of pairs two rankings order alike, minus those they order unlike."""
    sa, sb = np.sign(np.subtract.outer(a, a)), np.sign(np.subtract.outer(b, b))  # (n, n) pairwise orders
    return float((sa * sb).sum() / np.sqrt((sa != 0).sum() * (sb != 0).sum()))


def scores(y, p) -> dict:
    """What a latency predictor should report on held-out subnets: RMSE, relative error, the share within 10%, and
    Kendall tau (whether it ranks subnets right, which is what the search needs)."""
    rel = np.abs(p - y) / y
    return dict(rmse_ms=float(np.sqrt(np.mean((p - y) ** 2))), mean_rel_error=float(rel.mean()),
                within_10pct=float((rel <= 0.1).mean()), kendall_tau=kendall_tau(y, p), n=len(y))


def fit_predictor(X, y, cfg: LatencyConfig):
    """Shuffle and split train/valid/test, fit both predictors on train, keep the one with the lower valid RMSE.
    Returns (chosen predictor, report with test scores of both, test indices)."""
    order = np.random.default_rng(cfg.seed).permutation(len(y))
    train, valid, test = np.split(order, [int(SPLIT[0] * len(y)), int((SPLIT[0] + SPLIT[1]) * len(y))])
    fitted = {"linear": fit_linear(X[train], y[train]),
              "mlp": fit_mlp(X[train], y[train], cfg.mlp_steps, cfg.mlp_lr, cfg.seed)}
    valid_rmse = {k: scores(y[valid], predict(p, X[valid]))["rmse_ms"] for k, p in fitted.items()}
    chosen = min(valid_rmse, key=valid_rmse.get)
    report = dict(chosen=chosen, valid_rmse_ms=valid_rmse, n_train=len(train), n_valid=len(valid),
                  test={k: scores(y[test], predict(p, X[test])) for k, p in fitted.items()})
    return fitted[chosen], report, test


def predict(predictor: dict, X) -> np.ndarray:
    """Latency (ms) of feature rows X (n, 10) from a fit_linear/fit_mlp dict, with numpy alone."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if predictor["kind"] == "linear":
        return X @ np.asarray(predictor["weight"]) + predictor["bias"]
    h = X / np.asarray(predictor["x_scale"])
    for i, layer in enumerate(predictor["layers"]):
        h = h @ np.asarray(layer["weight"]).T + np.asarray(layer["bias"])  # (n, in) -> (n, out)
        h = np.maximum(h, 0) if i < len(predictor["layers"]) - 1 else h
    return h[:, 0] * predictor["y_scale"]


def fastest_arch(space) -> ArchConfig:
    """Every choice at its minimum, attending to one encoder layer only: the fastest subnet when cost grows with
    every size (measured latency); a fitted predictor need not agree (search.lowest_latency)."""
    smallest = space.smallest()
    return replace(smallest, dec_cross_spans=(min(space.cross_spans),) * smallest.dec_layers)


def predictor_problem(predictor: dict):
    """Why a predictor cannot serve a search (a phrase), or None: it must predict finite, positive latencies for
    its space's fastest and largest subnets, or every budget would be met (or none)."""
    if predictor.get("space") not in SPACES:
        return f"its space {predictor.get('space')!r} is not one of {list(SPACES)}"
    space = SPACES[predictor["space"]]
    X = np.stack([mos.arch_features(arch, space).numpy() for arch in (fastest_arch(space), space.largest())])
    ms = predict(predictor, X)  # (2,)
    if not (np.isfinite(ms).all() and (ms > 0).all()):
        return f"it predicts {ms.round(3).tolist()} ms for the fastest and the largest subnet: not positive latencies"
    return None


def cmd_fit(cfg: LatencyConfig):
    """Fit and choose a predictor on the dataset CSV; validate it, then write it as JSON, its report, and the
    scatter plot. A dataset of too few distinct subnets, or a fit that cannot serve a search, leaves the old
    predictor as it was."""
    X, y, space, protocol = read_latency_csv(cfg.out)
    distinct = len(np.unique(X, axis=0))
    if distinct < MIN_SUBNETS:
        raise SystemExit(f"error: {cfg.out} holds {distinct} distinct subnets; fitting a predictor needs at least "
                         f"{MIN_SUBNETS} (measure more with `latency.py dataset --n=...`); {cfg.predictor} is left as "
                         f"it was")
    predictor, report, test = fit_predictor(X, y, cfg)
    t, out = report["test"][report["chosen"]], Path(cfg.predictor)
    problem = predictor_problem({**predictor, "space": space})
    if not (np.isfinite(predict(predictor, X)).all() and np.isfinite([t["rmse_ms"], t["kendall_tau"]]).all()):
        problem = "it predicts non-finite latencies, or its test scores are not finite"
    if problem:  # validate, then replace
        raise SystemExit(f"error: the {report['chosen']} predictor fit on {cfg.out} cannot serve a search ({problem}); "
                         f"{out} is left as it was")
    write_predictor(out, predictor, space=space, protocol=protocol, feature_names=list(FEATURE_NAMES), data=cfg.out,
                    **report)
    title = f"{report['chosen']} predictor, {space} space: test tau {t['kendall_tau']:.3f}, RMSE {t['rmse_ms']:.2f} ms"
    plot_predictor(y, predict(load_predictor(out), X), test, title, out.with_suffix(".png"))
    for name, s in report["test"].items():
        print(f"{name:6s} test ({s['n']} subnets): tau {s['kendall_tau']:.3f} | RMSE {s['rmse_ms']:.2f} ms | "
              f"mean rel. error {s['mean_rel_error']:.1%} | within 10% {s['within_10pct']:.0%}")
    print(f"chosen: {report['chosen']} (lower valid RMSE) -> {out}, {out.with_suffix('.png')}")


def load_predictor(path) -> dict:
    """A predictor JSON written by `fit`, its weights as numpy arrays so that predict() is fast; anything else
    (predictions that are not finite and positive included) is a one-line error."""
    return read_predictor(path, predictor_problem)


# -----------------------------------------------------------------------------
# The command


@releases_locks
def main(argv):
    """Run one command; returns what it measured (for tests and notebooks)."""
    cfg = parse_settings(LatencyConfig, argv, command_field="command")
    check_settings(cfg, BOUNDS, CHOICES)
    get_device(cfg.device)
    if cfg.command not in COMMANDS:
        raise SystemExit(f"error: unknown command {cfg.command!r}; use {', '.join(COMMANDS)}")
    claim_outputs(cfg, HEADER)  # an output that cannot be written fails now, not after the measurements
    torch.set_num_threads(cfg.threads)
    if cfg.command in ("measure", "depth"):
        space, make = subnet_maker(cfg)
        arch = getattr(make, "arch", None) or read_arch(cfg.arch, space, ArchConfig)
        if cfg.command == "measure":
            return measure_repeated(cfg, make, arch, "standalone model" if hasattr(make, "arch") else cfg.arch)
        return [measure_repeated(cfg, make, with_dec_layers(arch, n), f"{cfg.arch}, {n} decoder layers")
                for n in sorted(space.dec_layers)]
    return cmd_dataset(cfg) if cfg.command == "dataset" else cmd_fit(cfg)


if __name__ == "__main__":
    run(main)
