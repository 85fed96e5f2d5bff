"""Line numbers for keys in a TOML document.

`tomllib` returns plain dicts with no positions, but a configuration error is
only useful if it says which line to fix. `KeyLines.scan()` rebuilds the
positions with a line scanner that understands the TOML people write in a
configuration file:

- table headers `[metrics]`, `[port.features]` and array-of-tables headers
  `[[port]]` (each occurrence counts, so the third `[[port]]` is `port[2]`,
  and a following `[port.features]` belongs to `port[2]`);
- `key = value` and dotted `a.b = value` lines, bare or simply quoted keys.

Limits (where a position cannot be found, `line_of()` falls back to the
nearest enclosing table that was found, so a problem is never unlocated
unless the whole document has no position for it):

- quoted keys with escapes or containing dots are not unescaped;
- keys inside inline tables (`features = { mq = false }`) and elements of
  inline arrays of tables (`port = [{...}, {...}]`) get the line of the
  enclosing key;
- multi-line basic/literal strings are skipped by counting triple quotes,
  which is right unless a line holds an odd number of them inside a string.

Paths use the same spelling as `ConfigProblem.path`: `port[1].features.mq`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"[^"\\\n]*"|'[^'\n]*')"""
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_ARRAY_HEADER = re.compile(rf"^\s*\[\[\s*({_DOTTED_KEY})\s*\]\]\s*(?:#.*)?$")
_TABLE_HEADER = re.compile(rf"^\s*\[\s*({_DOTTED_KEY})\s*\]\s*(?:#.*)?$")
_KEY_LINE = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")
_PART = re.compile(_KEY_PART)


def _parts(dotted: str) -> list[str]:
    return [p[1:-1] if p[0] in "\"'" else p for p in _PART.findall(dotted)]


def parent_path(path: str) -> str:
    """`port[1].features.mq` -> `port[1].features` -> `port[1]` -> `port` -> ``."""
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""


@dataclass(slots=True)
class KeyLines:
    """Maps a key path to the 1-based line where it is first defined."""

    lines: dict[str, int] = field(default_factory=dict)

    @classmethod
    def scan(cls, text: str) -> KeyLines:
        index = cls()
        array_counts: dict[str, int] = {}
        prefix = ""
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            if match := _ARRAY_HEADER.match(line):
                *parents, last = _parts(match.group(1))
                base = index._resolve(parents, array_counts)
                base = f"{base}.{last}" if base else last
                count = array_counts.get(base, 0)
                array_counts[base] = count + 1
                prefix = f"{base}[{count}]"
                index._record(base, number)
                index._record(prefix, number)
                continue
            if match := _TABLE_HEADER.match(line):
                prefix = index._resolve(_parts(match.group(1)), array_counts)
                index._record(prefix, number)
                continue
            if match := _KEY_LINE.match(line):
                path = prefix
                for part in _parts(match.group(1)):
                    path = f"{path}.{part}" if path else part
                    index._record(path, number)
                rest = line[match.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_multiline = quote
                        break
        return index

    def _resolve(self, parts: list[str], array_counts: dict[str, int]) -> str:
        # In a header, a name that is an array of tables means its last element.
        path = ""
        for part in parts:
            path = f"{path}.{part}" if path else part
            if path in array_counts:
                path = f"{path}[{array_counts[path] - 1}]"
        return path

    def _record(self, path: str, number: int) -> None:
        self.lines.setdefault(path, number)

    def line_of(self, path: str) -> int | None:
        """The line of `path`, or of its nearest enclosing table or key that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = parent_path(path)
        return None
