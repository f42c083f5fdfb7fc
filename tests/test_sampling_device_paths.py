"""What the samplers and the GPT promise on the GPU path (device draws, static cache, compiled
decoding, float32 logits and latents, chunked loss), checked on the CPU."""

import gc
import weakref

import pytest
import torch
from torch import nn

from fullvq.generator import FullVQGPT, FullVQGPTConfig, sample, sampling
from fullvq.generator.latent_flow import build_transformer, sample_latents, sampling_scheduler
from fullvq.generator.sampling import device_generator, draw_tokens
from fullvq.generator.token_loss import chunked_cross_entropy


def random_gpt(**overrides) -> FullVQGPT:
    settings = dict(codebook_size=32, num_classes=4, grid_size=(3, 4), hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, class_dropout_prob=0.0, token_dropout_prob=0.0,
                    residual_dropout_prob=0.0, ffn_dropout_prob=0.0)
    model = FullVQGPT(FullVQGPTConfig(**{**settings, **overrides})).eval()
    nn.init.normal_(model.lm_head.weight, std=0.5)
    return model


def seeded(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_device_draw_is_torch_multinomial_with_the_same_random_numbers():
    probs = torch.randn(64, 500).mul(3).softmax(-1)
    probs[:, :100] = 0  # filtered tokens (top-k / top-p) are never drawn
    first, second = seeded(), seeded()
    expected = torch.multinomial(probs, 1, generator=first).squeeze(1)
    drawn = draw_tokens(probs.log(), temperature=1.0, generator=second)
    assert torch.equal(drawn, expected) and (drawn >= 100).all()
    assert torch.equal(first.get_state(), second.get_state())  # so CPU sampling is unchanged
    assert torch.equal(draw_tokens(probs.log(), 0.0, None), probs.argmax(-1))


def test_a_generator_already_on_the_device_is_used_as_is():
    generator = seeded()
    assert device_generator(generator, "cpu") is generator
    assert device_generator(None, "cpu") is None


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(guidance_scale=3.0, temperature=0.0),
                                      dict(guidance_scale=2.0, guidance_schedule="linear", top_k=8, top_p=0.9)])
def test_static_cache_gives_the_dynamic_cache_tokens(settings):
    model = random_gpt()
    dynamic = sample(model, [0, 3, 1], generator=seeded(), static_cache=False, **settings)
    static = sample(model, [0, 3, 1], generator=seeded(), static_cache=True, **settings)
    again = sample(model, [0, 3, 1], generator=seeded(), static_cache=True, **settings)  # the reset cache
    assert torch.equal(static, dynamic) and torch.equal(again, dynamic)
    sampling.release_decoder(model)


def test_compiled_decoding_gives_the_dynamic_cache_tokens_in_one_graph(monkeypatch):
    # aot_eager: the same graph capture as on a GPU (fullgraph=True fails on any graph break) without
    # inductor's code generation, which takes minutes on two busy CPU cores.
    monkeypatch.setattr(sampling, "decode_compile_options", lambda device: {"backend": "aot_eager"})
    model = random_gpt()
    settings = dict(guidance_scale=3.0, top_k=8)
    dynamic = sample(model, [0, 3, 1], generator=seeded(), static_cache=False, **settings)
    compiled = sample(model, [0, 3, 1], generator=seeded(), static_cache=True, compile_decode=True, **settings)
    step = sampling._DECODERS[model][2]
    greedy = sample(model, [2, 1, 0], generator=seeded(), static_cache=True, compile_decode=True,
                    guidance_scale=3.0, temperature=0.0)
    assert torch.equal(compiled, dynamic)
    assert torch.equal(greedy, sample(model, [2, 1, 0], static_cache=False, guidance_scale=3.0, temperature=0.0))
    assert sampling._DECODERS[model][2] is step  # a second call of the batch size reuses the compiled step
    sampling.release_decoder(model)
    assert model not in sampling._DECODERS
    sample(model, [0], static_cache=True, compile_decode=True, temperature=0.0)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the kept cache and compiled step do not keep their model alive


def test_compiled_decoding_without_the_static_cache_is_refused():
    with pytest.raises(ValueError, match="static_cache=True"):
        sample(random_gpt(), [0], static_cache=False, compile_decode=True)


def test_a_bf16_gpt_samples_from_float32_logits_of_its_bf16_hidden_states():
    model = random_gpt().to(torch.bfloat16)
    hidden = torch.randn(5, 64).bfloat16()
    logits = model.next_token_logits(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.float() @ model.lm_head.weight.float().T, rtol=1e-5, atol=1e-5)
    assert not torch.equal(logits, model.lm_head(hidden).float())  # bf16 logits are rounded
    tokens = sample(model, [0, 1], guidance_scale=2.0, generator=seeded())
    assert tokens.shape == (2, 12)


def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 10))
    labels[0, :4] = -100
    logits = hidden @ weight.T
    full = nn.functional.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    full_grads = torch.autograd.grad(full, [hidden, weight])
    loss, accuracy = chunked_cross_entropy(hidden, weight, labels, chunk_rows=7)
    torch.testing.assert_close(loss, full)
    for got, expected in zip(torch.autograd.grad(loss, [hidden, weight]), full_grads, strict=True):
        torch.testing.assert_close(got, expected)
    kept = labels != -100
    assert accuracy == ((logits.argmax(-1) == labels) & kept).sum() / kept.sum()


def test_training_forward_without_logits_gives_the_same_loss_and_accuracy():
    model = random_gpt()
    tokens, labels = torch.randint(0, 32, (2, 12)), torch.tensor([1, 3])
    full = model(input_ids=tokens[:, :-1], class_labels=labels, labels=tokens)
    lean = model(input_ids=tokens[:, :-1], class_labels=labels, labels=tokens, return_logits=False)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss)
    torch.testing.assert_close(lean.token_accuracy, full.token_accuracy)
    torch.testing.assert_close(full.token_accuracy, (full.logits.argmax(-1) == tokens).float().mean())


def test_latent_sampling_keeps_float32_latents_for_a_bf16_transformer():
    transformer = build_transformer(latent_channels=4, grid_size=4, num_classes=3, num_layers=1,
                                    num_attention_heads=2, attention_head_dim=8, norm_num_groups=4,
                                    patch_size=1).eval()
    scheduler = sampling_scheduler("flow")
    labels = torch.tensor([0, 2])
    plain = sample_latents(transformer, scheduler, labels, num_inference_steps=3, guidance_scale=2.0,
                           generator=seeded())
    half = sample_latents(transformer.to(torch.bfloat16), scheduler, labels, num_inference_steps=3,
                          guidance_scale=2.0, generator=seeded())
    assert plain.dtype == half.dtype == torch.float32
    torch.testing.assert_close(half, plain, atol=0.05, rtol=0.05)  # bf16 network, float32 integration


def test_latent_sampling_starts_from_the_cpu_generators_noise(monkeypatch):
    from fullvq.generator import latent_flow

    # A zero velocity leaves the Euler flow at its start noise.
    monkeypatch.setattr(latent_flow, "guided_prediction", lambda transformer, x, *args: torch.zeros_like(x).float())
    transformer = build_transformer(latent_channels=4, grid_size=4, num_classes=3, num_layers=1,
                                    num_attention_heads=2, attention_head_dim=8, norm_num_groups=4, patch_size=1)
    latents = sample_latents(transformer, sampling_scheduler("flow"), torch.tensor([0, 2]), num_inference_steps=2,
                             generator=seeded())
    assert torch.equal(latents, torch.randn(2, 4, 4, 4, generator=seeded()))
