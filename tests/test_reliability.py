"""Reliability under faults of the machine and hostile inputs: a full disk or no memory stops a run
without marking any file unusable, a recording at a tiny sample rate is refused before it can be
resampled into gigabytes, a resumed run must be the same run, speaker names are compared as people
write them, file names need not be UTF-8, and ffmpeg reads nothing but the file it is given.
"""

import contextlib
import errno
import io
import os
import shutil
import signal
import subprocess

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from test_data import (
    DATASET,
    assert_same_dataset,
    make_folder_corpus,
    prepare,
    read_prepared,
)
from test_trust_data import skip_reasons

import vit_cli as cli
import vit_lib
from vit_audio import audio_io


def fail_writes_after(monkeypatch, count, error):
    """np.save (every prepared array goes through it) raises `error` from its `count`-th call on."""
    real_save, calls = np.save, []

    def save(handle, array):
        calls.append(1)
        if len(calls) > count:
            raise error
        real_save(handle, array)

    monkeypatch.setattr(vit_lib.np, "save", save)


# ---------------------------------------------------------------- 1. faults of the machine
@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), OSError("16384 requested and 4064 written")]
)
def test_a_full_disk_stops_preparation_and_the_rerun_prepares_every_file(tmp_path, monkeypatch, error):
    corpus = make_folder_corpus(tmp_path / "corpus")
    fail_writes_after(monkeypatch, 3, error)
    with pytest.raises(vit_lib.MachineFault, match="cannot write .*npy"):
        prepare(corpus, tmp_path / "cache")
    monkeypatch.undo()
    summary, _, skipped = prepare(corpus, tmp_path / "cache")
    clean, _, _ = prepare(corpus, tmp_path / "clean")
    assert summary == {**clean, "dataset_dir": summary["dataset_dir"]}
    assert not skipped["reason"].str.contains("OSError|written|space").any()
    assert_same_dataset(tmp_path / "cache" / DATASET, tmp_path / "clean" / DATASET)


def test_running_out_of_memory_stops_preparation_and_marks_no_file(tmp_path, monkeypatch):
    corpus = make_folder_corpus(tmp_path / "corpus")
    real_clip_spectrograms = vit_lib.clip_spectrograms

    def clip_spectrograms(path, *args):
        if "utt_005" in str(path):
            raise MemoryError()
        return real_clip_spectrograms(path, *args)

    monkeypatch.setattr(vit_lib, "clip_spectrograms", clip_spectrograms)
    with pytest.raises(vit_lib.MachineFault, match=r"utt_005\.wav: out of memory"):
        prepare(corpus, tmp_path / "cache")
    monkeypatch.undo()
    prepare(corpus, tmp_path / "cache")
    assert "fake/A01/utt_005.wav" in set(read_prepared(tmp_path / "cache" / DATASET)["original_path"])


def test_a_killed_worker_stops_preparation_with_one_message(tmp_path, monkeypatch):
    corpus = make_folder_corpus(tmp_path / "corpus")
    real_clip_spectrograms = vit_lib.clip_spectrograms

    def clip_spectrograms(path, *args):  # runs in a forked worker
        if "utt_005" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_clip_spectrograms(path, *args)

    monkeypatch.setattr(vit_lib, "clip_spectrograms", clip_spectrograms)
    with pytest.raises(vit_lib.MachineFault, match="worker was killed"):
        prepare(corpus, tmp_path / "cache", num_workers=2)


