"""Tests of train.py: every mode on the synthetic task and on Multi30k, exact resume, 2-process torchrun,
BLEU, settings and checkpoints (CPU). Run: python -m pytest -q tests/test_train.py"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sacrebleu
import torch

import train
from data.prepare import load_data
from runs.files import read_jsonl
from runs.checkpoints import save_checkpoint
from runs.files import write_json
from runs.settings import parse_settings

ROOT = Path(__file__).resolve().parent.parent
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k" / "tok"
TOY = ["--preset=toy", "--bleu_sentences=-1", "--test_sentences=20", "--log_interval=1"]


def run(tmp_path, *args, name="run"):
    """train.main in-process with a fresh out_dir; returns that folder."""
    out = tmp_path / name
    train.main([*TOY, f"--out_dir={out}", *args])
    return out


def losses(out):
    """The per-step training records (step, lr, each subnet's loss), without the timing."""
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in read_jsonl(out / "train_log.jsonl")]


def test_supernet_sandwich_random_and_distill_steps_on_toy(tmp_path):
    for mode in (["--sampling=sandwich", "--n_random=2"], ["--sampling=random", "--router=layer"],
                 ["--distill=True"], ["--router=none", "--num_experts=1"]):
        out = run(tmp_path, "--max_steps=3", *mode, name="-".join(mode).replace("--", ""))
        log = losses(out)
        assert [r["step"] for r in log] == [1, 2, 3]
        assert len([k for k in log[0] if k[0] in "LSR"]) == (4 if "--n_random=2" in mode else
                                                             1 if "--sampling=random" in mode else 3)
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # plain dict: loads without pickled objects
        assert ckpt["kind"] == "supernet" and ckpt["step"] == 3
        results = json.loads((out / "results.json").read_text())
        assert {"largest", "smallest", "middle"} <= set(results)


def test_the_final_test_keeps_the_translations_behind_every_bleu(tmp_path):
    out = run(tmp_path, "--max_steps=3")
    results, corpus = json.loads((out / "results.json").read_text()), load_data("toy", seed=1337)
    for name in ("largest", "smallest", "middle"):
        hyps = (out / f"hyps_test_{name}.txt").read_text().splitlines()
        assert len(hyps) == 20  # --test_sentences=20, in corpus order
        assert train.bleu_score(hyps, corpus.refs["test"][:20])[0] == pytest.approx(results[name]["bleu"])


def test_config_defaults_are_the_default_run_and_presets_list_only_differences():
    assert parse_settings(train.TrainConfig, [], presets=train.PRESETS) == train.TrainConfig()  # bare `python train.py` runs the dataclass's defaults
    defaults = train.TrainConfig()
    for name, preset in train.PRESETS.items():
        assert all(getattr(defaults, k) != v for k, v in preset.items()), name
    assert defaults.bf16 is None  # resolved when a run starts (fast_bf16), not when train.py is imported


def test_scripts_import_without_side_effects():
    code = "import builtins, pathlib; opened = []; real = pathlib.Path.read_text\n" \
           "pathlib.Path.read_text = lambda self, *a, **k: opened.append(str(self)) or real(self, *a, **k)\n" \
           "import train, latency, search; print(opened)"
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "/proc/cpuinfo" not in found.stdout


