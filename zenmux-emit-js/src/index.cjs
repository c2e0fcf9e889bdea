"use strict";
// zenmux-emit for Node: the application side of zenmux-exporter, no dependencies.
// emit.cjs sends generation ids (UDP or a JSON-lines file); capture.cjs finds them in the SDKs' fetch responses.

const emit = require("./emit.cjs");
const capture = require("./capture.cjs");

module.exports = { ...emit, ...capture };
