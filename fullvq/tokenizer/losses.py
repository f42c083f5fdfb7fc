"""Training losses of the tokenizer: reconstruction, LPIPS, PatchGAN with hinge / non-saturating GAN.

``TokenizerLoss`` assembles them as in the FVQ recipe (LlamaGen's VQ loss): L2 reconstruction 1.0,
LPIPS(VGG) 1.0, the quantizer's own loss, and a PatchGAN hinge term weighted 0.5 from step 20k.
A training loop calls ``generator_loss`` for the tokenizer's step and ``discriminator_loss`` for
the discriminator's, and asks ``gan_active(step)`` whether the discriminator trains at all yet.

Every loss term is computed in float32, also under autocast.

(About 515 lines, over the house's 450: the loss, the LPIPS module with its VGG weights and the
PatchGAN make one objective; the LPIPS part would split off first, into ``perceptual.py``.)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..io import find_weights_file, load_torch_file, offline

# torchvision's ImageNet VGG16 (IMAGENET1K_V1), the backbone LPIPS(net="vgg") was calibrated on.
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_WEIGHTS_ENV = "FULLVQ_VGG16_WEIGHTS"

RECONSTRUCTION_LOSSES = ("l2", "l1")
GAN_LOSSES = ("hinge", "non_saturating")


def _float32(device_type: str):
    """A context in which autocast is off, so the loss maths runs in float32."""
    return torch.autocast(device_type=device_type, enabled=False)


# ----------------------------------------------------------------------------- reconstruction


def reconstruction_loss(images: torch.Tensor, reconstructions: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean absolute (``"l1"``) or squared (``"l2"``) error over every element, in float32."""
    if kind not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"reconstruction_loss={kind!r} is not one of {RECONSTRUCTION_LOSSES}")
    if images.shape != reconstructions.shape:
        raise ValueError(
            f"images {tuple(images.shape)} and reconstructions {tuple(reconstructions.shape)} differ in shape"
        )
    with _float32(images.device.type):
        images, reconstructions = images.float(), reconstructions.float()
        if kind == "l1":
            return F.l1_loss(reconstructions, images)
        return F.mse_loss(reconstructions, images)


# ----------------------------------------------------------------------------- GAN objectives


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))))."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(D(G(z)))."""
    return -logits_fake.float().mean()


