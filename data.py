"""Video data for OmniCLIP: PyAV decoding, sparse frame sampling, clip transforms in plain torch,
the official dataset layouts, few-shot subsets and a synthetic dataset with motion classes.

Shape legend: T frames, H x W decoded frame, S output size, V views (temporal x spatial).
A decoded clip is uint8 (T, H, W, 3); a model-ready clip is float32 (T, 3, S, S), CLIP-normalised.

As a script it checks a dataset (the "doctor": every missing, damaged or shared video named),
writes a copy of it that loads fast, times its loading and the cores a GPU needs, or writes a
small synthetic one for smoke tests:
    python data.py --dataset hmdb51 --data-root DIR --split 1
    python data.py --dataset k400 --data-root DIR --prepare DST [--short-side 256] [--gop 16]
    python data.py --dataset k400 --data-root DIR --benchmark [--frames 8] [--model ViT-B/16]
    python data.py --make-synthetic DIR --classes 6 --per-class 12
"""
import argparse
import collections
import contextlib
import csv
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import av
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pretraining statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DATASETS = ("hmdb51", "ucf101", "k400", "ssv2", "list")


class InputError(Exception):
    """Bad input from the user (a file, a list, a flag): one line naming it and what is wrong.
    The scripts' main() prints the message alone; any other exception is a bug and keeps its
    traceback."""


class VideoError(InputError):
    """A video that cannot be read; the message names the file and the cause."""


class WriteError(InputError):
    """A file that could not be written (a full disk, a file-size limit, no permission): one
    line naming it and the OS's reason. Its previous version is left as it was. An InputError
    so that every script already ends with that one line and status 2, not a traceback."""

    def __init__(self, path, reason):
        super().__init__(path, reason)  # both in args: it pickles (DDP sends it to every rank)
        self.path, self.reason = path, reason

    def __str__(self):
        return f"{self.path}: cannot write: {self.reason}"


# ----------------------------------------------------------------------------------------------
# Writing files: every file the scripts write (checkpoints, logs, reports, pictures, lists, the
# synthetic dataset) goes through these two functions, so a full disk costs no earlier work.

def _reason(error):
    """The OS's reason behind a failed write: torch.save's zip writer reports a failed write as
    RuntimeError("[enforce fail at inline_container.cc:...]"), with the OSError as its context."""
    while error is not None:
        if isinstance(error, OSError):
            return error.strerror or str(error)
        error = error.__cause__ or error.__context__
    return None


def write_file(path, write, mode="wb"):
    """write(f) into a temporary file beside `path`, flushed to disk, then renamed over `path`:
    a reader, or a run killed mid-write, sees the old file or the new one, never half of one.
    If the write fails (ENOSPC, EFBIG, EACCES, ...) the temporary file is removed, `path` keeps
    its previous version, and a WriteError names `path` and the OS's reason."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                   prefix=os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, mode, **({} if "b" in mode else dict(encoding="utf-8"))) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report or checkpoint is not
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as error:
        reason = _reason(error)
        if reason is None and "inline_container" not in str(error):
            raise  # a RuntimeError that is no failed write: a bug, with its traceback
        raise WriteError(path, reason or str(error)) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def append_line(path, line):
    """Append one line to a log: all of it or, if the disk is full, none (the file is cut back
    to its old size), so the log never ends in half a JSON line."""
    encoded = (line + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as error:
        raise WriteError(path, error.strerror or str(error)) from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(encoded)
            while view:                      # os.write may write part of it
                view = view[os.write(fd, view):]
        except OSError as error:
            os.ftruncate(fd, size)
            raise WriteError(path, error.strerror or str(error)) from None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Decoding

@contextlib.contextmanager
def _open_video(path):
    """(container, its first video stream); whatever goes wrong while reading them becomes a
    VideoError naming the file and the cause."""
    if not os.path.isfile(path):
        raise VideoError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError) as error:  # an MP4 cut short loses its index at the end
        raise VideoError(f"{path}: not a video, or truncated or damaged (ffmpeg cannot open it: "
                         f"{getattr(error, 'strerror', None) or error})") from error
    try:
        with container:
            kind = container.format.name  # ffmpeg opens images and text as one-frame "videos"
            if kind.endswith("_pipe") or kind in ("image2", "tty"):
                what = "a text file" if kind == "tty" else f"a {kind.replace('_pipe', '')} image"
                raise VideoError(f"{path}: not a video ({what})")
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            # One thread: loader workers, the doctor and --prepare decode one video per core,
            # and threads (thread_type AUTO) cost 8-20% more CPU time per clip.
            stream.codec_context.thread_count = 1
            yield container, stream
    except av.FFmpegError as error:
        raise VideoError(f"{path}: decode error, damaged stream ({type(error).__name__}: "
                         f"{getattr(error, 'strerror', None) or error})") from error
    except (OSError, EOFError) as error:
        raise VideoError(f"{path}: {type(error).__name__}: {error}") from error


def _header_seconds(container, stream):
    """The video's duration as its header states it: the stream's own, else the per-track tag
    Matroska/WebM writers store, else the file's."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION", "")  # "00:00:02.000000000"
    if re.fullmatch(r"\d+:\d\d:\d\d(\.\d+)?", tag):
        hours, minutes, seconds = tag.split(":")
        return 3600 * int(hours) + 60 * int(minutes) + float(seconds)
    return container.duration / 1e6 if container.duration else None


# Matroska/WebM put a few bytes of block and cluster header between two packets; a demuxer that
# skips more than this between them has resynced past data it could not read
SKIPPED_BYTES = 256


