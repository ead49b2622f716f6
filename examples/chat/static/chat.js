// The Satchel chat page. Plain ES module, no build step, no dependencies beyond the
// Satchel browser client (served by the app at /static/satchel/satchel.js).
//
// Where things live:
//   * each conversation's token: the client's storage ("satchel:<id>" in localStorage)
//   * the conversation list's titles and times, and which one was open last:
//     this page's own index ("satchel-chat:index"), since the client stores tokens only
//   * the conversation itself: inside the token (and the server's overflow tier for
//     turns that no longer fit); the page renders it from GET /api/context.

const body = document.body;
const api = {
  chat: body.dataset.apiChat,
  stream: body.dataset.apiStream,
  context: body.dataset.apiContext,
};
const { createClient, listConversations } = await import(body.dataset.clientUrl);

const INDEX_KEY = 'satchel-chat:index';
const UNTITLED = 'Untitled chat';

const $ = (id) => document.getElementById(id);
const el = {
  list: $('conversations'),
  newChat: $('new-chat'),
  deleteChat: $('delete-chat'),
  title: $('thread-title'),
  thread: $('thread'),
  empty: $('empty-thread'),
  threadNote: $('thread-note'),
  form: $('composer'),
  input: $('message'),
  send: $('send'),
  error: $('error'),
  notice: $('notice'),
  tokenBytes: $('token-bytes'),
  tokenBudget: $('token-budget'),
  turnsHeld: $('turns-held'),
  turnsOverflowed: $('turns-overflowed'),
  tier: $('overflow-tier'),
  summary: $('summary'),
};

/* ---------------------------------------------------------------- index */

// {current: id, conversations: {id: {title, updated}}}. Best effort: a browser with
// storage blocked still chats (the client falls back to memory), it just forgets.
function loadIndex() {
  try {
    const raw = JSON.parse(localStorage.getItem(INDEX_KEY) || '{}');
    const conversations = raw && typeof raw.conversations === 'object' ? raw.conversations : {};
    return { current: typeof raw.current === 'string' ? raw.current : null, conversations: conversations || {} };
  } catch {
    return { current: null, conversations: {} };
  }
}

function saveIndex(index) {
  try {
    localStorage.setItem(INDEX_KEY, JSON.stringify(index));
  } catch {
    /* storage full or blocked: the list is a convenience */
  }
}

function updateIndex(fn) {
  const index = loadIndex(); // re-read: another tab may have written meanwhile
  fn(index);
  saveIndex(index);
  return index;
}

function touch(id, fields = {}) {
  updateIndex((index) => {
    const entry = index.conversations[id] || { title: UNTITLED, updated: 0 };
    index.conversations[id] = { ...entry, ...fields };
  });
}

async function conversations() {
  const index = loadIndex();
  const ids = new Set(Object.keys(index.conversations));
  for (const id of await listConversations('local')) ids.add(id);
  return [...ids]
    .map((id) => ({ id, title: UNTITLED, updated: 0, ...(index.conversations[id] || {}) }))
    .sort((a, b) => b.updated - a.updated);
}

