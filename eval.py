"""Evaluate, inspect and benchmark OmniCLIP: the paper's Sec. 4 numbers, Figure 4, Table 2's cost.

    python eval.py --checkpoint run/last.pt --dataset hmdb51 --data-root DIR --views 4x3 --json r.json
    torchrun --nproc_per_node 8 eval.py --checkpoint ...        # each test video counted exactly once
    python eval.py --checkpoint k400.pt --dataset ucf101 --data-root DIR --split all   # Table 6: mean ± std
    python eval.py --model ViT-B/16 --dataset hmdb51 --data-root DIR   # CLIP's zero-shot, no training
    python eval.py --checkpoint run/last.pt --video clip.mp4 --classes "punch,kick ball"
    python eval.py --checkpoint run/last.pt --video clip.mp4 --attention-maps fig4.png   # Figure 4
    python eval.py --benchmark --model ViT-B/16 --frames 8 --batch-size 1 [--device cuda --bf16]

Scores (SPEC): softmax per view, probabilities averaged over the temporal x spatial views of a video.
Accuracies are in percent, as in the paper's tables. Multiply-adds ("GFLOPs" in the paper) are per
view, text tower excluded (class features are computed once), counted by torch.utils.flop_counter.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Subset

import clip_weights as cw
import data
import omniclip as oc

DEFAULT_TEMPLATE = "a video of {} action."       # Sec. 3.1: "A video of [CLS] action"
CLIP_FIELDS = tuple(oc.ARCHITECTURES["tiny"])    # the config fields that come from CLIP's weights
RANDOM_CLIP = ("tiny", "random")                 # checkpoint "clip_weights" names with no file


# ----------------------------------------------------------------------------------------------
# Models and class features

def clip_sha256(clip):
    """A fingerprint of CLIP's tensors, for random CLIPs that have no file to hash
    (the same digest as train.py's clip_digest: names and bytes in state_dict order)."""
    h = hashlib.sha256()
    for name, tensor in clip.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_model(checkpoint_path, clip_weights=None, device="cpu"):
    """Rebuild OmniCLIP from a train.py checkpoint: config, CLIP weights (verified against the SHA256
    recorded at training time; a mismatch is an error), then the trained adapters (strict).
    `clip_weights` overrides where CLIP's file is found (an offline copy), never what it must be."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    config = oc.OmniCLIPConfig(**checkpoint["config"])
    recorded = checkpoint["clip_weights"]
    name = clip_weights or recorded["name"]
    if name in RANDOM_CLIP:
        # A random CLIP has no file: it is rebuilt from the seed train.py drew it with
        # (train.py: torch.manual_seed(seed), then OmniCLIP(config), whose CLIP is built first).
        seed = recorded.get("seed", checkpoint.get("args", {}).get("seed", 0))
        with torch.random.fork_rng(devices=[]):     # leave the caller's generator alone
            torch.manual_seed(seed)
            model = oc.OmniCLIP(config)
        sha256 = clip_sha256(model.clip)
    else:
        path = cw.resolve_weights(name)
        sha256 = cw.sha256_of(path)
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                   if f.name not in CLIP_FIELDS}
        # build_omniclip lists the adapters as starting from their init: here the checkpoint
        # overwrites them all (strictly, below), so that list would mislead
        with contextlib.redirect_stdout(io.StringIO()):
            model = cw.build_omniclip(cw.load_state_dict(path), **options)
        built = {k: getattr(model.config, k) for k in CLIP_FIELDS}
        trained = {k: getattr(config, k) for k in CLIP_FIELDS}
        if built != trained:
            raise ValueError(f"{path} is a CLIP of architecture {built}; "
                             f"{checkpoint_path} was trained on {trained}")
    if recorded.get("sha256") is None:
        print(f"warning: {checkpoint_path} records no SHA256 for its CLIP weights; not verified")
    elif sha256 != recorded["sha256"]:
        raise ValueError(f"CLIP weights {name!r} have SHA256 {sha256}, but {checkpoint_path} was "
                         f"trained on {recorded['name']!r} with SHA256 {recorded['sha256']}")
    model.load_trainable_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def load_zero_shot_clip(name_or_path, device="cpu"):
    """OpenAI's CLIP averaging its frame features: what an untrained OmniCLIP computes with SPG
    off (SPEC: identity at init), without the adapters' cost, and for any number of frames."""
    return oc.FrameAverageCLIP(cw.build_clip(cw.load_state_dict(name_or_path))).to(device).eval()


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
    tokens = cw.tokenize([template.format(name) for name in class_names]).to(device)
    return encode(tokens)


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
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=data.collate)
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


