//! The filter's decoder of the host's header-map bytes: any bytes give the
//! pairs or `None`, never a panic; what decodes encodes back to the same
//! pairs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenantgate_filter::map::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let Some(pairs) = decode(data) else { return };
    let text: Option<Vec<(&str, &str)>> = pairs
        .iter()
        .map(|(k, v)| std::str::from_utf8(v).ok().map(|v| (*k, v)))
        .collect();
    if let Some(text) = text {
        let again = encode(&text);
        assert_eq!(decode(&again).as_deref(), Some(&pairs[..]));
    }
});
