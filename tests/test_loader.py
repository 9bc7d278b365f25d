"""Tests for the fast loader: data.read_frames decodes only what the chosen frames need and returns
the same frames as a plain full decode; `data.py --prepare` and `--benchmark`; train.py's
--clips-per-video and --compile.

The reference for every frame is PyAV's own full decode, in order, written here: the shortcut
(jumps to keyframes, non-reference frames skipped) must not change a single byte.
"""
import contextlib
import json
import os
import random
import re

import av
import numpy as np
import pytest
import torch

import data


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def moving_texture(num_frames, height=48, width=64, seed=0):
    """uint8 (T, H, W, 3): a textured pattern drifting across the frame, so every frame differs
    from the last and predicted frames carry real motion."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height, 2 * width, 3)).astype(np.uint8)
    return np.stack([np.roll(texture, -3 * t, axis=1)[:, :width] for t in range(num_frames)])


FAST = {"deadline": "realtime", "cpu-used": "8"}
# Short GOPs, so that late frames are reached by a jump to a keyframe, not by decoding on
STREAMS = {
    "h264_bframes.mp4": ("libx264", {"g": "8"}),  # x264's default: 3 B-frames, b-pyramid
    "h264_open_gop.mkv": ("libx264", {"g": "8", "x264-params": "open-gop=1:bframes=3:"
                                                               "b-pyramid=strict:scenecut=0"}),
    "xvid_bframes.avi": ("mpeg4", {"g": "8", "bf": "2"}),  # HMDB51 / UCF101's Xvid
    "vp9.webm": ("libvpx-vp9", dict(FAST, g="8")),         # SSv2
}


def full_decode(path):
    """Every frame, in the order PyAV's decoder returns them: the reference."""
    with av.open(path) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("name", STREAMS)
def test_read_frames_is_bit_identical_to_a_full_decode(tmp_path, name, monkeypatch):
    codec, options = STREAMS[name]
    path = str(tmp_path / name)
    data.write_video(path, moving_texture(40), codec=codec, options=options, bit_rate=400_000)
    reference = full_decode(path)
    assert len(reference) == 40
    calls = []
    real = data._decode_in_order
    monkeypatch.setattr(data, "_decode_in_order", lambda *a: calls.append(1) or real(*a))
    rng = random.Random(0)
    index_sets = [[39], [30, 39], [33, 34, 35], [0, 39], [5, 17, 17, 2, 38],   # late-only: jumps
                  data.eval_indices(40, 8)[0], sum(data.eval_indices(40, 4, 3), [])]
    index_sets += [sorted(rng.sample(range(40), k)) for k in (1, 3, 8, 8, 16)]
    for indices in index_sets:
        frames = data.read_frames(path, lambda n: indices)
        for i, frame in zip(indices, frames):
            assert np.array_equal(frame, reference[i]), \
                f"{name}: frame {i} of indices {indices} differs from a full decode"
    assert not calls, f"{name}: fell back to decoding every frame in order"


class _LyingContainer:
    """A container whose index calls every packet a keyframe, as some damaged AVI indexes do."""

    def __init__(self, container):
        self._container = container

    def __getattr__(self, name):
        return getattr(self._container, name)

    def demux(self, *streams):
        for packet in self._container.demux(*streams):
            packet.is_keyframe = True
            yield packet


def test_a_lying_keyframe_index_still_gives_the_right_frames(tmp_path, monkeypatch):
    path = str(tmp_path / "v.avi")  # mpeg4 decodes a P-frame without its reference: wrong pixels
    data.write_video(path, moving_texture(40), codec="mpeg4", options={"g": "20"})
    reference = full_decode(path)
    real_open = data._open_video

    @contextlib.contextmanager
    def lying_open(p):
        with real_open(p) as (container, stream):
            yield _LyingContainer(container), stream
    monkeypatch.setattr(data, "_open_video", lying_open)
    for indices in ([37], [10, 25, 37]):
        frames = data.read_frames(path, lambda n: indices)
        assert all(np.array_equal(f, reference[i]) for i, f in zip(indices, frames)), \
            f"indices {indices}: a P-frame taken for a keyframe gave other pixels"
