//! The fleet limits the service enforces, read from a bundle, and how a
//! request's descriptors map to them.

use std::path::Path;

use tenantgate_engine::fleet::{
    FleetLimit, FleetLimits, DEFAULT_DOMAIN, LIMIT_KEY, REPORT_ENTRY, TENANT_KEY,
};
use tenantgate_engine::{Bundle, Engine};

/// One loaded bundle's fleet limits. Immutable: a reload builds a new one.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The bundle's `sha256:` version.
    pub version: String,
    pub fleet: FleetLimits,
    /// The bundle's rate limit domain (`rate_limit_service.domain`, else
    /// `tenantgate`): what its filters send.
    pub domain: String,
    /// `rate_limit_service.report_interval_ms` (the default when unset): how
    /// often RLQS clients report; reports and assignments live
    /// [`crate::quota::TTL_INTERVALS`] of them.
    pub report_interval_ms: u64,
    /// The root tenant declares a fleet limit, so every request's chain holds
    /// the root's counter: every key then shares the hash tag `{/}`.
    root_declares: bool,
    /// The bundle's warnings and notes (docs/reference.md, "Warnings and
    /// notes"), for the log: fleet limits without `rate_limit_service` are
    /// never sent here.
    pub warnings: Vec<String>,
}

/// What one request descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match<'a> {
    /// A fleet limit of the bundle; `report` when it ends with the report entry.
    Limit { limit: &'a FleetLimit, report: bool },
    /// Not a descriptor of this bundle: answered OK, with no limit.
    Unknown,
}

impl Limits {
    /// Reads and validates a bundle file or a policy folder (the whole
    /// bundle, policies included, as the filter would: one source of truth).
    /// Errors name the file, line and column as `tenantgate validate` does.
    pub fn load(path: &Path) -> Result<Limits, String> {
        let loaded = Bundle::load(path).map_err(|d| format!("the bundle does not load:\n{d}"))?;
        let mut limits = Self::from_engine(loaded.bundle.version, &loaded.engine);
        limits.warnings = loaded.warnings.iter().map(ToString::to_string).collect();
        Ok(limits)
    }

    fn from_engine(version: String, engine: &Engine) -> Limits {
        let fleet = engine.fleet_limits().clone();
        let root_declares = fleet.all().iter().any(|l| l.tenant.is_root());
        let service = engine.settings().rate_limit_service.clone();
        let domain = service
            .as_ref()
            .map_or(DEFAULT_DOMAIN, |r| r.domain.as_str())
            .to_owned();
        let report_interval_ms = u64::from(service.unwrap_or_default().report_interval_ms);
        Limits {
            version,
            fleet,
            domain,
            report_interval_ms,
            root_declares,
            warnings: Vec::new(),
        }
    }

    /// A bundle document's fleet limits.
    pub fn from_json(text: &str) -> Result<Limits, String> {
        let bundle = Bundle::from_json(text).map_err(|d| d.to_string())?;
        let engine = Engine::new(&bundle).map_err(|d| d.to_string())?;
        Ok(Self::from_engine(bundle.version, &engine))
    }

    /// Maps a descriptor's entries: `[("tenant", A), ("limit", N)]`, optionally
    /// followed by the report entry. Anything else is unknown.
    pub fn match_descriptor<'a, 'e>(
        &'a self,
        entries: impl IntoIterator<Item = (&'e str, &'e str)>,
    ) -> Match<'a> {
        let mut it = entries.into_iter();
        let (Some((TENANT_KEY, tenant)), Some((LIMIT_KEY, name))) = (it.next(), it.next()) else {
            return Match::Unknown;
        };
        let report = match (it.next(), it.next()) {
            (None, _) => false,
            (Some(e), None) if e == REPORT_ENTRY => true,
            _ => return Match::Unknown,
        };
        match self.fleet.get(tenant, name) {
            Some(limit) => Match::Limit { limit, report },
            None => Match::Unknown,
        }
    }

    /// The Redis key of a limit's counter:
    /// `tenantgate:rls:v1:{<tag>}:<tenant>:<name>:<window s>`. The hash tag is
    /// the declaring tenant's top-level segment, so a request's keys (its
    /// chain, all under one top-level tenant) land in one Cluster slot; when
    /// the root declares a fleet limit every chain holds it, so every key is
    /// tagged `{/}`. The rate is not in the key: a reload that changes a
    /// limit's rate applies it to the current window's count; one that changes
    /// its window starts a new counter.
    pub fn counter_key(&self, l: &FleetLimit) -> String {
        let tag = if self.root_declares {
            "/"
        } else {
            l.tenant
                .as_str()
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or("/")
        };
        format!(
            "tenantgate:rls:v1:{{{tag}}}:{}:{}:{}",
            l.tenant, l.name, l.per_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(root: &str, acme: &str) -> Limits {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("tenants");
        std::fs::create_dir_all(t.join("acme/eu")).unwrap();
        std::fs::write(t.join("tenant.json"), root).unwrap();
        std::fs::write(t.join("acme/tenant.json"), acme).unwrap();
        let b = Bundle::from_dir(dir.path()).unwrap();
        Limits::from_json(&b.to_json()).unwrap()
    }

    #[test]
    fn keys_share_the_top_level_tag() {
        let l = bundle(
            "{}",
            r#"{"limits": {"rpm": {"rate": 10, "per": "1m", "scope": "fleet"}}}"#,
        );
        let rpm = l.fleet.get("/acme", "rpm").unwrap();
        assert_eq!(l.counter_key(rpm), "tenantgate:rls:v1:{acme}:/acme:rpm:60");
        let l = bundle(
            r#"{"limits": {"rpm": {"rate": 100, "per": "1m", "scope": "fleet"}}}"#,
            r#"{"limits": {"rpm": {"rate": 10, "scope": "fleet"}}}"#,
        );
        let rpm = l.fleet.get("/acme", "rpm").unwrap();
        assert_eq!(l.counter_key(rpm), "tenantgate:rls:v1:{/}:/acme:rpm:60");
    }

    #[test]
    fn matches_descriptors() {
        let l = bundle(
            "{}",
            r#"{"limits": {"rpm": {"rate": 10, "per": "1m", "scope": "fleet"}}}"#,
        );
        let m = |e: &[(&str, &str)]| match l.match_descriptor(e.iter().copied()) {
            Match::Limit { limit, report } => Some((limit.rate, report)),
            Match::Unknown => None,
        };
        assert_eq!(
            m(&[("tenant", "/acme"), ("limit", "rpm")]),
            Some((10, false))
        );
        assert_eq!(
            m(&[
                ("tenant", "/acme"),
                ("limit", "rpm"),
                ("tenantgate_report", "1")
            ]),
            Some((10, true))
        );
        assert_eq!(m(&[("tenant", "/acme"), ("limit", "rps")]), None);
        assert_eq!(m(&[("limit", "rpm"), ("tenant", "/acme")]), None);
        assert_eq!(m(&[("tenant", "/acme")]), None);
        assert_eq!(
            m(&[("tenant", "/acme"), ("limit", "rpm"), ("key", "alice")]),
            None
        );
        assert_eq!(m(&[]), None);
    }
}
