"""Model cards: Hub metadata a machine can read, the facts of the folder, a snippet that runs, and
regeneration that replaces rather than appends."""

import re

import pytest
import torch
import yaml
from conftest import TINY_TOKENIZER, build_tiny_pipeline

from fullvq import FVQModel
from fullvq.cards import command_line, describe_folder, read_card_facts, write_model_card


def front_matter(path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n"), "a Hub card starts with YAML front matter"
    return yaml.safe_load(text.split("---\n")[1])


def python_blocks(path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def rfid_report(rfid: float, usage: float) -> dict:
    return {"task": "reconstruction", "complete": True, "data": "demo", "num_images": 50,
            "metrics": {"rfid": rfid, "psnr": 21.5, "lpips": None, "codebook_usage_percent": usage},
            "files": {"report": "eval/rfid/report.json"}}


@pytest.fixture
def tokenizer_folder(tmp_path):
    torch.manual_seed(0)
    FVQModel(**TINY_TOKENIZER, quantizer="fvq", codebook_size=256, codebook_dim=8).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_tokenizer_card_has_hub_metadata_architecture_and_the_run_facts(tokenizer_folder):
    card = write_model_card(tokenizer_folder, command="fullvq train-tokenizer configs/demo.yaml train.max_steps=5",
                            recipe={"train": {"max_steps": 5, "learning_rate": 4e-4}}, data="demo (MNIST digits)",
                            metrics={"training": {"codebook_usage_percent": 87.5}})
    meta = front_matter(card)
    assert meta["library_name"] == "fullvq" and meta["pipeline_tag"] == "image-to-image"
    assert meta["license"] == "apache-2.0"
    assert {"fullvq", "image-tokenizer", "quantizer-fvq"} <= set(meta["tags"])
    assert meta["fullvq"]["kind"] == "tokenizer" and meta["fullvq"]["recipe"]["train"]["max_steps"] == 5
    text = card.read_text()
    assert "256 codes of dimension 8" in text and "8 x 8 (downsample 4)" in text
    assert "usage (training): 87.50 % of the codes" in text
    assert "fullvq train-tokenizer configs/demo.yaml train.max_steps=5" in text and "demo (MNIST digits)" in text


def test_eval_regenerates_the_card_keeping_the_run_facts_and_replacing_that_tasks_figures(tokenizer_folder):
    write_model_card(tokenizer_folder, command="fullvq train-tokenizer recipe.yaml", data="demo")
    write_model_card(tokenizer_folder, report=rfid_report(9.5, 70.0))
    card = write_model_card(tokenizer_folder, report=rfid_report(4.25, 99.0))
    text, meta = card.read_text(), front_matter(card)
    assert text.count("## Metrics") == 1 and text.count("---\n") == 2 and text.count("## Use it") == 1
    assert meta["fullvq"]["command"] == "fullvq train-tokenizer recipe.yaml"  # kept from the first write
    assert meta["fullvq"]["metrics"]["reconstruction"]["rfid"] == 4.25 and "9.5" not in text
    assert "usage (reconstruction): 99.00 % of the codes" in text
    results = meta["model-index"][0]["results"]
    assert {(m["name"], m["value"]) for r in results for m in r["metrics"]} == {("rFID", 4.25), ("PSNR", 21.5)}
    assert results[0]["dataset"]["name"] == "demo"
    with pytest.raises(ValueError, match="not complete"):
        write_model_card(tokenizer_folder, report={**rfid_report(1.0, 1.0), "complete": False})


def test_the_tokenizer_cards_snippet_runs(tokenizer_folder, monkeypatch, tmp_path):
    card = write_model_card(tokenizer_folder)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(python_blocks(card)[0], namespace)
    assert namespace["codes"].shape == (2, 8, 8) and namespace["reconstructions"].shape == (2, 3, 32, 32)


def test_gpt_and_pipeline_cards_describe_both_models(tmp_path):
    pipe = build_tiny_pipeline("gpt")
    pipe.save_pretrained(tmp_path / "pipeline")
    pipe.gpt.save_pretrained(tmp_path / "gpt")
    gpt_card = write_model_card(tmp_path / "gpt", source="a LlamaGen c2i checkpoint", license="mit")
    meta = front_matter(gpt_card)
    assert meta["pipeline_tag"] == "unconditional-image-generation" and meta["license"] == "mit"
    assert "converted from a LlamaGen c2i checkpoint" in gpt_card.read_text()
    namespace = {}
    exec(python_blocks(gpt_card)[0], namespace)
    assert namespace["codes"].shape == (2, 64) and int(namespace["codes"].max()) < 64

    card = write_model_card(tmp_path / "pipeline", repo_id="someone/fullvq-tiny")
    meta, text = front_matter(card), card.read_text()
    assert meta["library_name"] == "diffusers" and "custom_code" in meta["tags"]
    assert "DiffusionPipeline.from_pretrained('someone/fullvq-tiny', trust_remote_code=True)" in text
    assert "class_labels=['tench', 'golden retriever']" in text
    assert describe_folder(tmp_path / "pipeline")["generator"]["num_classes"] == 3


def test_flow_pipeline_card_names_the_transformer_and_scheduler(tmp_path):
    build_tiny_pipeline("flow").save_pretrained(tmp_path / "flow")
    text = write_model_card(tmp_path / "flow").read_text()
    assert "DiTTransformer2DModel, 2 layers x 32 wide" in text and "FlowMatchEulerDiscreteScheduler" in text
    assert "diffusion" in front_matter(tmp_path / "flow" / "README.md")["tags"]


def test_a_folder_without_a_fullvq_model_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="holds no fullvq model"):
        write_model_card(tmp_path)
    (tmp_path / "README.md").write_text("# someone else's card\n")
    assert read_card_facts(tmp_path) == {}


def test_command_line_reads_as_typed():
    assert command_line(["/venv/bin/fullvq", "eval", "rfid", "--data", "my images"]) == \
        "fullvq eval rfid --data 'my images'"


def test_eval_updates_only_a_local_folders_card_and_never_fails_a_finished_evaluation(tokenizer_folder, tmp_path):
    from fullvq.cards import add_report_to_card

    assert add_report_to_card("someone/hub-model", rfid_report(3.0, 90.0)) is None  # a hub id: left alone
    assert add_report_to_card(tokenizer_folder, rfid_report(3.0, 90.0)) == tokenizer_folder / "README.md"
    with pytest.warns(UserWarning, match="was not updated"):
        assert add_report_to_card(tmp_path, rfid_report(3.0, 90.0)) is None  # no fullvq model there


def test_a_runs_model_and_pipeline_folders_are_named_after_the_run_and_other_folders_after_themselves(tmp_path):
    pipe = build_tiny_pipeline("gpt")
    pipe.save_pretrained(tmp_path / "fvq-digits" / "pipeline")  # what train-generator writes
    pipe.tokenizer.save_pretrained(tmp_path / "fvq-digits" / "model")  # what train-tokenizer writes, with its card
    write_model_card(tmp_path / "fvq-digits" / "model")
    pipe.save_pretrained(tmp_path / "llamagen-b")  # what convert writes: the folder itself is the model
    assert front_matter(tmp_path / "fvq-digits" / "pipeline" / "README.md")["model_name"] == "fvq-digits"
    assert front_matter(tmp_path / "fvq-digits" / "model" / "README.md")["model_name"] == "fvq-digits"
    assert front_matter(tmp_path / "llamagen-b" / "README.md")["model_name"] == "llamagen-b"
    card = write_model_card(tmp_path / "llamagen-b", repo_id="someone/fullvq-b")
    assert front_matter(card)["model_name"] == "fullvq-b"


def test_counts_in_cards_agree_with_their_noun():
    from fullvq.cards import _plural

    assert _plural(1, "layer") == "1 layer" and _plural(24, "layer") == "24 layers"
