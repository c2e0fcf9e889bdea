// Tests of the emitters: real UDP sockets, real files and FIFOs; never throws, never waits, never keeps the
// process alive.
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import dgram from "node:dgram";
import { once } from "node:events";
import fs from "node:fs";
import { createRequire } from "node:module";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import {
  FileEmitter,
  NullEmitter,
  UdpEmitter,
  WARN_INTERVAL_SECONDS,
  encodeJson,
  openEmitter,
  validId,
} from "zenmux-emit";
import { LIMIT } from "./support.mjs";

async function receiver(t, type = "udp4", address = "127.0.0.1") {
  const sock = dgram.createSocket(type);
  const queue = [];
  const waiting = [];
  sock.on("message", (msg) => (waiting.length ? waiting.shift()(msg) : queue.push(msg)));
  sock.bind(0, address);
  await once(sock, "listening");
  t.after(() => sock.close());
  return {
    port: sock.address().port,
    next: () => (queue.length ? Promise.resolve(queue.shift()) : new Promise((resolve) => waiting.push(resolve))),
  };
}

function tmpdir(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "zenmux-emit-"));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function collect() {
  const said = [];
  return { said, warn: (message) => said.push(message) };
}

test("valid ids are the exporter's", LIMIT, () => {
  for (const [value, ok] of [
    ["gen-1", true],
    ["a".repeat(128), true],
    ["a".repeat(129), false],
    ["", false],
    ["resp_0123:abc.DEF-_", true],
    ["has space", false],
    ["naïve", false],
    ["line\nbreak", false],
    ["trailing\n", false],
    [null, false],
    [12, false],
  ]) {
    assert.equal(validId(value), ok, String(value));
  }
});

test("encodeJson keeps scalar labels in order and protects the id", LIMIT, () => {
  const line = encodeJson("gen-1", { feature: "chat", n: 3, flag: true, generation_id: "evil", obj: [1], no: null });
  assert.equal(line.toString(), '{"generation_id":"gen-1","feature":"chat","n":"3","flag":"true"}\n');
  assert.equal(encodeJson("gen-1", null, "meta.id").toString(), '{"meta.id":"gen-1"}\n');
  // Numbers as Python's str() writes them (tests/test_emit_js.py compares many more with zenmux_emit's lines).
  const numbers = encodeJson("g", { a: NaN, b: Infinity, c: -Infinity, d: 1.5e-7, e: 1e21, f: 0.1 });
  assert.deepEqual(JSON.parse(numbers), { generation_id: "g", a: "nan", b: "inf", c: "-inf", d: "1.5e-07", e: "1000000000000000000000", f: "0.1" });
  const long = encodeJson("g", { v: "😀".repeat(1100) });
  assert.equal([...JSON.parse(long).v].length, 1024); // cut by code point, as Python does
});

test("udp plain sends one id per datagram; json carries labels", LIMIT, async (t) => {
  const rx = await receiver(t);
  const sender = new UdpEmitter("127.0.0.1", rx.port, { warn: () => {} });
  assert.equal(sender.emit("gen-1", { feature: "ignored in plain" }), true);
  assert.equal(sender.emit("gen-2"), true);
  assert.equal((await rx.next()).toString(), "gen-1\n");
  assert.equal((await rx.next()).toString(), "gen-2\n");
  await sender.flush();
  assert.deepEqual([sender.sent, sender.dropped, sender.inFlight], [2, 0, 0]);
  sender.close();
  assert.equal(sender.emit("gen-3"), false);

  const json = openEmitter(`udp://127.0.0.1:${rx.port}?format=json&id_field=gid`);
  assert.ok(json instanceof UdpEmitter);
  assert.equal(json.emit("gen-1", { feature: "search" }), true);
  assert.deepEqual(JSON.parse(await rx.next()), { gid: "gen-1", feature: "search" });
  json.close();
});

test("udp to localhost, a host name and the IPv6 loopback", LIMIT, async (t) => {
  assert.equal(new UdpEmitter("localhost", 9).host, "127.0.0.1");
  const rx4 = await receiver(t);
  const named = openEmitter(`udp://${"localhost"}:${rx4.port}`);
  assert.ok(named.emit("gen-4"));
  assert.equal((await rx4.next()).toString(), "gen-4\n");
  named.close();
  let rx6;
  try {
    rx6 = await receiver(t, "udp6", "::1");
  } catch {
    t.skip("no IPv6 loopback here");
    return;
  }
  const six = openEmitter(`udp://[::1]:${rx6.port}`);
  assert.ok(six.emit("gen-6"));
  assert.equal((await rx6.next()).toString(), "gen-6\n");
  six.close();
});

