"""Cross-validation over recorded persons and leave-one-attack-out: the folds never split a person, each
fold's test persons are every person exactly once over the folds, the views point at the prepared arrays,
a held-out kind of fake never reaches training, and a model trains on a view as on the prepared dataset."""

import contextlib
import importlib.util
import io
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import vit_lib

DATASET = "vit_balanced_dataset"


@pytest.fixture(scope="module")
def dataset_dir(prepared):
    return prepared.cache / DATASET


def speakers_by_split(view_dir):
    return {split: set(vit_lib.read_metadata(view_dir / split)["speaker"]) for split in vit_lib.SPLITS}


def test_speaker_folds_deal_every_person_to_one_fold_evenly_and_by_seed(dataset_dir):
    metadata = vit_lib.read_dataset_metadata(dataset_dir)
    folds = vit_lib.speaker_folds(metadata, k=3, seed=1)
    assert set(folds) == set(metadata["speaker"])
    sizes = np.bincount(list(folds.values()), minlength=3)
    assert sizes.max() - sizes.min() <= 1
    assert folds == vit_lib.speaker_folds(metadata, k=3, seed=1)
    assert any(vit_lib.speaker_folds(metadata, k=3, seed=seed) != folds for seed in range(2, 8)), (
        "another seed deals the persons otherwise"
    )


def test_more_folds_than_recorded_persons_or_fewer_than_three_are_refused(dataset_dir):
    metadata = vit_lib.read_dataset_metadata(dataset_dir)
    with pytest.raises(ValueError, match=r"5 folds need at least 5 recorded persons .* has 4"):
        vit_lib.speaker_folds(metadata, k=5)
    with pytest.raises(ValueError, match=r"at least 3 folds \(test, validation and train\), got 2"):
        vit_lib.speaker_folds(metadata, k=2)


def test_voices_that_only_fake_are_dealt_after_the_recorded_persons():
    metadata = pd.DataFrame(
        dict(
            speaker=["a", "a", "b", "c", "tts1", "tts2", "tts3"],
            original_path=[f"{i}.wav" for i in range(7)],
            label=[0, 1, 0, 0, 1, 1, 1],
        )
    )
    folds = vit_lib.speaker_folds(metadata, k=3, seed=0)
    assert sorted(folds[s] for s in ("a", "b", "c")) == [0, 1, 2]
    assert sorted(folds[s] for s in ("tts1", "tts2", "tts3")) == [0, 1, 2]


def test_fold_views_test_each_person_once_and_never_split_a_person(dataset_dir, tmp_path):
    original = vit_lib.read_dataset_metadata(dataset_dir)
    cache_dirs = vit_lib.write_fold_datasets(dataset_dir, tmp_path / "folds", k=4, seed=0)
    assert list(cache_dirs) == ["fold0", "fold1", "fold2", "fold3"]
    tested = []
    for cache_dir in cache_dirs.values():
        view = cache_dir / DATASET
        speakers = speakers_by_split(view)
        assert not (
            speakers["train"] & speakers["val"]
            or speakers["train"] & speakers["test"]
            or speakers["val"] & speakers["test"]
        )
        assert len(vit_lib.read_dataset_metadata(view)) == len(original)
        tested += sorted(speakers["test"])
        assert (view / "preparation.json").read_bytes() == (dataset_dir / "preparation.json").read_bytes()
    assert sorted(tested) == sorted(set(original["speaker"]))


def test_a_view_reads_the_prepared_arrays(dataset_dir, tmp_path):
    cache_dir = vit_lib.write_fold_datasets(dataset_dir, tmp_path / "folds", k=4, seed=0)["fold0"]
    split_dir = cache_dir / DATASET / "test"
    view = vit_lib.read_metadata(split_dir)
    original = vit_lib.read_dataset_metadata(dataset_dir).set_index(["original_path", "segment_index"])
    for row in view.itertuples():
        source = original.loc[(row.original_path, row.segment_index)]
        prepared_array = dataset_dir / source["split"] / source["npy_path"]
        assert (split_dir / row.npy_path).resolve() == prepared_array.resolve()
    spec, label = vit_lib.AudioDataset(cache_dir / DATASET, "test", max_frames_spec=256)[0]
    assert label == view["label"].iat[0] and tuple(spec.shape) == (1, 128, 256)


