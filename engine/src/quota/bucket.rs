//! One node's pair of buckets (HTB's `tokens` and `ctokens`), their exact
//! integer refill, the recent borrowing of its children (the `fair` module),
//! and their binary encoding in the store.
//!
//! Amounts are `i128` in *units* of `1 / per_ns` token, where `per_ns` is the
//! limit's window in nanoseconds. A refill over `dt` nanoseconds then adds
//! exactly `rate * dt` units (`ceil * dt` to the ceil bucket): no division, no
//! rounding, so nothing drifts however often a bucket is updated. Every chain
//! shares one window (validation requires it), so one unit means the same on
//! every node of a chain.

use sha2::{Digest, Sha256};

use super::fair::{Fair, Slot, MAX_SLOTS};
use super::Nanos;

/// Largest `rate`, `ceil` or `burst`, in tokens.
pub(crate) const MAX_AMOUNT: u64 = 1_000_000_000_000;

/// Encoding version tag (first byte of a stored value) of a bucket whose
/// children are not borrowing: exactly [`ENCODED_LEN`] bytes.
pub(crate) const TAG_V1: u8 = 1;
/// Tag of a bucket followed by its borrowing children: [`ENCODED_LEN`] bytes,
/// a count `n` (1 to [`MAX_SLOTS`]), then `n` slots of [`SLOT_LEN`] bytes.
pub(crate) const TAG_V2: u8 = 2;
/// Length of an encoded bucket: tag, stamp, tokens, ctokens, last.
pub(crate) const ENCODED_LEN: usize = 1 + 4 + 16 + 16 + 8;
/// Length of one encoded slot: child, virtual time, last borrow, need.
pub(crate) const SLOT_LEN: usize = 4 + 8 + 8 + 8;
/// No amount goes below this. Validation bounds debts far above it (see the
/// module doc); the floor and saturating arithmetic only keep corrupted or
/// absurd states from overflowing.
pub(crate) const FLOOR: i128 = -(1 << 120);

/// State of one (node, limit) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bucket {
    /// Rate bucket, in units; at most `cap`.
    pub tokens: i128,
    /// Ceil bucket, in units; at most `ccap`.
    pub ctokens: i128,
    /// When both buckets were last refilled. Never moves backwards.
    pub last: Nanos,
    /// The children that borrowed through this node recently.
    pub fair: Fair,
}

impl Bucket {
    /// The stored value: [`ENCODED_LEN`] bytes with no borrowing children
    /// (on the stack), else those followed by the slots. `stamp` is the
    /// limit's [`Params::stamp`]: a value stamped by other numbers is stale.
    pub fn encode(&self, stamp: u32) -> Encoded {
        let slots = self.fair.slots();
        let mut head = [0u8; ENCODED_LEN];
        let (tag, rest) = head.split_at_mut(1);
        let (stamp_bytes, rest) = rest.split_at_mut(4);
        stamp_bytes.copy_from_slice(&stamp.to_le_bytes());
        let (tokens, rest) = rest.split_at_mut(16);
        let (ctokens, last) = rest.split_at_mut(16);
        tag.copy_from_slice(&[if slots.is_empty() { TAG_V1 } else { TAG_V2 }]);
        tokens.copy_from_slice(&self.tokens.to_le_bytes());
        ctokens.copy_from_slice(&self.ctokens.to_le_bytes());
        last.copy_from_slice(&self.last.to_le_bytes());
        if slots.is_empty() {
            return Encoded::Plain(head);
        }
        let mut out = Vec::with_capacity(ENCODED_LEN + 1 + slots.len() * SLOT_LEN);
        out.extend_from_slice(&head);
        out.push(u8::try_from(slots.len()).unwrap_or(0));
        for s in slots {
            out.extend_from_slice(&s.child.to_le_bytes());
            out.extend_from_slice(&s.vt.to_le_bytes());
            out.extend_from_slice(&s.last.to_le_bytes());
            out.extend_from_slice(&s.need.to_le_bytes());
        }
        Encoded::Slots(out)
    }