test("udp rejects invalid ids without sending, and oversized datagrams", LIMIT, async (t) => {
  const rx = await receiver(t);
  const { said, warn } = collect();
  const sender = new UdpEmitter("127.0.0.1", rx.port, { format: "json", warn });
  assert.equal(sender.emit("bad id"), false);
  assert.equal(sender.emit("x".repeat(200)), false);
  assert.equal(sender.emit(null), false);
  const big = Object.fromEntries(Array.from({ length: 80 }, (_, i) => [`k${i}`, "v".repeat(1024)]));
  assert.equal(sender.emit("gen-big", big), false);
  assert.equal(sender.lastError, "datagram too large");
  assert.equal(sender.emit("good"), true);
  assert.deepEqual(JSON.parse(await rx.next()), { generation_id: "good" }); // the first datagram is the valid one
  await sender.flush();
  assert.deepEqual([sender.sent, sender.dropped], [1, 4]);
  assert.equal(said.length, 1); // the first drop is said, the next ones are within the rate limit
  sender.close();
});

test("a flood is bounded by the sends in flight and never throws", LIMIT, async (t) => {
  const rx = await receiver(t);
  const sender = new UdpEmitter("127.0.0.1", rx.port, { format: "json", maxInFlight: 64, warn: () => {} });
  const results = [];
  for (let i = 0; i < 5000; i++) results.push(sender.emit(`gen-${i}`, { feature: "f".repeat(500) }));
  assert.ok(sender.inFlight <= 64);
  assert.equal(results.filter((ok) => !ok).length, sender.dropped); // what was refused at once
  assert.ok(sender.dropped > 0 && sender.lastError === "too many sends in flight");
  await sender.flush();
  assert.equal(sender.sent + sender.dropped, 5000);
  sender.close();
});

test("file appends JSON lines with the default mode", LIMIT, async (t) => {
  const dir = tmpdir(t);
  const file = path.join(dir, "generations.log");
  const sender = openEmitter(`file://${file}`);
  assert.ok(sender instanceof FileEmitter);
  assert.ok(sender.emit("gen-1", { feature: "chat" }));
  await sender.flush();
  assert.ok(sender.emit("gen-2"));
  await sender.flush();
  const lines = fs.readFileSync(file, "utf8").trim().split("\n").map((line) => JSON.parse(line));
  assert.deepEqual(lines, [{ generation_id: "gen-1", feature: "chat" }, { generation_id: "gen-2" }]);
  const umask = process.umask();
  assert.equal(fs.statSync(file).mode & 0o777, 0o644 & ~umask);
  assert.equal(sender.sent, 2);
});

test("concurrent writes keep every line whole", LIMIT, async (t) => {
  const file = path.join(tmpdir(t), "generations.log");
  const sender = new FileEmitter(file, { maxInFlight: 4096 });
  for (let i = 0; i < 2000; i++) assert.ok(sender.emit(`w-${i}`, { feature: "x".repeat(300) }));
  await sender.flush();
  const ids = fs.readFileSync(file, "utf8").trim().split("\n").map((line) => JSON.parse(line).generation_id);
  assert.deepEqual(ids.sort(), Array.from({ length: 2000 }, (_, i) => `w-${i}`).sort());
});

test("file rotates past maxBytes", LIMIT, async (t) => {
  const dir = tmpdir(t);
  const file = path.join(dir, "generations.log");
  const sender = new FileEmitter(file, { maxBytes: 100 });
  for (let i = 0; i < 10; i++) {
    assert.ok(sender.emit(`gen-${String(i).padStart(2, "0")}`)); // 27 bytes a line
    await sender.flush();
  }
  const read = (name) => fs.readFileSync(name, "utf8").trim().split("\n").map((l) => JSON.parse(l).generation_id);
  assert.deepEqual(read(`${file}.1`), ["gen-04", "gen-05", "gen-06", "gen-07"]);
  assert.deepEqual(read(file), ["gen-08", "gen-09"]);
});

test("unwritable files and a FIFO without reader or room never throw nor wait", LIMIT, async (t) => {
  const dir = tmpdir(t);
  const blocker = path.join(dir, "a-file");
  fs.writeFileSync(blocker, "");
  for (const target of [path.join(dir, "missing", "x.log"), path.join(blocker, "x.log"), dir]) {
    const sender = new FileEmitter(target, { warn: () => {} });
    assert.equal(sender.emit("gen-1"), true); // started; the failure is counted when the kernel answers
    await sender.flush();
    assert.equal(sender.dropped, 1);
    assert.match(sender.lastError, /^write failed/);
  }
  const fifo = path.join(dir, "pipe");
  execFileSync("mkfifo", [fifo]);
  const sender = new FileEmitter(fifo, { warn: () => {} });
  sender.emit("gen-1");
  await sender.flush(); // a blocking open would wait for a reader forever
  assert.equal(sender.lastError, "FIFO has no reader");
  const reader = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  t.after(() => fs.closeSync(reader));
  for (let i = 0; i < 200; i++) {
    sender.emit(`gen-${i}`, { pad: "p".repeat(1000) }); // ~200 KB > a pipe's buffer
    await sender.flush();
  }
  assert.match(sender.lastError, /^target busy/);
  const first = Buffer.alloc(65536);
  fs.readSync(reader, first);
  assert.equal(JSON.parse(first.toString().split("\n")[0]).generation_id, "gen-0");
});

