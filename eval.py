"""Evaluate, inspect and benchmark OmniCLIP: the paper's Sec. 4 numbers, Figure 4, Table 2's cost.

OmniCLIP, trained by train.py (which writes runs/<name>/checkpoint.pt):
    python eval.py --checkpoint runs/<name>/checkpoint.pt --dataset hmdb51 --data-root DIR --views 4x3 --json r.json
    torchrun --nproc_per_node 8 eval.py --checkpoint runs/<name>/checkpoint.pt ...   # each video counted once
    python eval.py --checkpoint runs/<name>/checkpoint.pt --dataset ucf101 --data-root DIR --split all  # Table 6
    python eval.py --checkpoint runs/<name>/checkpoint.pt --video clip.mp4 --window 4   # the run's own classes
    python eval.py --checkpoint runs/<name>/checkpoint.pt --video clip.mp4 --attention-maps fig4.png  # Figure 4
Plain CLIP averaging its frame features, untrained (the paper's "vanilla CLIP", Tables 5-7 and 10):
    python eval.py --model ViT-B/16 --dataset hmdb51 --data-root DIR --frames 8 --views 4x3
    python eval.py --model ViT-B/16 --video clip.mp4 --classes "punch,kick ball"
Offline, no weights at all: --model tiny is a random tiny CLIP (its answers mean nothing, the commands run):
    python eval.py --model tiny --video clip.mp4 --classes "punch,kick ball" --window 2
    python eval.py --model tiny --video clip.mp4 --attention-maps fig4.png   # a random, untrained OmniCLIP
Cost, with random weights (no download), for any variant the model options build:
    python eval.py --benchmark --model ViT-B/16 --frames 8 --batch-size 1 [--connection cascade] [--device cuda --bf16]

Scores: softmax per view, then the probabilities averaged over the temporal x spatial views of a
video. Accuracies are in percent, as in the paper's tables; over several splits, mean ± population
standard deviation. Multiply-adds ("GFLOPs" in the paper) are per view, text tower excluded (class
features are computed once), counted by torch.utils.flop_counter.
Weights: a checkpoint names its CLIP, never locates it: one of OpenAI's models (from our table of URLs
and SHA256s), "tiny" (random, rebuilt from its seed) or "local" (you give the file, --clip-weights,
and its SHA256 must be the recorded one). Nothing else a checkpoint says reaches a loader or the network.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Subset

import clip_weights as cw
import data
import omniclip as oc

# Sec. 3.1: "A video of [CLS] action". No period, as the paper writes it; CLIP's tokenizer
# lower-cases, so "A" and "a" are the same tokens.
DEFAULT_TEMPLATE = "a video of {} action"
CLIP_FIELDS = tuple(oc.ARCHITECTURES["tiny"])    # the config fields that come from CLIP's weights
RANDOM_CLIP = ("tiny", "random")                 # checkpoint "clip_weights" names with no file
CHECKPOINT_KEYS = ("model", "config", "clip_weights")   # what every train.py checkpoint holds
InputError, WeightsError = data.InputError, cw.WeightsError


class NonFiniteScores(InputError):
    """Class scores that are NaN or inf: finite weights so large that the forward overflows.
    An accuracy from them would be an artefact of argmax over NaN; main names the checkpoint."""


def one_line(error, limit=200):
    """An exception as one short line, for messages about files that are not what they claim."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:limit]


# ----------------------------------------------------------------------------------------------
# Checkpoints and weights

def read_checkpoint(path, needs=CHECKPOINT_KEYS):
    """A train.py checkpoint, read with torch.load(weights_only=True): tensors and plain values
    only, so nothing in the file runs. Every kind of bad file is one InputError naming it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{path}: a directory, not a checkpoint file (train.py writes "
                         "runs/<name>/checkpoint.pt)")
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:   # torch raises many kinds for a foreign file; all mean the same here
        blocked = re.search(r"GLOBAL (\S+)", str(error))
        if blocked:              # weights_only would have to import and call this to rebuild it
            raise InputError(f"{path}: refused: it holds a Python object ({blocked.group(1)}) that "
                             "would run code when loaded (torch.load weights_only=True); a "
                             "train.py checkpoint holds only tensors and plain values") from None
        raise InputError(f"{path}: not a torch checkpoint, or truncated ({one_line(error)})") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: holds a {type(checkpoint).__name__}, not a train.py checkpoint")
    missing = [key for key in needs if key not in checkpoint]
    if missing:
        plain = checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
        raise InputError(f"{path}: {'a plain state_dict' if plain else 'a dict'} without {missing}: "
                         "not a train.py checkpoint")
    for key, kind in (("model", dict), ("config", dict), ("clip_weights", dict)):
        if key in checkpoint and not isinstance(checkpoint[key], kind):
            raise InputError(f"{path}: its {key!r} is a {type(checkpoint[key]).__name__}, "
                             f"not a {kind.__name__}")
    name = first_non_finite(checkpoint)
    if name:
        raise InputError(f"{path}: tensor {name} holds NaN or inf: the run diverged before this "
                         "was saved; evaluate or resume an earlier checkpoint")
    return checkpoint


def first_non_finite(checkpoint):
    """The name of the first trained tensor or optimizer moment that holds NaN or inf, or None:
    such a checkpoint would evaluate to noise, or resume into more NaN."""
    optimizer = checkpoint.get("optimizer")
    states = optimizer.get("state", {}) if isinstance(optimizer, dict) else {}
    named = [(f"model[{name!r}]", t) for name, t in (checkpoint.get("model") or {}).items()]
    named += [(f"optimizer state {i} {key}", t) for i, state in states.items()
              if isinstance(state, dict) for key, t in state.items()]
    return next((name for name, t in named if isinstance(t, torch.Tensor)
                 and t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def load_trained(model, state, path, built_by="its config", load=True):
    """Copy a checkpoint's trained tensors into `model` (load=False: only check), strictly; the
    first tensor that does not fit (missing, extra, another shape or dtype) is one InputError
    naming `path` and both sides."""
    differences = tensor_differences(model, state)
    if differences:
        raise InputError(f"{path}: its trained tensors do not fit the model {built_by} builds: "
                         f"{differences[0]}" + (f" (and {len(differences) - 1} more)"
                                                if len(differences) > 1 else ""))
    if load:
        model.load_trainable_state_dict(state)


def tensor_differences(model, state):
    """Each trained tensor of `state` that does not fit `model`, both sides described."""
    def describe(t):
        return (f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                if isinstance(t, torch.Tensor) else type(t).__name__)
    own = model.trainable_state_dict()
    differences = []
    for name in [*own, *sorted(state.keys() - own.keys())]:
        there, here = state.get(name), own.get(name)
        if here is None:
            differences.append(f"{name} is in the checkpoint ({describe(there)}) but not in the "
                               "model")
        elif not isinstance(there, torch.Tensor):
            differences.append(f"{name} is missing from the checkpoint (model: {describe(here)})")
        elif there.shape != here.shape or there.dtype != here.dtype:
            differences.append(f"{name}: checkpoint {describe(there)}, model {describe(here)}")
    return differences


def checkpoint_config(checkpoint, path):
    try:
        return oc.OmniCLIPConfig(**checkpoint["config"])
    except (TypeError, ValueError) as error:   # an unknown field (another version, a fork) or value
        raise InputError(f"{path}: its config does not fit this omniclip.py ({one_line(error)})") from None


def clip_sha256(clip):
    """A fingerprint of CLIP's tensors, for random CLIPs that have no file to hash
    (the same digest as train.py's: names and bytes in state_dict order)."""
    h = hashlib.sha256()
    for name, tensor in clip.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def clip_source(recorded, checkpoint_path, clip_weights=None):
    """What to load as a checkpoint's frozen CLIP, decided before anything is read. A checkpoint
    names its weights, never locates them: a name in clip_weights.MODELS is resolved through our
    table (the download, or the cached file, is checked against the table's SHA256 before it is
    loaded); "local" is a file only the user gives (--clip-weights), whose SHA256 must be the
    recorded one, compared here, before it is loaded. Any other name is refused."""
    name, sha256 = recorded.get("name"), recorded.get("sha256")
    if name in RANDOM_CLIP:
        raise WeightsError(f"--clip-weights {clip_weights}: {checkpoint_path} was trained on a random "
                           "tiny CLIP rebuilt from its seed; leave --clip-weights out")
    if name not in cw.MODELS and name != "local":
        raise WeightsError(f"{checkpoint_path} names its CLIP weights {name!r}: refused; a checkpoint "
                           f"may name one of {list(cw.MODELS)}, 'tiny' or 'local' (a file you give "
                           "with --clip-weights), never a path or a URL")
    if name in cw.MODELS and sha256 != cw.MODEL_SHA256[name]:
        raise WeightsError(f"{checkpoint_path} records SHA256 {sha256} for {name}, whose released "
                           f"file has {cw.MODEL_SHA256[name]}")
    if clip_weights is None:
        if name == "local":
            raise WeightsError(f"{checkpoint_path} was trained on a local CLIP file (SHA256 {sha256}):"
                               " give that file with --clip-weights FILE")
        return name
    if not os.path.isfile(clip_weights):
        raise WeightsError(f"--clip-weights {clip_weights}: not a file")
    actual = cw.sha256_of(clip_weights)
    if actual != sha256:
        raise WeightsError(f"--clip-weights {clip_weights} has SHA256 {actual}, but {checkpoint_path} "
                           f"was trained on {name!r} with SHA256 {sha256}")
    return clip_weights


def quietly(build, *args, **kwargs):
    """build_omniclip lists the adapters as starting from their init: where a checkpoint
    overwrites them all, or nothing trains them, that list would mislead."""
    with contextlib.redirect_stdout(io.StringIO()):
        return build(*args, **kwargs)


def random_tiny(config, seed, omniclip=True):
    """A random CLIP (and OmniCLIP) as train.py draws it: torch.manual_seed(seed), then
    OmniCLIP(config), whose CLIP is built first. The caller's generator is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return oc.OmniCLIP(config) if omniclip else oc.FrameAverageCLIP(oc.CLIP(config))


def load_model(checkpoint_path, clip_weights=None, device="cpu"):
    """Rebuild OmniCLIP from a train.py checkpoint: config, frozen CLIP (clip_source: named, never
    located, by the checkpoint; its SHA256 checked), then the trained adapters, strictly.
    `clip_weights` is the user's own copy of the recorded file (offline machines, "local")."""
    checkpoint = read_checkpoint(checkpoint_path)
    config = checkpoint_config(checkpoint, checkpoint_path)
    recorded = checkpoint["clip_weights"]
    if recorded.get("name") in RANDOM_CLIP and clip_weights is None:
        seed = recorded.get("seed", checkpoint.get("args", {}).get("seed", 0))
        model = random_tiny(config, seed)
        if recorded.get("sha256") != clip_sha256(model.clip):
            raise WeightsError(f"{checkpoint_path}: the random CLIP rebuilt from seed {seed} has SHA256 "
                               f"{clip_sha256(model.clip)}, not the recorded {recorded.get('sha256')}")
    else:
        state = cw.load_state_dict(clip_source(recorded, checkpoint_path, clip_weights))
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                   if f.name not in CLIP_FIELDS}
        model = quietly(cw.build_omniclip, state, **options)
        built = {k: getattr(model.config, k) for k in CLIP_FIELDS}
        trained = {k: getattr(config, k) for k in CLIP_FIELDS}
        if built != trained:
            raise InputError(f"{checkpoint_path} was trained on a CLIP of architecture {trained}; "
                             f"its weights build {built}")
    adapter = model.adapter_name()
    if checkpoint.get("adapter", adapter) != adapter:    # older checkpoints record none: accepted
        raise InputError(f"{checkpoint_path} was trained with the temporal adapter "
                         f"{checkpoint['adapter']!r}; this omniclip.py builds {adapter!r}")
    load_trained(model, checkpoint["model"], checkpoint_path)
    return model.to(device).eval(), checkpoint