def _check_complete(path, container, stream, times):
    """Damage the decoder may never report, told apart from a variable frame rate.
    `times`: presentation times (s) of the stream's packets, None where a packet has none.
    Proof of damage, raised as a VideoError: fewer packets than the header lists (AVI, MP4);
    the stream ending well before the duration its header states (a cut file); a hole in time
    where the demuxer skipped bytes (Matroska/WebM resync at the next cluster after a damaged
    one). A hole alone proves nothing: phones record at a variable rate, change it mid-stream
    and pause, and such a video decodes as a normal one. Returns a warning (the doctor's WARN;
    the video is used) for a hole whose cause the file cannot show, else None."""
    listed = stream.frames
    slack = max(2, listed // 100)  # encoder flush and dropped-frame markers: a frame or two
    if listed and len(times) < listed - slack:
        raise VideoError(f"{path}: header lists {listed} frames but the file holds {len(times)} "
                         "(truncated or damaged)")
    duration = _header_seconds(container, stream)
    times = sorted(t for t in times if t is not None)
    if not duration or len(times) < 3:
        return None
    step = float(np.median(np.diff(times)))  # the usual frame interval, whatever the rate
    start = times[0] if stream.start_time is None else float(stream.start_time * stream.time_base)
    end = start + duration
    # a hole between two frames: only where no index lists every frame (Matroska and WebM keep
    # none), since an index that lists them all and matches the packets has lost none
    holes = [] if listed else [(a, b) for a, b in zip(times, times[1:]) if b - a > 4 * step]
    short = end - (times[-1] + step) > max(0.05 * duration, 3 * step)
    if not (holes or short):
        return None
    skips, stream_end = _demuxed_layout(path, stream.index)   # a second look, rare: no decoding
    if short and end - max(stream_end or 0, times[-1] + step) > max(0.05 * duration, 3 * step):
        a = max(stream_end or 0, times[-1] + step)
        own = bool(stream.duration) or "DURATION" in stream.metadata
        if own or len(container.streams) == 1:  # the header's duration is this stream's
            raise VideoError(f"{path}: the video stream ends at {a - start:.2f} s of the "
                             f"{duration:.2f} s its header states (about "
                             f"{round((end - a) / step)} frames missing; truncated or damaged)")
        holes.append((times[-1], end))  # the file's duration may be another stream's
    for a, b in holes:
        where = f"{path}: no frames from {a + step - start:.2f} s to {b - start:.2f} s"
        if skips is None:
            return (f"{where}: a pause in a variable-frame-rate recording, or frames lost; the "
                    "file does not show which (used as it is)")
        skipped = sum(n for t0, t1, n in skips if min(t0, t1) <= b + 4 * step
                      and max(t0, t1) >= a - 4 * step)  # the skip around the hole, B-frames too
        if skipped:
            raise VideoError(f"{where} of the {duration:.2f} s its header states, where the "
                             f"demuxer skipped {skipped} bytes it could not read (about "
                             f"{round((b - a) / step) - 1} frames missing; truncated or damaged)")
    return None


def _demuxed_layout(path, index):
    """Where a demuxer skipped bytes, and where stream `index` really ends: ([(time before (s),
    time after (s), bytes skipped)], last packet's end (s) or None). The skips are None when the
    container gives no packet positions. Demuxes every stream (audio sits between the frames)."""
    skips, covered, last, stream_end = [], None, None, None
    with av.open(path) as container:
        for packet in container.demux():
            if not packet.size:
                continue
            t = None if packet.pts is None else float(packet.pts * packet.time_base)
            if packet.stream.index == index and t is not None:
                end = t + float((packet.duration or 0) * packet.time_base)
                stream_end = end if stream_end is None else max(stream_end, end)
            if skips is None or packet.pos is None or packet.pos < 0:
                skips = None
                continue
            gap = 0 if covered is None else packet.pos - covered   # bytes no packet holds
            if gap > SKIPPED_BYTES and None not in (last, t):
                skips.append((last, t, gap))
            covered, last = max(covered or 0, packet.pos + packet.size), t
    return skips, stream_end


def _packet_times(container, stream):
    """Presentation times (s) of the stream's packets, by demuxing alone, no decoding."""
    return [None if p.pts is None else float(p.pts * p.time_base)
            for p in container.demux(stream) if p.size]


def count_frames(path):
    """Frames in a video: the container's count, else (WebM keeps none) its packets."""
    with _open_video(path) as (container, stream):
        return stream.frames or len(_packet_times(container, stream))


HELD_BYTES = 256 * 2 ** 20  # a longer video's packets are not kept: it is decoded in one pass


def read_frames(path, choose_indices, decode_all=False):
    """Decode the frames `choose_indices(num_frames)` asks for: uint8 (len(indices), H, W, 3).

    Frame i is the i-th in presentation order, the order a full decode returns them. The file
    is demuxed whole first (packets, no pictures): that checks it holds every frame its header
    promises (a truncated or damaged file is an error, not a shorter clip) and gives each
    packet's timestamp. Then only what the chosen frames need is decoded (`_decode_needed`);
    where that cannot be done safely, or with decode_all (the doctor), every frame up to the
    last one chosen is decoded in order (`_decode_in_order`). Both return the same pixels."""
    with _open_video(path) as (container, stream):
        size = stream.codec_context.width, stream.codec_context.height  # the header's
        packets, times, held = (None if decode_all else []), [], 0  # the doctor holds none
        for packet in container.demux(stream):
            if packet.size:
                times.append(None if packet.pts is None else float(packet.pts * packet.time_base))
                if packets is not None:
                    packets.append(packet)
                    held += packet.size
                    packets = None if held > HELD_BYTES else packets
        _check_complete(path, container, stream, times)
        listed = stream.frames or len(times)  # WebM/MKV keep no frame count: the packets
        if listed == 0:
            raise VideoError(f"{path}: the video stream holds no frames")
        indices = [int(i) for i in choose_indices(listed)]
        arrays = None
        if packets is not None:
            arrays = _decode_needed(path, stream.codec_context, packets, indices)
        if arrays is None:
            stream.codec_context.flush_buffers()  # whatever the first try left in the decoder
            if packets is None:
                container.seek(0)
                packets = (packet for packet in container.demux(stream) if packet.size)
            arrays = _decode_in_order(path, stream.codec_context, packets, indices, listed)
    chosen = [arrays[i] for i in indices]
    if len({array.shape for array in chosen}) > 1:  # the stream changed its size midway
        width, height = size if all(size) else chosen[0].shape[1::-1]
        chosen = [_at_size(array, width, height) for array in chosen]
    return np.stack(chosen)


def _at_size(array, width, height):
    """A frame (H, W, 3) at the stream's first size (its header's). A stream may change its
    size midway (a phone's resolution switch, segments joined): a clip that spans the change
    gets its later frames scaled to the first size (bilinear), as a player shows them. Frames
    of one size are never touched (a header whose size differs from every frame's changes
    nothing)."""
    if array.shape[:2] == (height, width):
        return array
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
    return frame.reformat(width, height, interpolation="BILINEAR").to_ndarray(format="rgb24")


def _decode_in_order(path, decoder, packets, indices, listed):
    """{index: frame} for `indices`, decoding every frame up to the last one needed and
    counting the frames as the decoder returns them."""
    last, needed = max(indices), set(indices)
    arrays, decoded, latest, corrupt = {}, 0, None, None
    for packet in [*packets, None]:  # None drains the frames the decoder still holds
        if decoded > last:
            break
        for frame in decoder.decode(packet):
            if frame.is_corrupt and corrupt is None:  # the decoder concealed an error
                corrupt = decoded
            if decoded in needed:
                arrays[decoded] = frame.to_ndarray(format="rgb24")
            decoded, latest = decoded + 1, frame
    if corrupt is not None:
        raise VideoError(f"{path}: decode error, frame {corrupt} is corrupt (damaged stream)")
    if decoded <= last:
        slack = max(2, listed // 100)
        if decoded == 0 or decoded < listed - slack:
            raise VideoError(f"{path}: the decoder returned {decoded} of {listed} frames "
                             "(damaged stream)")
        tail = latest.to_ndarray(format="rgb24")  # within the slack: repeat the last frame
        arrays.update({i: tail for i in needed if i >= decoded})
    return arrays


class _Unsure(Exception):
    """The shortcut met something it cannot vouch for: decode in order instead."""


def _decode_needed(path, decoder, packets, indices):
    """{index: frame} for `indices`, decoding only what those frames depend on, or None where
    that cannot be done safely. `packets` are the stream's, in decoding order.

    Frame i is the packet with the i-th smallest timestamp, so a frame left out cannot shift
    the count. A frame depends only on packets before it in decoding order, back to the last
    keyframe shown no later than itself (the leading frames of an open GOP, shown before their
    keyframe, need the GOP before). Those stretches, merged where they overlap, are decoded
    each from its keyframe; between them the decoder is drained and reset, which costs less
    than decoding on, since the packets are in memory. While it reads packets no chosen frame
    is in, the decoder skips non-reference frames (skip_frame NONREF): nothing depends on them.
    A frame that comes out unexpected (no timestamp, an unknown one, a "keyframe" that is not
    one, as some AVI indexes claim) or a decoder error sends the video to `_decode_in_order`,
    which names the damage."""
    times = [packet.pts for packet in packets]
    if None in times or len(set(times)) < len(times):  # no usable index of timestamps
        return None
    order = sorted(times)
    index_of = {t: i for i, t in enumerate(order)}
    # within the header's slack a video lists a frame or two more than it holds: those indices
    # repeat the last frame, as a full decode does
    wanted = {order[min(i, len(order) - 1)] for i in indices}
    position = {t: j for j, t in enumerate(times)}
    keyframes = [j for j, packet in enumerate(packets) if packet.is_keyframe]
    got, corrupt = {}, []
    state = dict(floor=None, expect=None)  # after a jump: the keyframe's time, still to come

    def take(frames):
        for frame in frames:
            if frame.pts not in index_of:
                raise _Unsure
            if state["floor"] is not None and frame.pts < state["floor"]:
                continue  # a leading frame of the GOP jumped into: wrong without the GOP before
            if state["expect"] is not None:
                if frame.pts != state["expect"] or not frame.key_frame:
                    raise _Unsure
                state["expect"] = None
            if frame.is_corrupt:
                corrupt.append(index_of[frame.pts])
            if frame.pts in wanted and frame.pts not in got:
                got[frame.pts] = frame.to_ndarray(format="rgb24")

    # each chosen frame needs the packets from its keyframe to itself; overlapping stretches
    # merge into runs, each decoded from its keyframe, with a jump between runs
    runs = []
    for start, end in sorted((max((k for k in keyframes if k <= position[t] and times[k] <= t),
                                  default=0), position[t]) for t in wanted):
        if runs and start <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    try:
        for n, (start, end) in enumerate(runs):
            if n:  # a jump: the frames still in the decoder, then a clean start
                decoder.skip_frame = "DEFAULT"
                take(decoder.decode(None))
                decoder.flush_buffers()
            if start:
                state.update(floor=times[start], expect=times[start])
            for j in range(start, end + 1):
                decoder.skip_frame = "DEFAULT" if times[j] in wanted else "NONREF"
                take(decoder.decode(packets[j]))
        decoder.skip_frame = "DEFAULT"
        take(decoder.decode(None))
    except (_Unsure, av.FFmpegError):
        decoder.skip_frame = "DEFAULT"
        return None
    if corrupt:
        raise VideoError(f"{path}: decode error, frame {min(corrupt)} is corrupt (damaged stream)")
    if len(got) < len(wanted):
        return None
    return {i: got[order[min(i, len(order) - 1)]] for i in indices}


def check_video(path):
    """Decode a whole video (the doctor's check); returns its frame count or raises VideoError."""
    count = []
    read_frames(path, lambda n: count.append(n) or [0, n - 1], decode_all=True)
    return count[0]


def video_warning(path):
    """The doctor's WARN for a video that decodes: a hole in its timeline that the file cannot
    tell from a variable frame rate (see _check_complete), else None."""
    with _open_video(path) as (container, stream):
        return _check_complete(path, container, stream, _packet_times(container, stream))


def write_video(path, frames, fps=30, codec="mpeg4", options=None, bit_rate=None):
    """Encode uint8 frames (T, H, W, 3), H and W even, into `path` (container from the suffix).
    mpeg4 in .avi is HMDB51/UCF101's Xvid; libx264 in .mp4 is Kinetics; libvpx-vp9 in .webm SSv2."""
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if bit_rate:
            stream.bit_rate = bit_rate
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


# ----------------------------------------------------------------------------------------------
# Sparse segment sampling (TSN): the video is cut into T equal segments, one frame from each.

def segment_indices(num_frames, frames, offset):
    """Frame at `offset` (in [0, 1), scalar or one per segment) of each of `frames` segments.
    A video shorter than T frames gets its frames repeated in order."""
    segment = num_frames / frames
    position = (torch.arange(frames, dtype=torch.float64) + offset) * segment
    return position.floor().long().clamp(max=num_frames - 1).tolist()


def train_indices(num_frames, frames, generator=None):
    """A random frame in each segment."""
    return segment_indices(num_frames, frames, torch.rand(frames, generator=generator).double())


def eval_indices(num_frames, frames, temporal_views=1):
    """One index list per temporal view: view v takes offset (v + 1/2) / views in every segment,
    so one view is the segment centres and more views shift them evenly (deterministic)."""
    return [segment_indices(num_frames, frames, (v + 0.5) / temporal_views)
            for v in range(temporal_views)]


# ----------------------------------------------------------------------------------------------
# Clip transforms: the whole clip at once, in plain torch, one random draw for all its frames.

def _resize(frames, height, width, flip=False):
    """uint8 (T, H, W, 3) -> float (T, 3, height, width) in [0, 1], antialiased bilinear.
    Resizing the uint8 frames (channels-last, torch's fast path) and converting the small result
    to float is many times faster than resizing floats."""
    clip = F.interpolate(frames.permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                         antialias=True, align_corners=False)  # (T, 3, height, width) uint8
    if flip:
        clip = clip.flip(-1)
    return clip.to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def normalize(clip):
    """In place: CLIP's mean and std, (..., 3, H, W)."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return clip.sub_(mean).div_(std)


def _gray(clip):
    """ITU-R 601 luma, (T, 3, H, W) -> (T, 1, H, W), as torchvision's rgb_to_grayscale."""
    T, _, H, W = clip.shape
    luma = torch.tensor([[0.299, 0.587, 0.114]]) @ clip.flatten(2)  # (1, 3) @ (T, 3, H*W)
    return luma.view(T, 1, H, W)


def _blend(clip, other, factor):
    """In place: factor * clip + (1 - factor) * other, clamped to [0, 1]."""
    return clip.mul_(factor).add_(other, alpha=1 - factor).clamp_(0, 1)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]])


