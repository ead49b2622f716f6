import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  createClient,
  listConversations,
  localStorageAdapter,
  memoryStorage,
  resolveStorage,
  sessionStorageAdapter,
  TokenError,
} from '../src/satchel.js';
import { errorReply, fakeFetch, fakeLocks, record, reply, sse, sseReply, testClient } from '../test-support/fakes.js';

/** Minimal Web Storage double; `failAfter` makes setItem throw from the Nth call on. */
class FakeWebStorage {
  constructor({ failAfter = Infinity } = {}) {
    this.map = new Map();
    this.sets = 0;
    this.failAfter = failAfter;
  }
  get length() {
    return this.map.size;
  }
  key(i) {
    return [...this.map.keys()][i] ?? null;
  }
  getItem(k) {
    return this.map.has(k) ? this.map.get(k) : null;
  }
  setItem(k, v) {
    if (++this.sets > this.failAfter) {
      const e = new Error('quota');
      e.name = 'QuotaExceededError';
      throw e;
    }
    this.map.set(k, String(v));
  }
  removeItem(k) {
    this.map.delete(k);
  }
}

function installGlobal(name, value) {
  Object.defineProperty(globalThis, name, { configurable: true, enumerable: true, ...value });
}

afterEach(() => {
  delete globalThis.localStorage;
  delete globalThis.sessionStorage;
});

test('conversations are isolated: each keeps and sends its own token', async () => {
  const storage = memoryStorage();
  const fetch = fakeFetch((call) => {
    const conv = new URL(call.url).searchParams.get('c');
    const n = fetch.calls.filter((c) => c.url === call.url).length;
    return reply({ satchel: { token: `${conv}-${n}`, seq: n } });
  });
  const a = testClient({ fetch, storage, conversation: 'a' });
  const b = a.withConversation('b'); // shares storage and fetch

  await a.fetch('http://x.test/?c=a');
  await b.fetch('http://x.test/?c=b');
  await a.fetch('http://x.test/?c=a');
  await b.fetch('http://x.test/?c=b');

  assert.deepEqual(fetch.calls.map((c) => c.token), [null, null, 'a-1', 'b-1']);
  assert.equal(a.token, 'a-2');
  assert.equal(b.token, 'b-2');
  assert.equal(b.storage, storage);
  assert.deepEqual((await listConversations(storage)).sort(), ['a', 'b']);

  await a.reset();
  assert.equal(a.token, null);
  assert.equal(b.token, 'b-2');
  assert.deepEqual(await listConversations(storage), ['b']);
});

test('listConversations honours the prefix and ignores other keys', async () => {
  const storage = memoryStorage({ 'satchel:x': 't', 'app:y': 't', 'other': 'z' });
  const client = testClient({ storage, prefix: 'app:', conversation: 'z' });
  await client.importToken('tz');
  assert.equal(client.storageKey, 'app:z');
  assert.deepEqual((await listConversations(storage, 'app:')).sort(), ['y', 'z']);
  assert.deepEqual(await listConversations(storage), ['x']);
  assert.deepEqual(await listConversations({ get() {}, set() {}, remove() {} }), []);
});

test('storage fallback: missing localStorage -> memory', () => {
  const client = createClient({ conversation: 'fb1', broadcast: false });
  assert.equal(client.storage.kind, 'memory');
  assert.equal(client.storage.fallbackFrom, 'local');
});

test('storage fallback: localStorage access throws (blocked storage) -> memory', () => {
  installGlobal('localStorage', {
    get() {
      throw new DOMException('denied', 'SecurityError');
    },
  });
  const adapter = localStorageAdapter();
  assert.equal(adapter.kind, 'memory');
  adapter.set('k', 'v');
  assert.equal(adapter.get('k'), 'v');
  adapter.remove('k');
});

