"""Corpus readers (a folder of real/fake clips, ASVspoof 2019 LA, Fake-or-Real, In-the-Wild) into one
table, speaker-disjoint splits and the checks that no person or file crosses them."""

import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from vit_audio.audio_io import AUDIO_EXTENSIONS
from vit_audio.storage import is_utf8, printable_path

SPLITS = ("train", "val", "test")
# Label convention everywhere: 0 = real (bona fide), 1 = fake (spoof).
CLASS_NAMES = ["Real", "Fake"]


CORPORA = ("folder", "asvspoof2019_la", "fake_or_real", "in_the_wild")


# prompt_speaker: the recorded person whose prompt a fake reads or whose recording it copies, where a
# corpus names one (leave-one-attack-out then tests a held-out kind on the test persons' own prompts).
CORPUS_COLUMNS = ["path", "label", "speaker", "attack", "source", "split", "prompt_speaker"]


BONAFIDE_ATTACK = "-"


class SplitLeakError(Exception):
    """A speaker or an original file occurs in more than one split."""


def _require_dir(path, what):
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")


def _link_problem(link, root):
    """Why a link under the corpus root is not followed, or None when it leads to something inside it."""
    try:
        target = link.resolve()
    except (RuntimeError, OSError):  # a loop of links
        return "a link that leads back to itself: not followed"
    if not target.exists():
        return "a link to something that does not exist"
    if not target.is_relative_to(root.resolve()):
        return "a link leading outside the corpus root: not followed"
    return None


def _walk_files(folder, root=None):
    """Files under `folder`, following links to files and folders, each real folder once (a link
    to a folder above is a loop and ends there). With a corpus `root`, links leading outside it or
    to nothing are not followed but returned as (path relative to root, reason)."""
    files, not_followed, seen = [], [], set(Path(folder).resolve().parents)
    pending = [Path(folder)]
    while pending:
        current = pending.pop()
        if current.resolve() in seen:
            continue
        seen.add(current.resolve())
        for entry in current.iterdir():
            problem = _link_problem(entry, Path(root)) if root is not None and entry.is_symlink() else None
            if problem:
                not_followed.append((Path(os.path.relpath(entry, root)).as_posix(), problem))
            elif entry.is_dir():
                pending.append(entry)
            elif entry.is_file():
                files.append(entry)
    return sorted(files), sorted(not_followed)


def _is_audio(path):
    return path.suffix.lower() in AUDIO_EXTENSIONS


def audio_files(folder):
    return [p for p in _walk_files(folder)[0] if _is_audio(p)]


def read_list_file(path):
    """The text of a corpus's list (protocol, meta.csv, speakers.csv); a ValueError naming the file
    when it is empty or not UTF-8."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise ValueError(f"{path}: empty file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: not UTF-8 text (line {line}, byte 0x{data[error.start]:02x}); save it as UTF-8"
        ) from None


def read_folder_corpus(root, speaker_pattern=None):
    """`root/real/**` and `root/fake/**`. Speakers from `root/speakers.csv` (file,speaker with
    file relative to root) or from the first group of `speaker_pattern` matched against the file
    name. The first folder under fake/ (if any) names the attack."""
    root = Path(root)
    _require_dir(root, "Corpus root")
    for name in ("real", "fake"):
        _require_dir(root / name, f"Folder corpus needs {name}/: folder")
    if speaker_pattern:
        _check_speaker_pattern(speaker_pattern)
    speakers = {}
    if (root / "speakers.csv").is_file():
        table = pd.read_csv(io.StringIO(read_list_file(root / "speakers.csv")), dtype=str)
        if not {"file", "speaker"} <= set(table.columns):
            raise ValueError(
                f"{root / 'speakers.csv'}: needs columns 'file' and 'speaker', found {list(table.columns)}"
            )
        speakers = {
            file: speaker
            for file, speaker in zip(table["file"], table["speaker"])
            if pd.notna(speaker) and speaker.strip()
        }
    rows, skipped, unnamed = [], [], []
    for label, name in enumerate(("real", "fake")):
        paths, not_followed = _walk_files(root / name, root)
        skipped += not_followed
        for path in filter(_is_audio, paths):
            rel = path.relative_to(root).as_posix()
            speaker = speakers.get(rel)
            if speaker is None and speaker_pattern:
                match = re.search(speaker_pattern, path.name)
                speaker = match.group(1) if match else None
            if speaker is None:
                unnamed.append(rel)
            parts = path.relative_to(root / name).parts
            attack = parts[0] if label == 1 and len(parts) > 1 else (BONAFIDE_ATTACK if label == 0 else None)
            rows.append(
                dict(path=str(path), label=label, speaker=speaker, attack=attack, source="folder", split=None)
            )
    if (root / "speakers.csv").is_file() or speaker_pattern:
        _require_every_speaker(unnamed, len(rows), speaker_pattern, (root / "speakers.csv").is_file())
    return pd.DataFrame(rows, columns=CORPUS_COLUMNS), skipped


def _check_speaker_pattern(pattern):
    try:
        groups = re.compile(pattern).groups
    except re.error as error:
        raise ValueError(f"the speaker pattern {pattern!r} is not a regular expression: {error}") from None
    if not groups:
        raise ValueError(
            f"the speaker pattern {pattern!r} has no group: put the speaker's part of the file name "
            f"in parentheses, e.g. '^(spk\\d+)_'"
        )


def _require_every_speaker(unnamed, total, speaker_pattern, have_speakers_csv):
    """Splits keep each speaker in one split, which needs every file's speaker: name the files without one."""
    if not unnamed:
        return
    if speaker_pattern and not have_speakers_csv and len(unnamed) == total:
        raise ValueError(
            f"The speaker pattern {speaker_pattern!r} matches none of the {total} files "
            f"(e.g. {unnamed[0]}); its first group is the speaker, searched for in the file name"
        )
    sources = ["no speaker in speakers.csv"] if have_speakers_csv else []
    sources += [f"a name the speaker pattern {speaker_pattern!r} does not match"] if speaker_pattern else []
    sources = sources or ["an empty speaker cell"]
    shown = ", ".join(unnamed[:10]) + (f" and {len(unnamed) - 10} more" if len(unnamed) > 10 else "")
    raise ValueError(
        f"{len(unnamed)} of {total} files have no speaker ({' and '.join(sources)}): {shown}. "
        f"Splits keep each speaker in one split, so every file needs its speaker"
    )


