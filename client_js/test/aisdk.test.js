import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ServiceUnavailableError, messageText, satchelAISDK } from '../src/satchel.js';
import { deferred, errorReply, fakeFetch, flush, record, reply, sse, sseReply, testClient } from '../test-support/fakes.js';

const uiMessages = [
  { id: 'm1', role: 'user', parts: [{ type: 'text', text: 'first question' }] },
  { id: 'm2', role: 'assistant', parts: [{ type: 'text', text: 'an answer' }] },
  {
    id: 'm3',
    role: 'user',
    parts: [
      { type: 'text', text: 'follow ' },
      { type: 'file', url: 'data:,x', mediaType: 'text/plain' },
      { type: 'text', text: 'up' },
    ],
  },
];

// What HttpChatTransport.sendMessages does with our adapter (AI SDK 5/6):
// call prepareSendMessagesRequest, then fetch(api, {method, headers, body}).
async function sendLikeTransport(adapter, { api = '/api/chat', id = 'chat-1', messages = uiMessages, headers = {}, body = {} } = {}) {
  const prepared = await adapter.prepareSendMessagesRequest({
    api,
    id,
    messages,
    body,
    headers,
    credentials: undefined,
    requestMetadata: undefined,
    trigger: 'submit-message',
    messageId: undefined,
  });
  const res = await adapter.fetch(prepared.api ?? api, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...prepared.headers },
    body: JSON.stringify(prepared.body),
  });
  return { prepared, res };
}

/** An AI SDK UI message stream carrying Satchel metadata as a transient data part. */
function uiStream(meta) {
  return [
    'data: {"type":"start","messageId":"a1"}\n\n',
    'data: {"type":"text-start","id":"t1"}\n\n',
    'data: {"type":"text-delta","id":"t1","delta":"Hi"}\n\n',
    'data: {"type":"text-end","id":"t1"}\n\n',
    `data: ${JSON.stringify({ type: 'data-satchel', data: meta, transient: true })}\n\n`,
    'data: {"type":"finish"}\n\n',
    'data: [DONE]\n\n',
  ].join('');
}

test('prepareSendMessagesRequest: only the newest message, chat id, token header, caller headers kept', async () => {
  const client = testClient({ conversation: 'ai-empty' });
  await client.importToken('tok-1');
  const adapter = satchelAISDK(client);
  const out = adapter.prepareSendMessagesRequest({
    id: 'chat-9',
    messages: uiMessages,
    body: { model: 'small' },
    headers: { Authorization: 'Bearer x', 'satchel-context': 'stale-from-elsewhere' },
    api: '/api/chat',
    trigger: 'submit-message',
  });
  assert.deepEqual(out, {
    body: { model: 'small', message: 'follow up', userMessageId: 'm3', id: 'chat-9', trigger: 'submit-message', messageId: undefined },
    headers: { Authorization: 'Bearer x', 'Satchel-Context': 'tok-1' },
  });
  assert.equal(typeof adapter.fetch, 'function');
});

test('prepareSendMessagesRequest: no token -> no header; v4-style content; Headers input', () => {
  const adapter = satchelAISDK(testClient({ conversation: 'ai-v4' }));
  const out = adapter.prepareSendMessagesRequest({
    id: 'c',
    messages: [{ role: 'user', content: 'plain v4 text' }],
    headers: new Headers({ 'X-A': '1' }),
  });
  assert.deepEqual(out, {
    body: { message: 'plain v4 text', userMessageId: undefined, id: 'c', trigger: undefined, messageId: undefined },
    headers: { 'x-a': '1' },
  });
  assert.equal(messageText(undefined), '');
  assert.equal(messageText({ parts: [{ type: 'reasoning', text: 'r' }] }), '');
});

test('fetch wrapper: body passes through unchanged; token adopted from the data-satchel part', async () => {
  const text = uiStream({ token: 'tok-2', seq: 2, session: 'S', degraded: ['tier_write_failed'] });
  const fetch = fakeFetch(() => sseReply(text, { chunks: (t) => t.match(/[\s\S]{1,7}/g) }));
  const client = testClient({ conversation: 'ai1', fetch });
  await client.importToken('tok-1', { seq: 1, session: 'S' });
  const events = record(client, ['token', 'degraded']);

  const { res } = await sendLikeTransport(satchelAISDK(client));
  assert.equal(fetch.calls[0].token, 'tok-1');
  assert.deepEqual(JSON.parse(fetch.calls[0].body), { message: 'follow up', userMessageId: 'm3', id: 'chat-1', trigger: 'submit-message' });
  assert.equal(client.token, 'tok-1', 'not adopted before the stream is read');
  assert.equal(await res.text(), text, 'the AI SDK sees the exact bytes');
  assert.equal(client.token, 'tok-2');
  assert.equal(client.seq, 2);
  assert.deepEqual(events.map((e) => e.name), ['token', 'degraded']);
});

