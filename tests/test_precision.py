"""Unit tests of the rule that picks the training and scoring precision (bf16 autocast only where the
hardware has bf16 instructions), and of training and scoring under it. The rule is tested with the CPU
flags and kernels given, so the tests give the same answer on every machine."""

import contextlib
import io

import numpy as np
import pytest
import torch

import vit_lib
from vit_audio import devices
from vit_lib import TrainingConfig, choose_precision

AVX512_BF16_CPU = dict(flags={"avx2", "avx512f", "avx512_bf16"}, kernels="AVX512")
AVX2_CPU = dict(flags={"avx2", "fma"}, kernels="AVX2")


@pytest.fixture(autouse=True)
def no_precision_from_environment(monkeypatch):
    monkeypatch.delenv("VIT_MIXED_PRECISION", raising=False)


def test_auto_is_bf16_on_a_cpu_with_bf16_instructions_and_says_why():
    precision = choose_precision("cpu", "auto", **AVX512_BF16_CPU)
    assert precision.dtype == torch.bfloat16
    assert str(precision) == "bf16 autocast (the CPU has avx512_bf16)"


def test_auto_is_bf16_with_amx():
    precision = choose_precision("cpu", "auto", flags={"amx_bf16", "amx_tile"}, kernels="AVX512")
    assert precision.dtype == torch.bfloat16 and "amx_bf16" in precision.reason


def test_auto_is_fp32_on_a_cpu_without_bf16_instructions():
    precision = choose_precision("cpu", "auto", **AVX2_CPU)
    assert precision.dtype is None
    assert str(precision) == "fp32 (the CPU has none of avx512_bf16, amx_bf16)"


def test_auto_is_fp32_where_pytorch_runs_generic_kernels_on_a_bf16_cpu():
    precision = choose_precision("cpu", "auto", flags={"avx512_bf16"}, kernels="DEFAULT")
    assert precision.dtype is None and "DEFAULT kernels" in precision.reason


def test_auto_is_fp32_where_the_cpu_flags_cannot_be_read():
    assert choose_precision("cpu", "auto", flags=set(), kernels="AVX512").dtype is None


def test_off_is_fp32_everywhere_and_on_is_bf16_with_a_warning_on_a_slow_cpu():
    assert choose_precision("cpu", "off", **AVX512_BF16_CPU).dtype is None
    forced = choose_precision("cpu", "on", **AVX2_CPU)
    assert forced.dtype == torch.bfloat16 and "expect it to be slower" in forced.reason
    assert "slower" not in choose_precision("cpu", "on", **AVX512_BF16_CPU).reason


def test_environment_replaces_auto_but_not_an_explicit_setting(monkeypatch):
    monkeypatch.setenv("VIT_MIXED_PRECISION", "off")
    assert str(choose_precision("cpu", "auto", **AVX512_BF16_CPU)) == "fp32 (VIT_MIXED_PRECISION=off)"
    assert choose_precision("cpu", "on", **AVX512_BF16_CPU).dtype == torch.bfloat16
    monkeypatch.setenv("VIT_MIXED_PRECISION", "fast")
    with pytest.raises(ValueError, match="VIT_MIXED_PRECISION='fast'"):
        choose_precision("cpu", "auto")


def test_training_config_takes_three_settings_and_reads_the_old_boolean():
    assert TrainingConfig().mixed_precision == "auto"
    assert TrainingConfig(mixed_precision=True).mixed_precision == "auto"
    assert TrainingConfig(mixed_precision=False).mixed_precision == "off"
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainingConfig(mixed_precision="bf16")


def test_only_fp16_scales_the_loss():
    assert not vit_lib.Precision(torch.bfloat16, "test").grad_scaler("cpu").is_enabled()
    assert not vit_lib.Precision(None, "test").grad_scaler("cpu").is_enabled()


def test_the_cpu_flags_are_a_set_of_names():
    flags = devices.cpu_flags()
    assert isinstance(flags, set) and all(isinstance(flag, str) and " " not in flag for flag in flags)


def tiny_model_and_loader():
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(8, 1, 16, 16, generator=generator), torch.tensor([0, 1] * 4)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=vit_lib.custom_collate_fn)
    torch.manual_seed(0)
    model = vit_lib.AudioViT(
        config=vit_lib.ViTConfig("tiny", (16, 16), (8, 8), dim=8, depth=1, heads=1, mlp_dim=8)
    )
    return model, loader


def test_bf16_training_keeps_fp32_weights_optimiser_state_and_checkpoints(tmp_path):
    model, loader = tiny_model_and_loader()
    seen = []
    model.mlp_head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with contextlib.redirect_stdout(io.StringIO()):
        config = TrainingConfig(epochs=2, run_name="tiny", checkpoint_dir=str(tmp_path), progress=False)
        history = vit_lib.train_model(
            model,
            {"train": loader, "val": loader},
            config,
            optimizer=optimizer,
            precision=vit_lib.Precision(torch.bfloat16, "test"),
        )
    assert torch.bfloat16 in seen  # the training forward passes ran in bf16 ...
    assert seen[-1] == torch.float32  # ... and validation in fp32
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert all(
        value.dtype == torch.float32
        for state in optimizer.state.values()
        for value in state.values()
        if value.is_floating_point() and value.dim()
    )
    best = torch.load(tmp_path / "best_vit_model_tiny.pth", weights_only=True)
    assert all(
        value.dtype == torch.float32 for value in best["model_state"].values() if value.is_floating_point()
    )
    assert all(np.isfinite(entry["train_loss"]) for entry in history)


def test_run_training_prints_its_precision(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_MIXED_PRECISION", "off")
    config = TrainingConfig(
        dataset_name="vit_balanced_dataset",
        epochs=1,
        batch_size=8,
        cache_dir=str(prepared.cache),
        checkpoint_dir=str(tmp_path),
        results_dir=str(tmp_path),
        run_name="precision",
        wandb_mode="disabled",
        progress=False,
    )
    with contextlib.redirect_stdout(io.StringIO()) as out:
        vit_lib.run_training(config)
    assert "\nPrecision: fp32 (VIT_MIXED_PRECISION=off)\n" in out.getvalue()


def test_scoring_under_bf16_gives_the_fp32_scores_to_bf16_accuracy(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_MIXED_PRECISION", "off")
    config = TrainingConfig(
        dataset_name="vit_balanced_dataset",
        epochs=1,
        batch_size=8,
        cache_dir=str(prepared.cache),
        checkpoint_dir=str(tmp_path),
        results_dir=str(tmp_path),
        run_name="scoring",
        wandb_mode="disabled",
        progress=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        vit_lib.run_training(config)
    model, checkpoint = vit_lib.load_model(config.checkpoint_path())
    clip = next(path for path in sorted(prepared.corpus.rglob("*.wav")) if "not_audio" not in path.name)
    fp32, _ = vit_lib.score_audio_file(clip, model, checkpoint)
    bf16, _ = vit_lib.score_audio_file(
        clip, model, checkpoint, precision=vit_lib.Precision(torch.bfloat16, "test")
    )
    assert len(fp32) == len(bf16)
    np.testing.assert_allclose(bf16["score"], fp32["score"], atol=0.05 + 0.05 * np.abs(fp32["score"]).max())
