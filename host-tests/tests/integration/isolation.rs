//! The tenant isolation matrix (SECURITY.md, "Isolation rules"), over the
//! example tree `policies/` in three bundle variants: the tenant from the
//! `x-tenant` header (the tree as shipped), from the path (`"tenant":
//! {"path_prefix": "/t"}`) and from JWT claims in dynamic metadata. Every row ends in a 4xx or in a decision the
//! policies allow; for allowed rows the test checks the tenant the upstream
//! sees (`x-tenantgate-tenant`), for 403s the tenant the decision was about and
//! the policy ids, and where it matters the normalized resource in the audit
//! line. The same rows run against real Envoy in `envoy/isolation_test.py`;
//! the table with the reasons is in `envoy/README.md`.
//!
//! Rows alternate between two VMs of one host (two workers sharing shared
//! data); afterwards both still serve, nothing trapped, and every 400 was
//! counted in `tenantgate.bad_request`.

use std::path::Path;

use serde_json::{json, Value};
use tenantgate_host_tests::{Host, Vm};

use crate::support::*;

const JWT: &str = "envoy.filters.http.jwt_authn";

/// One request of the matrix and what must come of it.
#[derive(Clone)]
struct Row {
    id: String,
    method: String,
    path: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    /// Request trailers (after the body).
    trailers: Vec<(String, String)>,
    /// The `envoy.filters.http.jwt_authn` / `payload` dynamic metadata.
    jwt: Option<Value>,
    want: Want,
}

#[derive(Clone, Default)]
struct Want {
    status: u16,
    /// 200: `x-tenantgate-tenant` at the upstream; 403: `tenant` of the body.
    tenant: Option<String>,
    /// 200: `x-tenantgate-principal` at the upstream (`Some(None)`: absent).
    principal: Option<Option<String>>,
    /// 403: the policy ids of the body (`expose_reasons` is on), any order.
    reasons: Option<Vec<String>>,
    /// The normalized resource in the audit line.
    resource: Option<String>,
    /// 200: the `:path` the upstream receives (the original, never rewritten).
    upstream_path: Option<String>,
}

fn row(id: &str) -> Row {
    Row {
        id: id.to_string(),
        method: "GET".into(),
        path: b"/orders/1".to_vec(),
        headers: Vec::new(),
        trailers: Vec::new(),
        jwt: None,
        want: Want::default(),
    }
}

impl Row {
    fn path(mut self, p: &str) -> Row {
        self.path = p.as_bytes().to_vec();
        self
    }
    fn path_bytes(mut self, p: &[u8]) -> Row {
        self.path = p.to_vec();
        self
    }
    fn method(mut self, m: &str) -> Row {
        self.method = m.into();
        self
    }
    fn h(mut self, name: &str, value: impl AsRef<[u8]>) -> Row {
        self.headers
            .push((name.to_string(), value.as_ref().to_vec()));
        self
    }
    fn trailer(mut self, name: &str, value: &str) -> Row {
        self.trailers.push((name.to_string(), value.to_string()));
        self
    }
    /// `x-tenant`.
    fn tenant(self, t: impl AsRef<[u8]>) -> Row {
        self.h("x-tenant", t)
    }
    /// `x-user` and its home tenant `x-user-tenant`.
    fn who(self, user: &str, home: &str) -> Row {
        self.h("x-user", user).h("x-user-tenant", home)
    }
    fn jwt(mut self, claims: Value) -> Row {
        self.jwt = Some(claims);
        self
    }
    fn ok(mut self, tenant: &str) -> Row {
        self.want.status = 200;
        self.want.tenant = Some(tenant.into());
        self
    }
    fn forbidden(mut self, tenant: &str, reasons: &[&str]) -> Row {
        self.want.status = 403;
        self.want.tenant = Some(tenant.into());
        self.want.reasons = Some(reasons.iter().map(|r| r.to_string()).collect());
        self
    }
    fn bad(mut self) -> Row {
        self.want.status = 400;
        self
    }
    fn resource(mut self, r: &str) -> Row {
        self.want.resource = Some(r.into());
        self
    }
    fn upstream_path(mut self, p: &str) -> Row {
        self.want.upstream_path = Some(p.into());
        self
    }
    fn principal(mut self, p: Option<&str>) -> Row {
        self.want.principal = Some(p.map(str::to_string));
        self
    }
}

