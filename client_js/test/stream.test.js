import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SatchelError, ServiceUnavailableError, TokenError, memoryStorage } from '../src/satchel.js';
import { errorReply, fakeFetch, flush, record, reply, sse, sseReply, testClient } from '../test-support/fakes.js';

const FINAL = { token: 'tok8', seq: 8, session: 'S', degraded: [], reset: null, fork: null };

function chatStream({ deltas = ['Hel', 'lo'], final = FINAL, done = true } = {}) {
  const events = deltas.map((text) => ({ event: 'delta', data: { text } }));
  if (final) events.push({ event: 'satchel', data: final });
  if (done) events.push({ event: 'done', data: {} });
  return sse(events);
}

// Cut a string into 3-character chunks so events straddle chunk borders.
const smallChunks = (text) => text.match(/[\s\S]{1,3}/g);

test('stream(): POSTs JSON with the token, yields deltas, adopts the final token', async () => {
  const fetch = fakeFetch(() => sseReply(chatStream(), { chunks: smallChunks }));
  const storage = memoryStorage();
  const client = testClient({ fetch, storage, conversation: 'c' });
  await client.importToken('tok7', { seq: 7, session: 'S' });

  const s = client.stream('/chat/stream', { message: 'hi' });
  const got = [];
  for await (const piece of s) got.push(piece);
  assert.deepEqual(got, ['Hel', 'lo']);

  const call = fetch.calls[0];
  assert.equal(call.method, 'POST');
  assert.equal(call.token, 'tok7');
  assert.equal(call.headers.get('content-type'), 'application/json');
  assert.equal(call.headers.get('accept'), 'text/event-stream');
  assert.equal(call.body, '{"message":"hi"}');

  assert.equal(client.token, 'tok8');
  assert.equal(JSON.parse(storage.get('satchel:c')).seq, 8);
  const result = await s.result;
  assert.equal(result.text, 'Hello');
  assert.equal(result.token, 'tok8');
  assert.equal(result.seq, 8);
});

test('stream(): manual next() returns the metadata as the generator return value', async () => {
  const fetch = fakeFetch(() => sseReply(chatStream({ deltas: ['x'] })));
  const client = testClient({ fetch });
  const s = client.stream('/s', {});
  assert.deepEqual(await s.next(), { value: 'x', done: false });
  const end = await s.next();
  assert.equal(end.done, true);
  assert.equal(end.value.token, 'tok8');
});

test('stream(): degraded / reset / fork from the final SSE event become events', async () => {
  const final = { ...FINAL, degraded: ['tier_write_failed', 'data_loss'], reset: 'token_expired', fork: 'two children of seq 7' };
  const fetch = fakeFetch(() => sseReply(chatStream({ final })));
  const client = testClient({ fetch });
  const events = record(client);
  for await (const _ of client.stream('/s', {})) void _;
  const byName = Object.fromEntries(events.map((e) => [e.name, e.detail]));
  assert.deepEqual(byName.degraded.reasons, ['tier_write_failed', 'data_loss']);
  assert.equal(byName.degraded.source, 'stream');
  assert.equal(byName.reset.code, 'token_expired');
  assert.equal(byName.fork.detail, 'two children of seq 7');
  assert.equal(byName.token.token, 'tok8');
});

test('stream(): a second satchel event (the same token, a late flag) supersedes the first', async () => {
  // The server sends it when moving the monotonic mark after the final event failed.
  const late = { ...FINAL, degraded: ['consistency_unchecked'] };
  const body = sse([
    { event: 'delta', data: { text: 'ok' } },
    { event: 'satchel', data: FINAL },
    { event: 'satchel', data: late },
    { event: 'done', data: {} },
  ]);
  const fetch = fakeFetch(() => sseReply(body));
  const client = testClient({ fetch });
  const events = record(client, ['degraded', 'fork']);
  const s = client.stream('/s', {});
  for await (const _ of s) void _;
  const result = await s.result;
  assert.equal(result.token, 'tok8');
  assert.deepEqual(result.degraded, ['consistency_unchecked']);
  assert.deepEqual(events.map((e) => [e.name, e.detail.reasons]), [['degraded', ['consistency_unchecked']]]);
});

