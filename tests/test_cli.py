import json

from fullvq.cli import main


def test_cli_lists_commands_and_refuses_unknown_ones(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_demo_writes_its_figures(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--steps", "150", "--codebook-size", "256"]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["fvq"]["usage"] > report["vq"]["usage"]
    assert report["tokenizer"]["reload_identical"] and report["tokenizer"]["export_plain_identical"]
    assert (tmp_path / "usage.png").stat().st_size > 1000
    assert (tmp_path / "tokenizer" / "config.json").is_file()
