import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fullvq import FVQModel

WEIGHTS = "diffusion_pytorch_model.safetensors"


def images(batch=2, size=32):
    return torch.rand(batch, 3, size, size) * 2 - 1


def make(config, quantizer="fvq", **kwargs):
    model = FVQModel(quantizer=quantizer, codebook_size=64, codebook_dim=8, quantizer_kwargs=kwargs, **config)
    if quantizer == "lc" or kwargs.get("base") == "lc":
        for module in model.quantize.modules():
            if hasattr(module, "load_codebook"):
                module.load_codebook(torch.randn(64, kwargs["feature_dim"]))
    with torch.no_grad():  # a trained-looking bridge/projector, not the zero start
        for p in model.quantize.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_forward_reconstructs_with_indices_and_losses(tiny_tokenizer_config):
    model = make(tiny_tokenizer_config)
    out = model(images())
    assert out.sample.shape == (2, 3, 32, 32)
    assert out.indices.shape == (2, 8, 8) and out.indices.dtype == torch.long
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert float(out.loss) == pytest.approx(float(out.codebook_loss + 0.25 * out.commitment_loss), rel=1e-5)
    assert model.latent_grid() == (8, 8)
    decoded = model.decode_indices(model.encode_indices(images()))
    assert decoded.shape == (2, 3, 32, 32) and decoded.abs().max() <= 1


def test_training_step_reaches_encoder_decoder_and_bridge(tiny_tokenizer_config):
    model = make(tiny_tokenizer_config).train()
    x = images()
    out = model(x)
    ((out.sample - x).pow(2).mean() + out.loss).backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.bridge.recover.weight",
                 "quantize.base_codebook.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "quantizer, kwargs",
    [("fvq", {"group_size": 8}), ("lc", {"feature_dim": 12}), ("simvq", {}), ("vq", {"l2_norm": True}),
     ("residual", {"base": "fvq", "num_quantizers": 2, "group_size": 8}),
     ("multiscale", {"base": "lc", "feature_dim": 12, "scales": [1, 2, 4, 8]})],
)
def test_save_load_round_trip_and_export_plain_are_exact(tmp_path, tiny_tokenizer_config, quantizer, kwargs):
    model = make(tiny_tokenizer_config, quantizer, **kwargs)
    x = images()
    with torch.no_grad():
        reference = model(x)
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / WEIGHTS).is_file()
    loaded = FVQModel.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        again = loaded(x)
    assert torch.equal(again.indices, reference.indices)
    assert torch.equal(again.sample, reference.sample)

    plain = model.export_plain()
    assert plain.config.quantizer in ("vq", "residual", "multiscale")
    assert plain.config.quantizer_kwargs.get("base", "vq") == "vq"
    assert not any(k.startswith("quantize.bridge") or "projection" in k for k in plain.state_dict())
    indices = model.encode_indices(x)
    assert torch.equal(plain.encode_indices(x), indices)
    assert torch.equal(plain.decode_indices(indices), model.decode_indices(indices))
    # The exported model is an ordinary plain-codebook model on disk too.
    plain.save_pretrained(tmp_path / "plain")
    reloaded = FVQModel.from_pretrained(tmp_path / "plain").eval()
    assert torch.equal(reloaded.encode_indices(x), indices)


def test_llamagen_vq16_recipe_has_its_shape():
    model = FVQModel(quantizer="vq", codebook_size=16384, codebook_dim=8, quantizer_kwargs={"l2_norm": True})
    assert model.downsample_factor == 16 and model.latent_grid() == (16, 16)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(72e6, rel=0.01)  # LlamaGen: 72M


def test_bad_images_are_refused_with_the_fix(tiny_tokenizer_config):
    model = make(tiny_tokenizer_config)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*batch dimension"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="convert to 3 channels"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[-1, 1\].*x / 127.5 - 1"):
        model(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not divisible by the downsample factor 4"):
        model(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode_indices(torch.full((1, 8, 8), 64))


def test_from_pretrained_refuses_missing_or_mismatched_weights(tmp_path, tiny_tokenizer_config):
    make(tiny_tokenizer_config).save_pretrained(tmp_path / "model")
    weights = load_file(tmp_path / "model" / WEIGHTS)
    weights.pop("quantize.bridge.recover.weight")
    save_file(weights, tmp_path / "model" / WEIGHTS)
    with pytest.raises(ValueError, match=r"missing_keys: \['quantize.bridge.recover.weight'\].*save_pretrained"):
        FVQModel.from_pretrained(tmp_path / "model")

    make(tiny_tokenizer_config).save_pretrained(tmp_path / "other")
    config_path = tmp_path / "other" / "config.json"
    config = json.loads(config_path.read_text())
    config["codebook_dim"] = 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit its config.json"):
        FVQModel.from_pretrained(tmp_path / "other")


def test_bad_model_settings_are_refused(tiny_tokenizer_config):
    with pytest.raises(ValueError, match="codebook_size=100 is not divisible by group_size=16"):
        FVQModel(quantizer="fvq", codebook_size=100, codebook_dim=8, quantizer_kwargs={"group_size": 16},
                 **tiny_tokenizer_config)
    bad = dict(tiny_tokenizer_config, block_out_channels=(12, 32, 32))
    with pytest.raises(ValueError, match="not divisible by norm_num_groups=8"):
        FVQModel(quantizer="vq", codebook_size=64, codebook_dim=8, **bad)


def test_fvq_settings_derived_from_k_are_saved_so_a_new_default_cannot_change_a_saved_model(
        tmp_path, tiny_tokenizer_config, monkeypatch):
    from fullvq.tokenizer.quantizers import bridge

    model = FVQModel(quantizer="fvq", codebook_size=64, codebook_dim=8, **tiny_tokenizer_config)
    assert model.config.quantizer_kwargs == {"group_size": 1, "width": 8, "num_heads": 4}
    given = FVQModel(quantizer="fvq", codebook_size=64, codebook_dim=8, quantizer_kwargs={"group_size": 4},
                     **tiny_tokenizer_config)
    assert given.config.quantizer_kwargs["group_size"] == 4 and given.quantize.group_size == 4
    model.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(bridge, "default_group_size", lambda codebook_size: 16)
    loaded = FVQModel.from_pretrained(tmp_path / "model")
    assert loaded.quantize.group_size == 1
    with torch.no_grad():
        assert torch.equal(loaded.quantize.codebook(), model.quantize.codebook())


def test_a_folder_without_weights_is_reported_in_fullvqs_words(tmp_path, tiny_tokenizer_config):
    """Issue 19, also seen: not diffusers' ``diffusion_pytorch_model.bin`` message."""
    make(tiny_tokenizer_config).save_pretrained(tmp_path / "model")
    for weights in (tmp_path / "model").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="holds config.json but no weights") as error:
        FVQModel.from_pretrained(tmp_path / "model")
    assert "diffusion_pytorch_model.bin" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        FVQModel.from_pretrained(tmp_path / "missing")
