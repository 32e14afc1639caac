//! Mode `assigned`, the client's side: one worker's assignments per fleet
//! bucket, enforced in memory with no call on the request path, and its usage
//! reports to the rate limit quota service (RLQS). Pure: no host calls, the
//! time is an argument. `tenantgate simulate` runs the same code on its
//! virtual clock; docs/fleet.md describes the mode.
//!
//! - A bucket is a fleet limit (its index in [`super::FleetLimits::all`]),
//!   `{"tenant": A, "limit": N}` on the wire. A worker knows a bucket once a
//!   request charged it.
//! - [`Client::admit`] takes `cost` tokens from every bucket of the request's
//!   chain or from none (the first refusing bucket, deepest first, answers),
//!   and counts the request as allowed or denied on each of them: the demand
//!   the server divides capacity by.
//! - Each bucket is decided by its assignment while it holds one (a token
//!   bucket, allow-all or deny-all, until `assignment_time_to_live` runs
//!   out), else by the [`Fallback`]: `allow`, `deny` (the request gets the
//!   `on_error` answer), or a static share (the limit's rate and burst
//!   divided by `on_error_instances`).
//! - [`Client::take_report`] gives, per known bucket, what was allowed and
//!   denied since the last report and over how long (a bucket's first report
//!   has no time elapsed: the server gives it a starting share);
//!   [`Client::apply`] takes the server's action for a bucket (an assignment
//!   replaces the previous one, keeping the tokens left up to the new size;
//!   the same strategy again only extends it; an abandon forgets the bucket).
//! - [`Client::stream_closed`] and [`Client::connect_due`]: the stream is
//!   reopened after one report interval, then every two, until a message
//!   arrives.

use std::collections::BTreeMap;

use super::rlqs_wire::{WireAction, WireStrategy};
use super::FleetLimit;

/// Nanoseconds on the worker's clock.
pub type Nanos = u64;

const NS_PER_S: u64 = 1_000_000_000;

/// Shortest wait before reopening a stream.
pub const MIN_BACKOFF_NS: Nanos = 50_000_000;

/// What decides a bucket that holds no assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Admit (`on_error: "allow"`).
    Allow,
    /// Refuse with the `on_error` answer (`on_error: "deny"`).
    Deny,
    /// A token bucket of the limit's rate and burst divided by this number
    /// of instances (`on_error_instances`).
    Share(u32),
}

/// A continuous token bucket: `per_fill` tokens every `interval_ns`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tokens {
    max: f64,
    per_fill: f64,
    interval_ns: f64,
    tokens: f64,
    at: Nanos,
}

impl Tokens {
    fn full(max: f64, per_fill: f64, interval_ns: u64, now: Nanos) -> Tokens {
        Tokens {
            max,
            per_fill,
            interval_ns: interval_ns.max(1) as f64,
            tokens: max,
            at: now,
        }
    }

    fn refill(&mut self, now: Nanos) {
        if now > self.at {
            let add = (now - self.at) as f64 * self.per_fill / self.interval_ns;
            self.tokens = (self.tokens + add).min(self.max);
            self.at = now;
        }
    }

    /// Nanoseconds until `cost` tokens are there (`u64::MAX`: never).
    fn wait_ns(&self, cost: f64) -> u64 {
        let missing = cost - self.tokens;
        if missing <= EPS {
            0
        } else if self.per_fill <= 0.0 || cost > self.max + EPS {
            u64::MAX
        } else {
            (missing * self.interval_ns / self.per_fill).ceil() as u64
        }
    }
}

/// Slack for float rounding when comparing tokens.
const EPS: f64 = 1e-9;

#[derive(Debug, Clone, PartialEq)]
enum Rule {
    AllowAll,
    DenyAll,
    Bucket(Tokens),
}

#[derive(Debug, Clone, PartialEq)]
struct Active {
    strategy: WireStrategy,
    rule: Rule,
    /// `None`: no expiry.
    expires: Option<Nanos>,
}