function newId() {
  if (globalThis.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function titleFrom(text) {
  const line = text.replace(/\s+/g, ' ').trim();
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || UNTITLED;
}

/* ----------------------------------------------------------------- state */

let client = null;
let unsubscribe = [];
let busy = false; // this tab is sending
let refreshWanted = false; // another tab moved the conversation while we were busy
let refreshGeneration = 0;
let rendered = []; // [{role, content}] currently in the thread, to skip no-op renders
const notices = { reset: null, fork: null, degraded: [], loadDegraded: [] };

function setState(state) {
  body.dataset.state = state;
}

/* ----------------------------------------------------------- conversations */

async function renderList() {
  const items = await conversations();
  const current = client ? client.conversation : null;
  el.list.replaceChildren(
    ...items.map((c) => {
      const li = document.createElement('li');
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'conversation';
      button.dataset.id = c.id;
      if (c.id === current) button.setAttribute('aria-current', 'true');
      const title = document.createElement('span');
      title.className = 'conversation-title';
      title.textContent = c.title || UNTITLED;
      button.append(title);
      if (c.updated) {
        const time = document.createElement('time');
        time.className = 'conversation-time';
        time.dateTime = new Date(c.updated).toISOString();
        time.textContent = new Date(c.updated).toLocaleString([], {
          month: 'short',
          day: 'numeric',
          hour: '2-digit',
          minute: '2-digit',
        });
        button.append(time);
      }
      button.addEventListener('click', () => openConversation(c.id, { focus: true }));
      li.append(button);
      return li;
    }),
  );
}

async function openConversation(id, { focus = false } = {}) {
  if (client && client.conversation === id) {
    if (focus) el.input.focus();
    return;
  }
  for (const off of unsubscribe) off();
  if (client) client.close();
  client = createClient({ conversation: id, storage: 'local' });
  // How this browser coordinates tabs (shown for debugging, checked by the tests).
  body.dataset.lockMode = client.lockMode;
  body.dataset.syncMode = client.syncMode;
  unsubscribe = [
    client.on('reset', onReset),
    client.on('degraded', onDegraded),
    client.on('fork', onFork),
    client.on('token', onToken),
  ];
  updateIndex((index) => {
    index.current = id;
    index.conversations[id] ||= { title: UNTITLED, updated: Date.now() };
  });
  notices.reset = null;
  notices.fork = null;
  notices.degraded = [];
  notices.loadDegraded = [];
  renderNotice();
  showError(null);
  rendered = null;
  renderThread([]);
  await renderList();
  await refresh();
  if (focus) el.input.focus();
}

async function newChat() {
  // An empty current chat is reused rather than piling up empty ones.
  if (client && !client.token && rendered && rendered.length === 0 && !busy) {
    el.input.focus();
    return;
  }
  const id = newId();
  touch(id, { title: UNTITLED, updated: Date.now() });
  await openConversation(id, { focus: true });
}

async function deleteChat() {
  if (!client || busy) return;
  const title = el.title.textContent;
  if (!window.confirm(`Delete “${title}” from this browser?`)) return;
  const id = client.conversation;
  await client.reset();
  updateIndex((index) => {
    delete index.conversations[id];
    if (index.current === id) index.current = null;
  });
  const rest = (await conversations()).filter((c) => c.id !== id);
  client.close();
  client = null;
  if (rest.length) await openConversation(rest[0].id, { focus: true });
  else await newChat();
}

/* ----------------------------------------------------------------- thread */

function messageElement(role, content) {
  const item = document.createElement('div');
  item.className = `msg msg-${role}`;
  const who = document.createElement('p');
  who.className = 'msg-role';
  who.textContent = role === 'user' ? 'You' : role === 'assistant' ? 'Assistant' : role;
  const text = document.createElement('div');
  text.className = 'msg-text';
  text.textContent = content; // never innerHTML: model output is untrusted text
  item.append(who, text);
  return item;
}

function nearBottom() {
  const t = el.thread;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 80;
}

function scrollToEnd() {
  el.thread.scrollTop = el.thread.scrollHeight;
}

// Keep the newest message in view when the thread pane changes size (window resized,
// summary opened), unless the reader has scrolled up to read older messages.
let pinned = true;
el.thread.addEventListener('scroll', () => {
  pinned = nearBottom();
});
if (typeof ResizeObserver === 'function') {
  new ResizeObserver(() => {
    if (pinned) scrollToEnd();
  }).observe(el.thread);
}

function renderThread(turns) {
  const shown = turns.filter((t) => t.role === 'user' || t.role === 'assistant');
  const same =
    rendered &&
    rendered.length === shown.length &&
    rendered.every((r, i) => r.role === shown[i].role && r.content === shown[i].content);
  if (same) return;
  el.thread.replaceChildren(
    ...(shown.length ? shown.map((t) => messageElement(t.role, t.content)) : [el.empty]),
  );
  rendered = shown.map((t) => ({ role: t.role, content: t.content }));
  scrollToEnd();
}

function appendMessage(role, content) {
  if (el.empty.isConnected) el.empty.remove();
  const item = messageElement(role, content);
  el.thread.append(item);
  scrollToEnd();
  return item;
}

/* ----------------------------------------------------------------- status */

const number = new Intl.NumberFormat();

const DEGRADED_TEXT = {
  tier_unavailable: 'The overflow store is unreachable: older turns cannot be shown right now (the summary stands in for them).',
  tier_write_failed: 'The overflow store is unreachable: new turns are kept in the token for now, so it is larger than usual.',
  segment_missing: 'Some older turns have expired from the overflow store; their summary remains.',
  segment_corrupt: 'Some older turns in the overflow store were damaged and are not shown.',
  segment_foreign: 'Some older turns in the overflow store belong to another session and are not shown.',
  data_loss: 'Some older turns could not be kept anywhere; only their summary remains.',
};

function describeDegraded(reason) {
  return DEGRADED_TEXT[reason] || `Running in a degraded mode (${reason}).`;
}

function renderNotice() {
  const parts = [];
  if (notices.reset) parts.push(['reset', notices.reset]);
  if (notices.fork) parts.push(['fork', notices.fork]);
  const reasons = [...new Set([...notices.degraded, ...notices.loadDegraded])];
  for (const r of reasons) parts.push(['degraded', describeDegraded(r), r]);
  el.notice.replaceChildren(
    ...parts.map(([kind, text, code]) => {
      const p = document.createElement('p');
      p.className = `notice-item notice-${kind}`;
      p.dataset.kind = kind;
      const strong = document.createElement('strong');
      strong.textContent = kind === 'degraded' ? 'Degraded: ' : kind === 'reset' ? 'Reset: ' : 'Note: ';
      p.append(strong, text);
      if (code) {
        const c = document.createElement('code');
        c.textContent = ` (${code})`;
        p.append(c);
      }
      return p;
    }),
  );
  el.notice.hidden = parts.length === 0;
  el.notice.dataset.kinds = [...new Set(parts.map((p) => p[0]))].join(' ');
  el.notice.dataset.reasons = reasons.join(' ');
}

function renderStatus(data) {
  el.tokenBytes.textContent = number.format(data.token_bytes || 0);
  el.tokenBudget.textContent = data.max_token_bytes ? number.format(data.max_token_bytes) : 'no budget';
  el.turnsHeld.textContent = String(data.held_turns ?? (data.turns || []).length);
  el.turnsOverflowed.textContent = String(data.overflowed_turns || 0);
  el.tier.textContent = data.overflow_tier || 'none (oldest turns are summarized)';
  el.summary.textContent = data.summary || 'No summary yet: every turn still fits in the token.';

  const missing = Math.max(0, (data.overflowed_turns || 0) - (data.rehydrated_turns || 0));
  const summarized = data.summarized_only_turns || 0;
  const notes = [];
  if (missing) notes.push(`${missing} earlier turn${missing === 1 ? ' is' : 's are'} in the overflow store but could not be loaded.`);
  if (summarized) notes.push(`${summarized} earlier turn${summarized === 1 ? ' was' : 's were'} folded into the running summary.`);
  if (data.max_token_bytes && data.token_bytes > data.max_token_bytes) {
    // Over the soft budget: the tier did not take the oldest turns (it is down or
    // full), so they stay in the token, up to the hard cap, until it does.
    notes.push('The token is over its budget: older turns stay in it until the overflow store takes them again.');
  }
  el.threadNote.textContent = notes.join(' ');
  el.threadNote.hidden = notes.length === 0;
}

function showError(message) {
  el.error.textContent = message || '';
  el.error.hidden = !message;
}

function setTitle(title) {
  el.title.textContent = title || UNTITLED;
  document.title = `${title || UNTITLED} · Satchel chat`;
}

/* ---------------------------------------------------------------- events */

function onReset(d) {
  notices.reset = `This chat's saved context could not be used (${d.code}), so it continues on a fresh context. Earlier messages are gone.`;
  notices.degraded = [];
  notices.loadDegraded = [];
  renderNotice();
  // The conversation starts over: let its next first message name it again.
  if (client) touch(client.conversation, { title: UNTITLED });
  renderList();
}

function onDegraded(d) {
  notices.degraded = [...new Set([...notices.degraded, ...(d.reasons || [])])];
  renderNotice();
}

function onFork() {
  notices.fork = 'This chat was changed in another tab at the same time; showing the newest version.';
  renderNotice();
  scheduleRefresh();
}

function onToken(d) {
  // Tokens written by another tab (broadcast, or read from storage): re-render.
  if (d.source === 'broadcast' || d.source === 'storage') scheduleRefresh();
}

function scheduleRefresh() {
  if (busy) {
    refreshWanted = true;
    return;
  }
  refresh();
}

/** Load the conversation from the server (through the client, so the token goes along). */
async function refresh() {
  if (!client) return;
  const generation = ++refreshGeneration;
  const current = client;
  if (!busy) setState('loading');
  try {
    const response = await current.fetch(api.context, { headers: { accept: 'application/json' } });
    const data = await response.json();
    if (generation !== refreshGeneration || current !== client || busy) return;
    renderThread(data.all_turns || []);
    renderStatus(data);
    notices.loadDegraded = data.degraded || [];
    renderNotice();
    const firstUser = (data.all_turns || []).find((t) => t.role === 'user');
    const entry = loadIndex().conversations[current.conversation];
    if (firstUser && (!entry || entry.title === UNTITLED)) {
      touch(current.conversation, { title: titleFrom(firstUser.content) });
      renderList();
    }
    setTitle((loadIndex().conversations[current.conversation] || {}).title);
  } catch (err) {
    if (generation === refreshGeneration) showError(`Could not load this chat: ${err.message}`);
  } finally {
    if (generation === refreshGeneration && !busy) setState('idle');
  }
}

/* ------------------------------------------------------------------ send */

async function send(text) {
  busy = true;
  setState('sending');
  showError(null);
  notices.reset = null;
  notices.fork = null;
  notices.degraded = [];
  renderNotice();
  el.send.disabled = true;
  el.send.textContent = 'Sending…';
  el.input.value = '';

  const id = client.conversation;
  const entry = loadIndex().conversations[id];
  const title = !entry || entry.title === UNTITLED ? titleFrom(text) : entry.title;
  touch(id, { title, updated: Date.now() });
  setTitle(title);
  renderList();

  appendMessage('user', text);
  const reply = appendMessage('assistant', '');
  const replyText = reply.querySelector('.msg-text');
  reply.classList.add('pending');
  reply.setAttribute('aria-busy', 'true');
  el.thread.setAttribute('aria-busy', 'true'); // announce the reply once, when complete
  if (rendered) rendered.push({ role: 'user', content: text });

  let full = '';
  try {
    const stream = client.stream(api.stream, { message: text });
    for await (const piece of stream) {
      const follow = nearBottom();
      full += piece;
      replyText.textContent = full;
      if (follow) scrollToEnd();
    }
    if (rendered) rendered.push({ role: 'assistant', content: full });
  } catch (err) {
    reply.classList.add('failed');
    replyText.textContent = full || 'No reply.';
    rendered = null; // the server did not record this exchange: re-render from it
    const reason = err && err.code ? `${err.message} (${err.code})` : (err && err.message) || String(err);
    showError(`The message was not sent: ${reason}. It is back in the message box.`);
    if (!el.input.value) el.input.value = text;
  } finally {
    reply.classList.remove('pending');
    reply.removeAttribute('aria-busy');
    el.thread.setAttribute('aria-busy', 'false');
    el.send.disabled = false;
    el.send.textContent = 'Send';
    busy = false;
    refreshWanted = false;
    el.input.focus();
    await refresh(); // counts, summary, and anything another tab added meanwhile
  }
}

el.form.addEventListener('submit', (event) => {
  event.preventDefault();
  const text = el.input.value.trim();
  if (!text || busy || !client) return;
  send(text);
});

el.input.addEventListener('keydown', (event) => {
  if (event.key !== 'Enter' || event.shiftKey || event.isComposing || event.keyCode === 229) return;
  event.preventDefault(); // Enter sends; Shift+Enter keeps its newline
  if (!busy) el.form.requestSubmit();
});

el.newChat.addEventListener('click', () => newChat());
el.deleteChat.addEventListener('click', () => deleteChat());

// Another tab created, renamed or deleted a conversation: redraw the list.
window.addEventListener('storage', (event) => {
  if (event.key === INDEX_KEY || event.key === null || (event.key || '').startsWith('satchel:')) renderList();
});

/* ------------------------------------------------------------------ start */

async function start() {
  const index = loadIndex();
  const all = await conversations();
  const ids = new Set(all.map((c) => c.id));
  // The most recent conversation: the one open last (in any tab), else the newest.
  const id = index.current && ids.has(index.current) ? index.current : all.length ? all[0].id : newId();
  await openConversation(id);
  el.input.focus();
}

start();
