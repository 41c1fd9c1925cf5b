"""Slurm's hostlist syntax: ``n[1-3,5]`` is n1, n2, n3, n5; ``gpu-[01-04],cpu1`` keeps the zero padding.

Items are separated by commas outside brackets. An item is text with any number of bracket
groups; each group is a comma-separated list of numbers and ``LOW-HIGH`` ranges, and an item
with several groups stands for every combination (``r[1-2]n[1-2]`` is r1n1, r1n2, r2n1, r2n2),
as Slurm's ``scontrol show hostnames`` prints them. A range keeps the width of its lower bound
when that has a leading zero (``[08-10]`` is 08, 09, 10).
"""

from __future__ import annotations

import itertools
import re

__all__ = ["MAX_HOSTS", "expand_hostlist"]

#: More hosts than this in one list is a mistake (``n[1-999999999]``), not a cluster.
MAX_HOSTS = 1_000_000
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def expand_hostlist(text: str) -> list[str]:
    """The host names of a Slurm hostlist, in order (duplicates kept, as Slurm keeps them).

    Raises ValueError naming the list and what is wrong with it.
    """
    if not text.strip():
        raise ValueError(f"hostlist {text!r} names no host")
    hosts: list[str] = []
    for item in _split_top_level(text.strip(), text):
        parts: list[list[str]] = []
        rest = item
        while rest:
            open_at = rest.find("[")
            close_at = rest.find("]")
            if open_at < 0:
                if close_at >= 0:
                    raise ValueError(f"hostlist {text!r}: ']' without '[' in {item!r}")
                parts.append([rest])
                break
            if close_at < open_at:
                raise ValueError(f"hostlist {text!r}: unbalanced brackets in {item!r}")
            if open_at:
                parts.append([rest[:open_at]])
            parts.append(_expand_group(rest[open_at + 1:close_at], text))
            rest = rest[close_at + 1:]
        count = 1
        for p in parts:
            count *= len(p)
        if len(hosts) + count > MAX_HOSTS:
            raise ValueError(f"hostlist {text!r} names more than {MAX_HOSTS:,} hosts")
        hosts.extend("".join(combo) for combo in itertools.product(*parts))
    return hosts


def _split_top_level(text: str, original: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {original!r}: brackets cannot nest")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {original!r}: ']' without '['")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"hostlist {original!r}: '[' without ']'")
    items.append(text[start:])
    for item in items:
        if not item.strip() or item != item.strip():
            raise ValueError(f"hostlist {original!r}: an empty item or spaces (items are separated by single commas)")
    return items


def _expand_group(group: str, original: str) -> list[str]:
    out: list[str] = []
    for piece in group.split(","):
        m = _RANGE.fullmatch(piece)
        if not m:
            raise ValueError(f"hostlist {original!r}: {piece!r} in [{group}] is not a number or a LOW-HIGH range")
        low_text, high_text = m.group(1), m.group(2) or m.group(1)
        low, high = int(low_text), int(high_text)
        if high < low:
            raise ValueError(f"hostlist {original!r}: range {piece!r} runs backwards")
        if high - low + 1 > MAX_HOSTS:
            raise ValueError(f"hostlist {original!r} names more than {MAX_HOSTS:,} hosts")
        width = len(low_text) if low_text.startswith("0") and len(low_text) > 1 else 0
        out.extend(str(n).zfill(width) for n in range(low, high + 1))
    return out
