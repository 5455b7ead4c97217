"""Behaviour that must not depend on the machine: one decoding rule whether or not ffmpeg is
installed, audio formats that are decoded or listed (never silently ignored), a test session pinned
to CPU, JupyterLab for root and non-root users, and a plain `pip install -r requirements.txt` that
makes vit_lib importable.

ffmpeg is made present with a stand-in `ffmpeg` on PATH (it copies the input file to stdout, so the
"aac" and "webm" files here are WAVs in disguise) and absent by making shutil.which miss it; the
tests that need the real ffmpeg run only where it is installed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import vit_lib
from vit_lib import AudioError, load_audio, prepare_dataset, read_corpus

SR = 16000
REPO = Path(vit_lib.__file__).resolve().parent
real_which = shutil.which


def tone(seconds, sr=SR, freq=220.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_wav(path, audio, sr=SR, format="WAV"):
    """A WAV file under any name: `format` tells soundfile what to write whatever the extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, sr, format=format, subtype="PCM_16" if format == "WAV" else None)
    return path


def install_fake_ffmpeg(tmp_path, monkeypatch, stderr="", exit_code=0):
    """Put an `ffmpeg` first on PATH that logs its arguments to the returned file, writes `stderr`,
    and on exit code 0 copies its input file to stdout."""
    folder = tmp_path / "fake_bin"
    folder.mkdir()
    log = tmp_path / "ffmpeg_calls.txt"
    program = tmp_path / "fake_ffmpeg.py"
    program.write_text(
        "import sys\n"
        f"with open({str(log)!r}, 'a') as log:\n"
        "    log.write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"sys.stderr.write({stderr!r})\n"
        f"if '-i' in sys.argv and not {exit_code}:\n"
        "    source = sys.argv[sys.argv.index('-i') + 1].removeprefix('file:')\n"
        "    sys.stdout.buffer.write(open(source, 'rb').read())\n"
        f"sys.exit({exit_code})\n"
    )
    launcher = folder / "ffmpeg"
    launcher.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{program}' \"$@\"\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    return log


def hide_ffmpeg(monkeypatch):
    monkeypatch.setattr(
        shutil,
        "which",
        lambda name, *args, **kwargs: None if name == "ffmpeg" else real_which(name, *args, **kwargs),
    )


def set_ffmpeg(present, tmp_path, monkeypatch):
    if present:
        return install_fake_ffmpeg(tmp_path, monkeypatch)
    hide_ffmpeg(monkeypatch)
    return tmp_path / "ffmpeg_calls.txt"


# ---------------------------------------------------------------- one decoding rule (items 9, 13)
@pytest.mark.parametrize("ffmpeg_present", [True, False], ids=["with_ffmpeg", "without_ffmpeg"])
def test_a_file_libsndfile_rejects_is_skipped_whatever_else_is_installed(
    tmp_path, monkeypatch, ffmpeg_present
):
    calls = set_ffmpeg(ffmpeg_present, tmp_path, monkeypatch)
    flac = tmp_path / "cut.flac"
    sf.write(flac, tone(2.0), SR)
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(flac, 16000)
    (tmp_path / "text.wav").write_text("a text file with a .wav name\n")
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(tmp_path / "text.wav", 16000)
    assert load_audio(write_wav(tmp_path / "good.wav", tone(1.0)), 16000).size == SR
    assert not calls.exists()  # a stand-in ffmpeg that would have decoded them was never asked


@pytest.mark.parametrize("name", ["clip.aac", "clip.webm", "clip.m4a", "clip.wma"])
def test_formats_libsndfile_cannot_read_need_ffmpeg_and_say_so_without_it(tmp_path, monkeypatch, name):
    hide_ffmpeg(monkeypatch)
    with pytest.raises(AudioError, match=re.escape("needs ffmpeg (apt-get install ffmpeg)")):
        load_audio(write_wav(tmp_path / name, tone(1.0)), 16000)


