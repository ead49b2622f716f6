// The `timeout` option: each attempt waits so long for its response's headers, then is
// aborted and throws TimeoutError, letting go of the conversation's lock. Small timeouts
// (tens of ms) keep these fast; what must *not* time out is checked with a wait a few
// times the timeout, never seconds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  DEFAULT_TIMEOUT_MS,
  HTTPError,
  SatchelError,
  TimeoutError,
  createClient,
} from '../src/satchel.js';
import {
  deferred,
  errorReply,
  fakeFetch,
  fakeLocks,
  flush,
  record,
  reply,
  sse,
  sseReply,
  testClient,
} from '../test-support/fakes.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const never = () => new Promise(() => {});
const ok = (token, seq) => reply({ json: { ok: true }, satchel: { token, seq, session: 's' } });

/** A text/event-stream Response fed by hand. */
function handFedStream() {
  const enc = new TextEncoder();
  let feed;
  let cancelled = null;
  const body = new ReadableStream({
    start(controller) {
      feed = controller;
    },
    cancel(reason) {
      cancelled = { reason };
    },
  });
  return {
    response: new Response(body, { headers: { 'content-type': 'text/event-stream' } }),
    push: (text) => feed.enqueue(enc.encode(text)),
    end: () => feed.close(),
    get cancelled() {
      return cancelled;
    },
  };
}

const FINAL = (token, seq) => `event: satchel\ndata: {"token":"${token}","seq":${seq},"session":"s"}\n\n`;

test('the default is 120 s, and the option is checked', () => {
  assert.equal(DEFAULT_TIMEOUT_MS, 120000);
  for (const timeout of [0, -1, 2147483648, Infinity, NaN]) {
    assert.throws(() => testClient({ timeout }), timeout !== timeout ? TypeError : RangeError, String(timeout));
  }
  for (const timeout of ['5s', null, true, {}]) {
    assert.throws(() => testClient({ timeout }), TypeError, String(timeout));
  }
  testClient({ timeout: false });
  testClient({ timeout: 1 });
  testClient({ timeout: 2147483647 });
});

test('a fetch that never answers: TimeoutError after the timeout, fetch aborted, error event, token kept', async () => {
  const fetch = fakeFetch(() => never()); // ignores its signal, as a stuck double would
  const client = testClient({ fetch, timeout: 30 });
  await client.importToken('t1', { seq: 1, session: 's' });
  const events = record(client);
  const err = await client.fetch('/chat', { method: 'POST', body: '{}' }).catch((e) => e);
  assert.ok(err instanceof TimeoutError);
  assert.ok(err instanceof SatchelError);
  assert.equal(err.name, 'TimeoutError');
  assert.equal(err.code, 'timeout');
  assert.equal(err.timeout, 30);
  assert.match(err.message, /within 30 ms$/);
  assert.equal(err.status, null);
  assert.equal(err.response, null);
  const signal = fetch.calls[0].init.signal;
  assert.equal(signal.aborted, true, 'the request was aborted');
  assert.equal(signal.reason, err);
  assert.equal(fetch.calls.length, 1, 'a timed-out POST is not resent');
  assert.equal(client.token, 't1');
  assert.deepEqual(events.map((e) => e.name), ['error']);
  assert.equal(events[0].detail.error, err);
});

test('a fetch that obeys its signal rejects with the TimeoutError itself', async () => {
  const fetch = (url, init) =>
    new Promise((resolve, reject) => {
      init.signal.addEventListener('abort', () => reject(init.signal.reason));
    });
  const client = testClient({ fetch, timeout: 20 });
  await assert.rejects(client.fetch('/x'), (err) => err instanceof TimeoutError && err.timeout === 20);
});

