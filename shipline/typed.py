"""Build a frozen message dataclass from decoded JSON, checking every field's type.

This is the codec's fast validation path: one pass over the fields with plans compiled once
per class from the annotations. ``tests/unit/test_codec.py`` checks it accepts and rejects
exactly what the generated JSON Schemas accept and reject.
"""

from __future__ import annotations

import dataclasses
import functools
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
            try:
                return [item(x, p) for x in v]  # no path string per element on the hot path ...
            except TypeCheckError:
                for i, x in enumerate(v):  # ... it is made only to name the element that fails
                    item(x, f"{p}[{i}]")
                raise
        return array
    if origin is dict:
        _, val_tp = typing.get_args(tp) or (str, Any)
        val = _plan(val_tp)

        def obj(v: Any, p: str) -> Any:
            if type(v) is not dict:
                raise TypeCheckError(f"{p}: expected object, got {type(v).__name__}")
            try:
                return {k: val(x, p) for k, x in v.items()}  # as in ``array``: paths only on failure
            except TypeCheckError:
                for k, x in v.items():
                    val(x, f"{p}.{k}")
                raise
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


@cache
def _known(cls: type) -> frozenset[str]:
    return frozenset(name for name, _, _ in fields_of(cls))


@cache
def _paths(cls: type, path: str) -> tuple[tuple[str, Check, bool, str], ...]:
    """``fields_of`` with each field's path (``data.name``) made once, not once per record (paths
    come from code: the codec builds at ``data``, and no message nests another)."""
    return tuple((name, check, required, f"{path}.{name}") for name, check, required in fields_of(cls))


def _same(value: Any) -> Any:
    return value


@cache
def _defaults(cls: type) -> tuple[tuple[str, Callable[[], Any]], ...]:
    out: list[tuple[str, Callable[[], Any]]] = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out.append((f.name, functools.partial(_same, f.default)))
        elif f.default_factory is not dataclasses.MISSING:
            out.append((f.name, f.default_factory))
    return tuple(out)


def make(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)`` for a plain frozen dataclass, without its generated ``__init__``.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``: a quarter
    of decoding a record went there. ``values`` must name only fields of ``cls`` (``build`` has
    checked them); missing ones get their defaults, as ``__init__`` would give them. Classes with
    ``__post_init__`` or ``__slots__`` go through ``__init__``.
    """
    if not _plain(cls):
        return cls(**values)
    for name, default in _defaults(cls):
        if name not in values:
            values[name] = default()
    obj: Any = object.__new__(cls)
    obj.__dict__.update(values)
    return obj


@cache
def _plain(cls: type) -> bool:
    return dataclasses.is_dataclass(cls) and not hasattr(cls, "__post_init__") and "__slots__" not in vars(cls)


def build(cls: type, data: Any, path: str = "data") -> Any:
    if type(data) is not dict:
        raise TypeCheckError(f"{path}: expected object, got {type(data).__name__}")
    if not _known(cls).issuperset(data):
        extra = [k for k in data if k not in _known(cls)]
        raise TypeCheckError(f"{path}: unknown field(s) {', '.join(sorted(extra))}")
    kwargs = {}
    for name, check, required, where in _paths(cls, path):
        if name in data:
            kwargs[name] = check(data[name], where)
        elif required:
            raise TypeCheckError(f"{path}: missing required field {name!r}")
    return make(cls, kwargs)
