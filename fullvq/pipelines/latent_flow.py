"""LatentFlowPipeline: class labels -> latent grid (DiT + scheduler) -> images (FVQModel).

The transformer and the scheduler make normalised latents (see :mod:`fullvq.generator.latent_flow`);
the pipeline undoes the normalisation, optionally snaps every cell to its nearest code, and decodes.
A pipeline folder is diffusers' layout: ``model_index.json`` (component classes, ``id2label``,
``sample_size``, ``latent_mean`` / ``latent_std``) and ``tokenizer/``, ``transformer/``, ``scheduler/``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DiTTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fullvq.generator.latent_flow import DEFAULT_DIT_GUIDANCE_SCALE, sample_latents
from fullvq.tokenizer.modeling import FVQModel

from .base import ClassConditionalPipeline, check_sample_size, check_single_codebook


class LatentFlowPipeline(ClassConditionalPipeline):
    """Class-conditional generation with a DiT (diffusion or flow matching) on an FVQ tokenizer's latents.

    Args:
        tokenizer: the :class:`~fullvq.tokenizer.modeling.FVQModel` whose quantized latents the
            transformer was trained on.
        transformer: a ``DiTTransformer2DModel`` whose ``in_channels`` is the tokenizer's ``codebook_dim``
            and whose ``sample_size`` is the side of the tokenizer's latent grid.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` for a flow-matching transformer; DDIM,
            DPM-Solver or any DDPM-family scheduler (epsilon prediction) for a diffusion one.
        id2label: class id -> name; saved in ``model_index.json``.
        latent_mean, latent_std: per-channel statistics of the training latents (the transformer works
            on ``(latents - mean) / std``); default 0 and 1.
        sample_size: image side in pixels; ``None`` takes the tokenizer's (a given value must equal it).
    """

    model_cpu_offload_seq = "transformer->tokenizer"
    _component_folders = ("tokenizer", "transformer", "scheduler")
    sampling_settings = ("num_inference_steps", "snap_to_codebook")

    def __init__(
        self,
        tokenizer: FVQModel,
        transformer: DiTTransformer2DModel,
        scheduler: SchedulerMixin,
        id2label: dict[int, str] | dict[str, str] | None = None,
        latent_mean: Sequence[float] | None = None,
        latent_std: Sequence[float] | None = None,
        sample_size: int | None = None,
    ):
        super().__init__()
        check_single_codebook(tokenizer, "LatentFlowPipeline")
        sample_size = check_sample_size(tokenizer, sample_size)
        channels = int(tokenizer.config.codebook_dim)
        grid = tuple(tokenizer.latent_grid())
        config = transformer.config
        if config.in_channels != channels or (config.out_channels or config.in_channels) != channels:
            raise ValueError(
                f"the transformer works on {config.in_channels} channels but the tokenizer's codes have "
                f"codebook_dim={channels}; build the transformer with in_channels=out_channels={channels}"
            )
        if grid != (config.sample_size, config.sample_size):
            raise ValueError(
                f"the tokenizer's latent grid {grid} (sample_size={sample_size}) differs from the transformer's "
                f"{config.sample_size} x {config.sample_size}; build the transformer with sample_size={grid[0]}"
            )
        mean = [0.0] * channels if latent_mean is None else [float(v) for v in latent_mean]
        std = [1.0] * channels if latent_std is None else [float(v) for v in latent_std]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"latent_mean and latent_std need {channels} values (one per code channel) and a "
                             f"positive std; got {len(mean)} and {len(std)} values")
        self.register_modules(tokenizer=tokenizer, transformer=transformer, scheduler=scheduler)
        self.register_to_config(id2label=self._set_labels(id2label), latent_mean=mean, latent_std=std,
                                sample_size=sample_size)

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Transformer space -> the tokenizer's code space."""
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.config.latent_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(self.config.latent_std, device=latents.device, dtype=latents.dtype).view(shape)
        return latents * std + mean

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        num_images_per_label: int = 1,
        guidance_scale: float = DEFAULT_DIT_GUIDANCE_SCALE,
        num_inference_steps: int = 50,
        snap_to_codebook: bool = False,
        generator: torch.Generator | None = None,
        batch_size: int = 32,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``num_images_per_label`` images for each class label.

        Args:
            class_labels: class ids, names (see :meth:`get_label_ids`) or a mix.
            num_images_per_label: images per label; images come label by label, in the order given.
            guidance_scale: classifier-free guidance scale; 1 turns guidance off (half the compute).
                Default ``DEFAULT_DIT_GUIDANCE_SCALE`` (4.0).
            num_inference_steps: scheduler steps from noise to latents.
            snap_to_codebook: replace each generated latent cell by its nearest code before decoding,
                so the decoder sees only codes (as a GPT's tokens would give).
            generator: a ``torch.Generator`` for reproducible images (one generator for the whole call).
            batch_size: images sampled at once.
            output_type: ``"pil"``, ``"np"`` ((N, H, W, 3) float32 in [0, 1]) or ``"pt"`` ((N, 3, H, W)).
            return_dict: return an :class:`ImagePipelineOutput` rather than a tuple ``(images,)``.
        """
        batches = self._check_call(class_labels, num_images_per_label, batch_size, output_type, generator,
                                   guidance_scale)
        decoded = []
        for batch in batches:
            labels = torch.tensor(batch, device=self.transformer.device)
            latents = sample_latents(self.transformer, self.scheduler, labels, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, generator=generator, progress=self.progress_bar)
            decoded.append(self.decode_latents(latents, snap_to_codebook=snap_to_codebook))
        return self._output(decoded, output_type, return_dict)

    def decode_latents(self, latents: torch.Tensor, snap_to_codebook: bool = False) -> torch.Tensor:
        """Normalised latents (B, D, h, w) -> images in [-1, 1], optionally through the nearest codes."""
        codes = self.denormalize(latents).to(self.tokenizer.dtype)
        if snap_to_codebook:
            return self.tokenizer.decode_indices(self.snap(codes))
        return self.tokenizer.decode(codes)

    def snap(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices of the codes nearest to latents (B, D, h, w) in the tokenizer's code space."""
        return self.tokenizer.quantize.quantize(codes)[2]


__all__ = ["LatentFlowPipeline"]
