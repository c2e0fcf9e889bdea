// The ES module entry's types: the same declarations as the CommonJS entry.
export * from "./index.cjs";
