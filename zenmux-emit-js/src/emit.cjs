"use strict";
// Sending generation ids to the exporter: UDP datagrams or JSON lines, never blocking, never throwing.
//
// The Node twin of zenmux-emit's emit.py: the same targets, id pattern and line format (a test compares them).
// Node's I/O is asynchronous, so `emit()` returns true when the send was started and false when the id was
// dropped at once (invalid id, unusable target, too many sends in flight); a send that fails later is counted
// in `dropped` when the kernel answers, and `flush()` waits for the sends in flight.

const dgram = require("node:dgram");
const dns = require("node:dns");
const fs = require("node:fs");
const net = require("node:net");
const path = require("node:path");
const { performance } = require("node:perf_hooks");

const ENV_VAR = "ZENMUX_EMIT";
const DEFAULT_TARGET = "udp://127.0.0.1:9467";
const DEFAULT_ID_FIELD = "generation_id";
const DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024;
// The largest UDP payload over IPv4; the exporter's default max_datagram_bytes.
const MAX_DATAGRAM_BYTES = 65507;
const MAX_LABEL_VALUE_CHARS = 1024;
// After the first drop's warning, at most one warning per this many seconds (with the count since the last).
const WARN_INTERVAL_SECONDS = 60;
// Sends started but not yet answered by the kernel; past this an id is dropped rather than queued in memory.
const DEFAULT_MAX_IN_FLIGHT = 1024;
// The exporter's id pattern (exporter/ids.py, zenmux_emit.emit.ID_PATTERN).
const ID_PATTERN = "[A-Za-z0-9_.:-]{1,128}";
const VALID_ID = new RegExp(`^${ID_PATTERN}$`);

function validId(generationId) {
  // ^...$ without the m flag is Python's fullmatch: no trailing newline slips through.
  return typeof generationId === "string" && VALID_ID.test(generationId);
}

function firstCodePoints(text, limit) {
  // Python slices by code point; cut there too, so a label longer than the limit encodes the same.
  if (text.length <= limit) return text;
  let units = 0;
  for (let points = 0; points < limit && units < text.length; points++) {
    units += text.codePointAt(units) > 0xffff ? 2 : 1;
  }
  return text.slice(0, units);
}

/** A number as Python's str() writes it, so that both emitters send the same label text. */
function numberText(value) {
  if (Number.isNaN(value)) return "nan";
  if (!Number.isFinite(value)) return value > 0 ? "inf" : "-inf";
  // JS has no int/float split: an integral number is written as Python writes an int (3, not 3.0).
  if (Number.isInteger(value)) return BigInt(value).toString();
  // Otherwise Python's repr: the same shortest digits as JS, but scientific below 1e-4 and from 1e16 on,
  // with a signed exponent of at least two digits (1.5e-07, not 1.5e-7).
  const [mantissa, exponentText] = value.toExponential().split("e");
  const exponent = Number(exponentText);
  const sign = value < 0 ? "-" : "";
  if (exponent < -4 || exponent >= 16) {
    const magnitude = String(Math.abs(exponent)).padStart(2, "0");
    return `${mantissa}e${exponent < 0 ? "-" : "+"}${magnitude}`;
  }
  const digits = mantissa.replace("-", "").replace(".", "");
  if (exponent < 0) return `${sign}0.${"0".repeat(-exponent - 1)}${digits}`;
  return `${sign}${digits.slice(0, exponent + 1)}.${digits.slice(exponent + 1)}`;
}

function labelText(value) {
  switch (typeof value) {
    case "string":
      return value;
    case "boolean":
      return value ? "true" : "false";
    case "number":
      return numberText(value);
    case "bigint":
      return String(value);
    default:
      return null; // objects, null, undefined, functions: left out, as Python leaves out non-scalars
  }
}

function labelEntries(labels) {
  if (labels == null || typeof labels !== "object") return [];
  return labels instanceof Map ? [...labels.entries()] : Object.entries(labels);
}

