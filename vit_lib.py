"""ViT audio deepfake detector: what the notebooks teach, in the order they teach it.

configuration -> features (and preparation) -> dataset -> the ViT -> the CNN -> the LFCC-GMM baseline
-> training -> metrics and evaluation -> the audit -> inference -> plots. Each definition a notebook
calls says which notebook introduces it. The machinery the notebooks do not teach (decoding, corpus
readers, the preparation journal, atomic files, devices, tracking) is the vit_audio package, which
this module uses; the command line (vit_cli) uses this module. The notebooks import this module alone.
Label convention everywhere: 0 = real (bona fide), 1 = fake (spoof).
Score convention (ASVspoof): higher score = more bona fide; score = logit_real - logit_fake.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import time
import warnings
from dataclasses import InitVar, asdict, dataclass, field, fields, replace
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

from vit_audio import preparation
from vit_audio.audio_io import (
    AudioError,
    LoudnessMeter,
    RecordingMeter,
    SilenceMeter,
    SlidingWindows,
    load_audio,
    loudness_gain,
    loudness_normalize,
    non_silent_bounds,
    original_sample_rate,
    stream_audio,
)
from vit_audio.corpora import (
    CLASS_NAMES,
    SPLITS,
    assign_splits,
    audio_files,
    check_split_classes,
    check_split_leaks,
    read_corpus,
)
from vit_audio.devices import (
    MIXED_PRECISION_SETTINGS,
    Precision,
    all_gather,
    choose_precision,
    get_device,
    init_distributed,
    is_main_process,
)
from vit_audio.fixture_corpus import (  # "X as X": names the notebooks, which import vit_lib alone, call
    FIXTURE_AUDIO_DIR as FIXTURE_AUDIO_DIR,
    make_fixture_corpus as make_fixture_corpus,
)
from vit_audio.preparation import CLIP_FACTS
from vit_audio.storage import (
    REPO_ROOT,
    MachineFault,
    atomic_write,
    check_output_path,
    display_path,
    is_machine_fault,
    machine_fault_reason,
    printable_path,
    read_score_file as read_score_file,
    save_csv_atomic,
    save_json_atomic,
    score_file_ids,
    write_score_file as write_score_file,
)
from vit_audio.tracking import init_wandb, log_checkpoint

DEFAULT_CACHE_DIR = REPO_ROOT / "data" / "processed"
DEFAULT_RESULTS_DIR = REPO_ROOT / "results"
DEFAULT_CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
# Introduced in notebook 01_data_inspection.
# One colour per class in every figure (seaborn's colour-blind palette): real blue, fake orange.
CLASS_COLORS = {"Real": "#0173b2", "Fake": "#de8f05"}


# ---------------------------------------------------------------- configuration
# settings, the prepared datasets' segments, the training recipe, the notebooks' parameters (notebooks 00-06)

FEATURES = ("log_mel", "linear", "lfcc")


def setting(default, help, choices=None, **more):
    """A configuration field: its one default, and the help text and choices that the command line
    shows (vit_cli builds its flags from these fields) and that check_choices enforces."""
    return field(default=default, metadata=dict(help=help, choices=choices, **more))


def check_choices(config):
    """Raise ValueError naming the first field of `config` whose value is not among its choices."""
    for item in fields(config):
        allowed = item.metadata.get("choices")
        if allowed is not None and getattr(config, item.name) not in allowed:
            raise ValueError(
                f"{item.name} must be one of {tuple(allowed)}, got {getattr(config, item.name)!r}"
            )


# Introduced in notebook 01_data_inspection.
@dataclass(frozen=True)
class DataConfig:
    """How audio becomes the model's input. The names are the original notebook's constants, and
    checkpoints and prepared datasets store the settings under them."""

    SEED: int = setting(42, "seed of the train/val/test split")
    SR: int = setting(16000, "sample rate every clip is decoded to, Hz")
    N_FFT: int = setting(2048, "FFT length of the spectrogram, samples")
    HOP_LENGTH: int = setting(512, "hop between spectrogram frames, samples")
    N_MELS: int = setting(128, "rows of the input image (filter bank channels or cepstral coefficients)")
    FMIN: float = setting(0.0, "lowest filter bank frequency, Hz")
    FMAX: float = setting(8000.0, "highest filter bank frequency, Hz")
    NUM_TIME_MASKS: int = setting(2, "SpecAugment time masks per training segment")
    NUM_FREQ_MASKS: int = setting(2, "SpecAugment frequency masks per training segment")
    TIME_MASK_MAX_WIDTH: int = setting(60, "widest SpecAugment time mask, frames")
    FREQ_MASK_MAX_WIDTH: int = setting(25, "widest SpecAugment frequency mask, rows")
    MASK_REPLACEMENT_VALUE: float = setting(-80.0, "what padding and masks write into a dB spectrogram")
    NORM_EPSILON: float = setting(1e-6, "added to the standard deviation when normalising")
    LOUDNESS_LUFS: float = setting(-23.0, "loudness every clip is brought to (ITU-R BS.1770), LUFS")
    USE_GLOBAL_NORMALIZATION: bool = setting(
        False, "z-score with the train split's mean and std instead of each spectrogram's own"
    )
    # Taking each row's mean over the segment off (cepstral mean normalisation, done on the spectrogram's
    # rows) removes a voice's or a channel's lasting colour, and with it the easiest way to recognise a
    # speaker, so a detector trained on few recorded persons cannot call every voice it has not heard
    # fake. Global normalisation subtracts only the train mean.
    SUBTRACT_ROW_MEANS: bool = setting(
        True,
        "per-spectrogram normalisation first takes each row's mean over "
        "the segment off (no: the original notebook's inputs)",
    )
    USE_RANDOM_CROPPING: bool = setting(True, "train on a random crop of each segment's frames")
    # Looping is the default so that padding length cannot reveal the class.
    SHORT_CLIP_MODE: str = setting(
        "loop",
        "how a clip shorter than one segment is filled: repeated, followed by silence, or skipped",
        choices=("loop", "pad", "drop"),
    )
    TRIM_SILENCE: bool = setting(False, "cut leading and trailing silence before segmenting")
    TRIM_TOP_DB: float = setting(40.0, "silence is quieter than the clip's peak by this many dB")
    MIN_CLIP_SECONDS: float = setting(0.1, "shorter clips are skipped")
    FEATURE: str = setting(
        "log_mel",
        "the input image: mel filter bank energies in dB, the same with "
        "linearly spaced filters (as fine at 7 kHz as at 100 Hz), or their cepstra (LFCC)",
        choices=FEATURES,
    )

    @classmethod
    def original(cls, **overrides):
        """The original notebook's data settings: its per-spectrogram z-score keeps the row means."""
        return cls(**{"SUBTRACT_ROW_MEANS": False, **overrides})

    def __post_init__(self):
        check_choices(self)

    @property
    def fill_value(self):
        """What padding and SpecAugment masks write: silence in dB, the mean for cepstra."""
        return 0.0 if self.FEATURE == "lfcc" else self.MASK_REPLACEMENT_VALUE


@dataclass(frozen=True)
class SegmentConfig:
    """How a prepared dataset cuts clips into the model's inputs: segment length and overlap. The
    spectrogram width, max_frames_spec, follows from the segment length at `data_config`'s sample
    rate and hop, rounded up to whole patches."""

    name: str
    audio_length_seconds: float
    overlap_ratio: float
    apply_augmentation: bool = False
    patch_width: int = 16
    max_frames_spec: int = field(init=False)
    data_config: InitVar[DataConfig] = DataConfig()

    def __post_init__(self, data_config):
        if self.audio_length_seconds <= 0:
            raise ValueError(f"audio_length_seconds must be positive, got {self.audio_length_seconds}")
        if not 0 <= self.overlap_ratio < 1:
            raise ValueError(f"overlap_ratio must be in [0, 1), got {self.overlap_ratio}")
        frames = (self.audio_length_seconds * data_config.SR) / data_config.HOP_LENGTH
        object.__setattr__(
            self, "max_frames_spec", int(math.ceil(frames / self.patch_width) * self.patch_width)
        )

    @classmethod
    def from_dict(cls, saved, data_config=DataConfig()):
        """Rebuild from asdict() output (a checkpoint's), counting frames at `data_config`; a switch that
        older checkpoints store but that never acted (apply_waveform_augmentation) is left out."""
        ignored = ("max_frames_spec", "apply_waveform_augmentation")
        return cls(**{k: v for k, v in saved.items() if k not in ignored}, data_config=data_config)


# Introduced in notebook 01_data_inspection.
SEGMENT_CONFIGS = {
    "vit_balanced_dataset": SegmentConfig("vit_balanced_dataset", 8, 0.5, apply_augmentation=True),
    "vit_performance_dataset": SegmentConfig("vit_performance_dataset", 10, 0.0, apply_augmentation=True),
    # Most utterances in short-prompt corpora last 2-5 s: 4 s segments loop them less, and the
    # 128 x 128 image halves the cost of a training step.
    "vit_short_dataset": SegmentConfig("vit_short_dataset", 4, 0.5, apply_augmentation=True),
    # A clip shorter than its segment is looped, and the loop's period shows the clip's length: 4 s
    # segments loop 78% of the demo corpus's Piper clips and 47% of its recordings, 2 s windows a fifth
    # of each kind.
    "vit_two_second_dataset": SegmentConfig("vit_two_second_dataset", 2, 0.0, apply_augmentation=True),
}


def make_segment_config(dataset_name, data_config=DataConfig()):
    """The named dataset's SegmentConfig for a run with `data_config` (SEGMENT_CONFIGS count frames
    at the default sample rate and hop)."""
    if dataset_name not in SEGMENT_CONFIGS:
        raise ValueError(f"Unknown dataset_name {dataset_name!r}; choose one of {sorted(SEGMENT_CONFIGS)}")
    return SegmentConfig.from_dict(asdict(SEGMENT_CONFIGS[dataset_name]), data_config)


def data_settings(data_config):
    """The DataConfig as a checkpoint stores it: every setting that shapes the inputs."""
    return asdict(data_config)


# Introduced in notebook 01_data_inspection.
@dataclass
class TrainingConfig:
    """How a model is trained. The defaults are the recipe that learns recorded against synthetic
    speech (results/RESEARCH.md); `TrainingConfig.original()` is the original notebook's."""

    # The sizes are VIT_SIZES and CNN_SIZES, defined with the models below (a test checks they agree).
    model_size: str = setting(
        "ViT_Small",
        "the ViT, or the CNN baseline, and its size",
        choices=("ViT_Small", "ViT_Medium", "ViT_Large", "CNN_Small", "CNN_Medium", "CNN_Large"),
    )
    dataset_name: str = setting(
        "vit_short_dataset",
        "the prepared dataset (segment length and overlap) in cache_dir",
        choices=tuple(SEGMENT_CONFIGS),
        flag="--dataset",
    )
    epochs: int = setting(45, "passes over the training split")
    learning_rate: float = setting(5e-4, "peak learning rate")
    batch_size: int = setting(32, "segments per optimiser step")
    num_workers: int = setting(0, "DataLoader worker processes (0: load in the training process)")
    cache_dir: str = setting(str(DEFAULT_CACHE_DIR), "folder holding the prepared datasets")
    results_dir: str = setting(str(DEFAULT_RESULTS_DIR), "folder for figures, metrics and score files")
    checkpoint_dir: str = setting(str(DEFAULT_CHECKPOINT_DIR), "folder for the best and last checkpoints")
    run_name: str | None = setting(None, "names the checkpoints and results (None: MODEL_SIZE_DATASET)")
    seed: int = setting(42, "seed of weights, batches and augmentation")
    optimizer: str = setting("adamw", "adam is the original recipe's", choices=("adam", "adamw"))
    weight_decay: float = setting(0.05, "decoupled weight decay (adamw) or L2 penalty (adam)")
    lr_schedule: str = setting(
        "warmup_cosine", "learning rate over the run", choices=("constant", "warmup_cosine")
    )
    warmup_epochs: float = setting(2.0, "linear warm-up of warmup_cosine, in epochs")
    class_balance: str = setting(
        "balanced_sampler",
        "how unequal class counts are evened out",
        choices=("none", "weighted_loss", "balanced_sampler"),
    )
    grad_clip_norm: float | None = setting(1.0, "clip the gradient norm to this (none: no clipping)")
    # A one-class loss asks real speech to be compact and fakes only to lie elsewhere, so a kind of fake
    # unheard in training need not resemble those heard to be found (OneClassSoftmaxLoss).
    loss: str = setting(
        "cross_entropy",
        "two-class cross-entropy, or one_class: OC-Softmax on the cosine "
        "with a learned direction of real speech",
        choices=("cross_entropy", "one_class"),
    )
    # Averaged weights smooth the step-to-step noise of small batches, so the best epoch is picked on a
    # steadier model.
    ema_decay: float | None = setting(
        None,
        "validate, keep and test an exponential moving average of the "
        "weights with this decay per step (none: the weights themselves)",
    )
    # With few recorded persons in train, a model otherwise learns "these voices are real". The
    # equaliser's tilt is constant in time, so with DataConfig.SUBTRACT_ROW_MEANS the row means take it
    # off again, except where SpecAugment's masks cover a row; it acts with the band means kept.
    frequency_warp: float = setting(
        0.15, "largest stretch of the frequency axis in speaker augmentation (0: off)"
    )
    equalizer_db: float = setting(10.0, "largest random equaliser gain in channel augmentation, dB (0: off)")
    patch_embedding: str = setting(
        "conv",
        "tokens from 3x3 convolutions, or vit-pytorch's flattened patch "
        "and linear layer (the original notebook's)",
        choices=("linear", "conv"),
    )
    mixed_precision: str = setting(
        "auto",
        "autocast the forward pass to 16-bit floats: auto where the device "
        "runs them fast (a CPU with bf16 instructions, CUDA), on, or off; weights, "
        "optimiser state, loss and scores stay fp32",
        choices=MIXED_PRECISION_SETTINGS,
    )
    speed_up: bool = setting(True, "faster dropout and attention kernels, same results")
    early_stopping_patience: int | None = setting(
        None, "stop after this many epochs without a better validation score (none: never)"
    )
    select_best_by: str = setting(
        "val_eer", "what picks the best epoch; val_f1 is the original recipe's", choices=("val_f1", "val_eer")
    )
    compile: bool = setting(False, "torch.compile the model")
    resume: bool = setting(False, "continue from the last checkpoint of this run")
    wandb_mode: str | None = setting(
        None,
        "Weights & Biases (none: online with a key, else offline)",
        choices=(None, "online", "offline", "disabled"),
    )
    progress: bool = setting(True, "per-batch progress bars")

    @classmethod
    def original(cls, **overrides):
        """The original notebook's recipe: Adam at 1e-4, constant rate, plain cross-entropy, 8 s
        segments, linear patch embedding, SpecAugment without the speaker and channel augmentation,
        best epoch by validation F1."""
        recipe = dict(
            dataset_name="vit_balanced_dataset",
            epochs=10,
            learning_rate=1e-4,
            optimizer="adam",
            weight_decay=0.0,
            lr_schedule="constant",
            class_balance="none",
            grad_clip_norm=None,
            patch_embedding="linear",
            select_best_by="val_f1",
            frequency_warp=0.0,
            equalizer_db=0.0,
        )
        return cls(**{**recipe, **overrides})

    def __post_init__(self):
        if isinstance(self.mixed_precision, bool):  # configs and checkpoints from before it had three values
            self.mixed_precision = "auto" if self.mixed_precision else "off"
        for name in ("epochs", "learning_rate", "batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.frequency_warp < 1 or self.equalizer_db < 0:
            raise ValueError(
                f"frequency_warp must be in [0, 1) and equalizer_db >= 0, got "
                f"{self.frequency_warp} and {self.equalizer_db}"
            )
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        # patience 0 would train nothing; a clip norm of 0 would be ignored and a negative one flips gradients
        for name in ("grad_clip_norm", "early_stopping_patience"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)!r}")
        check_choices(self)
        if self.run_name is None:
            self.run_name = f"{self.model_size}_{self.dataset_name}"

    @property
    def architecture(self):
        return "cnn" if self.model_size in CNN_SIZES else "vit"

    def checkpoint_path(self, which="best"):
        """`{best|last}_{vit|cnn}_model_{run_name}.pth`, the original notebooks' names."""
        return Path(self.checkpoint_dir) / f"{which}_{self.architecture}_model_{self.run_name}.pth"


