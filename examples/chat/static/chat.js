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
// The header the token travels in (SATCHEL_HEADER); the server answers in the same one.
const headerName = body.dataset.headerName || undefined;
const { createClient, listConversations } = await import(body.dataset.clientUrl);

const INDEX_KEY = 'satchel-chat:index';
/** sessionStorage: the conversation this tab shows, so a reload of the tab shows it
 * again, whatever other tabs opened meanwhile. */
const TAB_KEY = 'satchel-chat:open';
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
  stop: $('stop'),
  count: $('char-count'),
  problem: $('composer-problem'),
  error: $('error'),
  notice: $('notice'),
  tokenBytes: $('token-bytes'),
  tokenBudget: $('token-budget'),
  turnsHeld: $('turns-held'),
  turnsOverflowed: $('turns-overflowed'),
  tier: $('overflow-tier'),
  summary: $('summary'),
};
// The server's limit (CHAT_MAX_MESSAGE_CHARS). Not a maxlength attribute: that cuts a
// long paste off without a word; the counter and a message say what is wrong instead.
const MAX_CHARS = Number(el.input.dataset.maxChars) || 8000;

/* ---------------------------------------------------------------- index */

// {current: id, conversations: {id: {title, updated}}}. Best effort: a browser with
// storage blocked still chats (the client falls back to memory), it just forgets.
/** The index as this page last wrote it when storage refused the write (full or
 * blocked), else null: kept for the page's life, so a chat started then still gets its
 * title and place in the list. Entries other tabs saved are read over it. */
let unsavedIndex = null;

function loadIndex() {
  let stored;
  try {
    const raw = JSON.parse(localStorage.getItem(INDEX_KEY) || '{}');
    const conversations = raw && typeof raw.conversations === 'object' ? raw.conversations : {};
    stored = { current: typeof raw.current === 'string' ? raw.current : null, conversations: conversations || {} };
  } catch {
    stored = { current: null, conversations: {} };
  }
  if (!unsavedIndex) return stored;
  return {
    current: unsavedIndex.current ?? stored.current,
    conversations: { ...stored.conversations, ...unsavedIndex.conversations },
  };
}

function saveIndex(index) {
  try {
    localStorage.setItem(INDEX_KEY, JSON.stringify(index));
    unsavedIndex = null;
  } catch {
    unsavedIndex = structuredClone(index); // storage full or blocked: this page's copy
  }
}

function updateIndex(fn) {
  const index = loadIndex(); // re-read: another tab may have written meanwhile
  fn(index);
  saveIndex(index);
  return index;
}

function touch(id, fields = {}, { used = false } = {}) {
  updateIndex((index) => {
    const entry = index.conversations[id] || { title: UNTITLED, updated: 0 };
    index.conversations[id] = { ...entry, ...fields };
    if (used) index.current = id; // sent in: the most recent, for a new tab too
  });
}

/** A time in ms that Date can show, else 0 (no time): the index may come from an older
 * page or a hand edit, and one bad value made Date.toISOString throw, stopping the page. */
function timeOf(value) {
  return typeof value === 'number' && Number.isFinite(new Date(value).getTime()) ? value : 0;
}

/** An index entry's title: a non-empty string, else "Untitled chat" (a bad entry is
 * untitled everywhere: shown so, and named by its chat's first message). */
function titleOf(entry) {
  return entry && typeof entry.title === 'string' && entry.title ? entry.title : UNTITLED;
}

async function conversations() {
  const index = loadIndex();
  const stored = new Set(await listConversations('local'));
  const ids = new Set([...Object.keys(index.conversations), ...stored]);
  // A chat nothing was sent in yet (no token, no title) is listed only where it is
  // open (in this tab, before a reload too), last opened or sent in, or holds a failed
  // send to retry: New chat, then back to another chat, three times, left three
  // "Untitled chat" entries for good. Its index entry stays, as another tab may have
  // it open and be about to send in it.
  const shown = new Set([index.current, client?.conversation, tabConversation(), ...failedElsewhere.keys()]);
  // Untitled as New chat made it: an entry whose title is damaged (a number, empty)
  // is listed, as "Untitled chat", for its first message to name it.
  const untouched = (id) => !stored.has(id) && !shown.has(id) && index.conversations[id]?.title === UNTITLED;
  return [...ids]
    .filter((id) => !untouched(id))
    .map((id) => {
      const entry = index.conversations[id] || {};
      return { id, title: titleOf(entry), updated: timeOf(entry.updated) };
    })
    .sort((a, b) => b.updated - a.updated);
}

/** The conversation to show when none is chosen: this tab's own (a reload: another
 * tab's New chat or switch made a reload land on that tab's chat), else the one sent
 * in or opened last in any tab (a new tab), else the newest. */
function mostRecent(index, all) {
  for (const id of [tabConversation(), index.current]) {
    if (id && all.some((c) => c.id === id)) return id;
  }
  return all.length ? all[0].id : null;
}

function tabConversation() {
  try {
    return sessionStorage.getItem(TAB_KEY);
  } catch {
    return null;
  }
}

