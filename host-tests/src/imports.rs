//! The host side of every import `tenantgate.wasm` has: the proxy-wasm ABI
//! v0.2.1 functions (module `env`) and the WASI preview1 functions (module
//! `wasi_snapshot_preview1`). Anything the module imports that is not
//! implemented here is defined as a function that returns an error status
//! (`Unimplemented` for proxy-wasm, `ENOSYS` for WASI) and is counted, so
//! nothing traps for want of an import.

use anyhow::{anyhow, Result};
use wasmtime::{Caller, ExternType, Linker, Module, Val, ValType};

use crate::abi::{self, errno, LogLevel, MetricType, Status};
use crate::headers::Headers;
use crate::logs::{LogLine, LogSource};
use crate::state::{LocalResponse, Phase, VmState};

type C<'a> = Caller<'a, VmState>;

const OK: u32 = 0;

fn code(r: Result<(), Status>) -> u32 {
    match r {
        Ok(()) => OK,
        Err(s) => s.code(),
    }
}

fn read(c: &C<'_>, ptr: u32, len: u32) -> Result<Vec<u8>, Status> {
    let mem = c.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    mem.data(c)
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or(Status::InvalidMemoryAccess)
}

fn read_string(c: &C<'_>, ptr: u32, len: u32) -> Result<String, Status> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

fn write(c: &mut C<'_>, ptr: u32, bytes: &[u8]) -> Result<(), Status> {
    let mem = c.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let start = ptr as usize;
    let end = start
        .checked_add(bytes.len())
        .ok_or(Status::InvalidMemoryAccess)?;
    mem.data_mut(c)
        .get_mut(start..end)
        .ok_or(Status::InvalidMemoryAccess)?
        .copy_from_slice(bytes);
    Ok(())
}

fn write_u32(c: &mut C<'_>, ptr: u32, v: u32) -> Result<(), Status> {
    write(c, ptr, &v.to_le_bytes())
}

fn write_u64(c: &mut C<'_>, ptr: u32, v: u64) -> Result<(), Status> {
    write(c, ptr, &v.to_le_bytes())
}

/// Copies bytes into memory the module allocates (`proxy_on_memory_allocate`)
/// and writes the pointer and size, as Envoy's `copyToPointerSize` does: an
/// empty value is a null pointer and a zero size. A trap in the allocator is
/// passed on.
fn copy_out(c: &mut C<'_>, bytes: &[u8], ptr_ptr: u32, size_ptr: u32) -> Result<u32> {
    let Ok(len) = u32::try_from(bytes.len()) else {
        return Ok(Status::InvalidMemoryAccess.code());
    };
    let mut ptr = 0;
    if len > 0 {
        let Some(malloc) = c.data().malloc.clone() else {
            return Ok(Status::InternalFailure.code());
        };
        tally(c, "proxy_on_memory_allocate");
        ptr = malloc.call(&mut *c, len)?;
        if ptr == 0 {
            return Ok(Status::InternalFailure.code());
        }
        if let Err(s) = write(c, ptr, bytes) {
            return Ok(s.code());
        }
    }
    Ok(code(
        write_u32(c, ptr_ptr, ptr).and_then(|()| write_u32(c, size_ptr, len)),
    ))
}

fn log(c: &C<'_>, level: LogLevel, source: LogSource, message: String) {
    let vm = c.data().index;
    c.data().host.logs.push(LogLine {
        vm,
        level,
        source,
        message,
    });
}

/// Which header map a call names, if the running callback may read it.
fn map_for_read<'a>(c: &'a C<'_>, map: u32) -> Result<&'a Headers, Status> {
    static NO_TRAILERS: Headers = Headers(Vec::new());
    let ctx = c.data().http().ok_or(Status::BadArgument)?;
    match (map, ctx.phase) {
        (abi::MAP_REQUEST_HEADERS, _) => Ok(&ctx.request_headers),
        (abi::MAP_REQUEST_TRAILERS, _) => Ok(&ctx.request_trailers),
        (abi::MAP_RESPONSE_HEADERS, Phase::ResponseHeaders | Phase::Log) => {
            Ok(&ctx.response_headers)
        }
        (abi::MAP_RESPONSE_TRAILERS, _) => Ok(&NO_TRAILERS),
        _ => Err(Status::BadArgument),
    }
}

/// The header map a call may modify now: request headers while they are
/// processed, response headers likewise (Envoy returns `BadArgument` otherwise).
fn map_for_write<'a>(c: &'a mut C<'_>, map: u32) -> Result<&'a mut Headers, Status> {
    let ctx = c.data_mut().http_mut().ok_or(Status::BadArgument)?;
    match (map, ctx.phase) {
        (abi::MAP_REQUEST_HEADERS, Phase::RequestHeaders) => Ok(&mut ctx.request_headers),
        (abi::MAP_REQUEST_TRAILERS, Phase::RequestTrailers) => Ok(&mut ctx.request_trailers),
        (abi::MAP_RESPONSE_HEADERS, Phase::ResponseHeaders) => Ok(&mut ctx.response_headers),
        _ => Err(Status::BadArgument),
    }
}

fn get_property(state: &VmState, path: &[u8]) -> Result<Vec<u8>, Status> {
    let segs = abi::split_property_path(path);
    let key: Vec<Vec<u8>> = segs.iter().map(|s| s.to_vec()).collect();
    if let Some(ctx) = state.http() {
        if let [b"metadata", b"filter_metadata", filter, rest @ ..] = segs.as_slice() {
            let filter = std::str::from_utf8(filter).map_err(|_| Status::NotFound)?;
            let mut v = ctx.metadata.get(filter).ok_or(Status::NotFound)?;
            for s in rest {
                let s = std::str::from_utf8(s).map_err(|_| Status::NotFound)?;
                v = v
                    .as_object()
                    .and_then(|o| o.get(s))
                    .ok_or(Status::NotFound)?;
            }
            return abi::serialize_metadata_value(v);
        }
        match segs.as_slice() {
            [b"request", b"headers"] => return Ok(abi::serialize_pairs(&ctx.request_headers.0)),
            [b"request", b"headers", name] => {
                let name = String::from_utf8_lossy(name);
                return ctx
                    .request_headers
                    .get_bytes(&name)
                    .map(<[u8]>::to_vec)
                    .ok_or(Status::NotFound);
            }
            [b"response", b"headers", name]
                if matches!(ctx.phase, Phase::ResponseHeaders | Phase::Log) =>
            {
                let name = String::from_utf8_lossy(name);
                return ctx
                    .response_headers
                    .get_bytes(&name)
                    .map(<[u8]>::to_vec)
                    .ok_or(Status::NotFound);
            }
            _ => {}
        }
        if let Some(v) = ctx.properties.get(&key) {
            return Ok(v.clone());
        }
    }
    if let Some(v) = state.root_properties.get(&key) {
        return Ok(v.clone());
    }
    state
        .host
        .vm_properties
        .get(&key)
        .cloned()
        .ok_or(Status::NotFound)
}

/// Counts one call of a host function (see [`crate::Host::calls`]).
fn tally(c: &C<'_>, name: &'static str) {
    if let Ok(mut calls) = c.data().host.calls.lock() {
        *calls.entry(name).or_default() += 1;
    }
}

/// Defines the `env` import `name` if the host implements it.
fn define_env(linker: &mut Linker<VmState>, name: &str) -> Result<bool> {
    const M: &str = "env";
    match name {
        "proxy_log" => linker.func_wrap(M, name, |c: C<'_>, level: u32, ptr: u32, len: u32| {
            tally(&c, "proxy_log");
            let Some(level) = LogLevel::from_code(level) else {
                return Status::BadArgument.code();
            };
            match read_string(&c, ptr, len) {
                Ok(msg) => {
                    log(&c, level, LogSource::ProxyLog, msg);
                    OK
                }
                Err(s) => s.code(),
            }
        })?,
        "proxy_get_log_level" => linker.func_wrap(M, name, |mut c: C<'_>, ret: u32| {
            tally(&c, "proxy_get_log_level");
            let level = c
                .data()
                .host
                .log_level
                .load(std::sync::atomic::Ordering::Relaxed);
            code(write_u32(&mut c, ret, level))
        })?,
        "proxy_get_current_time_nanoseconds" => {
            linker.func_wrap(M, name, |mut c: C<'_>, ret: u32| {
                tally(&c, "proxy_get_current_time_nanoseconds");
                let now = c.data().host.clock.now_ns();
                code(write_u64(&mut c, ret, now))
            })?
        }
        "proxy_set_tick_period_milliseconds" => {
            linker.func_wrap(M, name, |mut c: C<'_>, period: u32| {
                tally(&c, "proxy_set_tick_period_milliseconds");
                c.data_mut().tick_period_ms = period;
                OK
            })?
        }
        "proxy_get_buffer_bytes" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, kind: u32, start: u32, max: u32, ptr_ptr: u32, size_ptr: u32| {
                tally(&c, "proxy_get_buffer_bytes");
                let buffer = match kind {
                    abi::BUFFER_PLUGIN_CONFIGURATION => c.data().plugin_config.clone(),
                    abi::BUFFER_VM_CONFIGURATION => c.data().host.vm_config.clone(),
                    0..=8 => return Ok(Status::NotFound.code()),
                    _ => return Ok(Status::BadArgument.code()),
                };
                let start = start as usize;
                if start > buffer.len() {
                    return Ok(Status::BadArgument.code());
                }
                let end = start.saturating_add(max as usize).min(buffer.len());
                let slice = buffer.get(start..end).unwrap_or_default();
                copy_out(&mut c, slice, ptr_ptr, size_ptr)
            },
        )?,
        "proxy_get_buffer_status" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, kind: u32, size_ptr: u32, flags_ptr: u32| {
                tally(&c, "proxy_get_buffer_status");
                let len = match kind {
                    abi::BUFFER_PLUGIN_CONFIGURATION => c.data().plugin_config.len(),
                    abi::BUFFER_VM_CONFIGURATION => c.data().host.vm_config.len(),
                    0..=8 => return Status::NotFound.code(),
                    _ => return Status::BadArgument.code(),
                };
                let len = u32::try_from(len).unwrap_or(u32::MAX);
                code(
                    write_u32(&mut c, size_ptr, len).and_then(|()| write_u32(&mut c, flags_ptr, 0)),
                )
            },
        )?,
        "proxy_get_header_map_pairs" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, map: u32, ptr_ptr: u32, size_ptr: u32| {
                tally(&c, "proxy_get_header_map_pairs");
                let bytes = match map_for_read(&c, map) {
                    Ok(h) => abi::serialize_pairs(&h.0),
                    Err(s) => return Ok(s.code()),
                };
                copy_out(&mut c, &bytes, ptr_ptr, size_ptr)
            },
        )?,
        "proxy_get_header_map_size" => {
            linker.func_wrap(M, name, |mut c: C<'_>, map: u32, size_ptr: u32| {
                tally(&c, "proxy_get_header_map_size");
                let size = map_for_read(&c, map).map(|h| abi::serialize_pairs(&h.0).len());
                match size {
                    Ok(len) => code(write_u32(
                        &mut c,
                        size_ptr,
                        u32::try_from(len).unwrap_or(u32::MAX),
                    )),
                    Err(s) => s.code(),
                }
            })?
        }
        "proxy_set_header_map_pairs" => {
            linker.func_wrap(M, name, |mut c: C<'_>, map: u32, ptr: u32, len: u32| {
                tally(&c, "proxy_set_header_map_pairs");
                let bytes = match read(&c, ptr, len) {
                    Ok(b) => b,
                    Err(s) => return s.code(),
                };
                let Some(pairs) = abi::deserialize_pairs(&bytes) else {
                    return Status::BadArgument.code();
                };
                match map_for_write(&mut c, map) {
                    Ok(h) => {
                        let mut new = Headers::new();
                        for (k, v) in pairs {
                            new.add(&String::from_utf8_lossy(&k), &v);
                        }
                        *h = new;
                        OK
                    }
                    Err(s) => s.code(),
                }
            })?
        }
        "proxy_get_header_map_value" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, map: u32, kp: u32, kl: u32, ptr_ptr: u32, size_ptr: u32| {
                tally(&c, "proxy_get_header_map_value");
                let key = match read_string(&c, kp, kl) {
                    Ok(k) => k,
                    Err(s) => return Ok(s.code()),
                };
                let value = match map_for_read(&c, map) {
                    Ok(h) => match h.get_bytes(&key) {
                        Some(v) => v.to_vec(),
                        None => return Ok(Status::NotFound.code()),
                    },
                    Err(s) => return Ok(s.code()),
                };
                copy_out(&mut c, &value, ptr_ptr, size_ptr)
            },
        )?,
        "proxy_replace_header_map_value" | "proxy_add_header_map_value" => {
            let add = name == "proxy_add_header_map_value";
            linker.func_wrap(
                M,
                name,
                move |mut c: C<'_>, map: u32, kp: u32, kl: u32, vp: u32, vl: u32| {
                    tally(
                        &c,
                        if add {
                            "proxy_add_header_map_value"
                        } else {
                            "proxy_replace_header_map_value"
                        },
                    );
                    let (key, value) = match (read_string(&c, kp, kl), read(&c, vp, vl)) {
                        (Ok(k), Ok(v)) => (k, v),
                        (Err(s), _) | (_, Err(s)) => return s.code(),
                    };
                    match map_for_write(&mut c, map) {
                        Ok(h) if add => {
                            h.add(&key, &value);
                            OK
                        }
                        Ok(h) => {
                            h.replace(&key, &value);
                            OK
                        }
                        Err(s) => s.code(),
                    }
                },
            )?
        }
        "proxy_remove_header_map_value" => {
            linker.func_wrap(M, name, |mut c: C<'_>, map: u32, kp: u32, kl: u32| {
                tally(&c, "proxy_remove_header_map_value");
                let key = match read_string(&c, kp, kl) {
                    Ok(k) => k,
                    Err(s) => return s.code(),
                };
                match map_for_write(&mut c, map) {
                    Ok(h) => {
                        h.remove(&key);
                        OK
                    }
                    Err(s) => s.code(),
                }
            })?
        }
        "proxy_get_property" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, pp: u32, pl: u32, ptr_ptr: u32, size_ptr: u32| {
                tally(&c, "proxy_get_property");
                let path = match read(&c, pp, pl) {
                    Ok(p) => p,
                    Err(s) => return Ok(s.code()),
                };
                match get_property(c.data(), &path) {
                    Ok(v) => copy_out(&mut c, &v, ptr_ptr, size_ptr),
                    Err(s) => Ok(s.code()),
                }
            },
        )?,
        "proxy_set_property" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, pp: u32, pl: u32, vp: u32, vl: u32| {
                tally(&c, "proxy_set_property");
                let (path, value) = match (read(&c, pp, pl), read(&c, vp, vl)) {
                    (Ok(p), Ok(v)) => (p, v),
                    (Err(s), _) | (_, Err(s)) => return s.code(),
                };
                let key: Vec<Vec<u8>> = abi::split_property_path(&path)
                    .iter()
                    .map(|s| s.to_vec())
                    .collect();
                match c.data_mut().http_mut() {
                    Some(ctx) => {
                        ctx.properties.insert(key, value);
                    }
                    None => {
                        c.data_mut().root_properties.insert(key, value);
                    }
                }
                OK
            },
        )?,
        "proxy_get_shared_data" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, kp: u32, kl: u32, ptr_ptr: u32, size_ptr: u32, cas_ptr: u32| {
                tally(&c, "proxy_get_shared_data");
                let key = match read(&c, kp, kl) {
                    Ok(k) => k,
                    Err(s) => return Ok(s.code()),
                };
                let got = c.data().host.shared_data.get(&key);
                match got {
                    Ok((value, cas)) => {
                        if let Err(s) = write_u32(&mut c, cas_ptr, cas) {
                            return Ok(s.code());
                        }
                        copy_out(&mut c, &value, ptr_ptr, size_ptr)
                    }
                    Err(s) => Ok(s.code()),
                }
            },
        )?,
        "proxy_set_shared_data" => linker.func_wrap(
            M,
            name,
            |c: C<'_>, kp: u32, kl: u32, vp: u32, vl: u32, cas: u32| {
                tally(&c, "proxy_set_shared_data");
                let (key, value) = match (read(&c, kp, kl), read(&c, vp, vl)) {
                    (Ok(k), Ok(v)) => (k, v),
                    (Err(s), _) | (_, Err(s)) => return s.code(),
                };
                code(c.data().host.shared_data.set(&key, &value, cas))
            },
        )?,
        "proxy_continue_stream" | "proxy_close_stream" => {
            let close = name == "proxy_close_stream";
            linker.func_wrap(M, name, move |c: C<'_>, stream: u32| {
                tally(
                    &c,
                    if close {
                        "proxy_close_stream"
                    } else {
                        "proxy_continue_stream"
                    },
                );
                if stream > 3 {
                    return Status::BadArgument.code();
                }
                if c.data().http().is_none() {
                    return Status::NotFound.code();
                }
                OK
            })?
        }
        "proxy_send_local_response" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>,
             status: u32,
             dp: u32,
             dl: u32,
             bp: u32,
             bl: u32,
             hp: u32,
             hl: u32,
             grpc: i32| {
                tally(&c, "proxy_send_local_response");
                let parts = (read_string(&c, dp, dl), read(&c, bp, bl), read(&c, hp, hl));
                let (details, body, headers) = match parts {
                    (Ok(d), Ok(b), Ok(h)) => (d, b, h),
                    (Err(s), _, _) | (_, Err(s), _) | (_, _, Err(s)) => return s.code(),
                };
                let Some(pairs) = abi::deserialize_pairs(&headers) else {
                    return Status::BadArgument.code();
                };
                let mut h = Headers::new();
                for (k, v) in pairs {
                    h.add(&String::from_utf8_lossy(&k), &v);
                }
                match c.data_mut().http_mut() {
                    Some(ctx) if ctx.phase != Phase::Log => {
                        ctx.local_count += 1;
                        ctx.local = Some(LocalResponse {
                            status,
                            details,
                            body,
                            headers: h,
                            grpc_status: grpc,
                        });
                        OK
                    }
                    _ => Status::BadArgument.code(),
                }
            },
        )?,
        "proxy_set_effective_context" => linker.func_wrap(M, name, |mut c: C<'_>, id: u32| {
            tally(&c, "proxy_set_effective_context");
            let st = c.data_mut();
            if st.http.contains_key(&id) {
                st.active = id;
                OK
            } else {
                Status::BadArgument.code()
            }
        })?,
        "proxy_done" => linker.func_wrap(M, name, |_c: C<'_>| Status::NotFound.code())?,
        "proxy_define_metric" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, kind: u32, np: u32, nl: u32, ret: u32| {
                tally(&c, "proxy_define_metric");
                let Some(kind) = MetricType::from_code(kind) else {
                    return Status::BadArgument.code();
                };
                let name = match read_string(&c, np, nl) {
                    Ok(n) => n,
                    Err(s) => return s.code(),
                };
                let id = c.data().host.metrics.define(kind, &name);
                code(write_u32(&mut c, ret, id))
            },
        )?,
        "proxy_increment_metric" => {
            linker.func_wrap(M, name, |c: C<'_>, id: u32, delta: i64| {
                tally(&c, "proxy_increment_metric");
                code(c.data().host.metrics.increment(id, delta))
            })?
        }
        "proxy_record_metric" => linker.func_wrap(M, name, |c: C<'_>, id: u32, value: u64| {
            tally(&c, "proxy_record_metric");
            code(c.data().host.metrics.record(id, value))
        })?,
        "proxy_get_metric" => linker.func_wrap(M, name, |mut c: C<'_>, id: u32, ret: u32| {
            tally(&c, "proxy_get_metric");
            match c.data().host.metrics.get(id) {
                Ok(v) => code(write_u64(&mut c, ret, v)),
                Err(s) => s.code(),
            }
        })?,
        _ => return Ok(false),
    };
    Ok(true)
}

