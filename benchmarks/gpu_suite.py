"""The GPU figures of issue 18 in one command, each beside its bound (at most 8 minutes on one H200).

    python benchmarks/gpu_suite.py                   # on a GPU: writes benchmarks/results/gpu/
    python benchmarks/gpu_suite.py --smoke           # the whole suite on the CPU at toy sizes (~1 min)
    python benchmarks/gpu_suite.py --only b,d --out /tmp/gpu   # some items, elsewhere

Items (issue 18, "What to build" 4):
  a  the GPU test layer (tests/gpu, ``pytest -m gpu``): every test passes;
  b  tokenizer training step, 256 px, bf16, batch 32, LPIPS and the GAN on: images/s and peak memory
     for vq and fvq at 16,384 x 256 and 262,144 x 256, eager and compiled (``compile_blocks``),
     against the FLOP bound; targets: fvq at most 10 % / 25 % slower than vq, no OOM at 262,144;
  c  GPT-B and GPT-L training step, bf16, batch 64 x 256 tokens: tokens/s and MFU (6N + 12LHT FLOPs
     per token over the bf16 datasheet peak); target: GPT-L >= 40 % MFU;
  d  sampling 256 tokens at CFG 2, batch 64 and 256, GPT-B and GPT-L, dynamic cache and static cache
     + compiled decoding: images/s against the weight-read bound and the roofline (weights, KV-cache
     reads, FLOPs); LlamaGen's A100 figures (CFG 2, largest batch): L 47.1, XL 23.7 images/s;
     target: GPT-L >= 100 images/s;
  e  exact nearest-code search at 262,144 codes (and LlamaGen's 16,384 x 8) against the IEEE-fp32
     GEMM bound; target: within 1.2x;
  f  images/s through InceptionV3 for gFID (random weights: same arithmetic), against its FLOP bound.

Ceilings are measured first (a bf16 and an IEEE-fp32 8192^3 GEMM on random data, a device copy).
Sections run in order within ``--budget-minutes``; what does not fit is listed as skipped, so a
second run with ``--only`` fills it in. Writes ``results.json``, ``results.md``, ``tests.xml`` and ``tests.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H200_BF16_DATASHEET_TFLOPS = 989.4  # dense bf16, SXM (the MFU convention); H100 SXM has the same
LLAMAGEN_A100_IMAGES_PER_SECOND = {"L": 47.1, "XL": 23.7}  # CFG 2, largest batch, from its paper

VQ16 = dict(sample_size=256, block_out_channels=[128, 128, 256, 256, 512], layers_per_block=2, latent_channels=256)
TOY_AUTOENCODER = dict(sample_size=32, block_out_channels=[16, 32], layers_per_block=1, latent_channels=16,
                       norm_num_groups=8)
TOY_GPTS = {"B": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
            "L": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4)}

SIZES = {
    "full": dict(
        autoencoder=VQ16, resolution=256, tokenizer_batch=32, codebooks=[16384, 262144], codebook_dim=256,
        gpt_sizes=["B", "L"], gpt_batch=64, grid=16, gpt_codebook=16384, steps=6,
        sampling_batches=[64, 256], search=[(8192, 262144, 256), (8192, 16384, 8)], inception_batch=200,
        inception_batches=5, gemm=8192, copy_gb=4.0, precision="bf16", warmup=2,
    ),
    "smoke": dict(
        autoencoder=TOY_AUTOENCODER, resolution=32, tokenizer_batch=2, codebooks=[64], codebook_dim=8,
        gpt_sizes=["B", "L"], gpt_batch=2, grid=4, gpt_codebook=64, steps=2,
        sampling_batches=[2], search=[(256, 2048, 16), (256, 512, 8)], inception_batch=2,
        inception_batches=1, gemm=256, copy_gb=0.01, precision="no", warmup=1,  # CPUs emulate bf16 slowly
    ),
}


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after ``warmup`` calls, device synchronised."""
    for _ in range(warmup):
        run()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings(device: torch.device, size: dict) -> dict:
    """Measured bf16 and IEEE-fp32 GEMM rates (FLOP/s, random data) and device copy bandwidth (bytes/s)."""
    from fullvq.precision import ieee_float32

    n = size["gemm"]
    found = {}
    for name, dtype in (("bf16_flops", torch.bfloat16), ("fp32_flops", torch.float32)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        with ieee_float32():
            seconds = median_seconds(functools.partial(torch.matmul, a, b), device, repeats=10, warmup=3)
        found[name] = 2 * n**3 / seconds
    x = torch.randn(int(size["copy_gb"] * 1e9 / 4), device=device)
    y = torch.empty_like(x)
    found["bandwidth"] = 2 * x.numel() * 4 / median_seconds(lambda: y.copy_(x), device, repeats=10, warmup=2)
    return found


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def row(item: str, case: str, figure: str, value, bound=None, target: str = "", ok: bool | None = None, **extra):
    return {"item": item, "case": case, "figure": figure, "value": value, "bound": bound, "target": target,
            "ok": ok, **extra}


# ----------------------------------------------------------------------------- a: the GPU tests


def start_tests(out: Path, smoke: bool) -> subprocess.Popen:
    """The GPU test layer in a pytest subprocess, its output in ``out/tests.log``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if smoke:
        env["FULLVQ_GPU_TESTS_ON_CPU"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider",
               f"--junitxml={out / 'tests.xml'}"]
    with open(out / "tests.log", "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def section_tests(device, size, ceiling, out: Path, smoke: bool, process: subprocess.Popen | None = None) -> list[dict]:
    """Item a: the tests' counts from their junit report; ``process``: a run already started (``--smoke``
    starts it beside the other items, which time nothing real; on a GPU it runs first and alone)."""
    process = process or start_tests(out, smoke)
    returncode = process.wait()
    print((out / "tests.log").read_text()[-3000:], flush=True)
    counts, failed = _junit_counts(out / "tests.xml")
    return [row("a", "tests/gpu", "tests passed", counts["passed"], bound=counts["total"],
                target="all pass", ok=returncode == 0 and counts["passed"] > 0, failed=failed,
                skipped=counts["skipped"])]


def _junit_counts(path: Path) -> tuple[dict, list[str]]:
    import xml.etree.ElementTree as ElementTree

    counts = {"total": 0, "passed": 0, "skipped": 0}
    failed = []
    if not path.is_file():
        return counts, ["no report (pytest did not run)"]
    for case in ElementTree.parse(path).iter("testcase"):
        counts["total"] += 1
        outcome = {child.tag for child in case}
        if "skipped" in outcome:
            counts["skipped"] += 1
        elif outcome & {"failure", "error"}:
            failed.append(f"{case.get('classname')}.{case.get('name')}")
        else:
            counts["passed"] += 1
    return counts, failed


# ----------------------------------------------------------------------------- b: tokenizer step


class _Images(torch.utils.data.Dataset):
    def __init__(self, resolution: int):
        self.resolution = resolution

    def __len__(self):
        return 1024

    def __getitem__(self, index):
        return {"pixel_values": torch.rand(3, self.resolution, self.resolution) * 2 - 1}


def tokenizer_step(device, size, quantizer: str, codebook_size: int, compiled: bool
                   ) -> tuple[float, float | None, float]:
    """Seconds per training step (generator + discriminator, LPIPS and GAN on), peak GB, FLOPs per step."""
    from torch.utils.flop_counter import FlopCounterMode

    from fullvq.config import build_dataclass
    from fullvq.jobs.loop import Trainer
    from fullvq.jobs.train_tokenizer import TokenizerStage, TokenizerTrainConfig

    batch, resolution = size["tokenizer_batch"], size["resolution"]
    config = build_dataclass(TokenizerTrainConfig, {
        "model": {**size["autoencoder"], "quantizer": quantizer, "codebook_size": codebook_size,
                  "codebook_dim": size["codebook_dim"]},
        "loss": {"perceptual_weight": 1.0, "perceptual_random_backbone": True, "gan_weight": 0.5, "gan_start_step": 0},
        "data": {"source": "synthetic", "resolution": resolution},
        "train": {"output_dir": tempfile.mkdtemp(), "batch_size": batch, "max_steps": 100, "tracker": "none",
                  "mixed_precision": size["precision"], "num_workers": 0, "compile": compiled},
    })
    dataset = _Images(resolution)
    trainer = Trainer(config.train, lambda t: TokenizerStage(t, config, dataset), dataset, full_config=config)
    stage = trainer.stage
    trainer.prepare()  # the GPU defaults (TF32, fused AdamW, channels_last, cuDNN autotuning) and train.compile
    images = {"pixel_values": torch.rand(batch, 3, resolution, resolution, device=trainer.accelerator.device) * 2 - 1}
    step = iter(range(1, 10**6))
    reset_memory(device)
    seconds = median_seconds(lambda: stage.training_step(images, next(step)), device, repeats=size["steps"],
                             warmup=size["warmup"])
    peak = peak_memory_gb(device)
    flops = math.nan
    if not compiled:
        with FlopCounterMode(display=False) as counter:
            stage.training_step(images, next(step))
        flops = counter.get_total_flops()
    return seconds, peak, flops


@contextlib.contextmanager
def _one_lpips():
    """Build LPIPS' frozen VGG16 (138M parameters, seconds to initialise) once for all the cases."""
    from fullvq.tokenizer import losses

    original = losses.PerceptualLoss
    losses.PerceptualLoss = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        losses.PerceptualLoss = original


