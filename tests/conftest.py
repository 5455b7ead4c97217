"""Fixtures shared by the test modules that train or score on prepared data."""

import contextlib
import io
from types import SimpleNamespace

import pytest

import vit_lib


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny fixture corpus, 4 speakers x 2 clips, real and fake, prepared once per module as
    `vit_balanced_dataset`: about 14 train, 6 val and 4 test segments. A 50/25/25 speaker split,
    since the default 70/15/15 leaves no speaker for val or test with only 4 speakers."""
    root = tmp_path_factory.mktemp("prepared")
    corpus = vit_lib.make_fixture_corpus(root / "corpus", n_speakers=4, clips_per_speaker=2)
    with contextlib.redirect_stdout(io.StringIO()):
        summary, _, _ = vit_lib.prepare_dataset(
            corpus,
            "vit_balanced_dataset",
            cache_dir=root / "cache",
            num_workers=1,
            progress=False,
            split_fractions=(0.5, 0.25, 0.25),
        )
    assert all(summary["segments_per_split"].values()), summary
    return SimpleNamespace(root=root, corpus=corpus, cache=root / "cache", summary=summary)
