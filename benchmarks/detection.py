"""Detection on a real corpus: file-level test EER, pooled and per kind of fake, over several seeds,
beside the shortcut audit and the LFCC-GMM baseline, with the training time of each run; on the
prepared split, over k speaker-disjoint folds (`--folds K`), with each kind of fake held out of
training in turn (`--leave-one-attack-out`), or both crossed.

Prepares the corpus once (cached), trains each model size once per seed (and fold) with the default
recipe (`--original` for the original notebook's), scores the test split per file, and writes
`<out>/detection.json` plus a Markdown table `<out>/detection.md`: mean +- std and the worst run.

    .venv/bin/python benchmarks/detection.py                       # ViT_Small, 3 seeds, on data/demo_corpus
    .venv/bin/python benchmarks/detection.py --models ViT_Small CNN_Small --gmm
    .venv/bin/python benchmarks/detection.py --original --seeds 42  # the original recipe, for comparison
    .venv/bin/python benchmarks/detection.py --set patch_embedding=linear --name linear_patches   # one change
    .venv/bin/python benchmarks/detection.py --seeds 42 --out results/demo_corpus/seeds --name rowmean_s42
    .venv/bin/python benchmarks/detection.py --merge results/demo_corpus/seeds/rowmean_s4{2,3,4}.json
    .venv/bin/python benchmarks/detection.py --data FEATURE=linear --cache-dir data/demo_linear \\
        --name linear_frontend
    .venv/bin/python benchmarks/detection.py --models ViT_Small CNN_Small --gmm --seeds 42 --folds 5 \\
        --name cross_validation
    .venv/bin/python benchmarks/detection.py --models ViT_Small CNN_Small --gmm --seeds 42 \\
        --leave-one-attack-out --name leave_one_attack_out
    .venv/bin/python benchmarks/detection.py --seeds 42 --leave-one-attack-out tts_piper --name neural_tts_out
    .venv/bin/python benchmarks/detection.py --models --folds 5 --leave-one-attack-out --name audit_held_out
    .venv/bin/python benchmarks/detection.py --seeds 42 --gmm --fuse --rescore detection --name fused
        # the runs of detection.json scored again from their checkpoints, with the ViT + GMM fusion
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
import vit_cli as cli  # noqa: E402
import vit_lib  # noqa: E402
from vit_audio import corpora, devices  # noqa: E402


def fused_scores(detectors):
    """The equal-weight fusion of several detectors' file scores: each detector's test scores are
    z-normalised by the mean and standard deviation of its own validation scores (so no test file
    decides a weight, and a detector on another scale counts as much), then averaged per file. Files
    that a detector could not score are left out. `detectors`: [{"val": files, "test": files}]."""
    normalised = []
    for scores in detectors:
        val = scores["val"]["score"]
        normalised.append((scores["test"].set_index("original_path")["score"] - val.mean()) / val.std())
    fused = pd.concat(normalised, axis=1, join="inner").mean(axis=1)
    files = detectors[0]["test"].set_index("original_path").loc[fused.index].copy()
    files["score"] = fused
    files["p_fake"] = vit_lib.fake_probability(files["score"])
    return files.reset_index()


def add_corpus_arguments(parser):
    """--corpus-dir, --corpus and --cache-dir: the corpus a benchmark reads and where it is prepared."""
    parser.add_argument(
        "--corpus-dir", default="data/demo_corpus", help="the corpus's audio folder (default: %(default)s)"
    )
    parser.add_argument(
        "--corpus", default="in_the_wild", choices=corpora.CORPORA, help="its layout (default: %(default)s)"
    )
    parser.add_argument(
        "--cache-dir",
        default="data/demo_processed",
        help="its prepared arrays, prepared there first if absent (default: %(default)s)",
    )


def parsed_fields(dataclass, assignments):
    """{field: value} from "FIELD=VALUE" texts, each value parsed as the dataclass field's type."""
    types = {item.name: cli.field_parser(item) for item in fields(dataclass)}
    changes = dict(item.split("=", 1) for item in assignments)
    unknown = sorted(set(changes) - set(types))
    if unknown:
        raise SystemExit(f"unknown {dataclass.__name__} field(s) {unknown}")
    return {name: types[name](value) for name, value in changes.items()}


