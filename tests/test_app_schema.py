"""The app's own metadata, versioned: migrations on read (satchel.app_schema)."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from satchel import Codec, Context, Keyring, Satchel, schema, serialize
from satchel.app_schema import MetadataSchema
from satchel.errors import (
    ConfigurationError,
    InvalidContext,
    MigrationFailed,
    UnsupportedVersion,
)
from satchel.lifecycle import LifecyclePolicy
from satchel.server_mode import ServerSidePipeline
from satchel.tiers import BreakerPolicy, GuardedTier, MemoryTier, SegmentCache

NOW = 1_800_000_000
RING = Keyring.generate("k1")


def tone_to_prefs(meta: dict[str, Any]) -> dict[str, Any]:
    meta["prefs"] = {"tone": meta.pop("tone", "neutral")}
    return meta


def prefs_to_list(meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "prefs": sorted(meta["prefs"].items())}


def schema_v2() -> MetadataSchema:
    s = MetadataSchema(2)
    s.migration(from_version=0)(tone_to_prefs)
    s.migration(from_version=1)(prefs_to_list)
    return s


def context(version: int = 0, **metadata: Any) -> Context:
    ctx = Context.new(now=NOW)
    ctx.metadata = dict(metadata)
    ctx.metadata_version = version
    return ctx


# -- the registry -------------------------------------------------------------------------


def test_migrations_run_in_order_up_to_the_current_version() -> None:
    ctx = context(tone="formal", plan="pro")
    assert schema_v2().upgrade(ctx) == 0
    assert ctx.metadata == {"plan": "pro", "prefs": [("tone", "formal")]}
    assert ctx.metadata_version == 2
    assert schema_v2().upgrade(ctx) is None  # already current: nothing runs
    halfway = context(1, prefs={"tone": "casual"})
    assert schema_v2().upgrade(halfway) == 1
    assert halfway.metadata == {"prefs": [("tone", "casual")]}


def test_unversioned_apps_are_untouched() -> None:
    ctx = context(anything={"goes": [1, 2]})
    assert MetadataSchema().upgrade(ctx) is None
    assert ctx.metadata == {"anything": {"goes": [1, 2]}}


def test_newer_metadata_than_the_deployment_knows_is_refused() -> None:
    with pytest.raises(UnsupportedVersion) as info:
        schema_v2().upgrade(context(3))
    assert info.value.code == "token_unsupported_version"
    assert info.value.facts["metadata_version"] == 3


def test_missing_failing_or_bad_migrations_are_migration_failed() -> None:
    gap = MetadataSchema(2)
    gap.migration(from_version=1)(prefs_to_list)
    with pytest.raises(MigrationFailed, match="no metadata migration from version 0"):
        gap.upgrade(context())
    with pytest.raises(MigrationFailed, match="1 -> 2 failed: KeyError") as info:
        schema_v2().upgrade(context(1, unrelated=True))  # v1 step needs "prefs"
    assert info.value.code == "token_migration_failed"
    not_a_dict = MetadataSchema(1)
    not_a_dict.migration(from_version=0)(lambda meta: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(MigrationFailed, match="not a dict"):
        not_a_dict.upgrade(context())


def test_registry_rules() -> None:
    s = schema_v2()
    with pytest.raises(ValueError, match="already registered"):
        s.migration(from_version=0)(tone_to_prefs)
    later = s.with_version(1)  # the same migrations, another current version
    ctx = context(tone="dry")
    assert later.upgrade(ctx) == 0 and ctx.metadata == {"prefs": {"tone": "dry"}}
    for bad in (-1, 2**31, True, "2", 1.5):
        with pytest.raises((TypeError, ValueError)):
            MetadataSchema(bad)  # type: ignore[arg-type]


# -- in the token -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sealed", "signed"])
def test_metadata_version_travels_in_the_token(mode: str) -> None:
    codec = Codec(RING, mode)
    assert "mv" not in schema.to_wire(context())  # 0 is not written: old payloads read alike
    ctx = codec.open(codec.seal(context(7, tone="x")))
    assert ctx.metadata_version == 7 and ctx.metadata == {"tone": "x"}
    assert ctx.to_dict()["metadata_version"] == 7


@pytest.mark.parametrize("bad", [-1, 2**31, "1", 1.0, True, None])
def test_a_malformed_metadata_version_is_an_invalid_context(bad: Any) -> None:
    codec = Codec(RING)
    wire = schema.to_wire(context())
    wire["mv"] = bad
    token, _ = codec.seal_payload(serialize.pack(wire))
    with pytest.raises(InvalidContext):
        codec.open(token)


# -- through the Flask extension ----------------------------------------------------------


def _nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def chat_app(version: int | None, *, fresh: bool = False, failing: bool = False) -> Flask:
    app = Flask(f"chat-v{version}")
    app.config.update(SATCHEL_KEYS=RING, TESTING=True)
    if version is not None:
        app.config["SATCHEL_METADATA_VERSION"] = version
    if fresh:
        app.config["SATCHEL_ON_BAD_TOKEN"] = "fresh"
    satchel = Satchel()

    @satchel.metadata_migration(from_version=0)
    def _tone(meta: dict[str, Any]) -> dict[str, Any]:
        if failing:
            raise KeyError("tone")
        return tone_to_prefs(meta)

    satchel.metadata_migration(from_version=1)(prefs_to_list)
    satchel.init_app(app)

    @app.post("/tone/<tone>")
    def set_tone(tone: str) -> dict[str, Any]:
        ctx = satchel.context
        if ctx.metadata_version == 0:
            ctx.metadata["tone"] = tone
        ctx.add_turn("user", f"be {tone}")
        return {"metadata": ctx.metadata, "version": ctx.metadata_version}

    @app.get("/meta")
    def meta() -> dict[str, Any]:
        ctx = satchel.context
        return {"metadata": ctx.metadata, "version": ctx.metadata_version}

    return app


def test_a_deploy_that_changes_the_metadata_shape_keeps_old_sessions() -> None:
    old = chat_app(None).test_client()
    token = old.post("/tone/formal").headers["Satchel-Context"]
    assert Codec(RING).open(token).metadata == {"tone": "formal"}

    new = chat_app(2).test_client()
    response = new.get("/meta", headers={"Satchel-Context": token})
    assert response.status_code == 200
    assert response.json == {"metadata": {"prefs": [["tone", "formal"]]}, "version": 2}
    # The next token is written in the new shape, and is not migrated again.
    token2 = new.post("/tone/ignored", headers={"Satchel-Context": token}).headers[
        "Satchel-Context"
    ]
    reopened = Codec(RING).open(token2)
    assert reopened.metadata_version == 2 and reopened.metadata == {"prefs": [["tone", "formal"]]}
    assert new.get("/meta", headers={"Satchel-Context": token2}).json["version"] == 2
    # A fresh session starts at the current version.
    fresh = new.post("/tone/any").headers["Satchel-Context"]
    assert Codec(RING).open(fresh).metadata_version == 2


def test_migration_failures_and_rollbacks_are_json_4xx_or_a_fresh_start() -> None:
    v0_token = chat_app(None).test_client().post("/tone/warm").headers["Satchel-Context"]
    failing = chat_app(1, failing=True).test_client()
    response = failing.get("/meta", headers={"Satchel-Context": v0_token})
    assert response.status_code == 400
    assert response.json["error"]["code"] == "token_migration_failed"

    v2_token = chat_app(2).test_client().post("/tone/x").headers["Satchel-Context"]
    rolled_back = chat_app(1).test_client()
    response = rolled_back.get("/meta", headers={"Satchel-Context": v2_token})
    assert response.status_code == 400
    assert response.json["error"]["code"] == "token_unsupported_version"
    forgiving = chat_app(1, fresh=True).test_client()
    response = forgiving.post("/tone/x", headers={"Satchel-Context": v2_token})
    assert response.status_code == 200
    assert response.headers["Satchel-Reset"] == "token_unsupported_version"
    assert response.json["version"] == 1


@pytest.mark.parametrize("fresh", [False, True])
def test_a_failed_migration_is_logged_at_warning_with_its_cause(
    fresh: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A migration that raises resets (or refuses) every session of that version: a
    deployment's bug, not bad input. It was logged at INFO only, with no word of which
    migration or why, so nothing at the usual WARNING level showed it."""
    import logging

    v0_token = chat_app(None).test_client().post("/tone/warm").headers["Satchel-Context"]
    failing = chat_app(1, failing=True, fresh=fresh).test_client()
    with caplog.at_level(logging.INFO):
        response = failing.post("/tone/x", headers={"Satchel-Context": v0_token})
    assert response.status_code == (200 if fresh else 400)
    app_log = [r.getMessage() for r in caplog.records if r.name == "satchel"]
    assert (
        "satchel: token_migration_failed, "
        + ("a fresh context instead" if fresh else "refused")
        + ": metadata migration 0 -> 1 failed: KeyError"
    ) in app_log
    # Satchel's own: another library's late record (asyncio reporting a task a browser
    # test left behind, at its garbage collection) may land in the capture too.
    warnings = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.split(".")[0] == "satchel"
    ]
    assert [(r.name, r.getMessage(), r.satchel) for r in warnings] == [  # type: ignore[attr-defined]
        (
            "satchel.audit",
            "refused",
            {
                "reason": "token_migration_failed",
                "from_version": 0,
                "detail": "metadata migration 0 -> 1 failed: KeyError",
            },
        )
    ]
    assert "warm" not in caplog.text  # the metadata's content is not logged


