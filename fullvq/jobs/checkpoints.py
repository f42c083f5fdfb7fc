"""A training run's checkpoint folders: which count, which are complete, which to resume, which to prune.

Only folders named ``checkpoint-<digits>`` are checkpoints; anything else in the output folder
(``checkpoint-old``, ``checkpoint-best``) is the user's and is never read, counted or pruned.

The Trainer writes a checkpoint into a temporary folder and renames it when complete; the last file
it writes is ``fullvq_checkpoint.json``, a manifest of the step and every other file's size. Sizes,
not hashes: the damage seen in practice (a kill or a full disk mid-write, a file deleted to save
space, an interrupted copy) changes or removes files, which sizes catch for free, whereas hashing a
multi-GB checkpoint costs a full read at every save and again at every resume. Beside the sizes,
every check reads each file's own structure cheaply (safetensors header, zip directory, the JSON
state), so a checkpoint written before manifests existed is still checked, and still resumes.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

from ..config import ConfigError, config_changes, read_yaml
from ..io import load_torch_file, write_text

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST_FILE = "fullvq_checkpoint.json"
STATE_FILE = "trainer_state.json"
# What accelerate's save_state always writes (the first model and optimiser), for checkpoints without a manifest.
_EXPECTED = (("model.safetensors", "pytorch_model.bin"), ("optimizer.bin",), (STATE_FILE,))


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the message names the folder and the file."""


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<digits>`` folder name, else None."""
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``output_dir``, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``output_dir`` (None when there is none)."""
    return next((folder for folder in reversed(list_checkpoints(output_dir)) if checkpoint_problem(folder) is None),
                None)


def write_manifest(folder: Path, step: int) -> None:
    """Record every file of the (temporary) checkpoint ``folder`` with its size; written last."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    write_text(folder / MANIFEST_FILE, json.dumps({"format": "fullvq-checkpoint", "version": 1, "step": step,
                                                   "files": files}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, naming the file; None when it is complete."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    if not any(folder.iterdir()):
        return "it is empty"
    manifest = folder / MANIFEST_FILE
    if manifest.is_file():
        try:
            files = {name: int(entry["size"]) for name, entry in json.loads(manifest.read_text())["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{MANIFEST_FILE} is damaged"
    else:  # written before manifests: the files accelerate always writes must be there
        files = {}
        for names in _EXPECTED:
            if not any((folder / name).is_file() for name in names):
                return f"{names[0]} is missing"
    for name, size in files.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if (folder / name).stat().st_size != size:
            return f"{name} has {(folder / name).stat().st_size} bytes, not the {size} written (truncated or changed)"
    for path in sorted(folder.rglob("*")):
        problem = _file_problem(path) if path.is_file() else None
        if problem:
            return f"{path.relative_to(folder)} {problem}"
    return _state_problem(folder)


def _file_problem(path: Path) -> str | None:
    """A cheap look at a file's own structure (no tensor data is read)."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as file:
            head = file.read(8)
            try:
                header = json.loads(file.read(struct.unpack("<Q", head)[0])) if len(head) == 8 else None
                end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                          default=0)
            except (ValueError, KeyError, TypeError, AttributeError, struct.error, OverflowError, MemoryError):
                return "is not a readable safetensors file (damaged header)"
            if 8 + struct.unpack("<Q", head)[0] + end > path.stat().st_size:
                return "is truncated (its header promises more data than the file holds)"
    elif path.suffix in (".bin", ".pkl", ".pt", ".pth"):
        if not zipfile.is_zipfile(path):
            return "is not a readable torch.save file (truncated or damaged)"
    return None


def _state_problem(folder: Path) -> str | None:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        step = state["step"]
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is damaged (not the JSON of a trainer state with its step)"
    expected = checkpoint_step(folder)
    if not isinstance(step, int) or expected is not None and step != expected:
        return f"{STATE_FILE} says step {step!r}, not {expected}"
    return None


