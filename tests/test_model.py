"""Unit tests of the model side of vit_lib: configurations, the ViT and the
evaluation metrics. No training here; see test_training.py."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

import vit_lib
from vit_lib import AudioViT, TrainingConfig, ViTConfig


# ---------------------------------------------------------------- configuration
def test_vit_config_counts_patches_and_patch_dim():
    config = ViTConfig("t", (128, 256), (16, 16), dim=64, depth=1, heads=2, mlp_dim=128)
    assert config.num_patches == (128 // 16) * (256 // 16) == 128
    assert config.patch_dim == 16 * 16 * 1
    wide = ViTConfig("t", (128, 320), (16, 32), dim=64, depth=1, heads=2, mlp_dim=128, channels=2)
    assert wide.num_patches == 8 * 10
    assert wide.patch_dim == 16 * 32 * 2


@pytest.mark.parametrize("image_size", [(128, 250), (120, 256)])
def test_vit_config_rejects_image_not_divisible_by_patch(image_size):
    with pytest.raises(ValueError, match="not divisible by patch size"):
        ViTConfig("t", image_size, (16, 16), dim=64, depth=1, heads=2, mlp_dim=128)


def test_model_configs_give_the_original_spectrogram_widths():
    assert vit_lib.SEGMENT_CONFIGS["vit_balanced_dataset"].max_frames_spec == 256  # 8 s
    assert vit_lib.SEGMENT_CONFIGS["vit_performance_dataset"].max_frames_spec == 320  # 10 s
    assert vit_lib.SEGMENT_CONFIGS["vit_balanced_dataset"].overlap_ratio == 0.5
    assert vit_lib.SEGMENT_CONFIGS["vit_performance_dataset"].overlap_ratio == 0.0


def test_original_recipe_is_one_setting_away():
    config = TrainingConfig.original()
    assert (
        config.model_size,
        config.optimizer,
        config.learning_rate,
        config.batch_size,
        config.seed,
        config.lr_schedule,
        config.class_balance,
        config.patch_embedding,
        config.select_best_by,
    ) == ("ViT_Small", "adam", 1e-4, 32, 42, "constant", "none", "linear", "val_f1")
    assert config.run_name == "ViT_Small_vit_balanced_dataset"
    assert TrainingConfig.original(epochs=3, learning_rate=1e-3).learning_rate == 1e-3
    assert not vit_lib.DataConfig.original().SUBTRACT_ROW_MEANS
    assert vit_lib.DataConfig.original(N_MELS=64).N_MELS == 64


def test_training_config_defaults_are_the_recipe_that_learns_real_speech():
    config = TrainingConfig()
    assert (
        config.optimizer,
        config.lr_schedule,
        config.class_balance,
        config.patch_embedding,
        config.select_best_by,
        config.dataset_name,
    ) == ("adamw", "warmup_cosine", "balanced_sampler", "conv", "val_eer", "vit_short_dataset")
    assert vit_lib.SEGMENT_CONFIGS["vit_short_dataset"].max_frames_spec == 128  # 4 s
    assert vit_lib.DataConfig().SUBTRACT_ROW_MEANS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model_size="ViT_Huge"), r"model_size must be one of .*, got 'ViT_Huge'"),
        (dict(dataset_name="no_such_dataset"), r"dataset_name must be one of .*, got 'no_such_dataset'"),
        (dict(epochs=0), r"epochs must be positive, got 0"),
        (dict(epochs=-3), r"epochs must be positive, got -3"),
        (dict(learning_rate=0.0), r"learning_rate must be positive"),
        (dict(learning_rate=-1e-4), r"learning_rate must be positive"),
        (dict(batch_size=0), r"batch_size must be positive, got 0"),
        (dict(optimizer="sgd"), r"optimizer must be one of .*'sgd'"),
        (dict(lr_schedule="step"), r"lr_schedule must be one of .*'step'"),
        (dict(class_balance="oversample"), r"class_balance must be one of .*'oversample'"),
        (dict(num_workers=-1), r"num_workers must be >= 0, got -1"),
        (dict(early_stopping_patience=0), r"early_stopping_patience must be positive or None, got 0"),
        (dict(grad_clip_norm=0.0), r"grad_clip_norm must be positive or None, got 0.0"),
        (dict(grad_clip_norm=-1.0), r"grad_clip_norm must be positive or None, got -1.0"),
    ],
)
def test_training_config_rejects_bad_values_with_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**kwargs)


def test_training_config_accepts_optional_settings_left_out_or_positive():
    TrainingConfig(grad_clip_norm=None, early_stopping_patience=None)
    TrainingConfig(grad_clip_norm=0.5, early_stopping_patience=1)


def test_make_vit_config_rejects_unknown_size():
    with pytest.raises(ValueError, match="Unknown model size 'ViT_Tiny'"):
        vit_lib.make_vit_config("ViT_Tiny")


@pytest.mark.parametrize("size", ["ViT_Small", "CNN_Small"])
def test_model_configs_reject_an_unknown_head(size):
    with pytest.raises(ValueError, match=f"{size}: head must be one of"):
        vit_lib.make_model_config(size, head="softmax")


# ---------------------------------------------------------------- the one-class head and loss
def one_class_logits(cosines):
    """What a OneClassHead gives for embeddings at these cosines with its direction."""
    head = vit_lib.OneClassHead(2)
    with torch.no_grad():
        head.direction.copy_(torch.tensor([1.0, 0.0]))
    angles = torch.arccos(torch.tensor(cosines))
    with torch.no_grad():
        return head(torch.stack((torch.cos(angles), torch.sin(angles)), dim=1))


def test_one_class_head_scores_by_cosine_with_fake_probability_one_half_between_the_margins():
    probability = vit_lib.softmax_fake_probability(one_class_logits([1.0, 0.9, 0.55, 0.2, -1.0]).numpy())
    assert probability[2] == pytest.approx(0.5)
    assert np.all(np.diff(probability) > 0)  # the further from the direction of real speech, the faker
    assert probability[0] == pytest.approx(1 / (1 + math.exp(20 * 0.45)))


def test_one_class_loss_is_oc_softmax_of_the_cosine_per_class():
    cosines = [0.95, 0.5, 0.1, 0.5]
    labels = torch.tensor([0, 0, 1, 1])
    loss = vit_lib.OneClassSoftmaxLoss()(one_class_logits(cosines), labels)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    shortfalls = [0.9 - 0.95, 0.9 - 0.5, 0.1 - 0.2, 0.5 - 0.2]  # real: 0.9 - cosine; fake: cosine - 0.2
    expected = [softplus(20 * shortfall) for shortfall in shortfalls]
    assert loss.item() == pytest.approx(np.mean(expected), rel=1e-5)
    weighted = vit_lib.OneClassSoftmaxLoss(weight=torch.tensor([3.0, 1.0]))(one_class_logits(cosines), labels)
    assert weighted.item() == pytest.approx(np.average(expected, weights=[3, 3, 1, 1]), rel=1e-5)


def test_one_class_head_recovers_the_cosine_from_its_logits():
    cosines = torch.tensor([1.0, 0.9, 0.55, 0.2, -1.0])
    logits = vit_lib.OneClassHead.logits_from_cosine(cosines)
    assert torch.allclose(vit_lib.OneClassHead.cosine_from_logits(logits), cosines, atol=1e-6)


@pytest.mark.parametrize("size", ["ViT_Small", "CNN_Small"])
def test_one_class_head_gives_two_fp32_logits_under_bf16_autocast(size):
    model = vit_lib.build_model(vit_lib.make_model_config(size, (128, 128), "conv", head="one_class")).eval()
    assert isinstance(model.mlp_head[-1] if size.startswith("ViT") else model.head[-1], vit_lib.OneClassHead)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(3, 1, 128, 128))
    assert logits.shape == (3, 2) and logits.dtype == torch.float32
    assert torch.allclose(logits[:, 0], -logits[:, 1])


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize(
    "size, low, high",
    [("ViT_Small", 2.0e6, 3.0e6), ("ViT_Medium", 4.0e6, 6.0e6), ("ViT_Large", 10.0e6, 12.0e6)],
)
def test_trainable_parameters_at_128x256_are_in_each_sizes_range(size, low, high):
    model = AudioViT(config=vit_lib.make_vit_config(size, (128, 256)))
    assert low <= vit_lib.count_parameters(model) <= high


def expected_parameter_count(config):
    """By hand from the architecture (every attention head is dim // heads wide)."""
    d, m, p = config.dim, config.mlp_dim, config.patch_dim
    patch_embedding = 2 * p + (p * d + d) + 2 * d  # LayerNorm(patch_dim), Linear, LayerNorm(dim)
    positions_and_cls = (config.num_patches + 1) * d + d
    per_layer = (
        2 * d  # PreNorm LayerNorm (attention)
        + 3 * d * d  # to_qkv, no bias
        + d * d
        + d  # to_out Linear
        + 2 * d  # PreNorm LayerNorm (MLP)
        + d * m
        + m
        + m * d
        + d
    )  # MLP Linear, Linear
    head = 2 * d + d * 2 + 2  # LayerNorm + Linear to 2 logits
    return patch_embedding + positions_and_cls + config.depth * per_layer + head


@pytest.mark.parametrize("size", ["ViT_Small", "ViT_Medium"])
def test_parameter_count_matches_hand_formula(size):
    config = vit_lib.make_vit_config(size, (128, 256))
    assert vit_lib.count_parameters(AudioViT(config=config)) == expected_parameter_count(config)


def test_vit_small_parameter_count_is_2741698():
    # 50240 (patch embedding) + 24768 (positions) + 192 (cls) + 6 * 444288 (layers) + 770 (head)
    assert vit_lib.count_parameters(AudioViT(config=vit_lib.ViT_Small)) == 2_741_698


# ---------------------------------------------------------------- model
TINY = dict(patch_size=(16, 16), dim=32, depth=2, heads=4, mlp_dim=64)


@pytest.mark.parametrize(
    "dataset_name", ["vit_balanced_dataset", "vit_performance_dataset", "vit_two_second_dataset"]
)
def test_audio_vit_outputs_two_logits_for_each_dataset_shape(dataset_name):
    torch.manual_seed(0)
    width = vit_lib.SEGMENT_CONFIGS[dataset_name].max_frames_spec
    model = AudioViT(config=vit_lib.make_vit_config("ViT_Small", (128, width))).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 1, 128, width))
    assert out.shape == (3, 2)
    assert torch.isfinite(out).all()


