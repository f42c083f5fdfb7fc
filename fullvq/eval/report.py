"""JSON reports of evaluation jobs: written atomically, and rewritten as failed when a job crashes."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from fullvq.io import write_text


@contextlib.contextmanager
def report_failures(path: str | os.PathLike, report: dict, is_main_process: bool = True):
    """Inside the block, an exception rewrites ``report`` as failed (with the error) before it
    propagates, so a crashed job never leaves a report that looks running or complete."""
    try:
        yield
    except BaseException as error:
        if is_main_process:
            report.update(complete=False, status="failed", error=f"{type(error).__name__}: {error}")
            write_report(path, report)
        raise


def start_report(path: str | os.PathLike, task: str, is_main_process: bool = True, **fields) -> dict:
    """A report of ``task`` marked running (``"complete": False``), written at once by the main
    process so a crashed or killed job never leaves an older complete report behind; returns it."""
    report = {"task": task, "complete": False, "status": "running", **fields}
    if is_main_process:
        write_report(path, report)
    return report


def name_of(thing) -> str:
    """How a report names an input: a path as given, an object by its class."""
    return str(thing) if isinstance(thing, (str, os.PathLike)) else type(thing).__name__


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Write a JSON report atomically (a reader never sees half a file)."""
    return write_text(path, json.dumps(report, indent=2, default=str) + "\n")


__all__ = ["start_report", "name_of", "report_failures", "write_report"]
