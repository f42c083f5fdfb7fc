"""Evaluation on CUDA: the FID of a small set equals the CPU's."""

import os

import torch

from fullvq.eval import InceptionExtractor, ReferenceStatistics, frechet_distance, precision_recall
from fullvq.eval.inception import INCEPTION_WEIGHTS_ENV, random_inception_weights


def test_fid_of_a_small_set_on_cuda_is_the_cpu_fid(device, tmp_path):
    # The real weights when the machine has them; else random ones (the same arithmetic, meaningless features).
    weights = os.environ.get(INCEPTION_WEIGHTS_ENV) or random_inception_weights(tmp_path / "inception.pth")
    generator = torch.Generator().manual_seed(0)
    count = 16 if device.type == "cuda" else 4  # InceptionV3 is slow on a small CPU
    real = torch.randint(0, 256, (count, 3, 64, 64), generator=generator, dtype=torch.uint8)
    fake = (real.float() * 0.8 + 20 * torch.rand(real.shape, generator=generator)).to(torch.uint8)
    scores = []
    for where in ("cpu", device) if device.type == "cuda" else ("cpu",):  # on the CPU stand-in: once
        extractor = InceptionExtractor(weights, where)
        statistics = [ReferenceStatistics.from_features(extractor(images)[0]) for images in (real, fake)]
        scores.append(frechet_distance(*statistics))
    on_cpu, on_device = scores[0], scores[-1]
    assert on_cpu > 1  # the sets differ
    assert abs(on_device - on_cpu) <= 1e-3 * on_cpu, scores


def test_precision_recall_on_the_device_is_the_cpu_result(device):
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(300, 64, generator=generator)
    fake = torch.randn(300, 64, generator=generator) * 1.2 + 0.3
    assert precision_recall(fake, real, device=device) == precision_recall(fake, real, device="cpu")
