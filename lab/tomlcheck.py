"""Checking TOML documents against what the lab expects: one style for every file it reads.

lab.toml (lab.config) and guest image recipes (lab.artifacts.image) are both
validated with these helpers, so every problem reads the same way: a
`ConfigError` whose key path comes first, then what was expected and what was
found, and a did-you-mean hint when a close spelling exists:

    guests.guest1.net.backend: expected "tap" or "vhost", got "vhots" (fix: did you mean "vhost"?)

`Table` checks a table's keys on construction, so a typo is reported before
the "missing key" it causes.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lab.errors import ConfigError

T = TypeVar("T")

REQUIRED: Any = object()  # sentinel default: the key must be present


def q(value: str) -> str:
    """A string as it would be written in TOML (double quotes, escapes)."""
    return json.dumps(value, ensure_ascii=False)


def found(value: Any) -> str:
    """What was found, spelled for a message: its TOML type and value."""
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({num(value)})"
    if isinstance(value, str):
        return f"a string ({q(value)})"
    if isinstance(value, list):
        return "an array" if value else "an empty array"
    if isinstance(value, dict):
        return "a table"
    return f"a date/time ({value})"


def num(value: float | int) -> str:
    """A number as TOML spells it (inf, nan, 60 rather than 60.0)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value.is_integer():
            return str(int(value))
    return str(value)


def did_you_mean(word: str, options: Collection[str]) -> str | None:
    """A fix hint naming the closest option, if one is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {q(close[0])}?" if close else None


def join(path: str, key: str) -> str:
    """Append a key to a key path, quoting it as TOML would if it is not bare."""
    part = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else q(key)
    return f"{path}.{part}" if path else part


def type_error(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(path, f"expected {expected}, got {found(value)}")


def integer(path: str, value: Any, lo: int, hi: int, unit: str = "") -> int:
    """An integer in [lo, hi]; a boolean is not an integer."""
    expected = f"an integer from {lo} to {hi}{unit}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(path, expected, value)
    if not lo <= value <= hi:
        raise ConfigError(path, f"expected {expected}, got {value}")
    return value


def number(path: str, value: Any, *, lo: float, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite number (int or float, not bool) above lo (or at it, unless lo_open), at most hi."""
    if lo_open and hi is not None:
        expected = f"a number in ({num(lo)}, {num(hi)}]"
    elif hi is not None:
        expected = f"a number from {num(lo)} to {num(hi)}"
    else:
        expected = f"a finite number {'>' if lo_open else '>='} {num(lo)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise type_error(path, expected, value)
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise ConfigError(path, f"expected {expected}, got {num(value)}")
    return float(value)