def test_attention_and_transformer_keep_token_shape():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    attention = vit_lib.Attention(32, heads=4, dim_head=8).eval()
    assert attention(x).shape == (2, 5, 32)
    out, weights = attention(x, return_attention=True)
    assert out.shape == (2, 5, 32) and weights.shape == (2, 4, 5, 5)
    transformer = vit_lib.Transformer(32, depth=3, heads=4, dim_head=8, mlp_dim=64).eval()
    assert transformer(x).shape == (2, 5, 32)
    out, maps = transformer(x, return_attention=True)
    assert out.shape == (2, 5, 32) and len(maps) == 3


@pytest.fixture
def tiny_attention_maps():
    """(config, logits, attention maps) of a tiny eval-mode AudioViT on a random batch of 2."""
    torch.manual_seed(0)
    config = ViTConfig("t", (32, 64), **TINY)
    model = AudioViT(config=config).eval()
    with torch.no_grad():
        logits, maps = model(torch.randn(2, 1, 32, 64), return_attention=True)
    return config, logits, maps


def test_return_attention_gives_one_row_stochastic_map_per_layer(tiny_attention_maps):
    config, logits, maps = tiny_attention_maps
    n = config.num_patches + 1
    assert logits.shape == (2, 2)
    assert len(maps) == config.depth
    for weights in maps:
        assert weights.shape == (2, config.heads, n, n)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, config.heads, n), atol=1e-6, rtol=0)


