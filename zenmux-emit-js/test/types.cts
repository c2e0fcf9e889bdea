// The CommonJS entry's declarations, type-checked like types.mts.
import zenmux = require("zenmux-emit");

const emitter: zenmux.AnyEmitter = zenmux.openEmitter("file:///var/log/app/generations.log");
const fetch: zenmux.FetchFunction = zenmux.captureFetch(emitter, { labels: { feature: "chat" } });
export = fetch;
