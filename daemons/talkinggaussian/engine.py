"""TalkingGaussian: a talking head of one subject, driven by speech, as a warm daemon.

Upstream: github.com/Fictionarry/TalkingGaussian at commit
9bd34f732e30cd94c0a9a087a125d2dda228e258 (ECCV 2024; Python 3.7, torch
1.12.1, CUDA 11.3), a checkout on disk with its submodules and CUDA
extensions built. See README.md for what to download and where.

One daemon serves one subject (a preprocessed dataset directory and a trained
model directory). load() reads, once:

- the fused checkpoint (chkpnt_fuse_latest.pth: the face and mouth Gaussians
  and their motion networks) and the model's saved arguments (cfg_args);
- a slim list of cameras from the dataset (poses, expression action units;
  each frame's background composite is read when it is rendered);
- the audio feature extractor: HuBERT from a local directory, or DeepSpeech
  where the model was trained on it.

Operations:

- render(audio, start_frame=0): speech (WAV/FLAC/OGG bytes) -> an mp4 of the
  subject speaking it, with the audio; progress per frame; streamed as
  fragmented-mp4 segments when the client iterates partial chunks;
- train(subject, video=None, au_csv=None, audio_extractor=None,
  overwrite=False): upstream's preprocessing and its three training stages
  (mouth, face, fuse) as subprocesses, with progress per stage and step,
  cancellable; the dataset goes to <train_dir>/data/<subject>, the model to
  <train_dir>/models/<subject>.

The upstream objects are built in exactly one place, _build_model(); the rest
of the engine uses them through upstream's own interface (Camera,
render_motion, render_motion_mouth, GaussianModel's tensors, the motion
networks), so tests replace that one method with stand-ins. Likewise every
command the training job runs comes from _stage_command().

Imports here are the standard library and modelhost only: torch, numpy and
upstream come in when a method needs them, so preflight() runs anywhere.
Python 3.7.

Its length (about 900 lines): one engine against one upstream interface (render and
its streaming, tiers); dataset reading, video, audio features and training are in
their own modules already.
"""

import importlib.util
import inspect
import os
import re
import shutil
import sys
import tempfile
import threading

from modelhost.daemons.engine import BadArguments, operation
from modelhost.daemons.torch_tiers import TorchEngine

from .training import OPENFACE, STAGE_CHECKPOINTS, TEETH_MASK, TRAIN_FUSE, TrainingJob

UPSTREAM = "github.com/Fictionarry/TalkingGaussian"
UPSTREAM_COMMIT = "9bd34f732e30cd94c0a9a087a125d2dda228e258"

# Files of the checkout that the renderer imports, directly or not (relative to it).
CHECKOUT_FILES = (
    "gaussian_renderer/__init__.py",
    "scene/__init__.py",
    "scene/cameras.py",
    "scene/dataset_readers.py",
    "scene/gaussian_model.py",
    "scene/motion_net.py",
    "arguments/__init__.py",
    "utils/audio_utils.py",
    "utils/camera_utils.py",
    "utils/general_utils.py",
    "utils/graphics_utils.py",
    "utils/sh_utils.py",
    "utils/system_utils.py",
    "encoding.py",
    "gridencoder/__init__.py",
    "gridencoder/grid.py",
)
# What a preprocessed dataset holds that rendering reads.
DATASET_FILES = ("transforms_{split}.json", "bc.jpg", "au.csv")
DATASET_DIRS = ("torso_imgs",)
HUBERT_FILES = ("config.json", "preprocessor_config.json")
HUBERT_WEIGHTS = ("pytorch_model.bin", "model.safetensors")
DEEPSPEECH_DEFAULT = os.path.join("~", ".tensorflow", "models", "deepspeech-0_1_0-b90017e8.pb")

# Weights the preprocessing scripts load from fixed places in the checkout.
PREPROCESS_WEIGHTS = (
    ("data_utils/face_parsing/79999_iter.pth", "the face-parsing model (scripts/prepare.sh)"),
    ("data_utils/face_tracking/3DMM/exp_info.npy", "3DMM data (scripts/prepare.sh)"),
    ("data_utils/face_tracking/3DMM/keys_info.npy", "3DMM data (scripts/prepare.sh)"),
    ("data_utils/face_tracking/3DMM/sub_mesh.obj", "3DMM data (scripts/prepare.sh)"),
    ("data_utils/face_tracking/3DMM/topology_info.npy", "3DMM data (scripts/prepare.sh)"),
    ("data_utils/face_tracking/3DMM/3DMM_info.npy",
     "the Basel Face Model, converted: copy 01_MorphableModel.mat into that directory and run "
     "`python convert_BFM.py` in data_utils/face_tracking"),
)
TEETH_WEIGHTS = ("data_utils/easyportrait/fpn-fp-512.pth",
                 "EasyPortrait's segmentation model (see upstream's README)")

AUDIO_EXTRACTORS = ("hubert", "deepspeech")  # as in audio.EXTRACTORS (numpy-free here)
SUBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
GAUSSIAN_TENSORS = ("_xyz", "_features_dc", "_features_rest", "_identity", "_scaling",
                    "_rotation", "_opacity", "max_radii2D", "xyz_gradient_accum", "denom")
