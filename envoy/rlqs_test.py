#!/usr/bin/env python3
"""Envoy's own RLQS client filter (`envoy.filters.http.rate_limit_quota`, no
tenantgate filter) against `tenantgate-rls` in mode `assigned`.

The bundle (`rate_limit_service.mode: "assigned"`, `report_interval_ms: 500`)
has one fleet limit name, `rps`: 40/s on `/`, `/a` rate 30 ceil 40 burst 10,
`/b` rate 10 ceil 40 burst 5. Envoy (2 workers) builds the bucket id
`{"tenant": <x-tenant header>, "limit": "rps"}` for every request carrying
`x-tenant` ([`rlqs_filter`] below; docs/fleet.md shows the same config) and
reports to `tenantgate-rls`. Envoy 1.40 reports every 5 s whatever the
bucket's `reporting_interval` says (a hard-coded interval in its global
RLQS client), and sends a first report at once for a new bucket; the service
takes each client's interval from its `time_elapsed` (assignment TTL: 3 of
them, 15 s). Until its first assignment Envoy allows everything
(`no_assignment_behavior`). Requests are sent as fast as a few threads can;
each phase waits 6.5 s (past the next 5 s report, whose demand includes the
refusals) for the assignments to settle, then counts the 200s over 4 s:

- `/a` alone: `/b` idle, `/a` borrows up to its ceil: assigned 40/s, so
  160 admissions in 4 s, within [150, 176] (the 10-token bucket and 6 more
  on the upper side, 10 on the lower side for the client threads' timing);
- `/a` and `/b` both flooding: each its rate, 30/s and 10/s: `/a` within
  [112, 136] of 120 and `/b` within [35, 49] of 40;
- the reports are in Redis (`tenantgate:rlqs:v1:{tenantgate}:reports`, one
  field per bucket and client).

    python3 envoy/rlqs_test.py [-v]

Needs `redis-server` (scripts/install-redis.sh), `tenantgate` and
`tenantgate-rls` (`cargo build -p tenantgate-cli -p tenantgate-rls`) and Envoy
(scripts/install-envoy.sh).
"""

import http.client
import json
import sys
import threading
import time
import unittest
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
from fleet_test import Redis, Rls  # noqa: E402

WORK = h.tempdir("tenantgate-rlqs-")
DOMAIN = "tenantgate"
SETTLE_S, MEASURE_S = 6.5, 4.0
HEADER_INPUT = "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput"


def hcm(name, route_config, http_filters):
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": name, "route_config": route_config,
        "http_filters": http_filters + [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}


def listener(name, port, filt):
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [filt]}]}


def rlqs_filter(cluster, domain, header="x-tenant", limit="rps", reporting_interval="5s"):
    """Envoy's RLQS client filter: one bucket per request that carries
    `header` (a tenant path), `{"tenant": <header>, "limit": <limit>}`,
    reported to `cluster` (Envoy 1.40 reports every 5 s whatever
    `reporting_interval` says); allow-all until the first assignment, 429
    when the assigned token bucket is empty."""
    header_input = {"name": "tenant", "typed_config": {"@type": HEADER_INPUT, "header_name": header}}
    settings = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaBucketSettings",
        "bucket_id_builder": {"bucket_id_builder": {
            "tenant": {"custom_value": header_input},
            "limit": {"string_value": limit},
        }},
        "reporting_interval": reporting_interval,
        "no_assignment_behavior": {"fallback_rate_limit": {"blanket_rule": "ALLOW_ALL"}},
        "deny_response_settings": {"http_status": {"code": 429}},
    }
    return {
        "name": "envoy.filters.http.rate_limit_quota",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaFilterConfig",
            "rlqs_server": {"envoy_grpc": {"cluster_name": cluster}},
            "domain": domain,
            "bucket_matchers": {"matcher_list": {"matchers": [{
                "predicate": {"single_predicate": {"input": header_input, "value_match": {"prefix": "/"}}},
                "on_match": {"action": {"name": "bucket", "typed_config": settings}},
            }]}},
        },
    }


def bootstrap(listen, admin, origin, rls_port):
    ingress = hcm("ingress", {"virtual_hosts": [{
        "name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
    }]}, [rlqs_filter("tenantgate_rls", DOMAIN)])
    answer = hcm("origin", {"virtual_hosts": [{
        "name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}],
    }]}, [])

    def cluster(name, port, http2=False):
        c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
             "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                 "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
        if http2:
            c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
        return c

    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [listener("ingress", listen, ingress), listener("origin", origin, answer)],
            "clusters": [cluster("upstream", origin), cluster("tenantgate_rls", rls_port, http2=True)],
        },
    }


