"""The shared machinery of the exercise checks (minigpt/exercises/__init__.py)."""

from minigpt.exercises import UNSOLVED_HINT, CheckResult, call, close_to, not_yet, right


def test_verdicts_are_truthy_only_when_right_and_show_one_line():
    assert right("Exercise 1") and repr(right("Exercise 1")) == "✓ Exercise 1: right."
    verdict = not_yet("Exercise 2", "count the pairs again.")
    assert not verdict
    assert repr(verdict) == "✗ Exercise 2: not yet. Hint: count the pairs again."
    assert isinstance(verdict, CheckResult)


def test_call_turns_templates_errors_and_non_functions_into_hints():
    assert call("E", lambda x: x + 1, 1) == (2, None)
    value, verdict = call("E", lambda: None)
    assert value is None and not verdict and verdict.hint == UNSOLVED_HINT
    value, verdict = call("E", lambda: 1 / 0)
    assert not verdict and "ZeroDivisionError" in verdict.hint
    value, verdict = call("E", 42)
    assert not verdict and "int" in verdict.hint


def test_close_to_needs_a_finite_number_near_the_target():
    assert close_to(1.0000001, 1.0)
    assert close_to(10.4, 10.0, abs_tol=0.5)
    assert not close_to(1.1, 1.0)
    assert not close_to("one", 1.0) and not close_to(None, 1.0) and not close_to(float("nan"), 1.0)


def test_call_for_tensor_insists_on_a_tensor_and_detaches_it():
    import torch

    from minigpt.exercises import call_for_tensor

    weight = torch.ones(3, requires_grad=True)
    tensor, verdict = call_for_tensor("E", lambda: weight * 2)
    assert verdict is None and not tensor.requires_grad and tensor.tolist() == [2.0, 2.0, 2.0]
    tensor, verdict = call_for_tensor("E", lambda: [2.0, 2.0])
    assert tensor is None and not verdict and verdict.hint == "return a tensor (got a list)."
    tensor, verdict = call_for_tensor("E", lambda: None)
    assert tensor is None and verdict.hint == UNSOLVED_HINT