def test_bad_metadata_version_config_is_refused() -> None:
    app = Flask("bad")
    app.config.update(SATCHEL_KEYS=RING, SATCHEL_METADATA_VERSION=-2)
    with pytest.raises(ConfigurationError, match="SATCHEL_METADATA_VERSION"):
        Satchel(app)


# -- server-side modes run the same migrations ---------------------------------------------


def test_server_mode_migrates_stored_contexts_on_read() -> None:
    store = GuardedTier(MemoryTier(), BreakerPolicy(), cache=SegmentCache(0))
    codec = Codec(RING)
    before = ServerSidePipeline(codec, LifecyclePolicy(), store=store, clock=lambda: NOW)
    ctx = before.load(None, now=NOW)
    ctx.metadata["tone"] = "curt"
    handle = before.save(ctx, now=NOW).token

    after = ServerSidePipeline(
        codec, LifecyclePolicy(), store=store, clock=lambda: NOW, metadata_schema=schema_v2()
    )
    reopened = after.load(handle, now=NOW)
    assert reopened.metadata == {"prefs": [("tone", "curt")]}
    assert reopened.metadata_version == 2


@pytest.mark.parametrize(
    "returned",
    [
        {"seen": {1, 2}},  # a set
        {1: "int key"},
        {"obj": object()},
        {"deep": _nested(70)},
    ],
    ids=["set", "int key", "object", "nested 70 deep"],
)
@pytest.mark.parametrize("fresh", [False, True])
def test_a_migration_returning_metadata_no_token_carries_is_a_failed_migration(
    returned: dict[Any, Any], fresh: bool
) -> None:
    """A migration's dict was taken whatever it held: the token opened, the view ran (a
    paid model call), and every save of the session then failed with a 500. It is now
    refused when the token opens, as a migration returning no dict is: a JSON 400
    ``token_migration_failed``, or a fresh context under SATCHEL_ON_BAD_TOKEN="fresh"."""
    v0_token = chat_app(None).test_client().post("/tone/warm").headers["Satchel-Context"]
    app = Flask("bad-migration")
    app.config.update(SATCHEL_KEYS=RING, TESTING=True, SATCHEL_METADATA_VERSION=1)
    if fresh:
        app.config["SATCHEL_ON_BAD_TOKEN"] = "fresh"
    satchel = Satchel(app)
    satchel.metadata_migration(from_version=0)(lambda meta: returned)
    views: list[str] = []

    @app.post("/chat")
    def chat() -> dict[str, Any]:
        satchel.context.add_turn("user", "hi")
        views.append("ran")
        return {}

    response = app.test_client().post("/chat", headers={"Satchel-Context": v0_token})
    if fresh:
        assert response.status_code == 200, response.json
        assert response.headers["Satchel-Reset"] == "token_migration_failed"
        assert Codec(RING).open(response.headers["Satchel-Context"]).metadata == {}
    else:
        assert response.status_code == 400, response.json
        assert response.json["error"]["code"] == "token_migration_failed"
        assert views == []