def write_tree(dest):
    """The bundle's source: the `rps` tree and the `assigned` settings."""
    t = Path(dest) / "tenants"
    for path, limits in [
        ("", {"rps": {"rate": 40, "scope": "fleet"}}),
        ("a", {"rps": {"rate": 30, "ceil": 40, "burst": 10, "scope": "fleet"}}),
        ("b", {"rps": {"rate": 10, "ceil": 40, "burst": 5, "scope": "fleet"}}),
    ]:
        (t / path).mkdir(parents=True, exist_ok=True)
        (t / path / "tenant.json").write_text(json.dumps({"limits": limits}) + "\n")
    (Path(dest) / "tenantgate.json").write_text(json.dumps({"rate_limit_service": {
        "mode": "assigned", "domain": DOMAIN, "report_interval_ms": 500}}) + "\n")


class Flood:
    """Threads sending GETs for some tenants as fast as they can, recording
    (time, tenant, status)."""

    def __init__(self, port):
        self.port, self.rows, self.lock = port, [], threading.Lock()
        self.tenants, self.stop, self.threads = [], threading.Event(), []

    def add(self, tenant, threads=3):
        for _ in range(threads):
            t = threading.Thread(target=self.run, args=(tenant,), daemon=True)
            self.threads.append(t)
            t.start()

    def run(self, tenant):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            try:
                r = h.request(self.port, "GET", "/items", {"x-tenant": tenant}, conn=conn)
                status = r.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                status = "error"
            with self.lock:
                self.rows.append((time.monotonic(), tenant, status))
        conn.close()

    def count(self, start, end):
        with self.lock:
            return Counter((t, s) for at, t, s in self.rows if start <= at < end)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()


class NativeRlqsClient(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = WORK / "native"
        src = cls.work / "src"
        write_tree(src)
        cls.bundle = cls.work / "bundle.json"
        h.make_bundle(src, cls.bundle)
        cls.redis = Redis(cls.work).start()
        rls_port, listen, admin, origin = h.free_port(), h.free_port(), h.free_port(), h.free_port()
        cls.rls = Rls(cls.bundle, cls.redis.url, cls.work, rls_port).start()
        cls.envoy = h.Envoy(json.dumps(bootstrap(listen, admin, origin, rls_port), indent=2), cls.work,
                            name="envoy", concurrency=2, admin_port=admin, listen_port=listen)
        try:
            cls.envoy.start()
        except Exception:
            cls.rls.stop()
            cls.redis.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.envoy.stop()
        cls.rls.stop()
        cls.redis.stop()

    def measure(self, flood):
        time.sleep(SETTLE_S)
        start = time.monotonic()
        time.sleep(MEASURE_S)
        return flood.count(start, time.monotonic())

    def test_assignments_are_enforced(self):
        flood = Flood(self.envoy.listen_port)
        try:
            flood.add("/a")
            alone = self.measure(flood)
            flood.add("/b")
            both = self.measure(flood)
        finally:
            flood.close()
        errors = [r for r in flood.rows if r[2] not in (200, 429)]
        self.assertEqual(errors[:5], [], "only 200 or 429")
        # The flood far exceeds the limits: refusals in both phases.
        self.assertGreater(alone[("/a", 429)], 0, alone)
        self.assertGreater(both[("/b", 429)], 0, both)
        # `/a` alone borrows up to its ceil: 40/s x 4 s.
        self.assertTrue(150 <= alone[("/a", 200)] <= 176, f"/a alone admitted {alone[('/a', 200)]}, want 160")
        # Both flooding: each its rate, 30/s and 10/s.
        self.assertTrue(112 <= both[("/a", 200)] <= 136, f"/a admitted {both[('/a', 200)]}, want 120")
        self.assertTrue(35 <= both[("/b", 200)] <= 49, f"/b admitted {both[('/b', 200)]}, want 40")
        # Each field is `tenant\nlimit\nclient`: redis-cli prints it over lines.
        lines = self.redis.cli("hkeys", f"tenantgate:rlqs:v1:{{{DOMAIN}}}:reports").split("\n")
        self.assertIn("/a", lines)
        self.assertIn("/b", lines)
        self.assertIn("rps", lines)
        print(f"rlqs: /a alone {alone[('/a', 200)]} of 160; both: /a {both[('/a', 200)]} of 120, "
              f"/b {both[('/b', 200)]} of 40 (admitted in {MEASURE_S:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(h.run_tests(sys.modules[__name__], "rlqs", WORK))
