"""Where shared outputs live: a `Store`.

A `Store` is where shared outputs live: a local folder or an object store (`s3://bucket/prefix`, any
S3-compatible server: credentials and endpoint from the standard `AWS_*` variables,
`AWS_ENDPOINT_URL` included), behind one small interface. The registry needs two things of a store
beyond reading and writing whole objects, and both hold across machines:
  * `write_if(key, data, tag)`: replace an object only if it is still the one read with `tag`
    (compare-and-swap), or create it only if absent (`tag=None`). S3 does this with conditional
    writes (`If-Match` on the ETag, `If-None-Match: *`); a local folder with a file lock and the
    content's hash, which holds between the processes of one machine.
  * whole-object atomicity: a reader sees an old or a new object, never a part.

Transient store errors (no connection, throttling, 5xx) are retried with backoff for up to
`CIFAR_PIPELINE_STORE_SECONDS` (30 s); after that one `StoreError` line names the URL and the cause.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from filelock import FileLock

from model_lib.fileio import atomic_open, owned_folder, read_json, write_json

STORE_SECONDS_ENV = "CIFAR_PIPELINE_STORE_SECONDS"  # see store_retry_seconds
DEFAULT_STORE_SECONDS = 30.0
# One request's own limits, inside that budget: a server that accepts connections and never answers (frozen,
# overloaded) costs one read timeout an attempt, not botocore's 60 s times its and s3fs's own retries.
STORE_CONNECT_SECONDS = 5.0
STORE_READ_SECONDS = 10.0
STORE_LOCK_SECONDS = 300  # how long a local compare-and-swap waits for another writer's lock
SYNC_BATCH_FILES = 32  # downloads in flight while a local copy of a folder is brought up to date
MIRROR_INDEX = ".mirror.json"  # in a local copy of an object-store folder: each file's size and ETag
REMOTE_SCHEMES = ("s3",)  # object stores with conditional writes, which the registry needs
T = TypeVar("T")
# Says that a store stopped answering, so a wait of up to the budget is never silent: once per store and
# outage, however many calls wait on it at once (a registration uploads its files in parallel). The CLI prints it
# as one `warning:` line (flows/cli.py), a service logs it.
STORE_LOG = logging.getLogger("cifar_pipeline.store")
_last_waiting_line: dict[tuple, float] = {}  # (endpoint, bucket) -> when its last such line was said (monotonic)
_waiting_lock = threading.Lock()


# S3's rule for bucket names, which S3-compatible servers share: checked before any request is made.
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class StoreError(Exception):
    """The store cannot be reached or refuses a request; the message names the URL and the cause."""


def store_retry_seconds() -> float:
    """`CIFAR_PIPELINE_STORE_SECONDS` (default 30): how long calls to an object store that does not answer are
    retried before the command fails with one line. Longer for a flaky link; each request still gives up on its
    own after STORE_CONNECT_SECONDS or STORE_READ_SECONDS."""
    raw = os.environ.get(STORE_SECONDS_ENV) or str(DEFAULT_STORE_SECONDS)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 86400:  # NaN fails this too
        raise StoreError(f"{STORE_SECONDS_ENV}={raw!r}: a number of seconds above 0 and at most 86400")
    return seconds


def check_location(location: str) -> None:
    """Refuse a URL this project cannot keep a registry in, before any work starts.

    Raises:
        StoreError: An unknown scheme, an S3 URL without a bucket, or s3fs not installed.
    """
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return
    if parsed.scheme not in REMOTE_SCHEMES:
        raise StoreError(
            f"{location}: unsupported storage URL scheme {parsed.scheme!r} (use a local path, file://... or "
            "s3://bucket/prefix; the registry needs an object store with conditional writes)"
        )
    if not parsed.netloc:
        raise StoreError(f"{location}: an s3:// URL needs a bucket (s3://bucket/prefix)")
    if not BUCKET_NAME.fullmatch(parsed.netloc):
        raise StoreError(
            f"{location}: {parsed.netloc!r} is not a bucket name (3-63 lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit)"
        )
    try:
        import s3fs  # noqa: F401
    except ImportError as error:
        raise StoreError(f"{location}: s3:// needs the s3 extra (pip install 'cifar-pipeline[s3]')") from error


def open_store(location: str | os.PathLike) -> Store:
    """The store at a location: `S3Store` for `s3://...`, `LocalStore` for a path or `file://...`."""
    location = str(location)
    check_location(location)
    if urlparse(location).scheme in ("", "file"):
        return LocalStore(Path(location.removeprefix("file://")).expanduser().resolve())
    return S3Store(location)


def content_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """Objects under one root, addressed by '/'-separated keys. See the module docstring."""

    url: str

    def read(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when absent."""
        data, _ = self.read_tagged(key)
        if data is None:
            raise FileNotFoundError(f"{self.where(key)}: not found")
        return data

    def read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and the tag `write_if` compares with; (None, None) when absent."""
        raise NotImplementedError

    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Write only if the object is still the one read with `tag` (absent when None); False if not."""
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        """Replace the object atomically."""
        raise NotImplementedError

    def upload(self, source: Path, key: str) -> None:
        """Copy a local file to `key` atomically."""
        raise NotImplementedError

    def download(self, key: str, target: Path) -> None:
        """Copy `key` to a local file, atomically (a partial download never stands at `target`)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, key: str = "") -> list[str]:
        """The names directly below `key` (objects and 'folders'); empty when there are none."""
        raise NotImplementedError

    def remove(self, key: str) -> None:
        """Remove `key` and everything below it; nothing when absent."""
        raise NotImplementedError

    def age_seconds(self, key: str) -> float:
        """Seconds since the object was last written."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise StoreError now if the store cannot be used at all (a bucket that does not exist), rather than
        after a run's work."""

    def where(self, key: str = "") -> str:
        """The full location of a key, for messages."""
        return "/".join([self.url.rstrip("/"), *[part for part in key.split("/") if part]])


