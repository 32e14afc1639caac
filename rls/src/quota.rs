//! `envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas`
//! (RLQS) for mode `assigned`: every client reports its usage per bucket,
//! the service keeps each client's latest report in a [`ReportStore`]
//! (Redis, with a TTL of a few report intervals, so replicas are
//! interchangeable and a restart resumes), runs the allocator of
//! `tenantgate_engine::fleet::allocate` over every live report and answers
//! the client with a token-bucket assignment per bucket. See docs/fleet.md.
//!
//! Buckets: `{"tenant": A, "limit": N}` for each fleet limit `N` declared on
//! `A`. A bucket that is not one of the bundle's (or a report for another
//! domain) gets allow-all, as RLS answers OK for a descriptor it does not
//! know; a bucket this stream was assigned that a reload removed gets
//! `abandon_action`, once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::{BlanketRule, Strategy};
use envoy_types::pb::envoy::r#type::v3::{RateLimitStrategy, TokenBucket};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::{
    AbandonAction, BucketAction as Action, QuotaAssignmentAction,
};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::BucketAction;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaService;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use redis::aio::ConnectionManager;
use tenantgate_engine::fleet::allocate::{allocate, Reports, Usage};
use tenantgate_engine::fleet::{FleetLimit, LIMIT_KEY, TENANT_KEY};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::counter::CounterError;
use crate::limits::Limits;

pub use tenantgate_engine::fleet::allocate::TTL_INTERVALS;

/// The longest a report is kept: [`TTL_INTERVALS`] of the longest interval
/// (60 s). Also the TTL of the Redis hash, renewed by every write.
pub const MAX_REPORT_TTL_MS: u64 = TTL_INTERVALS * 60_000;

/// The Redis hash of a domain's latest reports. One key (one Cluster slot):
/// each field is one client's latest report for one bucket.
pub fn reports_key(domain: &str) -> String {
    format!("tenantgate:rlqs:v1:{{{domain}}}:reports")
}

/// A stored report: the bucket, the client and its usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub tenant: String,
    pub limit: String,
    pub client: String,
    pub usage: Usage,
    /// How long the report counts, from `usage.at_ms`.
    pub ttl_ms: u64,
}

impl Stored {
    /// The hash field: tenant, limit and client, newline-separated (none of
    /// them holds a newline: tenant paths and limit names cannot, client ids
    /// are the service's own).
    fn field(&self) -> String {
        format!("{}\n{}\n{}", self.tenant, self.limit, self.client)
    }

    fn value(&self) -> String {
        let u = &self.usage;
        format!(
            "{} {} {} {} {}",
            u.allowed, u.denied, u.elapsed_ms, u.at_ms, self.ttl_ms
        )
    }

    fn parse(field: &str, value: &str) -> Option<Stored> {
        let mut f = field.splitn(3, '\n');
        let (tenant, limit, client) = (f.next()?, f.next()?, f.next()?);
        let n: Vec<u64> = value
            .split(' ')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let [allowed, denied, elapsed_ms, at_ms, ttl_ms] = n.as_slice() else {
            return None;
        };
        Some(Stored {
            tenant: tenant.to_owned(),
            limit: limit.to_owned(),
            client: client.to_owned(),
            usage: Usage {
                allowed: *allowed,
                denied: *denied,
                elapsed_ms: *elapsed_ms,
                at_ms: *at_ms,
            },
            ttl_ms: *ttl_ms,
        })
    }
}

/// Where the latest reports live.
pub trait ReportStore: Send + Sync + 'static {
    /// Stores one client's reports (replacing its earlier ones for the same
    /// buckets); they live at least their `ttl_ms`.
    fn put(
        &self,
        domain: &str,
        reports: &[Stored],
    ) -> impl Future<Output = Result<(), CounterError>> + Send;
    /// Every report received at or after `since_ms`; older ones may be dropped.
    fn live(
        &self,
        domain: &str,
        since_ms: u64,
    ) -> impl Future<Output = Result<Vec<Stored>, CounterError>> + Send;
}

/// The reports in Redis: one hash per domain ([`reports_key`]), whose TTL
/// each write renews; fields older than the TTL are deleted as they are read.
#[derive(Clone)]
pub struct RedisReports {
    conn: ConnectionManager,
    timeout: Duration,
}