def _progress_on(text):
    return text != "0"


def show_progress():
    """Progress bars unless VIT_PROGRESS=0 (the test session sets it: their redraws depend on timing)."""
    return _progress_on(os.environ.get("VIT_PROGRESS", "1"))


def _seed_list(text):
    return [int(seed) for seed in text.split(",")]


# Introduced in notebook 00_prepare_data.
# Every notebook parameter: the environment variable that sets it, how to read it, and its default (the
# fixture corpus and the fixture's training settings, so a notebook runs as it is under pytest --nbval).
NOTEBOOK_PARAMETERS = {
    "CORPUS": ("VIT_CORPUS", str, "folder"),  # folder | asvspoof2019_la | fake_or_real | in_the_wild
    "AUDIO_DIR": ("VIT_AUDIO_DIR", str, str(FIXTURE_AUDIO_DIR)),
    "CACHE_DIR": ("VIT_CACHE_DIR", str, str(DEFAULT_CACHE_DIR)),
    "DATASET": ("VIT_DATASET", str, TrainingConfig.dataset_name),
    "RESULTS_DIR": ("VIT_RESULTS_DIR", str, str(DEFAULT_RESULTS_DIR)),
    "CHECKPOINT_DIR": ("VIT_CHECKPOINT_DIR", str, str(DEFAULT_CHECKPOINT_DIR)),
    "SHOW_PROGRESS": ("VIT_PROGRESS", _progress_on, "1"),  # 0 turns the bars off
    "NUM_WORKERS": ("VIT_PREP_WORKERS", lambda text: int(text) or None, "0"),  # None: one process per core
    "SPEAKER_PATTERN": ("VIT_SPEAKER_PATTERN", lambda text: text or None, ""),  # e.g. r"^(spk\d+)_"
    "MODEL_SIZE": ("VIT_MODEL_SIZE", str, "ViT_Small"),
    "CNN_SIZE": ("VIT_CNN_SIZE", str, "CNN_Small"),
    "EPOCHS": ("VIT_EPOCHS", int, "10"),  # the fixture needs few; real corpora: TrainingConfig.epochs
    "BATCH_SIZE": ("VIT_BATCH_SIZE", int, "16"),
    "LEARNING_RATE": ("VIT_LEARNING_RATE", float, str(TrainingConfig.learning_rate)),
    "SEEDS": ("VIT_SEEDS", _seed_list, "42"),
    "AUDIO_FILE": ("VIT_AUDIO_FILE", str, ""),  # empty: a test-split file of the prepared dataset
    "GMM_COMPONENTS": ("VIT_GMM_COMPONENTS", int, "32"),  # ASVspoof 2019 used 512; the fixture is tiny
    "GMM_MAX_FRAMES": ("VIT_GMM_MAX_FRAMES", int, "20000"),
    "FOLDS": ("VIT_FOLDS", int, "3"),  # cross-validation folds over the recorded persons (notebook 07)
    # results of the demo corpus that notebook 07 shows beside the fixture's
    "RECORD_DIR": ("VIT_RECORD_DIR", str, str(DEFAULT_RESULTS_DIR / "demo_corpus")),
}


# Introduced in notebook 00_prepare_data.
def notebook_parameters(*names):
    """The values of the named notebook parameters, in order: each from its environment variable
    (NOTEBOOK_PARAMETERS), else its default. Papermill can still set any of them by name, as its
    injected cell runs after the parameters cell."""
    unknown = [name for name in names if name not in NOTEBOOK_PARAMETERS]
    if unknown:
        raise ValueError(
            f"Unknown notebook parameter(s) {unknown}; choose from {sorted(NOTEBOOK_PARAMETERS)}"
        )
    values = []
    for name in names:
        variable, parse, default = NOTEBOOK_PARAMETERS[name]
        text = os.environ.get(variable, default)
        try:
            values.append(parse(text))
        except ValueError as error:
            raise ValueError(f"{variable}={text!r} cannot be read for {name}: {error}") from None
    return tuple(values)


# The notebook parameters that are TrainingConfig settings, and the fields they set.
NOTEBOOK_TRAINING_SETTINGS = {
    "MODEL_SIZE": "model_size",
    "DATASET": "dataset_name",
    "EPOCHS": "epochs",
    "LEARNING_RATE": "learning_rate",
    "BATCH_SIZE": "batch_size",
    "CACHE_DIR": "cache_dir",
    "RESULTS_DIR": "results_dir",
    "CHECKPOINT_DIR": "checkpoint_dir",
    "SHOW_PROGRESS": "progress",
}


# Introduced in notebook 03_train.
def notebook_training_config(parameters, **overrides):
    """The TrainingConfig of a notebook's run: each of NOTEBOOK_TRAINING_SETTINGS that `parameters` (the
    notebook's globals(), after its parameters cell) holds, then `overrides`; so notebooks 03-06 find
    the same run and its checkpoints."""
    settings = {
        field_name: parameters[name]
        for name, field_name in NOTEBOOK_TRAINING_SETTINGS.items()
        if name in parameters
    }
    return TrainingConfig(**{**settings, **overrides})


# ---------------------------------------------------------------- features
# from a file to spectrograms, and a corpus to a prepared dataset (notebooks 00 and 01)


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
        return [(s / sr, audio[s : s + length], 0.0) for s in segment_starts(len(audio), length, step)]
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
        y=segment,
        sr=data_config.SR,
        n_fft=data_config.N_FFT,
        hop_length=data_config.HOP_LENGTH,
        n_mels=data_config.N_MELS,
        fmin=data_config.FMIN,
        fmax=data_config.FMAX,
        power=2.0,
    )
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
    bank = linear_filterbank(
        data_config.SR, data_config.N_FFT, data_config.N_MELS, data_config.FMIN, data_config.FMAX
    )
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
        raise ValueError(
            f"need a mono waveform of at least {window_length} samples (one analysis window), "
            f"got shape {audio.shape}"
        )
    emphasised = np.append(audio[:1], audio[1:] - pre_emphasis * audio[:-1])
    frames = np.lib.stride_tricks.sliding_window_view(emphasised, window_length)[::hop_length]
    return (np.abs(np.fft.rfft(frames * np.hamming(window_length), n_fft)) ** 2).T


def delta_features(features, width=3):
    """Time derivative of (dims, frames) features as the ASVspoof 2019 baseline takes it: the
    unnormalised regression sum_k k * (x[t + k] - x[t - k]), k = 1..width // 2, edge frames repeated."""
    half = width // 2
    padded = np.pad(features, [(0, 0), (half, half)], mode="edge")
    frames = features.shape[-1]
    return sum(
        k * (padded[:, half + k : half + k + frames] - padded[:, half - k : half - k + frames])
        for k in range(1, half + 1)
    )


# Introduced in notebook 06_baselines.
def lfcc(
    audio_or_power,
    sr=DataConfig.SR,
    n_coeffs=20,
    n_filters=20,
    n_fft=512,
    window_seconds=0.020,
    hop_seconds=0.010,
    fmin=0.0,
    fmax=None,
    pre_emphasis=0.97,
    deltas=True,
):
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
        power = power_spectrogram(
            power, n_fft, int(round(window_seconds * sr)), int(round(hop_seconds * sr)), pre_emphasis
        )
    elif power.shape[0] != n_fft // 2 + 1:
        raise ValueError(f"power spectrogram has {power.shape[0]} bins, n_fft={n_fft} needs {n_fft // 2 + 1}")
    energies = linear_filterbank(sr, n_fft, n_filters, fmin, fmax) @ power
    cepstra = scipy.fft.dct(np.log10(energies + np.finfo(np.float64).eps), type=2, norm="ortho", axis=0)[
        :n_coeffs
    ]
    if deltas:
        delta = delta_features(cepstra)
        cepstra = np.concatenate([cepstra, delta, delta_features(delta)])
    return cepstra.astype(np.float32)


def _require_min_duration(n_samples, data_config):
    duration = n_samples / data_config.SR
    if duration < data_config.MIN_CLIP_SECONDS:
        raise AudioError(f"too short ({duration:.3f} s < {data_config.MIN_CLIP_SECONDS} s)")


# Introduced in notebook 01_data_inspection.
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


KEPT_SAMPLES = 1 << 21  # a clip up to this long (131 s at 16 kHz, 8 MB) is kept, not decoded a second time


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
        yield block[max(0, start - position) : max(0, end - position)]
        position += len(block)


def _stream_segments(blocks, sr, gain, start, end, length, step):
    """segment_waveform's segments of the clip's samples [start, end), scaled by `gain`, cut from the
    clip's `blocks` (a clip at least one segment long)."""
    starts = segment_starts(end - start, length, step)
    windows = SlidingWindows(
        lambda j: (starts[j], starts[j] + length) if j < len(starts) else (math.inf, math.inf)
    )
    cut = 0
    for block in _span(blocks, start, end):
        for segment in windows.add((block * gain).astype(np.float32)):
            yield starts[cut] / sr, segment, 0.0
            cut += 1
    if cut < len(starts):
        raise AudioError("the file changed while it was being read")


def clip_spectrograms(path, segment_config, data_config=DataConfig()):
    """The whole preparation path for one file, in bounded memory whatever its length: decode ->
    loudness -> segments -> log-mel (dB).

    Returns (the clip's CLIP_FACTS, used by the shortcut audit, and an iterator of (start_seconds,
    spectrogram (N_MELS, max_frames_spec), filled_fraction)). The file is read once here to measure
    it and, unless it is short enough to be kept, once more as the iterator is consumed.
    """
    sr = data_config.SR
    n_samples, loudness, (start, end), recording, kept = measure_clip(path, data_config)
    gain = loudness_gain(loudness, data_config.LOUDNESS_LUFS)
    facts = dict(
        duration_s=round(n_samples / sr, 4),
        loudness_lufs=round(loudness, 3),
        leading_silence_s=round(start / sr, 4),
        original_sample_rate=original_sample_rate(path),
        **recording,
    )
    if not data_config.TRIM_SILENCE:
        start, end = 0, n_samples
    blocks = kept if kept is not None else stream_audio(path, sr)
    length, step = segment_geometry(sr, segment_config.audio_length_seconds, segment_config.overlap_ratio)
    if end - start >= length:
        segments = _stream_segments(blocks, sr, gain, start, end, length, step)
    else:  # shorter than one segment: looped or padded in memory
        audio = np.concatenate([np.zeros(0, np.float32), *_span(blocks, start, end)])
        segments = segment_waveform(
            (audio * gain).astype(np.float32),
            sr,
            segment_config.audio_length_seconds,
            segment_config.overlap_ratio,
            data_config.SHORT_CLIP_MODE,
        )
        if not segments:
            raise AudioError(f"shorter than one segment ({n_samples / sr:.2f} s) and SHORT_CLIP_MODE='drop'")
    specs = (
        (
            seconds,
            fit_frames(
                spectrogram_features(segment, data_config),
                segment_config.max_frames_spec,
                data_config.fill_value,
            ),
            filled,
        )
        for seconds, segment, filled in segments
    )
    return facts, specs


def clip_to_spectrograms(path, segment_config, data_config=DataConfig()):
    """clip_spectrograms with the spectrograms in a list: (the clip's CLIP_FACTS, list of
    (start_seconds, spectrogram (N_MELS, max_frames_spec), filled_fraction))."""
    facts, specs = clip_spectrograms(path, segment_config, data_config)
    return facts, list(specs)


def _prepare_one(job):
    """Worker: one original file -> its .npy segments. Never raises: a fault of the file becomes its
    skip reason, a fault of the machine (is_machine_fault) a `fault`, which stops the run unjournaled."""
    path, split_dir, file_id, segment_config, data_config = job
    try:
        facts, specs = clip_spectrograms(path, segment_config, data_config)
        return preparation.save_segments(
            specs, facts, split_dir, file_id
        )  # each spectrogram saved as it is made
    except AudioError as error:
        return dict(file_id=file_id, skip=str(error))
    except Exception as error:  # a corrupt file must not stop a 100k-file run; a full disk must
        if is_machine_fault(error):
            return dict(file_id=file_id, fault=machine_fault_reason(error))
        return dict(file_id=file_id, skip=f"{type(error).__name__}: {error}")


# Introduced in notebook 00_prepare_data.
def prepare_dataset(
    corpus_root,
    dataset_name=TrainingConfig.dataset_name,
    corpus="folder",
    cache_dir=DEFAULT_CACHE_DIR,
    data_config=DataConfig(),
    num_workers=None,
    speaker_pattern=None,
    split_fractions=(0.7, 0.15, 0.15),
    progress=True,
):
    """Raw corpus -> `<cache_dir>/<dataset_name>/<split>/metadata.csv` + .npy log-mels (dB).

    Parallel over files, resumable (a rerun redoes only the files added, changed or moved to another
    split), every file written atomically (vit_audio.preparation). Stops before any decoding when a
    split lacks a class. Writes skipped.csv (each unusable file and why), split_audit.csv and
    normalization.json (train mean/std for global normalisation). Returns (summary dict, split
    audit, skipped files).
    """
    segment_config = make_segment_config(dataset_name, data_config)
    corpus_root = Path(corpus_root)
    files, reader_skips = read_corpus(corpus, corpus_root, speaker_pattern)
    if files.empty:
        raise ValueError(f"No usable audio files found in {corpus_root} (corpus layout {corpus!r})")
    out_dir = Path(cache_dir) / dataset_name
    settings = dict(
        corpus=corpus,
        corpus_root=str(corpus_root.resolve()),
        data_config=preparation.without_load_time(data_settings(data_config)),
        model_config=asdict(segment_config),
        split_fractions=list(split_fractions),
    )
    preparation.check_settings(out_dir, settings)
    split_by_speaker = files["split"].isna().any() and files["speaker"].notna().all()
    files = assign_splits(files, split_fractions, seed=data_config.SEED)
    check_split_leaks(files)
    check_split_classes(
        files,
        note=f"{files['speaker'].nunique()} speakers, each kept in one split" if split_by_speaker else "",
    )
    done = preparation.prepare_files(
        files,
        corpus_root,
        out_dir,
        settings,
        _prepare_one,
        (segment_config, data_config),
        num_workers,
        progress,
        desc=f"Preparing {dataset_name}",
    )
    return preparation.write_dataset_tables(out_dir, files, done, reader_skips, data_config.NORM_EPSILON)


