"""The offline demo corpus builder on locally made stand-ins: a stand-in sound package of synthetic
G.722 recordings with transcripts, stand-in speech engines, and a stand-in apt. No network."""

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import soxr

import vit_lib
from vit_audio import corpora, demo_corpus as dc

TTS_RATE = 22050
SOUND_PACKAGE = dc.Package("asterisk-core-sounds-xx-g722", "0.1", "CC0-1.0")
TRANSCRIPTS = {
    "en": "welcome: Welcome to the demo.\npress-one: Press one for sales.\n"
    "goodbye: Goodbye, and thank you.\none-moment: One moment please.\n"
    "main-menu: Main menu.\nbeep: [a simple beep tone]\nok: Okay.\n",
    "fr": "welcome: Bienvenue dans la démo.\npress-one: Appuyez sur un pour les ventes.\n"
    "goodbye: Au revoir, et merci.\none-moment: Un instant s'il vous plaît.\n"
    "main-menu: Menu principal.\nbeep: (bip)\nok: D'accord.\n",
    "es": "welcome: Bienvenido a la demo.\npress-one: Oprima uno para ventas.\n"
    "goodbye: Adiós, y gracias.\none-moment: Un momento por favor.\n"
    "main-menu: Menú principal.\nbeep: [tono]\nok: Bueno.\n",
}
# One recorded person per package, as in the Debian packages: three real speakers.
FOLDERS = {"en": "en_US_f_Alice", "fr": "fr_CA_f_Berthe", "es": "es_MX_m_Carl"}


def utterance(seconds, f0, sr, seed=0):
    """A voiced, syllable-like harmonic signal with a little noise."""
    t = np.arange(int(seconds * sr)) / sr
    harmonics = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 3 * t / seconds))
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.2 * harmonics * envelope + 0.005 * noise).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class StandInVoice:
    """Speaks any text as a harmonic signal whose length follows the text and the rate asked for;
    picklable for the pool."""

    engine: str
    name: str
    language: str
    package: dc.Package = dc.Package("stand-in-engine", "1.0", "test-only")
    silent: bool = False

    @property
    def speaker(self):
        return f"{self.engine}:{self.name}"

    def synthesize(self, text, stretch=1.0):
        audio = utterance((0.6 + 0.04 * len(text)) * stretch, 90 + 10 * len(self.name), TTS_RATE)
        return (audio * 0 if self.silent else audio), TTS_RATE


VOICES = [
    StandInVoice("espeak-ng", "en-us", "en"),
    StandInVoice("espeak-ng", "es-419", "es"),
    StandInVoice("espeak-ng", "fr-fr", "fr"),
    StandInVoice("flite", "slt", "en"),
    StandInVoice("flite", "rms", "en"),
    StandInVoice("flite", "awb", "en"),
]


def make_sound_package(root):
    """G.722 recordings and transcripts laid out as the Debian packages lay them out; returns prompts."""
    prompts = []
    transcripts = {
        lang: dc.read_transcripts(_write(root / f"{lang}.txt", text)) for lang, text in TRANSCRIPTS.items()
    }
    non_speech = {name for texts in transcripts.values() for name, text in texts.items() if not text}
    for person, (lang, folder) in enumerate(FOLDERS.items()):
        sounds = root / lang / "usr/share/asterisk/sounds"
        for number, name in enumerate(transcripts[lang]):
            seconds = 0.3 if name == "ok" else 0.9 + 0.05 * number
            audio = utterance(seconds, 120 + 40 * person, dc.SR, seed=number)
            path = sounds / folder / f"{name}.g722"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(dc.encode_g722(audio))
        found, _ = dc.prompts_in_package(
            sounds, transcripts[lang], lang, SOUND_PACKAGE, non_speech, transcripts["en"]
        )
        prompts += found
    return prompts


