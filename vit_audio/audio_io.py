"""Audio in: one decoding rule on every machine (libsndfile, else ffmpeg), whole or streamed in
blocks of bounded size, and the measures taken on the way (loudness, silence, recording facts)."""

import contextlib
import io
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from vit_audio.storage import is_utf8


class AudioError(Exception):
    """A clip that cannot be used; the message is the reason recorded in skipped.csv."""


# One decoding rule, the same on every machine: libsndfile alone decodes the formats it reads (a file
# it rejects is unusable, even where another decoder would accept it), and ffmpeg decodes the formats
# libsndfile cannot read, or the file is reported as needing it.
SNDFILE_EXTENSIONS = {
    ".wav",
    ".wave",
    ".flac",
    ".mp3",
    ".ogg",
    ".oga",
    ".opus",
    ".aif",
    ".aiff",
    ".aifc",
    ".au",
    ".snd",
}


# ffmpeg's demuxer for each extension it decodes. It is forced: left to itself ffmpeg picks one by
# content, and a playlist named .aac would have it read other files (or probe whether they exist).
FFMPEG_DEMUXERS = {
    ".aac": "aac",
    ".m4a": "mov",
    ".mp4": "mov",
    ".webm": "matroska",
    ".mka": "matroska",
    ".wma": "asf",
    ".amr": "amr",
}


FFMPEG_EXTENSIONS = set(FFMPEG_DEMUXERS)


def _libsndfile_failure(error, path):
    """The AudioError for libsndfile's `error` on `path`: its first line, naming the file, not its folder."""
    reason = str(error).splitlines()[0].replace(str(path), path.name)
    return AudioError(f"cannot decode: {reason}")


def _check_not_cut_off(extra_info):
    """libsndfile silently decodes a cut-off WAV as a shorter clip; its header log (`extra_info`) tells."""
    declared = re.search(r"^data : (\d+) \(should be (\d+)\)", extra_info, re.M)
    if declared and int(declared.group(2)) < int(declared.group(1)) < 0x7FFFFFFF:  # not a streamed WAV
        raise AudioError(
            f"truncated file: header declares {declared.group(1)} data bytes, "
            f"only {declared.group(2)} present"
        )


def _sndfile_name(path):
    """`path` as soundfile opens it: a name that is not UTF-8 as its bytes (soundfile encodes text
    strictly)."""
    return str(path) if is_utf8(str(path)) else os.fsencode(path)


def _decode_with_libsndfile(path):
    import soundfile as sf

    name = _sndfile_name(path)
    try:
        audio, file_sr = sf.read(name, dtype="float32", always_2d=True)
        extra_info = sf.info(name).extra_info
    except Exception as error:
        raise _libsndfile_failure(error, path) from None
    _check_not_cut_off(extra_info)
    return audio, file_sr


def _ffmpeg_command(path):
    """ffmpeg writing all of `path`'s channels at its own rate, as 32-bit float WAV, to stdout, so the
    downmix and resampling after it are the same as for libsndfile's formats. It reads `path` alone:
    its demuxer comes from the extension (FFMPEG_DEMUXERS) and no protocol but the file is allowed."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(f"needs ffmpeg (apt-get install ffmpeg) to decode {path.suffix.lower()} files")
    return [ffmpeg, "-nostdin", "-v", "error", *_ffmpeg_input(path), "-f", "wav", "-c:a", "pcm_f32le", "-"]


def _ffmpeg_input(path):
    """ffmpeg's (and ffprobe's) options to read `path` and nothing else (see _ffmpeg_command)."""
    return ["-protocol_whitelist", "file", "-f", FFMPEG_DEMUXERS[path.suffix.lower()], "-i", f"file:{path}"]


def _ffmpeg_failure(returncode, stderr, path):
    """The AudioError of an ffmpeg run, None when it decoded cleanly. ffmpeg exits with status 0 on
    some damaged files (a cut-off WebM) but says so at level "error"."""
    messages = stderr.decode(errors="replace").strip().splitlines()
    if not returncode and not messages:
        return None
    reason = messages[0] if messages else f"exit status {returncode}"
    reason = re.sub(r"^\[[^\]]*\] ", "", reason).replace(f"file:{path}", path.name)
    return AudioError(f"ffmpeg cannot decode: {reason}")


def _decode_with_ffmpeg(path):
    """All channels at the file's own rate, through a pipe (see _ffmpeg_command)."""
    import soundfile as sf

    result = subprocess.run(_ffmpeg_command(path), capture_output=True)
    failure = _ffmpeg_failure(result.returncode, result.stderr, path)
    if failure is not None:
        raise failure
    try:
        return sf.read(io.BytesIO(result.stdout), dtype="float32", always_2d=True)
    except Exception:
        raise AudioError("ffmpeg cannot decode: no audio stream in its output") from None