# ---------------------------------------------------------------- dataset
# a prepared split as PyTorch reads it, with its augmentation (notebook 01)


class DatasetError(Exception):
    """A processed dataset that cannot be used as it is; the message names the file and the problem."""


REQUIRED_METADATA_COLUMNS = {"npy_path", "original_path", "label", "segment_index"}


# Introduced in notebook 02_vit_walkthrough.
def read_metadata(split_dir):
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetError(
            f"Dataset split folder not found: {split_dir} (run notebook 00 / prepare_dataset first)"
        )
    path = split_dir / "metadata.csv"
    if not path.is_file():
        raise DatasetError(f"Missing {path}")
    metadata = pd.read_csv(path, dtype={"speaker": str, "attack": str, "prompt_speaker": str})
    missing = REQUIRED_METADATA_COLUMNS - set(metadata.columns)
    if missing:
        raise DatasetError(f"{path}: missing required column(s) {sorted(missing)}")
    if metadata.empty:
        raise DatasetError(f"{path}: the split is empty")
    bad = metadata.loc[~metadata["label"].isin([0, 1]), "label"]
    if len(bad):
        raise DatasetError(
            f"{path}: label must be 0 (real) or 1 (fake), found {bad.tolist()[0]!r} in row {bad.index[0] + 2}"
        )
    missing_files = [p for p in metadata["npy_path"] if not (split_dir / p).is_file()]
    if missing_files:
        raise DatasetError(
            f"{path}: {len(missing_files)} .npy file(s) listed but missing, "
            f"e.g. {split_dir / missing_files[0]}"
        )
    metadata["label"] = metadata["label"].astype(int)
    return metadata


# Introduced in notebook 00_prepare_data.
def read_dataset_metadata(dataset_dir):
    """Every split's metadata.csv in one table with a `split` column."""
    return pd.concat(
        [read_metadata(Path(dataset_dir) / split).assign(split=split) for split in SPLITS], ignore_index=True
    )


def spec_augment(spec, data_config=DataConfig(), generator=None):
    """SpecAugment on a (1, n_mels, frames) dB tensor: time and frequency masks set to the mask value."""
    spec = spec.clone()
    _, n_mels, frames = spec.shape

    def draw(high):
        return int(torch.randint(0, max(1, high) + 1, (1,), generator=generator))

    for _ in range(data_config.NUM_TIME_MASKS):
        width = draw(min(data_config.TIME_MASK_MAX_WIDTH, frames))
        start = draw(frames - width)
        spec[:, :, start : start + width] = data_config.fill_value
    for _ in range(data_config.NUM_FREQ_MASKS):
        width = draw(min(data_config.FREQ_MASK_MAX_WIDTH, n_mels))
        start = draw(n_mels - width)
        spec[:, start : start + width, :] = data_config.fill_value
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
        return spec[..., offset : offset + max_frames]
    return torch.roll(spec, -offset, dims=-1)


# Introduced in notebook 01_data_inspection.
class AudioDataset(Dataset):
    """One split ("train", "val" or "test") of the prepared dataset in `dataset_dir` -> (spectrogram
    float32 (1, n_mels, max_frames_spec), label).

    The .npy files hold log-mel in dB; augmentation (train only) acts in dB, where the mask value
    -80 dB means silence, and normalisation comes last: per spectrogram (each row's mean first taken
    off, with DataConfig.SUBTRACT_ROW_MEANS), or with the train split's statistics (normalization.json)
    when DataConfig.USE_GLOBAL_NORMALIZATION is set.
    `silenced_rows` (a slice of rows, for band_occlusion) are set to DataConfig.fill_value before
    augmentation and normalisation, so they carry nothing.
    Unreadable items come back as None (dropped by custom_collate_fn) and are counted in `dropped`.
    """

    def __init__(
        self,
        dataset_dir,
        split,
        n_mels=DataConfig.N_MELS,
        max_frames_spec=256,
        augment=False,
        data_config=DataConfig(),
        frequency_warp=0.0,
        equalizer_db=0.0,
        silenced_rows=None,
    ):
        root = Path(dataset_dir)
        self.split_dir = root / split
        self.metadata = read_metadata(self.split_dir)
        self.n_mels, self.max_frames_spec = n_mels, max_frames_spec
        self.augment, self.data_config = augment, data_config
        if augment and data_config.FEATURE == "lfcc" and (frequency_warp or equalizer_db):
            raise ValueError(
                "TrainingConfig.frequency_warp and equalizer_db act on spectral rows; cepstra "
                "(DataConfig.FEATURE='lfcc') have none: set both to 0"
            )
        self.frequency_warp, self.equalizer_db = frequency_warp, equalizer_db
        self.silenced_rows = silenced_rows
        self.norm_stats = None
        if data_config.USE_GLOBAL_NORMALIZATION:
            stats_path = root / "normalization.json"
            if not stats_path.is_file():
                raise DatasetError(
                    f"USE_GLOBAL_NORMALIZATION needs {stats_path} (written by prepare_dataset)"
                )
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
            raise DatasetError(
                f"{path}: shape {spec.shape}, expected (1, {self.n_mels}, frames) or ({self.n_mels}, frames)"
            )
        if not np.isfinite(spec).all():  # one NaN would turn every weight NaN a step later
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
        spec = normalize_spectrogram(
            spec, mean, std, self.data_config.NORM_EPSILON, self.data_config.SUBTRACT_ROW_MEANS
        )
        return spec, int(self.metadata["label"].iat[idx])


def custom_collate_fn(batch):
    """Collate, leaving out items the dataset could not read (None); None if nothing is left.
    The dataset counts each item it could not read (`AudioDataset.dropped`)."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)


# ---------------------------------------------------------------- the ViT
# patches, attention, the transformer and the classifier (notebook 02)


HEADS = ("linear", "one_class")
# One-class learning (OC-Softmax): real embeddings are pulled to a cosine of at least the first margin
# with a learned direction, fakes pushed below the second; the scale sharpens the loss.
ONE_CLASS_MARGINS = (0.9, 0.2)
ONE_CLASS_SCALE = 20.0


def check_head(config):
    if config.head not in HEADS:
        raise ValueError(f"{config.name}: head must be one of {HEADS}, got {config.head!r}")
    if config.head == "one_class" and config.num_classes != 2:
        raise ValueError(f"{config.name}: the one-class head scores two classes, got {config.num_classes}")


@dataclass
class ViTConfig:
    """The Vision Transformer's shape: image and patch sizes (rows, columns), width, depth, heads.
    Sequences are kept as lists, as checkpoints store them."""

    name: str
    image_size: list
    patch_size: list
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    dropout: float = 0.1
    emb_dropout: float = 0.1
    channels: int = 1
    num_classes: int = 2
    # A stride below the patch size makes patches overlap, as in the Audio Spectrogram Transformer.
    patch_stride: list | None = None
    patch_norm: bool = True
    pool: str = "cls"
    # "conv": tokens from 3x3 convolutions (conv_patch_embedding); "linear": vit-pytorch's flattened
    # patch and linear layer. TrainingConfig.patch_embedding chooses for a training run.
    patch_embedding: str = "linear"
    # The layer giving the logits (classifier_layer); TrainingConfig.loss chooses for a training run.
    head: str = "linear"

    def __post_init__(self):
        check_head(self)
        self.image_size, self.patch_size = list(self.image_size), list(self.patch_size)
        self.patch_stride = list(self.patch_stride or self.patch_size)
        if (self.image_height - self.patch_height) % self.stride_height or (
            self.image_width - self.patch_width
        ) % self.stride_width:
            raise ValueError(
                f"{self.name}: image size {tuple(self.image_size)} is not divisible by patch size "
                f"{tuple(self.patch_size)} with stride {tuple(self.patch_stride)}"
            )
        if self.dim % self.heads:
            raise ValueError(f"{self.name}: dim {self.dim} is not divisible by heads {self.heads}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"{self.name}: pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.patch_embedding not in ("linear", "conv"):
            raise ValueError(
                f"{self.name}: patch_embedding must be 'linear' or 'conv', got {self.patch_embedding!r}"
            )
        side = self.patch_height
        if self.patch_embedding == "conv" and (
            self.patch_width != side or side & (side - 1) or self.patch_stride != self.patch_size
        ):
            raise ValueError(
                f"{self.name}: the convolutional patch embedding needs square, non-overlapping "
                f"patches whose side is a power of two, got patch {tuple(self.patch_size)} "
                f"stride {tuple(self.patch_stride)}"
            )

    image_height = property(lambda self: self.image_size[0])
    image_width = property(lambda self: self.image_size[1])
    patch_height = property(lambda self: self.patch_size[0])
    patch_width = property(lambda self: self.patch_size[1])
    stride_height = property(lambda self: self.patch_stride[0])
    stride_width = property(lambda self: self.patch_stride[1])
    patch_rows = property(lambda self: (self.image_height - self.patch_height) // self.stride_height + 1)
    patch_columns = property(lambda self: (self.image_width - self.patch_width) // self.stride_width + 1)
    num_patches = property(lambda self: self.patch_rows * self.patch_columns)
    patch_dim = property(lambda self: self.channels * self.patch_height * self.patch_width)


# Widths chosen so the trainable parameter counts at 128 x 256 land in the sizes' ranges:
# Small 2-3 M, Medium 4-6 M, Large 10-12 M (64-dimensional heads throughout).
VIT_SIZES = {
    "ViT_Small": dict(dim=192, depth=6, heads=3, mlp_dim=768),
    "ViT_Medium": dict(dim=256, depth=7, heads=4, mlp_dim=1024),
    "ViT_Large": dict(dim=384, depth=6, heads=6, mlp_dim=1536),
}


# Introduced in notebook 02_vit_walkthrough.
def make_vit_config(model_size, image_size=(DataConfig.N_MELS, 256), patch_size=(16, 16), **options):
    """A named size; `options` are ViTConfig's (patch_stride, patch_norm, pool, patch_embedding, head)."""
    if model_size not in VIT_SIZES:
        raise ValueError(f"Unknown model size {model_size!r}; choose one of {sorted(VIT_SIZES)}")
    return ViTConfig(model_size, image_size, patch_size, **VIT_SIZES[model_size], **options)


ViT_Small = make_vit_config("ViT_Small")


ViT_Medium = make_vit_config("ViT_Medium")


ViT_Large = make_vit_config("ViT_Large")


# Introduced in notebook 02_vit_walkthrough.
class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


# Introduced in notebook 02_vit_walkthrough.
class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


# Introduced in notebook 02_vit_walkthrough.
class Attention(nn.Module):
    """Multi-head self-attention: every token's query is compared with every token's key, and the
    softmax of the scaled scores weighs the values."""

    def __init__(self, dim, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads, self.scale = heads, dim_head**-0.5
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


# Introduced in notebook 02_vit_walkthrough.
class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        PreNorm(dim, Attention(dim, heads, dim_head, dropout)),
                        PreNorm(dim, FeedForward(dim, mlp_dim, dropout)),
                    ]
                )
                for _ in range(depth)
            ]
        )

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


# Introduced in notebook 02_vit_walkthrough.
def patchify(config: ViTConfig):
    """(b, c, H, W) -> (b, num_patches, patch_dim), patches in row-major order. Non-overlapping
    patches are a reshape; overlapping ones are cut out with a sliding window (same feature order)."""
    if (config.stride_height, config.stride_width) == (config.patch_height, config.patch_width):
        return Rearrange(
            "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=config.patch_height, p2=config.patch_width
        )
    return nn.Sequential(
        nn.Unfold(
            (config.patch_height, config.patch_width), stride=(config.stride_height, config.stride_width)
        ),
        Rearrange(
            "b (c p1 p2) n -> b n (p1 p2 c)", c=config.channels, p1=config.patch_height, p2=config.patch_width
        ),
    )


# Introduced in notebook 02_vit_walkthrough.
def conv_patch_embedding(config: ViTConfig):
    """(b, c, H, W) -> (b, num_patches, dim) through early convolutions (Xiao et al., 2021): 3x3
    convolutions of stride 2, each halving the image and doubling the channels (up to dim / 2), until
    one position covers one patch, then a 1x1 convolution to the token width. Same token grid as the
    linear patch embedding; the convolutions see every position, as a CNN's first layers do."""
    steps = config.patch_height.bit_length() - 1
    widths = [config.channels] + [config.dim >> (steps + 1 - i) for i in range(1, steps + 1)]
    layers = [
        layer
        for c_in, c_out in zip(widths, widths[1:])
        for layer in (
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )
    ]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], config.dim, 1), Rearrange("b d h w -> b (h w) d"))


class OneClassHead(nn.Module):
    """The cosine between an embedding and one learned direction, where real speech gathers, given
    as two logits: scale/2 * (c, -c) with c the cosine less the margins' midpoint. Softmax then
    gives the fake probability sigmoid(-scale * c), so scores, EERs and the verdict threshold work
    as for a linear head. It computes in fp32 under autocast: the scale would magnify bf16's rounding."""

    def __init__(self, in_features):
        super().__init__()
        self.direction = nn.Parameter(torch.randn(in_features) / in_features**0.5)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            cosine = F.normalize(x.float(), dim=-1) @ F.normalize(self.direction.float(), dim=0)
        return self.logits_from_cosine(cosine)

    @staticmethod
    def logits_from_cosine(cosine):
        half = ONE_CLASS_SCALE / 2 * (cosine - sum(ONE_CLASS_MARGINS) / 2)
        return torch.stack((half, -half), dim=-1)

    @staticmethod
    def cosine_from_logits(logits):
        """The inverse of logits_from_cosine, for the loss."""
        return (logits[:, 0] - logits[:, 1]).float() / ONE_CLASS_SCALE + sum(ONE_CLASS_MARGINS) / 2


def classifier_layer(in_features, config):
    """The layer giving the two logits (real, fake) from a pooled embedding: linear, or OneClassHead."""
    if config.head == "one_class":
        return OneClassHead(in_features)
    return nn.Linear(in_features, config.num_classes)


