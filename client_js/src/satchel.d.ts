/**
 * @satchel/client — browser client for Satchel, the client-held chat context.
 *
 * Holds one opaque context token per conversation, sends it with every
 * request (`Satchel-Context` header), adopts the next one the server returns,
 * and coordinates tabs of the same origin (Web Locks + BroadcastChannel).
 *
 * @packageDocumentation
 */

/** Package version. */
export declare const VERSION: string;
/** Default request/response header carrying the token: `"Satchel-Context"`. */
export declare const DEFAULT_HEADER: string;
/** Default storage key prefix: `"satchel:"`. */
export declare const DEFAULT_PREFIX: string;
/** Longest wait, in ms, for a lagging storage view (see `SatchelClientOptions.syncWaitMs`). */
export declare const DEFAULT_SYNC_WAIT_MS: number;
/** Default of the `timeout` option, in ms: 120000 (see `SatchelClientOptions.timeout`). */
export declare const DEFAULT_TIMEOUT_MS: number;

/* ------------------------------------------------------------------------ */
/* Errors                                                                    */
/* ------------------------------------------------------------------------ */

/** Options shared by the error constructors. */
export interface SatchelErrorOptions {
  /** Machine-readable code, e.g. `"token_expired"`. */
  code?: string;
  /** HTTP status, or null for errors that arrived inside a 200 event stream. */
  status?: number | null;
  /** The response the error came from, if any (see {@link SatchelError.response}). */
  response?: Response | null;
  /** Underlying error. */
  cause?: unknown;
}

/**
 * What `fetch` takes as its first argument, in whatever environment compiles this
 * (the DOM's `RequestInfo | URL`, or Node's own): the declarations need no DOM lib.
 */
export type FetchInput = Parameters<typeof globalThis.fetch>[0];
/** The listener `EventTarget.addEventListener` takes, in this environment. */
export type EventTargetListener = Parameters<EventTarget['addEventListener']>[1];
/** The options `EventTarget.addEventListener` takes, in this environment. */
export type AddListenerOptions = Parameters<EventTarget['addEventListener']>[2];
/** removeEventListener's options, without the DOM lib's `EventListenerOptions`. */
export type RemoveListenerOptions = Parameters<EventTarget['removeEventListener']>[2];

/**
 * Base class of every error the client throws on purpose.
 * Network failures and aborts are not wrapped: they keep their platform
 * types (`TypeError`, `DOMException` named `AbortError`).
 */
export declare class SatchelError extends Error {
  constructor(message: string, options?: SatchelErrorOptions);
  /**
   * Server error code from `{"error": {"code": ...}}`, or one of the client's
   * own: `http_<status>`, `service_unavailable`, `stream_incomplete`,
   * `stream_protocol`, `stream_cancelled`, `timeout`, and `response_protocol`
   * (only in an `error` event: an answered response named a token no header can
   * carry; the stored token is kept).
   */
  code: string;
  /** HTTP status; null for errors delivered inside a successful stream. */
  status: number | null;
  /**
   * The Response the error came from. For an error response (non-2xx: `status`
   * is set) the body is unread: the client parsed a clone. For an error inside a
   * 200 event stream (`status` null: an `event: error`, `stream_incomplete`,
   * `stream_protocol`) it is the stream's response, whose body has been read: its
   * status and headers can be looked at, but `response.text()` and the like throw
   * (`bodyUsed` is true). Null for `stream_cancelled`, for a {@link TimeoutError},
   * and for the client's own `token_malformed` (a stored token no header can carry:
   * nothing was sent).
   */
  response: Response | null;
}

/**
 * The server could not use the token (code starts with `token_`: `token_malformed`,
 * `token_too_large`, `token_bad_signature` (also a token of another app or
 * purpose), `token_unknown_key`, `token_wrong_mode`, `token_expired`,
 * `token_unsupported_version`, `token_migration_failed`, `token_invalid_context`,
 * `token_erased` (410), `token_wrong_user` (403)). The client has already dropped
 * the token (unless storage meanwhile holds another one), emitting `token` and
 * `reset`; it is thrown only when the one fresh retry was not possible (e.g. a
 * stream had already yielded text) or failed too. Two cases the client makes
 * itself: `token_malformed` for a stored token no HTTP header can carry (nothing
 * was sent), and `token_too_large` for a 431 answer to a request with a token.
 * Except `token_wrong_user`: the token is kept and nothing is retried, since the
 * conversation belongs to an account this request is not signed in as; signing
 * in again opens it.
 */
