"""Self-checking exercises for the course notebooks, one module per chapter.

Each notebook ends with exercises: a cell the reader fills in, then a cell that calls a check from
here, for example `minigpt.exercises.tokenizer.check_merge`. A check tries what the reader wrote (a
function or a value) on cases of its own and returns a `CheckResult`, which a notebook shows as one
line: right, or not yet with a hint. It never shows the expected answer, so running the check
cannot give the exercise away. Worked solutions live in `notebooks/solutions/`, and the tests prove
that every check accepts its solution and rejects typical wrong answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

UNSOLVED_HINT = "the cell above still holds the unsolved template: fill it in, run it, then run this check again."


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one exercise: truthy when right; shown as one line in a notebook."""

    exercise: str
    passed: bool
    hint: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        if self.passed:
            return f"✓ {self.exercise}: right."
        return f"✗ {self.exercise}: not yet. Hint: {self.hint}"


def right(exercise: str) -> CheckResult:
    """A passing verdict."""
    return CheckResult(exercise, True)


def not_yet(exercise: str, hint: str) -> CheckResult:
    """A failing verdict with a hint that points the way without giving the answer."""
    return CheckResult(exercise, False, hint)


def call(exercise: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, CheckResult | None]:
    """Run the reader's `function(*args, **kwargs)`.

    Returns `(value, None)` when it returned something, or `(None, verdict)` with a not-yet verdict
    when it is not callable, returned None (an unfilled template) or raised (the error is named, so
    the reader can find the line). Test the verdict with `is not None`: a not-yet verdict is falsy.
    """
    if not callable(function):
        return None, not_yet(exercise, f"pass the function itself (got a {type(function).__name__}).")
    try:
        value = function(*args, **kwargs)
    except Exception as error:  # the reader's code: any error is a hint, never a crash of the check
        return None, not_yet(exercise, f"your function raised {type(error).__name__}: {error}")
    if value is None:
        return None, not_yet(exercise, UNSOLVED_HINT)
    return value, None


def call_for_tensor(exercise: str, function: Callable[..., Any], *args: Any) -> tuple[torch.Tensor | None, CheckResult | None]:
    """`call`, then insist on a tensor: `(tensor detached from autograd, None)`, or `(None, verdict)`.

    The shape, dtype and values are each exercise's own to check, with hints of its own.
    """
    value, verdict = call(exercise, function, *args)
    if verdict is not None:
        return None, verdict
    if not isinstance(value, torch.Tensor):
        return None, not_yet(exercise, f"return a tensor (got a {type(value).__name__}).")
    return value.detach(), None


def close_to(value: Any, expected: float, rel: float = 1e-6, abs_tol: float = 0.0) -> bool:
    """Whether `value` is a finite real number within `rel` (relative) or `abs_tol` of `expected`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and math.isclose(number, expected, rel_tol=rel, abs_tol=abs_tol)
