"""The tutorial-first layout (issue 30): the design card's files at the top, imports that run one way, a README
front page whose commands parse, and the size and comment density of the tutorial path.
Run: python -m pytest -q tests/test_layout.py (a few seconds)"""

import ast
import re
import shlex
from pathlib import Path

import pytest
from runs.settings import check_settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
CARD = {"mos.py", "train.py", "search.py", "latency.py"}  # the only top-level Python files
# imports run one way, from a higher layer to a lower one:
# experiments -> search -> latency -> train -> mos -> data -> runs (the run machinery, which imports no project code)
LAYERS = {"runs": 0, "data": 1, "mos": 2, "train": 3, "latency": 4, "search": 5, "experiments": 6}
# within a package: each module imports only those before it
ORDER = ["runs.files", "runs.settings", "runs.folders", "runs.checkpoints", "runs.signals", "runs.machine", "runs.loop",
         "runs.latency_files", "runs.plots",
         "data.batching", "data.corpus", "data.prepare"]
TUTORIAL = ["mos.py", "train.py", "latency.py", "search.py", "data/batching.py"]


def project_modules() -> dict:
    """Module name -> path of every project file outside tests/ (mos, data.batching, experiments.gap, ...)."""
    paths = [p for p in ROOT.rglob("*.py") if "tests" not in p.relative_to(ROOT).parts
             and not p.name.startswith(".") and ".git" not in p.parts]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in paths if p.name != "__init__.py"}


def imported(path: Path, modules) -> set:
    """The project modules a file imports, at the top or inside a function (deferred imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def layer(module: str) -> int:
    """The layer of a project module (its top-level package or file)."""
    return LAYERS[module.split(".")[0]]


def test_top_level_holds_the_design_card_only():
    assert {p.name for p in ROOT.glob("*.py")} == CARD
    for folder in ("data", "tests", "experiments"):
        assert (ROOT / folder).is_dir(), folder
    assert (ROOT / "README.md").exists() and (ROOT / "experiments" / "README.md").exists()


def test_imports_run_one_way_without_circles():
    modules = project_modules()
    graph = {m: imported(p, modules) for m, p in modules.items()}
    upward = [(a, b) for a, targets in graph.items() for b in targets
              if layer(b) > layer(a) or (a in ORDER and layer(a) == layer(b) and ORDER.index(b) >= ORDER.index(a))
              or (layer(a) == layer(b) and a not in ORDER and layer(a) != LAYERS["experiments"])]
    assert not upward, f"imports against the one-way order: {upward}"
    state = {}

    def visit(m, path):
        """Depth-first search that fails on a module met again on its own path (a circle)."""
        assert state.get(m) != "open", f"import circle: {' -> '.join(path + [m])}"
        if m not in state:
            state[m] = "open"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"
    for m in sorted(graph):
        visit(m, [])
    assert not any(layer(m) < LAYERS["experiments"] and any(layer(n) == LAYERS["experiments"] for n in graph[m])
                   for m in graph), "the core imports experiments/"


def test_the_checker_sees_an_upward_and_a_deferred_import(tmp_path):
    """The import parser is not blind: an upward import inside a function is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("import json\n\ndef f():\n    from train import main\n    import search\n")
    assert imported(bad, {"train", "search", "mos"}) == {"train", "search"}


