import pytest
import torch

from fullvq.tokenizer.quantizers import QUANTIZERS, CodebookUsage, build_quantizer
from fullvq.tokenizer.quantizers.bridge import default_group_size


def fit_toy(name, steps=300, codebook_size=1024, dim=16, **kwargs):
    """Fit a quantizer alone (no autoencoder) to fresh Gaussian samples; return usage on new ones."""
    torch.manual_seed(0)
    quantizer = build_quantizer(name, codebook_size=codebook_size, codebook_dim=dim, **kwargs)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=1e-3)
    for _ in range(steps):
        out = quantizer(torch.randn(32, dim, 8, 8))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    usage = CodebookUsage(codebook_size)
    with torch.no_grad():
        for _ in range(4):
            usage.update(quantizer(torch.randn(64, dim, 16, 16)).indices)
    return quantizer, usage


def test_plain_vq_leaves_most_codes_dead_while_fvq_uses_nearly_all():
    _, vq_usage = fit_toy("vq")
    _, fvq_usage = fit_toy("fvq")
    assert vq_usage.usage < 0.3, vq_usage.summary()
    assert fvq_usage.usage > 0.95, fvq_usage.summary()
    assert fvq_usage.perplexity > 3 * vq_usage.perplexity


def test_fvq_gives_every_base_code_a_gradient_and_vq_only_the_selected_ones():
    fvq, _ = fit_toy("fvq", steps=5, codebook_size=256, recover_std=0.0)
    assert fvq.bridge.recover.weight.abs().sum() > 0  # the zero-initialised layer has moved
    fvq.zero_grad()
    out = fvq(torch.randn(1, 16, 2, 2))  # 4 tokens select at most 4 of 256 codes
    out.loss.backward()
    grad_norms = fvq.base_codebook.weight.grad.norm(dim=1)
    assert (grad_norms > 0).all()

    vq = build_quantizer("vq", codebook_size=256, codebook_dim=16)
    out = vq(torch.randn(1, 16, 2, 2))
    out.loss.backward()
    has_grad = vq.embedding.weight.grad.norm(dim=1) > 0
    assert torch.equal(has_grad.nonzero().flatten(), out.indices.flatten().unique())


def test_fvq_official_start_is_zero_and_only_its_last_layer_learns_at_step_zero():
    fvq = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, recover_std=0.0)
    assert torch.count_nonzero(fvq.codebook()) == 0
    out = fvq(torch.randn(2, 8, 4, 4))
    assert (out.indices == 0).all()  # every code ties: all tokens go to code 0, slot 0 of G
    out.loss.backward()
    assert fvq.bridge.recover.weight.grad.abs().sum() > 0
    assert fvq.bridge.compress.weight.grad.abs().sum() == 0
    assert fvq.base_codebook.weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="recover_std=-1.0 must be >= 0"):
        build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, recover_std=-1.0)


def test_fvq_default_start_is_near_zero_and_every_code_slot_is_selected_at_step_zero():
    # Each of a bridge token's G code slots has its own recover rows, which learn only when a code of
    # that slot is selected; the default start must reach every slot at once (the all-zero one: slot 0).
    fvq = build_quantizer("fvq", codebook_size=1024, codebook_dim=16, group_size=16)
    # Every slot starts from the same rows plus a tenth as much noise of its own: with independent
    # rows the weaker slots lost every token within 10 steps on the digits at K = 16,384.
    slots = fvq.bridge.recover.weight.reshape(16, 16, -1)
    spread = (slots - slots.mean(0)).std() / slots.mean(0).std()
    assert 0.05 < spread < 0.2, spread  # independent rows: about 3.9
    codebook = fvq.codebook()
    assert 0 < codebook.pow(2).mean().sqrt() < 0.05
    assert torch.unique(codebook, dim=0).shape[0] == 1024
    out = fvq(torch.randn(4, 16, 16, 16) * 0.3)
    assert torch.unique(out.indices % 16).numel() == 16
    out.loss.backward()
    slot_grads = fvq.bridge.recover.weight.grad.reshape(16, 16, -1).abs().sum(dim=(1, 2))
    assert (slot_grads > 0).all()


