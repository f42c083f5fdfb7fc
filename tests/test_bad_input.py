"""Bad input never costs a user their model, their machine or a night of training (issue 19).

One test (or a parametrised family) per numbered class of the issue; the number is in each name.
Classes 6 (per quantizer family), 10, 12, 14, 15 and 18 live beside their modules' tests.
"""

import ast
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fullvq.config import ConfigError, load_config
from fullvq.jobs.train_tokenizer import TokenizerTrainConfig, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(sample_size=32, block_out_channels=[16, 32, 32], layers_per_block=1, latent_channels=16,
             norm_num_groups=8, quantizer="fvq", codebook_size=64, codebook_dim=8)


def image_folder(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def recipe(tmp_path: Path, **train) -> dict:
    data = tmp_path / "images"
    if not data.exists():
        image_folder(data)
    settings = dict(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=4, learning_rate=1e-3, scale_lr=False,
                    warmup_steps=1, num_workers=0, log_every=1, sample_every=100, checkpoint_every=2,
                    tracker="none")
    settings.update(train)
    return {"model": dict(MODEL), "loss": {"perceptual_weight": 0.0, "gan_weight": 0.0},
            "data": {"source": str(data), "resolution": 32}, "train": settings}


def config_of(tmp_path: Path, values: dict, *overrides: str) -> TokenizerTrainConfig:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_config(TokenizerTrainConfig, path, list(overrides))


def train(tmp_path: Path, values: dict, *overrides: str) -> dict:
    return train_tokenizer(config_of(tmp_path, values, *overrides))


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run: checkpoint-2, checkpoint-4, model/, a metrics record per step."""
    root = tmp_path_factory.mktemp("finished")
    train(root, recipe(root))
    return root


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "images", tmp_path / "images")
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


# ----------------------------------------------------------------------------- 1. no file runs code


class Payload:
    """Unpickling this object creates the marker file: what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_file(path: Path, marker: Path, tensors: dict | None = None) -> Path:
    torch.save({**(tensors or {"weight": torch.zeros(2)}), "payload": Payload(marker)}, path)
    return path


def _tiny_tokenizer_folder(folder: Path) -> Path:
    from fullvq import FVQModel

    FVQModel(**{**MODEL, "quantizer": "vq", "codebook_size": 16}).save_pretrained(folder)
    return folder


def _tiny_pipeline_folder(folder: Path) -> Path:
    from fullvq import FVQModel
    from fullvq.generator.gpt import FullVQGPT, FullVQGPTConfig
    from fullvq.pipelines import FullVQPipeline

    tokenizer = FVQModel(**{**MODEL, "quantizer": "vq", "codebook_size": 16})
    gpt = FullVQGPT(FullVQGPTConfig(codebook_size=16, num_classes=2, grid_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2))
    FullVQPipeline(tokenizer=tokenizer, gpt=gpt).save_pretrained(folder)
    return folder


ENTRY_POINTS = ["eval-rfid-flag", "eval-gfid-env-variable", "eval-env-variable", "convert", "lc-codebook-path",
                "resume-optimizer-state", "resume-random-state"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_1_a_crafted_pickle_is_refused_by_every_entry_point_without_running(entry, tmp_path, finished, monkeypatch,
                                                                             capsys):
    from fullvq.cli import main

    marker = tmp_path / "marker"
    evil = crafted_file(tmp_path / "evil.pt", marker)
    if entry == "eval-rfid-flag":
        tokenizer = _tiny_tokenizer_folder(tmp_path / "tokenizer")
        code = main(["eval", "rfid", "--tokenizer", str(tokenizer), "--data", "demo", "--num-images", "2",
                     "--no-lpips", "--output", str(tmp_path / "out"), "--inception-weights", str(evil)])
        assert code == 2 and "evil.pt" in capsys.readouterr().err
    elif entry == "eval-gfid-env-variable":
        monkeypatch.setenv("FULLVQ_INCEPTION_WEIGHTS", str(evil))
        code = main(["eval", "gfid", "--pipeline", str(_tiny_pipeline_folder(tmp_path / "pipeline")), "--reference",
                     str(tmp_path), "--images-per-class", "2", "--output", str(tmp_path / "out")])
        assert code == 2 and "evil.pt" in capsys.readouterr().err
    elif entry == "eval-env-variable":
        from fullvq.eval.features import InceptionExtractor

        monkeypatch.setenv("FULLVQ_INCEPTION_WEIGHTS", str(evil))
        with pytest.raises(ValueError, match="evil.pt"):
            InceptionExtractor(None, "cpu")
    elif entry == "convert":
        assert main(["convert", "--from", "llamagen-vq", str(evil), "--output", str(tmp_path / "out")]) == 2
        assert "evil.pt" in capsys.readouterr().err
    elif entry == "lc-codebook-path":
        values = recipe(tmp_path)
        values["model"].update(quantizer="lc", quantizer_kwargs={"feature_dim": 4})
        values["codebook_path"] = str(evil)
        with pytest.raises(ValueError, match="evil.pt"):
            train(tmp_path, values)
    else:
        run = copy_run(finished, tmp_path)
        shutil.rmtree(run / "model")
        name = "optimizer.bin" if entry == "resume-optimizer-state" else "random_states_0.pkl"
        crafted_file(run / "checkpoint-4" / name, marker)
        (run / "checkpoint-4" / "fullvq_checkpoint.json").unlink(missing_ok=True)  # as an older checkpoint
        with pytest.raises(ConfigError, match=f"checkpoint-4.*{name}"):
            train(tmp_path, recipe(tmp_path, max_steps=6), f"train.resume={run / 'checkpoint-4'}")
    assert not marker.exists()


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("torch.load", "pickle.load", "pickle.loads", "eval", "exec", "joblib.load"):
            found.append(name)
        for keyword in node.keywords:
            unsafe = {"weights_only": False, "allow_pickle": True, "trust_remote_code": True}
            if keyword.arg in unsafe and isinstance(keyword.value, ast.Constant) \
                    and keyword.value.value is unsafe[keyword.arg]:
                found.append(f"{name}({keyword.arg}={keyword.value.value})")
    return found


def test_1_no_module_unpickles_a_file_itself():
    """torch.load is called in fullvq.io alone (weights_only=True); nothing calls pickle.load, eval or
    exec, allows numpy pickles, turns weights_only off or trusts remote code."""
    offenders = []
    for path in sorted([*(REPO / "fullvq").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]):
        calls = _unsafe_calls(ast.parse(path.read_text()))
        if path == REPO / "fullvq" / "io.py":
            calls.remove("torch.load")  # load_torch_file: the one reader
        offenders += [f"{path.relative_to(REPO)}: {call}" for call in calls]
    assert not offenders, offenders


# ----------------------------------------------------------------------------- 2. a finished model is kept


def test_2_a_folder_holding_a_finished_model_is_refused_and_the_model_kept(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    for checkpoint in run.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)  # the usual clean-up to save space
    before = snapshot(run / "model")
    with pytest.raises(ConfigError, match=r"model.*(another train.output_dir|nothing there was touched)"):
        train(tmp_path, recipe(tmp_path))
    assert snapshot(run / "model") == before


# ----------------------------------------------------------------------------- 3. numbers that make no sense


@pytest.mark.parametrize("override, key", [
    ("train.max_grad_norm=-1", "max_grad_norm"), ("train.max_steps=-1", "max_steps"),
    ("train.max_steps=0", "max_steps"), ("train.epochs=0", "epochs"), ("train.epochs=-1", "epochs"),
    ("train.warmup_steps=-5", "warmup_steps"), ("train.ema_decay=1.5", "ema_decay"),
    ("train.ema_decay=1", "ema_decay"), ("train.ema_decay=-0.1", "ema_decay"),
    ("train.learning_rate=.nan", "learning_rate"),
])
def test_3_training_numbers_that_make_no_sense_are_refused_naming_the_fix(override, key, tmp_path):
    values = recipe(tmp_path)
    if "epochs" in override:
        values["train"]["max_steps"] = None
    with pytest.raises(ConfigError, match=rf"train\.{key}=\S+ (must|is)"):
        config_of(tmp_path, values, override)
    assert not (tmp_path / "run").exists()


def test_3_clipping_is_off_with_zero_or_null():
    for value in ("0", "null"):
        config = load_config(TokenizerTrainConfig, None, ["train.max_steps=1", f"train.max_grad_norm={value}"])
        assert not config.train.max_grad_norm


@pytest.mark.parametrize("override, named", [
    ("model.codebook_size=0", "model: codebook_size"), ("model.quantizer=nope", "model: unknown quantizer"),
    ("model.quantizer_kwargs.group_size=7", "model: codebook_size=64 is not divisible"),
    ("model.norm_num_groups=7", "model: block_out_channels"), ("loss.gan_loss=foo", "loss: gan_loss='foo'"),
    ("data.source=/no/such/folder", "data: dataset path '/no/such/folder' does not exist"),
    ("codebook_path=RECIPE", "codebook_path: "),  # an lc codebook that is no checkpoint
])
def test_3_settings_a_model_loss_or_data_source_refuses_exit_2_naming_the_section(override, named, tmp_path, capsys):
    from fullvq.commands.train_tokenizer import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path)))
    override = override.replace("RECIPE", f"{path} model.quantizer=lc")
    assert main([str(path), *override.split()]) == 2
    assert f"error: {named}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train-tokenizer", "sample", "cache-tokens"])
