"""uflow.service end to end: real `uflow serve` processes on loopback ports, driven with httpx (and Chromium where present).

Two server processes for the whole module: one open, one with a token (the
second is also the one stopped with SIGTERM, last).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

MAX_BODY_MB = 1
MAX_PIXELS = 1_000_000
TOKEN = "s3cret-token"
START_TIMEOUT_S = 90  # model load on a busy 2-core machine
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir: Path, log: Path, env_extra: dict[str, str] | None = None) -> Server:
    port = _free_port()
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "-m", "uflow", "serve", str(run_dir), "--port", str(port), "--device", "cpu", "--no-download",
           "--max-body-mb", str(MAX_BODY_MB), "--max-pixels", str(MAX_PIXELS), "--max-wait-ms", "20"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"uflow serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    _stop(server)
    pytest.fail(f"uflow serve did not answer /health within {START_TIMEOUT_S} s:\n{log.read_text()}")


def _stop(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    srv = _start(run_dir, tmp_path_factory.mktemp("serve") / "server.log")
    yield srv
    _stop(srv)


@pytest.fixture(scope="module")
def token_server(run_dir, tmp_path_factory):
    srv = _start(run_dir, tmp_path_factory.mktemp("serve-token") / "server.log", {"UFLOW_TOKEN": TOKEN})
    yield srv
    _stop(srv)


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def test_images(brick) -> list[Path]:
    return sorted((brick / "test").rglob("*.png"))


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _multipart(field: str, name: str, data: bytes) -> tuple[str, bytes]:
    """The Content-Type and body httpx would send for one file field, to send them in pieces."""
    request = httpx.Request("POST", "http://127.0.0.1/", files={field: (name, data)})
    return request.headers["content-type"], request.read()


def _metric(text: str, name: str) -> dict[tuple, float]:
    """Samples named ``name`` from Prometheus text: {(sorted labels): value}."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def _assert_one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and body["error"] and "\n" not in body["error"]
    assert "\n" not in response.text.strip()
    return body["error"]


# ---------------------------------------------------------------------------------------------- valid requests


def test_predict_gives_what_the_model_gives(server, client, model, test_images):
    expected = model.predict(test_images)
    for path, want in zip(test_images, expected):
        response = client.post(f"{server.url}/predict", files={"image": (path.name, path.read_bytes(), "image/png")})
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["path"] == path.name
        assert abs(got["score"] - want.score) < 1e-4
        assert got["label"] == want.label
        assert len(got["regions"]) == len(want.regions)
        assert [r["bbox"] for r in got["regions"]] == [list(r.bbox) for r in want.regions]
        assert (got["width"], got["height"]) == want.anomaly_map.shape[::-1]
        assert "mask" not in got and "overlay" not in got
    assert {p.label for p in expected} == {"normal", "anomalous"}, "the fixture should give both labels, or this test proves less"


def test_mask_and_overlay_are_pngs_of_the_image(server, client, model, test_images):
    path = next(p for p, pred in zip(test_images, model.predict(test_images)) if pred.regions)
    [want] = model.predict([path])
    response = client.post(f"{server.url}/predict", params={"mask": "true", "overlay": "true"}, files={"image": (path.name, path.read_bytes())})
    assert response.status_code == 200, response.text
    got = response.json()
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["mask"]))))
    picture = Image.open(io.BytesIO(base64.b64decode(got["overlay"])))
    assert picture.mode == "RGB" and picture.size == (got["width"], got["height"])
    assert mask.shape == want.mask.shape and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 0, want.mask)


def test_every_pillow_mode_is_scored_as_predict_scores_it(server, client, model, test_images, tmp_path):
    rgb = Image.open(test_images[0]).convert("RGB")
    cmyk = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(cmyk, quality=95)
    gray16 = tmp_path / "gray16.png"
    Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)).save(gray16)
    for path in (cmyk, gray16):
        [want] = model.predict([path])
        response = client.post(f"{server.url}/predict", files={"image": (path.name, path.read_bytes())})
        assert response.status_code == 200, response.text
        assert abs(response.json()["score"] - want.score) < 1e-4


