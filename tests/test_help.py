"""--help and -h on every command (issue 43): the settings with type, default and the comment beside each field,
in the order of the code, and the presets; exit status 0, nothing written.
Run: python -m pytest -q tests/test_help.py (a few seconds)"""

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import latency
import search
import train
from experiments import bench, fronts, gap, latency_checks, reproduce

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [  # (name, main, argv before the flag, settings class, presets)
    ("train.py", train.main, [], train.TrainConfig, train.PRESETS),
    *[(f"latency.py {c}", latency.main, [c], latency.LatencyConfig, None) for c in latency.COMMANDS],
    ("search.py", search.main, [], search.SearchConfig, None),
    ("experiments/bench.py", bench.main, [], bench.BenchConfig, None),
    ("experiments/bench.py precision", bench.precision, [], bench.PrecisionConfig, None),
    ("experiments/bench.py save", bench.save_cost, [], bench.SaveConfig, None),
    ("experiments/bench.py prep", bench.forward_prep, [], bench.PrepConfig, None),
    ("experiments/gap.py", gap.main, [], gap.GapConfig, gap.PRESETS),
    ("experiments/fronts.py", fronts.main, [], fronts.FrontsConfig, fronts.PRESETS),
    ("experiments/reproduce.py", reproduce.main, [], reproduce.ReproConfig, reproduce.PRESETS),
    *[(f"experiments/latency_checks.py {c}", latency_checks.main, [c], latency_checks.ChecksConfig, None)
      for c in latency_checks.COMMANDS],
]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("name, main, argv, cls, presets", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_prints_its_settings_and_exits_0(name, main, argv, cls, presets, flag, capsys, tmp_path,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*argv, flag, "--bogus=1"])  # help wins over everything else on the line
    assert e.value.code == 0
    out = capsys.readouterr().out
    positions = [out.index(f"  --{f.name}=") for f in fields(cls)]
    assert positions == sorted(positions), "the settings in the order of the code"
    for preset in presets or ():
        assert f"--preset={preset}:" in out
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_help_carries_the_comment_beside_each_field_and_its_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "--lr=0.001 (float)" in out and "--bf16=None (bool or None)" in out
    assert "--max_minutes=55.0 (float)  stop (and save) after this much training time, so the default run ends " \
           "within the hour even on a slower or busy machine; 0 = no limit" in out  # a comment wrapped in the code
    assert "--preset=toy: --data=toy --space=tiny" in out


@pytest.mark.parametrize("args", [["train.py", "--help"], ["latency.py", "fit", "-h"], ["data/prepare.py", "--help"],
                                  ["-m", "experiments.gap", "--help"]])
def test_help_through_the_command_line(args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "" and "--" in r.stdout, r.stderr[-500:]
    if args[0] == "data/prepare.py":
        assert "--train_dir" in r.stdout  # argparse's own help: the same promise
    else:
        assert "settings, with their defaults:" in r.stdout
