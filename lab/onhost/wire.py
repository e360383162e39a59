"""The agent's wire format: dataclasses to JSON-ready dicts and back.

The agent (on a host) replies with `to_wire(obj)`; the typed client
(lab.hosts.agent_client) turns the reply back into the same dataclass with
`from_wire(cls, data)`, nested dataclasses, lists, dicts and optionals
included, so both ends share one definition of every reply.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


def to_wire(obj: Any) -> Any:
    """A dataclass (or list/dict of them) as plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_wire(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_wire(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _convert(arg, value)
            except (TypeError, ValueError, KeyError):
                continue
        return value
    if dataclasses.is_dataclass(tp):
        return from_wire(tp, value)
    if origin in (list, tuple):
        args = get_args(tp)
        item = args[0] if args else Any
        out = [_convert(item, v) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(vt, v) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_wire(cls: type[T], data: Any) -> T:
    """Rebuild dataclass `cls` from `to_wire` output; unknown keys are ignored (newer agents)."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = get_type_hints(cls)
    kwargs = {f.name: _convert(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.init and f.name in data}
    return cls(**kwargs)  # type: ignore[call-arg]