export declare class TokenError extends SatchelError {}

/** 409 `stale_context`: another tab or request moved the conversation ahead. */
export declare class StaleContextError extends SatchelError {
  /**
   * `false` when the token this client holds was refused and nothing newer is
   * stored: its successor was issued but never arrived (a response lost to an
   * abort, a timeout or the network under `monotonic` consistency). Sending again
   * is refused again, for good: call {@link SatchelClient.reset} (or let another
   * tab store a newer token). `true` otherwise: a later attempt may succeed.
   * (Since servers keep the newest token, a monotonic route hands it back with
   * the refusal when that response was lost, and this is `true`: see `recovered`.)
   */
  recoverable: boolean;
  /**
   * `true` when the refusal itself carried the conversation's newest token (the
   * response that issued it was lost on the way: a dropped connection, a stream
   * stopped at its very end) and it is now stored: the conversation goes on from
   * it. The request was not served, and is not resent, since the lost response
   * may have been for this very message: reload the conversation, then send
   * again what it does not hold.
   */
  recovered: boolean;
}

/** 503, or code `tier_unavailable` or `tier_full` (also inside a stream): the server cannot serve the context now. */
export declare class ServiceUnavailableError extends SatchelError {
  /** `Retry-After` in seconds, when the server sent the delta-seconds form; null without one, and for an HTTP-date. */
  retryAfter: number | null;
}

/** Any other non-2xx response. */
export declare class HTTPError extends SatchelError {}

/**
 * Code `timeout`: an attempt got no response headers within the `timeout` option
 * (see {@link SatchelClientOptions.timeout}). Its fetch was aborted and the lock let
 * go; the stored token is unchanged, an `error` event is emitted (it is no abort of
 * the caller's), and nothing is resent: the server may have processed the request.
 * `name` is `"TimeoutError"`, as for the DOMException of `AbortSignal.timeout()`;
 * `status` and `response` are null.
 */
export declare class TimeoutError extends SatchelError {
  constructor(message: string, options?: SatchelErrorOptions & { timeout?: number | null });
  /** The timeout that ran out, in milliseconds. */
  timeout: number | null;
}

/**
 * Map a server error code to the matching error class.
 * `inStream: true` marks errors from an `event: error` inside a 200 stream:
 * unknown codes then become a plain {@link SatchelError}, not an HTTPError.
 */
export declare function createError(
  code: string | null | undefined,
  message?: string,
  options?: { status?: number | null; response?: Response | null; inStream?: boolean },
): SatchelError;

/* ------------------------------------------------------------------------ */
/* Storage                                                                   */
/* ------------------------------------------------------------------------ */

/**
 * Where tokens are kept. Methods may be synchronous or return promises
 * (e.g. an IndexedDB wrapper). Values are strings.
 */
export interface StorageAdapter {
  get(key: string): string | null | Promise<string | null>;
  set(key: string, value: string): void | Promise<void>;
  remove(key: string): void | Promise<void>;
  /** Optional: all keys, used by {@link listConversations}. */
  keys?(): string[] | Promise<string[]>;
  /**
   * Set by the built-in adapters: `"local"`, `"session"` or `"memory"`.
   * A Web Storage adapter that had to fall back reports `"memory"`.
   */
  readonly kind?: 'local' | 'session' | 'memory' | string;
  /** Set when a built-in Web Storage adapter fell back to memory. */
  readonly fallbackFrom?: 'local' | 'session';
  /**
   * Built-in Web Storage adapters: true while some token is kept only in this page's
   * memory because the store refused the write (quota full): it is lost on reload.
   */
  readonly volatile?: boolean;
  /** Built-in Web Storage adapters: whether the token under `key` is held so. */
  isVolatile?(key: string): boolean;
  /**
   * Built-in Web Storage adapters: true when the store could neither be read nor
   * written as this page first read `key`: the page's conversation under it lives in
   * memory for the page's life, and the store's copy is never replaced or removed.
   */
  isBlind?(key: string): boolean;
}