test('a timed-out request lets go of the lock: the next one proceeds', async () => {
  const fetch = fakeFetch((call, i) => (i === 0 ? never() : ok('t2', 2)));
  const client = testClient({ fetch, timeout: 30 });
  await client.importToken('t1', { seq: 1, session: 's' });
  const first = client.fetch('/chat', { method: 'POST', body: 'a' });
  const second = client.fetch('/chat', { method: 'POST', body: 'b', timeout: false });
  await assert.rejects(first, TimeoutError);
  const res = await second;
  assert.equal(res.status, 200);
  assert.deepEqual(fetch.calls.map((c) => [c.body, c.token]), [['a', 't1'], ['b', 't1']]);
  assert.equal(client.token, 't2');
});

test('with Web Locks: the lock is released on timeout, for the other tab\'s client too', async () => {
  const locks = fakeLocks();
  const map = new Map(); // a custom adapter: shared by tabs, so the lock is too
  const storage = { get: (k) => map.get(k) ?? null, set: (k, v) => void map.set(k, v), remove: (k) => void map.delete(k) };
  const fetch = fakeFetch((call, i) => (i === 0 ? never() : ok('t1', 1)));
  const tabA = createClient({ storage, locks, fetch, broadcast: false, conversation: 'c', timeout: 30 });
  const tabB = createClient({ storage, locks, fetch, broadcast: false, conversation: 'c' });
  const stalled = tabA.fetch('/chat', { method: 'POST', body: 'a' });
  await flush();
  const next = tabB.fetch('/chat', { method: 'POST', body: 'b' });
  await assert.rejects(stalled, TimeoutError);
  assert.equal((await next).status, 200);
  await flush();
  assert.deepEqual(locks.log, ['acquire satchel:c', 'release satchel:c', 'acquire satchel:c', 'release satchel:c']);
  assert.equal(tabB.token, 't1');
});

test('timeout: false waits as long as the server takes, and sends init as given', async () => {
  const gate = deferred();
  const fetch = fakeFetch(() => gate.promise);
  const client = testClient({ fetch, timeout: false });
  const pending = client.fetch('/x', { method: 'POST', body: 'm' });
  let settled = false;
  pending.then(() => (settled = true), () => (settled = true));
  await sleep(60);
  assert.equal(settled, false);
  assert.equal(fetch.calls[0].init.signal, undefined, 'no signal of the client\'s own');
  gate.resolve(ok('t1', 1));
  assert.equal((await pending).status, 200);
  assert.equal(client.token, 't1');
});

test('per call: init.timeout overrides the client\'s, and is not passed on to fetch', async () => {
  // A client without a timeout, a call with one.
  const stuck = fakeFetch(() => never());
  const none = testClient({ fetch: stuck, timeout: false });
  await assert.rejects(none.fetch('/x', { timeout: 20 }), (e) => e instanceof TimeoutError && e.timeout === 20);
  assert.equal('timeout' in stuck.calls[0].init, false);

  // A client with a short one, a call without any.
  const gate = deferred();
  const slow = fakeFetch(() => gate.promise);
  const short = testClient({ fetch: slow, timeout: 20 });
  const pending = short.fetch('/x', { timeout: false });
  await sleep(60);
  gate.resolve(ok('t1', 1));
  assert.equal((await pending).status, 200);
  assert.equal('timeout' in slow.calls[0].init, false);

  // And a longer one per call.
  const late = deferred();
  const slower = fakeFetch(() => late.promise);
  const c = testClient({ fetch: slower, timeout: 20 });
  const p = c.fetch('/x', { timeout: 5000 });
  await sleep(60);
  late.resolve(ok('t1', 1));
  assert.equal((await p).status, 200);

  // Checked per call too.
  await assert.rejects(short.fetch('/x', { timeout: 0 }), RangeError);
  await assert.rejects(short.fetch('/x', { timeout: '1s' }), TypeError);
  assert.throws(() => short.stream('/s', {}, { timeout: -5 }), RangeError);
});