impl RedisReports {
    pub fn new(conn: ConnectionManager, timeout: Duration) -> RedisReports {
        RedisReports { conn, timeout }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, CounterError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, pipe.query_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CounterError::Redis(e)),
            Err(_) => Err(CounterError::Timeout(self.timeout)),
        }
    }
}

impl ReportStore for RedisReports {
    async fn put(&self, domain: &str, reports: &[Stored]) -> Result<(), CounterError> {
        if reports.is_empty() {
            return Ok(());
        }
        let key = reports_key(domain);
        let fields: Vec<(String, String)> =
            reports.iter().map(|r| (r.field(), r.value())).collect();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(&key, &fields)
            .ignore()
            .pexpire(&key, i64::try_from(MAX_REPORT_TTL_MS).unwrap_or(i64::MAX))
            .ignore();
        self.run::<()>(&pipe).await
    }

    async fn live(&self, domain: &str, since_ms: u64) -> Result<Vec<Stored>, CounterError> {
        let key = reports_key(domain);
        let mut pipe = redis::pipe();
        pipe.hgetall(&key);
        let (all,): (HashMap<String, String>,) = self.run(&pipe).await?;
        let (live, stale): (Vec<_>, Vec<_>) = all
            .iter()
            .map(|(f, v)| (f, Stored::parse(f, v)))
            .partition(|(_, s)| s.as_ref().is_some_and(|s| s.usage.at_ms >= since_ms));
        if !stale.is_empty() {
            let mut pipe = redis::pipe();
            pipe.hdel(
                &key,
                stale.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(),
            )
            .ignore();
            // Best effort: a failed clean-up only leaves stale fields to
            // be skipped again.
            let _ = self.run::<()>(&pipe).await;
        }
        Ok(live.into_iter().filter_map(|(_, s)| s).collect())
    }
}

/// The reports in this process, with the semantics of [`RedisReports`]:
/// for tests (plain `cargo test`), not a fleet.
#[derive(Default)]
pub struct MemoryReports {
    domains: Mutex<HashMap<String, BTreeMap<String, Stored>>>,
}

impl ReportStore for MemoryReports {
    async fn put(&self, domain: &str, reports: &[Stored]) -> Result<(), CounterError> {
        let mut d = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        let m = d.entry(domain.to_owned()).or_default();
        for r in reports {
            m.insert(r.field(), r.clone());
        }
        Ok(())
    }

    async fn live(&self, domain: &str, since_ms: u64) -> Result<Vec<Stored>, CounterError> {
        let mut d = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = d.get_mut(domain) else {
            return Ok(Vec::new());
        };
        m.retain(|_, s| s.usage.at_ms >= since_ms);
        Ok(m.values().cloned().collect())
    }
}

/// Milliseconds on the service's clock (wall clock: replicas compare the
/// times of each other's reports).
pub type MsClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The wall clock in milliseconds since the Unix epoch.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One stream's client: its id in the store and the buckets it was assigned.
#[derive(Debug, Clone, Default)]
pub struct Client {
    pub id: String,
    /// `(tenant, limit)` of every bucket this stream holds an assignment for.
    assigned: BTreeSet<(String, String)>,
    /// The longest `time_elapsed` of its latest report, in milliseconds (at
    /// most 60 s): its reporting interval, as the assignments' TTL needs it.
    interval_ms: u64,
}

impl Client {
    pub fn new(id: impl Into<String>) -> Client {
        Client {
            id: id.into(),
            assigned: BTreeSet::new(),
            interval_ms: 0,
        }
    }
}

/// The RLQS service.
pub struct QuotaService<R = RedisReports> {
    limits: watch::Receiver<Arc<Limits>>,
    reports: Arc<R>,
    /// `--domain`: overrides the bundle's domain.
    domain: Option<String>,
    clock: MsClock,
    /// This replica's prefix for client ids, and a counter.
    replica: String,
    streams: AtomicU64,
}

impl<R: ReportStore> QuotaService<R> {
    pub fn new(
        limits: watch::Receiver<Arc<Limits>>,
        reports: R,
        domain: Option<String>,
        clock: MsClock,
    ) -> Self {
        let replica = format!("{:x}-{:x}", std::process::id(), clock());
        QuotaService {
            limits,
            reports: Arc::new(reports),
            domain,
            clock,
            replica,
            streams: AtomicU64::new(0),
        }
    }

