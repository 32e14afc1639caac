#!/usr/bin/env python3
"""The quick-start demo: real Envoy (2 workers) with tenantgate in front of an echo
upstream, and a narrated series of requests. Run it through scripts/demo.sh,
which builds the filter and the bundle first.

    python3 envoy/demo.py --bundle dist/bundle.json [--wasm dist/tenantgate.wasm] [--keep]
    python3 envoy/demo.py --bundle dist/bundle.json --native dist/libtenantgate.so [--keep]

With `--native` Envoy loads the native build (`libtenantgate.so`, an Envoy
dynamic module) instead of the Wasm filter: the same requests, the same
answers; the counters are read under `dynamicmodulescustom.` instead of
`wasmcustom.` (docs/reference.md, "Native build").

Exits 0 when every response is what the narration says, 1 otherwise. `--keep`
leaves Envoy running afterwards (until Ctrl-C) and prints example commands.
The requests do not depend on the time of day (ACME's business-hours guardrail
only bites writes to non-gold tenants; the demo writes to the gold /acme/eu).
"""

import argparse
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402

BOLD = "\033[1m" if sys.stdout.isatty() else ""
DIM = "\033[2m" if sys.stdout.isatty() else ""
RED = "\033[31m" if sys.stdout.isatty() else ""
GREEN = "\033[32m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""

# Response headers worth showing (the rest is Envoy's usual date/server/...).
SHOWN = ("content-type", "retry-after", "ratelimit-policy", "ratelimit")


def who(user, home, tenant, **extra):
    headers = {"x-tenant": tenant, "x-user": user, "x-user-tenant": home}
    headers.update(extra)
    return headers


