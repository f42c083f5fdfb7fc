"""The one training loop both stages use: accelerate, schedules, checkpoints, resume, EMA, logs.

A stage (``fullvq.jobs.train_tokenizer``, ``fullvq.jobs.generator_stages``) supplies a ``TrainingStage``:
its models and optimizers, one training step, its periodic figures and pictures, and how to save
the final model. Everything else lives here, once:

* ``accelerate`` for devices, DDP, mixed precision, gradient accumulation and trackers;
* learning-rate schedules, FVQ's annealing among them, one schedule for every optimizer, and
  deterministic, sharded, resumable data order (both in ``fullvq.jobs.schedule``);
* atomic ``checkpoint-{step}`` folders with a manifest and a total limit, ``resume=latest`` taking
  the newest complete one (which folders count and are complete: ``fullvq.jobs.checkpoints``);
* one run per output folder (its lock, ``fullvq.io.hold_folder``), and nothing written before the
  folder and the checkpoint to resume are known to be right;
* EMA of the model weights (``fullvq.jobs.ema``), saved as safetensors;
* the GPU switches, torch.compile and FSDP's rules (``fullvq.jobs.devices``);
* a tqdm bar on the main process, ``metrics.jsonl`` beside the tracker's logs (each step once). The
  step reads nothing back from the GPU: logs stay on the device and are read, with the non-finite
  check (decided over all processes), at log and checkpoint steps.

(About 490 lines, over the house's 450: the loop and how it saves and resumes read best in one file;
what each step sees is apart, in ``fullvq.jobs.schedule``, the checkpoint folders' rules in
``fullvq.jobs.checkpoints``, the device rules in ``fullvq.jobs.devices``.)
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from torch import nn
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from ..config import above, at_least, check_fields, dump_config, to_dict, within
from ..distributed import cpu_ranks
from ..io import disk_full_as_error, hold_folder, publish, remove, staging_path, write_text
from .checkpoints import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    check_checkpoint_files,
    check_output_folder,
    latest_checkpoint,
    no_fit,
    prune_checkpoints,
    trim_metrics,
    write_manifest,
)
from .devices import (
    check_sharding,
    configure_backends,
    full_copy,
    is_sharded,
    parameter_checksum,
    prepare_models,
)
from .ema import ExponentialMovingAverage
from .schedule import RunBatches, lr_multiplier, run_length


@dataclass
class TrainConfig:
    """What every training run shares. ``batch_size`` is per process; the global batch is
    ``batch_size x processes x gradient_accumulation_steps``. Each number's allowed values are part of
    its type (``fullvq.config.Range``), checked for recipes and Python alike."""

    output_dir: str = "runs/train"
    seed: int = 0
    batch_size: Annotated[int, at_least(1)] = 16
    gradient_accumulation_steps: Annotated[int, at_least(1)] = 1
    max_steps: Annotated[int, at_least(1)] | None = None  # optimiser steps; else `epochs` decides
    epochs: Annotated[float, above(0)] | None = None
    learning_rate: Annotated[float, above(0)] = 1e-4
    scale_lr: bool = True  # peak lr = learning_rate x global batch / reference_batch_size
    reference_batch_size: Annotated[int, at_least(1)] = 128
    lr_schedule: Literal["annealing", "cosine", "constant"] = "annealing"
    warmup_epochs: Annotated[float, at_least(0)] = 4.0
    warmup_steps: Annotated[int, at_least(0)] | None = None  # overrides warmup_epochs
    hold_fraction: Annotated[float, within(0, 1)] = 0.3  # annealing: share of the post-warm-up steps held at the peak
    warmup_start_ratio: Annotated[float, at_least(0)] = 0.005
    final_lr_ratio: Annotated[float, at_least(0)] = 0.01
    adam_beta1: Annotated[float, within(0, 1, high_open=True)] = 0.9
    adam_beta2: Annotated[float, within(0, 1, high_open=True)] = 0.95
    weight_decay: Annotated[float, at_least(0)] = 0.0
    max_grad_norm: Annotated[float, at_least(0, "0 or null turns clipping off")] | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema_decay: Annotated[float, within(0, 1, high_open=True, hint="null turns EMA off")] | None = None
    num_workers: Annotated[int, at_least(0)] = 2
    log_every: Annotated[int, at_least(1)] = 50
    sample_every: Annotated[int, at_least(1)] = 500
    checkpoint_every: Annotated[int, at_least(1)] = 1000
    checkpoints_total_limit: Annotated[int, at_least(1, "null keeps every checkpoint")] | None = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    project_name: str = "fullvq"
    # Speed (see fullvq.jobs.devices); None = on for CUDA, off elsewhere.
    compile: bool = False  # torch.compile: the tokenizer's encoder / decoder, each GPT block, the discriminator
    allow_tf32: bool = True  # CUDA: TF32 matmuls and convolutions (never in the nearest-code search)
    fused_adam: bool | None = None  # fused AdamW (default: on CUDA, except under FSDP)
    channels_last: bool | None = None  # conv models in channels_last memory format
    pin_memory: bool | None = None  # page-locked batches for asynchronous host-to-device copies
    persistent_workers: bool = True  # keep DataLoader workers alive across epochs (num_workers > 0)

    def __post_init__(self):
        check_fields(self)
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")


# ----------------------------------------------------------------------------- stage interface


class TrainingStage:
    """What a stage supplies to ``Trainer``. Subclasses fill ``models`` and ``optimizers`` (same
    keys; ``"model"`` is the one EMA follows and the final save writes) in ``__init__``."""

    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    trainer: Trainer

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """One (micro-)batch: forward, then ``trainer.optimizer_step(name, loss)`` for each optimiser.
        Returns detached scalar logs, ``"loss"`` among them."""
        raise NotImplementedError

    def after_optimizer_step(self, name: str) -> None:
        """Called by ``Trainer.optimizer_step`` right after optimiser ``name`` really stepped (not on
        the micro-batches of gradient accumulation, nor on a step skipped for fp16 overflow)."""

    def periodic_logs(self, step: int) -> dict[str, float]:
        """Extra figures at each log step (called on every process; may all-reduce)."""
        return {}

    def write_samples(self, step: int, folder: Path, model: nn.Module) -> None:
        """Pictures at each sample step (main process only); ``model`` is the plain (unwrapped, or under
        FSDP an unsharded CPU copy of the) model to run."""

    def save_model(self, model: nn.Module, folder: Path) -> None:
        """Write the final (unwrapped, EMA-averaged if enabled) model."""
        model.save_pretrained(folder)


class Trainer:
    """Runs a stage over ``dataset`` as ``config`` says.

    ``make_stage(trainer) -> TrainingStage`` builds the stage's models once the accelerator exists
    and the seed is set (so initial weights depend only on the seed); ``full_config`` is written
    beside every checkpoint and the final model.
    """

    def __init__(self, config: TrainConfig, make_stage, dataset, full_config=None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config = config
        self.full_config = full_config if full_config is not None else config
        self.output_dir = Path(config.output_dir)
        log_with = None
        if config.tracker == "tensorboard":
            log_with = "tensorboard"
        elif config.tracker == "wandb":
            import importlib.util

            log_with = "wandb" if importlib.util.find_spec("wandb") else "tensorboard"
        self.accelerator = Accelerator(
            cpu=cpu_ranks(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
        )
        self._lock = None
        try:
            self._setup(make_stage, dataset)
        except BaseException:
            self._release()
            raise

    def _setup(self, make_stage, dataset) -> None:
        from accelerate.utils import set_seed

        config = self.config
        if self.is_main:  # one run per folder: held until fit() ends (or this process dies)
            self._lock = hold_folder(self.output_dir, "fullvq training run", log=self.accelerator.print)
        self.resume_from = check_output_folder(self.output_dir, config.resume, ema=bool(config.ema_decay),
                                               log=self.accelerator.print)
        configure_backends(config, self.accelerator.device)
        set_seed(config.seed)
        self.dataset = dataset
        self.streaming = isinstance(dataset, IterableDataset)
        world = self.accelerator.num_processes
        size = None if self.streaming else len(dataset)
        self.steps_per_epoch, self.total_steps, self.warmup_steps = run_length(config, size, world)
        self.global_batch = config.batch_size * world * config.gradient_accumulation_steps
        scale = self.global_batch / config.reference_batch_size if config.scale_lr else 1.0
        self.peak_lr = config.learning_rate * scale
        self.step = 0
        self.ema: ExponentialMovingAverage | None = None
        self._copies: dict = {}  # the unsharded model copy under FSDP (see devices.full_copy)
        self.stage = make_stage(self)
        self.stage.trainer = self

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- helpers for stages
    def lr_factor(self, step: int) -> float:
        c = self.config
        return lr_multiplier(step, self.total_steps, self.warmup_steps, c.lr_schedule, hold_fraction=c.hold_fraction,
                             warmup_start_ratio=c.warmup_start_ratio, final_lr_ratio=c.final_lr_ratio)

    def adam(self, params, **kwargs) -> torch.optim.Optimizer:
        """AdamW at the peak lr with the config's betas and weight decay (the usual optimiser)."""
        c = self.config
        fused = c.fused_adam if c.fused_adam is not None else (
            self.accelerator.device.type == "cuda" and not is_sharded(self.accelerator))
        options = dict(lr=self.peak_lr, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay,
                       fused=fused or None)
        options.update(kwargs)
        return torch.optim.AdamW(params, **options)

    def clip(self, module: nn.Module) -> torch.Tensor | None:
        if self.config.max_grad_norm and self.accelerator.sync_gradients:
            return self.accelerator.clip_grad_norm_(module.parameters(), self.config.max_grad_norm)
        return None

    def optimizer_step(self, name: str, loss: torch.Tensor) -> torch.Tensor | None:
        """Backward ``loss``, clip, step and zero the optimiser of the stage's model ``name``, then the
        stage's ``after_optimizer_step(name)`` if the step was taken. Returns the gradient norm before
        clipping (None when not clipped)."""
        optimizer = self.stage.optimizers[name]
        self.accelerator.backward(loss)
        grad_norm = self.clip(self.stage.models[name])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # accelerate skips the step between accumulation boundaries and on fp16 overflow.
        if self.accelerator.sync_gradients and not getattr(optimizer, "step_was_skipped", False):
            self.stage.after_optimizer_step(name)
        return grad_norm

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- checkpoints
    def _ema_names_and_parameters(self) -> tuple[list[str], list[nn.Parameter]]:
        named = list(self.accelerator.unwrap_model(self.stage.models["model"]).named_parameters())
        return [n for n, _ in named], [p for _, p in named]

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-{step}`` atomically: into a temporary folder, its manifest last, then one
        rename. A failed save (a full disk among others) removes the temporary folder and raises."""
        acc = self.accelerator
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        tmp = staging_path(final)  # one name on every process: they all save into it
        if self.is_main:
            remove(tmp)
        acc.wait_for_everyone()
        try:
            with disk_full_as_error(final):
                acc.save_state(str(tmp), safe_serialization=True)
                names = self._ema_names_and_parameters()[0]
                ema = self.ema.full_state(names) if self.ema is not None else None  # under FSDP: gathers
                acc.wait_for_everyone()  # every process's files are in before the manifest lists them
                if self.is_main:
                    self._write_checkpoint_extras(tmp, ema)
                    write_manifest(tmp, self.step)
                    publish(tmp, final)
                    prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit)
        except BaseException:
            if self.is_main:
                remove(tmp)
            raise
        acc.wait_for_everyone()
        return final

    def _write_checkpoint_extras(self, folder: Path, ema: dict[str, torch.Tensor] | None) -> None:
        """EMA weights (``ema``: their full tensors), the trainer state and the resolved config (main process)."""
        if ema is not None:
            from safetensors.torch import save_file

            save_file(ema, folder / "ema.safetensors")
        state = {"step": self.step, "total_steps": self.total_steps,
                 "ema_optimization_step": self.ema.optimization_step if self.ema is not None else None}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        dump_config(self.full_config, folder / "config.yaml")

    def _load_checkpoint(self, folder: Path) -> None:
        """Restore ``folder``; a CheckpointError naming it (and the settings changed since) if it cannot."""
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        check_checkpoint_files(folder, tuple(TORCH_SAFE_GLOBALS))
        try:
            self.accelerator.load_state(str(folder))
        except Exception as error:
            raise CheckpointError(f"cannot resume from {folder}: {no_fit(error, folder, to_dict(self.full_config))}") \
                from None
        state = json.loads((folder / "trainer_state.json").read_text())
        self.step = int(state["step"])
        if self.step > self.total_steps:  # else model/ would be rewritten from an older or other run's weights
            raise CheckpointError(f"cannot resume from {folder}: it is at step {self.step}, past this run's "
                                  f"{self.total_steps} steps; raise train.max_steps (or train.epochs) to train on, "
                                  f"or use the finished model in {self.output_dir / 'model'} as it is")
        if self.ema is not None:
            from safetensors.torch import load_file

            self.ema.load_full_state(load_file(folder / "ema.safetensors"), self._ema_names_and_parameters()[0])
            self.ema.optimization_step = int(state["ema_optimization_step"])

    # -- the loop
    def prepare(self) -> None:
        """Wrap the stage's models and optimisers for the devices (DDP or FSDP, mixed precision, compile),
        set up EMA and restore the checkpoint to resume from. ``fit`` calls it; benchmarks call it alone."""
        from accelerate.utils import set_seed

        acc, stage = self.accelerator, self.stage
        check_sharding(acc, stage.models)
        prepare_models(stage.models, self.config, acc.device)
        names = list(stage.models)
        # One call: under FSDP2 accelerate remaps the optimisers onto the sharded parameters.
        prepared = acc.prepare(*[stage.models[n] for n in names], *[stage.optimizers[n] for n in names])
        prepared = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
        for i, name in enumerate(names):
            stage.models[name] = prepared[i]
            stage.optimizers[name] = prepared[len(names) + i]
        decay = self.config.ema_decay
        self.ema = ExponentialMovingAverage(self._ema_names_and_parameters()[1], decay) if decay else None
        # Models are built and synced: from here each process draws its own noise, dropout and label
        # drops (a resumed run gets every process's saved RNG state back below).
        set_seed(self.config.seed + acc.process_index)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
            acc.print(f"resumed from {self.resume_from} at step {self.step}")

    def plain_model(self) -> nn.Module | None:
        """The model to sample from or save on the main process: the unwrapped one, or under FSDP an
        unsharded copy (``None`` on the other processes). Every process must call it."""
        model = self.stage.models["model"]
        if is_sharded(self.accelerator):
            return full_copy(self.accelerator, model, self._copies)
        return self.accelerator.unwrap_model(model)

    def _check_finite(self, first_bad: torch.Tensor, bad_loss: torch.Tensor) -> None:
        """Raise on every process if any process saw a non-finite loss (decided together, so none is left
        waiting in a collective); ``first_bad`` is this process's first such step (-1 if none), and
        ``bad_loss`` the loss it saw there."""
        step = int(self.accelerator.reduce(first_bad.reshape(1), "max"))  # one read, at log steps only
        if step >= 0:
            value = f"{float(bad_loss)}" if int(first_bad) == step else "on another process"
            last = latest_checkpoint(self.output_dir)
            raise FloatingPointError(
                f"non-finite loss ({value}) at step {step}; stopped without saving. The last good checkpoint "
                f"is {last or 'none'}: resume from it (train.resume=latest) with a lower learning_rate or "
                "max_grad_norm, or mixed_precision=no"
            )

    def _log(self, sums: dict[str, torch.Tensor], count: int, bar) -> None:
        acc, c = self.accelerator, self.config
        keys = list(sums)
        means = acc.reduce(torch.stack([sums[k].float() for k in keys]) / count, "mean").tolist()
        record = dict(zip(keys, means, strict=True))
        record.update(self.stage.periodic_logs(self.step))
        record["lr"] = self.peak_lr * self.lr_factor(self.step - 1)
        record["step"] = self.step
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if c.tracker != "none":
            acc.log(record, step=self.step)
        if self.is_main:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self) -> dict:
        """Train to ``total_steps`` and save the final model; returns a summary (also written as JSON).
        The output folder's lock is released when it returns or raises."""
        try:
            return self._fit()
        finally:
            self._release()

    def _fit(self) -> dict:
        c, acc, stage = self.config, self.accelerator, self.stage
        self.prepare()  # a checkpoint that cannot be resumed stops the run here, before anything is written
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.full_config, self.output_dir / "config.yaml")
            trim_metrics(self.output_dir / "metrics.jsonl", self.step)  # a resumed run logs each step once
        if acc.is_main_process and c.tracker != "none":
            acc.init_trackers(c.project_name, config=_flatten(to_dict(self.full_config)))

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not acc.is_local_main_process,
                   desc=f"training ({acc.num_processes} process{'es' if acc.num_processes > 1 else ''})")
        sums: dict[str, torch.Tensor] = {}
        count = 0
        first_bad = torch.full((), -1, dtype=torch.long, device=acc.device)  # no read per step: see _check_finite
        bad_loss = torch.zeros((), device=acc.device)
        start, start_step = time.perf_counter(), self.step
        models = list(stage.models.values())
        batches = RunBatches(self.dataset, c, acc, self.steps_per_epoch).from_step(self.step)
        while self.step < self.total_steps:
            self._set_lr(self.step)
            for _ in range(c.gradient_accumulation_steps):
                batch = next(batches)
                with acc.accumulate(*models):
                    logs = stage.training_step(batch, self.step)
            loss = logs["loss"].to(acc.device)
            now_bad = (first_bad < 0) & ~torch.isfinite(loss).all()
            first_bad = torch.where(now_bad, self.step, first_bad)
            bad_loss = torch.where(now_bad, loss.detach().float().reshape(-1)[0], bad_loss)
            self.step += 1
            if self.ema is not None:
                self.ema.step(self._ema_names_and_parameters()[1])
            for key, value in logs.items():  # device adds: read only at the log step
                sums[key] = sums[key] + value.detach() if key in sums else value.detach().float().clone()
            count += 1
            bar.update(1)
            log_now = self.step % c.log_every == 0 or self.step == self.total_steps
            save_now = self.step % c.checkpoint_every == 0 or self.step == self.total_steps
            if log_now or save_now:
                self._check_finite(first_bad, bad_loss)
            if log_now:
                self._log(sums, count, bar)
                sums, count = {}, 0
            if self.step % c.sample_every == 0 or self.step == self.total_steps:
                model = self.plain_model()
                if self.is_main:
                    stage.write_samples(self.step, self.output_dir / "samples", model)
            if save_now:
                self.save_checkpoint()
        bar.close()
        return self._finish(time.perf_counter() - start, self.step - start_step)

    def _set_lr(self, step: int) -> None:
        factor = self.lr_factor(step)
        for optimizer in self.stage.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group.get("peak_lr", self.peak_lr) * factor

    def _finish(self, seconds: float, steps: int) -> dict:
        acc = self.accelerator
        acc.wait_for_everyone()
        checksums = acc.gather(parameter_checksum(acc, self.stage.models["model"])).tolist()
        summary = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "processes": acc.num_processes,
            "global_batch_size": self.global_batch,
            "peak_lr": self.peak_lr,
            "seconds": seconds,
            "images_per_second": steps * self.global_batch / seconds if seconds > 0 else None,
            "parameter_checksums": checksums,
            "model_dir": str(self.output_dir / "model"),
        }
        names, params = self._ema_names_and_parameters()
        ema = self.ema.full_state(names) if self.ema is not None and is_sharded(acc) else None  # gathers
        model = self.plain_model()
        if self.is_main:
            if ema is not None:  # the unsharded copy takes the average
                model.load_state_dict(ema)
            averaged = self.ema.applied_to(params) if self.ema is not None and ema is None else contextlib.nullcontext()
            with averaged, disk_full_as_error(self.output_dir / "model"):
                self.stage.save_model(model, self.output_dir / "model")
            dump_config(self.full_config, self.output_dir / "model" / "train_config.yaml")
            write_text(self.output_dir / "train_summary.json", json.dumps(summary, indent=2))
            acc.print(f"wrote {self.output_dir / 'model'} ({self.step} steps in {seconds:.0f} s)")
        acc.wait_for_everyone()
        acc.end_training()
        return summary


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = str(value)
        elif value is not None:
            flat[name] = value
    return flat


__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainingStage",
    "CHECKPOINT_PREFIX",
    "latest_checkpoint",
]