test("unusable targets give a null emitter and are said once when built", LIMIT, () => {
  for (const target of ["", "none", "udp://127.0.0.1", "file://relative/path", "udp://[::1", "file:///x?max_bytes=z"]) {
    const sender = openEmitter(target, { warn: () => {} });
    assert.ok(sender instanceof NullEmitter, target);
    assert.equal(sender.emit("gen-1"), false);
  }
  for (const [target, expected] of [
    ["udp://localhost", "udp target needs host:port"],
    ["udp://127.0.0.1:9467?format=jsn", 'unknown format "jsn"'],
    ["file:///nonexistent-dir-zenmux/ids.log", "directory /nonexistent-dir-zenmux does not exist"],
    ["tcp://127.0.0.1:1", "unknown target"],
  ]) {
    const { said, warn } = collect();
    const sender = openEmitter(target, { warn });
    assert.equal(said.length, 1, target);
    assert.ok(said[0].includes(expected), said[0]);
    for (let i = 0; i < 5; i++) sender.emit("gen-1");
    assert.equal(said.length, 1); // the drops that follow are within the rate limit
  }
  const { said, warn } = collect();
  const none = openEmitter("none", { warn });
  assert.equal(none.emit("gen-1"), false);
  assert.equal(none.dropped, 1);
  assert.deepEqual(said, []); // target none is silent
});

test("drops warn on the first, then at most once per interval", LIMIT, async (t) => {
  let now = 1000;
  const { said, warn } = collect();
  const dir = tmpdir(t);
  fs.mkdirSync(path.join(dir, "gone"));
  const sender = new FileEmitter(path.join(dir, "gone", "ids.log"), { clock: () => now, warn });
  assert.deepEqual(said, []);
  fs.rmdirSync(path.join(dir, "gone"));
  sender.emit("gen-1");
  await sender.flush();
  assert.equal(said.length, 1);
  assert.ok(said[0].includes("1 generation id(s) dropped"), said[0]);
  for (let i = 0; i < 9; i++) {
    now += 1;
    sender.emit("gen-2");
    await sender.flush();
  }
  assert.equal(said.length, 1);
  now += WARN_INTERVAL_SECONDS;
  sender.emit("gen-3");
  await sender.flush();
  assert.equal(said.length, 2);
  assert.ok(said[1].includes("10 generation id(s) dropped (11 in all)"), said[1]);
  fs.mkdirSync(path.join(dir, "gone"));
  sender.emit("gen-4");
  await sender.flush();
  assert.deepEqual([sender.sent, sender.dropped], [1, 11]);
});

test("a warning sink or emitter that throws never reaches the caller", LIMIT, () => {
  const sender = openEmitter("tcp://x", {
    warn: () => {
      throw new Error("boom");
    },
  });
  assert.equal(sender.emit("gen-1"), false);
});

test("an emitting process exits on its own, and emit() uses $ZENMUX_EMIT", LIMIT, async (t) => {
  const rx = await receiver(t);
  const script = `
    const { openEmitter, emit } = require("zenmux-emit");
    openEmitter("udp://127.0.0.1:9").emit("gen-1");
    emit("gen-2", { feature: "env" });
    openEmitter("udp://localhost:9").emit("gen-3");
  `;
  const child = spawn(process.execPath, ["-e", script], {
    cwd: fileURLToPath(new URL("..", import.meta.url)), // the package: require("zenmux-emit") resolves to itself
    env: { ...process.env, ZENMUX_EMIT: `udp://127.0.0.1:${rx.port}?format=json` },
  });
  t.after(() => child.kill());
  const [code] = await once(child, "exit"); // a referenced socket would keep it running (the test times out)
  assert.equal(code, 0);
  assert.deepEqual(JSON.parse(await rx.next()), { generation_id: "gen-2", feature: "env" });
});

test("CommonJS and ESM entries share one module instance", LIMIT, () => {
  const require = createRequire(import.meta.url);
  assert.equal(require("zenmux-emit").openEmitter, openEmitter);
});
