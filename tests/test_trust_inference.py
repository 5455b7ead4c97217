"""Trust in inference: score-file ids, settings that travel with the model (data settings, global
normalisation statistics, the validation-EER threshold), the command line's handling of bad paths and
bad files, bounded memory for long files, and wandb without a network. CPU only, no network."""

import contextlib
import io
import math
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from dataclasses import asdict
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import vit_cli as cli
import vit_lib
from vit_audio import audio_io
from vit_lib import DataConfig, TrainingConfig

DATASET = "vit_balanced_dataset"
SR = DataConfig.SR


def train_one_epoch(prepared, folder, data_config=DataConfig()):
    config = TrainingConfig(
        model_size="ViT_Small",
        dataset_name=DATASET,
        epochs=1,
        batch_size=8,
        num_workers=0,
        wandb_mode="disabled",
        progress=False,
        cache_dir=str(prepared.cache),
        checkpoint_dir=str(folder / "checkpoints"),
        results_dir=str(folder / "results"),
        run_name="trust",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        vit_lib.run_training(config, data_config)
    return folder / "checkpoints" / "best_vit_model_trust.pth"


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """One epoch of ViT_Small with the default data settings: the checkpoint and the model loaded from it."""
    path = train_one_epoch(prepared, tmp_path_factory.mktemp("trained"))
    with contextlib.redirect_stdout(io.StringIO()):
        model, checkpoint = vit_lib.load_model(path)
    return SimpleNamespace(path=path, model=model, checkpoint=checkpoint)


def tiny_checkpoint(path, width=256, **fields):
    """A checkpoint of an untrained one-layer ViT over 128 x `width` spectrograms, with `fields` added."""
    torch.manual_seed(0)
    vit_config = vit_lib.ViTConfig("tiny", (128, width), (16, 16), dim=16, depth=1, heads=1, mlp_dim=16)
    model = vit_lib.AudioViT(config=vit_config)
    vit_lib.save_checkpoint(
        path,
        model_state=model.state_dict(),
        vit_config=asdict(vit_config),
        model_config=asdict(vit_lib.SEGMENT_CONFIGS[DATASET]),
        **fields,
    )
    return path


def data_settings(data_config):
    return {k: v for k, v in asdict(data_config).items() if k != "CACHE_DIR"}


def write_wav(path, seconds, seed=0, sr=SR):
    """A voice-like test signal: a noisy harmonic tone with a slow amplitude envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    audio = 0.3 * np.sin(2 * np.pi * (140 + 20 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))
    audio += 0.02 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio.astype(np.float32), sr, subtype="PCM_16")
    return path


def score(checkpoint, inputs, output):
    """score_files quietly; returns (number scored, failures, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        scored, failures = vit_lib.score_files(checkpoint, inputs, output, progress=False)
    return scored, failures, out.getvalue()


# ---------------------------------------------------------------- 1. score-file ids
def test_same_named_files_in_nested_folders_get_distinct_ids_that_read_back(trained, tmp_path):
    inputs = tmp_path / "in"
    write_wav(inputs / "a.wav", 2.0, seed=1)
    write_wav(inputs / "nested" / "a.wav", 2.5, seed=2)
    output = tmp_path / "s.txt"
    score(trained.path, [inputs], output)
    back = vit_lib.read_score_file(output)
    assert list(back["file_id"]) == ["a.wav", "nested/a.wav"]
    for relative, row in zip(["a.wav", "nested/a.wav"], back.itertuples()):
        _, verdict = vit_lib.score_audio_file(inputs / relative, trained.model, trained.checkpoint)
        assert row.score == pytest.approx(verdict["score"], abs=5e-7)


def test_file_name_with_spaces_is_one_id_and_its_score_reads_back_exactly(trained, tmp_path):
    inputs = tmp_path / "in"
    write_wav(inputs / "take 1.wav", 2.0, seed=3)
    write_wav(inputs / "100%.wav", 2.0, seed=4)
    output = tmp_path / "s.txt"
    score(trained.path, [inputs], output)
    lines = output.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["100%25", "take%201"]
    assert all(len(line.split()) == 2 for line in lines)
    back = vit_lib.read_score_file(output)
    _, verdict = vit_lib.score_audio_file(inputs / "take 1.wav", trained.model, trained.checkpoint)
    assert back.loc[back["file_id"] == "take%201", "score"].item() == float(f"{verdict['score']:.6f}")


def test_score_file_ids_are_names_when_unique_else_relative_paths_and_deterministic():
    assert vit_lib.score_file_ids(["real/LA_0001.flac", "fake/A01/LA_0002.flac"]) == ["LA_0001", "LA_0002"]
    clash = ["x/a.wav", "a.flac", "y z/b.wav"]
    assert vit_lib.score_file_ids(clash) == ["x/a.wav", "a.flac", "y%20z/b.wav"]
    assert vit_lib.score_file_ids(clash) == vit_lib.score_file_ids(list(clash))
    assert vit_lib.score_file_ids(["tab\there.wav"]) == ["tab%09here"]
    with pytest.raises(ValueError, match="listed twice: a/b.wav"):
        vit_lib.score_file_ids(["a/b.wav", "a/b.wav"])


def test_write_score_file_gives_same_named_files_distinct_ids(tmp_path):
    files = pd.DataFrame(
        dict(
            original_path=["real/s1/a.flac", "fake/A01/a.flac"],
            score=[1.5, -2.0],
            attack=["-", "A01"],
            label=[0, 1],
        )
    )
    path = tmp_path / "scores.txt"
    vit_lib.write_score_file(path, files)
    back = vit_lib.read_score_file(path)
    assert list(back["file_id"]) == ["real/s1/a.flac", "fake/A01/a.flac"]
    assert list(back["score"]) == [1.5, -2.0] and list(back["label"]) == [0, 1]


def test_read_score_file_rejects_a_line_whose_id_was_split_by_a_space(tmp_path):
    path = tmp_path / "scores.txt"
    path.write_text("a 0.5\ntake 1 -0.067248\n")
    with pytest.raises(ValueError, match=r":2: expected 'FILE_ID SCORE \[ATTACK KEY\]'"):
        vit_lib.read_score_file(path)


# ---------------------------------------------------------------- 4. settings travel with the model
def test_model_config_counts_frames_at_the_data_configs_sample_rate_and_hop():
    assert vit_lib.SegmentConfig("x", 8, 0.5).max_frames_spec == 256
    assert vit_lib.SegmentConfig("x", 8, 0.5, data_config=DataConfig(HOP_LENGTH=256)).max_frames_spec == 512
    assert vit_lib.SegmentConfig("x", 8, 0.5, data_config=DataConfig(SR=8000)).max_frames_spec == 128
    assert vit_lib.make_segment_config(DATASET, DataConfig(HOP_LENGTH=256)).max_frames_spec == 512
    with pytest.raises(ValueError, match="Unknown dataset_name 'nope'"):
        vit_lib.make_segment_config("nope")


def test_spectrograms_at_hop_256_keep_all_501_frames(tmp_path):
    data_config = DataConfig(HOP_LENGTH=256)
    segment_config = vit_lib.make_segment_config(DATASET, data_config)
    _, specs = vit_lib.clip_to_spectrograms(write_wav(tmp_path / "a.wav", 8.0), segment_config, data_config)
    ((_, spec, _),) = specs
    assert spec.shape == (128, 512)
    assert (spec[:, 501:] == data_config.MASK_REPLACEMENT_VALUE).all()  # padding only after the 501 frames
    assert (spec[:, 256:501] > data_config.MASK_REPLACEMENT_VALUE).any()


def test_preparation_at_hop_256_stores_512_frame_spectrograms(tmp_path):
    corpus = vit_lib.make_fixture_corpus(tmp_path / "corpus", n_speakers=4, clips_per_speaker=1)
    with contextlib.redirect_stdout(io.StringIO()):
        vit_lib.prepare_dataset(
            corpus,
            DATASET,
            cache_dir=tmp_path / "cache",
            num_workers=1,
            progress=False,
            data_config=DataConfig(HOP_LENGTH=256),
            split_fractions=(0.5, 0.25, 0.25),
        )
    arrays = list((tmp_path / "cache" / DATASET / "train").glob("*.npy"))
    assert arrays and {np.load(path).shape for path in arrays} == {(1, 128, 512)}


def test_checkpoint_holds_the_data_settings(trained):
    assert trained.checkpoint["data_config"] == data_settings(DataConfig())
    assert (
        trained.checkpoint.get("normalization") is None
    )  # per-spectrogram normalisation needs no statistics


@pytest.fixture(scope="module")
def globally_normalised(prepared, tmp_path_factory):
    data_config = DataConfig(USE_GLOBAL_NORMALIZATION=True)
    path = train_one_epoch(prepared, tmp_path_factory.mktemp("global"), data_config)
    with contextlib.redirect_stdout(io.StringIO()):
        model, checkpoint = vit_lib.load_model(path)
    return SimpleNamespace(path=path, model=model, checkpoint=checkpoint, data_config=data_config)


def test_checkpoint_of_a_globally_normalised_model_holds_the_train_statistics(prepared, globally_normalised):
    stats = pd.read_json(prepared.cache / DATASET / "normalization.json", typ="series")
    assert globally_normalised.checkpoint["data_config"] == data_settings(globally_normalised.data_config)
    assert globally_normalised.checkpoint["normalization"] == dict(mean=stats["mean"], std=stats["std"])


def test_scoring_normalises_with_the_checkpoints_train_statistics(prepared, globally_normalised):
    clip = prepared.corpus / "real" / "spk01_real_0.wav"
    model, checkpoint = globally_normalised.model, globally_normalised.checkpoint
    timeline, verdict = vit_lib.score_audio_file(clip, model, checkpoint)
    _, specs = vit_lib.clip_to_spectrograms(clip, vit_lib.SEGMENT_CONFIGS[DATASET])
    stats = checkpoint["normalization"]
    batch = torch.stack(
        [
            vit_lib.normalize_spectrogram(torch.from_numpy(s[None]), stats["mean"], stats["std"])
            for _, s, _ in specs
        ]
    )
    with torch.no_grad():
        logits = model(batch).double().numpy()
    np.testing.assert_allclose(timeline["score"], logits[:, 0] - logits[:, 1], atol=1e-5)


def test_scoring_uses_the_checkpoints_hop_length(tmp_path):
    settings = data_settings(DataConfig(HOP_LENGTH=256))
    checkpoint_path = tiny_checkpoint(tmp_path / "hop256.pth", width=512, data_config=settings)
    with contextlib.redirect_stdout(io.StringIO()):
        model, checkpoint = vit_lib.load_model(checkpoint_path)
    timeline, verdict = vit_lib.score_audio_file(write_wav(tmp_path / "a.wav", 3.0), model, checkpoint)
    assert verdict["segments"] == len(timeline) == 1 and np.isfinite(verdict["score"])


def test_scoring_takes_off_the_row_means_when_the_checkpoint_says_so(tmp_path):
    clip = write_wav(tmp_path / "a.wav", 3.0)
    scores = {}
    for subtract in (False, True):
        settings = data_settings(DataConfig(SUBTRACT_ROW_MEANS=subtract))
        checkpoint_path = tiny_checkpoint(tmp_path / f"rows_{subtract}.pth", data_config=settings)
        with contextlib.redirect_stdout(io.StringIO()):
            model, checkpoint = vit_lib.load_model(checkpoint_path)
        scores[subtract], _ = vit_lib.score_audio_file(clip, model, checkpoint)
    _, specs = vit_lib.clip_to_spectrograms(clip, vit_lib.SEGMENT_CONFIGS[DATASET])
    batch = torch.stack(
        [
            vit_lib.normalize_spectrogram(torch.from_numpy(s[None]), subtract_row_means=True)
            for _, s, _ in specs
        ]
    )
    with torch.no_grad():
        logits = model(batch).double().numpy()
    np.testing.assert_allclose(scores[True]["score"], logits[:, 0] - logits[:, 1], atol=1e-5)
    assert not np.allclose(scores[True]["score"], scores[False]["score"], rtol=0, atol=1e-4)


def test_a_checkpoint_from_before_row_means_were_stored_is_scored_without_them():
    settings = data_settings(DataConfig())
    del settings["SUBTRACT_ROW_MEANS"]
    assert DataConfig().SUBTRACT_ROW_MEANS
    assert not vit_lib.inference_settings({"data_config": settings})[0].SUBTRACT_ROW_MEANS
    assert not vit_lib.inference_settings({})[0].SUBTRACT_ROW_MEANS


def test_checkpoint_without_data_settings_scores_with_the_defaults_and_says_so_once(tmp_path):
    checkpoint_path = tiny_checkpoint(tmp_path / "old.pth")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model, checkpoint = vit_lib.load_model(checkpoint_path)
    printed = out.getvalue().splitlines()
    assert len(printed) == 1 and "old.pth" in printed[0] and "default data settings" in printed[0], printed
    inputs = tmp_path / "in"
    for seed in range(2):
        write_wav(inputs / f"{seed}.wav", 2.0, seed=seed)
    scored, failures, printed = score(checkpoint_path, [inputs], tmp_path / "s.txt")
    assert scored == 2 and not failures
    assert printed.count("default data settings") == 1


def test_globally_normalised_checkpoint_without_its_statistics_is_refused_at_load(tmp_path):
    settings = data_settings(DataConfig(USE_GLOBAL_NORMALIZATION=True))
    checkpoint_path = tiny_checkpoint(tmp_path / "no_stats.pth", data_config=settings)
    with pytest.raises(ValueError, match=r"no_stats\.pth: the model was trained with global normalisation"):
        vit_lib.load_model(checkpoint_path)


def test_checkpoint_with_an_unknown_data_setting_raises_naming_it(tmp_path):
    settings = {**data_settings(DataConfig()), "WINDOW": "hann"}
    checkpoint_path = tiny_checkpoint(tmp_path / "future.pth", data_config=settings)
    with pytest.raises(ValueError, match=r"future\.pth.*unknown data setting\(s\) \['WINDOW'\]"):
        vit_lib.load_model(checkpoint_path)


# ---------------------------------------------------------------- 5. verdict threshold
def test_best_checkpoint_holds_the_file_level_validation_eer_threshold(prepared, trained):
    segments = vit_lib.score_split(trained.model, prepared.cache, DATASET, "val")
    files = vit_lib.pool_file_scores(segments)
    expected = vit_lib.eer_from_labels(files["label"], files["score"])[1]
    assert trained.checkpoint["eer_threshold"] == pytest.approx(expected, abs=1e-6)


def test_verdict_uses_the_checkpoints_threshold_and_says_which(prepared, trained):
    clip = prepared.corpus / "real" / "spk01_real_0.wav"
    _, verdict = vit_lib.score_audio_file(clip, trained.model, trained.checkpoint)
    assert verdict["threshold"] == trained.checkpoint["eer_threshold"]
    assert verdict["threshold_source"] == "validation EER (file level)"
    assert verdict["verdict"] == ("fake" if verdict["score"] <= verdict["threshold"] else "real")
    for shift, expected in ((1.0, "fake"), (-1.0, "real")):  # a threshold either side of this file's score
        moved = {**trained.checkpoint, "eer_threshold": verdict["score"] + shift}
        assert vit_lib.score_audio_file(clip, trained.model, moved)[1]["verdict"] == expected


def test_verdict_without_a_stored_threshold_uses_zero_and_says_so(prepared, trained):
    older = {k: v for k, v in trained.checkpoint.items() if k != "eer_threshold"}
    _, verdict = vit_lib.score_audio_file(prepared.corpus / "real" / "spk01_real_0.wav", trained.model, older)
    assert verdict["threshold"] == 0.0
    assert verdict["threshold_source"] == "none in checkpoint (0.0, i.e. p(fake) = 0.5)"
    assert verdict["verdict"] == ("fake" if verdict["p_fake"] >= 0.5 else "real")


def test_score_files_prints_the_threshold_it_used(trained, tmp_path):
    write_wav(tmp_path / "in" / "a.wav", 2.0)
    _, _, printed = score(trained.path, [tmp_path / "in"], tmp_path / "s.txt")
    threshold = trained.checkpoint["eer_threshold"]
    assert f"Verdict threshold: score <= {threshold:.4f} is fake (validation EER (file level))" in printed


# ---------------------------------------------------------------- 11. command line
def test_score_refuses_an_unusable_output_path_before_scoring(trained, tmp_path, monkeypatch):
    write_wav(tmp_path / "in" / "a.wav", 2.0)
    calls = []
    monkeypatch.setattr(vit_lib, "score_audio_file", lambda *args, **kwargs: calls.append(args))
    (tmp_path / "a_file").write_text("x")
    for output, message in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "s.txt", "not a folder")):
        with pytest.raises(ValueError, match=message):
            vit_lib.score_files(trained.path, [tmp_path / "in"], output, progress=False)
    assert calls == []
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["score", str(trained.path), str(tmp_path / "in"), "--output", str(tmp_path)])
    assert exit_info.value.code == 2 and calls == []
    vit_lib.check_output_path(os.devnull)  # a device (or a pipe) is written straight through: allowed
    (tmp_path / "link.txt").symlink_to(tmp_path / "new" / "s.txt")
    vit_lib.check_output_path(tmp_path / "link.txt")  # a link into a folder that does not exist yet


