"""eval.py: multi-view scores, the report, DDP counting, checkpoints and weights, your own video,
the pictures, the benchmark, and one clear line for every kind of bad input.

Every number is compared with an answer worked out here, by hand or by a plain loop. All on CPU
with the `tiny` architecture and small synthetic videos; no test touches the network.
"""
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import runpy
import statistics
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


def tiny_omniclip(seed=0, frames=T, **options):
    """A tiny OmniCLIP with its adapters moved off their init, so it differs from plain CLIP.
    Its CLIP is the one train.py draws for --model tiny --seed `seed`."""
    torch.manual_seed(seed)
    model = oc.OmniCLIP(oc.OmniCLIPConfig(**oc.ARCHITECTURES["tiny"], frames=frames, **options))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def write_checkpoint(path, model, clip=None, seed=0, test_views="1x1", class_names=(), **extra):
    """A checkpoint in train.py's format. Without `clip`: the random "tiny" CLIP of `seed`."""
    clip = clip or dict(name="tiny", sha256=ev.clip_sha256(model.clip), seed=seed)
    torch.save(dict(dict(model=model.trainable_state_dict(), config=dataclasses.asdict(model.config),
                         clip_weights=clip, adapter=model.adapter_name(), class_names=list(class_names),
                         template="a video of {} action", args=dict(seed=seed, test_views=test_views),
                         optimizer={}, scheduler={}, step=0, epoch=0, rng={}, few_shot_list=None),
                    **extra), path)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """An HMDB51-layout synthetic set of 4 classes, plus one file that does not decode, listed
    in split 1's test list."""
    root = tmp_path_factory.mktemp("hmdb")
    classes = data.make_synthetic_dataset(str(root), num_classes=4, videos_per_class=4, frames=12,
                                          size=(96, 72))
    (root / classes[0] / "broken.avi").write_bytes(b"not a video at all")
    with open(root / "testTrainMulti_7030_splits" / f"{classes[0]}_test_split1.txt", "a") as f:
        f.write("broken.avi 2\n")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", tiny_omniclip(),
                            class_names=["move left", "move right", "grow", "shrink"])


# ----------------------------------------------------------------------------------------------
# Scores: top-1, top-5, views, splits, the confusion matrix

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
    assert (report["num_videos"], report["num_evaluated"], report["num_skipped"]) == (5, 4, 1)
    assert report["skipped"] == ["video3.avi: cannot decode"]
    assert report["top1"] == 50.0          # videos 0 and 1 of 4
    assert report["confusion"] == [[0, 0, 1], [1, 1, 0], [0, 0, 1]]   # rows: true class
    assert [c["top1"] for c in report["per_class"]] == [0.0, 50.0, 100.0]
    # the probability reported for video 0 is the mean of the three views' softmax
    p = [sum(math.exp(v[c]) / sum(math.exp(x) for x in v) for v in view_logits[0]) / 3 for c in range(3)]
    index, label, prediction, probability = report["videos"][0]
    assert (index, label, prediction) == (0, 1, 1)
    assert probability == pytest.approx(p[1], rel=1e-6)


def test_top1_and_top5_on_seven_classes_match_hand_counts():
    """7 classes, so top-5 differs from top-1, from top-4 and from 'every class'. Each row ranks
    the classes 6, 5, ..., 0 by probability except where written; the label's rank decides."""
    ranks_of_label = [1, 2, 5, 6, 4, 7, 1, 3]   # where the true class sits in each video's ranking
    probs, labels = [], []
    for v, rank in enumerate(ranks_of_label):
        order = [(v + k) % 7 for k in range(7)]          # classes from most to least likely
        row = torch.zeros(7)
        row[order] = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.08, 0.05, 0.02])
        probs.append(row)
        labels.append(order[rank - 1])
    report = ev.summarize(torch.tensor(labels), torch.stack(probs))
    assert report["top1"] == pytest.approx(100 * 2 / 8)   # ranks 1, 1
    assert report["top5"] == pytest.approx(100 * 6 / 8)   # ranks 1, 2, 5, 4, 1, 3 (not 6, 7)
    # the confusion matrix: row = label, column = the rank-1 class (order[0] = v % 7)
    expected = np.zeros((7, 7), dtype=int)
    for v, label in enumerate(labels):
        expected[label, v % 7] += 1
    assert report["confusion"] == expected.tolist()
    per_class = {c["index"]: c for c in report["per_class"]}
    for c in range(7):
        row = expected[c]
        assert per_class[c]["videos"] == row.sum()
        assert per_class[c]["top1"] == (100.0 * row[c] / row.sum() if row.sum() else None)


