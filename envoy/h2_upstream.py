#!/usr/bin/env python3
"""An HTTP/2 (cleartext) upstream that reports what it received, trailers included.

    .venv/bin/python envoy/h2_upstream.py --port 18081

For a gRPC call (`content-type: application/grpc...`) it answers like a gRPC
server: status 200, one message echoing the request's message, trailers
`grpc-status: 0`. For any other request it answers 200 with JSON:

    {"upstream": "h2", "method": ..., "path": ..., "headers": [[k, v], ...],
     "trailers": [[k, v], ...], "calls": N}

`calls` counts the streams this process has answered (gRPC ones included),
so a test can tell how many calls reached the upstream. Used by
envoy/upstream_trust_test.py for request trailers over HTTP/2 and for gRPC
clients through Envoy. Needs the `h2` package (installed into .venv by
scripts/test-envoy.sh). Loopback only.
"""

import argparse
import json
import socket
import struct
import sys
import threading

import h2.config
import h2.connection
import h2.events

CALLS = 0
LOCK = threading.Lock()


def answer(conn, stream_id, req):
    global CALLS
    with LOCK:
        CALLS += 1
        calls = CALLS
    headers = dict(req["headers"])
    if headers.get(b"content-type", b"").startswith(b"application/grpc"):
        # Echo the first message (5-byte prefix: compressed flag, length).
        body = req["body"]
        msg = body[5:5 + struct.unpack(">I", body[1:5])[0]] if len(body) >= 5 else b""
        conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        conn.send_data(stream_id, b"\x00" + struct.pack(">I", len(msg)) + msg)
        conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
        return
    doc = {
        "upstream": "h2",
        "method": headers.get(b":method", b"").decode(),
        "path": headers.get(b":path", b"").decode(),
        "headers": [[k.decode(), v.decode("latin-1")] for k, v in req["headers"]],
        "trailers": [[k.decode(), v.decode("latin-1")] for k, v in req["trailers"]],
        "calls": calls,
    }
    out = json.dumps(doc).encode()
    conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/json"),
                                  (b"content-length", str(len(out)).encode())])
    conn.send_data(stream_id, out, end_stream=True)


def serve(sock):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    streams = {}
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    streams[ev.stream_id] = {"headers": ev.headers, "body": b"", "trailers": []}
                elif isinstance(ev, h2.events.DataReceived):
                    streams.setdefault(ev.stream_id, {"headers": [], "body": b"", "trailers": []})
                    streams[ev.stream_id]["body"] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    streams.setdefault(ev.stream_id, {"headers": [], "body": b"", "trailers": []})
                    streams[ev.stream_id]["trailers"] = ev.headers
                elif isinstance(ev, h2.events.StreamEnded):
                    req = streams.pop(ev.stream_id, None)
                    if req is not None:
                        answer(conn, ev.stream_id, req)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    return
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
    except (OSError, h2.exceptions.ProtocolError):
        return
    finally:
        sock.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(256)
    print(f"h2 upstream listening on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    while True:
        sock, _ = srv.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