def test_3_an_output_that_is_a_file_is_refused_before_any_work_naming_it(command, tmp_path, capsys):
    from fullvq.cli import main

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    if command == "train-tokenizer":
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe(tmp_path)))
        argv = [str(path), f"train.output_dir={taken}"]
    elif command == "sample":
        argv = [str(_tiny_pipeline_folder(tmp_path / "pipe")), "--labels", "0", "--output", str(taken)]
    else:
        argv = ["--tokenizer", str(_tiny_tokenizer_folder(tmp_path / "tok")), "--data", str(image_folder(
            tmp_path / "images")), "--output", str(taken)]
    assert main([command, *argv]) == 2
    assert f"the output {taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "mine"


# ----------------------------------------------------------------------------- 4. optional keys are typed


@pytest.mark.parametrize("override", ["train.max_steps=abc", "train.resume=5", "data.image_column=[1]",
                                      "model.quantizer_kwargs=notadict", "train.checkpoints_total_limit=abc",
                                      "model.attention_levels=[a]", "loss.vgg_weights=3"])
def test_4_optional_keys_are_type_checked_before_any_work(override, tmp_path):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key) + r"=.* has the wrong type; expected .*(null|None)"):
        config_of(tmp_path, recipe(tmp_path), override)


# ----------------------------------------------------------------------------- 5. stray folders


