"""Writes examples/data/math_sample.parquet: 300 small math problems in veRL's schema (deterministic).

    python examples/data/make_math_sample.py [OUT.parquet]

Integer arithmetic, fraction sums (answers in LaTeX, e.g. \\frac{3}{4}, so the math reward's
symbolic comparison matters) and one-step linear equations; ASCII only, so the built-in character
tokenizer covers them. Each question gets the standard instruction appended, exactly as
`vespo data prepare` does for question/answer rows.
"""
import os
import random
import sys
from fractions import Fraction

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "trainer"))
from vespo_trainer.data.verl import INSTRUCTION, qa_to_verl_row, write_parquet  # noqa: E402


def latex(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"\\frac{{{q.numerator}}}{{{q.denominator}}}"


def problem(rng: random.Random, kind: int) -> tuple:
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-*")
        return f"What is {a} {op} {b}?", str({"+": a + b, "-": a - b, "*": a * b}[op])
    if kind == 1:
        p, q = Fraction(rng.randint(1, 5), rng.randint(2, 9)), Fraction(rng.randint(1, 5), rng.randint(2, 9))
        return f"What is {p} + {q}? Give the answer as a fraction in lowest terms.", latex(p + q)
    x, a, b = rng.randint(-9, 12), rng.randint(2, 9), rng.randint(1, 30)
    return f"Solve for x: {a}x + {b} = {a * x + b}.", str(x)


def main(out: str) -> None:
    rng = random.Random(20261127)
    rows = []
    for i in range(300):
        question, answer = problem(rng, i % 3)
        rows.append(qa_to_verl_row({"question": question, "answer": answer}, i, INSTRUCTION, "vespo/math_sample", ""))
    write_parquet(rows, out)
    print(f"wrote {len(rows)} rows to {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                              "math_sample.parquet"))
