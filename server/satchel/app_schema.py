"""The app's own state in ``ctx.metadata``: versioned, with migrations run on read.

Satchel migrates its own payload layout (:mod:`satchel.schema`). The app's part of the
context, the free-form ``ctx.metadata`` dict (preferences, flags, app state), changes
shape as the app evolves too, and clients keep holding tokens from before the deploy.
A :class:`MetadataSchema` gives it the same treatment: the token records the version
of the metadata's shape (``ctx.metadata_version``), and migrations N -> N+1 run in
order when a token is opened, before the view sees the context::

    satchel = Satchel()                                # SATCHEL_METADATA_VERSION = 1

    @satchel.metadata_migration(from_version=0)
    def tone_becomes_a_preference(meta: dict) -> dict:
        meta["prefs"] = {"tone": meta.pop("tone", "neutral")}
        return meta

A migration gets the metadata dict and returns the new one (changing it in place and
returning it is fine). Like Satchel's own migrations, it may raise ``KeyError``,
``TypeError``, ``ValueError``, ``IndexError`` or ``AttributeError`` for metadata it
cannot upgrade, and what it returns must be a dict a token can carry (checked when the
token opens); otherwise the token is refused as ``token_migration_failed`` (a JSON 400,
or a fresh context with ``SATCHEL_ON_BAD_TOKEN="fresh"``), never a 500. A token whose
metadata is newer than this deployment knows (after a rollback) is refused as
``token_unsupported_version``. Fresh contexts start at the current version.

**Rolling deploys.** Behind a load balancer, old and new replicas serve one
conversation side by side while a deploy rolls out. A replica that writes version N+1
makes tokens the old replicas refuse. So a shape change ships in two deploys, like
a key rotation: the first reads N+1 but still *writes* N (``write_version``, with a
downgrade N+1 -> N registered, so the view works on the new shape and old replicas
never see it); the second, once every replica runs the first, writes N+1::

    app.config["SATCHEL_METADATA_VERSION"] = 1        # the view sees version 1
    app.config["SATCHEL_METADATA_WRITE_VERSION"] = 0  # deploy 1; drop it in deploy 2

    @satchel.metadata_downgrade(from_version=1)
    def preference_becomes_tone(meta: dict) -> dict:
        meta["tone"] = meta.pop("prefs", {}).get("tone", "neutral")
        return meta

A downgrade works on a copy: the view's ``ctx.metadata`` keeps the new shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from .context import Context
from .errors import ConfigurationError, ContextNotSerializable, MigrationFailed, UnsupportedVersion
from .limits import MAX_METADATA_DEPTH

MetadataMigration = Callable[[dict[str, Any]], dict[str, Any]]
#: The largest metadata version a token may record (it travels as a msgpack int).
MAX_METADATA_VERSION = 2**31 - 1
_MIGRATION_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError)


class MetadataSchema:
    """The current version of the app's metadata and the migrations that reach it.

    ``version`` 0 (the default) means unversioned: nothing runs. ``write_version``
    (default: ``version``) is the shape tokens are written in; below ``version`` it
    needs the downgrades down to it (the first deploy of a rolling change, above).
    Migrations and downgrades are code and are shared by :meth:`with_version` copies,
    so one registry can serve apps configured with different versions.
    """

    def __init__(
        self,
        version: int = 0,
        migrations: dict[int, MetadataMigration] | None = None,
        *,
        downgrades: dict[int, MetadataMigration] | None = None,
        write_version: int | None = None,
    ) -> None:
        self.version = check_version(version)
        self.write_version = self.version if write_version is None else check_version(write_version)
        if self.write_version > self.version:
            raise ValueError(
                f"the metadata write version ({self.write_version}) is above the version "
                f"the app reads ({self.version})"
            )
        self._migrations: dict[int, MetadataMigration] = {} if migrations is None else migrations
        self._downgrades: dict[int, MetadataMigration] = {} if downgrades is None else downgrades

    def __repr__(self) -> str:
        return (
            f"MetadataSchema(version={self.version}, write_version={self.write_version}, "
            f"migrations={sorted(self._migrations)}, downgrades={sorted(self._downgrades)})"
        )

    def with_version(self, version: int, write_version: int | None = None) -> MetadataSchema:
        """The same migrations and downgrades with another current (and write) version."""
        return MetadataSchema(
            version, self._migrations, downgrades=self._downgrades, write_version=write_version
        )

    def migration(self, from_version: int) -> Callable[[MetadataMigration], MetadataMigration]:
        """Register ``fn`` as the migration from ``from_version`` to ``from_version + 1``."""
        return registrar(self._migrations, check_version(from_version), "metadata migration")

    def downgrade(self, from_version: int) -> Callable[[MetadataMigration], MetadataMigration]:
        """Register ``fn`` as the downgrade from ``from_version`` to ``from_version - 1``,
        run on a copy of the metadata when tokens are written in an older shape."""
        if check_version(from_version) < 1:
            raise ValueError("a metadata downgrade starts at version 1 or above")
        return registrar(self._downgrades, from_version, "metadata downgrade")

    def missing_downgrades(self) -> list[int]:
        """The downgrades ``write_version`` needs that are not registered (from-versions)."""
        return [v for v in range(self.version, self.write_version, -1) if v not in self._downgrades]

    def missing_migrations(self) -> list[int]:
        """The migrations up to ``version`` that are not registered (from-versions): a
        token of such a version is refused (``token_migration_failed``)."""
        return [v for v in range(self.version) if v not in self._migrations]

    def writing(self, ctx: Context) -> AbstractContextManager[Context]:
        """While sealing: ``ctx`` holds its metadata in the write version's shape.

        A copy is downgraded and swapped in; the view's metadata comes back afterwards.
        When the shapes agree (every request but during a two-deploy change), ``ctx`` is
        used as it is. Raises :class:`~satchel.errors.ConfigurationError` when a
        downgrade is missing and :class:`~satchel.errors.ContextNotSerializable` when
        one fails (both app bugs: the request gets a JSON 500 and no token).
        """
        if ctx.metadata_version <= self.write_version:
            return nullcontext(ctx)
        missing = self.missing_downgrades()
        if missing:
            raise ConfigurationError(
                f"SATCHEL_METADATA_WRITE_VERSION is {self.write_version}, but no metadata "
                f"downgrade from version {missing[0]} is registered (Satchel.metadata_downgrade)"
            )
        return self._downgraded(ctx)

    @contextmanager
    def _downgraded(self, ctx: Context) -> Iterator[Context]:
        version = target = ctx.metadata_version
        metadata = _copy_value(ctx.metadata, 0)
        while target > self.write_version:
            metadata, problem = _step(
                self._downgrades[target], metadata, f"metadata downgrade {target} -> {target - 1}"
            )
            if problem is not None:
                raise ContextNotSerializable(problem)
            target -= 1
        kept = ctx.metadata
        ctx.metadata, ctx.metadata_version = metadata, target
        try:
            yield ctx
        finally:
            ctx.metadata, ctx.metadata_version = kept, version

    def upgrade(self, ctx: Context) -> int | None:
        """Bring ``ctx.metadata`` to the current version.

        Returns the version it had when a migration ran, else None. Raises
        :class:`~satchel.errors.MigrationFailed` or
        :class:`~satchel.errors.UnsupportedVersion` (both ``BadToken``).
        """
        original = version = ctx.metadata_version
        if version == self.version:
            return None
        if version > self.version:
            raise UnsupportedVersion(
                f"the token's app metadata is version {version}; this deployment knows "
                f"versions up to {self.version}",
                metadata_version=version,
            )
        metadata = ctx.metadata
        while version < self.version:
            step = self._migrations.get(version)
            if step is None:
                raise MigrationFailed(
                    f"no metadata migration from version {version}", from_version=version
                )
            metadata, problem = _step(
                step, metadata, f"metadata migration {version} -> {version + 1}"
            )
            if problem is not None:
                raise MigrationFailed(problem, from_version=version)
            version += 1
        ctx.metadata = metadata
        ctx.metadata_version = version
        return original


def _copy_value(value: Any, depth: int) -> Any:
    """A deep copy of metadata for a downgrade to change freely, as it would be sealed:
    containers copied, ``bytearray`` and ``memoryview`` as bytes (which the sealer
    writes them as; ``copy.deepcopy`` cannot copy a memoryview, and failed the save
    with a TypeError only while a deploy wrote the older shape). Anything else is
    immutable or is refused by the sealer anyway. Past the depth the sealer allows,
    ContextNotSerializable (a cycle would not end)."""
    if depth > MAX_METADATA_DEPTH:
        raise ContextNotSerializable("metadata is nested deeper than a token carries")
    if isinstance(value, dict):
        return {key: _copy_value(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_value(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(_copy_value(item, depth + 1) for item in value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value


def _step(
    fn: MetadataMigration, metadata: dict[str, Any], name: str
) -> tuple[dict[str, Any], str | None]:
    """Run one migration or downgrade: the new metadata, or the old one and why not.

    App code: it may raise ``KeyError``, ``TypeError``, ``ValueError``, ``IndexError``
    or ``AttributeError`` for data it cannot convert; anything else is a bug that
    propagates.
    """
    try:
        out = fn(metadata)
    except _MIGRATION_ERRORS as exc:
        return metadata, f"{name} failed: {type(exc).__name__}"
    if not isinstance(out, dict):
        return metadata, f"{name} returned {type(out).__name__}, not a dict"
    return out, None


def registrar(registry: dict[int, Any], from_version: int, what: str) -> Callable[[Any], Any]:
    """A decorator that files a step under ``from_version`` in ``registry``, once
    (``what`` names the kind in the error: "metadata migration", "migration"...)."""

    def register(fn: Any) -> Any:
        if from_version in registry:
            raise ValueError(f"a {what} from version {from_version} is already registered")
        registry[from_version] = fn
        return fn

    return register


def check_version(version: int) -> int:
    """``version`` if it is a valid metadata version (an int, 0..2**31-1); else raise
    TypeError or ValueError. Also the check applied to ``mv`` when a token is read."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError("a metadata version is an int")
    if not 0 <= version <= MAX_METADATA_VERSION:
        raise ValueError(f"a metadata version is 0..{MAX_METADATA_VERSION}")
    return version


__all__ = [
    "MAX_METADATA_DEPTH",
    "MAX_METADATA_VERSION",
    "MetadataMigration",
    "MetadataSchema",
    "check_version",
    "registrar",
]
