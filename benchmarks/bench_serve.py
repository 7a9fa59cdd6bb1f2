"""Load on `mlkd serve`, loopback only: N concurrent one-image clients for T seconds against a server this script
starts, against offline `mlkd.load(...).predict` on the same images and precision in batches of N.

After 5 s of warm-up load (not counted: the server meets its batch sizes once), phase 1 sends only good requests; phase 2 mixes in ~10 % hostile ones (not an image, a truncated file, a
decompression bomb, an upload over the limit, a wrong content type, a bad top_k, a threshold for an unknown
class). Reports requests/s and images/s, p50/p95/p99 latency, answers by status, the server's mean batch size
(from its /metrics) and its resident memory at the start and end of each phase.

Run: ``python benchmarks/bench_serve.py --model runs/demo/seed0/student_kd/last.pt --images runs/demo/data/val.jsonl
[--precision fp32|int8]
[--clients 16] [--seconds 60] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import torch
from PIL import Image

from _common import describe, emit_json, machine

import mlkd
from mlkd.proposals.attach import open_split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlkd", "serve", "--model", args.model, "--precision", args.precision,
           "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--max-upload-mb", "1", "--quiet", *(["--calibration", args.calibration] if args.calibration else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server was not ready within 300 s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(path: str, body: bytes, content_type: str) -> bytes:
    """One HTTP/1.1 POST, as bytes (keep-alive)."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def hostile(good: bytes) -> list[tuple[str, bytes]]:
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, "PNG")
    return [("not an image", request("/v1/predict", b"not an image", "image/png")),
            ("truncated", request("/v1/predict", good[: len(good) // 2], "image/png")),
            ("bomb", request("/v1/predict", bomb.getvalue(), "image/png")),
            ("over the upload limit", request("/v1/predict", b"\0" * (2 << 20), "image/png")),
            ("wrong content type", request("/v1/predict", b"{}", "application/json")),
            ("bad top_k", request("/v1/predict?top_k=0", good, "image/png")),
            ("unknown class", request("/v1/predict?threshold=" + quote(json.dumps({"nope": 0.5})), good, "image/png"))]


class Connection:
    """A keep-alive HTTP/1.1 connection with as little client work as possible: the load generator shares the
    machine with the server, and a heavy client (httpx: ~1.8 ms of CPU a request here) would take the server's CPU."""

    def __init__(self, port: int) -> None:
        self.port, self.reader, self.writer = port, None, None

    async def send(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.split(b": ", 1) for line in lines[1:] if b": " in line)
        fields = {k.lower(): v for k, v in fields.items()}
        body = await self.reader.readexactly(int(fields.get(b"content-length", b"0")))
        if fields.get(b"connection", b"").lower() == b"close":
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def load(port: int, images: list[bytes], clients: int, seconds: float, hostile_share: float) -> dict:
    """``clients`` one-image clients for ``seconds``, a share of their requests hostile."""
    latencies, statuses, bad_answers, good_images = [], {}, {}, 0
    kinds = hostile(images[0])
    goods = [request("/v1/predict", im, "image/png") for im in images]
    stop = time.monotonic() + seconds
    rng = random.Random(0)

    async def client(k: int) -> None:
        nonlocal good_images
        connection, i = Connection(port), k
        while time.monotonic() < stop:
            is_bad = rng.random() < hostile_share
            what, data = rng.choice(kinds) if is_bad else ("good", goods[i % len(goods)])
            t0 = time.perf_counter()
            try:
                status, body = await connection.send(data)
            except (OSError, asyncio.IncompleteReadError) as e:  # e.g. a connection closed mid-upload
                status = f"transport error ({type(e).__name__})"
                await connection.close()
            took = time.perf_counter() - t0
            key = f"{'hostile' if is_bad else 'good'} {status}"
            statuses[key] = statuses.get(key, 0) + 1
            if not is_bad:
                latencies.append(took)
                good_images += status == 200
            elif not (isinstance(status, int) and 400 <= status < 500):
                bad_answers[what] = bad_answers.get(what, 0) + 1
            i += clients
        await connection.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    took = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"seconds": took, "requests_per_s": sum(statuses.values()) / took, "images_per_s": good_images / took,
            "latency_ms": {q: float(np.percentile(lat, int(q[1:]))) for q in ("p50", "p95", "p99")} if lat.size else {},
            "answers": statuses, "hostile_not_4xx": bad_answers}


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    total = float(re.search(r"^mlkd_batch_size_sum ([0-9.e+]+)", text, re.M).group(1))
    count = float(re.search(r"^mlkd_batch_size_count ([0-9.e+]+)", text, re.M).group(1))
    return total, count


def offline(args: argparse.Namespace, paths: list[Path]) -> float:
    """Images/s of ``mlkd.load(...).predict`` on the same files, batches of ``--clients``, after one warm-up."""
    clf = mlkd.load(args.model, precision=args.precision, calibration=args.calibration)
    batch = paths[: args.clients]
    clf.predict(batch, batch_size=len(batch))
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min(args.seconds, 20) or done == 0:
        for start in range(0, len(paths), args.clients):
            chunk = paths[start:start + args.clients]
            clf.predict(chunk, batch_size=len(chunk))
            done += len(chunk)
    return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a student checkpoint or model folder")
    parser.add_argument("--images", required=True, help="a dataset spec of the images to send (their first 64), e.g. "
                                                        "runs/demo/data/val.jsonl")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--calibration", help="int8: the training images to calibrate on (default: the checkpoint's)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--hostile-share", type=float, default=0.1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = machine(torch.device("cpu"))
    print(describe(figures), flush=True)
    paths = [Path(r.path) for r in open_split(args.images).records][:64]
    images = [p.read_bytes() for p in paths]
    result = {**figures, "precision": args.precision, "clients": args.clients, "seconds": args.seconds,
              "offline_images_per_s": offline(args, paths)}
    print(f"offline mlkd.load(...).predict, batches of {args.clients}: {result['offline_images_per_s']:.1f} img/s",
          flush=True)
    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(load(port, images, args.clients, 5, 0.0))  # warm-up, not counted: batch sizes met once
        for phase, share in (("good", 0.0), ("mixed", args.hostile_share)):
            rss0, (s0, c0) = rss_mib(server.pid), batch_stats(url)
            out = asyncio.run(load(port, images, args.clients, args.seconds, share))
            s1, c1 = batch_stats(url)
            out.update(rss_start_mib=rss0, rss_end_mib=rss_mib(server.pid),
                       mean_batch=(s1 - s0) / max(c1 - c0, 1),
                       served_over_offline=out["images_per_s"] / result["offline_images_per_s"])
            result[phase] = out
            print(f"{phase}: {out['images_per_s']:.1f} img/s ({out['served_over_offline']:.2f}x offline), "
                  f"{out['requests_per_s']:.1f} req/s, latency p50/p95/p99 "
                  + "/".join(f"{v:.0f}" for v in out["latency_ms"].values()) + " ms, mean batch "
                  f"{out['mean_batch']:.1f}, RSS {out['rss_start_mib']:.0f} -> {out['rss_end_mib']:.0f} MiB, "
                  f"answers {out['answers']}, hostile not 4xx {out['hostile_not_4xx']}", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    if args.json:
        emit_json(result)


if __name__ == "__main__":
    main()