/** One JSON line (with the trailing newline): the id under idField, then the labels as string fields. */
function encodeJson(generationId, labels, idField = DEFAULT_ID_FIELD) {
  // Built by hand rather than from an object: JS objects put integer-like keys first, Python keeps the order.
  let line = `{${JSON.stringify(idField)}:${JSON.stringify(generationId)}`;
  const seen = new Set([idField]);
  for (const [name, value] of labelEntries(labels)) {
    const text = labelText(value);
    if (typeof name !== "string" || seen.has(name) || text === null) continue;
    seen.add(name);
    line += `,${JSON.stringify(name)}:${JSON.stringify(firstCodePoints(text, MAX_LABEL_VALUE_CHARS))}`;
  }
  return Buffer.from(`${line}}\n`, "utf8");
}

function describe(value) {
  let text;
  try {
    text = typeof value === "string" ? JSON.stringify(value) : String(value);
  } catch {
    text = typeof value;
  }
  return text.slice(0, 80);
}

function defaultWarn(message) {
  process.emitWarning(message, { type: "ZenmuxEmitWarning" });
}

function monotonicSeconds() {
  return performance.now() / 1000;
}

/** Shared bookkeeping: sent, dropped, the last reason, the sends in flight and the rate-limited warnings. */
class Counted {
  constructor(options = {}) {
    this.sent = 0;
    this.dropped = 0;
    this.lastError = "";
    this._clock = options.clock ?? monotonicSeconds;
    this._warn = options.warn ?? defaultWarn;
    this._maxInFlight = options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
    this._inFlight = 0;
    this._idle = [];
    this._warnedAt = null;
    this._unwarned = 0;
  }

  get inFlight() {
    return this._inFlight;
  }

  /** Resolves once every send started so far has been answered (sent or dropped); never rejects. */
  flush() {
    if (this._inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this._idle.push(resolve));
  }

  _say(message) {
    try {
      this._warn(message);
    } catch {
      // a broken warning sink must not reach the application either
    }
  }

  _unusable(reason) {
    // The target cannot work as given: say so once now, so a typo is seen before any id is lost.
    this.lastError = reason;
    this._warnedAt = this._clock();
    this._say(`zenmux-emit: ${reason}; ids are dropped until this is fixed`);
  }

  _drop(reason) {
    this.dropped += 1;
    this.lastError = reason;
    this._unwarned += 1;
    const now = this._clock();
    if (this._warnedAt === null || now - this._warnedAt >= WARN_INTERVAL_SECONDS) {
      this._say(`zenmux-emit: ${this._unwarned} generation id(s) dropped (${this.dropped} in all): ${reason}`);
      this._warnedAt = now;
      this._unwarned = 0;
    }
    return false;
  }

  _begin() {
    if (this._inFlight >= this._maxInFlight) return false;
    this._inFlight += 1;
    return true;
  }

  _end(error) {
    this._inFlight -= 1;
    if (error) this._drop(error);
    else this.sent += 1;
    if (this._inFlight === 0) {
      for (const resolve of this._idle.splice(0)) resolve();
    }
  }
}

/** Discards every id (target `none`); also what a target that cannot be parsed turns into. */
class NullEmitter extends Counted {
  constructor(reason = "", options = {}) {
    super(options);
    this.reason = reason;
    if (reason) this._unusable(reason);
  }

  emit(_generationId, _labels) {
    if (!this.reason) {
      // target none: discarding is what was asked for, so it is counted but not said
      this.dropped += 1;
      return false;
    }
    return this._drop(this.reason);
  }

  close() {}
}

/** Sends each id as one datagram from an unreferenced socket; no listener or a full buffer drops it. */
class UdpEmitter extends Counted {
  constructor(host = "127.0.0.1", port = 9467, options = {}) {
    super(options);
    this.format = options.format ?? "plain";
    this.idField = options.idField ?? DEFAULT_ID_FIELD;
    this.host = host === "localhost" ? "127.0.0.1" : host.replace(/^\[(.*)\]$/, "$1");
    this.port = port;
    this._sock = null;
    this._address = null;
    this._waiting = []; // sends started while the host name resolves (bounded by maxInFlight)
    this._closed = false;
    if (this.format !== "plain" && this.format !== "json") {
      this._unusable(`udp://${host}:${port}: unknown format ${JSON.stringify(this.format)} (plain or json)`);
      return;
    }
    if (!Number.isInteger(port) || port <= 0 || port >= 65536) {
      this._unusable(`udp://${host}:${port}: port out of range`);
      return;
    }
    const family = net.isIP(this.host);
    if (family !== 0) {
      this._open(this.host, family);
      return;
    }
    // Resolved once here, so emit() never waits on DNS; use an IP literal to avoid even this lookup.
    this._resolving = true;
    dns.lookup(this.host, (err, address, resolvedFamily) => {
      this._resolving = false;
      if (err || this._closed) {
        this._unusable(`cannot set up udp://${host}:${port}: ${err ? err.message : "closed"}`);
      } else {
        this._open(address, resolvedFamily);
      }
      for (const payload of this._waiting.splice(0)) this._send(payload);
    });
  }