class Demo:
    def __init__(self, envoy):
        self.envoy = envoy
        self.port = envoy.listen_port
        self.failures = []
        self.step_no = 0

    def title(self, text, story):
        self.step_no += 1
        print()
        print(f"{BOLD}== {self.step_no}. {text}{RESET}")
        for line in story.strip().splitlines():
            print(f"   {line.strip()}")

    def send(self, method, path, headers, body=None, quiet=False):
        if not quiet:
            print(f"$ {h.curl_line(self.port, method, path, headers, body)}")
        return self.envoy.request(method, path, headers, body)

    def show(self, resp, upstream_keys=()):
        print(f"< HTTP {resp.status}")
        for k in SHOWN:
            if k in resp.headers:
                print(f"< {k}: {resp.headers[k]}")
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if doc is not None and doc.get("upstream") == "echo":
            seen = doc["headers"]
            shown = {k: seen[k] for k in upstream_keys if k in seen}
            forged = sorted(k for k in seen if k.startswith("x-tenantgate-") and k not in upstream_keys)
            print(f"  {DIM}(the upstream answered; it received {json.dumps(shown)}"
                  f"{', and also ' + ', '.join(forged) if forged else ''}){RESET}")
        elif resp.body:
            print(f"< {resp.body.decode(errors='replace').strip()}")

    def expect(self, what, ok):
        if ok:
            print(f"  {GREEN}ok{RESET}: {what}")
        else:
            print(f"  {RED}UNEXPECTED{RESET}: expected {what}")
            self.failures.append(f"step {self.step_no}: {what}")
        return ok

    def run(self):
        tg = ("x-tenantgate-tenant", "x-tenantgate-principal")

        self.title("Allowed: alice reads an order in her own tenant /acme/eu", """
            The inherited ACME default `acme-read-default` (attached to /acme) permits it.
            The client also tries to forge `x-tenantgate-tenant: /globex`: tenantgate
            removes every client-sent x-tenantgate-* header and sets its own.""")
        r = self.send("GET", "/orders/1", who("alice", "/acme/eu", "/acme/eu", **{"x-tenantgate-tenant": "/globex"}))
        self.show(r, tg)
        seen = r.json().get("headers", {}) if r.status == 200 else {}
        self.expect("200, forwarded with x-tenantgate-tenant: /acme/eu and x-tenantgate-principal: alice",
                    r.status == 200 and seen.get("x-tenantgate-tenant") == "/acme/eu"
                    and seen.get("x-tenantgate-principal") == "alice")

        self.title("Forbidden by a guardrail: carol (/acme HQ) reads EU data", """
            `acme-read-default` would permit it, but /acme/eu carries the `eu-residency`
            forbid (only principals whose home tenant is in region "eu"). A forbid beats
            any permit, so no inherited default can lift a guardrail.""")
        r = self.send("GET", "/orders/1", who("carol", "/acme", "/acme/eu"))
        self.show(r)
        self.expect("403 forbidden by eu-residency",
                    r.status == 403 and body(r).get("error") == "forbidden"
                    and body(r).get("reasons") == ["eu-residency"])

        self.title("Path normalization feeds the guardrails: /public/../internal/keys", """
            The path is normalized before policies see it, so this lands on /internal/keys
            and the root guardrail `platform-internal-paths` forbids it.""")
        r = self.send("GET", "/public/../internal/keys", who("dave", "/acme/us", "/acme/us"))
        self.show(r)
        self.expect("403 forbidden by platform-internal-paths",
                    r.status == 403 and body(r).get("reasons") == ["platform-internal-paths"])

        self.title("An override: /acme/eu replaces ACME's write default", """
            ACME's `acme-write-default` is @overridable; /acme/eu ships its own version
            (same @id) that requires an API key. Without a key alice may not write her
            own tenant, although the ACME default alone would have let her ...""")
        r = self.send("POST", "/orders", who("alice", "/acme/eu", "/acme/eu"), body='{"item": "widget"}')
        self.show(r)
        self.expect("403 (default deny: the EU override needs x-api-key)",
                    r.status == 403 and body(r).get("reasons") == [])
        print("   ... and with a key the EU override allows the write:")
        r = self.send("POST", "/orders", who("alice", "/acme/eu", "/acme/eu", **{"x-api-key": "k-alice"}),
                      body='{"item": "widget"}')
        self.show(r, tg)
        self.expect("200, allowed by the EU version of acme-write-default", r.status == 200)

        self.title("Cross-tenant attempt: gus (/globex) reads ACME's orders", """
            The root guardrail `platform-isolation` keeps every principal inside its own
            home subtree (a principal that names another tenant in x-tenant gets 403).""")
        r = self.send("GET", "/orders/1", who("gus", "/globex", "/acme/us"))
        self.show(r)
        self.expect("403 forbidden by platform-isolation",
                    r.status == 403 and body(r).get("reasons") == ["platform-isolation"])

        self.title("Rate limited: lena hammers the Globex Labs sandbox", """
            /globex/labs has `rps` rate 5 per second, burst 5. The bucket is shared by
            both Envoy workers, so the 6th request in the same instant is refused with
            429, Retry-After and the IETF RateLimit fields.""")
        headers = who("lena", "/globex/labs", "/globex/labs")
        print(f"$ for i in $(seq 10); do {h.curl_line(self.port, 'GET', '/experiments', headers)}; done")
        statuses, limited = [], None
        for _ in range(10):
            r = self.send("GET", "/experiments", headers, quiet=True)
            statuses.append(r.status)
            if r.status == 429:
                limited = r
                break
        print(f"  statuses: {' '.join(map(str, statuses))}")
        if limited is not None:
            self.show(limited)
        ok = (limited is not None and statuses.count(200) >= 5
              and limited.headers.get("retry-after", "").isdigit()
              and '"rps"' in limited.headers.get("ratelimit-policy", "")
              and '"rps"' in limited.headers.get("ratelimit", "")
              and body(limited).get("error") == "quota_exceeded")
        # The burst is 5; a request that lands after 200 ms finds a refilled token.
        self.expect(f"{statuses.count(200)} admitted (burst 5, refilling 5 per second), then 429 quota_exceeded "
                    "with retry-after, ratelimit-policy and ratelimit", ok)

        self.title("Limited per API key: Globex allows 3 requests a minute per x-api-key", """
            /globex declares a keyed limit `per_key` (rate 3, per 1m, key: the x-api-key
            header): one token bucket per key value, in a fixed-size table in shared data
            (memory does not grow with the keys seen). gus's key k-gus-1 gets 3 requests,
            the 4th is 429 naming `per_key`; another key, k-gus-2, still passes.""")
        headers = who("gus", "/globex", "/globex", **{"x-api-key": "k-gus-1"})
        print(f"$ for i in $(seq 4); do {h.curl_line(self.port, 'GET', '/catalog', headers)}; done")
        statuses, limited = [], None
        for _ in range(4):
            r = self.send("GET", "/catalog", headers, quiet=True)
            statuses.append(r.status)
            limited = r if r.status == 429 else limited
        print(f"  statuses: {' '.join(map(str, statuses))}")
        if limited is not None:
            self.show(limited)
        self.expect("200 200 200, then 429 quota_exceeded with limit per_key",
                    statuses == [200, 200, 200, 429] and body(limited).get("limit") == "per_key"
                    and body(limited).get("error") == "quota_exceeded")
        r = self.send("GET", "/catalog", who("gus", "/globex", "/globex", **{"x-api-key": "k-gus-2"}))
        self.show(r, tg)
        self.expect("200: k-gus-2 has its own 3 a minute", r.status == 200)

        self.title("Bad input is a 400 with a reason, never a crash", """
            An encoded slash in the path, a path climbing above the root, a malformed
            tenant, no tenant at all.""")
        for method, path, hdrs in [
            ("GET", "/orders%2F1", who("alice", "/acme/eu", "/acme/eu")),
            ("GET", "/../../etc/passwd", who("alice", "/acme/eu", "/acme/eu")),
            ("GET", "/orders/1", who("alice", "/acme/eu", "/Acme/EU")),
            ("GET", "/orders/1", {"x-user": "alice"}),
        ]:
            r = self.send(method, path, hdrs)
            self.show(r)
            self.expect("400 bad_request", r.status == 400 and body(r).get("error") == "bad_request")

        self.title("What Envoy counted", """
            tenantgate's counters and per-tenant counters, from the admin interface
            (/stats; /stats/prometheus has the same as tenantgate_allowed, ...).""")
        time.sleep(0.2)
        # The Wasm filter's metrics are under `wasmcustom.`, the native build's
        # under `dynamicmodulescustom.` (with real labels: `name.tenant./acme/eu...`).
        ns = h.stat_namespace()
        stats = self.envoy.stats(f"{ns}.tenantgate")
        print(f"$ curl -s http://127.0.0.1:{self.envoy.admin_port}/stats?filter={ns}.tenantgate")
        for name in sorted(stats):
            if isinstance(stats[name], int) and (stats[name] or ".tenant." not in name):
                print(f"  {name}: {stats[name]}")
        self.expect("tenantgate.allowed, denied_policy, denied_quota and bad_request counted",
                    stats.get(f"{ns}.tenantgate.allowed", 0) >= 7
                    and stats.get(f"{ns}.tenantgate.denied_policy", 0) >= 4
                    and stats.get(f"{ns}.tenantgate.denied_quota", 0) >= 1
                    and stats.get(f"{ns}.tenantgate.bad_request", 0) >= 4)
        audit = []
        for _ in range(30):  # Envoy flushes its log file every 100 ms
            audit = [ln for ln in self.envoy.log().splitlines() if '"decision"' in ln]
            if len(audit) >= 17:
                break
            time.sleep(0.1)
        if audit:
            line = next((ln for ln in audit if '"eu-residency"' in ln), audit[-1])
            print("  the audit line of step 2 in Envoy's log (one JSON line per decision):")
            print(f"  {DIM}{line[line.find('{'):] if '{' in line else line}{RESET}")
        self.expect("audit lines in Envoy's log", bool(audit))


