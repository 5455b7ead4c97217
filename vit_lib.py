"""ViT audio deepfake detector: everything the notebooks share.

Sections follow the data: configuration -> audio features -> corpora and preparation -> dataset
-> model -> training -> evaluation -> LFCC-GMM baseline -> inference -> plots -> tracking -> command line.
Label convention everywhere: 0 = real (bona fide), 1 = fake (spoof).
Score convention (ASVspoof): higher score = more bona fide; score = logit_real - logit_fake.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import hashlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm  # widget bars in JupyterLab, text bars in a terminal

REPO_ROOT = Path(__file__).resolve().parent
FIXTURE_AUDIO_DIR = REPO_ROOT / "data" / "fixture_audio"
DEFAULT_CACHE_DIR = REPO_ROOT / "data" / "processed"
DEFAULT_RESULTS_DIR = REPO_ROOT / "results"
DEFAULT_CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
CLASS_NAMES = ["Real", "Fake"]
# One colour per class in every figure (seaborn's colour-blind palette): real blue, fake orange.
CLASS_COLORS = {"Real": "#0173b2", "Fake": "#de8f05"}
SPLITS = ("train", "val", "test")
WANDB_PROJECT = "audio-deepfake-detection"


# ---------------------------------------------------------------- configuration
FEATURES = ("log_mel", "linear", "lfcc")


@dataclass(frozen=True)
class DataConfig:
    SEED: int = 42
    SR: int = 16000
    N_FFT: int = 2048
    HOP_LENGTH: int = 512
    N_MELS: int = 128
    FMIN: float = 0.0
    FMAX: float = 8000.0
    NUM_TIME_MASKS: int = 2
    NUM_FREQ_MASKS: int = 2
    TIME_MASK_MAX_WIDTH: int = 60
    FREQ_MASK_MAX_WIDTH: int = 25
    MASK_REPLACEMENT_VALUE: float = -80.0
    NORM_EPSILON: float = 1e-6
    LOUDNESS_LUFS: float = -23.0
    USE_GLOBAL_NORMALIZATION: bool = False
    # Per-spectrogram normalisation first takes each row's mean over the segment off (cepstral mean
    # normalisation, done on the spectrogram's rows): a voice's or a channel's lasting colour goes, and
    # with it the easiest way to recognise a speaker, so a detector trained on few recorded persons
    # cannot call every voice it has not heard fake. Global normalisation subtracts only the train mean.
    SUBTRACT_ROW_MEANS: bool = True
    USE_RANDOM_CROPPING: bool = True
    CACHE_DIR: str = os.environ.get("VIT_CACHE_DIR", str(DEFAULT_CACHE_DIR))
    # How a clip shorter than one segment is filled: "loop" repeats it, "pad" appends silence,
    # "drop" skips it. Looping is the default so padding length cannot reveal the class.
    SHORT_CLIP_MODE: str = "loop"
    TRIM_SILENCE: bool = False
    TRIM_TOP_DB: float = 40.0
    MIN_CLIP_SECONDS: float = 0.1
    # The model's input image, N_MELS rows high: "log_mel" (mel filter bank energies in dB),
    # "linear" (the same with linearly spaced filters, as fine at 7 kHz as at 100 Hz) or "lfcc"
    # (the DCT of the linear energies in dB: linear-frequency cepstral coefficients).
    FEATURE: str = "log_mel"

    @classmethod
    def original(cls, **overrides):
        """The original notebook's data settings: its per-spectrogram z-score keeps the row means."""
        return cls(**{"SUBTRACT_ROW_MEANS": False, **overrides})

    def __post_init__(self):
        if self.FEATURE not in FEATURES:
            raise ValueError(f"FEATURE must be one of {FEATURES}, got {self.FEATURE!r}")

    @property
    def fill_value(self):
        """What padding and SpecAugment masks write: silence in dB, the mean for cepstra."""
        return 0.0 if self.FEATURE == "lfcc" else self.MASK_REPLACEMENT_VALUE


class ModelConfig:
    """Segment length, overlap and augmentation switches; the spectrogram width follows from the
    segment length at `data_config`'s sample rate and hop, rounded up to whole patches."""

    def __init__(self, name, audio_length_seconds, overlap_ratio, apply_augmentation=False,
                 apply_waveform_augmentation=False, patch_width=16, data_config=DataConfig()):
        if audio_length_seconds <= 0:
            raise ValueError(f"audio_length_seconds must be positive, got {audio_length_seconds}")
        if not 0 <= overlap_ratio < 1:
            raise ValueError(f"overlap_ratio must be in [0, 1), got {overlap_ratio}")
        self.name = name
        self.audio_length_seconds = audio_length_seconds
        self.overlap_ratio = overlap_ratio
        self.apply_augmentation = apply_augmentation
        self.apply_waveform_augmentation = apply_waveform_augmentation
        self.patch_width = patch_width
        frames = (audio_length_seconds * data_config.SR) / data_config.HOP_LENGTH
        self.max_frames_spec = int(math.ceil(frames / patch_width) * patch_width)

    @classmethod
    def from_dict(cls, saved, data_config=DataConfig()):
        """Rebuild from `as_dict()` output (a checkpoint's), counting frames at `data_config`."""
        return cls(**{k: v for k, v in saved.items() if k != "max_frames_spec"}, data_config=data_config)

    def as_dict(self):
        return {k: getattr(self, k) for k in ("name", "audio_length_seconds", "overlap_ratio",
                                              "apply_augmentation", "apply_waveform_augmentation",
                                              "patch_width", "max_frames_spec")}

    def __repr__(self):
        return f"ModelConfig({self.as_dict()})"


ALL_MODEL_CONFIGS = {
    "vit_balanced_dataset": ModelConfig("vit_balanced_dataset", 8, 0.5, apply_augmentation=True),
    "vit_performance_dataset": ModelConfig("vit_performance_dataset", 10, 0.0, apply_augmentation=True),
    # Most utterances in short-prompt corpora last 2-5 s: 4 s segments loop them less, and the
    # 128 x 128 image halves the cost of a training step.
    "vit_short_dataset": ModelConfig("vit_short_dataset", 4, 0.5, apply_augmentation=True),
}


def make_model_config(dataset_name, data_config=DataConfig()):
    """The named dataset's ModelConfig for a run with `data_config` (ALL_MODEL_CONFIGS count frames
    at the default sample rate and hop)."""
    if dataset_name not in ALL_MODEL_CONFIGS:
        raise ValueError(f"Unknown dataset_name {dataset_name!r}; choose one of {sorted(ALL_MODEL_CONFIGS)}")
    return ModelConfig.from_dict(ALL_MODEL_CONFIGS[dataset_name].as_dict(), data_config)


def data_settings(data_config):
    """The DataConfig as a checkpoint stores it: every setting that shapes the inputs, not the cache folder."""
    return {k: v for k, v in asdict(data_config).items() if k != "CACHE_DIR"}


# Data settings added after checkpoints began to store theirs: what a checkpoint that lacks them
# was trained with.
OLDER_CHECKPOINT_SETTINGS = dict(SUBTRACT_ROW_MEANS=False)


