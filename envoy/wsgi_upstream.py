#!/usr/bin/env python3
"""A WSGI upstream (Python's reference server, wsgiref) that answers with the
CGI variables it built from the request headers.

    python3 envoy/wsgi_upstream.py --port 18082

Response (200, JSON): {"upstream": "wsgi", "environ": {"HTTP_X_TENANTGATE_PRINCIPAL": ...}}.
Like every CGI/WSGI/Rack server, wsgiref folds `-` and `_` in header names
into the same variable (`x_tenantgate_principal` and `x-tenantgate-principal`
both become `HTTP_X_TENANTGATE_PRINCIPAL`, joined with `,`): the test in
envoy/upstream_trust_test.py shows an upstream like this reads only what
tenantgate set. Standard library only; loopback only.
"""

import argparse
import json
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


def app(environ, start_response):
    doc = {"upstream": "wsgi", "environ": {k: v for k, v in environ.items() if k.startswith("HTTP_")}}
    out = json.dumps(doc, sort_keys=True).encode()
    start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(out)))])
    return [out]


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 256


class Quiet(WSGIRequestHandler):
    def log_message(self, fmt, *args):
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = make_server("127.0.0.1", args.port, app, server_class=Server, handler_class=Quiet)
    print(f"wsgi upstream listening on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
