//! The allocator of mode `assigned`: a pure function of (the fleet limits,
//! every client's latest usage report, the time) to a rate per bucket and
//! client. `tenantgate-rls` runs it every report interval; it is plain code
//! (no clock, no I/O) so that `tenantgate simulate` can run the same rule.
//! The rule, with a worked example, is in docs/fleet.md.
//!
//! # The rule
//!
//! For each limit name, the limits along the tenant tree form a tree whose
//! root has the fleet capacity `rate` per window (a top of a chain cannot
//! borrow). Each client's demand on a bucket is what it reported
//! (`allowed + denied`) scaled to one window, or at least the sum of its
//! demands on the buckets below (a client charging every bucket of a chain
//! reports the same request on each); a client's first report (no time
//! elapsed yet) asks for [`NEW_CLIENT_SHARE`] of the limit's rate. A node's
//! demand is the sum of its clients' (at least the sum of its children's).
//!
//! 1. Top-down, HTB over the aggregate demand: a node's allotment is split
//!    among its children and its own traffic (the part of its demand the
//!    children do not account for; rate: its rate not given to children).
//!    Each gets its `rate` as far as it asks for it; the spare goes to those
//!    asking for more, in proportion to their rates, up to their demand and
//!    `ceil`; what is still left goes to the children in proportion to their
//!    rates up to their `ceil` (headroom for demand that grows). Allotments
//!    are whole tokens per window, rounded down.
//! 2. Per node, bottom-up, among the clients that reported its bucket: each
//!    client first gets what it was assigned on the buckets below (a client
//!    charging every bucket of a chain needs as much on the parent's), then
//!    the rest of the allotment is shared max-min by the demand the client
//!    reported here beyond its demand below (a client asking less than an
//!    equal split keeps its demand, the rest is shared among the others),
//!    and what is still left is split equally. Rounded down, so a bucket's
//!    assignments never add up to more than its allotment, and children's
//!    allotments never to more than their parent's.
//!
//! Reports older than the TTL given are of clients that are gone: they are
//! left out.

use std::collections::BTreeMap;

use super::FleetLimit;

/// Reports live this many report intervals; assignments too
/// (`assignment_time_to_live`). A client's interval is the bundle's
/// `report_interval_ms` or the longest `time_elapsed` it reported, whichever
/// is longer: Envoy's own RLQS filter reports every 5 s whatever its
/// `reporting_interval` says.
pub const TTL_INTERVALS: u64 = 3;

/// What a new client (its first report, no time elapsed) asks for: this
/// fraction of the limit's rate, at least one token per window.
pub const NEW_CLIENT_SHARE: f64 = 0.1;

/// Slack for float rounding before taking whole tokens.
const EPS: f64 = 1e-6;

/// One client's latest report for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub allowed: u64,
    pub denied: u64,
    /// The time the counts cover, in milliseconds; 0: the client's first
    /// report (it has no usage yet).
    pub elapsed_ms: u64,
    /// When the report was received, in milliseconds on the caller's clock.
    pub at_ms: u64,
}

/// Every client's latest report, by (index in the fleet limits, client id).
pub type Reports = BTreeMap<(usize, String), Usage>;

/// One client's assignment for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// Tokens per window of the limit.
    pub rate: u64,
    /// Bucket size: the limit's `burst` scaled by this client's part of the
    /// node's allotment (at least 1 when `rate` is not 0), so the fleet's
    /// buckets hold `burst` tokens in all.
    pub burst: u64,
}

/// The result of one allocation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    /// Per fleet limit (same index): its aggregate demand, tokens per window.
    pub demand: Vec<f64>,
    /// Per fleet limit: its allotment, tokens per window.
    pub allotment: Vec<u64>,
    /// Per (fleet limit, client) that reported it.
    pub clients: BTreeMap<(usize, String), Assignment>,
}

impl Allocation {
    pub fn get(&self, limit: usize, client: &str) -> Option<Assignment> {
        self.clients.get(&(limit, client.to_owned())).copied()
    }
}