def test_score_keeps_going_past_a_file_that_raises_an_unexpected_error(trained, tmp_path, monkeypatch):
    for name in ("a.wav", "b.wav", "c.wav"):
        write_wav(tmp_path / "in" / name, 2.0, seed=len(name))
    original = vit_lib.clip_spectrograms

    def failing_on_b(path, *args, **kwargs):
        if Path(path).name == "b.wav":
            raise RuntimeError("decoder crashed")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(vit_lib, "clip_spectrograms", failing_on_b)
    scored, failures, printed = score(trained.path, [tmp_path / "in"], tmp_path / "s.txt")
    assert scored == 2 and len(failures) == 1
    assert re.search(r"skipped .*b\.wav: RuntimeError: decoder crashed", printed)
    assert vit_lib.read_score_file(tmp_path / "s.txt")["file_id"].tolist() == ["a", "c"]


def test_preparation_keeps_going_past_a_file_that_fails_midway(tmp_path, monkeypatch):
    # two clips per speaker: the failing file's split keeps a real clip
    corpus = vit_lib.make_fixture_corpus(tmp_path / "corpus", n_speakers=4, clips_per_speaker=2)
    original = vit_lib.clip_spectrograms

    def failing_after_one_segment(path, *args, **kwargs):
        facts, specs = original(path, *args, **kwargs)
        if Path(path).name != "spk01_real_0.wav":
            return facts, specs

        def one_then_failure():
            yield next(specs)
            raise RuntimeError("disk went away")

        return facts, one_then_failure()

    monkeypatch.setattr(vit_lib, "clip_spectrograms", failing_after_one_segment)
    with contextlib.redirect_stdout(io.StringIO()):
        summary, _, skipped = vit_lib.prepare_dataset(
            corpus,
            DATASET,
            cache_dir=tmp_path / "cache",
            num_workers=1,
            progress=False,
            split_fractions=(0.5, 0.25, 0.25),
        )
    reasons = dict(zip(skipped["original_path"], skipped["reason"]))
    assert reasons["real/spk01_real_0.wav"] == "RuntimeError: disk went away"
    assert summary["used_files"] == summary["files"] - len(skipped) > 0


