"""Trust in corpus reading and preparation: duplicate and conflicting corpus entries, file ids that
cannot collide, writes that respect links, pipes and the umask, a journal that notices changed inputs,
paths outside the corpus root, and splits that lack a class.

The corpora are the small generated ones of test_data.py, changed here in the ways users change them.
"""

import json
import os
import re
import stat
from pathlib import Path

import pandas as pd
import pytest
from test_data import (
    DATASET,
    assert_same_dataset,
    assert_valid_prepared,
    clip,
    cut_in_half,
    make_asvspoof_corpus,
    make_folder_corpus,
    make_in_the_wild_corpus,
    prepare,
    read_prepared,
)

import vit_lib
from vit_audio import preparation, storage
from vit_audio.corpora import SplitLeakError
from vit_lib import SPLITS, AudioDataset


def skip_reasons(dataset_dir):
    """skipped.csv as {original_path: [reasons]}."""
    table = pd.read_csv(Path(dataset_dir) / "skipped.csv")
    reasons = {}
    for path, reason in zip(table["original_path"], table["reason"]):
        reasons.setdefault(path, []).append(reason)
    return reasons


def spy_on_prepared_files(monkeypatch):
    """The file ids _prepare_one is called for, in order."""
    calls = []
    real_prepare_one = vit_lib._prepare_one
    monkeypatch.setattr(vit_lib, "_prepare_one", lambda job: calls.append(job[2]) or real_prepare_one(job))
    return calls


# ---------------------------------------------------------------- 2. duplicate corpus rows
def test_a_repeated_meta_csv_row_is_used_once_and_listed_in_skipped_csv(tmp_path):
    root = make_in_the_wild_corpus(tmp_path / "itw")
    meta = pd.read_csv(root / "meta.csv")
    pd.concat([meta, meta.iloc[[0]]]).to_csv(root / "meta.csv", index=False)
    summary, _, _ = prepare(root, tmp_path / "cache", "in_the_wild")
    every = assert_valid_prepared(tmp_path / "cache" / DATASET, root, "in_the_wild", speakers_known=True)
    assert (every["original_path"] == "0.wav").sum() == 1, "a repeated row must not prepare the file twice"
    assert len(skip_reasons(tmp_path / "cache" / DATASET)["0.wav"]) == 1
    assert "listed 2 times" in skip_reasons(tmp_path / "cache" / DATASET)["0.wav"][0]
    assert summary["used_files"] == 12 and summary["skipped_files"] == 3 and summary["files"] == 15


def test_a_repeated_protocol_line_is_used_once_and_listed_in_skipped_csv(tmp_path):
    root = make_asvspoof_corpus(tmp_path / "LA")
    protocol = root / "ASVspoof2019_LA_cm_protocols" / "ASVspoof2019.LA.cm.dev.trl.txt"
    first_line = protocol.read_text().splitlines()[0]
    protocol.write_text(protocol.read_text() + first_line + "\n")
    summary, _, _ = prepare(root, tmp_path / "cache", "asvspoof2019_la")
    every = read_prepared(tmp_path / "cache" / DATASET)
    name = f"ASVspoof2019_LA_dev/flac/{first_line.split()[1]}.flac"
    assert (every["original_path"] == name).sum() == 1
    assert "listed 2 times" in skip_reasons(tmp_path / "cache" / DATASET)[name][0]
    assert summary["used_files"] == 12


def test_a_file_listed_as_bona_fide_and_as_spoof_is_listed_twice_and_not_used(tmp_path):
    root = make_in_the_wild_corpus(tmp_path / "itw", n_speakers=8)
    meta = pd.read_csv(root / "meta.csv")
    conflict = meta.iloc[[0]].assign(label="spoof")
    pd.concat([meta, conflict]).to_csv(root / "meta.csv", index=False)
    summary, _, _ = prepare(root, tmp_path / "cache", "in_the_wild")
    every = read_prepared(tmp_path / "cache" / DATASET)
    assert "0.wav" not in set(every["original_path"])
    reasons = skip_reasons(tmp_path / "cache" / DATASET)["0.wav"]
    assert len(reasons) == 2 and all("label" in reason for reason in reasons)
    assert summary["used_files"] == 15 and summary["skipped_files"] == 4


def test_a_real_file_linked_into_fake_is_a_label_conflict(tmp_path):
    root = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    (root / "fake" / "A01" / "copy_of_real.wav").symlink_to("../../real/spk00_real.wav")
    files, skipped = vit_lib.read_corpus("folder", root)
    assert not any(Path(p).resolve() == (root / "real" / "spk00_real.wav").resolve() for p in files["path"])
    conflicting = {where for where, reason in skipped if "label" in reason}
    assert conflicting == {"real/spk00_real.wav", "fake/A01/copy_of_real.wav"}


