"""The fixture corpus: seconds of synthetic "speech" (a pulse train through formant filters) per
speaker, real against two kinds of fake, small enough for the tests and the notebooks' defaults."""

import math
from pathlib import Path

import numpy as np
import pandas as pd

from vit_audio.audio_io import loudness_normalize
from vit_audio.storage import REPO_ROOT, atomic_write, save_csv_atomic

FIXTURE_AUDIO_DIR = REPO_ROOT / "data" / "fixture_audio"


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
    contour = f0 * (
        1
        + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6))
        + 0.02 * np.sin(2 * np.pi * 5.5 * t)
    )
    phase = np.cumsum(contour) / sr
    onsets = np.flatnonzero(np.diff(np.floor(phase), prepend=0) > 0)
    shifts = np.round(jitter * sr / contour[onsets] * rng.standard_normal(len(onsets))).astype(int)
    pulses = np.bincount(np.clip(onsets + shifts, 0, n - 1), minlength=n).astype(np.float64)
    excitation = np.sqrt(1 - aperiodicity) * pulses + np.sqrt(
        aperiodicity * np.mean(pulses**2)
    ) * rng.standard_normal(n)
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(2.5, 4.5) * t + rng.uniform(0, 6)), 0, None) ** 0.7
    voiced = _formant_filter(
        excitation,
        [(rng.uniform(500, 800), 80), (rng.uniform(1100, 1800), 100), (rng.uniform(2300, 3000), 150)],
        sr,
    )
    breath = rng.uniform(0.003, 0.01) * rng.standard_normal(n)
    clip = (voiced + breath) * syllables
    # Pauses of digital silence would show any trace a vocoder leaves in them: a recording's room
    # noise covers them, at a level drawn per clip.
    clip += 10 ** (-rng.uniform(35, 50) / 20) * np.sqrt(np.mean(clip**2)) * rng.standard_normal(n)
    # A microphone's high-pass: the one-signed pulses would leave a DC step under every syllable, and
    # noise excitation none, so the pauses alone would tell the classes apart.
    return sosfilt(butter(2, 60, "highpass", fs=sr, output="sos"), clip)


# attack: (the excitation defect it leaves, range of the defect's per-clip strength). The weakest
# fakes are hard to tell from their real twins, so a detector makes mistakes worth looking at.
FIXTURE_ATTACKS = {
    "noisy_excitation": ("aperiodicity", (0.03, 0.8)),
    "pulse_jitter": ("jitter", (0.005, 0.3)),
}


def make_fixture_corpus(out_dir=FIXTURE_AUDIO_DIR, n_speakers=12, clips_per_speaker=4, sr=22050, seed=42):
    """A tiny real/fake folder corpus, made deterministically: each fake clip, fake/<attack>/, is its
    real twin (same speaker, words, duration, leading silence and loudness, so none of these separates
    the classes) synthesised again with the excitation defect of one of FIXTURE_ATTACKS, at a strength
    drawn per clip. Also two unusable files, to show how preparation reports them. Returns the corpus
    folder."""
    import soundfile as sf

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    speakers = []
    strata = math.ceil(clips_per_speaker / len(FIXTURE_ATTACKS))  # a speaker's fakes per attack
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
            voice = rng.integers(2**32)  # the twins share every draw of the voice but the defect
            real = _synthetic_utterance(np.random.default_rng(voice), sr, seconds, f0)
            fake = _synthetic_utterance(
                np.random.default_rng(voice),
                sr,
                seconds,
                f0,
                **{defect: weakest + share * (strongest - weakest)},
            )
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
