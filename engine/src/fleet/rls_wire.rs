//! The two protobuf messages of Envoy's rate limit service call
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), encoded
//! and decoded by hand: the filter needs one request shape and reads a few
//! fields of the answer, so a protobuf library would only add size to the
//! Wasm module. Field numbers are those of Envoy's `rls.proto` and
//! `ratelimit.proto` (v3); tests in the `rls` crate check the encoding
//! against the generated (prost) types, and the fleet tests against the
//! real server.

/// `RateLimitResponse.Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Code {
    #[default]
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    fn from_wire(v: u64) -> Code {
        match v {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
}

/// One descriptor of a request: its entries and, for a report, its own
/// `hits_addend` (the request-level one applies when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireDescriptor<'a> {
    pub entries: Vec<(&'a str, &'a str)>,
    pub hits: Option<u64>,
}

/// Encodes a `RateLimitRequest`: `domain` (1), `descriptors` (2: entries (1)
/// of key (1) and value (2); `hits_addend` (3) as a `UInt64Value`), and the
/// request-level `hits_addend` (3) when it is not 0.
pub fn encode_request(
    domain: &str,
    descriptors: &[WireDescriptor<'_>],
    hits_addend: u32,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_bytes(&mut out, 1, domain.as_bytes());
    let mut d = Vec::with_capacity(48);
    let mut e = Vec::with_capacity(32);
    for desc in descriptors {
        d.clear();
        for (k, v) in &desc.entries {
            e.clear();
            put_bytes(&mut e, 1, k.as_bytes());
            put_bytes(&mut e, 2, v.as_bytes());
            put_bytes(&mut d, 1, &e);
        }
        if let Some(h) = desc.hits {
            e.clear();
            put_varint_field(&mut e, 1, h);
            put_bytes(&mut d, 3, &e);
        }
        put_bytes(&mut out, 2, &d);
    }
    if hits_addend != 0 {
        put_varint_field(&mut out, 3, u64::from(hits_addend));
    }
    out
}

/// One `DescriptorStatus` of an answer, as far as the filter reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    /// `current_limit`: requests per unit and the unit in seconds (`None`
    /// when the server sent no limit, or a unit without a fixed length).
    pub limit: Option<(u32, Option<u64>)>,
    pub remaining: u32,
    /// `duration_until_reset`, in nanoseconds.
    pub reset_ns: Option<u64>,
}

/// The parts of a `RateLimitResponse` the filter reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub overall: Code,
    pub statuses: Vec<Status>,
}

/// Decodes a `RateLimitResponse`; unknown fields are skipped, a truncated or
/// malformed message is an error.
pub fn decode_response(bytes: &[u8]) -> Result<Response, String> {
    let mut out = Response::default();
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(v)) => out.overall = Code::from_wire(v),
            (2, Value::Bytes(b)) => out.statuses.push(decode_status(b)?),
            _ => {}
        }
    }
    Ok(out)
}

fn decode_status(bytes: &[u8]) -> Result<Status, String> {
    let mut s = Status::default();
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(v)) => s.code = Code::from_wire(v),
            (2, Value::Bytes(b)) => {
                let (mut rpu, mut unit) = (0u32, 0u64);
                for f in Fields(b) {
                    match f? {
                        (1, Value::Varint(v)) => rpu = u32::try_from(v).unwrap_or(u32::MAX),
                        (2, Value::Varint(v)) => unit = v,
                        _ => {}
                    }
                }
                s.limit = Some((rpu, unit_seconds(unit)));
            }
            (3, Value::Varint(v)) => s.remaining = u32::try_from(v).unwrap_or(u32::MAX),
            (4, Value::Bytes(b)) => s.reset_ns = Some(duration_ns(b)?),
            _ => {}
        }
    }
    Ok(s)
}

/// `RateLimit.Unit` in seconds (`MONTH` and `YEAR` have no fixed length).
fn unit_seconds(unit: u64) -> Option<u64> {
    match unit {
        1 => Some(1),
        2 => Some(60),
        3 => Some(3_600),
        4 => Some(86_400),
        7 => Some(7 * 86_400),
        _ => None,
    }
}

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, v);
}

pub(super) fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

