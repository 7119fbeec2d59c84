"""Stats counters summed across workers and across reloads.

Each worker counts what it serves (``_counters``: frontends, backends and
their servers, by name). The master keeps a ``CounterBook``: the last
counters it saw from every worker still alive, and the totals of the workers
gone ("retired"). The stats page of any worker shows

    retired + sum(last seen of every live worker)

so totals never go down within a master's life: not at a reload, not while
an old generation finishes its connections, not when a worker exits (its
last report, sent as it exits, moves from "live" to "retired"). Three kinds
of fields: totals are summed; peaks (``smax``, ``qmax``) take the maximum;
gauges (``scur``, ``qcur``) describe now, so only the workers that answered
this very scrape contribute.
"""

from __future__ import annotations

from typing import Any, Callable

PEAKS = frozenset({"smax", "qmax"})
GAUGES = frozenset({"scur", "qcur"})

Part = dict[str, Any]     # {"frontends": {name: fields}, "backends": {name: fields + "servers"}}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fold(total: dict[str, Any], item: dict[str, Any], total_op: Callable[[Any, Any], Any],
          gauges: bool) -> None:
    for key, value in item.items():
        if not _number(value):
            continue
        if key in GAUGES:
            if gauges:
                total[key] = total.get(key, 0) + value
        elif key in PEAKS:
            total[key] = max(total.get(key, 0), value)
        else:
            total[key] = total_op(total.get(key, 0), value)


def _fold_part(result: Part, part: Part, total_op: Callable[[Any, Any], Any],
               gauges: bool) -> None:
    for name, item in (part.get("frontends") or {}).items():
        if isinstance(item, dict):
            _fold(result["frontends"].setdefault(name, {}), item, total_op, gauges)
    for name, item in (part.get("backends") or {}).items():
        if not isinstance(item, dict):
            continue
        total = result["backends"].setdefault(name, {"servers": {}})
        _fold(total, item, total_op, gauges)
        for server, sitem in (item.get("servers") or {}).items():
            if isinstance(sitem, dict):
                _fold(total["servers"].setdefault(server, {}), sitem, total_op, gauges)


def empty() -> Part:
    return {"frontends": {}, "backends": {}}


def merge(parts: list[Part], gauges: bool = True) -> Part:
    """Counters of several workers as one: totals summed, peaks maxed, gauges summed."""
    result = empty()
    for part in parts:
        _fold_part(result, part, lambda a, b: a + b, gauges)
    return result


class CounterBook:
    """The master's record of counters, so that a reload resets nothing."""

    def __init__(self) -> None:
        self.retired = empty()
        self.last: dict[int, Part] = {}

    def seen(self, pid: int, part: Any) -> None:
        """Counters just reported by live worker ``pid``.

        Kept field by field as the maximum of what was seen: a worker's totals
        only grow, so a reply that overtook a newer one cannot move them back.
        """
        if not isinstance(part, dict):
            return
        newest = empty()
        _fold_part(newest, self.last.get(pid, empty()), max, False)
        _fold_part(newest, part, max, False)
        self.last[pid] = newest

    def retire(self, pid: int) -> None:
        """Worker ``pid`` is gone: what it counted joins the retired totals."""
        part = self.last.pop(pid, None)
        if part is not None:
            self.retired = merge([self.retired, part], gauges=False)

    def totals(self, fresh: dict[int, Part]) -> Part:
        """Everything ever counted, with the gauges of the workers in ``fresh``."""
        for pid, part in fresh.items():
            self.seen(pid, part)
        result = merge([self.retired, *self.last.values()], gauges=False)
        _fold_part(result, merge(list(fresh.values())), lambda a, b: a, True)
        result["workers"] = len(fresh)
        return result
