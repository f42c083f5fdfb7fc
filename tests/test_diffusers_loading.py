"""Pipeline folders load with diffusers alone (``DiffusionPipeline.from_pretrained``), from a folder and
from a Hub repo, through diffusers' custom-code mechanism; fullvq's own loaders run no folder code."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_pipeline

from fullvq.cards import write_model_card
from fullvq.pipelines import FullVQPipeline, LatentFlowPipeline, load_pipeline
from fullvq.pipelines.base import MODULE_FILE

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CALLS = {"gpt": {}, "flow": {"num_inference_steps": 3}}

# Run in a fresh interpreter that imports diffusers and torch only: what a diffusers user does.
DIFFUSERS_ONLY = """
import json, sys, types
import numpy as np, torch
import diffusers.utils.dynamic_modules_utils as remote_code
from diffusers import DiffusionPipeline

assert "fullvq" not in sys.modules
# Offline, diffusers still asks the Hub at which commit a repo's code file is; the fake cache's ref answers.
remote_code.model_info = lambda repo_id, revision=None, token=None: types.SimpleNamespace(sha=sys.argv[3])
loaded = {}
for name, (source, call) in json.loads(sys.argv[1]).items():
    pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["crane", 0], generator=torch.Generator().manual_seed(0), output_type="np", **call).images
    np.save(f"{sys.argv[2]}/{name}.npy", images)
    loaded[name] = type(pipe).__name__
exec(sys.argv[4])  # the model card's snippet
print(json.dumps(loaded))
"""


def fake_hub_cache(folder: Path, repo_id: str, hf_home: Path) -> None:
    """Lay ``folder`` out as the Hub cache holds a downloaded repo: a snapshot, its ref, and the file listing
    (huggingface_hub's cached tree) that diffusers reads to check the repo's files before loading."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    files = {path.relative_to(folder).as_posix(): {"size": path.stat().st_size,
                                                   "blob_id": hashlib.sha1(path.read_bytes()).hexdigest()}
             for path in sorted(folder.rglob("*")) if path.is_file()}
    (repo / "trees").mkdir()
    (repo / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": files}))


def write_the_old_way(pipe, folder: Path) -> None:
    """A pipeline folder as fullvq wrote it before module files: plain class names in model_index.json."""
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = type(pipe).__name__
    index["tokenizer"] = ["fullvq.tokenizer.modeling", "FVQModel"]
    if "gpt" in index:
        index["gpt"] = ["fullvq.generator.gpt", "FullVQGPT"]
    (folder / "model_index.json").write_text(json.dumps(index))
    for module_file in folder.rglob(MODULE_FILE):
        module_file.unlink()


def images_of(pipe, kind: str) -> np.ndarray:
    return pipe(["crane", 0], generator=torch.Generator().manual_seed(0), output_type="np", **CALLS[kind]).images


@pytest.fixture(scope="module")
def pipelines():
    return {kind: build_tiny_pipeline(kind) for kind in ("gpt", "flow")}


@pytest.fixture(scope="module")
def folders(pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    for kind, pipe in pipelines.items():
        pipe.save_pretrained(root / kind)
        write_the_old_way(pipe, root / f"old-{kind}")
    return root


def test_model_index_names_fullvq_classes_through_a_module_file_in_each_folder(folders):
    index = json.loads((folders / "gpt" / "model_index.json").read_text())
    stem = MODULE_FILE.removesuffix(".py")
    assert index["_class_name"] == [stem, "FullVQPipeline"]
    assert index["tokenizer"] == [stem, "FVQModel"] and index["gpt"] == [stem, "FullVQGPT"]
    assert all((folders / "gpt" / sub / MODULE_FILE).is_file() for sub in ("", "tokenizer", "gpt"))
    flow = json.loads((folders / "flow" / "model_index.json").read_text())
    assert flow["_class_name"] == [stem, "LatentFlowPipeline"] and flow["tokenizer"] == [stem, "FVQModel"]
    # diffusers' own components keep diffusers' entries and need no module file.
    assert flow["transformer"] == ["diffusers", "DiTTransformer2DModel"] and flow["scheduler"][0] == "diffusers"
    assert not (folders / "flow" / "transformer" / MODULE_FILE).exists()


@pytest.mark.parametrize("kind", ["gpt", "flow"])
def test_fullvq_loaders_read_new_and_old_folders_without_running_folder_code(pipelines, folders, kind):
    cls = {"gpt": FullVQPipeline, "flow": LatentFlowPipeline}[kind]
    expected = images_of(pipelines[kind], kind)
    remote_code_before = {name for name in sys.modules if name.startswith("diffusers_modules")}
    for folder in (folders / kind, folders / f"old-{kind}"):
        for loaded in (cls.from_pretrained(folder), load_pipeline(folder)):  # no trust_remote_code: no folder code
            assert type(loaded) is cls
            loaded.set_progress_bar_config(disable=True)
            np.testing.assert_allclose(images_of(loaded, kind), expected, atol=1e-6)
    assert {name for name in sys.modules if name.startswith("diffusers_modules")} == remote_code_before


def test_diffusers_alone_loads_local_hub_and_upgraded_old_folders_and_runs_the_cards_snippet(pipelines, folders,
                                                                                       tmp_path):
    hf_home = tmp_path / "hf"
    fake_hub_cache(folders / "gpt", "someone/fullvq-tiny", hf_home)
    fake_hub_cache(folders / "flow", "someone/fullvq-tiny-flow", hf_home)
    upgraded = tmp_path / "upgraded"
    shutil.copytree(folders / "old-gpt", upgraded)
    load_pipeline(upgraded).save_config(upgraded)  # the README's in-place upgrade: index + module files only
    load_pipeline(upgraded).save_pretrained(tmp_path / "resaved")
    # No local path travels with an upgraded or re-saved folder (diffusers writes the one it loaded from).
    for written in [upgraded / "model_index.json", *(tmp_path / "resaved").rglob("*.json")]:
        assert "_name_or_path" not in json.loads(written.read_text()), written
    sources = {"local": (folders / "gpt", "gpt"), "local-flow": (folders / "flow", "flow"),
               "hub": ("someone/fullvq-tiny", "gpt"), "hub-flow": ("someone/fullvq-tiny-flow", "flow"),
               "upgraded": (upgraded, "gpt")}
    plan = {name: (str(source), CALLS[kind]) for name, (source, kind) in sources.items()}
    card = write_model_card(folders / "gpt").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", DIFFUSERS_ONLY, json.dumps(plan), str(tmp_path), COMMIT, snippet],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {name: {"gpt": "FullVQPipeline", "flow": "LatentFlowPipeline"}[kind]
                      for name, (_, kind) in sources.items()}
    assert (tmp_path / "sample.png").is_file()  # written by the card's snippet
    for name, (_, kind) in sources.items():
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), images_of(pipelines[kind], kind), atol=1e-6)
