import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { createClient } from '../src/satchel.js';
import { channelHub, fakeFetch, flush, reply } from '../test-support/fakes.js';

class FakeWebStorage {
  constructor() { this.map = new Map(); }
  get length() { return this.map.size; }
  key(i) { return [...this.map.keys()][i] ?? null; }
  getItem(k) { return this.map.has(k) ? this.map.get(k) : null; }
  setItem(k, v) { this.map.set(k, String(v)); }
  removeItem(k) { this.map.delete(k); }
}
function installGlobal(name, value) {
  Object.defineProperty(globalThis, name, { configurable: true, enumerable: true, ...value });
}
afterEach(() => { delete globalThis.localStorage; });
const broken = () => { throw new DOMException('NS_ERROR_FILE_CORRUPTED', 'UnknownError'); };

async function blindPage(conv) {
  const area = new FakeWebStorage();
  installGlobal('localStorage', { value: area });
  const fetch = fakeFetch((c, i) => reply({ satchel: { token: `t${i + 1}`, seq: i + 1 } }));
  const client = createClient({ fetch, conversation: conv, broadcast: false, locks: false });
  await client.importToken('SAVED', { seq: 40 });
  const { getItem, setItem } = area;
  area.getItem = broken; area.setItem = broken;
  await client.fetch('/x', { method: 'POST', body: 'hi' }); // fresh, in memory
  area.getItem = getItem; area.setItem = setItem; // store back
  return { area, fetch, client };
}

test('an unusable store: a second client of the key (switching back) does not write over the saved conversation', async () => {
  const { area, fetch } = await blindPage('b1');
  // the chat example makes a new client per conversation switch: createClient({conversation, storage:'local'})
  const again = createClient({ fetch, conversation: 'b1', broadcast: false, locks: false });
  assert.equal(again.token, 't1'); // it sees the page's in-memory conversation
  await again.fetch('/x', { method: 'POST', body: 'next' });
  assert.equal(JSON.parse(area.getItem('satchel:b1')).token, 'SAVED', 'saved conversation overwritten');
});

test('an unusable store: reset() from a second client does not remove the saved conversation', async () => {
  const { area, fetch } = await blindPage('b2');
  const again = createClient({ fetch, conversation: 'b2', broadcast: false, locks: false });
  await again.reset();
  assert.equal(JSON.parse(area.getItem('satchel:b2')).token, 'SAVED', 'saved conversation removed');
});

const shared = new Map();
class View { // one tab's view of the shared localStorage
  constructor() { this.broken = false; }
  get length() { return shared.size; }
  key(i) { return [...shared.keys()][i] ?? null; }
  getItem(k) { if (this.broken) throw new DOMException('x', 'UnknownError'); return shared.has(k) ? shared.get(k) : null; }
  setItem(k, v) { if (this.broken) throw new DOMException('x', 'UnknownError'); shared.set(k, String(v)); }
  removeItem(k) { if (this.broken) throw new DOMException('x', 'UnknownError'); shared.delete(k); }
}
const tab = async (name, view) => {
  const mod = await import(`../src/satchel.js?${name}`);
  Object.defineProperty(globalThis, 'localStorage', { configurable: true, value: view });
  return mod;
};

test('a tab that went on alone while its store was unusable shows and exports its own conversation, not another tab\'s', async () => {
  const hub = channelHub();
  let n = 0;
  const fetch = fakeFetch((c) => { n++; return reply({ satchel: { token: `t${n}`, seq: 100 + n, session: 'S' + n } }); });
  const va = new View(), vb = new View();
  const A = await tab('A', va);
  const a = A.createClient({ fetch, conversation: 'c', broadcast: hub.FakeChannel, locks: false });
  const B = await tab('B', vb);
  const b = B.createClient({ fetch, conversation: 'c', broadcast: hub.FakeChannel, locks: false });
  await b.importToken('SAVED', { seq: 40, session: 'old' });
  va.broken = true;
  await a.fetch('/x', { method: 'POST' }); // A: fresh, in memory
  va.broken = false; // store back for A too
  await b.fetch('/x', { method: 'POST' }); // B carries on the saved conversation, broadcasts
  await flush();
  const shown = a.exportToken();
  await a.fetch('/x', { method: 'POST' });
  assert.equal(shown, fetch.calls.at(-1).token, 'exportToken()/token showed another tab\'s conversation');
});
