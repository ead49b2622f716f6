"""Atomic groups of turns: what trimming may drop or move together, and nothing less.

A group is one exchange: a user turn and everything that answers it (assistant turns,
tool calls and their results) up to the next user turn. Trimming by exchange means
no trim leaves a tool result without its call (providers reject such histories), a
call without its results, or an answer without the question it answers.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..context import Turn


def turn_groups(turns: Sequence[Turn]) -> list[tuple[int, int]]:
    """Half-open index ranges ``[start, end)`` covering ``turns``, oldest first.

    Exchanges (a user turn and its answers), widened where a tool call's results come
    after the next user turn, so a call and its results always share a group.
    """
    groups: list[tuple[int, int]] = []
    for start, end in _tool_groups(turns):
        if groups and turns[start].role != "user":
            groups[-1] = (groups[-1][0], end)  # an answer joins the exchange it answers
        else:
            groups.append((start, end))
    return groups


def _tool_groups(turns: Sequence[Turn]) -> list[tuple[int, int]]:
    """Ranges where each tool call sits with every result that answers it."""
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