test('stream(): degraded header on the streaming response is reported too', async () => {
  const fetch = fakeFetch(() => sseReply(chatStream(), { headers: { 'Satchel-Degraded': 'segment_missing' } }));
  const client = testClient({ fetch });
  const events = record(client, ['degraded']);
  for await (const _ of client.stream('/s', {})) void _;
  assert.deepEqual(events.map((e) => e.detail.reasons), [['segment_missing']]);
});

test('stream(): event: error becomes a typed error', async () => {
  const body = sse([
    { event: 'delta', data: { text: 'partial' } },
    { event: 'error', data: { code: 'tier_unavailable', message: 'tier down' } },
  ]);
  const fetch = fakeFetch(() => sseReply(body));
  const client = testClient({ fetch });
  const errors = record(client, ['error']);
  const got = [];
  await assert.rejects(
    (async () => {
      for await (const p of client.stream('/s', {})) got.push(p);
    })(),
    (err) => err instanceof ServiceUnavailableError && err.code === 'tier_unavailable' && err.status === null,
  );
  assert.deepEqual(got, ['partial']);
  assert.equal(errors.length, 1);

  const fetch2 = fakeFetch(() => sseReply(sse([{ event: 'error', data: { code: 'model_failed', message: 'nope' } }])));
  const c2 = testClient({ fetch: fetch2 });
  const err = await (async () => {
    for await (const _ of c2.stream('/s', {})) void _;
  })().catch((e) => e);
  assert.equal(err.constructor, SatchelError);
  assert.equal(err.code, 'model_failed');
});

test('stream(): HTTP token error before streaming -> reset + fresh retry', async () => {
  const fetch = fakeFetch((call) =>
    call.token ? errorReply(401, 'token_unknown_key', 'rotated') : sseReply(chatStream({ final: { ...FINAL, token: 'fresh', seq: 1 } })),
  );
  const client = testClient({ fetch });
  await client.importToken('old');
  const resets = record(client, ['reset']);
  const got = [];
  for await (const p of client.stream('/s', { message: 'q' })) got.push(p);
  assert.deepEqual(got, ['Hel', 'lo']);
  assert.deepEqual(fetch.calls.map((c) => c.token), ['old', null]);
  assert.equal(fetch.calls[1].body, '{"message":"q"}');
  assert.equal(client.token, 'fresh');
  assert.equal(resets[0].detail.code, 'token_unknown_key');
});

test('stream(): in-stream token error before any delta is retried once; after a delta it is not', async () => {
  const early = fakeFetch((call) =>
    call.token
      ? sseReply(sse([{ event: 'error', data: { code: 'token_migration_failed', message: 'm' } }]))
      : sseReply(chatStream({ final: { ...FINAL, token: 'fresh' } })),
  );
  const c1 = testClient({ fetch: early });
  await c1.importToken('old');
  for await (const _ of c1.stream('/s', {})) void _;
  assert.equal(early.calls.length, 2);
  assert.equal(c1.token, 'fresh');

  const late = fakeFetch(() =>
    sseReply(sse([
      { event: 'delta', data: { text: 'shown' } },
      { event: 'error', data: { error: { code: 'token_migration_failed', message: 'm' } } },
    ])),
  );
  const c2 = testClient({ fetch: late });
  await c2.importToken('old');
  await assert.rejects(
    (async () => {
      for await (const _ of c2.stream('/s', {})) void _;
    })(),
    TokenError,
  );
  assert.equal(late.calls.length, 1); // retrying would repeat text already shown
});

/** Read `body` as a stream carrying token 'keep': it must fail with `code`, in the
 * loop and in `result`, and the token must stay. */