def test_concurrent_requests_are_all_answered_and_batched(server, client, model, test_images):
    before = _metric(client.get(f"{server.url}/metrics").text, "uflow_batch_size_count")
    paths = [test_images[i % len(test_images)] for i in range(16)]
    expected = {p: pred.score for p, pred in zip(test_images, model.predict(test_images))}

    def post(path: Path) -> httpx.Response:
        return client.post(f"{server.url}/predict", files={"image": (path.name, path.read_bytes())})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, paths))
    assert [r.status_code for r in responses] == [200] * 16
    for path, response in zip(paths, responses):
        assert abs(response.json()["score"] - expected[path]) < 1e-4  # answers go to the request they belong to
    assert max(r.json()["batch_size"] for r in responses) > 1
    text = client.get(f"{server.url}/metrics").text
    batches = _metric(text, "uflow_batch_size_count")[()] - before.get((), 0.0)
    assert batches < 16  # 16 images in fewer model calls
    singles = _metric(text, "uflow_batch_size_bucket")[(("le", "1.0"),)]
    assert singles < _metric(text, "uflow_batch_size_count")[()]  # the histogram shows a batch of more than one


# ---------------------------------------------------------------------------------------------- bad uploads


def _bad_uploads(good: bytes) -> dict[str, tuple[dict, int, str]]:
    """name -> (httpx.post arguments, expected status, a word the error must contain)."""
    big_noise = np.random.default_rng(0).integers(0, 256, size=(700, 700, 3), dtype=np.uint8)  # about 1.4 MB as PNG
    return {
        "empty body": ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "empty"),
        "not multipart": ({"content": good, "headers": {"content-type": "image/png"}}, 415, "multipart"),
        "wrong field": ({"files": {"file": ("a.png", good)}}, 422, "'image'"),
        "text field": ({"data": {"image": "a.png"}, "files": {"note": ("n.txt", b"x")}}, 422, "'image'"),
        "empty file": ({"files": {"image": ("a.png", b"")}}, 422, "empty"),
        "not an image": ({"files": {"image": ("notes.png", b"these are not pixels")}}, 422, "notes.png"),
        "truncated": ({"files": {"image": ("cut.png", good[: len(good) // 2])}}, 422, "truncated"),
        "too many pixels": ({"files": {"image": ("huge.png", _png(np.zeros((1000, 1100), np.uint8)))}}, 413, "1100x1000"),
        "body over the limit": ({"files": {"image": ("noise.png", _png(big_noise))}}, 413, "limit"),
        "bad option": ({"files": {"image": ("a.png", good)}, "params": {"mask": "perhaps"}}, 422, "mask"),
    }


@pytest.mark.parametrize("kind", list(_bad_uploads(b"x")))
def test_bad_upload_gets_a_4xx_and_the_server_keeps_serving(server, client, test_images, kind):
    good = test_images[0].read_bytes()
    arguments, status, word = _bad_uploads(good)[kind]
    error = _assert_one_line_error(client.post(f"{server.url}/predict", **arguments), status)
    assert word in error
    assert client.post(f"{server.url}/predict", files={"image": ("ok.png", good)}).status_code == 200


def test_body_limit_holds_without_a_content_length(server, client, test_images):
    content_type, body = _multipart("image", "padded.png", test_images[0].read_bytes() + bytes(MAX_BODY_MB * 2**20))

    def chunks():  # a generator body goes out chunked, with no Content-Length to refuse it by
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    try:
        response = client.post(f"{server.url}/predict", content=chunks(), headers={"content-type": content_type})
    except httpx.WriteError:  # the server answered and closed before the client finished sending: also a refusal
        pass
    else:
        _assert_one_line_error(response, 413)
    assert client.get(f"{server.url}/health").status_code == 200
    assert any(labels == (("route", "/predict"), ("status", "413")) for labels in _metric(client.get(f"{server.url}/metrics").text, "uflow_requests_total"))


# ---------------------------------------------------------------------------------------------- the other endpoints


def test_model_shows_the_verified_promise(server, client, run_dir):
    described = client.get(f"{server.url}/model").json()
    recorded = json.loads((run_dir / "uflow.json").read_text())
    assert described["backbone"] == recorded["backbone"] and described["image_size"] == recorded["image_size"]
    promise = described["promise"]
    assert promise == recorded["calibration"]["promise"]
    for key in ("rate", "verification_rate", "verification_upper_95", "verification_images"):
        assert promise[key] is not None
    assert described["limits"]["max_pixels"] == MAX_PIXELS


def test_metrics_count_requests_and_flagged_images(server, client, test_images):
    before = _metric(client.get(f"{server.url}/metrics").text, "uflow_images_total")
    anomalous = [p for p in test_images if "good" not in p.parts]
    labels = [client.post(f"{server.url}/predict", files={"image": (p.name, p.read_bytes())}).json()["label"] for p in anomalous]
    after = _metric(client.get(f"{server.url}/metrics").text, "uflow_images_total")
    flagged = after.get((("label", "anomalous"),), 0) - before.get((("label", "anomalous"),), 0)
    assert flagged == labels.count("anomalous")
    text = client.get(f"{server.url}/metrics").text
    assert _metric(text, "uflow_request_seconds_count")[(("route", "/predict"),)] >= len(anomalous)
    assert _metric(text, "uflow_requests_total")[(("route", "/predict"), ("status", "200"))] >= len(anomalous)


def test_every_request_is_logged_on_one_line(server, client, test_images):
    client.post(f"{server.url}/predict", files={"image": ("logged-image.png", test_images[0].read_bytes())})
    deadline = time.monotonic() + 5
    while "logged-image.png" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in server.log.read_text().splitlines() if "logged-image.png" in line]
    assert len(lines) == 1 and "POST /predict 200" in lines[0] and "score" in lines[0]
    assert "serving" in server.log.read_text().splitlines()[0]


# ---------------------------------------------------------------------------------------------- token and shutdown


def test_token_is_required_where_it_is_set(token_server, client, test_images):
    url = token_server.url
    upload = {"image": ("a.png", test_images[0].read_bytes())}
    assert client.get(f"{url}/health").json() == {"status": "ok", "token_required": True}
    _assert_one_line_error(client.post(f"{url}/predict", files=upload), 401)
    _assert_one_line_error(client.post(f"{url}/predict", files=upload, headers={"Authorization": "Bearer wrong"}), 401)
    _assert_one_line_error(client.get(f"{url}/model"), 401)
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post(f"{url}/predict", files=upload, headers=good).status_code == 200
    assert client.get(f"{url}/model", headers=good).status_code == 200
    assert client.get(f"{url}/metrics").status_code == 200


def test_sigterm_answers_the_request_in_flight(token_server, client, test_images):
    """Stop the server while a request's body is half sent: it stops listening, answers the request, then exits."""
    content_type, body = _multipart("image", "last.png", test_images[0].read_bytes())
    release = threading.Event()

    def slow_body():
        yield body[: len(body) // 2]
        release.wait(timeout=30)
        yield body[len(body) // 2 :]

    answers: list[httpx.Response | BaseException] = []

    def send() -> None:
        try:
            headers = {"content-type": content_type, "Authorization": f"Bearer {TOKEN}"}
            answers.append(httpx.post(f"{token_server.url}/predict", content=slow_body(), headers=headers, timeout=60))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            answers.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            in_progress = _metric(client.get(f"{token_server.url}/metrics").text, "uflow_requests_in_progress")
            if in_progress.get((("route", "/predict"),), 0) >= 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the request never reached the server")
        token_server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # shutting down: new connections are refused
            try:
                httpx.get(f"{token_server.url}/health", timeout=1)
            except httpx.TransportError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the server kept accepting connections after SIGTERM")
    finally:
        release.set()
        sender.join(timeout=60)
    [answer] = answers
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == 200 and answer.json()["path"] == "last.png"
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is SIGTERM's.
    assert token_server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in token_server.log.read_text()


# ---------------------------------------------------------------------------------------------- the page, in a browser


def test_page_scores_a_dropped_image_in_chromium(server, model, test_images, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    screenshot = tmp_path / "page.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"{server.url}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('px')", timeout=15000)
            flagged = next(p for p, pred in zip(test_images, model.predict(test_images)) if pred.regions)
            page.set_input_files("#file", str(flagged))
            page.wait_for_function("document.getElementById('score').textContent !== ''", timeout=30000)
            page.wait_for_function("document.getElementById('overlay').complete", timeout=10000)
            assert page.evaluate("document.getElementById('overlay').naturalWidth") > 0
            assert page.evaluate("document.getElementById('mask').naturalWidth") > 0
            assert page.locator("#history li").count() == 1
            assert page.locator("#label").inner_text() == "anomalous"
            assert page.locator("#regions tbody tr").count() >= 1
            assert page.locator("#error").is_hidden()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 0
    if os.environ.get("UFLOW_SCREENSHOT"):  # to look at it: UFLOW_SCREENSHOT=/tmp/page.png pytest ...
        shutil.copy(screenshot, os.environ["UFLOW_SCREENSHOT"])