def test_standalone_finetune_eval_and_translate(tmp_path, capsys):
    supernet = run(tmp_path, "--max_steps=30", name="super")
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(train.SPACES["tiny"].smallest().to_dict()))
    scratch = run(tmp_path, f"--arch={arch_file}", "--max_steps=3", name="scratch")
    assert torch.load(scratch / "ckpt.pt", weights_only=True)["kind"] == "standalone"
    # finetuning starts from the supernet's subnet: its step-0 loss is far below a fresh model's
    tuned = run(tmp_path, f"--arch={arch_file}", f"--init={supernet / 'ckpt.pt'}", "--max_steps=3", name="tuned")
    assert losses(tuned)[0]["model"] < losses(scratch)[0]["model"] - 0.3
    capsys.readouterr()
    train.main([*TOY, "--eval_only=True", f"--init={tuned / 'ckpt.pt'}"])
    assert "BLEU" in capsys.readouterr().out
    src = tmp_path / "src.txt"
    src.write_text("a1 a2 a3\na4 a5\n")
    train.main([*TOY, f"--translate={src}", f"--init={supernet / 'ckpt.pt'}", "--arch=largest"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_resume_continues_exactly(tmp_path):
    straight = run(tmp_path, "--max_steps=6", name="straight")
    half = run(tmp_path, "--max_steps=3", "--eval_interval=3", name="half")
    train.main([*TOY, f"--out_dir={half}", "--resume=True", "--max_steps=6"])
    assert losses(half) == losses(straight)
    a, b = (torch.load(p / "ckpt.pt", weights_only=True)["model"] for p in (straight, half))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks_sample_same_subnets_and_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",  # a free port
           str(ROOT / "train.py"), *TOY, "--max_steps=4", f"--out_dir={out}"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check = json.loads((out / "ddp_check.json").read_text())
    assert check["in_sync"] and len(check["rank_digests"]) == 2
    assert len({d[1] for d in check["rank_digests"]}) == 1  # identical subnet sequence on both ranks


def test_bleu_helper_matches_sacrebleu_with_bpe_removed():
    hyps = ["a sm@@ all dog runs .", "two people are wal@@ king on the beach ."]
    refs = ["a small dog is running .", "two people walk on the beach ."]
    score, signature = train.bleu_score(hyps, refs)
    plain = ["a small dog runs .", "two people are walking on the beach ."]
    expected = sacrebleu.corpus_bleu(plain, [refs], tokenize="none").score
    assert score == pytest.approx(expected) and "tok:none" in signature
    assert train.bleu_score(refs, refs)[0] == pytest.approx(100.0)


def parse_config(argv):
    """train.py's settings from a command line."""
    return parse_settings(train.TrainConfig, argv, presets=train.PRESETS)


def test_settings_overrides_presets_and_errors():
    cfg = parse_config(["--preset=toy", "--lr=1", "--sampling=random"])
    assert cfg.data == "toy" and cfg.lr == 1.0 and cfg.sampling == "random"
    with pytest.raises(SystemExit, match="unknown setting --colour"):
        parse_config(["--colour=3"])
    with pytest.raises(SystemExit, match="should be a int"):
        parse_config(["--max_steps=many"])
    with pytest.raises(SystemExit, match="unknown preset"):
        parse_config(["--preset=wmt"])
    # a list of bare words fills a tuple field: --archs=[a.json,b.json] needs no quotes
    from experiments import gap
    cfg = parse_settings(gap.GapConfig, ["--arms=[hat,neuron]", "--seeds=[1, 2]", "--extra=['--lr=1']"])
    assert (cfg.arms, cfg.seeds, cfg.extra) == (("hat", "neuron"), (1, 2), ("--lr=1",))


@pytest.mark.skipif(not MULTI30K.exists(), reason="needs ../shared/data/multi30k")
def test_multi30k_supernet_and_standalone_steps(tmp_path):
    data = tmp_path / "m30k"
    common = [f"--data_dir={data}", f"--data_source={MULTI30K}", "--max_tokens=1024", "--bleu_sentences=-1",
              "--test_sentences=8", "--split=valid", "--max_minutes=0.0"]
    out = tmp_path / "sup"
    train.main(["--preset=multi30k", *common, "--max_steps=2", "--log_interval=1", f"--out_dir={out}"])
    assert (data / "summary.json").exists() and len(losses(out)) == 2
    out2 = tmp_path / "alone"
    train.main(["--preset=multi30k", *common, "--max_steps=2", "--log_interval=1", f"--out_dir={out2}",
                "--arch=smallest"])
    assert losses(out2)[-1]["model"] < 9.0


def test_missing_data_offline_says_how_to_pass_a_source(tmp_path):
    with pytest.raises(SystemExit, match="--data_source"):
        load_data("multi30k", data_dir=str(tmp_path / "none"), data_source=str(tmp_path / "nowhere"))


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "sigint"
    cmd = [sys.executable, str(ROOT / "train.py"), *TOY, "--max_steps=100000", f"--out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "train_log.jsonl").exists():  # wait until it is training
        assert proc.poll() is None and time.time() < deadline, "train.py ended or did not start training"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "checkpoint saved" in output, output[-2000:]
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    train.main([*TOY, f"--out_dir={out}", "--resume=True", f"--max_steps={step + 2}"])
    assert [r["step"] for r in losses(out)][-2:] == [step + 1, step + 2]


def test_non_finite_losses_are_skipped_then_stop_and_the_checkpoint_stays_finite(tmp_path, capsys):
    out = tmp_path / "blowup"
    with pytest.raises(SystemExit, match="non-finite steps in a row"):  # an absurd learning rate: weights explode
        train.main([*TOY, f"--out_dir={out}", "--lr=1e30", "--warmup=1", "--max_steps=50", "--max_bad_steps=2",
                    "--eval_interval=1"])
    assert "update skipped (1 so far)" in capsys.readouterr().out
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in ckpt["model"].values())


def test_unsafe_truncated_and_missing_checkpoints_give_one_line_errors(tmp_path):
    import argparse
    crafted = tmp_path / "crafted.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, crafted)  # a pickled object, not plain data
    with pytest.raises(SystemExit, match="cannot load checkpoint .* safely"):
        train.load_checkpoint(crafted)
    good = run(tmp_path, "--max_steps=1") / "ckpt.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SystemExit, match="corrupted, truncated"):
        train.load_checkpoint(truncated)
    with pytest.raises(SystemExit, match="does not exist"):
        train.load_checkpoint(tmp_path / "nope.pt")


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)

    def disk_full(obj, f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.torch, "save", disk_full)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1} and list(tmp_path.iterdir()) == [path]