# Introduced in notebook 02_vit_walkthrough.
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
        self.transformer = Transformer(
            config.dim, config.depth, config.heads, config.dim // config.heads, config.mlp_dim, config.dropout
        )
        self.mlp_head = nn.Sequential(nn.LayerNorm(config.dim), classifier_layer(config.dim, config))

    def forward(self, img, return_attention=False):
        x = self.to_patch_embedding(img)  # (b, num_patches, dim)
        cls_tokens = repeat(self.cls_token, "1 1 d -> b 1 d", b=x.shape[0])
        x = self.dropout(torch.cat((cls_tokens, x), dim=1) + self.pos_embedding)
        if return_attention:
            x, maps = self.transformer(x, return_attention=True)
            return self.mlp_head(self.pooled(x)), maps  # maps: depth x (b, heads, n+1, n+1)
        return self.mlp_head(self.pooled(self.transformer(x)))

    def pooled(self, x):
        """The CLS token's output, or with pool="mean" the mean over all tokens."""
        return x.mean(dim=1) if self.config.pool == "mean" else x[:, 0]


# Introduced in notebook 02_vit_walkthrough.
def parameter_table(image_size=(DataConfig.N_MELS, 256), patch_embedding=TrainingConfig.patch_embedding):
    """Trainable parameters of each ViT size at `image_size`, with the recipe's patch embedding by default."""
    rows = []
    for size in VIT_SIZES:
        config = make_vit_config(size, image_size, patch_embedding=patch_embedding)
        rows.append(
            dict(
                model_size=size,
                dim=config.dim,
                depth=config.depth,
                heads=config.heads,
                mlp_dim=config.mlp_dim,
                patches=config.num_patches,
                params_M=round(count_parameters(AudioViT(config=config)) / 1e6, 3),
            )
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the CNN
# the ResNet-style baseline (notebook 06), and building either model from its config


@dataclass
class CNNConfig:
    """A ResNet-style CNN: `blocks[i]` residual blocks of `filters[i]` channels in stage i (stage i > 0
    halves the resolution); bottleneck blocks widen their output 4x. Sequences are kept as lists, as
    checkpoints store them."""

    name: str
    image_size: list
    channels: int = 1
    num_classes: int = 2
    blocks: list = field(default_factory=lambda: [2, 2, 2, 2])
    filters: list = field(default_factory=lambda: [64, 128, 256, 512])
    bottleneck: bool = False
    head: str = "linear"  # as ViTConfig.head

    def __post_init__(self):
        check_head(self)
        self.image_size, self.blocks, self.filters = (
            list(self.image_size),
            list(self.blocks),
            list(self.filters),
        )
        if len(self.blocks) != len(self.filters) or not self.blocks:
            raise ValueError(
                f"{self.name}: need one block count per filter width, got blocks {self.blocks} "
                f"and filters {self.filters}"
            )
        if any(f <= 0 for f in self.filters) or any(b < 0 for b in self.blocks) or not sum(self.blocks):
            raise ValueError(
                f"{self.name}: filters must be positive and blocks non-negative with at least one "
                f"block, got blocks {self.blocks} and filters {self.filters}"
            )

    image_height = property(lambda self: self.image_size[0])
    image_width = property(lambda self: self.image_size[1])


# ResNet layouts scaled so the trainable parameter counts at 128 x 256 match the ViT sizes:
# Small 2-3 M (ResNet-18's blocks at half width), Medium 4-6 M (ResNet-50's bottlenecks at half
# width), Large 10-12 M (ResNet-50's bottlenecks at 11/16 width).
CNN_SIZES = {
    "CNN_Small": dict(blocks=[2, 2, 2, 2], filters=[32, 64, 128, 256], bottleneck=False),
    "CNN_Medium": dict(blocks=[3, 4, 6, 3], filters=[32, 64, 128, 256], bottleneck=True),
    "CNN_Large": dict(blocks=[3, 4, 6, 3], filters=[44, 88, 176, 352], bottleneck=True),
}


def make_cnn_config(model_size, image_size=(DataConfig.N_MELS, 256), head="linear"):
    if model_size not in CNN_SIZES:
        raise ValueError(f"Unknown model size {model_size!r}; choose one of {sorted(CNN_SIZES)}")
    return CNNConfig(model_size, image_size, **CNN_SIZES[model_size], head=head)


def conv_bn(in_channels, out_channels, kernel_size, stride=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def shortcut(in_channels, out_channels, stride):
    """A residual block's input path: the input itself, or a 1x1 projection when the block changes its
    shape."""
    return (
        nn.Identity()
        if stride == 1 and in_channels == out_channels
        else conv_bn(in_channels, out_channels, 1, stride)
    )


class ResidualBlock(nn.Module):
    def forward(self, x):
        return F.relu(self.residual(x) + self.shortcut(x))


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions plus the input (projected by a 1x1 convolution when the shape changes)."""

    expansion = 1

    def __init__(self, in_channels, width, stride=1):
        super().__init__()
        self.residual = nn.Sequential(
            conv_bn(in_channels, width, 3, stride), nn.ReLU(inplace=True), conv_bn(width, width, 3)
        )
        self.shortcut = shortcut(in_channels, width, stride)


class BottleneckBlock(ResidualBlock):
    """1x1 down to `width`, 3x3 at `width`, 1x1 up to 4 x width: deeper for the same parameters."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1):
        super().__init__()
        out_channels = width * self.expansion
        self.residual = nn.Sequential(
            conv_bn(in_channels, width, 1),
            nn.ReLU(inplace=True),
            conv_bn(width, width, 3, stride),
            nn.ReLU(inplace=True),
            conv_bn(width, out_channels, 1),
        )
        self.shortcut = shortcut(in_channels, out_channels, stride)


class AudioCNN(nn.Module):
    """ResNet over a log-mel spectrogram: a 7x7 stride-2 convolution and max pooling (1/4 resolution),
    residual stages, global average pooling, a linear layer giving 2 logits (real, fake). The pooling
    makes it accept any spectrogram width."""

    def __init__(self, *, config: CNNConfig):
        super().__init__()
        self.config = config
        block = BottleneckBlock if config.bottleneck else BasicBlock
        self.stem = nn.Sequential(
            conv_bn(config.channels, config.filters[0], 7, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages, channels = [], config.filters[0]
        for stage, (n_blocks, width) in enumerate(zip(config.blocks, config.filters)):
            for index in range(n_blocks):
                stages.append(block(channels, width, stride=2 if stage > 0 and index == 0 else 1))
                channels = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), classifier_layer(channels, config))

    def forward(self, img):
        return self.head(self.stages(self.stem(img)))  # (b, 1, n_mels, frames) -> (b, 2)


CNN_Small = make_cnn_config("CNN_Small")


CNN_Medium = make_cnn_config("CNN_Medium")


CNN_Large = make_cnn_config("CNN_Large")


# Introduced in notebook 06_baselines.
def cnn_parameter_table(image_size=(DataConfig.N_MELS, 256)):
    rows = []
    for size in CNN_SIZES:
        config = make_cnn_config(size, image_size)
        rows.append(
            dict(
                model_size=size,
                block="bottleneck" if config.bottleneck else "basic",
                blocks=config.blocks,
                filters=config.filters,
                params_M=round(count_parameters(AudioCNN(config=config)) / 1e6, 3),
            )
        )
    return pd.DataFrame(rows)


ARCHITECTURE_CONFIGS = {"vit": ViTConfig, "cnn": CNNConfig}


def architecture_of(config):
    """ "vit" or "cnn": which model a ViTConfig or CNNConfig describes; checkpoints store it."""
    return "cnn" if isinstance(config, CNNConfig) else "vit"


def make_model_config(
    model_size,
    image_size=(DataConfig.N_MELS, 256),
    patch_embedding=TrainingConfig.patch_embedding,
    head="linear",
):
    """A ViTConfig for ViT_Small/Medium/Large (with the recipe's patch embedding unless told), a CNNConfig
    for CNN_Small/Medium/Large."""
    if model_size in CNN_SIZES:
        return make_cnn_config(model_size, image_size, head)
    if model_size in VIT_SIZES:
        return make_vit_config(model_size, image_size, patch_embedding=patch_embedding, head=head)
    raise ValueError(f"Unknown model size {model_size!r}; choose one of {[*VIT_SIZES, *CNN_SIZES]}")


def build_model(config):
    """AudioViT or AudioCNN, whichever `config` describes."""
    return AudioCNN(config=config) if architecture_of(config) == "cnn" else AudioViT(config=config)


# Introduced in notebook 02_vit_walkthrough.
def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- the LFCC-GMM baseline
# the ASVspoof 2019 baseline: a Gaussian mixture per class over LFCC frames (notebook 06)


def file_lfcc_frames(
    files, audio_dir, data_config=DataConfig(), max_frames_per_file=None, seed=DataConfig.SEED, progress=True
):
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

    for label, name in enumerate(("bona fide", "spoof")):  # both checked before the slow fitting starts
        frames = class_frames.get(label)
        if frames is None or len(frames) == 0:
            raise ValueError(f"no {name} training frames: the training files hold no usable {name} audio")
        if len(frames) < n_components:
            raise ValueError(
                f"a GMM of {n_components} components needs at least as many frames, but the "
                f"{name} class has {len(frames)} training frames: use fewer components"
            )
    # The variance floor keeps a component on repeated frames (digital silence) from collapsing.
    return {
        label: GaussianMixture(
            n_components, covariance_type="diag", max_iter=max_iter, reg_covar=1e-3, random_state=seed
        ).fit(np.asarray(class_frames[label], dtype=np.float64))
        for label in (0, 1)
    }


def score_gmm_baseline(models, files, frames):
    """`files` (one row per file, as pool_file_scores gives) with each file's `score`: the mean over
    its LFCC frames of log p(frame | bona fide) - log p(frame | spoof), the baseline's log-likelihood
    ratio (higher = bona fide), and `p_fake` from it. Files without frames are left out."""
    scored = files[files["original_path"].isin(list(frames))].reset_index(drop=True)
    scored["score"] = [
        models[0].score(frames[path]) - models[1].score(frames[path]) for path in scored["original_path"]
    ]
    scored["p_fake"] = fake_probability(scored["score"])
    return scored


# Introduced in notebook 06_baselines.
def score_gmm_file(models, path, data_config=DataConfig()):
    """One audio file's LFCC-GMM score (as score_gmm_baseline gives it), from the file itself."""
    frames = lfcc(normalized_clip(path, data_config), data_config.SR).T
    return models[0].score(frames) - models[1].score(frames)


# Introduced in notebook 06_baselines.
def lfcc_gmm_baseline(
    cache_dir,
    dataset_name,
    audio_dir=None,
    n_components=512,
    max_frames_per_class=200_000,
    split="test",
    data_config=DataConfig(),
    seed=DataConfig.SEED,
    progress=True,
):
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
        frames, class_skipped = file_lfcc_frames(
            class_files, audio_dir, data_config, per_file, seed, progress
        )
        class_frames[label] = (
            np.concatenate(list(frames.values())) if frames else np.zeros((0, 0), np.float32)
        )
        skipped += class_skipped
    models = fit_gmm_baseline(class_frames, n_components, seed)
    scored, split_skipped = gmm_split_scores(models, metadata, split, audio_dir, data_config, progress)
    skipped += split_skipped
    print(
        f"LFCC-GMM ({n_components} components): fitted on {len(class_frames[0])} bona fide and "
        f"{len(class_frames[1])} spoof frames of {len(train)} train files; {len(scored)} {split} files "
        f"scored; {len(skipped)} file(s) skipped"
    )
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}")
    return models, scored


def gmm_split_scores(models, metadata, split, audio_dir, data_config=DataConfig(), progress=True):
    """Fitted LFCC-GMMs' scores on the files of one split of a prepared dataset's `metadata`:
    (scored files, as score_gmm_baseline gives them; [(path, why it was skipped)])."""
    files = pool_file_scores(metadata[metadata["split"] == split])
    frames, skipped = file_lfcc_frames(files, audio_dir, data_config, progress=progress)
    return score_gmm_baseline(models, files, frames), skipped


# ---------------------------------------------------------------- training
# the same results, faster; checkpoints; the training loop and a whole run (notebook 03)


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
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attend_dropout.p if self.training else 0.0
        )
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


FASTER = {nn.Dropout: FastDropout, Attention: FusedAttention}


def speed_up(model):
    """Swap every nn.Dropout and Attention in `model` for its faster twin, in place, and return it.
    Changing a module's class keeps its parameters, buffers and hooks, so the state dict, the
    checkpoints and the results (up to float rounding and which units dropout draws) are unchanged."""
    for module in model.modules():
        module.__class__ = FASTER.get(type(module), type(module))
    return model


def set_seed(seed=DataConfig.SEED):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def check_architecture(checkpoint, architecture, source="checkpoint"):
    """A clear error when `checkpoint` holds the other architecture than `architecture` ("vit" or "cnn")."""
    saved = checkpoint.get("architecture", "vit")  # checkpoints from before the CNN baseline are ViTs
    if saved != architecture:
        held, wanted = (
            ARCHITECTURE_CONFIGS[a].__name__.removesuffix("Config") for a in (saved, architecture)
        )
        name = checkpoint.get(f"{saved}_config", {}).get("name", "")
        raise ValueError(
            f"{source} holds a {held} ({name}), not a {wanted}: use a {held} model size or "
            f"load_model, which rebuilds whatever a checkpoint holds"
        )


