//! The two protobuf messages of Envoy's rate limit quota service stream
//! (`envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas`,
//! RLQS), encoded and decoded by hand as [`super::rls_wire`] does for RLS:
//! the filter sends one report shape and reads a few fields of the answer.
//! Field numbers are those of Envoy's `rlqs.proto`,
//! `ratelimit_strategy.proto` and `token_bucket.proto` (v3); tests in the
//! `rls` crate check both against the generated (prost) types.

use super::rls_wire::{duration_ns, put_bytes, put_varint_field, Fields, Value};
use super::{LIMIT_KEY, TENANT_KEY};

/// gRPC service and method of the RLQS stream.
pub const RLQS_SERVICE: &str = "envoy.service.rate_limit_quota.v3.RateLimitQuotaService";
pub const RLQS_METHOD: &str = "StreamRateLimitQuotas";

/// One bucket's usage in a report (`BucketQuotaUsage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireUsage<'a> {
    /// The bucket: `{"tenant": tenant, "limit": limit}`.
    pub tenant: &'a str,
    pub limit: &'a str,
    pub allowed: u64,
    pub denied: u64,
    /// `time_elapsed`, in nanoseconds (0: the bucket's first report).
    pub elapsed_ns: u64,
}

/// Encodes a `RateLimitQuotaUsageReports`: `domain` (1) and one
/// `bucket_quota_usages` (2) per usage: `bucket_id` (1: a `BucketId`, whose
/// map `bucket` (1) has entries of key (1) and value (2)), `time_elapsed`
/// (2, a `Duration`, always present), `num_requests_allowed` (3) and
/// `num_requests_denied` (4).
pub fn encode_reports(domain: &str, usages: &[WireUsage<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + usages.len() * 64);
    put_bytes(&mut out, 1, domain.as_bytes());
    let (mut u, mut id, mut e) = (Vec::new(), Vec::new(), Vec::new());
    for usage in usages {
        u.clear();
        id.clear();
        for (k, v) in [(TENANT_KEY, usage.tenant), (LIMIT_KEY, usage.limit)] {
            e.clear();
            put_bytes(&mut e, 1, k.as_bytes());
            put_bytes(&mut e, 2, v.as_bytes());
            put_bytes(&mut id, 1, &e);
        }
        put_bytes(&mut u, 1, &id);
        put_bytes(&mut u, 2, &duration(usage.elapsed_ns));
        if usage.allowed != 0 {
            put_varint_field(&mut u, 3, usage.allowed);
        }
        if usage.denied != 0 {
            put_varint_field(&mut u, 4, usage.denied);
        }
        put_bytes(&mut out, 2, &u);
    }
    out
}

/// A `google.protobuf.Duration` of `ns` nanoseconds: seconds (1), nanos (2).
fn duration(ns: u64) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    let (s, n) = (ns / 1_000_000_000, ns % 1_000_000_000);
    if s != 0 {
        put_varint_field(&mut d, 1, s);
    }
    if n != 0 {
        put_varint_field(&mut d, 2, n);
    }
    d
}

/// How a bucket's requests are decided (`RateLimitStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireStrategy {
    /// `blanket_rule: ALLOW_ALL`.
    AllowAll,
    /// `blanket_rule: DENY_ALL`.
    DenyAll,
    /// `token_bucket`: `tokens_per_fill` tokens every `fill_interval_ns`,
    /// holding at most `max_tokens`. `requests_per_time_unit` arrives as a
    /// bucket of that many tokens per unit.
    TokenBucket {
        max_tokens: u64,
        tokens_per_fill: u64,
        fill_interval_ns: u64,
    },
}

/// What the server says about one bucket (`BucketAction`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireAction {
    /// `quota_assignment_action`: the strategy, valid for `ttl_ns` from
    /// receipt (`None`: no expiry; `Some(0)`: expired at once).
    Assign {
        strategy: WireStrategy,
        ttl_ns: Option<u64>,
    },
    /// `abandon_action`: forget the bucket.
    Abandon,
}

