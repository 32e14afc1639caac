//! What the control plane (`serve --xds`) knows about a fleet of Envoys and the
//! bundle versions it serves them: the versions it keeps, which version each
//! node should run (the fleet's target, or a canary's), what was sent on each
//! node's stream and what the node answered (ACK or NACK). Pure: no I/O, the
//! time is an argument; [`crate::xds`] drives it from the gRPC streams and the
//! HTTP API. See docs/reference.md ("The control plane").

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};

/// How many bundle versions the server keeps for rollouts and rollbacks
/// (the ones in use are kept besides).
pub const DEFAULT_KEEP: usize = 5;

/// What happens to a new version of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// It goes to every node at once.
    Auto,
    /// It is kept; `POST /v1/rollout` sends it.
    Manual,
}

/// Which nodes a canary goes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// Node ids matching a pattern (`*` matches any run of characters).
    Pattern(String),
    /// This fraction (0 < f <= 1) of the nodes connected now, rounded up.
    Fraction(f64),
}

/// A bundle version the server keeps.
#[derive(Debug, Clone)]
pub struct Version {
    pub version: String,
    /// The bundle as one line of JSON (the filter's plugin configuration).
    pub config: Arc<str>,
    pub loaded_ns: u64,
}

/// A response to send on a node's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub version: String,
    pub nonce: String,
    pub config: Arc<str>,
}

/// What a request on a stream was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The first request of a stream (no nonce): the node wants the config.
    Initial,
    /// The node applied the version last sent.
    Ack,
    /// The node refused the version last sent.
    Nack,
    /// A reply to an older response, or a request of a replaced stream.
    Stale,
}

#[derive(Debug, Clone)]
struct Canary {
    version: String,
    pattern: Option<String>,
    fraction: Option<f64>,
    /// The nodes a fraction chose when the canary started.
    nodes: BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct Sent {
    version: String,
    nonce: String,
    at: u64,
}

#[derive(Debug, Clone)]
struct Stamp {
    version: String,
    at: u64,
}

#[derive(Debug, Clone)]
struct Nack {
    version: String,
    error: String,
    at: u64,
}

#[derive(Debug, Clone)]
struct Node {
    cluster: String,
    /// The stream serving the node now (one per node).
    stream: Option<u64>,
    /// When it connected, or disconnected when `stream` is `None`.
    since: u64,
    /// The last response sent on the current stream.
    sent: Option<Sent>,
    acked: Option<Stamp>,
    nacked: Option<Nack>,
}

/// The last change of the source that the server refused.
#[derive(Debug, Clone)]
struct Refusal {
    errors: Vec<String>,
    at: u64,
}

/// The fleet's state.
#[derive(Debug)]
pub struct Fleet {
    mode: Mode,
    keep: usize,
    /// Oldest first.
    versions: VecDeque<Version>,
    /// The version of the source now (the last one that loaded).
    source: Option<String>,
    refusal: Option<Refusal>,
    target: Option<String>,
    previous: Option<String>,
    canary: Option<Canary>,
    nodes: BTreeMap<String, Node>,
    next_stream: u64,
    next_nonce: u64,
    pushes: u64,
    acks: u64,
    nacks: u64,
    refused: u64,
}

impl Fleet {
    pub fn new(mode: Mode, keep: usize) -> Fleet {
        Fleet {
            mode,
            keep: keep.max(1),
            versions: VecDeque::new(),
            source: None,
            refusal: None,
            target: None,
            previous: None,
            canary: None,
            nodes: BTreeMap::new(),
            next_stream: 1,
            next_nonce: 1,
            pushes: 0,
            acks: 0,
            nacks: 0,
            refused: 0,
        }
    }

    /// The version every node not in a canary should run.
    pub fn target(&self) -> Option<&str> {
        self.target.as_deref()
    }

    /// The kept versions, oldest first.
    pub fn versions(&self) -> impl Iterator<Item = &str> {
        self.versions.iter().map(|v| v.version.as_str())
    }

