"""Fidelity figures between a video (or tensor) and its reference.

Every function takes numpy arrays or torch tensors of the same shape and
computes in float64, so bf16 inputs are not judged by bf16 arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "relative_l2", "ssim"]


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_float64(a), _as_float64(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: a {a.shape} vs b {b.shape}")
    if a.size == 0:
        raise ValueError("cannot compare empty arrays")
    return a, b


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``; ``inf`` when identical.

    ``data_range`` is the span of valid values: 1.0 for frames in [0, 1], 255 for uint8.
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    a, b = _pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def relative_l2(a, b) -> float:
    """``||a - b|| / ||b||`` (Frobenius norms) with ``b`` the reference.

    0 when equal; ``inf`` when ``b`` is all zeros and ``a`` is not.
    """
    a, b = _pair(a, b)
    error = float(np.linalg.norm((a - b).ravel()))
    reference = float(np.linalg.norm(b.ravel()))
    if reference == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / reference


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(a, b, data_range: float = 1.0, channel_axis: int = -1, window_size: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004, https://doi.org/10.1109/TIP.2003.819861); 1 when identical.

    The images are the last three dims, channels at ``channel_axis``: ``-1``
    for frames ``(..., H, W, C)`` as pipelines return them with
    ``output_type="np"``, ``-3`` for ``(..., C, H, W)``.  Every leading dim
    (frames, videos) holds another image.  Each channel is compared with a
    Gaussian window (``window_size`` 11, ``sigma`` 1.5, shrunk to the image
    when it is smaller) over the valid region, constants ``K1 = 0.01``,
    ``K2 = 0.03``; the SSIM map is averaged per image, then over images.
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    if channel_axis not in (-1, -3):
        raise ValueError(f"channel_axis must be -1 (..., H, W, C) or -3 (..., C, H, W), got {channel_axis}")
    a, b = _pair(a, b)
    if a.ndim < 3:
        raise ValueError(f"ssim needs images with a channel axis, at least 3 dims, got shape {a.shape}")
    images = [torch.from_numpy(x) for x in (a, b)]
    if channel_axis == -1:
        images = [x.movedim(-1, -3) for x in images]
    channels, height, width = images[0].shape[-3:]
    x, y = (image.reshape(-1, channels, height, width) for image in images)
    size = min(window_size, height, width)
    size -= 1 - size % 2  # odd, so the window has a centre
    window = _gaussian_window(size, sigma)
    kernel_rows = window.view(1, 1, size, 1).repeat(channels, 1, 1, 1)
    kernel_cols = window.view(1, 1, 1, size).repeat(channels, 1, 1, 1)

    def local_mean(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian blur per channel, valid region only
        return F.conv2d(F.conv2d(z, kernel_rows, groups=channels), kernel_cols, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean(dim=(-3, -2, -1)).mean())
