//! The filter encodes and decodes the RLS messages by hand
//! (`tenantgate_engine::fleet::rls_wire`); here the generated types of
//! Envoy's protos (prost, through envoy-types) read what it writes and write
//! what it reads.

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration;
use prost::Message;
use tenantgate_engine::fleet::rls_wire::{self, WireDescriptor};

#[test]
fn prost_reads_the_filters_requests() {
    let check = rls_wire::encode_request(
        "tenantgate",
        &[
            WireDescriptor {
                entries: vec![("tenant", "/acme/eu"), ("limit", "rpm")],
                hits: None,
            },
            WireDescriptor {
                entries: vec![("tenant", "/acme"), ("limit", "rpm")],
                hits: None,
            },
        ],
        3,
    );
    let r = RateLimitRequest::decode(check.as_slice()).unwrap();
    assert_eq!(r.domain, "tenantgate");
    assert_eq!(r.hits_addend, 3);
    let entries: Vec<Vec<(String, String)>> = r
        .descriptors
        .iter()
        .map(|d| {
            d.entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect()
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            vec![
                ("tenant".into(), "/acme/eu".into()),
                ("limit".into(), "rpm".into())
            ],
            vec![
                ("tenant".into(), "/acme".into()),
                ("limit".into(), "rpm".into())
            ],
        ]
    );
    assert!(r.descriptors.iter().all(|d| d.hits_addend.is_none()));

    let report = rls_wire::encode_request(
        "d",
        &[WireDescriptor {
            entries: vec![("tenant", "/a"), ("limit", "x")],
            hits: Some(1_000_000_000_000),
        }],
        0,
    );
    let r = RateLimitRequest::decode(report.as_slice()).unwrap();
    assert_eq!(r.hits_addend, 0);
    assert_eq!(
        r.descriptors[0].hits_addend.as_ref().map(|h| h.value),
        Some(1_000_000_000_000)
    );
}

#[test]
fn the_filter_reads_prosts_answers() {
    let status =
        |code: Code, rpu: u32, unit: Unit, remaining: u32, reset: Duration| DescriptorStatus {
            code: code as i32,
            current_limit: Some(RateLimit {
                name: "rpm".into(),
                requests_per_unit: rpu,
                unit: unit as i32,
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(reset),
            ..Default::default()
        };
    let answer = RateLimitResponse {
        overall_code: Code::OverLimit as i32,
        statuses: vec![
            status(
                Code::Ok,
                3,
                Unit::Hour,
                2,
                Duration {
                    seconds: 3599,
                    nanos: 1,
                },
            ),
            status(
                Code::OverLimit,
                5,
                Unit::Minute,
                0,
                Duration {
                    seconds: 42,
                    nanos: 500_000_000,
                },
            ),
            status(
                Code::OverLimit,
                7,
                Unit::Month,
                0,
                Duration {
                    seconds: -1,
                    nanos: 0,
                },
            ),
        ],
        raw_body: b"ignored".to_vec(),
        ..Default::default()
    };
    let r = rls_wire::decode_response(&answer.encode_to_vec()).unwrap();
    assert_eq!(r.overall, rls_wire::Code::OverLimit);
    let got: Vec<_> = r
        .statuses
        .iter()
        .map(|s| (s.code, s.limit, s.remaining, s.reset_ns))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                rls_wire::Code::Ok,
                Some((3, Some(3600))),
                2,
                Some(3_599_000_000_001)
            ),
            (
                rls_wire::Code::OverLimit,
                Some((5, Some(60))),
                0,
                Some(42_500_000_000)
            ),
            // MONTH has no fixed length; a negative duration reads as 0.
            (rls_wire::Code::OverLimit, Some((7, None)), 0, Some(0)),
        ]
    );
}