pub(super) enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of one message, in order.
pub(super) struct Fields<'a>(pub(super) &'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let r = self.read();
        if r.is_err() {
            // Stop after the first error.
            self.0 = &[];
        }
        Some(r)
    }
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self
                .0
                .split_first()
                .ok_or_else(|| "truncated varint".to_string())?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| "field too long".to_string())?;
        if n > self.0.len() {
            return Err(format!("field of {n} bytes past the end of the message"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn read(&mut self) -> Result<(u64, Value<'a>), String> {
        let key = self.varint()?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 {
            return Err("field number 0".into());
        }
        let v = match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let n = self.varint()?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            w => return Err(format!("unsupported wire type {w} (field {field})")),
        };
        Ok((field, v))
    }
}

/// A `google.protobuf.Duration` in nanoseconds (negative parts count as 0).
pub(crate) fn duration_ns(bytes: &[u8]) -> Result<u64, String> {
    let (mut secs, mut nanos) = (0i64, 0i64);
    for f in Fields(bytes) {
        match f? {
            // int64 and int32 on the wire: two's complement varints.
            (1, Value::Varint(v)) => secs = v as i64,
            (2, Value::Varint(v)) => nanos = i64::from(v as i32),
            _ => {}
        }
    }
    let ns = secs
        .max(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(nanos.max(0));
    Ok(u64::try_from(ns).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_check_byte_for_byte() {
        let d = [WireDescriptor {
            entries: vec![("tenant", "/a"), ("limit", "rpm")],
            hits: None,
        }];
        let b = encode_request("tg", &d, 2);
        let mut want = vec![0x0a, 2, b't', b'g', 0x12, 28];
        want.extend([0x0a, 12, 0x0a, 6]);
        want.extend(b"tenant");
        want.extend([0x12, 2]);
        want.extend(b"/a");
        want.extend([0x0a, 12, 0x0a, 5]);
        want.extend(b"limit");
        want.extend([0x12, 3]);
        want.extend(b"rpm");
        want.extend([0x18, 2]);
        assert_eq!(b, want);
    }

    #[test]
    fn encodes_per_descriptor_hits() {
        let d = [WireDescriptor {
            entries: vec![("k", "v")],
            hits: Some(300),
        }];
        let b = encode_request("d", &d, 0);
        // descriptor: entry (0a 06 0a 01 k 12 01 v), hits (1a 03 08 ac 02)
        assert_eq!(
            b,
            vec![
                0x0a, 1, b'd', 0x12, 13, 0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', 0x1a, 3, 0x08,
                0xac, 0x02
            ]
        );
    }

    #[test]
    fn decodes_statuses_and_skips_unknown_fields() {
        // overall OVER_LIMIT; one status: OVER_LIMIT, limit {name "x", 10 per MINUTE},
        // remaining 0, reset 12.5 s; an unknown fixed64 field 9; raw_body (5).
        // nanos 500_000_000 is the varint 80 ca b5 ee 01.
        let mut status = vec![0x08, 2, 0x12, 7, 0x1a, 1, b'x', 0x08, 10, 0x10, 2, 0x18, 0];
        status.extend([0x22, 8, 0x08, 12, 0x10, 0x80, 0xca, 0xb5, 0xee, 0x01]);
        let mut msg = vec![0x08, 2, 0x12, status.len() as u8];
        msg.extend(&status);
        msg.extend([0x49, 1, 2, 3, 4, 5, 6, 7, 8]);
        msg.extend([0x2a, 2, b'h', b'i']);
        let r = decode_response(&msg).unwrap();
        assert_eq!(r.overall, Code::OverLimit);
        assert_eq!(
            r.statuses,
            vec![Status {
                code: Code::OverLimit,
                limit: Some((10, Some(60))),
                remaining: 0,
                reset_ns: Some(12_500_000_000),
            }]
        );
    }

    #[test]
    fn refuses_truncated_messages() {
        assert!(decode_response(&[0x12, 5, 0x08]).is_err());
        assert!(decode_response(&[0x08]).is_err());
        assert!(decode_response(&[0x0b]).is_err());
        assert_eq!(decode_response(&[]).unwrap(), Response::default());
    }
}
