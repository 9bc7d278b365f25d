"""Tests for data.py: decoding, sampling, transforms, dataset layouts, few-shot lists, the doctor,
and bad input (damaged videos of every container, layouts, class lists, flags): one line naming it.

Every video is written by the test itself with PyAV. A frame's content encodes its index (eight
black/white stripes, one bit each), so a test reads back *which* frame it got, not only how many.
Expected values are computed here, independently: CLIP's statistics typed in, segment indices
from the formula, pixel positions from the geometry, class ids from each dataset's own rule.
"""
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

# OpenAI CLIP's pretraining statistics, typed here from CLIP's own code, not read from data.py
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def index_video(num_frames, width=64, height=48):
    """uint8 (T, H, W, 3): frame i shows i in binary as 8 vertical stripes, white = 1."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    stripe = width // 8
    for i in range(num_frames):
        for bit in range(8):
            if (i >> bit) & 1:
                frames[i, :, bit * stripe:(bit + 1) * stripe] = 255
    return frames


def frame_ids(frames):
    """Inverse of index_video, robust to compression: threshold each stripe's mean."""
    stripe = frames.shape[2] // 8
    return [sum(int(f[:, b * stripe:(b + 1) * stripe].mean() > 127) << b for b in range(8))
            for f in frames]


def encode(path, frames, codec="mpeg4", bit_rate=None):
    """data.write_video, with libvpx's realtime mode (ten times faster) for WebM."""
    fast = dict(deadline="realtime", **{"cpu-used": "8"}) if codec.startswith("libvpx") else {}
    data.write_video(str(path), frames, codec=codec, options=fast, bit_rate=bit_rate)
    return str(path)


def write_index_video(path, num_frames=40, codec="mpeg4"):
    return encode(path, index_video(num_frames), codec)


# ---------------------------------------------------------------------------------------------
# Decoding

@pytest.mark.parametrize("codec, suffix", [("mpeg4", ".avi"),        # HMDB51 / UCF101 (Xvid)
                                           ("libx264", ".mp4"),      # Kinetics (H.264, B-frames)
                                           ("libvpx-vp9", ".webm")])  # SSv2 (no frame count)
def test_decode_returns_the_frames_asked_for(tmp_path, codec, suffix):
    path = write_index_video(tmp_path / f"clip{suffix}", 40, codec)
    if suffix == ".webm":  # the case under test: the container reports no frame count
        with av.open(path) as container:
            assert container.streams.video[0].frames == 0
    assert data.count_frames(path) == 40
    wanted = [0, 5, 17, 39, 17]
    frames = data.read_frames(path, lambda n: wanted)
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
    assert frame_ids(frames) == wanted


def test_webm_sampling_uses_the_counted_frames(tmp_path):
    path = write_index_video(tmp_path / "clip.webm", 80, "libvpx-vp9")
    seen = []
    frames = data.read_frames(path, lambda n: seen.append(n) or data.eval_indices(n, 8)[0])
    assert seen == [80]
    assert frame_ids(frames) == [5, 15, 25, 35, 45, 55, 65, 75]


def test_short_video_repeats_frames_in_order(tmp_path):
    path = write_index_video(tmp_path / "short.avi", 5)
    assert data.eval_indices(5, 8) == [[0, 0, 1, 2, 2, 3, 4, 4]]
    frames = data.read_frames(path, lambda n: data.eval_indices(n, 8)[0])
    assert frame_ids(frames) == [0, 0, 1, 2, 2, 3, 4, 4]
    video = data.VideoDataset([(path, 0)], frames=8, train=True, size=32)[0]["video"]
    assert video.shape == (8, 3, 32, 32)


