// The real SDKs from npm (openai and @anthropic-ai/sdk at their current and previous majors, the AI SDK's
// providers, @google/genai) against the simulated ZenMux's protocol endpoints, through captureFetch. Each
// scenario checks that exactly the id the application saw was emitted, and that it read the server's text.
// With $ZENMUX_JS_EMITTED set (tests/test_emit_js.py), the ids also go to that file with the labels scenario
// and protocol, so that the Python side can check each against the simulated API's records.
import assert from "node:assert/strict";
import { test } from "node:test";

import { createAnthropic } from "@ai-sdk/anthropic";
import { createGoogleGenerativeAI } from "@ai-sdk/google";
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import Anthropic from "@anthropic-ai/sdk";
import { GoogleGenAI } from "@google/genai";
import { generateText, streamText } from "ai";
import AnthropicPrev from "anthropic-prev";
import OpenAI from "openai";
import OpenAIPrev from "openai-prev";
import { captureFetch, FileEmitter } from "zenmux-emit";

import { ANSWER, KEY, LIMIT, Recorder, simulatedApi } from "./support.mjs";

globalThis.AI_SDK_LOG_WARNINGS = false; // the AI SDK warns about model names it does not know
const CHAT_MODEL = "openai/gpt-4.1-mini";
const CLAUDE = "anthropic/claude-sonnet-4";
const GEMINI = "gemini-2.5-flash";
const MESSAGES = [{ role: "user", content: "hello" }];
const toFile = process.env.ZENMUX_JS_EMITTED ? new FileEmitter(process.env.ZENMUX_JS_EMITTED) : null;

/** What a scenario's clients get: the recorder the test reads, and the file the Python side reads. */
function emitterFor(recorder) {
  return {
    emit(generationId, labels) {
      toFile?.emit(generationId, labels);
      return recorder.emit(generationId, labels);
    },
  };
}

async function text(stream, pick) {
  let out = "";
  for await (const part of stream) out += pick(part) ?? "";
  return out;
}

const openaiScenarios = (SDK) => ({
  chat: async (c) => {
    const r = await c.chat.completions.create({ model: CHAT_MODEL, messages: MESSAGES });
    return [[r.id], r.choices[0].message.content];
  },
  "chat.stream": async (c) => {
    const ids = new Set();
    const stream = await c.chat.completions.create({ model: CHAT_MODEL, messages: MESSAGES, stream: true });
    const out = await text(stream, (chunk) => (ids.add(chunk.id), chunk.choices[0]?.delta?.content));
    return [[...ids], out];
  },
  "chat.helper": async (c) => {
    const final = await c.chat.completions.stream({ model: CHAT_MODEL, messages: MESSAGES }).finalChatCompletion();
    return [[final.id], final.choices[0].message.content];
  },
  "chat.raw": async (c) => {
    const { data, response } = await c.chat.completions.create({ model: CHAT_MODEL, messages: MESSAGES }).withResponse();
    assert.equal(response.status, 200);
    return [[data.id], data.choices[0].message.content];
  },
  "chat.as_response": async (c) => {
    const response = await c.chat.completions.create({ model: CHAT_MODEL, messages: MESSAGES }).asResponse();
    const body = await response.json();
    return [[body.id], body.choices[0].message.content];
  },
  "chat.header": async (c) => {
    const r = await c.chat.completions.create(
      { model: CHAT_MODEL, messages: MESSAGES },
      { headers: { "x-sim-id-header": "1" } },
    );
    return [[r.id], r.choices[0].message.content];
  },
  "chat.gzip": async (c) => {
    const { data: r, response } = await c.chat.completions
      .create({ model: CHAT_MODEL, messages: MESSAGES }, { headers: { "x-sim-content-encoding": "gzip" } })
      .withResponse();
    assert.equal(response.headers.get("content-encoding"), "gzip"); // fetch decoded it: the watcher sees JSON
    return [[r.id], r.choices[0].message.content];
  },
  "chat.stream.br": async (c) => {
    const ids = new Set();
    const { data: stream, response } = await c.chat.completions
      .create(
        { model: CHAT_MODEL, messages: MESSAGES, stream: true },
        { headers: { "x-sim-content-encoding": "br", "accept-encoding": "br" } },
      )
      .withResponse();
    assert.equal(response.headers.get("content-encoding"), "br");
    const out = await text(stream, (chunk) => (ids.add(chunk.id), chunk.choices[0]?.delta?.content));
    return [[...ids], out];
  },
  responses: async (c) => {
    const r = await c.responses.create({ model: "openai/o4-mini", input: "hello" });
    return [[r.id], r.output_text];
  },
  "responses.stream": async (c) => {
    const ids = [];
    const stream = await c.responses.create({ model: "openai/o4-mini", input: "hello", stream: true });
    const out = await text(stream, (event) => {
      if (event.type === "response.created") ids.push(event.response.id);
      return event.type === "response.output_text.delta" ? event.delta : "";
    });
    return [ids, out];
  },
  "responses.helper": async (c) => {
    const final = await c.responses.stream({ model: "openai/o4-mini", input: "hello" }).finalResponse();
    return [[final.id], final.output_text];
  },
  bad_key: async (c) => {
    const bad = c.withOptions({ apiKey: "sk-ai-v1-wrong" });
    const err = await bad.chat.completions.create({ model: CHAT_MODEL, messages: MESSAGES }).catch((e) => e);
    assert.ok(err instanceof SDK.AuthenticationError, String(err));
    return [[], `AuthenticationError ${err.status}`];
  },
});

