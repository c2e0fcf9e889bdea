// Type-checked by `tsc -p test/tsconfig.json` (test_emit_js.py): the declarations fit each SDK's fetch option.
import { createAnthropic } from "@ai-sdk/anthropic";
import { createGoogleGenerativeAI } from "@ai-sdk/google";
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import Anthropic from "@anthropic-ai/sdk";
import { GoogleGenAI } from "@google/genai";
import AnthropicPrev from "anthropic-prev";
import OpenAI from "openai";
import OpenAIPrev from "openai-prev";
import { type AnyEmitter, type Emitter, captureFetch, installGlobalFetchCapture, openEmitter } from "zenmux-emit";

const emitter: AnyEmitter = openEmitter(process.env.ZENMUX_EMIT ?? "udp://127.0.0.1:9467?format=json");
const ok: boolean = emitter.emit("gen-1", { feature: "chat", attempt: 2, cached: false });
const drops: number = emitter.dropped + emitter.sent;
const custom: Emitter = { emit: (id: string) => id.length > 0 };
const fetch = captureFetch(emitter, { labels: { feature: "chat" } });
const perRequest = captureFetch(custom, {
  labels: (request) => ({ team: request.headers.get("x-team") ?? "none", method: request.method }),
  fetch: globalThis.fetch,
  match: (request) => request.url.includes("/chat/"),
});

new OpenAI({ apiKey: "k", fetch });
new OpenAIPrev({ apiKey: "k", fetch: perRequest });
new Anthropic({ apiKey: "k", fetch });
new AnthropicPrev({ apiKey: "k", fetch });
new GoogleGenAI({ vertexai: true, apiKey: "k", httpOptions: { fetch } });
createOpenAICompatible({ name: "zenmux", baseURL: "https://zenmux.ai/api/v1", fetch });
createOpenAI({ fetch });
createAnthropic({ fetch });
createGoogleGenerativeAI({ fetch });
const undo: () => void = installGlobalFetchCapture(null, { labels: { via: "global" } });
undo();
await emitter.flush();
export { ok, drops };