def inference_settings(checkpoint, source="checkpoint"):
    """(DataConfig, (mean, std)) with which a checkpoint's model had its inputs made: the data settings
    it stores (for a checkpoint written before they were stored, the defaults of that time), and the
    train statistics of a globally normalised model ((None, None): per-spectrogram normalisation)."""
    saved = checkpoint.get("data_config", {})
    unknown = sorted(set(saved) - {f.name for f in fields(DataConfig) if f.init})
    if unknown:
        raise ValueError(f"{source}: unknown data setting(s) {unknown}; it was written by another version "
                         f"of vit_lib, whose DataConfig has them")
    data_config = DataConfig(**{**OLDER_CHECKPOINT_SETTINGS, **saved})
    if not data_config.USE_GLOBAL_NORMALIZATION:
        return data_config, (None, None)
    if not checkpoint.get("normalization"):
        raise ValueError(f"{source}: the model was trained with global normalisation, but the checkpoint "
                         f"holds no train mean/std")
    return data_config, (checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"])


class ViTConfig:
    def __init__(self, name, image_size, patch_size, dim, depth, heads, mlp_dim, dropout=0.1,
                 emb_dropout=0.1, channels=1, num_classes=2, patch_stride=None, patch_norm=True, pool="cls",
                 patch_embedding="linear"):
        self.name = name
        self.image_height, self.image_width = image_size
        self.patch_height, self.patch_width = patch_size
        # A stride below the patch size makes patches overlap, as in the Audio Spectrogram Transformer.
        self.stride_height, self.stride_width = patch_stride or patch_size
        if (self.image_height - self.patch_height) % self.stride_height or \
                (self.image_width - self.patch_width) % self.stride_width:
            raise ValueError(f"{name}: image size {tuple(image_size)} is not divisible by patch size "
                             f"{tuple(patch_size)} with stride {(self.stride_height, self.stride_width)}")
        if dim % heads:
            raise ValueError(f"{name}: dim {dim} is not divisible by heads {heads}")
        self.dim, self.depth, self.heads, self.mlp_dim = dim, depth, heads, mlp_dim
        self.dropout, self.emb_dropout = dropout, emb_dropout
        self.channels, self.num_classes = channels, num_classes
        if pool not in ("cls", "mean"):
            raise ValueError(f"{name}: pool must be 'cls' or 'mean', got {pool!r}")
        if patch_embedding not in ("linear", "conv"):
            raise ValueError(f"{name}: patch_embedding must be 'linear' or 'conv', got {patch_embedding!r}")
        if patch_embedding == "conv" and (patch_size[0] != patch_size[1] or patch_size[0] & (patch_size[0] - 1)
                               or tuple(patch_stride or patch_size) != tuple(patch_size)):
            raise ValueError(f"{name}: the convolutional patch embedding needs square, non-overlapping patches whose side "
                             f"is a power of two, got patch {tuple(patch_size)} stride {patch_stride}")
        self.patch_norm, self.pool, self.patch_embedding = patch_norm, pool, patch_embedding
        self.patch_rows = (self.image_height - self.patch_height) // self.stride_height + 1
        self.patch_columns = (self.image_width - self.patch_width) // self.stride_width + 1
        self.num_patches = self.patch_rows * self.patch_columns
        self.patch_dim = channels * self.patch_height * self.patch_width

    def as_dict(self):
        return dict(name=self.name, image_size=[self.image_height, self.image_width],
                    patch_size=[self.patch_height, self.patch_width], dim=self.dim, depth=self.depth,
                    heads=self.heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                    emb_dropout=self.emb_dropout, channels=self.channels, num_classes=self.num_classes,
                    patch_stride=[self.stride_height, self.stride_width], patch_norm=self.patch_norm,
                    pool=self.pool, patch_embedding=self.patch_embedding)

    def __repr__(self):
        return f"ViTConfig({self.as_dict()})"


# Widths chosen so the trainable parameter counts at 128 x 256 land in the sizes' ranges:
# Small 2-3 M, Medium 4-6 M, Large 10-12 M (64-dimensional heads throughout).
VIT_SIZES = {
    "ViT_Small": dict(dim=192, depth=6, heads=3, mlp_dim=768),
    "ViT_Medium": dict(dim=256, depth=7, heads=4, mlp_dim=1024),
    "ViT_Large": dict(dim=384, depth=6, heads=6, mlp_dim=1536),
}


def make_vit_config(model_size, image_size=(DataConfig.N_MELS, 256), patch_size=(16, 16), **options):
    """A named size; `options` are ViTConfig's (patch_stride, patch_norm, pool, patch_embedding)."""
    if model_size not in VIT_SIZES:
        raise ValueError(f"Unknown model size {model_size!r}; choose one of {sorted(VIT_SIZES)}")
    return ViTConfig(model_size, image_size, patch_size, **VIT_SIZES[model_size], **options)


ViT_Small = make_vit_config("ViT_Small")
ViT_Medium = make_vit_config("ViT_Medium")
ViT_Large = make_vit_config("ViT_Large")


MIXED_PRECISION_SETTINGS = ("auto", "on", "off")


@dataclass
class TrainingConfig:
    """How a model is trained. The defaults are the recipe that learns recorded against synthetic
    speech (README, "Detection on real speech"); `TrainingConfig.original()` is the original notebook's."""
    model_size: str = "ViT_Small"         # ViT_Small/Medium/Large, or CNN_Small/Medium/Large for the CNN baseline
    dataset_name: str = "vit_short_dataset"
    epochs: int = 45
    learning_rate: float = 5e-4
    batch_size: int = 32
    num_workers: int = 0
    cache_dir: str = DataConfig.CACHE_DIR
    results_dir: str = str(DEFAULT_RESULTS_DIR)
    checkpoint_dir: str = str(DEFAULT_CHECKPOINT_DIR)
    run_name: str | None = None
    seed: int = 42
    optimizer: str = "adamw"             # "adam" (the original recipe) or "adamw"
    weight_decay: float = 0.05
    lr_schedule: str = "warmup_cosine"   # "constant" or "warmup_cosine"
    warmup_epochs: float = 2.0
    class_balance: str = "balanced_sampler"   # "none", "weighted_loss" or "balanced_sampler"
    grad_clip_norm: float | None = 1.0
    # Validate, keep and test an exponential moving average of the weights (decay per optimiser step)
    # instead of the weights themselves: it smooths the step-to-step noise of small batches, so the
    # best epoch is picked on a steadier model. None trains without it.
    ema_decay: float | None = None
    # Speaker and channel augmentation of the training segments (see speaker_channel_augment): with few
    # recorded persons in train, a model otherwise learns "these voices are real". The equaliser's tilt
    # is constant in time, so with DataConfig.SUBTRACT_ROW_MEANS the row means take it off again, except
    # where SpecAugment's masks cover a row; it acts with the band means kept.
    frequency_warp: float = 0.15
    equalizer_db: float = 10.0
    # "conv": tokens from 3x3 convolutions (see conv_patch_embedding); "linear": vit-pytorch's
    # flattened patch and linear layer, the original notebook's.
    patch_embedding: str = "conv"
    # Autocast the forward pass to 16-bit floats where the hardware runs them fast: "auto" chooses by
    # the device (see choose_precision), "on" autocasts wherever the device has a 16-bit type, "off"
    # trains in fp32. The weights, the optimiser's state, the loss and the scores stay fp32.
    mixed_precision: str = "auto"
    speed_up: bool = True                # faster dropout and attention kernels (see speed_up), same results
    early_stopping_patience: int | None = None
    select_best_by: str = "val_eer"      # "val_eer", or "val_f1" (the original recipe)
    compile: bool = False
    resume: bool = False
    wandb_mode: str | None = None        # None: online with a key, else offline; or "disabled"
    progress: bool = True                # per-batch progress bars

    @classmethod
    def original(cls, **overrides):
        """The original notebook's recipe: Adam at 1e-4, constant rate, plain cross-entropy, 8 s
        segments, linear patch embedding, SpecAugment without the speaker and channel augmentation,
        best epoch by validation F1."""
        recipe = dict(dataset_name="vit_balanced_dataset", epochs=10, learning_rate=1e-4, optimizer="adam",
                      weight_decay=0.0, lr_schedule="constant", class_balance="none", grad_clip_norm=None,
                      patch_embedding="linear", select_best_by="val_f1", frequency_warp=0.0, equalizer_db=0.0)
        return cls(**{**recipe, **overrides})

    def __post_init__(self):
        if isinstance(self.mixed_precision, bool):   # configs and checkpoints from before it had three values
            self.mixed_precision = "auto" if self.mixed_precision else "off"
        if self.model_size not in {**VIT_SIZES, **CNN_SIZES}:
            raise ValueError(f"Unknown model_size {self.model_size!r}; "
                             f"choose one of {[*VIT_SIZES, *CNN_SIZES]}")
        if self.dataset_name not in ALL_MODEL_CONFIGS:
            raise ValueError(f"Unknown dataset_name {self.dataset_name!r}; "
                             f"choose one of {sorted(ALL_MODEL_CONFIGS)}")
        for name in ("epochs", "learning_rate", "batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.frequency_warp < 1 or self.equalizer_db < 0:
            raise ValueError(f"frequency_warp must be in [0, 1) and equalizer_db >= 0, got "
                             f"{self.frequency_warp} and {self.equalizer_db}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        # patience 0 would train nothing; a clip norm of 0 would be ignored and a negative one flips gradients
        for name in ("grad_clip_norm", "early_stopping_patience"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)!r}")
        choices = {"optimizer": ("adam", "adamw"), "lr_schedule": ("constant", "warmup_cosine"),
                   "class_balance": ("none", "weighted_loss", "balanced_sampler"),
                   "select_best_by": ("val_f1", "val_eer"), "patch_embedding": ("linear", "conv"),
                   "mixed_precision": MIXED_PRECISION_SETTINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.run_name is None:
            self.run_name = f"{self.model_size}_{self.dataset_name}"

    @property
    def architecture(self):
        return "cnn" if self.model_size in CNN_SIZES else "vit"

    def checkpoint_path(self, which="best"):
        """`{best|last}_{vit|cnn}_model_{run_name}.pth`, the original notebooks' names."""
        return Path(self.checkpoint_dir) / f"{which}_{self.architecture}_model_{self.run_name}.pth"


# ---------------------------------------------------------------- audio features
class AudioError(Exception):
    """A clip that cannot be used; the message is the reason recorded in skipped.csv."""


# One decoding rule, the same on every machine: libsndfile alone decodes the formats it reads (a file
# it rejects is unusable, even where another decoder would accept it), and ffmpeg decodes the formats
# libsndfile cannot read, or the file is reported as needing it.
SNDFILE_EXTENSIONS = {".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".aifc",
                      ".au", ".snd"}
# ffmpeg's demuxer for each extension it decodes. It is forced: left to itself ffmpeg picks one by
# content, and a playlist named .aac would have it read other files (or probe whether they exist).
FFMPEG_DEMUXERS = {".aac": "aac", ".m4a": "mov", ".mp4": "mov", ".webm": "matroska", ".mka": "matroska",
                   ".wma": "asf", ".amr": "amr"}
FFMPEG_EXTENSIONS = set(FFMPEG_DEMUXERS)


def _libsndfile_failure(error, path):
    """The AudioError for libsndfile's `error` on `path`: its first line, naming the file, not its folder."""
    reason = str(error).splitlines()[0].replace(str(path), path.name)
    return AudioError(f"cannot decode: {reason}")


def _check_not_cut_off(extra_info):
    """libsndfile silently decodes a cut-off WAV as a shorter clip; its header log (`extra_info`) tells."""
    declared = re.search(r"^data : (\d+) \(should be (\d+)\)", extra_info, re.M)
    if declared and int(declared.group(2)) < int(declared.group(1)) < 0x7FFFFFFF:  # not a streamed WAV
        raise AudioError(f"truncated file: header declares {declared.group(1)} data bytes, "
                         f"only {declared.group(2)} present")


def _sndfile_name(path):
    """`path` as soundfile opens it: a name that is not UTF-8 as its bytes (soundfile encodes text strictly)."""
    return str(path) if _is_utf8(str(path)) else os.fsencode(path)


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
# resampling it to DataConfig.SR would multiply every decoded block by SR / rate: 16,000 times at 1 Hz.
MIN_SAMPLE_RATE = 4000


def _check_sample_rate(file_sr):
    if file_sr < MIN_SAMPLE_RATE:
        raise AudioError(f"sample rate {file_sr} Hz is below the {MIN_SAMPLE_RATE} Hz minimum")


def _needs_ffmpeg(path):
    return path.suffix.lower() in FFMPEG_EXTENSIONS


def load_audio(path, sr=DataConfig.SR):
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


def loudness_normalize(audio, sr=DataConfig.SR, target_lufs=DataConfig.LOUDNESS_LUFS):
    """Scale to `target_lufs` (ITU-R BS.1770). Returns (audio, measured loudness before scaling)."""
    import pyloudnorm
    block = 0.4  # BS.1770 gating block: shorter clips are measured on a looped copy
    measured = audio if len(audio) >= block * sr else np.resize(audio, int(block * sr) + 1)
    loudness = pyloudnorm.Meter(sr, block_size=block).integrated_loudness(measured)
    return (audio * loudness_gain(loudness, target_lufs)).astype(np.float32), float(loudness)


def loudness_gain(loudness, target_lufs=DataConfig.LOUDNESS_LUFS):
    """The factor that brings a clip measured at `loudness` LUFS to `target_lufs`; a numpy float64, so
    a float32 clip is scaled in float64 whichever meter measured it."""
    if not np.isfinite(loudness):
        raise AudioError("silent clip (loudness is -inf)")
    return np.float64(10.0 ** ((target_lufs - float(loudness)) / 20.0))


def non_silent_bounds(audio, top_db=DataConfig.TRIM_TOP_DB, frame=2048, hop=512):
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


def segment_geometry(sr, segment_seconds, overlap_ratio):
    """(segment length, step between segment starts), in samples."""
    length = int(round(segment_seconds * sr))
    return length, max(1, int(round(length * (1 - overlap_ratio))))


def segment_starts(n_samples, length, step):
    """Where the segments of a clip at least one segment long start: every `step`, the last one aligned
    to the end of the clip so no audio is lost."""
    starts = list(range(0, n_samples - length + 1, step))
    if starts[-1] + length < n_samples:
        starts.append(n_samples - length)
    return starts


def segment_waveform(audio, sr, segment_seconds, overlap_ratio, short_clip_mode="loop"):
    """Cut into windows of `segment_seconds` with step length*(1-overlap).

    Returns a list of (start_seconds, segment, filled_fraction) where filled_fraction is the share of
    the segment that is not original audio (looped or padded). The last window is aligned to the end
    of the clip so no audio is lost and no padding is needed for clips longer than one segment.
    """
    length, step = segment_geometry(sr, segment_seconds, overlap_ratio)
    if len(audio) >= length:
        return [(s / sr, audio[s:s + length], 0.0) for s in segment_starts(len(audio), length, step)]
    filled = 1 - len(audio) / length
    if short_clip_mode == "loop":
        return [(0.0, np.resize(audio, length), filled)]
    if short_clip_mode == "pad":
        return [(0.0, np.pad(audio, (0, length - len(audio))), filled)]
    if short_clip_mode == "drop":
        return []
    raise ValueError(f"short_clip_mode must be 'loop', 'pad' or 'drop', got {short_clip_mode!r}")


def log_mel_spectrogram(segment, data_config=DataConfig()):
    """Log-mel power spectrogram in dB relative to the segment's peak, floored at -80 dB."""
    import librosa
    mel = librosa.feature.melspectrogram(
        y=segment, sr=data_config.SR, n_fft=data_config.N_FFT, hop_length=data_config.HOP_LENGTH,
        n_mels=data_config.N_MELS, fmin=data_config.FMIN, fmax=data_config.FMAX, power=2.0)
    return librosa.power_to_db(mel, ref=np.max, top_db=80.0).astype(np.float32)


def spectrogram_features(segment, data_config=DataConfig()):
    """The model's input for one segment, (N_MELS, frames) float32, by DataConfig.FEATURE. All three
    share the STFT framing (N_FFT, HOP_LENGTH), the band (FMIN-FMAX) and the dB scale relative to the
    segment's peak, floored at -80 dB. The LFCC keeps all N_MELS coefficients and no deltas: a 16-frame
    patch already sees how they change."""
    if data_config.FEATURE == "log_mel":
        return log_mel_spectrogram(segment, data_config)
    import librosa
    import scipy.fft
    power = np.abs(librosa.stft(segment, n_fft=data_config.N_FFT, hop_length=data_config.HOP_LENGTH)) ** 2
    bank = linear_filterbank(data_config.SR, data_config.N_FFT, data_config.N_MELS, data_config.FMIN, data_config.FMAX)
    spec = librosa.power_to_db(bank @ power, ref=np.max, top_db=80.0)
    if data_config.FEATURE == "lfcc":
        spec = scipy.fft.dct(spec, type=2, norm="ortho", axis=0)
    return spec.astype(np.float32)


def linear_filterbank(sr, n_fft, n_filters, fmin=0.0, fmax=None):
    """Triangular filters on a linear frequency axis: (n_filters, n_fft // 2 + 1) weights on the
    rfft bins. The n_filters + 2 edges are equally spaced from fmin to fmax (default sr / 2);
    filter i rises from edge i to 1 at edge i + 1 and falls to 0 at edge i + 2."""
    fmax = sr / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sr / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sr/2 = {sr / 2:g} Hz, got fmin={fmin:g}, fmax={fmax:g}")
    bins_hz = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = np.linspace(fmin, fmax, n_filters + 2)
    rising = (bins_hz[None] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    falling = (edges[2:, None] - bins_hz[None]) / (edges[2:, None] - edges[1:-1, None])
    return np.clip(np.minimum(rising, falling), 0.0, None)


def power_spectrogram(audio, n_fft, window_length, hop_length, pre_emphasis=0.97):
    """|rfft|^2 of pre-emphasised, Hamming-windowed frames: (n_fft // 2 + 1, frames). Frame t covers
    samples [t * hop_length, t * hop_length + window_length); only whole frames are kept."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 1 or len(audio) < window_length:
        raise ValueError(f"need a mono waveform of at least {window_length} samples (one analysis window), "
                         f"got shape {audio.shape}")
    emphasised = np.append(audio[:1], audio[1:] - pre_emphasis * audio[:-1])
    frames = np.lib.stride_tricks.sliding_window_view(emphasised, window_length)[::hop_length]
    return (np.abs(np.fft.rfft(frames * np.hamming(window_length), n_fft)) ** 2).T


def delta_features(features, width=3):
    """Time derivative of (dims, frames) features as the ASVspoof 2019 baseline takes it: the
    unnormalised regression sum_k k * (x[t + k] - x[t - k]), k = 1..width // 2, edge frames repeated."""
    half = width // 2
    padded = np.pad(features, [(0, 0), (half, half)], mode="edge")
    frames = features.shape[-1]
    return sum(k * (padded[:, half + k:half + k + frames] - padded[:, half - k:half - k + frames])
               for k in range(1, half + 1))


def lfcc(audio_or_power, sr=DataConfig.SR, n_coeffs=20, n_filters=20, n_fft=512, window_seconds=0.020,
         hop_seconds=0.010, fmin=0.0, fmax=None, pre_emphasis=0.97, deltas=True):
    """Linear-frequency cepstral coefficients, as in the ASVspoof 2019 LFCC-GMM baseline: 20 ms
    Hamming frames every 10 ms, 512-point FFT, 20 linear triangular filters, log10 of the filter
    energies, orthonormal DCT-II, 20 static coefficients (c0 included), then deltas and delta-deltas.

    `audio_or_power`: a mono waveform at `sr` Hz, or a power spectrogram (n_fft // 2 + 1, frames).
    Returns float32 (n_coeffs * 3, frames) with deltas, else (n_coeffs, frames): rows are the static
    c0..c{n-1}, then their deltas, then delta-deltas; column t is the frame starting at t * hop.
    """
    import scipy.fft
    if n_coeffs > n_filters:
        raise ValueError(f"n_coeffs ({n_coeffs}) cannot exceed n_filters ({n_filters})")
    power = np.asarray(audio_or_power, dtype=np.float64)
    if power.ndim == 1:
        power = power_spectrogram(power, n_fft, int(round(window_seconds * sr)), int(round(hop_seconds * sr)),
                                  pre_emphasis)
    elif power.shape[0] != n_fft // 2 + 1:
        raise ValueError(f"power spectrogram has {power.shape[0]} bins, n_fft={n_fft} needs {n_fft // 2 + 1}")
    energies = linear_filterbank(sr, n_fft, n_filters, fmin, fmax) @ power
    cepstra = scipy.fft.dct(np.log10(energies + np.finfo(np.float64).eps), type=2, norm="ortho", axis=0)[:n_coeffs]
    if deltas:
        delta = delta_features(cepstra)
        cepstra = np.concatenate([cepstra, delta, delta_features(delta)])
    return cepstra.astype(np.float32)


def _require_min_duration(n_samples, data_config):
    duration = n_samples / data_config.SR
    if duration < data_config.MIN_CLIP_SECONDS:
        raise AudioError(f"too short ({duration:.3f} s < {data_config.MIN_CLIP_SECONDS} s)")


def normalized_clip(path, data_config=DataConfig()):
    """A whole file through the spectrograms' decode path, unsegmented: mono at SR, too-short clips
    refused, loudness-normalised, silence trimmed when TRIM_SILENCE is set. Raises AudioError."""
    audio = load_audio(path, data_config.SR)
    _require_min_duration(len(audio), data_config)
    start, end = non_silent_bounds(audio, data_config.TRIM_TOP_DB)
    audio, _ = loudness_normalize(audio, data_config.SR, data_config.LOUDNESS_LUFS)
    return audio[start:end] if data_config.TRIM_SILENCE else audio


def fit_frames(spec, max_frames, pad_value=DataConfig.MASK_REPLACEMENT_VALUE):
    """Pad (with `pad_value`) or crop the time axis (last) to exactly `max_frames`."""
    frames = spec.shape[-1]
    if frames >= max_frames:
        return spec[..., :max_frames]
    pad = [(0, 0)] * (spec.ndim - 1) + [(0, max_frames - frames)]
    return np.pad(spec, pad, constant_values=pad_value)


def normalize_spectrogram(spec, mean=None, std=None, eps=DataConfig.NORM_EPSILON, subtract_row_means=False):
    """Z-score with global (train) statistics, or per spectrogram when mean/std are None: then with
    `subtract_row_means` each row (frequency band) first loses its mean over time."""
    if mean is None:
        if subtract_row_means:
            spec = spec - spec.mean(-1, keepdims=True)
        mean, std = spec.mean(), spec.std()
    return (spec - mean) / (std + eps)


# What preparation records about each clip, for the shortcut audit: none of it says whether the voice
# is synthetic, so a detector that can be matched by these numbers has learned the corpus.
CLIP_FACTS = ["duration_s", "loudness_lufs", "leading_silence_s", "original_sample_rate", "dc_offset",
              "noise_floor_db", "high_band_energy_ratio", "spectral_rolloff_hz"]


def original_sample_rate(path):
    """The sample rate the file was stored at, before decoding resamples it: from libsndfile's reading
    of the header, else from ffprobe (for the formats ffmpeg decodes); NaN when neither can tell."""
    import soundfile as sf
    with contextlib.suppress(Exception):
        return sf.info(_sndfile_name(path)).samplerate
    ffprobe = shutil.which("ffprobe")
    if ffprobe is not None and _needs_ffmpeg(Path(path)):
        result = subprocess.run([ffprobe, "-v", "error", "-select_streams", "a:0", "-show_entries",
                                 "stream=sample_rate", "-of", "csv=p=0", *_ffmpeg_input(Path(path))],
                                capture_output=True, text=True)
        if result.stdout.strip().isdigit():
            return int(result.stdout)
    return float("nan")


def recording_facts(audio, sr, frame=1024, high_band_hz=4000.0, rolloff=0.95, active_db=60.0,
                    floor_db=-120.0, block=512):
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

    def __init__(self, sr, frame=1024, high_band_hz=4000.0, rolloff=0.95, active_db=60.0, floor_db=-120.0,
                 block=512):
        self.sr, self.frame, self.block, self.rolloff = sr, frame, block, rolloff
        self.high_band_hz, self.active_db, self.floor_db = high_band_hz, active_db, floor_db
        self.pending, self.n_samples = np.zeros(0, np.float32), 0
        self.total, self.total_sq, self.band_energy = 0.0, 0.0, np.zeros(2)  # band_energy: above high_band_hz, all
        self.frame_power, self.frame_rolloff = [], []

    def add(self, samples):
        self.n_samples += len(samples)
        self.pending = np.concatenate([self.pending, samples]) if len(self.pending) else samples
        while len(self.pending) >= self.frame * self.block:
            self._measure(self.pending[:self.frame * self.block])
            self.pending = self.pending[self.frame * self.block:]

    def _measure(self, samples):
        frames = samples.reshape(-1, self.frame).astype(np.float64)
        self.total, self.total_sq = self.total + frames.sum(), self.total_sq + (frames ** 2).sum()
        self.frame_power.append((frames ** 2).mean(axis=1))
        power = np.abs(np.fft.rfft(frames * np.hanning(self.frame), axis=1)) ** 2
        freqs = np.fft.rfftfreq(self.frame, 1 / self.sr)
        self.band_energy += power[:, freqs > self.high_band_hz].sum(), power.sum()
        cumulative = np.cumsum(power, axis=1)
        self.frame_rolloff.append(freqs[np.argmax(cumulative >= self.rolloff * cumulative[:, -1:], axis=1)])

    def facts(self):
        """The facts of everything added (call once, at the end of the clip)."""
        if self.n_samples < self.frame:   # a clip shorter than one frame is one zero-padded frame
            self._measure(np.pad(self.pending, (0, self.frame - self.n_samples)))
            n_samples = self.n_samples
        else:   # the samples after the last whole frame are left out
            if len(self.pending) >= self.frame:
                self._measure(self.pending[:len(self.pending) // self.frame * self.frame])
            n_samples = self.n_samples // self.frame * self.frame
        frame_power, frame_rolloff = np.concatenate(self.frame_power), np.concatenate(self.frame_rolloff)
        level_db = 10 * np.log10(np.maximum(frame_power, 1e-30) / max(frame_power.max(), 1e-30))
        rms = math.sqrt(self.total_sq / n_samples)
        band_energy = self.band_energy
        return dict(dc_offset=round(float(self.total / n_samples / rms), 5) if rms > 0 else 0.0,
                    noise_floor_db=round(float(max(np.percentile(level_db, 10), self.floor_db)), 2),
                    high_band_energy_ratio=round(float(band_energy[0] / band_energy[1]), 5) if band_energy[1] else 0.0,
                    spectral_rolloff_hz=round(float(np.median(frame_rolloff[level_db > -self.active_db])), 1))


# Files of any length are read twice, in blocks: a first pass measures what depends on the whole clip
# (its length, loudness, silence and recording facts), a second cuts the segments. Memory is bounded by
# the block and segment sizes, and each measure equals what its whole-clip counterpart gives.
STREAM_BLOCK_FRAMES = 1 << 17   # decoded frames held at a time: 3 s at 44.1 kHz, 8 s at 16 kHz


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
WAV_SAMPLE_TYPES = {(1, 16): ("<i2", 2.0 ** -15), (1, 32): ("<i4", 2.0 ** -31), (3, 32): ("<f4", 1.0),
                    (3, 64): ("<f8", 1.0)}


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
        process = subprocess.Popen(_ffmpeg_command(path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=messages)
        try:
            layout = _wav_stream_layout(process.stdout)
            if layout is not None:
                channels, file_sr, sample_type, scale = layout
                frame_bytes = channels * np.dtype(sample_type).itemsize
                yield file_sr
                while data := process.stdout.read(frames * frame_bytes):
                    samples = np.frombuffer(data[:len(data) // frame_bytes * frame_bytes], sample_type)
                    yield (samples.astype(np.float32) * np.float32(scale)).reshape(-1, channels)
            process.wait()
            messages.seek(0)
            failure = _ffmpeg_failure(process.returncode, messages.read(), path)
            if failure is not None:
                raise failure
            if layout is None:
                raise AudioError("ffmpeg cannot decode: no audio stream in its output")
        finally:
            if process.poll() is None:   # the reader stopped early
                process.kill()
                process.wait()
            process.stdout.close()


def stream_audio(path, sr=DataConfig.SR, block_frames=STREAM_BLOCK_FRAMES):
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
        self.buffer, self.offset = np.zeros(0, np.float32), 0   # the buffer holds samples offset, offset + 1, ...

    def add(self, block):
        """Append `block`; returns the windows it completed, in order."""
        self.buffer = np.concatenate([self.buffer, block])
        end = self.offset + len(self.buffer)
        completed = []
        while (window := self.bounds(self.next_window))[1] <= end:
            completed.append(self.buffer[window[0] - self.offset:window[1] - self.offset])
            self.next_window += 1
        keep_from = min(self.bounds(self.next_window)[0], end)
        self.buffer, self.offset = self.buffer[keep_from - self.offset:], keep_from
        return completed

    def cut_at_end(self):
        """The windows that start before the end of the signal but reach past it, cut there."""
        end = self.offset + len(self.buffer)
        cut = []
        while (start := self.bounds(self.next_window)[0]) < end:
            cut.append(self.buffer[start - self.offset:])
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
        stages = pyloudnorm.Meter(sr, block_size=block_seconds)._filters.values()   # the same coefficients
        self.filters = [(stage.b, stage.a, stage.passband_gain) for stage in stages]
        self.states = [np.zeros(max(len(a), len(b)) - 1) for b, a, _ in self.filters]
        self.windows = SlidingWindows(self.gating_block)
        self.energies, self.head, self.n_samples = [], np.zeros(0, np.float32), 0

    def gating_block(self, j):
        """Block j in samples, with pyloudnorm's rounding."""
        return (int(self.block_seconds * (j * self.step) * self.sr),
                int(self.block_seconds * (j * self.step + 1) * self.sr))

    def mean_square(self, weighted):
        return (1.0 / (self.block_seconds * self.sr)) * np.sum(np.square(weighted))

    def add(self, block):
        import scipy.signal
        self.head = np.concatenate([self.head, block[:int(self.block_seconds * self.sr) + 1 - len(self.head)]])
        self.n_samples += len(block)
        for i, (b, a, gain) in enumerate(self.filters):
            filtered, self.states[i] = scipy.signal.lfilter(b, a, block, zi=self.states[i])
            block = (gain * filtered).astype(np.float32)
        self.energies.append(np.array([self.mean_square(weighted) for weighted in self.windows.add(block)], np.float64))

    def loudness(self):
        """LUFS of everything added (call once, at the end); -inf for silence."""
        if self.n_samples < self.block_seconds * self.sr:   # measured on a looped copy, as loudness_normalize does
            return loudness_normalize(self.head, self.sr)[1]
        n_blocks = int(np.round((self.n_samples / self.sr - self.block_seconds) / (self.block_seconds * self.step))) + 1
        last = np.array([self.mean_square(weighted) for weighted in self.windows.cut_at_end()], np.float64)
        z = np.concatenate([*self.energies, last, np.zeros(n_blocks)])[:n_blocks]   # blocks past the end are empty
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
        self.energies.append(np.array([(frame.astype(np.float64) ** 2).mean() for frame in self.windows.add(block)],
                                      np.float64))

    def bounds(self):
        """(start, end) of the part louder than its peak - top_db (call once, at the end)."""
        self.add(np.zeros(self.frame // 2, np.float32))
        return loud_span(np.concatenate(self.energies), self.n_samples - self.frame, self.top_db, self.hop)


KEPT_SAMPLES = 1 << 21   # a clip up to this long (131 s at 16 kHz, 8 MB) is kept, not decoded a second time


def measure_clip(path, data_config=DataConfig()):
    """The first pass over a file: (its length in samples at SR, loudness in LUFS, non-silent (start,
    end), recording facts, the clip's blocks if it is at most KEPT_SAMPLES long, else None), as
    load_audio, loudness_normalize, non_silent_bounds and recording_facts give them for the whole clip.
    Raises AudioError for a file that cannot be used."""
    sr = data_config.SR
    meters = LoudnessMeter(sr), SilenceMeter(data_config.TRIM_TOP_DB), RecordingMeter(sr)
    n_samples, kept = 0, []
    for block in stream_audio(path, sr):
        n_samples += len(block)
        if kept is not None and n_samples <= KEPT_SAMPLES:
            kept.append(block)
        else:
            kept = None
        for meter in meters:
            meter.add(block)
    _require_min_duration(n_samples, data_config)
    loudness, silence, recording = meters
    return n_samples, loudness.loudness(), silence.bounds(), recording.facts(), kept


def _span(blocks, start, end):
    """Samples [start, end) of a signal given block by block."""
    position = 0
    for block in blocks:
        yield block[max(0, start - position):max(0, end - position)]
        position += len(block)


def _stream_segments(blocks, sr, gain, start, end, length, step):
    """segment_waveform's segments of the clip's samples [start, end), scaled by `gain`, cut from the
    clip's `blocks` (a clip at least one segment long)."""
    starts = segment_starts(end - start, length, step)
    windows = SlidingWindows(lambda j: (starts[j], starts[j] + length) if j < len(starts) else (math.inf, math.inf))
    cut = 0
    for block in _span(blocks, start, end):
        for segment in windows.add((block * gain).astype(np.float32)):
            yield starts[cut] / sr, segment, 0.0
            cut += 1
    if cut < len(starts):
        raise AudioError("the file changed while it was being read")


def clip_spectrograms(path, model_config, data_config=DataConfig()):
    """The whole preparation path for one file, in bounded memory whatever its length: decode ->
    loudness -> segments -> log-mel (dB).

    Returns (the clip's CLIP_FACTS, used by the shortcut audit, and an iterator of (start_seconds,
    spectrogram (N_MELS, max_frames_spec), filled_fraction)). The file is read once here to measure
    it and, unless it is short enough to be kept, once more as the iterator is consumed.
    """
    sr = data_config.SR
    n_samples, loudness, (start, end), recording, kept = measure_clip(path, data_config)
    gain = loudness_gain(loudness, data_config.LOUDNESS_LUFS)
    facts = dict(duration_s=round(n_samples / sr, 4), loudness_lufs=round(loudness, 3),
                 leading_silence_s=round(start / sr, 4), original_sample_rate=original_sample_rate(path),
                 **recording)
    if not data_config.TRIM_SILENCE:
        start, end = 0, n_samples
    blocks = kept if kept is not None else stream_audio(path, sr)
    length, step = segment_geometry(sr, model_config.audio_length_seconds, model_config.overlap_ratio)
    if end - start >= length:
        segments = _stream_segments(blocks, sr, gain, start, end, length, step)
    else:   # shorter than one segment: looped or padded in memory
        audio = np.concatenate([np.zeros(0, np.float32), *_span(blocks, start, end)])
        segments = segment_waveform((audio * gain).astype(np.float32), sr, model_config.audio_length_seconds,
                                    model_config.overlap_ratio, data_config.SHORT_CLIP_MODE)
        if not segments:
            raise AudioError(f"shorter than one segment ({n_samples / sr:.2f} s) and SHORT_CLIP_MODE='drop'")
    specs = ((seconds, fit_frames(spectrogram_features(segment, data_config), model_config.max_frames_spec,
                                  data_config.fill_value), filled)
             for seconds, segment, filled in segments)
    return facts, specs


def clip_to_spectrograms(path, model_config, data_config=DataConfig()):
    """clip_spectrograms with the spectrograms in a list: (list of (start_seconds, spectrogram
    (N_MELS, max_frames_spec), filled_fraction), the clip's CLIP_FACTS)."""
    facts, specs = clip_spectrograms(path, model_config, data_config)
    return list(specs), facts


# ---------------------------------------------------------------- atomic files
class MachineFault(Exception):
    """A fault of the machine or of the place a run writes to (a full disk, no memory, no permission,
    a killed worker), not of the file being read: the run stops with this message, and a rerun tries
    that file again (it is never listed as unusable)."""


# errno values that say the machine failed, whichever file was being read or written
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EROFS, errno.EMFILE, errno.ENFILE}


def is_machine_fault(error):
    return isinstance(error, (MachineFault, MemoryError)) or (
        isinstance(error, OSError) and error.errno in MACHINE_ERRNOS)


def write_fault(path, error):
    """The MachineFault of an OSError `error` met while writing `path`."""
    return MachineFault(f"cannot write {display_path(path)}: {error.strerror or error}")


def machine_fault_reason(error):
    """One line for a machine fault: "out of memory", or the error's own text."""
    return "out of memory" if isinstance(error, MemoryError) else str(error)


def _new_file_mode():
    """The mode open() gives a new file (0o666 less the umask): mkstemp's private 0o600 would hide
    datasets and checkpoints from the other users of a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write to a temporary file beside `path`, then rename: readers never see half a file.
    A link keeps pointing where it did (the file it leads to is replaced). A pipe, a device, or a
    name under /dev or /proc (/dev/stdout: whatever the shell redirected it to) is a stream that
    replacing would cut off from its reader, so it is written straight through. A failed write (a
    full disk, no permission) raises MachineFault naming `path`."""
    path = Path(path)
    try:
        if path.as_posix().startswith(("/dev/", "/proc/")) or (path.exists() and not path.is_file()):
            with open(path, mode) as handle:
                yield handle
            return
        path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise write_fault(path, error) from None
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise write_fault(path, error) from None
        raise


def save_npy_atomic(path, array):
    with atomic_write(path) as handle:
        np.save(handle, array)


def save_csv_atomic(path, frame):
    with atomic_write(path, "w") as handle:
        frame.to_csv(handle, index=False)


def save_json_atomic(path, obj):
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)


def display_path(path):
    """A path as a reader should see it: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- corpora
AUDIO_EXTENSIONS = SNDFILE_EXTENSIONS | FFMPEG_EXTENSIONS  # decoded, or listed in skipped.csv with the reason
CORPORA = ("folder", "asvspoof2019_la", "fake_or_real", "in_the_wild")
CORPUS_COLUMNS = ["path", "label", "speaker", "attack", "source", "split"]
BONAFIDE_ATTACK = "-"


class SplitLeakError(Exception):
    """A speaker or an original file occurs in more than one split."""


def _require_dir(path, what):
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")


def _link_problem(link, root):
    """Why a link under the corpus root is not followed, or None when it leads to something inside it."""
    try:
        target = link.resolve()
    except (RuntimeError, OSError):  # a loop of links
        return "a link that leads back to itself: not followed"
    if not target.exists():
        return "a link to something that does not exist"
    if not target.is_relative_to(root.resolve()):
        return "a link leading outside the corpus root: not followed"
    return None


def _walk_files(folder, root=None):
    """Files under `folder`, following links to files and folders, each real folder once (a link
    to a folder above is a loop and ends there). With a corpus `root`, links leading outside it or
    to nothing are not followed but returned as (path relative to root, reason)."""
    files, not_followed, seen = [], [], set(Path(folder).resolve().parents)
    pending = [Path(folder)]
    while pending:
        current = pending.pop()
        if current.resolve() in seen:
            continue
        seen.add(current.resolve())
        for entry in current.iterdir():
            problem = _link_problem(entry, Path(root)) if root is not None and entry.is_symlink() else None
            if problem:
                not_followed.append((Path(os.path.relpath(entry, root)).as_posix(), problem))
            elif entry.is_dir():
                pending.append(entry)
            elif entry.is_file():
                files.append(entry)
    return sorted(files), sorted(not_followed)


def _is_audio(path):
    return path.suffix.lower() in AUDIO_EXTENSIONS


def _audio_files(folder):
    return [p for p in _walk_files(folder)[0] if _is_audio(p)]


def read_list_file(path):
    """The text of a corpus's list (protocol, meta.csv, speakers.csv); a ValueError naming the file
    when it is empty or not UTF-8."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise ValueError(f"{path}: empty file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text (line {line}, byte 0x{data[error.start]:02x}); "
                         f"save it as UTF-8") from None


def read_folder_corpus(root, speaker_pattern=None):
    """`root/real/**` and `root/fake/**`. Speakers from `root/speakers.csv` (file,speaker with
    file relative to root) or from the first group of `speaker_pattern` matched against the file
    name. The first folder under fake/ (if any) names the attack."""
    root = Path(root)
    _require_dir(root, "Corpus root")
    for name in ("real", "fake"):
        _require_dir(root / name, f"Folder corpus needs {name}/: folder")
    if speaker_pattern:
        _check_speaker_pattern(speaker_pattern)
    speakers = {}
    if (root / "speakers.csv").is_file():
        table = pd.read_csv(io.StringIO(read_list_file(root / "speakers.csv")), dtype=str)
        if not {"file", "speaker"} <= set(table.columns):
            raise ValueError(f"{root / 'speakers.csv'}: needs columns 'file' and 'speaker', "
                             f"found {list(table.columns)}")
        speakers = {file: speaker for file, speaker in zip(table["file"], table["speaker"])
                    if pd.notna(speaker) and speaker.strip()}
    rows, skipped, unnamed = [], [], []
    for label, name in enumerate(("real", "fake")):
        paths, not_followed = _walk_files(root / name, root)
        skipped += not_followed
        for path in filter(_is_audio, paths):
            rel = path.relative_to(root).as_posix()
            speaker = speakers.get(rel)
            if speaker is None and speaker_pattern:
                match = re.search(speaker_pattern, path.name)
                speaker = match.group(1) if match else None
            if speaker is None:
                unnamed.append(rel)
            parts = path.relative_to(root / name).parts
            attack = parts[0] if label == 1 and len(parts) > 1 else (BONAFIDE_ATTACK if label == 0 else None)
            rows.append(dict(path=str(path), label=label, speaker=speaker, attack=attack,
                             source="folder", split=None))
    if (root / "speakers.csv").is_file() or speaker_pattern:
        _require_every_speaker(unnamed, len(rows), speaker_pattern, (root / "speakers.csv").is_file())
    return pd.DataFrame(rows, columns=CORPUS_COLUMNS), skipped


def _check_speaker_pattern(pattern):
    try:
        groups = re.compile(pattern).groups
    except re.error as error:
        raise ValueError(f"the speaker pattern {pattern!r} is not a regular expression: {error}") from None
    if not groups:
        raise ValueError(f"the speaker pattern {pattern!r} has no group: put the speaker's part of the file name "
                         f"in parentheses, e.g. '^(spk\\d+)_'")


def _require_every_speaker(unnamed, total, speaker_pattern, have_speakers_csv):
    """Splits keep each speaker in one split, which needs every file's speaker: name the files without one."""
    if not unnamed:
        return
    if speaker_pattern and not have_speakers_csv and len(unnamed) == total:
        raise ValueError(f"The speaker pattern {speaker_pattern!r} matches none of the {total} files "
                         f"(e.g. {unnamed[0]}); its first group is the speaker, searched for in the file name")
    sources = ["no speaker in speakers.csv"] if have_speakers_csv else []
    sources += [f"a name the speaker pattern {speaker_pattern!r} does not match"] if speaker_pattern else []
    sources = sources or ["an empty speaker cell"]
    shown = ", ".join(unnamed[:10]) + (f" and {len(unnamed) - 10} more" if len(unnamed) > 10 else "")
    raise ValueError(f"{len(unnamed)} of {total} files have no speaker ({' and '.join(sources)}): {shown}. "
                     f"Splits keep each speaker in one split, so every file needs its speaker")


ASVSPOOF_SPLITS = {"train": ("train", "train.trn"), "val": ("dev", "dev.trl"), "test": ("eval", "eval.trl")}


def read_asvspoof2019_la(root):
    """Protocol lines `SPEAKER FILE - ATTACK bonafide|spoof`; official train/dev/eval splits."""
    root = Path(root)
    _require_dir(root, "ASVspoof 2019 LA root")
    protocols = {split: root / "ASVspoof2019_LA_cm_protocols" / f"ASVspoof2019.LA.cm.{suffix}.txt"
                 for split, (_, suffix) in ASVSPOOF_SPLITS.items()}
    for protocol in protocols.values():
        if not protocol.is_file():
            raise FileNotFoundError(f"ASVspoof 2019 LA protocol file not found: {protocol}")
    rows, skipped = [], []
    for split, protocol in protocols.items():
        audio_dir = root / f"ASVspoof2019_LA_{ASVSPOOF_SPLITS[split][0]}" / "flac"
        for number, line in enumerate(read_list_file(protocol).splitlines(), 1):
            where = f"{protocol}:{number}"
            fields_ = line.split()
            if not fields_:
                continue
            if len(fields_) != 5:
                skipped.append((where, f"protocol line has {len(fields_)} fields, expected 5"))
                continue
            speaker, file_id, _, attack, key = fields_
            if key not in ("bonafide", "spoof"):
                skipped.append((where, f"label {key!r} is neither 'bonafide' nor 'spoof'"))
                continue
            path = audio_dir / f"{file_id}.flac"
            if not path.is_file():
                skipped.append((str(path), "listed in protocol but missing on disk"))
                continue
            rows.append(dict(path=str(path), label=int(key == "spoof"), speaker=speaker,
                             attack=BONAFIDE_ATTACK if key == "bonafide" else attack,
                             source="asvspoof2019_la", split=split))
    return pd.DataFrame(rows, columns=CORPUS_COLUMNS), skipped


FOR_SPLITS = {"training": "train", "validation": "val", "testing": "test"}


def read_fake_or_real(root):
    """`{training,validation,testing}/{real,fake}/*` at the root or in one version folder below it
    (for-original, for-norm, for-2seconds, for-rerecorded)."""
    root = Path(root)
    _require_dir(root, "Fake-or-Real root")
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    base = next((c for c in candidates if all((c / s).is_dir() for s in FOR_SPLITS)), None)
    if base is None:
        raise FileNotFoundError(f"Fake-or-Real layout not found under {root}: expected "
                                f"training/, validation/ and testing/ folders")
    rows, skipped = [], []
    for folder, split in FOR_SPLITS.items():
        for label, name in enumerate(("real", "fake")):
            paths, not_followed = _walk_files(base / folder / name, root)
            skipped += not_followed
            rows += [dict(path=str(path), label=label, speaker=None, attack=BONAFIDE_ATTACK if label == 0 else None,
                          source="fake_or_real", split=split) for path in filter(_is_audio, paths)]
    return pd.DataFrame(rows, columns=CORPUS_COLUMNS), skipped


def read_in_the_wild(root):
    """`meta.csv` with columns file,speaker,label (bona-fide | spoof) and optional columns `attack` (the
    kind of fake; bona-fide rows keep "-") and `split` (train | val | test, where the corpus ships one;
    without it assign_splits makes a speaker-disjoint one)."""
    root = Path(root)
    _require_dir(root, "In-the-Wild root")
    meta_path = root / "meta.csv"
    if not meta_path.is_file():
        raise FileNotFoundError(f"In-the-Wild metadata file not found: {meta_path}")
    meta = pd.read_csv(io.StringIO(read_list_file(meta_path)), dtype=str)
    missing = {"file", "speaker", "label"} - set(meta.columns)
    if missing:
        raise ValueError(f"{meta_path}: missing column(s) {sorted(missing)}")
    rows, skipped = [], []
    for number, entry in enumerate(meta.itertuples(index=False), 2):
        label = str(entry.label).strip().lower()
        if label not in ("bona-fide", "spoof"):
            skipped.append((f"{meta_path}:{number}", f"label {entry.label!r} is neither 'bona-fide' nor 'spoof'"))
            continue
        path = root / str(entry.file)
        if not path.is_file():
            skipped.append((str(path), "listed in meta.csv but missing on disk"))
            continue
        split = getattr(entry, "split", None)
        split = None if pd.isna(split) else str(split).strip()
        if split is not None and split not in SPLITS:
            skipped.append((f"{meta_path}:{number}", f"split {split!r} is none of {list(SPLITS)}"))
            continue
        attack = getattr(entry, "attack", None) if label == "spoof" else BONAFIDE_ATTACK
        rows.append(dict(path=str(path), label=int(label == "spoof"), speaker=entry.speaker,
                         attack=None if pd.isna(attack) else attack, source="in_the_wild", split=split))
    return pd.DataFrame(rows, columns=CORPUS_COLUMNS), skipped


def read_corpus(corpus, root, speaker_pattern=None):
    """One row per original file (path, label, speaker, attack, source, split) and a list of
    (where, reason) for entries that cannot be used."""
    readers = {"folder": lambda: read_folder_corpus(root, speaker_pattern),
               "asvspoof2019_la": lambda: read_asvspoof2019_la(root),
               "fake_or_real": lambda: read_fake_or_real(root),
               "in_the_wild": lambda: read_in_the_wild(root)}
    if corpus not in readers:
        raise ValueError(f"Unknown corpus {corpus!r}; choose one of {list(readers)}")
    files, skipped = readers[corpus]()
    files["speaker"] = normalised_speakers(files["speaker"])
    files, repeats = _inside_root_once(files, Path(root))
    unnamable = ~files["path"].map(_is_utf8)   # ids, tables and score files need names in one encoding
    skipped += [(os.path.relpath(path, root), "its name is not valid UTF-8; rename it to use it")
                for path in files.loc[unnamable, "path"]]
    skipped = [(printable_path(where), reason) for where, reason in skipped + repeats]
    return files[~unnamable].reset_index(drop=True), skipped


def _is_utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(path):
    """A path as text that any table can hold: bytes of a name that are not UTF-8 (which Python keeps
    as lone surrogates) written as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def normalised_speakers(speakers):
    """Speaker names as people mean them: whitespace around and inside a name does not count, and
    names that differ only in case are one person (written as the first of their spellings in sorted
    order), so "spk00", "spk00 " and "SPK00" cannot put one person in two splits."""
    collapsed = speakers.map(lambda name: " ".join(name.split()) if isinstance(name, str) else name)
    spellings = {}
    for name in sorted(collapsed.dropna().unique()):
        spellings.setdefault(name.casefold(), name)
    return collapsed.map(lambda name: spellings[name.casefold()] if isinstance(name, str) else name)


def _inside_root_once(files, root):
    """Keep each audio file inside the corpus root once. A file is the real file its entry leads to
    (through links), so it is listed in skipped.csv when it lies outside the root ('../', an absolute
    path, a link), and when listed again: a repeat that agrees is used once; entries that disagree
    on label, speaker or split are all left out, since nothing tells which one is right."""
    listed = pd.Series([Path(os.path.relpath(p, root)).as_posix() for p in files["path"]], index=files.index)
    real = pd.Series([Path(p).resolve() for p in files["path"]], index=files.index)
    inside = pd.Series([path.is_relative_to(root.resolve()) for path in real], index=files.index, dtype=bool)
    skipped = [(where, "outside the corpus root (through '../', an absolute path or a link): not used")
               for where in listed[~inside]]
    repeated = real.duplicated(keep=False) & inside
    dropped = set(files.index[~inside])
    for _, group in files[repeated].groupby(real[repeated], sort=False):
        conflicts = [column for column in ("label", "speaker", "split") if group[column].nunique(dropna=False) > 1]
        if conflicts:
            dropped.update(group.index)
            skipped += [(where, f"listed {len(group)} times with different {' and '.join(conflicts)}: none used")
                        for where in listed[group.index]]
        else:
            dropped.update(group.index[1:])
            skipped += [(where, f"listed {len(group)} times: used once") for where in listed[group.index[1:]]]
    return files.drop(index=sorted(dropped)).reset_index(drop=True), skipped


def assign_splits(files, fractions=(0.7, 0.15, 0.15), seed=DataConfig.SEED):
    """Fill missing splits: whole speakers go to one split when speakers are known (a file without
    one is then an error naming it), else whole files, stratified by label. Deterministic for a
    given seed and file list."""
    files = files.copy()
    todo = files["split"].isna()
    if not todo.any():
        return files
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions) / np.sum(fractions)

    def split_of(position):  # position in [0, 1): where the group's middle falls
        return SPLITS[min(int(np.searchsorted(bounds, position, side="right")), 2)]

    pending = files[todo]
    known = pending["speaker"].notna()
    if known.any():  # a file-level split would spread the known speakers over several splits
        _require_every_speaker(list(pending.loc[~known, "path"]), len(pending), None, False)
    if known.all():
        sizes = pending.groupby("speaker").size()
        order = sizes.index.to_numpy()[rng.permutation(len(sizes))]
        middles = (np.cumsum(sizes[order]) - sizes[order] / 2) / len(pending)
        speaker_split = {s: split_of(m) for s, m in zip(order, middles)}
        files.loc[todo, "split"] = pending["speaker"].map(speaker_split)
    else:
        for _, group in pending.sort_values("path").groupby("label"):
            shuffled = group.index.to_numpy()[rng.permutation(len(group))]
            middles = (np.arange(len(shuffled)) + 0.5) / len(shuffled)
            files.loc[shuffled, "split"] = [split_of(m) for m in middles]
    return files


def check_split_leaks(files, file_column="path"):
    """Raise SplitLeakError if a known speaker or an original file occurs in two splits. `files` is
    one row per file (`path`) or per segment (`file_column="original_path"`, a dataset's metadata)."""
    problems = []
    for column in ("speaker", file_column):
        known = files.dropna(subset=[column])
        spread = known.groupby(column)["split"].nunique()
        leaked = spread[spread > 1].index.tolist()
        if leaked:
            problems.append(f"{len(leaked)} {column}(s) in more than one split, e.g. {leaked[:3]}")
    if problems:
        raise SplitLeakError("Split leak: " + "; ".join(problems))


def check_split_classes(files, what="files", note=""):
    """Raise ValueError naming each split without bona fide or without spoof files: training, the
    validation EER and the test EER all need both classes, so this is caught before any training."""
    problems = []
    for split in SPLITS:
        labels = set(files.loc[files["split"] == split, "label"])
        if not labels:
            problems.append(f"{split!r} has no {what}")
        elif len(labels) == 1:
            missing = ("bona fide (real)", "spoof (fake)")[1 - labels.pop()]
            problems.append(f"{split!r} has no {missing} {what}")
    if problems:
        raise ValueError("Split " + "; ".join(problems) + (f" ({note})" if note else "") +
                         ". Train, val and test each need bona fide and spoof files.")


def split_audit(metadata):
    """Files, segments, seconds, speakers and attacks per split and class, from segment rows."""
    rows = []
    for (split, label), group in metadata.groupby(["split", "label"]):
        per_file = group.drop_duplicates("original_path")
        rows.append(dict(split=split, cls=CLASS_NAMES[label], files=len(per_file), segments=len(group),
                         audio_seconds=round(float(per_file["duration_s"].sum()), 1),
                         speakers=per_file["speaker"].nunique(), attacks=per_file["attack"].nunique()))
    audit = pd.DataFrame(rows)
    audit["split"] = pd.Categorical(audit["split"], SPLITS)
    return audit.sort_values(["split", "cls"], ascending=[True, False]).reset_index(drop=True)


# ---------------------------------------------------------------- preparation
METADATA_COLUMNS = ["npy_path", "original_path", "label", "segment_index", "start_s", "speaker", "attack",
                    "source", "file_id", *CLIP_FACTS, "filled_fraction"]


def _file_id(relative_path):
    """Readable and unique: the stem's start plus 64 bits of SHA-256 of the whole relative path
    (a chance collision among a million files is about 3e-8, and _check_file_ids catches it)."""
    digest = hashlib.sha256(relative_path.encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', Path(relative_path).stem)[:40]}_{digest}"


def _check_file_ids(files):
    """The id names a file's .npy arrays: two files with one id would share them."""
    clashes = files[files["file_id"].duplicated(keep=False)]
    if len(clashes):
        file_id, group = next(iter(clashes.groupby("file_id", sort=False)))
        raise ValueError(f"{' and '.join(group['relative_path'])} get the same file id {file_id!r}; "
                         f"rename one of them")


def _made_from(path, split, settings_digest):
    """What a file's arrays were made from. A rerun redoes the file when any of it changed: a file
    replaced, repaired or touched gets a new size or modification time, and a new speaker pattern or
    added files can move it to another split. (Content hashes would mean reading the whole corpus.)"""
    stat = Path(path).stat()
    return dict(split=split, size=stat.st_size, mtime_ns=stat.st_mtime_ns, settings=settings_digest)


def _single_threaded():
    """Worker processes already use every core: nested BLAS/OpenMP threads only contend."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    torch.set_num_threads(1)


def _prepare_one(job):
    """Worker: one original file -> its .npy segments. Never raises: a fault of the file becomes its
    skip reason, a fault of the machine (is_machine_fault) a `fault`, which stops the run unjournaled."""
    path, split_dir, file_id, model_config, data_config = job
    try:
        facts, specs = clip_spectrograms(path, model_config, data_config)
        return _save_segments(specs, facts, split_dir, file_id)   # each spectrogram saved as it is made
    except AudioError as error:
        return dict(file_id=file_id, skip=str(error))
    except Exception as error:  # a corrupt file must not stop a 100k-file run; a full disk must
        if is_machine_fault(error):
            return dict(file_id=file_id, fault=machine_fault_reason(error))
        return dict(file_id=file_id, skip=f"{type(error).__name__}: {error}")


def _save_segments(specs, facts, split_dir, file_id):
    segments, total, total_sq, count = [], 0.0, 0.0, 0
    for index, (start, spec, filled) in enumerate(specs):
        npy_path = f"{file_id}_{index:03d}.npy"
        save_npy_atomic(Path(split_dir) / npy_path, spec[None])
        segments.append(dict(npy_path=npy_path, npy_bytes=(Path(split_dir) / npy_path).stat().st_size,
                             segment_index=index, start_s=round(start, 3), filled_fraction=round(filled, 4), **facts))
        spec64 = spec.astype(np.float64)  # float32 sums of 32k values drift in the 8th digit
        total, total_sq, count = total + float(spec64.sum()), total_sq + float((spec64 ** 2).sum()), count + spec.size
    return dict(file_id=file_id, segments=segments, stats=[total, total_sq, count])


def _arrays_intact(split_dir, entry):
    """Whether every array a journal entry lists is on disk at the size it was written with: a deleted
    or cut-off one makes its file be prepared again."""
    for segment in entry.get("segments", []):
        try:
            size = (split_dir / segment["npy_path"]).stat().st_size
        except FileNotFoundError:
            return False
        if size != segment.get("npy_bytes", size):
            return False
    return True


# A temporary file of atomic_write untouched this long belongs to a run that was killed, not to one
# preparing the same dataset at the same time.
ABANDONED_AFTER_SECONDS = 3600


def _remove_abandoned_temporaries(out_dir):
    cutoff = time.time() - ABANDONED_AFTER_SECONDS
    for path in Path(out_dir).rglob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def _read_journal(path):
    """Finished files of an earlier (possibly interrupted) run; a torn last line is ignored."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                done[entry["file_id"]] = entry
    return done


# Settings that act when a prepared spectrogram is loaded (augmentation, row means), not on the
# prepared spectrograms: changing them needs no new preparation.
LOAD_TIME_SETTINGS = ("NUM_TIME_MASKS", "NUM_FREQ_MASKS", "TIME_MASK_MAX_WIDTH", "FREQ_MASK_MAX_WIDTH",
                      "USE_RANDOM_CROPPING", "SUBTRACT_ROW_MEANS")


def _without_load_time(settings):
    return {k: v for k, v in settings.items() if k not in LOAD_TIME_SETTINGS}


def _written_settings(settings_path):
    """preparation.json as prepare_dataset compares it (files written before the load-time
    settings were left out still match)."""
    written = json.loads(settings_path.read_text())
    written["data_config"] = _without_load_time(written["data_config"])
    return written


def prepare_dataset(corpus_root, dataset_name="vit_balanced_dataset", corpus="folder",
                    cache_dir=DataConfig.CACHE_DIR, data_config=DataConfig(), num_workers=None,
                    speaker_pattern=None, split_fractions=(0.7, 0.15, 0.15), progress=True):
    """Raw corpus -> `<cache_dir>/<dataset_name>/<split>/metadata.csv` + .npy log-mels (dB).

    Parallel over files, resumable (a rerun redoes only the files added, changed or moved to another
    split since their journal entry: see _made_from), every file written atomically. Stops before
    any decoding when a split lacks a class. Writes skipped.csv (each unusable file and why), split_audit.csv and
    normalization.json (train mean/std for global normalisation). Returns a summary dict.
    """
    model_config = make_model_config(dataset_name, data_config)
    corpus_root = Path(corpus_root)
    files, reader_skips = read_corpus(corpus, corpus_root, speaker_pattern)
    if files.empty:
        raise ValueError(f"No usable audio files found in {corpus_root} (corpus layout {corpus!r})")
    out_dir = Path(cache_dir) / dataset_name
    settings = dict(corpus=corpus, corpus_root=str(corpus_root.resolve()),
                    data_config=_without_load_time(asdict(data_config)),
                    model_config=model_config.as_dict(), split_fractions=list(split_fractions))
    settings["data_config"].pop("CACHE_DIR")
    settings_path = out_dir / "preparation.json"
    if settings_path.is_file() and _written_settings(settings_path) != settings:
        raise ValueError(f"{settings_path} was written with other settings; delete {out_dir} "
                         f"or choose another cache_dir to prepare this corpus anew")
    split_by_speaker = files["split"].isna().any() and files["speaker"].notna().all()
    files = assign_splits(files, split_fractions, data_config.SEED)
    check_split_leaks(files)
    check_split_classes(files, note=f"{files['speaker'].nunique()} speakers, each kept in one split"
                        if split_by_speaker else "")
    files["relative_path"] = [Path(p).resolve().relative_to(corpus_root.resolve()).as_posix() for p in files["path"]]
    files["file_id"] = files["relative_path"].map(_file_id)
    _check_file_ids(files)
    save_json_atomic(settings_path, settings)

    settings_digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    made_from = {row.file_id: _made_from(row.path, row.split, settings_digest) for row in files.itertuples()}
    journal_path = out_dir / "progress.jsonl"
    journal_entries = _read_journal(journal_path)
    done = {file_id: entry for file_id, entry in journal_entries.items()
            if file_id in made_from and entry.get("made_from") == made_from[file_id]
            and _arrays_intact(out_dir / made_from[file_id]["split"], entry)}
    _remove_abandoned_temporaries(out_dir)
    jobs = [(row.path, str(out_dir / row.split), row.file_id, model_config, data_config)
            for row in files.itertuples() if row.file_id not in done]
    workers = num_workers or os.cpu_count() or 1
    if jobs:
        import librosa  # noqa: F401  imported once here so forked workers inherit it
        with open(journal_path, "a") as journal, contextlib.ExitStack() as stack:
            if journal.tell():  # a torn last line (crash mid-write) must not swallow the next entry
                with open(journal_path, "rb") as tail:
                    tail.seek(-1, os.SEEK_END)
                    if tail.read(1) != b"\n":
                        journal.write("\n")
            if workers > 1 and len(jobs) > 1:
                pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"),
                                                                initializer=_single_threaded))
                results = pool.map(_prepare_one, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers))))
            else:  # one BLAS thread as in the workers: the arrays must not depend on num_workers
                from threadpoolctl import threadpool_limits
                stack.enter_context(threadpool_limits(1))
                results = map(_prepare_one, jobs)
            paths = dict(zip(files["file_id"], files["path"]))
            try:
                for result in tqdm(results, total=len(jobs), desc=f"Preparing {dataset_name}",
                                   disable=not progress):
                    if "fault" in result:
                        raise MachineFault(f"stopped while preparing {display_path(paths[result['file_id']])}: "
                                           f"{result['fault']}")
                    result["made_from"] = made_from[result["file_id"]]
                    journal.write(json.dumps(result) + "\n")
                    journal.flush()
                    done[result["file_id"]] = result
            except BrokenProcessPool:
                raise MachineFault("a preparation worker was killed (by the system, most often for lack of "
                                   "memory); try fewer workers") from None
            except OSError as error:   # the journal
                raise write_fault(journal_path, error) from None
    if jobs or len(journal_entries) != len(done):  # keep only what the dataset is made of
        with atomic_write(journal_path, "w") as journal:
            journal.writelines(json.dumps(done[file_id]) + "\n" for file_id in files["file_id"])
    return _write_dataset_tables(out_dir, files, done, reader_skips, data_config)


def _write_dataset_tables(out_dir, files, done, reader_skips, data_config):
    segment_rows, skipped = [], [dict(original_path=w, reason=r) for w, r in reader_skips]
    stats = np.zeros(3)
    for row in files.itertuples():
        result = done[row.file_id]
        if "skip" in result:
            skipped.append(dict(original_path=row.relative_path, reason=result["skip"]))
            continue
        if row.split == "train":
            stats += result["stats"]
        for segment in result["segments"]:
            segment_rows.append(dict(split=row.split, original_path=row.relative_path, label=row.label,
                                     speaker=row.speaker, attack=row.attack, source=row.source,
                                     file_id=row.file_id, **segment))
    metadata = pd.DataFrame(segment_rows, columns=["split"] + METADATA_COLUMNS)
    metadata = metadata.sort_values(["split", "original_path", "segment_index"]).reset_index(drop=True)
    skipped = pd.DataFrame(skipped, columns=["original_path", "reason"])
    save_csv_atomic(out_dir / "skipped.csv", skipped)
    check_split_classes(metadata, "files left after decoding",
                        f"the others are listed with their reasons in {display_path(out_dir / 'skipped.csv')}")
    for split in SPLITS:
        save_csv_atomic(out_dir / split / "metadata.csv", metadata.loc[metadata["split"] == split, METADATA_COLUMNS])
    _remove_stale_arrays(out_dir, metadata)
    audit = split_audit(metadata) if len(metadata) else pd.DataFrame()
    save_csv_atomic(out_dir / "split_audit.csv", audit)
    if stats[2]:
        mean = stats[0] / stats[2]
        std = math.sqrt(max(stats[1] / stats[2] - mean ** 2, 0.0))
        save_json_atomic(out_dir / "normalization.json", dict(mean=mean, std=std, eps=data_config.NORM_EPSILON))
    summary = dict(files=len(files) + len(reader_skips), used_files=len(files) - (len(skipped) - len(reader_skips)),
                   skipped_files=len(skipped), segments=len(metadata),
                   segments_per_split={s: int((metadata["split"] == s).sum()) for s in SPLITS},
                   dataset_dir=display_path(out_dir))
    print(f"Prepared {summary['segments']} segments from {summary['used_files']} files; "
          f"skipped {summary['skipped_files']} (listed in {display_path(out_dir / 'skipped.csv')})")
    return summary, audit, skipped


def _remove_stale_arrays(out_dir, metadata):
    """Delete the .npy files a split folder holds but its metadata no longer lists (a file removed
    from the corpus, moved to another split, skipped now, or now shorter), so that the folders hold
    exactly the dataset."""
    listed = {split: set(metadata.loc[metadata["split"] == split, "npy_path"]) for split in SPLITS}
    stale = [path for split in SPLITS for path in (out_dir / split).glob("*.npy") if path.name not in listed[split]]
    for path in stale:
        path.unlink()
    if stale:
        print(f"Removed {len(stale)} .npy file(s) no longer in the dataset")


# ---------------------------------------------------------------- fixture corpus
def _formant_filter(signal, formants, sr):
    from scipy.signal import lfilter
    out = np.zeros_like(signal)
    for frequency, bandwidth in formants:
        r = math.exp(-math.pi * bandwidth / sr)
        theta = 2 * math.pi * frequency / sr
        out += lfilter([1 - r], [1, -2 * r * math.cos(theta), r * r], signal)
    return out


def _synthetic_utterance(rng, sr, seconds, f0, aperiodicity=0.0, jitter=0.0):
    """A voice-like clip: glottal pulses with intonation and vibrato, syllable envelope, formants, breath
    and room noise at levels drawn per clip. The two excitation defects are what the fixture's vocoders
    get wrong: `aperiodicity` hands that share of the pulses' power to white noise (the harmonics drown,
    as when a vocoder misjudges voicing) and `jitter` moves each pulse by that fraction of its period,
    times a standard normal draw (the upper harmonics blur, as with an unsteady F0 track). Noise and
    pulses pass the same formants, so neither defect changes the spectral envelope: bandwidth and
    level stay the real voice's. Every draw is made whatever the defects, so the same `rng` state
    gives the same voice with and without them."""
    from scipy.signal import butter, sosfilt
    n = int(seconds * sr)
    t = np.arange(n) / sr
    contour = f0 * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6))
                    + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = np.cumsum(contour) / sr
    onsets = np.flatnonzero(np.diff(np.floor(phase), prepend=0) > 0)
    shifts = np.round(jitter * sr / contour[onsets] * rng.standard_normal(len(onsets))).astype(int)
    pulses = np.bincount(np.clip(onsets + shifts, 0, n - 1), minlength=n).astype(np.float64)
    excitation = (np.sqrt(1 - aperiodicity) * pulses
                  + np.sqrt(aperiodicity * np.mean(pulses ** 2)) * rng.standard_normal(n))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(2.5, 4.5) * t + rng.uniform(0, 6)), 0, None) ** 0.7
    voiced = _formant_filter(excitation, [(rng.uniform(500, 800), 80), (rng.uniform(1100, 1800), 100),
                                          (rng.uniform(2300, 3000), 150)], sr)
    breath = rng.uniform(0.003, 0.01) * rng.standard_normal(n)
    clip = (voiced + breath) * syllables
    # Pauses of digital silence would show any trace a vocoder leaves in them: a recording's room
    # noise covers them, at a level drawn per clip.
    clip += 10 ** (-rng.uniform(35, 50) / 20) * np.sqrt(np.mean(clip ** 2)) * rng.standard_normal(n)
    # A microphone's high-pass: the one-signed pulses would leave a DC step under every syllable, and
    # noise excitation none, so the pauses alone would tell the classes apart.
    return sosfilt(butter(2, 60, "highpass", fs=sr, output="sos"), clip)


# attack: (the excitation defect it leaves, range of the defect's per-clip strength). The weakest
# fakes are hard to tell from their real twins, so a detector makes mistakes worth looking at.
FIXTURE_ATTACKS = {"noisy_excitation": ("aperiodicity", (0.03, 0.8)), "pulse_jitter": ("jitter", (0.005, 0.3))}


def make_fixture_corpus(out_dir=FIXTURE_AUDIO_DIR, n_speakers=12, clips_per_speaker=4, sr=22050,
                        seed=DataConfig.SEED):
    """A tiny real/fake folder corpus, made deterministically: each fake clip, fake/<attack>/, is its
    real twin (same speaker, words, duration, leading silence and loudness, so none of these separates
    the classes) synthesised again with the excitation defect of one of FIXTURE_ATTACKS, at a strength
    drawn per clip. Also two unusable files, to show how preparation reports them. Returns the corpus
    folder."""
    import soundfile as sf
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    speakers = []
    strata = math.ceil(clips_per_speaker / len(FIXTURE_ATTACKS))   # a speaker's fakes per attack
    for speaker in range(n_speakers):
        f0 = rng.uniform(90, 230)
        for clip in range(clips_per_speaker):
            seconds = rng.uniform(2.0, 12.0)
            silence = np.zeros(int(rng.uniform(0.05, 0.5) * sr))
            attack = list(FIXTURE_ATTACKS)[clip % len(FIXTURE_ATTACKS)]
            defect, (weakest, strongest) = FIXTURE_ATTACKS[attack]
            # A speaker's fakes of one attack take their strengths from successive parts of the
            # range, so every split, however few its speakers, holds fakes near their real twins.
            share = (clip // len(FIXTURE_ATTACKS) + rng.uniform()) / strata
            voice = rng.integers(2 ** 32)   # the twins share every draw of the voice but the defect
            real = _synthetic_utterance(np.random.default_rng(voice), sr, seconds, f0)
            fake = _synthetic_utterance(np.random.default_rng(voice), sr, seconds, f0,
                                        **{defect: weakest + share * (strongest - weakest)})
            level = rng.uniform(-32, -26)  # twins share a loudness, so level says nothing about the class
            for folder, audio in (("real", real), (f"fake/{attack}", fake)):
                audio = np.concatenate([silence, loudness_normalize(audio.astype(np.float32), sr, level)[0]])
                name = f"{folder}/spk{speaker:02d}_{folder.split('/')[0]}_{clip}.wav"
                with atomic_write(out_dir / name) as handle:
                    sf.write(handle, audio, sr, subtype="PCM_16", format="WAV")
                speakers.append((name, f"spk{speaker:02d}"))
    with atomic_write(out_dir / "real" / "spk00_silent.wav") as handle:
        sf.write(handle, np.zeros(sr * 3), sr, subtype="PCM_16", format="WAV")
    with atomic_write(out_dir / "fake" / "spk00_not_audio.wav") as handle:
        handle.write(b"this is a text file with a .wav name\n")
    speakers += [("real/spk00_silent.wav", "spk00"), ("fake/spk00_not_audio.wav", "spk00")]
    save_csv_atomic(out_dir / "speakers.csv", pd.DataFrame(speakers, columns=["file", "speaker"]))
    return out_dir


# ---------------------------------------------------------------- dataset
class DatasetError(Exception):
    """A processed dataset that cannot be used as it is; the message names the file and the problem."""


REQUIRED_METADATA_COLUMNS = {"npy_path", "original_path", "label", "segment_index"}


def read_metadata(split_dir):
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetError(f"Dataset split folder not found: {split_dir} (run notebook 00 / prepare_dataset first)")
    path = split_dir / "metadata.csv"
    if not path.is_file():
        raise DatasetError(f"Missing {path}")
    metadata = pd.read_csv(path, dtype={"speaker": str, "attack": str})
    missing = REQUIRED_METADATA_COLUMNS - set(metadata.columns)
    if missing:
        raise DatasetError(f"{path}: missing required column(s) {sorted(missing)}")
    if metadata.empty:
        raise DatasetError(f"{path}: the split is empty")
    bad = metadata.loc[~metadata["label"].isin([0, 1]), "label"]
    if len(bad):
        raise DatasetError(f"{path}: label must be 0 (real) or 1 (fake), found {bad.tolist()[0]!r} "
                           f"in row {bad.index[0] + 2}")
    missing_files = [p for p in metadata["npy_path"] if not (split_dir / p).is_file()]
    if missing_files:
        raise DatasetError(f"{path}: {len(missing_files)} .npy file(s) listed but missing, "
                           f"e.g. {split_dir / missing_files[0]}")
    metadata["label"] = metadata["label"].astype(int)
    return metadata


def read_dataset_metadata(dataset_dir):
    """Every split's metadata.csv in one table with a `split` column."""
    return pd.concat([read_metadata(Path(dataset_dir) / split).assign(split=split) for split in SPLITS],
                     ignore_index=True)


def spec_augment(spec, data_config=DataConfig(), generator=None):
    """SpecAugment on a (1, n_mels, frames) dB tensor: time and frequency masks set to the mask value."""
    spec = spec.clone()
    _, n_mels, frames = spec.shape

    def draw(high):
        return int(torch.randint(0, max(1, high) + 1, (1,), generator=generator))

    for _ in range(data_config.NUM_TIME_MASKS):
        width = draw(min(data_config.TIME_MASK_MAX_WIDTH, frames))
        start = draw(frames - width)
        spec[:, :, start:start + width] = data_config.fill_value
    for _ in range(data_config.NUM_FREQ_MASKS):
        width = draw(min(data_config.FREQ_MASK_MAX_WIDTH, n_mels))
        start = draw(n_mels - width)
        spec[:, start:start + width, :] = data_config.fill_value
    return spec


def speaker_channel_augment(spec, frequency_warp=0.0, equalizer_db=0.0, generator=None):
    """A (1, rows, frames) dB spectrogram as another speaker through another channel might give it:
    row i takes the value at row i / warp, with warp drawn within 1 +- frequency_warp (a shorter or
    longer vocal tract; rows beyond the top repeat it), plus a smooth tilt across the rows, the sum of
    three cosines, at most equalizer_db in all (another microphone or line). Both classes get the same,
    so a detector cannot lean on a voice's or a channel's colour, only on what synthesis leaves."""
    _, rows, _ = spec.shape
    position = torch.arange(rows, dtype=spec.dtype)
    if frequency_warp:
        warp = 1 + frequency_warp * (2 * torch.rand(1, generator=generator) - 1)
        source = (position / warp).clamp(max=rows - 1)
        below = source.floor().long()
        above = (below + 1).clamp(max=rows - 1)
        weight = (source - below)[:, None]
        spec = spec[:, below] * (1 - weight) + spec[:, above] * weight
    if equalizer_db:
        amplitudes = (2 * torch.rand(3, generator=generator) - 1) / 3
        harmonics = torch.arange(1, 4, dtype=spec.dtype)[:, None]
        tilt = (amplitudes[:, None] * torch.cos(math.pi * harmonics * position / (rows - 1))).sum(0)
        spec = spec + equalizer_db * tilt[:, None]
    return spec


def random_time_crop(spec, max_frames, generator=None):
    """A random `max_frames` window of the time axis; when the input is exactly that long, a random
    circular shift (crop at a random offset, wrap the rest), so no padding is introduced."""
    frames = spec.shape[-1]
    offset = int(torch.randint(0, max(frames - max_frames, max_frames) + 1, (1,), generator=generator))
    if frames > max_frames:
        return spec[..., offset:offset + max_frames]
    return torch.roll(spec, -offset, dims=-1)


class AudioDataset(Dataset):
    """Processed split -> (spectrogram float32 (1, n_mels, max_frames_spec), label).

    The .npy files hold log-mel in dB; augmentation (train only) acts in dB, where the mask value
    -80 dB means silence, and normalisation comes last: per spectrogram (each row's mean first taken
    off, with DataConfig.SUBTRACT_ROW_MEANS), or with the train split's statistics (normalization.json)
    when DataConfig.USE_GLOBAL_NORMALIZATION is set.
    `silenced_rows` (a slice of rows, for band_occlusion) are set to DataConfig.fill_value before
    augmentation and normalisation, so they carry nothing.
    Unreadable items come back as None (dropped by custom_collate_fn) and are counted in `dropped`.
    """

    def __init__(self, cache_dir, set_type, n_mels=DataConfig.N_MELS, max_frames_spec=256, augment=False,
                 data_config=DataConfig(), dataset_name=None, frequency_warp=0.0, equalizer_db=0.0,
                 silenced_rows=None):
        root = Path(cache_dir) / dataset_name if dataset_name else Path(cache_dir)
        self.split_dir = root / set_type
        self.metadata = read_metadata(self.split_dir)
        self.n_mels, self.max_frames_spec = n_mels, max_frames_spec
        self.augment, self.data_config = augment, data_config
        if augment and data_config.FEATURE == "lfcc" and (frequency_warp or equalizer_db):
            raise ValueError("TrainingConfig.frequency_warp and equalizer_db act on spectral rows; cepstra "
                             "(DataConfig.FEATURE='lfcc') have none: set both to 0")
        self.frequency_warp, self.equalizer_db = frequency_warp, equalizer_db
        self.silenced_rows = silenced_rows
        self.norm_stats = None
        if data_config.USE_GLOBAL_NORMALIZATION:
            stats_path = root / "normalization.json"
            if not stats_path.is_file():
                raise DatasetError(f"USE_GLOBAL_NORMALIZATION needs {stats_path} (written by prepare_dataset)")
            stats = json.loads(stats_path.read_text())
            self.norm_stats = (stats["mean"], stats["std"])
        self.dropped = mp.Value("i", 0)  # shared with DataLoader workers

    def __len__(self):
        return len(self.metadata)

    @property
    def labels(self):
        return self.metadata["label"].to_numpy()

    def load(self, idx):
        """The stored dB spectrogram as a (1, n_mels, frames) tensor; raises DatasetError."""
        path = self.split_dir / self.metadata["npy_path"].iat[idx]
        try:
            spec = np.load(path)
        except Exception as error:
            raise DatasetError(f"{path}: unreadable ({type(error).__name__})") from None
        if spec.ndim == 2:
            spec = spec[None]
        if spec.ndim != 3 or spec.shape[:2] != (1, self.n_mels):
            raise DatasetError(f"{path}: shape {spec.shape}, expected (1, {self.n_mels}, frames) or ({self.n_mels}, frames)")
        if not np.isfinite(spec).all():   # one NaN would turn every weight NaN a step later
            raise DatasetError(f"{path}: non-finite (NaN or inf) values")
        return torch.from_numpy(np.ascontiguousarray(spec, dtype=np.float32))

    def __getitem__(self, idx):
        try:
            spec = self.load(idx)
        except DatasetError as error:
            with self.dropped.get_lock():
                self.dropped.value += 1
            warnings.warn(str(error))
            return None
        if self.augment and self.data_config.USE_RANDOM_CROPPING:
            spec = random_time_crop(spec, self.max_frames_spec)
        # pad (-80 dB) or crop to max_frames_spec; a crop of a shorter spectrogram stays short
        spec = torch.from_numpy(fit_frames(spec.numpy(), self.max_frames_spec, self.data_config.fill_value))
        if self.silenced_rows is not None:
            spec[:, self.silenced_rows] = self.data_config.fill_value
        if self.augment:
            spec = speaker_channel_augment(spec, self.frequency_warp, self.equalizer_db)
            spec = spec_augment(spec, self.data_config)
        mean, std = self.norm_stats or (None, None)
        spec = normalize_spectrogram(spec, mean, std, self.data_config.NORM_EPSILON,
                                     self.data_config.SUBTRACT_ROW_MEANS)
        return spec, int(self.metadata["label"].iat[idx])


def custom_collate_fn(batch):
    """Collate, leaving out items the dataset could not read (None); None if nothing is left.
    The dataset counts each item it could not read (`AudioDataset.dropped`)."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)


# ---------------------------------------------------------------- model
class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention: every token's query is compared with every token's key, and the
    softmax of the scaled scores weighs the values."""

    def __init__(self, dim, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.attend_dropout = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def queries_keys_values(self, x):
        return (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))

    def forward(self, x, return_attention=False):
        q, k, v = self.queries_keys_values(x)
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        out = self.to_out(rearrange(self.attend_dropout(attn) @ v, "b h n d -> b n (h d)"))
        return (out, attn) if return_attention else out


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head, dropout)),
                           PreNorm(dim, FeedForward(dim, mlp_dim, dropout))])
            for _ in range(depth)])

    def forward(self, x, return_attention=False):
        maps = []
        for attn, ff in self.layers:
            if return_attention:
                out, weights = attn(x, return_attention=True)
                maps.append(weights)
                x = out + x
            else:
                x = attn(x) + x
            x = ff(x) + x
        return (x, maps) if return_attention else x