    /// Decodes a stored value and its stamp; `Err` says why it does not decode.
    #[inline]
    pub fn decode(bytes: &[u8]) -> Result<(Bucket, u32), String> {
        let Some((head, tail)) = bytes.split_first_chunk::<ENCODED_LEN>() else {
            return Err(format!(
                "{} bytes where a bucket has {ENCODED_LEN}",
                bytes.len()
            ));
        };
        let (&[tag], rest) = head.split_first_chunk::<1>().ok_or("truncated")?;
        if tag != TAG_V1 && tag != TAG_V2 {
            return Err(format!("unknown encoding version {tag}"));
        }
        let (stamp, rest) = rest.split_first_chunk::<4>().ok_or("truncated")?;
        let (tokens, rest) = rest.split_first_chunk::<16>().ok_or("truncated")?;
        let (ctokens, rest) = rest.split_first_chunk::<16>().ok_or("truncated")?;
        let (last, _) = rest.split_first_chunk::<8>().ok_or("truncated")?;
        let (tokens, ctokens) = (i128::from_le_bytes(*tokens), i128::from_le_bytes(*ctokens));
        let last = u64::from_le_bytes(*last);
        let fair = if tag == TAG_V1 {
            if !tail.is_empty() {
                return Err(format!(
                    "{} bytes where a bucket has {ENCODED_LEN}",
                    bytes.len()
                ));
            }
            Fair::default()
        } else {
            decode_slots(bytes.len(), tail)?
        };
        Ok((
            Bucket {
                tokens,
                ctokens,
                last,
                fair,
            },
            u32::from_le_bytes(*stamp),
        ))
    }
}

/// An encoded bucket (a byte slice through `Deref`).
pub(crate) enum Encoded {
    /// No borrowing children: the fixed head only, on the stack.
    Plain([u8; ENCODED_LEN]),
    Slots(Vec<u8>),
}

impl std::ops::Deref for Encoded {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Encoded::Plain(b) => b,
            Encoded::Slots(v) => v,
        }
    }
}

/// The slots after the head of a tag-2 value (`len` is the whole value's
/// length, for the message). Out of line: most values have none.
#[inline(never)]
fn decode_slots(len: usize, tail: &[u8]) -> Result<Fair, String> {
    let mut r = Reader(tail);
    let n = usize::from(r.u8()?);
    if n == 0 || n > MAX_SLOTS || tail.len() != 1 + n * SLOT_LEN {
        return Err(format!(
            "{len} bytes where a bucket with {n} borrowing children has {}",
            ENCODED_LEN + 1 + n * SLOT_LEN
        ));
    }
    let mut fair = Fair::default();
    for _ in 0..n {
        fair.push(Slot {
            child: r.u32()?,
            vt: r.u64()?,
            last: r.u64()?,
            need: r.u64()?,
        });
    }
    Ok(fair)
}

/// Little-endian fields read in order from a slice of known length.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| "truncated".to_string())?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        self.take::<1>().map(|[b]| b)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.take().map(u64::from_le_bytes)
    }
}

/// Compiled parameters of one node's limit, with its capacities in units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Params {
    /// Guaranteed tokens per window.
    pub rate: u64,
    /// Most tokens per window, borrowing included.
    pub ceil: u64,
    /// Rate bucket size in tokens.
    pub burst: u64,
    /// Window in nanoseconds.
    pub per_ns: u64,
    /// Rate bucket size in units (`burst * per_ns`).
    pub cap: i128,
    /// Ceil bucket size in units (`burst * ceil / rate` tokens, at most
    /// [`MAX_AMOUNT`] tokens).
    pub ccap: i128,
    /// 32 bits of SHA-256 over `rate`, `ceil`, `burst` and `per_ns`, stored
    /// with the bucket: a stored bucket with another stamp was written for
    /// other numbers, and starts again from full buckets.
    pub stamp: u32,
}

impl Params {
    pub fn new(rate: u64, ceil: u64, burst: u64, per_ns: u64) -> Params {
        let per = i128::from(per_ns);
        let cap = i128::from(burst).saturating_mul(per);
        // burst * ceil / rate tokens, exactly in units where it fits.
        let (b, c, r) = (u128::from(burst), u128::from(ceil), u128::from(rate.max(1)));
        let whole = b.saturating_mul(c) / r;
        let rem = b.saturating_mul(c) % r;
        let max = u128::from(MAX_AMOUNT);
        let ccap_units = if whole >= max {
            max.saturating_mul(u128::from(per_ns))
        } else {
            whole
                .saturating_mul(u128::from(per_ns))
                .saturating_add(rem.saturating_mul(u128::from(per_ns)) / r)
        };
        let ccap = i128::try_from(ccap_units).unwrap_or(i128::MAX).max(cap);
        let mut h = Sha256::new();
        for n in [rate, ceil, burst, per_ns] {
            h.update(n.to_le_bytes());
        }
        let digest = h.finalize();
        let mut word = [0u8; 4];
        for (w, b) in word.iter_mut().zip(digest.iter()) {
            *w = *b;
        }
        Params {
            rate,
            ceil,
            burst,
            per_ns,
            cap,
            ccap,
            stamp: u32::from_le_bytes(word),
        }
    }

    /// `n` tokens in units.
    #[cfg(test)]
    pub fn units(&self, n: u64) -> i128 {
        i128::from(n).saturating_mul(i128::from(self.per_ns))
    }

