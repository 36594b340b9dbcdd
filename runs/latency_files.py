"""
latency.py's files on disk: the latency dataset (a CSV of measured subnets, appended row by row so that a killed run
resumes) and the predictor (JSON, its float arrays in base64). latency.py defines the columns and calls these.

    done = resume_dataset(path, HEADER, planned, settings, draws)   # rows already measured; or `error: ...`
    X, y, space, protocol = read_dataset(path, FEATURE_NAMES, SETTINGS)   # checked in full
    write_predictor(path, predictor, **report); read_predictor(path, problem)
    predictor = predictor_for(path, space, protocol, required, load)   # one that fits this search, or None
    claim_outputs(cfg, HEADER)   # latency.py's output files, checked and locked before it measures
    check_budgets(budgets); budgets_in_ms(budgets, path, space, protocol, read)   # search.py's latency budgets
"""

import base64
import csv
import json
import math
import re
from pathlib import Path

import numpy as np

from runs.files import atomic_open, brief, read_json, write_json
from runs.folders import claim_file, is_jsonl_of, is_png
from runs.settings import NAMED_ARCHS, need

# -----------------------------------------------------------------------------
# The latency dataset: one CSV row per subnet, with its features, its latency and the protocol settings that timed it


def old_headers(header) -> tuple:
    """The first columns of files from before every setting was stored: read as they are, never appended to; the
    oldest has no protocol column (it timed HAT's protocol)."""
    return header[:header.index("protocol") + 1], header[:header.index("protocol")]


def resume_dataset(path, header, planned: list, settings: dict, draws: str) -> int:
    """How many of the `planned` subnets (arch dicts, in order) `path` already holds, after checking that it is
    a dataset of this header holding the first of them, measured with the same `settings` (column -> text); a row
    a kill cut short is dropped, and a new file gets the header. Any other file is refused in one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        whole = text[:text.rfind("\n") + 1]  # a kill may have cut the last row short: it is measured again
        rows = list(csv.reader(whole.splitlines()))
        stored = [json.loads(r[1]) for r in rows[1:]]  # the arch column
    except (OSError, ValueError, IndexError, RecursionError) as e:
        raise SystemExit(f"error: cannot read {path} as a latency dataset ({brief(e, 100)}); give another --out")
    if rows[:1] != [header] and not (not rows and ",".join(header).startswith(text)):  # (a cut header is ours)
        raise SystemExit(f"error: {path} is not a latency dataset of this version (its first line is not "
                         f"{','.join(header)}: an older file does not record every protocol setting); give another "
                         f"--out")
    if stored[:len(planned)] != planned[:len(stored)]:
        raise SystemExit(f"error: {path} holds other subnets than {draws} draws; pass those settings or another --out")
    if len(stored) > len(planned):
        raise SystemExit(f"error: {path} already holds {len(stored)} subnets, more than --n={len(planned)}; pass "
                         f"--n={len(stored)} or more to measure more, or another --out")
    names, values = list(settings), list(settings.values())
    other = next((dict(zip(names, r[-len(names):])) for r in rows[1:] if r[-len(names):] != values), None)
    if other:
        flags = " ".join(f"--{k}={v}" for k, v in other.items())
        raise SystemExit(f"error: {path} was measured with other settings ({flags}); pass those, or another --out")
    if text != whole or not rows:
        with atomic_open(path) as f:
            f.write(whole)
            if not rows:
                csv.writer(f).writerow(header)  # csv's own line ends, as the rows latency.py appends
    return len(stored)


def is_dataset(path, header) -> bool:
    """Whether a file is a latency dataset CSV (what --out may append to), of this or an older header, or the
    start of one that a kill cut short."""
    try:
        first = Path(path).read_bytes().decode("utf-8").split("\n")[0].rstrip("\r")
    except (OSError, ValueError):
        return False
    return any(first.split(",") == h or ",".join(h).startswith(first) for h in (header, *old_headers(header)))


def read_dataset(path, feature_names, settings):
    """(features (n, F), latency ms (n,), space name, protocol) from a dataset CSV of `latency.py dataset`, checked
    in full: finite features, positive finite latencies, every row of one space, one protocol and the same protocol
    settings (a file from before they were all stored is checked on those it has). Else one line `error: ...`."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        X = np.array([[float(r[n]) for n in feature_names] for r in rows])  # (n, F)
        y = np.array([float(r["median_ms"]) for r in rows])  # (n,)
        kinds = {(r["space"], r.get("protocol") or "hat", *(r.get(k) for k in settings if k != "protocol"))
                 for r in rows}
        need(rows, "no rows")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:  # missing, empty, not UTF-8, other columns
        raise SystemExit(f"error: cannot read latency CSV {path} ({brief(e, 100)}); give one that "
                         f"`python latency.py dataset` wrote")
    bad = [i for i in range(len(rows)) if not (np.isfinite(X[i]).all() and np.isfinite(y[i]) and y[i] > 0)]
    if bad or len(kinds) > 1:
        others = ", ".join(k for k in settings if k != "protocol")
        problem = (f"row {bad[0] + 2} has a non-finite feature or a latency that is not a positive number "
                   f"({y[bad[0]]} ms)" if bad else f"rows of several spaces or protocol settings "
                   f"{sorted(kinds, key=str)[:2]} (space, protocol, {others})")
        raise SystemExit(f"error: latency CSV {path}: {problem}; measure it again with `python latency.py dataset`")
    space, protocol = kinds.pop()[:2]
    return X, y, space, protocol


# -----------------------------------------------------------------------------
# The predictor: a plain dict as JSON, an MLP's weight arrays as float32 bytes in base64


