//! Envoy's dynamic-module ABI, declared here (the official SDK is not on
//! crates.io): the hooks this module exports and the callbacks it calls,
//! for ABI version `v0.2.0` (Envoy 1.40). Each signature was checked
//! against `source/extensions/dynamic_modules/abi/abi.h` and each symbol
//! against the symbols the Envoy 1.40 binary exports (see
//! `docs/decisions.md`, "Native build: one Envoy ABI version").
//!
//! Boundary: the only `unsafe` code of the crate. Every hook catches
//! unwinding (a panic must never cross into Envoy; release builds abort on
//! panic as the last line of defence), and every callback's status comes
//! back as a value ([`HostError`]).

#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CStr};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{null, null_mut};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::host::{
    callout_init, check_labels, metrics_result, Attribute, BodyStatus, CalloutResult, HeaderKind,
    HeadersStatus, HostError, LogLevel, Metric, MetricKind, TrailersStatus,
};

/// The ABI version this module is built for; Envoy compares it with its own
/// (`strings envoy | grep '^v0\.'` shows the binary's).
pub const ABI_VERSION: &CStr = c"v0.2.0";

type EnvoyFilterPtr = *mut c_void;
type ModuleFilterPtr = *const c_void;
type EnvoyConfigPtr = *mut c_void;
type ModuleConfigPtr = *const c_void;

/// `envoy_dynamic_module_type_envoy_buffer` (Envoy owns the bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const u8,
    length: usize,
}

impl EnvoyBuffer {
    const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: null(),
        length: 0,
    };

    /// # Safety
    /// `ptr` must be null or point to `length` bytes alive for `'a`.
    unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees `ptr` points to `length` live bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.length) }
    }
}

/// `envoy_dynamic_module_type_module_buffer` (the module owns the bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const u8,
    length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr(),
            length: bytes.len(),
        }
    }
    /// The null buffer: `set_header` with it removes the header.
    const NULL: ModuleBuffer = ModuleBuffer {
        ptr: null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_module_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleHeader {
    key: ModuleBuffer,
    value: ModuleBuffer,
}

/// `envoy_dynamic_module_type_envoy_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHeader {
    key: EnvoyBuffer,
    value: EnvoyBuffer,
}

extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    fn envoy_dynamic_module_callback_http_get_headers_size(f: EnvoyFilterPtr, kind: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        f: EnvoyFilterPtr,
        kind: u32,
        result: *mut EnvoyHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        f: EnvoyFilterPtr,
        kind: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        f: EnvoyFilterPtr,
        kind: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        f: EnvoyFilterPtr,
        status: u32,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_send_response_headers(
        f: EnvoyFilterPtr,
        headers: *mut ModuleHeader,
        headers_size: usize,
        end_stream: bool,
    );
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        f: EnvoyFilterPtr,
        id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_metadata_string(
        f: EnvoyFilterPtr,
        source: u32,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
        f: EnvoyFilterPtr,
        namespace: ModuleBuffer,
        entries: *const ModuleHeader,
        entries_size: usize,
    );
    fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        f: EnvoyFilterPtr,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_filter_continue_decoding(f: EnvoyFilterPtr);
    fn envoy_dynamic_module_callback_http_filter_start_http_stream(
        f: EnvoyFilterPtr,
        stream_id_out: *mut u64,
        cluster: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        end_stream: bool,
        timeout_ms: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        c: EnvoyConfigPtr,
    ) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_config_start_http_stream(
        c: EnvoyConfigPtr,
        stream_id_out: *mut u64,
        cluster: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        end_stream: bool,
        timeout_ms: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_stream_send_data(
        c: EnvoyConfigPtr,
        stream_id: u64,
        data: ModuleBuffer,
        end_stream: bool,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_config_reset_http_stream(
        c: EnvoyConfigPtr,
        stream_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        c: EnvoyConfigPtr,
        name: ModuleBuffer,
        labels: *mut ModuleBuffer,
        labels_size: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        c: EnvoyConfigPtr,
        name: ModuleBuffer,
        labels: *mut ModuleBuffer,
        labels_size: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        c: EnvoyConfigPtr,
        name: ModuleBuffer,
        labels: *mut ModuleBuffer,
        labels_size: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        f: EnvoyFilterPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_size: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_set_gauge(
        f: EnvoyFilterPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_size: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        f: EnvoyFilterPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_size: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        c: EnvoyConfigPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_size: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        c: EnvoyConfigPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_size: usize,
        value: u64,
    ) -> u32;
}

// Declared for batched fleet reports and RLQS streams, which the native
// build does not run yet (see
// `docs/reference.md`, "Native build"); checked against Envoy 1.40 like the others.
#[allow(dead_code)]
extern "C" {
    fn envoy_dynamic_module_callback_http_get_header(
        f: EnvoyFilterPtr,
        kind: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_filter_http_callout(
        f: EnvoyFilterPtr,
        callout_id_out: *mut u64,
        cluster: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_stream_send_data(
        f: EnvoyFilterPtr,
        stream_id: u64,
        data: ModuleBuffer,
        end_stream: bool,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_reset_http_stream(
        f: EnvoyFilterPtr,
        stream_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        c: EnvoyConfigPtr,
        callout_id_out: *mut u64,
        cluster: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_ms: u64,
    ) -> u32;
}

/// Logs under Envoy's `dynamic_modules` logger.
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: the buffer describes a live slice for the whole call.
    unsafe { envoy_dynamic_module_callback_log(level as u32, ModuleBuffer::of(message.as_bytes())) }
}

/// True if Envoy keeps lines of `level` (build audit lines only then).
pub fn log_enabled(level: LogLevel) -> bool {
    // SAFETY: a plain value call.
    unsafe { envoy_dynamic_module_callback_log_enabled(level as u32) }
}

fn module_headers(headers: &[(&str, &str)]) -> Vec<ModuleHeader> {
    headers
        .iter()
        .map(|(k, v)| ModuleHeader {
            key: ModuleBuffer::of(k.as_bytes()),
            value: ModuleBuffer::of(v.as_bytes()),
        })
        .collect()
}

/// A header as Envoy holds it: name and value bytes.
pub type RawHeader<'a> = (&'a [u8], &'a [u8]);

fn refused(ok: bool, call: &'static str) -> Result<(), HostError> {
    if ok {
        Ok(())
    } else {
        Err(HostError::Refused(call))
    }
}

/// One HTTP stream's filter on Envoy's side, valid for the hook that made
/// it. Readers borrow `&self` and hand out slices of Envoy's memory; writers
/// take `&mut self`, because Envoy may move those bytes when a header
/// changes (the borrow checker keeps a read slice from outliving a write).
pub struct Filter<'hook> {
    raw: EnvoyFilterPtr,
    _hook: PhantomData<&'hook mut ()>,
}

impl Filter<'_> {
    /// Every header of `kind`, in Envoy's order.
    pub fn headers(&self, kind: HeaderKind) -> Result<Vec<RawHeader<'_>>, HostError> {
        // SAFETY: `raw` is the live filter of the current hook.
        let n =
            unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.raw, kind as u32) };
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut out = vec![
            EnvoyHeader {
                key: EnvoyBuffer::EMPTY,
                value: EnvoyBuffer::EMPTY
            };
            n
        ];
        // SAFETY: `out` has room for the `n` headers Envoy just counted.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_headers(self.raw, kind as u32, out.as_mut_ptr())
        };
        refused(ok, "get_headers")?;
        Ok(out
            .into_iter()
            // SAFETY: Envoy's header bytes live until the end of the hook or
            // the next header write, which needs `&mut self`.
            .map(|h| unsafe { (h.key.as_slice(), h.value.as_slice()) })
            .collect())
    }

    /// The first value of header `name`, if any.
    #[allow(dead_code)] // for batched reports and RLQS streams, not wired yet
    pub fn header(&self, kind: HeaderKind, name: &str) -> Option<&[u8]> {
        let mut value = EnvoyBuffer::EMPTY;
        // SAFETY: `value` outlives the call; the count pointer may be null.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.raw,
                kind as u32,
                ModuleBuffer::of(name.as_bytes()),
                &mut value,
                0,
                null_mut(),
            )
        };
        // SAFETY: as in `headers`.
        (ok && !value.ptr.is_null()).then(|| unsafe { value.as_slice() })
    }

    /// Replaces every value of `name` with `value`.
    pub fn set_header(
        &mut self,
        kind: HeaderKind,
        name: &str,
        value: &str,
    ) -> Result<(), HostError> {
        // SAFETY: both buffers are live for the call.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.raw,
                kind as u32,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            )
        };
        refused(ok, "set_header")
    }

    /// Adds a value to `name` (keeping the others).
    pub fn add_header(
        &mut self,
        kind: HeaderKind,
        name: &str,
        value: &str,
    ) -> Result<(), HostError> {
        // SAFETY: both buffers are live for the call.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_add_header(
                self.raw,
                kind as u32,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            )
        };
        refused(ok, "add_header")
    }

    /// Removes every value of `name` (`set_header` with a null value).
    pub fn remove_header(&mut self, kind: HeaderKind, name: &str) -> Result<(), HostError> {
        // SAFETY: the key buffer is live for the call; a null value is the
        // ABI's way to ask for removal.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.raw,
                kind as u32,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::NULL,
            )
        };
        refused(ok, "remove_header")
    }

    /// Sends a local reply (Envoy's `sendLocalReply`); `details` goes to the
    /// access log's response code details.
    pub fn send_response(
        &mut self,
        status: u32,
        headers: &[(&str, &str)],
        body: &str,
        details: &str,
    ) {
        let mut h = module_headers(headers);
        // SAFETY: `h` and the buffers it points into are live for the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.raw,
                status,
                h.as_mut_ptr(),
                h.len(),
                ModuleBuffer::of(body.as_bytes()),
                ModuleBuffer::of(details.as_bytes()),
            )
        }
    }

    /// Sends response headers that end the stream (a gRPC trailers-only reply).
    pub fn send_response_headers_only(&mut self, headers: &[(&str, &str)]) {
        let mut h = module_headers(headers);
        // SAFETY: `h` and the buffers it points into are live for the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response_headers(
                self.raw,
                h.as_mut_ptr(),
                h.len(),
                true,
            )
        }
    }

    /// A string attribute (`source.address`, ...), if Envoy has it.
    pub fn attribute(&self, id: Attribute) -> Option<&[u8]> {
        let mut value = EnvoyBuffer::EMPTY;
        // SAFETY: `value` outlives the call.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.raw, id as u32, &mut value,
            )
        };
        // SAFETY: Envoy's bytes live until the end of the hook.
        (ok && !value.ptr.is_null()).then(|| unsafe { value.as_slice() })
    }

    /// A string value of the stream's dynamic metadata (`namespace`, `key`).
    pub fn dynamic_metadata(&self, namespace: &str, key: &str) -> Option<&[u8]> {
        let mut value = EnvoyBuffer::EMPTY;
        // SAFETY: the buffers are live for the call; `value` outlives it.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_metadata_string(
                self.raw,
                0, // envoy_dynamic_module_type_metadata_source_Dynamic
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(key.as_bytes()),
                &mut value,
            )
        };
        // SAFETY: Envoy's bytes live until the end of the hook.
        (ok && !value.ptr.is_null()).then(|| unsafe { value.as_slice() })
    }

    /// Sets filter state `key` to `value` (a string object, read-only for
    /// the rest of the stream): `%FILTER_STATE(key:PLAIN)%` prints it.
    pub fn set_filter_state(&mut self, key: &str, value: &str) -> Result<(), HostError> {
        // SAFETY: both buffers are live for the call; Envoy copies them.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_set_filter_state_bytes(
                self.raw,
                ModuleBuffer::of(key.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            )
        };
        refused(ok, "set_filter_state_bytes")
    }

    /// Sets string values of the stream's dynamic metadata under
    /// `namespace`, in one call (`%DYNAMIC_METADATA(namespace:key)%`).
    pub fn set_dynamic_metadata(&mut self, namespace: &str, entries: &[(&str, &str)]) {
        if entries.is_empty() {
            return;
        }
        // `envoy_dynamic_module_type_module_key_value_pair` has the layout
        // of a module header: key pointer and length, value pointer and length.
        let pairs = module_headers(entries);
        // SAFETY: `pairs` and the bytes they point into are live for the
        // call; Envoy copies them into the metadata.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
                self.raw,
                ModuleBuffer::of(namespace.as_bytes()),
                pairs.as_ptr(),
                pairs.len(),
            )
        }
    }

    /// Resumes a request paused in its headers hook.
    pub fn continue_decoding(&mut self) {
        // SAFETY: `raw` is the live filter of the current hook.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.raw) }
    }

    /// Updates a metric defined at config time with its label values.
    pub fn update(&self, metric: Metric, labels: &[&str], value: u64) -> Result<(), HostError> {
        check_labels(metric, labels.len())?;
        let mut l: Vec<ModuleBuffer> = labels
            .iter()
            .map(|s| ModuleBuffer::of(s.as_bytes()))
            .collect();
        let (p, n) = (l.as_mut_ptr(), l.len());
        // SAFETY: `l` and the label bytes are live for the call; the count
        // matches the definition (checked above).
        let raw = unsafe {
            match metric.kind {
                MetricKind::Counter => envoy_dynamic_module_callback_http_filter_increment_counter(
                    self.raw, metric.id, p, n, value,
                ),
                MetricKind::Gauge => envoy_dynamic_module_callback_http_filter_set_gauge(
                    self.raw, metric.id, p, n, value,
                ),
                MetricKind::Histogram => {
                    envoy_dynamic_module_callback_http_filter_record_histogram_value(
                        self.raw, metric.id, p, n, value,
                    )
                }
            }
        };
        metrics_result(raw, metric.id)
    }

    /// Starts a one-shot HTTP call to `cluster` (its answer comes to
    /// [`crate::request::Stream::on_callout_done`]); the callout id.
    #[allow(dead_code)] // for batched reports and RLQS streams, not wired yet
    pub fn http_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, HostError> {
        let mut h = module_headers(headers);
        let mut id = 0u64;
        // SAFETY: every buffer is live for the call; `id` outlives it.
        let raw = unsafe {
            envoy_dynamic_module_callback_http_filter_http_callout(
                self.raw,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                h.as_mut_ptr(),
                h.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        callout_init(raw, cluster).map(|()| id)
    }

    /// Starts a streamed HTTP call (headers, data and trailers of the answer
    /// come to the `http_stream_*` hooks); the stream id.
    pub fn start_http_stream(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        end_stream: bool,
        timeout_ms: u64,
    ) -> Result<u64, HostError> {
        let mut h = module_headers(headers);
        let mut id = 0u64;
        // SAFETY: every buffer is live for the call; `id` outlives it.
        let raw = unsafe {
            envoy_dynamic_module_callback_http_filter_start_http_stream(
                self.raw,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                h.as_mut_ptr(),
                h.len(),
                ModuleBuffer::of(body),
                end_stream,
                timeout_ms,
            )
        };
        callout_init(raw, cluster).map(|()| id)
    }

    /// Sends more request body on a stream started by [`Filter::start_http_stream`].
    #[allow(dead_code)] // for batched reports and RLQS streams, not wired yet
    pub fn stream_send(
        &mut self,
        stream: u64,
        data: &[u8],
        end_stream: bool,
    ) -> Result<(), HostError> {
        // SAFETY: the buffer is live for the call.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_stream_send_data(
                self.raw,
                stream,
                ModuleBuffer::of(data),
                end_stream,
            )
        };
        refused(ok, "stream_send_data")
    }

    /// Cancels a stream started by [`Filter::start_http_stream`].
    #[allow(dead_code)] // for batched reports and RLQS streams, not wired yet
    pub fn reset_stream(&mut self, stream: u64) {
        // SAFETY: a plain value call on the live filter.
        unsafe { envoy_dynamic_module_callback_http_filter_reset_http_stream(self.raw, stream) }
    }
}

