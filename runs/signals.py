"""
Stop signals and a command's entry point: Ctrl-C and SIGTERM (what SLURM and Kubernetes send before SIGKILL) end a
command in one line, with everything finished already on disk; train.py defers them to the end of a step.

    if __name__ == "__main__":
        run(main, resume_hint="rerun the same command to continue")
"""

import signal
import sys
from contextlib import contextmanager

from runs.files import brief

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what schedulers (SLURM, Kubernetes) send before SIGKILL
received = []  # every stop signal this process caught, in order (experiments/reproduce.py asks after a train.main)


class Stopped(BaseException):
    """A stop signal arrived (a BaseException, like KeyboardInterrupt: `except Exception` does not swallow it)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequests:
    """A `with` block in which SIGINT and SIGTERM only ask for a stop (train.py's loop stops after the step and
    saves); `asked` is the first such signal's name, or None."""

    def __enter__(self):
        self.noted = []
        note = lambda signum, frame: self.noted.append(signum) or received.append(signum)
        self.previous = {s: signal.signal(s, note) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():  # the handlers from before the block
            signal.signal(s, handler)

    @property
    def asked(self):
        """The name of the first stop signal caught in the block, or None."""
        return signal.Signals(self.noted[0]).name if self.noted else None


@contextmanager
def stops_end_quietly(hint: str):
    """A `with` block that a stop signal ends at once with one line on stderr, "stopped by SIGTERM " + hint, after
    which the command goes on (train.py's final test: its checkpoint is saved, a resume runs the test)."""
    previous = {s: signal.signal(s, raise_stopped) for s in STOP_SIGNALS}
    try:
        yield
    except Stopped as e:
        print(f"stopped by {signal.Signals(e.signum).name} {hint}", file=sys.stderr)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def raise_stopped(signum, frame):
    """The handler outside the training loop: stop where we are (everything finished is already on disk)."""
    received.append(signum)
    raise Stopped(signum)


def run(main, resume_hint="rerun the same command to continue"):
    """A script's entry point: main(sys.argv[1:]) with SIGINT and SIGTERM raising Stopped wherever it is (train.py
    defers them in its loop). Everything finished is already on disk (atomic writes, caches, whole CSV rows), so a
    stop prints one line and exits with 128 + the signal's number (130 Ctrl-C, 143 SIGTERM), as a shell would; a
    write that fails (a full disk, a file-size limit) ends in one line `error: ...` too."""
    for s in STOP_SIGNALS:
        signal.signal(s, raise_stopped)
    caught = len(received)
    try:
        main(sys.argv[1:])
    except (Stopped, Exception) as e:
        # a Stopped raised inside a library's cleanup can surface as that library's error (torch: "trying to pop
        # from empty mode stack"): a signal caught during this run makes it a stop all the same, not a crash
        signum = e.signum if isinstance(e, Stopped) else received[-1] if len(received) > caught else None
        if signum is not None:
            print(f"stopped by {signal.Signals(signum).name}; {resume_hint}", file=sys.stderr)
            sys.exit(128 + signum)
        if isinstance(e, OSError):  # a full disk (ENOSPC), a file-size limit (EFBIG), no permission: files stay whole
            raise SystemExit(f"error: cannot write {e.filename or 'a file'} ({e.strerror or brief(e)}); free space or "
                             f"fix the permissions, then {resume_hint}")
        raise
