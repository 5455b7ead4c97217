"""The layout's promises: vit_lib says which notebook introduces each definition a notebook calls, the
vit_audio machinery never imports vit_lib (only the command line, vit_cli, above both, does), the demo corpus
builds without torch, one default and one set of choices per setting, and a command line whose every
flag is documented and whose three commands work one after the other with their defaults."""

import ast
import contextlib
import io
import json
import re
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import vit_cli as cli
import vit_lib
from vit_audio import preparation

REPO = Path(vit_lib.__file__).parent
MARKER = re.compile(r"^# Introduced in notebook (\S+)\.$")


def first_notebook_calling():
    """{name: the first notebook (by number) whose code calls vit_lib.name}."""
    first = {}
    for path in sorted((REPO / "notebooks").glob("[0-9]*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
        for name in re.findall(r"\bvit_lib\.([A-Za-z_]\w*)", code):
            first.setdefault(name, path.stem)
    return first


def stated_notebooks():
    """{name: the notebook the comment above its vit_lib definition names, or None}."""
    lines = (REPO / "vit_lib.py").read_text().splitlines()
    stated = {}
    for node in ast.parse("\n".join(lines)).body:
        names = (
            [node.name]
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))
            else [target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)]
        )
        line = (node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno) - 2
        notebook = None
        while line >= 0 and lines[line].startswith("#"):
            notebook = notebook or (MARKER.match(lines[line]) and MARKER.match(lines[line]).group(1))
            line -= 1
        stated.update(dict.fromkeys(names, notebook))
    return stated


def test_each_definition_a_notebook_calls_names_the_notebook_that_introduces_it():
    first, stated = first_notebook_calling(), stated_notebooks()
    defined_here = {name: notebook for name, notebook in first.items() if name in stated}
    assert defined_here, "the notebooks call vit_lib"
    assert {name: stated[name] for name in defined_here} == defined_here
    assert not [name for name, notebook in stated.items() if notebook and name not in first]


def test_the_machinery_never_imports_vit_lib_and_the_notebooks_import_nothing_else_of_ours():
    for path in (REPO / "vit_audio").glob("*.py"):
        imported = {
            alias.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        imported |= {
            node.module for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
        }
        assert "vit_lib" not in imported and "vit_cli" not in imported, path.name
    for path in (REPO / "notebooks").glob("[0-9]*.ipynb"):
        code = "".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"])
        assert "vit_audio" not in code, path.name


def test_building_the_demo_corpus_does_not_import_torch():
    code = "import sys, vit_audio.demo_corpus; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_training_choices_are_the_defined_model_sizes_and_datasets():
    choices = {item.name: item.metadata["choices"] for item in fields(vit_lib.TrainingConfig)}
    assert list(choices["model_size"]) == [*vit_lib.VIT_SIZES, *vit_lib.CNN_SIZES]
    assert list(choices["dataset_name"]) == list(vit_lib.SEGMENT_CONFIGS)
    assert choices["mixed_precision"] == vit_lib.MIXED_PRECISION_SETTINGS


def option_actions(parser):
    return [action for action in parser._actions if action.option_strings and action.dest != "help"]


@pytest.mark.parametrize("command", ["prepare", "train", "score"])
def test_every_flag_has_help_and_shows_its_default(command, capsys):
    parser = cli.build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]
    actions = option_actions(subparser)
    assert actions and all(action.help for action in actions)
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    shown = capsys.readouterr().out
    for action in actions:
        assert action.option_strings[0] in shown
    assert shown.count("(default:") >= len([a for a in actions if not a.required])


def test_train_has_a_flag_for_every_training_setting_and_one_name_per_concept():
    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    prepare = cli.build_parser()._subparsers._group_actions[0].choices["prepare"]
    train_dests = {action.dest for action in option_actions(train)}
    assert {item.name for item in fields(vit_lib.TrainingConfig)} <= train_dests
    shared = {"--dataset", "--cache-dir", "--num-workers"}
    for parser in (train, prepare):
        assert shared <= {flag for action in option_actions(parser) for flag in action.option_strings}
    defaults = {action.dest: action.default for action in option_actions(prepare)}
    assert defaults["dataset_name"] == vit_lib.TrainingConfig.dataset_name


