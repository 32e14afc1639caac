#!/usr/bin/env python3
"""Runs real Envoy with tenantgate for the demo, the end-to-end tests and the benchmark.

Standard library only. Everything listens on 127.0.0.1 with ports picked free at
run time; every process started here is stopped by the `with` block that
started it.

    python3 envoy/harness.py render envoy/envoy.yaml --bundle dist/bundle.json \
        [--wasm dist/tenantgate.wasm] [--listen 10000] [--admin 9901] [--upstream 18080]

Environment overrides: ENVOY_BIN (default .venv/bin/envoy), TENANTGATE_WASM
(default dist/tenantgate.wasm), TENANTGATE_CLI (default target/debug/tenantgate,
else `cargo run -q -p tenantgate-cli --`), TENANTGATE_BUILD (`wasm`, the
default, or `native`: every config this module renders then loads the native
build, TENANTGATE_NATIVE, default dist/libtenantgate.so, in place of the Wasm
filter).
"""

import argparse
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import unittest
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENVOY_DIR = REPO / "envoy"
POLICIES = REPO / "policies"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
NATIVE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"


# --------------------------------------------------------------------------
# Paths and tools


def envoy_bin():
    return Path(os.environ.get("ENVOY_BIN") or REPO / ".venv" / "bin" / "envoy")


def wasm_path():
    return Path(os.environ.get("TENANTGATE_WASM") or REPO / "dist" / "tenantgate.wasm")


def build():
    """Which build the suites run against: `wasm` (default) or `native` (TENANTGATE_BUILD)."""
    b = os.environ.get("TENANTGATE_BUILD") or "wasm"
    if b not in ("wasm", "native"):
        raise SystemExit(f"TENANTGATE_BUILD must be `wasm` or `native`, not `{b}`")
    return b


def native_path():
    return Path(os.environ.get("TENANTGATE_NATIVE") or REPO / "dist" / "libtenantgate.so")


def module_args():
    """`tenantgate envoy`'s flag for the build under test: `--wasm PATH` or `--native PATH`."""
    if build() == "native":
        return ["--native", str(native_path().resolve())]
    return ["--wasm", str(wasm_path().resolve())]


def stat_namespace():
    """Where Envoy puts the filter's metrics at /stats: `wasmcustom` (Wasm) or
    `dynamicmodulescustom` (native; at /stats/prometheus these keep Envoy's
    `envoy_` prefix, see docs/reference.md, "Native build")."""
    return "dynamicmodulescustom" if build() == "native" else "wasmcustom"


def series_stat(name, **tags):
    """A per-tenant or per-limit series' name at /stats, without the namespace:
    the Wasm filter's carries its tags in the name (`tenant=.=/acme;.;name`),
    the native build's has real labels, which /stats appends (`name.tenant./acme`)."""
    order = ("tenant", "parent", "limit", "reason", "bundle")
    items = [(t, tags[t]) for t in order if t in tags]
    if build() == "native":
        return name + "".join(f".{t}.{v}" for t, v in items)
    return "".join(f"{t}=.={v};.;" for t, v in items) + name


def prometheus_prefix():
    """What precedes `tenantgate_` at /stats/prometheus: nothing for the Wasm
    filter (Envoy strips `wasmcustom`), `envoy_dynamicmodulescustom_` for the
    native build (Envoy 1.40 does not strip the dynamic modules' namespace)."""
    return "envoy_dynamicmodulescustom_" if build() == "native" else ""


def refused_config_log():
    """What Envoy logs when a static config's filter refuses its bundle and
    Envoy fails closed (does not start)."""
    if build() == "native":
        return "Failed to initialize dynamic module"
    return "fail closed"


def native_gap(reason):
    """Marks a test the native build does not pass yet, for `reason` (the
    run prints it as a known gap, and says so when the test starts passing)."""
    def wrap(test):
        if build() != "native":
            return test
        test.__doc__ = f"native gap: {reason}"
        return unittest.expectedFailure(test)
    return wrap


def module_path():
    """The module the suites load: dist/tenantgate.wasm, or dist/libtenantgate.so."""
    return native_path() if build() == "native" else wasm_path()


def cli_command():
    """The `tenantgate` command as an argv prefix."""
    if os.environ.get("TENANTGATE_CLI"):
        return shlex.split(os.environ["TENANTGATE_CLI"])
    built = REPO / "target" / "debug" / "tenantgate"
    if built.exists():
        return [str(built)]
    return ["cargo", "run", "-q", "-p", "tenantgate-cli", "--"]