def patchify(config: ViTConfig):
    """(b, c, H, W) -> (b, num_patches, patch_dim), patches in row-major order. Non-overlapping
    patches are a reshape; overlapping ones are cut out with a sliding window (same feature order)."""
    if (config.stride_height, config.stride_width) == (config.patch_height, config.patch_width):
        return Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=config.patch_height, p2=config.patch_width)
    return nn.Sequential(nn.Unfold((config.patch_height, config.patch_width),
                                   stride=(config.stride_height, config.stride_width)),
                         Rearrange("b (c p1 p2) n -> b n (p1 p2 c)", c=config.channels,
                                   p1=config.patch_height, p2=config.patch_width))


def conv_patch_embedding(config: ViTConfig):
    """(b, c, H, W) -> (b, num_patches, dim) through early convolutions (Xiao et al., 2021): 3x3
    convolutions of stride 2, each halving the image and doubling the channels (up to dim / 2), until
    one position covers one patch, then a 1x1 convolution to the token width. Same token grid as the
    linear patch embedding; the convolutions see every position, as a CNN's first layers do."""
    steps = config.patch_height.bit_length() - 1
    widths = [config.channels] + [config.dim >> (steps + 1 - i) for i in range(1, steps + 1)]
    layers = [layer for c_in, c_out in zip(widths, widths[1:])
              for layer in (nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], config.dim, 1), Rearrange("b d h w -> b (h w) d"))


