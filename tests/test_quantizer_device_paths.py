"""What the quantizers promise on the GPU path (mixed precision, TF32, DDP), checked on the CPU."""

import pytest
import torch
import torch.distributed as dist

from fullvq import FVQModel
from fullvq.precision import allow_tf32, ieee_float32
from fullvq.tokenizer.quantizers import build_quantizer, nearest_code
from fullvq.tokenizer.quantizers.base import straight_through


def near_tie_latents(quantizer, count: int = 512, seed: int = 0) -> torch.Tensor:
    """(1, D, 8, count // 8) latents halfway between two codes of ``quantizer``: near ties, which
    rounding the codebook (or the GEMM) would flip."""
    with torch.no_grad():
        codebook = quantizer.search_codebook()
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, len(codebook), (2, count), generator=generator)
    z = (codebook[a] + codebook[b]) / 2 + 1e-3 * codebook.std() * torch.randn(count, codebook.shape[1],
                                                                              generator=generator)
    return z.T.reshape(1, codebook.shape[1], 8, count // 8).contiguous()


def test_the_search_runs_its_gemms_in_ieee_float32_even_when_the_user_turned_tf32_on(monkeypatch):
    seen = []
    addmm = torch.addmm

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.fp32_precision)
        return addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy)
    saved = torch.backends.cuda.matmul.fp32_precision
    try:
        allow_tf32(True)  # what a user's "torch.backends.cuda.matmul.allow_tf32 = True" does
        nearest_code(torch.randn(50, 8), torch.randn(300, 8), code_chunk=64)
        assert seen and set(seen) == {"ieee"}
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the user's setting is back afterwards
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


def test_ieee_float32_restores_whatever_was_set_and_also_pins_convolutions_when_asked():
    conv = torch.backends.cudnn.conv
    saved = (torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision)
    try:
        torch.set_float32_matmul_precision("high")
        conv.fp32_precision = "tf32"
        with ieee_float32(convolutions=True):
            assert torch.backends.cuda.matmul.fp32_precision == "ieee" and conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and conv.fp32_precision == "tf32"
        with ieee_float32():
            assert conv.fp32_precision == "tf32"  # convolutions only when asked
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision = saved


@pytest.mark.parametrize("family", ["fvq", "simvq", "lc"])
def test_under_bf16_autocast_the_search_uses_the_float32_codebook_and_finds_the_same_codes(family):
    settings = dict(group_size=16, recover_std=0.5) if family == "fvq" else {}
    quantizer = build_quantizer(family, codebook_size=1024, codebook_dim=16, **settings).eval()
    if family == "lc":
        quantizer.load_codebook(torch.randn(1024, 768))
    z = near_tie_latents(quantizer).bfloat16().float()  # latents that bf16 holds exactly
    plain = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = quantizer(z)
        assert quantizer.search_codebook().dtype == torch.float32
        rounded = quantizer.codebook()  # what the search used before: C_hat out of bf16 linears
    assert torch.equal(mixed.indices, plain.indices)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 16)
    assert (nearest_code(flat, rounded).view_as(plain.indices) != plain.indices).any()  # the test can tell


def test_bf16_straight_through_gives_the_code_rounded_once():
    z = torch.randn(100_000).bfloat16()
    z_q = torch.randn(100_000)
    out = straight_through(z, z_q)
    assert out.dtype == torch.bfloat16
    old_way = z + (z_q.bfloat16() - z)  # the difference rounded, then the sum: an ulp off about a third of the time
    assert (old_way != z_q.bfloat16()).float().mean() > 0.1
    assert (out != z_q.bfloat16()).float().mean() < 1e-3  # float32 sum rounded once: off only at float32 ties
    z32 = torch.randn(16, requires_grad=True)
    straight_through(z32, torch.randn(16)).sum().backward()
    assert torch.equal(z32.grad, torch.ones(16))


def test_multiscale_with_fewer_scales_than_phis_gives_every_trainable_weight_a_gradient():
    # DDP (find_unused_parameters=False) fails on step 2 when a trainable weight got no gradient.
    quantizer = build_quantizer("multiscale", codebook_size=64, codebook_dim=8, scales=(2, 8), num_phi=4)
    out = quantizer(torch.randn(2, 8, 8, 8))
    (out.quantized.square().mean() + out.loss).backward()
    missing = [name for name, p in quantizer.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert quantizer.phi_for_scale == [0, 3]
    assert not quantizer.phi[1].conv.weight.requires_grad and quantizer.phi[3].conv.weight.requires_grad
    assert "phi.1.conv.weight" in quantizer.state_dict()  # saved models keep their weight names


def test_multiscale_computes_the_fvq_codebook_once_per_forward_and_per_lookup():
    quantizer = build_quantizer("multiscale", codebook_size=64, codebook_dim=8, base="fvq", group_size=4,
                                scales=(1, 2, 4))
    calls = []
    quantizer.quantizer.bridge.register_forward_hook(lambda *args: calls.append(1))
    out = quantizer(torch.randn(2, 8, 4, 4))
    assert len(calls) == 1
    quantizer.lookup(out.indices)
    assert len(calls) == 2


@pytest.mark.parametrize("family", ["simvq", "lc"])
def test_ddp_leaves_the_frozen_codebook_table_out_of_its_per_step_buffer_broadcast(family, tmp_path):
    model = FVQModel(sample_size=16, block_out_channels=(8, 8), layers_per_block=1, latent_channels=8,
                     norm_num_groups=4, quantizer=family, codebook_size=64, codebook_dim=8)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert "quantize.frozen_codebook" not in ddp.named_module_buffers
        assert "quantize.frozen_codebook" in dict(model.named_buffers())
    finally:
        dist.destroy_process_group()


def test_usage_counts_on_the_cpu_still_refuse_indices_outside_the_codebook():
    from fullvq.tokenizer.quantizers import CodebookUsage

    usage = CodebookUsage(8)
    usage.update(torch.tensor([[0, 3], [3, 7]]))
    assert usage.counts.tolist() == [1, 0, 0, 2, 0, 0, 0, 1]
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        usage.update(torch.tensor([8]))


def test_slot_revival_reads_idle_counts_back_only_when_a_slot_could_be_due(monkeypatch):
    quantizer = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, revive_after=5)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    revived_at = []
    for step in range(1, 31):
        busy = torch.tensor([1, 1, 1, 0]) if step <= 12 else torch.tensor([1, 1, 1, 1])  # slot 3 idle for 12 steps
        quantizer._step_counts = busy
        if quantizer.revive_dead_slots():
            revived_at.append(step)
    assert revived_at == [5, 10]  # idle for 5 steps in a row, twice, exactly as a read every step would find
    assert len(reads) <= 8  # of 30 steps: only when some slot's idle run could have reached 5
