//! Fair borrowing between siblings: the state a parent keeps of the children
//! that borrow through it, and the rule that shares its spare capacity in
//! proportion to their rates (docs/reference.md, "Fair borrowing"; the
//! reasons are in docs/decisions.md).
//!
//! tc-htb shares a parent's spare capacity among the children that borrow
//! from it by deficit round robin, with quanta proportional to their rates.
//! Admission control has no queues to serve in rounds, so the same outcome
//! is reached with virtual times, as in start-time fair queueing:
//!
//! - Every borrow of `need` tokens by a child advances the child's *virtual
//!   time* at the parent by `need / rate` (the time the child's own rate
//!   takes to earn that much), in nanoseconds. Two children that borrowed in
//!   proportion to their rates have equal virtual times.
//! - A child is *behind* when its virtual time is below another's. A child
//!   with siblings behind it must leave their last needs (its *reserve*, the
//!   sum over them) in every bucket they share (the lender's `tokens`, the
//!   `ctokens` of the nodes from the parent to the lender): it takes only
//!   what is left over. The child furthest behind takes whatever is there,
//!   the next one what is above the first one's need, and so on. So a
//!   sibling that wants its share gets the spare tokens first until it has
//!   caught up, and a sibling that wants less leaves them to the others:
//!   nothing idles while someone is refused, beyond the reserve (a few
//!   tokens that stay in the bucket, not a rate).
//! - A child *borrows now* while it borrowed within the last
//!   [`super::fair_window`] (half the limit's window). A child that comes
//!   (back) borrows once freely and then starts level with the sibling
//!   furthest ahead: no credit for the time it did not borrow. A sibling
//!   that borrows less than its share falls behind by at most the window
//!   plus twice the borrow being recorded ([`super::fair_lag`]): the credit
//!   it may later catch up is bounded.
//!
//! The state lives in the parent's own bucket value (slots of
//! [`Slot`], at most [`MAX_SLOTS`]), which every admission through the
//! parent reads and writes anyway: no extra shared-data access. A refused
//! request charges nothing; it writes only when it was refused for want of
//! tokens to borrow and its child is not yet known to be asking
//! ([`Fair::ask`]: at most about twice a window per child), so a sibling
//! that borrows rarely still gets its share.

use super::Nanos;

/// Most children a parent tracks at once. With more borrowing at the same
/// time, the one that borrowed least recently is forgotten and starts level
/// again when it next borrows.
pub(crate) const MAX_SLOTS: usize = 8;

/// How many times its request a refused child's need may grow to (see
/// [`Fair::ask`]).
pub(crate) const ASK_CAP: u64 = 4;

/// One child that borrowed through the node recently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Slot {
    /// The child's id (see `spec::child_id`).
    pub child: u32,
    /// Its virtual time in nanoseconds, relative to the smallest of the
    /// node's slots.
    pub vt: u64,
    /// When it last borrowed.
    pub last: Nanos,
    /// Tokens its last borrow took: what the siblings ahead of it must leave
    /// for it.
    pub need: u64,
}

/// The children borrowing through one node. Empty (no allocation) while
/// none does, which keeps the bucket small on the paths that never borrow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Fair {
    slots: Vec<Slot>,
}

impl Fair {
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    fn slots_mut(&mut self) -> &mut [Slot] {
        &mut self.slots
    }

    /// Appends a slot; false when all are taken.
    pub fn push(&mut self, slot: Slot) -> bool {
        if self.slots.len() >= MAX_SLOTS {
            return false;
        }
        self.slots.push(slot);
        true
    }

    fn retain(&mut self, keep: impl Fn(&Slot) -> bool) {
        self.slots.retain(keep);
    }

    /// True while a child that last borrowed at `last` borrows now.
    fn active(last: Nanos, now: Nanos, window: u64) -> bool {
        now < last.saturating_add(window)
    }

    /// The reserve (in tokens) `child` must leave in the shared buckets when
    /// it borrows at `now`: the sum of the last needs of the siblings
    /// borrowing now that are behind it, so the further ahead a child is,
    /// the more it leaves (the one furthest behind goes first, then the
    /// next); `None` when none is behind it.
    pub fn reserve_for(&self, child: u32, now: Nanos, window: u64) -> Option<u64> {
        let active = || {
            self.slots()
                .iter()
                .filter(move |s| Self::active(s.last, now, window))
        };
        // A newcomer is behind nobody until its first borrow is recorded
        // (level with the sibling furthest ahead): were it to yield before
        // that, it could never get a slot.
        let mine = active().find(|s| s.child == child)?.vt;
        let mut behind = active()
            .filter(|s| s.child != child && s.vt < mine)
            .peekable();
        behind.peek()?;
        Some(behind.fold(0u64, |sum, s| sum.saturating_add(s.need.max(1))))
    }

