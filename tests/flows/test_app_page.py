"""The app's page in a real headless Chromium (Debian's `chromium` and `chromium-driver`, installed by `.ci/run`),
against `cifar-pipeline app` as the README shows it: an upload shows its class, and a fake camera fed with a
video made here from CIFAR-10 test images shows live labels that change with the frames; docs/app.md's
curl line answers.

A screenshot of the page is left in `test-artifacts/app-page.png`.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.flows.test_app import cifar_test_images, upload
from tests.flows.test_readme import readme_command
from tests.s3server import free_port

pytestmark = pytest.mark.real_data
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "test-artifacts" / "app-page.png"
FRAME = 128  # the fake camera's frame side, in pixels
FPS = 10
SECONDS_PER_IMAGE = 1.5


def browser_tools() -> dict[str, str]:
    """Chromium, its driver and curl; absent, the test skips on a developer's machine and fails under CI=true."""
    tools = {name: shutil.which(name) for name in ("chromium", "chromedriver", "curl")}
    if not all(tools.values()):
        message = "chromium, chromedriver or curl not found (apt-get install chromium chromium-driver curl)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return tools


def camera_frame(path: Path) -> Image.Image:
    """A CIFAR image as the fake camera delivers it: upscaled, then through 4:2:0 chroma subsampling."""
    image = Image.open(path).convert("RGB").resize((FRAME, FRAME), Image.Resampling.BICUBIC)
    y, cb, cr = image.convert("YCbCr").split()
    half = (FRAME // 2, FRAME // 2)
    chroma = [plane.resize(half, Image.Resampling.BILINEAR).resize(image.size) for plane in (cb, cr)]
    return Image.merge("YCbCr", (y, *chroma)).convert("RGB")


def write_y4m(frames: list[Image.Image], path: Path) -> None:
    """A YUV4MPEG2 (4:2:0) video, the format Chromium's fake camera reads and loops."""
    with open(path, "wb") as video:
        video.write(f"YUV4MPEG2 W{FRAME} H{FRAME} F{FPS}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            y, cb, cr = frame.convert("YCbCr").split()
            video.write(b"FRAME\n" + y.tobytes())
            for plane in (cb, cr):
                video.write(plane.resize((FRAME // 2, FRAME // 2), Image.Resampling.BILINEAR).tobytes())


def as_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_the_page_shows_an_uploads_class_and_live_camera_labels_in_a_real_browser(
    smoke_on_real_cifar, cifar_dir, tmp_path
):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tools = browser_tools()
    documented = readme_command("cifar-pipeline app", exact=True)
    port = free_port()
    env = {**os.environ, "ARTIFACTS_DIR": str(smoke_on_real_cifar[0])}
    command = [sys.executable, "-c", "from flows.cli import main; main()", *documented, "--port", str(port)]
    app = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    driver = None
    try:
        line = app.stdout.readline()  # "serving cifar10@champion (cifar10 v1) at http://127.0.0.1:PORT/ - ..."
        assert f"at http://127.0.0.1:{port}/" in line, (line, app.stderr.read() if app.poll() is not None else "")
        url = f"http://127.0.0.1:{port}"

        # docs/app.md's curl line, as written but for the port.
        curl = readme_command("curl -F file=@cat.jpg")
        shutil.copyfile(sorted((cifar_dir / "test" / "cat").iterdir())[0], tmp_path / "cat.jpg")
        Image.open(sorted((cifar_dir / "test" / "ship").iterdir())[0]).save(tmp_path / "ship.png")
        arguments = [argument.replace("http://127.0.0.1:8000", url) for argument in curl]
        done = subprocess.run([tools["curl"], *arguments], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert [row["path"] for row in answer["predictions"]] == ["cat.jpg", "ship.png"]
        assert answer["version"] == "cifar10 v1" and all(row["status"] == "ok" for row in answer["predictions"])

        # A real test photo the model gets right, to upload; as camera frames, the two photos of different
        # labels that the model is clearest about, as the camera delivers them. Chromium turns the video's YUV
        # into RGB its own way (video or full range): a frame counts only where the label stays the same either
        # way. The smoke model, not tiny: tiny (28%) gave every steady frame one label in a CI run.
        candidates = cifar_test_images(cifar_dir, 8)
        truth = {path.name: path.parent.name for path in candidates}
        rows = httpx.post(f"{url}/api/predict", files=upload(candidates), timeout=60).json()["predictions"]
        photo = next(path for path, row in zip(candidates, rows, strict=True) if row["label"] == truth[path.name])
        frames = {path.name: camera_frame(path) for path in candidates}
        ways = {
            "": lambda v: v,
            "video-range-": lambda v: 16 + v * 219 / 255,
            "full-range-": lambda v: (v - 16) * 255 / 219,
        }
        files = [("file", (way + name, as_png(Image.eval(frame, change)))) for name, frame in frames.items()
                 for way, change in ways.items()]  # fmt: skip
        rows = {
            row["path"]: row for row in httpx.post(f"{url}/api/predict", files=files, timeout=60).json()["predictions"]
        }
        steady = [rows[name] for name in frames if len({rows[way + name]["label"] for way in ways}) == 1]
        steady.sort(key=lambda row: row["top2_probability"] - row["top1_probability"])  # clearest first
        first = steady[0]
        second = next(row for row in steady if row["label"] != first["label"])
        per_image = int(FPS * SECONDS_PER_IMAGE)
        video = tmp_path / "camera.y4m"
        write_y4m([frames[first["path"]]] * per_image + [frames[second["path"]]] * per_image, video)

        options = webdriver.ChromeOptions()
        options.binary_location = tools["chromium"]
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                         f"--use-file-for-fake-video-capture={video}"):  # fmt: skip
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(tools["chromedriver"]), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "serving cifar10 v1" in d.find_element(By.ID, "serving").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#registry tr.served"))
        served = driver.find_element(By.CSS_SELECTOR, "#registry tr.served").text
        assert "champion" in served and "(served here)" in served

        driver.find_element(By.ID, "files").send_keys(str(photo))
        card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f".result[data-path='{photo.name}']"))[0]
        assert card.get_attribute("data-label") == truth[photo.name]
        assert truth[photo.name] in card.text and len(card.find_elements(By.CSS_SELECTOR, ".bar")) == 3
        assert "answered by cifar10 v1" in card.text  # each card names the version that answered
        confidence = card.find_element(By.CSS_SELECTOR, ".label").find_element(By.XPATH, "..").text.split()[-1]
        assert re.fullmatch(r"(>?\d{1,2}\.\d%|100%)", confidence), confidence  # one decimal, never "100.0%"
        assert "100.0%" not in driver.find_element(By.TAG_NAME, "body").text
        assert not driver.find_element(By.ID, "notes").is_displayed()  # the engine's notes: behind "details"

        driver.find_element(By.ID, "camera").click()
        labels, deadline = [], time.monotonic() + 45
        while time.monotonic() < deadline and not {first["label"], second["label"]} <= set(labels):
            label = driver.find_element(By.ID, "live-label").get_attribute("data-label")
            if label and (not labels or labels[-1] != label):
                labels.append(label)
            time.sleep(0.1)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        assert {first["label"], second["label"]} <= set(labels), (first["label"], second["label"], labels)
        rate = driver.find_element(By.ID, "camera-rate").text
        assert float(rate.split()[0]) >= 2, rate  # several frames a second
    finally:
        if driver is not None:
            driver.quit()
        app.terminate()
        app.wait(timeout=30)
