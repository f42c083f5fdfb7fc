import json

import torch

from fullvq.cli import COMMANDS, main


def test_cli_lists_commands_and_refuses_unknown_ones(capsys):
    assert main([]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_every_command_has_its_module_and_help(capsys):
    import importlib

    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_fast_demo_runs_both_stages_end_to_end(tmp_path):
    from fullvq import FullVQPipeline

    assert main(["demo", "--out", str(tmp_path), "--fast"]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["codebook"]["tokens"] == 5000 * 8 * 8  # every token of the whole set, counted
    assert 0 < report["codebook"]["usage"] <= 1
    assert report["reconstruction_psnr_db"] > 5
    assert 0 <= report["sample_class_accuracy"] <= 1
    for name in ("samples.png", "reconstructions.png", "usage.png"):
        assert (tmp_path / name).stat().st_size > 500, name
    pipe = FullVQPipeline.from_pretrained(report["pipeline"])
    images = pipe(class_labels=["3"], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    # Running again reuses the finished runs instead of refusing or starting over.
    assert main(["demo", "--out", str(tmp_path), "--fast"]) == 0
