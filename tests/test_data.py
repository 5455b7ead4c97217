"""Unit tests for the data side of vit_lib: configuration, the audio path, corpus readers, splits,
preparation (bad inputs, resumability, parallelism), the processed dataset and the fixture corpus.

Every corpus here is generated at test time with soundfile in its exact on-disk layout: short
(1-3 s) tone + noise clips, so the whole file runs in seconds.
"""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyloudnorm
import pytest
import soundfile as sf
import torch

import vit_lib
from vit_audio import audio_io, corpora, fixture_corpus, preparation
from vit_audio.corpora import SplitLeakError
from vit_lib import (
    SPLITS,
    AudioDataset,
    AudioError,
    DataConfig,
    DatasetError,
    SegmentConfig,
    TrainingConfig,
    assign_splits,
    check_split_leaks,
    clip_to_spectrograms,
    custom_collate_fn,
    fit_frames,
    load_audio,
    log_mel_spectrogram,
    loudness_normalize,
    make_fixture_corpus,
    non_silent_bounds,
    normalize_spectrogram,
    prepare_dataset,
    read_corpus,
    read_metadata,
    segment_waveform,
    speaker_channel_augment,
    spec_augment,
)

SR = 16000
DATASET = "vit_balanced_dataset"  # 8 s segments, overlap 0.5 -> (1, 128, 256)
SEGMENT = 8 * SR
SPEC_SHAPE = (1, 128, 256)
SPEC_COLUMNS = ["npy_path", "original_path", "label", "segment_index", "speaker", "attack", "source"]


# ---------------------------------------------------------------- helpers
def tone(seconds, sr=SR, freq=220.0, seed=0, amp=0.3):
    """A tone plus a little noise: enough for loudness, segmenting and log-mel."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    return (amp * np.sin(2 * np.pi * freq * t) + 0.05 * amp * rng.standard_normal(n)).astype(np.float32)


def write_audio(path, audio, sr=SR, subtype=None, format=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, sr, subtype=subtype, format=format)
    return path


def clip(path, seed, sr=SR):
    """A 1-3 s clip whose length and pitch depend on `seed`."""
    rng = np.random.default_rng(seed)
    return write_audio(path, tone(rng.uniform(1.0, 3.0), sr, freq=rng.uniform(150, 400), seed=seed), sr)


def cut_in_half(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return path


def prepare(root, cache, corpus="folder", **kwargs):
    kwargs.setdefault("num_workers", 1)
    return prepare_dataset(root, DATASET, corpus, cache_dir=cache, progress=False, **kwargs)


def read_prepared(dataset_dir):
    """All splits' metadata.csv in one table with a `split` column."""
    tables = [
        pd.read_csv(Path(dataset_dir) / split / "metadata.csv", dtype={"speaker": str, "attack": str}).assign(
            split=split
        )
        for split in SPLITS
    ]
    return pd.concat(tables, ignore_index=True)


def assert_valid_prepared(dataset_dir, corpus_root, source, speakers_known, both_classes_everywhere=True):
    """The on-disk format (<split>/metadata.csv beside (1, 128, frames) .npy files), and no speaker
    (when known) or original file in two splits."""
    dataset_dir, corpus_root = Path(dataset_dir), Path(corpus_root)
    for split in SPLITS:
        table = pd.read_csv(dataset_dir / split / "metadata.csv", dtype={"speaker": str, "attack": str})
        assert set(SPEC_COLUMNS) <= set(table.columns), f"{split}: columns {list(table.columns)}"
        assert len(table), f"{split} split is empty"
        assert set(table["label"]) <= {0, 1}
        if both_classes_everywhere:
            assert set(table["label"]) == {0, 1}, f"{split} lacks a class"
        assert (table["source"] == source).all()
        assert (table["segment_index"] >= 0).all()
        for row in table.itertuples():
            assert not Path(row.npy_path).is_absolute() and "/" not in row.npy_path, row.npy_path
            array = np.load(dataset_dir / split / row.npy_path)
            assert array.shape == SPEC_SHAPE and array.dtype == np.float32, (row.npy_path, array.shape)
            assert (corpus_root / row.original_path).is_file(), row.original_path
    every = read_prepared(dataset_dir)
    assert every.groupby("original_path")["split"].nunique().max() == 1, "an original file is in two splits"
    if speakers_known:
        assert every["speaker"].notna().all()
        assert every.groupby("speaker")["split"].nunique().max() == 1, "a speaker is in two splits"
    assert not list(dataset_dir.rglob("*.tmp")), "temporary files left behind"
    return every


