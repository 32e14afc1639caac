//! What a bundle's local limits occupy in the store, so that a reload can
//! empty what the new bundle no longer uses: Envoy never deletes shared data,
//! so a removed limit's buckets (and a keyed table's sets beyond a smaller
//! `max_keys`) would otherwise stay allocated for the life of the process.
//!
//! At configure time the filter calls [`QuotaModel::reconcile`](super::QuotaModel::reconcile)
//! with the footprint of the bundle this VM ran before, if any. It reads the
//! footprint the last configured bundle recorded under
//! `tenantgate:quota:footprint:v1:<scope>` (`scope` names the plugin), sets
//! to an empty value every key either one uses and the new bundle does not,
//! records the new bundle's footprint, then creates or resets the new
//! bundle's buckets. Keys keep their names when a limit's numbers change
//! (the value carries the numbers' stamp), so reloads that only change
//! numbers empty nothing and create nothing.
//!
//! The record is text, one line per entry: `b <key>` for a bucket, `t <sets>
//! <prefix>` for a keyed table (its keys are `<prefix><i>`, `i` below
//! `sets`). Keys are built from tenant paths and limit names, which hold no
//! white space.

use std::collections::{BTreeMap, BTreeSet};

/// Prefix of the shared-data key that records the last configured bundle's
/// footprint (followed by the plugin's name).
pub const FOOTPRINT_KEY_PREFIX: &str = "tenantgate:quota:footprint:v1:";

/// The store keys one bundle's local limits use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Footprint {
    buckets: BTreeSet<String>,
    /// Keyed tables: key prefix and number of sets.
    tables: BTreeMap<String, u32>,
}

impl Footprint {
    pub(crate) fn new(
        buckets: impl IntoIterator<Item = String>,
        tables: impl IntoIterator<Item = (String, u32)>,
    ) -> Footprint {
        Footprint {
            buckets: buckets.into_iter().collect(),
            tables: tables.into_iter().collect(),
        }
    }

    /// How many keys it covers.
    pub fn len(&self) -> usize {
        let sets: u64 = self.tables.values().map(|n| u64::from(*n)).sum();
        self.buckets
            .len()
            .saturating_add(usize::try_from(sets).unwrap_or(usize::MAX))
    }

    /// True if it covers no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds what `other` covers (a table keeps the larger number of sets).
    pub fn union(&mut self, other: &Footprint) {
        self.buckets.extend(other.buckets.iter().cloned());
        for (prefix, sets) in &other.tables {
            let n = self.tables.entry(prefix.clone()).or_default();
            *n = (*n).max(*sets);
        }
    }

    /// The keys `self` covers and `next` does not.
    pub fn removed_in(&self, next: &Footprint) -> Vec<String> {
        let mut out: Vec<String> = self.buckets.difference(&next.buckets).cloned().collect();
        for (prefix, sets) in &self.tables {
            let kept = next.tables.get(prefix).copied().unwrap_or(0);
            out.extend((kept..*sets).map(|i| format!("{prefix}{i}")));
        }
        out
    }

    /// The stored record (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        for b in &self.buckets {
            out.push_str("b ");
            out.push_str(b);
            out.push('\n');
        }
        for (prefix, sets) in &self.tables {
            out.push_str(&format!("t {sets} {prefix}\n"));
        }
        out.into_bytes()
    }

    /// Reads a stored record; `Err` names the first line that does not parse.
    pub fn decode(bytes: &[u8]) -> Result<Footprint, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        let mut f = Footprint::default();
        for (i, line) in text.lines().enumerate() {
            let bad = || {
                format!(
                    "line {}: `{line}` is not `b <key>` or `t <sets> <prefix>`",
                    i + 1
                )
            };
            match line.split_once(' ') {
                Some(("b", key)) if !key.is_empty() && !key.contains(' ') => {
                    f.buckets.insert(key.to_string());
                }
                Some(("t", rest)) => {
                    let (sets, prefix) = rest.split_once(' ').ok_or_else(bad)?;
                    let sets: u32 = sets.parse().map_err(|_| bad())?;
                    if prefix.is_empty() || prefix.contains(' ') {
                        return Err(bad());
                    }
                    f.tables.insert(prefix.to_string(), sets);
                }
                _ => return Err(bad()),
            }
        }
        Ok(f)
    }
}

/// What [`QuotaModel::reconcile`](super::QuotaModel::reconcile) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Keys set to an empty value: the previous bundles used them, this one
    /// does not.
    pub emptied: usize,
    /// Buckets created, or reset in place because they were empty or
    /// written for other numbers.
    pub created: usize,
    /// The stored record did not decode (it was replaced; only this VM's
    /// previous footprint was emptied).
    pub unreadable_record: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(buckets: &[&str], tables: &[(&str, u32)]) -> Footprint {
        Footprint::new(
            buckets.iter().map(|s| s.to_string()),
            tables.iter().map(|(p, n)| (p.to_string(), *n)),
        )
    }

    #[test]
    fn records_round_trip_and_bad_lines_are_named() {
        let f = fp(&["q:/a:rps", "q:/:rps"], &[("k:/a:per_key:", 3)]);
        assert_eq!(f.len(), 5);
        assert_eq!(
            String::from_utf8(f.encode()).unwrap(),
            "b q:/:rps\nb q:/a:rps\nt 3 k:/a:per_key:\n"
        );
        assert_eq!(Footprint::decode(&f.encode()), Ok(f));
        assert_eq!(Footprint::decode(b""), Ok(Footprint::default()));
        let err = Footprint::decode(b"b q:/:rps\nx y\n").unwrap_err();
        assert!(err.starts_with("line 2: `x y`"), "{err}");
        assert!(Footprint::decode(b"t many k:\n").is_err());
        assert!(Footprint::decode(b"b \n").is_err());
        assert!(Footprint::decode(&[0xff]).is_err());
    }

    #[test]
    fn removed_keys_are_the_buckets_and_sets_the_next_bundle_does_not_use() {
        let old = fp(&["q:/a:rps", "q:/b:rps"], &[("k:/a:x:", 4), ("k:/b:y:", 2)]);
        let next = fp(&["q:/a:rps", "q:/c:rps"], &[("k:/a:x:", 2)]);
        assert_eq!(
            old.removed_in(&next),
            vec!["q:/b:rps", "k:/a:x:2", "k:/a:x:3", "k:/b:y:0", "k:/b:y:1"]
        );
        assert!(next.removed_in(&next).is_empty());
        let mut u = next.clone();
        u.union(&old);
        assert_eq!(u.len(), 3 + 4 + 2);
        assert!(u.removed_in(&old) == vec!["q:/c:rps"]);
    }
}