async function assertStreamFailsKeepingToken(body, code) {
  const fetch = fakeFetch(() => sseReply(body));
  const client = testClient({ fetch });
  await client.importToken('keep');
  const s = client.stream('/s', {});
  await assert.rejects(
    (async () => {
      for await (const _ of s) void _;
    })(),
    (e) => e instanceof SatchelError && e.code === code,
  );
  await assert.rejects(s.result, { code });
  assert.equal(client.token, 'keep');
}

test('stream(): ending without the satchel event is an error (turn may be lost)', async () => {
  await assertStreamFailsKeepingToken(chatStream({ final: null, done: false }), 'stream_incomplete');
});

test('stream(): satchel event without a trailing done is fine', async () => {
  const fetch = fakeFetch(() => sseReply(chatStream({ done: false })));
  const client = testClient({ fetch });
  for await (const _ of client.stream('/s', {})) void _;
  assert.equal(client.token, 'tok8');
});

test('stream(): breaking out early cancels the body and releases the lock', async () => {
  let cancelled = false;
  const enc = new TextEncoder();
  const fetch = fakeFetch((call, i) => {
    if (i > 0) return sseReply(chatStream());
    return new Response(
      new ReadableStream({
        start(c) {
          c.enqueue(enc.encode(sse([{ event: 'delta', data: { text: 'a' } }])));
          // never closes: a server still generating
        },
        cancel() {
          cancelled = true;
        },
      }),
      { headers: { 'content-type': 'text/event-stream' } },
    );
  });
  const client = testClient({ fetch });
  const s = client.stream('/s', {});
  for await (const _ of s) break;
  assert.equal(cancelled, true);
  await assert.rejects(s.result, { code: 'stream_cancelled' });
  // The next request for the conversation is not stuck behind the lock.
  for await (const _ of client.stream('/s', {})) void _;
  assert.equal(client.token, 'tok8');
});

test('stream(): the lock is released at the satchel event, before the stream ends', async () => {
  const enc = new TextEncoder();
  let finish;
  const fetch = fakeFetch((call, i) => {
    if (i > 0) return sseReply(chatStream());
    return new Response(
      new ReadableStream({
        start(c) {
          c.enqueue(enc.encode(chatStream({ done: false })));
          // `done` only arrives when the test says so: the server is still busy.
          finish = () => {
            c.enqueue(enc.encode(sse([{ event: 'done', data: {} }])));
            c.close();
          };
        },
      }),
      { headers: { 'content-type': 'text/event-stream' } },
    );
  });
  const client = testClient({ fetch });
  const first = client.stream('/s', {});
  assert.equal((await first.next()).value, 'Hel');
  assert.equal((await first.next()).value, 'lo');
  const pending = first.next(); // processes the satchel event, then waits for more bytes
  await flush();
  assert.equal(client.token, 'tok8');
  const second = client.fetch('/other');
  await flush();
  assert.equal(fetch.calls.length, 2, 'second request ran while the first stream is still open');
  assert.equal(fetch.calls[1].token, 'tok8');
  finish();
  assert.equal((await pending).done, true);
  await (await second).text(); // an unread event-stream body would keep the lock
});

test('stream(): a token error after text was shown drops the token as fetch() would, without a retry', async () => {
  const fetch = fakeFetch(() =>
    sseReply(sse([
      { event: 'delta', data: { text: 'shown' } },
      { event: 'error', data: { code: 'token_expired', message: 'expired' } },
    ])),
  );
  const client = testClient({ fetch });
  await client.importToken('dead', { seq: 3, session: 'S' });
  const events = record(client, ['token', 'reset', 'error']);
  await assert.rejects(
    (async () => {
      for await (const _ of client.stream('/s', {})) void _;
    })(),
    (e) => e instanceof TokenError && e.code === 'token_expired',
  );
  assert.equal(fetch.calls.length, 1, 'no retry: the text is already on screen');
  assert.equal(client.token, null);
  // The same sequence fetch() emits when it drops a token it cannot retry.
  assert.deepEqual(events.map((e) => e.name), ['token', 'reset', 'error']);
  assert.equal(events[0].detail.source, 'dropped');
  assert.deepEqual(
    { code: events[1].detail.code, source: events[1].detail.source, retrying: events[1].detail.retrying },
    { code: 'token_expired', source: 'client', retrying: false },
  );
});