def assert_same_dataset(a, b):
    """Byte-identical tables and arrays."""
    a, b = Path(a), Path(b)
    for split in SPLITS:
        assert (a / split / "metadata.csv").read_bytes() == (b / split / "metadata.csv").read_bytes(), split
        names = pd.read_csv(a / split / "metadata.csv")["npy_path"]
        assert sorted(p.name for p in (b / split).glob("*.npy")) == sorted(names)
        for name in names:
            assert (a / split / name).read_bytes() == (b / split / name).read_bytes(), name
    for name in ("skipped.csv", "split_audit.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    stats_a, stats_b = (json.loads((d / "normalization.json").read_text()) for d in (a, b))
    assert stats_a == pytest.approx(stats_b, rel=1e-12)


# ---------------------------------------------------------------- corpora in their exact layouts
def make_folder_corpus(root, n_speakers=8, speakers_csv=True):
    """real/ and fake/<attack>/ (plus one fake directly in fake/, attack unknown). With speakers_csv,
    file names do not reveal the speaker and speakers.csv does; else names start `spkNN_`."""
    root = Path(root)
    mapping = []
    for s in range(n_speakers):
        for label, folder in ((0, "real"), (1, f"fake/A0{1 + s % 2}")):
            name = f"utt_{2 * s + label:03d}.wav" if speakers_csv else f"spk{s:02d}_{folder[:4]}.wav"
            clip(root / folder / name, seed=100 * s + label)
            mapping.append((f"{folder}/{name}", f"speaker_{s:02d}"))
    name = "utt_999.wav" if speakers_csv else "spk00_extra.wav"
    clip(root / "fake" / name, seed=999)
    mapping.append((f"fake/{name}", "speaker_00"))
    (root / "real" / "notes.txt").write_text("not audio, ignored")
    if speakers_csv:
        pd.DataFrame(mapping, columns=["file", "speaker"]).to_csv(root / "speakers.csv", index=False)
    return root


ASV_SPEAKERS = {
    "train": ("LA_0079", "LA_0080"),
    "dev": ("LA_0069", "LA_0070"),
    "eval": ("LA_0001", "LA_0002"),
}
ASV_ATTACKS = {"train": ("A01", "A02"), "dev": ("A03", "A04"), "eval": ("A07", "A19")}


def make_asvspoof_corpus(root):
    """ASVspoof 2019 LA: protocols + flac per official split, with three unusable protocol entries."""
    root = Path(root)
    protocols = root / "ASVspoof2019_LA_cm_protocols"
    protocols.mkdir(parents=True)
    suffix = {"train": "train.trn", "dev": "dev.trl", "eval": "eval.trl"}
    for split, speakers in ASV_SPEAKERS.items():
        lines = []
        for i, speaker in enumerate(speakers):
            for kind in ("bonafide", "spoof"):
                file_id = f"LA_{split[0].upper()}_{1000000 + 10 * i + (kind == 'spoof')}"
                attack = "-" if kind == "bonafide" else ASV_ATTACKS[split][i]
                lines.append(f"{speaker} {file_id} - {attack} {kind}")
                write_audio(
                    root / f"ASVspoof2019_LA_{split}" / "flac" / f"{file_id}.flac",
                    tone(1.0 + i, freq=200 + 50 * i + 30 * (kind == "spoof"), seed=i),
                    format="FLAC",
                )
        if split == "train":
            lines += [
                "LA_0079 LA_T_9000001 - A01",  # 4 fields
                "LA_0079 LA_T_9000002 - A01 maybe",  # unknown label
                "",  # blank line: ignored
                "LA_0080 LA_T_9000003 - A02 spoof",
            ]  # listed, not on disk
        (protocols / f"ASVspoof2019.LA.cm.{suffix[split]}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_fake_or_real_corpus(root, version_folder=None):
    """`{training,validation,testing}/{real,fake}/*.wav`, the same file names in every split."""
    base = Path(root) / version_folder if version_folder else Path(root)
    for k, folder in enumerate(("training", "validation", "testing")):
        for label, name in enumerate(("real", "fake")):
            for i in range(2):
                clip(base / folder / name / f"file{i}.wav_16k.wav_norm.wav", seed=10 * k + 2 * label + i)
    if version_folder:
        (Path(root) / "for-2seconds" / "training").mkdir(parents=True)  # incomplete sibling: not chosen
    return Path(root)


def make_in_the_wild_corpus(root, n_speakers=6):
    """meta.csv (file,speaker,label) + wav files; one bad label and one missing file."""
    root = Path(root)
    rows = []
    for s in range(n_speakers):
        for label in ("bona-fide", "spoof"):
            name = f"{len(rows)}.wav"
            clip(root / name, seed=len(rows))
            rows.append((name, f"Famous Person {s}", label))
    clip(root / "90.wav", seed=90)
    rows += [("90.wav", "Someone Else", "fake"), ("404.wav", "Someone Else", "spoof")]
    pd.DataFrame(rows, columns=["file", "speaker", "label"]).to_csv(root / "meta.csv", index=False)
    return root


@pytest.fixture(scope="module")
def folder_prepared(tmp_path_factory):
    """A folder corpus (speakers.csv) prepared once, uninterrupted, with one worker: the reference."""
    base = tmp_path_factory.mktemp("folder")
    root = make_folder_corpus(base / "corpus")
    summary, audit, skipped = prepare(root, base / "cache")
    return root, base / "cache" / DATASET, summary


# ---------------------------------------------------------------- 1. configuration
def test_data_config_defaults_match_the_spec():
    config = DataConfig()
    expected = dict(
        SEED=42,
        SR=16000,
        N_FFT=2048,
        HOP_LENGTH=512,
        N_MELS=128,
        FMIN=0.0,
        FMAX=8000.0,
        NUM_TIME_MASKS=2,
        NUM_FREQ_MASKS=2,
        TIME_MASK_MAX_WIDTH=60,
        FREQ_MASK_MAX_WIDTH=25,
        MASK_REPLACEMENT_VALUE=-80.0,
        NORM_EPSILON=1e-6,
        LOUDNESS_LUFS=-23.0,
        USE_GLOBAL_NORMALIZATION=False,
        USE_RANDOM_CROPPING=True,
    )
    assert {name: getattr(config, name) for name in expected} == expected
    assert vit_lib.DEFAULT_CACHE_DIR.is_relative_to(vit_lib.REPO_ROOT), (
        "the cache must not be a hard-coded drive"
    )


@pytest.mark.parametrize(
    "name, seconds, overlap, frames",
    [
        ("vit_balanced_dataset", 8, 0.5, 256),
        ("vit_performance_dataset", 10, 0.0, 320),
        ("vit_short_dataset", 4, 0.5, 128),
        ("vit_two_second_dataset", 2, 0.0, 64),
    ],
)
def test_segment_config_frames_are_rounded_up_to_whole_patches(name, seconds, overlap, frames):
    config = vit_lib.SEGMENT_CONFIGS[name]
    assert (config.audio_length_seconds, config.overlap_ratio, config.max_frames_spec) == (
        seconds,
        overlap,
        frames,
    )
    assert SegmentConfig("x", seconds, overlap).max_frames_spec == frames
    assert config.max_frames_spec % config.patch_width == 0


def test_model_config_frame_formula_for_other_lengths():
    assert SegmentConfig("x", 1, 0.0).max_frames_spec == 32  # 31.25 frames -> 2 patches
    assert SegmentConfig("x", 4, 0.0, patch_width=8).max_frames_spec == 128  # exactly 125 -> 128


@pytest.mark.parametrize("seconds, overlap", [(0, 0.5), (-1, 0.5), (8, 1.0), (8, -0.1), (8, 1.5)])
def test_model_config_rejects_bad_arguments(seconds, overlap):
    with pytest.raises(ValueError, match="audio_length_seconds|overlap_ratio"):
        SegmentConfig("bad", seconds, overlap)


# ---------------------------------------------------------------- 2. audio path
@pytest.mark.parametrize(
    "name, subtype, tolerance",
    [
        ("u8.wav", "PCM_U8", 1 / 128),
        ("s16.wav", "PCM_16", 1e-4),
        ("s24.wav", "PCM_24", 1e-6),
        ("f32.wav", "FLOAT", 0.0),
        ("s16.flac", "PCM_16", 1e-4),
    ],
)
def test_load_audio_decodes_16k_mono_formats_faithfully(tmp_path, name, subtype, tolerance):
    audio = tone(1.5, amp=0.5)
    path = write_audio(tmp_path / name, audio, subtype=subtype)
    decoded = load_audio(path, 16000)
    assert decoded.dtype == np.float32 and decoded.ndim == 1 and len(decoded) == len(audio)
    np.testing.assert_allclose(decoded, audio, atol=tolerance)


def _amplitude_at(audio, sr, freq):
    spectrum = np.abs(np.fft.rfft(audio)) / (len(audio) / 2)
    return spectrum[int(round(freq * len(audio) / sr))]


@pytest.mark.parametrize(
    "sr, name", [(44100, "stereo44k.wav"), (48000, "stereo48k.flac"), (22050, "stereo22k.wav")]
)
def test_load_audio_mixes_stereo_down_and_resamples_to_16k(tmp_path, sr, name):
    seconds = 2.0
    t = np.arange(int(seconds * sr)) / sr
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 1000 * t)], axis=1)
    decoded = load_audio(write_audio(tmp_path / name, stereo, sr, subtype="PCM_16"), 16000)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert abs(len(decoded) - seconds * SR) <= 1
    # mono = mean of the channels: each tone at half its channel's amplitude, at the same frequency
    assert _amplitude_at(decoded, SR, 440) == pytest.approx(0.2, abs=0.01)
    assert _amplitude_at(decoded, SR, 1000) == pytest.approx(0.1, abs=0.01)


def test_load_audio_rejects_a_cut_off_wav_but_accepts_a_streamed_wav_header(tmp_path):
    audio = tone(2.0)
    with pytest.raises(AudioError, match="truncated"):
        load_audio(cut_in_half(write_audio(tmp_path / "cut.wav", audio, subtype="PCM_16")), 16000)
    data = bytearray(write_audio(tmp_path / "streamed.wav", audio, subtype="PCM_16").read_bytes())
    at = data.find(b"data")
    data[at + 4 : at + 8] = b"\xff\xff\xff\xff"  # size unknown when written: a streamed WAV
    (tmp_path / "streamed.wav").write_bytes(bytes(data))
    np.testing.assert_allclose(load_audio(tmp_path / "streamed.wav", 16000), audio, atol=1e-4)


