/**
 * @satchel/client — browser client for Satchel, the client-held chat context.
 *
 * The server keeps no conversation state of its own: the whole context travels
 * as an opaque token. This module's job is to hold that token for each
 * conversation, send it with every request, adopt the next one the server
 * returns, and keep several tabs of the same origin from trampling on each
 * other's tokens.
 *
 * Deliberately a single dependency-free ES module (no imports) so it can be
 * served as-is and loaded with `<script type="module">`, no build step.
 *
 * HTTP contract (see docs/client-js.md):
 *   request   Satchel-Context: <token>         (omitted when we hold none)
 *   response  Satchel-Context / Satchel-Seq / Satchel-Session /
 *             Satchel-Degraded / Satchel-Reset / Satchel-Fork
 *   errors    {"error": {"code": "...", "message": "..."}} with 4xx/5xx
 *   stream    text/event-stream: delta* , satchel, done | error
 */

export const VERSION = '0.1.6';
export const DEFAULT_HEADER = 'Satchel-Context';
export const DEFAULT_PREFIX = 'satchel:';
/**
 * How long a request waits, at most, for localStorage to show a write another
 * tab finished before handing over the lock (see SatchelClient#_readFresh).
 */
export const DEFAULT_SYNC_WAIT_MS = 500;
/**
 * How long each attempt of a request waits, by default, for the response's headers
 * (the `timeout` option). Not ky's 10 s: a reply that is not streamed arrives with its
 * headers only once the model has written all of it, which can take a minute or more.
 */
export const DEFAULT_TIMEOUT_MS = 120000;
/** The longest timeout setTimeout can keep (2^31 - 1 ms, about 24.8 days). */
const MAX_TIMEOUT_MS = 2147483647;
/** Prefix of a server-mode session carrier (the context lives server-side). */
const SERVER_CARRIER = 'sv1.';
// What an HTTP header can carry: visible ASCII, no space. Satchel tokens are
// base64url after a short prefix; anything else (a corrupted store, a bad import)
// would make fetch throw a TypeError before the request leaves, every time.
const HEADER_SAFE = /^[\x21-\x7e]+$/;
const isHeaderSafe = (token) => typeof token === 'string' && HEADER_SAFE.test(token);
/** Names of the shared locks that announce each tab's newest write. */
const WRITTEN_LOCK = 'satchel-written';
/**
 * Tells this page's locks from other tabs' for per-tab storage (see
 * SatchelClient#_lockName). Web Locks, like randomUUID, need a secure context.
 */
const PAGE_ID =
  typeof crypto !== 'undefined' && typeof crypto.randomUUID === 'function'
    ? crypto.randomUUID()
    : Math.random().toString(36).slice(2);

const H_SEQ = 'Satchel-Seq';
const H_SESSION = 'Satchel-Session';
const H_DEGRADED = 'Satchel-Degraded';
const H_RESET = 'Satchel-Reset';
const H_FORK = 'Satchel-Fork';

/* ------------------------------------------------------------------------ */
/* Errors                                                                    */
/* ------------------------------------------------------------------------ */

/**
 * Base class of every error this client throws on purpose, so callers can
 * write one `instanceof SatchelError` check. Network failures and aborts are
 * *not* wrapped: they keep their platform type (TypeError / AbortError), the
 * same convention as ky and fetch itself.
 */
export class SatchelError extends Error {
  constructor(message, { code = 'satchel_error', status = null, response = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'SatchelError';
    /** Machine-readable code from the server's error body (or ours). */
    this.code = code;
    /** HTTP status, or null for errors that arrived inside a 200 stream. */
    this.status = status;
    /** The Response (body unread: we parsed a clone), or null. */
    this.response = response;
  }
}

/** The token was unusable (code starts with `token_`). */
export class TokenError extends SatchelError {
  constructor(message, opts) {
    super(message, opts);
    this.name = 'TokenError';
  }
}

/** 409 `stale_context`: another tab or request moved the conversation ahead. */
export class StaleContextError extends SatchelError {
  constructor(message, opts) {
    super(message, opts);
    this.name = 'StaleContextError';
    /** False when sending the stored token again can only be refused again: call reset(). */
    this.recoverable = true;
    /**
     * True when the refusal itself carried the conversation's newest token (the
     * response that issued it was lost on the way) and it is now stored: the
     * conversation goes on from it. This request was not served and is not resent
     * (the lost response may have been for this very message; a GET is): reload
     * the conversation, then send again what it does not hold.
     */
    this.recovered = false;
  }
}

/** 503 / `tier_unavailable`: try again later. `retryAfter` is in seconds. */
export class ServiceUnavailableError extends SatchelError {
  constructor(message, opts = {}) {
    super(message, opts);
    this.name = 'ServiceUnavailableError';
    this.retryAfter = parseRetryAfter(opts.response);
  }
}

/** Any other non-2xx response. */
export class HTTPError extends SatchelError {
  constructor(message, opts) {
    super(message, opts);
    this.name = 'HTTPError';
  }
}

/**
 * No response within the `timeout` option: the attempt was aborted and the lock let
 * go. Named "TimeoutError", as the DOMException of AbortSignal.timeout() is, but a
 * SatchelError: the client's own deadline, not the caller's abort, so it is reported
 * (an `error` event). Never resent: the server may have processed the request.
 */
export class TimeoutError extends SatchelError {
  constructor(message, opts = {}) {
    super(message, { code: 'timeout', ...opts });
    this.name = 'TimeoutError';
    /** The timeout that ran out, in ms (null when not given). */
    this.timeout = opts.timeout ?? null;
  }
}

function parseRetryAfter(response) {
  const v = response && response.headers && response.headers.get('Retry-After');
  if (!v) return null;
  // Only the delta-seconds form is useful to a UI countdown; HTTP-dates are rare here.
  return /^\s*\d+\s*$/.test(v) ? Number(v) : null;
}

/**
 * Build the right error subclass from a server error code.
 * `inStream` errors came inside a 200 event stream, so they are not HTTP
 * errors: unknown codes become a plain SatchelError rather than HTTPError.
 */
export function createError(code, message, { status = null, response = null, inStream = false } = {}) {
  const c = typeof code === 'string' && code ? code : status ? `http_${status}` : 'satchel_error';
  const msg = message || c;
  const opts = { code: c, status, response };
  if (c.startsWith('token_')) return new TokenError(msg, opts);
  if (c === 'stale_context') return new StaleContextError(msg, opts);
  // tier_full comes as a 503 over HTTP and as an event inside a stream: one class for both.
  if (c === 'tier_unavailable' || c === 'tier_full' || status === 503) {
    return new ServiceUnavailableError(msg, opts);
  }
  if (inStream || status == null) return new SatchelError(msg, opts);
  return new HTTPError(msg, opts);
}

/**
 * An error body's first `limit` bytes as text, or null past them. Satchel's error
 * bodies are a few hundred bytes; a proxy's HTML page or a runaway body is not worth
 * holding in memory (a 50 MB body was read whole) just to find no JSON in it.
 */
async function boundedText(response, limit) {
  if (!response.body) return response.text();
  const reader = response.body.getReader();
  const chunks = [];
  let size = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.byteLength;
      if (size > limit) return null;
      chunks.push(value);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.byteLength;
  }
  return new TextDecoder().decode(bytes);
}

/** The most of an error body read for its JSON `{"error": {...}}`. */
const ERROR_BODY_LIMIT = 64 * 1024;

/**
 * The error for a non-2xx response, from its JSON body. `deadline`: the attempt's (see
 * attemptDeadline), which bounds the read of that body too: one that never ends (a
 * proxy's) is given up when it runs out, and the error built from the status line.
 */
async function errorFromResponse(response, deadline = null) {
  let payload = null;
  try {
    // Parse a clone so the caller still gets an unread body on error.response.
    const text = boundedText(response.clone(), ERROR_BODY_LIMIT);
    payload = JSON.parse(await (deadline ? deadline.race(text) : text));
  } catch {
    /* not JSON: fall back to the status line */
  }
  const e = payload && typeof payload === 'object' ? payload.error : null;
  const code = e && typeof e.code === 'string' ? e.code : null;
  const message =
    (e && typeof e.message === 'string' && e.message) ||
    `${response.status} ${response.statusText || ''}`.trim();
  return createError(code || (response.status === 503 ? 'service_unavailable' : null), message, {
    status: response.status,
    response,
  });
}

function isAbort(err, signal) {
  // The client's own timeout is no abort the caller asked for (unlike a DOMException
  // named TimeoutError, from a caller's AbortSignal.timeout()): it is reported.
  if (err instanceof TimeoutError) return false;
  // abort(reason) rejects with the reason itself, whatever it is (a string, an Error).
  if (signal && signal.aborted && err === signal.reason) return true;
  return !!err && (err.name === 'AbortError' || err.name === 'TimeoutError');
}

/* ------------------------------------------------------------------------ */
/* Storage adapters                                                          */
/* ------------------------------------------------------------------------ */

/** The key written and removed to learn whether Web Storage takes writes. */
const PROBE_KEY = '__satchel_probe__';

/** Tokens Web Storage refused (quota full), per storage kind, for the page's life. */
const pageOverlays = {};
/** Keys read as empty while Web Storage took neither reads nor writes, per kind, for the page's life. */
const pageBlind = {};

/** Adapters whose writes cannot fail, or that keep refused writes themselves. */
const safeAdapters = new WeakSet();

/**
 * The guard of each custom adapter, one per page (see guardedStorage): what the
 * adapter refused is held for the page, as Web Storage's pageOverlays are, not for
 * the client that happened to write it.
 */
const guardedAdapters = new WeakMap();

/**
 * In-memory adapter. Each call returns an isolated store; use it in tests or
 * when nothing should outlive the page.
 */
export function memoryStorage(initial) {
  const map = new Map(initial ? Object.entries(initial) : []);
  const adapter = {
    kind: 'memory',
    get: (key) => (map.has(key) ? map.get(key) : null),
    set: (key, value) => void map.set(key, String(value)),
    remove: (key) => void map.delete(key),
    keys: () => [...map.keys()],
  };
  safeAdapters.add(adapter);
  return adapter;
}

// `storage: "memory"` (and the fallback for a broken Web Storage) share one
// page-wide store, so several clients on the page see each other's
// conversations exactly as they would with localStorage.
let pageMemory = null;
function sharedMemory() {
  return (pageMemory ||= memoryStorage());
}