def eer_row(name, seed, split, files, seconds):
    per_kind = vit_lib.per_attack_eer(files).set_index("attack")["eer"]
    return dict(
        model=name,
        seed=seed,
        split=split,
        train_seconds=round(seconds, 1),
        **per_kind.round(4).to_dict(),
        **per_source_eer(files),
    )


def per_source_eer(files):
    """{"<source> persons": EER} for each source of recorded persons among the test files: its persons'
    real files against the fakes that read or copy their prompts. Only where the recorded persons are
    named "source:person" and every fake names its person (`prompt_speaker`), as in the demo corpus;
    else {}. A source whose persons read other material than another's (words, sentences) can fail
    where the pooled EER hides it."""
    real = files["label"] == 0
    if "prompt_speaker" not in files or not files.loc[real, "speaker"].astype(str).str.contains(":").all():
        return {}
    person = files["speaker"].where(real, files["prompt_speaker"])
    if person.isna().any():
        return {}
    eers = {}
    for source, group in files.groupby(person.str.split(":").str[0], sort=True):
        bonafide, spoof = (group.loc[group["label"] == label, "score"] for label in (0, 1))
        if len(bonafide) and len(spoof):
            eers[f"{source} persons"] = round(vit_lib.equal_error_rate(bonafide, spoof)[0], 4)
    return eers


def summary_table(rows):
    """Mean and standard deviation over the runs (seeds, and folds) of every EER column, and the worst
    run's pooled EER, one row per model."""
    frame = pd.DataFrame(rows)
    eers = sorted(  # each kind of fake, pooled, then each source of recorded persons
        (c for c in frame.columns if c not in ("model", "seed", "split", "train_seconds")),
        key=lambda column: (column.endswith(" persons"), column == "pooled", column),
    )
    grouped = frame.groupby("model", sort=False)
    table = pd.DataFrame(
        {
            c: grouped[c].mean().round(4).astype(str)
            + " ± "
            + grouped[c].std(ddof=1).fillna(0).round(4).astype(str)
            for c in eers
        }
    )
    table.insert(0, "runs", grouped.size())
    table["worst pooled"] = grouped["pooled"].max().round(4)
    table["train minutes (mean)"] = (grouped["train_seconds"].mean() / 60).round(1)
    return table


def split_table(rows):
    """Each model's pooled EER on each split (fold, or held-out kind of fake), the mean over seeds;
    "not run" where a model has no run on a split."""
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index="model", columns="split", values="pooled", aggfunc="mean", sort=False)
    return table.round(4).astype(object).fillna("not run").reset_index()


