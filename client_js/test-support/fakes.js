// Test doubles shared by client_js/test/*.test.js.
// Kept outside test/ because `node --test test/` runs every .js file found
// there, and a helper module would show up as an extra (empty) test file.

import { createClient, memoryStorage } from '../src/satchel.js';

const enc = new TextEncoder();

/** A ReadableStream of the given chunks (strings are UTF-8 encoded). */
export function streamOf(chunks) {
  const queue = chunks.map((c) => (typeof c === 'string' ? enc.encode(c) : c));
  return new ReadableStream({
    pull(controller) {
      if (queue.length) controller.enqueue(queue.shift());
      else controller.close();
    },
  });
}

/** Serialize SSE events: [{event, data}] with data objects JSON-encoded. */
export function sse(events) {
  return events
    .map(({ event, data }) => {
      const lines = [];
      if (event) lines.push(`event: ${event}`);
      const text = typeof data === 'string' ? data : JSON.stringify(data);
      for (const line of text.split('\n')) lines.push(`data: ${line}`);
      return `${lines.join('\n')}\n\n`;
    })
    .join('');
}

/** Build a Response. `json` wins over `body`; `satchel` fills the Satchel-* headers. */
export function reply({ status = 200, headers = {}, json, body = null, satchel } = {}) {
  const h = new Headers(headers);
  if (satchel) {
    if (satchel.token) h.set('Satchel-Context', satchel.token);
    if (satchel.seq != null) h.set('Satchel-Seq', String(satchel.seq));
    if (satchel.session) h.set('Satchel-Session', satchel.session);
    if (satchel.degraded) h.set('Satchel-Degraded', satchel.degraded);
    if (satchel.reset) h.set('Satchel-Reset', satchel.reset);
    if (satchel.fork) h.set('Satchel-Fork', satchel.fork);
  }
  if (json !== undefined) {
    h.set('content-type', 'application/json');
    body = JSON.stringify(json);
  }
  return new Response(body, { status, headers: h });
}

export function errorReply(status, code, message = code, extra = {}) {
  return reply({ status, json: { error: { code, message } }, ...extra });
}

/** An SSE Response whose body is `text` cut into `chunks` (default: one chunk). */
export function sseReply(text, { chunks, headers = {} } = {}) {
  const parts = chunks ? chunks(text) : [text];
  return new Response(streamOf(parts), {
    status: 200,
    headers: { 'content-type': 'text/event-stream', ...headers },
  });
}

/**
 * fetch double. `handler(call, index)` returns a Response (or a promise of
 * one). Every call is recorded with the token header it carried.
 */
export function fakeFetch(handler) {
  const calls = [];
  const fn = async (input, init = {}) => {
    const headers = new Headers(init.headers);
    const call = {
      url: typeof input === 'string' ? input : input.url,
      method: init.method || (typeof input === 'string' ? 'GET' : input.method),
      headers,
      token: headers.get('Satchel-Context'),
      body: init.body,
      init,
    };
    calls.push(call);
    return handler(call, calls.length - 1);
  };
  fn.calls = calls;
  return fn;
}

export function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** Let every pending microtask and one macrotask turn run (not a timed sleep). */
export const flush = () => new Promise((r) => setImmediate(r));

/**
 * Synchronous stand-in for BroadcastChannel: delivers to every *other* open
 * channel of the same name, as the real one does, but immediately, which
 * keeps cross-tab tests deterministic. Give each test its own `hub`.
 */
export function channelHub() {
  const open = new Set();
  const sent = [];
  class FakeChannel {
    constructor(name) {
      this.name = name;
      this.listeners = new Set();
      open.add(this);
    }
    addEventListener(type, fn) {
      if (type === 'message') this.listeners.add(fn);
    }
    postMessage(data) {
      sent.push({ name: this.name, data });
      for (const ch of open) {
        if (ch !== this && ch.name === this.name) {
          for (const fn of ch.listeners) fn({ data: structuredClone(data) });
        }
      }
    }
    close() {
      open.delete(this);
    }
  }
  return { FakeChannel, sent, open };
}

/**
 * LockManager double: exclusive locks are FIFO per name; shared ones are
 * granted at once. Records the order of events (exclusive locks only, so the
 * log reads as the conversation's hand-overs) and answers query() with the
 * locks held, as navigator.locks does.
 */
export function fakeLocks() {
  const tails = new Map();
  const log = [];
  const held = new Map(); // id -> {name, mode}
  let ids = 0;
  const hold = (name, mode, cb) => {
    const id = ++ids;
    held.set(id, { name, mode });
    return Promise.resolve(cb({ name, mode })).finally(() => held.delete(id));
  };
  return {
    log,
    request(name, opts, cb) {
      if (typeof opts === 'function') cb = opts;
      if (opts && opts.mode === 'shared') return Promise.resolve().then(() => hold(name, 'shared', cb));
      const prev = tails.get(name) || Promise.resolve();
      const run = prev.then(() => {
        log.push(`acquire ${name}`);
        return hold(name, 'exclusive', cb);
      });
      const tail = run.then(
        () => log.push(`release ${name}`),
        () => log.push(`release ${name}`),
      );
      tails.set(name, tail);
      return run;
    },
    async query() {
      return { held: [...held.values()], pending: [] };
    },
  };
}

/**
 * localStorage as Chromium's tabs may see it: one backing store, but each tab
 * reads its own copy, which learns of other tabs' writes only when
 * `propagate()` is called (a message that can arrive after the lock was
 * handed over). `tab()` returns one tab's adapter (kind "local": shared).
 */
export function laggingStorage() {
  const backing = new Map();
  const views = [];
  return {
    backing,
    tab() {
      const copy = new Map(backing);
      views.push(copy);
      return {
        kind: 'local',
        get: (key) => (copy.has(key) ? copy.get(key) : null),
        set: (key, value) => {
          backing.set(key, String(value));
          copy.set(key, String(value));
        },
        remove: (key) => {
          backing.delete(key);
          copy.delete(key);
        },
      };
    },
    propagate() {
      for (const copy of views) {
        copy.clear();
        for (const [k, v] of backing) copy.set(k, v);
      }
    },
  };
}

/** createClient with test-friendly defaults: private memory storage, no real BroadcastChannel. */
export function testClient(options = {}) {
  return createClient({ storage: memoryStorage(), broadcast: false, locks: false, ...options });
}

/** Collect every event of the given names into an array of {name, detail}. */
export function record(client, names = ['token', 'degraded', 'reset', 'fork', 'stale', 'error']) {
  const seen = [];
  for (const name of names) client.on(name, (detail) => seen.push({ name, detail }));
  return seen;
}