MAX_START_FRAME = 10 ** 9
KNOWN_OPTIONS = ("checkout", "data_dir", "model_dir", "subject", "audio_extractor", "hubert_dir",
                 "deepspeech_pb", "checkpoint", "cameras", "camera_order", "dilate", "ffmpeg",
                 "video_codec", "crf", "segment_s", "max_audio_s", "work_dir", "train_dir",
                 "openface", "train_env", "device")


def _default_work_dir(name):
    root = os.environ.get("MODELHOST_STATE_DIR")
    if not root:
        xdg = os.environ.get("XDG_STATE_HOME")
        root = os.path.join(xdg, "modelhost") if xdg else os.path.join(
            "~", ".local", "state", "modelhost")
    return os.path.abspath(os.path.expanduser(os.path.join(root, "talkinggaussian", name)))


def _path(value, name):
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("talkinggaussian: option {} must be a path, not {!r}".format(name, value))
    return os.path.abspath(os.path.expanduser(value))


def _module_found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _extension_built(package, extension):
    """Whether `package` (top level) is installed with its compiled `extension` module."""
    try:
        spec = importlib.util.find_spec(package)  # a top-level name: nothing is imported
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if extension is None:
        return True
    for location in spec.submodule_search_locations or []:
        try:
            names = os.listdir(location)
        except OSError:
            continue
        if any(n.startswith(extension + ".") and n.endswith((".so", ".pyd")) for n in names):
            return True
    return False


class UpstreamModel(object):
    """What the engine uses of upstream, built by TalkingGaussianEngine._build_model().

    - render_face(camera, gaussians, motion_net, pipe, background, frame_idx=...)
      and render_mouth(...): upstream's render_motion / render_motion_mouth,
      each returning {"render": [3, H, W], "alpha": [1, H, W], ...};
    - camera_class: upstream's scene.cameras.Camera;
    - gaussians, gaussians_mouth: GaussianModel (their tensors in GAUSSIAN_TENSORS);
    - motion_net, motion_net_mouth: MotionNetwork, MouthMotionNetwork (torch modules);
    - pipe: the PipelineParams values; background: the rasterizer's colour [3];
    - audio_encoder: HubertFeatures or DeepSpeechFeatures (.extract(speech), .to(device)).

    A trainer daemon (no model directory) has only the audio encoder.
    """

    def __init__(self, audio_encoder, device, render_face=None, render_mouth=None,
                 camera_class=None, gaussians=None, gaussians_mouth=None, motion_net=None,
                 motion_net_mouth=None, pipe=None, background=None):
        self.render_face = render_face
        self.render_mouth = render_mouth
        self.camera_class = camera_class
        self.gaussians = gaussians
        self.gaussians_mouth = gaussians_mouth
        self.motion_net = motion_net
        self.motion_net_mouth = motion_net_mouth
        self.pipe = pipe
        self.background = background
        self.audio_encoder = audio_encoder
        self.device = device

    @property
    def renders(self):
        return self.gaussians is not None

    def to(self, device):
        """Every tensor to `device` (the engine's tiers: offload, onload); returns self."""
        for gaussians in (self.gaussians, self.gaussians_mouth):
            if gaussians is None:
                continue
            for name in GAUSSIAN_TENSORS:
                tensor = getattr(gaussians, name, None)
                if tensor is not None and hasattr(tensor, "to"):
                    setattr(gaussians, name, tensor.detach().to(device))
        for name in ("motion_net", "motion_net_mouth", "background"):
            module = getattr(self, name)
            if module is not None:
                setattr(self, name, module.to(device))
        if self.audio_encoder is not None:
            self.audio_encoder = self.audio_encoder.to(device)
        self.device = str(device)
        return self

    def gaussian_counts(self):
        counts = {}
        for name in ("gaussians", "gaussians_mouth"):
            xyz = getattr(getattr(self, name), "_xyz", None)
            if xyz is not None:
                counts[name] = int(xyz.shape[0])
        return counts

    def close(self):
        close = getattr(self.audio_encoder, "close", None)
        if close is not None:
            close()