#[derive(Debug, Clone, PartialEq)]
struct Bucket {
    active: Option<Active>,
    /// The static share's bucket ([`Fallback::Share`]), made at first use.
    fallback: Option<Tokens>,
    allowed: u64,
    denied: u64,
    /// Start of what the next report covers.
    since: Nanos,
    /// Whether it was reported at least once.
    reported: bool,
}

impl Bucket {
    fn new(now: Nanos) -> Bucket {
        Bucket {
            active: None,
            fallback: None,
            allowed: 0,
            denied: 0,
            since: now,
            reported: false,
        }
    }

    /// Drops the assignment once it has expired.
    fn expire(&mut self, now: Nanos) {
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.expires.is_some_and(|e| now >= e))
        {
            self.active = None;
        }
    }
}

/// A limit's rate, burst and window, as the static share needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Params {
    rate: u64,
    burst: u64,
    per_ns: u64,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// The bucket of fleet limit `limit` (an index) has too few tokens, or
    /// its assignment denies all: a 429. `remaining`: whole tokens left;
    /// `wait_ns`: until a request of this cost could pass (`u64::MAX`: not
    /// under this assignment).
    Refused {
        limit: usize,
        remaining: u64,
        wait_ns: u64,
    },
    /// The bucket holds no assignment and the fallback is `deny`: the
    /// `on_error` answer.
    Unassigned {
        limit: usize,
    },
}

/// One bucket's usage since the last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Index of the fleet limit.
    pub limit: usize,
    /// Tokens (request costs) allowed and denied.
    pub allowed: u64,
    pub denied: u64,
    /// The time covered; 0 for the bucket's first report.
    pub elapsed_ns: u64,
}

/// What a bucket is decided by now (for tests, metrics and `simulate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Holding {
    /// No assignment: the fallback decides.
    Fallback,
    AllowAll,
    DenyAll,
    /// A token bucket: tokens per window of the limit, size, tokens now.
    Bucket {
        rate: f64,
        max: f64,
        tokens: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Open,
    Closed { retry_at: Nanos },
}

/// The action the rate limit quota service sends for `assignment` of fleet
/// limit `l`, valid for `ttl_ns`: a token bucket of `rate` tokens per
/// window holding `burst` (at least 1), or deny-all for a rate of 0 (a token
/// bucket must hold a token). `tenantgate-rls` sends the same in protobuf.
pub fn action_for(
    l: &FleetLimit,
    assignment: super::allocate::Assignment,
    ttl_ns: Nanos,
) -> WireAction {
    let strategy = if assignment.rate == 0 {
        WireStrategy::DenyAll
    } else {
        WireStrategy::TokenBucket {
            max_tokens: assignment.burst.max(1),
            tokens_per_fill: assignment.rate,
            fill_interval_ns: l.per_s.saturating_mul(NS_PER_S),
        }
    };
    WireAction::Assign {
        strategy,
        ttl_ns: Some(ttl_ns),
    }
}

/// One worker's client state.
#[derive(Debug, Clone, PartialEq)]
pub struct Client {
    params: Vec<Params>,
    interval_ns: Nanos,
    fallback: Fallback,
    buckets: BTreeMap<usize, Bucket>,
    last_report: Option<Nanos>,
    stream: StreamState,
    /// Closes since the last message received.
    failures: u32,
}

impl Client {
    /// A client for `limits` (as [`super::FleetLimits::all`]) reporting every
    /// `interval_ns`.
    pub fn new(limits: &[FleetLimit], interval_ns: Nanos, fallback: Fallback) -> Client {
        Client {
            params: limits
                .iter()
                .map(|l| Params {
                    rate: l.rate,
                    burst: l.burst,
                    per_ns: l.per_s.saturating_mul(NS_PER_S),
                })
                .collect(),
            interval_ns: interval_ns.max(1),
            fallback,
            buckets: BTreeMap::new(),
            last_report: None,
            stream: StreamState::Closed { retry_at: 0 },
            failures: 0,
        }
    }