ASVSPOOF_SPLITS = {"train": ("train", "train.trn"), "val": ("dev", "dev.trl"), "test": ("eval", "eval.trl")}


def read_asvspoof2019_la(root):
    """Protocol lines `SPEAKER FILE - ATTACK bonafide|spoof`; official train/dev/eval splits."""
    root = Path(root)
    _require_dir(root, "ASVspoof 2019 LA root")
    protocols = {
        split: root / "ASVspoof2019_LA_cm_protocols" / f"ASVspoof2019.LA.cm.{suffix}.txt"
        for split, (_, suffix) in ASVSPOOF_SPLITS.items()
    }
    for protocol in protocols.values():
        if not protocol.is_file():
            raise FileNotFoundError(f"ASVspoof 2019 LA protocol file not found: {protocol}")
    rows, skipped = [], []
    for split, protocol in protocols.items():
        audio_dir = root / f"ASVspoof2019_LA_{ASVSPOOF_SPLITS[split][0]}" / "flac"
        for number, line in enumerate(read_list_file(protocol).splitlines(), 1):
            where = f"{protocol}:{number}"
            fields_ = line.split()
            if not fields_:
                continue
            if len(fields_) != 5:
                skipped.append((where, f"protocol line has {len(fields_)} fields, expected 5"))
                continue
            speaker, file_id, _, attack, key = fields_
            if key not in ("bonafide", "spoof"):
                skipped.append((where, f"label {key!r} is neither 'bonafide' nor 'spoof'"))
                continue
            path = audio_dir / f"{file_id}.flac"
            if not path.is_file():
                skipped.append((str(path), "listed in protocol but missing on disk"))
                continue
            rows.append(
                dict(
                    path=str(path),
                    label=int(key == "spoof"),
                    speaker=speaker,
                    attack=BONAFIDE_ATTACK if key == "bonafide" else attack,
                    source="asvspoof2019_la",
                    split=split,
                )
            )
    return pd.DataFrame(rows, columns=CORPUS_COLUMNS), skipped


FOR_SPLITS = {"training": "train", "validation": "val", "testing": "test"}


def read_fake_or_real(root):
    """`{training,validation,testing}/{real,fake}/*` at the root or in one version folder below it
    (for-original, for-norm, for-2seconds, for-rerecorded)."""
    root = Path(root)
    _require_dir(root, "Fake-or-Real root")
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    base = next((c for c in candidates if all((c / s).is_dir() for s in FOR_SPLITS)), None)
    if base is None:
        raise FileNotFoundError(
            f"Fake-or-Real layout not found under {root}: expected "
            f"training/, validation/ and testing/ folders"
        )
    rows, skipped = [], []
    for folder, split in FOR_SPLITS.items():
        for label, name in enumerate(("real", "fake")):
            paths, not_followed = _walk_files(base / folder / name, root)
            skipped += not_followed
            rows += [
                dict(
                    path=str(path),
                    label=label,
                    speaker=None,
                    attack=BONAFIDE_ATTACK if label == 0 else None,
                    source="fake_or_real",
                    split=split,
                )
                for path in filter(_is_audio, paths)
            ]
    return pd.DataFrame(rows, columns=CORPUS_COLUMNS), skipped


