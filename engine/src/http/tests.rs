//! Tests of request mapping, replies, audit lines and claims.

use super::claims::base64url_decode;
use super::*;

use crate::decision::Decision;
use crate::decision::Outcome;
use crate::engine::Engine;
use crate::quota::MemoryStore;
use crate::settings::{Audit, Settings};

use crate::testing::{bundle, file, tenant as t};

/// `/` (members read), `/acme` (limit 2 per minute), `/acme/eu`, `/globex`.
fn engine(settings: Settings) -> crate::Worker {
    let b = bundle(
        settings,
        vec![
            t(
                "/",
                None,
                vec![file(
                    "tenants/p.cedar",
                    "@id(\"members-read\")\npermit(principal, action in Action::\"read\", resource) when { resource in principal.tenant };\n\
                     @id(\"no-admin\")\nforbid(principal, action, resource) when { resource.path like \"/admin*\" };",
                )],
            ),
            t(
                "/acme",
                Some(file("tenants/acme/tenant.json", r#"{"limits": {"rpm": {"rate": 2, "per": "1m"}}}"#)),
                vec![],
            ),
            t("/acme/eu", None, vec![]),
            t("/globex", None, vec![]),
        ],
    );
    crate::Worker::new(std::sync::Arc::new(Engine::new(&b).unwrap()))
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// Owned pairs as the borrowed view the host hands over.
fn borrowed(h: &[(String, Vec<u8>)]) -> Vec<HeaderPair<'_>> {
    h.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect()
}

fn map(e: &Engine, pairs: &[(&str, &str)]) -> Result<Mapped, BadRequest> {
    let h = headers(pairs);
    let pairs = borrowed(&h);
    e.map_request(
        &HttpInput {
            headers: &pairs,
            source_address: Some("10.1.2.3:4567"),
            now_ns: 7_000_000_000,
        },
        &NoMetadata,
    )
}

/// Maps raw header bytes with a given metadata source.
fn map_raw(
    e: &Engine,
    h: &[(String, Vec<u8>)],
    meta: &dyn MetadataSource,
) -> Result<Mapped, BadRequest> {
    let pairs = borrowed(h);
    e.map_request(
        &HttpInput {
            headers: &pairs,
            source_address: None,
            now_ns: 0,
        },
        meta,
    )
}

const GET_ORDERS: [(&str, &str); 2] = [(":method", "GET"), (":path", "/orders/1?x=1")];

#[test]
fn maps_header_sources() {
    let e = engine(Settings::default());
    let mut h = GET_ORDERS.to_vec();
    h.extend([
        ("x-tenant", "/acme/eu"),
        ("x-user", "alice"),
        ("x-request-id", "r-1"),
        (":authority", "shop"),
    ]);
    let m = map(&e, &h).unwrap();
    assert_eq!(m.request.tenant.as_str(), "/acme/eu");
    assert_eq!(m.request.path, "/orders/1");
    assert_eq!(m.request.method, "GET");
    assert_eq!(m.request.principal.as_ref().unwrap().id, "alice");
    assert_eq!(
        m.request.principal.as_ref().unwrap().tenant.as_str(),
        "/acme/eu"
    );
    assert_eq!(m.request.host.as_deref(), Some("shop"));
    assert_eq!(m.request.source_ip.as_deref(), Some("10.1.2.3"));
    assert_eq!(m.request_id.as_deref(), Some("r-1"));
    assert_eq!(m.request.time_ns, 7_000_000_000);
}

#[test]
fn missing_or_bad_tenant_is_a_400_unless_defaulted() {
    let e = engine(Settings::default());
    let err = map(&e, &GET_ORDERS).unwrap_err();
    assert!(
        err.message.contains("`x-tenant` header is missing"),
        "{}",
        err.message
    );
    for bad in ["acme", "/Acme", "/acme//eu", "/a/../b", "/acme/\u{441}"] {
        let mut h = GET_ORDERS.to_vec();
        h.push(("x-tenant", bad));
        assert!(map(&e, &h).is_err(), "{bad} accepted");
    }
    let mut h = GET_ORDERS.to_vec();
    h.extend([("x-tenant", "/acme"), ("x-tenant", "/globex")]);
    assert!(map(&e, &h)
        .unwrap_err()
        .message
        .contains("more than one `x-tenant`"));

    let e = engine(Settings {
        default_tenant: Some(TenantPath::parse("/globex").unwrap()),
        ..Settings::default()
    });
    assert_eq!(
        map(&e, &GET_ORDERS).unwrap().request.tenant.as_str(),
        "/globex"
    );
}

#[test]
fn non_utf8_and_control_characters_are_400() {
    let e = engine(Settings::default());
    let mut h = headers(&GET_ORDERS);
    h.push(("x-tenant".into(), vec![b'/', 0xff, 0xfe]));
    let err = map_raw(&e, &h, &NoMetadata).unwrap_err();
    assert!(err.message.contains("not valid UTF-8"), "{}", err.message);
    let mut h = GET_ORDERS.to_vec();
    h.extend([("x-tenant", "/acme"), ("x-user", "al\u{1}ice")]);
    assert!(map(&e, &h)
        .unwrap_err()
        .message
        .contains("control characters"));
    let mut h = GET_ORDERS.to_vec();
    let long = "u".repeat(MAX_PRINCIPAL_LEN + 1);
    h.extend([("x-tenant", "/acme"), ("x-user", long.as_str())]);
    assert!(map(&e, &h).is_err());
    // Quotes and backslashes are just characters of an id.
    let mut h = GET_ORDERS.to_vec();
    h.extend([("x-tenant", "/acme"), ("x-user", "a\"b\\c")]);
    assert_eq!(
        map(&e, &h).unwrap().request.principal.unwrap().id,
        "a\"b\\c"
    );
}

#[test]
fn a_changed_path_is_forwarded_normalized() {
    let e = engine(Settings::default());
    let at = |path: &str| {
        map(
            &e,
            &[(":method", "GET"), (":path", path), ("x-tenant", "/acme")],
        )
        .unwrap()
    };
    assert_eq!(at("/orders/1?x=1").forward_path, None);
    assert_eq!(at("/orders/1").forward_path, None);
    assert_eq!(
        at("/a/../orders/%31?x=/../y").forward_path.as_deref(),
        Some("/orders/1?x=/../y")
    );
    assert_eq!(at("//orders").forward_path.as_deref(), Some("/orders"));
    assert_eq!(at("/orders#frag").forward_path.as_deref(), Some("/orders"));
    // Tenants: only ASCII space and tab are trimmed.
    let h = [
        (":method", "GET"),
        (":path", "/"),
        ("x-tenant", " \t/acme "),
    ];
    assert_eq!(map(&e, &h).unwrap().request.tenant.as_str(), "/acme");
    let h = [
        (":method", "GET"),
        (":path", "/"),
        ("x-tenant", "\u{a0}/acme\u{3000}"),
    ];
    assert!(map(&e, &h).is_err());
}

#[test]
fn bad_paths_and_methods_are_400() {
    let e = engine(Settings::default());
    for path in ["/a%2Fb", "/../etc", "/a/%2e%2e/%2e%2e", "no-slash"] {
        let h = [(":method", "GET"), (":path", path), ("x-tenant", "/acme")];
        assert!(map(&e, &h).is_err(), "{path}");
    }
    let h = [(":method", "get"), (":path", "/"), ("x-tenant", "/acme")];
    assert!(map(&e, &h).is_err());
}

#[test]
fn path_prefix_takes_the_longest_declared_tenant() {
    let e = engine(Settings {
        tenant: Source::PathPrefix("/t".into()),
        ..Settings::default()
    });
    let at = |path: &str| map(&e, &[(":method", "GET"), (":path", path)]);
    let m = at("/t/acme/eu/orders/1").unwrap();
    assert_eq!(
        (m.request.tenant.as_str(), m.request.path.as_str()),
        ("/acme/eu", "/orders/1")
    );
    let m = at("/t/acme/us/orders").unwrap();
    assert_eq!(
        (m.request.tenant.as_str(), m.request.path.as_str()),
        ("/acme", "/us/orders")
    );
    let m = at("/t/acme/eu/../../globex/x").unwrap();
    assert_eq!(
        (m.request.tenant.as_str(), m.request.path.as_str()),
        ("/globex", "/x")
    );
    assert_eq!(at("/t").unwrap().request.tenant.as_str(), "/");
    assert!(at("/t/nope/x")
        .unwrap_err()
        .message
        .contains("unknown tenant `/nope`"));
    assert!(at("/tx/acme").is_err());
    assert!(at("/t/../acme").is_err());
    // Header is ignored when the tenant comes from the path.
    let m = map(
        &e,
        &[
            (":method", "GET"),
            (":path", "/t/globex/a"),
            ("x-tenant", "/acme"),
        ],
    )
    .unwrap();
    assert_eq!(m.request.tenant.as_str(), "/globex");
}

struct Meta;
impl MetadataSource for Meta {
    fn metadata(&self, path: &[String]) -> Option<Vec<u8>> {
        match path.last().map(String::as_str) {
            Some("tenant") => Some(b"/acme".to_vec()),
            Some("sub") => Some(b"alice".to_vec()),
            _ => None,
        }
    }
}

#[test]
fn metadata_sources_ignore_headers() {
    let jwt = |k: &str| {
        Source::Metadata(vec![
            "envoy.filters.http.jwt_authn".into(),
            "payload".into(),
            k.into(),
        ])
    };
    let e = engine(Settings {
        tenant: jwt("tenant"),
        principal: jwt("sub"),
        ..Settings::default()
    });
    let h = headers(&[
        (":method", "GET"),
        (":path", "/"),
        ("x-tenant", "/globex"),
        ("x-user", "mallory"),
    ]);
    let m = map_raw(&e, &h, &Meta).unwrap();
    assert_eq!(m.request.tenant.as_str(), "/acme");
    assert_eq!(m.request.principal.unwrap().id, "alice");
    let err = map_raw(&e, &h, &NoMetadata).unwrap_err();
    assert!(err.message.contains("metadata"), "{}", err.message);
}

#[test]
fn claims_come_from_the_forwarded_payload_header() {
    let e = engine(Settings {
        claims: Some(Source::Header("x-jwt-payload".into())),
        ..Settings::default()
    });
    // {"sub":"gus","roles":["admin"],"iat":1.5,"n":null,"exp":17}
    let payload = "eyJzdWIiOiJndXMiLCJyb2xlcyI6WyJhZG1pbiJdLCJpYXQiOjEuNSwibiI6bnVsbCwiZXhwIjoxN30";
    let mut h = GET_ORDERS.to_vec();
    h.extend([("x-tenant", "/acme"), ("x-jwt-payload", payload)]);
    let claims = map(&e, &h).unwrap().request.claims.unwrap();
    assert_eq!(
        claims,
        serde_json::json!({"sub": "gus", "roles": ["admin"], "exp": 17})
    );
    let mut h = GET_ORDERS.to_vec();
    h.extend([("x-tenant", "/acme"), ("x-jwt-payload", "not base64!")]);
    assert!(map(&e, &h).unwrap_err().message.contains("x-jwt-payload"));
    let mut h = GET_ORDERS.to_vec();
    h.extend([("x-tenant", "/acme"), ("x-jwt-payload", "WzFd")]); // [1]
    assert!(map(&e, &h)
        .unwrap_err()
        .message
        .contains("not a JSON object"));
    assert_eq!(base64url_decode("aGk").unwrap(), b"hi");
    assert_eq!(base64url_decode("aGk=").unwrap(), b"hi");
    assert!(base64url_decode("a").is_none());
}

fn decide(
    e: &crate::Worker,
    store: &MemoryStore,
    tenant: &str,
    user: &str,
    path: &str,
) -> (Decision, Mapped) {
    let h = [
        (":method", "GET"),
        (":path", path),
        ("x-tenant", tenant),
        ("x-user", user),
        ("x-request-id", "r-9"),
    ];
    let m = map(e, &h).unwrap();
    (e.decide(&m.request, store), m)
}

#[test]
fn replies_follow_section_7() {
    let e = engine(Settings::default());
    let store = MemoryStore::new();
    let acme = TenantPath::parse("/acme").unwrap();
    // Allowed: no reply.
    let (d, _) = decide(&e, &store, "/acme", "alice", "/orders");
    assert!(d.is_allowed(), "{d:?}");
    assert!(e.reply(&d, Some(&acme), Some("r-9"), Some("d-1")).is_none());
    // Forbidden: 403 without reasons unless exposed.
    let (d, _) = decide(&e, &store, "/acme", "alice", "/admin/x");
    let r = e.reply(&d, Some(&acme), Some("r-9"), Some("d-1")).unwrap();
    assert_eq!(r.status, 403);
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["tenant"], "/acme");
    assert_eq!(body["request_id"], "r-9");
    assert!(body.get("reasons").is_none());
    let exposed = engine(Settings {
        expose_reasons: true,
        ..Settings::default()
    });
    let r = exposed.reply(&d, Some(&acme), None, None).unwrap();
    assert!(r.body.contains("no-admin"), "{}", r.body);
    // Quota: the third request in a minute is refused with the RateLimit fields.
    let (d, _) = decide(&e, &store, "/acme", "alice", "/orders");
    assert!(d.is_allowed());
    let (d, _) = decide(&e, &store, "/acme", "alice", "/orders");
    assert_eq!(d.status, 429, "{d:?}");
    let r = e.reply(&d, Some(&acme), Some("r-9"), Some("d-1")).unwrap();
    let h: std::collections::HashMap<_, _> = r.headers.iter().cloned().collect();
    let retry: u64 = h["retry-after"].parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(h["ratelimit-policy"].contains("\"rpm\";q=2;w=60"), "{h:?}");
    assert!(h["ratelimit"].starts_with("\"rpm\";r=0"), "{h:?}");
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["limit"], "rpm");
    assert_eq!(body["retry_after_s"], retry);
    // Bad request: 400 that says what was wrong.
    let d = Decision::bad_request("the path contains an encoded `/` or `\\` (%2F)");
    let r = e.reply(&d, None, None, None).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("encoded"), "{}", r.body);
}

