"""Rendered frames and the call's audio -> an mp4, through an ffmpeg process.

Raw RGB frames go to ffmpeg's stdin as they are rendered, the audio comes
from a WAV file, and ffmpeg encodes H.264 (libx264, else OpenH264, else
MPEG-4 part 2, whichever the binary has) and AAC. Two outputs:

- a file with the index in front (`+faststart`), returned whole;
- a fragmented mp4 on ffmpeg's stdout (`empty_moov`, a fragment at each
  keyframe, one keyframe every `segment_frames`), split into segments as it
  comes: first the init segment (ftyp + moov), then one media segment
  (moof + mdat) per fragment, and last an index (mfra). The segments,
  concatenated, are the whole file, and each is playable once the ones
  before it arrived (MSE, ffplay -).

ffmpeg comes from the `ffmpeg` option, else PATH, else the imageio-ffmpeg
wheel. Runs on Python 3.7 with the standard library.
"""

import os
import shutil
import struct
import subprocess
import threading

try:
    import queue
except ImportError:  # pragma: no cover - Python 2 is not supported anyway
    import Queue as queue  # noqa: N813

CODEC_PREFERENCE = ("libx264", "libopenh264", "mpeg4")
STDERR_TAIL = 3000


class FfmpegError(RuntimeError):
    """ffmpeg is missing, or it failed; the message carries its own words."""


def find_ffmpeg(configured=None):
    """The ffmpeg executable: the configured one, else PATH, else imageio-ffmpeg's; or raise."""
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        found = shutil.which(configured)
        if found:
            return found
        raise FfmpegError("ffmpeg not found at {} (the `ffmpeg` option): expected an executable "
                          "ffmpeg binary".format(configured))
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or its binary missing for this platform
        pass
    raise FfmpegError("no ffmpeg: none on PATH and the imageio-ffmpeg wheel is not installed; "
                      "install ffmpeg, `pip install imageio-ffmpeg` in the daemon's venv, or "
                      "set the `ffmpeg` option to its path")


def available_codecs(ffmpeg):
    """The video encoders of CODEC_PREFERENCE that this ffmpeg binary has."""
    try:
        out = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=30).stdout.decode("utf-8",
                                                                                  "replace")
    except (OSError, subprocess.SubprocessError) as exc:
        raise FfmpegError("cannot run {} -encoders: {}".format(ffmpeg, exc))
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6:
            names.add(parts[1])
    return [codec for codec in CODEC_PREFERENCE if codec in names]


def choose_codec(ffmpeg, wanted=None):
    codecs = available_codecs(ffmpeg)
    if wanted:
        if wanted not in codecs and wanted not in CODEC_PREFERENCE:
            return wanted  # a codec we know nothing about: the user's choice, ffmpeg will say
        if wanted not in codecs:
            raise FfmpegError("{} has no {} encoder (it has: {})".format(
                ffmpeg, wanted, ", ".join(codecs) or "none of " + ", ".join(CODEC_PREFERENCE)))
        return wanted
    if not codecs:
        raise FfmpegError("{} has none of the video encoders {}".format(
            ffmpeg, ", ".join(CODEC_PREFERENCE)))
    return codecs[0]


def _codec_arguments(codec, crf):
    if codec == "libx264":
        return ["-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf),
                "-sc_threshold", "0", "-pix_fmt", "yuv420p"]
    if codec == "libopenh264":
        return ["-c:v", "libopenh264", "-b:v", "4M", "-pix_fmt", "yuv420p"]
    if codec == "mpeg4":
        return ["-c:v", "mpeg4", "-q:v", "3", "-pix_fmt", "yuv420p"]
    return ["-c:v", codec, "-pix_fmt", "yuv420p"]


def ffmpeg_command(ffmpeg, width, height, fps, audio_path, output=None, codec="libx264",
                   crf=20, segment_frames=25):
    """The argv: raw RGB frames on stdin + audio file -> mp4 file, or fragmented mp4 on stdout."""
    command = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "{}x{}".format(width, height),
               "-framerate", str(fps), "-i", "pipe:0"]
    if audio_path:
        command += ["-i", audio_path, "-map", "0:v:0", "-map", "1:a:0"]
    if width % 2 or height % 2:  # 4:2:0 needs even sizes: pad one column / row
        command += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
    command += _codec_arguments(codec, crf)
    if output is None and codec == "libx264":
        # No B-frames: a fragmented file has no edit list to hide their delay, which
        # would start the video two frames after the audio.
        command += ["-bf", "0"]
    command += ["-g", str(segment_frames), "-keyint_min", str(segment_frames)]
    if audio_path:
        # 48 kHz: AAC's 1024 samples of priming are 21 ms there (64 ms at 16 kHz); a
        # fragmented file has no edit list to hide them.
        command += ["-c:a", "aac", "-b:a", "128k", "-ar", "48000"]
    if output is None:
        # make_non_negative: shifting everything by the audio's priming (the default for
        # mp4) would stretch the first video frame of a fragmented file instead.
        command += ["-avoid_negative_ts", "make_non_negative",
                    "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-f", "mp4",
                    "pipe:1"]
    else:
        command += ["-movflags", "+faststart", "-f", "mp4", output]
    return command


