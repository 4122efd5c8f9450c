"""Command-line helpers shared by retro-core's and retro-eval's CLIs: one-line argument errors.

``OneLineParser`` raises :class:`UsageError` instead of printing argparse's usage block, so a CLI's
``main`` can report every bad command line as one ``prog: error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse

__all__ = ["OneLineParser", "UsageError", "int_arg", "one_line"]


class UsageError(Exception):
    """A bad command line (argparse's error), reported in one line by the CLI's ``main``."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: ...`` (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def int_arg(low: int, high: int | None = None):
    """argparse type: an integer >= ``low`` (and <= ``high`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected an integer <= {high}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}" if high is None else f"integer in [{low}, {high}]"
    return parse


def one_line(text: str) -> str:
    """A message on one line (whitespace runs, newlines included, become one space), printable
    whatever bytes the user typed."""
    line = " ".join(text.split())
    return line.encode("utf-8", "backslashreplace").decode("utf-8")