#[test]
fn a_request_denied_by_policy_is_never_charged() {
    let e = engine(Settings::default());
    let store = MemoryStore::new();
    for _ in 0..10 {
        let (d, _) = decide(&e, &store, "/acme", "alice", "/admin");
        assert_eq!(d.status, 403);
        // A write: no permit, default deny.
        let h = [
            (":method", "POST"),
            (":path", "/orders"),
            ("x-tenant", "/acme"),
            ("x-user", "alice"),
        ];
        assert_eq!(e.decide(&map(&e, &h).unwrap().request, &store).status, 403);
    }
    assert!(decide(&e, &store, "/acme", "alice", "/orders")
        .0
        .is_allowed());
    assert!(decide(&e, &store, "/acme", "alice", "/orders")
        .0
        .is_allowed());
    assert_eq!(
        decide(&e, &store, "/acme", "alice", "/orders").0.status,
        429
    );
}

#[test]
fn audit_lines_follow_the_setting() {
    let store = MemoryStore::new();
    for (audit, allow_logged, deny_logged) in [
        (Audit::All, true, true),
        (Audit::Deny, false, true),
        (Audit::Off, false, false),
    ] {
        let e = engine(Settings {
            audit,
            ..Settings::default()
        });
        let (allow, m) = decide(&e, &store, "/globex", "gus", "/x");
        assert!(allow.is_allowed());
        assert_eq!(
            e.audit_line(&allow, Some(&m), Some("r-9")).is_some(),
            allow_logged
        );
        let (deny, m) = decide(&e, &store, "/globex", "gus", "/admin");
        let line = e.audit_line(&deny, Some(&m), Some("r-9"));
        assert_eq!(line.is_some(), deny_logged);
        if let Some(line) = line {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["decision"], "deny");
            assert_eq!(v["tenant"], "/globex");
            assert_eq!(v["principal"], "gus");
            assert_eq!(v["action"], "GET");
            assert_eq!(v["resource"], "/admin");
            assert_eq!(v["policies"][0], "no-admin");
            assert_eq!(v["bundle"], e.version());
            assert_eq!(v["mode"], "enforce");
            assert_eq!(v["request_id"], "r-9");
        }
    }
}

