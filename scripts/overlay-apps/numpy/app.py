"""A small numpy back end: one image filter + projection per request.

GET /health          -> ok (once the data is loaded)
GET /filter?k=5      -> box-blur the image with a k x k kernel, project a
                        256-row band through the weights, answer statistics
"""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np

IMAGE = np.load("image.npy")
WEIGHTS = np.load("weights.npy")


def box_blur(img, k):
    # Separable box filter through cumulative sums.
    pad = k // 2
    p = np.pad(img, pad, mode="edge")
    c = np.cumsum(np.cumsum(p, axis=0), axis=1)
    c = np.pad(c, ((1, 0), (1, 0)))
    h, w = img.shape
    s = c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]
    return s / (k * k)


class Handler(BaseHTTPRequestHandler):
    def answer(self, status, body, ctype="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/health":
            return self.answer(200, "ok", "text/plain")
        if url.path == "/filter":
            k = int(parse_qs(url.query).get("k", ["5"])[0])
            if not 1 <= k <= 63:
                return self.answer(400, json.dumps({"error": "k must be 1..63"}))
            t = time.perf_counter()
            blurred = box_blur(IMAGE, k)
            band = blurred[:256] @ WEIGHTS
            out = {
                "k": k,
                "mean": float(blurred.mean()),
                "std": float(blurred.std()),
                "band_norm": float(np.linalg.norm(band)),
                "ms": round((time.perf_counter() - t) * 1000, 1),
            }
            return self.answer(200, json.dumps(out))
        return self.answer(404, json.dumps({"error": "not found"}))

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    print(f"numpy app listening on {port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