/** Built-in storage names accepted by the `storage` option. */
export type StorageKind = 'local' | 'session' | 'memory';

/** What {@link memoryStorage} returns: a synchronous {@link StorageAdapter}. */
export interface MemoryStorageAdapter extends StorageAdapter {
  readonly kind: 'memory';
  get(key: string): string | null;
  set(key: string, value: string): void;
  remove(key: string): void;
  keys(): string[];
}

/** A fresh, private in-memory adapter (handy for tests). */
export declare function memoryStorage(initial?: Record<string, string>): MemoryStorageAdapter;

/**
 * localStorage adapter. Falls back to the page-wide memory store when
 * localStorage is missing or unusable (blocked, zero quota in private mode);
 * if a write fails later (quota full) that key is kept in memory instead.
 */
export declare function localStorageAdapter(): StorageAdapter;

/** sessionStorage adapter, with the same fallbacks as {@link localStorageAdapter}. */
export declare function sessionStorageAdapter(): StorageAdapter;

/**
 * Resolve the `storage` option into an adapter.
 * `"memory"` is one page-wide store shared by every client on the page.
 * @throws TypeError for unknown names or adapters without get/set/remove.
 */
export declare function resolveStorage(spec?: StorageKind | StorageAdapter): StorageAdapter & {
  /** The adapter the returned one calls: a custom one passed in, or the store a client
   * already resolved (withConversation); absent for a built-in named by a string. */
  readonly adapter?: StorageAdapter;
};

/**
 * Conversation ids that have a stored token under `prefix`.
 * Returns `[]` for adapters without `keys()`.
 */
export declare function listConversations(
  storage?: StorageKind | StorageAdapter,
  prefix?: string,
): Promise<string[]>;

/* ------------------------------------------------------------------------ */
/* SSE                                                                       */
/* ------------------------------------------------------------------------ */

/** One dispatched Server-Sent Event. */
export interface SSEEvent {
  /** `event:` field, or `"message"` when absent. */
  event: string;
  /** `data:` lines joined with `"\n"`. */
  data: string;
  /** Last `id:` seen (empty string if none). */
  id: string;
}

/**
 * Incremental WHATWG-compliant text/event-stream parser: CRLF/LF/CR line
 * endings (also split across chunks), comments, multi-line data, BOM, and
 * UTF-8 characters split across chunks.
 */
export declare class SSEParser {
  constructor();
  /** Last `retry:` value seen, in milliseconds, or null. */
  retry: number | null;
  /** Feed bytes or text; returns the events this chunk completed. */
  feed(chunk: Uint8Array | string): SSEEvent[];
  /** End of stream: flushes the decoder; an unterminated event is discarded. */
  end(): SSEEvent[];
}

/**
 * Iterate the events of a response body. Leaving the loop early cancels the
 * stream.
 */
export declare function parseSSE(
  source: ReadableStream<Uint8Array> | AsyncIterable<Uint8Array | string>,
): AsyncGenerator<SSEEvent, void, undefined>;

/* ------------------------------------------------------------------------ */
/* Client                                                                    */
/* ------------------------------------------------------------------------ */

/** The part of the Web Locks API the client uses (`navigator.locks`). */
export interface LockManagerLike {
  request(
    name: string,
    options: { signal?: AbortSignal; mode?: 'exclusive' | 'shared' },
    callback: (lock: unknown) => Promise<unknown>,
  ): Promise<unknown>;
  /**
   * Optional, as on navigator.locks: the held locks. With it, each write is
   * announced as a shared lock `"satchel-written <generation> <set|clear> <key>"`,
   * so the next holder can tell when its storage view lags behind.
   */
  query?(): Promise<{ held?: Array<{ name?: string }> }>;
}

