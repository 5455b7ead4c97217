"""Preparation's bookkeeping: file ids, the journal that makes a rerun redo only what changed, the
worker set-up, and the tables a prepared dataset is read through (metadata.csv per split,
skipped.csv, split_audit.csv, normalization.json)."""

import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from vit_audio.corpora import SPLITS, check_split_classes, split_audit
from vit_audio.storage import (
    MachineFault,
    atomic_write,
    display_path,
    save_csv_atomic,
    save_json_atomic,
    save_npy_atomic,
    write_fault,
)

# What preparation records about each clip, for the shortcut audit: none of it says whether the voice
# is synthetic, so a detector that can be matched by these numbers has learned the corpus.
CLIP_FACTS = [
    "duration_s",
    "loudness_lufs",
    "leading_silence_s",
    "original_sample_rate",
    "dc_offset",
    "noise_floor_db",
    "high_band_energy_ratio",
    "spectral_rolloff_hz",
]


METADATA_COLUMNS = [
    "npy_path",
    "original_path",
    "label",
    "segment_index",
    "start_s",
    "speaker",
    "attack",
    "source",
    "prompt_speaker",  # written only by a corpus that names them (vit_audio.corpora.CORPUS_COLUMNS)
    "file_id",
    *CLIP_FACTS,
    "filled_fraction",
]


def make_file_id(relative_path):
    """Readable and unique: the stem's start plus 64 bits of SHA-256 of the whole relative path
    (a chance collision among a million files is about 3e-8, and check_file_ids catches it)."""
    digest = hashlib.sha256(relative_path.encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', Path(relative_path).stem)[:40]}_{digest}"


def check_file_ids(files):
    """The id names a file's .npy arrays: two files with one id would share them."""
    clashes = files[files["file_id"].duplicated(keep=False)]
    if len(clashes):
        file_id, group = next(iter(clashes.groupby("file_id", sort=False)))
        raise ValueError(
            f"{' and '.join(group['relative_path'])} get the same file id {file_id!r}; rename one of them"
        )


def _made_from_record(path, split, settings_digest):
    """What a file's arrays were made from. A rerun redoes the file when any of it changed: a file
    replaced, repaired or touched gets a new size or modification time, and a new speaker pattern or
    added files can move it to another split. (Content hashes would mean reading the whole corpus.)"""
    stat = Path(path).stat()
    return dict(split=split, size=stat.st_size, mtime_ns=stat.st_mtime_ns, settings=settings_digest)


def settings_digest(settings):
    """What a journal entry records of the settings its file was prepared with."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _same_sources(made_from, settings):
    """A file's `made_from` record, and the same as journals wrote it while the segment settings still
    held a switch that never acted (apply_waveform_augmentation): such a file need not be prepared again."""
    segment_settings = {**settings["model_config"], "apply_waveform_augmentation": False}
    return [
        made_from,
        {**made_from, "settings": settings_digest({**settings, "model_config": segment_settings})},
    ]


def _single_threaded():
    """Worker processes already use every core: nested BLAS/OpenMP threads only contend."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    import torch

    torch.set_num_threads(1)


def save_segments(specs, facts, split_dir, file_id):
    segments, total, total_sq, count = [], 0.0, 0.0, 0
    for index, (start, spec, filled) in enumerate(specs):
        npy_path = f"{file_id}_{index:03d}.npy"
        save_npy_atomic(Path(split_dir) / npy_path, spec[None])
        segments.append(
            dict(
                npy_path=npy_path,
                npy_bytes=(Path(split_dir) / npy_path).stat().st_size,
                segment_index=index,
                start_s=round(start, 3),
                filled_fraction=round(filled, 4),
                **facts,
            )
        )
        spec64 = spec.astype(np.float64)  # float32 sums of 32k values drift in the 8th digit
        total, total_sq, count = (
            total + float(spec64.sum()),
            total_sq + float((spec64**2).sum()),
            count + spec.size,
        )
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
LOAD_TIME_SETTINGS = (
    "NUM_TIME_MASKS",
    "NUM_FREQ_MASKS",
    "TIME_MASK_MAX_WIDTH",
    "FREQ_MASK_MAX_WIDTH",
    "USE_RANDOM_CROPPING",
    "SUBTRACT_ROW_MEANS",
)


def without_load_time(settings):
    return {k: v for k, v in settings.items() if k not in LOAD_TIME_SETTINGS}


def _written_settings(settings_path):
    """preparation.json as check_settings compares it (files written before the load-time settings
    were left out, or with the segment setting that never acted, still match)."""
    written = json.loads(settings_path.read_text())
    written["data_config"] = without_load_time(written["data_config"])
    written["model_config"].pop("apply_waveform_augmentation", None)
    return written


def check_settings(out_dir, settings):
    """Refuse to add to a dataset folder prepared with other settings: its arrays would mix them."""
    settings_path = Path(out_dir) / "preparation.json"
    if settings_path.is_file() and _written_settings(settings_path) != settings:
        raise ValueError(
            f"{settings_path} was written with other settings; delete {out_dir} "
            f"or choose another cache_dir to prepare this corpus anew"
        )


def prepare_files(
    files,
    corpus_root,
    out_dir,
    settings,
    work,
    job_settings,
    num_workers=None,
    progress=True,
    desc="Preparing",
):
    """Run `work((path, split folder, file id, *job_settings))` on every file of `files` (a corpus table
    with its splits assigned) whose arrays are not already in `out_dir` from an earlier run with the
    same settings; returns each file's result by file id, journaled in progress.jsonl as it arrives.

    Parallel over `num_workers` forked processes (None: one per core), resumable (a rerun redoes only
    the files added, changed or moved to another split since their journal entry: see
    _made_from_record). A `work` result with a `fault` (a fault of the machine) stops the run, with
    that file left out of the journal so that the next run prepares it."""
    files["relative_path"] = [
        Path(p).resolve().relative_to(corpus_root.resolve()).as_posix() for p in files["path"]
    ]
    files["file_id"] = files["relative_path"].map(make_file_id)
    check_file_ids(files)
    save_json_atomic(out_dir / "preparation.json", settings)

    made_from = {
        row.file_id: _made_from_record(row.path, row.split, settings_digest(settings))
        for row in files.itertuples()
    }
    journal_path = out_dir / "progress.jsonl"
    journal_entries = _read_journal(journal_path)
    done = {
        file_id: entry
        for file_id, entry in journal_entries.items()
        if file_id in made_from
        and entry.get("made_from") in _same_sources(made_from[file_id], settings)
        and _arrays_intact(out_dir / made_from[file_id]["split"], entry)
    }
    _remove_abandoned_temporaries(out_dir)
    jobs = [
        (row.path, str(out_dir / row.split), row.file_id, *job_settings)
        for row in files.itertuples()
        if row.file_id not in done
    ]
    if jobs:
        paths = dict(zip(files["file_id"], files["path"]))
        _run_jobs(
            jobs,
            work,
            journal_path,
            made_from,
            done,
            paths,
            num_workers or os.cpu_count() or 1,
            progress,
            desc,
        )
    if jobs or len(journal_entries) != len(done):  # keep only what the dataset is made of
        with atomic_write(journal_path, "w") as journal:
            journal.writelines(json.dumps(done[file_id]) + "\n" for file_id in files["file_id"])
    return done


def _run_jobs(jobs, work, journal_path, made_from, done, paths, workers, progress, desc):
    import librosa  # noqa: F401  imported once here so forked workers inherit it

    with open(journal_path, "a") as journal, contextlib.ExitStack() as stack:
        if journal.tell():  # a torn last line (crash mid-write) must not swallow the next entry
            with open(journal_path, "rb") as tail:
                tail.seek(-1, os.SEEK_END)
                if tail.read(1) != b"\n":
                    journal.write("\n")
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_single_threaded)
            )
            results = pool.map(work, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers))))
        else:  # one BLAS thread as in the workers: the arrays must not depend on num_workers
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(1))
            results = map(work, jobs)
        try:
            for result in tqdm(results, total=len(jobs), desc=desc, disable=not progress):
                if "fault" in result:
                    raise MachineFault(
                        f"stopped while preparing {display_path(paths[result['file_id']])}: {result['fault']}"
                    )
                result["made_from"] = made_from[result["file_id"]]
                journal.write(json.dumps(result) + "\n")
                journal.flush()
                done[result["file_id"]] = result
        except BrokenProcessPool:
            raise MachineFault(
                "a preparation worker was killed (by the system, most often for lack of "
                "memory); try fewer workers"
            ) from None
        except OSError as error:  # the journal
            raise write_fault(journal_path, error) from None