def test_ffmpeg_output_goes_through_the_same_downmix_and_resampling_as_libsndfile(tmp_path, monkeypatch):
    calls = install_fake_ffmpeg(tmp_path, monkeypatch)
    stereo = np.stack([tone(2.0, 44100, 440, seed=1), tone(2.0, 44100, 1000, seed=2)], axis=1)
    from_ffmpeg = load_audio(write_wav(tmp_path / "stereo.aac", stereo, 44100), 16000)
    from_libsndfile = load_audio(write_wav(tmp_path / "stereo.wav", stereo, 44100), 16000)
    np.testing.assert_array_equal(from_ffmpeg, from_libsndfile)
    assert "-nostdin" in calls.read_text() and "stereo.aac" in calls.read_text()


@pytest.mark.parametrize(
    "stderr, exit_code",
    [
        ("[aac @ 0x55d0] Input buffer exhausted before END element found\n", 1),
        ("[matroska,webm @ 0x55d0] File ended prematurely\n", 0),  # ffmpeg exits 0 on a cut-off WebM
    ],
    ids=["exit_status", "error_message_only"],
)
def test_a_file_ffmpeg_fails_on_is_an_audio_error_with_its_message(tmp_path, monkeypatch, stderr, exit_code):
    install_fake_ffmpeg(tmp_path, monkeypatch, stderr=stderr, exit_code=exit_code)
    expected = stderr.split("] ", 1)[1].strip()
    with pytest.raises(AudioError, match=f"^ffmpeg cannot decode: {re.escape(expected)}$"):
        load_audio(write_wav(tmp_path / "clip.webm", tone(1.0)), 16000)


def make_mixed_corpus(root):
    """Six WAV clips per class (enough for train, val and test to hold both classes) plus a .wave
    (a WAV), an .aac and a .webm."""
    for label in ("real", "fake"):
        for index in range(6):
            write_wav(root / label / f"{label}_{index}.wav", tone(1.5, freq=200 + 40 * index, seed=index))
    write_wav(root / "real" / "extra.wave", tone(1.5, freq=310, seed=7))
    write_wav(root / "fake" / "extra.aac", tone(1.5, freq=330, seed=8))
    write_wav(root / "fake" / "extra.webm", tone(1.5, freq=350, seed=9))
    return root


def test_folder_reader_sees_wave_aac_and_webm_files(tmp_path):
    files, skipped = read_corpus("folder", make_mixed_corpus(tmp_path / "corpus"))
    names = {Path(p).name for p in files["path"]}
    assert {"extra.wave", "extra.aac", "extra.webm"} <= names and len(names) == 15


@pytest.mark.parametrize("ffmpeg_present", [True, False], ids=["with_ffmpeg", "without_ffmpeg"])
def test_files_needing_ffmpeg_are_used_with_it_and_listed_in_skipped_csv_without_it(
    tmp_path, monkeypatch, ffmpeg_present
):
    set_ffmpeg(ffmpeg_present, tmp_path, monkeypatch)
    root = make_mixed_corpus(tmp_path / "corpus")
    summary, _, _ = prepare_dataset(root, cache_dir=tmp_path / "cache", num_workers=1, progress=False)
    skipped = pd.read_csv(tmp_path / "cache" / "vit_short_dataset" / "skipped.csv")
    reasons = dict(zip(skipped["original_path"], skipped["reason"]))
    if ffmpeg_present:
        assert reasons == {} and summary["used_files"] == 15
    else:
        assert set(reasons) == {"fake/extra.aac", "fake/extra.webm"}
        assert all("needs ffmpeg (apt-get install ffmpeg)" in reason for reason in reasons.values())
        assert summary["used_files"] == 13 and summary["skipped_files"] == 2


needs_real_ffmpeg = pytest.mark.skipif(real_which("ffmpeg") is None, reason="ffmpeg is not installed")


def encode_with_ffmpeg(wav, target):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(wav), str(target)], check=True)
    return target