test('storage fallback: zero quota (private mode) -> memory, and the client works', async () => {
  installGlobal('localStorage', { value: new FakeWebStorage({ failAfter: 0 }) });
  const fetch = fakeFetch((c, i) => reply({ satchel: { token: `t${i}`, seq: i } }));
  const client = createClient({ fetch, conversation: 'fb2', broadcast: false, locks: false });
  assert.equal(client.storage.kind, 'memory');
  await client.fetch('/x');
  await client.fetch('/x');
  assert.equal(fetch.calls[1].token, 't0');
});

test('quota filled later: writes fall back to a memory overlay per key', async () => {
  const area = new FakeWebStorage({ failAfter: 3 }); // probe set + 2 writes succeed
  installGlobal('localStorage', { value: area });
  const adapter = localStorageAdapter();
  assert.equal(adapter.kind, 'local');
  adapter.set('satchel:q', 'v1');
  adapter.set('satchel:q', 'v2');
  adapter.set('satchel:q', 'v3'); // throws inside; kept in memory
  assert.equal(area.getItem('satchel:q'), 'v2');
  assert.equal(adapter.get('satchel:q'), 'v3');
  assert.deepEqual(adapter.keys(), ['satchel:q']);
  adapter.remove('satchel:q');
  assert.equal(adapter.get('satchel:q'), null);
});

test('localStorage and sessionStorage adapters use the real areas when they work', () => {
  const local = new FakeWebStorage();
  const session = new FakeWebStorage();
  installGlobal('localStorage', { value: local });
  installGlobal('sessionStorage', { value: session });
  const client = createClient({ conversation: 'ls', broadcast: false });
  assert.equal(client.storage.kind, 'local');
  const s = sessionStorageAdapter();
  s.set('a', '1');
  assert.equal(session.getItem('a'), '1');
  assert.equal(local.getItem('a'), null);
  // Session storage is per tab, so it does not announce tokens to other tabs by default.
  const perTab = createClient({ storage: 'session', conversation: 'ss' });
  assert.equal(perTab.storage.kind, 'session');
  assert.equal(perTab.syncMode, 'none');
});

test('"memory" is one page-wide store; memoryStorage() gives private ones', async () => {
  const a = createClient({ storage: 'memory', conversation: 'pw', broadcast: false, locks: false });
  await a.importToken('shared-token');
  const b = createClient({ storage: 'memory', conversation: 'pw', broadcast: false, locks: false });
  assert.equal(b.token, 'shared-token');
  await a.reset();
  const c = testClient({ conversation: 'pw' });
  assert.equal(c.token, null);
});

test('async custom adapter: token becomes available after `ready`', async () => {
  const backing = new Map([['satchel:async', JSON.stringify({ token: 'from-idb', seq: 4, session: 's' })]]);
  const adapter = {
    get: async (k) => backing.get(k) ?? null,
    set: async (k, v) => void backing.set(k, v),
    remove: async (k) => void backing.delete(k),
    keys: async () => [...backing.keys()],
  };
  const fetch = fakeFetch(() => reply({ satchel: { token: 'next', seq: 5, session: 's' } }));
  const client = testClient({ storage: adapter, fetch, conversation: 'async' });
  assert.equal(client.token, null);
  await client.ready;
  assert.equal(client.token, 'from-idb');
  assert.equal(client.seq, 4);
  await client.fetch('/x');
  assert.equal(fetch.calls[0].token, 'from-idb');
  assert.equal(JSON.parse(backing.get('satchel:async')).token, 'next');
  assert.deepEqual(await listConversations(adapter), ['async']);
});

test('exportToken / importToken / reset', async () => {
  const fetch = fakeFetch(() => reply({ satchel: { token: 'after', seq: 11, session: 'S' } }));
  const storage = memoryStorage();
  const client = testClient({ fetch, storage });
  assert.equal(client.exportToken(), null);
  await client.importToken('restored', { seq: '10', session: 'S' });
  assert.equal(client.exportToken(), 'restored');
  assert.equal(client.seq, 10);
  await client.fetch('/x');
  assert.equal(fetch.calls[0].token, 'restored');
  assert.equal(client.exportToken(), 'after');
  await client.reset();
  assert.equal(client.token, null);
  assert.equal(storage.get('satchel:default'), null);
  await client.fetch('/x');
  assert.equal(fetch.calls[1].token, null);
  await assert.rejects(client.importToken(''), TypeError);
});