    /// Records that `child` borrowed `need` tokens at `now`, advancing its
    /// virtual time by `inc`. Children that stopped borrowing are dropped,
    /// no child lags the one furthest ahead by more than `lag`, and the
    /// times are rebased on the smallest.
    pub fn record(&mut self, child: u32, inc: u64, need: u64, now: Nanos, window: u64, lag: u64) {
        self.retain(|s| Self::active(s.last, now, window));
        let top = self.slots().iter().map(|s| s.vt).max().unwrap_or(0);
        let fresh = Slot {
            child,
            vt: top,
            last: now,
            need,
        };
        if !self.slots().iter().any(|s| s.child == child) && !self.push(fresh) {
            // Every slot taken: forget the child that borrowed least recently.
            let oldest = self.slots_mut().iter_mut().min_by_key(|s| s.last);
            if let Some(s) = oldest {
                *s = fresh;
            }
        }
        for s in self.slots_mut() {
            if s.child == child {
                s.vt = s.vt.saturating_add(inc);
                s.last = s.last.max(now);
                // A need raised by refusals (`ask`) stays while the child
                // borrows (at most `ASK_CAP` times this borrow).
                s.need = s.need.max(need).min(need.saturating_mul(ASK_CAP));
            }
        }
        let top = self.slots().iter().map(|s| s.vt).max().unwrap_or(0);
        let floor = top.saturating_sub(lag);
        for s in self.slots_mut() {
            s.vt = s.vt.max(floor);
        }
        self.rebase();
    }

    /// Notes that `child` asked to borrow `need` tokens at `now` and found
    /// none. A child that borrows rarely (little above its rate) would
    /// otherwise never make the first borrow that puts it behind siblings
    /// that take every token as it refills, and the reserve kept for it can
    /// be spent by its siblings' guaranteed traffic (which charges the
    /// parent too and never yields). So a child not borrowing now joins
    /// level with the sibling furthest behind (every sibling ahead of it
    /// leaves its need from then on), and one borrowing now has its need
    /// raised by `need`, up to [`ASK_CAP`] times it, until its next borrow
    /// sets it back. Returns whether anything changed; no slot is taken
    /// from another child for it.
    pub fn ask(&mut self, child: u32, need: u64, now: Nanos, window: u64) -> bool {
        let before = self.slots.len();
        self.retain(|s| Self::active(s.last, now, window));
        let mut changed = self.slots.len() != before;
        let low = self.slots().iter().map(|s| s.vt).min().unwrap_or(0);
        match self.slots_mut().iter_mut().find(|s| s.child == child) {
            Some(s) => {
                let raised = s
                    .need
                    .saturating_add(need)
                    .min(need.saturating_mul(ASK_CAP));
                if raised > s.need || now >= s.last.saturating_add(window / 2) {
                    s.last = s.last.max(now);
                    s.need = s.need.max(raised);
                    changed = true;
                }
            }
            None => {
                changed |= self.push(Slot {
                    child,
                    vt: low,
                    last: now,
                    need,
                });
            }
        }
        if changed {
            self.rebase();
        }
        changed
    }

    /// Takes back `inc` of `child`'s virtual time (tokens it was charged
    /// for and did not spend: an abandoned attempt, a lease's remainder).
    pub fn unrecord(&mut self, child: u32, inc: u64) {
        for s in self.slots_mut() {
            if s.child == child {
                s.vt = s.vt.saturating_sub(inc);
            }
        }
        self.rebase();
    }