/** The part of BroadcastChannel the client uses. */
export interface BroadcastChannelLike {
  postMessage(message: unknown): void;
  addEventListener?(type: 'message', listener: (event: { data: unknown }) => void): void;
  // Method-style (bivariant) so that the real BroadcastChannel, whose handler takes
  // a MessageEvent, is accepted too.
  onmessage?: { handler(event: { data: unknown }): void }['handler'] | null;
  close(): void;
}

export interface SatchelClientOptions {
  /** Conversation id; one token is stored per id. Default `"default"`. */
  conversation?: string;
  /**
   * Where tokens live: `"local"` (default), `"session"`, `"memory"`, or a
   * custom {@link StorageAdapter}. Web Storage falls back to memory when it
   * is missing or throws.
   */
  storage?: StorageKind | StorageAdapter;
  /** Storage key prefix. Default `"satchel:"`; key = prefix + conversation. */
  prefix?: string;
  /** fetch implementation. Default: `globalThis.fetch`, looked up at call time. */
  fetch?: (input: FetchInput, init?: RequestInit) => Promise<Response>;
  /** Header carrying the token, in both directions. Default `"Satchel-Context"`. */
  headerName?: string;
  /**
   * Serialize requests of one conversation with the Web Locks API. The lock
   * has the scope of the stored token: for storage tabs share (localStorage,
   * custom adapters) it is named after the storage key (prefix + conversation,
   * e.g. `"satchel:default"`) and excludes every tab of the origin; for
   * per-tab storage (`"session"`, `"memory"`) it is private to this page, so
   * other tabs' conversations of the same id never wait for it.
   * `true` (default) uses `navigator.locks` when present (secure contexts
   * only) and otherwise an in-page queue; `false` always uses the in-page
   * queue; or pass a LockManager-like object.
   */
  locks?: boolean | LockManagerLike;
  /**
   * Live sync of `token` with other tabs. On: new tokens are announced on
   * BroadcastChannel `"satchel:<prefix>"` (or, without BroadcastChannel and
   * with localStorage, other tabs' writes are picked up from the `storage`
   * event). `false` turns live sync off entirely, the `storage`-event
   * fallback included (`syncMode` is `"none"`); requests stay correct,
   * since each reads storage under the lock. Default: on, except for
   * `storage: "session"` (per-tab by design). A constructor may be passed
   * (tests).
   */
  broadcast?: boolean | (new (name: string) => BroadcastChannelLike);
  /**
   * With Web Locks and storage shared by tabs (localStorage, custom): how long
   * a request waits, at most, for this tab's view of storage to show a write
   * another tab finished before handing over the lock. Browsers propagate
   * localStorage between tabs asynchronously; sending the older token would
   * fork the conversation. Default {@link DEFAULT_SYNC_WAIT_MS} (500).
   */
  syncWaitMs?: number;
  /**
   * How long each attempt of a request waits for the response's headers, in ms
   * (1 to 2147483647), or `false` for no limit. Default {@link DEFAULT_TIMEOUT_MS}
   * (120000, not ky's 10 s: a reply that is not streamed sends its headers only once
   * the model has written all of it). The clock starts when the attempt is sent,
   * after the conversation lock is acquired (the wait for the lock is bounded by the
   * caller's signal only), and each attempt (the client resends some refusals) has
   * its own. For an error response it also bounds reading the error body. Reading an
   * ok body, e.g. a stream that runs for minutes, is not timed: abort the caller's
   * signal for that. On expiry the fetch is aborted, the lock let go, and a
   * {@link TimeoutError} thrown (never retried). `fetch()` and `stream()` take
   * `timeout` in `init` to override it for one call.
   */
  timeout?: number | false;
}

/**
 * `init` of {@link SatchelClient.fetch} and {@link SatchelClient.stream}: fetch's
 * own, plus `timeout` for this call (see {@link SatchelClientOptions.timeout}); it
 * is not passed on to fetch.
 */
export type SatchelRequestInit = RequestInit & { timeout?: number | false };

/** Where a token change came from. */
export type TokenSource = 'response' | 'stream' | 'broadcast' | 'storage' | 'import' | 'reset' | 'dropped';

