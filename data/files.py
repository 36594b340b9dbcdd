"""
Files that are never half-written and folders with one writer: the run-safety file I/O every command shares.

    with atomic_open("out/results.json") as f: ...   # a temp file renamed into place only once it is whole
    write_json(path, obj); read_json(path)           # the same for JSON, and a one-line error for a bad file
    lock_folder("out")                               # or `error: out is being written by process 1234 ...`

    save_checkpoint(dict(model=..., step=...), path); load_file(path)   # checksummed, weights_only=True
Nothing here knows about models: train.load_checkpoint checks that a loaded file is a whole checkpoint of one.
"""

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

import torch


def brief(e: Exception, limit=150) -> str:
    """An exception as a short one-line text for an error message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


@contextmanager
def atomic_open(path, mode="w"):
    """Open `path.tmp` for writing and rename it to `path` only if the block finishes; a failed or
    interrupted write leaves the old `path` (if any) untouched and no `.tmp` behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        # newline="" keeps "\n" as is, so files are byte-identical across platforms
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so even a power cut leaves one whole file
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    """Write JSON atomically (temporary file, then rename)."""
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def read_json(path, what="file"):
    """Parsed JSON of `path`, or a one-line error (missing, unreadable, not UTF-8, not JSON, nested too deeply)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SystemExit(f"error: cannot read {what} {path} ({brief(e)})")


def append_jsonl(path, record: dict):
    """One JSON record per line, appended."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list:
    """The whole records of a JSON-lines log (a line a kill cut short, or any line that is not JSON, is left out);
    [] if there is no log."""
    path, records = Path(path), []
    for line in (path.read_text().splitlines(keepends=True) if path.exists() else []):
        if not line.endswith("\n"):  # the last line of a killed run may be half written
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def trim_jsonl(path, last_step: int):
    """Keep the whole records up to `last_step`, so a resumed run's log reads as if it had never stopped (a finished
    run's "final" record goes too: a resumed run ends with its own)."""
    if Path(path).exists():
        kept = [r for r in read_jsonl(path) if isinstance(r, dict) and type(r.get("step")) is int
                and r["step"] <= last_step]  # a line edited into something else goes too
        with atomic_open(path) as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))


# -----------------------------------------------------------------------------
# One writer per run folder: an OS lock (flock) that ends with the process, however it ends


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
    """Take the exclusive lock folder/.lock for this process (created with the folder unless create=False). A SIGKILL
    never leaves a stale lock; a second writer stops with a one-line error naming the pid that holds it."""
    if not create and not Path(folder).is_dir():
        raise SystemExit(f"error: {folder} does not exist (or is not a folder)")
    return _lock(writable_folder(folder) / ".lock", Path(folder))


OWNER = "owner.json"  # which command made a run folder, and from what: {"command": ..., "inputs": {...}}


def claim_folder(folder, command: str, inputs: dict, overwrite=False, refuse_if=(), legacy=()) -> Path:
    """Lock `folder` and make it this run's: a run folder has an owner, recorded in owner.json. Refused in one line
    naming the folder, what it holds and the flag to pass: files of another command's run, this command's run made
    from other `inputs` (checkpoint, corpus, space, settings), or one holding any of the `refuse_if` files (train.py
    without --resume: a finished or interrupted run). overwrite=True first deletes the old run's files, so nothing
    of it is left beside the new one. A folder from before owners were recorded counts as this command's if it
    holds one of the `legacy` files."""
    folder = Path(folder)
    lock_folder(folder)
    old = [p for p in sorted(folder.iterdir()) if p.name not in (".lock", OWNER)]
    owner = read_json(folder / OWNER, "run folder owner") if (folder / OWNER).exists() else None
    if overwrite:
        for p in old + [folder / OWNER] * (owner is not None):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        old, owner = [], None
    if owner is None and any((folder / name).exists() for name in legacy):
        owner = {"command": command, "inputs": inputs}  # an older run of this command: adopted as it is
    again = f"give another folder or pass --overwrite=True to delete what {folder} holds first"
    if old and not isinstance(owner, dict):
        raise SystemExit(f"error: {folder} holds files of another run ({', '.join(p.name for p in old[:3])}); {again}")
    stored = owner.get("inputs", {}) if owner else inputs
    changed = [k for k in sorted(set(stored) | set(inputs)) if json.dumps(stored.get(k)) != json.dumps(inputs.get(k))]
    if owner and owner.get("command") != command:
        raise SystemExit(f"error: {folder} holds a {owner.get('command')} run, not a {command} one; {again}")
    if changed:
        raise SystemExit(f"error: {folder} holds a {command} run made with another {changed[0]} (it has "
                         f"{stored.get(changed[0])!r}, now {inputs.get(changed[0])!r}); {again}")
    found = [name for name in refuse_if if (folder / name).exists()]
    if found:
        raise SystemExit(f"error: {folder} holds a {command} run ({', '.join(found)}); continue it with "
                         f"--resume=True, or {again}")
    write_json(folder / OWNER, {"command": command, "inputs": inputs})
    return folder


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
    caller holds stay held), so the experiments and tests can run commands in-process one after another."""
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
# Checkpoint files: plain dicts of tensors, saved atomically with a checksum, loaded with weights_only=True


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