/// The filter configuration on Envoy's side, valid for the hook that made
/// it (`config_new`, `config_scheduled`, the config's stream hooks; all on
/// the main thread). Metrics can only be defined in `config_new`:
/// afterwards Envoy answers `Frozen`.
pub struct Config<'hook> {
    raw: EnvoyConfigPtr,
    _hook: PhantomData<&'hook mut ()>,
}

impl Config<'_> {
    /// Defines a metric with label names; updates carry one value per name.
    pub fn define(
        &mut self,
        kind: MetricKind,
        name: &str,
        labels: &[&str],
    ) -> Result<Metric, HostError> {
        let mut l: Vec<ModuleBuffer> = labels
            .iter()
            .map(|s| ModuleBuffer::of(s.as_bytes()))
            .collect();
        let (p, n) = (l.as_mut_ptr(), l.len());
        let mut id = 0usize;
        let name_buf = ModuleBuffer::of(name.as_bytes());
        // SAFETY: the buffers are live for the call; `id` outlives it.
        let raw = unsafe {
            match kind {
                MetricKind::Counter => {
                    envoy_dynamic_module_callback_http_filter_config_define_counter(
                        self.raw, name_buf, p, n, &mut id,
                    )
                }
                MetricKind::Gauge => envoy_dynamic_module_callback_http_filter_config_define_gauge(
                    self.raw, name_buf, p, n, &mut id,
                ),
                MetricKind::Histogram => {
                    envoy_dynamic_module_callback_http_filter_config_define_histogram(
                        self.raw, name_buf, p, n, &mut id,
                    )
                }
            }
        };
        metrics_result(raw, id).map(|()| Metric {
            kind,
            id,
            labels: labels.len(),
        })
    }

    /// Updates a counter or gauge outside any request (at load time).
    pub fn update(&self, metric: Metric, labels: &[&str], value: u64) -> Result<(), HostError> {
        check_labels(metric, labels.len())?;
        let mut l: Vec<ModuleBuffer> = labels
            .iter()
            .map(|s| ModuleBuffer::of(s.as_bytes()))
            .collect();
        let (p, n) = (l.as_mut_ptr(), l.len());
        // SAFETY: `l` and the label bytes are live for the call.
        let raw = unsafe {
            match metric.kind {
                MetricKind::Counter => {
                    envoy_dynamic_module_callback_http_filter_config_increment_counter(
                        self.raw, metric.id, p, n, value,
                    )
                }
                MetricKind::Gauge => envoy_dynamic_module_callback_http_filter_config_set_gauge(
                    self.raw, metric.id, p, n, value,
                ),
                MetricKind::Histogram => {
                    return Err(HostError::Refused("config record_histogram_value"))
                }
            }
        };
        metrics_result(raw, metric.id)
    }

    /// A streamed HTTP call owned by the configuration, not by a request
    /// (batched fleet reports, the RLQS stream): the answer comes to the
    /// `config_http_stream_*` hooks, on the main thread; the stream id. With
    /// `end_stream` false the request stays open for
    /// [`Config::stream_send_data`]; a `timeout_ms` of 0 is no timeout.
    pub fn start_http_stream(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        end_stream: bool,
        timeout_ms: u64,
    ) -> Result<u64, HostError> {
        let mut h = module_headers(headers);
        let mut id = 0u64;
        // SAFETY: every buffer is live for the call; `id` outlives it.
        let raw = unsafe {
            envoy_dynamic_module_callback_http_filter_config_start_http_stream(
                self.raw,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                h.as_mut_ptr(),
                h.len(),
                ModuleBuffer::of(body),
                end_stream,
                timeout_ms,
            )
        };
        callout_init(raw, cluster).map(|()| id)
    }

    /// Sends more request body on a stream of [`Config::start_http_stream`].
    pub fn stream_send_data(
        &mut self,
        stream: u64,
        data: &[u8],
        end_stream: bool,
    ) -> Result<(), HostError> {
        // SAFETY: the buffer is live for the call.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_filter_config_stream_send_data(
                self.raw,
                stream,
                ModuleBuffer::of(data),
                end_stream,
            )
        };
        refused(ok, "config_stream_send_data")
    }

    /// Cancels a stream of [`Config::start_http_stream`] (its reset hook
    /// follows).
    pub fn reset_stream(&mut self, stream: u64) {
        // SAFETY: a plain value call on the live config.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_reset_http_stream(self.raw, stream)
        }
    }

    /// Starts a thread that wakes this configuration on Envoy's main thread
    /// every `period_ms` (the `config_scheduled` hook): the ABI has no timer
    /// for HTTP filters. Stopped when the [`Ticker`] is dropped.
    pub fn ticker(&mut self, period_ms: u64) -> Option<Ticker> {
        // SAFETY: `raw` is the live config of this hook.
        let scheduler =
            unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.raw) };
        if scheduler.is_null() {
            return None;
        }
        let scheduler = Scheduler(scheduler);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (stop2, sched) = (Arc::clone(&stop), scheduler);
        let thread = std::thread::Builder::new()
            .name("tenantgate-tick".into())
            .spawn(move || {
                let (lock, cv) = &*stop2;
                let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                let mut event = 0u64;
                loop {
                    let (guard, _) = cv
                        .wait_timeout(stopped, Duration::from_millis(period_ms))
                        .unwrap_or_else(PoisonError::into_inner);
                    stopped = guard;
                    if *stopped {
                        return;
                    }
                    event = event.wrapping_add(1);
                    sched.commit(event);
                }
            })
            .ok();
        match thread {
            Some(thread) => Some(Ticker {
                stop,
                thread: Some(thread),
                scheduler,
            }),
            None => {
                scheduler.delete();
                None
            }
        }
    }

    /// A one-shot HTTP call owned by the configuration, not by a request
    /// (batched fleet reports); the callout id.
    #[allow(dead_code)] // for batched reports and RLQS streams, not wired yet
    pub fn http_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, HostError> {
        let mut h = module_headers(headers);
        let mut id = 0u64;
        // SAFETY: every buffer is live for the call; `id` outlives it.
        let raw = unsafe {
            envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.raw,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                h.as_mut_ptr(),
                h.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        callout_init(raw, cluster).map(|()| id)
    }
}

