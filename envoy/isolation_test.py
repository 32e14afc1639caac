#!/usr/bin/env python3
"""The tenant isolation matrix (SECURITY.md, "Isolation rules") against the real Envoy 1.40 (2 workers).

The same rows as host-tests/tests/integration/isolation.rs, over the example
tree policies/ in three bundle variants: the tenant from the `x-tenant` header
(the tree as shipped), from the path (`"tenant": {"path_prefix": "/t"}`) and
from a JWT claim that `envoy.filters.http.jwt_authn` put in dynamic metadata
(the JwtIdentity setup of e2e_test.py). Every row must end in a 4xx or in a
decision the policies allow: the test checks the exact status, who answered
(tenantgate, the upstream, or Envoy itself before tenantgate ran), for allowed
rows the `x-tenantgate-tenant` / `x-tenantgate-principal` the upstream saw,
for 403s the tenant the decision was about and its policy ids, and where it
matters the normalized resource of the audit line. After the matrix, Envoy
must still answer normal requests on fresh connections on both workers.

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

JWT = "envoy.filters.http.jwt_authn"
UNSET = object()
ISO = ["platform-isolation"]
INTERNAL = ["platform-internal-paths"]


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


class Row:
    """One request of the matrix and what must come of it. Ids match
    isolation.rs and the README table."""

    def __init__(self, id, path="/orders/1"):
        self.id = id
        self.method = "GET"
        self.path = path
        self.headers = []
        self.jwt = None
        self.status = None
        self.by = None  # who answers: upstream (200), tenantgate (4xx) unless said
        self.tenant = None  # 200: x-tenantgate-tenant at the upstream; 403: body's tenant
        self.principal = UNSET  # 200: x-tenantgate-principal at the upstream (None: absent)
        self.reasons = None  # 403: the policy ids (expose_reasons), any order
        self.resource = None  # the normalized resource in the audit line
        self.upstream_path = None  # 200: the path the upstream received

    def h(self, name, value):
        self.headers.append((name, value))
        return self

    def tenant_h(self, value):
        return self.h("x-tenant", value)

    def who(self, user, home):
        return self.h("x-user", user).h("x-user-tenant", home)

    def meth(self, m):
        self.method = m
        return self

    def token(self, claims):
        self.jwt = claims
        return self

    def ok(self, tenant):
        self.status, self.tenant = 200, tenant
        return self

    def forbidden(self, tenant, reasons):
        self.status, self.tenant, self.reasons = 403, tenant, list(reasons)
        return self

    def bad(self):
        self.status = 400
        return self

    def envoy(self, status):
        """Envoy itself answers (before tenantgate runs)."""
        self.status, self.by = status, "envoy"
        return self

    def res(self, resource):
        self.resource = resource
        return self

    def prin(self, principal):
        self.principal = principal
        return self

    def up_path(self, path):
        self.upstream_path = path
        return self

    def expected_by(self):
        return self.by or ("upstream" if self.status == 200 else "tenantgate")


def alice(row):
    return row.who("alice", "/acme/eu")


# ---------------------------------------------------------------------------
# The rows.


def header_rows():
    def a(id, path="/orders/1"):
        return alice(Row(id, path).tenant_h("/acme/eu"))

    def t(id, tenant):
        return alice(Row(id).tenant_h(tenant))

    kb50 = 50 * 1024
    return [
        a("H01").ok("/acme/eu").prin("alice").res("/orders/1"),
        # percent-decoding, hex digits in either case, decoded once
        a("H02", "/orders/%2e%2E/orders/1").ok("/acme/eu").res("/orders/1"),
        a("H03", "/i%6Eternal/keys").forbidden("/acme/eu", INTERNAL),
        a("H04", "/i%6eternal/keys").forbidden("/acme/eu", INTERNAL),
        # `..` plain, encoded, mixed; `.`; double-encoded stays data
        a("H05", "/public/../internal/keys").forbidden("/acme/eu", INTERNAL),
        a("H06", "/public/%2e%2e/internal/keys").forbidden("/acme/eu", INTERNAL),
        a("H07", "/public/.%2E/internal/keys").forbidden("/acme/eu", INTERNAL),
        a("H08", "/./internal/%2e/keys").forbidden("/acme/eu", INTERNAL),
        a("H09", "/public/%252e%252e/internal/keys").bad(),
        # empty segments, `;` parameters
        a("H10", "//internal//keys").forbidden("/acme/eu", INTERNAL),
        # a dot segment with `;` parameters: servers disagree on whether it climbs
        a("H11", "/public/..;/internal/keys").bad(),
        a("H12", "/internal;v=1/keys").forbidden("/acme/eu", INTERNAL),
        # encoded `/` and `\`, climbing above the root
        a("H13", "/internal%2Fkeys").bad(),
        a("H14", "/internal%2fkeys").bad(),
        a("H15", "/internal%5Ckeys").bad(),
        a("H16", "/internal%5ckeys").bad(),
        a("H17", "/../internal/keys").bad(),
        a("H18", "/orders/%2e%2e/%2E%2E/internal").bad(),
        a("H19", "/..;/internal").bad(),
        # tenant values: validated, never decoded or repaired
        Row("H20").tenant_h("/acme/").who("carol", "/acme").ok("/acme"),
        t("H21", "/acme/eu/.").bad(),
        t("H22", "/acme/eu/..").bad(),
        t("H23", "/acme/./eu").bad(),
        t("H24", "/acme//eu").bad(),
        t("H25", "//acme/eu").bad(),
        t("H26", "/ACME").bad(),
        t("H27", "/Acme/eu").bad(),
        t("H28", "/acme/EU").bad(),
        t("H29", "/\u0430cme/eu").bad(),  # Cyrillic а
        t("H30", "\uff0facme/eu").bad(),  # fullwidth solidus
        t("H31", "/acme/eu\u200b").bad(),  # zero-width space
        t("H32", "/acme%2Feu").bad(),
        t("H33", "/acme/eu/%2e%2e").bad(),
        t("H34", "/nope").forbidden("/nope", []),
        # duplicated identity headers
        alice(Row("H35").tenant_h("/acme/eu").tenant_h("/globex")).bad(),
        alice(Row("H36").tenant_h("/acme/eu").tenant_h("/acme/eu")).bad(),
        Row("H37").tenant_h("/acme/eu").h("x-user", "alice").h("x-user", "gus").h("x-user-tenant", "/acme/eu").bad(),
        Row("H38").tenant_h("/acme/eu").h("x-user", "alice").h("x-user-tenant", "/acme/eu")
        .h("x-user-tenant", "/globex").bad(),
        t("H39", "/acme/eu,/globex").bad(),  # a comma-joined list is no tenant
        alice(Row("H56").h("X-Tenant", "/acme/eu").tenant_h("/globex")).bad(),  # names are case-insensitive
        # cross-tenant principals
        Row("H40").tenant_h("/acme/us").who("gus", "/globex").forbidden("/acme/us", ISO),
        Row("H41").tenant_h("/acme/us").who("alice", "/acme/eu").forbidden("/acme/us", ISO),
        Row("H42").tenant_h("/acme/eu").who("erin", "/acme/eu/team-a").forbidden("/acme/eu", ISO),
        Row("H43").tenant_h("/acme/eu").who("carol", "/acme").forbidden("/acme/eu", ["eu-residency"]),
        Row("H44").tenant_h("/acme/eu").who("dave", "/acme/us")
        .forbidden("/acme/eu", ["eu-residency", "platform-isolation"]),
        Row("H45").tenant_h("/globex").who("lena", "/globex/labs").forbidden("/globex", ISO),
        Row("H46").tenant_h("/acme/us").who("root", "/").forbidden("/acme/us", []),
        Row("H47").tenant_h("/acme/us").who("zed", "/nope").forbidden("/acme/us", ISO),
        Row("H48").tenant_h("/acme/us").who("zed", "/Acme").bad(),
        Row("H49").tenant_h("/acme/eu/team-a").who("alice", "/acme/eu").ok("/acme/eu/team-a"),
        Row("H50").tenant_h("/public").who("gus", "/globex").ok("/public").prin("gus"),
        Row("H51").meth("DELETE").tenant_h("/public").who("gus", "/globex").forbidden("/public", ISO),
        # forged x-tenantgate-* headers
        a("H52").h("x-tenantgate-tenant", "/globex").h("x-tenantgate-principal", "root")
        .h("X-TenantGate-Extra", "1").ok("/acme/eu").prin("alice"),
        Row("H53").tenant_h("/acme/us").who("gus", "/globex").h("x-tenantgate-tenant", "/acme/us")
        .h("x-tenantgate-principal", "dave").forbidden("/acme/us", ISO),
        Row("H54").tenant_h("/public").h("x-tenantgate-principal", "root").ok("/public").prin(None),
        alice(Row("H55").h("x-tenantgate-tenant", "/acme/eu")).bad(),
        # hostile values
        t("H60", "/" + "a" * kb50).bad(),
        Row("H61").tenant_h("/acme/eu").who("b" * kb50, "/acme/eu").bad(),
        Row("H62").tenant_h("/acme/eu").h("x-user", "alice").h("x-user-tenant", "/" + "c" * kb50).bad(),
        t("H63", b"/acme/\xff\xfe").bad(),
        t("H64", b"/acm\xe9").bad(),  # Latin-1 é
        Row("H65").tenant_h("/acme/eu").h("x-user", b"al\xffice").h("x-user-tenant", "/acme/eu").bad(),
        Row("H66").tenant_h("/acme/eu").h("x-user", "alice").h("x-user-tenant", b"/acme/\xfe").bad(),
        # Envoy's HTTP/1 codec refuses control characters other than tab itself
        Row("H67").tenant_h("/acme/eu").who("al\x01ice", "/acme/eu").envoy(400),
        Row("H68").tenant_h("/acme/eu").who("al\tice", "/acme/eu").bad(),
        Row("H69").tenant_h("/acme/eu").who("al\x7fice", "/acme/eu").envoy(400),
        Row("H70").tenant_h("/acme/eu").who("al\x1b[31mice", "/acme/eu").envoy(400),
        Row("H71").tenant_h("/acme/eu").who('a"b\\c', "/acme/eu").ok("/acme/eu").prin('a"b\\c'),
        Row("H72").tenant_h("/acme/eu").who('x"y\\z', "/acme/eu").forbidden("/acme/eu", ["platform-blocklist"]),
        Row("H73").tenant_h("/acme/eu").who('alice" || principal == User::"root', "/acme/eu")
        .ok("/acme/eu").prin('alice" || principal == User::"root'),
        t("H74", "/a" * 300).bad(),
        t("H75", "/acme/eu" + "/x" * 15).bad(),
        t("H76", "/" + "a" * 64).bad(),
        a("H77", "/" + "p" * 9000).bad(),
        a("H78").h("x-junk", "j" * kb50).ok("/acme/eu"),
        Row("H79").tenant_h("/acme/eu").who("m\u0430llory", "/acme/eu").ok("/acme/eu").prin("m\u0430llory"),
        # only ASCII space and tab are trimmed from a tenant value
        t("H80", "\u00a0/acme/eu\u3000").bad(),
        # Envoy only: above max_request_headers_kb (60 KiB), Envoy answers itself
        a("H81").h("x-junk", "j" * (70 * 1024)).envoy(431),
        # Our headers in every spelling an upstream could fold into them
        # (this template lets underscore headers through, so the filter's own
        # stripping is what is tested; H84, trailers, runs over HTTP/2 in
        # upstream_trust_test.py)
        a("H82").h("x_tenantgate_principal", "root").h("X_TENANTGATE_TENANT", "/")
        .h("x-tenantgate_principal", "root").ok("/acme/eu").prin("alice"),
        Row("H83", "/docs").tenant_h("/public").h("x_tenantgate_principal", "root").ok("/public").prin(None),
        a("H85", "/public%252f..%252finternal/keys").bad(),
        a("H86", "/public%255c..%255cinternal").bad(),
        a("H87", "/orders/1%00.json").bad(),
        a("H88", "/orders/%0d%0ax").bad(),
        t("H89", "").bad(),
    ]


def path_rows():
    def p(id, path):
        # every row also sends x-tenant: /globex, which is not a source here
        return Row(id, path).tenant_h("/globex")

    def a(id, path):
        return alice(p(id, path))

    return [
        a("P01", "/t/acme/eu/orders/1").ok("/acme/eu").prin("alice").res("/orders/1"),
        a("P02", "/t/acme/eu/%2e%2E/eu/orders/1").ok("/acme/eu").res("/orders/1"),
        a("P03", "/t/%61cme/eu/x").ok("/acme/eu").res("/x"),
        a("P04", "/t/%41cme/eu/x").bad(),
        a("P05", "/t/acme/eu/%2E%2e/%2e%2E/globex/x").forbidden("/globex", ISO),
        a("P06", "/t/acme/eu/../../globex/x").forbidden("/globex", ISO),
        p("P07", "/t/acme/eu/../../globex/x").who("gus", "/globex").ok("/globex").res("/x")
        .up_path("/t/globex/x"),  # the upstream gets the path that was judged
        a("P08", "/t/acme/%2e%2e/globex").forbidden("/globex", ISO),
        a("P09", "/t/acme/.%2E/globex/x").forbidden("/globex", ISO),
        a("P10", "/t/acme/eu/%252e%252e/%252e%252e/globex/x").bad(),
        a("P11", "/t//acme//eu//orders").ok("/acme/eu").res("/orders"),
        a("P12", "/t/./acme/eu/./x").ok("/acme/eu").res("/x"),
        a("P13", "/t/acme;v=1/eu/x").ok("/acme/eu").res("/x"),
        a("P14", "/t/acme/eu/..;/..;/globex/x").bad(),
        a("P15", "/t/acme%2Feu/x").bad(),
        a("P16", "/t/acme%2feu/x").bad(),
        a("P17", "/t/acme%5Ceu/x").bad(),
        a("P18", "/t/../acme/eu/x").bad(),
        a("P19", "/t/../../acme/eu/x").bad(),
        a("P20", "/t/%2e%2e/%2e%2e/acme").bad(),
        a("P21", "/t/acme/eu/../../../../x").bad(),
        a("P22", "/t/ACME/eu").bad(),
        a("P23", "/t/Acme/eu/x").bad(),
        a("P24", "/t/acme/EU/x").forbidden("/acme", ISO),
        p("P25", "/t/acme/EU/x").who("carol", "/acme").ok("/acme").res("/EU/x"),
        a("P26", "/t/%D0%B0cme/eu/x").bad(),
        a("P27", "/t/%EF%BC%8Facme/eu/x").bad(),
        a("P28", "/t/acme%E2%80%8B/eu/x").bad(),
        # raw UTF-8 in the request line: Envoy's codec refuses it (400) first
        a("P29", "/t/\u0430cme/eu/x".encode()).envoy(400),
        p("P30", "/t/acme/").who("carol", "/acme").ok("/acme").res("/"),
        p("P31", "/t/acme/.").who("carol", "/acme").ok("/acme").res("/"),
        a("P32", "/t/acme/..").forbidden("/", ISO),
        a("P33", "/t").forbidden("/", ISO),
        a("P34", "/t/nope/x").bad(),
        a("P35", "/orders/1").bad(),
        a("P36", "/tx/acme/eu").bad(),
        p("P37", "/t/globex/x").who("gus", "/globex").tenant_h("/acme/eu").ok("/globex"),
        a("P38", "/t/acme/eu/x").h("x-tenantgate-tenant", "/globex").h("x-tenantgate-principal", "root")
        .ok("/acme/eu").prin("alice"),
        p("P39", "/t/acme/eu/x").who("dave", "/acme/us").forbidden("/acme/eu", ["eu-residency", "platform-isolation"]),
        p("P40", "/t/acme/eu/x").who("carol", "/acme").forbidden("/acme/eu", ["eu-residency"]),
        a("P41", "/t/" + "a/" * 299 + "x").bad(),
        a("P42", "/t/acme/eu/" + "s/" * 297 + "x").ok("/acme/eu"),
        p("P43", "/t/" + "acme/" * 300).who("carol", "/acme").ok("/acme"),
        a("P44", "/t/acme/eu/" + "p" * 9000).bad(),
        a("P45", "/t/acme/eu/x?/../../globex").ok("/acme/eu").res("/x"),
        # a fragment in the request line: Envoy 1.40 refuses it (400) first
        a("P46", "/t/globex#/../acme/eu").envoy(400),
        a("P47", "/t/acme/eu%00/x").bad(),
        # judging `..;` as `..` while the upstream reads a name: refused
        p("P48", "/t/acme/..;/globex/x").who("gus", "/globex").bad(),
    ]


def jwt_rows():
    def forged(row):
        return row.h("x-tenant", "/globex").h("x-user", "gus").h("x-user-tenant", "/globex")

    return [
        forged(Row("J01").token({"sub": "carol", "tenant": "/acme"})).ok("/acme").prin("carol"),
        Row("J02").token({"sub": "carol", "tenant": "/acme"}).tenant_h("/globex").tenant_h("/acme/eu").ok("/acme"),
        Row("J03").token({"sub": "gus", "tenant": "/globex"}).h("x-tenantgate-tenant", "/acme")
        .h("x-tenantgate-principal", "carol").ok("/globex").prin("gus"),
        forged(Row("J04").token({"sub": "carol"})).bad(),
        Row("J05").token({"sub": "carol", "tenant": "/Acme"}).bad(),
        Row("J06").token({"sub": "carol", "tenant": "/acme/../globex"}).bad(),
        Row("J07").token({"sub": "carol", "tenant": "/\u0430cme"}).bad(),
        Row("J08").token({"sub": "carol", "tenant": "/acme/"}).ok("/acme"),
        Row("J09").token({"sub": "mallory", "tenant": "/acme/us"}).forbidden("/acme/us", ["platform-blocklist"]),
        Row("J10").token({"sub": "al\x01ice", "tenant": "/acme"}).bad(),
        Row("J11").token({"sub": "carol", "tenant": ["/acme"]}).bad(),  # not a string
        Row("J12").token({"sub": "carol", "tenant": 7}).bad(),
        Row("J13").token({"sub": "", "tenant": "/acme"}).forbidden("/acme", ISO),  # anonymous
    ]


# ---------------------------------------------------------------------------
# The runner: one Envoy per variant, `--concurrency 2`.


class Matrix:
    """The runner, mixed into one e2e.EnvoyCase per variant (not a TestCase
    itself, so unittest does not collect it)."""

    rows = staticmethod(lambda: [])
    healthy = None  # a Row that must pass before and after the matrix

    def headers_of(self, row):
        headers = list(row.headers)
        if row.jwt is not None:
            headers.append(("authorization", "Bearer " + e2e.JwtIdentity.token(row.jwt)))
        return headers

    def send(self, row, rid):
        headers = self.headers_of(row) + [("x-request-id", rid)]
        return raw_request(self.envoy.listen_port, row.method, row.path, headers)

    def check(self, row, resp):
        """The problems with a response to `row` (empty: as expected)."""
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
        rows = self.rows()
        ids = [r.id for r in rows]
        self.assertEqual(len(ids), len(set(ids)), "duplicate row ids")
        bad_before = self.envoy.counter("wasmcustom.tenantgate.bad_request")
        self.assertEqual(self.check(self.healthy, self.send(self.healthy, f"iso-{name}-healthy-before")), [])
        results = {}
        for row in rows:
            rid = f"iso-{name}-{row.id}"
            resp = self.send(row, rid)
            results[row.id] = (resp.status, answered_by(resp))
            with self.subTest(row.id, path=row.path if isinstance(row.path, str) else repr(row.path)):
                problems = self.check(row, resp)
                self.assertEqual(problems, [], f"{row.id} {row.method} {row.path!r}")
        # The normalized resource, from the audit lines (flushed every 100 ms).
        want_res = {f"iso-{name}-{r.id}": r for r in rows if r.resource is not None}

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
        self.assertEqual(self.envoy.counter("wasmcustom.tenantgate.bad_request") - bad_before, want_400)
        # Afterwards: normal requests on fresh connections, served on both workers.
        before = self.worker_connections()
        statuses = []
        for i in range(64):
            statuses.append(self.send(self.healthy, f"iso-{name}-healthy-after-{i}").status)
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
        print(f"\n  isolation matrix ({name}): {len(rows)} rows, {dict(sorted(counts.items()))}; "
              f"afterwards {len(statuses)} requests on fresh connections, all 200; "
              f"connections per worker {before} -> {after}", file=sys.stderr)


class HeaderTenant(Matrix, e2e.EnvoyCase):
    """policies/ as shipped: tenant from x-tenant, principal x-user, home x-user-tenant."""

    rows = staticmethod(header_rows)
    healthy = alice(Row("healthy").tenant_h("/acme/eu")).ok("/acme/eu")


class PathTenant(Matrix, e2e.EnvoyCase):
    """The tenant from the path: `/t/acme/eu/orders/1` is /acme/eu, resource /orders/1."""

    bundle_name = "isolation-path"
    rows = staticmethod(path_rows)
    healthy = alice(Row("healthy", "/t/acme/eu/orders")).ok("/acme/eu")

    @classmethod
    def bundle_edit(cls, d):
        h.edit_settings(d, tenant={"path_prefix": "/t"})


class JwtTenant(Matrix, e2e.EnvoyCase):
    """Tenant and principal from jwt_authn's dynamic metadata (e2e_test.JwtIdentity's setup)."""

    template = "envoy-jwt.yaml"
    bundle_name = "jwt"
    rows = staticmethod(jwt_rows)
    healthy = Row("healthy").token({"sub": "carol", "tenant": "/acme"}).ok("/acme")

    @classmethod
    def bundle_edit(cls, d):
        e2e.JwtIdentity.bundle_edit(d)

    @classmethod
    def config_values(cls):
        return e2e.JwtIdentity.config_values()


def main():
    return h.run_tests(__name__, "envoy-isolation", e2e.WORK)


if __name__ == "__main__":
    sys.exit(main())
