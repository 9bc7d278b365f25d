"""Train OmniCLIP (paper Sec. 4, Table 1) in one process or many.

    torchrun --nproc_per_node 2 train.py --demo    # CPU, no dataset, no weights: the whole pipeline
    python train.py --dataset hmdb51 --data-root data/hmdb51 --shots 16        # few-shot (Sec. 4.2)
    torchrun --nproc_per_node 8 train.py --dataset k400 --data-root data/k400  # DDP, 8 GPUs
    python train.py ... --out runs/NAME --resume auto                           # continue a run

Every hyper-parameter is a flag whose default comes from the preset of the paper's setting, so
`python train.py --help` reads like Table 1; a flag given explicitly wins over the preset.
As in nanoGPT's train.py, DDP is found from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK) and only rank 0 (`master_process`) prints and writes files.

Bad input (a flag, a dataset file, the CLIP weights) is refused before any folder is created, with
one line `error: ...` and exit status 2; a bug keeps its traceback. Every rank runs the same checks
and only rank 0 prints the line. Under torchrun any child that exits non-zero makes torchrun print
its own ChildFailedError report (a traceback of torchrun and one entry per rank) after our line;
no exit code or error file of the child stops that, so the line to read is the one just above it.

A run folder (`--out`, default runs/<dataset>-<setting>-split<s>-<date>-<time>) is never
overwritten: a new run into a folder that holds one is refused (or, with --fresh, its files are
moved aside), a lock file keeps a second process out, and every file is written atomically (a full
disk is one line naming the file; its previous version stays). SIGTERM or SIGINT (a scheduler's
preemption, Ctrl-C) ends the optimizer step in progress, saves it and exits with 128 + the signal
(143 for SIGTERM); a loss that is no longer finite stops the run before the update, saving nothing.

Reproducibility, which makes `--resume` exact: the order of an epoch is a function of
(seed, epoch), the augmentation of a clip of (seed, epoch, index), the mixup/cutmix draw of a
micro-batch of (seed, step, micro-batch). A resumed run skips the batches it already consumed
and, on the CPU, ends with the same parameters as a run that was never interrupted.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import clip_weights
import data
import eval as evaluation
import omniclip

BAD_INPUT = (data.InputError, clip_weights.WeightsError)  # one line, exit 2; anything else is a bug
DATA_WAIT_SHARE = 0.1  # a log line says so when the step waits for data longer than this share


class Diverged(FloatingPointError):
    """The loss is no longer finite (detectron2 raises FloatingPointError at that iteration):
    the run stops with one line and status 2, and saves nothing."""


ONE_LINE = (*BAD_INPUT, Diverged)  # the stops that are one line `error: ...`, status 2

# Paper Table 1 (supervised) and Sec. 4 "Implementation Details" (few-shot, zero-shot). Where the
# paper is silent, X-CLIP's published configuration: few-shot trains 50 epochs at the supervised
# lr and weight decay, zero-shot warms up 5 epochs like the rest.
PRESETS = {
    "k400":      dict(frames=8,  batch_size=256, lr=2e-3,   min_lr=2e-5,   epochs=50,
                      weight_decay=0.003, test_views="4x3"),
    "ssv2":      dict(frames=8,  batch_size=256, lr=3.5e-3, min_lr=3.5e-5, epochs=50,
                      weight_decay=0.01,  test_views="4x3"),
    "hmdb51":    dict(frames=8,  batch_size=32,  lr=2e-3,   min_lr=2e-5,   epochs=30,
                      weight_decay=0.003, test_views="4x3"),
    "few-shot":  dict(frames=32, batch_size=8,   lr=2e-3,   min_lr=2e-5,   epochs=50,
                      weight_decay=0.003, test_views="1x1"),
    "zero-shot": dict(frames=32, batch_size=256, lr=2e-3,   min_lr=2e-5,   epochs=10,
                      weight_decay=0.003, test_views="1x1"),
}
PRESETS["ucf101"] = PRESETS["list"] = PRESETS["hmdb51"]  # a fork's own data: the small-dataset row
# Table 1, the same for every preset, and the paper's template "A video of [CLS] action" (Sec. 3).
COMMON = dict(warmup_epochs=5, label_smoothing=0.1, mixup=0.8, cutmix=1.0, cutmix_prob=0.5,
              flip=0.5, video_prompts=True, model="ViT-B/16", split=1, seed=0,
              template=evaluation.DEFAULT_TEMPLATE, save_every=1000, log_every=10)
# --demo: a generated HMDB51-layout folder and a random tiny CLIP, sized for 2 CPU cores: the
# HMDB51 row (lr, min lr, warmup, augmentation) with batch 8, T=4, more epochs of a tiny dataset.
# Its classes come in pairs a frame average cannot tell apart (chance 1/6, frame average at most
# 1/2). move_left/move_right are mirror images of each other, so the flip is off, as for SSv2.
# One thread per process and no loader workers, so the sums do not depend on the machine's cores.
# Measured top-1 (torch 2.13 CPU, av 18.1), seeds 0, 1, 2: 66.7%, 66.7%, 58.3% of the 36 test
# videos; one video is 2.8 points, and machines and versions (FFmpeg encodes the synthetic videos,
# torch's kernels sum in their own order) move a few videos either way.
DEMO = dict(dataset="hmdb51", model="tiny", frames=4, batch_size=8, epochs=150, test_views="1x1",
            save_every=100, log_every=100, workers=0, flip=0.0)
DEMO_DATA = dict(num_classes=6, videos_per_class=20, frames=16, size=(128, 96))
DEMO_ROOT = os.path.join("runs", "synthetic-hmdb51")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line naming the flag (argparse would print the whole usage first), on rank 0 only:
        every torchrun rank parses the same flags and stops with the same status."""
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = Parser(description="Train OmniCLIP with the paper's Table 1 / Sec. 4 settings as "
               "defaults (presets per dataset and setting).")
    a = p.add_argument
    # defaults of None are filled from the preset (PRESETS above), so an explicit flag wins
    a("--dataset", choices=data.DATASETS, help="dataset layout (README, Datasets); picks the preset")
    a("--data-root", help="the dataset's folder, laid out as its distribution ships it")
    a("--split", type=int, help="official split 1-3 of HMDB51/UCF101 (default 1)")
    a("--shots", type=int, help="K videos per class: the few-shot setting (Sec. 4.2, after X-CLIP): "
                                "32 frames, batch 8; shots come from --split's training list and "
                                "are tested on the same split's test list")
    a("--zero-shot", action="store_true", help="the zero-shot setting (Sec. 4.3): train on K400 "
                                               "with 32 frames for 10 epochs")
    a("--frames", type=int, help="T frames per clip. Table 1: 8 (supervised); "
                                 "Sec. 4: 32 for few-shot and zero-shot")
    a("--model", help="OpenAI CLIP: ViT-B/16 (the paper's backbone), ViT-B/32, ViT-L/14, "
                      "downloaded once and cached; or 'tiny', a random frozen CLIP for tests/demo")
    a("--clip-weights", help="a local OpenAI CLIP file (offline machines); overrides --model")
    a("--batch-size", type=int, help="GLOBAL batch over all GPUs and accumulation steps. Table 1: "
                                     "256 for K400/SSv2, 32 for HMDB51/UCF101; Sec. 4.2: 8 few-shot")
    a("--per-gpu-batch", type=int, help="clips per GPU per forward; accumulation steps = "
                                        "batch-size / (per-gpu-batch x GPUs). Default: no accumulation")
    a("--lr", type=float, help="peak learning rate. Table 1: 2e-3 for K400/HMDB51/UCF101, "
                               "3.5e-3 for SSv2")
    a("--min-lr", type=float, help="end of the cosine. Table 1: 2e-5 for K400/HMDB51/UCF101, "
                                   "3.5e-5 for SSv2")
    a("--epochs", type=int, help="Table 1: 50 for K400/SSv2, 30 for HMDB51/UCF101; "
                                 "few-shot 50 (X-CLIP); zero-shot 10 (Sec. 4.3)")
    a("--warmup-epochs", type=float, help="Table 1: 5, linear from 0, stepped per iteration")
    a("--weight-decay", type=float, help="AdamW betas (0.9, 0.98), eps 1e-8. Table 1: 0.003 for "
                                         "K400/HMDB51/UCF101, 0.01 for SSv2; no decay on biases, "
                                         "norms, the temporal embedding and the alphas")
    a("--label-smoothing", type=float, help="Table 1: 0.1")
    a("--mixup", type=float, help="Mixup's Beta(a, a). Table 1: 0.8; 0 = off")
    a("--cutmix", type=float, help="CutMix's Beta(a, a). Table 1: 1.0; 0 = off")
    a("--cutmix-prob", type=float, help="per batch, CutMix with this probability, else Mixup "
                                        "(paper is silent; X-CLIP's timm Mixup: 0.5)")
    a("--flip", type=float, help="horizontal flip probability. Table 1: 0.5; 0 for SSv2, whose "
                                 "classes say left and right (as every CLIP video work), and the demo")
    a("--test-views", help="temporal x spatial views at test. Sec. 4.1: 4x3 (supervised); "
                           "1x1 few-shot and zero-shot (X-CLIP)")
    a("--template", help="class text; the paper's 'A video of [CLS] action' (Sec. 3)")
    # the model's options (omniclip.OmniCLIPConfig)
    a("--no-pta", action="store_true", help="Table 7: without the Parallel Temporal Adapter")
    a("--pta-layers", type=int, nargs="+", help="Table 10: 0-indexed layers with a PTA (default all)")
    a("--temporal-ratio", type=float, default=0.25, help="Table 8: PTA bottleneck ratio, 1/4 best")
    a("--connection", default="block-parallel", choices=omniclip.CONNECTIONS,
      help="Table 11: block-parallel (ours, Fig. 5(c)), attention-parallel (Fig. 5(b)), cascade "
           "(Fig. 5(a): ST-Adapter's serial 3D-convolution adapter)")
    a("--no-spg", action="store_true", help="Table 7: without the Self-Prompt Generator")
    a("--spg-pooling", default="avg", choices=["avg", "max"], help="Table 9")
    a("--no-spg-projector", action="store_true", help="Table 9: pooled prompts, no projector")
    a("--spg-per-layer", action="store_true", help="Eq. 6 at every layer's input (Sec. 3.2-3.3: "
      "R^i = Projector(Avg(V^i))) instead of once from V^0 (Sec. 3.1: R^0 = SPG(V^0))")
    a("--video-prompts", action=argparse.BooleanOptionalAction,
      help="X-CLIP's video-specific text prompts (Sec. 3.1, 'following [26]'); default on, off for "
           "SSv2's fixed classifier (Sec. 4.1)")
    a("--prompt-generator", default=omniclip.OmniCLIPConfig.prompt_generator,
      choices=omniclip.PROMPT_GENERATORS, help="ours (starts as CLIP's classifier) or xclip "
                                               "(X-CLIP's released code)")
    a("--gradient-checkpointing", action="store_true", help="recompute the blocks in backward: "
                                                            "less memory, more time")
    a("--fp32", action="store_true", help="GPUs: train and test in fp32 instead of bf16 autocast "
                                          "(slower; for a loss that stops being finite)")
    # the run
    a("--out", help="run folder for checkpoint.pt, log.jsonl, config.json, report.json "
                    "(default runs/<dataset>-<setting>-split<s>-<date>-<time>)")
    a("--resume", help="a checkpoint to continue, or 'auto': --out's checkpoint.pt if there is one")
    a("--fresh", action="store_true", help="start a new run in an --out that holds one: its files "
                                           "are moved to --out/previous-<time>/, nothing deleted")
    a("--save-every", type=int, help="checkpoint every N optimizer steps (and at each epoch end)")
    a("--log-every", type=int, help="one JSON log line every N optimizer steps (10)")
    a("--seed", type=int, help="process r uses seed + r")
    a("--workers", type=int, help="data loader processes per GPU, one core each (default: the "
                                  "cores per GPU, less one for the training process; README, What "
                                  "it costs: `data.py --benchmark` says how many a GPU needs)")
    a("--clips-per-video", type=int, default=1,
      help="K clips from each decoded video, each its own sample with its own frames and "
           "augmentation (MAE-ST's repeated sampling, Feichtenhofer et al. 2022). An epoch keeps "
           "its clips and steps, so it decodes 1/K of the videos, K clips each; every K epochs deal "
           "each video once. 720p H.264: 0.70x the CPU per clip at K=2, 0.44x at K=4 (README, "
           "What it costs). Default 1, the paper's")
    a("--compile", nargs="?", const="inductor", metavar="BACKEND",
      help="torch.compile the model (default backend inductor, which needs a C++ compiler on the "
           "CPU; aot_eager compiles in seconds, for checks). Off by default")
    a("--eval-batch-size", type=int, help="videos per forward at test (default: 2 x per-gpu-batch "
                                          "/ views, as no activations are kept for backward)")
    a("--bad-videos", default="skip", choices=["skip", "stop"],
      help="a video that does not decode: skip it and count it in the log (default), or stop")
    a("--no-eval", action="store_true", help="skip the evaluation after training")
    a("--demo", action="store_true", help="generate a synthetic HMDB51-layout dataset and train "
                                          "a tiny random CLIP on it (CPU; under torchrun with 2 "
                                          "processes a few minutes on 2 cores)")
    # for the tests only: not in --help
    a("--kill-at-step", type=int, help=argparse.SUPPRESS)   # SIGKILL after N optimizer steps
    a("--wait-at-step", type=int, help=argparse.SUPPRESS)   # rank 0's step N waits for a signal
    a("--save-rank-states", action="store_true", help=argparse.SUPPRESS)  # --out/rank<r>.pt
    args = p.parse_args(argv)
    if args.demo:
        args.dataset = args.dataset or DEMO["dataset"]
    if args.dataset is None:
        p.error("--dataset is required (or --demo)")
    if args.zero_shot and args.dataset != "k400":
        p.error("--zero-shot trains on k400 (Sec. 4.3)")
    if args.shots is not None and args.shots < 1:
        p.error(f"--shots {args.shots}: videos per class, 1 or more (leave it out for the "
                "supervised setting)")
    args.setting = "zero-shot" if args.zero_shot else "few-shot" if args.shots else "supervised"
    preset = dict(COMMON, **PRESETS[args.setting if args.setting != "supervised" else args.dataset])
    if args.dataset == "ssv2":  # in every setting (supervised, few-shot)
        # SSv2's classes say left and right: no flip (as every CLIP video work trains it). Sec. 4.1:
        # "We train the video encoder with a fixed classifier following previous works [32]". [32]
        # is ILA (Tu et al., ICCV 2023), whose released SSv2 code drops the text tower for a
        # trained linear head. We read "fixed" as class features that do not change in training:
        # the frozen text tower's, with the video-specific prompts off (--video-prompts turns them
        # back on). ILA's trained linear head is a new module: a fork, not a flag.
        preset.update(flip=0.0, video_prompts=False)
    if args.demo:
        preset.update(DEMO)
        args.data_root = args.data_root or DEMO_ROOT
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    check_args(p, args)
    return args