/// Envoy's config scheduler (`DynamicModuleHttpFilterConfigScheduler`).
#[derive(Clone, Copy)]
struct Scheduler(*mut c_void);

// SAFETY: `scheduler_commit` is documented safe to call from any thread;
// `delete` is only called once, by the `Ticker` after its thread stopped.
unsafe impl Send for Scheduler {}
// SAFETY: as above: the pointer is only passed to thread-safe calls.
unsafe impl Sync for Scheduler {}

impl Scheduler {
    fn commit(self, event: u64) {
        // SAFETY: a live scheduler (deleted only after this thread is joined).
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.0, event) }
    }
    fn delete(self) {
        // SAFETY: made by `scheduler_new`, deleted once.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0) }
    }
}

/// The thread behind [`Config::ticker`]. Dropping it stops and joins the
/// thread, then deletes the scheduler: drop it on the main thread (the
/// config's destroy hook does).
pub struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    scheduler: Scheduler,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.scheduler.delete();
    }
}

/// Runs a hook body; a panic (caught only in builds that unwind) becomes
/// `fallback` instead of unwinding into Envoy.
fn guard<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// The module's state behind a filter pointer Envoy hands back.
///
/// # Safety
/// `ptr` must come from [`envoy_dynamic_module_on_http_filter_new`] and not
/// be destroyed yet; Envoy calls one stream's hooks on one thread, one at a time.
unsafe fn stream<'a>(ptr: ModuleFilterPtr) -> Option<&'a mut crate::request::Stream> {
    // SAFETY: per the function's contract.
    unsafe { (ptr as *mut crate::request::Stream).as_mut() }
}

