"""A subject's dataset and model directory, read the slim way: only what rendering needs.

Upstream's Scene (scene/dataset_readers.py at 9bd34f7) preloads, for every
camera, the ground-truth image, the torso image, the face-parsing masks and
the teeth masks (its README: "about N x 32GB RAM for about N x 5k frames"),
and writes points3d.ply into the dataset and input.ply / cameras.json into
the model directory. A renderer needs none of that. This module reads:

- transforms_<split>.json: focal_len and, per frame, img_id and the
  camera-to-world transform_matrix (OpenGL axes), turned into upstream's
  R (world-to-camera rotation, stored transposed) and T;
- au.csv (OpenFace): per img_id, the six action units the face motion
  network reads (AU01, AU04, AU05, AU06, AU07 and AU45 clipped to [0, 2]);
- bc.jpg and torso_imgs/<img_id>.png: the background of a frame is the torso
  image composited over bc.jpg by its alpha, made when the frame is rendered;
- cfg_args in the model directory: upstream's saved arguments (the text of an
  argparse Namespace), parsed without eval.

Nothing here writes to the dataset or the model directory. Runs on Python 3.7;
numpy and Pillow are imported when a function needs them, so that the
engine's preflight can read cfg_args with the standard library alone.
"""

import ast
import collections
import csv
import json
import math
import os
import threading

TRANSFORMS = {"train": "transforms_train.json", "val": "transforms_val.json"}
BACKGROUND = "bc.jpg"
TORSO_DIR = "torso_imgs"
AU_CSV = "au.csv"
SAVED_ARGUMENTS = "cfg_args"
FUSED_CHECKPOINT = "chkpnt_fuse_latest.pth"
# The action units of au_exp, in upstream's order; the last one (AU45, blink) is clipped.
EXPRESSION_UNITS = (1, 4, 5, 6, 7, 45)
BLINK_MAX = 2.0


class DatasetError(RuntimeError):
    """A dataset or model directory that is not what upstream writes; the message names the path."""


def read_saved_arguments(model_dir):
    """cfg_args -> dict, e.g. {'sh_degree': 2, 'audio_extractor': 'hubert', ...}."""
    path = os.path.join(model_dir, SAVED_ARGUMENTS)
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError as exc:
        raise DatasetError("cannot read the model's saved arguments {}: {}".format(path, exc))
    try:
        call = ast.parse(text.strip(), mode="eval").body
        if not isinstance(call, ast.Call) or getattr(call.func, "id", None) != "Namespace":
            raise ValueError("not a Namespace(...)")
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (SyntaxError, ValueError) as exc:
        raise DatasetError("{} is not upstream's saved arguments (Namespace(key=value, ...)): "
                           "{}".format(path, exc))


def focal_to_fov(focal, pixels):
    return 2.0 * math.atan(pixels / (2.0 * focal))


def camera_pose(transform_matrix):
    """Camera-to-world (OpenGL axes) -> (R, T) as upstream's Camera takes them."""
    import numpy as np

    c2w = np.array(transform_matrix, dtype=np.float64)
    if c2w.shape != (4, 4):
        raise ValueError("transform_matrix must be 4x4, not {}".format(c2w.shape))
    c2w[:3, 1:3] *= -1  # OpenGL/Blender (Y up, Z back) -> COLMAP (Y down, Z forward)
    w2c = np.linalg.inv(c2w)
    return np.transpose(w2c[:3, :3]), w2c[:3, 3]


class SubjectCamera(object):
    """One frame's camera: pose, field of view, expression; its background is read on demand."""

    __slots__ = ("index", "img_id", "R", "T", "fovx", "fovy", "width", "height", "expression")

    # R, T: float64 as upstream's reader leaves them (its Camera builds float32 matrices).

    def __init__(self, index, img_id, R, T, fovx, fovy, width, height, expression):
        self.index = index
        self.img_id = img_id
        self.R = R
        self.T = T
        self.fovx = fovx
        self.fovy = fovy
        self.width = width
        self.height = height
        self.expression = expression  # float32 [6]: au_exp


def read_image(path, mode):
    """An image file as a uint8 array (mode "RGB" or "RGBA")."""
    import numpy as np

    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert(mode))