def test_fvq_revives_a_code_slot_no_token_selected_for_revive_after_steps():
    torch.manual_seed(0)
    fvq = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, revive_after=3)
    with torch.no_grad():  # slot 2's codes sit far from every latent: it can never win a token
        fvq.bridge.recover.bias.view(4, 8)[2] = 100.0
    optimizer = torch.optim.Adam(fvq.parameters(), lr=1e-3)
    selected = []
    for _ in range(6):
        out = fvq(torch.randn(4, 8, 4, 4))
        selected.append(torch.bincount(fvq.code_slots(out.indices.flatten()), minlength=4)[2].item())
        optimizer.zero_grad()
        out.loss.backward()  # the revival edits the weights only after the step: backward must work
        optimizer.step()
        fvq.revive_dead_slots()
    assert selected[:3] == [0, 0, 0] and min(selected[3:]) > 0, selected
    assert fvq.slot_revivals == 1
    slots = fvq.bridge.recover.weight.view(4, 8, -1)
    busiest_copy = min(range(4), key=lambda g: (slots[2] - slots[g]).norm() if g != 2 else float("inf"))
    assert (slots[2] - slots[busiest_copy]).norm() < 0.5 * slots[busiest_copy].norm()
    assert "slot_idle_steps" not in fvq.state_dict()  # the saved weights stay the paper's

    # Several searches before one optimiser step (accumulation, multi-scale) count as one step; no
    # revival in eval mode, under no_grad, or with revive_after=0.
    fvq = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, revive_after=2)
    with torch.no_grad():
        fvq.bridge.recover.bias.view(4, 8)[2] = 100.0
    for _ in range(5):
        fvq(torch.randn(2, 8, 4, 4))
    assert fvq.slot_idle_steps.tolist() == [0, 0, 0, 0] and fvq.slot_revivals == 0
    fvq.eval()
    for _ in range(3):
        fvq(torch.randn(2, 8, 4, 4))
        with torch.no_grad():
            fvq.bridge.recover.weight.add_(0.0)
        fvq.revive_dead_slots()
    assert fvq.slot_revivals == 0
    off = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, revive_after=0)
    assert off(torch.randn(2, 8, 4, 4)) is not None and off._step_counts is None
    with pytest.raises(ValueError, match="revive_after=-1 must be >= 0"):
        build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, revive_after=-1)


def _train_with_a_dead_slot(fvq, optimizer, steps, seed=0):
    """``steps`` optimiser steps on random latents with slot 2 pushed far away; returns how often
    slot 2 was selected at each step, and the revivals reported by each revive_dead_slots() call."""
    with torch.no_grad():
        fvq.bridge.recover.bias.view(fvq.group_size, -1)[2] = 100.0
    torch.manual_seed(seed)
    selected, revived = [], []
    for _ in range(steps):
        out = fvq(torch.randn(4, 8, 4, 4))
        selected.append(torch.bincount(fvq.code_slots(out.indices.flatten()), minlength=4)[2].item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        revived.append(fvq.revive_dead_slots())
    return selected, revived


def test_slot_revival_is_an_explicit_step_that_works_with_fused_adamw():
    # Fused AdamW updates the weights without bumping their version counter, so a revival that
    # watched the version would never fire; the explicit call after each step does.
    torch.manual_seed(0)
    fvq = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, revive_after=3)
    selected, revived = _train_with_a_dead_slot(fvq, torch.optim.AdamW(fvq.parameters(), lr=1e-3, fused=True), 6)
    assert selected[:3] == [0, 0, 0] and min(selected[3:]) > 0, selected
    assert revived == [0, 0, 1, 0, 0, 0] and fvq.slot_revivals == 1

    # Without the call nothing is revived, however many steps pass: forward passes only count.
    torch.manual_seed(0)
    quiet = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, revive_after=3)
    optimizer = torch.optim.AdamW(quiet.parameters(), lr=1e-3, fused=True)
    with torch.no_grad():
        quiet.bridge.recover.bias.view(4, 8)[2] = 100.0
    for _ in range(6):
        quiet(torch.randn(4, 8, 4, 4)).loss.backward()
        optimizer.step()
    assert quiet.slot_revivals == 0 and quiet._step_counts[2] == 0