def check_args(p, args):
    """Every flag, before any work: one line naming the flag and what it accepts."""
    for flag in ("frames", "batch_size", "per_gpu_batch", "save_every", "log_every",
                 "eval_batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} {value}: must be 1 or more")
    for flag in ("epochs", "workers", "warmup_epochs", "min_lr", "weight_decay", "mixup", "cutmix"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            p.error(f"--{flag.replace('_', '-')} {value}: must be 0 or more")
    for flag in ("flip", "cutmix_prob", "label_smoothing"):
        if not 0 <= getattr(args, flag) <= 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: a probability, 0 to 1")
    if not args.lr > 0 or args.min_lr > args.lr:
        p.error(f"--lr {args.lr} --min-lr {args.min_lr}: need 0 < lr and min-lr <= lr")
    if not 0 < args.temporal_ratio <= 1:
        p.error(f"--temporal-ratio {args.temporal_ratio}: between 0 and 1 (Table 8: 1/4)")
    splits = (1, 2, 3) if args.dataset in ("hmdb51", "ucf101") else (1,)
    if args.split not in splits:
        p.error(f"--split {args.split}: {args.dataset} has split(s) {', '.join(map(str, splits))}")
    try:
        parse_views(args.test_views)
    except ValueError as error:
        p.error(str(error))
    if args.template.count("{}") != 1:
        p.error(f"--template {args.template!r}: needs one {{}} where the class name goes")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.per_gpu_batch = args.per_gpu_batch or max(1, args.batch_size // world_size)
    if args.batch_size % (args.per_gpu_batch * world_size):
        p.error(f"--batch-size {args.batch_size} (global) is not a multiple of --per-gpu-batch "
                f"{args.per_gpu_batch} x {world_size} process(es)")
    if args.workers is None:  # the cores this process may use, shared by the GPUs of the node
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        args.workers = max(1, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)
    if args.clips_per_video < 1 or args.per_gpu_batch % args.clips_per_video:
        p.error(f"--clips-per-video {args.clips_per_video}: 1 or more, dividing --per-gpu-batch "
                f"{args.per_gpu_batch} (a micro-batch holds whole videos' clips)")
    if args.data_root is None:
        p.error("--data-root is required (or --demo): the dataset's folder, laid out as the "
                "README's dataset table shows")
    if args.clip_weights is not None and not os.path.isfile(args.clip_weights):
        p.error(f"--clip-weights {args.clip_weights}: no such file")
    if args.clip_weights is None and args.model not in ("tiny", *clip_weights.MODELS):
        p.error(f"--model {args.model}: one of tiny, {', '.join(clip_weights.MODELS)}")
    if args.resume == "auto" and args.out is None:
        p.error("--resume auto continues the run in --out: give --out runs/NAME")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        p.error(f"--resume {args.resume}: no such checkpoint (or 'auto')")


def parse_views(text):
    """'4x3' -> (4, 3): temporal views (1 or more) x spatial crops (1 or 3)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() for part in parts) or int(parts[0]) < 1 \
            or int(parts[1]) not in (1, 3):
        raise ValueError(f"--test-views {text!r}: TxS, T temporal views (1 or more) x S spatial "
                         "crops (1 or 3), e.g. 4x3 or 1x1")
    return int(parts[0]), int(parts[1])


# ------------------------------------------------------------------------------------------------
# Randomness as a function of the run's position, which is what makes a resumed run exact.

def derive_seed(*numbers):
    """A 32-bit seed from a tuple of integers, e.g. (seed, epoch, index)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])


