"""Pipelines users load: a folder of components (diffusers' layout) -> images."""

from .autoregressive import FullVQPipeline

__all__ = ["FullVQPipeline"]