/// One bucket action: the bucket's entries and the action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireBucketAction {
    /// The `BucketId` map, as sent (sorted by key).
    pub bucket: Vec<(String, String)>,
    pub action: WireAction,
}

impl WireBucketAction {
    /// `(tenant, limit)` when the bucket has exactly those two keys.
    pub fn tenant_limit(&self) -> Option<(&str, &str)> {
        if self.bucket.len() != 2 {
            return None;
        }
        let get = |key: &str| {
            self.bucket
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        Some((get(TENANT_KEY)?, get(LIMIT_KEY)?))
    }
}

/// Decodes a `RateLimitQuotaResponse`: every `bucket_action` (1) with a
/// bucket and an action this client knows (a strategy it cannot apply, or
/// none, makes the action an error); unknown fields are skipped, a truncated
/// or malformed message is an error.
pub fn decode_response(bytes: &[u8]) -> Result<Vec<WireBucketAction>, String> {
    let mut out = Vec::new();
    for field in Fields(bytes) {
        if let (1, Value::Bytes(b)) = field? {
            out.push(decode_action(b)?);
        }
    }
    Ok(out)
}

fn decode_action(bytes: &[u8]) -> Result<WireBucketAction, String> {
    let mut bucket = Vec::new();
    let mut action = None;
    for field in Fields(bytes) {
        match field? {
            (1, Value::Bytes(b)) => {
                for f in Fields(b) {
                    if let (1, Value::Bytes(entry)) = f? {
                        let (mut k, mut v) = (String::new(), String::new());
                        for g in Fields(entry) {
                            match g? {
                                (1, Value::Bytes(s)) => k = text(s)?,
                                (2, Value::Bytes(s)) => v = text(s)?,
                                _ => {}
                            }
                        }
                        bucket.push((k, v));
                    }
                }
            }
            (2, Value::Bytes(b)) => action = Some(decode_assignment(b)?),
            (3, Value::Bytes(_)) => action = Some(WireAction::Abandon),
            _ => {}
        }
    }
    bucket.sort();
    let action = action.ok_or_else(|| "bucket action without an action".to_string())?;
    Ok(WireBucketAction { bucket, action })
}

fn decode_assignment(bytes: &[u8]) -> Result<WireAction, String> {
    let mut ttl_ns = None;
    let mut strategy = None;
    for field in Fields(bytes) {
        match field? {
            (2, Value::Bytes(b)) => ttl_ns = Some(duration_ns(b)?),
            (3, Value::Bytes(b)) => strategy = Some(decode_strategy(b)?),
            _ => {}
        }
    }
    let strategy = strategy.ok_or_else(|| "assignment without a strategy".to_string())?;
    Ok(WireAction::Assign { strategy, ttl_ns })
}

fn decode_strategy(bytes: &[u8]) -> Result<WireStrategy, String> {
    let mut out = None;
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(v)) => {
                out = Some(match v {
                    0 => WireStrategy::AllowAll,
                    1 => WireStrategy::DenyAll,
                    v => return Err(format!("unknown blanket rule {v}")),
                })
            }
            (2, Value::Bytes(b)) => {
                let (mut n, mut unit) = (0u64, 0u64);
                for f in Fields(b) {
                    match f? {
                        (1, Value::Varint(v)) => n = v,
                        (2, Value::Varint(v)) => unit = v,
                        _ => {}
                    }
                }
                let unit_s = match unit {
                    1 => 1,
                    2 => 60,
                    3 => 3_600,
                    4 => 86_400,
                    u => {
                        return Err(format!(
                            "requests per time unit: unit {u} has no fixed length"
                        ))
                    }
                };
                out = Some(if n == 0 {
                    WireStrategy::DenyAll
                } else {
                    WireStrategy::TokenBucket {
                        max_tokens: n,
                        tokens_per_fill: n,
                        fill_interval_ns: unit_s * 1_000_000_000,
                    }
                });
            }
            (3, Value::Bytes(b)) => {
                let (mut max_tokens, mut per_fill, mut interval) = (0u64, 1u64, 0u64);
                for f in Fields(b) {
                    match f? {
                        (1, Value::Varint(v)) => max_tokens = v,
                        (2, Value::Bytes(w)) => {
                            // UInt32Value: value (1), 0 when absent.
                            per_fill = 0;
                            for g in Fields(w) {
                                if let (1, Value::Varint(v)) = g? {
                                    per_fill = v;
                                }
                            }
                        }
                        (3, Value::Bytes(d)) => interval = duration_ns(d)?,
                        _ => {}
                    }
                }
                if interval == 0 || per_fill == 0 {
                    return Err("token bucket without a fill interval or tokens per fill".into());
                }
                out = Some(WireStrategy::TokenBucket {
                    max_tokens,
                    tokens_per_fill: per_fill,
                    fill_interval_ns: interval,
                });
            }
            _ => {}
        }
    }
    out.ok_or_else(|| "rate limit strategy without a strategy".to_string())
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "bucket id that is not UTF-8".to_string())
}

