"""Which frequency bands a trained detector's decision rests on: vit_lib.band_occlusion on one split of
a processed dataset, for one or more checkpoints (ViT or CNN), each read with the data settings it was
trained with. Writes <out>/<checkpoint stem>.csv and .png per checkpoint.

    .venv/bin/python benchmarks/band_occlusion.py \\
        checkpoints/demo_corpus/best_vit_model_ViT_Small_rowmean_s42_seed42.pth \\
        --cache-dir data/demo_processed --out results/demo_corpus/band_occlusion
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vit_lib  # noqa: E402
from vit_audio import storage  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="trained .pth checkpoints to probe")
    parser.add_argument(
        "--cache-dir", default="data/demo_processed", help="prepared arrays (default: %(default)s)"
    )
    parser.add_argument(
        "--dataset",
        default=vit_lib.TrainingConfig().dataset_name,
        help="prepared dataset name (default: %(default)s)",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="split to occlude (default: %(default)s)",
    )
    parser.add_argument(
        "--rows-per-band", type=int, default=16, help="mel rows silenced at a time (default: %(default)s)"
    )
    parser.add_argument(
        "--out",
        default="results/demo_corpus/band_occlusion",
        help="folder of the tables and figures (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    matplotlib.use("Agg")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    for checkpoint_path in args.checkpoints:
        model, checkpoint = vit_lib.load_model(checkpoint_path, device)
        data_config, _ = vit_lib.inference_settings(checkpoint, checkpoint_path)
        dataset = vit_lib.split_dataset_for(model, args.cache_dir, args.dataset, args.split, data_config)
        table = vit_lib.band_occlusion(model, dataset, args.rows_per_band, device)
        stem = Path(checkpoint_path).stem
        storage.save_csv_atomic(out / f"{stem}.csv", table.round(4))
        plt.close(vit_lib.plot_band_occlusion(table, out / f"{stem}.png"))
        print(f"{checkpoint_path} on {args.split} of {Path(args.cache_dir) / args.dataset}:")
        print(table.round(3).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
