"""The object store: S3 through boto3 (any S3-compatible endpoint), or a local directory for one machine.

Keys are relative ("<video id>/video.mp4"); each store adds its own prefix.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from service.settings import Settings

log = logging.getLogger(__name__)

# Our own attempts at one upload, on top of boto3's per-request retries; waits double from UPLOAD_BACKOFF_S.
UPLOAD_ATTEMPTS = 3
UPLOAD_BACKOFF_S = 0.5


class StorageError(Exception):
    pass


class Storage(Protocol):
    def put_file(self, key: str, path: Path, content_type: str) -> None: ...
    def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def ping(self) -> None: ...
    # A URL a client can download the object from directly, or None when the gateway must stream it.
    def presigned_url(self, key: str, filename: str | None = None) -> str | None: ...
    # The object as a local file, when the store is a local directory.
    def local_path(self, key: str) -> Path | None: ...


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid object key {key!r}")
    return key


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy then rename, so a reader never sees a half-written file.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".upload-")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".upload-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)

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
            raise StorageError(f"{self.root} is not writable")

    def presigned_url(self, key: str, filename: str | None = None) -> str | None:
        return None

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None


class S3Storage:
    def __init__(self, bucket: str, prefix: str, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_ttl_s = settings.presign_ttl_s
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

        # boto3 retries each request (3 attempts); this loop covers what it gives up on: an endpoint that is
        # away for seconds (a restart, a failover), and multipart uploads that fail part-way.
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type})
                return
            except (BotoCoreError, ClientError) as e:
                if attempt == UPLOAD_ATTEMPTS:
                    raise StorageError(f"upload of {key} failed after {attempt} attempts: {e}") from e
                delay = UPLOAD_BACKOFF_S * 2 ** (attempt - 1)
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
            raise StorageError(f"bucket {self.bucket} unreachable: {e}") from e

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
    return LocalStorage(Path(url.path))