def test_load_audio_reports_missing_file_as_audio_error(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "nothing.wav", 16000)


@pytest.mark.parametrize("amp", [0.005, 0.1, 0.9])
def test_loudness_normalize_reaches_minus_23_lufs(amp):
    audio = tone(3.0, amp=amp)
    normalized, measured = loudness_normalize(audio, SR, -23.0)
    meter = pyloudnorm.Meter(SR)
    assert measured == pytest.approx(meter.integrated_loudness(audio), abs=1e-6)
    assert meter.integrated_loudness(normalized) == pytest.approx(-23.0, abs=0.05)
    assert normalized.dtype == np.float32


def test_loudness_normalize_measures_a_clip_shorter_than_one_gating_block():
    audio = tone(0.25, amp=0.05)
    normalized, _ = loudness_normalize(audio, SR, -23.0)
    looped = np.resize(normalized, int(0.4 * SR) + 1)
    assert pyloudnorm.Meter(SR, block_size=0.4).integrated_loudness(looped) == pytest.approx(-23.0, abs=0.1)


def test_loudness_normalize_rejects_a_silent_clip():
    with pytest.raises(AudioError, match="silent"):
        loudness_normalize(np.zeros(2 * SR, dtype=np.float32), SR, -23.0)


@pytest.mark.parametrize(
    "seconds, overlap, starts",
    [
        (20, 0.5, [0, 4, 8, 12]),  # fits exactly
        (21, 0.5, [0, 4, 8, 12, 13]),  # last window aligned to the end
        (20, 0.0, [0, 8, 12]),
        (16, 0.0, [0, 8]),
        (8, 0.5, [0]),  # exactly one segment
        (8.5, 0.0, [0, 0.5]),
    ],
)
def test_segment_waveform_counts_and_starts(seconds, overlap, starts):
    audio = np.arange(int(seconds * SR), dtype=np.float32)
    segments = segment_waveform(audio, SR, 8, overlap)
    assert [start for start, _, _ in segments] == starts
    for start, segment, filled in segments:
        assert len(segment) == SEGMENT and filled == 0.0
        np.testing.assert_array_equal(segment, audio[int(start * SR) : int(start * SR) + SEGMENT])
    np.testing.assert_array_equal(segments[-1][1], audio[-SEGMENT:])


def test_short_clip_is_looped_in_loop_mode():
    audio = tone(3.0)
    [(start, segment, filled)] = segment_waveform(audio, SR, 8, 0.5, "loop")
    assert start == 0.0 and len(segment) == SEGMENT
    assert filled == pytest.approx(1 - 3 / 8)
    np.testing.assert_array_equal(segment[: len(audio)], audio)
    np.testing.assert_array_equal(segment[len(audio) : 2 * len(audio)], audio)


def test_short_clip_is_zero_padded_in_pad_mode():
    audio = tone(3.0)
    [(_, segment, filled)] = segment_waveform(audio, SR, 8, 0.5, "pad")
    assert len(segment) == SEGMENT and filled == pytest.approx(5 / 8)
    np.testing.assert_array_equal(segment[: len(audio)], audio)
    assert not segment[len(audio) :].any()


def test_short_clip_is_dropped_in_drop_mode_and_unknown_mode_raises():
    assert segment_waveform(tone(3.0), SR, 8, 0.5, "drop") == []
    with pytest.raises(ValueError, match="short_clip_mode"):
        segment_waveform(tone(3.0), SR, 8, 0.5, "stretch")


def test_drop_mode_makes_a_short_file_a_skip_reason(tmp_path):
    path = write_audio(tmp_path / "short.wav", tone(2.0))
    with pytest.raises(AudioError, match="drop"):
        clip_to_spectrograms(path, vit_lib.SEGMENT_CONFIGS[DATASET], DataConfig(SHORT_CLIP_MODE="drop"))


