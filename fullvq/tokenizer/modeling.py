"""FVQModel: image -> encoder -> quantizer -> decoder -> image, with a codebook used in full."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..io import check_saved_folder, local_folder_or_hub_id
from .quantizers import build_quantizer

# Allowed slack on the [-1, 1] input range (resampling can overshoot slightly).
_RANGE_TOLERANCE = 1e-3


@dataclass
class FVQModelOutput(BaseOutput):
    """sample: reconstruction in [-1, 1] (unclamped); indices: code indices; loss: the
    quantizer's weighted loss; codebook_loss / commitment_loss: its two terms."""

    # Defaults let accelerate rebuild the output when it casts mixed-precision outputs to float32.
    sample: torch.Tensor = None
    indices: torch.Tensor = None
    loss: torch.Tensor = None
    codebook_loss: torch.Tensor = None
    commitment_loss: torch.Tensor = None


class FVQModel(ModelMixin, ConfigMixin):
    """A VQ image tokenizer whose quantizer is any registered family (``vq``, ``simvq``, ``lc``,
    ``fvq``, ``residual``, ``multiscale``).

    The encoder and decoder are diffusers' VQGAN blocks laid out as LlamaGen's VQ models:
    ``block_out_channels=(128, 128, 256, 256, 512)`` (ch 128, ch_mult 1,1,2,2,4),
    ``layers_per_block=2``, ``latent_channels=256`` gives VQ-16 (16x downsampling); drop one level
    for VQ-8. Attention sits in the mid block and in the levels ``attention_levels`` (default: the
    lowest-resolution one; taming-VQGAN's ``attn_resolutions`` may name others or none). 1x1 convolutions
    map the latent to ``codebook_dim`` and back, so a low-dim codebook (16384 x 8) factorises it.

    Args:
        quantizer: registry name of the quantizer family.
        codebook_size, codebook_dim: K and D.
        quantizer_kwargs: family settings, e.g. ``{"group_size": 16}`` for fvq,
            ``{"feature_dim": 768}`` for lc, ``{"base": "fvq", "num_quantizers": 4}`` for residual.
        attention_levels: levels (0 = full resolution) whose blocks add self-attention after each
            resnet, in encoder and decoder alike; ``None`` = the lowest-resolution level only.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        sample_size: int = 256,
        block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512),
        layers_per_block: int = 2,
        latent_channels: int = 256,
        norm_num_groups: int = 32,
        quantizer: str = "fvq",
        codebook_size: int = 16384,
        codebook_dim: int = 256,
        quantizer_kwargs: dict | None = None,
        attention_levels: tuple[int, ...] | None = None,
    ):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {bad} are not divisible by norm_num_groups={norm_num_groups}; "
                f"use multiples of {norm_num_groups} or lower norm_num_groups"
            )
        levels = len(block_out_channels)
        attention_levels = {levels - 1} if attention_levels is None else {int(i) for i in attention_levels}
        if not attention_levels <= set(range(levels)):
            raise ValueError(
                f"attention_levels {sorted(attention_levels)} must lie in [0, {levels}) (one per entry of "
                f"block_out_channels); use None for the lowest-resolution level only"
            )
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=tuple(
                "AttnDownEncoderBlock2D" if level in attention_levels else "DownEncoderBlock2D"
                for level in range(levels)
            ),
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            double_z=False,
        )
        self.quant_conv = nn.Conv2d(latent_channels, codebook_dim, 1)
        # Named `quantize` as in diffusers' VQModel and LlamaGen (`quantizer` is the config's family name).
        self.quantize = build_quantizer(
            quantizer, codebook_size=codebook_size, codebook_dim=codebook_dim, **(quantizer_kwargs or {})
        )
        # Write the settings the family derived from K and D (fvq: group size, width, heads) into the
        # config, so that a saved model keeps its shapes and function if those defaults change.
        derived = getattr(self.quantize, "derived_settings", {})
        if any(key not in (quantizer_kwargs or {}) for key in derived):
            self.register_to_config(quantizer_kwargs={**derived, **(quantizer_kwargs or {})})
        _skip_frozen_tables_in_ddp(self)
        self.post_quant_conv = nn.Conv2d(codebook_dim, latent_channels, 1)
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=tuple(  # up block i works at level levels - 1 - i
                "AttnUpDecoderBlock2D" if level in attention_levels else "UpDecoderBlock2D"
                for level in reversed(range(levels))
            ),
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """Load a folder written by ``save_pretrained`` (or a hub id).

        Unlike diffusers' default, weights that are missing, unexpected or of the wrong shape are an
        error (``strict=False`` keeps diffusers' behaviour of initialising them randomly); a missing
        local folder, or one without its weights file, is a ``FileNotFoundError`` saying so.
        """
        pretrained_model_name_or_path = local_folder_or_hub_id(pretrained_model_name_or_path, "tokenizer",
                                                               cache_dir=kwargs.get("cache_dir"))
        if os.path.isdir(pretrained_model_name_or_path):
            check_saved_folder(Path(pretrained_model_name_or_path, kwargs.get("subfolder") or ""), "tokenizer")
        if not strict:
            return _own_memory(super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs))
        return_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except ValueError as error:
            if "expected shape" not in str(error):
                raise
            raise ValueError(
                f"the weights in {pretrained_model_name_or_path} do not fit its config.json ({error}); "
                "config.json and the safetensors file come from different models: re-save with save_pretrained"
            ) from None
        problems = {key: info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
        if problems:
            listing = "; ".join(f"{key}: {sorted(map(str, value))[:10]}" for key, value in problems.items())
            raise ValueError(
                f"the weights in {pretrained_model_name_or_path} do not match its config.json ({listing}); "
                "re-save the model with save_pretrained, or pass strict=False to initialise them randomly"
            )
        model = _own_memory(model)
        return (model, info) if return_info else model

    def to_json_string(self) -> str:
        """``config.json``'s text: diffusers' own, without the path the model was loaded from
        (``_name_or_path``), which would otherwise travel to the Hub with a re-saved folder."""
        config = json.loads(super().to_json_string())
        config.pop("_name_or_path", None)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` the encoder and the decoder in place (``options`` go to ``torch.compile``);
        the quantizer stays eager (its search is a loop over blocks). Weight names are unchanged."""
        self.encoder.compile(**options)
        self.decoder.compile(**options)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def latent_grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Token grid (h, w) for an image of the given size (default ``sample_size``)."""
        height = height or self.config.sample_size
        width = width or self.config.sample_size
        return height // self.downsample_factor, width // self.downsample_factor

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
        channels = self.config.in_channels
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(
                f"images must have shape (B, {channels}, H, W), got {tuple(images.shape)}; "
                + ("add a batch dimension with images[None]" if images.ndim == 3 else
                   f"convert to {channels} channels (e.g. PIL .convert('RGB'))")
            )
        if not images.dtype.is_floating_point:
            raise TypeError(
                f"images must be floating point in [-1, 1], got {images.dtype}; "
                "convert uint8 with images.float() / 127.5 - 1"
            )
        factor = self.downsample_factor
        if images.shape[-2] % factor or images.shape[-1] % factor:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not divisible by the downsample factor {factor}; "
                f"resize or crop to a multiple of {factor}"
            )
        if self.training and images.device.type != "cpu":
            # A training step on a GPU: reading the range back would stall every step; check on the device.
            inside = (images.detach().abs() <= 1 + _RANGE_TOLERANCE).all()
            torch._assert_async(inside, "images must lie in [-1, 1]; map [0, 1] images with x * 2 - 1")
            return
        low, high = torch.aminmax(images.detach())
        if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"images must lie in [-1, 1], got values in [{float(low):.3f}, {float(high):.3f}]; "
                "map [0, 1] images with x * 2 - 1 and uint8 ones with x / 127.5 - 1"
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latents (B, codebook_dim, h, w) before quantization."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) from a quantized latent map (B, codebook_dim, h, w)."""
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, images: torch.Tensor, return_dict: bool = True) -> FVQModelOutput | tuple:
        """Reconstruct ``images`` (float in [-1, 1], (B, C, H, W))."""
        out = self.quantize(self.encode(images))
        result = FVQModelOutput(
            sample=self.decode(out.quantized),
            indices=out.indices,
            loss=out.loss,
            codebook_loss=out.codebook_loss,
            commitment_loss=out.commitment_loss,
        )
        return result if return_dict else result.to_tuple()

    @torch.no_grad()
    def encode_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices of ``images``: (B, h, w) long for single-codebook quantizers."""
        return self.quantize(self.encode(images)).indices

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from code indices as returned by ``encode_indices``."""
        return self.decode(self.quantize.lookup(indices.to(self.device))).clamp(-1, 1)

    def revive_dead_slots(self) -> int:
        """Call after every optimiser step when training: the quantizer revives the parts of its
        codebook map that no token selected for a while (``fvq``'s code slots; a no-op for the other
        families). On many processes every rank must call it (the counts are summed over them).
        Returns how many it revived."""
        return self.quantize.revive_dead_slots()

    @torch.no_grad()
    def export_plain(self) -> FVQModel:
        """The same tokenizer with the mapped codebook C_hat = f(C) baked into a plain ``vq`` table.

        The projector / VQBridge is dropped; indices and decoded images are unchanged. The result
        saves and loads as an ordinary ``quantizer="vq"`` model (what generators and converters
        need, and the fastest one at inference).
        """
        plain_quantizer = self.quantize.export_plain()
        config = dict(self.config)
        config["quantizer"] = plain_quantizer.build_name
        config["quantizer_kwargs"] = {
            k: v for k, v in plain_quantizer.build_config.items() if k not in ("codebook_size", "codebook_dim")
        }
        plain = type(self).from_config(config)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("quantize.")}
        state.update({f"quantize.{k}": v for k, v in plain_quantizer.state_dict().items()})
        plain.load_state_dict(state)
        plain.to(self.device)
        if plain.dtype != self.dtype:
            plain.to(self.dtype)
        return plain.train(self.training)


def _skip_frozen_tables_in_ddp(model: nn.Module) -> None:
    """DDP re-broadcasts every buffer from rank 0 before each forward; frozen tables (simvq's, lc's:
    307 MB for VQGAN-LC's 100,000 x 768) never change and are built alike on every rank, so DDP is
    told to leave them out."""
    names = [f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
             for name in getattr(module, "frozen_buffer_names", ())]
    if names:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


@torch.no_grad()
def _own_memory(model):
    """Copy tensors memory-mapped from the safetensors file into aligned memory of their own.

    Unaligned mmap'd weights take other CPU GEMM kernels (outputs differ in the last bits from the
    saved model) and would tie the model to a file that a later checkpoint may overwrite.
    """
    if isinstance(model, tuple):
        return (_own_memory(model[0]),) + model[1:]
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
    return model
