"""Build a frozen message dataclass from decoded JSON, checking every field's type.

This is the codec's fast validation path: one pass over the fields with plans compiled once
per class from the annotations. ``tests/unit/test_codec.py`` checks it accepts and rejects
exactly what the generated JSON Schemas accept and reject.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any

INT64 = (-(2**63), 2**63 - 1)


class TypeCheckError(ValueError):
    pass


Check = Callable[[Any, str], Any]


def _plan(tp: Any) -> Check:
    origin = typing.get_origin(tp)
    if tp is Any:
        return lambda v, p: v
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [_plan(a) for a in args if a is not type(None)]
        nullable = type(None) in args

        def union(v: Any, p: str) -> Any:
            if v is None and nullable:
                return None
            errors = []
            for check in inner:
                try:
                    return check(v, p)
                except TypeCheckError as exc:
                    errors.append(str(exc))
            raise TypeCheckError("; ".join(errors))

        return union
    if tp is bool:
        def boolean(v: Any, p: str) -> Any:
            if type(v) is not bool:
                raise TypeCheckError(f"{p}: expected boolean, got {type(v).__name__}")
            return v
        return boolean
    if tp is int:
        def integer(v: Any, p: str) -> Any:
            if type(v) is float and v.is_integer():  # JSON Schema's "integer" admits 1.0
                v = int(v)
            if type(v) is not int or not INT64[0] <= v <= INT64[1]:
                raise TypeCheckError(f"{p}: expected 64-bit integer, got {v!r:.40}")
            return v
        return integer
    if tp is float:
        def number(v: Any, p: str) -> Any:
            if type(v) not in (int, float) or (type(v) is float and not math.isfinite(v)):
                raise TypeCheckError(f"{p}: expected finite number, got {v!r:.40}")
            return float(v)
        return number
    if tp is str:
        def string(v: Any, p: str) -> Any:
            if type(v) is not str:
                raise TypeCheckError(f"{p}: expected string, got {type(v).__name__}")
            return v
        return string
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        item = _plan(item_tp)

        def array(v: Any, p: str) -> Any:
            if type(v) is not list:
                raise TypeCheckError(f"{p}: expected array, got {type(v).__name__}")
            return [item(x, f"{p}[{i}]") for i, x in enumerate(v)]
        return array
    if origin is dict:
        _, val_tp = typing.get_args(tp) or (str, Any)
        val = _plan(val_tp)

        def obj(v: Any, p: str) -> Any:
            if type(v) is not dict:
                raise TypeCheckError(f"{p}: expected object, got {type(v).__name__}")
            return {k: val(x, f"{p}.{k}") for k, x in v.items()}
        return obj
    raise TypeError(f"unsupported annotation {tp!r}")


@cache
def fields_of(cls: type) -> tuple[tuple[str, Check, bool], ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append((f.name, _plan(hints[f.name]), required))
    return tuple(out)


def build(cls: type, data: Any, path: str = "data") -> Any:
    if type(data) is not dict:
        raise TypeCheckError(f"{path}: expected object, got {type(data).__name__}")
    plan = fields_of(cls)
    known = {name for name, _, _ in plan}
    extra = [k for k in data if k not in known]
    if extra:
        raise TypeCheckError(f"{path}: unknown field(s) {', '.join(sorted(extra))}")
    kwargs = {}
    for name, check, required in plan:
        if name in data:
            kwargs[name] = check(data[name], f"{path}.{name}")
        elif required:
            raise TypeCheckError(f"{path}: missing required field {name!r}")
    return cls(**kwargs)
