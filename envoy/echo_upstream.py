#!/usr/bin/env python3
"""The demo's upstream: answers every request with the request it received, as JSON.

    python3 envoy/echo_upstream.py --port 18080 [--host 127.0.0.1]

Response body (200, application/json):

    {"upstream": "echo", "method": "GET", "path": "/orders/1",
     "headers": {"x-tenantgate-tenant": "/acme/eu", ...}}

Header names are lowercased; a header sent several times is joined with ", ".
So the demo and the end-to-end tests can see exactly what tenantgate let through
and what it added or removed (`x-tenantgate-tenant`, `x-tenantgate-principal`).
Standard library only; loopback by default; HTTP/1.1 keep-alive for Envoy's pool.
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tenantgate-echo/1"

    def _echo(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        headers = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        payload = {
            "upstream": "echo",
            "method": self.command,
            "path": self.path,
            "headers": headers,
            "body_bytes": len(body),
        }
        out = (json.dumps(payload, sort_keys=True) + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def log_message(self, fmt, *args):  # quiet: the demo prints what matters
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Envoy's workers open connections in bursts under load; socketserver's
    # default backlog of 5 drops some, which Envoy reports as 503.
    request_queue_size = 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = Server((args.host, args.port), EchoHandler)
    print(f"echo upstream listening on {args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