def test_the_command_line_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    corpus = make_folder_corpus(tmp_path / "corpus")
    fail_writes_after(monkeypatch, 0, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(SystemExit) as stopped:
        cli.main(
            [
                "prepare",
                str(corpus),
                "--dataset",
                DATASET,
                "--cache-dir",
                str(tmp_path / "cache"),
                "--num-workers",
                "1",
            ]
        )
    message = capsys.readouterr().err
    assert stopped.value.code == 1
    assert len(message.strip().splitlines()) == 1 and "fault of the machine" in message
    assert "No space left on device" in message


def test_scoring_stops_on_a_fault_of_the_machine_instead_of_listing_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(vit_lib, "load_model", lambda path: (None, None))
    monkeypatch.setattr(
        vit_lib, "score_audio_file", lambda *args, **kwargs: (_ for _ in ()).throw(MemoryError())
    )
    corpus = make_folder_corpus(tmp_path / "corpus")
    with pytest.raises(vit_lib.MachineFault, match="out of memory"):
        vit_lib.score_files("model.pth", [corpus / "real"], tmp_path / "scores.txt", progress=False)
    assert not (tmp_path / "scores.txt").exists()


# ---------------------------------------------------------------- 2. tiny sample rates
def test_a_recording_below_the_minimum_sample_rate_is_listed_not_resampled(tmp_path):
    corpus = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    sf.write(corpus / "real" / "spk00_one_hertz.wav", np.full(3600, 0.1, np.float32), 1)  # an hour at 1 Hz
    prepare(corpus, tmp_path / "cache", speaker_pattern=r"^(spk\d+)_")
    assert skip_reasons(tmp_path / "cache" / DATASET)["real/spk00_one_hertz.wav"] == [
        f"sample rate 1 Hz is below the {audio_io.MIN_SAMPLE_RATE} Hz minimum"
    ]
    assert not any((tmp_path / "cache" / DATASET).rglob("spk00_one_hertz*.npy"))
    with pytest.raises(vit_lib.AudioError, match="below the"):
        vit_lib.load_audio(corpus / "real" / "spk00_one_hertz.wav", 16000)


def test_a_narrowband_telephone_recording_is_still_used(tmp_path):
    path = tmp_path / "phone.wav"
    sf.write(path, np.sin(np.arange(16000) / 8000 * 2 * np.pi * 300).astype(np.float32), 8000)
    assert len(vit_lib.load_audio(path, 16000)) == 32000
    assert sum(len(block) for block in vit_lib.stream_audio(path, 16000)) == 32000


# ---------------------------------------------------------------- 3. resume continues the same run only
def resumable_run(prepared, tmp_path, data_config=vit_lib.DataConfig(), cache=None, **overrides):
    config = vit_lib.TrainingConfig(
        **{
            **dict(
                dataset_name="vit_balanced_dataset",
                epochs=1,
                batch_size=8,
                cache_dir=str(cache or prepared.cache),
                checkpoint_dir=str(tmp_path),
                results_dir=str(tmp_path),
                run_name="resumable",
                wandb_mode="disabled",
                progress=False,
                lr_schedule="constant",
            ),
            **overrides,
        }
    )
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        vit_lib.run_training(config, data_config)
    return printed.getvalue()


def test_resume_refuses_another_runs_checkpoint_and_names_each_difference(prepared, tmp_path):
    resumable_run(prepared, tmp_path)
    other = vit_lib.make_fixture_corpus(tmp_path / "other", n_speakers=4, clips_per_speaker=3)
    with contextlib.redirect_stdout(io.StringIO()):
        vit_lib.prepare_dataset(
            other,
            "vit_balanced_dataset",
            cache_dir=tmp_path / "other_cache",
            num_workers=1,
            progress=False,
            split_fractions=(0.5, 0.25, 0.25),
        )
    with pytest.raises(ValueError) as refused:
        resumable_run(
            prepared,
            tmp_path,
            vit_lib.DataConfig(SUBTRACT_ROW_MEANS=False),
            cache=tmp_path / "other_cache",
            resume=True,
            seed=7,
            learning_rate=1e-3,
        )
    message = str(refused.value)
    assert "is another run's, so it is not resumed" in message
    for difference in (
        "seed 42 -> 7",
        "learning_rate 0.0005 -> 0.001",
        "SUBTRACT_ROW_MEANS True -> False",
        "another dataset",
    ):
        assert difference in message


def test_resume_continues_the_same_run_with_more_epochs_at_a_constant_rate(prepared, tmp_path):
    resumable_run(prepared, tmp_path)
    assert "Resuming from epoch 1" in resumable_run(prepared, tmp_path, resume=True, epochs=2, num_workers=1)
    with pytest.raises(ValueError, match="epochs 2 -> 3"):
        resumable_run(prepared, tmp_path, resume=True, epochs=3, lr_schedule="warmup_cosine")


# ---------------------------------------------------------------- 4. speaker names
def respell(name, index):
    """One person's name as people type it: as it is, with stray spaces, in capitals, with a tab."""
    return [name, f"{name} ", name.upper(), f" {name.replace('_', ' _ ')}\t"][index % 4].replace(" _ ", "_")


def test_speaker_names_differing_in_whitespace_or_case_are_one_person_in_one_split(tmp_path):
    corpus = make_folder_corpus(tmp_path / "corpus")
    table = pd.read_csv(corpus / "speakers.csv")
    table["speaker"] = [respell(name, index) for index, name in enumerate(table["speaker"])]
    table.to_csv(corpus / "speakers.csv", index=False)
    files, _ = vit_lib.read_corpus("folder", corpus)
    assert files["speaker"].nunique() == 8
    assert sorted(files["speaker"].str.casefold().unique()) == [f"speaker_{s:02d}" for s in range(8)]
    prepare(corpus, tmp_path / "cache")
    prepared = read_prepared(tmp_path / "cache" / DATASET)
    assert prepared.groupby("speaker")["split"].nunique().max() == 1
    assert prepared["speaker"].nunique() == 8


def test_in_the_wild_speaker_names_are_normalised_too(tmp_path):
    from test_data import make_in_the_wild_corpus

    corpus = make_in_the_wild_corpus(tmp_path / "corpus")
    meta = pd.read_csv(corpus / "meta.csv")
    meta["speaker"] = [
        f"  {name.lower()}" if index % 2 else name for index, name in enumerate(meta["speaker"])
    ]
    meta.to_csv(corpus / "meta.csv", index=False)
    files, _ = vit_lib.read_corpus("in_the_wild", corpus)
    assert sorted(files["speaker"].unique()) == [f"Famous Person {s}" for s in range(6)]


# ---------------------------------------------------------------- 5. file names that are not UTF-8
def test_a_file_name_that_is_not_utf8_is_listed_by_name_and_the_rest_prepared(tmp_path):
    corpus = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    latin1_name = os.fsdecode(b"spk01_caf\xe9.wav")  # e-acute in Latin-1: no UTF-8 decoding of it exists
    shutil.copy(corpus / "real" / "spk01_real.wav", corpus / "real" / latin1_name)
    summary, _, _ = prepare(corpus, tmp_path / "cache", speaker_pattern=r"^(spk\d+)_")
    reasons = skip_reasons(tmp_path / "cache" / DATASET)
    assert reasons == {"real/spk01_caf\\xe9.wav": ["its name is not valid UTF-8; rename it to use it"]}
    assert summary["used_files"] == 17


def test_scoring_gives_ids_the_asvspoof_reader_keeps_for_a_leading_hash_and_a_non_utf8_name(tmp_path):
    from test_trust_inference import score, tiny_checkpoint, write_wav

    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth", threshold=0.0)
    inputs = tmp_path / "in"
    for seed, name in enumerate(["#first.wav", "cafe.wav", "plain.wav"]):
        write_wav(inputs / name, 2.0, seed=seed)
    os.rename(inputs / "cafe.wav", os.fsencode(inputs) + b"/caf\xe9.wav")  # soundfile cannot write that name
    scored, failures, printed = score(checkpoint, [inputs], tmp_path / "scores.txt")
    assert (scored, failures) == (3, [])
    ids = np.genfromtxt(tmp_path / "scores.txt", dtype=str, usecols=0)
    assert sorted(ids) == ["%23first", "caf%E9", "plain"]
    assert sorted(vit_lib.read_score_file(tmp_path / "scores.txt")["file_id"]) == sorted(ids)


# ---------------------------------------------------------------- 6. ffmpeg reads the file it is given
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_a_playlist_named_aac_cannot_make_ffmpeg_read_another_file(tmp_path):
    sf.write(
        tmp_path / "outside.wav", np.sin(np.arange(32000) / 16000 * 2 * np.pi * 200).astype(np.float32), 16000
    )
    outside = tmp_path / "outside.aac"  # a segment ffmpeg's playlist reader accepts
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(tmp_path / "outside.wav"), "-c:a", "aac", str(outside)],
        check=True,
    )
    playlist = tmp_path / "corpus" / "playlist.aac"
    playlist.parent.mkdir()
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nfile:{outside}\n#EXT-X-ENDLIST\n")
    with pytest.raises(vit_lib.AudioError, match="ffmpeg cannot decode"):
        vit_lib.load_audio(playlist, 16000)
    with pytest.raises(vit_lib.AudioError, match="ffmpeg cannot decode"):
        list(vit_lib.stream_audio(playlist, 16000))


