"""Files written whole or not at all, files read without running code, one writer per folder, and
the one offline switch.

Every writer of fullvq goes through ``atomic_file`` / ``atomic_folder`` (or, when several processes
write one folder, ``staging_path`` + ``publish``): the content goes to a ``.tmp-<name>`` sibling
first and is renamed into place once complete, so a killed run never leaves a half-written file
that a rerun would take for a finished one; a full disk is reported as such (``DiskFullError``).
A run holds its output folder's lock (``hold_folder``) for its lifetime, so two runs never write
one folder. Files users hand us are read with ``load_torch_file`` (``weights_only=True``) or
safetensors, never unpickled in full; a path that looks local but is missing is "no such folder"
(``local_folder_or_hub_id``), never a hub or connection error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

OFFLINE_ENVS = ("FULLVQ_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = ("1", "true", "yes", "on")
STAGING_PREFIX = ".tmp-"


def offline() -> bool:
    """True when ``FULLVQ_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1 / true / yes / on: no downloads."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_ENVS)


# ----------------------------------------------------------------------------- local folders or hub ids


def looks_local(name: str | os.PathLike) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``name`` or ``owner/name``):
    absolute, starting with ``.`` or ``~``, with more than one ``/``, existing, or inside an existing folder."""
    text = os.fspath(name)
    expanded = os.path.expanduser(text)
    parent = os.path.dirname(expanded.rstrip("/"))
    return (os.path.isabs(expanded) or text.startswith((".", "~")) or text.replace(os.sep, "/").count("/") > 1
            or os.path.exists(expanded) or bool(parent) and os.path.isdir(parent))


def _in_hub_cache(repo_id: str, cache_dir: str | os.PathLike | None) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    return (folder / "snapshots").is_dir()


def local_folder_or_hub_id(name: str | os.PathLike, what: str, *, hub: bool = True,
                           cache_dir: str | os.PathLike | None = None) -> str:
    """``name`` as a local folder (``~`` expanded) or, when ``hub``, a hub id to fetch.

    Raises ``FileNotFoundError`` saying "no such folder" for a local-looking path that is not a
    folder (or any missing path when ``hub`` is False), and saying offline for a hub id that is
    not in the hub cache (``cache_dir``, default huggingface_hub's) while offline, so neither
    becomes a hub or connection error.
    """
    text = os.fspath(name)
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"no such folder: {what} {text!r} is a file; pass the folder it belongs to")
    if not hub or looks_local(text):
        raise FileNotFoundError(f"no such folder: {what} {text!r} ({os.path.abspath(path)}) does not exist; "
                                "check the path")
    if offline() and not _in_hub_cache(text, cache_dir):
        raise FileNotFoundError(
            f"{what} {text!r} is neither a local folder nor in the hub cache, and fullvq is offline "
            f"({' / '.join(OFFLINE_ENVS)} set), so it cannot be fetched from the hub; pass an existing folder, or "
            "unset offline mode to download it"
        )
    return text


def check_saved_folder(folder: str | os.PathLike, what: str, weights: tuple[str, ...] = ("*.safetensors", "*.bin")
                       ) -> None:
    """Raise ``FileNotFoundError`` unless ``folder`` holds a ``config.json`` and a weights file (one of
    the ``weights`` patterns), as ``save_pretrained`` writes them."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {folder} has no config.json: it is not a folder written by "
                                "save_pretrained")
    if not any(any(folder.glob(pattern)) for pattern in weights):
        raise FileNotFoundError(f"{what} folder {folder} holds config.json but no weights ({', '.join(weights)}): it "
                                "was not saved completely; save it again with save_pretrained")


# ----------------------------------------------------------------------------- one writer per folder

LOCK_FILE = ".fullvq.lock"


class FolderInUseError(RuntimeError):
    """Another live process holds a folder's lock; the message names it."""


class OutputFolderError(OSError):
    """An output folder that cannot be made: a file of that name, no permission, a read-only disk."""


def make_output_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) for a command's output; returns it as a Path. Raises
    ``OutputFolderError`` naming the folder when that path is a file or cannot be created."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"the output {folder} is a file, not a folder; choose a folder for the output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputFolderError(f"cannot create the output folder {folder}: {error.strerror or error}; "
                                "choose a folder you can write to") from error
    return folder


class FolderLock:
    """The exclusive lock on a folder, held until ``release()`` (or the process ends: the kernel drops
    an ``flock`` with its holder, so a killed run never leaves a lock that blocks the next one)."""

    def __init__(self, folder: Path, descriptor: int | None, created: bool):
        self.folder, self.path, self._descriptor, self._created = folder, folder / LOCK_FILE, descriptor, created
        self._owner = os.getpid()  # a forked child (a DataLoader worker) never releases its parent's lock

    def release(self) -> None:
        """Drop the lock and its file (and the folder, if this lock made it and nothing else was written)."""
        if self._descriptor is None or os.getpid() != self._owner:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._descriptor)
        self._descriptor = None
        if self._created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only an empty folder goes

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()