class TalkingGaussianEngine(TorchEngine):
    """One subject's talking head: render(audio) -> mp4; train(subject, video) -> a model."""

    # The bundle of upstream objects; its .to() moves the Gaussians' tensors, the motion
    # networks and the audio encoder, so TorchEngine's offload/onload/unload apply.
    torch_module_attributes = ("model",)

    # Compiled modules upstream imports: (package, compiled module in it, source in checkout).
    EXTENSIONS = (
        ("diff_gaussian_rasterization", "_C", "submodules/diff-gaussian-rasterization"),
        ("simple_knn", "_C", "submodules/simple-knn"),
        ("_gridencoder", None, "gridencoder"),
    )
    # Python packages of the venv: (module, what to install); per audio extractor below.
    # (scene/__init__.py imports the dataset reader, hence pandas and tqdm.)
    RUNTIME_PACKAGES = (("torch", "torch==1.12.1+cu113"), ("numpy", "numpy"),
                        ("PIL", "pillow"), ("plyfile", "plyfile==0.8.1"), ("pandas", "pandas"),
                        ("tqdm", "tqdm"), ("soundfile", "soundfile"), ("scipy", "scipy"))
    EXTRACTOR_PACKAGES = {"hubert": (("transformers", "transformers==4.30.2"),),
                          "deepspeech": (("tensorflow", "tensorflow-gpu==2.8.0"),
                                         ("python_speech_features",
                                          "python_speech_features==0.6"))}
    TRAINING_PACKAGES = (("cv2", "opencv-python"), ("face_alignment", "face_alignment"),
                         ("sklearn", "scikit-learn"), ("pytorch3d", "pytorch3d"),
                         ("mmseg", "mmsegmentation (the checkout's data_utils/easyportrait)"),
                         ("mmcv", "mmcv-full==1.7.1"), ("lpips", "lpips"),
                         ("tensorboard", "tensorboard"), ("pandas", "pandas"))

    def __init__(self, checkout, data_dir=None, model_dir=None, subject=None,
                 audio_extractor=None, hubert_dir=None, deepspeech_pb=None,
                 checkpoint="chkpnt_fuse_latest.pth", cameras="train", camera_order="pingpong",
                 dilate=False, ffmpeg=None, video_codec=None, crf=20, segment_s=1.0,
                 max_audio_s=600, work_dir=None, train_dir=None, openface=None,
                 train_env=None, **options):
        unknown = sorted(set(options) - {"device"})
        if unknown:
            raise ValueError("talkinggaussian: unknown option{} {}; known: {}".format(
                "s" if len(unknown) > 1 else "", ", ".join(unknown), ", ".join(KNOWN_OPTIONS)))
        super(TalkingGaussianEngine, self).__init__(**options)
        problems = self.option_problems(dict(
            checkout=checkout, data_dir=data_dir, model_dir=model_dir, subject=subject,
            audio_extractor=audio_extractor, cameras=cameras, camera_order=camera_order,
            crf=crf, segment_s=segment_s, max_audio_s=max_audio_s, train_env=train_env,
            dilate=dilate))
        if problems:
            raise ValueError("talkinggaussian: " + "; ".join(problems))
        self.checkout = _path(checkout, "checkout")
        self.data_dir = _path(data_dir, "data_dir")
        self.model_dir = _path(model_dir, "model_dir")
        self.subject = subject or (os.path.basename(self.data_dir) if self.data_dir else None)
        self.configured_extractor = audio_extractor
        self.audio_extractor = audio_extractor or ("hubert" if self.model_dir is None else None)
        self.hubert_dir = _path(hubert_dir, "hubert_dir")
        self.deepspeech_pb = _path(deepspeech_pb or DEEPSPEECH_DEFAULT, "deepspeech_pb")
        self.checkpoint = checkpoint
        self.camera_split = cameras
        self.camera_order = camera_order
        self.dilate = bool(dilate)
        self.ffmpeg_option = ffmpeg
        self.video_codec = video_codec
        self.crf = int(crf)
        self.segment_s = float(segment_s)
        self.max_audio_s = float(max_audio_s)
        self.work_dir = _path(work_dir, "work_dir") or _default_work_dir(
            self.subject or "trainer")
        self.train_dir = _path(train_dir, "train_dir") or os.path.join(self.work_dir, "train")
        self.openface = _path(openface, "openface")
        self.train_env = dict(train_env or {})
        self.model = None  # UpstreamModel while loaded
        self.saved_arguments = {}
        self.cameras = []
        self.backgrounds = None
        self.ffmpeg = None
        self.codec = None
        self.loads = 0
        self._render_lock = threading.Lock()  # one frame on the device at a time
        self._audio_lock = threading.Lock()  # the audio encoder is shared by render and train
        self._training = threading.Lock()  # one training job at a time

    # --- configuration checks ---------------------------------------------------

    @staticmethod
    def option_problems(options):
        """Bad option names and values (types, choices), one line each."""
        from .dataset import TRANSFORMS

        problems = []
        unknown = sorted(set(options) - set(KNOWN_OPTIONS))
        if unknown:
            problems.append("unknown option{} {}; known: {}".format(
                "s" if len(unknown) > 1 else "", ", ".join(unknown), ", ".join(KNOWN_OPTIONS)))
        if not isinstance(options.get("checkout"), str) or not options["checkout"].strip():
            problems.append("option checkout must be the path of the TalkingGaussian checkout")
        if (options.get("data_dir") is None) != (options.get("model_dir") is None):
            problems.append("options data_dir and model_dir go together: a subject's dataset "
                            "and its trained model (leave both out for a daemon that only "
                            "trains)")
        subject = options.get("subject")
        if subject is not None and (not isinstance(subject, str)
                                    or not SUBJECT_NAME.match(subject)):
            problems.append("option subject must be a name of letters, digits, '.', '_' or "
                            "'-', not {!r}".format(subject))
        extractor = options.get("audio_extractor")
        if extractor is not None and extractor not in AUDIO_EXTRACTORS:
            problems.append("option audio_extractor must be one of {}, not {!r}".format(
                ", ".join(AUDIO_EXTRACTORS), extractor))
        if options.get("cameras", "train") not in TRANSFORMS:
            problems.append("option cameras must be one of {}, not {!r}".format(
                ", ".join(sorted(TRANSFORMS)), options.get("cameras")))
        if options.get("camera_order", "pingpong") not in ("pingpong", "loop"):
            problems.append("option camera_order must be pingpong or loop, not {!r}".format(
                options.get("camera_order")))
        for name, low, high in (("crf", 0, 51), ("segment_s", 0.04, 60), ("max_audio_s", 1, 36000)):
            value = options.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not low <= value <= high:
                problems.append("option {} must be a number from {} to {}, not {!r}".format(
                    name, low, high, value))
        env = options.get("train_env")
        if env is not None and (not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            problems.append("option train_env must map variable names to strings")
        if not isinstance(options.get("dilate", False), bool):
            problems.append("option dilate must be true or false")
        return problems

    @classmethod
    def preflight(cls, options):
        """What keeps this daemon from loading here: one line per missing thing, with its path."""
        problems = cls.option_problems(options)
        if problems:
            return problems
        checkout = _path(options["checkout"], "checkout")
        problems += cls._checkout_problems(checkout)
        data_dir = _path(options.get("data_dir"), "data_dir")
        model_dir = _path(options.get("model_dir"), "model_dir")
        extractor = options.get("audio_extractor")
        if data_dir is not None:
            problems += cls._dataset_problems(data_dir, options.get("cameras", "train"))
        if model_dir is not None:
            found, saved = cls._model_problems(model_dir, options.get("checkpoint")
                                               or "chkpnt_fuse_latest.pth")
            problems += found
            trained_on = saved.get("audio_extractor")
            if extractor and trained_on and extractor != trained_on:
                problems.append("option audio_extractor is {} but the model in {} was trained "
                                "on {} features (its cfg_args); leave the option out".format(
                                    extractor, model_dir, trained_on))
            extractor = extractor or trained_on
        extractor = extractor or "hubert"
        problems += cls._extractor_problems(extractor, options)
        problems += cls._package_problems(checkout, extractor)
        try:
            from .video import FfmpegError, find_ffmpeg
            find_ffmpeg(options.get("ffmpeg"))
        except FfmpegError as exc:
            problems.append(str(exc))
        return problems

    @classmethod
    def _checkout_problems(cls, checkout):
        if not os.path.isdir(checkout):
            return ["TalkingGaussian checkout not found at {}: expected `git clone --recursive "
                    "https://{}` checked out at {} (see the daemon's README)".format(
                        checkout, UPSTREAM, UPSTREAM_COMMIT[:7])]
        return ["{} is missing: the checkout at {} is incomplete; expected {}'s {} at commit "
                "{}".format(os.path.join(checkout, name), checkout, UPSTREAM, name,
                            UPSTREAM_COMMIT[:7])
                for name in CHECKOUT_FILES if not os.path.isfile(os.path.join(checkout, name))]

    @staticmethod
    def _dataset_problems(data_dir, split):
        if not os.path.isdir(data_dir):
            return ["subject dataset not found at {}: expected the directory upstream's "
                    "data_utils/process.py made of the subject's video (transforms_train.json, "
                    "transforms_val.json, bc.jpg, torso_imgs/, au.csv)".format(data_dir)]
        problems = []
        for name in DATASET_FILES:
            name = name.format(split=split)
            path = os.path.join(data_dir, name)
            if not os.path.isfile(path):
                what = {"au.csv": "OpenFace's FeatureExtraction action units of the video "
                                  "(renamed to au.csv)",
                        "bc.jpg": "the background image (process.py task 5)"}.get(
                    name, "the cameras (process.py task 9)")
                problems.append("{} is missing: expected {}".format(path, what))
        for name in DATASET_DIRS:
            path = os.path.join(data_dir, name)
            if not os.path.isdir(path):
                problems.append("{} is missing: expected a directory of <img_id>.png torso "
                                "images (process.py task 6)".format(path))
        return problems

    @staticmethod
    def _model_problems(model_dir, checkpoint):
        from .dataset import DatasetError, SAVED_ARGUMENTS, read_saved_arguments

        if not os.path.isdir(model_dir):
            return ["trained model not found at {}: expected the directory upstream's "
                    "train_fuse.py wrote ({} and {})".format(model_dir, checkpoint,
                                                             SAVED_ARGUMENTS)], {}
        problems, saved = [], {}
        if not os.path.isfile(os.path.join(model_dir, checkpoint)):
            problems.append("{} is missing: expected the fused checkpoint that train_fuse.py "
                            "writes (face and mouth Gaussians with their motion networks)".format(
                                os.path.join(model_dir, checkpoint)))
        if not os.path.isfile(os.path.join(model_dir, SAVED_ARGUMENTS)):
            problems.append("{} is missing: expected the arguments upstream's training saved "
                            "(Namespace(...))".format(os.path.join(model_dir, SAVED_ARGUMENTS)))
        else:
            try:
                saved = read_saved_arguments(model_dir)
            except DatasetError as exc:
                problems.append(str(exc))
        return problems, saved

    @classmethod
    def _extractor_problems(cls, extractor, options):
        if extractor == "hubert":
            hubert_dir = _path(options.get("hubert_dir"), "hubert_dir")
            if hubert_dir is None:
                return ["option hubert_dir is not set: it must name a local directory holding "
                        "facebook/hubert-large-ls960-ft (config.json, preprocessor_config.json, "
                        "pytorch_model.bin); nothing is downloaded at load"]
            if not os.path.isdir(hubert_dir):
                return ["HuBERT weights not found at {}: expected a local copy of "
                        "facebook/hubert-large-ls960-ft (config.json, preprocessor_config.json, "
                        "pytorch_model.bin)".format(hubert_dir)]
            problems = ["{} is missing: expected facebook/hubert-large-ls960-ft's {}".format(
                os.path.join(hubert_dir, name), name)
                for name in HUBERT_FILES if not os.path.isfile(os.path.join(hubert_dir, name))]
            if not any(os.path.isfile(os.path.join(hubert_dir, n)) for n in HUBERT_WEIGHTS):
                problems.append("{} is missing: expected facebook/hubert-large-ls960-ft's "
                                "weights (or model.safetensors)".format(
                                    os.path.join(hubert_dir, HUBERT_WEIGHTS[0])))
            return problems
        pb = _path(options.get("deepspeech_pb") or DEEPSPEECH_DEFAULT, "deepspeech_pb")
        if not os.path.isfile(pb):
            return ["DeepSpeech graph not found at {}: expected deepspeech-0_1_0-b90017e8.pb "
                    "(DeepSpeech 0.1.0, from github.com/osmr/deepspeech_features release "
                    "v0.0.1)".format(pb)]
        return []

    @classmethod
    def _package_problems(cls, checkout, extractor):
        python = sys.executable
        problems = []
        for package, extension, source in cls.EXTENSIONS:
            if not _extension_built(package, extension):
                name = package + ("." + extension if extension else "")
                problems.append(
                    "CUDA extension {} is not built for {}: build it on a machine with an "
                    "NVIDIA GPU and the CUDA toolkit (nvcc) with `{} -m pip install "
                    "--no-build-isolation {}`".format(name, python, python,
                                                      os.path.join(checkout, source)))
        for module, requirement in cls.RUNTIME_PACKAGES + cls.EXTRACTOR_PACKAGES.get(
                extractor, ()):
            if not _module_found(module):
                problems.append("Python package {} is not installed for {}: install {} (the "
                                "daemon's requirements.txt)".format(module, python, requirement))
        return problems

    # --- lifecycle ------------------------------------------------------------------

    def load(self):
        from .dataset import Backgrounds, read_cameras, read_saved_arguments
        from .video import choose_codec, find_ffmpeg

        if self.model is not None:
            return
        for directory in (self.work_dir, self._scratch_dir()):
            if not os.path.isdir(directory):
                os.makedirs(directory)
        saved, cameras, backgrounds = {}, [], None
        if self.model_dir is not None:
            saved = read_saved_arguments(self.model_dir)
            trained_on = saved.get("audio_extractor", "deepspeech")  # upstream's default
            if self.configured_extractor and self.configured_extractor != trained_on:
                raise RuntimeError("talkinggaussian: the model in {} was trained on {} "
                                   "features, but option audio_extractor is {}".format(
                                       self.model_dir, trained_on, self.configured_extractor))
            self.audio_extractor = trained_on
            cameras = read_cameras(self.data_dir, self.camera_split)
            backgrounds = Backgrounds(self.data_dir)
            backgrounds.base()  # fail now, not at the first call, on an unreadable bc.jpg
        ffmpeg = find_ffmpeg(self.ffmpeg_option)
        codec = choose_codec(ffmpeg, self.video_codec)
        self.saved_arguments = saved
        self.cameras = cameras
        self.backgrounds = backgrounds
        self.ffmpeg, self.codec = ffmpeg, codec
        self.model = self._build_model()
        self.loads += 1

    def unload(self):
        model = self.model
        if model is not None:
            model.close()
        self.cameras = []
        self.backgrounds = None
        super(TalkingGaussianEngine, self).unload()

    def describe(self):
        facts = {"engine": "talkinggaussian", "upstream": "{}@{}".format(
                     UPSTREAM, UPSTREAM_COMMIT[:7]),
                 "subject": self.subject, "audio_extractor": self.audio_extractor,
                 "train_dir": self.train_dir}
        model = self.model
        if model is not None:
            facts["device"] = model.device
            facts.update(model.gaussian_counts())
        if self.cameras:
            facts["cameras"] = len(self.cameras)
            facts["resolution"] = "{}x{}".format(self.cameras[0].width, self.cameras[0].height)
        if self.ffmpeg:
            facts["ffmpeg"] = self.ffmpeg
            facts["codec"] = self.codec
        return facts

    # --- upstream, in one place ---------------------------------------------------------

    def _import_upstream(self):
        """Put the checkout first on sys.path (upstream imports `scene`, `utils`, ... by name)."""
        if self.checkout not in sys.path:
            sys.path.insert(0, self.checkout)

    def _build_model(self):
        """The upstream objects, loaded on self.device: an UpstreamModel."""
        import torch
        from argparse import Namespace

        self._import_upstream()
        audio_encoder = self._build_audio_encoder()
        if self.model_dir is None:
            return UpstreamModel(audio_encoder, self.device).to(self.device)
        from gaussian_renderer import render_motion, render_motion_mouth
        from scene.cameras import Camera
        from scene.gaussian_model import GaussianModel
        from scene.motion_net import MotionNetwork, MouthMotionNetwork

        arguments = dict(self.saved_arguments, audio_extractor=self.audio_extractor)
        arguments.setdefault("sh_degree", 2)
        args = Namespace(**arguments)
        path = os.path.join(self.model_dir, self.checkpoint)
        load_options = {"map_location": "cpu"}
        if "weights_only" in inspect.signature(torch.load).parameters:
            load_options["weights_only"] = False  # torch >= 2.6 would refuse the optimizer state
        face, face_motion, mouth, mouth_motion = torch.load(path, **load_options)
        gaussians = GaussianModel(args.sh_degree)
        gaussians.restore(face, None)  # None: no optimizer (its saved state is dropped)
        gaussians_mouth = GaussianModel(args.sh_degree)
        gaussians_mouth.restore(mouth, None)
        motion_net = MotionNetwork(args=args)
        motion_net.load_state_dict(face_motion, strict=False)  # as synthesize_fuse.py
        motion_net_mouth = MouthMotionNetwork(args=args)
        motion_net_mouth.load_state_dict(mouth_motion, strict=False)
        del face, face_motion, mouth, mouth_motion
        colour = [1.0, 1.0, 1.0] if arguments.get("white_background") else [0.0, 0.0, 0.0]
        model = UpstreamModel(
            audio_encoder, self.device, render_face=render_motion,
            render_mouth=render_motion_mouth, camera_class=Camera, gaussians=gaussians,
            gaussians_mouth=gaussians_mouth, motion_net=motion_net.eval(),
            motion_net_mouth=motion_net_mouth.eval(),
            pipe=Namespace(convert_SHs_python=False, compute_cov3D_python=False, debug=False),
            background=torch.tensor(colour, dtype=torch.float32))
        return model.to(self.device)

    def _build_audio_encoder(self):
        from .audio import DeepSpeechFeatures, HubertFeatures

        if self.audio_extractor == "deepspeech":
            return DeepSpeechFeatures.from_frozen_graph(self.deepspeech_pb)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local: never the hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import HubertModel, Wav2Vec2FeatureExtractor

        processor = Wav2Vec2FeatureExtractor.from_pretrained(self.hubert_dir,
                                                             local_files_only=True)
        model = HubertModel.from_pretrained(self.hubert_dir, local_files_only=True).eval()
        return HubertFeatures(model, processor, self.device)

    # --- render ----------------------------------------------------------------------

    @operation
    def render(self, ctx, audio: bytes, start_frame: int = 0):
        """Speech -> mp4 of the subject saying it (see README.md for the shapes)."""
        from .audio import AudioError, decode_audio, model_layout, speech_16k

        model = self._require_renderer()
        if isinstance(start_frame, bool) or not isinstance(start_frame, int) \
                or not 0 <= start_frame <= MAX_START_FRAME:
            raise BadArguments("render: start_frame must be a whole number from 0 to {}, "
                               "not {!r}".format(MAX_START_FRAME, start_frame))
        try:
            samples, rate = decode_audio(audio, self.max_audio_s)
        except AudioError as exc:
            raise BadArguments("render: {}".format(exc))
        ctx.check_cancelled()
        seconds = samples.shape[0] / float(rate)
        ctx.progress(0.0, "features", "{} features of {:.2f} s of audio".format(
            self.audio_extractor, seconds))
        features = model_layout(self._extract(model, speech_16k(samples, rate)))
        if features.shape[0] == 0:
            raise BadArguments("render: the audio lasts {:.3f} s, too short for one video "
                               "frame (at least 0.05 s)".format(seconds))
        ctx.check_cancelled()
        workdir = tempfile.mkdtemp(prefix="render-", dir=self._scratch_dir())
        try:
            audio_path = os.path.join(workdir, "audio.wav")
            self._write_wav(audio_path, samples, rate)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        camera = self.cameras[0]
        summary = {"format": "mp4", "fps": self._fps(), "frames": int(features.shape[0]),
                   "width": camera.width, "height": camera.height,
                   "duration_s": features.shape[0] / float(self._fps()),
                   "audio_s": seconds, "sample_rate": rate, "codec": self.codec,
                   "subject": self.subject, "start_frame": start_frame,
                   "next_frame": start_frame + int(features.shape[0])}
        if getattr(ctx, "stream", False):
            return self._render_stream(ctx, model, features, start_frame, workdir, audio_path,
                                       summary)
        return self._render_whole(ctx, model, features, start_frame, workdir, audio_path,
                                  summary)

    def _render_whole(self, ctx, model, features, start_frame, workdir, audio_path, summary):
        output = os.path.join(workdir, "video.mp4")
        encoder = None
        try:
            encoder = self._encoder(workdir, audio_path, output)
            for frame in self._frames(ctx, model, features, start_frame):
                encoder.write(frame)
            ctx.progress(1.0, "encode", "finishing the mp4")
            encoder.finish()
            with open(output, "rb") as handle:
                video = handle.read()
        except BaseException:
            if encoder is not None:
                encoder.abort()
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return dict(summary, video=video, bytes=len(video))

    def _render_stream(self, ctx, model, features, start_frame, workdir, audio_path, summary):
        def generate():
            encoder = None
            index = [0]
            size = [0]

            def chunk(kind, data, frames):
                index[0] += 1
                size[0] += len(data)
                return {"data": data, "kind": kind, "index": index[0] - 1, "frames": frames}

            try:
                encoder = self._encoder(workdir, audio_path, None)
                rendered = 0
                for frame in self._frames(ctx, model, features, start_frame):
                    encoder.write(frame)
                    rendered += 1
                    for kind, data in encoder.segments():
                        ctx.check_cancelled()
                        yield chunk(kind, data, rendered)
                # ffmpeg may hand over its first segment only here, after the last
                # frame: a cancel then must stop the stream too, not only between frames.
                for kind, data in encoder.finish():
                    ctx.check_cancelled()
                    yield chunk(kind, data, rendered)
            except BaseException:  # cancelled, failed, or the client went away (close())
                if encoder is not None:
                    encoder.abort()
                raise
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            return dict(summary, format="fmp4", segments=index[0], bytes=size[0])

        return generate()

    def _frames(self, ctx, model, features, start_frame):
        """Rendered frames, uint8 [H, W, 3], one per feature frame; progress after each."""
        from .audio import feature_window
        from .dataset import camera_sequence

        count = features.shape[0]
        order = camera_sequence(count, start_frame, len(self.cameras), self.camera_order)
        for i in range(count):
            ctx.check_cancelled()
            frame = self._render_frame(model, self.cameras[order[i]], feature_window(features, i))
            yield frame
            ctx.progress((i + 1) / float(count), "render", "frame {} of {}".format(i + 1, count))

    def _render_frame(self, model, camera, window):
        """One frame as synthesize_fuse.py composes it: face over mouth over background."""
        import torch

        view = self._view(model, camera, window)
        with self._render_lock, torch.no_grad():
            face = model.render_face(view, model.gaussians, model.motion_net, model.pipe,
                                     model.background, frame_idx=0)
            mouth = model.render_mouth(view, model.gaussians_mouth, model.motion_net_mouth,
                                       model.pipe, model.background, frame_idx=0)
            alpha_mouth = mouth["alpha"]
            if self.dilate:
                alpha_mouth = torch.nn.functional.max_pool2d(alpha_mouth[None], kernel_size=13,
                                                             stride=1, padding=6)[0]
            background = view.background.to(model.device).float() / 255.0
            mouth_image = mouth["render"] + background * (1.0 - alpha_mouth)
            image = face["render"] + mouth_image * (1.0 - face["alpha"])
            rgb = (image[0:3].clamp(0, 1).permute(1, 2, 0) * 255).to(torch.uint8).cpu()
        return rgb.numpy()

    def _view(self, model, camera, window):
        """Upstream's Camera for one frame: pose, background, and the audio window it speaks."""
        import torch

        background = torch.from_numpy(self.backgrounds(camera.img_id)).permute(2, 0, 1)
        talking = {"img_id": camera.img_id, "auds": torch.from_numpy(window),
                   "au_exp": torch.from_numpy(camera.expression)}
        view = model.camera_class(
            colmap_id=camera.index, R=camera.R, T=camera.T, FoVx=camera.fovx, FoVy=camera.fovy,
            image=None, gt_alpha_mask=None, background=background, talking_dict=talking,
            image_name=str(camera.img_id),
            image_path=os.path.join(self.data_dir, "gt_imgs", "{}.jpg".format(camera.img_id)),
            uid=camera.index, data_device=model.device)
        # Upstream's Camera takes its size from the ground-truth image, which is not loaded.
        view.image_width, view.image_height = camera.width, camera.height
        return view

    def _extract(self, model, speech):
        """Audio features in upstream's .npy layout ([frames, 2, 1024] or [frames, 16, 29])."""
        with self._audio_lock:
            return model.audio_encoder.extract(speech)

    def _encoder(self, workdir, audio_path, output):
        from .video import VideoEncoder

        fps = self._fps()
        camera = self.cameras[0]
        return VideoEncoder(self.ffmpeg, camera.width, camera.height, fps, audio_path, workdir,
                            output=output, codec=self.codec, crf=self.crf,
                            segment_frames=max(1, int(round(self.segment_s * fps))))

    @staticmethod
    def _fps():
        from .audio import FPS
        return FPS

    @staticmethod
    def _write_wav(path, samples, rate):
        import soundfile
        soundfile.write(path, samples, rate, subtype="PCM_16")

    def _require_model(self):
        model = self.model
        if model is None:
            raise RuntimeError("talkinggaussian: the engine is not loaded; load() first")
        return model

    def _require_renderer(self):
        model = self._require_model()
        if not model.renders:
            raise BadArguments("render: this daemon has no trained model (options data_dir "
                               "and model_dir are not set); it only trains. Configure a daemon "
                               "with the subject's data_dir and model_dir to render")
        return model

    def _scratch_dir(self):
        return os.path.join(self.work_dir, "tmp")

    # --- train -------------------------------------------------------------------------

    @operation
    def train(self, ctx, subject, video=None, au_csv=None, audio_extractor=None,
              overwrite=False):
        """Preprocess a video and train the subject's model (see README.md): a long job."""
        model = self._require_model()
        if not isinstance(subject, str) or not SUBJECT_NAME.match(subject):
            raise BadArguments("train: subject must be a name of 1 to 64 letters, digits, '.', "
                               "'_' or '-' starting with a letter or digit, not {!r}".format(
                                   subject))
        for name, value in (("video", video), ("au_csv", au_csv)):
            if value is not None and (not isinstance(value, (bytes, bytearray, memoryview))
                                      or len(value) == 0):
                raise BadArguments("train: {} must be the bytes of a file, not {}".format(
                    name, "empty bytes" if isinstance(value, (bytes, bytearray, memoryview))
                    else type(value).__name__))
        extractor = audio_extractor or self.audio_extractor or "hubert"
        if extractor not in AUDIO_EXTRACTORS:
            raise BadArguments("train: audio_extractor must be one of {}, not {!r}".format(
                ", ".join(AUDIO_EXTRACTORS), extractor))
        if extractor != getattr(model.audio_encoder, "name", extractor):
            raise BadArguments("train: this daemon extracts {} features; train on {} with a "
                               "daemon configured for it".format(
                                   model.audio_encoder.name, extractor))
        if not isinstance(overwrite, bool):
            raise BadArguments("train: overwrite must be true or false")
        job = TrainingJob(self, subject, video is not None, au_csv is not None, extractor)
        if os.path.isfile(os.path.join(job.model_dir, STAGE_CHECKPOINTS[TRAIN_FUSE])) \
                and not overwrite:
            raise BadArguments("train: {} is trained already ({}); pass overwrite=true to train "
                               "it again (the old model is kept as {})".format(
                                   subject, job.model_dir, job.model_dir + ".previous"))
        if video is None and job.source is None and not os.path.isdir(job.data_dir):
            raise BadArguments("train: no video, and no dataset for {} at {}: send the "
                               "subject's video (25 fps, 1-5 min, every frame showing the "
                               "talking person)".format(subject, job.data_dir))
        problems = self.training_problems(job)
        if problems:
            raise RuntimeError("train: cannot train {} here: {}".format(subject,
                                                                        "; ".join(problems)))
        if not self._training.acquire(False):
            raise BadArguments("train: a training job is running in this daemon already; "
                               "wait for it, or cancel it")
        try:
            return job.run(ctx, model, video, au_csv)
        finally:
            self._training.release()

    def training_problems(self, job):
        """What the training job lacks here: one line per missing script, weight or package."""
        problems = []
        for script in job.scripts():
            if script == OPENFACE:
                if not self.openface or not os.path.isfile(self.openface):
                    problems.append("OpenFace's FeatureExtraction not found at {}: set option "
                                    "openface to it, or send au_csv".format(self.openface))
                continue
            path = os.path.join(self.checkout, script)
            if not os.path.isfile(path):
                problems.append("{} is missing: expected upstream's {} in the checkout".format(
                    path, script))
        weights = (PREPROCESS_WEIGHTS if job.preprocess else ()) + (
            (TEETH_WEIGHTS,) if TEETH_MASK in job.scripts() else ())
        for relative, what in weights:
            path = os.path.join(self.checkout, relative)
            if not os.path.isfile(path):
                problems.append("{} is missing: expected {}".format(path, what))
        if not job.preprocess and not job.au_csv and job.au_missing():
            problems.append("{} is missing: send au_csv (OpenFace's FeatureExtraction output "
                            "for the subject's video), or send the video with option openface "
                            "set".format(os.path.join(job.source or job.data_dir, "au.csv")))
        for module, requirement in self.TRAINING_PACKAGES:
            if not _module_found(module):
                problems.append("Python package {} is not installed for {}: install {} (the "
                                "daemon's requirements-train.txt)".format(
                                    module, sys.executable, requirement))
        return problems

    def _stage_command(self, script, arguments):
        """The argv of one step of the training job: upstream's script (or OpenFace's tool).

        The one place commands come from, so that tests run stand-in scripts.
        """
        if script == OPENFACE:
            return [self.openface] + list(arguments)
        return [sys.executable, os.path.join(self.checkout, script)] + list(arguments)

    def _stage_environment(self, extra_pythonpath=None):
        """The scripts' environment: the venv's python and an `ffmpeg` first on PATH."""
        env = dict(os.environ)
        env.update(self.train_env)
        directories = [os.path.dirname(sys.executable)]
        ffmpeg = self.ffmpeg
        if ffmpeg and os.path.basename(ffmpeg) != "ffmpeg":
            # process.py runs `ffmpeg` by name; imageio-ffmpeg's binary is named otherwise.
            link_dir = os.path.join(self.work_dir, "bin")
            link = os.path.join(link_dir, "ffmpeg")
            if not os.path.isdir(link_dir):
                os.makedirs(link_dir)
            if os.path.realpath(link) != os.path.realpath(ffmpeg):
                if os.path.lexists(link):
                    os.unlink(link)
                os.symlink(ffmpeg, link)
            directories.append(link_dir)
        elif ffmpeg:
            directories.append(os.path.dirname(ffmpeg))
        env["PATH"] = os.pathsep.join(directories + [env.get("PATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        if extra_pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                [extra_pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env
