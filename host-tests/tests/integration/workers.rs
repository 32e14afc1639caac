//! Several worker VMs on their own threads sharing one host, as Envoy runs
//! them: a limit holds per process (docs/reference.md, "limits"). The filter documents its
//! slack (engine `quota` module docs): buckets are exact under CAS; the only
//! slack is `(VMs - 1) * cost` per key when VMs race to create a missing key,
//! and the filter pre-creates every key at configure time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use tenantgate_host_tests::{Host, Vm};

use crate::support::*;

/// How long a run may take before it counts as a deadlock or starvation.
const DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    admitted: u64,
    quota: u64,
    errors: u64,
    other: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.admitted += o.admitted;
        self.quota += o.quota;
        self.errors += o.errors;
        self.other += o.other;
    }
    fn total(&self) -> u64 {
        self.admitted + self.quota + self.errors + self.other
    }
}

fn send(vm: &mut Vm, tenant: &str, c: &mut Counts) {
    let resp = get(vm, tenant, "worker", tenant, "/x");
    match resp.status {
        _ if resp.is_continue() => c.admitted += 1,
        429 => c.quota += 1,
        503 => c.errors += 1,
        _ => c.other += 1,
    }
}

/// Starts `workers` configured VMs, each on its own thread, runs `job` on each
/// (all released at once), and collects their counts within [`DEADLINE`].
fn run_workers<F>(host: &Host, vms: Vec<Vm>, job: F) -> Vec<Counts>
where
    F: Fn(usize, &mut Vm) -> Counts + Send + Sync + 'static,
{
    let job = Arc::new(job);
    let barrier = Arc::new(Barrier::new(vms.len()));
    let (tx, rx) = mpsc::channel();
    let n = vms.len();
    for (i, mut vm) in vms.into_iter().enumerate() {
        let (job, barrier, tx) = (job.clone(), barrier.clone(), tx.clone());
        std::thread::spawn(move || {
            barrier.wait();
            let c = job(i, &mut vm);
            let _ = tx.send((i, c, vm.trapped().map(str::to_string)));
        });
    }
    let start = Instant::now();
    let mut out = vec![Counts::default(); n];
    for _ in 0..n {
        let left = DEADLINE.saturating_sub(start.elapsed());
        let (i, c, trapped) = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!("workers did not finish within {DEADLINE:?}: deadlock or starvation")
        });
        assert!(trapped.is_none(), "worker {i} trapped: {trapped:?}");
        out[i] = c;
    }
    assert_eq!(host.traps(), 0);
    out
}

fn vms(host: &Host, bundle: &str, n: usize) -> Vec<Vm> {
    (0..n).map(|_| configured_vm(host, bundle)).collect()
}

/// W workers hammer `/hammer` (100 tokens, 100/s) on a frozen clock.
fn same_tenant(w: usize) {
    let host = host();
    let bundle = Tree::standard().bundle();
    let limit = 100u64;
    let per_worker = 300 / w;
    let counts = run_workers(&host, vms(&host, &bundle, w), move |_, vm| {
        let mut c = Counts::default();
        for _ in 0..per_worker {
            send(vm, "/hammer", &mut c);
        }
        c
    });
    let mut all = Counts::default();
    counts.iter().for_each(|c| all.add(*c));
    // Documented slack: (VMs - 1) * cost per key, cost 1 for GET.
    let cost = 1;
    let slack = (w as u64 - 1) * cost;
    let bound = limit + limit / 100 + slack;
    eprintln!(
        "same tenant, W={w}: admitted {} of {} requests (allowed {limit}, bound {bound}); 429: {}, on_error: {}, per worker: {:?}",
        all.admitted,
        all.total(),
        all.quota,
        all.errors,
        counts.iter().map(|c| c.admitted).collect::<Vec<_>>()
    );
    assert_eq!(all.other, 0, "{all:?}");
    assert!(
        all.admitted <= bound,
        "over-admission: {} > {bound}",
        all.admitted
    );
    assert!(all.admitted >= limit * 95 / 100, "tokens lost: {all:?}");
    assert!(
        all.errors * 20 <= all.total(),
        "too many contention errors: {all:?}"
    );
    assert_eq!(all.admitted, metric(&host, names::ALLOWED));
}

