"""Screen a front-end (DataConfig settings) in a minute, before the ViT trains on it for hours.

Over the k speaker folds of a prepared corpus, a logistic regression on each file's texture of the
model's input separates real from fake; the file-level test EER is given per fold and per kind of fake.

The texture of a stored spectrogram is, per row: its spread over time, its mean change from one frame
to the next, and the mean and spread of its change to the row above; a file's texture is the mean over
its segments. Each row's mean is taken off first, as the model's per-spectrogram normalisation does.
A linear model on summaries is a proxy: it says how plainly an input shows each kind of fake, not what
the ViT learns from it. It ranks front-ends; benchmarks/detection.py judges them.

    .venv/bin/python benchmarks/front_end_screen.py                                  # the defaults
    .venv/bin/python benchmarks/front_end_screen.py --data N_FFT=1024 --cache-dir data/demo_nfft1024
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vit_lib  # noqa: E402
from benchmarks.detection import add_corpus_arguments, markdown_table, parsed_fields  # noqa: E402


def spectrogram_texture(spec):
    """(4 * rows - 2,) statistics of one (rows, frames) dB spectrogram with each row's mean taken off."""
    spec = spec - spec.mean(axis=1, keepdims=True)
    over_time = np.abs(np.diff(spec, axis=1))
    across_rows = np.diff(spec, axis=0)
    return np.concatenate(
        [
            spec.std(axis=1),
            over_time.mean(axis=1),
            np.abs(across_rows).mean(axis=1),
            across_rows.std(axis=1),
        ]
    )


def file_textures(dataset_dir):
    """{original path: the mean texture of its segments} and one row per file of the prepared dataset
    (original_path, label, attack, speaker, split)."""
    metadata = vit_lib.read_dataset_metadata(dataset_dir)
    textures = {}
    for original_path, group in metadata.groupby("original_path", sort=True):
        per_segment = []
        for split, npy_path in zip(group["split"], group["npy_path"]):
            path = Path(dataset_dir) / split / npy_path
            try:
                spec = np.load(path).astype(np.float64)
            except (OSError, ValueError) as error:
                raise SystemExit(f"{path}: cannot read the spectrogram ({error})") from None
            per_segment.append(spectrogram_texture(spec.reshape(-1, spec.shape[-1])))
        textures[original_path] = np.mean(per_segment, axis=0)
    return textures, metadata


def screen(dataset_dir, k):
    """One row per fold: the texture classifier's file-level test EER, pooled and per kind of fake,
    trained on the fold's train and validation persons."""
    textures, metadata = file_textures(dataset_dir)
    rows = {}
    for fold, view_split in vit_lib.fold_splits(metadata, k).items():
        files = metadata.assign(view_split=view_split).drop_duplicates("original_path")
        train, test = files[files["view_split"] != "test"], files[files["view_split"] == "test"]
        p_fake = vit_lib.trivial_classifier_p_fake(
            np.stack([textures[p] for p in train["original_path"]]),
            train["label"].to_numpy(),
            np.stack([textures[p] for p in test["original_path"]]),
        )
        scored = test.assign(score=-p_fake)  # higher means bona fide
        rows[fold] = vit_lib.per_attack_eer(scored).set_index("attack")["eer"]
    return pd.DataFrame(rows).T


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_corpus_arguments(parser)
    parser.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="DataConfig fields of the front-end to screen, e.g. N_FFT=1024 (each front-end needs its "
        "own --cache-dir)",
    )
    parser.add_argument(
        "--folds", type=int, default=5, metavar="K", help="speaker folds (default: %(default)s)"
    )
    parser.add_argument(
        "--out",
        default="results/demo_corpus/front_end_screen",
        help="folder of the record (default: %(default)s)",
    )
    parser.add_argument("--name", default="defaults", help="record file stem (default: %(default)s)")
    args = parser.parse_args()
    data_config = vit_lib.DataConfig(**parsed_fields(vit_lib.DataConfig, args.data))
    dataset_name = vit_lib.TrainingConfig().dataset_name
    vit_lib.prepare_dataset(
        args.corpus_dir, dataset_name, args.corpus, args.cache_dir, data_config, progress=False
    )
    per_fold = screen(Path(args.cache_dir) / dataset_name, args.folds)
    table = pd.concat([per_fold, vit_lib.fold_summary(per_fold)]).round(4)
    out = Path(args.out)
    vit_lib.save_json_atomic(
        out / f"{args.name}.json",
        dict(
            data=args.data,
            corpus=args.corpus_dir,
            folds=args.folds,
            eer={fold: eers.dropna().to_dict() for fold, eers in table.iterrows()},
        ),
    )
    # a kind of fake is not tested in a fold whose test persons' prompts it never read
    shown = table.astype(object).where(table.notna(), "not tested")
    markdown = markdown_table(shown.rename_axis("fold").reset_index()) + "\n"
    with vit_lib.atomic_write(out / f"{args.name}.md", "w") as handle:
        handle.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