/// One class sharing an amount: a weight, a cap, and what it got so far.
#[derive(Debug, Clone, Copy)]
struct Class {
    weight: f64,
    cap: f64,
    got: f64,
}

/// Splits `amount` among `classes` in proportion to their weights, none
/// above its cap; what a capped class leaves goes to the others. Returns
/// what is left over.
fn water_fill(amount: f64, classes: &mut [Class]) -> f64 {
    let mut left = amount.max(0.0);
    let mut active: Vec<usize> = (0..classes.len())
        .filter(|&i| {
            classes
                .get(i)
                .is_some_and(|c| c.weight > 0.0 && c.cap - c.got > EPS)
        })
        .collect();
    while left > EPS && !active.is_empty() {
        let total: f64 = active
            .iter()
            .filter_map(|&i| classes.get(i))
            .map(|c| c.weight)
            .sum();
        let per = left / total;
        let capped: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&i| {
                classes
                    .get(i)
                    .is_some_and(|c| c.cap - c.got <= c.weight * per)
            })
            .collect();
        if capped.is_empty() {
            for &i in &active {
                if let Some(c) = classes.get_mut(i) {
                    c.got += c.weight * per;
                }
            }
            return 0.0;
        }
        for &i in &capped {
            if let Some(c) = classes.get_mut(i) {
                left -= c.cap - c.got;
                c.got = c.cap;
            }
        }
        active.retain(|i| !capped.contains(i));
    }
    left.max(0.0)
}

/// Whole tokens, never adding up to more than `total` (float slack forgiven
/// upwards only where it does not break that).
fn whole(values: &[f64], total: u64) -> Vec<u64> {
    let mut out: Vec<u64> = values
        .iter()
        .map(|v| (v + EPS).floor().max(0.0) as u64)
        .collect();
    let mut sum: u64 = out.iter().sum();
    while sum > total {
        // Take the excess from the largest.
        let Some(max) = out.iter_mut().max() else {
            break;
        };
        let take = (sum - total).min(*max);
        *max -= take;
        sum -= take;
    }
    out
}

/// A report's demand in tokens per window of `per_s` seconds.
fn demand_of(u: &Usage, limit: &FleetLimit) -> f64 {
    if u.elapsed_ms == 0 {
        return (limit.rate as f64 * NEW_CLIENT_SHARE).max(1.0);
    }
    let n = u.allowed.saturating_add(u.denied) as f64;
    n * (limit.per_s as f64 * 1000.0) / u.elapsed_ms as f64
}