    fn kept(&self, version: &str) -> Option<&Version> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// A version of the source loaded (validated, tested and compiled).
    /// Returns whether the nodes' targets changed (something to push): not
    /// when the source's version is the one it already was. In
    /// [`Mode::Auto`] (and for the first version) it becomes the fleet's
    /// target and ends any canary.
    pub fn loaded(&mut self, version: &str, config: Arc<str>, now: u64) -> bool {
        self.refusal = None;
        if self.source.as_deref() == Some(version) {
            return false;
        }
        self.source = Some(version.to_string());
        if self.kept(version).is_none() {
            self.versions.push_back(Version {
                version: version.to_string(),
                config,
                loaded_ns: now,
            });
        }
        let changed = if self.mode == Mode::Auto || self.target.is_none() {
            let before = self.canary.take().is_some();
            self.set_target(version) || before
        } else {
            false
        };
        self.evict();
        changed
    }

    /// A change of the source did not load; nothing is pushed.
    pub fn refused(&mut self, errors: Vec<String>, now: u64) {
        self.refused += 1;
        self.refusal = Some(Refusal { errors, at: now });
    }

    fn set_target(&mut self, version: &str) -> bool {
        if self.target.as_deref() == Some(version) {
            return false;
        }
        self.previous = self.target.replace(version.to_string());
        true
    }

    /// Drops the oldest versions beyond `keep`, never one in use.
    fn evict(&mut self) {
        while self.versions.len() > self.keep {
            let in_use = |v: &str| {
                Some(v) == self.target.as_deref()
                    || Some(v) == self.previous.as_deref()
                    || Some(v) == self.source.as_deref()
                    || self.canary.as_ref().is_some_and(|c| c.version == v)
            };
            match self.versions.iter().position(|v| !in_use(&v.version)) {
                Some(i) => {
                    self.versions.remove(i);
                }
                None => break,
            }
        }
    }