def resolve_resume(resume: str | None, output_dir: Path, log=print) -> Path | None:
    """The checkpoint folder ``resume`` names, or a clear error before any work starts.

    ``"latest"`` is the newest complete checkpoint of ``output_dir``; each newer one that is not
    complete is skipped, saying why through ``log``. An explicit folder must be complete.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(
                f"resume=latest but {output_dir} holds no {CHECKPOINT_PREFIX}<step> folder; drop resume to start "
                "afresh or point train.output_dir at the run to continue"
            )
        skipped = []
        for folder in reversed(found):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            skipped.append(f"{folder.name} ({problem})")
            log(f"skipped {folder}: {problem}")
        raise ConfigError(f"resume=latest but no checkpoint in {output_dir} is complete: {'; '.join(skipped)}; "
                          "start afresh in another train.output_dir")
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"resume={resume!r}: no such folder; use resume=latest or a {CHECKPOINT_PREFIX}<step> "
                          "folder of the run")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"resume={resume!r}: {path} cannot be resumed from: {problem}; resume from another "
                              "checkpoint (resume=latest picks the newest complete one)")
    return path


def check_output_folder(output_dir: Path, resume: str | None, *, ema: bool, log=print) -> Path | None:
    """The checkpoint a run into ``output_dir`` resumes from (see ``resolve_resume``); a ConfigError,
    before anything is written, for a folder holding checkpoints or a finished ``model/`` when not
    resuming (a new run would overwrite them), or for a checkpoint without the EMA weights ``ema`` needs."""
    folder = resolve_resume(resume, output_dir, log)
    if folder is None:
        if list_checkpoints(output_dir):
            raise ConfigError(f"{output_dir} already holds checkpoints; continue it with train.resume=latest or "
                              "choose another train.output_dir (nothing there was touched)")
        if (output_dir / "model").exists():
            raise ConfigError(f"{output_dir} holds a finished model (model/), which a new run would overwrite; "
                              "choose another train.output_dir, or move model/ elsewhere first (nothing there was "
                              "touched)")
    elif ema and not (folder / "ema.safetensors").is_file():
        raise CheckpointError(f"{folder} was saved without EMA but train.ema_decay is set; resume with the run's own "
                              f"settings (its config.yaml: {output_dir / 'config.yaml'})")
    return folder


def no_fit(error: BaseException, folder: Path, config: dict) -> str:
    """Why a checkpoint failed to load into this run: the library's first line, and the settings of
    ``config`` (the run's, as a dict) that differ from the ``config.yaml`` saved in ``folder``."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    try:
        saved = read_yaml((folder / "config.yaml").read_text(), str(folder / "config.yaml"))
    except (OSError, ConfigError):
        saved = None
    changes = [f"{key} {old!r} -> {new!r}" for key, old, new in config_changes(saved, config)
               if not key.startswith(("train.resume", "train.max_steps", "train.epochs"))] if saved else []
    since = f"; settings changed since it was saved: {', '.join(changes)}" if changes else ""
    return (f"it does not fit this run ({first_line}){since}; resume with the run's own settings (its "
            "config.yaml)")


def check_checkpoint_files(folder: Path, allowed_globals: tuple = ()) -> None:
    """Every ``torch.save`` file of ``folder`` unpickled with ``weights_only=True`` and memory-mapped (no
    tensor data read): a file holding code, or no checkpoint at all, is a ``CheckpointError`` naming it.
    (accelerate would refuse the first but silently skip a refused random-state file.)"""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".bin", ".pkl", ".pt", ".pth"):
            try:
                load_torch_file(path, allowed_globals, mmap=True)
            except ValueError as error:
                raise CheckpointError(f"cannot resume from {folder}: {error}") from None


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Delete all but the newest ``limit`` checkpoints (None keeps every one)."""
    if not limit:
        return
    for old in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` (and any half-written line) from a ``metrics.jsonl``, so a resumed
    run logs each step once. Rewritten atomically; a missing file is left missing."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a record cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


__all__ = [
    "CHECKPOINT_PREFIX",
    "MANIFEST_FILE",
    "CheckpointError",
    "checkpoint_step",
    "list_checkpoints",
    "latest_checkpoint",
    "write_manifest",
    "checkpoint_problem",
    "check_output_folder",
    "no_fit",
    "check_checkpoint_files",
    "resolve_resume",
    "prune_checkpoints",
    "trim_metrics",
]
