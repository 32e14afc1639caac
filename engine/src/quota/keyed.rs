//! Keyed limits: one token bucket per distinct value of a key (a principal,
//! an API key) in a table whose size does not grow with the values seen.
//!
//! Shared data can never delete a key, so one key per value would be a leak
//! any client can drive. Instead a keyed limit owns a fixed set of shared-data
//! keys, its *sets* (`max_keys / WAYS`, rounded up), each holding [`WAYS`]
//! fixed-size entries:
//!
//! - a value is hashed with a secret per-process seed ([`Fingerprint`]): the
//!   hash picks the set and is the entry's 64-bit fingerprint (values are
//!   never stored);
//! - an entry holds the bucket (tokens in units, as local buckets do), when it
//!   was last refilled, when it was last used, and the generation of the limit
//!   it was made for (a reload that changes the limit's numbers resets
//!   entries lazily, in place);
//! - a value without an entry takes one in its set: an empty one, else one
//!   made for other numbers, else the least recently used among those whose
//!   bucket has refilled to its burst (reclaiming it loses nothing), else the
//!   least recently used of the set. The new entry starts full.
//!
//! Every admission reads one set, decides, and writes it back with
//! compare-and-swap (retried on conflict): exact under concurrency like the
//! other buckets. Keyed buckets do not borrow and are never leased.
//!
//! Accuracy (docs/reference.md): a reclaimed value comes back with a full
//! bucket, so a client cycling through more values than the table holds can
//! gain up to one burst per reclaimed entry that was not full; entries that
//! had refilled are taken first, so with at most `max_keys` active values
//! nothing is gained. Two values with the same fingerprint share a bucket
//! (probability about `n^2 / 2^65` for `n` live values).

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::spec::{KeySource, KeySpec, Limit, Missing};
use super::{BucketStore, LimitStatus, Nanos, QuotaDecision, QuotaModel, StoreError, MAX_ATTEMPTS};
use crate::tenant::TenantPath;

/// Entries per set.
pub const WAYS: usize = 8;
/// Encoding tag of a set's value.
const TAG: u8 = 3;
/// fingerprint, tokens, last refill, last use, generation.
const ENTRY_LEN: usize = 8 + 16 + 8 + 8 + 4;
/// Length of a set's value.
pub const SET_LEN: usize = 1 + WAYS * ENTRY_LEN;

/// The secret that keyed hashes are made with: the same in every VM of a
/// process (it lives in shared data), unknown to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    seed: [u8; 16],
}

/// Shared-data key of the per-process seed.
pub const SEED_KEY: &str = "tenantgate:keyed:seed:v1";

impl Fingerprint {
    #[cfg(test)]
    pub fn with_seed(seed: [u8; 16]) -> Fingerprint {
        Fingerprint { seed }
    }

    /// The process's seed from the store, created (from `fresh`) if it is
    /// not there yet. Every VM reads it back after creating it, so all use
    /// the value that was stored. Envoy has no create-if-absent (a set on a
    /// missing key ignores compare-and-swap): two VMs that create it at the
    /// same instant may each read back their own. The filter reads it at
    /// configure time, where the main thread's VM comes first and creates
    /// it before the workers' VMs start.
    pub fn from_store(store: &dyn BucketStore, fresh: [u8; 16]) -> Result<Fingerprint, StoreError> {
        for _ in 0..2 {
            if let Some((bytes, _)) = store.get(SEED_KEY)? {
                if let Ok(seed) = <[u8; 16]>::try_from(bytes.as_slice()) {
                    return Ok(Fingerprint { seed });
                }
            }
            store.set(SEED_KEY, &fresh, 0)?;
        }
        Err(StoreError::Corrupt(format!(
            "`{SEED_KEY}` is not a 16-byte seed"
        )))
    }

    /// The 64-bit keyed hash of `value` (never 0: 0 marks an empty entry).
    pub fn of(&self, limit_key: &str, value: &[u8]) -> u64 {
        let mut h = Sha256::new();
        h.update(self.seed);
        h.update((limit_key.len() as u64).to_le_bytes());
        h.update(limit_key.as_bytes());
        h.update(value);
        let d = h.finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(d.get(..8).unwrap_or(&[0; 8]));
        u64::from_le_bytes(b).max(1)
    }
}

