"""The baseline for scripts/bench_serve.sh: transformers' pipeline("fill-mask") served the usual
minimal way (the standard library's threading HTTP server, one pipeline call per request, batch
1), speaking masklm serve's POST /v1/fill-mask ({"inputs": text, "top_k": k} -> the pipeline's
JSON), so one load generator drives both.

    python scripts/serve_transformers.py --model HF_FOLDER --port 8090
"""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import pipeline


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    fill = pipeline("fill-mask", model=args.model, device="cpu")
    torch.set_grad_enabled(False)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the load generator's client

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            try:
                result = fill(body["inputs"], top_k=body.get("top_k", 5))
                status, payload = 200, json.dumps(result).encode()
            except Exception as e:  # the pipeline's own errors, answered as the API's
                status, payload = 422, json.dumps({"error": str(e)}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"serving {args.model} on http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
