"""Unit tests of the settings the detection recipe chooses between: overlapping patches, the
convolutional patch embedding, pooling, the patch LayerNorm, the front-ends, and how the best epoch
is selected."""

from dataclasses import asdict

import numpy as np
import pytest
import torch
from einops import rearrange

import vit_lib
from vit_lib import AudioViT, DataConfig, ViTConfig


def small_config(**options):
    return ViTConfig("tiny", (32, 64), (16, 16), dim=32, depth=1, heads=2, mlp_dim=64, **options)


def test_overlapping_patches_are_cut_every_stride_in_row_major_order():
    config = small_config(patch_stride=(16, 8))
    assert (config.patch_rows, config.patch_columns, config.num_patches) == (2, 7, 14)
    image = torch.arange(32 * 64, dtype=torch.float32).reshape(1, 1, 32, 64)
    patches = vit_lib.patchify(config)(image)
    assert patches.shape == (1, 14, 256)
    second_patch = image[0, 0, 0:16, 8:24]  # row 0, column 1: 8 frames to the right
    assert torch.equal(patches[0, 1], rearrange(second_patch, "p1 p2 -> (p1 p2)"))


def test_non_overlapping_patches_are_the_plain_reshape():
    config = small_config()
    image = torch.randn(2, 1, 32, 64)
    expected = rearrange(image, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=16, p2=16)
    assert torch.equal(vit_lib.patchify(config)(image), expected)


def test_a_stride_that_does_not_tile_the_image_is_a_clear_error():
    with pytest.raises(ValueError, match=r"not divisible by patch size \(16, 16\) with stride \(16, 10\)"):
        small_config(patch_stride=(16, 10))


def test_conv_patch_embedding_gives_one_token_per_patch():
    config = small_config(patch_embedding="conv")
    model = AudioViT(config=config).eval()
    tokens = model.to_patch_embedding(torch.randn(3, 1, 32, 64))
    assert tokens.shape == (3, config.num_patches, 32)
    assert model(torch.randn(3, 1, 32, 64)).shape == (3, 2)


@pytest.mark.parametrize(
    "size, low, high",
    [("ViT_Small", 2.0e6, 3.0e6), ("ViT_Medium", 4.0e6, 6.0e6), ("ViT_Large", 10.0e6, 12.0e6)],
)
def test_conv_patch_embedding_keeps_each_size_in_its_parameter_range(size, low, high):
    config = vit_lib.make_vit_config(size, (128, 256), patch_embedding="conv")
    assert low <= vit_lib.count_parameters(AudioViT(config=config)) <= high


def test_conv_patch_embedding_needs_square_power_of_two_patches():
    with pytest.raises(ValueError, match="square, non-overlapping patches"):
        ViTConfig("tiny", (24, 48), (12, 12), dim=32, depth=1, heads=2, mlp_dim=64, patch_embedding="conv")
    with pytest.raises(ValueError, match="patch_embedding must be 'linear' or 'conv'"):
        small_config(patch_embedding="mlp")


def test_mean_pooling_classifies_the_mean_token_and_cls_the_first():
    torch.manual_seed(0)
    image = torch.randn(2, 1, 32, 64)
    for pool in ("cls", "mean"):
        model = AudioViT(config=small_config(pool=pool)).eval()
        tokens = model.to_patch_embedding(image)
        tokens = torch.cat((model.cls_token.expand(2, -1, -1), tokens), dim=1) + model.pos_embedding
        out = model.transformer(tokens)
        pooled = out.mean(dim=1) if pool == "mean" else out[:, 0]
        assert torch.allclose(model(image), model.mlp_head(pooled), atol=1e-6)


def test_switching_off_the_patch_layernorm_removes_its_parameters_only():
    with_norm = vit_lib.count_parameters(AudioViT(config=small_config()))
    without = vit_lib.count_parameters(AudioViT(config=small_config(patch_norm=False)))
    assert with_norm - without == 2 * 256


def test_vit_config_round_trips_through_its_dict():
    config = small_config(patch_stride=(16, 8), pool="mean", patch_norm=False)
    rebuilt = ViTConfig(**asdict(config))
    assert asdict(rebuilt) == asdict(config)


