import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread for the whole session, module-scoped fixtures and subprocesses included: the models here
# are tiny, two threads spin for far longer than they compute whenever another job shares the two
# cores, and a fixture run with two threads sums in another order than a test run with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

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
    """Every test: a fixed seed, one thread (a test that changes it gets it back), and accelerate's
    process-wide state reset afterwards, so each in-process training run starts clean."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


TINY_LABELS = {0: "tench, Tinca tinca", 1: "golden retriever", 2: "crane"}


def build_tiny_pipeline(kind: str = "gpt"):
    """A 3-class pipeline on 32 px images that builds in a second: ``FullVQPipeline`` (``kind="gpt"``,
    its GPT head randomised so samples depend on label and seed) or ``LatentFlowPipeline`` (``"flow"``)."""
    from torch import nn

    from fullvq import FVQModel
    from fullvq.pipelines import FullVQPipeline, LatentFlowPipeline

    torch.manual_seed(0)
    tokenizer = FVQModel(**TINY_TOKENIZER, quantizer="vq", codebook_size=64, codebook_dim=8).eval()
    if kind == "flow":
        from fullvq.generator.latent_flow import build_transformer, sampling_scheduler

        transformer = build_transformer(latent_channels=8, grid_size=8, num_classes=3, patch_size=2, num_layers=2,
                                        num_attention_heads=2, attention_head_dim=16).eval()
        pipe = LatentFlowPipeline(tokenizer, transformer, sampling_scheduler("flow"), id2label=TINY_LABELS)
    else:
        from fullvq.generator.gpt import FullVQGPT, FullVQGPTConfig

        gpt = FullVQGPT(FullVQGPTConfig(codebook_size=64, num_classes=3, grid_size=8, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=2)).eval()
        nn.init.normal_(gpt.lm_head.weight, std=0.5)
        pipe = FullVQPipeline(tokenizer, gpt, id2label=TINY_LABELS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- the GPU test layer
# Every test under tests/gpu is marked ``gpu`` and takes the ``device`` fixture, which skips it when no
# CUDA GPU is present (CI has none, so these never block it). FULLVQ_GPU_TESTS_ON_CPU=1 runs them on
# the CPU instead (benchmarks/gpu_suite.py --smoke does), so they are known to run before a GPU runs
# them ("CUDA against CPU" then compares the CPU with itself). On a GPU: python -m pytest -m gpu tests/gpu
GPU_TESTS_ON_CPU = os.environ.get("FULLVQ_GPU_TESTS_ON_CPU") == "1"
GPU_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(GPU_TESTS + os.sep):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def device() -> torch.device:
    """The GPU test layer's device: CUDA, or the CPU under FULLVQ_GPU_TESTS_ON_CPU=1, else the test skips."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if GPU_TESTS_ON_CPU:
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (FULLVQ_GPU_TESTS_ON_CPU=1 tries the test on the CPU)")


@pytest.fixture
def cheap_compile(device, monkeypatch):
    """On the CPU stand-in, compile the decoding step with aot_eager (the same graph capture, without
    inductor's minutes of code generation on small CPUs); on a GPU leave the real settings."""
    if device.type == "cpu":
        from fullvq.generator import sampling

        monkeypatch.setattr(sampling, "decode_compile_options", lambda device: {"backend": "aot_eager"})
