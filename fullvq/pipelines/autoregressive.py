"""FullVQPipeline: class labels -> image tokens (FullVQGPT) -> images (FVQModel).

The pipeline only wires the two models and loops over batches; the sampling maths lives in
:func:`fullvq.generator.sampling.sample` and the decoding in :meth:`FVQModel.decode_indices`.
A pipeline folder is diffusers' layout: ``model_index.json`` (component classes, ``id2label`` and
``sample_size``) plus one folder per component (``tokenizer/``, ``gpt/``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from fullvq.generator.gpt import FullVQGPT
from fullvq.generator.sampling import DEFAULT_GUIDANCE_SCALE, sample
from fullvq.tokenizer.modeling import FVQModel

from .base import ClassConditionalPipeline, check_sample_size, check_single_codebook


class FullVQPipeline(ClassConditionalPipeline):
    """Class-conditional image generation with a GPT over the tokens of an FVQ tokenizer.

    Args:
        tokenizer: the :class:`~fullvq.tokenizer.modeling.FVQModel` whose codes the GPT was trained on.
        gpt: the :class:`~fullvq.generator.gpt.FullVQGPT`; its ``codebook_size`` and ``grid_size`` must
            match the tokenizer's codebook and latent grid at ``tokenizer.config.sample_size``.
        id2label: class id -> name (ImageNet style ``"golden retriever"`` or ``"tench, Tinca tinca"``,
            where each comma-separated synonym is accepted too); saved in ``model_index.json``.
        sample_size: image side in pixels, recorded in ``model_index.json``; ``None`` takes the
            tokenizer's ``sample_size`` (a given value must equal it).
    """

    model_cpu_offload_seq = "gpt->tokenizer"
    _component_folders = ("tokenizer", "gpt")
    sampling_settings = ("guidance_schedule", "temperature", "top_k", "top_p")

    def __init__(
        self,
        tokenizer: FVQModel,
        gpt: FullVQGPT,
        id2label: dict[int, str] | dict[str, str] | None = None,  # str keys: as read back from JSON
        sample_size: int | None = None,
    ):
        super().__init__()
        _check_components(tokenizer, gpt)
        sample_size = check_sample_size(tokenizer, sample_size)
        self.register_modules(tokenizer=tokenizer, gpt=gpt)
        # Plain settings persist in model_index.json only through the config (JSON keys become strings).
        self.register_to_config(id2label=self._set_labels(id2label), sample_size=sample_size)

    @property
    def num_classes(self) -> int:
        return self.gpt.config.num_classes

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        num_images_per_label: int = 1,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        guidance_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
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
                Default ``DEFAULT_GUIDANCE_SCALE`` (2.0, the FVQ paper's and LlamaGen's gFID setting;
                LlamaGen's sample script shows pictures at 4.0).
            guidance_schedule: ``"constant"`` or ``"linear"`` (a ramp from 1 to ``guidance_scale``).
            temperature, top_k, top_p: token sampling (temperature 0 = greedy; top_k 0 and top_p 1 = off).
            generator: a ``torch.Generator`` for reproducible images (one generator for the whole call).
            batch_size: images sampled at once; bounds memory (the KV cache grows with it). The images
                drawn for a seed depend on it.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` ((N, H, W, 3) float32 in [0, 1]) or
                ``"pt"`` ((N, 3, H, W) float32 in [0, 1]).
            return_dict: return an :class:`ImagePipelineOutput` rather than a tuple ``(images,)``.
        """
        batches = self._check_call(class_labels, num_images_per_label, batch_size, output_type, generator,
                                   guidance_scale)
        height, width = self.gpt.config.grid_size
        decoded = []
        for batch in batches:  # a bar over each batch's tokens, as the flow pipeline's over its steps
            tokens = sample(
                self.gpt,
                torch.tensor(batch, device=self.gpt.device),
                guidance_scale=guidance_scale,
                guidance_schedule=guidance_schedule,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                progress=self.progress_bar,
            )
            decoded.append(self.tokenizer.decode_indices(tokens.view(len(batch), height, width)))
        return self._output(decoded, output_type, return_dict)


def _check_components(tokenizer: FVQModel, gpt: FullVQGPT) -> None:
    """Raise unless the GPT's tokens are this tokenizer's codes on its latent grid."""
    check_single_codebook(tokenizer, "FullVQGPT")
    if tokenizer.config.codebook_size != gpt.config.codebook_size:
        raise ValueError(
            f"the tokenizer's codebook_size={tokenizer.config.codebook_size} differs from the GPT's "
            f"codebook_size={gpt.config.codebook_size}; pair the GPT with the tokenizer its tokens came from"
        )
    grid = tuple(tokenizer.latent_grid())
    if grid != tuple(gpt.config.grid_size):
        raise ValueError(
            f"the tokenizer's latent grid {grid} (sample_size={tokenizer.config.sample_size}, downsample factor "
            f"{tokenizer.downsample_factor}) differs from the GPT's grid_size {tuple(gpt.config.grid_size)}; "
            "set the tokenizer's sample_size or the GPT's grid_size so they match"
        )