/// alice, home /acme/eu (region eu): may read /acme/eu and below.
fn alice(r: Row) -> Row {
    r.who("alice", "/acme/eu")
}

// ---------------------------------------------------------------------------
// The rows. Ids match envoy/isolation_test.py and the table in envoy/README.md.

/// Tenant from `x-tenant` (policies/ as shipped).
fn header_rows() -> Vec<Row> {
    let internal = ["platform-internal-paths"];
    let iso = ["platform-isolation"];
    let a = |id: &str| alice(row(id).tenant("/acme/eu"));
    let mut rows = vec![
        a("H01")
            .path("/orders/1")
            .ok("/acme/eu")
            .principal(Some("alice"))
            .resource("/orders/1"),
        // Percent-decoding: hex digits in either case, decoded once.
        a("H02")
            .path("/orders/%2e%2E/orders/1")
            .ok("/acme/eu")
            .resource("/orders/1"),
        a("H03")
            .path("/i%6Eternal/keys")
            .forbidden("/acme/eu", &internal),
        a("H04")
            .path("/i%6eternal/keys")
            .forbidden("/acme/eu", &internal),
        // `..` plain, encoded, mixed; `.`; double-encoded stays data.
        a("H05")
            .path("/public/../internal/keys")
            .forbidden("/acme/eu", &internal),
        a("H06")
            .path("/public/%2e%2e/internal/keys")
            .forbidden("/acme/eu", &internal),
        a("H07")
            .path("/public/.%2E/internal/keys")
            .forbidden("/acme/eu", &internal),
        a("H08")
            .path("/./internal/%2e/keys")
            .forbidden("/acme/eu", &internal),
        // Double-encoded dot segments: an upstream that decodes twice would
        // climb, so they are refused.
        a("H09").path("/public/%252e%252e/internal/keys").bad(),
        // Empty segments and `;` parameters.
        a("H10")
            .path("//internal//keys")
            .forbidden("/acme/eu", &internal),
        // A dot segment with `;` parameters: servers disagree on whether it
        // climbs, so it is refused.
        a("H11").path("/public/..;/internal/keys").bad(),
        a("H12")
            .path("/internal;v=1/keys")
            .forbidden("/acme/eu", &internal),
        // Encoded `/` and `\`, climbing above the root.
        a("H13").path("/internal%2Fkeys").bad(),
        a("H14").path("/internal%2fkeys").bad(),
        a("H15").path("/internal%5Ckeys").bad(),
        a("H16").path("/internal%5ckeys").bad(),
        a("H17").path("/../internal/keys").bad(),
        a("H18").path("/orders/%2e%2e/%2E%2E/internal").bad(),
        a("H19").path("/..;/internal").bad(),
        // Tenant values: validated, never decoded or repaired.
        row("H20")
            .tenant("/acme/")
            .who("carol", "/acme")
            .ok("/acme"),
        alice(row("H21").tenant("/acme/eu/.")).bad(),
        alice(row("H22").tenant("/acme/eu/..")).bad(),
        alice(row("H23").tenant("/acme/./eu")).bad(),
        alice(row("H24").tenant("/acme//eu")).bad(),
        alice(row("H25").tenant("//acme/eu")).bad(),
        alice(row("H26").tenant("/ACME")).bad(),
        alice(row("H27").tenant("/Acme/eu")).bad(),
        alice(row("H28").tenant("/acme/EU")).bad(),
        alice(row("H29").tenant("/\u{430}cme/eu")).bad(), // Cyrillic а
        alice(row("H30").tenant("\u{ff0f}acme/eu")).bad(), // fullwidth solidus
        alice(row("H31").tenant("/acme/eu\u{200b}")).bad(), // zero-width space
        alice(row("H32").tenant("/acme%2Feu")).bad(),
        alice(row("H33").tenant("/acme/eu/%2e%2e")).bad(),
        alice(row("H34").tenant("/nope")).forbidden("/nope", &[]),
        // Duplicated identity headers are never guessed between.
        alice(row("H35").tenant("/acme/eu").tenant("/globex")).bad(),
        alice(row("H36").tenant("/acme/eu").tenant("/acme/eu")).bad(),
        row("H37")
            .tenant("/acme/eu")
            .h("x-user", "alice")
            .h("x-user", "gus")
            .h("x-user-tenant", "/acme/eu")
            .bad(),
        row("H38")
            .tenant("/acme/eu")
            .h("x-user", "alice")
            .h("x-user-tenant", "/acme/eu")
            .h("x-user-tenant", "/globex")
            .bad(),
        // A comma-joined list (what a proxy may make of two headers) is no tenant.
        alice(row("H39").tenant("/acme/eu,/globex")).bad(),
        // Header names are case-insensitive: `X-Tenant` and `x-tenant` are two.
        alice(row("H56").h("X-Tenant", "/acme/eu").tenant("/globex")).bad(),
        // Cross-tenant principals (home tenant elsewhere).
        row("H40")
            .tenant("/acme/us")
            .who("gus", "/globex")
            .forbidden("/acme/us", &iso),
        row("H41")
            .tenant("/acme/us")
            .who("alice", "/acme/eu")
            .forbidden("/acme/us", &iso),
        row("H42")
            .tenant("/acme/eu")
            .who("erin", "/acme/eu/team-a")
            .forbidden("/acme/eu", &iso),
        row("H43")
            .tenant("/acme/eu")
            .who("carol", "/acme")
            .forbidden("/acme/eu", &["eu-residency"]),
        row("H44")
            .tenant("/acme/eu")
            .who("dave", "/acme/us")
            .forbidden("/acme/eu", &["eu-residency", "platform-isolation"]),
        row("H45")
            .tenant("/globex")
            .who("lena", "/globex/labs")
            .forbidden("/globex", &iso),
        row("H46")
            .tenant("/acme/us")
            .who("root", "/")
            .forbidden("/acme/us", &[]),
        row("H47")
            .tenant("/acme/us")
            .who("zed", "/nope")
            .forbidden("/acme/us", &iso),
        row("H48").tenant("/acme/us").who("zed", "/Acme").bad(),
        row("H49")
            .tenant("/acme/eu/team-a")
            .who("alice", "/acme/eu")
            .ok("/acme/eu/team-a"),
        row("H50")
            .tenant("/public")
            .who("gus", "/globex")
            .ok("/public")
            .principal(Some("gus")),
        row("H51")
            .method("DELETE")
            .tenant("/public")
            .who("gus", "/globex")
            .forbidden("/public", &iso),
        // Forged x-tenantgate-* headers: removed, the upstream sees the real ones.
        a("H52")
            .h("x-tenantgate-tenant", "/globex")
            .h("x-tenantgate-principal", "root")
            .h("X-TenantGate-Extra", "1")
            .ok("/acme/eu")
            .principal(Some("alice")),
        row("H53")
            .tenant("/acme/us")
            .who("gus", "/globex")
            .h("x-tenantgate-tenant", "/acme/us")
            .h("x-tenantgate-principal", "dave")
            .forbidden("/acme/us", &iso),
        row("H54")
            .tenant("/public")
            .h("x-tenantgate-principal", "root")
            .ok("/public")
            .principal(None),
        alice(row("H55").h("x-tenantgate-tenant", "/acme/eu")).bad(),
        // Hostile values.
        alice(row("H60").tenant(format!("/{}", "a".repeat(50 * 1024)))).bad(),
        row("H61")
            .tenant("/acme/eu")
            .who(&"b".repeat(50 * 1024), "/acme/eu")
            .bad(),
        row("H62")
            .tenant("/acme/eu")
            .h("x-user", "alice")
            .h("x-user-tenant", format!("/{}", "c".repeat(50 * 1024)))
            .bad(),
        alice(row("H63").tenant(b"/acme/\xff\xfe")).bad(),
        alice(row("H64").tenant(b"/acm\xe9")).bad(), // Latin-1 é
        row("H65")
            .tenant("/acme/eu")
            .h("x-user", b"al\xffice")
            .h("x-user-tenant", "/acme/eu")
            .bad(),
        row("H66")
            .tenant("/acme/eu")
            .h("x-user", "alice")
            .h("x-user-tenant", b"/acme/\xfe")
            .bad(),
        // Control characters: in Envoy, all but tab are refused by its HTTP/1
        // codec (400) before the filter runs (H67, H69, H70).
        row("H67")
            .tenant("/acme/eu")
            .who("al\u{1}ice", "/acme/eu")
            .bad(),
        row("H68")
            .tenant("/acme/eu")
            .who("al\tice", "/acme/eu")
            .bad(),
        row("H69")
            .tenant("/acme/eu")
            .who("al\u{7f}ice", "/acme/eu")
            .bad(),
        row("H70")
            .tenant("/acme/eu")
            .who("al\u{1b}[31mice", "/acme/eu")
            .bad(),
        row("H71")
            .tenant("/acme/eu")
            .who("a\"b\\c", "/acme/eu")
            .ok("/acme/eu")
            .principal(Some("a\"b\\c")),
        row("H72")
            .tenant("/acme/eu")
            .who("x\"y\\z", "/acme/eu")
            .forbidden("/acme/eu", &["platform-blocklist"]),
        row("H73")
            .tenant("/acme/eu")
            .who("alice\" || principal == User::\"root", "/acme/eu")
            .ok("/acme/eu")
            .principal(Some("alice\" || principal == User::\"root")),
        alice(row("H74").tenant("/a".repeat(300))).bad(),
        alice(row("H75").tenant(format!("/acme/eu{}", "/x".repeat(15)))).bad(),
        alice(row("H76").tenant(format!("/{}", "a".repeat(64)))).bad(),
        a("H77").path(&format!("/{}", "p".repeat(9000))).bad(),
    ];
    // A 50 KB header that is not an identity header is none of tenantgate's business.
    // (In Envoy a 70 KB header is above max_request_headers_kb: Envoy answers 431, H81.)
    rows.push(a("H78").h("x-junk", "j".repeat(50 * 1024)).ok("/acme/eu"));
    // Ids compare exactly: a look-alike of a blocklisted id is another
    // principal (identity must come from a trusted source, not a header).
    rows.push(
        row("H79")
            .tenant("/acme/eu")
            .who("m\u{430}llory", "/acme/eu")
            .ok("/acme/eu")
            .principal(Some("m\u{430}llory")),
    );
    // The tenant value is trimmed of Unicode white space (`str::trim`), so a
    // no-break space around a valid tenant is the same tenant, not a 400.
    // Only ASCII space and tab are trimmed from a tenant value.
    rows.push(alice(row("H80").tenant("\u{a0}/acme/eu\u{3000}")).bad());
    // What upstreams may trust (SECURITY.md): our headers in every spelling an
    // upstream could fold into them, as headers and as request trailers.
    rows.extend([
        a("H82")
            .h("x_tenantgate_principal", "root")
            .h("X_TENANTGATE_TENANT", "/")
            .h("x-tenantgate_principal", "root")
            .ok("/acme/eu")
            .principal(Some("alice")),
        // Anonymous (no x-user): nothing may claim a principal for it.
        row("H83")
            .tenant("/public")
            .path("/docs")
            .h("x_tenantgate_principal", "root")
            .ok("/public")
            .principal(None),
        a("H84")
            .trailer("x-tenantgate-principal", "root")
            .trailer("x_tenantgate_tenant", "/")
            .trailer("x-checksum", "abc")
            .ok("/acme/eu")
            .principal(Some("alice")),
        // Double-encoded separators and encoded control characters.
        a("H85").path("/public%252f..%252finternal/keys").bad(),
        a("H86").path("/public%255c..%255cinternal").bad(),
        a("H87").path("/orders/1%00.json").bad(),
        a("H88").path("/orders/%0d%0ax").bad(),
        // An empty tenant header is reported as empty.
        alice(row("H89").tenant("")).bad(),
    ]);
    rows
}

