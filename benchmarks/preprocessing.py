"""Preprocessing speed: seconds of audio prepared per second of wall time per core.

Builds a deterministic synthetic corpus (vit_lib.make_fixture_corpus: 22.05 kHz 16-bit wav, real
clips and their vocoded fakes, 2-12 s each) of at least --min-minutes of audio, then runs
prepare_dataset on it with 1 and with 2 worker processes, each --repeats times into a fresh cache
folder, and times the whole call (corpus scan, forking the workers, decode, resample, loudness,
log-mel, .npy and table writes; median reported). The one-off start-up of the first clip in a
process (imports, numba cache) is measured once and kept out of the timed runs; the fixed cost
(a rerun on a finished cache, which processes no file) is shown beside them. "Per core" divides by
min(processes, CPUs). With --profile, or when the speed is below --target, it also profiles the
per-file work (clip_to_spectrograms and the .npy writes) in this process: time per stage and cProfile.

    .venv/bin/python benchmarks/preprocessing.py
    .venv/bin/python benchmarks/preprocessing.py --workers 1 2 --profile --json results/preprocessing.json
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from load_monitor import cpu_snapshot, other_load  # noqa: E402

import vit_lib  # noqa: E402
from vit_audio import corpora, storage  # noqa: E402


def usable(corpus):
    """The fixture's audio files less its two deliberately unusable ones (silent, not audio)."""
    return [p for p in corpora.audio_files(corpus) if p.stem not in ("spk00_silent", "spk00_not_audio")]


def build_corpus(folder, min_seconds, seed):
    """Fixture corpora with more speakers until they hold `min_seconds` of usable audio."""
    speakers = 12
    while True:
        corpus = vit_lib.make_fixture_corpus(
            Path(folder) / f"corpus_{speakers}", n_speakers=speakers, clips_per_speaker=4, seed=seed
        )
        seconds = sum(sf.info(p).duration for p in usable(corpus))
        if seconds >= min_seconds:
            return corpus, seconds
        speakers = int(speakers * min_seconds / seconds) + 1


def time_prepare(corpus, cache_dir, workers):
    """Wall seconds of prepare_dataset into a fresh `cache_dir`, and the audio it prepared."""
    start = time.perf_counter()
    summary, _, _ = vit_lib.prepare_dataset(
        corpus, "vit_balanced_dataset", "folder", cache_dir, num_workers=workers, progress=False
    )
    wall = time.perf_counter() - start
    metadata = vit_lib.read_dataset_metadata(Path(cache_dir) / "vit_balanced_dataset")
    audio_seconds = float(metadata.drop_duplicates("original_path")["duration_s"].sum())
    return wall, audio_seconds, summary


def bench_workers(corpus, work, workers, repeats):
    """Median wall time over `repeats` fresh caches, and the fixed cost: a rerun on a finished cache
    (corpus scan, splits, tables; no file is processed again)."""
    walls, snapshot = [], cpu_snapshot()
    for repeat in range(repeats):
        wall, audio_seconds, summary = time_prepare(corpus, Path(work) / f"cache_{workers}_{repeat}", workers)
        walls.append(wall)
    fixed, _, _ = time_prepare(corpus, Path(work) / f"cache_{workers}_{repeats - 1}", workers)
    wall = statistics.median(walls)
    return dict(
        workers=workers,
        files=summary["used_files"],
        segments=summary["segments"],
        audio_seconds=audio_seconds,
        wall_s=wall,
        walls_s=walls,
        fixed_s=fixed,
        audio_s_per_s=audio_seconds / wall,
        audio_s_per_s_per_core=audio_seconds / wall / min(workers, os.cpu_count()),
        other_cpu_share=other_load(snapshot, cpu_snapshot()),
    )