def commands(markdown: str) -> list:
    """Every command line in the fenced bash blocks of a Markdown text, comments cut, `a && b` split in two."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            lines += [part.strip() for part in line.split("&&") if part.strip()]
    return lines


def check_command(line: str, monkeypatch):
    """Parse a README command as its script would and check its settings, without running the job."""
    words = shlex.split(line)
    if words[0] == "pip":
        assert words[1:] == ["install", "-r", "requirements.txt"] and (ROOT / "requirements.txt").exists()
        return
    if words[:3] == ["python", "-m", "pytest"]:
        return
    script, args = (words[2], words[3:]) if words[0] == "torchrun" else (words[1], words[2:])
    import latency
    import search
    import train
    if script == "train.py":
        check_settings(parse_settings(train.TrainConfig, args, presets=train.PRESETS), train.BOUNDS, train.CHOICES)
    elif script == "latency.py":
        cfg = parse_settings(latency.LatencyConfig, args, command_field="command")
        check_settings(cfg, latency.BOUNDS, latency.CHOICES)
        assert cfg.command in ("measure", "depth", "dataset", "fit"), line
    elif script == "search.py":
        cfg = parse_settings(search.SearchConfig, args)
        check_settings(cfg, search.BOUNDS, search.CHOICES)
        search.check_budgets(cfg.budgets)
    elif script == "data/prepare.py":
        from data import prepare
        asked = {}
        monkeypatch.setattr(prepare, f"prepare_{args[0]}", lambda **kw: asked.update(kw) or {"pairs": {}})
        prepare.main(args)
        assert asked and (asked["source"] is None or Path(ROOT, asked["source"]).exists()), line
    else:
        raise AssertionError(f"README shows a command this test does not know: {line}")
    for arg in args:  # every file the command reads is there, or is one the pipeline's earlier commands write
        key, _, value = arg[2:].partition("=")
        if key in ("source", "data_source"):
            assert (ROOT / value).exists() or not (ROOT.parent / "shared").exists(), line


def test_readme_front_page_is_short_and_its_commands_parse(monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    found = commands(text)
    assert any(c.startswith("python train.py") for c in found) and "python -m pytest -q" in found
    for line in found:
        check_command(line, monkeypatch)
    with pytest.raises(SystemExit, match="unknown setting --bogus"):  # the check can fail
        check_command("python train.py --bogus=1", monkeypatch)


def test_every_link_of_the_readme_and_the_docs_resolves():
    for page in [ROOT / "README.md", ROOT / "experiments" / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"


def test_every_name_in_the_readme_paper_to_code_table_exists():
    """The README's paper-to-code table points at real places: each `module.name(.attribute)` in its code column."""
    import importlib
    table = (ROOT / "README.md").read_text().split("## Paper and code")[1].split("\n## ")[0]
    names = [n for row in table.splitlines()[3:] for n in re.findall(r"`([a-z_.]+\.[A-Za-z_.]+)`", row.split("|")[2])]
    assert len(names) >= 20, names  # the parser found the table
    for name in names:
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module: mos, runs.checkpoints
            try:
                obj = importlib.import_module(".".join(parts[:k]))
                break
            except ModuleNotFoundError:
                assert k > 1, f"README's paper-to-code table names {name}, whose module does not exist"
        for attr in parts[k:]:
            assert hasattr(obj, attr), f"README's paper-to-code table names {name}, which does not exist"
            obj = getattr(obj, attr)


def density(path: Path):
    """(lines, comment-or-docstring lines, code lines) of a Python file: a line is a comment line if it is a
    full-line comment or part of a docstring, a code line if it holds code (a trailing comment does not count)."""
    text = path.read_text()
    docs = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    comment = code = 0
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            is_comment = i in docs or line.strip().startswith("#")
            comment, code = comment + is_comment, code + (not is_comment)
    return len(text.splitlines()), comment, code


def test_tutorial_path_size_and_comment_density():
    """Issue 41's targets: the tutorial path at most 2,000 lines at 0.3 comment or docstring lines per code line or
    more, train.py at most 500 lines, its training loop (model.train() to bar.close() in main) at most 40."""
    sizes = {name: density(ROOT / name) for name in TUTORIAL}
    lines, comment, code = (sum(s[k] for s in sizes.values()) for k in range(3))
    assert lines <= TUTORIAL_LINES, sizes
    assert comment / code >= TUTORIAL_DENSITY, sizes
    assert sizes["train.py"][0] <= TRAIN_LINES, sizes["train.py"]
    main = next(n for n in ast.parse((ROOT / "train.py").read_text()).body if getattr(n, "name", "") == "main")
    lines_of_main = ast.get_source_segment((ROOT / "train.py").read_text(), main).splitlines()
    start = next(i for i, line in enumerate(lines_of_main) if line.strip() == "model.train()")
    end = next(i for i, line in enumerate(lines_of_main) if line.strip() == "bar.close()")
    assert end - start + 1 <= LOOP_LINES, (start, end)
    assert len((ROOT / "data" / "prepare.py").read_text().splitlines()) <= 450


# Issue 41's targets, met once the run machinery moved into runs/ (issue 40 and 41), the text side of the data into
# data/corpus.py, and the method files were reordered and given prose about the method (1,963 lines at 0.305, train.py
# 499, its loop 36, when they were met): bounds, so the tutorial cannot grow past them.
TUTORIAL_LINES = 2000
TUTORIAL_DENSITY = 0.3  # comment or docstring lines per code line, at least
TRAIN_LINES, LOOP_LINES = 500, 40
