#!/usr/bin/env python3
"""A CloudEvents receiver for samples/sink.yaml: prints each POST's body and answers 204.

    python3 samples/receiver.py [port]      (default 9900)
"""
import http.server
import json
import sys


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            event = json.loads(body)
            print(json.dumps(event, sort_keys=True), flush=True)
        except ValueError:
            print(f"not JSON: {body!r}", flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


port = int(sys.argv[1]) if len(sys.argv) > 1 else 9900
http.server.ThreadingHTTPServer(("127.0.0.1", port), Receiver).serve_forever()
