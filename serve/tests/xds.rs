//! `tenantgate serve --xds` in-process, through a real gRPC client of Envoy's
//! aggregated discovery service: versions and nonces, ACK and NACK, a reload
//! that pushes and one that does not, a replaced stream, the HTTP endpoints
//! of the control plane (statuses and bodies).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{Node, TypedExtensionConfig};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use serde_json::json;
use tenantgate_serve::rollout::Mode;
use tenantgate_serve::{xds, Config, Server};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const PERMIT: &str = "@id(\"open\")\npermit (principal, action, resource);\n";
const FORBID: &str = "@id(\"closed\")\nforbid (principal, action, resource);\n";
const TEC: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

struct Plane {
    http: std::net::SocketAddr,
    xds: std::net::SocketAddr,
    state: std::sync::Arc<tenantgate_serve::State>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_plane(source: &std::path::Path, mode: Mode) -> Plane {
    let config = Config {
        source: source.to_path_buf(),
        http: "127.0.0.1:0".parse().unwrap(),
        grpc: None,
        xds: Some(xds::Options {
            addr: "127.0.0.1:0".parse().unwrap(),
            module: xds::Module::Wasm("/opt/tenantgate.wasm".into()),
            fail_open: false,
            mode,
            keep: 5,
        }),
    };
    let server = Server::bind(&config).await.unwrap();
    let (http, xds) = (server.http_addr().unwrap(), server.xds_addr().unwrap());
    let state = server.state();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = rx.await;
    }));
    Plane {
        http,
        xds,
        state,
        _stop: tx,
    }
}

/// One ADS stream as an Envoy opens it.
struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Stream {
    async fn open(addr: std::net::SocketAddr, node: &str, version: &str) -> Stream {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(DiscoveryRequest {
            version_info: version.into(),
            node: Some(Node {
                id: node.into(),
                cluster: "edge".into(),
                ..Node::default()
            }),
            resource_names: vec!["tenantgate".into()],
            type_url: TEC.into(),
            ..DiscoveryRequest::default()
        })
        .await
        .unwrap();
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Stream { tx, rx }
    }

    async fn next(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a response within 10 s")
            .unwrap()
            .expect("the stream is open")
    }

    /// Nothing arrives within half a second.
    async fn quiet(&mut self) {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(500), self.rx.message()).await {
            panic!("unexpected: {m:?}");
        }
    }

    async fn reply(&self, version: &str, nonce: &str, error: Option<&str>) {
        self.tx
            .send(DiscoveryRequest {
                version_info: version.into(),
                resource_names: vec!["tenantgate".into()],
                type_url: TEC.into(),
                response_nonce: nonce.into(),
                error_detail: error.map(|e| RpcStatus {
                    code: 3,
                    message: e.into(),
                    ..RpcStatus::default()
                }),
                ..DiscoveryRequest::default()
            })
            .await
            .unwrap();
    }
}

/// The bundle JSON inside a response (the Wasm filter's plugin configuration).
fn bundle_of(r: &DiscoveryResponse) -> serde_json::Value {
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    use envoy_types::pb::google::protobuf::StringValue;
    assert_eq!(r.resources.len(), 1);
    let tec = TypedExtensionConfig::decode(r.resources[0].value.as_slice()).unwrap();
    assert_eq!(tec.name, "tenantgate");
    let wasm = Wasm::decode(tec.typed_config.unwrap().value.as_slice()).unwrap();
    let s =
        StringValue::decode(wasm.config.unwrap().configuration.unwrap().value.as_slice()).unwrap();
    serde_json::from_str(&s.value).unwrap()
}

