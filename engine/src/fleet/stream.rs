//! Mode `assigned` in a worker: its [`assigned::Client`] (in the worker's
//! fleet state), the request path's admission against it, and the RLQS
//! stream the adapter keeps open: reports to send on the tick
//! ([`crate::flow::Tick::stream_report`]), messages received
//! ([`crate::Worker::stream_message`]), the stream's end
//! ([`crate::Worker::stream_closed`]). The adapter only opens the stream,
//! sends and hands over what arrives.

use super::assigned::{self, Admission, Client, Fallback};
use super::rlqs_wire::{self, WireUsage};
use super::FleetLimit;
use crate::decision::Decision;
use crate::flow::{Level, LogLine, Tick};
use crate::metrics::Update;
use crate::quota::{Nanos, QuotaDecision};
use crate::settings::{FleetMode, OnError, RateLimitService};
use crate::tenant::TenantPath;
use crate::Worker;

/// The fallback `rate_limit_service` configures.
pub(crate) fn fallback(rls: &RateLimitService) -> Fallback {
    match (rls.on_error_instances, rls.on_error) {
        (Some(n), _) => Fallback::Share(n),
        (None, OnError::Allow) => Fallback::Allow,
        (None, OnError::Deny) => Fallback::Deny,
    }
}

fn interval_ns(rls: &RateLimitService) -> Nanos {
    u64::from(rls.report_interval_ms).saturating_mul(1_000_000)
}

impl Worker {
    /// The `rate_limit_service` settings when the bundle has fleet limits in
    /// mode `assigned`.
    fn assigned_rls(&self) -> Option<&RateLimitService> {
        self.engine
            .rate_limit_service()
            .filter(|r| r.mode == FleetMode::Assigned)
    }

    /// Runs `f` on this worker's RLQS client (made at first use); `None`
    /// outside mode `assigned`.
    pub(crate) fn with_assigned<T>(&self, f: impl FnOnce(&mut Client) -> T) -> Option<T> {
        let rls = self.assigned_rls()?;
        let mut guard = self.fleet.assigned.lock().ok()?;
        let client = guard.get_or_insert_with(|| {
            Client::new(
                self.engine.fleet_limits().all(),
                interval_ns(rls),
                fallback(rls),
            )
        });
        Some(f(client))
    }

    /// Mode `assigned`: admits a request of `cost` to `tenant` against the
    /// assignments of its chain's fleet buckets (all or none), after the
    /// local limits admitted it. `Some`: the decision that refuses it (429
    /// with the bucket's fields, or `on_error`'s 503 when no assignment holds
    /// and the fallback is `deny`); `None`: admitted.
    pub(crate) fn assigned_admit(
        &self,
        tenant: &TenantPath,
        cost: u64,
        now: Nanos,
    ) -> Option<Decision> {
        let chain: Vec<usize> = self.engine.fleet_limits().indices_for(tenant).collect();
        if chain.is_empty() {
            return None;
        }
        let admission = self.with_assigned(|c| c.admit(&chain, cost, now))?;
        let all = self.engine.fleet_limits().all();
        match admission {
            Admission::Admitted => None,
            Admission::Refused {
                limit,
                remaining,
                wait_ns,
            } => {
                let l = all.get(limit)?;
                let interval = self.assigned_rls().map_or(1_000_000_000, interval_ns);
                Some(Decision::over_quota(assigned_refusal(
                    l, remaining, wait_ns, interval, cost, now,
                )))
            }
            Admission::Unassigned { limit } => {
                let named = all
                    .get(limit)
                    .map(|l| format!(" for `{}` at {}", l.name, l.tenant))
                    .unwrap_or_default();
                Some(Decision::error(
                    OnError::Deny,
                    format!("rate limit service: no assignment{named} (on_error deny)"),
                ))
            }
        }
    }

    /// Mode `assigned`, on the tick: the encoded usage report to send on the
    /// stream, when one is due and the stream is open or may be (re)opened
    /// now (its backoff has passed). The usage it carries is taken.
    pub(crate) fn stream_report(&self, now: Nanos) -> Option<Vec<u8>> {
        let rls = self.assigned_rls()?;
        let usage = self.with_assigned(|c| {
            let ready = c.stream_open() || c.connect_due(now);
            (ready && c.report_due(now)).then(|| c.take_report(now))
        })??;
        let all = self.engine.fleet_limits().all();
        let wire: Vec<WireUsage<'_>> = usage
            .iter()
            .filter_map(|u| {
                all.get(u.limit).map(|l| WireUsage {
                    tenant: l.tenant.as_str(),
                    limit: l.name.as_str(),
                    allowed: u.allowed,
                    denied: u.denied,
                    elapsed_ns: u.elapsed_ns,
                })
            })
            .collect();
        (!wire.is_empty()).then(|| rlqs_wire::encode_reports(&rls.domain, &wire))
    }

