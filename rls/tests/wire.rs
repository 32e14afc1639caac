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

/// RLQS (mode `assigned`): the filter's reports read by prost, prost's
/// answers read by the filter (`tenantgate_engine::fleet::rlqs_wire`).
mod rlqs {
    use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::{
        BlanketRule, RequestsPerTimeUnit, Strategy,
    };
    use envoy_types::pb::envoy::r#type::v3::{RateLimitStrategy, RateLimitUnit, TokenBucket};
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::{
        AbandonAction, BucketAction as Action, QuotaAssignmentAction,
    };
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::BucketAction;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::{
        BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
    };
    use envoy_types::pb::google::protobuf::{Duration, UInt32Value};
    use prost::Message;
    use tenantgate_engine::fleet::rlqs_wire::{self, WireAction, WireStrategy, WireUsage};

    #[test]
    fn prost_reads_the_filters_reports() {
        let bytes = rlqs_wire::encode_reports(
            "tenantgate",
            &[
                WireUsage {
                    tenant: "/acme/eu",
                    limit: "rps",
                    allowed: 1_000_000_000_000,
                    denied: 7,
                    elapsed_ns: 2_500_000_001,
                },
                WireUsage {
                    tenant: "/",
                    limit: "rps",
                    allowed: 0,
                    denied: 0,
                    elapsed_ns: 0,
                },
            ],
        );
        let r = RateLimitQuotaUsageReports::decode(bytes.as_slice()).unwrap();
        assert_eq!(r.domain, "tenantgate");
        let got: Vec<_> = r
            .bucket_quota_usages
            .iter()
            .map(|u| {
                let id = u.bucket_id.clone().unwrap().bucket;
                let e = u.time_elapsed.unwrap();
                (
                    id["tenant"].clone(),
                    id["limit"].clone(),
                    id.len(),
                    u.num_requests_allowed,
                    u.num_requests_denied,
                    (e.seconds, e.nanos),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "/acme/eu".to_string(),
                    "rps".to_string(),
                    2,
                    1_000_000_000_000,
                    7,
                    (2, 500_000_001)
                ),
                ("/".to_string(), "rps".to_string(), 2, 0, 0, (0, 0)),
            ]
        );
    }

    fn id(tenant: &str, limit: &str) -> Option<BucketId> {
        Some(BucketId {
            bucket: [
                ("tenant".to_string(), tenant.to_string()),
                ("limit".to_string(), limit.to_string()),
            ]
            .into_iter()
            .collect(),
        })
    }

    fn assign(tenant: &str, strategy: Strategy, ttl: Option<Duration>) -> BucketAction {
        BucketAction {
            bucket_id: id(tenant, "rps"),
            bucket_action: Some(Action::QuotaAssignmentAction(QuotaAssignmentAction {
                assignment_time_to_live: ttl,
                rate_limit_strategy: Some(RateLimitStrategy {
                    strategy: Some(strategy),
                }),
            })),
        }
    }

    #[test]
    fn the_filter_reads_prosts_answers() {
        let answer = RateLimitQuotaResponse {
            bucket_action: vec![
                assign(
                    "/a",
                    Strategy::TokenBucket(TokenBucket {
                        max_tokens: 33,
                        tokens_per_fill: Some(UInt32Value { value: 135 }),
                        fill_interval: Some(Duration {
                            seconds: 1,
                            nanos: 0,
                        }),
                    }),
                    Some(Duration {
                        seconds: 1,
                        nanos: 500_000_000,
                    }),
                ),
                // ALLOW_ALL is 0: prost still writes it (a oneof field).
                assign(
                    "/b",
                    Strategy::BlanketRule(BlanketRule::AllowAll as i32),
                    Some(Duration::default()),
                ),
                assign(
                    "/c",
                    Strategy::BlanketRule(BlanketRule::DenyAll as i32),
                    None,
                ),
                assign(
                    "/d",
                    Strategy::RequestsPerTimeUnit(RequestsPerTimeUnit {
                        requests_per_time_unit: 90,
                        time_unit: RateLimitUnit::Minute as i32,
                    }),
                    None,
                ),
                BucketAction {
                    bucket_id: id("/e", "rps"),
                    bucket_action: Some(Action::AbandonAction(AbandonAction {})),
                },
            ],
        };
        let got = rlqs_wire::decode_response(&answer.encode_to_vec()).unwrap();
        let got: Vec<_> = got
            .iter()
            .map(|a| (a.tenant_limit().unwrap().0.to_string(), a.action.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "/a".to_string(),
                    WireAction::Assign {
                        strategy: WireStrategy::TokenBucket {
                            max_tokens: 33,
                            tokens_per_fill: 135,
                            fill_interval_ns: 1_000_000_000
                        },
                        ttl_ns: Some(1_500_000_000)
                    }
                ),
                (
                    "/b".to_string(),
                    WireAction::Assign {
                        strategy: WireStrategy::AllowAll,
                        ttl_ns: Some(0)
                    }
                ),
                (
                    "/c".to_string(),
                    WireAction::Assign {
                        strategy: WireStrategy::DenyAll,
                        ttl_ns: None
                    }
                ),
                (
                    "/d".to_string(),
                    WireAction::Assign {
                        strategy: WireStrategy::TokenBucket {
                            max_tokens: 90,
                            tokens_per_fill: 90,
                            fill_interval_ns: 60_000_000_000
                        },
                        ttl_ns: None
                    }
                ),
                ("/e".to_string(), WireAction::Abandon),
            ]
        );
    }
}
