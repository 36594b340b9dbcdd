"""
Files that are never half-written and folders with one writer: the file I/O every command shares.

    with atomic_open("out/results.json") as f: ...   # a temp file renamed into place only once it is whole
    write_json(path, obj); read_json(path)           # the same for JSON, and a one-line error for a bad file
    lock_folder("out")                               # or `error: out is being written by process 1234 ...`
"""

import fcntl
import json
import os
import sys
from contextlib import contextmanager
from functools import wraps
from pathlib import Path


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


def write_lines(path, lines):
    """Write text lines, one per line, atomically."""
    with atomic_open(path) as f:
        f.write("".join(line + "\n" for line in lines))


def read_lines(path, what: str) -> list:
    """The lines of a UTF-8 text file ('-': standard input), or a one-line error naming the setting `what`."""
    try:
        return (sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read {what}={path} ({e}); give a UTF-8 text file or -")


def append_jsonl(path, record: dict):
    """One JSON record per line, appended."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list:
    """The whole records of a JSON-lines log: a line a kill cut short, and any line that is not a JSON object in
    UTF-8 (a damaged or edited log), is left out; [] if there is no log."""
    path, records = Path(path), []
    for line in (path.read_bytes().splitlines(keepends=True) if path.exists() else []):
        if not line.endswith(b"\n"):  # the last line of a killed run may be half written
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def trim_jsonl(path, last_step: int):
    """Keep the whole records up to `last_step`, so a resumed run's log reads as if it had never stopped (a finished
    run's "final" record goes too: a resumed run ends with its own)."""
    if Path(path).exists():
        kept = [r for r in read_jsonl(path) if type(r.get("step")) is int and r["step"] <= last_step]
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
# A persistent cache: what a killed command computed is never computed again


def json_key(x) -> str:
    """x.to_dict() (an ArchConfig's) as compact JSON text: a cache key that survives a JSON file."""
    return json.dumps(x.to_dict(), separators=(",", ":"))


def file_identity(path, name: str) -> dict:
    """A file's absolute path, size and modification time, under `name`: what numbers derived from it depend on."""
    stat = Path(path).stat()
    return {name: str(Path(path).resolve()), f"{name}_bytes": stat.st_size, f"{name}_mtime": stat.st_mtime}


class Cache:
    """Numbers per key (search.py: per arch), kept in memory and in a JSON file, rewritten atomically after every
    new entry, so a killed command reruns to the same point without computing anything twice. `tag` says what the
    numbers depend on; a file made under another tag is ignored."""

    def __init__(self, path, tag, conditions=None):
        """Load the stored values of `path` if they were made under the same `tag`. `conditions` (the machine's
        state when this session started) is appended to the file's list of sessions, beside the values."""
        self.path, self.tag, self.data, self.sessions = Path(path), tag, {}, []
        if self.path.exists():
            try:
                stored = json.loads(self.path.read_text())
            except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deeply
                raise SystemExit(f"error: {self.path} is not valid JSON (edited by hand?); delete it to rescore")
            if isinstance(stored, dict) and stored.get("tag") == tag and isinstance(stored.get("values"), dict):
                self.data, self.sessions = stored["values"], list(stored.get("sessions", []))
                print(f"resuming from {self.path}: {sum(len(v) for v in self.data.values())} cached values")
            else:
                print(f"ignoring {self.path}: it was made with other settings or another checkpoint")
        if conditions:
            self.sessions.append(conditions)
            self.save()

    def save(self):
        """Rewrite the file atomically: a kill mid-write leaves the previous one."""
        with atomic_open(self.path) as f:
            f.write(json.dumps({"tag": self.tag, "values": self.data, "sessions": self.sessions}))

    def wrap(self, kind, fn):
        """fn(x) -> float, computed once per x (an ArchConfig, keyed by json_key) and stored under `kind`."""
        table = self.data.setdefault(kind, {})

        def cached(x):
            """fn(x), computed and written to disk only the first time."""
            key = json_key(x)
            if key not in table:
                table[key] = fn(x)
                self.save()
            return table[key]
        return cached
