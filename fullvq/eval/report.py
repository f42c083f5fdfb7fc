"""JSON reports of evaluation jobs: written atomically, and rewritten as failed when a job crashes."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from fullvq.io import hold_folder, write_text


@contextlib.contextmanager
def running_report(path: str | os.PathLike, task: str, is_main_process: bool = True, **fields):
    """The report of an evaluation job, for the length of the ``with`` block; yields it as a dict.

    The main process holds the lock of the report's folder (one evaluation writes a folder at a time; a
    second is refused naming the first's PID), writes the report marked running (``"complete": False``)
    at once, so a crashed or killed job never leaves an older complete report behind, and rewrites it as
    failed (with the error) if the block raises.
    """
    path = Path(path)
    lock = hold_folder(path.parent, f"fullvq eval ({task})") if is_main_process else contextlib.nullcontext()
    with lock:
        report = {"task": task, "complete": False, "status": "running", **fields}
        if is_main_process:
            write_report(path, report)
        try:
            yield report
        except BaseException as error:
            if is_main_process:
                report.update(complete=False, status="failed", error=f"{type(error).__name__}: {error}")
                write_report(path, report)
            raise


def name_of(thing) -> str:
    """How a report names an input: a path as given, an object by its class."""
    return str(thing) if isinstance(thing, (str, os.PathLike)) else type(thing).__name__


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Write a JSON report atomically (a reader never sees half a file)."""
    return write_text(path, json.dumps(report, indent=2, default=str) + "\n")


__all__ = ["running_report", "name_of", "write_report"]