test('a bare token string in storage (not our JSON record) is accepted', async () => {
  const storage = memoryStorage({ 'satchel:raw': 'v1.abc.def' });
  const fetch = fakeFetch(() => reply({}));
  const client = testClient({ storage, fetch, conversation: 'raw' });
  assert.equal(client.token, 'v1.abc.def');
  assert.equal(client.seq, null);
  await client.fetch('/x');
  assert.equal(fetch.calls[0].token, 'v1.abc.def');
});

test('resolveStorage rejects incomplete adapters and unknown names', () => {
  assert.throws(() => resolveStorage({ get() {} }), TypeError);
  assert.throws(() => resolveStorage('indexeddb'), TypeError);
});

for (const [name, failing] of [
  ['throws', () => { throw new Error('disk full'); }],
  ['rejects', () => Promise.reject(new Error('IndexedDB closed'))],
]) {
  test(`a custom adapter whose set() ${name}: the reply is returned and the token kept in memory`, async () => {
    const backing = new Map([['satchel:default', JSON.stringify({ token: 'k1', seq: 1, session: 's' })]]);
    let refuse = false;
    const adapter = {
      get: async (key) => backing.get(key) ?? null,
      set: (key, value) => (refuse ? failing() : void backing.set(key, value)),
      remove: async (key) => void backing.delete(key),
      keys: async () => [...backing.keys()],
      label: 'mine',
    };
    const fetch = fakeFetch((call, i) => reply({ json: { n: i }, satchel: { token: `k${i + 2}`, seq: i + 2, session: 's' } }));
    const client = testClient({ fetch, storage: adapter });
    assert.equal(client.storage.adapter.label, 'mine'); // the adapter itself stays reachable
    refuse = true;
    const res = await client.fetch('/chat', { method: 'POST', body: 'k2' });
    assert.deepEqual(await res.json(), { n: 0 });
    assert.equal(client.token, 'k2');
    assert.equal(client.seq, 2);
    await client.fetch('/chat', { method: 'POST', body: 'k3' });
    assert.deepEqual(fetch.calls.map((c) => c.token), ['k1', 'k2']); // not the stale k1 again
    assert.deepEqual(await listConversations(client.storage), ['default']);
    refuse = false; // the adapter works again: the next write reaches it
    await client.fetch('/chat', { method: 'POST', body: 'k4' });
    assert.equal(JSON.parse(backing.get('satchel:default')).token, 'k4');
  });
}

