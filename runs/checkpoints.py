"""
Checkpoints: plain dicts of tensors, written atomically with a checksum, loaded with weights_only=True, and checked
whole before anything uses them.

    save_checkpoint(dict(kind="supernet", model=..., step=...), "out/ckpt.pt")
    ckpt = load_checkpoint("out/ckpt.pt", build, TrainConfig)   # or one line `error: checkpoint ... <problem>`
`build(kind, model_args)` makes the model a checkpoint describes (mos.build): it is built on the meta device and
its own strict load_state_dict checks every weight's name and shape.
"""

import hashlib
import json
import sys
import warnings

import torch

from runs.files import atomic_open, brief
from runs.settings import need, typed_value

KINDS = ("supernet", "standalone")  # what train.py writes as ckpt.pt; a "snapshot" (final averaging) has model, step
NEEDED = dict(supernet=("model", "model_args", "config", "vocab", "step"), snapshot=("model", "step"))
NEEDED["standalone"] = NEEDED["supernet"]
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
        elif isinstance(x, (dict, list, tuple)):
            items = sorted(x.items(), key=lambda kv: repr(kv[0])) if isinstance(x, dict) else enumerate(x)
            digest.update(f"{type(x).__name__} {len(x)}:".encode())
            for key, value in items:
                digest.update(repr(key).encode() if isinstance(x, dict) else b"")
                walk(value)
        else:
            digest.update(f"{type(x).__name__} {x!r};".encode())
    walk({k: v for k, v in obj.items() if k != "checksum"})
    return digest.hexdigest()


def save_checkpoint(obj: dict, path):
    """Write atomically (temporary file, then rename), so a crash never leaves a half-written checkpoint. A dict that
    holds a model gets a checksum of its contents, which load_checkpoint verifies."""
    if isinstance(obj, dict) and "model" in obj:
        obj = {**obj, "checksum": checksum(obj)}
    try:
        with atomic_open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:  # torch's zip writer turns a failed write (a full disk) into a RuntimeError
        if not isinstance(e.__context__, OSError):
            raise
        raise OSError(e.__context__.errno, e.__context__.strerror, str(path)) from None


def load_file(path, device="cpu") -> dict:
    """torch.load with weights_only=True (plain dicts and tensors only, never pickled code): a file that does not
    load stops with one line. train.load_checkpoint then checks the checksum and that it is a whole checkpoint."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: checkpoint {path} does not exist")
    except IsADirectoryError:
        raise SystemExit(f"error: checkpoint {path} is a folder; give the ckpt.pt file in it")
    except Exception as e:  # truncated, corrupted, or carrying pickled objects
        raise SystemExit(f"error: cannot load checkpoint {path} safely ({brief(e, 200)}); it is corrupted, "
                         f"truncated, or not a mos checkpoint")
    return ckpt


def load_checkpoint(path, build, settings, device="cpu", kinds=KINDS, resume=False) -> dict:
    """A checkpoint loaded safely (load_file: weights_only=True), then checked by checkpoint_problem() against the
    model build(kind, model_args) makes and the settings dataclass `settings` (train.TrainConfig):
    anything but a whole, uncorrupted checkpoint of one of `kinds` stops with one line naming the first problem.
    resume=True also requires what a resumed run needs (optimizer state, data position)."""
    ckpt = load_file(path, device)
    problem = checkpoint_problem(ckpt, build, settings, kinds, resume)
    if problem:
        raise SystemExit(f"error: checkpoint {path} {problem}")
    if "checksum" not in ckpt:
        print(f"warning: checkpoint {path} has no checksum (saved before checksums were added?): its weights "
              f"cannot be checked for corruption", file=sys.stderr)
    return ckpt


def checkpoint_problem(ckpt, build, settings, kinds=KINDS, resume=False):
    """The first thing wrong with a loaded checkpoint (a phrase that follows "checkpoint PATH"), or None if it is a
    whole one of `kinds`. The model its model_args describe is built on the meta device (shapes, no memory) and its
    own strict load_state_dict checks the weights' names and shapes; so does the optimizer's for its state."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("kind"), str):
        return f"holds a {type(ckpt).__name__} without a 'kind' entry; it is not a mos checkpoint"
    if ckpt["kind"] not in kinds:
        return f"is of kind {ckpt['kind']!r}; this needs one of {list(kinds)}"
    missing = [key for key in NEEDED[ckpt["kind"]] + (RESUME if resume else ()) if key not in ckpt]
    if missing:
        return f"has no {missing[0]!r} entry; it is not a whole mos checkpoint"
    if type(ckpt["step"]) is not int or ckpt["step"] < 0 or not isinstance(ckpt["model"], dict):
        return f"has step {ckpt['step']!r} (a count >= 0) or model weights that are not a dict"
    if "checksum" in ckpt and checksum(ckpt) != ckpt["checksum"]:
        return "does not match the checksum saved in it: the file was corrupted (or edited) after it was written"
    if ckpt["kind"] != "snapshot":
        try:
            with torch.device("meta"):
                model = build(ckpt["kind"], ckpt["model_args"])
            with warnings.catch_warnings():  # "copying to a meta parameter is a no-op": all we want is the check
                warnings.simplefilter("ignore")
                model.load_state_dict(ckpt["model"], strict=True)  # names and shapes, nothing copied
            for side in ("src", "tgt"):
                need(len(ckpt["vocab"][side]) == ckpt["model_args"][f"{side}_vocab"], f"a {side} vocabulary of "
                     f"{len(ckpt['vocab'][side])} tokens for a model of {ckpt['model_args'][f'{side}_vocab']}")
            for key, value in ckpt["config"].items():
                typed_value(settings, key, repr(value))  # an unknown setting, or one of the wrong type, stops
            if "optimizer" in ckpt:
                params = list(model.parameters())
                torch.optim.AdamW(params).load_state_dict(ckpt["optimizer"])  # the optimizer train.py makes
                need(all(v.shape == params[i].shape for i, s in ckpt["optimizer"]["state"].items()
                         for v in s.values() if v.dim() > 0), "optimizer state of other shapes than the model's")
            if "data" in ckpt:
                need(all(type(ckpt["data"][k]) is int and ckpt["data"][k] >= 0 for k in ("epoch", "batch")),
                     "a data position that is not {'epoch': count, 'batch': count}")
        except (Exception, SystemExit) as e:  # SystemExit: typed_value's one-line error on a stored setting
            return f"does not fit its model_args ({brief(e, 300)})"
    bad = next((k for k, v in ckpt["model"].items() if not (isinstance(v, torch.Tensor) and torch.isfinite(v).all())
                or (ckpt["kind"] == "snapshot" and not isinstance(v, torch.Tensor))), None)
    return None if bad is None else f"has non-finite values (NaN or inf) or no tensor in weight {bad!r}"


