// For tests/test_emit_js.py: reads a table of ids, labels and targets as JSON on stdin and prints what this
// package makes of them (validity, JSON lines, emitter kinds), for comparison with zenmux_emit's answers.
// Labels arrive as [name, value] pairs and are given as a Map, so that their order survives (a JS object would
// put integer-like names first).
import { FileEmitter, NullEmitter, UdpEmitter, encodeJson, openEmitter, validId } from "zenmux-emit";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const table = JSON.parse(input);
const kind = (emitter) =>
  emitter instanceof UdpEmitter ? "udp" : emitter instanceof FileEmitter ? "file" : emitter instanceof NullEmitter ? "null" : "?";
const targets = table.targets.map((target) => {
  const emitter = openEmitter(target, { warn: () => {} });
  emitter.close();
  return [kind(emitter), emitter.lastError !== ""];
});
process.stdout.write(
  JSON.stringify({
    valid: table.ids.map((id) => validId(id)),
    lines: table.lines.map(([id, pairs, idField]) => encodeJson(id, new Map(pairs), idField ?? undefined).toString("utf8")),
    targets,
  }),
);
