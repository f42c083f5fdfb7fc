"""The data, caching and evaluation paths on GPUs, checked on the CPU: uint8 batches give the float
inputs bit for bit, resumed multi-process jobs split what is left, Inception stays IEEE float32."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fullvq.data import eval_transform, train_transform
from fullvq.distributed import loader_options
from fullvq.images import from_uint8
from fullvq.precision import allow_tf32, inference_dtype


def test_uint8_batches_normalised_on_the_device_are_the_float_transforms_bit_for_bit():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 37, 3), dtype=np.uint8))
    for make in (lambda **kw: train_transform(32, **kw), lambda **kw: eval_transform(32, **kw)):
        torch.manual_seed(3)
        floats = make()(image)
        torch.manual_seed(3)
        pixels = make(uint8=True)(image)
        assert pixels.dtype == torch.uint8 and type(pixels) is torch.Tensor
        assert torch.equal(from_uint8(pixels[None])[0], floats)


def test_loaders_and_pipelines_default_to_gpu_settings_only_on_a_gpu():
    assert loader_options(None, "cpu") == {"num_workers": 0, "pin_memory": False}
    assert loader_options(None, "cuda") == {"num_workers": 8, "pin_memory": True}
    assert loader_options(3, "cuda")["num_workers"] == 3
    assert inference_dtype("cuda") == torch.bfloat16 and inference_dtype("cpu") == torch.float32
    assert inference_dtype("cuda", torch.float32) == torch.float32


def fake_rank(rank: int, world: int):
    """A stand-in for accelerate's process state of rank ``rank`` of ``world`` (no real group; it leaves
    the main process's closing steps to a main process that is not there)."""
    return SimpleNamespace(process_index=rank, num_processes=world, is_main_process=False,
                           is_local_main_process=False, device=torch.device("cpu"),
                           wait_for_everyone=lambda: None, main_process_first=lambda: _nothing())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_resumed_cache_splits_the_unfinished_shards_not_the_shard_numbers(tmp_path, monkeypatch,
                                                                            tiny_tokenizer_config):
    from fullvq.jobs import cache_tokens as job
    from fullvq.jobs.token_cache import read_shard_done
    from fullvq.tokenizer import FVQModel

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    tokenizer = FVQModel(quantizer="vq", codebook_size=64, codebook_dim=8, **tiny_tokenizer_config)
    tokenizer.save_pretrained(tmp_path / "tok")
    job.cache_tokens(tmp_path / "tok", tmp_path / "images", tmp_path / "cache", augmentation="none", shard_size=2,
                     batch_size=2, num_workers=0)
    for name in ("shard-00001", "shard-00003"):  # an interrupted run left the odd shards unfinished
        shutil.rmtree(tmp_path / "cache" / name)
    monkeypatch.setattr(job, "process_state", lambda: fake_rank(0, 2))
    job.cache_tokens(tmp_path / "tok", tmp_path / "images", tmp_path / "cache", augmentation="none", shard_size=2,
                     batch_size=2, num_workers=0)
    # Rank 0 of 2 takes the first unfinished shard; split by number, it would have had none left.
    assert read_shard_done(tmp_path / "cache" / "shard-00001") is not None
    assert read_shard_done(tmp_path / "cache" / "shard-00003") is None


def test_inception_runs_in_ieee_float32_whatever_tf32_is_set_to(tmp_path):
    from fullvq.eval import InceptionExtractor
    from fullvq.eval.inception import random_inception_weights

    extractor = InceptionExtractor(random_inception_weights(tmp_path / "inception.pth"), "cpu")
    seen = []
    conv = next(m for m in extractor.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda *args: seen.append(torch.backends.cudnn.conv.fp32_precision))
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        allow_tf32(True)
        extractor(torch.zeros(1, 3, 64, 64, dtype=torch.uint8) + 100)
        assert seen == ["ieee"] and torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@pytest.mark.parametrize("rank", [0, 1])
def test_a_resumed_gfid_run_splits_the_unfinished_batches(tmp_path, monkeypatch, rank):
    from fullvq.jobs import eval_generation as job

    calls = []

    class Pipeline:  # records what it is asked to draw; images are flat grey
        def sampling_options(self, **options):
            return {}

        def set_progress_bar_config(self, **kwargs):
            pass

        def __call__(self, class_labels, **kwargs):
            calls.append(list(class_labels))
            return SimpleNamespace(images=torch.full((len(class_labels), 3, 8, 8), 0.5))

    monkeypatch.setattr(job, "process_state", lambda: fake_rank(rank, 2))
    folder = tmp_path / "samples"
    paths = [job.sample_path(folder, class_id, index) for class_id in (0, 1) for index in range(4)]
    for path in paths[:2] + paths[4:6]:  # batches 0 and 2 (of 2 images) are there already
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    job.generate_samples(Pipeline(), folder, classes=[0, 1], images_per_class=4, batch_size=2)
    assert calls == [[0, 0]] if rank == 0 else calls == [[1, 1]]  # batches 1 and 3: one each
