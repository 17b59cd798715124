"""Shared fixtures: a Prefect test harness, a private ARTIFACTS_DIR per test, and test data."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_lib.precision import JAX_CACHE_MAX_BYTES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10"
# JAX keeps its compiled programs here for the whole run, shared by the xdist workers and the CLI
# subprocesses (JAX locks it), rather than in each test's own ARTIFACTS_DIR: most tests compile the
# same small programs. Set before any test module imports Keras, which reads it with JAX.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax"))
# With the product's limit in every process, JAX's own jits in tests included: a process without one writes programs
# without their access-time files, and then the processes with one could write nothing (model_lib.precision).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(JAX_CACHE_MAX_BYTES))
# Likewise the bf16 probe (AVX-512 BF16 CPUs without AMX): measured once for the run rather than in each test's
# ARTIFACTS_DIR, about 10 s each of some 20 trainings.
os.environ.setdefault("CIFAR_PIPELINE_MACHINE_CACHE", str(REPO / ".pytest_cache" / "machine"))
# TensorFlow's C++ start-up notes, which the CLI keeps off the console. Whole words: Prefect's random run
# names (woodoo-barracuda) must not match.
TF_STARTUP_NOTES = re.compile(r"oneDNN|\bcuInit\b|\babsl\b|\bcuda\b|\bcuDNN\b", re.IGNORECASE)
CLASS_COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


# Fixtures that train or start a service for the tests that share them (a minute or more on two cores): every
# test that uses one is `slow`, out of `make test-quick`, wherever it is declared.
SLOW_FIXTURES = frozenset({"smoke_on_real_cifar", "tiny_on_real_cifar", "trained_and_exported"})


def pytest_collection_modifyitems(config, items) -> None:
    """Tests on a slow fixture are marked `slow`; then, under pytest-xdist, each worker's share of the run starts
    with its part of the slow tests.

    worksteal hands each worker a contiguous share of this order and idle workers steal from the others'
    ends. In file order a slow test could start last and hold one worker for over a minute after the
    others had finished; here the slow tests are dealt out first, and the short ones that follow them even
    the finish out. The other tests keep their file order, so a module's fixtures are set up once a worker.
    """
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    rest = iter([item for item in items if not item.get_closest_marker("slow")])
    ordered = []
    for share in range(workers):  # the sizes worksteal cuts: what is left over the workers still to serve
        size = (len(items) - len(ordered)) // (workers - share)
        first = slow[share::workers]
        ordered += [*first, *islice(rest, max(0, size - len(first)))]  # all slow: no room for the others
    items[:] = [*ordered, *rest]  # what a share full of slow tests left over


CPU_REPORT_ENV = "CIFAR_PIPELINE_TEST_CPU"  # a file: each test's CPU seconds are appended to it (bench/suite_cpu.py)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With CIFAR_PIPELINE_TEST_CPU set, one JSON line per test: the CPU seconds of the test's process and of the
    child processes it waited for (commands, trainings, servers it stopped), set-up and tear-down included. The
    suite is CPU-bound on 2 cores, so this, not wall time, says which tests cost the suite its minutes."""
    report = os.environ.get(CPU_REPORT_ENV)
    if not report:
        yield
        return
    import json
    import time

    before, started = os.times(), time.perf_counter()
    yield
    after = os.times()
    line = {"test": item.nodeid, "wall": round(time.perf_counter() - started, 2),
            "own": round(after.user - before.user + after.system - before.system, 2),
            "children": round(after.children_user - before.children_user + after.children_system
                              - before.children_system, 2)}  # fmt: skip
    with open(report, "a") as handle:  # one short append a test: the workers' lines do not interleave
        handle.write(json.dumps(line) + "\n")


@pytest.fixture(scope="session")
def prefect_harness():
    """A throw-away Prefect API and database for the whole session (flows under test only)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api_env(prefect_harness) -> dict[str, str]:
    """Environment for CLI subprocesses: their flows report to the session's Prefect API instead of
    the local server of their PREFECT_HOME (tests/flows/test_local_server.py tests that one).
    Tests of what a person sees on a machine without a server leave it out."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