def exit_status(argv):
    """What the shell would see from `vit-audio ARGV`."""
    try:
        return cli.main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def test_score_and_prepare_exit_non_zero_when_every_input_failed(trained, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"not audio")
    assert exit_status(["score", str(trained.path), str(bad), "--output", str(tmp_path / "s.txt")]) == 1
    assert not (tmp_path / "s.txt").exists()  # nothing scored: no empty score file replaces an older one
    (tmp_path / "empty").mkdir()
    assert (
        exit_status(
            ["score", str(trained.path), str(tmp_path / "empty"), "--output", str(tmp_path / "s.txt")]
        )
        == 2
    )
    assert "no audio files in" in capsys.readouterr().err
    corpus = tmp_path / "corpus"
    for label in ("real", "fake"):
        for index in range(4):
            (corpus / label).mkdir(parents=True, exist_ok=True)
            (corpus / label / f"x{index}.wav").write_bytes(b"not audio")
    assert (
        exit_status(["prepare", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "1"])
        != 0
    )
    capsys.readouterr()
    nothing_used = dict(used_files=0, skipped_files=8, dataset_dir="cache/x")
    monkeypatch.setattr(vit_lib, "prepare_dataset", lambda *args, **kwargs: (nothing_used, None, None))
    assert exit_status(["prepare", str(corpus)]) == 1
    assert "no file could be prepared" in capsys.readouterr().out