class LocalStore(Store):
    """A folder on a local (or shared) disk."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*[part for part in key.split("/") if part])

    def read_tagged(self, key):
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None, None
        return data, content_tag(data)

    def write_if(self, key, data, tag):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.parent / f".{path.name}.lock"), timeout=STORE_LOCK_SECONDS):
            _, current = self.read_tagged(key)
            if current != tag:
                return False
            self.write(key, data)
        return True

    def write(self, key, data):
        with atomic_open(self._path(key), "wb") as handle:
            handle.write(data)

    def upload(self, source, key):
        with atomic_open(self._path(key), "wb") as handle, open(source, "rb") as original:
            shutil.copyfileobj(original, handle, 1 << 20)

    def download(self, key, target):
        with atomic_open(target, "wb") as handle, open(self._path(key), "rb") as original:
            shutil.copyfileobj(original, handle, 1 << 20)

    def exists(self, key):
        return self._path(key).exists()

    def list(self, key=""):
        path = self._path(key)
        return sorted(child.name for child in path.iterdir()) if path.is_dir() else []

    def remove(self, key):
        path = self._path(key)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def age_seconds(self, key):
        return time.time() - self._path(key).stat().st_mtime


_TRANSIENT_CODES = {"SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500"}
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def _client_error_code(error: BaseException) -> str | None:
    """The S3 error code behind an error s3fs or botocore raised, if any."""
    for cause in (error, error.__cause__, error.__context__):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(code or status)
    return None


def _no_credentials(error: BaseException) -> bool:
    from botocore.exceptions import NoCredentialsError

    return any(isinstance(cause, NoCredentialsError) for cause in (error, error.__cause__, error.__context__))


def _is_transient(error: BaseException) -> bool:
    """A failure a retry may cure: no connection, a timeout, throttling, a 5xx."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    chain = (error, error.__cause__, error.__context__)
    if any(
        isinstance(cause, BotoConnectionError | HTTPClientError | ConnectionError | TimeoutError) for cause in chain
    ):
        return True
    return _client_error_code(error) in _TRANSIENT_CODES