#[test]
fn ratelimit_headers_on_allow_only_when_asked() {
    let store = MemoryStore::new();
    let e = engine(Settings::default());
    let (d, _) = decide(&e, &store, "/acme", "alice", "/o");
    assert!(e.allow_response_headers(&d).is_empty());
    let e = engine(Settings {
        ratelimit_headers_on_allow: crate::settings::HeadersOnAllow::Always,
        ..Settings::default()
    });
    let (d, _) = decide(&e, &store, "/acme/eu", "alice", "/o");
    assert!(d.is_allowed());
    let h = e.allow_response_headers(&d);
    assert!(
        h.iter()
            .any(|(k, v)| *k == "ratelimit-policy" && v.contains("q=2")),
        "{h:?}"
    );
    assert_eq!(Outcome::Allow, d.decision);
}

#[test]
fn own_headers_in_every_spelling_an_upstream_could_fold() {
    for name in [
        "x-tenantgate-principal",
        "x_tenantgate_principal",
        "X-TenantGate-Tenant",
        "x_tenantgate-tenant",
        "x-tenantgate_x",
        "X_TENANTGATE_",
    ] {
        assert!(is_own_header(name), "{name}");
    }
    for name in [
        "x-tenant",
        "x-tenantgat",
        "xx-tenantgate-a",
        "x.tenantgate.a",
        "x-user",
    ] {
        assert!(!is_own_header(name), "{name}");
    }
    let h = headers(&[
        ("x-tenant", "/acme"),
        ("x_tenantgate_principal", "root"),
        ("X-TENANTGATE-TENANT", "/"),
    ]);
    assert_eq!(
        own_headers(&borrowed(&h)).collect::<Vec<_>>(),
        ["x_tenantgate_principal", "X-TENANTGATE-TENANT"]
    );
}

