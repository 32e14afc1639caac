//! What tenantgate's two servers share: `tenantgate serve` (the decision
//! service and control plane) and `tenantgate-rls` (the rate limit service).
//!
//! - [`Reloadable`]: the value a reload replaces (a bundle, compiled limits).
//!   Readers take a snapshot; a reload that fails leaves the previous value
//!   serving (last known good).
//! - [`Signals`]: SIGHUP reloads, SIGTERM and SIGINT stop. Installed before
//!   anything listens, so a signal that arrives during start-up is not lost
//!   to the default action (which would kill the process).
//! - [`serve_until`]: runs the servers until the stop signal, then lets open
//!   connections finish for a grace period and closes what is left.
//!
//! The servers' behaviour on these signals is in `docs/reference.md`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

/// How long a graceful shutdown waits for open connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A value that reloads replace while readers keep the snapshot they took.
#[derive(Debug)]
pub struct Reloadable<T> {
    current: watch::Sender<Arc<T>>,
}

impl<T> Reloadable<T> {
    pub fn new(first: impl Into<Arc<T>>) -> Self {
        Reloadable {
            current: watch::Sender::new(first.into()),
        }
    }

    /// The value serving now.
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.current.borrow())
    }

    /// A receiver that always sees the value serving now (for tasks that
    /// outlive a borrow of `self`).
    pub fn subscribe(&self) -> watch::Receiver<Arc<T>> {
        self.current.subscribe()
    }

    /// Makes `new` the value serving from now on; returns the one it replaced.
    pub fn replace(&self, new: impl Into<Arc<T>>) -> Arc<T> {
        self.current.send_replace(new.into())
    }
}

/// The outcome of one reload, as the servers log it: `reloaded bundle NEW
/// (was OLD)` or `reload failed, keeping bundle OLD: ERROR`.
pub fn reload_line(old: &str, result: &Result<String, String>) -> String {
    match result {
        Ok(new) => format!("reloaded bundle {new} (was {old})"),
        Err(e) => format!("reload failed, keeping bundle {old}: {e}"),
    }
}

/// The signals a server answers.
#[derive(Debug)]
pub struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    /// Installs the handlers (inside a Tokio runtime).
    pub fn install() -> Result<Signals, String> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| format!("cannot handle {name}: {e}"))
        };
        Ok(Signals {
            hangup: install(SignalKind::hangup(), "SIGHUP")?,
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// Calls `reload` (on a task of its own) on every SIGHUP, one at a time;
    /// returns the future that completes on the first SIGTERM or SIGINT.
    pub fn reload_on_hangup(
        self,
        mut reload: impl FnMut() + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let Signals {
            mut hangup,
            mut terminate,
            mut interrupt,
        } = self;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                reload();
            }
        });
        async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
    }
}

/// The stop signal the servers of one process share: each server stops
/// accepting when it fires and finishes the calls under way.
#[derive(Debug, Clone)]
pub struct Stop {
    rx: watch::Receiver<bool>,
}

impl Stop {
    /// Completes once the stop signal has fired (at once if it has).
    pub fn fired(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Whether the stop signal has fired.
    pub fn has_fired(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Runs the servers `start` builds until `shutdown` completes, then gives
/// their open connections up to `grace` to finish; what is still open after
/// that is closed (the servers' future is dropped). `log` gets
/// `shutting down` when `shutdown` completes and a line when the grace ran
/// out. An error is the servers' own.
pub async fn serve_until<S>(
    start: impl FnOnce(Stop) -> S,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    log: fn(&str),
) -> Result<(), String>
where
    S: Future<Output = Result<(), String>>,
{
    let (tx, rx) = watch::channel(false);
    let stop = Stop { rx };
    let servers = start(stop.clone());
    let grace_log = format!(
        "connections still open {} s after the signal; closing them",
        grace.as_secs_f64()
    );
    tokio::spawn(async move {
        shutdown.await;
        log("shutting down");
        tx.send_replace(true);
        // Keep the sender until the servers are gone: dropping it would
        // look like a signal to receivers that wait for a change.
        tx.closed().await;
    });
    let deadline = {
        let fired = stop.fired();
        async move {
            fired.await;
            tokio::time::sleep(grace).await;
        }
    };
    tokio::select! {
        r = servers => r,
        () = deadline => {
            log(&grace_log);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn quiet(_: &str) {}

    #[test]
    fn a_reload_replaces_what_new_readers_see_not_what_old_ones_hold() {
        let r: Reloadable<String> = Reloadable::new(String::from("v1"));
        let held = r.current();
        let mut rx = r.subscribe();
        let old = r.replace(String::from("v2"));
        assert_eq!(*old, "v1");
        assert_eq!(*held, "v1");
        assert_eq!(*r.current(), "v2");
        assert!(rx.has_changed().unwrap());
        assert_eq!(**rx.borrow_and_update(), "v2");
    }

    #[test]
    fn reload_lines_name_both_versions() {
        assert_eq!(
            reload_line("a", &Ok("b".into())),
            "reloaded bundle b (was a)"
        );
        assert_eq!(
            reload_line("a", &Err("x.cedar:1:2: bad".into())),
            "reload failed, keeping bundle a: x.cedar:1:2: bad"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn servers_that_finish_their_calls_stop_before_the_grace_ends() {
        let begun = tokio::time::Instant::now();
        let r = serve_until(
            |stop| async move {
                stop.fired().await;
                // A call under way finishes 1 s after the signal.
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            },
            tokio::time::sleep(Duration::from_secs(2)),
            Duration::from_secs(5),
            quiet,
        )
        .await;
        assert_eq!(r, Ok(()));
        assert_eq!(begun.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_stays_open_is_closed_when_the_grace_ends() {
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        struct Connection;
        impl Drop for Connection {
            fn drop(&mut self) {
                DROPPED.fetch_add(1, Ordering::SeqCst);
            }
        }
        let begun = tokio::time::Instant::now();
        let r = serve_until(
            |_stop| async move {
                let _open = Connection;
                std::future::pending::<()>().await;
                Ok(())
            },
            tokio::time::sleep(Duration::from_secs(2)),
            Duration::from_secs(5),
            quiet,
        )
        .await;
        assert_eq!(r, Ok(()));
        assert_eq!(begun.elapsed(), Duration::from_secs(7));
        assert_eq!(DROPPED.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_error_is_returned_without_waiting_for_a_signal() {
        let r = serve_until(
            |stop| async move {
                assert!(!stop.has_fired());
                Err::<(), _>("http: address in use".to_string())
            },
            std::future::pending(),
            Duration::from_secs(5),
            quiet,
        )
        .await;
        assert_eq!(r, Err("http: address in use".to_string()));
    }
}