class AudioViT(nn.Module):
    """ViT over a log-mel spectrogram: 16x16 patches -> tokens, CLS token -> 2 logits (real, fake)."""

    def __init__(self, *, config: ViTConfig):
        super().__init__()
        self.config = config
        if config.patch_embedding == "conv":
            self.to_patch_embedding = nn.Sequential(conv_patch_embedding(config), nn.LayerNorm(config.dim))
        else:
            self.to_patch_embedding = nn.Sequential(
                patchify(config),
                nn.LayerNorm(config.patch_dim) if config.patch_norm else nn.Identity(),
                nn.Linear(config.patch_dim, config.dim),
                nn.LayerNorm(config.dim),
            )
        self.pos_embedding = nn.Parameter(torch.randn(1, config.num_patches + 1, config.dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.dim))
        self.dropout = nn.Dropout(config.emb_dropout)
        self.transformer = Transformer(config.dim, config.depth, config.heads, config.dim // config.heads,
                                       config.mlp_dim, config.dropout)
        self.mlp_head = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, config.num_classes))

    def forward(self, img, return_attention=False):
        x = self.to_patch_embedding(img)                       # (b, num_patches, dim)
        cls_tokens = repeat(self.cls_token, "1 1 d -> b 1 d", b=x.shape[0])
        x = self.dropout(torch.cat((cls_tokens, x), dim=1) + self.pos_embedding)
        if return_attention:
            x, maps = self.transformer(x, return_attention=True)
            return self.mlp_head(self.pooled(x)), maps          # maps: depth x (b, heads, n+1, n+1)
        return self.mlp_head(self.pooled(self.transformer(x)))

    def pooled(self, x):
        """The CLS token's output, or with pool="mean" the mean over all tokens."""
        return x.mean(dim=1) if self.config.pool == "mean" else x[:, 0]