def _checked_audio_path(path):
    """`path` as a Path, after the checks every decoder needs; raises AudioError."""
    path = Path(path)
    if not path.is_file():
        raise AudioError("file not found")
    if path.stat().st_size == 0:
        raise AudioError("empty file")
    return path


# Below this a recording holds no speech band worth the name (a telephone's 8 kHz keeps 0-4 kHz), and
# resampling it to 16 kHz would multiply every decoded block by 16,000 / rate: 16,000 times at 1 Hz.
MIN_SAMPLE_RATE = 4000


def _check_sample_rate(file_sr):
    if file_sr < MIN_SAMPLE_RATE:
        raise AudioError(f"sample rate {file_sr} Hz is below the {MIN_SAMPLE_RATE} Hz minimum")


def _needs_ffmpeg(path):
    return path.suffix.lower() in FFMPEG_EXTENSIONS


def load_audio(path, sr):
    """Decode to mono (the mean of the channels) float32 at `sr` Hz: FFMPEG_EXTENSIONS with ffmpeg,
    every other file with libsndfile."""
    import soxr

    path = _checked_audio_path(path)
    audio, file_sr = (_decode_with_ffmpeg if _needs_ffmpeg(path) else _decode_with_libsndfile)(path)
    _check_sample_rate(file_sr)
    if audio.size == 0:
        raise AudioError("no samples")
    if not np.isfinite(audio).all():
        raise AudioError("non-finite (NaN or inf) samples")
    audio = audio.mean(axis=1)
    if file_sr != sr:
        audio = soxr.resample(audio, file_sr, sr).astype(np.float32)
    return audio


def integrated_loudness(audio, sr):
    """Loudness in LUFS (ITU-R BS.1770); -inf for silence."""
    import pyloudnorm

    block = 0.4  # BS.1770 gating block: shorter clips are measured on a looped copy
    measured = audio if len(audio) >= block * sr else np.resize(audio, int(block * sr) + 1)
    return float(pyloudnorm.Meter(sr, block_size=block).integrated_loudness(measured))


def loudness_normalize(audio, sr, target_lufs):
    """Scale to `target_lufs` (ITU-R BS.1770). Returns (audio, measured loudness before scaling)."""
    loudness = integrated_loudness(audio, sr)
    return (audio * loudness_gain(loudness, target_lufs)).astype(np.float32), loudness


def loudness_gain(loudness, target_lufs):
    """The factor that brings a clip measured at `loudness` LUFS to `target_lufs`; a numpy float64, so
    a float32 clip is scaled in float64 whichever meter measured it."""
    if not np.isfinite(loudness):
        raise AudioError("silent clip (loudness is -inf)")
    return np.float64(10.0 ** ((target_lufs - float(loudness)) / 20.0))


