"""Faults while a run works: preemption (SIGTERM, also under torchrun), a loss that stops being
finite, a full disk, checkpoints that hold NaN or do not fit, and phone videos (a variable frame
rate) that are not damage.

Each test asserts what the user sees (one line, no traceback from our code, the status) and that
nothing is lost: the previous checkpoint intact and loadable, no temporary file beside it, no NaN
saved. A full disk is simulated the way the writer meets it: a file-size limit (RLIMIT_FSIZE;
Python ignores SIGXFSZ, so the write fails with EFBIG, "File too large").
Everything runs on the CPU: the random tiny CLIP, 2 frames, a few optimizer steps.
"""
import contextlib
import fractions
import json
import os
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import train  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 classes x 8 videos in HMDB51's layout: 18 training, 6 test videos. This module's own
    copy (test_train.py makes the same): a test here damages one of its videos."""
    root = tmp_path_factory.mktemp("data") / "hmdb"
    data.make_synthetic_dataset(str(root), num_classes=3, videos_per_class=8, frames=8,
                                size=(64, 48))
    return str(root)


def small(root, out, *extra):
    """18 videos / batch 4 = 4 steps per epoch x 2 epochs; a log line per step, saves at the
    epoch ends only (so a signal's save is its own)."""
    return ["--dataset", "hmdb51", "--data-root", root, "--model", "tiny", "--frames", "2",
            "--batch-size", "4", "--per-gpu-batch", "2", "--epochs", "2", "--warmup-epochs", "0.5",
            "--lr", "1e-2", "--min-lr", "1e-3", "--save-every", "100", "--log-every", "1",
            "--no-eval", "--workers", "0", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def whole_run(dataset, tmp_path_factory):
    """The uninterrupted run: 8 steps in this process."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train.main(small(dataset, out))
    return out


def load(path):
    return torch.load(path, weights_only=True)


def nothing_left_over(folder):
    """No temporary file beside the run's files, and the lock released."""
    names = os.listdir(folder)
    assert not [n for n in names if n.endswith(".tmp") or n == train.LOCK], names


def assert_same_tensors(a, b):
    """Two checkpoints with bitwise the same adapters and AdamW moments at the same step."""
    a, b = load(a), load(b)
    assert a["step"] == b["step"], (a["step"], b["step"])
    differ = [name for name in a["model"] if not torch.equal(a["model"][name], b["model"][name])]
    assert not differ, f"tensors differ from the uninterrupted run's: {differ}"
    for index, state in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], b["optimizer"]["state"][index][key]), (index, key)


def wait_for_step(out, step, process, timeout=120):
    """Until log.jsonl holds the line of `step` (the process is then inside the next step)."""
    deadline, log = time.time() + timeout, os.path.join(out, "log.jsonl")
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        with open(log if os.path.exists(log) else os.devnull) as f:
            lines = [line for line in f if line.endswith("\n")]   # whole lines only
        if any(json.loads(line).get("step") == step for line in lines):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {out}/log.jsonl after {timeout} s")


@contextlib.contextmanager
def stopped_at_the_end(*processes):
    """A test that fails leaves no run behind: torchrun's agent, sent SIGTERM, ends its ranks."""
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=60)
                process.kill()
                process.wait()


def our_traceback(text):
    """A traceback through one of our scripts (torchrun's agent prints its own: not ours)."""
    return re.search(r'File ".*(train|eval|data)\.py"', text)


# ------------------------------------------------------------------------------------------------
# Preemption: SIGTERM saves where the run stands; --resume auto ends as if nothing happened

