#!/usr/bin/env python3
"""The tenant isolation matrix (SECURITY.md, "Isolation rules") against the real Envoy 1.40 (2 workers).

The rows are data: testdata/isolation.json, the file host-tests `isolation`
runs against tenantgate.wasm in the wasmtime host (its `about` field describes
the schema). Three bundle variants of the example tree policies/: the tenant
from the `x-tenant` header (the tree as shipped), from the path (`"tenant":
{"path_prefix": "/t"}`) and from a JWT claim that
`envoy.filters.http.jwt_authn` put in dynamic metadata (a token signed with
e2e_test.JwtIdentity's key, envoy-jwt.yaml). This runner sends every row but
those marked `"only": "host"`, with the row's `envoy` override applied.

Every row must end in a 4xx or in a decision the policies allow: the test
checks the exact status, who answered (tenantgate, the upstream, or Envoy
itself before tenantgate ran), for allowed rows the `x-tenantgate-tenant` /
`x-tenantgate-principal` the upstream saw and no other spelling of them, for
tenantgate's answers the error, tenant, policy ids, decision id and request
id of the body, and where the row says so the normalized resource of the
audit line and the path the upstream received. Every 400 tenantgate gave must
be counted; afterwards Envoy must still answer normal requests on fresh
connections on both workers.

Every request goes on a fresh connection, written byte for byte on a socket
(no client-side normalization or validation: duplicated headers, raw UTF-8 and
non-UTF-8 bytes, control characters). Run it with scripts/test-envoy.sh, or

    python3 envoy/isolation_test.py [-v] [HeaderTenant|PathTenant|JwtTenant]

The table of rows with their reasons is in envoy/README.md. Standard library only.
"""

import http.client
import json
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
import e2e_test as e2e  # noqa: E402  (only helpers and base classes: no test is re-run)

UNSET = object()


def to_bytes(v):
    return v if isinstance(v, bytes) else str(v).encode("utf-8")


def raw_request(port, method, path, headers, timeout=10):
    """One HTTP/1.1 request on a fresh connection, every byte as given.
    Returns a harness Response; status 0 if Envoy closed without answering."""
    lines = [to_bytes(method) + b" " + to_bytes(path) + b" HTTP/1.1", b"host: tenantgate.test"]
    lines += [to_bytes(k) + b": " + to_bytes(v) for k, v in headers]
    lines += [b"connection: close", b"", b""]
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(b"\r\n".join(lines))
        resp = http.client.HTTPResponse(sock, method=method)
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return h.Response(0, {}, b"")
        out = {}
        for k, v in resp.getheaders():
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return h.Response(resp.status, out, resp.read())
    finally:
        sock.close()


def answered_by(resp):
    """'upstream' (the echo upstream answered), 'tenantgate' (its JSON reply) or 'envoy'."""
    try:
        doc = json.loads(resp.body.decode())
    except ValueError:
        return "envoy"
    if isinstance(doc, dict) and doc.get("upstream") == "echo":
        return "upstream"
    if isinstance(doc, dict) and "error" in doc and resp.headers.get("content-type", "").startswith("application/json"):
        return "tenantgate"
    return "envoy"


MATRIX = h.REPO / "testdata" / "isolation.json"
ROW_KEYS = {"id", "note", "method", "path", "headers", "trailers", "jwt", "status", "by", "tenant",
            "principal", "reasons", "resource", "upstream_path", "envoy", "only"}
WANT_KEYS = {"status", "by", "tenant", "principal", "reasons", "resource", "upstream_path"}


def matrix():
    """testdata/isolation.json (its `about` field describes the schema)."""
    return json.loads(MATRIX.read_text())


def value_bytes(v):
    """The bytes a value of the matrix stands for: a string (UTF-8), {"latin1": s}
    (each char one byte) or {"repeat": s, "times": n, "prefix"?: s, "suffix"?: s}."""
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, dict) and set(v) == {"latin1"}:
        return v["latin1"].encode("latin-1")
    if isinstance(v, dict) and {"repeat", "times"} <= set(v) <= {"repeat", "times", "prefix", "suffix"}:
        return (v.get("prefix", "") + v["repeat"] * v["times"] + v.get("suffix", "")).encode("utf-8")
    raise ValueError(f"not a value of the matrix: {v!r}")


