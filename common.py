"""
What train.py, latency.py, search.py, bench.py and reproduce.py share: checkpoints (saved atomically with a checksum,
loaded safely and validated by one function), the lock that keeps a run folder to one writing process, the handling
of SIGINT/SIGTERM, and small checks of settings, devices and JSON files that every command makes alike.

    from common import load_checkpoint, save_checkpoint, lock_folder, releases_locks, run
    ckpt = load_checkpoint("out/ckpt.pt")         # a checked dict, or a one-line `error: ...` and exit
    lock_folder("out")                            # or `error: out is being written by process 1234 ...`

Every problem is one line `error: ...` (SystemExit), never a traceback.
"""

import fcntl
import hashlib
import json
import os
import signal
import sys
from dataclasses import fields
from functools import wraps
from pathlib import Path

import torch

import mos
from data.batching import atomic_open
from mos import ArchConfig, SuperTransformer, Transformer

# -----------------------------------------------------------------------------
# Models from checkpoints


def build_supernet(args: dict) -> SuperTransformer:
    """A SuperTransformer from its init_args() dict (as stored in checkpoints)."""
    return SuperTransformer(**{**args, "space": mos.SearchSpace.from_dict(args["space"])})


def build_standalone(args: dict) -> Transformer:
    """A plain Transformer from the standalone model_args dict stored in checkpoints."""
    space, arch = mos.SearchSpace.from_dict(args["space"]), ArchConfig.from_dict(args["arch"])
    return Transformer(arch, args["src_vocab"], args["tgt_vocab"], space.qkv_dim,
                       mos.scaled_dropout(args["dropout"], arch, space), args["max_len"],
                       space.position_widths())  # positions as a subnet of the space has them


BUILDERS = {"supernet": build_supernet, "standalone": build_standalone}