class EpochPlan:
    """The batch sampler of the one persistent loader: this epoch's micro-batches of
    (epoch, index) keys, replaced at each epoch."""

    def __init__(self):
        self.micro_batches = []

    def __iter__(self):
        return iter(self.micro_batches)

    def __len__(self):
        return len(self.micro_batches)


class EpochSeededDataset(torch.utils.data.Dataset):
    """data.VideoDataset with each item's augmentation drawn from generators seeded by
    (seed, epoch, index), whichever worker loads it. data.py draws from the global torch, numpy and
    python generators; we seed them for the one item and restore them after."""

    def __init__(self, dataset, seed, clips_per_video=1):
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.clips_per_video = clips_per_video

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        """key: an index, or (epoch, index) from a persistent worker, whose copy of the dataset
        does not see `epoch` change. With clips_per_video K > 1, a list of K samples decoded
        at once, clip k drawn from (seed, epoch, index, k)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if self.clips_per_video > 1:
            generators = [torch.Generator().manual_seed(derive_seed(self.seed, epoch, index, k))
                          for k in range(self.clips_per_video)]
            return self.dataset.clips(index, generators)
        seed = derive_seed(self.seed, epoch, index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # CPU generator only: workers must not touch CUDA
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


def epoch_batches(num_samples, seed, epoch, global_batch, micro_batch, rank, world_size):
    """This rank's micro-batches for one epoch: a list per optimizer step of `accumulation` index
    lists. A tiny deterministic stand-in for DistributedSampler: the epoch's order is one
    permutation drawn from (seed, epoch), the same on every rank; optimizer step s takes the next
    `global_batch` indices and deals micro-batch j of it to rank j % world_size. The last partial
    global batch is dropped; a dataset smaller than one global batch is cycled."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    order = torch.randperm(num_samples, generator=generator).tolist()
    steps = max(1, num_samples // global_batch)
    order = (order * math.ceil(steps * global_batch / num_samples))[:steps * global_batch]
    micro = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    per_step = global_batch // micro_batch                    # world_size x accumulation
    return [micro[s * per_step + rank:(s + 1) * per_step:world_size] for s in range(steps)]


# ------------------------------------------------------------------------------------------------
# One optimizer step: Table 1's mixing, schedule and optimizer.

def micro_batch_rng(seed, step, micro, rank, world_size):
    """The mixup/cutmix generator of one micro-batch: its own draw, whichever rank runs it."""
    return np.random.default_rng([seed, step, micro * world_size + rank])


def mix_batch(videos, labels, num_classes, args, rng):
    """Table 1's label smoothing 0.1, Mixup 0.8, CutMix 1.0: targets smoothed first, then per batch
    CutMix with probability cutmix_prob else Mixup. One box for all frames of a clip. Each clip is
    paired with the batch reversed (timm's Mixup, batch mode): our choice, not X-CLIP's, whose
    datasets/blending.py pairs by torch.randperm. The sampler already shuffles the batch, so the
    reversal pairs clips at random without another draw, and the demo's range was measured with it.
    videos (B, T, 3, H, W), labels (B,) -> mixed videos, soft targets (B, C) whose rows sum to 1."""
    s = args.label_smoothing
    targets = torch.nn.functional.one_hot(labels, num_classes).float() * (1 - s) + s / num_classes
    use_cutmix = args.cutmix > 0 and (args.mixup <= 0 or rng.random() < args.cutmix_prob)
    if use_cutmix:
        lam = rng.beta(args.cutmix, args.cutmix)
        H, W = videos.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = rng.integers(H), rng.integers(W)
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        videos = videos.clone()
        videos[..., y1:y2, x1:x2] = videos.flip(0)[..., y1:y2, x1:x2]  # (B, T, 3, h, w), all frames
        lam = 1 - (y2 - y1) * (x2 - x1) / (H * W)  # the box is clipped at the border: its real area
    elif args.mixup > 0:
        lam = rng.beta(args.mixup, args.mixup)
        videos = lam * videos + (1 - lam) * videos.flip(0)
    else:
        return videos, targets
    return videos, lam * targets + (1 - lam) * targets.flip(0)


def learning_rate(step, total_steps, warmup_steps, lr, min_lr):
    """Table 1: linear warmup from 0 to lr, then cosine down to min lr; stepped per iteration."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model, args):
    """AdamW on the trainable tensors only (CLIP is frozen), one lr for all. Table 1's weight decay
    except on 1-D tensors (biases, norms, gamma), the alphas and the temporal embedding. Table 1
    lists no gradient clipping, and neither do we."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim < 2 or name == "temporal_embedding" or name.endswith("alpha")
            (no_decay if skip else decay).append(p)
    groups = [dict(params=decay, weight_decay=args.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    fused = any(p.is_cuda for p in decay + no_decay) or None  # one kernel for all tensors on GPUs
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8, fused=fused)


def train_micro_step(model, batch, class_features, num_classes, args, rng, accumulation, autocast):
    """One forward and backward on one micro-batch; gradients accumulate in .grad. The class
    features are the cached (C, E) text features: no text transformer runs here."""
    videos, labels, weight = batch["video"], batch["label"], batch.get("weight", 1.0)
    device = class_features.device
    videos, labels = videos.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    videos, targets = mix_batch(videos, labels, num_classes, args, rng)
    with autocast:
        logits = model(videos, class_features)                       # (B, C), Eq. (8)
    loss = omniclip.video_loss(logits, targets)                      # Eq. (9), soft targets
    (loss * weight / accumulation).backward()  # the mean over the global batch, not a sum
    correct = (logits.argmax(-1) == targets.argmax(-1)).sum() * weight
    return loss.detach() * weight, correct.detach(), int(len(labels) * weight)


# ------------------------------------------------------------------------------------------------
# The run folder: what a run writes, and the checks that keep one run from destroying another.

RUN_FILES = ("checkpoint.pt", "log.jsonl", "config.json", "report.json", "few_shot_list.txt",
             "curves.png", "report.confusion.png")
LOCK = "run.lock"
# these arguments define a run: resuming with another value would not continue the same run
RUN_ARGS = ("dataset", "data_root", "split", "shots", "zero_shot", "frames", "model", "batch_size",
            "lr", "min_lr", "epochs", "warmup_epochs", "weight_decay", "label_smoothing", "mixup",
            "cutmix", "cutmix_prob", "flip", "template", "seed", "no_pta", "pta_layers",
            "temporal_ratio", "connection", "no_spg", "spg_pooling", "no_spg_projector",
            "spg_per_layer", "video_prompts", "prompt_generator", "demo", "clips_per_video")


RESUME_KEYS = ("model", "config", "clip_weights", "args", "optimizer", "step")


def save_checkpoint(path, state):
    """Atomically (data.write_file: a reader, a killed run or a full disk leaves the previous
    checkpoint as it was), and never with a tensor that is NaN or inf."""
    name = evaluation.first_non_finite(state)
    if name:
        raise Diverged(f"{path}: not written: tensor {name} holds NaN or inf (the previous "
                       "checkpoint is left as it was)")
    data.write_file(path, lambda f: torch.save(state, f))


def read_resumable(path):
    """A checkpoint train.py can continue from; any other file is one line naming it."""
    return evaluation.read_checkpoint(path, needs=RESUME_KEYS)


def take_lock(folder):
    """Create folder/run.lock (pid, host) or refuse: one process writes into a run folder. The lock
    of a process that is gone (or of another host, which we cannot check) is taken over, saying so."""
    path = os.path.join(folder, LOCK)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                owner = dict(pid=None, host="?")
            if process_alive(owner):
                raise data.InputError(f"--out {folder} is in use by pid {owner['pid']} on "
                                      f"{owner['host']} ({path}): wait for it, or choose another "
                                      "--out") from None
            print(f"taking over the stale lock {path} of pid {owner.get('pid')} on "
                  f"{owner.get('host')}, which is no longer running")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dict(pid=os.getpid(), host=socket.gethostname()), f)
        except OSError as error:   # a full disk: no half-written lock left behind
            os.remove(path)
            raise data.WriteError(path, error.strerror or str(error)) from None
        return path


def process_alive(owner):
    if owner.get("host") != socket.gethostname() or owner.get("pid") in (None, os.getpid()):
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@dataclasses.dataclass
class RunFolder:
    """Where a run writes, resolved and checked once on rank 0 (then sent to every rank)."""
    out: str
    resume_from: str = None     # the checkpoint this run continues, checked against it
    lock: str = None            # rank 0's lock file, removed when the run ends

    def path(self, name):
        return os.path.join(self.out, name)

    def release(self):
        if self.lock and os.path.exists(self.lock):
            os.remove(self.lock)


def default_out(args):
    setting = {"supervised": "supervised", "zero-shot": "zeroshot"}.get(args.setting,
                                                                       f"{args.shots}shot")
    name = "demo" if args.demo else f"{args.dataset}-{setting}-split{args.split}"
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run(args, inputs, model=None):
    """The run folder, on rank 0: a new run gets a new (or empty) folder; --resume continues a
    checkpoint of the same run (same flags, data root, classes, few-shot list, adapter, CLIP,
    and, given the `model`, trained tensors of its names, shapes and dtypes); a folder in use by
    another process is refused. Nothing is ever deleted."""
    out = args.out or (os.path.dirname(args.resume) if args.resume not in (None, "auto")
                       else default_out(args))
    own_checkpoint = os.path.join(out, "checkpoint.pt")
    resume = args.resume
    if resume == "auto":
        resume = own_checkpoint if os.path.isfile(own_checkpoint) else None
    if resume:
        checkpoint = read_resumable(resume)
        differences = resume_differences(checkpoint, args, inputs)
        if differences:  # and the first tensor that does not fit, as a mismatch always says
            tensors = [] if model is None else evaluation.tensor_differences(
                model, checkpoint["model"])
            raise data.InputError(f"--resume {resume} is another run: it differs in "
                                  f"{'; '.join(differences)}" + (
                                      f"; its first tensor that does not fit: {tensors[0]}"
                                      if tensors else ""))
        if model is not None:
            evaluation.load_trained(model, checkpoint["model"], resume, "these flags", load=False)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise data.WriteError(out, error.strerror or str(error)) from None
    run = RunFolder(out, resume, take_lock(out))
    for name in os.listdir(out):  # a write killed mid-way (SIGKILL) left its temporary file
        stem, _, rest = name.rpartition(".tmp")[0].rpartition(".")
        if name.endswith(".tmp") and stem in RUN_FILES and len(rest) == 8:  # data.write_file's
            os.remove(run.path(name))  # we hold the lock: no other process is writing it
            print(f"removed {run.path(name)}, the temporary file of a write that was killed")
    old = [name for name in RUN_FILES if os.path.exists(run.path(name))]
    in_place = resume and os.path.realpath(resume) == os.path.realpath(own_checkpoint)
    if old and not in_place:
        if not (args.fresh or args.resume == "auto"):  # auto with nothing to resume: start anew
            run.release()
            raise data.InputError(f"--out {out} holds a run ({', '.join(old)}): continue it with "
                                  "--resume auto, choose another --out, or add --fresh to move "
                                  "its files aside")
        aside = run.path(f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.makedirs(aside)
            for name in old:
                os.replace(run.path(name), os.path.join(aside, name))
        except OSError as error:
            run.release()
            raise data.WriteError(aside, error.strerror or str(error)) from None
        print(f"{out} held a run: moved its {', '.join(old)} to {aside}")
    return run


def resume_differences(checkpoint, args, inputs):
    """What makes `checkpoint` another run than this one, one short phrase per difference."""
    saved = dict(checkpoint["args"])
    saved["data_root"] = os.path.realpath(saved.get("data_root") or "")
    now = dict(vars(args), data_root=os.path.realpath(args.data_root))
    differences = [f"--{k.replace('_', '-')} ({saved.get(k)!r} there, {now[k]!r} now)"
                   for k in RUN_ARGS if saved.get(k) != now[k]]
    for key, what in (("class_names", "class list"), ("few_shot_list", "few-shot list")):
        there, here = checkpoint.get(key), getattr(inputs, key)
        if there != here:
            there, here = there or [], here or []
            i = next((i for i, (x, y) in enumerate(zip(there, here)) if x != y),
                     min(len(there), len(here)))
            differences.append(f"{what} ({len(there)} there, {len(here)} now; first difference "
                               f"at #{i}: {there[i] if i < len(there) else None} there, "
                               f"{here[i] if i < len(here) else None} now)")
    if checkpoint.get("adapter") != inputs.adapter:
        differences.append(f"adapter ({checkpoint.get('adapter')} there, {inputs.adapter} now)")
    there, here = checkpoint.get("clip_weights", {}), inputs.clip_weights
    if there.get("sha256") != here["sha256"]:
        differences.append(f"CLIP weights ({there.get('name')} sha256 {there.get('sha256')} "
                           f"there, {here['name']} sha256 {here['sha256']} now)")
    return differences


def on_rank0(fn, ddp, rank):
    """fn() on rank 0, its result sent to every rank. Bad input found by rank 0, or a file it
    cannot write, is raised on every rank, so none waits for a rank that has stopped."""
    outcome = [None, None]
    if rank == 0:
        try:
            outcome[0] = fn()
        except ONE_LINE as error:
            outcome[1] = error
    if ddp:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


# ------------------------------------------------------------------------------------------------
# Inputs: the dataset's lists and the model, checked before the run folder exists.

def demo_dataset(root):
    """The demo's synthetic dataset: reused if `root` holds it, else generated there (printed)."""
    marker = os.path.join(root, "synthetic.json")
    recipe = json.loads(json.dumps(dict(DEMO_DATA, seed=0)))  # as read back from JSON
    if os.path.exists(root):
        with contextlib.suppress(OSError, ValueError):
            with open(marker) as f:
                if json.load(f) == recipe:
                    print(f"demo dataset: {root} (reused)")
                    return root
        raise data.InputError(f"{root} exists but is not the demo's dataset ({marker} missing or "
                              "different): move it away, or give --data-root")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(root)), prefix="synthetic-")
    except OSError as error:
        raise data.WriteError(root, error.strerror or str(error)) from None
    try:
        data.make_synthetic_dataset(tmp, **recipe)
        evaluation.write_json(os.path.join(tmp, "synthetic.json"), recipe)
        os.replace(tmp, root)   # complete or absent, never half written
    except data.WriteError as error:  # named by the temporary folder's path: name the dataset's
        raise data.WriteError(root, error.reason) from None
    except OSError as error:
        raise data.WriteError(root, error.strerror or str(error)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone once renamed; else what was written
    print(f"demo dataset: generated {root} ({DEMO_DATA['num_classes']} classes x "
          f"{DEMO_DATA['videos_per_class']} videos in HMDB51's layout)")
    return root


@dataclasses.dataclass
class Inputs:
    """What a run is trained on, checked before its folder exists (and on resume, against it)."""
    train_samples: list
    test_samples: list
    class_names: list
    few_shot_list: list = None       # [[path, label], ...] of --shots K, else None
    clip_weights: dict = None        # name, sha256 (and seed for tiny): see build_model
    adapter: str = None              # the temporal adapter's class name


def load_data(args):
    """The chosen split's lists and classes; the few-shot draw; no video in both lists."""
    train_samples, class_names = data.load_dataset(args.dataset, args.data_root, args.split, "train")
    test_samples, test_names = data.load_dataset(args.dataset, args.data_root, args.split, "test")
    data.check_class_names(class_names, f"{args.dataset} at {args.data_root}")
    if test_names != class_names:
        raise data.InputError(f"{args.dataset} at {args.data_root}: the training and test lists "
                              "name different classes")
    few_shot_list = None
    if args.shots:  # K per class from --split's training list, seeded (raises if a class has < K)
        train_samples = data.few_shot(train_samples, args.shots, args.seed, class_names)
        few_shot_list = [[path, label] for path, label in train_samples]
    shared = data.overlapping_videos(train_samples, test_samples)
    if shared:  # a stricter protocol than earlier few-shot split files (README, departures)
        raise data.InputError(f"the training and test lists share {len(shared)} video(s): "
                              f"{', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}")
    return Inputs(train_samples, test_samples, class_names, few_shot_list)


def build_model(args, weights_path):
    """OmniCLIP on OpenAI's frozen CLIP (or a random tiny one) -> (model, clip_weights record).
    A checkpoint names its weights, never locates them: an OpenAI model name, 'tiny' with its seed,
    or 'local' (a file whose SHA256 is in no table: eval.py then needs the user's --clip-weights)."""
    options = dict(frames=args.frames, pta=not args.no_pta, pta_layers=args.pta_layers,
                   temporal_ratio=args.temporal_ratio, connection=args.connection,
                   spg=not args.no_spg, spg_pooling=args.spg_pooling,
                   spg_projector=not args.no_spg_projector, spg_per_layer=args.spg_per_layer,
                   video_prompts=args.video_prompts, prompt_generator=args.prompt_generator,
                   gradient_checkpointing=args.gradient_checkpointing)
    torch.manual_seed(args.seed)  # the same adapters (and random CLIP) on every rank and on resume
    if weights_path is None:
        config = omniclip.OmniCLIPConfig(**omniclip.ARCHITECTURES["tiny"], **options)
        model = omniclip.OmniCLIP(config)
        return model, dict(name="tiny", sha256=evaluation.clip_sha256(model.clip), seed=args.seed)
    model = clip_weights.build_omniclip(clip_weights.load_state_dict(weights_path), **options)
    sha256 = clip_weights.sha256_of(weights_path)
    name = clip_weights.model_name_for_sha256(sha256) or "local"
    return model, dict(name=name, sha256=sha256)


def resolve_weights(args):
    """The CLIP file to load (downloaded once, SHA256-checked), or None for the random tiny one."""
    if args.clip_weights:
        return args.clip_weights
    return None if args.model == "tiny" else clip_weights.resolve_weights(args.model)


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)  # every flag checked on every rank: one line and exit 2 if wrong
    # DDP if torchrun started us (nanoGPT's test); NCCL on GPUs, gloo on CPUs
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available()
    if ddp:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ["LOCAL_RANK"])
        device = f"cuda:{local_rank}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, local_rank, world_size, device = 0, 0, 1, "cuda" if cuda else "cpu"
    run = None
    stop = StopSignal("stopped by {signal} before the first step: nothing to save; run the same "
                      "command again")
    try:
        if args.demo:  # one thread per process: the same float sums whatever the core count
            torch.set_num_threads(1)
            on_rank0(lambda: demo_dataset(args.data_root), ddp, rank)
        # the dataset's lists and the CLIP weights, before the run folder exists
        inputs = load_data(args)
        weights = on_rank0(lambda: resolve_weights(args), ddp, rank)  # rank 0 downloads once
        model, inputs.clip_weights = build_model(args, resolve_weights(args) if rank else weights)
        inputs.adapter = model.adapter_name()
        run = on_rank0(lambda: prepare_run(args, inputs, model), ddp, rank)
        args.out = run.out
        command = resume_command(sys.argv[1:] if argv is None else argv, args.out, world_size)
        return train(args, run, model, inputs, ddp, rank, local_rank, world_size, device, command,
                     stop)
    except Stopped as stopped:  # a signal outside the steps: its line, and the signal's status
        stop.message = None     # from here a second signal only sets the flag
        if rank == 0:
            print(stopped, flush=True)
        raise SystemExit(128 + stopped.signum) from None
    finally:
        if stop.received is None:  # once stopped, the handlers stay: a scheduler's second
            stop.restore()         # SIGTERM must not kill the exit midway (status -15, no line)
        if run is not None and rank == 0:
            run.release()
        if ddp:
            dist.destroy_process_group()


