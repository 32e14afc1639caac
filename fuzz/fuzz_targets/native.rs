//! The native build's entry points (`libtenantgate.so`), on what Envoy hands
//! them: any bytes as the filter config (the bundle JSON, read lossily as
//! the module reads it), as header names and values (raw bytes, as the ABI
//! gives them) through the module's header reading into the engine's flow
//! over the process-wide bucket store, and as the body of a gRPC answer
//! (the fleet check's). Nothing panics; a gRPC reply's `grpc-message` is
//! printable ASCII; a gRPC frame round-trips.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tenantgate::host::{engine_of, grpc_answer, grpc_frame, grpc_message, grpc_unframe, header_pairs, is_grpc};
use tenantgate_engine::flow::{Step, Verdict};
use tenantgate_engine::http::{own_headers, HttpInput, NoMetadata};
use tenantgate_engine::quota::ShardedStore;
use tenantgate_engine::{Bundle, Engine, Worker};

fn worker() -> &'static (Worker, ShardedStore) {
    static W: OnceLock<(Worker, ShardedStore)> = OnceLock::new();
    W.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let bundle = Bundle::from_dir(&dir).expect("policies/ loads");
        let engine = Engine::new(&bundle).expect("policies/ compiles");
        (Worker::with_ids(Arc::new(engine), 7), ShardedStore::new())
    })
}

fuzz_target!(|data: &[u8]| {
    // 1. The filter config: a bundle, or errors, never a panic.
    if let Ok(engine) = engine_of(data) {
        let _ = engine.tenants();
    }

    // 2. A request's headers: the input split on 0xff into names and values.
    let parts: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    let raw: Vec<(&[u8], &[u8])> = parts.chunks(2).map(|c| (c[0], c.get(1).copied().unwrap_or(b""))).collect();
    if let Ok(headers) = header_pairs(&raw) {
        let grpc = is_grpc(&headers);
        let _strip: Vec<&str> = own_headers(&headers).collect();
        let (worker, store) = worker();
        let input = HttpInput { headers: &headers, source_address: Some("10.0.0.1:1234"), now_ns: 1_795_707_000_000_000_000 };
        match worker.begin(&input, &NoMetadata, Some(store)) {
            Step::Done(effects) => {
                if let Verdict::Reply(reply) = &effects.verdict {
                    assert_eq!(reply.status, effects.decision.status);
                    if grpc {
                        let m = grpc_message(&reply.body);
                        assert!(m.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{m}");
                    }
                }
            }
            // The example tree has no rate limit service.
            Step::Deferred(_) => panic!("no fleet check is configured"),
        }
    }

    // 3. A gRPC answer's body.
    if let Ok(message) = grpc_answer(Some("200"), Some("0"), data) {
        assert_eq!(grpc_unframe(&grpc_frame(&message)), Ok(&message[..]));
    }
    let _ = grpc_answer(Some("503"), None, data);
});