def read_in_the_wild(root):
    """`meta.csv` with columns file,speaker,label (bona-fide | spoof) and optional columns `attack` (the
    kind of fake; bona-fide rows keep "-"), `split` (train | val | test, where the corpus ships one;
    without it assign_splits makes a speaker-disjoint one) and `prompt_speaker` (the recorded person
    whose prompt a file reads or whose recording it copies)."""
    root = Path(root)
    _require_dir(root, "In-the-Wild root")
    meta_path = root / "meta.csv"
    if not meta_path.is_file():
        raise FileNotFoundError(f"In-the-Wild metadata file not found: {meta_path}")
    meta = pd.read_csv(io.StringIO(read_list_file(meta_path)), dtype=str)
    missing = {"file", "speaker", "label"} - set(meta.columns)
    if missing:
        raise ValueError(f"{meta_path}: missing column(s) {sorted(missing)}")
    rows, skipped = [], []
    for number, entry in enumerate(meta.itertuples(index=False), 2):
        label = str(entry.label).strip().lower()
        if label not in ("bona-fide", "spoof"):
            skipped.append(
                (f"{meta_path}:{number}", f"label {entry.label!r} is neither 'bona-fide' nor 'spoof'")
            )
            continue
        path = root / str(entry.file)
        if not path.is_file():
            skipped.append((str(path), "listed in meta.csv but missing on disk"))
            continue
        split = getattr(entry, "split", None)
        split = None if pd.isna(split) else str(split).strip()
        if split is not None and split not in SPLITS:
            skipped.append((f"{meta_path}:{number}", f"split {split!r} is none of {list(SPLITS)}"))
            continue
        attack = getattr(entry, "attack", None) if label == "spoof" else BONAFIDE_ATTACK
        prompt_speaker = getattr(entry, "prompt_speaker", None)
        rows.append(
            dict(
                path=str(path),
                label=int(label == "spoof"),
                speaker=entry.speaker,
                attack=None if pd.isna(attack) else attack,
                source="in_the_wild",
                split=split,
                prompt_speaker=None if pd.isna(prompt_speaker) else prompt_speaker,
            )
        )
    return pd.DataFrame(rows, columns=CORPUS_COLUMNS), skipped


def read_corpus(corpus, root, speaker_pattern=None):
    """One row per original file (path, label, speaker, attack, source, split) and a list of
    (where, reason) for entries that cannot be used."""
    readers = {
        "folder": lambda: read_folder_corpus(root, speaker_pattern),
        "asvspoof2019_la": lambda: read_asvspoof2019_la(root),
        "fake_or_real": lambda: read_fake_or_real(root),
        "in_the_wild": lambda: read_in_the_wild(root),
    }
    if corpus not in readers:
        raise ValueError(f"Unknown corpus {corpus!r}; choose one of {list(readers)}")
    files, skipped = readers[corpus]()
    names = normalised_speakers(pd.concat([files["speaker"], files["prompt_speaker"]], ignore_index=True))
    files["speaker"], files["prompt_speaker"] = names[: len(files)].to_numpy(), names[len(files) :].to_numpy()
    files, repeats = _inside_root_once(files, Path(root))
    unnamable = ~files["path"].map(is_utf8)  # ids, tables and score files need names in one encoding
    skipped += [
        (os.path.relpath(path, root), "its name is not valid UTF-8; rename it to use it")
        for path in files.loc[unnamable, "path"]
    ]
    skipped = [(printable_path(where), reason) for where, reason in skipped + repeats]
    return files[~unnamable].reset_index(drop=True), skipped


def normalised_speakers(speakers):
    """Speaker names as people mean them: whitespace around and inside a name does not count, and
    names that differ only in case are one person (written as the first of their spellings in sorted
    order), so "spk00", "spk00 " and "SPK00" cannot put one person in two splits."""
    collapsed = speakers.map(lambda name: " ".join(name.split()) if isinstance(name, str) else name)
    spellings = {}
    for name in sorted(collapsed.dropna().unique()):
        spellings.setdefault(name.casefold(), name)
    return collapsed.map(lambda name: spellings[name.casefold()] if isinstance(name, str) else name)


