"""Unit tests of the baselines set beside the ViT: the ResNet-style CNN (trained by the same loop,
scored by the same tools) and the ASVspoof 2019 LFCC-GMM baseline (LFCC front-end, one Gaussian
mixture per class, log-likelihood-ratio scores), on hand-checked examples and a tiny fixture corpus."""

import contextlib
import io
import math
import re
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import vit_cli as cli
import vit_lib
from vit_audio import fixture_corpus
from vit_lib import AudioCNN, CNNConfig, TrainingConfig

DATASET = "vit_balanced_dataset"
EPOCH_LINE = re.compile(
    r"^Epoch \d+ Train Loss: \d\.\d{4}, Val Loss: \d\.\d{4}, Val Acc: \d\.\d{4}, "
    r"Val F1: \d\.\d{4}, Val ROC AUC: \d\.\d{4}",
    re.M,
)
TEST_LINE = re.compile(
    r"^Test Loss: \d\.\d{4}, Test Accuracy: \d\.\d{4}, Test F1-score: \d\.\d{4}, "
    r"Test ROC AUC: \d\.\d{4}$",
    re.M,
)


# ---------------------------------------------------------------- CNN
@pytest.mark.parametrize("size", ["CNN_Small", "CNN_Medium", "CNN_Large"])
@pytest.mark.parametrize(
    "dataset_name", ["vit_balanced_dataset", "vit_performance_dataset", "vit_two_second_dataset"]
)
def test_audio_cnn_outputs_two_logits_for_each_size_and_dataset_shape(size, dataset_name):
    torch.manual_seed(0)
    width = vit_lib.SEGMENT_CONFIGS[dataset_name].max_frames_spec
    model = AudioCNN(config=vit_lib.make_cnn_config(size, (128, width))).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 128, width))
    assert out.shape == (2, 2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "size, low, high",
    [("CNN_Small", 2.0e6, 3.0e6), ("CNN_Medium", 4.0e6, 6.0e6), ("CNN_Large", 10.0e6, 12.0e6)],
)
def test_cnn_trainable_parameters_at_128x256_are_in_the_vit_sizes_ranges(size, low, high):
    assert low <= vit_lib.count_parameters(AudioCNN(config=vit_lib.make_cnn_config(size))) <= high


def expected_cnn_parameter_count(config):
    """By hand: a convolution without bias plus its batch norm (scale and shift) per layer; a 1x1
    projection on the shortcut wherever a block changes the resolution or the channel count."""

    def conv_bn(cin, cout, k):
        return cin * cout * k * k + 2 * cout

    total, channels = conv_bn(config.channels, config.filters[0], 7), config.filters[0]
    for stage, (blocks, width) in enumerate(zip(config.blocks, config.filters)):
        for index in range(blocks):
            out = width * 4 if config.bottleneck else width
            if config.bottleneck:
                total += conv_bn(channels, width, 1) + conv_bn(width, width, 3) + conv_bn(width, out, 1)
            else:
                total += conv_bn(channels, width, 3) + conv_bn(width, width, 3)
            if (stage > 0 and index == 0) or channels != out:
                total += conv_bn(channels, out, 1)
            channels = out
    return total + channels * config.num_classes + config.num_classes


@pytest.mark.parametrize("size", ["CNN_Small", "CNN_Medium", "CNN_Large"])
def test_cnn_parameter_count_matches_hand_formula(size):
    config = vit_lib.make_cnn_config(size)
    assert vit_lib.count_parameters(AudioCNN(config=config)) == expected_cnn_parameter_count(config)


def test_cnn_small_parameter_count_is_2796258():
    assert vit_lib.count_parameters(AudioCNN(config=vit_lib.CNN_Small)) == 2_796_258


def test_cnn_parameter_table_lists_the_three_sizes():
    table = vit_lib.cnn_parameter_table()
    assert table["model_size"].tolist() == ["CNN_Small", "CNN_Medium", "CNN_Large"]
    assert table["params_M"].tolist() == [2.796, 5.892, 11.123]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(blocks=[2, 2], filters=[32, 64, 128]), r"one block count per filter width"),
        (dict(blocks=[2, 0], filters=[32, -64]), r"filters must be positive"),
        (dict(blocks=[0, 0], filters=[32, 64]), r"at least one block"),
    ],
)
def test_cnn_config_rejects_bad_layouts_with_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CNNConfig("bad", (128, 256), **kwargs)