def test_sigterm_saves_the_step_and_resume_auto_ends_bitwise_as_the_unbroken_run(
        dataset, whole_run, tmp_path):
    out = tmp_path / "run"
    # --wait-at-step 3 (for tests): step 3 waits for the signal, as a long step would. A loader
    # worker, and the signal to the whole process group, as a scheduler sends it to a job
    child = subprocess.Popen([sys.executable, "train.py", *small(dataset, out, "--workers", "1",
                                                                 "--wait-at-step", "3")],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    with stopped_at_the_end(child):
        wait_for_step(out, 2, child)
        os.killpg(child.pid, signal.SIGTERM)
        time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):  # a second one, while it saves: no change
            os.killpg(child.pid, signal.SIGTERM)
        lines = []
        for line in child.stdout:  # and a third once it has said so, while it exits: no change
            lines.append(line)     # (the default handler, restored there, killed it: status -15)
            if line.startswith("stopped by"):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)
                break
        rest, stderr = child.communicate(timeout=120)
        stdout = "".join(lines) + rest
    assert child.returncode == 128 + signal.SIGTERM, stderr
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"stopped by SIGTERM after step 3 of 8: saved {out / 'checkpoint.pt'}")
    assert last.endswith(f"--out {out} --resume auto"), last
    assert not our_traceback(stderr) and "Traceback" not in stderr, stderr
    assert load(out / "checkpoint.pt")["step"] == 3
    nothing_left_over(out)
    train.main(small(dataset, out, "--resume", "auto"))
    assert_same_tensors(whole_run / "checkpoint.pt", out / "checkpoint.pt")
    nothing_left_over(out)


def test_sigterm_once_the_run_folder_has_files_saves_a_step_it_can_continue(
        dataset, tmp_path, monkeypatch, capsys):
    """A signal while config.json is written stopped at once with "run the same command again",
    which then refused the folder (it holds a run); from the first file on, a signal lets the
    step finish and saves it."""
    out, write_json = tmp_path / "run", evaluation.write_json

    def write_then_signal(path, report):
        write_json(path, report)
        if path.endswith("config.json"):
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(evaluation, "write_json", write_then_signal)
    with pytest.raises(SystemExit) as stop:
        train.main(small(dataset, out))
    assert stop.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step 1 of 8" in capsys.readouterr().out
    assert load(out / "checkpoint.pt")["step"] == 1
    nothing_left_over(out)


