"""One writer per run folder (issue 16): train.py, search.py, latency.py dataset and reproduce.py hold an OS lock on
what they write for as long as they run. A second writer, in another process, is refused with one line naming the
holder's pid, and allowed again once the holder is gone, also after a SIGKILL (a flock dies with its process).
Within one process the lock is re-entrant, so reproduce.py can run the other commands in-process.
Run: python -m pytest -q tests/test_lock.py"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runs import files
from experiments import reproduce
import latency
import search
import train

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TOY = ["--preset=toy", "--bleu_sentences=-1", "--test_sentences=4", "--log_interval=1", "--save_interval=1"]
# another process that takes a lock the way the commands do, says so, and holds it until it is killed
HOLD = "import signal, sys; sys.path.insert(0, {root!r}); from runs import files; files.{fn}({path!r}); print('holding'); " \
       "sys.stdout.flush(); signal.pause()"
# another process that tries to take a lock file (plain flock: no imports to wait for); exit status 0 if it could
TRY = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
WAIT_AND_HOLD = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); time.sleep(300)"


def hold(fn, path):
    """A process holding files.fn(path)'s lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), fn=fn, path=str(path))], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "holding\n"
    return proc


def free(lock_file) -> bool:
    """Whether another process could take this lock now."""
    return subprocess.run([sys.executable, "-c", TRY, str(lock_file)], timeout=60).returncode == 0


def test_a_second_train_is_refused_while_the_first_runs_and_allowed_after_a_sigkill(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *TOY, "--max_steps=100000", f"--out_dir={out}"], cwd=ROOT,
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "ckpt.pt").exists():  # training, with a checkpoint written
            assert first.poll() is None and time.time() < deadline, "the first train.py ended or did not start"
            time.sleep(0.05)
        for resume in ([], ["--resume=True"]):  # a new run and a resume of the same folder, from this process
            with pytest.raises(SystemExit) as e:
                train.main([*TOY, "--max_steps=3", f"--out_dir={out}", *resume])
            assert str(e.value).startswith(f"error: {out} is being written by process {first.pid} ")
            assert "\n" not in str(e.value) and (out / ".lock").read_text() == f"{first.pid}\n"
        assert first.poll() is None  # the first one runs on, undisturbed
    finally:
        first.kill()  # SIGKILL: no chance to clean up
        first.wait()
    step = train.load_checkpoint(out / "ckpt.pt")["step"]
    train.main([*TOY, f"--out_dir={out}", "--resume=True", f"--max_steps={step + 1}"])
    assert train.load_checkpoint(out / "ckpt.pt")["step"] == step + 1 and free(out / ".lock")


def search_args(tiny, out):
    """search.py on the tiny supernet, as small as it goes."""
    return [f"--ckpt={tiny / 'ckpt.pt'}", f"--predictor={tiny / 'predictor.json'}", f"--out_dir={out}",
            "--budgets=[20]", "--valid_sentences=50", "--threads=1", "--population=8", "--parents=2",
            "--mutations=3", "--crossovers=3", "--iterations=2", "--final_iters=1", "--final_repeats=1",
            "--final_warmup=0"]


@pytest.mark.parametrize("command", ["search", "latency dataset", "reproduce"])
def test_search_latency_and_reproduce_refuse_a_second_writer_until_the_first_is_killed(command, tiny, tmp_path):
    out = tmp_path / "out"
    fn, lock, run = {
        "search": ("lock_folder", out / ".lock", lambda: search.main(search_args(tiny, out))),
        "latency dataset": ("lock_file", tmp_path / "out.lock", lambda: latency.main(
            ["dataset", "--space=tiny", "--n=2", f"--out={out}", "--threads=1", "--warmup=0", "--iters=1"])),
        # a stage that fails at once (no data), after reproduce.py has taken its lock and written its settings
        "reproduce": ("lock_folder", out / ".lock", lambda: reproduce.main(
            ["--preset=toy", f"--out={out}", f"--extra=['--data=iwslt14','--data_dir={tmp_path / 'none'}',"
                                             f"'--data_source={tmp_path / 'nowhere'}']"])),
    }[command]
    holder = hold(fn, out)
    with pytest.raises(SystemExit, match=f"^error: {out} is being written by process {holder.pid} [^\n]*$"):
        run()
    assert not out.exists() or not [p for p in out.iterdir() if p.name != ".lock"]  # nothing written
    holder.kill()
    holder.wait()
    if command == "reproduce":
        with pytest.raises(SystemExit, match="--data_source"):  # past the lock, in the stage
            run()
        assert (out / "settings.json").exists()
    else:
        run()
        assert (out / "results.json").exists() if command == "search" else len(out.read_text().splitlines()) == 3
    assert lock.read_text() == f"{os.getpid()}\n" and free(lock)  # it held the lock, and let it go when done


def test_the_lock_is_reentrant_in_a_process_and_released_when_its_command_ends(tmp_path):
    folder = tmp_path / "run"

    @files.releases_locks
    def command(fail=False):
        """Takes the lock twice (as train.py does when resuming) and once more in a nested in-process command."""
        files.lock_folder(folder)
        files.lock_folder(folder)
        nested()
        assert not free(folder / ".lock")  # the nested command's end does not release its caller's lock
        if fail:
            raise SystemExit("error: something")

    @files.releases_locks
    def nested():
        files.lock_folder(folder)

    command()
    assert free(folder / ".lock")
    with pytest.raises(SystemExit):
        command(fail=True)
    assert free(folder / ".lock")  # released after a failure too
    proc = subprocess.Popen([sys.executable, "-c", WAIT_AND_HOLD, str(folder / ".lock")])
    try:
        while free(folder / ".lock"):  # until that process holds it
            assert proc.poll() is None
            time.sleep(0.05)
        with pytest.raises(SystemExit, match="is being written by process"):
            command()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    command()