async fn status(p: &Plane) -> serde_json::Value {
    let a = send(p.http, "GET", "/v1/rollout", None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()
}

#[tokio::test]
async fn versions_nonces_acks_nacks_and_idempotent_reloads() {
    let tree = Tree::new(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", PERMIT)],
    );
    let p = start_plane(tree.path(), Mode::Auto).await;
    let v1 = p.state.engine().version().to_string();
    let mut s = Stream::open(p.xds, "edge-1", "").await;
    let r = s.next().await;
    assert_eq!(
        (r.version_info.as_str(), r.nonce.as_str()),
        (v1.as_str(), "1")
    );
    assert_eq!(r.type_url, TEC);
    assert_eq!(bundle_of(&r)["version"], v1.as_str());
    s.reply(&v1, "1", None).await;
    s.quiet().await;
    let st = status(&p).await;
    assert_eq!(st["nodes"]["edge-1"]["acked"]["version"], v1.as_str());
    assert_eq!(st["nodes"]["edge-1"]["cluster"], "edge");
    assert_eq!(
        st["summary"],
        json!({"nodes": 1, "connected": 1, "in_sync": 1, "nacking": 0})
    );

    // A new version is pushed with a new nonce; the node refuses it.
    tree.write(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", FORBID)],
    );
    let v2 = p.state.reload().unwrap();
    let r = s.next().await;
    assert_eq!(
        (r.version_info.as_str(), r.nonce.as_str()),
        (v2.as_str(), "2")
    );
    // A stale reply (the old nonce) changes nothing.
    s.reply(&v1, "1", Some("stale")).await;
    s.reply(
        &v1,
        "2",
        Some("Unable to create Wasm HTTP filter tenantgate"),
    )
    .await;
    s.quiet().await;
    let st = status(&p).await;
    let n = &st["nodes"]["edge-1"];
    assert_eq!(n["acked"]["version"], v1.as_str());
    assert_eq!(n["nacked"]["version"], v2.as_str());
    assert_eq!(
        n["nacked"]["error"],
        "Unable to create Wasm HTTP filter tenantgate"
    );
    assert_eq!(n["in_sync"], false);
    let m = send(p.http, "GET", "/metrics", None).await;
    assert_eq!(m.header("content-type"), Some("text/plain; version=0.0.4"));
    assert!(
        m.body.contains("tenantgate_xds_nacks_total 1\n"),
        "{}",
        m.body
    );
    assert!(
        m.body.contains("tenantgate_xds_nodes_nacking 1\n"),
        "{}",
        m.body
    );
    assert!(m
        .body
        .contains(&format!("tenantgate_xds_nodes{{version=\"{v1}\"}} 1\n")));

    // The same content again: the same version, no push.
    tree.write(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", FORBID)],
    );
    assert_eq!(p.state.reload().unwrap(), v2);
    s.quiet().await;
    // A broken change: refused, located, nothing pushed.
    tree.write(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", "permit (")],
    );
    let e = p.state.reload().unwrap_err();
    assert!(e.contains("tenants/acme/p.cedar:1:"), "{e}");
    s.quiet().await;
    let st = status(&p).await;
    assert!(st["source"]["refused"]["errors"][0]
        .as_str()
        .unwrap()
        .contains("tenants/acme/p.cedar:1:"));
    assert_eq!(st["source"]["version"], v2.as_str());

    // Rollback: v1 again, nonce 3; ACKed.
    let a = send(p.http, "POST", "/v1/rollback", Some(b"")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["target"], v1.as_str());
    let r = s.next().await;
    assert_eq!(
        (r.version_info.as_str(), r.nonce.as_str()),
        (v1.as_str(), "3")
    );
    s.reply(&v1, "3", None).await;
    s.quiet().await;
    let st = status(&p).await;
    assert_eq!(st["nodes"]["edge-1"]["in_sync"], true);
    assert!(
        st["nodes"]["edge-1"]["nacked"].is_null(),
        "an ACK clears the NACK"
    );

    // The node reconnects (a new stream, the version it runs): it gets the
    // config again on the new stream; the old stream is closed.
    let mut s2 = Stream::open(p.xds, "edge-1", &v1).await;
    let r = s2.next().await;
    assert_eq!(
        (r.version_info.as_str(), r.nonce.as_str()),
        (v1.as_str(), "4")
    );
    let end = tokio::time::timeout(Duration::from_secs(5), s.rx.message()).await;
    assert!(matches!(end, Ok(Ok(None))), "the old stream ends: {end:?}");
}

#[tokio::test]
async fn canary_by_node_pattern_in_manual_mode() {
    let tree = Tree::new(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", PERMIT)],
    );
    let p = start_plane(tree.path(), Mode::Manual).await;
    let v1 = p.state.engine().version().to_string();
    let mut a = Stream::open(p.xds, "edge-a", "").await;
    let mut b = Stream::open(p.xds, "edge-b", "").await;
    for s in [&mut a, &mut b] {
        let r = s.next().await;
        s.reply(&r.version_info, &r.nonce, None).await;
    }
    tree.write(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", FORBID)],
    );
    let v2 = p.state.reload().unwrap();
    // Manual: kept, not sent.
    a.quiet().await;
    assert_eq!(status(&p).await["target"], v1.as_str());
    let r = send(p.http, "POST", "/v1/rollout", Some(br#"{"nodes": "*-b"}"#)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["canary"],
        json!({"version": v2, "nodes": "*-b", "fraction": null, "chosen": []})
    );
    assert_eq!(b.next().await.version_info, v2);
    a.quiet().await;
    let r = send(
        p.http,
        "POST",
        "/v1/rollout",
        Some(format!(r#"{{"version": "{v2}"}}"#).as_bytes()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(a.next().await.version_info, v2);
    b.quiet().await;

    for (body, message) in [
        (
            r#"{"nodes": "a", "fraction": 0.5}"#,
            "give `nodes` or `fraction`, not both",
        ),
        (
            r#"{"fraction": 2}"#,
            "`fraction` must be above 0 and at most 1, got 2",
        ),
        (
            r#"{"version": "sha256:00"}"#,
            "version `sha256:00` is not one the server keeps (`GET /v1/rollout` lists them)",
        ),
    ] {
        let r = send(p.http, "POST", "/v1/rollout", Some(body.as_bytes())).await;
        assert_eq!(
            (r.status, r.json()),
            (400, json!({"error": "bad_request", "message": message})),
            "{body}"
        );
    }
    let r = send(p.http, "POST", "/v1/rollout", Some(br#"{"node": "a"}"#)).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .starts_with("the body is not a request: unknown field `node`"));
}

#[tokio::test]
async fn without_xds_the_control_plane_endpoints_are_404() {
    let s = start(&policies()).await;
    for (method, path) in [
        ("GET", "/v1/rollout"),
        ("POST", "/v1/rollout"),
        ("POST", "/v1/rollback"),
    ] {
        let a = send(s.http, method, path, Some(b"{}")).await;
        assert_eq!(
            (a.status, a.json()),
            (
                404,
                json!({"error": "not_found",
                       "message": "the control plane is off (start `tenantgate serve` with `--xds`)"})
            ),
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn a_bundle_file_source_is_pushed_when_it_changes() {
    let tree = Tree::new(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", PERMIT)],
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bundle.json");
    let (b1, _) = tenantgate_serve::load_bundle(tree.path()).unwrap();
    std::fs::write(&file, b1.to_json()).unwrap();
    let p = start_plane(&file, Mode::Auto).await;
    let mut s = Stream::open(p.xds, "edge-1", "").await;
    let r = s.next().await;
    assert_eq!(r.version_info, b1.version);
    assert_eq!(bundle_of(&r)["version"], b1.version.as_str());
    s.reply(&r.version_info, &r.nonce, None).await;
    tree.write(
        "{}",
        &[("acme/tenant.json", "{}"), ("acme/p.cedar", FORBID)],
    );
    let (b2, _) = tenantgate_serve::load_bundle(tree.path()).unwrap();
    std::fs::write(&file, b2.to_json()).unwrap();
    assert_eq!(p.state.reload().unwrap(), b2.version);
    let r = s.next().await;
    assert_eq!(r.version_info, b2.version);
    // A bundle edited after `tenantgate bundle` wrote it does not load: not pushed.
    std::fs::write(&file, b2.to_json().replace("forbid", "permit")).unwrap();
    let e = p.state.reload().unwrap_err();
    assert!(e.contains("does not match its content"), "{e}");
    s.quiet().await;
}
