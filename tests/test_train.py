"""train.py: the demo learns, DDP ranks agree, resume is exact, checkpoints hold only adapters.

Everything runs on the CPU with the random tiny CLIP and a small synthetic dataset. The slow part
is one short `torchrun --nproc_per_node 2 train.py --demo` run, shared by several tests.
"""
import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import omniclip  # noqa: E402
import train  # noqa: E402

DEMO_EPOCHS = 40  # the CI short mode of the demo: `--demo --epochs 40`, about a minute


def run(command, **kwargs):
    """A subprocess in the repository root; its output is shown when it fails."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo in its CI short mode, under torchrun with 2 processes (gloo)."""
    out = tmp_path_factory.mktemp("demo")
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
         "--demo", "--epochs", str(DEMO_EPOCHS), "--out", str(out), "--save-rank-states"],
        timeout=300)
    return out


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """3 classes x 8 videos in HMDB51's layout: 18 training, 6 test videos per split."""
    root = tmp_path_factory.mktemp("data") / "hmdb"
    data.make_synthetic_dataset(str(root), num_classes=3, videos_per_class=8, frames=8,
                                size=(64, 48))
    return str(root)


def test_demo_learns_well_above_chance(demo_run):
    report = json.loads((demo_run / "report.json").read_text())
    assert report["num_evaluated"] == report["num_videos"] > 0
    assert report["top1"] > 2.5 * report["chance"], report["top1"]
    log = [json.loads(line) for line in (demo_run / "log.jsonl").read_text().splitlines()]
    epochs = [record for record in log if "elapsed_s" in record]
    assert [record["epoch"] for record in epochs] == list(range(1, DEMO_EPOCHS + 1))
    assert all({"loss", "lr", "train_top1", "clips_per_s", "skipped"} <= r.keys() for r in epochs)


def test_ddp_ranks_end_with_identical_adapters(demo_run):
    rank0 = torch.load(demo_run / "rank0.pt", weights_only=True)
    rank1 = torch.load(demo_run / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # they trained: tensors that start at zero no longer are (equal ranks are not equal inits)
    assert rank0["temporal_embedding"].abs().sum() > 0
    assert rank0["frame_aggregation.attn.out_proj.weight"].abs().sum() > 0


def test_ddp_with_gradient_accumulation_keeps_ranks_identical(small_dataset, tmp_path):
    """2 processes x 1 clip x 2 accumulation steps = the global batch of 4: DDP must skip the
    gradient all-reduce on the first micro-step (no_sync) and still agree after the second."""
    args = resume_args(small_dataset, tmp_path)
    args[args.index("--per-gpu-batch") + 1] = "1"
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "train.py", *args, "--epochs", "1", "--save-rank-states"], timeout=300)
    assert "2 accumulation step(s)" in result.stdout
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert rank0["temporal_embedding"].abs().sum() > 0


def test_checkpoint_holds_adapters_only_and_loads_weights_only(demo_run):
    path = demo_run / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert not [k for k in checkpoint["model"] if k.startswith("clip.")]
    config = omniclip.OmniCLIPConfig(**checkpoint["config"])
    assert checkpoint["model"].keys() == omniclip.OmniCLIP(config).trainable_state_dict().keys()
    for key in ("optimizer", "scheduler", "step", "epoch", "rng", "args", "class_names",
                "template", "clip_weights", "few_shot_list"):
        assert key in checkpoint, key
    assert checkpoint["clip_weights"]["name"] == "tiny" and checkpoint["clip_weights"]["sha256"]
    # eval.py rebuilds the same model from it (the random CLIP from its seed, checked by SHA256)
    model, _ = evaluation.load_model(str(path))
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(tensor, checkpoint["model"][name]), name


def resume_args(root, out):
    return ["--dataset", "hmdb51", "--data-root", root, "--model", "tiny", "--frames", "2",
            "--batch-size", "4", "--per-gpu-batch", "2", "--epochs", "2", "--warmup-epochs", "0.5",
            "--lr", "1e-2", "--save-every", "2", "--no-eval", "--workers", "0", "--out", str(out)]