def test_sped_up_model_equals_the_plain_model_on_same_weights():
    torch.manual_seed(0)
    plain = AudioViT(config=vit_lib.ViT_Small).eval()
    fused = vit_lib.speed_up(copy.deepcopy(plain))
    assert fused.state_dict().keys() == plain.state_dict().keys()
    dropouts = [type(m) for m in plain.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 1 + 4 * vit_lib.ViT_Small.depth and set(dropouts) == {torch.nn.Dropout}
    assert {type(m) for m in fused.modules() if isinstance(m, torch.nn.Dropout)} == {vit_lib.FastDropout}
    assert {type(layer[0].fn) for layer in fused.transformer.layers} == {vit_lib.FusedAttention}
    assert {type(layer[0].fn) for layer in plain.transformer.layers} == {vit_lib.Attention}
    x = torch.randn(2, 1, 128, 256)
    with torch.no_grad():
        expected, fused_out = plain(x), fused(x)
        with_maps, _ = fused(x, return_attention=True)  # the plain path inside the sped-up model
    torch.testing.assert_close(fused_out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_maps, expected, atol=1e-5, rtol=0)


def test_attention_modules_equal_the_formula_written_out():
    torch.manual_seed(0)
    attention = vit_lib.Attention(32, heads=4, dim_head=8).eval()
    x = torch.randn(3, 7, 32)
    q, k, v = (t.reshape(3, 7, 4, 8).transpose(1, 2) for t in attention.to_qkv(x).chunk(3, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attention.to_out((weights @ v).transpose(1, 2).reshape(3, 7, 32))
    with torch.no_grad():
        out, maps = attention(x, return_attention=True)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(maps, weights, atol=1e-6, rtol=0)
        torch.testing.assert_close(vit_lib.speed_up(attention)(x), expected, atol=1e-5, rtol=0)


def test_fast_dropout_zeroes_a_fraction_p_and_rescales_the_rest():
    torch.manual_seed(0)
    x = torch.rand(400_000) + 1.0
    y = vit_lib.fast_dropout(x, 0.1)
    dropped = y == 0
    # every one of the four 16-bit lanes of each 64-bit draw is unbiased (binomial sd ~0.001)
    for lane in range(4):
        assert abs(dropped[lane::4].float().mean().item() - 0.1) < 0.006
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.9)


def test_fast_dropout_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 129, requires_grad=True)
    y = vit_lib.fast_dropout(x, 0.25)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.75)


