import pytest
import torch

from fullvq.tokenizer.quantizers import nearest_code


def brute_force(z, codebook):
    distances = (z.double()[:, None, :] - codebook.double()[None, :, :]).pow(2).sum(-1)
    return distances.argmin(dim=1), distances


@pytest.mark.parametrize("num_codes", [1, 7, 1000, 4096, 5003])
def test_chunked_search_equals_brute_force(num_codes):
    z = torch.randn(777, 16)
    codebook = torch.randn(num_codes, 16)
    expected, distances = brute_force(z, codebook)
    # Tiny blocks force many token and code chunks, none of them aligned with K.
    got = nearest_code(z, codebook, token_chunk=100, code_chunk=333)
    default = nearest_code(z, codebook)
    top2 = distances.topk(min(2, num_codes), dim=1, largest=False).values
    clear = (top2[:, -1] - top2[:, 0] > 1e-4) if num_codes > 1 else torch.ones(len(z), dtype=torch.bool)
    assert clear.float().mean() > 0.9  # the comparison below covers nearly all tokens
    assert torch.equal(got[clear], expected[clear])
    assert torch.equal(default[clear], expected[clear])
    # Where codes tie in float32 the chosen code is still a nearest one.
    chosen = distances.gather(1, got[:, None]).squeeze(1)
    assert torch.allclose(chosen, top2[:, 0], atol=1e-4)


def test_search_is_exact_on_duplicated_codes_and_keeps_first_index():
    codebook = torch.randn(50, 8)
    codebook = torch.cat([codebook, codebook])  # every code appears twice
    z = codebook[:50] + 0.01 * torch.randn(50, 8)
    got = nearest_code(z, codebook, code_chunk=7)
    assert torch.equal(got, torch.arange(50))


def allocation_sizes(monkeypatch) -> list[int]:
    """Sizes of every ``torch.empty`` tensor made from now on (undo with ``monkeypatch.undo()``)."""
    sizes = []
    real_empty = torch.empty

    def spy(*shape, **kwargs):
        out = real_empty(*shape, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "empty", spy)
    return sizes


def test_search_block_memory_does_not_grow_with_codebook(monkeypatch):
    sizes = allocation_sizes(monkeypatch)
    nearest_code(torch.randn(64, 4), torch.randn(20000, 4), max_block_elements=4096)
    monkeypatch.undo()
    assert max(sizes) <= 20000  # the index output / code norms, never 64 x 20000
    assert 64 * 64 in sizes


def test_search_runs_in_float32_under_autocast():
    z = torch.randn(100, 8).bfloat16()
    codebook = torch.randn(300, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_code(z, codebook)
    expected, _ = brute_force(z.float(), codebook)
    assert (got == expected).float().mean() > 0.99


def test_search_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="same D"):
        nearest_code(torch.randn(4, 8), torch.randn(10, 16))


def test_default_block_is_cache_sized_on_the_cpu(monkeypatch):
    z, codebook = torch.randn(1024, 4), torch.randn(8192, 4)
    sizes = allocation_sizes(monkeypatch)
    got = nearest_code(z, codebook)
    monkeypatch.undo()
    assert max(sizes) == 2**20  # 1,024 tokens x 1,024 codes, not the GPU's 2^24 (the whole 1,024 x 8,192)
    assert torch.equal(got, nearest_code(z, codebook, max_block_elements=2**24))


@pytest.mark.parametrize("blocks", [{}, {"token_chunk": 3, "code_chunk": 5}])
def test_non_finite_rows_and_codes_never_give_an_index_outside_the_codebook(blocks):
    z = torch.randn(9, 4)
    z[1, 2] = float("nan")
    z[4] = float("inf")
    z[6, 0] = -float("inf")
    codebook = torch.randn(16, 4)
    got = nearest_code(z, codebook, **blocks)
    finite = torch.tensor([i not in (1, 4, 6) for i in range(9)])
    assert torch.equal(got[~finite], torch.zeros(3, dtype=torch.long))
    assert torch.equal(got[finite], brute_force(z[finite], codebook)[0])
    codebook[5] = float("nan")  # a diverged code: every index still lies in [0, K)
    got = nearest_code(torch.randn(9, 4), codebook, **blocks)
    assert got.min() >= 0 and got.max() < 16
