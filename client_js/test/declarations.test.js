// The TypeScript declarations describe exactly what the module exports, and the
// package.json entry points name files that exist.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, existsSync } from 'node:fs';
import * as satchel from '../src/satchel.js';

const here = new URL('..', import.meta.url);
const dts = readFileSync(new URL('src/satchel.d.ts', here), 'utf8');
const pkg = JSON.parse(readFileSync(new URL('package.json', here), 'utf8'));

test('every runtime export is declared, and every declared value exists', () => {
  const declaredValues = [...dts.matchAll(/^export declare (?:const|function|class) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual([...declaredValues].sort(), Object.keys(satchel).sort());
});

test('declared classes are classes and declared functions are functions', () => {
  for (const [, kind, name] of dts.matchAll(/^export declare (const|function|class) (\w+)/gm)) {
    const value = satchel[name];
    if (kind === 'const') assert.notEqual(typeof value, 'function', name);
    else assert.equal(typeof value, 'function', name);
  }
});

test('package.json points at the module and its declarations', () => {
  for (const path of [pkg.main, pkg.types, pkg.exports['.'].default, pkg.exports['.'].types]) {
    assert.ok(existsSync(new URL(path, here)), path);
  }
  assert.equal(pkg.exports['.'].types, pkg.types);
});

test('VERSION is the package version', () => {
  assert.equal(satchel.VERSION, pkg.version);
});

test('the declarations compile without the DOM lib: no DOM-only type names', () => {
  // A Node-only TypeScript project (lib es2022, @types/node) has Request, Response,
  // Headers, RequestInit and EventTarget, but not these; the declarations derive
  // what they need from fetch and EventTarget instead (FetchInput, ...).
  const code = dts.replace(/\/\*[\s\S]*?\*\//g, '').replace(/\/\/.*$/gm, '');
  for (const name of ['RequestInfo', 'HeadersInit', 'RequestCredentials', 'AddEventListenerOptions', 'EventListenerOptions', 'EventListenerOrEventListenerObject', 'MessageEvent']) {
    assert.doesNotMatch(code, new RegExp(`\\b${name}\\b`), name);
  }
});

test('what tsc --strict found missing is declared', () => {
  const code = dts.replace(/\/\*[\s\S]*?\*\//g, '');
  assert.match(code, /class StaleContextError extends SatchelError \{[^}]*recoverable: boolean;/);
  assert.match(code, /function memoryStorage\([^)]*\): MemoryStorageAdapter;/);
  assert.match(code, /interface SatchelStream [^{]*\{\s*return\(value\?:/);
  // return() resolves with the value it is given, undefined by default (stream.test.js):
  // typed StreamResult, `(await reply.return()).value.text` compiled and threw.
  assert.match(code, /interface SatchelStream extends AsyncGenerator<string, StreamResult \| undefined, undefined>/);
  assert.match(code, /return\([^)]*\): Promise<IteratorResult<string, StreamResult \| undefined>>;/);
  assert.match(code, /class StaleContextError extends SatchelError \{[^}]*recovered: boolean;/);
  const stale = new satchel.StaleContextError('x', { code: 'stale_context' });
  assert.equal(stale.recoverable, true);
  assert.equal(stale.recovered, false);
  assert.deepEqual(satchel.memoryStorage({ a: '1' }).keys(), ['a']); // synchronous
});
