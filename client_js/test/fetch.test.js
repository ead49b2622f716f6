import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  HTTPError,
  SatchelClient,
  SatchelError,
  ServiceUnavailableError,
  StaleContextError,
  TokenError,
  memoryStorage,
} from '../src/satchel.js';
import { deferred, errorReply, fakeFetch, flush, record, reply, sse, sseReply, testClient } from '../test-support/fakes.js';

test('first request carries no token; the response token is adopted and sent next time', async () => {
  const fetch = fakeFetch((call, i) =>
    reply({ json: { ok: i }, satchel: { token: `tok${i + 1}`, seq: i + 1, session: 's1' } }),
  );
  const storage = memoryStorage();
  const client = testClient({ fetch, storage, conversation: 'c1' });
  const events = record(client, ['token']);

  const res = await client.fetch('/chat', { method: 'POST', body: '{}' });
  assert.equal(res.status, 200);
  assert.deepEqual(await res.json(), { ok: 0 }); // body left for the caller
  assert.equal(fetch.calls[0].token, null);
  assert.equal(fetch.calls[0].headers.has('Satchel-Context'), false);
  assert.equal(client.token, 'tok1');
  assert.equal(client.seq, 1);
  assert.equal(client.session, 's1');
  assert.deepEqual(JSON.parse(storage.get('satchel:c1')), { token: 'tok1', seq: 1, session: 's1', g: 1 });

  await client.fetch('/chat', { method: 'POST', body: '{}', headers: { 'X-Other': 'kept' } });
  assert.equal(fetch.calls[1].token, 'tok1');
  assert.equal(fetch.calls[1].headers.get('X-Other'), 'kept');
  assert.equal(client.token, 'tok2');
  assert.deepEqual(
    events.map((e) => [e.detail.token, e.detail.seq, e.detail.source]),
    [
      ['tok1', 1, 'response'],
      ['tok2', 2, 'response'],
    ],
  );
});

test('a response without Satchel-Context keeps the old token', async () => {
  const storage = memoryStorage({ 'satchel:default': JSON.stringify({ token: 'old', seq: 3, session: 's' }) });
  const fetch = fakeFetch(() => reply({ json: {} }));
  const client = testClient({ fetch, storage });
  assert.equal(client.token, 'old'); // loaded synchronously at creation
  await client.fetch('/x');
  assert.equal(fetch.calls[0].token, 'old');
  assert.equal(client.token, 'old');
});

test('custom headerName is used for both request and response', async () => {
  const fetch = fakeFetch(() => reply({ headers: { 'X-Ctx': 'n1' } }));
  const client = testClient({ fetch, headerName: 'X-Ctx' });
  await client.importToken('held');
  await client.fetch('/x');
  assert.equal(fetch.calls[0].headers.get('X-Ctx'), 'held');
  assert.equal(client.token, 'n1');
});

test('Request objects are accepted and keep their own headers', async () => {
  const fetch = fakeFetch(() => reply({ satchel: { token: 'n', seq: 1 } }));
  const client = testClient({ fetch });
  await client.importToken('held');
  const req = new Request('http://x.test/chat', { method: 'POST', body: 'hi', headers: { 'X-A': '1' } });
  await client.fetch(req);
  assert.equal(fetch.calls[0].token, 'held');
  assert.equal(fetch.calls[0].headers.get('X-A'), '1');
  assert.equal(req.bodyUsed, false); // we send clones, so a retry stays possible
});

test('init.headers replaces a Request\'s own headers, as fetch() does', async () => {
  const fetch = fakeFetch(() => reply({ satchel: { token: 'n', seq: 1 } }));
  const client = testClient({ fetch });
  await client.importToken('held');
  const req = new Request('http://x.test/chat', { method: 'POST', body: 'hi', headers: { 'X-From-Request': '1' } });
  await client.fetch(req, { headers: { 'X-From-Init': '1' } });
  assert.equal(fetch.calls[0].headers.get('X-From-Init'), '1');
  assert.equal(fetch.calls[0].headers.has('X-From-Request'), false);
  assert.equal(fetch.calls[0].token, 'held');
});

test('token_* error: drop token, emit reset, retry once without token', async () => {
  const fetch = fakeFetch((call) =>
    call.token
      ? errorReply(401, 'token_expired', 'expired')
      : reply({ json: { fresh: true }, satchel: { token: 'fresh1', seq: 1, session: 's2' } }),
  );
  const client = testClient({ fetch });
  await client.importToken('stale-token', { seq: 9, session: 's1' });
  const events = record(client, ['reset', 'token', 'error']);

  const res = await client.fetch('/chat', { method: 'POST', body: '{"m":1}' });
  assert.deepEqual(await res.json(), { fresh: true });
  assert.equal(fetch.calls.length, 2);
  assert.equal(fetch.calls[0].token, 'stale-token');
  assert.equal(fetch.calls[1].token, null);
  assert.equal(fetch.calls[1].body, '{"m":1}'); // same request replayed
  assert.equal(client.token, 'fresh1');
  assert.deepEqual(
    events.map((e) => e.name),
    ['token', 'reset', 'token'], // dropped -> reset -> fresh token adopted
  );
  const reset = events.find((e) => e.name === 'reset').detail;
  assert.equal(reset.code, 'token_expired');
  assert.equal(reset.source, 'client');
  assert.equal(reset.retrying, true);
});

