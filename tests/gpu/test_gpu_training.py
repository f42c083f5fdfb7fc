"""Training steps on CUDA in bf16: the tokenizer through the Trainer (LPIPS and the GAN on), the GPT."""

import json
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fullvq.config import load_config
from fullvq.generator import FullVQGPT, FullVQGPTConfig
from fullvq.jobs.train_tokenizer import TokenizerTrainConfig, train_tokenizer


def image_folder(root, count: int = 8, size: int = 32):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(count // 2):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def test_one_bf16_tokenizer_training_step_with_lpips_and_the_gan(tmp_path, device):
    recipe = {
        "model": dict(sample_size=32, block_out_channels=[16, 32, 32], layers_per_block=1, latent_channels=16,
                      norm_num_groups=8, quantizer="fvq", codebook_size=256, codebook_dim=8),
        "loss": dict(perceptual_weight=1.0, perceptual_random_backbone=True, gan_weight=0.5, gan_start_step=0,
                     discriminator_channels=8),
        "data": dict(source=str(image_folder(tmp_path / "images")), resolution=32),
        "train": dict(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=2, mixed_precision="bf16",
                      num_workers=0, log_every=1, sample_every=2, checkpoint_every=2, tracker="none",
                      scale_lr=False, warmup_steps=0),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = train_tokenizer(load_config(TokenizerTrainConfig, tmp_path / "recipe.yaml"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2
    for key in ("loss", "perceptual_loss", "gan_loss", "discriminator_loss"):
        assert all(np.isfinite(record[key]) for record in records), key
    assert records[-1]["perceptual_loss"] > 0 and records[-1]["gan_weight"] > 0


def test_one_bf16_gpt_training_step(device):
    torch.manual_seed(0)
    config = FullVQGPTConfig(codebook_size=1024, num_classes=10, grid_size=8, hidden_size=128, num_hidden_layers=2,
                             num_attention_heads=4, class_dropout_prob=0.0, token_dropout_prob=0.0,
                             residual_dropout_prob=0.0, ffn_dropout_prob=0.0)
    model = FullVQGPT(config).to(device).train()
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # a trained-like head: gradients reach every layer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    tokens = torch.randint(0, 1024, (8, 64), device=device)
    labels = torch.randint(0, 10, (8,), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(input_ids=tokens[:, :-1], class_labels=labels, labels=tokens, return_logits=False)
        with torch.no_grad():
            full = model(input_ids=tokens[:, :-1], class_labels=labels, labels=tokens)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    optimizer.step()
    assert torch.isfinite(out.loss) and out.logits is None
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-3, atol=1e-3)  # chunked loss = full-logits loss
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) == len(grads)


@pytest.mark.parametrize("quantizer", ["vq", "fvq", "simvq"])
def test_a_tokenizer_training_forward_and_backward_read_nothing_back_to_the_host(quantizer, device):
    if device.type != "cuda":
        pytest.skip("host syncs exist on CUDA only")
    from fullvq import FVQModel
    from fullvq.tokenizer.quantizers import CodebookUsage

    model = FVQModel(sample_size=32, block_out_channels=(16, 32), layers_per_block=1, latent_channels=16,
                     norm_num_groups=8, quantizer=quantizer, codebook_size=1024, codebook_dim=8).to(device).train()
    usage = CodebookUsage(1024, device=device)
    images = torch.rand(4, 3, 32, 32, device=device) * 2 - 1
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(images)
                loss = out.loss + out.sample.float().square().mean()
            loss.backward()
            usage.update(out.indices)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    assert syncs == []