    pub fn reports(&self) -> &R {
        &self.reports
    }

    /// A new stream's client id, unique across replicas and restarts.
    pub fn new_client(&self) -> Client {
        let n = self.streams.fetch_add(1, Ordering::Relaxed);
        Client::new(format!("{}-{n}", self.replica))
    }

    /// Handles one message of a stream: stores the client's reports, runs
    /// the allocator over every live report, answers this client's buckets.
    pub async fn on_report(
        &self,
        client: &mut Client,
        msg: &RateLimitQuotaUsageReports,
    ) -> Result<RateLimitQuotaResponse, CounterError> {
        let limits = Arc::clone(&self.limits.borrow());
        let domain = self.domain.as_deref().unwrap_or(&limits.domain).to_owned();
        let now = (self.clock)();
        let elapsed = |u: &BucketQuotaUsage| {
            u.time_elapsed.as_ref().map_or(0, |d| {
                let ms = d
                    .seconds
                    .saturating_mul(1000)
                    .saturating_add(i64::from(d.nanos) / 1_000_000);
                u64::try_from(ms).unwrap_or(0)
            })
        };
        let longest = msg
            .bucket_quota_usages
            .iter()
            .map(elapsed)
            .max()
            .unwrap_or(0);
        // The latest report sets the interval, not the longest ever: the
        // first report of a stream reopened after an outage covers the whole
        // outage, and kept as the interval it would stretch every later TTL
        // (assignments outliving a lost service or Redis by many seconds).
        // That one answer's long TTL is replaced by the next answer's.
        if longest > 0 {
            client.interval_ms = longest.min(60_000);
        }
        let interval_ms = limits.report_interval_ms.max(client.interval_ms).max(1);
        let ttl_ms = interval_ms.saturating_mul(TTL_INTERVALS);
        let mine = domain == msg.domain;
        let mut stored = Vec::new();
        let mut unknown = Vec::new();
        for u in &msg.bucket_quota_usages {
            let id = u.bucket_id.clone().unwrap_or_default();
            let Some((tenant, name)) = bucket_of(&id).filter(|_| mine) else {
                unknown.push(id);
                continue;
            };
            if limits.fleet.get(tenant, name).is_none() {
                unknown.push(id);
                continue;
            }
            let elapsed_ms = elapsed(u);
            stored.push(Stored {
                tenant: tenant.to_owned(),
                limit: name.to_owned(),
                client: client.id.clone(),
                usage: Usage {
                    allowed: u.num_requests_allowed,
                    denied: u.num_requests_denied,
                    elapsed_ms,
                    at_ms: now,
                },
                ttl_ms,
            });
        }
        let mut actions = Vec::new();
        let mut abandoned = BTreeSet::new();
        if mine {
            self.reports.put(&domain, &stored).await?;
            let live = self
                .reports
                .live(&domain, now.saturating_sub(MAX_REPORT_TTL_MS))
                .await?;
            let all = limits.fleet.all();
            let mut reports = Reports::new();
            // Each report lives its own TTL (its client's interval).
            for s in live
                .into_iter()
                .filter(|s| s.usage.at_ms.saturating_add(s.ttl_ms) >= now)
            {
                if let Some(i) = index_of(all, &s.tenant, &s.limit) {
                    reports.insert((i, s.client), s.usage);
                }
            }
            let a = allocate(all, &reports, now, MAX_REPORT_TTL_MS);
            // This client's buckets: those it reported now, and those it
            // holds an assignment for (refreshed, or abandoned if gone).
            let mut buckets: BTreeSet<(String, String)> = std::mem::take(&mut client.assigned);
            buckets.extend(stored.iter().map(|s| (s.tenant.clone(), s.limit.clone())));
            for (tenant, name) in buckets {
                let id = bucket_id(&tenant, &name);
                let found = index_of(all, &tenant, &name).and_then(|i| all.get(i).map(|l| (i, l)));
                let Some((i, l)) = found else {
                    actions.push(abandon(id));
                    abandoned.insert((tenant, name));
                    continue;
                };
                let Some(x) = a.get(i, &client.id) else {
                    continue;
                };
                actions.push(assign(id, l, x.rate, x.burst, ttl_ms));
                client.assigned.insert((tenant, name));
            }
        }
        // A removed bucket still reported is abandoned, not allowed.
        let was_abandoned = |id: &BucketId| {
            bucket_of(id).is_some_and(|(t, l)| abandoned.contains(&(t.to_owned(), l.to_owned())))
        };
        for id in unknown.into_iter().filter(|id| !was_abandoned(id)) {
            actions.push(BucketAction {
                bucket_id: Some(id),
                bucket_action: Some(Action::QuotaAssignmentAction(QuotaAssignmentAction {
                    assignment_time_to_live: Some(pb_ms(ttl_ms)),
                    rate_limit_strategy: Some(RateLimitStrategy {
                        strategy: Some(Strategy::BlanketRule(BlanketRule::AllowAll as i32)),
                    }),
                })),
            });
        }
        Ok(RateLimitQuotaResponse {
            bucket_action: actions,
        })
    }
}