/// Allocates every fleet limit's capacity to the clients that reported its
/// bucket. `limits`: parents before children, `parent` set (as
/// [`super::FleetLimits::all`]); reports received before `now_ms - ttl_ms`
/// are left out.
pub fn allocate(limits: &[FleetLimit], reports: &Reports, now_ms: u64, ttl_ms: u64) -> Allocation {
    let n = limits.len();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, l) in limits.iter().enumerate() {
        if let Some(kids) = l.parent.and_then(|p| children.get_mut(p)) {
            kids.push(i);
        }
    }
    let live = reports.iter().filter(|(_, u)| {
        u.at_ms.saturating_add(ttl_ms) >= now_ms && u.at_ms <= now_ms.saturating_add(ttl_ms)
    });
    // Per node: client -> its demand (own report, or its children's sum).
    let mut per_client: Vec<BTreeMap<&str, f64>> = vec![BTreeMap::new(); n];
    let mut reported: Vec<Vec<&str>> = vec![Vec::new(); n];
    for ((i, client), u) in live {
        if let (Some(l), Some(m), Some(r)) =
            (limits.get(*i), per_client.get_mut(*i), reported.get_mut(*i))
        {
            m.insert(client.as_str(), demand_of(u, l));
            r.push(client.as_str());
        }
    }
    // What each client reported itself, before the demands below are added.
    let own_reports = per_client.clone();
    let mut demand = vec![0.0; n];
    // Children come after parents: bottom-up is the reverse order.
    for i in (0..n).rev() {
        let kids = children.get(i).cloned().unwrap_or_default();
        let mut below: BTreeMap<&str, f64> = BTreeMap::new();
        for k in &kids {
            for (c, d) in per_client.get(*k).into_iter().flatten() {
                *below.entry(c).or_default() += d;
            }
        }
        if let Some(m) = per_client.get_mut(i) {
            for (c, d) in below {
                let e = m.entry(c).or_default();
                *e = e.max(d);
            }
        }
        let own: f64 = per_client.get(i).map_or(0.0, |m| m.values().sum());
        let kids_sum: f64 = kids.iter().filter_map(|k| demand.get(*k)).sum();
        if let Some(d) = demand.get_mut(i) {
            *d = own.max(kids_sum);
        }
    }
    // Top-down: allotments.
    let mut allotment = vec![0u64; n];
    for (i, l) in limits.iter().enumerate() {
        if l.parent.is_none() {
            if let Some(a) = allotment.get_mut(i) {
                *a = l.rate;
            }
        }
        let kids = children.get(i).cloned().unwrap_or_default();
        if kids.is_empty() {
            continue;
        }
        let g = allotment.get(i).copied().unwrap_or(0);
        let own_demand = demand.get(i).copied().unwrap_or(0.0);
        let shares = split_node(l, own_demand, g, &kids, limits, &demand);
        for (k, s) in kids.iter().zip(whole(&shares, g)) {
            if let Some(a) = allotment.get_mut(*k) {
                *a = s;
            }
        }
    }
    // Per node, bottom-up: a client's assignment is what it was given on
    // the buckets below (a client charging the whole chain needs that much
    // here too), plus its max-min share of the rest by its own demand here.
    let mut assigned: Vec<BTreeMap<&str, u64>> = vec![BTreeMap::new(); n];
    let mut clients = BTreeMap::new();
    for i in (0..n).rev() {
        let (Some(l), Some(names)) = (limits.get(i), reported.get(i)) else {
            continue;
        };
        let g = allotment.get(i).copied().unwrap_or(0);
        let kids = children.get(i).map(Vec::as_slice).unwrap_or_default();
        let below = |c: &str| -> (u64, f64) {
            kids.iter().fold((0, 0.0), |(a, d), k| {
                let a2 = assigned
                    .get(*k)
                    .and_then(|m| m.get(c))
                    .copied()
                    .unwrap_or(0);
                let d2 = per_client
                    .get(*k)
                    .and_then(|m| m.get(c))
                    .copied()
                    .unwrap_or(0.0);
                (a + a2, d + d2)
            })
        };
        let (base, own): (Vec<u64>, Vec<f64>) = names
            .iter()
            .map(|c| {
                let (a, d) = below(c);
                let mine = own_reports
                    .get(i)
                    .and_then(|m| m.get(c))
                    .copied()
                    .unwrap_or(0.0);
                (a, (mine - d).max(0.0))
            })
            .unzip();
        let rest = g.saturating_sub(base.iter().sum());
        let extra = whole(&max_min(rest as f64, &own), rest);
        let mut here = BTreeMap::new();
        for ((c, b), e) in names.iter().zip(base).zip(extra) {
            let rate = b.saturating_add(e);
            let burst = if rate == 0 {
                0
            } else {
                let scaled = u128::from(l.burst) * u128::from(rate) / u128::from(g.max(1));
                u64::try_from(scaled).unwrap_or(u64::MAX).max(1)
            };
            here.insert(*c, rate);
            clients.insert((i, (*c).to_owned()), Assignment { rate, burst });
        }
        if let Some(m) = assigned.get_mut(i) {
            *m = here;
        }
    }
    Allocation {
        demand,
        allotment,
        clients,
    }
}

