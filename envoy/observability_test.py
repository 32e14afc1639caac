#!/usr/bin/env python3
"""The shipped observability files against a real Envoy and a real Prometheus.

Envoy runs a bootstrap rendered by `tenantgate envoy` from the example tree
(`policies/`). Traffic drives /globex/labs (5 requests/s, burst 5) near and
over its limit, with a few requests to other tenants and a 403 and a 400.
Prometheus (Debian's `prometheus`, on a free loopback port, its own temporary
storage, a 1 s scrape and evaluation interval) scrapes Envoy's
/stats/prometheus with envoy/observability/prometheus.yml and evaluates
envoy/observability/tenantgate.rules.yml, whose `for:` durations are
shortened from minutes to seconds here (the same expressions; the durations
themselves are covered by `promtool test rules`). Then:

- `/stats/prometheus` has the per-tenant series with a `tenant` label;
- the near-limit alert fires for /globex/labs;
- every query of envoy/observability/grafana-dashboard.json, with its
  variables substituted as Grafana would, returns data from Prometheus's
  HTTP API (instant, and over a range for time series panels).

Standard library only; bounded: about 40 s. Last line:
`observability: N passed, M failed`.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import unittest
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402

OBS = h.ENVOY_DIR / "observability"
WORK = Path(os.environ.get("TENANTGATE_TEST_WORK") or h.tempdir("tenantgate-observability-"))
SCRAPE_S = 1
# Grafana's values for a 1 s scrape interval and a 2 s `$__interval`:
# `$__rate_interval` = max($__interval + scrape interval, 4 x scrape interval).
INTERVAL = "2s"
RATE_INTERVAL = f"{max(2 + SCRAPE_S, 4 * SCRAPE_S)}s"
# The tenant the dashboard is looked at with: /globex, whose child
# /globex/labs is driven over its limit.
TENANT = "/globex"
LABS = {"x-tenant": "/globex/labs", "x-user": "lena", "x-user-tenant": "/globex/labs"}


def prometheus_bin():
    return os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus") or "/usr/bin/prometheus"


def grafana_substitute(expr, tenant):
    """The dashboard's variables as Grafana substitutes them."""
    for name, value in (("__rate_interval", RATE_INTERVAL), ("__interval", INTERVAL), ("tenant", tenant)):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def dashboard_queries():
    """(panel title, target, expr) of every query of the dashboard."""
    dash = json.loads((OBS / "grafana-dashboard.json").read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t, t["expr"]))
    return out


class Prometheus:
    def __init__(self, workdir, envoy_admin_port):
        self.dir = Path(workdir) / "prometheus"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = h.free_port()
        self.proc = None
        config = (OBS / "prometheus.yml").read_text()
        for old, new in (("scrape_interval: 15s", f"scrape_interval: {SCRAPE_S}s"),
                         ("evaluation_interval: 15s", f"evaluation_interval: {SCRAPE_S}s"),
                         ('targets: ["127.0.0.1:9901"]', f'targets: ["127.0.0.1:{envoy_admin_port}"]')):
            assert old in config, f"prometheus.yml no longer has {old!r}"
            config = config.replace(old, new)
        (self.dir / "prometheus.yml").write_text(config)
        rules = (OBS / "tenantgate.rules.yml").read_text()
        rules, n = re.subn(r"(?m)^(\s+for: )(\d+)m$", r"\g<1>\2s", rules)
        assert n >= 1, "no `for:` in the rules"
        (self.dir / "tenantgate.rules.yml").write_text(rules)

    def start(self, timeout=30):
        cmd = [prometheus_bin(), f"--config.file={self.dir / 'prometheus.yml'}",
               f"--storage.tsdb.path={self.dir / 'data'}",
               f"--web.listen-address=127.0.0.1:{self.port}"]
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        ok = h.wait_for(lambda: self._ready(), timeout=timeout, interval=0.2)
        if not ok:
            self.stop()
            raise RuntimeError(f"prometheus not ready; log in {self.dir / 'prometheus.log'}")
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}; log in {self.dir}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self):
        h._stop(self.proc)
        if getattr(self, "log", None):
            self.log.close()

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def query_range(self, expr, seconds=30, step=1):
        end = time.time()
        return self.api("query_range", query=expr, start=end - seconds, end=end, step=step)["result"]

    def firing(self, alertname):
        return [a for a in self.api("alerts")["alerts"]
                if a["labels"].get("alertname") == alertname and a["state"] == "firing"]