def body(resp):
    try:
        doc = resp.json()
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}


def port_or_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            return h.free_port()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=h.REPO / "dist" / "bundle.json")
    module = parser.add_mutually_exclusive_group()
    module.add_argument("--wasm", type=Path, default=None)
    module.add_argument("--native", type=Path, default=None,
                        help="load the native build (libtenantgate.so) instead of the Wasm filter")
    parser.add_argument("--keep", action="store_true", help="keep Envoy running afterwards (Ctrl-C stops it)")
    parser.add_argument("--port", type=int, default=10000, help="listener port (a free one if taken)")
    parser.add_argument("--admin-port", type=int, default=9901, help="admin port (a free one if taken)")
    args = parser.parse_args(argv)

    if args.native:
        # Every config the harness renders then loads the native build.
        os.environ["TENANTGATE_BUILD"] = "native"
        os.environ["TENANTGATE_NATIVE"] = str(args.native.resolve())
        wasm = args.native.resolve()
    else:
        wasm = (args.wasm or h.wasm_path()).resolve()
    for need in (args.bundle, wasm):
        if not need.exists():
            print(f"demo: {need} is missing (scripts/demo.sh builds it)", file=sys.stderr)
            return 2
    bundle_text = args.bundle.read_text()
    version = json.loads(bundle_text).get("version", "?")
    work = h.tempdir("tenantgate-demo-")
    listen, admin = port_or_free(args.port), port_or_free(args.admin_port)
    with h.Upstream() as upstream:
        config = h.render(h.ENVOY_DIR / "envoy.yaml", {
            "LISTEN_PORT": listen, "ADMIN_PORT": admin, "UPSTREAM_PORT": upstream.port,
            "WASM_PATH": str(wasm), "BUNDLE_JSON": bundle_text,
        })
        envoy = h.Envoy(config, work, name="envoy", concurrency=2, admin_port=admin, listen_port=listen)
        print(f"{BOLD}tenantgate demo{RESET}: Envoy {envoy_version()} with 2 workers on 127.0.0.1:{listen}"
              f" (admin :{admin}), echo upstream on :{upstream.port}")
        print(f"  filter {wasm.relative_to(h.REPO) if wasm.is_relative_to(h.REPO) else wasm}"
              f" ({wasm.stat().st_size // 1024} KiB), bundle {version[:19]}..., config {envoy.config_path}")
        try:
            envoy.start()
        except (RuntimeError, TimeoutError) as e:
            print(f"demo: Envoy did not start: {e}", file=sys.stderr)
            return 1
        try:
            demo = Demo(envoy)
            demo.run()
            print()
            if demo.failures:
                print(f"{RED}demo: {len(demo.failures)} response(s) not as narrated:{RESET}")
                for f in demo.failures:
                    print(f"  - {f}")
                print(f"  Envoy log: {envoy.log_path}")
            else:
                print(f"{GREEN}demo: every response was as narrated.{RESET}")
            if args.keep:
                keep(envoy, admin)
        finally:
            envoy.stop()
    print("demo: Envoy and the upstream stopped.")
    return 1 if demo.failures else 0


