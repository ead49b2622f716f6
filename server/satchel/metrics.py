"""Prometheus metrics for Satchel, as an :class:`~satchel.observe.Observer`.

::

    from satchel.metrics import PrometheusObserver, metrics_response

    obs = PrometheusObserver()              # its own CollectorRegistry
    satchel = Satchel(app, observer=obs)

    @app.get("/metrics")
    def metrics():
        return metrics_response(obs.registry)

Every metric is named ``<namespace>_...`` (``satchel_`` by default) and every label
takes a small, code-defined set of values: a step, a reason code, a schema version,
a key id, a tier name. A session id or session tag is never a label. Label values
that do not look like a code are reported as ``"other"``, and each label of each
metric holds at most :data:`MAX_LABEL_VALUES` distinct values (later ones become
``"other"``), so a bug or a hostile input cannot blow up the series count.

Metrics (labels in braces; the event or call that moves them after the colon):

* ``satchel_step_seconds{step}`` histogram: ``timing(step, seconds)`` for open, verify,
  decompress, unpack, migrate, rehydrate, trim, summarize, overflow, seal
* ``satchel_token_bytes`` histogram: ``token(size=)``
* ``satchel_token_compression_ratio`` histogram: ``token()``, raw_size / size when
  raw_size > 0
* ``satchel_token_turns`` histogram: ``token(turns=)``
* ``satchel_tokens_issued_total``: issued
* ``satchel_tokens_opened_total{mode,kid}``: opened
* ``satchel_tokens_refused_total{reason}``: refused (reason = the error code)
* ``satchel_session_refused_total{reason}``: session_refused (a flask.session overflow
  reference whose stored copy is gone or whose signature is wrong; apart from the
  tokens, so the token ratios and alerts keep their meaning)
* ``satchel_tokens_expired_total{reason}``: expired (token, idle, max_age)
* ``satchel_tokens_resealed_total``: resealed
* ``satchel_seal_failures_total{error}``: seal_failed (budget_exceeded,
  context_not_serializable, configuration_error)
* ``satchel_sessions_started_total``: session_started
* ``satchel_migrations_total{from_version}``: migrated
* ``satchel_metadata_migrations_total{from_version}``: metadata_migrated (the app's
  ``ctx.metadata``, satchel.app_schema)
* ``satchel_trims_total{reason}`` and ``satchel_trimmed_turns_total{reason}``: trimmed
* ``satchel_summarized_turns_total``: summarized
* ``satchel_overflow_writes_total``, ``satchel_overflow_write_bytes_total``: overflowed
* ``satchel_overflow_reads_total``, ``satchel_overflow_read_turns_total``: rehydrated
* ``satchel_overflow_misses_total{reason}``: degraded with reason segment_missing,
  segment_corrupt, segment_foreign or tier_unavailable
* ``satchel_segments_restored_total``: segments_restored (cached segments written back
  to a tier that may have lost them in an outage)
* ``satchel_degraded_total{reason}``: degraded
* ``satchel_degraded_responses_total``: degraded_response (once per response, however
  many reasons it carries)
* ``satchel_unavailable_total{reason}``: unavailable (a request answered 503 because
  the tier could not serve it: server and memory mode, ``monotonic`` under
  ``fail_closed``; reason tier_unavailable or tier_full)
* ``satchel_data_loss_total``, ``satchel_data_loss_turns_total``: data_loss
* ``satchel_forks_total``: fork_detected
* ``satchel_stale_refused_total``: stale_refused
* ``satchel_stale_recovered_total``: stale_refused with ``recovered`` (the 409 handed
  the newest token back)
* ``satchel_busy_refused_total``: busy_refused (409 ``context_busy``: a streamed reply
  was answering that token or stored state)
* ``satchel_marks_lost_total``: mark_lost (a marked session's monotonic mark was gone
  from the tier: it lost data)
* ``satchel_erased_total``: erased
* ``satchel_erase_failures_total{error}``: erase_failed (tier_unavailable, tier_full...)
* ``satchel_breaker_state{tier}`` gauge (0 closed, 1 half-open, 2 open) and
  ``satchel_breaker_transitions_total{tier,state}``: breaker_opened, breaker_half_open,
  breaker_closed
* ``satchel_segment_cache_{hits,misses,evictions}_total{tier}`` and
  ``satchel_segment_cache_{bytes,entries}{tier}``: read from the tier's segment cache
  at scrape time, once :meth:`PrometheusObserver.watch_tier` was given the tier (the
  ``/metrics`` route of :mod:`satchel.flask_ext.routes` does that)

With several gunicorn workers each process has its own registry; set
``PROMETHEUS_MULTIPROC_DIR`` (before the app starts) and :func:`metrics_response`
aggregates every worker's values (prometheus_client's multiprocess mode). Then also
set :func:`gunicorn_child_exit` as gunicorn's ``child_exit`` hook, so that a dead
worker's gauges (``satchel_breaker_state``) stop counting::

    # gunicorn.conf.py
    from satchel.metrics import gunicorn_child_exit as child_exit
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import prometheus_client
from flask import Response, has_request_context, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from .observe import Observer

log = logging.getLogger("satchel.metrics")

#: The steps of one request, as reported through ``Observer.timing``.
STEPS = (
    "open",
    "verify",
    "decompress",
    "unpack",
    "migrate",
    "rehydrate",
    "trim",
    "summarize",
    "overflow",
    "seal",
)

#: Step latency buckets, seconds: most steps take tens to hundreds of microseconds.
STEP_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
# 8000: the default hard cap (SATCHEL_HARD_MAX_TOKEN_BYTES), so saturation shows.
TOKEN_BYTES_BUCKETS = (
    256,
    512,
    1024,
    2048,
    3072,
    3800,
    4096,
    6144,
    8000,
    8192,
    16384,
    32768,
    65536,
)
RATIO_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
TURN_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 64, 128, 256)

#: breaker state -> gauge value
BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
_BREAKER_EVENTS = {
    "breaker_closed": "closed",
    "breaker_half_open": "half_open",
    "breaker_opened": "open",
}
#: degraded reasons that mean an overflowed segment could not be read
OVERFLOW_MISS_REASONS = frozenset(
    {"segment_missing", "segment_corrupt", "segment_foreign", "tier_unavailable"}
)

#: Every reason a response is flagged degraded for (docs/operations.md).
DEGRADED_REASONS = OVERFLOW_MISS_REASONS | {
    "tier_write_failed",
    "data_loss",
    "consistency_unchecked",
    "consistency_reset",
    "summarizer_failed",
    "token_counter_failed",
    "session_unavailable",
    "session_not_saved",
}
#: The codes of a context that could not be sealed.
# configuration_error: tokens are to be written in a metadata shape with no registered
# downgrade (SATCHEL_METADATA_WRITE_VERSION), which /readyz reports as not ready.
SEAL_FAILURE_CODES = frozenset(
    {"budget_exceeded", "context_not_serializable", "configuration_error"}
)

MAX_LABEL_VALUES = 64
OTHER = "other"
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,47}$")


class _TierCacheCollector:
    """Reads the segment cache counters of watched tiers at scrape time."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tiers: dict[str, Any] = {}

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self.tiers)

    def _families(self, tiers: dict[str, Any] | None = None) -> Iterator[Metric]:
        p = self.prefix
        hits = CounterMetricFamily(
            f"{p}_segment_cache_hits",
            "Segment lookups served by the in-process cache",
            labels=["tier"],
        )
        misses = CounterMetricFamily(
            f"{p}_segment_cache_misses",
            "Segment lookups the in-process cache could not serve",
            labels=["tier"],
        )
        evictions = CounterMetricFamily(
            f"{p}_segment_cache_evictions",
            "Segments pushed out of the in-process cache by its byte bound",
            labels=["tier"],
        )
        size = GaugeMetricFamily(
            f"{p}_segment_cache_bytes",
            "Bytes held by the in-process segment cache",
            labels=["tier"],
        )
        entries = GaugeMetricFamily(
            f"{p}_segment_cache_entries",
            "Segments held by the in-process segment cache",
            labels=["tier"],
        )
        for name, tier in (tiers or {}).items():
            cache = getattr(tier, "cache", None)
            stats = getattr(cache, "stats", None)
            if stats is None:
                continue
            try:
                s = stats()
            except Exception:  # a scrape must never fail because of one tier
                log.debug("segment cache stats failed for %s", name, exc_info=True)
                continue
            hits.add_metric([name], s.get("hits", 0))
            misses.add_metric([name], s.get("misses", 0))
            evictions.add_metric([name], s.get("evictions", 0))
            size.add_metric([name], s.get("bytes", 0))
            entries.add_metric([name], s.get("entries", 0))
        yield from (hits, misses, evictions, size, entries)


