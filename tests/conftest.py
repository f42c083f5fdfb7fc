import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# A tokenizer small enough to train in seconds on 2 CPU cores: 32 px -> 8 x 8 tokens.
TINY_TOKENIZER = dict(
    sample_size=32,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
)


@pytest.fixture
def tiny_tokenizer_config():
    return dict(TINY_TOKENIZER)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