def _read_holder(descriptor: int) -> dict:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(descriptor, 0, os.SEEK_SET)
        return json.loads(os.read(descriptor, 1 << 16).decode() or "{}")
    return {}


def hold_folder(folder: str | os.PathLike, what: str = "run", log=None) -> FolderLock:
    """Take the exclusive lock of ``folder`` (created if missing) for a run writing into it.

    The lock file ``.fullvq.lock`` records the holder's PID, host, start time and command. A folder
    another live process holds raises ``FolderInUseError`` naming that process; a lock file left by a
    process that died is taken over, saying so through ``log`` (default: stderr).
    """
    import fcntl

    folder = Path(folder)
    created = not folder.exists()
    make_output_folder(folder)
    path = folder / LOCK_FILE
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise FolderInUseError(
                f"{folder} is in use: PID {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"({holder.get('what', 'a run')}, since {holder.get('started', '?')}) holds its lock {path}; wait for "
                "it to finish or stop that process, or choose another folder (nothing here was touched)"
            ) from None
        except OSError as error:  # a filesystem without locks: say so, and go on unguarded
            os.close(descriptor)
            (log or (lambda text: print(text, file=sys.stderr)))(
                f"warning: cannot lock {folder} ({error.strerror}); nothing stops a second run writing into it")
            return FolderLock(folder, None, created)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                break  # else the last holder removed the file between our open and our lock: open it again
        os.close(descriptor)
    previous = _read_holder(descriptor)
    if previous.get("pid") is not None:
        message = (f"took over the lock {path} of PID {previous['pid']} on {previous.get('host', '?')} "
                   f"({previous.get('what', 'a run')}), which is no longer running")
        (log or (lambda text: print(text, file=sys.stderr)))(message)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode(), 0)
    return FolderLock(folder, descriptor, created)


# ----------------------------------------------------------------------------- full disks


class DiskFullError(OSError):
    """A write failed because its disk (or quota) is full; the message names the path."""


# What the writers we use say when the disk fills: the OS, torch's zip writer (no errno) and safetensors.
_DISK_FULL_SIGNS = ("No space left on device", "Disk quota exceeded", "unexpected pos", "file write failed",
                    "StorageFull")


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(sign in str(error) for sign in _DISK_FULL_SIGNS)


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            free = shutil.disk_usage(folder).free
            return f"{free / 2**30:.2f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"
    return "unknown"


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn any error of a full disk while writing ``path`` into a ``DiskFullError`` naming it."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        full = DiskFullError(
            f"the disk is full: writing {path} failed ({first_line}); {_free_space(Path(path))} free there. The "
            "half-written files were removed and nothing finished was touched: free some space (or choose a "
            "folder on another disk) and run the same command again"
        )
        full.errno = errno.ENOSPC
        raise full from None


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
        with disk_full_as_error(path):
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


class UnsafeFileError(ValueError):
    """A file that holds objects other than tensors and plain values: refused, never unpickled."""


class NotACheckpointError(ValueError):
    """A file that is not a ``torch.save`` checkpoint at all, or a truncated one."""


def load_torch_file(path: str | os.PathLike, allowed_globals: tuple = (), *, mmap: bool = False):
    """``torch.load`` on the CPU with ``weights_only=True``: tensors and plain values only, no code
    runs (``allowed_globals`` names extra plain classes a trusted format stores, e.g. argparse's
    Namespace; ``mmap`` maps the tensor data instead of reading it). The one place fullvq calls
    ``torch.load``.

    Raises ``UnsafeFileError`` for a file holding anything else (its payload never runs),
    ``NotACheckpointError`` for a file that is no checkpoint or is truncated, ``FileNotFoundError``.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        text = str(error)
        found = next((line.split("GLOBAL", 1)[1].split(" was not")[0].strip() for line in text.splitlines()
                      if "GLOBAL" in line), None)
        if "Weights only load failed" in text or found:
            raise UnsafeFileError(
                f"{path} holds {found or 'objects'} besides tensors and plain values; fullvq reads files with "
                "torch.load(weights_only=True) and never runs code from them, so it is refused. If you trust "
                "where it came from, re-save its tensors as a plain state dict (or safetensors)"
            ) from None
        raise _not_a_checkpoint(path, error) from None
    except Exception as error:  # torch raises RuntimeError, KeyError, EOFError, ... for non-checkpoints
        raise _not_a_checkpoint(path, error) from None


def _not_a_checkpoint(path: Path, error: BaseException) -> NotACheckpointError:
    first_line = (str(error).strip().splitlines() or [""])[0] or type(error).__name__
    return NotACheckpointError(f"{path} is not a PyTorch checkpoint (a torch.save file) or it is truncated: it "
                               f"cannot be read ({type(error).__name__}: {first_line})")


__all__ = [
    "OFFLINE_ENVS",
    "offline",
    "looks_local",
    "local_folder_or_hub_id",
    "check_saved_folder",
    "LOCK_FILE",
    "FolderInUseError",
    "FolderLock",
    "hold_folder",
    "DiskFullError",
    "is_disk_full",
    "disk_full_as_error",
    "UnsafeFileError",
    "NotACheckpointError",
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
