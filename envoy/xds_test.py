#!/usr/bin/env python3
"""The control plane in real Envoy: `tenantgate serve --xds` and a fleet of Envoys.

    python3 envoy/xds_test.py [-v]
    TENANTGATE_BUILD=native python3 envoy/xds_test.py [-v]   # serve --xds --native

One server watches a copy of the example policy tree; three Envoys take the
filter's config from it (`tenantgate envoy --xds`): `edge-1` and `edge-2` over
ADS, `edge-3` over the extension config discovery service. In order:

1. all three ACK the first version and decide by it;
2. a policy file saved: every Envoy ACKs the new version and decides by it
   (the time from the save to the last Envoy's new decision is printed);
3. a broken edit and an edit that fails a policy test are refused at the
   server (located errors in `GET /v1/rollout`), nothing is pushed and the
   Envoys keep deciding by the last good version; the good content saved
   again is the same version: no push;
4. a rollback to the first version;
5. a canary of the second version to a fraction of the nodes (one of three),
   then to `edge-2`, then to all;
6. the server stopped (the Envoys keep deciding), the tree changed, the
   server started again: every Envoy reconnects and runs the new version;
7. an Envoy that NACKs: `edge-4` runs where the module path the server sends
   does not exist (the server names the module relative to the working
   directory, `dist/tenantgate.wasm`, and `edge-4` runs in a folder without
   it), so Envoy refuses the config; the status shows the NACK with Envoy's
   error, and the other three are unaffected.

With TENANTGATE_BUILD=native the server serves the native build's config
(`serve --xds ... --native dist/libtenantgate.so`) and the Envoys' bootstraps
take it (`tenantgate envoy --xds ... --native PATH`); the steps are the same.

Last line: `envoy-xds: N passed, M failed`.
"""

import json
import os
import signal
import subprocess
import sys
import time
import unittest
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402

WORK = h.tempdir("tenantgate-xds-")
NODES = ["edge-1", "edge-2", "edge-3"]
# gus (home /globex) deleting a draft in /globex: allowed by `globex-write`
# until the freeze below is saved.
GUS = {"x-tenant": "/globex", "x-user": "gus", "x-user-tenant": "/globex"}
FREEZE = """// Globex drafts are frozen.
@id("globex-drafts-frozen")
forbid (
  principal,
  action in Action::"write",
  resource in Tenant::"/globex"
)
when { resource.path like "/drafts*" };
"""
BROKEN = FREEZE.replace("when {", "when {{")
# `globex-read` turned into a forbid: the policy test "two permits: gus GET
# /healthz in /globex" fails.
NO_READ = '@id("globex-read")\npermit'


def module_flag():
    """The module the server names, relative to the Envoys' working directory."""
    if h.build() == "native":
        return ["--native", "dist/libtenantgate.so"]
    return ["--wasm", "dist/tenantgate.wasm"]