#[test]
fn decision_ids_are_unique_and_not_the_clients() {
    let ids = DecisionIds::new(42);
    let a = ids.next_id();
    let b = ids.next_id();
    assert_ne!(a, b);
    assert_eq!(a.len(), 32);
    assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(DecisionIds::new(43).next_id(), a, "another VM, other ids");
    let set: std::collections::HashSet<String> = (0..10_000).map(|_| ids.next_id()).collect();
    assert_eq!(set.len(), 10_000);
}

#[test]
fn an_empty_tenant_header_is_reported_as_empty() {
    let e = engine(Settings::default());
    let mut h = GET_ORDERS.to_vec();
    h.push(("x-tenant", " "));
    let err = map(&e, &h).unwrap_err();
    assert_eq!(err.message, "no tenant: the `x-tenant` header is empty");
    let err = map(&e, &GET_ORDERS).unwrap_err();
    assert_eq!(err.message, "no tenant: the `x-tenant` header is missing");
}

#[test]
fn grpc_calls_are_judged_by_method() {
    let grpc = crate::settings::GrpcSettings {
        read: vec!["/acme.Orders/Get*".into()],
    };
    let e = engine(Settings {
        grpc: Some(grpc),
        ..Settings::default()
    });
    let call = |path: &str, ct: &str| {
        let h = [
            (":method", "POST"),
            (":path", path),
            ("content-type", ct),
            ("x-tenant", "/acme"),
            ("x-user", "alice"),
        ];
        map(&e, &h).unwrap().request
    };
    let r = call("/acme.Orders/GetOrder", "application/grpc");
    assert_eq!(
        (r.action, r.method.as_str(), r.path.as_str()),
        (Some("read"), "POST", "/acme.Orders/GetOrder")
    );
    assert_eq!(
        call("/acme.Orders/Create", "application/grpc+proto").action,
        Some("write")
    );
    assert_eq!(
        call("/acme.Orders/GetOrder", "application/json").action,
        None
    );
    assert_eq!(
        call("/acme.Orders/GetOrder", "application/grpcx").action,
        None
    );
    // Read RPCs pass the members-read permit; write RPCs have no permit.
    let store = MemoryStore::new();
    let read = call("/acme.Orders/GetOrder", "application/grpc");
    assert!(e.decide(&read, &store).is_allowed());
    let write = call("/acme.Orders/Create", "application/grpc");
    assert_eq!(e.decide(&write, &store).status, 403);
    // Without the setting a gRPC call is a plain POST.
    let plain = engine(Settings::default());
    let h = [
        (":method", "POST"),
        (":path", "/acme.Orders/GetOrder"),
        ("content-type", "application/grpc"),
        ("x-tenant", "/acme"),
    ];
    assert_eq!(map(&plain, &h).unwrap().request.action, None);
}