test('token_* errors never loop: at most one retry, then TokenError', async () => {
  const fetch = fakeFetch(() => errorReply(400, 'token_bad_signature', 'bad sig'));
  const client = testClient({ fetch });
  await client.importToken('t');
  const errors = record(client, ['error']);
  await assert.rejects(client.fetch('/chat', { method: 'POST', body: 'x' }), (err) => {
    assert.ok(err instanceof TokenError);
    assert.ok(err instanceof SatchelError);
    assert.equal(err.code, 'token_bad_signature');
    assert.equal(err.status, 400);
    return true;
  });
  assert.equal(fetch.calls.length, 2);
  assert.equal(client.token, null);
  assert.equal(errors.length, 1);

  // With no token held there is nothing to drop and no retry at all.
  await assert.rejects(client.fetch('/chat'), TokenError);
  assert.equal(fetch.calls.length, 3);
});

test('token_* with a non-replayable (stream) body: token dropped, no retry', async () => {
  const fetch = fakeFetch(() => errorReply(401, 'token_bad_signature'));
  const client = testClient({ fetch });
  await client.importToken('t');
  const resets = record(client, ['reset']);
  const body = new ReadableStream({ start: (c) => c.close() });
  await assert.rejects(client.fetch('/x', { method: 'POST', body, duplex: 'half' }), TokenError);
  assert.equal(fetch.calls.length, 1);
  assert.equal(client.token, null);
  assert.equal(resets[0].detail.retrying, false);
});

test('token_* with an async-iterable body (Node fetch takes one): read once, so no retry', async () => {
  const fetch = fakeFetch(() => errorReply(401, 'token_bad_signature'));
  const client = testClient({ fetch });
  await client.importToken('t');
  async function* body() {
    yield new TextEncoder().encode('{"m":1}');
  }
  await assert.rejects(client.fetch('/x', { method: 'POST', body: body(), duplex: 'half' }), TokenError);
  assert.equal(fetch.calls.length, 1, 'a second send would carry an empty body');
  assert.equal(client.token, null);
});

test('typed errors: 503 tier_unavailable, other codes, non-JSON bodies', async () => {
  const responses = [
    errorReply(503, 'tier_unavailable', 'overflow tier down', { headers: { 'Retry-After': '5' } }),
    errorReply(422, 'message_too_long', 'too long'),
    reply({ status: 500, body: '<html>oops</html>' }),
    reply({ status: 503, body: '' }),
  ];
  const fetch = fakeFetch((call, i) => responses[i]);
  const client = testClient({ fetch });

  const e1 = await client.fetch('/x').catch((e) => e);
  assert.ok(e1 instanceof ServiceUnavailableError);
  assert.equal(e1.code, 'tier_unavailable');
  assert.equal(e1.status, 503);
  assert.equal(e1.message, 'overflow tier down');
  assert.equal(e1.retryAfter, 5);
  assert.ok(e1.response instanceof Response);
  assert.deepEqual(await e1.response.json(), { error: { code: 'tier_unavailable', message: 'overflow tier down' } });

  const e2 = await client.fetch('/x').catch((e) => e);
  assert.ok(e2 instanceof HTTPError);
  assert.ok(e2 instanceof SatchelError);
  assert.equal(e2.code, 'message_too_long');
  assert.equal(e2.status, 422);

  const e3 = await client.fetch('/x').catch((e) => e);
  assert.ok(e3 instanceof HTTPError);
  assert.equal(e3.code, 'http_500');

  const e4 = await client.fetch('/x').catch((e) => e);
  assert.ok(e4 instanceof ServiceUnavailableError);
  assert.equal(e4.code, 'service_unavailable');
  assert.equal(e4.retryAfter, null); // no Retry-After
  assert.equal(fetch.calls.length, 4); // none of these are retried
});

test('ServiceUnavailableError.retryAfter: seconds for delta-seconds, null for an HTTP-date (as documented)', async () => {
  const fetch = fakeFetch((call) =>
    errorReply(503, 'tier_unavailable', 'down', { headers: { 'Retry-After': call.url === '/date' ? 'Wed, 21 Oct 2037 07:28:00 GMT' : '0' } }),
  );
  const client = testClient({ fetch });
  assert.equal((await client.fetch('/date').catch((e) => e)).retryAfter, null);
  assert.equal((await client.fetch('/zero').catch((e) => e)).retryAfter, 0);
});

test('stale_context: picks up the newer token from storage and retries once', async () => {
  const storage = memoryStorage();
  const fetch = fakeFetch((call) => {
    if (call.token === 'A5') {
      // Meanwhile another tab advanced the conversation and stored A6.
      storage.set('satchel:default', JSON.stringify({ token: 'A6', seq: 6, session: 'A' }));
      return errorReply(409, 'stale_context', 'moved ahead');
    }
    return reply({ satchel: { token: 'A7', seq: 7, session: 'A' } });
  });
  const client = testClient({ fetch, storage });
  await client.importToken('A5', { seq: 5, session: 'A' });
  const stale = record(client, ['stale']);
  await client.fetch('/chat', { method: 'POST', body: 'm' });
  assert.deepEqual(fetch.calls.map((c) => c.token), ['A5', 'A6']);
  assert.equal(client.token, 'A7');
  assert.equal(stale.length, 1);
  assert.equal(stale[0].detail.retrying, true);
});