/**
 * Wrap localStorage / sessionStorage. Falls back to the page memory store when
 * the API is missing, or throws on access (Safari with storage blocked throws
 * SecurityError on the *property read*) or on a probe write (private-mode
 * quota of 0). Writes that fail later (quota filled up) are kept in a
 * per-key memory overlay so the conversation keeps working for this page.
 */
function webStorage(kind) {
  let area = null;
  try {
    area = globalThis[`${kind}Storage`] || null;
    if (area) {
      try {
        area.setItem(PROBE_KEY, PROBE_KEY);
        area.removeItem(PROBE_KEY);
      } catch (err) {
        // A full store (QuotaExceededError) still reads: it holds this page's saved
        // conversations, which must not all show up empty. Only an empty store that
        // refuses a write (a zero quota, as some private modes have) is given up.
        if (!(area.length > 0)) throw err;
      }
    }
  } catch {
    area = null;
  }
  if (!area) {
    const mem = sharedMemory();
    return { ...mem, kind: 'memory', fallbackFrom: kind };
  }
  // One per page and kind: a write the store refused stays readable to every client
  // of this page (switching conversations makes a new client). Each entry remembers
  // what the store held when it was refused: once the store holds something else
  // (another tab wrote or removed the key), the store is newer and the entry goes.
  const overlay = (pageOverlays[kind] ||= new Map());
  // undefined: the store could not be read (an error is not "the key is gone").
  const read = (key) => {
    try {
      return area.getItem(key);
    } catch {
      return undefined;
    }
  };
  const held = (key) => {
    const entry = overlay.get(key);
    if (entry === undefined) return undefined;
    const now = read(key);
    if (now === undefined || entry.base === undefined || entry.base === now) return entry.value;
    overlay.delete(key); // another tab stored or removed it since: the store is newer
    return undefined;
  };
  // Keys read as empty while the store took neither reads nor writes (see get()).
  // One per page and kind, as the overlay: a second client of the key (switching
  // conversations makes one) must not write over, or remove, the store's copy either.
  const blind = (pageBlind[kind] ||= new Set());
  const writable = () => {
    try {
      area.setItem(PROBE_KEY, PROBE_KEY);
      area.removeItem(PROBE_KEY);
      return true;
    } catch {
      return false;
    }
  };
  const adapter = {
    kind,
    /** True while some token is kept only in this page's memory (the store is full). */
    get volatile() {
      return [...overlay.keys()].some((key) => held(key) !== undefined);
    },
    /** True while the token under `key` is kept only in this page's memory. */
    isVolatile(key) {
      return held(key) !== undefined;
    },
    /** True when this page never saw the store's copy of `key` (see get()): what other tabs write there is not this page's conversation. */
    isBlind(key) {
      return blind.has(key);
    },
    get(key) {
      const value = held(key);
      if (value !== undefined) return value;
      if (blind.has(key)) return null; // reset in this page: not the store's old copy
      try {
        return area.getItem(key);
      } catch (err) {
        // A store that cannot be read but still takes writes fails the request, as a
        // custom adapter's get() may: "no token" would send the request without the
        // saved one, and the fresh context's token would overwrite it. One that takes
        // no writes either (corrupted, access revoked) cannot be overwritten: it reads
        // as empty, and the conversation goes on in this page's memory (volatile), as
        // for a full store, rather than every call failing for the page's life.
        if (writable()) throw err;
        // Blind to what it holds: once the store is back, a write would replace the
        // saved conversation with the one that went on meanwhile. For the page's life
        // this key lives in page memory only, and the store keeps what it had.
        blind.add(key);
        return null;
      }
    },
    set(key, value) {
      if (blind.has(key)) {
        overlay.set(key, { value: String(value), base: undefined });
        return;
      }
      try {
        area.setItem(key, value);
        overlay.delete(key);
      } catch {
        overlay.set(key, { value: String(value), base: read(key) });
      }
    },
    remove(key) {
      overlay.delete(key);
      if (blind.has(key)) return; // the store's copy is not this page's to remove
      try {
        area.removeItem(key);
      } catch {
        /* nothing stored there anyway */
      }
    },
    keys() {
      const out = new Set([...overlay.keys()].filter((key) => held(key) !== undefined));
      try {
        for (let i = 0; i < area.length; i++) {
          const k = area.key(i);
          if (k != null) out.add(k);
        }
      } catch {
        /* unreadable area: overlay only */
      }
      return [...out];
    },
  };
  safeAdapters.add(adapter);
  return adapter;
}

/**
 * A custom adapter, held to the built-in adapters' rule: a write it refuses (throws
 * or rejects: a full disk, a closed IndexedDB) is kept in memory for this page
 * rather than failing a request the server has already answered, whose reply and
 * successor token would be lost with it. Synchronous adapters stay synchronous.
 *
 * One guard per adapter and page: switching conversations makes a new client, and
 * one that could not see the refused token would read the adapter's older one and
 * send it (a fork, and the refused write's turn lost).
 *
 * A plain object that calls the adapter (never one that inherits from it): a frozen
 * adapter, or a class whose methods use private fields, works as it did unwrapped.
 */
function guardedStorage(adapter) {
  if (safeAdapters.has(adapter)) return adapter;
  const existing = guardedAdapters.get(adapter);
  if (existing) return existing;
  const overlay = new Map();
  const keep = (key, value) => void overlay.set(key, String(value));
  const guarded = {
    get kind() {
      return adapter.kind;
    },
    get fallbackFrom() {
      return adapter.fallbackFrom;
    },
    /** The adapter this one guards. */
    adapter,
    /** True while some token is kept only in this page's memory (the adapter refused it). */
    get volatile() {
      return overlay.size > 0;
    },
    /** True while the token under `key` is kept only in this page's memory. */
    isVolatile: (key) => overlay.has(key),
    get: (key) => (overlay.has(key) ? overlay.get(key) : adapter.get(key)),
    set: (key, value) => {
      let result;
      try {
        result = adapter.set(key, value);
      } catch {
        return keep(key, value);
      }
      if (result && typeof result.then === 'function') {
        return result.then(
          () => void overlay.delete(key),
          () => keep(key, value),
        );
      }
      overlay.delete(key);
      return result;
    },
    // A removal it refuses is kept the same way (null: gone for this page): thrown,
    // it would fail a request the server has answered, and leave the refused token
    // to be sent again.
    remove: (key) => {
      const hide = () => void overlay.set(key, null);
      let result;
      try {
        result = adapter.remove(key);
      } catch {
        return hide();
      }
      if (result && typeof result.then === 'function') {
        return result.then(() => void overlay.delete(key), hide);
      }
      overlay.delete(key);
      return result;
    },
  };
  if (typeof adapter.keys === 'function') {
    const merge = (stored) => {
      const out = new Set([...stored, ...overlay.keys()]);
      for (const [key, value] of overlay) if (value === null) out.delete(key);
      return [...out];
    };
    guarded.keys = () => {
      const stored = adapter.keys();
      return stored && typeof stored.then === 'function' ? stored.then(merge) : merge(stored);
    };
  }
  safeAdapters.add(guarded);
  guardedAdapters.set(adapter, guarded);
  return guarded;
}

/** localStorage adapter (falls back to memory, see webStorage). */
export function localStorageAdapter() {
  return webStorage('local');
}

/** sessionStorage adapter (falls back to memory, see webStorage). */
export function sessionStorageAdapter() {
  return webStorage('session');
}

/** Turn the `storage` option into an adapter. */
export function resolveStorage(spec = 'local') {
  if (spec && typeof spec === 'object' && typeof spec.get === 'function') {
    if (typeof spec.set !== 'function' || typeof spec.remove !== 'function') {
      throw new TypeError('Satchel storage adapter needs get(), set() and remove()');
    }
    return guardedStorage(spec);
  }
  if (spec === 'local') return webStorage('local');
  if (spec === 'session') return webStorage('session');
  if (spec === 'memory') return { ...sharedMemory(), kind: 'memory' };
  throw new TypeError(`Unknown Satchel storage: ${String(spec)}`);
}

/**
 * List the conversation ids that have a stored token under `prefix`.
 * Needs an adapter with `keys()`; returns [] for adapters without it.
 */
export async function listConversations(storage = 'local', prefix = DEFAULT_PREFIX) {
  const adapter = resolveStorage(storage);
  if (typeof adapter.keys !== 'function') return [];
  const keys = await adapter.keys();
  return keys.filter((k) => k.startsWith(prefix)).map((k) => k.slice(prefix.length));
}

/* ------------------------------------------------------------------------ */
/* Stored record                                                             */
/* ------------------------------------------------------------------------ */

// We store {token, seq, session} as JSON under one key rather than three keys:
// one setItem is atomic, so another tab can never read a token with the seq
// of its predecessor. A bare (non-JSON) string is accepted as a token too, so
// hand-written values and older formats still load.

function parseSeq(v) {
  if (typeof v === 'number') return Number.isSafeInteger(v) && v >= 0 ? v : null;
  if (typeof v === 'string' && /^\s*\d+\s*$/.test(v)) {
    // Compare as integers, never as strings ("10" < "9" lexically).
    const n = Number(v.trim());
    return Number.isSafeInteger(n) ? n : null;
  }
  return null;
}

function parseRecord(value) {
  if (value == null || value === '') return null;
  if (typeof value === 'object') {
    return typeof value.token === 'string' && value.token ? normRecord(value) : null;
  }
  const s = String(value);
  if (s[0] === '{') {
    try {
      const obj = JSON.parse(s);
      if (obj && typeof obj.token === 'string' && obj.token) return normRecord(obj);
    } catch {
      /* not our JSON: treat as a raw token below */
    }
  }
  return { token: s, seq: null, session: null, g: 0 };
}

function normRecord(o) {
  return {
    token: o.token,
    seq: parseSeq(o.seq),
    session: typeof o.session === 'string' && o.session ? o.session : null,
    // Write generation: counts this conversation's writes across tabs (see _readFresh).
    g: parseSeq(o.g) ?? 0,
  };
}

function serializeRecord(rec) {
  return JSON.stringify({ token: rec.token, seq: rec.seq, session: rec.session, g: rec.g || 0 });
}

