"""The Tool mode's registry: a function with type hints and a docstring becomes a ChatGLM3 tool.

    from composite_demo.tools import tool

    @tool
    def word_count(text: str) -> int:
        \"\"\"Count the words in a text.

        text: the text to count
        \"\"\"
        return len(text.split())

The docstring's first paragraph describes the tool; lines `name: what it is` describe its parameters. Parameters
without a default are required. The model's arguments arrive as JSON (read from its `tool_call(...)` as literals,
never executed); `run` checks them against the signature and returns the result as text.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import random
import typing
from datetime import datetime

__all__ = ["REGISTRY", "ToolError", "describe", "run", "tool"]

REGISTRY: dict[str, typing.Callable] = {}

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


class ToolError(ValueError):
    """A tool refused its arguments (the message says why, for the model and the user)."""


def _schema(annotation) -> dict:
    if typing.get_origin(annotation) is typing.Literal:
        values = list(typing.get_args(annotation))
        return {"type": _JSON_TYPES.get(type(values[0]), "string"), "enum": values}
    origin = typing.get_origin(annotation) or annotation
    if origin in _JSON_TYPES:
        return {"type": _JSON_TYPES[origin]}
    raise TypeError(f"a tool parameter's type must be one of {[t.__name__ for t in _JSON_TYPES]} or a Literal, "
                    f"not {annotation!r}")


def _docs(doc: str, names) -> tuple[str, dict[str, str]]:
    """(the description, {parameter: its description}) from a docstring: a paragraph of `name: text` lines naming
    parameters describes them; every other paragraph is the description."""
    description, params = [], {}
    for paragraph in inspect.cleandoc(doc or "").split("\n\n"):
        lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
        named = [line.partition(":") for line in lines]
        if lines and all(sep and name in names for name, sep, _ in named):
            params.update({name: text.strip() for name, _, text in named})
        elif lines:
            description.append(" ".join(lines))
    return "\n".join(description), params


def describe(fn: typing.Callable) -> dict:
    """The ChatGLM3 tool description of fn: {"name", "description", "parameters" (a JSON schema)}."""
    signature = inspect.signature(fn)
    description, param_docs = _docs(fn.__doc__, signature.parameters)
    if not description:
        raise TypeError(f"the tool {fn.__name__} needs a docstring: it tells the model what the tool does")
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"the tool {fn.__name__}'s parameter {name} must be a plain keyword parameter")
        if name not in hints:
            raise TypeError(f"the tool {fn.__name__}'s parameter {name} needs a type hint")
        properties[name] = {**_schema(hints[name]), **({"description": param_docs[name]} if name in param_docs
                                                        else {})}
        if param.default is inspect.Parameter.empty:
            required.append(name)
    return {"name": fn.__name__, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required}}


def tool(fn: typing.Callable) -> typing.Callable:
    """Register fn as a tool offered in the Tool mode (checked now: a bad hint or a missing docstring fails at
    import, not when the model calls it)."""
    fn.tool_description = describe(fn)
    REGISTRY[fn.__name__] = fn
    return fn


def run(name: str, arguments: str, registry: dict | None = None) -> str:
    """Call the tool `name` with its JSON arguments; the result as text. ToolError for an unknown tool or bad
    arguments; whatever the tool raises passes through (the page shows it and sends it back)."""
    registry = REGISTRY if registry is None else registry
    if name not in registry:
        raise ToolError(f"there is no tool {name!r}; the tools are {', '.join(sorted(registry))}")
    fn = registry[name]
    try:
        args = json.loads(arguments or "{}")
    except json.JSONDecodeError as e:
        raise ToolError(f"the arguments are not JSON: {e}") from None
    if not isinstance(args, dict):
        raise ToolError("the arguments must be a JSON object")
    hints = typing.get_type_hints(fn)
    try:
        bound = inspect.signature(fn).bind(**args)
    except TypeError as e:
        raise ToolError(str(e)) from None
    for key, value in bound.arguments.items():
        expected = _schema(hints[key])
        kind = next((t for t, n in _JSON_TYPES.items() if n == expected["type"]), object)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            bound.arguments[key] = value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ToolError(f"{key} must be of type {expected['type']}, not {type(value).__name__}")
        if "enum" in expected and value not in expected["enum"]:
            raise ToolError(f"{key} must be one of {expected['enum']}, not {value!r}")
    result = fn(*bound.args, **bound.kwargs)
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


# ---- the shipped tools (offline) ---------------------------------------------------------------------------------
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS = {"sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log,
              "log10": math.log10, "exp": math.exp, "abs": abs, "round": round, "floor": math.floor,
              "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1000  # 9**9**9 would take the process's memory and time
MAX_DIGITS = 4000  # an integer result's size, checked as the expression is evaluated


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponents above {MAX_EXPONENT} are refused")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, int) and value.bit_length() > MAX_DIGITS * 3.33:
            raise ToolError(f"the result has more than {MAX_DIGITS} digits")
        return value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords and len(node.args) in (1, 2)):
        try:
            return _FUNCTIONS[node.func.id](*[_evaluate(a) for a in node.args])
        except (ValueError, TypeError, OverflowError) as e:
            raise ToolError(f"{node.func.id}: {e}") from None
    raise ToolError(f"only numbers, + - * / // % **, parentheses and {', '.join(_FUNCTIONS)} are allowed, "
                    f"not {ast.unparse(node)!r}")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses, sqrt, sin, cos, tan,
    log, log10, exp, abs, round, floor, ceil, pi, e).

    expression: the arithmetic expression, e.g. (3 + 4) * 2 ** 10
    """
    if len(expression) > 500:
        raise ToolError("the expression is longer than 500 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"not an arithmetic expression: {e.msg}") from None
    try:
        return str(_evaluate(tree))
    except OverflowError:
        raise ToolError("the result is too large") from None


@tool
def get_time(timezone: str = "UTC") -> str:
    """The current date and time in a time zone.

    timezone: an IANA time zone name, e.g. Asia/Shanghai or Europe/Berlin
    """
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {timezone!r} (an IANA name like Asia/Shanghai)") from None
    return datetime.now(zone).strftime("%Y-%m-%d %H:%M:%S %Z (UTC%z)")


@tool
def random_number(low: int, high: int) -> int:
    """A random whole number between low and high, both included.

    low: the smallest possible number
    high: the largest possible number
    """
    if low > high:
        raise ToolError(f"low ({low}) is above high ({high})")
    return random.randint(low, high)


# Each unit in the dimension's base unit (metre, kilogram); temperature converts through kelvin.
_LENGTH = {"mm": 0.001, "cm": 0.01, "m": 1.0, "km": 1000.0, "in": 0.0254, "ft": 0.3048, "yd": 0.9144,
           "mi": 1609.344}
_MASS = {"mg": 1e-6, "g": 0.001, "kg": 1.0, "t": 1000.0, "oz": 0.028349523125, "lb": 0.45359237}
_TO_KELVIN = {"C": lambda v: v + 273.15, "F": lambda v: (v - 32) * 5 / 9 + 273.15, "K": lambda v: v}
_FROM_KELVIN = {"C": lambda k: k - 273.15, "F": lambda k: (k - 273.15) * 9 / 5 + 32, "K": lambda k: k}


@tool
def convert_unit(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a length (mm, cm, m, km, in, ft, yd, mi), a mass (mg, g, kg, t, oz, lb) or a temperature (C, F, K).

    value: the amount to convert
    from_unit: the unit it is in
    to_unit: the unit wanted
    """
    if from_unit in _TO_KELVIN and to_unit in _TO_KELVIN:
        kelvin = _TO_KELVIN[from_unit](value)
        if kelvin < 0:
            raise ToolError("below absolute zero")
        result = _FROM_KELVIN[to_unit](kelvin)
    else:
        table = next((t for t in (_LENGTH, _MASS) if from_unit in t and to_unit in t), None)
        if table is None:
            raise ToolError(f"cannot convert {from_unit!r} to {to_unit!r}: both must be lengths "
                            f"({', '.join(_LENGTH)}), masses ({', '.join(_MASS)}) or temperatures (C, F, K)")
        result = value * table[from_unit] / table[to_unit]
    return f"{value:g} {from_unit} = {round(result, 6):g} {to_unit}"
