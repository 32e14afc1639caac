//! The filter's side of fleet limits: what to ask the rate limit service,
//! and what its answers mean. The filter only makes the calls.
//!
//! - `per_request` ([`crate::Engine::fleet_check`]): after the policies and
//!   the local limits admit a request, one `ShouldRateLimit` call carries the
//!   request's descriptors with `hits_addend` = its cost. `OK` lets it pass;
//!   `OVER_LIMIT` refuses it with 429 and the RateLimit fields of the first
//!   refusing descriptor (the server's `statuses`, or the limit itself when the
//!   server sends none); the local tokens it was charged are given back
//!   ([`crate::Engine::refund`]).
//! - `batched` ([`FleetState`]): no call on the request path. Each worker
//!   sums its admissions per fleet limit and reports them every
//!   `report_interval_ms` ([`crate::Engine::fleet_report`]); a limit the
//!   answer says is over refuses requests locally until its
//!   `duration_until_reset` (or the limit's whole window when the server
//!   sends none).
//! - A failed call (unreachable, past `timeout_ms`, a gRPC error, an answer
//!   that does not decode) is a [`FleetOutcome::Failed`]: the filter applies
//!   `rate_limit_service.on_error` and counts it. The hits of a failed report
//!   are not sent again (the service may have counted them).

use std::collections::HashMap;
use std::sync::Mutex;

use super::rls_wire::{self, Code, WireDescriptor};
use super::FleetLimit;
use crate::quota::{whole_seconds, Nanos, QuotaDecision};
use crate::settings::{FleetMode, RateLimitService};
use crate::tenant::TenantPath;

/// The gRPC service and method every call goes to.
pub const RLS_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
/// See [`RLS_SERVICE`].
pub const RLS_METHOD: &str = "ShouldRateLimit";

/// One call to make: the encoded `RateLimitRequest` and what it asked.
#[derive(Debug, Clone)]
pub struct FleetCall {
    /// The encoded request.
    pub message: Vec<u8>,
    /// True for a batched report: the filter sends it with the gRPC metadata
    /// [`super::fleet::REPORT_HEADER`], so the service counts it even past
    /// the limit.
    pub report: bool,
    /// Indices of the limits asked about, aligned with the descriptors.
    limits: Vec<usize>,
    /// The request's cost (a check).
    cost: u64,
}

/// What an answer (or its absence) means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetOutcome {
    /// The request may pass (a check), or the report was taken.
    Admitted,
    /// The fleet refuses the request: the 429's quota fields.
    Refused(QuotaDecision),
    /// No usable answer: `on_error` decides.
    Failed(String),
}

/// One worker's batched-mode state: admissions not yet reported, and the
/// limits the service said are over.
#[derive(Debug, Default)]
pub struct FleetState {
    inner: Mutex<Inner>,
    /// Mode `assigned`: the RLQS client (made at first use).
    pub(crate) assigned: Mutex<Option<super::assigned::Client>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Limit index -> hits admitted since the last report.
    pending: HashMap<usize, u64>,
    /// Limit index -> refused until, with the status to answer with.
    blocked: HashMap<usize, (Nanos, QuotaDecision)>,
    last_report: Nanos,
}

impl crate::Engine {
    /// The rate limit service settings, when the bundle has fleet limits to
    /// enforce with it.
    pub fn rate_limit_service(&self) -> Option<&RateLimitService> {
        if self.fleet_limits().is_empty() {
            return None;
        }
        self.settings().rate_limit_service.as_ref()
    }

    /// `per_request` mode: the call to make before an admitted request goes
    /// upstream, if a fleet limit applies to it.
    pub fn fleet_check(&self, req: &crate::Request) -> Option<FleetCall> {
        let rls = self.rate_limit_service()?;
        let (tenant, cost) = (
            &req.tenant,
            self.settings().cost_of(&req.method, req.action),
        );
        if rls.mode != FleetMode::PerRequest || cost == 0 {
            return None;
        }
        let limits: Vec<usize> = self.fleet_limits().indices_for(tenant).collect();
        if limits.is_empty() {
            return None;
        }
        let all = self.fleet_limits().all();
        let descriptors: Vec<WireDescriptor<'_>> = limits
            .iter()
            .filter_map(|i| all.get(*i))
            .map(|l| l.descriptor(None))
            .collect();
        let hits = u32::try_from(cost).unwrap_or(u32::MAX);
        Some(FleetCall {
            message: rls_wire::encode_request(&rls.domain, &descriptors, hits),
            report: false,
            limits,
            cost,
        })
    }
}