    /// Whole tokens in `units` (rounded down, never negative).
    #[cfg(test)]
    #[cfg(test)]
    pub fn whole_tokens(&self, units: i128) -> u64 {
        if units <= 0 {
            return 0;
        }
        u64::try_from(units / i128::from(self.per_ns.max(1))).unwrap_or(u64::MAX)
    }

    /// Both buckets full at `now`.
    pub fn full(&self, now: Nanos) -> Bucket {
        Bucket {
            tokens: self.cap,
            ctokens: self.ccap,
            last: now,
            fair: Fair::default(),
        }
    }

    /// Brings a stored value within this limit's bounds (a value written by a
    /// different build, or a hand-edited store, cannot create tokens).
    pub fn clamp(&self, b: Bucket) -> Bucket {
        Bucket {
            tokens: b.tokens.clamp(FLOOR, self.cap),
            ctokens: b.ctokens.clamp(FLOOR, self.ccap),
            ..b
        }
    }

    /// Refills both buckets up to `now`. A clock that went backwards refills
    /// nothing and leaves `last` where it was, so it never mints tokens.
    pub fn refill(&self, b: Bucket, now: Nanos) -> Bucket {
        if now <= b.last {
            return b;
        }
        let dt = i128::from(now - b.last);
        let fill = |have: i128, speed: u64, cap: i128| {
            if have >= cap {
                have
            } else {
                have.saturating_add(i128::from(speed).saturating_mul(dt))
                    .min(cap)
            }
        };
        Bucket {
            tokens: fill(b.tokens, self.rate, self.cap),
            ctokens: fill(b.ctokens, self.ceil, self.ccap),
            last: now,
            fair: b.fair,
        }
    }

    /// Nanoseconds from `now` until the rate bucket holds `need` units, `None`
    /// if it never can (`need` exceeds its size).
    pub fn wait_tokens(&self, b: &Bucket, need: i128, now: Nanos) -> Option<u64> {
        wait(
            b.tokens,
            need,
            self.cap,
            self.rate,
            b.last.saturating_sub(now),
        )
    }

    /// Same for the ceil bucket.
    pub fn wait_ctokens(&self, b: &Bucket, need: i128, now: Nanos) -> Option<u64> {
        wait(
            b.ctokens,
            need,
            self.ccap,
            self.ceil,
            b.last.saturating_sub(now),
        )
    }
}

fn wait(have: i128, need: i128, cap: i128, speed: u64, ahead: u64) -> Option<u64> {
    if have >= need {
        return Some(0);
    }
    if need > cap || speed == 0 {
        return None;
    }
    let missing = need.saturating_sub(have);
    let speed = i128::from(speed);
    let ns = missing / speed + i128::from(missing % speed != 0);
    Some(u64::try_from(ns).unwrap_or(u64::MAX).saturating_add(ahead))
}