/** 'pending', or how the promise settled, once every queued task has run. */
const settledAs = (p) =>
  Promise.race([p.then(() => 'resolved', (e) => (e && e.code) || 'rejected'), flush().then(() => 'pending')]);

test('stream(): closing the stream before it started rejects .result with stream_cancelled', async () => {
  const fetch = fakeFetch(() => sseReply(chatStream()));
  const client = testClient({ fetch });
  const unhandled = [];
  const onUnhandled = (reason) => unhandled.push(reason);
  process.on('unhandledRejection', onUnhandled);
  try {
    const s = client.stream('/s', {});
    assert.deepEqual(await s.return(), { value: undefined, done: true });
    assert.equal(await settledAs(s.result), 'stream_cancelled');

    const t = client.stream('/s', {});
    await assert.rejects(t.throw(new Error('stop')), /stop/);
    assert.equal(await settledAs(t.result), 'stream_cancelled');

    // Nobody looks at .result here: still no unhandled-rejection report.
    await client.stream('/s', {}).return();
    await flush();
    await flush();
    assert.deepEqual(unhandled, []);
  } finally {
    process.off('unhandledRejection', onUnhandled);
  }
  assert.equal(fetch.calls.length, 0, 'nothing was sent');
  // A stream that has started keeps its own outcome: return() after the end changes nothing.
  const done = client.stream('/s', {});
  for await (const _ of done) void _;
  await done.return();
  assert.equal((await done.result).token, 'tok8');
});

test('stream(): a null init is accepted, as fetch() accepts one', async () => {
  const fetch = fakeFetch(() => sseReply(chatStream()));
  const client = testClient({ fetch });
  for await (const _ of client.stream('/s', { m: 1 }, null)) void _;
  assert.equal(fetch.calls[0].method, 'POST');
  assert.equal(client.token, 'tok8');
});

test('stream(): a final satchel event with no token is a stream_protocol error, not success', async () => {
  // ...or a token no HTTP header can carry: stored, the next request would drop it
  for (const data of ['not json', JSON.stringify({ seq: 9 }), JSON.stringify({ token: 's1.a b', seq: 9 })]) {
    const body = sse([{ event: 'delta', data: { text: 'hi' } }]) + `event: satchel\ndata: ${data}\n\n`;
    await assertStreamFailsKeepingToken(body, 'stream_protocol');
  }
});

test('stream(): tier_full inside a stream is a ServiceUnavailableError, as it is over HTTP', async () => {
  const body = sse([{ event: 'error', data: { code: 'tier_full', message: 'the tier is full' } }]);
  const fetch = fakeFetch(() => sseReply(body));
  const client = testClient({ fetch });
  const s = client.stream('/s', {});
  await assert.rejects(
    (async () => {
      for await (const _ of s) void _;
    })(),
    (e) => e instanceof ServiceUnavailableError && e.code === 'tier_full',
  );
});

test('stream(): leaving at the last delta still adopts the final token received with it', async () => {
  // The Stop click that races the end: the satchel event came in the same chunk as
  // the last delta. The server issued tok8; keeping tok7 would fork the conversation
  // (or make it stale for good under monotonic consistency).
  const fetch = fakeFetch(() => sseReply(chatStream({ deltas: ['Hel', 'lo'] })));
  const client = testClient({ fetch });
  await client.importToken('tok7', { seq: 7, session: 'S' });
  const s = client.stream('/s', {});
  for await (const piece of s) {
    if (piece === 'Hel') break;
  }
  assert.equal(client.token, 'tok8');
  const result = await s.result;
  assert.equal(result.token, 'tok8');
  assert.equal(result.text, 'Hello', 'the text the stored context holds');
});

