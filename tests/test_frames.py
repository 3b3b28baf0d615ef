"""worker/frames.py: the conversion on the pipeline's device gives the bytes the CPU conversion it replaced gave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker import frames


def cpu_path(video: torch.Tensor) -> np.ndarray:
    """What the worker did before: diffusers' output_type="np" (permute, float32 on the CPU), then numpy."""
    as_np = video.cpu().permute(0, 2, 3, 1).float().numpy()
    return (np.clip(as_np, 0.0, 1.0) * 255.0).round().astype(np.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_device_conversion_is_byte_identical_to_the_cpu_path(dtype):
    g = torch.Generator().manual_seed(0)
    # More frames than one chunk, values past both ends, and exact half-way points (k + 0.5) / 255 that the
    # rounding mode decides.
    video = torch.rand((frames.CHUNK + 5, 3, 8, 6), generator=g) * 1.2 - 0.1
    halves = (torch.arange(256, dtype=torch.float32) + 0.5) / 255.0
    video.view(-1)[: halves.numel()] = halves
    video = video.to(dtype)
    before = video.clone()
    out = frames.to_uint8(video)
    assert out.dtype == np.uint8 and out.shape == (frames.CHUNK + 5, 8, 6, 3) and out.flags.c_contiguous
    assert np.array_equal(out, cpu_path(video))
    assert torch.equal(video, before)  # the caller's tensor is not written


def test_non_finite_values_are_found():
    video = torch.zeros((2, 3, 4, 4))
    assert frames.all_finite(video)
    video[1, 2, 3, 3] = float("nan")
    assert not frames.all_finite(video)
    video[1, 2, 3, 3] = float("inf")
    assert not frames.all_finite(video)
