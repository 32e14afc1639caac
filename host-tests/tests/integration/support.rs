//! Shared helpers: policy trees written to temp folders and compiled with the
//! engine, a host over the real `tenantgate.wasm`, and small assertions.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use tenantgate_host_tests::{locate_wasm, Host, LogLine, Response, Vm};

pub use tenantgate_filter::metric_names as names;

/// The module under test; fails with a clear message if it was not built.
pub fn wasm() -> PathBuf {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PATH.get_or_init(|| locate_wasm().map_err(|e| e.to_string())) {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

pub fn host() -> Host {
    Host::new(wasm()).unwrap_or_else(|e| panic!("cannot start the host: {e:?}"))
}

/// A policy tree in a temporary folder (laid out as in docs/reference.md, "The
/// policy folder").
pub struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    /// Just a root tenant, no settings, no policies.
    pub fn empty() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tenants")).unwrap();
        Tree { dir }
    }

    /// The tree most tests use:
    /// - settings: principal tenant from `x-user-tenant`, audit all, reasons exposed;
    /// - `/` (rps 1000/s) permits anything inside the principal's home subtree,
    ///   forbids `/admin*`;
    /// - `/acme` (rps 10/s, burst 10, ceil 10), `/acme/eu` (no limit of its own);
    /// - `/globex` (rps 20/s, ceil 40) with `/globex/a` and `/globex/b` (10/s each,
    ///   ceil 40): the guarantee and borrowing;
    /// - `/hammer` (rps 100/s, burst 100, ceil 100) and `/t1`..`/t8` (50/s) for the
    ///   multi-worker tests.
    pub fn standard() -> Tree {
        Tree::standard_with(
            r#"{ "principal_tenant": { "header": "x-user-tenant" }, "audit": "all",
                 "expose_reasons": true, "costs": { "POST": 2 } }"#,
        )
    }

    /// [`Tree::standard`] with other settings.
    pub fn standard_with(settings: &str) -> Tree {
        let mut t = Tree::empty()
            .settings(settings)
            .tenant("/", r#"{ "limits": { "rps": { "rate": 1000, "per": "1s", "burst": 1000 } } }"#)
            .policy(
                "/",
                "base.cedar",
                r#"
@id("members")
permit (principal, action, resource) when { resource in principal.tenant };

@id("no-admin")
forbid (principal, action, resource) when { resource.path like "/admin*" };
"#,
            )
            .tenant("/acme", r#"{ "limits": { "rps": { "rate": 10, "per": "1s", "burst": 10, "ceil": 10 } } }"#)
            .tenant("/acme/eu", "{}")
            .tenant("/globex", r#"{ "limits": { "rps": { "rate": 20, "per": "1s", "burst": 20, "ceil": 40 } } }"#)
            .tenant("/globex/a", r#"{ "limits": { "rps": { "rate": 10, "per": "1s", "burst": 10, "ceil": 40 } } }"#)
            .tenant("/globex/b", r#"{ "limits": { "rps": { "rate": 10, "per": "1s", "burst": 10, "ceil": 40 } } }"#)
            .tenant("/hammer", r#"{ "limits": { "rps": { "rate": 100, "per": "1s", "burst": 100, "ceil": 100 } } }"#);
        for i in 1..=8 {
            t = t.tenant(
                &format!("/t{i}"),
                r#"{ "limits": { "rps": { "rate": 50, "per": "1s", "burst": 50, "ceil": 50 } } }"#,
            );
        }
        t
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `tenantgate.json`.
    pub fn settings(self, json: &str) -> Tree {
        std::fs::write(self.path().join("tenantgate.json"), json).unwrap();
        self
    }

    fn tenant_dir(&self, tenant: &str) -> PathBuf {
        let mut d = self.path().join("tenants");
        for seg in tenant.split('/').filter(|s| !s.is_empty()) {
            d = d.join(seg);
        }
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes a tenant's `tenant.json`.
    pub fn tenant(self, tenant: &str, json: &str) -> Tree {
        std::fs::write(self.tenant_dir(tenant).join("tenant.json"), json).unwrap();
        self
    }

    /// Writes a `.cedar` file attached to a tenant.
    pub fn policy(self, tenant: &str, file: &str, text: &str) -> Tree {
        std::fs::write(self.tenant_dir(tenant).join(file), text).unwrap();
        self
    }

    /// The bundle JSON (the filter's plugin configuration).
    pub fn bundle(&self) -> String {
        bundle_of(self.path())
    }
}

pub fn bundle_of(dir: &Path) -> String {
    match tenantgate_engine::Bundle::from_dir(dir) {
        Ok(b) => b.to_json(),
        Err(d) => panic!("the test tree does not bundle:\n{d}"),
    }
}

/// The bundle of the repository's example tree, `policies/`.
pub fn example_bundle() -> String {
    bundle_of(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"))
}

/// The example tree with `settings` merged over its `tenantgate.json` and the
/// `tenant.json` of some tenants replaced (in memory; the version recomputed).
pub fn example_variant_with(settings: Value, tenants: &[(&str, Value)]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut b = tenantgate_engine::Bundle::from_dir(&dir).unwrap();
    let mut s = serde_json::to_value(&b.settings).unwrap();
    for (k, v) in settings.as_object().unwrap() {
        s[k] = v.clone();
    }
    b.settings = serde_json::from_value(s).unwrap();
    for (path, config) in tenants {
        let t = b
            .tenants
            .iter_mut()
            .find(|t| t.path.as_str() == *path)
            .unwrap_or_else(|| panic!("no tenant {path} in the example tree"));
        let text = serde_json::to_string_pretty(config).unwrap();
        match &mut t.config {
            Some(src) => src.text = text,
            None => {
                t.config = Some(tenantgate_engine::bundle::SourceFile {
                    file: format!("tenants{path}/tenant.json"),
                    text,
                })
            }
        }
    }
    b.version = b.compute_version();
    b.to_json()
}

/// A host and one configured VM.
pub fn gate(tree: &Tree) -> (Host, Vm) {
    let host = host();
    let vm = configured_vm(&host, &tree.bundle());
    (host, vm)
}

pub fn configured_vm(host: &Host, bundle: &str) -> Vm {
    let mut vm = host.vm().unwrap();
    let ok = vm.configure(bundle).unwrap();
    assert!(ok, "the filter refused the bundle:\n{}", dump_logs(host));
    vm
}

pub fn dump_logs(host: &Host) -> String {
    host.logs()
        .iter()
        .map(|l| format!("  [vm {} {:?}] {}", l.vm, l.level, l.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `GET path` to `tenant` as `user` whose home is `home`.
pub fn get(vm: &mut Vm, tenant: &str, user: &str, home: &str, path: &str) -> Response {
    vm.request()
        .header("x-tenant", tenant)
        .header("x-user", user)
        .header("x-user-tenant", home)
        .path(path)
        .send()
        .unwrap()
}

/// Asserts the response is a local reply with this status and a JSON body;
/// returns the body.
#[track_caller]
pub fn expect_reply(resp: &Response, status: u16) -> Value {
    assert!(
        !resp.is_continue(),
        "expected a {status} reply, the request went through: {resp:?}"
    );
    assert_eq!(resp.status, status, "body: {}", resp.body_str());
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("application/json"),
        "{resp:?}"
    );
    resp.json().unwrap()
}

#[track_caller]
pub fn expect_continue(resp: &Response) {
    assert!(
        resp.is_continue(),
        "expected the request to go through, got {} {}",
        resp.status,
        resp.body_str()
    );
    assert_eq!(resp.status, 200);
}

/// Audit lines (JSON objects with a `decision` field) logged so far.
pub fn audit_lines(host: &Host) -> Vec<Value> {
    host.logs()
        .iter()
        .filter_map(|l: &LogLine| serde_json::from_str::<Value>(&l.message).ok())
        .filter(|v| v.get("decision").is_some())
        .collect()
}

/// A metric's value; a metric the filter never defined is a test failure
/// (a misspelt name would otherwise read as 0 and pass).
pub fn metric(host: &Host, name: &str) -> u64 {
    host.metric(name)
        .unwrap_or_else(|| panic!("metric `{name}` was never defined by the filter"))
}

pub fn tenant_metric(host: &Host, tenant: &str, what: &str) -> u64 {
    let t = tenantgate_engine::TenantPath::parse(tenant).unwrap();
    metric(host, &names::tenant(&t, what))
}

/// A tenant's refusals for one reason (`policy`, `quota`, `bad_request`, `error`).
pub fn tenant_refused(host: &Host, tenant: &str, reason: &str) -> u64 {
    let t = tenantgate_engine::TenantPath::parse(tenant).unwrap();
    metric(host, &names::tenant_refused(&t, reason))
}

/// A tenant's refusals, all reasons.
pub fn tenant_refused_all(host: &Host, tenant: &str) -> u64 {
    names::REASONS
        .iter()
        .map(|r| tenant_refused(host, tenant, r))
        .sum()
}

/// A per-limit series of the node that declares the limit.
pub fn limit_metric(host: &Host, tenant: &str, limit: &str, what: &str) -> u64 {
    let t = tenantgate_engine::TenantPath::parse(tenant).unwrap();
    metric(host, &names::limit(&t, limit, what))
}
