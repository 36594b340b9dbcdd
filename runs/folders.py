"""
The run-folder contract: where a mos command may write, and what it may delete. Every writer goes through it:
train.py --out_dir, search.py --out_dir and data/prepare.py --out claim a folder; latency.py dataset --out,
fit --predictor and --log claim a single file.

  1. Impossible targets are refused before anything is read or written: an empty path, the current folder or one
     above it, the home folder, the filesystem root, a folder holding .git or *.py files (a symlink resolves first).
  2. An input is never an output: a folder that equals, contains or lies inside an input, or a file that is one.
  3. A run folder has an owner record, owner.json: the command that made it, what it was made from, and the files
     written there beyond the command's named set (WRITES). A folder holding any other entry is refused, with or
     without --overwrite, naming the first foreign entries; it is never emptied.
  4. --overwrite=True deletes only the owner's files, then starts over.
  5. A single-file output replaces (or appends to) only a file of its own kind, and never one inside a run folder.

    folder = claim_folder("out", "train.py", inputs={}, reads=[cfg.init, cfg.data_dir], overwrite=cfg.overwrite)
    claim_file("out_latency/predictor.json", "latency predictor", is_predictor, reads=[cfg.out])
"""

import json
import shlex
import shutil
from fnmatch import fnmatch
from pathlib import Path

from runs.files import brief, lock_file, lock_folder, trim_jsonl, write_json

OWNER = "owner.json"  # {"command": ..., "inputs": {...}, "files": [patterns of files written beyond WRITES]}
# the entries each command writes in its folder (fnmatch patterns; a trailing "/" is a folder it made) ...
WRITES = {
    "train.py": ("config.json", "ckpt.pt", "ckpt_step*.pt", "log.jsonl", "train_log.jsonl", "results.json",
                 "hyps_*.txt", "ddp_check.json"),
    "search.py": ("cache.json", "arch_*ms.json", "arch_p*.json", "results.json", "candidates.png", "convergence.png"),
    "data/prepare.py": ("summary.json", "corpus.npz", "bpe.codes", "vocab.*.txt", "*.bpe.de", "*.bpe.en",
                        "*.tok.en", "fairseq/"),
}
ALWAYS = (OWNER, ".lock")  # ... besides the owner record and the writer's lock; any of them + ".tmp" is a write a
# kill cut short (runs.files.atomic_open)


def check_target(path, what: str, reads=(), file=False) -> Path:
    """Refuse, in one line, an output `path` (--out_dir and the like, named `what`) that is an impossible target
    (rule 1; a file's folder may be any folder) or is one of the command's `reads` or overlaps one (rule 2)."""
    if str(path).strip() == "":
        raise SystemExit(f"error: {what} is empty (an unset shell variable?); give a folder or file name")
    real, here = Path(path).resolve(), Path.cwd().resolve()
    problem = None
    if file and real.is_dir():
        problem = "is a folder; give a file path"
    elif not file and real.exists() and not real.is_dir():
        problem = "is a file, not a folder"
    elif not file and (real == here or real in here.parents):
        problem = "is the current folder or a folder above it"
    elif not file and real == Path.home().resolve():
        problem = "is the home folder"
    elif not file and real.is_dir() and (real / ".git").exists():
        problem = "holds a .git entry (a repository)"
    elif not file and real.is_dir() and any(real.glob("*.py")):
        problem = "holds Python files (source code)"
    for read in (str(r) for r in reads if r):  # ("" is an unset input, never the current folder)
        source = Path(read).resolve()
        if problem is None and (real == source or source in real.parents or real in source.parents):
            relation = "is" if real == source else "lies inside" if source in real.parents else "contains"
            problem = f"{relation} an input of this command ({read})"
    if problem:
        raise SystemExit(f"error: {what}={shlex.quote(str(path))} {problem}; mos never writes there, give another "
                         f"{'file' if file else 'folder'}")
    return Path(path)


def read_owner(folder: Path):
    """The owner record of a folder as a dict, None if it has none, or one line naming the damaged file."""
    path = folder / OWNER
    if not path.exists():
        return None
    try:
        owner = json.loads(path.read_bytes().decode("utf-8"))
        if not (isinstance(owner, dict) and owner.get("command") in WRITES and isinstance(owner.get("inputs", {}), dict)
                and all(isinstance(p, str) for p in owner.setdefault("files", []))):
            raise ValueError(f"not an object with a known command, inputs and files: {str(owner)[:80]}")
    except (OSError, ValueError, TypeError, RecursionError) as e:
        raise SystemExit(f"error: {path} is damaged ({brief(e, 120)}); it says which mos command wrote the folder: "
                         f"restore it, or move the folder's files you want to keep and give another folder")
    return owner


def ours(entry: Path, patterns) -> bool:
    """Whether a folder entry is one of `patterns` (or the temporary file of an atomic write of one): a folder only
    where its pattern ends in "/", a file (or link) only where it does not."""
    folder = entry.is_dir() and not entry.is_symlink()
    return any(p.endswith("/") == folder and (fnmatch(entry.name, p.rstrip("/")) or fnmatch(entry.name, p + ".tmp"))
               for p in (*ALWAYS, *patterns))


