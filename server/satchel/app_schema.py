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
cannot upgrade: the token is then refused as ``token_migration_failed`` (a JSON 400,
or a fresh context with ``SATCHEL_ON_BAD_TOKEN="fresh"``), never a 500. A token whose
metadata is newer than this deployment knows (after a rollback) is refused as
``token_unsupported_version``. Fresh contexts start at the current version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .context import Context
from .errors import MigrationFailed, UnsupportedVersion

MetadataMigration = Callable[[dict[str, Any]], dict[str, Any]]
#: The largest metadata version a token may record (it travels as a msgpack int).
MAX_METADATA_VERSION = 2**31 - 1
_MIGRATION_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError)


class MetadataSchema:
    """The current version of the app's metadata and the migrations that reach it.

    ``version`` 0 (the default) means unversioned: nothing runs. Migrations are code
    and are shared by :meth:`with_version` copies, so one registry can serve apps
    configured with different versions.
    """

    def __init__(
        self, version: int = 0, migrations: dict[int, MetadataMigration] | None = None
    ) -> None:
        self.version = check_version(version)
        self._migrations: dict[int, MetadataMigration] = {} if migrations is None else migrations

    def __repr__(self) -> str:
        return f"MetadataSchema(version={self.version}, migrations={sorted(self._migrations)})"

    def with_version(self, version: int) -> MetadataSchema:
        """The same migrations with another current version."""
        return MetadataSchema(version, self._migrations)

    def migration(self, from_version: int) -> Callable[[MetadataMigration], MetadataMigration]:
        """Register ``fn`` as the migration from ``from_version`` to ``from_version + 1``."""
        check_version(from_version)

        def register(fn: MetadataMigration) -> MetadataMigration:
            if from_version in self._migrations:
                raise ValueError(f"a metadata migration from {from_version} is already registered")
            self._migrations[from_version] = fn
            return fn

        return register

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
            try:
                metadata = step(metadata)
            except _MIGRATION_ERRORS as exc:
                raise MigrationFailed(
                    f"metadata migration {version} -> {version + 1} failed: {type(exc).__name__}",
                    from_version=version,
                ) from None
            if not isinstance(metadata, dict):
                raise MigrationFailed(
                    f"metadata migration from {version} returned {type(metadata).__name__}, "
                    "not a dict",
                    from_version=version,
                )
            version += 1
        ctx.metadata = metadata
        ctx.metadata_version = version
        return original


def check_version(version: int) -> int:
    """``version`` if it is a valid metadata version (an int, 0..2**31-1); else raise
    TypeError or ValueError. Also the check applied to ``mv`` when a token is read."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError("a metadata version is an int")
    if not 0 <= version <= MAX_METADATA_VERSION:
        raise ValueError(f"a metadata version is 0..{MAX_METADATA_VERSION}")
    return version


__all__ = ["MAX_METADATA_VERSION", "MetadataMigration", "MetadataSchema", "check_version"]