def _longest_zero_run(x):
    zero = np.concatenate([[0], (x == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(zero))
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def test_short_real_and_fake_clips_of_same_length_are_filled_identically_without_padding(tmp_path):
    """The padding shortcut: if fakes were shorter and padded with silence, the model could learn the
    silence. In loop mode both classes get the same filled_fraction and no zero padding at all."""
    real = write_audio(tmp_path / "real.wav", tone(2.5, freq=180, seed=1))
    rng = np.random.default_rng(2)
    fake = write_audio(tmp_path / "fake.wav", (0.2 * rng.standard_normal(int(2.5 * SR))).astype(np.float32))
    segment_config = vit_lib.SEGMENT_CONFIGS[DATASET]
    fills = []
    for path in (real, fake):
        [(_, spec, filled)] = clip_to_spectrograms(path, segment_config)[1]
        fills.append(filled)
        assert spec.shape == (128, 256)
        assert spec[:, 200:251].max(axis=0).min() > -80.0, "silent (padded) frames at the end"
        [(_, segment, _)] = segment_waveform(load_audio(path, 16000), SR, 8, 0.5, "loop")
        assert _longest_zero_run(segment) < 10
    assert fills[0] == fills[1] == pytest.approx(1 - 2.5 / 8)
    # the same check does see the padding when there is some
    [(_, padded, _)] = clip_to_spectrograms(real, segment_config, DataConfig(SHORT_CLIP_MODE="pad"))[1]
    assert (padded[:, 200:251] == -80.0).all()


def test_log_mel_spectrogram_of_8_seconds_has_251_frames_in_0_to_minus_80_db():
    spec = log_mel_spectrogram(tone(8.0))
    assert spec.shape == (128, 251) and spec.dtype == np.float32
    assert spec.max() == 0.0
    assert spec.min() >= -80.0


def test_fit_frames_pads_with_minus_80_and_crops():
    spec = np.random.default_rng(0).uniform(-70, 0, (128, 251)).astype(np.float32)
    padded = fit_frames(spec, 256)
    assert padded.shape == (128, 256)
    np.testing.assert_array_equal(padded[:, :251], spec)
    assert (padded[:, 251:] == -80.0).all()
    cropped = fit_frames(spec, 200)
    np.testing.assert_array_equal(cropped, spec[:, :200])
    assert fit_frames(spec[None], 256).shape == (1, 128, 256)
    np.testing.assert_array_equal(fit_frames(spec, 251), spec)


def test_normalize_spectrogram_z_scores_per_spectrogram_or_with_given_statistics():
    spec = np.random.default_rng(0).uniform(-80, 0, (1, 128, 256))
    z = normalize_spectrogram(spec)
    assert z.mean() == pytest.approx(0.0, abs=1e-9) and z.std() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(normalize_spectrogram(spec, -40.0, 10.0), (spec + 40.0) / (10.0 + 1e-6))


def test_subtracting_row_means_takes_a_lasting_colour_off_each_row():
    rng = np.random.default_rng(0)
    spec = rng.uniform(-80, 0, (1, 128, 256))
    colour = rng.uniform(-20, 20, (1, 128, 1))  # another voice or microphone: a fixed offset per band
    z = normalize_spectrogram(spec + colour, subtract_row_means=True)
    np.testing.assert_allclose(z, normalize_spectrogram(spec, subtract_row_means=True), atol=1e-9)
    np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-9)
    assert z.std() == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(normalize_spectrogram(spec + colour), normalize_spectrogram(spec))


def test_global_statistics_leave_the_row_means_on():
    spec = np.random.default_rng(0).uniform(-80, 0, (1, 128, 256))
    np.testing.assert_allclose(
        normalize_spectrogram(spec, -40.0, 10.0, subtract_row_means=True), (spec + 40.0) / (10.0 + 1e-6)
    )


def test_non_silent_bounds_finds_half_a_second_of_leading_silence(tmp_path):
    audio = np.concatenate([np.zeros(SR // 2, dtype=np.float32), tone(2.0)])
    start, end = non_silent_bounds(audio, 40.0)
    assert abs(start - SR // 2) <= 1024 and end == len(audio)
    facts, _ = clip_to_spectrograms(
        write_audio(tmp_path / "lead.wav", audio), vit_lib.SEGMENT_CONFIGS[DATASET]
    )
    assert facts["leading_silence_s"] == pytest.approx(0.5, abs=0.07)
    assert facts["duration_s"] == pytest.approx(2.5)


# ---------------------------------------------------------------- 3. bad inputs
BAD_FILES = {  # relative path -> expected reason (regex)
    "fake/empty.wav": "empty file",
    "fake/truncated.wav": "truncated",
    "fake/truncated.flac": "cannot decode",
    "fake/text.wav": "cannot decode",
    "real/tiny.wav": "too short",
    "real/zeros.wav": "silent",
    "real/nan.wav": "non-finite",
    "fake/inf.wav": "non-finite",
}
GOOD_FILES = [
    "real/u8.wav",
    "real/s24.wav",
    "real/f32.wav",
    "real/s16.wav",
    "fake/stereo44k.wav",
    "fake/stereo48k.wav",
    "fake/stereo48k.flac",
    "fake/s16.flac",
]


@pytest.fixture(scope="module")
def bad_inputs_prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    root = base / "corpus"

    def stereo(sr, seed):
        return np.stack([tone(2.0, sr, seed=seed), tone(2.0, sr, freq=330, seed=seed + 1)], axis=1)

    write_audio(root / "real/u8.wav", tone(2.0, seed=1), subtype="PCM_U8")
    write_audio(root / "real/s24.wav", tone(2.0, seed=2), subtype="PCM_24")
    write_audio(root / "real/f32.wav", tone(2.0, seed=3), subtype="FLOAT")
    write_audio(root / "real/s16.wav", tone(2.0, seed=4), subtype="PCM_16")
    write_audio(root / "fake/stereo44k.wav", stereo(44100, 5), 44100, subtype="PCM_16")
    write_audio(root / "fake/stereo48k.wav", stereo(48000, 6), 48000, subtype="PCM_24")
    write_audio(root / "fake/stereo48k.flac", stereo(48000, 7), 48000)
    write_audio(root / "fake/s16.flac", tone(2.0, seed=8))
    (root / "fake/empty.wav").write_bytes(b"")
    cut_in_half(write_audio(root / "fake/truncated.wav", tone(2.0, seed=9), subtype="PCM_16"))
    cut_in_half(write_audio(root / "fake/truncated.flac", tone(2.0, seed=10)))
    (root / "fake/text.wav").write_text("this is a text file with a .wav name\n")
    write_audio(root / "real/tiny.wav", tone(0.05, seed=11))
    write_audio(root / "real/zeros.wav", np.zeros(2 * SR, dtype=np.float32), subtype="PCM_16")
    nan = tone(2.0, seed=12)
    nan[1000:1010] = np.nan
    write_audio(root / "real/nan.wav", nan, subtype="FLOAT")
    inf = tone(2.0, seed=13)
    inf[5] = np.inf
    write_audio(root / "fake/inf.wav", inf, subtype="FLOAT")
    result = prepare(root, base / "cache")
    return root, base / "cache" / DATASET, result


def test_every_bad_file_is_listed_in_skipped_csv_with_its_reason(bad_inputs_prepared):
    _, dataset_dir, (summary, _, skipped) = bad_inputs_prepared
    on_disk = pd.read_csv(dataset_dir / "skipped.csv")
    assert list(on_disk.columns) == ["original_path", "reason"]
    reasons = dict(zip(on_disk["original_path"], on_disk["reason"]))
    assert set(reasons) == set(BAD_FILES)
    for path, expected in BAD_FILES.items():
        assert re.search(expected, reasons[path]), (path, reasons[path])
    pd.testing.assert_frame_equal(on_disk, skipped.reset_index(drop=True), check_dtype=False)
    assert summary["skipped_files"] == len(BAD_FILES)
    assert summary["used_files"] == len(GOOD_FILES)
    assert summary["files"] == len(GOOD_FILES) + len(BAD_FILES)


def test_valid_8_24_32_bit_and_44k_48k_stereo_files_are_used_not_skipped(bad_inputs_prepared):
    root, dataset_dir, _ = bad_inputs_prepared
    every = assert_valid_prepared(
        dataset_dir, root, "folder", speakers_known=False, both_classes_everywhere=False
    )
    assert set(every["original_path"]) == set(GOOD_FILES)
    assert np.allclose(every["duration_s"], 2.0, atol=1e-3)


def test_skip_reasons_do_not_leak_absolute_paths(bad_inputs_prepared):
    root, dataset_dir, _ = bad_inputs_prepared
    assert str(root) not in (dataset_dir / "skipped.csv").read_text()


def test_missing_corpus_root_raises_before_any_work(tmp_path):
    missing = tmp_path / "no_such_corpus"
    for corpus in corpora.CORPORA:
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            prepare(missing, tmp_path / "cache", corpus)
    assert not (tmp_path / "cache").exists()


def test_folder_corpus_without_real_folder_raises_naming_the_path(tmp_path):
    clip(tmp_path / "corpus" / "fake" / "a.wav", seed=0)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "corpus" / "real"))):
        prepare(tmp_path / "corpus", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_folder_corpus_with_no_audio_raises(tmp_path):
    (tmp_path / "corpus" / "real").mkdir(parents=True)
    (tmp_path / "corpus" / "fake").mkdir()
    with pytest.raises(ValueError, match="No usable audio"):
        prepare(tmp_path / "corpus", tmp_path / "cache")


def test_asvspoof_without_a_protocol_file_raises_naming_it(tmp_path):
    root = make_asvspoof_corpus(tmp_path / "LA")
    protocol = root / "ASVspoof2019_LA_cm_protocols" / "ASVspoof2019.LA.cm.dev.trl.txt"
    protocol.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(protocol))):
        prepare(root, tmp_path / "cache", "asvspoof2019_la")
    assert not (tmp_path / "cache").exists()


def test_in_the_wild_without_meta_csv_raises_naming_it(tmp_path):
    clip(tmp_path / "itw" / "0.wav", seed=0)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "itw" / "meta.csv"))):
        prepare(tmp_path / "itw", tmp_path / "cache", "in_the_wild")
    assert not (tmp_path / "cache").exists()


def test_fake_or_real_without_its_split_folders_raises(tmp_path):
    clip(tmp_path / "for" / "training" / "real" / "a.wav", seed=0)
    with pytest.raises(FileNotFoundError, match="training/, validation/ and testing/"):
        prepare(tmp_path / "for", tmp_path / "cache", "fake_or_real")


def test_unknown_corpus_and_dataset_names_raise(tmp_path):
    with pytest.raises(ValueError, match="Unknown corpus"):
        read_corpus("librispeech", tmp_path)
    with pytest.raises(ValueError, match="Unknown dataset_name"):
        prepare_dataset(tmp_path, "vit_tiny_dataset", cache_dir=tmp_path / "cache", progress=False)


