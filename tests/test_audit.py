"""Unit tests for the shortcut audit: the recording facts preparation stores per clip, the spectral
envelope reference read from a processed split, and the verdict set beside the model's EER; and for
band occlusion, which measures the frequency bands a model's decision rests on.

Every signal has a known answer (a DC-shifted sine, white vs band-limited noise, a tone with quiet gaps,
a file stored at 8 kHz); the envelope test writes tiny spectrograms whose classes differ only in tilt.
"""

import math
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import vit_lib
from vit_audio import preparation
from vit_audio.audio_io import recording_facts
from vit_lib import DatasetError, audit_verdict, band_statistics, shortcut_audit

SR = 16000


def white_noise(seconds, sr=SR, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)


def band_limited(audio, cutoff_hz, sr=SR):
    """Brick-wall low-pass: every component above `cutoff_hz` removed."""
    spectrum = np.fft.rfft(audio)
    spectrum[np.fft.rfftfreq(len(audio), 1 / sr) > cutoff_hz] = 0
    return np.fft.irfft(spectrum, len(audio)).astype(np.float32)


# ---------------------------------------------------------------- recording facts
def test_dc_offset_of_a_shifted_sine_is_its_mean_over_its_rms():
    t = np.arange(3 * SR) / SR
    shifted = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1).astype(np.float32)
    mean_over_rms = 0.1 / math.sqrt(0.5**2 / 2 + 0.1**2)
    assert recording_facts(shifted, SR)["dc_offset"] == pytest.approx(mean_over_rms, abs=1e-3)
    assert recording_facts(shifted - 0.1, SR)["dc_offset"] == pytest.approx(0.0, abs=1e-3)


def test_white_noise_has_half_its_energy_above_4khz_and_noise_limited_to_3khz_none():
    noise = white_noise(3)
    assert recording_facts(noise, SR)["high_band_energy_ratio"] == pytest.approx(0.5, abs=0.02)
    assert recording_facts(band_limited(noise, 3000), SR)["high_band_energy_ratio"] < 1e-3


def test_spectral_rolloff_follows_the_bandwidth():
    noise = white_noise(3)
    assert recording_facts(noise, SR)["spectral_rolloff_hz"] == pytest.approx(0.95 * SR / 2, rel=0.02)
    assert 2500 < recording_facts(band_limited(noise, 3000), SR)["spectral_rolloff_hz"] <= 3000


def test_noise_floor_of_a_tone_with_quiet_gaps_is_the_level_of_the_gaps():
    t = np.arange(4 * SR) / SR
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    gaps = (t % 1.0) >= 0.6  # 40 % of the clip: the 10th-percentile frame lies in a gap
    hiss = (
        1e-3 * (0.5 / math.sqrt(2)) * np.random.default_rng(0).standard_normal(len(t))
    )  # 60 dB below the tone
    assert recording_facts(np.where(gaps, hiss, tone).astype(np.float32), SR)[
        "noise_floor_db"
    ] == pytest.approx(-60.0, abs=1.0)
    assert recording_facts(np.where(gaps, 0.0, tone).astype(np.float32), SR)["noise_floor_db"] == -120.0
    assert recording_facts(tone.astype(np.float32), SR)["noise_floor_db"] == pytest.approx(0.0, abs=0.5)


def test_file_stored_at_8khz_reports_its_own_rate_and_no_energy_above_4khz(tmp_path):
    segment_config = vit_lib.SEGMENT_CONFIGS["vit_balanced_dataset"]
    sf.write(tmp_path / "narrow.wav", white_noise(2, sr=8000), 8000)
    sf.write(tmp_path / "wide.wav", white_noise(2), SR)
    narrow, _ = vit_lib.clip_to_spectrograms(tmp_path / "narrow.wav", segment_config)
    wide, _ = vit_lib.clip_to_spectrograms(tmp_path / "wide.wav", segment_config)
    assert (narrow["original_sample_rate"], wide["original_sample_rate"]) == (8000, 16000)
    assert narrow["high_band_energy_ratio"] == 0.0
    assert wide["high_band_energy_ratio"] == pytest.approx(0.5, abs=0.02)
    assert set(narrow) == set(vit_lib.CLIP_FACTS)


@pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None, reason="ffmpeg is not installed"
)
def test_original_sample_rate_of_a_format_only_ffmpeg_reads_comes_from_ffprobe(tmp_path):
    sf.write(tmp_path / "clip.wav", white_noise(1), SR)
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-v",
            "error",
            "-i",
            str(tmp_path / "clip.wav"),
            "-ar",
            "11025",
            str(tmp_path / "clip.m4a"),
        ],
        check=True,
    )
    assert vit_lib.original_sample_rate(tmp_path / "clip.m4a") == 11025