def load_untrained(model_name, clip_weights, frames, options=None, omniclip=False, device="cpu"):
    """No checkpoint: OpenAI's CLIP (or a random tiny one, seed 0) averaging its frame features,
    what the paper calls vanilla CLIP; with omniclip=True (attention maps), an untrained OmniCLIP
    on that CLIP, its adapters at their initialisation. Returns (model, one-line description)."""
    options = dict(options or {}, frames=frames)
    if clip_weights is None and model_name == "tiny":
        config = oc.OmniCLIPConfig(**oc.ARCHITECTURES["tiny"], **options)
        model = random_tiny(config, seed=0, omniclip=omniclip)
        clip = "a RANDOM tiny CLIP (seed 0, no weights: the output shows the pipeline runs, its answers mean nothing)"
    else:
        state = cw.load_state_dict(clip_weights or model_name)
        model = (quietly(cw.build_omniclip, state, **options) if omniclip
                 else oc.FrameAverageCLIP(cw.build_clip(state)))
        clip = f"CLIP {clip_weights or model_name}"
    what = ("an untrained OmniCLIP (adapters at their initialisation) on " if omniclip
            else "plain CLIP averaging its frame features (no OmniCLIP adapters, zero-shot): ")
    return model.to(device).eval(), what + clip


def input_size(model):
    """Frame side S the model was built for (OmniCLIP or FrameAverageCLIP)."""
    visual = model.clip.visual
    grid = math.isqrt(visual.positional_embedding.shape[0] - 1)
    return grid * visual.conv1.kernel_size[0]


@torch.no_grad()
def text_features(model, class_names, template, device):
    """(C, E) class features: template + frozen text tower, computed once per class list."""
    model = getattr(model, "module", model)
    encode = getattr(model, "encode_classes", model.clip.encode_text)
    try:
        tokens = cw.tokenize([template.format(name) for name in class_names])
    except RuntimeError as error:            # more than CLIP's 77 tokens
        raise InputError(f"class text: {error}") from None
    return encode(tokens.to(device))


# ----------------------------------------------------------------------------------------------
# Multi-view evaluation