/// The module's configuration behind a config pointer Envoy hands back.
///
/// # Safety
/// `ptr` must come from [`envoy_dynamic_module_on_http_filter_config_new`]
/// and not be destroyed yet.
unsafe fn shared<'a>(ptr: ModuleConfigPtr) -> Option<&'a Arc<crate::config::Shared>> {
    // SAFETY: per the function's contract.
    unsafe { (ptr as *const Arc<crate::config::Shared>).as_ref() }
}

fn config_handle<'a>(raw: EnvoyConfigPtr) -> Config<'a> {
    Config {
        raw,
        _hook: PhantomData,
    }
}

fn filter<'a>(raw: EnvoyFilterPtr) -> Filter<'a> {
    Filter {
        raw,
        _hook: PhantomData,
    }
}

// ---------------------------------------------------------------- hooks

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guard(null(), || {
        crate::config::on_program_init();
        ABI_VERSION.as_ptr()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: EnvoyConfigPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ModuleConfigPtr {
    guard(null(), || {
        let mut c = Config {
            raw: config_envoy,
            _hook: PhantomData,
        };
        // SAFETY: Envoy's buffers live for this hook.
        let (name, config) = unsafe { (name.as_slice(), config.as_slice()) };
        match crate::config::new(&mut c, name, config) {
            Some(shared) => Box::into_raw(Box::new(shared)) as ModuleConfigPtr,
            None => null(),
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ModuleConfigPtr) {
    guard((), || {
        if !config.is_null() {
            // SAFETY: made by `config_new` with `Box::into_raw`; Envoy
            // destroys it once.
            let shared = unsafe { Box::from_raw(config as *mut Arc<crate::config::Shared>) };
            // Streams may hold the config a little longer; its ticker stops
            // now, on the main thread.
            shared.stop_ticker();
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: ModuleConfigPtr,
    _filter_envoy: EnvoyFilterPtr,
) -> ModuleFilterPtr {
    guard(null(), || {
        // SAFETY: made by `config_new`, alive while Envoy has filters of it.
        let Some(shared) = (unsafe { (config as *const Arc<crate::config::Shared>).as_ref() })
        else {
            return null();
        };
        Box::into_raw(Box::new(crate::request::Stream::new(Arc::clone(shared)))) as ModuleFilterPtr
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(stream_ptr: ModuleFilterPtr) {
    guard((), || {
        if !stream_ptr.is_null() {
            // SAFETY: made by `filter_new` with `Box::into_raw`; destroyed once.
            drop(unsafe { Box::from_raw(stream_ptr as *mut crate::request::Stream) });
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
    end_of_stream: bool,
) -> u32 {
    let status = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: see `stream`.
        let st = unsafe { stream(s) }?;
        Some(st.on_request_headers(&mut filter(f), end_of_stream))
    }));
    match status {
        Ok(Some(s)) => s as u32,
        // No state, or a bug: fail closed with a plain 503.
        _ => guard(HeadersStatus::StopIteration as u32, || {
            crate::request::fail_closed(&mut filter(f));
            HeadersStatus::StopIteration as u32
        }),
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
    end_of_stream: bool,
) -> u32 {
    guard(BodyStatus::Continue as u32, || {
        // SAFETY: see `stream`.
        match unsafe { stream(s) } {
            Some(st) => st.on_request_body(&mut filter(f), end_of_stream) as u32,
            None => BodyStatus::Continue as u32,
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
) -> u32 {
    guard(TrailersStatus::Continue as u32, || {
        // SAFETY: see `stream`.
        match unsafe { stream(s) } {
            Some(st) => st.on_request_trailers(&mut filter(f)) as u32,
            None => TrailersStatus::Continue as u32,
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
    _end_of_stream: bool,
) -> u32 {
    guard(HeadersStatus::Continue as u32, || {
        // SAFETY: see `stream`.
        if let Some(st) = unsafe { stream(s) } {
            st.on_response_headers(&mut filter(f));
        }
        HeadersStatus::Continue as u32
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _f: EnvoyFilterPtr,
    _s: ModuleFilterPtr,
    _end_of_stream: bool,
) -> u32 {
    BodyStatus::Continue as u32
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _f: EnvoyFilterPtr,
    _s: ModuleFilterPtr,
) -> u32 {
    TrailersStatus::Continue as u32
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
) {
    guard((), || {
        // SAFETY: see `stream`.
        if let Some(st) = unsafe { stream(s) } {
            st.on_stream_complete();
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    body: *const EnvoyBuffer,
    body_size: usize,
) {
    guard((), || {
        // SAFETY: Envoy's arrays (possibly null) and their bytes live for this hook.
        let (headers, body) = unsafe {
            (
                header_slice(headers, headers_size),
                buffers(body, body_size),
            )
        };
        // SAFETY: see `stream`.
        if let Some(st) = unsafe { stream(s) } {
            st.on_callout_done(
                &mut filter(f),
                callout_id,
                CalloutResult::from_raw(result),
                &headers,
                &body,
            );
        }
    })
}

/// # Safety
/// `ptr` must be null or point to `n` headers whose bytes live for `'a`.
unsafe fn header_slice<'a>(ptr: *const EnvoyHeader, n: usize) -> Vec<RawHeader<'a>> {
    if ptr.is_null() || n == 0 {
        return Vec::new();
    }
    // SAFETY: per the function's contract.
    unsafe { std::slice::from_raw_parts(ptr, n) }
        .iter()
        // SAFETY: per the function's contract.
        .map(|h| unsafe { (h.key.as_slice(), h.value.as_slice()) })
        .collect()
}

/// # Safety
/// `ptr` must be null or point to `n` buffers whose bytes live for `'a`.
unsafe fn buffers<'a>(ptr: *const EnvoyBuffer, n: usize) -> Vec<&'a [u8]> {
    if ptr.is_null() || n == 0 {
        return Vec::new();
    }
    // SAFETY: per the function's contract.
    unsafe { std::slice::from_raw_parts(ptr, n) }
        .iter()
        // SAFETY: per the function's contract.
        .map(|b| unsafe { b.as_slice() })
        .collect()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
    stream_id: u64,
    headers: *const EnvoyHeader,
    headers_size: usize,
    _end_stream: bool,
) {
    guard((), || {
        // SAFETY: Envoy's array and bytes live for this hook; see `stream`.
        let (headers, st) = unsafe { (header_slice(headers, headers_size), stream(s)) };
        if let Some(st) = st {
            st.on_http_stream_headers(stream_id, &headers);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
    stream_id: u64,
    data: *const EnvoyBuffer,
    data_count: usize,
    _end_stream: bool,
) {
    guard((), || {
        // SAFETY: Envoy's array and bytes live for this hook; see `stream`.
        let (data, st) = unsafe { (buffers(data, data_count), stream(s)) };
        if let Some(st) = st {
            st.on_http_stream_data(stream_id, &data);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
    stream_id: u64,
    trailers: *const EnvoyHeader,
    trailers_size: usize,
) {
    guard((), || {
        // SAFETY: Envoy's array and bytes live for this hook; see `stream`.
        let (trailers, st) = unsafe { (header_slice(trailers, trailers_size), stream(s)) };
        if let Some(st) = st {
            st.on_http_stream_trailers(stream_id, &trailers);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
    stream_id: u64,
) {
    guard((), || {
        // SAFETY: see `stream`.
        if let Some(st) = unsafe { stream(s) } {
            st.on_http_stream_done(&mut filter(f), stream_id, None);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    f: EnvoyFilterPtr,
    s: ModuleFilterPtr,
    stream_id: u64,
    reason: u32,
) {
    guard((), || {
        // SAFETY: see `stream`.
        if let Some(st) = unsafe { stream(s) } {
            let why = format!(
                "the call was reset ({}; past timeout_ms?)",
                crate::host::reset_reason(reason)
            );
            st.on_http_stream_done(&mut filter(f), stream_id, Some(why));
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _f: EnvoyFilterPtr,
    _s: ModuleFilterPtr,
    _event_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _f: EnvoyFilterPtr,
    _s: ModuleFilterPtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _f: EnvoyFilterPtr,
    _s: ModuleFilterPtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    config_envoy: EnvoyConfigPtr,
    config: ModuleConfigPtr,
    _event_id: u64,
) {
    guard((), || {
        // SAFETY: made by `config_new`, alive until its destroy hook.
        if let Some(shared) = unsafe { shared(config) } {
            crate::config::on_tick(&mut config_handle(config_envoy), shared);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: EnvoyConfigPtr,
    _config: ModuleConfigPtr,
    _callout_id: u64,
    _result: u32,
    _headers: *const EnvoyHeader,
    _headers_size: usize,
    _body: *const EnvoyBuffer,
    _body_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _config_envoy: EnvoyConfigPtr,
    config: ModuleConfigPtr,
    stream_id: u64,
    headers: *const EnvoyHeader,
    headers_size: usize,
    _end_stream: bool,
) {
    guard((), || {
        // SAFETY: Envoy's array and bytes live for this hook; see `shared`.
        let (headers, sh) = unsafe { (header_slice(headers, headers_size), shared(config)) };
        if let Some(sh) = sh {
            sh.on_report_headers(stream_id, &headers);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    config_envoy: EnvoyConfigPtr,
    config: ModuleConfigPtr,
    stream_id: u64,
    data: *const EnvoyBuffer,
    data_count: usize,
    _end_stream: bool,
) {
    guard((), || {
        // SAFETY: Envoy's array and bytes live for this hook; see `shared`.
        let (data, sh) = unsafe { (buffers(data, data_count), shared(config)) };
        if let Some(sh) = sh {
            sh.on_report_data(&config_handle(config_envoy), stream_id, &data);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _config_envoy: EnvoyConfigPtr,
    config: ModuleConfigPtr,
    stream_id: u64,
    trailers: *const EnvoyHeader,
    trailers_size: usize,
) {
    guard((), || {
        // SAFETY: Envoy's array and bytes live for this hook; see `shared`.
        let (trailers, sh) = unsafe { (header_slice(trailers, trailers_size), shared(config)) };
        if let Some(sh) = sh {
            sh.on_report_headers(stream_id, &trailers);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    config_envoy: EnvoyConfigPtr,
    config: ModuleConfigPtr,
    stream_id: u64,
) {
    guard((), || {
        // SAFETY: see `shared`.
        if let Some(sh) = unsafe { shared(config) } {
            sh.on_report_done(&config_handle(config_envoy), stream_id, None);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    config_envoy: EnvoyConfigPtr,
    config: ModuleConfigPtr,
    stream_id: u64,
    reason: u32,
) {
    guard((), || {
        // SAFETY: see `shared`.
        if let Some(sh) = unsafe { shared(config) } {
            let why = format!(
                "the report was reset ({}; past timeout_ms?)",
                crate::host::reset_reason(reason)
            );
            sh.on_report_done(&config_handle(config_envoy), stream_id, Some(why));
        }
    })
}