/// Tenant from the path: `/t/<tenant segments>/<resource>`.
fn path_rows() -> Vec<Row> {
    let iso = ["platform-isolation"];
    // Every row also sends `x-tenant: /globex`, which is not a source here.
    let p = |id: &str, path: &str| row(id).path(path).tenant("/globex");
    let a = |id: &str, path: &str| alice(p(id, path));
    let seg300 = format!("/t/{}x", "a/".repeat(299));
    let deep = format!("/t/acme/eu/{}x", "s/".repeat(297));
    let acme300 = format!("/t/{}", "acme/".repeat(300));
    vec![
        a("P01", "/t/acme/eu/orders/1")
            .ok("/acme/eu")
            .principal(Some("alice"))
            .resource("/orders/1"),
        a("P02", "/t/acme/eu/%2e%2E/eu/orders/1")
            .ok("/acme/eu")
            .resource("/orders/1"),
        a("P03", "/t/%61cme/eu/x").ok("/acme/eu").resource("/x"),
        a("P04", "/t/%41cme/eu/x").bad(),
        a("P05", "/t/acme/eu/%2E%2e/%2e%2E/globex/x").forbidden("/globex", &iso),
        // Climbing out of the tenant prefix into another tenant: judged as /globex.
        a("P06", "/t/acme/eu/../../globex/x").forbidden("/globex", &iso),
        p("P07", "/t/acme/eu/../../globex/x")
            .who("gus", "/globex")
            .ok("/globex")
            .resource("/x")
            // The upstream gets the path that was judged.
            .upstream_path("/t/globex/x"),
        a("P08", "/t/acme/%2e%2e/globex").forbidden("/globex", &iso),
        a("P09", "/t/acme/.%2E/globex/x").forbidden("/globex", &iso),
        a("P10", "/t/acme/eu/%252e%252e/%252e%252e/globex/x").bad(),
        a("P11", "/t//acme//eu//orders")
            .ok("/acme/eu")
            .resource("/orders"),
        a("P12", "/t/./acme/eu/./x").ok("/acme/eu").resource("/x"),
        a("P13", "/t/acme;v=1/eu/x").ok("/acme/eu").resource("/x"),
        a("P14", "/t/acme/eu/..;/..;/globex/x").bad(),
        a("P15", "/t/acme%2Feu/x").bad(),
        a("P16", "/t/acme%2feu/x").bad(),
        a("P17", "/t/acme%5Ceu/x").bad(),
        a("P18", "/t/../acme/eu/x").bad(),
        a("P19", "/t/../../acme/eu/x").bad(),
        a("P20", "/t/%2e%2e/%2e%2e/acme").bad(),
        a("P21", "/t/acme/eu/../../../../x").bad(),
        a("P22", "/t/ACME/eu").bad(),
        a("P23", "/t/Acme/eu/x").bad(),
        // An upper-case segment below a tenant is resource, not tenant.
        a("P24", "/t/acme/EU/x").forbidden("/acme", &iso),
        p("P25", "/t/acme/EU/x")
            .who("carol", "/acme")
            .ok("/acme")
            .resource("/EU/x"),
        a("P26", "/t/%D0%B0cme/eu/x").bad(),
        a("P27", "/t/%EF%BC%8Facme/eu/x").bad(),
        a("P28", "/t/acme%E2%80%8B/eu/x").bad(),
        // Raw UTF-8 in the path (in Envoy, its HTTP/1 codec answers 400 first).
        alice(row("P29").path_bytes("/t/\u{430}cme/eu/x".as_bytes())).bad(),
        p("P30", "/t/acme/")
            .who("carol", "/acme")
            .ok("/acme")
            .resource("/"),
        p("P31", "/t/acme/.")
            .who("carol", "/acme")
            .ok("/acme")
            .resource("/"),
        a("P32", "/t/acme/..").forbidden("/", &iso),
        a("P33", "/t").forbidden("/", &iso),
        a("P34", "/t/nope/x").bad(),
        a("P35", "/orders/1").bad(),
        a("P36", "/tx/acme/eu").bad(),
        // Identity headers: the tenant header is ignored, duplicates too.
        p("P37", "/t/globex/x")
            .who("gus", "/globex")
            .tenant("/acme/eu")
            .ok("/globex"),
        a("P38", "/t/acme/eu/x")
            .h("x-tenantgate-tenant", "/globex")
            .h("x-tenantgate-principal", "root")
            .ok("/acme/eu")
            .principal(Some("alice")),
        p("P39", "/t/acme/eu/x")
            .who("dave", "/acme/us")
            .forbidden("/acme/eu", &["eu-residency", "platform-isolation"]),
        p("P40", "/t/acme/eu/x")
            .who("carol", "/acme")
            .forbidden("/acme/eu", &["eu-residency"]),
        // Long paths: the tenant is the longest declared prefix, the rest is resource.
        a("P41", &seg300).bad(),
        a("P42", &deep).ok("/acme/eu"),
        p("P43", &acme300).who("carol", "/acme").ok("/acme"),
        a("P44", &format!("/t/acme/eu/{}", "p".repeat(9000))).bad(),
        // The query and the fragment are cut off before the tenant is taken.
        a("P45", "/t/acme/eu/x?/../../globex")
            .ok("/acme/eu")
            .resource("/x"),
        // (In Envoy the fragment never gets here: Envoy 1.40 answers 400 itself.)
        a("P46", "/t/globex#/../acme/eu").forbidden("/globex", &iso),
        // An encoded control character is refused wherever it is.
        a("P47", "/t/acme/eu%00/x").bad(),
        // `;` parameters are dropped before `..` is resolved, so `..;` climbs:
        // judged as /globex. The upstream gets the original path (see README).
        // Judging `..;` as `..` while the upstream reads it as a name would
        // let the two disagree on the tenant: refused.
        p("P48", "/t/acme/..;/globex/x").who("gus", "/globex").bad(),
    ]
}

