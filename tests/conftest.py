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
def _seed_one_thread_and_fresh_accelerate_state():
    """Every test: a fixed seed; one thread (the models here are tiny, and two threads spin for far
    longer than they compute whenever another job shares the two cores); and accelerate's
    process-wide state reset afterwards, so each in-process training run starts clean."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