impl crate::Worker {
    /// What the service's answer to `call` means. `answer` is the response
    /// message, or why there is none.
    pub fn fleet_answer(
        &self,
        call: &FleetCall,
        answer: Result<&[u8], String>,
        now: Nanos,
    ) -> FleetOutcome {
        let response = match answer.and_then(rls_wire::decode_response) {
            Ok(r) => r,
            Err(e) => return FleetOutcome::Failed(e),
        };
        let all = self.engine.fleet_limits().all();
        // The refusal of one limit: the server's status when it sent one.
        let refusal = |i: usize, status: Option<&rls_wire::Status>| {
            all.get(*call.limits.get(i)?)
                .map(|l| refused(l, status, call.cost.max(1), now))
        };
        if call.report {
            if response.overall == Code::Unknown {
                return FleetOutcome::Failed("answer without a code".into());
            }
            let Ok(mut st) = self.fleet_state().inner.lock() else {
                return FleetOutcome::Admitted;
            };
            for (i, s) in response.statuses.iter().enumerate() {
                if s.code != Code::OverLimit {
                    continue;
                }
                if let (Some(q), Some(&limit)) = (refusal(i, Some(s)), call.limits.get(i)) {
                    let until = q.admissible_at.unwrap_or(now);
                    st.blocked.insert(limit, (until, q));
                }
            }
            return FleetOutcome::Admitted;
        }
        match response.overall {
            Code::Ok => FleetOutcome::Admitted,
            Code::OverLimit => {
                // The first descriptor the server says is over; with no
                // statuses, the deepest limit.
                let i = response
                    .statuses
                    .iter()
                    .position(|s| s.code == Code::OverLimit);
                let q = match i {
                    Some(i) => refusal(i, response.statuses.get(i)),
                    None => refusal(0, None),
                };
                match q {
                    Some(q) => FleetOutcome::Refused(q),
                    None => FleetOutcome::Failed("over limit, but no descriptor".into()),
                }
            }
            Code::Unknown => FleetOutcome::Failed("answer without a code".into()),
        }
    }

    /// `batched` mode: the refusal in force for a request to `tenant`, if
    /// the service said one of its fleet limits is over.
    pub fn fleet_refusal(
        &self,
        tenant: &TenantPath,
        cost: u64,
        now: Nanos,
    ) -> Option<QuotaDecision> {
        let Ok(mut st) = self.fleet_state().inner.lock() else {
            return None;
        };
        if st.blocked.is_empty() {
            return None;
        }
        st.blocked.retain(|_, (until, _)| now < *until);
        self.engine
            .fleet_limits()
            .indices_for(tenant)
            .find_map(|i| {
                st.blocked.get(&i).map(|(until, q)| {
                    let mut q = q.clone();
                    q.cost = cost;
                    q.retry_after_s = whole_seconds(until.saturating_sub(now)).max(1);
                    q
                })
            })
    }

    /// `batched` mode: counts an admitted request to `tenant`.
    pub fn fleet_count(&self, tenant: &TenantPath, cost: u64) {
        if let Ok(mut st) = self.fleet_state().inner.lock() {
            for i in self.engine.fleet_limits().indices_for(tenant) {
                let n = st.pending.entry(i).or_insert(0);
                *n = n.saturating_add(cost);
            }
        }
    }

    /// `batched` mode: the report to send now, if the interval has passed
    /// and something was admitted since the last one (or `now_anyway`: the
    /// bundle is being replaced). Its hits are taken.
    pub fn fleet_report(&self, now: Nanos, now_anyway: bool) -> Option<FleetCall> {
        let rls = self.engine.rate_limit_service()?;
        if rls.mode != FleetMode::Batched {
            return None;
        }
        let mut st = self.fleet_state().inner.lock().ok()?;
        let interval = u64::from(rls.report_interval_ms).saturating_mul(1_000_000);
        if st.pending.is_empty() || (!now_anyway && now.saturating_sub(st.last_report) < interval) {
            return None;
        }
        st.last_report = now;
        let mut taken: Vec<(usize, u64)> = st.pending.drain().filter(|(_, n)| *n > 0).collect();
        taken.sort_unstable();
        let all = self.engine.fleet_limits().all();
        let descriptors: Vec<WireDescriptor<'_>> = taken
            .iter()
            .filter_map(|(i, n)| all.get(*i).map(|l| l.descriptor(Some(*n))))
            .collect();
        if descriptors.is_empty() {
            return None;
        }
        Some(FleetCall {
            message: rls_wire::encode_request(&rls.domain, &descriptors, 0),
            report: true,
            limits: taken.iter().map(|(i, _)| *i).collect(),
            cost: 1,
        })
    }
}