/// Tenant and principal from JWT claims (dynamic metadata); headers are no source.
fn jwt_rows() -> Vec<Row> {
    let forged = |r: Row| {
        r.h("x-tenant", "/globex")
            .h("x-user", "gus")
            .h("x-user-tenant", "/globex")
    };
    vec![
        forged(row("J01").jwt(json!({"sub": "carol", "tenant": "/acme"})))
            .ok("/acme")
            .principal(Some("carol")),
        row("J02")
            .jwt(json!({"sub": "carol", "tenant": "/acme"}))
            .tenant("/globex")
            .tenant("/acme/eu")
            .ok("/acme"),
        row("J03")
            .jwt(json!({"sub": "gus", "tenant": "/globex"}))
            .h("x-tenantgate-tenant", "/acme")
            .h("x-tenantgate-principal", "carol")
            .ok("/globex")
            .principal(Some("gus")),
        forged(row("J04").jwt(json!({"sub": "carol"}))).bad(),
        row("J05")
            .jwt(json!({"sub": "carol", "tenant": "/Acme"}))
            .bad(),
        row("J06")
            .jwt(json!({"sub": "carol", "tenant": "/acme/../globex"}))
            .bad(),
        row("J07")
            .jwt(json!({"sub": "carol", "tenant": "/\u{430}cme"}))
            .bad(),
        row("J08")
            .jwt(json!({"sub": "carol", "tenant": "/acme/"}))
            .ok("/acme"),
        row("J09")
            .jwt(json!({"sub": "mallory", "tenant": "/acme/us"}))
            .forbidden("/acme/us", &["platform-blocklist"]),
        row("J10")
            .jwt(json!({"sub": "al\u{1}ice", "tenant": "/acme"}))
            .bad(),
        // A claim that is not a string is never a tenant.
        row("J11")
            .jwt(json!({"sub": "carol", "tenant": ["/acme"]}))
            .bad(),
        row("J12").jwt(json!({"sub": "carol", "tenant": 7})).bad(),
        // An empty subject is no principal: anonymous, held by isolation.
        row("J13")
            .jwt(json!({"sub": "", "tenant": "/acme"}))
            .forbidden("/acme", &["platform-isolation"]),
    ]
}

