//! The proxy-wasm serialization of header maps: a `u32` count, then a
//! `(key length, value length)` pair of `u32`s per entry, then each key and
//! value followed by a NUL (all little-endian). The host hands request
//! headers over this way and takes a local reply's headers this way. Pure
//! functions, so they run (and are fuzzed) natively.

/// The pairs of a serialized map, borrowed from `bytes`; `None` if it is
/// malformed (lengths past the end, a count that cannot fit) or a name is not
/// UTF-8 (names are tokens in Envoy). The NUL after each key and value is not
/// checked: the lengths say where they end.
pub fn decode(bytes: &[u8]) -> Option<Vec<(&str, &[u8])>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |i: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(i..i.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let count = u32_at(0)?;
    // Each entry takes 8 bytes of lengths and 2 NULs.
    if count > bytes.len() / 10 {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    let mut p = 4 + count * 8;
    for n in 0..count {
        let ks = u32_at(4 + n * 8)?;
        let vs = u32_at(8 + n * 8)?;
        let key_end = p.checked_add(ks)?;
        let key = std::str::from_utf8(bytes.get(p..key_end)?).ok()?;
        p = key_end.checked_add(1)?;
        let value_end = p.checked_add(vs)?;
        let value = bytes.get(p..value_end)?;
        p = value_end.checked_add(1)?;
        out.push((key, value));
    }
    Some(out)
}

/// Serializes pairs (see the module doc).
pub fn encode(pairs: &[(&str, &str)]) -> Vec<u8> {
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = Vec::new();
    out.extend_from_slice(&len(pairs.len()));
    for (k, v) in pairs {
        out.extend_from_slice(&len(k.len()));
        out.extend_from_slice(&len(v.len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pairs = [(":method", "GET"), ("x-tenant", "/acme/eu"), ("empty", "")];
        let bytes = encode(&pairs);
        let got = decode(&bytes).unwrap();
        let want: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        assert_eq!(got, want);
        assert_eq!(decode(&encode(&[])).unwrap(), Vec::<(&str, &[u8])>::new());
        assert_eq!(decode(&[]).unwrap(), Vec::<(&str, &[u8])>::new());
    }

    #[test]
    fn exact_bytes() {
        assert_eq!(
            encode(&[("a", "bc")]),
            [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'b', b'c', 0]
        );
    }

    #[test]
    fn malformed_maps_are_none() {
        let good = encode(&[("x-a", "1"), ("x-b", "22")]);
        // Every truncation of a good map is refused, never a panic.
        for n in 1..good.len() - 1 {
            assert_eq!(decode(&good[..n]), None, "truncated to {n} bytes");
        }
        // A count larger than the bytes could hold.
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff]), None);
        // A key length past the end.
        assert_eq!(
            decode(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, b'a', 0, 0]),
            None
        );
        // A value length that would overflow the offset.
        assert_eq!(
            decode(&[1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, b'a', 0, 0]),
            None
        );
        // A name that is not UTF-8.
        assert_eq!(
            decode(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0, 0]),
            None
        );
    }
}