def section_tokenizer(device, size, ceiling, out, smoke) -> list[dict]:
    with _one_lpips():
        return _tokenizer_rows(device, size, ceiling)


def _tokenizer_rows(device, size, ceiling) -> list[dict]:
    rows, speed, flops = [], {}, {}
    batch = size["tokenizer_batch"]
    for codebook_size in size["codebooks"]:
        for quantizer in ("vq", "fvq"):
            for compiled in (False, True):
                case = f"{quantizer} {codebook_size}x{size['codebook_dim']} {'compiled' if compiled else 'eager'}"
                try:
                    seconds, peak, step_flops = tokenizer_step(device, size, quantizer, codebook_size, compiled)
                except torch.cuda.OutOfMemoryError as error:
                    rows.append(row("b", case, "images/s", None, target="no OOM", ok=False, error=str(error)[:200]))
                    continue
                flops.setdefault((quantizer, codebook_size), step_flops)
                bound = batch / (flops[(quantizer, codebook_size)] / ceiling["bf16_flops"])
                speed[(quantizer, codebook_size, compiled)] = batch / seconds
                rows.append(row("b", case, "images/s", batch / seconds, bound=bound,
                                target="FLOP bound at bf16 GEMM rate",
                                peak_memory_gb=peak, flops_per_step=flops[(quantizer, codebook_size)]))
        for compiled in (False, True):
            vq, fvq = speed.get(("vq", codebook_size, compiled)), speed.get(("fvq", codebook_size, compiled))
            if vq and fvq:
                allowed = 0.10 if codebook_size <= 16384 else 0.25
                slower = vq / fvq - 1
                rows.append(row("b", f"fvq vs vq {codebook_size} {'compiled' if compiled else 'eager'}",
                                "fvq step slower by", slower, bound=allowed, target=f"<= {allowed:.0%}",
                                ok=slower <= allowed))
    return rows