const tokenOf = (rec) => (rec ? rec.token : null);

/**
 * Monotonic rule used for tokens that arrive from *other* tabs: only move
 * forward. Seqs order tokens within one server session; a different session
 * means the conversation was restarted elsewhere, and a missing seq gives us
 * nothing to compare, so in those two cases the newer message wins.
 */
function isNewer(incoming, held) {
  if (!held) return true;
  if (incoming.token === held.token) return false;
  if (incoming.seq == null || held.seq == null) return true;
  if (incoming.session && held.session && incoming.session !== held.session) return true;
  return incoming.seq > held.seq;
}

/* ------------------------------------------------------------------------ */
/* Response metadata                                                         */
/* ------------------------------------------------------------------------ */

function splitList(v) {
  if (Array.isArray(v)) return v.map(String).map((s) => s.trim()).filter(Boolean);
  if (typeof v === 'string') return v.split(',').map((s) => s.trim()).filter(Boolean);
  return [];
}

function nonEmpty(v) {
  return typeof v === 'string' && v ? v : null;
}

/**
 * A token as a response gave it, if the next request can send it back. Stored as it
 * is, a value no header can carry (a space, a non-ASCII byte) would be dropped by the
 * next request as `token_malformed`, and the whole conversation with it; keeping the
 * stored token loses this turn at most (the server then reports the fork). The one
 * case read through: a header sent twice with the same token (an app hook beside the
 * extension, a proxy's add_header), which fetch joins as "t, t".
 */
function receivedToken(raw) {
  const value = nonEmpty(raw);
  if (value === null) return { token: null, unusable: false };
  // A comma is in no token (base64url or hex after a prefix), and an intermediary may
  // join repeated headers with "," as well as ", ".
  const parts = value.split(',').map((part) => part.trim());
  if (isHeaderSafe(parts[0]) && parts.every((part) => part === parts[0])) {
    return { token: parts[0], unusable: false };
  }
  return { token: null, unusable: true };
}

function metaFromHeaders(headers, headerName) {
  const { token, unusable } = receivedToken(headers.get(headerName));
  return {
    token,
    unusable,
    seq: parseSeq(headers.get(H_SEQ)),
    session: nonEmpty(headers.get(H_SESSION)),
    degraded: splitList(headers.get(H_DEGRADED)),
    reset: nonEmpty(headers.get(H_RESET)),
    fork: nonEmpty(headers.get(H_FORK)),
  };
}

function metaFromEvent(obj) {
  const o = obj && typeof obj === 'object' ? obj : {};
  const { token, unusable } = receivedToken(o.token);
  return {
    token,
    unusable,
    seq: parseSeq(o.seq),
    session: nonEmpty(o.session),
    degraded: splitList(o.degraded),
    // reset/fork may be a code string or a small object; keep a string for events.
    reset: o.reset == null || o.reset === false ? null : typeof o.reset === 'string' ? o.reset : JSON.stringify(o.reset),
    fork: o.fork == null || o.fork === false ? null : typeof o.fork === 'string' ? o.fork : JSON.stringify(o.fork),
  };
}

/* ------------------------------------------------------------------------ */
/* Server-Sent Events parser                                                 */
/* ------------------------------------------------------------------------ */

/**
 * Incremental text/event-stream parser following the WHATWG algorithm:
 * CRLF, LF or lone CR end a line (a CR at the very end of one chunk and an LF
 * at the start of the next count as a single line break); lines starting with
 * ":" are comments; `data` lines accumulate with "\n"; a blank line
 * dispatches; an event with no data is dropped; a leading BOM is ignored; an
 * unterminated event at end of stream is discarded. Bytes are decoded with a
 * streaming TextDecoder so a multi-byte UTF-8 character split across chunks
 * survives.
 *
 * We parse the fetch body ourselves instead of using EventSource because
 * EventSource can only GET and cannot send our request header.
 */
export class SSEParser {
  constructor() {
    // ignoreBOM: the decoder keeps a leading BOM, which _process strips (as for a
    // string chunk); by default it stripped one too, and a second was lost with it.
    this._decoder = new TextDecoder('utf-8', { ignoreBOM: true });
    this._line = '';
    this._afterCR = false;
    this._started = false;
    this._type = '';
    this._data = '';
    this._id = '';
    /** Last `retry:` value seen (ms), informational only. */
    this.retry = null;
  }

  /** Feed a Uint8Array or string chunk; returns the events it completed. */
  feed(chunk) {
    const text = typeof chunk === 'string' ? chunk : this._decoder.decode(chunk, { stream: true });
    const out = [];
    this._process(text, out);
    return out;
  }

  /** Signal end of stream. Returns [] (incomplete events are discarded). */
  end() {
    const out = [];
    this._process(this._decoder.decode(), out);
    this._line = '';
    this._type = '';
    this._data = '';
    return out;
  }

  _process(text, out) {
    if (!text) return;
    let i = 0;
    if (!this._started) {
      this._started = true;
      if (text.charCodeAt(0) === 0xfeff) i = 1;
    }
    if (this._afterCR) {
      this._afterCR = false;
      if (text.charCodeAt(i) === 10) i += 1;
    }
    let start = i;
    for (; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this._handleLine(this._line + text.slice(start, i), out);
      this._line = '';
      if (c === 13) {
        if (i + 1 < text.length) {
          if (text.charCodeAt(i + 1) === 10) i += 1;
        } else {
          // Can't know yet whether an LF follows in the next chunk.
          this._afterCR = true;
        }
      }
      start = i + 1;
    }
    this._line += text.slice(start);
  }

  _handleLine(line, out) {
    if (line === '') {
      if (this._data === '') {
        this._type = '';
        return;
      }
      const data = this._data.endsWith('\n') ? this._data.slice(0, -1) : this._data;
      out.push({ event: this._type || 'message', data, id: this._id });
      this._type = '';
      this._data = '';
      return;
    }
    if (line.charCodeAt(0) === 58 /* ":" */) return;
    const idx = line.indexOf(':');
    let field = line;
    let value = '';
    if (idx !== -1) {
      field = line.slice(0, idx);
      value = line.slice(idx + 1);
      if (value.charCodeAt(0) === 32) value = value.slice(1);
    }
    if (field === 'event') this._type = value;
    else if (field === 'data') this._data += `${value}\n`;
    else if (field === 'id') {
      if (!value.includes('\u0000')) this._id = value;
    } else if (field === 'retry') {
      if (/^\d+$/.test(value)) this.retry = Number(value);
    }
  }
}

/**
 * Async-iterate the events of a ReadableStream (or any async iterable of
 * Uint8Array/string chunks). Uses getReader() rather than `for await` on the
 * stream because Safari's ReadableStream was long not async-iterable.
 * Breaking out of the loop cancels the underlying stream.
 */
/** The events of an event stream, one array per chunk received (see parseSSE). */
async function* sseBatches(source) {
  const parser = new SSEParser();
  if (source && typeof source.getReader === 'function') {
    const reader = source.getReader();
    let finished = false;
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) {
          finished = true;
          break;
        }
        yield parser.feed(value);
      }
      yield parser.end();
    } finally {
      if (finished) reader.releaseLock();
      else reader.cancel().catch(() => {});
    }
    return;
  }
  for await (const chunk of source) yield parser.feed(chunk);
  yield parser.end();
}

export async function* parseSSE(source) {
  for await (const batch of sseBatches(source)) yield* batch;
}

function deltaText(ev, response) {
  const d = safeJSON(ev.data);
  if (!d || typeof d !== 'object') {
    throw new SatchelError('Malformed delta event', { code: 'stream_protocol', response });
  }
  return typeof d.text === 'string' ? d.text : '';
}

/** The final `satchel` event's fields; it always names the next token. */
function satchelMeta(ev, response) {
  const meta = metaFromEvent(safeJSON(ev.data));
  // Taken as success, the old token would stay and this turn would silently be
  // missing from the context the client carries.
  if (!meta.token) throw tokenlessFinal(response, meta.unusable);
  return meta;
}

function tokenlessFinal(response, unusable = false) {
  const what = unusable ? 'a token no HTTP header can carry' : 'no token';
  return new SatchelError(`Malformed satchel event: ${what}; this turn may not be in the context`, {
    code: 'stream_protocol',
    response,
  });
}

/** The `error` event for an answered response whose token header cannot be sent back. */
function unusableTokenError(response) {
  return new SatchelError(
    'The response named a token no HTTP header can carry (a space, a non-ASCII byte, or ' +
      'a header sent twice with different tokens): the stored token is kept, and this ' +
      'turn may not be in the context',
    { code: 'response_protocol', response },
  );
}

function streamOutcome(reading) {
  const meta = reading.meta;
  return {
    text: reading.text,
    token: meta.token,
    seq: meta.seq,
    session: meta.session,
    degraded: meta.degraded,
    reset: meta.reset,
    fork: meta.fork,
  };
}


/* ------------------------------------------------------------------------ */
/* Locks                                                                     */
/* ------------------------------------------------------------------------ */

// Every acquire resolves to an idempotent release function, so one request can
// hold the lock across awaits and yields (a stream) and let go exactly once,
// whichever of success / error / early release / cancel happens first.
function once(fn) {
  let called = false;
  return () => {
    if (called) return;
    called = true;
    fn();
  };
}

// In-page fallback: a promise chain per lock name, shared by all clients on the
// page. Serializes within this tab only; other tabs are not excluded.
const pageQueues = new Map();

// Release functions of this page's write announcements: lock manager -> storage
// key -> release (see SatchelClient#_announceWrite).
const announcements = new WeakMap();

function queueLock(name, signal) {
  const prev = pageQueues.get(name) || Promise.resolve();
  let release;
  const held = new Promise((r) => (release = r));
  const tail = prev.then(() => held);
  pageQueues.set(name, tail);
  tail.then(() => {
    if (pageQueues.get(name) === tail) pageQueues.delete(name);
  });
  return new Promise((resolve, reject) => {
    let aborted = false;
    const onAbort = () => {
      aborted = true;
      reject(signal.reason);
    };
    if (signal) {
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    }
    prev.then(() => {
      if (signal) signal.removeEventListener('abort', onAbort);
      // An aborted waiter still owns its slot in the chain: pass it on at once.
      if (aborted) release();
      else resolve(once(release));
    });
  });
}