    /// Admits a request of `cost` tokens on the buckets of `chain` (fleet
    /// limit indices, deepest first): all of them or none.
    pub fn admit(&mut self, chain: &[usize], cost: u64, now: Nanos) -> Admission {
        let c = cost as f64;
        // Every bucket of the chain is known from now on (and reported).
        for &i in chain {
            self.buckets.entry(i).or_insert_with(|| Bucket::new(now));
        }
        let mut verdict = Admission::Admitted;
        for &i in chain {
            let params = self.params.get(i).copied();
            let fallback = self.fallback;
            let Some(b) = self.buckets.get_mut(&i) else {
                continue;
            };
            b.expire(now);
            let refused = |tokens: &Tokens| Admission::Refused {
                limit: i,
                remaining: (tokens.tokens + EPS).floor().max(0.0) as u64,
                wait_ns: tokens.wait_ns(c),
            };
            let v = match (&mut b.active, fallback) {
                (Some(a), _) => match &mut a.rule {
                    Rule::AllowAll => Admission::Admitted,
                    Rule::DenyAll => Admission::Refused {
                        limit: i,
                        remaining: 0,
                        wait_ns: u64::MAX,
                    },
                    Rule::Bucket(t) => {
                        t.refill(now);
                        if t.tokens + EPS >= c {
                            Admission::Admitted
                        } else {
                            refused(t)
                        }
                    }
                },
                (None, Fallback::Allow) => Admission::Admitted,
                (None, Fallback::Deny) => Admission::Unassigned { limit: i },
                (None, Fallback::Share(n)) => {
                    let t = b.fallback.get_or_insert_with(|| share(params, n, now));
                    t.refill(now);
                    if t.tokens + EPS >= c {
                        Admission::Admitted
                    } else {
                        refused(t)
                    }
                }
            };
            if v != Admission::Admitted {
                verdict = v;
                break;
            }
        }
        let admitted = verdict == Admission::Admitted;
        for &i in chain {
            let Some(b) = self.buckets.get_mut(&i) else {
                continue;
            };
            if admitted {
                b.allowed = b.allowed.saturating_add(cost);
                let tokens = match &mut b.active {
                    Some(Active {
                        rule: Rule::Bucket(t),
                        ..
                    }) => Some(t),
                    Some(_) => None,
                    None => b.fallback.as_mut(),
                };
                if let Some(t) = tokens {
                    t.tokens = (t.tokens - c).max(0.0);
                }
            } else {
                b.denied = b.denied.saturating_add(cost);
            }
        }
        verdict
    }

    /// Whether a report is due: a bucket never reported, or an interval
    /// since the last report.
    pub fn report_due(&self, now: Nanos) -> bool {
        !self.buckets.is_empty()
            && (self.buckets.values().any(|b| !b.reported)
                || self
                    .last_report
                    .is_none_or(|t| now.saturating_sub(t) >= self.interval_ns))
    }

    /// Every known bucket's usage since its last report (taken: the counts
    /// start again from 0).
    pub fn take_report(&mut self, now: Nanos) -> Vec<Usage> {
        self.last_report = Some(now);
        self.buckets
            .iter_mut()
            .map(|(&limit, b)| {
                let u = Usage {
                    limit,
                    allowed: b.allowed,
                    denied: b.denied,
                    elapsed_ns: if b.reported {
                        now.saturating_sub(b.since).max(1)
                    } else {
                        0
                    },
                };
                (b.allowed, b.denied, b.since, b.reported) = (0, 0, now, true);
                u
            })
            .collect()
    }

