import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createClient, memoryStorage } from '../src/satchel.js';
import {
  channelHub,
  deferred,
  fakeFetch,
  fakeLocks,
  laggingStorage,
  flush,
  record,
  reply,
  testClient,
} from '../test-support/fakes.js';


/** A Storage area over `map`, as localStorage would be. */
function mapArea(map) {
  return {
    get length() {
      return map.size;
    },
    key: (i) => [...map.keys()][i] ?? null,
    getItem: (k) => (map.has(k) ? map.get(k) : null),
    setItem: (k, v) => void map.set(k, String(v)),
    removeItem: (k) => void map.delete(k),
  };
}

/** localStorage over `map`, full: the probe's tiny write still fits, a token does not. */
function installFullLocalStorage(map) {
  const area = mapArea(map);
  const full = { ...area, setItem(k, v) {
    if (k.startsWith('satchel:')) {
      const e = new Error('quota');
      e.name = 'QuotaExceededError';
      throw e;
    }
    area.setItem(k, v);
  } };
  Object.defineProperty(globalThis, 'localStorage', { configurable: true, value: full });
}

test('lock fallback: two concurrent requests run one after the other; the second carries the first response token', async () => {
  const gates = [deferred(), deferred()];
  const fetch = fakeFetch((call, i) => gates[i].promise);
  const client = testClient({ fetch, conversation: 'serial' });
  assert.equal(client.lockMode, 'page-queue');

  const p1 = client.fetch('/chat', { method: 'POST', body: 'one' });
  const p2 = client.fetch('/chat', { method: 'POST', body: 'two' });
  await flush();
  assert.equal(fetch.calls.length, 1, 'second request waits for the first');
  assert.equal(fetch.calls[0].body, 'one');

  gates[0].resolve(reply({ satchel: { token: 'after-one', seq: 1, session: 's' } }));
  await p1;
  await flush();
  assert.equal(fetch.calls.length, 2);
  assert.equal(fetch.calls[1].body, 'two');
  assert.equal(fetch.calls[1].token, 'after-one');

  gates[1].resolve(reply({ satchel: { token: 'after-two', seq: 2, session: 's' } }));
  await p2;
  assert.equal(client.token, 'after-two');
});

test('lock fallback: the queue is per conversation and survives a failed request', async () => {
  const gate = deferred();
  const fetch = fakeFetch((call) => (call.url === '/slow' ? gate.promise : reply({})));
  const a = testClient({ fetch, conversation: 'q-a' });
  const b = a.withConversation('q-b');
  const slow = a.fetch('/slow');
  await b.fetch('/fast'); // other conversation: not blocked
  const queued = a.fetch('/fast');
  await flush();
  assert.deepEqual(fetch.calls.map((c) => c.url), ['/slow', '/fast']);
  gate.reject(new TypeError('network down'));
  await assert.rejects(slow, TypeError);
  await queued; // lock was released despite the failure
  assert.equal(fetch.calls.length, 3);
});

test('lock fallback: aborting while queued rejects without blocking the queue', async () => {
  const gate = deferred();
  const fetch = fakeFetch((call, i) => (i === 0 ? gate.promise : reply({})));
  const client = testClient({ fetch, conversation: 'abort-q' });
  const first = client.fetch('/1');
  const ac = new AbortController();
  const second = client.fetch('/2', { signal: ac.signal });
  const third = client.fetch('/3');
  ac.abort();
  await assert.rejects(second, { name: 'AbortError' });
  gate.resolve(reply({}));
  await first;
  await third;
  assert.deepEqual(fetch.calls.map((c) => c.url), ['/1', '/3']);
});