  _open(address, family) {
    try {
      const sock = dgram.createSocket(family === 6 ? "udp6" : "udp4");
      // Failed sends are counted by their callbacks; an error of the socket itself is kept as the reason.
      sock.on("error", (err) => {
        this.lastError = `socket error: ${err.message}`;
      });
      sock.unref(); // never keep the application's process alive
      this._sock = sock;
      this._address = address;
    } catch (err) {
      this._unusable(`cannot set up udp://${this.host}:${this.port}: ${err.message}`);
    }
  }

  emit(generationId, labels) {
    try {
      if (this._closed) return this._drop("socket closed");
      if (this._sock === null && !this._resolving) return this._drop(this.lastError || "socket closed");
      if (!validId(generationId)) return this._drop(`invalid id ${describe(generationId)}`);
      const payload =
        this.format === "json" ? encodeJson(generationId, labels, this.idField) : Buffer.from(`${generationId}\n`);
      if (payload.length > MAX_DATAGRAM_BYTES) return this._drop("datagram too large");
      if (!this._begin()) return this._drop("too many sends in flight");
      if (this._resolving) this._waiting.push(payload);
      else this._send(payload);
      return true;
    } catch (err) {
      // an emitter must never throw into the application
      return this._drop(`send failed: ${err && err.message}`);
    }
  }

  _send(payload) {
    if (this._sock === null) {
      this._end(this.lastError || "socket closed");
      return;
    }
    try {
      this._sock.send(payload, this.port, this._address, (err) => this._end(err ? `send failed: ${err.message}` : ""));
    } catch (err) {
      this._end(`send failed: ${err && err.message}`);
    }
  }

  close() {
    this._closed = true;
    const sock = this._sock;
    this._sock = null;
    if (sock !== null) {
      try {
        sock.close();
      } catch {
        // already closed
      }
    }
  }
}

const APPEND_FLAGS =
  fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT | (fs.constants.O_NONBLOCK ?? 0);

/**
 * Appends each id as one JSON line with a single O_APPEND write, so processes may share a file.
 *
 * The file is opened per line, which follows any rotation done by others; past maxBytes the emitter renames
 * the file to PATH.1. Opening is non-blocking: a FIFO without a reader, or a full one, drops the line.
 */
class FileEmitter extends Counted {
  constructor(filePath, options = {}) {
    super(options);
    this.path = filePath;
    this.idField = options.idField ?? DEFAULT_ID_FIELD;
    this.maxBytes = options.maxBytes ?? DEFAULT_MAX_FILE_BYTES;
    this.mode = options.mode ?? 0o644;
    const directory = path.dirname(this.path) || ".";
    let isDirectory = false;
    try {
      isDirectory = fs.statSync(directory).isDirectory();
    } catch {
      isDirectory = false;
    }
    if (!isDirectory) {
      // Kept (the directory may be created later), but a typo should not go unnoticed.
      this._unusable(`file://${this.path}: directory ${directory} does not exist`);
    }
  }

  emit(generationId, labels) {
    try {
      if (!validId(generationId)) return this._drop(`invalid id ${describe(generationId)}`);
      const line = encodeJson(generationId, labels, this.idField);
      if (!this._begin()) return this._drop("too many writes in flight");
      this._write(line).then(
        (error) => this._end(error),
        (err) => this._end(`write failed: ${err && err.message}`),
      );
      return true;
    } catch (err) {
      return this._drop(`write failed: ${err && err.message}`);
    }
  }

