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


# ---------------------------------------------------------------------------------------------
# data.py --prepare: a copy of the dataset that loads fast

def snapshot(folder):
    """{relative path: (size, mtime)} of every file: what "untouched" means."""
    return {os.path.relpath(os.path.join(d, f), folder):
            (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(folder) for f in files}


def psnr(reference, frames):
    """dB over whole clips of uint8 frames."""
    mse = np.mean((reference.astype(np.float64) - frames.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


def resized(frames, height, width):
    """The originals at the copy's size: antialiased bilinear, as a careful resize would."""
    clip = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, 3, H, W)
    small = torch.nn.functional.interpolate(clip.float(), size=(height, width), mode="bilinear",
                                            antialias=True)
    return small.round().clamp(0, 255).permute(0, 2, 3, 1).numpy()  # (T, h, w, 3)


@pytest.fixture(scope="module")
def small_hmdb(tmp_path_factory):
    """An HMDB51 layout: 2 classes x 3 videos of 24 frames, 96 x 64 mpeg4 AVI."""
    root = str(tmp_path_factory.mktemp("src") / "hmdb51")
    data.make_synthetic_dataset(root, num_classes=2, videos_per_class=3, frames=24, size=(96, 64))
    return root


def test_prepare_writes_a_copy_that_reads_like_the_source(small_hmdb, tmp_path, capsys):
    src, dst = small_hmdb, str(tmp_path / "fast")
    before = snapshot(src)
    args = ["--dataset", "hmdb51", "--data-root", src, "--prepare", dst, "--short-side", "32",
            "--gop", "8", "--workers", "2"]
    assert data.main(args) == 0
    assert "6 written" in capsys.readouterr().out
    assert snapshot(src) == before, "--prepare changed a file of the source"
    for split in (1, 2, 3):  # the same lists and classes, read from the copy
        for subset in ("train", "test"):
            samples, classes = data.load_dataset("hmdb51", src, split, subset)
            copied, copied_classes = data.load_dataset("hmdb51", dst, split, subset)
            assert copied_classes == classes
            assert copied == [(os.path.join(dst, os.path.relpath(p, src)), label)
                              for p, label in samples]
    for path, _ in data.load_dataset("hmdb51", src, 1, "train")[0] + \
            data.load_dataset("hmdb51", src, 1, "test")[0]:
        copy = os.path.join(dst, os.path.relpath(path, src))
        original, fast = np.stack(full_decode(path)), np.stack(full_decode(copy))
        assert fast.shape == (24, 32, 48, 3), f"{copy}: {fast.shape}, want 24 frames of 32 x 48"
        quality = psnr(resized(original, 32, 48), fast)
        assert quality >= 30, f"{copy}: {quality:.1f} dB against the resized original"
        with av.open(copy) as container:
            keys = [i for i, p in enumerate(container.demux(video=0)) if p.size and p.is_keyframe]
        assert keys == [0, 8, 16], f"{copy}: keyframes at {keys}, want every 8 frames"
    assert data.main(["--dataset", "hmdb51", "--data-root", dst]) == 0  # the doctor passes it
    # a rerun keeps what is done (and checks it); a damaged copy is written again
    done = snapshot(dst)
    victim = os.path.join(dst, "move_left", "move_left_01.avi")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    capsys.readouterr()
    assert data.main(args) == 0
    assert "1 written, 5 already done and checked" in capsys.readouterr().out
    assert snapshot(dst) == {**done, os.path.relpath(victim, dst): snapshot(dst)[
        os.path.relpath(victim, dst)]}
    assert data.check_video(victim) == 24


def test_prepare_lists_unreadable_videos_and_never_writes_into_the_source(small_hmdb, tmp_path,
                                                                          capsys):
    src = str(tmp_path / "src")
    os.makedirs(src)
    for rel in snapshot(small_hmdb):
        os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
        with open(os.path.join(small_hmdb, rel), "rb") as f:
            content = f.read()
        if rel.endswith("move_right_02.avi"):
            content = b"not a video\n" * 50
        with open(os.path.join(src, rel), "wb") as f:
            f.write(content)
    bad = os.path.join(src, "move_right", "move_right_02.avi")
    dst = str(tmp_path / "dst")
    assert data.main(["--dataset", "hmdb51", "--data-root", src, "--prepare", dst,
                      "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert [line.split(": ")[0] for line in out.splitlines() if line.startswith("BAD")] == \
        [f"BAD {bad}"], out
    assert not os.path.exists(os.path.join(dst, "move_right", "move_right_02.avi"))
    assert os.path.isfile(os.path.join(dst, "move_right", "move_right_01.avi"))
    before = snapshot(src)
    for inside in (src, os.path.join(src, "fast")):
        assert data.main(["--dataset", "hmdb51", "--data-root", src, "--prepare", inside]) == 2
        assert re.search(r"error: --prepare .*: inside --data-root", capsys.readouterr().err)
    assert snapshot(src) == before


# ---------------------------------------------------------------------------------------------
# data.py --benchmark: CPU per clip and the cores a GPU needs

def test_benchmark_prints_cores_per_gpu_from_its_own_timing(small_hmdb, tmp_path, capsys):
    base = ["--dataset", "hmdb51", "--data-root", small_hmdb, "--benchmark", "--videos", "2",
            "--frames", "4"]
    assert data.main(base) == 0
    out = capsys.readouterr().out
    ms = float(re.search(r"([\d.]+) CPU-ms per clip", out).group(1))
    per_core = float(re.search(r"([\d.]+) clips per core-second", out).group(1))
    gpu = float(re.search(r"GPU: ([\d.]+) training clips/s", out).group(1))
    cores = float(re.search(r"cores per GPU: ([\d.]+)", out).group(1))
    assert per_core == pytest.approx(1000 / ms, rel=0.02)
    assert cores == pytest.approx(gpu / per_core, rel=0.02)
    # ViT-B/16 at T=8 (the default model) trains with 402.6 G multiply-adds a clip (eval.py
    # --benchmark's count): at 30% of an H100's 989 TFLOP/s, 2 FLOPs a multiply-add, 368 clips/s
    assert data.main(base[:-2] + ["--frames", "8"]) == 0
    gpu = float(re.search(r"GPU: ([\d.]+) training", capsys.readouterr().out).group(1))
    assert gpu == pytest.approx(0.3 * 989e12 / (2 * 402.6e9), rel=0.01)
    measured = tmp_path / "h100.json"  # what `eval.py --benchmark --json` writes on the GPU
    measured.write_text(json.dumps(dict(train_clips_per_s=500.0, device_name="NVIDIA H100",
                                        model="ViT-B/16", frames=4)))
    assert data.main(base + ["--gpu-json", str(measured)]) == 0
    out = capsys.readouterr().out
    per_core = float(re.search(r"([\d.]+) clips per core-second", out).group(1))
    cores = float(re.search(r"cores per GPU: ([\d.]+)", out).group(1))
    assert "GPU: 500 training clips/s" in out
    assert cores == pytest.approx(500 / per_core, rel=0.02)
    assert "--prepare would" in out
