"""What a number given by a user may be: a ``Range`` says it, checks it and, as an argparse
``type``, parses it. ``fedtwin.schema.RANGES`` gives one to every numeric setting of the run
config; the command line uses them for its own numbers (``--seed``, ``--port``). Kept apart
from the schema so that a command imports it without Hydra.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: ``low`` to ``high``, both included unless
    ``low_open`` or ``high_open``; only whole numbers when ``whole``; also null when
    ``null``; ``each``: a list of one or more such values (``eval.seeds``)."""

    low: float
    high: float
    whole: bool = False
    low_open: bool = False
    high_open: bool = False
    null: bool = False
    each: bool = False

    def admits(self, value: object) -> bool:
        if self.each:
            return isinstance(value, list) and bool(value) and all(map(self._one, value))
        return (self.null and value is None) or self._one(value)

    def _one(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.whole else int | float):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """What to give, as in "must be a whole number from 1 to 10000"."""
        if self.whole:
            what = f"a whole number from {self.low:g} to {self.high:.0f}"
        elif self.high == math.inf:
            what = f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        else:
            what = (
                f"a number in {'(' if self.low_open else '['}{self.low:g}, "
                f"{self.high:g}{')' if self.high_open else ']'}"
            )
        if self.each:
            what = f"a list of one or more values, each {what}"
        return f"must be {what}" + (" or null" if self.null else "")

    def argument(self, text: str) -> int | float:
        """An argparse ``type``: ``text`` as a value in range, else an error saying what to
        give (``--seed -1``: "'-1': must be a whole number from 0 to 4294967295")."""
        try:
            value = int(text) if self.whole else float(text)
        except ValueError:
            value = None
        if not self._one(value):
            raise argparse.ArgumentTypeError(f"{text!r}: {self.describe()}")
        return value


def whole(low: int, high: int, **kw: bool) -> Range:
    """Whole numbers from ``low`` to ``high``."""
    return Range(low, high, whole=True, **kw)


def number(low: float, high: float = math.inf, **kw: bool) -> Range:
    """Finite numbers from ``low`` to ``high`` (``low_open``, ``high_open``: ends excluded)."""
    return Range(low, high, **kw)


SEED = whole(0, 2**32 - 1)  # what numpy and torch accept