def evaluate_splits(model, args, frames, size, template, device, distributed, splits):
    """One test split per report; over several splits (zero-shot, Table 6) the mean and the
    population standard deviation of top-1 and top-5."""
    reports = {}
    for split in splits:
        samples, class_names = data.load_dataset(args.dataset, args.data_root, split, "test")
        dataset = data.VideoDataset(samples, frames, train=False, size=size, views=args.views,
                                    skip_errors=not args.stop_on_error)
        features = text_features(model, class_names, template, device)
        reports[split] = evaluate(model, dataset, features, device, args.batch_size, distributed,
                                  args.num_workers, class_names, args.autocast_dtype)
        reports[split].update(dataset=args.dataset, split=split, views="x".join(map(str, args.views)),
                              frames=frames, template=template)
    if len(splits) == 1:
        return reports[splits[0]]
    out = dict(dataset=args.dataset, splits={str(s): r for s, r in reports.items()})
    for key in ("top1", "top5"):
        values = [r[key] for r in reports.values()]
        out[key + "_mean"], out[key + "_std"] = statistics.mean(values), statistics.pstdev(values)
    out["std"] = "population standard deviation over splits"
    return out


# ----------------------------------------------------------------------------------------------
# Custom videos and attention maps (Figure 4)

def load_video(path, frames, size, views=(1, 1)):
    """One file -> (V, T, 3, S, S), decoded and cropped exactly as the test set is."""
    item = data.VideoDataset([(path, 0)], frames, train=False, size=size, views=views)[0]
    video = item["video"]
    return video[None] if video.dim() == 4 else video


@torch.no_grad()
def predict(model, video, class_names, template, device):
    """Ranked [(class name, probability)] for one (V, T, 3, S, S) video."""
    features = text_features(model, class_names, template, device)
    probs = view_probabilities(model, video[None].to(device), features)[0]   # (C,)
    order = probs.argsort(descending=True).tolist()
    return [(class_names[i], float(probs[i])) for i in order]


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


def heat_colors(a):
    """A jet-like colour map in plain numpy: (S, S) in [0, 1] -> (S, S, 3) uint8."""
    rgb = [np.clip(1.5 - np.abs(4 * a - c), 0, 1) for c in (3, 2, 1)]
    return (np.stack(rgb, axis=-1) * 255).astype(np.uint8)


@torch.no_grad()
def attention_maps(model, video):
    """Figure 4 for one (T, 3, S, S) clip: a T x 3 grid of S x S tiles, sampled frames (row 1),
    the last layer's class-token attention of plain CLIP (row 2) and of OmniCLIP (row 3), each
    map min-max normalised per frame. Returns (PIL image, CLIP maps, OmniCLIP maps), maps (T, g, g)."""
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
    canvas = Image.new("RGB", (T * S, 3 * S))
    for t in range(T):
        frame = Image.fromarray(frames[t])
        canvas.paste(frame, (t * S, 0))
        for row, maps in ((1, clip_maps), (2, omni_maps)):
            a = maps[t] - maps[t].min()
            a = (a / a.max().clamp_min(1e-12)).numpy().astype(np.float32)   # (g, g) in [0, 1]
            up = np.asarray(Image.fromarray(a).resize((S, S), Image.BILINEAR))
            heat = Image.fromarray(heat_colors(np.clip(up, 0, 1)))
            canvas.paste(Image.blend(frame, heat, 0.5), (t * S, row * S))
    return canvas, clip_maps, omni_maps


