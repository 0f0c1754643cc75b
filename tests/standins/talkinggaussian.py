"""Stand-ins for upstream TalkingGaussian (Fictionarry/TalkingGaussian@9bd34f7): no CUDA or weights.

Two kinds of stand-in, both for tests only:

1. Objects with upstream's interfaces, which a test subclass of
   TalkingGaussianEngine returns from `_build_model()` (build_model below), so
   that everything else in the engine (audio decoding, feature windows,
   cameras, backgrounds, compositing, ffmpeg, tiers) runs its own code on a CPU:

   - StandinCamera: upstream's scene.cameras.Camera signature (colmap_id, R, T,
     FoVx, FoVy, image, gt_alpha_mask, background, talking_dict, image_name,
     image_path, uid, trans, scale, data_device); keeps what it was given;
   - StandinGaussians: a GaussianModel's tensors (_xyz, _features_dc, ...);
   - StandinMotionNetwork: a small torch module in place of MotionNetwork /
     MouthMotionNetwork;
   - render_motion / render_motion_mouth: upstream's signatures
     (viewpoint_camera, pc, motion_net, pipe, bg_color, scaling_modifier=1.0,
     frame_idx=None, return_attn=False), returning {"render": [3, H, W],
     "alpha": [1, H, W], ...} at the camera's size, deterministically:
     the face is the top half of the frame, coloured by the camera's uid
     (face_colour); the mouth is a box in the lower half whose grey level is
     the audio feature of the frame itself (mouth_level: the middle of the
     8-frame window); the rest is transparent, so the frame's background shows;
   - StandinHubert / StandinFeatureExtractor: HuBERT's output length (its
     seven convolutions) and the feature extractor's normalization; channel 0
     of each 1024-d state is the RMS of the 400 samples it sees, so loud audio
     opens the stand-in mouth.

2. A command line that plays upstream's scripts for the training job, run as
   `python talkinggaussian.py SCRIPT ARGS...` by the test engine's
   `_stage_command`: data_utils/process.py (tasks 1..9; tasks 1 and 3 run the
   `ffmpeg` found on PATH, as upstream's do), create_teeth_mask.py,
   train_mouth.py / train_face.py / train_fuse.py (argparse with upstream's
   option names; a Scene writes points3d.ply into -s, as upstream's always
   does, and fails on a read-only directory), and OpenFace's FeatureExtraction.
   They print upstream-like output: tqdm bars redrawn with carriage returns.
   Environment knobs: TG_STANDIN_STEPS (iterations per training stage, 40),
   TG_STANDIN_STEP_S (seconds per iteration, 0), TG_STANDIN_PIDS (a file: the
   training scripts start a sleeping grandchild and write both pids there),
   TG_STANDIN_FAIL (a script name that exits with status 1).

Plus builders of the files the engine reads: make_checkout, make_dataset,
make_model, make_hubert_dir.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
FRAME_SIZE = (64, 48)  # width, height: small, and even
HUBERT_CONV = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))
AU_COLUMNS = ["AU01_r", "AU02_r", "AU04_r", "AU05_r", "AU06_r", "AU07_r", "AU09_r", "AU10_r",
              "AU12_r", "AU14_r", "AU15_r", "AU17_r", "AU20_r", "AU23_r", "AU25_r", "AU26_r",
              "AU45_r"]

# --- 1. upstream's objects ----------------------------------------------------------


def _torch():
    import torch
    return torch


def face_colour(uid):
    """The stand-in face's RGB (0..255) for a camera uid."""
    return ((uid * 37) % 200 + 40, 120, (uid * 53) % 200 + 40)


def mouth_level(auds):
    """The stand-in mouth's grey level in [0, 1] from the 8-frame window [8, C, W]."""
    return float(max(0.0, min(1.0, float(auds[4, 0, :].mean()) * 4.0)))


