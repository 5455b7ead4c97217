"""Unit tests of training, resuming, DDP under torchrun, inference and tracking, on a
tiny fixture corpus prepared once per module. Everything runs on CPU with wandb disabled except the
wandb tests, which check that wandb never prompts and goes offline without a key."""

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import vit_cli as cli
import vit_lib
from vit_audio import tracking
from vit_lib import TrainingConfig

DATASET = "vit_balanced_dataset"
EPOCH_LINE = re.compile(
    r"^Epoch \d+ Train Loss: \d\.\d{4}, Val Loss: \d\.\d{4}, Val Acc: \d\.\d{4}, "
    r"Val F1: \d\.\d{4}, Val ROC AUC: \d\.\d{4}"
)
TEST_LINE = re.compile(
    r"^Test Loss: \d\.\d{4}, Test Accuracy: \d\.\d{4}, Test F1-score: \d\.\d{4}, "
    r"Test ROC AUC: \d\.\d{4}$"
)
# The original recipe (Adam, lr 1e-4, seed 42) at batch 8 for 3 epochs. The epoch loss on so few
# segments is noisy (augmentation, dropout), but it is deterministic: 0.648, 0.754, 0.793 on the
# fixture when written (its fakes are meant to be hard: 3 epochs on ten segments learn nothing).
RECIPE = dict(
    model_size="ViT_Small",
    dataset_name=DATASET,
    epochs=3,
    batch_size=8,
    learning_rate=1e-4,
    num_workers=0,
    seed=42,
    wandb_mode="disabled",
    progress=False,
)