/// A fleet refusal's quota fields: from the server's status when it has
/// them, else from the limit (a whole window, nothing remaining).
fn refused(
    l: &FleetLimit,
    status: Option<&rls_wire::Status>,
    cost: u64,
    now: Nanos,
) -> QuotaDecision {
    let (rate, window_s) = match status.and_then(|s| s.limit) {
        Some((rpu, Some(unit_s))) if rpu > 0 => (u64::from(rpu), unit_s),
        _ => (l.rate, l.per_s),
    };
    let reset_ns = status
        .and_then(|s| s.reset_ns)
        .filter(|ns| *ns > 0)
        .unwrap_or(l.per_s.saturating_mul(1_000_000_000));
    let remaining = status.map_or(0, |s| u64::from(s.remaining));
    let shape = super::Shape {
        rate,
        burst: rate,
        window_s,
    };
    l.refusal(shape, remaining, reset_ns, cost, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{HttpInput, NoMetadata};
    use crate::quota::MemoryStore;
    use crate::settings::Settings;
    use crate::testing::{bundle, file, tenant as t};
    use crate::{Engine, Request};

    const SEC: Nanos = 1_000_000_000;

    /// `/acme` has a local `rps` (rate 100) and a fleet `rpm` (rate 5 per
    /// minute); `/acme/eu` a fleet `rpm` of 3; everyone may read.
    fn engine(mode: FleetMode) -> crate::Worker {
        let settings = Settings {
            rate_limit_service: Some(RateLimitService {
                mode,
                domain: "tg".into(),
                ..RateLimitService::default()
            }),
            costs: [("POST".to_string(), 2)].into_iter().collect(),
            ..Settings::default()
        };
        let b = bundle(
            settings,
            vec![
                t(
                    "/",
                    None,
                    vec![file(
                        "tenants/p.cedar",
                        "permit(principal, action, resource);",
                    )],
                ),
                t(
                    "/acme",
                    Some(file(
                        "tenants/acme/tenant.json",
                        r#"{"limits": {"rps": {"rate": 100}, "rpm": {"rate": 5, "per": "1m", "scope": "fleet"}}}"#,
                    )),
                    vec![],
                ),
                t(
                    "/acme/eu",
                    Some(file(
                        "tenants/acme/eu/tenant.json",
                        r#"{"limits": {"rpm": {"rate": 3, "scope": "fleet"}}}"#,
                    )),
                    vec![],
                ),
                t("/globex", None, vec![]),
            ],
        );
        crate::Worker::new(std::sync::Arc::new(Engine::new(&b).unwrap()))
    }

    fn request(e: &Engine, tenant: &str, now: Nanos) -> Request {
        let h = [
            (":method", b"GET".as_slice()),
            (":path", b"/x".as_slice()),
            ("x-tenant", tenant.as_bytes()),
            ("x-user", b"u".as_slice()),
        ];
        e.map_request(
            &HttpInput {
                headers: &h,
                source_address: None,
                now_ns: now,
            },
            &NoMetadata,
        )
        .unwrap()
        .request
    }

    fn local_tokens(e: &Engine, s: &MemoryStore) -> u64 {
        let now = 10 * SEC;
        let d = e
            .quotas()
            .admit(&TenantPath::parse("/acme").unwrap(), 0, now, s)
            .unwrap();
        d.remaining
    }

    /// An answer as the server would encode it (through our own decoder's
    /// inverse: hand-built bytes).
    fn answer(overall: u8, statuses: &[(u8, u32, u8, u32, i64)]) -> Vec<u8> {
        let mut out = vec![0x08, overall];
        for (code, rpu, unit, remaining, reset_s) in statuses {
            let mut s = vec![0x08, *code, 0x12, 4, 0x08, *rpu as u8, 0x10, *unit];
            s.extend([0x18, *remaining as u8, 0x22, 2, 0x08, *reset_s as u8]);
            out.extend([0x12, s.len() as u8]);
            out.extend(s);
        }
        out
    }

    #[test]
    fn a_check_names_the_chain_deepest_first_with_the_cost() {
        let e = engine(FleetMode::PerRequest);
        let mut req = request(&e, "/acme/eu", SEC);
        req.method = "POST".into();
        let call = e.fleet_check(&req).unwrap();
        assert!(!call.report);
        let want = rls_wire::encode_request(
            "tg",
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
            2,
        );
        assert_eq!(call.message, want);
        assert!(e.fleet_check(&request(&e, "/globex", SEC)).is_none());
        let b = engine(FleetMode::Batched);
        assert!(b.fleet_check(&request(&b, "/acme", SEC)).is_none());
    }

    #[test]
    fn answers_admit_refuse_or_fail() {
        let e = engine(FleetMode::PerRequest);
        let call = e.fleet_check(&request(&e, "/acme/eu", SEC)).unwrap();
        let now = 100 * SEC;
        assert_eq!(
            e.fleet_answer(
                &call,
                Ok(&answer(1, &[(1, 3, 2, 2, 50), (1, 5, 2, 4, 50)])),
                now
            ),
            FleetOutcome::Admitted
        );
        // The parent refuses: its status gives the fields.
        let FleetOutcome::Refused(q) = e.fleet_answer(
            &call,
            Ok(&answer(2, &[(1, 3, 2, 2, 50), (2, 5, 2, 0, 42)])),
            now,
        ) else {
            panic!("not refused")
        };
        assert_eq!(q.limit.as_deref(), Some("rpm"));
        assert_eq!(q.tenant.as_ref().map(TenantPath::as_str), Some("/acme"));
        assert_eq!((q.retry_after_s, q.remaining), (42, 0));
        assert_eq!(
            (q.limits[0].rate, q.limits[0].window_s, q.limits[0].reset_s),
            (5, 60, 42)
        );
        assert_eq!(q.ratelimit_policy().as_deref(), Some("\"rpm\";q=5;w=60"));
        // A server that sends no statuses (Limitador): the deepest limit, a whole window.
        let FleetOutcome::Refused(q) = e.fleet_answer(&call, Ok(&[0x08, 2]), now) else {
            panic!("not refused")
        };
        assert_eq!(q.tenant.as_ref().map(TenantPath::as_str), Some("/acme/eu"));
        assert_eq!((q.retry_after_s, q.limits[0].rate), (60, 3));
        // No code, garbage, transport errors.
        for a in [Ok(&[][..]), Ok(&[0x12, 9][..]), Err("timeout".to_string())] {
            assert!(matches!(
                e.fleet_answer(&call, a, now),
                FleetOutcome::Failed(_)
            ));
        }
    }

    #[test]
    fn a_refund_gives_back_exactly_the_local_charge() {
        let e = engine(FleetMode::PerRequest);
        let s = MemoryStore::default();
        let before = local_tokens(&e, &s);
        let req = request(&e, "/acme/eu", 10 * SEC);
        let (d, refund) = e.decide_refundable(&req, &s);
        assert!(d.is_allowed());
        assert_eq!(local_tokens(&e, &s), before - 1);
        e.refund(&refund.unwrap(), &s).unwrap();
        assert_eq!(local_tokens(&e, &s), before);
        // Nothing to give back when no fleet check follows.
        let (_, refund) = e.decide_refundable(&request(&e, "/globex", 10 * SEC), &s);
        assert!(refund.is_none());
    }

    #[test]
    fn batched_reports_sum_admissions_and_over_limit_refuses_until_reset() {
        let e = engine(FleetMode::Batched);
        let s = MemoryStore::default();
        let t0 = 10 * SEC;
        for _ in 0..3 {
            assert!(e.decide(&request(&e, "/acme/eu", t0), &s).is_allowed());
        }
        assert!(e.decide(&request(&e, "/acme", t0), &s).is_allowed());
        let call = e.fleet_report(t0, false).unwrap();
        assert!(call.report);
        let want = rls_wire::encode_request(
            "tg",
            &[
                WireDescriptor {
                    entries: vec![("tenant", "/acme"), ("limit", "rpm")],
                    hits: Some(4),
                },
                WireDescriptor {
                    entries: vec![("tenant", "/acme/eu"), ("limit", "rpm")],
                    hits: Some(3),
                },
            ],
            0,
        );
        assert_eq!(call.message, want);
        // Taken: nothing more to report; and not before the interval.
        assert!(e.decide(&request(&e, "/acme", t0), &s).is_allowed());
        assert!(e.fleet_report(t0 + SEC / 20, false).is_none());
        // `/acme/eu` is over for 2 s.
        let a = answer(2, &[(1, 5, 2, 1, 50), (2, 3, 2, 0, 2)]);
        assert_eq!(e.fleet_answer(&call, Ok(&a), t0), FleetOutcome::Admitted);
        let d = e.decide(&request(&e, "/acme/eu", t0 + SEC), &s);
        assert_eq!(d.status, 429);
        let q = d.quota.unwrap();
        assert_eq!((q.retry_after_s, q.limit.as_deref()), (1, Some("rpm")));
        assert!(e.decide(&request(&e, "/acme", t0 + SEC), &s).is_allowed());
        assert!(e
            .decide(&request(&e, "/acme/eu", t0 + 2 * SEC), &s)
            .is_allowed());
        // The refused request was neither charged locally nor counted.
        let call = e.fleet_report(t0 + 3 * SEC, false).unwrap();
        assert_eq!(
            call.message,
            rls_wire::encode_request(
                "tg",
                &[
                    WireDescriptor {
                        entries: vec![("tenant", "/acme"), ("limit", "rpm")],
                        hits: Some(3),
                    },
                    WireDescriptor {
                        entries: vec![("tenant", "/acme/eu"), ("limit", "rpm")],
                        hits: Some(1),
                    },
                ],
                0,
            )
        );
    }
}