class CNNConfig:
    """A ResNet-style CNN: `blocks[i]` residual blocks of `filters[i]` channels in stage i (stage i > 0
    halves the resolution); bottleneck blocks widen their output 4x."""

    def __init__(self, name, image_size, channels=1, num_classes=2, blocks=(2, 2, 2, 2),
                 filters=(64, 128, 256, 512), bottleneck=False):
        if len(blocks) != len(filters) or not blocks:
            raise ValueError(f"{name}: need one block count per filter width, got blocks {list(blocks)} "
                             f"and filters {list(filters)}")
        if any(f <= 0 for f in filters) or any(b < 0 for b in blocks) or not sum(blocks):
            raise ValueError(f"{name}: filters must be positive and blocks non-negative with at least one "
                             f"block, got blocks {list(blocks)} and filters {list(filters)}")
        self.name = name
        self.image_height, self.image_width = image_size
        self.channels, self.num_classes = channels, num_classes
        self.blocks, self.filters, self.bottleneck = list(blocks), list(filters), bottleneck

    def as_dict(self):
        return dict(name=self.name, image_size=[self.image_height, self.image_width], channels=self.channels,
                    num_classes=self.num_classes, blocks=self.blocks, filters=self.filters,
                    bottleneck=self.bottleneck)

    def __repr__(self):
        return f"CNNConfig({self.as_dict()})"


# ResNet layouts scaled so the trainable parameter counts at 128 x 256 match the ViT sizes:
# Small 2-3 M (ResNet-18's blocks at half width), Medium 4-6 M (ResNet-50's bottlenecks at half
# width), Large 10-12 M (ResNet-50's bottlenecks at 11/16 width).
CNN_SIZES = {
    "CNN_Small": dict(blocks=[2, 2, 2, 2], filters=[32, 64, 128, 256], bottleneck=False),
    "CNN_Medium": dict(blocks=[3, 4, 6, 3], filters=[32, 64, 128, 256], bottleneck=True),
    "CNN_Large": dict(blocks=[3, 4, 6, 3], filters=[44, 88, 176, 352], bottleneck=True),
}


def make_cnn_config(model_size, image_size=(DataConfig.N_MELS, 256)):
    if model_size not in CNN_SIZES:
        raise ValueError(f"Unknown model size {model_size!r}; choose one of {sorted(CNN_SIZES)}")
    return CNNConfig(model_size, image_size, **CNN_SIZES[model_size])


CNN_Small = make_cnn_config("CNN_Small")
CNN_Medium = make_cnn_config("CNN_Medium")
CNN_Large = make_cnn_config("CNN_Large")


def conv_bn(in_channels, out_channels, kernel_size, stride=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels))


def shortcut(in_channels, out_channels, stride):
    """A residual block's input path: the input itself, or a 1x1 projection when the block changes its shape."""
    return (nn.Identity() if stride == 1 and in_channels == out_channels
            else conv_bn(in_channels, out_channels, 1, stride))


class ResidualBlock(nn.Module):
    def forward(self, x):
        return F.relu(self.residual(x) + self.shortcut(x))


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions plus the input (projected by a 1x1 convolution when the shape changes)."""
    expansion = 1

    def __init__(self, in_channels, width, stride=1):
        super().__init__()
        self.residual = nn.Sequential(conv_bn(in_channels, width, 3, stride), nn.ReLU(inplace=True),
                                      conv_bn(width, width, 3))
        self.shortcut = shortcut(in_channels, width, stride)


class BottleneckBlock(ResidualBlock):
    """1x1 down to `width`, 3x3 at `width`, 1x1 up to 4 x width: deeper for the same parameters."""
    expansion = 4

    def __init__(self, in_channels, width, stride=1):
        super().__init__()
        out_channels = width * self.expansion
        self.residual = nn.Sequential(conv_bn(in_channels, width, 1), nn.ReLU(inplace=True),
                                      conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                                      conv_bn(width, out_channels, 1))
        self.shortcut = shortcut(in_channels, out_channels, stride)


class AudioCNN(nn.Module):
    """ResNet over a log-mel spectrogram: a 7x7 stride-2 convolution and max pooling (1/4 resolution),
    residual stages, global average pooling, a linear layer giving 2 logits (real, fake). The pooling
    makes it accept any spectrogram width."""

    def __init__(self, *, config: CNNConfig):
        super().__init__()
        self.config = config
        block = BottleneckBlock if config.bottleneck else BasicBlock
        self.stem = nn.Sequential(conv_bn(config.channels, config.filters[0], 7, stride=2), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        stages, channels = [], config.filters[0]
        for stage, (n_blocks, width) in enumerate(zip(config.blocks, config.filters)):
            for index in range(n_blocks):
                stages.append(block(channels, width, stride=2 if stage > 0 and index == 0 else 1))
                channels = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, config.num_classes))

    def forward(self, img):
        return self.head(self.stages(self.stem(img)))           # (b, 1, n_mels, frames) -> (b, 2)


ARCHITECTURE_CONFIGS = {"vit": ViTConfig, "cnn": CNNConfig}


def architecture_of(config):
    """"vit" or "cnn": which model a ViTConfig or CNNConfig describes; checkpoints store it."""
    return "cnn" if isinstance(config, CNNConfig) else "vit"


def make_architecture_config(model_size, image_size=(DataConfig.N_MELS, 256), patch_embedding="linear"):
    """A ViTConfig for ViT_Small/Medium/Large, a CNNConfig for CNN_Small/Medium/Large."""
    if model_size in CNN_SIZES:
        return make_cnn_config(model_size, image_size)
    if model_size in VIT_SIZES:
        return make_vit_config(model_size, image_size, patch_embedding=patch_embedding)
    raise ValueError(f"Unknown model size {model_size!r}; choose one of {[*VIT_SIZES, *CNN_SIZES]}")


def build_model(config):
    """AudioViT or AudioCNN, whichever `config` describes."""
    return AudioCNN(config=config) if architecture_of(config) == "cnn" else AudioViT(config=config)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_table(image_size=(DataConfig.N_MELS, 256), patch_embedding=TrainingConfig.patch_embedding):
    """Trainable parameters of each ViT size at `image_size`, with the recipe's patch embedding by default."""
    rows = []
    for size in VIT_SIZES:
        config = make_vit_config(size, image_size, patch_embedding=patch_embedding)
        rows.append(dict(model_size=size, dim=config.dim, depth=config.depth, heads=config.heads,
                         mlp_dim=config.mlp_dim, patches=config.num_patches,
                         params_M=round(count_parameters(AudioViT(config=config)) / 1e6, 3)))
    return pd.DataFrame(rows)


def cnn_parameter_table(image_size=(DataConfig.N_MELS, 256)):
    rows = []
    for size in CNN_SIZES:
        config = make_cnn_config(size, image_size)
        rows.append(dict(model_size=size, block="bottleneck" if config.bottleneck else "basic",
                         blocks=config.blocks, filters=config.filters,
                         params_M=round(count_parameters(AudioCNN(config=config)) / 1e6, 3)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- speed-ups
# The model classes above are the plain formulation, to be read. `speed_up` swaps in faster
# implementations of the same function and the same parameters, from outside, for training and scoring.
def fast_dropout(x, p, training=True):
    """Inverted dropout, as F.dropout. On CPU, F.dropout's bernoulli_ draws one single-threaded
    mt19937 number per element (PyTorch uses MKL's parallel generator only on Intel CPUs), about a
    third of a ViT_Small training step on a 2-core AMD machine. Here the keep mask comes from 16
    random bits per element out of numpy's SFC64, about 2.7x faster than torch's generator per
    bit, seeded from torch's generator so that torch.manual_seed still fixes every mask. p is
    rounded to a multiple of 2**-16 (0.1 -> 0.1000061). Other devices, and torch.compile, use
    F.dropout."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    words = np.random.SFC64(seed).random_raw((x.numel() + 3) // 4)
    lanes = torch.from_numpy(words).view(torch.int16)[: x.numel()].view(x.shape)
    # comparing straight into a float tensor is one pass; a bool mask and .to(float) take three
    keep = torch.ge(lanes, round(p * 65536) - 32768, out=torch.empty_like(x))
    return x * keep.mul_(1 / (1 - p))


class FastDropout(nn.Dropout):
    def forward(self, x):
        return fast_dropout(x, self.p, self.training)


class FusedAttention(Attention):
    """Attention through PyTorch's scaled_dot_product_attention (fused kernels), where that is faster.
    The plain path stays for the attention maps, and for training with dropout on CPU, where SDPA
    has no fused kernel and falls back to the same math with F.dropout's slower mask."""

    def uses_sdpa(self, x, return_attention):
        dropout_on_cpu = self.training and self.attend_dropout.p > 0 and x.device.type == "cpu"
        return not return_attention and not dropout_on_cpu

    def forward(self, x, return_attention=False):
        if not self.uses_sdpa(x, return_attention):
            return super().forward(x, return_attention)
        q, k, v = self.queries_keys_values(x)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attend_dropout.p if self.training else 0.0)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


FASTER = {nn.Dropout: FastDropout, Attention: FusedAttention}


def speed_up(model):
    """Swap every nn.Dropout and Attention in `model` for its faster twin, in place, and return it.
    Changing a module's class keeps its parameters, buffers and hooks, so the state dict, the
    checkpoints and the results (up to float rounding and which units dropout draws) are unchanged."""
    for module in model.modules():
        module.__class__ = FASTER.get(type(module), type(module))
    return model


# ---------------------------------------------------------------- training
def set_seed(seed=DataConfig.SEED):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device():
    """CUDA if available, else Apple MPS, else CPU; VIT_DEVICE (cpu, cuda, cuda:1, mps) chooses instead.
    The test session sets it to cpu, so the printed numbers nbval compares are the same on every machine."""
    requested = os.environ.get("VIT_DEVICE")
    if not requested:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"VIT_DEVICE={requested!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ValueError(f"VIT_DEVICE={requested!r}: {device.type} is not available on this machine")
    return device


def is_main_process():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _all_gather(obj):
    """Every rank's `obj` as a list (a one-item list when not distributed)."""
    if not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _cpuinfo_field(*names):
    """The first /proc/cpuinfo line's value whose key is one of `names` ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.split(":")[0].strip() in names), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def cpu_flags():
    """The CPU's instruction-set flags (from /proc/cpuinfo; empty where the system does not have it)."""
    return set(_cpuinfo_field("flags", "Features").split())


def cpu_model():
    """The CPU's model name, for the records of timed runs."""
    return _cpuinfo_field("model name", "Model name") or platform.processor() or platform.machine()


# x86 instructions that multiply bf16 numbers natively; without them a bf16 matmul is emulated and
# autocast makes training about ten times slower instead of two to three times faster.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    """The floating-point type the forward pass is autocast to (None: fp32), and why it was chosen."""
    dtype: torch.dtype | None
    reason: str

    def autocast(self, device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.dtype)

    def grad_scaler(self, device):
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return torch.amp.GradScaler(torch.device(device).type, enabled=self.dtype == torch.float16)

    def __str__(self):
        name = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.dtype]
        return f"{name} ({self.reason})"


def choose_precision(device, setting="auto", flags=None, kernels=None):
    """The Precision for `device` under TrainingConfig.mixed_precision `setting`. "auto" reads the
    hardware, never a timing: on CUDA, bf16 where the GPU supports it, else fp16; on a CPU, bf16 only
    where the CPU has bf16 instructions (CPU_BF16_FLAGS) and PyTorch runs its AVX-512 kernels, else
    fp32; on MPS, fp32. The environment variable VIT_MIXED_PRECISION (auto, on, off) replaces "auto"
    (the test session sets off, so what the tests compare does not depend on the CPU). `flags` (the
    CPU's, cpu_flags()) and `kernels` (torch.backends.cpu.get_cpu_capability()) are for tests."""
    device = torch.device(device)
    source = "mixed_precision"
    if setting == "auto":
        source = "VIT_MIXED_PRECISION"
        setting = os.environ.get(source, "auto").strip().lower() or "auto"
    if setting not in MIXED_PRECISION_SETTINGS:
        raise ValueError(f"{source}={setting!r}: choose one of {MIXED_PRECISION_SETTINGS}")
    if setting == "off":
        return Precision(None, f"{source}=off")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "the GPU supports bf16")
        return Precision(torch.float16, "the GPU has no bf16; fp16 with loss scaling")
    if device.type == "mps":
        return (Precision(torch.float16, f"{source}=on") if setting == "on"
                else Precision(None, "no measured gain from autocast on MPS"))
    flags = cpu_flags() if flags is None else set(flags)
    kernels = torch.backends.cpu.get_cpu_capability() if kernels is None else kernels
    native = sorted(flags.intersection(CPU_BF16_FLAGS))
    if setting == "on":
        return Precision(torch.bfloat16, f"{source}=on" + ("" if native else
                                                            "; this CPU has no bf16 instructions, expect it to be slower"))
    if not native:
        return Precision(None, f"the CPU has none of {', '.join(CPU_BF16_FLAGS)}")
    if not kernels.upper().startswith(("AVX512", "AMX")):
        return Precision(None, f"the CPU has {native[0]} but PyTorch runs its {kernels} kernels")
    return Precision(torch.bfloat16, f"the CPU has {native[0]}")


def save_checkpoint(path, **state):
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None


def _unwrap(model):
    model = getattr(model, "module", model)       # DistributedDataParallel
    return getattr(model, "_orig_mod", model)      # torch.compile


def train_model(model, train_loader, val_loader, optimizer, criterion, device, config: TrainingConfig,
                scheduler=None, wandb_run=None, state=None, checkpoint_extras=None, precision=None):
    """Train for `config.epochs`, validate every epoch, keep the best model by validation F1 (the
    original recipe) or, with select_best_by="val_eer", by validation EER, which needs no decision
    threshold.

    Writes `config.checkpoint_path("best")` (best so far) and `config.checkpoint_path("last")` (every
    epoch, for resuming) atomically. With `config.ema_decay`, validation, the best checkpoint and its
    test scores use the moving average of the weights; the last checkpoint holds both. `state` (from a
    last checkpoint) continues an earlier run. The forward pass runs under `precision` (default: the
    one choose_precision picks for config.mixed_precision); the loss is taken in fp32, and validation
    runs in fp32, so the EER that picks the best epoch does not depend on the hardware's 16-bit type.
    Returns the per-epoch history.
    """
    state = state or {}
    precision = precision or choose_precision(device, config.mixed_precision)
    averaged = None
    if config.ema_decay is not None:
        averaged = torch.optim.swa_utils.AveragedModel(
            _unwrap(model), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay),
            use_buffers=True)   # BatchNorm statistics are averaged with the weights they belong to
        if state.get("ema_state"):
            averaged.load_state_dict(state["ema_state"])
    evaluated = model if averaged is None else averaged.module
    history = list(state.get("history", []))
    select_best_by = config.select_best_by
    best_value = state.get(f"best_{select_best_by}")
    stale_epochs = state.get("stale_epochs", 0)
    scaler = precision.grad_scaler(device)
    if "scaler_state" in state:
        scaler.load_state_dict(state["scaler_state"])
    for epoch in range(state.get("epoch", 0) + 1, config.epochs + 1):
        if config.early_stopping_patience is not None and stale_epochs >= config.early_stopping_patience:
            break
        torch.manual_seed(config.seed + epoch)  # shuffling, augmentation and dropout depend only on the epoch
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum, seen = 0.0, 0
        for batch in tqdm(train_loader, desc=f"Epoch {epoch}", leave=False, disable=not config.progress):
            if batch is None:
                continue
            inputs, labels = batch[0].to(device), batch[1].to(device)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast(device):
                logits = model(inputs)
            loss = criterion(logits.float(), labels)
            scaler.scale(loss).backward()
            if config.grad_clip_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            if averaged is not None:
                averaged.update_parameters(_unwrap(model))
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        totals = np.sum(_all_gather((loss_sum, seen)), axis=0)
        train_loss = float(totals[0] / max(totals[1], 1))
        val_loss, _, val_labels, val_probs = evaluate_model(evaluated, val_loader, criterion, device)
        val = compute_metrics(val_labels, val_probs)
        record = dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_accuracy=val["accuracy"],
                      val_f1=val["f1"], val_roc_auc=val["roc_auc"], val_eer=val["eer"],
                      lr=optimizer.param_groups[0]["lr"])
        history.append(record)
        value = record[select_best_by]
        improved = best_value is None or (value < best_value if select_best_by == "val_eer" else value > best_value)
        best_value, stale_epochs = (value, 0) if improved else (best_value, stale_epochs + 1)
        dropped = sum(loader.dataset.dropped.value for loader in (train_loader, val_loader)
                      if hasattr(loader.dataset, "dropped"))
        if not is_main_process():
            continue
        print(f"Epoch {epoch} Train Loss: {train_loss:.4f}, Val Loss: {val_loss:.4f}, "
              f"Val Acc: {val['accuracy']:.4f}, Val F1: {val['f1']:.4f}, Val ROC AUC: {val['roc_auc']:.4f}, "
              f"Val EER: {val['eer']:.4f}")
        if dropped:
            print(f"  {dropped} unreadable item(s) dropped so far (see the warnings above)")
        if wandb_run is not None:
            wandb_run.log(record, step=epoch)
        common = dict(epoch=epoch, **{f"best_{select_best_by}": best_value}, metrics=record, history=history,
                      **(checkpoint_extras or {}))
        if improved:
            save_checkpoint(config.checkpoint_path("best"), model_state=_unwrap(evaluated).state_dict(), **common)
        save_checkpoint(config.checkpoint_path("last"), model_state=_unwrap(model).state_dict(), **common,
                        ema_state=averaged.state_dict() if averaged is not None else None,
                        optimizer_state=optimizer.state_dict(), stale_epochs=stale_epochs,
                        scheduler_state=scheduler.state_dict() if scheduler else None,
                        scaler_state=scaler.state_dict())
    return history


