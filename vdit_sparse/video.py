"""Turn a pipeline's frames into an array or an mp4 file.

Frames come in the forms a diffusers video pipeline returns for one video
(``pipe(...).frames[0]``): a list of PIL images (``output_type="pil"``), a
numpy array ``(F, H, W, C)`` (``"np"``), or a torch tensor ``(F, C, H, W)``
(``"pt"``). ``(F, H, W, C)`` arrays and tensors are accepted too, as uint8
in [0, 255] or float in [0, 1]. ``C`` is 3 (RGB), 1 (gray) or 4 (RGBA, alpha dropped).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = ["frames_to_array", "write_video"]

_MACRO_BLOCK = 16


def frames_to_array(frames) -> np.ndarray:
    """Frames as float32 ``(F, H, W, C)`` in [0, 1] (uint8 is divided by 255, floats are kept as given)."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames_to_array: got an empty list of frames")
        frames = np.stack([np.asarray(frame) for frame in frames])
    elif hasattr(frames, "detach"):  # torch tensor, without importing torch for numpy users
        tensor = frames.detach().cpu()
        if tensor.ndim == 4 and tensor.shape[1] in (1, 3, 4) and tensor.shape[-1] not in (1, 3, 4):
            tensor = tensor.permute(0, 2, 3, 1)  # output_type="pt" gives (F, C, H, W)
        frames = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    array = np.asarray(frames)
    if array.ndim == 3:  # (F, H, W) gray
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        hint = " (a batch? pass pipe(...).frames[0])" if array.ndim == 5 else ""
        raise ValueError(f"frames must be (F, H, W, C) with C in 1, 3, 4; got shape {array.shape}{hint}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float, got dtype {array.dtype}")
    return array.astype(np.float32)


def _codec_frames(frames, min_size: int) -> np.ndarray:
    """uint8 RGB ``(F, H, W, 3)`` enlarged and padded to a size every H.264 player takes."""
    array = frames_to_array(frames)
    if not np.isfinite(array).all():
        raise ValueError("frames contain NaN or inf; refusing to write a video of them")
    array = np.clip(array, 0.0, 1.0)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    rgb = np.rint(array[..., :3] * 255.0).astype(np.uint8)
    _, height, width, _ = rgb.shape
    # Integer nearest-neighbour enlargement: each pixel becomes a k x k block, nothing is blurred.
    scale = max(1, math.ceil(min_size / min(height, width)))
    if scale > 1:
        rgb = rgb.repeat(scale, axis=1).repeat(scale, axis=2)
    # yuv420p needs even sizes and many players want whole 16x16 macro blocks: pad bottom/right by replication.
    pad_h = -rgb.shape[1] % _MACRO_BLOCK
    pad_w = -rgb.shape[2] % _MACRO_BLOCK
    if pad_h or pad_w:
        rgb = np.pad(rgb, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(rgb)


def _write_imageio(rgb: np.ndarray, path: Path, fps: float) -> None:
    import imageio_ffmpeg

    _, height, width, _ = rgb.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec="libx264", quality=8, macro_block_size=1, ffmpeg_log_level="error"
    )
    writer.send(None)  # start the ffmpeg process
    try:
        for frame in rgb:
            writer.send(frame)
    finally:
        writer.close()


def _write_pyav(rgb: np.ndarray, path: Path, fps: float) -> None:
    from fractions import Fraction

    import av

    _, height, width, _ = rgb.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in rgb:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))  # flush the encoder


def write_video(frames, path: str | os.PathLike, fps: float = 8, *, min_size: int = 128, backend: str = "auto") -> Path:
    """Write frames to an H.264 mp4 and return its path.

    Tiny frames (the embedded pipelines make 32 x 32) are enlarged by an
    integer nearest-neighbour factor until the short side is at least
    ``min_size`` pixels (``min_size=1`` keeps the size), then padded at the
    bottom and right by edge replication to a multiple of 16, so every player
    opens the file; the frame count and order are unchanged. Float frames are
    clipped to [0, 1].

    ``backend``: ``"imageio"`` (imageio-ffmpeg's bundled ffmpeg), ``"pyav"``,
    or ``"auto"`` (imageio, then PyAV if that fails).
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if backend not in ("auto", "imageio", "pyav"):
        raise ValueError(f"backend must be 'auto', 'imageio' or 'pyav', got {backend!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = _codec_frames(frames, min_size)
    if backend == "pyav":
        _write_pyav(rgb, path, fps)
        return path
    try:
        _write_imageio(rgb, path, fps)
    except Exception as imageio_error:  # missing binary, broken pipe, codec absent, ...
        if backend == "imageio":
            raise
        try:
            _write_pyav(rgb, path, fps)
        except Exception as pyav_error:
            raise RuntimeError(
                f"could not write {str(path)!r}: imageio-ffmpeg failed ({imageio_error!r}) "
                f"and PyAV failed ({pyav_error!r})"
            ) from pyav_error
    return path