def write_dataset_tables(out_dir, files, done, reader_skips, norm_epsilon):
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
            segment_rows.append(
                dict(
                    split=row.split,
                    original_path=row.relative_path,
                    label=row.label,
                    speaker=row.speaker,
                    attack=row.attack,
                    source=row.source,
                    prompt_speaker=row.prompt_speaker,
                    file_id=row.file_id,
                    **segment,
                )
            )
    metadata = pd.DataFrame(segment_rows, columns=["split"] + METADATA_COLUMNS)
    metadata = metadata.sort_values(["split", "original_path", "segment_index"]).reset_index(drop=True)
    skipped = pd.DataFrame(skipped, columns=["original_path", "reason"])
    save_csv_atomic(out_dir / "skipped.csv", skipped)
    check_split_classes(
        metadata,
        "files left after decoding",
        f"the others are listed with their reasons in {display_path(out_dir / 'skipped.csv')}",
    )
    columns = [c for c in METADATA_COLUMNS if c != "prompt_speaker" or metadata[c].notna().any()]
    for split in SPLITS:
        save_csv_atomic(out_dir / split / "metadata.csv", metadata.loc[metadata["split"] == split, columns])
    _remove_stale_arrays(out_dir, metadata)
    audit = split_audit(metadata) if len(metadata) else pd.DataFrame()
    save_csv_atomic(out_dir / "split_audit.csv", audit)
    if stats[2]:
        mean = stats[0] / stats[2]
        std = math.sqrt(max(stats[1] / stats[2] - mean**2, 0.0))
        save_json_atomic(out_dir / "normalization.json", dict(mean=mean, std=std, eps=norm_epsilon))
    summary = dict(
        files=len(files) + len(reader_skips),
        used_files=len(files) - (len(skipped) - len(reader_skips)),
        skipped_files=len(skipped),
        segments=len(metadata),
        segments_per_split={s: int((metadata["split"] == s).sum()) for s in SPLITS},
        dataset_dir=display_path(out_dir),
    )
    print(
        f"Prepared {summary['segments']} segments from {summary['used_files']} files; "
        f"skipped {summary['skipped_files']} (listed in {display_path(out_dir / 'skipped.csv')})"
    )
    return summary, audit, skipped


def _remove_stale_arrays(out_dir, metadata):
    """Delete the .npy files a split folder holds but its metadata no longer lists (a file removed
    from the corpus, moved to another split, skipped now, or now shorter), so that the folders hold
    exactly the dataset."""
    listed = {split: set(metadata.loc[metadata["split"] == split, "npy_path"]) for split in SPLITS}
    stale = [
        path for split in SPLITS for path in (out_dir / split).glob("*.npy") if path.name not in listed[split]
    ]
    for path in stale:
        path.unlink()
    if stale:
        print(f"Removed {len(stale)} .npy file(s) no longer in the dataset")