/// Encodes a `RateLimitQuotaResponse` (the server's side; for the engine's
/// own tests: the `rls` crate checks [`decode_response`] against prost).
#[cfg(test)]
pub(crate) fn encode_response(actions: &[(&str, &str, WireAction)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (tenant, limit, action) in actions {
        let mut a = Vec::new();
        let mut id = Vec::new();
        for (k, v) in [(TENANT_KEY, *tenant), (LIMIT_KEY, *limit)] {
            let mut e = Vec::new();
            put_bytes(&mut e, 1, k.as_bytes());
            put_bytes(&mut e, 2, v.as_bytes());
            put_bytes(&mut id, 1, &e);
        }
        put_bytes(&mut a, 1, &id);
        match action {
            WireAction::Abandon => put_bytes(&mut a, 3, &[]),
            WireAction::Assign { strategy, ttl_ns } => {
                let mut q = Vec::new();
                if let Some(t) = ttl_ns {
                    put_bytes(&mut q, 2, &duration(*t));
                }
                let mut st = Vec::new();
                match strategy {
                    WireStrategy::AllowAll => put_varint_field(&mut st, 1, 0),
                    WireStrategy::DenyAll => put_varint_field(&mut st, 1, 1),
                    WireStrategy::TokenBucket {
                        max_tokens,
                        tokens_per_fill,
                        fill_interval_ns,
                    } => {
                        let mut tb = Vec::new();
                        put_varint_field(&mut tb, 1, *max_tokens);
                        let mut w = Vec::new();
                        put_varint_field(&mut w, 1, *tokens_per_fill);
                        put_bytes(&mut tb, 2, &w);
                        put_bytes(&mut tb, 3, &duration(*fill_interval_ns));
                        put_bytes(&mut st, 3, &tb);
                    }
                }
                put_bytes(&mut q, 3, &st);
                put_bytes(&mut a, 2, &q);
            }
        }
        put_bytes(&mut out, 1, &a);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_report_byte_for_byte() {
        let b = encode_reports(
            "d",
            &[WireUsage {
                tenant: "/a",
                limit: "r",
                allowed: 3,
                denied: 0,
                elapsed_ns: 1_500_000_000,
            }],
        );
        // bucket_id: entries (tenant, /a) and (limit, r).
        let mut id = vec![0x0a, 12, 0x0a, 6];
        id.extend(b"tenant");
        id.extend([0x12, 2]);
        id.extend(b"/a");
        id.extend([0x0a, 10, 0x0a, 5]);
        id.extend(b"limit");
        id.extend([0x12, 1, b'r']);
        let mut usage = vec![0x0a, id.len() as u8];
        usage.extend(&id);
        // time_elapsed 1.5 s: seconds 1, nanos 500_000_000 (80 ca b5 ee 01).
        usage.extend([0x12, 8, 0x08, 1, 0x10, 0x80, 0xca, 0xb5, 0xee, 0x01]);
        usage.extend([0x18, 3]);
        let mut want = vec![0x0a, 1, b'd', 0x12, usage.len() as u8];
        want.extend(usage);
        assert_eq!(b, want);
        // A first report: an empty (zero) duration, still present.
        let b = encode_reports(
            "d",
            &[WireUsage {
                tenant: "/a",
                limit: "r",
                allowed: 0,
                denied: 2,
                elapsed_ns: 0,
            }],
        );
        assert!(b.ends_with(&[0x12, 0, 0x20, 2]));
    }

    /// A bucket action as bytes: bucket `(tenant, /a), (limit, r)` and the
    /// action's field.
    fn action(field: u8, body: &[u8]) -> Vec<u8> {
        let id = [
            0x0a, 10, 0x0a, 5, b'l', b'i', b'm', b'i', b't', 0x12, 1, b'r', 0x0a, 12, 0x0a, 6,
            b't', b'e', b'n', b'a', b'n', b't', 0x12, 2, b'/', b'a',
        ];
        let mut a = vec![0x0a, id.len() as u8];
        a.extend(id);
        a.extend([(field << 3) | 2, body.len() as u8]);
        a.extend(body);
        let mut out = vec![0x0a, a.len() as u8];
        out.extend(a);
        out
    }

    #[test]
    fn decodes_assignments_and_abandons() {
        // token bucket: max 7, 5 per fill (UInt32Value), every 1 s; ttl 1.5 s.
        let tb = [0x08, 7, 0x12, 2, 0x08, 5, 0x1a, 2, 0x08, 1];
        let mut strategy = vec![0x1a, tb.len() as u8];
        strategy.extend(tb);
        let mut assign = vec![0x12, 8, 0x08, 1, 0x10, 0x80, 0xca, 0xb5, 0xee, 0x01];
        assign.extend([0x1a, strategy.len() as u8]);
        assign.extend(&strategy);
        let mut msg = action(2, &assign);
        msg.extend(action(3, &[]));
        // blanket rule ALLOW_ALL (0, sent because it is in a oneof), no ttl.
        msg.extend(action(2, &[0x1a, 2, 0x08, 0]));
        // 30 requests per MINUTE.
        msg.extend(action(2, &[0x1a, 6, 0x12, 4, 0x08, 30, 0x10, 2]));
        msg.extend([0x49, 1, 2, 3, 4, 5, 6, 7, 8]);
        let got = decode_response(&msg).unwrap();
        let actions: Vec<&WireAction> = got.iter().map(|a| &a.action).collect();
        assert_eq!(
            actions,
            [
                &WireAction::Assign {
                    strategy: WireStrategy::TokenBucket {
                        max_tokens: 7,
                        tokens_per_fill: 5,
                        fill_interval_ns: 1_000_000_000
                    },
                    ttl_ns: Some(1_500_000_000)
                },
                &WireAction::Abandon,
                &WireAction::Assign {
                    strategy: WireStrategy::AllowAll,
                    ttl_ns: None
                },
                &WireAction::Assign {
                    strategy: WireStrategy::TokenBucket {
                        max_tokens: 30,
                        tokens_per_fill: 30,
                        fill_interval_ns: 60_000_000_000
                    },
                    ttl_ns: None
                },
            ]
        );
        assert!(got.iter().all(|a| a.tenant_limit() == Some(("/a", "r"))));
    }

    #[test]
    fn refuses_what_it_cannot_apply() {
        // No action; an unknown blanket rule; a bucket without an interval;
        // truncation.
        assert!(decode_response(&action(4, &[])).is_err());
        assert!(decode_response(&action(2, &[0x1a, 2, 0x08, 9])).is_err());
        assert!(decode_response(&action(2, &[0x1a, 4, 0x1a, 2, 0x08, 7])).is_err());
        assert!(decode_response(&[0x0a, 5, 0x0a]).is_err());
        assert_eq!(decode_response(&[]).unwrap(), Vec::new());
    }
}