def train(prepared, tmp, **overrides):
    """run_training into `tmp`; returns (metrics, what it printed)."""
    config = TrainingConfig.original(
        **{
            **RECIPE,
            "cache_dir": str(prepared.cache),
            "checkpoint_dir": str(tmp / "checkpoints"),
            "results_dir": str(tmp / "results"),
            "run_name": "fixture",
            **overrides,
        }
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        metrics = vit_lib.run_training(config)
    return metrics, out.getvalue()


@pytest.fixture(scope="module")
def baseline(prepared, tmp_path_factory):
    """One uninterrupted run of RECIPE, shared by the training, resume and inference tests."""
    tmp = tmp_path_factory.mktemp("baseline")
    metrics, printed = train(prepared, tmp)
    return SimpleNamespace(
        tmp=tmp,
        metrics=metrics,
        printed=printed,
        run_name="fixture",
        best=tmp / "checkpoints" / "best_vit_model_fixture.pth",
    )


def losses(history, key="train_loss"):
    return [entry[key] for entry in history]


# ---------------------------------------------------------------- training
@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """Noise against tones, 4 speakers x 2 clips of 3 s, prepared as DATASET: a difference RECIPE
    learns within its 3 epochs."""
    root = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    t = np.arange(3 * vit_lib.DataConfig.SR) / vit_lib.DataConfig.SR
    for speaker in range(4):
        for clip in range(2):
            write_wav(
                root / "corpus" / "real" / f"spk{speaker}_real_{clip}.wav", 0.1 * rng.standard_normal(len(t))
            )
            write_wav(
                root / "corpus" / "fake" / f"spk{speaker}_fake_{clip}.wav",
                0.1 * np.sin(2 * np.pi * rng.uniform(200, 800) * t),
            )
    with contextlib.redirect_stdout(io.StringIO()):
        vit_lib.prepare_dataset(
            root / "corpus",
            DATASET,
            cache_dir=root / "cache",
            num_workers=1,
            progress=False,
            speaker_pattern=r"^(spk\d)_",
            split_fractions=(0.5, 0.25, 0.25),
        )
    return SimpleNamespace(cache=root / "cache")


def test_training_loss_falls_on_a_learnable_corpus(learnable, baseline, tmp_path):
    metrics, _ = train(learnable, tmp_path)
    history = metrics["history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"], losses(history)
    assert all(np.isfinite(losses(history))) and all(np.isfinite(losses(baseline.metrics["history"])))


def test_training_prints_epoch_and_test_lines_in_the_original_format(prepared, baseline):
    lines = baseline.printed.splitlines()
    epoch_lines = [line for line in lines if line.startswith("Epoch ")]
    assert len(epoch_lines) == RECIPE["epochs"]
    for line in epoch_lines:
        assert EPOCH_LINE.match(line), line
    test_lines = [line for line in lines if line.startswith("Test ")]
    assert len(test_lines) == 1 and TEST_LINE.match(test_lines[0]), test_lines
    # the printed numbers are the returned ones
    history = baseline.metrics["history"]
    for line, entry in zip(epoch_lines, history):
        assert f"Train Loss: {entry['train_loss']:.4f}, Val Loss: {entry['val_loss']:.4f}" in line
        assert f"Val F1: {entry['val_f1']:.4f}" in line
    assert f"Test Loss: {baseline.metrics['test_loss']:.4f}" in test_lines[0]
    assert f"Test F1-score: {baseline.metrics['test_f1']:.4f}" in test_lines[0]
    assert (
        f"Trainable parameters: {vit_lib.count_parameters(vit_lib.AudioViT(config=vit_lib.ViT_Small)):,}"
        in baseline.printed
    )
    sizes = prepared.summary["segments_per_split"]
    assert (
        f"Dataset sizes (segments): train {sizes['train']}, val {sizes['val']}, test {sizes['test']}"
        in baseline.printed
    )
    assert "Device: cpu" in baseline.printed


def test_best_checkpoint_holds_model_config_epoch_and_metrics(baseline):
    assert baseline.best.is_file()
    checkpoint = torch.load(baseline.best, map_location="cpu", weights_only=True)
    assert {"model_state", "vit_config", "model_config", "epoch", "metrics"} <= set(checkpoint)
    assert checkpoint["vit_config"] == asdict(vit_lib.ViT_Small)
    assert checkpoint["model_config"] == asdict(vit_lib.SEGMENT_CONFIGS[DATASET])
    history = baseline.metrics["history"]
    best_f1 = max(entry["val_f1"] for entry in history)
    best_epoch = next(entry["epoch"] for entry in history if entry["val_f1"] == best_f1)  # first best
    assert checkpoint["epoch"] == best_epoch == baseline.metrics["best_epoch"]
    assert checkpoint["metrics"] == history[best_epoch - 1]
    model = vit_lib.AudioViT(config=vit_lib.ViT_Small)
    model.load_state_dict(checkpoint["model_state"])  # strict: every weight present
    last = torch.load(baseline.tmp / "checkpoints" / "last_vit_model_fixture.pth", weights_only=True)
    assert last["epoch"] == RECIPE["epochs"] and "optimizer_state" in last


def test_training_saves_confusion_matrix_and_results(baseline):
    png = baseline.tmp / "results" / "confusion_matrix_fixture.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (baseline.tmp / "results" / "training_fixture.json").is_file()
    metrics = baseline.metrics
    assert 0 <= metrics["test_accuracy"] <= 1 and 0 <= metrics["test_eer"] <= 1


def test_two_runs_with_same_seed_give_identical_histories(prepared, baseline, tmp_path):
    again, _ = train(prepared, tmp_path)
    assert again["history"] == baseline.metrics["history"]
    assert again["test_loss"] == baseline.metrics["test_loss"]


# ---------------------------------------------------------------- resume
def test_resumed_run_matches_uninterrupted_run(prepared, baseline, tmp_path):
    first, _ = train(prepared, tmp_path, epochs=1)
    assert len(first["history"]) == 1
    resumed, printed = train(prepared, tmp_path, resume=True)
    assert "Resuming from epoch 1" in printed
    assert len([line for line in printed.splitlines() if line.startswith("Epoch ")]) == RECIPE["epochs"] - 1
    expected = baseline.metrics["history"]
    assert [entry["epoch"] for entry in resumed["history"]] == [entry["epoch"] for entry in expected]
    np.testing.assert_allclose(losses(resumed["history"]), losses(expected), atol=1e-6, rtol=0)
    for key in ("val_loss", "val_f1", "val_accuracy", "val_roc_auc", "val_eer", "lr"):
        np.testing.assert_allclose(losses(resumed["history"], key), losses(expected, key), atol=1e-6, rtol=0)
    assert resumed["best_epoch"] == baseline.metrics["best_epoch"]
    best = torch.load(tmp_path / "checkpoints" / "best_vit_model_fixture.pth", weights_only=True)
    assert best["best_val_f1"] == max(losses(expected, "val_f1"))
    assert resumed["test_loss"] == pytest.approx(baseline.metrics["test_loss"], abs=1e-6)
    assert resumed["test_f1"] == baseline.metrics["test_f1"]


def test_recipe_options_run_adamw_warmup_cosine_weighted_loss_clipping_early_stopping(prepared, tmp_path):
    metrics, printed = train(
        prepared,
        tmp_path,
        epochs=1,
        optimizer="adamw",
        weight_decay=0.05,
        lr_schedule="warmup_cosine",
        warmup_epochs=0.5,
        class_balance="weighted_loss",
        grad_clip_norm=1.0,
        early_stopping_patience=1,
    )
    assert len(metrics["history"]) == 1 and np.isfinite(metrics["history"][0]["train_loss"])
    assert "optimizer adamw, schedule warmup_cosine, class balance weighted_loss" in printed
    # warm-up over half the epoch's steps, then cosine decay to 0 at the end of the (only) epoch
    assert metrics["history"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_recipe_option_balanced_sampler_runs_and_resume_without_checkpoint_starts_fresh(prepared, tmp_path):
    metrics, printed = train(prepared, tmp_path, epochs=1, class_balance="balanced_sampler", resume=True)
    assert len(metrics["history"]) == 1 and np.isfinite(metrics["history"][0]["train_loss"])
    assert "class balance balanced_sampler" in printed
    assert "Resuming" not in printed  # nothing to resume from in a fresh checkpoint folder


def test_one_class_loss_trains_stores_its_head_and_scores_like_a_linear_head(learnable, tmp_path):
    metrics, _ = train(learnable, tmp_path, loss="one_class")
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"], losses(history)
    model, checkpoint = vit_lib.load_model(tmp_path / "checkpoints" / "best_vit_model_fixture.pth")
    assert checkpoint["vit_config"]["head"] == "one_class"
    assert isinstance(model.mlp_head[-1], vit_lib.OneClassHead)
    assert 0 <= metrics["test_eer"] <= 1


def test_a_checkpoint_from_before_the_head_setting_is_a_linear_head(trained):
    older = {**trained.checkpoint, "vit_config": {**trained.checkpoint["vit_config"]}}
    del older["vit_config"]["head"]
    vit_lib.check_checkpoint_compatible(older, vit_lib.ViT_Small)
    with pytest.raises(ValueError, match="head: checkpoint linear vs expected one_class"):
        vit_lib.check_checkpoint_compatible(older, vit_lib.make_vit_config("ViT_Small", head="one_class"))


@pytest.mark.parametrize("speed_up", [True, False])
def test_training_config_switches_the_speed_ups(prepared, tmp_path, monkeypatch, speed_up):
    sped_up = []
    monkeypatch.setattr(vit_lib, "speed_up", lambda model: sped_up.append(model) or model)
    train(prepared, tmp_path, epochs=1, speed_up=speed_up)
    assert len(sped_up) == int(speed_up)


def test_warmup_cosine_schedule_rises_linearly_then_decays_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = vit_lib.warmup_cosine_schedule(optimizer, warmup_steps=2, total_steps=6)
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(
        rates,
        [0.5, 1.0, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4)), 0.0],
        atol=1e-12,
    )