def test_a_bad_flag_value_is_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "--model-size", "ViT_Huge"])
    message = capsys.readouterr().err
    assert stopped.value.code == 2 and len(message.strip().splitlines()) == 1 and "--model-size" in message


def test_prepare_train_and_score_follow_one_another_with_their_defaults(tmp_path, capsys):
    corpus = vit_lib.make_fixture_corpus(tmp_path / "corpus")
    cache, checkpoints = tmp_path / "cache", tmp_path / "checkpoints"
    assert cli.main(["prepare", str(corpus), "--cache-dir", str(cache), "--num-workers", "1"]) == 0
    assert (
        cli.main(
            [
                "train",
                "--cache-dir",
                str(cache),
                "--checkpoint-dir",
                str(checkpoints),
                "--results-dir",
                str(tmp_path / "results"),
                "--epochs",
                "1",
                "--wandb-mode",
                "disabled",
            ]
        )
        == 0
    )
    checkpoint = vit_lib.TrainingConfig(checkpoint_dir=str(checkpoints)).checkpoint_path()
    assert (
        cli.main(["score", str(checkpoint), str(corpus / "real"), "--output", str(tmp_path / "scores.txt")])
        == 0
    )
    assert (
        len((tmp_path / "scores.txt").read_text().splitlines())
        == len(list((corpus / "real").glob("*.wav"))) - 1
    )
    assert "Run ViT_Small_vit_short_dataset" in capsys.readouterr().out


def test_a_dataset_prepared_before_the_redesign_is_not_prepared_again(tmp_path):
    corpus = vit_lib.make_fixture_corpus(tmp_path / "corpus", n_speakers=4, clips_per_speaker=2)
    dataset = tmp_path / "cache" / "vit_balanced_dataset"

    def prepare():
        with contextlib.redirect_stdout(io.StringIO()):
            vit_lib.prepare_dataset(
                corpus,
                dataset.name,
                cache_dir=dataset.parent,
                num_workers=1,
                progress=False,
                split_fractions=(0.5, 0.25, 0.25),
            )

    prepare()
    # as the previous layout wrote them: the segment settings with a switch that never acted, and the
    # journal's settings digests made with it
    settings = json.loads((dataset / "preparation.json").read_text())
    settings["model_config"]["apply_waveform_augmentation"] = False
    (dataset / "preparation.json").write_text(json.dumps(settings))
    journal = [json.loads(line) for line in (dataset / "progress.jsonl").read_text().splitlines()]
    for entry in journal:
        entry["made_from"]["settings"] = preparation.settings_digest(settings)
    (dataset / "progress.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in journal))
    written = {path: path.stat().st_mtime_ns for path in dataset.rglob("*.npy")}
    prepare()
    assert written and {path: path.stat().st_mtime_ns for path in dataset.rglob("*.npy")} == written


def test_a_checkpoint_written_before_the_redesign_still_loads_and_scores(tmp_path):
    torch.manual_seed(0)
    vit_config = vit_lib.ViTConfig("tiny", (128, 256), (16, 16), dim=16, depth=1, heads=1, mlp_dim=16)
    older_segments = {
        **asdict(vit_lib.SEGMENT_CONFIGS["vit_balanced_dataset"]),
        "apply_waveform_augmentation": False,
    }
    path = tmp_path / "older.pth"
    vit_lib.save_checkpoint(
        path,
        model_state=vit_lib.AudioViT(config=vit_config).state_dict(),
        vit_config=asdict(vit_config),
        model_config=older_segments,
        data_config=vit_lib.data_settings(vit_lib.DataConfig()),
    )
    sf.write(tmp_path / "clip.wav", np.random.default_rng(0).normal(0, 0.1, 3 * 16000), 16000)
    with contextlib.redirect_stdout(io.StringIO()):
        model, checkpoint = vit_lib.load_model(path)
        _, verdict = vit_lib.score_audio_file(tmp_path / "clip.wav", model, checkpoint)
    assert verdict["segments"] == 1 and np.isfinite(verdict["score"])
