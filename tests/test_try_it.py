"""The README's "Try it in two minutes" runs as written: every command of its block, in order, in a scratch copy of
the project (the toy preset needs no data), each exiting 0 with the files the next one reads.
Behind the slow marker (1-1.5 minutes, the largest share of the default run, which must stay under 10 minutes);
the default run still parses and checks every command of the block (test_layout.py) and runs the same pipeline,
train to finetune, through reproduce.py (test_kill.py). Run: python -m pytest -q -m slow tests/test_try_it.py"""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def try_it_commands() -> list:
    """The command lines of the README's "Try it in two minutes" block, comments cut, continuation lines joined."""
    section = (ROOT / "README.md").read_text().split("## Try it in two minutes", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.split("  #")[0].strip()]


@pytest.mark.slow
def test_the_toy_walkthrough_runs_as_written(tmp_path):
    for path in [*ROOT.glob("*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("runs/*.py")]:
        (tmp_path / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp_path / path.relative_to(ROOT))
    commands = try_it_commands()
    assert [shlex.split(c)[1] for c in commands] == ["train.py", "latency.py", "latency.py", "search.py", "train.py",
                                                    "train.py"], commands
    for command in commands:
        words = shlex.split(command)
        r = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (command, r.stderr[-2000:])
    assert (tmp_path / "out_toy_ft" / "ckpt.pt").exists() and "BLEU" in r.stdout