test('Web Locks: lock named after the storage key, token read inside the lock (two tabs, shared storage)', async () => {
  const locks = fakeLocks(); // stands in for navigator.locks, shared by both "tabs"
  const shared = { ...memoryStorage(), kind: 'local' }; // stands in for localStorage, shared by both tabs
  const gate = deferred();
  const fetchA = fakeFetch(() => gate.promise);
  const fetchB = fakeFetch(() => reply({ satchel: { token: 'b-next', seq: 2, session: 's' } }));
  const tabA = testClient({ storage: shared, locks, fetch: fetchA, conversation: 'wl' });
  const tabB = testClient({ storage: shared, locks, fetch: fetchB, conversation: 'wl' });
  assert.equal(tabA.lockMode, 'web-locks');

  const pa = tabA.fetch('/chat');
  await flush();
  // Tab B created its request while A held the lock and before A had its token.
  const pb = tabB.fetch('/chat');
  await flush();
  assert.equal(fetchB.calls.length, 0);

  gate.resolve(reply({ satchel: { token: 'a-next', seq: 1, session: 's' } }));
  await pa;
  await pb;
  assert.equal(fetchB.calls[0].token, 'a-next', 'B read the token A wrote, not what it held when it queued');
  assert.equal(tabB.token, 'b-next');
  await flush(); // the lock manager logs the release a few microtasks later
  assert.deepEqual(locks.log, ['acquire satchel:wl', 'release satchel:wl', 'acquire satchel:wl', 'release satchel:wl']);
});

test('Web Locks are picked up from navigator.locks when present; locks:false opts out', () => {
  const locks = fakeLocks();
  Object.defineProperty(globalThis, 'navigator', { value: { locks }, configurable: true });
  try {
    assert.equal(createClient({ storage: memoryStorage(), broadcast: false }).lockMode, 'web-locks');
    assert.equal(createClient({ storage: memoryStorage(), broadcast: false, locks: false }).lockMode, 'page-queue');
  } finally {
    delete globalThis.navigator;
  }
});

test('BroadcastChannel: new tokens are announced and adopted by the other tab', async () => {
  const hub = channelHub();
  const fetch = fakeFetch(() => reply({ satchel: { token: 'n1', seq: 1, session: 's' } }));
  // Separate per-tab storages, so the broadcast is the only way B can learn.
  const tabA = testClient({ fetch, broadcast: hub.FakeChannel, conversation: 'bc' });
  const tabB = testClient({ broadcast: hub.FakeChannel, conversation: 'bc' });
  const other = testClient({ broadcast: hub.FakeChannel, conversation: 'unrelated' });
  assert.equal(tabA.syncMode, 'broadcast-channel');
  const seenB = record(tabB, ['token']);

  await tabA.fetch('/x');
  await flush();
  assert.equal(hub.sent[0].name, 'satchel:satchel:');
  assert.deepEqual(hub.sent[0].data, { v: 1, conversation: 'bc', type: 'token', token: 'n1', seq: 1, session: 's', g: 1 });
  assert.equal(tabB.token, 'n1');
  assert.equal(JSON.parse(tabB.storage.get('satchel:bc')).token, 'n1');
  assert.equal(seenB[0].detail.source, 'broadcast');
  assert.equal(other.token, null);

  await tabA.reset();
  await flush();
  assert.equal(tabB.token, null, 'a reset is announced too');

  tabB.close();
  await tabA.importToken('after-close');
  await flush();
  assert.equal(tabB.token, null);
});

test('monotonic adoption: only a greater seq (compared as integers) replaces the held token', async () => {
  const hub = channelHub();
  const tab = testClient({ broadcast: hub.FakeChannel, conversation: 'mono' });
  const sender = new hub.FakeChannel('satchel:satchel:');
  const announce = (token, seq, session = 'S') =>
    sender.postMessage({ v: 1, conversation: 'mono', type: 'token', token, seq, session });

  announce('t10', 10);
  await flush();
  assert.equal(tab.token, 't10');
  announce('t9', '9'); // "9" > "10" as strings, not as integers
  await flush();
  assert.equal(tab.token, 't10');
  announce('t10b', 10); // equal is not greater
  await flush();
  assert.equal(tab.token, 't10');
  announce('t11', 11);
  await flush();
  assert.equal(tab.token, 't11');
  announce('new-session', 1, 'S2'); // another tab restarted the conversation
  await flush();
  assert.equal(tab.token, 'new-session');

  // A clear for a token we no longer hold is ignored.
  sender.postMessage({ v: 1, conversation: 'mono', type: 'clear', token: 't11' });
  await flush();
  assert.equal(tab.token, 'new-session');
});