def test_make_architecture_config_picks_the_architecture_from_the_size_name():
    assert isinstance(vit_lib.make_model_config("CNN_Medium"), CNNConfig)
    assert isinstance(vit_lib.make_model_config("ViT_Medium"), vit_lib.ViTConfig)
    assert isinstance(vit_lib.build_model(vit_lib.CNN_Small), AudioCNN)
    assert isinstance(vit_lib.build_model(vit_lib.ViT_Small), vit_lib.AudioViT)
    with pytest.raises(ValueError, match=r"Unknown model size 'CNN_Huge'.*CNN_Small"):
        vit_lib.make_model_config("CNN_Huge")


def test_training_config_accepts_cnn_sizes_and_names_checkpoints_as_the_cnn_notebook_did(tmp_path):
    config = TrainingConfig(model_size="CNN_Small", dataset_name=DATASET, checkpoint_dir=str(tmp_path))
    assert config.architecture == "cnn" and config.run_name == "CNN_Small_vit_balanced_dataset"
    assert config.checkpoint_path() == tmp_path / "best_cnn_model_CNN_Small_vit_balanced_dataset.pth"
    assert config.checkpoint_path("last").name == "last_cnn_model_CNN_Small_vit_balanced_dataset.pth"
    assert (
        TrainingConfig(dataset_name=DATASET, checkpoint_dir=str(tmp_path)).checkpoint_path().name
        == "best_vit_model_ViT_Small_vit_balanced_dataset.pth"
    )
    with pytest.raises(ValueError, match=r"model_size must be one of .*, got 'CNN_Tiny'"):
        TrainingConfig(model_size="CNN_Tiny")


