"""Files written whole or not at all, files read without running code, and the one offline switch.

Every writer of fullvq goes through ``atomic_file`` / ``atomic_folder`` (or, when several processes
write one folder, ``staging_path`` + ``publish``): the content goes to a ``.tmp-<name>`` sibling
first and is renamed into place once complete, so a killed run never leaves a half-written file
that a rerun would take for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

OFFLINE_ENVS = ("FULLVQ_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = ("1", "true", "yes", "on")
STAGING_PREFIX = ".tmp-"


def offline() -> bool:
    """True when ``FULLVQ_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1 / true / yes / on: no downloads."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_ENVS)


# ----------------------------------------------------------------------------- writing


def staging_path(path: str | os.PathLike) -> Path:
    """The sibling ``.tmp-<name>`` a writer fills before ``publish`` renames it to ``path``. The name
    is fixed (not random), so every process of a run agrees on it and a rerun finds a stale one."""
    path = Path(path)
    return path.with_name(STAGING_PREFIX + path.name)


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a folder tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(staging: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the finished ``staging`` file or folder to ``path``. An existing ``path`` is moved
    aside first and deleted only once the new one is in place (a failure puts it back)."""
    staging, path = Path(staging), Path(path)
    if not path.exists():
        os.replace(staging, path)
        return path
    old = path.with_name(f"{STAGING_PREFIX}replaced-{uuid.uuid4().hex[:8]}-{path.name}")
    os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(old, path)
        raise
    remove(old)
    return path


_EXISTS_HINT = "choose another path or pass --overwrite to replace it"


@contextlib.contextmanager
def _staged(path: Path, overwrite: bool, hint: str, folder: bool) -> Iterator[Path]:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; {hint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    remove(staging)  # a stale one from a killed run
    if folder:
        staging.mkdir()
    try:
        yield staging
        publish(staging, path)
    except BaseException:
        remove(staging)
        raise


def atomic_file(path: str | os.PathLike, *, overwrite: bool = True, hint: str = _EXISTS_HINT):
    """Context manager yielding a staging path (same suffix as ``path``) to write; renamed to ``path``
    when the block ends without an error, deleted when it raises. ``overwrite=False`` refuses an
    existing ``path`` before anything is written, with ``hint`` in the message."""
    return _staged(Path(path), overwrite, hint, folder=False)


def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False, hint: str = _EXISTS_HINT):
    """Context manager yielding an empty staging folder to fill; renamed to ``path`` when the block
    ends without an error (replacing an existing ``path`` only with ``overwrite=True``), deleted
    when it raises."""
    return _staged(Path(path), overwrite, hint, folder=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a reader never sees half of it)."""
    with atomic_file(path) as staging:
        staging.write_text(text)
    return Path(path)


# ----------------------------------------------------------------------------- reading


def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over the bytes of ``paths`` in the order given; with ``root``, each file's path
    relative to it is hashed too (so a renamed file changes the digest)."""
    digest = hashlib.sha256()
    for path in paths:
        if root is not None:
            digest.update(str(Path(path).relative_to(root)).encode() + b"\0")
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def find_weights_file(argument: tuple[str, str | os.PathLike | None], env_var: str, cached: Path,
                      fix: str) -> Path | None:
    """The weights file to use: the one named by ``argument`` (its name and value), else by the
    environment variable ``env_var``, else ``cached`` when it exists; None when there is none. A
    named file that does not exist is an error (``fix`` says what to point it at; ``{value}`` in it
    becomes the name), never a silent fall-through to another file."""
    for origin, value in (argument, (env_var, os.environ.get(env_var))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{origin}={str(value)!r} is not a file; {fix.format(value=value)}")
            return path
    return cached if cached.is_file() else None


def load_torch_file(path: str | os.PathLike, allowed_globals: tuple = ()):
    """``torch.load`` on the CPU with ``weights_only=True``: tensors and plain values only, no code
    runs (``allowed_globals`` names extra plain classes a trusted format stores, e.g. argparse's
    Namespace)."""
    import torch

    with torch.serialization.safe_globals(list(allowed_globals)):
        return torch.load(path, map_location="cpu", weights_only=True)


__all__ = [
    "OFFLINE_ENVS",
    "offline",
    "staging_path",
    "publish",
    "remove",
    "atomic_file",
    "atomic_folder",
    "write_text",
    "sha256_files",
    "find_weights_file",
    "load_torch_file",
]