test('stale_context with nothing newer in storage: StaleContextError, no retry', async () => {
  const fetch = fakeFetch(() => errorReply(409, 'stale_context', 'moved ahead'));
  const client = testClient({ fetch });
  await client.importToken('A5');
  const stale = record(client, ['stale']);
  await assert.rejects(client.fetch('/x'), StaleContextError);
  assert.equal(fetch.calls.length, 1);
  assert.equal(client.token, 'A5'); // a stale token is still the best we have
  assert.equal(stale[0].detail.retrying, false);
});

test('a response lost after the server committed (monotonic): stale for good, recoverable false', async () => {
  // The server issued A2 for A1, but the response never arrived (abort, timeout,
  // network); under monotonic consistency A1 is refused from then on.
  let committed = false;
  const fetch = fakeFetch((call) => {
    if (call.token === 'A1' && !committed) {
      committed = true;
      throw new DOMException('The operation was aborted.', 'AbortError');
    }
    return errorReply(409, 'stale_context', 'a newer token was issued');
  });
  const client = testClient({ fetch });
  await client.importToken('A1', { seq: 1, session: 'A' });
  const stale = record(client, ['stale']);
  await assert.rejects(client.fetch('/chat', { method: 'POST', body: 'b' }), { name: 'AbortError' });
  assert.equal(client.token, 'A1'); // unchanged: the client cannot know the server committed
  const err = await client.fetch('/chat', { method: 'POST', body: 'c' }).catch((e) => e);
  assert.ok(err instanceof StaleContextError);
  assert.equal(err.recoverable, false);
  assert.deepEqual(
    stale.map((e) => [e.detail.retrying, e.detail.recoverable]),
    [[false, false]],
  );
  // reset() is the way on: a fresh context.
  await client.reset();
  const fresh = testClient({ fetch: fakeFetch(() => reply({ satchel: { token: 'B1', seq: 1 } })) });
  await fresh.fetch('/chat', { method: 'POST', body: 'c' });
  assert.equal(fresh.token, 'B1');
  assert.equal(client.token, null);
});

test('a lost response handed back with the 409 (monotonic): adopted, recovered, not resent', async () => {
  // The server issued A2 for A1, the response was lost; the server keeps its newest
  // token and hands it back with the refusal of A1. The request is not resent: the
  // lost response may have been for this very message.
  let committed = false;
  const fetch = fakeFetch((call) => {
    if (call.token === 'A1' && !committed) {
      committed = true;
      throw new TypeError('Failed to fetch');
    }
    if (call.token === 'A1') {
      return errorReply(409, 'stale_context', 'stale; this response carries the newest token', {
        satchel: { token: 'A2', seq: 2, session: 'A' },
      });
    }
    return reply({ satchel: { token: 'A3', seq: 3, session: 'A' } });
  });
  const client = testClient({ fetch });
  await client.importToken('A1', { seq: 1, session: 'A' });
  const stale = record(client, ['stale', 'token']);
  await assert.rejects(client.fetch('/chat', { method: 'POST', body: 'b' }), TypeError);
  const err = await client.fetch('/chat', { method: 'POST', body: 'b' }).catch((e) => e);
  assert.ok(err instanceof StaleContextError);
  assert.equal(err.recovered, true);
  assert.equal(err.recoverable, true);
  assert.equal(fetch.calls.length, 2); // not resent
  assert.equal(client.token, 'A2');
  assert.equal(client.seq, 2);
  assert.deepEqual(
    stale.map((e) => [e.name, e.detail.token ?? null, e.detail.retrying ?? null, e.detail.recovered ?? null]),
    [
      ['token', 'A2', null, null],
      ['stale', null, false, true],
    ],
  );
  // The conversation goes on from the handed-back token.
  await client.fetch('/chat', { method: 'POST', body: 'c' });
  assert.equal(fetch.calls[2].token, 'A2');
  assert.equal(client.token, 'A3');
});

test('a read refused with the newest token handed back is resent with it (sending a read twice changes nothing)', async () => {
  const fetch = fakeFetch((call) =>
    call.token === 'A1'
      ? errorReply(409, 'stale_context', 'stale', { satchel: { token: 'A2', seq: 2, session: 'A' } })
      : reply({ json: { turns: 4 } }),
  );
  const client = testClient({ fetch });
  await client.importToken('A1', { seq: 1, session: 'A' });
  const stale = record(client, ['stale']);
  const res = await client.fetch('/api/context');
  assert.deepEqual(await res.json(), { turns: 4 });
  assert.deepEqual(fetch.calls.map((c) => c.token), ['A1', 'A2']);
  assert.deepEqual(stale.map((e) => [e.detail.retrying, e.detail.recovered]), [[true, true]]);
});