/// `(tenant, limit)` of a bucket id that has exactly those two keys.
pub fn bucket_of(id: &BucketId) -> Option<(&str, &str)> {
    if id.bucket.len() != 2 {
        return None;
    }
    Some((
        id.bucket.get(TENANT_KEY)?.as_str(),
        id.bucket.get(LIMIT_KEY)?.as_str(),
    ))
}

/// The bucket id of a fleet limit.
pub fn bucket_id(tenant: &str, limit: &str) -> BucketId {
    BucketId {
        bucket: [
            (TENANT_KEY.to_owned(), tenant.to_owned()),
            (LIMIT_KEY.to_owned(), limit.to_owned()),
        ]
        .into_iter()
        .collect(),
    }
}

fn index_of(all: &[FleetLimit], tenant: &str, name: &str) -> Option<usize> {
    all.iter()
        .position(|l| l.tenant.as_str() == tenant && l.name == name)
}

fn pb_ms(ms: u64) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

fn abandon(id: BucketId) -> BucketAction {
    BucketAction {
        bucket_id: Some(id),
        bucket_action: Some(Action::AbandonAction(AbandonAction {})),
    }
}

/// A token bucket of `rate` tokens per window of the limit, holding `burst`;
/// a rate of 0 is deny-all (a token bucket must hold at least one token).
fn assign(id: BucketId, l: &FleetLimit, rate: u64, burst: u64, ttl_ms: u64) -> BucketAction {
    let sat = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    let strategy = if rate == 0 {
        Strategy::BlanketRule(BlanketRule::DenyAll as i32)
    } else {
        Strategy::TokenBucket(TokenBucket {
            max_tokens: sat(burst.max(1)),
            tokens_per_fill: Some(UInt32Value { value: sat(rate) }),
            fill_interval: Some(pb_ms(l.per_s.saturating_mul(1000))),
        })
    };
    BucketAction {
        bucket_id: Some(id),
        bucket_action: Some(Action::QuotaAssignmentAction(QuotaAssignmentAction {
            assignment_time_to_live: Some(pb_ms(ttl_ms)),
            rate_limit_strategy: Some(RateLimitStrategy {
                strategy: Some(strategy),
            }),
        })),
    }
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("tenantgate-rls: {msg}");
}

/// The gRPC face of a shared [`QuotaService`] (each stream's task holds it).
pub struct Rlqs<R = RedisReports>(pub Arc<QuotaService<R>>);

#[tonic::async_trait]
impl<R: ReportStore> RateLimitQuotaService for Rlqs<R> {
    type StreamRateLimitQuotasStream = ReceiverStream<Result<RateLimitQuotaResponse, Status>>;

    async fn stream_rate_limit_quotas(
        &self,
        request: Request<Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<Response<Self::StreamRateLimitQuotasStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let service = Arc::clone(&self.0);
        tokio::spawn(async move {
            let mut client = service.new_client();
            let mut failing = false;
            while let Ok(Some(msg)) = inbound.message().await {
                match service.on_report(&mut client, &msg).await {
                    Ok(resp) => {
                        failing = false;
                        if !resp.bucket_action.is_empty() && tx.send(Ok(resp)).await.is_err() {
                            break;
                        }
                    }
                    // No answer: the client's assignments run out and its
                    // own fallback decides; the stream stays open.
                    Err(e) => {
                        if !failing {
                            log(format!("rlqs: no assignment for client {}: {e}", client.id));
                        }
                        failing = true;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
