"""`mlkd serve`: a real uvicorn server on 127.0.0.1, real HTTP clients. Its answers equal `mlkd.load(...).predict`
on the same bytes, concurrent requests are batched, hostile requests get their 4xx and change nothing, the queue
and the upload limit hold, and the server starts and stops cleanly."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlkd
from mlkd.proposals.attach import open_split

pytest.importorskip("fastapi", reason="the serve extra (pip install 'mlkd[serve]') is not installed")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from mlkd.serve.app import ServeSettings, create_app  # noqa: E402
from mlkd.serve.batcher import Batcher, QueueFull  # noqa: E402


class Running:
    """A uvicorn server in a thread on 127.0.0.1 (a free port), stopped and joined on exit."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        host, self.port = self.server.servers[0].sockets[0].getsockname()[:2]
        assert host == "127.0.0.1"
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"


def image_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


@pytest.fixture(scope="module")
def paths(trained) -> list[Path]:
    return [Path(r.path) for r in open_split(str(trained.data.val)).records][:12]


@pytest.fixture(scope="module")
def student(trained):
    return mlkd.load(trained.student)


@pytest.fixture(scope="module")
def server(student):
    with Running(create_app(student, ServeSettings(max_batch=8, max_wait_ms=20, max_queue=64,
                                                   max_upload_mb=1))) as running:
        yield running


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, timeout=60, **kwargs)


def test_health_readiness_and_model_description(server, student, trained):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}  # warmed up before serving
    model = httpx.get(server.url + "/v1/model").json()
    assert model["kind"] == "student" and model["classes"] == student.classes
    assert model["input"]["size"] == student.image_size and model["input"]["convention"] == "torchvision"
    assert model["precision"] == "fp32" and model["mlkd_version"] == mlkd.__version__
    assert model["dataset"]["num_images"] == json.loads(json.dumps(student.dataset))["num_images"]
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "top_k" in {p["name"] for p in spec["paths"]["/v1/predict"]["post"]["parameters"]}


def test_predict_equals_the_python_api_on_the_same_bytes(server, student, paths):
    for path in paths[:4]:
        raw = post(server.url + "/v1/predict", content=image_bytes(path), headers={"content-type": "image/png"})
        assert raw.status_code == 200, raw.text
        expected = student.predict(path)
        got = raw.json()["predictions"][0]
        assert list(got) == list(expected) and got == expected  # same classes, same order, same floats
    # several files in one multipart request, with options: what predict gives for the list
    files = [("file", (p.name, image_bytes(p), "image/png")) for p in paths[:5]]
    answer = post(server.url + "/v1/predict", files=files, params={"top_k": 3, "threshold": 0.2}).json()
    expected = student.predict(paths[:5], top_k=3, threshold=0.2)
    assert answer["names"] == [p.name for p in paths[:5]]
    for got, want in zip(answer["predictions"], expected):
        assert list(got) == list(want)
        np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=0, atol=1e-6)
    per_class = {c: 0.5 for c in student.classes}
    answer = post(server.url + "/v1/predict", files=files[:1], data={"threshold": json.dumps(per_class)}).json()
    assert answer["predictions"][0] == student.predict(paths[0], threshold=per_class)


def test_concurrent_requests_are_batched_and_their_answers_unchanged(student, paths):
    app = create_app(student, ServeSettings(max_batch=16, max_wait_ms=200, max_queue=64))
    with Running(app) as running:
        async def many() -> list:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(running.url + "/v1/predict", content=image_bytes(p),
                                                          headers={"content-type": "image/png"}) for p in paths))

        before = app.service.batcher.batches
        answers = asyncio.run(many())
        batches = app.service.batcher.batches - before
    assert all(a.status_code == 200 for a in answers)
    assert batches < len(paths), f"{len(paths)} concurrent requests ran in {batches} batches"
    for answer, path in zip(answers, paths):
        got, want = answer.json()["predictions"][0], student.predict(path)
        assert set(got) == set(want)
        np.testing.assert_allclose([got[c] for c in want], list(want.values()), rtol=0, atol=1e-6)