def test_leaving_an_attack_out_keeps_it_out_of_training_and_tests_on_it_alone(dataset_dir, tmp_path):
    original = vit_lib.read_dataset_metadata(dataset_dir)
    cache_dirs = vit_lib.write_attack_holdout_datasets(dataset_dir, tmp_path / "held_out")
    assert sorted(cache_dirs) == sorted(original.loc[original["label"] == 1, "attack"].unique())
    for attack, cache_dir in cache_dirs.items():
        view = vit_lib.read_dataset_metadata(cache_dir / DATASET)
        training = view[view["split"] != "test"]
        assert not ((training["label"] == 1) & (training["attack"] == attack)).any()
        assert (training["label"] == 1).any(), "the other kinds of fake are trained on"
        test = view[view["split"] == "test"]
        assert set(test.loc[test["label"] == 1, "attack"]) == {attack}
        original_test = original[original["split"] == "test"]
        assert sorted(test.loc[test["label"] == 0, "npy_path"].map(lambda p: p.rsplit("/", 1)[-1])) == sorted(
            original_test.loc[original_test["label"] == 0, "npy_path"]
        )


def test_fold_summary_gives_mean_spread_and_worst_fold():
    results = pd.DataFrame({"pooled": [0.1, 0.3, 0.2], "tts": [0.0, 0.5, 0.1]})
    summary = vit_lib.fold_summary(results)
    assert summary.loc["mean", "pooled"] == pytest.approx(0.2)
    assert summary.loc["std", "pooled"] == pytest.approx(0.1)
    assert summary.loc["worst", "tts"] == 0.5


def test_cross_validation_trains_on_each_fold_and_reports_its_test_eers(dataset_dir, tmp_path):
    cache_dirs = vit_lib.write_fold_datasets(dataset_dir, tmp_path / "folds", k=4, seed=0)
    config = vit_lib.TrainingConfig(
        dataset_name=DATASET,
        epochs=1,
        batch_size=8,
        checkpoint_dir=str(tmp_path / "checkpoints"),
        results_dir=str(tmp_path / "results"),
        run_name="cv",
        wandb_mode="disabled",
        progress=False,
    )
    with contextlib.redirect_stdout(io.StringIO()) as out:
        table = vit_lib.cross_validate(config, dict(list(cache_dirs.items())[:2]))
    assert list(table.index) == ["fold0", "fold1"]
    assert table["pooled"].between(0, 1).all() and (table["train minutes"] > 0).all()
    train_sizes = [len(vit_lib.read_metadata(cache_dirs[f"fold{i}"] / DATASET / "train")) for i in (0, 1)]
    for size in train_sizes:
        assert f"Dataset sizes (segments): train {size}," in out.getvalue()
    assert (tmp_path / "checkpoints" / "best_vit_model_cv_fold1.pth").is_file()


def benchmark(name):
    """benchmarks/<name>.py as a module."""
    path = vit_lib.REPO_ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def detection():
    return benchmark("detection")


def test_the_detection_benchmark_reports_every_fold_and_the_worst(detection, dataset_dir, tmp_path):
    args = SimpleNamespace(cache_dir=str(tmp_path / "cache"), folds=3, leave_one_attack_out=None)
    splits = detection.judged_splits(args, dataset_dir)
    assert list(splits) == ["fold0", "fold1", "fold2"]
    runs = [
        dict(model=model, seed=42, split=split, train_seconds=60.0, pooled=eer, pulse_jitter=eer)
        for model, eers in (("ViT_Small", (0.1, 0.3, 0.2)), ("CNN_Small", (0.2, 0.2, 0.2)))
        for split, eer in zip(splits, eers)
    ]
    audits = {
        split: detection.split_audit(cache_dir / DATASET).to_dict("records")
        for split, cache_dir in splits.items()
    }
    detection.write_report(tmp_path / "out", "folds", dict(runs=runs, audits=audits))
    report = (tmp_path / "out" / "folds.md").read_text()
    assert "| ViT_Small | 3 | 0.2 ± 0.1 | 0.2 ± 0.1 | 0.3 | 1.0 |" in report  # mean ± std, worst, minutes
    assert "| model | fold0 | fold1 | fold2 |" in report and "| ViT_Small | 0.1 | 0.3 | 0.2 |" in report
    record = json.loads((tmp_path / "out" / "folds.json").read_text())
    assert sorted(record["verdicts"]) == sorted(
        f"{m} ({s})" for m in ("ViT_Small", "CNN_Small") for s in splits
    )
    kinds = {row["kind"] for audit in audits.values() for row in audit}
    assert vit_lib.ENVELOPE_PER_KIND in kinds and ": real against " in report