def test_fast_dropout_is_identity_when_off_and_reproducible_under_a_seed():
    x = torch.randn(8, 16)
    assert vit_lib.fast_dropout(x, 0.1, training=False) is x
    assert vit_lib.fast_dropout(x, 0.0) is x
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append((vit_lib.fast_dropout(x, 0.5), vit_lib.fast_dropout(x, 0.5)))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    assert not torch.equal(draws[0][0], draws[0][1])  # each call draws a fresh mask
    odd_shape = torch.ones(3, 5, 7)  # numel not a multiple of 4
    assert vit_lib.fast_dropout(odd_shape, 0.5).shape == (3, 5, 7)


def test_sped_up_model_trains_on_cpu_without_sdpa_and_evaluates_with_it():
    torch.manual_seed(0)
    config = ViTConfig("t", (32, 64), **TINY)
    model = vit_lib.speed_up(AudioViT(config=config))
    attention, x = model.transformer.layers[0][0].fn, torch.randn(2, 9, config.dim)
    assert not attention.uses_sdpa(x, return_attention=False)  # dropout on CPU: our mask
    assert attention.eval().uses_sdpa(x, return_attention=False)
    assert not attention.uses_sdpa(x, return_attention=True)  # the maps need the einsum path
    model.train()(torch.randn(2, 1, 32, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cls_attention_and_rollout_give_one_weight_per_patch(tiny_attention_maps):
    config, _, maps = tiny_attention_maps
    cls = vit_lib.cls_attention(maps)
    rollout = vit_lib.attention_rollout(maps)
    assert cls.shape == (2, config.num_patches)
    assert rollout.shape == (2, config.num_patches)
    assert (cls >= 0).all() and (rollout >= 0).all()
    assert torch.isfinite(rollout).all()
    # CLS-to-patch weights of the last layer, averaged over heads, are the last map's first row
    torch.testing.assert_close(cls, maps[-1][:, :, 0, 1:].mean(dim=1))
    # the rollout matrix is row-stochastic, so CLS-to-patch weights sum to at most 1
    assert (rollout.sum(dim=-1) <= 1 + 1e-6).all()


# ---------------------------------------------------------------- equal error rate
def test_eer_is_zero_when_classes_are_perfectly_separated():
    eer, threshold = vit_lib.equal_error_rate([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])
    assert eer == 0.0
    assert threshold == 2.0  # the highest spoof score: everything <= 2 is rejected


def test_eer_on_interleaved_scores_is_one_half_at_threshold_two():
    # Bona fide [1, 2, 3, 4], spoof [0, 1.5, 2.5, 3.5]. Sorted: 0s 1b 1.5s 2b 2.5s 3b 3.5s 4b.
    # Rejecting every score <= t, at t = each sorted score (and below the lowest):
    #   t     : -0.001  0    1    1.5  2    2.5  3    3.5  4
    #   FRR   :  0      0   .25  .25  .50  .50  .75  .75  1      (bona fide <= t, of 4)
    #   FAR   :  1     .75  .75  .50  .50  .25  .25   0   0      (spoof > t, of 4)
    #   |diff|:  1     .75  .50  .25   0   .25  .50  .75  1
    # smallest |FRR - FAR| at t = 2, where both are 0.5: EER = 0.5, threshold 2.
    eer, threshold = vit_lib.equal_error_rate([1, 2, 3, 4], [0, 1.5, 2.5, 3.5])
    assert eer == 0.5
    assert threshold == 2.0


def test_eer_is_one_when_classes_are_inverted():
    eer, _ = vit_lib.equal_error_rate([0.0, 1.0], [2.0, 3.0])
    assert eer == 1.0


def test_det_curve_has_one_point_per_sorted_score_plus_one_below_them_all():
    # the interleaved lists of the test above, their table row by row
    frr, far, thresholds = vit_lib.det_curve([1, 2, 3, 4], [0, 1.5, 2.5, 3.5])
    np.testing.assert_array_equal(thresholds, [-0.001, 0, 1, 1.5, 2, 2.5, 3, 3.5, 4])
    np.testing.assert_array_equal(frr, [0, 0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1])
    np.testing.assert_array_equal(far, [1, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0, 0])


def test_eer_with_scores_tied_across_classes_passes_the_bona_fide_ones_first():
    # Bona fide [1, 2, 3], spoof [0, 2, 2]. Among equal scores the bona fide trials are counted as
    # rejected before the spoof ones (the order the ASVspoof evaluation package walks them in):
    #   point : start  0s   1b   2b   2s   2s   3b
    #   FRR   :  0     0   1/3  2/3  2/3  2/3   1      (bona fide passed, of 3)
    #   FAR   :  1    2/3  2/3  2/3  1/3   0    0      (spoof not yet passed, of 3)
    # FRR = FAR = 2/3 at the 2b point: EER 2/3 at threshold 2. (Trying only whole thresholds, t = 1
    # gives 1/3 and 2/3, t = 2 gives 2/3 and 0: no threshold equalises them.)
    eer, threshold = vit_lib.equal_error_rate([1, 2, 3], [0, 2, 2])
    assert eer == pytest.approx(2 / 3, abs=1e-15) and threshold == 2.0


def test_eer_on_a_small_list_with_ties_in_both_classes_is_its_golden_value():
    # Bona fide [.9 .8 .8 .7 .4 .4] (6), spoof [.8 .5 .4 .3 .1] (5); sorted, bona fide first in ties:
    #   point : start .1s  .3s  .4b  .4b  .4s  .5s  .7b  .8b  .8b  .8s  .9b
    #   FRR*6 :  0     0    0    1    2    2    2    3    4    5    5    6
    #   FAR*5 :  5     4    3    3    3    2    1    1    1    1    0    0
    # |FRR - FAR| is smallest (|1/3 - 2/5| = 1/15) at the .4s point: EER = (1/3 + 2/5) / 2 = 11/30.
    eer, threshold = vit_lib.equal_error_rate([0.9, 0.8, 0.8, 0.7, 0.4, 0.4], [0.8, 0.5, 0.4, 0.3, 0.1])
    assert eer == pytest.approx(11 / 30, abs=1e-15) and threshold == 0.4


def test_eer_of_identical_lists_of_even_length_is_one_half():
    # Both [1, 2, 3, 4]: after each pair (b then s) of equal scores FRR = k/4 and FAR = (4 - k)/4,
    # equal at k = 2; the bona fide-only points in between differ by 1/4. EER 0.5 at threshold 2.
    assert vit_lib.equal_error_rate([1, 2, 3, 4], [1, 2, 3, 4]) == (0.5, 2.0)
    scores = np.random.default_rng(7).normal(size=50)
    assert vit_lib.equal_error_rate(scores, scores)[0] == 0.5


def test_eer_is_unchanged_by_strictly_increasing_transforms_of_the_scores():
    rng = np.random.default_rng(11)
    bona, spoof = rng.integers(-3, 5, size=40).astype(float), rng.integers(-5, 3, size=30).astype(float)
    eer = vit_lib.equal_error_rate(bona, spoof)[0]
    for transform in (np.exp, lambda x: 3 * x - 7, lambda x: x**3, np.arctan):
        assert vit_lib.equal_error_rate(transform(bona), transform(spoof))[0] == eer


def eer_by_trying_every_threshold(bonafide, spoof):
    """The EER from its definition, for scores without ties: a trial is rejected when its score is
    <= t; t runs from below every score up through each score in turn; at the first t where
    |miss rate - false alarm rate| is smallest the EER is the mean of the two."""
    bonafide, spoof = np.asarray(bonafide), np.asarray(spoof)
    candidates = np.sort(np.concatenate([bonafide, spoof]))
    best_gap, best_eer = np.inf, None
    for t in np.r_[candidates[0] - 1, candidates]:
        miss, false_alarm = np.mean(bonafide <= t), np.mean(spoof > t)
        if abs(miss - false_alarm) < best_gap:
            best_gap, best_eer = abs(miss - false_alarm), (miss + false_alarm) / 2
    return best_eer


def test_eer_equals_a_threshold_search_on_random_untied_scores():
    rng = np.random.default_rng(2019)
    for _ in range(200):
        n_bona, n_spoof = rng.integers(1, 51, size=2)
        bona, spoof = rng.normal(0.5, 1.0, size=n_bona), rng.normal(-0.5, 1.0, size=n_spoof)
        assert len(np.unique(np.r_[bona, spoof])) == n_bona + n_spoof
        expected = eer_by_trying_every_threshold(bona, spoof)
        assert vit_lib.equal_error_rate(bona, spoof)[0] == pytest.approx(expected, abs=1e-12)
        # the same through the label interface (0 bona fide, 1 spoof)
        labels = np.r_[np.zeros(n_bona, int), np.ones(n_spoof, int)]
        assert vit_lib.eer_from_labels(labels, np.r_[bona, spoof])[0] == pytest.approx(expected, abs=1e-12)


def test_eer_accepts_lists_and_int_arrays_like_float_arrays():
    assert vit_lib.equal_error_rate([1, 2, 3, 4], [0, 1, 2, 3]) == vit_lib.equal_error_rate(
        np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 1.0, 2.0, 3.0])
    )


