#!/usr/bin/env python3
"""Plain Envoy (no Wasm filter) calling `tenantgate-rls` through its own
`envoy.filters.http.ratelimit`, configured by `tenantgate limits --format envoy`.

The bundle is the example tree (`policies/`) with `rate_limit_service.on_error:
"deny"`: fleet limits `rpm` of 6000 per minute on `/acme` and 2400 (40%) on
`/acme/eu`, and `costs: {"POST": 2}` (rendered as a filter that sets the
call's `hits_addend`). Envoy routes to a second listener of its own that answers 200, so only the rate
limit filter decides. Each round starts a fresh Redis counter set,
`tenantgate-rls` and Envoy, and at once (no warm-up) sends many requests on
many connections:

- admissions are exact: 1200 of 1300 POSTs (2 each) to `/acme/eu` pass, then
  3600 of 3650 GETs to `/acme` (what `/acme/eu` left of its 6000), then every request
  under `/acme` is refused; `/globex` (no fleet limit) is never refused and
  carries no `x-ratelimit-*` header;
- every response is 200 or 429: no 5xx, and Envoy's `ratelimit.error`,
  `ratelimit.failure_mode_allowed` and the service cluster's failure counters
  stay 0;
- every `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset`
  parses as an RFC 9651 structured field (`http_sfv`) with the exact values:
  `2400, 2400;w=60;name="rpm", 6000;w=60;name="rpm"` for `/acme/eu`, the
  remaining counts exactly those of the admitted requests.

Then, one request at a time, which counters each request moves: the tenant
from a header, a path prefix or `jwt_authn`'s metadata (a JWT claim, copied
into a header by the rendered filters; a client's copy does not count), with
`default_tenant`.

    .venv/bin/python envoy/plain_rls_test.py [-v]

Needs `redis-server` (scripts/install-redis.sh), the `tenantgate` and
`tenantgate-rls` binaries (`cargo build -p tenantgate-cli -p tenantgate-rls`),
Envoy (scripts/install-envoy.sh) and `http_sfv` (envoy/requirements-test.txt).
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import unittest
from collections import Counter
from pathlib import Path

import http_sfv

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
from fleet_test import Redis, Rls  # noqa: E402

WORK = h.tempdir("tenantgate-plain-rls-")
ROUNDS = int(os.environ.get("PLAIN_RLS_ROUNDS", "3"))
CLIENTS = 24
METADATA_HEADER = "x-tenantgate-ratelimit-tenant"
EU, ACME = 2400, 6000
EU_LIMIT = '2400, 2400;w=60;name="rpm", 6000;w=60;name="rpm"'
ACME_LIMIT = '6000, 6000;w=60;name="rpm"'
# The service cluster's counters that mean a failed or abandoned call.
CLUSTER_FAILURES = ("upstream_rq_timeout", "upstream_rq_pending_overflow", "upstream_cx_connect_fail",
                    "upstream_rq_pending_failure_eject", "upstream_cx_protocol_error",
                    "upstream_rq_rx_reset", "upstream_rq_tx_reset")


def render_limits(bundle, rls_port):
    cmd = h.cli_command() + ["limits", str(bundle), "--format", "envoy", "--rls", f"127.0.0.1:{rls_port}"]
    proc = subprocess.run(cmd, cwd=h.REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


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


def bootstrap(rendered, listen, admin, before=(), origin=None):
    """A bootstrap around the rendered pieces, as an operator would paste them.
    The routes go to the cluster `upstream`, a second listener of the same
    Envoy that answers 200 (Envoy's rate limit filter skips routes with no
    cluster, such as a `direct_response`)."""
    own_origin = origin is None
    origin = origin or h.free_port()
    ingress = hcm("ingress", {"virtual_hosts": [{
        "name": "all", "domains": ["*"],
        "rate_limits": rendered["rate_limits"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
    }]}, list(before) + rendered["http_filters"])
    answer = hcm("origin", {"virtual_hosts": [{
        "name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}],
    }]}, [])
    upstream = {"name": "upstream", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": origin}}}}]}]}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        # Histograms (the service's call times) are read at the end of a round.
        "stats_flush_interval": "0.5s",
        "static_resources": {
            "listeners": [listener("ingress", listen, ingress)]
            + ([listener("origin", origin, answer)] if own_origin else []),
            "clusters": [upstream] + rendered["clusters"],
        },
    }


def parse(kind, value):
    """An RFC 9651 structured field of `kind` (`List` or `Item`)."""
    field = getattr(http_sfv, kind)()
    field.parse(value.encode())
    return field


def limit_items(value):
    """`x-ratelimit-limit` as [(number, {params})]."""
    return [(i.value, dict(i.params)) for i in parse("List", value)]


def blast(port, jobs):
    """Sends `jobs` ([(method, tenant)]) over CLIENTS keep-alive connections at
    once; returns [(method, tenant, status, headers)] in completion order."""
    out, lock, it = [], threading.Lock(), iter(list(jobs))

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                break
            method, tenant = job
            try:
                r = h.request(port, method, "/items", {"x-tenant": tenant}, body="{}" if method == "POST" else None,
                              conn=conn)
                row = (method, tenant, r.status, r.headers)
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                row = (method, tenant, f"error: {e!r}", {})
            with lock:
                out.append(row)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


class PlainEnvoyRounds(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = WORK / "rounds"
        cls.work.mkdir(parents=True)
        policies = h.copy_policies(cls.work / "policies")
        # A call that takes longer than `timeout_ms` is an error (503 under
        # `deny`). The service answers in about a millisecond on an idle
        # machine, but on a shared 2-core CI runner (debug build) its tail
        # reaches 50 ms, the default; this test is about every call being
        # answered, not about the machine's tail, so it allows a second.
        h.edit_settings(policies, rate_limit_service={"on_error": "deny", "timeout_ms": 1000})
        cls.bundle = cls.work / "bundle.json"
        h.make_bundle(policies, cls.bundle)
        cls.redis = Redis(cls.work).start()

    @classmethod
    def tearDownClass(cls):
        cls.redis.stop()

    def round(self, n):
        """One round: fresh counters and processes, the burst at once."""
        self.redis.flush()
        rls_port, listen, admin = h.free_port(), h.free_port(), h.free_port()
        rendered = render_limits(self.bundle, rls_port)
        rls = Rls(self.bundle, self.redis.url, self.work, rls_port).start()
        envoy = h.Envoy(json.dumps(bootstrap(rendered, listen, admin), indent=2), self.work, name=f"envoy-{n}",
                        concurrency=2, admin_port=admin, listen_port=listen)
        try:
            envoy.start()
            started = time.monotonic()
            # 1300 POSTs to /acme/eu (cost 2: 1200 fit its 2400) with /globex's in between.
            first = blast(listen, [("POST", "/acme/eu")] * (EU // 2 + 100) + [("GET", "/globex")] * 50)
            # /acme has 6000 - 2400 = 3600 left.
            second = blast(listen, [("GET", "/acme")] * (ACME - EU + 50))
            # Everything under /acme is refused now, by /acme (and /acme/eu).
            third = blast(listen, [("GET", "/acme/eu")] * 20 + [("GET", "/acme/us")] * 20 + [("GET", "/acme")] * 20)
            elapsed = time.monotonic() - started
            stats = envoy.stats()
            time.sleep(0.7)  # the histograms flush every 0.5 s
            hist = envoy.admin("/stats?filter=tenantgate_rls.upstream_rq_time$")[1].strip()
        finally:
            envoy.stop()
            rls.stop()
        return first, second, third, stats, elapsed, hist

    def check_round(self, n, first, second, third, stats):
        every = first + second + third
        statuses = Counter(r[2] for r in every)
        self.assertEqual(set(statuses), {200, 429}, f"round {n}: {statuses}")
        by = lambda rows, m, t: Counter(r[2] for r in rows if (r[0], r[1]) == (m, t))  # noqa: E731
        self.assertEqual(by(first, "POST", "/acme/eu"), Counter({200: EU // 2, 429: 100}), f"round {n}")
        self.assertEqual(by(first, "GET", "/globex"), Counter({200: 50}), f"round {n}")
        self.assertEqual(by(second, "GET", "/acme"), Counter({200: ACME - EU, 429: 50}), f"round {n}")
        self.assertEqual(Counter(r[2] for r in third), Counter({429: 60}), f"round {n}")
        self.assertEqual(self.redis.count("/acme/eu", "rpm"), EU)
        self.assertEqual(self.redis.count("/acme", "rpm"), ACME)
        # Envoy's own accounting: every call answered, none failed or timed out.
        rl = {k.split("ratelimit.", 1)[1]: v for k, v in stats.items()
              if k.startswith("cluster.upstream.ratelimit.")}
        self.assertEqual(rl.get("error", 0), 0, f"round {n}: {rl}")
        self.assertEqual(rl.get("failure_mode_allowed", 0), 0, f"round {n}: {rl}")
        self.assertEqual(rl.get("over_limit", 0), 100 + 50 + 60, f"round {n}: {rl}")
        self.assertEqual(rl.get("ok", 0), EU // 2 + ACME - EU, f"round {n}: {rl}")
        failures = {k: stats.get(f"cluster.tenantgate_rls.{k}", 0) for k in CLUSTER_FAILURES}
        self.assertEqual(sum(failures.values()), 0, f"round {n}: {failures}")

    def check_headers(self, n, first, second, third):
        # /globex has no fleet limit: no call, no header.
        for m, t, status, hdrs in first:
            if t == "/globex":
                self.assertFalse([k for k in hdrs if k.startswith("x-ratelimit")], hdrs)
        # Every other response: the three fields, well formed, exact.
        for rows, tenant, cost, text in [(first, "/acme/eu", 2, EU_LIMIT), (second, "/acme", 1, ACME_LIMIT)]:
            remaining = []
            for m, t, status, hdrs in rows:
                if t != tenant:
                    continue
                self.assertEqual(hdrs.get("x-ratelimit-limit"), text, hdrs)
                items = limit_items(hdrs["x-ratelimit-limit"])
                want = [(EU, {}), (EU, {"w": 60, "name": "rpm"}), (ACME, {"w": 60, "name": "rpm"})] \
                    if tenant == "/acme/eu" else [(ACME, {}), (ACME, {"w": 60, "name": "rpm"})]
                self.assertEqual(items, want)
                r = parse("Item", hdrs["x-ratelimit-remaining"]).value
                reset = parse("Item", hdrs["x-ratelimit-reset"]).value
                self.assertTrue(isinstance(r, int) and isinstance(reset, int), hdrs)
                self.assertTrue(0 <= reset <= 60, hdrs)
                if status == 200:
                    remaining.append(r)
                else:
                    self.assertEqual(r, 0, hdrs)
                    self.assertEqual(hdrs.get("x-envoy-ratelimited"), "true", hdrs)
            # The admitted requests saw each remaining count once: what is left
            # of the limit (the deeper one for /acme/eu) after each, in steps of the cost.
            top = EU if tenant == "/acme/eu" else ACME - EU
            self.assertEqual(sorted(remaining), list(range(0, top, cost)), f"round {n}: {tenant}")
        for m, t, status, hdrs in third:
            self.assertEqual(parse("Item", hdrs["x-ratelimit-remaining"]).value, 0)
            self.assertEqual(hdrs["x-ratelimit-limit"], EU_LIMIT if t == "/acme/eu" else ACME_LIMIT)

    def test_rounds_right_after_start(self):
        for n in range(ROUNDS):
            first, second, third, stats, elapsed, hist = self.round(n)
            calls = {k.rsplit(".", 1)[1]: v for k, v in stats.items()
                     if k.startswith("cluster.upstream.ratelimit.")}
            print(f"\n  round {n}: {len(first) + len(second) + len(third)} requests in {elapsed:.1f}s, "
                  f"{dict(Counter(r[2] for r in first + second + third))}, ratelimit {calls}", file=sys.stderr)
            print(f"  round {n}: service call times (ms, interval and cumulative): {hist}", file=sys.stderr)
            with self.subTest(round=n):
                self.check_round(n, first, second, third, stats)
                self.check_headers(n, first, second, third)


class Twice:
    """Headers with one name sent twice (for `harness.request`)."""

    def __init__(self, name, first, second):
        self.pairs = [(name, first), (name, second)]

    def items(self):
        return self.pairs


class CountsAfter:
    """Runs requests one by one and reads which counters each one moved."""

    def counts_after(self, name, requests, before=(), **settings):
        """Sends `requests` ([(path, headers)]) one by one through plain Envoy
        rendered for the example tree with `settings`; returns, per request,
        the counters that moved ({"/acme/eu": 1, ...})."""
        work = WORK / name
        policies = h.copy_policies(work / "policies")
        h.edit_settings(policies, rate_limit_service={"on_error": "deny", "timeout_ms": 1000}, **settings)
        bundle = work / "bundle.json"
        h.make_bundle(policies, bundle)
        redis = Redis(work).start()
        upstream = h.Upstream().start()
        rls_port, listen, admin = h.free_port(), h.free_port(), h.free_port()
        rls = Rls(bundle, redis.url, work, rls_port).start()
        config = bootstrap(render_limits(bundle, rls_port), listen, admin, before, origin=upstream.port)
        envoy = h.Envoy(json.dumps(config), work, name="envoy", concurrency=1, admin_port=admin,
                        listen_port=listen)
        out, self.upstream_saw = [], []
        try:
            envoy.start()
            seen = {}
            for path, headers in requests:
                r = h.request(listen, "GET", path, headers)
                self.assertEqual(r.status, 200, (path, headers, r))
                self.upstream_saw.append(r.json()["headers"])
                now = {t: redis.count(t, "rpm") for t in ("/acme", "/acme/eu")}
                out.append({t: n - seen.get(t, 0) for t, n in now.items() if n != seen.get(t, 0)})
                seen = now
        finally:
            envoy.stop()
            rls.stop()
            upstream.stop()
            redis.stop()
        return out


class TenantSources(CountsAfter, unittest.TestCase):
    """Which descriptors a request carries, read from the service's counters:
    the tenant from a header or a path prefix, with `default_tenant`."""

    def test_a_header_with_a_default_tenant(self):
        cases = [
            ({"x-tenant": "/acme/eu"}, {"/acme/eu": 1, "/acme": 1}),
            ({"x-tenant": "/acme/eu/"}, {"/acme/eu": 1, "/acme": 1}),
            ({"x-tenant": "/acme/eu/team-a"}, {"/acme/eu": 1, "/acme": 1}),
            ({"x-tenant": "/acme/us"}, {"/acme": 1}),
            ({"x-tenant": "/acme"}, {"/acme": 1}),
            ({"x-tenant": "/acme/"}, {"/acme": 1}),
            ({"x-tenant": "/acmeish"}, {}),
            ({"x-tenant": "/globex"}, {}),
            ({}, {"/acme/eu": 1, "/acme": 1}),  # no header: the default tenant
            ({"x-tenant": ""}, {"/acme/eu": 1, "/acme": 1}),
            # Twice (the filter answers 400): a matcher matches when any value does.
            (Twice("x-tenant", "/globex", "/acme/eu"), {"/acme/eu": 1, "/acme": 1}),
            (Twice("x-tenant", "/acme/eu", "/globex"), {"/acme/eu": 1, "/acme": 1}),
        ]
        got = self.counts_after("header", [("/items", hd) for hd, _ in cases], default_tenant="/acme/eu")
        self.assertEqual(got, [want for _, want in cases])

    def test_a_path_prefix_with_a_default_tenant(self):
        cases = [
            ("/t/acme/eu/items/1", {"/acme/eu": 1, "/acme": 1}),
            ("/t/acme/eu", {"/acme/eu": 1, "/acme": 1}),
            ("/t/acme/eu?x=1", {"/acme/eu": 1, "/acme": 1}),
            ("/t/acme/us/items", {"/acme": 1}),
            ("/t/acme?x=1", {"/acme": 1}),
            ("/t/acmeish/items", {}),
            ("/t/globex/items", {}),
            ("/t", {}),
            ("/elsewhere", {"/acme/eu": 1, "/acme": 1}),  # outside the prefix: the default tenant
            ("/tx/acme", {"/acme/eu": 1, "/acme": 1}),
        ]
        got = self.counts_after("prefix", [(p, {}) for p, _ in cases], tenant={"path_prefix": "/t"},
                                default_tenant="/acme/eu")
        self.assertEqual(got, [want for _, want in cases])


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class JwtTenant(CountsAfter, unittest.TestCase):
    """The tenant from `jwt_authn`'s metadata: the rendered filters copy it
    into a header for the actions (a client's copy of that header is
    replaced) and remove it after the rate limit filter."""

    secret, issuer = b"plain-rls-test-secret", "https://idp.plain-rls.test"

    def token(self, claims):
        now = int(time.time())
        head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "t"}).encode())
        body = b64url(json.dumps({"iss": self.issuer, "iat": now, "exp": now + 300, **claims}).encode())
        sig = hmac.new(self.secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return {"authorization": f"Bearer {head}.{body}.{b64url(sig)}"}

    def test_the_tenant_claim(self):
        jwks = {"keys": [{"kty": "oct", "alg": "HS256", "kid": "t", "k": b64url(self.secret)}]}
        jwt = {"name": "envoy.filters.http.jwt_authn", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"idp": {"issuer": self.issuer, "local_jwks": {"inline_string": json.dumps(jwks)},
                                  "payload_in_metadata": "payload", "forward": False}},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}]}}
        spoof = METADATA_HEADER
        cases = [
            (self.token({"tenant": "/acme/eu"}), {"/acme/eu": 1, "/acme": 1}),
            (self.token({"tenant": "/acme/us"}), {"/acme": 1}),
            (self.token({"tenant": "/globex"}), {}),
            # A client's copy of the header does not count: the token's tenant does.
            ({**self.token({"tenant": "/globex"}), spoof: "/acme/eu"}, {}),
            ({**self.token({"tenant": "/acme"}), spoof: "/acme/eu"}, {"/acme": 1}),
            # No tenant claim: the default tenant.
            (self.token({"sub": "x"}), {"/acme/eu": 1, "/acme": 1}),
        ]
        got = self.counts_after("jwt", [("/items", hd) for hd, _ in cases], before=[jwt],
                                tenant={"metadata": ["envoy.filters.http.jwt_authn", "payload", "tenant"]},
                                default_tenant="/acme/eu")
        self.assertEqual(got, [want for _, want in cases])
        # The copy is removed after the rate limit filter: the upstream never sees it.
        self.assertEqual([spoof in hd for hd in self.upstream_saw], [False] * len(cases), self.upstream_saw)


if __name__ == "__main__":
    argv = [sys.argv[0]] + sys.argv[1:]
    prog = unittest.main(argv=argv, exit=False, verbosity=2 if "-v" in argv else 1)
    res = prog.result
    failed = len({getattr(t, "test_case", t).id() for t, _ in res.failures + res.errors})
    print(f"envoy-plain-rls: logs and configs in {WORK}")
    print(f"envoy-plain-rls: {res.testsRun - failed} passed, {failed} failed", flush=True)
    sys.exit(0 if failed == 0 and res.testsRun > 0 else 1)