def test_5_only_checkpoint_step_folders_count(tmp_path):
    values = recipe(tmp_path, max_steps=3, checkpoint_every=1, checkpoints_total_limit=1)
    run = tmp_path / "run"
    (run / "checkpoint-old").mkdir(parents=True)
    (run / "checkpoint-old" / "notes.txt").write_text("kept by hand")
    train(tmp_path, values)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-old"]
    assert (run / "checkpoint-old" / "notes.txt").read_text() == "kept by hand"
    assert (run / "model" / "config.json").is_file()


# ----------------------------------------------------------------------------- 6. a diverging run


def test_6_a_diverging_run_stops_with_the_non_finite_loss_message(tmp_path):
    values = recipe(tmp_path, learning_rate=1.0e6, max_grad_norm=None, max_steps=8, checkpoint_every=100)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step \d+"):
        train(tmp_path, values)
    assert not (tmp_path / "run" / "model").exists()


# ----------------------------------------------------------------------------- 7. damaged checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated-model": ("model.safetensors", _truncate),
    "deleted-model": ("model.safetensors", Path.unlink),
    "deleted-optimizer": ("optimizer.bin", Path.unlink),
    "truncated-optimizer": ("optimizer.bin", _truncate),
    "garbage-trainer-state": ("trainer_state.json", lambda p: p.write_text("{not json")),
    "empty-trainer-state": ("trainer_state.json", lambda p: p.write_text("{}")),
}


