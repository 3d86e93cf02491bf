#!/usr/bin/env python3
"""A site's auth service and identity provider for the tests, started by them on 127.0.0.1.

    auth_fixture.py [--cert CERT --key KEY] [--jwks FILE]

Prints its port on the first line of stdout, then serves:
  POST /auth       the auth service: {"allow": true, "user": ...} for a known token (the
                   password), {"allow": false} otherwise; its behaviour is set with /control
  GET  /jwks.json  the content of FILE (the test rewrites it to rotate keys)
  POST /control    {"mode": "ok" | "slow" | "error" | "refuse-status", "delay": seconds}
  GET  /stats      {"auth": calls, "jwks": calls, "max_in_flight": n, "last": last /auth body}
With --cert and --key it speaks HTTPS.
"""
import argparse
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# token -> (user, acl or None)
USERS = {
    "tok-bob": ("bob", None),
    "tok-alice": ("alice", None),
    "tok-carol": ("carol", [{"topic": "desk/#", "access": "read"}]),
}

state = {"mode": "ok", "delay": 0.0, "auth": 0, "jwks": 0, "in_flight": 0, "max_in_flight": 0, "last": None}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("content-length", "0"))
        return json.loads(self.rfile.read(n) or b"{}")

    def do_GET(self):
        if self.path == "/jwks.json":
            with lock:
                state["jwks"] += 1
            with open(args.jwks, "rb") as f:
                data = f.read()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/stats":
            with lock:
                self.answer(200, {k: state[k] for k in ("auth", "jwks", "max_in_flight", "last", "mode")})
        else:
            self.answer(404, {})

    def do_POST(self):
        if self.path == "/control":
            given = self.body()
            with lock:
                state["mode"] = given.get("mode", state["mode"])
                state["delay"] = float(given.get("delay", state["delay"]))
            self.answer(200, {})
            return
        if self.path != "/auth":
            self.answer(404, {})
            return
        request = self.body()
        with lock:
            state["auth"] += 1
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            state["last"] = request
            mode, delay = state["mode"], state["delay"]
        try:
            if mode == "slow":
                time.sleep(delay)
            if mode == "error":
                self.answer(500, {"error": "the site is down"})
                return
            if mode == "refuse-status":
                self.answer(403, {})
                return
            known = USERS.get(request.get("password") or "")
            if known is None:
                self.answer(200, {"allow": False, "reason": "unknown token"})
                return
            user, acl = known
            reply = {"allow": True, "user": user}
            if acl is not None:
                reply["acl"] = acl
            self.answer(200, reply)
        finally:
            with lock:
                state["in_flight"] -= 1


parser = argparse.ArgumentParser()
parser.add_argument("--cert")
parser.add_argument("--key")
parser.add_argument("--jwks")
args = parser.parse_args()
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
if args.cert:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
# Ends with the test: it closes stdin (or the process is killed).
threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
server.serve_forever()