test('stream(): leaving before the final event arrived cancels and keeps the old token', async () => {
  const fetch = fakeFetch(() =>
    sseReply(chatStream({ deltas: ['Hel', 'lo'] }), { chunks: (t) => [t.slice(0, t.indexOf('event: satchel')), t.slice(t.indexOf('event: satchel'))] }),
  );
  const client = testClient({ fetch });
  await client.importToken('tok7', { seq: 7, session: 'S' });
  const s = client.stream('/s', {});
  for await (const piece of s) {
    if (piece === 'lo') break;
  }
  await assert.rejects(s.result, { code: 'stream_cancelled' });
  assert.equal(client.token, 'tok7');
});

test('stream(): leaving early with a storage adapter whose reads fail still adopts the token, releases the lock and settles', async () => {
  const base = memoryStorage();
  let failing = false;
  const storage = {
    kind: 'memory',
    get: (key) => (failing ? Promise.reject(new Error('disk gone')) : base.get(key)),
    set: (key, value) => base.set(key, value),
    remove: (key) => base.remove(key),
  };
  const fetch = fakeFetch(() => sseReply(chatStream({ deltas: ['Hel', 'lo'] })));
  const client = testClient({ fetch, storage });
  await client.importToken('tok7', { seq: 7, session: 'S' });
  const s = client.stream('/s', {});
  for await (const piece of s) {
    failing = true; // reading storage to adopt the buffered final event now fails
    if (piece === 'Hel') break;
  }
  // The server issued tok8: a failed read does not throw it away (the old token would
  // fork the conversation). The write after it succeeded.
  assert.equal((await s.result).token, 'tok8');
  failing = false;
  assert.equal(JSON.parse(base.get('satchel:default')).token, 'tok8');
  const next = await client.fetch('/again'); // the lock was released
  assert.equal(next.status, 200);
  await next.text(); // an event-stream body holds the lock until it is read
});

test('stream(): throw() into the stream after the final event arrived still adopts its token', async () => {
  const fetch = fakeFetch(() => sseReply(chatStream({ deltas: ['Hel', 'lo'] })));
  const client = testClient({ fetch });
  await client.importToken('tok7', { seq: 7, session: 'S' });
  const s = client.stream('/s', {});
  assert.deepEqual(await s.next(), { value: 'Hel', done: false });
  const stop = new Error('the page stopped reading');
  await assert.rejects(s.throw(stop), (e) => e === stop);
  await assert.rejects(s.result, (e) => e === stop);
  assert.equal(client.token, 'tok8', 'the server issued tok8: keeping tok7 would fork');
});

test('stream(Request): the Request\'s own headers go out (an Authorization, say)', async () => {
  const fetch = fakeFetch(() => sseReply(chatStream()));
  const client = testClient({ fetch });
  const request = new Request('http://app.test/chat/stream', {
    method: 'POST',
    headers: { Authorization: 'Bearer abc' },
  });
  for await (const _ of client.stream(request, { message: 'hi' })) void _;
  assert.equal(fetch.calls[0].headers.get('authorization'), 'Bearer abc');
  assert.equal(fetch.calls[0].headers.get('content-type'), 'application/json');
});

/** A response whose body the test feeds (and can cut) by hand. */
function handFedStream() {
  const enc = new TextEncoder();
  let feed;
  const body = new ReadableStream({
    start(controller) {
      feed = controller;
    },
  });
  return {
    response: new Response(body, { headers: { 'content-type': 'text/event-stream' } }),
    push: (text) => feed.enqueue(enc.encode(text)),
    cut: (err) => feed.error(err),
    end: () => feed.close(),
  };
}

const DELTA_THEN_FINAL = 'event: delta\ndata: {"text":"Hi"}\n\nevent: satchel\ndata: {"token":"t2","seq":2,"session":"s"}\n\n';