def test_failed_results_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import runs.files as files
    path = tmp_path / "results.json"
    write_json(path, {"bleu": 1.0})
    real_open = open

    class FullDisk:
        """A file whose writes get half-way and then fail as on a full disk."""
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)
        def write(self, text):
            self.f.write(text[: len(text) // 2])
            raise OSError(28, "No space left on device")
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(files, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"bleu": 2.0})
    assert json.loads(path.read_text()) == {"bleu": 1.0} and list(tmp_path.iterdir()) == [path]


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    a, b = run(tmp_path, "--max_steps=4", name="a"), run(tmp_path, "--max_steps=4", name="b")
    c = run(tmp_path, "--max_steps=4", "--seed=7", name="c")
    a, b, c = losses(a), losses(b), losses(c)
    parted = [(ra, rb) for ra, rb in zip(a, b) if ra != rb]  # the records where the two same-seed runs part ways
    assert len(a) == len(b) == 4 and not parted, f"same seed, other losses: {parted[:1]}"
    assert a != c, "another seed gave the same losses"


def test_bad_arch_files_give_one_line_errors_in_every_command(tmp_path):
    import latency
    good = train.SPACES["tiny"].smallest().to_dict()
    bad = {"unknown key": {**good, "ffn": 64}, "missing key": {k: v for k, v in good.items() if k != "dec_layers"},
           "wrong type": {**good, "enc_embed_dim": "64"}, "outside the space": {**good, "enc_embed_dim": 100},
           "list of the wrong length": {**good, "dec_ffn_dims": [64, 64, 64]}, "not an object": [1, 2]}
    expected = {"unknown key": "unknown keys \\['ffn'\\].*the keys are", "missing key": "missing keys \\['dec_layers'\\]",
                "wrong type": "'enc_embed_dim' must be an integer", "outside the space": "not in space 'tiny'; allowed",
                "list of the wrong length": "has 3 values but dec_layers = 1", "not an object": "JSON object"}
    files = {}
    for name, content in bad.items():
        files[name] = tmp_path / f"{name.replace(' ', '_')}.json"
        files[name].write_text(json.dumps(content))
    files["not JSON"], expected["not JSON"] = tmp_path / "broken.json", "cannot read arch file.*JSON file"
    files["not JSON"].write_text("{enc_embed_dim: 64")
    files["missing file"], expected["missing file"] = tmp_path / "nope.json", "cannot read arch file"
    supernet = run(tmp_path, "--max_steps=1", name="super") / "ckpt.pt"
    commands = {"train": lambda f: train.main([*TOY, f"--arch={f}", f"--out_dir={tmp_path / 'x'}"]),
                "finetune": lambda f: train.main([*TOY, f"--arch={f}", f"--init={supernet}",
                                                  f"--out_dir={tmp_path / 'y'}"]),
                "eval": lambda f: train.main([*TOY, "--eval_only=True", f"--arch={f}", f"--init={supernet}"]),
                "latency": lambda f: latency.main(["measure", "--space=tiny", f"--arch={f}", "--iters=1"])}
    for command, call in commands.items():
        for name, path in files.items():
            with pytest.raises(SystemExit, match=expected[name]) as e:
                call(path)
            assert "\n" not in str(e.value) and str(e.value).startswith("error:"), (command, name, e.value)


def test_checkpoint_settings_that_contradict_the_flags_are_named(tmp_path):
    out = run(tmp_path, "--max_steps=2", name="super")
    with pytest.raises(SystemExit, match=r"other settings than --router=layer \(it has neuron\)"):
        train.main([*TOY, f"--out_dir={out}", "--resume=True", "--router=layer"])
    with pytest.raises(SystemExit, match=r"--space=cpu \(it has tiny\), --num_experts=3 \(it has 2\)"):
        train.main([*TOY, "--arch=largest", f"--init={out / 'ckpt.pt'}", "--space=cpu", "--num_experts=3",
                    f"--out_dir={tmp_path / 'ft'}"])
    with pytest.raises(SystemExit, match=r"--router=none \(it has neuron\)"):
        train.main([*TOY, "--eval_only=True", f"--init={out / 'ckpt.pt'}", "--router=none"])
    standalone = run(tmp_path, "--arch=smallest", "--max_steps=1", name="standalone")
    with pytest.raises(SystemExit, match="holds a standalone model"):
        train.main([*TOY, "--arch=smallest", f"--init={standalone / 'ckpt.pt'}", f"--out_dir={tmp_path / 'ft2'}"])
    # what a resumed run may change: how long it runs and how often it reports
    train.main([*TOY, f"--out_dir={out}", "--resume=True", "--max_steps=3", "--eval_interval=1", "--log_interval=2"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3


def test_weight_decay_is_decoupled_and_spares_weights_without_gradient():
    cfg = train.TrainConfig(lr=5e-4, weight_decay=1e-4)
    model = torch.nn.Linear(4, 1, bias=False)
    weight = model.weight
    with torch.no_grad():
        weight.fill_(0.05)
    optimizer = train.make_optimizer(model, cfg)
    for _ in range(200):  # a weight no sampled subnet touches: zero gradient, only the decay acts on it
        weight.grad = torch.zeros_like(weight)
        optimizer.step()
    # decoupled (fairseq / AdamW): 0.05 * (1 - lr * wd)^200 = 0.0499995; coupled L2 through Adam moves it by about
    # lr per step, to ~0 after 100 steps
    assert torch.allclose(weight.detach(), torch.full((1, 4), 0.05), rtol=1e-4)


def test_checkpoint_averaging_takes_its_snapshots_from_the_end_of_training(tmp_path, capsys):
    out = run(tmp_path, "--max_steps=60", "--eval_interval=25", "--avg_last=3", "--avg_interval=5")
    assert sorted(int(p.stem[len("ckpt_step"):]) for p in out.glob("ckpt_step*.pt")) == [50, 55, 60]
    assert "averaged 3 of 3 snapshots (steps 50..60, every 5)" in capsys.readouterr().out
    states = [torch.load(out / f"ckpt_step{s}.pt", weights_only=True)["model"] for s in (50, 55, 60)]
    final = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(states[-1][k], final[k]) for k in final)  # the last snapshot is the final weights
    window = [s for s in range(201) if train.is_snapshot_step(s, train.TrainConfig(max_steps=200, avg_last=10), 8)]
    assert window == list(range(128, 201, 8))  # the last 10 intervals of 8 steps, never the warm-up


def test_iwslt_bleu_reports_hat_compound_split_beside_tokenised():
    refs, hyps = ["a well-known fact ."], ["a well known fact ."]
    plain, split = train.bleu_score(hyps, refs)[0], train.bleu_score(hyps, refs, compound_split=True)[0]
    assert split > plain  # "well-known" becomes "well ##AT##-##AT## known": 'well' and 'known' now match
    assert train.bleu_score(refs, refs, compound_split=True)[0] == pytest.approx(100.0)
