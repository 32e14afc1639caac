#!/usr/bin/env python3
"""What upstreams can trust, tested as a hostile client would, in real Envoy
running the configuration `tenantgate envoy` renders (SECURITY.md lists each
clause with the test here that holds it).

- underscore spellings of `x-tenantgate-*` against a WSGI upstream (wsgiref,
  which folds `_` and `-` like every CGI/WSGI/Rack server);
- `x-tenantgate-*` sent as request trailers over HTTP/2;
- a forged `x-request-id` from loopback;
- gRPC clients (grpcio, with a retry policy): a refused call is
  RESOURCE_EXHAUSTED / PERMISSION_DENIED, not retried; read RPCs are `read`;
- the RateLimit fields, parsed with a structured-field parser (http_sfv).

Needs grpcio, h2 and http_sfv (scripts/test-envoy.sh installs them into
.venv and runs this file with .venv/bin/python). Loopback only, bounded
request counts. Run it alone with

    .venv/bin/python envoy/upstream_trust_test.py [-v]
"""

import json
import socket
import subprocess
import sys
import time
import unittest
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import http_sfv

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
import e2e_test as e2e  # noqa: E402  (helpers only)

GRPC_READ = ["/acme.Orders/Get*"]


def edit_bundle(d):
    """policies/ with gRPC read methods mapped."""
    h.edit_settings(d, grpc={"read": GRPC_READ})


class Proc:
    """A Python upstream script on a free port."""

    def __init__(self, script):
        self.script, self.port, self.proc = script, h.free_port(), None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, str(h.ENVOY_DIR / self.script), "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h.wait_port(self.port, 10, self.proc, self.script)
        return self

    def __exit__(self, *exc):
        h._stop(self.proc)


def rendered_envoy(bundle_path, upstream_port, name, *extra):
    """Envoy started from `tenantgate envoy` output (the config under test)."""
    listen, admin = h.free_port(), h.free_port()
    cmd = h.cli_command() + [
        "envoy", str(bundle_path), *h.module_args(),
        "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
        "--upstream", f"127.0.0.1:{upstream_port}", *extra,
    ]
    out = subprocess.run(cmd, cwd=h.REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr}")
    return h.Envoy(out.stdout, e2e.WORK / name, name="envoy", concurrency=2,
                   admin_port=admin, listen_port=listen)