    fn rebase(&mut self) {
        let low = self.slots().iter().map(|s| s.vt).min().unwrap_or(0);
        for s in self.slots_mut() {
            s.vt -= low;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 500;

    fn vts(f: &Fair) -> Vec<(u32, u64)> {
        f.slots().iter().map(|s| (s.child, s.vt)).collect()
    }

    #[test]
    fn the_child_ahead_leaves_a_reserve_for_the_one_behind() {
        let mut f = Fair::default();
        assert_eq!(f.reserve_for(1, 0, W), None, "nobody borrows: no reserve");
        f.record(1, 10, 1, 0, W, 1000);
        assert_eq!(vts(&f), vec![(1, 0)]);
        assert_eq!(f.reserve_for(1, 1, W), None, "alone");
        // A newcomer borrows once freely, then starts level with the one
        // furthest ahead.
        assert_eq!(f.reserve_for(2, 1, W), None);
        f.record(2, 5, 3, 1, W, 1000);
        assert_eq!(vts(&f), vec![(1, 0), (2, 5)]);
        // 2 is ahead: it leaves 1's last need; 1 leaves nothing.
        assert_eq!(f.reserve_for(2, 2, W), Some(1));
        assert_eq!(f.reserve_for(1, 2, W), None);
        // A third child is behind nobody until it borrowed once.
        assert_eq!(f.reserve_for(3, 2, W), None);
        // 1 catches up and passes 2: now 2 is behind and 1 leaves 3 tokens.
        f.record(1, 10, 1, 3, W, 1000);
        assert_eq!(vts(&f), vec![(1, 5), (2, 0)]);
        assert_eq!(f.reserve_for(1, 4, W), Some(3));
        // A third child, once it borrowed, is level with 1: it leaves what
        // 2 needs; when 1 moves ahead of it, 1 leaves what both need.
        f.record(3, 1, 2, 4, W, 1000);
        assert_eq!(vts(&f), vec![(1, 5), (2, 0), (3, 6)]);
        assert_eq!(f.reserve_for(3, 4, W), Some(3 + 1));
        assert_eq!(f.reserve_for(1, 4, W), Some(3));
        f.record(1, 4, 1, 4, W, 1000);
        assert_eq!(f.reserve_for(1, 4, W), Some(3 + 2));
        // 2 stops borrowing: after the window it is forgotten.
        assert_eq!(f.reserve_for(1, 1 + W, W), Some(2), "only 3 is behind 1");
        f.record(3, 10, 2, 1 + W, W, 1000);
        assert_eq!(vts(&f), vec![(1, 0), (3, 7)]);
    }

    #[test]
    fn lag_is_bounded_and_refunds_take_back() {
        let mut f = Fair::default();
        f.record(1, 1, 1, 0, W, 100);
        f.record(2, 1, 1, 0, W, 100);
        for t in 1..50 {
            f.record(1, 10, 1, t, W, 100);
        }
        // 2 borrowed once; it lags 1 by at most the lag.
        assert_eq!(vts(&f), vec![(1, 100), (2, 0)]);
        f.unrecord(1, 30);
        assert_eq!(vts(&f), vec![(1, 70), (2, 0)]);
        f.unrecord(1, 1000);
        assert_eq!(vts(&f), vec![(1, 0), (2, 0)]);
    }

    #[test]
    fn a_full_table_forgets_the_least_recent() {
        let mut f = Fair::default();
        for c in 0..MAX_SLOTS as u32 {
            f.record(c, 1, 1, u64::from(c), W, 100);
        }
        assert_eq!(f.slots().len(), MAX_SLOTS);
        f.record(99, 1, 1, 20, W, 100);
        assert_eq!(f.slots().len(), MAX_SLOTS);
        assert!(f.slots().iter().all(|s| s.child != 0), "{:?}", vts(&f));
        assert!(f.slots().iter().any(|s| s.child == 99));
    }

    #[test]
    fn a_refused_child_is_known_and_its_need_raised() {
        let mut f = Fair::default();
        f.record(1, 10, 1, 0, W, 1000);
        f.record(2, 5, 1, 0, W, 1000);
        assert_eq!(vts(&f), vec![(1, 0), (2, 5)]);
        // 3 asks and is refused: it joins level with the one furthest
        // behind, so 2 (ahead of it) leaves its need.
        assert!(f.ask(3, 1, 1, W));
        assert_eq!(vts(&f), vec![(1, 0), (2, 5), (3, 0)]);
        assert_eq!(f.reserve_for(2, 2, W), Some(1 + 1));
        // Refused again: its need grows by the request, up to 4 times it.
        for _ in 0..5 {
            f.ask(3, 1, 2, W);
        }
        assert_eq!(f.slots()[2].need, ASK_CAP);
        assert!(!f.ask(3, 1, 3, W), "nothing left to change");
        assert_eq!(f.reserve_for(2, 3, W), Some(1 + ASK_CAP));
        // Its borrows keep the raised need; its virtual time advances.
        f.record(3, 2, 1, 4, W, 1000);
        assert_eq!(f.slots()[2].need, ASK_CAP);
        assert_eq!(vts(&f), vec![(1, 0), (2, 5), (3, 2)]);
        // A full table takes no asking child.
        let mut full = Fair::default();
        for c in 0..MAX_SLOTS as u32 {
            full.record(c, 1, 1, 0, W, 100);
        }
        assert!(!full.ask(99, 1, 1, W));
        assert!(full.slots().iter().all(|s| s.child != 99));
    }
}