test('frozen adapters and class adapters with private fields work as before', async () => {
  class Vault {
    #map = new Map();
    #name = 'vault';
    get kind() {
      return this.#name;
    }
    get(key) {
      return this.#map.get(key) ?? null;
    }
    set(key, value) {
      this.#map.set(key, value);
    }
    remove(key) {
      this.#map.delete(key);
    }
    keys() {
      return [...this.#map.keys()];
    }
  }
  const map = new Map();
  const frozen = Object.freeze({
    get: (key) => map.get(key) ?? null,
    set: (key, value) => void map.set(key, value),
    remove: (key) => void map.delete(key),
  });
  for (const storage of [frozen, new Vault()]) {
    const fetch = fakeFetch(() => reply({ satchel: { token: 'v1', seq: 1 } }));
    const client = testClient({ fetch, storage });
    await client.fetch('/chat', { method: 'POST', body: 'hi' });
    assert.equal(client.token, 'v1');
    assert.equal(client.storage.adapter, storage);
  }
  assert.equal(testClient({ fetch: fakeFetch(() => reply({})), storage: new Vault() }).storage.kind, 'vault');
});

test('a store already full when the page opens still reads its saved conversations', async () => {
  // The probe write failed, and the client gave localStorage up for memory: every
  // saved chat showed up empty and new turns were lost on reload.
  const area = new FakeWebStorage({ failAfter: 1 });
  area.setItem('satchel:saved', JSON.stringify({ token: 'old', seq: 4, session: 's' })); // fills it
  installGlobal('localStorage', { value: area });
  const fetch = fakeFetch(() => reply({ satchel: { token: 'new', seq: 5, session: 's' } }));
  const client = createClient({ fetch, conversation: 'saved', broadcast: false, locks: false });
  assert.equal(client.storage.kind, 'local');
  assert.equal(client.token, 'old');
  assert.equal(client.storage.volatile, false);
  await client.fetch('/chat', { method: 'POST', body: 'hi' });
  assert.equal(fetch.calls[0].token, 'old');
  assert.equal(client.token, 'new'); // kept in memory: the store refused it
  assert.equal(client.storage.volatile, true); // the page can say so
  // Another client of the page (switching conversations makes one) sees it too.
  const again = createClient({ fetch, conversation: 'saved', broadcast: false, locks: false });
  assert.equal(again.token, 'new');
});

test('a token held in page memory gives way to what another tab stores or removes', async () => {
  const area = new FakeWebStorage({ failAfter: 2 }); // probe + one write succeed
  installGlobal('localStorage', { value: area });
  const adapter = localStorageAdapter();
  adapter.set('satchel:X', 'tok1');
  adapter.set('satchel:X', 'tok2'); // refused: held in memory
  assert.equal(adapter.get('satchel:X'), 'tok2');
  assert.equal(adapter.isVolatile('satchel:X'), true);
  assert.equal(adapter.isVolatile('satchel:Y'), false);
  area.map.delete('satchel:X'); // another tab deleted the conversation
  assert.equal(adapter.get('satchel:X'), null);
  assert.deepEqual(adapter.keys(), []);
  assert.equal(adapter.volatile, false);
  area.failAfter = Infinity;
  adapter.set('satchel:Z', 'z1');
  area.failAfter = 0;
  adapter.set('satchel:Z', 'z2'); // held
  area.map.set('satchel:Z', 'z3'); // another tab stored a newer token
  assert.equal(adapter.get('satchel:Z'), 'z3');
});

test('a read of the store that throws once does not throw away the token held in memory', () => {
  const area = new FakeWebStorage({ failAfter: 2 });
  installGlobal('localStorage', { value: area });
  const adapter = localStorageAdapter();
  adapter.set('satchel:X', 'tok1');
  adapter.set('satchel:X', 'tok2'); // refused: held in memory
  const getItem = area.getItem.bind(area);
  area.getItem = () => {
    throw new Error('SecurityError');
  };
  assert.equal(adapter.get('satchel:X'), 'tok2'); // an error is not "removed"
  area.getItem = getItem;
  assert.equal(adapter.get('satchel:X'), 'tok2');
});

test('a custom adapter that refuses a write: the page can tell, and other tabs are not made to wait', async () => {
  const disk = new Map();
  let full = true;
  const adapter = {
    get: async (key) => disk.get(key) ?? null,
    set: async (key, value) => {
      if (full) throw new Error('QuotaExceededError');
      disk.set(key, value);
    },
    remove: async (key) => void disk.delete(key),
  };
  const locks = fakeLocks();
  let n = 0;
  const fetch = fakeFetch(() => {
    n += 1;
    return reply({ satchel: { token: `t${n}`, seq: n, session: 's' } });
  });
  const client = createClient({ storage: adapter, locks, fetch, broadcast: false, conversation: 'c' });
  assert.equal(client.storage.volatile, false);
  await client.fetch('/chat');
  assert.equal(client.token, 't1');
  assert.equal(client.storage.isVolatile(client.storageKey), true);
  assert.equal(client.storage.isVolatile('satchel:other'), false);
  assert.equal(client.storage.volatile, true);
  const { held } = await locks.query();
  assert.deepEqual(held.filter((l) => l.name.startsWith('satchel-written')), []);
  full = false; // the disk has room again: the next write reaches it
  await client.fetch('/chat');
  assert.equal(JSON.parse(disk.get('satchel:c')).token, 't2');
  assert.equal(client.storage.volatile, false);
});

test('a custom adapter that refuses a removal: the token is gone for this page, the request stands', async () => {
  const disk = new Map([['satchel:c', JSON.stringify({ token: 'dead', seq: 1, session: 's' })]]);
  const adapter = {
    get: async (key) => disk.get(key) ?? null,
    set: async (key, value) => void disk.set(key, value),
    remove: async () => {
      throw new Error('the database is closed');
    },
    keys: async () => [...disk.keys()],
  };
  // The server refuses the stored token and answers a read-only route with no new one:
  // the client drops the token it sent.
  const fetch = fakeFetch(() => reply({ json: {}, headers: { 'Satchel-Reset': 'token_bad_signature' } }));
  const client = createClient({ storage: adapter, fetch, broadcast: false, locks: false, conversation: 'c' });
  const response = await client.fetch('/api/context');
  assert.equal(response.status, 200);
  assert.equal(client.token, null);
  assert.equal(await client.storage.get('satchel:c'), null);
  assert.equal(client.storage.isVolatile('satchel:c'), true);
  assert.deepEqual(await listConversations(client.storage), []);
});

test('a custom adapter\'s refused write and removal hold for the page, not for one client', async () => {
  // Switching conversations makes a new client. With the refused token kept per
  // client, the new one read the adapter's older token and sent it: a fork, and the
  // turn of the refused write lost.
  const disk = new Map();
  let refuse = null; // 'set' or 'remove': refused once (a transaction aborted)
  const adapter = {
    get: async (key) => disk.get(key) ?? null,
    set: async (key, value) => {
      if (refuse === 'set') {
        refuse = null;
        throw new Error('IndexedDB transaction aborted');
      }
      disk.set(key, value);
    },
    remove: async (key) => {
      if (refuse === 'remove') {
        refuse = null;
        throw new Error('IndexedDB transaction aborted');
      }
      disk.delete(key);
    },
  };
  let n = 0;
  const fetch = fakeFetch(() => {
    n += 1;
    return reply({ satchel: { token: `t${n}`, seq: n, session: 's' } });
  });
  const options = { storage: adapter, fetch, broadcast: false, locks: false, conversation: 'c' };
  const first = createClient(options);
  await first.fetch('/chat'); // t1 reaches the adapter
  refuse = 'set';
  await first.fetch('/chat'); // t2 refused: held in memory
  first.close();
  const second = createClient(options);
  await second.ready;
  assert.equal(second.token, 't2');
  assert.equal(second.storage.isVolatile(second.storageKey), true);
  await second.fetch('/chat');
  assert.deepEqual(fetch.calls.map((c) => c.token), [null, 't1', 't2']); // not t1 again
  assert.equal(JSON.parse(disk.get('satchel:c')).token, 't3');
  assert.equal(second.storage.volatile, false);
  refuse = 'remove';
  await second.reset(); // refused: the key reads as empty for this page
  assert.ok(disk.has('satchel:c'));
  const third = createClient(options);
  await third.ready;
  assert.equal(third.token, null);
  await third.fetch('/chat');
  assert.equal(fetch.calls[3].token, null); // a fresh context, as reset() asked
});

for (const [name, failing] of [
  ['throws', () => { throw new Error('IndexedDB read failed'); }],
  ['rejects', () => Promise.reject(new Error('IndexedDB read failed'))],
]) {
  test(`a custom adapter whose get() ${name} once the server has answered: the reply stands, its token is kept`, async () => {
    // The read that adopts the response's token failed the request the server had
    // saved: the user sent the message again (a fork, or stale for good).
    const disk = new Map([['satchel:c', JSON.stringify({ token: 't1', seq: 1, session: 's' })]]);
    let failGet = false; // set by the server: the next read (the adopting one) fails
    const adapter = {
      get: (key) => {
        if (failGet) {
          failGet = false;
          return failing();
        }
        return disk.get(key) ?? null;
      },
      set: (key, value) => void disk.set(key, value),
      remove: (key) => void disk.delete(key),
    };
    const fetch = fakeFetch((call, i) => {
      failGet = true;
      const final = { token: `t${i + 2}`, seq: i + 2, session: 's' };
      if (call.url === '/stream') {
        return sseReply(sse([{ event: 'delta', data: { text: 'hi' } }, { event: 'satchel', data: final }, { event: 'done', data: {} }]));
      }
      return reply({ json: { n: i }, satchel: final });
    });
    const client = createClient({ storage: adapter, fetch, broadcast: false, locks: false, conversation: 'c' });
    const seen = record(client, ['fork', 'error']);
    const res = await client.fetch('/chat', { method: 'POST', body: 'two' });
    assert.deepEqual(await res.json(), { n: 0 });
    assert.equal(client.token, 't2');
    assert.equal(JSON.parse(disk.get('satchel:c')).token, 't2');
    const s = client.stream('/stream', { message: 'three' });
    const got = [];
    for await (const piece of s) got.push(piece);
    assert.deepEqual(got, ['hi']);
    assert.equal((await s.result).token, 't3');
    assert.equal(JSON.parse(disk.get('satchel:c')).token, 't3');
    assert.deepEqual(seen, []);
    assert.deepEqual(fetch.calls.map((c) => c.token), ['t1', 't2']);
    assert.equal(client.storage.volatile, false); // the write after the failed read succeeded
  });
}

test('a custom adapter that fails a read and then the write: the token is held for the page', async () => {
  let broken = false; // a closed IndexedDB: every call fails
  const disk = new Map();
  const refuse = async () => {
    throw new Error('the database connection is closing');
  };
  const adapter = {
    get: async (key) => (broken ? refuse() : disk.get(key) ?? null),
    set: async (key, value) => (broken ? refuse() : void disk.set(key, value)),
    remove: async (key) => (broken ? refuse() : void disk.delete(key)),
  };
  const fetch = fakeFetch((call, i) => {
    broken = true;
    return reply({ satchel: { token: `t${i + 1}`, seq: i + 1, session: 's' } });
  });
  const client = createClient({ storage: adapter, fetch, broadcast: false, locks: false, conversation: 'c' });
  await client.fetch('/chat', { method: 'POST', body: 'one' });
  assert.equal(client.token, 't1');
  assert.equal(client.storage.isVolatile(client.storageKey), true);
  await client.fetch('/chat', { method: 'POST', body: 'two' }); // read from the page's memory
  assert.deepEqual(fetch.calls.map((c) => c.token), [null, 't1']);
});

test('a lock manager that denies access falls back to the in-page queue', async () => {
  // Chromium in a sandboxed iframe or with site data blocked: navigator.locks exists
  // and every request() rejects with SecurityError. Requests still go out, one at a time.
  let requests = 0;
  const denied = {
    request: () => {
      requests += 1;
      return Promise.reject(new DOMException('The request was denied.', 'SecurityError'));
    },
    query: () => Promise.reject(new DOMException('The request was denied.', 'SecurityError')),
  };
  const fetch = fakeFetch((_call, i) => reply({ satchel: { token: `T${i + 1}`, seq: i + 1 } }));
  const client = createClient({ storage: 'memory', locks: denied, fetch, broadcast: false, conversation: 'denied' });
  assert.equal(client.lockMode, 'web-locks');
  await client.fetch('/api/chat', { method: 'POST', body: '{}' });
  assert.equal(client.lockMode, 'page-queue');
  await client.fetch('/api/chat', { method: 'POST', body: '{}' });
  assert.equal(client.token, 'T2');
  assert.equal(fetch.calls[1].token, 'T1');
  assert.equal(requests, 1); // asked once, not on every request
});

test('other lock errors still reach the caller', async () => {
  const broken = { request: () => Promise.reject(new TypeError('lock manager broke')) };
  const fetch = fakeFetch(() => reply({ satchel: { token: 'T1', seq: 1 } }));
  const client = createClient({ storage: 'memory', locks: broken, fetch, broadcast: false, conversation: 'broken' });
  await assert.rejects(client.fetch('/api/chat', { method: 'POST', body: '{}' }), /lock manager broke/);
  assert.equal(client.lockMode, 'web-locks');
});

test('localStorage whose getItem throws before a request: the request fails, the saved token is not replaced', async () => {
  // The built-in adapter read an unreadable store (Firefox NS_ERROR_FILE_CORRUPTED, access
  // revoked) as "no token": the request went out without it, the server started a fresh
  // context, and its token overwrote the saved conversation.
  const area = new FakeWebStorage();
  installGlobal('localStorage', { value: area });
  const fetch = fakeFetch((c, i) => reply({ satchel: { token: c.token ? `next-${c.token}` : 'FRESH', seq: 1 } }));
  const client = createClient({ fetch, conversation: 'gi', broadcast: false, locks: false });
  await client.importToken('SAVED', { seq: 40 });
  const getItem = area.getItem.bind(area);
  area.getItem = () => {
    throw new DOMException('NS_ERROR_FILE_CORRUPTED', 'UnknownError');
  };
  await assert.rejects(client.fetch('/x', { method: 'POST', body: 'hi' }));
  area.getItem = getItem;
  assert.equal(fetch.calls.length, 0);
  assert.equal(JSON.parse(area.getItem('satchel:gi')).token, 'SAVED');
});

test('localStorage that takes neither reads nor writes: the chat goes on in page memory', async () => {
  // Failing every read made every call fail for the page's life (reset() included);
  // such a store cannot be overwritten by a fresh context's token, so it reads as empty.
  const area = new FakeWebStorage();
  installGlobal('localStorage', { value: area });
  const fetch = fakeFetch((c, i) => reply({ satchel: { token: `t${i + 1}`, seq: i + 1 } }));
  const client = createClient({ fetch, conversation: 'broken', broadcast: false, locks: false });
  await client.importToken('SAVED', { seq: 40 });
  const broken = () => {
    throw new DOMException('NS_ERROR_FILE_CORRUPTED', 'UnknownError');
  };
  const { getItem, setItem } = area;
  area.getItem = broken;
  area.setItem = broken;
  await client.fetch('/x', { method: 'POST', body: 'hi' });
  await client.fetch('/x', { method: 'POST', body: 'again' });
  assert.deepEqual(fetch.calls.map((c) => c.token), [null, 't1']); // carried on in memory
  assert.equal(client.storage.isVolatile(client.storageKey), true);
  assert.equal(JSON.parse(area.map.get('satchel:broken')).token, 'SAVED'); // never overwritten
  // The store comes back: this page goes on with its own conversation, in memory, and
  // never writes it over the saved one (it could not see it when it started afresh).
  area.getItem = getItem;
  area.setItem = setItem;
  await client.fetch('/x', { method: 'POST', body: 'back' });
  assert.equal(fetch.calls[2].token, 't2');
  assert.equal(JSON.parse(area.getItem('satchel:broken')).token, 'SAVED');
  await client.reset(); // forgets this page's conversation, not the saved one
  assert.equal(client.token, null);
  assert.equal(JSON.parse(area.getItem('satchel:broken')).token, 'SAVED');
});

test('a 401 whose recovery cannot read storage throws the server\'s TokenError', async () => {
  const area = new FakeWebStorage();
  installGlobal('localStorage', { value: area });
  const fetch = fakeFetch(() => errorReply(401, 'token_expired'));
  const client = createClient({ fetch, conversation: 'r', broadcast: false, locks: false });
  await client.importToken('SAVED', { seq: 2 });
  let reads = 0;
  const getItem = area.getItem.bind(area);
  area.getItem = (key) => {
    if (key === 'satchel:r' && ++reads > 1) throw new DOMException('revoked', 'SecurityError');
    return getItem(key);
  };
  await assert.rejects(client.fetch('/x'), (e) => e instanceof TokenError && e.code === 'token_expired');
});