def test_the_detection_benchmark_can_write_the_audit_alone(detection, dataset_dir, tmp_path):
    audits = {"prepared": detection.split_audit(dataset_dir).to_dict("records")}
    detection.write_report(tmp_path, "audit", dict(runs=[], audits=audits))
    record = json.loads((tmp_path / "audit.json").read_text())
    assert record["verdicts"] == {} and record["audits"] == json.loads(json.dumps(audits))
    assert (tmp_path / "audit.md").read_text().startswith("Shortcut audit, prepared:")


def test_the_detection_benchmark_holds_out_only_the_kinds_of_fake_it_is_given(
    detection, dataset_dir, tmp_path
):
    args = SimpleNamespace(cache_dir=str(tmp_path / "cache"), folds=None, leave_one_attack_out=[])
    every_kind = detection.judged_splits(args, dataset_dir)
    assert len(every_kind) >= 2
    args.leave_one_attack_out = [sorted(every_kind)[-1]]
    assert list(detection.judged_splits(args, dataset_dir)) == args.leave_one_attack_out
    args.folds = 3
    crossed = detection.judged_splits(args, dataset_dir)
    assert list(crossed) == [f"fold{i}_{args.leave_one_attack_out[0]}" for i in range(3)]
    args.folds = None
    args.leave_one_attack_out = ["no_such_kind"]
    with pytest.raises(SystemExit, match=r"no fakes of kind \['no_such_kind'\]"):
        detection.judged_splits(args, dataset_dir)


def test_a_detection_record_from_before_the_folds_is_read_as_the_prepared_split(detection):
    older = dict(
        runs=[dict(model="ViT_Small", seed=42, pooled=0.05)], audit=[dict(feature="x", test_eer=0.5)]
    )
    record = detection.in_current_form(older)
    assert record["audits"] == {"prepared": older["audit"]} and "audit" not in record
    assert record["runs"] == [dict(split="prepared", model="ViT_Small", seed=42, pooled=0.05)]


def test_records_of_different_folds_merge_into_one_cross_validation(detection, tmp_path):
    def record(split, eer, audit_eer):
        path = tmp_path / f"{split}_{audit_eer}.json"
        runs = [dict(model="ViT_Small", seed=42, split=split, pooled=eer)]
        audits = {split: [dict(feature="duration", test_eer=audit_eer)]}
        common = dict(recipe={"epochs": 45}, data={}, corpus="c", machine={"cpu": "x"})
        path.write_text(json.dumps(dict(common, runs=runs, audits=audits, tested_persons={split: ["p"]})))
        return str(path)

    merged = detection.merged_record([record("fold0", 0.1, 0.5), record("fold1", 0.3, 0.4)])
    assert sorted(merged["audits"]) == sorted(merged["tested_persons"]) == ["fold0", "fold1"]
    assert [run["split"] for run in merged["runs"]] == ["fold0", "fold1"]
    gmm_only = dict(model="LFCC-GMM (64)", seed=0, split="fold1", pooled=0.2)
    table = detection.split_table(merged["runs"] + [gmm_only])
    assert table.set_index("model").loc["LFCC-GMM (64)"].tolist() == ["not run", 0.2]
    with pytest.raises(SystemExit, match="audits of fold0 differs"):
        detection.merged_record([record("fold0", 0.1, 0.5), record("fold0", 0.2, 0.45)])


def test_records_from_before_a_recipe_field_merge_with_runs_that_keep_its_earlier_value(detection, tmp_path):
    def record(name, recipe):
        path = tmp_path / f"{name}.json"
        runs = [dict(model="ViT_Small", seed=42, split=name, pooled=0.1)]
        path.write_text(json.dumps(dict(recipe=recipe, data={}, corpus="c", machine={}, runs=runs)))
        return str(path)

    older = record("fold0", {"epochs": 45})
    merged = detection.merged_record([older, record("fold1", {"epochs": 45, "loss": "cross_entropy"})])
    assert merged["recipe"] == {"epochs": 45, "loss": "cross_entropy"}
    with pytest.raises(SystemExit, match="its recipe differs"):
        detection.merged_record([older, record("fold2", {"epochs": 45, "loss": "one_class"})])