/// A keyed limit of the bundle: its declaration and its table.
#[derive(Debug, Clone)]
pub struct Keyed {
    limit: Arc<Limit>,
    spec: KeySpec,
    table: KeyedTable,
}

impl Keyed {
    pub(crate) fn new(limit: Arc<Limit>) -> Option<Keyed> {
        let spec = limit.keyed.clone()?;
        let p = &limit.params;
        let table = KeyedTable::new(limit.key.clone(), p.rate, p.burst, p.per_ns, spec.max_keys);
        Some(Keyed { limit, spec, table })
    }

    pub fn spec(&self) -> &KeySpec {
        &self.spec
    }

    pub fn tenant(&self) -> &TenantPath {
        &self.limit.node
    }

    pub fn name(&self) -> &str {
        &self.limit.name
    }

    pub fn table(&self) -> &KeyedTable {
        &self.table
    }

    /// The request header it counts by; `None` when it counts by principal.
    pub fn header(&self) -> Option<&str> {
        match &self.spec.source {
            KeySource::Header(h) => Some(h),
            KeySource::Principal => None,
        }
    }

    /// True if it applies to requests to `tenant` (declared on it or an
    /// ancestor).
    pub fn applies_to(&self, tenant: &TenantPath) -> bool {
        tenant.is_within(&self.limit.node)
    }

    /// The key value of a request: the principal id or a header's value.
    fn value<'a>(
        &self,
        principal: Option<&'a str>,
        headers: &'a [(String, String)],
    ) -> Option<&'a str> {
        match &self.spec().source {
            KeySource::Principal => principal,
            KeySource::Header(h) => headers
                .iter()
                .find(|(k, _)| k == h)
                .map(|(_, v)| v.as_str()),
        }
        .filter(|v| !v.is_empty())
    }

    fn status(&self, d: &KeyedDecision) -> LimitStatus {
        let p = &self.limit.params;
        LimitStatus {
            name: Arc::clone(&self.limit.name),
            rate: p.rate,
            burst: p.burst,
            window_s: p.per_ns / 1_000_000_000,
            remaining: d.remaining,
            reset_s: super::bucket::ceil_seconds(d.reset_ns),
            borrowed: false,
        }
    }
}

impl QuotaDecision {
    /// This admitted decision with the statuses of the keyed limits that
    /// admitted the request too.
    pub fn with_keyed(mut self, keyed: Vec<LimitStatus>, cost: u64) -> QuotaDecision {
        if keyed.is_empty() {
            return self;
        }
        let least = keyed.iter().map(|s| s.remaining).min().unwrap_or(0);
        self.remaining = if self.limits.is_empty() {
            least
        } else {
            self.remaining.min(least)
        };
        self.cost = cost;
        self.limits.extend(keyed);
        self.limits.sort_by(|a, b| a.name.cmp(&b.name));
        self
    }
}

/// What the keyed limits say about one request.
#[derive(Debug)]
pub enum KeyedOutcome {
    /// Admitted by every keyed limit that applies (none may apply): their
    /// statuses, and what was charged (to give back if another limit refuses).
    Admitted(Vec<LimitStatus>, KeyedCharges),
    /// Refused by one (nothing charged).
    Refused(QuotaDecision),
    /// A keyed limit without `"missing": "skip"` and no value: the 400's message.
    Missing(String),
}

/// What keyed admissions charged: (keyed limit index, fingerprint, cost).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyedCharges(Vec<(usize, u64, u64)>);