class Mp4Segmenter(object):
    """Top-level mp4 boxes from a byte stream -> init segment, then one segment per fragment."""

    def __init__(self):
        self._buffer = bytearray()
        self._pending = []  # boxes of the segment being gathered
        self._have_init = False

    def feed(self, data):
        """Bytes in; the segments completed by them out, as (kind, bytes)."""
        self._buffer.extend(data)
        done = []
        for box_type, box in self._boxes():
            if box_type == b"moof" and not self._have_init:
                done.append(("init", b"".join(self._pending)))
                self._have_init = True
                self._pending = []
            # Boxes between an mdat and the next moof (styp, sidx) open the next segment.
            self._pending.append(box)
            if box_type == b"mdat" and self._have_init:
                done.append(("media", b"".join(self._pending)))
                self._pending = []
        return done

    def finish(self):
        """The rest at the end of the stream (an mfra index, or a stream with no fragments)."""
        rest = b"".join(self._pending) + bytes(self._buffer)
        self._pending, self._buffer = [], bytearray()
        if not rest:
            return []
        # After the fragments, ffmpeg closes the stream with an index (mfra).
        return [("index" if self._have_init else "init", rest)]

    def _boxes(self):
        while len(self._buffer) >= 8:
            size, box_type = struct.unpack(">I4s", bytes(self._buffer[:8]))
            header = 8
            if size == 1:
                if len(self._buffer) < 16:
                    return
                size = struct.unpack(">Q", bytes(self._buffer[8:16]))[0]
                header = 16
            elif size == 0:
                return  # "to the end of the file": only finish() can close it
            if size < header:
                raise FfmpegError("ffmpeg wrote a malformed mp4 box (size {})".format(size))
            if len(self._buffer) < size:
                return
            box = bytes(self._buffer[:size])
            del self._buffer[:size]
            yield box_type, box


class VideoEncoder(object):
    """One ffmpeg process for one video: write(frame) per frame, then finish().

    With output=None the mp4 is fragmented and streamed: segments() returns
    the segments completed so far, finish() the rest. A reader thread drains
    ffmpeg's stdout so that writing frames never deadlocks; stderr goes to a
    file next to the audio, for the error message.
    """

    def __init__(self, ffmpeg, width, height, fps, audio_path, workdir, output=None,
                 codec="libx264", crf=20, segment_frames=25):
        self.width, self.height = int(width), int(height)
        self.output = output
        self.command = ffmpeg_command(ffmpeg, self.width, self.height, fps, audio_path, output,
                                      codec, crf, segment_frames)
        self.frames = 0
        self._stderr_path = os.path.join(workdir, "ffmpeg.log")
        self._segments = queue.Queue()
        self._reader = None
        self._reader_error = []
        self._stderr = open(self._stderr_path, "wb")
        try:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE if output is None else subprocess.DEVNULL,
                stderr=self._stderr, start_new_session=True)
        except OSError as exc:
            self._stderr.close()
            raise FfmpegError("cannot start {}: {}".format(self.command[0], exc))
        if output is None:
            self._reader = threading.Thread(target=self._read, name="ffmpeg-reader")
            self._reader.daemon = True
            self._reader.start()

    def _read(self):
        segmenter = Mp4Segmenter()
        try:
            while True:
                data = self.process.stdout.read1(1 << 16) if hasattr(
                    self.process.stdout, "read1") else self.process.stdout.read(1 << 16)
                if not data:
                    break
                for segment in segmenter.feed(data):
                    self._segments.put(segment)
            for segment in segmenter.finish():
                self._segments.put(segment)
        except Exception as exc:  # handed to the writer's thread through finish()
            self._reader_error.append(exc)

    def write(self, frame):
        """One frame: uint8 [height, width, 3] (anything with tobytes() in that layout)."""
        shape = getattr(frame, "shape", None)
        if shape is not None and tuple(shape) != (self.height, self.width, 3):
            raise ValueError("frame {} is {}, the video is {}x{} RGB".format(
                self.frames, tuple(shape), self.width, self.height))
        try:
            self.process.stdin.write(frame.tobytes())
        except (BrokenPipeError, OSError):
            self.process.wait()
            raise FfmpegError("ffmpeg stopped at frame {} (status {}): {}".format(
                self.frames, self.process.returncode, self.stderr_tail()))
        self.frames += 1

    def segments(self):
        """Segments completed so far: list of (kind, bytes), kind "init" or "media"."""
        ready = []
        while True:
            try:
                ready.append(self._segments.get_nowait())
            except queue.Empty:
                return ready

    def finish(self, timeout=120):
        """Close stdin, wait for ffmpeg; the remaining segments (streaming) or []."""
        try:
            self.process.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            raise FfmpegError("ffmpeg did not finish within {} s after the last frame".format(
                timeout))
        if self._reader is not None:
            self._reader.join(timeout)
        self._stderr.close()
        if self.process.returncode != 0:
            raise FfmpegError("ffmpeg failed with status {}: {}".format(
                self.process.returncode, self.stderr_tail()))
        if self._reader_error:
            raise self._reader_error[0]
        return self.segments()

    def abort(self):
        """Kill ffmpeg (a cancelled or failed render); safe to call twice."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, 9)
            except OSError:
                self.process.kill()
        try:
            self.process.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self.process.wait()
        if self._reader is not None:
            self._reader.join(10)
        if not self._stderr.closed:
            self._stderr.close()

    def stderr_tail(self):
        try:
            self._stderr.flush()
        except (OSError, ValueError):
            pass
        try:
            with open(self._stderr_path, "rb") as handle:
                text = handle.read().decode("utf-8", "replace").strip()
        except OSError:
            return "(no output)"
        return text[-STDERR_TAIL:] or "(no output)"