test('a caller abort before the timeout rejects with the caller\'s reason, and no error event', async () => {
  for (const obeys of [true, false]) {
    const controller = new AbortController();
    const fetch = fakeFetch((call) =>
      obeys
        ? new Promise((resolve, reject) => {
            call.init.signal.addEventListener('abort', () => reject(call.init.signal.reason));
          })
        : never(),
    );
    const client = testClient({ fetch, timeout: 200 });
    await client.importToken('t1', { seq: 1 });
    const events = record(client);
    const pending = client.fetch('/chat', { method: 'POST', body: '{}', signal: controller.signal });
    await flush();
    controller.abort('user stopped');
    await assert.rejects(pending, (err) => err === 'user stopped');
    assert.equal(fetch.calls[0].init.signal.aborted, true);
    assert.equal(fetch.calls[0].init.signal.reason, 'user stopped');
    assert.deepEqual(events, []);
    assert.equal(client.token, 't1');
  }
});

test('a Request\'s own signal is obeyed along with the timeout', async () => {
  const controller = new AbortController();
  const fetch = fakeFetch(() => never());
  const client = testClient({ fetch, timeout: 500 });
  const pending = client.fetch(new Request('http://x.test/a', { signal: controller.signal }));
  await flush();
  controller.abort('gone');
  await assert.rejects(pending, (err) => err === 'gone');
});

test('without AbortSignal.any: the caller\'s abort and the timeout still both work', async () => {
  const any = AbortSignal.any;
  AbortSignal.any = undefined;
  try {
    const controller = new AbortController();
    const stuck = fakeFetch(() => never());
    const client = testClient({ fetch: stuck, timeout: 30 });
    // Timeout, a caller signal present but not aborted.
    await assert.rejects(client.fetch('/x', { signal: controller.signal }), TimeoutError);
    assert.equal(stuck.calls[0].init.signal.aborted, true);
    assert.equal(controller.signal.aborted, false, 'the caller\'s signal is not touched');
    // The caller's abort first.
    const pending = client.fetch('/x', { signal: controller.signal, timeout: 500 });
    await flush();
    controller.abort('user stopped');
    await assert.rejects(pending, (err) => err === 'user stopped');
    assert.equal(stuck.calls[1].init.signal.reason, 'user stopped');
  } finally {
    AbortSignal.any = any;
  }
});

test('stream(): headers in time and a body slower than the timeout: not cut', async () => {
  const fed = handFedStream();
  const client = testClient({ fetch: async () => fed.response, timeout: 20 });
  await client.importToken('t1', { seq: 1, session: 's' });
  const s = client.stream('/s', {});
  const it = s[Symbol.asyncIterator]();
  const first = it.next();
  await sleep(60); // three timeouts with no byte
  fed.push('event: delta\ndata: {"text":"Hel"}\n\n');
  assert.deepEqual(await first, { value: 'Hel', done: false });
  const second = it.next();
  await sleep(60);
  fed.push('event: delta\ndata: {"text":"lo"}\n\n');
  assert.deepEqual(await second, { value: 'lo', done: false });
  fed.push(FINAL('t2', 2));
  fed.end();
  assert.equal((await it.next()).done, true);
  assert.equal((await s.result).text, 'Hello');
  assert.equal(client.token, 't2');
});

test('fetch(): an event stream, or any ok body, slower than the timeout is not cut', async () => {
  const fed = handFedStream();
  const client = testClient({ fetch: async () => fed.response, timeout: 20 });
  const res = await client.fetch('/s', { method: 'POST', body: '{}' });
  const reading = res.text();
  await sleep(60);
  fed.push('event: delta\ndata: {"text":"Hi"}\n\n');
  await sleep(60);
  fed.push(FINAL('t1', 1));
  fed.end();
  assert.match(await reading, /"t1"/);
  assert.equal(client.token, 't1');

  // A JSON body that trickles in.
  const enc = new TextEncoder();
  let feed;
  const body = new ReadableStream({ start: (c) => void (feed = c) });
  const plain = testClient({
    fetch: async () => new Response(body, { headers: { 'content-type': 'application/json', 'Satchel-Context': 'p1' } }),
    timeout: 20,
  });
  const r = await plain.fetch('/x');
  const json = r.json();
  await sleep(60);
  feed.enqueue(enc.encode('{"ok":'));
  await sleep(30);
  feed.enqueue(enc.encode('true}'));
  feed.close();
  assert.deepEqual(await json, { ok: true });
});