def markdown_table(frame):
    """A Markdown table of a DataFrame, for pasting into the README."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_corpus_arguments(parser)
    parser.add_argument(
        "--out", default="results/demo_corpus", help="folder of the record (default: %(default)s)"
    )
    parser.add_argument(
        "--models",
        nargs="*",
        default=["ViT_Small"],
        help="none: only the LFCC-GMM (with --gmm), or only the shortcut audit (without it)",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[42, 43, 44], help="one run per seed (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--original", action="store_true", help="the original notebook's recipe")
    parser.add_argument("--gmm", action="store_true", help="add the LFCC-GMM baseline")
    parser.add_argument(
        "--gmm-components", type=int, default=64, help="Gaussians per class (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="TrainingConfig fields to change, e.g. patch_embedding=linear learning_rate=1e-3",
    )
    parser.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="DataConfig fields to change, e.g. TIME_MASK_MAX_WIDTH=30 "
        "(a front-end change needs its own --cache-dir)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        metavar="K",
        help="judge by K-fold cross-validation over the recorded persons instead of the prepared split",
    )
    parser.add_argument(
        "--leave-one-attack-out",
        nargs="*",
        default=None,
        metavar="ATTACK",
        help="train without each kind of fake in turn and test on it; name kinds to hold out only those; "
        "with --folds, in every fold",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=None,
        metavar="SPLIT",
        help="run only these of the judged splits (e.g. fold3 fold4); --merge joins the records after",
    )
    parser.add_argument("--name", default=None, help="output file stem (default: detection[_original])")
    parser.add_argument(
        "--fuse",
        action="store_true",
        help="add the equal-weight fusion of this command's detectors (each seed's models with the "
        "LFCC-GMM), each z-normalised by its own validation scores",
    )
    parser.add_argument(
        "--rescore",
        metavar="NAME",
        help="train nothing: score again the best checkpoints of the runs that these options made "
        "under --name NAME, and write the record under --name (default NAME), keeping their training "
        "times; the LFCC-GMM keeps no checkpoint and is fitted again",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="train nothing: merge these result files of one recipe into <out>/<name>.{json,md}",
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.merge:
        write_report(out, args.name or "detection", merged_record(args.merge))
        return
    recipe = (vit_lib.TrainingConfig.original if args.original else vit_lib.TrainingConfig)(
        **{
            **parsed_fields(vit_lib.TrainingConfig, args.set),
            **({"epochs": args.epochs} if args.epochs else {}),
        }
    )
    data_config = (vit_lib.DataConfig.original if args.original else vit_lib.DataConfig)(
        **parsed_fields(vit_lib.DataConfig, args.data)
    )
    vit_lib.prepare_dataset(
        args.corpus_dir, recipe.dataset_name, args.corpus, args.cache_dir, data_config, progress=False
    )
    splits = judged_splits(args, Path(args.cache_dir) / recipe.dataset_name)
    unknown = sorted(set(args.splits or ()) - set(splits))
    if unknown:
        parser.error(f"no split {unknown}; the judged splits are {sorted(splits)}")
    name = args.name or args.rescore or ("detection_original" if args.original else "detection")
    runs_name = args.rescore or args.name  # what the runs and their checkpoints are named after
    trained_seconds = earlier_training_seconds(out / f"{args.rescore}.json") if args.rescore else {}
    rows, audits, tested_persons = [], {}, {}
    scored_splits = ("val", "test") if args.fuse else ("test",)
    gmm_name = f"LFCC-GMM ({args.gmm_components})"
    fusion_name = "fusion: " + " + ".join([*args.models, *([gmm_name] if args.gmm else [])])
    for split, cache_dir in splits.items():
        if args.splits and split not in args.splits:
            continue
        fusion_parts = {}  # seed -> [{"val": files, "test": files}] of each detector
        for model_size in args.models:
            for seed in args.seeds:
                run_name = (
                    f"{model_size}_{runs_name or ('original' if args.original else 'recipe')}_seed{seed}"
                )
                overrides = dict(
                    model_size=model_size,
                    seed=seed,
                    run_name=run_name if len(splits) == 1 else f"{run_name}_{split}",
                    cache_dir=str(cache_dir),
                    results_dir=str(out),
                    checkpoint_dir=str(Path("checkpoints") / out.name),
                    wandb_mode="disabled",
                    progress=False,
                )
                config = vit_lib.TrainingConfig(**{**asdict(recipe), **overrides})
                if args.rescore:
                    if (model_size, seed, split) not in trained_seconds:
                        raise SystemExit(
                            f"{out / args.rescore}.json has no run of {model_size}, seed {seed}, {split}"
                        )
                    seconds = trained_seconds[model_size, seed, split]
                else:
                    started = time.perf_counter()
                    vit_lib.run_training(config, data_config)
                    seconds = time.perf_counter() - started
                scored = {
                    scored_split: vit_lib.checkpoint_file_scores(config, scored_split, data_config)
                    for scored_split in scored_splits
                }
                fusion_parts.setdefault(seed, []).append(dict(scored, seconds=seconds))
                rows.append(eer_row(model_size, seed, split, scored["test"], seconds))
                print(json.dumps(rows[-1]), flush=True)
        if args.gmm:
            started = time.perf_counter()
            gmms, gmm_files = vit_lib.lfcc_gmm_baseline(
                cache_dir,
                recipe.dataset_name,
                args.corpus_dir,
                n_components=args.gmm_components,
                progress=False,
            )
            seconds = trained_seconds.get((gmm_name, 0, split), time.perf_counter() - started)
            rows.append(eer_row(gmm_name, 0, split, gmm_files, seconds))
            print(json.dumps(rows[-1]), flush=True)
            if args.fuse:
                metadata = vit_lib.read_dataset_metadata(Path(cache_dir) / recipe.dataset_name)
                gmm_val, _ = vit_lib.gmm_split_scores(gmms, metadata, "val", args.corpus_dir, progress=False)
                for parts in fusion_parts.values():
                    parts.append(dict(val=gmm_val, test=gmm_files, seconds=seconds))
        for seed, parts in fusion_parts.items() if args.fuse else ():
            if len(parts) > 1:  # the training time of a fusion is that of its detectors
                seconds = sum(part["seconds"] for part in parts)
                rows.append(eer_row(fusion_name, seed, split, fused_scores(parts), seconds))
                print(json.dumps(rows[-1]), flush=True)
        audits[split] = split_audit(Path(cache_dir) / recipe.dataset_name).to_dict("records")
        test = vit_lib.read_metadata(Path(cache_dir) / recipe.dataset_name / "test")
        tested_persons[split] = sorted(set(test.loc[test["label"] == 0, "speaker"].dropna()))
        # after every split, so that a long cross-validation stopped half-way keeps its finished folds
        write_report(out, name, run_record(args, recipe, data_config, rows, audits, tested_persons))


def earlier_training_seconds(path):
    """{(model, seed, split): training seconds} of the runs in an earlier record."""
    if not path.is_file():
        raise SystemExit(f"{path}: no record to rescore")
    record = in_current_form(json.loads(path.read_text()))
    return {(run["model"], run["seed"], run["split"]): run["train_seconds"] for run in record["runs"]}


def run_record(args, recipe, data_config, rows, audits, tested_persons):
    """What a run of this script writes: the recipe, the data settings, every run's EERs, the audits
    and the machine."""
    folders = ("cache_dir", "results_dir", "checkpoint_dir", "run_name")  # per machine and per run
    return dict(
        recipe={k: v for k, v in asdict(recipe).items() if k not in folders},
        data=vit_lib.data_settings(data_config),
        corpus=vit_lib.display_path(args.corpus_dir),
        runs=rows,
        audits=audits,
        tested_persons=tested_persons,
        machine=dict(
            cpu=devices.cpu_model(),
            cpu_count=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            platform=platform.platform(),
            torch=torch.__version__,
            precision=str(vit_lib.choose_precision(vit_lib.get_device(), recipe.mixed_precision)),
        ),
    )


def judged_splits(args, dataset_dir):
    """{split name: the cache folder of its dataset}: the prepared split, K fold views, one view per
    held-out kind of fake, or both crossed (written beside the prepared dataset, under <cache>/views/)."""
    views = Path(args.cache_dir) / "views"
    if args.leave_one_attack_out is not None:
        try:
            return vit_lib.write_attack_holdout_datasets(
                dataset_dir,
                views / (f"{args.folds}_folds_held_out" if args.folds else "held_out"),
                args.leave_one_attack_out,
                args.folds,
            )
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if args.folds:
        return vit_lib.write_fold_datasets(dataset_dir, views / f"{args.folds}_folds", args.folds)
    return {"prepared": Path(args.cache_dir)}


def split_audit(dataset_dir):
    """The shortcut audit of a dataset's train and test files: what trivial features alone achieve, and
    the spectral envelope's reference per kind of fake."""
    metadata = vit_lib.read_dataset_metadata(dataset_dir)
    train_files, test_files = (
        vit_lib.pool_file_scores(metadata[metadata["split"] == split]) for split in ("train", "test")
    )
    return vit_lib.shortcut_audit(train_files, test_files, dataset_dir=dataset_dir, per_kind=True)