def model_from_checkpoint(ckpt: dict):
    """Rebuild the supernet or standalone model a (checked) checkpoint holds, with its weights."""
    model = BUILDERS[ckpt["kind"]](ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model


# -----------------------------------------------------------------------------
# Checkpoints: save with a checksum, load safely, validate


KINDS = ("supernet", "standalone")  # what train.py writes as ckpt.pt
# the top-level entries and their types; a "snapshot" (weights only, for checkpoint averaging) has model and step
ENTRIES = dict(kind=str, model=dict, model_args=dict, config=dict, vocab=dict, step=int, optimizer=dict, data=dict,
               train_seconds=(int, float), torch_version=str, checksum=str)
REQUIRED = {"supernet": ("model", "model_args", "config", "vocab", "step"), "snapshot": ("model", "step")}
REQUIRED["standalone"] = REQUIRED["supernet"]
RESUME = ("optimizer", "data", "train_seconds")  # what --resume needs besides


def checksum(obj) -> str:
    """sha256 over a checkpoint's contents, walked in a fixed order (dict keys sorted): every tensor's dtype, shape
    and bytes, every other value's type and repr. The "checksum" entry itself is left out."""
    digest = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # the raw bytes, any dtype (bf16 too)
        elif isinstance(x, dict):
            digest.update(f"dict {len(x)}:".encode())
            for key in sorted(x, key=repr):
                digest.update(repr(key).encode())
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            digest.update(f"{type(x).__name__} {len(x)}:".encode())
            for item in x:
                walk(item)
        else:
            digest.update(f"{type(x).__name__} {x!r};".encode())
    walk({k: v for k, v in obj.items() if k != "checksum"})
    return digest.hexdigest()


def save_checkpoint(obj: dict, path: Path):
    """Write atomically (temporary file, then rename), so a crash never leaves a half-written checkpoint. A dict that
    holds a model gets a checksum of its contents, which load_checkpoint verifies."""
    if isinstance(obj, dict) and "model" in obj:
        obj = {**obj, "checksum": checksum(obj)}
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path, device="cpu", kinds=KINDS, resume=False) -> dict:
    """torch.load with weights_only=True (plain dicts and tensors only), then checkpoint_problem(): a file that does
    not load, or loads but is not a whole checkpoint of one of `kinds`, stops with one line naming the first problem.
    resume=True also requires what a resumed run needs (optimizer state, data position)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: checkpoint {path} does not exist")
    except IsADirectoryError:
        raise SystemExit(f"error: checkpoint {path} is a folder; give the ckpt.pt file in it")
    except Exception as e:  # truncated, corrupted, or carrying pickled objects
        raise SystemExit(f"error: cannot load checkpoint {path} safely ({brief(e, 200)}); it is corrupted, "
                         f"truncated, or not a mos checkpoint")
    problem = checkpoint_problem(ckpt, kinds, resume)
    if problem:
        raise SystemExit(f"error: checkpoint {path} {problem}")
    if "checksum" not in ckpt:
        print(f"warning: checkpoint {path} has no checksum (saved before checksums were added?): its weights "
              f"cannot be checked for corruption", file=sys.stderr)
    return ckpt


def checkpoint_problem(ckpt, kinds=KINDS, resume=False):
    """The first thing wrong with a loaded checkpoint (a phrase that follows "checkpoint PATH"), or None if it is a
    whole one of `kinds`: its entries and their types, the checksum, weights whose names and shapes are those of the
    model its model_args describe, vocabularies of the model's sizes, settings that TrainConfig knows, finite
    weights and optimizer state of the model's shapes."""
    if not isinstance(ckpt, dict):
        return f"holds a {type(ckpt).__name__}, not a mos checkpoint (a dict of model weights and settings)"
    kind = ckpt.get("kind")
    if not isinstance(kind, str):
        return "has no 'kind' entry (supernet | standalone); it is not a mos checkpoint"
    if kind not in kinds:
        return f"is of kind {kind!r}; this needs one of {list(kinds)}"
    for key in REQUIRED[kind] + (RESUME if resume else ()):
        if key not in ckpt:
            return f"has no {key!r} entry; it is not a whole mos checkpoint"
    for key, types in ENTRIES.items():
        if key in ckpt and (not isinstance(ckpt[key], types) or isinstance(ckpt[key], bool)):
            return f"entry {key!r} is a {type(ckpt[key]).__name__}, not a {getattr(types, '__name__', 'number')}"
    if ckpt["step"] < 0:
        return f"has step {ckpt['step']} < 0"
    weights = ckpt["model"]
    bad = next((k for k, v in weights.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is not None:
        return f"model entry {bad!r} is not a named tensor"
    if "checksum" in ckpt and checksum(ckpt) != ckpt["checksum"]:
        return "does not match the checksum saved in it: the file was corrupted (or edited) after it was written"
    if kind != "snapshot":
        problem = model_problem(ckpt, kind)
        if problem:
            return problem
    nonfinite = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if nonfinite is not None:
        return f"has non-finite values (NaN or inf) in weight {nonfinite!r}"
    return None


def model_problem(ckpt, kind):
    """checkpoint_problem's part that needs the model: model_args that build one (on the meta device: shapes
    only), weights with its names and shapes, vocabularies of its sizes, known settings, the optimizer state."""
    try:
        with torch.device("meta"):
            model = BUILDERS[kind](ckpt["model_args"])
    except Exception as e:  # anything: a missing key, a wrong type, a space nothing can be built from
        return f"has model_args that describe no {kind} model ({brief(e)})"
    expected, weights = model.state_dict(), ckpt["model"]
    missing, unknown = [k for k in expected if k not in weights], [k for k in weights if k not in expected]
    if missing or unknown:
        return (f"has weights that do not fit its model_args: {len(missing)} missing (first {missing[:1]}), "
                f"{len(unknown)} unknown (first {unknown[:1]})")
    for name, want in expected.items():
        got = weights[name]
        if got.shape != want.shape or got.is_floating_point() != want.is_floating_point():
            return f"has weight {name!r} of shape {list(got.shape)} ({got.dtype}); its model_args need " \
                   f"{list(want.shape)} ({want.dtype})"
    vocab = ckpt["vocab"]
    for side in ("src", "tgt"):
        words = vocab.get(side)
        if not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
            return f"has no {side} vocabulary (vocab[{side!r}] must be a list of tokens)"
        if len(words) != ckpt["model_args"][f"{side}_vocab"]:
            return f"has a {side} vocabulary of {len(words)} tokens for a model of " \
                   f"{ckpt['model_args'][f'{side}_vocab']}"
    from train import TrainConfig  # train imports this module, so not at the top
    types = {f.name: f.type for f in fields(TrainConfig)}
    for key, value in ckpt["config"].items():
        if key not in types:
            return f"has an unknown setting {key!r} in its config"
        if not (type(value) is types[key] or (types[key] is float and type(value) is int)):
            return f"has setting {key}={value!r} in its config, which should be a {types[key].__name__}"
    return optimizer_problem(ckpt, list(model.parameters()))


def optimizer_problem(ckpt, params):
    """The optimizer state (if any) must belong to these parameters: one entry each, tensors of their shapes, finite;
    the data position must be two counts."""
    if "data" in ckpt and not all(isinstance(ckpt["data"].get(k), int) and ckpt["data"][k] >= 0
                                  for k in ("epoch", "batch")):
        return "has a data position that is not {'epoch': int, 'batch': int}"
    if "optimizer" not in ckpt:
        return None
    opt = ckpt["optimizer"]
    groups, state = opt.get("param_groups"), opt.get("state")
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                             for g in groups) and isinstance(state, dict)):
        return "has an optimizer entry that is not an optimizer state_dict (state, param_groups)"
    ids = [i for g in groups for i in g["params"]]
    if ids != list(range(len(params))):
        return f"has optimizer state for {len(ids)} parameters; the model has {len(params)}"
    for i, entry in state.items():
        if i not in ids or not isinstance(entry, dict):
            return f"has optimizer state for an unknown parameter {i!r}"
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[i].shape:
                return f"has optimizer state {name!r} of shape {list(value.shape)} for a parameter of " \
                       f"{list(params[i].shape)}"
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                return f"has non-finite optimizer state {name!r} of parameter {i}"
    return None


