#!/usr/bin/env python3
"""Mode `assigned` across three real Envoys: the filter as an RLQS client of
`tenantgate-rls`, a real Redis, hierarchical quotas for the whole fleet.

The bundle is testdata/fleet-assigned/ (the tree and settings) and the
traffic its plan.json (the plan `tenantgate simulate` reads): `/` has 60/s
(600 per 10 s) for the fleet; `/a` rate 40/s, ceil 60/s; `/b` rate 20/s, ceil
60/s; reports every 500 ms, `on_error: "allow"`. Three Envoys x 2 workers
each, one stream per worker VM. Requests are paced (open loop: a refusal does
not slow the sender), each flow spread over the Envoys as the plan says
(70/20/10, shifted mid-run):

- each tenant's fleet-wide admissions in each measured span of the plan are
  within 5% of the HTB answer the plan states (`expect`): `/a` alone borrows
  up to its ceil (60/s); with `/b` flooding too, each its rate (40/s and
  20/s), before and after the spread shifts; and within 5% of what
  `tenantgate simulate` predicts for the same plan and tree (its `expect`
  spans, the same allocator and client code on a virtual clock);
- `tenantgate-rls` killed: once the assignments run out (3 intervals), every
  request is admitted (`on_error: "allow"`), the streams' failures and
  reopenings are counted; restarted: every Envoy holds assignments again
  within 3 intervals of its return (plus the test's polling), and the
  admissions are back to the HTB answer;
- Redis stopped: the service answers no report (the streams stay open), the
  assignments run out and every request is admitted; Redis restarted: every
  Envoy holds assignments again once the service's health check sees it
  (every 2 s) and the next reports come, and the admissions are back to the
  HTB answer;
- a reload that changes the tree (one Envoy, its bundle by ECDS, the service
  reloaded by SIGHUP): `/a`'s ceil lowered from 60/s to 45/s, every request
  answered 200 or 429 across the reload, and `/a` admitted within 5% of
  45/s once both have the new tree.

    python3 envoy/fleet_assigned_test.py [-v]

About 100 s; at most 180 requests per second on loopback. Needs `redis-server`
(scripts/install-redis.sh), `tenantgate` and `tenantgate-rls` (`cargo build
-p tenantgate-cli -p tenantgate-rls`), dist/tenantgate.wasm and Envoy
(scripts/install-envoy.sh). `TENANTGATE_BUILD=native` runs it against the
native build (one RLQS client per Envoy process instead of per worker).
"""

import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unittest
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
from fleet_test import Redis, Rls, render  # noqa: E402

WORK = h.tempdir("tenantgate-assigned-")
TREE = h.REPO / "testdata" / "fleet-assigned"
PLAN = json.loads((TREE / "plan.json").read_text())
INTERVAL_S = PLAN["report_interval_ms"] / 1000
TOLERANCE = 0.05
# The outage test's length, in seconds.
END_S = 20


def simulate():
    """`tenantgate simulate`'s `expect` spans for the plan: its admitted
    requests per second per tenant in each span."""
    out = subprocess.run(h.cli_command() + ["simulate", str(TREE), "--traffic", str(TREE / "plan.json")],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["expect"]


class Load:
    """Paced senders, one thread per flow and instance, recording
    (time since start, tenant, instance, status)."""

    def __init__(self, envoys, flows, start):
        self.envoys, self.start = envoys, start
        self.rows, self.lock, self.stop = [], threading.Lock(), threading.Event()
        self.threads = []
        for flow in flows:
            for i, part in enumerate(flow.get("spread", [100 / len(envoys)] * len(envoys))):
                rate = flow["rps"] * part / 100
                if rate > 0:
                    t = threading.Thread(target=self.run, args=(flow, i, rate), daemon=True)
                    self.threads.append(t)
        for t in self.threads:
            t.start()

    def run(self, flow, i, rate):
        port = self.envoys[i].listen_port
        headers = {"x-tenant": flow["tenant"], "x-user": flow.get("principal", "u")}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        n, begin, end = 0, self.start + flow.get("from_s", 0), self.start + flow["to_s"]
        while not self.stop.is_set():
            at = begin + n / rate
            if at >= end:
                break
            delay = at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            n += 1
            try:
                status = h.request(port, "GET", "/items", headers, conn=conn).status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                status = "error"
            with self.lock:
                self.rows.append((time.monotonic() - self.start, flow["tenant"], i, status))
        conn.close()

    def join(self):
        for t in self.threads:
            t.join()

    def close(self):
        self.stop.set()
        self.join()

    def count(self, from_s, to_s):
        """(tenant, status) -> requests sent in [from_s, to_s)."""
        with self.lock:
            return Counter((t, s) for at, t, _, s in self.rows if from_s <= at < to_s)


def origin(workdir):
    """An Envoy answering every request with 200 itself: an upstream fast
    enough for the paced senders (the Python echo upstream is not, at 150
    requests per second on a shared machine)."""
    port, admin = h.free_port(), h.free_port()
    route = {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
        "match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]}
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "origin", "route_config": route,
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{
            "name": "origin", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [hcm]}]}]},
    }
    return h.Envoy(json.dumps(config), workdir, name="origin", concurrency=1, admin_port=admin,
                   listen_port=port)


