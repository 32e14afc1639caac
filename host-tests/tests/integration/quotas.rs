//! Quotas through the filter on one VM: refill with the clock, the guarantee,
//! borrowing and no leak (docs/reference.md, "limits"; the engine's `quota`
//! module docs).

use std::time::Duration;

use crate::support::*;

#[test]
fn tokens_refill_with_the_clock() {
    let (host, mut vm) = gate(&Tree::standard());
    let burst = (0..20)
        .filter(|_| get(&mut vm, "/acme", "alice", "/acme", "/orders").is_continue())
        .count();
    assert_eq!(burst, 10);
    host.clock().advance(Duration::from_millis(500));
    let refilled = (0..20)
        .filter(|_| get(&mut vm, "/acme", "alice", "/acme", "/orders").is_continue())
        .count();
    assert_eq!(refilled, 5, "10/s for half a second");
    // A clock that jumps back gives nothing away (and breaks nothing).
    host.clock().set_ns(host.clock().now_ns() - 60_000_000_000);
    expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/orders"), 429);
    assert_eq!(host.traps(), 0);
}

#[test]
fn a_sibling_cannot_starve_a_tenant_under_its_rate_and_idle_share_is_borrowed() {
    let (host, mut vm) = gate(&Tree::standard());
    // /globex/b alone may borrow up to its ceil (40/s once bursts are spent).
    let mut b_admitted = 0;
    let mut a_refused = 0;
    for step in 0..50 {
        host.clock().advance(Duration::from_millis(100));
        // /globex/a sends at its rate (10/s): one request per 100 ms.
        if !get(&mut vm, "/globex/a", "gus", "/globex", "/x").is_continue() {
            a_refused += 1;
        }
        // /globex/b sends as fast as it can.
        for _ in 0..20 {
            if get(&mut vm, "/globex/b", "gus", "/globex", "/x").is_continue() {
                b_admitted += 1;
            }
        }
        if step == 0 {
            assert!(
                b_admitted > 10,
                "b could not borrow beyond its rate: {b_admitted}"
            );
        }
    }
    assert_eq!(
        a_refused, 0,
        "the guarantee broke: a sibling starved /globex/a"
    );
    // 5 s at b's ceil (40/s) plus bursts, minus what a used (10/s): b got more than its own 10/s.
    assert!(b_admitted > 5 * 10 + 10, "no borrowing: b got {b_admitted}");
    assert!(
        b_admitted <= 5 * 40 + 40,
        "over the ceil: b got {b_admitted}"
    );
}

#[test]
fn a_request_denied_by_policy_consumes_nothing() {
    let (_host, mut vm) = gate(&Tree::standard());
    for _ in 0..30 {
        expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/admin"), 403);
    }
    let admitted = (0..12)
        .filter(|_| get(&mut vm, "/acme", "alice", "/acme", "/orders").is_continue())
        .count();
    assert_eq!(admitted, 10);
}

#[test]
fn a_parent_caps_its_subtree() {
    // /acme/eu has no limit of its own: it spends /acme's 10 tokens.
    let (_host, mut vm) = gate(&Tree::standard());
    let eu = (0..8)
        .filter(|_| get(&mut vm, "/acme/eu", "alice", "/acme", "/x").is_continue())
        .count();
    let acme = (0..8)
        .filter(|_| get(&mut vm, "/acme", "alice", "/acme", "/x").is_continue())
        .count();
    assert_eq!((eu, acme), (8, 2));
}