def test_every_quantizer_and_the_model_take_the_revival_call():
    from fullvq import FVQModel

    for name, kwargs in [("vq", {}), ("lc", {"feature_dim": 4}), ("simvq", {})]:
        assert build_quantizer(name, codebook_size=16, codebook_dim=4, **kwargs).revive_dead_slots() == 0
    residual = build_quantizer("residual", codebook_size=64, codebook_dim=8, base="fvq", num_quantizers=2,
                               group_size=4, revive_after=1)
    with torch.no_grad():
        residual.levels[1].bridge.recover.bias.view(4, 8)[1:] = 100.0  # level 1: only slot 0 can win
    residual(torch.randn(2, 8, 4, 4))
    assert residual.revive_dead_slots() >= 3 and residual.levels[1].slot_revivals >= 3
    model = FVQModel(sample_size=16, block_out_channels=(8, 8), layers_per_block=1, latent_channels=8,
                     norm_num_groups=4, quantizer="fvq", codebook_size=64, codebook_dim=4,
                     quantizer_kwargs={"group_size": 4, "revive_after": 1})
    with torch.no_grad():
        model.quantize.bridge.recover.bias.view(4, 4)[3] = 100.0
    model(torch.rand(2, 3, 16, 16) * 2 - 1)
    revived = model.revive_dead_slots()  # slot 3 at least, maybe another that these 128 tokens missed
    assert revived >= 1 and model.quantize.slot_revivals == revived


def _revive_on_two_ranks(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same start on both ranks, as DDP broadcasts it
        fvq = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, revive_after=2)
        model = torch.nn.parallel.DistributedDataParallel(fvq)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        with torch.no_grad():
            fvq.bridge.recover.bias.view(4, 8)[2] = 100.0
        torch.manual_seed(100 + rank)  # each rank its own data
        for _ in range(3):
            out = model(torch.randn(2, 8, 4, 4))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            fvq.revive_dead_slots()
        torch.save({"weight": fvq.bridge.recover.weight.detach(), "revivals": fvq.slot_revivals},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_every_rank_revives_the_same_slots_with_the_same_noise(tmp_path):
    import torch.multiprocessing as mp

    # fork: the ranks start from this process's imports instead of importing torch again (seconds).
    mp.start_processes(_revive_on_two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["revivals"] == ranks[1]["revivals"] == 1
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])


def test_fvq_code_slots_follow_the_layout():
    grouped = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4)
    square = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, layout="square")
    codes = torch.arange(64)
    assert grouped.code_slots(codes).tolist() == (codes % 4).tolist()
    # 8 x 8 codebook image in 2 x 2 patches: the slot is the position inside the patch.
    assert square.code_slots(codes).tolist() == ((codes // 8 % 2) * 2 + codes % 8 % 2).tolist()
    with torch.no_grad():  # only slot 3's recover rows are non-zero: exactly slot 3's codes are non-zero
        for q in (grouped, square):
            q.bridge.recover.weight.zero_()
            q.bridge.recover.bias.view(4, 8)[3] = 1.0
            nonzero = q.codebook().abs().sum(1) > 0
            assert torch.equal(nonzero, q.code_slots(codes) == 3)


def test_fvq_bridge_init_is_the_official_one_unless_pytorch_is_asked_for():
    official = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4)
    pytorch = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, init="pytorch")
    linears = lambda q: [m for m in q.bridge.modules() if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears(official))
    assert torch.count_nonzero(pytorch.bridge.compress.bias) > 0
    compress = official.bridge.compress.weight
    bound = (6 / sum(compress.shape)) ** 0.5  # xavier-uniform
    assert compress.abs().max() <= bound and compress.abs().max() > 0.9 * bound
    for q in (official, pytorch):  # either way the recover layer starts the same: N(0, 0.002^2), zero bias
        assert torch.count_nonzero(q.bridge.recover.bias) == 0
        assert 0.0015 < q.bridge.recover.weight.std() < 0.0025
    with pytest.raises(ValueError, match="init='xavier' is not one of"):
        build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, init="xavier")