LOCAL_SERVER_MODULE = "flows.local_server"  # its processes' command line names it, then their state folder


def local_servers(under: Path) -> list:
    """The running local Prefect servers (flows/local_server.py) whose state folder lies under `under`."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        line = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and LOCAL_SERVER_MODULE in line:
            if Path(line[-1]).is_relative_to(under):
                found.append(process)
    return found


@pytest.fixture
def laptop_env(artifacts, tmp_path):
    """A terminal on a laptop: no PREFECT_API_URL, so commands share the local server of a PREFECT_HOME of
    their own (~/.prefect's database may have been migrated by another Prefect version). Whatever server
    they start is stopped afterwards, as `cifar-pipeline server stop` does."""
    import psutil

    home = tmp_path / "prefect-home"
    yield {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
           "ARTIFACTS_DIR": str(artifacts), "PREFECT_HOME": str(home)}  # fmt: skip
    servers = local_servers(home)
    for server in servers:
        server.terminate()
    psutil.wait_procs(servers, timeout=15)


@pytest.fixture(scope="session", autouse=True)
def no_local_server_left(tmp_path_factory):
    """No test leaves a local Prefect server running: it would hold its memory for the idle period."""
    yield
    left = local_servers(tmp_path_factory.getbasetemp())
    lines = [" ".join(server.info["cmdline"]) for server in left]
    for server in left:
        server.kill()
    assert not left, f"local Prefect servers left running: {lines}"


@pytest.fixture(scope="session", autouse=True)
def prefect_console_on_session_stderr():
    """Prefect sets its console handler up once a process, on the `sys.stderr` of that moment. Were that a
    CliRunner's stream (the CLI sets it up), every later test's flow logs would write to a closed file."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


@pytest.fixture(autouse=True)
def artifacts(tmp_path, monkeypatch) -> Path:
    """Each test writes under its own ARTIFACTS_DIR."""
    root = tmp_path / "artifacts"
    monkeypatch.setenv("ARTIFACTS_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The real CIFAR-10 image folder: CIFAR10_DIR, else ../shared/datasets/cifar10. Absent, its tests skip
    on a developer's machine, but fail under CI=true: they are the only end-to-end checks of their features."""
    path = Path(os.environ.get("CIFAR10_DIR") or SHARED_CIFAR10)
    if not ((path / "train").is_dir() and (path / "test").is_dir()):
        message = f"real CIFAR-10 (train/ and test/) not found at {path} (set CIFAR10_DIR)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def once_per_run(tmp_path_factory, name: str, make: Callable[[Path], dict]) -> tuple[Path, dict]:
    """`make(folder)` run once for the whole test run, by whichever pytest-xdist worker comes first (the others
    wait for it): the folder and `make`'s JSON result. Tests that only read the folder use it in place; a test
    that adds to it copies it first."""
    import json

    from filelock import FileLock

    # The run's own temp root: the workers share it, while runs never see each other's.
    run_root = tmp_path_factory.getbasetemp()
    run_root = run_root.parent if os.environ.get("PYTEST_XDIST_WORKER") else run_root
    shared, done = run_root / name, run_root / f"{name}.json"
    with FileLock(f"{done}.lock"):
        if not done.is_file():
            done.write_text(json.dumps(make(shared)))
        return shared, json.loads(done.read_text())


def train_once(tmp_path_factory, name: str, cifar_dir: Path, **parameters) -> tuple[Path, dict]:
    """`train-cifar` with these parameters and CIFAR10_DIR set, once for the whole run: its ARTIFACTS_DIR and the
    flow's result."""

    def train(root: Path) -> dict:
        from flows.train_cifar import train_cifar

        with pytest.MonkeyPatch.context() as env:
            env.setenv("ARTIFACTS_DIR", str(root))
            env.setenv("CIFAR10_DIR", str(cifar_dir))
            return train_cifar(**parameters)

    return once_per_run(tmp_path_factory, name, train)


@pytest.fixture(scope="session")
def smoke_on_real_cifar(prefect_harness, cifar_dir, tmp_path_factory) -> tuple[Path, dict]:
    """`train-cifar --profile smoke` on the shared CIFAR-10 (half a minute to two on two cores), once for the run.
    For what only a model that has learned something on real photos shows; else `tiny_on_real_cifar`."""
    return train_once(tmp_path_factory, "smoke_on_real_cifar", cifar_dir, profile="smoke")


@pytest.fixture(scope="session")
def tiny_on_real_cifar(prefect_harness, cifar_dir, tmp_path_factory) -> tuple[Path, dict]:
    """`train-cifar --profile tiny` on the shared CIFAR-10 (seconds of training), once for the run: a trained,
    calibrated and registered version for tests that need *a* model of real photos (serving, the app, exports).
    Not exported, so that it serves through Keras as trained; export tests export their copy."""
    return train_once(tmp_path_factory, "tiny_on_real_cifar", cifar_dir, profile="tiny")


@pytest.fixture(scope="session")
def trained_and_exported(prefect_harness, tmp_path_factory) -> tuple[Path, dict]:
    """One training with all exports for the run (about 25 s on two cores), whichever worker comes first: its
    ARTIFACTS_DIR (the colour images beside it, in `colours/`) and the flow's result. Tests that change it copy it."""
    from flows.train_cifar import train_cifar

    def train(root: Path) -> dict:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ARTIFACTS_DIR", str(root / "artifacts"))
            return train_cifar(profile="seed", data=str(write_colour_dataset(root / "colours")), epochs=4,
                               batch_size=8, validation_split=0.25, export=True)  # fmt: skip

    root, result = once_per_run(tmp_path_factory, "trained_and_exported", train)
    return root / "artifacts", result


@pytest.fixture
def upscaled_cifar(cifar_dir, tmp_path) -> tuple[Path, Path]:
    """30 real CIFAR-10 test images per class, as they are and as 640x480 JPEG "photos" (bicubic, quality 90)."""
    from tests.synthetic import write_upscaled_cifar

    return write_upscaled_cifar(cifar_dir, tmp_path / "originals", tmp_path / "photos")


def write_colour_dataset(root: Path, train_per_class: int = 12, test_per_class: int = 4, size: int = 32) -> Path:
    """An image folder whose classes are noisy solid colours: learnable in a few steps."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name, colour in CLASS_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.integers(-30, 30, (size, size, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's handwritten digits as an image folder (tests/synthetic.py), written once a worker."""
    from tests.synthetic import write_digits_dataset

    return write_digits_dataset(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture
def colour_dataset(tmp_path) -> Path:
    return write_colour_dataset(tmp_path / "colours")


@pytest.fixture
def cifar_slice(cifar_dir, tmp_path) -> Path:
    """A small copy of real CIFAR-10 (20 train and 10 test images per class) in a temp folder."""
    import shutil

    root = tmp_path / "cifar_slice"
    for split, count in (("train", 20), ("test", 10)):
        for class_dir in sorted((cifar_dir / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for path in sorted(class_dir.iterdir())[:count]:
                shutil.copyfile(path, target / path.name)
    return root


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server process (moto) on 127.0.0.1 for this test process, behind a gate tests can close."""
    from tests.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3_artifacts(s3_server, tmp_path, monkeypatch) -> str:
    """ARTIFACTS_DIR in a fresh bucket of the S3 server, with this test's own local cache (one machine's)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{s3_server.new_bucket()}/team"
    monkeypatch.setenv("ARTIFACTS_DIR", url)
    monkeypatch.setenv("CIFAR_PIPELINE_CACHE", str(tmp_path / "cache"))
    return url