def make_bundle(policy_dir, out_path):
    """Bundles a policy folder with the CLI; returns the bundle text."""
    out_path = Path(out_path)
    cmd = cli_command() + ["bundle", str(policy_dir), "-o", str(out_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stdout}{proc.stderr}")
    return out_path.read_text()


def copy_policies(dest, src=POLICIES):
    """Copies a policy tree to `dest` (for bundle variants); returns the copy's path."""
    dest = Path(dest)
    shutil.copytree(src, dest)
    return dest


def edit_settings(policy_dir, **changes):
    """Rewrites `tenantgate.json` of a policy folder with `changes` applied."""
    path = Path(policy_dir) / "tenantgate.json"
    settings = json.loads(path.read_text()) if path.exists() else {}
    settings.update(changes)
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return settings


# --------------------------------------------------------------------------
# Config templates


def yaml_string(text):
    """A YAML double-quoted scalar holding `text` exactly (JSON escapes are not
    all YAML escapes for non-BMP and non-printable characters, so do it here)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029, 0xFEFF) or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        elif code > 0xFFFF:
            out.append(f"\\U{code:08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def yaml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (dict, list)):
        return yaml_string(json.dumps(value))
    return yaml_string(str(value))


def render(template, values):
    """Replaces every `{{NAME}}` of a template (text or path) with values[NAME]."""
    text = Path(template).read_text() if isinstance(template, Path) else template

    def sub(match):
        name = match.group(1)
        if name not in values:
            raise KeyError(f"template placeholder {{{{{name}}}}} has no value")
        return yaml_value(values[name])

    # Comment lines may mention placeholders: leave comments alone.
    lines = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("#"):
            lines.append(line)
        else:
            lines.append(re.sub(r"\{\{([A-Z_]+)\}\}", sub, line))
    text = "".join(lines)
    return to_native(text) if build() == "native" else text


def wasm_filter_config(bundle_text, wasm=None, name="tenantgate"):
    """The `envoy.filters.http.wasm` config (the typed_config body) as a dict."""
    return {
        "@type": WASM_TYPE,
        "config": {
            "name": name,
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": bundle_text},
            "vm_config": {
                "vm_id": name,
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": str(wasm or wasm_path())}},
            },
        },
    }


def native_filter_config(bundle_text, name="tenantgate"):
    """The `envoy.filters.http.dynamic_modules` config loading the native build."""
    return {
        "@type": NATIVE_TYPE,
        "dynamic_module_config": {"module": {"local": {"filename": str(native_path().resolve())}}},
        "filter_name": name,
        "filter_config": {"@type": STRING_VALUE_TYPE, "value": bundle_text},
    }


def filter_config(bundle_text, wasm=None, name="tenantgate"):
    """The filter config of the build under test (TENANTGATE_BUILD)."""
    if build() == "native":
        return native_filter_config(bundle_text, name)
    return wasm_filter_config(bundle_text, wasm, name)


_WASM_ITEM = re.compile(r"^(?P<ind>[ \t]*)- name: envoy\.filters\.http\.wasm[ \t]*$", re.M)


def to_native(text):
    """A rendered config with each Wasm filter of tenantgate replaced by the
    native build with the same bundle and name (and ECDS type URLs switched)."""
    out = []
    pos = 0
    for m in _WASM_ITEM.finditer(text):
        if m.start() < pos:
            continue
        ind = m.group("ind")
        lines = text[m.end() + 1:].split("\n")
        block = []
        for line in lines:
            if line.strip() and (len(line) - len(line.lstrip())) <= len(ind):
                break
            block.append(line)
        end = m.end() + 1 + sum(len(line) + 1 for line in block)
        body = "\n".join(block)
        value = re.search(r"configuration:\s*\n(?:.*\n)*?\s*value:[ \t]*(.+)", body)
        name = re.search(r"^\s*config:\s*\n(?:\s*#.*\n)*\s*name:[ \t]*(\S+)", body, re.M)
        if value is None:
            raise ValueError("to_native: a Wasm filter without `configuration.value`")
        native = [
            f"{ind}- name: envoy.filters.http.dynamic_modules",
            f"{ind}  typed_config:",
            f'{ind}    "@type": {NATIVE_TYPE}',
            f"{ind}    dynamic_module_config:",
            f"{ind}      module: {{ local: {{ filename: {yaml_string(str(native_path().resolve()))} }} }}",
            f"{ind}    filter_name: {name.group(1) if name else 'tenantgate'}",
            f"{ind}    filter_config:",
            f'{ind}      "@type": {STRING_VALUE_TYPE}',
            f"{ind}      value: {value.group(1)}",
        ]
        out.append(text[pos:m.start()])
        out.append("\n".join(native) + "\n")
        pos = min(end, len(text))
    out.append(text[pos:])
    return "".join(out).replace(WASM_TYPE, NATIVE_TYPE)


def write_ecds(path, bundle_text, version, wasm=None, name="tenantgate"):
    """Writes an ECDS DiscoveryResponse for the filter of the build under test
    atomically (temp + rename)."""
    path = Path(path)
    doc = {
        "version_info": version,
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": name,
                "typed_config": filter_config(bundle_text, wasm, name),
            }
        ],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# Processes


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout, proc=None, what="process"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def _stop(proc, grace=5.0):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


class Upstream:
    """The echo upstream (envoy/echo_upstream.py) on a free loopback port."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(ENVOY_DIR / "echo_upstream.py"), "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 10, self.proc, "echo upstream")
        return self

    def stop(self):
        _stop(self.proc)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Envoy:
    """One Envoy process with a rendered config, its log in `workdir`."""

    def __init__(self, config_text, workdir, name="envoy", concurrency=2, admin_port=None, listen_port=None,
                 cpus=None, log_level="info", wait_listener=True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        suffix = "json" if config_text.lstrip().startswith("{") else "yaml"
        self.config_path = self.workdir / f"{name}.{suffix}"
        self.config_path.write_text(config_text)
        self.log_path = self.workdir / f"{name}.log"
        self.concurrency = concurrency
        self.admin_port = admin_port
        self.listen_port = listen_port
        self.cpus = cpus
        self.log_level = log_level
        self.wait_listener = wait_listener
        self.proc = None

    def command(self):
        cmd = [
            str(envoy_bin()), "-c", str(self.config_path),
            "--concurrency", str(self.concurrency),
            "--disable-hot-restart",
            "--log-level", self.log_level,
            "--log-path", str(self.log_path),
            # flush the log often: the demo and tests read audit lines from it
            "--file-flush-interval-msec", "100",
        ]
        if self.cpus is not None:
            cmd = ["taskset", "-c", str(self.cpus)] + cmd
        return cmd

    def start(self, timeout=60):
        if not envoy_bin().exists():
            raise RuntimeError(f"{envoy_bin()} is missing: run scripts/install-envoy.sh")
        with open(self.workdir / f"{self.name}.stderr", "wb") as err:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with status {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                status, body = self.admin("/ready", timeout=1)
                if status == 200 and body.strip() == "LIVE":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"envoy not ready within {timeout}s; log:\n{self.log_tail()}")
            time.sleep(0.1)
        if self.wait_listener and self.listen_port:
            wait_port(self.listen_port, max(1.0, deadline - time.monotonic()), self.proc, "envoy listener")
        return self

    def stop(self):
        _stop(self.proc)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40):
        text = self.log()
        stderr = self.workdir / f"{self.name}.stderr"
        if stderr.exists():
            text += stderr.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def admin(self, path, timeout=5):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def stats(self, flt=None):
        """Envoy's /stats as {name: value} (counters and gauges; histograms as text)."""
        path = "/stats" + (f"?filter={flt}" if flt else "")
        _, body = self.admin(path)
        out = {}
        for line in body.splitlines():
            name, sep, value = line.partition(": ")
            if not sep:
                continue
            try:
                out[name] = int(value)
            except ValueError:
                out[name] = value
        return out

    def counter(self, name):
        return self.stats(f"^{re.escape(name)}$").get(name, 0)

    def prometheus(self):
        return self.admin("/stats/prometheus")[1]

    def request(self, method, path, headers=None, body=None, timeout=5):
        return request(self.listen_port, method, path, headers, body, timeout)


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lowercase name -> value (repeated ones joined with ", ")
        self.body = body

    def json(self):
        return json.loads(self.body.decode())

    def __repr__(self):
        return f"Response({self.status}, {self.headers}, {self.body[:300]!r})"


