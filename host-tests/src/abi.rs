//! Numbers and wire formats of the proxy-wasm ABI v0.2.1 (the spec's "Types"
//! and "Serialization" sections), and the WASI errno values the host returns.

/// `proxy_status_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}

impl Status {
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// `proxy_log_level_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_code(code: u32) -> Option<LogLevel> {
        Some(match code {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// `proxy_action_t`, as returned by the header callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
    /// Any other value: a filter bug, kept for the assertion message.
    Other(u32),
}

impl Action {
    pub fn from_code(code: u32) -> Action {
        match code {
            0 => Action::Continue,
            1 => Action::Pause,
            n => Action::Other(n),
        }
    }
}

/// `proxy_metric_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

impl MetricType {
    pub fn from_code(code: u32) -> Option<MetricType> {
        Some(match code {
            0 => MetricType::Counter,
            1 => MetricType::Gauge,
            2 => MetricType::Histogram,
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t` values the host serves.
pub const BUFFER_VM_CONFIGURATION: u32 = 6;
pub const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;

/// `proxy_map_type_t` values the host serves.
pub const MAP_REQUEST_HEADERS: u32 = 0;
pub const MAP_REQUEST_TRAILERS: u32 = 1;
pub const MAP_RESPONSE_HEADERS: u32 = 2;
pub const MAP_RESPONSE_TRAILERS: u32 = 3;

/// `wasi_errno_t` values the host returns.
pub mod errno {
    pub const SUCCESS: u32 = 0;
    pub const BADF: u32 = 8;
    pub const FAULT: u32 = 21;
    pub const INVAL: u32 = 28;
    pub const NOSYS: u32 = 52;
}

/// Serializes header pairs in the ABI's map format: the number of pairs, the
/// sizes of every key and value, then each key and value followed by a NUL.
pub fn serialize_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut size = 4;
    for (k, v) in pairs {
        size += 10 + k.as_ref().len() + v.as_ref().len();
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&len32(pairs.len()).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&len32(k.as_ref().len()).to_le_bytes());
        out.extend_from_slice(&len32(v.as_ref().len()).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Parses the ABI's map format. An empty input (or a lone NUL) is the empty
/// map; anything malformed is `None`.
pub fn deserialize_pairs(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if bytes.is_empty() || bytes == [0] {
        return Some(Vec::new());
    }
    let count = read_u32(bytes, 0)? as usize;
    let mut sizes = Vec::with_capacity(count.min(4096));
    for i in 0..count {
        let at = 4usize.checked_add(i.checked_mul(8)?)?;
        sizes.push((
            read_u32(bytes, at)? as usize,
            read_u32(bytes, at + 4)? as usize,
        ));
    }
    let mut p = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(sizes.len());
    for (ks, vs) in sizes {
        let key = bytes.get(p..p.checked_add(ks)?)?.to_vec();
        p = p.checked_add(ks)?;
        if bytes.get(p) != Some(&0) {
            return None;
        }
        p += 1;
        let value = bytes.get(p..p.checked_add(vs)?)?.to_vec();
        p = p.checked_add(vs)?;
        if bytes.get(p) != Some(&0) {
            return None;
        }
        p += 1;
        out.push((key, value));
    }
    Some(out)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// Splits a serialized property path (segments separated by NUL).
pub fn split_property_path(path: &[u8]) -> Vec<&[u8]> {
    if path.is_empty() {
        return Vec::new();
    }
    path.split(|b| *b == 0).collect()
}

/// Serializes a JSON value the way Envoy serializes a property it reads from
/// dynamic metadata (a `google.protobuf.Struct`): strings as their bytes,
/// numbers as a little-endian `f64`, booleans as one byte, null as nothing,
/// objects as a map in the ABI's pair format with each value serialized the
/// same way. Lists cannot be serialized (`SerializationFailure`).
pub fn serialize_metadata_value(value: &serde_json::Value) -> Result<Vec<u8>, Status> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => Vec::new(),
        Value::Bool(b) => vec![u8::from(*b)],
        Value::Number(n) => n
            .as_f64()
            .ok_or(Status::SerializationFailure)?
            .to_le_bytes()
            .to_vec(),
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Array(_) => return Err(Status::SerializationFailure),
        Value::Object(map) => {
            let mut pairs = Vec::with_capacity(map.len());
            for (k, v) in map {
                pairs.push((k.as_bytes().to_vec(), serialize_metadata_value(v)?));
            }
            serialize_pairs(&pairs)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_match_the_spec_example() {
        let bytes = serialize_pairs(&[("a", "1"), ("b", "22")]);
        assert_eq!(
            bytes,
            [
                2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'1', 0, b'b',
                0, b'2', b'2', 0
            ]
        );
        let back = deserialize_pairs(&bytes).unwrap();
        assert_eq!(
            back,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"22".to_vec())
            ]
        );
        assert_eq!(deserialize_pairs(&[]).unwrap(), vec![]);
        assert_eq!(deserialize_pairs(&[0]).unwrap(), vec![]);
        assert_eq!(deserialize_pairs(&[0, 0, 0, 0]).unwrap(), vec![]);
        assert!(deserialize_pairs(&[5, 0, 0, 0, 1]).is_none());
        assert!(deserialize_pairs(&bytes[..bytes.len() - 1]).is_none());
    }

    #[test]
    fn property_paths_split_on_nul() {
        let p = b"metadata\0filter_metadata\0envoy.filters.http.jwt_authn\0payload\0tenant";
        let segs = split_property_path(p);
        assert_eq!(segs.len(), 5);
        assert_eq!(segs[2], b"envoy.filters.http.jwt_authn");
        assert!(split_property_path(b"").is_empty());
    }

    #[test]
    fn metadata_values_serialize_like_envoy() {
        use serde_json::json;
        assert_eq!(serialize_metadata_value(&json!("/acme")).unwrap(), b"/acme");
        assert_eq!(
            serialize_metadata_value(&json!(2)).unwrap(),
            2f64.to_le_bytes()
        );
        assert_eq!(serialize_metadata_value(&json!(true)).unwrap(), [1]);
        let m = serialize_metadata_value(&json!({"sub": "alice"})).unwrap();
        assert_eq!(
            deserialize_pairs(&m).unwrap(),
            vec![(b"sub".to_vec(), b"alice".to_vec())]
        );
        assert_eq!(
            serialize_metadata_value(&json!([1])),
            Err(Status::SerializationFailure)
        );
    }
}