def encode_array(a: np.ndarray) -> dict:
    """A float array as JSON: float32 bytes in base64 (HAT's MLP has 485K weights: 2.6 MB, not 9 MB of digits)."""
    return {"shape": list(a.shape), "float32_base64": base64.b64encode(a.astype("<f4").tobytes()).decode()}


def decode_array(d: dict) -> np.ndarray:
    """The inverse of encode_array."""
    return np.frombuffer(base64.b64decode(d["float32_base64"]), dtype="<f4").reshape(d["shape"]).astype(np.float64)


def write_predictor(path, predictor: dict, **extra):
    """Write a latency.fit_linear/fit_mlp dict (plus `extra` entries) as JSON."""
    layers = [{k: encode_array(v) for k, v in layer.items()} for layer in predictor.get("layers", [])]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(path), {**predictor, **({"layers": layers} if layers else {}), **extra})


def read_predictor(path, problem_of) -> dict:
    """A predictor JSON written by write_predictor, with its weights as numpy arrays; anything else, or one for
    which problem_of(predictor) names a problem, is a one-line error."""
    predictor = read_json(path, "latency predictor")
    try:
        for layer in predictor.get("layers", []):
            layer["weight"], layer["bias"] = decode_array(layer["weight"]), decode_array(layer["bias"])
        need(isinstance(predictor["space"], str), "no space name")
        problem = problem_of(predictor)
        need(problem is None, problem)
    except Exception as e:  # not a dict, missing or malformed entries, weights of the wrong sizes
        raise SystemExit(f"error: latency predictor {path} is not one `python latency.py fit` wrote ({brief(e, 160)})")
    return predictor


def predictor_for(path, space: str, protocol: str, required: bool, load):
    """The predictor at `path` (load(path) reads it) if it fits a search of this space and protocol; None if there
    is none or it does not fit and is not `required` (search.py --latency=measured reports it beside, if it fits);
    else a one-line error saying how to make one that fits."""
    predictor = load(path) if Path(path).exists() else None
    if predictor is None and required:
        raise SystemExit(f"error: --latency=predicted needs {path}: run `python latency.py dataset` and "
                         f"`python latency.py fit`, or pass --latency=measured")
    if predictor is None:
        return None
    fitted_on, problem = predictor.get("protocol", "hat"), None  # predictors from before the protocol timed HAT's
    if predictor["space"] != space:
        problem = f"was fit on space '{predictor['space']}', the supernet's is '{space}'"
    elif fitted_on != protocol:
        problem = (f"was fit on latencies of the {fitted_on!r} protocol; pass --protocol={fitted_on} or refit it "
                   f"with latency.py --protocol={protocol}")
    if problem and required:
        raise SystemExit(f"error: predictor {path} {problem}")
    return None if problem else predictor


def is_predictor(path) -> bool:
    """Whether a file is a predictor JSON `fit` wrote (what --predictor may replace)."""
    try:
        predictor = json.loads(Path(path).read_bytes().decode("utf-8"))
        return isinstance(predictor, dict) and predictor.get("kind") in ("linear", "mlp") and "space" in predictor
    except (OSError, ValueError, RecursionError):
        return False


# -----------------------------------------------------------------------------
# latency.py's outputs, claimed before anything is measured


def claim_outputs(cfg, header):
    """The output files of latency.py's command (cfg: its LatencyConfig), checked and locked before anything is
    measured (runs/folders.py): each may replace or append to only a file of its own kind, and never one of the
    command's inputs."""
    arch_file = [cfg.arch] if cfg.arch not in NAMED_ARCHS else []
    if cfg.command == "dataset":
        claim_file(cfg.out, "latency dataset", lambda p: is_dataset(p, header), reads=[cfg.ckpt], what="--out")
    elif cfg.command == "fit":
        claim_file(cfg.predictor, "latency predictor", is_predictor, reads=[cfg.out], what="--predictor")
        claim_file(Path(cfg.predictor).with_suffix(".png"), "PNG plot", is_png, reads=[cfg.out],
                   what="--predictor's plot")
    elif cfg.log:
        claim_file(cfg.log, "latency log", lambda p: is_jsonl_of(p, ("label", "median_ms")),
                   reads=[cfg.ckpt, *arch_file], what="--log")


# -----------------------------------------------------------------------------
# search.py's latency budgets: numbers of ms, or percentiles of a latency dataset


def check_budgets(budgets):
    """Latency budgets are a non-empty list of finite, positive numbers of ms, or of percentiles pNN (0 < NN < 100)."""
    percentile = lambda b: isinstance(b, str) and re.fullmatch(r"p\d+(\.\d+)?", b) and 0 < float(b[1:]) < 100
    if not budgets or not all(percentile(b) or type(b) in (int, float) and math.isfinite(b) and b > 0 for b in budgets):
        raise SystemExit(f"error: --budgets={list(budgets)}; give a list of finite, positive numbers (ms) or of "
                         f"percentiles of --latency_csv, e.g. [18,27] or [p25,p50]")


def budgets_in_ms(budgets, path, space: str, protocol: str, read) -> list:
    """The budgets in ms: a number as it is, pNN as that percentile (rounded to 0.01 ms) of the measured latencies
    in the dataset at `path` (read(path) -> (features, ms, space, protocol)), which must be of the supernet's space
    and of the protocol searched."""
    if all(type(b) in (int, float) for b in budgets):  # (then the dataset is not read: it need not exist)
        return [float(b) for b in budgets]
    _, ms, data_space, data_protocol = read(path)
    if (data_space, data_protocol) != (space, protocol):
        raise SystemExit(f"error: --latency_csv={path} holds latencies of space {data_space!r}, protocol "
                         f"{data_protocol!r}; the budgets need {space!r}, {protocol!r}: give ms, or remeasure")
    return [float(b) if type(b) in (int, float) else round(float(np.percentile(ms, float(b[1:]))), 2) for b in budgets]