test('fetch wrapper: token from response headers (non-streaming servers)', async () => {
  const fetch = fakeFetch(() => reply({ json: { ok: true }, satchel: { token: 'hdr-tok', seq: 3 } }));
  const client = testClient({ conversation: 'ai2', fetch });
  const { res } = await sendLikeTransport(satchelAISDK(client));
  assert.deepEqual(await res.json(), { ok: true });
  assert.equal(client.token, 'hdr-tok');
});

test('fetch wrapper: newest token read under the lock beats the one prepare attached', async () => {
  const gate = deferred();
  const fetch = fakeFetch((call, i) =>
    i === 0 ? gate.promise : sseReply(uiStream({ token: 'tok-3', seq: 3, session: 'S' })),
  );
  const client = testClient({ conversation: 'ai3', fetch });
  await client.importToken('tok-1', { seq: 1, session: 'S' });
  const adapter = satchelAISDK(client);

  const first = sendLikeTransport(adapter);
  await flush();
  // Prepared while the first request is in flight: attaches tok-1 (stale by the time it runs).
  const second = sendLikeTransport(adapter);
  await flush();
  assert.equal(fetch.calls.length, 1);
  gate.resolve(sseReply(uiStream({ token: 'tok-2', seq: 2, session: 'S' })));
  const r1 = await first;
  await flush();
  assert.equal(fetch.calls.length, 1, 'lock held until the first body has been read');
  await r1.res.text();
  const r2 = await second;
  assert.equal(r2.prepared.headers['Satchel-Context'], 'tok-1');
  assert.equal(fetch.calls[1].token, 'tok-2', 'overwritten with the token read under the lock');
  await r2.res.text();
  assert.equal(client.token, 'tok-3');
});

test('fetch wrapper: cancelling the body releases the lock', async () => {
  const fetch = fakeFetch(() => sseReply('data: {"type":"start"}\n\n'));
  const client = testClient({ conversation: 'ai4', fetch });
  const { res } = await sendLikeTransport(satchelAISDK(client));
  await res.body.cancel();
  await client.fetch('/next');
  assert.equal(fetch.calls.length, 2);
});

test('fetch wrapper: named `event: satchel` is understood as well, and errors are typed', async () => {
  const body = sse([
    { event: 'delta', data: { text: 'x' } },
    { event: 'satchel', data: { token: 'named', seq: 4 } },
    { event: 'done', data: {} },
  ]);
  const fetch = fakeFetch((call, i) => (i === 0 ? sseReply(body) : errorReply(503, 'tier_unavailable', 'down')));
  const client = testClient({ conversation: 'ai5', fetch });
  const adapter = satchelAISDK(client);
  const { res } = await sendLikeTransport(adapter);
  await res.text();
  assert.equal(client.token, 'named');
  // The transport would surface this rejection as useChat's `error`.
  await assert.rejects(sendLikeTransport(adapter), ServiceUnavailableError);
});

test('prepareSendMessagesRequest: after tool results the last message is the assistant\'s; the user\'s text is sent', () => {
  const client = testClient({ conversation: 'ai-tools' });
  const adapter = satchelAISDK(client);
  const messages = [
    ...uiMessages,
    {
      id: 'm4',
      role: 'assistant',
      parts: [
        { type: 'text', text: 'Let me look that up.' },
        { type: 'tool-weather', toolCallId: 'c1', state: 'output-available', input: {}, output: { temp: 21 } },
      ],
    },
  ];
  // What addToolResult + sendAutomaticallyWhen pass (AI SDK 5): trigger submit-message, messageId of the assistant message.
  const tool = adapter.prepareSendMessagesRequest({ id: 'c', messages, trigger: 'submit-message', messageId: 'm4' });
  assert.deepEqual(tool.body, { message: 'follow up', userMessageId: 'm3', id: 'c', trigger: 'submit-message', messageId: 'm4' });
  // regenerate() drops the assistant message itself; the trigger tells the server it is a do-over.
  const again = adapter.prepareSendMessagesRequest({ id: 'c', messages: uiMessages, trigger: 'regenerate-message', messageId: 'm4' });
  assert.deepEqual(again.body, { message: 'follow up', userMessageId: 'm3', id: 'c', trigger: 'regenerate-message', messageId: 'm4' });
});

test('fetch wrapper: a data-satchel part with no token is reported, and the old token stays', async () => {
  const text = uiStream({ seq: 2, session: 'S' });
  const fetch = fakeFetch(() => sseReply(text));
  const client = testClient({ conversation: 'ai-bad', fetch });
  await client.importToken('tok-1', { seq: 1, session: 'S' });
  const events = record(client, ['token', 'error']);
  const { res } = await sendLikeTransport(satchelAISDK(client));
  assert.equal(await res.text(), text, 'the AI SDK still sees the exact bytes');
  assert.equal(client.token, 'tok-1');
  assert.deepEqual(events.map((e) => [e.name, e.detail.error && e.detail.error.code]), [['error', 'stream_protocol']]);
});