    /// Sends `version` (default: the source's) to the nodes `selector`
    /// picks, or to every node. A selector makes a canary: the other nodes
    /// keep the fleet's target.
    pub fn rollout(
        &mut self,
        version: Option<&str>,
        selector: Option<Selector>,
    ) -> Result<String, String> {
        let version = match version.or(self.source.as_deref()) {
            Some(v) => v.to_string(),
            None => return Err("no version loaded yet".into()),
        };
        if self.kept(&version).is_none() {
            return Err(format!(
                "version `{version}` is not one the server keeps (`GET /v1/rollout` lists them)"
            ));
        }
        match selector {
            None => {
                self.canary = None;
                self.set_target(&version);
            }
            Some(Selector::Pattern(p)) => {
                if p.is_empty() {
                    return Err("`nodes` is empty".into());
                }
                self.canary = Some(Canary {
                    version: version.clone(),
                    pattern: Some(p),
                    fraction: None,
                    nodes: BTreeSet::new(),
                });
            }
            Some(Selector::Fraction(f)) => {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(format!("`fraction` must be above 0 and at most 1, got {f}"));
                }
                let mut connected: Vec<&String> = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.stream.is_some())
                    .map(|(id, _)| id)
                    .collect();
                if connected.is_empty() {
                    return Err("no node is connected".into());
                }
                connected.sort_by_key(|id| (fnv1a(id), (*id).clone()));
                let count = fraction_count(f, connected.len());
                let nodes = connected.into_iter().take(count).cloned().collect();
                self.canary = Some(Canary {
                    version: version.clone(),
                    pattern: None,
                    fraction: Some(f),
                    nodes,
                });
            }
        }
        self.evict();
        Ok(version)
    }

    /// Returns the fleet to `version` (default: the target before this one)
    /// and ends any canary.
    pub fn rollback(&mut self, version: Option<&str>) -> Result<String, String> {
        let version = match version.or(self.previous.as_deref()) {
            Some(v) => v.to_string(),
            None => return Err("no previous version to roll back to".into()),
        };
        if self.kept(&version).is_none() {
            return Err(format!(
                "version `{version}` is not one the server keeps (`GET /v1/rollout` lists them)"
            ));
        }
        self.canary = None;
        self.set_target(&version);
        Ok(version)
    }

    fn in_canary(&self, id: &str) -> Option<&Canary> {
        self.canary
            .as_ref()
            .filter(|c| c.nodes.contains(id) || c.pattern.as_deref().is_some_and(|p| glob(p, id)))
    }

    /// The version meant for a node.
    pub fn desired(&self, id: &str) -> Option<&str> {
        match self.in_canary(id) {
            Some(c) => Some(c.version.as_str()),
            None => self.target.as_deref(),
        }
    }

    /// A node opened a stream (its first request). Returns the stream's id;
    /// a previous stream of the node is replaced (its requests are stale and
    /// [`Fleet::current`] says it should close).
    pub fn connect(&mut self, id: &str, cluster: &str, now: u64) -> (u64, bool) {
        let stream = self.next_stream;
        self.next_stream += 1;
        let node = self.nodes.entry(id.to_string()).or_insert_with(|| Node {
            cluster: String::new(),
            stream: None,
            since: now,
            sent: None,
            acked: None,
            nacked: None,
        });
        let replaced = node.stream.is_some();
        node.cluster = cluster.to_string();
        node.stream = Some(stream);
        node.since = now;
        node.sent = None;
        (stream, replaced)
    }

    /// Whether `stream` is the node's current stream.
    pub fn current(&self, id: &str, stream: u64) -> bool {
        self.nodes.get(id).and_then(|n| n.stream) == Some(stream)
    }

    /// A stream ended.
    pub fn disconnect(&mut self, id: &str, stream: u64, now: u64) {
        if let Some(n) = self.nodes.get_mut(id).filter(|n| n.stream == Some(stream)) {
            n.stream = None;
            n.since = now;
            n.sent = None;
        }
    }

    /// A request on a node's stream: `version_info` (the version it runs),
    /// `nonce` (of the response it answers) and `error` (Envoy's
    /// `error_detail`, set on a NACK).
    pub fn request(
        &mut self,
        id: &str,
        stream: u64,
        version_info: &str,
        nonce: &str,
        error: Option<&str>,
        now: u64,
    ) -> Seen {
        let Some(node) = self.nodes.get_mut(id).filter(|n| n.stream == Some(stream)) else {
            return Seen::Stale;
        };
        if nonce.is_empty() {
            // A (re)connected node says what it runs.
            if !version_info.is_empty()
                && node
                    .acked
                    .as_ref()
                    .is_none_or(|a| a.version != version_info)
            {
                node.acked = Some(Stamp {
                    version: version_info.to_string(),
                    at: now,
                });
            }
            return Seen::Initial;
        }
        let Some(sent) = node.sent.as_ref().filter(|s| s.nonce == nonce) else {
            return Seen::Stale;
        };
        match error {
            Some(e) => {
                node.nacked = Some(Nack {
                    version: sent.version.clone(),
                    error: e.to_string(),
                    at: now,
                });
                if !version_info.is_empty()
                    && node
                        .acked
                        .as_ref()
                        .is_none_or(|a| a.version != version_info)
                {
                    node.acked = Some(Stamp {
                        version: version_info.to_string(),
                        at: now,
                    });
                }
                self.nacks += 1;
                Seen::Nack
            }
            None => {
                if version_info == sent.version {
                    node.nacked = None;
                }
                node.acked = Some(Stamp {
                    version: version_info.to_string(),
                    at: now,
                });
                self.acks += 1;
                Seen::Ack
            }
        }
    }

    /// The response to send on a node's stream now, if any: the version
    /// meant for it when that is not what this stream last sent (a version
    /// the node refused is not sent again until the node's version changes).
    pub fn push(&mut self, id: &str, stream: u64, now: u64) -> Option<Push> {
        let desired = self.desired(id)?.to_string();
        let config = Arc::clone(&self.kept(&desired)?.config);
        let node = self
            .nodes
            .get_mut(id)
            .filter(|n| n.stream == Some(stream))?;
        if node.sent.as_ref().is_some_and(|s| s.version == desired) {
            return None;
        }
        let nonce = self.next_nonce.to_string();
        self.next_nonce += 1;
        node.sent = Some(Sent {
            version: desired.clone(),
            nonce: nonce.clone(),
            at: now,
        });
        self.pushes += 1;
        Some(Push {
            version: desired,
            nonce,
            config,
        })
    }

    /// `GET /v1/rollout`.
    pub fn status(&self) -> Value {
        let mut nodes = serde_json::Map::new();
        let (mut connected, mut in_sync, mut nacking) = (0, 0, 0);
        for (id, n) in &self.nodes {
            let desired = self.desired(id);
            let sync = n.acked.as_ref().map(|a| a.version.as_str()) == desired;
            let refusing = n.nacked.as_ref().map(|k| k.version.as_str()) == desired;
            if n.stream.is_some() {
                connected += 1;
                in_sync += usize::from(sync);
                nacking += usize::from(refusing);
            }
            nodes.insert(
                id.clone(),
                json!({
                    "cluster": n.cluster,
                    "connected": n.stream.is_some(),
                    "since": rfc3339(n.since),
                    "desired": desired,
                    "canary": self.in_canary(id).is_some(),
                    "sent": n.sent.as_ref().map(|s| json!({
                        "version": s.version, "nonce": s.nonce, "at": rfc3339(s.at)
                    })),
                    "acked": n.acked.as_ref().map(|a| json!({
                        "version": a.version, "at": rfc3339(a.at)
                    })),
                    "nacked": n.nacked.as_ref().map(|k| json!({
                        "version": k.version, "error": k.error, "at": rfc3339(k.at)
                    })),
                    "in_sync": sync,
                }),
            );
        }
        let versions: Vec<Value> = self
            .versions
            .iter()
            .rev()
            .map(|v| json!({ "version": v.version, "loaded": rfc3339(v.loaded_ns) }))
            .collect();
        json!({
            "mode": match self.mode { Mode::Auto => "auto", Mode::Manual => "manual" },
            "source": {
                "version": self.source,
                "refused": self.refusal.as_ref().map(|r| json!({
                    "errors": r.errors, "at": rfc3339(r.at)
                })),
            },
            "target": self.target,
            "previous": self.previous,
            "canary": self.canary.as_ref().map(|c| json!({
                "version": c.version,
                "nodes": c.pattern,
                "fraction": c.fraction,
                "chosen": c.nodes,
            })),
            "versions": versions,
            "nodes": nodes,
            "summary": {
                "nodes": self.nodes.len(),
                "connected": connected,
                "in_sync": in_sync,
                "nacking": nacking,
            },
        })
    }

    /// The control plane's series in Prometheus' text format.
    pub fn metrics(&self) -> String {
        let mut by_version: BTreeMap<&str, u64> = BTreeMap::new();
        let (mut connected, mut out_of_sync, mut nacking) = (0u64, 0u64, 0u64);
        for (id, n) in self.nodes.iter().filter(|(_, n)| n.stream.is_some()) {
            connected += 1;
            let runs = n.acked.as_ref().map_or("none", |a| a.version.as_str());
            *by_version.entry(runs).or_default() += 1;
            let desired = self.desired(id);
            if n.acked.as_ref().map(|a| a.version.as_str()) != desired {
                out_of_sync += 1;
            }
            if n.nacked.as_ref().map(|k| k.version.as_str()) == desired {
                nacking += 1;
            }
        }
        let mut out = String::new();
        let mut series = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in rows {
                out.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        let rows: Vec<(String, u64)> = by_version
            .iter()
            .map(|(v, n)| (format!("{{version=\"{v}\"}}"), *n))
            .collect();
        series(
            "tenantgate_xds_nodes",
            "gauge",
            "Connected Envoys by the bundle version they last ACKed (`none`: none yet).",
            &rows,
        );
        series(
            "tenantgate_xds_nodes_connected",
            "gauge",
            "Envoys with an open xDS stream.",
            &[(String::new(), connected)],
        );
        series(
            "tenantgate_xds_nodes_out_of_sync",
            "gauge",
            "Connected Envoys not running the version meant for them.",
            &[(String::new(), out_of_sync)],
        );
        series(
            "tenantgate_xds_nodes_nacking",
            "gauge",
            "Connected Envoys that refused the version meant for them.",
            &[(String::new(), nacking)],
        );
        let target: Vec<(String, u64)> = self
            .target
            .iter()
            .map(|v| (format!("{{version=\"{v}\"}}"), 1))
            .collect();
        series(
            "tenantgate_xds_target",
            "gauge",
            "The version the fleet should run (1 for that version).",
            &target,
        );
        for (name, help, v) in [
            (
                "tenantgate_xds_pushes_total",
                "Configs sent to Envoys.",
                self.pushes,
            ),
            (
                "tenantgate_xds_acks_total",
                "Configs Envoys applied (ACK).",
                self.acks,
            ),
            (
                "tenantgate_xds_nacks_total",
                "Configs Envoys refused (NACK).",
                self.nacks,
            ),
            (
                "tenantgate_xds_source_refused_total",
                "Changes of the source refused by the server (not pushed).",
                self.refused,
            ),
        ] {
            series(name, "counter", help, &[(String::new(), v)]);
        }
        out
    }
}