def write_mo(path, messages):
    """A gettext catalogue (.mo) of {English: translation}, laid out as GNU gettext writes one."""
    entries = sorted({"": "Content-Type: text/plain; charset=UTF-8\n", **messages}.items())
    originals, translations = (b"".join(text.encode() + b"\0" for text in column) for column in zip(*entries))
    start = 28 + 16 * len(entries)
    table, offset = [], start
    for column in zip(*entries):
        for text in column:
            table += [len(text.encode()), offset]
            offset += len(text.encode()) + 1
    header = [0x950412DE, 0, len(entries), 28, 28 + 8 * len(entries), 0, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.array(header + table, dtype="<u4").tobytes() + originals + translations)


WORD_PACKAGE = dc.Package("ktuberling-data", "0.2", "GPL-2+")
# language folder: (sample rate, words); sr@latin holds the same recordings as sr under another spelling.
WORD_FOLDERS = {
    "de": (44100, 14),
    "en": (44100, 6),
    "sr": (22050, 5),
    "sr@latin": (22050, 5),
    "it": (8000, 6),
}
SENTENCES = {"Could not save file.": "Die Datei lässt sich nicht speichern.", "Main Toolbar": "Hauptleiste"}
# A German catalogue: the sentences, messages that are not plain sentences, and the translators' credits.
CATALOGUE = {
    **SENTENCES,
    "&Game": "&Spiel",
    "%1 (%2)": "%1 (%2)",
    "Éric Bischoff": "Éric Bischoff",
    "NAME OF TRANSLATORS\x04Your names": "Anna Beispiel, Bernd Muster",
}


def make_word_package(root):
    """Words recorded apart, one folder per language, a sound theme each and a German catalogue."""
    sounds = root / "usr/share/ktuberling/sounds"
    for person, (folder, (rate, count)) in enumerate(WORD_FOLDERS.items()):
        names = [f"word{number}" for number in range(count)]
        listed = names + ["missing-word"]
        lines = [f'<sound name="{name}" file="{folder}/{name}.ogg" />' for name in listed]
        _write(
            sounds / f"{folder}.soundtheme",
            f'<language code="{folder}">\n' + "\n".join(lines) + "\n</language>\n",
        )
        if "@" in folder:  # another spelling of a language: the same recordings
            shutil.copytree(sounds / folder.split("@")[0], sounds / folder)
            continue
        (sounds / folder).mkdir()
        for number, name in enumerate(names):
            audio = utterance(0.5 + 0.05 * number, 110 + 30 * person, rate, seed=number)
            sf.write(sounds / folder / f"{name}.ogg", audio, rate)
    write_mo(root / "usr/share/locale/de/LC_MESSAGES/ktuberling.mo", CATALOGUE)
    return dc.word_prompts(sounds, root / "usr/share/locale", WORD_PACKAGE)


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    return make_word_package(tmp_path_factory.mktemp("words"))[0]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return make_sound_package(tmp_path_factory.mktemp("packages"))