def stage_times(
    paths,
    out_dir,
    segment_config=vit_lib.SEGMENT_CONFIGS["vit_balanced_dataset"],
    data_config=vit_lib.DataConfig(),
):
    """clip_to_spectrograms (and _prepare_one's .npy write) split into its stages, in this process.
    Mirrors vit_lib.clip_to_spectrograms step by step; the sum is printed beside the real call's time."""
    import librosa

    totals = dict.fromkeys(
        [
            "decode + resample (soundfile, soxr)",
            "silence bounds",
            "loudness (pyloudnorm)",
            "segmenting",
            "mel spectrogram (librosa)",
            "power_to_db",
            "pad/crop",
            "npy write (atomic, fsync)",
        ],
        0.0,
    )
    names = list(totals)
    for number, path in enumerate(paths):
        marks = [time.perf_counter()]
        try:
            audio = vit_lib.load_audio(path, data_config.SR)
            marks.append(time.perf_counter())
            vit_lib.non_silent_bounds(audio, data_config.TRIM_TOP_DB)
            marks.append(time.perf_counter())
            audio, _ = vit_lib.loudness_normalize(audio, data_config.SR, data_config.LOUDNESS_LUFS)
        except vit_lib.AudioError:
            continue
        marks.append(time.perf_counter())
        segments = vit_lib.segment_waveform(
            audio,
            data_config.SR,
            segment_config.audio_length_seconds,
            segment_config.overlap_ratio,
            data_config.SHORT_CLIP_MODE,
        )
        marks.append(time.perf_counter())
        mel_s = db_s = fit_s = save_s = 0.0
        for index, (_, segment, _) in enumerate(segments):
            t0 = time.perf_counter()
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
            t1 = time.perf_counter()
            db = librosa.power_to_db(mel, ref=np.max, top_db=80.0).astype(np.float32)
            t2 = time.perf_counter()
            spec = vit_lib.fit_frames(db, segment_config.max_frames_spec, data_config.MASK_REPLACEMENT_VALUE)
            t3 = time.perf_counter()
            storage.save_npy_atomic(Path(out_dir) / f"{number}_{index}.npy", spec[None])
            t4 = time.perf_counter()
            mel_s, db_s, fit_s, save_s = mel_s + t1 - t0, db_s + t2 - t1, fit_s + t3 - t2, save_s + t4 - t3
        for name, seconds in zip(names, np.diff(marks).tolist() + [mel_s, db_s, fit_s, save_s]):
            totals[name] += seconds
    return totals