def test_command_line_exit_status_reaches_the_shell(tmp_path):
    clip = write_wav(tmp_path / "a.wav", 1.0)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vit_cli",
            "score",
            str(tmp_path / "missing.pth"),
            str(clip),
            "--output",
            str(tmp_path / "s.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "Checkpoint not found" in result.stderr and "Traceback" not in result.stderr


def test_command_line_honours_vit_progress_0(trained, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("VIT_PROGRESS", "0")
    write_wav(tmp_path / "in" / "a.wav", 2.0)
    cli.main(["score", str(trained.path), str(tmp_path / "in"), "--output", str(tmp_path / "s.txt")])
    assert "Scoring" not in capfd.readouterr().err
    seen = {}
    monkeypatch.setattr(
        vit_lib, "run_training", lambda config, data_config: seen.update(train=config.progress)
    )

    def prepare_dataset(*args, progress, **kwargs):
        seen.update(prepare=progress)
        return dict(used_files=1), None, None

    monkeypatch.setattr(vit_lib, "prepare_dataset", prepare_dataset)
    cli.main(["train", "--epochs", "1"])
    cli.main(["prepare", str(tmp_path)])
    assert seen == dict(train=False, prepare=False)
    monkeypatch.setenv("VIT_PROGRESS", "1")
    cli.main(["train", "--epochs", "1"])
    assert seen["train"] is True


def test_command_line_trains_with_or_without_the_row_means(monkeypatch):
    seen = []
    monkeypatch.setattr(
        vit_lib, "run_training", lambda config, data_config: seen.append(data_config.SUBTRACT_ROW_MEANS)
    )
    cli.main(["train"])
    cli.main(["train", "--no-subtract-row-means", "--optimizer", "adam"])
    assert seen == [True, False]


# ---------------------------------------------------------------- 12. memory
def whole_clip_spectrograms(path, segment_config, data_config):
    """The preparation path on the whole decoded clip at once, as it ran before files were streamed."""
    audio = vit_lib.load_audio(path, data_config.SR)
    start, end = vit_lib.non_silent_bounds(audio, data_config.TRIM_TOP_DB)
    recording = audio_io.recording_facts(audio, data_config.SR)
    normalized, loudness = vit_lib.loudness_normalize(audio, data_config.SR, data_config.LOUDNESS_LUFS)
    if data_config.TRIM_SILENCE:
        normalized = normalized[start:end]
    segments = vit_lib.segment_waveform(
        normalized,
        data_config.SR,
        segment_config.audio_length_seconds,
        segment_config.overlap_ratio,
        data_config.SHORT_CLIP_MODE,
    )
    specs = [
        (
            seconds,
            vit_lib.fit_frames(
                vit_lib.log_mel_spectrogram(segment, data_config), segment_config.max_frames_spec
            ),
            filled,
        )
        for seconds, segment, filled in segments
    ]
    facts = dict(
        duration_s=round(len(audio) / data_config.SR, 4),
        loudness_lufs=round(loudness, 3),
        leading_silence_s=round(start / data_config.SR, 4),
        original_sample_rate=vit_lib.original_sample_rate(path),
        **recording,
    )
    return specs, facts


def gapped_voice(seconds, sr, channels=1):
    """A voice-like tone with 0.7 s of near-silence before it and 0.4 s after."""
    t = np.arange(int(seconds * sr)) / sr
    audio = (
        0.3
        * np.sin(2 * np.pi * 150 * t)
        * (0.5 + 0.5 * np.sin(2 * np.pi * 0.6 * t))
        * ((t > 0.7) & (t < seconds - 0.4))
    )
    audio += 0.003 * np.random.default_rng(0).standard_normal(len(t))
    return np.stack([audio, 0.8 * audio[::-1]], axis=1) if channels == 2 else audio


@pytest.mark.parametrize(
    "name, sr, channels, seconds, data_config",
    [
        ("voice.wav", SR, 1, 20.3, DataConfig()),  # 16 kHz: no resampling
        ("voice.flac", 44100, 2, 13.1, DataConfig(TRIM_SILENCE=True)),  # resampled, downmixed, trimmed
        ("short.wav", 22050, 1, 0.3, DataConfig()),  # one looped segment
        ("mid.wav", SR, 1, 5.0, DataConfig(SHORT_CLIP_MODE="pad")),  # one padded segment
    ],
)
@pytest.mark.parametrize("read_twice", [True, False], ids=["read_twice", "kept_from_first_read"])
def test_streamed_preparation_equals_the_whole_clip_path(
    tmp_path, monkeypatch, name, sr, channels, seconds, data_config, read_twice
):
    path = tmp_path / name
    sf.write(path, gapped_voice(seconds, sr, channels).astype(np.float32), sr)
    segment_config = vit_lib.SEGMENT_CONFIGS[DATASET]
    expected_specs, expected_facts = whole_clip_spectrograms(path, segment_config, data_config)
    # small blocks: loudness blocks, silence frames and segments all straddle block edges
    monkeypatch.setattr(vit_lib, "stream_audio", partial(vit_lib.stream_audio, block_frames=3001))
    if read_twice:  # as a clip longer than KEPT_SAMPLES is
        monkeypatch.setattr(vit_lib, "KEPT_SAMPLES", 0)
    facts, specs = vit_lib.clip_to_spectrograms(path, segment_config, data_config)
    assert facts == expected_facts
    assert [(s, f) for s, _, f in specs] == [(s, f) for s, _, f in expected_specs]
    for (_, spec, _), (_, expected, _) in zip(specs, expected_specs):
        np.testing.assert_allclose(spec, expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_streamed_decoding_through_ffmpeg_gives_load_audios_samples(tmp_path):
    wav = tmp_path / "voice.wav"
    sf.write(wav, gapped_voice(3.0, 44100, 2).astype(np.float32), 44100)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(wav), str(tmp_path / "voice.m4a")], check=True
    )
    streamed = np.concatenate(list(vit_lib.stream_audio(tmp_path / "voice.m4a", 16000, block_frames=1000)))
    np.testing.assert_array_equal(streamed, vit_lib.load_audio(tmp_path / "voice.m4a", 16000))


def write_long_wav(path, seconds, sr=SR):
    """A long voice-like 16-bit file, written a minute at a time so the test never holds it whole."""
    with sf.SoundFile(path, "w", sr, 1, "PCM_16") as handle:
        for minute in range(math.ceil(seconds / 60)):
            t = (np.arange(min(60, seconds - 60 * minute) * sr) + minute * 60 * sr) / sr
            handle.write(0.3 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t)))
    return path


