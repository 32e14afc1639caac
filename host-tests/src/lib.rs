//! A native proxy-wasm host for tenantgate.wasm (issue 5).