/**
 * The Web Lock name for a storage key. Web Locks refuse names that start with "-"
 * (a prefix or conversation id may): those, and names starting with the escape
 * character itself, get a backslash in front, so no two keys share a lock.
 */
function lockNameOf(key) {
  return key.startsWith('-') || key.startsWith('\\') ? `\\${key}` : key;
}

function webLock(locks, name, signal) {
  return new Promise((resolve, reject) => {
    // The lock is held until the promise returned by the callback settles,
    // i.e. until the caller invokes the release function we hand out.
    locks
      .request(name, signal ? { signal } : {}, () => new Promise((release) => resolve(once(release))))
      .catch(reject);
  });
}

/**
 * Resolve on the next `storage` event for `key` (another tab's write reaching this
 * tab's copy of localStorage) or after `ms`, whichever comes first. The event matters
 * in background tabs, where browsers stretch short timers to a second or more.
 */
function storageChangeOrDelay(key, ms) {
  return new Promise((resolve) => {
    const target = globalThis;
    const listens = typeof target.addEventListener === 'function' && typeof target.removeEventListener === 'function';
    let timer = null;
    const onStorage = (e) => {
      if (!e || e.key === key || e.key === null) done();
    };
    const done = () => {
      clearTimeout(timer);
      if (listens) target.removeEventListener('storage', onStorage);
      resolve();
    };
    if (listens) target.addEventListener('storage', onStorage);
    timer = setTimeout(done, ms);
  });
}

function pickLocks(opt) {
  if (opt && typeof opt === 'object' && typeof opt.request === 'function') return opt;
  if (opt === false) return null;
  const nav = typeof navigator !== 'undefined' ? navigator : null;
  // navigator.locks only exists in secure contexts (https, localhost).
  return nav && nav.locks && typeof nav.locks.request === 'function' ? nav.locks : null;
}

/* ------------------------------------------------------------------------ */
/* Requests                                                                  */
/* ------------------------------------------------------------------------ */

const isRequest = (x) => typeof Request !== 'undefined' && x instanceof Request;

/**
 * How long `context_busy` refusals are waited out in all, per call, in seconds (each
 * wait as long as its Retry-After, then one resend): the reply holding the
 * conversation is usually this tab's own, just stopped, which the server notices at
 * its next write, within a model's pause between two words. A longer one (another
 * tab's reply still streaming) is the caller's to wait for.
 */
const BUSY_WAIT_MAX_S = 3;

