"""benchmarks/gpu_suite.py --smoke: the whole GPU suite runs end to end on the CPU at toy sizes, so it
is known to work before a GPU ever runs it."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_suite_runs_every_item_on_the_cpu_and_puts_each_figure_beside_its_bound(tmp_path):
    suite = load_suite()
    assert suite.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert results["smoke"] and not results["errors"] and not results["skipped"]
    assert {r["item"] for r in rows} == set("abcdef")
    assert all(r["value"] is not None and r["bound"] is not None for r in rows)
    tests = next(r for r in rows if r["item"] == "a")
    assert tests["ok"] and tests["failed"] == [] and tests["value"] >= 15  # the GPU layer ran on the CPU stand-in
    cases = {(r["item"], r["case"]) for r in rows}
    assert ("b", "fvq vs vq 64 compiled") in cases and ("d", "GPT-L batch 2 static cache + compiled") in cases
    table = (tmp_path / "results.md").read_text()
    assert "| item | case | figure | value | bound |" in table and "| c | GPT-L compiled | MFU |" in table


def test_the_suite_refuses_unknown_items_and_a_real_run_without_a_gpu(capsys):
    suite = load_suite()
    with pytest.raises(SystemExit):
        suite.main(["--smoke", "--only", "a,z"])
    assert "unknown items ['z']" in capsys.readouterr().err
    if not suite.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            suite.main([])
        assert "--smoke" in capsys.readouterr().err