def profile_per_file_work(paths, out_dir, top):
    profiler = cProfile.Profile()
    profiler.enable()
    for number, path in enumerate(paths):
        vit_lib._prepare_one(
            (
                path,
                out_dir,
                f"p{number}",
                vit_lib.SEGMENT_CONFIGS["vit_balanced_dataset"],
                vit_lib.DataConfig(),
            )
        )
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-minutes", type=float, default=10.0, help="least audio in the corpus")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per worker count (median reported)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=vit_lib.DataConfig.SEED,
        help="seed of the generated corpus (default: %(default)s)",
    )
    parser.add_argument("--target", type=float, default=200.0, help="s of audio per s of wall time per core")
    parser.add_argument("--profile", action="store_true", help="profile even when the target is met")
    parser.add_argument(
        "--profile-files", type=int, default=40, help="files in the stage timing and cProfile"
    )
    parser.add_argument("--top", type=int, default=30, help="cProfile lines")
    parser.add_argument("--work-dir", default=None, help="default: a temp folder, removed afterwards")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    print(f"# Preprocessing speed, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"command: {shlex.join([Path(sys.executable).name] + sys.argv)}")
    print(f"{os.cpu_count()} logical CPUs")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        start = time.perf_counter()
        corpus, seconds = build_corpus(work, args.min_minutes * 60, args.seed)
        files = usable(corpus)
        print(
            f"corpus: {len(files)} usable files (+2 unusable), "
            f"{seconds:.0f} s ({seconds / 60:.1f} min) of audio at "
            f"{sf.info(files[0]).samplerate} Hz, built in {time.perf_counter() - start:.0f} s "
            "(not timed below)",
            flush=True,
        )
        # The first clip in a process loads scipy.signal (for pyloudnorm), librosa's lazily loaded modules
        # and numba's cached functions. Done here once, so every timed run (and its forked workers)
        # starts warm.
        start = time.perf_counter()
        vit_lib.clip_to_spectrograms(files[0], vit_lib.SEGMENT_CONFIGS["vit_balanced_dataset"])
        startup = time.perf_counter() - start
        print(
            f"start-up: the first clip in this process took {startup:.2f} s (imports, numba cache); "
            f"excluded below\n",
            flush=True,
        )
        rows = []
        for workers in args.workers:
            rows.append(bench_workers(corpus, work, workers, args.repeats))
            print(
                f"  {workers} worker(s): {', '.join(f'{w:.2f}' for w in rows[-1]['walls_s'])} s", flush=True
            )
        print(
            "\n| processes | files | segments | audio s | wall s (median) | audio s / wall s | per core | "
            "speed-up | fixed s (rerun, nothing to do) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            row["speedup_vs_first"] = rows[0]["wall_s"] / row["wall_s"]
            print(
                f"| {row['workers']} | {row['files']} | {row['segments']} | {row['audio_seconds']:.0f} | "
                f"{row['wall_s']:.2f} | {row['audio_s_per_s']:.0f} | {row['audio_s_per_s_per_core']:.0f} | "
                f"x{row['speedup_vs_first']:.2f} | {row['fixed_s']:.2f} |"
            )
        lowest = min(row["audio_s_per_s_per_core"] for row in rows)
        print(
            f"\ntarget {args.target:.0f} s of audio per s per core: "
            f"{'met' if lowest >= args.target else 'NOT met'} "
            f"(lowest per core over the process counts: {lowest:.0f})"
        )
        stages, profile_text = None, None
        if args.profile or lowest < args.target:
            sample = usable(corpus)[: args.profile_files]
            sample_seconds = sum(sf.info(p).duration for p in sample)
            (Path(work) / "stages").mkdir()
            stages = stage_times(sample, Path(work) / "stages")
            (Path(work) / "profile").mkdir()
            real_start = time.perf_counter()
            for number, path in enumerate(sample):
                vit_lib._prepare_one(
                    (
                        path,
                        str(Path(work) / "profile"),
                        f"r{number}",
                        vit_lib.SEGMENT_CONFIGS["vit_balanced_dataset"],
                        vit_lib.DataConfig(),
                    )
                )
            per_file_work = time.perf_counter() - real_start
            total = sum(stages.values())
            print(
                f"\nPer-file work in one process, {len(sample)} files, {sample_seconds:.0f} s of audio: "
                f"_prepare_one takes {per_file_work:.2f} s "
                f"({sample_seconds / per_file_work:.0f} s of audio per s); "
                f"the stages below add up to {total:.2f} s"
            )
            print("| stage | s | share | ms per s of audio |\n|---|---|---|---|")
            for name, value in sorted(stages.items(), key=lambda item: -item[1]):
                print(
                    f"| {name} | {value:.3f} | {100 * value / total:.0f}% | "
                    f"{1000 * value / sample_seconds:.2f} |"
                )
            profile_text = profile_per_file_work(sample, str(Path(work) / "profile"), args.top)
            print(f"\ncProfile of _prepare_one over the same files (cumulative, top {args.top}):")
            print(profile_text)
    shares = [r["other_cpu_share"] for r in rows if r["other_cpu_share"] is not None]
    if shares:
        print(
            f"other processes used up to {100 * max(shares):.0f}% of the CPUs during the timed runs"
            + (": the figures are NOT reliable, run again on an idle machine" if max(shares) > 0.05 else "")
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                dict(
                    date=datetime.datetime.now().isoformat(timespec="seconds"),
                    command=sys.argv,
                    corpus_seconds=seconds,
                    startup_s=startup,
                    rows=rows,
                    stages=stages,
                    profile=profile_text,
                ),
                indent=2,
            )
        )
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