def resume_command(argv, out, world_size):
    """The command that continues this run: the same flags, --out and --resume auto."""
    kept, skip = [], False
    for word in map(str, argv):
        if skip:
            skip = False
        elif word in ("--out", "--resume"):
            skip = True
        elif not (word == "--fresh" or word.startswith(("--out=", "--resume="))):
            kept.append(word)
    launcher = (["torchrun", "--nproc_per_node", str(world_size)] if world_size > 1
                else ["python"])
    return shlex.join([*launcher, "train.py", *kept, "--out", out, "--resume", "auto"])


class Stopped(Exception):
    """A signal outside the training steps, where there is nothing a checkpoint could keep."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class StopSignal:
    """SIGTERM (a scheduler's notice before it kills a job: SLURM, Kubernetes) and SIGINT (Ctrl-C).
    Inside the training steps (`message` None) a signal is a flag the loop reads once per
    optimizer step: the step in progress finishes, the ranks agree, the checkpoint is saved, and
    the run exits with 128 + the signal's number (143 for SIGTERM), the status of a job its
    scheduler stopped. A second signal while saving only sets the flag again: the save finishes
    (and is atomic anyway). Before the first step and after the last, it stops the run at once
    (Stopped) with `message`, and the same status."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, message):
        self.received, self.message = None, message
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}

    def handle(self, signum, frame):
        self.received = self.received or signum
        if self.message is not None:
            raise Stopped(signum, self.message.format(signal=signal.Signals(signum).name))

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(args, run, model, inputs, ddp, rank, local_rank, world_size, device, command, stop):
    master_process = rank == 0  # the one process that prints and writes files
    start_time = time.time()
    cuda = device.startswith("cuda")
    # bf16 autocast on GPUs (frozen CLIP's LayerNorms and the loss run in fp32); fp32 on the CPU
    bf16 = cuda and not args.fp32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    class_names, clip_info = inputs.class_names, inputs.clip_weights
    checkpoint_path, log_path = run.path("checkpoint.pt"), run.path("log.jsonl")
    checkpoint = read_resumable(run.resume_from) if run.resume_from else None
    model.to(device)
    # seed + rank, as nanoGPT; nothing here draws from these (data and mixup derive their own
    # generators from the run's position), but a fork's dropout would
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    # the text tower is frozen: class features once, before training, never inside a step
    class_features = evaluation.text_features(model, class_names, args.template, device)  # (C, E)
    optimizer = make_optimizer(model, args)
    step, saved = 0, None  # saved: (path, step) of the last checkpoint on disk
    if checkpoint is not None:  # prepare_run checked that its tensors fit
        evaluation.load_trained(model, checkpoint["model"], run.resume_from, "these flags")
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as error:
            raise data.InputError(f"{run.resume_from}: its optimizer state does not fit these "
                                  f"flags' model ({evaluation.one_line(error)})") from None
        step = checkpoint["step"]
        saved = (run.resume_from, step)
    raw_model = model
    if ddp:  # frozen tensors have requires_grad False, so DDP neither syncs nor waits for them
        model = DDP(model, device_ids=[local_rank] if cuda else None)
    if args.compile:  # the training forward and backward; evaluation runs raw_model
        model = torch.compile(model, backend=args.compile)

    config, size = raw_model.config, raw_model.config.image_resolution
    accumulation = args.batch_size // (args.per_gpu_batch * world_size)
    dataset = EpochSeededDataset(data.VideoDataset(
        inputs.train_samples, args.frames, train=True, size=size, flip=args.flip,
        skip_errors=args.bad_videos == "skip"), args.seed, args.clips_per_video)
    # one loader for the whole run: its workers (one core, one decoder thread each) persist
    # across epochs; pinned memory and 2 micro-batches in flight per worker feed a GPU (each
    # a micro-batch in shared memory: 154 MB for 32 clips of 8 frames at 224 px)
    sampler, workers = EpochPlan(), data.loader_workers(args.workers)  # 0 under `ulimit -f`
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=data.collate, num_workers=workers,
        pin_memory=cuda, persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None, worker_init_fn=data.leave_signals_to_main,
        generator=torch.Generator().manual_seed(derive_seed(args.seed, rank)))
    steps_per_epoch = max(1, len(dataset) // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    # from the run's first file to the loop's end, SIGTERM/SIGINT save at the step's end (a
    # folder holding config.json could not start again with the same command)
    stop.message = None
    # rank 0 writes every file; on_rank0 tells every rank whether it could (a full disk stops
    # them all with one line, where the others would wait for rank 0 at the next step)
    on_rank0(lambda: evaluation.write_json(run.path("config.json"), dict(
        args=vars(args), model=dataclasses.asdict(config), adapter=inputs.adapter,
        clip_weights=clip_info, world_size=world_size, accumulation=accumulation,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=warmup_steps)),
        ddp, rank)
    if inputs.few_shot_list:  # so the run can be repeated exactly
        on_rank0(lambda: data.write_sample_list(run.path("few_shot_list.txt"),
                                                inputs.few_shot_list), ddp, rank)
    if master_process:
        counts = omniclip.count_parameters(raw_model)
        print(f"OmniCLIP {args.setting} on {args.dataset} split {args.split}: {len(class_names)} "
              f"classes, {len(inputs.train_samples)} training / {len(inputs.test_samples)} test videos")
        print(f"CLIP {clip_info['name']} (sha256 {clip_info['sha256'][:12]}), T={args.frames}, "
              f"{size}px, adapter {inputs.adapter}; trainable {counts['trainable'] / 1e6:.2f}M "
              f"of {counts['total'] / 1e6:.1f}M parameters; {device}{' bf16' if bf16 else ' fp32'}")
        print(f"global batch {args.batch_size} = {args.per_gpu_batch} per process x {world_size} "
              f"process(es) x {accumulation} accumulation step(s); {steps_per_epoch} steps/epoch x "
              f"{args.epochs} epochs = {total_steps} steps, warmup {warmup_steps}")
        print(f"run folder {run.out}" + (f", resuming {run.resume_from} at step {step}"
                                         if checkpoint is not None else ""))

    def log(record):  # every rank calls it; rank 0 prints and appends the line
        def write():
            line = json.dumps(record)
            tqdm.write(line)
            data.append_line(log_path, line)  # all of the line or, on a full disk, none
        on_rank0(write, ddp, rank)

    def save():  # every rank calls it; rank 0 writes
        nonlocal saved
        on_rank0(lambda: save_checkpoint(checkpoint_path, dict(
            model=raw_model.trainable_state_dict(), config=dataclasses.asdict(config),
            adapter=inputs.adapter, clip_weights=clip_info, class_names=class_names,
            template=args.template, args=vars(args), optimizer=optimizer.state_dict(),
            scheduler=dict(schedule="linear warmup, cosine", lr=args.lr, min_lr=args.min_lr,
                           warmup_steps=warmup_steps, total_steps=total_steps),
            step=step, epoch=step // steps_per_epoch,
            few_shot_list=inputs.few_shot_list)), ddp, rank)
        saved = (checkpoint_path, step)

    def agree(loss_sum, stop):
        """Once per optimizer step, one all-reduce of (this step's summed loss, SIGTERM, SIGINT)
        over the ranks: all see a non-finite loss on any rank, and all stop at the same step."""
        flags = torch.stack([loss_sum.to(torch.float64), loss_sum.new_tensor(
            stop.received == signal.SIGTERM, dtype=torch.float64), loss_sum.new_tensor(
            stop.received == signal.SIGINT, dtype=torch.float64)])
        if ddp:
            dist.all_reduce(flags)
        total, term, interrupt = flags.tolist()
        return total, signal.SIGTERM if term else signal.SIGINT if interrupt else None

    def reduce(totals):  # (loss x clips, correct, clips, skipped) summed over ranks
        totals = totals.clone()
        if ddp:
            dist.all_reduce(totals)
        loss_sum, correct, clips, skipped = totals.tolist()
        return dict(loss=loss_sum / max(clips, 1), train_top1=100 * correct / max(clips, 1),
                    clips=int(clips), skipped=int(skipped))

    empty = dict(video=torch.zeros(1, args.frames, 3, size, size),
                 label=torch.zeros(1, dtype=torch.long), weight=0.0)
    window = torch.zeros(4, dtype=torch.float64, device=device)  # since the last step log line
    window_time, skipped_total, lr, data_wait = time.time(), 0, 0.0, 0.0
    bars = master_process and sys.stderr.isatty()  # redirected output gets the log lines only
    for epoch in range(step // steps_per_epoch, args.epochs):
        done = step - epoch * steps_per_epoch   # steps of this epoch before a resume
        # K clips per video: the videos of K epochs are one permutation, dealt 1/K an epoch
        K = args.clips_per_video
        plan = epoch_batches(len(dataset), args.seed, epoch // K, args.batch_size // K,
                             args.per_gpu_batch // K, rank, world_size)
        plan = plan[epoch % K * steps_per_epoch:(epoch % K + 1) * steps_per_epoch][done:]
        dataset.epoch = epoch
        sampler.micro_batches = [[(epoch, i) for i in micro] for step_plan in plan
                                 for micro in step_plan]
        micro_batches = iter(loader)
        epoch_totals, epoch_time = torch.zeros_like(window), time.time()
        model.train()
        for _ in tqdm(range(done, steps_per_epoch), initial=done, total=steps_per_epoch,
                      desc=f"epoch {epoch + 1}/{args.epochs}", disable=not bars,
                      dynamic_ncols=True, leave=False):
            lr = learning_rate(step, total_steps, warmup_steps, args.lr, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(accumulation):
                waited = time.time()
                batch = next(micro_batches)
                data_wait += time.time() - waited
                for error in batch.get("errors", []):  # every rank names its own bad videos
                    tqdm.write(f"[rank {rank}] skipped {error}", file=sys.stderr)
                if len(batch["label"]) == 0:  # all failed: a zero-weight step keeps ranks in step
                    batch = dict(empty, errors=batch.get("errors", []))
                # DDP averages gradients over ranks only on the last micro-step
                last = micro == accumulation - 1
                sync = model.no_sync() if ddp and not last else contextlib.nullcontext()
                mix_rng = micro_batch_rng(args.seed, step, micro, rank, world_size)
                with sync:
                    loss, correct, clips = train_micro_step(model, batch, class_features,
                                                            len(class_names), args, mix_rng,
                                                            accumulation, autocast)
                stats = torch.stack([loss * clips, correct.to(loss), loss.new_tensor(clips),
                                     loss.new_tensor(len(batch.get("errors", [])))]).to(window)
                window += stats
                epoch_totals += stats
                step_loss = stats[0] if micro == 0 else step_loss + stats[0]
            while step + 1 == args.wait_at_step and master_process and stop.received is None:
                time.sleep(0.01)  # testing: rank 0's step is long, a signal lands in it
            loss_sum, stopped_by = agree(step_loss, stop)
            if not math.isfinite(loss_sum):  # before the update: the adapters stay finite
                last_good = (f"the last good checkpoint is {saved[0]} (step {saved[1]})"
                             if saved else "no checkpoint was saved yet")
                raise Diverged(f"step {step + 1}: the training loss is {loss_sum}, not finite; "
                               f"stopped, nothing saved: {last_good}. Try a lower --lr (now "
                               f"{args.lr:g})" + (", or --fp32 instead of bf16 autocast" if bf16
                                                  else " (this run is in fp32 already, not bf16)"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == args.kill_at_step:  # testing: die as a preempted job does, saving nothing
                os.kill(os.getpid(), signal.SIGKILL)
            if step % args.log_every == 0:
                stats, now = reduce(window), time.time()
                waiting = data_wait / (now - window_time)  # rank 0's share of the time
                log(dict(step=step, epoch=round(step / steps_per_epoch, 3), lr=lr,
                         loss=round(stats["loss"], 4), train_top1=round(stats["train_top1"], 2),
                         clips_per_s=round(stats["clips"] / (now - window_time), 2),
                         skipped=stats["skipped"], data_wait=round(waiting, 3)))
                if master_process and workers and waiting > DATA_WAIT_SHARE:
                    tqdm.write(f"the loader is the limit: {waiting:.0%} of the last "
                               f"{args.log_every} steps waited for data (--workers "
                               f"{args.workers}); see README, What it costs: data.py --benchmark "
                               "and --prepare", file=sys.stderr)
                window.zero_()
                window_time, data_wait = now, 0.0
            if step % args.save_every == 0 or step % steps_per_epoch == 0:
                save()
            if stopped_by is not None:  # every rank got here at the same step (agree)
                if saved != (checkpoint_path, step):
                    save()
                if master_process:
                    print(f"stopped by {signal.Signals(stopped_by).name} after step {step} of "
                          f"{total_steps}: saved {checkpoint_path}; continue with: {command}",
                          flush=True)
                raise SystemExit(128 + stopped_by)  # 143 for SIGTERM: "requeue me"
        stats = reduce(epoch_totals)
        skipped_total += stats["skipped"]
        log(dict(epoch=epoch + 1, step=step, lr=lr, loss=round(stats["loss"], 4),
                 train_top1=round(stats["train_top1"], 2),
                 clips_per_s=round(stats["clips"] / (time.time() - epoch_time), 2),
                 skipped=stats["skipped"], skipped_total=skipped_total,
                 elapsed_s=round(time.time() - start_time, 1)))
    train_time = time.time() - start_time
    if saved is None or saved[0] != checkpoint_path:  # e.g. --epochs 0: step 0 saved
        save()
    stop.message = (f"stopped by {{signal}} after the last step ({step}), before the evaluation "
                    f"and its report were written: {checkpoint_path} is saved; evaluate it with: "
                    f"{command}")
    if stop.received:  # it came during the final save: stop now, as it asked
        stop.handle(stop.received, None)
    if args.save_rank_states:  # testing: DDP must leave the same trainable tensors on every rank
        torch.save(raw_model.trainable_state_dict(), run.path(f"rank{rank}.pt"))
    on_rank0(lambda: os.path.exists(log_path) and evaluation.plot_curves(
        log_path, run.path("curves.png")), ddp, rank)

    report = None
    if not args.no_eval:
        temporal, spatial = parse_views(args.test_views)
        test_set = data.VideoDataset(inputs.test_samples, args.frames, train=False, size=size,
                                     views=(temporal, spatial),
                                     skip_errors=args.bad_videos == "skip")
        batch_size = args.eval_batch_size or max(1, 2 * args.per_gpu_batch // (temporal * spatial))
        report = evaluation.evaluate(raw_model, test_set, class_features, device, batch_size,
                                     distributed=ddp, num_workers=args.workers,
                                     class_names=class_names,
                                     autocast_dtype=torch.bfloat16 if bf16 else None)
        report.update(dataset=args.dataset, split=args.split, setting=args.setting,
                      views=args.test_views, chance=100 / len(class_names),
                      checkpoint=checkpoint_path, clip_weights=clip_info, train_steps=step,
                      train_time_s=round(train_time, 1))
    if master_process:  # what was computed, on stdout before any write that may fail
        print(f"\ntrained {step} steps ({args.epochs} epochs) in {train_time / 60:.1f} min; "
              f"checkpoint {checkpoint_path}")
        if report is not None:
            print(f"test {args.dataset} split {args.split}, {args.test_views} views: "
                  f"top-1 {report['top1']:.1f}%  top-5 {report['top5']:.1f}%  "
                  f"(chance {100 / len(class_names):.1f}%); {report['num_videos']} test videos "
                  f"found, {report['num_evaluated']} evaluated, {report['num_skipped']} skipped")
    if report is not None:
        def write_report():
            evaluation.write_json(run.path("report.json"), report)
            image, _ = evaluation.confusion_image(report["confusion"], class_names,
                                                  f"{args.dataset} split {args.split} confusion")
            evaluation.save_image(image, run.path("report.confusion.png"))
        on_rank0(write_report, ddp, rank)
        log(dict(test_top1=report["top1"], test_top5=report["top5"],
                 test_videos=report["num_videos"], evaluated=report["num_evaluated"],
                 skipped=report["num_skipped"]))
    if master_process:
        if report is not None:
            print(f"report {run.path('report.json')}, log {log_path}, curves "
                  f"{run.path('curves.png')}")
        if args.setting == "zero-shot":  # Table 6: HMDB51 / UCF101 test splits 1-3, mean ± std
            print(f"zero-shot transfer: python eval.py --checkpoint {checkpoint_path} "
                  "--dataset hmdb51 --data-root DIR --split all  (and ucf101)")
    return report


if __name__ == "__main__":
    try:
        main()
    except ONE_LINE as error:  # bad input, a full disk, a diverged loss: rank 0's line, status 2
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