def tiny_loaders():
    """Random 16x16 'spectrograms', both classes in each split, for a 1-layer ViT."""
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(8, 1, 16, 16, generator=generator), torch.tensor([0, 1] * 4)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=vit_lib.custom_collate_fn)
    config = vit_lib.ViTConfig("tiny", (16, 16), (8, 8), dim=8, depth=1, heads=1, mlp_dim=8)
    return loader, config


def test_early_stopping_stops_after_patience_epochs_without_val_f1_gain(tmp_path):
    loader, config = tiny_loaders()
    torch.manual_seed(0)
    model = vit_lib.AudioViT(config=config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights never change: val F1 never improves
    with contextlib.redirect_stdout(io.StringIO()) as out:
        config = TrainingConfig.original(
            epochs=10,
            run_name="tiny",
            checkpoint_dir=str(tmp_path),
            early_stopping_patience=2,
            progress=False,
        )
        history = vit_lib.train_model(model, {"train": loader, "val": loader}, config, optimizer=optimizer)
    assert [entry["epoch"] for entry in history] == [1, 2, 3]  # best at 1, then 2 stale epochs
    assert len(re.findall(r"^Epoch \d", out.getvalue(), re.M)) == 3
    assert torch.load(tmp_path / "best_vit_model_tiny.pth", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "last_vit_model_tiny.pth", weights_only=True)["stale_epochs"] == 2


def tiny_training(tmp_path, epochs, state=None, **overrides):
    """train_model on tiny_loaders with Adam, from the same initial weights each time (or from `state`,
    a last checkpoint); returns (history, the weights after each optimiser step)."""
    loader, config = tiny_loaders()
    torch.manual_seed(0)
    model = vit_lib.AudioViT(config=config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    if state is not None:
        model.load_state_dict(state["model_state"])
    steps = []
    optimizer.register_step_post_hook(
        lambda *_: steps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    )
    with contextlib.redirect_stdout(io.StringIO()):
        config = TrainingConfig(
            epochs=epochs, run_name="tiny", checkpoint_dir=str(tmp_path), progress=False, **overrides
        )
        history = vit_lib.train_model(
            model, {"train": loader, "val": loader}, config, optimizer=optimizer, resume=state
        )
    return history, steps


def test_moving_average_of_the_weights_is_what_is_validated_and_kept_as_best(tmp_path):
    decay = 0.6
    _, steps = tiny_training(tmp_path, epochs=1, ema_decay=decay)
    assert len(steps) == 2  # 8 items in batches of 4
    best = torch.load(tmp_path / "best_vit_model_tiny.pth", weights_only=True)
    last = torch.load(tmp_path / "last_vit_model_tiny.pth", weights_only=True)
    for name, value in best["model_state"].items():
        # the first step's weights start the average; each later step moves it (1 - decay) of the way
        np.testing.assert_allclose(value, decay * steps[0][name] + (1 - decay) * steps[1][name], atol=1e-6)
        torch.testing.assert_close(
            last["model_state"][name], steps[1][name]
        )  # resuming needs the raw weights
        torch.testing.assert_close(last["ema_state"][f"module.{name}"], value)
    assert not torch.equal(best["model_state"]["cls_token"], last["model_state"]["cls_token"])


def test_resumed_run_with_moving_average_matches_uninterrupted_run(tmp_path):
    whole, _ = tiny_training(tmp_path / "whole", epochs=3, ema_decay=0.6)
    tiny_training(tmp_path / "parts", epochs=1, ema_decay=0.6)
    state = torch.load(tmp_path / "parts" / "last_vit_model_tiny.pth", weights_only=True)
    resumed, _ = tiny_training(tmp_path / "parts", epochs=3, state=state, ema_decay=0.6)
    assert resumed == whole
    for which in ("best", "last"):
        expected = torch.load(tmp_path / "whole" / f"{which}_vit_model_tiny.pth", weights_only=True)
        got = torch.load(tmp_path / "parts" / f"{which}_vit_model_tiny.pth", weights_only=True)
        for key in ("model_state", "ema_state") if which == "last" else ("model_state",):
            for name, value in expected[key].items():
                torch.testing.assert_close(got[key][name], value, rtol=0, atol=1e-6)


def test_moving_average_decay_must_lie_between_0_and_1():
    for decay in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="ema_decay must be in"):
            TrainingConfig(ema_decay=decay)


# ---------------------------------------------------------------- DDP under torchrun
def test_ddp_two_processes_train_one_epoch_and_print_once(prepared, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", VIT_PROGRESS="0", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "vit_cli",
        "train",
        "--cache-dir",
        str(prepared.cache),
        "--checkpoint-dir",
        str(tmp_path / "checkpoints"),
        "--results-dir",
        str(tmp_path / "results"),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--wandb-mode",
        "disabled",
        "--dataset",
        DATASET,
        "--class-balance",
        "weighted_loss",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    epoch_lines = [line for line in lines if line.startswith("Epoch ")]
    assert len(epoch_lines) == 1 and EPOCH_LINE.match(epoch_lines[0]), result.stdout
    assert epoch_lines[0].startswith("Epoch 1 ")
    test_lines = [line for line in lines if line.startswith("Test ")]
    assert len(test_lines) == 1 and TEST_LINE.match(test_lines[0]), result.stdout
    assert "Device: cpu x 2 processes" in result.stdout
    sizes = prepared.summary["segments_per_split"]
    assert (
        f"Dataset sizes (segments): train {sizes['train']}, val {sizes['val']}, test {sizes['test']}"
        in result.stdout
    )
    values = dict(
        re.findall(r"(Train Loss|Val Loss|Val Acc|Val F1|Val ROC AUC): (\d\.\d{4})", epoch_lines[0])
    )
    assert len(values) == 5 and all(0 <= float(v) <= 5 for v in values.values())
    run_name = TrainingConfig(dataset_name=DATASET).run_name
    checkpoint = torch.load(tmp_path / "checkpoints" / f"best_vit_model_{run_name}.pth", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(not key.startswith("module.") for key in checkpoint["model_state"])  # unwrapped from DDP
    assert (tmp_path / "results" / f"confusion_matrix_{run_name}.png").is_file()


# ---------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def trained(baseline):
    model, checkpoint = vit_lib.load_model(baseline.best)
    return SimpleNamespace(model=model, checkpoint=checkpoint, path=baseline.best)


def write_wav(path, audio, sr=vit_lib.DataConfig.SR):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, sr, subtype="PCM_16")
    return path


def test_load_model_rebuilds_the_trained_model_in_eval_mode(trained):
    assert not trained.model.training
    assert asdict(trained.model.config) == asdict(vit_lib.ViT_Small)
    assert trained.checkpoint["epoch"] >= 1


def test_score_audio_file_gives_timeline_and_verdict(prepared, trained):
    clip = prepared.corpus / "real" / "spk01_real_0.wav"
    timeline, verdict = vit_lib.score_audio_file(clip, trained.model, trained.checkpoint)
    duration = sf.info(clip).duration
    expected_segments = (
        1
        if duration < 8
        else len(range(0, int((duration - 8) // 4) + 1)) + (1 if (duration - 8) % 4 > 1e-3 else 0)
    )
    assert len(timeline) == verdict["segments"] == expected_segments
    assert {"start_s", "end_s", "p_fake", "score"} <= set(timeline.columns)
    assert timeline["p_fake"].between(0, 1).all()
    assert (timeline["end_s"] > timeline["start_s"]).all()
    assert verdict["verdict"] in ("real", "fake")
    assert verdict["verdict"] == ("fake" if verdict["score"] <= verdict["threshold"] else "real")
    assert verdict["score"] == pytest.approx(timeline["score"].mean())
    assert verdict["duration_s"] == pytest.approx(duration, abs=1e-3)


@pytest.mark.parametrize("seconds, starts", [(60, list(range(0, 53, 4))), (62, list(range(0, 53, 4)) + [54])])
def test_long_file_is_scored_in_8s_windows_with_half_overlap(prepared, trained, tmp_path, seconds, starts):
    sr = vit_lib.DataConfig.SR
    clips = [
        vit_lib.load_audio(path, 16000) for path in sorted((prepared.corpus / "real").glob("spk0[1-3]_*.wav"))
    ]
    audio = np.resize(np.concatenate(clips), seconds * sr)
    path = write_wav(tmp_path / f"long_{seconds}.wav", 0.5 * audio / np.abs(audio).max())
    timeline, verdict = vit_lib.score_audio_file(path, trained.model, trained.checkpoint)
    assert len(timeline) == verdict["segments"] == len(starts)  # 60 s: (60 - 8) / 4 + 1 = 14
    np.testing.assert_allclose(timeline["start_s"], starts)
    np.testing.assert_allclose(timeline["end_s"], np.array(starts) + 8.0)
    assert timeline["end_s"].iloc[-1] == pytest.approx(seconds)
    assert timeline["p_fake"].between(0, 1).all()


def test_undecodable_and_too_short_files_raise_audio_error(trained, tmp_path):
    text = tmp_path / "not_audio.wav"
    text.write_bytes(b"this is not audio\n")
    with pytest.raises(vit_lib.AudioError, match="cannot decode"):
        vit_lib.score_audio_file(text, trained.model, trained.checkpoint)
    short = write_wav(tmp_path / "short.wav", 0.1 * np.random.default_rng(0).standard_normal(800))  # 0.05 s
    with pytest.raises(vit_lib.AudioError, match="too short"):
        vit_lib.score_audio_file(short, trained.model, trained.checkpoint)


def test_score_audio_file_rejects_model_config_of_other_width(trained, prepared):
    other_width = {
        **trained.checkpoint,
        "model_config": asdict(vit_lib.SEGMENT_CONFIGS["vit_performance_dataset"]),
    }
    with pytest.raises(ValueError, match="model expects 256 frames"):
        vit_lib.score_audio_file(prepared.corpus / "real" / "spk01_real_0.wav", trained.model, other_width)


def test_check_checkpoint_compatible_names_the_mismatch(trained):
    vit_lib.check_checkpoint_compatible(trained.checkpoint, vit_lib.ViT_Small)  # the same: no error
    with pytest.raises(ValueError, match=r"dim: checkpoint 192 vs expected 384") as error:
        vit_lib.check_checkpoint_compatible(trained.checkpoint, vit_lib.ViT_Large, "best.pth")
    message = str(error.value)
    assert message.startswith("best.pth does not match the model")
    assert (
        "heads: checkpoint 3 vs expected 6" in message
        and "mlp_dim: checkpoint 768 vs expected 1536" in message
    )
    assert "depth" not in message  # both have 6 layers: only what differs is named
    with pytest.raises(ValueError, match=r"image_size: checkpoint \[128, 256\] vs expected \[128, 320\]"):
        vit_lib.check_checkpoint_compatible(
            trained.checkpoint, vit_lib.make_vit_config("ViT_Small", (128, 320))
        )


def test_load_checkpoint_of_garbage_file_raises_value_error_naming_path(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a torch checkpoint" * 10)
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        vit_lib.load_checkpoint(garbage)
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        vit_lib.load_model(garbage)
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        vit_lib.load_checkpoint(tmp_path / "missing.pth")


def test_score_cli_writes_one_line_per_decodable_file_and_lists_the_rest(prepared, trained, tmp_path, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("spk01_real_0.wav", "spk02_real_1.wav"):
        shutil.copy(prepared.corpus / "real" / name, folder / name)
    shutil.copy(prepared.corpus / "fake" / "noisy_excitation" / "spk01_fake_0.wav", folder / "sub_fake.wav")
    (folder / "broken.wav").write_bytes(b"not audio at all")
    write_wav(folder / "tiny.wav", np.zeros(400))  # 0.025 s
    output = tmp_path / "scores.txt"
    cli.main(["score", str(trained.path), str(folder), "--output", str(output)])
    lines = output.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["spk01_real_0", "spk02_real_1", "sub_fake"]
    for line in lines:
        _, score = line.split()
        assert np.isfinite(float(score))
    # the same numbers as scoring the files one by one
    _, verdict = vit_lib.score_audio_file(folder / "spk01_real_0.wav", trained.model, trained.checkpoint)
    assert f"spk01_real_0 {verdict['score']:.6f}" in lines
    printed = capsys.readouterr().out
    assert "Scored 3 file(s)" in printed and "2 could not be scored" in printed
    assert re.search(r"skipped .*broken\.wav: cannot decode", printed)
    assert re.search(r"skipped .*tiny\.wav: too short", printed)


# ---------------------------------------------------------------- tracking
@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    """No key anywhere: no WANDB_API_KEY, no wandb_api_key.txt in cwd, home or repo, stdin closed."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT", "WANDB_DIR", "WANDB_CONFIG_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "REPO_ROOT", tmp_path)
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    assert tracking.wandb_api_key() is None
    return tmp_path


def test_wandb_without_key_goes_offline_silently_without_prompting(no_wandb_key, capfd):
    started = time.monotonic()
    run = vit_lib.init_wandb("t", {"a": 1}, save_dir=no_wandb_key)
    try:
        elapsed = time.monotonic() - started
        assert run.offline and not run.disabled
        assert run.settings.mode == "offline"
        assert elapsed < 30, elapsed
        run.log({"x": 1.0})
    finally:
        run.finish()
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    assert list((no_wandb_key / "wandb").glob("offline-run-*"))


def test_wandb_mode_disabled_from_environment_gives_disabled_run(no_wandb_key, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = vit_lib.init_wandb("t", {}, save_dir=no_wandb_key)
    try:
        assert run.disabled
        run.log({"x": 1.0})
    finally:
        run.finish()
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    assert not list((no_wandb_key / "wandb").glob("offline-run-*"))


def test_wandb_key_file_is_found_in_working_folder(no_wandb_key):
    (no_wandb_key / "wandb_api_key.txt").write_text("  0123456789abcdef  \n")
    assert tracking.wandb_api_key() == "0123456789abcdef"