class StandinCamera(object):
    """upstream scene.cameras.Camera's signature; keeps its arguments (no CUDA)."""

    def __init__(self, colmap_id, R, T, FoVx, FoVy, image, gt_alpha_mask, background,
                 talking_dict, image_name, image_path, uid,
                 trans=(0.0, 0.0, 0.0), scale=1.0, data_device="cuda"):
        torch = _torch()
        self.uid = uid
        self.colmap_id = colmap_id
        self.R, self.T = R, T
        self.FoVx, self.FoVy = FoVx, FoVy
        self.image_name, self.image_path = image_name, image_path
        self.talking_dict = talking_dict
        self.data_device = torch.device(data_device)
        self.original_image = None
        if image is not None:
            self.original_image = image.clamp(0, 255).to(self.data_device)
            self.image_width = self.original_image.shape[2]
            self.image_height = self.original_image.shape[1]
        self.background = None if background is None else background.clamp(0, 255).to(
            self.data_device)
        self.trans, self.scale = trans, scale  # unused: upstream's defaults are kept


class StandinGaussians(object):
    """A GaussianModel's tensors for n points (the names upstream's capture() saves)."""

    def __init__(self, n=16, sh_degree=2, seed=0):
        torch = _torch()
        generator = torch.Generator().manual_seed(seed)
        self.max_sh_degree = sh_degree
        self.active_sh_degree = sh_degree
        self._xyz = torch.rand(n, 3, generator=generator) * 0.2 - 0.1
        self._features_dc = torch.zeros(n, 1, 3)
        self._features_rest = torch.zeros(n, (sh_degree + 1) ** 2 - 1, 3)
        self._identity = torch.zeros(n, 1)
        self._scaling = torch.zeros(n, 3)
        self._rotation = torch.zeros(n, 4)
        self._opacity = torch.zeros(n, 1)
        self.max_radii2D = torch.zeros(n)
        self.xyz_gradient_accum = torch.zeros(n, 1)
        self.denom = torch.zeros(n, 1)

    @property
    def get_xyz(self):
        return self._xyz


def _module_class():
    torch = _torch()

    class StandinMotionNetwork(torch.nn.Module):
        """In place of MotionNetwork / MouthMotionNetwork: a module with parameters."""

        def __init__(self, audio_in_dim=1024):
            super(StandinMotionNetwork, self).__init__()
            self.audio_in_dim = audio_in_dim
            self.layer = torch.nn.Linear(audio_in_dim, 3)

        def forward(self, x, a, e=None, c=None):
            return {"d_xyz": torch.zeros_like(x)}

    return StandinMotionNetwork


def StandinMotionNetwork(audio_in_dim=1024):  # noqa: N802 (a class, built when torch is there)
    return _module_class()(audio_in_dim)


def _outputs(viewpoint_camera, pc, rgb, alpha):
    torch = _torch()
    return {"render": rgb, "alpha": alpha, "depth": torch.zeros_like(alpha),
            "viewspace_points": torch.zeros_like(pc.get_xyz),
            "visibility_filter": torch.ones(pc.get_xyz.shape[0], dtype=torch.bool),
            "radii": torch.ones(pc.get_xyz.shape[0]), "motion": {}}