const anthropicScenarios = () => ({
  messages: async (c) => {
    const r = await c.messages.create({ model: CLAUDE, max_tokens: 64, messages: MESSAGES });
    return [[r.id], r.content[0].text];
  },
  "messages.events": async (c) => {
    const ids = [];
    const stream = await c.messages.create({ model: CLAUDE, max_tokens: 64, messages: MESSAGES, stream: true });
    const out = await text(stream, (event) => {
      if (event.type === "message_start") ids.push(event.message.id);
      return event.type === "content_block_delta" ? event.delta.text : "";
    });
    return [ids, out];
  },
  "messages.helper": async (c) => {
    const final = await c.messages.stream({ model: CLAUDE, max_tokens: 64, messages: MESSAGES }).finalMessage();
    return [[final.id], final.content[0].text];
  },
  "messages.raw": async (c) => {
    const { data } = await c.messages.create({ model: CLAUDE, max_tokens: 64, messages: MESSAGES }).withResponse();
    return [[data.id], data.content[0].text];
  },
});

/** The AI SDK: one provider, generateText and streamText; the id is what the app sees as response.id. */
const aiSdkScenarios = (model) => ({
  generate: async (fetch, base) => {
    const r = await generateText({ model: model(fetch, base), prompt: "hello" });
    return [[r.response.id], r.text];
  },
  stream: async (fetch, base) => {
    const r = streamText({ model: model(fetch, base), prompt: "hello" });
    const out = await text(r.textStream, (part) => part);
    return [[(await r.response).id], out];
  },
});

const SUITES = [
  {
    prefix: "openai",
    protocol: (name) => (name.startsWith("responses") ? "responses" : "chat.completions"),
    sdks: { current: OpenAI, previous: OpenAIPrev },
    client: (SDK, base, fetch) => new SDK({ baseURL: `${base}/api/v1`, apiKey: KEY, maxRetries: 0, fetch }),
    scenarios: openaiScenarios,
  },
  {
    prefix: "anthropic",
    protocol: () => "messages",
    sdks: { current: Anthropic, previous: AnthropicPrev },
    client: (SDK, base, fetch) => new SDK({ baseURL: `${base}/api/anthropic`, apiKey: KEY, maxRetries: 0, fetch }),
    scenarios: anthropicScenarios,
  },
  {
    prefix: "genai",
    protocol: () => "generateContent",
    sdks: { current: GoogleGenAI },
    client: (SDK, base, fetch) =>
      new SDK({ vertexai: true, apiKey: KEY, httpOptions: { baseUrl: `${base}/api/vertex-ai`, apiVersion: "v1", fetch } }),
    scenarios: () => ({
      generate: async (c) => {
        const r = await c.models.generateContent({ model: GEMINI, contents: "hello" });
        return [[r.responseId], r.text];
      },
      stream: async (c) => {
        const ids = new Set();
        const stream = await c.models.generateContentStream({ model: GEMINI, contents: "hello" });
        const out = await text(stream, (chunk) => (ids.add(chunk.responseId), chunk.text));
        return [[...ids], out];
      },
    }),
  },
];

const AI_SDK = {
  "openai-compatible": {
    protocol: "chat.completions",
    model: (fetch, base) =>
      createOpenAICompatible({ name: "zenmux", baseURL: `${base}/api/v1`, apiKey: KEY, fetch }).chatModel(CHAT_MODEL),
  },
  openai: {
    protocol: "responses",
    model: (fetch, base) => createOpenAI({ baseURL: `${base}/api/v1`, apiKey: KEY, fetch })("openai/o4-mini"),
  },
  anthropic: {
    protocol: "messages",
    model: (fetch, base) => createAnthropic({ baseURL: `${base}/api/anthropic/v1`, apiKey: KEY, fetch })(CLAUDE),
  },
  google: {
    protocol: "generateContent",
    model: (fetch, base) =>
      createGoogleGenerativeAI({ baseURL: `${base}/api/vertex-ai/v1/publishers/google`, apiKey: KEY, fetch })(GEMINI),
  },
};

async function check(name, protocol, call) {
  const recorder = new Recorder();
  const fetch = captureFetch(emitterFor(recorder), { labels: { scenario: name, protocol } });
  const [ids, said] = await call(fetch);
  if (name.endsWith("bad_key")) {
    assert.equal(said, "AuthenticationError 401"); // unchanged for the application
    assert.deepEqual(recorder.ids, []);
    return;
  }
  assert.equal(ids.length, 1, `${name}: the application saw ${ids}`);
  assert.deepEqual(recorder.ids, ids, name); // each id once, the one the application saw
  assert.deepEqual(recorder.sent[0][1], { scenario: name, protocol });
  assert.equal(said, ANSWER, name); // streams still iterate to the same text
}

for (const suite of SUITES) {
  for (const [generation, SDK] of Object.entries(suite.sdks)) {
    for (const [scenario, call] of Object.entries(suite.scenarios(SDK))) {
      const name = `${suite.prefix}.${generation}.${scenario}`;
      test(name, LIMIT, async () => {
        const base = await simulatedApi();
        await check(name, suite.protocol(scenario), (fetch) => call(suite.client(SDK, base, fetch)));
      });
    }
  }
}

for (const [provider, { protocol, model }] of Object.entries(AI_SDK)) {
  for (const [scenario, call] of Object.entries(aiSdkScenarios(model))) {
    const name = `ai.${provider}.${scenario}`;
    test(name, LIMIT, async () => {
      const base = await simulatedApi();
      await check(name, protocol, (fetch) => call(fetch, base));
    });
  }
}

test.after(() => toFile?.flush());