# TrainingConfig fields added after records were written, with the value those records' runs had
RECIPE_FIELDS_ADDED = {"loss": "cross_entropy"}


def in_current_form(record):
    """A record as this script writes it now: records written before folds were judged hold one
    `audit` (of the prepared split) and runs without a `split`; older recipes lack the fields added
    since (RECIPE_FIELDS_ADDED)."""
    if "recipe" in record:
        record = dict(record, recipe={**RECIPE_FIELDS_ADDED, **record["recipe"]})
    if "audit" in record:
        record = {k: v for k, v in record.items() if k != "audit"} | {"audits": {"prepared": record["audit"]}}
        record["runs"] = [{"split": "prepared", **run} for run in record["runs"]]
    return record


def merged_record(paths):
    """One record from the result files of separate invocations (e.g. one seed each) of one recipe on
    one corpus: their runs together, each machine it ran on."""
    records = [in_current_form(json.loads(Path(path).read_text())) for path in paths]
    for path, record in zip(paths[1:], records[1:]):
        for key in ("recipe", "data", "corpus"):
            if record.get(key) != records[0].get(key):
                raise SystemExit(
                    f"{path}: its {key} differs from that of {paths[0]}; "
                    f"only runs of one recipe on one corpus are merged"
                )
    per_split = {}  # audits and tested persons of each split; records of other splits add theirs
    for path, record in zip(paths, records):
        for key in ("audits", "tested_persons"):
            for split, value in record.get(key, {}).items():
                if per_split.setdefault(key, {}).setdefault(split, value) != value:
                    raise SystemExit(f"{path}: its {key} of {split} differs from that of another record")
    machines = [record["machine"] for record in records]
    return dict(
        {k: v for k, v in records[0].items() if k not in ("runs", "verdicts", "machine")},
        **per_split,
        runs=[run for record in records for run in record["runs"]],
        machine=[m for i, m in enumerate(machines) if m not in machines[:i]],
        merged_from=[Path(path).name for path in paths],
    )