def save(path, text):
    """Writes a policy file as an editor does: a temporary file, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Server:
    """`tenantgate serve DIR --http --xds` on fixed ports (kept across restarts)."""

    def __init__(self, source, http_port, xds_port):
        self.source, self.http_port, self.xds_port = source, http_port, xds_port
        self.log_path = WORK / "serve.log"
        self.proc = None

    def start(self):
        log = open(self.log_path, "ab")
        # Run from the repository: the module path it sends is relative.
        self.proc = subprocess.Popen(
            h.cli_command() + ["serve", str(self.source), "--http", f"127.0.0.1:{self.http_port}",
                               "--xds", f"127.0.0.1:{self.xds_port}", *module_flag()],
            stdout=subprocess.DEVNULL, stderr=log, cwd=h.REPO)
        log.close()
        h.wait_port(self.http_port, 60, self.proc, "tenantgate serve")
        return self

    def stop(self):
        h._stop(self.proc)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def status(self):
        code, body = self.call("GET", "/v1/rollout")
        assert code == 200, body
        return json.loads(body)

    def metric(self, name):
        code, body = self.call("GET", "/metrics")
        assert code == 200, body
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None


def bootstrap(name, api, xds_port, upstream_port):
    listen, admin = h.free_port(), h.free_port()
    out = WORK / f"{name}.json"
    cmd = h.cli_command() + ["envoy", str(h.POLICIES), "--xds", f"127.0.0.1:{xds_port}", "--xds-api", api,
                             "--node-id", name, "--listen", f"127.0.0.1:{listen}",
                             "--admin", f"127.0.0.1:{admin}", "--upstream", f"127.0.0.1:{upstream_port}",
                             "-o", str(out)]
    if h.build() == "native":
        cmd += ["--native", str(h.native_path().resolve())]
    subprocess.run(cmd, check=True, capture_output=True)
    return out.read_text(), listen, admin


class Fleet(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tree = h.copy_policies(WORK / "policies")
        cls.freeze = cls.tree / "tenants" / "globex" / "freeze.cedar"
        cls.members = cls.tree / "tenants" / "globex" / "members.cedar"
        cls.upstream = h.Upstream().start()
        cls.server = Server(cls.tree, h.free_port(), h.free_port()).start()
        cls.envoys = []
        for i, name in enumerate(NODES):
            text, listen, admin = bootstrap(name, "ecds" if i == 2 else "ads", cls.server.xds_port,
                                            cls.upstream.port)
            cls.envoys.append(h.Envoy(text, WORK, name=name, concurrency=1, admin_port=admin,
                                      listen_port=listen))
        # Started together: each compiles the module once (seconds on a busy machine).
        for e in cls.envoys:
            with open(WORK / f"{e.name}.stderr", "wb") as err:
                e.proc = subprocess.Popen(e.command(), stdout=subprocess.DEVNULL, cwd=h.REPO, stderr=err)
        for e in cls.envoys:
            h.wait_port(e.listen_port, 120, e.proc, f"envoy {e.name}")
        cls.v1 = cls.server.status()["target"]
        cls.extra = None

    @classmethod
    def tearDownClass(cls):
        for e in cls.envoys + ([cls.extra] if cls.extra else []):
            e.stop()
        cls.server.stop()
        cls.upstream.stop()

    # -- helpers

    def decisions(self, path="/drafts/1", method="DELETE"):
        return [h.request(e.listen_port, method, path, GUS).status for e in self.envoys]

    def wait_decisions(self, want, timeout=30, **kw):
        got = h.wait_for(lambda: self.decisions(**kw) == want, timeout=timeout, interval=0.05)
        self.assertTrue(got, f"decisions {self.decisions(**kw)}, want {want}\n{self.server.log()[-3000:]}")

    def wait_acked(self, versions, timeout=30):
        """Every node in `versions` ({node: version}) ACKed it and is in sync."""
        def ok():
            s = self.server.status()["nodes"]
            return all(n in s and s[n]["connected"] and (s[n]["acked"] or {}).get("version") == v
                       and s[n]["in_sync"] for n, v in versions.items())
        self.assertTrue(h.wait_for(ok, timeout=timeout, interval=0.05),
                        json.dumps(self.server.status(), indent=1) + self.server.log()[-3000:])

    def assert_runs(self, envoy, version):
        self.assertEqual(
            envoy.stats("extension_config_discovery.http_filter.tenantgate.version_text")
            .get("extension_config_discovery.http_filter.tenantgate.version_text"), f'"{version}"')

    # -- the steps, in order

    def test_1_every_envoy_acks_the_first_version(self):
        self.assertTrue(self.v1.startswith("sha256:"))
        self.wait_acked({n: self.v1 for n in NODES})
        s = self.server.status()
        self.assertEqual(s["summary"], {"nodes": 3, "connected": 3, "in_sync": 3, "nacking": 0})
        self.assertEqual([s["nodes"][n]["cluster"] for n in NODES], ["tenantgate"] * 3)
        self.assertEqual(self.decisions(), [200, 200, 200])
        for e in self.envoys:
            self.assert_runs(e, self.v1)
        self.assertEqual(self.server.metric(f'tenantgate_xds_nodes{{version="{self.v1}"}}'), 3)

    def test_2_a_saved_policy_file_reaches_every_envoy(self):
        pushes = self.server.metric("tenantgate_xds_pushes_total")
        t0 = time.monotonic()
        save(self.freeze, FREEZE)
        # Poll each Envoy until it decides by the new policy.
        done = {}
        while len(done) < 3 and time.monotonic() - t0 < 30:
            for e in self.envoys:
                if e.name not in done and h.request(e.listen_port, "DELETE", "/drafts/1", GUS).status == 403:
                    done[e.name] = time.monotonic() - t0
            time.sleep(0.01)
        self.assertEqual(sorted(done), NODES, self.server.log()[-3000:])
        took = max(done.values())
        print(f"\nenvoy-xds: policy file saved -> all 3 Envoys decide by it in {took:.2f} s "
              f"({', '.join(f'{n} {t:.2f} s' for n, t in sorted(done.items()))})", file=sys.stderr)
        s = self.server.status()
        v2 = s["source"]["version"]
        self.assertNotEqual(v2, self.v1)
        self.assertEqual((s["target"], s["previous"]), (v2, self.v1))
        self.wait_acked({n: v2 for n in NODES})
        self.assertEqual(self.server.metric("tenantgate_xds_pushes_total"), pushes + 3)
        r = h.request(self.envoys[0].listen_port, "DELETE", "/drafts/1", GUS)
        self.assertEqual(r.status, 403)
        self.assertIn("globex-drafts-frozen", r.json()["reasons"])
        self.assertEqual(self.decisions(method="GET"), [200, 200, 200])
        self.assertEqual(self.decisions(path="/orders/1"), [200, 200, 200])
        for e in self.envoys:
            self.assert_runs(e, v2)
        type(self).v2 = v2

    def test_3_broken_edits_are_refused_at_the_server(self):
        pushes = self.server.metric("tenantgate_xds_pushes_total")
        save(self.freeze, BROKEN)
        got = h.wait_for(lambda: self.server.status()["source"]["refused"], timeout=10, interval=0.05)
        self.assertTrue(got, self.server.log()[-2000:])
        errors = got["errors"]
        self.assertTrue(errors[0].startswith(f"{self.freeze}:8:"), errors)
        self.assertIn("error", errors[0])
        self.assertEqual(self.server.metric("tenantgate_xds_source_refused_total"), 1)
        # An edit that compiles but fails a policy test of the tree.
        save(self.freeze, FREEZE)
        h.wait_for(lambda: self.server.status()["source"]["refused"] is None, timeout=10, interval=0.05)
        original = self.members.read_text()
        save(self.members, original.replace(NO_READ, NO_READ.replace("permit", "forbid"), 1))
        got = h.wait_for(lambda: self.server.status()["source"]["refused"], timeout=10, interval=0.05)
        self.assertTrue(got, self.server.log()[-2000:])
        self.assertTrue(any("policy test failed" in e and "tests/defaults.json" in e for e in got["errors"]),
                        got["errors"])
        self.assertIn("does not load; not pushed", self.server.log())
        # Nothing was pushed; the Envoys decide as before.
        time.sleep(0.5)
        s = self.server.status()
        self.assertEqual((s["source"]["version"], s["target"]), (self.v2, self.v2))
        self.assertEqual(self.server.metric("tenantgate_xds_pushes_total"), pushes)
        self.assertEqual(self.decisions(), [403, 403, 403])
        self.assertEqual(self.decisions(method="GET"), [200, 200, 200])
        # The good content again: the same version, no push.
        save(self.members, original)
        h.wait_for(lambda: self.server.status()["source"]["refused"] is None, timeout=10, interval=0.05)
        time.sleep(0.5)
        self.assertEqual(self.server.status()["source"]["refused"], None)
        self.assertEqual(self.server.metric("tenantgate_xds_pushes_total"), pushes)
        self.assertEqual(self.server.status()["target"], self.v2)

    def test_4_rollback(self):
        code, body = self.server.call("POST", "/v1/rollback", {})
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["target"], self.v1)
        self.wait_acked({n: self.v1 for n in NODES})
        self.wait_decisions([200, 200, 200])
        code, body = self.server.call("POST", "/v1/rollback", {"version": "sha256:00"})
        self.assertEqual(code, 400)
        self.assertIn("`sha256:00` is not one the server keeps", json.loads(body)["message"])

    def test_5_canary_to_one_node_then_all(self):
        # A fraction of the connected nodes: 0.3 of 3 is one node, chosen in a stable order.
        code, body = self.server.call("POST", "/v1/rollout", {"version": self.v2, "fraction": 0.3})
        self.assertEqual(code, 200, body)
        chosen = json.loads(body)["canary"]["chosen"]
        self.assertEqual(len(chosen), 1, body)
        self.wait_acked({n: self.v2 if n in chosen else self.v1 for n in NODES})
        self.wait_decisions([403 if n in chosen else 200 for n in NODES])
        # Then by node id; the fraction's node goes back to the target.
        code, body = self.server.call("POST", "/v1/rollout", {"version": self.v2, "nodes": "edge-2"})
        self.assertEqual(code, 200, body)
        self.wait_acked({"edge-1": self.v1, "edge-2": self.v2, "edge-3": self.v1})
        self.wait_decisions([200, 403, 200])
        s = self.server.status()
        self.assertEqual(s["canary"], {"version": self.v2, "nodes": "edge-2", "fraction": None, "chosen": []})
        self.assertEqual([s["nodes"][n]["canary"] for n in NODES], [False, True, False])
        self.assertEqual(self.server.metric(f'tenantgate_xds_nodes{{version="{self.v1}"}}'), 2)
        self.assertEqual(self.server.metric(f'tenantgate_xds_nodes{{version="{self.v2}"}}'), 1)
        code, body = self.server.call("POST", "/v1/rollout", {"version": self.v2})
        self.assertEqual(code, 200, body)
        self.wait_acked({n: self.v2 for n in NODES})
        self.wait_decisions([403, 403, 403])
        self.assertIsNone(self.server.status()["canary"])

    def test_6_server_restart(self):
        self.server.stop()
        self.assertEqual(self.server.proc.returncode, 0, self.server.log()[-2000:])
        # Without the server the Envoys keep deciding by what they run.
        time.sleep(1)
        self.assertEqual(self.decisions(), [403, 403, 403])
        # The tree changes while it is down: archives frozen instead of drafts.
        save(self.freeze, FREEZE.replace("/drafts*", "/archive*"))
        self.server.start()
        v3 = self.server.status()["target"]
        self.assertNotIn(v3, (self.v1, self.v2))
        self.wait_acked({n: v3 for n in NODES}, timeout=30)
        self.wait_decisions([200, 200, 200])
        self.wait_decisions([403, 403, 403], path="/archive/1")
        type(self).v3 = v3

    def test_7_an_envoy_that_nacks_shows_in_the_status(self):
        text, listen, admin = bootstrap("edge-4", "ads", self.server.xds_port, self.upstream.port)
        elsewhere = WORK / "edge-4-host"
        elsewhere.mkdir(exist_ok=True)
        e = h.Envoy(text, elsewhere, name="edge-4", concurrency=1, admin_port=admin, listen_port=listen)
        with open(elsewhere / "edge-4.stderr", "wb") as err:
            e.proc = subprocess.Popen(e.command(), stdout=subprocess.DEVNULL, cwd=elsewhere, stderr=err)
        type(self).extra = e
        node = h.wait_for(lambda: (self.server.status()["nodes"].get("edge-4") or {}).get("nacked"),
                          timeout=60, interval=0.1)
        self.assertTrue(node, self.server.log()[-2000:])
        self.assertEqual(node["version"], self.v3)
        # Envoy's words: "Invalid path: dist/tenantgate.wasm" (or that it
        # cannot load dist/libtenantgate.so).
        self.assertIn(module_flag()[1], node["error"])
        s = self.server.status()
        self.assertIsNone(s["nodes"]["edge-4"]["acked"])
        self.assertFalse(s["nodes"]["edge-4"]["in_sync"])
        self.assertEqual(s["summary"], {"nodes": 4, "connected": 4, "in_sync": 3, "nacking": 1})
        self.assertEqual(self.server.metric("tenantgate_xds_nodes_nacking"), 1)
        self.assertEqual(self.server.metric('tenantgate_xds_nodes{version="none"}'), 1)
        self.assertGreaterEqual(self.server.metric("tenantgate_xds_nacks_total"), 1)
        self.assertIn("NACKed", self.server.log())
        self.assertGreaterEqual(
            h.wait_for(lambda: e.counter("extension_config_discovery.http_filter.tenantgate.update_rejected"),
                       timeout=10), 1)
        # The others are unaffected.
        self.assertEqual(self.decisions(path="/archive/1"), [403, 403, 403])


if __name__ == "__main__":
    sys.exit(h.run_tests(sys.modules[__name__], "envoy-xds", WORK))