#[test]
fn replies_carry_the_grpc_status_for_their_http_status() {
    assert_eq!(
        [400, 403, 429, 503].map(grpc_status),
        [3, 7, 8, 14],
        "INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAVAILABLE"
    );
    let e = engine(Settings::default());
    let r = e
        .reply(
            &Decision::bad_request("x"),
            None,
            Some("client-id"),
            Some("d-1"),
        )
        .unwrap();
    assert_eq!(r.grpc_status, 3);
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["request_id"], "client-id");
    assert_eq!(body["decision_id"], "d-1");
}

#[test]
fn near_limit_headers_only_below_the_ratio() {
    let store = MemoryStore::new();
    let e = engine(Settings {
        ratelimit_headers_on_allow: crate::settings::HeadersOnAllow::NearLimit,
        near_limit_ratio: crate::settings::Ratio(0.5),
        ..Settings::default()
    });
    // /acme: 2 per minute. After the first request 1 of 2 is left: not below half.
    let (d, _) = decide(&e, &store, "/acme", "alice", "/o");
    assert!(e.allow_response_headers(&d).is_empty());
    let (d, _) = decide(&e, &store, "/acme", "alice", "/o");
    let h = e.allow_response_headers(&d);
    assert_eq!(
        h,
        [
            ("ratelimit-policy", "\"rpm\";q=2;w=60".to_string()),
            ("ratelimit", "\"rpm\";r=0;t=60".to_string())
        ]
    );
}