def write_report(out, name, record):
    """`<out>/<name>.json` (the record plus the audit's verdict on each model and split) and `<name>.md`:
    EER per kind of fake, mean +- std over the runs and the worst, each split's EER when there are
    several, the shortcut audit of each split and the verdicts."""
    record["verdicts"], tables = {}, []
    if record["runs"]:  # none: the audit alone was asked for
        runs = pd.DataFrame(record["runs"])
        mean_eer = runs.groupby(["split", "model"], sort=False)["pooled"].mean()
        record["verdicts"] = {
            f"{model} ({split})": vit_lib.audit_verdict(pd.DataFrame(record["audits"][split]), eer)
            for (split, model), eer in mean_eer.items()
        }
        tables.append(markdown_table(summary_table(record["runs"]).reset_index()))
        if runs["split"].nunique() > 1:
            tables.append(markdown_table(split_table(record["runs"])))
    vit_lib.save_json_atomic(out / f"{name}.json", record)
    tables += [
        f"Shortcut audit, {split}:\n\n" + markdown_table(pd.DataFrame(audit).round(4))
        for split, audit in record["audits"].items()
    ]
    markdown = (
        "\n\n".join(tables)
        + "\n\n"
        + "\n".join(f"- {model}: {text}" for model, text in record["verdicts"].items())
        + "\n"
    )
    with vit_lib.atomic_write(out / f"{name}.md", "w") as handle:
        handle.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
