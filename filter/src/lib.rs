//! tenantgate.wasm: the proxy-wasm adapter over the engine (issue 4).