class PrometheusObserver(Observer):
    """Turns Satchel's events, step timings and token facts into Prometheus metrics.

    ``registry``: where the metrics are registered; a new
    :class:`~prometheus_client.CollectorRegistry` per instance when None, so several
    apps in one process never clash. ``namespace`` prefixes every metric name.
    Never raises into the request path.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        namespace: str = "satchel",
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.namespace = namespace
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], set[str]] = {}
        ns, reg = namespace, self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, namespace=ns, registry=reg)

        self.step_seconds = Histogram(
            "step_seconds",
            "Time spent in one step of the request pipeline",
            ["step"],
            namespace=ns,
            registry=reg,
            buckets=STEP_BUCKETS,
        )
        self.token_bytes = Histogram(
            "token_bytes",
            "Length of issued tokens, bytes",
            namespace=ns,
            registry=reg,
            buckets=TOKEN_BYTES_BUCKETS,
        )
        self.compression_ratio = Histogram(
            "token_compression_ratio",
            "Payload bytes before compression / token bytes, for issued tokens",
            namespace=ns,
            registry=reg,
            buckets=RATIO_BUCKETS,
        )
        self.token_turns = Histogram(
            "token_turns",
            "Turns held inline by issued tokens",
            namespace=ns,
            registry=reg,
            buckets=TURN_BUCKETS,
        )
        self.issued = counter("tokens_issued", "Tokens issued")
        self.opened = counter("tokens_opened", "Tokens opened and verified", ("mode", "kid"))
        self.refused = counter("tokens_refused", "Tokens refused, by error code", ("reason",))
        self.session_refused = counter(
            "session_refused",
            "flask.session overflow references refused (copy gone, forged), by error code",
            ("reason",),
        )
        self.expired = counter("tokens_expired", "Tokens refused as expired, by cause", ("reason",))
        self.resealed = counter("tokens_resealed", "Tokens resealed (key rotation or upgrade)")
        self.seal_failures = counter(
            "seal_failures",
            "Contexts that could not be sealed (an error response, no token), by error code",
            ("error",),
        )
        self.sessions_started = counter(
            "sessions_started", "Sessions started: fresh contexts whose first token was issued"
        )
        self.migrations = counter(
            "migrations", "Contexts migrated from an older schema version", ("from_version",)
        )
        self.metadata_migrations = counter(
            "metadata_migrations",
            "Contexts whose app metadata was migrated on read, by version",
            ("from_version",),
        )
        self.trims = counter("trims", "Lifecycle trims, by policy", ("reason",))
        self.trimmed_turns = counter("trimmed_turns", "Turns dropped by trims", ("reason",))
        self.summarized_turns = counter("summarized_turns", "Turns folded into the summary")
        self.overflow_writes = counter("overflow_writes", "Segments written to the overflow tier")
        self.overflow_write_bytes = counter(
            "overflow_write_bytes", "Bytes written to the overflow tier"
        )
        self.overflow_reads = counter(
            "overflow_reads", "Rehydrations that read overflowed turns back"
        )
        self.overflow_read_turns = counter(
            "overflow_read_turns", "Turns read back from the overflow tier"
        )
        self.overflow_misses = counter(
            "overflow_misses", "Overflowed segments that could not be read, by reason", ("reason",)
        )
        self.degraded = counter("degraded", "Degraded responses, by reason", ("reason",))
        # One response can be degraded for several reasons: the share of degraded
        # responses needs a count of responses, not of reasons.
        self.degraded_responses = counter(
            "degraded_responses", "Responses that carried Satchel-Degraded (any reason)"
        )
        self.unavailable = counter(
            "unavailable",
            "Requests answered 503 because the tier could not serve them, by reason",
            ("reason",),
        )
        self.segments_restored = counter(
            "segments_restored", "Cached segments written back to the tier after an outage"
        )
        self.data_loss = counter("data_loss", "Events where turns were lost without a summary")
        self.data_loss_turns = counter("data_loss_turns", "Turns lost (tier refused the overflow)")
        self.forks = counter(
            "forks", "Forked contexts detected (a token replayed after a newer one)"
        )
        self.stale_refused = counter(
            "stale_refused",
            "Stale tokens refused (monotonic consistency) and server-mode saves that lost a race",
        )
        self.stale_recovered = counter(
            "stale_recovered",
            "Stale refusals that handed the newest token back (its response had been lost)",
        )
        self.busy_refused = counter(
            "busy_refused",
            "Requests refused 409 context_busy (a streamed reply held the token or session)",
        )
        self.marks_lost = counter(
            "marks_lost",
            "Monotonic marks the tier lost (a token of a marked session found none)",
        )
        self.erased = counter("erased", "Sessions erased")
        self.erase_failures = counter(
            "erase_failures",
            "Erasures that failed (the tier could not be reached), by error",
            ("error",),
        )
        # Multiprocess mode: the worst state among *live* workers. "max" would keep a
        # dead worker's open breaker forever; "live*" files are the ones
        # mark_process_dead removes, which gunicorn_child_exit calls.
        self.breaker_state = Gauge(
            "breaker_state",
            "Overflow tier circuit breaker: 0 closed, 1 half-open, 2 open",
            ["tier"],
            namespace=ns,
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.breaker_transitions = counter(
            "breaker_transitions", "Circuit breaker state changes", ("tier", "state")
        )
        self._cache_collector = _TierCacheCollector(namespace)
        self.registry.register(self._cache_collector)
        # Labelled children, looked up once: labels() costs more than observe() itself.
        self._step_children: dict[str, Any] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        for step in STEPS:  # every step's series exists from the start (zero counts)
            self._step_children[step] = self.step_seconds.labels(self._label("step", "step", step))
        # The series alerts watch exist from the start, at 0: Prometheus' increase() over
        # a series that first appears at 1 is 0, so the first corrupt segment or failed
        # seal (the events that matter most) would page nobody.
        for metric, key, label, values in (
            (self.degraded, "degraded", "reason", DEGRADED_REASONS),
            (self.overflow_misses, "degraded", "reason", OVERFLOW_MISS_REASONS),
            (self.seal_failures, "seal_failed", "error", SEAL_FAILURE_CODES),
            (self.unavailable, "unavailable", "reason", ("tier_unavailable", "tier_full")),
            (self.erase_failures, "erase_failed", "error", ("tier_unavailable", "tier_full")),
        ):
            for value in sorted(values):
                self._child(metric, self._label(key, label, value))

    def __repr__(self) -> str:
        return f"PrometheusObserver(namespace={self.namespace!r})"

    # -- labels ---------------------------------------------------------------------------

    def _label(self, metric: str, label: str, value: Any) -> str:
        """A safe label value: a short code, else "other"; bounded per metric and label."""
        text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
        key = (metric, label)
        seen = self._seen.get(key)
        if seen is not None and text in seen:  # checked when it was first seen
            return text
        if not _LABEL_RE.fullmatch(text):
            return OTHER
        with self._lock:
            seen = self._seen.setdefault(key, set())
            if text in seen:
                return text
            if len(seen) >= MAX_LABEL_VALUES:
                return OTHER
            seen.add(text)
            return text

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: label values are already bounded by
        :meth:`_label`, and prometheus_client's ``labels()`` locks and validates on
        every call."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    @staticmethod
    def _count(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return 0
        return max(0, int(value))

    # -- Observer -------------------------------------------------------------------------

    def timing(self, step: str, seconds: float) -> None:
        try:
            if seconds < 0:
                return
            child = self._step_children.get(step)
            if child is None:
                child = self.step_seconds.labels(self._label("step", "step", step))
            child.observe(seconds)
        except Exception:
            log.debug("satchel metrics: timing(%r) failed", step, exc_info=True)

    def token(self, *, size: int, raw_size: int, turns: int) -> None:
        try:
            self.token_bytes.observe(size)
            self.token_turns.observe(turns)
            if raw_size > 0 and size > 0:
                self.compression_ratio.observe(raw_size / size)
        except Exception:
            log.debug("satchel metrics: token() failed", exc_info=True)

    def event(self, name: str, /, **fields: Any) -> None:
        try:
            self._event(name, fields)
        except Exception:
            log.debug("satchel metrics: event(%r) failed", name, exc_info=True)

    def _event(self, name: str, fields: dict[str, Any]) -> None:
        reason = fields.get("reason")
        if name == "issued":
            self.issued.inc()
        elif name == "opened":
            self._child(
                self.opened,
                self._label("opened", "mode", fields.get("mode")),
                self._label("opened", "kid", fields.get("kid")),
            ).inc()
        elif name == "refused":
            self._child(self.refused, self._label("refused", "reason", reason)).inc()
        elif name == "session_refused":
            label = self._label("session_refused", "reason", reason)
            self._child(self.session_refused, label).inc()
        elif name == "expired":
            self._child(self.expired, self._label("expired", "reason", reason)).inc()
        elif name == "resealed":
            self.resealed.inc()
        elif name == "seal_failed":
            self._child(
                self.seal_failures, self._label("seal_failed", "error", fields.get("error"))
            ).inc()
        elif name == "session_started":
            self.sessions_started.inc()
        elif name == "metadata_migrated":
            self._child(
                self.metadata_migrations,
                self._label("metadata_migrated", "from_version", fields.get("from_version")),
            ).inc()
        elif name == "migrated":
            self._child(
                self.migrations, self._label("migrated", "from_version", fields.get("from_version"))
            ).inc()
        elif name == "trimmed":
            label = self._label("trimmed", "reason", reason)
            self._child(self.trims, label).inc()
            self._child(self.trimmed_turns, label).inc(self._count(fields.get("turns")))
        elif name == "summarized":
            self.summarized_turns.inc(self._count(fields.get("turns")))
        elif name == "overflowed":
            self.overflow_writes.inc()
            self.overflow_write_bytes.inc(self._count(fields.get("bytes")))
        elif name == "rehydrated":
            self.overflow_reads.inc()
            self.overflow_read_turns.inc(self._count(fields.get("turns")))
        elif name == "degraded":
            label = self._label("degraded", "reason", reason)
            self._child(self.degraded, label).inc()
            if reason in OVERFLOW_MISS_REASONS:
                self._child(self.overflow_misses, label).inc()
        elif name == "degraded_response":
            self.degraded_responses.inc()
        elif name == "unavailable":
            self._child(self.unavailable, self._label("unavailable", "reason", reason)).inc()
        elif name == "segments_restored":
            self.segments_restored.inc(self._count(fields.get("count")))
        elif name == "data_loss":
            self.data_loss.inc()
            self.data_loss_turns.inc(self._count(fields.get("turns")))
        elif name == "fork_detected":
            self.forks.inc()
        elif name == "stale_refused":
            self.stale_refused.inc()
            if fields.get("recovered"):
                self.stale_recovered.inc()
        elif name == "busy_refused":
            self.busy_refused.inc()
        elif name == "mark_lost":
            self.marks_lost.inc()
        elif name == "erased":
            self.erased.inc()
        elif name == "erase_failed":
            error = self._label("erase_failed", "error", fields.get("error") or "tier_unavailable")
            self._child(self.erase_failures, error).inc()
        elif name in _BREAKER_EVENTS:
            state = _BREAKER_EVENTS[name]
            tier = self._label("breaker", "tier", fields.get("tier") or "tier")
            self._child(self.breaker_state, tier).set(BREAKER_VALUES[state])
            self._child(self.breaker_transitions, tier, state).inc()

    # -- tiers ----------------------------------------------------------------------------

    def watch_tier(self, tier: Any) -> None:
        """Export ``tier``'s segment cache counters (read at scrape time) and set the
        breaker gauge to its current state. Idempotent; ``None`` is ignored.

        ``tier`` is a :class:`~satchel.tiers.guard.GuardedTier` (anything with
        ``.name``, ``.cache.stats()`` and ``.breaker_state`` works).
        """
        if tier is None:
            return
        try:
            name = self._label("breaker", "tier", getattr(tier, "name", None) or "tier")
            self._cache_collector.tiers[name] = tier
            state = getattr(tier, "breaker_state", None)
            if state in BREAKER_VALUES:
                self.breaker_state.labels(name).set(BREAKER_VALUES[state])
        except Exception:
            log.debug("satchel metrics: watch_tier failed", exc_info=True)


def metrics_response(registry: CollectorRegistry) -> Response:
    """The Prometheus exposition of ``registry`` as a Flask response.

    Honours the scraper's ``Accept`` header (Prometheus text or OpenMetrics). With
    ``PROMETHEUS_MULTIPROC_DIR`` set, reports the values of every worker process
    instead (prometheus_client multiprocess mode).
    """
    accept = request.headers.get("Accept") if has_request_context() else None
    encoder, content_type = choose_encoder(accept or "")
    path = _multiproc_dir()
    if path and _multiprocess_values():
        registry = CollectorRegistry()
        registry.register(_SettledFilesCollector(path))
    elif path:
        _warn_late_multiproc_dir(path)
    response = Response(encoder(registry), status=200)
    response.headers["Content-Type"] = content_type
    response.headers["Cache-Control"] = "no-store"
    return response


class _SettledFilesCollector:
    """prometheus_client's multiprocess merge of every worker's files, less the ones
    still empty: a worker creates its file, then sizes it, and a scrape that read it in
    between raised struct.error (an HTML 500 from /metrics)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = []
        for name in glob.glob(os.path.join(self.path, "*.db")):
            try:
                if os.path.getsize(name) > 0:
                    files.append(name)
            except OSError:  # removed since the glob: a dead worker's gauges, forgotten
                continue
        return MultiProcessCollector.merge(files, accumulate=True)