class _WorkerSignals(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        return signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_evaluation_workers_leave_sigterm_to_the_main_process(monkeypatch):
    """A scheduler's SIGTERM to the job's process group killed the final evaluation's loader
    workers, and torch printed "DataLoader worker ... is killed by signal" with a traceback over
    train.py's one line. Its workers now ignore the signal; the main process stops them."""
    made = []
    real = evaluation.DataLoader
    monkeypatch.setattr(evaluation, "DataLoader", lambda *a, **k: made.append(k) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        evaluation.evaluate(torch.nn.Linear(1, 1), [], torch.zeros(2, 4), "cpu", 1,
                            num_workers=1)
    loader = real(_WorkerSignals(), num_workers=1, worker_init_fn=made[0]["worker_init_fn"])
    assert list(loader) == [torch.tensor([True])]


def torchrun(root, out, *extra):
    """2 processes (gloo): global batch 4 = 1 per process x 2 x 2 accumulation steps; 1 epoch.
    --standalone: a free port of its own, so two runs (and other tests') can run side by side."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "train.py"), *small(root, out, "--per-gpu-batch", "1", "--epochs",
                                                   "1", *extra)]


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resume_auto_is_exact(dataset,
                                                                                 tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "run"
    unbroken = subprocess.Popen(torchrun(dataset, whole), cwd=tmp_path, env=ENV,  # meanwhile
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # SIGTERM to rank 0 alone (its pid is in the run's lock file); rank 1, already waiting in
    # step 2's all-reduce, must learn of it there and stop at the same step. (Sent to torchrun's
    # agent, as SLURM and Kubernetes do, it is forwarded to every rank: the easier case.)
    agent = subprocess.Popen(torchrun(dataset, out, "--wait-at-step", "2"), cwd=tmp_path, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with stopped_at_the_end(unbroken, agent):
        wait_for_step(out, 1, agent)
        os.kill(json.loads((out / train.LOCK).read_text())["pid"], signal.SIGTERM)
        stdout, stderr = agent.communicate(timeout=120)
        _, unbroken_err = unbroken.communicate(timeout=300)
    assert stdout.count("stopped by SIGTERM") == 1, stdout + stderr      # rank 0's line only
    assert f"stopped by SIGTERM after step 2 of 4: saved {out / 'checkpoint.pt'}" in stdout
    assert not our_traceback(stderr), stderr
    assert load(out / "checkpoint.pt")["step"] == 2
    nothing_left_over(out)
    assert unbroken.returncode == 0, unbroken_err[-3000:]
    result = subprocess.run(torchrun(dataset, out, "--resume", "auto"), cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_tensors(whole / "checkpoint.pt", out / "checkpoint.pt")


# ------------------------------------------------------------------------------------------------
# A loss that stops being finite; checkpoints that hold NaN or do not fit

def run_script(script, argv, monkeypatch, capsys):
    """`python script argv...` in this process (its __main__ block): (status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def crafted(whole_run, folder, change):
    """The uninterrupted run's checkpoint, changed, as folder/checkpoint.pt."""
    folder.mkdir()
    checkpoint = load(whole_run / "checkpoint.pt")
    change(checkpoint)
    torch.save(checkpoint, folder / "checkpoint.pt")
    return folder / "checkpoint.pt"


def test_a_loss_that_turns_non_finite_stops_the_run_with_one_line_and_saves_nothing(
        dataset, whole_run, tmp_path, monkeypatch, capsys):
    def absurd(checkpoint):  # a run continued from finite but absurd weights, at step 4
        checkpoint["step"] = 4
        for tensor in checkpoint["model"].values():
            tensor.mul_(1e30)
    path = crafted(whole_run, tmp_path / "run", absurd)
    before = path.read_bytes()
    status, _, err = run_script("train.py", small(dataset, tmp_path / "run", "--resume", "auto"),
                                monkeypatch, capsys)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(r"error: step 5: the training loss is (nan|inf|-inf), not finite", err), err
    assert f"the last good checkpoint is {path} (step 4)" in err and "--lr" in err, err
    assert path.read_bytes() == before                  # nothing saved over it
    nothing_left_over(tmp_path / "run")
    # eval.py on those weights: NaN scores, where it printed an accuracy (argmax over NaN)
    status, out, err = run_script("eval.py", [
        "--checkpoint", path, "--dataset", "hmdb51", "--data-root", dataset, "--views", "1x1",
        "--num-workers", "0"], monkeypatch, capsys)
    assert status == 2 and "top-1" not in out and err.count("\n") == 1, (out, err)
    assert err.startswith(f"error: {path}: the model's class scores are NaN or inf"), err
    # the save itself refuses NaN, whoever calls it, and leaves the old file as it was
    with pytest.raises(train.Diverged, match=r"model\['w'\] holds NaN or inf"):
        train.save_checkpoint(str(path), dict(model=dict(w=torch.tensor([1.0, float("nan")]))))
    assert path.read_bytes() == before
    nothing_left_over(tmp_path / "run")


def test_a_checkpoint_holding_nan_is_refused_by_eval_and_resume_naming_the_tensor(
        dataset, whole_run, tmp_path, monkeypatch, capsys):
    name = list(load(whole_run / "checkpoint.pt")["model"])[3]
    path = crafted(whole_run, tmp_path / "run",
                   lambda c: c["model"][name].view(-1)[0].fill_(float("nan")))
    video = os.path.join(dataset, "grow", "grow_00.avi")
    status, out, err = run_script("eval.py", ["--checkpoint", path, "--video", video, "--classes",
                                              "a,b"], monkeypatch, capsys)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: {path}: tensor model['{name}'] holds NaN or inf"), err
    status, out, err = run_script("train.py", small(dataset, tmp_path / "run", "--resume", "auto"),
                                  monkeypatch, capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {path}: tensor model['{name}'] holds NaN or inf"), err


def test_resume_refuses_a_checkpoint_whose_tensors_do_not_fit_naming_the_first(
        dataset, whole_run, tmp_path):
    names = list(load(whole_run / "checkpoint.pt")["model"])
    first = names[0]

    def other_shape(c):
        c["model"][first] = torch.zeros(3, 5)

    def half_missing(c):
        for n in names[::2]:
            del c["model"][n]

    def extra(c):
        c["model"]["my_adapter.weight"] = torch.zeros(2)

    def half_precision(c):
        c["model"][first] = c["model"][first].half()
    shape = tuple(load(whole_run / "checkpoint.pt")["model"][first].shape)
    cases = {"shape": (other_shape, f"{first}: checkpoint (3, 5) float32, model {shape} float32"),
             "missing": (half_missing, f"{first} is missing from the checkpoint"),
             "extra": (extra, "my_adapter.weight is in the checkpoint ((2,) float32) but not"),
             "dtype": (half_precision, f"{first}: checkpoint {shape} float16, model {shape}")}
    for case, (change, words) in cases.items():
        path = crafted(whole_run, tmp_path / case, change)
        before = path.read_bytes()
        with pytest.raises(data.InputError) as error:
            train.main(small(dataset, tmp_path / case, "--resume", "auto"))
        message = str(error.value)
        assert message.startswith(f"{path}: ") and words in message and "\n" not in message, \
            (case, message)
        assert path.read_bytes() == before and os.listdir(tmp_path / case) == ["checkpoint.pt"]

    def other_adapter(c):  # a --connection cascade run's: its flags and its tensors differ
        c["args"]["connection"], c["adapter"] = "cascade", "STAdapter"
        del c["model"][first]
    path = crafted(whole_run, tmp_path / "adapter", other_adapter)
    with pytest.raises(data.InputError) as error:
        train.main(small(dataset, tmp_path / "adapter", "--resume", "auto"))
    message = str(error.value)
    assert message.startswith(f"--resume {path} is another run") and "--connection" in message \
        and f"{first} is missing from the checkpoint" in message, message
    assert os.listdir(tmp_path / "adapter") == ["checkpoint.pt"]


# ------------------------------------------------------------------------------------------------
# A full disk: one line naming the file and the OS's reason, the old file intact, no temp left

@contextlib.contextmanager
def file_size_limit(limit):
    """This process may write no file beyond `limit` bytes, as on a full disk (the scripts run
    in this process through their __main__ block: the same code as in a child, seconds faster)."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)


def test_a_full_disk_at_a_checkpoint_stops_training_with_one_line_and_keeps_the_old_one(
        dataset, whole_run, tmp_path, monkeypatch, capsys):
    path = crafted(whole_run, tmp_path / "run", lambda c: c.update(step=4))
    before = path.read_bytes()
    leftover = tmp_path / "run" / "checkpoint.pt.k1ll3d_x.tmp"   # of a save killed by SIGKILL
    leftover.write_bytes(before[:100])
    with file_size_limit(len(before) // 2):
        status, out, err = run_script("train.py", small(dataset, tmp_path / "run", "--resume",
                                                        "auto"), monkeypatch, capsys)
    assert status == 2 and err == f"error: {path}: cannot write: File too large\n", err
    assert f"removed {leftover}" in out
    assert path.read_bytes() == before and load(path)["step"] == 4    # the old one, loadable
    nothing_left_over(tmp_path / "run")
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert [json.loads(line)["step"] for line in log.splitlines()] == [5, 6, 7, 8]


def test_a_full_disk_at_the_report_prints_the_evaluation_then_one_line(
        dataset, whole_run, tmp_path, monkeypatch, capsys):
    report = tmp_path / "r.json"
    report.write_text('{"old": true}')
    # a loader worker hands its batches over in shared-memory files, which the limit caps too:
    # the batch was lost and eval.py waited for it forever; under a limit the main process loads
    assert data.loader_workers(3) == 3
    with file_size_limit(300):
        assert data.loader_workers(3) == 0
        status, out, err = run_script("eval.py", [
            "--checkpoint", whole_run / "checkpoint.pt", "--dataset", "hmdb51", "--data-root",
            dataset, "--num-workers", "1", "--json", report], monkeypatch, capsys)
    assert status == 2 and err == f"error: {report}: cannot write: File too large\n", err
    assert re.search(r"top-1 [\d.]+%", out), out                      # what it computed
    assert report.read_text() == '{"old": true}' and os.listdir(tmp_path) == ["r.json"]


def test_every_writer_survives_a_full_disk(tmp_path, whole_run, monkeypatch):
    """Each writer under a 2,000-byte file-size limit: a WriteError naming the file and the
    reason, the previous version intact, nothing left beside it."""
    image, _ = evaluation.confusion_image([[3, 1], [0, 4]], ["a", "b"])
    log = tmp_path / "log.jsonl"
    writers = {
        "report.json": lambda p: evaluation.write_json(p, dict(x="y" * 4000)),
        "report.confusion.png": lambda p: evaluation.save_image(image, p),
        "curves.png": lambda p: evaluation.plot_curves(str(whole_run / "log.jsonl"), p),
        "few_shot_list.txt": lambda p: data.write_sample_list(p, [("v.avi", 1)] * 400),
        "checkpoint.pt": lambda p: train.save_checkpoint(p, dict(x=torch.zeros(1000))),
    }
    for name in writers:
        (tmp_path / name).write_text("previous")
    log.write_text('{"step": 1}\n' + " " * 1980 + "\n")          # 1,993 bytes
    failures = {}
    with file_size_limit(2000):
        for name, write in writers.items():
            with pytest.raises(data.WriteError) as error:
                write(str(tmp_path / name))
            failures[name] = str(error.value)
        with pytest.raises(data.WriteError) as error:
            data.append_line(str(log), json.dumps(dict(step=2, loss=1.0)))
        failures["log.jsonl"] = str(error.value)
        with pytest.raises(data.WriteError) as error:
            data.make_synthetic_dataset(str(tmp_path / "synthetic"), 2, 2, frames=8)
        failures["synthetic"] = str(error.value)
    for name, message in failures.items():
        assert message == f"{tmp_path / name}: cannot write: File too large", message
    for name in writers:
        assert (tmp_path / name).read_text() == "previous", name
    assert log.read_text() == '{"step": 1}\n' + " " * 1980 + "\n"     # no half line
    assert sorted(os.listdir(tmp_path)) == sorted([*writers, "log.jsonl"])  # no temp, no folder


def test_prepare_on_a_full_disk_names_the_copy_not_the_source_and_leaves_no_half_video(
        dataset, tmp_path):
    """--prepare's encoder writes through PyAV: its EFBIG was reported as the source video's
    damage (BAD ..., exit 1) and left a .partial video behind."""
    dst = tmp_path / "fast"
    before = sorted(data._walk(dataset))
    with file_size_limit(3000):
        with pytest.raises(data.WriteError) as error:
            data.prepare("hmdb51", dataset, str(dst), short_side=32, workers=1)
    assert re.fullmatch(rf"{re.escape(str(dst))}/\S+\.avi: cannot write: File too large",
                        str(error.value)), error.value
    written = data._walk(str(dst))
    assert not [name for name in written if ".partial" in name or name.endswith(".tmp")], written
    assert sorted(data._walk(dataset)) == before                       # the source untouched


# ------------------------------------------------------------------------------------------------
# Variable frame rate is not damage

def write_timed(path, ticks, codec="libx264", rate=30, size=(64, 48)):
    """Frame i shown for ticks[i] / rate s (frame.pts), as phones record: H.264 for MP4/MOV/MKV."""
    options = {"deadline": "realtime", "cpu-used": "8"} if codec.startswith("libvpx") else \
        {"preset": "ultrafast"}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, rate)
        rng, pts = np.random.default_rng(len(ticks)), 0
        for tick in ticks:
            array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base, pts = pts, fractions.Fraction(1, rate), pts + tick
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


PHONE = {  # name: ticks of 1/30 s
    "irregular.mkv": [1, 3, 2, 1, 1, 2, 3, 1] * 4,             # jittery timestamps
    "pause.mkv": [1] * 12 + [40] + [1] * 12,                     # a 1.3 s pause mid-stream
    "rate change.mp4": [1] * 16 + [2] * 16,                      # 30 fps, then 15 fps
    "gap.mov": [1] * 10 + [60] + [1, 2] * 8,                     # a 2 s gap, then jitter
    "pause ünïcode.webm": [1] * 10 + [30] + [1] * 10,
}


def test_phone_videos_with_a_variable_frame_rate_decode_and_the_doctor_passes_them(tmp_path,
                                                                                  capsys):
    root = tmp_path / "hmdb"
    (root / "wave").mkdir(parents=True)
    codecs = {".webm": "libvpx-vp9"}
    for name, ticks in PHONE.items():
        path = write_timed(root / "wave" / name, ticks, codecs.get(os.path.splitext(name)[1],
                                                                     "libx264"))
        assert data.check_video(path) == len(ticks), name
        assert data.video_warning(path) is None, name
        clip = data.VideoDataset([(path, 0)], frames=4, train=True, size=32)[0]["video"]
        assert clip.shape == (4, 3, 32, 32) and torch.isfinite(clip).all(), name
    (root / "splits").mkdir()
    (root / "splits" / "wave_test_split1.txt").write_text(
        "".join(f"{name} {1 + i % 2}\n" for i, name in enumerate(PHONE)))
    os.rename(root / "splits", root / "testTrainMulti_7030_splits")
    assert data.main(["--dataset", "hmdb51", "--data-root", str(root), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "BAD" not in out and f"{len(PHONE)} videos checked, 0 problems" in out, out


@pytest.mark.parametrize("codec, suffix", [("libx264", ".mkv"), ("libvpx-vp9", ".webm")])
def test_a_cluster_the_demuxer_skipped_is_damage_a_hole_it_cannot_explain_a_warning(
        tmp_path, codec, suffix, monkeypatch, capsys):
    """Matroska/WebM: zeros over a stretch in the middle of a 10 s video of 1 s clusters; the
    demuxer resyncs at the next cluster, leaving a hole in time where it skipped bytes."""
    good = write_timed(tmp_path / f"good{suffix}", [1] * 300, codec, size=(16, 16))
    raw = open(good, "rb").read()
    a, b = len(raw) // 2, len(raw) // 2 + len(raw) // 20
    damaged = tmp_path / f"damaged{suffix}"
    damaged.write_bytes(raw[:a] + bytes(b - a) + raw[b:])
    with pytest.raises(data.VideoError) as error:
        data.check_video(str(damaged))
    message = str(error.value)
    assert message.startswith(f"{damaged}: no frames from ") and "skipped" in message, message
    assert "truncated or damaged" in message and "\n" not in message
    # the same hole in a file whose packet positions are unknown: nothing proves damage
    pause = write_timed(tmp_path / f"pause{suffix}", [1] * 10 + [40] + [1] * 10, codec)
    monkeypatch.setattr(data, "_demuxed_layout", lambda path, index: (None, None))
    assert data.check_video(pause) == 21
    warning = data.video_warning(pause)
    assert warning.startswith(f"{pause}: no frames from 0.37 s to 1.67 s"), warning