# -----------------------------------------------------------------------------
# One writer per run folder


_held = {}  # lock file -> [its open file, how many holders in this process]
_scopes = []  # per running @releases_locks call: the lock files it took


def writable_folder(folder) -> Path:
    """Create `folder` (and its parents) if needed; a one-line error if it cannot be (a file, no permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError("not writable")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot write to folder {folder} ({getattr(e, 'strerror', None) or e}); "
                         f"give another one")
    return folder


def lock_folder(folder, create=True) -> Path:
    """Take the exclusive lock folder/.lock for this process (created with the folder unless create=False). It is
    an OS lock (flock), so it ends with the process however it ends: a SIGKILL never leaves a stale lock. A second
    writer, in another process, stops with a one-line error naming the pid of the one that holds it."""
    folder = Path(folder)
    if not create and not folder.is_dir():
        raise SystemExit(f"error: {folder} does not exist (or is not a folder)")
    return _lock(writable_folder(folder) / ".lock", folder)


def lock_file(path) -> Path:
    """The same lock for a single output file: `path`.lock beside it."""
    path = Path(path)
    return _lock(writable_folder(path.parent) / (path.name + ".lock"), path)


def _lock(lock_path: Path, target: Path) -> Path:
    """flock(LOCK_EX | LOCK_NB) on lock_path, re-entrant within this process; the holder's pid is written into it."""
    key = str(lock_path.resolve())
    if key not in _held:
        try:
            f = open(lock_path, "a+")
        except OSError as e:
            raise SystemExit(f"error: cannot write to {target} ({e.strerror}); give another folder")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # never waits, so two commands can never deadlock
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise SystemExit(f"error: {target} is being written by process {pid} (it holds {lock_path}); wait for it "
                             f"to end or write elsewhere")
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        _held[key] = [f, 0]
    _held[key][1] += 1
    if _scopes:
        _scopes[-1].append(key)
    return lock_path