# ---------------------------------------------------------------- 3. file ids
def test_file_ids_of_long_names_sharing_40_characters_carry_64_bits_of_the_path_digest():
    stems = [
        "speaker_with_a_rather_long_recording_name_take_1",
        "speaker_with_a_rather_long_recording_name_take_2",
    ]
    ids = [preparation.make_file_id(f"real/{stem}.wav") for stem in stems]
    assert ids[0] != ids[1]
    for stem, file_id in zip(stems, ids):
        assert re.fullmatch(re.escape(stem[:40]) + r"_[0-9a-f]{16,}", file_id), file_id
    assert preparation.make_file_id("real/a.wav") != preparation.make_file_id("fake/a.wav")


def test_two_files_with_the_same_id_stop_preparation_naming_both(tmp_path, monkeypatch):
    root = make_folder_corpus(tmp_path / "corpus")
    real_file_id = preparation.make_file_id
    clashing = ("real/utt_000.wav", "real/utt_002.wav")
    monkeypatch.setattr(
        preparation, "make_file_id", lambda path: "clash" if path in clashing else real_file_id(path)
    )
    with pytest.raises(ValueError, match=r"real/utt_000\.wav.*real/utt_002\.wav"):
        prepare(root, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- 6. writes
def test_writing_through_a_link_replaces_the_file_it_points_to_and_keeps_the_link(tmp_path):
    target = tmp_path / "store" / "scores.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "scores.csv"
    link.symlink_to(target)
    storage.save_csv_atomic(link, pd.DataFrame(dict(a=[1, 2])))
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert target.read_text() == "a\n1\n2\n"
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_writing_to_a_named_pipe_streams_into_it(tmp_path):
    pipe = tmp_path / "summary.json"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # a reader is waiting, as `cat pipe` would be
    try:
        vit_lib.save_json_atomic(pipe, dict(eer=0.25))
        assert stat.S_ISFIFO(os.stat(pipe).st_mode), "the pipe was replaced by a regular file"
        assert json.loads(os.read(reader, 1 << 16)) == dict(eer=0.25)
    finally:
        os.close(reader)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_writing_to_dev_stdout_redirected_to_a_file_writes_into_that_file(tmp_path):
    redirected = tmp_path / "scores.txt"
    with open(redirected, "w") as stdout:  # what `> scores.txt` hands a program as its stdout
        vit_lib.save_json_atomic(f"/proc/self/fd/{stdout.fileno()}", dict(eer=0.25))
        assert os.fstat(stdout.fileno()).st_ino == redirected.stat().st_ino, (
            "the redirect target was replaced"
        )
    assert json.loads(redirected.read_text()) == dict(eer=0.25)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_get_the_mode_the_umask_allows(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        vit_lib.save_json_atomic(tmp_path / "new.json", {})
        existing = tmp_path / "existing.npy"
        existing.write_bytes(b"")
        storage.save_npy_atomic(existing, [1.0])
    finally:
        os.umask(previous)
    for path in (tmp_path / "new.json", existing):
        assert stat.S_IMODE(path.stat().st_mode) == mode, (path.name, oct(path.stat().st_mode))


# ---------------------------------------------------------------- 7. stale resume
def test_added_files_are_prepared_and_files_moved_to_another_split_follow_it(tmp_path, monkeypatch):
    root = make_folder_corpus(tmp_path / "corpus", n_speakers=12)
    speakers = pd.read_csv(root / "speakers.csv")
    later = speakers[speakers["speaker"] >= "speaker_08"]
    for name in later["file"]:  # moved aside and back: their timestamps stay as they were
        (tmp_path / "aside" / name).parent.mkdir(parents=True, exist_ok=True)
        os.rename(root / name, tmp_path / "aside" / name)
    speakers.drop(later.index).to_csv(root / "speakers.csv", index=False)
    prepare(root, tmp_path / "cache")
    before = read_prepared(tmp_path / "cache" / DATASET).set_index("original_path")["split"]

    for name in later["file"]:
        os.rename(tmp_path / "aside" / name, root / name)
    speakers.to_csv(root / "speakers.csv", index=False)
    calls = spy_on_prepared_files(monkeypatch)
    prepare(root, tmp_path / "cache")
    after = read_prepared(tmp_path / "cache" / DATASET).set_index("original_path")["split"]
    moved = [path for path in before.index if before[path] != after[path]]
    assert moved, "four more speakers should move some prepared files to another split"
    redo = [preparation.make_file_id(path) for path in list(later["file"]) + moved]
    assert sorted(calls) == sorted(redo), "exactly the new and the moved files are prepared again"
    for split in SPLITS:
        AudioDataset(tmp_path / "cache" / DATASET, split)
    prepare(root, tmp_path / "fresh")
    assert_same_dataset(tmp_path / "fresh" / DATASET, tmp_path / "cache" / DATASET)


def test_a_changed_speaker_pattern_redoes_the_files_whose_split_changed(tmp_path):
    root = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    prepare(root, tmp_path / "cache")
    before = read_prepared(tmp_path / "cache" / DATASET).set_index("original_path")["split"]
    prepare(root, tmp_path / "cache", speaker_pattern=r"^(spk\d+)_")
    after = read_prepared(tmp_path / "cache" / DATASET).set_index("original_path")["split"]
    assert (before != after[before.index]).any(), "a speaker split should move some files"
    assert_valid_prepared(tmp_path / "cache" / DATASET, root, "folder", speakers_known=True)
    prepare(root, tmp_path / "fresh", speaker_pattern=r"^(spk\d+)_")
    assert_same_dataset(tmp_path / "fresh" / DATASET, tmp_path / "cache" / DATASET)


def test_a_repaired_file_is_prepared_again_and_no_longer_listed_as_skipped(tmp_path, monkeypatch):
    root = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    broken = cut_in_half(clip(root / "fake" / "A01" / "spk03_repaired.wav", seed=5))
    prepare(root, tmp_path / "cache")
    assert "truncated" in skip_reasons(tmp_path / "cache" / DATASET)["fake/A01/spk03_repaired.wav"][0]
    clip(broken, seed=5)
    calls = spy_on_prepared_files(monkeypatch)
    summary, _, _ = prepare(root, tmp_path / "cache")
    assert calls == [preparation.make_file_id("fake/A01/spk03_repaired.wav")]
    assert summary["skipped_files"] == 0
    assert "fake/A01/spk03_repaired.wav" in set(read_prepared(tmp_path / "cache" / DATASET)["original_path"])


def test_a_removed_file_leaves_no_array_behind(tmp_path):
    root = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    prepare(root, tmp_path / "cache")
    (root / "fake" / "spk00_extra.wav").unlink()
    prepare(root, tmp_path / "cache")
    stale = preparation.make_file_id("fake/spk00_extra.wav")
    assert not list((tmp_path / "cache" / DATASET).glob(f"*/{stale}_*.npy"))
    prepare(root, tmp_path / "fresh")
    assert_same_dataset(tmp_path / "fresh" / DATASET, tmp_path / "cache" / DATASET)


# ---------------------------------------------------------------- 8. paths outside the corpus root
def test_links_inside_the_root_are_followed_and_links_leading_outside_are_listed(tmp_path):
    root = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    clip(root / "more_real" / "spk01_linked_folder.wav", seed=7)
    (root / "real" / "more").symlink_to("../more_real")
    (root / "real" / "loop").symlink_to(".")
    (root / "fake" / "up").symlink_to("..")  # a loop through the root: real/ must not appear under fake/
    elsewhere = tmp_path / "elsewhere"
    clip(elsewhere / "spk02_outside.wav", seed=8)
    clip(elsewhere / "folder" / "spk02_outside_folder.wav", seed=9)
    (root / "real" / "spk02_outside.wav").symlink_to(elsewhere / "spk02_outside.wav")
    (root / "fake" / "outside_folder").symlink_to(elsewhere / "folder")
    (root / "fake" / "spk02_dangling.wav").symlink_to(root / "nothing_here.wav")
    summary, _, _ = prepare(root, tmp_path / "cache", speaker_pattern=r"^(spk\d+)_")
    every = assert_valid_prepared(tmp_path / "cache" / DATASET, root, "folder", speakers_known=True)
    linked = every[every["original_path"].str.endswith("spk01_linked_folder.wav")]
    assert len(linked) == 1 and linked["label"].item() == 0
    reasons = skip_reasons(tmp_path / "cache" / DATASET)
    assert set(reasons) == {"real/spk02_outside.wav", "fake/outside_folder", "fake/spk02_dangling.wav"}
    assert "outside the corpus root" in reasons["real/spk02_outside.wav"][0]
    assert "outside the corpus root" in reasons["fake/outside_folder"][0]
    assert "does not exist" in reasons["fake/spk02_dangling.wav"][0]
    assert summary["used_files"] == 18


def test_meta_csv_paths_leaving_the_root_are_listed_not_a_crash(tmp_path):
    root = make_in_the_wild_corpus(tmp_path / "itw")
    outside = clip(tmp_path / "outside.wav", seed=3)
    inside_absolute = clip(root / "absolute_inside.wav", seed=4)
    meta = pd.read_csv(root / "meta.csv")
    extra = pd.DataFrame(
        [
            ("../outside.wav", "Famous Person 0", "spoof"),
            (str(outside), "Famous Person 0", "spoof"),
            (str(inside_absolute), "Famous Person 1", "spoof"),
        ],
        columns=meta.columns,
    )
    pd.concat([meta, extra]).to_csv(root / "meta.csv", index=False)
    summary, _, skipped = prepare(root, tmp_path / "cache", "in_the_wild")
    outside_rows = skipped[skipped["reason"].str.contains("outside the corpus root")]
    assert list(outside_rows["original_path"]) == ["../outside.wav", "../outside.wav"]
    assert "absolute_inside.wav" in set(read_prepared(tmp_path / "cache" / DATASET)["original_path"])
    assert summary["used_files"] == 13


def test_protocol_file_names_leaving_the_root_are_listed_not_a_crash(tmp_path):
    root = make_asvspoof_corpus(tmp_path / "LA")
    clip(tmp_path / "escaped.flac", seed=3)
    protocol = root / "ASVspoof2019_LA_cm_protocols" / "ASVspoof2019.LA.cm.eval.trl.txt"
    protocol.write_text(protocol.read_text() + "LA_0001 ../../../escaped - A07 spoof\n")
    summary, _, skipped = prepare(root, tmp_path / "cache", "asvspoof2019_la")
    assert skipped["reason"].str.contains("outside the corpus root").sum() == 1
    assert summary["used_files"] == 12


# ---------------------------------------------------------------- 10. split sanity
def test_a_dev_protocol_without_a_usable_line_stops_preparation_naming_the_val_split(tmp_path):
    root = make_asvspoof_corpus(tmp_path / "LA")  # an empty one is an error naming it (test_reliability.py)
    (root / "ASVspoof2019_LA_cm_protocols" / "ASVspoof2019.LA.cm.dev.trl.txt").write_text(
        "not a protocol line\n"
    )
    with pytest.raises(ValueError, match=r"'val' has no files"):
        prepare(root, tmp_path / "cache", "asvspoof2019_la")
    assert not (tmp_path / "cache").exists()


def test_too_few_speakers_for_three_splits_stops_preparation_naming_the_split(tmp_path):
    root = make_in_the_wild_corpus(tmp_path / "itw", n_speakers=2)
    files, _ = vit_lib.read_corpus("in_the_wild", root)
    empty = [s for s in SPLITS if s not in set(vit_lib.assign_splits(files, seed=42)["split"])]
    assert empty, "two speakers cannot fill three speaker-disjoint splits"
    with pytest.raises(ValueError, match=f"'{empty[0]}' has no files.*2 speakers"):
        prepare(root, tmp_path / "cache", "in_the_wild")


def test_a_fake_folder_of_unreadable_files_stops_preparation_naming_the_split_and_class(tmp_path):
    root = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    for path in (root / "fake").rglob("*.wav"):
        path.write_text("not audio")
    with pytest.raises(ValueError, match=r"'train' has no spoof \(fake\) files left.*skipped\.csv"):
        prepare(root, tmp_path / "cache")
    assert len(pd.read_csv(tmp_path / "cache" / DATASET / "skipped.csv")) == 9


@pytest.mark.parametrize("speaker_source", ["speakers.csv", "pattern"])
def test_a_file_without_a_speaker_is_named_not_reported_as_a_split_leak(tmp_path, speaker_source):
    if speaker_source == "speakers.csv":
        root = make_folder_corpus(tmp_path / "corpus")
        table = pd.read_csv(root / "speakers.csv")
        table.loc[table["file"] == "real/utt_004.wav", "speaker"] = None
        table.to_csv(root / "speakers.csv", index=False)
        missing, pattern = "real/utt_004.wav", None
    else:
        root = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
        os.rename(root / "real" / "spk02_real.wav", root / "real" / "speaker2.wav")
        missing, pattern = "real/speaker2.wav", r"^(spk\d+)_"
    try:
        prepare(root, tmp_path / "cache", speaker_pattern=pattern)
    except SplitLeakError as error:
        pytest.fail(f"reported as a split leak: {error}")
    except ValueError as error:
        assert missing in str(error) and "speaker" in str(error)
    else:
        pytest.fail("a file without a speaker was prepared without a word")


def test_a_speaker_pattern_that_matches_no_file_is_an_error(tmp_path):
    root = make_folder_corpus(tmp_path / "corpus", speakers_csv=False)
    with pytest.raises(ValueError, match=r"speaker pattern .*no_such_prefix.* matches none of the 17 files"):
        vit_lib.read_corpus("folder", root, speaker_pattern=r"^no_such_prefix(\d+)")
