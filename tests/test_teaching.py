"""Tests of the helpers the notebooks call: their parameters, the colours of the classes, the losses of
the worst mistakes, the spliced recording of the inference notebook and its timeline."""

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import vit_lib
from vit_audio import corpora

matplotlib.use("Agg")


# ---------------------------------------------------------------- notebook parameters
def test_notebook_parameters_fall_back_to_the_fixture_defaults(monkeypatch):
    for variable, _, _ in vit_lib.NOTEBOOK_PARAMETERS.values():
        monkeypatch.delenv(variable, raising=False)
    corpus, audio_dir, epochs, seeds, progress, workers, pattern = vit_lib.notebook_parameters(
        "CORPUS", "AUDIO_DIR", "EPOCHS", "SEEDS", "SHOW_PROGRESS", "NUM_WORKERS", "SPEAKER_PATTERN"
    )
    assert (corpus, audio_dir, epochs, seeds) == ("folder", str(vit_lib.FIXTURE_AUDIO_DIR), 10, [42])
    assert (progress, workers, pattern) == (True, None, None)


def test_notebook_parameters_read_and_parse_their_environment_variables(monkeypatch):
    monkeypatch.setenv("VIT_EPOCHS", "15")
    monkeypatch.setenv("VIT_SEEDS", "42,43,44")
    monkeypatch.setenv("VIT_PROGRESS", "0")
    monkeypatch.setenv("VIT_LEARNING_RATE", "1e-4")
    monkeypatch.setenv("VIT_PREP_WORKERS", "3")
    assert vit_lib.notebook_parameters(
        "EPOCHS", "SEEDS", "SHOW_PROGRESS", "LEARNING_RATE", "NUM_WORKERS"
    ) == (15, [42, 43, 44], False, 1e-4, 3)


def test_a_notebook_parameter_that_cannot_be_read_names_its_variable(monkeypatch):
    monkeypatch.setenv("VIT_EPOCHS", "ten")
    with pytest.raises(ValueError, match=r"VIT_EPOCHS='ten' cannot be read for EPOCHS"):
        vit_lib.notebook_parameters("EPOCHS")
    with pytest.raises(ValueError, match=r"Unknown notebook parameter\(s\) \['EPOCH'\]"):
        vit_lib.notebook_parameters("EPOCH")