def test_views_are_averaged_as_probabilities_after_a_softmax_per_view():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6) * 4                      # (B, V, C)
    videos = torch.zeros(2, 3, 1, 3, 8, 8)                 # (B, V, T, 3, S, S)
    videos[:, :, 0, 0, 0, :6] = logits
    got = ev.view_probabilities(LogitsInPixels(), videos, torch.zeros(6, 4))
    for b in range(2):
        per_view = [torch.exp(logits[b, v]) / torch.exp(logits[b, v]).sum() for v in range(3)]
        expected = sum(per_view) / 3
        torch.testing.assert_close(got[b], expected, msg=lambda m: f"softmax per view, then mean: {m}")
    assert not torch.allclose(got, logits.mean(1).softmax(-1), atol=1e-3)   # not softmax(mean logits)


def test_mean_and_std_over_splits_use_the_population_deviation():
    mean, std = ev.mean_std([50.0, 40.0, 45.0, 41.0])
    assert mean == pytest.approx(44.0)
    assert std == pytest.approx(math.sqrt((36 + 16 + 1 + 9) / 4))    # divide by n, not n - 1
    assert std != pytest.approx(statistics.stdev([50.0, 40.0, 45.0, 41.0]))


def test_zero_shot_splits_report_mean_and_std(videos, checkpoint):
    report = ev.main(["--checkpoint", str(checkpoint), "--dataset", "hmdb51", "--data-root",
                      str(videos), "--split", "all", "--num-workers", "0"])
    assert sorted(report["splits"]) == ["1", "2", "3"]
    for key in ("top1", "top5"):
        values = [report["splits"][s][key] for s in ("1", "2", "3")]
        assert report[key + "_mean"] == pytest.approx(sum(values) / 3)
        assert report[key + "_std"] == pytest.approx(math.sqrt(sum((v - sum(values) / 3) ** 2
                                                                   for v in values) / 3))
    summed = np.sum([report["splits"][s]["confusion"] for s in ("1", "2", "3")], axis=0)
    assert report["confusion"] == summed.tolist()


# ----------------------------------------------------------------------------------------------
# Checkpoints name their weights, never locate them

def test_load_model_rebuilds_the_random_clip_and_a_named_openai_model(tmp_path, monkeypatch):
    model = tiny_omniclip()
    videos, classes = torch.randn(2, T, 3, 64, 64), torch.randn(5, 128)
    expected = model(videos, classes)
    loaded, _ = ev.load_model(write_checkpoint(tmp_path / "tiny.pt", model))
    torch.testing.assert_close(loaded(videos, classes), expected, atol=1e-5, rtol=1e-5)
    # An OpenAI name resolves through the table only: here a stand-in entry served by file://
    torch.save(model.clip.state_dict(), tmp_path / "clip.pt")
    sha = cw.sha256_of(tmp_path / "clip.pt")
    (tmp_path / "server" / sha).mkdir(parents=True)
    os.replace(tmp_path / "clip.pt", tmp_path / "server" / sha / "ViT-T-0.pt")
    monkeypatch.setitem(cw.MODELS, "ViT-T/0", (tmp_path / "server" / sha / "ViT-T-0.pt").as_uri())
    monkeypatch.setitem(cw.MODEL_SHA256, "ViT-T/0", sha)
    monkeypatch.setenv("OMNICLIP_CACHE", str(tmp_path / "cache"))
    named = write_checkpoint(tmp_path / "named.pt", model, dict(name="ViT-T/0", sha256=sha))
    loaded, _ = ev.load_model(named)
    torch.testing.assert_close(loaded(videos, classes), expected, atol=1e-5, rtol=1e-5)
    assert os.listdir(tmp_path / "cache") == ["ViT-T-0.pt"]
    assert cw.model_name_for_sha256(sha) == "ViT-T/0"


