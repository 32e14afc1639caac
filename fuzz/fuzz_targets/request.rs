//! A request's whole flow on the example tree (mapping, policies, quotas,
//! the reply): any header bytes give a decision and, when denied, a JSON
//! reply; nothing panics.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tenantgate_engine::flow::{Step, Verdict};
use tenantgate_engine::http::{HttpInput, NoMetadata};
use tenantgate_engine::quota::MemoryStore;
use tenantgate_engine::{Bundle, Engine, Worker};

fn worker() -> &'static (Worker, MemoryStore) {
    static W: OnceLock<(Worker, MemoryStore)> = OnceLock::new();
    W.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let bundle = Bundle::from_dir(&dir).expect("policies/ loads");
        let engine = Engine::new(&bundle).expect("policies/ compiles");
        (Worker::with_ids(Arc::new(engine), 7), MemoryStore::new())
    })
}

const NAMES: [&str; 8] = [":method", ":path", "x-tenant", "x-user", "x-user-tenant", "x-api-key", ":authority", "x-request-id"];

fuzz_target!(|data: &[u8]| {
    let (worker, store) = worker();
    // Split the input on 0xff into header values, cycling through the names.
    let headers: Vec<(&str, &[u8])> = data
        .split(|b| *b == 0xff)
        .enumerate()
        .map(|(i, v)| (NAMES[i % NAMES.len()], v))
        .collect();
    let input = HttpInput { headers: &headers, source_address: Some("10.0.0.1:1234"), now_ns: 1_795_707_000_000_000_000 };
    let effects = match worker.begin(&input, &NoMetadata, Some(store)) {
        Step::Done(e) => e,
        // The example tree has no rate limit service.
        Step::Deferred(_) => panic!("no fleet check is configured"),
    };
    let status = effects.decision.status;
    assert!(matches!(status, 200 | 400 | 403 | 429 | 503), "{:?}", effects.decision);
    if let Verdict::Reply(reply) = &effects.verdict {
        assert_eq!(reply.status, status);
        let v: serde_json::Value = serde_json::from_str(&reply.body).expect("reply bodies are JSON");
        assert!(v.get("error").is_some());
    }
});
