import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModel  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from fullvq.generator import (  # noqa: E402
    FullVQGPT,
    FullVQGPTConfig,
    GridRotaryEmbedding,
    classifier_free_guidance,
    guidance_scales,
    sample,
)
from fullvq.generator.sampling import _decode, build_logits_processor  # noqa: E402


def tiny_config(**overrides):
    settings = dict(
        codebook_size=32, num_classes=4, grid_size=(3, 4), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, class_dropout_prob=0.0, token_dropout_prob=0.0, residual_dropout_prob=0.0,
        ffn_dropout_prob=0.0,
    )
    return FullVQGPTConfig(**{**settings, **overrides})


def random_gpt(**overrides):
    """A tiny GPT whose zero-initialised head is replaced, so its predictions are not uniform."""
    model = FullVQGPT(tiny_config(**overrides)).eval()
    nn.init.normal_(model.lm_head.weight, std=0.5)
    return model


def rotate(rotary, vector, cell):
    """``vector`` (head_dim,) rotated for grid cell (row, col): sequence position 1 + row * w + col."""
    position = torch.tensor([[1 + cell[0] * rotary.grid_size[1] + cell[1]]])
    cos, sin = rotary(vector, position)
    x = vector.view(1, 1, 1, -1)
    return apply_rotary_pos_emb(x, x, cos, sin)[0].view(-1)


def test_2d_rope_attention_scores_depend_only_on_relative_row_and_column_offsets():
    rotary = GridRotaryEmbedding(head_dim=16, grid_size=(6, 7))
    q, k = torch.randn(2, 16, dtype=torch.float64)
    cells = [((0, 0), (2, 3)), ((1, 5), (0, 1)), ((3, 3), (3, 0)), ((2, 6), (1, 6))]
    for (query_cell, key_cell) in cells:
        score = rotate(rotary, q, query_cell) @ rotate(rotary, k, key_cell)
        for shift in [(1, 0), (0, -1), (2, -3), (-1, 1)]:
            moved_q = (query_cell[0] + shift[0], query_cell[1] + shift[1])
            moved_k = (key_cell[0] + shift[0], key_cell[1] + shift[1])
            if min(moved_q + moved_k) < 0 or max(moved_q[1], moved_k[1]) >= 7 or max(moved_q[0], moved_k[0]) >= 6:
                continue
            moved = rotate(rotary, q, moved_q) @ rotate(rotary, k, moved_k)
            torch.testing.assert_close(moved, score)
    # It is two-dimensional: a row offset and a column offset of the same size score differently,
    # and a cell one row down is not the next cell in raster order.
    origin = rotate(rotary, k, (2, 2))
    down, right = rotate(rotary, q, (3, 2)) @ origin, rotate(rotary, q, (2, 3)) @ origin
    assert not torch.isclose(down, right)


def test_first_half_of_rotary_pairs_follows_the_row_second_half_the_column():
    rotary = GridRotaryEmbedding(head_dim=16, grid_size=(5, 5))
    row_only = rotary.angles(torch.tensor([1 + 3 * 5]))[0]  # cell (3, 0)
    col_only = rotary.angles(torch.tensor([1 + 4]))[0]  # cell (0, 4)
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    torch.testing.assert_close(row_only, torch.cat([3 * inv_freq, torch.zeros(4)]))
    torch.testing.assert_close(col_only, torch.cat([torch.zeros(4), 4 * inv_freq]))


def test_rotation_equals_llamagen_interleaved_rotation_after_permuting_dims():
    head_dim, base, (h, w) = 16, 10000.0, (4, 6)
    rotary = GridRotaryEmbedding(head_dim, (h, w), base)
    x = torch.randn(head_dim, dtype=torch.float64)
    for row, col in [(0, 0), (1, 4), (3, 5)]:
        # LlamaGen: pair j = dims (2j, 2j+1); pairs j < head_dim/4 turn by row * base^(-4j/head_dim),
        # the rest by col * base^(-4(j - head_dim/4)/head_dim).
        j = torch.arange(head_dim // 4, dtype=torch.float64)
        freqs = base ** (-4 * j / head_dim)
        angle = torch.cat([row * freqs, col * freqs])
        rotated = torch.view_as_real(torch.view_as_complex(x.view(-1, 2)) * torch.polar(torch.ones_like(angle), angle))
        # transformers' layout keeps pair j in dims (j, j + head_dim/2).
        to_half = lambda v: v.view(-1, 2).t().reshape(-1)  # noqa: E731
        torch.testing.assert_close(rotate(rotary, to_half(x), (row, col)), to_half(rotated.reshape(-1)))


@pytest.mark.parametrize("prefix_rotation, expected", [("identity", "unchanged"), ("zero", "zeroed")])
def test_class_prefix_rotation_options(prefix_rotation, expected):
    rotary = GridRotaryEmbedding(8, 4, prefix_rotation=prefix_rotation)
    q = torch.randn(1, 2, 3, 8)
    cos, sin = rotary(q, torch.arange(3)[None])
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)
    target = q[:, :, 0] if expected == "unchanged" else torch.zeros_like(q[:, :, 0])
    torch.testing.assert_close(rotated[:, :, 0], target)
    torch.testing.assert_close(rotated[:, :, 1], q[:, :, 1])  # cell (0, 0): angle 0
    assert not torch.allclose(rotated[:, :, 2], q[:, :, 2])  # cell (0, 1) rotates


