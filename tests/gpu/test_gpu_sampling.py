"""Sampling on CUDA: every cache path gives the same greedy tokens, draws happen on the device and
repeat for a seed, no host read per token, and both pipelines give the CPU's images."""

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

from fullvq.generator import FullVQGPT, FullVQGPTConfig, build_transformer, sample
from fullvq.generator.latent_flow import sampling_scheduler
from fullvq.pipelines import FullVQPipeline, LatentFlowPipeline
from fullvq.precision import ieee_float32
from fullvq.tokenizer import FVQModel


def random_gpt(grid: int = 4) -> FullVQGPT:
    torch.manual_seed(0)
    config = FullVQGPTConfig(codebook_size=64, num_classes=3, grid_size=grid, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4)
    model = FullVQGPT(config).eval()
    nn.init.normal_(model.lm_head.weight, std=0.5)  # sharp logits: greedy argmaxes win by clear margins
    return model


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_uncached_dynamic_static_and_compiled_decoding_give_the_same_greedy_tokens(device, cheap_compile):
    model = random_gpt().to(device)
    settings = dict(guidance_scale=2.0, temperature=0.0)
    uncached = sample(model, [0, 2, 1], use_cache=False, **settings)
    dynamic = sample(model, [0, 2, 1], static_cache=False, **settings)
    static = sample(model, [0, 2, 1], static_cache=True, compile_decode=False, **settings)
    compiled = sample(model, [0, 2, 1], static_cache=True, compile_decode=True, **settings)
    assert torch.equal(dynamic, uncached) and torch.equal(static, dynamic) and torch.equal(compiled, dynamic)


def test_a_seed_gives_the_same_tokens_on_every_run_drawn_on_the_device(device, cheap_compile):
    model = random_gpt().to(device)
    first = sample(model, [0, 1, 2, 0], guidance_scale=2.0, top_k=16, generator=seeded(5))
    again = sample(model, [0, 1, 2, 0], guidance_scale=2.0, top_k=16, generator=seeded(5))
    other = sample(model, [0, 1, 2, 0], guidance_scale=2.0, top_k=16, generator=seeded(6))
    assert first.device.type == device.type
    assert torch.equal(first, again) and not torch.equal(first, other)
    cuda_generator = torch.Generator(device).manual_seed(5)  # diffusers users pass these too
    assert sample(model, [0, 1], generator=cuda_generator).shape == (2, 16)


def count_syncs(run) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchronizing" in str(w.message) for w in caught)


def test_host_reads_per_call_do_not_grow_with_the_number_of_tokens(device, cheap_compile):
    if device.type != "cuda":
        pytest.skip("host syncs exist on CUDA only")
    counts = []
    for grid in (4, 8):
        model = random_gpt(grid).to(device)
        for _ in range(2):  # the first call compiles; count the second
            syncs = count_syncs(functools.partial(sample, model, [0, 1], guidance_scale=2.0, generator=seeded()))
        counts.append(syncs)
    assert counts[0] == counts[1], counts  # 16 and 64 tokens: the same few reads per call, none per token


def tiny_tokenizer() -> FVQModel:
    torch.manual_seed(1)
    return FVQModel(sample_size=32, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16,
                    norm_num_groups=8, quantizer="vq", codebook_size=64, codebook_dim=8).eval()


def test_the_gpt_pipeline_on_cuda_with_a_cpu_generator_gives_the_cpu_greedy_images(device, cheap_compile):
    pipe = FullVQPipeline(tiny_tokenizer(), random_gpt(grid=8))
    pipe.set_progress_bar_config(disable=True)
    settings = dict(guidance_scale=2.0, temperature=0.0, output_type="pt")
    with ieee_float32(convolutions=True):
        on_cpu = pipe([0, 1, 2], generator=seeded(), **settings).images
        on_device = copy.deepcopy(pipe).to(device)([0, 1, 2], generator=seeded(), **settings).images
    torch.testing.assert_close(on_device.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


def test_the_latent_flow_pipeline_on_cuda_with_a_cpu_generator_gives_the_cpu_images(device):
    torch.manual_seed(2)
    transformer = build_transformer(latent_channels=8, grid_size=8, num_classes=3, num_layers=1,
                                    num_attention_heads=2, attention_head_dim=8, norm_num_groups=4).eval()
    pipe = LatentFlowPipeline(tiny_tokenizer(), transformer, sampling_scheduler("flow"))
    pipe.set_progress_bar_config(disable=True)
    settings = dict(guidance_scale=2.0, num_inference_steps=4, output_type="pt")
    with ieee_float32(convolutions=True):
        on_cpu = pipe([0, 2], generator=seeded(), **settings).images
        on_device = copy.deepcopy(pipe).to(device)([0, 2], generator=seeded(), **settings).images
    torch.testing.assert_close(on_device.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
