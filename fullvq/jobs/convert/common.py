"""What every converter shares: the key-mapping engine, reading checkpoints, telling families apart.

A converter hands each tensor of the original state dict to a ``KeyMapping``: mapped by name onto
a fullvq weight (``copy``, ``module``, ``put``) or dropped by name because inference does not use it
(``drop``); ``finish`` then checks every name and shape against the fullvq model and lists every
problem at once.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...io import NotACheckpointError, UnsafeFileError, load_torch_file

SOURCES = ("llamagen-vq", "llamagen-gpt", "fvq", "vqgan-lc")
TOKENIZER_SOURCES = ("llamagen-vq", "fvq", "vqgan-lc")

# Where training scripts keep the model's state dict, in the order "auto" tries them: "model" first, as
# LlamaGen's own sampling scripts read it (--weights ema picks the EMA weights).
STATE_DICT_KEYS = ("model", "ema", "module", "state_dict")
# Prefixes added by DDP and torch.compile when a wrapped model's state dict is saved.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the offending keys and the fix."""


@dataclass
class Conversion:
    """A converted model and the account of every original key.

    uses: original key -> how many times it was consumed (mapped or dropped); exactly 1 for every key
        of a successful conversion.
    mapped: fullvq key -> the original key it came from.
    dropped: original key -> why it was not needed.
    notes: what the user should know (assumptions, appended rows).
    """

    model: torch.nn.Module
    uses: Counter
    mapped: dict[str, str]
    dropped: dict[str, str]
    notes: list[str] = field(default_factory=list)


class KeyMapping:
    """Hands out the original tensors by name, each at most once, and collects fullvq's weights."""

    def __init__(self, state: dict[str, torch.Tensor], source: str):
        self.state = state
        self.source = source
        self.uses: Counter = Counter()
        self.target: dict[str, torch.Tensor] = {}
        self.mapped: dict[str, str] = {}
        self.dropped: dict[str, str] = {}
        self.missing: list[str] = []
        self.notes: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.state:
            self.missing.append(key)
            return None
        if self.uses[key]:
            raise RuntimeError(f"converter bug: original key {key} consumed twice")
        self.uses[key] += 1
        return self.state[key]

    def put(self, target: str, tensor: torch.Tensor | None, source: str) -> None:
        if tensor is not None:
            self.target[target] = tensor
            self.mapped[target] = source

    def copy(self, target: str, source: str, transform=None) -> None:
        tensor = self.take(source)
        if tensor is not None and transform is not None:
            tensor = transform(tensor)
        self.put(target, tensor, source)

    def module(self, target: str, source: str, params: tuple[str, ...] = ("weight", "bias"), transform=None) -> None:
        for name in params:
            self.copy(f"{target}.{name}", f"{source}.{name}", transform if name == "weight" else None)

    def drop(self, pattern: str, reason: str) -> None:
        """Drop every not yet consumed key matching the regular expression ``pattern``."""
        for key in self.state:
            if not self.uses[key] and re.fullmatch(pattern, key):
                self.uses[key] += 1
                self.dropped[key] = reason

    def finish(self, model: torch.nn.Module) -> Conversion:
        """Check names and shapes against ``model``, load the weights, or raise listing every problem."""
        expected = model.state_dict()
        unknown = [key for key in self.state if not self.uses[key]]
        unmapped = [key for key in expected if key not in self.target]
        mismatched = [
            f"{self.mapped[key]} {tuple(tensor.shape)} -> {key} {tuple(expected[key].shape)}"
            for key, tensor in self.target.items()
            if key in expected and tuple(tensor.shape) != tuple(expected[key].shape)
        ]
        extra = [key for key in self.target if key not in expected]
        problems = []
        if self.missing:
            problems.append(f"missing keys {listing(self.missing)}")
        if unknown:
            problems.append(f"unknown keys {listing(unknown)}")
        if mismatched:
            problems.append(f"shape mismatches {listing(mismatched)}")
        if extra:  # the original has parts the inferred fullvq model lacks
            problems.append(f"keys with no place in the fullvq model {listing([self.mapped[k] for k in extra])}")
        if unmapped and not self.missing:
            problems.append(f"fullvq weights with no original {listing(unmapped)}")
        if problems:
            raise ConversionError(
                f"this is not a complete {self.source} checkpoint of the expected architecture: "
                + "; ".join(problems)
                + f"; check that --from {self.source} is the right kind and the file is not truncated or edited"
            )
        dtype = next(iter(expected.values())).dtype
        model.load_state_dict({key: tensor.to(dtype) for key, tensor in self.target.items()}, strict=True)
        return Conversion(model.eval(), self.uses, self.mapped, self.dropped, self.notes)


def listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