/// HTB at one node: its allotment `g` split among its children `kids` (and
/// its own traffic, whose share is not returned).
fn split_node(
    node: &FleetLimit,
    node_demand: f64,
    g: u64,
    kids: &[usize],
    limits: &[FleetLimit],
    demand: &[f64],
) -> Vec<f64> {
    let g = g as f64;
    let d = |i: usize| demand.get(i).copied().unwrap_or(0.0);
    // Per class: (guaranteed rate, weight, ceil, demand).
    let mut classes: Vec<(f64, f64, f64, f64)> = kids
        .iter()
        .filter_map(|k| {
            limits
                .get(*k)
                .map(|l| (l.rate as f64, l.rate as f64, l.ceil as f64, d(*k)))
        })
        .collect();
    let kid_rates: f64 = classes.iter().map(|c| c.0).sum();
    let kid_demand: f64 = classes.iter().map(|c| c.3).sum();
    let own_demand = (node_demand - kid_demand).max(0.0);
    // The node's own traffic: the rate it keeps (its weight at least a
    // token's, so it can borrow), its demand beyond the children's.
    let own_rate = (node.rate as f64 - kid_rates).max(0.0);
    classes.push((own_rate, own_rate.max(1.0), g, own_demand));
    // 1. Each its rate, as far as it asks.
    let mut got: Vec<f64> = classes
        .iter()
        .map(|(r, _, c, d)| r.min(*d).min(*c))
        .collect();
    let given: f64 = got.iter().sum();
    if given > g {
        // Only when the allotment is below the guarantees (float slack).
        for x in &mut got {
            *x *= g / given;
        }
    }
    // 2. The spare to those asking for more, by rate, up to demand and ceil.
    let mut borrow: Vec<Class> = classes
        .iter()
        .zip(&got)
        .map(|((_, w, c, d), x)| Class {
            weight: *w,
            cap: d.min(*c).max(*x),
            got: *x,
        })
        .collect();
    let left = water_fill(g - got.iter().sum::<f64>(), &mut borrow);
    // 3. The rest to the children, by rate, up to ceil.
    borrow.pop();
    let mut rest: Vec<Class> = borrow
        .iter()
        .zip(&classes)
        .map(|(b, (_, w, c, _))| Class {
            weight: *w,
            cap: *c,
            got: b.got,
        })
        .collect();
    water_fill(left, &mut rest);
    rest.iter().map(|c| c.got).collect()
}

