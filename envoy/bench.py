#!/usr/bin/env python3
"""The benchmark driver behind envoy/bench.sh (which builds and installs first).

Five Envoy configurations answer the same GET with a direct_response (no
upstream, so only the filter chain differs):

  a  baseline      no filter
  b  native        Envoy's RBAC (tenant, home tenant and user headers, method)
                   + local_ratelimit (one token bucket), the closest native check
  c  wasm_floor    a no-op proxy-wasm filter (envoy/noop-filter: reads one
                   header, continues): the cost of the Wasm boundary alone
  d  tenantgate    tenantgate with the bundle of policies/ (alice reads
                   /acme/eu: 3 policy levels, `rps` charged on 3 levels)
  e  tenantgate_large  tenantgate with the generated bundle of
                   envoy/gen_large_policies.py (1,000 tenants, 10,000 policies)
  n  native_floor  a no-op dynamic module (envoy/noop-native: reads one header,
                   continues): the cost of the dynamic-module boundary alone
  m  tenantgate_native  the native build (dist/libtenantgate.so) with the
                   bundle of (d)
  h  tenantgate_assigned  (d) with /acme's fleet limit `rpm` in mode
                   `assigned` (tenantgate-rls and Redis on wrk's CPU; the
                   assignments are far above the load)
  o  tenantgate_native_assigned  the same bundle on the native build

Envoy runs with one worker pinned to CPU 0 (`taskset -c 0`), wrk with one
thread pinned to CPU 1, same connections and duration for every run. Each round
runs a..e once, each in a fresh Envoy with a warm-up; rounds are interleaved
(the order rotates each round) and the medians are reported. The last line of
output is one JSON object.

The bundles of (d) and (e) differ from their trees in two settings only, so the
benchmark measures admitted requests as production runs them: the limits are
raised (the root's `rps` to 100 million per second, /acme's `daily` to 10^12)
so that no request is refused, and `audit` is "deny" (no audit line for an
allowed request). BENCH_AUDIT=all keeps an audit line per request.

Calibration (configs k_<kind>): the no-op filter making K more host calls of
one kind per request (`time`, `metric`, `add_header`, `set_shared`,
`get_header`, `get_shared`, `property`, `header_map`, the kinds tenantgate
makes). The cost of one call is (1/rps(k_kind) - 1/rps(wasm_floor)) / K,
reported as `call_us_<kind>` beside the ratios.

Capability restriction (configs c_cap and d_cap, run only when named in
BENCH_ONLY): the floor and tenantgate with Envoy's
`capability_restriction_config` allowing only the callbacks a header filter
needs (Envoy then skips entering the VM for the response body and `on_log`).

Stages (configs s_early, s_map, s_decide, when BENCH_STAGE_DIR holds the
measuring builds of envoy/bench_stages.sh): tenantgate stopping each request
after one stage, reported as microseconds per request over the floor.

Environment: BENCH_ROUNDS (3), BENCH_DURATION seconds (10), BENCH_WARMUP (2),
BENCH_CONNECTIONS (32), BENCH_ONLY (e.g. "a,d" or "c,d,k_time"),
BENCH_CALIBRATE (1: add the k_ configs; 0: leave them out), BENCH_CALLS (K, 8).
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DURATION = int(os.environ.get("BENCH_DURATION", "10"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "2"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
AUDIT = os.environ.get("BENCH_AUDIT", "deny")
ENVOY_CPU, WRK_CPU = "0", "1"

NAMES = {"a": "baseline", "b": "native", "c": "wasm_floor", "d": "tenantgate", "e": "tenantgate_large",
         "f": "tenantgate_nolimits", "g": "tenantgate_fleet", "n": "native_floor", "m": "tenantgate_native",
         "h": "tenantgate_assigned", "o": "tenantgate_native_assigned",
         "c_cap": "wasm_floor_restricted", "d_cap": "tenantgate_restricted",
         "s_early": "stage_early", "s_map": "stage_map", "s_decide": "stage_decide"}
STAGES = ["early", "map", "decide"]
CALL_KINDS = ["time", "metric", "add_header", "set_shared", "get_header", "get_shared", "property", "header_map"]
CALIBRATE = os.environ.get("BENCH_CALIBRATE", "1") != "0"
CALLS = int(os.environ.get("BENCH_CALLS", "8"))
for _kind in CALL_KINDS:
    NAMES[f"k_{_kind}"] = f"calls_{_kind}"

ACME = {"x-tenant": "/acme/eu", "x-user": "alice", "x-user-tenant": "/acme/eu"}
LARGE = {"x-tenant": "/o07/u4/t3", "x-user": "dev-o07-u4-t3", "x-user-tenant": "/o07/u4/t3"}


def wasm_filter(name, wasm, configuration, restricted=False):
    cfg = h.wasm_filter_config(configuration, wasm, name)
    if restricted:
        cfg["config"]["capability_restriction_config"] = capability_restriction(wasm)
    return {"name": "envoy.filters.http.wasm", "typed_config": cfg}


# The callbacks a filter needs from Envoy when it reads and changes request
# and response headers, pauses for request bodies and trailers, makes gRPC
# calls and keeps per-stream state until `on_delete`. Left out: the response
# body and trailers, `on_log`, metadata, network and HTTP-call callbacks.
NEEDED_EXPORTS = [
    "proxy_abi_version_0_2_1", "_initialize", "proxy_on_memory_allocate", "proxy_on_vm_start",
    "proxy_on_configure", "proxy_on_tick", "proxy_on_context_create", "proxy_on_request_headers",
    "proxy_on_request_body", "proxy_on_request_trailers", "proxy_on_response_headers", "proxy_on_done",
    "proxy_on_delete", "proxy_on_grpc_receive", "proxy_on_grpc_close",
    "proxy_on_grpc_receive_initial_metadata", "proxy_on_grpc_receive_trailing_metadata",
]


def native_module(name, so, configuration):
    """A dynamic-module HTTP filter loading `so` with `configuration` as its filter config."""
    return {"name": "envoy.filters.http.dynamic_modules", "typed_config": {
        "@type": h.NATIVE_TYPE,
        "dynamic_module_config": {"module": {"local": {"filename": str(so)}}},
        "filter_name": name,
        "filter_config": {"@type": h.STRING_VALUE_TYPE, "value": configuration},
    }}


def capability_restriction(wasm):
    """Envoy's `capability_restriction_config` allowing every host function the
    module imports and only the callbacks in NEEDED_EXPORTS: Envoy does not
    enter the VM for a callback that is not allowed."""
    return {"allowed_capabilities": {name: {} for name in wasm_imports(wasm) + NEEDED_EXPORTS}}


def wasm_imports(path):
    """Names of the functions a Wasm module imports (its import section)."""
    data = Path(path).read_bytes()

    def leb(i):
        value, shift = 0, 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, i

    def name(i):
        n, i = leb(i)
        return data[i:i + n].decode(), i + n

    i, names = 8, []
    while i < len(data):
        section = data[i]
        size, i = leb(i + 1)
        if section == 2:
            count, j = leb(i)
            for _ in range(count):
                _module, j = name(j)
                field, j = name(j)
                kind = data[j]
                j += 1
                if kind == 0:  # function: type index
                    _, j = leb(j)
                    names.append(field)
                elif kind == 1:  # table: element type, limits
                    flags, j = leb(j + 1)
                    _, j = leb(j)
                    if flags & 1:
                        _, j = leb(j)
                elif kind == 2:  # memory: limits
                    flags, j = leb(j)
                    _, j = leb(j)
                    if flags & 1:
                        _, j = leb(j)
                elif kind == 3:  # global: value type, mutability
                    j += 2
            return names
        i += size
    return names


def native_filters():
    header = lambda name, prefix: {"header": {"name": name, "string_match": {"prefix": prefix}}}  # noqa: E731
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {"acme-eu-read": {
                "permissions": [{"and_rules": {"rules": [
                    {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                    {"url_path": {"path": {"prefix": "/"}}},
                ]}}],
                "principals": [{"and_ids": {"ids": [
                    header("x-tenant", "/acme/eu"),
                    header("x-user-tenant", "/acme/eu"),
                    {"header": {"name": "x-user", "present_match": True}},
                ]}}],
            }}},
        },
    }
    ratelimit = {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "bench_ratelimit",
            "token_bucket": {"max_tokens": 100000000, "tokens_per_fill": 100000000, "fill_interval": "1s"},
            "filter_enabled": {"runtime_key": "rl_enabled",
                               "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"runtime_key": "rl_enforced",
                                "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        },
    }
    return [rbac, ratelimit]


def bootstrap(listen, admin, filters, clusters=()):
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {"name": "local", "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}],
        }]},
        "http_filters": filters + [router],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{
            "name": "bench",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }], "clusters": list(clusters)},
    }


def bench_bundle(src, out, work, limits=True, fleet=None):
    """A bundle of `src` with the benchmark's two setting changes (see the docstring).
    With `limits=False` every limit is removed: the policy part alone, for the
    profile of where the time goes (config f). With `fleet="per_request"` the
    fleet limit `rpm` of /acme is enforced per request through tenantgate-rls
    (config g), with a rate no run reaches; with `fleet="assigned"` by the
    rates tenantgate-rls assigns over RLQS (configs h and o)."""
    tree = h.copy_policies(work / f"tree-{out}", src)
    h.edit_settings(tree, audit=AUDIT)
    if fleet == "per_request":
        h.edit_settings(tree, rate_limit_service={"cluster": "tenantgate_rls", "timeout_ms": 1000})
    elif fleet == "assigned":
        h.edit_settings(tree, rate_limit_service={"cluster": "tenantgate_rls", "mode": "assigned",
                                                  "report_interval_ms": 500})
    if not limits:
        for f in (tree / "tenants").rglob("tenant.json"):
            cfg = json.loads(f.read_text())
            cfg.pop("limits", None)
            f.write_text(json.dumps(cfg))
        return h.make_bundle(tree, work / f"{out}.json")
    root = tree / "tenants" / "tenant.json"
    cfg = json.loads(root.read_text())
    cfg.setdefault("limits", {})["rps"] = {"rate": 100_000_000, "per": "1s", "burst": 100_000_000}
    root.write_text(json.dumps(cfg))
    acme = tree / "tenants" / "acme" / "tenant.json"
    if acme.exists():
        cfg = json.loads(acme.read_text())
        if "daily" in cfg.get("limits", {}):
            cfg["limits"]["daily"] = {"rate": 1_000_000_000_000, "per": "1d"}
        if "rpm" in cfg.get("limits", {}):
            cfg["limits"]["rpm"] = {"rate": 1_000_000_000_000, "per": "1m", "scope": "fleet"}
        acme.write_text(json.dumps(cfg))
    return h.make_bundle(tree, work / f"{out}.json")


def parse_duration_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(port, path, headers, duration, script=None):
    """One wrk run (pinned to WRK_CPU); `script` is a wrk Lua script (e.g. a POST body)."""
    cmd = ["taskset", "-c", WRK_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency", "--timeout", "5s"]
    if script:
        cmd += ["-s", str(script)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return {
        "rps": float(rps.group(1)),
        "p50_ms": parse_duration_ms(p50.group(1)),
        "p99_ms": parse_duration_ms(p99.group(1)),
        "requests": int(total.group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def decision_quantiles(envoy):
    """P50/P99 of tenantgate.decision_us from the admin /stats (cumulative)."""
    _, text = envoy.admin("/stats?filter=decision_us")
    m = re.search(r"decision_us: P0\(.*?\) .*?P50\(([\d.nan]+),([\d.nan]+)\).*?P99\(([\d.nan]+),([\d.nan]+)\)", text)
    if not m:
        return None
    try:
        return {"p50_us": float(m.group(2)), "p99_us": float(m.group(4))}
    except ValueError:
        return None


def rls_cluster(port):
    return {"name": "tenantgate_rls", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "tenantgate_rls", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}}


class FleetService:
    """Redis and tenantgate-rls (release build) on the load generator's CPU, for config g."""

    def __init__(self, bundle, work):
        self.bundle, self.work = bundle, work
        self.redis_port, self.port = h.free_port(), h.free_port()
        self.procs = []

    def __enter__(self):
        rls = Path(os.environ.get("TENANTGATE_RLS", h.REPO / "target" / "release" / "tenantgate-rls"))
        self.procs.append(subprocess.Popen(
            ["taskset", "-c", WRK_CPU, "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        h.wait_port(self.redis_port, 10, self.procs[-1], "redis-server")
        self.procs.append(subprocess.Popen(
            ["taskset", "-c", WRK_CPU, str(rls), "--bundle", str(self.bundle),
             "--redis", f"redis://127.0.0.1:{self.redis_port}/", "--listen", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        h.wait_port(self.port, 20, self.procs[-1], "tenantgate-rls")
        return self

    def __exit__(self, *exc):
        for p in reversed(self.procs):
            h._stop(p)


def run_one(key, setup, work, round_no):
    filters, path, headers = setup[:3]
    fleet_bundle = setup[3] if len(setup) > 3 else None
    if fleet_bundle:
        with FleetService(fleet_bundle, work) as svc:
            return run_envoy(key, (filters, path, headers), work, round_no, [rls_cluster(svc.port)])
    return run_envoy(key, (filters, path, headers), work, round_no, [])


def run_envoy(key, setup, work, round_no, clusters):
    filters, path, headers = setup
    listen, admin = h.free_port(), h.free_port()
    config = json.dumps(bootstrap(listen, admin, filters, clusters))
    envoy = h.Envoy(config, work, name=f"{key}-r{round_no}", concurrency=1, admin_port=admin,
                    listen_port=listen, cpus=ENVOY_CPU, log_level="warn")
    envoy.start(timeout=180)
    try:
        probe = envoy.request("GET", path, headers)
        if probe.status != 200:
            raise RuntimeError(f"config {key}: probe answered {probe.status}: {probe.body[:300]!r}")
        if WARMUP > 0:
            wrk(listen, path, headers, WARMUP)
        result = wrk(listen, path, headers, DURATION)
        if key in ("d", "e", "f", "g"):
            time.sleep(5.5)  # histograms reach the admin output at the stats flush
            result["decision"] = decision_quantiles(envoy)
        return result
    finally:
        envoy.stop()


def main():
    work = h.tempdir("tenantgate-bench-")
    wasm = h.wasm_path().resolve()
    noop = Path(os.environ.get("NOOP_WASM", h.REPO / "target" / "noop-filter" / "wasm32-wasip1" / "release"
                               / "tenantgate_noop_filter.wasm")).resolve()
    native = h.native_path().resolve()
    noop_native = Path(os.environ.get("NOOP_NATIVE", h.REPO / "target" / "noop-native" / "release"
                                      / "libtenantgate_noop.so")).resolve()
    large_tree = Path(os.environ.get("LARGE_TREE", work / "large"))
    if not large_tree.exists():
        subprocess.run([sys.executable, str(h.ENVOY_DIR / "gen_large_policies.py"), str(large_tree)], check=True)
    print(f"bench: bundling policies/ and the large tree ({large_tree})", file=sys.stderr)
    small = bench_bundle(h.POLICIES, "bundle-policies", work)
    large = bench_bundle(large_tree, "bundle-large", work)
    nolimits = bench_bundle(h.POLICIES, "bundle-nolimits", work, limits=False)
    fleet = bench_bundle(h.POLICIES, "bundle-fleet", work, fleet="per_request")
    fleet_path = work / "bundle-fleet.json"
    assigned = bench_bundle(h.POLICIES, "bundle-assigned", work, fleet="assigned")
    assigned_path = work / "bundle-assigned.json"
    setups = {
        "a": ([], "/orders/1", ACME),
        "b": (native_filters(), "/orders/1", ACME),
        "c": ([wasm_filter("noop", noop, "")], "/orders/1", ACME),
        "d": ([wasm_filter("tenantgate", wasm, small)], "/orders/1", ACME),
        "e": ([wasm_filter("tenantgate", wasm, large)], "/api/v1/items/42", LARGE),
        "f": ([wasm_filter("tenantgate", wasm, nolimits)], "/orders/1", ACME),
        "g": ([wasm_filter("tenantgate", wasm, fleet)], "/orders/1", ACME, fleet_path),
        "n": ([native_module("noop", noop_native, "")], "/orders/1", ACME),
        "m": ([native_module("tenantgate", native, small)], "/orders/1", ACME),
        "h": ([wasm_filter("tenantgate", wasm, assigned)], "/orders/1", ACME, assigned_path),
        "o": ([native_module("tenantgate", native, assigned)], "/orders/1", ACME, assigned_path),
    }
    setups["c_cap"] = ([wasm_filter("noop", noop, "", restricted=True)], "/orders/1", ACME)
    setups["d_cap"] = ([wasm_filter("tenantgate", wasm, small, restricted=True)], "/orders/1", ACME)
    stage_dir = os.environ.get("BENCH_STAGE_DIR")
    for stage in STAGES if stage_dir else []:
        stage_wasm = Path(stage_dir) / f"tenantgate-{stage}.wasm"
        setups[f"s_{stage}"] = ([wasm_filter("tenantgate", stage_wasm, small)], "/orders/1", ACME)
    if CALIBRATE:
        for kind in CALL_KINDS:
            setups[f"k_{kind}"] = ([wasm_filter("noop", noop, f"{kind}:{CALLS}")], "/orders/1", ACME)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"bench: WARNING: load average {load:.2f} before the run: other processes share the 2 CPUs, "
              "expect noisy numbers (compare ratios of the same round)", file=sys.stderr)
    only = os.environ.get("BENCH_ONLY")
    optional = {"c_cap", "d_cap"}  # run when named in BENCH_ONLY
    keys = [k for k in setups if (k in only.split(",") if only else k not in optional)]
    print(f"bench: {ROUNDS} rounds x {len(keys)} configs, wrk -t1 -c{CONNECTIONS} -d{DURATION}s "
          f"(+{WARMUP}s warm-up), Envoy --concurrency 1 on CPU {ENVOY_CPU}, wrk on CPU {WRK_CPU}", file=sys.stderr)
    results = {k: [] for k in keys}
    for r in range(ROUNDS):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            res = run_one(k, setups[k], work, r)
            results[k].append(res)
            dec = res.get("decision")
            print(f"round {r + 1} {k} {NAMES[k]:<17} {res['rps']:>9.0f} rps  p50 {res['p50_ms']:.3f} ms  "
                  f"p99 {res['p99_ms']:.3f} ms  non-2xx {res['non2xx']}"
                  + (f"  decision p50 {dec['p50_us']:.0f} us p99 {dec['p99_us']:.0f} us" if dec else ""),
                  flush=True)
    summary = {}
    for k in keys:
        name = NAMES[k]
        runs = results[k]
        summary[f"{name}_rps"] = round(statistics.median(x["rps"] for x in runs))
        summary[f"{name}_p50_ms"] = round(statistics.median(x["p50_ms"] for x in runs), 3)
        summary[f"{name}_p99_ms"] = round(statistics.median(x["p99_ms"] for x in runs), 3)
        bad = sum(x["non2xx"] for x in runs)
        if bad:
            summary[f"{name}_non2xx"] = bad
            print(f"bench: WARNING: {name} answered {bad} non-2xx responses", file=sys.stderr)
        decs = [x["decision"] for x in runs if x.get("decision")]
        if decs:
            summary[f"{name}_decision_p50_us"] = round(statistics.median(d["p50_us"] for d in decs), 1)
            summary[f"{name}_decision_p99_us"] = round(statistics.median(d["p99_us"] for d in decs), 1)

    def ratio(a, b):
        if f"{a}_rps" in summary and f"{b}_rps" in summary and summary[f"{b}_rps"]:
            return round(summary[f"{a}_rps"] / summary[f"{b}_rps"], 3)
        return None

    ratios = {
        "native/baseline": ratio("native", "baseline"),
        "wasm_floor/baseline": ratio("wasm_floor", "baseline"),
        "tenantgate/baseline": ratio("tenantgate", "baseline"),
        "tenantgate/wasm_floor (target >= 0.90)": ratio("tenantgate", "wasm_floor"),
        "tenantgate_large/tenantgate (target >= 0.95)": ratio("tenantgate_large", "tenantgate"),
        "native_floor/baseline": ratio("native_floor", "baseline"),
        "tenantgate_native/baseline": ratio("tenantgate_native", "baseline"),
        "tenantgate_native/native_floor (target >= 0.90)": ratio("tenantgate_native", "native_floor"),
        "tenantgate_native/native (target >= 1.0: RBAC + local_ratelimit)": ratio("tenantgate_native", "native"),
        "tenantgate_native/tenantgate (native build over Wasm build)": ratio("tenantgate_native", "tenantgate"),
        "tenantgate_assigned/tenantgate (target >= 0.95: fleet HTB by assigned rates)":
            ratio("tenantgate_assigned", "tenantgate"),
        "tenantgate_native_assigned/tenantgate_native (target >= 0.95)":
            ratio("tenantgate_native_assigned", "tenantgate_native"),
        "tenantgate_nolimits/wasm_floor (policy part only)": ratio("tenantgate_nolimits", "wasm_floor"),
        "tenantgate_fleet/tenantgate (a per_request fleet check)": ratio("tenantgate_fleet", "tenantgate"),
        "wasm_floor_restricted/wasm_floor (capability restriction on the floor)":
            ratio("wasm_floor_restricted", "wasm_floor"),
        "tenantgate_restricted/wasm_floor_restricted (both restricted)":
            ratio("tenantgate_restricted", "wasm_floor_restricted"),
        "tenantgate_restricted/tenantgate (capability restriction on tenantgate)":
            ratio("tenantgate_restricted", "tenantgate"),
    }
    for name, value in ratios.items():
        if value is not None:
            print(f"  {name}: {value}")
    if "wasm_floor_rps" in summary:
        floor_us = 1e6 / summary["wasm_floor_rps"]
        for kind in CALL_KINDS:
            rps = summary.get(f"calls_{kind}_rps")
            if rps:
                cost = (1e6 / rps - floor_us) / CALLS
                summary[f"call_us_{kind}"] = round(cost, 3)
                print(f"  one `{kind}` call: {cost:.3f} us", file=sys.stderr)
    if "wasm_floor_rps" in summary:
        # Where the time of a request goes: each stage's microseconds over the
        # floor (measuring builds of envoy/bench_stages.sh), then the whole.
        for name in [f"stage_{st}" for st in STAGES] + ["tenantgate"]:
            rps = summary.get(f"{name}_rps")
            if rps:
                summary[f"{name}_us_over_floor"] = round(1e6 / rps - 1e6 / summary["wasm_floor_rps"], 2)
    summary["ratio_tenantgate_over_wasm_floor"] = ratios["tenantgate/wasm_floor (target >= 0.90)"]
    summary["ratio_native_over_native_floor"] = ratios["tenantgate_native/native_floor (target >= 0.90)"]
    summary["ratio_native_over_rbac"] = ratios["tenantgate_native/native (target >= 1.0: RBAC + local_ratelimit)"]
    summary["ratio_large_over_tenantgate"] = ratios["tenantgate_large/tenantgate (target >= 0.95)"]
    summary.update({"rounds": ROUNDS, "duration_s": DURATION, "connections": CONNECTIONS, "audit": AUDIT,
                    "load_before": round(load, 2)})
    print(json.dumps(summary, separators=(", ", ": ")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
