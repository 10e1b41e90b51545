"""Frames to video files with PyAV: H.264 (yuv420p) in MP4 files or in MPEG-TS segments for live playback."""

from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np


class VideoWriter:
    """Writes uint8 frames (H, W, 3), or arrays of them (f, H, W, 3), to an H.264 file; timestamps continue across
    `write` calls, so a stream can be appended chunk by chunk. Odd sizes are padded to even (yuv420p needs it)."""

    def __init__(self, path, fps: int = 16, format: str | None = None, crf: int = 18, start_frame: int = 0):
        # start_frame: the first frame's timestamp, so consecutive segments of one stream continue each other's clock
        self.path, self.fps, self.start_frame = Path(path), fps, start_frame
        self.container = av.open(str(path), mode="w", format=format)
        self.stream = self.container.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "veryfast"})
        self.stream.pix_fmt = "yuv420p"
        self.frames = 0

    def write(self, frames: np.ndarray):
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames of shape {frames.shape} and dtype {frames.dtype} are not uint8 (f, H, W, 3)")
        h, w = frames.shape[1:3]
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self.frames == 0:
            self.stream.height, self.stream.width = frames.shape[1:3]
        for frame in frames:
            packet_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            packet_frame.pts = self.start_frame + self.frames
            self.container.mux(self.stream.encode(packet_frame))
            self.frames += 1

    def close(self):
        if self.container is not None:
            self.container.mux(self.stream.encode())  # flush
            self.container.close()
            self.container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_video(frames: Iterable[np.ndarray], path, fps: int = 16) -> Path:
    """Writes an iterable of frames or frame arrays to an .mp4 file and returns its path."""
    with VideoWriter(path, fps) as writer:
        for item in frames:
            writer.write(item)
    return Path(path)


def read_video(path) -> np.ndarray:
    """Decodes a video file to uint8 (f, H, W, 3)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