class Row:
    """One row of the matrix as this runner reads it: the request, and what
    must come of it with the row's `envoy` override applied."""

    def __init__(self, d):
        unknown = set(d) - ROW_KEYS
        if unknown or not set(d.get("envoy", {})) <= WANT_KEYS:
            raise ValueError(f"{d.get('id')}: unknown keys {sorted(unknown)} {d.get('envoy')}")
        if d.get("only") not in (None, "envoy", "host"):
            raise ValueError(f"{d['id']}: only {d['only']!r}")
        if d.get("trailers"):
            raise ValueError(f"{d['id']}: trailers cannot be sent over HTTP/1.1 here; mark the row \"only\": \"host\"")
        self.id = d["id"]
        self.method = d.get("method", "GET")
        self.path = value_bytes(d.get("path", "/orders/1"))
        self.headers = [(k, value_bytes(v)) for k, v in d.get("headers", [])]
        self.jwt = d.get("jwt")
        want = {**d, **d.get("envoy", {})}
        self.status = want["status"]
        self.by = want.get("by")  # who answers: upstream (200), tenantgate (4xx) unless said
        self.tenant = want.get("tenant")  # 200: x-tenantgate-tenant at the upstream; 4xx: body's tenant
        self.principal = want.get("principal", UNSET)  # 200: x-tenantgate-principal (None: absent)
        self.reasons = want.get("reasons")  # 403: the policy ids (expose_reasons), any order
        self.resource = want.get("resource")  # the normalized resource in the audit line
        self.upstream_path = want.get("upstream_path")  # 200: the path the upstream received

    def expected_by(self):
        return self.by or ("upstream" if self.status == 200 else "tenantgate")


# ---------------------------------------------------------------------------
# The runner: one Envoy per variant, `--concurrency 2`.


