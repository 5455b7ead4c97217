"""Detection on a real corpus: file-level test EER, pooled and per kind of fake, over several seeds,
beside the shortcut audit and the LFCC-GMM baseline, with the training time of each run.

Prepares the corpus once (cached), trains each model size once per seed with the default recipe
(`--original` for the original notebook's), scores the test split per file, and writes
`<out>/detection.json` plus a Markdown table `<out>/detection.md`.

    .venv/bin/python benchmarks/detection.py                       # ViT_Small, 3 seeds, on data/demo_corpus
    .venv/bin/python benchmarks/detection.py --models ViT_Small CNN_Small --gmm
    .venv/bin/python benchmarks/detection.py --original --seeds 42  # the original recipe, for comparison
    .venv/bin/python benchmarks/detection.py --set patch_embedding=linear --name linear_patches   # one change
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vit_lib  # noqa: E402


def train_and_score(config):
    """One run: train, then the best checkpoint's file-level test scores and its training time."""
    started = time.perf_counter()
    vit_lib.run_training(config)
    seconds = time.perf_counter() - started
    model, _ = vit_lib.load_model(config.checkpoint_path())
    segments = vit_lib.score_split(model, config.cache_dir, config.dataset_name, "test")
    return vit_lib.pool_file_scores(segments), seconds


def eer_row(name, seed, files, seconds):
    per_kind = vit_lib.per_attack_eer(files).set_index("attack")["eer"]
    return dict(model=name, seed=seed, train_seconds=round(seconds, 1), **per_kind.round(4).to_dict())


def summary_table(rows):
    """Mean and standard deviation over seeds of every EER column, one row per model."""
    frame = pd.DataFrame(rows)
    eers = [c for c in frame.columns if c not in ("model", "seed", "train_seconds")]
    grouped = frame.groupby("model", sort=False)
    table = pd.DataFrame({c: grouped[c].mean().round(4).astype(str) + " ± " + grouped[c].std(ddof=1).fillna(0).round(4).astype(str)
                          for c in eers})
    table.insert(0, "seeds", grouped.size())
    table["train minutes (mean)"] = (grouped["train_seconds"].mean() / 60).round(1)
    return table


def markdown_table(frame):
    """A Markdown table of a DataFrame, for pasting into the README."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-dir", default="data/demo_corpus")
    parser.add_argument("--corpus", default="in_the_wild", choices=vit_lib.CORPORA)
    parser.add_argument("--cache-dir", default="data/demo_processed")
    parser.add_argument("--out", default="results/demo_corpus")
    parser.add_argument("--models", nargs="+", default=["ViT_Small"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--original", action="store_true", help="the original notebook's recipe")
    parser.add_argument("--gmm", action="store_true", help="add the LFCC-GMM baseline")
    parser.add_argument("--gmm-components", type=int, default=64)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="TrainingConfig fields to change, e.g. patch_embedding=linear learning_rate=1e-3")
    parser.add_argument("--name", default=None, help="output file stem (default: detection[_original])")
    args = parser.parse_args()
    out = Path(args.out)
    changes = dict(item.split("=", 1) for item in args.set)
    types = {item.name: vit_lib.training_field_type(item) for item in fields(vit_lib.TrainingConfig)}
    changes = {name: types[name](value) for name, value in changes.items()}
    recipe = (vit_lib.TrainingConfig.original if args.original else vit_lib.TrainingConfig)(**changes)
    vit_lib.prepare_dataset(args.corpus_dir, recipe.dataset_name, args.corpus, args.cache_dir, progress=False)
    dataset_dir = Path(args.cache_dir) / recipe.dataset_name
    rows, test_files = [], None
    for model_size in args.models:
        for seed in args.seeds:
            run_name = f"{model_size}_{args.name or ('original' if args.original else 'recipe')}_seed{seed}"
            overrides = dict(model_size=model_size, seed=seed, run_name=run_name, cache_dir=args.cache_dir,
                             results_dir=str(out), checkpoint_dir=str(Path("checkpoints") / out.name),
                             wandb_mode="disabled", progress=False)
            if args.epochs:
                overrides["epochs"] = args.epochs
            config = vit_lib.TrainingConfig(**{**asdict(recipe), **overrides})
            test_files, seconds = train_and_score(config)
            rows.append(eer_row(model_size, seed, test_files, seconds))
            print(json.dumps(rows[-1]), flush=True)
    if args.gmm:
        started = time.perf_counter()
        _, gmm_files = vit_lib.lfcc_gmm_baseline(args.cache_dir, recipe.dataset_name, args.corpus_dir,
                                                 n_components=args.gmm_components, progress=False)
        rows.append(eer_row(f"LFCC-GMM ({args.gmm_components})", 0, gmm_files, time.perf_counter() - started))
    metadata = vit_lib.read_dataset_metadata(dataset_dir)
    train_files = vit_lib.pool_file_scores(metadata[metadata["split"] == "train"])
    audit = vit_lib.shortcut_audit(train_files, test_files, dataset_dir=dataset_dir)
    table = summary_table(rows)
    mean_eer = pd.DataFrame(rows).groupby("model", sort=False)["pooled"].mean()
    verdicts = {model: vit_lib.audit_verdict(audit, eer) for model, eer in mean_eer.items()}
    folders = ("cache_dir", "results_dir", "checkpoint_dir", "run_name")   # per machine and per run
    record = dict(recipe={k: v for k, v in asdict(recipe).items() if k not in folders},
                  corpus=vit_lib.display_path(args.corpus_dir), runs=rows, audit=audit.to_dict("records"),
                  verdicts=verdicts, machine=dict(cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                                                  platform=platform.platform(), torch=torch.__version__))
    name = args.name or ("detection_original" if args.original else "detection")
    vit_lib.save_json_atomic(out / f"{name}.json", record)
    markdown = (markdown_table(table.reset_index()) + "\n\n" + markdown_table(audit.round(4)) + "\n\n"
                + "\n".join(f"- {model}: {text}" for model, text in verdicts.items()) + "\n")
    with vit_lib.atomic_write(out / f"{name}.md", "w") as handle:
        handle.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
