//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` over the
//! bundle's fleet limits and the Redis counters.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tenantgate_engine::fleet::{FleetLimit, REPORT_HEADER};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::counter::{Count, CounterStore, Counters, Hit};
use crate::limits::{Limits, Match};
use crate::metrics::Metrics;

/// The gRPC service. Holds no counter state: every count lives in the
/// store (Redis in production, [`crate::counter::MemoryCounters`] in tests).
pub struct Service<C = Counters> {
    limits: watch::Receiver<Arc<Limits>>,
    counters: C,
    /// `--domain`: overrides the bundle's domain.
    domain: Option<String>,
    /// `--metrics`: counts each call's answer.
    metrics: Option<Arc<Metrics>>,
}

impl<C: CounterStore> Service<C> {
    /// `domain`: the domain to answer for; `None` takes the loaded bundle's
    /// (`rate_limit_service.domain`), following reloads.
    pub fn new(limits: watch::Receiver<Arc<Limits>>, counters: C, domain: Option<String>) -> Self {
        Service {
            limits,
            counters,
            domain,
            metrics: None,
        }
    }

    /// Counts each gRPC call's answer in `metrics` (`/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The counter store.
    pub fn counters(&self) -> &C {
        &self.counters
    }

    /// Answers one request (the RPC without the gRPC wrapping); `report`
    /// when the call's metadata marks it as a report.
    pub async fn decide(
        &self,
        req: &RateLimitRequest,
        report_call: bool,
    ) -> Result<RateLimitResponse, Status> {
        let limits = Arc::clone(&self.limits.borrow());
        let domain = self.domain.as_deref().unwrap_or(&limits.domain);
        // The API: a request-level `hits_addend` of 0 means 1.
        let request_hits = u64::from(req.hits_addend.max(1));
        // Per descriptor: the index of its counter in `hits`, if it has one.
        let mut slot: Vec<Option<(usize, &FleetLimit)>> = Vec::with_capacity(req.descriptors.len());
        let mut hits: Vec<Hit> = Vec::new();
        for d in &req.descriptors {
            let m = if req.domain == domain && !d.is_negative_hits {
                limits
                    .match_descriptor(d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())))
            } else {
                Match::Unknown
            };
            let Match::Limit {
                limit,
                report: report_entry,
            } = m
            else {
                slot.push(None);
                continue;
            };
            let report = report_call || report_entry;
            let n = d.hits_addend.as_ref().map_or(request_hits, |h| h.value);
            let key = limits.counter_key(limit);
            // The same counter twice in one request is counted once, with the hits summed.
            let i = match hits.iter().position(|h| h.key == key && h.report == report) {
                Some(i) => {
                    if let Some(h) = hits.get_mut(i) {
                        h.hits = h.hits.saturating_add(n);
                    }
                    i
                }
                None => {
                    hits.push(Hit {
                        key,
                        limit: limit.rate,
                        window_ms: limit.per_s.saturating_mul(1000),
                        hits: n,
                        report,
                    });
                    hits.len() - 1
                }
            };
            slot.push(Some((i, limit)));
        }
        let counts = self
            .counters
            .apply(&hits)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let statuses: Vec<DescriptorStatus> = slot
            .iter()
            .map(
                |s| match s.and_then(|(i, l)| counts.get(i).map(|c| (l, c))) {
                    Some((l, c)) => status(l, c),
                    None => DescriptorStatus {
                        code: Code::Ok as i32,
                        ..Default::default()
                    },
                },
            )
            .collect();
        let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
        Ok(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl<C: CounterStore> RateLimitService for Service<C> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let (k, v) = REPORT_HEADER;
        let report = request
            .metadata()
            .get(k)
            .is_some_and(|x| x.as_bytes() == v.as_bytes());
        let answer = self.decide(request.get_ref(), report).await;
        if let Some(m) = &self.metrics {
            m.count_call(&answer);
        }
        answer.map(Response::new)
    }
}

/// The API's unit for a window of exactly one unit.
pub fn unit_of(per_s: u64) -> Unit {
    match per_s {
        1 => Unit::Second,
        60 => Unit::Minute,
        3_600 => Unit::Hour,
        86_400 => Unit::Day,
        604_800 => Unit::Week,
        _ => Unit::Unknown,
    }
}

/// One counted descriptor's status. `current_limit` carries the rate per
/// window (`requests_per_unit`, saturated at 2^32-1), the window as a unit
/// when it is exactly one (else `UNKNOWN`), and, in `name`, the limit's name
/// (`rpm`). Envoy's own rate limit filter writes that name into its
/// `x-ratelimit-limit` header as a quoted string (`300;w=60;name="rpm"`), so
/// it must be a bare token: limit names are (`[a-z0-9][a-z0-9_-]*`).
/// tenantgate's filter reads only the numbers and takes the name from its own
/// bundle.
fn status(l: &FleetLimit, c: &Count) -> DescriptorStatus {
    let sat = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    let reset = c.ttl.unwrap_or(Duration::from_secs(l.per_s));
    DescriptorStatus {
        code: if c.over { Code::OverLimit } else { Code::Ok } as i32,
        current_limit: Some(RateLimit {
            name: l.name.clone(),
            requests_per_unit: sat(l.rate),
            unit: unit_of(l.per_s) as i32,
        }),
        limit_remaining: sat(l.rate.saturating_sub(c.count)),
        duration_until_reset: Some(PbDuration {
            seconds: i64::try_from(reset.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(reset.subsec_nanos()).unwrap_or(0),
        }),
        ..Default::default()
    }
}
