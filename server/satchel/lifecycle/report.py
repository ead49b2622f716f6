"""What the lifecycle's hooks did during one save, for the pipeline to report.

Summarizers and token counters are the app's own callables, called deep inside the
pure policy steps (trim, the byte budget's overflow). When one fails, the step falls
back (the extractive summary, the documented token estimate) so the request still
succeeds; but a fallback is a degraded path, and the operator must be able to see it
in the response and in the metrics, not only in a log line. The steps cannot reach the
response or the observer (arrows point down, from the edge to the steps), so they note
what happened here, in a report the pipeline sets around the steps and reads after.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

#: The configured summarizer raised or returned something that is not a summary; the
#: extractive summarizer made this save's summary instead.
SUMMARIZER_FAILED = "summarizer_failed"
#: The configured token counter raised or answered nonsense for some text; the
#: documented estimate counted that text for the LLM-token budget.
TOKEN_COUNTER_FAILED = "token_counter_failed"


@dataclass(slots=True)
class LifecycleReport:
    """Filled in by the hooks while the pipeline's lifecycle steps run."""

    #: seconds spent inside summarizers (the pipeline's ``summarize`` step)
    summarize_seconds: list[float] = field(default_factory=list)
    #: degraded reason -> the failure underneath (an exception's type name: never its
    #: message, which may quote conversation content)
    faults: dict[str, str] = field(default_factory=dict)


#: The report of the save in progress, or None outside one (a policy applied by hand).
current_report: ContextVar[LifecycleReport | None] = ContextVar(
    "satchel_lifecycle_report", default=None
)


def note_fault(reason: str, detail: str) -> None:
    """Record that a hook failed and the step fell back (first cause per reason kept)."""
    report = current_report.get()
    if report is not None:
        report.faults.setdefault(reason, detail)


__all__ = [
    "SUMMARIZER_FAILED",
    "TOKEN_COUNTER_FAILED",
    "LifecycleReport",
    "current_report",
    "note_fault",
]