    /// Mode `assigned`, for `tenantgate simulate`: the usage report due at
    /// `now` (taken, as [`Worker::stream_report`] takes it), unencoded.
    pub fn assigned_usage(&self, now: Nanos) -> Vec<assigned::Usage> {
        self.with_assigned(|c| {
            if c.report_due(now) {
                c.take_report(now)
            } else {
                Vec::new()
            }
        })
        .unwrap_or_default()
    }

    /// Mode `assigned`, for `tenantgate simulate`: takes the action the
    /// service sends for fleet limit `limit` as if it arrived at `now`.
    pub fn assigned_apply(&self, limit: usize, action: &rlqs_wire::WireAction, now: Nanos) {
        self.with_assigned(|c| c.apply(limit, action, now));
    }

    /// The Envoy cluster of the RLQS stream (mode `assigned` only).
    pub fn stream_cluster(&self) -> Option<&str> {
        self.assigned_rls().map(|r| r.cluster.as_str())
    }

    /// The adapter opened the RLQS stream (or holds one from the previous
    /// bundle's worker).
    pub fn stream_opened(&self) -> Vec<Update> {
        self.with_assigned(Client::stream_opened);
        vec![Update::Add(self.layout().fleet_stream_opens, 1)]
    }

    /// A message arrived on the RLQS stream: the assignments it carries
    /// take effect. Buckets this bundle does not have are ignored.
    pub fn stream_message(&self, bytes: &[u8], now: Nanos) -> Tick {
        let mut tick = Tick::default();
        let actions = match rlqs_wire::decode_response(bytes) {
            Ok(a) => a,
            Err(why) => {
                tick.metrics
                    .push(Update::Add(self.layout().fleet_errors, 1));
                if self.fleet_log_due(now) {
                    tick.logs.push(LogLine::new(
                        Level::Warn,
                        format!("tenantgate: rate limit quota service: a message that does not decode: {why}"),
                    ));
                }
                return tick;
            }
        };
        let fleet = self.engine.fleet_limits();
        let applied = self.with_assigned(|c| {
            c.stream_message();
            let mut n = 0u64;
            for a in &actions {
                let Some(i) = a.tenant_limit().and_then(|(t, l)| fleet.index_of(t, l)) else {
                    continue;
                };
                c.apply(i, &a.action, now);
                n += 1;
            }
            n
        });
        if let Some(n) = applied.filter(|n| *n > 0) {
            tick.metrics
                .push(Update::Add(self.layout().fleet_assignments, n));
        }
        tick
    }

    /// The RLQS stream closed, or could not be opened or written to (`why`):
    /// it is reopened after a backoff (one report interval, then two); until
    /// then, and until new assignments come, those it holds run out and the
    /// fallback decides.
    pub fn stream_closed(&self, why: &str, now: Nanos) -> Tick {
        let mut tick = Tick::default();
        let Some(wait) = self.with_assigned(|c| c.stream_closed(now)) else {
            return tick;
        };
        tick.metrics
            .push(Update::Add(self.layout().fleet_errors, 1));
        if self.fleet_log_due(now) {
            tick.logs.push(LogLine::new(
                Level::Warn,
                format!(
                    "tenantgate: rate limit quota stream closed: {why}; reopening in {} ms",
                    wait / 1_000_000
                ),
            ));
        }
        tick
    }

    /// Takes over the previous bundle's RLQS client state (a reload): the
    /// buckets both bundles have keep their assignments and counts.
    pub(crate) fn inherit_assigned(&self, previous: &Worker) {
        let old = previous.engine.fleet_limits().all();
        let new = self.engine.fleet_limits();
        let Ok(prev) = previous.fleet.assigned.lock() else {
            return;
        };
        let Some(prev) = prev.as_ref() else {
            return;
        };
        self.with_assigned(|c| {
            c.inherit(prev, |i| {
                old.get(i)
                    .and_then(|l| new.index_of(l.tenant.as_str(), &l.name))
            })
        });
    }

