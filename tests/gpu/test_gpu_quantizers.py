"""Quantizers on CUDA: the CPU's indices, losses and gradients; an exact search whatever the
precision settings; usage counts without host reads."""

import copy

import pytest
import torch

from fullvq.precision import allow_tf32, ieee_float32
from fullvq.tokenizer.quantizers import CodebookUsage, build_quantizer, nearest_code

FAMILIES = {
    "vq": {},
    "vq-l2": {"l2_norm": True},
    "simvq": {},
    "lc": {},
    "fvq": {"group_size": 16, "recover_std": 0.5},
    "residual": {"base": "fvq", "num_quantizers": 2, "group_size": 16, "recover_std": 0.5},
    "multiscale": {"base": "fvq", "scales": (1, 2, 4), "group_size": 16, "recover_std": 0.5},
}


def build(name: str):
    torch.manual_seed(0)
    family = name.split("-")[0]
    quantizer = build_quantizer(family, codebook_size=256, codebook_dim=16, **FAMILIES[name])
    if family == "lc":
        quantizer.load_codebook(torch.randn(256, 768))
    return quantizer


def clear_margin_latents(quantizer, shape=(2, 16, 4, 4)) -> torch.Tensor:
    """Latents a little off codes of the first codebook: every nearest code wins by a clear margin."""
    first = quantizer.levels[0] if hasattr(quantizer, "levels") else getattr(quantizer, "quantizer", quantizer)
    with torch.no_grad():
        codebook = first.search_codebook().detach()
    count = shape[0] * shape[2] * shape[3]
    picks = torch.randint(0, len(codebook), (count,), generator=torch.Generator().manual_seed(1))
    z = codebook[picks] + 0.01 * codebook.std() * torch.randn(len(picks), shape[1])
    return z.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_gives_the_cpu_indices_losses_and_gradients_on_cuda(name, device):
    cpu = build(name)
    gpu = copy.deepcopy(cpu).to(device)
    z = clear_margin_latents(cpu)
    with ieee_float32(convolutions=True):  # multiscale's phi convolutions would run in TF32 by default
        results = []
        for quantizer, latents in ((cpu, z.clone().requires_grad_()), (gpu, z.clone().to(device).requires_grad_())):
            out = quantizer(latents)
            (out.loss + out.quantized.square().mean()).backward()
            results.append((out, latents.grad, {n: p.grad for n, p in quantizer.named_parameters()
                                                 if p.grad is not None}))
    (ref, ref_grad, ref_params), (out, grad, params) = results
    assert torch.equal(out.indices.cpu(), ref.indices)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * max(1.0, abs(ref.loss.item()))
    torch.testing.assert_close(out.quantized.cpu(), ref.quantized, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu(), ref_grad, rtol=1e-4, atol=1e-6)
    assert params.keys() == ref_params.keys()
    for key in ref_params:
        torch.testing.assert_close(params[key].cpu(), ref_params[key], rtol=1e-3, atol=1e-6)


def test_turning_tf32_on_changes_no_index_of_the_search(device):
    generator = torch.Generator().manual_seed(0)
    size, tokens = (16384, 4096) if device.type == "cuda" else (1024, 512)  # small on the CPU stand-in
    codebook = torch.randn(size, 256, generator=generator)
    a, b = torch.randint(0, size, (2, tokens), generator=generator)
    z = ((codebook[a] + codebook[b]) / 2).to(device)  # halfway between two codes: near ties everywhere
    codebook = codebook.to(device)
    saved = torch.backends.cuda.matmul.fp32_precision
    try:
        allow_tf32(False)
        exact = nearest_code(z, codebook)
        allow_tf32(True)
        with_tf32 = nearest_code(z, codebook)
        unguarded = torch.cdist(z, codebook).argmin(1)  # an ordinary fp32 GEMM, now in TF32 on a GPU
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved
    assert torch.equal(with_tf32, exact)
    if device.type == "cuda":  # the test can tell: TF32 moves near ties where nothing pins it off
        assert (unguarded != exact).any()


def test_the_search_under_bf16_autocast_returns_the_float32_argmin(device):
    generator = torch.Generator().manual_seed(2)
    codebook = torch.randn(4096, 64, generator=generator)
    picks = torch.randint(0, 4096, (2048,), generator=generator)
    z = codebook[picks] + 0.01 * torch.randn(2048, 64, generator=generator)
    reference = torch.cdist(z.double(), codebook.double()).argmin(1)
    z, codebook = z.to(device), codebook.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        found = nearest_code(z, codebook)
        near_ties = nearest_code((z + codebook[torch.roll(picks, 1).to(device)]) / 2, codebook)
    assert torch.equal(found.cpu(), reference) and torch.equal(found.cpu(), picks)
    assert torch.equal(near_ties, nearest_code((z + codebook[torch.roll(picks, 1).to(device)]) / 2, codebook))


def test_usage_counts_on_cuda_equal_the_cpu_bincount(device):
    indices = torch.randint(0, 1000, (64, 16, 16), generator=torch.Generator().manual_seed(3))
    on_device, on_cpu = CodebookUsage(1000, device=device), CodebookUsage(1000)
    for _ in range(3):
        on_device.update(indices.to(device))
        on_cpu.update(indices)
    assert torch.equal(on_device.counts.cpu(), on_cpu.counts)
    assert on_device.summary() == on_cpu.summary()


def test_fvq_slot_revival_fires_on_cuda_with_fused_adamw(device):
    # Review device check 2: fused AdamW never bumps the weight's version counter; revival is an
    # explicit step after the optimiser's, so it fires all the same.
    torch.manual_seed(0)
    quantizer = build_quantizer("fvq", codebook_size=256, codebook_dim=16, group_size=16, revive_after=2).to(device)
    optimizer = torch.optim.AdamW(quantizer.parameters(), lr=1e-3, fused=device.type == "cuda")
    z = torch.randn(2, 16, 4, 4, device=device)
    revived = 0
    for _ in range(6):
        out = quantizer(z)  # 32 tokens: most of the 16 slots win none
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        revived += quantizer.revive_dead_slots()
    assert revived > 0 and quantizer.slot_revivals == revived