/// Defines the WASI import `name` if the host implements it.
fn define_wasi(linker: &mut Linker<VmState>, name: &str) -> Result<bool> {
    const M: &str = "wasi_snapshot_preview1";
    match name {
        "fd_write" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, fd: u32, iovs: u32, iovs_len: u32, written: u32| {
                tally(&c, "fd_write");
                let (level, source) = match fd {
                    1 => (LogLevel::Info, LogSource::Stdout),
                    2 => (LogLevel::Error, LogSource::Stderr),
                    _ => return errno::BADF,
                };
                let mut out = Vec::new();
                for i in 0..iovs_len {
                    let Some(at) = i.checked_mul(8).and_then(|o| iovs.checked_add(o)) else {
                        return errno::FAULT;
                    };
                    let Ok(iov) = read(&c, at, 8) else {
                        return errno::FAULT;
                    };
                    let word = |o: usize| {
                        iov.get(o..o + 4)
                            .and_then(|b| <[u8; 4]>::try_from(b).ok())
                            .map(u32::from_le_bytes)
                            .unwrap_or(0)
                    };
                    match read(&c, word(0), word(4)) {
                        Ok(bytes) => out.extend_from_slice(&bytes),
                        Err(_) => return errno::FAULT,
                    }
                }
                let n = u32::try_from(out.len()).unwrap_or(u32::MAX);
                let text = String::from_utf8_lossy(&out);
                let text = text.strip_suffix('\n').unwrap_or(&text).to_string();
                log(&c, level, source, text);
                match write_u32(&mut c, written, n) {
                    Ok(()) => errno::SUCCESS,
                    Err(_) => errno::FAULT,
                }
            },
        )?,
        "clock_time_get" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, id: u32, _precision: u64, ret: u32| {
                tally(&c, "clock_time_get");
                if id > 3 {
                    return errno::INVAL;
                }
                let now = c.data().host.clock.now_ns();
                match write_u64(&mut c, ret, now) {
                    Ok(()) => errno::SUCCESS,
                    Err(_) => errno::FAULT,
                }
            },
        )?,
        "clock_res_get" => linker.func_wrap(M, name, |mut c: C<'_>, id: u32, ret: u32| {
            tally(&c, "clock_res_get");
            if id > 3 {
                return errno::INVAL;
            }
            match write_u64(&mut c, ret, 1) {
                Ok(()) => errno::SUCCESS,
                Err(_) => errno::FAULT,
            }
        })?,
        "random_get" => linker.func_wrap(M, name, |mut c: C<'_>, buf: u32, len: u32| {
            tally(&c, "random_get");
            if len > 1 << 20 {
                return errno::INVAL;
            }
            let mut bytes = Vec::with_capacity(len as usize + 8);
            while bytes.len() < len as usize {
                let r = c.data_mut().next_random();
                bytes.extend_from_slice(&r.to_le_bytes());
            }
            bytes.truncate(len as usize);
            match write(&mut c, buf, &bytes) {
                Ok(()) => errno::SUCCESS,
                Err(_) => errno::FAULT,
            }
        })?,
        "environ_sizes_get" | "args_sizes_get" => linker.func_wrap(
            M,
            name,
            |mut c: C<'_>, count: u32, size: u32| match write_u32(&mut c, count, 0)
                .and_then(|()| write_u32(&mut c, size, 0))
            {
                Ok(()) => errno::SUCCESS,
                Err(_) => errno::FAULT,
            },
        )?,
        "environ_get" | "args_get" => {
            linker.func_wrap(M, name, |_c: C<'_>, _a: u32, _b: u32| errno::SUCCESS)?
        }
        "fd_prestat_get" => {
            linker.func_wrap(M, name, |_c: C<'_>, _fd: u32, _ret: u32| errno::BADF)?
        }
        "sched_yield" => linker.func_wrap(M, name, |_c: C<'_>| errno::SUCCESS)?,
        "proc_exit" => linker.func_wrap(M, name, |_c: C<'_>, code: u32| -> Result<()> {
            Err(anyhow!("the module called proc_exit({code})"))
        })?,
        _ => return Ok(false),
    };
    Ok(true)
}