/// How many of `n` nodes a fraction picks: rounded up, at least one.
fn fraction_count(f: f64, n: usize) -> usize {
    let mut count = 0;
    // Smallest count with count / n >= f (no float-to-int casts).
    while count < n && (count as f64) < f * n as f64 - 1e-9 {
        count += 1;
    }
    count.max(1)
}

/// FNV-1a: a stable order of node ids for fractions.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `*` matches any run of characters (none included); everything else itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = rest.get(i + p.len()..).unwrap_or(""),
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Nanoseconds since the Unix epoch as RFC 3339 UTC, milliseconds shown.
pub fn rfc3339(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let ms = (ns / 1_000_000) % 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    /// A fleet with versions v1 then v2 loaded in `mode`, and nodes a, b, c
    /// connected (streams 1, 2, 3).
    fn fleet(mode: Mode) -> Fleet {
        let mut f = Fleet::new(mode, 3);
        assert!(f.loaded("v1", cfg("{1}"), 1));
        for id in ["a", "b", "c"] {
            f.connect(id, "edge", 2);
        }
        f
    }

    /// Connects nothing new; pushes to a node and ACKs what was pushed.
    fn sync(f: &mut Fleet, id: &str, stream: u64) -> Option<String> {
        let p = f.push(id, stream, 3)?;
        assert_eq!(
            f.request(id, stream, &p.version, &p.nonce, None, 4),
            Seen::Ack
        );
        Some(p.version)
    }

    #[test]
    fn first_push_then_ack_then_nothing_more() {
        let mut f = fleet(Mode::Auto);
        assert_eq!(f.request("a", 1, "", "", None, 3), Seen::Initial);
        let p = f.push("a", 1, 3).unwrap();
        assert_eq!(
            (p.version.as_str(), p.nonce.as_str(), &*p.config),
            ("v1", "1", "{1}")
        );
        assert_eq!(f.push("a", 1, 3), None, "sent already");
        assert_eq!(f.request("a", 1, "v1", "1", None, 4), Seen::Ack);
        let s = f.status();
        assert_eq!(s["nodes"]["a"]["acked"]["version"], "v1");
        assert_eq!(s["nodes"]["a"]["in_sync"], true);
        assert_eq!(s["summary"]["in_sync"], 1);
        assert_eq!(f.push("a", 1, 5), None);
    }

    #[test]
    fn the_same_bundle_is_no_push() {
        let mut f = fleet(Mode::Auto);
        for (id, s) in [("a", 1), ("b", 2), ("c", 3)] {
            sync(&mut f, id, s);
        }
        assert!(!f.loaded("v1", cfg("{1}"), 9), "the same version");
        for (id, s) in [("a", 1), ("b", 2), ("c", 3)] {
            assert_eq!(f.push(id, s, 9), None);
        }
        assert!(f.loaded("v2", cfg("{2}"), 10));
        for (id, s) in [("a", 1), ("b", 2), ("c", 3)] {
            assert_eq!(sync(&mut f, id, s).as_deref(), Some("v2"));
        }
        assert!(f.metrics().contains("tenantgate_xds_pushes_total 6\n"));
        assert!(f
            .metrics()
            .contains("tenantgate_xds_nodes{version=\"v2\"} 3\n"));
    }

    #[test]
    fn nack_is_recorded_and_not_resent() {
        let mut f = fleet(Mode::Auto);
        sync(&mut f, "a", 1);
        f.loaded("v2", cfg("{2}"), 5);
        let p = f.push("a", 1, 6).unwrap();
        assert_eq!(
            f.request("a", 1, "v1", &p.nonce, Some("wasm: cannot load"), 7),
            Seen::Nack
        );
        let s = f.status();
        let a = &s["nodes"]["a"];
        assert_eq!(a["acked"]["version"], "v1", "still runs v1");
        assert_eq!(a["nacked"]["version"], "v2");
        assert_eq!(a["nacked"]["error"], "wasm: cannot load");
        assert_eq!(a["in_sync"], false);
        assert_eq!(s["summary"]["nacking"], 1);
        assert_eq!(
            f.push("a", 1, 8),
            None,
            "a refused version is not sent again"
        );
        assert!(f.metrics().contains("tenantgate_xds_nacks_total 1\n"));
        assert!(f.metrics().contains("tenantgate_xds_nodes_nacking 1\n"));
        // The next version clears it once ACKed.
        f.loaded("v3", cfg("{3}"), 9);
        assert_eq!(sync(&mut f, "a", 1).as_deref(), Some("v3"));
        assert!(f.status()["nodes"]["a"]["nacked"].is_null());
    }

    #[test]
    fn stale_nonces_and_replaced_streams() {
        let mut f = fleet(Mode::Auto);
        let p1 = f.push("a", 1, 3).unwrap();
        f.loaded("v2", cfg("{2}"), 4);
        let p2 = f.push("a", 1, 4).unwrap();
        assert_ne!(p1.nonce, p2.nonce);
        assert_eq!(f.request("a", 1, "v1", &p1.nonce, None, 5), Seen::Stale);
        assert_eq!(f.request("a", 1, "v2", &p2.nonce, None, 5), Seen::Ack);
        // The same node id connects again: the old stream is stale.
        let (s, replaced) = f.connect("a", "edge", 6);
        assert!(replaced);
        assert!(!f.current("a", 1));
        assert_eq!(f.request("a", 1, "v2", &p2.nonce, None, 6), Seen::Stale);
        assert_eq!(f.push("a", 1, 6), None);
        assert_eq!(f.request("a", s, "v2", "", None, 6), Seen::Initial);
        // A new stream gets the config again (Envoy waits for a response).
        assert_eq!(f.push("a", s, 6).unwrap().version, "v2");
        f.disconnect("a", 1, 7);
        assert!(f.current("a", s), "the old stream's end leaves the new one");
        f.disconnect("a", s, 7);
        assert_eq!(f.status()["nodes"]["a"]["connected"], false);
        assert_eq!(f.status()["nodes"]["a"]["acked"]["version"], "v2");
    }

    #[test]
    fn a_reconnecting_node_reports_what_it_runs() {
        let mut f = Fleet::new(Mode::Auto, 3);
        f.loaded("v2", cfg("{2}"), 1);
        let (s, _) = f.connect("a", "edge", 2);
        assert_eq!(f.request("a", s, "v1", "", None, 2), Seen::Initial);
        assert_eq!(f.status()["nodes"]["a"]["acked"]["version"], "v1");
        assert_eq!(f.status()["nodes"]["a"]["in_sync"], false);
        assert_eq!(sync(&mut f, "a", s).as_deref(), Some("v2"));
    }

    #[test]
    fn canary_by_pattern_then_all() {
        let mut f = fleet(Mode::Manual);
        for (id, s) in [("a", 1), ("b", 2), ("c", 3)] {
            sync(&mut f, id, s);
        }
        assert!(!f.loaded("v2", cfg("{2}"), 5), "manual: kept, not pushed");
        assert_eq!(f.target(), Some("v1"));
        assert_eq!(f.push("a", 1, 5), None);
        f.rollout(None, Some(Selector::Pattern("b".into())))
            .unwrap();
        assert_eq!(f.push("a", 1, 6), None);
        assert_eq!(sync(&mut f, "b", 2).as_deref(), Some("v2"));
        assert_eq!(f.push("c", 3, 6), None);
        let s = f.status();
        assert_eq!(s["canary"]["version"], "v2");
        assert_eq!(s["nodes"]["b"]["canary"], true);
        assert_eq!(s["nodes"]["a"]["desired"], "v1");
        assert!(f
            .metrics()
            .contains("tenantgate_xds_nodes{version=\"v1\"} 2\n"));
        f.rollout(Some("v2"), None).unwrap();
        assert_eq!(sync(&mut f, "a", 1).as_deref(), Some("v2"));
        assert_eq!(f.push("b", 2, 7), None, "b runs v2 already");
        assert_eq!(sync(&mut f, "c", 3).as_deref(), Some("v2"));
        assert!(f.status()["canary"].is_null());
        assert_eq!(f.status()["previous"], "v1");
    }

    #[test]
    fn canary_by_fraction_picks_a_stable_subset() {
        let mut f = fleet(Mode::Manual);
        f.loaded("v2", cfg("{2}"), 5);
        f.rollout(None, Some(Selector::Fraction(0.34))).unwrap();
        let chosen = f.status()["canary"]["chosen"].clone();
        assert_eq!(chosen.as_array().unwrap().len(), 2, "0.34 of 3, rounded up");
        f.rollout(None, Some(Selector::Fraction(0.3))).unwrap();
        let one = f.status()["canary"]["chosen"].clone();
        assert_eq!(one.as_array().unwrap().len(), 1);
        assert!(
            chosen.as_array().unwrap().contains(&one[0]),
            "a stable order"
        );
        for bad in [0.0, -1.0, 1.5, f64::NAN] {
            assert!(f.rollout(None, Some(Selector::Fraction(bad))).is_err());
        }
        assert_eq!(fraction_count(1.0, 3), 3);
        assert_eq!(fraction_count(0.5, 4), 2);
        assert_eq!(fraction_count(0.01, 4), 1);
    }

    #[test]
    fn rollback_goes_to_the_previous_target() {
        let mut f = fleet(Mode::Auto);
        sync(&mut f, "a", 1);
        f.loaded("v2", cfg("{2}"), 5);
        sync(&mut f, "a", 1);
        assert_eq!(f.rollback(None).unwrap(), "v1");
        assert_eq!(sync(&mut f, "a", 1).as_deref(), Some("v1"));
        assert_eq!(f.rollback(Some("v2")).unwrap(), "v2");
        assert!(f.rollback(Some("v9")).unwrap_err().contains("`v9`"));
        assert!(Fleet::new(Mode::Auto, 3).rollback(None).is_err());
        // A reverted source is a change again (auto mode pushes it).
        assert!(f.loaded("v1", cfg("{1}"), 8));
        assert_eq!(f.target(), Some("v1"));
    }

    #[test]
    fn refused_changes_push_nothing() {
        let mut f = fleet(Mode::Auto);
        sync(&mut f, "a", 1);
        f.refused(vec!["p.cedar:1:2: error: bad".into()], 5);
        assert_eq!(f.push("a", 1, 5), None);
        let s = f.status();
        assert_eq!(
            s["source"]["refused"]["errors"][0],
            "p.cedar:1:2: error: bad"
        );
        assert_eq!(s["source"]["version"], "v1");
        assert!(f
            .metrics()
            .contains("tenantgate_xds_source_refused_total 1\n"));
        f.loaded("v1", cfg("{1}"), 6);
        assert!(f.status()["source"]["refused"].is_null());
    }

    #[test]
    fn keeps_the_last_versions_and_those_in_use() {
        let mut f = Fleet::new(Mode::Manual, 2);
        for (i, v) in ["v1", "v2", "v3", "v4"].iter().enumerate() {
            f.loaded(v, cfg(v), i as u64);
        }
        // v1 is the target (manual), v4 the source.
        assert_eq!(f.versions().collect::<Vec<_>>(), ["v1", "v4"]);
        assert!(f.rollout(Some("v2"), None).is_err());
        f.rollout(Some("v4"), None).unwrap();
        f.loaded("v5", cfg("v5"), 9);
        // Target v4, previous v1, source v5: all in use.
        assert_eq!(f.versions().collect::<Vec<_>>(), ["v1", "v4", "v5"]);
    }

    #[test]
    fn globs() {
        for (p, s, want) in [
            ("envoy-1", "envoy-1", true),
            ("envoy-1", "envoy-10", false),
            ("envoy-*", "envoy-10", true),
            ("*-eu-*", "edge-eu-3", true),
            ("*-eu-*", "edge-us-3", false),
            ("*", "", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(glob(p, s), want, "{p} {s}");
        }
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_796_644_800_123_000_000),
            "2026-12-07T12:00:00.123Z"
        );
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
    }
}