def request(port, method, path, headers=None, body=None, timeout=5, conn=None):
    """One HTTP/1.1 request; `path` is sent byte for byte (no normalization)."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        data = body.encode() if isinstance(body, str) else body
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if data is not None:
            conn.putheader("content-length", str(len(data)))
        conn.endheaders(data)
        resp = conn.getresponse()
        out = {}
        for k, v in resp.getheaders():
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return Response(resp.status, out, resp.read())
    finally:
        if own:
            conn.close()


def curl_line(port, method, path, headers=None, body=None):
    """The curl command that sends the same request (for narration)."""
    parts = ["curl", "-sS", "-i"]
    if method != "GET":
        parts += ["-X", method]
    if "/." in path or "%" in path or "//" in path:
        parts.append("--path-as-is")
    for k, v in (headers or {}).items():
        parts += ["-H", shlex.quote(f"{k}: {v}")]
    if body is not None:
        parts += ["--data", shlex.quote(body)]
    parts.append(shlex.quote(f"http://127.0.0.1:{port}{path}"))
    return " ".join(parts)


def tempdir(prefix):
    return Path(tempfile.mkdtemp(prefix=prefix))


# --------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description="Render an Envoy config template of envoy/.")
    sub = parser.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("render", help="render a template to standard output")
    r.add_argument("template", type=Path)
    r.add_argument("--bundle", type=Path, required=True)
    r.add_argument("--wasm", type=Path, default=None)
    r.add_argument("--listen", type=int, default=10000)
    r.add_argument("--admin", type=int, default=9901)
    r.add_argument("--upstream", type=int, default=18080)
    r.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="another placeholder")
    args = parser.parse_args(argv)
    values = {
        "LISTEN_PORT": args.listen,
        "ADMIN_PORT": args.admin,
        "UPSTREAM_PORT": args.upstream,
        "WASM_PATH": str((args.wasm or wasm_path()).resolve()),
        "BUNDLE_JSON": args.bundle.read_text(),
    }
    for item in args.set:
        k, _, v = item.partition("=")
        values[k] = v
    sys.stdout.write(render(args.template, values))


if __name__ == "__main__":
    main()


def wait_for(predicate, timeout=10.0, interval=0.1):
    """Polls `predicate` until it returns something true or `timeout` seconds
    pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def audit_lines(envoy):
    """The JSON audit lines tenantgate wrote to Envoy's log."""
    out = []
    for line in envoy.log().splitlines():
        start = line.find("{")
        if start < 0 or '"decision"' not in line:
            continue
        try:
            out.append(json.loads(line[start:]))
        except ValueError:
            pass
    return out