    /// Applies the server's action for the bucket of fleet limit `limit`.
    pub fn apply(&mut self, limit: usize, action: &WireAction, now: Nanos) {
        let (strategy, ttl_ns) = match action {
            WireAction::Abandon => {
                self.buckets.remove(&limit);
                return;
            }
            WireAction::Assign { strategy, ttl_ns } => (*strategy, *ttl_ns),
        };
        let b = self
            .buckets
            .entry(limit)
            .or_insert_with(|| Bucket::new(now));
        b.expire(now);
        let expires = ttl_ns.map(|t| now.saturating_add(t));
        if let Some(a) = b.active.as_mut().filter(|a| a.strategy == strategy) {
            a.expires = expires;
            return;
        }
        let rule = match strategy {
            WireStrategy::AllowAll => Rule::AllowAll,
            WireStrategy::DenyAll => Rule::DenyAll,
            WireStrategy::TokenBucket {
                max_tokens,
                tokens_per_fill,
                fill_interval_ns,
            } => {
                let mut t = Tokens::full(
                    max_tokens as f64,
                    tokens_per_fill as f64,
                    fill_interval_ns,
                    now,
                );
                // The tokens left under the previous bucket carry over.
                if let Some(Active {
                    rule: Rule::Bucket(old),
                    ..
                }) = &mut b.active
                {
                    old.refill(now);
                    t.tokens = old.tokens.min(t.max);
                }
                Rule::Bucket(t)
            }
        };
        b.active = Some(Active {
            strategy,
            rule,
            expires,
        });
    }

    /// What decides the bucket of fleet limit `limit` now (`None`: not known).
    pub fn holding(&self, limit: usize, now: Nanos) -> Option<Holding> {
        let b = self.buckets.get(&limit)?;
        let active = b
            .active
            .as_ref()
            .filter(|a| a.expires.is_none_or(|e| now < e));
        let window_ns = self.params.get(limit).map_or(0, |p| p.per_ns) as f64;
        Some(match active.map(|a| &a.rule) {
            None => Holding::Fallback,
            Some(Rule::AllowAll) => Holding::AllowAll,
            Some(Rule::DenyAll) => Holding::DenyAll,
            Some(Rule::Bucket(t)) => {
                let mut t = *t;
                t.refill(now);
                Holding::Bucket {
                    rate: t.per_fill * window_ns / t.interval_ns,
                    max: t.max,
                    tokens: t.tokens,
                }
            }
        })
    }

    /// The buckets this worker knows, by fleet limit index.
    pub fn known(&self) -> impl Iterator<Item = usize> + '_ {
        self.buckets.keys().copied()
    }

    /// Takes over `previous`'s buckets (a reload): each bucket whose limit
    /// `map` finds in this client's limits keeps its assignment, counts and
    /// tokens; the stream state carries over too.
    pub fn inherit(&mut self, previous: &Client, map: impl Fn(usize) -> Option<usize>) {
        for (i, b) in &previous.buckets {
            if let Some(j) = map(*i).filter(|j| *j < self.params.len()) {
                self.buckets.insert(j, b.clone());
            }
        }
        self.last_report = previous.last_report;
        self.stream = previous.stream;
        self.failures = previous.failures;
    }

    /// Whether the stream is open.
    pub fn stream_open(&self) -> bool {
        self.stream == StreamState::Open
    }

    /// Whether the stream should be (re)opened now: it is closed and its
    /// backoff has passed.
    pub fn connect_due(&self, now: Nanos) -> bool {
        matches!(self.stream, StreamState::Closed { retry_at } if now >= retry_at)
    }

    /// The adapter opened the stream.
    pub fn stream_opened(&mut self) {
        self.stream = StreamState::Open;
    }

    /// The stream closed (or could not be opened): it is reopened after one
    /// report interval, after two for each further close with no message in
    /// between. Returns the wait.
    pub fn stream_closed(&mut self, now: Nanos) -> Nanos {
        self.failures = self.failures.saturating_add(1);
        let factor = if self.failures > 1 { 2 } else { 1 };
        let wait = self.interval_ns.saturating_mul(factor).max(MIN_BACKOFF_NS);
        self.stream = StreamState::Closed {
            retry_at: now.saturating_add(wait),
        };
        wait
    }

    /// A message arrived on the stream: the backoff starts again.
    pub fn stream_message(&mut self) {
        self.failures = 0;
    }
}