/// Defines every import of `module` on `linker`. Returns the imports that got
/// an error-returning stub, as `module.name`.
pub(crate) fn define_imports(linker: &mut Linker<VmState>, module: &Module) -> Result<Vec<String>> {
    let mut stubbed = Vec::new();
    for import in module.imports() {
        let (m, name) = (import.module(), import.name());
        let ExternType::Func(ty) = import.ty() else {
            return Err(anyhow!(
                "tenantgate.wasm imports `{m}.{name}`, which is not a function: this host only provides functions"
            ));
        };
        let defined = match m {
            "env" => define_env(linker, name)?,
            "wasi_snapshot_preview1" | "wasi_unstable" => define_wasi(linker, name)?,
            _ => false,
        };
        if defined {
            continue;
        }
        let error = match m {
            "wasi_snapshot_preview1" | "wasi_unstable" => errno::NOSYS,
            _ => Status::Unimplemented.code(),
        };
        let label = format!("{m}.{name}");
        stubbed.push(label.clone());
        let results: Vec<ValType> = ty.results().collect();
        linker.func_new(m, name, ty.clone(), move |c, _params, out| {
            if let Ok(mut calls) = c.data().host.unimplemented.lock() {
                *calls.entry(label.clone()).or_insert(0) += 1;
            }
            for (slot, t) in out.iter_mut().zip(results.iter()) {
                *slot = match t {
                    ValType::I32 => Val::I32(i32::try_from(error).unwrap_or(i32::MAX)),
                    ValType::I64 => Val::I64(i64::from(error)),
                    ValType::F32 => Val::F32(0),
                    ValType::F64 => Val::F64(0),
                    other => {
                        return Err(anyhow!(
                            "unimplemented import `{label}` cannot return a value of type {other}"
                        ))
                    }
                };
            }
            Ok(())
        })?;
    }
    Ok(stubbed)
}