# --------------------------------------------------------------------------
# Running a test file


def run_tests(module, label, work):
    """Runs the unittest cases of `module` (after checking that the filter and
    Envoy are there) and prints `<label>: N passed, M failed[, K skipped]` as
    the last line. A test with failing subtests counts once. Returns the exit
    status: 0 all passed, 1 some failed, 2 something missing."""
    if not module_path().exists():
        script = "build-native.sh" if build() == "native" else "build-wasm.sh"
        print(f"{label}: {module_path()} is missing: run scripts/{script} (or scripts/test-envoy.sh)",
              file=sys.stderr)
        return 2
    label = f"{label} ({build()})"
    if not envoy_bin().exists():
        print(f"{label}: {envoy_bin()} is missing: run scripts/install-envoy.sh", file=sys.stderr)
        return 2
    argv = [sys.argv[0]] + sys.argv[1:]
    prog = unittest.main(module=module, argv=argv, exit=False, verbosity=2 if "-v" in argv else 1)
    result = prog.result
    failed = len({getattr(t, "test_case", t).id() for t, _ in result.failures + result.errors})
    failed += len(result.unexpectedSuccesses)
    known = len(result.expectedFailures)
    skipped = len(result.skipped) + known
    passed = result.testsRun - failed - skipped
    for test, _ in result.expectedFailures:
        print(f"{label}: known gap (expected failure, counted as skipped): {test.id()}")
    for test in result.unexpectedSuccesses:
        print(f"{label}: {test.id()} now passes: remove its @unittest.expectedFailure")
    print(f"{label}: Envoy logs and configs in {work}")
    sys.stderr.flush()
    print(f"{label}: {passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""), flush=True)
    return 0 if failed == 0 and result.testsRun > 0 else 1