def test_the_detection_record_gives_the_eer_of_each_source_of_recorded_persons(detection):
    files = pd.DataFrame(
        dict(
            label=[0, 0, 1, 1, 1, 0, 1],
            speaker=["words:ann", "words:bob", "tts:x", "tts:x", "vocoder", "sentences:cid", "tts:x"],
            prompt_speaker=["words:ann", "words:bob", "words:ann", "words:bob", "words:bob"]
            + ["sentences:cid"] * 2,
            score=[2.0, 1.0, -1.0, -0.5, -2.0, -1.0, 0.5],  # higher: more real
        )
    )
    # the word persons are told from the fakes of their prompts, the sentence person is not
    assert detection.per_source_eer(files) == {"sentences persons": 1.0, "words persons": 0.0}
    assert detection.per_source_eer(files.drop(columns="prompt_speaker")) == {}
    assert detection.per_source_eer(files.assign(speaker=files["speaker"].str.replace(":", "-"))) == {}


def test_a_fusion_weighs_each_detector_by_its_own_validation_scores_not_by_the_test(detection):
    def scores(paths, values):
        return pd.DataFrame(dict(original_path=paths, label=0, score=values))

    wide = dict(val=scores(["v1", "v2"], [-100.0, 100.0]), test=scores(["a", "b", "c"], [100.0, -100.0, 0.0]))
    narrow = dict(val=scores(["v1", "v2"], [0.0, 2.0]), test=scores(["a", "b"], [0.0, 3.0]))
    fused = detection.fused_scores([wide, narrow]).set_index("original_path")
    # z-scores by each detector's validation mean and std: wide (+0.707, -0.707), narrow (-0.707, +1.414);
    # "c", which one detector could not score, is left out
    assert list(fused.index) == ["a", "b"]
    assert fused["score"].tolist() == pytest.approx([0.0, 0.3536], abs=1e-4)
    assert fused["p_fake"].tolist() == pytest.approx([0.5, 1 / (1 + np.exp(0.3536))], abs=1e-4)


def test_rescoring_needs_the_record_of_the_runs_it_scores_again(detection, tmp_path):
    with pytest.raises(SystemExit, match="no record to rescore"):
        detection.earlier_training_seconds(tmp_path / "none.json")
    path = tmp_path / "runs.json"
    path.write_text(
        json.dumps(dict(recipe={}, runs=[dict(model="M", seed=1, split="fold0", train_seconds=9.5)]))
    )
    assert detection.earlier_training_seconds(path) == {("M", 1, "fold0"): 9.5}


def test_a_held_out_kind_is_tested_on_the_test_persons_prompts_whichever_voice_reads_them():
    metadata = pd.DataFrame(
        dict(
            original_path=[f"{i}.wav" for i in range(9)],
            label=[0, 0, 0, 1, 1, 1, 1, 1, 1],
            speaker=["ann", "bob", "cid", "ann", "tts:x", "tts:y", "tts:y", "tts:z", "bob"],
            attack=["-", "-", "-", "vocoder", "tts", "tts", "tts", "other_tts", "vocoder"],
            prompt_speaker=["ann", "bob", "cid", "ann", "ann", "bob", "cid", "ann", "bob"],
            view_split=["test", "train", "val", "test", "train", "test", "val", "test", "train"],
        )
    )
    view = vit_lib.held_out_view(metadata, "tts").set_index("original_path")["view_split"]
    # ann is tested: her prompt read by tts:x (a train voice) is tested, the held-out kind's other
    # readings are dropped, another kind's fakes leave test, and the other kinds' training fakes stay
    assert view.to_dict() == {
        "0.wav": "test",
        "1.wav": "train",
        "2.wav": "val",
        "4.wav": "test",
        "8.wav": "train",
    }
    without_prompts = vit_lib.held_out_view(metadata.drop(columns="prompt_speaker"), "tts")
    assert without_prompts.set_index("original_path")["view_split"].to_dict() == {
        "0.wav": "test",
        "1.wav": "train",
        "2.wav": "val",
        "5.wav": "test",
        "8.wav": "train",
    }