test('stream(): no headers in time: TimeoutError from the loop and result, error event, lock let go', async () => {
  const fetch = fakeFetch((call, i) => (i === 0 ? never() : sseReply(sse([{ event: 'satchel', data: { token: 't2', seq: 2 } }]))));
  const client = testClient({ fetch, timeout: 30 });
  await client.importToken('t1', { seq: 1, session: 's' });
  const events = record(client, ['error']);
  const s = client.stream('/s', { message: 'hi' });
  await assert.rejects(async () => {
    for await (const _ of s) {
      /* nothing comes */
    }
  }, TimeoutError);
  await assert.rejects(s.result, TimeoutError);
  assert.equal(events.length, 1);
  assert.equal(client.token, 't1');
  assert.equal(fetch.calls.length, 1, 'not resent');
  const again = client.stream('/s', { message: 'hi' });
  for await (const _ of again) {
    /* no deltas */
  }
  assert.equal((await again.result).token, 't2');
  assert.equal(client.token, 't2');
});

test('each attempt has its own timeout: a retry after a refusal gets the whole of it again', async () => {
  // 80 ms to a token refusal, then 80 ms to the answer: 160 ms in all, each under 150.
  // (Each attempt's 80 ms timer is due before its 150 ms one, so a busy machine that
  // runs both late still runs them in that order.)
  const fetch = fakeFetch(async (call) => {
    await sleep(80);
    return call.token ? errorReply(401, 'token_expired', 'expired') : ok('fresh', 1);
  });
  const client = testClient({ fetch, timeout: 150 });
  await client.importToken('old', { seq: 5 });
  const res = await client.fetch('/chat', { method: 'POST', body: '{}' });
  assert.equal(res.status, 200);
  assert.equal(fetch.calls.length, 2);
  assert.equal(client.token, 'fresh');
});

test('a retry that times out throws TimeoutError, and is not resent again', async () => {
  const fetch = fakeFetch((call) => (call.token ? errorReply(401, 'token_expired', 'expired') : never()));
  const client = testClient({ fetch, timeout: 30 });
  await client.importToken('old', { seq: 5 });
  await assert.rejects(client.fetch('/chat', { method: 'POST', body: '{}' }), TimeoutError);
  assert.equal(fetch.calls.length, 2);
  assert.equal(client.token, null, 'the refused token was dropped before the retry, as without a timeout');
});

test('a timed-out GET is not resent either', async () => {
  const fetch = fakeFetch(() => never());
  const client = testClient({ fetch, timeout: 20 });
  await assert.rejects(client.fetch('/api/context'), TimeoutError);
  assert.equal(fetch.calls.length, 1);
});

test('an error response whose body never ends: the timeout gives it up, the error comes from its status', async () => {
  const fetch = fakeFetch((call, i) =>
    i === 0
      ? new Response(new ReadableStream({ start() {} }), { status: 502, statusText: 'Bad Gateway' })
      : ok('t2', 2),
  );
  const client = testClient({ fetch, timeout: 30 });
  await client.importToken('t1', { seq: 1 });
  const err = await client.fetch('/chat', { method: 'POST', body: '{}' }).catch((e) => e);
  assert.ok(err instanceof HTTPError, String(err));
  assert.equal(err.status, 502);
  assert.equal(err.code, 'http_502');
  assert.equal(client.token, 't1');
  assert.equal((await client.fetch('/chat', { method: 'POST', body: '{}' })).status, 200, 'the lock was let go');
});

