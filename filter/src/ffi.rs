//! Our own declarations of the proxy-wasm host calls the filter makes.
//!
//! The SDK's wrappers panic on any status they do not expect, and a panic
//! traps the VM, taking the worker's traffic with it. Here every status comes
//! back as a value. The SDK is still used for its dispatcher (context
//! callbacks) and its `proxy_on_memory_allocate` export.

#![allow(unsafe_code)]

use std::ptr::{null, null_mut};

pub const OK: u32 = 0;
pub const NOT_FOUND: u32 = 1;
pub const CAS_MISMATCH: u32 = 8;

pub const MAP_REQUEST_HEADERS: u32 = 0;
pub const MAP_REQUEST_TRAILERS: u32 = 1;
pub const MAP_RESPONSE_HEADERS: u32 = 2;
pub const BUFFER_GRPC_RECEIVE: u32 = 5;
pub const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
pub const STREAM_REQUEST: u32 = 0;
pub const METRIC_COUNTER: u32 = 0;

pub const METRIC_GAUGE: u32 = 1;
pub const METRIC_HISTOGRAM: u32 = 2;

pub const LOG_INFO: u32 = 2;

pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;
pub const LOG_CRITICAL: u32 = 5;

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_grpc_send(
        token: u32,
        message_ptr: *const u8,
        message_len: usize,
        end_stream: bool,
    ) -> u32;
    fn proxy_grpc_cancel(token: u32) -> u32;
}

/// A host call that did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    CasMismatch,
    Status(u32),
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostError::CasMismatch => f.write_str("cas mismatch"),
            HostError::Status(s) => write!(f, "host status {s}"),
        }
    }
}

fn check(status: u32) -> Result<(), HostError> {
    match status {
        OK => Ok(()),
        CAS_MISMATCH => Err(HostError::CasMismatch),
        s => Err(HostError::Status(s)),
    }
}

/// Takes ownership of a buffer the host allocated through our
/// `proxy_on_memory_allocate` (the SDK's export, a `Vec` allocation).
fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host returned `size` bytes it allocated for us with
    // `proxy_on_memory_allocate`, which hands out `Vec<u8>` storage.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

pub fn log(level: u32, message: &str) {
    // SAFETY: pointer and length describe a live slice for the whole call.
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

pub fn now_ns() -> Result<u64, HostError> {
    let mut t: u64 = 0;
    // SAFETY: `t` outlives the call.
    check(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

pub fn plugin_configuration() -> Result<Vec<u8>, HostError> {
    buffer(BUFFER_PLUGIN_CONFIGURATION, usize::MAX)
}

/// The message of a gRPC call's answer (`size` bytes, as the host announced).
pub fn grpc_response(size: usize) -> Result<Vec<u8>, HostError> {
    buffer(BUFFER_GRPC_RECEIVE, size)
}

/// Sends a message on a gRPC stream opened with the SDK's
/// `open_grpc_stream` (which registers the stream with its dispatcher).
pub fn grpc_send(token: u32, message: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointer and length describe a live slice for the whole call.
    check(unsafe { proxy_grpc_send(token, message.as_ptr(), message.len(), false) })
}

/// Cancels a gRPC stream (no close callback follows).
pub fn grpc_cancel(token: u32) -> Result<(), HostError> {
    // SAFETY: no pointers.
    check(unsafe { proxy_grpc_cancel(token) })
}

fn buffer(kind: u32, max: usize) -> Result<Vec<u8>, HostError> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: out-pointers outlive the call.
    let status = unsafe { proxy_get_buffer_bytes(kind, 0, max, &mut data, &mut size) };
    match status {
        OK => Ok(take(data, size)),
        NOT_FOUND => Ok(Vec::new()),
        s => Err(HostError::Status(s)),
    }
}

/// A header map as the host serialized it, kept in one buffer: the pairs
/// borrow from it (no allocation per header).
pub struct HeaderMap(Vec<u8>);

/// The serialized pairs of a header map.
pub fn header_map(map: u32) -> Result<HeaderMap, HostError> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: out-pointers outlive the call.
    check(unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) })?;
    Ok(HeaderMap(take(data, size)))
}

impl HeaderMap {
    /// The pairs, borrowed; `None` if the serialization is malformed.
    pub fn pairs(&self) -> Option<Vec<(&str, &[u8])>> {
        crate::map::decode(&self.0)
    }
}

pub fn remove_header(map: u32, name: &str) -> Result<(), HostError> {
    // SAFETY: pointer and length describe a live slice for the whole call.
    check(unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) })
}

