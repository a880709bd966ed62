"""Shared test helpers: the worked solutions that live beside the notebooks, and what every exercise check must do."""

import importlib.util
import numbers
from pathlib import Path
from types import ModuleType

SOLUTIONS_DIR = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"


def load_solutions(chapter: str) -> ModuleType:
    """Import `notebooks/solutions/<chapter>.py` by path (it is not a package module)."""
    path = SOLUTIONS_DIR / f"{chapter}.py"
    spec = importlib.util.spec_from_file_location(f"solutions_{chapter}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unsolved(*args):
    """A notebook's unsolved exercise template: a body of `...`, so it returns None."""
    return None


def answer_texts(answer) -> set[str]:
    """The ways a hint could print `answer`: as written, and for numbers with separators or rounded."""
    if isinstance(answer, str) or not isinstance(answer, numbers.Real):
        return {str(answer)}
    texts = {f"{answer}", f"{answer:,}", f"{answer:.4g}"}
    if not isinstance(answer, numbers.Integral):
        texts |= {f"{answer:.3f}", f"{answer:.6f}"}
    return texts


def assert_rejected(verdict, *answers):
    """A not-yet verdict, with a hint that gives away none of the expected `answers`."""
    assert not verdict, verdict
    assert verdict.hint
    for answer in answers:
        for text in answer_texts(answer):
            assert text not in verdict.hint, (text, verdict.hint)