class S3Store(Store):
    """A prefix in an S3 bucket (or any S3-compatible server), through s3fs's client.

    s3fs's listing cache is off: another machine may have written since the last look.
    """

    def __init__(self, url: str):
        import s3fs

        parsed = urlparse(url)
        self.url = url.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        # One attempt inside botocore and s3fs, each bounded by its own timeouts: the outage budget is
        # `_retrying`'s, measured in seconds. fsspec keeps one instance (and its connection pool) per process
        # for these arguments: a new client per store would leak its sockets. The endpoint is part of the key,
        # so a changed AWS_ENDPOINT_URL gets its own.
        self.fs = s3fs.S3FileSystem(
            use_listings_cache=False,
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
            config_kwargs={
                "retries": {"max_attempts": 1},
                "connect_timeout": STORE_CONNECT_SECONDS,
                "read_timeout": STORE_READ_SECONDS,
            },  # fmt: skip
        )
        self.fs.retries = 1  # s3fs's own loop (5 tries of every timed-out call) would multiply each attempt

    def _key(self, key: str) -> str:
        return "/".join(part for part in (self.prefix, *key.split("/")) if part)

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{self._key(key)}"

    def check(self) -> None:
        # A one-key listing: a missing bucket answers NoSuchBucket, which `_retrying` names like every other call.
        self._retrying("look up", "", lambda: self.fs.call_s3("list_objects_v2", Bucket=self.bucket, MaxKeys=1))

    def _put(self, key: str, data: bytes, **condition: str) -> None:
        self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._key(key), Body=data, **condition)

    def _retrying(self, what: str, key: str, call: Callable[[], T]) -> T:
        budget = store_retry_seconds()
        deadline, delay, warned = time.monotonic() + budget, 0.5, False
        while True:
            try:
                return call()
            except Exception as error:
                code = _client_error_code(error)
                if code == "NoSuchBucket":
                    raise StoreError(f"s3://{self.bucket}: no such bucket (create it first)") from error
                if isinstance(error, FileNotFoundError | FileExistsError):
                    raise
                if _no_credentials(error):
                    raise StoreError(
                        f"{self.where(key)}: no credentials for the object store: set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for a server that is not AWS"
                    ) from None
                if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                    raise StoreError(
                        f"{self.where(key)}: access denied ({code}): check the AWS_* credentials"
                    ) from error
                if code in _CONFLICT_CODES or not _is_transient(error):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreError(
                        f"{self.where(key)}: the object store did not answer for {budget:.0f} s while "
                        f"trying to {what} ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                    ) from error
                if not warned:
                    warned = True
                    server = (os.environ.get("AWS_ENDPOINT_URL"), self.bucket)  # the registry's stores share it
                    with _waiting_lock:  # a line per outage: not again while the same wait may still be going on
                        said = _last_waiting_line.get(server, -math.inf) > time.monotonic() - budget
                        _last_waiting_line[server] = time.monotonic()
                    if not said:
                        STORE_LOG.warning(
                            f"{self.where(key)}: the object store is not answering ({type(error).__name__}); trying "
                            f"again for up to {budget:.0f} s ({STORE_SECONDS_ENV})"
                        )
                time.sleep(delay)
                delay = min(delay * 2, 4.0)

    def read_tagged(self, key):
        from fsspec.asyn import sync

        async def get():
            try:
                response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key))
            except FileNotFoundError as error:
                if _client_error_code(error) == "NoSuchBucket":
                    raise
                return None, None
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        return self._retrying("read", key, lambda: sync(self.fs.loop, get))

    def write_if(self, key, data, tag):
        condition = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}

        def put() -> bool:
            try:
                self._put(key, data, **condition)
            except FileExistsError:
                return False
            except OSError as error:
                if _client_error_code(error) in _CONFLICT_CODES:
                    return False
                raise
            return True

        return self._retrying("write", key, put)

    def write(self, key, data):
        self._retrying("write", key, lambda: self._put(key, data))

    def upload(self, source, key):
        self._retrying("upload", key, lambda: self.fs.put_file(str(source), self._path(key)))

    def download(self, key, target):
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            self._retrying("download", key, lambda: self.fs.get_file(self._path(key), str(partial)))
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def exists(self, key):
        return self._retrying("look up", key, lambda: self.fs.exists(self._path(key)))

    def list(self, key=""):
        def ls() -> list[str]:
            try:
                return sorted(
                    entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self._path(key), detail=False)
                )
            except FileNotFoundError as error:
                if _client_error_code(error) == "NoSuchBucket":
                    raise
                return []

        return self._retrying("list", key, ls)

    def remove(self, key):
        def rm() -> None:
            try:
                self.fs.rm(self._path(key), recursive=True)
            except FileNotFoundError:
                pass

        self._retrying("remove", key, rm)

    def sync_to(self, target: Path, key: str = "") -> int:
        """Bring a local copy of every object under `key` up to date; returns how many files were fetched.

        Objects whose size and ETag match the copy's index are not fetched again; files gone from the
        store go from the copy. A key that would land outside `target` (`..`, an absolute path) is
        refused. Each file lands by rename, so a reader of the copy never sees a partial one.
        """
        listed = self._retrying("list", key, lambda: self.fs.find(self._path(key), detail=True))
        base = self._path(key).rstrip("/") + "/"
        wanted: dict[str, list] = {}
        for path, info in listed.items():
            relative = path.removeprefix(base)
            parts = relative.split("/")
            if info.get("type") == "directory" or not relative or path == base.rstrip("/"):
                continue
            if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
                raise StoreError(f"{self.where(key)}: object {relative!r} would land outside the local copy")
            wanted[relative] = [info.get("size"), info.get("ETag")]
        if not wanted:
            raise FileNotFoundError(f"{self.where(key)}: folder not found (no objects under it)")
        target.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.parent / f".{target.name}.lock"), timeout=STORE_LOCK_SECONDS):
            index_path = target / MIRROR_INDEX
            index = read_json(index_path) if index_path.is_file() else {}
            stale = [name for name, seen in wanted.items() if index.get(name) != seen or not (target / name).is_file()]
            incoming = owned_folder(target, ".incoming-")
            try:
                if stale:
                    remote = [base + name for name in stale]
                    local = [str(incoming / name) for name in stale]
                    for name in stale:
                        (incoming / name).parent.mkdir(parents=True, exist_ok=True)
                    # A bounded number at a time: fsspec sizes its batches by the open-file limit, not by
                    # what this process (a flow with its pools) already has open.
                    self._retrying("download", key, lambda: self.fs.get(remote, local, batch_size=SYNC_BATCH_FILES))
                for name in stale:
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(incoming / name, target / name)
            finally:
                shutil.rmtree(incoming, ignore_errors=True)
            for name in set(index) - set(wanted):
                (target / name).unlink(missing_ok=True)
            write_json(index_path, wanted)
        return len(stale)

    def age_seconds(self, key):
        info = self._retrying("look up", key, lambda: self.fs.info(self._path(key)))
        modified = info.get("LastModified")
        return time.time() - modified.timestamp() if modified else 0.0
