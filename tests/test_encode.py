"""worker/encode.py: the same frames make the same MP4, byte for byte, every time."""

from __future__ import annotations

import hashlib

import av
import numpy as np

from worker import encode


def smooth_frames() -> np.ndarray:
    """25 frames of 96x64 (the tiny models' size) of moving gradients with a little noise: content on which
    libx264's AVX-512 rate control varied from run to run."""
    t = np.arange(25)[:, None, None, None]
    y = np.arange(64)[None, :, None, None]
    x = np.arange(96)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    waves = np.sin(x / 9 + t / 5 + c) * 60 + np.cos(y / 7 - t / 3) * 60 + 128
    noise = np.random.default_rng(1).integers(-8, 8, waves.shape)
    return (waves + noise).clip(0, 255).astype(np.uint8)


def test_the_same_frames_encode_to_the_same_mp4(tmp_path):
    frames = smooth_frames()
    digests = set()
    for i in range(30):
        path = tmp_path / f"{i}.mp4"
        encode.write_mp4(frames, path)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1, f"{len(digests)} different MP4s from 30 encodes of the same frames"
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == len(frames) and decoded[0].shape == frames[0].shape
