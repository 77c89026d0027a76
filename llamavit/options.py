"""Checking option values against a config dataclass's annotations, so a wrong type or range is one line that
names the option and what it expects (used for model options and for every run configuration)."""
import dataclasses
import typing
from typing import Any, Dict, Mapping, Tuple


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin in (tuple, list) or origin is typing.Sequence or str(origin) == "collections.abc.Sequence":
        if args and args[-1] is not Ellipsis and origin is tuple:
            return f"{len(args)} numbers"
        return "a list of numbers"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def coerce(name: str, value: Any, hint, what: str) -> Any:
    """`value` as the annotation `hint` wants it (YAML's '1e-3' string for a float, a list for a tuple), or a
    ValueError: '<what> option <name> must be <...>, got <value>'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = ValueError(f"{what} option {name} must be {_describe(hint)}, got {value!r}")
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(name, value, arg, what)
            except ValueError:
                continue
        raise bad
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, str):   # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin in (tuple, list) or str(origin) == "collections.abc.Sequence":
        if not isinstance(value, (list, tuple)):
            raise bad
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise bad
        element = args[0] if args else Any
        items = [coerce(name, v, element, what) if element is not Any else v for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    return value


def check_types(obj, what: str) -> None:
    """Coerce every field of the dataclass instance `obj` to its annotation, in place (see `coerce`)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, coerce(f.name, getattr(obj, f.name), hints[f.name], what))


def _in_range(v, kind: str, bound) -> Tuple[bool, str]:
    """(whether v keeps the rule, the rule in words)."""
    if kind == ">":
        return v > bound, f"> {bound}"
    if kind == ">=":
        return v >= bound, f">= {bound}"
    if kind == "<=":
        return v <= bound, f"<= {bound}"
    if kind == "in":
        return bound[0] <= v < bound[1], f"in [{bound[0]}, {bound[1]})"
    if kind == "fraction":
        return 0 < v <= 1, "in (0, 1]"
    if kind == "each in":
        return all(bound[0] <= x < bound[1] for x in v), f"numbers in [{bound[0]}, {bound[1]})"
    if kind == "sorted":
        return 0 < v[0] <= v[1] <= 1, "two numbers 0 < low <= high <= 1"
    if kind == "increasing":
        return 0 < v[0] <= v[1], "two numbers 0 < low <= high"
    raise ValueError(f"unknown range rule {kind!r}")


def check_ranges(values: Mapping[str, Any], rules: Dict[str, Tuple[str, Any]], what: str) -> None:
    """rules: {name: (kind, bound)} with kind '>' / '>=' / '<=' (a number), 'in' (lo, hi) closed-open,
    'fraction' (0 < v <= 1), 'each in' (every element in [lo, hi)), 'sorted' (a pair 0 < low <= high <= 1) or
    'increasing' (0 < low <= high); absent or None values are skipped."""
    for name, (kind, bound) in rules.items():
        v = values.get(name)
        if v is None:
            continue
        ok, expected = _in_range(v, kind, bound)
        if not ok:
            raise ValueError(f"{what} option {name} must be {expected}, got {v!r}")
