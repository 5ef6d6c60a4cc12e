"""Video decode and encode through PyAV, keeping fps, size and frame count.

Decoding streams frames (or chunks of frames), so memory does not grow with video length.
Encoding writes constant-rate streams whose timestamps are frame indices at the input's
average rate: the output has exactly the frames it was given, at the input's fps.

Kinds of output:
- ``h264``: the exported dataset (MP4, libx264; yuv420p, or yuv444p when a side is odd,
  since 4:2:0 needs even sizes).
- ``rgb``, ``rgba``, ``gray``, ``gray16``: lossless FFV1 in Matroska for intermediate
  artifacts, so one stage's output reaches the next bit-exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".gif", ".m4v", ".mpg", ".mpeg")

Kind = Literal["h264", "rgb", "rgba", "gray", "gray16"]


class VideoDecodeError(RuntimeError):
    """The file cannot be read as a video; the message says why."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps_num: int
    fps_den: int
    frame_count: int  # from the container; -1 when it does not say (decode to know)
    codec: str

    @property
    def fps(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)

    def to_dict(self) -> dict:
        return asdict(self)


def _open(path: Path) -> av.container.InputContainer:
    path = Path(path)
    if not path.exists():
        raise VideoDecodeError(f"{path}: file does not exist")
    if not os.access(path, os.R_OK):
        raise VideoDecodeError(f"{path}: permission denied")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(str(path), mode="r")
    except av.error.FFmpegError as exc:
        raise VideoDecodeError(f"{path}: not a readable video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: no video stream")
    return container


def _stream_fps(stream: av.video.stream.VideoStream) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            fps = Fraction(rate)
            # Some containers report absurd averages (e.g. 90000/1); clamp to sane rates.
            if 0 < fps <= 1000:
                return fps.limit_denominator(100000)
    return Fraction(25, 1)


def probe(path: Path) -> VideoInfo:
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        ctx = stream.codec_context
        if not ctx.width or not ctx.height:
            raise VideoDecodeError(f"{path}: video stream has no frame size")
        return VideoInfo(
            width=int(ctx.width),
            height=int(ctx.height),
            fps_num=fps.numerator,
            fps_den=fps.denominator,
            frame_count=int(stream.frames or -1),
            codec=str(ctx.name),
        )
    finally:
        container.close()


def iter_frames(path: Path, fmt: str = "rgb24") -> Iterator[np.ndarray]:
    """Yield decoded frames as uint8 arrays (H, W, 3) for rgb24, (H, W, 4) for rgba,
    (H, W) for gray, and uint16 (H, W) for gray16le."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        count = 0
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format=fmt)
                count += 1
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(f"{path}: decoding failed after {count} frames ({exc})") from exc
        if count == 0:
            raise VideoDecodeError(f"{path}: no decodable frames")
    finally:
        container.close()


def iter_chunks(path: Path, chunk: int, fmt: str = "rgb24") -> Iterator[np.ndarray]:
    """Frames stacked into arrays of at most `chunk` frames."""
    buf: list[np.ndarray] = []
    for frame in iter_frames(path, fmt):
        buf.append(frame)
        if len(buf) == chunk:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def count_frames(path: Path) -> int:
    return sum(1 for _ in iter_frames(path, "gray"))


_LOSSLESS_FORMATS = {"rgb": "bgr0", "rgba": "bgra", "gray": "gray", "gray16": "gray16le"}
_INPUT_FORMATS = {"rgb": "rgb24", "rgba": "rgba", "gray": "gray", "gray16": "gray16le"}


class VideoWriter:
    """Write frames one by one (or in chunks) to `path` at `fps`.

    Use as a context manager; `close()` flushes the encoder. The caller is responsible
    for writing into a temporary location and renaming (the runner does this for
    artifacts, export for the dataset).
    """

    def __init__(
        self,
        path: Path,
        fps: Fraction,
        width: int,
        height: int,
        kind: Kind = "h264",
        crf: int = 18,
    ):
        self.path = Path(path)
        self.kind = kind
        self.width, self.height = int(width), int(height)
        self.frames = 0
        fps = Fraction(fps).limit_denominator(100000)
        self._container = av.open(str(self.path), mode="w")
        if kind == "h264":
            stream = self._container.add_stream("libx264", rate=fps)
            even = self.width % 2 == 0 and self.height % 2 == 0
            stream.pix_fmt = "yuv420p" if even else "yuv444p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            self._in_format = "rgb24"
        else:
            stream = self._container.add_stream("ffv1", rate=fps)
            stream.pix_fmt = _LOSSLESS_FORMATS[kind]
            self._in_format = _INPUT_FORMATS[kind]
        stream.width, stream.height = self.width, self.height
        self._frame_time_base = Fraction(1, 1) / fps
        self._stream = stream

    def write(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame)
        if self.kind == "h264" and frame.ndim == 2:
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        if frame.shape[0] != self.height or frame.shape[1] != self.width:
            raise ValueError(
                f"{self.path.name}: frame {frame.shape[:2]} does not match "
                f"{(self.height, self.width)}"
            )
        vf = av.VideoFrame.from_ndarray(frame, format=self._in_format)
        vf.pts = self.frames
        vf.time_base = self._frame_time_base
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames += 1

    def write_chunk(self, frames: np.ndarray) -> None:
        for frame in frames:
            self.write(frame)

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
