"""Pipelines users load: a folder of components (diffusers' layout) -> images."""

from .autoregressive import FullVQPipeline
from .base import DOWNLOAD_KWARGS, ClassConditionalPipeline, class_name_of
from .latent_flow import LatentFlowPipeline

__all__ = ["ClassConditionalPipeline", "FullVQPipeline", "LatentFlowPipeline", "load_pipeline"]


def load_pipeline(path, **kwargs) -> ClassConditionalPipeline:
    """Either pipeline from its folder, as its ``model_index.json`` names it (``kwargs`` as for
    ``from_pretrained``)."""
    import json
    import os

    from fullvq.io import local_folder_or_hub_id

    classes = {cls.__name__: cls for cls in (FullVQPipeline, LatentFlowPipeline)}
    path = local_folder_or_hub_id(path, "pipeline", cache_dir=kwargs.get("cache_dir"))
    index = os.path.join(os.fspath(path), "model_index.json")
    if not os.path.isdir(path):  # a hub id: read its model_index.json first
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(str(path), "model_index.json",
                                **{key: kwargs[key] for key in DOWNLOAD_KWARGS if key in kwargs})
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path} has no model_index.json; pass a folder written by a pipeline's "
                                "save_pretrained (e.g. <train-generator output_dir>/pipeline)")
    with open(index) as file:
        name = class_name_of(json.load(file))
    if name not in classes:
        raise ValueError(f"{index} describes a {name}, not one of fullvq's pipelines ({', '.join(classes)})")
    return classes[name].from_pretrained(path, **kwargs)
