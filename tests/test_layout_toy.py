"""The committed toy-preset results from before and after issue 30's layout change, and after issue 40's run-folder
contract (the run machinery moved into runs/), and after issue 41's moves, agree (timing aside): the moves changed no
numerics.
Run: python -m pytest -q tests/test_layout_toy.py"""

import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent.parent / "experiments" / "results" / "layout_toy"


def without_timing(results: dict) -> dict:
    """results.json without its clock readings."""
    return {k: {kk: vv for kk, vv in v.items() if kk != "decode_seconds"} if isinstance(v, dict) else v
            for k, v in results.items()}


def test_toy_results_before_and_after_the_layout_change_are_identical():
    before, after = (json.loads((FOLDER / f"results_{when}.json").read_text()) for when in ("before", "after"))
    assert without_timing(before) == without_timing(after) and before["largest"]["bleu"] > 0


def test_toy_results_before_and_after_the_run_folder_contract_are_identical():
    """Both on one machine (another than the first pair's: fp32 kernels differ between CPUs)."""
    before, after = (json.loads((FOLDER / f"results_{when}.json").read_text()) for when in ("main_cdad6f8", "contract"))
    assert without_timing(before) == without_timing(after) and before["largest"]["bleu"] > 0


def test_toy_results_before_and_after_issue_41_are_identical():
    """Issue 41 moved more machinery into runs/ and the corpus code into data/corpus.py: same machine, same numbers."""
    before, after = (json.loads((FOLDER / f"results_{when}.json").read_text()) for when in ("main_d596453", "issue41"))
    assert without_timing(before) == without_timing(after) and before["largest"]["bleu"] > 0