def test_original_sample_rate_is_nan_when_no_reader_can_tell(tmp_path):
    (tmp_path / "noise.wav").write_bytes(b"not audio at all")
    assert math.isnan(vit_lib.original_sample_rate(tmp_path / "noise.wav"))


def test_clip_facts_are_stored_per_segment_and_kept_per_file():
    assert set(vit_lib.CLIP_FACTS) <= set(preparation.METADATA_COLUMNS)
    segments = pd.DataFrame(
        dict(
            original_path=["a.wav", "a.wav", "b.wav"],
            label=[0, 0, 1],
            segment_index=[0, 1, 0],
            **{fact: [1.0, 1.0, 2.0] for fact in vit_lib.CLIP_FACTS},
        )
    )
    files = vit_lib.pool_file_scores(segments).set_index("original_path")
    assert files.loc["b.wav", vit_lib.CLIP_FACTS].tolist() == [2.0] * len(vit_lib.CLIP_FACTS)
    assert set(vit_lib.CLIP_FACTS) <= set(vit_lib.SHORTCUT_FEATURES)


# ---------------------------------------------------------------- the audit
def random_files(rng, n, **columns):
    """Files whose trivial features carry no class information (unless given in `columns`)."""
    label = np.r_[np.zeros(n, int), np.ones(n, int)]
    features = {f: rng.normal(size=2 * n) for f in vit_lib.SHORTCUT_FEATURES}
    return pd.DataFrame(
        dict(
            original_path=[f"file_{i:03d}.wav" for i in range(2 * n)], label=label, **{**features, **columns}
        )
    )


def test_audit_skips_features_an_older_dataset_did_not_record_with_a_note(capsys):
    rng = np.random.default_rng(0)
    older = ["duration_s", "filled_fraction", "leading_silence_s", "loudness_lufs"]
    table = shortcut_audit(random_files(rng, 30)[["label", *older]], random_files(rng, 30)[["label", *older]])
    assert table["feature"].tolist() == [vit_lib.SHORTCUT_FEATURES[f] for f in older] + [
        vit_lib.ALL_FEATURES_TOGETHER
    ]
    note = capsys.readouterr().out
    assert "Not audited" in note and "DC offset (mean / RMS)" in note and "original sample rate (Hz)" in note


def test_audit_takes_unknown_values_as_the_train_median_and_says_how_many(capsys):
    rng = np.random.default_rng(0)
    train, test = random_files(rng, 30), random_files(rng, 30)
    train.loc[:2, "original_sample_rate"] = np.nan
    table = shortcut_audit(train, test)
    assert table["test_eer"].notna().all()
    assert "original sample rate (Hz): unknown for 3 file(s)" in capsys.readouterr().out


def write_split(split_dir, tilts, rng, frames=64, bands=128):
    """A processed split: two segments per file, dB spectrograms whose level and noise are random and
    whose slope across the mel bands is the file's tilt (dB from the lowest to the highest band)."""
    split_dir.mkdir(parents=True)
    rows = []
    for index, (label, tilt) in enumerate(tilts):
        level = rng.normal(-40, 5)
        for segment in range(2):
            slope = tilt * (np.arange(bands)[:, None] / (bands - 1) - 0.5)  # same mean level for every tilt
            spec = level + slope + rng.normal(0, 6, (bands, frames))
            np.save(split_dir / f"f{index:03d}_{segment}.npy", spec[None].astype(np.float32))
            rows.append(
                dict(
                    npy_path=f"f{index:03d}_{segment}.npy",
                    original_path=f"file_{index:03d}.wav",
                    label=label,
                    segment_index=segment,
                )
            )
    pd.DataFrame(rows).to_csv(split_dir / "metadata.csv", index=False)


def test_spectral_envelope_separates_classes_that_differ_only_in_spectral_tilt(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 15)):
        tilts = [(0, rng.normal(-20, 2)) for _ in range(n)] + [(1, rng.normal(-30, 2)) for _ in range(n)]
        write_split(tmp_path / split, tilts, rng)
    table = shortcut_audit(random_files(rng, 20), random_files(rng, 15), dataset_dir=tmp_path).set_index(
        "feature"
    )
    assert table.loc[vit_lib.SPECTRAL_ENVELOPE, "test_eer"] == pytest.approx(0.0, abs=0.04)
    assert table.loc[vit_lib.SPECTRAL_ENVELOPE, "kind"] == "spectral envelope"
    assert (table.loc[table["kind"] != "spectral envelope", "test_eer"] > 0.25).all(), table


