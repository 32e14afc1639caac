//! JWT claims from the header Envoy's `jwt_authn` fills with
//! `forward_payload_header`.

/// The longest claims header accepted.
pub const MAX_CLAIMS_LEN: usize = 16 * 1024;

/// A JWT payload as Envoy's `forward_payload_header` writes it: base64url
/// (padding optional) of a JSON object. Values Cedar cannot hold (`null`,
/// non-integer numbers) are left out rather than failing the request.
pub fn decode_claims(v: &str) -> Result<serde_json::Value, String> {
    if v.len() > MAX_CLAIMS_LEN {
        return Err(format!("longer than {MAX_CLAIMS_LEN} bytes"));
    }
    let bytes = base64url_decode(v.trim()).ok_or("not base64url")?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| "not a JSON object")?;
    match value {
        serde_json::Value::Object(_) => Ok(cedar_safe(value)),
        _ => Err("not a JSON object".into()),
    }
}

fn cedar_safe(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let keep = |x: &Value| !x.is_null() && (!x.is_number() || x.as_i64().is_some());
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, x)| keep(x))
                .map(|(k, x)| (k, cedar_safe(x)))
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().filter(keep).map(cedar_safe).collect())
        }
        other => other,
    }
}

pub(crate) fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character cannot encode a byte.
    (bits < 6).then_some(out)
}
