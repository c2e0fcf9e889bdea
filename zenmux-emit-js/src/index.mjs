// The ES module entry: the CommonJS build's exports under their names, so that `import` and `require` share one
// instance (one process-wide emitter) rather than two copies of the module.
import cjs from "./index.cjs";

export const {
  DEFAULT_ID_FIELD,
  DEFAULT_MAX_FILE_BYTES,
  DEFAULT_MAX_IN_FLIGHT,
  DEFAULT_TARGET,
  EDGE_BYTES,
  ENV_VAR,
  FileEmitter,
  GENERATION_ID_HEADER,
  ID_PATTERN,
  MAX_DATAGRAM_BYTES,
  MAX_LABEL_VALUE_CHARS,
  MAX_SSE_BYTES,
  MAX_SSE_EVENTS,
  NullEmitter,
  UdpEmitter,
  WARN_INTERVAL_SECONDS,
  captureFetch,
  defaultEmitter,
  emit,
  encodeJson,
  extractId,
  findBodyId,
  installGlobalFetchCapture,
  isGenerationRequest,
  openEmitter,
  validId,
} = cjs;