class Assigned(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = WORK / "fleet"
        cls.bundle = cls.work / "bundle.json"
        cls.work.mkdir(parents=True)
        h.make_bundle(TREE, cls.bundle)
        cls.redis = Redis(cls.work).start()
        cls.upstream = origin(cls.work).start()
        cls.rls_port = h.free_port()
        cls.rls = Rls(cls.bundle, cls.redis.url, cls.work, cls.rls_port).start()
        cls.envoys = []
        try:
            for i in range(PLAN["instances"]):
                cls.envoys.append(render(cls.bundle, cls.work, f"envoy{i}", cls.upstream.listen_port,
                                         cls.rls_port, concurrency=2).start())
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for e in cls.envoys:
            e.stop()
        cls.rls.stop()
        cls.upstream.stop()
        cls.redis.stop()

    def counters(self, name):
        """A filter counter per Envoy."""
        return [e.counter(f"{h.stat_namespace()}.{name}") or 0 for e in self.envoys]

    def assert_htb(self, counts, span, expect, what):
        """Each tenant's admissions over `span` seconds within 5% of `expect` per second."""
        for tenant, rps in expect.items():
            want, got = rps * span, counts[(tenant, 200)]
            print(f"  {what}: {tenant} admitted {got} in {span:.0f} s, want {want:.0f}",
                  file=sys.stderr)
            self.assertLessEqual(abs(got - want), TOLERANCE * max(want, 20),
                                 f"{what}: {tenant} admitted {got}, want {want:.0f} +-5%")

    def test_1_the_plan_fleet_wide(self):
        load = Load(self.envoys, PLAN["flows"], time.monotonic())
        load.join()
        rows = load.rows
        self.assertEqual([r for r in rows if r[3] not in (200, 429)][:5], [], "only 200 or 429")
        predicted = simulate()
        self.assertEqual(len(predicted), len(PLAN["expect"]), predicted)
        for e, p in zip(PLAN["expect"], predicted):
            counts = load.count(e["from_s"], e["to_s"])
            span = e["to_s"] - e["from_s"]
            self.assert_htb(counts, span, e["admitted_rps"], f"{e['from_s']}-{e['to_s']} s")
            self.assert_htb(counts, span, p["admitted_rps"], f"{e['from_s']}-{e['to_s']} s (simulate)")
        # Refused with the fleet limit's RateLimit fields, as local refusals are.
        r = self.envoys[0].request("GET", "/items", {"x-tenant": "/a", "x-user": "ann"})
        for _ in range(600):
            if r.status == 429:
                break
            r = self.envoys[0].request("GET", "/items", {"x-tenant": "/a", "x-user": "ann"})
        self.assertEqual(r.status, 429, r)
        self.assertEqual(r.json()["limit"], "rps", r)
        # The first bucket of the chain without a token: `/a`'s (rate 400 per
        # 10 s) or the root's (600), whichever this worker ran out of.
        self.assertIn(r.headers.get("ratelimit-policy"), ('"rps";q=400;w=10', '"rps";q=600;w=10'), r)
        self.assertRegex(r.headers.get("ratelimit", ""), r'^"rps";r=0;t=\d+$', r)
        self.assertGreaterEqual(int(r.headers.get("retry-after", "0")), 1, r)
        # One stream per worker VM that had traffic (no failure so far), and
        # reports and assignments on every Envoy.
        opens = self.counters("tenantgate.fleet_stream_opens")
        self.assertTrue(all(1 <= n <= 2 for n in opens), opens)
        self.assertEqual(self.counters("tenantgate.fleet_errors"), [0, 0, 0],
                         "\n".join(e.log_tail(5) for e in self.envoys))
        assignments, calls = self.counters("tenantgate.fleet_assignments"), self.counters("tenantgate.fleet_calls")
        self.assertTrue(all(n > 0 for n in assignments + calls), (assignments, calls))

    def test_2_the_service_killed_then_back(self):
        last = [f for f in PLAN["flows"] if f["to_s"] == PLAN["duration_s"]]
        flows = [dict(f, from_s=0, to_s=END_S) for f in last]
        expect = PLAN["expect"][-1]["admitted_rps"]
        opens, errors = self.counters("tenantgate.fleet_stream_opens"), self.counters("tenantgate.fleet_errors")
        start = time.monotonic()
        load = Load(self.envoys, flows, start)
        try:
            time.sleep(3)
            self.rls.proc.kill()
            self.rls.proc.wait()
            down = time.monotonic() - start
            # The assignments run out after 3 intervals: then on_error allows all.
            time.sleep(3 * INTERVAL_S + 1.5)
            free_from = time.monotonic() - start
            time.sleep(3)
            free_to = time.monotonic() - start
            assigned = self.counters("tenantgate.fleet_assignments")
            self.rls = type(self).rls = Rls(self.bundle, self.redis.url, self.work, self.rls_port).start()
            back = time.monotonic()

            def all_assigned():
                return all(n > m for n, m in zip(self.counters("tenantgate.fleet_assignments"), assigned))

            self.assertTrue(h.wait_for(all_assigned, 5, interval=0.05), "no assignment after the return")
            took = time.monotonic() - back
            print(f"  killed at {down:.1f} s; every Envoy assigned again {took:.2f} s after the return",
                  file=sys.stderr)
            # Within 3 intervals of the return (and 0.25 s of polling).
            self.assertLess(took, 3 * INTERVAL_S + 0.25)
            back_s = back - start
            load.join()
        finally:
            load.close()
        free = load.count(free_from, free_to)
        self.assertEqual(free[("/a", 429)] + free[("/b", 429)], 0, free)
        self.assertGreater(free[("/a", 200)], 0, free)
        # Streams failed and reopened while it was away.
        self.assertTrue(all(n > m for n, m in zip(self.counters("tenantgate.fleet_errors"), errors)))
        self.assertTrue(all(n > m for n, m in zip(self.counters("tenantgate.fleet_stream_opens"), opens)))
        # Back to the HTB answer once the demand is reported again.
        self.assert_htb(load.count(back_s + 3, END_S), END_S - back_s - 3, expect, "after the return")

    def test_3_redis_stopped_then_back(self):
        last = [f for f in PLAN["flows"] if f["to_s"] == PLAN["duration_s"]]
        flows = [dict(f, from_s=0, to_s=END_S) for f in last]
        expect = PLAN["expect"][-1]["admitted_rps"]
        errors = self.counters("tenantgate.fleet_errors")
        start = time.monotonic()
        load = Load(self.envoys, flows, start)
        try:
            time.sleep(3)
            self.redis.stop()
            # The service keeps its streams open but cannot store or read
            # reports, so it answers none: the assignments run out after 3
            # intervals and on_error ("allow") admits every request.
            time.sleep(3 * INTERVAL_S + 1.5)
            free_from = time.monotonic() - start
            time.sleep(3)
            free_to = time.monotonic() - start
            assigned = self.counters("tenantgate.fleet_assignments")
            self.redis.start()
            back = time.monotonic()

            def all_assigned():
                return all(n > m for n, m in zip(self.counters("tenantgate.fleet_assignments"), assigned))

            self.assertTrue(h.wait_for(all_assigned, 8, interval=0.05),
                            "no assignment after Redis came back:\n" + self.rls.log_path.read_text()[-2000:])
            took = time.monotonic() - back
            print(f"  Redis back: every Envoy assigned again {took:.2f} s later", file=sys.stderr)
            # The service's Redis connection comes back with its next command
            # (or its 2 s health check); then each client's next report is
            # answered (measured: 0.06-0.11 s).
            self.assertLess(took, 2 + 3 * INTERVAL_S + 0.25)
            back_s = back - start
            load.join()
        finally:
            load.close()
            if self.redis.proc.poll() is not None:
                self.redis.start()
        free = load.count(free_from, free_to)
        self.assertEqual(free[("/a", 429)] + free[("/b", 429)], 0, free)
        self.assertGreater(free[("/a", 200)], 0, free)
        # The streams stayed open: no failure counted, and the service said
        # it lost Redis and got it back.
        self.assertEqual(self.counters("tenantgate.fleet_errors"), errors)
        log = self.rls.log_path.read_text()
        self.assertIn("lost Redis at", log)
        self.assertIn("is back", log)
        # Back to the HTB answer once the demand is reported again (the
        # reports of before the outage went with Redis: it keeps nothing).
        self.assert_htb(load.count(back_s + 3, END_S), END_S - back_s - 3, expect, "after Redis's return")


RLS_CLUSTER = """
  - name: tenantgate_rls
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: tenantgate_rls
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: %d }
"""


class Reload(unittest.TestCase):
    """One Envoy (2 workers) whose bundle comes by ECDS; `/a` alone."""

    def test_a_reload_that_changes_the_tree(self):
        work = WORK / "reload"
        src = work / "tree"
        shutil.copytree(TREE, src)
        bundle = work / "bundle.json"
        text1 = h.make_bundle(src, bundle)
        wasm = work / "tenantgate.wasm"
        shutil.copy(h.wasm_path(), wasm)
        ecds = work / "ecds.json"
        h.write_ecds(ecds, text1, "v1", wasm=wasm)
        redis = Redis(work).start()
        upstream = origin(work).start()
        rls_port = h.free_port()
        rls = Rls(bundle, redis.url, work, rls_port).start()
        listen, admin = h.free_port(), h.free_port()
        config = h.render(h.ENVOY_DIR / "envoy-ecds.yaml", {
            "LISTEN_PORT": listen, "ADMIN_PORT": admin, "UPSTREAM_PORT": upstream.listen_port,
            "ECDS_PATH": str(ecds)}) + RLS_CLUSTER % rls_port
        envoy = h.Envoy(config, work, name="envoy", concurrency=2, admin_port=admin, listen_port=listen)
        try:
            envoy.start()
            flows = [{"tenant": "/a", "rps": 100, "from_s": 0, "to_s": 16, "principal": "ann"}]
            start = time.monotonic()
            load = Load([envoy], flows, start)
            time.sleep(5)
            # `/a`'s ceil from 600 to 450 per 10 s: the service first, then the filter.
            a = src / "tenants" / "a" / "tenant.json"
            a.write_text(a.read_text().replace('"ceil": 600', '"ceil": 450'))
            text2 = h.make_bundle(src, bundle)
            version = json.loads(text2)["version"]
            rls.proc.send_signal(signal.SIGHUP)
            h.write_ecds(ecds, text2, "v2", wasm=wasm)
            # The main thread and both workers (the native build: the main
            # thread, whose engine the workers share).
            want = 1 if h.build() == "native" else 3
            loaded = h.wait_for(lambda: len(re.findall(f"loaded bundle {version}", envoy.log())) >= want, 10)
            self.assertTrue(loaded, envoy.log_tail())
            reloaded = time.monotonic() - start
            load.join()
            before, after = load.count(2, 5), load.count(reloaded + 3, 16)
            statuses = Counter(r[3] for r in load.rows)
            self.assertEqual(set(statuses) - {200, 429}, set(), statuses)
            print(f"  reload at {reloaded:.1f} s: /a admitted {before[('/a', 200)]} in 3 s before "
                  f"(HTB answer 180), {after[('/a', 200)]} in {16 - reloaded - 3:.1f} s after "
                  f"(HTB answer {45 * (16 - reloaded - 3):.0f})", file=sys.stderr)
            self.assertLessEqual(abs(before[("/a", 200)] - 180), 9, before)
            want = 45 * (16 - reloaded - 3)
            self.assertLessEqual(abs(after[("/a", 200)] - want), TOLERANCE * want, after)
        finally:
            envoy.stop()
            rls.stop()
            upstream.stop()
            redis.stop()


if __name__ == "__main__":
    sys.exit(h.run_tests(sys.modules[__name__], "fleet-assigned", WORK))
