import json

import pytest
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


def test_old_flag_spellings_still_work_for_a_release_and_say_so(tmp_path, capsys):
    # The same refusal (a missing checkpoint) reached through --out and --image-size, the old spellings.
    code = main(["convert", "--from", "llamagen-vq", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x"),
                 "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "missing.pt does not exist" in err
    assert "--out is deprecated and will be removed in the next release; use --output" in err
    assert "--image-size is deprecated" in err and "DeprecationWarning" in err
    missing = str(tmp_path / "missing.pt")
    assert main(["convert", "--from", "llamagen-vq", missing, "--output", str(tmp_path / "x")]) == 2
    assert "deprecated" not in capsys.readouterr().err


def test_a_flag_is_spelled_out_not_guessed_from_a_prefix(tmp_path, capsys):
    # eval rfid never had --out: argparse's prefix matching used to take it quietly as --output.
    code = main(["eval", "rfid", "--tokenizer", str(tmp_path), "--data", "demo", "--out", str(tmp_path / "x")])
    assert code == 2 and "the following arguments are required: --output" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), "--labels", "0", "--images-per", "2", "--output", str(tmp_path / "y")]) == 2
    assert "unrecognized arguments: --images-per" in capsys.readouterr().err


def test_user_errors_are_reported_as_argparse_reports_them(tmp_path, capsys):
    code = main(["cache-tokens", "--tokenizer", str(tmp_path / "none"), "--data", "demo", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("usage: fullvq cache-tokens")
    assert "fullvq cache-tokens: error: no such folder: tokenizer" in err and "does not exist" in err
    assert main(["sample", "--no-such-flag"]) == 2  # argparse's own errors: the same status, no SystemExit
    capsys.readouterr()
    code = main(["eval", "rfid", "--tokenizer", str(tmp_path / "none"), "--data", "demo", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("usage: fullvq eval rfid")  # the sub-command's usage, not its parent's
    assert "fullvq eval rfid: error: no such folder: tokenizer" in err


def test_the_command_line_offers_exactly_the_choices_the_jobs_accept():
    from fullvq.commands import cache_tokens, convert, init_codebook
    from fullvq.commands import eval as eval_command
    from fullvq.eval.inception import INCEPTION_WEIGHTS_ENV
    from fullvq.jobs import cache_tokens as cache_job
    from fullvq.jobs import convert as convert_job
    from fullvq.tokenizer.kmeans import INITS
    from fullvq.tokenizer.patch_features import FEATURE_SPACES

    assert cache_tokens.AUGMENTATIONS == tuple(cache_job.AUGMENTATIONS)
    assert (convert.SOURCES, convert.TOKENIZER_SOURCES) == (convert_job.SOURCES, convert_job.TOKENIZER_SOURCES)
    assert (init_codebook.INITS, init_codebook.FEATURE_SPACES) == (INITS, FEATURE_SPACES)
    assert eval_command.INCEPTION_WEIGHTS_ENV == INCEPTION_WEIGHTS_ENV


def test_every_eval_sub_commands_help_says_what_it_does(capsys):
    for command in ("rfid", "gfid", "reference-stats", "convert-inception"):
        assert main(["eval", command, "--help"]) == 0
        after_usage = capsys.readouterr().out.split("\n\n")[1]
        assert not after_usage.startswith("options:"), f"eval {command} --help has no description"


def test_help_answers_without_importing_torch_or_diffusers():
    # A fresh interpreter: `import fullvq.cli` and every command's --help must stay light (under 1 s).
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import contextlib, io, sys
        import fullvq.cli
        from fullvq.cli import COMMANDS, main
        heavy = lambda: sorted(name for name in ("torch", "diffusers", "transformers") if name in sys.modules)
        assert not heavy(), ("import fullvq.cli", heavy())
        with contextlib.redirect_stdout(io.StringIO()):
            for argv in [["--help"], *[[name, "--help"] for name in COMMANDS], ["eval", "gfid", "--help"]]:
                assert main(argv) == 0, argv
                assert not heavy(), (argv, heavy())
        print("light")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "light", run.stderr[-2000:]


@pytest.mark.parametrize("argv, flag", [
    (["cache-tokens", "--tokenizer", "t", "--data", "demo", "--output", "o", "--resolution", "0"], "--resolution"),
    (["cache-tokens", "--tokenizer", "t", "--data", "demo", "--output", "o", "--num-workers", "-2"], "--num-workers"),
    (["eval", "rfid", "--tokenizer", "t", "--data", "demo", "--output", "o", "--batch-size", "0"], "--batch-size"),
    (["init-codebook", "--encoder", "e", "--data", "d", "--num-codes", "0", "--output", "o"], "--num-codes"),
])
def test_a_zero_or_negative_count_flag_is_a_usage_error_naming_the_flag(argv, flag, capsys):
    assert main(argv) == 2
    assert f"argument {flag}: " in capsys.readouterr().err
