//! `tenantgate limits BUNDLE --format limitador|ratelimit`: the bundle's fleet
//! limits as the configuration of another rate limit service, for operators
//! who already run one. Each request descriptor is
//! `[("tenant", A), ("limit", N)]` (see `docs/fleet.md`).
//!
//! - Limitador: its limits file, one limit per fleet limit, in `namespace`
//!   = the domain, matched with `descriptors.exists(...)` because a request
//!   carries one descriptor per limit of its tenant chain.
//! - envoyproxy/ratelimit: its config file, one `tenant` descriptor per
//!   declaring tenant with one nested `limit` descriptor per limit. It has
//!   only the units second, minute, hour and day and 32-bit counts: a limit
//!   it cannot express is an error naming the limit.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use tenantgate_engine::fleet::{FleetLimit, FleetLimits};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Limitador's limits file (YAML).
    Limitador,
    /// envoyproxy/ratelimit's config file (YAML).
    Ratelimit,
}

/// The `limits` command: prints the rendering, or every limit the format
/// cannot express.
pub fn run(source: &Path, format: Format, domain: &str) -> Result<ExitCode, String> {
    let (_, engine) = crate::load(source)?;
    let text = match format {
        Format::Limitador => limitador(engine.fleet_limits(), domain),
        Format::Ratelimit => ratelimit(engine.fleet_limits(), domain).map_err(|errors| {
            let n = errors.len();
            let mut lines: Vec<String> = errors
                .into_iter()
                .map(|e| format!("{}: error: {e}", source.display()))
                .collect();
            lines.push(format!("{n} error{}", if n == 1 { "" } else { "s" }));
            lines.join("\n")
        })?,
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// A YAML double-quoted string. Tenant paths and limit names are lowercase
/// tokens and `/`, so this only guards the domain.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Limitador's limits file.
pub fn limitador(fleet: &FleetLimits, domain: &str) -> String {
    let mut out = String::from("---\n");
    if fleet.is_empty() {
        out.push_str("[]\n");
        return out;
    }
    for l in fleet.all() {
        let _ = write!(
            out,
            "- namespace: {}\n  name: {}\n  max_value: {}\n  seconds: {}\n  conditions:\n    - {}\n  variables: []\n",
            quoted(domain),
            quoted(&format!("{} {}", l.tenant, l.name)),
            l.rate,
            l.per_s,
            quoted(&format!(
                "descriptors.exists(d, d.tenant == '{}' && d.limit == '{}')",
                l.tenant, l.name
            )),
        );
    }
    out
}

/// envoyproxy/ratelimit's unit for a window, if it has one.
fn ratelimit_unit(per_s: u64) -> Option<&'static str> {
    match per_s {
        1 => Some("second"),
        60 => Some("minute"),
        3_600 => Some("hour"),
        86_400 => Some("day"),
        _ => None,
    }
}

/// envoyproxy/ratelimit's config, or one message per limit it cannot express.
pub fn ratelimit(fleet: &FleetLimits, domain: &str) -> Result<String, Vec<String>> {
    let mut errors = Vec::new();
    let mut out = format!("domain: {}\n", quoted(domain));
    if fleet.is_empty() {
        out.push_str("descriptors: []\n");
        return Ok(out);
    }
    out.push_str("descriptors:\n");
    let mut current: Option<&str> = None;
    for l in fleet.all() {
        let Some(unit) = check(l, &mut errors) else {
            continue;
        };
        if current != Some(l.tenant.as_str()) {
            let _ = write!(
                out,
                "  - key: tenant\n    value: {}\n    descriptors:\n",
                quoted(l.tenant.as_str())
            );
            current = Some(l.tenant.as_str());
        }
        let _ = write!(
            out,
            "      - key: limit\n        value: {}\n        rate_limit:\n          unit: {unit}\n          requests_per_unit: {}\n",
            quoted(&l.name),
            l.rate
        );
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The unit of a limit envoyproxy/ratelimit can express, else an error.
fn check(l: &FleetLimit, errors: &mut Vec<String>) -> Option<&'static str> {
    let unit = ratelimit_unit(l.per_s);
    if unit.is_none() {
        errors.push(format!(
            "limit `{}` of `{}`: its window of {} s is not one second, minute, hour or day, the only units of envoyproxy/ratelimit",
            l.name, l.tenant, l.per_s
        ));
    }
    if u32::try_from(l.rate).is_err() {
        errors.push(format!(
            "limit `{}` of `{}`: its rate {} does not fit envoyproxy/ratelimit's 32-bit `requests_per_unit` (at most {})",
            l.name,
            l.tenant,
            l.rate,
            u32::MAX
        ));
        return None;
    }
    unit
}
