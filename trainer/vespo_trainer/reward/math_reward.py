"""The built-in `math` reward: the response's final answer checked against the ground truth by math-verify.

    compute_score(data_source, solution_str, ground_truth, extra_info=None) -> 1.0 or 0.0

veRL's reward-function signature. The answer is the last \\boxed{...} of the response (or, when
there is none, the last expression math-verify finds); the ground truth is read as if it were
boxed. math-verify compares them symbolically with sympy (\\frac{1}{2} = 0.5 = 1/2, 2\\sqrt{2} =
\\sqrt{8}, ...). Nothing is ever eval'd or exec'd: math-verify parses LaTeX and plain expressions
into sympy objects. Its own signal.alarm timeouts are turned off so they cannot cancel the reward
pool's per-call timer, which bounds every call (reward.timeout_s).

A ground truth math-verify cannot parse raises ValueError (the pool scores the sample 0 and counts
it in reward/errors): that is a data problem, not a wrong answer.
"""
from __future__ import annotations

import logging

# Imported with the module, so the reward pool's processes load math-verify and sympy (1-2 s) when they
# start, outside the per-call time limit.
from math_verify import parse, verify

from ..data.verl import last_boxed

for _name in ("math_verify", "math_verify.parser", "math_verify.grader"):  # "Timeout is disabled" warnings:
    logging.getLogger(_name).setLevel(logging.ERROR)                      # the pool's timer does the timing out


def _parse(text: str):
    return parse(text, parsing_timeout=None)


# The first parse builds math-verify's LaTeX parser: do it now, not inside a timed call.
verify(_parse("\\boxed{\\frac{1}{2}}"), _parse("0.5"), timeout_seconds=None)


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float:
    if not isinstance(solution_str, str) or not solution_str.strip():
        return 0.0
    truth = str(ground_truth).strip()
    gold = _parse(truth if "\\boxed" in truth else "\\boxed{" + truth + "}")
    if not gold:
        raise ValueError(f"math reward: cannot parse the ground truth {truth!r}")
    boxed = last_boxed(solution_str)
    answer = _parse(solution_str if boxed is None else "\\boxed{" + boxed + "}")
    if not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0