def releases_locks(main):
    """Decorator for a command's main(): the locks it takes are released when it returns or fails (the ones its
    caller holds stay held), so reproduce.py and tests can run commands in-process one after another."""
    @wraps(main)
    def wrapper(*args, **kwargs):
        _scopes.append([])
        try:
            return main(*args, **kwargs)
        finally:
            for key in _scopes.pop():
                _held[key][1] -= 1
                if _held[key][1] == 0:
                    _held.pop(key)[0].close()  # closing the file releases the flock
    return wrapper


# -----------------------------------------------------------------------------
# SIGINT (Ctrl-C) and SIGTERM (schedulers: SLURM, Kubernetes, systemd send it before SIGKILL)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
received = []  # every stop signal this process caught, in order


class Stopped(BaseException):
    """A stop signal arrived (a BaseException, like KeyboardInterrupt: `except Exception` does not swallow it)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    received.append(signum)
    raise Stopped(signum)


def defer_stop_signals(noted: list):
    """From now on SIGINT and SIGTERM only append their number to `noted` (train.py looks at it after every step,
    saves and stops). Returns the function that puts the previous handlers back."""
    def note(signum, frame):
        received.append(signum)
        noted.append(signum)
    previous = {s: signal.signal(s, note) for s in STOP_SIGNALS}
    return lambda: [signal.signal(s, handler) for s, handler in previous.items()]


def run(main, resume_hint="rerun the same command to continue"):
    """A script's entry point: main(sys.argv[1:]) with SIGINT and SIGTERM raising Stopped wherever it is (train.py
    defers them in its loop). Everything finished is already on disk (atomic writes, caches, whole CSV rows), so a
    stop prints one line and exits with 128 + the signal's number (130 Ctrl-C, 143 SIGTERM), as a shell would."""
    for s in STOP_SIGNALS:
        signal.signal(s, _raise_stopped)
    try:
        main(sys.argv[1:])
    except Stopped as e:
        print(f"stopped by {signal.Signals(e.signum).name}; {resume_hint}", file=sys.stderr)
        sys.exit(128 + e.signum)


# -----------------------------------------------------------------------------
# Checks every command makes alike


def check_settings(values: dict, limits=None, choices=None):
    """A one-line error for the first setting (of dict `values`) outside its (low, high) `limits` (None: no bound)
    or not one of its `choices`."""
    for key, (low, high) in (limits or {}).items():
        if (low is not None and values[key] < low) or (high is not None and values[key] > high):
            bound = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
            raise SystemExit(f"error: --{key}={values[key]} must be {bound}")
    for key, allowed in (choices or {}).items():
        if values[key] not in allowed:
            raise SystemExit(f"error: --{key}={values[key]}; choose one of {list(allowed)}")


def check_budgets(budgets):
    """Latency budgets (search.py, reproduce.py) are a non-empty list of positive numbers of ms."""
    if not budgets or not all(type(b) in (int, float) and b > 0 for b in budgets):
        raise SystemExit(f"error: --budgets={list(budgets)}; give a list of positive numbers (ms), e.g. [18,27]")


def get_device(name: str, auto=False) -> torch.device:
    """cpu | cuda | cuda:N (and auto: cuda if present): a torch.device, or one line saying why not here."""
    if auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device={name}; use cpu or cuda" + (" or auto" if auto else ""))
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device={name}; use cpu or cuda" + (" or auto" if auto else ""))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={name} but torch sees no CUDA GPU here; use --device=cpu")
    return device


def read_json(path, what="file"):
    """Parsed JSON of `path`, or a one-line error (missing, unreadable, not UTF-8, not JSON, nested too deeply)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SystemExit(f"error: cannot read {what} {path} ({brief(e)})")


def brief(e: Exception, limit=150) -> str:
    """An exception as a short one-line text for an error message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"
