"""`cifar-pipeline app`: the HTTP API on a real server (uvicorn on 127.0.0.1), driven over HTTP, with the
smoke model trained on the shared CIFAR-10; the page in a real headless Chromium in `test_app_page.py`."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from flows.app import AppSettings, background_server, create_app
from model_lib.images import decode_files
from model_lib.predict import load_classifier, resolve_model
from model_lib.registry import Registry
from model_lib.versions import MANIFEST_FILE
from tests.flows.test_readme import readme_command

pytestmark = pytest.mark.real_data


def cifar_test_images(cifar_dir: Path, per_class: int) -> list[Path]:
    return [path for folder in sorted((cifar_dir / "test").iterdir()) for path in sorted(folder.iterdir())[:per_class]]


def upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", (path.name, path.read_bytes())) for path in paths]


@pytest.fixture
def model_root(tiny_on_real_cifar) -> str:
    return str(tiny_on_real_cifar[0])


def test_many_images_in_one_request_get_batch_predicts_answers_and_a_broken_file_its_own_error(model_root, cifar_dir):
    images = cifar_test_images(cifar_dir, 3)  # 30 real test photos
    settings = AppSettings(model="cifar10@champion", artifacts_root=model_root)
    with background_server(create_app(settings)) as url:
        files = [*upload(images[:15]), ("file", ("broken.jpg", b"\xff\xd8 not really a jpeg")), *upload(images[15:])]
        answer = httpx.post(f"{url}/api/predict", files=files, params={"top_k": 3}, timeout=60)
        health = httpx.get(f"{url}/api/health").json()
    assert answer.status_code == 200, answer.text
    rows = answer.json()["predictions"]
    names = [path.name for path in images]
    assert [row["path"] for row in rows] == [*names[:15], "broken.jpg", *names[15:]]
    broken = rows[15]
    assert broken["status"] == "error" and broken["label"] is None
    assert broken["error"].startswith("truncated or corrupt image") or "not an image" in broken["error"]
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) == 30 and {row["version"] for row in ok} == {"cifar10 v1"}

    # The same files through batch prediction's decoder and classifier: the same labels and probabilities.
    info = resolve_model("cifar10@champion", model_root)
    probabilities = load_classifier(info).predict_on_batch(decode_files(images, info.image_size).pixels)
    expected = [info.class_names[i] for i in probabilities.argmax(axis=1)]
    assert [row["label"] for row in ok] == expected
    np.testing.assert_allclose([row["top1_probability"] for row in ok], probabilities.max(axis=1), atol=1e-5)
    for row in ok:
        assert row["confidence"] == row["top1_probability"] >= row["top2_probability"] >= row["top3_probability"]
        assert (row["width"], row["height"]) == (32, 32) and row["error"] is None
    assert health["images"] == 30 and health["batches"] == 1  # the request's images in one model call


def test_concurrent_clients_are_classified_together_in_fewer_model_calls(model_root, cifar_dir):
    images = cifar_test_images(cifar_dir, 4)
    settings = AppSettings(model="cifar10@champion", artifacts_root=model_root)
    with background_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        start = threading.Barrier(8)

        def one(path: Path) -> str:
            if path in images[:8]:
                start.wait()
            return client.post("/api/predict", files=upload([path])).json()["predictions"][0]["label"]

        with ThreadPoolExecutor(8) as pool:
            labels = list(pool.map(one, images))
        health = client.get("/api/health").json()
    assert len(labels) == 40 and all(labels)
    assert health["images"] == 40 and health["batches"] < 40, health  # requests that met were batched


@pytest.mark.slow
def test_a_promotion_while_a_client_keeps_requesting_switches_the_version_without_an_error(
    tiny_on_real_cifar, cifar_dir, tmp_path
):
    root = tmp_path / "registry"
    shutil.copytree(tiny_on_real_cifar[0] / "models", root / "models")
    registry = Registry(str(root), "cifar10")
    v1 = registry.version_dir(1)
    recorded = json.loads((v1 / MANIFEST_FILE).read_text())
    manifest = {key: value for key, value in recorded.items() if key not in ("name", "version", "created_at", "files")}
    files = {name: v1 / name for name in recorded["files"]}
    assert registry.register(files, manifest, margin=1.0).version == 2  # a copy of v1, kept out of champion
    image = cifar_test_images(cifar_dir, 1)[0]
    settings = AppSettings(model="cifar10@champion", artifacts_root=str(root), reload_seconds=0.2)
    seen, failures, stop = [], [], threading.Event()
    with background_server(create_app(settings)) as url:

        def keep_asking() -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                while not stop.is_set():
                    answer = client.post("/api/predict", files=upload([image]))
                    if answer.status_code != 200:
                        failures.append(answer.text)
                    elif not seen or seen[-1] != answer.json()["version"]:
                        seen.append(answer.json()["version"])

        client = threading.Thread(target=keep_asking)
        client.start()
        try:
            _wait_for(lambda: seen == ["cifar10 v1"])
            registry.promote("v2", "test: promote while serving")
            _wait_for(lambda: seen[-1] == "cifar10 v2")
            registry.rollback("test: roll back while serving")
            _wait_for(lambda: seen[-1] == "cifar10 v1")
        finally:
            stop.set()
            client.join()
    assert failures == [] and seen == ["cifar10 v1", "cifar10 v2", "cifar10 v1"]


def _wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(0.05)


def test_tokens_limits_and_bad_requests_get_a_4xx_with_one_clear_sentence(model_root, cifar_dir):
    image = cifar_test_images(cifar_dir, 1)[0]
    bomb = io.BytesIO()  # 50 megapixels of one grey: a few hundred kilobytes as PNG
    Image.new("L", (7072, 7072), 128).save(bomb, "PNG")
    assert bomb.tell() < 1_000_000
    settings = AppSettings(model="cifar10@champion", artifacts_root=model_root, token="s3cret")
    with background_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        bearer = {"Authorization": "Bearer s3cret"}
        refused = client.post("/api/predict", files=upload([image]))
        assert refused.status_code == 401 and "token" in refused.json()["detail"]
        assert client.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/").status_code == 200  # the page itself asks for the token
        assert client.post("/api/predict", files=upload([image]), headers=bearer).status_code == 200

        big = client.post("/api/predict", files=[("file", ("big.jpg", b"\0" * 20_000_000))], headers=bearer)
        assert big.status_code == 413 and big.json()["detail"] == (
            "upload of 20.0 MB is over the limit of 10 MB per request"
        )
        huge = client.post("/api/predict", files=[("file", ("bomb.png", bomb.getvalue()))], headers=bearer)
        assert huge.status_code == 422
        assert huge.json()["detail"] == "bomb.png: 7072x7072 is 50.0 megapixels, over the limit of 25"
        text = client.post("/api/predict", files=[("file", ("notes.txt", b"hello"))], headers=bearer)
        assert text.status_code == 422 and text.json()["detail"] == "notes.txt: not an image (format not recognised)"
        nothing = client.post("/api/predict", data={"other": "x"}, headers=bearer)
        assert nothing.status_code == 422 and "multipart field 'file'" in nothing.json()["detail"]
        wrong_k = client.post("/api/predict", files=upload([image]), params={"top_k": 11}, headers=bearer)
        assert wrong_k.status_code == 422 and "top_k" in wrong_k.json()["detail"]
        plot = client.get("/api/models/cifar10/v1/plots/curves.png", params={"token": "s3cret"})
        assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
        assert client.get("/api/models/cifar10/v1/plots/model.keras", headers=bearer).status_code == 404
        assert "/api/predict" in client.get("/api/openapi.json", headers=bearer).json()["paths"]
        assert client.get("/api/docs", headers=bearer).status_code == 404  # no page of scripts from a CDN


def test_the_app_command_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    documented = readme_command("cifar-pipeline app --host")  # docs/app.md, run without its token
    env = {"ARTIFACTS_DIR": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    command = [sys.executable, "-c", "from flows.cli import main; main()", *documented]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: --host 0.0.0.0 listens beyond this machine: give a token (--token, or set CIFAR_PIPELINE_TOKEN) "
        "that every API call must carry"
    )


def test_only_the_names_it_serves_are_answered_so_a_rebound_dns_name_reads_nothing(artifacts, tmp_path):
    """A web page can point a name of its own at 127.0.0.1 (DNS rebinding) and read a token-less loopback app;
    its requests carry that name in Host. An untrained registered model is enough: no answer reaches the model."""
    from model_lib.models import build_model
    from tests.registered import register_keras_model

    register_keras_model(artifacts, build_model("seed_cnn", 10), tmp_path)
    settings = AppSettings(artifacts_root=str(artifacts))
    with background_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        port = url.rsplit(":", 1)[1]
        for name in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST"):
            assert client.get("/api/models", headers={"Host": name}).status_code == 200, name
        for name in (f"attacker.example:{port}", "localhost.attacker.example", ""):
            refused = client.get("/api/models", headers={"Host": name})
            assert refused.status_code == 400 and "is not a name this app serves" in refused.json()["detail"], name
        assert client.get("/", headers={"Host": "attacker.example"}).status_code == 400  # the page too
        # A page elsewhere can post a form to the app through the browser: only the app's own page may.
        files = [("file", ("a.png", b"not an image"))]
        foreign = client.post("/api/predict", files=files, headers={"Origin": "http://attacker.example"})
        assert foreign.status_code == 403 and "only this app's own page" in foreign.json()["detail"]
        own = client.post("/api/predict", files=files, headers={"Origin": url})
        assert own.status_code == 422, own.text  # through to the model: the image is refused, not the request
    named = AppSettings(artifacts_root=str(artifacts), allowed_hosts=("ml-box.lan",))
    with background_server(create_app(named)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/api/models", headers={"Host": "ml-box.lan:8000"}).status_code == 200
        assert client.get("/api/models", headers={"Host": "other.lan"}).status_code == 400


def test_a_client_that_drops_its_upload_part_way_leaves_no_traceback(artifacts, tmp_path, caplog):
    """A closed tab or a flaky network: 900 drops once made 55,866 lines of ClientDisconnect tracebacks."""
    import logging
    import socket

    from model_lib.models import build_model
    from tests.registered import register_keras_model

    register_keras_model(artifacts, build_model("seed_cnn", 10), tmp_path)
    caplog.set_level(logging.DEBUG)
    uvicorn_errors = logging.getLogger("uvicorn.error")  # it does not propagate to caplog's root handler
    with background_server(create_app(AppSettings(artifacts_root=str(artifacts)))) as url:
        uvicorn_errors.addHandler(caplog.handler)  # after uvicorn's own logging set-up, which replaces handlers
        port = int(url.rsplit(":", 1)[1])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n"
                               b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n--xyz\r\nContent-Disposition: "
                               b'form-data; name="file"; filename="a.png"\r\n\r\n' + b"\x89PNG" * 1000)  # fmt: skip
            time.sleep(0.5)  # the server reads on, and finds the client gone
        assert httpx.get(f"{url}/api/models", timeout=30).status_code == 200  # still serving
    uvicorn_errors.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text[-3000:]
    assert "went away during its upload" in caplog.text


def test_a_store_that_stops_answering_is_a_503_with_one_sentence(s3_artifacts, s3_server, tmp_path, monkeypatch):
    from model_lib.models import build_model
    from model_lib.stores import STORE_SECONDS_ENV
    from tests.registered import register_keras_model

    register_keras_model(s3_artifacts, build_model("seed_cnn", 10), tmp_path)
    with background_server(create_app(AppSettings(artifacts_root=s3_artifacts))) as url:
        assert httpx.get(f"{url}/api/models", timeout=60).status_code == 200
        monkeypatch.setenv(STORE_SECONDS_ENV, "2")  # the app runs in this process
        s3_server.gate.close()
        try:
            answer = httpx.get(f"{url}/api/models", timeout=60)
        finally:
            s3_server.gate.open()
    assert answer.status_code == 503, answer.text
    assert answer.json()["detail"].startswith(f"{s3_artifacts}/models: the object store did not answer for 2 s")
