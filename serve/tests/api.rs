//! `tenantgate serve` in-process: the HTTP JSON API (exact statuses and
//! bodies), reloads, and the ext_authz gRPC service through a tonic client.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use serde_json::json;

/// alice reading an order in her home tenant, the path not yet normal.
fn alice_reads() -> serde_json::Value {
    json!({"tenant": "/acme/eu", "method": "GET", "path": "/orders/./1?x=1",
           "principal": "alice", "principal_tenant": "/acme/eu"})
}

#[tokio::test]
async fn decide_answers_checks_json() {
    let s = start(&policies()).await;
    let a = decide(s.http, &alice_reads()).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(
        a.json(),
        json!({"decision": "allow", "status": 200, "kind": "allowed",
               "reasons": ["acme-read-default"], "errors": [], "quota": null,
               "upstream": {"path": "/orders/1?x=1",
                            "headers": {"x-tenantgate-tenant": "/acme/eu", "x-tenantgate-principal": "alice"}}})
    );
    // A denial is a decision, answered 200 with the reply the filter would send.
    let deny = json!({"tenant": "/acme/eu", "method": "GET", "path": "/internal/keys",
                      "principal": "alice", "principal_tenant": "/acme/eu",
                      "headers": {"x-request-id": "r-1"}});
    let a = decide(s.http, &deny).await;
    assert_eq!(a.status, 200);
    // The reply carries the decision's id, as the filter's does (and as the
    // audit line does).
    let v = a.json();
    let id = v["reply"]["body"]["decision_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(
        v,
        json!({"decision": "deny", "status": 403, "kind": "forbidden",
               "reasons": ["platform-internal-paths"], "errors": [], "quota": null,
               "reply": {"status": 403, "grpc_status": 7,
                         "headers": {"content-type": "application/json"},
                         "body": {"error": "forbidden", "tenant": "/acme/eu", "request_id": "r-1",
                                  "decision_id": id, "reasons": ["platform-internal-paths"]}}})
    );
    // A request the filter refuses with 400 is a decision too.
    let bad = json!({"tenant": "/acme/eu", "method": "get", "path": "/orders"});
    let a = decide(s.http, &bad).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(
        (v["decision"].clone(), v["status"].clone()),
        (json!("deny"), json!(400))
    );
    assert_eq!(v["reply"]["body"]["error"], "bad_request");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn decide_agrees_with_check_on_every_policy_test() {
    // The same engine call as `tenantgate check`, policies only.
    let s = start(&policies()).await;
    let engine = tenantgate_serve::load(&policies()).unwrap();
    let worker = tenantgate_engine::Worker::new(std::sync::Arc::new(engine));
    let mut n = 0;
    for entry in std::fs::read_dir(policies().join("tests")).unwrap() {
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        for t in doc["tests"].as_array().unwrap() {
            let spec: tenantgate_engine::http::RequestSpec =
                serde_json::from_value(t["request"].clone()).unwrap();
            let want = worker
                .check_output(&spec, tenantgate_serve::now_ns(), None)
                .unwrap();
            let got = decide(s.http, &t["request"]).await;
            assert_eq!(got.status, 200, "{}", t["name"]);
            let mut got = got.json();
            // `check` gives no decision ids (its output is the same every
            // run); the service's replies carry one.
            if let Some(body) = got.pointer_mut("/reply/body") {
                let id = body["decision_id"].take();
                assert_eq!(id.as_str().map(str::len), Some(32), "{}", t["name"]);
            }
            assert_eq!(got, want, "{}", t["name"]);
            // The service decides policies only: a quota test (sent
            // `repeat` times until a limit refuses) expects what the
            // filter's buckets say, not the policies.
            if let Some(status) = t["expect"]
                .get("status")
                .filter(|_| t.get("repeat").is_none())
            {
                assert_eq!(&got["status"], status, "{}", t["name"]);
            }
            n += 1;
        }
    }
    assert_eq!(n, 115);
}

#[tokio::test]
async fn bad_bodies_are_400_with_a_reason() {
    let s = start(&policies()).await;
    let cases: &[(&[u8], &str)] = &[
        (b"{\"tenant\": \"/acme\"", "the body is not a request: EOF while parsing an object at line 1 column 18"),
        (b"[]", "the body is not a JSON object"),
        (b"", "the body is not a JSON object"),
        (b"{\"method\": \"GET\"}", "the body is not a request: missing field `path` at line 1 column 17"),
        (
            b"{\"method\": \"GET\", \"path\": \"/\", \"tenants\": \"/acme\"}",
            "the body is not a request: unknown field `tenants`, expected one of `tenant`, `method`, `path`, `principal`, `principal_tenant`, `headers`, `claims`, `metadata`, `source_address`, `context` at line 1 column 40",
        ),
        // Valid JSON the bundle's settings cannot express: it reads no claims.
        (
            b"{\"method\": \"GET\", \"path\": \"/\", \"claims\": {\"sub\": \"gus\"}}",
            "`claims`: the bundle reads no claims (set `\"claims\": {\"header\": ...}` in tenantgate.json)",
        ),
    ];
    for (body, message) in cases {
        let a = send(s.http, "POST", "/v1/decide", Some(body)).await;
        assert_eq!(a.status, 400, "{a:?}");
        assert_eq!(
            a.json(),
            json!({"error": "bad_request", "message": message})
        );
    }
}

#[tokio::test]
async fn an_oversized_body_is_413() {
    let s = start(&policies()).await;
    let limit = tenantgate_serve::MAX_BODY_BYTES;
    assert_eq!(limit, 65536);
    // Exactly the limit is read (and is no request); one byte more is refused.
    let at = vec![b' '; limit];
    assert_eq!(
        send(s.http, "POST", "/v1/decide", Some(&at)).await.status,
        400
    );
    let over = vec![b' '; limit + 1];
    let a = send(s.http, "POST", "/v1/decide", Some(&over)).await;
    assert_eq!(a.status, 413);
    assert_eq!(
        a.json(),
        json!({"error": "payload_too_large", "message": "the body is larger than 65536 bytes"})
    );
}

#[tokio::test]
async fn bundle_health_and_unknown_routes() {
    let s = start(&policies()).await;
    let version = tenantgate_serve::load(&policies())
        .unwrap()
        .version()
        .to_string();
    let a = send(s.http, "GET", "/v1/bundle", None).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json(),
        json!({"version": version, "policies": 19,
               "tenants": ["/", "/acme", "/acme/eu", "/acme/eu/team-a", "/acme/us", "/acme/us/retail",
                           "/globex", "/globex/labs", "/ops", "/public"]})
    );
    let a = send(s.http, "GET", "/healthz", None).await;
    assert_eq!(
        (a.status, a.json()),
        (200, json!({"status": "ok", "version": version}))
    );
    let a = send(s.http, "GET", "/v1/decide", None).await;
    assert_eq!((a.status, a.header("allow")), (405, Some("POST")));
    assert_eq!(
        a.json(),
        json!({"error": "method_not_allowed", "message": "this endpoint takes `POST`"})
    );
    let a = send(s.http, "POST", "/v1/bundle", Some(b"{}")).await;
    assert_eq!((a.status, a.header("allow")), (405, Some("GET,HEAD")));
    assert_eq!(
        a.json(),
        json!({"error": "method_not_allowed", "message": "this endpoint takes `GET,HEAD`"})
    );
    let a = send(s.http, "GET", "/v2/decide", None).await;
    assert_eq!(
        (a.status, a.json()),
        (
            404,
            json!({"error": "not_found", "message": "no such endpoint"})
        )
    );
}

