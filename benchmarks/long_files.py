"""Memory and speed on long files: one synthetic recording prepared and one scored, each in a fresh
process on one thread.

The recordings are 16 kHz mono 16-bit WAV (a voice-like tone, written a minute at a time). "prepare"
is the per-file preparation work (vit_lib._prepare_one: decode, loudness, segments, log-mel, .npy
writes); "score" is vit_lib.score_audio_file with an untrained ViT (the cost does not depend on the
weights). Memory is the process's peak resident size (ru_maxrss) less its resident size after the
imports and a warm-up on a 10 s clip, so it counts what the file itself costs. Speed is seconds of
audio per second of wall time on one core (torch and BLAS limited to one thread).

    .venv/bin/python benchmarks/long_files.py                        # 60 min scored, 20 min prepared
    .venv/bin/python benchmarks/long_files.py --score-minutes 5 --prepare-minutes 5 \\
        --json results/long_files.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000


def write_recording(path, seconds):
    with sf.SoundFile(path, "w", SR, 1, "PCM_16") as handle:
        for minute in range(math.ceil(seconds / 60)):
            t = (np.arange(int(min(60, seconds - 60 * minute) * SR)) + minute * 60 * SR) / SR
            voice = 0.3 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))
            handle.write(voice + 0.01 * np.random.default_rng(minute).standard_normal(len(t)))
    return path


def resident_bytes():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


def measure(task, path, warm_up):
    """In this (fresh) process: run `task` on `path` after a warm-up run; print the result as JSON."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import vit_lib

    data_config = vit_lib.DataConfig()
    segment_config = vit_lib.SEGMENT_CONFIGS["vit_balanced_dataset"]
    model = vit_lib.speed_up(vit_lib.AudioViT(config=vit_lib.ViT_Small)).eval()
    checkpoint = dict(model_config=asdict(segment_config), data_config=vit_lib.data_settings(data_config))
    out_dir = Path(path).parent / f"{task}_npy"

    def run(audio):
        if task == "score":
            return vit_lib.score_audio_file(audio, model, checkpoint)[1]["segments"]
        result = vit_lib._prepare_one((audio, out_dir, Path(audio).stem, segment_config, data_config))
        if "skip" in result:
            raise SystemExit(f"{audio}: {result['skip']}")
        return len(result["segments"])

    run(warm_up)
    baseline = resident_bytes()
    start = time.perf_counter()
    segments = run(path)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = sf.info(path).duration
    print(
        json.dumps(
            dict(
                task=task,
                audio_minutes=round(seconds / 60, 2),
                segments=segments,
                baseline_mb=round(baseline / 1e6),
                peak_above_baseline_mb=round((peak - baseline) / 1e6),
                wall_s=round(wall, 1),
                audio_s_per_s_per_core=round(seconds / wall, 1),
            )
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--score-minutes", type=float, default=60, help="length of the file scored (default: %(default)s)"
    )
    parser.add_argument(
        "--prepare-minutes", type=float, default=20, help="length of the file prepared (default: %(default)s)"
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--measure", nargs=3, metavar=("TASK", "FILE", "WARM_UP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(*args.measure)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results = []
    with tempfile.TemporaryDirectory() as folder:
        warm_up = write_recording(Path(folder) / "warm_up.wav", 10)
        for task, minutes in (("score", args.score_minutes), ("prepare", args.prepare_minutes)):
            recording = write_recording(Path(folder) / f"{task}.wav", minutes * 60)
            output = subprocess.run(
                [sys.executable, __file__, "--measure", task, str(recording), str(warm_up)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            results.append(json.loads(output.splitlines()[-1]))
            print(results[-1])
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import vit_lib

        vit_lib.save_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