def make_optimizer(model, config: TrainingConfig, device):
    """Adam or AdamW as configured; the fused kernel (one pass over all parameters, the same update)
    on CPU and CUDA, where it is about 4x faster than the per-parameter loop."""
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                           fused=device.type in ("cpu", "cuda"))


def warmup_cosine_schedule(optimizer, warmup_steps, total_steps):
    """Linear warm-up from 0 to the base learning rate, then cosine decay to 0."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _init_distributed():
    """Join the process group when launched by torchrun; returns (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank, world_size


def build_loaders(config: TrainingConfig, model_config, data_config=DataConfig()):
    """Datasets and loaders for train/val/test. Under torchrun, each rank gets a shard."""
    data_root = Path(config.cache_dir) / config.dataset_name
    datasets = {split: AudioDataset(data_root, split, data_config.N_MELS, model_config.max_frames_spec,
                                    augment=split == "train" and model_config.apply_augmentation,
                                    data_config=data_config, frequency_warp=config.frequency_warp,
                                    equalizer_db=config.equalizer_db) for split in SPLITS}
    for split, dataset in datasets.items():   # an EER, the threshold and the balanced sampler need both
        missing = [name for label, name in enumerate(CLASS_NAMES) if label not in set(dataset.labels)]
        if missing:
            raise DatasetError(f"{display_path(data_root / split / 'metadata.csv')}: the {split} split has no "
                               f"{' and no '.join(missing)} segments; every split needs both classes")
    distributed = torch.distributed.is_initialized()
    if distributed and config.class_balance == "balanced_sampler":
        raise ValueError("class_balance='balanced_sampler' is not supported with torchrun; use 'weighted_loss'")
    train_sampler = None
    if config.class_balance == "balanced_sampler":
        labels = datasets["train"].labels
        weights = 1.0 / np.bincount(labels, minlength=2)[labels]
        train_sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True)
    elif distributed:
        train_sampler = torch.utils.data.DistributedSampler(datasets["train"], shuffle=True, seed=config.seed)
    common = dict(batch_size=config.batch_size, num_workers=config.num_workers, collate_fn=custom_collate_fn,
                  pin_memory=torch.cuda.is_available(), persistent_workers=config.num_workers > 0)
    loaders = {"train": DataLoader(datasets["train"], shuffle=train_sampler is None, sampler=train_sampler,
                                   **common)}
    for split in ("val", "test"):
        dataset = datasets[split]
        if distributed:  # contiguous-free strided shard, no padding: every item scored exactly once
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
        loaders[split] = DataLoader(dataset, shuffle=False, **common)
    return datasets, loaders


def run_training(training_config: TrainingConfig, data_config=DataConfig()):
    """Build data, model, optimiser and loss from the config; train; evaluate the best checkpoint on
    test. Runs under torchrun unchanged (DistributedDataParallel). Returns the test metrics."""
    config = training_config
    rank, world_size = _init_distributed()
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if world_size > 1 and torch.cuda.is_available() else get_device()
    set_seed(config.seed)
    model_config = make_model_config(config.dataset_name, data_config)
    architecture_config = make_architecture_config(config.model_size, (data_config.N_MELS, model_config.max_frames_spec),
                                                   config.patch_embedding)
    datasets, loaders = build_loaders(config, model_config, data_config)
    model = build_model(architecture_config).to(device)
    if config.speed_up:
        speed_up(model)
    n_params = count_parameters(model)
    precision = choose_precision(device, config.mixed_precision)
    if is_main_process():
        print(f"Run {config.run_name}: {config.model_size} on {config.dataset_name}, {config.epochs} epochs, "
              f"batch {config.batch_size}, lr {config.learning_rate:g}, optimizer {config.optimizer}, "
              f"schedule {config.lr_schedule}, class balance {config.class_balance}")
        print(f"Dataset sizes (segments): train {len(datasets['train'])}, val {len(datasets['val'])}, "
              f"test {len(datasets['test'])}")
        print(f"Device: {device.type}" + (f" x {world_size} processes" if world_size > 1 else ""))
        print(f"Precision: {precision}")
        print(f"Trainable parameters: {n_params:,}")
    optimizer = make_optimizer(model, config, device)
    scheduler = None
    if config.lr_schedule == "warmup_cosine":
        steps_per_epoch = len(loaders["train"])
        scheduler = warmup_cosine_schedule(optimizer, int(config.warmup_epochs * steps_per_epoch),
                                           config.epochs * steps_per_epoch)
    class_weights = None
    if config.class_balance == "weighted_loss":
        counts = np.bincount(datasets["train"].labels, minlength=2)
        class_weights = torch.tensor(counts.sum() / (2.0 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=class_weights)
    train_normalization = datasets["train"].norm_stats   # inference needs them for a globally normalised model
    extras = dict(architecture=config.architecture, **{f"{config.architecture}_config": architecture_config.as_dict()},
                  model_config=model_config.as_dict(),
                  training_config=asdict(config), data_config=data_settings(data_config),
                  normalization=train_normalization and dict(zip(("mean", "std"), train_normalization)),
                  dataset_fingerprint=dataset_fingerprint(Path(config.cache_dir) / config.dataset_name))
    last_path = config.checkpoint_path("last")
    state = None
    if config.resume and last_path.is_file():
        state = load_checkpoint(last_path, device)
        check_checkpoint_compatible(state, architecture_config, last_path)
        check_same_run(state, extras, last_path)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        if scheduler is not None and state.get("scheduler_state"):
            scheduler.load_state_dict(state["scheduler_state"])
        if is_main_process():
            print(f"Resuming from epoch {state['epoch']} ({display_path(last_path)})")
    train_module = torch.compile(model) if config.compile else model
    if world_size > 1:
        train_module = torch.nn.parallel.DistributedDataParallel(
            train_module, device_ids=[device.index] if device.type == "cuda" else None)
    wandb_run = init_wandb(config.run_name, extras, mode=config.wandb_mode) if is_main_process() else None
    try:
        started = time.perf_counter()
        history = train_model(train_module, loaders["train"], loaders["val"], optimizer, criterion, device, config,
                              scheduler=scheduler, wandb_run=wandb_run, state=state, checkpoint_extras=extras,
                              precision=precision)
        training_seconds = time.perf_counter() - started   # every epoch with its validation
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 has written the best checkpoint
        best = load_checkpoint(config.checkpoint_path(), device)
        model.load_state_dict(best["model_state"])
        test_loss, test_preds, test_labels, test_probs, cm = evaluate_model(model, loaders["test"], criterion,
                                                                          device, return_cm=True)
        test = compute_metrics(test_labels, test_probs)
        metrics = dict(run_name=config.run_name, best_epoch=best["epoch"], test_loss=test_loss,
                       test_accuracy=test["accuracy"], test_f1=test["f1"], test_roc_auc=test["roc_auc"],
                       test_eer=test["eer"], history=history, parameters=n_params,
                       training_seconds=round(training_seconds, 1))
        if is_main_process():
            print(f"Test Loss: {test_loss:.4f}, Test Accuracy: {test['accuracy']:.4f}, "
                  f"Test F1-score: {test['f1']:.4f}, Test ROC AUC: {test['roc_auc']:.4f}")
            store_verdict_threshold(config.checkpoint_path(), best, model, datasets["val"], device)
            plot_confusion_matrix(cm, CLASS_NAMES, config.run_name, config.results_dir, wandb_run=wandb_run)
            save_json_atomic(Path(config.results_dir) / f"training_{config.run_name}.json", metrics)
            if wandb_run is not None:
                wandb_run.summary.update({k: v for k, v in metrics.items() if k != "history"})
                log_checkpoint(wandb_run, config.checkpoint_path())
        return metrics
    finally:
        if wandb_run is not None:
            wandb_run.finish()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- evaluation
def evaluate_model(model, data_loader, criterion, device, return_cm=False):
    """Average loss, predictions, labels and fake-class probabilities (numpy) over the loader,
    gathered from every rank under torchrun; the confusion matrix too with return_cm."""
    from sklearn.metrics import confusion_matrix
    model.eval()
    loss_sum, logits, labels = 0.0, [], []
    with torch.no_grad():
        for batch in data_loader:
            if batch is None:
                continue
            inputs, targets = batch[0].to(device), batch[1].to(device)
            out = model(inputs)
            loss_sum += criterion(out, targets).item() * len(targets)
            logits.append(out.float().cpu())
            labels.append(targets.cpu())
    local = (loss_sum, torch.cat(logits).numpy() if logits else np.zeros((0, 2), np.float32),
             torch.cat(labels).numpy() if labels else np.zeros(0, np.int64))
    parts = _all_gather(local)
    all_logits = np.concatenate([p[1] for p in parts]).astype(np.float64)
    all_labels = np.concatenate([p[2] for p in parts])
    avg_loss = float(sum(p[0] for p in parts) / max(len(all_labels), 1))
    probs = softmax_fake_probability(all_logits)
    preds = (probs > 0.5).astype(int)
    if return_cm:
        return avg_loss, preds, all_labels, probs, confusion_matrix(all_labels, preds, labels=[0, 1])
    return avg_loss, preds, all_labels, probs


def softmax_fake_probability(logits):
    logits = np.asarray(logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))


def _check_scores(labels, scores):
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.size == 0 or scores.size == 0:
        raise ValueError("empty score list")
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} NaN score(s)")
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError(f"labels must be 0 (bona fide) or 1 (spoof), found {sorted(set(np.unique(labels)))}")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"need both bona fide and spoof scores, got only {CLASS_NAMES[int(labels[0])].lower()}")
    return labels, scores


def det_curve(bonafide_scores, spoof_scores):
    """False rejection and false acceptance rates at every threshold, as the official ASVspoof
    evaluation package computes them (higher score = bona fide; stable sort, so ties are handled
    the same way). Returns (frr, far, thresholds)."""
    bonafide_scores = np.asarray(bonafide_scores, dtype=np.float64)
    spoof_scores = np.asarray(spoof_scores, dtype=np.float64)
    all_scores = np.concatenate([bonafide_scores, spoof_scores])
    if np.isnan(all_scores).any():   # a NaN sorts last and would pass for the highest bona fide score
        raise ValueError(f"{int(np.isnan(all_scores).sum())} NaN score(s): an EER needs a score for every file")
    if not bonafide_scores.size or not spoof_scores.size:
        raise ValueError(f"an EER needs bona fide and spoof scores, got {bonafide_scores.size} and {spoof_scores.size}")
    is_bonafide = np.concatenate([np.ones(bonafide_scores.size), np.zeros(spoof_scores.size)])
    order = np.argsort(all_scores, kind="mergesort")
    is_bonafide = is_bonafide[order]
    bonafide_below = np.cumsum(is_bonafide)
    spoof_above = spoof_scores.size - (np.arange(1, all_scores.size + 1) - bonafide_below)
    frr = np.concatenate([[0.0], bonafide_below / bonafide_scores.size])
    far = np.concatenate([[1.0], spoof_above / spoof_scores.size])
    thresholds = np.concatenate([[all_scores[order[0]] - 0.001], all_scores[order]])
    return frr, far, thresholds


def equal_error_rate(bonafide_scores, spoof_scores):
    """(EER, threshold) as in the official ASVspoof package: the point where |FRR - FAR| is smallest,
    EER being the mean of the two there."""
    frr, far, thresholds = det_curve(bonafide_scores, spoof_scores)
    index = np.argmin(np.abs(frr - far))
    return float(np.mean((frr[index], far[index]))), float(thresholds[index])


def eer_from_labels(labels, scores):
    """EER from labels (0 bona fide, 1 spoof) and scores where higher means bona fide."""
    labels, scores = _check_scores(labels, scores)
    return equal_error_rate(scores[labels == 0], scores[labels == 1])


def compute_metrics(labels, fake_probs):
    """Accuracy, F1 (fake = positive class) and their values at the EER threshold, ROC AUC, EER."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    labels, fake_probs = _check_scores(labels, fake_probs)
    eer, threshold = eer_from_labels(labels, -fake_probs)   # bona fide score = -p(fake)
    at_eer = (-fake_probs <= threshold).astype(int)         # rejected as bona fide -> called fake
    preds = (fake_probs > 0.5).astype(int)
    return dict(accuracy=float(accuracy_score(labels, preds)), f1=float(f1_score(labels, preds, zero_division=0)),
                roc_auc=float(roc_auc_score(labels, fake_probs)), eer=eer, eer_threshold_p_fake=-threshold,
                accuracy_at_eer=float(accuracy_score(labels, at_eer)),
                f1_at_eer=float(f1_score(labels, at_eer, zero_division=0)))


def score_segments(model, dataset, device, batch_size=32):
    """The dataset's metadata with each segment's `score` (logit_real - logit_fake: higher = bona
    fide) and `p_fake`. Segments that cannot be read get NaN and are counted in dataset.dropped."""
    model.eval()
    scores = np.full(len(dataset), np.nan)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [(i, dataset[i]) for i in range(start, min(start + batch_size, len(dataset)))]
            items = [(i, item[0]) for i, item in items if item is not None]
            if not items:
                continue
            logits = model(torch.stack([spec for _, spec in items]).to(device)).float().cpu().numpy()
            scores[[i for i, _ in items]] = logits[:, 0] - logits[:, 1]
    frame = dataset.metadata.copy()
    frame["score"] = scores
    frame["p_fake"] = 1.0 / (1.0 + np.exp(scores))
    return frame


def split_dataset_for(model, cache_dir, dataset_name, split="test", data_config=DataConfig()):
    """One split of a processed dataset as the model's input, after checking the model fits its shape."""
    model_config = make_model_config(dataset_name, data_config)
    if model.config.image_width != model_config.max_frames_spec or model.config.image_height != data_config.N_MELS:
        raise ValueError(f"the model takes {model.config.image_height}x{model.config.image_width} spectrograms "
                         f"but {dataset_name} has {data_config.N_MELS}x{model_config.max_frames_spec}")
    return AudioDataset(Path(cache_dir) / dataset_name, split, data_config.N_MELS, model_config.max_frames_spec,
                        data_config=data_config)


def score_split(model, cache_dir, dataset_name, split="test", device="cpu", data_config=DataConfig()):
    """Segment scores of one split of a processed dataset."""
    return score_segments(model, split_dataset_for(model, cache_dir, dataset_name, split, data_config), device)


def row_frequencies(data_config=DataConfig()):
    """The n_mels + 2 filter edges in Hz of the spectrogram's rows: row i spans edges i to i + 2.
    None for cepstra (FEATURE="lfcc"), whose rows are not frequency bands."""
    import librosa
    if data_config.FEATURE == "lfcc":
        return None
    if data_config.FEATURE == "linear":
        return np.linspace(data_config.FMIN, data_config.FMAX, data_config.N_MELS + 2)
    return librosa.mel_frequencies(data_config.N_MELS + 2, fmin=data_config.FMIN, fmax=data_config.FMAX)


def band_occlusion(model, dataset, rows_per_band=16, device="cpu"):
    """Which frequency bands the decision rests on: the split scored again with each band of
    `rows_per_band` rows silenced (AudioDataset.silenced_rows), beside the intact segments. Per band:
    the segment-level EER and each class's mean score (log-odds of bona fide). A band whose loss
    pulls both classes' scores toward 0 and the EER up carries the decision; unlike an attention
    map, this measures what the output depends on."""
    edges = row_frequencies(dataset.data_config)
    rows = []
    for first in [None, *range(0, dataset.n_mels, rows_per_band)]:
        occluded = copy.copy(dataset)
        occluded.silenced_rows = None if first is None else slice(first, first + rows_per_band)
        segments = score_segments(model, occluded, device).dropna(subset=["score"])
        last = None if first is None else min(first + rows_per_band, dataset.n_mels) - 1
        rows.append(dict(
            silenced="none" if first is None else f"rows {first}-{last}",
            low_hz=np.nan if first is None or edges is None else round(float(edges[first])),
            high_hz=np.nan if first is None or edges is None else round(float(edges[last + 2])),
            segment_eer=eer_from_labels(segments["label"], segments["score"])[0],
            mean_score_bonafide=segments.loc[segments["label"] == 0, "score"].mean(),
            mean_score_spoof=segments.loc[segments["label"] == 1, "score"].mean()))
    return pd.DataFrame(rows)


def multi_seed_eer(training_config: TrainingConfig, seeds=(42, 43, 44), data_config=DataConfig()):
    """Train once per seed and report the test file-level EER of each best checkpoint, so a result
    can be quoted as mean +- std rather than one lucky run."""
    rows = []
    for seed in seeds:
        config = TrainingConfig(**{**asdict(training_config), "seed": seed,
                                   "run_name": f"{training_config.run_name}_seed{seed}"})
        run_training(config, data_config)
        model, _ = load_model(config.checkpoint_path())
        report = metrics_report(score_split(model, config.cache_dir, config.dataset_name, "test",
                                            data_config=data_config))
        rows.append(dict(seed=seed, file_eer=report["file"]["eer"], segment_eer=report["segment"]["eer"]))
    table = pd.DataFrame(rows)
    std = table["file_eer"].std(ddof=1) if len(table) > 1 else float("nan")
    print(f"File-level test EER over {len(table)} seed(s): {table['file_eer'].mean():.4f} +- {std:.4f}")
    return table


def pool_file_scores(segments):
    """One row per original file: its facts (label, speaker, attack, duration, ...) and, for scored
    segments, the mean of their scores (logit differences), i.e. the file's average log-odds of bona
    fide; p_fake is that mean mapped back to a probability."""
    scored = "score" in segments
    if scored:
        segments = segments.dropna(subset=["score"])
    facts = [c for c in ("label", "speaker", "attack", "source", *CLIP_FACTS) if c in segments.columns]
    aggregations = {c: (c, "first") for c in facts}
    aggregations["n_segments"] = ("segment_index", "size")
    if "filled_fraction" in segments:
        aggregations["filled_fraction"] = ("filled_fraction", "mean")
    if scored:
        aggregations["score"] = ("score", "mean")
    files = segments.groupby("original_path", sort=True).agg(**aggregations).reset_index()
    if scored:
        files["p_fake"] = 1.0 / (1.0 + np.exp(files["score"]))
    return files


def segment_losses(segments):
    """Each segment's cross-entropy from its score = logit(real) - logit(fake): -log p(true class),
    i.e. log(1 + e^score) for a fake and log(1 + e^-score) for a real one, computed without overflow."""
    score = segments["score"].to_numpy(dtype=np.float64)
    return pd.Series(np.logaddexp(0.0, np.where(segments["label"] == 1, score, -score)), index=segments.index)


def metrics_report(segments):
    """Every metric at segment and at file level (file level is the headline)."""
    files = pool_file_scores(segments)
    scored = segments.dropna(subset=["score"])
    return {"file": compute_metrics(files["label"], files["p_fake"]),
            "segment": compute_metrics(scored["label"], scored["p_fake"])}


def validation_eer_threshold(model, val_dataset, device):
    """The verdict threshold: where the file-level validation scores (each file's mean segment score,
    pooled as verdicts pool them) reach the EER. A file scoring at or below it is called fake.
    None when the validation split lacks a class."""
    files = pool_file_scores(score_segments(model, val_dataset, device))
    if files["label"].nunique() < 2:
        return None
    return eer_from_labels(files["label"], files["score"])[1]


def store_verdict_threshold(path, checkpoint, model, val_dataset, device):
    """Add the validation-EER threshold of `model` (holding `checkpoint`'s weights) to the checkpoint at `path`."""
    threshold = validation_eer_threshold(model, val_dataset, device)
    if threshold is None:
        print("No verdict threshold stored: the validation split lacks a class, so verdicts will use score 0")
        return
    save_checkpoint(path, **{**checkpoint, "eer_threshold": threshold})
    print(f"Verdict threshold (validation EER, file level): score <= {threshold:.4f} is fake")


def per_attack_eer(files):
    """EER of all bona fide files against the spoofed files of each attack, plus the pooled EER."""
    bonafide = files.loc[files["label"] == 0, "score"]
    spoof = files[files["label"] == 1]
    rows = [dict(attack=str(attack), spoof_files=len(group),
                 eer=equal_error_rate(bonafide, group["score"])[0])
            for attack, group in spoof.groupby(spoof["attack"].fillna("unknown"))]
    rows.append(dict(attack="pooled", spoof_files=len(spoof), eer=equal_error_rate(bonafide, spoof["score"])[0]))
    return pd.DataFrame(rows)


