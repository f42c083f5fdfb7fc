"""Sharded training: FSDP2 through the Trainer on two real CPU processes (gloo), the rules it refuses,
and the shipped accelerate configs."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fullvq.config import ConfigError
from fullvq.generator import FullVQGPT, FullVQGPTConfig
from fullvq.jobs.devices import check_sharding
from fullvq.tokenizer import FVQModel
from fullvq.tokenizer.losses import PatchGANDiscriminator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--mixed_precision", "no", str(REPO / "tests" / "fixtures" / "sharded_training.py"), str(root)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_fsdp_trains_resumes_and_matches_ddp_on_two_processes(sharded_runs):
    _, ranks = sharded_runs
    for results in ranks:
        assert results["fsdp"]["sharded"] == "FSDP" and results["ddp"]["sharded"] == "MULTI_CPU"
        fsdp = results["fsdp"]["checksums"]
        assert fsdp[0] == fsdp[1]  # the shards' sums, added over processes, agree
        assert results["fsdp-resumed"]["checksums"] == fsdp  # resumed from step 2: the same weights
        assert results["ddp"]["checksums"] == pytest.approx(fsdp, rel=1e-9)  # sharding changes nothing


def test_a_nan_on_one_process_stops_every_process_without_a_hang(sharded_runs):
    _, (rank0, rank1) = sharded_runs
    assert "non-finite loss (on another process) at step 1" in rank0["nan-on-rank-1"]["error"]
    assert "non-finite loss (nan) at step 1" in rank1["nan-on-rank-1"]["error"]


def test_fsdp_run_exports_the_full_ema_model_and_samples_from_it(sharded_runs):
    root, _ = sharded_runs
    exported = FullVQGPT.from_pretrained(root / "fsdp" / "model")
    ema = load_file(root / "fsdp" / "checkpoint-4" / "ema.safetensors")
    state = exported.state_dict()
    assert set(ema) == {name for name, _ in exported.named_parameters()}
    assert all(torch.equal(state[name], ema[name]) for name in ema)  # the full average, not one shard
    assert json.loads((root / "fsdp" / "samples" / "step-4.json").read_text())  # sampled from an unsharded copy


def fake_accelerator(distributed_type: str, version: int = 2):
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType[distributed_type],
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))


def test_fsdp_refuses_what_it_cannot_shard_before_any_work(tiny_tokenizer_config):
    gpt = {"model": FullVQGPT(FullVQGPTConfig(codebook_size=16, num_classes=2, grid_size=2, hidden_size=32,
                                              num_hidden_layers=1, num_attention_heads=2))}
    check_sharding(fake_accelerator("FSDP"), gpt)
    check_sharding(fake_accelerator("MULTI_GPU"), {"model": gpt["model"], "discriminator": PatchGANDiscriminator()})
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        check_sharding(fake_accelerator("FSDP", version=1), gpt)
    tokenizer = FVQModel(quantizer="fvq", codebook_size=256, codebook_dim=8, quantizer_kwargs={"group_size": 16},
                         **tiny_tokenizer_config)
    with pytest.raises(ConfigError, match="ddp.yaml"):
        check_sharding(fake_accelerator("FSDP"), {"model": tokenizer, "discriminator": PatchGANDiscriminator()})
    with pytest.raises(ConfigError, match="slot revival"):
        check_sharding(fake_accelerator("FSDP"), {"model": tokenizer})


@pytest.mark.parametrize("name", ["ddp", "fsdp", "multi-node"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from transformers.models.llama import modeling_llama

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.num_processes == 8 * config.num_machines
    if name == "fsdp":
        assert config.distributed_type.value == "FSDP" and config.fsdp_config["fsdp_version"] == 2
        layer = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        assert hasattr(modeling_llama, layer)  # the GPT's block class, so each block is one shard unit
    else:
        assert config.distributed_type.value == "MULTI_GPU"