test('a 409 carrying a token while another tab stored a newer one: not recovered, resent with the newer', async () => {
  const storage = memoryStorage();
  const fetch = fakeFetch((call) => {
    if (call.token === 'A1') {
      storage.set('satchel:default', JSON.stringify({ token: 'A3', seq: 3, session: 'A', g: 9 }));
      return errorReply(409, 'stale_context', 'stale', { satchel: { token: 'A2', seq: 2, session: 'A' } });
    }
    return reply({ satchel: { token: 'A4', seq: 4, session: 'A' } });
  });
  const client = testClient({ fetch, storage });
  await client.importToken('A1', { seq: 1, session: 'A' });
  const events = record(client, ['fork', 'stale']);
  await client.fetch('/chat', { method: 'POST', body: 'm' });
  assert.deepEqual(fetch.calls.map((c) => c.token), ['A1', 'A3']);
  assert.equal(client.token, 'A4');
  // The handed-back A2 is older than the stored A3: not a fork, just not taken.
  assert.deepEqual(
    events.map((e) => [e.name, e.detail.recovered]),
    [['stale', false]],
  );
});

test('the loser of a race between tabs, handed the winner\'s token that tab already stored: resent, not recovered', async () => {
  // Two tabs without a shared lock sent A1 at once; the other one won, stored A2, and
  // the server hands A2 back to this one. This message was not saved: send it on A2.
  const storage = memoryStorage();
  const fetch = fakeFetch((call) => {
    if (call.token === 'A1') {
      storage.set('satchel:default', JSON.stringify({ token: 'A2', seq: 2, session: 'A', g: 9 }));
      return errorReply(409, 'stale_context', 'stale', { satchel: { token: 'A2', seq: 2, session: 'A' } });
    }
    return reply({ satchel: { token: 'A3', seq: 3, session: 'A' } });
  });
  const client = testClient({ fetch, storage });
  await client.importToken('A1', { seq: 1, session: 'A' });
  const events = record(client, ['fork', 'stale']);
  await client.fetch('/chat', { method: 'POST', body: 'mine' });
  assert.deepEqual(fetch.calls.map((c) => c.token), ['A1', 'A2']);
  assert.equal(client.token, 'A3');
  assert.deepEqual(
    events.map((e) => [e.name, e.detail.retrying, e.detail.recovered]),
    [['stale', true, false]],
  );
});

test('stale_context while another tab keeps storing newer tokens: recoverable', async () => {
  const storage = memoryStorage();
  const fetch = fakeFetch((call) => {
    const next = { A5: 'A6', A6: 'A7' }[call.token];
    storage.set('satchel:default', JSON.stringify({ token: next, seq: Number(next.slice(1)), session: 'A' }));
    return errorReply(409, 'stale_context', 'moved ahead');
  });
  const client = testClient({ fetch, storage });
  await client.importToken('A5', { seq: 5, session: 'A' });
  const err = await client.fetch('/chat', { method: 'POST', body: 'm' }).catch((e) => e);
  assert.ok(err instanceof StaleContextError);
  assert.deepEqual(fetch.calls.map((c) => c.token), ['A5', 'A6']); // one retry per call
  assert.equal(err.recoverable, true); // A7 is stored: the next call sends it
});

test('stale_context on a server-mode carrier: the same carrier is sent again, once', async () => {
  // Server mode: two requests for one session raced and the other one was saved; the
  // carrier names the stored context, so sending it again loads that state.
  const fetch = fakeFetch((call, i) =>
    i === 0 ? errorReply(409, 'stale_context', 'saved first') : reply({ satchel: { token: 'sv1.abc.sig', seq: 3 } }),
  );
  const client = testClient({ fetch });
  await client.importToken('sv1.abc.sig');
  const stale = record(client, ['stale']);
  await client.fetch('/chat', { method: 'POST', body: 'm' });
  assert.deepEqual(fetch.calls.map((c) => c.token), ['sv1.abc.sig', 'sv1.abc.sig']);
  assert.equal(stale[0].detail.retrying, true);
  // ... but only once per call.
  const always = fakeFetch(() => errorReply(409, 'stale_context'));
  const again = testClient({ fetch: always, conversation: 'sv' });
  await again.importToken('sv1.abc.sig');
  await assert.rejects(again.fetch('/x'), StaleContextError);
  assert.equal(always.calls.length, 2);
});

test('only one retry per call even when stale is followed by a token error', async () => {
  const storage = memoryStorage();
  const fetch = fakeFetch((call, i) => {
    if (i === 0) {
      storage.set('satchel:default', JSON.stringify({ token: 'B', seq: 2 }));
      return errorReply(409, 'stale_context');
    }
    return errorReply(401, 'token_expired');
  });
  const client = testClient({ fetch, storage });
  await client.importToken('A', { seq: 1 });
  await assert.rejects(client.fetch('/x'), TokenError);
  assert.equal(fetch.calls.length, 2);
});

test('degraded, reset and fork headers become events', async () => {
  const fetch = fakeFetch(() =>
    reply({
      satchel: {
        token: 'n1',
        seq: 1,
        session: 'new',
        degraded: 'tier_unavailable, segment_missing,data_loss',
        reset: 'token_expired',
        fork: 'parent=abc',
      },
    }),
  );
  const client = testClient({ fetch });
  const events = record(client);
  await client.fetch('/x');
  const byName = Object.fromEntries(events.map((e) => [e.name, e.detail]));
  assert.deepEqual(byName.degraded.reasons, ['tier_unavailable', 'segment_missing', 'data_loss']);
  assert.equal(byName.reset.code, 'token_expired');
  assert.equal(byName.reset.source, 'server');
  assert.equal(byName.fork.detail, 'parent=abc');
  assert.equal(byName.fork.source, 'server');
  // The token is adopted before the other events fire, so handlers see it.
  assert.equal(events[0].name, 'token');
});