def load_checkpoint(path: str | Path, weights: str = "auto") -> tuple[dict[str, torch.Tensor], str, str]:
    """Read a ``.pt``/``.pth`` checkpoint with ``weights_only=True`` (no code runs).

    Args:
        weights: which state dict to take: ``"auto"`` (the first of ``model``, ``ema``, ``module``,
            ``state_dict`` present, else the file's dict itself), one of those keys, or ``"root"``.

    Returns:
        ``(state_dict, where, why)`` with DDP / torch.compile prefixes removed; ``where`` names the key
        used and ``why`` says why that one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # Training scripts store their argparse.Namespace beside the weights; it holds plain values.
        obj = load_torch_file(path, allowed_globals=(argparse.Namespace,))
    except (UnsafeFileError, NotACheckpointError) as error:
        raise ConversionError(str(error)) from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    present = [key for key in STATE_DICT_KEYS if isinstance(obj.get(key), dict)]
    if weights == "auto":
        where = present[0] if present else "root"
        why = _choice_reason(where, present)
    elif weights == "root" or isinstance(obj.get(weights), dict):
        where, why = weights, f"as --weights {weights} asks"
    else:
        found = [key for key, value in obj.items() if isinstance(value, dict)]
        raise ConversionError(f"{path} has no state dict under {weights!r}; its dict entries are {found}")
    state = obj if where == "root" else obj[where]
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        hint = (f"; its entries {[k for k in STATE_DICT_KEYS if k in obj] or sorted(map(str, obj))[:8]} "
                "may hold the weights: pass --weights KEY") if where == "root" else ""
        raise ConversionError(f"the state dict in {path} ({where}) has entries that are not tensors: "
                              f"{listing(not_tensors)}{hint}")
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return dict(state), where, why


def _choice_reason(where: str, present: list[str]) -> str:
    """Why ``load_checkpoint`` took ``where`` by itself, for the log."""
    if where == "root":
        return f"the file holds none of {', '.join(STATE_DICT_KEYS)}"
    others = [key for key in present if key != where]
    if where == "model" and "ema" in others:
        return ("the file also holds 'ema'; LlamaGen's own sampling scripts read 'model' "
                "(pass --weights ema for the EMA weights)")
    return f"the first of {', '.join(STATE_DICT_KEYS)} it holds" + (f" (also: {', '.join(others)})" if others else "")


def detect_source(state: dict[str, torch.Tensor]) -> str | None:
    """The checkpoint family a state dict's names belong to: llamagen-vq (also FVQ's VQGAN format),
    llamagen-gpt, vqgan-lc, fullvq, or None."""
    keys = list(state)
    if any(re.fullmatch(r"layers\.\d+\.attention\.wqkv\.weight", key) for key in keys):
        return "llamagen-gpt"
    if any(key.startswith("encoder.conv_blocks.") for key in keys):
        return "llamagen-vq"
    if any(key.startswith("encoder.down.") for key in keys):
        return "vqgan-lc"
    if any(key.startswith("encoder.down_blocks.") for key in keys):
        return "fullvq"
    return None


_FAMILY = {"llamagen-vq": "llamagen-vq", "fvq": "llamagen-vq", "vqgan-lc": "vqgan-lc", "llamagen-gpt": "llamagen-gpt"}


def check_family(state: dict[str, torch.Tensor], source: str) -> None:
    found = detect_source(state)
    if found == _FAMILY[source]:
        return
    if found is None:
        raise ConversionError(
            f"the checkpoint holds none of the keys of a {source} checkpoint (its first keys: "
            f"{listing(list(state), 6)}); check --from and --weights"
        )
    if found == "fullvq":
        raise ConversionError("the checkpoint already uses fullvq's names; load it with FVQModel instead of converting")
    hint = "llamagen-vq or fvq" if found == "llamagen-vq" else found
    raise ConversionError(f"the checkpoint looks like a {found} checkpoint, not {source}; use --from {hint}")


def shape_of(state: dict[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"the {source} checkpoint lacks {key}, which fixes the architecture; "
                              "is the file complete and of that kind?")
    return tuple(state[key].shape)


def indices_of(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers ``i`` of keys ``{prefix}{i}.``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


BRIDGE_PREFIXES = ("quantize.qbridge", "quantize.embedding_monitor")  # the official name, and an older one


def bridge_prefix(state: dict[str, torch.Tensor]) -> str | None:
    """The prefix of an FVQ checkpoint's VQBridge weights, or None when it holds none."""
    return next((p for p in BRIDGE_PREFIXES if any(key.startswith(p + ".") for key in state)), None)


__all__ = [
    "SOURCES",
    "TOKENIZER_SOURCES",
    "BRIDGE_PREFIXES",
    "ConversionError",
    "Conversion",
    "KeyMapping",
    "load_checkpoint",
    "detect_source",
    "check_family",
    "bridge_prefix",
    "shape_of",
    "indices_of",
    "listing",
]