    /// What decides each known bucket now (tests, `simulate`).
    pub fn assigned_holdings(&self, now: Nanos) -> Vec<(usize, assigned::Holding)> {
        self.with_assigned(|c| {
            let known: Vec<usize> = c.known().collect();
            known
                .into_iter()
                .filter_map(|i| c.holding(i, now).map(|h| (i, h)))
                .collect()
        })
        .unwrap_or_default()
    }
}

/// A refusal by an assigned bucket: the limit's fields (its fleet rate and
/// window), the tokens left in this client's bucket, and the wait until a
/// request of this cost could pass (one report interval when the assignment
/// cannot promise one: deny-all, or a cost above the bucket's size).
fn assigned_refusal(
    l: &FleetLimit,
    remaining: u64,
    wait_ns: Nanos,
    interval_ns: Nanos,
    cost: u64,
    now: Nanos,
) -> QuotaDecision {
    let wait = if wait_ns == u64::MAX {
        interval_ns
    } else {
        wait_ns
    };
    let shape = super::Shape {
        rate: l.rate,
        burst: l.burst,
        window_s: l.per_s,
    };
    l.refusal(shape, remaining, wait, cost, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::rlqs_wire::{encode_response, WireAction, WireStrategy};
    use crate::flow::{Step, Verdict};
    use crate::http::{HttpInput, NoMetadata};
    use crate::quota::MemoryStore;
    use crate::settings::Settings;
    use crate::testing::{bundle, file, tenant as t};
    use crate::Engine;
    use std::sync::Arc;

    const S: Nanos = 1_000_000_000;
    const MS: Nanos = 1_000_000;

    /// `/` has a fleet `rps` of 10; `/acme` a fleet `rps` of 6 (ceil 10,
    /// burst 4) and a local `rpm` of 100 per minute; everyone may read.
    fn engine_with(rls: RateLimitService) -> Arc<Engine> {
        engine_with_acme(
            rls,
            r#"{"limits": {"rpm": {"rate": 100, "per": "1m"}, "rps": {"rate": 6, "ceil": 10, "burst": 4, "scope": "fleet"}}}"#,
        )
    }

    /// [`engine_with`] with `/acme`'s `tenant.json`.
    fn engine_with_acme(rls: RateLimitService, acme: &str) -> Arc<Engine> {
        let settings = Settings {
            rate_limit_service: Some(RateLimitService {
                mode: FleetMode::Assigned,
                domain: "tg".into(),
                report_interval_ms: 500,
                ..rls
            }),
            ..Settings::default()
        };
        let b = bundle(
            settings,
            vec![
                t(
                    "/",
                    Some(file(
                        "tenants/tenant.json",
                        r#"{"limits": {"rps": {"rate": 10, "scope": "fleet"}}}"#,
                    )),
                    vec![file(
                        "tenants/p.cedar",
                        "permit(principal, action, resource);",
                    )],
                ),
                t(
                    "/acme",
                    Some(file("tenants/acme/tenant.json", acme)),
                    vec![],
                ),
            ],
        );
        Arc::new(Engine::new(&b).unwrap())
    }

    fn worker(rls: RateLimitService) -> Worker {
        Worker::new(engine_with(rls))
    }

    fn begin(w: &Worker, tenant: &str, now: Nanos, s: &MemoryStore) -> crate::flow::Effects {
        let h = [
            (":method", b"GET".as_slice()),
            (":path", b"/x".as_slice()),
            ("x-tenant", tenant.as_bytes()),
            ("x-user", b"u".as_slice()),
        ];
        let input = HttpInput {
            headers: &h,
            source_address: None,
            now_ns: now,
        };
        match w.begin(&input, &NoMetadata, Some(s)) {
            Step::Done(e) => e,
            Step::Deferred(_) => panic!("mode assigned makes no call on the request path"),
        }
    }

    fn status(e: &crate::flow::Effects) -> u16 {
        match &e.verdict {
            Verdict::Continue { .. } => 200,
            Verdict::Reply(r) => r.status,
        }
    }

    fn local_tokens(w: &Worker, s: &MemoryStore, now: Nanos) -> u64 {
        let acme = TenantPath::parse("/acme").unwrap();
        w.quotas().admit(&acme, 0, now, s).unwrap().remaining
    }

    fn tokens(max: u64, per_s: u64) -> WireAction {
        WireAction::Assign {
            strategy: WireStrategy::TokenBucket {
                max_tokens: max,
                tokens_per_fill: per_s,
                fill_interval_ns: S,
            },
            ttl_ns: Some(1_500 * MS),
        }
    }

    #[test]
    fn no_call_on_the_request_path_and_assignments_from_the_stream() {
        let w = worker(RateLimitService::default());
        let s = MemoryStore::default();
        let t0 = 100 * S;
        // No assignment yet: `on_error` allow.
        for _ in 0..20 {
            assert_eq!(status(&begin(&w, "/acme", t0, &s)), 200);
        }
        // The first tick reports both buckets of the chain, as new.
        let tick = w.on_tick(t0 + MS, &s);
        let want = rlqs_wire::encode_reports(
            "tg",
            &[
                WireUsage {
                    tenant: "/",
                    limit: "rps",
                    allowed: 20,
                    denied: 0,
                    elapsed_ns: 0,
                },
                WireUsage {
                    tenant: "/acme",
                    limit: "rps",
                    allowed: 20,
                    denied: 0,
                    elapsed_ns: 0,
                },
            ],
        );
        assert_eq!(tick.stream_report, Some(want));
        assert_eq!(w.stream_cluster(), Some("tenantgate_rls"));
        let opens = w.stream_opened();
        assert_eq!(opens, [Update::Add(w.layout().fleet_stream_opens, 1)]);
        // Not due again before the interval.
        assert_eq!(w.on_tick(t0 + 100 * MS, &s).stream_report, None);
        // Assignments: 3 tokens at /acme, plenty at /; an unknown bucket is ignored.
        let msg = encode_response(&[
            ("/acme", "rps", tokens(3, 3)),
            ("/", "rps", tokens(10, 10)),
            ("/nope", "rps", tokens(1, 1)),
        ]);
        let tick = w.stream_message(&msg, t0 + 100 * MS);
        assert_eq!(tick.metrics, [Update::Add(w.layout().fleet_assignments, 2)]);
        let t1 = t0 + 100 * MS;
        let before = local_tokens(&w, &s, t1);
        for _ in 0..3 {
            assert_eq!(status(&begin(&w, "/acme", t1, &s)), 200);
        }
        // The fourth: 429 with the limit's fields, local tokens given back.
        let e = begin(&w, "/acme", t1, &s);
        let Verdict::Reply(r) = &e.verdict else {
            panic!("not refused")
        };
        assert_eq!(r.status, 429);
        let header = |k: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header("retry-after"), Some("1"));
        assert_eq!(header("ratelimit-policy"), Some("\"rps\";q=6;w=1"));
        assert!(r.body.contains("\"limit\":\"rps\""), "{}", r.body);
        assert_eq!(local_tokens(&w, &s, t1), before - 3);
        // The next report: 3 allowed, 1 denied on both, over 100 ms.
        let tick = w.on_tick(t0 + 501 * MS, &s);
        let want = rlqs_wire::encode_reports(
            "tg",
            &[
                WireUsage {
                    tenant: "/",
                    limit: "rps",
                    allowed: 3,
                    denied: 1,
                    elapsed_ns: 500 * MS,
                },
                WireUsage {
                    tenant: "/acme",
                    limit: "rps",
                    allowed: 3,
                    denied: 1,
                    elapsed_ns: 500 * MS,
                },
            ],
        );
        assert_eq!(tick.stream_report, Some(want));
        // The assignments expire (TTL 1.5 s): `on_error` allow again.
        for _ in 0..10 {
            assert_eq!(status(&begin(&w, "/acme", t1 + 1_500 * MS, &s)), 200);
        }
    }

    #[test]
    fn a_closed_stream_waits_its_backoff_and_counts() {
        let w = worker(RateLimitService::default());
        let s = MemoryStore::default();
        let t0 = 100 * S;
        begin(&w, "/acme", t0, &s);
        assert!(w.on_tick(t0, &s).stream_report.is_some());
        w.stream_opened();
        let tick = w.stream_closed("gRPC status 14 (unavailable)", t0 + MS);
        assert_eq!(tick.metrics, [Update::Add(w.layout().fleet_errors, 1)]);
        assert_eq!(
            tick.logs[0].text,
            "tenantgate: rate limit quota stream closed: gRPC status 14 (unavailable); reopening in 500 ms"
        );
        // Nothing to send before the backoff; then the report (with what
        // was counted meanwhile).
        begin(&w, "/acme", t0 + 2 * MS, &s);
        assert!(w.on_tick(t0 + 500 * MS, &s).stream_report.is_none());
        assert!(w.on_tick(t0 + 501 * MS, &s).stream_report.is_some());
        // A second close in a row: two intervals.
        let tick = w.stream_closed("closed by the service", t0 + 2 * S);
        assert!(tick.logs[0].text.ends_with("reopening in 1000 ms"));
        // A message that does not decode is an error, nothing applied.
        let tick = w.stream_message(&[0x0a, 9], t0 + 3 * S);
        assert_eq!(tick.metrics, [Update::Add(w.layout().fleet_errors, 1)]);
    }

    #[test]
    fn fallbacks_deny_and_static_share() {
        let s = MemoryStore::default();
        let t0 = 100 * S;
        let deny = worker(RateLimitService {
            on_error: OnError::Deny,
            ..RateLimitService::default()
        });
        let e = begin(&deny, "/acme", t0, &s);
        assert_eq!(status(&e), 503);
        assert_eq!(
            e.decision.errors,
            ["rate limit service: no assignment for `rps` at /acme (on_error deny)"]
        );
        // `on_error_instances` 2: `/acme` admits 6 / 2 = 3 per second,
        // 4 / 2 = 2 at once.
        let share = worker(RateLimitService {
            on_error_instances: Some(2),
            ..RateLimitService::default()
        });
        let s = MemoryStore::default();
        let got: Vec<u16> = (0..3)
            .map(|_| status(&begin(&share, "/acme", t0, &s)))
            .collect();
        assert_eq!(got, [200, 200, 429]);
        assert_eq!(status(&begin(&share, "/acme", t0 + 333 * MS, &s)), 429);
        assert_eq!(status(&begin(&share, "/acme", t0 + 334 * MS, &s)), 200);
    }

    #[test]
    fn fleet_refusals_give_the_local_tokens_back_to_the_lease() {
        // `/acme`'s local `rpm` (burst 6,400: leased up to 64 tokens at a
        // time) keeps what 200 requests refused by the fleet took: they go
        // back to the worker's lease (exactly to the buckets when a request
        // was charged alone).
        let acme = r#"{"limits": {"rpm": {"rate": 6400, "per": "1m"}, "rps": {"rate": 6, "ceil": 10, "burst": 4, "scope": "fleet"}}}"#;
        let leased = |rls| Worker::new(engine_with_acme(rls, acme));
        let s = MemoryStore::default();
        let t0 = 100 * S;
        let deny = leased(RateLimitService {
            on_error: OnError::Deny,
            ..RateLimitService::default()
        });
        assert!(
            deny.quotas()
                .lease_cap_for(&TenantPath::parse("/acme").unwrap())
                >= 2
        );
        let before = local_tokens(&deny, &s, t0);
        for i in 0..200 {
            assert_eq!(status(&begin(&deny, "/acme", t0 + i * MS, &s)), 503);
        }
        deny.return_all_leases(&s).unwrap();
        let t1 = t0 + 200 * MS;
        assert_eq!(local_tokens(&deny, &s, t1), before);
        // Admitted ones are charged: 5 with a static share of plenty.
        let share = leased(RateLimitService {
            on_error_instances: Some(1),
            ..RateLimitService::default()
        });
        for _ in 0..4 {
            assert_eq!(status(&begin(&share, "/acme", t1, &s)), 200);
        }
        // The fifth: the fleet's burst (4) is spent, the local one is not.
        assert_eq!(status(&begin(&share, "/acme", t1, &s)), 429);
        share.return_all_leases(&s).unwrap();
        assert_eq!(local_tokens(&share, &s, t1), before - 4);
    }

    #[test]
    fn a_reload_keeps_the_assignments_of_the_buckets_that_remain() {
        let s = MemoryStore::default();
        let t0 = 100 * S;
        let engine = engine_with(RateLimitService::default());
        let act = Worker::activate(Arc::clone(&engine), None, "t", &s, t0, 1);
        let w = act.worker;
        begin(&w, "/acme", t0, &s);
        let _ = w.on_tick(t0, &s);
        w.stream_opened();
        w.stream_message(
            &encode_response(&[("/acme", "rps", tokens(3, 3)), ("/", "rps", tokens(9, 9))]),
            t0,
        );
        let act = Worker::activate(Arc::clone(&engine), Some(&w), "t", &s, t0, 2);
        let holdings = act.worker.assigned_holdings(t0);
        assert_eq!(
            holdings,
            w.assigned_holdings(t0),
            "the same buckets, assignments and tokens"
        );
        assert_eq!(holdings.len(), 2);
        assert!(matches!(
            holdings[1].1,
            assigned::Holding::Bucket { max, .. } if max == 3.0
        ));
    }
}