def non_saturating_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(softplus(-D(x))) + mean(softplus(D(G(z))))): binary cross-entropy on logits."""
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


def non_saturating_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """mean(softplus(-D(G(z)))) = -mean(log sigmoid(D(G(z))))."""
    return F.softplus(-logits_fake.float()).mean()


_DISCRIMINATOR_LOSSES = {"hinge": hinge_discriminator_loss, "non_saturating": non_saturating_discriminator_loss}
_GENERATOR_LOSSES = {"hinge": hinge_generator_loss, "non_saturating": non_saturating_generator_loss}


def adaptive_gan_weight(
    nll_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """Taming's balance between the GAN term and the reconstruction terms at the decoder's last layer.

    Returns ``||d nll_loss / d last_layer|| / (||d gan_loss / d last_layer|| + 1e-4)`` clamped to
    ``[0, max_weight]`` and detached (a float32 scalar). Both losses must depend on ``last_layer``
    (for FVQModel: ``model.decoder.conv_out.weight``); the graphs are kept for the backward pass.
    """
    with _float32(last_layer.device.type):
        try:
            (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
            (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
        except RuntimeError as error:
            raise RuntimeError(
                f"adaptive GAN weight needs gradients of the losses at last_layer ({error}); pass the weight "
                "of the layer that produced the reconstructions (FVQModel: model.decoder.conv_out.weight) "
                "and call it with gradients enabled, or set adaptive_gan_weight=False"
            ) from error
        weight = nll_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
        return weight.clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------- LPIPS


def vgg16_cache_path() -> Path:
    """Where torchvision keeps its downloaded ImageNet VGG16 weights (follows TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(VGG16_URL)


def find_vgg16_weights(vgg_weights: str | os.PathLike | None = None) -> Path | None:
    """The local VGG16 weights file LPIPS will use: ``vgg_weights``, else ``$FULLVQ_VGG16_WEIGHTS``,
    else torchvision's file in the torch hub cache; ``None`` when there is none (download needed).

    An explicitly named file that does not exist is an error, not a fall-through.
    """
    return find_weights_file(("vgg_weights", vgg_weights), VGG16_WEIGHTS_ENV, vgg16_cache_path(),
                             "point it at torchvision's vgg16 state dict (.pth or .safetensors, e.g. "
                             f"{os.path.basename(VGG16_URL)})")


def _missing_vgg16_message(reason: str) -> str:
    return (
        f"LPIPS needs torchvision's ImageNet VGG16 weights and {reason}. Either put "
        f"{os.path.basename(VGG16_URL)} (from {VGG16_URL}, or written with "
        "torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), path) on a machine "
        f"with internet) at {vgg16_cache_path()}; or name such a file (.pth or .safetensors) with "
        f"{VGG16_WEIGHTS_ENV}=PATH, loss.vgg_weights=PATH in a recipe or --lpips-weights PATH for eval rfid; "
        "or turn LPIPS off: loss.perceptual_weight=0 in a recipe, --no-lpips for eval rfid"
    )


def load_vgg16_state_dict(vgg_weights: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """torchvision's VGG16 state dict, from a local file (see ``find_vgg16_weights``) or, when not
    offline (``HF_HUB_OFFLINE`` / ``FULLVQ_OFFLINE`` unset), downloaded into the torch hub cache."""
    path = find_vgg16_weights(vgg_weights)
    if path is not None:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return load_torch_file(path)
    if offline():
        raise FileNotFoundError(_missing_vgg16_message("none was found offline"))
    try:
        return torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", check_hash=True)
    except Exception as error:  # any network / hash failure gets the same actionable message
        raise FileNotFoundError(_missing_vgg16_message(f"downloading them failed ({error})")) from error


class PerceptualLoss(nn.Module):
    """LPIPS(VGG) distance from the ``lpips`` package, frozen, on images in [-1, 1].

    The ``lpips`` package ships only its linear heads; the VGG16 backbone comes from
    ``load_vgg16_state_dict(vgg_weights)`` (explicit file, ``$FULLVQ_VGG16_WEIGHTS``, the torch hub
    cache, or a download when online). ``random_backbone=True`` keeps lpips' randomly initialised
    backbone: it needs no file and is meant for tests only (its distances mean nothing).

    The module stays in eval mode (no dropout in the heads) and never requires grad; its weights are
    left out of ``state_dict`` so training checkpoints hold only what trains.
    """

    def __init__(self, vgg_weights: str | os.PathLike | None = None, random_backbone: bool = False,
                 autocast_trunk: bool = False):
        super().__init__()
        import lpips

        # Resolve the weights first: a missing file fails fast, before building the 138M-parameter VGG.
        state = None if random_backbone else load_vgg16_state_dict(vgg_weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecated `pretrained=` in lpips
            self.lpips = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        if state is not None:
            self._load_backbone(state, vgg_weights)
        self.autocast_trunk = autocast_trunk
        if autocast_trunk:
            self.lpips.net = _AutocastTrunk(self.lpips.net)
        self.lpips.requires_grad_(False)
        self.train(False)
        self._frozen_keys = tuple(self.lpips.state_dict().keys())
        self.register_state_dict_post_hook(_drop_frozen_keys)
        self.register_load_state_dict_pre_hook(_fill_frozen_keys)

    @torch.no_grad()
    def _load_backbone(self, state: dict[str, torch.Tensor], source) -> None:
        # lpips keeps torchvision's layer indices: its `slice3.10.weight` is torchvision's `features.10.weight`.
        prefix = "features." if any(key.startswith("features.") for key in state) else ""
        missing, mismatched = [], []
        for name, param in self.lpips.net.named_parameters():
            _, index, kind = name.split(".")
            key = f"{prefix}{index}.{kind}"
            if key not in state:
                missing.append(key)
            elif state[key].shape != param.shape:
                mismatched.append(f"{key} {tuple(state[key].shape)} != {tuple(param.shape)}")
            else:
                param.copy_(state[key])
        if missing or mismatched:
            where = source or os.environ.get(VGG16_WEIGHTS_ENV) or vgg16_cache_path()
            raise ValueError(
                f"{where} is not torchvision's vgg16 state dict (missing: {missing[:4]}, wrong shape: "
                f"{mismatched[:4]}); save one with torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1')"
                ".state_dict(), path)"
            )

    def train(self, mode: bool = True) -> PerceptualLoss:
        # Frozen whatever the parent's mode: lpips' heads have dropout.
        return super().train(False)

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance, shape (B,), float32; images and reconstructions in [-1, 1].

        With ``autocast_trunk`` the VGG trunk runs under the caller's autocast (bf16 on a GPU, about
        twice as fast; LlamaGen runs LPIPS so); feature normalisation, differences and heads stay float32.
        """
        device_type = images.device.type
        if self.autocast_trunk:
            enabled = torch.is_autocast_enabled(device_type)
            self.lpips.net.dtype = torch.get_autocast_dtype(device_type) if enabled else None
        with _float32(device_type):
            return self.lpips(images.float(), reconstructions.float()).flatten()


class _AutocastTrunk(nn.Module):
    """LPIPS' VGG trunk under autocast at ``dtype`` (``None``: as is); its feature maps come back float32."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.dtype = net, None

    def forward(self, x: torch.Tensor):
        if self.dtype is None:
            return self.net(x)
        with torch.autocast(x.device.type, dtype=self.dtype):
            features = self.net(x)
        return type(features)(*(feature.float() for feature in features))


class _frozen:
    """Within the block, ``module``'s parameters require no gradient (restored after)."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _drop_frozen_keys(module: PerceptualLoss, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in module._frozen_keys:
        state_dict.pop(f"{prefix}lpips.{key}", None)


def _fill_frozen_keys(module: PerceptualLoss, state_dict: dict, prefix: str, *args) -> None:
    # Checkpoints carry no LPIPS weights: keep the loaded ones so strict loading still passes.
    for key, value in module.lpips.state_dict().items():
        state_dict.setdefault(f"{prefix}lpips.{key}", value)


# ----------------------------------------------------------------------------- discriminator


class PatchGANDiscriminator(ModelMixin, ConfigMixin):
    """The pix2pix / taming PatchGAN ("NLayerDiscriminator"): one real/fake logit per image patch.

    ``num_layers`` stride-2 4x4 convolutions (channels ``base_channels * min(2**n, 8)``), one stride-1
    4x4 convolution, then a 4x4 convolution to one channel; LeakyReLU(0.2) and BatchNorm after every
    convolution except the first (no norm) and the last. At 256 px and 3 layers the output is
    (B, 1, 30, 30). Convolution weights are initialised normal(0, 0.02), BatchNorm weights
    normal(1, 0.02) with zero bias. Layers sit in ``main`` with taming's / LlamaGen's indices.

    Multi-GPU: like taming and LlamaGen this uses plain BatchNorm, so under DDP each rank normalises
    with its own batch statistics; for synchronised statistics convert it with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)`` before wrapping it in DDP.

    Saves and loads with ``save_pretrained`` / ``from_pretrained`` (running statistics included).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be at least 1")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out_channels = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last feature layer keeps the resolution
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=False),  # BN has the bias
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(0.2, True),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    @property
    def min_input_size(self) -> int:
        # num_layers halvings, then two 4x4 stride-1 convolutions each drop one pixel.
        return 3 * 2**self.config.num_layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, h, w) for images (B, in_channels, H, W) in [-1, 1]."""
        if min(images.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} are too small for a {self.config.num_layers}-layer "
                f"PatchGAN (at least {self.min_input_size} px); use larger images or fewer num_layers"
            )
        return self.main(images)


# ----------------------------------------------------------------------------- assembly


class TokenizerLoss(nn.Module):
    """The tokenizer's training objective (FVQ / LlamaGen recipe by default).

    Generator (tokenizer) loss::

        reconstruction_weight * reconstruction + perceptual_weight * LPIPS + quantizer_loss
            + [step >= gan_start_step] * gan_weight * adaptive * generator_gan_loss

    with ``adaptive = 1`` unless ``adaptive_gan_weight`` (taming's gradient-norm ratio at the
    decoder's last layer, clamped to [0, 1e4]). Discriminator loss::

        [step >= gan_start_step] * gan_weight * discriminator_gan_loss

    (LlamaGen scales it by the GAN weight too). ``perceptual_weight=0`` builds no LPIPS and
    ``gan_weight=0`` no discriminator.

    Args:
        reconstruction_loss: ``"l2"`` (FVQ, LlamaGen) or ``"l1"`` (taming).
        gan_loss: ``"hinge"`` or ``"non_saturating"``.
        gan_start_step: first step at which the GAN term counts and the discriminator trains.
        vgg_weights: local torchvision vgg16 state dict for LPIPS (see ``PerceptualLoss``).
        perceptual_random_backbone: tests only: LPIPS with a random VGG, no weights file needed.
        perceptual_autocast: run LPIPS' VGG trunk under the training's autocast (bf16: ~2x faster;
            the rest of LPIPS stays float32). Off: all of LPIPS in float32.
        adaptive_gan_weight_every: recompute the adaptive weight every this many steps and reuse it
            in between (each recomputation is two extra backward passes through the decoder's end).
        discriminator_channels, discriminator_layers, in_channels: the ``PatchGANDiscriminator``.

    In a loop: ``loss, logs = loss_fn.generator_loss(x, out.sample, out.loss, step,
    model.decoder.conv_out.weight)``; backward and step the tokenizer; then, if
    ``loss_fn.gan_active(step)``, ``d_loss, d_logs = loss_fn.discriminator_loss(x, out.sample, step)``,
    backward and step ``loss_fn.discriminator``. The generator pass leaves no gradient in the
    discriminator (its weights are frozen while it judges the reconstructions), so under gradient
    accumulation the discriminator's gradients hold its own loss of every micro-batch.
    """

    def __init__(
        self,
        reconstruction_loss: str = "l2",
        reconstruction_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        gan_weight: float = 0.5,
        gan_loss: str = "hinge",
        gan_start_step: int = 20000,
        adaptive_gan_weight: bool = False,
        adaptive_gan_weight_max: float = 1e4,
        discriminator_channels: int = 64,
        discriminator_layers: int = 3,
        in_channels: int = 3,
        vgg_weights: str | os.PathLike | None = None,
        perceptual_random_backbone: bool = False,
        perceptual_autocast: bool = False,
        adaptive_gan_weight_every: int = 1,
    ):
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction_loss={reconstruction_loss!r} is not one of {RECONSTRUCTION_LOSSES}")
        if gan_loss not in GAN_LOSSES:
            raise ValueError(f"gan_loss={gan_loss!r} is not one of {GAN_LOSSES}")
        for name, value in (("reconstruction_weight", reconstruction_weight),
                            ("perceptual_weight", perceptual_weight), ("gan_weight", gan_weight)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0 (0 switches the term off)")
        self.reconstruction_loss = reconstruction_loss
        self.reconstruction_weight = reconstruction_weight
        self.perceptual_weight = perceptual_weight
        self.gan_weight = gan_weight
        self.gan_loss = gan_loss
        self.gan_start_step = gan_start_step
        self.adaptive_gan_weight = adaptive_gan_weight
        self.adaptive_gan_weight_max = adaptive_gan_weight_max
        if adaptive_gan_weight_every < 1:
            raise ValueError(f"adaptive_gan_weight_every={adaptive_gan_weight_every} must be >= 1 (1: every step)")
        self.adaptive_gan_weight_every = adaptive_gan_weight_every
        self._adaptive_weight: tuple[int, torch.Tensor] | None = None  # (step, value) of the last recomputation
        self.perceptual = (
            PerceptualLoss(vgg_weights, random_backbone=perceptual_random_backbone, autocast_trunk=perceptual_autocast)
            if perceptual_weight > 0 else None
        )
        self.discriminator = (
            PatchGANDiscriminator(in_channels, discriminator_channels, discriminator_layers) if gan_weight > 0 else None
        )

    def gan_active(self, step: int) -> bool:
        """Whether the GAN term counts and the discriminator trains at this step."""
        return self.discriminator is not None and step >= self.gan_start_step

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        quantizer_loss: torch.Tensor | float,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The tokenizer's loss and its detached float32 terms for logging.

        Args:
            images: inputs in [-1, 1], (B, C, H, W).
            reconstructions: the tokenizer's output for them (not detached).
            quantizer_loss: the quantizer's weighted loss (``FVQModelOutput.loss``).
            step: global training step (gates the GAN term).
            last_layer: the decoder's last weight, needed for ``adaptive_gan_weight``.

        Returns:
            ``(total, logs)``, logs with ``reconstruction_loss``, ``perceptual_loss``,
            ``quantizer_loss``, ``gan_loss``, ``gan_weight`` (effective, 0 before the start step)
            and ``total_loss``.
        """
        device = images.device
        with _float32(device.type):
            rec = reconstruction_loss(images, reconstructions, self.reconstruction_loss)
            zero = rec.new_zeros(())
            perceptual = self.perceptual(images, reconstructions).mean() if self.perceptual is not None else zero
            nll = self.reconstruction_weight * rec + self.perceptual_weight * perceptual
            quantizer = torch.as_tensor(quantizer_loss, device=device).float()

        gan, weight = zero, zero
        if self.gan_active(step):
            with _frozen(self.discriminator):  # its weight gradients here would only be thrown away
                logits_fake = self.discriminator(reconstructions.contiguous())  # under the caller's autocast
            with _float32(device.type):
                gan = _GENERATOR_LOSSES[self.gan_loss](logits_fake)
                weight = zero + self.gan_weight  # a device op: torch.tensor(x, device=cuda) would sync
                if self.adaptive_gan_weight:
                    if last_layer is None:
                        raise ValueError(
                            "adaptive_gan_weight=True needs last_layer (FVQModel: model.decoder.conv_out.weight); "
                            "pass it to generator_loss or set adaptive_gan_weight=False"
                        )
                    if torch.is_grad_enabled() and gan.requires_grad:
                        weight = weight * self._adaptive_factor(nll, gan, last_layer, step)
                    # Without gradients (validation) the adaptive factor is taken as 1.

        with _float32(device.type):
            total = nll + quantizer + weight * gan
        logs = {
            "reconstruction_loss": rec,
            "perceptual_loss": perceptual,
            "quantizer_loss": quantizer,
            "gan_loss": gan,
            "gan_weight": weight,
            "total_loss": total,
        }
        return total, {name: value.detach() for name, value in logs.items()}

    def _adaptive_factor(self, nll: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor,
                         step: int) -> torch.Tensor:
        """Taming's adaptive weight, recomputed every ``adaptive_gan_weight_every`` steps (reused between)."""
        last = self._adaptive_weight
        if last is None or step < last[0] or step - last[0] >= self.adaptive_gan_weight_every:
            self._adaptive_weight = (step, adaptive_gan_weight(nll, gan, last_layer, self.adaptive_gan_weight_max))
        return self._adaptive_weight[1]

    def discriminator_loss(
        self, images: torch.Tensor, reconstructions: torch.Tensor, step: int, discriminator: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real ``images`` and detached ``reconstructions``.

        Before ``gan_start_step`` (or with no discriminator) the discriminator is not run at all
        (its BatchNorm statistics stay put) and the loss is a constant zero that needs no backward:
        check ``gan_active(step)`` and skip the discriminator's optimizer step.

        ``discriminator`` runs instead of ``self.discriminator`` when given: the DDP-wrapped copy of
        it, so its gradients are synchronised (the generator pass needs no synchronisation).

        Returns:
            ``(loss, logs)``, logs with ``discriminator_loss``, ``logits_real`` and ``logits_fake``
            (batch means), all detached float32.
        """
        if not self.gan_active(step):
            zero = torch.zeros((), device=images.device)
            return zero, {"discriminator_loss": zero, "logits_real": zero, "logits_fake": zero}
        discriminator = discriminator if discriminator is not None else self.discriminator
        logits_real = discriminator(images.detach().contiguous())
        logits_fake = discriminator(reconstructions.detach().contiguous())
        with _float32(images.device.type):
            loss = self.gan_weight * _DISCRIMINATOR_LOSSES[self.gan_loss](logits_real, logits_fake)
            logs = {
                "discriminator_loss": loss.detach(),
                "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean(),
            }
        return loss, logs
