"""Both object stores behave the same; the S3 one against a real SeaweedFS endpoint."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from service.contract.settings import Settings
from service.contract.storage import LocalStorage, S3Storage, StorageError, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return open_storage(request.getfixturevalue("s3_settings"))


def test_round_trip_and_delete(storage, tmp_path):
    f = tmp_path / "v.mp4"
    f.write_bytes(b"\x00mp4 bytes")
    storage.put_file("video_1/video.mp4", f, "video/mp4")
    storage.put_bytes("video_1/input.png", b"png", "image/png")
    storage.put_bytes("video_2/input.png", b"other", "image/png")
    assert storage.get_bytes("video_1/video.mp4") == b"\x00mp4 bytes"
    assert storage.exists("video_1/input.png")
    storage.ping()
    storage.delete_prefix("video_1")
    assert not storage.exists("video_1/video.mp4") and not storage.exists("video_1/input.png")
    assert storage.get_bytes("video_2/input.png") == b"other"
    with pytest.raises(StorageError):
        storage.get_bytes("video_1/video.mp4")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape(storage, key):
    with pytest.raises(StorageError):
        storage.put_bytes(key, b"x", "text/plain")


def test_s3_presigned_url_serves_the_object_and_bad_credentials_are_refused(s3_settings, s3_server):
    store = open_storage(s3_settings)
    store.put_bytes("video_9/video.mp4", b"movie", "video/mp4")
    url = store.presigned_url("video_9/video.mp4", "video_9.mp4")
    resp = httpx.get(url)
    assert resp.status_code == 200 and resp.content == b"movie"
    assert resp.headers["content-type"] == "video/mp4"
    # A tampered signature is refused by the real endpoint.
    assert httpx.get(url.replace("Signature=", "Signature=00")).status_code == 403
    # The bucket name and prefix come from the storage URL.
    assert isinstance(store, S3Storage) and store.prefix.startswith("t-")


def test_s3_unreachable_is_a_storage_error():
    store = open_storage(Settings(storage_url="s3://nobucket/x", s3_endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StorageError):
        store.ping()


# The gateway's write of an input image into a local store, in a process whose files may not grow past 64 KiB
# (RLIMIT_FSIZE): the kernel refuses the write with EFBIG part-way, a real failed write with no full disk needed.
CAPPED_WRITE = """
import resource, signal, sys
from pathlib import Path
from service.contract.storage import LocalStorage, StorageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal that would end the process
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    LocalStorage(Path(sys.argv[1])).put_bytes("video_1/input.png", b"\\0" * 1_000_000, "image/png")
except StorageError as e:
    print("refused:", e)
"""


def test_a_failed_local_write_leaves_no_temporary_file(tmp_path):
    argv = [sys.executable, "-c", CAPPED_WRITE, str(tmp_path)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert "refused: storing video_1/input.png failed" in out.stdout, out.stdout + out.stderr
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == []
