"""The object store: S3 through boto3 (any S3-compatible endpoint), or a local directory for one machine.

Keys are relative ("<video id>/video.mp4"); each store adds its own prefix.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from service.contract.settings import Settings

log = logging.getLogger(__name__)

# Our own retries of one upload, on top of boto3's per-request ones, for K5_STORAGE_RETRY_WINDOW_S: waits double
# from UPLOAD_BACKOFF_S up to UPLOAD_BACKOFF_MAX_S.
UPLOAD_BACKOFF_S = 0.5
UPLOAD_BACKOFF_MAX_S = 10.0
# How long the gateway trusts its last look at the store before admitting a job (a HEAD per POST otherwise).
AVAILABLE_TTL_S = 2.0


class StorageError(Exception):
    """Messages never name server paths or endpoints: they may reach clients."""


class StorageFull(StorageError):
    pass


def _os_error(e: OSError, what: str) -> StorageError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: the server's storage is full")
    return StorageError(f"{what}: {e.strerror or type(e).__name__}")


class _Availability:
    """available(): ping(), remembered for AVAILABLE_TTL_S, for admission (the outcome, good or bad)."""

    _checked_at = -1e9
    _error: StorageError | None = None

    def ping(self) -> None: ...

    def available(self) -> None:
        now = time.monotonic()
        if now - self._checked_at > AVAILABLE_TTL_S:
            try:
                self.ping()
                self._error = None
            except StorageError as e:
                self._error = e
            self._checked_at = now
        if self._error is not None:
            raise self._error


class Storage(Protocol):
    def put_file(self, key: str, path: Path, content_type: str) -> None: ...
    def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def ping(self) -> None: ...
    # ping(), remembered for a moment: raises StorageError (StorageFull for a full disk) when it failed.
    def available(self) -> None: ...
    # A URL a client can download the object from directly, or None when the gateway must stream it.
    def presigned_url(self, key: str, filename: str | None = None) -> str | None: ...
    # The object as a local file, when the store is a local directory.
    def local_path(self, key: str) -> Path | None: ...


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid object key {key!r}")
    return key


class LocalStorage(_Availability):
    def __init__(self, root: Path, min_free_mb: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        self._write(key, lambda tmp: shutil.copyfile(path, tmp))

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self._write(key, lambda tmp: Path(tmp).write_bytes(data))

    def _write(self, key: str, write: Callable[[str], object]) -> None:
        """Into a temporary file, then renamed: a reader never sees a half-written file, and a failed write (a
        full disk) leaves no temporary file behind."""
        dest = self._path(key)
        tmp = None
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".upload-")
            os.close(fd)
            write(tmp)
            os.replace(tmp, dest)
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise _os_error(e, f"storing {key} failed") from e

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise StorageError(f"no object {key!r}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix.rstrip("/")), ignore_errors=True)

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError("the local storage directory is not writable")
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            raise StorageFull(f"the server's storage is full ({free // 2**20} MB free)")

    def presigned_url(self, key: str, filename: str | None = None) -> str | None:
        return None

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None


class S3Storage(_Availability):
    def __init__(self, bucket: str, prefix: str, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_ttl_s = settings.presign_ttl_s
        self.retry_window_s = settings.storage_retry_window_s
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            # Path-style works with every S3-compatible store; virtual hosts need DNS per bucket.
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )

    def _key(self, key: str) -> str:
        key = _safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        # boto3 retries each request (3 attempts); this loop covers what it gives up on: an endpoint that is away
        # for seconds or minutes (a restart, a failover), and multipart uploads that fail part-way. The file
        # stays where it is meanwhile, so a finished generation is never thrown away for a blip.
        deadline = time.monotonic() + self.retry_window_s
        attempt = 0
        while True:
            attempt += 1
            try:
                self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type})
                return
            except (BotoCoreError, ClientError) as e:
                delay = min(UPLOAD_BACKOFF_MAX_S, UPLOAD_BACKOFF_S * 2 ** (attempt - 1))
                if time.monotonic() + delay > deadline:
                    log.error("upload of %s failed for good after %d attempts: %s", key, attempt, e)
                    raise StorageError(f"upload of {key} failed after {attempt} attempts") from e
                log.warning("upload of %s failed (attempt %d), retrying in %.1fs: %s", key, attempt, delay, e)
                time.sleep(delay)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"upload of {key} failed: {e}") from e

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"download of {key} failed: {e}") from e

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"head of {key} failed: {e}") from e
        return True

    def delete_prefix(self, prefix: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(prefix.rstrip("/")) + "/"
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"delete of {prefix} failed: {e}") from e

    def ping(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as e:
            log.warning("object store unreachable: %s", e)
            raise StorageError("the object store is unreachable") from e

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (local stacks and tests; production buckets exist already)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def presigned_url(self, key: str, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename:
            params["ResponseContentDisposition"] = f'inline; filename="{filename}"'
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=self.presign_ttl_s)

    def local_path(self, key: str) -> Path | None:
        return None


def open_storage(settings: Settings) -> LocalStorage | S3Storage:
    url = urlparse(settings.storage_url)
    if url.scheme == "s3":
        return S3Storage(url.netloc, url.path, settings)
    return LocalStorage(Path(url.path), settings.storage_min_free_mb)