export interface TokenEventDetail {
  conversation: string;
  /** The token now held, or null after a reset / drop. */
  token: string | null;
  seq: number | null;
  session: string | null;
  source: TokenSource;
}

export interface DegradedEventDetail {
  conversation: string;
  /** E.g. `tier_unavailable`, `segment_missing`, `tier_write_failed`, `data_loss`. */
  reasons: string[];
  /** `"response"` (headers) or `"stream"` (final SSE event). */
  source: 'response' | 'stream';
}

export interface ResetEventDetail {
  conversation: string;
  /** Why: a `token_*` code, or the server's `Satchel-Reset` value. */
  code: string;
  message?: string;
  /**
   * `"server"`: the server started a fresh context itself (Satchel-Reset).
   * `"client"`: the server refused the token and the client dropped it.
   */
  source: 'server' | 'client';
  /** Whether the request is being retried with a fresh context. */
  retrying: boolean;
}

export interface ForkEventDetail {
  conversation: string;
  /**
   * `"server"`: the server saw two requests with the same parent token
   * (`detail` is its Satchel-Fork value). `"client"`: a response arrived that
   * was not ahead of the token another tab had stored meanwhile; the stored
   * one was kept.
   */
  source: 'server' | 'client';
  detail: string;
  /** Client-side forks only: what storage held. */
  held?: { seq: number | null; session: string | null };
  /** Client-side forks only: what the response carried. */
  incoming?: { seq: number | null; session: string | null };
}

export interface StaleEventDetail {
  conversation: string;
  code: string;
  message: string;
  /** True when a newer token was found in storage and the request is resent. */
  retrying: boolean;
  /** As {@link StaleContextError.recoverable}: false means only `reset()` continues. */
  recoverable: boolean;
  /** As {@link StaleContextError.recovered}: the refusal brought the newest token, now stored. */
  recovered: boolean;
}

/**
 * A call to `fetch()` or `stream()` is about to throw; or an `event: error`
 * went through the body of a `text/event-stream` response that `fetch()` had
 * already resolved with (whoever reads that body sees the error too). Not
 * emitted for aborts; emitted for a {@link TimeoutError} (the client's own
 * `timeout`, no abort of the caller's).
 */
export interface ErrorEventDetail {
  conversation: string;
  error: unknown;
}

/** Event names and their `detail` types. */
export interface SatchelEventMap {
  token: TokenEventDetail;
  degraded: DegradedEventDetail;
  reset: ResetEventDetail;
  fork: ForkEventDetail;
  stale: StaleEventDetail;
  error: ErrorEventDetail;
}

/** Final metadata of a streamed reply. */
export interface StreamResult {
  /** All deltas concatenated. */
  text: string;
  token: string | null;
  seq: number | null;
  session: string | null;
  degraded: string[];
  reset: string | null;
  fork: string | null;
}

/**
 * What {@link SatchelClient.stream} returns: iterate it for text deltas; its
 * return value and `result` are the final metadata. The return value is
 * `undefined` once the stream was closed with `return()` (that resolves with
 * the value it is given, as any generator's does) or an error: `result` is
 * the place to read the metadata.
 */
export interface SatchelStream extends AsyncGenerator<string, StreamResult | undefined, undefined> {
  /**
   * Stop the stream early (as `break` does); the value is optional, and is what
   * this resolves with (`undefined` by default). The metadata, if the final
   * event had arrived, is in `result`.
   */
  return(value?: StreamResult | PromiseLike<StreamResult | undefined>): Promise<IteratorResult<string, StreamResult | undefined>>;
  /**
   * Settles when the stream is finished: resolves with the metadata, rejects
   * with the stream's error, or with `code: "stream_cancelled"` if the loop
   * was left early or the stream was closed (`return()` / `throw()`) before
   * its first `next()`. Nothing is sent until the stream is iterated, so the
   * result of a stream never iterated nor closed stays pending. Never
   * reported as an unhandled rejection.
   */
  result: Promise<StreamResult>;
}