/// Whole seconds covering `ns`, rounded up.
pub(crate) fn ceil_seconds(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn encoding_round_trips_and_refuses_garbage() {
        let b = Bucket {
            tokens: -5,
            ctokens: 1 << 90,
            last: 123,
            fair: Fair::default(),
        };
        let bytes = b.encode(0xdead_beef);
        assert_eq!(bytes.len(), ENCODED_LEN);
        assert_eq!(Bucket::decode(&bytes), Ok((b, 0xdead_beef)));
        assert!(Bucket::decode(&bytes[..44])
            .unwrap_err()
            .contains("44 bytes"));
        let mut bad = bytes.to_vec();
        bad[0] = 9;
        assert!(Bucket::decode(&bad).unwrap_err().contains("version 9"));
        assert!(Bucket::decode(b"").is_err());
    }

    #[test]
    fn borrowing_children_are_encoded_after_the_buckets() {
        let mut fair = Fair::default();
        for child in 0..MAX_SLOTS as u32 {
            fair.push(Slot {
                child: child * 7,
                vt: u64::from(child) << 40,
                last: 99,
                need: 3,
            });
        }
        let b = Bucket {
            tokens: 1,
            ctokens: -2,
            last: 3,
            fair,
        };
        let bytes = b.encode(7);
        assert_eq!(bytes.len(), ENCODED_LEN + 1 + MAX_SLOTS * SLOT_LEN);
        assert_eq!(bytes.len(), 270, "docs/decisions.md gives the size");
        assert_eq!((bytes[0], bytes[ENCODED_LEN]), (TAG_V2, MAX_SLOTS as u8));
        assert_eq!(Bucket::decode(&bytes), Ok((b.clone(), 7)));
        // The same buckets with no borrowing children are the 45 bytes of tag 1.
        let plain = Bucket {
            fair: Fair::default(),
            ..b
        };
        assert_eq!(
            &plain.encode(7)[..],
            &bytes[..ENCODED_LEN]
                .iter()
                .enumerate()
                .map(|(i, x)| if i == 0 { TAG_V1 } else { *x })
                .collect::<Vec<u8>>()[..]
        );
        // Counts and lengths that disagree are refused.
        let mut bad = bytes.to_vec();
        bad.pop();
        assert!(Bucket::decode(&bad).unwrap_err().contains("269 bytes"));
        let mut bad = bytes.to_vec();
        bad[ENCODED_LEN] = 0;
        assert!(Bucket::decode(&bad).is_err());
        let mut tag1_with_tail = bytes.to_vec();
        tag1_with_tail[0] = TAG_V1;
        assert!(Bucket::decode(&tag1_with_tail).is_err());
    }

    #[test]
    fn refill_is_exact_and_never_drifts() {
        // 3 tokens per 7 seconds: 3/7 of a token per second is not a round number.
        let p = Params::new(3, 3, 3, 7 * S);
        let mut b = Bucket {
            tokens: 0,
            ctokens: 0,
            last: 0,
            fair: Fair::default(),
        };
        // A million refills one nanosecond apart, then the rest in one go.
        for t in 1..=1_000_000 {
            b = p.refill(b, t);
        }
        b = p.refill(b, 7 * S);
        assert_eq!(b.tokens, p.units(3));
        assert_eq!(b.ctokens, p.units(3));
        // Exactly one token after 7/3 seconds, not a unit less.
        let b = p.refill(
            Bucket {
                tokens: 0,
                ctokens: 0,
                last: 0,
                fair: Fair::default(),
            },
            7 * S / 3,
        );
        assert_eq!(
            p.whole_tokens(b.tokens),
            0,
            "7/3 s rounds down to 2333333333 ns"
        );
        let b = p.refill(b, 7 * S / 3 + 1);
        assert_eq!(p.whole_tokens(b.tokens), 1);
    }

    #[test]
    fn refill_caps_and_ignores_a_clock_going_backwards() {
        let p = Params::new(10, 20, 10, S);
        assert_eq!(p.ccap, p.units(20));
        let b = p.refill(
            Bucket {
                tokens: 0,
                ctokens: 0,
                last: 5 * S,
                fair: Fair::default(),
            },
            100 * S,
        );
        assert_eq!((b.tokens, b.ctokens, b.last), (p.cap, p.ccap, 100 * S));
        let spent = Bucket {
            tokens: 0,
            ctokens: 0,
            last: 5 * S,
            fair: Fair::default(),
        };
        let back = p.refill(spent.clone(), 2 * S);
        assert_eq!(
            back, spent,
            "no tokens and no move of `last` when time goes backwards"
        );
        // Forward again: only the time after `last` counts.
        let fwd = p.refill(back, 5 * S + S / 10);
        assert_eq!(p.whole_tokens(fwd.tokens), 1);
    }

    #[test]
    fn ceil_bucket_capacity_is_burst_times_ceil_over_rate() {
        assert_eq!(
            Params::new(100, 150, 200, S).ccap,
            Params::new(1, 1, 300, S).cap
        );
        // 7 * 10 / 3 = 23.33 tokens.
        let p = Params::new(3, 10, 7, S);
        assert_eq!(p.ccap, 23 * i128::from(S) + i128::from(S) / 3);
        // Capped at the maximum amount, never below the rate bucket.
        let huge = Params::new(1, 1_000_000_000_000, 1_000_000_000_000, S);
        assert_eq!(huge.ccap, huge.cap);
    }

    #[test]
    fn waits_round_up_and_know_the_impossible() {
        let p = Params::new(2, 4, 2, S);
        let b = Bucket {
            tokens: 0,
            ctokens: 0,
            last: 0,
            fair: Fair::default(),
        };
        assert_eq!(p.wait_tokens(&b, p.units(1), 0), Some(S / 2));
        assert_eq!(p.wait_ctokens(&b, p.units(1), 0), Some(S / 4));
        assert_eq!(
            p.wait_tokens(&b, p.units(3), 0),
            None,
            "3 tokens never fit a bucket of 2"
        );
        // A bucket refilled `ahead` of our clock: its time counts too.
        let ahead = Bucket {
            tokens: 0,
            ctokens: 0,
            last: 10,
            fair: Fair::default(),
        };
        assert_eq!(p.wait_tokens(&ahead, p.units(1), 4), Some(S / 2 + 6));
        assert_eq!(ceil_seconds(0), 0);
        assert_eq!(ceil_seconds(1), 1);
        assert_eq!(ceil_seconds(S), 1);
        assert_eq!(ceil_seconds(S + 1), 2);
    }
}