pub fn add_header(map: u32, name: &str, value: &str) -> Result<(), HostError> {
    // SAFETY: pointers and lengths describe live slices for the whole call.
    check(unsafe {
        proxy_add_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

pub fn replace_header(map: u32, name: &str, value: &str) -> Result<(), HostError> {
    // SAFETY: pointers and lengths describe live slices for the whole call.
    check(unsafe {
        proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

pub fn send_local_response(
    status: u16,
    details: &str,
    body: &str,
    headers: &[(&str, &str)],
    grpc_status: u32,
) -> Result<(), HostError> {
    let h = crate::map::encode(headers);
    // SAFETY: pointers and lengths describe live slices for the whole call.
    check(unsafe {
        proxy_send_local_response(
            u32::from(status),
            details.as_ptr(),
            details.len(),
            if body.is_empty() {
                null()
            } else {
                body.as_ptr()
            },
            body.len(),
            h.as_ptr(),
            h.len(),
            i32::try_from(grpc_status).unwrap_or(-1),
        )
    })
}

/// A property (`["source", "address"]`); `Ok(None)` when the host has none.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
    let mut encoded = Vec::new();
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            encoded.push(0);
        }
        encoded.extend_from_slice(part.as_bytes());
    }
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: pointers describe live memory for the whole call.
    let status =
        unsafe { proxy_get_property(encoded.as_ptr(), encoded.len(), &mut data, &mut size) };
    match status {
        OK => Ok(Some(take(data, size))),
        NOT_FOUND => Ok(None),
        s => Err(HostError::Status(s)),
    }
}

/// Sets a property of the request. Envoy keeps a one-part `path` as the
/// filter state `wasm.<path>` (bytes, read as text by
/// `%FILTER_STATE(wasm.<path>:PLAIN)%`).
pub fn set_property(path: &str, value: &str) -> Result<(), HostError> {
    // SAFETY: pointers describe live memory for the whole call.
    check(unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) })
}

thread_local! {
    /// Metric ids this VM defined, by kind and name. Envoy hands out a new id
    /// (and keeps a new table entry for the life of the VM) on every
    /// `proxy_define_metric`, even for a name it knows, so a reload that
    /// defined every series again grew Envoy's memory; a name is defined once
    /// per VM and its id reused by every later bundle.
    static METRIC_IDS: std::cell::RefCell<std::collections::HashMap<(u32, String), u32>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

pub fn define_metric(kind: u32, name: &str) -> Result<u32, HostError> {
    let known = METRIC_IDS.with(|m| m.borrow().get(&(kind, name.to_string())).copied());
    if let Some(id) = known {
        return Ok(id);
    }
    let mut id: u32 = 0;
    // SAFETY: pointers describe live memory for the whole call.
    check(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
    METRIC_IDS.with(|m| m.borrow_mut().insert((kind, name.to_string()), id));
    Ok(id)
}

/// The host's log level for this plugin (0 trace .. 5 critical).
pub fn log_level() -> Result<u32, HostError> {
    let mut level = 0u32;
    // SAFETY: `level` is a live u32 for the whole call.
    check(unsafe { proxy_get_log_level(&mut level) })?;
    Ok(level)
}

pub fn set_tick_period_ms(period: u32) -> Result<(), HostError> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_tick_period_milliseconds(period) })
}

/// Lets a paused request go on.
pub fn continue_request() -> Result<(), HostError> {
    // SAFETY: no pointers.
    check(unsafe { proxy_continue_stream(STREAM_REQUEST) })
}

pub fn increment_metric(id: u32, by: i64) {
    // SAFETY: plain values.
    let _ = unsafe { proxy_increment_metric(id, by) };
}

pub fn record_metric(id: u32, value: u64) {
    // SAFETY: plain values.
    let _ = unsafe { proxy_record_metric(id, value) };
}

/// `Ok(None)` when the key is missing; the value and its CAS token otherwise.
pub fn get_shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: out-pointers outlive the call; the buffer is ours afterwards.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        OK => Ok(Some((take(data, size), cas))),
        NOT_FOUND => Ok(None),
        s => Err(HostError::Status(s)),
    }
}

/// Sets a value; `cas` 0 sets unconditionally.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), HostError> {
    let ptr = if value.is_empty() {
        null()
    } else {
        value.as_ptr()
    };
    // SAFETY: pointers and lengths describe live slices for the whole call.
    check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), ptr, value.len(), cas) })
}