def test_fvq_square_layout_is_the_grouped_one_up_to_a_fixed_code_permutation():
    grouped = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4)
    square = build_quantizer("fvq", codebook_size=64, codebook_dim=8, group_size=4, layout="square")
    square.load_state_dict(grouped.state_dict())
    torch.nn.init.normal_(grouped.bridge.recover.weight)
    square.bridge.recover.weight.data.copy_(grouped.bridge.recover.weight)
    # Code k of the 8 x 8 image sits in patch (row // 2, col // 2) at (row % 2, col % 2).
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    grouped_index = ((rows // 2) * 4 + cols // 2) * 4 + (rows % 2) * 2 + cols % 2
    base = torch.randn(64, 8)
    with torch.no_grad():
        grouped.base_codebook.weight.copy_(base[torch.argsort(grouped_index)])
        square.base_codebook.weight.copy_(base)
        torch.testing.assert_close(square.codebook(), grouped.codebook()[grouped_index])
    with pytest.raises(ValueError, match="perfect square"):
        build_quantizer("fvq", codebook_size=128, codebook_dim=8, group_size=4, layout="square")


def test_fvq_group_size_defaults_follow_the_paper_and_bad_sizes_are_refused():
    # The paper's points (1,024 tokens at 16k and 65k, G capped at 64), and ~1,024 tokens below 16k:
    # G = 16 at K = 1,024 left 6 of 16 code slots alive (31 % usage) in benchmarks/codebook_scaling.py.
    sizes = {1024: 1, 4096: 4, 16384: 16, 65536: 64, 262144: 64, 1000: 1, 10000: 4, 100000: 16}
    assert {k: default_group_size(k) for k in sizes} == sizes
    fvq = build_quantizer("fvq", codebook_size=65536, codebook_dim=8)
    assert fvq.base_codebook.weight.shape[0] // fvq.group_size == 1024
    assert build_quantizer("fvq", codebook_size=1024, codebook_dim=8).bridge.compress.in_features == 8
    with pytest.raises(ValueError, match="codebook_size=1000 is not divisible by group_size=16"):
        build_quantizer("fvq", codebook_size=1000, codebook_dim=8, group_size=16)
    # Any K divisible by G works, not only perfect squares.
    assert build_quantizer("fvq", codebook_size=1000, codebook_dim=8, group_size=8).codebook().shape == (1000, 8)


FAMILIES = [
    ("vq", {}),
    ("vq", {"l2_norm": True}),
    ("simvq", {}),
    ("lc", {"feature_dim": 12}),
    ("fvq", {"group_size": 8}),
    ("residual", {"base": "fvq", "num_quantizers": 3, "group_size": 8}),
    ("residual", {"base": "vq", "num_quantizers": 2}),
    ("multiscale", {"base": "simvq", "scales": [1, 2, 4]}),
    ("multiscale", {"base": "fvq", "scales": [1, 2, 3, 4], "group_size": 8}),
]


def ready_quantizer(name, kwargs):
    quantizer = build_quantizer(name, codebook_size=64, codebook_dim=8, **kwargs)
    for module in quantizer.modules():
        if hasattr(module, "load_codebook"):
            module.load_codebook(torch.randn(64, 12))
    with torch.no_grad():  # move C_hat away from its zero start
        for p in quantizer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return quantizer


@pytest.mark.parametrize("name, kwargs", FAMILIES)
def test_non_finite_latents_give_codes_inside_the_codebook_in_every_family(name, kwargs):
    """Issue 19, class 6: a diverging encoder must not index outside the codebook (it reaches the
    Trainer's non-finite loss check instead)."""
    quantizer = ready_quantizer(name, kwargs)
    z = torch.randn(2, 8, 4, 4)
    z[0, 3, 1, 2] = float("nan")  # one cell with a NaN channel
    z[1, :, 0, 0] = float("inf")  # one cell of inf
    with torch.no_grad():
        out = quantizer(z)
    assert out.indices.min() >= 0 and out.indices.max() < 64
    if out.indices.ndim == 3:  # one code per cell: the non-finite cells get code 0
        assert out.indices[0, 1, 2] == 0 and out.indices[1, 0, 0] == 0
    assert not torch.isfinite(out.loss)  # what the Trainer stops on


@pytest.mark.parametrize("name, kwargs", FAMILIES)
def test_every_family_quantizes_looks_up_and_exports_consistently(name, kwargs):
    quantizer = ready_quantizer(name, kwargs)
    z = torch.randn(3, 8, 4, 4, requires_grad=True)
    out = quantizer(z)
    assert out.quantized.shape == z.shape
    assert out.indices.dtype == torch.long
    assert torch.isfinite(out.loss)
    # Straight-through: the gradient reaches the input unchanged (through the normalisation with l2_norm).
    out.quantized.sum().backward()
    if kwargs.get("l2_norm"):
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    else:
        assert torch.allclose(z.grad, torch.ones_like(z))
    # The code map rebuilt from indices is the forward's quantized value.
    with torch.no_grad():
        assert torch.allclose(quantizer.lookup(out.indices), out.quantized, atol=1e-5)
        plain = quantizer.export_plain()
        assert plain.build_config.get("base", plain.build_name) == "vq"
        again = plain(z)
    assert torch.equal(again.indices, out.indices)
    assert torch.allclose(again.quantized, out.quantized, atol=1e-6)


def test_residual_levels_refine_the_reconstruction():
    torch.manual_seed(0)
    z = torch.randn(4, 8, 4, 4)
    errors = []
    for levels in (1, 2, 4):
        torch.manual_seed(1)
        quantizer = build_quantizer("residual", codebook_size=256, codebook_dim=8, num_quantizers=levels)
        with torch.no_grad():
            for level in quantizer.levels:
                level.embedding.weight.normal_()
            errors.append(float((quantizer(z).quantized - z).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]


def test_usage_counter_reports_exact_figures():
    usage = CodebookUsage(8)
    usage.update(torch.tensor([[0, 0, 1], [1, 2, 3]]))
    usage.update(torch.tensor([3, 3]))
    assert usage.total == 8
    assert usage.used_codes == 4 and usage.dead_codes == 4 and usage.usage == 0.5
    assert usage.counts.tolist() == [2, 2, 1, 3, 0, 0, 0, 0]
    p = torch.tensor([2, 2, 1, 3], dtype=torch.float64) / 8
    assert usage.perplexity == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    uniform = CodebookUsage(4)
    uniform.update(torch.arange(4).repeat(10))
    assert uniform.perplexity == pytest.approx(4.0) and uniform.usage == 1.0
    assert usage.all_reduce() is usage  # no process group: a no-op
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        usage.update(torch.tensor([8]))
    usage.reset()
    assert usage.total == 0 and usage.perplexity == 0.0


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="unknown quantizer 'vqq'; choose one of"):
        build_quantizer("vqq", codebook_size=8, codebook_dim=4)
    with pytest.raises(TypeError, match="bad settings for quantizer 'vq'.*group_size"):
        build_quantizer("vq", codebook_size=8, codebook_dim=4, group_size=2)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\), got \(8, 5, 4, 4\)"):
        build_quantizer("vq", codebook_size=8, codebook_dim=4)(torch.randn(8, 5, 4, 4))
    with pytest.raises(ValueError, match="scales end at 4 but the latent grid is 8x8"):
        build_quantizer("multiscale", codebook_size=8, codebook_dim=4, scales=[1, 2, 4])(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="l2_norm"):
        build_quantizer("residual", codebook_size=8, codebook_dim=4, l2_norm=True)
    with pytest.raises(TypeError, match="integer"):
        build_quantizer("vq", codebook_size=8, codebook_dim=4).lookup(torch.zeros(1, 2, 2))


def test_lc_codebook_is_loaded_checked_and_required(tmp_path):
    from safetensors.torch import save_file

    lc = build_quantizer("lc", codebook_size=32, codebook_dim=8, feature_dim=12)
    with pytest.raises(RuntimeError, match="load_codebook"):
        lc(torch.randn(1, 8, 2, 2))
    centres = torch.randn(32, 12)
    save_file({"codebook": centres}, tmp_path / "codebook.safetensors")
    torch.save({"codebook": centres}, tmp_path / "codebook.pt")
    for path in (tmp_path / "codebook.safetensors", tmp_path / "codebook.pt"):
        lc.load_codebook(path)
        assert torch.equal(lc.frozen_codebook, centres)
    assert not lc.frozen_codebook.requires_grad
    assert lc(torch.randn(1, 8, 2, 2)).indices.shape == (1, 2, 2)
    with pytest.raises(ValueError, match=r"shape \(32, 10\), expected \(32, 12\).*feature_dim=10"):
        lc.load_codebook(torch.randn(32, 10))
    with pytest.raises(FileNotFoundError, match="init-codebook"):
        lc.load_codebook(tmp_path / "missing.safetensors")
    save_file({"a": centres, "b": centres.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(KeyError, match="'codebook'"):
        lc.load_codebook(tmp_path / "two.safetensors")


def test_registry_lists_every_family():
    assert set(QUANTIZERS) == {"vq", "simvq", "lc", "fvq", "residual", "multiscale"}