def view_probabilities(model, videos, class_features, autocast_dtype=None):
    """(B, V, T, 3, S, S) videos -> (B, C): softmax per view, probabilities averaged over views."""
    B, V = videos.shape[:2]
    amp = (torch.autocast(videos.device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    with amp:
        logits = model(videos.flatten(0, 1), class_features)            # (B·V, C)
    return logits.float().softmax(dim=-1).unflatten(0, (B, V)).mean(dim=1)  # (B, C)


def summarize(labels, probs, class_names=None):
    """Top-1/top-5 (percent), per-class accuracy and the confusion matrix (rows: true class)."""
    C = probs.shape[1]
    predictions = probs.argmax(dim=1)
    top5 = probs.topk(min(5, C), dim=1).indices                          # (Nv, 5)
    correct1 = predictions == labels
    correct5 = (top5 == labels[:, None]).any(dim=1)
    confusion = torch.zeros(C, C, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    per_class = []
    for c in range(C):
        n = int(confusion[c].sum())
        per_class.append(dict(index=c, name=class_names[c] if class_names else None, videos=n,
                              top1=100.0 * int(confusion[c, c]) / n if n else None))
    seen = [p["top1"] for p in per_class if p["videos"]]
    n = max(len(labels), 1)
    return dict(top1=100.0 * int(correct1.sum()) / n, top5=100.0 * int(correct5.sum()) / n,
                mean_class_top1=sum(seen) / len(seen) if seen else None,
                per_class=per_class, confusion=confusion.tolist())


@torch.no_grad()
def evaluate(model, dataset, class_features, device, batch_size, distributed=False, num_workers=0,
             class_names=None, autocast_dtype=None):
    """Every video of `dataset` scored once, over all its views. Under DDP each rank takes the
    indices rank::world (DistributedSampler would pad with duplicates), the per-video
    probabilities are gathered, and every rank reduces the same list, keyed by video index."""
    model = getattr(model, "module", model)   # a DDP wrapper would try to sync buffers per forward
    was_training = model.training
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shard = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False,
                        num_workers=data.loader_workers(num_workers),
                        collate_fn=data.collate, worker_init_fn=data.leave_signals_to_main)
    class_features = class_features.to(device)
    results, skipped = [], []   # results: (video index, label, probabilities (C,))
    for batch in loader:
        skipped += batch["errors"]
        if len(batch["index"]) == 0:      # every video of this batch failed to decode
            continue
        videos = batch["video"].to(device, non_blocking=True)
        if videos.dim() == 5:             # one view: (B, T, 3, S, S) -> (B, 1, T, 3, S, S)
            videos = videos[:, None]
        probs = view_probabilities(model, videos, class_features, autocast_dtype).cpu()
        # one small tensor per video: a row view would carry the whole batch through the gather
        results += zip(batch["index"].tolist(), batch["label"].tolist(), probs.clone().unbind(0))
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, (results, skipped))
        results = [r for part, _ in gathered for r in part]
        skipped = [s for _, part in gathered for s in part]
    model.train(was_training)
    results.sort(key=lambda r: r[0])
    overflowed = [r[0] for r in results if not torch.isfinite(r[2]).all()]  # after the gather:
    if overflowed:                                                        # every rank agrees
        raise NonFiniteScores(
            f"the model's class scores are NaN or inf for {len(overflowed)} of {len(results)} "
            f"videos (the first: {dataset.samples[overflowed[0]][0]}): its weights overflow the "
            "forward; no accuracy computed from them. Evaluate an earlier checkpoint")
    indices = [r[0] for r in results]
    if len(set(indices)) != len(indices):
        raise RuntimeError("a video was scored twice: the shards overlap")
    C = class_features.shape[0]
    labels = torch.tensor([r[1] for r in results], dtype=torch.long)
    probs = torch.stack([r[2] for r in results]) if results else torch.zeros(0, C)
    report = summarize(labels, probs, class_names)
    report.update(num_videos=len(dataset), num_evaluated=len(results), num_skipped=len(skipped),
                  skipped=sorted(skipped),
                  # per video, in index order: [index, label, predicted class, its probability]
                  videos=[[i, int(l), int(p.argmax()), float(p.max())] for i, l, p in results])
    return report


def mean_std(values):
    """Mean ± standard deviation over the test splits. Paper is silent on which deviation; we take
    the population one (numpy's np.std default, divide by n): the three splits are all there is."""
    return statistics.mean(values), statistics.pstdev(values)


def evaluate_splits(model, args, frames, size, template, device, distributed, splits):
    """One test split per report; over several splits (zero-shot, Table 6) the mean and the
    population standard deviation of top-1 and top-5, and the confusion matrices summed."""
    reports = {}
    for split in splits:
        samples, class_names = data.load_dataset(args.dataset, args.data_root, split, "test")
        dataset = data.VideoDataset(samples, frames, train=False, size=size, views=args.views,
                                    skip_errors=not args.stop_on_error)
        features = text_features(model, class_names, template, device)
        reports[split] = evaluate(model, dataset, features, device, args.batch_size, distributed,
                                  args.num_workers, class_names, args.autocast_dtype)
        reports[split].update(dataset=args.dataset, split=split, views="x".join(map(str, args.views)),
                              frames=frames, template=template, class_names=class_names)
    if len(splits) == 1:
        return reports[splits[0]]
    out = dict(dataset=args.dataset, splits={str(s): r for s, r in reports.items()})
    for key in ("top1", "top5"):
        out[key + "_mean"], out[key + "_std"] = mean_std([r[key] for r in reports.values()])
    out["std"] = "population standard deviation over splits"
    out["confusion"] = np.sum([r["confusion"] for r in reports.values()], axis=0).tolist()
    out["class_names"] = reports[splits[0]]["class_names"]
    return out


# ----------------------------------------------------------------------------------------------
# Your own video: the whole video, and one answer per window of a long one

def load_video(path, frames, size, views=(1, 1)):
    """One file -> (V, T, 3, S, S), decoded and cropped exactly as the test set is."""
    item = data.VideoDataset([(path, 0)], frames, train=False, size=size, views=views)[0]
    video = item["video"]
    return video[None] if video.dim() == 4 else video


def frame_rate(path):
    """Frames per second from the container's header (a file that is not a video fails first)."""
    data.count_frames(path)
    with av.open(path) as container:
        rate = container.streams.video[0].average_rate
    if not rate:
        raise data.VideoError(f"{path}: no frame rate in its header, which --window needs")
    return float(rate)


def load_windows(path, seconds, frames, size, spatial_views=1):
    """A long video cut into windows of `seconds` (the last one may be shorter), T frames from the
    segment centres of each, all decoded in one pass: [(start s, end s, (V_s, T, 3, S, S))]."""
    fps, bounds = frame_rate(path), []

    def choose(num_frames):
        step = max(1, round(seconds * fps))
        bounds.extend((a, min(a + step, num_frames)) for a in range(0, num_frames, step))
        return [a + i for a, b in bounds for i in data.segment_indices(b - a, frames, 0.5)]
    clip = torch.from_numpy(data.read_frames(path, choose))             # (W·T, H, W, 3)
    return [(a / fps, b / fps, data.eval_transform(clip[w * frames:(w + 1) * frames], size, spatial_views))
            for w, (a, b) in enumerate(bounds)]


@torch.no_grad()
def predict(model, video, class_names, template, device, features=None):
    """Ranked [(class name, probability)] for one (V, T, 3, S, S) video."""
    if features is None:
        features = text_features(model, class_names, template, device)
    probs = view_probabilities(model, video[None].to(device), features)[0]   # (C,)
    if not torch.isfinite(probs).all():
        raise NonFiniteScores("the model's class scores for the video are NaN or inf: its "
                              "weights overflow the forward. Evaluate an earlier checkpoint")
    order = probs.argsort(descending=True).tolist()
    return [(class_names[i], float(probs[i])) for i in order]


def run_video(model, args, classes, frames, template, device):
    """--video: the ranked classes of the whole video; with --window, first one line per window."""
    size, report = input_size(model), dict(video=args.video, views="x".join(map(str, args.views)))
    features = text_features(model, classes, template, device)
    if args.window:
        print(f"windows of {args.window:g} s: start-end, top class, its probability")
        report["windows"] = []
        for start, end, views in load_windows(args.video, args.window, frames, size, args.views[1]):
            name, prob = predict(model, views, classes, template, device, features)[0]
            report["windows"].append(dict(start_s=round(start, 3), end_s=round(end, 3), top=name,
                                          probability=prob))
            print(f"{start:8.1f}-{end:6.1f} s  {prob:.6f}  {name}")
        print(f"whole video ({frames} frames over its length, {report['views']} views):")
    ranked = predict(model, load_video(args.video, frames, size, args.views), classes, template,
                     device, features)
    for i, (name, prob) in enumerate(ranked, 1):
        print(f"{i:4d}  {prob:.6f}  {name}")
    report["ranking"] = ranked
    return report


# ----------------------------------------------------------------------------------------------
# Pictures (Pillow only): Figure 4's attention maps, the confusion matrix, training curves

FONT = ImageFont.load_default(size=14)    # Pillow's own font: no font file to find
INK, PAPER = (0, 0, 0), (255, 255, 255)
MIN_TILE = 160                            # attention tiles are upscaled to at least this many pixels
LABEL_WIDTH, TITLE_HEIGHT, BAR_WIDTH = 96, 30, 70


def heat_colors(a):
    """A jet-like colour map in plain numpy: [0, 1] -> uint8 RGB, dark blue (0) to dark red (1)."""
    rgb = [np.clip(1.5 - np.abs(4 * a - c), 0, 1) for c in (3, 2, 1)]
    return (np.stack(rgb, axis=-1) * 255).astype(np.uint8)


def scale_bar(draw, x, top, bottom, colors, high, low):
    """A vertical colour scale, `colors(1)` at the top to `colors(0)` at the bottom, labelled."""
    for y in range(top, bottom):
        draw.line([(x, y), (x + 15, y)], fill=tuple(int(v) for v in colors((bottom - 1 - y) / (bottom - 1 - top))))
    draw.text((x + 19, top), high, fill=INK, font=FONT)
    draw.text((x + 19, bottom - 16), low, fill=INK, font=FONT)


def save_image(image, path):
    """A PNG, atomically: data.write_file (a full disk is one line; the old picture stays)."""
    data.write_file(path, lambda f: image.save(f, format="PNG"))


def last_layer_cls_attention(clip, forward, num_patches):
    """Class-token attention over the patches in the last ViT block, averaged over heads.
    `forward()` runs any forward through `clip.visual`; a hook on the last block's ln_1 catches
    the tokens entering its attention, (B·T, N, D), N = 1 + K (+ K/4 SPG prompts after the patches).
    Softmax runs over all N tokens, as in the model; we then keep the K patch entries."""
    block = clip.visual.transformer.resblocks[-1]
    caught = []
    handle = block.ln_1.register_forward_hook(lambda module, inputs, output: caught.append(output))
    try:
        forward()
    finally:
        handle.remove()
    x = caught[-1].float()                                              # (B·T, N, D)
    D, h = x.shape[-1], block.attn.num_heads
    q, k, _ = F.linear(x, block.attn.in_proj_weight.float(),
                       block.attn.in_proj_bias.float()).chunk(3, dim=-1)  # (B·T, N, D) each
    q = q[:, :1].unflatten(-1, (h, D // h)).transpose(1, 2)             # (B·T, h, 1, D/h)
    k = k.unflatten(-1, (h, D // h)).transpose(1, 2)                    # (B·T, h, N, D/h)
    weights = (q @ k.transpose(-1, -2) * (D // h) ** -0.5).softmax(dim=-1)  # (B·T, h, 1, N)
    return weights.mean(dim=1)[:, 0, 1:1 + num_patches]                 # (B·T, K)


@torch.no_grad()
def attention_maps(model, video, title=""):
    """Figure 4 for one (T, 3, S, S) clip: rows of T tiles, labelled: the sampled frames, the last
    layer's class-token attention of plain CLIP, then of OmniCLIP, each map min-max normalised per
    frame and drawn over its frame; a title (the predicted class) and a colour scale.
    Returns (PIL image, CLIP maps, OmniCLIP maps), maps (T, g, g)."""
    model = getattr(model, "module", model)
    T, _, S, _ = video.shape
    g = model.config.grid
    video = video.to(next(model.parameters()).device)
    clip_maps = last_layer_cls_attention(model.clip, lambda: model.clip.encode_image(video), g * g)
    omni_maps = last_layer_cls_attention(model.clip, lambda: model.encode_video(video[None]), g * g)
    clip_maps, omni_maps = clip_maps.view(T, g, g).cpu(), omni_maps.view(T, g, g).cpu()  # (T, g, g)
    mean = torch.tensor(data.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(data.CLIP_STD).view(3, 1, 1)
    frames = ((video.cpu() * std + mean).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()
    tile = S * math.ceil(MIN_TILE / S)                  # an integer upscale: 64 px -> 192 px
    canvas = Image.new("RGB", (LABEL_WIDTH + T * tile + BAR_WIDTH, TITLE_HEIGHT + 3 * tile), PAPER)
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 8), title, fill=INK, font=FONT)
    for row, label in enumerate(("frames", "CLIP", "OmniCLIP")):
        draw.text((6, TITLE_HEIGHT + row * tile + tile // 2 - 8), label, fill=INK, font=FONT)
    for t in range(T):
        frame = Image.fromarray(frames[t]).resize((tile, tile), Image.BILINEAR)
        canvas.paste(frame, (LABEL_WIDTH + t * tile, TITLE_HEIGHT))
        for row, maps in ((1, clip_maps), (2, omni_maps)):
            a = maps[t] - maps[t].min()
            a = (a / a.max().clamp_min(1e-12)).numpy().astype(np.float32)   # (g, g) in [0, 1]
            up = np.asarray(Image.fromarray(a).resize((tile, tile), Image.BILINEAR))
            heat = Image.fromarray(heat_colors(np.clip(up, 0, 1)))
            canvas.paste(Image.blend(frame, heat, 0.5), (LABEL_WIDTH + t * tile, TITLE_HEIGHT + row * tile))
    scale_bar(draw, LABEL_WIDTH + T * tile + 8, TITLE_HEIGHT + tile, TITLE_HEIGHT + 3 * tile,
              heat_colors, "max", "min")
    return canvas, clip_maps, omni_maps


def confusion_colors(share):
    """White (no video of the row) to dark blue (every video of the row), linear."""
    share = np.asarray(share, dtype=np.float64)[..., None]
    return np.round(255 + share * (np.array([8, 48, 107]) - 255)).astype(np.uint8)


def confusion_image(confusion, class_names=None, title="confusion matrix"):
    """Rows: true class, columns: predicted; a cell's colour is its share of the row (that class's
    recall on the diagonal). Rows are labelled "index name" for up to 30 classes, by index beyond.
    Returns (image, (left, top, cell)): the grid's corner and cell size in pixels."""
    counts = np.asarray(confusion, dtype=np.float64)
    C = len(counts)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    cell = int(min(40, max(4, 640 // C)))
    names = [f"{i} {n}" if class_names and C <= 30 else str(i) for i, n in
             enumerate(class_names or [""] * C)]
    left, top = 12 + max(int(FONT.getlength(n)) for n in names), 70
    heading = f"{title}: rows true class, columns predicted, colour = share of the row ({int(counts.sum())} videos)"
    image = Image.new("RGB", (max(left + C * cell + BAR_WIDTH + 10, int(FONT.getlength(heading)) + 12),
                              top + C * cell + 10), PAPER)
    draw = ImageDraw.Draw(image)
    draw.text((6, 6), heading, fill=INK, font=FONT)
    draw.text((left, 28), "predicted", fill=INK, font=FONT)
    every = 1 if cell >= 16 else 10                      # label every row/column, or every tenth
    colors = confusion_colors(share)                                      # (C, C, 3)
    for i in range(C):
        if i % every == 0:
            draw.text((6, top + i * cell + cell // 2 - 8), names[i], fill=INK, font=FONT)
            draw.text((left + i * cell + 2, 48), str(i), fill=INK, font=FONT)
        for j in range(C):
            x, y = left + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=tuple(int(v) for v in colors[i, j]))
    draw.rectangle([left - 1, top - 1, left + C * cell, top + C * cell], outline=(160, 160, 160))
    scale_bar(draw, left + C * cell + 10, top, top + C * cell, confusion_colors, "100%", "0%")
    return image, (left, top, cell)


def read_log(path):
    """train.py's log.jsonl: step lines, epoch lines (they carry elapsed_s) and a test line."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise InputError(f"{path}:{number}: not a JSON line") from None
    return records


def plot_curves(log_jsonl_path, png_path):
    """Training loss and accuracy over optimizer steps from train.py's log, as a PNG: step lines
    if the log has any, else the epoch lines; the test accuracy, if logged, as a dashed line.
    Returns each panel's box and axis ranges (what a reader of the pixels needs)."""
    records = read_log(log_jsonl_path)
    steps = [r for r in records if "loss" in r and "step" in r and "elapsed_s" not in r]
    points = steps or [r for r in records if "loss" in r and "step" in r]
    if not points:
        raise InputError(f"{log_jsonl_path}: no line with a step and a loss to plot")
    test = next((r["test_top1"] for r in reversed(records) if "test_top1" in r), None)
    x = [r["step"] for r in points]
    width, height, margin = 420, 260, 56
    image = Image.new("RGB", (2 * (width + 2 * margin), height + 2 * margin), PAPER)
    draw = ImageDraw.Draw(image)
    panels = {}
    for n, (key, label, color, y_max) in enumerate((
            ("loss", "training loss", (31, 119, 180), max(r["loss"] for r in points) or 1.0),
            ("train_top1", "accuracy % (train; test dashed)", (214, 39, 40), 100.0))):
        x0, y0 = n * (width + 2 * margin) + margin, margin
        box = (x0, y0, x0 + width, y0 + height)
        x_range, y_range = (min(x), max(max(x), min(x) + 1)), (0.0, float(y_max))
        panels[key] = dict(box=box, x=x_range, y=y_range)

        def at(step, value):
            return (x0 + (step - x_range[0]) / (x_range[1] - x_range[0]) * width,
                    y0 + height - (value - y_range[0]) / (y_range[1] - y_range[0]) * height)
        draw.rectangle(box, outline=INK)
        draw.text((x0, 8), label, fill=INK, font=FONT)
        draw.text((x0 - 6, y0 + height + 6), f"step {x_range[0]}", fill=INK, font=FONT)
        draw.text((x0 + width - 70, y0 + height + 6), f"step {x_range[1]}", fill=INK, font=FONT)
        draw.text((x0 - margin + 4, y0 - 8), f"{y_range[1]:.3g}", fill=INK, font=FONT)
        draw.text((x0 - margin + 4, y0 + height - 8), "0", fill=INK, font=FONT)
        line = [at(r["step"], r[key]) for r in points if key in r]
        if len(line) > 1:
            draw.line(line, fill=color, width=3)
        elif line:                        # one logged point: a dot
            draw.ellipse([line[0][0] - 3, line[0][1] - 3, line[0][0] + 3, line[0][1] + 3], fill=color)
        if key == "train_top1" and test is not None:
            y = at(x_range[0], test)[1]
            for xs in range(x0, x0 + width, 12):
                draw.line([(xs, y), (xs + 6, y)], fill=(44, 160, 44), width=2)
    save_image(image, png_path)
    return panels


# ----------------------------------------------------------------------------------------------
# The benchmark: parameters, multiply-adds, throughput and memory, OmniCLIP beside its baseline.

# Dense bf16 peak FLOP/s for MFU, matched in order against torch.cuda.get_device_name().
GPU_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                 ("A100", 312e12)]
BASELINE_TRAINING = ("baseline training step = ViFi-CLIP's full fine-tuning of CLIP's image tower "
                     "(text features cached; ViFi-CLIP also tunes the text tower, so its real step costs more)")


def benchmark_models(args, device, which=("omniclip", "baseline")):
    """Random weights (no download). OmniCLIP is the variant the model options build; the baseline
    is FrameAverageCLIP on its own copy of the same random CLIP (same seed), whose image tower
    trains. Each entry: (model, trainable parameters)."""
    config = oc.OmniCLIPConfig(**oc.ARCHITECTURES[args.model], frames=args.frames,
                               gradient_checkpointing=args.grad_checkpointing, **model_options(args))
    models = {}
    if "omniclip" in which:
        torch.manual_seed(0)
        omni = oc.OmniCLIP(config).to(device)
        models["omniclip"] = (omni, [p for p in omni.parameters() if p.requires_grad])
    if "baseline" in which:
        torch.manual_seed(0)          # OmniCLIP builds its CLIP first: the same weights
        tuned = oc.CLIP(config).to(device).requires_grad_(False)
        tuned.visual.requires_grad_(True)
        models["baseline"] = (oc.FrameAverageCLIP(tuned), list(tuned.visual.parameters()))
    return config, models


def benchmark_inputs(args, config, device):
    g = torch.Generator().manual_seed(0)
    S, C = config.image_resolution, args.num_classes
    videos = torch.randn(args.batch_size, args.frames, 3, S, S, generator=g).to(device)  # (B, T, 3, S, S)
    targets = torch.randint(C, (args.batch_size,), generator=g).to(device)
    return videos, targets, torch.randn(C, config.embed_dim, generator=g).to(device)    # (C, E)


def benchmark_steps(model, params, videos, targets, class_features, args, compile=None):
    """An inference forward and a training step (forward, Eq. 9 loss, backward, AdamW)."""
    run = torch.compile(model) if (args.compile if compile is None else compile) else model
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    amp = lambda: (torch.autocast(videos.device.type, dtype=torch.bfloat16) if args.bf16
                   else contextlib.nullcontext())

    def infer():
        model.eval()
        with torch.no_grad(), amp():
            run(videos, class_features)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with amp():
            loss = oc.video_loss(run(videos, class_features), targets)
        loss.backward()
        optimizer.step()
    return infer, train


def first_adapter(model):
    """The temporal adapter module of the first adapted block, or None: the analytic count names
    its part after the adapter's class, so a fork's benchmark names its own adapter."""
    name = model.adapter_name()
    return None if name is None else next(m for m in model.modules() if type(m).__name__ == name)


def view_macs(model, class_features):
    """Multiply-adds per view (one clip of T frames) of OmniCLIP and of the frame-average CLIP
    baseline on the same CLIP: counted on the real forward, and from omniclip's analytic formula."""
    config, C = model.config, class_features.shape[0]
    S = config.image_resolution
    view = torch.randn(1, config.frames, 3, S, S, device=class_features.device)  # (1, T, 3, S, S)
    was_training = model.training
    counted = oc.count_macs(model.eval(), view, class_features)
    baseline = oc.count_macs(oc.FrameAverageCLIP(model.clip), view, class_features)
    model.train(was_training)
    analytic = oc.analytic_macs(config, C, adapter=first_adapter(model))
    return dict(macs_per_view=counted, analytic_macs_per_view=analytic["total"], analytic_macs=analytic,
                macs_gap_vs_analytic=counted / analytic["total"] - 1, baseline_macs_per_view=baseline,
                analytic_baseline_macs_per_view=oc.analytic_baseline_macs(config, C),
                macs_ratio=counted / baseline)


def count_train_macs(train_step):
    """Multiply-adds of one training step (forward + backward), counted like oc.count_macs. The
    CPU's fused attention kernels have no formula in torch's table: we give them the standard ones."""
    from torch.utils import flop_counter as fc
    extra = {}
    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in fc.flop_registry:
        extra[forward] = lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v)
    if backward is not None and backward not in fc.flop_registry:
        extra[backward] = lambda grad, q, k, v, *args, out_shape=None, **kwargs: (
            fc.sdpa_backward_flop_count(grad, q, k, v))
    with fc.FlopCounterMode(display=False, custom_mapping=extra) as counter:
        train_step()
    return counter.get_total_flops() // 2


def rss_bytes(field="VmRSS"):
    """This process's resident set size now (VmRSS) or its peak (VmHWM), from Linux's /proc.
    (getrusage's ru_maxrss would not do: after fork + exec it starts at the parent's peak.)"""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024                                  # "VmHWM:  1234 kB"


def reset_peak_rss():
    """Set the peak RSS back to the current RSS (Linux: proc(5), /proc/pid/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_probe(args):
    """Run in a fresh process per model (`--memory-probe`), so one model's peak is not the other's.
    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): peak RSS minus the RSS before the model
    was built. Both include weights, activations, gradients and AdamW state."""
    device = torch.device(args.device)
    if device.type == "cpu":
        reset_peak_rss()          # forget the peak of importing torch
    start = rss_bytes() if device.type == "cpu" else 0
    config, models = benchmark_models(args, device, which=(args.memory_probe,))
    model, params = models[args.memory_probe]
    infer, train = benchmark_steps(model, params, *benchmark_inputs(args, config, device), args)

    def peak(step, times):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        for _ in range(times):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return rss_bytes("VmHWM") - start
    infer_peak = peak(infer, 1)
    train_peak = peak(train, 2)   # the second step holds AdamW's state during forward and backward
    print(json.dumps(dict(infer=infer_peak, train=train_peak)))


def measure_memory(args, which):
    """The peak memory of one model, in a fresh process given this run's own flags."""
    command = [sys.executable, os.path.abspath(__file__), *args.argv, "--memory-probe", which]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory probe for {which} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_steps(steps, warmup, repeats, device):
    """Seconds per call of each step, every repeat: wall clock, and this process's CPU time (on a
    shared CPU other jobs stretch the wall clock, hardly the CPU time). Repeats interleave the
    steps, so a noisy machine's drift hits OmniCLIP and the baseline alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def benchmark(args):
    device = torch.device(args.device)
    config, models = benchmark_models(args, device)
    (omni, omni_params), (base, base_params) = models["omniclip"], models["baseline"]
    videos, targets, class_features = benchmark_inputs(args, config, device)
    B, C = args.batch_size, args.num_classes

    params, clip_params = oc.count_parameters(omni), oc.count_parameters(omni.clip)["total"]
    macs = view_macs(omni, class_features)

    omni_infer, omni_train = benchmark_steps(omni, omni_params, videos, targets, class_features, args)
    base_infer, base_train = benchmark_steps(base, base_params, videos, targets, class_features, args)
    # counted on eager steps: the flop counter sees through no compiled graph
    eager = [benchmark_steps(m, p, videos, targets, class_features, args, compile=False)[1]
             for m, p in ((omni, omni_params), (base, base_params))]
    train_macs, baseline_train_macs = (count_train_macs(step) // B for step in eager)
    # inference first, then training: a training step's memory churn does not bleed into forwards
    wall, cpu = time_steps(dict(omni_infer=omni_infer, base_infer=base_infer), args.warmup,
                           args.repeats, device)
    more = time_steps(dict(omni_train=omni_train, base_train=base_train), args.warmup,
                      args.repeats, device)
    wall.update(more[0])
    cpu.update(more[1])
    seconds = {name: statistics.median(t) for name, t in wall.items()}   # median of the repeats
    memory = {which: measure_memory(args, which) for which in ("omniclip", "baseline")}

    report = dict(
        device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu", torch=torch.__version__, model=args.model, frames=args.frames, batch_size=B,
        num_classes=C, options=model_options(args), adapter=omni.adapter_name(),
        dtype="bf16 autocast" if args.bf16 else "fp32", compile=args.compile,
        grad_checkpointing=args.grad_checkpointing, warmup=args.warmup, repeats=args.repeats,
        params_total=params["total"], params_trainable=params["trainable"], params_clip=clip_params,
        trainable_percent_of_clip=100.0 * params["trainable"] / clip_params,
        **macs,
        train_macs_per_clip=train_macs, baseline_train_macs_per_clip=baseline_train_macs,
        infer_clips_per_s=B / seconds["omni_infer"], baseline_infer_clips_per_s=B / seconds["base_infer"],
        infer_time_ratio=seconds["omni_infer"] / seconds["base_infer"],
        train_clips_per_s=B / seconds["omni_train"], baseline_train_clips_per_s=B / seconds["base_train"],
        train_time_ratio=seconds["omni_train"] / seconds["base_train"],
        seconds_per_step=wall, cpu_seconds_per_step=cpu,
        peak_memory_bytes=memory["omniclip"]["train"],
        baseline_peak_memory_bytes=memory["baseline"]["train"],
        infer_peak_memory_bytes=memory["omniclip"]["infer"],
        baseline_infer_peak_memory_bytes=memory["baseline"]["infer"],
        memory_kind=("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                     "CPU peak RSS of a fresh process per model, minus its RSS before the model was built"),
        baseline_training=BASELINE_TRAINING)
    if device.type == "cpu":
        cpu_median = {name: statistics.median(t) for name, t in cpu.items()}
        report.update(infer_cpu_time_ratio=cpu_median["omni_infer"] / cpu_median["base_infer"],
                      train_cpu_time_ratio=cpu_median["omni_train"] / cpu_median["base_train"])
    if device.type == "cuda":   # model FLOP utilisation against the GPU's dense bf16 peak
        peak = next((p for key, p in GPU_PEAK_BF16 if key in report["device_name"]), None)
        if peak:
            report.update(peak_bf16_flops=peak,
                          mfu_infer=2 * macs["macs_per_view"] * report["infer_clips_per_s"] / peak,
                          mfu_train=2 * train_macs * report["train_clips_per_s"] / peak)
    print_benchmark(report)
    return report


def print_benchmark(r):
    G, M, GiB = 1e9, 1e6, 2 ** 30
    print(f"OmniCLIP benchmark: {r['model']}, T={r['frames']}, batch {r['batch_size']}, "
          f"{r['num_classes']} classes, {r['device_name']}, torch {r['torch']}, {r['dtype']}"
          f"{', compiled' if r['compile'] else ''}{', grad checkpointing' if r['grad_checkpointing'] else ''}")
    print(f"variant: {', '.join(f'{k}={v}' for k, v in r['options'].items()) or 'the paper default'}"
          f" (temporal adapter {r['adapter']}); baseline: CLIP averaging frame features")
    print(f"parameters: total {r['params_total'] / M:.2f}M, trainable {r['params_trainable'] / M:.2f}M "
          f"({r['trainable_percent_of_clip']:.2f}% of CLIP's {r['params_clip'] / M:.2f}M)")
    print("multiply-adds per view (torch.utils.flop_counter FLOPs / 2, text tower excluded):")
    print(f"  OmniCLIP counted {r['macs_per_view'] / G:.2f} G, analytic {r['analytic_macs_per_view'] / G:.2f} G "
          f"(gap {100 * r['macs_gap_vs_analytic']:+.2f}%)")
    print(f"  baseline (frame-average CLIP) counted {r['baseline_macs_per_view'] / G:.2f} G, analytic "
          f"{r['analytic_baseline_macs_per_view'] / G:.2f} G; OmniCLIP / baseline {r['macs_ratio']:.3f}x")
    print("  analytic breakdown: " + ", ".join(f"{k} {v / G:.3f} G" for k, v in r["analytic_macs"].items()
                                               if k != "total"))
    print(f"  training step (fwd + bwd) per clip: OmniCLIP {r['train_macs_per_clip'] / G:.2f} G, "
          f"baseline {r['baseline_train_macs_per_clip'] / G:.2f} G")
    print(f"{'':28s}{'OmniCLIP':>12s}{'baseline':>12s}{'time ratio':>12s}")
    print(f"{'inference clips/s':28s}{r['infer_clips_per_s']:12.3f}{r['baseline_infer_clips_per_s']:12.3f}"
          f"{r['infer_time_ratio']:11.3f}x")
    print(f"{'training step clips/s':28s}{r['train_clips_per_s']:12.3f}{r['baseline_train_clips_per_s']:12.3f}"
          f"{r['train_time_ratio']:11.3f}x")
    print(f"{'peak memory, inference GiB':28s}{r['infer_peak_memory_bytes'] / GiB:12.3f}"
          f"{r['baseline_infer_peak_memory_bytes'] / GiB:12.3f}")
    print(f"{'peak memory, training GiB':28s}{r['peak_memory_bytes'] / GiB:12.3f}"
          f"{r['baseline_peak_memory_bytes'] / GiB:12.3f}")
    if "infer_cpu_time_ratio" in r:
        print(f"{'CPU-time ratio (this process)':28s}{'':24s}{r['infer_cpu_time_ratio']:11.3f}x inference, "
              f"{r['train_cpu_time_ratio']:.3f}x training")
    print(f"timing: median of {r['repeats']} interleaved repeats after {r['warmup']} warm-up calls")
    print(f"memory: {r['memory_kind']}")
    print(r["baseline_training"])
    if "mfu_infer" in r:
        print(f"MFU vs dense bf16 peak {r['peak_bf16_flops'] / 1e12:.0f} TFLOP/s: "
              f"inference {100 * r['mfu_infer']:.1f}%, training {100 * r['mfu_train']:.1f}%")


# ----------------------------------------------------------------------------------------------
# Command line: every flag checked before any work starts, each problem one line naming the flag

# The model options (omniclip.OmniCLIPConfig fields, train.py's flags): flag -> (field, value);
# a value of None takes the flag's own value. Flags left out keep the config's (the paper's) default.
MODEL_OPTIONS = {"no_pta": ("pta", False), "pta_layers": ("pta_layers", None),
                 "temporal_ratio": ("temporal_ratio", None), "connection": ("connection", None),
                 "no_spg": ("spg", False), "spg_pooling": ("spg_pooling", None),
                 "no_spg_projector": ("spg_projector", False), "spg_per_layer": ("spg_per_layer", True),
                 "no_video_prompts": ("video_prompts", False),
                 "prompt_generator": ("prompt_generator", None)}


def model_options(args):
    """The OmniCLIPConfig fields the command line sets (benchmark, untrained OmniCLIP)."""
    return {field: getattr(args, flag) if value is None else value
            for flag, (field, value) in MODEL_OPTIONS.items() if getattr(args, flag) is not None}


def parse_views(text):
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: expected TEMPORALxSPATIAL, temporal at least 1 "
                                         "and spatial 1 or 3 (the paper: 4x3 supervised, 1x1 few-/zero-shot)")
    return int(match[1]), int(match[2])


def parse_split(text):
    if text not in ("1", "2", "3", "all"):
        raise argparse.ArgumentTypeError(f"{text!r}: one of 1, 2, 3, all")
    return text if text == "all" else int(text)


def at_least(minimum):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text):
        if not re.fullmatch(r"\s*[+-]?\d+\s*", text) or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: an integer, at least {minimum}")
        return int(text)
    return parse


def positive(text):
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: a number above 0")
    return value


def existing_file(text):
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: {'a directory' if os.path.isdir(text) else 'no such file'}")
    return text


class Parser(argparse.ArgumentParser):
    def error(self, message):     # one line, no usage block: the flag, what is wrong, what is accepted
        self.exit(2, f"error: {message} (python eval.py --help)\n")


def build_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", type=existing_file, help="a train.py checkpoint, runs/<name>/checkpoint.pt: "
      "OmniCLIP as trained (its config, classes, template and test views are the defaults here)")
    a("--model", choices=list(oc.ARCHITECTURES), help="without --checkpoint: OpenAI's CLIP by name "
      "(ViT-B/16 is the paper's), downloaded once and SHA256-checked, evaluated as plain CLIP "
      "averaging frame features; 'tiny': a random tiny CLIP, no download (tries every command "
      "offline; its answers mean nothing). With --benchmark: the architecture, random weights")
    a("--clip-weights", type=existing_file, help="a local OpenAI CLIP file, for offline machines: "
      "with --checkpoint, the file it was trained on (its SHA256 is compared with the recorded one "
      "before loading); without, the plain CLIP to evaluate")
    a("--dataset", choices=list(data.DATASETS), help="dataset layout, as its distribution ships it")
    a("--data-root", help="the dataset's folder")
    a("--split", type=parse_split, default=1, help="test split 1, 2 or 3 (HMDB51/UCF101), or 'all': "
      "splits 1-3, mean ± std (Table 6). Default 1")
    a("--zero-shot-splits", action="store_true", help="the same as --split all")
    a("--views", type=parse_views, help="TEMPORALxSPATIAL test views, softmax per view then averaged; "
      "the paper: 4x3 supervised, 1x1 few-/zero-shot (default: the checkpoint's, else 1x1)")
    a("--frames", type=at_least(1), help="T frames per view (default: the checkpoint's; else 8, "
      "the paper's supervised T)")
    a("--template", help=f"class prompt with one {{}} for the class name (default: the checkpoint's, "
      f"else the paper's {DEFAULT_TEMPLATE!r})")
    a("--batch-size", type=at_least(1), help="videos per forward (default 8; benchmark: clips, 1)")
    a("--num-workers", type=at_least(0), default=4, help="data loader processes (default 4)")
    a("--stop-on-error", action="store_true",
      help="stop at the first video that does not decode (default: skip it, count it, name it)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="cpu or cuda[:N] (default: cuda when there is one)")
    a("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    a("--json", help="write the report here (atomically); an evaluation also draws its confusion "
      "matrix beside it, NAME.confusion.png")
    a("--video", help="one video file: its classes ranked (plain CLIP with --model, OmniCLIP with "
      "--checkpoint)")
    a("--classes", help="comma-separated class names for --video (default: the checkpoint's)")
    a("--classes-file", type=existing_file, help="one class name a line, for --video")
    a("--window", type=positive, help="--video: one prediction per window of this many "
      "seconds, then the whole video's")
    a("--attention-maps", help="with --video: a PNG of Figure 4 (frames, CLIP's and OmniCLIP's "
      "last-layer class-token attention, the predicted class)")
    a("--benchmark", action="store_true", help="parameters, multiply-adds, throughput and memory of "
      "OmniCLIP (the variant the model options build) beside frame-average CLIP; random weights")
    a("--num-classes", type=at_least(1), default=400, help="benchmark classes (K400: 400)")
    a("--compile", action="store_true", help="torch.compile the model (inductor; off by default): "
      "the benchmark's steps, and a --dataset evaluation's forwards")
    a("--grad-checkpointing", action="store_true", help="benchmark OmniCLIP with "
      "gradient checkpointing (the baseline has none)")
    a("--warmup", type=at_least(0), default=2, help="benchmark warm-up calls per step (default 2)")
    a("--repeats", type=at_least(1), default=5, help="benchmark timed calls per step, median (default 5)")
    a("--memory-probe", choices=["omniclip", "baseline"], help=argparse.SUPPRESS)
    g = p.add_argument_group("model options (train.py's): the variant --benchmark builds, or the "
                             "untrained OmniCLIP of --attention-maps without a checkpoint")
    b = g.add_argument
    b("--no-pta", action="store_true", default=None, help="Table 7: without the Parallel Temporal Adapter")
    b("--pta-layers", type=int, nargs="+", help="Table 10: 0-indexed layers with a PTA (default all)")
    b("--temporal-ratio", type=positive, help="Table 8: the PTA's bottleneck ratio (1/4)")
    b("--connection", choices=oc.CONNECTIONS, help="Table 11: block-parallel (ours, Fig. 5(c)), "
      "attention-parallel (5(b)), cascade (5(a), ST-Adapter's serial 3D-conv adapter)")
    b("--no-spg", action="store_true", default=None, help="Table 7: without the Self-Prompt Generator")
    b("--spg-pooling", choices=["avg", "max"], help="Table 9: prompt pooling (avg)")
    b("--no-spg-projector", action="store_true", default=None, help="Table 9: pooled prompts, no projector")
    b("--spg-per-layer", action="store_true", default=None,
      help="prompts regenerated at every layer's input (the other reading of Sec. 3.2-3.3)")
    b("--no-video-prompts", action="store_true", default=None,
      help="without X-CLIP's video-specific text prompts")
    b("--prompt-generator", choices=oc.PROMPT_GENERATORS,
      help="video-specific prompts: ours (default) or X-CLIP's released computation")
    return p


def class_list(args, p):
    """--classes / --classes-file, checked (empty, duplicates, names that make the same prompt)."""
    if args.classes_file:
        with open(args.classes_file) as f:
            names, where = [line.strip() for line in f if line.strip()], args.classes_file
    elif args.classes is not None:
        names, where = [name.strip() for name in args.classes.split(",") if name.strip()], "--classes"
    else:
        return None
    try:
        data.check_class_names(names, where)
    except InputError as error:
        p.error(str(error))
    return names


def check_flags(args, p):
    """What argparse's types cannot see alone: combinations, files and folders."""
    if args.benchmark:
        if args.clip_weights or args.checkpoint or args.video or args.dataset:
            p.error("--benchmark builds random weights for --model: no --checkpoint, --clip-weights, "
                    "--video or --dataset")
    elif not (args.checkpoint or args.model or args.clip_weights):
        p.error("give --checkpoint (OmniCLIP), or --model / --clip-weights (plain CLIP)")
    elif args.checkpoint and (args.model or model_options(args)):
        p.error("--checkpoint brings its own CLIP and config: drop --model and the model options")
    elif bool(args.video) == bool(args.dataset):
        p.error("give either --video FILE or --dataset with --data-root")
    if args.dataset and not (args.data_root and os.path.isdir(args.data_root)):
        p.error(f"--data-root {args.data_root}: not a folder (the README's dataset table shows each layout)")
    if args.zero_shot_splits:
        args.split = "all"
    if args.split == "all" and args.dataset not in ("hmdb51", "ucf101"):
        p.error(f"--split all: only hmdb51 and ucf101 have three test splits, not {args.dataset}")
    if args.video:
        try:
            data.count_frames(args.video)        # a picture or a text file is refused here
        except data.VideoError as error:
            p.error(f"--video {error}")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            p.error("--video runs in one process, not under torchrun")
    for flag, value in (("--window", args.window), ("--attention-maps", args.attention_maps),
                        ("--classes", args.classes), ("--classes-file", args.classes_file)):
        if value is not None and not args.video:
            p.error(f"{flag} goes with --video")
    if args.attention_maps and not args.attention_maps.lower().endswith(".png"):
        p.error(f"--attention-maps {args.attention_maps}: a .png file name")
    for flag, path in (("--json", args.json), ("--attention-maps", args.attention_maps)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"{flag} {path}: its folder does not exist")
    if args.template is not None and args.template.count("{}") != 1:
        p.error(f"--template {args.template!r}: needs exactly one {{}} where the class name goes")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    if model_options(args):
        try:
            oc.OmniCLIPConfig(**oc.ARCHITECTURES[args.model or "ViT-B/16"], **model_options(args))
        except (TypeError, ValueError) as error:
            p.error(f"model options: {error}")
    args.class_names = class_list(args, p)


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else map(str, argv))
    args.autocast_dtype = torch.bfloat16 if args.bf16 else None
    if args.benchmark:
        args.model, args.frames = args.model or "ViT-B/16", args.frames or 8
        args.batch_size = args.batch_size or 1
    if not args.memory_probe:
        check_flags(args, p)
    return args


def setup_distributed(device):
    """torchrun sets RANK and WORLD_SIZE; plain `python eval.py` is one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, torch.device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def write_json(path, report):
    """JSON, atomically: data.write_file (a full disk is one line; the old file stays)."""
    data.write_file(path, lambda f: json.dump(report, f, indent=1), "w")


def confusion_path(json_path):
    return os.path.splitext(json_path)[0] + ".confusion.png"


def build(args, device):
    """The model to evaluate and what goes with it: frames, template, views, class names, and a
    line that says what it is (OmniCLIP from a checkpoint, or plain CLIP)."""
    if args.checkpoint:
        model, checkpoint = load_model(args.checkpoint, args.clip_weights, device)
        frames, saved = model.config.frames, checkpoint.get("args", {})
        if args.frames not in (None, frames):
            raise InputError(f"--frames {args.frames}: {args.checkpoint} was trained with {frames} frames")
        views = saved.get("test_views") or saved.get("views")
        args.views = args.views or (parse_views(views) if isinstance(views, str) else (1, 1))
        about = (f"OmniCLIP from {args.checkpoint} (step {checkpoint.get('step')}, CLIP "
                 f"{checkpoint['clip_weights']['name']!r} verified, adapter {model.adapter_name()})")
        return model, dict(frames=frames, about=about, short=f"OmniCLIP {args.checkpoint}",
                           classes=checkpoint.get("class_names") or None,
                           template=args.template or checkpoint.get("template") or DEFAULT_TEMPLATE)
    frames = args.frames or 8
    model, about = load_untrained(args.model, args.clip_weights, frames, model_options(args),
                                  omniclip=bool(args.attention_maps), device=device)
    args.views = args.views or (1, 1)
    short = (f"untrained OmniCLIP on {'a random tiny CLIP' if about.count('RANDOM') else 'CLIP'}"
             if args.attention_maps else about)
    return model, dict(frames=frames, about=about, short=short, classes=None,
                       template=args.template or DEFAULT_TEMPLATE)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)
    if args.benchmark:
        report = benchmark(args)
        if args.json:
            write_json(args.json, report)
        return report
    rank, world, device = setup_distributed(args.device)
    try:
        model, run = build(args, device)
        if rank == 0:
            print(f"model: {run['about']}")
        args.batch_size = args.batch_size or 8
        if args.video:
            report = video_main(model, args, run, device)
        else:
            if args.compile:  # the forward over the dataset's clips; --video keeps eager hooks
                model = torch.compile(model)
            splits = [1, 2, 3] if args.split == "all" else [args.split]
            report = evaluate_splits(model, args, run["frames"], input_size(model), run["template"],
                                     device, world > 1, splits)
            if rank == 0:
                print_report(report)
        report["model"] = run["about"]
        if rank == 0 and args.json:
            write_json(args.json, report)
            if "confusion" in report:
                image, _ = confusion_image(report["confusion"], report.get("class_names"),
                                           f"{report.get('dataset')} confusion matrix")
                save_image(image, confusion_path(args.json))
                print(f"wrote {args.json} and {confusion_path(args.json)}")
        return report
    except NonFiniteScores as error:  # one line that names the file the weights came from
        raise NonFiniteScores(f"{args.checkpoint}: {error}" if args.checkpoint
                              else str(error)) from None
    finally:
        if world > 1:
            dist.destroy_process_group()


def video_main(model, args, run, device):
    """--video: ranked classes (and windows), and/or Figure 4's attention maps."""
    classes = args.class_names or run["classes"]
    if classes is None and not args.attention_maps:
        raise InputError("--video needs --classes or --classes-file (a checkpoint brings its own)")
    report = dict(video=args.video)
    if classes:
        report = run_video(model, args, classes, run["frames"], run["template"], device)
    if args.attention_maps:
        video = load_video(args.video, run["frames"], input_size(model))[0]          # (T, 3, S, S)
        title = "no class names given: nothing predicted"
        if classes:
            name, prob = predict(model, video[None], classes, run["template"], device)[0]
            title = f"predicted: {name} ({100 * prob:.1f}%)"
        image, _, _ = attention_maps(model, video, f"{title}; {run['short']}")
        print(f"attention maps: rows frames, CLIP, OmniCLIP; {title}")  # before a write may fail
        save_image(image, args.attention_maps)
        print(f"wrote {args.attention_maps}")
    return report


def print_report(report):
    if "splits" in report:
        for split, r in report["splits"].items():
            print(f"split {split}: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}% "
                  f"({r['num_evaluated']} of {r['num_videos']} videos)")
        print(f"{report['dataset']}: top-1 {report['top1_mean']:.2f} ± {report['top1_std']:.2f}%, "
              f"top-5 {report['top5_mean']:.2f} ± {report['top5_std']:.2f}% over {len(report['splits'])} "
              "splits (population std)")
        return
    print(f"{report['dataset']} split {report['split']}, {report['views']} views x {report['frames']} frames: "
          f"top-1 {report['top1']:.2f}%, top-5 {report['top5']:.2f}%")
    print(f"videos: {report['num_videos']} listed, {report['num_evaluated']} evaluated, "
          f"{report['num_skipped']} skipped")
    for reason in report["skipped"]:
        print(f"  skipped {reason}")


if __name__ == "__main__":
    try:
        main()
    except (data.InputError, cw.WeightsError) as error:   # bad input: the message, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
