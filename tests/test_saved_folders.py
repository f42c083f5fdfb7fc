"""Folders saved by fullvq 0.1 (before the restructure) still load and compute what they computed then.

The fixtures in ``tests/fixtures/saved-0.1`` were written by commit 914f3b4 with
``tests/fixtures/make_saved_folders.py``, together with that code's outputs on fixed inputs.
"""

import json
from pathlib import Path

import pytest
import torch

from fullvq import FullVQPipeline, FVQModel, LatentFlowPipeline
from fullvq.pipelines import load_pipeline

SAVED = Path(__file__).parent / "fixtures" / "saved-0.1"


@pytest.fixture(scope="module")
def expected():
    return torch.load(SAVED / "expected.pt", weights_only=True)


@pytest.mark.parametrize("name", ["fvq", "fvq-square", "lc"])
def test_an_old_tokenizer_folder_gives_the_same_codes_and_images(name, expected):
    tokenizer = FVQModel.from_pretrained(SAVED / f"tokenizer-{name}").eval()
    with torch.no_grad():
        indices = tokenizer.encode_indices(expected["images"])
        decoded = tokenizer.decode_indices(indices)
    assert torch.equal(indices, expected[f"indices/{name}"])
    torch.testing.assert_close(decoded, expected[f"decoded/{name}"], rtol=0, atol=1e-6)


def test_an_old_gpt_pipeline_folder_loads_by_its_model_index_and_samples_the_same_images(expected):
    pipe = load_pipeline(SAVED / "pipeline-gpt")
    assert isinstance(pipe, FullVQPipeline) and pipe.labels == {"tench, Tinca tinca": 0, "golden retriever": 1}
    # The folder names its components by module path: these modules must stay where they are.
    index = json.loads((SAVED / "pipeline-gpt" / "model_index.json").read_text())
    assert index["gpt"] == ["fullvq.generator.gpt", "FullVQGPT"]
    assert index["tokenizer"] == ["fullvq.tokenizer.modeling", "FVQModel"]
    images = pipe(["golden retriever", 0], guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    torch.testing.assert_close(images, expected["pipeline-gpt"], rtol=0, atol=1e-6)


def test_an_old_dit_pipeline_folder_loads_by_its_model_index_and_samples_the_same_images(expected):
    pipe = LatentFlowPipeline.from_pretrained(SAVED / "pipeline-dit")
    assert pipe.config.latent_std == [1.0, 2.0, 1.0, 0.5]
    images = pipe([1, 0], guidance_scale=4.0, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    torch.testing.assert_close(images, expected["pipeline-dit"], rtol=0, atol=1e-6)


def test_an_old_token_cache_reads_and_still_matches_its_tokenizer():
    from fullvq.jobs.token_cache import TokenCache
    from fullvq.jobs.train_generator import GeneratorTrainConfig, load_tokenizer

    cache = TokenCache(SAVED / "tokens")
    assert len(cache) == 12 and cache.grid == (4, 4) and cache[3]["tokens"].shape == (2, 16)
    config = GeneratorTrainConfig(tokens=str(SAVED / "tokens"), tokenizer=str(SAVED / "tokenizer-fvq"))
    tokenizer = load_tokenizer(config, cache)  # checks the recorded sha256, codebook size and grid
    with torch.no_grad():
        torch.testing.assert_close(cache.codebook(), tokenizer.quantize.codebook(), rtol=0, atol=0)
