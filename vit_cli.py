"""`vit-audio`: prepare a corpus, train a model on it, score audio files with a checkpoint.

    vit-audio prepare CORPUS_DIR --corpus in_the_wild
    vit-audio train
    vit-audio score checkpoints/best_vit_model_ViT_Small_vit_short_dataset.pth clips/ --output scores.txt

The flags of `train` are TrainingConfig's fields and the DataConfig settings that act when a prepared
spectrogram is loaded, with the help, choices and default each field declares. Exit status: 0 done,
1 nothing could be done or a fault of the machine stopped the run, 2 a bad argument or input.
"""

import argparse
import sys
from dataclasses import MISSING, fields

import vit_lib
from vit_audio.corpora import CORPORA, SplitLeakError
from vit_audio.devices import MIXED_PRECISION_SETTINGS
from vit_audio.preparation import LOAD_TIME_SETTINGS
from vit_audio.storage import is_machine_fault, machine_fault_reason


class OneLineParser(argparse.ArgumentParser):
    """Every error is one line naming the problem (argparse's own would print the usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _optional(parse):
    """`parse`, with "none" read as None (a field whose default is None, or that may be switched off)."""
    return lambda text: None if text.lower() == "none" else parse(text)


def _parse_bool(text):
    return text.lower() in ("1", "true", "yes")


def field_parser(item):
    """What reads a config field's value from text; the annotations are strings such as "float | None"."""
    base, *rest = str(item.type).split(" | ")
    parse = {"int": int, "float": float, "bool": _parse_bool}.get(base, str)
    return _optional(parse) if "None" in rest else parse


def add_config_flags(parser, config_class, names=None, defaults=None):
    """One flag per field of `config_class` (those in `names`, when given): `--field-name`, or the
    field's `flag`, with its help, choices and default; booleans get --name/--no-name."""
    defaults = defaults or {}
    for item in fields(config_class):
        if names is not None and item.name not in names:
            continue
        flag = item.metadata.get("flag", "--" + item.name.lower().replace("_", "-"))
        default = defaults.get(item.name, item.default if item.default is not MISSING else None)
        options = dict(dest=item.name, default=default, help=item.metadata["help"])
        if str(item.type) == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        else:
            choices = item.metadata.get("choices")
            parser.add_argument(flag, type=field_parser(item), choices=choices, **options)


def build_parser():
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = OneLineParser(prog="vit-audio", description=__doc__.splitlines()[0], formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="raw corpus -> prepared dataset",
        formatter_class=formatter,
        description="Decode, segment and turn a corpus into the spectrograms `train` "
        "reads, resumably; unusable files are listed in skipped.csv.",
    )
    prepare.add_argument("corpus_root", help="the corpus folder")
    prepare.add_argument("--corpus", default="folder", choices=CORPORA, help="the corpus's layout")
    add_config_flags(prepare, vit_lib.TrainingConfig, ("dataset_name", "cache_dir"))
    prepare.add_argument(
        "--num-workers", type=_optional(int), default=None, help="preparation processes (none: one per core)"
    )
    prepare.add_argument(
        "--speaker-pattern",
        default=None,
        help=r"regex whose first group is the speaker in a file name, e.g. '^(spk\d+)_'",
    )

    train = commands.add_parser(
        "train",
        help="train a model (also under torchrun --nproc_per_node=N)",
        formatter_class=formatter,
        description="Train on a prepared dataset, then test the best epoch and store "
        "its verdict threshold, figures and metrics.",
    )
    add_config_flags(train, vit_lib.TrainingConfig, defaults=dict(progress=vit_lib.show_progress()))
    add_config_flags(train, vit_lib.DataConfig, (*LOAD_TIME_SETTINGS, "USE_GLOBAL_NORMALIZATION"))

    score = commands.add_parser(
        "score",
        help="score audio files or folders into an ASVspoof-style score file",
        formatter_class=formatter,
        description="One `FILE_ID SCORE` line per file (higher: more likely real); "
        "files that cannot be scored are listed with the reason.",
    )
    score.add_argument("checkpoint", help="a checkpoint written by train")
    score.add_argument("inputs", nargs="+", help="audio files or folders (searched recursively)")
    score.add_argument("--output", required=True, help="the score file to write")
    score.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION_SETTINGS,
        default="auto",
        help="bf16 autocast of the forward pass: auto (where the CPU has bf16 instructions), on or off",
    )
    return parser


def _split_settings(options, config_class):
    """The entries of `options` that are fields of `config_class`, taken out of `options`."""
    return {item.name: options.pop(item.name) for item in fields(config_class) if item.name in options}


def run(args):
    """Run the parsed command; returns the exit status."""
    options = {k: v for k, v in vars(args).items() if k != "command"}
    if args.command == "train":
        data_config = vit_lib.DataConfig(**_split_settings(options, vit_lib.DataConfig))
        vit_lib.run_training(vit_lib.TrainingConfig(**options), data_config)
    elif args.command == "prepare":
        summary, _, _ = vit_lib.prepare_dataset(
            args.corpus_root,
            args.dataset_name,
            args.corpus,
            args.cache_dir,
            num_workers=args.num_workers,
            speaker_pattern=args.speaker_pattern,
            progress=vit_lib.show_progress(),
        )
        if not summary["used_files"]:
            print(
                f"no file could be prepared: each one is listed with its reason in "
                f"{summary['dataset_dir']}/skipped.csv"
            )
            return 1
    else:
        scored, _ = vit_lib.score_files(
            args.checkpoint,
            args.inputs,
            args.output,
            progress=vit_lib.show_progress(),
            mixed_precision=args.mixed_precision,
        )
        if not scored:
            return 1
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, vit_lib.DatasetError, SplitLeakError) as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    except Exception as error:
        if not is_machine_fault(error):
            raise
        parser.exit(
            1,
            f"{parser.prog} {args.command}: stopped by a fault of the machine, not of the input: "
            f"{machine_fault_reason(error)}. What was finished is kept; run again once it is fixed.\n",
        )


if __name__ == "__main__":
    sys.exit(main())