def render_motion(viewpoint_camera, pc, motion_net, pipe, bg_color, scaling_modifier=1.0,
                  frame_idx=None, return_attn=False):
    """upstream gaussian_renderer.render_motion's signature: the face, the top half."""
    torch = _torch()
    height, width = int(viewpoint_camera.image_height), int(viewpoint_camera.image_width)
    device = pc.get_xyz.device
    alpha = torch.zeros(1, height, width, device=device)
    alpha[:, :height // 2] = 1.0
    colour = torch.tensor(face_colour(viewpoint_camera.uid), dtype=torch.float32,
                          device=device) / 255.0
    rgb = colour[:, None, None] * alpha + bg_color[:, None, None].to(device) * (1 - alpha)
    out = _outputs(viewpoint_camera, pc, rgb, alpha)
    out["attn"] = None
    return out


def render_motion_mouth(viewpoint_camera, pc, motion_net, pipe, bg_color, scaling_modifier=1.0,
                        frame_idx=None, return_attn=False):
    """upstream render_motion_mouth's signature: the mouth, a box lit by the audio."""
    torch = _torch()
    height, width = int(viewpoint_camera.image_height), int(viewpoint_camera.image_width)
    device = pc.get_xyz.device
    alpha = torch.zeros(1, height, width, device=device)
    alpha[:, height // 2:height * 3 // 4, width // 4:width * 3 // 4] = 1.0
    level = mouth_level(viewpoint_camera.talking_dict["auds"])
    rgb = torch.full((3, height, width), level, device=device) * alpha \
        + bg_color[:, None, None].to(device) * (1 - alpha)
    return _outputs(viewpoint_camera, pc, rgb, alpha)


class _Hidden(object):
    def __init__(self, last_hidden_state):
        self.last_hidden_state = last_hidden_state


def _hubert_module():
    torch = _torch()

    class StandinHubert(torch.nn.Module):
        """HuBERT's shape: [1, t] samples -> [1, states, 1024]; channel 0 = RMS per state."""

        def __init__(self, dim=1024):
            super(StandinHubert, self).__init__()
            self.dim = dim
            self.scale = torch.nn.Parameter(torch.ones(1))
            self.calls = []

        def forward(self, input_values):
            t = int(input_values.shape[1])
            self.calls.append(t)
            states = t
            for kernel, stride in HUBERT_CONV:
                states = 0 if states < kernel else (states - kernel) // stride + 1
            hidden = torch.zeros(1, states, self.dim, device=input_values.device)
            if states:
                windows = input_values[0].unfold(0, 400, 320)[:states]  # [states, 400]
                hidden[0, :, 0] = windows.pow(2).mean(dim=1).sqrt() * self.scale
                hidden[0, :, 1] = 1.0
            return _Hidden(hidden)

    return StandinHubert


def StandinHubert(dim=1024):  # noqa: N802
    return _hubert_module()(dim)


class _Values(object):
    def __init__(self, input_values):
        self.input_values = input_values


class StandinFeatureExtractor(object):
    """Wav2Vec2FeatureExtractor's call: normalize to zero mean, unit variance."""

    def __call__(self, speech, sampling_rate=None, return_tensors=None):
        import numpy as np
        if sampling_rate != 16000:
            raise ValueError("expected 16 kHz, got {}".format(sampling_rate))
        speech = np.asarray(speech, dtype=np.float32)
        normalized = (speech - speech.mean()) / np.sqrt(speech.var() + 1e-7)
        return _Values(normalized[None])


def build_model(engine, points=16):
    """What TalkingGaussianEngine._build_model returns, made of stand-ins, on engine.device."""
    from modelhost.daemons.talkinggaussian.audio import HubertFeatures
    from modelhost.daemons.talkinggaussian.engine import UpstreamModel

    torch = _torch()
    encoder = HubertFeatures(StandinHubert(), StandinFeatureExtractor(), engine.device)
    if engine.model_dir is None:
        return UpstreamModel(encoder, engine.device).to(engine.device)
    sh_degree = engine.saved_arguments.get("sh_degree", 2)
    model = UpstreamModel(
        encoder, engine.device, render_face=render_motion, render_mouth=render_motion_mouth,
        camera_class=StandinCamera, gaussians=StandinGaussians(points, sh_degree, 0),
        gaussians_mouth=StandinGaussians(points // 2, sh_degree, 1),
        motion_net=StandinMotionNetwork(), motion_net_mouth=StandinMotionNetwork(),
        pipe=argparse.Namespace(convert_SHs_python=False, compute_cov3D_python=False,
                                debug=False),
        background=torch.zeros(3))
    return model.to(engine.device)


# --- builders of the files the engine reads -------------------------------------------


def _touch(path, content=b""):
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    with open(path, "wb") as handle:
        handle.write(content)


def make_checkout(root):
    """A checkout with upstream's file names (empty files), weights included."""
    from modelhost.daemons.talkinggaussian import engine, training

    names = list(engine.CHECKOUT_FILES) + [training.PROCESS, training.TEETH_MASK,
                                           training.TRAIN_MOUTH, training.TRAIN_FACE,
                                           training.TRAIN_FUSE]
    names += [relative for relative, _ in engine.PREPROCESS_WEIGHTS]
    names.append(engine.TEETH_WEIGHTS[0])
    for name in names:
        _touch(os.path.join(root, name))
    return root


def make_hubert_dir(root):
    for name in ("config.json", "preprocessor_config.json", "pytorch_model.bin"):
        _touch(os.path.join(root, name), b"{}")
    return root


def background_image(width, height):
    """bc.jpg's content: a horizontal ramp (smooth, so JPEG keeps it close)."""
    import numpy as np
    ramp = np.linspace(40, 200, width, dtype=np.float32)
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = ramp[None, :].astype(np.uint8)
    image[..., 1] = 90
    image[..., 2] = 160
    return image


def torso_image(img_id, width, height):
    """torso_imgs/<id>.png: an opaque strip at the bottom whose colour follows img_id."""
    import numpy as np
    image = np.zeros((height, width, 4), np.uint8)
    image[height * 7 // 8:, :, :3] = (img_id * 20) % 250
    image[height * 7 // 8:, :, 3] = 255
    return image


def write_au_csv(path, rows, seed=0):
    import numpy as np
    rng = np.random.RandomState(seed)
    header = ["frame", " face_id", " timestamp", " confidence", " success"] + [
        " " + name for name in AU_COLUMNS]
    lines = [",".join(header)]
    for i in range(rows):
        values = [str(i + 1), "0", "{:.3f}".format(i / 25.0), "0.98", "1"]
        values += ["{:.2f}".format(v) for v in rng.uniform(0, 3, len(AU_COLUMNS))]
        lines.append(", ".join(values))
    _touch(path, ("\n".join(lines) + "\n").encode())


def write_wav(path, seconds, rate=16000, loud_from=None):
    """A 220 Hz tone; silent before `loud_from` seconds when given."""
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / float(rate)
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    if loud_from is not None:
        tone[t < loud_from] = 0.0
    soundfile.write(path, tone.astype(np.float32), rate)


def make_dataset(root, frames=12, size=FRAME_SIZE, val=3, training=False):
    """A preprocessed dataset as upstream's process.py leaves it (rendering's files; more when
    `training`: ori_imgs, gt_imgs, parsing, track_params.pt, aud.wav, but no teeth masks and
    no audio features, so that training writes them)."""
    import numpy as np
    from PIL import Image

    width, height = size
    if not os.path.isdir(root):
        os.makedirs(root)
    Image.fromarray(background_image(width, height)).save(os.path.join(root, "bc.jpg"),
                                                          quality=95)
    os.makedirs(os.path.join(root, "torso_imgs"))
    for img_id in range(frames):
        Image.fromarray(torso_image(img_id, width, height)).save(
            os.path.join(root, "torso_imgs", "{}.png".format(img_id)))
    write_au_csv(os.path.join(root, "au.csv"), frames)
    split = frames - val
    for name, ids in (("train", range(split)), ("val", range(split, frames))):
        contents = {"focal_len": 1200.0, "cx": width / 2.0, "cy": height / 2.0, "frames": []}
        for img_id in ids:
            pose = np.eye(4)
            pose[0, 3] = 0.001 * img_id
            pose[2, 3] = -0.5
            contents["frames"].append({"img_id": img_id, "aud_id": img_id,
                                       "transform_matrix": pose.tolist()})
        with open(os.path.join(root, "transforms_{}.json".format(name)), "w") as handle:
            json.dump(contents, handle)
    if training:
        for sub in ("ori_imgs", "gt_imgs", "parsing"):
            os.makedirs(os.path.join(root, sub))
        for img_id in range(frames):
            Image.fromarray(background_image(width, height)).save(
                os.path.join(root, "ori_imgs", "{}.jpg".format(img_id)))
            _touch(os.path.join(root, "ori_imgs", "{}.lms".format(img_id)), b"0 0\n")
        _touch(os.path.join(root, "track_params.pt"), b"standin")
        write_wav(os.path.join(root, "aud.wav"), frames / 25.0)
    return root


def make_model(root, extractor="hubert"):
    """A trained model directory: cfg_args as upstream writes it, and a checkpoint file."""
    if not os.path.isdir(root):
        os.makedirs(root)
    arguments = ("Namespace(audio='', audio_extractor='{}', data_device='cpu', eval=False, "
                 "images='images', init_num=2000, model_path='{}', resolution=-1, "
                 "sh_degree=2, source_path='/data/subject', white_background=False)").format(
                     extractor, root)
    _touch(os.path.join(root, "cfg_args"), arguments.encode())
    _touch(os.path.join(root, "chkpnt_fuse_latest.pth"), b"standin checkpoint")
    return root


# --- 2. upstream's scripts, for the training job ------------------------------------------


def _bar(done, total, description="", postfix=""):
    """One tqdm (ascii) redraw: desc, percent, bar, n/total, [times, postfix]."""
    percent = int(100.0 * done / total) if total else 100
    filled = int(10.0 * done / total) if total else 10
    bar = "#" * filled + " " * (10 - filled)
    return "\r{}{:3d}%|{}| {}/{} [00:00<00:00, 50.00it/s{}]".format(
        description + ": " if description else "", percent, bar, done, total,
        ", " + postfix if postfix else "")


def _progress(total, description="", step_s=0.0, postfix=""):
    sys.stderr.write(_bar(0, total, description, postfix))
    sys.stderr.flush()
    for done in range(1, total + 1):
        if step_s:
            time.sleep(step_s)
        sys.stderr.write(_bar(done, total, description, postfix))
        sys.stderr.flush()
    sys.stderr.write("\n")
    sys.stderr.flush()


def _ffmpeg(arguments):
    """Run `ffmpeg` by name, from PATH, as upstream's process.py does through os.system."""
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"] + arguments
    status = subprocess.call(command)
    if status != 0:
        raise SystemExit("ffmpeg failed: {}".format(" ".join(command)))


def _images(base):
    return sorted(glob.glob(os.path.join(base, "ori_imgs", "*.jpg")),
                  key=lambda p: int(os.path.splitext(os.path.basename(p))[0]))


def _process(argv):
    parser = argparse.ArgumentParser(prog="process.py")
    parser.add_argument("path")
    parser.add_argument("--task", type=int, default=-1)
    parser.add_argument("--asr", default="deepspeech")
    opt = parser.parse_args(argv)
    base = os.path.dirname(opt.path)
    for sub in ("ori_imgs", "parsing", "gt_imgs", "torso_imgs"):
        if not os.path.isdir(os.path.join(base, sub)):
            os.makedirs(os.path.join(base, sub))
    task = opt.task
    if task == 1:
        print("[INFO] ===== extract audio from {} to {} =====".format(
            opt.path, os.path.join(base, "aud.wav")))
        _ffmpeg(["-i", opt.path, "-f", "wav", "-ar", "16000", os.path.join(base, "aud.wav")])
    elif task == 3:
        print("[INFO] ===== extract images =====")
        _ffmpeg(["-i", opt.path, "-vf", "fps=25", "-qmin", "1", "-q:v", "1", "-start_number",
                 "0", os.path.join(base, "ori_imgs", "%d.jpg")])
    elif task in (4, 5, 6, 7, 9):
        images = _images(base)
        _progress(len(images), step_s=float(os.environ.get("TG_STANDIN_STEP_S", "0")) / 4)
        for image in images:
            img_id = os.path.splitext(os.path.basename(image))[0]
            if task == 4:
                _touch(os.path.join(base, "parsing", img_id + ".png"))
            elif task == 6:
                _touch(os.path.join(base, "gt_imgs", img_id + ".jpg"))
                _touch(os.path.join(base, "torso_imgs", img_id + ".png"))
            elif task == 7:
                _touch(os.path.join(base, "ori_imgs", img_id + ".lms"), b"0 0\n")
        if task == 5:
            _touch(os.path.join(base, "bc.jpg"))
        if task == 9:
            for name in ("train", "val"):
                _touch(os.path.join(base, "transforms_{}.json".format(name)), b"{}")
    elif task == 8:
        count = len(_images(base))
        print("[INFO] ===== perform face tracking =====")
        batches = max(1, (count + 3) // 4)
        for i in range(batches):
            print("{} of {} done".format(i + 1, batches))
        _touch(os.path.join(base, "track_params.pt"), b"standin")
    print("[INFO] ===== done =====")


def _teeth(argv):
    import numpy as np
    parser = argparse.ArgumentParser(prog="create_teeth_mask.py")
    parser.add_argument("datset")
    args = parser.parse_args(argv)
    if "easyportrait" not in os.environ.get("PYTHONPATH", ""):
        raise SystemExit("ModuleNotFoundError: No module named 'mmseg' (PYTHONPATH lacks "
                         "data_utils/easyportrait)")
    out = os.path.join(args.datset, "teeth_mask")
    if not os.path.isdir(out):
        os.makedirs(out)
    images = _images(args.datset)
    _progress(len(images))
    for image in images:
        np.save(os.path.join(out, os.path.splitext(os.path.basename(image))[0] + ".npy"),
                np.zeros((2, 2), dtype=np.bool_))


def _grandchild_pids():
    path = os.environ.get("TG_STANDIN_PIDS")
    if not path:
        return
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(path, "a") as handle:
        handle.write("{} {}\n".format(os.getpid(), child.pid))


def _train(script, argv):
    parser = argparse.ArgumentParser(prog=script)
    parser.add_argument("-s", "--source_path", required=True)
    parser.add_argument("-m", "--model_path", required=True)
    parser.add_argument("--audio_extractor", default="deepspeech")
    parser.add_argument("--init_num", type=int, default=10000)
    parser.add_argument("--densify_grad_threshold", type=float, default=0.0002)
    parser.add_argument("--opacity_lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    stage = script.split("_")[1].split(".")[0]  # mouth, face, fuse
    source = os.path.abspath(args.source_path)
    features = {"hubert": "aud_hu.npy", "deepspeech": "aud_ds.npy"}[args.audio_extractor]
    for name in ("transforms_train.json", "transforms_val.json", "au.csv", "bc.jpg", features,
                 "teeth_mask"):
        if not os.path.exists(os.path.join(source, name)):
            raise SystemExit("FileNotFoundError: {}".format(os.path.join(source, name)))
    if stage == "fuse":
        for name in ("chkpnt_face_latest.pth", "chkpnt_mouth_latest.pth"):
            if not os.path.isfile(os.path.join(args.model_path, name)):
                raise SystemExit("FileNotFoundError: {}".format(
                    os.path.join(args.model_path, name)))
    print("stand-in {} {}".format(script, " ".join(argv)))
    print("Optimizing " + args.model_path)
    if not os.path.isdir(args.model_path):
        os.makedirs(args.model_path)
    with open(os.path.join(args.model_path, "cfg_args"), "w") as handle:
        handle.write("Namespace(audio='', audio_extractor='{}', data_device='cpu', eval=False, "
                     "images='images', init_num={}, model_path='{}', resolution=-1, "
                     "sh_degree=2, source_path='{}', white_background=False)".format(
                         args.audio_extractor, args.init_num, args.model_path, source))
    print("Found transforms_train.json file, assuming Blender data set!")
    # Upstream's readNerfSyntheticInfo writes points3d.ply into the dataset, always.
    with open(os.path.join(source, "points3d.ply"), "wb") as handle:
        handle.write(b"ply\n")
    _grandchild_pids()
    steps = int(os.environ.get("TG_STANDIN_STEPS", "40"))
    _progress(steps, "Training progress", float(os.environ.get("TG_STANDIN_STEP_S", "0")),
              "Loss=0.01234")
    checkpoint = os.path.join(args.model_path, "chkpnt_{}_latest.pth".format(stage))
    with open(checkpoint, "wb") as handle:
        handle.write(b"standin " + stage.encode())
    print("\n[ITER {}] Saving Checkpoint".format(steps))
    print("\nTraining complete.")


def _openface(argv):
    parser = argparse.ArgumentParser(prog="FeatureExtraction")
    parser.add_argument("-f", required=True)
    parser.add_argument("-out_dir", required=True)
    parser.add_argument("-aus", action="store_true")
    args = parser.parse_args(argv)
    rows = len(_images(os.path.dirname(args.f))) or 1
    stem = os.path.splitext(os.path.basename(args.f))[0]
    write_au_csv(os.path.join(args.out_dir, stem + ".csv"), rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    script, rest = argv[0], argv[1:]
    if os.environ.get("TG_STANDIN_FAIL") == script:
        sys.stderr.write("Traceback (most recent call last):\nRuntimeError: stand-in failure of "
                         "{}\n".format(script))
        return 1
    if script == "data_utils/process.py":
        _process(rest)
    elif script == "data_utils/easyportrait/create_teeth_mask.py":
        _teeth(rest)
    elif script in ("train_mouth.py", "train_face.py", "train_fuse.py"):
        _train(script, rest)
    elif script == "FeatureExtraction":
        _openface(rest)
    else:
        sys.stderr.write("stand-in: unknown script {}\n".format(script))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