@pytest.fixture(scope="module")
def cnn_run(prepared, tmp_path_factory):
    """CNN_Small trained for 2 epochs by run_training: (config, metrics, what it printed)."""
    tmp = tmp_path_factory.mktemp("cnn")
    config = TrainingConfig(
        model_size="CNN_Small",
        dataset_name=DATASET,
        epochs=2,
        batch_size=8,
        cache_dir=str(prepared.cache),
        checkpoint_dir=str(tmp / "checkpoints"),
        results_dir=str(tmp / "results"),
        run_name="fixture_cnn",
        wandb_mode="disabled",
        progress=False,
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        metrics = vit_lib.run_training(config)
    return SimpleNamespace(config=config, metrics=metrics, printed=out.getvalue(), tmp=tmp)


def test_run_training_trains_the_cnn_with_the_same_printed_lines_and_a_cnn_checkpoint(cnn_run):
    assert len(EPOCH_LINE.findall(cnn_run.printed)) == 2
    assert len(TEST_LINE.findall(cnn_run.printed)) == 1
    assert f"Trainable parameters: {2_796_258:,}" in cnn_run.printed
    assert cnn_run.metrics["parameters"] == 2_796_258
    best = cnn_run.config.checkpoint_path()
    assert best.name == "best_cnn_model_fixture_cnn.pth" and best.is_file()
    assert cnn_run.config.checkpoint_path("last").is_file()
    assert not list(best.parent.glob("*_vit_model_*"))
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["architecture"] == "cnn" and "vit_config" not in checkpoint
    assert checkpoint["cnn_config"] == asdict(vit_lib.make_cnn_config("CNN_Small", (128, 256)))


def test_load_model_rebuilds_the_cnn_and_scores_files_like_the_vit(cnn_run, prepared, tmp_path, capsys):
    model, checkpoint = vit_lib.load_model(cnn_run.config.checkpoint_path(), architecture="cnn")
    assert isinstance(model, AudioCNN) and not model.training
    output = tmp_path / "scores.txt"
    cli.main(
        [
            "score",
            str(cnn_run.config.checkpoint_path()),
            str(prepared.corpus / "real"),
            "--output",
            str(output),
        ]
    )
    lines = output.read_text().splitlines()
    assert lines and all(np.isfinite(float(line.split()[1])) for line in lines)
    _, verdict = vit_lib.score_audio_file(prepared.corpus / "real" / "spk01_real_0.wav", model, checkpoint)
    assert f"spk01_real_0 {verdict['score']:.6f}" in lines
    assert "could not be scored" in capsys.readouterr().out


def test_cnn_checkpoint_given_to_the_vit_loader_gets_one_clear_message(cnn_run):
    path = cnn_run.config.checkpoint_path()
    with pytest.raises(ValueError, match=r"holds a CNN \(CNN_Small\), not a ViT") as error:
        vit_lib.load_model(path, architecture="vit")
    assert str(path) in str(error.value)
    with pytest.raises(ValueError, match=r"^resume\.pth holds a CNN \(CNN_Small\), not a ViT"):
        vit_lib.check_checkpoint_compatible(
            torch.load(path, weights_only=True), vit_lib.ViT_Small, "resume.pth"
        )


def test_vit_checkpoint_given_to_the_cnn_loader_gets_one_clear_message(tmp_path):
    config = vit_lib.ViTConfig("tiny", (16, 16), (8, 8), dim=8, depth=1, heads=1, mlp_dim=8)
    path = tmp_path / "best_vit_model_tiny.pth"
    vit_lib.save_checkpoint(
        path, model_state=vit_lib.AudioViT(config=config).state_dict(), vit_config=asdict(config)
    )  # as written before checkpoints named the architecture
    with pytest.raises(ValueError, match=r"holds a ViT \(tiny\), not a CNN"):
        vit_lib.load_model(path, architecture="cnn")
    model, _ = vit_lib.load_model(path)
    assert isinstance(model, vit_lib.AudioViT)


# ---------------------------------------------------------------- LFCC front-end
def test_linear_filterbank_puts_triangle_edges_equally_spaced_in_hz():
    # 8 kHz, 16-point FFT: bins every 500 Hz (0..4000); 3 filters: edges 0, 1000, 2000, 3000, 4000 Hz,
    # so filter i rises from bin 2i to 1 at bin 2i + 2 and is back at 0 on bin 2i + 4.
    expected = np.array(
        [[0, 0.5, 1, 0.5, 0, 0, 0, 0, 0], [0, 0, 0, 0.5, 1, 0.5, 0, 0, 0], [0, 0, 0, 0, 0, 0.5, 1, 0.5, 0]]
    )
    np.testing.assert_allclose(vit_lib.linear_filterbank(8000, 16, 3), expected, atol=1e-12)
    # fmin/fmax move the edges: 1000..3000 Hz in 3 filters -> edges every 500 Hz, peaks on bins 3, 4, 5
    narrow = vit_lib.linear_filterbank(8000, 16, 3, fmin=1000, fmax=3000)
    assert narrow.argmax(axis=1).tolist() == [3, 4, 5]
    assert np.flatnonzero(narrow.sum(axis=0)).tolist() == [3, 4, 5]


def test_linear_filterbank_rejects_band_outside_nyquist():
    with pytest.raises(ValueError, match=r"fmax <= sr/2 = 4000 Hz"):
        vit_lib.linear_filterbank(8000, 16, 3, fmax=5000)


def test_lfcc_is_the_orthonormal_dct_of_log10_filter_energies():
    # Power only on the three filter peaks (bins 2, 4, 6), where each filter alone has weight 1:
    # the log10 energies are exactly [1, 2, 3]. DCT-II (orthonormal) by hand:
    # c0 = (1 + 2 + 3) / sqrt(3) = 2 sqrt(3);
    # c1 = sqrt(2/3) (cos(pi/6) + 2 cos(pi/2) + 3 cos(5 pi/6)) = -sqrt(2);
    # c2 = sqrt(2/3) (cos(pi/3) + 2 cos(pi) + 3 cos(5 pi/3)) = 0.
    power = np.zeros((9, 1))
    power[[2, 4, 6], 0] = [10.0, 100.0, 1000.0]
    cepstra = vit_lib.lfcc(power, sr=8000, n_fft=16, n_filters=3, n_coeffs=3, deltas=False)
    assert cepstra.dtype == np.float32 and cepstra.shape == (3, 1)
    np.testing.assert_allclose(cepstra[:, 0], [2 * math.sqrt(3), -math.sqrt(2), 0.0], atol=1e-5)


def test_deltas_are_the_baselines_unnormalised_neighbour_difference_with_edges_repeated():
    ramp = np.arange(5.0)[None]
    np.testing.assert_array_equal(vit_lib.delta_features(ramp), [[1, 2, 2, 2, 1]])
    np.testing.assert_array_equal(vit_lib.delta_features(ramp**2), [[1, 4, 8, 12, 7]])


def test_lfcc_of_a_waveform_has_static_delta_and_delta_delta_rows_and_one_column_per_10ms_frame():
    sr, onset = 16000, 8000  # silence, then a 1 kHz tone from 0.5 s
    audio = np.zeros(sr, np.float32)
    audio[onset:] = np.sin(2 * np.pi * 1000 * np.arange(sr - onset) / sr)
    features = vit_lib.lfcc(audio, sr)
    assert features.dtype == np.float32
    assert features.shape == (60, 1 + (sr - 320) // 160)  # 20 ms windows every 10 ms: 99 frames
    assert vit_lib.lfcc(audio, sr, deltas=False).shape == (20, 99)
    np.testing.assert_array_equal(features[:20], vit_lib.lfcc(audio, sr, deltas=False))
    np.testing.assert_allclose(features[20:40], vit_lib.delta_features(features[:20]), atol=1e-4)
    # frame t covers samples [160 t, 160 t + 320): frames 0..48 end before the onset and hold only
    # digital silence, whose 20 log10 energies all sit at the floor, log10(eps): c0 = sqrt(20) log10(eps)
    silent_c0 = math.sqrt(20) * math.log10(np.finfo(np.float64).eps)
    np.testing.assert_allclose(features[0, :49], silent_c0, rtol=1e-6)
    assert (features[0, 49:] > silent_c0 + 20).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: vit_lib.lfcc(np.zeros(16000), n_coeffs=30),
            r"n_coeffs \(30\) cannot exceed n_filters \(20\)",
        ),
        (lambda: vit_lib.lfcc(np.zeros(100)), r"at least 320 samples \(one analysis window\)"),
        (lambda: vit_lib.lfcc(np.zeros((100, 4))), r"power spectrogram has 100 bins, n_fft=512 needs 257"),
    ],
)
def test_lfcc_rejects_bad_input_with_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- LFCC-GMM baseline
def test_gmm_baseline_separates_the_fixture_and_writes_an_asvspoof_score_file(prepared, tmp_path, capsys):
    models, files = vit_lib.lfcc_gmm_baseline(prepared.cache, DATASET, n_components=4, progress=False)
    assert "LFCC-GMM (4 components)" in capsys.readouterr().out
    assert all(model.converged_ and model.covariance_type == "diag" for model in models.values())
    test_files = vit_lib.pool_file_scores(vit_lib.read_metadata(prepared.cache / DATASET / "test"))
    assert sorted(files["original_path"]) == sorted(test_files["original_path"])
    assert set(files["label"]) == {0, 1}
    assert vit_lib.eer_from_labels(files["label"], files["score"])[0] == 0.0
    assert files.groupby("label")["score"].mean()[0] > files.groupby("label")["score"].mean()[1]
    np.testing.assert_allclose(files["p_fake"], 1 / (1 + np.exp(files["score"])))
    assert set(vit_lib.per_attack_eer(files)["attack"]) == {*fixture_corpus.FIXTURE_ATTACKS, "pooled"}
    path = tmp_path / "scores_lfcc_gmm.txt"
    vit_lib.write_score_file(path, files)
    reread = vit_lib.read_score_file(path)
    assert len(reread) == len(files)
    assert vit_lib.eer_from_labels(reread["label"], reread["score"])[0] == 0.0


