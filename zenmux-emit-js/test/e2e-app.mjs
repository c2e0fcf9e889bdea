// For tests/test_emit_js.py's end-to-end test: an application making real SDK calls with captureFetch, its ids
// going by UDP to a running exporter. Usage: node e2e-app.mjs BASE_URL API_KEY UDP_TARGET; prints the ids the
// application saw, as a JSON list, once every datagram has left.
import { createGoogleGenerativeAI } from "@ai-sdk/google";
import Anthropic from "@anthropic-ai/sdk";
import { generateText } from "ai";
import OpenAI from "openai";
import { captureFetch, openEmitter } from "zenmux-emit";

globalThis.AI_SDK_LOG_WARNINGS = false;
const [base, apiKey, target] = process.argv.slice(2);
const emitter = openEmitter(target);
const messages = [{ role: "user", content: "hello" }];

const openai = new OpenAI({ baseURL: `${base}/api/v1`, apiKey, fetch: captureFetch(emitter, { labels: { feature: "node" } }) });
const claude = new Anthropic({ baseURL: `${base}/api/anthropic`, apiKey, fetch: captureFetch(emitter) });
const google = createGoogleGenerativeAI({
  baseURL: `${base}/api/vertex-ai/v1/publishers/google`,
  apiKey,
  fetch: captureFetch(emitter, { labels: { feature: "node" } }),
});

const ids = [(await openai.chat.completions.create({ model: "openai/gpt-4.1", messages })).id];
const stream = await openai.responses.create({ model: "openai/o4-mini", input: "hello", stream: true });
for await (const event of stream) if (event.type === "response.created") ids.push(event.response.id);
ids.push((await claude.messages.stream({ model: "anthropic/claude-opus-4", max_tokens: 64, messages }).finalMessage()).id);
ids.push((await generateText({ model: google("gemini-2.5-pro"), prompt: "hello" })).response.id);
await emitter.flush();
if (emitter.sent !== ids.length) throw new Error(`sent ${emitter.sent} of ${ids.length}: ${emitter.lastError}`);
process.stdout.write(JSON.stringify(ids));
