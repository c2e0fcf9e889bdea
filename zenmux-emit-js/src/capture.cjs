"use strict";
// A fetch wrapper that hands each LLM response's generation id to an emitter, without consuming its body.
//
// The Node twin of zenmux-emit's hooks.py. Where the id comes from, first found wins:
//   1. the x-generation-id response header (emitted as soon as the headers arrive);
//   2. a JSON body: `id` (chat completion, Responses, Anthropic message) or `responseId` (Gemini), once the
//      application has read the whole body;
//   3. a text/event-stream body: `id`, `responseId`, `message.id` (Anthropic message_start) or `response.id`
//      (Responses response.created) in the first events, as the application reads them.
// The body the application gets is a pull-through stream over the original one: each chunk is shown to a
// watcher and handed on unchanged when the application asks for it (nothing is read ahead), errors arrive as
// the original stream's, and cancelling cancels the original with the same reason.

const { defaultEmitter, validId } = require("./emit.cjs");

const GENERATION_ID_HEADER = "x-generation-id";
// Paths (suffixes) of the endpoints that create generations, across the protocols ZenMux speaks.
const GENERATION_PATH_SUFFIXES = ["/chat/completions", "/completions", "/responses", "/messages", "/embeddings"];
const GENERATION_PATH_MARKERS = [":generateContent", ":streamGenerateContent"];
// The keys looked at, in order; dotted keys are nested.
const ID_KEYS = [["id"], ["responseId"], ["message", "id"], ["response", "id"]];
// A JSON body up to twice this is parsed whole; a larger one is read in its first and last this many bytes.
const EDGE_BYTES = 64 * 1024;
// A stream whose first events (this many, or this many bytes) carry no id is left alone.
const MAX_SSE_EVENTS = 4;
const MAX_SSE_BYTES = 64 * 1024;
const MAX_HEAD_KEYS = 32;
// Gemini puts responseId after the candidates; a key's quotes are never escaped, a string's always are.
const TAIL_RESPONSE_ID = /(?<!\\)"responseId"[ \t\r\n]*:[ \t\r\n]*"([A-Za-z0-9_.:-]{1,128})"/g;
const JSON_STRING = /"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/y;
const JSON_SCALAR = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null/y;
const SPACE = /[ \t\r\n]*/y;

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

/** The default `match`: a POST to a chat/completions, responses, messages, embeddings or generateContent path. */
function isGenerationRequest(request) {
  if (request.method !== "POST") return false;
  const pathname = new URL(request.url).pathname.replace(/\/+$/, "");
  return (
    GENERATION_PATH_SUFFIXES.some((suffix) => pathname.endsWith(suffix)) ||
    GENERATION_PATH_MARKERS.some((marker) => pathname.includes(marker))
  );
}

/** The generation id in a decoded JSON response or event (id, responseId, message.id, response.id). */
function extractId(document) {
  for (const key of ID_KEYS) {
    let value = document;
    for (const part of key) value = isObject(value) ? value[part] : undefined;
    if (validId(value)) return value;
  }
  return null;
}

function skipSpace(text, pos) {
  SPACE.lastIndex = pos;
  SPACE.test(text);
  return SPACE.lastIndex;
}

function token(pattern, text, pos) {
  pattern.lastIndex = pos;
  const found = pattern.exec(text);
  return found === null ? null : { value: JSON.parse(found[0]), end: pattern.lastIndex };
}

/** A top-level id or responseId among the scalar keys that open a JSON object (a container ends the look). */
function headId(text) {
  let pos = skipSpace(text, 0);
  if (text[pos] !== "{") return null;
  for (let n = 0; n < MAX_HEAD_KEYS; n++) {
    pos = skipSpace(text, pos + 1);
    const key = token(JSON_STRING, text, pos);
    if (key === null) return null;
    pos = skipSpace(text, key.end);
    if (text[pos] !== ":") return null;
    pos = skipSpace(text, pos + 1);
    const value = text[pos] === '"' ? token(JSON_STRING, text, pos) : token(JSON_SCALAR, text, pos);
    if (value === null) return null; // a container (decoding it is the second parse this avoids) or a cut
    if ((key.value === "id" || key.value === "responseId") && validId(value.value)) return value.value;
    pos = skipSpace(text, value.end);
    if (text[pos] !== ",") return null;
  }
  return null;
}