test('degraded header on an error response is still reported', async () => {
  const fetch = fakeFetch(() => errorReply(503, 'tier_unavailable', 'down', { satchel: { degraded: 'tier_unavailable' } }));
  const client = testClient({ fetch });
  const events = record(client, ['degraded', 'error']);
  await assert.rejects(client.fetch('/x'), ServiceUnavailableError);
  assert.deepEqual(events.map((e) => e.name), ['degraded', 'error']);
});

test('on() returns an unsubscribe function; EventTarget listeners get CustomEvents', async () => {
  const fetch = fakeFetch((c, i) => reply({ satchel: { token: `t${i}`, seq: i } }));
  const client = testClient({ fetch });
  const seen = [];
  const off = client.on('token', (d) => seen.push(d.token));
  const viaTarget = [];
  client.addEventListener('token', (e) => viaTarget.push(e.detail.token));
  await client.fetch('/x');
  off();
  await client.fetch('/x');
  assert.deepEqual(seen, ['t0']);
  assert.deepEqual(viaTarget, ['t0', 't1']);
});

test('network errors propagate unchanged, with an error event; aborts emit nothing', async () => {
  const boom = new TypeError('Failed to fetch');
  const client = testClient({ fetch: async () => { throw boom; } });
  const errors = record(client, ['error']);
  await assert.rejects(client.fetch('/x'), (e) => e === boom);
  assert.equal(errors.length, 1);

  const ac = new AbortController();
  ac.abort();
  const aborting = testClient({
    fetch: async (input, init) => {
      init.signal.throwIfAborted();
    },
  });
  const none = record(aborting, ['error']);
  await assert.rejects(aborting.fetch('/x', { signal: ac.signal }), { name: 'AbortError' });
  assert.equal(none.length, 0);
});

test('seq headers are compared as integers, non-integers are ignored', async () => {
  const fetch = fakeFetch((c, i) => reply({ headers: { 'Satchel-Context': `t${i}`, 'Satchel-Seq': ['10', ' 7 ', '1.5'][i] } }));
  const client = testClient({ fetch });
  await client.fetch('/x');
  assert.equal(client.seq, 10);
  await client.fetch('/x'); // direct successor: adopted even though 7 < 10 (server's call)
  assert.equal(client.seq, 7);
  await client.fetch('/x');
  assert.equal(client.seq, null);
  assert.equal(client.token, 't2');
});

test('a null init is accepted, as native fetch accepts it', async () => {
  const fetch = fakeFetch(() => reply({ satchel: { token: 'n1', seq: 1 } }));
  const client = testClient({ fetch });
  const res = await client.fetch('/x', null);
  assert.equal(res.status, 200);
  assert.equal(client.token, 'n1');
});

test("a Request's own signal aborts the wait for the lock", async () => {
  const gate = deferred();
  const fetch = fakeFetch((call, i) => (i === 0 ? gate.promise : reply({})));
  const client = testClient({ fetch, conversation: 'req-signal' });
  const first = client.fetch('/1');
  const ac = new AbortController();
  const second = client.fetch(new Request('http://x.test/2', { signal: ac.signal }));
  second.catch(() => {}); // asserted below
  ac.abort();
  const outcome = await Promise.race([second.then(() => 'sent', (e) => e.name), flush().then(() => 'waiting')]);
  assert.equal(outcome, 'AbortError', 'rejected while the first request still holds the lock');
  gate.resolve(reply({}));
  await first;
  await client.fetch('/3');
  assert.deepEqual(fetch.calls.map((c) => c.url), ['/1', '/3']);
});

test('event-stream pass-through keeps the url and redirected flag of the real response', async () => {
  const fetch = fakeFetch(() => {
    const res = sseReply(sse([{ event: 'satchel', data: { token: 'n', seq: 1 } }]));
    // A Response built in JS has url "" and redirected false; make this one look fetched.
    Object.defineProperty(res, 'url', { value: 'http://x.test/final' });
    Object.defineProperty(res, 'redirected', { value: true });
    return res;
  });
  const client = testClient({ fetch });
  const res = await client.fetch('http://x.test/start');
  assert.equal(res.url, 'http://x.test/final');
  assert.equal(res.redirected, true);
  await res.text();
  assert.equal(client.token, 'n');
});

test('event-stream pass-through: an in-stream error resolves fetch(), then emits error (and drops a dead token)', async () => {
  const body = sse([{ event: 'error', data: { code: 'token_expired', message: 'expired' } }]);
  const fetch = fakeFetch(() => sseReply(body));
  const client = testClient({ fetch });
  await client.importToken('dead');
  const events = record(client, ['token', 'reset', 'error']);
  const res = await client.fetch('/x');
  assert.deepEqual(events, [], 'nothing yet: fetch() resolved before the body was read');
  assert.equal(await res.text(), body, 'the reader sees the error itself');
  assert.deepEqual(events.map((e) => e.name), ['token', 'reset', 'error']);
  assert.equal(events[1].detail.retrying, false);
  assert.ok(events[2].detail.error instanceof TokenError);
  assert.equal(client.token, null);
});