def _rotate_hue(clip, shift):
    """Hue shift by `shift` turns of the colour wheel. torchvision round-trips through HSV; we
    rotate the chroma plane of YIQ instead: one 3x3 matrix, luma kept, hue turned by about the
    same angle."""
    angle = 2 * math.pi * shift
    rotation = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(angle), -math.sin(angle)],
                             [0.0, math.sin(angle), math.cos(angle)]])
    matrix = torch.linalg.inv(_RGB_TO_YIQ) @ rotation @ _RGB_TO_YIQ
    return (matrix @ clip.flatten(2)).view(clip.shape).clamp_(0, 1)  # (3, 3) @ (T, 3, H*W)


def color_jitter(clip, generator=None, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """torchvision's ColorJitter on a whole clip (T, 3, H, W) in [0, 1], changed in place: one
    factor each for all frames, the four operations in random order."""
    def uniform(low, high):
        return low + (high - low) * torch.rand((), generator=generator).item()
    b, c, s = (uniform(1 - x, 1 + x) for x in (brightness, contrast, saturation))
    h = uniform(-hue, hue)
    for operation in torch.randperm(4, generator=generator).tolist():
        if operation == 0:
            clip = clip.mul_(b).clamp_(0, 1)
        elif operation == 1:  # towards each frame's mean gray
            clip = _blend(clip, _gray(clip).mean((-3, -2, -1), keepdim=True), c)
        elif operation == 2:
            clip = _blend(clip, _gray(clip), s)
        else:
            clip = _rotate_hue(clip, h)
    return clip


def multiscale_crop(h, w, generator=None):
    """mmaction's MultiScaleCrop as X-CLIP configures it, in an h x w frame: side lengths from
    scales 1, .875, .75, .66 of the short side, height and width at most one scale apart, at
    one of 5 fixed positions (4 corners, centre). Returns (y, x, crop_h, crop_w)."""
    sizes = [int(min(h, w) * s) for s in (1, 0.875, 0.75, 0.66)]
    pairs = [(ch, cw) for i, ch in enumerate(sizes) for j, cw in enumerate(sizes)
             if abs(i - j) <= 1]
    ch, cw = pairs[int(torch.randint(len(pairs), (), generator=generator))]
    dy, dx = (h - ch) // 4, (w - cw) // 4
    positions = [(0, 0), (0, 4 * dx), (4 * dy, 0), (4 * dy, 4 * dx), (2 * dy, 2 * dx)]
    y, x = positions[int(torch.randint(5, (), generator=generator))]
    return y, x, ch, cw


def train_transform(frames, size=224, generator=None, flip=0.5):
    """Training augmentation, one draw for the clip: uint8 (T, H, W, 3) -> (T, 3, S, S).
    Paper is silent; we follow X-CLIP: short side to 256 (256/224 * S), multi-scale crop,
    resize to S; horizontal flip with probability `flip` (0.5; 0 for SSv2, whose classes say
    left and right); colour jitter p 0.8; grayscale p 0.2. Unlike X-CLIP, colour jitter
    is drawn once per clip, not per frame, and the mean/std are CLIP's, not ImageNet's."""
    def chance(p):
        return torch.rand((), generator=generator).item() < p
    T, H, W, _ = frames.shape
    scale = round(size * 256 / 224) / min(H, W)
    y, x, ch, cw = multiscale_crop(round(H * scale), round(W * scale), generator)
    # Cut the crop from the decoded frames and resize once: the same pixels as resizing to 256
    # first, with one interpolation instead of two.
    y0, y1, x0, x1 = (round(v / scale) for v in (y, y + ch, x, x + cw))
    clip = _resize(frames[:, y0:y1, x0:x1], size, size, flip=chance(flip))  # (T, 3, S, S)
    if chance(0.8):
        clip = color_jitter(clip, generator)
    if chance(0.2):
        clip = _gray(clip).expand(-1, 3, -1, -1).contiguous()
    return normalize(clip)


def eval_transform(frames, size=224, spatial_views=1):
    """uint8 (T, H, W, 3) -> (V_s, T, 3, S, S). Paper is silent; we follow X-CLIP. One view:
    short side to 256/224 * S, centre crop S. Three views: short side to S, crops at the start,
    centre and end of the long side (left/centre/right, or top/centre/bottom for portrait)."""
    T, H, W, _ = frames.shape
    if spatial_views == 1:
        crop = min(H, W, round(size * min(H, W) / round(size * 256 / 224)))  # S in decoded pixels
        y0, x0 = (H - crop) // 2, (W - crop) // 2
        views = [_resize(frames[:, y0:y0 + crop, x0:x0 + crop], size, size)]
    elif spatial_views == 3:
        h, w = (size, round(W * size / H)) if H <= W else (round(H * size / W), size)
        clip = _resize(frames, h, w)  # (T, 3, h, w), short side S
        long_side = max(h, w)
        starts = (0, (long_side - size) // 2, long_side - size)
        views = [clip[..., s:s + size] if w >= h else clip[..., s:s + size, :] for s in starts]
    else:
        raise InputError(f"--test-views: spatial views must be 1 or 3, got {spatial_views}")
    return normalize(torch.stack(views))  # (V_s, T, 3, S, S)


# ----------------------------------------------------------------------------------------------
# Dataset of clips

class VideoDataset(torch.utils.data.Dataset):
    """(path, label) samples -> dict(video, label, index). Training: one random clip (T, 3, S, S).
    Testing: views = (temporal, spatial) -> (V, T, 3, S, S), V = temporal * spatial, temporal-major.
    Random draws come from torch's global generator (a trainer seeds it per item or per worker);
    `seed` (an int) instead fixes each item's draw from (seed, index), e.g. to look at it twice.
    `flip`: the training flip's probability (0 for SSv2, whose classes say left and right).
    With skip_errors a bad video gives dict(error="<path>: <reason>", index) for `collate` to
    count and name; without it the VideoError propagates."""

    def __init__(self, samples, frames, train, size=224, views=(1, 1), skip_errors=False,
                 seed=None, flip=0.5):
        if not 0 <= flip <= 1:
            raise InputError(f"--flip {flip}: a probability, from 0 (never) to 1 (always)")
        if frames < 1:
            raise InputError(f"--frames {frames}: 1 or more frames per clip")
        if views[0] < 1 or views[1] not in (1, 3):
            raise InputError(f"--test-views {views[0]}x{views[1]}: temporal views 1 or more, "
                             "spatial views 1 or 3")
        self.samples, self.frames, self.train, self.size = list(samples), frames, train, size
        self.views, self.skip_errors, self.seed, self.flip = tuple(views), skip_errors, seed, flip

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            video = self.load(path, index)
        except VideoError as error:
            if not self.skip_errors:
                raise
            return dict(error=str(error), index=index)
        return dict(video=video, label=int(label), index=index)

    def clips(self, index, generators):
        """Training: one clip per generator from a single decode of the video (repeated
        sampling, MAE-ST): each its own frames and augmentation, each its own item in the list.
        A bad video gives one error item, as __getitem__."""
        path, label = self.samples[index]
        T = self.frames
        try:
            frames = read_frames(path, lambda n: sum((train_indices(n, T, g) for g in generators),
                                                     []))
        except VideoError as error:
            if not self.skip_errors:
                raise
            return [dict(error=str(error), index=index)]
        frames = torch.from_numpy(frames)  # (K * T, H, W, 3)
        return [dict(video=train_transform(frames[k * T:(k + 1) * T], self.size, g, self.flip),
                     label=int(label), index=index) for k, g in enumerate(generators)]

    def load(self, path, index=0):
        T = self.frames
        if self.train:
            generator = None
            if self.seed is not None:
                state = np.random.SeedSequence([self.seed, index]).generate_state(1)[0]
                generator = torch.Generator().manual_seed(int(state))
            frames = read_frames(path, lambda n: train_indices(n, T, generator))
            return train_transform(torch.from_numpy(frames), self.size, generator, self.flip)
        temporal, spatial = self.views
        frames = read_frames(path, lambda n: sum(eval_indices(n, T, temporal), []))
        frames = torch.from_numpy(frames)  # (temporal * T, H, W, 3), decoded once for all views
        return torch.cat([eval_transform(frames[v * T:(v + 1) * T], self.size, spatial)
                          for v in range(temporal)])  # (V, T, 3, S, S)


def loader_workers(workers):
    """`workers`, or 0 under a file-size limit below 4 GiB (`ulimit -f`, RLIMIT_FSIZE: how a
    full disk is simulated). A loader worker hands each batch over in a shared-memory file, which
    the limit caps as well: a batch over it was lost in the worker and the main process waited
    for it forever. Loading in the main process gives the same batches (the sampling depends on
    positions only). A micro-batch is at most ~0.6 GB (32 clips x 32 frames at 224 px, fp32)."""
    import resource
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return 0 if limit != resource.RLIM_INFINITY and limit < 4 * 2 ** 30 else workers


def leave_signals_to_main(worker_id):
    """A loader worker's init: SIGTERM/SIGINT are left to the main process. A scheduler signals
    every process of a job; a worker killed by it made the main process print torch's
    "DataLoader worker ... is killed by signal" traceback over its own one-line stop."""
    import signal
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def collate(items):
    """Stack the good items; list the bad ones in `errors` (a batch may end up empty). An item
    may be a list of items (several clips of one video)."""
    items = [one for item in items for one in (item if isinstance(item, list) else [item])]
    good = [item for item in items if "error" not in item]
    errors = [item["error"] for item in items if "error" in item]
    return dict(video=torch.stack([item["video"] for item in good]) if good else torch.empty(0),
                label=torch.tensor([item["label"] for item in good], dtype=torch.long),
                index=torch.tensor([item["index"] for item in good], dtype=torch.long),
                errors=errors)


# ----------------------------------------------------------------------------------------------
# Official layouts. Each reader returns (samples, raw class names, the file that names the
# classes); load_dataset checks and cleans the names.

def clean_class_name(name):
    """Prompt text from a class name: "brush_hair" -> "brush hair", "ApplyEyeMakeup" ->
    "apply eye makeup", "YoYo" -> "yo yo"."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name.replace("_", " "))
    return " ".join(name.split()).lower()


def _expect(dataset, *parts):
    """The joined path, or an error saying what the dataset's layout expected where."""
    path = os.path.join(*parts)
    if not os.path.exists(path):
        raise InputError(f"{dataset}: expected {path}")
    return path


def _first(dataset, folder, names):
    """The first of several names a dataset's copies use for one file."""
    for name in names:
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise InputError(f"{dataset}: expected one of {', '.join(names)} in {folder}")


def _folder(root, *names):
    """root/name for the first name that is a folder, else root."""
    folders = [os.path.join(root, name) for name in names]
    return next((folder for folder in folders if os.path.isdir(folder)), root)


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


@contextlib.contextmanager
def _parsing(path):
    """A file that cannot be read, or a line or entry of it that is not in the expected form:
    an error naming the file."""
    try:
        yield
    except OSError as error:
        raise InputError(f"{path}: cannot read it ({error.strerror or error})") from error
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise InputError(f"{path}: unexpected line or entry ({type(error).__name__}: "
                         f"{error})") from error


def _walk(folder):
    """Every file under folder, relative to it. Never glob: HMDB51 names carry [ ] ! ( ) &."""
    for directory, _, files in os.walk(folder):
        for name in files:
            yield os.path.relpath(os.path.join(directory, name), folder)


def _hmdb51(root, split, subset):
    splits = _expect("hmdb51", root, "testTrainMulti_7030_splits")
    suffix = f"_test_split{split}.txt"
    # The class is the split file's name minus the suffix (names hold underscores); indices
    # follow the sorted names, so "kick" comes before "kick_ball".
    classes = sorted(f[:-len(suffix)] for f in os.listdir(splits) if f.endswith(suffix))
    if not classes:
        raise InputError(f"hmdb51: expected <class>{suffix} files in {splits}")
    if not any(os.path.isdir(os.path.join(root, c)) for c in classes):
        raise InputError(f"hmdb51: expected videos as {root}/<class>/<video>.avi, found "
                         f"no class folder such as {os.path.join(root, classes[0])}")
    wanted = {"train": "1", "test": "2"}[subset]  # 0 marks a video this split does not use
    samples = []
    for label, name in enumerate(classes):
        split_file = os.path.join(splits, name + suffix)
        with _parsing(split_file):
            for line in _lines(split_file):
                video, tag = line.rsplit(maxsplit=1)
                if tag == wanted:
                    samples.append((os.path.join(root, name, video), label))
    return samples, classes, splits


def _ucf101(root, split, subset):
    lists = _expect("ucf101", root, "ucfTrainTestlist")
    videos = _folder(root, "UCF-101")  # the archive's folder, or the videos' classes in root
    class_file = _expect("ucf101", lists, "classInd.txt")
    with _parsing(class_file):  # lines "1 ApplyEyeMakeup": 1-indexed
        classes = [name for _, name in sorted((int(i), name) for i, name in
                                              (line.split() for line in _lines(class_file)))]
    # Lists, files and some folders disagree on case (HandstandPushups / HandStandPushups):
    # match class names and paths case-insensitively.
    label_of = {name.lower(): label for label, name in enumerate(classes)}
    on_disk = {rel.lower(): rel for rel in _walk(videos)}
    list_file = _expect("ucf101", lists, f"{subset}list0{split}.txt")
    samples = []
    with _parsing(list_file):
        for line in _lines(list_file):
            rel, *listed = line.split()  # testlist lines carry no label: it comes from the folder
            folder = rel.split("/")[0].lower()
            if folder not in label_of:
                raise InputError(f"ucf101: {list_file}: {rel} is in no class of classInd.txt")
            label = label_of[folder]
            if listed and int(listed[0]) - 1 != label:  # classInd and trainlist are 1-indexed
                raise InputError(f"ucf101: {list_file}: {rel} is listed as class {listed[0]}, "
                                 f"its folder is class {label + 1}")
            samples.append((os.path.join(videos, on_disk.get(rel.lower(), rel)), label))
    return samples, classes, class_file


_K400_CSVS = dict(train=["train.csv", "kinetics_train.csv", "kinetics-400_train.csv"],
                  test=["val.csv", "validate.csv", "kinetics_val.csv", "kinetics-400_val.csv"])


def _k400(root, split, subset):
    """Kinetics-400; subset "test" reads the validation CSV, on which the field evaluates."""
    def read(path):  # rows by column name: some copies add an is_cc column
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or "label" not in rows[0]:
            raise InputError(f"k400: {path} has no label column "
                             "(label,youtube_id,time_start,time_end,split)")
        return rows
    annotations = _folder(root, "annotations")
    csv_path = _first("k400", annotations, _K400_CSVS[subset])
    rows = read(csv_path)
    # Classes from every annotation CSV present, sorted (the CSVs themselves are in no class
    # order), so train and test agree on the indices.
    csvs = [os.path.join(annotations, n) for n in _K400_CSVS["train"] + _K400_CSVS["test"]]
    classes = sorted({row["label"] for p in csvs if os.path.isfile(p)
                      for row in read(p) if row["label"]})
    label_of = {name: label for label, name in enumerate(classes)}
    on_disk = {os.path.splitext(os.path.basename(rel))[0]: rel for rel in _walk(root)
               if rel.endswith((".mp4", ".mkv", ".webm", ".avi"))}  # class folders or flat
    samples, missing = [], []
    with _parsing(csv_path):
        for row in rows:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            clip = f"{row['youtube_id']}_{start:06d}_{end:06d}"
            if clip in on_disk:
                samples.append((os.path.join(root, on_disk[clip]), label_of[row["label"]]))
            else:
                missing.append(clip)
    # Every copy of Kinetics lacks some videos (gone from YouTube): report them, do not fail.
    print(f"k400 {subset}: found {len(samples)} of {len(rows)} clips listed in {csv_path}"
          + (f" ({len(missing)} missing, e.g. {missing[0]}.mp4)" if missing else ""))
    return samples, classes, annotations


def _ssv2(root, split, subset):
    """Something-Something v2; subset "test" reads validation.json (test labels are not public)."""
    def find(name):
        return _first("ssv2", _folder(root, "labels"), [name, f"something-something-v2-{name}"])
    def read(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    labels_file = find("labels.json")
    list_file = find({"train": "train.json", "test": "validation.json"}[subset])
    with _parsing(labels_file):  # the ids are strings, "0", "1", ...: used as given, not re-sorted
        index = {template: int(i) for template, i in read(labels_file).items()}
    classes = sorted(index, key=index.get)
    if sorted(index.values()) != list(range(len(index))):
        raise InputError(f"ssv2: {labels_file}: class ids are not 0 to {len(index) - 1}")
    videos = _folder(root, "20bn-something-something-v2", "videos")
    # Template "Putting [something] into [something]" is class "Putting something into something"
    with _parsing(list_file):
        samples = [(os.path.join(videos, f"{item['id']}.webm"),
                    index[item["template"].replace("[", "").replace("]", "")])
                   for item in read(list_file)]
    return samples, classes, labels_file


def _list(root, split, subset):
    """Any dataset: root/{train,test}.txt, lines "<relative/path> <class index>", and
    root/classes.txt, one class name a line."""
    class_file = _expect("list", root, "classes.txt")
    classes = _lines(class_file)
    list_file = _expect("list", root, f"{subset}.txt")
    samples = []
    with _parsing(list_file):
        for line in _lines(list_file):
            rel, label = line.rsplit(maxsplit=1)
            if not 0 <= int(label) < len(classes):
                raise InputError(f"list: {list_file}: label {label} of {rel} is not in classes.txt")
            samples.append((os.path.join(root, rel), int(label)))
    return samples, classes, class_file


def load_dataset(name, root, split=1, subset="train"):
    """(samples [(path, label)], class names as prompt text) of one split's train or test list.
    Listed videos missing on disk stay in the list (reading them names them), except Kinetics,
    whose copies always lack some: those are counted and left out. A layout that cannot be read
    is an InputError naming the file and pointing to the README and the doctor."""
    readers = dict(hmdb51=_hmdb51, ucf101=_ucf101, k400=_k400, ssv2=_ssv2, list=_list)
    if name not in readers:
        raise InputError(f"--dataset {name}: choose from {', '.join(DATASETS)}")
    if subset not in ("train", "test"):
        raise ValueError(f"subset must be train or test, got {subset!r}")  # a caller's bug
    splits = (1, 2, 3) if name in ("hmdb51", "ucf101") else (1,)
    if split not in splits:
        raise InputError(f"--split {split}: {name} has split(s) {', '.join(map(str, splits))}")
    hint = (f"see README, Datasets; check it with: "
            f"python data.py --dataset {name} --data-root {root} --split {split}")
    try:
        if not os.path.isdir(root):
            raise InputError(f"{name}: data root {root} does not exist or is not a folder")
        samples, classes, source = readers[name](root, split, subset)
        if not samples:
            raise InputError(f"{name} split {split}: the {subset} list is empty")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise InputError(f"{name}: cannot read {getattr(error, 'filename', None) or root}: "
                         f"{getattr(error, 'strerror', None) or error} ({hint})") from error
    except InputError as error:
        raise InputError(f"{error} ({hint})") from error
    check_class_names(classes, source)
    return samples, [clean_class_name(c) for c in classes]


def check_class_names(names, where):
    """Refuse a class list whose prompts cannot all be predicted: an empty list, an empty name,
    duplicates, or two names that clean to the same prompt text ("kick_ball" and "KickBall")."""
    if not names:
        raise InputError(f"{where}: no class names")
    by_text = collections.defaultdict(list)
    for name in names:
        by_text[clean_class_name(name)].append(name)
    if "" in by_text:
        raise InputError(f"{where}: an empty class name")
    for text, same in by_text.items():
        if len(same) > 1:
            what = (f"class {same[0]!r} is listed {len(same)} times" if len(set(same)) == 1 else
                    f"classes {', '.join(map(repr, same))} all become the prompt {text!r}")
            raise InputError(f"{where}: {what}, so one of them could never be predicted")


def overlapping_videos(train_samples, test_samples):
    """Sorted real paths (symlinks resolved, relative made absolute) in both sample lists."""
    def real(samples):
        return {os.path.realpath(path) for path, _ in samples}
    return sorted(real(train_samples) & real(test_samples))


# ----------------------------------------------------------------------------------------------
# Few-shot subsets

def few_shot(samples, shots, seed, class_names=None):
    """K videos per class drawn with a seed, in class order, from `samples` only (the split's
    training list). With class_names a class with no video at all is caught too."""
    by_class = collections.defaultdict(list)
    for path, label in samples:
        by_class[int(label)].append(path)
    labels = range(len(class_names)) if class_names else sorted(by_class)
    if shots < 1:
        raise InputError(f"--shots {shots}: the number of training videos per class, 1 or more")
    if not labels:
        raise InputError(f"--shots {shots}: the training list is empty")
    count = {label: len(by_class.get(label, [])) for label in labels}
    smallest = min(labels, key=count.get)
    if count[smallest] < shots:
        name = f" ({class_names[smallest]})" if class_names else ""
        raise InputError(f"--shots {shots}: class {smallest}{name} has only {count[smallest]} "
                         "training videos, the fewest of any class")
    rng = random.Random(seed)
    return [(path, label) for label in labels
            for path in rng.sample(sorted(by_class[label]), shots)]


def write_sample_list(path, samples):
    """Lines "<path> <label>", written atomically, to repeat a few-shot run exactly."""
    write_file(path, lambda f: f.writelines(f"{p} {int(label)}\n" for p, label in samples), "w")


def read_sample_list(path):
    with _parsing(path):
        return [(p, int(label)) for p, label in (line.rsplit(maxsplit=1) for line in _lines(path))]


# ----------------------------------------------------------------------------------------------
# Synthetic dataset: classes in pairs that look alike and differ only in motion. Pairs differ
# in appearance; within a pair a frame average sees the same frames (left/right, up/down,
# grow/shrink and the two turns are each other played backwards; slow/fast cover the same path),
# so only temporal modelling tells them apart.

SYNTHETIC_CLASSES = [  # (class, shape, motion); the shape and colour are shared within a pair
    ("move_left", "circle", "left"), ("move_right", "circle", "right"),
    ("grow", "square", "grow"), ("shrink", "square", "shrink"),
    ("move_up", "triangle", "up"), ("move_down", "triangle", "down"),
    ("rotate_clockwise", "bar", "clockwise"),
    ("rotate_counterclockwise", "bar", "counterclockwise"),
    ("move_slowly", "ring", "slow"), ("move_quickly", "ring", "fast"),
]
_SHAPE_COLOURS = dict(circle=(220, 40, 40), square=(40, 80, 230), triangle=(40, 190, 60),
                      bar=(235, 200, 30), ring=(200, 60, 200))


def render_synthetic_video(shape, motion, frames, width, height, rng):
    """uint8 (T, H, W, 3): one shape on a gradient background, moving as `motion` says."""
    m = min(width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = rng.uniform(20, 120, 3) + rng.uniform(-40, 40, 3) * (yy / height)[..., None]
    colour = np.clip(np.array(_SHAPE_COLOURS[shape]) + rng.uniform(-30, 30, 3), 0, 255)
    radius = m * rng.uniform(0.10, 0.14)
    cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
    angle0, first_way = rng.uniform(0, np.pi), rng.choice([-1, 1])
    video = np.empty((frames, height, width, 3), np.uint8)
    for t, p in enumerate(np.linspace(0, 1, frames)):
        x, y, r, angle = cx, cy, radius, angle0
        if motion in ("left", "right"):
            x = width * (0.2 + 0.6 * (p if motion == "right" else 1 - p))
        elif motion in ("up", "down"):
            y = height * (0.2 + 0.6 * (p if motion == "down" else 1 - p))
        elif motion in ("grow", "shrink"):
            r = m * (0.05 + 0.25 * (p if motion == "grow" else 1 - p))
        elif motion in ("clockwise", "counterclockwise"):  # y points down: + is clockwise on screen
            angle = angle0 + np.pi * p * (1 if motion == "clockwise" else -1)
        else:  # back and forth: once across (slow) or six times (fast), over the same path
            phase = (p * (1 if motion == "slow" else 6)) % 2
            x = width * (0.5 + first_way * 0.3 * (2 * min(phase, 2 - phase) - 1))
        dx, dy = xx - x, yy - y
        if shape == "circle":
            mask = dx ** 2 + dy ** 2 <= r ** 2
        elif shape == "square":
            mask = (abs(dx) <= r) & (abs(dy) <= r)
        elif shape == "triangle":  # apex up
            mask = (abs(dy) <= r) & (abs(dx) <= (dy + r) / 2)
        elif shape == "bar":
            u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
            mask = (abs(u) <= 1.6 * r) & (abs(v) <= 0.35 * r)
        else:
            mask = (dx ** 2 + dy ** 2 <= r ** 2) & (dx ** 2 + dy ** 2 >= (0.5 * r) ** 2)
        image = np.broadcast_to(background, (height, width, 3)).copy()
        image[mask] = colour
        video[t] = image
    return video


def make_synthetic_dataset(root, num_classes=6, videos_per_class=12, frames=32, size=(320, 240),
                           seed=0, fps=30):
    """Write a small dataset in HMDB51's official layout (read it with load_dataset("hmdb51")):
    root/<class>/<class>_NN.avi (mpeg4, like HMDB's Xvid) and
    root/testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt, lines "<video>.avi <1|2>",
    about 70/30 train/test, a different partition per split. Deterministic from the seed.
    Returns the class names in label order (sorted, as load_dataset numbers them).
    Never writes into a folder that holds anything but this same dataset, and deletes nothing:
    the dataset appears at `root` only when complete (a full disk leaves no trace), and
    root/synthetic.json records its settings."""
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise InputError(f"--classes {num_classes}: choose 1 to {len(SYNTHETIC_CLASSES)}")
    if videos_per_class < 2:  # at least one training and one test video per class
        raise InputError(f"--per-class {videos_per_class}: choose 2 or more")
    classes = SYNTHETIC_CLASSES[:num_classes]
    names = sorted(name for name, _, _ in classes)
    settings = dict(num_classes=num_classes, videos_per_class=videos_per_class, frames=frames,
                    size=list(size), seed=seed, fps=fps)
    marker = os.path.join(root, "synthetic.json")
    if os.path.exists(root) and not os.path.isdir(root):
        raise InputError(f"{root}: a file, not a folder; nothing was written")
    if os.path.isdir(root) and os.listdir(root):
        if not os.path.isfile(marker):
            raise InputError(f"{root}: not empty and not a complete synthetic dataset "
                             "(no synthetic.json); choose a new folder, nothing was written")
        with open(marker, encoding="utf-8") as f:
            made = json.load(f)
        if made != settings:
            raise InputError(f"{root}: holds a synthetic dataset made with other settings "
                             f"({made}); choose a new folder, nothing was written")
        return names  # already there, complete
    # Written into a temporary folder beside `root`, renamed to `root` when complete: a full
    # disk leaves nothing behind (the temporary folder is removed), never half a dataset.
    parent = os.path.dirname(os.path.abspath(root))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(root)}.")
    except OSError as error:
        raise WriteError(root, error.strerror or str(error)) from None
    try:
        width, height = size
        os.makedirs(os.path.join(tmp, "testTrainMulti_7030_splits"))
        for c, (name, shape, motion) in enumerate(classes):
            os.makedirs(os.path.join(tmp, name))
            videos = [f"{name}_{i:02d}.avi" for i in range(videos_per_class)]
            for i, video in enumerate(videos):
                rng = np.random.default_rng([seed, c, i])
                write_video(os.path.join(tmp, name, video),
                            render_synthetic_video(shape, motion, frames, width, height, rng),
                            fps=fps, bit_rate=max(400_000, width * height * 8))
            num_test = max(1, round(0.3 * videos_per_class))
            for split in (1, 2, 3):
                order = np.random.default_rng([seed, c, split]).permutation(videos_per_class)
                test = set(order[:num_test].tolist())
                split_file = f"{name}_test_split{split}.txt"
                with open(os.path.join(tmp, "testTrainMulti_7030_splits", split_file), "w") as f:
                    f.writelines(f"{v} {2 if i in test else 1}\n" for i, v in enumerate(videos))
        with open(os.path.join(tmp, "synthetic.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f)
        os.chmod(tmp, 0o755)   # mkdtemp makes it private
        os.replace(tmp, root)  # `root`, if it exists, is an empty folder: replaced
    except OSError as error:   # PyAV's errors are OSErrors too
        raise WriteError(root, error.strerror or str(error)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed; else what was written
    return names


# ----------------------------------------------------------------------------------------------
# Command line: the dataset doctor, --prepare (a copy that loads fast), the loader benchmark
# and the synthetic dataset

def progress(iterable, total=None, desc="", seconds=30):
    """tqdm's bar on a terminal; when stderr is redirected to a log, a plain line every
    `seconds` and one at the end (a bar's carriage returns would flood the log)."""
    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc)
        return
    start = last = time.monotonic()
    done = 0
    for done, item in enumerate(iterable, 1):
        yield item
        if time.monotonic() - last >= seconds:
            last = time.monotonic()
            print(f"{desc}: {done}/{total or '?'} after {last - start:.0f} s", file=sys.stderr)
    print(f"{desc}: {done}/{total or '?'} done in {time.monotonic() - start:.0f} s",
          file=sys.stderr)


def split_lists(dataset, root, split=1):
    """The doctor's walk over a dataset: {"train": samples, "test": samples} and the classes."""
    lists = {subset: load_dataset(dataset, root, split, subset) for subset in ("train", "test")}
    return {subset: samples for subset, (samples, _) in lists.items()}, lists["train"][1]


def for_each_video(work, paths, workers=None, desc="decoding", processes=False):
    """work(path) for every path, over the cores (threads: PyAV decodes without the GIL; or
    processes, for --prepare's encoding), with a progress line; the results in order."""
    fork = "fork" in multiprocessing.get_all_start_methods()  # no re-import per process
    pool = (ProcessPoolExecutor(workers or _cores(),
                                mp_context=multiprocessing.get_context("fork" if fork else None))
            if processes else ThreadPoolExecutor(workers or _cores()))
    with pool:
        return list(progress(pool.map(work, paths), total=len(paths), desc=desc))


def _cores():
    """The cores this process may run on (a job scheduler's share, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def doctor(dataset, root, split=1, workers=None):
    """Print counts per split and class, then every missing file, every video that does not
    decode (with the reason) and every video in both lists (BAD), and every video whose timeline
    has a hole the file cannot explain (WARN: training uses it). Returns the exit status: 0 when
    no video is bad, 1 when some is; a layout that cannot be read is an InputError (status 2)."""
    lists, classes = split_lists(dataset, root, split)
    counts = {s: collections.Counter(label for _, label in lists[s]) for s in lists}
    print(f"{dataset} split {split}: {len(classes)} classes, "
          f"{len(lists['train'])} train and {len(lists['test'])} test videos")
    for label, name in enumerate(classes):
        print(f"  {label:4d} {name:40s} train {counts['train'][label]:6d}  "
              f"test {counts['test'][label]:6d}")
    problems = []
    shared = overlapping_videos(lists["train"], lists["test"])
    problems += [f"{p}: in both the train and the test list" for p in shared]
    paths = sorted({p for s in lists for p, _ in lists[s]})
    results = [r for r in for_each_video(_check, paths, workers) if r]
    problems += [reason for status, reason in results if status == "BAD"]
    warnings = [reason for status, reason in results if status == "WARN"]
    for problem in problems:
        print(f"BAD {problem}")
    for warning in warnings:
        print(f"WARN {warning}")
    print(f"{len(paths)} videos checked, {len(problems)} problems"
          + (f", {len(warnings)} warnings (those videos are used)" if warnings else ""))
    return 1 if problems else 0


def _check(path):
    """The doctor's verdict on one video: None, ("BAD", why it cannot be read), or ("WARN", a
    hole in its timeline the file cannot explain; training uses it)."""
    try:
        check_video(path)
        warning = video_warning(path)
        return warning and ("WARN", warning)
    except VideoError as error:
        return "BAD", str(error)


# --prepare: a copy of the dataset that loads fast. Decoding costs in proportion to the pixels
# and to the frames decoded; a 256-pixel short side and a keyframe every 16 frames cut both.
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                  ".wmv", ".3gp", ".ogv", ".ts")


# x264's veryfast preset with tune fastdecode (no CABAC, no deblocking): measured on 720p
# H.264 sources, 35-40 dB against the resized originals at crf 20, and a training clip decodes
# in 32 ms instead of 58 ms with the fast preset; it also encodes twice as fast.
PREPARE_X264 = dict(preset="veryfast", tune="fastdecode")


def prepare(dataset, src, dst, short_side=256, gop=16, crf=20, workers=None):
    """Re-encode every video the dataset's lists name (all splits) into dst at the same relative
    path and name, with libx264 at `short_side` (never enlarged; aspect kept, even sides), the
    same frame rate and frames, a keyframe every `gop` frames, closed GOPs; copy every other
    file that is not a video (split files, CSVs, JSONs), so dst reads like src. Resumable: a
    video already in dst is checked (it decodes, with the source's frame count) and kept.
    Returns the exit status: 0, or 1 when some video could not be read (listed, not copied)."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_dst.startswith(real_src + os.sep):
        raise InputError(f"--prepare {dst}: inside --data-root {src}; choose a folder outside it "
                         "(the source is never written to)")
    if real_src.startswith(real_dst + os.sep):
        raise InputError(f"--prepare {dst}: holds --data-root {src}; choose a folder beside it")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise InputError(f"--prepare {dst}: a file, not a folder")
    if short_side < 16 or short_side % 2 or gop < 1:
        raise InputError(f"--short-side {short_side} --gop {gop}: an even short side of 16 or "
                         "more, and a keyframe every 1 or more frames")
    splits = (1, 2, 3) if dataset in ("hmdb51", "ucf101") else (1,)
    videos = sorted({p for split in splits for samples in split_lists(dataset, src, split)[0]
                     .values() for p, _ in samples})
    jobs = []
    for path in videos:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(src))
        if rel.startswith(os.pardir + os.sep):
            raise InputError(f"{path}: listed, but outside --data-root {src}; --prepare copies "
                             "the videos inside it")
        jobs.append((path, os.path.join(dst, rel), short_side, gop, crf))
    listed = {os.path.normcase(os.path.abspath(p)) for p in videos}
    others = [rel for rel in _walk(src) if not rel.lower().endswith(VIDEO_SUFFIXES)
              and os.path.normcase(os.path.abspath(os.path.join(src, rel))) not in listed]
    for rel in others:  # split files, CSVs, JSONs: copied unless already there
        target = os.path.join(dst, rel)
        source = os.path.join(src, rel)
        if not (os.path.isfile(target) and os.path.getsize(target) == os.path.getsize(source)):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(source, "rb") as f:  # whole or not at all, on a full disk too
                write_file(target, lambda out: shutil.copyfileobj(f, out))
    start = time.monotonic()
    results = for_each_video(_prepare_video, jobs, workers, desc="preparing", processes=True)
    for status, error in results:  # a full disk is no fault of the videos: its one line
        if status == "unwritable":
            raise error
    done = collections.Counter(status for status, _ in results)
    bad = [message for status, message in results if status == "bad"]
    for message in bad:
        print(f"BAD {message} (not copied)")
    size = {folder: sum(os.path.getsize(job[i]) for job in jobs if os.path.isfile(job[i]))
            for i, folder in ((0, "src"), (1, "dst"))}
    print(f"{len(jobs)} videos: {done['written']} written, {done['kept']} already done and "
          f"checked, {len(bad)} unreadable; {len(others)} other files copied or present; "
          f"videos {size['src'] / 2 ** 20:.1f} MiB in {src}, {size['dst'] / 2 ** 20:.1f} MiB in "
          f"{dst}; {time.monotonic() - start:.0f} s")
    print(f"check it:  python data.py --dataset {dataset} --data-root {dst}")
    return 1 if bad else 0


def _prepare_video(job):
    """One video of --prepare: ("written" | "kept" | "bad", message). Written under a temporary
    name and renamed once checked, so an interrupted run leaves no half video under the name."""
    src, dst, short_side, gop, crf = job
    try:
        expected = count_frames(src)
        if os.path.exists(dst):
            try:
                if check_video(dst) == expected:
                    return "kept", None
            except VideoError:
                pass  # damaged or half written by hand: write it again
        stem, suffix = os.path.splitext(dst)
        tmp = f"{stem}.partial{suffix}"
        try:
            os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
            written = _reencode(src, tmp, short_side, gop, crf)
            if check_video(tmp) != written or abs(written - expected) > max(2, expected // 100):
                raise VideoError(f"{src}: the copy holds {written} frames, the source {expected}")
            os.replace(tmp, dst)
        finally:  # no half video left behind, whatever stopped it
            with contextlib.suppress(OSError):
                os.remove(tmp)
        return "written", None
    except WriteError as error:  # a full disk, a read-only folder: the run stops on it
        return "unwritable", WriteError(dst, error.reason)  # named as the user will look for it
    except VideoError as error:
        return "bad", str(error)
    except OSError as error:
        return "unwritable", WriteError(dst, error.strerror or str(error))


def _reencode(src, dst, short_side, gop, crf):
    """src -> dst with libx264 (see prepare); returns the frames written."""
    suffix = os.path.splitext(dst)[1].lower()
    # WebM holds only VP8/VP9/AV1: SSv2's names get Matroska (ffmpeg reads the content, not the
    # name). AVI stores no presentation times, so no B-frames there.
    container_format = {".webm": "matroska", ".avi": "avi"}.get(suffix)
    options = dict(PREPARE_X264, crf=str(crf), threads="1")
    # 3 B-frames that nothing refers to (no pyramid): a chosen frame needs at most the I- and
    # P-frames before it in its GOP, and the loader skips the rest
    options["x264-params"] = (f"keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0:"
                              + ("bframes=0" if suffix == ".avi" else "bframes=3:b-pyramid=none"))
    with _open_video(src) as (container, stream):
        times = _packet_times(container, stream)
        _check_complete(src, container, stream, times)
        container.seek(0)
        W, H = stream.codec_context.width, stream.codec_context.height
        scale = min(1.0, short_side / min(W, H))
        width, height = (2 * max(1, round(side * scale / 2)) for side in (W, H))
        rate = stream.average_rate or stream.guessed_rate or 30
        written = 0
        try:  # a failed write names dst and the OS's reason, not the source as damaged
            out = av.open(dst, "w", format=container_format)
        except OSError as error:
            raise WriteError(dst, error.strerror or str(error)) from None
        try:
            video = out.add_stream("libx264", rate=rate, options=options)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            for frame in container.decode(stream):
                if frame.is_corrupt:
                    raise VideoError(f"{src}: decode error, frame {written} is corrupt")
                # swscale's bilinear widens its kernel when it shrinks, as PIL's and torch's
                # antialiased bilinear do: the copy is close to what they make of the original
                small = frame.reformat(width, height, "yuv420p", interpolation="BILINEAR")
                small.pts, small.time_base = written, 1 / rate  # constant rate, same frames
                small.pict_type = av.video.frame.PictureType.NONE  # the source's keyframes
                # would force keyframes here too: the GOP is ours to choose
                _mux(out, video.encode(small), dst)
                written += 1
            _mux(out, video.encode(), dst)
        except BaseException:
            with contextlib.suppress(Exception):
                out.close()
            raise
        try:  # the trailer (an MP4's index) is written here
            out.close()
        except OSError as error:
            raise WriteError(dst, error.strerror or str(error)) from None
    if written == 0:
        raise VideoError(f"{src}: the decoder returned no frame")
    return written


def _mux(out, packets, dst):
    """out.mux(packets); a failed write (ENOSPC, EFBIG) is a WriteError naming dst."""
    try:
        out.mux(packets)
    except OSError as error:
        raise WriteError(dst, error.strerror or str(error)) from None


# --benchmark: what the loader costs on the user's own files, and the cores a GPU needs.
H100_BF16_PEAK = 989e12  # FLOP/s, dense
UTILISATION = 0.30       # of the peak, for a training step, when no measured rate is given
# a training step's multiply-adds over the forward's: eval.py --benchmark counts 402.6 G a clip
# for ViT-B/16, T=8 (backward through the frozen CLIP needs the input gradients, about one more
# forward), against 190.7 G for the forward alone
TRAIN_OVER_FORWARD = 402.6 / 190.7


def benchmark(dataset, root, split=1, frames=8, model="ViT-B/16", gpu_json=None, videos=12):
    """CPU time per training clip on `videos` of the training list (evenly spread), one thread,
    median of 3; the clips a core makes per second; the cores a GPU needs to train at its rate
    (eval.py --benchmark --json's train_clips_per_s, else the multiply-adds at UTILISATION of an
    H100's bf16 peak); whether --prepare would help. Returns the exit status."""
    import omniclip  # only here: the loader itself does not need the model
    if model not in omniclip.ARCHITECTURES:
        raise InputError(f"--model {model}: one of {', '.join(omniclip.ARCHITECTURES)}")
    # the GPU's rate first: a bad --gpu-json is one line before any video is timed
    if gpu_json:
        with _parsing(gpu_json):
            with open(gpu_json, encoding="utf-8") as f:
                report = json.load(f)
            gpu_rate = float(report["train_clips_per_s"])
        source = (f"{gpu_json}: {report.get('device_name', 'GPU')}, {report.get('model')}, "
                  f"T={report.get('frames')}, measured")
    else:
        config = omniclip.OmniCLIPConfig(**omniclip.ARCHITECTURES[model], frames=frames)
        train_macs = TRAIN_OVER_FORWARD * omniclip.analytic_macs(config, 400)["total"]
        gpu_rate = UTILISATION * H100_BF16_PEAK / (2 * train_macs)  # a multiply-add is 2 FLOPs
        source = (f"H100 at {UTILISATION:.0%} of its {H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 "
                  f"peak, {model}, T={frames}: {train_macs / 1e9:.1f} G multiply-adds a "
                  "training clip")
    samples = split_lists(dataset, root, split)[0]["train"]
    chosen = [samples[round(k * (len(samples) - 1) / max(1, videos - 1))]
              for k in range(min(videos, len(samples)))]
    size = omniclip.ARCHITECTURES[model]["image_resolution"]
    loader = VideoDataset(chosen, frames, train=True, size=size, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one loader worker: one core
    costs, shapes, gops, bad = [], [], [], []
    try:
        for index, (path, _) in enumerate(progress(chosen, total=len(chosen), desc="timing")):
            try:
                seconds = []
                for _ in range(3):
                    start = time.process_time()
                    loader.load(path, index)
                    seconds.append(time.process_time() - start)
                costs.append(1000 * statistics.median(seconds))
                shapes.append(_frame_shape(path))
                gops.append(_mean_gop(path))
            except VideoError as error:
                bad.append(str(error))
    finally:
        torch.set_num_threads(threads)
    for message in bad:
        print(f"BAD {message} (not timed)")
    if not costs:
        raise InputError(f"{dataset} at {root}: none of the {len(chosen)} videos decodes")
    ms = statistics.mean(costs)
    per_core = 1000 / ms
    short = statistics.median(min(h, w) for h, w in shapes)
    gop = statistics.median(gops)
    print(f"{len(costs)} training clips (T={frames}, {size} px, one thread, median of 3): "
          f"{ms:.1f} CPU-ms per clip, {per_core:.1f} clips per core-second")
    print(f"GPU: {gpu_rate:.0f} training clips/s ({source})")
    print(f"cores per GPU: {gpu_rate / per_core:.1f} (loader workers per GPU, one core each)")
    reasons = [f"a short side of {short:.0f} px (decoding cost grows with the pixels)"
               if short > 1.25 * 256 else "",
               f"a keyframe every {gop:.0f} frames (a clip's frames need the GOP before them)"
               if gop > 2 * 16 else ""]
    reasons = [r for r in reasons if r]
    if reasons:
        print(f"--prepare would help: {' and '.join(reasons)}; "
              f"python data.py --dataset {dataset} --data-root {root} --prepare DST")
    else:
        print(f"--prepare would not help much: short side {short:.0f} px, a keyframe every "
              f"{gop:.0f} frames")
    return 1 if bad else 0


def _frame_shape(path):
    with _open_video(path) as (container, stream):
        return stream.codec_context.height, stream.codec_context.width


def _mean_gop(path):
    """Frames per keyframe, from the packets' flags."""
    with _open_video(path) as (container, stream):
        keys = [packet.is_keyframe for packet in container.demux(stream) if packet.size]
    return len(keys) / max(1, sum(keys))


def make_synthetic(root, num_classes, videos_per_class):
    """The --make-synthetic command: write the dataset, say what was written and how to train."""
    names = make_synthetic_dataset(root, num_classes, videos_per_class)  # WriteError: 1 line
    print(f"{root}: {len(names)} classes x {videos_per_class} synthetic videos (32 frames, "
          f"320x240, mpeg4 AVI) in HMDB51's layout, splits 1-3: {', '.join(names)}")
    print("check it:  python data.py --dataset hmdb51 --data-root " + root)
    print("few-shot smoke run (tiny random CLIP, CPU, a few minutes):\n"
          f"  python train.py --dataset hmdb51 --data-root {root} --shots 2 --model tiny "
          "--frames 8 --epochs 2 --out runs/smoke")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check a dataset (the doctor), write a fast "
                                     "copy of it (--prepare), time its loading (--benchmark), or "
                                     "write a synthetic one.")
    parser.add_argument("--dataset", choices=DATASETS, help="dataset layout to check")
    parser.add_argument("--data-root", help="dataset root in its official layout")
    parser.add_argument("--split", type=int, default=1, help="split 1, 2 or 3 (hmdb51, ucf101)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads (processes for --prepare) (default: all cores)")
    parser.add_argument("--prepare", metavar="DST",
                        help="write a copy of the dataset that loads fast into DST (outside "
                             "--data-root): every listed video re-encoded with libx264 at "
                             "--short-side, a keyframe every --gop frames; other files copied. "
                             "Rerun to resume")
    parser.add_argument("--short-side", type=int, default=256,
                        help="--prepare: pixels of the short side (256, X-CLIP's and mmaction's "
                             "pre-resized Kinetics; never enlarged)")
    parser.add_argument("--gop", type=int, default=16,
                        help="--prepare: a keyframe every GOP frames (16: a clip's frame then "
                             "needs at most 15 before it)")
    parser.add_argument("--crf", type=int, default=20,
                        help="--prepare: x264's constant rate factor, lower is better and larger "
                             "(20: 35-40 dB against the resized originals)")
    parser.add_argument("--benchmark", action="store_true",
                        help="CPU time per training clip on the dataset's own videos and the "
                             "cores per GPU that training needs")
    parser.add_argument("--frames", type=int, default=8, help="--benchmark: T frames a clip (8)")
    parser.add_argument("--model", default="ViT-B/16", help="--benchmark: the CLIP (ViT-B/16)")
    parser.add_argument("--gpu-json", help="--benchmark: the GPU's rate from "
                                           "`python eval.py --benchmark --json FILE` on it")
    parser.add_argument("--videos", type=int, default=12,
                        help="--benchmark: videos timed, spread over the training list (12)")
    parser.add_argument("--make-synthetic", metavar="DIR",
                        help="write a small dataset in HMDB51's layout whose classes differ only "
                             "in motion, for smoke tests (DIR must be new or empty)")
    parser.add_argument("--classes", type=int, default=6,
                        help=f"--make-synthetic: classes, 1-{len(SYNTHETIC_CLASSES)} (6)")
    parser.add_argument("--per-class", type=int, default=12,
                        help="--make-synthetic: videos per class, about 70%% train (12)")
    # a bad flag is one line naming it, as in train.py and eval.py, not argparse's usage block
    parser.error = lambda message: parser.exit(2, f"error: {message} (python data.py --help)\n")
    args = parser.parse_args(argv)
    try:
        for flag in ("workers", "frames", "videos"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise InputError(f"--{flag} {value}: 1 or more")
        if args.make_synthetic:
            make_synthetic(args.make_synthetic, args.classes, args.per_class)
            return 0
        if not (args.dataset and args.data_root):
            parser.error("give --dataset and --data-root, or --make-synthetic DIR")
        if args.prepare:
            return prepare(args.dataset, args.data_root, args.prepare, args.short_side, args.gop,
                           args.crf, args.workers)
        if args.benchmark:
            return benchmark(args.dataset, args.data_root, args.split, args.frames, args.model,
                             args.gpu_json, args.videos)
        return doctor(args.dataset, args.data_root, args.split, args.workers)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