@pytest.fixture
def nothing_fetched_or_loaded(monkeypatch):
    """Fail the test if anything reaches the network or a weights loader."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"reached a loader or the network with {args}")
    monkeypatch.setattr(cw, "_fetch", refuse)
    monkeypatch.setattr(cw, "load_state_dict", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)


@pytest.mark.parametrize("name", ["https://example.com/0" + "a" * 63 + "/ViT-B-16.pt",
                                  "file:///tmp/weights.pt", "ARCHIVE", "../clip.pt"])
def test_a_checkpoint_naming_a_url_or_a_file_is_refused_before_anything_is_read(
        tmp_path, name, nothing_fetched_or_loaded):
    model = tiny_omniclip()
    archive = tmp_path / "archive.pt"
    torch.save(model.clip.state_dict(), archive)
    name = str(archive) if name == "ARCHIVE" else name
    path = write_checkpoint(tmp_path / "ck.pt", model, dict(name=name, sha256=cw.sha256_of(archive)))
    with pytest.raises(cw.WeightsError, match=re.escape(repr(name)) + ": refused"):
        ev.load_model(path)
    with pytest.raises(cw.WeightsError, match="refused"):     # with the user's file too
        ev.load_model(path, clip_weights=str(archive))


def test_the_users_file_is_hashed_before_it_is_loaded(tmp_path, nothing_fetched_or_loaded):
    model = tiny_omniclip()
    torch.save(model.clip.state_dict(), tmp_path / "mine.pt")
    torch.save(tiny_omniclip(seed=7).clip.state_dict(), tmp_path / "other.pt")
    local = write_checkpoint(tmp_path / "local.pt", model,
                             dict(name="local", sha256=cw.sha256_of(tmp_path / "mine.pt")))
    with pytest.raises(cw.WeightsError, match=r"local CLIP file .*--clip-weights FILE"):
        ev.load_model(local)
    with pytest.raises(cw.WeightsError, match=r"other.pt has SHA256 [0-9a-f]{64}, but .*local.pt"):
        ev.load_model(local, clip_weights=str(tmp_path / "other.pt"))
    # a recorded OpenAI name with another SHA256 than the table's: refused before any download
    forged = write_checkpoint(tmp_path / "forged.pt", model, dict(name="ViT-B/16", sha256="0" * 64))
    with pytest.raises(cw.WeightsError, match="whose released file has " + cw.MODEL_SHA256["ViT-B/16"]):
        ev.load_model(forged)


def test_a_local_file_with_the_recorded_sha256_loads(tmp_path):
    model = tiny_omniclip()
    torch.save(model.clip.state_dict(), tmp_path / "mine.pt")
    local = write_checkpoint(tmp_path / "local.pt", model,
                             dict(name="local", sha256=cw.sha256_of(tmp_path / "mine.pt")))
    loaded, _ = ev.load_model(local, clip_weights=str(tmp_path / "mine.pt"))
    videos, classes = torch.randn(1, T, 3, 64, 64), torch.randn(3, 128)
    torch.testing.assert_close(loaded(videos, classes), model(videos, classes), atol=1e-5, rtol=1e-5)


class RunsCode:
    """Unpickling this calls os.mkdir(marker): the kind of file weights_only must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def bad_checkpoints(folder, model):
    """Every kind of bad file, each with the words its one-line message must contain."""
    good = folder / "good.pt"
    write_checkpoint(good, model)
    raw = good.read_bytes()
    cases = {"random-bytes": (os.urandom(4096), "not a torch checkpoint"),
             "text": (b"just some text\n", "not a torch checkpoint"),
             "empty": (b"", "not a torch checkpoint"),
             "truncated": (raw[:len(raw) // 2], "not a torch checkpoint, or truncated")}
    for name, (content, _) in cases.items():
        (folder / f"{name}.pt").write_bytes(content)
    objects = {"state-dict": ({"w": torch.zeros(2)}, r"a plain state_dict without \['model', 'config', 'clip_weights'\]"),
               "a-list": ([torch.zeros(2)], "holds a list"),
               "missing-keys": (dict(model={}, config={}), r"without \['clip_weights'\]"),
               "runs-code": (dict(model=RunsCode(str(folder / "pwned"))), r"refused: .*posix.mkdir.* would run code")}
    for name, (obj, _) in objects.items():
        torch.save(obj, folder / f"{name}.pt")
    for name, change, words in (
            ("unknown-config-field", lambda s: s["config"].update(colour="red"), "config does not fit"),
            ("other-size", lambda s: s.update(model=tiny_omniclip(frames=8).trainable_state_dict()),
             "trained tensors do not fit"),
            ("other-adapter", lambda s: s.update(adapter="SomeOtherAdapter"),   # a fork's names too
             f"temporal adapter 'SomeOtherAdapter'; this omniclip.py builds '{model.adapter_name()}'")):
        changed = torch.load(good, weights_only=True)
        change(changed)
        torch.save(changed, folder / f"{name}.pt")
        cases[name] = (None, words)
    os.mkdir(folder / "a-folder.pt")
    cases.update({k: (None, w) for k, (_, w) in objects.items()},
                 **{"a-folder": (None, "a directory, not a checkpoint"),
                    "missing": (None, "checkpoint not found")})
    return {name: (folder / f"{name}.pt", words) for name, (_, words) in cases.items()}


def test_every_kind_of_bad_checkpoint_is_one_line_naming_it(tmp_path):
    cases = bad_checkpoints(tmp_path, tiny_omniclip())
    assert len(cases) == 13
    for name, (path, words) in cases.items():
        with pytest.raises(data.InputError) as error:
            ev.load_model(path)
        message = str(error.value)
        assert str(path) in message and "\n" not in message, (name, message)
        assert re.search(words, message), (name, message)
    assert not (tmp_path / "pwned").exists()          # the pickle's code never ran
    older = torch.load(tmp_path / "good.pt", weights_only=True)
    del older["adapter"]                               # checkpoints from before the adapter key
    torch.save(older, tmp_path / "older.pt")
    ev.load_model(tmp_path / "older.pt")
    assert ev.read_checkpoint(tmp_path / "good.pt")["clip_weights"]["name"] == "tiny"


def test_a_bad_checkpoint_ends_the_script_with_one_line_and_status_2(tmp_path, videos, monkeypatch,
                                                                     capsys):
    """The script's own entry point (run here as `python eval.py` runs it, in this process)."""
    write_checkpoint(tmp_path / "good.pt", tiny_omniclip())
    (tmp_path / "bad.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:1000])
    monkeypatch.setattr(sys, "argv", ["eval.py", "--checkpoint", str(tmp_path / "bad.pt"), "--video",
                                      str(videos / "grow" / "grow_00.avi"), "--classes", "a,b"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, "eval.py"), run_name="__main__")
    out = capsys.readouterr()
    assert stop.value.code == 2 and out.out == ""
    assert out.err.startswith(f"error: {tmp_path / 'bad.pt'}: not a torch checkpoint")
    assert out.err.count("\n") == 1 and "Traceback" not in out.err


# ----------------------------------------------------------------------------------------------
# Flags: checked before any work, one line naming the flag

@pytest.fixture(scope="module")
def not_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notvideos")
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / "picture.png")
    (folder / "notes.txt").write_text("these are my notes, not a video\n" * 20)
    return folder


BAD_FLAGS = [  # (arguments after the model, words the message must hold)
    (["--views", "4by3"], r"--views: '4by3': expected TEMPORALxSPATIAL"),
    (["--views", "4x2"], r"--views: '4x2'.* spatial 1 or 3"),
    (["--views", "0x1"], r"--views: '0x1'"),
    (["--split", "4"], r"--split: '4': one of 1, 2, 3, all"),
    (["--split", "0"], r"--split: '0'"),
    (["--split", "every"], r"--split: 'every'"),
    (["--batch-size", "0"], r"--batch-size: '0': an integer, at least 1"),
    (["--frames", "0"], r"--frames: '0'"),
    (["--frames", "eight"], r"--frames: 'eight'"),
    (["--num-workers", "-1"], r"--num-workers: '-1': an integer, at least 0"),
    (["--window", "0"], r"--window: '0': a number above 0"),
    (["--window", "-2"], r"--window: '-2'"),
    (["--classes", ""], r"--classes: no class names"),
    (["--classes", "kick_ball,KickBall"], r"--classes: classes 'kick_ball', 'KickBall' all become"),
    (["--classes", "run,walk,run"], r"--classes: class 'run' is listed 2 times"),
    (["--template", "a video of action"], r"--template .*exactly one \{\}"),
    (["--model", "ViT-X/1"], r"--model: invalid choice: 'ViT-X/1'"),
    (["--json", "/no/such/folder/r.json"], r"--json /no/such/folder/r.json: its folder does not exist"),
    (["--attention-maps", "fig.jpg"], r"--attention-maps fig.jpg: a .png"),
    (["--connection", "serial"], r"--connection: invalid choice: 'serial'"),
    (["--pta-layers", "12"], r"model options: pta_layers \[12\]"),
    (["--temporal-ratio", "0"], r"--temporal-ratio: '0'"),
]


@pytest.mark.parametrize("extra, words", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it(extra, words, videos, capsys):
    base = ["--model", "tiny", "--video", str(videos / "grow" / "grow_00.avi"), "--classes", "a,b"]
    if extra[0] == "--split":
        base = ["--model", "tiny", "--dataset", "hmdb51", "--data-root", str(videos)]
    with pytest.raises(SystemExit) as stop:
        ev.parse_args(base + extra)                       # a repeated flag: the last one counts
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(words, err), err


@pytest.mark.parametrize("argv, words", [
    (["--model", "tiny", "--video", "PNG", "--classes", "a,b"], r"--video .*picture.png: .*not a video"),
    (["--model", "tiny", "--video", "TXT", "--classes", "a,b"], r"--video .*notes.txt: .*not a video"),
    (["--model", "tiny", "--dataset", "hmdb51", "--data-root", "/no/such/dir"], r"--data-root /no/such/dir"),
    (["--model", "tiny", "--dataset", "k400", "--data-root", ".", "--split", "all"], r"--split all: only"),
    (["--checkpoint", "/no/such/ck.pt", "--video", "PNG"], r"--checkpoint: /no/such/ck.pt: no such file"),
    (["--model", "tiny", "--window", "2", "--dataset", "hmdb51", "--data-root", "."], r"--window goes with --video"),
    (["--model", "tiny"], r"give either --video FILE or --dataset"),
    (["--video", "PNG"], r"give --checkpoint .*or --model"),
])
def test_bad_files_and_combinations_are_one_line(argv, words, not_videos, capsys):
    argv = [str(not_videos / "picture.png") if a == "PNG" else str(not_videos / "notes.txt")
            if a == "TXT" else a for a in argv]
    with pytest.raises(SystemExit) as stop:
        ev.parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and re.search(words, err), err


def test_every_flag_has_help_and_the_examples_name_train_py_s_output():
    parser = ev.build_parser()
    for action in parser._actions:
        if action.dest not in ("help", "memory_probe"):
            assert action.help and len(action.help) > 10, action.dest
    text = parser.format_help()
    assert "runs/<name>/checkpoint.pt" in text and "run/last.pt" not in text
    assert "--model tiny" in text and "plain CLIP" in text


def test_class_features_are_the_template_through_the_frozen_text_tower():
    model, _ = ev.load_untrained("tiny", None, T)
    got = ev.text_features(model, ["brush hair", "kick"], "a clip of {} now", "cpu")
    expected = model.clip.encode_text(cw.tokenize(["a clip of brush hair now", "a clip of kick now"]))
    torch.testing.assert_close(got, expected)
    with pytest.raises(data.InputError, match="class text: text of 8[0-9] tokens is too long"):
        ev.text_features(model, ["very " * 80 + "long"], "{}", "cpu")


def test_the_default_template_is_the_papers():
    assert ev.DEFAULT_TEMPLATE == "a video of {} action"
    # "A video of [CLS] action": CLIP's tokenizer lower-cases, so the paper's capital A is the same
    assert torch.equal(cw.tokenize("A video of brush hair action"),
                       cw.tokenize(ev.DEFAULT_TEMPLATE.format("brush hair")))


# ----------------------------------------------------------------------------------------------
# Your own video, offline

def test_custom_video_uses_the_checkpoint_s_classes(videos, checkpoint, capsys):
    video = videos / "move_left" / "move_left_00.avi"
    report = ev.main(["--checkpoint", str(checkpoint), "--video", str(video)])
    out = capsys.readouterr().out
    rows = re.findall(r"^\s*(\d+)\s+([0-9.]+)\s+(.+)$", out, re.M)
    assert out.startswith(f"model: OmniCLIP from {checkpoint}")
    assert sorted(r[2] for r in rows) == ["grow", "move left", "move right", "shrink"]
    model, _ = ev.load_model(checkpoint)
    expected = ev.predict(model, ev.load_video(str(video), T, 64), [r[2] for r in rows],
                          "a video of {} action", "cpu")
    assert [r[2] for r in rows] == [n for n, _ in expected] == [n for n, _ in report["ranking"]]
    assert [float(r[1]) for r in rows] == pytest.approx([p for _, p in expected], abs=2e-6)
    assert [p for _, p in report["ranking"]] == pytest.approx([p for _, p in expected], abs=1e-6)


def test_tiny_runs_offline_as_plain_clip_and_says_it_is_random(videos, capsys):
    """No checkpoint, no weights: a random tiny CLIP averaging frame features; an untrained
    OmniCLIP with SPG off computes the same probabilities (its adapters start at zero)."""
    video, names = videos / "grow" / "grow_00.avi", ["move left", "move right", "grow", "shrink"]
    ev.main(["--model", "tiny", "--frames", str(T), "--video", str(video), "--classes", ",".join(names)])
    out = capsys.readouterr().out
    assert "plain CLIP averaging its frame features" in out and "RANDOM tiny CLIP" in out
    rows = re.findall(r"^\s*\d+\s+([0-9.]+)\s+(.+)$", out, re.M)
    torch.manual_seed(0)
    clip = oc.CLIP(oc.OmniCLIPConfig(**oc.ARCHITECTURES["tiny"]))
    untrained = cw.build_omniclip(clip.state_dict(), frames=T, spg=False).eval()
    expected = ev.predict(untrained, ev.load_video(str(video), T, 64), names, ev.DEFAULT_TEMPLATE, "cpu")
    assert [name for _, name in rows] == [name for name, _ in expected]
    assert [float(p) for p, _ in rows] == pytest.approx([p for _, p in expected], abs=2e-6)


def test_window_predictions_take_segment_centres_of_each_window(videos, tmp_path, capsys):
    video = str(videos / "shrink" / "shrink_00.avi")            # 12 frames at 30 fps: 0.4 s
    names = ["move left", "move right", "grow", "shrink"]
    report = ev.main(["--model", "tiny", "--frames", "2", "--video", video, "--classes", ",".join(names),
                      "--window", "0.25", "--json", str(tmp_path / "v.json")])
    bounds = [(0, 8), (8, 12)]                       # 0.25 s at 30 fps = 7.5 -> 8 frames; the rest
    assert [(w["start_s"], w["end_s"]) for w in report["windows"]] == [(0.0, 0.267), (0.267, 0.4)]
    assert json.loads((tmp_path / "v.json").read_text())["windows"] == report["windows"]
    # each window's answer is the model's on the frames at its two segment centres, decoded here
    every = torch.from_numpy(data.read_frames(video, lambda n: list(range(n))))   # (12, H, W, 3)
    model, _ = ev.load_untrained("tiny", None, 2)
    for (a, b), window in zip(bounds, report["windows"]):
        picks = [a + math.floor((i + 0.5) * (b - a) / 2) for i in range(2)]
        clip = data.eval_transform(every[picks], 64, 1)                 # (1, 2, 3, S, S)
        name, prob = ev.predict(model, clip, names, ev.DEFAULT_TEMPLATE, "cpu")[0]
        assert (window["top"], window["probability"]) == (name, pytest.approx(prob, abs=1e-6))
    assert "whole video" in capsys.readouterr().out and len(report["ranking"]) == 4


# ----------------------------------------------------------------------------------------------
# Pictures, checked by their pixels

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
    torch.testing.assert_close(ours, weights[:, 0, 1:], atol=1e-6, rtol=1e-5)


def test_attention_map_png_is_frames_by_three_rows_and_follows_the_video(videos, checkpoint, tmp_path):
    first, second = videos / "move_left" / "move_left_00.avi", videos / "grow" / "grow_00.avi"
    out = ev.main(["--checkpoint", str(checkpoint), "--video", str(first),
                   "--attention-maps", str(tmp_path / "a.png")])
    assert out["ranking"][0][0] in ("move left", "move right", "grow", "shrink")
    with Image.open(tmp_path / "a.png") as image:
        picture = np.asarray(image.convert("RGB")).astype(int)
    model, _ = ev.load_model(checkpoint)
    video = ev.load_video(str(first), T, 64)[0]
    _, clip_maps, omni_maps = ev.attention_maps(model, video)
    tile = 192                                   # 64 px upscaled 3x: at least 160 px, readable
    left, top = ev.LABEL_WIDTH, ev.TITLE_HEIGHT
    assert picture.shape == (top + 3 * tile, left + T * tile + ev.BAR_WIDTH, 3)
    assert (picture[top:, :left] < 100).any(axis=-1).sum() > 50       # row labels are written
    assert (picture[:top] < 100).any(axis=-1).sum() > 50              # and the title
    frames = ((video * torch.tensor(data.CLIP_STD).view(3, 1, 1) + torch.tensor(data.CLIP_MEAN).view(3, 1, 1))
              .clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()
    for t in range(T):
        # row 1: the sampled frame, upscaled to the tile
        upscaled = np.asarray(Image.fromarray(frames[t]).resize((tile, tile), Image.BILINEAR))
        assert np.abs(picture[top:top + tile, left + t * tile:left + (t + 1) * tile] - upscaled).max() <= 1
        for row, maps in ((1, clip_maps), (2, omni_maps)):
            for pick, colour in ((maps[t].argmax(), (127, 0, 0)), (maps[t].argmin(), (0, 0, 127))):
                i, j = divmod(int(pick), 4)                     # 4 x 4 patches of 48 px each
                y, x = i * 48 + 24, left + t * tile + j * 48 + 24
                frame = picture[top + y, x]                      # the same pixel of row 1
                heat = 2 * picture[top + row * tile + y, x] - frame   # the tile is half frame, half heat
                assert np.abs(heat - np.array(colour)).max() <= 40, (t, row, heat, colour)
    assert not torch.allclose(clip_maps, omni_maps)            # rows 2 and 3 differ
    _, _, other = ev.attention_maps(model, ev.load_video(str(second), T, 64)[0])
    assert not torch.allclose(other, omni_maps)                 # the heat follows the video
    # the scale bar: dark red at the top ("max"), dark blue at the bottom ("min")
    bar_x = left + T * tile + 8 + 7
    assert np.abs(picture[top + tile, bar_x] - (127, 0, 0)).max() <= 3
    assert np.abs(picture[top + 3 * tile - 1, bar_x] - (0, 0, 127)).max() <= 3


def test_confusion_png_colours_each_cell_by_its_share_of_the_row(tmp_path):
    confusion = [[3, 1, 0, 0, 0, 0], [0, 4, 0, 0, 0, 0], [1, 1, 2, 0, 0, 0],
                 [0, 0, 0, 4, 0, 0], [0, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0]]
    names = ["brush hair", "kick", "kick ball", "sword", "sword exercise", "yo yo"]
    image, (left, top, cell) = ev.confusion_image(confusion, names)
    pixels = np.asarray(image).astype(int)
    assert cell >= 16
    for i in range(6):
        row_total = max(sum(confusion[i]), 1)
        for j in range(6):
            share = confusion[i][j] / row_total
            expected = [round(255 + share * (c - 255)) for c in (8, 48, 107)]   # white -> dark blue
            got = pixels[top + i * cell + cell // 2, left + j * cell + cell // 2]
            assert list(got) == expected, (i, j, share, got)
    assert (pixels[top:top + 6 * cell, :left] < 100).any(axis=-1).sum() > 100   # class names written
    big, (_, _, small_cell) = ev.confusion_image(np.eye(51, dtype=int))
    assert small_cell * 51 <= 700 and big.size[0] < 900


def test_training_curves_plot_the_logged_loss_and_accuracy(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [dict(step=10 * k, epoch=k / 2, lr=1e-3, loss=2.0 - 0.3 * k, train_top1=10.0 * k,
                  clips_per_s=5.0, skipped=0) for k in range(1, 6)]
    lines += [dict(epoch=3, step=50, loss=0.6, train_top1=50.0, elapsed_s=9.0), dict(test_top1=35.0)]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    panels = ev.plot_curves(str(log), str(tmp_path / "curves.png"))
    pixels = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB")).astype(int)
    for key, colour in (("loss", (31, 119, 180)), ("train_top1", (214, 39, 40))):
        x0, y0, x1, y1 = panels[key]["box"]
        (xa, xb), (ya, yb) = panels[key]["x"], panels[key]["y"]
        assert (xa, xb) == (10, 50)
        for line in lines[:5]:       # every step line's point lies on the drawn curve
            x = x0 + (line["step"] - xa) / (xb - xa) * (x1 - x0)
            y = y1 - (line[key] - ya) / (yb - ya) * (y1 - y0)
            near = pixels[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2]
            assert (np.abs(near - colour).max(axis=-1) <= 10).any(), (key, line)
    assert panels["loss"]["y"] == pytest.approx((0.0, 1.7)) and panels["train_top1"]["y"] == (0.0, 100.0)
    x0, y0, x1, y1 = panels["train_top1"]["box"]
    y = round(y1 - 0.35 * (y1 - y0))                          # the test accuracy, dashed green
    assert (np.abs(pixels[y - 1:y + 2, x0:x1] - (44, 160, 44)).max(axis=-1) <= 10).sum() > 0.3 * (x1 - x0)
    log.write_text("not json\n")
    with pytest.raises(data.InputError, match="log.jsonl:1: not a JSON line"):
        ev.plot_curves(str(log), str(tmp_path / "x.png"))


def test_json_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    ev.write_json(str(path), dict(top1=1.0))
    assert json.loads(path.read_text()) == dict(top1=1.0)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(json, "dump", dies)
    with pytest.raises(KeyboardInterrupt):
        ev.write_json(str(path), dict(top1=2.0))
    assert json.loads(path.read_text()) == dict(top1=1.0) and os.listdir(tmp_path) == ["r.json"]


# ----------------------------------------------------------------------------------------------
# The benchmark

def test_benchmark_takes_the_model_options_and_names_the_adapter(tmp_path, capsys, monkeypatch):
    """The memory probe runs `python eval.py <this run's flags> --memory-probe MODEL` in a fresh
    process; here that command runs in this process, which is faster and sees the same flags."""
    probes = []

    def run_here(command, **kwargs):
        assert command[:2] == [sys.executable, os.path.join(ROOT, "eval.py")]
        probes.append(command[2:])
        with contextlib.redirect_stdout(io.StringIO()) as out:
            ev.main(command[2:])
        return subprocess.CompletedProcess(command, 0, out.getvalue(), "")
    monkeypatch.setattr(ev.subprocess, "run", run_here)
    path = tmp_path / "bench.json"
    ev.main(["--benchmark", "--model", "tiny", "--frames", str(T), "--device", "cpu", "--connection",
             "cascade", "--spg-per-layer", "--warmup", "0", "--repeats", "1", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["options"] == dict(connection="cascade", spg_per_layer=True)
    assert [p[-2:] for p in probes] == [["--memory-probe", "omniclip"], ["--memory-probe", "baseline"]]
    assert all("--connection" in p and "cascade" in p and "--spg-per-layer" in p for p in probes)
    assert report["adapter"] == "STAdapter" and "adapter:STAdapter" in report["analytic_macs"]
    assert "adapter:STAdapter" in capsys.readouterr().out
    assert report["model"] == "tiny" and report["frames"] == T and report["batch_size"] == 1
    assert abs(report["macs_per_view"] / report["analytic_macs_per_view"] - 1) < 0.05
    assert report["baseline_macs_per_view"] < report["macs_per_view"]
    assert report["params_trainable"] < report["params_total"]
    for key in ("infer_clips_per_s", "baseline_infer_clips_per_s", "train_clips_per_s",
                "baseline_train_clips_per_s"):
        assert report[key] > 0, key
    # measured in this process here, not a fresh one, so the peaks are only known to be integers
    assert all(isinstance(report[key], int) for key in ("peak_memory_bytes", "baseline_peak_memory_bytes"))
    assert report["infer_time_ratio"] == pytest.approx(
        report["baseline_infer_clips_per_s"] / report["infer_clips_per_s"])
    # the baseline fine-tunes the whole image tower: fwd + bwd cost more than twice the forward
    assert report["baseline_train_macs_per_clip"] > 2 * report["baseline_macs_per_view"]


@pytest.mark.parametrize("options", [{}, dict(connection="cascade"), dict(spg_per_layer=True),
                                     dict(pta=False), dict(connection="attention-parallel")])
def test_counted_macs_match_the_analytic_count_for_each_variant(options):
    model = tiny_omniclip(**options)
    macs = ev.view_macs(model, torch.randn(7, 128))
    assert abs(macs["macs_gap_vs_analytic"]) < 0.05, macs
    assert macs["baseline_macs_per_view"] == oc.analytic_baseline_macs(model.config, 7) or \
        macs["baseline_macs_per_view"] == pytest.approx(macs["analytic_baseline_macs_per_view"], rel=0.05)


def test_vit_b16_counted_macs_match_analytic_within_5_percent():
    """The real size, counted on the meta device: shapes only, so it takes seconds, not minutes."""
    with torch.device("meta"):
        model = oc.OmniCLIP(oc.OmniCLIPConfig(**oc.ARCHITECTURES["ViT-B/16"], frames=8))
        classes = torch.randn(400, 512)                        # K400's 400 classes
    macs = ev.view_macs(model, classes)
    assert abs(macs["macs_gap_vs_analytic"]) < 0.05
    assert macs["baseline_macs_per_view"] == pytest.approx(macs["analytic_baseline_macs_per_view"], rel=0.05)


# ----------------------------------------------------------------------------------------------
# End to end: torchrun, and train.py's own report (the slowest tests, last)

def run_eval_cli(args, nproc):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), "eval.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(command + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_ranks_count_every_video_once_and_match_one_rank(videos, checkpoint, tmp_path):
    common = ["--checkpoint", checkpoint, "--dataset", "hmdb51", "--data-root", videos,
              "--views", "2x3", "--batch-size", "1", "--num-workers", "0"]
    ev.main([str(a) for a in common + ["--json", tmp_path / "one.json"]])
    run_eval_cli(common + ["--json", tmp_path / "two.json"], nproc=2)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    samples, _ = data.load_dataset("hmdb51", str(videos), 1, "test")
    good = [i for i, (path, _) in enumerate(samples) if not path.endswith("broken.avi")]
    assert one["num_videos"] == len(samples) and one["num_evaluated"] == len(good)
    assert one["num_skipped"] == 1 and "broken.avi" in one["skipped"][0]
    assert [v[0] for v in two["videos"]] == good         # each good video once, in index order
    for v1, v2 in zip(one.pop("videos"), two.pop("videos")):
        assert v1[:3] == v2[:3] and v1[3] == pytest.approx(v2[3], abs=1e-5)
    assert one == two
    assert sorted(os.listdir(tmp_path)) == ["one.confusion.png", "one.json", "two.confusion.png",
                                            "two.json"]   # atomic writes leave no temporary file


def test_a_train_py_checkpoint_reloads_and_gives_train_py_s_own_test_report(videos, tmp_path):
    """train.py draws its random tiny CLIP from --seed and records it: eval.py must rebuild the
    very same frozen CLIP (SHA256 checked) and score the test set exactly as train.py did."""
    import train
    out = tmp_path / "run"
    train.main(["--dataset", "hmdb51", "--data-root", str(videos), "--model", "tiny", "--frames",
                str(T), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--test-views", "1x1",
                "--seed", "3", "--out", str(out)])
    by_train = json.loads((out / "report.json").read_text())
    by_eval = ev.main(["--checkpoint", str(out / "checkpoint.pt"), "--dataset", "hmdb51",
                       "--data-root", str(videos), "--num-workers", "0"])
    for key in ("top1", "top5", "confusion", "num_videos", "num_evaluated", "num_skipped", "skipped"):
        assert by_eval[key] == by_train[key], key
    for mine, theirs in zip(by_eval["videos"], by_train["videos"], strict=True):
        assert mine[:3] == theirs[:3] and mine[3] == pytest.approx(theirs[3], abs=1e-5)