def test_a_full_queue_answers_503_with_retry_after_and_the_rest_are_served(trained, paths):
    slow = mlkd.load(trained.student)
    fast = slow.probabilities

    def probabilities(images, batch_size=32):
        time.sleep(1.0)  # a busy model: the queue fills behind it (all four arrive well within a call)
        return fast(images, batch_size)

    slow.probabilities = probabilities
    with Running(create_app(slow, ServeSettings(max_batch=1, max_wait_ms=0, max_queue=2))) as running:
        async def health(client) -> float:  # asked while the model is busy: the event loop is not blocked
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            assert (await client.get(running.url + "/healthz")).status_code == 200
            return time.perf_counter() - t0

        async def burst() -> tuple[list, float]:
            async with httpx.AsyncClient(timeout=60) as client:
                posts = [client.post(running.url + "/v1/predict", content=image_bytes(p),
                                     headers={"content-type": "image/png"}) for p in paths[:8]]
                *answers, waited = await asyncio.gather(*posts, health(client))
                return answers, waited

        answers, waited = asyncio.run(burst())
        assert waited < 0.3, f"/healthz took {waited:.2f} s while a batch ran"
        statuses = sorted(a.status_code for a in answers)
        # One image runs and two wait; the rest are refused. Whether the first was already taken off the queue
        # when the third arrived is up to the scheduler, so two or three are served, never fewer than the queue.
        served, refused = statuses.count(200), statuses.count(503)
        assert served >= 2 and refused >= len(answers) - 3 and served + refused == len(answers), statuses
        full = next(a for a in answers if a.status_code == 503)
        assert full.headers["retry-after"] == "1" and "at most 2" in full.json()["detail"]
        many = post(running.url + "/v1/predict", files=[("file", (p.name, image_bytes(p), "image/png"))
                                                        for p in paths[:3]])
        assert many.status_code == 413 and "at most 2" in many.json()["detail"]
        more = post(running.url + "/v1/predict", files=[("file", (p.name, image_bytes(p), "image/png"))
                                                        for p in paths[:6]])
        assert more.status_code == 413 and "at most 2" in more.json()["detail"]
        after = post(running.url + "/v1/predict", content=image_bytes(paths[0]), headers={"content-type": "image/png"})
        assert after.status_code == 200