def test_envelope_per_kind_finds_the_kind_of_fake_its_average_spectrum_gives_away(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 20), ("test", 15)):  # real and untilted fakes alike, tilted fakes apart
        tilts = [(0, -20)] * n + [(1, -45)] * n + [(1, -20)] * n
        write_split(tmp_path / split, [(label, rng.normal(tilt, 2)) for label, tilt in tilts], rng)
    test_files = pd.DataFrame(
        dict(
            original_path=[f"file_{i:03d}.wav" for i in range(45)],
            attack=["-"] * 15 + ["tilted"] * 15 + ["untilted"] * 15,
        )
    )
    test_files = test_files.assign(label=[0] * 15 + [1] * 30)
    audit = shortcut_audit(test_files, test_files, dataset_dir=tmp_path, per_kind=True)
    table = audit[audit["kind"] == vit_lib.ENVELOPE_PER_KIND].set_index("feature")
    assert len(table) == 2
    eer = table["test_eer"].rename(lambda feature: feature.rsplit(" ", 1)[-1])
    assert eer["tilted"] < 0.1 and eer["untilted"] > 0.3, table


def test_band_statistics_average_each_bands_mean_and_std_over_a_files_segments(tmp_path):
    (tmp_path / "train").mkdir()
    first = np.array([[0.0, 2.0], [-10.0, -10.0]])  # band means 1, -10; stds 1, 0
    second = np.array([[4.0, 4.0], [-20.0, -30.0]])  # band means 4, -25; stds 0, 5
    for name, spec in (("s0.npy", first), ("s1.npy", second)):
        np.save(tmp_path / "train" / name, spec[None].astype(np.float32))
    pd.DataFrame(
        dict(
            npy_path=["s0.npy", "s1.npy"],
            original_path=["a.wav", "a.wav"],
            label=[1, 1],
            segment_index=[0, 1],
        )
    ).to_csv(tmp_path / "train" / "metadata.csv", index=False)
    stats = band_statistics(tmp_path / "train")
    assert stats.columns.tolist() == ["original_path", "label", "mean_000", "mean_001", "std_000", "std_001"]
    np.testing.assert_allclose(stats.iloc[0, 2:].to_numpy(float), [2.5, -17.5, 0.5, 2.5])


def test_band_statistics_name_an_unreadable_spectrogram(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "s0.npy").write_bytes(b"torn write")
    pd.DataFrame(dict(npy_path=["s0.npy"], original_path=["a.wav"], label=[0], segment_index=[0])).to_csv(
        tmp_path / "test" / "metadata.csv", index=False
    )
    with pytest.raises(DatasetError, match="s0.npy: cannot read the spectrogram"):
        band_statistics(tmp_path / "test")


# ---------------------------------------------------------------- the verdict
def example_audit():
    return pd.DataFrame(
        dict(
            feature=[
                "clip duration (s)",
                "share of energy above 4 kHz",
                "all trivial features together",
                vit_lib.SPECTRAL_ENVELOPE,
            ],
            test_eer=[0.45, 0.35, 0.30, 0.25],
            kind=["feature", "feature", "features together", "spectral envelope"],
        )
    )


def test_verdict_says_the_model_is_clearly_better_when_its_eer_is_below_half_of_every_reference():
    verdict = audit_verdict(example_audit(), 0.05)
    assert verdict == (
        "File-level test EER: the model 0.0500; best trivial feature (all trivial features together) "
        "0.3000; spectral envelope 0.2500. The model is clearly better: its EER is below half of every "
        "reference's."
    )


@pytest.mark.parametrize("model_eer", [0.125, 0.30])
def test_verdict_says_plainly_when_the_model_is_not_clearly_better(model_eer):
    verdict = audit_verdict(example_audit(), model_eer)
    assert "The model is NOT clearly better than its references" in verdict
    assert f"{vit_lib.SPECTRAL_ENVELOPE} reaches 0.2500" in verdict
    assert verdict.endswith("its score may measure the corpus, not the speech.")
    assert "clearly better:" not in verdict


def test_verdict_leaves_the_envelope_of_one_kind_of_fake_out_of_its_references():
    one_kind = pd.DataFrame(
        dict(feature=["envelope: real against espeak"], test_eer=[0.0], kind=[vit_lib.ENVELOPE_PER_KIND])
    )
    verdict = audit_verdict(pd.concat([example_audit(), one_kind], ignore_index=True), 0.05)
    assert verdict == audit_verdict(example_audit(), 0.05)