_late_dir_warned = False


def _multiprocess_values() -> bool:
    """Whether this process writes its metrics to PROMETHEUS_MULTIPROC_DIR.

    prometheus_client picks its value class once, when it is first imported: a
    directory named after that (gunicorn's ``--env``/``raw_env`` are applied after
    ``gunicorn.conf.py`` imported :func:`gunicorn_child_exit`, and so prometheus_client)
    holds no file of this process, and merging it would report nothing at all.
    """
    from prometheus_client import values

    # prometheus_client's own names, read with care: a release that renames them must
    # not make /metrics fail; then the directory is trusted, as before.
    value_class = getattr(values, "ValueClass", None)
    mutex_value = getattr(values, "MutexValue", None)
    return value_class is None or mutex_value is None or value_class is not mutex_value


def _warn_late_multiproc_dir(path: str) -> None:
    global _late_dir_warned
    if not _late_dir_warned:
        _late_dir_warned = True
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR=%s was set after prometheus_client was imported "
            "(gunicorn's --env or raw_env are applied after gunicorn.conf.py runs): this "
            "worker's metrics are not in that directory, so /metrics reports this worker "
            "only. Set it in the environment gunicorn starts with.",
            path,
        )


def _multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


def gunicorn_child_exit(server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook for multiprocess mode: forget a dead worker's
    gauges (prometheus_client's ``mark_process_dead``).

    Without it, the files a worker left in ``PROMETHEUS_MULTIPROC_DIR`` keep reporting
    its last gauge values until the directory is wiped at the next deploy: a worker
    that died with its breaker open keeps ``satchel_breaker_state`` at 2, and the
    breaker alert firing. Its counters and histograms stay, as they should (they are
    totals). In ``gunicorn.conf.py``::

        from satchel.metrics import gunicorn_child_exit as child_exit

    A no-op without ``PROMETHEUS_MULTIPROC_DIR``. Other servers: call
    ``prometheus_client.multiprocess.mark_process_dead(pid)`` when a worker exits.
    """
    path = _multiproc_dir()
    if not path:
        return
    pid = getattr(worker, "pid", None)
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)
    except Exception:
        # This runs in gunicorn's master: an exception escaping the hook ends its main
        # loop ("Unhandled exception in main loop"), stopping every worker over what
        # is at worst a stale gauge.
        log.warning("satchel metrics: mark_process_dead(%r) failed", pid, exc_info=True)


def gunicorn_when_ready(server: Any) -> None:
    """gunicorn's ``when_ready`` hook for multiprocess mode with ``--preload``: forget
    the gauges the master process wrote while it loaded the app.

    With ``--preload`` (or any server that forks after import) the app, and its
    :class:`PrometheusObserver`, are made in the master. An app that touches the tier
    at start-up (a readiness check, a warm-up request) while the tier is down opens the
    master's breaker, and the master's ``gauge_livemax_<pid>.db`` then reports
    ``satchel_breaker_state`` 2 for as long as the master lives: it serves no request
    that could close it, and ``child_exit`` never names it. In ``gunicorn.conf.py``::

        from satchel.metrics import gunicorn_when_ready as when_ready

    A no-op without ``PROMETHEUS_MULTIPROC_DIR``. Never raises into the master.
    """
    path = _multiproc_dir()
    if not path:
        return
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), path)
    except Exception:
        log.warning("satchel metrics: mark_process_dead(master) failed", exc_info=True)


CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

__all__ = [
    "BREAKER_VALUES",
    "CONTENT_TYPE",
    "STEPS",
    "STEP_BUCKETS",
    "PrometheusObserver",
    "gunicorn_child_exit",
    "gunicorn_when_ready",
    "metrics_response",
]
