"""Atomic groups of turns: what trimming may drop or move together, and nothing less.

A tool call and the tool results that answer it form one group, so no trim can leave
a result without its call (providers reject such histories) or a call without its
results.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..context import Turn


def turn_groups(turns: Sequence[Turn]) -> list[tuple[int, int]]:
    """Half-open index ranges ``[start, end)`` covering ``turns``, oldest first."""
    groups: list[tuple[int, int]] = []
    i, n = 0, len(turns)
    while i < n:
        end = i + 1
        if turns[i].tool_calls:
            pending = {c.id for c in turns[i].tool_calls}
            j = end
            # Results may arrive after other turns; extend the group to the last result.
            while j < n and pending:
                if turns[j].role == "tool" and turns[j].tool_call_id in pending:
                    pending.discard(turns[j].tool_call_id)
                    end = j + 1
                elif turns[j].tool_calls:
                    # A new call before all results: keep scanning, it joins this group.
                    pending |= {c.id for c in turns[j].tool_calls}
                    end = j + 1
                j += 1
        groups.append((i, end))
        i = end
    return groups


def oldest_groups_covering(turns: Sequence[Turn], count: int) -> int:
    """How many leading turns to remove to remove at least ``count`` without a split."""
    if count <= 0:
        return 0
    for _start, end in turn_groups(turns):
        if end >= count:
            return end
    return len(turns)


__all__ = ["oldest_groups_covering", "turn_groups"]