def _inside_root_once(files, root):
    """Keep each audio file inside the corpus root once. A file is the real file its entry leads to
    (through links), so it is listed in skipped.csv when it lies outside the root ('../', an absolute
    path, a link), and when listed again: a repeat that agrees is used once; entries that disagree
    on label, speaker or split are all left out, since nothing tells which one is right."""
    listed = pd.Series([Path(os.path.relpath(p, root)).as_posix() for p in files["path"]], index=files.index)
    real = pd.Series([Path(p).resolve() for p in files["path"]], index=files.index)
    inside = pd.Series([path.is_relative_to(root.resolve()) for path in real], index=files.index, dtype=bool)
    skipped = [
        (where, "outside the corpus root (through '../', an absolute path or a link): not used")
        for where in listed[~inside]
    ]
    repeated = real.duplicated(keep=False) & inside
    dropped = set(files.index[~inside])
    for _, group in files[repeated].groupby(real[repeated], sort=False):
        conflicts = [
            column for column in ("label", "speaker", "split") if group[column].nunique(dropna=False) > 1
        ]
        if conflicts:
            dropped.update(group.index)
            skipped += [
                (where, f"listed {len(group)} times with different {' and '.join(conflicts)}: none used")
                for where in listed[group.index]
            ]
        else:
            dropped.update(group.index[1:])
            skipped += [(where, f"listed {len(group)} times: used once") for where in listed[group.index[1:]]]
    return files.drop(index=sorted(dropped)).reset_index(drop=True), skipped


def assign_splits(files, fractions=(0.7, 0.15, 0.15), *, seed):
    """Fill missing splits: whole speakers go to one split when speakers are known (a file without
    one is then an error naming it), else whole files, stratified by label. Deterministic for a
    given seed and file list."""
    files = files.copy()
    todo = files["split"].isna()
    if not todo.any():
        return files
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions) / np.sum(fractions)

    def split_of(position):  # position in [0, 1): where the group's middle falls
        return SPLITS[min(int(np.searchsorted(bounds, position, side="right")), 2)]

    pending = files[todo]
    known = pending["speaker"].notna()
    if known.any():  # a file-level split would spread the known speakers over several splits
        _require_every_speaker(list(pending.loc[~known, "path"]), len(pending), None, False)
    if known.all():
        sizes = pending.groupby("speaker").size()
        order = sizes.index.to_numpy()[rng.permutation(len(sizes))]
        middles = (np.cumsum(sizes[order]) - sizes[order] / 2) / len(pending)
        speaker_split = {s: split_of(m) for s, m in zip(order, middles)}
        files.loc[todo, "split"] = pending["speaker"].map(speaker_split)
    else:
        for _, group in pending.sort_values("path").groupby("label"):
            shuffled = group.index.to_numpy()[rng.permutation(len(group))]
            middles = (np.arange(len(shuffled)) + 0.5) / len(shuffled)
            files.loc[shuffled, "split"] = [split_of(m) for m in middles]
    return files


def check_split_leaks(files, file_column="path"):
    """Raise SplitLeakError if a known speaker or an original file occurs in two splits. `files` is
    one row per file (`path`) or per segment (`file_column="original_path"`, a dataset's metadata)."""
    problems = []
    for column in ("speaker", file_column):
        known = files.dropna(subset=[column])
        spread = known.groupby(column)["split"].nunique()
        leaked = spread[spread > 1].index.tolist()
        if leaked:
            problems.append(f"{len(leaked)} {column}(s) in more than one split, e.g. {leaked[:3]}")
    if problems:
        raise SplitLeakError("Split leak: " + "; ".join(problems))


def check_split_classes(files, what="files", note=""):
    """Raise ValueError naming each split without bona fide or without spoof files: training, the
    validation EER and the test EER all need both classes, so this is caught before any training."""
    problems = []
    for split in SPLITS:
        labels = set(files.loc[files["split"] == split, "label"])
        if not labels:
            problems.append(f"{split!r} has no {what}")
        elif len(labels) == 1:
            missing = ("bona fide (real)", "spoof (fake)")[1 - labels.pop()]
            problems.append(f"{split!r} has no {missing} {what}")
    if problems:
        raise ValueError(
            "Split "
            + "; ".join(problems)
            + (f" ({note})" if note else "")
            + ". Train, val and test each need bona fide and spoof files."
        )


def split_audit(metadata):
    """Files, segments, seconds, speakers and attacks per split and class, from segment rows."""
    rows = []
    for (split, label), group in metadata.groupby(["split", "label"]):
        per_file = group.drop_duplicates("original_path")
        rows.append(
            dict(
                split=split,
                cls=CLASS_NAMES[label],
                files=len(per_file),
                segments=len(group),
                audio_seconds=round(float(per_file["duration_s"].sum()), 1),
                speakers=per_file["speaker"].nunique(),
                attacks=per_file["attack"].nunique(),
            )
        )
    audit = pd.DataFrame(rows)
    audit["split"] = pd.Categorical(audit["split"], SPLITS)
    return audit.sort_values(["split", "cls"], ascending=[True, False]).reset_index(drop=True)