# ----------------------------------------------------------------------------------------------
# The benchmark: parameters, multiply-adds, throughput and memory, OmniCLIP beside its baseline.

# Dense bf16 peak FLOP/s for MFU, matched in order against torch.cuda.get_device_name().
GPU_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                 ("A100", 312e12)]
BASELINE_TRAINING = ("baseline training step = ViFi-CLIP's full fine-tuning of CLIP's image tower "
                     "(text features cached; ViFi-CLIP also tunes the text tower, so its real step costs more)")


def benchmark_models(args, device, which=("omniclip", "baseline")):
    """Random weights (no download). The baseline is FrameAverageCLIP on its own copy of the same
    random CLIP (same seed), whose image tower trains. Each entry: (model, trainable parameters)."""
    config = oc.OmniCLIPConfig(**oc.ARCHITECTURES[args.model], frames=args.frames,
                               gradient_checkpointing=args.grad_checkpointing)
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
    analytic = oc.analytic_macs(config, C)
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
    command = [sys.executable, os.path.abspath(__file__), "--benchmark", "--memory-probe", which,
               "--model", args.model, "--frames", str(args.frames), "--batch-size",
               str(args.batch_size), "--device", args.device, "--num-classes", str(args.num_classes)]
    command += [flag for flag, on in (("--bf16", args.bf16), ("--compile", args.compile),
                                      ("--grad-checkpointing", args.grad_checkpointing)) if on]
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
        num_classes=C, dtype="bf16 autocast" if args.bf16 else "fp32", compile=args.compile,
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
# Command line