def test_every_format_ffmpeg_decodes_has_its_demuxer_named():
    assert audio_io.FFMPEG_EXTENSIONS == set(audio_io.FFMPEG_DEMUXERS)
    command = audio_io._ffmpeg_input(vit_lib.Path("clip.M4A"))
    assert command[:4] == ["-protocol_whitelist", "file", "-f", "mov"]


# ---------------------------------------------------------------- the smaller ones
def run_cli(argv, capsys):
    """(exit status, what went to stderr) of the command line."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "option",
    [
        ["--epochs", "0"],
        ["--learning-rate", "-1"],
        ["--batch-size", "0"],
        ["--optimizer", "sgd"],
        ["--mixed-precision", "sometimes"],
    ],
)
def test_a_bad_training_option_is_one_line_and_status_2(tmp_path, capsys, option):
    status, message = run_cli(["train", "--cache-dir", str(tmp_path), *option], capsys)
    assert (
        status == 2 and len(message.strip().splitlines()) == 1 and option[0][2:] in message.replace("_", "-")
    )


def test_training_without_a_dataset_is_one_line_and_status_2(tmp_path, capsys):
    status, message = run_cli(
        ["train", "--cache-dir", str(tmp_path / "nothing"), "--wandb-mode", "disabled"], capsys
    )
    assert status == 2 and len(message.strip().splitlines()) == 1 and "nothing" in message


@pytest.mark.parametrize("pattern, problem", [(r"spk\d+", "has no group"), ("(", "not a regular expression")])
def test_a_bad_speaker_pattern_is_named(tmp_path, capsys, pattern, problem):
    corpus = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    status, message = run_cli(
        ["prepare", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--speaker-pattern", pattern], capsys
    )
    assert status == 2 and problem in message and len(message.strip().splitlines()) == 1


def broken_checkpoint(tmp_path, change):
    from test_trust_inference import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "tiny.pth", threshold=0.0)
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda c: c["model_state"].pop("mlp_head.1.weight"), "do not fit its model.*Missing key"),
        (lambda c: c["model_state"].update(extra=torch.zeros(1)), "do not fit its model.*Unexpected key"),
        (
            lambda c: c["model_state"].update({"mlp_head.1.bias": torch.zeros(3)}),
            "do not fit its model.*size mismatch",
        ),
        (
            lambda c: c["model_state"]["mlp_head.1.bias"].fill_(float("nan")),
            r"non-finite \(NaN or inf\) weights",
        ),
        (lambda c: c.update(eer_threshold=float("nan")), "verdict threshold is nan"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_problem(tmp_path, change, problem):
    path = broken_checkpoint(tmp_path, change)
    with pytest.raises(ValueError, match=problem):
        vit_lib.load_model(path)


def test_scoring_never_writes_over_the_checkpoint_or_an_input(tmp_path):
    from test_trust_inference import tiny_checkpoint, write_wav

    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth", threshold=0.0)
    clip = write_wav(tmp_path / "in" / "a.wav", 2.0)
    for output, what in ((checkpoint, "the checkpoint"), (clip, "an input")):
        before = output.read_bytes()
        with pytest.raises(ValueError, match=f"is {what}; it would be overwritten"):
            vit_lib.score_files(checkpoint, [tmp_path / "in"], output, progress=False)
        assert output.read_bytes() == before


def test_an_eer_of_nan_scores_is_an_error_not_a_number():
    with pytest.raises(ValueError, match="1 NaN score"):
        vit_lib.equal_error_rate([0.5, float("nan")], [0.1, 0.2])
    files = pd.DataFrame(
        dict(label=[0, 0, 1, 1], score=[1.0, float("nan"), 0.0, 0.1], attack=["-", "-", "A", "B"])
    )
    with pytest.raises(ValueError, match="NaN score"):
        vit_lib.per_attack_eer(files)


def test_a_training_array_with_a_nan_is_dropped_and_named(prepared, tmp_path):
    dataset_dir = tmp_path / "dataset"
    shutil.copytree(prepared.cache / "vit_balanced_dataset", dataset_dir)
    first = pd.read_csv(dataset_dir / "train" / "metadata.csv")["npy_path"].iat[0]
    array = np.load(dataset_dir / "train" / first)
    array[0, 3, 5] = np.nan
    np.save(dataset_dir / "train" / first, array)
    dataset = vit_lib.AudioDataset(dataset_dir, "train")
    with pytest.warns(UserWarning, match=f"{first}: non-finite"):
        assert dataset[0] is None
    assert dataset.dropped.value == 1


def test_a_rerun_notices_a_deleted_or_torn_array_and_removes_a_killed_runs_temporaries(tmp_path):
    corpus = make_folder_corpus(tmp_path / "corpus")
    prepare(corpus, tmp_path / "clean")
    prepare(corpus, tmp_path / "cache")
    dataset_dir = tmp_path / "cache" / DATASET
    arrays = sorted((dataset_dir / "train").glob("*.npy"))
    arrays[0].unlink()
    arrays[1].write_bytes(arrays[1].read_bytes()[:1000])
    abandoned = dataset_dir / "train" / ".spk_000.npy.abc123.tmp"
    abandoned.write_bytes(b"half an array")
    os.utime(abandoned, (0, 0))
    fresh = dataset_dir / "train" / ".being_written.npy.def456.tmp"  # another preparation's, still running
    fresh.write_bytes(b"in progress")
    prepare(corpus, tmp_path / "cache")
    assert not abandoned.exists() and fresh.exists()
    fresh.unlink()
    assert_same_dataset(dataset_dir, tmp_path / "clean" / DATASET)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty file"),
        (
            "file,speaker,label\n0.wav,Jos\xe9,spoof\n".encode("latin-1"),
            "not UTF-8 text \\(line 2, byte 0xe9\\)",
        ),
    ],
)
def test_an_empty_or_latin1_list_file_is_named(tmp_path, content, problem):
    from test_data import make_asvspoof_corpus, make_in_the_wild_corpus

    wild = make_in_the_wild_corpus(tmp_path / "wild")
    (wild / "meta.csv").write_bytes(content)
    with pytest.raises(ValueError, match=f"meta.csv: {problem}"):
        vit_lib.read_corpus("in_the_wild", wild)
    asvspoof = make_asvspoof_corpus(tmp_path / "asvspoof")
    protocol = next((asvspoof / "ASVspoof2019_LA_cm_protocols").glob("*.trn.txt"))
    protocol.write_bytes(content)
    with pytest.raises(ValueError, match=f"{protocol.name}: {problem}"):
        vit_lib.read_corpus("asvspoof2019_la", asvspoof)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_output_device_is_one_line(tmp_path, capsys):
    from test_trust_inference import tiny_checkpoint, write_wav

    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth", threshold=0.0)
    write_wav(tmp_path / "in" / "a.wav", 2.0)
    status, message = run_cli(
        ["score", str(checkpoint), str(tmp_path / "in"), "--output", "/dev/full"], capsys
    )
    assert status == 1 and len(message.strip().splitlines()) == 1
    assert "cannot write /dev/full: No space left on device" in message


def test_a_validation_split_of_one_class_stops_training_in_one_line(prepared, tmp_path, capsys):
    shutil.copytree(prepared.cache / "vit_balanced_dataset", tmp_path / "vit_balanced_dataset")
    table = pd.read_csv(tmp_path / "vit_balanced_dataset" / "val" / "metadata.csv")
    table[table["label"] == 0].to_csv(tmp_path / "vit_balanced_dataset" / "val" / "metadata.csv", index=False)
    status, message = run_cli(
        [
            "train",
            "--cache-dir",
            str(tmp_path),
            "--dataset",
            "vit_balanced_dataset",
            "--wandb-mode",
            "disabled",
            "--epochs",
            "1",
        ],
        capsys,
    )
    assert status == 2 and len(message.strip().splitlines()) == 1
    assert "val/metadata.csv: the val split has no Fake segments" in message
