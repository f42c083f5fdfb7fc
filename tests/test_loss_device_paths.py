"""What the tokenizer's losses promise on the GPU path (no wasted discriminator gradients, no host
copies, LPIPS' trunk under autocast, a reusable adaptive weight), checked on the CPU."""

import pytest
import torch

from fullvq import FVQModel
from fullvq.tokenizer.losses import PerceptualLoss, TokenizerLoss

TINY_DISCRIMINATOR = dict(discriminator_channels=8, discriminator_layers=3)


def tiny_model(tiny_tokenizer_config):
    return FVQModel(quantizer="vq", codebook_size=64, codebook_dim=8, **tiny_tokenizer_config)


def test_the_generator_pass_leaves_no_gradient_in_the_discriminator(tiny_tokenizer_config):
    # So under gradient accumulation the discriminator's gradients hold only its own loss, and
    # nothing has to zero them before its step (accelerate's zero_grad is a no-op mid-accumulation).
    loss = TokenizerLoss(perceptual_weight=0, gan_start_step=0, **TINY_DISCRIMINATOR)
    model = tiny_model(tiny_tokenizer_config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images)
    total, logs = loss.generator_loss(images, out.sample, out.loss, step=0)
    total.backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert all(p.requires_grad for p in loss.discriminator.parameters())  # unfrozen again
    assert logs["gan_weight"].item() == 0.5


def test_the_adaptive_weight_is_recomputed_every_n_steps_and_reused_in_between(tiny_tokenizer_config, monkeypatch):
    from fullvq.tokenizer import losses

    calls = []
    original = losses.adaptive_gan_weight
    monkeypatch.setattr(losses, "adaptive_gan_weight", lambda *args: calls.append(1) or original(*args))
    loss = TokenizerLoss(perceptual_weight=0, gan_start_step=0, adaptive_gan_weight=True,
                         adaptive_gan_weight_every=3, **TINY_DISCRIMINATOR)
    model = tiny_model(tiny_tokenizer_config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    weights = []
    for step in range(7):
        out = model(images)
        _, logs = loss.generator_loss(images, out.sample, out.loss, step, model.decoder.conv_out.weight)
        weights.append(logs["gan_weight"].item())
    assert len(calls) == 3  # steps 0, 3 and 6
    assert weights[0] == weights[1] == weights[2] and weights[3] == weights[4] == weights[5]
    with pytest.raises(ValueError, match="adaptive_gan_weight_every=0"):
        TokenizerLoss(adaptive_gan_weight_every=0)


def test_lpips_trunk_runs_under_the_callers_autocast_only_when_asked():
    plain, fast = PerceptualLoss(random_backbone=True), PerceptualLoss(random_backbone=True, autocast_trunk=True)
    fast.load_state_dict(plain.state_dict())
    fast.lpips.net.net.load_state_dict(plain.lpips.net.state_dict())
    seen = {}
    for name, module in (("plain", plain), ("fast", fast)):
        first_conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.dtype))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    noisy = (images + 0.2 * torch.randn_like(images)).clamp(-1, 1)
    reference = plain(images, noisy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact, quick = plain(images, noisy), fast(images, noisy)
    assert seen == {"plain": torch.float32, "fast": torch.bfloat16}
    assert exact.dtype == quick.dtype == torch.float32
    assert torch.equal(exact, reference)
    torch.testing.assert_close(quick, reference, rtol=0.05, atol=1e-3)
    assert torch.equal(fast(images, noisy), reference)  # outside autocast the trunk is float32 again