# ---------------------------------------------------------------- 4. corpus readers
def test_folder_reader_takes_labels_attacks_and_speakers_csv(tmp_path):
    root = make_folder_corpus(tmp_path / "corpus")
    files, skipped = read_corpus("folder", root)
    assert skipped == [] and len(files) == 17
    assert list(files.columns) == corpora.CORPUS_COLUMNS
    rel = files.assign(rel=[Path(p).relative_to(root).as_posix() for p in files["path"]]).set_index("rel")
    assert rel.loc["real/utt_000.wav", "label"] == 0 and rel.loc["real/utt_000.wav", "attack"] == "-"
    assert (
        rel.loc["fake/A01/utt_001.wav", "label"] == 1 and rel.loc["fake/A01/utt_001.wav", "attack"] == "A01"
    )
    assert rel.loc["fake/A02/utt_003.wav", "attack"] == "A02"
    assert rel.loc["fake/utt_999.wav", "label"] == 1 and pd.isna(rel.loc["fake/utt_999.wav", "attack"])
    assert rel.loc["fake/A02/utt_003.wav", "speaker"] == "speaker_01"
    assert files["speaker"].notna().all() and files["split"].isna().all()
    assert not any(p.endswith(".txt") for p in files["path"])


def test_folder_corpus_with_speakers_csv_prepares_to_the_spec_format(folder_prepared):
    root, dataset_dir, summary = folder_prepared
    every = assert_valid_prepared(dataset_dir, root, "folder", speakers_known=True)
    assert summary["skipped_files"] == 0 and summary["used_files"] == 17
    assert len(every) == 17 and (every["segment_index"] == 0).all()  # 1-3 s clips: one looped segment each
    by_path = every.set_index("original_path")
    assert by_path.loc["fake/A01/utt_001.wav", "attack"] == "A01"
    assert by_path.loc["real/utt_000.wav", "attack"] == "-"
    assert (by_path["label"] == [int(p.startswith("fake/")) for p in by_path.index]).all()
    assert np.allclose(every["filled_fraction"], 1 - every["duration_s"] / 8, atol=1e-4)
    audit = pd.read_csv(dataset_dir / "split_audit.csv")
    assert audit["files"].sum() == 17


def test_folder_corpus_with_speaker_pattern_keeps_speakers_in_one_split(tmp_path):
    root = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    files, _ = read_corpus("folder", root, speaker_pattern=r"^(spk\d+)_")
    assert set(files["speaker"]) == {f"spk{s:02d}" for s in range(8)}
    prepare(root, tmp_path / "cache", speaker_pattern=r"^(spk\d+)_")
    every = assert_valid_prepared(tmp_path / "cache" / DATASET, root, "folder", speakers_known=True)
    assert set(every["speaker"]) == {f"spk{s:02d}" for s in range(8)}


def test_folder_reader_without_speakers_leaves_them_unknown(tmp_path):
    root = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    files, _ = read_corpus("folder", root)
    assert files["speaker"].isna().all()


def test_asvspoof_reader_uses_protocols_and_lists_bad_entries(tmp_path):
    root = make_asvspoof_corpus(tmp_path / "LA")
    files, skipped = read_corpus("asvspoof2019_la", root)
    assert len(files) == 12
    reasons = [reason for _, reason in skipped]
    assert len(skipped) == 3
    assert "4 fields" in reasons[0] and "'maybe'" in reasons[1] and "missing on disk" in reasons[2]
    assert skipped[0][0].endswith("ASVspoof2019.LA.cm.train.trn.txt:5")
    assert skipped[2][0].endswith("LA_T_9000003.flac")
    assert files.groupby("split").size().to_dict() == {"train": 4, "val": 4, "test": 4}
    bonafide = files[files["label"] == 0]
    assert (bonafide["attack"] == "-").all() and len(bonafide) == 6
    assert set(files.loc[files["label"] == 1, "attack"]) == {"A01", "A02", "A03", "A04", "A07", "A19"}


def test_asvspoof_corpus_prepares_with_official_splits_and_reports_bad_entries(tmp_path):
    root = make_asvspoof_corpus(tmp_path / "LA")
    summary, _, _ = prepare(root, tmp_path / "cache", "asvspoof2019_la")
    dataset_dir = tmp_path / "cache" / DATASET
    every = assert_valid_prepared(dataset_dir, root, "asvspoof2019_la", speakers_known=True)
    prefix = {
        "train": "ASVspoof2019_LA_train/flac/LA_T_",
        "val": "ASVspoof2019_LA_dev/flac/LA_D_",
        "test": "ASVspoof2019_LA_eval/flac/LA_E_",
    }
    for split, expected in prefix.items():
        paths = every.loc[every["split"] == split, "original_path"]
        assert len(paths) == 4 and paths.str.startswith(expected).all(), (split, list(paths))
    for split, speakers in zip(SPLITS, ASV_SPEAKERS.values()):
        assert set(every.loc[every["split"] == split, "speaker"]) == set(speakers)
    spoof = every[every["label"] == 1].set_index("original_path")
    assert spoof.loc["ASVspoof2019_LA_eval/flac/LA_E_1000011.flac", "attack"] == "A19"
    skipped = pd.read_csv(dataset_dir / "skipped.csv")
    assert len(skipped) == 3 and summary["skipped_files"] == 3 and summary["used_files"] == 12
    assert skipped["reason"].str.contains("fields").sum() == 1
    assert skipped["reason"].str.contains("maybe").sum() == 1
    assert skipped["reason"].str.contains("missing on disk").sum() == 1


@pytest.mark.parametrize("version_folder", [None, "for-norm"])
def test_fake_or_real_corpus_prepares_with_its_official_splits(tmp_path, version_folder):
    root = make_fake_or_real_corpus(tmp_path / "FoR", version_folder)
    files, skipped = read_corpus("fake_or_real", root)
    assert skipped == [] and len(files) == 12 and files["speaker"].isna().all()
    prepare(root, tmp_path / "cache", "fake_or_real")
    every = assert_valid_prepared(tmp_path / "cache" / DATASET, root, "fake_or_real", speakers_known=False)
    base = f"{version_folder}/" if version_folder else ""
    for split, folder in (("train", "training"), ("val", "validation"), ("test", "testing")):
        paths = every.loc[every["split"] == split, "original_path"]
        assert len(paths) == 4 and paths.str.startswith(f"{base}{folder}/").all()
    # the same file names in every split still give distinct .npy files
    assert every["npy_path"].nunique() == len(every) == 12
    labels = every.set_index("original_path")["label"]
    assert (labels == [int("/fake/" in p) for p in labels.index]).all()


def test_in_the_wild_corpus_prepares_by_speaker_and_reports_bad_rows(tmp_path):
    root = make_in_the_wild_corpus(tmp_path / "itw")
    files, skipped = read_corpus("in_the_wild", root)
    assert len(files) == 12 and files["split"].isna().all()
    assert len(skipped) == 2 and skipped[0][0].endswith("meta.csv:14")
    assert "'fake'" in skipped[0][1] and skipped[1][0].endswith("404.wav")
    summary, _, _ = prepare(root, tmp_path / "cache", "in_the_wild")
    dataset_dir = tmp_path / "cache" / DATASET
    every = assert_valid_prepared(dataset_dir, root, "in_the_wild", speakers_known=True)
    assert every["speaker"].nunique() == 6
    by_path = every.set_index("original_path")
    assert by_path.loc["0.wav", "label"] == 0 and by_path.loc["1.wav", "label"] == 1
    assert by_path.loc["0.wav", "attack"] == "-"
    assert "prompt_speaker" not in every.columns, "a corpus that names none writes no such column"
    skipped_csv = pd.read_csv(dataset_dir / "skipped.csv")
    assert len(skipped_csv) == 2 and summary["skipped_files"] == 2
    assert skipped_csv["reason"].str.contains("neither 'bona-fide' nor 'spoof'").sum() == 1
    assert skipped_csv["reason"].str.contains("missing on disk").sum() == 1


