"""Video files written with PyAV decode back to the frames that went in."""

import numpy as np
import pytest

from streamdit.data import Scene, render
from streamdit.video import VideoWriter, read_video, write_video


def test_mp4_round_trip(tmp_path):
    frames = render(Scene("red", "circle", "large", "right", "quickly", "white", 30.0, 60.0), 20)
    path = write_video([frames[:8], frames[8:19], frames[19]], tmp_path / "clip.mp4", fps=16)  # chunks and a frame
    decoded = read_video(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3  # H.264 at crf 18: close, not exact


def test_odd_sizes_are_padded_and_bad_frames_rejected(tmp_path):
    with VideoWriter(tmp_path / "odd.mp4") as writer:
        writer.write(np.zeros((3, 15, 17, 3), np.uint8))
        with pytest.raises(ValueError, match="not uint8"):
            writer.write(np.zeros((3, 15, 17), np.float32))
    assert read_video(tmp_path / "odd.mp4").shape == (3, 16, 18, 3)
