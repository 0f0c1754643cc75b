"""The training job's machinery: upstream's scripts as subprocesses, their progress, a working copy.

Upstream (9bd34f7) trains a subject in steps that are each a script run from
the checkout: data_utils/process.py (preprocessing, tasks 1..9),
data_utils/easyportrait/create_teeth_mask.py, then train_mouth.py,
train_face.py and train_fuse.py. They report progress as tqdm bars
(`Training progress:  12%|#2   | 6000/50000 [...]`, redrawn with carriage
returns) and, in the face tracker, lines like `3 of 12 done`. They start
grandchildren of their own (process.py runs its tasks through os.system), so
each step runs in its own process group, and a cancelled step is ended by
signalling the whole group.

Upstream also writes into the dataset directory while it builds a Scene
(points3d.ply, always) and while it prepares one (teeth_mask/, au.csv,
aud_*.npy). A dataset that is read-only (a shared, prepared one) is trained
through a WorkingCopy: a writable directory of symbolic links to the
dataset's entries, with real copies of the files upstream rewrites.

TrainingJob is one train() call: its directories, its steps and their
progress.

Standard library only; runs on Python 3.7.
"""

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import deque

from modelhost.errors import Cancelled

# Scripts of the training job, relative to the checkout, and OpenFace's tool.
PROCESS = "data_utils/process.py"
TEETH_MASK = "data_utils/easyportrait/create_teeth_mask.py"
TRAIN_MOUTH = "train_mouth.py"
TRAIN_FACE = "train_face.py"
TRAIN_FUSE = "train_fuse.py"
OPENFACE = "FeatureExtraction"
# process.py's tasks, their names, the share of the whole job, and what each leaves
# in the dataset (process.py runs its tasks through os.system and never fails itself).
PREPROCESS_TASKS = (
    (1, "extract audio", 0.005, ("aud.wav",)),
    (3, "extract images", 0.01, ("ori_imgs/*.jpg",)),
    (4, "face parsing", 0.03, ("parsing/*.png",)),
    (5, "background", 0.01, ("bc.jpg",)),
    (6, "torso and ground truth", 0.03, ("gt_imgs/*.jpg", "torso_imgs/*.png")),
    (7, "landmarks", 0.04, ("ori_imgs/*.lms",)),
    (8, "face tracking", 0.07, ("track_params.pt",)),
    (9, "transforms", 0.005, ("transforms_train.json", "transforms_val.json")),
)
STAGE_WEIGHTS = {"au": 0.01, "teeth": 0.04, "audio": 0.01, "mouth": 0.30, "face": 0.35,
                 "fuse": 0.09}
# The training arguments of upstream's scripts/train_xx.sh.
TRAIN_ARGUMENTS = {
    TRAIN_MOUTH: [],
    TRAIN_FACE: ["--init_num", "2000", "--densify_grad_threshold", "0.0005"],
    TRAIN_FUSE: ["--opacity_lr", "0.001"],
}
STAGE_CHECKPOINTS = {TRAIN_MOUTH: "chkpnt_mouth_latest.pth", TRAIN_FACE: "chkpnt_face_latest.pth",
                     TRAIN_FUSE: "chkpnt_fuse_latest.pth"}

PROGRESS_INTERVAL_S = 0.25  # the least time between two progress events of a training step

# Files upstream writes into a dataset while it trains on it: copied, never linked.
REWRITTEN_FILES = ("points3d.ply",)

# tqdm: " 12%|#2        | 6000/50000 [02:00<14:40, 50.0it/s, Loss=0.01]"
_TQDM = re.compile(r"(\d+)/(\d+)\s*\[")
# face_tracker.py: "3 of 12 done"
_OF_DONE = re.compile(r"^\s*(\d+) of (\d+) done")
TAIL_LINES = 40


class StageFailed(RuntimeError):
    """A step of the training job failed; the message names it and quotes its output."""