/// Max-min fair shares of `amount` by `wants`, then what is left split
/// equally.
fn max_min(amount: f64, wants: &[f64]) -> Vec<f64> {
    let mut classes: Vec<Class> = wants
        .iter()
        .map(|w| Class {
            weight: 1.0,
            cap: w.max(0.0),
            got: 0.0,
        })
        .collect();
    let left = water_fill(amount, &mut classes);
    if left > EPS && !classes.is_empty() {
        let each = left / classes.len() as f64;
        for c in &mut classes {
            c.got += each;
        }
    }
    classes.iter().map(|c| c.got).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantPath;
    use proptest::prelude::*;

    const NOW: u64 = 1_000_000;
    const TTL: u64 = 1_500;

    /// A fleet limit `rps` (one-second window) on `tenant`.
    fn lim(tenant: &str, rate: u64, ceil: u64, burst: u64, parent: Option<usize>) -> FleetLimit {
        FleetLimit {
            tenant: TenantPath::parse(tenant).unwrap(),
            name: "rps".into(),
            rate,
            ceil,
            burst,
            per_s: 1,
            parent,
        }
    }

    /// Client `c` sent `n` requests (allowed or denied) over the last second
    /// to a tenant whose chain holds `buckets`: it reports `n` on each.
    fn send(r: &mut Reports, c: &str, buckets: &[usize], allowed: u64, denied: u64) {
        for b in buckets {
            r.insert(
                (*b, c.to_owned()),
                Usage {
                    allowed,
                    denied,
                    elapsed_ms: 1000,
                    at_ms: NOW,
                },
            );
        }
    }

    /// `(rate, burst)` per client of bucket `i`, by client name.
    fn of(a: &Allocation, i: usize) -> Vec<(&str, u64, u64)> {
        a.clients
            .iter()
            .filter(|((b, _), _)| *b == i)
            .map(|((_, c), x)| (c.as_str(), x.rate, x.burst))
            .collect()
    }

    /// `/` 300 (the fleet capacity); `/a` rate 200, ceil 300, burst 60;
    /// `/b` rate 100, ceil 300, burst 30.
    fn siblings() -> Vec<FleetLimit> {
        vec![
            lim("/", 300, 300, 300, None),
            lim("/a", 200, 300, 60, Some(0)),
            lim("/b", 100, 300, 30, Some(0)),
        ]
    }

    #[test]
    fn worked_example_in_docs() {
        // `/a` asks 350/s, spread 70/20/10 over i1, i2, i3; `/b` asks 60/s on i1.
        let l = siblings();
        let mut r = Reports::new();
        send(&mut r, "i1", &[1, 0], 200, 45);
        send(&mut r, "i2", &[1, 0], 70, 0);
        send(&mut r, "i3", &[1, 0], 35, 0);
        send(&mut r, "i1b", &[2, 0], 60, 0);
        let a = allocate(&l, &r, NOW, TTL);
        assert_eq!(a.demand, [410.0, 350.0, 60.0]);
        // `/b` asks less than its rate: it gets its demand; `/a` its rate and
        // the 40 left, short of its ceil.
        assert_eq!(a.allotment, [300, 240, 60]);
        assert_eq!(of(&a, 1), [("i1", 135, 33), ("i2", 70, 17), ("i3", 35, 8)]);
        assert_eq!(of(&a, 2), [("i1b", 60, 30)]);
        assert_eq!(
            of(&a, 0),
            [
                ("i1", 135, 135),
                ("i1b", 60, 60),
                ("i2", 70, 70),
                ("i3", 35, 35)
            ]
        );
    }

    #[test]
    fn guarantee_borrowing_and_proportional_spare() {
        let l = vec![
            lim("/", 450, 450, 450, None),
            lim("/a", 200, 300, 60, Some(0)),
            lim("/b", 100, 300, 30, Some(0)),
        ];
        // (a's demand, b's demand) -> (a's allotment, b's allotment)
        let table: [((u64, u64), [u64; 2]); 5] = [
            // Both under their rates: each its demand, the other 350 as headroom
            // by rate (2:1): 50 + 233.3, 50 + 116.7, rounded down.
            ((50, 50), [283, 166]),
            // b borrows; a keeps its demand under its rate.
            ((150, 400), [150, 300]),
            // Both borrow: the spare 150 goes 2:1 by rate, a stops at its ceil.
            ((400, 400), [300, 150]),
            // An idle sibling: b borrows up to its ceil; a gets the headroom.
            ((0, 400), [150, 300]),
            // Demand over both ceils: ceils hold.
            ((1000, 1000), [300, 150]),
        ];
        for ((da, db), want) in table {
            let mut r = Reports::new();
            send(&mut r, "x", &[1, 0], da, 0);
            send(&mut r, "y", &[2, 0], db, 0);
            let a = allocate(&l, &r, NOW, TTL);
            assert_eq!([a.allotment[1], a.allotment[2]], want, "demand {da}/{db}");
            assert!(a.allotment[1] + a.allotment[2] <= 450);
        }
    }

    #[test]
    fn a_parent_caps_its_subtree() {
        // `/p` (rate 300, ceil 400) holds `/p/a` and `/p/b` (ceil 400 each);
        // `/q` is idle. The root has 1000.
        let l = vec![
            lim("/", 1000, 1000, 1000, None),
            lim("/p", 300, 400, 60, Some(0)),
            lim("/p/a", 200, 400, 40, Some(1)),
            lim("/p/b", 100, 400, 20, Some(1)),
            lim("/q", 500, 1000, 100, Some(0)),
        ];
        let mut r = Reports::new();
        send(&mut r, "c1", &[2, 1, 0], 1000, 0);
        send(&mut r, "c2", &[3, 1, 0], 1000, 0);
        let a = allocate(&l, &r, NOW, TTL);
        // `/p` stops at its ceil 400 though the root has 600 more (headroom
        // for the idle `/q`); inside it the spare 100 goes 2:1.
        assert_eq!(a.allotment, [1000, 400, 266, 133, 600]);
        assert_eq!(of(&a, 2), [("c1", 266, 40)]);
        assert_eq!(of(&a, 3), [("c2", 133, 20)]);
        // A client needs on the parent's bucket what it has below.
        assert_eq!(of(&a, 1), [("c1", 266, 39), ("c2", 133, 19)]);
        assert_eq!(of(&a, 0), [("c1", 566, 566), ("c2", 433, 433)]);
    }

    #[test]
    fn max_min_among_clients() {
        let l = vec![lim("/", 100, 100, 100, None)];
        // (demands, assigned rates)
        let table: [(&[u64], &[u64]); 4] = [
            // 70/20/10 of exactly the capacity: each its demand.
            (&[70, 20, 10], &[70, 20, 10]),
            // 70/20/10 of twice the capacity: max-min, 40/40/20.
            (&[140, 40, 20], &[40, 40, 20]),
            // Under the capacity: the rest equally (33.3 each).
            (&[35, 10, 5], &[51, 26, 21]),
            // Nobody asks: equal shares.
            (&[0, 0, 0], &[33, 33, 33]),
        ];
        for (demands, want) in table {
            let mut r = Reports::new();
            for (k, d) in demands.iter().enumerate() {
                send(&mut r, &format!("i{k}"), &[0], *d, 0);
            }
            let a = allocate(&l, &r, NOW, TTL);
            let got: Vec<u64> = of(&a, 0).iter().map(|x| x.1).collect();
            assert_eq!(got, want, "demands {demands:?}");
        }
    }

    #[test]
    fn denied_requests_count_as_demand() {
        let l = vec![lim("/", 100, 100, 100, None)];
        let mut r = Reports::new();
        send(&mut r, "i0", &[0], 30, 50);
        send(&mut r, "i1", &[0], 20, 0);
        let a = allocate(&l, &r, NOW, TTL);
        assert_eq!(of(&a, 0), [("i0", 80, 80), ("i1", 20, 20)]);
    }

    #[test]
    fn a_new_client_starts_small_and_a_gone_one_is_dropped() {
        let l = vec![lim("/", 200, 200, 200, None)];
        let mut r = Reports::new();
        send(&mut r, "old1", &[0], 100, 0);
        send(&mut r, "old2", &[0], 100, 0);
        let first = Usage {
            allowed: 0,
            denied: 0,
            elapsed_ms: 0,
            at_ms: NOW,
        };
        r.insert((0, "new".into()), first);
        let a = allocate(&l, &r, NOW, TTL);
        // The new one asks 10% of the rate (20); the others share the rest.
        assert_eq!(
            of(&a, 0),
            [("new", 20, 20), ("old1", 90, 90), ("old2", 90, 90)]
        );
        // old2's last report is older than the TTL: it is gone.
        r.remove(&(0, "new".to_owned()));
        r.get_mut(&(0, "old2".to_owned())).unwrap().at_ms = NOW - TTL - 1;
        send(&mut r, "old1", &[0], 50, 0);
        let a = allocate(&l, &r, NOW, TTL);
        assert_eq!(of(&a, 0), [("old1", 200, 200)]);
        // A report over a longer interval is scaled to the window: 300 over
        // 2 s is 150/s.
        r.insert(
            (0, "old1".into()),
            Usage {
                allowed: 300,
                denied: 0,
                elapsed_ms: 2000,
                at_ms: NOW,
            },
        );
        assert_eq!(allocate(&l, &r, NOW, TTL).demand, [150.0]);
    }

    #[test]
    fn leaf_only_clients_share_by_the_tree() {
        // Envoy's own RLQS filter charges one bucket per request: clients
        // that report only the leaves still get the HTB split.
        let l = siblings();
        let mut r = Reports::new();
        send(&mut r, "e1", &[1], 500, 0);
        send(&mut r, "e2", &[2], 500, 0);
        let a = allocate(&l, &r, NOW, TTL);
        assert_eq!(a.demand, [1000.0, 500.0, 500.0]);
        assert_eq!(a.allotment, [300, 200, 100]);
        assert_eq!(of(&a, 1), [("e1", 200, 60)]);
        assert_eq!(of(&a, 2), [("e2", 100, 30)]);
        assert!(of(&a, 0).is_empty());
    }

    /// A random valid tree (parents first) and random clients, each sending
    /// to one node and reporting on its whole chain.
    fn tree_and_reports() -> impl Strategy<Value = (Vec<FleetLimit>, Reports)> {
        let nodes = prop::collection::vec((0usize..8, 1u64..100, 0u64..100, 1u64..50), 1..8);
        let clients = prop::collection::vec((0usize..8, 0u64..400, 0u64..100), 0..8);
        (nodes, clients).prop_map(|(nodes, clients)| {
            let mut l: Vec<FleetLimit> = Vec::new();
            // Per node: its rate still unreserved by children.
            let mut free: Vec<u64> = Vec::new();
            for (k, (p, r, c, b)) in nodes.into_iter().enumerate() {
                let parent = (k > 0).then(|| p % k).filter(|p| free[*p] > 0);
                let (rate, ceil) = match parent {
                    None => (r * 10, r * 10),
                    Some(p) => {
                        let rate = (r * 10).min(free[p]);
                        let ceil = (rate + c * 5).min(l[p].ceil);
                        free[p] -= rate;
                        (rate, ceil)
                    }
                };
                l.push(lim(&format!("/n{k}"), rate, ceil.max(rate), b, parent));
                free.push(rate);
            }
            let mut r = Reports::new();
            for (k, (node, allowed, denied)) in clients.into_iter().enumerate() {
                let mut cur = Some(node % l.len());
                while let Some(i) = cur {
                    send(&mut r, &format!("c{k}"), &[i], allowed, denied);
                    cur = l[i].parent;
                }
            }
            (l, r)
        })
    }

    proptest! {
        #[test]
        fn never_above_capacity_and_guarantees_hold((l, r) in tree_and_reports()) {
            let a = allocate(&l, &r, NOW, TTL);
            for (i, x) in l.iter().enumerate() {
                let g = a.allotment[i];
                match x.parent {
                    None => prop_assert_eq!(g, x.rate),
                    Some(_) => prop_assert!(g <= x.ceil, "node {} got {} over its ceil {}", i, g, x.ceil),
                }
                let kids: u64 = l.iter().enumerate().filter(|(_, k)| k.parent == Some(i)).map(|(k, _)| a.allotment[k]).sum();
                prop_assert!(kids <= g, "children of {} got {} of {}", i, kids, g);
                let clients: u64 = of(&a, i).iter().map(|c| c.1).sum();
                prop_assert!(clients <= g, "clients of {} got {} of {}", i, clients, g);
                // A node asking at most its rate gets its demand.
                let d = a.demand[i];
                if d <= x.rate as f64 {
                    prop_assert!(g as f64 + EPS >= d.floor(), "node {} asked {} under its rate {}, got {}", i, d, x.rate, g);
                }
                // A leaf's clients each get at least their demand then.
                let leaf = !l.iter().any(|k| k.parent == Some(i));
                if leaf && d <= x.rate as f64 {
                    for (c, rate, _) in of(&a, i) {
                        let u = r[&(i, c.to_owned())];
                        prop_assert!(rate >= u.allowed + u.denied, "client {} of {} asked {}, got {}", c, i, u.allowed + u.denied, rate);
                    }
                }
            }
        }
    }
}
