// Shared by the node tests: the simulated ZenMux API (given by $ZENMUX_SIM_URL, or started from the project's
// .venv), a recording emitter, and a condition wait.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { setTimeout as delay } from "node:timers/promises";
import { fileURLToPath } from "node:url";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const KEY = "sk-ai-v1-demo";
// Each test's bound, so that a capture that hangs (a stream held back, a cancel lost) fails instead of waiting.
export const LIMIT = { timeout: 30_000 };
// exporter/simulate/protocols.py's ANSWER: what every simulated generation says.
export const ANSWER = "A simulated answer from the ZenMux simulator.";

/** An emitter that remembers what it was given (the interface captureFetch sends to). */
export class Recorder {
  constructor() {
    this.sent = [];
  }

  emit(generationId, labels) {
    this.sent.push([generationId, { ...(labels ?? {}) }]);
    return true;
  }

  get ids() {
    return this.sent.map(([id]) => id);
  }
}

/** Waits for a condition (checked every 10 ms); fails with `what` after `timeout` ms. */
export async function waitUntil(condition, what, timeout = 10_000) {
  const deadline = Date.now() + timeout;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await delay(10);
  }
}

let started = null;

/** The simulated API's base URL: $ZENMUX_SIM_URL (pytest sets it), else `zenmux-exporter fake-api` from .venv,
 * started once per test file and stopped when it ends. */
export function simulatedApi() {
  if (process.env.ZENMUX_SIM_URL) return Promise.resolve(process.env.ZENMUX_SIM_URL);
  started ??= startFakeApi();
  return started;
}

async function startFakeApi() {
  const python = join(ROOT, ".venv", "bin", "python");
  if (!existsSync(python)) throw new Error(`${python} is missing: run \`make .venv/bin/.installed\` first`);
  const child = spawn(python, ["-m", "exporter", "fake-api", "--listen", "127.0.0.1:0", "--billing-delay", "0.2"], {
    cwd: ROOT,
    stdio: ["ignore", "pipe", "inherit"],
  });
  process.on("exit", () => child.kill("SIGTERM"));
  const lines = createInterface({ input: child.stdout });
  for await (const line of lines) {
    const url = line.split(" ").find((word) => word.startsWith("http://"));
    if (url) {
      // It prints nothing more: let the test process end without waiting for it (and stop it on exit).
      lines.close();
      child.stdout.destroy();
      child.unref();
      return url;
    }
  }
  throw new Error("fake-api exited before printing its URL");
}