def parse_views(text):
    temporal, spatial = (int(v) for v in text.lower().split("x"))
    return temporal, spatial


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a train.py checkpoint (.pt)")
    p.add_argument("--model", help="without --checkpoint: OpenAI CLIP name (ViT-B/16) for zero-shot "
                   "frame-average CLIP; with --benchmark: an omniclip.ARCHITECTURES name, random weights")
    p.add_argument("--clip-weights", help="local CLIP file: the checkpoint's weights on an offline "
                   "machine (SHA256 still verified), or the zero-shot CLIP")
    p.add_argument("--dataset", choices=["hmdb51", "ucf101", "k400", "ssv2", "list"])
    p.add_argument("--data-root")
    p.add_argument("--split", default="1", help="1, 2, 3 or 'all' (zero-shot: mean ± std over 1-3)")
    p.add_argument("--zero-shot-splits", action="store_true", help="same as --split all (Table 6)")
    p.add_argument("--views", type=parse_views, default=None,
                   help="temporal x spatial views; paper: 4x3 supervised, 1x1 few-/zero-shot "
                        "(default: the checkpoint's, else 1x1)")
    p.add_argument("--frames", type=int, default=None, help="T (default: the checkpoint's; 8)")
    p.add_argument("--template", default=None, help=f"class prompt (default: the checkpoint's, "
                   f"else the paper's {DEFAULT_TEMPLATE!r})")
    p.add_argument("--batch-size", type=int, default=None, help="videos per batch (benchmark: clips)")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--stop-on-error", action="store_true",
                   help="stop at the first video that does not decode (default: skip, count, name it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--video", help="one video file: ranked classes, or --attention-maps")
    p.add_argument("--classes", help="comma-separated class names for --video")
    p.add_argument("--classes-file", help="one class name a line, for --video")
    p.add_argument("--attention-maps", help="PNG of Figure 4 for --video: frames, CLIP, OmniCLIP")
    p.add_argument("--benchmark", action="store_true")
    p.add_argument("--num-classes", type=int, default=400, help="benchmark classes (K400: 400)")
    p.add_argument("--compile", action="store_true", help="benchmark with torch.compile")
    p.add_argument("--grad-checkpointing", action="store_true", help="benchmark OmniCLIP with "
                   "gradient checkpointing (the baseline has none)")
    p.add_argument("--warmup", type=int, default=2, help="benchmark warm-up calls per step")
    p.add_argument("--repeats", type=int, default=5, help="benchmark timed calls per step (median)")
    p.add_argument("--memory-probe", choices=["omniclip", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.autocast_dtype = torch.bfloat16 if args.bf16 else None
    if args.benchmark:
        args.model = args.model or "ViT-B/16"
        if args.model not in oc.ARCHITECTURES:
            p.error(f"--benchmark --model: one of {list(oc.ARCHITECTURES)} (random weights)")
        args.frames = args.frames or 8
        args.batch_size = args.batch_size or 1
    elif not (args.checkpoint or args.model or args.clip_weights):
        p.error("give --checkpoint, or --model/--clip-weights for zero-shot CLIP")
    elif not (args.video or args.dataset):
        p.error("give --dataset and --data-root, or --video")
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


def class_list(args):
    if args.classes_file:
        with open(args.classes_file) as f:
            return [line.strip() for line in f if line.strip()]
    if args.classes:
        return [name.strip() for name in args.classes.split(",") if name.strip()]
    raise SystemExit("--video needs --classes or --classes-file")


def write_json(path, report):
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


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
        if world > 1 and (args.video or args.attention_maps):
            raise SystemExit("--video and --attention-maps run in one process, not under torchrun")
        if args.checkpoint:
            model, checkpoint = load_model(args.checkpoint, args.clip_weights, device)
            if rank == 0:
                print(f"{args.checkpoint}: step {checkpoint.get('step')}, CLIP "
                      f"{checkpoint['clip_weights']['name']!r} verified, "
                      f"{len(checkpoint['model'])} trained adapter tensors loaded")
            frames, saved = model.config.frames, checkpoint.get("args", {})
            if args.frames not in (None, frames):
                raise SystemExit(f"{args.checkpoint} was trained with {frames} frames, not {args.frames}")
            template = args.template or checkpoint.get("template") or DEFAULT_TEMPLATE
            views = saved.get("test_views") or saved.get("views")
            args.views = args.views or (parse_views(views) if isinstance(views, str) else (1, 1))
        else:
            model = load_zero_shot_clip(args.clip_weights or args.model, device)
            frames, template = args.frames or 8, args.template or DEFAULT_TEMPLATE
            args.views = args.views or (1, 1)
        size = input_size(model)
        args.batch_size = args.batch_size or 8
        report = None
        if args.video and (args.classes or args.classes_file or not args.attention_maps):
            ranked = predict(model, load_video(args.video, frames, size, args.views),
                             class_list(args), template, device)
            for i, (name, prob) in enumerate(ranked, 1):
                print(f"{i:4d}  {prob:.6f}  {name}")
            report = dict(video=args.video, views="x".join(map(str, args.views)), ranking=ranked)
        if args.attention_maps:
            if not (args.video and isinstance(model, oc.OmniCLIP)):
                raise SystemExit("--attention-maps compares CLIP with a trained OmniCLIP on one "
                                 "video: give --checkpoint and --video")
            image, _, _ = attention_maps(model, load_video(args.video, frames, size)[0])  # (T, 3, S, S)
            image.save(args.attention_maps)
            print(f"wrote {args.attention_maps}: {frames} frames x 3 rows (frames, CLIP, OmniCLIP) "
                  f"of {size}x{size} tiles")
        if not args.video:
            splits = [1, 2, 3] if args.zero_shot_splits or args.split == "all" else [int(args.split)]
            report = evaluate_splits(model, args, frames, size, template, device, world > 1, splits)
            if rank == 0:
                print_report(report)
        if rank == 0 and args.json and report is not None:
            write_json(args.json, report)
        return report
    finally:
        if world > 1:
            dist.destroy_process_group()


def print_report(report):
    if "splits" in report:
        for split, r in report["splits"].items():
            print(f"split {split}: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}% "
                  f"({r['num_evaluated']} of {r['num_videos']} videos)")
        print(f"{report['dataset']}: top-1 {report['top1_mean']:.2f} ± {report['top1_std']:.2f}%, "
              f"top-5 {report['top5_mean']:.2f} ± {report['top5_std']:.2f}% over {len(report['splits'])} splits")
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
    except (data.VideoError, FileNotFoundError) as error:  # bad input: the message, no traceback
        sys.exit(f"error: {error}")