test('a token error after the satchel event changed nothing we hold: no drop, no reset', async () => {
  const body = sse([
    { event: 'satchel', data: { token: 'next', seq: 2 } },
    { event: 'error', data: { code: 'token_expired', message: 'late' } },
  ]);
  const client = testClient({ fetch: fakeFetch(() => sseReply(body)) });
  await client.importToken('prev', { seq: 1 });
  const events = record(client, ['reset', 'error']);
  await (await client.fetch('/x')).text();
  assert.equal(client.token, 'next');
  assert.deepEqual(events.map((e) => e.name), ['error']);
});

test('a reset on a response that issues no token forgets the refused token', async () => {
  // SATCHEL_ON_BAD_TOKEN=fresh and a read-only route: the server refused the token,
  // answered from a fresh context and issued nothing. Keeping the token would reset
  // again on every load.
  const storage = memoryStorage({ 'satchel:c1': JSON.stringify({ token: 'expired', seq: 4, session: 's' }) });
  const fetch = fakeFetch((call, i) =>
    i === 0 ? reply({ json: {}, satchel: { reset: 'token_expired' } }) : reply({ json: {} }),
  );
  const client = testClient({ fetch, storage, conversation: 'c1' });
  const events = record(client, ['reset', 'token']);
  await client.fetch('/context');
  assert.equal(client.token, null);
  assert.equal(storage.get('satchel:c1'), null);
  assert.deepEqual(
    events.map((e) => [e.name, e.detail.code ?? e.detail.token]),
    [
      ['token', null],
      ['reset', 'token_expired'],
    ],
  );
  await client.fetch('/context');
  assert.equal(fetch.calls[1].token, null);
});

test('a reset without a token leaves a newer token another tab stored meanwhile', async () => {
  const storage = memoryStorage({ 'satchel:c1': JSON.stringify({ token: 'old', seq: 4, session: 's' }) });
  const fetch = fakeFetch(() => {
    storage.set('satchel:c1', JSON.stringify({ token: 'newer', seq: 5, session: 's' }));
    return reply({ json: {}, satchel: { reset: 'token_expired' } });
  });
  const client = testClient({ fetch, storage, conversation: 'c1' });
  await client.fetch('/context');
  assert.equal(JSON.parse(storage.get('satchel:c1')).token, 'newer');
});

test('a reset for an unknown key, with no token, keeps the token (another replica may know the key)', async () => {
  const storage = memoryStorage({ 'satchel:c1': JSON.stringify({ token: 'newkey', seq: 4, session: 's' }) });
  const fetch = fakeFetch(() => reply({ json: {}, satchel: { reset: 'token_unknown_key' } }));
  const client = testClient({ fetch, storage, conversation: 'c1' });
  await client.fetch('/context');
  assert.equal(client.token, 'newkey');
});

test('a server-mode carrier whose seq moves is stored with it and announced', async () => {
  // The carrier (sv1.) names the conversation and stays the same; only its seq moves.
  // The record kept seq 1 and no token event fired, so other tabs never refreshed.
  const fetch = fakeFetch((call, i) => reply({ satchel: { token: 'sv1.abc.sig', seq: i + 1, session: 's' } }));
  const storage = memoryStorage();
  const client = testClient({ fetch, storage });
  const events = record(client, ['token']);
  await client.fetch('/chat', { method: 'POST', body: 'one' });
  await client.fetch('/chat', { method: 'POST', body: 'two' });
  assert.equal(JSON.parse(storage.get('satchel:default')).seq, 2);
  assert.deepEqual(
    events.map((e) => [e.detail.token, e.detail.seq]),
    [
      ['sv1.abc.sig', 1],
      ['sv1.abc.sig', 2],
    ],
  );
});

test('context_busy with a short Retry-After is waited out and sent again, once', async () => {
  let busy = 1;
  const fetch = fakeFetch(() =>
    busy-- > 0
      ? errorReply(409, 'context_busy', 'another reply is being streamed', { headers: { 'Retry-After': '1' } })
      : reply({ satchel: { token: 'A2', seq: 2, session: 'A' } }),
  );
  const client = testClient({ fetch });
  await client.importToken('A1', { seq: 1, session: 'A' });
  const started = Date.now();
  await client.fetch('/chat', { method: 'POST', body: 'm' });
  assert.ok(Date.now() - started >= 950, 'waited for Retry-After');
  assert.deepEqual(fetch.calls.map((c) => c.token), ['A1', 'A1']);
  assert.equal(client.token, 'A2');
});

test('context_busy: no wait past three seconds in all, and an abort stops the wait', async () => {
  const long = fakeFetch(() =>
    errorReply(409, 'context_busy', 'busy', { headers: { 'Retry-After': '30' } }),
  );
  const client = testClient({ fetch: long });
  await client.importToken('A1', { seq: 1, session: 'A' });
  const err = await client.fetch('/chat', { method: 'POST', body: 'm' }).catch((e) => e);
  assert.equal(err.code, 'context_busy');
  assert.equal(long.calls.length, 1); // the caller waits for a reply that long, not us

  const always = fakeFetch(() => errorReply(409, 'context_busy', 'busy', { headers: { 'Retry-After': '1' } }));
  const second = testClient({ fetch: always });
  const controller = new AbortController();
  const pending = second.fetch('/chat', { method: 'POST', body: 'm', signal: controller.signal }).catch((e) => e);
  await flush();
  controller.abort();
  const aborted = await pending;
  assert.equal(aborted.name, 'AbortError');
  assert.equal(always.calls.length, 1);
});