def keep(envoy, admin):
    p = envoy.listen_port
    print(f"""
Envoy keeps running on http://127.0.0.1:{p} (admin http://127.0.0.1:{admin}). Try:

  curl -i http://127.0.0.1:{p}/orders/1 -H 'x-tenant: /acme/eu' -H 'x-user: alice' -H 'x-user-tenant: /acme/eu'
  curl -i http://127.0.0.1:{p}/orders/1 -H 'x-tenant: /acme/eu' -H 'x-user: carol' -H 'x-user-tenant: /acme'
  curl -i -X POST http://127.0.0.1:{p}/orders -H 'x-tenant: /acme/eu' -H 'x-user: alice' -H 'x-user-tenant: /acme/eu' -H 'x-api-key: k'
  for i in $(seq 8); do curl -s -o /dev/null -w '%{{http_code}} ' http://127.0.0.1:{p}/x -H 'x-tenant: /globex/labs' -H 'x-user: lena' -H 'x-user-tenant: /globex/labs'; done; echo
  curl -i --path-as-is 'http://127.0.0.1:{p}/a%2Fb' -H 'x-tenant: /acme/eu'
  curl -s http://127.0.0.1:{admin}/stats?filter=tenantgate
  curl -s http://127.0.0.1:{admin}/stats/prometheus | grep tenantgate_

Envoy's log (audit lines included): {envoy.log_path}
Press Ctrl-C to stop.""", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop and envoy.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print()


def envoy_version():
    import subprocess
    try:
        out = subprocess.run([str(h.envoy_bin()), "--version"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"version: \S*?/(\d+\.\d+\.\d+)/", out)
        if m:
            return m.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    return "?"


if __name__ == "__main__":
    sys.exit(main())
