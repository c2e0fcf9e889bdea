// Tests of captureFetch against a real loopback HTTP server (node:http): what the application reads is unchanged
// (bytes, errors, cancellation), and the id is emitted as soon as it has passed.
import assert from "node:assert/strict";
import { once } from "node:events";
import http from "node:http";
import { test } from "node:test";

import { captureFetch, findBodyId, installGlobalFetchCapture, isGenerationRequest } from "zenmux-emit";
import { LIMIT, Recorder, waitUntil } from "./support.mjs";

const BIG_CHAT = JSON.stringify({ id: "gen-big-1", choices: [{ message: { content: "x".repeat(300_000) } }] });
const BIG_GEMINI = JSON.stringify({ candidates: [{ content: { parts: [{ text: "y".repeat(300_000) }] } }], responseId: "GEMINI0001" });

/** A server whose routes the tests steer: `hold` releases the rest of /v1/chat/completions's stream. */
async function server(t) {
  const state = { closed: [], release: null };
  const srv = http.createServer((req, res) => {
    req.on("close", () => state.closed.push(req.url));
    const url = req.url;
    if (url === "/v1/chat/completions") {
      res.writeHead(200, { "content-type": "text/event-stream" });
      res.write(': keep-alive\n\ndata: {"id":"gen-stream-1","choices":[{"delta":{"content":"Hel"}}]}\n\n');
      state.release = () => {
        res.write('data: {"id":"gen-stream-1","choices":[{"delta":{"content":"lo"}}]}\n\ndata: [DONE]\n\n');
        res.end();
      };
      return;
    }
    if (url === "/v1/cut/chat/completions") {
      res.writeHead(200, { "content-type": "text/event-stream" });
      res.write('data: {"id":"gen-cut-1"}\n\n');
      setImmediate(() => res.socket.destroy()); // the connection dies mid-stream
      return;
    }
    if (url === "/v1/big/chat/completions") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(BIG_CHAT);
      return;
    }
    if (url === "/v1beta/models/gemini:generateContent") {
      res.writeHead(200, { "content-type": "application/json; charset=utf-8" });
      res.end(BIG_GEMINI);
      return;
    }
    if (url === "/v1/responses") {
      res.writeHead(200, { "content-type": "application/json", "x-generation-id": "gen-header-1" });
      res.end('{"id":"resp_1"}');
      return;
    }
    if (url === "/v1/messages") {
      res.writeHead(200, { "content-type": "text/event-stream; charset=utf-8" });
      res.end(
        'event: message_start\r\ndata: {"type":"message_start","message":{"id":"msg_01abc"}}\r\n\r\n' +
          'event: message_stop\r\ndata: {"type":"message_stop"}\r\n\r\n',
      );
      return;
    }
    if (url === "/v1/completions") {
      res.writeHead(500, { "content-type": "application/json" });
      res.end('{"id":"gen-error"}');
      return;
    }
    if (url === "/v1/embeddings") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end('{"id": "not a valid id"}');
      return;
    }
    res.writeHead(200, { "content-type": "application/json" });
    res.end('{"id":"file-1"}');
  });
  srv.listen(0, "127.0.0.1");
  await once(srv, "listening");
  t.after(() => {
    srv.closeAllConnections();
    srv.close();
  });
  return { url: `http://127.0.0.1:${srv.address().port}`, state };
}

const POST = { method: "POST", headers: { "content-type": "application/json", "x-team": "search" }, body: "{}" };

test("a JSON body reaches the application byte for byte, and its id is emitted once read", LIMIT, async (t) => {
  const { url } = await server(t);
  const recorder = new Recorder();
  const fetch = captureFetch(recorder, { labels: { feature: "chat" } });
  const response = await fetch(`${url}/v1/big/chat/completions`, POST);
  assert.equal(response.status, 200);
  assert.equal(response.url, `${url}/v1/big/chat/completions`);
  assert.equal(response.headers.get("content-type"), "application/json");
  assert.deepEqual(recorder.ids, []); // nothing read yet: nothing looked at
  assert.equal(await response.text(), BIG_CHAT); // 300 KB: parsed from its head, not a second time whole
  assert.deepEqual(recorder.sent, [["gen-big-1", { feature: "chat" }]]);

  const gemini = await fetch(`${url}/v1beta/models/gemini:generateContent`, POST);
  assert.equal(await gemini.text(), BIG_GEMINI); // responseId comes after 300 KB of candidates: read from the tail
  assert.deepEqual(recorder.ids, ["gen-big-1", "GEMINI0001"]);
});

test("an event stream's id is emitted when its first event passes, before the stream ends", LIMIT, async (t) => {
  const { url, state } = await server(t);
  const recorder = new Recorder();
  const response = await captureFetch(recorder)(`${url}/v1/chat/completions`, POST);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  while (recorder.ids.length === 0) {
    const { value, done } = await reader.read();
    assert.equal(done, false);
    text += decoder.decode(value, { stream: true });
  }
  assert.deepEqual(recorder.ids, ["gen-stream-1"]); // the server still holds the rest of the stream
  state.release();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    text += decoder.decode(value, { stream: true });
  }
  assert.ok(text.endsWith("data: [DONE]\n\n") && text.startsWith(": keep-alive\n\n"));
  assert.deepEqual(recorder.ids, ["gen-stream-1"]);

  const anthropic = await captureFetch(recorder)(`${url}/v1/messages`, POST);
  assert.ok((await anthropic.text()).includes("message_stop"));
  assert.equal(recorder.ids.at(-1), "msg_01abc"); // message.id, CRLF line ends
});