def score_file_token(text):
    """`text` as one score-file field, percent-encoded where it must be, so that distinct texts stay
    distinct: whitespace (which would split it), '%', a leading '#' (numpy's genfromtxt, which the
    ASVspoof scorer reads with, drops the line as a comment) and the bytes of a file name that are
    not UTF-8 (Python keeps each as a lone surrogate, U+DC80-U+DCFF)."""
    def encoded(index, char):
        if "\udc80" <= char <= "\udcff":
            return f"%{ord(char) - 0xDC00:02X}"
        if char.isspace() or char == "%" or (index == 0 and char == "#"):
            return "".join(f"%{byte:02X}" for byte in char.encode())
        return char
    return "".join(encoded(index, char) for index, char in enumerate(str(text)))


def score_file_ids(relative_paths):
    """One id per file: its name without extension (ASVspoof's utterance ids) when no two files share
    one, else every file's path relative to the inputs; always one whitespace-free token."""
    paths = [Path(p).as_posix() for p in relative_paths]
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        raise ValueError(f"a score file needs one line per file, but {len(repeated)} path(s) are listed twice: "
                         f"{', '.join(repeated[:3])}")
    names = [Path(p).stem for p in paths]
    return [score_file_token(i) for i in (names if len(set(names)) == len(names) else paths)]


def write_score_file(path, files):
    """ASVspoof-style score file, one line per file: `FILE_ID SCORE ATTACK KEY` (higher = bona fide)."""
    ids = score_file_ids(files["original_path"])
    lines = [f"{file_id} {row.score:.6f} {score_file_token(row.attack) if isinstance(row.attack, str) else '-'} "
             f"{'bonafide' if row.label == 0 else 'spoof'}" for file_id, row in zip(ids, files.itertuples())]
    with atomic_write(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def read_score_file(path):
    """Read a score file written by write_score_file (labels and attacks optional)."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) not in (2, 4):   # an id split by a space would shift every field after it
                raise ValueError
            score = float(parts[1])
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'FILE_ID SCORE [ATTACK KEY]', got {line!r}") from None
        key = parts[3] if len(parts) > 3 else None
        if key not in (None, "bonafide", "spoof"):
            raise ValueError(f"{path}:{number}: key {key!r} is neither 'bonafide' nor 'spoof'")
        rows.append(dict(file_id=parts[0], score=score, attack=parts[2] if len(parts) > 2 else None,
                         label=None if key is None else int(key == "spoof")))
    return pd.DataFrame(rows)


SHORTCUT_FEATURES = {"duration_s": "clip duration (s)", "filled_fraction": "looped/padded share of segments",
                     "leading_silence_s": "leading silence (s)",
                     "loudness_lufs": "loudness before normalisation (LUFS)",
                     "original_sample_rate": "original sample rate (Hz)", "dc_offset": "DC offset (mean / RMS)",
                     "noise_floor_db": "noise floor (quietest frames, dB below the loudest)",
                     "high_band_energy_ratio": "share of energy above 4 kHz",
                     "spectral_rolloff_hz": "95% spectral roll-off (Hz)"}
ALL_FEATURES_TOGETHER = "all trivial features together"
SPECTRAL_ENVELOPE = "spectral envelope (each band's mean and std)"


def band_statistics(split_dir):
    """Per original file of a processed split: each mel band's mean and standard deviation over time
    of the stored dB spectrograms, averaged over the file's segments. One .npy is read at a time."""
    split_dir = Path(split_dir)
    metadata = read_metadata(split_dir)
    paths, labels, rows, n_bands = [], [], [], None
    for original_path, group in metadata.groupby("original_path", sort=True):
        per_segment = []
        for npy_path in group["npy_path"]:
            try:
                spec = np.load(split_dir / npy_path)
            except (OSError, ValueError) as error:
                raise DatasetError(f"{split_dir / npy_path}: cannot read the spectrogram ({error})") from None
            spec = spec.reshape(-1, spec.shape[-1]).astype(np.float64)  # (bands, frames)
            n_bands = n_bands or len(spec)
            if len(spec) != n_bands:
                raise DatasetError(f"{split_dir / npy_path}: {len(spec)} mel bands where other segments have {n_bands}")
            per_segment.append(np.r_[spec.mean(axis=1), spec.std(axis=1)])
        paths.append(original_path)
        labels.append(int(group["label"].iloc[0]))
        rows.append(np.mean(per_segment, axis=0).astype(np.float32))
    columns = [f"mean_{b:03d}" for b in range(n_bands)] + [f"std_{b:03d}" for b in range(n_bands)]
    return pd.concat([pd.DataFrame(dict(original_path=paths, label=labels)),
                      pd.DataFrame(np.stack(rows), columns=columns)], axis=1)


def trivial_classifier_eer(train_x, train_labels, test_x, test_labels):
    """Test EER of a standardised logistic regression fitted on train (a missing value: the train median)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    classifier = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=1000))
    classifier.fit(np.asarray(train_x, float), train_labels)
    p_fake = classifier.predict_proba(np.asarray(test_x, float))[:, 1]
    # A constant prediction carries no information; the official EER of all-tied scores is 1.0
    # (every bona fide file is rejected before any spoof is accepted), so call it chance.
    return 0.5 if np.ptp(p_fake) == 0 else eer_from_labels(test_labels, -p_fake)[0]


def shortcut_audit(train_files, test_files, dataset_dir=None):
    """File-level test EER of trivial classifiers fitted on the train files: one per feature a detector
    should not rely on, all of them together and, given the processed `dataset_dir`, the spectral
    envelope of its train and test splits. An EER far below 0.5 means the corpus lets a model separate
    the classes without listening to the speech. Features a dataset lacks (prepared before they were
    recorded) are left out with a printed note."""
    usable = [f for f in SHORTCUT_FEATURES if f in train_files and f in test_files
              and train_files[f].notna().any() and test_files[f].notna().any()]
    absent = [name for f, name in SHORTCUT_FEATURES.items() if f not in usable]
    if absent:
        print(f"Not audited, not recorded when this dataset was prepared (delete it and prepare it again "
              f"to audit them): {', '.join(absent)}")
    for feature in usable:
        unknown = int(train_files[feature].isna().sum() + test_files[feature].isna().sum())
        if unknown:
            print(f"{SHORTCUT_FEATURES[feature]}: unknown for {unknown} file(s), taken as the train median")
    groups = [(SHORTCUT_FEATURES[f], "feature", [f]) for f in usable]
    if len(usable) > 1:
        groups.append((ALL_FEATURES_TOGETHER, "features together", usable))
    rows = [dict(feature=name, test_eer=trivial_classifier_eer(train_files[columns], train_files["label"],
                                                               test_files[columns], test_files["label"]), kind=kind)
            for name, kind, columns in groups]
    if dataset_dir is not None:
        train_bands = band_statistics(Path(dataset_dir) / "train")
        test_bands = band_statistics(Path(dataset_dir) / "test")
        test_bands = test_bands[test_bands["original_path"].isin(test_files["original_path"])]
        bands = train_bands.columns.drop(["original_path", "label"])
        rows.append(dict(feature=SPECTRAL_ENVELOPE, kind="spectral envelope",
                         test_eer=trivial_classifier_eer(train_bands[bands], train_bands["label"],
                                                         test_bands[bands], test_bands["label"])))
    return pd.DataFrame(rows, columns=["feature", "test_eer", "kind"])


def audit_verdict(audit, model_eer):
    """A plain sentence beside the shortcut audit: the best trivial feature, the spectral envelope and
    the model, and whether the model is clearly better, i.e. its EER is below half of every reference's."""
    references = audit[audit["kind"] != "model"]
    if references.empty:
        return f"File-level test EER of the model: {model_eer:.4f}; no trivial reference was computed."
    trivial = references[references["kind"] != "spectral envelope"]
    envelope = references.loc[references["kind"] == "spectral envelope", "test_eer"]
    parts = [f"the model {model_eer:.4f}"]
    if len(trivial):
        best = trivial.loc[trivial["test_eer"].idxmin()]
        parts.append(f"best trivial feature ({best['feature']}) {best['test_eer']:.4f}")
    parts.append(f"spectral envelope {envelope.iloc[0]:.4f}" if len(envelope) else "spectral envelope not computed")
    summary = "File-level test EER: " + "; ".join(parts) + "."
    strongest = references.loc[references["test_eer"].idxmin()]
    if model_eer < strongest["test_eer"] / 2:
        return f"{summary} The model is clearly better: its EER is below half of every reference's."
    return (f"{summary} The model is NOT clearly better than its references ({strongest['feature']} reaches "
            f"{strongest['test_eer']:.4f}; clearly better means below half of that): its score may measure "
            f"the corpus, not the speech.")


def cls_attention(maps, layer=-1):
    """CLS-to-patch attention of one layer, averaged over heads: (b, num_patches)."""
    return maps[layer][:, :, 0, 1:].mean(dim=1)


def attention_rollout(maps):
    """Attention rollout (Abnar & Zuidema, 2020): head-averaged attention plus the residual
    identity, renormalised and multiplied through the layers; returns CLS-to-patch (b, num_patches)."""
    rollout = None
    for attn in maps:
        a = attn.mean(dim=1)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0, 1:]


def check_architecture(checkpoint, architecture, source="checkpoint"):
    """A clear error when `checkpoint` holds the other architecture than `architecture` ("vit" or "cnn")."""
    saved = checkpoint.get("architecture", "vit")   # checkpoints from before the CNN baseline are ViTs
    if saved != architecture:
        held, wanted = (ARCHITECTURE_CONFIGS[a].__name__.removesuffix("Config") for a in (saved, architecture))
        name = checkpoint.get(f"{saved}_config", {}).get("name", "")
        raise ValueError(f"{source} holds a {held} ({name}), not a {wanted}: use a {held} model size or "
                         f"load_model, which rebuilds whatever a checkpoint holds")


def dataset_fingerprint(dataset_dir):
    """A digest of a prepared dataset's split tables (every segment, its file, label and speaker), the
    same wherever the dataset lies."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update((Path(dataset_dir) / split / "metadata.csv").read_bytes())
    return digest.hexdigest()[:16]


# TrainingConfig fields a resumed run may change: where it writes, what it shows and how fast it
# computes. Any other change would continue one run's model under another's settings.
RESUMABLE_CHANGES = ("resume", "progress", "wandb_mode", "num_workers", "cache_dir", "results_dir",
                     "checkpoint_dir", "compile", "speed_up", "mixed_precision")


def check_same_run(checkpoint, extras, source):
    """Refuse to resume from `checkpoint` (a last checkpoint) when its training or data settings, or
    the dataset it was trained on, differ from this run's (`extras`, as run_training stores them),
    naming each difference. More epochs are allowed under a constant learning rate (under a schedule
    they would change the rate of the epochs already run)."""
    differences = []
    may_change = RESUMABLE_CHANGES
    if extras["training_config"]["lr_schedule"] == "constant":   # more epochs only extend a constant rate
        may_change += ("epochs",)
    for key in ("training_config", "data_config", "model_config"):
        saved = checkpoint.get(key, {})
        differences += [f"{name} {saved[name]!r} -> {value!r}" for name, value in extras[key].items()
                        if name in saved and name not in may_change and saved[name] != value]
    if checkpoint.get("dataset_fingerprint", extras["dataset_fingerprint"]) != extras["dataset_fingerprint"]:
        differences.append("another dataset (its split tables differ)")
    if differences:
        raise ValueError(f"{display_path(source)} is another run's, so it is not resumed: {', '.join(differences)}. "
                         f"Delete it, or give this run another run_name, to start afresh")


def check_checkpoint_compatible(checkpoint, config, source="checkpoint"):
    """A clear error naming each setting where the checkpoint's model differs from `config` (a
    ViTConfig or CNNConfig)."""
    check_architecture(checkpoint, architecture_of(config), source)
    saved = checkpoint.get(f"{architecture_of(config)}_config", {})
    expected = config.as_dict()
    differing = {k: (saved.get(k), v) for k, v in expected.items() if k not in ("dropout", "emb_dropout") and saved.get(k) != v}
    if differing:
        details = ", ".join(f"{k}: checkpoint {a} vs expected {b}" for k, (a, b) in differing.items())
        raise ValueError(f"{source} does not match the model: {details}")


# ---------------------------------------------------------------- LFCC-GMM baseline
def file_lfcc_frames(files, audio_dir, data_config=DataConfig(), max_frames_per_file=None, seed=DataConfig.SEED,
                     progress=True):
    """LFCC frames of each original file in `files` (`original_path` relative to `audio_dir`), from
    the whole clip as normalized_clip gives it: {original_path: float32 (frames, 60)}, a row per 10 ms
    frame. max_frames_per_file keeps a seeded random subset of each file's frames, to bound memory.
    Returns (frames, skipped): skipped lists (original_path, reason) for each file that cannot be used."""
    rng = np.random.default_rng(seed)
    frames, skipped = {}, []
    for path in tqdm(files["original_path"].unique(), desc="LFCC", disable=not progress):
        try:
            features = lfcc(normalized_clip(Path(audio_dir) / path, data_config), data_config.SR).T
        except (AudioError, ValueError) as error:
            skipped.append((path, str(error)))
            continue
        if max_frames_per_file and len(features) > max_frames_per_file:
            features = features[np.sort(rng.choice(len(features), max_frames_per_file, replace=False))]
        frames[path] = features
    return frames, skipped


def fit_gmm_baseline(class_frames, n_components=512, seed=DataConfig.SEED, max_iter=200):
    """One Gaussian mixture with diagonal covariances per class, fitted by EM on that class's
    training frames, as in the ASVspoof 2019 LFCC-GMM baseline (which uses 512 components).
    `class_frames`: {0: bona fide frames (n, dims), 1: spoof frames}. Returns {0: GMM, 1: GMM}."""
    from sklearn.mixture import GaussianMixture
    for label, name in enumerate(("bona fide", "spoof")):   # both checked before the slow fitting starts
        frames = class_frames.get(label)
        if frames is None or len(frames) == 0:
            raise ValueError(f"no {name} training frames: the training files hold no usable {name} audio")
        if len(frames) < n_components:
            raise ValueError(f"a GMM of {n_components} components needs at least as many frames, but the "
                             f"{name} class has {len(frames)} training frames: use fewer components")
    # The variance floor keeps a component on repeated frames (digital silence) from collapsing.
    return {label: GaussianMixture(n_components, covariance_type="diag", max_iter=max_iter, reg_covar=1e-3,
                                   random_state=seed).fit(np.asarray(class_frames[label], dtype=np.float64))
            for label in (0, 1)}


def score_gmm_baseline(models, files, frames):
    """`files` (one row per file, as pool_file_scores gives) with each file's `score`: the mean over
    its LFCC frames of log p(frame | bona fide) - log p(frame | spoof), the baseline's log-likelihood
    ratio (higher = bona fide), and `p_fake` from it. Files without frames are left out."""
    from scipy.special import expit
    scored = files[files["original_path"].isin(list(frames))].reset_index(drop=True)
    scored["score"] = [models[0].score(frames[path]) - models[1].score(frames[path])
                       for path in scored["original_path"]]
    scored["p_fake"] = expit(-scored["score"])
    return scored


def lfcc_gmm_baseline(cache_dir, dataset_name, audio_dir=None, n_components=512, max_frames_per_class=200_000,
                      split="test", data_config=DataConfig(), seed=DataConfig.SEED, progress=True):
    """The LFCC-GMM baseline on a prepared dataset's own splits: GMMs fitted on the train files'
    LFCC frames (at most about max_frames_per_class per class, spread over its files), then the files
    of `split` scored. `audio_dir` defaults to the corpus the dataset was prepared from.
    Returns (models, scored files of `split`); prints how many files were used and each one skipped."""
    dataset_dir = Path(cache_dir) / dataset_name
    if audio_dir is None:
        audio_dir = json.loads((dataset_dir / "preparation.json").read_text())["corpus_root"]
    metadata = read_dataset_metadata(dataset_dir)
    train = pool_file_scores(metadata[metadata["split"] == "train"])
    class_frames, skipped = {}, []
    for label in (0, 1):
        class_files = train[train["label"] == label]
        per_file = math.ceil(max_frames_per_class / max(len(class_files), 1))
        frames, class_skipped = file_lfcc_frames(class_files, audio_dir, data_config, per_file, seed, progress)
        class_frames[label] = np.concatenate(list(frames.values())) if frames else np.zeros((0, 0), np.float32)
        skipped += class_skipped
    models = fit_gmm_baseline(class_frames, n_components, seed)
    evaluated = pool_file_scores(metadata[metadata["split"] == split])
    frames, split_skipped = file_lfcc_frames(evaluated, audio_dir, data_config, progress=progress)
    skipped += split_skipped
    print(f"LFCC-GMM ({n_components} components): fitted on {len(class_frames[0])} bona fide and "
          f"{len(class_frames[1])} spoof frames of {len(train)} train files; {len(frames)} {split} files "
          f"scored; {len(skipped)} file(s) skipped")
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}")
    return models, score_gmm_baseline(models, evaluated, frames)


# ---------------------------------------------------------------- inference
def load_model(checkpoint_path, device="cpu", architecture=None):
    """AudioViT or AudioCNN rebuilt from a checkpoint's own config, sped up (speed_up) and in eval
    mode; returns (model, checkpoint). With `architecture` ("vit" or "cnn"), a checkpoint of the other one is an error."""
    checkpoint = load_checkpoint(checkpoint_path, device)
    saved = checkpoint.get("architecture", "vit")
    if f"{saved}_config" not in checkpoint or "model_state" not in checkpoint:
        raise ValueError(f"{checkpoint_path}: not a checkpoint written by this project (no {saved}_config/model_state)")
    if architecture is not None:
        check_architecture(checkpoint, architecture, checkpoint_path)
    inference_settings(checkpoint, checkpoint_path)   # a checkpoint that cannot be scored fails here, named
    if "data_config" not in checkpoint:
        print(f"{display_path(checkpoint_path)} holds no data settings (written by an older vit_lib): "
              f"scoring with the default data settings of its time (band means kept)")
    model = build_model(ARCHITECTURE_CONFIGS[saved](**checkpoint[f"{saved}_config"])).to(device)
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as error:   # missing, unexpected or wrongly shaped weights
        reason = " ".join(str(error).split("\n\t", 1)[-1].split())
        raise ValueError(f"{display_path(checkpoint_path)}: its weights do not fit its model ({reason})") from None
    not_finite = [name for name, weights in checkpoint["model_state"].items()
                  if weights.is_floating_point() and not torch.isfinite(weights).all()]
    if not_finite:
        raise ValueError(f"{display_path(checkpoint_path)}: non-finite (NaN or inf) weights in "
                         f"{', '.join(not_finite[:3])}{' ...' if len(not_finite) > 3 else ''}")
    if not math.isfinite(verdict_threshold(checkpoint)[0]):
        raise ValueError(f"{display_path(checkpoint_path)}: its verdict threshold is {checkpoint['eer_threshold']}")
    return speed_up(model).eval(), checkpoint


def verdict_threshold(checkpoint):
    """(threshold on the file score, where it comes from): the validation-EER threshold stored at
    training, or 0 (p(fake) = 0.5) for a checkpoint without one."""
    if checkpoint.get("eer_threshold") is None:
        return 0.0, "none in checkpoint (0.0, i.e. p(fake) = 0.5)"
    return float(checkpoint["eer_threshold"]), "validation EER (file level)"


def _batches(items, size):
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def score_audio_file(path, model, checkpoint, device="cpu", batch_size=32, precision=Precision(None, "fp32")):
    """Any audio file -> (per-segment timeline DataFrame, verdict dict), through the same preparation
    path as training data, with the settings `checkpoint` (from load_model) carries: the data settings,
    the train statistics of a globally normalised model and the verdict threshold. The verdict pools
    segment scores as pool_file_scores does; a file scoring at or below the threshold is called fake.
    The forward pass runs under `precision` (choose_precision's; fp32 by default), the scores in fp64."""
    if not isinstance(checkpoint, dict):
        raise TypeError("score_audio_file takes the checkpoint that load_model returns "
                        "(it holds the model's data settings and verdict threshold)")
    data_config, (mean, std) = inference_settings(checkpoint)
    model_config = ModelConfig.from_dict(checkpoint["model_config"], data_config)
    expected_width = model.config.image_width
    if model_config.max_frames_spec != expected_width:
        raise ValueError(f"model expects {expected_width} frames but {model_config.name} gives "
                         f"{model_config.max_frames_spec}")
    facts, specs = clip_spectrograms(path, model_config, data_config)
    starts, scores = [], []
    model.eval()
    for batch in _batches(specs, batch_size):   # spectrograms made and scored a batch at a time
        inputs = torch.stack([normalize_spectrogram(torch.from_numpy(spec[None]), mean, std, data_config.NORM_EPSILON,
                                                    data_config.SUBTRACT_ROW_MEANS) for _, spec, _ in batch])
        with torch.no_grad(), precision.autocast(device):
            logits = model(inputs.to(device)).float().cpu().numpy().astype(np.float64)
        starts += [start for start, _, _ in batch]
        scores += list(logits[:, 0] - logits[:, 1])
    scores = np.array(scores)
    timeline = pd.DataFrame(dict(segment=range(len(scores)), start_s=starts,
                                 end_s=[min(s + model_config.audio_length_seconds, facts["duration_s"]) for s in starts],
                                 score=scores, p_fake=1.0 / (1.0 + np.exp(scores))))
    file_score = float(scores.mean())
    threshold, threshold_source = verdict_threshold(checkpoint)
    verdict = dict(file=Path(path).name, duration_s=facts["duration_s"], segments=len(scores), score=file_score,
                   p_fake=1.0 / (1.0 + math.exp(file_score)), threshold=threshold,
                   threshold_source=threshold_source, verdict="fake" if file_score <= threshold else "real")
    return timeline, verdict


def splice_recording(real_paths, fake_paths, min_seconds=60.0, data_config=DataConfig()):
    """One recording of alternating real and fake clips (real first, each list used in turn and from
    the start again when it runs out), each clip as normalized_clip reads it, at least `min_seconds` long.
    Returns (audio, stretches): one row per clip with start_s, end_s, label (0 real, 1 fake) and file."""
    if not real_paths or not fake_paths:
        raise ValueError(f"splice_recording needs real and fake clips, got {len(real_paths)} real and "
                         f"{len(fake_paths)} fake")
    clips, rows, total = [], [], 0.0
    while total < min_seconds:
        label = len(clips) % 2
        paths = (real_paths, fake_paths)[label]
        path = paths[len(clips) // 2 % len(paths)]
        clip = normalized_clip(path, data_config)
        seconds = len(clip) / data_config.SR
        rows.append(dict(start_s=total, end_s=total + seconds, label=label, file=Path(path).name))
        clips.append(clip)
        total += seconds
    return np.concatenate(clips), pd.DataFrame(rows)


# ---------------------------------------------------------------- plots
TRAINED_MODEL_TITLE = "Trained model: "


class TrainedModelTable:
    """A table of a trained model's results (scores, metrics, mistakes), shown under a title that starts
    with "Trained model: ". Its numbers follow the floating-point path of the training run, which changes
    with the CPU's instruction set and thread count, so the test session's sanitize rule "results of a
    trained model" compares the title and not the table; the notebook asserts what any correct run shows."""

    def __init__(self, frame, title):
        self.frame, self.title = frame, TRAINED_MODEL_TITLE + title

    def __repr__(self):
        return f"{self.title}\n{self.frame.to_string()}"

    def _repr_html_(self):
        import html
        return f"<p>{html.escape(self.title)}</p>\n{self.frame.to_html()}"


def save_figure(fig, path):
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")


def plot_confusion_matrix(cm, labels=CLASS_NAMES, run_name="", save_dir=DEFAULT_RESULTS_DIR, wandb_run=None):
    """Seaborn heatmap of the confusion matrix, saved as confusion_matrix_{run_name}.png."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, ax = plt.subplots(figsize=(4.5, 4))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", xticklabels=labels, yticklabels=labels, cbar=False, ax=ax)
    ax.set(xlabel="Predicted", ylabel="True", title=f"Confusion matrix {run_name}".strip())
    path = Path(save_dir) / f"confusion_matrix_{run_name}.png"
    save_figure(fig, path)
    if wandb_run is not None:
        import wandb
        wandb_run.log({"confusion_matrix": wandb.Image(str(path))})
    plt.close(fig)
    return path


def plot_training_curves(history, run_name="", save_dir=DEFAULT_RESULTS_DIR):
    import matplotlib.pyplot as plt
    frame = pd.DataFrame(history)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(frame["epoch"], frame["train_loss"], "o-", label="train")
    left.plot(frame["epoch"], frame["val_loss"], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    for column, name in (("val_accuracy", "accuracy"), ("val_f1", "F1"), ("val_roc_auc", "ROC AUC"), ("val_eer", "EER")):
        right.plot(frame["epoch"], frame[column], "o-", label=name)
    right.set(xlabel="epoch", ylabel="value", ylim=(-0.02, 1.02), title="Validation metrics")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(run_name)
    save_figure(fig, Path(save_dir) / f"training_curves_{run_name}.png")
    return fig


def plot_roc_det(curves, save_path=None):
    """ROC (linear axes) and DET (probit axes) curves; `curves` maps a name to (labels, p_fake)."""
    import matplotlib.pyplot as plt
    from scipy.stats import norm
    from sklearn.metrics import roc_curve
    fig, (roc_ax, det_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    ticks = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95])
    clip = lambda p: norm.ppf(np.clip(p, 0.005, 0.995))  # noqa: E731  probit, finite at 0 and 1
    for name, (labels, p_fake) in curves.items():
        fpr, tpr, _ = roc_curve(labels, p_fake)
        eer = eer_from_labels(labels, -np.asarray(p_fake))[0]
        roc_ax.plot(fpr, tpr, label=f"{name} (EER {eer:.3f})")
        labels = np.asarray(labels)
        frr, far, _ = det_curve(-np.asarray(p_fake)[labels == 0], -np.asarray(p_fake)[labels == 1])
        det_ax.plot(clip(far), clip(frr), label=name)
    roc_ax.plot([0, 1], [0, 1], "k:", lw=1)
    roc_ax.set(xlabel="false positive rate (real called fake)", ylabel="true positive rate (fake caught)", title="ROC")
    det_ax.plot(clip(ticks), clip(ticks), "k:", lw=1)
    det_ax.set(xticks=clip(ticks), yticks=clip(ticks), xticklabels=[f"{t:g}" for t in ticks * 100],
               yticklabels=[f"{t:g}" for t in ticks * 100], xlabel="spoof accepted as bona fide (%)",
               ylabel="bona fide rejected (%)", title="DET (probit axes; EER where it crosses the diagonal)")
    for ax in (roc_ax, det_ax):
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    if save_path:
        save_figure(fig, save_path)
    return fig


def plot_score_histograms(files, save_path=None, title="File-level scores"):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(files["score"].min(), files["score"].max(), 30)
    for label, name in enumerate(CLASS_NAMES):
        ax.hist(files.loc[files["label"] == label, "score"], bins=bins, alpha=0.6, label=name, color=CLASS_COLORS[name])
    ax.axvline(0, color="k", ls=":", lw=1, label="p(fake) = 0.5")
    ax.set(xlabel="score = logit(real) - logit(fake)   (higher = more bona fide)", ylabel="files", title=title)
    ax.legend()
    if save_path:
        save_figure(fig, save_path)
    return fig


def plot_band_occlusion(table, save_path=None):
    """band_occlusion's table: the segment EER and each class's mean score with each band silenced,
    against the intact segments' (dashed)."""
    import matplotlib.pyplot as plt
    intact, bands = table.iloc[0], table.iloc[1:]
    names = [f"{low:.0f}-{high:.0f} Hz" if np.isfinite(low) else rows
             for rows, low, high in zip(bands["silenced"], bands["low_hz"], bands["high_hz"])]
    position = np.arange(len(bands))
    fig, (eer_ax, score_ax) = plt.subplots(1, 2, figsize=(12, 3.8), sharex=True)
    eer_ax.bar(position, bands["segment_eer"], color="tab:gray")
    eer_ax.axhline(intact["segment_eer"], color="k", ls="--", lw=1, label="nothing silenced")
    eer_ax.set(ylabel="segment-level EER", ylim=(0, max(0.55, bands["segment_eer"].max() * 1.1)),
               title="EER with one band silenced")
    for label, name in enumerate(CLASS_NAMES):
        column = f"mean_score_{'bonafide' if label == 0 else 'spoof'}"
        score_ax.plot(position, bands[column], "o-", color=CLASS_COLORS[name], label=name)
        score_ax.axhline(intact[column], color=CLASS_COLORS[name], ls="--", lw=1)
    score_ax.axhline(0, color="k", ls=":", lw=1)
    score_ax.set(ylabel="mean score (higher = more bona fide)", title="Each class's mean score (dashed: intact)")
    for ax in (eer_ax, score_ax):
        ax.set_xticks(position, names, rotation=45, ha="right")
        ax.set_xlabel("silenced band")
        ax.legend()
    fig.tight_layout()
    if save_path:
        save_figure(fig, save_path)
    return fig


def plot_spectrogram(spec, ax, title="", data_config=DataConfig(), colorbar_label="dB"):
    """A (n_mels, frames) or (1, n_mels, frames) log-mel on time (s) and mel-bin axes."""
    spec = np.asarray(spec).squeeze()
    seconds = spec.shape[-1] * data_config.HOP_LENGTH / data_config.SR
    image = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=[0, seconds, 0, spec.shape[0]])
    ax.set(xlabel="time (s)", ylabel="mel bin", title=title)
    ax.figure.colorbar(image, ax=ax, label=colorbar_label)
    return image


def plot_attention(spec, patch_weights, ax, vit_config, title=""):
    """CLS attention over patches drawn on top of the spectrogram (normalised to its maximum)."""
    grid = np.asarray(patch_weights).reshape(vit_config.patch_rows, vit_config.patch_columns)
    spec = np.asarray(spec).squeeze()
    ax.imshow(spec, origin="lower", aspect="auto", cmap="gray")
    ax.imshow(grid / grid.max(), origin="lower", aspect="auto", cmap="inferno", alpha=0.55,
              extent=(0, vit_config.image_width, 0, vit_config.image_height))
    ax.set(xlabel="frame", ylabel="mel bin", title=title)


def plot_timeline(audio, timeline, verdict, data_config=DataConfig(), save_path=None, stretches=None):
    """Waveform, log-mel and the per-segment fake probability of one scored file, on one time axis.
    `stretches` (start_s, end_s, label), where known, shades the true real and fake parts."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    seconds = len(audio) / data_config.SR
    fig, (wave_ax, spec_ax, prob_ax) = plt.subplots(3, 1, figsize=(10, 7), sharex=True,
                                                    gridspec_kw=dict(height_ratios=[1, 1.4, 1]))
    wave_ax.plot(np.arange(len(audio)) / data_config.SR, audio, lw=0.3, color="0.3")
    fake_from = 1.0 / (1.0 + math.exp(verdict["threshold"]))   # the verdict threshold as a probability
    wave_ax.set(ylabel="amplitude", title=f"{verdict['file']}: {verdict['verdict']} (p(fake) = {verdict['p_fake']:.3f}; "
                                          f"fake from {fake_from:.3f}, {verdict['threshold_source']})")
    mel = log_mel_spectrogram(audio, data_config)
    spec_ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", extent=[0, seconds, 0, mel.shape[0]])
    spec_ax.set(ylabel="mel bin")
    for row in timeline.itertuples():
        called = CLASS_NAMES[int(row.p_fake >= fake_from)]
        prob_ax.hlines(row.p_fake, row.start_s, row.end_s, lw=4, color=CLASS_COLORS[called])
    prob_ax.axhline(fake_from, color="k", ls=":", lw=1)
    prob_ax.set(xlabel="time (s)", ylabel="p(fake) per segment", ylim=(-0.05, 1.05), xlim=(0, seconds))
    legend = [Line2D([], [], color=CLASS_COLORS[name], lw=4, label=f"segment called {name.lower()}")
              for name in CLASS_NAMES] + [Line2D([], [], color="k", ls=":", lw=1, label="verdict threshold")]
    if stretches is not None:
        for row in stretches.itertuples():
            for ax in (wave_ax, prob_ax):
                ax.axvspan(row.start_s, row.end_s, color=CLASS_COLORS[CLASS_NAMES[row.label]], alpha=0.15, lw=0)
        legend += [Patch(color=CLASS_COLORS[name], alpha=0.3, label=f"truly {name.lower()}") for name in CLASS_NAMES]
    prob_ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    if save_path:
        save_figure(fig, save_path)
    return fig


# ---------------------------------------------------------------- tracking
def wandb_api_key():
    """The key from WANDB_API_KEY or a git-ignored wandb_api_key.txt (repo root or working folder)."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    for folder in (Path.cwd(), REPO_ROOT):
        path = folder / "wandb_api_key.txt"
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
    return None


def init_wandb(run_name, config, mode=None, save_dir=REPO_ROOT):
    """A wandb run that never prompts, prints a banner or waits: online only with a key (falling back
    to offline if the service cannot be reached), offline otherwise, or "disabled" on request."""
    os.environ["WANDB_SILENT"] = "true"
    import wandb
    key = wandb_api_key()
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if key else "offline")
    if mode == "online":
        os.environ["WANDB_API_KEY"] = key or ""
    # Unreachable servers are retried until init_timeout: long enough for a slow connection, short
    # enough that a machine without network starts training within seconds.
    settings = wandb.Settings(silent=True, console="off", init_timeout=10, x_disable_stats=True)
    try:
        return wandb.init(project=WANDB_PROJECT, name=run_name, config=config, mode=mode, dir=str(save_dir),
                          settings=settings, reinit="finish_previous")
    except Exception:
        if mode != "online":
            raise
        print(f"wandb: could not reach the server, logging offline to {display_path(Path(save_dir) / 'wandb')}")
        return wandb.init(project=WANDB_PROJECT, name=run_name, config=config, mode="offline", dir=str(save_dir),
                          settings=settings, reinit="finish_previous")


