import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from fullvq.cli import main  # noqa: E402
from fullvq.commands.sample import parse_labels  # noqa: E402
from fullvq.generator import FullVQGPT, FullVQGPTConfig  # noqa: E402
from fullvq.pipelines import FullVQPipeline  # noqa: E402
from fullvq.tokenizer import FVQModel  # noqa: E402

ID2LABEL = {0: "tench, Tinca tinca", 1: "golden retriever", 2: "crane"}


def tiny_tokenizer(**overrides):
    """32 px images -> an 8 x 8 grid of codes from a 64-code book."""
    settings = dict(sample_size=32, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16,
                    norm_num_groups=8, quantizer="vq", codebook_size=64, codebook_dim=8)
    return FVQModel(**{**settings, **overrides}).eval()


def tiny_gpt(**overrides):
    """A tiny GPT whose zero-initialised head is randomised, so samples depend on label and seed."""
    settings = dict(codebook_size=64, num_classes=3, grid_size=8, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2)
    gpt = FullVQGPT(FullVQGPTConfig(**{**settings, **overrides})).eval()
    nn.init.normal_(gpt.lm_head.weight, std=0.5)
    return gpt


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipe = FullVQPipeline(tiny_tokenizer(), tiny_gpt(), id2label=ID2LABEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(folder)
    return folder


def test_save_pretrained_then_from_pretrained_gives_identical_images(pipe, saved):
    loaded = FullVQPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    before = pipe([0, 1, 2], generator=seeded(), output_type="pt").images
    after = loaded([0, 1, 2], generator=seeded(), output_type="pt").images
    assert torch.equal(before, after)
    assert before.std() > 0.01  # not a blank image
    assert loaded.config.id2label == ID2LABEL  # int keys again after the JSON round trip
    assert loaded.config.sample_size == 32


def test_a_hub_id_is_fetched_with_the_component_folders_then_loaded_locally(saved, monkeypatch):
    import fullvq.pipelines.base as base

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(saved)

    monkeypatch.setattr(base, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE")  # a fetch from the hub (faked), as when online
    loaded = FullVQPipeline.from_pretrained("someone/fullvq-tiny", revision="v1")
    assert calls == [("someone/fullvq-tiny", dict(allow_patterns=["model_index.json", "tokenizer/*", "gpt/*"],
                                                  revision="v1"))]
    assert loaded.config.id2label == ID2LABEL


def test_model_index_names_the_component_classes_and_keeps_labels_and_size(saved):
    index = json.loads((saved / "model_index.json").read_text())
    # [module file, class]: the module file lets diffusers' DiffusionPipeline find fullvq's classes.
    assert index["_class_name"] == ["fullvq_classes", "FullVQPipeline"]
    assert index["tokenizer"] == ["fullvq_classes", "FVQModel"]
    assert index["gpt"] == ["fullvq_classes", "FullVQGPT"]
    assert index["id2label"] == {str(key): name for key, name in ID2LABEL.items()}
    assert index["sample_size"] == 32
    assert (saved / "tokenizer" / "config.json").is_file() and (saved / "gpt" / "config.json").is_file()


def test_the_same_seed_repeats_and_another_seed_or_label_differs(pipe):
    first = pipe([0, 1], generator=seeded(0), output_type="pt").images
    assert torch.equal(first, pipe([0, 1], generator=seeded(0), output_type="pt").images)
    assert not torch.equal(first, pipe([0, 1], generator=seeded(1), output_type="pt").images)
    assert not torch.equal(first[0], first[1])


def test_output_types_agree(pipe):
    tensors = pipe([0, 2], generator=seeded(), output_type="pt").images
    arrays = pipe([0, 2], generator=seeded(), output_type="np").images
    pictures = pipe([0, 2], generator=seeded()).images
    assert tensors.shape == (2, 3, 32, 32) and tensors.dtype == torch.float32
    assert 0 <= tensors.min() and tensors.max() <= 1
    assert arrays.shape == (2, 32, 32, 3) and arrays.dtype == np.float32
    np.testing.assert_array_equal(arrays, tensors.permute(0, 2, 3, 1).numpy())
    assert all(isinstance(p, Image.Image) and p.size == (32, 32) and p.mode == "RGB" for p in pictures)
    np.testing.assert_array_equal(np.asarray(pictures[1]), (arrays[1] * 255).round().astype(np.uint8))
    (images,) = pipe(0, generator=seeded(), output_type="np", return_dict=False)
    assert images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="output_type='latent' must be one of"):
        pipe(0, output_type="latent")


def test_class_names_resolve_to_ids_including_imagenet_synonyms(pipe):
    assert pipe.get_label_ids(["golden retriever", "tench, Tinca tinca", "Tinca tinca", "TENCH", 2]) == [1, 0, 0, 0, 2]
    assert pipe.get_label_ids("crane") == [2]
    assert pipe.labels == {"tench, Tinca tinca": 0, "golden retriever": 1, "crane": 2}
    by_name = pipe(["tench", "golden retriever"], generator=seeded(), output_type="pt").images
    by_id = pipe([0, 1], generator=seeded(), output_type="pt").images
    assert torch.equal(by_name, by_id)


def test_unknown_names_and_out_of_range_labels_raise_clear_errors(pipe):
    close_match = r"unknown class name 'golden retreiver'; close matches: 'golden retriever' \(1\)"
    with pytest.raises(ValueError, match=close_match):
        pipe("golden retreiver")
    with pytest.raises(ValueError, match=r"class label 3 is outside \[0, 3\)"):
        pipe([0, 3])
    with pytest.raises(ValueError, match=r"class label -1 is outside"):
        pipe(-1)
    with pytest.raises(TypeError, match="must be an int id or a class name"):
        pipe([0.5])
    with pytest.raises(ValueError, match="class_labels is empty"):
        pipe([])


def test_a_name_shared_by_two_classes_is_ambiguous_and_names_need_id2label():
    # ImageNet has two classes called "crane" (the bird and the machine).
    pipe = FullVQPipeline(tiny_tokenizer(), tiny_gpt(), id2label={0: "crane", 1: "crane", 2: "maillot, tank suit"})
    with pytest.raises(ValueError, match=r"'crane' is ambiguous: it names classes 0 \('crane'\), 1 \('crane'\)"):
        pipe.get_label_ids("crane")
    assert pipe.get_label_ids("tank suit") == [2]
    unnamed = FullVQPipeline(tiny_tokenizer(), tiny_gpt())
    with pytest.raises(ValueError, match="has no id2label; pass integer ids"):
        unnamed.get_label_ids("crane")


def test_images_come_label_by_label_in_batches(pipe):
    pipe.set_progress_bar_config(disable=False)
    try:
        images = pipe([2, 0], num_images_per_label=2, batch_size=3, generator=seeded(), output_type="pt").images
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert images.shape == (4, 3, 32, 32)
    # Greedy decoding is deterministic, so each image depends only on its label, not on its batch
    # (up to float rounding: the decoder's convolutions round differently for another batch size).
    greedy = pipe([2, 0], num_images_per_label=2, temperature=0, batch_size=3, output_type="pt").images
    close = dict(atol=1e-4, rtol=0)
    torch.testing.assert_close(greedy[[0, 2]], greedy[[1, 3]], **close)
    regrouped = pipe([2, 2, 0, 0], temperature=0, batch_size=4, output_type="pt").images
    torch.testing.assert_close(greedy, regrouped, **close)
    assert not torch.allclose(greedy[0], greedy[2], atol=1e-2)


def test_construction_refuses_mismatched_components():
    with pytest.raises(ValueError, match="codebook_size=64 differs from the GPT's codebook_size=32"):
        FullVQPipeline(tiny_tokenizer(), tiny_gpt(codebook_size=32))
    with pytest.raises(ValueError, match=r"latent grid \(8, 8\) .* differs from the GPT's grid_size \(4, 4\)"):
        FullVQPipeline(tiny_tokenizer(), tiny_gpt(grid_size=4))
    with pytest.raises(ValueError, match=r"id2label has ids \[5\] outside \[0, 3\)"):
        FullVQPipeline(tiny_tokenizer(), tiny_gpt(), id2label={5: "five"})
    with pytest.raises(ValueError, match="sample_size=64 does not match"):
        FullVQPipeline(tiny_tokenizer(), tiny_gpt(), sample_size=64)


def test_components_rebuild_the_pipeline_and_dtype_selection_works(pipe, saved):
    again = FullVQPipeline(**pipe.components, id2label=pipe.config.id2label)
    assert again.tokenizer is pipe.tokenizer and again.gpt is pipe.gpt
    half = FullVQPipeline.from_pretrained(saved, dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert half.gpt.dtype == half.tokenizer.dtype == torch.bfloat16
    images = half([1], generator=seeded(), output_type="pt").images
    assert images.dtype == torch.float32 and images.shape == (1, 3, 32, 32)


def test_each_pipeline_kind_names_its_sampling_settings_and_their_one_default(pipe):
    from fullvq.generator import DEFAULT_DIT_GUIDANCE_SCALE, DEFAULT_GUIDANCE_SCALE, build_transformer
    from fullvq.generator.latent_flow import sampling_scheduler
    from fullvq.pipelines import LatentFlowPipeline

    assert DEFAULT_GUIDANCE_SCALE == 2.0 and DEFAULT_DIT_GUIDANCE_SCALE == 4.0
    assert pipe.sampling_options(temperature=0.5, top_k=None) == {
        "guidance_scale": DEFAULT_GUIDANCE_SCALE, "guidance_schedule": "constant", "temperature": 0.5, "top_k": 0,
        "top_p": 1.0}
    with pytest.raises(ValueError, match="num_inference_steps does not apply to a FullVQPipeline"):
        pipe.sampling_options(num_inference_steps=3)
    transformer = build_transformer(latent_channels=8, grid_size=8, num_classes=3, num_layers=1,
                                    num_attention_heads=2, attention_head_dim=8, norm_num_groups=4)
    flow = LatentFlowPipeline(pipe.tokenizer, transformer, sampling_scheduler("flow"))
    assert flow.sampling_options(guidance_scale=None) == {
        "guidance_scale": DEFAULT_DIT_GUIDANCE_SCALE, "num_inference_steps": 50, "snap_to_codebook": False}
    with pytest.raises(ValueError, match="temperature, top_p do not apply to a LatentFlowPipeline"):
        flow.sampling_options(temperature=0.5, top_p=0.9)


def test_parse_labels_splits_id_lists_and_keeps_names_whole():
    assert parse_labels(["0,2", "1", "golden retriever", "tench, Tinca tinca"]) == [
        0, 2, 1, "golden retriever", "tench, Tinca tinca"]


def test_sample_command_writes_pngs_and_a_grid(saved, tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["sample", str(saved), "--labels", "2", "golden retriever", "--num-per-label", "2", "--seed", "3",
            "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["1_0.png", "1_1.png", "2_0.png", "2_1.png", "grid.png"]
    assert Image.open(out / "2_0.png").size == (32, 32)
    assert Image.open(out / "grid.png").size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 x 2 images, padding 2
    assert str(out) in capsys.readouterr().out

    assert main(["sample", str(saved), "--labels", "golden retreiver", "--out", str(out)]) == 2
    assert "close matches: 'golden retriever'" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, error, argument", [
    ({"guidance_scale": float("nan")}, ValueError, "guidance_scale"),
    ({"guidance_scale": float("inf")}, ValueError, "guidance_scale"),
    ({"class_labels": 1.5}, TypeError, "class_labels"),
    ({"class_labels": None}, TypeError, "class_labels"),
    ({"class_labels": torch.tensor([0.0, 1.0])}, TypeError, "class_labels"),
    ({"num_images_per_label": 1.5}, TypeError, "num_images_per_label"),
    ({"batch_size": 2.0}, TypeError, "batch_size"),
])
def test_bad_call_arguments_are_refused_naming_the_argument(pipe, kwargs, error, argument):
    """Issue 19, class 12: before any sampling, and not from inside torch."""
    call = {"class_labels": [0, 1], "generator": seeded(), "output_type": "pt", **kwargs}
    with pytest.raises(error, match=argument):
        pipe(**call)


def test_sample_command_refuses_a_non_finite_guidance_scale(saved, tmp_path, capsys):
    for value in ("nan", "inf"):
        assert main(["sample", str(saved), "--labels", "0", "--guidance-scale", value, "--output", str(tmp_path)]) == 2
        assert "guidance_scale" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_pipeline_folder_missing_a_components_weights_says_which(saved, tmp_path):
    import shutil

    folder = tmp_path / "pipeline"
    shutil.copytree(saved, folder)
    for weights in (folder / "gpt").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"gpt folder .*gpt holds config.json but no weights"):
        FullVQPipeline.from_pretrained(folder)