def test_in_the_wild_prompt_speakers_reach_the_prepared_tables_spelled_as_the_speakers(tmp_path):
    root = make_in_the_wild_corpus(tmp_path / "itw")
    meta = pd.read_csv(root / "meta.csv")
    # every fake reads the prompt of the next person; one spelling differs only in case and spaces
    meta["prompt_speaker"] = [
        f"Famous Person {(int(f[:-4]) // 2 + fake) % 6}"
        for f, fake in zip(meta["file"], meta["label"] == "spoof")
    ]
    meta.loc[meta["file"] == "1.wav", "prompt_speaker"] = "famous  person 1"
    meta.to_csv(root / "meta.csv", index=False)
    files, _ = read_corpus("in_the_wild", root)
    assert files["prompt_speaker"].notna().all()
    assert files.loc[files["path"].str.endswith("/1.wav"), "prompt_speaker"].item() == "Famous Person 1"
    prepare(root, tmp_path / "cache", "in_the_wild")
    every = read_prepared(tmp_path / "cache" / DATASET).drop_duplicates("original_path")
    by_path = every.set_index("original_path")["prompt_speaker"]
    assert by_path["0.wav"] == "Famous Person 0" and by_path["3.wav"] == "Famous Person 2"


# ---------------------------------------------------------------- 5. splits
def _files(n_real, n_fake, speakers=None):
    labels = [0] * n_real + [1] * n_fake
    return pd.DataFrame(
        dict(
            path=[f"/c/{'real' if label == 0 else 'fake'}/{i:03d}.wav" for i, label in enumerate(labels)],
            label=labels,
            speaker=speakers if speakers is not None else [None] * len(labels),
            attack=None,
            source="folder",
            split=None,
        ),
        columns=corpora.CORPUS_COLUMNS,
    )


def test_assign_splits_is_deterministic_for_a_seed():
    files = _files(40, 40)
    first, second = assign_splits(files, seed=42), assign_splits(files, seed=42)
    pd.testing.assert_frame_equal(first, second)
    assert not first["split"].equals(assign_splits(files, seed=43)["split"])
    assert files["split"].isna().all(), "the input table must not be modified"


def test_assign_splits_with_known_speakers_never_splits_a_speaker():
    speakers = [f"spk{i % 30:02d}" for i in range(120)]
    files = assign_splits(_files(60, 60, speakers), seed=1)
    assert files.groupby("speaker")["split"].nunique().max() == 1
    assert set(files["split"]) == set(SPLITS)
    check_split_leaks(files)
    share = files["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.1)


@pytest.mark.parametrize("seed", range(5))
def test_assign_splits_without_speakers_stratifies_files_by_class(seed):
    files = assign_splits(_files(40, 7), seed=seed)
    assert files["path"].is_unique and files["split"].notna().all()
    counts = files.groupby(["split", "label"]).size().unstack().loc[list(SPLITS)]
    assert counts[0].tolist() == [28, 6, 6], counts  # 70/15/15 of each class, even the rare one
    assert counts[1].tolist() == [5, 1, 1], counts
    check_split_leaks(files)


def test_assign_splits_keeps_official_splits():
    files = _files(3, 3)
    files["split"] = ["train", "val", "test", "test", "val", "train"]
    pd.testing.assert_frame_equal(assign_splits(files, seed=42), files)


def test_check_split_leaks_catches_a_speaker_in_train_and_test():
    files = _files(2, 2, ["a", "b", "a", "c"])
    files["split"] = ["train", "val", "test", "val"]
    with pytest.raises(SplitLeakError, match="speaker"):
        check_split_leaks(files)


def test_check_split_leaks_catches_one_file_in_two_splits():
    files = _files(2, 2)
    files.loc[3, "path"] = files.loc[0, "path"]
    files["split"] = ["train", "val", "test", "test"]
    with pytest.raises(SplitLeakError, match="path"):
        check_split_leaks(files)


def test_check_split_leaks_passes_a_clean_table_with_unknown_speakers():
    files = _files(3, 3, ["a", "a", None, "b", None, "c"])
    files["split"] = ["train", "train", "val", "test", "test", "val"]
    check_split_leaks(files)


# ---------------------------------------------------------------- 6. resumability
def test_interrupted_preparation_resumes_to_the_same_dataset(folder_prepared, tmp_path, monkeypatch):
    root, reference, _ = folder_prepared
    real_prepare_one = vit_lib._prepare_one
    calls = []

    def interrupted_after_5(job):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(job[2])
        return real_prepare_one(job)

    monkeypatch.setattr(vit_lib, "_prepare_one", interrupted_after_5)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, tmp_path)
    dataset_dir = tmp_path / DATASET
    journal = dataset_dir / "progress.jsonl"
    lines = journal.read_text().splitlines()
    assert len(lines) == 5 and not (dataset_dir / "train" / "metadata.csv").exists()
    # a crash mid-write: the last journal line is torn; that file must be done again
    journal.write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])

    def counted(job):
        calls.append(job[2])
        return real_prepare_one(job)

    calls.clear()
    monkeypatch.setattr(vit_lib, "_prepare_one", counted)
    prepare(root, tmp_path)
    assert len(calls) == 17 - 4, "finished files must not be prepared again"
    assert_same_dataset(reference, dataset_dir)
    assert_valid_prepared(dataset_dir, root, "folder", speakers_known=True)
    # the journal is whole again: a third run has nothing left to do
    calls.clear()
    prepare(root, tmp_path)
    assert calls == []
    assert_same_dataset(reference, dataset_dir)


def test_journal_with_deleted_lines_redoes_only_those_files(folder_prepared, tmp_path, monkeypatch):
    root, reference, _ = folder_prepared
    prepare(root, tmp_path)
    journal = tmp_path / DATASET / "progress.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[3:]) + "\n")
    redo = {json.loads(line)["file_id"] for line in lines[:3]}
    for path in (tmp_path / DATASET).glob("*/*.npy"):
        if path.name.rsplit("_", 1)[0] in redo:
            path.unlink()  # as if the crash came before these were written
    calls = []
    real_prepare_one = vit_lib._prepare_one
    monkeypatch.setattr(vit_lib, "_prepare_one", lambda job: calls.append(job[2]) or real_prepare_one(job))
    prepare(root, tmp_path)
    assert sorted(calls) == sorted(redo)
    assert_same_dataset(reference, tmp_path / DATASET)


def test_rerun_with_other_settings_raises_a_clear_error(folder_prepared, tmp_path):
    root, _, _ = folder_prepared
    prepare(root, tmp_path)
    before = (tmp_path / DATASET / "progress.jsonl").read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        prepare(root, tmp_path, data_config=DataConfig(LOUDNESS_LUFS=-20.0))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / DATASET))):
        prepare(root, tmp_path, split_fractions=(0.8, 0.1, 0.1))
    assert (tmp_path / DATASET / "progress.jsonl").read_bytes() == before