def test_a_downgrade_copies_bytes_like_metadata_the_sealer_takes() -> None:
    """The downgrade's copy was copy.deepcopy, which cannot copy a memoryview: a view
    that stored one (the sealer takes it, as bytes) got a 500 during deploy 1 only."""
    app = Flask("memoryview")
    app.config.update(
        SATCHEL_KEYS=RING,
        TESTING=True,
        SATCHEL_METADATA_VERSION=1,
        SATCHEL_METADATA_WRITE_VERSION=0,
    )
    satchel = Satchel(app)
    satchel.metadata_downgrade(from_version=1)(lambda meta: {**meta, "shape": 0})

    @app.post("/avatar")
    def avatar() -> dict[str, Any]:
        ctx = satchel.context
        ctx.metadata["avatar"] = memoryview(b"\x89PNG")
        ctx.metadata["buffer"] = bytearray(b"ab")
        satchel.commit()
        return {"kept": type(ctx.metadata["avatar"]).__name__}

    response = app.test_client().post("/avatar")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json == {"kept": "memoryview"}  # the view's own values, untouched
    written = Codec(RING).open(response.headers["Satchel-Context"])
    assert written.metadata == {"avatar": b"\x89PNG", "buffer": b"ab", "shape": 0}
    assert written.metadata_version == 0