@pytest.mark.parametrize("codec, suffix", [("mpeg4", ".avi"), ("libx264", ".mp4")])
def test_colours_arrive_in_rgb_order_with_clips_mean_and_std(tmp_path, codec, suffix):
    colours = [(230, 30, 30), (30, 200, 60), (40, 60, 220), (200, 120, 40)]  # 2 x 2 blocks
    frame = np.zeros((64, 64, 3), np.uint8)
    for k, colour in enumerate(colours):
        frame[32 * (k // 2):32 * (k // 2 + 1), 32 * (k % 2):32 * (k % 2 + 1)] = colour
    path = encode(tmp_path / f"colours{suffix}", np.repeat(frame[None], 4, 0), codec, 4_000_000)
    # S = 56: short side 64 stays 64, centre crop rows and columns 4..59, no resampling
    video = data.VideoDataset([(path, 0)], frames=2, train=False, size=56)[0]["video"]
    assert video.shape == (1, 2, 3, 56, 56)
    for k, colour in enumerate(colours):
        y, x = 32 * (k // 2) + 16 - 4, 32 * (k % 2) + 16 - 4  # the block's centre in the crop
        got = video[0, :, :, y - 6:y + 6, x - 6:x + 6].mean((0, 2, 3))  # (3,)
        expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD)])
        # the codec's yuv420p round trip moves a colour by at most 3 of 255 levels; BGR order
        # or ImageNet's std moves these by 10 levels or more
        torch.testing.assert_close(got, expected, atol=4 / 255 / 0.26, rtol=0,
                                   msg=lambda m: f"colour block {k} {colour}: {m}")
    # ImageNet's mean is within a level of CLIP's: check the normalisation itself, exactly
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    expected = torch.stack([(levels[:, c] - m) / s
                            for c, (m, s) in enumerate(zip(CLIP_MEAN, CLIP_STD))], 1)
    torch.testing.assert_close(data.normalize(levels.clone()), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Sparse segment sampling

def test_test_sampler_takes_segment_centres_and_shifts_them_per_view():
    assert data.eval_indices(80, 8) == [[5, 15, 25, 35, 45, 55, 65, 75]]
    assert data.eval_indices(80, 8, temporal_views=2) == [[2, 12, 22, 32, 42, 52, 62, 72],
                                                          [7, 17, 27, 37, 47, 57, 67, 77]]
    four = data.eval_indices(80, 8, temporal_views=4)  # offsets 1/8, 3/8, 5/8, 7/8 of a segment
    assert [view[0] for view in four] == [1, 3, 6, 8] and four[3][-1] == 78


def test_train_sampler_draws_one_frame_per_segment():
    indices = data.train_indices(80, 8, torch.Generator().manual_seed(0))
    u = torch.rand(8, generator=torch.Generator().manual_seed(0))
    assert indices == [10 * i + int(10 * u[i]) for i in range(8)]  # segment i is [10i, 10i + 10)
    assert indices == data.train_indices(80, 8, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    draws = torch.tensor([data.train_indices(80, 8, generator) for _ in range(300)])  # (300, T)
    offsets = draws - 10 * torch.arange(8)
    assert offsets.min() == 0 and offsets.max() == 9  # every frame of a segment can be drawn
    assert len(set(map(tuple, draws.tolist()))) > 250


@pytest.mark.parametrize("num_frames, T", [(50, 8), (7, 3), (5, 8), (301, 32)])
def test_sampled_indices_for_lengths_that_do_not_divide(num_frames, T):
    length = num_frames / T  # segment i is [i * length, (i + 1) * length)
    for views in (1, 2, 3):
        expected = [[min(math.floor((i + (v + 0.5) / views) * length), num_frames - 1)
                     for i in range(T)] for v in range(views)]
        assert data.eval_indices(num_frames, T, views) == expected, f"{views} temporal views"
    u = torch.rand(T, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    drawn = data.train_indices(num_frames, T, torch.Generator().manual_seed(3))
    assert drawn == [min(math.floor((i + u[i].item()) * length), num_frames - 1) for i in range(T)]
    if num_frames >= T:  # one frame inside each segment
        assert all(i * length - 1 < index < (i + 1) * length for i, index in enumerate(drawn))


def test_training_item_draws_its_frames_and_augmentation_from_one_seeded_generator(tmp_path):
    path = write_index_video(tmp_path / "v.avi", 60)
    dataset = data.VideoDataset([(path, 0), (path, 0)], frames=6, train=True, size=32, seed=11)
    for index in (0, 1):
        state = np.random.SeedSequence([11, index]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        u = torch.rand(6, generator=generator)  # the indices' draw comes first...
        expected_indices = [math.floor((i + u[i].item()) * 10) for i in range(6)]
        frames = data.read_frames(path, lambda n: expected_indices)
        assert frame_ids(frames) == expected_indices
        expected = data.train_transform(torch.from_numpy(frames), 32, generator)  # ...then the rest
        torch.testing.assert_close(dataset[index]["video"], expected, atol=0, rtol=0)
    assert not torch.equal(dataset[0]["video"], dataset[1]["video"])


# ---------------------------------------------------------------------------------------------
# Transforms

def test_train_transform_applies_one_draw_to_every_frame():
    frame = torch.randint(0, 256, (60, 80, 3), dtype=torch.uint8)
    clip = frame.expand(4, -1, -1, -1)  # four identical frames
    outputs = []
    for seed in range(6):
        out = data.train_transform(clip, size=32, generator=torch.Generator().manual_seed(seed))
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
        for t in range(1, 4):
            torch.testing.assert_close(out[t], out[0])
        outputs.append(out[0])
    assert all(not torch.allclose(outputs[0], other) for other in outputs[1:])  # draws differ


def test_multiscale_crop_sizes_and_positions():
    # 256 x 341 (short side 256): sides int(256 * s) for s in 1, .875, .75, .66
    sides = [256, 224, 192, 168]
    allowed = {(sides[i], sides[j]) for i in range(4) for j in range(4) if abs(i - j) <= 1}
    generator = torch.Generator().manual_seed(0)
    seen_sizes, seen_positions = set(), set()
    for _ in range(400):
        y, x, ch, cw = data.multiscale_crop(256, 341, generator)
        dy, dx = (256 - ch) // 4, (341 - cw) // 4
        corners_and_centre = [(0, 0), (0, 4 * dx), (4 * dy, 0), (4 * dy, 4 * dx), (2 * dy, 2 * dx)]
        assert (y, x) in corners_and_centre
        seen_sizes.add((ch, cw))
        if dy > 0:  # the five positions are distinct
            seen_positions.add(corners_and_centre.index((y, x)))
    assert seen_sizes == allowed  # 10 pairs: never 256 x 168 (two scales apart)
    assert len(seen_positions) == 5


def test_train_crop_and_flip_land_on_the_expected_pixels(monkeypatch):
    # 48 x 64 frame of 4 x 4 blocks of 12 x 16 pixels, each its own colour
    colour = torch.tensor([[(40 + 50 * r, 30 + 60 * c, 200 - 40 * r) for c in range(4)]
                           for r in range(4)], dtype=torch.uint8)  # (4, 4, 3)
    frame = colour.repeat_interleave(12, 0).repeat_interleave(16, 1)  # (48, 64, 3)
    clip = frame.expand(2, -1, -1, -1)
    # S = 32: short side to round(32 * 256 / 224) = 37, so a 37 x 49 frame. Fix the multi-scale
    # crop at y 0, x 12, 37 x 37, i.e. decoded rows 0..47 and columns 16..63: block columns 1-3.
    asked = []
    monkeypatch.setattr(data, "multiscale_crop",
                        lambda h, w, generator=None: asked.append((h, w)) or (0, 12, 37, 37))
    monkeypatch.setattr(data, "color_jitter", lambda clip, generator=None: clip)
    # a seed whose draw has no grayscale: the third draw (after flip and jitter) is at least 0.2
    seed = next(s for s in range(100)
                if torch.rand(3, generator=torch.Generator().manual_seed(s))[2] >= 0.2)
    for flip in (0.0, 1.0):
        out = data.train_transform(clip, 32, torch.Generator().manual_seed(seed), flip=flip)
        rgb = out[0] * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
        for r in range(4):
            for c in range(1, 4):  # the crop's 48 columns resized to 32: block c at 32/48 scale
                y, x = round((12 * r + 6) * 32 / 48), round((16 * c + 8 - 16) * 32 / 48)
                x = 31 - x if flip else x  # mirrored left to right
                torch.testing.assert_close(rgb[:, y, x] * 255, colour[r, c].float(), atol=0.5,
                                           rtol=0, msg=lambda m: f"flip {flip}, block {r, c}: {m}")
    assert asked[0] == (37, 49), "the crop is drawn in the frame resized to short side 256/224 S"
    unflipped = data.train_transform(clip, 32, torch.Generator().manual_seed(seed), flip=0)
    flipped = data.train_transform(clip, 32, torch.Generator().manual_seed(seed), flip=1)
    torch.testing.assert_close(flipped, unflipped.flip(-1), atol=0, rtol=0)


def ramp_frames(T, height=48, width=64):
    """uint8 (T, H, W, 3): gray rising from left to right, so any crop is darker on its left
    (every colour operation keeps that order on a gray image; 20..180 stays clear of clamping)."""
    ramp = np.linspace(20, 180, width).astype(np.uint8)
    return np.broadcast_to(ramp[None, None, :, None], (T, height, width, 3)).copy()


def darker_on_the_left(clip):
    return (clip[..., :4].mean() < clip[..., -4:].mean()).item()


def test_flip_zero_never_flips_and_flip_one_always_does():
    clip = torch.from_numpy(ramp_frames(2))
    for flip, expected in [(0.0, True), (1.0, False)]:
        for seed in range(10):
            out = data.train_transform(clip, 32, torch.Generator().manual_seed(seed), flip=flip)
            assert darker_on_the_left(out) == expected, f"flip={flip}, seed {seed}"
    draws = [data.train_transform(clip, 32, torch.Generator().manual_seed(s)) for s in range(60)]
    flips = [not darker_on_the_left(out) for out in draws]
    assert 18 < sum(flips) < 42  # the default flips half of the clips


def test_ssv2_style_dataset_with_flip_zero_never_flips(tmp_path):
    path = str(tmp_path / "1.webm")
    encode(path, ramp_frames(8), "libvpx-vp9")
    dataset = data.VideoDataset([(path, 0)] * 30, frames=2, train=True, size=32, flip=0)
    for i in range(30):
        assert darker_on_the_left(dataset[i]["video"]), f"draw {i} was flipped"
    with pytest.raises(data.InputError, match="--flip 1.5"):
        data.VideoDataset([(path, 0)], frames=2, train=True, flip=1.5)


def test_color_jitter_formulas_and_factor_ranges():
    """Each operation alone, against torchvision's formulas written here: brightness x * b;
    contrast towards the frame's mean luma; saturation towards each pixel's luma; hue a turn of
    the YIQ chroma plane. Factors uniform in [1 - s, 1 + s] (hue in [-h, h]), drawn in order."""
    clip = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    luma = torch.einsum("c,tchw->thw", torch.tensor([0.299, 0.587, 0.114]), clip)[:, None]
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    factors = {"brightness": [], "hue": []}
    for seed in range(40):
        u = torch.rand(4, generator=torch.Generator().manual_seed(seed))  # b, c, s, h draws
        for name, strength, expected in [
                ("brightness", 0.4, lambda f: clip * f),
                ("contrast", 0.4, lambda f: f * clip + (1 - f) * luma.mean((1, 2, 3), True)),
                ("saturation", 0.2, lambda f: f * clip + (1 - f) * luma),
                ("hue", 0.1, None)]:
            index = ["brightness", "contrast", "saturation", "hue"].index(name)
            factor = (1 if name != "hue" else 0) + strength * (2 * u[index].item() - 1)
            only = {**dict(brightness=0, contrast=0, saturation=0, hue=0), name: strength}
            got = data.color_jitter(clip.clone(), torch.Generator().manual_seed(seed), **only)
            if name == "hue":
                angle = 2 * math.pi * factor
                turn = torch.tensor([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)],
                                     [0, math.sin(angle), math.cos(angle)]])
                matrix = torch.linalg.inv(yiq) @ turn @ yiq
                want = torch.einsum("dc,tchw->tdhw", matrix, clip)
            else:
                want = expected(factor)
            torch.testing.assert_close(got, want.clamp(0, 1), atol=1e-5, rtol=0,
                                       msg=lambda m: f"{name} factor {factor:.3f}: {m}")
            factors.setdefault(name, []).append(factor)
    assert min(factors["brightness"]) < 0.75 and max(factors["brightness"]) > 1.25
    assert min(factors["hue"]) < -0.06 and max(factors["hue"]) > 0.06


def test_color_jitter_with_zero_strength_is_identity_and_hue_keeps_gray():
    clip = torch.rand(2, 3, 8, 8)
    same = data.color_jitter(clip.clone(), brightness=0, contrast=0, saturation=0, hue=0)
    torch.testing.assert_close(same, clip)
    gray = torch.rand(2, 1, 8, 8).expand(-1, 3, -1, -1)
    torch.testing.assert_close(data._rotate_hue(gray.clone(), 0.1), gray, atol=1e-5, rtol=0)


def test_one_view_is_short_side_256_over_224_then_centre_crop():
    # S = 56: short side 64 -> 64 (scale 1), centre crop 56 = rows 4..59, columns 20..75
    frame = torch.full((64, 96, 3), 255, dtype=torch.uint8)
    frame[:4], frame[60:] = 0, 0  # outside the crop
    frame[:, 20] = 0  # the crop's first column
    views = data.eval_transform(frame.expand(2, -1, -1, -1), size=56, spatial_views=1)
    assert views.shape == (1, 2, 3, 56, 56)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(views[0, 0, :, :, 1:].mean((-2, -1)), white, atol=1e-4, rtol=0)
    assert (views[0, 0, :, :, 0] < 0).all()  # the black column
    # short side 128: the crop covers 56 x 128/64 = 112 decoded pixels, columns 40..151 of 192,
    # resized to 56 (each output column two input columns)
    frame = torch.full((128, 192, 3), 255, dtype=torch.uint8)
    frame[:, 32:40], frame[:, 40:48], frame[:, 144:152] = 0, 100, 200  # 8 columns each
    view = data.eval_transform(frame.expand(1, -1, -1, -1), size=56)[0, 0, 0]  # red, (S, S)
    row = (view[28] * CLIP_STD[0] + CLIP_MEAN[0]) * 255
    torch.testing.assert_close(row[[0, 2, 27, 53, 55]], torch.tensor([100.0, 100, 255, 200, 200]),
                               atol=0.5, rtol=0)


@pytest.mark.parametrize("portrait", [False, True])
def test_three_views_are_start_centre_end_of_the_long_side(portrait):
    frame = torch.zeros(48, 96, 3, dtype=torch.uint8)  # thirds: red, green, blue
    for third in range(3):
        frame[:, 32 * third:32 * (third + 1), third] = 255
    if portrait:
        frame = frame.transpose(0, 1)  # thirds from top to bottom
    views = data.eval_transform(frame.expand(2, -1, -1, -1), size=32, spatial_views=3)
    assert views.shape == (3, 2, 3, 32, 32)
    centre_colour = views[:, 0, :, 16, 16].argmax(-1)  # (V,) dominant channel at each crop's centre
    assert centre_colour.tolist() == [0, 1, 2]


def test_each_temporal_view_holds_its_own_frames_in_order(tmp_path):
    # frame i is a uniform gray of level 6 i, read back from the normalised output
    levels = np.repeat(6 * np.arange(40, dtype=np.uint8), 48 * 64 * 3).reshape(40, 48, 64, 3)
    path = encode(tmp_path / "gray.avi", levels, "mpeg4", BIT_RATE)
    video = data.VideoDataset([(path, 0)], frames=4, train=False, size=32, views=(2, 3))[0]["video"]
    gray = video[..., 8:24, 8:24].mean((-3, -2, -1))  # (V, T), V = 2 temporal x 3 spatial
    level = (gray * torch.tensor(CLIP_STD).mean() + torch.tensor(CLIP_MEAN).mean()) * 255
    frames = (level / 6).round().long()
    for view in range(2):  # segments of 10 frames; view v at offset (v + 1/2) / 2 of each
        expected = [math.floor((i + (view + 0.5) / 2) * 10) for i in range(4)]
        for spatial in range(3):
            assert frames[3 * view + spatial].tolist() == expected, (view, spatial)


def test_dataset_test_views_stack_temporal_times_spatial(tmp_path):
    path = write_index_video(tmp_path / "v.avi", 40)
    item = data.VideoDataset([(path, 3)], frames=4, train=False, size=32, views=(2, 3))[0]
    assert item["video"].shape == (6, 4, 3, 32, 32) and item["label"] == 3 and item["index"] == 0


# ---------------------------------------------------------------------------------------------
# Official layouts (the files only need to exist: parsing does not decode)

def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_hmdb51_layout(tmp_path):
    root = str(tmp_path)
    odd = "Bad[1]_(take 2)&more!_kick_ball_f_cm_np1_ba_bad_0.avi"  # glob and shell metacharacters
    videos = {"kick_ball": [odd, "kb_1.avi", "kb_2.avi"], "kick": ["k_0.avi", "k_1.avi", "k_2.avi"],
              "sword_exercise": ["se_0.avi", "se_1.avi", "se_2.avi"],
              "sword": ["s_0.avi", "s_1.avi", "s_2.avi"],
              "brush_hair": ["bh_0.avi", "bh_1.avi", "bh_2.avi"]}
    for name, files in videos.items():
        for f in files:
            touch(os.path.join(root, name, f))
        for split, tags in ((1, "120"), (2, "201")):  # 1 train, 2 test, 0 unused
            split_file = f"{name}_test_split{split}.txt"
            write_text(os.path.join(root, "testTrainMulti_7030_splits", split_file),
                       "".join(f"{f} {tag} \n" for f, tag in zip(files, tags)))
    train, classes = data.load_dataset("hmdb51", root, split=1, subset="train")
    assert classes == ["brush hair", "kick", "kick ball", "sword", "sword exercise"]
    assert (os.path.join(root, "kick_ball", odd), 2) in train
    assert len(train) == 5 and all(os.path.isfile(p) for p, _ in train)
    test, _ = data.load_dataset("hmdb51", root, split=1, subset="test")
    assert sorted(os.path.basename(p) for p, _ in test if "kick" in p) == ["k_1.avi", "kb_1.avi"]
    train2, _ = data.load_dataset("hmdb51", root, split=2, subset="train")
    assert (os.path.join(root, "kick", "k_2.avi"), 1) in train2 and len(train2) == 5
    with pytest.raises(data.InputError, match="_test_split3.txt"):
        data.load_dataset("hmdb51", root, split=3)
    with pytest.raises(data.InputError, match="does not exist"):
        data.load_dataset("hmdb51", str(tmp_path / "nowhere"))
    with pytest.raises(data.InputError, match="testTrainMulti_7030_splits"):
        data.load_dataset("hmdb51", os.path.join(root, "kick"))


def test_ucf101_layout(tmp_path):
    root = str(tmp_path)
    lists = os.path.join(root, "ucfTrainTestlist")
    write_text(os.path.join(lists, "classInd.txt"),
               "1 ApplyEyeMakeup\n2 HandstandPushups\n3 YoYo\n")
    write_text(os.path.join(lists, "trainlist01.txt"),
               "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
               "HandstandPushups/v_HandStandPushups_g08_c01.avi 2\r\nYoYo/v_YoYo_g08_c01.avi 3\r\n")
    write_text(os.path.join(lists, "testlist01.txt"),
               "HandstandPushups/v_HandStandPushups_g01_c01.avi\nYoYo/v_YoYo_g01_c01.avi\n")
    # this copy's folder says HandStandPushups, as its file names do; classInd says Handstand
    for rel in ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
                "HandStandPushups/v_HandStandPushups_g08_c01.avi",
                "HandStandPushups/v_HandStandPushups_g01_c01.avi",
                "YoYo/v_YoYo_g08_c01.avi", "YoYo/v_YoYo_g01_c01.avi"]:
        touch(os.path.join(root, rel))
    train, classes = data.load_dataset("ucf101", root, split=1, subset="train")
    assert classes == ["apply eye makeup", "handstand pushups", "yo yo"]
    assert [label for _, label in train] == [0, 1, 2]  # 1-indexed in the files
    assert all(os.path.isfile(p) for p, _ in train)
    test, _ = data.load_dataset("ucf101", root, split=1, subset="test")
    assert test == [(os.path.join(root, "HandStandPushups", "v_HandStandPushups_g01_c01.avi"), 1),
                    (os.path.join(root, "YoYo", "v_YoYo_g01_c01.avi"), 2)]
    with pytest.raises(data.InputError, match="testlist02.txt"):
        data.load_dataset("ucf101", root, split=2, subset="test")


def test_k400_layout(tmp_path, capsys):
    root = str(tmp_path)
    write_text(os.path.join(root, "annotations", "train.csv"),
               "label,youtube_id,time_start,time_end,split,is_cc\n"
               "abseiling,a_b-c,10,20,train,0\n"
               "\"passing American football (in game)\",xyz,0,10,train,1\n"
               "abseiling,gone,5,15,train,0\n")  # not on disk
    write_text(os.path.join(root, "annotations", "val.csv"),
               "label,youtube_id,time_start,time_end,split\n"
               "\"passing American football (in game)\",v1,3,13,val\n")
    touch(os.path.join(root, "train", "abseiling", "a_b-c_000010_000020.mp4"))  # class folders
    touch(os.path.join(root, "train", "passing American football (in game)",
                       "xyz_000000_000010.mp4"))
    touch(os.path.join(root, "val", "v1_000003_000013.mp4"))  # flat
    train, classes = data.load_dataset("k400", root, subset="train")
    assert classes == ["abseiling", "passing american football (in game)"]
    assert sorted(label for _, label in train) == [0, 1]
    assert all(os.path.isfile(p) for p, _ in train)
    assert "found 2 of 3" in capsys.readouterr().out
    test, _ = data.load_dataset("k400", root, subset="test")
    assert test == [(os.path.join(root, "val", "v1_000003_000013.mp4"), 1)]
    with pytest.raises(data.InputError, match="--split 2: k400 has split"):
        data.load_dataset("k400", root, split=2)


def test_ssv2_layout(tmp_path):
    root = str(tmp_path)
    write_text(os.path.join(root, "labels.json"), json.dumps(
        {"Putting something into something": "1", "Approaching something with your camera": "0"}))
    write_text(os.path.join(root, "train.json"), json.dumps([
        {"id": "78687", "label": "putting a pen into a cup",
         "template": "Putting [something] into [something]", "placeholders": ["a pen", "a cup"]},
        {"id": "42", "label": "approaching a tree with your camera",
         "template": "Approaching [something] with your camera", "placeholders": ["a tree"]}]))
    write_text(os.path.join(root, "validation.json"), json.dumps([
        {"id": "7", "label": "x", "template": "Approaching [something] with your camera",
         "placeholders": ["x"]}]))
    videos = os.path.join(root, "20bn-something-something-v2")  # the archive's folder
    os.makedirs(videos)
    train, classes = data.load_dataset("ssv2", root, subset="train")
    assert classes == ["approaching something with your camera", "putting something into something"]
    assert train == [(os.path.join(videos, "78687.webm"), 1), (os.path.join(videos, "42.webm"), 0)]
    test, _ = data.load_dataset("ssv2", root, subset="test")
    assert test == [(os.path.join(videos, "7.webm"), 0)]


def test_ucf101_class_ids_come_from_classind_not_from_the_alphabet(tmp_path):
    root = str(tmp_path)
    lists = os.path.join(root, "ucfTrainTestlist")
    write_text(os.path.join(lists, "classInd.txt"), "2 ApplyEyeMakeup\n3 Archery\n1 YoYo\n")
    write_text(os.path.join(lists, "trainlist01.txt"), "YoYo/v_YoYo_g08_c01.avi 1\n"
               "Archery/v_Archery_g08_c01.avi 3\nApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 2\n")
    train, classes = data.load_dataset("ucf101", root, subset="train")
    assert classes == ["yo yo", "apply eye makeup", "archery"]  # id 1 is label 0
    assert [label for _, label in train] == [0, 2, 1]
    write_text(os.path.join(lists, "trainlist01.txt"), "YoYo/v_YoYo_g08_c01.avi 2\n")
    with pytest.raises(data.InputError, match="listed as class 2, its folder is class 1"):
        data.load_dataset("ucf101", root, subset="train")


def test_k400_classes_are_sorted_over_every_csv(tmp_path):
    root = str(tmp_path)
    write_text(os.path.join(root, "train.csv"), "label,youtube_id,time_start,time_end,split\n"
               "zumba,z1,0,10,train\nabseiling,a1,0,10,train\nbowling,b1,0,10,train\n")
    write_text(os.path.join(root, "validate.csv"), "label,youtube_id,time_start,time_end,split\n"
               "yoga,y1,0,10,val\nzumba,z2,0,10,val\n")  # yoga: a class only in validation
    for clip in ("z1", "a1", "b1", "y1", "z2"):
        touch(os.path.join(root, "videos", f"{clip}_000000_000010.mp4"))
    train, classes = data.load_dataset("k400", root, subset="train")
    assert classes == ["abseiling", "bowling", "yoga", "zumba"]
    assert [(os.path.basename(p)[:2], label) for p, label in train] == [("z1", 3), ("a1", 0),
                                                                         ("b1", 1)]
    test, test_classes = data.load_dataset("k400", root, subset="test")
    assert test_classes == classes and [label for _, label in test] == [2, 3]


def test_ssv2_class_ids_are_labels_json_strings_used_as_given(tmp_path):
    root = str(tmp_path)
    templates = [f"Moving something {word}" for word in
                 "up down left right away closer past under over into onto".split()]
    ids = [7, 2, 10, 0, 5, 1, 9, 3, 8, 6, 4]  # neither alphabetical nor in file order
    write_text(os.path.join(root, "labels", "something-something-v2-labels.json"),
               json.dumps({t: str(i) for t, i in zip(templates, ids)}))
    items = [{"id": str(100 + k), "label": "x", "template": t.replace("something", "[something]"),
              "placeholders": ["x"]} for k, t in enumerate(templates)]
    write_text(os.path.join(root, "labels", "something-something-v2-train.json"), json.dumps(items))
    train, classes = data.load_dataset("ssv2", root, subset="train")
    assert [label for _, label in train] == ids  # "10" is 10, not sorted as a string
    for template, i in zip(templates, ids):
        assert classes[i] == template.lower()
    assert train[0][0] == os.path.join(root, "100.webm")


def test_list_layout(tmp_path):
    root = str(tmp_path)
    write_text(os.path.join(root, "classes.txt"), "WaveHand\nsit_down\n")
    write_text(os.path.join(root, "train.txt"), "my clips/a b.mp4 1\nother/c.avi 0\n")
    train, classes = data.load_dataset("list", root)
    assert classes == ["wave hand", "sit down"]
    assert train == [(os.path.join(root, "my clips", "a b.mp4"), 1),
                     (os.path.join(root, "other", "c.avi"), 0)]
    with pytest.raises(data.InputError, match="test.txt"):
        data.load_dataset("list", root, subset="test")


def test_clean_class_name():
    assert data.clean_class_name("brush_hair") == "brush hair"
    assert data.clean_class_name("ApplyEyeMakeup") == "apply eye makeup"
    assert data.clean_class_name("HandstandPushups") == "handstand pushups"


# ---------------------------------------------------------------------------------------------
# Bad input is never silent

def test_bad_videos_are_named_and_skipped_when_asked(tmp_path):
    good = [write_index_video(tmp_path / f"good{i}.avi", 60) for i in range(2)]
    raw = open(good[0], "rb").read()
    third = len(raw) // 3
    garbage = np.random.default_rng(0).integers(0, 256, third, np.uint8).tobytes()
    bad = {"corrupt.avi": raw[:third] + garbage + raw[2 * third:],
           "truncated.avi": raw[:len(raw) * 3 // 4], "empty.avi": b"",
           "notes.avi": b"not a video\n" * 40}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    bad_paths = [str(tmp_path / name) for name in bad] + [str(tmp_path / "missing.avi")]
    for path in bad_paths:
        with pytest.raises(data.VideoError, match=os.path.basename(path)):
            data.read_frames(path, lambda n: data.eval_indices(n, 8)[0])
    samples = [(p, 0) for p in good + bad_paths]
    loader = torch.utils.data.DataLoader(
        data.VideoDataset(samples, frames=4, train=True, size=32, skip_errors=True),
        batch_size=3, collate_fn=data.collate)
    batches = list(loader)
    indices = torch.cat([b["index"] for b in batches]).tolist()
    errors = sum((b["errors"] for b in batches), [])
    assert indices == [0, 1] and batches[0]["video"].shape == (2, 4, 3, 32, 32)
    assert len(errors) == len(bad_paths)
    assert all(any(e.startswith(p + ":") for e in errors) for p in bad_paths)
    assert batches[-1]["video"].numel() == 0  # a batch of bad videos only is empty, not dropped
    with pytest.raises(data.VideoError, match="empty.avi"):
        data.VideoDataset(samples, frames=4, train=True, size=32)[4]


CONTAINERS = [("mpeg4", ".avi"),        # HMDB51 / UCF101: the header counts the frames
              ("libx264", ".mp4"),      # Kinetics: the index (moov) sits at the end
              ("libx264", ".mkv"),      # Matroska: no frame count, a duration per track
              ("libvpx-vp9", ".webm"),  # SSv2
              ("libvpx", ".webm")]      # older WebM (VP8)


BIT_RATE = 2_000_000  # ~8 kB a frame at 64 x 48: like real videos, most bytes are picture data


def noise_video(num_frames, seed=0):
    """Frames of noise (encoded at BIT_RATE: every frame a large packet)."""
    noise = np.random.default_rng(seed).integers(0, 64, (num_frames, 48, 64, 3))
    return (noise + 3 * np.arange(num_frames)[:, None, None, None]).astype(np.uint8)


def damaged_copies(path):
    """{name: path}: cut at 60%; a fifth of the file overwritten in the middle, by noise and by
    zeros (a disk or download error)."""
    raw = open(path, "rb").read()
    size = len(raw) // 5
    middle = slice(len(raw) // 2 - size // 2, len(raw) // 2 - size // 2 + size)
    noise = np.random.default_rng(1).integers(0, 256, size, np.uint8).tobytes()
    copies = {"cut": raw[:len(raw) * 6 // 10],
              "noise": raw[:middle.start] + noise + raw[middle.stop:],
              "zeros": raw[:middle.start] + bytes(size) + raw[middle.stop:]}
    stem, suffix = os.path.splitext(path)
    for name, content in copies.items():
        open(f"{stem}_{name}{suffix}", "wb").write(content)
    return {name: f"{stem}_{name}{suffix}" for name in copies}


@pytest.mark.parametrize("codec, suffix", CONTAINERS)
def test_damaged_videos_are_named_in_every_container(tmp_path, codec, suffix):
    good = str(tmp_path / f"good{suffix}")
    encode(good, noise_video(40), codec, BIT_RATE)
    short = str(tmp_path / f"short{suffix}")
    encode(short, noise_video(3), codec, BIT_RATE)
    assert data.check_video(good) == 40 and data.check_video(short) == 3  # no false alarm
    for name, path in damaged_copies(good).items():
        with pytest.raises(data.VideoError) as error:
            data.check_video(path)
        message = str(error.value)
        assert message.startswith(path + ": ") and "\n" not in message
        assert "truncated" in message or "damaged" in message, message
        if name == "cut" and suffix != ".mp4":  # a cut MP4 has lost its index: cannot be opened
            assert "truncated" in message and "header" in message, message
        # a training clip from the damaged file is refused too, not served as a shorter clip
        with pytest.raises(data.VideoError, match=re.escape(path)):
            data.VideoDataset([(path, 0)], frames=8, train=True, size=32)[0]


@pytest.mark.parametrize("codec, suffix", [("mpeg4", ".avi"), ("libx264", ".mp4"),
                                           ("libx264", ".mkv")])
def test_damage_inside_one_frame_is_named_with_the_frame(tmp_path, codec, suffix):
    """Every packet still there, 16 bytes of frame 7's picture data overwritten: the decoder
    conceals the damage and flags the frame as corrupt."""
    path = encode(tmp_path / f"v{suffix}", noise_video(20), codec, BIT_RATE)
    with av.open(path) as container:
        position, size = [(p.pos, p.size) for p in container.demux(video=0) if p.size][7]
    raw = bytearray(open(path, "rb").read())
    raw[position + size // 2:position + size // 2 + 16] = bytes(range(16))
    open(path, "wb").write(raw)
    message = f"{path}: decode error, frame 7 is corrupt"
    with pytest.raises(data.VideoError, match=re.escape(message)):
        data.check_video(path)
    with pytest.raises(data.VideoError, match="frame 7 is corrupt"):  # a test clip reaches it
        data.VideoDataset([(path, 0)], frames=4, train=False, size=32)[0]


@pytest.mark.parametrize("suffix, codec", [(".webm", "libvpx-vp9"), (".mkv", "libx264")])
def test_timestamps_tell_variable_frame_rate_from_missing_frames(tmp_path, suffix, codec):
    def write(path, ticks):  # frame i shown for ticks[i] / 30 s
        with av.open(path, "w") as container:
            fast = {"deadline": "realtime", "cpu-used": "8"}
            stream = container.add_stream(codec, rate=30, options=fast)
            stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
            stream.codec_context.time_base = fractions.Fraction(1, 30)
            pts = 0
            for array, tick in zip(noise_video(len(ticks)), ticks):
                frame = av.VideoFrame.from_ndarray(array, format="rgb24")
                frame.pts, frame.time_base, pts = pts, fractions.Fraction(1, 30), pts + tick
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        return path
    variable = [1, 3, 2, 1, 1, 2, 3, 1] * 5  # 40 frames over 2.6 s: no hole, no gap over 4 frames
    assert data.check_video(write(str(tmp_path / f"vfr{suffix}"), variable)) == 40
    slow_start = [4] * 10 + [1] * 30
    assert data.check_video(write(str(tmp_path / f"slow{suffix}"), slow_start)) == 40
    # 20 frames, then nothing for 40 frames' time, then 20 more, every byte of the file read: a
    # pause (a phone's variable frame rate), not damage. A hole where the demuxer skipped bytes
    # is damage: tests/test_faults.py
    pause = write(str(tmp_path / f"pause{suffix}"), [1] * 19 + [41] + [1] * 20)
    assert data.check_video(pause) == 40 and data.video_warning(pause) is None


@pytest.mark.parametrize("name, content, cause", [
    ("picture.png", "png", "not a video (a png image)"),
    ("picture.mp4", "png", "not a video (a png image)"),  # the suffix does not decide
    ("notes.txt", b"a list of my videos\n" * 20, "not a video"),
    ("notes.avi", b"a list of my videos\n" * 20, "not a video, or truncated or damaged")])
def test_files_that_are_not_videos_are_refused(tmp_path, name, content, cause):
    path = tmp_path / name
    if content == "png":
        from PIL import Image
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(path, format="PNG")
    else:
        path.write_bytes(content)
    with pytest.raises(data.VideoError, match=re.escape(f"{path}: {cause}")):
        data.read_frames(str(path), lambda n: [0])


def test_doctor_names_damaged_files_of_every_container(tmp_path, capsys):
    root = str(tmp_path)  # an HMDB51 layout whose split file lists videos of four containers
    os.makedirs(os.path.join(root, "wave"))
    lines, bad = [], []
    for i, (codec, suffix) in enumerate(CONTAINERS):
        good = os.path.join(root, "wave", f"v{i}{suffix}")
        encode(good, noise_video(24, seed=i), codec, BIT_RATE)
        cut = damaged_copies(good)["cut"]
        lines += [f"{os.path.basename(good)} {1 + i % 2}", f"{os.path.basename(cut)} {1 + i % 2}"]
        bad.append(cut)
    write_text(os.path.join(root, "testTrainMulti_7030_splits", "wave_test_split1.txt"),
               "\n".join(lines) + "\n")
    assert data.main(["--dataset", "hmdb51", "--data-root", root, "--workers", "2"]) == 1
    out = capsys.readouterr().out
    named = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert sorted(line.split(": ")[0][4:] for line in named) == sorted(bad)
    assert f"{2 * len(CONTAINERS)} videos checked, {len(CONTAINERS)} problems" in out


# ---------------------------------------------------------------------------------------------
# Few-shot lists

def test_few_shot_is_seeded_and_round_trips(tmp_path):
    samples = [(f"/v/c{c}/{i} odd name.avi", c) for c in range(3) for i in range(5 if c < 2 else 3)]
    chosen = data.few_shot(samples, shots=2, seed=7)
    assert [label for _, label in chosen] == [0, 0, 1, 1, 2, 2]
    assert set(chosen) <= set(samples) and len(set(chosen)) == 6
    assert data.few_shot(samples, 2, seed=7) == chosen
    assert any(data.few_shot(samples, 2, seed=s) != chosen for s in range(8, 12))
    # the draw itself, so a recorded seed names the same videos in every version: per class in
    # label order, Python's random.Random(seed).sample from the class's videos, sorted by path
    rng = random.Random(7)
    expected = [(path, c) for c in range(3)
                for path in rng.sample(sorted(p for p, label in samples if label == c), 2)]
    assert chosen == expected
    shuffled = samples[::-1]  # the order of the list does not change the draw
    assert data.few_shot(shuffled, 2, seed=7) == chosen
    path = str(tmp_path / "few_shot.txt")
    data.write_sample_list(path, chosen)
    assert data.read_sample_list(path) == chosen
    short = r"--shots 4: class 2 \(kick ball\) has only 3 training videos"
    with pytest.raises(data.InputError, match=short):
        data.few_shot(samples, 4, seed=0, class_names=["a", "b", "kick ball"])
    with pytest.raises(data.InputError, match=r"class 3 \(sit\) has only 0"):
        data.few_shot(samples, 2, seed=0, class_names=["a", "b", "c", "sit"])


# ---------------------------------------------------------------------------------------------
# Synthetic dataset and the doctor

def test_synthetic_dataset_is_hmdb51_shaped_and_classes_differ_by_motion(tmp_path):
    root = str(tmp_path / "a")
    names = data.make_synthetic_dataset(root, num_classes=6, videos_per_class=10, frames=16,
                                        size=(96, 72))
    assert names == ["grow", "move_down", "move_left", "move_right", "move_up", "shrink"]
    splits = []
    for split in (1, 2, 3):
        train, classes = data.load_dataset("hmdb51", root, split=split, subset="train")
        test, _ = data.load_dataset("hmdb51", root, split=split, subset="test")
        assert classes == [data.clean_class_name(name) for name in names]
        assert len(train) == 6 * 7 and len(test) == 6 * 3 and not set(train) & set(test)
        splits.append(set(test))
    assert splits[0] != splits[1] != splits[2]

    def track(name):  # (x of the object's centre, its area) in the first and last frame
        frames = data.read_frames(os.path.join(root, name, f"{name}_00.avi"), lambda n: [0, n - 1])
        background = np.median(frames[0].reshape(-1, 3), 0)
        masks = np.abs(frames.astype(int) - background).sum(-1) > 60  # (2, H, W)
        return [(np.nonzero(m)[1].mean(), m.sum()) for m in masks]
    (x0, _), (x1, _) = track("move_left")
    assert x1 < x0 - 20
    (x0, _), (x1, _) = track("move_right")
    assert x1 > x0 + 20
    (_, a0), (_, a1) = track("grow")
    assert a1 > 4 * a0
    (_, a0), (_, a1) = track("shrink")
    assert a0 > 4 * a1
    data.make_synthetic_dataset(str(tmp_path / "b"), num_classes=6, videos_per_class=10, frames=16,
                                size=(96, 72))  # the same seed again: the same bytes
    for rel in ["grow/grow_03.avi", "testTrainMulti_7030_splits/grow_test_split2.txt"]:
        assert open(os.path.join(root, rel), "rb").read() == open(tmp_path / "b" / rel, "rb").read()


def test_doctor_passes_a_good_dataset_and_names_every_problem(tmp_path, capsys):
    root = str(tmp_path)
    data.make_synthetic_dataset(root, num_classes=2, videos_per_class=4, frames=16, size=(64, 48))
    assert data.main(["--dataset", "hmdb51", "--data-root", root, "--split", "2"]) == 0
    assert "0 problems" in capsys.readouterr().out
    os.remove(os.path.join(root, "move_left", "move_left_00.avi"))
    open(os.path.join(root, "move_left", "move_left_01.avi"), "wb").close()
    train, _ = data.load_dataset("hmdb51", root, subset="train")
    test, _ = data.load_dataset("hmdb51", root, subset="test")
    kept, cut = [p for p, label in train if label == 1][:2]  # two training videos of move_right
    raw = open(cut, "rb").read()
    open(cut, "wb").write(raw[:len(raw) * 3 // 4])
    shared = [p for p, label in test if label == 1][0]  # a test video, now a link to `kept`
    os.remove(shared)
    os.symlink(kept, shared)
    assert data.main(["--dataset", "hmdb51", "--data-root", root]) == 1
    out = capsys.readouterr().out
    for name, cause in [("move_left_00.avi", "file not found"), ("move_left_01.avi", "empty"),
                        (os.path.basename(cut), "truncated"),
                        (os.path.basename(kept), "in both the train and the test list")]:
        assert any(name in line and cause in line
                   for line in out.splitlines() if line.startswith("BAD")), (name, cause)
    assert "4 problems" in out
    assert data.main(["--dataset", "ucf101", "--data-root", root]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ucf101: expected") and "ucfTrainTestlist" in err
    assert "\n" not in err and "see README, Datasets" in err


# ---------------------------------------------------------------------------------------------
# Bad input gets one line naming it

def test_overlapping_videos_compares_real_paths(tmp_path, monkeypatch):
    real = tmp_path / "videos"
    real.mkdir()
    for name in ("a.avi", "b.avi", "c.avi"):
        (real / name).write_bytes(b"x")
    os.symlink(real, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    train = [(str(tmp_path / "link" / "a.avi"), 0), ("videos/b.avi", 1), (str(real / "c.avi"), 2)]
    test = [(str(real / "a.avi"), 0), (str(real / "b.avi"), 1), ("videos/../videos/x.avi", 2)]
    assert data.overlapping_videos(train, test) == [str(real / "a.avi"), str(real / "b.avi")]
    assert data.overlapping_videos(train[2:], test) == []


def test_class_names_that_cannot_all_be_predicted_are_refused():
    data.check_class_names(["kick", "kick_ball", "sword", "sword_exercise"], "hmdb51")
    for names, named in [([], "no class names"),
                         (["sit", "kick_ball", "KickBall"], "'kick_ball', 'KickBall'"),
                         (["sit", "stand", "sit"], "'sit' is listed 2 times"),
                         (["Sit", "sit "], "'Sit', 'sit '"), (["a", "_"], "empty class name")]:
        with pytest.raises(data.InputError, match=re.escape(named)) as error:
            data.check_class_names(names, "--classes")
        assert str(error.value).startswith("--classes: ")


def test_layout_with_clashing_class_names_is_refused(tmp_path):
    root = str(tmp_path)
    write_text(os.path.join(root, "classes.txt"), "kick_ball\nKickBall\n")
    write_text(os.path.join(root, "train.txt"), "a.avi 0\nb.avi 1\n")
    with pytest.raises(data.InputError, match=r"classes.txt: classes 'kick_ball', 'KickBall'"):
        data.load_dataset("list", root)


def test_dataset_errors_name_the_file_and_point_to_readme_and_doctor(tmp_path):
    root = str(tmp_path)
    write_text(os.path.join(root, "classes.txt"), "sit\nstand\n")
    write_text(os.path.join(root, "train.txt"), "\n")
    write_text(os.path.join(root, "test.txt"), "a.avi 0\nb.avi 7\n")
    doctor = f"python data.py --dataset list --data-root {root} --split 1"
    for kwargs, message in [(dict(subset="train"), "list split 1: the train list is empty"),
                            (dict(subset="test"), "label 7 of b.avi is not in classes.txt"),
                            (dict(split=2), "--split 2: list has split(s) 1")]:
        with pytest.raises(data.InputError, match=re.escape(message)) as error:
            data.load_dataset("list", root, **kwargs)
        if "split" not in kwargs:
            assert "see README, Datasets" in str(error.value) and doctor in str(error.value)
    with pytest.raises(data.InputError, match=r"--dataset kinetics: choose from hmdb51"):
        data.load_dataset("kinetics", root)
    with pytest.raises(data.InputError, match="nowhere.*does not exist.*see README, Datasets"):
        data.load_dataset("hmdb51", str(tmp_path / "nowhere"))


def test_clip_settings_and_sample_lists_are_checked_before_any_decoding(tmp_path):
    for kwargs, message in [(dict(frames=0), "--frames 0: 1 or more"),
                            (dict(views=(1, 2)), "--test-views 1x2: "),
                            (dict(views=(0, 3)), "--test-views 0x3: "),
                            (dict(flip=-0.5), "--flip -0.5: ")]:
        with pytest.raises(data.InputError, match=re.escape(message)):
            data.VideoDataset([("never-read.avi", 0)], **{"frames": 8, "train": False, **kwargs})
    with pytest.raises(data.InputError, match="spatial views must be 1 or 3, got 2"):
        data.eval_transform(torch.zeros(2, 48, 64, 3, dtype=torch.uint8), 32, spatial_views=2)
    listed = tmp_path / "few_shot_list.txt"
    listed.write_text("a/b c.avi 3\nno-label-here\n")
    with pytest.raises(data.InputError, match=re.escape(f"{listed}: unexpected line")):
        data.read_sample_list(str(listed))
    with pytest.raises(data.InputError, match=re.escape(f"{tmp_path / 'gone.txt'}: cannot read")):
        data.read_sample_list(str(tmp_path / "gone.txt"))


@pytest.mark.parametrize("shots", [0, -1])
def test_few_shot_refuses_fewer_than_one_shot(shots):
    with pytest.raises(data.InputError, match=f"--shots {shots}: .*1 or more"):
        data.few_shot([("a.avi", 0), ("b.avi", 1)], shots, seed=0)


def test_make_synthetic_from_the_command_line_refuses_foreign_folders(tmp_path, capsys):
    root = str(tmp_path / "syn")
    assert data.main(["--make-synthetic", root, "--classes", "2", "--per-class", "3"]) == 0
    out = capsys.readouterr().out
    assert root in out and "python train.py --dataset hmdb51 --data-root " + root in out
    assert "--shots" in out
    train, classes = data.load_dataset("hmdb51", root)
    assert classes == ["move left", "move right"] and len(train) == 2 * 2
    assert data.main(["--make-synthetic", root, "--classes", "2", "--per-class", "3"]) == 0
    assert data.main(["--make-synthetic", root, "--classes", "3", "--per-class", "3"]) == 2
    assert "other settings" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    assert data.main(["--make-synthetic", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {foreign}: not empty") and err.count("\n") == 1
    assert os.listdir(foreign) == ["thesis.tex"]
    assert (foreign / "thesis.tex").read_text() == "keep me"  # nothing deleted or overwritten
    assert data.main(["--make-synthetic", str(tmp_path / "x"), "--classes", "11"]) == 2
    assert "--classes 11" in capsys.readouterr().err
    assert data.main(["--make-synthetic", str(foreign / "thesis.tex")]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