def check_vocab(ckpt, corpus, path):
    """Refuse a checkpoint trained with other vocabularies than this corpus's."""
    if ckpt["vocab"]["src"] != corpus.src_vocab.itos or ckpt["vocab"]["tgt"] != corpus.tgt_vocab.itos:
        raise SystemExit(f"error: checkpoint {path} was trained with other vocabularies than data "
                         f"{corpus.name!r}; pass the --data/--data_dir it was trained on")


def check_same(stored: dict, cfg, keys, path):
    """Refuse settings given on the command line that contradict those a checkpoint was made with, naming each."""
    norm = lambda v: json.loads(json.dumps(v))  # tuples and lists compare equal
    clashes = [f"--{k}={getattr(cfg, k)} (it has {stored.get(k)})" for k in keys
               if k in stored and norm(getattr(cfg, k)) != norm(stored[k])]
    if clashes:
        raise SystemExit(f"error: checkpoint {path} was made with other settings than {', '.join(clashes)}; "
                         f"drop these flags (the checkpoint's own are used) or use another checkpoint/--out_dir")


def check_input(ckpt, corpus, cfg, passed, fixed, path):
    """A checkpoint given as input (--init) fits this run: the corpus's vocabularies, and no setting on the command
    line (`passed`) among those it fixes (`fixed`, its model's) that contradicts its own."""
    check_vocab(ckpt, corpus, path)
    check_same(ckpt["config"], cfg, [k for k in passed if k in fixed], path)


def is_snapshot_step(step: int, cfg, interval: int) -> bool:
    """Whether the weights after `step` are one of the avg_last snapshots averaged for the final test: every
    `interval` steps counted back from max_steps, the last avg_last of them (HAT: the last 10 epoch checkpoints)."""
    before_end = cfg.max_steps - step
    return cfg.avg_last > 0 and 0 <= before_end < cfg.avg_last * interval and before_end % interval == 0


def average_snapshots(model, cfg, interval: int, out_dir, load):
    """Load into `model` the mean of the snapshots out_dir/ckpt_step<s>.pt of the steps is_snapshot_step names that
    exist (load(path) reads one): HAT's checkpoint averaging before the final test. A run stopped early
    (max_minutes) has fewer, or none."""
    steps = [s for s in range(cfg.max_steps + 1) if is_snapshot_step(s, cfg, interval)]
    found = [out_dir / f"ckpt_step{s}.pt" for s in steps if (out_dir / f"ckpt_step{s}.pt").exists()]
    if found:
        states = [load(p)["model"] for p in found]
        model.load_state_dict({k: sum(s[k].float() for s in states) / len(states) for k in states[0]})
    print(f"averaged {len(found)} of {len(steps)} snapshots (steps {steps[0]}..{steps[-1]}, every {interval})"
          if found else f"no averaging snapshot was written (the run stopped before step {steps[0]}): testing the "
          f"last weights")


def save_run(path, model, optimizer, step: int, **entries):
    """A training run's ckpt.pt: the model, the optimizer and `entries` (kind, model_args, config, data position,
    vocabularies, data hash, training seconds) as a plain dict; never non-finite weights over a good checkpoint."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise SystemExit(f"error: the weights are not finite at step {step}; kept the last checkpoint {path}")
    save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, **entries,
                         torch_version=str(torch.__version__)), path)


def restore_run(ckpt, model, optimizer) -> tuple:
    """The inverse of save_run: load a resumed run's weights and optimizer state; returns where training stood,
    (step, epoch, batch within the epoch, training seconds so far); a new run (ckpt None) starts at zero."""
    if ckpt is None:
        return 0, 0, 0, 0.0
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["step"], ckpt["data"]["epoch"], ckpt["data"]["batch"], ckpt["train_seconds"]
