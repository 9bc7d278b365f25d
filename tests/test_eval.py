"""eval.py: multi-view scores, the report, DDP counting, custom videos, Figure 4, the benchmark.

All on CPU with the `tiny` architecture and small synthetic videos, except the ViT-B/16 test,
which counts one real-size forward with random weights.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clip_weights as cw
import data
import eval as ev
import omniclip as oc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 4  # frames for the tiny tests


def tiny_omniclip(seed=0, frames=T):
    """A tiny OmniCLIP with its adapters moved off their init, so it differs from plain CLIP."""
    torch.manual_seed(seed)
    model = oc.OmniCLIP(oc.OmniCLIPConfig(**oc.ARCHITECTURES["tiny"], frames=frames))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def write_checkpoint(path, model, clip_file=None, seed=0, test_views="1x1"):
    """A checkpoint in the contract's format (train.py's). Without clip_file: a random "tiny" CLIP
    named by its seed, as train.py records it; with clip_file: a CLIP weights file, by path."""
    if clip_file is None:
        clip = dict(name="tiny", sha256=ev.clip_sha256(model.clip), seed=seed)
    else:
        torch.save(model.clip.state_dict(), clip_file)
        clip = dict(name=str(clip_file), sha256=cw.sha256_of(clip_file))
    torch.save(dict(model=model.trainable_state_dict(), config=dataclasses.asdict(model.config),
                    clip_weights=clip, class_names=[], template="a video of {} action.",
                    args=dict(seed=seed, test_views=test_views), optimizer={}, scheduler={},
                    step=0, epoch=0, rng={}, few_shot_list=None), path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """An HMDB51-layout synthetic set: 4 classes, 1 test video each per split, plus one file that
    does not decode listed in split 1's test list: 5 test videos, an odd number."""
    root = tmp_path_factory.mktemp("hmdb")
    classes = data.make_synthetic_dataset(str(root), num_classes=4, videos_per_class=4, frames=12,
                                          size=(96, 72))
    (root / classes[0] / "broken.avi").write_bytes(b"not a video at all")
    with open(root / "testTrainMulti_7030_splits" / f"{classes[0]}_test_split1.txt", "a") as f:
        f.write("broken.avi 2\n")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    write_checkpoint(path, tiny_omniclip())
    return path


# ----------------------------------------------------------------------------------------------
# Multi-view scores and the report

class LogitsInPixels(torch.nn.Module):
    """A fake model whose logits are the first C pixels of the first frame of each view."""

    def forward(self, videos, class_features):          # (B·V, T, 3, S, S), (C, E)
        return videos[:, 0, 0, 0, :class_features.shape[0]]   # (B·V, C)


class FixedViews(torch.utils.data.Dataset):
    def __init__(self, view_logits, labels, broken=()):
        self.view_logits, self.labels, self.broken = view_logits, labels, broken

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if i in self.broken:
            return dict(error=f"video{i}.avi: cannot decode", index=i)
        logits = torch.tensor(self.view_logits[i], dtype=torch.float)   # (V, C)
        video = torch.zeros(len(logits), 1, 3, 8, 8)                     # (V, T, 3, S, S)
        video[:, 0, 0, 0, :logits.shape[1]] = logits
        return dict(video=video, label=self.labels[i], index=i)


