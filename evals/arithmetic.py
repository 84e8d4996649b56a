"""A verifiable reward for arithmetic questions: the reply's final number equals the question's value.

The exact-answer reward GRPO is known for (DeepSeek-R1's rule-based accuracy reward, TRL's
`accuracy_reward` for math): no judge and no reference column, because the question carries its
own answer. The grader finds the arithmetic expression in the last user turn ("What is 38 + 45?",
"Compute (3 + 4) × 5.", "what's 12+30"), evaluates it exactly (Python's `ast` on integers and the
four operations only, never `eval`), and compares the reply's last number with it.

Hand-written because the libraries that verify math answers (`math-verify`, TRL's
`accuracy_reward` built on it) parse LaTeX answers against a LaTeX gold solution; here the gold
value is computed from a plain-text question, which takes the twenty lines below.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass
from fractions import Fraction

from evals.sample import Sample, last_number

__all__ = ["ArithmeticGrader", "question_value"]

# A run of integers joined by + - * / (or × ÷ x) and parentheses, with at least one operator.
# Not inside a longer number ("1.5", "1,000", "2^3"): such a question is not plain integer
# arithmetic, and evaluating a fragment of it would reward a wrong answer.
_EXPRESSION = re.compile(r"(?<![\w.,^])[(\s]*-?\d+(?:\s*[-+*/×÷x]\s*[(\s]*-?\d+\s*\)*)+(?![\d^]|[.,]\d)")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return Fraction(_OPERATORS[type(node.op)](left, right))
    raise ValueError(f"not plain arithmetic: {ast.dump(node)}")


def question_value(text: str) -> Fraction | None:
    """The value of the last arithmetic expression in `text`, or None when it holds none."""
    matches = _EXPRESSION.findall(text)
    if not matches:
        return None
    expression = matches[-1].replace("×", "*").replace("x", "*").replace("÷", "/")
    try:
        return _evaluate(ast.parse(expression.strip(), mode="eval"))
    except (SyntaxError, ValueError, RecursionError):
        return None


@dataclass(frozen=True)
class ArithmeticGrader:
    """1.0 when the reply's last number equals the value of the arithmetic question in the last user
    turn, else 0.0. A question without an arithmetic expression cannot be scored: ValueError (a
    reward built on graders counts that as a failed score, never as a positive one)."""

    tolerance: float = 1e-9
    name: str = "exact_answer"

    def score(self, sample: Sample) -> float:
        users = [m for m in sample.messages if m.get("role") == "user"]
        question = str(users[-1].get("content", "")) if users else ""
        expected = question_value(question)
        if expected is None:
            raise ValueError(
                f"grader {self.name!r}: no arithmetic expression in the question {question[:80]!r}"
            )
        got = last_number(sample.response)
        return float(
            got is not None and math.isclose(got, float(expected), rel_tol=0.0, abs_tol=self.tolerance)
        )