@pytest.mark.parametrize(
    "size, intermediate_size, millions",
    [("B", 2048, 111), ("L", 2816, 343), ("XL", 3584, 775), ("XXL", 4096, 1400), ("XXXL", 6912, 3900),
     ("3B", 8704, 3100)],
)
def test_named_sizes_match_llamagen_parameter_counts(size, intermediate_size, millions):
    config = FullVQGPTConfig.from_size(size, codebook_size=16384, num_classes=1000)
    assert config.intermediate_size == intermediate_size
    assert (config.rms_norm_eps, config.initializer_range, config.token_dropout_prob) == (1e-5, 0.02, 0.1)
    with torch.device("meta"):
        model = FullVQGPT(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - millions) / millions < 0.01, count


def test_untrained_model_predicts_uniform_tokens_and_logits_line_up_with_targets():
    model = FullVQGPT(tiny_config())
    tokens = torch.randint(0, 32, (2, 3, 4))
    out = model(input_ids=tokens, class_labels=torch.tensor([0, 3]), labels=tokens)
    assert out.logits.shape == (2, 13, 32)  # prefix + 12 tokens, row t predicts token t
    assert torch.count_nonzero(model.lm_head.weight) == 0
    torch.testing.assert_close(out.loss, torch.log(torch.tensor(32.0)))
    # LlamaGen's way (input = all but the last token) gives the same loss.
    shorter = model(input_ids=tokens.flatten(1)[:, :-1], class_labels=torch.tensor([0, 3]), labels=tokens)
    torch.testing.assert_close(shorter.loss, out.loss)