def non_silent_bounds(audio, top_db, frame=2048, hop=512):
    """(start, end) sample indices of the part louder than peak - top_db, by frame RMS."""
    padded = np.pad(audio, (frame // 2, frame // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame)[::hop]
    return loud_span((frames.astype(np.float64) ** 2).mean(axis=1), len(audio), top_db, hop)


def loud_span(frame_energies, n_samples, top_db, hop):
    """non_silent_bounds from the mean square of each frame (frame i centred on sample i * hop)."""
    rms_db = 10 * np.log10(np.maximum(frame_energies, 1e-20))
    loud = np.flatnonzero(rms_db > rms_db.max() - top_db)
    if loud.size == 0:
        return 0, 0
    return int(loud[0] * hop), min(n_samples, int((loud[-1] + 1) * hop))


def original_sample_rate(path):
    """The sample rate the file was stored at, before decoding resamples it: from libsndfile's reading
    of the header, else from ffprobe (for the formats ffmpeg decodes); NaN when neither can tell."""
    import soundfile as sf

    with contextlib.suppress(Exception):
        return sf.info(_sndfile_name(path)).samplerate
    ffprobe = shutil.which("ffprobe")
    if ffprobe is not None and _needs_ffmpeg(Path(path)):
        result = subprocess.run(
            [
                ffprobe,
                "-v",
                "error",
                "-select_streams",
                "a:0",
                "-show_entries",
                "stream=sample_rate",
                "-of",
                "csv=p=0",
                *_ffmpeg_input(Path(path)),
            ],
            capture_output=True,
            text=True,
        )
        if result.stdout.strip().isdigit():
            return int(result.stdout)
    return float("nan")


def recording_facts(
    audio, sr, frame=1024, high_band_hz=4000.0, rolloff=0.95, active_db=60.0, floor_db=-120.0, block=512
):
    """Traces of the recording chain in a decoded clip at `sr` Hz (before loudness normalisation):

    dc_offset               mean sample value divided by the RMS (so independent of gain)
    noise_floor_db          10th-percentile frame RMS in dB relative to the loudest frame (>= floor_db)
    high_band_energy_ratio  share of the energy above `high_band_hz`, measured at `sr`: with 16 kHz
                            that is 4-8 kHz against 0-8 kHz, and 0 for a file recorded at 8 kHz
    spectral_rolloff_hz     the frequency below which `rolloff` of a frame's energy lies, median over
                            the frames within `active_db` of the loudest (silent gaps have no spectrum)

    Non-overlapping frames of `frame` samples, `block` frames at a time: memory stays small for any length.
    """
    meter = RecordingMeter(sr, frame, high_band_hz, rolloff, active_db, floor_db, block)
    meter.add(audio)
    return meter.facts()


class RecordingMeter:
    """recording_facts of a clip fed block by block: whole frames are measured `block` at a time as
    they arrive, so the result is the same however the clip is cut into blocks."""

    def __init__(
        self, sr, frame=1024, high_band_hz=4000.0, rolloff=0.95, active_db=60.0, floor_db=-120.0, block=512
    ):
        self.sr, self.frame, self.block, self.rolloff = sr, frame, block, rolloff
        self.high_band_hz, self.active_db, self.floor_db = high_band_hz, active_db, floor_db
        self.pending, self.n_samples = np.zeros(0, np.float32), 0
        self.total, self.total_sq, self.band_energy = (
            0.0,
            0.0,
            np.zeros(2),
        )  # band_energy: above high_band_hz, all
        self.frame_power, self.frame_rolloff = [], []

    def add(self, samples):
        self.n_samples += len(samples)
        self.pending = np.concatenate([self.pending, samples]) if len(self.pending) else samples
        while len(self.pending) >= self.frame * self.block:
            self._measure(self.pending[: self.frame * self.block])
            self.pending = self.pending[self.frame * self.block :]

    def _measure(self, samples):
        frames = samples.reshape(-1, self.frame).astype(np.float64)
        self.total, self.total_sq = self.total + frames.sum(), self.total_sq + (frames**2).sum()
        self.frame_power.append((frames**2).mean(axis=1))
        power = np.abs(np.fft.rfft(frames * np.hanning(self.frame), axis=1)) ** 2
        freqs = np.fft.rfftfreq(self.frame, 1 / self.sr)
        self.band_energy += power[:, freqs > self.high_band_hz].sum(), power.sum()
        cumulative = np.cumsum(power, axis=1)
        self.frame_rolloff.append(freqs[np.argmax(cumulative >= self.rolloff * cumulative[:, -1:], axis=1)])

    def facts(self):
        """The facts of everything added (call once, at the end of the clip)."""
        if self.n_samples < self.frame:  # a clip shorter than one frame is one zero-padded frame
            self._measure(np.pad(self.pending, (0, self.frame - self.n_samples)))
            n_samples = self.n_samples
        else:  # the samples after the last whole frame are left out
            if len(self.pending) >= self.frame:
                self._measure(self.pending[: len(self.pending) // self.frame * self.frame])
            n_samples = self.n_samples // self.frame * self.frame
        frame_power, frame_rolloff = np.concatenate(self.frame_power), np.concatenate(self.frame_rolloff)
        level_db = 10 * np.log10(np.maximum(frame_power, 1e-30) / max(frame_power.max(), 1e-30))
        rms = math.sqrt(self.total_sq / n_samples)
        band_energy = self.band_energy
        return dict(
            dc_offset=round(float(self.total / n_samples / rms), 5) if rms > 0 else 0.0,
            noise_floor_db=round(float(max(np.percentile(level_db, 10), self.floor_db)), 2),
            high_band_energy_ratio=round(float(band_energy[0] / band_energy[1]), 5)
            if band_energy[1]
            else 0.0,
            spectral_rolloff_hz=round(float(np.median(frame_rolloff[level_db > -self.active_db])), 1),
        )


# Files of any length are read twice, in blocks: a first pass measures what depends on the whole clip
# (its length, loudness, silence and recording facts), a second cuts the segments. Memory is bounded by
# the block and segment sizes, and each measure equals what its whole-clip counterpart gives.
STREAM_BLOCK_FRAMES = 1 << 17  # decoded frames held at a time: 3 s at 44.1 kHz, 8 s at 16 kHz


def _libsndfile_blocks(path, frames):
    """The file's sample rate, then blocks of at most `frames` (frames, channels) float32, from
    libsndfile with _decode_with_libsndfile's checks."""
    import soundfile as sf

    try:
        handle = sf.SoundFile(_sndfile_name(path))
    except Exception as error:
        raise _libsndfile_failure(error, path) from None
    with handle:
        _check_not_cut_off(handle.extra_info)
        yield handle.samplerate
        try:
            yield from handle.blocks(frames, dtype="float32", always_2d=True)
        except Exception as error:
            raise _libsndfile_failure(error, path) from None


# WAV sample formats by (format tag, bits): numpy type and the scale to [-1, 1), as libsndfile reads them
WAV_SAMPLE_TYPES = {
    (1, 16): ("<i2", 2.0**-15),
    (1, 32): ("<i4", 2.0**-31),
    (3, 32): ("<f4", 1.0),
    (3, 64): ("<f8", 1.0),
}


def _wav_stream_layout(stream):
    """(channels, sample rate, numpy type, scale) from the header of a WAV stream, which is left at the
    first sample; None when the stream ends first. Sizes are not read: a pipe cannot go back to fill
    them in."""
    if stream.read(12)[8:] != b"WAVE":
        return None
    layout = None
    while len(chunk := stream.read(8)) == 8:
        size = int.from_bytes(chunk[4:], "little")
        if chunk[:4] == b"data":
            return layout
        body = stream.read(size + size % 2)
        if chunk[:4] == b"fmt ":
            tag = int.from_bytes(body[24:26] if body[:2] == b"\xfe\xff" else body[:2], "little")  # extensible
            sample_type = WAV_SAMPLE_TYPES.get((tag, int.from_bytes(body[14:16], "little")))
            if sample_type is None:
                raise AudioError("ffmpeg cannot decode: its output has an unexpected sample format")
            layout = int.from_bytes(body[2:4], "little"), int.from_bytes(body[4:8], "little"), *sample_type
    return None


def _ffmpeg_blocks(path, frames):
    """The file's sample rate, then blocks of at most `frames` (frames, channels) float32, read from
    ffmpeg's output as it comes, with _decode_with_ffmpeg's checks."""
    # messages go to a file, not a pipe: a damaged file's flood of them cannot stall ffmpeg
    with tempfile.TemporaryFile() as messages:
        process = subprocess.Popen(
            _ffmpeg_command(path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=messages
        )
        try:
            layout = _wav_stream_layout(process.stdout)
            if layout is not None:
                channels, file_sr, sample_type, scale = layout
                frame_bytes = channels * np.dtype(sample_type).itemsize
                yield file_sr
                while data := process.stdout.read(frames * frame_bytes):
                    samples = np.frombuffer(data[: len(data) // frame_bytes * frame_bytes], sample_type)
                    yield (samples.astype(np.float32) * np.float32(scale)).reshape(-1, channels)
            process.wait()
            messages.seek(0)
            failure = _ffmpeg_failure(process.returncode, messages.read(), path)
            if failure is not None:
                raise failure
            if layout is None:
                raise AudioError("ffmpeg cannot decode: no audio stream in its output")
        finally:
            if process.poll() is None:  # the reader stopped early
                process.kill()
                process.wait()
            process.stdout.close()


def stream_audio(path, sr, block_frames=STREAM_BLOCK_FRAMES):
    """load_audio in blocks: the same decoding rule, checks and samples (mono float32 at `sr` Hz),
    with at most `block_frames` decoded frames held at a time."""
    import soxr

    path = _checked_audio_path(path)
    read = _ffmpeg_blocks if _needs_ffmpeg(path) else _libsndfile_blocks
    with contextlib.closing(read(path, block_frames)) as blocks:
        file_sr = next(blocks)
        _check_sample_rate(file_sr)
        resampler = soxr.ResampleStream(file_sr, sr, 1, dtype="float32") if file_sr != sr else None
        decoded = 0
        for block in blocks:
            if not np.isfinite(block).all():
                raise AudioError("non-finite (NaN or inf) samples")
            decoded += len(block)
            mono = block.mean(axis=1)
            yield resampler.resample_chunk(mono) if resampler else mono
        if not decoded:
            raise AudioError("no samples")
        if resampler:
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


class SlidingWindows:
    """Cuts a signal fed block by block into the windows [start, end) that `bounds(j)` gives for
    j = 0, 1, ... (starts and ends never decreasing), holding only the samples a later window needs."""

    def __init__(self, bounds):
        self.bounds, self.next_window = bounds, 0
        self.buffer, self.offset = (
            np.zeros(0, np.float32),
            0,
        )  # the buffer holds samples offset, offset + 1, ...

    def add(self, block):
        """Append `block`; returns the windows it completed, in order."""
        self.buffer = np.concatenate([self.buffer, block])
        end = self.offset + len(self.buffer)
        completed = []
        while (window := self.bounds(self.next_window))[1] <= end:
            completed.append(self.buffer[window[0] - self.offset : window[1] - self.offset])
            self.next_window += 1
        keep_from = min(self.bounds(self.next_window)[0], end)
        self.buffer, self.offset = self.buffer[keep_from - self.offset :], keep_from
        return completed

    def cut_at_end(self):
        """The windows that start before the end of the signal but reach past it, cut there."""
        end = self.offset + len(self.buffer)
        cut = []
        while (start := self.bounds(self.next_window)[0]) < end:
            cut.append(self.buffer[start - self.offset :])
            self.next_window += 1
        return cut


class LoudnessMeter:
    """Integrated loudness (ITU-R BS.1770) of a signal fed block by block, computed as pyloudnorm
    computes it for the whole signal: its K-weighting filters (state carried across blocks, output
    stored as float32 as pyloudnorm stores it), the mean square of 400 ms gating blocks every 100 ms,
    then the absolute (-70 LUFS) and relative (-10 LU) gates."""

    def __init__(self, sr, block_seconds=0.4, overlap=0.75):
        import pyloudnorm

        self.sr, self.block_seconds, self.step = sr, block_seconds, 1.0 - overlap
        stages = pyloudnorm.Meter(sr, block_size=block_seconds)._filters.values()  # the same coefficients
        self.filters = [(stage.b, stage.a, stage.passband_gain) for stage in stages]
        self.states = [np.zeros(max(len(a), len(b)) - 1) for b, a, _ in self.filters]
        self.windows = SlidingWindows(self.gating_block)
        self.energies, self.head, self.n_samples = [], np.zeros(0, np.float32), 0

    def gating_block(self, j):
        """Block j in samples, with pyloudnorm's rounding."""
        return (
            int(self.block_seconds * (j * self.step) * self.sr),
            int(self.block_seconds * (j * self.step + 1) * self.sr),
        )

    def mean_square(self, weighted):
        return (1.0 / (self.block_seconds * self.sr)) * np.sum(np.square(weighted))

    def add(self, block):
        import scipy.signal

        self.head = np.concatenate(
            [self.head, block[: int(self.block_seconds * self.sr) + 1 - len(self.head)]]
        )
        self.n_samples += len(block)
        for i, (b, a, gain) in enumerate(self.filters):
            filtered, self.states[i] = scipy.signal.lfilter(b, a, block, zi=self.states[i])
            block = (gain * filtered).astype(np.float32)
        self.energies.append(
            np.array([self.mean_square(weighted) for weighted in self.windows.add(block)], np.float64)
        )

    def loudness(self):
        """LUFS of everything added (call once, at the end); -inf for silence."""
        if (
            self.n_samples < self.block_seconds * self.sr
        ):  # measured on a looped copy, as integrated_loudness does
            return integrated_loudness(self.head, self.sr)
        n_blocks = (
            int(np.round((self.n_samples / self.sr - self.block_seconds) / (self.block_seconds * self.step)))
            + 1
        )
        last = np.array([self.mean_square(weighted) for weighted in self.windows.cut_at_end()], np.float64)
        z = np.concatenate([*self.energies, last, np.zeros(n_blocks)])[
            :n_blocks
        ]  # blocks past the end are empty
        with np.errstate(divide="ignore"):
            levels = np.array([-0.691 + 10.0 * np.log10(z_j) for z_j in z])
            above_absolute = z[levels >= -70.0]
            if not len(above_absolute):
                return -math.inf
            relative_gate = -0.691 + 10.0 * np.log10(np.mean(above_absolute)) - 10.0
            return float(-0.691 + 10.0 * np.log10(np.mean(z[(levels > relative_gate) & (levels > -70.0)])))


class SilenceMeter:
    """non_silent_bounds of a signal fed block by block: the same frames (the signal padded with
    frame // 2 zeros at each end), the same mean squares."""

    def __init__(self, top_db, frame=2048, hop=512):
        self.top_db, self.frame, self.hop, self.n_samples = top_db, frame, hop, 0
        self.windows = SlidingWindows(lambda j: (j * hop, j * hop + frame))
        self.energies = []
        self.add(np.zeros(frame // 2, np.float32))

    def add(self, block):
        self.n_samples += len(block)
        self.energies.append(
            np.array(
                [(frame.astype(np.float64) ** 2).mean() for frame in self.windows.add(block)], np.float64
            )
        )

    def bounds(self):
        """(start, end) of the part louder than its peak - top_db (call once, at the end)."""
        self.add(np.zeros(self.frame // 2, np.float32))
        return loud_span(np.concatenate(self.energies), self.n_samples - self.frame, self.top_db, self.hop)


AUDIO_EXTENSIONS = SNDFILE_EXTENSIONS | FFMPEG_EXTENSIONS  # decoded, or listed in skipped.csv with the reason
