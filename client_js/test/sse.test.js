import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SSEParser, parseSSE } from '../src/satchel.js';
import { streamOf } from '../test-support/fakes.js';

const enc = new TextEncoder();

function parseChunks(chunks) {
  const p = new SSEParser();
  const out = [];
  for (const c of chunks) out.push(...p.feed(c));
  out.push(...p.end());
  return out.map(({ event, data }) => ({ event, data }));
}

// A stream exercising every awkward corner at once: BOM, comments, CRLF / CR /
// LF endings, multi-line data, a field without colon, no space after colon,
// empty data, multi-byte UTF-8 (2, 3 and 4 bytes), unknown fields, id/retry.
const TRICKY =
  '\uFEFF: hello comment\r\n' +
  'event: delta\r\n' +
  'data: {"text": "héllo ✓ 🎉"}\r\n' +
  '\r\n' +
  'event: delta\r' +
  'data:line one\r' +
  'data: line two\r' +
  'data\r' +
  '\r' +
  'id: 42\n' +
  'retry: 1500\n' +
  'unknown: field\n' +
  'event: satchel\n' +
  'data: {"token":"t.1","seq":7}\n' +
  '\n' +
  ':keepalive\n' +
  '\n' +
  'event: empty\n' +
  'data:\n' +
  '\n' +
  'event: nodata\n' +
  '\n' +
  'event: done\n' +
  'data: {}\n' +
  '\n' +
  'event: partial\n' +
  'data: never terminated';

const EXPECTED = [
  { event: 'delta', data: '{"text": "héllo ✓ 🎉"}' },
  { event: 'delta', data: 'line one\nline two\n' },
  { event: 'satchel', data: '{"token":"t.1","seq":7}' },
  { event: 'empty', data: '' },
  { event: 'done', data: '{}' },
];

test('SSE: parses the tricky stream in one chunk', () => {
  assert.deepEqual(parseChunks([enc.encode(TRICKY)]), EXPECTED);
});

test('SSE: same events when the bytes are split at every position (2 chunks)', () => {
  const bytes = enc.encode(TRICKY);
  for (let i = 0; i <= bytes.length; i++) {
    const got = parseChunks([bytes.slice(0, i), bytes.slice(i)]);
    assert.deepEqual(got, EXPECTED, `split at byte ${i}`);
  }
});

test('SSE: same events when split at every pair of positions (3 chunks)', () => {
  // Exhaustive over a shorter stream: keeps the test well under a second.
  const text = 'event: a\r\ndata: é\r\ndata: ✓\r\r\n:c\r\nevent: b\rdata: 🎉\r\r';
  const expected = [
    { event: 'a', data: 'é\n✓' },
    { event: 'b', data: '🎉' },
  ];
  const bytes = enc.encode(text);
  for (let i = 0; i <= bytes.length; i++) {
    for (let j = i; j <= bytes.length; j++) {
      const got = parseChunks([bytes.slice(0, i), bytes.slice(i, j), bytes.slice(j)]);
      assert.deepEqual(got, expected, `split at ${i},${j}`);
    }
  }
});

test('SSE: one byte at a time', () => {
  const bytes = enc.encode(TRICKY);
  const chunks = [...bytes].map((b) => Uint8Array.of(b));
  assert.deepEqual(parseChunks(chunks), EXPECTED);
});

test('SSE: CR at a chunk end followed by LF is one line break, not two', () => {
  // If "\r" + "\n" were two breaks, the blank line would dispatch "a" early
  // and the following data line would start a new event.
  const got = parseChunks(['data: a\r', '\ndata: b\n\n']);
  assert.deepEqual(got, [{ event: 'message', data: 'a\nb' }]);
});

test('SSE: string chunks, default event type, id and retry tracking', () => {
  const p = new SSEParser();
  const evs = p.feed('id: 9\nretry: 300\ndata: x\n\n');
  assert.deepEqual(evs, [{ event: 'message', data: 'x', id: '9' }]);
  assert.equal(p.retry, 300);
});

test('parseSSE: iterates a ReadableStream and cancels it on early exit', async () => {
  let cancelled = false;
  const body = new ReadableStream({
    start(c) {
      c.enqueue(enc.encode('data: 1\n\ndata: 2\n\n'));
    },
    cancel() {
      cancelled = true;
    },
  });
  for await (const ev of parseSSE(body)) {
    assert.equal(ev.data, '1');
    break;
  }
  assert.equal(cancelled, true);
});

test('parseSSE: accepts async iterables of chunks', async () => {
  async function* chunks() {
    yield 'data: a\n';
    yield enc.encode('\n');
  }
  const got = [];
  for await (const ev of parseSSE(chunks())) got.push(ev.data);
  assert.deepEqual(got, ['a']);
  const fromStream = [];
  for await (const ev of parseSSE(streamOf(['data: b\n\n']))) fromStream.push(ev.data);
  assert.deepEqual(fromStream, ['b']);
});

test('only one leading BOM is stripped, from bytes as from a string', () => {
  // WHATWG: one BOM at the very start is ignored; a second belongs to the first
  // line's field name ("\uFEFFdata"), an unknown field, so no event is dispatched.
  const text = '\uFEFF\uFEFFdata: x\n\ndata: y\n\n';
  const expected = [{ event: 'message', data: 'y' }];
  assert.deepEqual(parseChunks([text]), expected);
  assert.deepEqual(parseChunks([enc.encode(text)]), expected);
  const bytes = enc.encode(text);
  assert.deepEqual(parseChunks([bytes.slice(0, 2), bytes.slice(2, 4), bytes.slice(4)]), expected);
  assert.deepEqual(parseChunks([enc.encode('\uFEFFdata: x\n\n')]), [{ event: 'message', data: 'x' }]);
});
