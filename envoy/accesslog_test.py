#!/usr/bin/env python3
"""Decisions in Envoy's own access log and traces, in real Envoy.

The bundle is the example tree (`policies/`) with `"filter_state": true`. The
bootstrap is what `tenantgate envoy BUNDLE --wasm ... --access-log FILE` (or
`--native ...` with TENANTGATE_BUILD=native: the native build's filter state
has no `wasm.` prefix) renders, plus the tracing snippet of docs/reference.md (span tags from the
same filter state) with Envoy's Zipkin tracer sending to a collector in this
test. One request of each kind:

- allowed (alice at `/acme/eu`), forbidden (carol from `/acme`), rate-limited
  (lena's sixth request at `/globex/labs`, here 5 an hour), bad (tenant `/Acme`);
- the access log file has one JSON line per request with exactly the
  decision's fields (tenant, principal, decision, kind, policies, limit,
  decision id, bundle version; `null` where a decision has none), the same
  values as its audit line and reply;
- the spans carry the same values as tags;
- audit lines carry the trace id of a valid `traceparent` header and nothing
  for a malformed one;
- the native build also sets the fields as dynamic metadata (namespace
  `tenantgate`): the same values through `%DYNAMIC_METADATA(tenantgate:...)%`.

    python3 envoy/accesslog_test.py [-v]
    TENANTGATE_BUILD=native python3 envoy/accesslog_test.py [-v]
"""

import http.server
import json
import subprocess
import sys
import threading
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402

WORK = h.tempdir("tenantgate-accesslog-")
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
KEYS = ["tenant", "principal", "decision", "kind", "policies", "limit", "decision_id", "bundle"]


def rid(n):
    """The x-request-id of request `n`."""
    return f"7e9a0c1d-5b2f-4a11-8c3d-{n:012d}"


def same_request(a, b):
    """Request ids equal but for the 15th character (Envoy's trace decision)."""
    return a is not None and len(a) == len(b) and a[:14] + a[15:] == b[:14] + b[15:]


def who(user, home, tenant, **extra):
    headers = {"x-tenant": tenant, "x-user": user, "x-user-tenant": home}
    headers.update(extra)
    return headers


def state_key(k):
    """The filter state a build sets for field `k`: Envoy prefixes what a Wasm
    filter sets with `wasm.`; the native build's keys are as it sets them."""
    return f"tenantgate.{k}" if h.build() == "native" else f"wasm.tenantgate.{k}"


def tracing(collector_cluster):
    """The tracing snippet of docs/reference.md, with a Zipkin provider."""
    return {
        "random_sampling": {"value": 100},
        "custom_tags": [
            {"tag": f"tenantgate.{k}", "value": f"%FILTER_STATE({state_key(k)}:PLAIN)%"} for k in KEYS
        ],
        "provider": {
            "name": "envoy.tracers.zipkin",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": collector_cluster,
                "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": "HTTP_JSON",
            },
        },
    }


class Collector:
    """A Zipkin collector: keeps the spans POSTed to it (JSON v2)."""

    def __init__(self):
        self.spans = []
        spans = self.spans

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("content-length", 0)))
                spans.extend(json.loads(body))
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