# ---------------------------------------------------------------- compute_metrics and score checks
def test_compute_metrics_on_hand_checked_example():
    labels = [0, 0, 0, 0, 1, 1]
    p_fake = [0.1, 0.3, 0.55, 0.2, 0.4, 0.9]
    # predictions at 0.5: [0, 0, 1, 0, 0, 1] -> 4 of 6 right; fake class: TP 1, FP 1, FN 1 -> F1 0.5
    # ROC AUC: fake 0.4 beats 3 of 4 real, fake 0.9 beats all 4 -> 7 / 8
    # EER with bona fide score -p: sorted -0.9s -0.55b -0.4s -0.3b -0.2b -0.1b
    #   FRR 0 0 .25 .25 .5 .75 1, FAR 1 .5 .5 0 0 0 0 -> first min |diff| .25 at t = -0.55: EER .375
    metrics = vit_lib.compute_metrics(labels, p_fake)
    assert set(metrics) == {
        "accuracy",
        "f1",
        "roc_auc",
        "eer",
        "eer_threshold_p_fake",
        "accuracy_at_eer",
        "f1_at_eer",
    }
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["f1"] == pytest.approx(0.5)
    assert metrics["roc_auc"] == pytest.approx(7 / 8)
    assert metrics["eer"] == pytest.approx(0.375)
    assert metrics["eer_threshold_p_fake"] == pytest.approx(0.55)
    # called fake when p >= 0.55: [0, 0, 1, 0, 0, 1] -> the same as at 0.5 here
    assert metrics["accuracy_at_eer"] == pytest.approx(4 / 6)
    assert metrics["f1_at_eer"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([], [], "empty score list"),
        ([0, 1, 1], [0.2, float("nan"), 0.7], "1 NaN score"),
        ([1, 1, 1], [0.2, 0.4, 0.7], "need both bona fide and spoof scores, got only fake"),
        ([0, 0], [0.2, 0.4], "need both bona fide and spoof scores, got only real"),
        ([0, 1], [0.2, 0.4, 0.6], "2 labels but 3 scores"),
        ([0, 2], [0.2, 0.4], "labels must be 0"),
    ],
)
def test_scores_are_checked_with_clear_errors(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        vit_lib.compute_metrics(labels, scores)
    with pytest.raises(ValueError, match=message):
        vit_lib.eer_from_labels(labels, scores)


# ---------------------------------------------------------------- file pooling and reports
def segment_table():
    """As score_segments gives it: a.wav (real, 3 segments), b.wav (fake A01, 2), c.wav (fake A02, 1),
    d.wav (real, its one segment unreadable: NaN score), e.wav (real, 1)."""
    table = pd.DataFrame(
        dict(
            original_path=["real/a.wav"] * 3
            + ["fake/b.wav"] * 2
            + ["fake/c.wav", "real/d.wav", "real/e.wav"],
            segment_index=[0, 1, 2, 0, 1, 0, 0, 0],
            label=[0, 0, 0, 1, 1, 1, 0, 0],
            attack=["-", "-", "-", "A01", "A01", "A02", "-", "-"],
            score=[2.0, 1.0, 3.0, -1.0, 0.5, -4.0, np.nan, 0.25],
            duration_s=[20.0] * 3 + [12.0] * 2 + [5.0, 3.0, 4.0],
        )
    )
    table["p_fake"] = 1.0 / (1.0 + np.exp(table["score"]))
    return table


def test_pool_file_scores_averages_segment_scores_per_original_file():
    files = vit_lib.pool_file_scores(segment_table()).set_index("original_path")
    assert list(files.index) == ["fake/b.wav", "fake/c.wav", "real/a.wav", "real/e.wav"]  # d.wav: no score
    assert files.loc["real/a.wav", "score"] == pytest.approx(2.0)
    assert files.loc["fake/b.wav", "score"] == pytest.approx(-0.25)
    assert files.loc["fake/c.wav", "score"] == pytest.approx(-4.0)
    assert files["n_segments"].to_dict() == {
        "fake/b.wav": 2,
        "fake/c.wav": 1,
        "real/a.wav": 3,
        "real/e.wav": 1,
    }
    assert files.loc["fake/b.wav", "attack"] == "A01" and files.loc["real/a.wav", "label"] == 0
    np.testing.assert_allclose(files["p_fake"], 1 / (1 + np.exp(files["score"])))


def test_metrics_report_has_file_and_segment_levels():
    segments = segment_table()
    report = vit_lib.metrics_report(segments)
    assert set(report) == {"file", "segment"}
    files = vit_lib.pool_file_scores(segments)
    assert report["file"] == vit_lib.compute_metrics(files["label"], files["p_fake"])
    scored = segments.dropna(subset=["score"])
    assert report["segment"]["eer"] == vit_lib.eer_from_labels(scored["label"], scored["score"])[0]
    assert report["file"]["eer"] == 0.0  # file means: real 2.0, 0.25; fake -0.25, -4.0


def test_per_attack_eer_has_a_row_per_attack_and_pooled():
    files = pd.DataFrame(
        dict(
            label=[0, 0, 0, 0, 1, 1, 1, 1, 1],
            attack=["-", "-", "-", "-", "A01", "A01", "A02", "A02", "A02"],
            score=[1.0, 2.0, 3.0, 4.0, 0.0, 1.5, 2.5, 3.5, -1.0],
        )
    )
    table = vit_lib.per_attack_eer(files).set_index("attack")
    assert list(table.index) == ["A01", "A02", "pooled"]
    assert table["spoof_files"].to_dict() == {"A01": 2, "A02": 3, "pooled": 5}
    bona = [1.0, 2.0, 3.0, 4.0]
    assert table.loc["A01", "eer"] == vit_lib.equal_error_rate(bona, [0.0, 1.5])[0]
    assert table.loc["A02", "eer"] == vit_lib.equal_error_rate(bona, [2.5, 3.5, -1.0])[0]
    assert table.loc["pooled", "eer"] == vit_lib.equal_error_rate(bona, [0.0, 1.5, 2.5, 3.5, -1.0])[0]
    # A01 by hand: sorted 0s 1b 1.5s 2b 3b 4b gives (FRR, FAR) (0, 1) (0, .5) (.25, .5) (.25, 0) ...;
    # the first smallest gap, .25, is at the 1b point: EER (.25 + .5) / 2
    assert table.loc["A01", "eer"] == 0.375


def test_score_file_round_trip(tmp_path):
    files = pd.DataFrame(
        dict(
            original_path=["real/LA_0001.flac", "fake/A01/LA_0002.flac", "fake/LA_0003.wav"],
            score=[1.23456789, -0.5, 1e-7],
            attack=["-", "A01", np.nan],
            label=[0, 1, 1],
        )
    )
    path = tmp_path / "scores.txt"
    vit_lib.write_score_file(path, files)
    assert path.read_text().splitlines()[1] == "LA_0002 -0.500000 A01 spoof"
    back = vit_lib.read_score_file(path)
    assert list(back["file_id"]) == ["LA_0001", "LA_0002", "LA_0003"]
    np.testing.assert_allclose(back["score"], files["score"], atol=1e-6, rtol=0)
    assert list(back["label"]) == [0, 1, 1]
    assert list(back["attack"]) == ["-", "A01", "-"]


def test_read_score_file_accepts_id_and_score_only(tmp_path):
    path = tmp_path / "scores.txt"
    path.write_text("a 0.5\n\nb -1.25\n")
    back = vit_lib.read_score_file(path)
    assert list(back["file_id"]) == ["a", "b"] and list(back["score"]) == [0.5, -1.25]
    assert back["label"].isna().all()


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("LA_0002 not-a-number A01 spoof", r":2: expected 'FILE_ID SCORE \[ATTACK KEY\]'"),
        ("LA_0002", r":2: expected 'FILE_ID SCORE"),
        ("LA_0002 0.5 A01 fake", r":2: key 'fake' is neither 'bonafide' nor 'spoof'"),
    ],
)
def test_read_score_file_names_the_malformed_line(tmp_path, bad_line, message):
    path = tmp_path / "scores.txt"
    path.write_text(f"LA_0001 1.0 - bonafide\n{bad_line}\n")
    with pytest.raises(ValueError, match=message) as error:
        vit_lib.read_score_file(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- shortcut audit
def shortcut_files(rng, n, duration_separates):
    label = np.r_[np.zeros(n, int), np.ones(n, int)]
    duration = (
        np.where(label == 1, rng.uniform(6, 9, 2 * n), rng.uniform(2, 5, 2 * n))
        if duration_separates
        else rng.uniform(2, 9, 2 * n)
    )
    return pd.DataFrame(
        dict(
            label=label,
            duration_s=duration,
            filled_fraction=rng.uniform(0, 0.5, 2 * n),
            leading_silence_s=rng.uniform(0, 0.5, 2 * n),
            loudness_lufs=rng.normal(-25, 3, 2 * n),
        )
    )


def test_shortcut_audit_finds_duration_that_separates_classes():
    rng = np.random.default_rng(0)
    table = vit_lib.shortcut_audit(shortcut_files(rng, 60, True), shortcut_files(rng, 40, True))
    eer = table.set_index("feature")["test_eer"]
    assert list(eer.index) == [
        "clip duration (s)",
        "looped/padded share of segments",
        "leading silence (s)",
        "loudness before normalisation (LUFS)",
        "all trivial features together",
    ]
    assert eer["clip duration (s)"] == pytest.approx(0.0, abs=0.02)
    assert eer["all trivial features together"] < 0.1
    for feature in (
        "looped/padded share of segments",
        "leading silence (s)",
        "loudness before normalisation (LUFS)",
    ):
        assert eer[feature] > 0.3


def test_shortcut_audit_reports_chance_for_random_features():
    rng = np.random.default_rng(1)
    table = vit_lib.shortcut_audit(shortcut_files(rng, 60, False), shortcut_files(rng, 100, False))
    assert (table["test_eer"] > 0.3).all(), table
    assert (table["test_eer"] < 0.7).all(), table