def test_held_out_kinds_crossed_with_folds_test_every_kind_on_every_folds_persons(dataset_dir, tmp_path):
    folds = vit_lib.write_fold_datasets(dataset_dir, tmp_path / "folds", k=4, seed=0)
    attacks = sorted(vit_lib.read_dataset_metadata(dataset_dir).query("label == 1")["attack"].unique())
    crossed = vit_lib.write_attack_holdout_datasets(dataset_dir, tmp_path / "crossed", k=4, seed=0)
    assert sorted(crossed) == sorted(f"{fold}_{attack}" for fold in folds for attack in attacks)
    for fold, fold_dir in folds.items():
        whole = vit_lib.read_dataset_metadata(fold_dir / DATASET)
        for attack in attacks:
            view = vit_lib.read_dataset_metadata(crossed[f"{fold}_{attack}"] / DATASET)
            training, test = view[view["split"] != "test"], view[view["split"] == "test"]
            assert not (training["attack"] == attack).any() and (training["label"] == 1).any()
            assert set(test.loc[test["label"] == 1, "attack"]) == {attack}
            kept = ["original_path", "segment_index", "split"]
            held_out = (whole["label"] == 1) & (whole["attack"] == attack)
            expected = whole[(whole["label"] == 0) | (held_out == (whole["split"] == "test"))]
            assert (
                view[kept].sort_values(kept).values.tolist()
                == expected[kept].sort_values(kept).values.tolist()
            )
    with pytest.raises(ValueError, match=r"no fakes of kind \['A99'\]"):
        vit_lib.write_attack_holdout_datasets(dataset_dir, tmp_path / "none", attacks=["A99"])


def test_detection_fuses_the_vit_with_the_gmm_and_rescores_without_training(detection, tmp_path, monkeypatch):
    corpus = vit_lib.make_fixture_corpus(tmp_path / "corpus", n_speakers=10, clips_per_speaker=2)
    monkeypatch.chdir(tmp_path)
    common = [
        "detection.py", "--corpus-dir", str(corpus), "--corpus", "folder", "--cache-dir", "cache",
        "--out", "out", "--models", "ViT_Small", "--seeds", "0", "--epochs", "1", "--set", "batch_size=8",
        "--gmm", "--gmm-components", "2", "--fuse",
    ]  # fmt: skip
    monkeypatch.setattr("sys.argv", [*common, "--name", "fused"])
    with contextlib.redirect_stdout(io.StringIO()):
        detection.main()
    record = json.loads((tmp_path / "out" / "fused.json").read_text())
    eers = {run["model"]: run["pooled"] for run in record["runs"]}
    assert set(eers) == {"ViT_Small", "LFCC-GMM (2)", "fusion: ViT_Small + LFCC-GMM (2)"}
    assert all(0 <= eer <= 1 for eer in eers.values())
    checkpoint = tmp_path / "checkpoints" / "out" / "best_vit_model_ViT_Small_fused_seed0.pth"
    written = checkpoint.stat().st_mtime_ns
    monkeypatch.setattr("sys.argv", [*common, "--rescore", "fused", "--name", "again"])
    with contextlib.redirect_stdout(io.StringIO()):
        detection.main()
    again = json.loads((tmp_path / "out" / "again.json").read_text())
    assert {run["model"]: run["pooled"] for run in again["runs"]} == eers
    assert checkpoint.stat().st_mtime_ns == written, "rescoring trains nothing"


@pytest.fixture(scope="module")
def front_end_screen():
    return benchmark("front_end_screen")


def test_the_screens_texture_ignores_each_rows_mean_but_not_how_the_rows_move(front_end_screen):
    rng = np.random.default_rng(0)
    spec = rng.normal(-40.0, 6.0, size=(8, 32))
    texture = front_end_screen.spectrogram_texture(spec)
    assert texture.shape == (4 * 8 - 2,)
    coloured = spec + rng.normal(0.0, 10.0, size=(8, 1))  # another voice's or channel's lasting colour
    np.testing.assert_allclose(front_end_screen.spectrogram_texture(coloured), texture)
    smoothed = (spec + np.roll(spec, 1, axis=1)) / 2  # the same rows, changing less from frame to frame
    assert (front_end_screen.spectrogram_texture(smoothed)[8:16] < texture[8:16]).all()


def test_the_front_end_screen_scores_each_fold_pooled_and_per_kind_of_fake(front_end_screen, dataset_dir):
    per_fold = front_end_screen.screen(dataset_dir, 3)
    assert list(per_fold.index) == ["fold0", "fold1", "fold2"]
    fakes = vit_lib.read_dataset_metadata(dataset_dir).query("label == 1")
    assert set(per_fold.columns) == {"pooled", *fakes["attack"].fillna("unknown").unique()}
    pooled = per_fold["pooled"]
    assert pooled.notna().all() and ((pooled >= 0) & (pooled <= 1)).all()