class AccessLog(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        policies = h.copy_policies(WORK / "policies")
        h.edit_settings(policies, filter_state=True)
        # 5 an hour at /globex/labs: the sixth request is refused however slowly they go.
        labs = policies / "tenants" / "globex" / "labs" / "tenant.json"
        config = json.loads(labs.read_text())
        config["limits"] = {"hourly": {"rate": 5, "per": "1h", "burst": 5}}
        labs.write_text(json.dumps(config))
        cls.bundle_path = WORK / "bundle.json"
        cls.version = json.loads(h.make_bundle(policies, cls.bundle_path))["version"]
        cls.log_path = WORK / "access.log"
        cls.upstream = h.Upstream().start()
        cls.collector = Collector()
        listen, admin = h.free_port(), h.free_port()
        cmd = h.cli_command() + [
            "envoy", str(cls.bundle_path), *h.module_args(),
            "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
            "--upstream", f"127.0.0.1:{cls.upstream.port}", "--access-log", str(cls.log_path),
            # Loopback is internal: Envoy keeps the client's x-request-id, which names each request here.
            # (A UUID: Envoy writes the trace decision into its 15th character, and does not
            # trace a request whose id is not a UUID.)
            "--internal-cidr", "127.0.0.0/8",
        ]
        proc = subprocess.run(cmd, cwd=h.REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr}")
        doc = json.loads(proc.stdout)
        hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["tracing"] = tracing("zipkin")
        if h.build() == "native":
            # The native build also sets the fields as dynamic metadata (namespace `tenantgate`).
            fmt = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
            for k in KEYS:
                fmt[f"md_{k}"] = f"%DYNAMIC_METADATA(tenantgate:{k})%"
        doc["static_resources"]["clusters"].append({
            "name": "zipkin", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "zipkin", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": cls.collector.port}}}}]}]},
        })
        # Send every span at once, not in batches of 5 every 5 seconds.
        doc["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {
            "tracing.zipkin.min_flush_spans": 1, "tracing.zipkin.flush_interval_ms": 200}}]}
        cls.envoy = h.Envoy(json.dumps(doc), WORK, listen_port=listen, admin_port=admin).start()
        cls.replies = cls.send_all()
        cls.lines = h.wait_for(lambda: cls.read_log() if len(cls.read_log()) >= 4 + 5 else None, timeout=10)
        h.wait_for(lambda: len(cls.collector.spans) >= 4 + 5, timeout=10)

    @classmethod
    def tearDownClass(cls):
        cls.envoy.stop()
        cls.upstream.stop()
        cls.collector.stop()

    @classmethod
    def send_all(cls):
        req = cls.envoy.request
        out = {}
        out["allowed"] = req("GET", "/orders/1", who("alice", "/acme/eu", "/acme/eu", **{
            "x-request-id": rid(1), "traceparent": TRACEPARENT}))
        out["forbidden"] = req("GET", "/orders/1", who("carol", "/acme", "/acme/eu", **{
            "x-request-id": rid(2), "traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"}))
        for i in range(5):
            r = req("GET", "/experiments", who("lena", "/globex/labs", "/globex/labs", **{
                "x-request-id": rid(10 + i)}))
            assert r.status == 200, r
        out["limited"] = req("GET", "/experiments", who("lena", "/globex/labs", "/globex/labs", **{
            "x-request-id": rid(3), "traceparent": "00-xyz"}))
        out["bad"] = req("GET", "/orders/1", who("alice", "/acme/eu", "/Acme", **{
            "x-request-id": rid(4), "traceparent": TRACEPARENT}))
        return out

    @classmethod
    def read_log(cls):
        try:
            text = cls.log_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def line(self, request_id):
        found = [entry for entry in self.lines if same_request(entry["request_id"], request_id)]
        self.assertEqual(len(found), 1, f"{request_id}: {self.lines}")
        return found[0]

    def audit(self, request_id):
        found = [a for a in h.audit_lines(self.envoy) if same_request(a.get("request_id"), request_id)]
        self.assertEqual(len(found), 1, request_id)
        return found[0]

    def span(self, request_id):
        found = [s for s in self.collector.spans
                 if same_request(s.get("tags", {}).get("guid:x-request-id"), request_id)]
        self.assertEqual(len(found), 1, f"{request_id}: {self.collector.spans}")
        return found[0]["tags"]

    def check(self, name, request_id, status, want):
        """The access log line, the span and the audit line of one request."""
        self.assertEqual(self.replies[name].status, status, self.replies[name])
        line = self.line(request_id)
        audit = self.audit(request_id)
        decision_id = audit["decision_id"]
        self.assertRegex(decision_id, r"^[0-9a-f]{32}$")
        if status != 200:
            self.assertEqual(self.replies[name].json()["decision_id"], decision_id)
        want = dict(want, decision_id=decision_id, bundle=self.version)
        self.assertEqual({k: line[k] for k in KEYS}, want)
        if h.build() == "native":
            self.assertEqual({k: line[f"md_{k}"] for k in KEYS}, want)
        self.assertEqual(line["status"], status)
        self.assertEqual(line["method"], "GET")
        # The same values as the audit line.
        self.assertEqual(audit["tenant"], want["tenant"])
        self.assertEqual(audit["principal"], want["principal"])
        self.assertEqual(audit["kind"], want["kind"])
        self.assertEqual(",".join(audit["policies"]) or None, want["policies"])
        self.assertEqual(audit["limit"], want["limit"])
        self.assertEqual(audit["bundle"], self.version)
        # The span's tags: the values that are set (a tag of an unset value is left out).
        tags = self.span(request_id)
        self.assertEqual({k: tags.get(f"tenantgate.{k}") for k in KEYS}, want)
        return audit

    def test_allowed(self):
        audit = self.check("allowed", rid(1), 200, {
            "tenant": "/acme/eu", "principal": "alice", "decision": "allow", "kind": "allowed",
            "policies": ",".join(self.audit(rid(1))["policies"]), "limit": None})
        self.assertTrue(audit["policies"], audit)
        self.assertEqual(audit["trace_id"], TRACE_ID)

    def test_forbidden(self):
        audit = self.check("forbidden", rid(2), 403, {
            "tenant": "/acme/eu", "principal": "carol", "decision": "deny", "kind": "forbidden",
            "policies": ",".join(self.audit(rid(2))["policies"]), "limit": None})
        self.assertTrue(audit["policies"], audit)
        self.assertNotIn("trace_id", audit)  # an all-zero trace id is not one

    def test_rate_limited(self):
        audit = self.check("limited", rid(3), 429, {
            "tenant": "/globex/labs", "principal": "lena", "decision": "deny", "kind": "quota_exceeded",
            "policies": None, "limit": "hourly"})
        self.assertNotIn("trace_id", audit)  # malformed

    def test_bad_request(self):
        audit = self.check("bad", rid(4), 400, {
            "tenant": None, "principal": None, "decision": "deny", "kind": "bad_request",
            "policies": None, "limit": None})
        self.assertEqual(audit["trace_id"], TRACE_ID)

    def test_every_request_has_one_line(self):
        self.assertEqual(len(self.lines), 9, self.lines)
        self.assertEqual(sorted(e["status"] for e in self.lines), [200] * 6 + [400, 403, 429])


if __name__ == "__main__":
    sys.exit(h.run_tests(sys.modules[__name__], "envoy-accesslog", WORK))