test('context_busy that lasts: waited out three times, one second each, then thrown', async () => {
  const always = fakeFetch(() => errorReply(409, 'context_busy', 'busy', { headers: { 'Retry-After': '1' } }));
  const client = testClient({ fetch: always });
  const started = Date.now();
  const err = await client.fetch('/chat', { method: 'POST', body: 'm' }).catch((e) => e);
  assert.equal(err.code, 'context_busy');
  assert.equal(always.calls.length, 4); // the first and three resends: 3 s in all
  assert.ok(Date.now() - started >= 2900);
});

test('context_busy with Retry-After: 0 is resent at most three times, not forever', async () => {
  // A wait of 0 never used up the 3 s budget: one fetch() sent 10,000 requests. (Busy
  // for 50 calls, not forever, so that a regression fails here instead of hanging.)
  const always = fakeFetch((call, i) =>
    i < 50
      ? errorReply(409, 'context_busy', 'busy', { headers: { 'Retry-After': '0' } })
      : reply({ satchel: { token: 'A2', seq: 2, session: 'A' } }),
  );
  const client = testClient({ fetch: always });
  const err = await client.fetch('/chat', { method: 'POST', body: 'm' }).catch((e) => e);
  assert.equal(err.code, 'context_busy');
  assert.equal(always.calls.length, 4); // the first and three resends
});

test('token_wrong_user keeps the token: signing in again opens it', async () => {
  // Dropping it (as any other token_* error) replaced a user's conversation with a
  // fresh one the moment their login lapsed.
  const fetch = fakeFetch(() => errorReply(403, 'token_wrong_user', 'belongs to a signed-in user'));
  const client = testClient({ fetch });
  await client.importToken('alice-token', { seq: 2 });
  const resets = record(client, ['reset']);
  await assert.rejects(client.fetch('/chat', { method: 'POST', body: '{}' }), (err) => {
    return err instanceof TokenError && err.code === 'token_wrong_user';
  });
  assert.equal(fetch.calls.length, 1, 'not resent on a fresh context');
  assert.equal(client.token, 'alice-token');
  assert.equal(resets.length, 0);
});

test('a stored token no header can carry is dropped and the request sent without it', async () => {
  // fetch threw a TypeError on every request (read as "offline"), for good.
  for (const bad of ['s1.AQMB\u20ac\u20ac', 's1.AQ\nMB', 's1.AQ MB']) {
    const storage = memoryStorage({ 'satchel:default': JSON.stringify({ token: bad, seq: 3 }) });
    const fetch = fakeFetch(() => reply({ json: { ok: true }, satchel: { token: 'fresh', seq: 1 } }));
    const client = testClient({ fetch, storage });
    const resets = record(client, ['reset']);
    const res = await client.fetch('/chat', { method: 'POST', body: '{}' });
    assert.equal(res.status, 200, JSON.stringify(bad));
    assert.equal(fetch.calls.length, 1);
    assert.equal(fetch.calls[0].token, null);
    assert.equal(client.token, 'fresh');
    assert.deepEqual(
      resets.map((r) => [r.detail.code, r.detail.source, r.detail.retrying]),
      [['token_malformed', 'client', true]],
    );
  }
  await assert.rejects(testClient().importToken('s1.AQ\u20ac'), TypeError);
});

test('a 431 (headers too large) for a request with a token drops it and resends once', async () => {
  // A token past a proxy's header limit got the same HTML 431 on every request.
  const fetch = fakeFetch((call) =>
    call.token
      ? new Response('<h1>Request Header Fields Too Large</h1>', { status: 431 })
      : reply({ json: { ok: true }, satchel: { token: 'fresh', seq: 1 } }),
  );
  const client = testClient({ fetch });
  await client.importToken('x'.repeat(9000));
  const resets = record(client, ['reset']);
  const res = await client.fetch('/chat', { method: 'POST', body: '{}' });
  assert.equal(res.status, 200);
  assert.deepEqual(
    fetch.calls.map((c) => c.token && c.token.length),
    [9000, null],
  );
  assert.equal(client.token, 'fresh');
  assert.equal(resets[0].detail.code, 'token_too_large');
});

test('an abort with a reason (a string, an Error) is thrown as is and is no error event', async () => {
  for (const reason of ['user stopped', new Error('navigated away')]) {
    const controller = new AbortController();
    const fetch = (url, init) =>
      new Promise((resolve, reject) => {
        init.signal.addEventListener('abort', () => reject(init.signal.reason));
      });
    const client = testClient({ fetch });
    const events = record(client);
    const pending = client.fetch('/chat', { method: 'POST', body: '{}', signal: controller.signal });
    await flush();
    controller.abort(reason);
    await assert.rejects(pending, (err) => err === reason);
    assert.deepEqual(events, []);
  }
});