def boolean(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise type_error(path, "true or false", value)
    return value


def string(path: str, value: Any, expected: str = "a string") -> str:
    if not isinstance(value, str):
        raise type_error(path, expected, value)
    return value


def pattern(path: str, value: Any, pattern: re.Pattern[str], what: str) -> str:
    """A string matching `pattern` in full; `what` describes it for the message."""
    text = string(path, value, what)
    if not pattern.fullmatch(text):
        raise ConfigError(path, f"expected {what}, got {q(text)}")
    return text


def choice(path: str, value: Any, choices: Sequence[str]) -> str:
    quoted = [q(c) for c in choices]
    expected = " or ".join(quoted) if len(quoted) <= 2 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    if not isinstance(value, str):
        raise type_error(path, expected, value)
    if value not in choices:
        raise ConfigError(path, f"expected {expected}, got {q(value)}", did_you_mean(value, choices))
    return value


def ref(path: str, value: Any, known: Collection[str], section: str, kind: str) -> str:
    """The name of something defined under [section]."""
    expected = f"the name of a {kind} defined under [{section}]"
    name = string(path, value, expected)
    if name not in known:
        listed = ", ".join(known) if known else "none defined"
        hint = did_you_mean(name, known) or f"define [{section}.{name}] or use one of: {listed}"
        raise ConfigError(path, f"expected {expected} ({listed}), got {q(name)}", hint)
    return name


def list_of(
    path: str,
    value: Any,
    item: Callable[[str, Any], T],
    *,
    what: str,
    non_empty: bool = False,
) -> tuple[T, ...]:
    """An array of items, each checked by `item` at path[i]; no duplicates."""
    expected = f"an array of {what}"
    if not isinstance(value, list):
        raise type_error(path, expected, value)
    if non_empty and not value:
        raise ConfigError(path, f"expected a non-empty array of {what}, got an empty array")
    items: list[T] = []
    for i, raw in enumerate(value):
        checked = item(f"{path}[{i}]", raw)
        if checked in items:
            j = items.index(checked)
            shown = q(checked) if isinstance(checked, str) else num(checked)  # type: ignore[arg-type]
            raise ConfigError(f"{path}[{i}]", f"expected no duplicates, got {shown} again (also {path}[{j}])")
        items.append(checked)
    return tuple(items)



# Tables


@dataclass(frozen=True)
class Table:
    """A TOML table under validation: its key path and its raw content.

    Construction checks for unknown keys, so a typo is reported before any
    "missing key" it causes.
    """

    path: str
    data: Mapping[str, Any]
    allowed: tuple[str, ...] | None  # None: a free-form table (its caller checks each key)

    def __post_init__(self) -> None:
        if self.allowed is None:
            return
        for key in self.data:
            if key not in self.allowed:
                raise ConfigError(
                    self.at(key),
                    f"unknown key; expected one of {', '.join(self.allowed)}",
                    did_you_mean(key, self.allowed),
                )

    def at(self, key: str) -> str:
        """The key path of `key` in this table."""
        return join(self.path, key)

    def has(self, key: str) -> bool:
        """Whether the document sets `key` here."""
        return key in self.data

    def get(self, key: str, default: Any = REQUIRED, expected: str = "a value") -> Any:
        """The raw value of `key`, or `default`; a missing key without default is an error."""
        if key in self.data:
            return self.data[key]
        if default is REQUIRED:
            raise ConfigError(self.at(key), f"required key is missing (expected {expected})")
        return default


def table(path: str, value: Any, allowed: Sequence[str] | None) -> Table:
    """A TOML table (section) at `path`, checked for unknown keys (None: any key)."""
    if not isinstance(value, dict):
        raise type_error(path, "a table", value)
    return Table(path, value, None if allowed is None else tuple(allowed))


def section(parent: Table, key: str, allowed: Sequence[str] | None, *, required: bool) -> Table:
    """A sub-table of `parent`; an absent optional one reads as empty."""
    if not parent.has(key):
        if required:
            raise ConfigError(parent.at(key), "required table is missing (expected a table)")
        return Table(parent.at(key), {}, None if allowed is None else tuple(allowed))
    return table(parent.at(key), parent.data[key], allowed)


def named_tables(
    parent: Table, key: str, name_pattern: re.Pattern[str], what: str, *, required: bool
) -> list[tuple[str, Any]]:
    """The entries of a [key.<name>] collection, names checked; non-empty if required."""
    if not parent.has(key):
        if required:
            raise ConfigError(parent.at(key), f"required table is missing (expected at least one [{key}.<name>])")
        return []
    coll = parent.data[key]
    if not isinstance(coll, dict):
        raise type_error(parent.at(key), f"a table of {what}s", coll)
    if required and not coll:
        raise ConfigError(parent.at(key), f"expected at least one [{key}.<name>], got an empty table")
    for name in coll:
        if not name_pattern.fullmatch(name):
            raise ConfigError(
                join(parent.at(key), name), f"expected a {what} name matching {name_pattern.pattern}, got {q(name)}"
            )
    return list(coll.items())


def path_hint(raw: str, resolved: Path) -> str | None:
    """Did-you-mean for a path: the closest name in the same directory."""
    try:
        siblings = [p.name for p in resolved.parent.iterdir()]
    except OSError:
        return None
    close = difflib.get_close_matches(resolved.name, siblings, n=1, cutoff=0.6)
    if not close or close[0] == resolved.name:
        return None
    parent = Path(raw).parent
    return f"did you mean {q(str(parent / close[0]) if str(parent) != '.' else close[0])}?"