test('a response that arrives after its attempt timed out is discarded, its body cancelled', async () => {
  const gate = deferred();
  const fed = handFedStream();
  const client = testClient({ fetch: () => gate.promise, timeout: 20 });
  await client.importToken('t1', { seq: 1 });
  await assert.rejects(client.fetch('/x'), TimeoutError);
  gate.resolve(fed.response);
  await flush();
  assert.ok(fed.cancelled, 'the late body was cancelled');
  assert.equal(client.token, 't1');
});

test('the timeout is carried over by withConversation', async () => {
  const fetch = fakeFetch(() => never());
  const base = testClient({ fetch, timeout: 20 });
  await assert.rejects(base.withConversation('other').fetch('/x'), TimeoutError);
});

test('without AbortSignal.any, requests leave no listeners on a caller\'s long-lived signal', async () => {
  // Each attempt combined the caller's signal with its deadline by a listener left in
  // place: a page-long signal gathered one listener (and one controller) per request,
  // 20,000 requests 22 MB. Run in a child with --expose-gc, to collect for real.
  const { spawnSync } = await import('node:child_process');
  const script = `
    import { createClient, memoryStorage } from ${JSON.stringify(new URL('../src/satchel.js', import.meta.url).href)};
    delete AbortSignal.any;
    let n = 0;
    const fetch = async () => new Response('{}', { status: 200, headers: {
      'content-type': 'application/json', 'Satchel-Context': 't' + (++n), 'Satchel-Seq': String(n) } });
    const client = createClient({ fetch, storage: memoryStorage(), broadcast: false, locks: false });
    const page = new AbortController();
    const listeners = () => {
      const k = Object.getOwnPropertySymbols(page.signal).find((s) => String(s) === 'Symbol(kEvents)');
      return page.signal[k].get('abort')?.size ?? 0;
    };
    for (let i = 0; i < 2000; i++) {
      const r = await client.fetch('http://x/chat', { method: 'POST', body: '{}', signal: page.signal });
      await r.text();
    }
    const deadline = Date.now() + 5000;
    while (listeners() > 50 && Date.now() < deadline) {
      globalThis.gc();
      await new Promise((r) => setTimeout(r, 10));
    }
    console.log(listeners());`;
  const child = spawnSync(process.execPath, ['--expose-gc', '--input-type=module', '-e', script], {
    encoding: 'utf8',
    timeout: 60_000,
  });
  assert.equal(child.status, 0, child.stderr);
  assert.ok(Number(child.stdout.trim()) <= 50, `listeners left: ${child.stdout.trim()}`);
});

test('a timeout of whole seconds is said in seconds', async () => {
  const client = testClient({ fetch: fakeFetch(() => never()), timeout: 1000 });
  const err = await client.fetch('/chat', { method: 'POST', body: '{}' }).catch((e) => e);
  assert.ok(err instanceof TimeoutError);
  assert.match(err.message, /within 1 s$/); // "within 120 s", not "within 120000 ms"
});

test('the caller aborts while an error body is read: the call rejects with the reason, no error event', async () => {
  for (const timeout of [undefined, false]) {
    const fetch = fakeFetch((call) => {
      const body = new ReadableStream({
        start(ctl) {
          ctl.enqueue(new TextEncoder().encode('{"error":')); // then nothing more
          call.init.signal?.addEventListener('abort', () => ctl.error(call.init.signal.reason));
        },
      });
      return new Response(body, { status: 500, headers: { 'content-type': 'application/json' } });
    });
    const client = testClient({ fetch });
    const seen = record(client, ['error']);
    const ctl = new AbortController();
    const reason = new DOMException('stop', 'AbortError');
    setTimeout(() => ctl.abort(reason), 20);
    await assert.rejects(client.fetch('/x', { signal: ctl.signal, timeout }), (e) => e === reason);
    assert.deepEqual(seen, []);
  }
});