@pytest.mark.parametrize("manifest", [True, False], ids=["with-manifest", "written-before-manifests"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_7_latest_skips_a_damaged_checkpoint_and_an_explicit_one_is_named(damage, manifest, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "model")
    if not manifest:
        for folder in run.glob("checkpoint-*"):
            (folder / "fullvq_checkpoint.json").unlink()
    name, damage_file = DAMAGE[damage]
    damage_file(run / "checkpoint-4" / name)
    with pytest.raises(ConfigError, match=rf"checkpoint-4.*{re.escape(name)}"):
        train(tmp_path, recipe(tmp_path, max_steps=6), f"train.resume={run / 'checkpoint-4'}")
    capsys.readouterr()
    train(tmp_path, recipe(tmp_path, max_steps=6), "train.resume=latest")
    out = capsys.readouterr()
    said = out.out + out.err
    assert re.search(rf"skip\w* .*checkpoint-4.*{re.escape(name)}", said), said
    assert "resumed from" in said and "checkpoint-2" in said
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_7_an_empty_checkpoint_folder_is_skipped_and_old_checkpoints_still_resume(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "model")
    (run / "checkpoint-90").mkdir()
    for folder in run.glob("checkpoint-*"):
        (folder / "fullvq_checkpoint.json").unlink(missing_ok=True)  # written before manifests existed
    train(tmp_path, recipe(tmp_path, max_steps=6), "train.resume=latest")
    out = capsys.readouterr()
    said = out.out + out.err
    assert re.search(r"skip\w* .*checkpoint-90", said) and re.search(r"resumed from .*checkpoint-4", said), said
    with pytest.raises(ConfigError, match="checkpoint-90"):
        train(tmp_path, recipe(tmp_path, max_steps=8), f"train.resume={run / 'checkpoint-90'}")


def test_7_every_checkpoint_ends_with_a_manifest_of_its_files(finished):
    folder = finished / "run" / "checkpoint-4"
    manifest = json.loads((folder / "fullvq_checkpoint.json").read_text())
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
             if p.is_file() and p.name != "fullvq_checkpoint.json"}
    assert {name: entry["size"] for name, entry in manifest["files"].items()} == files
    assert manifest["step"] == 4


# ----------------------------------------------------------------------------- 8. refusals write nothing


@pytest.mark.parametrize("change", ["model.codebook_size=32", "train.ema_decay=0.9"])
def test_8_a_refused_resume_leaves_the_run_as_it_was(change, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "model")
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"checkpoint-4.*(codebook_size|ema)"):
        train(tmp_path, recipe(tmp_path, max_steps=6), "train.resume=latest", change)
    assert snapshot(run) == before


@pytest.mark.parametrize("resume", ["latest", "checkpoint-4", "checkpoint-2"])
def test_8_a_checkpoint_past_max_steps_is_refused_and_the_finished_model_kept(resume, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    resume = resume if resume == "latest" else str(run / resume)
    with pytest.raises(ConfigError, match=r"checkpoint-\d.*past this run's 1 steps.*max_steps"):
        train(tmp_path, recipe(tmp_path, max_steps=1), f"train.resume={resume}")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- 9. full disk


def _disk_full(kind):
    def save_state(self, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)  # half a checkpoint
        if kind == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304")

    return save_state


@pytest.mark.parametrize("kind", ["oserror", "torch"])
def test_9_a_full_disk_during_a_checkpoint_stops_cleanly_naming_the_path(kind, tmp_path, monkeypatch, capsys):
    import accelerate

    from fullvq.commands.train_tokenizer import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path)))
    real_save = accelerate.Accelerator.save_state
    saved = []

    def save_once_then_fail(self, output_dir=None, **kwargs):
        if saved:
            return _disk_full(kind)(self, output_dir, **kwargs)
        saved.append(output_dir)
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_once_then_fail)
    assert main([str(path)]) != 0
    err = capsys.readouterr().err
    assert "disk is full" in err and str(tmp_path / "run") in err and "Traceback" not in err
    run = tmp_path / "run"
    assert not list(run.glob(".tmp-*")) and not (run / "checkpoint-4").exists()
    assert (run / "checkpoint-2" / "fullvq_checkpoint.json").is_file()


# ----------------------------------------------------------------------------- 11. float forms people write


@pytest.mark.parametrize("written, value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("5e3", 5e3), ("+2.5e-3", 2.5e-3)])
def test_11_float_forms_people_write_are_read_as_floats(written, value, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path)).replace("learning_rate: 0.001", f"learning_rate: {written}"))
    assert load_config(TokenizerTrainConfig, path).train.learning_rate == value
    assert load_config(TokenizerTrainConfig, path, [f"train.learning_rate={written}"]).train.learning_rate == value
    assert load_config(TokenizerTrainConfig, path, ["train.max_steps=5e3"]).train.max_steps == 5000


# ----------------------------------------------------------------------------- 13. missing local folders