  async _write(line) {
    let handle = null;
    try {
      handle = await fs.promises.open(this.path, APPEND_FLAGS, this.mode);
      let { bytesWritten: written } = await handle.write(line);
      if (written > 0 && written < line.length) {
        // a nearly full disk or pipe: finish the line if at all possible
        written += (await handle.write(line, written)).bytesWritten;
      }
      if (written !== line.length) return "short write";
      if (this.maxBytes > 0) await this._rotateIfLarge(handle);
      return "";
    } catch (err) {
      if (err && err.code === "EAGAIN") return "target busy (a FIFO without room)";
      if (err && err.code === "ENXIO") return "FIFO has no reader";
      return `write failed: ${err && err.message}`;
    } finally {
      if (handle !== null) await handle.close().catch(() => {});
    }
  }

  async _rotateIfLarge(handle) {
    // Best effort (the next write tries again); only rotate the file written to, since another process may
    // have rotated it a moment ago.
    try {
      const info = await handle.stat();
      if (info.size < this.maxBytes || !info.isFile()) return;
      if ((await fs.promises.stat(this.path)).ino === info.ino) {
        await fs.promises.rename(this.path, `${this.path}.1`);
      }
    } catch {
      // the next write tries again
    }
  }

  close() {}
}

function parseTarget(target) {
  const url = new URL(target); // throws on what cannot be parsed
  const query = url.searchParams;
  return { url, query, idField: query.get("id_field") ?? DEFAULT_ID_FIELD };
}

/** An emitter for a target string; an unusable target gives a NullEmitter that says why. */
function openEmitter(target, options = {}) {
  const text = String(target ?? "").trim();
  if (text === "" || text === "none") return new NullEmitter("", options);
  let parsed;
  try {
    parsed = parseTarget(text);
  } catch (err) {
    return new NullEmitter(`cannot parse target ${JSON.stringify(text)}: ${err.message}`, options);
  }
  const { url, query, idField } = parsed;
  if (url.protocol === "udp:") {
    if (url.hostname === "" || url.port === "") {
      return new NullEmitter(`udp target needs host:port, got ${JSON.stringify(text)}`, options);
    }
    const format = query.get("format") ?? "plain";
    return new UdpEmitter(url.hostname, Number(url.port), { ...options, format, idField });
  }
  if (url.protocol === "file:") {
    if (!["", "localhost"].includes(url.host) || !url.pathname.startsWith("/")) {
      return new NullEmitter(`file target needs an absolute path (file:///...), got ${JSON.stringify(text)}`, options);
    }
    const maxBytesText = query.get("max_bytes") ?? String(DEFAULT_MAX_FILE_BYTES);
    if (!/^\s*[+-]?\d+\s*$/.test(maxBytesText)) {
      return new NullEmitter(`cannot parse target ${JSON.stringify(text)}: max_bytes must be an integer`, options);
    }
    return new FileEmitter(decodeURIComponent(url.pathname), {
      ...options,
      idField,
      maxBytes: Number.parseInt(maxBytesText, 10),
    });
  }
  return new NullEmitter(`unknown target ${JSON.stringify(text)} (udp://host:port, file:///path or none)`, options);
}

let defaultInstance = null;

/** The process-wide emitter, built once from $ZENMUX_EMIT (default udp://127.0.0.1:9467). */
function defaultEmitter() {
  if (defaultInstance === null) defaultInstance = openEmitter(process.env[ENV_VAR] ?? DEFAULT_TARGET);
  return defaultInstance;
}

/** Sends one id (and optional labels) through the default emitter; never throws. */
function emit(generationId, labels) {
  try {
    return defaultEmitter().emit(generationId, labels);
  } catch {
    return false;
  }
}

module.exports = {
  DEFAULT_ID_FIELD,
  DEFAULT_MAX_FILE_BYTES,
  DEFAULT_MAX_IN_FLIGHT,
  DEFAULT_TARGET,
  ENV_VAR,
  FileEmitter,
  ID_PATTERN,
  MAX_DATAGRAM_BYTES,
  MAX_LABEL_VALUE_CHARS,
  NullEmitter,
  UdpEmitter,
  WARN_INTERVAL_SECONDS,
  defaultEmitter,
  emit,
  encodeJson,
  openEmitter,
  validId,
};