/// The static share of a limit: its rate and burst divided by `n`.
fn share(params: Option<Params>, n: u32, now: Nanos) -> Tokens {
    let p = params.unwrap_or(Params {
        rate: 0,
        burst: 0,
        per_ns: NS_PER_S,
    });
    let n = f64::from(n.max(1));
    let max = (p.burst as f64 / n).max(1.0);
    Tokens::full(max, p.rate as f64 / n, p.per_ns, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantPath;

    const S: Nanos = NS_PER_S;
    const MS: Nanos = 1_000_000;

    /// `/` rps 100 (burst 100); `/a` rps 60, burst 20, its child.
    fn limits() -> Vec<FleetLimit> {
        let l = |t: &str, rate, burst, parent| FleetLimit {
            tenant: TenantPath::parse(t).unwrap(),
            name: "rps".into(),
            rate,
            ceil: rate,
            burst,
            per_s: 1,
            parent,
        };
        vec![l("/", 100, 100, None), l("/a", 60, 20, Some(0))]
    }

    fn bucket(max: u64, per_s: u64) -> WireAction {
        WireAction::Assign {
            strategy: WireStrategy::TokenBucket {
                max_tokens: max,
                tokens_per_fill: per_s,
                fill_interval_ns: S,
            },
            ttl_ns: Some(3 * S),
        }
    }

    const CHAIN: [usize; 2] = [1, 0];

    #[test]
    fn all_buckets_of_the_chain_or_none() {
        let mut c = Client::new(&limits(), 500 * MS, Fallback::Allow);
        let t0 = 10 * S;
        c.apply(1, &bucket(5, 10), t0);
        c.apply(0, &bucket(3, 10), t0);
        // The parent's bucket runs out first: 3 admitted, then refused there.
        for _ in 0..3 {
            assert_eq!(c.admit(&CHAIN, 1, t0), Admission::Admitted);
        }
        assert_eq!(
            c.admit(&CHAIN, 1, t0),
            Admission::Refused {
                limit: 0,
                remaining: 0,
                wait_ns: 100 * MS
            }
        );
        // The child's bucket was not charged for the refused request.
        assert_eq!(
            c.holding(1, t0),
            Some(Holding::Bucket {
                rate: 10.0,
                max: 5.0,
                tokens: 2.0
            })
        );
        // 100 ms later one token is back in each.
        let t1 = t0 + 100 * MS;
        assert_eq!(c.admit(&CHAIN, 1, t1), Admission::Admitted);
        // A cost of 3 with 2 tokens in the child: the deepest refuses first.
        assert_eq!(
            c.admit(&CHAIN, 3, t1),
            Admission::Refused {
                limit: 1,
                remaining: 2,
                wait_ns: 100 * MS
            }
        );
        // Counts in tokens, on both: 4 allowed, 1 + 3 denied; first report.
        let usage = |limit, allowed, denied, elapsed_ns| Usage {
            limit,
            allowed,
            denied,
            elapsed_ns,
        };
        assert_eq!(c.take_report(t1), [usage(0, 4, 4, 0), usage(1, 4, 4, 0)]);
        assert!(!c.report_due(t1 + 499 * MS));
        assert!(c.report_due(t1 + 500 * MS));
        assert_eq!(c.admit(&CHAIN, 0, t1 + 200 * MS), Admission::Admitted);
        assert_eq!(c.admit(&[1], 1, t1 + 200 * MS), Admission::Admitted);
        assert_eq!(
            c.take_report(t1 + 500 * MS),
            [usage(0, 0, 0, 500 * MS), usage(1, 1, 0, 500 * MS)]
        );
    }

    #[test]
    fn fallbacks_before_the_first_assignment_and_after_expiry() {
        let t0 = 10 * S;
        let mut allow = Client::new(&limits(), 500 * MS, Fallback::Allow);
        for _ in 0..1000 {
            assert_eq!(allow.admit(&CHAIN, 1, t0), Admission::Admitted);
        }
        assert_eq!(allow.holding(1, t0), Some(Holding::Fallback));
        assert!(allow.report_due(t0));
        let mut deny = Client::new(&limits(), 500 * MS, Fallback::Deny);
        assert_eq!(
            deny.admit(&CHAIN, 1, t0),
            Admission::Unassigned { limit: 1 }
        );
        // Denied requests are demand too.
        assert_eq!(deny.take_report(t0)[1].denied, 1);
        // A static share of 4 instances: `/a` 60/s burst 20 -> 15/s, 5 tokens
        // (the parent's 25/s, 25 tokens, has room).
        let mut share = Client::new(&limits(), 500 * MS, Fallback::Share(4));
        for _ in 0..5 {
            assert_eq!(share.admit(&CHAIN, 1, t0), Admission::Admitted);
        }
        assert_eq!(
            share.admit(&CHAIN, 1, t0),
            Admission::Refused {
                limit: 1,
                remaining: 0,
                wait_ns: 66_666_667
            }
        );
        // An assignment takes over (allow-all here), until its TTL runs out.
        let allow_all = WireAction::Assign {
            strategy: WireStrategy::AllowAll,
            ttl_ns: Some(3 * S),
        };
        share.apply(1, &allow_all, t0);
        share.apply(0, &allow_all, t0);
        for _ in 0..100 {
            assert_eq!(share.admit(&CHAIN, 1, t0 + S), Admission::Admitted);
        }
        assert_eq!(share.holding(1, t0 + 3 * S - 1), Some(Holding::AllowAll));
        assert_eq!(share.holding(1, t0 + 3 * S), Some(Holding::Fallback));
        // Back on the share's bucket, refilled (5 tokens) meanwhile.
        let t3 = t0 + 3 * S;
        for _ in 0..5 {
            assert_eq!(share.admit(&CHAIN, 1, t3), Admission::Admitted);
        }
        assert!(matches!(
            share.admit(&CHAIN, 1, t3),
            Admission::Refused { limit: 1, .. }
        ));
    }

    #[test]
    fn assignments_replace_extend_deny_and_abandon() {
        let t0 = 10 * S;
        let mut c = Client::new(&limits(), 500 * MS, Fallback::Allow);
        c.apply(1, &bucket(10, 10), t0);
        for _ in 0..6 {
            assert_eq!(c.admit(&[1], 1, t0), Admission::Admitted);
        }
        // The same strategy again: only the expiry moves (4 tokens stay).
        c.apply(1, &bucket(10, 10), t0 + 2 * S - 400 * MS);
        assert_eq!(
            c.holding(1, t0 + 2 * S),
            Some(Holding::Bucket {
                rate: 10.0,
                max: 10.0,
                tokens: 10.0
            })
        );
        assert_eq!(c.holding(1, t0 + 5 * S - 400 * MS), Some(Holding::Fallback));
        // Another bucket: the tokens left carry over, up to the new size.
        let mut c = Client::new(&limits(), 500 * MS, Fallback::Allow);
        c.apply(1, &bucket(10, 10), t0);
        for _ in 0..6 {
            c.admit(&[1], 1, t0);
        }
        c.apply(1, &bucket(3, 20), t0);
        assert_eq!(
            c.holding(1, t0),
            Some(Holding::Bucket {
                rate: 20.0,
                max: 3.0,
                tokens: 3.0
            })
        );
        c.apply(1, &bucket(8, 20), t0);
        assert_eq!(
            c.holding(1, t0),
            Some(Holding::Bucket {
                rate: 20.0,
                max: 8.0,
                tokens: 3.0
            })
        );
        // Deny-all refuses with no wait it can promise.
        let deny_all = WireAction::Assign {
            strategy: WireStrategy::DenyAll,
            ttl_ns: None,
        };
        c.apply(0, &deny_all, t0);
        assert_eq!(
            c.admit(&CHAIN, 1, t0),
            Admission::Refused {
                limit: 0,
                remaining: 0,
                wait_ns: u64::MAX
            }
        );
        // A TTL of 0 expires at once.
        c.apply(
            1,
            &WireAction::Assign {
                strategy: WireStrategy::AllowAll,
                ttl_ns: Some(0),
            },
            t0,
        );
        assert_eq!(c.holding(1, t0), Some(Holding::Fallback));
        // Abandoned: forgotten, no longer reported.
        c.apply(0, &WireAction::Abandon, t0);
        assert_eq!(c.holding(0, t0), None);
        let reported: Vec<usize> = c.take_report(t0).iter().map(|u| u.limit).collect();
        assert_eq!(reported, [1]);
    }

    #[test]
    fn reports_are_due_for_new_buckets_and_every_interval() {
        let t0 = 10 * S;
        let mut c = Client::new(&limits(), 500 * MS, Fallback::Allow);
        assert!(!c.report_due(t0));
        c.admit(&[1], 1, t0);
        assert!(c.report_due(t0));
        assert_eq!(c.take_report(t0 + MS)[0].elapsed_ns, 0);
        assert!(!c.report_due(t0 + 100 * MS));
        // A new bucket is reported at once, the others with their elapsed time.
        c.admit(&[0], 2, t0 + 100 * MS);
        assert!(c.report_due(t0 + 100 * MS));
        let r = c.take_report(t0 + 101 * MS);
        assert_eq!(
            r.iter()
                .map(|u| (u.limit, u.allowed, u.elapsed_ns))
                .collect::<Vec<_>>(),
            [(0, 2, 0), (1, 0, 100 * MS)]
        );
    }

    #[test]
    fn the_stream_reopens_after_one_interval_then_two() {
        let mut c = Client::new(&limits(), 500 * MS, Fallback::Allow);
        assert!(c.connect_due(0));
        c.stream_opened();
        assert!(c.stream_open() && !c.connect_due(S));
        assert_eq!(c.stream_closed(S), 500 * MS);
        assert!(!c.connect_due(S + 499 * MS) && c.connect_due(S + 500 * MS));
        c.stream_opened();
        assert_eq!(c.stream_closed(2 * S), S);
        assert_eq!(c.stream_closed(3 * S), S);
        c.stream_opened();
        c.stream_message();
        assert_eq!(c.stream_closed(4 * S), 500 * MS);
        // A tiny interval still waits the minimum.
        let mut fast = Client::new(&limits(), MS, Fallback::Allow);
        assert_eq!(fast.stream_closed(0), MIN_BACKOFF_NS);
    }

    #[test]
    fn a_reload_keeps_the_buckets_that_remain() {
        let t0 = 10 * S;
        let mut old = Client::new(&limits(), 500 * MS, Fallback::Allow);
        old.apply(1, &bucket(10, 10), t0);
        old.apply(0, &bucket(10, 10), t0);
        old.admit(&CHAIN, 4, t0);
        old.stream_opened();
        // The new bundle has only `/a`'s limit, now at index 0.
        let new_limits = vec![limits().remove(1)];
        let mut new = Client::new(&new_limits, 500 * MS, Fallback::Allow);
        new.inherit(&old, |i| (i == 1).then_some(0));
        assert!(new.stream_open());
        assert_eq!(
            new.holding(0, t0),
            Some(Holding::Bucket {
                rate: 10.0,
                max: 10.0,
                tokens: 6.0
            })
        );
        assert_eq!(new.known().collect::<Vec<_>>(), [0]);
        assert_eq!(new.take_report(t0)[0].allowed, 4);
    }
}