#[test]
fn one_worker_holds_the_limit() {
    same_tenant(1);
}

#[test]
fn two_workers_hold_the_limit() {
    same_tenant(2);
}

#[test]
fn four_workers_hold_the_limit() {
    same_tenant(4);
}

#[test]
fn eight_workers_hold_the_limit() {
    same_tenant(8);
}

#[test]
fn eight_workers_on_eight_tenants_each_get_their_own_limit() {
    let host = host();
    let bundle = Tree::standard().bundle();
    let counts = run_workers(&host, vms(&host, &bundle, 8), |i, vm| {
        let mut c = Counts::default();
        let tenant = format!("/t{}", i + 1);
        for _ in 0..80 {
            send(vm, &tenant, &mut c);
        }
        c
    });
    eprintln!(
        "different tenants, W=8: admitted per tenant {:?} (allowed 50 each)",
        counts.iter().map(|c| c.admitted).collect::<Vec<_>>()
    );
    for (i, c) in counts.iter().enumerate() {
        assert_eq!(c.admitted, 50, "/t{}: {c:?}", i + 1);
    }
}

#[test]
fn workers_interleaving_tenants_hold_every_limit() {
    let host = host();
    let bundle = Tree::standard().bundle();
    let counts = run_workers(&host, vms(&host, &bundle, 4), |i, vm| {
        let mut per = [Counts::default(); 4];
        for n in 0..160 {
            let t = (n + i) % 4;
            send(vm, &format!("/t{}", t + 1), &mut per[t]);
        }
        // Pack per-tenant admissions into one Counts (admitted of t in bits).
        Counts {
            admitted: per
                .iter()
                .enumerate()
                .map(|(t, c)| c.admitted << (16 * t))
                .sum(),
            ..Counts::default()
        }
    });
    for t in 0..4 {
        let admitted: u64 = counts
            .iter()
            .map(|c| (c.admitted >> (16 * t)) & 0xffff)
            .sum();
        eprintln!(
            "interleaved, W=4: /t{} admitted {admitted} (allowed 50)",
            t + 1
        );
        assert!(admitted <= 50 + 3, "/t{}: {admitted}", t + 1);
        assert!(admitted >= 48, "/t{}: {admitted}", t + 1);
    }
}

#[test]
fn the_limit_holds_while_time_moves() {
    let host = host();
    let bundle = Tree::standard().bundle();
    let w = 4;
    let vms = vms(&host, &bundle, w);
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let steps = 200u64;
    let step = Duration::from_millis(10);
    // The clock moves one step each time the workers have drained the bucket
    // (a 429 was seen since the last step), so every token is contended for.
    let driver = {
        let (clock, stop, refused) = (host.clock(), stop.clone(), refused.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            for _ in 0..steps {
                let seen = refused.load(Ordering::SeqCst);
                while refused.load(Ordering::SeqCst) == seen && start.elapsed() < DEADLINE {
                    std::thread::yield_now();
                }
                clock.advance(step);
            }
            // Let the last step's tokens be taken.
            let seen = refused.load(Ordering::SeqCst);
            while refused.load(Ordering::SeqCst) == seen && start.elapsed() < DEADLINE {
                std::thread::yield_now();
            }
            stop.store(true, Ordering::SeqCst);
        })
    };
    let counts = {
        let (stop, refused) = (stop.clone(), refused.clone());
        run_workers(&host, vms, move |_, vm| {
            let mut c = Counts::default();
            while !stop.load(Ordering::SeqCst) {
                let before = c.quota;
                send(vm, "/hammer", &mut c);
                if c.quota > before {
                    refused.fetch_add(1, Ordering::SeqCst);
                }
            }
            c
        })
    };
    driver.join().unwrap();
    let mut all = Counts::default();
    counts.iter().for_each(|c| all.add(*c));
    // burst + rate * elapsed.
    let allowed = 100 + 100 * steps * step.as_millis() as u64 / 1000;
    let bound = allowed + allowed / 100 + (w as u64 - 1);
    eprintln!(
        "moving clock, W={w}: admitted {} of {} (allowed {allowed}, bound {bound}); 429: {}, on_error {}",
        all.admitted,
        all.total(),
        all.quota,
        all.errors
    );
    assert!(all.admitted <= bound, "over-admission: {all:?}");
    assert!(
        all.admitted >= allowed * 95 / 100,
        "tokens lost or starved: {all:?}"
    );
}