def log_checkpoint(wandb_run, path):
    import wandb
    artifact = wandb.Artifact(Path(path).stem, type="model")   # best_{vit|cnn}_model_{run_name}
    artifact.add_file(str(path))
    wandb_run.log_artifact(artifact)


# ---------------------------------------------------------------- command line
def main(argv=None):
    parser = argparse.ArgumentParser(prog="vit-audio", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="raw corpus -> processed dataset")
    prepare.add_argument("corpus_root")
    prepare.add_argument("--corpus", default="folder", choices=CORPORA)
    prepare.add_argument("--dataset", default="vit_balanced_dataset", choices=sorted(ALL_MODEL_CONFIGS))
    prepare.add_argument("--cache-dir", default=DataConfig.CACHE_DIR)
    prepare.add_argument("--workers", type=int, default=None)
    prepare.add_argument("--speaker-pattern", default=None)
    train = commands.add_parser("train", help="train (also under torchrun --nproc_per_node=N)")
    for item in fields(TrainingConfig):
        flag = "--" + item.name.replace("_", "-")
        if item.name == "progress":
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=show_progress())
        elif item.type in ("bool", bool):
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=item.default)
        else:
            train.add_argument(flag, type=training_field_type(item), default=item.default)
    train.add_argument("--subtract-row-means", action=argparse.BooleanOptionalAction,
                       default=DataConfig.SUBTRACT_ROW_MEANS,
                       help="DataConfig.SUBTRACT_ROW_MEANS (--no-subtract-row-means: the original notebook's inputs)")
    score = commands.add_parser("score", help="score audio files or folders into an ASVspoof-style score file")
    score.add_argument("checkpoint")
    score.add_argument("inputs", nargs="+", help="audio files or folders (searched recursively)")
    score.add_argument("--output", required=True)
    score.add_argument("--mixed-precision", choices=MIXED_PRECISION_SETTINGS, default="auto",
                       help="bf16 autocast: auto (where the CPU has bf16 instructions), on or off")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            options = {k: v for k, v in vars(args).items() if k != "command"}
            data_config = DataConfig(SUBTRACT_ROW_MEANS=options.pop("subtract_row_means"))
            run_training(TrainingConfig(**options), data_config)
        elif args.command == "prepare":
            summary, _, _ = prepare_dataset(args.corpus_root, args.dataset, args.corpus, args.cache_dir,
                                            num_workers=args.workers, speaker_pattern=args.speaker_pattern,
                                            progress=show_progress())
            if not summary["used_files"]:
                print(f"no file could be prepared: each one is listed with its reason in "
                      f"{summary['dataset_dir']}/skipped.csv")
                return 1
        else:
            scored, _ = score_files(args.checkpoint, args.inputs, args.output, progress=show_progress(),
                                    mixed_precision=args.mixed_precision)
            if not scored:
                return 1
    except (ValueError, FileNotFoundError, DatasetError, SplitLeakError) as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    except Exception as error:
        if not is_machine_fault(error):
            raise
        parser.exit(1, f"{parser.prog} {args.command}: stopped by a fault of the machine, not of the input: "
                       f"{machine_fault_reason(error)}. What was finished is kept; run again once it is fixed.\n")
    return 0


def _parse_bool(text):
    return text.lower() in ("1", "true", "yes")


def training_field_type(item):
    """What parses a TrainingConfig field's value from text (the annotations are strings, e.g. "float | None")."""
    return {"int": int, "float": float, "bool": _parse_bool}.get(str(item.type).split(" ")[0], str)


def _progress_on(text):
    return text != "0"


def show_progress():
    """Progress bars unless VIT_PROGRESS=0 (the test session sets it: their redraws depend on timing)."""
    return _progress_on(os.environ.get("VIT_PROGRESS", "1"))


def _seed_list(text):
    return [int(seed) for seed in text.split(",")]


# Every notebook parameter: the environment variable that sets it, how to read it, and its default (the
# fixture corpus and the fixture's training settings, so a notebook runs as it is under pytest --nbval).
NOTEBOOK_PARAMETERS = {
    "CORPUS": ("VIT_CORPUS", str, "folder"),            # folder | asvspoof2019_la | fake_or_real | in_the_wild
    "AUDIO_DIR": ("VIT_AUDIO_DIR", str, str(FIXTURE_AUDIO_DIR)),
    "CACHE_DIR": ("VIT_CACHE_DIR", str, str(DEFAULT_CACHE_DIR)),
    "DATASET": ("VIT_DATASET", str, TrainingConfig.dataset_name),
    "RESULTS_DIR": ("VIT_RESULTS_DIR", str, str(DEFAULT_RESULTS_DIR)),
    "CHECKPOINT_DIR": ("VIT_CHECKPOINT_DIR", str, str(DEFAULT_CHECKPOINT_DIR)),
    "SHOW_PROGRESS": ("VIT_PROGRESS", _progress_on, "1"),               # 0 turns the bars off
    "NUM_WORKERS": ("VIT_PREP_WORKERS", lambda text: int(text) or None, "0"),   # None: one process per core
    "SPEAKER_PATTERN": ("VIT_SPEAKER_PATTERN", lambda text: text or None, ""),  # e.g. r"^(spk\d+)_"
    "MODEL_SIZE": ("VIT_MODEL_SIZE", str, "ViT_Small"),
    "CNN_SIZE": ("VIT_CNN_SIZE", str, "CNN_Small"),
    "EPOCHS": ("VIT_EPOCHS", int, "10"),                 # the fixture needs few; real corpora: TrainingConfig.epochs
    "BATCH_SIZE": ("VIT_BATCH_SIZE", int, "16"),
    "LEARNING_RATE": ("VIT_LEARNING_RATE", float, str(TrainingConfig.learning_rate)),
    "SEEDS": ("VIT_SEEDS", _seed_list, "42"),
    "AUDIO_FILE": ("VIT_AUDIO_FILE", str, ""),           # empty: a test-split file of the prepared dataset
    "GMM_COMPONENTS": ("VIT_GMM_COMPONENTS", int, "32"),  # ASVspoof 2019 used 512; the fixture is tiny
    "GMM_MAX_FRAMES": ("VIT_GMM_MAX_FRAMES", int, "20000"),
}


def notebook_parameters(*names):
    """The values of the named notebook parameters, in order: each from its environment variable
    (NOTEBOOK_PARAMETERS), else its default. Papermill can still set any of them by name, as its
    injected cell runs after the parameters cell."""
    unknown = [name for name in names if name not in NOTEBOOK_PARAMETERS]
    if unknown:
        raise ValueError(f"Unknown notebook parameter(s) {unknown}; choose from {sorted(NOTEBOOK_PARAMETERS)}")
    values = []
    for name in names:
        variable, parse, default = NOTEBOOK_PARAMETERS[name]
        text = os.environ.get(variable, default)
        try:
            values.append(parse(text))
        except ValueError as error:
            raise ValueError(f"{variable}={text!r} cannot be read for {name}: {error}") from None
    return tuple(values)


def check_output_path(path):
    """Fail before any work is done when no file can be written at `path`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the name of the file to write")
    if path.exists() and not path.is_file():   # a pipe or device (/dev/stdout) is written straight through
        if not os.access(path, os.W_OK):
            raise ValueError(f"cannot write to {path}")
        return
    folder = next(parent for parent in path.resolve().parents if parent.exists())   # where a link leads
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {folder} is not a folder this process can write to")


def _scoring_inputs(inputs):
    """(path, path relative to the inputs' common folder) of every audio file in `inputs` (files or
    folders, searched recursively), each file once."""
    items = [Path(os.path.abspath(item)) for item in inputs]
    root = Path(os.path.commonpath([item if item.is_dir() else item.parent for item in items]))
    paths = dict.fromkeys(p for item in items for p in (_audio_files(item) if item.is_dir() else [item]))
    return [(path, path.relative_to(root)) for path in paths]


def score_files(checkpoint_path, inputs, output, progress=True, mixed_precision="auto"):
    """Score every audio file in `inputs` (files or folders) into `output`: `FILE_ID SCORE` lines, ids
    as score_file_ids makes them from the paths relative to the inputs. A file that cannot be scored,
    whatever the reason, is listed with it and left out; when none can be, `output` is not written.
    `mixed_precision` is TrainingConfig's setting, for the forward pass (choose_precision).
    Returns (files scored, failures)."""
    check_output_path(output)
    files = _scoring_inputs(inputs)
    if not files:
        raise ValueError(f"no audio files in {', '.join(map(str, inputs))}")
    target = Path(output).resolve()
    for kept, what in [(checkpoint_path, "the checkpoint"), *((path, "an input") for path, _ in files)]:
        if Path(kept).resolve() == target:
            raise ValueError(f"--output {output} is {what}; it would be overwritten: choose another name")
    model, checkpoint = load_model(checkpoint_path)
    precision = choose_precision("cpu", mixed_precision)
    print(f"Precision: {precision}")
    ids = score_file_ids([relative for _, relative in files])
    lines, failures = [], []
    for (path, _), file_id in tqdm(list(zip(files, ids)), desc="Scoring", disable=not progress):
        try:
            _, verdict = score_audio_file(path, model, checkpoint, precision=precision)
        except Exception as error:   # one bad file must not end a long run; a fault of the machine must
            if is_machine_fault(error):
                raise MachineFault(f"stopped while scoring {display_path(path)}: "
                                   f"{machine_fault_reason(error)}") from None
            reason = error if isinstance(error, AudioError) else f"{type(error).__name__}: {error}"
            failures.append(f"{printable_path(display_path(path))}: {reason}")
            continue
        lines.append(f"{file_id} {verdict['score']:.6f}")
    if lines:
        with atomic_write(output, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        print(f"Scored {len(lines)} file(s) into {display_path(output)}; {len(failures)} could not be scored")
    else:
        print(f"No file could be scored ({len(failures)} tried); {display_path(output)} was not written")
    for failure in failures:
        print(f"  skipped {failure}")
    threshold, source = verdict_threshold(checkpoint)
    print(f"Verdict threshold: score <= {threshold:.4f} is fake ({source})")
    return len(lines), failures


if __name__ == "__main__":
    sys.exit(main())