/**
 * Token holder for one conversation. An EventTarget: use
 * {@link SatchelClient.on} or `addEventListener(name, (e: CustomEvent) => ...)`.
 */
export declare class SatchelClient extends EventTarget {
  constructor(options?: SatchelClientOptions);

  /** Conversation id. */
  readonly conversation: string;
  /** Storage key used (prefix + conversation). */
  readonly storageKey: string;
  /** Header carrying the token. */
  readonly headerName: string;
  /** Storage adapter in use; `.kind === "memory"` reveals a fallback. */
  readonly storage: StorageAdapter & { readonly adapter?: StorageAdapter };
  /** Token currently held, or null. Synchronous. */
  readonly token: string | null;
  /** Sequence number of the held token, or null if unknown. */
  readonly seq: number | null;
  /** Session tag of the held token, or null. */
  readonly session: string | null;
  /** `"web-locks"` across tabs, or `"page-queue"` within this page only (also once a browser denied Web Locks: a sandboxed iframe, site data blocked). */
  readonly lockMode: 'web-locks' | 'page-queue';
  /** How other tabs learn about new tokens. */
  readonly syncMode: 'broadcast-channel' | 'storage-event' | 'none';
  /** Resolves once the stored token has been loaded (matters for async adapters). */
  readonly ready: Promise<void>;

  /**
   * Subscribe to an event. The listener receives the detail object (and the
   * CustomEvent). Returns an unsubscribe function.
   */
  on<K extends keyof SatchelEventMap>(
    name: K,
    listener: (detail: SatchelEventMap[K], event: CustomEvent<SatchelEventMap[K]>) => void,
  ): () => void;

  /** The EventTarget way: Satchel's events arrive as typed CustomEvents. */
  addEventListener<K extends keyof SatchelEventMap>(
    type: K,
    listener: (event: CustomEvent<SatchelEventMap[K]>) => void,
    options?: AddListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventTargetListener,
    options?: AddListenerOptions,
  ): void;
  removeEventListener<K extends keyof SatchelEventMap>(
    type: K,
    listener: (event: CustomEvent<SatchelEventMap[K]>) => void,
    options?: RemoveListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventTargetListener,
    options?: RemoveListenerOptions,
  ): void;

  /**
   * fetch() with the conversation's token. Runs under the conversation lock
   * and reads the token from storage inside it. Resolves with the Response
   * when `ok` (after adopting the next token); otherwise throws a
   * {@link SatchelError} subclass. Retries at most once: with no token after
   * a `token_*` error (emitting `reset`), or with the newer stored token after
   * `stale_context` (emitting `stale`). Besides that one retry, a 409
   * `context_busy` (a streamed reply holds the token) is waited out as its
   * `Retry-After` says and sent again, for at most 3 s in all.
   *
   * For `text/event-stream` responses the returned Response wraps the body:
   * bytes pass through unchanged while the final `satchel` event (or an AI
   * SDK `data-satchel` part) is adopted, and the lock is held until then or
   * until the body ends or is cancelled. Always read or cancel such bodies.
   * The wrapper keeps the original `url` and `redirected`; its `type` is
   * `"default"`. An `event: error` in the body emits `error` (and for a
   * `token_*` code drops the token, emitting `reset`), but fetch() has
   * resolved by then.
   *
   * The lock wait is aborted by `init.signal`, or else by the Request's own
   * signal, as fetch() itself would be. `init.timeout` overrides the client's
   * `timeout` for this call: each attempt throws a {@link TimeoutError} if its
   * response's headers do not arrive in time (the body is not timed).
   *
   * Bound to this client, as are `stream`, `reset`, `importToken`, `exportToken`,
   * `on`, `withConversation` and `close`: `const { fetch } = chat` or
   * `ky.create({ fetch: chat.fetch })` works.
   */
  fetch(input: FetchInput, init?: SatchelRequestInit | null): Promise<Response>;