class Matrix:
    """The runner, mixed into one e2e.EnvoyCase per variant (not a TestCase
    itself, so unittest does not collect it)."""

    variant = None  # the name of the variant in testdata/isolation.json

    @classmethod
    def bundle_edit(cls, d):
        h.edit_settings(d, **matrix()["variants"][cls.variant]["settings"])

    def rows(self):
        """The variant's rows this runner sends (all but `"only": "host"`)."""
        return [Row(r) for r in matrix()["variants"][self.variant]["rows"] if r.get("only") != "host"]

    def healthy(self):
        """The row that must pass before and after the matrix."""
        return Row(matrix()["variants"][self.variant]["healthy"])

    def headers_of(self, row):
        headers = list(row.headers)
        if row.jwt is not None:
            headers.append(("authorization", "Bearer " + e2e.JwtIdentity.token(row.jwt)))
        return headers

    def send(self, row, rid):
        headers = self.headers_of(row) + [("x-request-id", rid)]
        return raw_request(self.envoy.listen_port, row.method, row.path, headers)

    def check(self, row, resp, rid):
        """The problems with a response to `row` sent as request `rid` (empty: as expected)."""
        problems = []
        by = answered_by(resp)
        if resp.status != row.status or by != row.expected_by():
            return [f"{resp.status} from {by}, want {row.status} from {row.expected_by()}: {resp.body[:300]!r}"]
        if by == "upstream":
            doc = resp.json()
            # the echo upstream (http.server) decodes header bytes as Latin-1
            seen = {k: v.encode("latin-1").decode("utf-8", "replace") for k, v in doc["headers"].items()}
            if seen.get("x-tenantgate-tenant") != row.tenant:
                problems.append(f"upstream saw tenant {seen.get('x-tenantgate-tenant')!r}, want {row.tenant!r}")
            principal = seen.get("x-tenantgate-principal")
            if row.principal is not UNSET and principal != row.principal:
                problems.append(f"upstream saw principal {principal!r}, want {row.principal!r}")
            # any spelling a CGI/WSGI upstream would fold into ours
            own = sorted(k for k in seen if k.lower().replace("_", "-").startswith("x-tenantgate-"))
            want_own = sorted(["x-tenantgate-tenant"] + (["x-tenantgate-principal"] if principal is not None else []))
            if own != want_own:
                problems.append(f"upstream x-tenantgate-* headers {own}")
            if row.upstream_path is not None and doc.get("path") != row.upstream_path:
                problems.append(f"upstream path {doc.get('path')!r}, want {row.upstream_path!r}")
        elif by == "tenantgate":
            doc = resp.json()
            want_error = {400: "bad_request", 403: "forbidden"}.get(row.status)
            if doc.get("error") != want_error:
                problems.append(f"body {doc}, want error {want_error}")
            if row.status == 400 and not doc.get("message"):
                problems.append(f"400 without a message: {doc}")
            did = doc.get("decision_id") or ""
            if len(did) != 32 or any(c not in "0123456789abcdef" for c in did):
                problems.append(f"decision_id {did!r} is not the filter's own id")
            if doc.get("request_id") != rid:
                problems.append(f"request_id {doc.get('request_id')!r} is not the incoming {rid!r}")
            if row.tenant is not None and doc.get("tenant") != row.tenant:
                problems.append(f"judged tenant {doc.get('tenant')!r}, want {row.tenant!r}")
            if row.reasons is not None and sorted(doc.get("reasons") or []) != sorted(row.reasons):
                problems.append(f"reasons {doc.get('reasons')}, want {sorted(row.reasons)}")
        return problems

    def worker_connections(self):
        stats = self.envoy.stats("downstream_cx_total")
        port = self.envoy.listen_port
        return [stats.get(f"listener.127.0.0.1_{port}.worker_{w}.downstream_cx_total", 0) for w in (0, 1)]

    def test_matrix(self):
        name = type(self).__name__
        rows, healthy = self.rows(), self.healthy()
        self.assertGreaterEqual(len(rows), 10, "the matrix lost rows")
        ids = [r.id for r in rows]
        self.assertEqual(len(ids), len(set(ids)), "duplicate row ids")
        bad_before = self.envoy.counter(f"{h.stat_namespace()}.tenantgate.bad_request")
        rid = f"iso-{name}-healthy-before"
        self.assertEqual(self.check(healthy, self.send(healthy, rid), rid), [])
        results = {}
        for row in rows:
            rid = f"iso-{name}-{row.id}"
            resp = self.send(row, rid)
            results[row.id] = (resp.status, answered_by(resp))
            with self.subTest(row.id, path=repr(row.path[:80])):
                problems = self.check(row, resp, rid)
                self.assertEqual(problems, [], f"{row.id} {row.method} {row.path!r}")
        # The normalized resource, from the audit lines (flushed every 100 ms).
        want_res = {f"iso-{name}-{r.id}": r for r in rows if r.resource is not None and r.expected_by() != "envoy"}

        def found():
            lines = {a.get("request_id"): a for a in e2e.audit_lines(self.envoy) if a.get("request_id") in want_res}
            return lines if len(lines) == len(want_res) else None

        lines = e2e.wait_for(found, 10) or {}
        for rid, row in want_res.items():
            with self.subTest(row.id, audit="resource"):
                self.assertIn(rid, lines, "no audit line")
                self.assertEqual(lines[rid].get("resource"), row.resource, lines[rid])
        # Every 400 tenantgate gave was counted.
        want_400 = sum(1 for r in rows if r.status == 400 and r.expected_by() == "tenantgate")
        self.assertEqual(self.envoy.counter(f"{h.stat_namespace()}.tenantgate.bad_request") - bad_before, want_400)
        # Afterwards: normal requests on fresh connections, served on both workers.
        before = self.worker_connections()
        statuses = []
        for i in range(64):
            statuses.append(self.send(healthy, f"iso-{name}-healthy-after-{i}").status)
            if i >= 15 and all(a > b for a, b in zip(self.worker_connections(), before)):
                break
        after = self.worker_connections()
        self.assertEqual(set(statuses), {200}, statuses)
        self.assertTrue(all(a > b for a, b in zip(after, before)),
                        f"both workers should serve new connections: before {before}, after {after}")
        log = self.envoy.log()
        for sign in ("panicked", "Uncaught", "wasm trap", "Function: proxy_on"):
            self.assertNotIn(sign, log, f"{sign!r} in Envoy's log")
        counts = {}
        for status, by in results.values():
            counts[f"{status} {by}"] = counts.get(f"{status} {by}", 0) + 1
        print(f"\n  isolation matrix ({name}, {self.variant}): {len(rows)} rows, {dict(sorted(counts.items()))}; "
              f"afterwards {len(statuses)} requests on fresh connections, all 200; "
              f"connections per worker {before} -> {after}", file=sys.stderr)


class HeaderTenant(Matrix, e2e.EnvoyCase):
    """policies/ as shipped: tenant from x-tenant, principal x-user, home x-user-tenant."""

    variant = "header"
    bundle_name = "main"  # its settings change nothing


class PathTenant(Matrix, e2e.EnvoyCase):
    """The tenant from the path: `/t/acme/eu/orders/1` is /acme/eu, resource /orders/1."""

    variant = "path"
    bundle_name = "isolation-path"


class JwtTenant(Matrix, e2e.EnvoyCase):
    """Tenant and principal from jwt_authn's dynamic metadata: e2e_test.JwtIdentity's
    template, issuer and key; the bundle settings come from the matrix."""

    variant = "jwt"
    template = "envoy-jwt.yaml"
    bundle_name = "isolation-jwt"

    @classmethod
    def config_values(cls):
        return e2e.JwtIdentity.config_values()

    @h.native_gap("the ABI reads dynamic metadata one level deep (namespace, key): jwt_authn's payload is a struct under `payload`")
    def test_matrix(self):
        super().test_matrix()


def main():
    return h.run_tests(__name__, "envoy-isolation", e2e.WORK)


if __name__ == "__main__":
    sys.exit(main())