def test_multiview_report_averages_softmax_over_views_and_counts_skipped():
    # 3 classes, 3 views per video. Video 0 is the case that tells the rule apart: averaging logits
    # picks class 0 (10/3 > 2), averaging per-view softmax probabilities picks class 1.
    view_logits = [[[10, 0, 0], [0, 3, 0], [0, 3, 0]],   # label 1: correct only with softmax-average
                   [[0, 0, 5], [0, 0, 5], [0, 0, 5]],     # label 2: correct
                   [[5, 0, 0], [5, 0, 0], [5, 0, 0]],     # label 1: wrong
                   [[0, 0, 0], [0, 0, 0], [0, 0, 0]],     # broken
                   [[0, 1, 2], [0, 1, 2], [0, 1, 2]]]     # label 0: wrong, ranked last
    labels = [1, 2, 1, 0, 0]
    report = ev.evaluate(LogitsInPixels(), FixedViews(view_logits, labels, broken={3}),
                         torch.zeros(3, 4), "cpu", batch_size=2, class_names=["a", "b", "c"])
    for key in ("top1", "top5", "per_class", "confusion", "num_videos", "num_evaluated",
                "num_skipped", "skipped"):
        assert key in report
    assert (report["num_videos"], report["num_evaluated"], report["num_skipped"]) == (5, 4, 1)
    assert report["skipped"] == ["video3.avi: cannot decode"]
    assert report["top1"] == 50.0          # videos 0 and 1 of 4
    assert report["top5"] == 100.0         # 3 classes: top-5 is every class
    assert report["confusion"] == [[0, 0, 1], [1, 1, 0], [0, 0, 1]]   # rows: true class
    assert [c["top1"] for c in report["per_class"]] == [0.0, 50.0, 100.0]
    # the probability reported for video 0 is the mean of the three views' softmax
    p = torch.tensor(view_logits[0], dtype=torch.float).softmax(-1).mean(0)
    index, label, prediction, probability = report["videos"][0]
    assert (index, label, prediction) == (0, 1, 1)
    assert probability == pytest.approx(float(p[1]), rel=1e-6)


def test_load_model_rebuilds_the_frozen_clip_and_rejects_other_weights(tmp_path):
    model = tiny_omniclip()
    videos = torch.randn(2, T, 3, 64, 64)
    classes = torch.randn(5, 128)
    expected = model(videos, classes)
    for clip_file in (None, tmp_path / "clip.pt"):       # a random CLIP by seed; a weights file
        write_checkpoint(tmp_path / "ck.pt", model, clip_file)
        loaded, _ = ev.load_model(tmp_path / "ck.pt")
        assert torch.allclose(loaded(videos, classes), expected, atol=1e-5)
    other = tiny_omniclip(seed=7)                         # same architecture, other weights
    torch.save(other.clip.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="SHA256"):
        ev.load_model(tmp_path / "ck.pt", clip_weights=str(tmp_path / "other.pt"))