impl KeyedCharges {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl QuotaModel {
    /// The keyed limits that apply to a request to `tenant`: those declared on
    /// it or an ancestor (index, limit), parents first.
    fn keyed_for<'a>(
        &'a self,
        tenant: &'a TenantPath,
    ) -> impl Iterator<Item = (usize, &'a Keyed)> + 'a {
        self.keyed
            .iter()
            .enumerate()
            .filter(move |(_, k)| k.applies_to(tenant))
    }

    /// Every keyed limit of the bundle, parents first.
    pub fn keyed(&self) -> &[Keyed] {
        &self.keyed
    }

    /// The headers the keyed limits that apply to requests to `tenant`
    /// count by, each once: a request to a tenant without a keyed limit
    /// reads none.
    pub fn keyed_headers_for<'a>(
        &'a self,
        tenant: &'a TenantPath,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.keyed_headers
            .iter()
            .filter(move |h| {
                self.keyed_for(tenant)
                    .any(|(_, k)| matches!(&k.spec().source, KeySource::Header(name) if name == *h))
            })
            .map(String::as_str)
    }

    /// Admission against the keyed limits of `tenant`: all of them or none.
    #[allow(clippy::too_many_arguments)]
    pub fn admit_keyed(
        &self,
        fingerprint: &Fingerprint,
        tenant: &TenantPath,
        principal: Option<&str>,
        headers: &[(String, String)],
        cost: u64,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Result<KeyedOutcome, StoreError> {
        let mut statuses = Vec::new();
        let mut charged = KeyedCharges::default();
        if self.keyed.is_empty() || cost == 0 {
            return Ok(KeyedOutcome::Admitted(statuses, charged));
        }
        for (i, k) in self.keyed_for(tenant) {
            let Some(value) = k.value(principal, headers) else {
                if k.spec().missing == Missing::Skip {
                    continue;
                }
                self.refund_keyed(&charged, store)?;
                return Ok(KeyedOutcome::Missing(format!(
                    "limit `{}` of `{}` counts by {}, and the request has none",
                    k.name(),
                    k.tenant(),
                    k.spec().source
                )));
            };
            let fp = fingerprint.of(&k.table.prefix, value.as_bytes());
            let d = match k.table.admit(fp, cost, now, store) {
                Ok(d) => d,
                Err(e) => {
                    self.refund_keyed(&charged, store)?;
                    return Err(e);
                }
            };
            if !d.admitted {
                self.refund_keyed(&charged, store)?;
                let status = k.status(&d);
                return Ok(KeyedOutcome::Refused(QuotaDecision {
                    admitted: false,
                    limit: Some(k.name().to_string()),
                    tenant: Some(k.tenant().clone()),
                    remaining: d.remaining,
                    retry_after_s: super::bucket::ceil_seconds(d.wait_ns).max(1),
                    admissible_at: Some(now.saturating_add(d.wait_ns)),
                    cost,
                    limits: vec![status],
                }));
            }
            charged.0.push((i, fp, cost));
            statuses.push(k.status(&d));
        }
        Ok(KeyedOutcome::Admitted(statuses, charged))
    }

    /// Gives back what keyed admissions charged.
    pub fn refund_keyed(
        &self,
        charged: &KeyedCharges,
        store: &dyn BucketStore,
    ) -> Result<(), StoreError> {
        for (i, fp, cost) in &charged.0 {
            if let Some(k) = self.keyed.get(*i) {
                k.table.refund(*fp, *cost, store)?;
            }
        }
        Ok(())
    }
}

/// One keyed limit as compiled: its numbers and where its sets live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedTable {
    /// Prefix of its sets' shared-data keys (`...:<set index>`); stable
    /// across reloads that change the limit's numbers.
    pub prefix: String,
    pub rate: u64,
    pub burst: u64,
    pub per_ns: u64,
    pub max_keys: u32,
    /// Number of sets: `max_keys / WAYS`, rounded up.
    pub sets: u32,
    /// Changes when the numbers change: entries of another generation are
    /// reset (full) when next used.
    pub generation: u32,
}

/// A keyed admission's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyedDecision {
    pub admitted: bool,
    /// Whole tokens left for this value (after the charge when admitted).
    pub remaining: u64,
    /// When refused: nanoseconds until a request of this cost could pass.
    pub wait_ns: u64,
    /// Nanoseconds until the bucket is full again with no other traffic.
    pub reset_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Entry {
    fp: u64,
    tokens: i128,
    last: Nanos,
    used: Nanos,
    generation: u32,
}