// ---------------------------------------------------------------------------
// Bundles and the runner.

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The bundle of a copy of `policies/` with these settings changed.
fn example_variant(changes: Value) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&src, dir.path());
    let file = dir.path().join("tenantgate.json");
    let mut settings: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    for (k, v) in changes.as_object().unwrap() {
        settings[k] = v.clone();
    }
    std::fs::write(&file, settings.to_string()).unwrap();
    bundle_of(dir.path())
}

fn send(vm: &mut Vm, r: &Row) -> tenantgate_host_tests::Response {
    let mut b = vm
        .request()
        .method(&r.method)
        .id(&format!("iso-{}", r.id))
        .without_header(":path")
        .header_bytes(":path", &r.path)
        .property(&["request", "path"], r.path.clone());
    for (k, v) in &r.headers {
        b = b.header_bytes(k, v);
    }
    for (k, v) in &r.trailers {
        b = b.trailer(k, v);
    }
    if let Some(claims) = &r.jwt {
        b = b.metadata(&[JWT, "payload"], claims.clone());
    }
    b.send().unwrap()
}

/// What is wrong with a response to `r` (empty: as expected).
fn check(host: &Host, r: &Row, resp: &tenantgate_host_tests::Response) -> Vec<String> {
    let mut bad = Vec::new();
    let w = &r.want;
    if resp.status != w.status || resp.is_continue() != (w.status == 200) {
        bad.push(format!(
            "status {} (continue: {}), want {}: {}",
            resp.status,
            resp.is_continue(),
            w.status,
            resp.body_str()
        ));
        return bad;
    }
    if w.status == 200 {
        let seen = resp.upstream_header("x-tenantgate-tenant");
        if seen != w.tenant {
            bad.push(format!("upstream saw tenant {seen:?}, want {:?}", w.tenant));
        }
        let own = resp.request_headers.names_folding_to("x-tenantgate-");
        let own_trailers = resp.request_trailers.names_folding_to("x-tenantgate-");
        if !own_trailers.is_empty() {
            bad.push(format!("upstream trailers: {own_trailers:?}"));
        }
        let principal = resp.upstream_header("x-tenantgate-principal");
        if let Some(want) = &w.principal {
            if &principal != want {
                bad.push(format!(
                    "upstream saw principal {principal:?}, want {want:?}"
                ));
            }
        }
        if let Some(want) = &w.upstream_path {
            let seen = resp.upstream_header(":path");
            if seen.as_deref() != Some(want.as_str()) {
                bad.push(format!("upstream :path {seen:?}, want {want}"));
            }
        }
        let mut expected_own = vec!["x-tenantgate-tenant".to_string()];
        if principal.is_some() {
            expected_own.push("x-tenantgate-principal".into());
        }
        let mut own_sorted = own.clone();
        own_sorted.sort();
        expected_own.sort();
        if own_sorted != expected_own
            || resp.request_headers.get_all("x-tenantgate-tenant").len() != 1
        {
            bad.push(format!("upstream x-tenantgate-* headers: {own:?}"));
        }
    } else {
        let body = match resp.json() {
            Ok(b) => b,
            Err(e) => return vec![format!("{e}")],
        };
        let error = match w.status {
            400 => "bad_request",
            403 => "forbidden",
            _ => "?",
        };
        if body["error"] != error {
            bad.push(format!("body {body}, want error {error}"));
        }
        // The id of the decision is the filter's, never the client's.
        let did = body["decision_id"].as_str().unwrap_or_default();
        if did.len() != 32 || !did.bytes().all(|c| c.is_ascii_hexdigit()) {
            bad.push(format!("decision_id {did:?} is not the filter's own id"));
        }
        if body["request_id"] != json!(format!("iso-{}", r.id)) {
            bad.push(format!(
                "request_id {} is not the incoming one",
                body["request_id"]
            ));
        }
        if w.status == 400 && body["message"].as_str().unwrap_or("").is_empty() {
            bad.push(format!("400 without a message: {body}"));
        }
        if let Some(t) = &w.tenant {
            if body["tenant"] != json!(t) {
                bad.push(format!("judged tenant {}, want {t}", body["tenant"]));
            }
        }
        if let Some(want) = &w.reasons {
            let mut got: Vec<String> = body["reasons"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            got.sort();
            let mut want = want.clone();
            want.sort();
            if got != want {
                bad.push(format!("reasons {got:?}, want {want:?}"));
            }
        }
    }
    if let Some(res) = &w.resource {
        let rid = format!("iso-{}", r.id);
        let line = audit_lines(host)
            .into_iter()
            .rev()
            .find(|l| l["request_id"] == json!(rid));
        match line {
            Some(l) if l["resource"] == json!(res) => {}
            other => bad.push(format!("audit resource: {other:?}, want {res}")),
        }
    }
    bad
}

/// Runs the rows over two VMs of one host, alternating; then checks both
/// still serve, nothing trapped and every 400 was counted.
fn run_matrix(name: &str, bundle: &str, rows: &[Row], healthy: &Row) {
    let host = host();
    let mut vms = [configured_vm(&host, bundle), configured_vm(&host, bundle)];
    let bad_before = metric(&host, names::BAD_REQUEST);
    let mut failures = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for (i, r) in rows.iter().enumerate() {
        let vm = &mut vms[i % 2];
        let resp = send(vm, r);
        *statuses.entry(resp.status).or_default() += 1;
        for problem in check(&host, r, &resp) {
            failures.push(format!(
                "{} {}: {problem}",
                r.id,
                String::from_utf8_lossy(&r.path)
            ));
        }
    }
    let want_400 = rows.iter().filter(|r| r.want.status == 400).count() as u64;
    let counted = metric(&host, names::BAD_REQUEST) - bad_before;
    if counted != want_400 {
        failures.push(format!(
            "tenantgate.bad_request counted {counted}, want {want_400}"
        ));
    }
    // Afterwards both workers still answer normal requests.
    for vm in vms.iter_mut() {
        for k in 0..3 {
            let mut r = healthy.clone();
            r.id = format!("{}-after-{}-{k}", healthy.id, vm.index());
            let resp = send(vm, &r);
            for problem in check(&host, &r, &resp) {
                failures.push(format!("after the matrix, vm {}: {problem}", vm.index()));
            }
        }
        assert!(vm.trapped().is_none(), "{:?}", vm.trapped());
    }
    assert_eq!(host.traps(), 0, "{}", dump_logs(&host));
    eprintln!(
        "isolation matrix ({name}): {} rows, statuses {statuses:?}, {} failures",
        rows.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "isolation matrix ({name}): {} of {} rows wrong:\n  {}",
        failures.len(),
        rows.len(),
        failures.join("\n  ")
    );
}

#[test]
fn isolation_matrix_with_the_tenant_from_a_header() {
    let healthy = alice(row("H-healthy").tenant("/acme/eu")).ok("/acme/eu");
    run_matrix("header", &example_bundle(), &header_rows(), &healthy);
}

#[test]
fn isolation_matrix_with_the_tenant_from_the_path() {
    let bundle = example_variant(json!({ "tenant": { "path_prefix": "/t" } }));
    let healthy = alice(row("P-healthy").path("/t/acme/eu/orders")).ok("/acme/eu");
    run_matrix("path_prefix", &bundle, &path_rows(), &healthy);
}

#[test]
fn isolation_matrix_with_the_tenant_from_jwt_metadata() {
    let bundle = example_variant(json!({
        "tenant": { "metadata": [JWT, "payload", "tenant"] },
        "principal": { "metadata": [JWT, "payload", "sub"] },
        "principal_tenant": null,
        "claims": { "header": "x-jwt-payload" },
    }));
    let healthy = row("J-healthy")
        .jwt(json!({"sub": "carol", "tenant": "/acme"}))
        .ok("/acme");
    run_matrix("jwt", &bundle, &jwt_rows(), &healthy);
}