class Traffic(threading.Thread):
    """10 requests/s to /globex/labs (5/s allowed), a few others, until stopped."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.stopped = threading.Event()
        self.statuses = {}

    def send(self, headers, path="/experiments"):
        try:
            status = h.request(self.port, "GET", path, headers, timeout=2).status
        except OSError:
            status = "error"
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def run(self):
        i = 0
        while not self.stopped.is_set():
            self.send(LABS)
            if i % 5 == 0:
                self.send({"x-tenant": "/globex", "x-user": "gus", "x-user-tenant": "/globex"}, "/x")
                self.send({"x-tenant": "/acme/eu", "x-user": "alice", "x-user-tenant": "/acme/eu"}, "/orders/1")
                self.send({"x-tenant": "/acme/eu", "x-user": "carol", "x-user-tenant": "/acme"}, "/orders/1")  # 403
                self.send({"x-tenant": "/globex/labs", "x-user": "lena", "x-user-tenant": "/globex/labs"},
                          "/a%2Fb")  # 400
            i += 1
            self.stopped.wait(0.1)

    def stop(self):
        self.stopped.set()
        self.join(timeout=5)


class Observability(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = WORK
        cls.upstream = h.Upstream().start()
        listen, admin = h.free_port(), h.free_port()
        out = cls.work / "envoy.json"
        cmd = h.cli_command() + ["envoy", str(h.POLICIES), *h.module_args(),
                                 "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
                                 "--upstream", f"127.0.0.1:{cls.upstream.port}", "-o", str(out)]
        proc = subprocess.run(cmd, cwd=h.REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            cls.upstream.stop()
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr}")
        cls.envoy = h.Envoy(out.read_text(), cls.work, name="envoy", concurrency=2,
                            admin_port=admin, listen_port=listen)
        cls.prometheus = None
        cls.traffic = None
        try:
            cls.envoy.start()
            cls.prometheus = Prometheus(cls.work, admin).start()
            cls.traffic = Traffic(listen)
            cls.traffic.start()
            # Until the near-limit alert fires (it needs two scrapes for its
            # rates and 5 s pending) and histograms reached the admin output
            # (Envoy's stats flush, every 5 s).
            cls.alert = h.wait_for(lambda: cls.prometheus.firing("TenantgateTenantNearLimit"),
                                   timeout=60, interval=1)
            h.wait_for(lambda: cls.prometheus.query("tenantgate_decision_us_count > 0"), timeout=20, interval=1)
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        if cls.traffic:
            cls.traffic.stop()
        if cls.prometheus:
            cls.prometheus.stop()
        cls.envoy.stop()
        cls.upstream.stop()

    def test_traffic_was_admitted_and_refused(self):
        s = self.traffic.statuses
        self.assertGreater(s.get(200, 0), 0, s)
        self.assertGreater(s.get(429, 0), 0, s)
        self.assertGreater(s.get(403, 0), 0, s)
        self.assertGreater(s.get(400, 0), 0, s)

    def test_stats_prometheus_has_tenant_labels(self):
        prom = self.envoy.prometheus()
        # The native build's names carry Envoy's prefix here; Prometheus
        # renames them (envoy/observability/prometheus.yml).
        p = h.prometheus_prefix()
        line = re.search(rf'(?m)^{p}tenantgate_tenant_allowed\{{tenant="/acme/eu",parent="/acme"\}} (\d+)$', prom)
        self.assertIsNotNone(line, [ln for ln in prom.splitlines() if "/acme/eu" in ln][:10])
        self.assertGreater(int(line.group(1)), 0)
        print(f"\nobservability: {line.group(0)}", file=sys.stderr)
        self.assertRegex(prom, rf'(?m)^{p}tenantgate_limit_refused\{{tenant="/globex/labs",parent="/globex",limit="rps"\}} [1-9]')
        self.assertRegex(prom, rf'(?m)^{p}tenantgate_limit_rate\{{tenant="/globex/labs",parent="/globex",limit="rps"\}} 5$')
        self.assertRegex(prom, rf'(?m)^{p}tenantgate_tenant_refused\{{tenant="/acme/eu",parent="/acme",reason="policy"\}} [1-9]')
        self.assertRegex(prom, rf'(?m)^{p}tenantgate_allowed(\{{\}})? [1-9]')

    def test_near_limit_alert_fires_for_the_driven_tenant(self):
        self.assertTrue(self.alert, "TenantgateTenantNearLimit never fired")
        self.assertEqual({(a["labels"]["tenant"], a["labels"]["limit"]) for a in self.alert},
                         {("/globex/labs", "rps")})

    def test_the_tenant_variable_lists_the_bundle_tenants(self):
        dash = json.loads((OBS / "grafana-dashboard.json").read_text())
        var = next(v for v in dash["templating"]["list"] if v["name"] == "tenant")
        m = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"]["query"])
        self.assertIsNotNone(m, var)
        values = self.prometheus.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1)})
        for t in ("/", "/globex", "/globex/labs", "/acme/eu"):
            self.assertIn(t, values)

    def test_every_dashboard_query_returns_data(self):
        queries = dashboard_queries()
        self.assertGreaterEqual(len(queries), 20)
        for title, target, expr in queries:
            q = grafana_substitute(expr, TENANT)
            with self.subTest(panel=title, expr=q):
                self.assertTrue(self.prometheus.query(q), f"no data for {q}")
                if not target.get("instant"):
                    self.assertTrue(self.prometheus.query_range(q), f"no data over a range for {q}")

    def test_lineage_panels_show_the_children(self):
        children = [e for t, _, e in dashboard_queries()
                    if t == "Requests to the children of $tenant" and "refused" in e]
        self.assertEqual(len(children), 1)
        result = self.prometheus.query(grafana_substitute(children[0], TENANT))
        by_tenant = {r["metric"]["tenant"]: float(r["value"][1]) for r in result}
        self.assertGreater(by_tenant.get("/globex/labs", 0), 0, by_tenant)
        self.assertNotIn("/globex", by_tenant)

    def test_usage_against_rate(self):
        usage = [e for t, _, e in dashboard_queries() if t == "Usage against rate and ceil: $tenant"]
        rate = self.prometheus.query(grafana_substitute(usage[1], "/globex/labs"))
        self.assertEqual([(r["metric"]["limit"], r["value"][1]) for r in rate], [("rps", "5")])
        used = self.prometheus.query(grafana_substitute(usage[0], "/globex/labs"))
        # 10 requests/s offered, at most 5 tokens/s (plus the burst) admitted.
        self.assertTrue(0 < float(used[0]["value"][1]) <= 7, used)


if __name__ == "__main__":
    if not Path(prometheus_bin()).exists():
        print(f"observability: {prometheus_bin()} is missing: apt-get install prometheus", file=sys.stderr)
        sys.exit(2)
    sys.exit(h.run_tests(sys.modules[__name__], "observability", WORK))