def parse_progress(line):
    """(done, total) from one line of a script's output, or None."""
    match = _TQDM.search(line) or _OF_DONE.search(line)
    if match is None:
        return None
    done, total = int(match.group(1)), int(match.group(2))
    if total <= 0:
        return None
    return min(done, total), total


def split_lines(buffer, data):
    """Feed bytes; complete lines (split at \\n and at tqdm's \\r) out, the rest kept."""
    buffer.extend(data)
    lines = []
    start = 0
    for i, byte in enumerate(buffer):
        if byte in (10, 13):  # \n, \r
            if i > start:
                lines.append(bytes(buffer[start:i]).decode("utf-8", "replace"))
            start = i + 1
    del buffer[:start]
    return lines


def end_process_group(process, grace_s=5.0):
    """SIGTERM to the process's whole group, SIGKILL after grace_s; waits for the leader."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except OSError:  # the group is gone already
            pass
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure no grandchild of its group survives it.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        return
    raise RuntimeError("process {} did not end after SIGKILL".format(process.pid))


def run_step(command, cwd, env, on_progress, is_cancelled, log_path=None, poll_s=0.1,
             label=None):
    """Run one script to its end; on_progress(done, total, line) for each progress line.

    Raises Cancelled (after ending its process group) when is_cancelled()
    turns true, StageFailed when it exits with a non-zero status.
    """
    label = label or " ".join(os.path.basename(part) for part in command[:2])
    tail = deque(maxlen=TAIL_LINES)
    log = open(log_path, "ab") if log_path else None
    try:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    except OSError as exc:
        if log:
            log.close()
        raise StageFailed("{}: cannot start `{}`: {}".format(label, " ".join(command), exc))
    lines = deque()
    lock = threading.Lock()

    def read():
        buffer = bytearray()
        while True:
            data = process.stdout.read1(1 << 14) if hasattr(process.stdout, "read1") \
                else process.stdout.read(1 << 14)
            if not data:
                break
            if log:
                log.write(data)
                log.flush()
            found = split_lines(buffer, data)
            with lock:
                lines.extend(found)
        if buffer:
            with lock:
                lines.append(bytes(buffer).decode("utf-8", "replace"))

    reader = threading.Thread(target=read, name="train-step-reader")
    reader.daemon = True
    reader.start()

    def drain():
        with lock:
            found = list(lines)
            lines.clear()
        latest = None
        for line in found:
            tail.append(line)
            progress = parse_progress(line)
            if progress is not None:
                latest = (progress, line)
        if latest is not None:  # a burst of redraws: only where it got to counts
            on_progress(latest[0][0], latest[0][1], latest[1].strip())

    try:
        while process.poll() is None:
            if is_cancelled():
                end_process_group(process)
                raise Cancelled("the training was cancelled during {}".format(label))
            drain()
            try:
                process.wait(poll_s)  # returns as soon as the step ends
            except subprocess.TimeoutExpired:
                pass
        reader.join(30)
        drain()
    except BaseException:
        if process.poll() is None:  # an error in on_progress, or KeyboardInterrupt
            end_process_group(process)
        raise
    finally:
        # A step's own children (os.system) must not outlive it either.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        if process.stdout:
            process.stdout.close()
        if log:
            log.close()
    if process.returncode != 0:
        raise StageFailed("{} failed with status {}; its last output:\n{}".format(
            label, process.returncode, "\n".join(tail)))
    return list(tail)


class WorkingCopy(object):
    """A writable stand-in for a dataset directory that upstream would write into.

    prepare() fills `path` with a symbolic link per entry of `source`, except
    the files in REWRITTEN_FILES, which are copied; upstream then writes its
    files (points3d.ply, teeth_mask/, au.csv, ...) next to the links and
    never touches `source`. Entries already in `path` that are real files or
    directories (written by an earlier run) are kept.
    """

    def __init__(self, source, path):
        self.source = os.path.abspath(source)
        self.path = os.path.abspath(path)

    def prepare(self):
        if self.path == self.source:
            raise ValueError("a working copy of {} cannot be the directory itself".format(
                self.source))
        if not os.path.isdir(self.source):
            raise FileNotFoundError("dataset not found at {}".format(self.source))
        if not os.path.isdir(self.path):
            os.makedirs(self.path)
        for name in sorted(os.listdir(self.source)):
            source = os.path.join(self.source, name)
            target = os.path.join(self.path, name)
            if os.path.islink(target):
                if os.readlink(target) == source:
                    continue
                os.unlink(target)
            elif os.path.exists(target):
                continue  # written here before: upstream's own output wins
            if name in REWRITTEN_FILES and os.path.isfile(source):
                shutil.copyfile(source, target)
            else:
                os.symlink(source, target)
        return self.path

    @staticmethod
    def writable(directory):
        """Whether files can be created in `directory` (it exists and is writable)."""
        return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)


def _glob_count(directory, pattern):
    import glob
    return len(glob.glob(os.path.join(directory, pattern)))


class TrainingJob(object):
    """One train() call: its directories, its steps, and their progress."""

    def __init__(self, engine, subject, preprocess, au_csv, extractor):
        self.engine = engine
        self.subject = subject
        self.preprocess = preprocess  # a video was sent: run upstream's preprocessing
        self.au_csv = au_csv
        self.extractor = extractor
        # Upstream's layout (data/<ID>, output/<project>) under train_dir.
        self.data_dir = os.path.join(engine.train_dir, "data", subject)
        self.model_dir = os.path.join(engine.train_dir, "models", subject)
        self.partial_dir = self.model_dir + ".partial"
        self.log_dir = os.path.join(engine.train_dir, "logs", subject)
        self.openface_dir = os.path.join(engine.train_dir, "openface", subject)
        # Without a video, a configured dataset of this very subject is trained through a
        # working copy (upstream writes into the dataset it trains on).
        self.source = engine.data_dir if (not preprocess and subject == engine.subject
                                          and engine.data_dir) else None
        if self.source is not None and os.path.abspath(self.source) == self.data_dir:
            self.source = None  # the daemon serves a dataset an earlier job made: it is ours
        self.steps_done = []
        self._done_weight = 0.0
        self._last_report = 0.0
        # Progress is a share of the steps that run: preprocessing only with a video.
        self._total_weight = sum(STAGE_WEIGHTS.values()) + (
            sum(task[2] for task in PREPROCESS_TASKS) if preprocess else 0.0)

    def au_missing(self):
        return not os.path.isfile(os.path.join(self.source or self.data_dir, "au.csv"))

    def scripts(self):
        """What the job runs: OpenFace only on a sent video that came without au_csv."""
        scripts = []
        if self.preprocess:
            scripts.append(PROCESS)
            if not self.au_csv:
                scripts.append(OPENFACE)
        scripts += [TEETH_MASK, TRAIN_MOUTH, TRAIN_FACE, TRAIN_FUSE]
        return scripts

    # --- the run ------------------------------------------------------------------

    def run(self, ctx, model, video, au_csv):
        started = time.time()
        for directory in (os.path.dirname(self.data_dir), os.path.dirname(self.model_dir),
                          self.log_dir):
            if not os.path.isdir(directory):
                os.makedirs(directory)
        try:
            ctx.progress(0.0, "prepare", "preparing {}".format(self.data_dir))
            self._prepare_data(video)
            if os.path.isdir(self.partial_dir):
                shutil.rmtree(self.partial_dir)
            os.makedirs(self.partial_dir)
            if self.preprocess:
                for task, name, weight, outputs in PREPROCESS_TASKS:
                    self._script_step(ctx, "preprocess", weight, PROCESS,
                                      [self._video_path(), "--task", str(task)],
                                      outputs=outputs,
                                      detail="task {}: {}".format(task, name))
            self._au_step(ctx, au_csv)
            self._teeth_step(ctx)
            self._audio_step(ctx, model)
            for stage, script in (("mouth", TRAIN_MOUTH), ("face", TRAIN_FACE),
                                  ("fuse", TRAIN_FUSE)):
                arguments = ["-s", self.data_dir, "-m", self.partial_dir, "--audio_extractor",
                             self.extractor] + TRAIN_ARGUMENTS[script]
                self._script_step(ctx, stage, STAGE_WEIGHTS[stage], script, arguments,
                                  model_outputs=(STAGE_CHECKPOINTS[script],))
            if not os.path.isfile(os.path.join(self.partial_dir, "cfg_args")):
                raise StageFailed("fuse: {} is missing after training".format(
                    os.path.join(self.partial_dir, "cfg_args")))
            self._publish()
        except BaseException as exc:
            shutil.rmtree(self.partial_dir, ignore_errors=True)
            if isinstance(exc, StageFailed):
                raise RuntimeError("train: {}\n(the dataset stays at {}; train again without a "
                                   "video to reuse it; logs in {})".format(
                                       exc, self.data_dir, self.log_dir))
            raise
        ctx.progress(1.0, "done", "trained {}".format(self.subject))
        return {"subject": self.subject, "data_dir": self.data_dir,
                "model_dir": self.model_dir, "audio_extractor": self.extractor,
                "seconds": time.time() - started, "steps": self.steps_done,
                "logs": self.log_dir}

    def _prepare_data(self, video):
        if video is not None:
            if os.path.lexists(self.data_dir):
                shutil.rmtree(self.data_dir)  # derived from the last video; links only, if a copy
            os.makedirs(self.data_dir)
            with open(self._video_path(), "wb") as handle:
                handle.write(bytes(video))
        elif self.source is not None:
            WorkingCopy(self.source, self.data_dir).prepare()

    def _video_path(self):
        # Upstream's layout: data/<ID>/<ID>.mp4; process.py writes next to it.
        return os.path.join(self.data_dir, self.subject + ".mp4")

    def _publish(self):
        previous = self.model_dir + ".previous"
        if os.path.isdir(self.model_dir):
            if os.path.isdir(previous):
                shutil.rmtree(previous)
            os.rename(self.model_dir, previous)
        os.rename(self.partial_dir, self.model_dir)

    # --- steps ----------------------------------------------------------------------

    def _report(self, ctx, stage, weight, fraction, message, force=False):
        now = time.monotonic()
        if not force and now - self._last_report < PROGRESS_INTERVAL_S:
            return
        self._last_report = now
        ctx.progress(min(1.0, (self._done_weight + weight * fraction) / self._total_weight),
                     stage, message)

    def _finish(self, ctx, stage, weight, started, detail=None, skipped=False):
        self._done_weight += weight
        self.steps_done.append({"stage": stage, "detail": detail, "skipped": skipped,
                                "seconds": round(time.time() - started, 3)})
        self._report(ctx, stage, 0.0, 0.0, "{}{}: {}".format(
            stage, " ({})".format(detail) if detail else "", "skipped" if skipped else "done"),
            force=True)

    def _script_step(self, ctx, stage, weight, script, arguments, outputs=(), model_outputs=(),
                     detail=None, env=None):
        engine = self.engine
        ctx.check_cancelled()
        started = time.time()
        label = "{}{}".format(stage, " " + detail if detail else "")
        self._report(ctx, stage, weight, 0.0, "{}: starting {}".format(label, script), force=True)

        def on_progress(done, total, line):
            self._report(ctx, stage, weight, done / float(total),
                         "{}: {}/{}".format(label, done, total), force=done == total)

        log_path = os.path.join(self.log_dir, "{}.log".format(re.sub(r"\W+", "-", label)))
        run_step(engine._stage_command(script, arguments), cwd=engine.checkout,
                 env=env or engine._stage_environment(), on_progress=on_progress,
                 is_cancelled=lambda: ctx.cancelled, log_path=log_path,
                 label="{} ({})".format(label, script))
        for pattern in outputs:
            if _glob_count(self.data_dir, pattern) == 0:
                raise StageFailed("{}: {} finished, but {} is missing (see {})".format(
                    label, script, os.path.join(self.data_dir, pattern), log_path))
        for name in model_outputs:
            if not os.path.isfile(os.path.join(self.partial_dir, name)):
                raise StageFailed("{}: {} finished, but {} is missing (see {})".format(
                    label, script, os.path.join(self.partial_dir, name), log_path))
        self._finish(ctx, stage, weight, started, detail)

    def _au_step(self, ctx, au_csv):
        started = time.time()
        target = os.path.join(self.data_dir, "au.csv")
        weight = STAGE_WEIGHTS["au"]
        if au_csv is not None:
            if os.path.islink(target):
                os.unlink(target)
            with open(target, "wb") as handle:
                handle.write(bytes(au_csv))
            self._finish(ctx, "au", weight, started, "from au_csv")
        elif OPENFACE in self.scripts():
            out_dir = self.openface_dir
            if os.path.isdir(out_dir):
                shutil.rmtree(out_dir)
            video = self._video_path()
            self._script_step(ctx, "au", weight, OPENFACE,
                              ["-f", video, "-out_dir", out_dir, "-aus"])
            produced = os.path.join(out_dir, os.path.splitext(os.path.basename(video))[0]
                                    + ".csv")
            if not os.path.isfile(produced):
                raise StageFailed("au: OpenFace finished, but {} is missing".format(produced))
            if os.path.islink(target):
                os.unlink(target)
            shutil.copyfile(produced, target)
        else:
            self._finish(ctx, "au", weight, started, "au.csv present", skipped=True)

    def _teeth_step(self, ctx):
        started = time.time()
        images = _glob_count(self.data_dir, "ori_imgs/*.jpg")
        masks = _glob_count(self.data_dir, "teeth_mask/*.npy")
        if images and masks >= images:
            self._finish(ctx, "teeth", STAGE_WEIGHTS["teeth"], started, "teeth masks present",
                         skipped=True)
            return
        teeth_dir = os.path.join(self.data_dir, "teeth_mask")
        if os.path.islink(teeth_dir):
            os.unlink(teeth_dir)  # an incomplete set in a read-only dataset: make our own
        env = self.engine._stage_environment(
            extra_pythonpath=os.path.join(self.engine.checkout, "data_utils", "easyportrait"))
        self._script_step(ctx, "teeth", STAGE_WEIGHTS["teeth"], TEETH_MASK, [self.data_dir],
                          outputs=("teeth_mask/*.npy",), env=env)

    def _audio_step(self, ctx, model):
        import numpy as np

        from .audio import FEATURE_FILES, speech_16k

        started = time.time()
        weight = STAGE_WEIGHTS["audio"]
        target = os.path.join(self.data_dir, FEATURE_FILES[self.extractor])
        if not self.preprocess and os.path.isfile(target):
            self._finish(ctx, "audio", weight, started, FEATURE_FILES[self.extractor] +
                         " present", skipped=True)
            return
        ctx.check_cancelled()
        wav = os.path.join(self.data_dir, "aud.wav")
        self._report(ctx, "audio", weight, 0.0, "audio: {} features of {}".format(
            self.extractor, wav), force=True)
        try:
            import soundfile
            samples, rate = soundfile.read(wav, dtype="float32", always_2d=True)
        except Exception as exc:
            raise StageFailed("audio: cannot read {}: {}".format(wav, exc))
        features = self.engine._extract(model, speech_16k(samples, rate))
        if os.path.islink(target):
            os.unlink(target)
        np.save(target, features)
        self._finish(ctx, "audio", weight, started, "{} {}".format(
            FEATURE_FILES[self.extractor], list(features.shape)))
