"""Tests for the fast loader: data.read_frames decodes only what the chosen frames need and returns
the same frames as a plain full decode; `data.py --prepare` and `--benchmark`; train.py's
--clips-per-video and --compile.

The reference for every frame is PyAV's own full decode, in order, written here: the shortcut
(jumps to keyframes, non-reference frames skipped) must not change a single byte.
"""
import contextlib
import fractions
import json
import math
import os
import random
import re

import av
import numpy as np
import pytest
import torch

import data


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


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


def test_a_stream_that_changes_its_size_midway_decodes_at_the_first_frames_size(tmp_path):
    """Two H.264 segments of different sizes in one stream (a phone's resolution switch, clips
    joined without re-encoding): a clip that spans the change comes at the first size, the
    first segment's frames bit for bit (np.stack of both sizes was a ValueError traceback in
    the doctor); a clip inside one segment is that segment's frames, untouched."""
    segments = []
    for i, (width, height) in enumerate([(64, 48), (96, 72)]):
        raw = str(tmp_path / f"{i}.h264")
        with av.open(raw, "w", format="h264") as out:
            stream = out.add_stream("libx264", rate=30, options={"preset": "ultrafast"})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for t, array in enumerate(moving_texture(12, height, width, seed=i)):
                frame = av.VideoFrame.from_ndarray(array, format="rgb24")
                frame.pts = t
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        segments.append(open(raw, "rb").read())
    (tmp_path / "joined.h264").write_bytes(b"".join(segments))
    path = str(tmp_path / "joined.mkv")
    with av.open(str(tmp_path / "joined.h264")) as source, av.open(path, "w") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for t, packet in enumerate(p for p in source.demux(video=0) if p.size):
            packet.stream, packet.pts, packet.dts = stream, t, t
            packet.time_base = stream.time_base = fractions.Fraction(1, 30)
            out.mux(packet)
    reference = full_decode(path)
    assert [f.shape for f in reference[11:13]] == [(48, 64, 3), (72, 96, 3)]
    assert data.check_video(path) == 24                                  # the doctor: OK
    frames = data.read_frames(path, lambda n: [0, 11, 12, 23])
    assert frames.shape == (4, 48, 64, 3)
    assert np.array_equal(frames[0], reference[0]) and np.array_equal(frames[1], reference[11])
    assert abs(frames[3].astype(int).mean() - reference[23].astype(int).mean()) < 8  # scaled
    late = data.read_frames(path, lambda n: [12, 23])
    assert np.array_equal(late[0], reference[12]) and np.array_equal(late[1], reference[23])


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


# ---------------------------------------------------------------------------------------------
# train.py: --clips-per-video K (MAE-ST's repeated sampling) and --compile

@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """3 classes x 8 videos in HMDB51's layout: 18 training videos in split 1."""
    root = str(tmp_path_factory.mktemp("train") / "hmdb")
    data.make_synthetic_dataset(root, num_classes=3, videos_per_class=8, frames=8, size=(64, 48))
    return root


def train_args(root, out, *more):
    """18 videos / batch 4 = 4 steps per epoch, tiny random CLIP, no workers, no evaluation."""
    return ["--dataset", "hmdb51", "--data-root", root, "--model", "tiny", "--frames", "2",
            "--batch-size", "4", "--per-gpu-batch", "4", "--epochs", "1", "--warmup-epochs", "0",
            "--lr", "1e-2", "--min-lr", "1e-3", "--log-every", "1", "--no-eval", "--workers", "0",
            "--out", str(out), *more]


def logged_losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [record["loss"] for record in map(json.loads, f) if "step" in record
                and "epoch" in record and not isinstance(record["epoch"], int)]


def test_clips_of_one_video_are_decoded_once_each_with_its_own_draw(train_data, monkeypatch):
    import train
    samples, _ = data.load_dataset("hmdb51", train_data, 1, "train")
    dataset = train.EpochSeededDataset(data.VideoDataset(samples, 2, train=True, size=32), seed=5,
                                       clips_per_video=3)
    decodes = []
    read = data.read_frames
    monkeypatch.setattr(data, "read_frames", lambda *a, **k: decodes.append(1) or read(*a, **k))
    clips = dataset[(2, 7)]  # (epoch, video index)
    assert len(decodes) == 1 and len(clips) == 3, "K clips must come from one decode"
    assert [c["index"] for c in clips] == [7, 7, 7]
    videos = [c["video"] for c in clips]
    assert not torch.equal(videos[0], videos[1]) and not torch.equal(videos[1], videos[2])
    again = dataset[(2, 7)]  # a resumed run draws the same clips
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(clips, again))
    assert not torch.equal(dataset[(3, 7)][0]["video"], videos[0])  # a new draw each epoch
    batch = data.collate([clips, dataset[(2, 8)]])
    assert batch["video"].shape == (6, 2, 3, 32, 32) and batch["index"].tolist() == [7] * 3 + [8] * 3


def test_two_clips_per_video_train_on_cpu_and_deal_each_video_once_per_two_epochs(
        train_data, tmp_path, monkeypatch):
    import train
    keys = []
    get_item = train.EpochSeededDataset.__getitem__
    monkeypatch.setattr(train.EpochSeededDataset, "__getitem__",
                        lambda self, key: keys.append(key) or get_item(self, key))
    out = tmp_path / "k2"
    train.main(train_args(train_data, out, "--clips-per-video", "2", "--epochs", "2"))
    # the schedule keeps its clips: 4 steps of 4 clips an epoch = 8 videos x 2 clips
    assert [epoch for epoch, _ in keys] == [0] * 8 + [1] * 8
    videos = [index for _, index in keys]
    assert len(set(videos)) == 16, f"videos {videos}: two epochs must deal 16 different videos"
    with open(out / "log.jsonl") as f:  # each step line says how long it waited for data
        waits = [r["data_wait"] for r in map(json.loads, f) if "data_wait" in r]
    assert len(waits) == 8 and all(0 <= w <= 1 for w in waits), waits
    losses = logged_losses(out)
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses), losses
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8


def test_compile_trains_with_the_same_losses_on_cpu(train_data, tmp_path, monkeypatch):
    """aot_eager: TorchDynamo's capture and AOT autograd in seconds; inductor compiles the same
    graphs into C++ (a minute for this model on two cores)."""
    import train
    train.main(train_args(train_data, tmp_path / "eager"))
    compiled_with = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: compiled_with.append(kw) or compile_(model, **kw))
    train.main(train_args(train_data, tmp_path / "compiled", "--compile", "aot_eager"))
    assert compiled_with == [dict(backend="aot_eager")], compiled_with
    eager, compiled = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "compiled")
    assert len(eager) == 4
    assert compiled == pytest.approx(eager, abs=1e-4), "torch.compile changed the losses"


def test_persistent_workers_draw_each_epoch_as_the_main_process_does(train_data, tmp_path):
    """A persistent worker keeps its own copy of the dataset: the epoch must reach it with each
    index, or its second epoch would repeat the first one's augmentation."""
    import train
    train.main(train_args(train_data, tmp_path / "inline", "--epochs", "2"))
    train.main(train_args(train_data, tmp_path / "workers", "--epochs", "2", "--workers", "1"))
    inline, workers = logged_losses(tmp_path / "inline"), logged_losses(tmp_path / "workers")
    assert len(inline) == 8 and workers == inline, (inline, workers)