def test_augmentation_settings_need_no_new_preparation(folder_prepared, tmp_path, monkeypatch):
    root, _, _ = folder_prepared
    prepare(root, tmp_path)
    calls = []
    monkeypatch.setattr(vit_lib, "_prepare_one", lambda job: calls.append(job))
    prepare(
        root,
        tmp_path,
        data_config=DataConfig(NUM_TIME_MASKS=1, TIME_MASK_MAX_WIDTH=30, USE_RANDOM_CROPPING=False),
    )
    assert calls == []


# ---------------------------------------------------------------- 7. parallel preparation
def test_parallel_preparation_gives_the_same_dataset_as_one_worker(folder_prepared, tmp_path, monkeypatch):
    root, reference, _ = folder_prepared
    pools = []

    class SpyPool(preparation.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(preparation, "ProcessPoolExecutor", SpyPool)
    prepare(root, tmp_path, num_workers=2)
    assert pools and pools[0][0] == 2, "the process pool was not used"
    assert_same_dataset(reference, tmp_path / DATASET)


# ---------------------------------------------------------------- 8. the processed dataset
def write_split(split_dir, specs, labels=None, **columns):
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i, spec in enumerate(specs):
        names.append(f"seg_{i:03d}.npy")
        if isinstance(spec, bytes):
            (split_dir / names[-1]).write_bytes(spec)
        else:
            np.save(split_dir / names[-1], spec)
    labels = labels if labels is not None else [i % 2 for i in range(len(specs))]
    table = pd.DataFrame(
        dict(
            npy_path=names,
            original_path=[f"real/{i}.wav" for i in range(len(specs))],
            label=labels,
            segment_index=0,
            **columns,
        )
    )
    table.to_csv(split_dir / "metadata.csv", index=False)
    return split_dir


def db_spec(seed=0, shape=SPEC_SHAPE):
    return np.random.default_rng(seed).uniform(-80, 0, shape).astype(np.float32)


def test_dataset_missing_folder_raises_dataset_error_naming_it(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nothing" / "train"))):
        AudioDataset(tmp_path / "nothing", "train")


def test_dataset_missing_metadata_csv_raises_dataset_error_naming_it(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "train" / "metadata.csv"))):
        AudioDataset(tmp_path, "train")


def test_metadata_without_a_required_column_raises_naming_the_column(tmp_path):
    split = write_split(tmp_path / "train", [db_spec()])
    pd.read_csv(split / "metadata.csv").drop(columns="label").to_csv(split / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match=r"metadata.csv.*'label'"):
        read_metadata(split)


def test_empty_split_raises_dataset_error(tmp_path):
    split = write_split(tmp_path / "val", [db_spec()])
    pd.read_csv(split / "metadata.csv").iloc[:0].to_csv(split / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match="empty"):
        AudioDataset(tmp_path, "val")


def test_label_2_raises_dataset_error_naming_value_and_row(tmp_path):
    write_split(tmp_path / "train", [db_spec(0), db_spec(1)], labels=[0, 2])
    with pytest.raises(DatasetError, match=r"found 2 in row 3"):
        AudioDataset(tmp_path, "train")


def test_listed_npy_missing_on_disk_raises_naming_the_file(tmp_path):
    split = write_split(tmp_path / "train", [db_spec(0), db_spec(1)])
    (split / "seg_001.npy").unlink()
    with pytest.raises(DatasetError, match="seg_001.npy"):
        AudioDataset(tmp_path, "train")


def test_metadata_keeps_speaker_ids_as_strings(tmp_path):
    split = write_split(
        tmp_path / "train", [db_spec(0), db_spec(1)], speaker=["0079", "0080"], attack=["-", "07"]
    )
    metadata = read_metadata(split)
    assert list(metadata["speaker"]) == ["0079", "0080"] and list(metadata["attack"]) == ["-", "07"]


def test_unreadable_items_are_dropped_counted_and_left_out_of_batches(tmp_path):
    write_split(
        tmp_path / "train", [db_spec(0), db_spec(1, (1, 64, 256)), b"not a numpy file"], labels=[1, 0, 0]
    )
    dataset = AudioDataset(tmp_path, "train")
    good = dataset[0]
    with pytest.warns(UserWarning, match="seg_001.npy: shape"):
        assert dataset[1] is None
    with pytest.warns(UserWarning, match="seg_002.npy: unreadable"):
        assert dataset[2] is None
    assert dataset.dropped.value == 2
    specs, labels = custom_collate_fn([None, good])
    assert specs.shape == (1, *SPEC_SHAPE) and labels.tolist() == [1]
    assert custom_collate_fn([None]) is None
    with pytest.warns(UserWarning):
        batches = list(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=custom_collate_fn))
    assert len(batches) == 1 and batches[0][0].shape == (1, *SPEC_SHAPE)
    assert dataset.dropped.value == 4


def test_two_dimensional_npy_is_accepted(tmp_path):
    write_split(tmp_path / "train", [db_spec(0, (128, 256))])
    spec, label = AudioDataset(tmp_path, "train")[0]
    assert spec.shape == SPEC_SHAPE and spec.dtype == torch.float32 and label == 0


@pytest.mark.parametrize("augment", [False, True])
def test_shorter_or_longer_spectrograms_come_out_at_max_frames(tmp_path, augment):
    write_split(tmp_path / "train", [db_spec(0, (1, 128, 200)), db_spec(1, (128, 300))])
    dataset = AudioDataset(tmp_path, "train", augment=augment)
    assert dataset[0][0].shape == SPEC_SHAPE and dataset[1][0].shape == SPEC_SHAPE


