"""A tiny, safe evaluator for the expressions in mapping specs.

Specs compute shapes (`num_heads * head_dim`) and conditions (`not tie_word_embeddings`,
`i not in mlp_only_layers` for the layer index `i`) from config fields. `eval` would run arbitrary code from a YAML file, so only arithmetic, comparisons, boolean
logic and config names are allowed.
"""

from __future__ import annotations

import ast
import operator
from functools import lru_cache
from typing import Any, Mapping

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


class ExprError(ValueError):
    pass


@lru_cache(maxsize=4096)
def parse(source: str) -> ast.expr:
    try:
        tree = ast.parse(source, mode="eval").body
    except SyntaxError as exc:
        raise ExprError(f"cannot parse expression {source!r}") from exc
    for node in ast.walk(tree):
        allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Name, ast.Constant,
                   ast.Load, ast.USub, ast.Not, ast.And, ast.Or, ast.IfExp, *_BINOPS, *_CMPOPS)
        if not isinstance(node, allowed):
            raise ExprError(f"{type(node).__name__} is not allowed in expression {source!r}")
    return tree


def names(source: str) -> set[str]:
    """Config names an expression refers to (for validating specs at load time)."""
    return {n.id for n in ast.walk(parse(source)) if isinstance(n, ast.Name)}


def evaluate(source: str | int | bool | None, env: Mapping[str, Any]) -> Any:
    if not isinstance(source, str):
        return source
    return _eval(parse(source), env, source)


def _eval(node: ast.expr, env: Mapping[str, Any], src: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise ExprError(f"unknown name {node.id!r} in expression {src!r}")
        return env[node.id]
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval(node.left, env, src), _eval(node.right, env, src))
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, env, src)
        return -value if isinstance(node.op, ast.USub) else not value
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, env, src) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, env, src) else node.orelse, env, src)
    left = _eval(node.left, env, src)
    for op, right_node in zip(node.ops, node.comparators):
        right = _eval(right_node, env, src)
        if not _CMPOPS[type(op)](left, right):
            return False
        left = right
    return True