def test_verdict_without_the_envelope_says_it_was_not_computed():
    audit = example_audit().iloc[:3]
    assert "spectral envelope not computed" in audit_verdict(audit, 0.01)
    assert "clearly better: its EER" in audit_verdict(audit, 0.01)


# ---------------------------------------------------------------- band occlusion
class LowRowsDetector(torch.nn.Module):
    """Reads only rows 0-3: the more they move, the more bona fide (score = 2 x their mean |z|, rounded
    so that the float residue of a silenced row reads as exactly 0 on every machine)."""

    def forward(self, x):
        movement = x[:, 0, :4].abs().mean((1, 2)).round(decimals=3)
        return torch.stack([movement, -movement], dim=1)


def write_low_row_split(split_dir, rng, n_files=6, rows=8, frames=16):
    """Bona fide segments move in rows 0-3 (+-10 dB from frame to frame), spoofed ones are flat there;
    rows 4-7 are the same noise for both."""
    split_dir.mkdir(parents=True)
    records = []
    for index in range(2 * n_files):
        label = index % 2
        spec = -40 + rng.normal(0, 3, (rows, frames))
        spec[:4] = -20 + (0 if label else 10 * (-1) ** np.arange(frames))
        np.save(split_dir / f"s{index}.npy", spec[None].astype(np.float32))
        records.append(
            dict(npy_path=f"s{index}.npy", original_path=f"f{index}.wav", label=label, segment_index=0)
        )
    pd.DataFrame(records).to_csv(split_dir / "metadata.csv", index=False)


def test_silenced_rows_carry_nothing_and_leave_the_others_as_they_were(tmp_path):
    write_low_row_split(tmp_path / "test", np.random.default_rng(0))
    data_config = vit_lib.DataConfig(N_MELS=8)
    intact = vit_lib.AudioDataset(tmp_path, "test", 8, 16, data_config=data_config)[0][0]
    silenced = vit_lib.AudioDataset(
        tmp_path, "test", 8, 16, data_config=data_config, silenced_rows=slice(0, 4)
    )[0][0]
    assert silenced[0, :4].abs().max() < 1e-5  # a constant row loses its mean: nothing left
    assert intact[0, :4].abs().sum() > 0
    # the other rows change only through the spectrogram's overall std
    ratio = silenced[0, 4:] / intact[0, 4:]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)


def test_band_occlusion_finds_the_rows_a_detector_reads(tmp_path):
    write_low_row_split(tmp_path / "test", np.random.default_rng(0))
    data_config = vit_lib.DataConfig(N_MELS=8)
    dataset = vit_lib.AudioDataset(tmp_path, "test", 8, 16, data_config=data_config)
    table = vit_lib.band_occlusion(LowRowsDetector(), dataset, rows_per_band=4).set_index("silenced")
    assert table.index.tolist() == ["none", "rows 0-3", "rows 4-7"]
    assert table.loc["none", "segment_eer"] == 0.0 and table.loc["rows 4-7", "segment_eer"] == 0.0
    assert table.loc["rows 0-3", "segment_eer"] >= 0.5  # every score tied: nothing separates the classes
    assert table.loc["rows 0-3", ["mean_score_bonafide", "mean_score_spoof"]].tolist() == [0.0, 0.0]
    assert table.loc["none", "mean_score_bonafide"] > 1 and table.loc["none", "mean_score_spoof"] == 0.0
    edges = vit_lib.row_frequencies(data_config)
    assert table.loc["rows 0-3", ["low_hz", "high_hz"]].tolist() == [0, round(edges[5])]
    assert table.loc["rows 4-7", "high_hz"] == 8000 and dataset.silenced_rows is None


def test_row_frequencies_follow_the_front_end():
    mel = vit_lib.row_frequencies(vit_lib.DataConfig())
    assert len(mel) == 130 and mel[0] == 0 and mel[-1] == pytest.approx(8000)
    assert np.diff(mel)[0] < np.diff(mel)[-1]  # mel bands widen with frequency
    linear = vit_lib.row_frequencies(vit_lib.DataConfig(FEATURE="linear", FMIN=100.0))
    np.testing.assert_allclose(np.diff(linear), (8000 - 100) / 129)
    assert vit_lib.row_frequencies(vit_lib.DataConfig(FEATURE="lfcc")) is None