test("cancelling the body cancels the request, as without capture", LIMIT, async (t) => {
  const { url, state } = await server(t);
  const recorder = new Recorder();
  const response = await captureFetch(recorder)(`${url}/v1/chat/completions`, POST);
  const reader = response.body.getReader();
  await reader.read();
  await reader.cancel(new Error("the user went away"));
  await waitUntil(() => state.closed.includes("/v1/chat/completions"), "the server to see the connection close");
});

test("a stream that breaks fails the application's read with the error it gets without capture", LIMIT, async (t) => {
  const { url } = await server(t);
  async function failure(fetchImpl) {
    const response = await fetchImpl(`${url}/v1/cut/chat/completions`, POST);
    try {
      await response.text();
    } catch (err) {
      return { name: err.name, message: err.message, cause: err.cause?.code };
    }
    return null;
  }
  const plain = await failure(globalThis.fetch);
  assert.notEqual(plain, null);
  const recorder = new Recorder();
  assert.deepEqual(await failure(captureFetch(recorder)), plain);
  assert.deepEqual(recorder.ids, ["gen-cut-1"]); // the first event had passed

  const refused = async (fetchImpl) => fetchImpl("http://127.0.0.1:1/v1/chat/completions", POST).catch((e) => e);
  const [bare, wrapped] = [await refused(globalThis.fetch), await refused(captureFetch(recorder))];
  assert.equal(wrapped.constructor, bare.constructor);
  assert.equal(wrapped.message, bare.message);
});

test("the header wins; errors, other paths and invalid ids emit nothing and pass the response through", LIMIT, async (t) => {
  const { url } = await server(t);
  const recorder = new Recorder();
  const fetch = captureFetch(recorder);
  const original = await globalThis.fetch(`${url}/v1/responses`, POST);
  const viaHeader = await fetch(`${url}/v1/responses`, POST);
  assert.deepEqual(recorder.ids, ["gen-header-1"]); // at once, from the headers
  assert.equal(await viaHeader.text(), await original.text());
  for (const [route, init, status] of [
    ["/v1/completions", POST, 500],
    ["/v1/files", POST, 200],
    ["/v1/chat/completions", { method: "GET" }, 200],
    ["/v1/embeddings", POST, 200],
  ]) {
    const response = await fetch(`${url}${route}`, init);
    assert.equal(response.status, status);
    if (route === "/v1/chat/completions") {
      await response.body.cancel();
      continue;
    }
    await response.text();
  }
  assert.deepEqual(recorder.ids, ["gen-header-1"]);
});

test("labels per client, from the request, and an emitter that throws", LIMIT, async (t) => {
  const { url } = await server(t);
  const recorder = new Recorder();
  const fetch = captureFetch(recorder, {
    labels: (request) => ({ team: request.headers.get("x-team"), method: request.method }),
  });
  await (await fetch(new Request(`${url}/v1/big/chat/completions`, POST))).arrayBuffer();
  assert.deepEqual(recorder.sent, [["gen-big-1", { team: "search", method: "POST" }]]);
  const throwing = captureFetch({
    emit() {
      throw new Error("broken emitter");
    },
  });
  assert.equal((await (await throwing(`${url}/v1/big/chat/completions`, POST)).text()).length, BIG_CHAT.length);
});

test("installGlobalFetchCapture wraps globalThis.fetch until undone", LIMIT, async (t) => {
  const { url } = await server(t);
  const recorder = new Recorder();
  const before = globalThis.fetch;
  const uninstall = installGlobalFetchCapture(recorder, { labels: { via: "global" } });
  try {
    await (await fetch(`${url}/v1/big/chat/completions`, POST)).text();
  } finally {
    uninstall();
  }
  assert.equal(globalThis.fetch, before);
  assert.deepEqual(recorder.sent, [["gen-big-1", { via: "global" }]]);
});

test("the default match and the body parser", LIMIT, () => {
  assert.ok(isGenerationRequest({ method: "POST", url: "https://zenmux.ai/api/v1/chat/completions/" }));
  assert.ok(isGenerationRequest({ method: "POST", url: "https://x/v1/publishers/google/models/g:streamGenerateContent?alt=sse" }));
  assert.ok(!isGenerationRequest({ method: "GET", url: "https://zenmux.ai/api/v1/responses" }));
  assert.ok(!isGenerationRequest({ method: "POST", url: "https://zenmux.ai/api/v1/files" }));
  const head = Buffer.from('{"object":"chat.completion","created":1,"id":"gen-7","choices":[');
  assert.equal(findBodyId(head, Buffer.alloc(0), false), "gen-7");
  assert.equal(findBodyId(Buffer.from('{"choices":[],"id":"gen-8"'), Buffer.alloc(0), false), null);
  assert.equal(findBodyId(Buffer.from("{}"), Buffer.from('"text":"\\"responseId\\": \\"FAKE\\"","responseId":"REAL1"}'), false), "REAL1");
});