def hostile_requests(url: str, good: bytes) -> list[tuple[str, int, dict]]:
    """(what, expected status, httpx.post keyword arguments)."""
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, "PNG")  # 81 M pixels, over the 64 Mi default, 80 KB compressed
    png = {"content-type": "image/png"}
    return [
        ("not an image", 400, dict(content=b"hello, not an image at all", headers=png)),
        ("a truncated PNG", 400, dict(content=good[: len(good) // 2], headers=png)),
        ("an empty body", 400, dict(content=b"", headers=png)),
        ("a decompression bomb", 413, dict(content=bomb.getvalue(), headers=png)),
        ("an upload over the limit", 413, dict(content=b"\0" * ((1 << 20) + 1), headers=png)),
        ("a JSON body", 415, dict(content=b"{}", headers={"content-type": "application/json"})),
        ("no content type", 415, dict(content=good, headers={"content-type": ""})),
        ("top_k=0", 422, dict(content=good, headers=png, params={"top_k": 0})),
        ("top_k=abc", 422, dict(content=good, headers=png, params={"top_k": "abc"})),
        ("top_k=1.5", 422, dict(content=good, headers=png, params={"top_k": "1.5"})),
        ("threshold=2", 422, dict(content=good, headers=png, params={"threshold": 2})),
        ("threshold=nan", 422, dict(content=good, headers=png, params={"threshold": "nan"})),
        ("threshold of an unknown class", 422, dict(content=good, headers=png,
                                                    params={"threshold": json.dumps({"no_such_class": 0.5})})),
        ("an unknown option", 422, dict(content=good, headers=png, params={"topk": 3})),
        ("a malformed multipart body", 400, dict(content=b"--xx\r\nnonsense",
                                                 headers={"content-type": "multipart/form-data; boundary=xx"})),
    ]


def test_hostile_requests_get_their_4xx_and_the_next_good_request_is_answered(server, student, paths):
    good = image_bytes(paths[0])
    expected = student.predict(paths[0])
    for what, status, kwargs in hostile_requests(server.url, good):
        answer = post(server.url + "/v1/predict", **kwargs)
        assert answer.status_code == status, f"{what}: {answer.status_code} {answer.text}"
        assert answer.json()["detail"], what
        if status == 422:
            assert answer.json()["field"] in ("top_k", "threshold", "topk"), what
        after = post(server.url + "/v1/predict", content=good, headers={"content-type": "image/png"})
        assert after.status_code == 200 and after.json()["predictions"][0] == expected, f"after {what}"
    detail = post(server.url + "/v1/predict", content=good, headers={"content-type": "image/png"},
                  params={"threshold": json.dumps({"no_such_class": 0.5})}).json()["detail"]
    assert "no_such_class" in detail
    # a teacher's endpoint on a student: 404 saying where to go
    answer = post(server.url + "/v1/detect", content=good, headers={"content-type": "image/png"})
    assert answer.status_code == 404 and "/v1/predict" in answer.json()["detail"]


def test_an_upload_declared_over_the_limit_is_refused_before_its_body_is_read(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Content-Length: 1000000000\r\n\r\n" + b"\0" * 1000)  # 1 GB declared, 1 KB sent
        reply = b""
        while chunk := s.recv(65536):  # the server answers and closes, the rest of the body unread
            reply += chunk
    assert reply.decode().startswith("HTTP/1.1 413") and "upload limit" in reply.decode()


def test_a_client_that_disconnects_does_not_stall_the_server(server, student, paths):
    good = image_bytes(paths[1])
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(good) + good)
        # closed without reading the answer
    answer = post(server.url + "/v1/predict", content=good, headers={"content-type": "image/png"})
    assert answer.status_code == 200 and answer.json()["predictions"][0] == student.predict(paths[1])


def test_metrics_count_requests_errors_batches_and_latency(server):
    post(server.url + "/v1/predict", content=b"not an image", headers={"content-type": "image/png"})
    text = httpx.get(server.url + "/metrics").text
    assert 'mlkd_requests_total{endpoint="/v1/predict",status="200"}' in text
    assert 'mlkd_requests_total{endpoint="/v1/predict",status="400"}' in text
    for name in ("mlkd_batch_size_bucket", "mlkd_request_seconds_bucket", "mlkd_queue_depth", "mlkd_images_total"):
        assert name in text


def test_the_page_is_served_self_contained(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "/v1/predict" in html and "/v1/model" in html
    assert "http://" not in html and "https://" not in html and "<link" not in html  # no CDN, fonts or scripts


def test_a_teacher_serves_detections_as_the_python_api_gives_them(trained, paths):
    det = mlkd.load(trained.teacher)
    with Running(create_app(det, ServeSettings())) as running:
        answer = post(running.url + "/v1/detect", content=image_bytes(paths[0]), headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        got, want = answer.json()["detections"][0], det.detect(paths[0])
        assert got["image_scores"] == want["image_scores"] and got["labels"] == list(want["labels"])
        np.testing.assert_array_equal(np.array(got["boxes"], np.float32).reshape(-1, 4), want["boxes"])
        np.testing.assert_array_equal(np.array(got["scores"], np.float32), want["scores"])
        assert httpx.get(running.url + "/v1/model").json()["kind"] == "teacher"
        assert post(running.url + "/v1/predict", content=b"x", headers={"content-type": "image/png"}).status_code == 404
        bad = post(running.url + "/v1/detect", content=image_bytes(paths[0]), headers={"content-type": "image/png"},
                   params={"score_threshold": 3})
        assert bad.status_code == 422 and bad.json()["field"] == "score_threshold"
        bad = post(running.url + "/v1/detect", content=image_bytes(paths[0]), headers={"content-type": "image/png"},
                   params={"max_detections": 0})
        assert bad.status_code == 422 and bad.json()["field"] == "max_detections"


# -- the batcher on its own ---------------------------------------------------------------------------------------
def test_the_batcher_batches_refuses_a_full_queue_and_skips_cancelled_requests():
    seen: list[list[int]] = []

    def run(values):
        time.sleep(0.05)
        seen.append(list(values))
        return [v * 10 for v in values]

    async def scenario():
        b = Batcher(run, max_batch=4, max_wait_ms=30, max_queue=6)
        await b.start()
        first = await asyncio.gather(*(b.submit([i]) for i in range(4)))
        assert first == [[0], [10], [20], [30]] and seen[0] == [0, 1, 2, 3]
        with pytest.raises(QueueFull, match="at most 6"):
            await b.submit(list(range(7)))
        assert b.waiting == 0  # nothing of the refused request was queued
        gone = asyncio.ensure_future(b.submit([100, 101]))
        await asyncio.sleep(0)  # queued
        gone.cancel()
        assert await b.submit([5]) == [50]
        assert [100, 101] not in seen and not any(100 in s for s in seen)  # the cancelled images never ran

        def fail(values):
            raise RuntimeError("the model failed")
        b.run = fail
        with pytest.raises(RuntimeError, match="the model failed"):
            await b.submit([1, 2])
        b.run = run
        assert await b.submit([7]) == [70]  # and it goes on
        await b.stop()

    asyncio.run(scenario())


def test_settings_and_the_missing_extra_are_clear_errors(monkeypatch):
    from mlkd.errors import BadInput, MlkdError
    from mlkd.serve import server

    with pytest.raises(BadInput, match="max_batch"):
        ServeSettings(max_batch=0)
    with pytest.raises(BadInput, match="max_upload_mb"):
        ServeSettings(max_upload_mb=0)
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and server.is_loopback("localhost")
    assert not server.is_loopback("0.0.0.0") and not server.is_loopback("192.168.1.4")
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(MlkdError, match=r"mlkd serve needs .*uvicorn.*pip install 'mlkd\[serve\]'"):
        server.require_extra()


def listening_on(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) with a socket listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.append(address)
    return found


def start_command(model: Path, *options: str) -> tuple[subprocess.Popen, int]:
    """``mlkd serve --model model options`` on a free port, once its /readyz answers 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlkd", "serve", "--model", str(model), "--port", str(port),
                             "--quiet", *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "not ready in 120 s"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM: uvicorn finishes what is in flight, runs the shutdown (the batcher stops, its thread is joined) and
    re-raises the signal, so the process ends as terminated by it, without a traceback."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, (proc.returncode, err)


def test_the_command_serves_on_loopback_and_stops_cleanly_on_sigterm(trained, student, paths):
    proc, port = start_command(trained.student, "--max-batch", "4")
    try:
        url = f"http://127.0.0.1:{port}"
        answer = post(url + "/v1/predict", content=image_bytes(paths[2]), headers={"content-type": "image/png"})
        assert answer.json()["predictions"][0] == student.predict(paths[2])
        assert listening_on(port) == ["0100007F"]  # 127.0.0.1 only (as /proc/net/tcp writes it), no IPv6
        # a second server on the same port: a clear error, not a traceback
        busy = subprocess.run([sys.executable, "-m", "mlkd", "serve", "--model", str(trained.student), "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
        assert busy.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        stop(proc)
    assert listening_on(port) == []  # the port is given back


def test_several_worker_processes_serve_the_same_answers(trained, student, paths):
    proc, port = start_command(trained.student, "--workers", "2")
    try:
        for path in paths[:4]:
            answer = post(f"http://127.0.0.1:{port}/v1/predict", content=image_bytes(path),
                          headers={"content-type": "image/png"})
            assert answer.status_code == 200 and answer.json()["predictions"][0] == student.predict(path)
    finally:
        stop(proc)
