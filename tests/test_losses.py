import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fullvq import FVQModel  # noqa: E402
from fullvq.tokenizer.losses import (  # noqa: E402
    VGG16_WEIGHTS_ENV,
    PatchGANDiscriminator,
    PerceptualLoss,
    TokenizerLoss,
    adaptive_gan_weight,
    find_vgg16_weights,
    hinge_discriminator_loss,
    hinge_generator_loss,
    non_saturating_discriminator_loss,
    non_saturating_generator_loss,
    reconstruction_loss,
    vgg16_cache_path,
)

# Small enough for 2 CPU cores; 32 px is the smallest a 3-layer PatchGAN accepts (24) rounded up.
TINY_DISCRIMINATOR = dict(discriminator_channels=8, discriminator_layers=3)


@pytest.fixture(autouse=True)
def _no_vgg_anywhere(tmp_path, monkeypatch):
    """Every test starts with an empty torch hub cache and no weights variable."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(VGG16_WEIGHTS_ENV, raising=False)


@pytest.fixture(scope="module")
def random_lpips():
    return PerceptualLoss(random_backbone=True)


@pytest.fixture
def features_only_vgg16(monkeypatch):
    """Let lpips build torchvision's VGG16 without its 102M-parameter classifier (saves ~2 s a build);
    for tests whose backbone weights are overwritten from a file anyway."""
    import lpips.pretrained_networks
    from torchvision.models.vgg import cfgs, make_layers

    class FeaturesOnlyVGG16(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.features = make_layers(cfgs["D"])

    monkeypatch.setattr(lpips.pretrained_networks.tv, "vgg16", FeaturesOnlyVGG16)


@pytest.fixture(scope="module")
def fake_vgg16_features(random_lpips):
    """A torchvision-format VGG16 state dict with only the `features.*` keys LPIPS reads (60 MB, not 530)."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, param in random_lpips.lpips.net.named_parameters():
        _, index, kind = name.split(".")
        state[f"features.{index}.{kind}"] = torch.randn(param.shape, generator=generator) * 0.05
    return state


def images_pair(batch=2, size=32):
    images = torch.rand(batch, 3, size, size) * 2 - 1
    return images, (images + 0.1 * torch.randn_like(images)).clamp(-1, 1)


def tiny_model(config):
    return FVQModel(quantizer="vq", codebook_size=64, codebook_dim=8, **config)


# ----------------------------------------------------------------------------- formulas


def test_l1_and_l2_reconstruction_of_known_tensors():
    images = torch.zeros(1, 1, 2, 2)
    reconstructions = torch.tensor([1.0, -1.0, 2.0, 0.0]).view(1, 1, 2, 2)
    assert reconstruction_loss(images, reconstructions, "l1").item() == pytest.approx(1.0)  # (1+1+2+0)/4
    assert reconstruction_loss(images, reconstructions, "l2").item() == pytest.approx(1.5)  # (1+1+4+0)/4
    with pytest.raises(ValueError, match="'l3'"):
        reconstruction_loss(images, reconstructions, "l3")


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x): 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x): 0, 1, 2 -> mean 1
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_generator_loss(fake).item() == pytest.approx(1 / 3)  # -mean(-2, 0, 1)


def test_non_saturating_losses_on_known_logits():
    zeros = torch.zeros(4)  # sigmoid(0) = 1/2 everywhere: every term is log 2
    assert non_saturating_discriminator_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    assert non_saturating_generator_loss(zeros).item() == pytest.approx(math.log(2))
    real, fake = torch.tensor([3.0]), torch.tensor([-1.0])  # softplus(x) = log(1 + e^x)
    expected = 0.5 * (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-1.0)))
    assert non_saturating_discriminator_loss(real, fake).item() == pytest.approx(expected)
    assert non_saturating_generator_loss(fake).item() == pytest.approx(math.log1p(math.exp(1.0)))


def test_adaptive_weight_is_the_gradient_norm_ratio_and_respects_the_clamp():
    last_layer = torch.ones(4, requires_grad=True)
    nll = 3.0 * last_layer.sum()  # gradient norm 3 * 2
    gan = 1.0 * last_layer.sum()  # gradient norm 2
    assert adaptive_gan_weight(nll, gan, last_layer).item() == pytest.approx(6 / (2 + 1e-4))
    vanishing_gan = 1e-12 * last_layer.sum()
    assert adaptive_gan_weight(nll, vanishing_gan, last_layer).item() == 1e4
    assert adaptive_gan_weight(nll, vanishing_gan, last_layer, max_weight=7.0).item() == 7.0
    assert not adaptive_gan_weight(nll, gan, last_layer).requires_grad


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="gan_loss='wgan'"):
        TokenizerLoss(gan_loss="wgan", perceptual_weight=0)
    with pytest.raises(ValueError, match="reconstruction_loss='huber'"):
        TokenizerLoss(reconstruction_loss="huber", perceptual_weight=0)
    with pytest.raises(ValueError, match="at least 24 px"):
        PatchGANDiscriminator(base_channels=8)(torch.zeros(1, 3, 16, 16))