def test_killed_and_resumed_run_equals_uninterrupted_run(small_dataset, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train.main(resume_args(small_dataset, whole))          # 18 videos / 4 = 4 steps x 2 epochs
    # SIGKILL after step 3: the checkpoint of step 2 (mid-epoch 1) survives, step 3 is lost
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([sys.executable, "train.py", *resume_args(small_dataset, killed),
                             "--kill-at-step", "3"], cwd=ROOT, env=env, capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 2
    train.main(resume_args(small_dataset, killed) + ["--resume", "auto"])
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    differ = {name: (a["model"][name] - b["model"][name]).abs().max().item()
              for name in a["model"] if not torch.equal(a["model"][name], b["model"][name])}
    assert not differ, differ


def test_resume_refuses_other_clip_weights(small_dataset, tmp_path):
    train.main(resume_args(small_dataset, tmp_path) + ["--epochs", "1"])
    path = tmp_path / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["clip_weights"]["sha256"] = "0" * 64
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="CLIP weights"):
        train.main(resume_args(small_dataset, tmp_path) + ["--epochs", "1", "--resume", "auto"])


def test_mixup_and_cutmix_targets_sum_to_one_and_match_the_pixels():
    B, C = 6, 10
    labels = torch.arange(B)
    videos = labels.float().view(B, 1, 1, 1, 1).expand(B, 3, 3, 16, 16).clone()  # clip b is all b
    for prob, smoothing in ((1.0, 0.0), (0.0, 0.0), (0.5, 0.1)):
        args = argparse.Namespace(label_smoothing=smoothing, mixup=0.8, cutmix=1.0, cutmix_prob=prob)
        for seed in range(20):
            mixed, targets = train.mix_batch(videos, labels, C, args, np.random.default_rng(seed))
            assert targets.shape == (B, C)
            torch.testing.assert_close(targets.sum(dim=1), torch.ones(B))
            if smoothing == 0:  # each clip's share of its target is its share of the pixels
                own = targets[labels, labels]
                if prob == 1.0:      # CutMix: one box, the same in every frame
                    share = (mixed == labels.view(B, 1, 1, 1, 1)).float().mean(dim=(1, 2, 3, 4))
                    assert (mixed[:, 0] == mixed[:, 1]).all()
                else:                # Mixup: b * lam + (B - 1 - b) * (1 - lam)
                    share = own
                    torch.testing.assert_close(mixed[:, 0, 0, 0, 0],
                                               own * labels + (1 - own) * labels.flip(0))
                torch.testing.assert_close(own, share)


def test_a_training_step_runs_no_text_transformer(monkeypatch):
    torch.manual_seed(0)
    model = omniclip.OmniCLIP(omniclip.OmniCLIPConfig(**omniclip.ARCHITECTURES["tiny"], frames=2))
    class_features = evaluation.text_features(model, ["a", "b", "c"], "a video of {} action.", "cpu")

    def forbidden(*args, **kwargs):
        raise AssertionError("the text transformer ran inside a training step")
    monkeypatch.setattr(model.clip, "encode_text", forbidden)
    monkeypatch.setattr(model.clip.transformer, "forward", forbidden)
    args = argparse.Namespace(label_smoothing=0.1, mixup=0.8, cutmix=1.0, cutmix_prob=0.5)
    batch = dict(video=torch.randn(2, 2, 3, 64, 64), label=torch.tensor([0, 2]))
    train.train_micro_step(model, batch, class_features, 3, args, np.random.default_rng(0), 1,
                           contextlib.nullcontext())
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad == (not name.startswith("clip.")), name


def test_few_shot_run_refuses_a_video_in_both_lists(small_dataset, tmp_path):
    root = tmp_path / "list"
    root.mkdir()
    names = ["move_left", "move_right", "grow"]
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    rel = [os.path.relpath(os.path.join(small_dataset, n, f"{n}_00.avi"), root) for n in names]
    (root / "train.txt").write_text("".join(f"{r} {i}\n" for i, r in enumerate(rel)))
    (root / "test.txt").write_text(f"{rel[1]} 1\n")
    with pytest.raises(ValueError, match="move_right_00.avi"):
        train.main(["--dataset", "list", "--data-root", str(root), "--shots", "1", "--model",
                    "tiny", "--out", str(tmp_path / "out")])


def test_bad_videos_are_skipped_counted_and_named(small_dataset, tmp_path):
    root = tmp_path / "list"
    root.mkdir()
    (root / "classes.txt").write_text("move left\nmove right\ngrow\n")
    (root / "bad_train.avi").write_bytes(b"")
    (root / "bad_test.avi").write_bytes(b"not a video")
    names = ["move_left", "move_right", "grow"]
    rel = {n: [os.path.relpath(os.path.join(small_dataset, n, f"{n}_{i:02d}.avi"), root)
               for i in range(3)] for n in names}
    good = [(rel[n][i], c) for c, n in enumerate(names) for i in range(2)][:5]
    (root / "train.txt").write_text("".join(f"{r} {c}\n" for r, c in good) + "bad_train.avi 0\n")
    (root / "test.txt").write_text("".join(f"{rel[n][2]} {c}\n" for c, n in enumerate(names))
                                   + "bad_test.avi 1\n")
    args = ["--dataset", "list", "--data-root", str(root), "--model", "tiny", "--frames", "2",
            "--batch-size", "2", "--per-gpu-batch", "1", "--epochs", "1", "--test-views", "1x1",
            "--workers", "0", "--out", str(tmp_path / "out")]
    report = train.main(args)    # 6 videos / 2 = 3 steps; one micro-batch is the bad video alone
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [record["skipped"] for record in log if "elapsed_s" in record] == [1]
    assert (report["num_videos"], report["num_evaluated"], report["num_skipped"]) == (4, 3, 1)
    assert "bad_test.avi" in report["skipped"][0]
    with pytest.raises(data.VideoError, match="bad_train.avi"):
        train.main(args + ["--bad-videos", "stop", "--epochs", "3"])


def test_epoch_batches_deal_each_global_batch_once_over_ranks_and_accumulation():
    n, global_batch, micro = 50, 12, 3                  # 2 ranks x 2 accumulation steps
    plans = [train.epoch_batches(n, 0, 4, global_batch, micro, rank, 2) for rank in (0, 1)]
    assert len(plans[0]) == len(plans[1]) == n // global_batch
    for step in range(n // global_batch):
        indices = [i for plan in plans for batch in plan[step] for i in batch]
        assert len(indices) == len(set(indices)) == global_batch
    assert plans[0] == train.epoch_batches(n, 0, 4, global_batch, micro, 0, 2)   # (seed, epoch)
    assert plans[0] != train.epoch_batches(n, 0, 5, global_batch, micro, 0, 2)


def test_presets_fill_what_the_command_line_leaves_out():
    args = train.parse_args(["--dataset", "ssv2"])
    assert (args.lr, args.min_lr, args.weight_decay, args.batch_size, args.epochs) == (
        3.5e-3, 3.5e-5, 0.01, 256, 50)
    assert train.parse_args(["--dataset", "ssv2", "--lr", "1e-3"]).lr == 1e-3
    few = train.parse_args(["--dataset", "hmdb51", "--shots", "16"])
    assert (few.frames, few.batch_size, few.test_views) == (32, 8, "1x1")
    zero = train.parse_args(["--dataset", "k400", "--zero-shot"])
    assert (zero.frames, zero.epochs) == (32, 10)


def test_help_reads_like_table_1():
    text = run([sys.executable, "train.py", "--help"]).stdout
    for value in ("Table 1", "2e-3 for K400/HMDB51/UCF101", "3.5e-3 for SSv2", "256", "32",
                  "0.003", "0.01", "2e-5", "3.5e-5", "(0.9, 0.98)", "Mixup", "0.8", "CutMix",
                  "1.0", "4x3"):
        assert value in " ".join(text.split()), value