const PERMIT: &str = "@id(\"open\")\npermit (principal, action, resource);\n";
const FORBID: &str = "@id(\"closed\")\nforbid (principal, action, resource);\n";

#[tokio::test]
async fn reload_swaps_the_bundle_and_keeps_the_last_good_one() {
    let tree = Tree::new(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", PERMIT)],
    );
    let s = start(tree.path()).await;
    let req = json!({"tenant": "/acme", "method": "GET", "path": "/x", "principal": "u"});
    let v1 = s.state.engine().version().to_string();
    assert_eq!(
        decide(s.http, &req).await.json()["reasons"],
        json!(["open"])
    );

    tree.write(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", FORBID)],
    );
    let v2 = s.state.reload().unwrap();
    assert_ne!(v1, v2);
    let v = decide(s.http, &req).await.json();
    assert_eq!(
        (v["status"].clone(), v["reasons"].clone()),
        (json!(403), json!(["closed"]))
    );
    let a = send(s.http, "GET", "/v1/bundle", None).await;
    assert_eq!(a.json()["version"], json!(v2));

    // A bundle that does not load: the error names the file; v2 keeps serving.
    tree.write(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", "permit (")],
    );
    let err = s.state.reload().unwrap_err();
    assert!(err.contains("p.cedar:1:"), "{err}");
    assert_eq!(s.state.engine().version(), v2);
    // `/healthz` says the last reload failed, and why; `/metrics` counts it.
    let h = send(s.http, "GET", "/healthz", None).await;
    let h = (h.status, h.json());
    assert_eq!(
        (h.0, &h.1["status"], &h.1["version"]),
        (200, &json!("ok"), &json!(v2))
    );
    assert_eq!(h.1["last_reload"]["status"], json!("failed"));
    assert_eq!(h.1["last_reload"]["error"], json!(err));
    let m = send(s.http, "GET", "/metrics", None).await;
    let text = m.body.clone();
    assert!(
        text.contains("tenantgate_serve_reloads_total{result=\"ok\"} 1\n")
            && text.contains("tenantgate_serve_reloads_total{result=\"failed\"} 1\n")
            && text.contains("tenantgate_serve_last_reload_failed 1\n")
            && text
                .contains("tenantgate_serve_decisions_total{api=\"http\",decision=\"deny\"} 1\n")
            && text
                .contains("tenantgate_serve_decisions_total{api=\"http\",decision=\"allow\"} 1\n"),
        "{text}"
    );
    assert_eq!(
        decide(s.http, &req).await.json()["reasons"],
        json!(["closed"])
    );
    // A good reload clears it.
    tree.write(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", PERMIT)],
    );
    s.state.reload().unwrap();
    let h = send(s.http, "GET", "/healthz", None).await.json();
    assert_eq!(h.get("last_reload"), None);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_and_closes_the_listeners() {
    let s = start(&policies()).await;
    let (http, grpc) = (s.http, s.grpc);
    assert_eq!(send(http, "GET", "/healthz", None).await.status, 200);
    s.stop().await.unwrap();
    assert!(tokio::net::TcpStream::connect(http).await.is_err());
    assert!(tokio::net::TcpStream::connect(grpc).await.is_err());
}

// ---------------------------------------------------------------------------
// ext_authz over gRPC

mod authz {
    use super::*;
    use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
    use envoy_types::pb::envoy::config::core::v3::{
        address, socket_address::PortSpecifier, Address, HeaderMap, HeaderValue, Metadata,
        SocketAddress,
    };
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request as AttrRequest,
    };
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};

    /// A CheckRequest as Envoy sends it with `encode_raw_headers`.
    fn raw(method: &str, path: &str, headers: &[(&str, &[u8])]) -> CheckRequest {
        let mut map = vec![
            hv(":authority", b"tenantgate.test"),
            hv(":path", path.as_bytes()),
            hv(":method", method.as_bytes()),
            hv(":scheme", b"http"),
        ];
        map.extend(headers.iter().map(|(k, v)| hv(k, v)));
        request(HttpRequest {
            method: method.into(),
            path: path.into(),
            host: "tenantgate.test".into(),
            header_map: Some(HeaderMap { headers: map }),
            ..Default::default()
        })
    }

    fn hv(k: &str, v: &[u8]) -> HeaderValue {
        HeaderValue {
            key: k.into(),
            raw_value: v.to_vec(),
            ..Default::default()
        }
    }

    fn request(http: HttpRequest) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "10.0.0.5".into(),
                            port_specifier: Some(PortSpecifier::PortValue(5555)),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
                request: Some(AttrRequest {
                    http: Some(http),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    async fn call(addr: std::net::SocketAddr, req: CheckRequest) -> CheckResponse {
        let mut c = AuthorizationClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        c.check(req).await.unwrap().into_inner()
    }

    /// (name, value, append_action) of an OK response's headers, and its removals.
    fn ok(r: &CheckResponse) -> (Vec<(String, String, i32)>, Vec<String>) {
        assert_eq!(r.status.as_ref().unwrap().code, 0, "{r:?}");
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
            panic!("not OK: {r:?}");
        };
        let set = ok
            .headers
            .iter()
            .map(|h| {
                let hv = h.header.as_ref().unwrap();
                (hv.key.clone(), hv.value.clone(), h.append_action)
            })
            .collect();
        (set, ok.headers_to_remove.clone())
    }

    /// (rpc code, http status, headers, body) of a denial.
    fn denied(r: &CheckResponse) -> (i32, i32, Vec<(String, String)>, serde_json::Value) {
        let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else {
            panic!("not denied: {r:?}");
        };
        let headers = d
            .headers
            .iter()
            .map(|h| {
                let hv = h.header.as_ref().unwrap();
                (hv.key.clone(), hv.value.clone())
            })
            .collect();
        (
            r.status.as_ref().unwrap().code,
            d.status.as_ref().unwrap().code,
            headers,
            serde_json::from_str(&d.body).unwrap(),
        )
    }

    const OVERWRITE: i32 = 2; // OVERWRITE_IF_EXISTS_OR_ADD

    fn s(x: &str) -> String {
        x.to_string()
    }

    #[tokio::test]
    async fn allowed_requests_get_the_identity_headers_and_lose_forged_ones() {
        let srv = start(&policies()).await;
        let r = call(
            srv.grpc,
            raw(
                "GET",
                "/orders/./1?x=1",
                &[
                    ("x-tenant", b"/acme/eu"),
                    ("x-user", b"alice"),
                    ("x-user-tenant", b"/acme/eu"),
                    ("x-tenantgate-tenant", b"/globex"),
                    ("X-TenantGate-Extra", b"1"),
                    ("x_tenantgate_principal", b"root"),
                ],
            ),
        )
        .await;
        let (set, removed) = ok(&r);
        assert_eq!(
            set,
            vec![
                (s(":path"), s("/orders/1?x=1"), OVERWRITE),
                (s("x-tenantgate-tenant"), s("/acme/eu"), OVERWRITE),
                (s("x-tenantgate-principal"), s("alice"), OVERWRITE),
            ]
        );
        assert_eq!(
            removed,
            vec![s("x-tenantgate-extra"), s("x_tenantgate_principal")]
        );

        // Anonymous: no principal header is set, a forged one is removed.
        let r = call(
            srv.grpc,
            raw(
                "GET",
                "/docs",
                &[
                    ("x-tenant", b"/public"),
                    ("x-tenantgate-principal", b"root"),
                ],
            ),
        )
        .await;
        let (set, removed) = ok(&r);
        assert_eq!(
            set,
            vec![(s("x-tenantgate-tenant"), s("/public"), OVERWRITE)]
        );
        assert_eq!(removed, vec![s("x-tenantgate-principal")]);
    }

    #[tokio::test]
    async fn denials_carry_the_filters_reply() {
        let srv = start(&policies()).await;
        let r = call(
            srv.grpc,
            raw(
                "GET",
                "/orders",
                &[
                    ("x-tenant", b"/acme/us"),
                    ("x-user", b"gus"),
                    ("x-user-tenant", b"/globex"),
                    ("x-request-id", b"req-7"),
                ],
            ),
        )
        .await;
        let (code, status, headers, body) = denied(&r);
        assert_eq!((code, status), (7, 403));
        assert_eq!(headers, vec![(s("content-type"), s("application/json"))]);
        let id = body["decision_id"].as_str().unwrap().to_string();
        assert_eq!(id.len(), 32);
        assert_eq!(
            body,
            json!({"error": "forbidden", "tenant": "/acme/us", "request_id": "req-7",
                   "decision_id": id, "reasons": ["platform-isolation"]})
        );

        // Two tenant headers (kept apart by the raw header map): 400.
        let r = call(
            srv.grpc,
            raw(
                "GET",
                "/orders",
                &[("x-tenant", b"/acme/eu"), ("x-tenant", b"/globex")],
            ),
        )
        .await;
        let (code, status, _, body) = denied(&r);
        assert_eq!((code, status), (3, 400));
        assert_eq!(body["error"], "bad_request");
        assert_eq!(body["message"], "more than one `x-tenant` header");

        // An encoded slash in the path: 400 before any tenant is read.
        let r = call(srv.grpc, raw("GET", "/a%2Fb", &[("x-tenant", b"/acme/eu")])).await;
        let (_, status, _, body) = denied(&r);
        assert_eq!(status, 400);
        assert_eq!(body["tenant"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn the_headers_map_works_without_raw_headers() {
        let srv = start(&policies()).await;
        let http = HttpRequest {
            method: "GET".into(),
            path: "/orders/1".into(),
            host: "tenantgate.test".into(),
            headers: [
                (":authority", "tenantgate.test"),
                (":method", "GET"),
                (":path", "/orders/1"),
                ("x-tenant", "/acme/eu"),
                ("x-user", "alice"),
                ("x-user-tenant", "/acme/eu"),
            ]
            .into_iter()
            .map(|(k, v)| (s(k), s(v)))
            .collect(),
            ..Default::default()
        };
        let (set, removed) = ok(&call(srv.grpc, request(http)).await);
        assert_eq!(
            set,
            vec![
                (s("x-tenantgate-tenant"), s("/acme/eu"), OVERWRITE),
                (s("x-tenantgate-principal"), s("alice"), OVERWRITE),
            ]
        );
        assert!(removed.is_empty());
    }

    fn string(v: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(v.into())),
        }
    }

    #[tokio::test]
    async fn identity_from_jwt_authn_metadata() {
        let settings = r#"{"tenant": {"metadata": ["envoy.filters.http.jwt_authn", "payload", "tenant"]},
                           "principal": {"metadata": ["envoy.filters.http.jwt_authn", "payload", "sub"]}}"#;
        let cedar =
            "@id(\"members\")\npermit (principal in Tenant::\"/acme\", action, resource);\n";
        let tree = Tree::new(
            settings,
            &[("acme/tenant.json", "{}"), ("acme/p.cedar", cedar)],
        );
        let srv = start(tree.path()).await;
        let with = |tenant: &str, sub: &str| {
            let payload = Struct {
                fields: [(s("tenant"), string(tenant)), (s("sub"), string(sub))]
                    .into_iter()
                    .collect(),
            };
            let jwt = Struct {
                fields: [(
                    s("payload"),
                    Value {
                        kind: Some(Kind::StructValue(payload)),
                    },
                )]
                .into_iter()
                .collect(),
            };
            // A header naming another tenant is not a source here.
            let mut r = raw("GET", "/x", &[("x-tenant", b"/globex")]);
            r.attributes.as_mut().unwrap().metadata_context = Some(Metadata {
                filter_metadata: [(s("envoy.filters.http.jwt_authn"), jwt)]
                    .into_iter()
                    .collect(),
                ..Default::default()
            });
            r
        };
        let (set, _) = ok(&call(srv.grpc, with("/acme", "ann")).await);
        assert_eq!(
            set,
            vec![
                (s("x-tenantgate-tenant"), s("/acme"), OVERWRITE),
                (s("x-tenantgate-principal"), s("ann"), OVERWRITE),
            ]
        );
        // No metadata at all: no tenant, 400.
        let (_, status, _, body) = denied(&call(srv.grpc, raw("GET", "/x", &[])).await);
        assert_eq!(status, 400);
        assert_eq!(
            body["message"],
            "no tenant: metadata `envoy.filters.http.jwt_authn.payload.tenant` is missing"
        );
    }

    #[tokio::test]
    async fn a_reload_reaches_the_grpc_service() {
        let tree = Tree::new(
            "{}",
            &[("acme/tenant.json", "{}"), ("acme/p.cedar", PERMIT)],
        );
        let srv = start(tree.path()).await;
        let req = || raw("GET", "/x", &[("x-tenant", b"/acme"), ("x-user", b"u")]);
        ok(&call(srv.grpc, req()).await);
        tree.write(
            "{}",
            &[("acme/tenant.json", "{}"), ("acme/p.cedar", FORBID)],
        );
        srv.state.reload().unwrap();
        let (_, status, _, body) = denied(&call(srv.grpc, req()).await);
        assert_eq!((status, body["error"].clone()), (403, json!("forbidden")));
    }

    /// The differential table (`testdata/differential.json`: raw requests
    /// over the example tree, also run through the Wasm filter and real
    /// Envoy) through both front ends: each row decided as `check` decides
    /// it, with its status, policies, upstream headers and path, or reply.
    #[tokio::test]
    async fn the_differential_table_is_decided_as_check_decides_it() {
        let table: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(policies().join("../testdata/differential.json")).unwrap(),
        )
        .unwrap();
        let rows = table["rows"].as_array().unwrap();
        assert!(rows.len() >= 40, "the table lost rows");
        let srv = start(&policies()).await;
        let worker = tenantgate_engine::Worker::new(std::sync::Arc::new(
            tenantgate_serve::load(&policies()).unwrap(),
        ));
        let mut problems = Vec::new();
        for row in rows {
            let id = row["id"].as_str().unwrap();
            let (method, path) = (
                row["method"].as_str().unwrap(),
                row["path"].as_str().unwrap(),
            );
            let headers: Vec<(&str, &str)> = row["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| (h[0].as_str().unwrap(), h[1].as_str().unwrap()))
                .collect();
            let spec = json!({"method": method, "path": path, "headers": headers});
            let want = worker
                .check_output(
                    &serde_json::from_value(spec.clone()).unwrap(),
                    tenantgate_serve::now_ns(),
                    None,
                )
                .unwrap();
            if want["status"] != row["status"] {
                problems.push(format!(
                    "{id}: check {}, the table {}",
                    want["status"], row["status"]
                ));
            }
            // HTTP: check's JSON, the reply carrying a decision id.
            let mut got = decide(srv.http, &spec).await.json();
            if let Some(body) = got.pointer_mut("/reply/body") {
                body["decision_id"] = serde_json::Value::Null;
            }
            if got != want {
                problems.push(format!("{id}: http {got} != check {want}"));
            }
            // ext_authz: OK with the upstream's headers and path, or the reply.
            let raw_headers: Vec<(&str, &[u8])> =
                headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
            let r = call(srv.grpc, raw(method, path, &raw_headers)).await;
            let got = match &r.http_response {
                Some(HttpResponse::OkResponse(_)) => {
                    let (set, _) = ok(&r);
                    let mut upstream = serde_json::Map::new();
                    let mut forwarded = serde_json::Value::Null;
                    for (k, v, _) in set {
                        if k == ":path" {
                            forwarded = json!(v);
                        } else {
                            upstream.insert(k, json!(v));
                        }
                    }
                    json!({"status": 200, "upstream": {"path": forwarded, "headers": upstream}})
                }
                _ => {
                    let (_, status, _, mut body) = denied(&r);
                    body["decision_id"] = serde_json::Value::Null;
                    json!({"status": status, "body": body})
                }
            };
            let expected = match want.get("reply") {
                Some(reply) => json!({"status": want["status"], "body": reply["body"]}),
                None => json!({"status": want["status"], "upstream": want["upstream"]}),
            };
            if got != expected {
                problems.push(format!("{id}: ext_authz {got} != check {expected}"));
            }
        }
        assert!(
            problems.is_empty(),
            "{} of {} rows differ:\n  {}",
            problems.len(),
            rows.len(),
            problems.join("\n  ")
        );
    }
}