# ----------------------------------------------------------------------------- LPIPS


def test_lpips_is_zero_for_identical_images_and_grows_with_noise(random_lpips):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn_like(images)
    levels = (0, 0.05, 0.2, 0.8)
    distances = [random_lpips(images, (images + level * noise).clamp(-1, 1)).mean().item() for level in levels]
    assert distances[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < distances[1] < distances[2] < distances[3]


def test_lpips_stays_frozen_in_eval_mode_and_out_of_checkpoints(random_lpips):
    loss = TokenizerLoss(perceptual_weight=0, **TINY_DISCRIMINATOR)
    loss.perceptual = random_lpips
    loss.train()
    assert not random_lpips.training and not random_lpips.lpips.lin0.training  # no dropout in the heads
    assert not any(p.requires_grad for p in random_lpips.parameters())
    state = loss.state_dict()
    assert state and all(key.startswith("discriminator.") for key in state)
    before = random_lpips.lpips.net.slice1[0].weight.clone()
    loss.load_state_dict(state)  # strict: the absent LPIPS keys are not "missing"
    assert torch.equal(random_lpips.lpips.net.slice1[0].weight, before)


def test_missing_vgg_weights_offline_say_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        TokenizerLoss()
    message = str(error.value)
    assert str(vgg16_cache_path()) in message and str(tmp_path / "torch_home") in message
    assert "vgg16-397923af.pth" in message and VGG16_WEIGHTS_ENV in message and "perceptual_weight=0" in message
    # the same message reaches eval rfid, whose flags it names beside the recipe keys
    assert "--lpips-weights PATH" in message and "--no-lpips" in message and "loss.vgg_weights" in message
    with pytest.raises(FileNotFoundError, match="not a file"):
        PerceptualLoss(vgg_weights=tmp_path / "nowhere.pth")


def test_no_perceptual_or_gan_weight_builds_nothing():
    loss = TokenizerLoss(perceptual_weight=0, gan_weight=0)  # no VGG file needed offline
    assert loss.perceptual is None and loss.discriminator is None
    assert not loss.gan_active(10**9)


def test_vgg_weights_are_found_in_order_argument_env_then_torch_hub_cache(tmp_path, monkeypatch):
    assert find_vgg16_weights() is None
    cached = vgg16_cache_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert find_vgg16_weights() == cached
    env_file, arg_file = tmp_path / "env.pth", tmp_path / "arg.safetensors"
    env_file.write_bytes(b"")
    arg_file.write_bytes(b"")
    monkeypatch.setenv(VGG16_WEIGHTS_ENV, str(env_file))
    assert find_vgg16_weights() == env_file
    assert find_vgg16_weights(arg_file) == arg_file


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_lpips_loads_the_vgg_backbone_from_a_local_file(tmp_path, monkeypatch, features_only_vgg16,
                                                       fake_vgg16_features, suffix):
    path = tmp_path / f"vgg16{suffix}"
    if suffix == ".pth":
        torch.save(fake_vgg16_features, path)
        perceptual = PerceptualLoss(vgg_weights=path)
    else:
        from safetensors.torch import save_file

        save_file(fake_vgg16_features, str(path))
        monkeypatch.setenv(VGG16_WEIGHTS_ENV, str(path))
        perceptual = PerceptualLoss()
    net = perceptual.lpips.net
    assert torch.equal(net.slice1[0].weight, fake_vgg16_features["features.0.weight"])
    assert torch.equal(getattr(net.slice5, "28").bias, fake_vgg16_features["features.28.bias"])
    images, reconstructions = images_pair()
    assert perceptual(images, reconstructions).shape == (2,)


def test_a_file_that_is_not_vgg16_is_rejected(tmp_path, features_only_vgg16):
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="not torchvision's vgg16 state dict"):
        PerceptualLoss(vgg_weights=path)


# ----------------------------------------------------------------------------- discriminator


def test_discriminator_init_shape_and_save_load_round_trip(tmp_path):
    discriminator = PatchGANDiscriminator(base_channels=8)
    convs = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 5 and len(norms) == 3
    assert abs(convs[1].weight.std().item() - 0.02) < 0.005
    assert abs(norms[0].weight.mean().item() - 1.0) < 0.01
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    discriminator(images)  # move the BatchNorm running statistics away from their init
    discriminator.save_pretrained(tmp_path / "disc")
    loaded = PatchGANDiscriminator.from_pretrained(tmp_path / "disc")
    assert loaded.config.base_channels == 8 and loaded.config.num_layers == 3
    discriminator.eval(), loaded.eval()
    with torch.no_grad():
        logits = discriminator(images)
        assert logits.shape == (4, 1, 6, 6)
        assert torch.equal(logits, loaded(images))


# ----------------------------------------------------------------------------- assembly