def read_expressions(path):
    """au.csv -> float32 [rows, 6]: AU01, AU04, AU05, AU06, AU07, AU45 (clipped), row = img_id."""
    import numpy as np

    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise DatasetError("cannot read the action units {}: {}".format(path, exc))
    if not rows:
        raise DatasetError("{} is empty; it must be OpenFace's FeatureExtraction CSV".format(path))
    header = [name.strip() for name in rows[0]]
    columns = []
    for unit in EXPRESSION_UNITS:
        name = "AU{:02d}_r".format(unit)
        if name not in header:
            raise DatasetError("{} has no column {}; it must be OpenFace's FeatureExtraction "
                               "output with action units (-aus)".format(path, name))
        columns.append(header.index(name))
    try:
        values = np.array([[float(row[c]) for c in columns] for row in rows[1:] if row],
                          dtype=np.float32)
    except (ValueError, IndexError) as exc:
        raise DatasetError("{} holds a malformed row: {}".format(path, exc))
    if values.size:
        values[:, -1] = np.clip(values[:, -1], 0.0, BLINK_MAX)
    return values.reshape(-1, len(EXPRESSION_UNITS))


def read_cameras(data_dir, split="train"):
    """The subject's cameras of one split, in upstream's order (list of SubjectCamera)."""
    if split not in TRANSFORMS:
        raise ValueError("cameras must be one of {}, not {!r}".format(
            ", ".join(sorted(TRANSFORMS)), split))
    path = os.path.join(data_dir, TRANSFORMS[split])
    try:
        with open(path) as handle:
            contents = json.load(handle)
        focal = float(contents["focal_len"])
        frames = contents["frames"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError("cannot read the cameras {}: {}: {}".format(
            path, type(exc).__name__, exc))
    if not frames:
        raise DatasetError("{} lists no frames".format(path))
    background = os.path.join(data_dir, BACKGROUND)
    try:
        from PIL import Image
        with Image.open(background) as image:
            width, height = image.size
    except (OSError, ImportError) as exc:
        raise DatasetError("cannot read the background image {}: {}".format(background, exc))
    expressions = read_expressions(os.path.join(data_dir, AU_CSV))
    fovx, fovy = focal_to_fov(focal, width), focal_to_fov(focal, height)
    cameras = []
    for index, frame in enumerate(frames):
        try:
            img_id = int(frame["img_id"])
            R, T = camera_pose(frame["transform_matrix"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError("frame {} of {} is malformed: {}".format(index, path, exc))
        if not 0 <= img_id < len(expressions):
            raise DatasetError("frame {} of {} has img_id {}, but {} has {} rows".format(
                index, path, img_id, os.path.join(data_dir, AU_CSV), len(expressions)))
        cameras.append(SubjectCamera(index, img_id, R, T,
                                     fovx, fovy, width, height, expressions[img_id].copy()))
    return cameras


class Backgrounds(object):
    """Per-frame background composites (torso over bc.jpg), uint8 [H, W, 3], a few cached."""

    def __init__(self, data_dir, cache_size=64):
        self.data_dir = data_dir
        self.cache_size = cache_size
        self._base = None
        self._cache = collections.OrderedDict()
        self._lock = threading.Lock()

    def base(self):
        if self._base is None:
            self._base = read_image(os.path.join(self.data_dir, BACKGROUND), "RGB")
        return self._base

    def __call__(self, img_id):
        with self._lock:
            found = self._cache.get(img_id)
            if found is not None:
                self._cache.move_to_end(img_id)
                return found
        composite = self._compose(img_id)
        with self._lock:
            self._cache[img_id] = composite
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return composite

    def _compose(self, img_id):
        import numpy as np

        base = self.base()
        path = os.path.join(self.data_dir, TORSO_DIR, "{}.png".format(img_id))
        try:
            torso = read_image(path, "RGBA").astype(np.float32)
        except OSError as exc:
            raise DatasetError("cannot read the torso image {}: {}".format(path, exc))
        if torso.shape[:2] != base.shape[:2]:
            raise DatasetError("{} is {}x{}, but {} is {}x{}".format(
                path, torso.shape[1], torso.shape[0],
                os.path.join(self.data_dir, BACKGROUND), base.shape[1], base.shape[0]))
        alpha = torso[..., 3:] / 255.0
        composite = torso[..., :3] * alpha + base.astype(np.float32) * (1.0 - alpha)
        return composite.astype(np.uint8)


def camera_sequence(count, start, cameras, mode="pingpong"):
    """Camera indices for `count` video frames from camera `start`.

    Upstream stops at the last camera (the video is as long as the shorter of
    audio and camera track); a daemon takes audio of any length, so the track
    runs back and forth (pingpong) or starts again (loop).
    """
    if cameras <= 0:
        raise ValueError("no cameras")
    indices = []
    period = 2 * cameras - 2 if cameras > 1 else 1
    for i in range(count):
        position = start + i
        if mode == "loop" or cameras == 1:
            indices.append(position % cameras)
        else:
            phase = position % period
            indices.append(phase if phase < cameras else period - phase)
    return indices
