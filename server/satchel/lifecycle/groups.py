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
    """The smallest ranges where every tool call sits with every result that answers it.

    A range grows only to reach results that are there: a call never answered (the
    app dropped a failed tool, the user interrupted) does not hold the rest of the
    conversation in one group, which no trim could then touch.
    """
    if not any(turn.tool_call_id is not None for turn in turns):
        # No results anywhere (a plain chat, every request): no call can pull another
        # turn into its range, so each turn is a range of its own.
        return [(i, i + 1) for i in range(len(turns))]
    # reach[k]: the last result that answers a call of turn k. A result answers the
    # nearest call before it with its id: ids are reused (Gemini-style calls carry no
    # id, so apps use the function name; some servers number calls per response), and
    # pairing a call with the last result of its id anywhere joined the whole history
    # into one group that no trim could touch.
    reach = [-1] * len(turns)
    unclaimed: dict[str, int] = {}  # id -> its last result after this point, no call between
    for j in range(len(turns) - 1, -1, -1):
        turn = turns[j]
        for call in turn.tool_calls:
            reach[j] = max(reach[j], unclaimed.pop(call.id, -1))
        # Any role: Anthropic's Messages API puts tool results in *user* messages.
        if turn.tool_call_id is not None:
            unclaimed.setdefault(turn.tool_call_id, j)
    groups: list[tuple[int, int]] = []
    i, n = 0, len(turns)
    while i < n:
        end = i + 1
        k = i
        while k < end:  # every call inside the range pulls in the results it has
            end = max(end, reach[k] + 1)
            k += 1
        groups.append((i, end))
        i = end
    return groups


def oldest_groups_covering(
    turns: Sequence[Turn], count: int, groups: Sequence[tuple[int, int]] | None = None
) -> int:
    """How many leading turns to remove to remove at least ``count`` without a split.

    ``groups``: ``turn_groups(turns)`` when the caller has them already.
    """
    if count <= 0:
        return 0
    for _start, end in turn_groups(turns) if groups is None else groups:
        if end >= count:
            return end
    return len(turns)


__all__ = ["oldest_groups_covering", "turn_groups"]