@needs_real_ffmpeg
@pytest.mark.parametrize("suffix", [".aac", ".m4a", ".webm"])
def test_real_ffmpeg_decodes_compressed_formats_to_the_same_tone(tmp_path, suffix):
    t = np.arange(2 * 44100) / 44100
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 440 * t)], axis=1)
    decoded = load_audio(
        encode_with_ffmpeg(write_wav(tmp_path / "tone.wav", stereo, 44100), tmp_path / f"tone{suffix}"), 16000
    )
    assert decoded.dtype == np.float32 and abs(decoded.size - 2 * SR) < 0.15 * SR  # plus the codec's priming
    middle = decoded[SR // 2 : SR // 2 + SR]  # one second, 1 Hz bins
    assert np.abs(np.fft.rfft(middle))[440] / (SR / 2) == pytest.approx(0.3, abs=0.02)  # mean of 0.4 and 0.2


@needs_real_ffmpeg
@pytest.mark.parametrize("suffix", [".aac", ".m4a", ".webm"])
def test_real_ffmpeg_rejects_a_cut_off_compressed_file(tmp_path, suffix):
    encoded = encode_with_ffmpeg(write_wav(tmp_path / "tone.wav", tone(2.0)), tmp_path / f"tone{suffix}")
    encoded.write_bytes(encoded.read_bytes()[: encoded.stat().st_size // 2])
    with pytest.raises(AudioError, match="^ffmpeg cannot decode: "):
        load_audio(encoded, 16000)


# ---------------------------------------------------------------- device and threads (item 14)
def test_vit_device_overrides_cuda_and_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setenv("VIT_DEVICE", "cpu")
    assert vit_lib.get_device() == torch.device("cpu")
    monkeypatch.delenv("VIT_DEVICE")
    assert vit_lib.get_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vit_lib.get_device() == torch.device("mps")


@pytest.mark.parametrize(
    "value, message", [("gpu", "not a device"), ("cuda", "not available"), ("mps", "not available")]
)
def test_vit_device_that_cannot_be_used_raises_naming_the_variable(monkeypatch, value, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("VIT_DEVICE", value)
    with pytest.raises(ValueError, match=f"VIT_DEVICE={value!r}.*{message}"):
        vit_lib.get_device()


def test_test_session_runs_notebook_kernels_on_cpu_with_two_threads():
    # nbval's kernels are child processes of this session: they see what a child process sees here
    probe = "import torch, vit_lib; print(vit_lib.get_device(), torch.get_num_threads())"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.split() == ["cpu", "2"]
    assert os.environ["VIT_DEVICE"] == "cpu"


def test_make_test_keeps_nbval_strict():
    recipe = subprocess.run(
        ["make", "-n", "test"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    command = next(line for line in recipe.splitlines() if "pytest" in line)
    assert "tests notebooks --nbval" in command and "--nbval-lax" not in command
    assert "--nbval-sanitize-with nbval_sanitize.cfg" in command
    cells = [
        "".join(cell["source"])
        for path in (REPO / "notebooks").glob("*.ipynb")
        for cell in json.loads(path.read_text())["cells"]
        if cell["cell_type"] == "code"
    ]
    training_cells = [cell for cell in cells if "run_training" in cell or "multi_seed_eer" in cell]
    assert training_cells and not any("NBVAL_IGNORE_OUTPUT" in cell for cell in training_cells)


def sanitize(text):
    """`text` as nbval sees it after the rules of nbval_sanitize.cfg."""
    from nbval.plugin import get_sanitize_patterns

    for regex, replace in get_sanitize_patterns((REPO / "nbval_sanitize.cfg").read_text()):
        text = re.sub(regex, replace, text)
    return text


def test_every_sanitize_rule_is_named_and_explained():
    text = (REPO / "nbval_sanitize.cfg").read_text()
    blocks = re.split(r"^\[", text, flags=re.M)[1:]
    assert len(blocks) == text.count("\nregex: ") == 5
    for block in blocks:
        name, body = block.split("]", 1)
        assert name.strip() and "regex: " in body and "replace: " in body


@pytest.mark.parametrize(
    "line",
    [
        "Run ViT_Small_vit_short_dataset: ViT_Small on vit_short_dataset, 10 epochs, batch 16, lr 0.0005",
        "Dataset sizes (segments): train 214, val 60, test 54",
        "Device: cpu",
        "Precision: fp32 (VIT_MIXED_PRECISION=off)",
        "Trainable parameters: 2,753,078",
        "Prepared 328 segments from 96 files; skipped 2 "
        "(listed in data/processed/vit_short_dataset/skipped.csv)",
        "ViT parameters (M): ViT_Small 2.753, ViT_Medium 5.672, ViT_Large 10.96",
        "uniform weight 1/65 = 0.0154; this head's weights range from 0.0064 to 0.0406",
        "EM converged for both classes: True",
    ],
)
def test_sanitizing_leaves_what_the_code_determines(line):
    assert sanitize(line) == line


def test_sanitizing_hides_the_numbers_of_a_training_run_and_keeps_their_names():
    epoch = (
        "Epoch 3 Train Loss: 0.6971, Val Loss: 0.5906, Val Acc: 0.6500, Val F1: 0.6441, Val ROC AUC: 0.7522, "
        "Val EER: 0.3333"
    )
    assert sanitize(epoch) == (
        "Epoch 3 Train Loss: TRAINED, Val Loss: TRAINED, Val Acc: TRAINED, Val F1: TRAINED, "
        "Val ROC AUC: TRAINED, Val EER: TRAINED"
    )
    assert (
        sanitize("Test Loss: 0.7096, Test Accuracy: 0.5926, Test F1-score: 0.3125, Test ROC AUC: 0.8724")
        == "Test Loss: TRAINED, Test Accuracy: TRAINED, Test F1-score: TRAINED, Test ROC AUC: TRAINED"
    )
    assert (
        sanitize("Verdict threshold (validation EER, file level): score <= -1.2315 is fake")
        == "Verdict threshold (validation EER, file level): score <= TRAINED is fake"
    )
    assert (
        sanitize("File-level test EER over 3 seed(s): 0.2500 +- 0.0441")
        == "File-level test EER over 3 seed(s): TRAINED +- TRAINED"
    )


def test_a_trained_model_table_keeps_its_title_and_hides_its_body_in_both_renderings():
    table = vit_lib.TrainedModelTable(
        pd.DataFrame({"eer": [0.25, 0.125]}, index=["file", "segment"]), "test EER"
    )
    for rendering in (repr(table), table._repr_html_()):
        assert "0.125" in rendering
        hidden = sanitize(rendering)
        assert "Trained model: test EER TRAINED" in hidden and "0.125" not in hidden
    assert (
        sanitize("the run\nTrained model: what it reached\nloss 0.87 -> 0.46")
        == "the run\nTrained model: what it reached TRAINED"
    )


def test_the_portable_check_runs_the_notebooks_on_another_floating_point_path():
    recipe = subprocess.run(
        ["make", "-n", "test-portable"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    assert all(
        setting in recipe
        for setting in (
            "ATEN_CPU_CAPABILITY=default",
            "ONEDNN_MAX_CPU_ISA=SSE41",
            "OMP_NUM_THREADS=1",
            "notebooks --nbval",
        )
    )
    assert "--nbval-lax" not in recipe
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "make test" in ci and "make test-portable" in ci


# ---------------------------------------------------------------- JupyterLab and installation (item 15)
def test_make_lab_allows_root_exactly_when_run_as_root():
    recipe = subprocess.run(
        ["make", "-n", "lab"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    command = next(line for line in recipe.splitlines() if "jupyter lab" in line)
    assert ("--allow-root" in command) == (os.geteuid() == 0)


def test_requirements_install_vit_lib_itself_in_editable_mode():
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert "-e ." in lines
