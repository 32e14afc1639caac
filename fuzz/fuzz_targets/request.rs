//! Request mapping and the whole decision on the example tree: any header
//! bytes give a decision and, when denied, a reply; nothing panics.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tenantgate_engine::http::{HttpInput, NoMetadata};
use tenantgate_engine::quota::MemoryStore;
use tenantgate_engine::{Bundle, Decision, Engine};

fn engine() -> &'static (Engine, MemoryStore) {
    static E: OnceLock<(Engine, MemoryStore)> = OnceLock::new();
    E.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let bundle = Bundle::from_dir(&dir).expect("policies/ loads");
        (Engine::new(&bundle).expect("policies/ compiles"), MemoryStore::new())
    })
}

const NAMES: [&str; 8] = [":method", ":path", "x-tenant", "x-user", "x-user-tenant", "x-api-key", ":authority", "x-request-id"];

fuzz_target!(|data: &[u8]| {
    let (engine, store) = engine();
    // Split the input on 0xff into header values, cycling through the names.
    let headers: Vec<(&str, &[u8])> = data
        .split(|b| *b == 0xff)
        .enumerate()
        .map(|(i, v)| (NAMES[i % NAMES.len()], v))
        .collect();
    let input = HttpInput { headers: &headers, source_address: Some("10.0.0.1:1234"), now_ns: 1_795_707_000_000_000_000 };
    let (decision, tenant, rid) = match engine.map_request(&input, &NoMetadata) {
        Ok(m) => {
            let d = engine.decide(&m.request, store);
            let _ = engine.audit_line(&d, Some(&m), m.request_id.as_deref());
            (d, Some(m.request.tenant.clone()), m.request_id.clone())
        }
        Err(bad) => (Decision::bad_request(bad.message), bad.tenant, None),
    };
    assert!(matches!(decision.status, 200 | 400 | 403 | 429 | 503), "{decision:?}");
    if let Some(reply) = engine.reply(&decision, tenant.as_ref(), rid.as_deref(), Some("d")) {
        let v: serde_json::Value = serde_json::from_str(&reply.body).expect("reply bodies are JSON");
        assert!(v.get("error").is_some());
    }
});