function newId() {
  if (globalThis.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
}

// Characters as a reader sees them (an emoji family, a flag, an accented letter) where
// the browser can tell, else code points (never UTF-16 units: half an emoji is U+FFFD).
const graphemes =
  typeof Intl !== 'undefined' && Intl.Segmenter
    ? (text) => Array.from(new Intl.Segmenter(undefined, { granularity: 'grapheme' }).segment(text), (s) => s.segment)
    : (text) => [...text];

function titleFrom(text) {
  const chars = graphemes(text.replace(/\s+/g, ' ').trim());
  return chars.length > 48 ? `${chars.slice(0, 47).join('')}…` : chars.join('') || UNTITLED;
}

/* ----------------------------------------------------------------- state */

let client = null;
let unsubscribe = [];
let busy = false; // this tab is sending
let sendingWith = null; // ...with this client (another chat, or a new client for the same one, may be open meanwhile)
let deleting = false; // Delete chat is waiting on the server: nothing else may start
let refreshWanted = false; // another tab moved the conversation while we were busy
let refreshGeneration = 0;
// [{role, content}] currently in the thread, so a re-render appends only what is new;
// null when the thread must be rebuilt from scratch (another conversation, a reload).
let rendered = [];
// A failed send whose text went back in the box: {conversation, text, shownBefore (the
// history as the send began, JSON)}. Every load of the chat checks whether the server
// saved it after all.
let unsent = null;
// Sends that failed after the user had opened another conversation, by conversation id:
// {text, error, shownBefore}. The text goes back in the box when its chat is opened
// again, not in the box of the chat open when it failed (Enter would send it there).
const failedElsewhere = new Map();
const notices = { reset: null, fork: null, deleted: null, elsewhere: null, degraded: [], loadDegraded: [] };
/** Stops the reply streaming now (null when none is). */
let stopCurrent = null;
/** The last load of the chat failed (offline?): load again when the browser is back. */
let loadFailed = false;
/** The error shown is a failed load's, which a load that succeeds clears. */
let loadErrorShown = false;
let contextLoads = 0; // loads of the chat (GET /api/context) in flight

function setState(state) {
  body.dataset.state = state;
}

/* ----------------------------------------------------------- conversations */

let listGeneration = 0;

function listItem(id) {
  const li = document.createElement('li');
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'conversation';
  button.dataset.id = id;
  const title = document.createElement('span');
  title.className = 'conversation-title';
  title.dir = 'auto'; // a Hebrew or Arabic title shows its start, its ellipsis on the left
  button.append(title);
  li.append(button);
  return li;
}

function updateListItem(li, c, current) {
  const button = li.firstElementChild;
  const title = button.querySelector('.conversation-title');
  const text = c.title || UNTITLED;
  if (title.textContent !== text) title.textContent = text;
  if (c.id === current) button.setAttribute('aria-current', 'true');
  else button.removeAttribute('aria-current');
  let time = button.querySelector('time');
  if (!c.updated) {
    if (time) time.remove();
    return;
  }
  const iso = new Date(c.updated).toISOString();
  if (time && time.dateTime === iso) return;
  if (!time) {
    time = document.createElement('time');
    time.className = 'conversation-time';
    button.append(time);
  }
  time.dateTime = iso;
  time.textContent = new Date(c.updated).toLocaleString([], {
    month: 'short',
    day: 'numeric',
    hour: '2-digit',
    minute: '2-digit',
  });
}

/**
 * Bring the list up to date in place. Buttons are kept by conversation id rather than
 * rebuilt: replacing the button that has focus drops focus to <body> (a keyboard or
 * screen-reader user loses their place whenever another tab sends). A button that had
 * to move (its conversation became the newest) gets focus back.
 */
async function renderList() {
  const generation = ++listGeneration;
  const items = await conversations();
  if (generation !== listGeneration) return null; // a newer call has fresher data
  const current = client ? client.conversation : null;
  const active = document.activeElement;
  const buttons = [...el.list.querySelectorAll('button.conversation')];
  const focusedAt = buttons.indexOf(active);
  const focusedId = focusedAt >= 0 ? active.dataset.id : null;

  const existing = new Map(buttons.map((b) => [b.dataset.id, b.parentElement]));
  const wanted = items.map((c) => {
    const li = existing.get(c.id) || listItem(c.id);
    existing.delete(c.id);
    updateListItem(li, c, current);
    return li;
  });
  for (const li of existing.values()) li.remove(); // gone (deleted in another tab)
  // Move only what is out of place: a conversation that became the newest moves alone.
  wanted.forEach((li, i) => {
    const at = el.list.children[i];
    if (at !== li) el.list.insertBefore(li, at || null);
  });

  if (focusedId && document.activeElement !== active) {
    const same = el.list.querySelector(`button.conversation[data-id="${CSS.escape(focusedId)}"]`);
    const all = el.list.querySelectorAll('button.conversation');
    // Its conversation was deleted elsewhere: its neighbour, else "New chat".
    const target = same || all[Math.min(focusedAt, all.length - 1)] || el.newChat;
    target.focus({ preventScroll: true });
  }
  return items;
}

el.list.addEventListener('click', (event) => {
  const button = event.target.closest('button.conversation');
  if (button && !deleting) openConversation(button.dataset.id, { focus: true });
});

/** Show conversation ``id``. ``chosen``: the user opened it (a click, New chat), so it
 * becomes the most recent for a new tab; the page's own load (a reload) does not. */
async function openConversation(id, { focus = false, chosen = true } = {}) {
  if (client && client.conversation === id) {
    if (focus) el.input.focus();
    return;
  }
  for (const off of unsubscribe) off();
  if (client) client.close();
  client = createClient({ conversation: id, storage: 'local', headerName });
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
    if (chosen || !index.current) index.current = id;
    index.conversations[id] ||= { title: UNTITLED, updated: Date.now() };
  });
  try {
    sessionStorage.setItem(TAB_KEY, id);
  } catch {
    // storage blocked: a reload shows the most recent chat instead
  }
  notices.reset = null;
  notices.fork = null;
  notices.deleted = null;
  notices.elsewhere = null;
  notices.degraded = [];
  notices.loadDegraded = [];
  renderNotice();
  showError(null);
  showProblem(null);
  // A send of this chat that failed while another was open: its text and reason now.
  const failed = failedElsewhere.get(id);
  failedElsewhere.delete(id);
  if (failed) {
    showError(failed.error + putBack(failed.text));
    if (failed.shownBefore !== null) unsent = { conversation: id, text: failed.text, shownBefore: failed.shownBefore };
  }
  clearThread();
  // The title from the index now, so a load that fails still shows which chat this is.
  setTitle(titleOf(loadIndex().conversations[id]));
  await renderList();
  await refresh({ reportErrors: !failed }); // a failed load would replace the send's error
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
  if (!client || deleting) return;
  if (busy) {
    showProblem('A reply is still being written: stop it or wait for it, then delete the chat.');
    return;
  }
  const title = el.title.textContent;
  if (!window.confirm(`Delete “${title}” from this browser and from the server?`)) return;
  // The chat being deleted, whatever is opened meanwhile: everything below acts on it.
  const c = client;
  const id = c.conversation;
  deleting = true;
  // Disabling the button takes the focus off it: given back when the chat is kept,
  // so a keyboard or screen-reader user is where they were, not at the page's top.
  let keptFocus = false;
  el.deleteChat.disabled = true;
  el.deleteChat.textContent = 'Deleting…';
  el.send.disabled = true;
  try {
    failedElsewhere.delete(id);
    // Erase what the server keeps of it first (all of it in server mode, overflowed
    // turns in client mode), while the token is still here to say which it is.
    let notErased = null;
    if (c.token) {
      try {
        const response = await c.fetch(api.context, { method: 'DELETE' });
        await jsonOf(response);
      } catch (err) {
        notErased = err;
      }
    }
    if (notErased && (notErased.status === 409 || notErased.status === 503)) {
      // The server is there but cannot erase it right now (a stopped reply still
      // holds the conversation, the store is down): keep the chat, so deleting it
      // again can still reach the server's copy.
      showError(`“${title}” was not deleted: the server could not erase its copy right now (${notErased.message}). Try again in a moment.`);
      keptFocus = true;
      return;
    }
    await c.reset();
    updateIndex((index) => {
      delete index.conversations[id];
      if (index.current === id) index.current = null;
    });
    const rest = (await conversations()).filter((x) => x.id !== id);
    c.close();
    if (client === c) {
      client = null;
      if (rest.length) await openConversation(rest[0].id, { focus: true });
      else await newChat();
    } else {
      await renderList();
    }
    if (notErased) {
      notices.deleted = `“${title}” was deleted from this browser, but the server could not erase its copy (${notErased.message}): it expires there on its own.`;
      renderNotice();
    }
  } finally {
    deleting = false;
    el.deleteChat.disabled = false;
    el.deleteChat.textContent = 'Delete chat';
    el.send.disabled = busy;
    if (keptFocus && client === c) el.deleteChat.focus();
  }
}

