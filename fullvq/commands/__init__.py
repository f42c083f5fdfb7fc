"""The command line: one light module per ``fullvq`` command, each a parser in front of a job.

A command module has ``build_parser(prog)`` and ``main(argv, prog)`` and imports nothing heavy
(torch, diffusers, transformers, ...) at its top, so ``fullvq <command> --help`` answers at once;
``main`` parses, then imports the job from ``fullvq.jobs`` and runs it. Errors a user can fix are
reported the one way argparse reports its own: the usage line, ``<prog>: error: <message naming
the fix>`` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..io import DiskFullError, FolderInUseError, OutputFolderError

# What every command reports this way: a full disk, a folder another run holds, an output folder
# that cannot be made (fullvq.io; all light).
COMMON_ERRORS = (DiskFullError, FolderInUseError, OutputFolderError)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None, job: Callable[[argparse.Namespace], int | None],
        errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse ``argv`` and run ``job(args)``; returns the exit status (never raises ``SystemExit``):
    0, argparse's own status for ``--help`` or a bad flag, or 2 for an error of the kinds ``errors``
    (or ``COMMON_ERRORS``)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return int(job(args) or 0)
    except (*errors, *COMMON_ERRORS) as error:
        return fail(_chosen_parser(parser, args), error)


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)parser of the command ``args`` ran, so ``fullvq eval rfid``'s errors show its usage, not
    ``fullvq eval``'s."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _chosen_parser(action.choices[getattr(args, action.dest)], args)
    return parser


class _Renamed(argparse.Action):
    """A value flag with old spellings: each still works for one release, and says so on stderr."""

    def __init__(self, option_strings, dest, deprecated: tuple[str, ...] = (), **kwargs):
        self.deprecated = tuple(deprecated)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            print(f"{parser.prog}: DeprecationWarning: {option_string} is deprecated and will be removed in the next "
                  f"release; use {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(parser, name: str, *deprecated: str, **kwargs) -> argparse.Action:
    """``parser.add_argument(name, ...)`` that also accepts the ``deprecated`` spellings (shown in
    ``--help`` as such), printing a DeprecationWarning to stderr when one is used."""
    if deprecated:
        kwargs["help"] = f"{kwargs.get('help', '')} (old spelling {', '.join(deprecated)}: deprecated)".strip()
    return parser.add_argument(name, *deprecated, action=_Renamed, deprecated=deprecated, **kwargs)


class CommandParser(argparse.ArgumentParser):
    """argparse without prefix matching (``--out`` is not quietly ``--output``: a flag is either
    spelled out or a deprecated spelling that says so); sub-commands' parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for a count or size flag: an int >= ``low``, else argparse's usage error
    (exit status 2, naming the flag) before any work."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def command_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A command's parser; ``description`` (its module docstring) is shown as written."""
    return CommandParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def recipe_parser(prog: str, description: str, recipes: str, example: str) -> argparse.ArgumentParser:
    """The parser of a command that trains from a YAML recipe: ``CONFIG [key=value ...]``."""
    parser = command_parser(prog, description)
    parser.add_argument("config", type=Path, help=f"YAML recipe (see {recipes})")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    return parser


def fail(parser: argparse.ArgumentParser, error: BaseException | str) -> int:
    """Report ``error`` as argparse reports a usage error; returns the exit status 2."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {error}", file=sys.stderr)
    return 2


__all__ = ["run", "fail", "add_renamed", "command_parser", "recipe_parser"]
