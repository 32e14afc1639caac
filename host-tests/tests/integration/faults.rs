//! A broken shared store: the decision follows `on_error`, never a trap, and
//! a half-done admission leaves no tokens charged.

use tenantgate_host_tests::{SharedDataFault, Status};

use crate::support::*;

fn with_on_error(on_error: &str) -> Tree {
    Tree::standard_with(&format!(
        r#"{{ "principal_tenant": {{ "header": "x-user-tenant" }}, "on_error": "{on_error}", "audit": "all" }}"#
    ))
}

#[track_caller]
fn expect_on_error_deny(resp: &tenantgate_host_tests::Response) {
    assert_eq!(resp.status, 503, "{}", resp.body_str());
    let body = expect_reply(resp, 503);
    assert_eq!(body["error"], "unavailable");
}

#[test]
fn a_cas_that_never_matches_gives_on_error_deny() {
    let (host, mut vm) = gate(&with_on_error("deny"));
    expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
    host.shared_data()
        .set_fault(SharedDataFault::CasAlwaysMismatches);
    let resp = get(&mut vm, "/acme", "alice", "/acme", "/orders");
    expect_on_error_deny(&resp);
    assert!(host.shared_data().stats().cas_mismatches > 0);
    assert_eq!(metric(&host, names::ERRORS), 1);
    // A policy deny needs no store: still a 403.
    expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/admin"), 403);
    assert_eq!(host.traps(), 0);
}

#[test]
fn undecodable_values_give_on_error_allow() {
    let (host, mut vm) = gate(&with_on_error("allow"));
    host.shared_data().set_fault(SharedDataFault::GarbageValues(
        b"\xde\xad\xbe\xef not a bucket".to_vec(),
    ));
    let resp = get(&mut vm, "/acme", "alice", "/acme", "/orders");
    expect_continue(&resp);
    assert_eq!(metric(&host, names::ERRORS), 1);
    let audit = audit_lines(&host);
    let last = audit.last().unwrap();
    assert_eq!(last["kind"], "error", "{last}");
    assert!(last["errors"].to_string().contains("corrupt"), "{last}");
    // Also when the garbage is really stored (not just served).
    host.shared_data().set_fault(SharedDataFault::None);
    for key in host.shared_data().keys() {
        host.shared_data().poke(&key, b"\x01short");
    }
    let (host2, mut vm2) = gate(&with_on_error("deny"));
    for key in host2.shared_data().keys() {
        host2.shared_data().poke(&key, &[0xff; 41]);
    }
    expect_on_error_deny(&get(&mut vm2, "/acme", "alice", "/acme", "/orders"));
    expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
    assert_eq!(host.traps() + host2.traps(), 0);
}

#[test]
fn a_failing_store_gives_on_error() {
    for (fault, what) in [
        (
            SharedDataFault::GetFails(Status::InternalFailure),
            "get fails",
        ),
        (
            SharedDataFault::GetFails(Status::BadArgument),
            "get says bad argument",
        ),
        (
            SharedDataFault::SetFails(Status::InternalFailure),
            "set fails",
        ),
    ] {
        let (host, mut vm) = gate(&with_on_error("deny"));
        host.shared_data().set_fault(fault);
        let resp = get(&mut vm, "/acme", "alice", "/acme", "/orders");
        assert_eq!(resp.status, 503, "{what}: {}", resp.body_str());
        assert_eq!(metric(&host, names::ERRORS), 1, "{what}");
        assert_eq!(host.traps(), 0, "{what}");
    }
}

#[test]
fn faults_leave_no_tokens_charged() {
    // /acme has 10 tokens. Faulted admissions must not use any of them.
    let (host, mut vm) = gate(&with_on_error("deny"));
    for fault in [
        SharedDataFault::CasAlwaysMismatches,
        SharedDataFault::SetFails(Status::InternalFailure),
        SharedDataFault::GarbageValues(vec![7; 3]),
    ] {
        host.shared_data().set_fault(fault);
        for _ in 0..5 {
            expect_on_error_deny(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
        }
    }
    host.shared_data().set_fault(SharedDataFault::None);
    let admitted = (0..15)
        .filter(|_| get(&mut vm, "/acme", "alice", "/acme", "/orders").is_continue())
        .count();
    assert_eq!(admitted, 10, "tokens leaked through the faults");
}