  /**
   * POST `body` as JSON and stream the reply's text deltas
   * (`event: delta`, `data: {"text": ...}`). The final `event: satchel`
   * is adopted like response headers. The lock is held until that event, so
   * do not await another request for the same conversation inside the loop.
   * A `token_*` error is retried once only if no delta had been yielded;
   * after a delta the token is still dropped (as by fetch()) and the
   * TokenError thrown.
   *
   * `init.timeout` overrides the client's `timeout` for this call. It bounds the
   * wait for the response's headers only: a reply streaming for minutes is not
   * cut; stop it with `init.signal`. An invalid value throws at once (a
   * TypeError or RangeError), as `createClient` does.
   */
  stream(url: FetchInput, body?: unknown, init?: SatchelRequestInit | null): SatchelStream;

  /** Forget this conversation's token (under the lock); the next request starts fresh. */
  reset(): Promise<void>;

  /** The token held, for backup or transfer. */
  exportToken(): string | null;

  /**
   * Store a token (under the lock), e.g. restoring an export. Without a
   * `seq`, the next response's token is adopted unconditionally.
   */
  importToken(
    token: string,
    meta?: { seq?: number | string | null; session?: string | null; signal?: AbortSignal },
  ): Promise<void>;

  /** A client for another conversation with the same options and storage. */
  withConversation(conversation: string, overrides?: SatchelClientOptions): SatchelClient;

  /**
   * Stop listening to other tabs (BroadcastChannel / storage event). The
   * client still works for requests. The shared lock announcing this page's
   * last write of the conversation stays held (a tab whose storage lags may
   * still need it) until the page writes that conversation again or closes.
   */
  close(): void;
}

/** Create a client for one conversation. */
export declare function createClient(options?: SatchelClientOptions): SatchelClient;

/* ------------------------------------------------------------------------ */
/* Vercel AI SDK                                                             */
/* ------------------------------------------------------------------------ */

/** Minimal shape of an AI SDK UI message (v5 `parts`, or v4 `content`). */
export interface UIMessageLike {
  /** The SDK's message id: sent as `userMessageId` for the last user message. */
  id?: string;
  role?: string;
  /** AI SDK 5+: only parts with `type: "text"` contribute. */
  parts?: ReadonlyArray<{ type: string; text?: string }>;
  /** AI SDK 4 and earlier. */
  content?: string;
}

/** Text of a UI message: its text parts joined, or v4 `content`. */
export declare function messageText(message: UIMessageLike | null | undefined): string;

/** Options the AI SDK passes to `prepareSendMessagesRequest`. */
export interface PrepareSendMessagesRequestOptions {
  id: string;
  messages: UIMessageLike[];
  body?: Record<string, unknown>;
  headers?: RequestInit['headers'];
  credentials?: RequestInit['credentials'];
  api?: string;
  trigger?: 'submit-message' | 'regenerate-message';
  messageId?: string;
  requestMetadata?: unknown;
}

export interface SatchelAISDKAdapter {
  /**
   * Sends only the user's newest message: body
   * `{...body, message, userMessageId, id, trigger, messageId}`, where
   * `message` is the text of the last message with `role: "user"` (after tool
   * results the last message is the assistant's), `userMessageId` that
   * message's id, and `trigger` / `messageId` are passed through as the SDK's
   * default body has them. Headers are the transport's
   * plus the token header (they replace the transport's own, so they are
   * copied through).
   */
  prepareSendMessagesRequest(options: PrepareSendMessagesRequestOptions): {
    body: {
      message: string;
      userMessageId: string | undefined;
      id: string;
      trigger: PrepareSendMessagesRequestOptions['trigger'];
      messageId: string | undefined;
      [key: string]: unknown;
    };
    headers: Record<string, string>;
  };
  /**
   * Pass as the transport's `fetch`: serializes under the conversation lock,
   * re-reads the newest token, adopts the next one from response headers or
   * a `data-satchel` stream part, and throws typed errors.
   */
  fetch(input: FetchInput, init?: RequestInit): Promise<Response>;
}

/**
 * Adapter for AI SDK 5+ `DefaultChatTransport`:
 * `new DefaultChatTransport({ api, ...satchelAISDK(client) })`.
 */
export declare function satchelAISDK(client: SatchelClient): SatchelAISDKAdapter;