/** Resolve after `ms`, or reject with the signal's reason once it aborts. */
function abortableDelay(ms, signal) {
  const aborted = () => signal.reason ?? new DOMException('The operation was aborted.', 'AbortError');
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) {
      reject(aborted());
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(aborted());
    };
    const timer = setTimeout(() => {
      if (signal) signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    if (signal) signal.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * The `timeout` option, checked: milliseconds (1 to 2^31 - 1, what setTimeout can
 * keep), or false for none. `fallback` is taken when the value is undefined.
 */
function checkTimeout(value, fallback) {
  if (value === undefined) return fallback;
  if (value === false) return false;
  if (typeof value !== 'number' || Number.isNaN(value)) {
    throw new TypeError('Satchel timeout must be a number of milliseconds, or false for none');
  }
  if (!(value >= 1 && value <= MAX_TIMEOUT_MS)) {
    throw new RangeError(`Satchel timeout must be between 1 and ${MAX_TIMEOUT_MS} ms, or false for none`);
  }
  return value;
}

/** init without the client's own `timeout`, which is no fetch option. */
function withoutTimeout(init) {
  if (!init || !('timeout' in init)) return init;
  const { timeout, ...rest } = init;
  return rest;
}

/**
 * A signal that aborts, with the reason of the first, once any of `signals` does:
 * AbortSignal.any where there is one (it lets go of its listeners as signals are
 * collected); else listeners of our own that do the same (WeakRef and
 * FinalizationRegistry), as a signal's whole life may be the response's (the
 * caller's abort still has to reach its body).
 */
function anySignal(signals) {
  if (typeof AbortSignal !== 'undefined' && typeof AbortSignal.any === 'function') {
    try {
      return AbortSignal.any(signals);
    } catch {
      /* not every signal is the platform's own (a polyfill's): combine them below */
    }
  }
  const controller = new AbortController();
  for (const s of signals) {
    if (s.aborted) {
      controller.abort(s.reason);
      return controller.signal;
    }
  }
  if (typeof WeakRef !== 'function' || !detachWhenCollected) {
    for (const s of signals) s.addEventListener('abort', () => controller.abort(s.reason), { once: true });
    return controller.signal;
  }
  // As AbortSignal.any does: the listeners on the sources hold the combined signal
  // weakly, and go once it is collected (its request and body done with it). Held
  // strongly, every request left one listener, and its controller, on a caller's
  // page-long signal: 20,000 requests, 20,000 listeners and 22 MB.
  const combined = controller.signal;
  controllers.set(combined, controller);
  const ref = new WeakRef(combined);
  for (const s of signals) {
    const listener = weakAbortListener(ref, s);
    s.addEventListener('abort', listener, { once: true });
    detachWhenCollected.register(combined, { source: s, listener });
  }
  return combined;
}

/**
 * A listener that aborts the combined signal `ref` names, if it still lives. Made
 * here, not inline: closures made in one function share its scope, and one there
 * that held the controller kept every combined signal alive.
 */
function weakAbortListener(ref, source) {
  return () => {
    const target = ref.deref();
    if (target) controllers.get(target)?.abort(source.reason);
  };
}

/** The controller of each combined signal, for as long as the signal lives. */
const controllers = new WeakMap();
/** Removes a source's listener once the combined signal it fed is collected. */
const detachWhenCollected =
  typeof FinalizationRegistry === 'function'
    ? new FinalizationRegistry(({ source, listener }) => source.removeEventListener('abort', listener))
    : null;

/**
 * One attempt's deadline: a signal for fetch that aborts with a TimeoutError once `ms`
 * pass (until clear()), or with the caller's reason when `callerSignal` aborts first.
 * race(promise) settles as the promise does, or rejects with that reason as soon as
 * the signal aborts, even if the promise never settles (a fetch that ignores its
 * signal). Null without a timeout: the request goes out as it did before.
 */
function attemptDeadline(ms, callerSignal) {
  if (ms === false) return null;
  const controller = new AbortController();
  const timer = setTimeout(() => {
    // In seconds when whole ("within 120 s"), as a reader would say it; else in ms.
    const limit = ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
    const err = new TimeoutError(`No response from the server within ${limit}`, { timeout: ms });
    controller.abort(err);
  }, ms);
  const signal = callerSignal ? anySignal([callerSignal, controller.signal]) : controller.signal;
  return {
    signal,
    clear: () => clearTimeout(timer),
    race(promise) {
      return new Promise((resolve, reject) => {
        const onAbort = () => reject(signal.reason);
        if (signal.aborted) onAbort();
        else signal.addEventListener('abort', onAbort, { once: true });
        Promise.resolve(promise).then(
          (value) => {
            signal.removeEventListener('abort', onAbort);
            if (signal.aborted) discardLate(value);
            resolve(value);
          },
          (err) => {
            signal.removeEventListener('abort', onAbort);
            reject(err);
          },
        );
      });
    },
  };
}

/** A response that came after its attempt was given up: nobody will read its body. */
function discardLate(value) {
  if (value && typeof value === 'object' && value.body && typeof value.body.cancel === 'function') {
    try {
      value.body.cancel().catch(() => {});
    } catch {
      /* locked or already read */
    }
  }
}

/** The signal fetch() would obey: init's if given, else the Request's own. */
function signalOf(input, init) {
  if (init.signal !== undefined) return init.signal;
  return isRequest(input) ? input.signal : undefined;
}

function isReplayable(input, init) {
  const b = init && init.body;
  // No body of our own: either none at all, or a Request's, which is cloned
  // before each attempt.
  if (b == null || typeof b === 'string') return true;
  if (typeof ReadableStream !== 'undefined' && b instanceof ReadableStream) return false;
  // Node's fetch (undici) also takes an async iterable: read once, like a stream.
  if (typeof b[Symbol.asyncIterator] === 'function') return false;
  // Blob, FormData, URLSearchParams, ArrayBuffer(View) can all be sent twice.
  return typeof b.getReader !== 'function';
}

/** GET, HEAD, OPTIONS: sending one twice changes nothing on the server. */
function isSafeMethod(input, init) {
  const method = (init && init.method) || (isRequest(input) ? input.method : 'GET');
  return ['GET', 'HEAD', 'OPTIONS'].includes(String(method).toUpperCase());
}

function prepare(input, init, headerName, token) {
  // fetch's own rule: init.headers, when given, replaces a Request's headers.
  const given = init && init.headers !== undefined ? init.headers : undefined;
  const headers = new Headers(given !== undefined ? given : isRequest(input) ? input.headers : undefined);
  // Always overwrite: a header set by the caller (e.g. from a cached token in
  // the AI SDK adapter) must not beat the token read under the lock, and a
  // fresh-context retry must really carry no token.
  if (token) headers.set(headerName, token);
  else headers.delete(headerName);
  return [isRequest(input) ? input.clone() : input, { ...init, headers }];
}

const isEventStream = (res) =>
  (res.headers.get('content-type') || '').toLowerCase().includes('text/event-stream');

function safeJSON(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function makeEvent(name, detail) {
  if (typeof CustomEvent === 'function') return new CustomEvent(name, { detail });
  const ev = new Event(name);
  Object.defineProperty(ev, 'detail', { value: detail });
  return ev;
}

/* ------------------------------------------------------------------------ */
/* Client                                                                    */
/* ------------------------------------------------------------------------ */

/** SatchelClient methods bound to their client (see its constructor). */
const BOUND_METHODS = ['fetch', 'stream', 'reset', 'importToken', 'exportToken', 'on', 'withConversation', 'close'];

/**
 * One conversation's token holder. It is an EventTarget, so both
 * `client.on('token', fn)` and `client.addEventListener('token', e => ...)`
 * work (the latter gets a CustomEvent with `.detail`).
 */
export class SatchelClient extends EventTarget {
  constructor(options = {}) {
    super();
    // The public methods work detached: `const { fetch } = chat`, `ky.create({ fetch:
    // chat.fetch })`, a transport's `fetch` option, a callback. Unbound, they failed
    // on `this` (fetch with "this._reportError is not a function"). Own properties,
    // bound to whatever the class (or a subclass) defines, and not enumerable.
    for (const name of BOUND_METHODS) {
      Object.defineProperty(this, name, { value: this[name].bind(this), writable: true, configurable: true });
    }
    this._options = { ...options };
    this._conversation = String(options.conversation ?? 'default');
    this._prefix = options.prefix ?? DEFAULT_PREFIX;
    this._key = `${this._prefix}${this._conversation}`;
    this._headerName = options.headerName || DEFAULT_HEADER;
    this._storage = resolveStorage(options.storage ?? 'local');
    // Resolve fetch lazily on every call: polyfills and test doubles may
    // patch globalThis.fetch after we are created, and calling an unbound
    // window.fetch throws "Illegal invocation".
    const f = options.fetch;
    this._fetch = typeof f === 'function' ? f : (input, init) => globalThis.fetch(input, init);
    this._locks = pickLocks(options.locks);
    // The lock guards the stored token, so it has the token's scope: the storage
    // key for storage every tab shares, and this page alone for per-tab storage,
    // where another tab's conversation of the same id is a different one.
    this._lockName = lockNameOf(this._sharedStorage() ? this._key : `${this._key} page:${PAGE_ID}`);
    this._syncWaitMs = options.syncWaitMs ?? DEFAULT_SYNC_WAIT_MS;
    this._timeout = checkTimeout(options.timeout, DEFAULT_TIMEOUT_MS);
    this._generation = 0; // the newest write generation this client has seen
    this._cache = undefined;
    this._closed = false;
    this._loadInitial();
    this._setupSync(options.broadcast);
  }

  /** Conversation id this client manages. */
  get conversation() {
    return this._conversation;
  }
  /** Storage key of this conversation (prefix + id). */
  get storageKey() {
    return this._key;
  }
  /** Request/response header carrying the token. */
  get headerName() {
    return this._headerName;
  }
  /** The storage adapter in use (check `.kind` to see a memory fallback). */
  get storage() {
    return this._storage;
  }
  /** Currently held token, or null. Synchronous: reflects the last read/write. */
  get token() {
    return this._cache ? this._cache.token : null;
  }
  /** Sequence number of the held token, or null when unknown. */
  get seq() {
    return this._cache ? this._cache.seq : null;
  }
  /** Server session tag of the held token, or null. */
  get session() {
    return this._cache ? this._cache.session : null;
  }
  /** How cross-tab serialization is done: "web-locks" or "page-queue". */
  get lockMode() {
    return this._locks ? 'web-locks' : 'page-queue';
  }
  /** How new tokens reach other tabs: "broadcast-channel", "storage-event" or "none". */
  get syncMode() {
    return this._syncMode;
  }

  /** Subscribe to an event; `fn(detail, event)`. Returns an unsubscribe function. */
  on(name, fn) {
    const listener = (ev) => fn(ev.detail, ev);
    this.addEventListener(name, listener);
    return () => this.removeEventListener(name, listener);
  }

  /** A client for another conversation sharing this one's options and storage. */
  withConversation(conversation, overrides = {}) {
    return new SatchelClient({ ...this._options, storage: this._storage, ...overrides, conversation });
  }

  /** Stop listening to other tabs. The client still works for requests. */
  close() {
    this._closed = true;
    if (this._channel) {
      try {
        this._channel.close();
      } catch {
        /* already closed */
      }
      this._channel = null;
    }
    if (this._onStorageEvent) {
      globalThis.removeEventListener('storage', this._onStorageEvent);
      this._onStorageEvent = null;
    }
  }

  /* ---- token management ------------------------------------------------ */

  /** The held token (for backup / moving a conversation elsewhere), or null. */
  exportToken() {
    return this.token;
  }

  /**
   * Replace the conversation's token, e.g. restoring an export. Runs under the
   * conversation lock so it cannot interleave with an in-flight request.
   * Pass `{seq, session}` if known; without a seq the next response is adopted
   * unconditionally.
   */
  async importToken(token, meta = {}) {
    if (typeof token !== 'string' || !token) throw new TypeError('importToken() needs a non-empty string');
    if (!isHeaderSafe(token)) {
      throw new TypeError('importToken() needs a token of visible ASCII characters (no spaces)');
    }
    const release = await this._lock(meta.signal);
    try {
      await this._readFresh(); // in order after every write before ours
      await this._write(
        { token, seq: parseSeq(meta.seq), session: nonEmpty(meta.session) },
        'import',
      );
    } finally {
      release();
    }
  }

  /** Forget this conversation's token: the next request starts a fresh context. */
  async reset() {
    const release = await this._lock();
    try {
      const current = await this._readFresh();
      await this._clear(current, 'reset');
    } finally {
      release();
    }
  }

  /* ---- fetch ------------------------------------------------------------ */

  /**
   * fetch() with the conversation token attached. Resolves to the Response
   * when it is ok, after adopting the next token from its headers; throws a
   * SatchelError subclass otherwise. Recovers once from an unusable token
   * (fresh context) or a stale one (newest token from storage).
   *
   * If the response is text/event-stream, the body is passed through
   * untouched while we watch it for the final `satchel` event (or an AI SDK
   * `data-satchel` part), and the conversation lock stays held until that
   * metadata arrives or the body ends/is cancelled: read or cancel the body.
   *
   * `init.timeout` (else the client's `timeout`) bounds each attempt's wait for the
   * response's headers (see _exchange); it is not passed on to fetch.
   */
  async fetch(input, init) {
    init = init ?? {}; // fetch(url, null) is valid
    const timeout = checkTimeout(init.timeout, this._timeout);
    init = withoutTimeout(init);
    const signal = signalOf(input, init);
    let release;
    try {
      release = await this._lock(signal);
    } catch (err) {
      this._reportError(err, signal);
      throw err;
    }
    let handedOff = false;
    try {
      const { response, sent } = await this._exchange(input, init, { retried: false, fresh: false, timeout });
      if (response.body && isEventStream(response)) {
        handedOff = true;
        return this._watchStream(response, sent, release);
      }
      return response;
    } catch (err) {
      this._reportError(err, signal);
      throw err;
    } finally {
      if (!handedOff) release();
    }
  }

  /**
   * POST `body` as JSON and stream the reply: an async generator of text
   * deltas. The generator's return value, and the `result` promise attached
   * to it, is the final StreamResult ({text, token, seq, session, degraded,
   * reset, fork}). The lock is held until the final `satchel` event, so do
   * not await another request for this conversation inside the loop.
   */
  stream(url, body, init) {
    let settle;
    const result = new Promise((resolve, reject) => (settle = { resolve, reject }));
    // Nobody is obliged to look at .result; don't turn its rejection into an
    // unhandled-rejection warning.
    result.catch(() => {});
    const run = { started: false };
    init = init ?? {};
    // Checked here: a bad value is the caller's mistake, thrown at once, like fetch's.
    const timeout = checkTimeout(init.timeout, this._timeout);
    const gen = this._streamGen(url, body, withoutTimeout(init), settle, run, timeout);
    // A generator closed before its first next() never runs its body, so the
    // body's `finally` cannot settle `result`: do it here (nothing was sent).
    for (const method of ['return', 'throw']) {
      const original = gen[method].bind(gen);
      gen[method] = (arg) => {
        if (!run.started) settle.reject(new SatchelError('Stream was cancelled', { code: 'stream_cancelled' }));
        return original(arg);
      };
    }
    gen.result = result;
    return gen;
  }

  async *_streamGen(url, body, init, settle, run, timeout) {
    run.started = true; // runs synchronously in the first next()
    let release = () => {};
    let outcome = null;
    // The attempt being read: events parsed from the bytes received but not handled
    // yet, and what the result would say. Read again if the consumer leaves early.
    let reading = null;
    const signal = signalOf(url, init);
    try {
      release = await this._lock(signal);
      // fetch's rule: init.headers, when given, replaces a Request's own headers.
      const headers = new Headers(
        init.headers !== undefined ? init.headers : isRequest(url) ? url.headers : undefined,
      );
      if (!headers.has('content-type')) headers.set('content-type', 'application/json');
      if (!headers.has('accept')) headers.set('accept', 'text/event-stream');
      const reqInit = {
        ...init,
        method: init.method || 'POST',
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      };
      const state = { retried: false, fresh: false, timeout };
      attempts: for (;;) {
        const { response, sent } = await this._exchange(url, reqInit, state);
        const fromHeaders = metaFromHeaders(response.headers, this._headerName);
        // applied: the server's token is adopted (from the headers, in _exchange, or a
        // satchel event): the turn is saved. atYield: the consumer holds the stream.
        reading = {
          response,
          sent,
          pending: [],
          text: '',
          meta: fromHeaders.token ? fromHeaders : null,
          applied: !!fromHeaders.token,
          // Reasons the response's headers reported already (known before the stream
          // started): a final event that adds none is not reported again.
          reported: fromHeaders.degraded,
          atYield: false,
        };
        let yielded = false;
        if (response.body) {
          events: for await (const batch of sseBatches(response.body)) {
            reading.pending.push(...batch);
            while (reading.pending.length) {
              const ev = reading.pending.shift();
              if (ev.event === 'delta') {
                const piece = deltaText(ev, response);
                if (piece) {
                  reading.text += piece;
                  yielded = true;
                  reading.atYield = true;
                  yield piece;
                  reading.atYield = false;
                }
              } else if (ev.event === 'satchel') {
                const adopted = reading.applied ? reading.meta : null;
                reading.meta = satchelMeta(ev, response);
                await this._applyMeta(reading.meta, sent, 'stream', adopted, reading.reported);
                reading.applied = true;
                // The context has advanced: other requests may go now, even
                // while the caller is still draining the last bytes.
                release();
              } else if (ev.event === 'error') {
                const err = this._streamError(ev.data, response);
                // Retrying after text was shown would duplicate it on screen, so
                // after a delta this only drops a dead token (as fetch() does
                // when it cannot retry) and reports it.
                if (await this._recover(err, sent, state, !yielded)) continue attempts;
                throw err;
              } else if (ev.event === 'done') {
                break events;
              }
              // Unknown event types are ignored for forward compatibility.
            }
          }
        }
        if (!reading.meta) {
          throw new SatchelError('Stream ended before the satchel event; this turn may not be in the context', {
            code: 'stream_incomplete',
            response,
          });
        }
        outcome = streamOutcome(reading);
        settle.resolve(outcome);
        return outcome;
      }
    } catch (err) {
      if (reading && reading.applied && !reading.atYield && !(err instanceof SatchelError)) {
        // The connection dropped, or the caller aborted, after the server's token was
        // adopted: the turn is saved, and the stream ends as one without `done` does.
        // Thrown, the caller would show a failure and resend: a duplicated turn.
        outcome = streamOutcome(reading);
        settle.resolve(outcome);
        return outcome;
      }
      this._reportError(err, signal);
      settle.reject(err);
      throw err;
    } finally {
      if (!outcome) {
        // The consumer left the loop early (generator.return(), or .throw(): then
        // `result` has rejected with that error already). If the server's final event
        // is already here, in the bytes received with the last delta, the server has
        // issued its token: adopt it (keeping the old one would fork the
        // conversation, or make it stale for good under monotonic), and, left by
        // return(), the stream counts as complete. Nothing more is read.
        try {
          outcome = await this._adoptBuffered(reading);
        } catch (err) {
          // A storage adapter that failed: reported, and the stream is cancelled; the
          // lock and the result below are settled whatever happened here.
          this._reportError(err);
        }
      }
      release();
      if (outcome) settle.resolve(outcome);
      else settle.reject(new SatchelError('Stream was cancelled', { code: 'stream_cancelled' }));
    }
  }

  /**
   * What a stream left early still holds: its outcome if the final event was
   * handled, or is among the events received but not yet handled; else null.
   */
  async _adoptBuffered(reading) {
    if (!reading) return null;
    if (!reading.meta) {
      let last = null; // the newest final event (no findLast: Chrome < 97, Firefox < 104)
      for (let i = reading.pending.length - 1; i >= 0 && !last; i -= 1) {
        if (reading.pending[i].event === 'satchel') last = reading.pending[i];
      }
      if (!last) return null;
      let meta;
      try {
        for (const ev of reading.pending) {
          if (ev === last) break;
          if (ev.event === 'delta') reading.text += deltaText(ev, reading.response);
        }
        meta = satchelMeta(last, reading.response);
      } catch {
        return null; // malformed: cancelled, as if the final event had not come
      }
      reading.meta = meta;
      await this._applyMeta(meta, reading.sent, 'stream', null, reading.reported);
    }
    return streamOutcome(reading);
  }

  _streamError(data, response) {
    const d = safeJSON(data);
    const e = d && typeof d === 'object' ? (d.error && typeof d.error === 'object' ? d.error : d) : {};
    // status stays null: the HTTP exchange itself succeeded (200).
    return createError(e.code, e.message, { status: null, response, inStream: true });
  }

  /**
   * Send one request (with at most one recovery retry), under a lock the
   * caller already holds. Each attempt reads the token from storage *now*:
   * that is what makes the lock meaningful, since the previous holder (maybe
   * another tab) has just written its successor token there.
   *
   * Each attempt has `state.timeout` ms (or none, for false) from sending until the
   * response's headers, and for an error response its body too: then its fetch is
   * aborted and a TimeoutError thrown, never retried (the server may have processed
   * the request: resent, a chat message would be sent twice). A body the caller reads
   * (an ok response, a stream) is not timed: the caller's signal is for that.
   */
  async _exchange(input, init, state) {
    const replayable = isReplayable(input, init);
    state.safe = isSafeMethod(input, init);
    state.signal = signalOf(input, init);
    for (;;) {
      const sent = state.fresh ? null : await this._readFresh();
      if (sent && !isHeaderSafe(sent.token)) {
        // No header can carry it (a corrupted store): fetch would throw a TypeError,
        // every time, read as "offline". Dropped like a token the server refused;
        // nothing was sent, so the request goes out again without it.
        const err = new TokenError('the stored token cannot be sent in an HTTP header', {
          code: 'token_malformed',
        });
        if (await this._recover(err, sent, state, true)) continue;
        throw err;
      }
      const [req, reqInit] = prepare(input, init, this._headerName, tokenOf(sent));
      const deadline = attemptDeadline(state.timeout ?? false, state.signal);
      let response;
      try {
        if (deadline) reqInit.signal = deadline.signal;
        response = await (deadline ? deadline.race(this._fetch(req, reqInit)) : this._fetch(req, reqInit));
      } finally {
        // The headers are here (or the attempt failed): an ok response's body is the
        // caller's, and reading it is not timed. Synchronously after the await, so the
        // timer cannot fire in between (a macrotask after these microtasks).
        if (deadline && !(response && !response.ok)) deadline.clear();
      }
      // Error responses may still carry metadata (e.g. degraded) or even a
      // token; absent a token we simply keep the old one.
      const meta = metaFromHeaders(response.headers, this._headerName);
      if (response.ok) {
        await this._applyMeta(meta, sent, 'response');
        // Answered: the reply is the caller's, so reported, not thrown.
        if (meta.unusable) this._reportError(unusableTokenError(response), null);
        return { response, sent };
      }
      let err;
      try {
        err = await errorFromResponse(response, deadline);
      } finally {
        if (deadline) deadline.clear();
      }
      if (response.status === 431 && sent) {
        // Request headers too large for the server or a proxy in front of it (most
        // often a token past its header limit): every later request would meet the
        // same answer, so the token is dropped, like one the server refused.
        err = new TokenError('the server refused the request headers as too large', {
          code: 'token_too_large',
          status: 431,
          response,
        });
      }
      // A monotonic route's 409 for the token its newest was made from hands that
      // newest token back: its response was lost. Taken only if storage still holds
      // what we sent; if another tab stored a token meanwhile (maybe this very one:
      // that tab won a race with us), that one goes next, as for any stale_context.
      const handedBack = err instanceof StaleContextError && !!meta.token;
      if (handedBack) err.recovered = await this._adoptHandedBack(meta, sent);
      await this._applyMeta(handedBack ? { ...meta, token: null } : meta, sent, 'response');
      // The caller aborted while the error body was read (its read then failed, and the
      // error was built from the status line): their abort, as fetch() itself rejects.
      if (state.signal && state.signal.aborted) {
        throw state.signal.reason ?? new DOMException('The operation was aborted.', 'AbortError');
      }
      if (await this._recover(err, sent, state, replayable)) continue;
      throw err;
    }
  }

  /**
   * Decide whether an error is worth the single retry. Returns true to retry.
   * Exactly one retry per call, whatever the reason: a server that keeps
   * rejecting must not make us loop.
   */
  async _recover(err, sent, state, replayable) {
    const canRetry = !state.retried && replayable;
    if (err instanceof TokenError) {
      // A token the server can't use will never become usable: drop it, or
      // every future request would fail the same way.
      if (!sent) return false; // we sent no token; nothing to drop, nothing to retry
      // Except another user's, or a signed-out request's: the token is fine, the
      // session is not. Signing in again opens it (the server keeps its cookie too).
      if (err.code === 'token_wrong_user') return false;
      const current = await this._readRecordForRecovery();
      if (current === undefined) return false;
      if (current && current.token !== sent.token) {
        // Someone (another tab without a shared lock) already replaced the bad
        // token: resending with theirs keeps the context instead of losing it.
        if (!canRetry) return false;
        state.retried = true;
        state.fresh = false;
        return true;
      }
      if (current) await this._clear(current, 'dropped');
      this._emit('reset', {
        conversation: this._conversation,
        code: err.code,
        message: err.message,
        source: 'client',
        retrying: canRetry,
      });
      if (!canRetry) return false;
      state.retried = true;
      state.fresh = true;
      return true;
    }
    if (err.code === 'context_busy' && err.status === 409) {
      // Another request with this token is being answered (a streamed reply holds
      // it): nothing was done for this one, so it can be sent again. Usually the
      // reply is this tab's own, just stopped, and the server lets go of it within a
      // moment: wait as long as Retry-After says, and send again, for at most
      // BUSY_WAIT_MAX_S in all (a budget of its own, not the one retry below).
      const wait = parseRetryAfter(err.response);
      const waited = state.busyWaited || 0;
      // Each resend counts at least a second against the budget: a Retry-After of 0
      // (valid HTTP, from a proxy or another backend) made an endless loop.
      const cost = wait == null ? 0 : Math.max(wait, 1);
      if (!replayable || wait == null || waited + cost > BUSY_WAIT_MAX_S) return false;
      await abortableDelay(wait * 1000, state.signal);
      state.busyWaited = waited + cost;
      state.fresh = false;
      return true;
    }
    if (err instanceof StaleContextError) {
      // Another tab/request got there first. If it left a newer token in
      // storage, resend with that one. A server-mode carrier (`sv1.`) names the
      // stored context rather than holding it: the same carrier now loads the
      // state the other request saved, so resending it is the retry.
      const newest = await this._readRecordForRecovery();
      if (newest === undefined) return false;
      const serverSide = !!sent && tokenOf(newest) === sent.token && sent.token.startsWith(SERVER_CARRIER);
      // Not after a recovery: the newest token came with this refusal, and may hold
      // this very request, sent before and answered in the response that was lost
      // (unless the request is a read, which changes nothing however often it is sent).
      const resend = !err.recovered || state.safe === true;
      const retrying = canRetry && resend && (tokenOf(newest) !== tokenOf(sent) || serverSide);
      // A client-held token refused as stale, with nothing newer stored: its successor
      // was issued but never arrived (a response lost to an abort, a timeout or the
      // network under SATCHEL_CONSISTENCY=monotonic). Sending it again is refused
      // again, for good; only reset() (or a newer token from another tab) continues.
      err.recoverable = err.recovered || !(sent && !serverSide && tokenOf(newest) === sent.token);
      this._emit('stale', {
        conversation: this._conversation,
        code: err.code,
        message: err.message,
        retrying,
        recoverable: err.recoverable,
        recovered: err.recovered,
      });
      if (!retrying) return false;
      state.retried = true;
      state.fresh = false;
      return true;
    }
    return false;
  }

  /**
   * Emit events for response metadata and adopt its token. `reported`: degraded
   * reasons this response's headers reported already (a stream's final event repeats
   * them, and is reported only when it adds one).
   */
  async _applyMeta(meta, sent, source, adopted = null, reported = null) {
    // A second final event with the token this response already gave (a monotonic
    // mark that failed after the first went out) adds only its degraded reasons:
    // adopting it again would take a newer token another request stored meanwhile
    // for a diverging branch, and report a fork that does not exist.
    const repeat = !!(adopted && meta.token && meta.token === adopted.token);
    if (repeat) {
      if (meta.degraded.length) {
        this._emit('degraded', { conversation: this._conversation, reasons: meta.degraded, source });
      }
      return;
    }
    if (meta.token) await this._adopt(meta, sent, source);
    else if (meta.reset && sent && meta.reset !== 'token_unknown_key') {
      // The server refused the token we sent, went on with a fresh context, and
      // issued none (a read-only route): the stored token will never open again.
      // Forget it, unless someone stored a newer one meanwhile. Not for an unknown
      // key: during a key rollout another replica may still open it.
      const current = await this._readAnswered();
      if (current && tokenOf(current) === tokenOf(sent)) await this._clear(current, 'reset');
    }
    const base = { conversation: this._conversation };
    if (meta.reset) this._emit('reset', { ...base, code: meta.reset, source: 'server', retrying: false });
    if (meta.fork) this._emit('fork', { ...base, detail: meta.fork, source: 'server' });
    const added = !reported || meta.degraded.some((reason) => !reported.includes(reason));
    if (meta.degraded.length && added) this._emit('degraded', { ...base, reasons: meta.degraded, source });
  }

  /** Store the newest token a stale_context handed back, if storage still holds `sent`. */
  async _adoptHandedBack(meta, sent) {
    const current = await this._readAnswered();
    if (!sent || !current || current.token !== sent.token) return false;
    await this._write({ token: meta.token, seq: meta.seq, session: meta.session }, 'response');
    return true;
  }

  /**
   * Adopt the token a response carried. Normally storage still holds what we
   * sent, and the response is its direct successor: take it even if its seq
   * is lower (a server reset starts a new session). If storage moved while we
   * were waiting, someone else (another tab without a shared lock) advanced
   * the conversation: keep whichever is newer, and report a fork when ours
   * is not ahead, since two branches now exist.
   */
  async _adopt(meta, sent, source) {
    const incoming = { token: meta.token, seq: meta.seq, session: meta.session };
    const current = await this._readAnswered();
    if (current && current.token === incoming.token) {
      // A server-mode carrier (sv1.) stays the same while its seq moves: store the
      // new seq, so other tabs hear of the new turns (a token event) and refresh.
      const moved = incoming.seq != null && (current.seq == null || incoming.seq > current.seq);
      if (moved) await this._write(incoming, source);
      else this._setCache(current, source);
      return true;
    }
    if (!current || tokenOf(current) === tokenOf(sent)) {
      await this._write(incoming, source);
      return true;
    }
    const sameSession = !incoming.session || !current.session || incoming.session === current.session;
    const comparable = sameSession && incoming.seq != null && current.seq != null;
    if (comparable && incoming.seq > current.seq) {
      await this._write(incoming, source);
      return true;
    }
    this._setCache(current, 'storage');
    this._emit('fork', {
      conversation: this._conversation,
      source: 'client',
      detail: comparable ? 'seq_not_ahead' : 'concurrent_update',
      held: { seq: current.seq, session: current.session },
      incoming: { seq: incoming.seq, session: incoming.session },
    });
    return false;
  }

  /* ---- storage plumbing ------------------------------------------------- */

  _loadInitial() {
    let v = null;
    try {
      v = this._storage.get(this._key);
    } catch {
      v = null;
    }
    if (v && typeof v.then === 'function') {
      // Async adapter: `token` stays null until this resolves; await `ready`.
      this.ready = Promise.resolve(v).then(
        (val) => {
          if (this._cache === undefined) this._cache = parseRecord(val);
        },
        () => {},
      );
    } else {
      this._cache = parseRecord(v);
      this.ready = Promise.resolve();
    }
  }

  /**
   * The stored record, read once the server has answered. A custom adapter whose
   * read fails (throws or rejects: a closed IndexedDB) must not fail the request
   * the server has saved: the user would send it again (a fork, or stale for good
   * under monotonic). What this client last read or wrote stands in, under the lock
   * most often what was sent; the write that follows is guarded as any (kept in
   * this page's memory, volatile, if the adapter refuses it too). A read before
   * sending still fails the request: nothing is lost there, and sending no token
   * would start a fresh context in place of the saved one.
   */
  async _readAnswered() {
    try {
      return parseRecord(await this._storage.get(this._key));
    } catch {
      return this._cache === undefined ? null : this._cache;
    }
  }

  /**
   * The stored record for deciding a recovery, or undefined when storage cannot be
   * read: then nothing is recovered, and the caller gets the server's refusal (a
   * TokenError, a StaleContextError), not the storage's DOMException in its place.
   */
  async _readRecordForRecovery() {
    try {
      return await this._readRecord();
    } catch {
      return undefined;
    }
  }

  async _readRecord() {
    const rec = parseRecord(await this._storage.get(this._key));
    this._setCache(rec, 'storage');
    if (rec && rec.g > this._generation) this._generation = rec.g;
    return rec;
  }

  /**
   * Read the token under the lock, making sure it is the newest one written.
   *
   * The lock alone does not promise that: localStorage reaches other tabs
   * asynchronously (in Chromium a tab reads its own cached copy, updated by a
   * message that can arrive after the lock was handed over). So each write is
   * also announced as a shared Web Lock named after its generation, held until
   * the tab writes again; the lock manager orders that announcement before
   * the hand-over. Here, if storage is behind the newest announcement, wait
   * for it to catch up (up to `syncWaitMs`) rather than send an old token,
   * which would fork the conversation and lose this turn.
   */
  async _readFresh() {
    let rec = await this._readRecord();
    const newest = await this._newestWrite();
    if (!newest) return rec;
    if (newest.g > this._generation) this._generation = newest.g;
    const caughtUp = (r) => (newest.kind === 'clear' ? !r || r.g > newest.g : !!r && r.g >= newest.g);
    const deadline = Date.now() + this._syncWaitMs;
    while (!caughtUp(rec) && Date.now() < deadline) {
      await storageChangeOrDelay(this._key, 5);
      rec = await this._readRecord();
    }
    return rec; // past the deadline: send what we have; the server reports a fork
  }

  /** Whether other tabs see our storage (sessionStorage and memory are per tab; custom adapters may not be). */
  _sharedStorage() {
    const kind = this._storage.kind;
    return kind !== 'session' && kind !== 'memory';
  }

  /** Whether writes are announced: only with Web Locks that can be queried, and only for shared storage. */
  _announces() {
    return !!this._locks && typeof this._locks.query === 'function' && this._sharedStorage();
  }

  /** The newest write any tab announced for this conversation: {g, kind} or null. */
  async _newestWrite() {
    if (!this._announces()) return null;
    let snapshot;
    try {
      snapshot = await this._locks.query();
    } catch {
      return null;
    }
    let newest = null;
    for (const lock of (snapshot && snapshot.held) || []) {
      const parts = typeof lock.name === 'string' ? lock.name.split(' ') : [];
      if (parts.length < 4 || parts[0] !== WRITTEN_LOCK) continue;
      if (parts.slice(3).join(' ') !== this._key) continue;
      const g = parseSeq(parts[1]);
      if (g != null && (!newest || g > newest.g)) newest = { g, kind: parts[2] };
    }
    return newest;
  }

  /**
   * Hold a shared lock announcing our write `g`, and drop the previous
   * announcement this page made for the key, whichever client made it: only
   * the newest one counts (_newestWrite), so the page holds one per key.
   *
   * close() leaves the newest one held on purpose: a tab whose copy of storage
   * lags still needs it to wait for this write, and a client is often closed
   * right after its last reply. It goes with the page's next write of the key,
   * or with the page.
   */
  async _announceWrite(g, kind) {
    if (!this._announces()) return;
    let held = announcements.get(this._locks);
    if (!held) announcements.set(this._locks, (held = new Map()));
    const name = `${WRITTEN_LOCK} ${g} ${kind} ${this._key}`;
    // Resolved once the lock manager has granted it, so the announcement is in
    // place before the caller hands over the conversation lock.
    const release = await new Promise((granted) => {
      const hold = () => new Promise((done) => granted(once(done)));
      Promise.resolve(this._locks.request(name, { mode: 'shared' }, hold)).catch(() => granted(null));
    });
    const previous = held.get(this._key);
    if (release) held.set(this._key, release);
    if (previous && release) previous();
  }

  /** The generation of the write this client is about to make (one past the newest seen). */
  _nextGeneration() {
    this._generation += 1;
    return this._generation;
  }

  async _write(rec, source) {
    const g = this._nextGeneration();
    rec = { ...rec, g };
    await this._storage.set(this._key, serializeRecord(rec));
    this._setCache(rec, source);
    // A write the store refused (full) lives in this page's memory only: announced,
    // other tabs would adopt a token they can never read back from storage, and wait
    // syncWaitMs for it on each request.
    const storage = this._storage;
    if (typeof storage.isVolatile === 'function' && storage.isVolatile(this._key)) return;
    this._post({ type: 'token', token: rec.token, seq: rec.seq, session: rec.session, g });
    await this._announceWrite(g, 'set');
  }

  async _clear(previous, source) {
    const g = this._nextGeneration();
    await this._storage.remove(this._key);
    this._setCache(null, source);
    // Carry the token we cleared so a tab holding something newer ignores us.
    this._post({ type: 'clear', token: tokenOf(previous) });
    await this._announceWrite(g, 'clear');
  }

  _setCache(rec, source) {
    const previous = this._cache === undefined ? null : this._cache;
    this._cache = rec;
    // The token, or its seq alone (a server-mode carrier names a conversation whose
    // turns moved on): either way the conversation changed.
    if (tokenOf(previous) !== tokenOf(rec) || (previous && rec && previous.seq !== rec.seq)) {
      this._emit('token', {
        conversation: this._conversation,
        token: tokenOf(rec),
        seq: rec ? rec.seq : null,
        session: rec ? rec.session : null,
        source,
      });
    }
  }

  _emit(name, detail) {
    this.dispatchEvent(makeEvent(name, detail));
  }

  _reportError(err, signal) {
    if (isAbort(err, signal)) return; // the caller asked for it; not worth an event
    this._emit('error', { conversation: this._conversation, error: err });
  }

  async _lock(signal) {
    if (this._locks) {
      try {
        return await webLock(this._locks, this._lockName, signal);
      } catch (err) {
        // A browser can have navigator.locks and deny it (a sandboxed iframe, site
        // data blocked: SecurityError), which failed every request before it was sent.
        // Storage falls back to this page's memory there anyway: the in-page queue
        // has the scope that is left. lockMode says so from now on.
        if (!err || err.name !== 'SecurityError') throw err;
        this._locks = null;
      }
    }
    return queueLock(this._lockName, signal);
  }

  /* ---- cross-tab sync --------------------------------------------------- */

  _setupSync(opt) {
    this._syncMode = 'none';
    // sessionStorage is per tab by design; announcing its tokens to other tabs
    // would merge conversations the user meant to keep apart.
    // The same holds when sessionStorage was asked for and the page memory stands in.
    const perTab = this._storage.kind === 'session' || this._storage.fallbackFrom === 'session';
    const enabled = opt === undefined ? !perTab : !!opt;
    if (!enabled) return;
    const BC = typeof opt === 'function' ? opt : globalThis.BroadcastChannel;
    if (typeof BC === 'function') {
      try {
        const ch = new BC(`satchel:${this._prefix}`);
        // Node keeps the process alive while a channel is open; browsers have no unref.
        if (typeof ch.unref === 'function') ch.unref();
        const onMessage = (ev) => {
          this._onBroadcast(ev && ev.data).catch(() => {});
        };
        if (typeof ch.addEventListener === 'function') ch.addEventListener('message', onMessage);
        else ch.onmessage = onMessage;
        this._channel = ch;
        this._syncMode = 'broadcast-channel';
        return;
      } catch {
        /* fall through to the storage event */
      }
    }
    // Fallback: the `storage` event fires in *other* tabs when localStorage
    // changes, which is all we need to keep `client.token` current there.
    if (this._storage.kind === 'local' && typeof globalThis.addEventListener === 'function') {
      let local = null;
      try {
        local = globalThis.localStorage;
      } catch {
        /* blocked: compare nothing */
      }
      this._onStorageEvent = (e) => {
        // sessionStorage changes fire the same event in same-origin frames.
        if (local && e.storageArea && e.storageArea !== local) return;
        if (e.key !== null && e.key !== this._key) return;
        if (typeof this._storage.isBlind === 'function' && this._storage.isBlind(this._key)) return;
        this._setCache(e.key === null ? null : parseRecord(e.newValue), 'storage');
      };
      globalThis.addEventListener('storage', this._onStorageEvent);
      this._syncMode = 'storage-event';
    }
  }

  _post(msg) {
    if (!this._channel) return;
    try {
      this._channel.postMessage({ v: 1, conversation: this._conversation, ...msg });
    } catch {
      /* closed channel: other tabs will read storage under the lock anyway */
    }
  }

  async _onBroadcast(msg) {
    if (this._closed || !msg || msg.v !== 1 || msg.conversation !== this._conversation) return;
    // This page went on with a conversation of its own: another tab's is not it.
    if (typeof this._storage.isBlind === 'function' && this._storage.isBlind(this._key)) return;
    const stored = parseRecord(await this._storage.get(this._key));
    // Shared storage (localStorage, a custom adapter): the sender already wrote (or
    // removed) it, and if this tab's copy does not show that yet, it is lagging.
    // Writing from here, outside the lock, could overwrite a newer token that reached
    // the store meanwhile (a tab whose messages queued up while it was busy wrote a
    // pre-reset token back over the new conversation), so only the cached view moves.
    // Per-tab storage (sessionStorage, memory) takes a copy.
    const shared = this._sharedStorage();
    if (msg.type === 'token') {
      const incoming = parseRecord(msg);
      if (!incoming) return;
      if (stored && stored.token === incoming.token) {
        // A server-mode carrier whose seq moved: the conversation did (shared storage
        // may not show the new seq yet; per-tab storage takes it).
        const moved = incoming.seq != null && (stored.seq == null || incoming.seq > stored.seq);
        if (moved && !shared) await this._storage.set(this._key, serializeRecord(incoming));
        this._setCache(moved ? incoming : stored, 'broadcast');
        return;
      }
      if (!isNewer(incoming, stored)) return;
      if (!shared) await this._storage.set(this._key, serializeRecord(incoming));
      this._setCache(incoming, 'broadcast');
    } else if (msg.type === 'clear') {
      if (!stored) {
        this._setCache(null, 'broadcast');
      } else if (stored.token === msg.token) {
        if (!shared) await this._storage.remove(this._key);
        this._setCache(null, 'broadcast');
      }
    }
  }

  /* ---- AI SDK helpers (used by satchelAISDK) ---------------------------- */

  /**
   * Pass-through of an event-stream body that adopts the Satchel metadata it
   * carries, and releases the lock once that is done or the body ends.
   * Events are handled *before* their bytes are handed on, so by the time the
   * consumer sees the end of the reply, `client.token` is already the new one.
   */
  _watchStream(response, sent, release) {
    const reader = response.body.getReader();
    const parser = new SSEParser();
    let adopted = null; // the final event already applied, if any
    const reported = metaFromHeaders(response.headers, this._headerName).degraded;
    const handle = async (events) => {
      for (const ev of events) {
        let meta = null;
        if (ev.event === 'satchel') {
          meta = metaFromEvent(safeJSON(ev.data));
        } else if (ev.event === 'message' && ev.data.includes('"data-satchel"')) {
          // AI SDK UI message stream: {"type":"data-satchel","data":{...}}
          const part = safeJSON(ev.data);
          if (part && part.type === 'data-satchel') meta = metaFromEvent(part.data);
        } else if (ev.event === 'error') {
          // fetch() has resolved already and the caller reads the error in the
          // body; we only keep our own state straight (no retry: the body is
          // theirs) and tell listeners.
          const err = this._streamError(ev.data, response);
          await this._recover(err, sent, { retried: true }, false);
          this._reportError(err);
        }
        if (meta && !meta.token) {
          // The final event names no token: the body is the caller's, so this is only
          // reported; the old token stays, and this turn is not in the context it holds.
          this._reportError(tokenlessFinal(response, meta.unusable));
          meta = null;
        }
        if (meta) {
          await this._applyMeta(meta, sent, 'stream', adopted, reported);
          adopted = meta;
          release();
        }
      }
    };
    const body = new ReadableStream({
      pull: async (controller) => {
        try {
          const { done, value } = await reader.read();
          if (done) {
            await handle(parser.end());
            release();
            controller.close();
            return;
          }
          await handle(parser.feed(value));
          controller.enqueue(value);
        } catch (err) {
          release();
          controller.error(err);
        }
      },
      cancel: (reason) => {
        release();
        return reader.cancel(reason);
      },
    }, { highWaterMark: 0 }); // no read-ahead: we read exactly when the consumer does
    const wrapped = new Response(body, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
    // A constructed Response has url "" and redirected false, and the
    // constructor cannot set them; keep the real ones (relative links, logs).
    for (const prop of ['url', 'redirected']) {
      Object.defineProperty(wrapped, prop, { value: response[prop], enumerable: true });
    }
    return wrapped;
  }
}

/** Create a client for one conversation. See SatchelClientOptions. */
export function createClient(options = {}) {
  return new SatchelClient(options);
}

/* ------------------------------------------------------------------------ */
/* Vercel AI SDK adapter                                                     */
/* ------------------------------------------------------------------------ */

/** Concatenated text of a UI message (AI SDK 5 `parts`, or v4 `content`). */
export function messageText(message) {
  if (!message) return '';
  if (Array.isArray(message.parts)) {
    return message.parts
      .filter((p) => p && p.type === 'text' && typeof p.text === 'string')
      .map((p) => p.text)
      .join('');
  }
  return typeof message.content === 'string' ? message.content : '';
}

/**
 * The message whose text is the user's turn: the last one from the user. After
 * tool results (addToolResult, sendAutomaticallyWhen) the last message is the
 * assistant's. Messages without roles: the last one.
 */
function lastUserMessage(messages) {
  for (let i = messages.length - 1; i >= 0; i--) {
    if (messages[i] && messages[i].role === 'user') return messages[i];
  }
  return messages.some((m) => m && m.role) ? null : messages[messages.length - 1];
}

function headersToObject(h) {
  if (!h) return {};
  if (typeof Headers !== 'undefined' && h instanceof Headers) return Object.fromEntries(h.entries());
  if (Array.isArray(h)) return Object.fromEntries(h);
  return { ...h };
}

/**
 * Glue for `useChat` / `DefaultChatTransport` (AI SDK 5+):
 *
 *   const satchel = satchelAISDK(client);
 *   new DefaultChatTransport({ api: '/chat', ...satchel });
 *
 * `prepareSendMessagesRequest` sends only the newest message (the server
 * already holds the rest in the token) and attaches the token header;
 * `fetch` serializes the request under the conversation lock, re-reads the
 * newest token, and adopts the next one from the headers or from a
 * `data-satchel` part in the UI message stream.
 */
export function satchelAISDK(client) {
  return {
    prepareSendMessagesRequest(options = {}) {
      const { messages = [], id, body, headers, trigger, messageId } = options;
      // The transport *replaces* its headers with ours, so keep what it passed.
      const h = headersToObject(headers);
      for (const k of Object.keys(h)) {
        if (k.toLowerCase() === client.headerName.toLowerCase()) delete h[k];
      }
      if (client.token) h[client.headerName] = client.token;
      const user = lastUserMessage(messages);
      return {
        // trigger / messageId as the SDK's own body has them, so the server can
        // tell a regenerate or a tool-result continuation from a new message;
        // userMessageId names the message `message` is the text of, so a server
        // can tell "answer this again" from a new message with the same words
        // (a regenerate after a failed reply to a repeated "continue").
        body: {
          ...(body || {}),
          message: messageText(user),
          userMessageId: user && typeof user.id === 'string' ? user.id : undefined,
          id,
          trigger,
          messageId,
        },
        headers: h,
      };
    },
    fetch: (input, init) => client.fetch(input, init),
  };
}