test('client-side fork: a response not ahead of what another tab already stored', async () => {
  // Two tabs without a shared lock (each has its own lock manager), one storage.
  const shared = memoryStorage();
  const gates = { a: deferred(), b: deferred() };
  const tabA = testClient({ storage: shared, locks: fakeLocks(), fetch: fakeFetch(() => gates.a.promise), conversation: 'fork' });
  const tabB = testClient({ storage: shared, locks: fakeLocks(), fetch: fakeFetch(() => gates.b.promise), conversation: 'fork' });
  await tabA.importToken('p5', { seq: 5, session: 'S' });
  const forksA = record(tabA, ['fork']);

  const pa = tabA.fetch('/chat');
  const pb = tabB.fetch('/chat');
  await flush();
  gates.b.resolve(reply({ satchel: { token: 'b6', seq: 6, session: 'S' } }));
  await pb;
  gates.a.resolve(reply({ satchel: { token: 'a6', seq: 6, session: 'S' } }));
  await pa;

  assert.equal(shared.get('satchel:fork') && JSON.parse(shared.get('satchel:fork')).token, 'b6');
  assert.equal(tabA.token, 'b6', 'first writer kept; the sibling is not adopted');
  assert.equal(forksA.length, 1);
  assert.equal(forksA[0].detail.source, 'client');
  assert.deepEqual(forksA[0].detail.held, { seq: 6, session: 'S' });
  assert.deepEqual(forksA[0].detail.incoming, { seq: 6, session: 'S' });
});