/// Decides a request through the worker's flow, as the filter does.
fn effects(w: &crate::Worker, store: &MemoryStore, pairs: &[(&str, &str)]) -> crate::flow::Effects {
    let h = headers(pairs);
    let pairs = borrowed(&h);
    let input = HttpInput {
        headers: &pairs,
        source_address: None,
        now_ns: 1_000_000_000,
    };
    match w.begin(&input, &NoMetadata, Some(store)) {
        crate::flow::Step::Done(e) => e,
        crate::flow::Step::Deferred(_) => panic!("no fleet limits here"),
    }
}

#[test]
fn filter_state_carries_each_decisions_fields_when_asked_for() {
    use filter_state_keys as k;
    let settings = Settings {
        filter_state: true,
        audit: Audit::All,
        ..Settings::default()
    };
    let b = engine(settings.clone());
    let w = crate::Worker::with_ids(b.engine_arc(), 7);
    let store = MemoryStore::new();
    let req = |tenant: &str, user: &str, path: &str| {
        vec![
            (":method", "GET"),
            (":path", path),
            ("x-tenant", tenant),
            ("x-user", user),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect::<Vec<_>>()
    };
    let run = |r: Vec<(String, String)>| {
        let pairs: Vec<(&str, &str)> = r.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let e = effects(&w, &store, &pairs);
        let id = e.decision_id.clone().expect("an id for every decision");
        (e.filter_state, id)
    };
    let version = w.engine().version().to_string();
    let fields = |pairs: &[(&'static str, &str)], id: &str| {
        let mut v: Vec<(&'static str, String)> =
            pairs.iter().map(|(a, b)| (*a, b.to_string())).collect();
        v.push((k::DECISION_ID, id.to_string()));
        v.push((k::BUNDLE, version.clone()));
        v
    };
    // Allowed: no limit.
    let (fs, id) = run(req("/acme", "alice", "/orders"));
    assert_eq!(
        fs,
        fields(
            &[
                (k::TENANT, "/acme"),
                (k::PRINCIPAL, "alice"),
                (k::DECISION, "allow"),
                (k::KIND, "allowed"),
                (k::POLICIES, "members-read"),
            ],
            &id
        )
    );
    // Forbidden.
    let (fs, id) = run(req("/acme", "alice", "/admin"));
    assert_eq!(
        fs,
        fields(
            &[
                (k::TENANT, "/acme"),
                (k::PRINCIPAL, "alice"),
                (k::DECISION, "deny"),
                (k::KIND, "forbidden"),
                (k::POLICIES, "no-admin"),
            ],
            &id
        )
    );
    // Refused by `/acme`'s 2 per minute (one admitted above).
    let _ = run(req("/acme", "alice", "/orders"));
    let (fs, id) = run(req("/acme", "alice", "/orders"));
    assert_eq!(
        fs,
        fields(
            &[
                (k::TENANT, "/acme"),
                (k::PRINCIPAL, "alice"),
                (k::DECISION, "deny"),
                (k::KIND, "quota_exceeded"),
                (k::LIMIT, "rpm"),
            ],
            &id
        )
    );
    // Bad: the tenant is not read.
    let (fs, id) = run(req("/Acme", "alice", "/orders"));
    assert_eq!(
        fs,
        fields(&[(k::DECISION, "deny"), (k::KIND, "bad_request")], &id)
    );
    // Off (the default): nothing, and no id for an allowed request that is not audited.
    let off = engine(Settings::default());
    let w = crate::Worker::with_ids(off.engine_arc(), 7);
    let pairs = [
        (":path", "/orders"),
        ("x-tenant", "/globex"),
        ("x-user", "gus"),
    ];
    let e = effects(&w, &store, &pairs);
    assert!(e.filter_state.is_empty());
    assert_eq!(e.decision_id, None);
}

#[test]
fn audit_lines_carry_the_trace_id_of_a_valid_traceparent_only() {
    let w = engine(Settings {
        audit: Audit::All,
        ..Settings::default()
    });
    let store = MemoryStore::new();
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for (traceparent, tenant, want) in [
        (valid, "/globex", Some("4bf92f3577b34da6a3ce929d0e0e4736")),
        (valid, "/Globex", Some("4bf92f3577b34da6a3ce929d0e0e4736")),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "/globex",
            None,
        ),
        (
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "/globex",
            None,
        ),
    ] {
        let pairs = [
            (":path", "/x"),
            ("x-tenant", tenant),
            ("x-user", "gus"),
            ("traceparent", traceparent),
        ];
        let e = effects(&w, &store, &pairs);
        let line: serde_json::Value = serde_json::from_str(&e.logs[0].text).unwrap();
        assert_eq!(
            line["trace_id"].as_str(),
            want,
            "{traceparent} {tenant}: {line}"
        );
    }
    // Two traceparent headers: none is trusted, and the request is decided as without one.
    let pairs = [
        (":path", "/x"),
        ("x-tenant", "/globex"),
        ("x-user", "gus"),
        ("traceparent", valid),
        ("traceparent", valid),
    ];
    let e = effects(&w, &store, &pairs);
    assert!(e.decision.is_allowed());
    let line: serde_json::Value = serde_json::from_str(&e.logs[0].text).unwrap();
    assert_eq!(line.get("trace_id"), None);
}