# ----------------------------------------------------------------------------- c: GPT training step


def gpt_config(size: dict, name: str, smoke: bool):
    from fullvq.generator import FullVQGPTConfig

    shape = TOY_GPTS[name] if smoke else {}
    if smoke:
        return FullVQGPTConfig(codebook_size=size["gpt_codebook"], grid_size=size["grid"], **shape)
    return FullVQGPTConfig.from_size(name, codebook_size=size["gpt_codebook"], grid_size=size["grid"])


def model_flops_per_token(config, matmul_params: int) -> float:
    """Training FLOPs per token, PaLM's convention: 6N for the weights plus 12 L H T for attention."""
    return 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * (config.num_image_tokens + 1)


def matmul_parameters(model) -> int:
    """Parameters that multiply activations (all but the two embedding tables)."""
    skip = {id(model.class_embedding.weight), id(model.model.embed_tokens.weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def gpt_training(device, size, name: str, compiled: bool, smoke: bool) -> tuple[float, float | None, object, int]:
    from accelerate import Accelerator

    from fullvq.generator import FullVQGPT
    from fullvq.precision import allow_tf32

    config = gpt_config(size, name, smoke)
    model = FullVQGPT(config)
    params = matmul_parameters(model)
    if device.type == "cuda":
        allow_tf32(True)  # as the Trainer sets it on CUDA
    if compiled:
        model.compile_blocks()  # as train.compile does
    accelerator = Accelerator(mixed_precision=size["precision"], cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = size["gpt_batch"]
    tokens = torch.randint(0, config.codebook_size, (batch, config.num_image_tokens), device=device)
    labels = torch.randint(0, config.num_classes, (batch,), device=device)

    def step():
        out = model(input_ids=tokens[:, :-1], class_labels=labels, labels=tokens, return_logits=False)
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_memory(device)
    seconds = median_seconds(step, device, repeats=size["steps"], warmup=size["warmup"])
    return seconds, peak_memory_gb(device), config, params


def section_gpt_training(device, size, ceiling, out, smoke) -> list[dict]:
    rows = []
    hopper = device.type == "cuda" and any(name in torch.cuda.get_device_name(device) for name in ("H100", "H200"))
    peak = H200_BF16_DATASHEET_TFLOPS * 1e12 if hopper else ceiling["bf16_flops"]  # else: MFU of the measured GEMM
    for name in size["gpt_sizes"]:
        for compiled in (False, True):
            seconds, memory, config, params = gpt_training(device, size, name, compiled, smoke)
            tokens_per_second = size["gpt_batch"] * config.num_image_tokens / seconds
            mfu = tokens_per_second * model_flops_per_token(config, params) / peak
            case = f"GPT-{name} {'compiled' if compiled else 'eager'}"
            rows.append(row("c", case, "tokens/s", tokens_per_second,
                            bound=peak / model_flops_per_token(config, params), target="bound = 100 % MFU",
                            peak_memory_gb=memory))
            rows.append(row("c", case, "MFU", mfu, bound=1.0, target=">= 40 % (GPT-L)",
                            ok=(mfu >= 0.40) if name == "L" and not smoke else None,
                            mfu_of_measured_gemm=tokens_per_second * model_flops_per_token(config, params)
                            / ceiling["bf16_flops"]))
    return rows


# ----------------------------------------------------------------------------- d: sampling


def sampling_bounds(model, rows: int, num_tokens: int, ceiling: dict) -> tuple[float, float]:
    """Seconds per image batch: (weight reads alone, roofline of weights + KV-cache reads and FLOPs)."""
    config = model.config
    element = next(model.parameters()).element_size()
    params = matmul_parameters(model)
    weight_seconds = num_tokens * params * element / ceiling["bandwidth"]
    average_context = (num_tokens + 1) / 2
    kv_bytes = rows * config.num_hidden_layers * 2 * average_context * config.hidden_size * element
    flops = rows * (2 * params + 4 * config.num_hidden_layers * config.hidden_size * average_context)
    per_token = max((params * element + kv_bytes) / ceiling["bandwidth"], flops / ceiling["bf16_flops"])
    return weight_seconds, num_tokens * per_token


def section_sampling(device, size, ceiling, out, smoke) -> list[dict]:
    from fullvq.generator import FullVQGPT, sample
    from fullvq.generator.sampling import release_decoder

    rows = []
    for name in size["gpt_sizes"]:
        model = FullVQGPT(gpt_config(size, name, smoke)).to(device, torch.bfloat16).eval()
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)
        for batch in size["sampling_batches"]:
            weight_seconds, roofline_seconds = sampling_bounds(model, 2 * batch, model.config.num_image_tokens, ceiling)
            for mode, static in (("dynamic cache", False), ("static cache + compiled", True)):
                labels = torch.arange(batch) % model.config.num_classes
                run = functools.partial(sample, model, labels, guidance_scale=2.0, top_k=0, static_cache=static,
                                        compile_decode=static, generator=torch.Generator().manual_seed(0))
                reset_memory(device)
                seconds = median_seconds(run, device, repeats=2 if not smoke else 1, warmup=1)
                images_per_second = batch / seconds
                target, ok = "", None
                if name == "L" and static and not smoke:
                    target, ok = ">= 100 (2x LlamaGen-L's 47.1 on an A100)", images_per_second >= 100
                rows.append(row("d", f"GPT-{name} batch {batch} {mode}", "images/s", images_per_second,
                                bound=batch / weight_seconds, target=target, ok=ok,
                                roofline_bound=batch / roofline_seconds, peak_memory_gb=peak_memory_gb(device)))
            release_decoder(model)
    return rows


# ----------------------------------------------------------------------------- e: nearest-code search


def section_search(device, size, ceiling, out, smoke) -> list[dict]:
    from fullvq.tokenizer.quantizers import nearest_code

    rows = []
    for tokens, codes, dim in size["search"]:
        z = torch.randn(tokens, dim, device=device)
        codebook = torch.randn(codes, dim, device=device)
        bound = 2 * tokens * codes * dim / ceiling["fp32_flops"]
        for blocks in (None, 2**24):
            search = functools.partial(nearest_code, z, codebook, max_block_elements=blocks)
            seconds = median_seconds(search, device, repeats=5)
            label = "default blocks" if blocks is None else f"{blocks} element blocks"
            ok = seconds <= 1.2 * bound if dim >= 64 and blocks is None and not smoke else None
            rows.append(row("e", f"{tokens} tokens x {codes} codes x {dim} ({label})", "ms", seconds * 1e3,
                            bound=bound * 1e3, target="<= 1.2x the IEEE-fp32 GEMM bound" if ok is not None else "",
                            ok=ok, ratio=seconds / bound))
    return rows


# ----------------------------------------------------------------------------- f: Inception


def section_inception(device, size, ceiling, out, smoke) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from fullvq.eval import InceptionExtractor
    from fullvq.eval.inception import random_inception_weights

    weights = os.environ.get("FULLVQ_INCEPTION_WEIGHTS") or random_inception_weights(Path(tempfile.mkdtemp()) / "i.pth")
    extractor = InceptionExtractor(weights, device)
    batch = size["inception_batch"]
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        extractor(images[:1])
    seconds = median_seconds(lambda: extractor(images), device, repeats=size["inception_batches"])
    bound = batch / (batch * counter.get_total_flops() / ceiling["fp32_flops"])
    return [row("f", f"InceptionV3 pool3, batch {batch}, uint8 256 px", "images/s", batch / seconds, bound=bound,
                target="FLOP bound at IEEE-fp32 rate (FID runs without TF32)")]


SECTIONS = {"a": section_tests, "b": section_tokenizer, "c": section_gpt_training, "d": section_sampling,
            "e": section_search, "f": section_inception}
ORDER = ("a", "e", "f", "d", "c", "b")
RESULTS = REPO / "benchmarks" / "results" / "gpu"


# ----------------------------------------------------------------------------- report


def _figure(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(results: dict) -> str:
    c = results["ceilings"]
    lines = [f"# GPU suite on {results['device_name']}{' (smoke: CPU, toy sizes)' if results['smoke'] else ''}", "",
             f"Measured ceilings: bf16 GEMM {c['bf16_flops'] / 1e12:.1f} TFLOP/s, IEEE-fp32 GEMM "
             f"{c['fp32_flops'] / 1e12:.1f} TFLOP/s, copy {c['bandwidth'] / 1e9:.0f} GB/s. "
             f"{results['seconds']:.0f} s in all.", "",
             "| item | case | figure | value | bound | target | ok | notes |", "|---|---|---|---:|---:|---|---|---|"]
    for r in results["rows"]:
        shown = ("item", "case", "figure", "value", "bound", "target", "ok")
        notes = "; ".join(f"{k} {_figure(v)}" for k, v in r.items() if k not in shown and v not in (None, []))
        ok = {True: "yes", False: "**no**", None: ""}[r["ok"]]
        lines.append(f"| {r['item']} | {r['case']} | {r['figure']} | {_figure(r['value'])} | {_figure(r['bound'])} | "
                     f"{r['target']} | {ok} | {notes} |")
    for item in results["skipped"]:
        lines.append(f"| {item} | (skipped: time budget) | | | | | | |")
    return "\n".join(lines) + "\n"


def run(items: list[str], smoke: bool, out: Path, budget_minutes: float) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    size = SIZES["smoke" if smoke else "full"]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ceiling = ceilings(device, size)
    results = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or "CPU", "smoke": smoke, "torch": torch.__version__,
               "ceilings": ceiling, "rows": [], "skipped": [], "errors": {}, "item_seconds": {}}
    sections = dict(SECTIONS)
    if smoke and "a" in items:  # the CPU items time nothing real: the test layer runs beside them, and is read last
        sections["a"] = functools.partial(section_tests, process=start_tests(out, smoke))
        items = [item for item in items if item != "a"] + ["a"]
    for item in items:
        if time.perf_counter() - start > budget_minutes * 60:
            results["skipped"].append(item)
            continue
        print(f"[gpu suite] item {item} ({time.perf_counter() - start:.0f} s in)", flush=True)
        item_start = time.perf_counter()
        try:
            results["rows"].extend(sections[item](device, size, ceiling, out, smoke))
        except Exception as error:  # one broken item must not cost the others' figures
            traceback.print_exc()
            results["errors"][item] = f"{type(error).__name__}: {error}"[:500]
            results["rows"].append(row(item, "(failed)", "error", None, ok=False, error=results["errors"][item]))
        results["item_seconds"][item] = round(time.perf_counter() - item_start, 1)
        results["seconds"] = time.perf_counter() - start
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))  # what finished so far
        (out / "results.md").write_text(markdown(results))
    results["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    return results


@contextlib.contextmanager
def _smoke_compile():
    """On the CPU, inductor's code generation takes minutes: the smoke run compiles with aot_eager (the
    same graph capture, no generated kernels), so it checks that every compiled path traces."""
    original = torch.compile

    def aot_eager(model=None, **options):
        options.pop("mode", None)
        options["backend"] = "aot_eager"
        return original(model, **options) if model is not None else functools.partial(original, **options)

    torch.compile = aot_eager
    try:
        yield
    finally:
        torch.compile = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the whole suite on the CPU at toy sizes")
    parser.add_argument("--only", default=",".join(ORDER),
                        help=f"comma-separated items to run, in this order (default: all, {','.join(ORDER)}: "
                        "quick ones first, so a tight budget drops the slow compiles)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the results (default: benchmarks/results/gpu; --smoke: a temporary one)")
    parser.add_argument("--budget-minutes", type=float, default=7.5,
                        help="start no item after this many minutes (default 7.5: the suite must fit 8)")
    args = parser.parse_args(argv)
    items = [item.strip() for item in args.only.split(",") if item.strip()]
    unknown = sorted(set(items) - set(SECTIONS))
    if unknown:
        parser.error(f"--only names unknown items {unknown}; choose from {','.join(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run on one, or try the suite on the CPU with --smoke")
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-suite-smoke-")) if args.smoke else RESULTS)
    with _smoke_compile() if args.smoke else contextlib.nullcontext():
        results = run(items, args.smoke, out, args.budget_minutes)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    print(markdown(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