def test_gan_term_and_discriminator_wait_for_the_start_step(tiny_tokenizer_config):
    loss = TokenizerLoss(perceptual_weight=0, gan_start_step=100, **TINY_DISCRIMINATOR)
    model = tiny_model(tiny_tokenizer_config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images)
    disc_state = {k: v.clone() for k, v in loss.discriminator.state_dict().items()}

    assert not loss.gan_active(99) and loss.gan_active(100)
    total, logs = loss.generator_loss(images, out.sample, out.loss, step=99)
    assert logs["gan_loss"].item() == 0 and logs["gan_weight"].item() == 0
    expected = reconstruction_loss(images, out.sample) + out.loss
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    d_loss, d_logs = loss.discriminator_loss(images, out.sample, step=99)
    assert d_loss.item() == 0 and not d_loss.requires_grad
    for key, value in loss.discriminator.state_dict().items():  # not run: weights and BN statistics unchanged
        assert torch.equal(value, disc_state[key]), key

    total, logs = loss.generator_loss(images, out.sample, out.loss, step=100)
    assert logs["gan_weight"].item() == 0.5 and logs["gan_loss"].item() != 0
    assert total.item() == pytest.approx((expected + 0.5 * logs["gan_loss"]).item(), rel=1e-5)
    d_loss, d_logs = loss.discriminator_loss(images, out.sample, step=100)
    assert d_loss.requires_grad and set(d_logs) == {"discriminator_loss", "logits_real", "logits_fake"}


def test_gradients_reach_the_decoder_last_layer_and_the_discriminator(tiny_tokenizer_config):
    # Reconstruction off: the decoder's gradient comes from the GAN term alone.
    loss = TokenizerLoss(reconstruction_weight=0, perceptual_weight=0, gan_start_step=0, **TINY_DISCRIMINATOR)
    model = tiny_model(tiny_tokenizer_config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images)
    total, _ = loss.generator_loss(images, out.sample, out.loss, step=0)
    total.backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    # The generator pass leaves no gradient in the discriminator (it is frozen while it judges), so under
    # gradient accumulation its gradients hold only its own loss and nothing must zero them first.
    assert all(p.grad is None and p.requires_grad for p in loss.discriminator.parameters())

    model.zero_grad()
    loss.discriminator.zero_grad()
    d_loss, _ = loss.discriminator_loss(images, out.sample, step=0)
    d_loss.backward()
    # Weights only: with every logit inside (-1, 1) the hinge loss's gradient at the last bias is exactly 0.
    weights = [p for name, p in loss.discriminator.named_parameters() if name.endswith("weight")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    assert model.decoder.conv_out.weight.grad is None  # reconstructions are detached for the discriminator


@pytest.mark.parametrize("gan_loss", ["hinge", "non_saturating"])
def test_adaptive_gan_weight_is_finite_clamped_and_scaled(tiny_tokenizer_config, gan_loss):
    loss = TokenizerLoss(perceptual_weight=0, gan_start_step=0, gan_loss=gan_loss, adaptive_gan_weight=True,
                         adaptive_gan_weight_max=50.0, **TINY_DISCRIMINATOR)
    model = tiny_model(tiny_tokenizer_config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images)
    last_layer = model.decoder.conv_out.weight
    total, logs = loss.generator_loss(images, out.sample, out.loss, step=0, last_layer=last_layer)
    weight = logs["gan_weight"].item()
    gan_of = hinge_generator_loss if gan_loss == "hinge" else non_saturating_generator_loss
    assert torch.isfinite(total) and 0 <= weight <= 0.5 * 50.0
    # The same ratio by hand: nll is the reconstruction alone here, gan the generator's GAN loss.
    (nll_grad,) = torch.autograd.grad(reconstruction_loss(images, out.sample), last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_of(loss.discriminator(out.sample)), last_layer, retain_graph=True)
    expected = 0.5 * min(nll_grad.norm().item() / (gan_grad.norm().item() + 1e-4), 50.0)
    assert weight == pytest.approx(expected, rel=1e-4)
    total.backward()
    assert torch.isfinite(last_layer.grad).all()
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(images, out.sample.detach(), out.loss, step=0)


def test_all_terms_are_float32_under_bf16_autocast(tiny_tokenizer_config, random_lpips):
    loss = TokenizerLoss(perceptual_weight=0, gan_start_step=0, adaptive_gan_weight=True, **TINY_DISCRIMINATOR)
    loss.perceptual, loss.perceptual_weight = random_lpips, 1.0
    model = tiny_model(tiny_tokenizer_config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        reconstructions = out.sample.bfloat16()
        total, logs = loss.generator_loss(images, reconstructions, out.loss, step=0,
                                          last_layer=model.decoder.conv_out.weight)
        d_loss, d_logs = loss.discriminator_loss(images, reconstructions, step=0)
    assert total.dtype == d_loss.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in [*logs.values(), *d_logs.values()])
    assert logs["perceptual_loss"].item() > 0


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