def test_every_notebook_reads_only_parameters_it_uses():
    import json
    import re

    for path in sorted(vit_lib.REPO_ROOT.glob("notebooks/[0-9]*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters'"
        names = re.findall(r'"([A-Z_]+)"', "".join(tagged[0]["source"]))
        assert names and set(names) <= set(vit_lib.NOTEBOOK_PARAMETERS), f"{path.name}: {names}"
        rest = "".join("".join(c["source"]) for c in cells if c is not tagged[0] and c["cell_type"] == "code")
        if "notebook_training_config(globals()" in rest:  # it reads the training parameters by name
            rest += " ".join(vit_lib.NOTEBOOK_TRAINING_SETTINGS)
        unused = [name for name in set(names) if not re.search(rf"\b{name}\b", rest)]
        assert not unused, f"{path.name} reads parameters it never uses: {unused}"


# ---------------------------------------------------------------- figures and losses
def test_score_histograms_draw_each_class_in_its_colour():
    files = pd.DataFrame(dict(label=[0, 0, 1, 1], score=[2.0, 1.0, -1.0, -2.0]))
    fig = vit_lib.plot_score_histograms(files)
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    colours = {
        label: matplotlib.colors.to_hex(handle.get_facecolor()[:3])
        for handle, label in zip(handles, labels)
        if label in vit_lib.CLASS_COLORS
    }
    assert colours == vit_lib.CLASS_COLORS
    assert vit_lib.CLASS_COLORS["Real"] != vit_lib.CLASS_COLORS["Fake"]


def test_segment_losses_are_the_cross_entropy_of_the_true_class_without_overflow():
    segments = pd.DataFrame(dict(label=[1, 0, 1, 0, 1], score=[0.0, 0.0, 2.0, 2.0, 1000.0]))
    losses = vit_lib.segment_losses(segments)
    # score 0: p = 0.5 for both classes; a fake scored +2 has p(fake) = 1 / (1 + e^2)
    expected = [math.log(2), math.log(2), math.log(1 + math.e**2), math.log(1 + math.e**-2), 1000.0]
    np.testing.assert_allclose(losses.to_numpy(), expected, rtol=1e-12)
    assert np.isfinite(losses).all()


# ---------------------------------------------------------------- the spliced recording
@pytest.fixture
def clips(tmp_path):
    sr = vit_lib.DataConfig.SR
    rng = np.random.default_rng(0)
    paths = {}
    for name, seconds in (("real_a.wav", 2.0), ("real_b.wav", 3.0), ("fake_a.wav", 2.5)):
        paths[name] = tmp_path / name
        sf.write(paths[name], 0.1 * rng.standard_normal(int(seconds * sr)), sr)
    return paths


def test_spliced_recording_alternates_real_and_fake_until_long_enough(clips):
    audio, stretches = vit_lib.splice_recording(
        [clips["real_a.wav"], clips["real_b.wav"]], [clips["fake_a.wav"]], min_seconds=9.0
    )
    assert stretches["label"].tolist() == [0, 1, 0, 1]
    assert stretches["file"].tolist() == ["real_a.wav", "fake_a.wav", "real_b.wav", "fake_a.wav"]
    np.testing.assert_allclose(stretches["end_s"] - stretches["start_s"], [2.0, 2.5, 3.0, 2.5])
    np.testing.assert_allclose(stretches["start_s"].iloc[1:], stretches["end_s"].iloc[:-1])
    assert len(audio) / vit_lib.DataConfig.SR == pytest.approx(stretches["end_s"].iloc[-1]) == 10.0


def test_spliced_recording_without_fake_clips_says_so(clips):
    with pytest.raises(ValueError, match="needs real and fake clips, got 1 real and 0 fake"):
        vit_lib.splice_recording([clips["real_a.wav"]], [])


def test_timeline_shades_the_true_stretches_and_has_a_legend(clips):
    audio, stretches = vit_lib.splice_recording([clips["real_a.wav"]], [clips["fake_a.wav"]], min_seconds=4.0)
    timeline = pd.DataFrame(dict(start_s=[0.0, 2.0], end_s=[4.0, 4.5], p_fake=[0.2, 0.9]))
    verdict = dict(file="spliced.wav", verdict="fake", p_fake=0.6, threshold=0.0, threshold_source="test")
    fig = vit_lib.plot_timeline(audio, timeline, verdict, stretches=stretches)
    prob_ax = fig.axes[2]
    labels = [text.get_text() for text in prob_ax.get_legend().get_texts()]
    assert labels == [
        "segment called real",
        "segment called fake",
        "verdict threshold",
        "truly real",
        "truly fake",
    ]
    shaded = [patch for patch in prob_ax.patches if patch.get_alpha() == 0.15]
    assert len(shaded) == len(stretches) == 2
    assert [matplotlib.colors.to_hex(line.get_color()[0]) for line in prob_ax.collections] == [
        vit_lib.CLASS_COLORS["Real"],
        vit_lib.CLASS_COLORS["Fake"],
    ]


def test_leak_check_reads_a_datasets_segment_rows():
    metadata = pd.DataFrame(
        dict(
            original_path=["a.wav", "a.wav", "b.wav"],
            speaker=["s1", "s1", "s2"],
            split=["train", "test", "val"],
        )
    )
    with pytest.raises(corpora.SplitLeakError, match=r"1 original_path\(s\) in more than one split"):
        vit_lib.check_split_leaks(metadata, file_column="original_path")
