#!/usr/bin/env python3
"""The benchmark behind envoy/bench_serve.sh: policy decisions per second and
p50/p99 latency of `tenantgate serve`, beside the filter's.

  http       wrk POSTs one request (alice reads /acme/eu/orders/1) to
             `POST /v1/decide` of `tenantgate serve` (a Lua script sets the body)
  ext_authz  wrk GETs through Envoy (1 worker) whose ext_authz filter asks
             `tenantgate serve --grpc`; Envoy and the service share CPU 0
  filter     the same GET through Envoy with tenantgate.wasm (envoy/bench.py's
             config f: the policy part alone)

Every route answers with a direct_response (no upstream). The bundle is
policies/ with envoy/bench.py's changes and no limits (the service does not
evaluate quotas, so the filter does not either here) and `audit: deny`.
Envoy and the service run on CPU 0, wrk on CPU 1 (taskset). One round of each,
BENCH_DURATION seconds (5) after a BENCH_WARMUP (1) warm-up. The last line of
output is one JSON object: rps, p50_ms and p99_ms of each configuration.
Environment: TENANTGATE_CLI (a release build: the script's caller builds it),
BENCH_DURATION, BENCH_WARMUP, BENCH_CONNECTIONS (32), BENCH_ONLY (e.g. "http").
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
import bench  # noqa: E402

DURATION = int(os.environ.get("BENCH_DURATION", "5"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "1"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
CPU, WRK_CPU = "0", "1"
SPEC = {"tenant": "/acme/eu", "method": "GET", "path": "/orders/1", "principal": "alice",
        "principal_tenant": "/acme/eu"}
LUA = f"""wrk.method = "POST"
wrk.body = '{json.dumps(SPEC)}'
wrk.headers["Content-Type"] = "application/json"
"""


def wrk(port, path, headers, duration, script=None):
    """bench.wrk, refusing a run with answers that were not 2xx."""
    result = bench.wrk(port, path, headers, duration, script)
    if result["non2xx"]:
        raise RuntimeError(f"{result['non2xx']} answers were not 2xx")
    return result


def serve(bundle, work):
    http, grpc = h.free_port(), h.free_port()
    cmd = ["taskset", "-c", CPU] + h.cli_command() + ["serve", str(bundle), "--http", f"127.0.0.1:{http}",
                                                        "--grpc", f"127.0.0.1:{grpc}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"))
    h.wait_port(http, 30, proc, "tenantgate serve")
    h.wait_port(grpc, 30, proc, "tenantgate serve")
    return proc, http, grpc


def envoy(work, name, filters, clusters=()):
    listen, admin = h.free_port(), h.free_port()
    config = bench.bootstrap(listen, admin, filters)
    config["static_resources"]["clusters"] = list(clusters)
    e = h.Envoy(json.dumps(config), work, name=name, concurrency=1, admin_port=admin, listen_port=listen,
                cpus=CPU, log_level="warn")
    return e.start(timeout=120)


def authz_filter(bundle):
    """The ext_authz filter and cluster as `tenantgate envoy --ext-authz` renders them."""
    out = subprocess.run(h.cli_command() + ["envoy", str(bundle), "--ext-authz", "127.0.0.1:1"],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    flt = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "tenantgate_authz")
    return flt, cluster


def main():
    work = h.tempdir("tenantgate-bench-serve-")
    bench.AUDIT = "deny"
    bundle_text = bench.bench_bundle(h.POLICIES, "bundle", work, limits=False)
    bundle = work / "bundle.json"
    script = work / "decide.lua"
    script.write_text(LUA)
    only = os.environ.get("BENCH_ONLY")
    keys = [k for k in ("http", "ext_authz", "filter") if not only or k in only.split(",")]
    print(f"bench_serve: wrk -t1 -c{CONNECTIONS} -d{DURATION}s (+{WARMUP}s warm-up) on CPU {WRK_CPU}; "
          f"Envoy (1 worker) and tenantgate serve on CPU {CPU}", file=sys.stderr)
    results = {}
    for key in keys:
        procs = []
        try:
            if key == "http":
                proc, http, _ = serve(bundle, work)
                procs.append(proc)
                req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/decide", json.dumps(SPEC).encode(),
                                             {"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    answer = json.loads(r.read())
                assert answer["decision"] == "allow", answer
                port, path, headers, s = http, "/v1/decide", {}, script
            else:
                if key == "ext_authz":
                    proc, _, grpc = serve(bundle, work)
                    procs.append(proc)
                    flt, cluster = authz_filter(bundle)
                    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
                        "socket_address"]["port_value"] = grpc
                    e = envoy(work, key, [flt], [cluster])
                else:
                    e = envoy(work, key, [bench.wasm_filter("tenantgate", h.wasm_path().resolve(), bundle_text)])
                procs.append(e)
                probe = e.request("GET", "/orders/1", bench.ACME)
                assert probe.status == 200, probe
                assert e.request("GET", "/orders/1", {"x-tenant": "/acme/us", "x-user": "gus",
                                                      "x-user-tenant": "/globex"}).status == 403
                port, path, headers, s = e.listen_port, "/orders/1", bench.ACME, None
            if WARMUP:
                wrk(port, path, headers, WARMUP, s)
            results[key] = wrk(port, path, headers, DURATION, s)
            print(f"bench_serve: {key}: {results[key]}", file=sys.stderr)
        finally:
            for p in procs:
                p.stop() if hasattr(p, "stop") else h._stop(p)
        time.sleep(0.5)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