# -- rolling deploys: read the new shape, write the old one, then switch -------------------


def prefs_to_tone(meta: dict[str, Any]) -> dict[str, Any]:
    meta["tone"] = meta.pop("prefs")["tone"]
    return meta


def release(reads: int, writes: int | None = None) -> Any:
    """One release of an app whose metadata went from {"tone"} (0) to {"prefs"} (1)."""
    app = Flask(f"release-{reads}-{writes}")
    app.config.update(SATCHEL_KEYS=RING, TESTING=True, SATCHEL_METADATA_VERSION=reads)
    if writes is not None:
        app.config["SATCHEL_METADATA_WRITE_VERSION"] = writes
    satchel = Satchel(app)
    # Registered after init_app, as a module that builds the app first would.
    satchel.metadata_migration(from_version=0)(tone_to_prefs)
    satchel.metadata_downgrade(from_version=1)(prefs_to_tone)

    @app.post("/tone/<tone>")
    def set_tone(tone: str) -> dict[str, Any]:
        ctx = satchel.context
        if reads == 0:
            seen = ctx.metadata.get("tone")
            ctx.metadata["tone"] = tone
        else:
            seen = ctx.metadata.get("prefs", {}).get("tone")
            ctx.metadata.setdefault("prefs", {})["tone"] = tone
        ctx.add_turn("user", f"be {tone}")
        satchel.commit()  # the body below shows the view's metadata after sealing
        return {"seen": seen, "metadata": ctx.metadata, "version": ctx.metadata_version}

    return app.test_client()


def alternate(
    replicas: list[Any], token: str | None, rounds: int, previous: str | None = None
) -> str | None:
    """One conversation served by the replicas in turn, no affinity: each request must
    succeed and see the tone the previous one set, whichever release set it."""
    for i in range(rounds):
        headers = {"Satchel-Context": token} if token else {}
        tone = f"tone-{i}"
        response = replicas[i % len(replicas)].post(f"/tone/{tone}", headers=headers)
        assert response.status_code == 200, response.json
        assert response.json["seen"] == previous
        previous, token = tone, response.headers["Satchel-Context"]
    return token


def test_a_rolling_deploy_of_a_metadata_change_never_refuses_a_token() -> None:
    old, reads_new_writes_old, new = release(0), release(1, writes=0), release(1)
    # Deploy 1 rolls out: old replicas and deploy-1 replicas serve one conversation.
    token = alternate([old, reads_new_writes_old], None, 6)
    assert token is not None
    written = Codec(RING).open(token)
    assert written.metadata_version == 0 and written.metadata == {"tone": "tone-5"}
    # The view of deploy 1 kept the new shape after sealing (the downgrade ran on a copy).
    response = reads_new_writes_old.post("/tone/x", headers={"Satchel-Context": token})
    assert response.json == {"seen": "tone-5", "metadata": {"prefs": {"tone": "x"}}, "version": 1}
    # Deploy 2 rolls out over deploy 1: it writes version 1, which deploy 1 reads.
    token = alternate([reads_new_writes_old, new], response.headers["Satchel-Context"], 6, "x")
    assert Codec(RING).open(token or "").metadata_version == 1
    # Without deploy 1 in between, the old release refuses what the new one writes.
    skipped = new.post("/tone/y").headers["Satchel-Context"]
    refused = old.post("/tone/z", headers={"Satchel-Context": skipped})
    assert refused.status_code == 400
    assert refused.json["error"]["code"] == "token_unsupported_version"