def h2_request(port, headers, body=b"", trailers=None, timeout=10):
    """One HTTP/2 request with prior knowledge; returns (status, headers, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers, end_stream=False)
    if body:
        conn.send_data(sid, body, end_stream=False)
    if trailers:
        conn.send_headers(sid, trailers, end_stream=True)
    else:
        conn.end_stream(sid)
    sock.sendall(conn.data_to_send())
    status, resp_headers, data, done = None, {}, b"", False
    deadline = time.monotonic() + timeout
    try:
        while not done and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    resp_headers = dict(ev.headers)
                    status = int(resp_headers[":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
                    done = True
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return status, resp_headers, data


def alice_headers():
    return {"x-tenant": "/acme/eu", "x-user": "alice", "x-user-tenant": "/acme/eu"}


class RenderedConfigCase(unittest.TestCase):
    """One upstream script and one Envoy rendered by `tenantgate envoy` per class."""

    upstream_script = None
    name = None
    render_args = ()

    @classmethod
    def setUpClass(cls):
        cls.bundle_path = e2e.WORK / "bundle-trust.json"
        cls.bundle_path.write_text(e2e.bundle_of("trust", edit_bundle))
        cls.upstream = Proc(cls.upstream_script).__enter__()
        cls.envoy = rendered_envoy(cls.bundle_path, cls.upstream.port, cls.name, *cls.render_args)
        try:
            cls.envoy.start()
        except Exception:
            cls.upstream.__exit__()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.envoy.stop()
        cls.upstream.__exit__()


class RenderedConfigHttp1(RenderedConfigCase):
    """`tenantgate envoy` defaults, a WSGI upstream behind them."""

    upstream_script = "wsgi_upstream.py"
    name = "trust-http1"

    def environ(self, resp):
        self.assertEqual(resp.status, 200, resp)
        doc = resp.json()
        self.assertEqual(doc.get("upstream"), "wsgi", doc)
        return doc["environ"]

    def raw(self, method, path, headers):
        from isolation_test import raw_request
        return raw_request(self.envoy.listen_port, method, path, headers)

    def test_underscore_spellings_never_reach_a_wsgi_upstream(self):
        # Anonymous: nothing may claim a principal.
        r = self.raw("GET", "/docs", [("x-tenant", "/public"), ("x_tenantgate_principal", "root"),
                                      ("X_TENANTGATE_TENANT", "/")])
        env = self.environ(r)
        self.assertNotIn("HTTP_X_TENANTGATE_PRINCIPAL", env)
        self.assertEqual(env.get("HTTP_X_TENANTGATE_TENANT"), "/public")
        # Envoy's codec dropped them (DROP_HEADER) before the filter ran.
        self.assertGreaterEqual(self.envoy.counter("http1.dropped_headers_with_underscores"), 2)
        # alice: the upstream reads exactly her, not "root,alice".
        r = self.raw("GET", "/orders/1", list(alice_headers().items())
                     + [("x_tenantgate_principal", "root"), ("x-tenantgate_principal", "root")])
        env = self.environ(r)
        self.assertEqual(env.get("HTTP_X_TENANTGATE_PRINCIPAL"), "alice")
        self.assertEqual(env.get("HTTP_X_TENANTGATE_TENANT"), "/acme/eu")
        # DROP_HEADER: no underscore header reaches the upstream at all.
        r = self.raw("GET", "/orders/1", list(alice_headers().items()) + [("x_custom", "1")])
        self.assertNotIn("HTTP_X_CUSTOM", self.environ(r))
        self.assertGreaterEqual(self.envoy.counter("http1.dropped_headers_with_underscores"), 1)

    def test_a_forged_request_id_is_not_the_decision_id(self):
        forged = '"}, forged'
        ids = []
        for _ in range(2):
            r = self.raw("GET", "/internal/keys", list(alice_headers().items()) + [("x-request-id", forged)])
            self.assertEqual(r.status, 403, r)
            doc = r.json()
            # use_remote_address with no internal range: Envoy replaced the client's id.
            self.assertNotEqual(doc.get("request_id"), forged)
            did = doc.get("decision_id") or ""
            self.assertRegex(did, r"^[0-9a-f]{32}$")
            ids.append(did)
        self.assertNotEqual(ids[0], ids[1], "two requests, two decision ids")
        line = e2e.wait_for(lambda: next((a for a in e2e.audit_lines(self.envoy)
                                          if a.get("decision_id") == ids[1]), None), 5)
        self.assertIsNotNone(line, "no audit line with the reply's decision id")
        self.assertNotEqual(line.get("request_id"), forged)

    def test_ratelimit_fields_are_structured_and_actionable(self):
        # /globex/labs: rps rate 5, burst 5; POST costs 2 (policies/tenantgate.json).
        hdrs = {"x-tenant": "/globex/labs", "x-user": "lena", "x-user-tenant": "/globex/labs"}
        seen = []
        for _ in range(12):
            r = self.envoy.request("GET", "/experiments", hdrs)
            seen.append(r)
            if r.status == 429:
                break
        self.assertEqual(seen[-1].status, 429, [x.status for x in seen])
        for r in seen:
            pol, rl = http_sfv.List(), http_sfv.List()
            pol.parse(r.headers["ratelimit-policy"].encode())
            rl.parse(r.headers["ratelimit"].encode())
            p = {i.value: i.params for i in pol}
            s = {i.value: i.params for i in rl}
            self.assertEqual(p["rps"]["q"], 5, r.headers)
            self.assertEqual(p["rps"]["w"], 1)
            self.assertLessEqual(s["rps"]["r"], p["rps"]["q"], r.headers)
            self.assertGreaterEqual(s["rps"]["t"], 0)
            if s["rps"]["r"] < p["rps"]["q"]:
                self.assertGreaterEqual(s["rps"]["t"], 1, "t says when the quota is back")
        limited = seen[-1]
        rl = http_sfv.List()
        rl.parse(limited.headers["ratelimit"].encode())
        self.assertEqual(rl[0].params["r"], 0)
        self.assertEqual(int(limited.headers["retry-after"]), limited.json()["retry_after_s"])

    def test_a_post_counts_in_requests_of_its_cost(self):
        time.sleep(1.1)  # the labs bucket refills (5 per second)
        hdrs = {"x-tenant": "/globex/labs", "x-user": "lena", "x-user-tenant": "/globex/labs"}
        r = self.envoy.request("POST", "/experiments", hdrs, body="{}")
        pol = http_sfv.List()
        pol.parse(r.headers["ratelimit-policy"].encode())
        self.assertEqual(pol[0].params["q"], 2, r.headers)  # 5 tokens / cost 2
        self.assertEqual(pol[0].params["tenantgate-cost"], 2)


class RenderedConfigHttp2(RenderedConfigCase):
    """`tenantgate envoy --upstream-protocol http2` in front of an HTTP/2 upstream."""

    upstream_script = "h2_upstream.py"
    name = "trust-http2"
    render_args = ("--upstream-protocol", "http2")

    def test_request_trailers_never_carry_our_headers(self):
        headers = [(":method", "POST"), (":path", "/orders"), (":scheme", "http"), (":authority", "t.test"),
                   ("x-tenant", "/public"), ("x-user", "pat"), ("x-user-tenant", "/public")]
        trailers = [("x-tenantgate-principal", "root"), ("x-tenantgate-tenant", "/"), ("x-checksum", "abc")]
        status, _, body = h2_request(self.envoy.listen_port, headers, b"{}", trailers)
        self.assertEqual(status, 200, body)
        doc = json.loads(body)
        self.assertEqual(doc["upstream"], "h2")
        names = [k for k, _ in doc["trailers"]]
        self.assertIn("x-checksum", names, "other trailers go through")
        self.assertFalse([n for n in names if n.replace("_", "-").startswith("x-tenantgate-")], doc["trailers"])
        principals = [v for k, v in doc["headers"] if k == "x-tenantgate-principal"]
        self.assertEqual(principals, ["pat"])

    def test_grpc_refusals_are_final_statuses_and_read_rpcs_are_reads(self):
        config = json.dumps({"methodConfig": [{
            "name": [{}],
            "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})
        options = [("grpc.enable_retries", 1), ("grpc.service_config", config)]
        meta = (("x-tenant", "/globex/labs"), ("x-user", "lena"), ("x-user-tenant", "/globex/labs"))
        with grpc.insecure_channel(f"127.0.0.1:{self.envoy.listen_port}", options=options) as ch:
            get = ch.unary_unary("/acme.Orders/GetOrder")
            time.sleep(1.1)  # a full labs bucket
            quota_before = self.envoy.counter(f"{h.stat_namespace()}.tenantgate.denied_quota")
            codes = []
            for _ in range(10):
                try:
                    self.assertEqual(get(b"hi", metadata=meta, timeout=5), b"hi")
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        doc = json.loads(e.details())
                        self.assertEqual(doc["error"], "quota_exceeded")
                        self.assertEqual(doc["limit"], "rps")
            self.assertEqual(codes[:5], ["OK"] * 5, codes)
            refused = codes.count("RESOURCE_EXHAUSTED")
            self.assertGreaterEqual(refused, 3, codes)
            self.assertEqual(set(codes), {"OK", "RESOURCE_EXHAUSTED"}, codes)
            # No refused call came back: one denial counted per refused call.
            self.assertEqual(self.envoy.counter(f"{h.stat_namespace()}.tenantgate.denied_quota") - quota_before, refused)
            # A write RPC by someone who may only read: PERMISSION_DENIED, with the JSON.
            create = ch.unary_unary("/acme.Orders/CreateOrder")
            carol = (("x-tenant", "/acme/eu"), ("x-user", "alice"), ("x-user-tenant", "/acme/eu"))
            with self.assertRaises(grpc.RpcError) as denied:
                create(b"x", metadata=carol, timeout=5)
            self.assertEqual(denied.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
            self.assertEqual(json.loads(denied.exception.details())["error"], "forbidden")
            # The same principal's read RPC passes (members read their tenant).
            self.assertEqual(get(b"r", metadata=carol, timeout=5), b"r")
            # A malformed tenant: INVALID_ARGUMENT.
            with self.assertRaises(grpc.RpcError) as bad:
                get(b"x", metadata=(("x-tenant", "/Acme"),), timeout=5)
            self.assertEqual(bad.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2 if "-v" in sys.argv else 1).result
    failed = len(result.failures) + len(result.errors)
    print(f"upstream-trust: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