test('an abort with a reason while waiting for the conversation lock is no error event', async () => {
  const first = deferred();
  let calls = 0;
  const client = testClient({
    fetch: async () => {
      calls += 1;
      await first.promise;
      return reply({ satchel: { token: 't1', seq: 1, session: 's' } });
    },
  });
  const events = record(client);
  const holding = client.fetch('/chat', { method: 'POST', body: '{}' });
  const controller = new AbortController();
  const waiting = client.fetch('/chat', { method: 'POST', body: '{}', signal: controller.signal });
  await flush();
  controller.abort('user stopped');
  await assert.rejects(waiting, (err) => err === 'user stopped');
  first.resolve();
  await holding;
  assert.equal(calls, 1);
  assert.deepEqual(events.filter((e) => e.name === 'error'), []);
});

test('public methods work detached: const { fetch } = chat, ky.create({ fetch: chat.fetch })', async () => {
  // fetch() called without its client failed with "this._reportError is not a function".
  const fetch = fakeFetch((call, i) => {
    if (call.url === '/stream') return sseReply(sse([{ event: 'delta', data: { text: 'hi' } }, { event: 'satchel', data: { token: `t${i + 1}`, seq: i + 1 } }]));
    if (call.url === '/gone') return errorReply(500, 'boom');
    return reply({ json: {}, satchel: { token: `t${i + 1}`, seq: i + 1 } });
  });
  const client = testClient({ fetch });
  const { fetch: send, stream, reset, importToken, exportToken, on, withConversation, close } = client;
  const tokens = [];
  const off = on('token', (detail) => tokens.push(detail.token));
  await importToken('t0', { seq: 0 });
  assert.equal(exportToken(), 't0');
  const ky = { create: ({ fetch: f }) => (url) => f(url, { method: 'POST' }) }; // what an HTTP library does
  assert.equal((await ky.create({ fetch: client.fetch })('/chat')).status, 200);
  assert.equal(client.token, 't1');
  await assert.rejects(send('/gone'), HTTPError);
  const s = stream('/stream', {});
  for await (const piece of s) assert.equal(piece, 'hi');
  assert.equal((await s.result).token, 't3');
  await reset();
  assert.equal(client.token, null);
  assert.equal(withConversation('other').conversation, 'other');
  off();
  close();
  assert.deepEqual(tokens, ['t0', 't1', 't3', null]);
  assert.deepEqual(Object.keys(client).filter((k) => k in SatchelClient.prototype), []); // nothing new to enumerate
});

test('a token header no request could send back keeps the stored token and is reported', async () => {
  // Stored as it was, the next request dropped it as token_malformed and retried with
  // no token: the whole conversation lost for one bad response (a space, a non-ASCII
  // byte, or a header sent twice with different tokens).
  // (joined without the space too, as an intermediary may join them)
  for (const bad of ['s1.a b', 's1.new, s1.other', 's1.new,s1.other', 's1.new,']) {
    const fetch = fakeFetch(() => reply({ json: { ok: true }, headers: { 'Satchel-Context': bad } }));
    const client = testClient({ fetch });
    await client.importToken('s1.saved', { seq: 4 });
    const seen = record(client, ['token', 'error', 'reset']);
    const res = await client.fetch('/x', { method: 'POST', body: '{}' });
    assert.deepEqual(await res.json(), { ok: true }); // the reply is the caller's
    assert.equal(client.token, 's1.saved');
    assert.deepEqual(seen.map((e) => e.name), ['error']);
    assert.equal(seen[0].detail.error.code, 'response_protocol');
    assert.ok(seen[0].detail.error instanceof SatchelError);
  }
});

test('a token header sent twice with the same token (joined "t, t" by fetch) is that token', async () => {
  for (const joined of ['s1.new, s1.new', 's1.new,s1.new']) {
    const fetch = fakeFetch(() => reply({ headers: { 'Satchel-Context': joined, 'Satchel-Seq': '5' } }));
    const client = testClient({ fetch });
    await client.importToken('s1.saved', { seq: 4 });
    const seen = record(client, ['error']);
    await client.fetch('/x');
    assert.equal(client.token, 's1.new');
    assert.equal(client.seq, 5);
    assert.deepEqual(seen, []);
  }
});

test('an error body is read for its JSON up to 64 KiB, not whole', async () => {
  // A proxy's page or a runaway body was read whole (50 MB held) to find no JSON in it.
  let pulled = 0;
  const chunk = new Uint8Array(16 * 1024).fill(0x20);
  const fetch = fakeFetch(() => {
    const body = new ReadableStream({
      pull(ctl) {
        pulled += chunk.byteLength;
        if (pulled > 8 * 1024 * 1024) ctl.close();
        else ctl.enqueue(chunk);
      },
    });
    return new Response(body, { status: 502, headers: { 'content-type': 'application/json' } });
  });
  const client = testClient({ fetch });
  const err = await client.fetch('/x').catch((e) => e);
  assert.ok(err instanceof HTTPError);
  assert.equal(err.code, 'http_502');
  assert.ok(pulled < 256 * 1024, `pulled ${pulled} bytes`);
  assert.equal(err.response.bodyUsed, false); // still the caller's to read
});

test('an error body within the limit still gives its code and message', async () => {
  const padded = JSON.stringify({ error: { code: 'tier_full', message: 'm'.repeat(60_000) } });
  const fetch = fakeFetch(() => reply({ status: 507, body: padded, headers: { 'content-type': 'application/json' } }));
  const client = testClient({ fetch });
  const err = await client.fetch('/x').catch((e) => e);
  assert.equal(err.code, 'tier_full');
  assert.equal(err.message.length, 60_000);
});