#[test]
fn the_guarantee_holds_across_workers() {
    let host = host();
    let bundle = Tree::standard().bundle();
    let mut a_vm = configured_vm(&host, &bundle);
    let stop = Arc::new(AtomicBool::new(false));
    let b_admitted = Arc::new(AtomicU64::new(0));
    let hammering = {
        let (host, stop, b_admitted) = (host.clone(), stop.clone(), b_admitted.clone());
        let vms = vms(&host, &bundle, 3);
        std::thread::spawn(move || {
            run_workers(&host, vms, move |_, vm| {
                let mut c = Counts::default();
                while !stop.load(Ordering::SeqCst) {
                    send(vm, "/globex/b", &mut c);
                }
                b_admitted.fetch_add(c.admitted, Ordering::SeqCst);
                c
            })
        })
    };
    // /globex/a sends exactly at its rate, 10/s, for 10 simulated seconds.
    let mut refused = Vec::new();
    for i in 0..100 {
        std::thread::sleep(Duration::from_millis(1));
        host.clock().advance(Duration::from_millis(100));
        let resp = get(&mut a_vm, "/globex/a", "gus", "/globex/a", "/x");
        if !resp.is_continue() {
            refused.push((i, resp.status));
        }
    }
    stop.store(true, Ordering::SeqCst);
    hammering.join().unwrap();
    let b = b_admitted.load(Ordering::SeqCst);
    eprintln!("guarantee, 3 workers on /globex/b: /globex/a refused {refused:?}; /globex/b admitted {b} (ceil 40/s over 10 s + bursts)");
    assert!(
        refused.is_empty(),
        "a sibling on other workers starved /globex/a: {refused:?}"
    );
    assert!(b <= 40 * 10 + 40 + 40, "/globex/b over its ceil: {b}");
}

#[test]
fn vms_configuring_at_once_stay_within_the_documented_slack() {
    let host = host();
    let bundle = Arc::new(Tree::standard().bundle());
    let w = 8;
    // Configure on the workers' own threads, all at once, then hammer.
    let barrier = Arc::new(Barrier::new(w));
    let (tx, rx) = mpsc::channel();
    for _ in 0..w {
        let (host, bundle, barrier, tx) =
            (host.clone(), bundle.clone(), barrier.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut vm = host.vm().unwrap();
            barrier.wait();
            assert!(vm.configure(bundle.as_str()).unwrap());
            let mut c = Counts::default();
            for _ in 0..40 {
                send(&mut vm, "/hammer", &mut c);
            }
            let _ = tx.send(c);
        });
    }
    let mut all = Counts::default();
    for _ in 0..w {
        all.add(rx.recv_timeout(DEADLINE).expect("deadlock or starvation"));
    }
    let bound = 100 + 1 + (w as u64 - 1);
    eprintln!(
        "concurrent configure, W={w}: admitted {} (allowed 100, bound {bound})",
        all.admitted
    );
    assert!(all.admitted <= bound, "{all:?}");
    assert!(all.admitted >= 95, "{all:?}");
}