def tone(frequency, seconds=1.0, sr=16000):
    return np.sin(2 * np.pi * frequency * np.arange(int(seconds * sr)) / sr).astype(np.float32)


def test_log_mel_front_end_is_the_log_mel_spectrogram():
    audio = tone(440) + 0.01 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    assert np.array_equal(
        vit_lib.spectrogram_features(audio, DataConfig()), vit_lib.log_mel_spectrogram(audio)
    )


def test_linear_front_end_places_a_tone_in_the_band_of_its_frequency():
    config = DataConfig(FEATURE="linear")
    spec = vit_lib.spectrogram_features(tone(5000), config)
    assert spec.shape[0] == config.N_MELS
    # 128 triangles with 130 edges evenly spaced over 0-8000 Hz: filter i peaks at (i + 1) * 8000 / 129 Hz
    assert abs(int(spec.mean(axis=1).argmax()) - round(5000 * 129 / 8000 - 1)) <= 1


def test_lfcc_front_end_is_the_dct_of_the_linear_front_end():
    import scipy.fft

    audio = tone(300) + tone(2500)
    linear = vit_lib.spectrogram_features(audio, DataConfig(FEATURE="linear"))
    cepstra = vit_lib.spectrogram_features(audio, DataConfig(FEATURE="lfcc"))
    assert np.allclose(scipy.fft.idct(cepstra, type=2, norm="ortho", axis=0), linear, atol=1e-3)


def test_padding_and_masks_fill_silence_in_db_and_the_mean_for_cepstra():
    assert DataConfig().fill_value == -80.0
    assert DataConfig(FEATURE="linear").fill_value == -80.0
    assert DataConfig(FEATURE="lfcc").fill_value == 0.0
    with pytest.raises(ValueError, match=r"FEATURE must be one of \('log_mel', 'linear', 'lfcc'\)"):
        DataConfig(FEATURE="cqcc")


def run_epochs(tmp_path, select_best_by, val_batches):
    """train_model on a stand-in model whose validation outputs are scripted per epoch."""

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.epoch_outputs = iter(val_batches)

        def forward(self, x):
            if self.training:
                return torch.stack([self.weight.expand(len(x)), -self.weight.expand(len(x))], dim=1)
            return next(self.epoch_outputs) + 0 * self.weight

    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    model = Scripted()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = vit_lib.TrainingConfig(
        epochs=len(val_batches),
        run_name="scripted",
        checkpoint_dir=str(tmp_path),
        progress=False,
        select_best_by=select_best_by,
    )
    return vit_lib.train_model(model, {"train": loader, "val": loader}, config, optimizer=optimizer)


def logits(fake_minus_real):
    return torch.stack([torch.zeros(4), torch.tensor(fake_minus_real)], dim=1)


def test_best_epoch_by_val_eer_ignores_a_higher_f1_at_the_fixed_threshold(tmp_path):
    # labels real, real, fake, fake. Epoch 1 ranks every clip right but calls all of them real at
    # p(fake) > 0.5 (F1 0, EER 0); epoch 2 calls three of four right (F1 0.8) but scores the first real
    # clip above a fake one (EER 0.5). Validation F1 keeps epoch 2, validation EER epoch 1.
    epochs = [logits([-3.0, -2.5, -1.0, -0.5]), logits([2.0, -1.0, 1.0, 3.0])]
    run_epochs(tmp_path / "eer", "val_eer", epochs)
    run_epochs(tmp_path / "f1", "val_f1", epochs)
    by_eer = torch.load(tmp_path / "eer" / "best_vit_model_scripted.pth", weights_only=True)
    by_f1 = torch.load(tmp_path / "f1" / "best_vit_model_scripted.pth", weights_only=True)
    assert (by_eer["epoch"], by_eer["best_val_eer"]) == (1, 0.0)
    assert (by_f1["epoch"], round(by_f1["best_val_f1"], 4)) == (2, 0.8)


def test_an_unknown_selection_metric_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"select_best_by must be one of \('val_f1', 'val_eer'\)"):
        run_epochs(tmp_path, "val_auc", [torch.zeros(4, 2)])