def test_writing_an_older_shape_needs_every_downgrade() -> None:
    schema = MetadataSchema(2, write_version=0)
    schema.downgrade(from_version=2)(lambda meta: {**meta, "at": 1})
    assert schema.missing_downgrades() == [1]
    ctx = context(2, at=2)
    with pytest.raises(ConfigurationError, match="no metadata downgrade from version 1"):
        with schema.writing(ctx):
            pass
    assert ctx.metadata == {"at": 2} and ctx.metadata_version == 2
    schema.downgrade(from_version=1)(lambda meta: {**meta, "at": 0})
    assert schema.missing_downgrades() == []
    with schema.writing(ctx) as written:
        assert written.metadata == {"at": 0} and written.metadata_version == 0
    assert ctx.metadata == {"at": 2} and ctx.metadata_version == 2  # the view's, back
    with schema.writing(context(0, at=0)) as same:  # already in the write shape
        assert same.metadata == {"at": 0}


@pytest.mark.parametrize(
    "downgrade", [lambda meta: meta["missing"], lambda meta: ["not", "a", "dict"]]
)
def test_a_failing_downgrade_is_an_app_error_not_a_token_error(downgrade: Any) -> None:
    from satchel.errors import ContextNotSerializable

    schema = MetadataSchema(1, write_version=0)
    schema.downgrade(from_version=1)(downgrade)
    with pytest.raises(ContextNotSerializable, match="metadata downgrade"):
        with schema.writing(context(1, prefs={})):
            pass


def test_metadata_write_version_config() -> None:
    with pytest.raises(ValueError, match="above the version"):
        MetadataSchema(1, write_version=2)
    app = Flask("bad-write")
    app.config.update(SATCHEL_KEYS=RING, SATCHEL_METADATA_VERSION=1)
    app.config["SATCHEL_METADATA_WRITE_VERSION"] = 2
    with pytest.raises(ConfigurationError, match="SATCHEL_METADATA_WRITE_VERSION"):
        Satchel(app)
    # Forgotten downgrade: a JSON 500 naming the code, and no token is issued.
    app = Flask("no-downgrade")
    app.config.update(SATCHEL_KEYS=RING, SATCHEL_METADATA_VERSION=1, TESTING=False)
    app.config["SATCHEL_METADATA_WRITE_VERSION"] = 0
    satchel = Satchel(app)

    @app.post("/chat")
    def chat() -> dict[str, Any]:
        satchel.context.add_turn("user", "hi")
        return {}

    response = app.test_client().post("/chat")
    assert response.status_code == 500
    assert response.json["error"]["code"] == "configuration_error"
    assert "Satchel-Context" not in response.headers


def test_server_mode_stores_contexts_in_the_write_shape() -> None:
    """Stored contexts are read by every replica too: they go out in the write shape."""
    store = GuardedTier(MemoryTier(), BreakerPolicy(), cache=SegmentCache(0))
    codec = Codec(RING)
    schema = MetadataSchema(1, write_version=0)
    schema.migration(from_version=0)(tone_to_prefs)
    schema.downgrade(from_version=1)(prefs_to_tone)
    deploy_1 = ServerSidePipeline(
        codec, LifecyclePolicy(), store=store, clock=lambda: NOW, metadata_schema=schema
    )
    ctx = deploy_1.load(None, now=NOW)
    ctx.metadata["prefs"] = {"tone": "dry"}
    handle = deploy_1.save(ctx, now=NOW).token
    assert ctx.metadata == {"prefs": {"tone": "dry"}}  # the view's shape, kept
    old = ServerSidePipeline(codec, LifecyclePolicy(), store=store, clock=lambda: NOW)
    stored = old.load(handle, now=NOW)
    assert stored.metadata_version == 0 and stored.metadata == {"tone": "dry"}


def test_migrated_metadata_is_held_to_the_codecs_own_limits_when_it_opens() -> None:
    """A codec with tighter Limits: metadata a migration returned past them was let
    through to the view, then every save of the session failed (not Flask's default)."""
    from satchel import Limits
    from satchel.errors import MigrationFailed
    from satchel.pipeline import Pipeline

    codec = Codec(Keyring.generate("k1"), "signed", limits=Limits(max_map_len=50))
    before = Pipeline(codec, LifecyclePolicy())
    ctx = before.load(None)
    ctx.metadata = {"tone": "formal"}
    token = before.save(ctx).token

    wide = MetadataSchema(1)
    wide.migration(from_version=0)(lambda meta: {f"k{i}": i for i in range(100)})
    with pytest.raises(MigrationFailed):
        Pipeline(codec, LifecyclePolicy(), metadata_schema=wide).load(token)