impl KeyedTable {
    pub fn new(prefix: String, rate: u64, burst: u64, per_ns: u64, max_keys: u32) -> KeyedTable {
        let sets = max_keys.div_ceil(WAYS as u32).max(1);
        let mut h = Sha256::new();
        for n in [rate, burst, per_ns, u64::from(max_keys)] {
            h.update(n.to_le_bytes());
        }
        let d = h.finalize();
        let mut g = [0u8; 4];
        g.copy_from_slice(d.get(..4).unwrap_or(&[0; 4]));
        KeyedTable {
            prefix,
            rate,
            burst,
            per_ns,
            max_keys,
            sets,
            generation: u32::from_le_bytes(g),
        }
    }

    /// Every shared-data key this table uses.
    pub fn keys(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.sets).map(|i| self.set_key(i))
    }

    fn set_key(&self, i: u32) -> String {
        format!("{}{i}", self.prefix)
    }

    fn set_of(&self, fp: u64) -> u32 {
        ((fp >> 32) % u64::from(self.sets)) as u32
    }

    fn cap(&self) -> i128 {
        i128::from(self.burst).saturating_mul(i128::from(self.per_ns))
    }

    fn units(&self, n: u64) -> i128 {
        i128::from(n).saturating_mul(i128::from(self.per_ns))
    }

    /// The entry refilled to `now` (reset when made for other numbers).
    fn refilled(&self, e: Entry, now: Nanos) -> Entry {
        if e.generation != self.generation {
            return Entry {
                fp: e.fp,
                tokens: self.cap(),
                last: now,
                used: e.used,
                generation: self.generation,
            };
        }
        let dt = now.saturating_sub(e.last);
        let add = i128::from(self.rate).saturating_mul(i128::from(dt));
        Entry {
            tokens: e.tokens.saturating_add(add).min(self.cap()),
            last: now.max(e.last),
            ..e
        }
    }

    /// Admits (or refuses) one request with key fingerprint `fp` costing
    /// `cost` tokens at `now`.
    pub fn admit(
        &self,
        fp: u64,
        cost: u64,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Result<KeyedDecision, StoreError> {
        let key = self.set_key(self.set_of(fp));
        for _ in 0..MAX_ATTEMPTS {
            let (mut set, cas) = read_set(&key, store)?;
            let i = self.slot_for(&set, fp, now);
            let Some(slot) = set.get_mut(i) else {
                return Err(StoreError::Corrupt(format!("`{key}`: no slot")));
            };
            let mut e = if slot.fp == fp {
                self.refilled(*slot, now)
            } else {
                Entry {
                    fp,
                    tokens: self.cap(),
                    last: now,
                    used: now,
                    generation: self.generation,
                }
            };
            e.used = now;
            let need = self.units(cost);
            let decision = if e.tokens >= need {
                e.tokens -= need;
                self.decision(true, &e, need)
            } else {
                self.decision(false, &e, need)
            };
            *slot = e;
            match store.set(&key, &encode(&set), cas) {
                Ok(()) => return Ok(decision),
                Err(StoreError::CasMismatch) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(StoreError::Contended)
    }

    /// Gives back `cost` tokens charged to `fp` (another limit refused the
    /// request). Nothing happens if its entry was reclaimed meanwhile.
    pub fn refund(&self, fp: u64, cost: u64, store: &dyn BucketStore) -> Result<(), StoreError> {
        let key = self.set_key(self.set_of(fp));
        for _ in 0..MAX_ATTEMPTS {
            let (mut set, cas) = read_set(&key, store)?;
            let Some(e) = set
                .iter_mut()
                .find(|e| e.fp == fp && e.generation == self.generation)
            else {
                return Ok(());
            };
            e.tokens = e.tokens.saturating_add(self.units(cost)).min(self.cap());
            match store.set(&key, &encode(&set), cas) {
                Ok(()) => return Ok(()),
                Err(StoreError::CasMismatch) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(StoreError::Contended)
    }

    fn decision(&self, admitted: bool, e: &Entry, need: i128) -> KeyedDecision {
        let rate = i128::from(self.rate.max(1));
        let per = i128::from(self.per_ns.max(1));
        let wait = |short: i128| -> u64 {
            if short <= 0 {
                0
            } else {
                u64::try_from((short + rate - 1) / rate).unwrap_or(u64::MAX)
            }
        };
        KeyedDecision {
            admitted,
            remaining: u64::try_from(e.tokens.max(0) / per).unwrap_or(0),
            wait_ns: if admitted { 0 } else { wait(need - e.tokens) },
            reset_ns: wait(self.cap() - e.tokens),
        }
    }

    /// Where `fp` goes in `set`: its entry, else the entry to reclaim.
    fn slot_for(&self, set: &[Entry; WAYS], fp: u64, now: Nanos) -> usize {
        if let Some(i) = set.iter().position(|e| e.fp == fp) {
            return i;
        }
        let rank = |e: &Entry| -> (u8, Nanos) {
            if e.fp == 0 {
                (0, 0)
            } else if e.generation != self.generation {
                (1, e.used)
            } else if self.refilled(*e, now).tokens >= self.cap() {
                (2, e.used)
            } else {
                (3, e.used)
            }
        };
        set.iter()
            .enumerate()
            .min_by_key(|(_, e)| rank(e))
            .map_or(0, |(i, _)| i)
    }

    /// Live entries of this generation in the whole table (tests, metrics).
    pub fn live(&self, store: &dyn BucketStore) -> Result<usize, StoreError> {
        let mut n = 0;
        for i in 0..self.sets {
            let (set, _) = read_set(&self.set_key(i), store)?;
            n += set
                .iter()
                .filter(|e| e.fp != 0 && e.generation == self.generation)
                .count();
        }
        Ok(n)
    }
}

fn read_set(key: &str, store: &dyn BucketStore) -> Result<([Entry; WAYS], u32), StoreError> {
    match store.get(key)? {
        None => Ok(([Entry::default(); WAYS], 0)),
        // An emptied set (a reload removed its limit, then brought it back).
        Some((bytes, cas)) if bytes.is_empty() => Ok(([Entry::default(); WAYS], cas)),
        Some((bytes, cas)) => decode(&bytes)
            .map(|s| (s, cas))
            .map_err(|why| StoreError::Corrupt(format!("`{key}`: {why}"))),
    }
}

fn encode(set: &[Entry; WAYS]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SET_LEN);
    out.push(TAG);
    for e in set {
        out.extend_from_slice(&e.fp.to_le_bytes());
        out.extend_from_slice(&e.tokens.to_le_bytes());
        out.extend_from_slice(&e.last.to_le_bytes());
        out.extend_from_slice(&e.used.to_le_bytes());
        out.extend_from_slice(&e.generation.to_le_bytes());
    }
    out
}

fn decode(bytes: &[u8]) -> Result<[Entry; WAYS], String> {
    let Some((&tag, rest)) = bytes.split_first() else {
        return Err("empty".into());
    };
    if tag != TAG || rest.len() != WAYS * ENTRY_LEN {
        return Err(format!(
            "not a keyed set ({} bytes, tag {tag})",
            bytes.len()
        ));
    }
    let mut out = [Entry::default(); WAYS];
    for (e, chunk) in out.iter_mut().zip(rest.chunks_exact(ENTRY_LEN)) {
        let (fp, r) = chunk.split_at(8);
        let (tokens, r) = r.split_at(16);
        let (last, r) = r.split_at(8);
        let (used, generation) = r.split_at(8);
        let u64_of = |b: &[u8]| b.try_into().map(u64::from_le_bytes).unwrap_or(0);
        *e = Entry {
            fp: u64_of(fp),
            tokens: tokens.try_into().map(i128::from_le_bytes).unwrap_or(0),
            last: u64_of(last),
            used: u64_of(used),
            generation: generation.try_into().map(u32::from_le_bytes).unwrap_or(0),
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::MemoryStore;
    use proptest::prelude::*;

    const SEC: Nanos = 1_000_000_000;

    fn table(rate: u64, burst: u64, max_keys: u32) -> KeyedTable {
        KeyedTable::new("k:/a:user:".into(), rate, burst, SEC, max_keys)
    }

    fn fp(t: &KeyedTable, v: &str) -> u64 {
        Fingerprint::with_seed([7; 16]).of(&t.prefix, v.as_bytes())
    }

    #[test]
    fn each_value_has_its_own_bucket() {
        let t = table(1, 3, 64);
        let s = MemoryStore::default();
        let (a, b) = (fp(&t, "alice"), fp(&t, "bob"));
        let now = 10 * SEC;
        for left in [2, 1, 0] {
            let d = t.admit(a, 1, now, &s).unwrap();
            assert_eq!((d.admitted, d.remaining), (true, left));
        }
        let d = t.admit(a, 1, now, &s).unwrap();
        assert_eq!((d.admitted, d.wait_ns, d.reset_ns), (false, SEC, 3 * SEC));
        assert!(t.admit(b, 1, now, &s).unwrap().admitted);
        // One token per second comes back.
        assert!(t.admit(a, 1, now + SEC, &s).unwrap().admitted);
        assert!(!t.admit(a, 1, now + SEC, &s).unwrap().admitted);
    }

    #[test]
    fn the_seed_is_created_once_and_shared() {
        let s = MemoryStore::default();
        let a = Fingerprint::from_store(&s, [1; 16]).unwrap();
        let b = Fingerprint::from_store(&s, [2; 16]).unwrap();
        assert_eq!(a, b);
        assert_ne!(
            a.of("l", b"x"),
            Fingerprint::with_seed([2; 16]).of("l", b"x")
        );
    }

    #[test]
    fn reclaims_a_full_entry_first_then_the_least_recently_used() {
        // One set of 8 ways: 8 values fill it.
        let t = table(1, 10, 8);
        assert_eq!(t.sets, 1);
        let s = MemoryStore::default();
        let now = 100 * SEC;
        let fps: Vec<u64> = (0..9).map(|i| fp(&t, &format!("v{i}"))).collect();
        // v0..v7 take 5 tokens each at increasing times; v3 then refills.
        for (i, f) in fps.iter().take(8).enumerate() {
            assert!(t.admit(*f, 5, now + i as u64, &s).unwrap().admitted);
        }
        assert_eq!(t.live(&s).unwrap(), 8);
        // 4 s later nobody is full yet (5 + 4 < 10): v8 takes the LRU, v0.
        assert!(t.admit(fps[8], 1, now + 4 * SEC, &s).unwrap().admitted);
        assert_eq!(t.live(&s).unwrap(), 8);
        // v0 comes back with a full bucket (it was reclaimed): 10 tokens.
        // It takes the LRU of the rest, v1.
        assert_eq!(t.admit(fps[0], 1, now + 4 * SEC, &s).unwrap().remaining, 9);
        // v2 still has its own state: 5, plus just under 4 refilled (it was
        // charged 2 ns after `now`), minus 1: 7 whole tokens.
        assert_eq!(t.admit(fps[2], 1, now + 4 * SEC, &s).unwrap().remaining, 7);
        // Much later v4..v7 are full again; a new value takes the least recently
        // used full one (v3: last used at now+3, before v4..v7), not v2.
        let later = now + 20 * SEC;
        assert!(t.admit(fps[2], 1, later, &s).unwrap().admitted);
        assert!(t.admit(fp(&t, "new"), 1, later, &s).unwrap().admitted);
        let (set, _) = read_set(&t.set_key(0), &s).unwrap();
        assert!(set.iter().any(|e| e.fp == fps[2]));
        assert!(!set.iter().any(|e| e.fp == fps[3]));
        assert!(set.iter().any(|e| e.fp == fps[4]));
    }

    #[test]
    fn new_numbers_reset_entries_in_place_and_refund_gives_back() {
        let s = MemoryStore::default();
        let t = table(1, 2, 16);
        let f = fp(&t, "alice");
        let now = 5 * SEC;
        assert!(t.admit(f, 2, now, &s).unwrap().admitted);
        assert!(!t.admit(f, 1, now, &s).unwrap().admitted);
        t.refund(f, 1, &s).unwrap();
        assert_eq!(t.admit(f, 1, now, &s).unwrap().remaining, 0);
        // The same prefix with a new burst: same keys, the entry starts full.
        let t2 = table(1, 4, 16);
        assert_eq!(t2.keys().collect::<Vec<_>>(), t.keys().collect::<Vec<_>>());
        assert_eq!(t2.admit(f, 1, now, &s).unwrap().remaining, 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the values and their order: the table never holds more
        /// than its sets, no value is admitted more than its burst plus its
        /// refill (while it keeps its entry), and the store's size is fixed.
        #[test]
        fn bounded_and_never_over_admits(
            ops in prop::collection::vec((0u32..40, 0u64..3_000), 1..400),
            max_keys in 8u32..40,
        ) {
            let t = table(2, 3, max_keys);
            let s = MemoryStore::default();
            let mut now = 1_000 * SEC;
            let mut admitted: std::collections::HashMap<u32, (u64, Nanos)> = Default::default();
            for (v, dt_ms) in ops {
                now += dt_ms * 1_000_000;
                let f = fp(&t, &format!("value-{v}"));
                let before = read_set(&t.set_key(t.set_of(f)), &s).unwrap().0;
                let had = before.iter().any(|e| e.fp == f);
                let d = t.admit(f, 1, now, &s).unwrap();
                let entry = admitted.entry(v).or_insert((0, now));
                if !had {
                    // A new or reclaimed entry: counting starts again.
                    *entry = (0, now);
                }
                if d.admitted {
                    entry.0 += 1;
                }
                // burst + rate x elapsed, in whole tokens.
                let allowed = 3 + 2 * (now - entry.1) / SEC;
                prop_assert!(entry.0 <= allowed, "value {v}: {} > {allowed}", entry.0);
                prop_assert!(s.len() <= t.sets as usize);
                prop_assert!(t.live(&s).unwrap() <= (t.sets as usize) * WAYS);
            }
        }
    }
}

#[cfg(test)]
mod engine_tests {
    use crate::http::{HttpInput, NoMetadata};
    use crate::quota::MemoryStore;
    use crate::testing::{bundle, file, tenant as t};
    use crate::{Engine, Request, TenantPath};

    const SEC: u64 = 1_000_000_000;

    fn engine(acme_limits: &str) -> Result<crate::Worker, String> {
        let b = bundle(
            crate::settings::Settings::default(),
            vec![
                t(
                    "/",
                    Some(file(
                        "tenants/tenant.json",
                        r#"{"limits": {"rps": {"rate": 5}}}"#,
                    )),
                    vec![file(
                        "tenants/p.cedar",
                        "permit(principal, action, resource);",
                    )],
                ),
                t(
                    "/acme",
                    Some(file("tenants/acme/tenant.json", acme_limits)),
                    vec![],
                ),
                t("/acme/eu", None, vec![]),
            ],
        );
        Engine::new(&b)
            .map(|e| crate::Worker::new(std::sync::Arc::new(e)))
            .map_err(|d| d.to_string())
    }

    fn request(e: &Engine, user: Option<&str>, key: Option<&str>, now: u64) -> Request {
        let mut h: Vec<(&str, &[u8])> = vec![
            (":method", b"GET"),
            (":path", b"/x"),
            ("x-tenant", b"/acme/eu"),
        ];
        if let Some(u) = user {
            h.push(("x-user", u.as_bytes()));
        }
        if let Some(k) = key {
            h.push(("x-api-key", k.as_bytes()));
        }
        let input = HttpInput {
            headers: &h,
            source_address: None,
            now_ns: now,
        };
        e.map_request(&input, &NoMetadata).unwrap().request
    }

    #[test]
    fn each_principal_has_its_own_bucket_below_the_declaring_tenant() {
        let e = engine(r#"{"limits": {"user": {"rate": 2, "per": "1m", "key": "principal"}}}"#)
            .unwrap();
        let s = MemoryStore::default();
        let now = 100 * SEC;
        for _ in 0..2 {
            assert!(e
                .decide(&request(&e, Some("alice"), None, now), &s)
                .is_allowed());
        }
        let d = e.decide(&request(&e, Some("alice"), None, now), &s);
        assert_eq!(d.status, 429);
        let q = d.quota.unwrap();
        assert_eq!(
            (
                q.limit.as_deref(),
                q.tenant.as_ref().map(TenantPath::as_str)
            ),
            (Some("user"), Some("/acme"))
        );
        assert_eq!(q.retry_after_s, 30);
        assert_eq!(q.ratelimit_policy().as_deref(), Some("\"user\";q=2;w=60"));
        // Bob has his own; the root's local rps (5 per second) still counts both.
        let d = e.decide(&request(&e, Some("bob"), None, now), &s);
        assert!(d.is_allowed());
        let q = d.quota.unwrap();
        assert_eq!(
            q.limits.iter().map(|l| &*l.name).collect::<Vec<_>>(),
            ["rps", "user"]
        );
        assert_eq!(q.remaining, 1);
        // Anonymous: refused with 400 (no `missing`).
        let d = e.decide(&request(&e, None, None, now), &s);
        assert_eq!(d.status, 400);
        assert!(
            d.errors[0].contains("limit `user` of `/acme` counts by principal"),
            "{d:?}"
        );
    }

    #[test]
    fn header_keys_skip_when_missing_and_a_refusal_elsewhere_gives_the_token_back() {
        let e = engine(r#"{"limits": {"key": {"rate": 3, "per": "1h", "key": {"header": "x-api-key"}, "missing": "skip"}}}"#).unwrap();
        let s = MemoryStore::default();
        let now = 100 * SEC;
        // No key: only the root's rps (5) applies.
        for _ in 0..5 {
            assert!(e.decide(&request(&e, None, None, now), &s).is_allowed());
        }
        // The root refuses (5 per second used): key k1 is charged nothing.
        let d = e.decide(&request(&e, None, Some("k1"), now), &s);
        assert_eq!(
            (d.status, d.quota.unwrap().limit.as_deref()),
            (429, Some("rps"))
        );
        for left in [2, 1, 0] {
            let d = e.decide(&request(&e, None, Some("k1"), now + 10 * SEC), &s);
            let q = d.quota.unwrap();
            assert!(q.admitted);
            assert_eq!(
                q.limits
                    .iter()
                    .find(|l| &*l.name == "key")
                    .unwrap()
                    .remaining,
                left
            );
        }
        let d = e.decide(&request(&e, None, Some("k1"), now + 10 * SEC), &s);
        assert_eq!(
            (d.status, d.quota.unwrap().limit.as_deref()),
            (429, Some("key"))
        );
    }

    #[test]
    fn keyed_limits_are_validated_where_they_are_written() {
        for (text, want) in [
            (
                r#"{"limits": {"u": {"rate": 2, "key": "everyone"}}}"#,
                "`key` must be `\"principal\"` or `{\"header\": \"x-api-key\"}`",
            ),
            (
                r#"{"limits": {"u": {"rate": 2, "ceil": 4, "key": "principal"}}}"#,
                "a keyed limit has no `ceil`",
            ),
            (
                r#"{"limits": {"u": {"rate": 2, "missing": "skip"}}}"#,
                "`missing` only applies to a keyed limit",
            ),
            (
                r#"{"limits": {"u": {"rate": 2, "key": {"header": "X Key"}}}}"#,
                "not a header name",
            ),
            (
                r#"{"limits": {"u": {"rate": 2, "key": "principal", "max_keys": 0}}}"#,
                "`max_keys` must be a whole number from 1 to 1000000",
            ),
            (
                r#"{"limits": {"rps": {"rate": 2, "key": "principal"}}}"#,
                "`/` declares a limit of the same name; this one is keyed",
            ),
            (
                r#"{"limits": {"u": {"rate": 2, "key": "principal", "scope": "fleet"}}}"#,
                "keyed fleet limits are not supported",
            ),
        ] {
            let err = engine(text).unwrap_err();
            assert!(err.contains("tenants/acme/tenant.json:1:"), "{err}");
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
