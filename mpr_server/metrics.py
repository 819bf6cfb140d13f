"""A few Prometheus metrics, rendered in the text exposition format."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


class Metrics:
    def __init__(self) -> None:
        self.counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self._gauges: dict[str, Callable[[], float]] = {}
        self._help: dict[str, str] = {}
        self._sources: list[Callable[[], None]] = []

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += amount

    def gauge(self, name: str, read: Callable[[], float], help_text: str) -> None:
        self._gauges[name] = read
        self._help[name] = help_text

    def describe(self, name: str, help_text: str) -> None:
        self._help[name] = help_text

    def source(self, refresh: Callable[[], None]) -> None:
        """Call ``refresh`` before each render (to copy counters kept elsewhere)."""
        self._sources.append(refresh)

    def set_counter(self, name: str, value: int, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] = value

    def render(self) -> bytes:
        for refresh in self._sources:
            refresh()
        lines: list[str] = []
        seen: set[str] = set()
        for (name, labels), value in sorted(self.counters.items()):
            if name not in seen:
                seen.add(name)
                lines.append(f"# HELP {name} {self._help.get(name, name)}")
                lines.append(f"# TYPE {name} counter")
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")
        for name, read in sorted(self._gauges.items()):
            lines.append(f"# HELP {name} {self._help[name]}")
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {read()}")
        return ("\n".join(lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