def test_gmm_file_score_is_the_mean_frame_log_likelihood_ratio():
    rng = np.random.default_rng(0)
    models = vit_lib.fit_gmm_baseline(
        {0: rng.normal(0, 1, (400, 2)), 1: rng.normal(3, 1, (400, 2))}, n_components=2
    )
    frames = {"a.wav": rng.normal(0, 1, (7, 2)).astype(np.float32)}
    table = vit_lib.pd.DataFrame(dict(original_path=["a.wav", "missing.wav"], label=[0, 1]))
    scored = vit_lib.score_gmm_baseline(models, table, frames)
    assert scored["original_path"].tolist() == ["a.wav"]  # no frames: left out
    x = frames["a.wav"]
    expected = np.mean(models[0].score_samples(x) - models[1].score_samples(x))
    assert scored["score"][0] == pytest.approx(expected)
    assert scored["score"][0] > 0  # bona fide-like frames


def test_gmm_asked_for_more_components_than_frames_gets_one_clear_message():
    frames = {0: np.zeros((5, 3)), 1: np.ones((50, 3))}
    with pytest.raises(
        ValueError,
        match=r"GMM of 8 components needs at least as many frames, but the "
        r"bona fide class has 5 training frames: use fewer components",
    ):
        vit_lib.fit_gmm_baseline(frames, n_components=8)


def test_gmm_class_without_frames_gets_one_clear_message():
    with pytest.raises(ValueError, match=r"no spoof training frames"):
        vit_lib.fit_gmm_baseline({0: np.ones((50, 3)), 1: np.zeros((0, 3))}, n_components=2)
    with pytest.raises(ValueError, match=r"no bona fide training frames"):
        vit_lib.fit_gmm_baseline({1: np.ones((50, 3))}, n_components=2)


def test_unusable_files_are_skipped_with_their_reason(prepared, tmp_path):
    (tmp_path / "text.wav").write_text("not audio")
    good = prepared.corpus / "real" / "spk01_real_0.wav"
    files = vit_lib.pd.DataFrame(dict(original_path=[str(good), "text.wav", "missing.wav"]))
    frames, skipped = vit_lib.file_lfcc_frames(files, tmp_path, max_frames_per_file=50, progress=False)
    assert list(frames) == [str(good)] and frames[str(good)].shape == (50, 60)
    assert [path for path, _ in skipped] == ["text.wav", "missing.wav"]
    assert skipped[0][1].startswith("cannot decode") and skipped[1][1] == "file not found"