/** The id of a JSON response body, given all of it (whole) or its first and last bytes (not whole). */
function findBodyId(head, tail = Buffer.alloc(0), whole = true) {
  try {
    if (whole) return extractId(JSON.parse(Buffer.from(head).toString("utf8")));
    const found = headId(Buffer.from(head).toString("utf8"));
    if (found !== null) return found;
    const matches = [...Buffer.from(tail).toString("latin1").matchAll(TAIL_RESPONSE_ID)];
    return matches.length > 0 ? matches[matches.length - 1][1] : null;
  } catch {
    return null;
  }
}

/** Looks at the bytes of one response body as the application reads them, and emits the id once known. */
class Watcher {
  constructor(found, sse) {
    this._found = found;
    this._sse = sse;
    this._decoder = sse ? new TextDecoder("utf-8") : null;
    this._text = "";
    this._head = Buffer.alloc(0);
    this._tail = Buffer.alloc(0);
    this._whole = true;
    this._seen = 0;
    this._events = 0;
    this.done = false;
  }

  feed(chunk) {
    if (this.done || !chunk || chunk.byteLength === 0) return;
    try {
      const bytes = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
      if (this._sse) {
        this._text += this._decoder.decode(bytes, { stream: true });
        this._seen += bytes.length;
        this._scanEvents();
        if (this._seen > MAX_SSE_BYTES) this.giveUp(); // the first events are over and carried no id
        return;
      }
      let rest = bytes;
      if (this._whole) {
        const room = 2 * EDGE_BYTES - this._head.length;
        if (rest.length <= room) {
          this._head = Buffer.concat([this._head, rest]);
          return;
        }
        // past the size parsed whole: keep the head's first bytes and a tail window
        this._whole = false;
        const all = Buffer.concat([this._head, rest]);
        this._head = all.subarray(0, EDGE_BYTES);
        rest = all.subarray(EDGE_BYTES);
      }
      const tail = Buffer.concat([this._tail, rest]);
      this._tail = Buffer.from(tail.subarray(Math.max(0, tail.length - EDGE_BYTES)));
    } catch {
      this.giveUp();
    }
  }

  /** The application read the body to its end: a JSON body is complete now. */
  finish() {
    if (this.done) return;
    try {
      if (this._sse) {
        this._text += `${this._decoder.decode()}\n\n`; // a last event without its blank line
        this._scanEvents();
      } else {
        this._emit(findBodyId(this._head, this._tail, this._whole));
      }
    } catch {
      // nothing to emit
    }
    this.giveUp();
  }

  _scanEvents() {
    while (!this.done) {
      const text = this._text.replace(/\r\n/g, "\n");
      const end = text.indexOf("\n\n");
      if (end < 0) {
        this._text = text;
        return;
      }
      this._text = text.slice(end + 2);
      const lines = text
        .slice(0, end)
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5));
      if (lines.length === 0) continue; // a comment or keep-alive
      this._events += 1;
      const payload = lines.join("\n");
      if (payload.trim() !== "[DONE]") {
        try {
          this._emit(extractId(JSON.parse(payload)));
        } catch {
          // not JSON: look at the next event
        }
      }
      if (this._events >= MAX_SSE_EVENTS) this.giveUp();
    }
  }

  _emit(generationId) {
    if (generationId !== null && !this.done) {
      this._found(generationId);
      this.giveUp();
    }
  }

  giveUp() {
    this.done = true;
    this._text = "";
    this._head = Buffer.alloc(0);
    this._tail = Buffer.alloc(0);
  }
}

function requestOf(input, init) {
  const fromRequest = input !== null && typeof input === "object" && !(input instanceof URL) && "url" in input;
  const url = fromRequest ? String(input.url) : String(input);
  const method = String(init?.method ?? (fromRequest ? input.method : undefined) ?? "GET").toUpperCase();
  return { method, url, init, input };
}