@pytest.fixture(scope="module")
def corpus(prompts, words, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    dc.build_corpus(out, prompts + words, VOICES, workers=1, log=lambda line: None)
    return out


def test_transcripts_keep_words_and_mark_sound_descriptions_as_not_speech(tmp_path):
    path = _write(tmp_path / "t.txt", "; comment\nbeep: [tone]\nfor: Pour (emphase)\nwelcome: Welcome!\n")
    assert dc.read_transcripts(path) == {"beep": "", "for": "Pour", "welcome": "Welcome!"}


def test_non_speech_and_too_short_prompts_are_left_out(prompts):
    assert "beep" not in {p.name for p in prompts}
    selected, too_short = dc.select_prompts(prompts)
    assert too_short == 3 and "ok" not in {p.name for p in selected}


def test_corpus_has_in_the_wild_layout_with_every_kind(corpus):
    meta = pd.read_csv(corpus / "meta.csv")
    sources = pd.read_csv(corpus / "sources.csv", dtype={"package_version": str})
    assert list(meta.columns) == dc.META_COLUMNS and list(sources.columns) == dc.SOURCE_COLUMNS
    assert set(meta["label"]) == {"bona-fide", "spoof"}
    assert set(meta["attack"]) == {"-", "tts_espeak", "tts_flite", *dc.VOCODERS}
    assert (meta["attack"] == "-").eq(meta["label"] == "bona-fide").all()
    for file in meta["file"]:
        info = sf.info(corpus / file)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    rates = sources.set_index(["kind", "package"])["original_sample_rate"]
    assert set(rates["tts_espeak"]) == {TTS_RATE} and set(rates["bona-fide", SOUND_PACKAGE.name]) == {16000}
    assert set(rates["bona-fide", WORD_PACKAGE.name]) == {rate for rate, _ in WORD_FOLDERS.values()}
    assert set(sources["package_version"]) == {"0.1", "0.2"} and sources["transcript"].str.len().gt(0).all()


def test_copies_keep_their_source_speaker_and_voices_are_their_own_speakers(corpus):
    sources = pd.read_csv(corpus / "sources.csv", keep_default_na=False)
    real = sources[sources["kind"] == "bona-fide"].set_index(["language", "prompt", "package"])["speaker"]
    for row in sources[sources["kind"].str.startswith("vocoder")].itertuples():
        assert row.speaker == real[(row.language, row.prompt, row.package)]
    tts = sources[sources["kind"].str.startswith("tts")]
    assert (tts["speaker"] == tts["engine"] + ":" + tts["voice"]).all()


def test_every_file_names_the_person_whose_prompt_it_reads_or_copies(corpus):
    meta = pd.read_csv(corpus / "meta.csv")
    real = meta[meta["label"] == "bona-fide"]
    assert (real["prompt_speaker"] == real["speaker"]).all()
    recorded_stem = real.set_index(real["file"].str.extract(r"([^/]+)\.wav$")[0])["speaker"]
    fakes = meta[meta["label"] == "spoof"]
    read_stem = fakes["file"].str.extract(r"([^/]+?)(?:--[^/]*)?\.wav$")[0]
    assert (fakes["prompt_speaker"].to_numpy() == recorded_stem[read_stem].to_numpy()).all()
    assert fakes["prompt_speaker"].nunique() > 1


def test_two_recordings_that_would_share_a_file_name_are_refused(prompts):
    twin = dataclasses.replace(prompts[0], speaker="asterisk:Someone", paths=prompts[1].paths)
    with pytest.raises(dc.CorpusBuildError, match="same output file"):
        dc.plan_clips([prompts[0], twin], VOICES)


def test_flite_reads_the_english_transcript_of_a_prompt_in_another_language(corpus):
    sources = pd.read_csv(corpus / "sources.csv", keep_default_na=False)
    sources = sources[sources["package"] == SOUND_PACKAGE.name]
    english = sources[sources["file"].str.startswith("wav/real/en-")].set_index("prompt")["transcript"]
    flite_elsewhere = sources[(sources["kind"] == "tts_flite") & ~sources["file"].str.contains("/en-")]
    assert len(flite_elsewhere) and (flite_elsewhere["language"] == "en").all()
    assert (flite_elsewhere["transcript"] == flite_elsewhere["prompt"].map(english)).all()


def test_shipped_split_is_speaker_disjoint_with_both_classes_and_every_kind_in_each_split(corpus):
    files, skipped = vit_lib.read_corpus("in_the_wild", corpus)
    assert not skipped and files["split"].notna().all()
    vit_lib.check_split_leaks(files)
    for split, group in files.groupby("split"):
        assert set(group["label"]) == {0, 1}, split
        recorded_persons = group.loc[group["label"] == 0, "speaker"].nunique()
        assert recorded_persons == 1 if split != "train" else recorded_persons > 1, split


def test_a_folder_of_words_is_one_person_and_a_recording_found_twice_is_used_once(tmp_path):
    prompts, notes = make_word_package(tmp_path)
    assert {p.speaker for p in prompts} == {f"ktuberling:{language}" for language in ("de", "en", "sr", "it")}
    assert all(len(p.paths) == dc.WORDS_PER_PROMPT for p in prompts)
    serbian = {path for p in prompts if p.speaker == "ktuberling:sr" for path in p.paths}
    assert len(serbian) == 5 and all("/sr/" in path for path in serbian)
    # every person gives at least MIN_WORD_PROMPTS prompts, reading its words again in another order
    assert all(n == dc.MIN_WORD_PROMPTS for n in pd.Series([p.speaker for p in prompts]).value_counts())
    assert len({p.paths for p in prompts}) == len(prompts)
    assert "5 listed recordings missing, 0 unreadable" in notes[0]
    broken = tmp_path / "usr/share/ktuberling/sounds/it/word0.ogg"
    broken.write_bytes(b"not audio")
    again, notes = dc.word_prompts(broken.parents[1], tmp_path / "usr/share/locale", WORD_PACKAGE)
    assert "1 unreadable" in notes[0] and str(broken) not in {path for p in again for path in p.paths}


def test_voices_of_the_language_read_words_of_the_games_translation_and_english_ones_the_words_names(
    words, corpus, tmp_path
):
    german = [p for p in words if p.language == "de"]
    translated = {"Die", "Datei", "lässt", "sich", "nicht", "speichern", "Hauptleiste"}
    write_mo(tmp_path / "de.mo", SENTENCES)
    assert dc.translated_words(tmp_path / "de.mo") == sorted(translated)
    for prompt in german:
        read = prompt.transcript.split(dc.WORD_SEPARATOR)
        assert len(read) == len(prompt.paths) and set(read) <= translated and prompt.english == prompt.glosses
    assert len({p.transcript for p in german}) > 1
    serbian = [p for p in words if p.language == "sr"]  # no catalogue: English voices read the glosses
    assert all(p.transcript == "" and p.english == p.glosses for p in serbian)
    english = [p for p in words if p.language == "en"]  # the game's own language: its words are read
    assert english and all(p.transcript == p.english == p.glosses for p in english)
    sources = pd.read_csv(corpus / "sources.csv", keep_default_na=False)
    words_read = sources[(sources["package"] == WORD_PACKAGE.name) & sources["kind"].str.startswith("tts")]
    by_name = {(p.language, p.name): p for p in words}
    for row in words_read.itertuples():
        prompt = by_name[(row.file.split("/")[2].split("-")[0], row.prompt)]
        assert row.transcript == (prompt.transcript if row.language == prompt.language else prompt.english)


def test_a_words_english_name_leaves_out_the_playgrounds_theme():
    assert [dc.gloss(name) for name in ("egypt_palmtree", "tux-plate", "hat")] == ["palmtree", "plate", "hat"]


class CountingVoice(StandInVoice):
    """A stand-in voice that counts what it is asked to read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "read", [])

    def synthesize(self, text, stretch=1.0):
        self.read.append(text)
        return super().synthesize(text, stretch)


def silent_runs(audio, shortest=400):
    """Lengths of the runs of exact zeros at least `shortest` samples long: the pauses put between words."""
    edges = np.diff(np.concatenate([[0], (audio == 0).astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [int(e - s) for s, e in zip(starts, ends) if e - s >= shortest]


def test_a_voice_reads_joined_words_one_at_a_time_with_the_recordings_pauses(words):
    prompt = next(p for p in words if p.language == "de" and not p.narrowband)
    voice = CountingVoice("espeak-ng", "de", "de")
    fake = dc.source_audio(dc.Clip("wav/tts_espeak/x.wav", "tts_espeak", prompt, voice))
    real = dc.source_audio(dc.Clip("wav/real/x.wav", dc.REAL_KIND, prompt))
    words = prompt.transcript.split(dc.WORD_SEPARATOR)
    assert [text for i, text in enumerate(voice.read) if voice.read[i - 1 : i] != [text]] == words
    assert len(words) == len(prompt.paths)
    pauses = silent_runs(real)
    assert len(pauses) == len(prompt.paths) - 1 and silent_runs(fake) == pauses


def test_a_voice_reads_each_word_and_sentence_as_long_as_it_was_recorded(words, prompts):
    voice = StandInVoice("espeak-ng", "de", "de")
    word_prompt = next(p for p in words if p.language == "de" and not p.narrowband)
    sentence = next(p for p in prompts if p.language == "en" and p.transcript)
    for prompt in (word_prompt, sentence):
        fake = dc.source_audio(dc.Clip("wav/tts_espeak/x.wav", "tts_espeak", prompt, voice))
        real = dc.source_audio(dc.Clip("wav/real/x.wav", dc.REAL_KIND, prompt))
        assert len(dc.trimmed_speech(fake)) == pytest.approx(len(dc.trimmed_speech(real)), rel=0.1)
    stretched = len(dc.spoken(voice, "word", 100.0)) / dc.SR / (len(voice.synthesize("word")[0]) / TTS_RATE)
    assert stretched == pytest.approx(dc.MAX_STRETCH, rel=0.01), "the rate changes by at most MAX_STRETCH"


def test_a_folder_another_edition_made_is_remade_whole(corpus, prompts, words, tmp_path):
    copy = shutil.copytree(corpus, tmp_path / "corpus")
    (copy / dc.EDITION_FILE).write_text(f"{dc.EDITION - 1}\n")
    lines = []
    dc.build_corpus(copy, prompts + words, VOICES, workers=1, log=lines.append)
    files = len(pd.read_csv(copy / "meta.csv"))
    assert lines[0].startswith(f"{files} files made by another edition of this builder removed"), lines
    assert any(line.startswith(f"{files} files made, 0 already there") for line in lines), lines
    assert (copy / "checksums.sha256").read_text() == (corpus / "checksums.sha256").read_text()


def test_translated_sentences_leave_out_markup_placeholders_untranslated_names_and_credits(tmp_path):
    path = tmp_path / "x.mo"
    write_mo(path, CATALOGUE)
    assert dc.translated_sentences(path) == sorted(SENTENCES.items())
    assert dc.translated_sentences(tmp_path / "none.mo") == []


def high_band_share(audio, cutoff_hz=4200):
    power = np.abs(np.fft.rfft(audio)) ** 2
    return power[np.fft.rfftfreq(len(audio), 1 / dc.SR) > cutoff_hz].sum() / power.sum()


def test_every_copy_of_a_narrowband_recording_gets_its_band_limit(words):
    narrow = next(p for p in words if p.narrowband)
    wide = next(p for p in words if not p.narrowband)
    clips = [dc.Clip("real.wav", dc.REAL_KIND, narrow), dc.Clip("lpc.wav", "vocoder_lpc", narrow)]
    clips.append(dc.Clip("mlsa.wav", "vocoder_mlsa", narrow))
    clips.append(dc.Clip("tts.wav", "tts_flite", narrow, VOICES[3]))
    unlimited = high_band_share(dc.source_audio(dc.Clip("tts.wav", "tts_flite", wide, VOICES[3])))
    for clip in clips:
        assert high_band_share(dc.source_audio(clip)) < unlimited / 100, clip.file


def test_mlsa_copy_of_a_loud_band_limited_recording_stays_finite():
    # Without a noise floor the mel-cepstrum of an empty upper band drives the MLSA filter to infinity.
    t = np.arange(12000) / 8000
    harmonics = sum(np.sin(2 * np.pi * 100 * k * t) / k for k in range(1, 38))
    loud = soxr.resample(0.4 * harmonics * (1 - np.cos(2 * np.pi * 2 * t / 1.5)), 8000, dc.SR)
    copy = dc.mlsa_copy(loud.astype(np.float32), seed=3)
    assert np.isfinite(copy).all() and np.abs(copy).max() > 0.01


def test_piper_speaks_the_same_file_whatever_ran_before_and_each_setting_differs():
    first, second = dc.piper_voices()[:2]
    audio, rate = first.synthesize("Press one for sales.")
    second.synthesize("Something else first.")
    again, _ = first.synthesize("Press one for sales.")
    assert rate == 22050 and np.array_equal(audio, again)
    assert not np.array_equal(audio[:1000], second.synthesize("Press one for sales.")[0][:1000])


def test_a_missing_python_package_names_the_requirements_file():
    with pytest.raises(dc.CorpusBuildError, match=r"'no-such-package' is missing.*requirements-demo-corpus"):
        dc.optional_module("no_such_module_for_the_test", "no-such-package")


def split_meta(rows):
    return pd.DataFrame(
        [
            dict(speaker=s, label=label, attack=attack, language=language)
            for s, label, attack, language, n in rows
            for _ in range(n)
        ]
    )


def test_each_group_of_speakers_sends_its_smallest_to_test_and_val():
    rows = [
        ("asterisk:A", "bona-fide", "-", "en", 9),
        ("asterisk:A", "spoof", "vocoder_lpc", "en", 5),
        ("asterisk:B", "bona-fide", "-", "en", 4),
        ("asterisk:C", "bona-fide", "-", "en", 6),
        ("flite:slt", "spoof", "tts_flite", "en", 3),
        ("flite:rms", "spoof", "tts_flite", "en", 2),
        ("flite:awb", "spoof", "tts_flite", "en", 4),
        ("espeak-ng:it", "spoof", "tts_espeak", "it", 5),
    ]
    splits = dc.speaker_splits(split_meta(rows))
    assert [splits[s] for s in ("asterisk:B", "asterisk:C", "asterisk:A")] == ["test", "val", "train"]
    assert [splits[s] for s in ("flite:rms", "flite:slt", "flite:awb")] == ["test", "val", "train"]
    assert splits["espeak-ng:it"] == "train"  # a group of fewer than three cannot be spread


def test_a_language_only_held_out_persons_speak_is_held_out_with_them():
    """Train must not hear French from synthetic voices alone when the only French recorded
    person is in test."""
    rows = [
        ("asterisk:Fr", "bona-fide", "-", "fr", 4),
        ("asterisk:Ru", "bona-fide", "-", "ru", 5),
        ("asterisk:En", "bona-fide", "-", "en", 9),
        ("asterisk:Es", "bona-fide", "-", "es", 9),
        ("asterisk:En", "bona-fide", "-", "es", 9),
        ("espeak-ng:fr1", "spoof", "tts_espeak", "fr", 9),
        ("espeak-ng:fr2", "spoof", "tts_espeak", "fr", 8),
        ("espeak-ng:ru", "spoof", "tts_espeak", "ru", 9),
        ("espeak-ng:en1", "spoof", "tts_espeak", "en", 1),
        ("espeak-ng:en2", "spoof", "tts_espeak", "en", 2),
        ("espeak-ng:es", "spoof", "tts_espeak", "es", 3),
        ("flite:slt", "spoof", "tts_flite", "en", 3),
        ("flite:rms", "spoof", "tts_flite", "en", 2),
        ("flite:awb", "spoof", "tts_flite", "en", 4),
    ]
    meta = split_meta(rows)
    splits = dc.speaker_splits(meta)
    assert [splits[s] for s in ("asterisk:Fr", "asterisk:Ru", "asterisk:Es", "asterisk:En")] == [
        "test",
        "val",
        "train",
        "train",
    ]
    assert [splits[s] for s in ("espeak-ng:fr1", "espeak-ng:fr2", "espeak-ng:ru")] == ["test", "test", "val"]
    # they fill the engine's held-out places: its smallest other voices, which would have gone, stay in train
    assert {splits[s] for s in ("espeak-ng:en1", "espeak-ng:en2", "espeak-ng:es")} == {"train"}
    assert [splits[s] for s in ("flite:rms", "flite:slt", "flite:awb")] == ["test", "val", "train"]
    meta["split"] = meta["speaker"].map(splits)
    train = meta[meta["split"] == "train"]
    assert set(train["language"]) == {"en", "es"}
    assert train.groupby("language")["label"].nunique().eq(2).all()  # every language of train in both classes


def test_an_engine_keeps_a_voice_in_train_whatever_its_languages():
    rows = [
        ("asterisk:Fr", "bona-fide", "-", "fr", 4),
        ("asterisk:Ru", "bona-fide", "-", "ru", 5),
        ("asterisk:En", "bona-fide", "-", "en", 9),
        ("espeak-ng:fr", "spoof", "tts_espeak", "fr", 9),
        ("espeak-ng:en1", "spoof", "tts_espeak", "en", 1),
        ("espeak-ng:en2", "spoof", "tts_espeak", "en", 2),
    ]
    splits = dc.speaker_splits(split_meta(rows))
    assert [splits[s] for s in ("espeak-ng:fr", "espeak-ng:en1", "espeak-ng:en2")] == ["test", "val", "train"]


def test_rebuild_in_two_processes_gives_identical_checksums(corpus, prompts, words, tmp_path):
    dc.build_corpus(tmp_path, prompts + words, VOICES, workers=2, log=lambda line: None)
    assert (tmp_path / "checksums.sha256").read_text() == (corpus / "checksums.sha256").read_text()
    listed = dict(line.split("  ")[::-1] for line in (tmp_path / "checksums.sha256").read_text().splitlines())
    assert listed["meta.csv"] == hashlib.sha256((tmp_path / "meta.csv").read_bytes()).hexdigest()


def test_rerun_makes_only_the_missing_file(corpus, prompts, words, tmp_path):
    copy = shutil.copytree(corpus, tmp_path / "corpus")
    victim = copy / pd.read_csv(copy / "meta.csv")["file"].iloc[-1]
    victim.unlink()
    lines = []
    dc.build_corpus(copy, prompts + words, VOICES, workers=1, log=lines.append)
    assert victim.is_file() and any(line.startswith("1 files made") for line in lines), lines
    assert (copy / "checksums.sha256").read_text() == (corpus / "checksums.sha256").read_text()


def test_clip_that_cannot_be_made_is_reported_and_left_out(prompts, tmp_path):
    voices = [StandInVoice("espeak-ng", "en-us", "en", silent=True), StandInVoice("espeak-ng", "fr-fr", "fr")]
    lines = []
    english = [p for p in prompts if p.language == "en"]
    meta = dc.build_corpus(tmp_path, english, voices, workers=1, log=lines.append)
    reported = [line for line in lines if line.startswith("skipped wav/tts_espeak/en-")]
    assert reported and "silent" in reported[0]
    assert not meta["file"].str.startswith("wav/tts_espeak/en-").any()


def test_level_and_leading_silence_are_drawn_alike_for_both_classes(corpus):
    meta = pd.read_csv(corpus / "meta.csv")
    for label, group in meta.groupby("label"):
        for file in group["file"]:
            audio, sr = sf.read(corpus / file, dtype="float32")
            loudness = vit_lib.loudness_normalize(audio, sr, -23.0)[1]
            leading = np.argmax(np.abs(audio) > 1e-3) / sr
            assert dc.LEVEL_LUFS[0] - 1 < loudness < dc.LEVEL_LUFS[1] + 1, (label, file, loudness)
            assert dc.PAD_SECONDS[0] <= leading <= dc.PAD_SECONDS[1] + 0.1, (label, file, leading)


def test_every_file_leaves_without_dc_offset():
    # A pulse-train vocoder leaves a DC offset the recordings lack: a one-number shortcut to the class.
    audio = utterance(1.0, 150, dc.SR) + 0.2
    out = dc.finish_clip(audio, seed=3).astype(np.float64)
    assert abs(out.mean()) < 0.01 * np.sqrt(np.mean(out**2))


def test_vocoders_are_deterministic_and_keep_the_length():
    audio = utterance(1.0, 150, dc.SR)
    for vocoder in dc.VOCODER_FUNCTIONS.values():
        first, second = vocoder(audio, 7), vocoder(audio, 7)
        assert len(first) == len(audio) and np.array_equal(first, second) and np.abs(first).max() > 0


class StandInApt:
    """apt as the builder calls it: `apt-cache show` gives a record, `apt-get download` writes bytes."""

    def __init__(self, served, expected=b"the real package"):
        self.served, self.expected, self.downloads = served, expected, 0

    def __call__(self, args, cwd=None):
        if args[0] == "apt-cache":
            digest = hashlib.sha256(self.expected).hexdigest()
            return f"Package: pkg\nVersion: 1.0-1\nFilename: pool/p/pkg_1.0-1_all.deb\nSHA256: {digest}\n"
        self.downloads += 1
        (Path(cwd) / "pkg_1.0-1_all.deb").write_bytes(self.served)
        return ""


def test_corrupt_download_is_detected_by_checksum_and_refused(monkeypatch, tmp_path):
    apt = StandInApt(served=b"truncated")
    monkeypatch.setattr(dc, "run_apt", apt)
    with pytest.raises(
        dc.CorpusBuildError, match=r"Corrupt download of Debian package 'pkg'.*apt-get download pkg"
    ):
        dc.fetch_deb("pkg", tmp_path)
    assert apt.downloads == 2 and not list(tmp_path.glob("*.deb"))


def test_corrupt_cached_package_is_fetched_again(monkeypatch, tmp_path):
    (tmp_path / "pkg_1.0-1_all.deb").write_bytes(b"damaged on disk")
    monkeypatch.setattr(dc, "run_apt", StandInApt(served=b"the real package"))
    path, version = dc.fetch_deb("pkg", tmp_path)
    assert path.read_bytes() == b"the real package" and version == "1.0-1"


def test_package_missing_from_apt_names_the_package_and_the_command(monkeypatch):
    monkeypatch.setattr(dc, "run_apt", lambda args, cwd=None: "")
    with pytest.raises(dc.CorpusBuildError, match=r"'asterisk-core-sounds-en-g722'.*apt-get update"):
        dc.apt_record("asterisk-core-sounds-en-g722")


def test_no_apt_names_the_package_and_the_command():
    with pytest.raises(dc.CorpusBuildError, match=r"needs Debian's apt.*apt-get download flite"):
        dc.run_apt(["no-such-apt-tool", "show", "flite"])


def test_engine_that_cannot_run_names_the_package_and_the_command(tmp_path):
    voice = dc.CommandVoice(
        "espeak-ng",
        "en-us",
        "en",
        dc.Package("espeak-ng", "1", "GPL-3+"),
        (str(tmp_path / "missing" / "espeak-ng"), "-w", "{wav}", "-f", "{text}"),
    )
    with pytest.raises(dc.CorpusBuildError, match=r"espeak-ng cannot run.*apt-get download espeak-ng"):
        dc.check_voice(voice)


def test_licence_is_read_from_machine_readable_copyright():
    text = (
        "Format: https://example.org/dep5\n\nFiles: *\nLicense: CC-BY-SA-3.0\n\n"
        "Files: ru-*\nLicense: CC-BY-3.0\n\nFiles: debian/*\nLicense: GPL-2+\n"
    )
    assert dc.licence_from_copyright(text, "ru-") == "CC-BY-3.0"
    assert dc.licence_from_copyright(text, "en-") == "CC-BY-SA-3.0"
    assert dc.licence_from_copyright("Free-form text, no stanzas.") is None


def test_read_in_the_wild_reads_optional_attack_and_split_columns(tmp_path):
    for name in ("a.wav", "b.wav", "c.wav"):
        sf.write(tmp_path / name, np.zeros(1600), 16000)
    pd.DataFrame(
        dict(
            file=["a.wav", "b.wav", "c.wav"],
            speaker=["s1", "s2", "s3"],
            label=["bona-fide", "spoof", "spoof"],
            attack=["-", "tts_flite", "x"],
            split=["train", "test", "holdout"],
        )
    ).to_csv(tmp_path / "meta.csv", index=False)
    files, skipped = corpora.read_in_the_wild(tmp_path)
    assert list(files["attack"]) == ["-", "tts_flite"] and list(files["split"]) == ["train", "test"]
    assert len(skipped) == 1 and "holdout" in skipped[0][1]
    pd.DataFrame(dict(file=["a.wav", "b.wav"], speaker=["s1", "s2"], label=["bona-fide", "spoof"])).to_csv(
        tmp_path / "meta.csv", index=False
    )
    files, _ = corpora.read_in_the_wild(tmp_path)
    assert files["attack"].iloc[0] == "-" and files["attack"].iloc[1:].isna().all()
    assert files["split"].isna().all()