def dataset_fingerprint(dataset_dir):
    """A digest of a prepared dataset's split tables (every segment, its file, label and speaker), the
    same wherever the dataset lies."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update((Path(dataset_dir) / split / "metadata.csv").read_bytes())
    return digest.hexdigest()[:16]


# TrainingConfig fields a resumed run may change: where it writes, what it shows and how fast it
# computes. Any other change would continue one run's model under another's settings.
RESUMABLE_CHANGES = (
    "resume",
    "progress",
    "wandb_mode",
    "num_workers",
    "cache_dir",
    "results_dir",
    "checkpoint_dir",
    "compile",
    "speed_up",
    "mixed_precision",
)


def check_same_run(checkpoint, extras, source):
    """Refuse to resume from `checkpoint` (a last checkpoint) when its training or data settings, or
    the dataset it was trained on, differ from this run's (`extras`, as run_training stores them),
    naming each difference. More epochs are allowed under a constant learning rate (under a schedule
    they would change the rate of the epochs already run)."""
    differences = []
    may_change = RESUMABLE_CHANGES
    if extras["training_config"]["lr_schedule"] == "constant":  # more epochs only extend a constant rate
        may_change += ("epochs",)
    for key in ("training_config", "data_config", "model_config"):
        saved = checkpoint.get(key, {})
        differences += [
            f"{name} {saved[name]!r} -> {value!r}"
            for name, value in extras[key].items()
            if name in saved and name not in may_change and saved[name] != value
        ]
    if checkpoint.get("dataset_fingerprint", extras["dataset_fingerprint"]) != extras["dataset_fingerprint"]:
        differences.append("another dataset (its split tables differ)")
    if differences:
        raise ValueError(
            f"{display_path(source)} is another run's, so it is not resumed: {', '.join(differences)}. "
            f"Delete it, or give this run another run_name, to start afresh"
        )


def check_checkpoint_compatible(checkpoint, config, source="checkpoint"):
    """A clear error naming each setting where the checkpoint's model differs from `config` (a
    ViTConfig or CNNConfig)."""
    check_architecture(checkpoint, architecture_of(config), source)
    defaults = {f.name: f.default for f in fields(config)}  # settings added after the checkpoint was written
    saved = {**defaults, **checkpoint.get(f"{architecture_of(config)}_config", {})}
    expected = asdict(config)
    differing = {
        k: (saved.get(k), v)
        for k, v in expected.items()
        if k not in ("dropout", "emb_dropout") and saved.get(k) != v
    }
    if differing:
        details = ", ".join(f"{k}: checkpoint {a} vs expected {b}" for k, (a, b) in differing.items())
        raise ValueError(f"{source} does not match the model: {details}")


def _unwrap(model):
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def train_model(
    model,
    loaders,
    config: TrainingConfig,
    device=torch.device("cpu"),
    optimizer=None,
    criterion=None,
    precision=None,
    resume=None,
    wandb_run=None,
    checkpoint_extras=None,
):
    """Train on loaders["train"] for config.epochs, validate on loaders["val"] after every epoch, and
    keep the best epoch by config.select_best_by: validation EER, which needs no decision threshold,
    or validation F1 (the original recipe's).

    The optimiser with its learning-rate schedule, the loss and the precision come from `config`
    unless given (make_optimizer, make_scheduler, make_criterion, choose_precision). Only the forward
    pass runs in that precision: the loss, and validation with it the choice of the best epoch, stay
    fp32. Writes config.checkpoint_path("best") (the best epoch so far) and "last" (every epoch, to
    resume from) atomically, each with `checkpoint_extras`. With config.ema_decay, validation and the
    best checkpoint use the moving average of the weights. `resume`, a last checkpoint, continues its
    run. Returns the per-epoch history.
    """
    resume = resume or {}
    scheduler = None
    if optimizer is None:
        optimizer = make_optimizer(_unwrap(model), config, device)
        scheduler = make_scheduler(optimizer, config, len(loaders["train"]))
    criterion = criterion or make_criterion(config, loaders["train"].dataset, device)
    precision = precision or choose_precision(device, config.mixed_precision)
    scaler = precision.grad_scaler(device)
    averaged = None
    if config.ema_decay is not None:
        averaged = torch.optim.swa_utils.AveragedModel(
            _unwrap(model),
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay),
            use_buffers=True,
        )  # BatchNorm statistics are averaged with the weights they belong to
    for part, key in (
        (optimizer, "optimizer_state"),
        (scheduler, "scheduler_state"),
        (scaler, "scaler_state"),
        (averaged, "ema_state"),
    ):
        if part is not None and resume.get(key):
            part.load_state_dict(resume[key])

    def step(inputs, labels):
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
        return loss.item()

    evaluated = model if averaged is None else averaged.module
    history = list(resume.get("history", []))
    best_value = resume.get(f"best_{config.select_best_by}")
    stale_epochs = resume.get("stale_epochs", 0)
    for epoch in range(resume.get("epoch", 0) + 1, config.epochs + 1):
        if config.early_stopping_patience is not None and stale_epochs >= config.early_stopping_patience:
            break
        train_loss = _train_epoch(model, loaders["train"], step, epoch, config, device)
        record = _validation_record(
            evaluated, loaders["val"], criterion, device, epoch, train_loss, optimizer.param_groups[0]["lr"]
        )
        history.append(record)
        value = record[config.select_best_by]
        improved = best_value is None or (
            value < best_value if config.select_best_by == "val_eer" else value > best_value
        )
        best_value, stale_epochs = (value, 0) if improved else (best_value, stale_epochs + 1)
        if not is_main_process():
            continue
        _report_epoch(record, loaders, wandb_run)
        common = dict(
            epoch=epoch,
            **{f"best_{config.select_best_by}": best_value},
            metrics=record,
            history=history,
            **(checkpoint_extras or {}),
        )
        if improved:
            save_checkpoint(
                config.checkpoint_path("best"), model_state=_unwrap(evaluated).state_dict(), **common
            )
        save_checkpoint(
            config.checkpoint_path("last"),
            model_state=_unwrap(model).state_dict(),
            **common,
            ema_state=averaged.state_dict() if averaged is not None else None,
            optimizer_state=optimizer.state_dict(),
            stale_epochs=stale_epochs,
            scheduler_state=scheduler.state_dict() if scheduler else None,
            scaler_state=scaler.state_dict(),
        )
    return history


def _train_epoch(model, loader, step, epoch, config, device):
    """One pass over `loader`, `step(inputs, labels)` per batch; the mean training loss over every process."""
    torch.manual_seed(config.seed + epoch)  # shuffling, augmentation and dropout depend only on the epoch
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    model.train()
    loss_sum, seen = 0.0, 0
    for batch in tqdm(loader, desc=f"Epoch {epoch}", leave=False, disable=not config.progress):
        if batch is None:
            continue
        inputs, labels = batch[0].to(device), batch[1].to(device)
        loss_sum += step(inputs, labels) * len(labels)
        seen += len(labels)
    totals = np.sum(all_gather((loss_sum, seen)), axis=0)
    return float(totals[0] / max(totals[1], 1))


def _validation_record(model, loader, criterion, device, epoch, train_loss, lr):
    val_loss, _, labels, fake_probs = evaluate_model(model, loader, criterion, device)
    val = compute_metrics(labels, fake_probs)
    return dict(
        epoch=epoch,
        train_loss=train_loss,
        val_loss=val_loss,
        val_accuracy=val["accuracy"],
        val_f1=val["f1"],
        val_roc_auc=val["roc_auc"],
        val_eer=val["eer"],
        lr=lr,
    )


def _report_epoch(record, loaders, wandb_run):
    print(
        f"Epoch {record['epoch']} Train Loss: {record['train_loss']:.4f}, "
        f"Val Loss: {record['val_loss']:.4f}, Val Acc: {record['val_accuracy']:.4f}, "
        f"Val F1: {record['val_f1']:.4f}, "
        f"Val ROC AUC: {record['val_roc_auc']:.4f}, Val EER: {record['val_eer']:.4f}"
    )
    dropped = sum(
        loader.dataset.dropped.value
        for loader in (loaders["train"], loaders["val"])
        if hasattr(loader.dataset, "dropped")
    )
    if dropped:
        print(f"  {dropped} unreadable item(s) dropped so far (see the warnings above)")
    if wandb_run is not None:
        wandb_run.log(record, step=record["epoch"])


def make_optimizer(model, config: TrainingConfig, device):
    """Adam or AdamW as configured; the fused kernel (one pass over all parameters, the same update)
    on CPU and CUDA, where it is about 4x faster than the per-parameter loop."""
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(
        model.parameters(),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )


def make_scheduler(optimizer, config: TrainingConfig, steps_per_epoch):
    """The learning-rate schedule, stepped once per optimiser step; None for a constant rate."""
    if config.lr_schedule != "warmup_cosine":
        return None
    return warmup_cosine_schedule(
        optimizer, int(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch
    )


def make_criterion(config: TrainingConfig, train_dataset, device):
    """Cross-entropy, or OneClassSoftmaxLoss with config.loss="one_class"; with
    class_balance="weighted_loss" each class weighted by its inverse frequency in `train_dataset` (the
    balanced sampler evens the classes out in the batches instead)."""
    class_weights = None
    if config.class_balance == "weighted_loss":
        counts = np.bincount(train_dataset.labels, minlength=2)
        class_weights = torch.tensor(
            counts.sum() / (2.0 * np.maximum(counts, 1)), dtype=torch.float32, device=device
        )
    if config.loss == "one_class":
        return OneClassSoftmaxLoss(weight=class_weights)
    return nn.CrossEntropyLoss(weight=class_weights)


class OneClassSoftmaxLoss(nn.Module):
    """OC-Softmax on the logits of a OneClassHead: softplus(scale * (margin_real - cosine)) for real
    speech, softplus(scale * (cosine - margin_fake)) for fakes, averaged (weighted by class with
    `weight`, as nn.CrossEntropyLoss)."""

    def __init__(self, weight=None):
        super().__init__()
        self.weight = weight

    def forward(self, logits, labels):
        cosine = OneClassHead.cosine_from_logits(logits)
        margin_real, margin_fake = ONE_CLASS_MARGINS
        shortfall = torch.where(labels == 0, margin_real - cosine, cosine - margin_fake)
        losses = F.softplus(ONE_CLASS_SCALE * shortfall)
        if self.weight is None:
            return losses.mean()
        weights = self.weight[labels]
        return (losses * weights).sum() / weights.sum()


def warmup_cosine_schedule(optimizer, warmup_steps, total_steps):
    """Linear warm-up from 0 to the base learning rate, then cosine decay to 0."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loaders(config: TrainingConfig, segment_config, data_config=DataConfig()):
    """Datasets and loaders for train/val/test. Under torchrun, each rank gets a shard."""
    data_root = Path(config.cache_dir) / config.dataset_name
    datasets = {
        split: AudioDataset(
            data_root,
            split,
            data_config.N_MELS,
            segment_config.max_frames_spec,
            augment=split == "train" and segment_config.apply_augmentation,
            data_config=data_config,
            frequency_warp=config.frequency_warp,
            equalizer_db=config.equalizer_db,
        )
        for split in SPLITS
    }
    for split, dataset in datasets.items():  # an EER, the threshold and the balanced sampler need both
        missing = [name for label, name in enumerate(CLASS_NAMES) if label not in set(dataset.labels)]
        if missing:
            raise DatasetError(
                f"{display_path(data_root / split / 'metadata.csv')}: the {split} split has no "
                f"{' and no '.join(missing)} segments; every split needs both classes"
            )
    distributed = torch.distributed.is_initialized()
    if distributed and config.class_balance == "balanced_sampler":
        raise ValueError(
            "class_balance='balanced_sampler' is not supported with torchrun; use 'weighted_loss'"
        )
    train_sampler = None
    if config.class_balance == "balanced_sampler":
        labels = datasets["train"].labels
        weights = 1.0 / np.bincount(labels, minlength=2)[labels]
        train_sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True)
    elif distributed:
        train_sampler = torch.utils.data.DistributedSampler(datasets["train"], shuffle=True, seed=config.seed)
    common = dict(
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        collate_fn=custom_collate_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=config.num_workers > 0,
    )
    loaders = {
        "train": DataLoader(datasets["train"], shuffle=train_sampler is None, sampler=train_sampler, **common)
    }
    for split in ("val", "test"):
        dataset = datasets[split]
        if distributed:  # contiguous-free strided shard, no padding: every item scored exactly once
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
        loaders[split] = DataLoader(dataset, shuffle=False, **common)
    return datasets, loaders


