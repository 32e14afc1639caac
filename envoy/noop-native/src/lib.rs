//! A no-op Envoy dynamic module (ABI `v0.2.0`, Envoy 1.40): every request
//! reads one header (`x-tenant`) and continues. The native floor of
//! `envoy/bench.sh`, as `envoy/noop-filter` is the Wasm one.
//!
//! It exports every HTTP filter hook Envoy requires; the ones it does not
//! need do nothing. Declarations as in `native/src/abi.rs` (checked there).

use std::ffi::{c_char, c_void};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const u8,
    length: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const u8,
    length: usize,
}

#[repr(C)]
pub struct EnvoyHeader {
    key: EnvoyBuffer,
    value: EnvoyBuffer,
}

extern "C" {
    fn envoy_dynamic_module_callback_http_get_header(
        f: *mut c_void,
        kind: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
}

/// Any non-null pointer will do: the module keeps no state.
static STATE: u8 = 0;

fn state() -> *const c_void {
    std::ptr::addr_of!(STATE).cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    c"v0.2.0".as_ptr()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: *mut c_void,
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    state()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_config: *const c_void) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: *const c_void,
    _filter_envoy: *mut c_void,
) -> *const c_void {
    state()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_filter: *const c_void) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    f: *mut c_void,
    _filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    let key = b"x-tenant";
    let mut value = EnvoyBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };
    // SAFETY: `f` is the live filter of this hook; the key buffer and
    // `value` outlive the call; the count pointer may be null.
    let found = unsafe {
        envoy_dynamic_module_callback_http_get_header(
            f,
            0,
            ModuleBuffer {
                ptr: key.as_ptr(),
                length: key.len(),
            },
            &mut value,
            0,
            std::ptr::null_mut(),
        )
    };
    std::hint::black_box((found, value.length));
    0
}

macro_rules! continue_hooks {
    ($($name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty = $val:expr;)*) => {
        $(#[no_mangle]
        pub extern "C" fn $name($($arg: $ty),*) -> $ret { $(let _ = $arg;)* $val })*
    };
}

continue_hooks! {
    envoy_dynamic_module_on_http_filter_request_body(f: *mut c_void, s: *const c_void, e: bool) -> u32 = 0;
    envoy_dynamic_module_on_http_filter_request_trailers(f: *mut c_void, s: *const c_void) -> u32 = 0;
    envoy_dynamic_module_on_http_filter_response_headers(f: *mut c_void, s: *const c_void, e: bool) -> u32 = 0;
    envoy_dynamic_module_on_http_filter_response_body(f: *mut c_void, s: *const c_void, e: bool) -> u32 = 0;
    envoy_dynamic_module_on_http_filter_response_trailers(f: *mut c_void, s: *const c_void) -> u32 = 0;
    envoy_dynamic_module_on_http_filter_stream_complete(f: *mut c_void, s: *const c_void) -> () = ();
    envoy_dynamic_module_on_http_filter_http_callout_done(f: *mut c_void, s: *const c_void, id: u64, r: u32, h: *const EnvoyHeader, hn: usize, b: *const EnvoyBuffer, bn: usize) -> () = ();
    envoy_dynamic_module_on_http_filter_http_stream_headers(f: *mut c_void, s: *const c_void, id: u64, h: *const EnvoyHeader, hn: usize, e: bool) -> () = ();
    envoy_dynamic_module_on_http_filter_http_stream_data(f: *mut c_void, s: *const c_void, id: u64, d: *const EnvoyBuffer, dn: usize, e: bool) -> () = ();
    envoy_dynamic_module_on_http_filter_http_stream_trailers(f: *mut c_void, s: *const c_void, id: u64, h: *const EnvoyHeader, hn: usize) -> () = ();
    envoy_dynamic_module_on_http_filter_http_stream_complete(f: *mut c_void, s: *const c_void, id: u64) -> () = ();
    envoy_dynamic_module_on_http_filter_http_stream_reset(f: *mut c_void, s: *const c_void, id: u64, r: u32) -> () = ();
    envoy_dynamic_module_on_http_filter_scheduled(f: *mut c_void, s: *const c_void, id: u64) -> () = ();
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(f: *mut c_void, s: *const c_void) -> () = ();
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(f: *mut c_void, s: *const c_void) -> () = ();
}
