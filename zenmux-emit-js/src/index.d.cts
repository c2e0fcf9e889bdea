// Type declarations of zenmux-emit (hand-written; checked against the SDKs' types by test/types.ts).

/** A label's value; numbers and booleans are sent as their text ("3", "true"). */
export type LabelValue = string | number | bigint | boolean;
export type Labels = Readonly<Record<string, LabelValue>> | ReadonlyMap<string, LabelValue>;

/** Anything that can take a generation id: what captureFetch sends to. */
export interface Emitter {
  emit(generationId: string, labels?: Labels | null): boolean;
}

export interface EmitterOptions {
  /** Seconds on a monotonic clock (default performance.now() / 1000): paces the warnings. */
  clock?: () => number;
  /** Where warnings go (default process.emitWarning with type "ZenmuxEmitWarning"). */
  warn?: (message: string) => void;
  /** Sends started and not yet answered; past this an id is dropped (default 1024). */
  maxInFlight?: number;
}

declare abstract class CountedEmitter implements Emitter {
  /** Ids handed to the kernel (a datagram sent, a line written). */
  sent: number;
  /** Ids not sent: invalid, unusable target, too many in flight, failed send or write. */
  dropped: number;
  /** The reason of the last drop, or why the target is unusable; "" if none. */
  lastError: string;
  /** Sends started and not yet answered. */
  readonly inFlight: number;
  /** True when the send was started; false when the id was dropped at once. Never throws. */
  emit(generationId: string, labels?: Labels | null): boolean;
  /** Resolves once every send started so far is answered (counted in sent or dropped). Never rejects. */
  flush(): Promise<void>;
  close(): void;
}

/** Discards every id (target "none", or a target that cannot be used: then each drop is counted and said). */
export declare class NullEmitter extends CountedEmitter {
  constructor(reason?: string, options?: EmitterOptions);
  readonly reason: string;
}

export interface UdpEmitterOptions extends EmitterOptions {
  /** "plain" (one id per datagram, labels dropped) or "json" (one JSON object per datagram). */
  format?: "plain" | "json";
  /** The JSON key of the id (default "generation_id"). */
  idField?: string;
}

/** One datagram per id from an unreferenced socket (it never keeps the process alive). */
export declare class UdpEmitter extends CountedEmitter {
  constructor(host?: string, port?: number, options?: UdpEmitterOptions);
  readonly format: string;
  readonly idField: string;
  readonly host: string;
  readonly port: number;
}

export interface FileEmitterOptions extends EmitterOptions {
  idField?: string;
  /** Past this size the file is renamed to PATH.1 (default 64 MiB; 0 never). */
  maxBytes?: number;
  /** The new file's mode (default 0o644, less the umask). */
  mode?: number;
}

/** One JSON line per id, appended with a single O_APPEND write. */
export declare class FileEmitter extends CountedEmitter {
  constructor(path: string, options?: FileEmitterOptions);
  readonly path: string;
  readonly idField: string;
  readonly maxBytes: number;
}

export type AnyEmitter = UdpEmitter | FileEmitter | NullEmitter;

/** udp://HOST:PORT[?format=json][&id_field=K], file:///PATH[?max_bytes=N][&id_field=K], "none" or "". */
export declare function openEmitter(target: string, options?: EmitterOptions): AnyEmitter;
/** The process-wide emitter, built once from $ZENMUX_EMIT (default udp://127.0.0.1:9467). */
export declare function defaultEmitter(): AnyEmitter;
/** Sends one id through the default emitter; never throws. */
export declare function emit(generationId: string, labels?: Labels | null): boolean;
/** What the exporter accepts as an id: 1-128 characters of [A-Za-z0-9_.:-]. */
export declare function validId(generationId: unknown): generationId is string;
/** One JSON line (with its newline): the id under idField, then the scalar labels as strings. */
export declare function encodeJson(generationId: string, labels?: Labels | null, idField?: string): Uint8Array;

/** What `labels` (as a function) and `match` are given about a request. */
export interface RequestSummary {
  method: string;
  url: string;
}

export interface RequestWithHeaders extends RequestSummary {
  headers: Headers;
}

/** The shape of fetch, loose enough for every SDK's own `Fetch` type. */
export type FetchFunction = (input: string | URL | Request, init?: RequestInit) => Promise<Response>;

export interface CaptureOptions {
  /** Fixed labels for this client, or a function of the request returning them. */
  labels?: Labels | ((request: RequestWithHeaders) => Labels | null | undefined);
  /** The fetch to call (default globalThis.fetch, looked up at each call). */
  fetch?: FetchFunction;
  /** Which requests to look at (default isGenerationRequest). */
  match?: (request: RequestSummary) => boolean;
  /** The response header holding the id (default x-generation-id). */
  header?: string;
}

/** A fetch for the SDKs' `fetch` option that emits each generation's id; the emitter defaults to defaultEmitter(). */
export declare function captureFetch(emitter?: Emitter | null, options?: CaptureOptions): FetchFunction;
/** Wraps globalThis.fetch (opt-in, for a library without a fetch option); returns what undoes it. */
export declare function installGlobalFetchCapture(
  emitter?: Emitter | null,
  options?: Omit<CaptureOptions, "fetch">,
): () => void;
/** The default match: a POST to …/chat/completions, /completions, /responses, /messages, /embeddings or :generateContent. */
export declare function isGenerationRequest(request: RequestSummary): boolean;
/** The id in a decoded JSON response or event: id, responseId, message.id or response.id. */
export declare function extractId(document: unknown): string | null;
/** The id of a JSON body, given all of it (whole) or its first and last bytes. */
export declare function findBodyId(head: Uint8Array, tail?: Uint8Array, whole?: boolean): string | null;

export declare const ENV_VAR: "ZENMUX_EMIT";
export declare const DEFAULT_TARGET: string;
export declare const DEFAULT_ID_FIELD: string;
export declare const DEFAULT_MAX_FILE_BYTES: number;
export declare const DEFAULT_MAX_IN_FLIGHT: number;
export declare const MAX_DATAGRAM_BYTES: number;
export declare const MAX_LABEL_VALUE_CHARS: number;
export declare const WARN_INTERVAL_SECONDS: number;
export declare const ID_PATTERN: string;
export declare const GENERATION_ID_HEADER: string;
export declare const EDGE_BYTES: number;
export declare const MAX_SSE_EVENTS: number;
export declare const MAX_SSE_BYTES: number;