test('storage-event fallback when BroadcastChannel is missing (localStorage only)', async () => {
  const target = new EventTarget();
  const saved = globalThis.BroadcastChannel;
  const map = new Map();
  const area = mapArea(map);
  globalThis.localStorage = area;
  globalThis.addEventListener = target.addEventListener.bind(target);
  globalThis.removeEventListener = target.removeEventListener.bind(target);
  delete globalThis.BroadcastChannel;
  try {
    const client = createClient({ conversation: 'se', locks: false });
    assert.equal(client.syncMode, 'storage-event');
    const fire = (key, newValue) => target.dispatchEvent(Object.assign(new Event('storage'), { key, newValue }));

    // Another tab wrote localStorage; the browser tells us via `storage`.
    area.setItem('satchel:se', JSON.stringify({ token: 'other-tab', seq: 3, session: 's' }));
    fire('satchel:se', area.getItem('satchel:se'));
    assert.equal(client.token, 'other-tab');
    fire('satchel:unrelated', 'x');
    assert.equal(client.token, 'other-tab');
    fire(null, null); // localStorage.clear()
    assert.equal(client.token, null);
    client.close();
    fire('satchel:se', 'late');
    assert.equal(client.token, null);
  } finally {
    globalThis.BroadcastChannel = saved;
    delete globalThis.localStorage;
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});

/** Two tabs sharing a lagging localStorage and one lock manager; A's reply comes first. */
function laggingTabs(conversation, optionsB = {}) {
  const locks = fakeLocks();
  const storage = laggingStorage();
  const fetchA = fakeFetch(() => reply({ satchel: { token: 'a-next', seq: 1, session: 's' } }));
  const fetchB = fakeFetch(() => reply({ satchel: { token: 'b-next', seq: 2, session: 's' } }));
  const tabA = testClient({ storage: storage.tab(), locks, fetch: fetchA, conversation });
  const tabB = testClient({ storage: storage.tab(), locks, fetch: fetchB, conversation, ...optionsB });
  return { storage, fetchB, tabA, tabB };
}

test('a tab whose localStorage copy lags waits for the write the lock holder announced', async () => {
  const { storage, fetchB, tabA, tabB } = laggingTabs('lag');
  const events = record(tabB, ['fork']);

  await tabA.fetch('/chat'); // writes a-next; tab B's copy has not heard of it yet
  const pb = tabB.fetch('/chat');
  await flush(); // without the wait, B's request would have gone out by now
  assert.equal(fetchB.calls.length, 0, 'B waits instead of sending the token it still sees');
  storage.propagate();
  await pb;
  assert.equal(fetchB.calls[0].token, 'a-next');
  assert.equal(tabB.token, 'b-next');
  assert.deepEqual(events, []);
  assert.equal(JSON.parse(storage.backing.get('satchel:lag')).g, 2, 'each write counts one generation');
});

test('the wait for a lagging copy is bounded (syncWaitMs); a cleared token is waited for too', async () => {
  const { storage, fetchB, tabA, tabB } = laggingTabs('cap', { syncWaitMs: 40 });
  await tabA.fetch('/chat');
  storage.propagate();
  await tabA.reset(); // removed in A's copy and the backing store; B still sees a-next
  const started = Date.now();
  await tabB.fetch('/chat'); // never propagated: B gives up after syncWaitMs
  assert.ok(Date.now() - started >= 35, 'B waited for the clear to show');
  assert.equal(fetchB.calls[0].token, 'a-next', 'after the deadline B sends what it has');
});

test('per-tab storage announces nothing and never waits', async () => {
  const locks = fakeLocks();
  const fetch = fakeFetch(() => reply({ satchel: { token: 't1', seq: 1, session: 's' } }));
  const client = testClient({ storage: memoryStorage(), locks, fetch, conversation: 'mem' });
  await client.fetch('/chat');
  const { held } = await locks.query();
  assert.deepEqual(held, []);
});

test('a late broadcast never rolls shared localStorage back', async () => {
  // Tab C's copy lags; the broadcast of A's token reaches it after B stored a newer one.
  const hub = channelHub();
  const storage = laggingStorage();
  const tabA = testClient({ storage: storage.tab(), conversation: 'late' });
  const tabC = testClient({ storage: storage.tab(), broadcast: hub.FakeChannel, conversation: 'late' });
  await tabA.importToken('A1', { seq: 1, session: 's' });
  const tabB = testClient({ storage: storage.tab(), conversation: 'late' });
  await tabB.importToken('B2', { seq: 2, session: 's' });
  assert.equal(JSON.parse(storage.backing.get('satchel:late')).token, 'B2');
  // A's announcement, delivered late: C's copy still shows nothing.
  const sender = new hub.FakeChannel('satchel:satchel:');
  sender.postMessage({ v: 1, conversation: 'late', type: 'token', token: 'A1', seq: 1, session: 's', g: 1 });
  await flush();
  assert.equal(tabC.token, 'A1', 'the cached view moves forward');
  assert.equal(JSON.parse(storage.backing.get('satchel:late')).token, 'B2', 'the store keeps the newer token');
  // A late "clear" of a token C's copy still shows must not delete the newer one either.
  storage.propagate();
  const stale = new hub.FakeChannel('satchel:satchel:');
  stale.postMessage({ v: 1, conversation: 'late', type: 'clear', token: 'B2' });
  await flush();
  assert.equal(JSON.parse(storage.backing.get('satchel:late')).token, 'B2');
});

test('a late broadcast never writes a custom (shared) store: a reset is not undone', async () => {
  // Tab B's messages queue while it is busy; A meanwhile stores t1, resets, and stores
  // t2 of a new session. B used to copy t1 (a change of session looks newer) into the
  // shared store from outside the lock, and A's next request sent it.
  const db = new Map();
  const kv = {
    get: async (k) => (db.has(k) ? db.get(k) : null),
    set: async (k, v) => void db.set(k, v),
    remove: async (k) => void db.delete(k),
    keys: async () => [...db.keys()],
  };
  const queued = [];
  let deliverToB = null;
  class ChannelA {
    addEventListener() {}
    postMessage(data) {
      queued.push(structuredClone(data));
    }
    close() {}
  }
  class ChannelB {
    addEventListener(type, fn) {
      deliverToB = fn;
    }
    postMessage() {}
    close() {}
  }
  const locks = fakeLocks();
  const a = testClient({ storage: kv, locks, broadcast: ChannelA, conversation: 'kv' });
  const b = testClient({ storage: kv, locks, broadcast: ChannelB, conversation: 'kv' });
  await a.importToken('t1', { seq: 1, session: 'S1' });
  await a.reset();
  await a.importToken('t2', { seq: 1, session: 'S2' });
  assert.ok(queued.length >= 2, 'A announced its writes');
  for (const data of queued.splice(0)) deliverToB({ data });
  await flush();
  await flush();
  assert.equal(JSON.parse(db.get('satchel:kv')).token, 't2', 'the shared store keeps the newest');
});

/** 'done' if `p` settles within the current task (fake requests need no timer), else 'waiting'. */
const doneBeforeNextTask = (p) => Promise.race([p.then(() => 'done'), flush().then(() => 'waiting')]);

/** A second copy of the module, as another tab would load it: its own page-wide state. */
const otherTab = () => import(`../src/satchel.js?tab=${Math.random()}`);

test('per-tab storage (session, memory) locks per tab: another tab with the same id is not blocked', async () => {
  const locks = fakeLocks(); // the origin's lock manager, seen by both tabs
  const tabB = await otherTab();
  for (const kind of ['session', 'memory']) {
    const gate = deferred();
    const fetchA = fakeFetch(() => gate.promise);
    const fetchB = fakeFetch(() => reply({ satchel: { token: 'b1', seq: 1 } }));
    const a = testClient({ storage: { ...memoryStorage(), kind }, locks, fetch: fetchA });
    const b = tabB.createClient({ storage: { ...memoryStorage(), kind }, locks, fetch: fetchB, broadcast: false });
    const pa = a.fetch('/slow'); // a long reply in tab A ...
    // ... does not hold up tab B's own "default" conversation.
    assert.equal(await doneBeforeNextTask(b.fetch('/chat')), 'done', kind);
    assert.equal(b.token, 'b1', kind);
    // Within one tab, requests still run one at a time.
    const a2 = a.withConversation('default', { fetch: fakeFetch(() => reply({})) });
    const queued = a2.fetch('/after');
    await flush();
    assert.equal(fetchA.calls.length, 1);
    gate.resolve(reply({ satchel: { token: 'a1', seq: 1 } }));
    await pa;
    await queued;
  }
});

test('shared storage locks per prefix + conversation: another prefix is another conversation', async () => {
  const locks = fakeLocks();
  const shared = { ...memoryStorage(), kind: 'local' };
  const gate = deferred();
  const a = testClient({ storage: shared, locks, prefix: 'app-a:', fetch: fakeFetch(() => gate.promise) });
  const b = testClient({ storage: shared, locks, prefix: 'app-b:', fetch: fakeFetch(() => reply({})) });
  const pa = a.fetch('/slow');
  const pb = b.fetch('/chat');
  assert.equal(await doneBeforeNextTask(pb), 'done', 'B does not wait for A: the lock names differ');
  gate.resolve(reply({}));
  await pa;
  await pb;
  await flush();
  assert.deepEqual(locks.log, ['acquire app-a:default', 'acquire app-b:default', 'release app-b:default', 'release app-a:default']);
});

test('write announcements: one per conversation per tab, even as clients come and go', async () => {
  const locks = fakeLocks();
  const shared = { ...memoryStorage(), kind: 'local' };
  const announced = async () =>
    (await locks.query()).held.map((l) => l.name).filter((n) => n.startsWith('satchel-written '));
  let n = 0;
  const fetch = fakeFetch(() => reply({ satchel: { token: `t${++n}`, seq: n, session: 's' } }));
  for (let i = 0; i < 3; i++) {
    const client = testClient({ storage: shared, locks, fetch, conversation: 'churn' });
    await client.fetch('/chat');
    client.close();
  }
  await flush();
  // The newest write stays announced after close(): a tab whose copy of storage
  // lags may still need it. The older ones, superseded, are gone.
  assert.deepEqual(await announced(), ['satchel-written 3 set satchel:churn']);
});

test('broadcast: false turns off live sync entirely, the storage-event fallback included', () => {
  const target = new EventTarget();
  const map = new Map();
  globalThis.localStorage = mapArea(map);
  globalThis.addEventListener = target.addEventListener.bind(target);
  globalThis.removeEventListener = target.removeEventListener.bind(target);
  try {
    const client = createClient({ conversation: 'quiet', locks: false, broadcast: false });
    assert.equal(client.syncMode, 'none');
    target.dispatchEvent(Object.assign(new Event('storage'), { key: 'satchel:quiet', newValue: 'other-tab' }));
    assert.equal(client.token, null);
  } finally {
    delete globalThis.localStorage;
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});

test('a server-mode carrier whose seq moved reaches the other tab as a token event', async () => {
  const hub = channelHub();
  const storageA = memoryStorage();
  const storageB = memoryStorage();
  const fetch = fakeFetch((call, i) => reply({ satchel: { token: 'sv1.abc.sig', seq: i + 1, session: 's' } }));
  const a = testClient({ fetch, storage: storageA, broadcast: hub.FakeChannel });
  const b = testClient({ fetch, storage: storageB, broadcast: hub.FakeChannel });
  const events = record(b, ['token']);
  await a.fetch('/chat', { method: 'POST', body: 'one' });
  await a.fetch('/chat', { method: 'POST', body: 'two' });
  await flush();
  assert.deepEqual(events.map((e) => e.detail.seq), [1, 2]);
  assert.equal(b.seq, 2);
});

test('a prefix or conversation id starting with "-" still gets a Web Lock', async () => {
  // Web Locks throw NotSupportedError for names starting with "-".
  const strict = fakeLocks();
  const request = strict.request.bind(strict);
  strict.request = (name, ...rest) => {
    if (name.startsWith('-')) return Promise.reject(new DOMException("Names cannot start with '-'.", 'NotSupportedError'));
    return request(name, ...rest);
  };
  const fetch = fakeFetch(() => reply({ satchel: { token: 't1', seq: 1, session: 's' } }));
  const dashed = testClient({ locks: strict, fetch, prefix: '-app:', conversation: 'c' });
  await dashed.fetch('/chat');
  assert.equal(dashed.token, 't1');
  const bare = testClient({ locks: strict, fetch, prefix: '', conversation: '-x' });
  await bare.fetch('/chat');
  assert.equal(bare.token, 't1');
  // Keys that differ keep different locks ("-x" and "\\-x" are two conversations).
  const acquired = (name) => strict.log.some((line) => line.startsWith(`acquire ${name}`));
  assert.ok(acquired('\\-app:c') && acquired('\\-x'), strict.log.join());
});

test('a write the full store kept in memory is not announced: other tabs do not wait for it', async () => {
  installFullLocalStorage(new Map());
  try {
    const locks = fakeLocks();
    const fetch = fakeFetch(() => reply({ satchel: { token: 't1', seq: 1, session: 's' } }));
    const client = createClient({ locks, fetch, broadcast: false, conversation: 'full' });
    assert.equal(client.storage.kind, 'local');
    await client.fetch('/chat');
    assert.equal(client.token, 't1', 'kept in the page memory');
    const { held } = await locks.query();
    assert.deepEqual(held.filter((l) => l.name.startsWith('satchel-written')), []);
  } finally {
    delete globalThis.localStorage;
  }
});

test('sessionStorage asked for, page memory standing in: still per tab, nothing announced', async () => {
  // Node has no sessionStorage: the client falls back to the page memory store. The
  // user asked for conversations kept apart per tab; announcing would merge them.
  const hub = channelHub();
  const saved = globalThis.BroadcastChannel;
  globalThis.BroadcastChannel = hub.FakeChannel;
  try {
    const fetch = fakeFetch(() => reply({ satchel: { token: 'a1', seq: 1, session: 's' } }));
    const tab = createClient({ storage: 'session', fetch, locks: false, conversation: 'per-tab' });
    assert.equal(tab.storage.kind, 'memory');
    assert.equal(tab.storage.fallbackFrom, 'session');
    assert.equal(tab.syncMode, 'none');
    await tab.fetch('/chat');
    assert.equal(tab.token, 'a1');
    assert.deepEqual(hub.sent, []);
    // Asked for explicitly, it is on.
    const opted = createClient({ storage: 'session', broadcast: true, locks: false, conversation: 'x' });
    assert.equal(opted.syncMode, 'broadcast-channel');
    opted.close();
    tab.close();
  } finally {
    globalThis.BroadcastChannel = saved;
  }
});

test('a write the full store kept in memory is not broadcast: the other tab keeps the stored token', async () => {
  installFullLocalStorage(new Map([['satchel:full', JSON.stringify({ token: 't0', seq: 0, session: 's' })]]));
  try {
    const hub = channelHub();
    const fetch = fakeFetch(() => reply({ satchel: { token: 't1', seq: 1, session: 's' } }));
    const tabA = createClient({ fetch, broadcast: hub.FakeChannel, locks: false, conversation: 'full' });
    const tabB = createClient({ broadcast: hub.FakeChannel, locks: false, conversation: 'full' });
    await tabA.fetch('/chat');
    await flush();
    assert.equal(tabA.token, 't1');
    assert.equal(tabA.storage.isVolatile(tabA.storageKey), true);
    // Tab B can only ever read t0 from the store: adopting t1 would make its token
    // jump back on its next request.
    assert.deepEqual(hub.sent.filter((m) => m.data.type === 'token'), []);
    assert.equal(tabB.token, 't0');
    tabA.close();
    tabB.close();
  } finally {
    delete globalThis.localStorage;
  }
});
