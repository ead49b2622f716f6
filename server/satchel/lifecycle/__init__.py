"""Lifecycle policies: pure functions that decide what stays in the token."""

from .groups import oldest_groups_covering, turn_groups
from .policy import (
    DEFAULT_HARD_MAX_TOKEN_BYTES,
    LifecyclePolicy,
    apply_policies,
    cap_turn_sizes,
    check_age,
    drop_oldest,
    expires_at,
)
from .summarize import ExtractiveSummarizer, Summarizer
from .tokens import TokenCounter, default_counter, estimate_tokens

__all__ = [
    "DEFAULT_HARD_MAX_TOKEN_BYTES",
    "ExtractiveSummarizer",
    "LifecyclePolicy",
    "Summarizer",
    "TokenCounter",
    "apply_policies",
    "cap_turn_sizes",
    "check_age",
    "default_counter",
    "drop_oldest",
    "estimate_tokens",
    "expires_at",
    "oldest_groups_covering",
    "turn_groups",
]
