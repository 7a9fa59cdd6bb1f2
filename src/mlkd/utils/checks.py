"""The rules for the numbers and names mlkd is given, in one place: the Python API checks its arguments with them,
the command line's argparse types (:mod:`mlkd.cli.common`) parse text and then apply the same rules, and the
checkpoint reader checks class names and sizes with them, so a value is accepted or refused alike wherever it
comes in.

A :class:`Rule` says what it expects in words ("an integer >= 1", "a number in [0, 1]"), which both the API's
errors (``"top_k must be an integer >= 1 or None (all), got 2.5 (a float)"``) and argparse's
(``"argument --top-k: expected an integer >= 1, got '0'"``) quote. ``bool`` is not a number here (``True`` as a
count is a mistake, not 1); numpy's integers and floats are numbers.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mlkd.errors import BadInput

MAX_SHOWN = 60  # characters of a refused value quoted in a message (a long string is cut, not printed whole)


def shown(value: Any, typed: bool = True) -> str:
    """How a message quotes a refused value: its repr, cut to :data:`MAX_SHOWN` characters, and with ``typed`` its
    type (``'3' (a str)``, ``True (a bool)``, ``2.5 (a float)`` where an integer was expected). Numpy numbers are
    quoted as Python's (``nan``, not ``np.float64(nan)``)."""
    if _is_number(value):
        value = int(value) if isinstance(value, numbers.Integral) else float(value)
    text = repr(value)
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN - 4] + "...'" if isinstance(value, str) else text[:MAX_SHOWN - 3] + "..."
    kind = type(value).__name__
    return f"{text} ({'an' if kind[:1] in 'aeiou' else 'a'} {kind})" if typed and value is not None else text


def _is_number(value: Any) -> bool:
    """A real number that is not a bool (numpy's bool_ is no ``numbers.Real`` either)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bound(x: float) -> str:
    """A bound as a message writes it: 100000, not 1e+05; 0.5 as 0.5."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Rule:
    """What one value must be: an ``integer`` or a (finite) ``number``, within ``low`` / ``high`` (closed unless
    ``low_open`` / ``high_open``); with ``none`` set, None is accepted too and means ``none`` (e.g. "all")."""

    integer: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: str | None = None

    @property
    def expected(self) -> str:
        """The rule in words, e.g. "an integer >= 1", "a number in (0, 1]", "a finite number > 0"."""
        what = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{what} in {left}{_bound(self.low)}, {_bound(self.high)}{right}"
        else:
            what = what if self.integer else "a finite number"  # one bound says nothing about NaN or inf
            bound = [f"{'>' if self.low_open else '>='} {_bound(self.low)}"] if self.low is not None else []
            bound += [f"{'<' if self.high_open else '<='} {_bound(self.high)}"] if self.high is not None else []
            text = " ".join([what, *bound])
        return text + (f" or None ({self.none})" if self.none else "")

    def ok(self, value: Any) -> bool:
        """Whether ``value`` follows the rule."""
        if value is None:
            return self.none is not None
        if not _is_number(value) or (self.integer and not isinstance(value, numbers.Integral)):
            return False
        try:
            if not self.integer and not math.isfinite(value):
                return False
        except OverflowError:  # an int beyond any float
            return False
        return not ((self.low is not None and (value <= self.low if self.low_open else value < self.low))
                    or (self.high is not None and (value >= self.high if self.high_open else value > self.high)))

    def problem(self, value: Any, name: str) -> str | None:
        """None when ``value`` follows the rule, else the message: ``name``, the value and the rule."""
        if self.ok(value):
            return None
        right_type = _is_number(value) and (not self.integer or isinstance(value, numbers.Integral))
        return f"{name} must be {self.expected}, got {shown(value, typed=not right_type)}"

    def check(self, value: Any, name: str) -> Any:
        """``value`` as a plain int / float (None stays None), or a BadInput with :meth:`problem`'s message."""
        problem = self.problem(value, name)
        if problem:
            raise BadInput(problem)
        return None if value is None else int(value) if self.integer else float(value)


def integer(value: Any, name: str, low: int | None = None, high: int | None = None, *,
            none: str | None = None) -> int | None:
    """``value`` as an int within [low, high] (None too when ``none`` says what it means), else a BadInput."""
    return Rule(True, low, high, none=none).check(value, name)


def number(value: Any, name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> float:
    """``value`` as a finite float within the bounds (open where told), else a BadInput."""
    return Rule(False, low, high, low_open, high_open).check(value, name)


PROBABILITY = Rule(False, 0.0, 1.0)


def probability(value: Any, name: str) -> float:
    """``value`` as a float in [0, 1], else a BadInput."""
    return PROBABILITY.check(value, name)


def class_names_problem(classes: Any, allow_empty: bool = False) -> str | None:
    """What is wrong with ``classes`` as a model's class names (None: nothing). They must be a list (or tuple) of
    distinct non-empty strings: a string would be read as one class per letter, a repeated name would hide all
    but one of its outputs behind one key."""
    if isinstance(classes, str):
        return (f"classes is not a list of names: got the string {shown(classes, typed=False)} (read as "
                f"{len(classes)} one-letter classes)")
    if not isinstance(classes, (list, tuple)):
        return f"classes is not a list of names: got {shown(classes)}"
    if not classes and not allow_empty:
        return "classes is empty; a model needs at least one class"
    for i, name in enumerate(classes):
        if not isinstance(name, str) or not name.strip():
            return f"class {i} is {shown(name, typed=not isinstance(name, str))}, not a name (a non-empty string)"
    repeated = [(name, n) for name, n in Counter(classes).items() if n > 1]
    if repeated:
        listed = ", ".join(f"{name!r} ({n} times)" for name, n in repeated[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        return f"classes repeat names: {listed}{more}; each output needs its own name"
    return None


def class_names(classes: Any, where: str, allow_empty: bool = False) -> list[str]:
    """``classes`` as a list of distinct non-empty names, or a BadInput naming ``where`` and the problem."""
    problem = class_names_problem(classes, allow_empty)
    if problem:
        raise BadInput(f"{where}: {problem}")
    return list(classes)