def test_bad_inputs_give_clear_errors():
    model = FullVQGPT(tiny_config())
    tokens = torch.randint(0, 32, (2, 5))
    with pytest.raises(ValueError, match=r"class_labels \[7\] are outside \[0, 4\)"):
        model(input_ids=tokens, class_labels=torch.tensor([1, 7]))
    with pytest.raises(ValueError, match=r"class_labels \[-1\]"):
        model(input_ids=tokens, class_labels=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"class_labels \[4\] are outside \[0, 4\)"):
        sample(model, [0, 4])  # the null class is not a label to sample
    with pytest.raises(ValueError, match=r"\(4, 4\) token grid but the model's grid_size is \(3, 4\)"):
        model(input_ids=torch.zeros(2, 4, 4, dtype=torch.long), class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="exceeds the 3x4 grid"):
        model(input_ids=torch.zeros(2, 13, dtype=torch.long), class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 32\)"):
        model(input_ids=tokens + 30, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_labels are required"):
        model(input_ids=tokens)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_config(hidden_size=72, num_attention_heads=4)  # head_dim 18
    for shape in (dict(hidden_size=0), dict(num_attention_heads=0), dict(num_hidden_layers=-1)):
        with pytest.raises(ValueError, match="must all be at least 1"):
            tiny_config(**shape)
    with pytest.raises(ValueError, match=r"token_dropout_prob=1.5 must be in \[0, 1\]"):
        tiny_config(token_dropout_prob=1.5)
    with pytest.raises(ValueError, match="unknown GPT size 'M'"):
        FullVQGPTConfig.from_size("M")
    with pytest.raises(ValueError, match="guidance_schedule='cosine'"):
        guidance_scales(2.0, 12, "cosine")
    with pytest.raises(ValueError, match="top_p"):
        build_logits_processor(top_p=0.0)


def test_class_dropout_swaps_labels_for_the_null_class_only_in_training():
    model = FullVQGPT(tiny_config(class_dropout_prob=1.0))
    nn.init.normal_(model.lm_head.weight)
    tokens, labels = torch.randint(0, 32, (2, 4)), torch.tensor([0, 2])
    null = model.eval()(input_ids=tokens, class_labels=torch.tensor([4, 4])).logits
    conditional = model(input_ids=tokens, class_labels=labels).logits
    dropped = model.train()(input_ids=tokens, class_labels=labels).logits
    torch.testing.assert_close(dropped, null)
    assert not torch.allclose(conditional, null)


def test_dropout_acts_in_training_only():
    model = FullVQGPT(tiny_config(token_dropout_prob=0.1, residual_dropout_prob=0.1, ffn_dropout_prob=0.1))
    nn.init.normal_(model.lm_head.weight)
    tokens, labels = torch.randint(0, 32, (2, 6)), torch.tensor([0, 2])
    model.train()
    assert not torch.allclose(model(input_ids=tokens, class_labels=labels).logits,
                              model(input_ids=tokens, class_labels=labels).logits)
    model.eval()
    torch.testing.assert_close(model(input_ids=tokens, class_labels=labels).logits,
                               model(input_ids=tokens, class_labels=labels).logits)


def test_cached_logits_equal_full_forward_logits():
    model = random_gpt()
    tokens, labels = torch.randint(0, 32, (3, 12)), torch.tensor([0, 1, 4])
    full = model(input_ids=tokens, class_labels=labels).logits
    out = model(class_labels=labels, use_cache=True)
    steps = [out.logits]
    for t in range(11):
        out = model(input_ids=tokens[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, :12], atol=1e-5, rtol=1e-5)


def test_tiny_gpt_overfits_a_few_grids_and_samples_them_back_for_their_classes():
    torch.manual_seed(0)
    model = FullVQGPT(tiny_config())
    grids = torch.randint(0, 32, (4, 3, 4))
    labels = torch.arange(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(150):
        loss = model(input_ids=grids, class_labels=labels, labels=grids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.02
    order = torch.tensor([2, 0, 3, 1, 2])
    for temperature in (0.0, 0.01):
        tokens = sample(model, order, temperature=temperature, generator=torch.Generator().manual_seed(1))
        assert tokens.shape == (5, 12) and tokens.dtype == torch.long
        assert torch.equal(tokens.view(5, 3, 4), grids[order])
    assert model.training  # sampling restores the mode it found


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(guidance_scale=3.0), dict(guidance_scale=2.0, guidance_schedule="linear", top_k=8, top_p=0.9)],
)
def test_kv_cached_sampling_gives_the_same_tokens_as_uncached(settings):
    model = random_gpt()
    labels = [0, 3, 1]
    cached = sample(model, labels, generator=torch.Generator().manual_seed(7), **settings)
    uncached = sample(model, labels, generator=torch.Generator().manual_seed(7), use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    assert len(cached.unique()) > 4  # really sampled, not one repeated token


def test_guidance_scale_one_equals_conditional_sampling():
    cond, uncond = torch.randn(2, 5, 32)
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)
    model = random_gpt()
    labels = torch.tensor([1, 2, 0])
    conditional = sample(model, labels, guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    # Force the batched [cond; null] path at scale 1 everywhere.
    processor = build_logits_processor()
    guided = _decode(model, labels, torch.ones(12), processor, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(guided, conditional)
    strong = sample(model, labels, guidance_scale=8.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(strong, conditional)
    torch.testing.assert_close(guidance_scales(3.0, 5, "linear"), torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))


def test_save_and_load_round_trip_is_exact(tmp_path):
    model = random_gpt(prefix_rotation="zero", residual_dropout_prob=0.1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    for loader in (FullVQGPT, AutoModel):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, FullVQGPT)
        settings = lambda config: {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
        assert settings(loaded.config) == settings(model.config)
        assert loaded.config.grid_size == [3, 4] and loaded.model.rotary_emb.prefix_rotation == "zero"
        original, restored = model.state_dict(), loaded.state_dict()
        assert original.keys() == restored.keys()
        assert all(torch.equal(original[key], restored[key]) for key in original)
        tokens, labels = torch.randint(0, 32, (2, 7)), torch.tensor([1, 3])
        assert torch.equal(loaded(input_ids=tokens, class_labels=labels).logits,
                           model(input_ids=tokens, class_labels=labels).logits)
        assert torch.equal(sample(loaded, [2], generator=torch.Generator().manual_seed(0)),
                           sample(model, [2], generator=torch.Generator().manual_seed(0)))