# Introduced in notebook 03_train.
def run_training(config: TrainingConfig, data_config=DataConfig()):
    """Build the data and the model, train them (train_model), then finish: test the best epoch,
    store its verdict threshold and write the figures and the record (finish_training). Runs under
    torchrun unchanged (DistributedDataParallel). Returns the test metrics."""
    _, world_size = init_distributed()
    device = (
        torch.device(f"cuda:{torch.cuda.current_device()}")
        if world_size > 1 and torch.cuda.is_available()
        else get_device()
    )
    set_seed(config.seed)
    segment_config = make_segment_config(config.dataset_name, data_config)
    model_config = make_model_config(
        config.model_size,
        (data_config.N_MELS, segment_config.max_frames_spec),
        config.patch_embedding,
        "one_class" if config.loss == "one_class" else "linear",
    )
    datasets, loaders = build_loaders(config, segment_config, data_config)
    model = build_model(model_config).to(device)
    if config.speed_up:
        speed_up(model)
    precision = choose_precision(device, config.mixed_precision)
    if is_main_process():
        _describe_run(config, datasets, device, world_size, precision, count_parameters(model))
    extras = _run_record(config, model_config, segment_config, data_config, datasets["train"])
    resume = _resume_state(config, model, extras, device)
    train_module = torch.compile(model) if config.compile else model
    if world_size > 1:
        train_module = torch.nn.parallel.DistributedDataParallel(
            train_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    wandb_run = init_wandb(config.run_name, extras, mode=config.wandb_mode) if is_main_process() else None
    try:
        started = time.perf_counter()
        history = train_model(
            train_module,
            loaders,
            config,
            device,
            precision=precision,
            resume=resume,
            wandb_run=wandb_run,
            checkpoint_extras=extras,
        )
        training_seconds = time.perf_counter() - started  # every epoch with its validation
        return finish_training(model, config, datasets, loaders, history, training_seconds, device, wandb_run)
    finally:
        if wandb_run is not None:
            wandb_run.finish()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _describe_run(config, datasets, device, world_size, precision, n_params):
    print(
        f"Run {config.run_name}: {config.model_size} on {config.dataset_name}, {config.epochs} epochs, "
        f"batch {config.batch_size}, lr {config.learning_rate:g}, optimizer {config.optimizer}, "
        f"schedule {config.lr_schedule}, class balance {config.class_balance}"
    )
    print(
        f"Dataset sizes (segments): train {len(datasets['train'])}, val {len(datasets['val'])}, "
        f"test {len(datasets['test'])}"
    )
    print(f"Device: {device.type}" + (f" x {world_size} processes" if world_size > 1 else ""))
    print(f"Precision: {precision}")
    print(f"Trainable parameters: {n_params:,}")


def _run_record(config, model_config, segment_config, data_config, train_dataset):
    """What every checkpoint of a run stores besides the weights: what rebuilds the model and its
    inputs (load_model), and what check_same_run compares before resuming."""
    train_normalization = train_dataset.norm_stats  # inference needs them for a globally normalised model
    return dict(
        architecture=config.architecture,
        **{f"{config.architecture}_config": asdict(model_config)},
        model_config=asdict(segment_config),  # the key checkpoints have always used
        training_config=asdict(config),
        data_config=data_settings(data_config),
        normalization=train_normalization and dict(zip(("mean", "std"), train_normalization)),
        dataset_fingerprint=dataset_fingerprint(Path(config.cache_dir) / config.dataset_name),
    )


def _resume_state(config, model, extras, device):
    """With config.resume and a last checkpoint of this run: that checkpoint, its weights loaded into
    `model` after checking it is this run's; else None."""
    last_path = config.checkpoint_path("last")
    if not (config.resume and last_path.is_file()):
        return None
    state = load_checkpoint(last_path, device)
    check_checkpoint_compatible(state, model.config, last_path)
    check_same_run(state, extras, last_path)
    model.load_state_dict(state["model_state"])
    if is_main_process():
        print(f"Resuming from epoch {state['epoch']} ({display_path(last_path)})")
    return state


def finish_training(model, config, datasets, loaders, history, training_seconds, device, wandb_run=None):
    """Test the best epoch's weights, store their verdict threshold in the best checkpoint, and write
    the confusion matrix and training_<run_name>.json. Returns the test metrics."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has written the best checkpoint
    best = load_checkpoint(config.checkpoint_path(), device)
    model.load_state_dict(best["model_state"])
    criterion = make_criterion(config, datasets["train"], device)
    test_loss, _, test_labels, test_probs, cm = evaluate_model(
        model, loaders["test"], criterion, device, return_cm=True
    )
    test = compute_metrics(test_labels, test_probs)
    metrics = dict(
        run_name=config.run_name,
        best_epoch=best["epoch"],
        test_loss=test_loss,
        test_accuracy=test["accuracy"],
        test_f1=test["f1"],
        test_roc_auc=test["roc_auc"],
        test_eer=test["eer"],
        history=history,
        parameters=count_parameters(model),
        training_seconds=round(training_seconds, 1),
    )
    if is_main_process():
        print(
            f"Test Loss: {test_loss:.4f}, Test Accuracy: {test['accuracy']:.4f}, "
            f"Test F1-score: {test['f1']:.4f}, Test ROC AUC: {test['roc_auc']:.4f}"
        )
        store_verdict_threshold(config.checkpoint_path(), best, model, datasets["val"], device)
        plot_confusion_matrix(cm, CLASS_NAMES, config.run_name, config.results_dir, wandb_run=wandb_run)
        save_json_atomic(Path(config.results_dir) / f"training_{config.run_name}.json", metrics)
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in metrics.items() if k != "history"})
            log_checkpoint(wandb_run, config.checkpoint_path())
    return metrics


# Introduced in notebook 04_evaluate.
def multi_seed_eer(training_config: TrainingConfig, seeds=(42, 43, 44), data_config=DataConfig()):
    """Train once per seed and report the test file-level EER of each best checkpoint, so a result
    can be quoted as mean +- std rather than one lucky run."""
    rows = []
    for seed in seeds:
        config = TrainingConfig(
            **{**asdict(training_config), "seed": seed, "run_name": f"{training_config.run_name}_seed{seed}"}
        )
        run_training(config, data_config)
        model, _ = load_model(config.checkpoint_path())
        report = metrics_report(
            score_split(model, config.cache_dir, config.dataset_name, "test", data_config=data_config)
        )
        rows.append(dict(seed=seed, file_eer=report["file"]["eer"], segment_eer=report["segment"]["eer"]))
    table = pd.DataFrame(rows)
    std = table["file_eer"].std(ddof=1) if len(table) > 1 else float("nan")
    print(f"File-level test EER over {len(table)} seed(s): {table['file_eer'].mean():.4f} +- {std:.4f}")
    return table


# ---------------------------------------------------------------- metrics and evaluation
# scores, EER, file-level pooling, the verdict threshold (notebook 04)


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
    local = (
        loss_sum,
        torch.cat(logits).numpy() if logits else np.zeros((0, 2), np.float32),
        torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
    )
    parts = all_gather(local)
    all_logits = np.concatenate([p[1] for p in parts]).astype(np.float64)
    all_labels = np.concatenate([p[2] for p in parts])
    avg_loss = float(sum(p[0] for p in parts) / max(len(all_labels), 1))
    probs = softmax_fake_probability(all_logits)
    preds = (probs > 0.5).astype(int)
    if return_cm:
        return avg_loss, preds, all_labels, probs, confusion_matrix(all_labels, preds, labels=[0, 1])
    return avg_loss, preds, all_labels, probs


def fake_probability(scores):
    """p(fake) from scores, the log-odds of bona fide (logit(real) - logit(fake), or a detector's
    log-likelihood ratio): the logistic function of minus the score. A score past about 709 rounds
    exp to infinity and p(fake) to 0, as it should."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(scores))


# Introduced in notebook 02_vit_walkthrough.
def softmax_fake_probability(logits):
    logits = np.asarray(logits, dtype=np.float64)
    return fake_probability(logits[:, 0] - logits[:, 1])


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
        raise ValueError(
            f"need both bona fide and spoof scores, got only {CLASS_NAMES[int(labels[0])].lower()}"
        )
    return labels, scores


def det_curve(bonafide_scores, spoof_scores):
    """False rejection and false acceptance rates at every threshold, as the official ASVspoof
    evaluation package computes them (higher score = bona fide; stable sort, so ties are handled
    the same way). Returns (frr, far, thresholds)."""
    bonafide_scores = np.asarray(bonafide_scores, dtype=np.float64)
    spoof_scores = np.asarray(spoof_scores, dtype=np.float64)
    all_scores = np.concatenate([bonafide_scores, spoof_scores])
    if np.isnan(all_scores).any():  # a NaN sorts last and would pass for the highest bona fide score
        raise ValueError(
            f"{int(np.isnan(all_scores).sum())} NaN score(s): an EER needs a score for every file"
        )
    if not bonafide_scores.size or not spoof_scores.size:
        raise ValueError(
            f"an EER needs bona fide and spoof scores, got {bonafide_scores.size} and {spoof_scores.size}"
        )
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


# Introduced in notebook 04_evaluate.
def eer_from_labels(labels, scores):
    """EER from labels (0 bona fide, 1 spoof) and scores where higher means bona fide."""
    labels, scores = _check_scores(labels, scores)
    return equal_error_rate(scores[labels == 0], scores[labels == 1])


def compute_metrics(labels, fake_probs):
    """Accuracy, F1 (fake = positive class) and their values at the EER threshold, ROC AUC, EER."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    labels, fake_probs = _check_scores(labels, fake_probs)
    eer, threshold = eer_from_labels(labels, -fake_probs)  # bona fide score = -p(fake)
    at_eer = (-fake_probs <= threshold).astype(int)  # rejected as bona fide -> called fake
    preds = (fake_probs > 0.5).astype(int)
    return dict(
        accuracy=float(accuracy_score(labels, preds)),
        f1=float(f1_score(labels, preds, zero_division=0)),
        roc_auc=float(roc_auc_score(labels, fake_probs)),
        eer=eer,
        eer_threshold_p_fake=-threshold,
        accuracy_at_eer=float(accuracy_score(labels, at_eer)),
        f1_at_eer=float(f1_score(labels, at_eer, zero_division=0)),
    )


# Introduced in notebook 04_evaluate.
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
    frame["p_fake"] = fake_probability(scores)
    return frame


# Introduced in notebook 04_evaluate.
def split_dataset_for(model, cache_dir, dataset_name, split="test", data_config=DataConfig()):
    """One split of a processed dataset as the model's input, after checking the model fits its shape."""
    segment_config = make_segment_config(dataset_name, data_config)
    if (
        model.config.image_width != segment_config.max_frames_spec
        or model.config.image_height != data_config.N_MELS
    ):
        raise ValueError(
            f"the model takes {model.config.image_height}x{model.config.image_width} spectrograms "
            f"but {dataset_name} has {data_config.N_MELS}x{segment_config.max_frames_spec}"
        )
    return AudioDataset(
        Path(cache_dir) / dataset_name,
        split,
        data_config.N_MELS,
        segment_config.max_frames_spec,
        data_config=data_config,
    )


# Introduced in notebook 06_baselines.
def score_split(model, cache_dir, dataset_name, split="test", device="cpu", data_config=DataConfig()):
    """Segment scores of one split of a processed dataset."""
    return score_segments(
        model, split_dataset_for(model, cache_dir, dataset_name, split, data_config), device
    )


# Introduced in notebook 04_evaluate.
def pool_file_scores(segments):
    """One row per original file: its facts (label, speaker, attack, prompt_speaker, duration, ...)
    and, for scored segments, the mean of their scores (logit differences), i.e. the file's average
    log-odds of bona fide; p_fake is that mean mapped back to a probability."""
    scored = "score" in segments
    if scored:
        segments = segments.dropna(subset=["score"])
    facts = [
        c
        for c in ("label", "speaker", "attack", "source", "prompt_speaker", *CLIP_FACTS)
        if c in segments.columns
    ]
    aggregations = {c: (c, "first") for c in facts}
    aggregations["n_segments"] = ("segment_index", "size")
    if "filled_fraction" in segments:
        aggregations["filled_fraction"] = ("filled_fraction", "mean")
    if scored:
        aggregations["score"] = ("score", "mean")
    files = segments.groupby("original_path", sort=True).agg(**aggregations).reset_index()
    if scored:
        files["p_fake"] = fake_probability(files["score"])
    return files


# Introduced in notebook 04_evaluate.
def segment_losses(segments):
    """Each segment's cross-entropy from its score = logit(real) - logit(fake): -log p(true class),
    i.e. log(1 + e^score) for a fake and log(1 + e^-score) for a real one, computed without overflow."""
    score = segments["score"].to_numpy(dtype=np.float64)
    return pd.Series(np.logaddexp(0.0, np.where(segments["label"] == 1, score, -score)), index=segments.index)


# Introduced in notebook 04_evaluate.
def metrics_report(segments):
    """Every metric at segment and at file level (file level is the headline)."""
    files = pool_file_scores(segments)
    scored = segments.dropna(subset=["score"])
    return {
        "file": compute_metrics(files["label"], files["p_fake"]),
        "segment": compute_metrics(scored["label"], scored["p_fake"]),
    }


def validation_eer_threshold(model, val_dataset, device):
    """The verdict threshold: where the file-level validation scores (each file's mean segment score,
    pooled as verdicts pool them) reach the EER. A file scoring at or below it is called fake.
    None when the validation split lacks a class."""
    files = pool_file_scores(score_segments(model, val_dataset, device))
    if files["label"].nunique() < 2:
        return None
    return eer_from_labels(files["label"], files["score"])[1]


def store_verdict_threshold(path, checkpoint, model, val_dataset, device):
    """Add the validation-EER threshold of `model` (holding `checkpoint`'s weights) to the checkpoint at
    `path`."""
    threshold = validation_eer_threshold(model, val_dataset, device)
    if threshold is None:
        print("No verdict threshold stored: the validation split lacks a class, so verdicts will use score 0")
        return
    save_checkpoint(path, **{**checkpoint, "eer_threshold": threshold})
    print(f"Verdict threshold (validation EER, file level): score <= {threshold:.4f} is fake")


# Introduced in notebook 04_evaluate.
def per_attack_eer(files):
    """EER of all bona fide files against the spoofed files of each attack, plus the pooled EER."""
    bonafide = files.loc[files["label"] == 0, "score"]
    spoof = files[files["label"] == 1]
    rows = [
        dict(attack=str(attack), spoof_files=len(group), eer=equal_error_rate(bonafide, group["score"])[0])
        for attack, group in spoof.groupby(spoof["attack"].fillna("unknown"))
    ]
    rows.append(
        dict(attack="pooled", spoof_files=len(spoof), eer=equal_error_rate(bonafide, spoof["score"])[0])
    )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the audit
# what a detector could use instead of the voice, and what the decision rests on (notebooks 02 and 04)

# Introduced in notebook 07_generalisation.
SHORTCUT_FEATURES = {
    "duration_s": "clip duration (s)",
    "filled_fraction": "looped/padded share of segments",
    "leading_silence_s": "leading silence (s)",
    "loudness_lufs": "loudness before normalisation (LUFS)",
    "original_sample_rate": "original sample rate (Hz)",
    "dc_offset": "DC offset (mean / RMS)",
    "noise_floor_db": "noise floor (quietest frames, dB below the loudest)",
    "high_band_energy_ratio": "share of energy above 4 kHz",
    "spectral_rolloff_hz": "95% spectral roll-off (Hz)",
}


# Introduced in notebook 07_generalisation.
ALL_FEATURES_TOGETHER = "all trivial features together"


# Introduced in notebook 07_generalisation.
SPECTRAL_ENVELOPE = "spectral envelope (each band's mean and std)"


# Introduced in notebook 07_generalisation.
# The kind of the audit rows that split the spectral envelope's reference by kind of fake: they show where
# the envelope gives a kind away, and are not a reference of the verdict (a model is judged on all fakes).
ENVELOPE_PER_KIND = "spectral envelope, one kind of fake"


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
                raise DatasetError(
                    f"{split_dir / npy_path}: {len(spec)} mel bands where other segments have {n_bands}"
                )
            per_segment.append(np.r_[spec.mean(axis=1), spec.std(axis=1)])
        paths.append(original_path)
        labels.append(int(group["label"].iloc[0]))
        rows.append(np.mean(per_segment, axis=0).astype(np.float32))
    columns = [f"mean_{b:03d}" for b in range(n_bands)] + [f"std_{b:03d}" for b in range(n_bands)]
    return pd.concat(
        [
            pd.DataFrame(dict(original_path=paths, label=labels)),
            pd.DataFrame(np.stack(rows), columns=columns),
        ],
        axis=1,
    )


def trivial_classifier_p_fake(train_x, train_labels, test_x):
    """A standardised logistic regression fitted on train (a missing value: the train median): each
    test row's probability of fake."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(
        SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=1000)
    )
    classifier.fit(np.asarray(train_x, float), train_labels)
    return classifier.predict_proba(np.asarray(test_x, float))[:, 1]


def eer_of_p_fake(test_labels, p_fake):
    """File-level EER of a trivial classifier's probabilities of fake."""
    # A constant prediction carries no information; the official EER of all-tied scores is 1.0
    # (every bona fide file is rejected before any spoof is accepted), so call it chance.
    return 0.5 if np.ptp(p_fake) == 0 else eer_from_labels(test_labels, -p_fake)[0]


def trivial_classifier_eer(train_x, train_labels, test_x, test_labels):
    """Test EER of a standardised logistic regression fitted on train (a missing value: the train median)."""
    return eer_of_p_fake(test_labels, trivial_classifier_p_fake(train_x, train_labels, test_x))


# Introduced in notebook 04_evaluate.
def shortcut_audit(train_files, test_files, dataset_dir=None, per_kind=False):
    """File-level test EER of trivial classifiers fitted on the train files: one per feature a detector
    should not rely on, all of them together and, given the processed `dataset_dir`, the spectral
    envelope of its train and test splits. An EER far below 0.5 means the corpus lets a model separate
    the classes without listening to the speech. Features a dataset lacks (prepared before they were
    recorded) are left out with a printed note.

    With `per_kind` (and `dataset_dir`), the envelope's classifier is also scored on the real test files
    against one kind of fake (test_files' `attack`) at a time, in rows of kind ENVELOPE_PER_KIND. A low
    value says the average spectrum alone gives that kind away (other texts, other speaking styles, a
    band or a channel of its own), so a model's low EER on it says little."""
    usable = [
        f
        for f in SHORTCUT_FEATURES
        if f in train_files
        and f in test_files
        and train_files[f].notna().any()
        and test_files[f].notna().any()
    ]
    absent = [name for f, name in SHORTCUT_FEATURES.items() if f not in usable]
    if absent:
        print(
            f"Not audited, not recorded when this dataset was prepared (delete it and prepare it again "
            f"to audit them): {', '.join(absent)}"
        )
    for feature in usable:
        unknown = int(train_files[feature].isna().sum() + test_files[feature].isna().sum())
        if unknown:
            print(f"{SHORTCUT_FEATURES[feature]}: unknown for {unknown} file(s), taken as the train median")
    groups = [(SHORTCUT_FEATURES[f], "feature", [f]) for f in usable]
    if len(usable) > 1:
        groups.append((ALL_FEATURES_TOGETHER, "features together", usable))
    rows = [
        dict(
            feature=name,
            test_eer=trivial_classifier_eer(
                train_files[columns], train_files["label"], test_files[columns], test_files["label"]
            ),
            kind=kind,
        )
        for name, kind, columns in groups
    ]
    if dataset_dir is not None:
        rows += envelope_rows(dataset_dir, test_files, per_kind)
    return pd.DataFrame(rows, columns=["feature", "test_eer", "kind"])


def envelope_rows(dataset_dir, test_files, per_kind):
    """The audit's spectral-envelope rows: its test EER on all of `test_files`, and with `per_kind` on
    their real files against each kind of fake."""
    train = band_statistics(Path(dataset_dir) / "train")
    test = band_statistics(Path(dataset_dir) / "test")
    test = test[test["original_path"].isin(test_files["original_path"])].reset_index(drop=True)
    bands = train.columns.drop(["original_path", "label"])
    p_fake = trivial_classifier_p_fake(train[bands], train["label"], test[bands])
    labels = test["label"].to_numpy()
    rows = [dict(feature=SPECTRAL_ENVELOPE, test_eer=eer_of_p_fake(labels, p_fake), kind="spectral envelope")]
    if per_kind:
        attack = test["original_path"].map(test_files.set_index("original_path")["attack"]).to_numpy()
        for kind in sorted(pd.unique(attack[(labels == 1) & pd.notna(attack)])):
            chosen = (labels == 0) | (attack == kind)
            rows.append(
                dict(
                    feature=f"{SPECTRAL_ENVELOPE}: real against {kind}",
                    test_eer=eer_of_p_fake(labels[chosen], p_fake[chosen]),
                    kind=ENVELOPE_PER_KIND,
                )
            )
    return rows


# Introduced in notebook 04_evaluate.
def audit_verdict(audit, model_eer):
    """A plain sentence beside the shortcut audit: the best trivial feature, the spectral envelope and
    the model, and whether the model is clearly better, i.e. its EER is below half of every reference's."""
    references = audit[~audit["kind"].isin(["model", ENVELOPE_PER_KIND])]
    if references.empty:
        return f"File-level test EER of the model: {model_eer:.4f}; no trivial reference was computed."
    trivial = references[references["kind"] != "spectral envelope"]
    envelope = references.loc[references["kind"] == "spectral envelope", "test_eer"]
    parts = [f"the model {model_eer:.4f}"]
    if len(trivial):
        best = trivial.loc[trivial["test_eer"].idxmin()]
        parts.append(f"best trivial feature ({best['feature']}) {best['test_eer']:.4f}")
    parts.append(
        f"spectral envelope {envelope.iloc[0]:.4f}" if len(envelope) else "spectral envelope not computed"
    )
    summary = "File-level test EER: " + "; ".join(parts) + "."
    strongest = references.loc[references["test_eer"].idxmin()]
    if model_eer < strongest["test_eer"] / 2:
        return f"{summary} The model is clearly better: its EER is below half of every reference's."
    return (
        f"{summary} The model is NOT clearly better than its references ({strongest['feature']} reaches "
        f"{strongest['test_eer']:.4f}; clearly better means below half of that): its score may measure "
        f"the corpus, not the speech."
    )


def row_frequencies(data_config=DataConfig()):
    """The n_mels + 2 filter edges in Hz of the spectrogram's rows: row i spans edges i to i + 2.
    None for cepstra (FEATURE="lfcc"), whose rows are not frequency bands."""
    import librosa

    if data_config.FEATURE == "lfcc":
        return None
    if data_config.FEATURE == "linear":
        return np.linspace(data_config.FMIN, data_config.FMAX, data_config.N_MELS + 2)
    return librosa.mel_frequencies(data_config.N_MELS + 2, fmin=data_config.FMIN, fmax=data_config.FMAX)


# Introduced in notebook 04_evaluate.
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
        rows.append(
            dict(
                silenced="none" if first is None else f"rows {first}-{last}",
                low_hz=np.nan if first is None or edges is None else round(float(edges[first])),
                high_hz=np.nan if first is None or edges is None else round(float(edges[last + 2])),
                segment_eer=eer_from_labels(segments["label"], segments["score"])[0],
                mean_score_bonafide=segments.loc[segments["label"] == 0, "score"].mean(),
                mean_score_spoof=segments.loc[segments["label"] == 1, "score"].mean(),
            )
        )
    return pd.DataFrame(rows)


# Introduced in notebook 04_evaluate.
def cls_attention(maps, layer=-1):
    """CLS-to-patch attention of one layer, averaged over heads: (b, num_patches)."""
    return maps[layer][:, :, 0, 1:].mean(dim=1)


# Introduced in notebook 04_evaluate.
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


# ---------------------------------------------------------------- generalisation
# one split can lie: folds over the recorded persons, and kinds of fake held out of training


def speaker_groups(metadata):
    """Who each segment's file belongs to: its speaker, or the file itself where no speaker is known.
    A recorded person's vocoded copies keep the person's speaker, so they go wherever the person goes."""
    return metadata["speaker"].fillna(metadata["original_path"]).astype(str)


# Introduced in notebook 07_generalisation.
def speaker_folds(metadata, k=5, seed=DataConfig.SEED):
    """{speaker: fold 0..k-1}: the speakers of a prepared dataset (every split) dealt over k folds in a
    seeded random order, recorded persons (speakers with real files) first and the voices that only
    fake (TTS speakers) after them, so every fold holds real and fake speakers."""
    if k < 3:
        raise ValueError(f"cross-validation needs at least 3 folds (test, validation and train), got {k}")
    groups = speaker_groups(metadata)
    has_real = metadata.groupby(groups)["label"].min().eq(0)
    recorded, voices = sorted(has_real[has_real].index), sorted(has_real[~has_real].index)
    if len(recorded) < k:
        raise ValueError(
            f"{k} folds need at least {k} recorded persons (speakers with real files); "
            f"the dataset has {len(recorded)}"
        )
    rng = np.random.default_rng(seed)
    folds = {}
    for speakers in (recorded, voices):
        offset = len(folds)
        for position, speaker in enumerate(rng.permutation(speakers)):
            folds[str(speaker)] = (offset + position) % k
    return folds


def _write_view(metadata, dataset_dir, view_dir, note):
    """Write `metadata` (segments of the dataset in `dataset_dir`, with their original `split` and the
    view's `view_split`) as the split tables of a dataset at `view_dir` whose rows point at the
    prepared arrays, after checking that no speaker or file crosses the view's splits."""
    table = metadata.assign(split=metadata["view_split"])
    check_split_leaks(table, file_column="original_path")
    check_split_classes(table, "segments", note)
    for split in SPLITS:
        split_dir = view_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        rows = metadata[metadata["view_split"] == split]
        arrays = [Path(dataset_dir).resolve() / row.split / row.npy_path for row in rows.itertuples()]
        rows = rows.assign(npy_path=[os.path.relpath(path, split_dir.resolve()) for path in arrays])
        save_csv_atomic(split_dir / "metadata.csv", rows.drop(columns=["split", "view_split"]))
    with atomic_write(
        view_dir / "preparation.json"
    ) as handle:  # the corpus root and settings it was made with
        handle.write((Path(dataset_dir) / "preparation.json").read_bytes())


def fold_splits(metadata, k=5, seed=DataConfig.SEED):
    """{"fold<i>": each segment's split in fold i}: the speakers of fold i (speaker_folds) are the test
    split, those of fold i + 1 the validation split, the rest train."""
    folds = speaker_groups(metadata).map(speaker_folds(metadata, k, seed)).to_numpy()
    return {
        f"fold{fold}": np.where(folds == fold, "test", np.where(folds == (fold + 1) % k, "val", "train"))
        for fold in range(k)
    }


# Introduced in notebook 07_generalisation.
def write_fold_datasets(dataset_dir, out_dir, k=5, seed=DataConfig.SEED):
    """The prepared dataset in `dataset_dir` as k speaker-disjoint cross-validation folds (fold_splits).
    Each fold is written as `out_dir/fold<i>/<dataset name>/` with split tables that point at the
    prepared arrays (nothing is decoded or copied; prepare the dataset again first if it changed, and
    train with per-spectrogram normalisation: a view holds no normalization.json). Returns {"fold<i>":
    the folder to train with as TrainingConfig.cache_dir}."""
    metadata = read_dataset_metadata(dataset_dir)
    cache_dirs = {}
    for fold, view_split in fold_splits(metadata, k, seed).items():
        cache_dirs[fold] = Path(out_dir) / fold
        view = metadata.assign(view_split=view_split)
        _write_view(view, dataset_dir, cache_dirs[fold] / Path(dataset_dir).name, f"{fold} of {k}")
    return cache_dirs


def held_out_view(metadata, attack):
    """`metadata` (with its `view_split`) with the fakes of `attack` held out: none in train or val, and
    in test only they, beside the test split's real files. Where the corpus names the person whose
    prompt a fake reads or copies (`prompt_speaker`), the held-out fakes tested are those of the test
    persons' prompts, whichever voice reads them, so the held-out kind says the same texts as the real
    files it is judged against; otherwise those in the test split."""
    fake, in_test = metadata["label"] == 1, metadata["view_split"] == "test"
    held_out = fake & (metadata["attack"] == attack)
    tested = in_test
    if "prompt_speaker" in metadata:
        test_persons = set(speaker_groups(metadata[in_test & ~fake]))
        named = metadata["prompt_speaker"].notna()
        tested = (named & metadata["prompt_speaker"].isin(test_persons)) | (~named & in_test)
    kept = ~fake | (~held_out & ~in_test) | (held_out & tested)
    return metadata[kept].assign(view_split=lambda view: view["view_split"].mask(held_out[kept], "test"))


# Introduced in notebook 07_generalisation.
def write_attack_holdout_datasets(dataset_dir, out_dir, attacks=None, k=None, seed=DataConfig.SEED):
    """Leave one attack out: for each kind of fake in the prepared dataset in `dataset_dir` (or each of
    `attacks`), a view of it held out (held_out_view): on the prepared split, written as
    `out_dir/<attack>/<dataset name>/` and named <attack>; or, given `k`, crossed with the k speaker
    folds of write_fold_datasets, so the held-out kind is also tested on persons never heard, written
    as `out_dir/fold<i>/<attack>/<dataset name>/` and named fold<i>_<attack>. Returns {name: the folder
    to train with as TrainingConfig.cache_dir}."""
    metadata = read_dataset_metadata(dataset_dir)
    present = sorted(metadata.loc[metadata["label"] == 1, "attack"].dropna().unique())
    unknown = sorted(set(attacks or ()) - set(present))
    if unknown:
        raise ValueError(f"no fakes of kind {unknown} in {dataset_dir}; it holds {present}")
    splits = fold_splits(metadata, k, seed) if k else {"": metadata["split"].to_numpy()}
    cache_dirs = {}
    for fold, view_split in splits.items():
        for attack in attacks or present:
            name = f"{fold}_{attack}" if fold else attack
            cache_dirs[name] = Path(out_dir) / fold / attack
            _write_view(
                held_out_view(metadata.assign(view_split=view_split), attack),
                dataset_dir,
                cache_dirs[name] / Path(dataset_dir).name,
                f"{attack} held out" + (f", {fold} of {k}" if fold else ""),
            )
    return cache_dirs


def checkpoint_file_scores(config, split="test", data_config=DataConfig()):
    """The best checkpoint of a trained run scored on one split of its dataset, one row per file."""
    model, _ = load_model(config.checkpoint_path())
    segments = score_split(model, config.cache_dir, config.dataset_name, split, data_config=data_config)
    return pool_file_scores(segments)


# Introduced in notebook 07_generalisation.
def cross_validate(config, cache_dirs, data_config=DataConfig()):
    """Train `config` once on each dataset view of `cache_dirs` ({name: cache folder}, as
    write_fold_datasets and write_attack_holdout_datasets give them; each run is named
    <run_name>_<name>) and score its test split: one row per view, the file-level EER pooled and per
    kind of fake (per_attack_eer) and the training minutes."""
    rows = {}
    for name, cache_dir in cache_dirs.items():
        run = replace(config, cache_dir=str(cache_dir), run_name=f"{config.run_name}_{name}")
        started = time.perf_counter()
        run_training(run, data_config)
        minutes = (time.perf_counter() - started) / 60
        eers = per_attack_eer(checkpoint_file_scores(run, data_config=data_config)).set_index("attack")["eer"]
        rows[name] = {**eers.to_dict(), "train minutes": minutes}
    return pd.DataFrame.from_dict(rows, orient="index")


# Introduced in notebook 07_generalisation.
def fold_summary(results):
    """Mean, standard deviation and worst (highest) value of each column of `results` (one row per fold
    or run, e.g. EER pooled and per kind of fake): the numbers to report instead of one split's."""
    return pd.DataFrame({"mean": results.mean(), "std": results.std(ddof=1), "worst": results.max()}).T


# ---------------------------------------------------------------- inference
# a checkpoint back into a model, and any audio file into a score and a verdict (notebook 05)

# Data settings added after checkpoints began to store theirs: what a checkpoint that lacks them
# was trained with.
OLDER_CHECKPOINT_SETTINGS = dict(SUBTRACT_ROW_MEANS=False)


# Introduced in notebook 04_evaluate.
def inference_settings(checkpoint, source="checkpoint"):
    """(DataConfig, (mean, std)) with which a checkpoint's model had its inputs made: the data settings
    it stores (for a checkpoint written before they were stored, the defaults of that time), and the
    train statistics of a globally normalised model ((None, None): per-spectrogram normalisation)."""
    saved = checkpoint.get("data_config", {})
    unknown = sorted(set(saved) - {f.name for f in fields(DataConfig) if f.init})
    if unknown:
        raise ValueError(
            f"{source}: unknown data setting(s) {unknown}; it was written by another version "
            f"of vit_lib, whose DataConfig has them"
        )
    data_config = DataConfig(**{**OLDER_CHECKPOINT_SETTINGS, **saved})
    if not data_config.USE_GLOBAL_NORMALIZATION:
        return data_config, (None, None)
    if not checkpoint.get("normalization"):
        raise ValueError(
            f"{source}: the model was trained with global normalisation, but the checkpoint "
            f"holds no train mean/std"
        )
    return data_config, (checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"])


# Introduced in notebook 04_evaluate.
def load_model(checkpoint_path, device="cpu", architecture=None):
    """AudioViT or AudioCNN rebuilt from a checkpoint's own config, sped up (speed_up) and in eval
    mode; returns (model, checkpoint). With `architecture` ("vit" or "cnn"), a checkpoint of the other
    one is an error."""
    checkpoint = load_checkpoint(checkpoint_path, device)
    saved = checkpoint.get("architecture", "vit")
    if f"{saved}_config" not in checkpoint or "model_state" not in checkpoint:
        raise ValueError(
            f"{checkpoint_path}: not a checkpoint written by this project (no {saved}_config/model_state)"
        )
    if architecture is not None:
        check_architecture(checkpoint, architecture, checkpoint_path)
    inference_settings(checkpoint, checkpoint_path)  # a checkpoint that cannot be scored fails here, named
    if "data_config" not in checkpoint:
        print(
            f"{display_path(checkpoint_path)} holds no data settings (written by an older vit_lib): "
            f"scoring with the default data settings of its time (band means kept)"
        )
    model = build_model(ARCHITECTURE_CONFIGS[saved](**checkpoint[f"{saved}_config"])).to(device)
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as error:  # missing, unexpected or wrongly shaped weights
        reason = " ".join(str(error).split("\n\t", 1)[-1].split())
        raise ValueError(
            f"{display_path(checkpoint_path)}: its weights do not fit its model ({reason})"
        ) from None
    not_finite = [
        name
        for name, weights in checkpoint["model_state"].items()
        if weights.is_floating_point() and not torch.isfinite(weights).all()
    ]
    if not_finite:
        raise ValueError(
            f"{display_path(checkpoint_path)}: non-finite (NaN or inf) weights in "
            f"{', '.join(not_finite[:3])}{' ...' if len(not_finite) > 3 else ''}"
        )
    if not math.isfinite(verdict_threshold(checkpoint)[0]):
        raise ValueError(
            f"{display_path(checkpoint_path)}: its verdict threshold is {checkpoint['eer_threshold']}"
        )
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


# Introduced in notebook 05_inference.
def score_audio_file(path, model, checkpoint, device="cpu", batch_size=32, precision=Precision(None, "fp32")):
    """Any audio file -> (per-segment timeline DataFrame, verdict dict), through the same preparation
    path as training data, with the settings `checkpoint` (from load_model) carries: the data settings,
    the train statistics of a globally normalised model and the verdict threshold. The verdict pools
    segment scores as pool_file_scores does; a file scoring at or below the threshold is called fake.
    The forward pass runs under `precision` (choose_precision's; fp32 by default), the scores in fp64."""
    if not isinstance(checkpoint, dict):
        raise TypeError(
            "score_audio_file takes the checkpoint that load_model returns "
            "(it holds the model's data settings and verdict threshold)"
        )
    data_config, (mean, std) = inference_settings(checkpoint)
    segment_config = SegmentConfig.from_dict(checkpoint["model_config"], data_config)
    expected_width = model.config.image_width
    if segment_config.max_frames_spec != expected_width:
        raise ValueError(
            f"model expects {expected_width} frames but {segment_config.name} gives "
            f"{segment_config.max_frames_spec}"
        )
    facts, specs = clip_spectrograms(path, segment_config, data_config)
    starts, scores = [], []
    model.eval()
    for batch in _batches(specs, batch_size):  # spectrograms made and scored a batch at a time
        inputs = torch.stack(
            [
                normalize_spectrogram(
                    torch.from_numpy(spec[None]),
                    mean,
                    std,
                    data_config.NORM_EPSILON,
                    data_config.SUBTRACT_ROW_MEANS,
                )
                for _, spec, _ in batch
            ]
        )
        with torch.no_grad(), precision.autocast(device):
            logits = model(inputs.to(device)).float().cpu().numpy().astype(np.float64)
        starts += [start for start, _, _ in batch]
        scores += list(logits[:, 0] - logits[:, 1])
    scores = np.array(scores)
    timeline = pd.DataFrame(
        dict(
            segment=range(len(scores)),
            start_s=starts,
            end_s=[min(s + segment_config.audio_length_seconds, facts["duration_s"]) for s in starts],
            score=scores,
            p_fake=fake_probability(scores),
        )
    )
    file_score = float(scores.mean())
    threshold, threshold_source = verdict_threshold(checkpoint)
    verdict = dict(
        file=Path(path).name,
        duration_s=facts["duration_s"],
        segments=len(scores),
        score=file_score,
        p_fake=1.0 / (1.0 + math.exp(file_score)),
        threshold=threshold,
        threshold_source=threshold_source,
        verdict="fake" if file_score <= threshold else "real",
    )
    return timeline, verdict


# Introduced in notebook 06_baselines.
def files_per_second(score_file, paths):
    """How many of `paths` `score_file(path)` scores per second, by the wall clock over one pass."""
    started = time.perf_counter()
    for path in paths:
        score_file(path)
    return len(paths) / (time.perf_counter() - started)


# Introduced in notebook 06_baselines.
def segments_per_second(model, image_size, batch_size=32):
    """The model's forward passes on a random batch of spectrograms, timed after one warm-up pass."""
    batch = torch.randn(batch_size, 1, *image_size)
    with torch.no_grad():
        model(batch)
        started = time.perf_counter()
        model(batch)
    return batch_size / (time.perf_counter() - started)


# Introduced in notebook 05_inference.
def splice_recording(real_paths, fake_paths, min_seconds=60.0, data_config=DataConfig()):
    """One recording of alternating real and fake clips (real first, each list used in turn and from
    the start again when it runs out), each clip as normalized_clip reads it, at least `min_seconds` long.
    Returns (audio, stretches): one row per clip with start_s, end_s, label (0 real, 1 fake) and file."""
    if not real_paths or not fake_paths:
        raise ValueError(
            f"splice_recording needs real and fake clips, got {len(real_paths)} real and "
            f"{len(fake_paths)} fake"
        )
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


def _scoring_inputs(inputs):
    """(path, path relative to the inputs' common folder) of every audio file in `inputs` (files or
    folders, searched recursively), each file once."""
    items = [Path(os.path.abspath(item)) for item in inputs]
    root = Path(os.path.commonpath([item if item.is_dir() else item.parent for item in items]))
    paths = dict.fromkeys(p for item in items for p in (audio_files(item) if item.is_dir() else [item]))
    return [(path, path.relative_to(root)) for path in paths]


# Introduced in notebook 05_inference.
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
        except Exception as error:  # one bad file must not end a long run; a fault of the machine must
            if is_machine_fault(error):
                raise MachineFault(
                    f"stopped while scoring {display_path(path)}: {machine_fault_reason(error)}"
                ) from None
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


# ---------------------------------------------------------------- plots
# (notebooks 01-06)

TRAINED_MODEL_TITLE = "Trained model: "


# Introduced in notebook 04_evaluate.
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


# Introduced in notebook 01_data_inspection.
def save_figure(fig, path):
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")


# Introduced in notebook 04_evaluate.
def plot_confusion_matrix(cm, labels=CLASS_NAMES, run_name="", save_dir=DEFAULT_RESULTS_DIR, wandb_run=None):
    """Seaborn heatmap of the confusion matrix, saved as confusion_matrix_{run_name}.png."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(4.5, 4))
    sns.heatmap(
        cm, annot=True, fmt="d", cmap="Blues", xticklabels=labels, yticklabels=labels, cbar=False, ax=ax
    )
    ax.set(xlabel="Predicted", ylabel="True", title=f"Confusion matrix {run_name}".strip())
    path = Path(save_dir) / f"confusion_matrix_{run_name}.png"
    save_figure(fig, path)
    if wandb_run is not None:
        import wandb

        wandb_run.log({"confusion_matrix": wandb.Image(str(path))})
    plt.close(fig)
    return path


# Introduced in notebook 03_train.
def plot_training_curves(history, run_name="", save_dir=DEFAULT_RESULTS_DIR):
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(history)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(frame["epoch"], frame["train_loss"], "o-", label="train")
    left.plot(frame["epoch"], frame["val_loss"], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    for column, name in (
        ("val_accuracy", "accuracy"),
        ("val_f1", "F1"),
        ("val_roc_auc", "ROC AUC"),
        ("val_eer", "EER"),
    ):
        right.plot(frame["epoch"], frame[column], "o-", label=name)
    right.set(xlabel="epoch", ylabel="value", ylim=(-0.02, 1.02), title="Validation metrics")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(run_name)
    save_figure(fig, Path(save_dir) / f"training_curves_{run_name}.png")
    return fig


# Introduced in notebook 04_evaluate.
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
    roc_ax.set(
        xlabel="false positive rate (real called fake)",
        ylabel="true positive rate (fake caught)",
        title="ROC",
    )
    det_ax.plot(clip(ticks), clip(ticks), "k:", lw=1)
    det_ax.set(
        xticks=clip(ticks),
        yticks=clip(ticks),
        xticklabels=[f"{t:g}" for t in ticks * 100],
        yticklabels=[f"{t:g}" for t in ticks * 100],
        xlabel="spoof accepted as bona fide (%)",
        ylabel="bona fide rejected (%)",
        title="DET (probit axes; EER where it crosses the diagonal)",
    )
    for ax in (roc_ax, det_ax):
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    if save_path:
        save_figure(fig, save_path)
    return fig


# Introduced in notebook 04_evaluate.
def plot_score_histograms(files, save_path=None, title="File-level scores"):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(files["score"].min(), files["score"].max(), 30)
    for label, name in enumerate(CLASS_NAMES):
        ax.hist(
            files.loc[files["label"] == label, "score"],
            bins=bins,
            alpha=0.6,
            label=name,
            color=CLASS_COLORS[name],
        )
    ax.axvline(0, color="k", ls=":", lw=1, label="p(fake) = 0.5")
    ax.set(
        xlabel="score = logit(real) - logit(fake)   (higher = more bona fide)", ylabel="files", title=title
    )
    ax.legend()
    if save_path:
        save_figure(fig, save_path)
    return fig


# Introduced in notebook 04_evaluate.
def plot_band_occlusion(table, save_path=None):
    """band_occlusion's table: the segment EER and each class's mean score with each band silenced,
    against the intact segments' (dashed)."""
    import matplotlib.pyplot as plt

    intact, bands = table.iloc[0], table.iloc[1:]
    names = [
        f"{low:.0f}-{high:.0f} Hz" if np.isfinite(low) else rows
        for rows, low, high in zip(bands["silenced"], bands["low_hz"], bands["high_hz"])
    ]
    position = np.arange(len(bands))
    fig, (eer_ax, score_ax) = plt.subplots(1, 2, figsize=(12, 3.8), sharex=True)
    eer_ax.bar(position, bands["segment_eer"], color="tab:gray")
    eer_ax.axhline(intact["segment_eer"], color="k", ls="--", lw=1, label="nothing silenced")
    eer_ax.set(
        ylabel="segment-level EER",
        ylim=(0, max(0.55, bands["segment_eer"].max() * 1.1)),
        title="EER with one band silenced",
    )
    for label, name in enumerate(CLASS_NAMES):
        column = f"mean_score_{'bonafide' if label == 0 else 'spoof'}"
        score_ax.plot(position, bands[column], "o-", color=CLASS_COLORS[name], label=name)
        score_ax.axhline(intact[column], color=CLASS_COLORS[name], ls="--", lw=1)
    score_ax.axhline(0, color="k", ls=":", lw=1)
    score_ax.set(
        ylabel="mean score (higher = more bona fide)", title="Each class's mean score (dashed: intact)"
    )
    for ax in (eer_ax, score_ax):
        ax.set_xticks(position, names, rotation=45, ha="right")
        ax.set_xlabel("silenced band")
        ax.legend()
    fig.tight_layout()
    if save_path:
        save_figure(fig, save_path)
    return fig


# Introduced in notebook 01_data_inspection.
def plot_spectrogram(spec, ax, title="", data_config=DataConfig(), colorbar_label="dB"):
    """A (n_mels, frames) or (1, n_mels, frames) log-mel on time (s) and mel-bin axes."""
    spec = np.asarray(spec).squeeze()
    seconds = spec.shape[-1] * data_config.HOP_LENGTH / data_config.SR
    image = ax.imshow(
        spec, origin="lower", aspect="auto", cmap="magma", extent=[0, seconds, 0, spec.shape[0]]
    )
    ax.set(xlabel="time (s)", ylabel="mel bin", title=title)
    ax.figure.colorbar(image, ax=ax, label=colorbar_label)
    return image


# Introduced in notebook 04_evaluate.
def plot_attention(spec, patch_weights, ax, vit_config, title=""):
    """CLS attention over patches drawn on top of the spectrogram (normalised to its maximum)."""
    grid = np.asarray(patch_weights).reshape(vit_config.patch_rows, vit_config.patch_columns)
    spec = np.asarray(spec).squeeze()
    ax.imshow(spec, origin="lower", aspect="auto", cmap="gray")
    ax.imshow(
        grid / grid.max(),
        origin="lower",
        aspect="auto",
        cmap="inferno",
        alpha=0.55,
        extent=(0, vit_config.image_width, 0, vit_config.image_height),
    )
    ax.set(xlabel="frame", ylabel="mel bin", title=title)


# Introduced in notebook 05_inference.
def plot_timeline(audio, timeline, verdict, data_config=DataConfig(), save_path=None, stretches=None):
    """Waveform, log-mel and the per-segment fake probability of one scored file, on one time axis.
    `stretches` (start_s, end_s, label), where known, shades the true real and fake parts."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    seconds = len(audio) / data_config.SR
    fig, (wave_ax, spec_ax, prob_ax) = plt.subplots(
        3, 1, figsize=(10, 7), sharex=True, gridspec_kw=dict(height_ratios=[1, 1.4, 1])
    )
    wave_ax.plot(np.arange(len(audio)) / data_config.SR, audio, lw=0.3, color="0.3")
    fake_from = 1.0 / (1.0 + math.exp(verdict["threshold"]))  # the verdict threshold as a probability
    wave_ax.set(
        ylabel="amplitude",
        title=f"{verdict['file']}: {verdict['verdict']} (p(fake) = {verdict['p_fake']:.3f}; "
        f"fake from {fake_from:.3f}, {verdict['threshold_source']})",
    )
    mel = log_mel_spectrogram(audio, data_config)
    spec_ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", extent=[0, seconds, 0, mel.shape[0]])
    spec_ax.set(ylabel="mel bin")
    for row in timeline.itertuples():
        called = CLASS_NAMES[int(row.p_fake >= fake_from)]
        prob_ax.hlines(row.p_fake, row.start_s, row.end_s, lw=4, color=CLASS_COLORS[called])
    prob_ax.axhline(fake_from, color="k", ls=":", lw=1)
    prob_ax.set(xlabel="time (s)", ylabel="p(fake) per segment", ylim=(-0.05, 1.05), xlim=(0, seconds))
    legend = [
        Line2D([], [], color=CLASS_COLORS[name], lw=4, label=f"segment called {name.lower()}")
        for name in CLASS_NAMES
    ] + [Line2D([], [], color="k", ls=":", lw=1, label="verdict threshold")]
    if stretches is not None:
        for row in stretches.itertuples():
            for ax in (wave_ax, prob_ax):
                ax.axvspan(
                    row.start_s, row.end_s, color=CLASS_COLORS[CLASS_NAMES[row.label]], alpha=0.15, lw=0
                )
        legend += [
            Patch(color=CLASS_COLORS[name], alpha=0.3, label=f"truly {name.lower()}") for name in CLASS_NAMES
        ]
    prob_ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    if save_path:
        save_figure(fig, save_path)
    return fig