function labelsFor(labels, request) {
  if (typeof labels !== "function") return labels ?? {};
  const headers = new Headers(request.init?.headers ?? (request.input?.headers || undefined));
  return labels({ method: request.method, url: request.url, headers }) ?? {};
}

/** The response the application gets: the same status, headers, url and type over a watched body. */
function watchedResponse(response, watcher) {
  const reader = response.body.getReader();
  const body = new ReadableStream(
    {
      async pull(controller) {
        const { done, value } = await reader.read(); // a failing read fails the application's read, unchanged
        if (done) {
          watcher.finish();
          controller.close();
          return;
        }
        watcher.feed(value);
        controller.enqueue(value);
      },
      cancel(reason) {
        watcher.giveUp();
        return reader.cancel(reason);
      },
    },
    { highWaterMark: 0 }, // read the original only when the application reads: no read-ahead, same timing
  );
  const watched = new Response(body, {
    status: response.status,
    statusText: response.statusText,
    headers: response.headers,
  });
  // A constructed Response has no url and is not "redirected"; the SDKs read these, so keep the original's.
  for (const name of ["url", "redirected", "type"]) {
    Object.defineProperty(watched, name, { value: response[name], enumerable: true, configurable: true });
  }
  return watched;
}

/** Emits what the headers give, or watches the body; returns the response the application gets. */
function capture(response, request, options) {
  try {
    if (!(response.status >= 200 && response.status < 300) || !options.match(request)) return response;
    const labels = labelsFor(options.labels, request);
    const send = (generationId) => {
      try {
        (options.emitter ?? defaultEmitter()).emit(generationId, labels);
      } catch {
        // an emitter that throws must not reach the application
      }
    };
    const fromHeader = (response.headers.get(options.header) ?? "").trim();
    if (validId(fromHeader)) {
      send(fromHeader);
      return response;
    }
    const body = response.body;
    if (body === null || body === undefined || typeof body.getReader !== "function" || body.locked) {
      return response; // no body, or not a web stream (a node-fetch response): nothing to watch
    }
    const contentType = (response.headers.get("content-type") ?? "").split(";")[0].trim().toLowerCase();
    return watchedResponse(response, new Watcher(send, contentType === "text/event-stream"));
  } catch {
    return response;
  }
}

function normalise(emitter, options = {}) {
  return {
    emitter: emitter ?? null,
    labels: options.labels,
    match: options.match ?? isGenerationRequest,
    header: options.header ?? GENERATION_ID_HEADER,
    fetch: options.fetch,
  };
}

/**
 * A fetch-compatible function for the SDKs' `fetch` option: calls `options.fetch` (default: globalThis.fetch
 * at call time) and emits each generation response's id. The emitter defaults to the process-wide one.
 */
function captureFetch(emitter, options = {}) {
  const settings = normalise(emitter, options);
  return async function capturedFetch(input, init) {
    const inner = settings.fetch ?? globalThis.fetch;
    const response = await inner(input, init); // the application's errors, unchanged
    let request;
    try {
      request = requestOf(input, init);
    } catch {
      return response;
    }
    return capture(response, request, settings);
  };
}

/**
 * Wraps globalThis.fetch for libraries that take no fetch option. Opt-in; returns the function that undoes it
 * (it restores the original only while the wrapper is still installed).
 */
function installGlobalFetchCapture(emitter, options = {}) {
  const original = globalThis.fetch;
  const wrapped = captureFetch(emitter, { ...options, fetch: original });
  globalThis.fetch = wrapped;
  return function uninstall() {
    if (globalThis.fetch === wrapped) globalThis.fetch = original;
  };
}

module.exports = {
  EDGE_BYTES,
  GENERATION_ID_HEADER,
  MAX_SSE_BYTES,
  MAX_SSE_EVENTS,
  captureFetch,
  extractId,
  findBodyId,
  installGlobalFetchCapture,
  isGenerationRequest,
};