test('stream(): a connection cut after the satchel event ends the stream, not in an error', async () => {
  // The turn is saved and its token adopted: thrown, the UI would show a failure and
  // the user would send the message again, a duplicated turn.
  const fed = handFedStream();
  const client = testClient({ fetch: async () => fed.response });
  await client.importToken('t1', { seq: 1, session: 's' });
  const events = record(client);
  const s = client.stream('/s', {});
  const it = s[Symbol.asyncIterator]();
  fed.push(DELTA_THEN_FINAL);
  assert.deepEqual(await it.next(), { value: 'Hi', done: false });
  const next = it.next(); // handles the satchel event, then waits for more bytes
  await flush();
  fed.cut(new TypeError('terminated'));
  const end = await next;
  assert.equal(end.done, true);
  assert.equal(end.value.token, 't2');
  const result = await s.result;
  assert.equal(result.text, 'Hi');
  assert.equal(result.token, 't2');
  assert.equal(client.token, 't2');
  assert.deepEqual(events.filter((e) => e.name === 'error'), []);
});

test('stream(): a cut before the satchel event still throws, with the token unchanged', async () => {
  const fed = handFedStream();
  const client = testClient({ fetch: async () => fed.response });
  await client.importToken('t1', { seq: 1, session: 's' });
  const s = client.stream('/s', {});
  const it = s[Symbol.asyncIterator]();
  fed.push('event: delta\ndata: {"text":"Hi"}\n\n');
  await it.next();
  const next = it.next();
  await flush();
  fed.cut(new TypeError('terminated'));
  await assert.rejects(next, TypeError);
  await assert.rejects(s.result, TypeError);
  assert.equal(client.token, 't1');
});

test('stream(): aborted with a reason after the satchel event, the stream ends with the saved turn', async () => {
  const controller = new AbortController();
  const fetch = async (url, init) => {
    const fed = handFedStream();
    init.signal.addEventListener('abort', () => fed.cut(init.signal.reason));
    fed.push(DELTA_THEN_FINAL);
    return fed.response;
  };
  const client = testClient({ fetch });
  const events = record(client);
  const s = client.stream('/s', {}, { signal: controller.signal });
  const seen = [];
  for await (const piece of s) {
    seen.push(piece);
    controller.abort('user stopped'); // the Stop button, after the first delta
  }
  assert.deepEqual(seen, ['Hi']);
  assert.equal((await s.result).token, 't2');
  assert.deepEqual(events.filter((e) => e.name === 'error'), []);
});

test('stream(): aborted with a reason before the satchel event: thrown, and no error event', async () => {
  const controller = new AbortController();
  const fetch = async (url, init) => {
    const fed = handFedStream();
    init.signal.addEventListener('abort', () => fed.cut(init.signal.reason));
    fed.push('event: delta\ndata: {"text":"Hi"}\n\n');
    return fed.response;
  };
  const client = testClient({ fetch });
  const events = record(client);
  const s = client.stream('/s', {}, { signal: controller.signal });
  await assert.rejects(async () => {
    for await (const _ of s) controller.abort('user stopped');
  }, (err) => err === 'user stopped');
  await assert.rejects(s.result);
  assert.deepEqual(events, []);
});

/** A client holding t1 whose first request streams by hand and whose next answers t3. */
async function streamThenT3() {
  const fed = handFedStream();
  let call = 0;
  const fetch = async () => {
    call += 1;
    if (call === 1) return fed.response;
    return reply({ satchel: { token: 't3', seq: 3, session: 's' } });
  };
  const client = testClient({ fetch });
  await client.importToken('t1', { seq: 1, session: 's' });
  return { fed, client, events: record(client, ['fork', 'degraded']) };
}

test('stream(): a repeated satchel event is no fork when another request moved on meanwhile', async () => {
  // The lock is released at the first satchel event; a second one with the same token
  // (a monotonic mark that failed open) arrives after another request stored t3.
  const { fed, client, events } = await streamThenT3();
  const s = client.stream('/s', {});
  const it = s[Symbol.asyncIterator]();
  fed.push(DELTA_THEN_FINAL);
  await it.next();
  const rest = it.next(); // handles the first satchel event and releases the lock
  await client.fetch('/chat', { method: 'POST', body: '{}' }); // stores t3
  assert.equal(client.token, 't3');
  fed.push('event: satchel\ndata: {"token":"t2","seq":2,"session":"s","degraded":["consistency_unchecked"]}\n\nevent: done\ndata: {}\n\n');
  fed.end();
  assert.equal((await rest).done, true);
  assert.equal(client.token, 't3');
  assert.deepEqual(events.map((e) => e.name), ['degraded']);
  assert.deepEqual(events[0].detail.reasons, ['consistency_unchecked']);
  assert.deepEqual((await s.result).degraded, ['consistency_unchecked']);
});