@pytest.mark.parametrize("data_config", [DataConfig(), DataConfig.original()], ids=["default", "original"])
def test_without_augmentation_items_are_deterministic_and_z_scored(tmp_path, data_config):
    raw = db_spec(3)
    write_split(tmp_path / "test", [raw])
    dataset = AudioDataset(tmp_path, "test", data_config=data_config)
    first, second = dataset[0][0], dataset[0][0]
    assert torch.equal(first, second)
    assert first.shape == SPEC_SHAPE and first.dtype == torch.float32
    assert float(first.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(first.std()) == pytest.approx(1.0, abs=1e-3)
    centred = raw - raw.mean(-1, keepdims=True) if data_config.SUBTRACT_ROW_MEANS else raw
    np.testing.assert_allclose(
        first.numpy(), (centred - centred.mean()) / (centred.std(ddof=1) + 1e-6), atol=1e-4
    )


def test_augmentation_changes_the_spectrogram_every_call_and_keeps_its_shape(tmp_path):
    write_split(tmp_path / "train", [db_spec(4)])
    dataset = AudioDataset(tmp_path, "train", augment=True)
    torch.manual_seed(0)
    items = [dataset[0][0] for _ in range(4)]
    assert all(item.shape == SPEC_SHAPE and item.dtype == torch.float32 for item in items)
    assert not any(torch.equal(items[0], other) for other in items[1:])
    plain = AudioDataset(tmp_path, "train", augment=False)[0][0]
    assert not torch.equal(items[0], plain)


def test_augmentation_applies_specaugment_masks_in_db_before_normalising(tmp_path):
    write_split(tmp_path / "train", [np.random.default_rng(6).uniform(-60, 0, SPEC_SHAPE).astype(np.float32)])
    config = DataConfig(USE_RANDOM_CROPPING=False, SUBTRACT_ROW_MEANS=False)  # so a mask stays one value
    dataset = AudioDataset(tmp_path, "train", augment=True, data_config=config)
    torch.manual_seed(0)
    masked_columns = masked_rows = 0
    for _ in range(5):
        item = dataset[0][0]
        floor = item == item.min()  # -80 dB (the mask value) is the only value below -60 dB
        columns, rows = int(floor.all(dim=1).sum()), int(floor.all(dim=2).sum())
        assert columns <= 2 * config.TIME_MASK_MAX_WIDTH and rows <= 2 * config.FREQ_MASK_MAX_WIDTH
        masked_columns, masked_rows = masked_columns + columns, masked_rows + rows
    assert masked_columns > 0 and masked_rows > 0


def test_spec_augment_masks_at_most_the_configured_widths_with_minus_80():
    config = DataConfig()
    generator = torch.Generator().manual_seed(0)
    masked_any = False
    for _ in range(20):
        out = spec_augment(torch.zeros(SPEC_SHAPE), config, generator)
        masked = out == -80.0
        full_columns = int(masked.all(dim=1).sum())
        full_rows = int(masked.all(dim=2).sum())
        assert full_columns <= config.NUM_TIME_MASKS * config.TIME_MASK_MAX_WIDTH
        assert full_rows <= config.NUM_FREQ_MASKS * config.FREQ_MASK_MAX_WIDTH
        assert set(out.unique().tolist()) <= {0.0, -80.0}
        masked_any |= bool(masked.any())
    assert masked_any


def test_speaker_channel_augment_is_the_identity_when_switched_off():
    spec = torch.randn(SPEC_SHAPE)
    assert torch.equal(speaker_channel_augment(spec), spec)


def test_frequency_warp_moves_a_band_by_at_most_the_warp_factor():
    spec = torch.full(SPEC_SHAPE, -80.0)
    spec[:, 60] = 0.0  # one loud row
    generator = torch.Generator().manual_seed(0)
    peaks = {
        int(speaker_channel_augment(spec, 0.1, generator=generator)[0, :, 0].argmax()) for _ in range(40)
    }
    assert min(peaks) >= 60 * 0.9 - 1 and max(peaks) <= 60 * 1.1 + 1
    assert len(peaks) > 3  # the warp is drawn anew each time


def test_equalizer_adds_one_smooth_tilt_per_row_within_its_bound():
    spec = torch.randn(SPEC_SHAPE)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        gain = speaker_channel_augment(spec, equalizer_db=6.0, generator=generator) - spec
        assert torch.allclose(gain, gain[:, :, :1].expand_as(gain), atol=1e-5)  # the same for every frame
        assert gain.abs().max() <= 6.0 + 1e-5
        assert gain[0, 1:, 0].sub(gain[0, :-1, 0]).abs().max() < 0.5  # smooth across rows
    assert gain.abs().max() > 0.5


def test_speaker_channel_augment_refuses_cepstra_and_bad_strengths(tmp_path):
    write_split(tmp_path / "mydata" / "train", [db_spec(5)])
    with pytest.raises(ValueError, match="lfcc"):
        AudioDataset(
            tmp_path / "mydata",
            "train",
            augment=True,
            data_config=DataConfig(FEATURE="lfcc"),
            equalizer_db=3.0,
        )
    with pytest.raises(ValueError, match="frequency_warp"):
        TrainingConfig(frequency_warp=1.5)


def test_training_segments_get_the_recipes_speaker_channel_augmentation(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(vit_lib, "speaker_channel_augment", lambda spec, *args: calls.append(args) or spec)
    write_split(tmp_path / "mydata" / "train", [db_spec(5)])
    AudioDataset(tmp_path / "mydata", "train", augment=True, frequency_warp=0.1, equalizer_db=6.0)[0]
    AudioDataset(tmp_path / "mydata", "train")[0]
    assert calls == [(0.1, 6.0)]
    assert (TrainingConfig().frequency_warp, TrainingConfig().equalizer_db) == (0.15, 10.0)
    assert (TrainingConfig.original().frequency_warp, TrainingConfig.original().equalizer_db) == (0, 0)


def test_global_normalization_uses_normalization_json(tmp_path):
    raw = db_spec(5)
    write_split(tmp_path / "mydata" / "train", [raw])
    config = DataConfig(USE_GLOBAL_NORMALIZATION=True)
    with pytest.raises(DatasetError, match="normalization.json"):
        AudioDataset(tmp_path / "mydata", "train", data_config=config)
    (tmp_path / "mydata" / "normalization.json").write_text(json.dumps(dict(mean=-40.0, std=10.0, eps=1e-6)))
    spec, _ = AudioDataset(tmp_path / "mydata", "train", data_config=config)[0]
    np.testing.assert_allclose(spec.numpy(), (raw + 40.0) / (10.0 + 1e-6), rtol=1e-5, atol=1e-5)


def test_normalization_json_holds_the_train_split_statistics(folder_prepared):
    _, dataset_dir, _ = folder_prepared
    train = read_metadata(dataset_dir / "train")
    values = np.concatenate(
        [np.load(dataset_dir / "train" / p).ravel().astype(np.float64) for p in train["npy_path"]]
    )
    stats = json.loads((dataset_dir / "normalization.json").read_text())
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-6)


def test_prepared_dataset_loads_through_audio_dataset(folder_prepared):
    _, dataset_dir, _ = folder_prepared
    for split in SPLITS:
        dataset = AudioDataset(dataset_dir, split)
        spec, label = dataset[0]
        assert spec.shape == SPEC_SHAPE and label in (0, 1) and dataset.dropped.value == 0


# ---------------------------------------------------------------- 9. fixture corpus
def test_make_fixture_corpus_is_deterministic(tmp_path):
    a = make_fixture_corpus(tmp_path / "a", n_speakers=2, clips_per_speaker=2)
    b = make_fixture_corpus(tmp_path / "b", n_speakers=2, clips_per_speaker=2)
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert len(names) == 2 * 2 * 2 + 2 + 1  # real + fake per clip, two unusable files, speakers.csv
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_fixture_fakes_keep_their_real_twins_bandwidth_noise_floor_and_dc_offset(tmp_path):
    # The fakes differ in their excitation only, so no one-number trace of the recording chain may
    # tell them apart (the roll-off, a median over frames, moves either way with the noise draws).
    root = make_fixture_corpus(tmp_path / "fixture", n_speakers=2, clips_per_speaker=2)
    for real in sorted((root / "real").glob("spk*_real_*.wav")):
        (fake,) = root.glob(f"fake/*/{real.name.replace('_real_', '_fake_')}")
        real_facts, fake_facts = (audio_io.recording_facts(*sf.read(path)) for path in (real, fake))
        assert fake_facts["high_band_energy_ratio"] == pytest.approx(
            real_facts["high_band_energy_ratio"], rel=0.2, abs=0.005
        ), fake
        assert fake_facts["noise_floor_db"] == pytest.approx(real_facts["noise_floor_db"], abs=2.0), fake
        assert fake_facts["dc_offset"] == pytest.approx(real_facts["dc_offset"], abs=1e-3), fake


def test_fixture_corpus_prepares_with_both_classes_in_every_split(tmp_path):
    root = make_fixture_corpus(tmp_path / "fixture", n_speakers=8, clips_per_speaker=2)
    summary, audit, skipped = prepare(root, tmp_path / "cache")
    every = assert_valid_prepared(tmp_path / "cache" / DATASET, root, "folder", speakers_known=True)
    assert set(skipped["original_path"]) == {"real/spk00_silent.wav", "fake/spk00_not_audio.wav"}
    assert summary["used_files"] == 8 * 2 * 2
    assert set(audit["split"].astype(str)) == set(SPLITS) and len(audit) == 6
    assert set(every.loc[every["label"] == 1, "attack"]) == set(fixture_corpus.FIXTURE_ATTACKS)
