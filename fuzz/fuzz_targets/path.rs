//! Path normalization: never panics, and what it returns is canonical.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenantgate_engine::path::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(p) = normalize_path(raw) else { return };
    assert!(p.starts_with('/'), "{p:?}");
    assert!(p == "/" || !p.ends_with('/'), "{p:?}");
    assert!(!p.contains("//"), "{p:?}");
    for seg in p.split('/').skip(1) {
        assert!(seg != "." && seg != "..", "dot segment left in {p:?} from {raw:?}");
        assert!(!seg.contains(';'), "{p:?}");
    }
    let lower = p.to_ascii_lowercase();
    assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e"), "{p:?}");
    assert!(!p.contains('?') && !p.contains('#'), "{p:?}");
    // Normalizing twice changes nothing: the gate and a second normalizer agree.
    assert_eq!(normalize_path(&p).as_deref(), Ok(p.as_str()), "not idempotent from {raw:?}");
});