def claim_folder(folder, command: str, inputs: dict, reads=(), overwrite=False, refuse_if=(), legacy=(), also=(),
                 what="--out_dir") -> Path:
    """Check, lock and record `folder` as `command`'s run folder (rules 1-4); refused in one line naming the folder,
    what it holds and what to do. `inputs`: what the run is made from, stored in the owner record (a rerun with
    other inputs is refused); `reads`: the paths the command reads; `refuse_if`: files that refuse the folder
    without --overwrite (train.py without --resume: a finished or interrupted run); `legacy`: files that make a
    folder without owner record this command's (a run from before owner records), if all it holds is this
    command's; `also`: patterns of files written there besides WRITES[command] (the experiments' extra files)."""
    folder = check_target(folder, what, reads)
    if (folder.resolve().parent / OWNER).exists():
        raise SystemExit(f"error: {what}={shlex.quote(str(folder))} lies inside {folder.resolve().parent}, another "
                         f"run's folder; give a folder outside it")
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    owner = read_owner(folder)
    own = WRITES[command] + tuple(also)
    if owner is None and entries and all(ours(e, own) for e in entries) and any(e.name in legacy for e in entries):
        owner = {"command": command, "inputs": inputs, "files": list(also)}  # an older run of this command, adopted
    patterns = WRITES[owner["command"]] + tuple(owner["files"]) if owner else ()
    patterns += tuple(also) if owner and owner["command"] == command else ()
    foreign = [e.name for e in entries if not ours(e, patterns)]
    if foreign:
        raise SystemExit(f"error: {folder} holds entries no mos command wrote there ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); mos never writes or deletes there: give another "
                         f"folder")
    lock_folder(folder)
    again = "give another folder" + (", or pass --overwrite=True to delete that run's files first"
                                     if what == "--out_dir" else "")  # (data/prepare.py --out has no --overwrite)
    if owner and overwrite:
        for path in sorted(folder.iterdir()):
            if path.name != ".lock" and ours(path, patterns):  # the owner's files only (checked above: nothing else)
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        owner = None
    if owner and owner["command"] != command:
        raise SystemExit(f"error: {folder} holds a {owner['command']} run, not a {command} one; {again}")
    stored = owner["inputs"] if owner else inputs
    changed = [k for k in sorted(set(stored) | set(inputs)) if json.dumps(stored.get(k)) != json.dumps(inputs.get(k))]
    if changed:
        raise SystemExit(f"error: {folder} holds a {command} run made with another {changed[0]} (it has "
                         f"{stored.get(changed[0])!r}, now {inputs.get(changed[0])!r}); {again}")
    found = [name for name in refuse_if if (folder / name).exists()]
    if found:
        raise SystemExit(f"error: {folder} holds a {command} run ({', '.join(found)}); continue it with "
                         f"--resume=True, or {again}")
    files = sorted(set(owner["files"] if owner else []) | set(also))
    write_json(folder / OWNER, {"command": command, "inputs": inputs, "files": files})
    return folder


def claim_file(path, kind: str, is_kind, reads=(), what="--out") -> Path:
    """Check and lock a single-file output (rules 1, 2 and 5): refused if it is empty, a folder, an input, inside a
    run folder, or an existing file that is_kind(path) says is not a `kind`."""
    path = check_target(path, what, reads, file=True)
    if (path.parent / OWNER).exists():
        raise SystemExit(f"error: {what}={shlex.quote(str(path))} lies in {path.parent}, a run folder (it has an "
                         f"{OWNER}); give a file outside run folders")
    if path.exists() and not is_kind(path):
        raise SystemExit(f"error: {what}={shlex.quote(str(path))} exists and is not a {kind}; mos replaces or "
                         f"appends to only a {kind}: give another file")
    lock_file(path)
    return path


def is_png(path) -> bool:
    """Whether a file is a PNG image (a plot a command wrote and may replace)."""
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def is_jsonl_of(path, keys) -> bool:
    """Whether a file is a JSON-lines log whose records all hold `keys` (an empty file is one)."""
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
        return all(isinstance(r := json.loads(line), dict) and all(k in r for k in keys) for line in lines if line)
    except (OSError, ValueError, RecursionError):
        return False


def record_files(folder, patterns):
    """Add `patterns` to a run folder's owner record: files another command writes beside the run (an
    experiment's scores of it), which the owner's commands then keep and --overwrite deletes."""
    folder = Path(folder)
    owner = read_owner(folder)
    if owner is None:
        raise SystemExit(f"error: {folder} has no {OWNER}: it is not a run folder of a mos command")
    if not set(patterns) <= set(owner["files"]):
        write_json(folder / OWNER, {**owner, "files": sorted(set(owner["files"]) | set(patterns))})


def open_train_folder(out_dir, config: dict, resumed_step, reads, overwrite: bool) -> Path:
    """train.py's run folder: claimed (refused if it holds a finished or interrupted run that --resume=True does not
    continue), with fresh logs (a resumed run drops the steps a killed run logged after its checkpoint: they are
    redone, so the logs read as one run), no averaging snapshots of an earlier run, and config.json written."""
    out_dir = claim_folder(out_dir, "train.py", {}, reads=reads, overwrite=overwrite, legacy=("config.json",),
                           refuse_if=() if resumed_step is not None else ("ckpt.pt", "results.json"))
    for name in ("train_log.jsonl", "log.jsonl"):
        if resumed_step is not None:
            trim_jsonl(out_dir / name, resumed_step)
        else:
            (out_dir / name).unlink(missing_ok=True)
    for old in out_dir.glob("ckpt_step*.pt") if resumed_step is None else ():
        old.unlink()
    write_json(out_dir / "config.json", config)
    return out_dir
