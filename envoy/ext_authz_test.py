#!/usr/bin/env python3
"""`tenantgate serve` behind Envoy's ext_authz filter, against the Wasm filter.

Two Envoys rendered by `tenantgate envoy` in front of one echo upstream: one
loads the filter (`--wasm`), the other asks a spawned `tenantgate serve` over
gRPC (`--ext-authz`). One table, both paths: every policy test of
`policies/tests/*.json` that a live proxy can send (no `context` override:
the proxy supplies its own time and address; no 429, the service has no
quotas) must get its expected status from both, the same policy ids and the
same reply body (ids aside), and, when allowed, the upstream must see the
identity headers and no forged `x-tenantgate-*` header. Then SIGHUP reloads
with last-known-good, and SIGTERM stops the service.

    python3 envoy/ext_authz_test.py [-v]

Standard library only; every request on a fresh connection, byte for byte.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
import unittest
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
from isolation_test import answered_by, raw_request  # noqa: E402

WORK = h.tempdir("tenantgate-ext-authz-")
SETTINGS = json.loads((h.POLICIES / "tenantgate.json").read_text())


class Serve:
    """A spawned `tenantgate serve` (HTTP and gRPC on free loopback ports)."""

    def __init__(self, source, workdir, name="serve"):
        self.source = source
        self.http, self.grpc = h.free_port(), h.free_port()
        self.log_path = Path(workdir) / f"{name}.log"
        self.proc = None

    def start(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = h.cli_command() + ["serve", str(self.source), "--http", f"127.0.0.1:{self.http}",
                                 "--grpc", f"127.0.0.1:{self.grpc}"]
        with open(self.log_path, "wb") as log:
            # Audit lines (standard output) are not needed here.
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=h.REPO)
        h.wait_port(self.http, 30, self.proc, "tenantgate serve")
        h.wait_port(self.grpc, 30, self.proc, "tenantgate serve")
        return self

    def stop(self):
        h._stop(self.proc)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=5) as r:
            return json.loads(r.read())


def render(bundle_dir, workdir, name, upstream_port, *flags):
    listen, admin = h.free_port(), h.free_port()
    out = Path(workdir) / f"{name}.json"
    cmd = h.cli_command() + ["envoy", str(bundle_dir), "--listen", f"127.0.0.1:{listen}",
                             "--admin", f"127.0.0.1:{admin}", "--upstream", f"127.0.0.1:{upstream_port}",
                             "-o", str(out), *flags]
    proc = subprocess.run(cmd, cwd=h.REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr}")
    return h.Envoy(out.read_text(), workdir, name=name, concurrency=1, admin_port=admin, listen_port=listen)


def header_of(setting):
    return setting["header"] if isinstance(setting, dict) and "header" in setting else None


def policy_cases():
    """(name, method, path, header pairs, expect) of every policy test a proxy can send."""
    cases = []
    for f in sorted((h.POLICIES / "tests").glob("*.json")):
        for t in json.loads(f.read_text())["tests"]:
            r, expect = t["request"], t["expect"]
            if "context" in r or "status" not in expect or expect["status"] == 429:
                continue
            if any(k in r for k in ("claims", "metadata", "source_address")):
                continue
            headers = []
            for field in ("tenant", "principal", "principal_tenant"):
                if r.get(field) is not None:
                    headers.append((header_of(SETTINGS[field]), r[field]))
            extra = r.get("headers") or []
            headers += list(extra.items()) if isinstance(extra, dict) else [tuple(p) for p in extra]
            cases.append((f"{f.stem}: {t['name']}", r["method"], r["path"], headers, expect, r))
    return cases


def identity(spec, headers):
    """The x-tenantgate-* headers the upstream must see for an allowed case (as
    the echo upstream shows them: header bytes read as Latin-1)."""
    sent = dict(headers)
    tenant = (spec.get("tenant") or sent.get("x-tenant")).strip(" \t")
    want = {"x-tenantgate-tenant": tenant}
    principal = spec.get("principal") or sent.get("x-user")
    if principal:
        want["x-tenantgate-principal"] = principal
    return {k: v.encode().decode("latin-1") for k, v in want.items()}


def without_ids(doc):
    return {k: v for k, v in doc.items() if k not in ("request_id", "decision_id")}


FORGED = [("x-tenantgate-tenant", "/globex"), ("x-tenantgate-principal", "root"), ("X-TenantGate-Extra", "1")]


class BothPaths(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        work = WORK / "both"
        cls.upstream = h.Upstream().start()
        cls.serve = Serve(h.POLICIES, work).start()
        cls.filter = render(h.POLICIES, work, "filter", cls.upstream.port, "--wasm", str(h.wasm_path().resolve()))
        cls.authz = render(h.POLICIES, work, "authz", cls.upstream.port, "--ext-authz", f"127.0.0.1:{cls.serve.grpc}")
        try:
            cls.filter.start()
            cls.authz.start()
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for p in (cls.filter, cls.authz, cls.serve, cls.upstream):
            p.stop()

    def test_the_rendered_config_has_no_wasm_filter(self):
        text = self.authz.config_path.read_text()
        self.assertIn("envoy.filters.http.ext_authz", text)
        self.assertNotIn("envoy.filters.http.wasm", text)

    def test_policy_cases_get_the_filters_statuses(self):
        cases = policy_cases()
        self.assertGreaterEqual(len(cases), 40)
        for name, method, path, headers, expect, spec in cases:
            with self.subTest(name):
                got = {}
                for label, envoy in (("filter", self.filter), ("ext_authz", self.authz)):
                    resp = raw_request(envoy.listen_port, method, path, headers)
                    got[label] = resp
                    self.assertEqual(resp.status, expect["status"], f"{label}: {resp}")
                    if expect["status"] != 200 or method == "HEAD":
                        continue
                    self.assertEqual(answered_by(resp), "upstream", f"{label}: {resp}")
                    seen = resp.json()["headers"]
                    own = {k: v for k, v in seen.items() if k.replace("_", "-").startswith("x-tenantgate-")}
                    self.assertEqual(own, identity(spec, headers), label)
                if expect["status"] != 200:
                    f, a = got["filter"], got["ext_authz"]
                    # Who answered (tenantgate, or Envoy's codec for a request
                    # it refuses itself), and the same reply, ids aside.
                    self.assertEqual(answered_by(f), answered_by(a))
                    if answered_by(f) == "tenantgate":
                        self.assertEqual(without_ids(f.json()), without_ids(a.json()))
                        if "reasons" in expect and expect["status"] == 403:
                            self.assertEqual(sorted(a.json()["reasons"]), sorted(expect["reasons"]))
                    else:
                        self.assertEqual(f.body, a.body)
        print(f"\n  ext_authz: {len(cases)} policy cases, both paths", file=sys.stderr)

    def test_forged_headers_never_reach_the_upstream(self):
        alice = [("x-tenant", "/acme/eu"), ("x-user", "alice"), ("x-user-tenant", "/acme/eu")]
        anon = [("x-tenant", "/public")]
        for label, envoy in (("filter", self.filter), ("ext_authz", self.authz)):
            with self.subTest(label):
                resp = raw_request(envoy.listen_port, "GET", "/orders/./1?x=1", alice + FORGED)
                doc = resp.json()
                own = {k: v for k, v in doc["headers"].items() if k.startswith("x-tenantgate-")}
                self.assertEqual(own, {"x-tenantgate-tenant": "/acme/eu", "x-tenantgate-principal": "alice"})
                # The upstream sees the path that was judged.
                self.assertEqual(doc["path"], "/orders/1?x=1")
                resp = raw_request(envoy.listen_port, "GET", "/docs", anon + FORGED)
                own = {k: v for k, v in resp.json()["headers"].items() if k.startswith("x-tenantgate-")}
                self.assertEqual(own, {"x-tenantgate-tenant": "/public"})

    def test_a_denial_carries_the_envoy_request_id(self):
        resp = raw_request(self.authz.listen_port, "GET", "/internal/keys",
                           [("x-tenant", "/acme/eu"), ("x-user", "alice"), ("x-user-tenant", "/acme/eu")])
        doc = resp.json()
        self.assertEqual(resp.status, 403)
        self.assertEqual(len(doc["request_id"]), 36)  # Envoy's generated UUID
        self.assertEqual(len(doc["decision_id"]), 32)
        self.assertEqual(doc["reasons"], ["platform-internal-paths"])


PERMIT = '@id("open")\npermit (principal, action, resource);\n'
FORBID = '@id("closed")\nforbid (principal, action, resource);\n'


class Reload(unittest.TestCase):
    """SIGHUP with last-known-good, then SIGTERM, on the real process behind Envoy."""

    def write(self, cedar):
        shutil.rmtree(self.tree / "tenants", ignore_errors=True)
        (self.tree / "tenants" / "acme").mkdir(parents=True)
        (self.tree / "tenants" / "acme" / "tenant.json").write_text("{}")
        (self.tree / "tenants" / "acme" / "p.cedar").write_text(cedar)

    def setUp(self):
        work = WORK / "reload"
        self.tree = work / "tree"
        self.write(PERMIT)
        self.upstream = h.Upstream().start()
        self.serve = Serve(self.tree, work).start()
        self.envoy = render(self.tree, work, "authz", self.upstream.port, "--ext-authz",
                            f"127.0.0.1:{self.serve.grpc}")
        self.envoy.start()

    def tearDown(self):
        for p in (self.envoy, self.serve, self.upstream):
            p.stop()

    def status(self):
        return raw_request(self.envoy.listen_port, "GET", "/x", [("x-tenant", "/acme"), ("x-user", "u")]).status

    def test_sighup_reloads_and_keeps_the_last_good_bundle(self):
        v1 = self.serve.get("/v1/bundle")["version"]
        self.assertEqual(self.status(), 200)
        self.write(FORBID)
        self.serve.proc.send_signal(signal.SIGHUP)
        v2 = h.wait_for(lambda: (v := self.serve.get("/v1/bundle")["version"]) != v1 and v)
        self.assertTrue(v2, "no reload within 10 s")
        self.assertIn(f"reloaded bundle {v2} (was {v1})", self.serve.log())
        self.assertEqual(self.status(), 403)

        self.write("permit (")
        self.serve.proc.send_signal(signal.SIGHUP)
        self.assertTrue(h.wait_for(lambda: "reload failed" in self.serve.log()), self.serve.log())
        self.assertIn(f"reload failed, keeping bundle {v2}: ", self.serve.log())
        self.assertIn("p.cedar:1:", self.serve.log())
        # Still healthy (v2 serves); the failed reload is said, with its error.
        health = self.serve.get("/healthz")
        self.assertEqual(
            (health["status"], health["version"], health["last_reload"]["status"]),
            ("ok", v2, "failed"),
        )
        self.assertIn("p.cedar:1:", health["last_reload"]["error"])
        self.assertEqual(self.status(), 403)

        self.serve.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.serve.proc.wait(timeout=10), 0)
        self.assertTrue(self.serve.log().rstrip().endswith("tenantgate serve: stopped"), self.serve.log())
        # With the service gone, Envoy refuses (failure_mode_allow: false) with 503.
        self.assertEqual(self.status(), 503)


if __name__ == "__main__":
    sys.exit(h.run_tests(__name__, "envoy-ext-authz", WORK))