/**
 * Another tab created, renamed or deleted a conversation. If the one shown here was
 * deleted, showing it on (as "Untitled chat") would bring it back with the next send:
 * move to the most recent conversation instead, and say why.
 */
let checkingDeleted = false;
async function onListChanged() {
  const listed = await renderList(); // null when a newer call took over
  if (!client || busy || deleting || checkingDeleted) return;
  checkingDeleted = true;
  try {
    const all = listed ?? (await conversations());
    const id = client.conversation;
    if (!client || client.conversation !== id || all.some((c) => c.id === id)) return;
    const next = mostRecent(loadIndex(), all);
    if (next) await openConversation(next);
    else {
      client.close();
      client = null;
      await newChat();
    }
    notices.deleted = 'The chat that was open here was deleted in another tab; this is your most recent chat.';
    renderNotice();
  } finally {
    checkingDeleted = false;
  }
}

/* ----------------------------------------------------------------- thread */

/** Fill `container` with `content`, character for character (its textContent stays
 * the message); fenced code (``` lines) is set in monospace, the rest as plain text. */
function renderText(container, content) {
  const lines = content.match(/[^\n]*\n|[^\n]+/g) || [];
  let plain = '';
  let code = null; // the <pre> of an open fence
  let codeText = null;
  const fence = (line) => {
    const span = document.createElement('span');
    span.className = 'msg-fence';
    span.textContent = line;
    return span;
  };
  for (const line of lines) {
    const isFence = /^ {0,3}```/.test(line);
    if (!code) {
      if (!isFence) {
        plain += line;
        continue;
      }
      if (plain) container.append(plain);
      plain = '';
      code = document.createElement('pre');
      code.className = 'msg-code';
      code.dir = 'ltr'; // code reads left to right, also in an Arabic or Hebrew message
      codeText = document.createElement('code');
      code.append(fence(line), codeText);
      container.append(code);
    } else if (isFence) {
      code.append(fence(line));
      code = null;
    } else {
      codeText.append(line);
    }
  }
  if (plain) container.append(plain);
}

function messageElement(role, content) {
  const item = document.createElement('div');
  item.className = `msg msg-${role}`;
  const who = document.createElement('p');
  who.className = 'msg-role';
  who.textContent = role === 'user' ? 'You' : role === 'assistant' ? 'Assistant' : role;
  const text = document.createElement('div');
  text.className = 'msg-text';
  text.dir = 'auto'; // Hebrew or Arabic reads right to left, whatever the page's direction
  renderText(text, content); // text nodes only, never innerHTML: model output is untrusted
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

// aria-busy on the log: while a reply streams, and while the log is rebuilt.
const threadBusy = new Set();
function setThreadBusy(reason, on) {
  if (on) threadBusy.add(reason);
  else threadBusy.delete(reason);
  el.thread.setAttribute('aria-busy', String(threadBusy.size > 0));
}

/**
 * Replace the whole log without a screen reader reading it all out (another
 * conversation, a reload, a history that diverged). aria-busy alone is honoured by
 * JAWS only, so the log is also aria-live="off" until the browser has processed the
 * change: the accessibility tree is updated with rendering, so "after the next frame"
 * (rAF, then a task) is when turning it back on no longer counts this change. A tab in
 * the background renders no frames, and stays quiet until shown: nobody is listening.
 */
let quietChanges = 0;
let quietScheduled = false;
function quietly(change) {
  el.thread.setAttribute('aria-live', 'off');
  setThreadBusy('rebuild', true);
  change();
  quietChanges += 1;
  if (!quietScheduled) scheduleLoud();
}

function scheduleLoud() {
  quietScheduled = true;
  requestAnimationFrame(() => {
    const seen = quietChanges; // the frame after this callback includes these changes
    setTimeout(() => {
      if (quietChanges !== seen) return scheduleLoud(); // changed since: wait a frame more
      quietScheduled = false;
      el.thread.setAttribute('aria-live', 'polite');
      setThreadBusy('rebuild', false);
    });
  });
}

function clearThread() {
  rendered = null;
  quietly(() => el.thread.replaceChildren());
}

function renderThread(turns) {
  const shown = turns
    .filter((t) => t.role === 'user' || t.role === 'assistant')
    .map((t) => ({ role: t.role, content: t.content }));
  const prefix =
    rendered &&
    rendered.length <= shown.length &&
    rendered.every((r, i) => r.role === shown[i].role && r.content === shown[i].content);
  if (prefix) {
    // The same history, maybe longer (another tab sent): append only the new turns,
    // so the log announces those and nothing it said before.
    const added = shown.slice(rendered.length);
    rendered = shown;
    if (!added.length) {
      if (!shown.length && !el.empty.isConnected) el.thread.replaceChildren(el.empty);
      return;
    }
    if (el.empty.isConnected) el.empty.remove();
    el.thread.append(...added.map((t) => messageElement(t.role, t.content)));
  } else {
    quietly(() =>
      el.thread.replaceChildren(
        ...(shown.length ? shown.map((t) => messageElement(t.role, t.content)) : [el.empty]),
      ),
    );
    rendered = shown;
  }
  scrollToEnd();
}

function appendMessage(item) {
  if (el.empty.isConnected) el.empty.remove();
  el.thread.append(item);
  scrollToEnd();
  return item;
}

/* ---------------------------------------------------------------- composer */

const number = new Intl.NumberFormat();

// Code points, as the server counts them (Python's len), not UTF-16 units: an emoji is one.
const charCount = (text) => [...text].length;
const charactersOver = (n) => `${number.format(n)} character${n === 1 ? '' : 's'} over`;

function updateCounter() {
  const n = charCount(el.input.value);
  const over = n - MAX_CHARS;
  el.count.textContent =
    over > 0
      ? `${number.format(n)} of ${number.format(MAX_CHARS)} characters: ${number.format(over)} too many`
      : `${number.format(n)} of ${number.format(MAX_CHARS)} characters`;
  el.count.classList.toggle('over', over > 0);
  if (over > 0) el.input.setAttribute('aria-invalid', 'true');
  else el.input.removeAttribute('aria-invalid');
  return over;
}

/** Said under the box when Enter is pressed while this tab's reply is written. */
const WAIT_FOR_REPLY =
  'A reply is still being written: this message stays here. Send it when the reply is done, or press Stop (the next Tab) to end the reply.';

/** An inline message under the box (polite live region) about what was typed. */
function showProblem(message) {
  if (el.problem.textContent !== (message || '')) el.problem.textContent = message || '';
}

el.input.addEventListener('input', (event) => {
  const over = updateCounter();
  if (over > 0 && (event.inputType === 'insertFromPaste' || event.inputType === 'insertFromDrop')) {
    showProblem(
      `The message is now ${charactersOver(over)} the ${number.format(MAX_CHARS)}-character limit. Shorten it to send it.`,
    );
  } else if (over <= 0 && el.problem.textContent) {
    showProblem(null); // what it said no longer applies
  }
});

// Only when the composer is on screen now, keep it there after the thread grows (on a
// narrow screen the page scrolls, and a growing thread pushes the box off the bottom).
function composerVisible() {
  const r = el.input.getBoundingClientRect();
  return r.bottom > 0 && r.top < window.innerHeight;
}

function revealComposer() {
  el.form.scrollIntoView({ block: 'nearest' });
}

/* ----------------------------------------------------------------- status */

const DEGRADED_TEXT = {
  tier_unavailable: 'The overflow store is unreachable: older turns cannot be shown right now (the summary stands in for them).',
  tier_write_failed: 'The overflow store is unreachable: new turns are kept in the token for now, so it is larger than usual.',
  segment_missing: 'Some older turns have expired from the overflow store; their summary remains.',
  segment_corrupt: 'Some older turns in the overflow store were damaged and are not shown.',
  segment_foreign: 'Some older turns in the overflow store belong to another session and are not shown.',
  data_loss: 'Some older turns could not be kept anywhere; only their summary remains.',
  // SATCHEL_CONSISTENCY=monotonic (docs/consistency.md)
  consistency_unchecked:
    "The server's store is unreachable, so it could not check that this is the chat's newest version; the reply was given anyway.",
  consistency_reset:
    "The server's store had lost its record of which version of this chat is the newest (a restart or an eviction), so this one could not be checked; it goes on from here.",
  summarizer_failed:
    'The summarizer failed, so earlier turns were summarized by a simpler built-in one.',
  token_counter_failed:
    'The token counter failed, so some text was counted by an estimate; the context may be trimmed a little early or late.',
};

function describeDegraded(reason) {
  // The code itself is shown next to the text: an unknown one gets a plain sentence.
  return DEGRADED_TEXT[reason] || 'The server answered in a degraded mode.';
}

let noticeShown = '';
/**
 * #notice is a live region that is always rendered (an empty one takes no room): one
 * shown from display:none may not be announced. Identical updates are skipped, so a
 * notice that stays true over several turns is announced once, not at every send.
 */
function renderNotice() {
  const parts = [];
  if (notices.reset) parts.push(['reset', notices.reset]);
  if (notices.fork) parts.push(['fork', notices.fork]);
  if (notices.deleted) parts.push(['deleted', notices.deleted]);
  if (notices.elsewhere) parts.push(['elsewhere', notices.elsewhere]);
  const reasons = [...new Set([...notices.degraded, ...notices.loadDegraded])];
  for (const r of reasons) parts.push(['degraded', describeDegraded(r), r]);
  const storage = client && client.storage;
  const volatile =
    storage && (storage.isVolatile ? storage.isVolatile(client.storageKey) : storage.volatile);
  // A store this page could neither read nor write when it opened the chat: the chat
  // goes on in memory, and the saved one is kept for a reload (client-js.md).
  const blind = !!(storage && storage.isBlind && storage.isBlind(client.storageKey));
  if (storage && (volatile || blind || storage.fallbackFrom)) {
    parts.push([
      'storage',
      storage.fallbackFrom
        ? "This browser does not let the page keep chats: they last until the page is closed."
        : blind
          ? "This browser's storage could not be read: this chat lasts until the page is closed (a saved chat is kept; reload to see it)."
          : "This browser's storage is full: this chat's newest messages last until the page is closed.",
    ]);
  }
  const key = JSON.stringify(parts);
  if (key === noticeShown) return;
  noticeShown = key;
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
  const lost = data.lost_turns || 0;
  const reasons = new Set([...notices.degraded, ...(data.degraded || [])]);
  const notes = [];
  if (missing) {
    // Why says whether they may come back: the store unreachable (they may), or the
    // copies gone or damaged (the notice above says which; the summary keeps them).
    const gone = ['segment_missing', 'segment_corrupt', 'segment_foreign'].some((r) => reasons.has(r));
    const turns = `${missing} earlier turn${missing === 1 ? '' : 's'}`;
    notes.push(gone
      ? `${turns} could not be loaded from the overflow store: only the running summary has them.`
      : `${turns} could not be loaded from the overflow store right now.`);
  }
  if (summarized) notes.push(`${summarized} earlier turn${summarized === 1 ? ' was' : 's were'} folded into the running summary.`);
  // Not routine: said on every view of the chat, not only with the reply that lost them.
  if (lost) notes.push(`${lost} turn${lost === 1 ? ' was' : 's were'} lost while the overflow store could not take ${lost === 1 ? 'it' : 'them'}: only the running summary has ${lost === 1 ? 'it' : 'them'}.`);
  // Over the soft budget is normal on its own (one huge exchange must stay in the
  // token), so it is only news when the tier refused the turns that should have left:
  // then they stay in the token up to the hard cap. Said by this page's responses, or,
  // after a reload (which knows none of them), by the token itself: over the budget
  // with turns older than its newest exchange still in it, which a save moves to a
  // tier that takes them.
  const all = data.turns || [];
  const held = all.slice(all.length - Math.min(all.length, data.held_turns ?? all.length));
  const newestExchange = held.map((t) => t.role).lastIndexOf('user');
  const olderHeld = data.overflow_tier && newestExchange > 0;
  const refused = reasons.has('tier_write_failed') || reasons.has('data_loss') || olderHeld;
  if (refused && data.max_token_bytes && data.token_bytes > data.max_token_bytes) {
    notes.push('The token is over its soft budget because the overflow store could not take its oldest turns; they stay in the token (up to the hard cap) until it can.');
  }
  el.threadNote.textContent = notes.join(' ');
  el.threadNote.hidden = notes.length === 0;
}

// #error stays rendered too (empty takes no room), for the same reason as #notice.
function showError(message) {
  loadErrorShown = false; // set again by refresh() when a load's failure is shown
  if (el.error.textContent !== (message || '')) el.error.textContent = message || '';
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
  notices.fork =
    'This tab holds an older version of this chat than the server last issued (another tab ' +
    'sent at the same time, or a reply did not arrive); your next message continues from ' +
    'what is shown.';
  renderNotice();
  // A fork reported by loading the chat is not fixed by loading it again: the load
  // issues no token, so the same fork comes back, and refreshing on it would loop.
  if (!contextLoads) scheduleRefresh();
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

/** A successful response's JSON body. A page that is not JSON (a captive portal's or a
 * proxy's sign-in page, answered 200) gets a reason a reader understands, not the
 * parser's "Unexpected token '<'". */
async function jsonOf(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    const type = (response.headers.get('content-type') || 'no type').split(';')[0];
    throw new Error(
      `the server answered with a page that is not the chat (${type}): a proxy or sign-in page may be in the way`,
    );
  }
}

/** Load the conversation from the server (through the client, so the token goes along).
 * `reportErrors: false` after a failed send: its "not sent" error is the one that
 * matters, and a load failing for the same reason (server down) would replace it. */
async function refresh({ reportErrors = true } = {}) {
  if (!client) return;
  const generation = ++refreshGeneration;
  const current = client;
  if (!busy) setState('loading');
  contextLoads += 1;
  try {
    let response;
    try {
      response = await current.fetch(api.context, { headers: { accept: 'application/json' } });
    } finally {
      contextLoads -= 1;
    }
    const data = await jsonOf(response);
    // While this tab sends, the send's own reload renders its chat when it is done;
    // another chat opened meanwhile is rendered now.
    if (generation !== refreshGeneration || current !== client) return;
    if (busy && sendingWith === current) return;
    renderThread(data.all_turns || []);
    noticeIfSavedAnyway();
    renderStatus(data);
    notices.loadDegraded = data.degraded || [];
    renderNotice();
    const firstUser = (data.all_turns || []).find((t) => t.role === 'user');
    const entry = loadIndex().conversations[current.conversation];
    if (firstUser && titleOf(entry) === UNTITLED) {
      touch(current.conversation, { title: titleFrom(firstUser.content) });
      renderList();
    }
    setTitle(titleOf(loadIndex().conversations[current.conversation]));
    if (loadFailed) {
      loadFailed = false;
      if (loadErrorShown) showError(null); // what the failed load said no longer holds
    }
  } catch (err) {
    if (generation === refreshGeneration) loadFailed = true;
    if (generation === refreshGeneration && reportErrors) {
      const stuck = err && err.code === 'stale_context' && err.recoverable === false;
      showError(
        stuck
          ? 'This chat went on in a reply that never reached this page, so it cannot continue here: start a new chat.'
          : `Could not load this chat: ${err.message}`,
      );
      loadErrorShown = true;
      if (stuck && current === client) {
        renderThread([]);
        setTitle(titleOf(loadIndex().conversations[current.conversation]));
      }
    }
  } finally {
    if (generation === refreshGeneration && !busy) setState('idle');
  }
}

/* ------------------------------------------------------------------ send */

async function send(text) {
  busy = true;
  sendingWith = client;
  setState('sending');
  showError(null);
  showProblem(null);
  // One-off notes about what happened before are done with. Degraded reasons stay
  // until a reply says otherwise: clearing them here only to redraw the same ones
  // made the notice flicker and be announced again at every turn.
  notices.reset = null;
  notices.fork = null;
  notices.deleted = null;
  notices.elsewhere = null;
  renderNotice();
  // While the reply streams, the button stops it: a server or model that stalls must
  // not hold this page (and every other tab of the chat, waiting on its lock) for good.
  const controller = new AbortController();
  stopCurrent = () => controller.abort();
  // Disabling Send takes the focus off it when it was pressed (a keyboard user's
  // Space, a click): the focus goes to Stop, the one thing to press now, not to the
  // page's top.
  const sendHadFocus = document.activeElement === el.send;
  el.send.disabled = true;
  el.send.textContent = 'Sending…';
  el.stop.hidden = false;
  if (sendHadFocus) el.stop.focus();
  el.input.value = '';
  updateCounter();

  const sentWith = client;
  const id = sentWith.conversation;
  // This chat is open: the same client, or a new one for it (reopened after another
  // chat was shown meanwhile). Only the same client still shows this send's bubbles.
  const shown = () => client !== null && client.conversation === id;
  const entry = loadIndex().conversations[id];
  const titled = titleOf(entry) !== UNTITLED;
  const title = titled ? titleOf(entry) : titleFrom(text);
  const shownBefore = rendered ? JSON.stringify(rendered) : null;
  unsent = null; // a new send: an older failure's text is no longer in the box
  touch(id, { title, updated: Date.now() }, { used: true });
  setTitle(title);
  renderList();

  const keepComposer = composerVisible();
  const mine = appendMessage(messageElement('user', text));
  const tracked = !!rendered; // null: the next refresh rebuilds the thread anyway
  if (tracked) rendered.push({ role: 'user', content: text });
  // The reply streams into a copy hidden from assistive technology: rewriting text
  // inside the log dozens of times would be read out piece by piece (aria-busy, also
  // set, is honoured by JAWS only). The finished reply is added to the log once.
  const draft = messageElement('assistant', '');
  draft.classList.add('pending');
  draft.setAttribute('aria-hidden', 'true');
  const draftText = draft.querySelector('.msg-text');
  appendMessage(draft);
  setThreadBusy('stream', true);
  if (keepComposer) revealComposer();

  let full = '';
  let failed = false;
  try {
    const stream = client.stream(api.stream, { message: text }, { signal: controller.signal });
    for await (const piece of stream) {
      const follow = nearBottom();
      const keep = composerVisible();
      full += piece;
      draftText.textContent = full;
      if (follow) scrollToEnd();
      if (keep) revealComposer();
    }
    const result = await stream.result;
    if (client === sentWith) {
      // This reply's own report replaces what earlier turns said (a tier back up).
      notices.degraded = (result && result.degraded) || [];
      if (full) {
        draft.replaceWith(messageElement('assistant', full));
        if (rendered) rendered.push({ role: 'assistant', content: full });
      } else {
        draft.remove(); // an empty reply is not kept by the server either
      }
    }
  } catch (err) {
    failed = true;
    // Nothing of this exchange is in the conversation: take it off the page and put
    // the text back, rather than leave a "No reply." bubble next to a message that
    // is also back in the box.
    draft.remove();
    mine.remove();
    if (client === sentWith && tracked && rendered) rendered.pop();
    if (shown() && !el.thread.querySelector('.msg')) el.thread.replaceChildren(el.empty);
    const reason = failureReason(err, controller.signal.aborted, full);
    // Monotonic consistency, a reply lost on the way, and a server that keeps no newest
    // token to hand back (SATCHEL_KEEP_NEWEST=false; docs/client-js.md, "Lost
    // responses"): this chat's token is refused for good. Say so, and how to go on.
    const stuck = err && err.code === 'stale_context' && err.recoverable === false;
    const next = stuck
      ? ' This chat went on in a reply that never reached this page, so it cannot continue here: start a new chat.'
      : '';
    // A reason may end a sentence of its own (an error's message): no second period.
    const sentence = /[.!?]$/.test(reason) ? reason : `${reason}.`;
    const error = `The message was not sent: ${sentence}${next}`;
    if (shown()) {
      showError(error + putBack(text));
      if (shownBefore !== null && client === sentWith) unsent = { conversation: id, text, shownBefore };
    } else {
      // Another chat is open now: the text waits for its own chat (openConversation
      // puts it back), and this one only says where it is.
      failedElsewhere.set(id, { text, error, shownBefore });
      notices.elsewhere = `Your message in “${titled ? title : UNTITLED}” was not sent; it will be back in the message box when you open that chat.`;
    }
    // A first message that failed does not name the chat (the title is its first
    // message, and only an untitled chat gets one later).
    if (!titled) {
      touch(id, { title: UNTITLED });
      if (shown()) setTitle(UNTITLED);
      renderList();
    }
  } finally {
    setThreadBusy('stream', false);
    stopCurrent = null;
    el.stop.hidden = true;
    el.send.disabled = false;
    el.send.textContent = 'Send';
    busy = false;
    sendingWith = null;
    refreshWanted = false;
    if (el.problem.textContent === WAIT_FOR_REPLY) showProblem('');
    el.input.focus();
    revealComposer();
    // Counts, summary, and anything another tab added meanwhile. After a failure it
    // still reconciles with the server if it is up, but keeps the "not sent" error.
    await refresh({ reportErrors: !failed }); // checks `unsent` when it renders
    renderNotice();
  }
}

/**
 * Put a failed message's text back in the box, and say where it is (the end of the
 * "not sent" error). A draft typed meanwhile (during the reply) stays, below it after
 * a blank line: neither is lost.
 */
function putBack(text) {
  const draft = el.input.value;
  const both = draft && draft !== text;
  el.input.value = both ? `${text}\n\n${draft}` : text;
  updateCounter();
  return both ? ' It is back in the message box, above what you typed since.' : ' It is back in the message box.';
}

/** Why a send failed, in words for the "not sent" error. */
function failureReason(err, stopped, streamed) {
  if (stopped) {
    return streamed ? 'you stopped the reply before it finished' : 'you stopped it before the reply started';
  }
  // Satchel's codes are strings; a DOMException's numeric legacy code (18 for a
  // SecurityError) means nothing to a reader.
  const code = err && typeof err.code === 'string' ? err.code : null;
  if (code === 'context_busy') {
    // The client waited up to 3 s already: a model pausing longer between words, or
    // another tab's reply, still holds the chat.
    return 'an earlier reply in this chat (perhaps the one just stopped) was still being finished on the server; send it again in a moment (a reply whose server stopped mid-way holds the chat for up to 2 minutes)';
  }
  if (code === 'stale_context' && err.recovered === true) {
    // Monotonic consistency: a reply that never fully reached this page (a Stop at its
    // very end, a dropped connection) had already moved the chat on; the server handed
    // that newer state back with this refusal, and the reload after this shows it.
    return 'this chat had gone on in a reply that did not fully reach this page (it is shown now)';
  }
  if (code) return `${err.message} (${code})`;
  return (err && err.message) || String(err);
}

/** How many times each user message occurs in a history. */
function userCounts(turns) {
  const counts = new Map();
  for (const t of turns) if (t.role === 'user') counts.set(t.content, (counts.get(t.content) || 0) + 1);
  return counts;
}

/**
 * After a failed send, a later load of the chat may hold the message after all: the
 * server saved it and only the reply's way back failed (server mode keeps the
 * conversation server-side; under monotonic consistency the server hands the newest
 * token back). Any load counts, not only the one right after the failure: another
 * tab's token, coming back online, or a second load that replaced the first may be
 * the one that shows it. Sending it again would store it twice: say so, and take it
 * out of the box.
 */
function noticeIfSavedAnyway() {
  if (!unsent || !client || client.conversation !== unsent.conversation || !rendered) return;
  const { text, shownBefore } = unsent;
  if (JSON.stringify(rendered) === shownBefore) return; // nothing new
  // One more of it than before (another tab's messages may have come after it), or,
  // with a full turn window that dropped the older copy, the newest message is it.
  const users = rendered.filter((t) => t.role === 'user');
  const before = userCounts(JSON.parse(shownBefore)).get(text) || 0;
  const more = (userCounts(rendered).get(text) || 0) > before;
  const newest = users.length > 0 && users[users.length - 1].content === text;
  if (!more && !newest) return;
  unsent = null;
  const box = el.input.value;
  if (box === text || box.startsWith(`${text}\n\n`)) {
    el.input.value = box.slice(text.length + 2); // a draft typed after it stays
    updateCounter();
  }
  showError(null);
  notices.fork = 'The reply to your last message was interrupted on its way, but the message itself was saved: it is in the chat above.';
  renderNotice();
}

let checkingUnsent = false; // a load before resending a failed message is in flight

el.form.addEventListener('submit', async (event) => {
  event.preventDefault();
  if (busy || deleting || !client || checkingUnsent) return;
  // Sent as typed: the server keeps messages exactly, so pasted code keeps its
  // indentation. trim() only decides whether there is anything to send.
  const text = el.input.value;
  if (!text.trim()) {
    showProblem('Nothing to send: type a message first.');
    el.input.focus();
    return;
  }
  const over = updateCounter();
  if (over > 0) {
    showProblem(
      `Not sent: the message is ${charactersOver(over)} the ${number.format(MAX_CHARS)}-character limit.`,
    );
    el.input.focus();
    return;
  }
  const resending =
    unsent !== null &&
    unsent.conversation === client.conversation &&
    (text === unsent.text || text.startsWith(`${unsent.text}\n\n`));
  if (resending && loadFailed) {
    // The message whose send failed in a way that may have saved it, and the load
    // meant to tell failed too (the store stalled: no 'online' event comes to load
    // again). Load now, before sending: sent blind, a message the server had kept was
    // stored twice. Twice if need be: a monotonic refusal of the first hands the
    // newest token back, with which the second succeeds.
    const checking = client;
    checkingUnsent = true;
    try {
      await refresh({ reportErrors: false });
      if (loadFailed && client === checking) await refresh();
    } finally {
      checkingUnsent = false;
    }
    // Another chat opened meanwhile (New chat, the list, a delete): the text belongs
    // to the one it was typed in, and Enter was not pressed in this one. Still
    // unknown (the load failed again and said so), or saved after all (the notice
    // says so and the box no longer holds it): nothing is sent either.
    if (client !== checking || loadFailed || el.input.value !== text) return;
  }
  send(text);
});

// A load that failed while offline said so; back online, load again (and clear it).
globalThis.addEventListener('online', () => {
  if (loadFailed && !busy) refresh();
});

el.stop.addEventListener('click', () => {
  if (stopCurrent) stopCurrent();
});

el.input.addEventListener('keydown', (event) => {
  if (event.key !== 'Enter' || event.shiftKey || event.isComposing || event.keyCode === 229) return;
  event.preventDefault(); // Enter sends; Shift+Enter keeps its newline
  if (!busy) {
    el.form.requestSubmit();
  } else {
    // Said, not silently ignored: the hint promises that Enter sends. The text stays in
    // the box; the note goes when this reply is done.
    showProblem(WAIT_FOR_REPLY);
  }
});

// Nothing has focus (as after loading: see start()) and a character is typed: it goes
// into the message box, so nobody has to click it first. Screen readers in browse mode
// keep their single-letter keys, since those never reach the page.
document.addEventListener('keydown', (event) => {
  const idle = !document.activeElement || document.activeElement === document.body;
  if (!idle || event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
  // Space is left alone: with nothing focused it scrolls the page.
  if (event.key.length !== 1 || event.key === ' ' || event.isComposing) return;
  el.input.focus(); // the key's character is then typed into the newly focused box
});

el.newChat.addEventListener('click', () => {
  if (!deleting) newChat();
});
el.deleteChat.addEventListener('click', () => deleteChat());

// Another tab created, renamed or deleted a conversation: redraw the list.
window.addEventListener('storage', (event) => {
  if (event.key === INDEX_KEY || event.key === null || (event.key || '').startsWith('satchel:')) onListChanged();
});

/* ------------------------------------------------------------------ start */

async function start() {
  updateCounter();
  const all = await conversations();
  const id = mostRecent(loadIndex(), all) || newId();
  // No focus on load: it would take screen-reader users past the heading and the
  // list, and open the keyboard over the page on a phone. The skip link is the first
  // Tab stop, and typing with nothing focused goes to the box (above).
  await openConversation(id, { chosen: false });
}

start();