def peak_numpy_memory(run):
    """Peak bytes allocated while `run()` runs (numpy reports its arrays to tracemalloc)."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_preparing_a_file_holds_the_same_memory_whatever_its_length(tmp_path, monkeypatch):
    segment_config = vit_lib.SEGMENT_CONFIGS[DATASET]
    monkeypatch.setattr(vit_lib, "KEPT_SAMPLES", 0)  # both files read twice, as every long file is
    # both longer than the recording facts' measuring block (512 frames of 1024 samples, 33 s)
    short, long = write_long_wav(tmp_path / "short.wav", 60), write_long_wav(tmp_path / "long.wav", 4 * 60)

    def peak_preparing(path):
        return peak_numpy_memory(lambda: sum(1 for _ in vit_lib.clip_spectrograms(path, segment_config)[1]))

    peak_preparing(short)  # warms librosa's caches
    short_peak, long_peak = peak_preparing(short), peak_preparing(long)
    # 3 more minutes are 11.5 MB of float32 audio: holding the clip would show at once
    assert long_peak - short_peak < 1e6, (short_peak, long_peak)
    assert long_peak < 25e6, long_peak


def test_scoring_a_long_file_runs_the_model_on_bounded_batches(tmp_path):
    checkpoint_path = tiny_checkpoint(tmp_path / "tiny.pth", data_config=data_settings(DataConfig()))
    with contextlib.redirect_stdout(io.StringIO()):
        model, checkpoint = vit_lib.load_model(checkpoint_path)
    batch_sizes = []
    model.register_forward_hook(lambda module, inputs, output: batch_sizes.append(len(inputs[0])))
    path = write_long_wav(tmp_path / "long.wav", 3 * 60)
    timeline, verdict = vit_lib.score_audio_file(path, model, checkpoint, batch_size=16)
    assert verdict["segments"] == len(timeline) == 44 == sum(batch_sizes)  # (180 - 8) / 4 + 1
    assert max(batch_sizes) == 16


# ---------------------------------------------------------------- 16. wandb without a network
def test_unreachable_wandb_server_goes_offline_with_one_line_and_a_short_timeout(
    tmp_path, monkeypatch, capsys
):
    import wandb

    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("timed out")
        return SimpleNamespace(mode=kwargs["mode"])

    monkeypatch.setattr(wandb, "init", fake_init)
    run = vit_lib.init_wandb("t", {}, save_dir=tmp_path)
    assert run.mode == "offline" and [call["mode"] for call in calls] == ["online", "offline"]
    assert calls[0]["settings"].init_timeout <= 10
    printed = capsys.readouterr()
    lines = (printed.out + printed.err).splitlines()
    assert lines == [
        f"wandb: could not reach the server, logging offline to {vit_lib.display_path(tmp_path / 'wandb')}"
    ]
    assert secret not in printed.out + printed.err
