//! Bundle parsing and compiling: any bytes, as a bundle document (with its
//! version check) and as bundle content (without it, to reach the compiler).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenantgate_engine::{Bundle, Engine};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(b) = Bundle::from_json(text) {
        let _ = Engine::new(&b);
    }
    if let Ok(mut b) = serde_json::from_str::<Bundle>(text) {
        b.version = b.compute_version();
        if let Ok(engine) = Engine::new(&b) {
            // A bundle that compiles round-trips through its JSON.
            let again = Bundle::from_json(&b.to_json()).expect("a compiled bundle re-reads");
            assert_eq!(again.version, b.version);
            let _ = engine.tenants();
        }
    }
});