test('fetch() of an event stream: a repeated final event is no fork either', async () => {
  const { fed, client, events } = await streamThenT3();
  const response = await client.fetch('/s', { method: 'POST', body: '{}' });
  const reader = response.body.getReader();
  fed.push(DELTA_THEN_FINAL);
  await reader.read(); // the first final event is handled: t2, and the lock is released
  assert.equal(client.token, 't2');
  await client.fetch('/chat', { method: 'POST', body: '{}' });
  assert.equal(client.token, 't3');
  fed.push('event: satchel\ndata: {"token":"t2","seq":2,"session":"s","degraded":["consistency_unchecked"]}\n\n');
  fed.end();
  while (!(await reader.read()).done);
  assert.equal(client.token, 't3');
  assert.deepEqual(events.map((e) => e.name), ['degraded']);
});

test('stream(): reasons in both the header and the final event are reported once', async () => {
  const same = { ...FINAL, degraded: ['segment_missing'] };
  const more = { ...FINAL, degraded: ['segment_missing', 'tier_write_failed'] };
  for (const [final, expected] of [
    [same, [['segment_missing']]],
    [more, [['segment_missing'], ['segment_missing', 'tier_write_failed']]],
  ]) {
    const fetch = fakeFetch(() => sseReply(chatStream({ final }), { headers: { 'Satchel-Degraded': 'segment_missing' } }));
    const client = testClient({ fetch });
    const events = record(client, ['degraded']);
    for await (const _ of client.stream('/s', {})) void _;
    assert.deepEqual(events.map((e) => e.detail.reasons), expected);
  }
});

test('err.response: unread for an error response, the read stream\'s own for an error inside a stream', async () => {
  // The docs said "unread" of every error; a stream's errors come after its body was read.
  const fetch = fakeFetch((call) => {
    if (call.url === '/http') return errorReply(503, 'tier_unavailable', 'down', { headers: { 'Retry-After': '2' } });
    if (call.url === '/event') return sseReply(sse([{ event: 'error', data: { error: { code: 'tier_full', message: 'full' } } }]));
    if (call.url === '/cut') return sseReply(chatStream({ final: null, done: false }));
    return sseReply(sse([{ event: 'delta', data: 'not json' }]));
  });
  const client = testClient({ fetch });
  const http = await client.fetch('/http').catch((e) => e);
  assert.equal(http.status, 503);
  assert.equal(http.response.bodyUsed, false);
  assert.deepEqual(await http.response.json(), { error: { code: 'tier_unavailable', message: 'down' } });
  for (const [url, code] of [['/event', 'tier_full'], ['/cut', 'stream_incomplete'], ['/bad', 'stream_protocol']]) {
    const s = client.stream(url, {});
    const err = await (async () => {
      for await (const piece of s) void piece;
    })().catch((e) => e);
    assert.equal(err.code, code);
    assert.equal(err.status, null);
    assert.equal(err.response.status, 200); // headers and status still tell
    assert.equal(err.response.bodyUsed, true);
    await assert.rejects(err.response.text(), TypeError);
  }
});

test('stream(): return() resolves with the value it is given (undefined by default), as the .d.ts says; result has the metadata', async () => {
  const fetch = fakeFetch(() => sseReply(chatStream({ deltas: ['Hel', 'lo'] })));
  const client = testClient({ fetch });
  const s = client.stream('/s', {});
  assert.deepEqual(await s.next(), { value: 'Hel', done: false });
  assert.deepEqual(await s.return(), { value: undefined, done: true });
  assert.equal((await s.result).token, 'tok8'); // the final event came with the delta
  assert.deepEqual(await s.next(), { value: undefined, done: true });
});