@pytest.mark.parametrize("form", ["absolute", "dot", "dotdot", "home", "parent-exists"])
def test_13_a_missing_local_folder_is_no_such_folder_in_every_command(form, tmp_path, monkeypatch, capsys):
    from fullvq.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    name = {"absolute": str(tmp_path / "nowhere"), "dot": "./nowhere", "dotdot": "../nowhere-fullvq-test",
            "home": "~/nowhere-fullvq-test", "parent-exists": "runs/nowhere"}[form]
    commands = [
        ["sample", name, "--labels", "0", "--output", str(tmp_path / "s")],
        ["eval", "rfid", "--tokenizer", name, "--data", "demo", "--no-lpips", "--output", str(tmp_path / "e"),
         "--inception-weights", str(tmp_path / "w.pth")],
        ["eval", "gfid", "--pipeline", name, "--reference", str(tmp_path), "--output", str(tmp_path / "g")],
        ["cache-tokens", "--tokenizer", name, "--data", "demo", "--output", str(tmp_path / "c")],
        ["app", name],
    ]
    for command in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "no such folder" in err and "nowhere" in err, (command, err)
        assert not re.search(r"hub|connect|repo id|Repository", err, re.IGNORECASE), (command, err)


def test_13_a_hub_id_while_offline_says_offline(tmp_path, monkeypatch, capsys):
    from fullvq.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["sample", "someone/some-pipeline", "--labels", "0", "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "offline" in err and "someone/some-pipeline" in err


# ----------------------------------------------------------------------------- 16. YAML syntax errors


def test_16_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  max_steps: 4\n  learning_rate: [1e-4\ndata:\n  source: demo\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}.*line [34]"):
        load_config(TokenizerTrainConfig, path)
    with pytest.raises(ConfigError, match=r"train\.max_steps=\[4.*not valid YAML"):
        load_config(TokenizerTrainConfig, None, ["train.max_steps=[4"])


# ----------------------------------------------------------------------------- 17. metrics after a resume


def test_17_after_a_resume_metrics_hold_each_step_once(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoint-4")  # killed after logging steps 3 and 4, before checkpoint-4
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"loss": 1.0, "st')  # and half-way through writing a record
    assert steps_logged(finished / "run") == [1, 2, 3, 4]
    train(tmp_path, recipe(tmp_path, max_steps=5), "train.resume=latest")
    assert steps_logged(run) == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- 19. one run per folder


HOLD_LOCK = """
import sys, time
from fullvq.io import hold_folder
lock = hold_folder(sys.argv[1], "test")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(folder: Path, seconds: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), str(seconds)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.strip() == "locked", process.stderr.read()
    return process


def test_19_a_second_run_into_a_busy_folder_is_refused_naming_the_holder(finished, tmp_path):
    from fullvq.io import FolderInUseError

    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "model")
    holder = _holder(run, 120)
    before = snapshot(run)
    try:
        with pytest.raises(FolderInUseError, match=rf"{run}.*PID {holder.pid}"):
            train(tmp_path, recipe(tmp_path, max_steps=6), "train.resume=latest")
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(run) == before


def test_19_a_lock_whose_holder_died_is_taken_over_saying_so(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "model")
    holder = _holder(run, 120)
    holder.kill()  # kill -9: the lock file stays behind, naming a dead process
    holder.wait()
    time.sleep(0.1)
    train(tmp_path, recipe(tmp_path, max_steps=5), "train.resume=latest")
    said = capsys.readouterr()
    assert re.search(rf"took over .*PID {holder.pid}", said.out + said.err)
    assert (run / "model" / "config.json").is_file()


def test_19_an_evaluation_into_a_folder_another_run_holds_is_refused_and_leaves_its_report(tmp_path, capsys):
    from fullvq.cli import main

    tokenizer = _tiny_tokenizer_folder(tmp_path / "tokenizer")
    output = tmp_path / "rfid"
    output.mkdir()
    (output / "report.json").write_text('{"task": "reconstruction", "status": "running"}\n')
    holder = _holder(output, 120)
    try:
        code = main(["eval", "rfid", "--tokenizer", str(tokenizer), "--data", "demo", "--max-images", "2",
                     "--no-lpips", "--output", str(output)])
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert re.search(rf"{output} is in use: PID {holder.pid}", capsys.readouterr().err)
    assert json.loads((output / "report.json").read_text()) == {"task": "reconstruction", "status": "running"}