def run_eval_cli(args, nproc=1):
    command = [sys.executable, "eval.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "eval.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(command + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_two_ranks_count_every_video_once_and_match_one_rank(videos, checkpoint, tmp_path):
    common = ["--checkpoint", checkpoint, "--dataset", "hmdb51", "--data-root", videos,
              "--views", "2x3", "--batch-size", "1", "--num-workers", "0"]
    run_eval_cli(common + ["--json", tmp_path / "one.json"])
    run_eval_cli(common + ["--json", tmp_path / "two.json"], nproc=2)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["num_videos"] == 5 and one["num_evaluated"] == 4 and one["num_skipped"] == 1
    assert "broken.avi" in one["skipped"][0]
    samples, _ = data.load_dataset("hmdb51", str(videos), 1, "test")
    good = [i for i, (path, _) in enumerate(samples) if not path.endswith("broken.avi")]
    assert [v[0] for v in two["videos"]] == good         # each good video once, in index order
    for v1, v2 in zip(one.pop("videos"), two.pop("videos")):
        assert v1[:3] == v2[:3] and v1[3] == pytest.approx(v2[3], abs=1e-5)
    assert one == two


def test_a_train_py_checkpoint_reloads_and_gives_train_py_s_own_test_report(videos, tmp_path):
    """train.py draws its random tiny CLIP from --seed and records it: eval.py must rebuild the
    very same frozen CLIP (SHA256 checked) and score the test set exactly as train.py did."""
    out = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "train.py", "--dataset", "hmdb51", "--data-root", str(videos), "--model",
         "tiny", "--frames", str(T), "--epochs", "1", "--batch-size", "4", "--workers", "0",
         "--test-views", "1x1", "--seed", "3", "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert trained.returncode == 0, trained.stderr[-3000:]
    by_train = json.loads((out / "report.json").read_text())
    by_eval = ev.main(["--checkpoint", str(out / "checkpoint.pt"), "--dataset", "hmdb51",
                       "--data-root", str(videos), "--num-workers", "0"])
    for key in ("top1", "top5", "confusion", "num_videos", "num_evaluated", "num_skipped", "skipped"):
        assert by_eval[key] == by_train[key], key
    for mine, theirs in zip(by_eval["videos"], by_train["videos"], strict=True):
        assert mine[:3] == theirs[:3] and mine[3] == pytest.approx(theirs[3], abs=1e-5)


def test_zero_shot_splits_report_mean_and_std(videos, checkpoint):
    report = ev.main(["--checkpoint", str(checkpoint), "--dataset", "hmdb51", "--data-root",
                      str(videos), "--split", "all", "--num-workers", "0"])
    assert sorted(report["splits"]) == ["1", "2", "3"]
    top1 = [report["splits"][s]["top1"] for s in ("1", "2", "3")]
    assert report["top1_mean"] == pytest.approx(np.mean(top1))
    assert report["top1_std"] == pytest.approx(np.std(top1))


# ----------------------------------------------------------------------------------------------
# Custom videos and attention maps

def test_custom_video_prints_ranked_classes_summing_to_one(videos, checkpoint, capsys):
    video = videos / "move_left" / "move_left_00.avi"
    names = ["move left", "move right", "grow", "shrink", "something else"]
    ev.main(["--checkpoint", str(checkpoint), "--video", str(video), "--classes", ",".join(names)])
    rows = re.findall(r"^\s*(\d+)\s+([0-9.]+)\s+(.+)$", capsys.readouterr().out, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    probs = [float(r[1]) for r in rows]
    assert sorted(r[2] for r in rows) == sorted(names)
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert probs == sorted(probs, reverse=True) and probs[0] > probs[-1]


def test_zero_shot_clip_weights_alone_equal_an_untrained_omniclip_without_spg(videos, tmp_path, capsys):
    """No checkpoint: CLIP's frame average, which OmniCLIP computes at init when SPG is off."""
    torch.manual_seed(0)
    clip = oc.CLIP(oc.OmniCLIPConfig(**oc.ARCHITECTURES["tiny"]))
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    video, names = videos / "grow" / "grow_00.avi", ["move left", "move right", "grow", "shrink"]
    ev.main(["--clip-weights", str(tmp_path / "clip.pt"), "--frames", str(T), "--video", str(video),
             "--classes", ",".join(names)])
    rows = re.findall(r"^\s*\d+\s+([0-9.]+)\s+(.+)$", capsys.readouterr().out, re.M)
    untrained = cw.build_omniclip(clip.state_dict(), frames=T, spg=False).eval()
    expected = ev.predict(untrained, ev.load_video(str(video), T, 64), names, ev.DEFAULT_TEMPLATE, "cpu")
    assert [name for _, name in rows] == [name for name, _ in expected]
    assert [float(p) for p, _ in rows] == pytest.approx([p for _, p in expected], abs=2e-6)


def test_attention_is_the_class_token_row_of_the_last_block():
    """Our q·k softmax from the hooked ln_1 output equals PyTorch's own attention weights."""
    model = tiny_omniclip()
    frames = torch.randn(T, 3, 64, 64)
    K = model.config.grid ** 2
    ours = ev.last_layer_cls_attention(model.clip, lambda: model.clip.encode_image(frames), K)
    block = model.clip.visual.transformer.resblocks[-1]
    caught = []
    handle = block.ln_1.register_forward_hook(lambda m, i, o: caught.append(o))
    model.clip.encode_image(frames)
    handle.remove()
    mha = torch.nn.MultiheadAttention(128, block.attn.num_heads, batch_first=True)
    mha.in_proj_weight.data, mha.in_proj_bias.data = block.attn.in_proj_weight, block.attn.in_proj_bias
    _, weights = mha(caught[0], caught[0], caught[0], average_attn_weights=True)  # (T, N, N)
    assert ours.shape == (T, K)
    assert torch.allclose(ours, weights[:, 0, 1:], atol=1e-6)


def test_attention_map_png_is_frames_by_three_rows_and_follows_the_video(videos, checkpoint, tmp_path):
    S = 64   # tiny's input size: one tile per frame; the picture is T columns x 3 rows of tiles
    first, second = videos / "move_left" / "move_left_00.avi", videos / "grow" / "grow_00.avi"
    maps = []
    for name, video in (("a", first), ("b", second)):
        ev.main(["--checkpoint", str(checkpoint), "--video", str(video),
                 "--attention-maps", str(tmp_path / f"{name}.png")])
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.format == "PNG" and image.size == (T * S, 3 * S)
            maps.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    model, _ = ev.load_model(checkpoint)
    heat = [ev.attention_maps(model, ev.load_video(str(v), T, S)[0]) for v in (first, second)]
    for _, clip_maps, omni_maps in heat:
        assert clip_maps.shape == omni_maps.shape == (T, 4, 4)
        assert not torch.allclose(clip_maps, omni_maps)        # rows 2 and 3 differ
    assert not torch.allclose(heat[0][2], heat[1][2])          # the heat follows the video
    # in the picture: the heat rows minus what the frame contributes still differ between videos
    heat_a, heat_b = (m[S:] - 0.5 * np.tile(m[:S], (2, 1, 1)) for m in maps)
    assert np.abs(heat_a - heat_b).mean() > 1.0


# ----------------------------------------------------------------------------------------------
# The benchmark

BENCHMARK_KEYS = ("device", "model", "frames", "batch_size", "params_total", "params_trainable",
                  "macs_per_view", "analytic_macs_per_view", "baseline_macs_per_view",
                  "infer_clips_per_s", "baseline_infer_clips_per_s", "train_clips_per_s",
                  "baseline_train_clips_per_s", "peak_memory_bytes")


def test_benchmark_json_has_every_field_and_counted_macs_match_analytic(tmp_path):
    path = tmp_path / "bench.json"
    ev.main(["--benchmark", "--model", "tiny", "--frames", str(T), "--device", "cpu",
             "--warmup", "0", "--repeats", "1", "--json", str(path)])
    report = json.loads(path.read_text())
    for key in BENCHMARK_KEYS:
        assert key in report, key
    assert report["model"] == "tiny" and report["frames"] == T and report["batch_size"] == 1
    assert abs(report["macs_per_view"] / report["analytic_macs_per_view"] - 1) < 0.05
    assert report["baseline_macs_per_view"] < report["macs_per_view"]
    assert report["params_trainable"] < report["params_total"]
    for key in ("infer_clips_per_s", "baseline_infer_clips_per_s", "train_clips_per_s",
                "baseline_train_clips_per_s", "peak_memory_bytes", "baseline_peak_memory_bytes"):
        assert report[key] > 0, key
    # the baseline fine-tunes the whole image tower: AdamW state for ~all of CLIP's visual weights
    assert report["baseline_train_macs_per_clip"] > 2 * report["baseline_macs_per_view"]


def test_vit_b16_counted_macs_match_analytic_within_5_percent():
    torch.manual_seed(0)
    model = oc.OmniCLIP(oc.OmniCLIPConfig(**oc.ARCHITECTURES["ViT-B/16"], frames=8))
    macs = ev.view_macs(model, torch.randn(400, 512))          # K400's 400 classes
    assert abs(macs["macs_gap_vs_analytic"]) < 0.05
    assert macs["baseline_macs_per_view"] == pytest.approx(macs["analytic_baseline_macs_per_view"], rel=0.05)
