"""Training and inference throughput of AudioViT against a plain reference, and data-loader throughput.

The model is the one the default recipe trains (TrainingConfig(): its patch embedding, its dataset's
spectrogram size, its optimiser); --original measures the original notebook's (TrainingConfig.original():
linear patch embedding, 128 x 256 spectrograms, Adam).
For every model size: the model as the project trains it (vit_lib.speed_up(AudioViT(config)):
attention through scaled_dot_product_attention where that is faster, vit_lib.fast_dropout's CPU mask,
fp32), the same model under autocast to every 16-bit type the machine runs fast (CUDA: bf16 and fp16;
a CPU: bf16 where vit_lib.choose_precision picks it for training, i.e. where the CPU has bf16
instructions) and, optionally, under torch.compile, each against the plain model of the same
architecture with the same weights: AudioViT(config) as written (matmul/softmax attention, torch's
nn.Dropout, fp32, no compile). The header names the CPU (or GPU), its relevant instruction sets and
the precision training uses there.
Train = forward + cross-entropy + backward + optimiser step; infer = no_grad forward in eval mode.
Each figure is the median over --repeats timings of --iters (training) or --infer-iters steps,
after --warmup steps.

FLOPs are counted analytically (a multiply-add is 2 FLOPs), per sample, n = num_patches + 1 tokens:
  patch embedding   linear: 2 * num_patches * patch_dim * dim
                    conv: each convolution, 2 * output positions * c_in * c_out * kernel area
  each layer        2 * n * (dim * 3 * dim  +  dim * dim  +  2 * dim * mlp_dim)   (qkv, out, MLP)
                  + 2 * 2 * n * n * dim                                        (Q K^T and A V, all heads)
  head              2 * dim * num_classes
  train = forward + backward = 3 x forward (backward counted as 2 x forward).
LayerNorm, BatchNorm, softmax, GELU, dropout and the optimizer are not counted (they are memory-bound).
"samples/s" is the median over the repeats, "best" the fastest repeat (less sensitive to other load);
"x reference" is the median over the repeats of the speed ratio within a repeat, where the variants
run one after the other, so that a drift in the machine's speed cancels out.
The peak is a timed torch.matmul of two --peak-size square fp32 matrices at the same thread count.
At the end, the file-level test EER and training time per precision of whole training runs on the demo
corpus, read from benchmarks/detection.py's result files (a run takes minutes, too long to repeat here).

    .venv/bin/python benchmarks/throughput.py  # all sizes + loader: about 4 min on an idle 2-core CPU
    .venv/bin/python benchmarks/throughput.py --sizes ViT_Small --compile --json results/throughput.json
    .venv/bin/python benchmarks/throughput.py --sizes ViT_Small --no-loader --iters 1 --infer-iters 1 \\
        --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from load_monitor import cpu_snapshot, other_load  # noqa: E402

import vit_lib  # noqa: E402
from vit_audio import devices  # noqa: E402


def patch_embedding_flops(config):
    if config.patch_embedding == "linear":
        return 2 * config.num_patches * config.patch_dim * config.dim
    height, width, flops = config.image_height, config.image_width, 0
    for conv in vit_lib.conv_patch_embedding(config).modules():
        if isinstance(conv, torch.nn.Conv2d):
            height = (height + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
            width = (width + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
            flops += 2 * height * width * conv.weight.numel()
    return flops


def forward_flops(config):
    """Analytic forward FLOPs per sample (see the module docstring)."""
    n, d = config.num_patches + 1, config.dim
    per_layer = 2 * n * (d * 3 * d + d * d + 2 * d * config.mlp_dim) + 2 * 2 * n * n * d
    return patch_embedding_flops(config) + config.depth * per_layer + 2 * d * config.num_classes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(device, size, repeats=5):
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def make_step(model, mode, inputs, labels, device, amp_dtype, fast, recipe):
    """One training step (forward, loss, backward, optimiser) or one inference forward. The project's
    variants build the recipe's optimiser as run_training does (vit_lib.make_optimizer: fused), the
    reference the same optimiser as PyTorch's per-parameter loop."""
    precision = vit_lib.Precision(amp_dtype, "benchmark")
    if mode == "infer":

        def step():
            with torch.no_grad(), precision.autocast(device):
                model(inputs)

        return step
    optimizer = (
        vit_lib.make_optimizer(model, recipe, device)
        if fast
        else (torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam)(
            model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay, foreach=False
        )
    )
    criterion = torch.nn.CrossEntropyLoss()
    scaler = precision.grad_scaler(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device):
            loss = criterion(model(inputs), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def timed(step, device, count=1):
    """Seconds for `count` calls of `step`."""
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    sync(device)
    return time.perf_counter() - start


PROJECT = "AudioViT fp32"


def variants_for(args, device):
    """(name, fast, compile, autocast dtype, dropout); the reference comes first.
    dropout None keeps the config's; the --dropout-diagnostic row is not the training recipe."""
    rows = [
        ("reference (plain AudioViT, fp32)", False, False, None, None),
        (PROJECT, True, False, None, None),
    ]
    if args.compile:
        rows.append((f"{PROJECT} + torch.compile", True, True, None, None))
    if device.type == "cuda" and args.mixed_precision != "off":
        if torch.cuda.is_bf16_supported():
            rows.append(("AudioViT + autocast bf16", True, False, torch.bfloat16, None))
        rows.append(("AudioViT + autocast fp16", True, False, torch.float16, None))
    if device.type == "cpu" and args.precision.dtype is not None:
        rows.append(("AudioViT + CPU autocast bf16", True, False, torch.bfloat16, None))
    if args.dropout_diagnostic:
        rows.append((f"DIAGNOSTIC {PROJECT}, dropout 0", True, False, None, 0.0))
    return rows


def bench_model_size(size, args, device, peak):
    """Rows for one model size. The variants' timings are interleaved (reference, AudioViT, ...,
    reference, AudioViT, ...) so that a change in machine load between them does not bias the ratios."""
    recipe = args.recipe
    frames = vit_lib.SEGMENT_CONFIGS[recipe.dataset_name].max_frames_spec
    config = vit_lib.make_vit_config(
        size, (vit_lib.DataConfig.N_MELS, frames), patch_embedding=recipe.patch_embedding
    )
    torch.manual_seed(0)
    torch._dynamo.reset()  # a compiled variant compiles from scratch, with static shapes
    variants = variants_for(args, device)
    models = []
    for _, fast, _, _, dropout in variants:
        variant_config = copy.copy(config)
        if dropout is not None:
            variant_config.dropout = variant_config.emb_dropout = dropout
        model = vit_lib.AudioViT(config=variant_config)
        models.append((vit_lib.speed_up(model) if fast else model).to(device))
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())  # identical weights
    runners = [torch.compile(m) if variant[2] else m for m, variant in zip(models, variants)]
    inputs = torch.randn(args.batch_size, 1, config.image_height, config.image_width, device=device)
    labels = torch.randint(0, 2, (args.batch_size,), device=device)

    def logit_diffs():  # same weights, same function? (eval mode, no training step taken yet)
        with torch.no_grad():
            reference = runners[0].eval()(inputs).float()
            diffs = []
            for runner, (_, _, _, amp_dtype, _) in zip(runners, variants):
                with vit_lib.Precision(amp_dtype, "benchmark").autocast(device):
                    diffs.append((runner.eval()(inputs).float() - reference).abs().max().item())
        return diffs

    flops, rows, max_diff = forward_flops(config), [], None
    for mode in sorted(
        args.modes
    ):  # infer first: its first call compiles, and it leaves the weights as they are
        if mode == "train" and max_diff is None:
            max_diff = logit_diffs()
        steps, first_calls = [], []
        for runner, (_, fast, _, amp_dtype, _) in zip(runners, variants):
            runner.train(mode == "train")
            steps.append(make_step(runner, mode, inputs, labels, device, amp_dtype, fast, recipe))
            first_calls.append(timed(steps[-1], device))
            timed(steps[-1], device, args.warmup - 1)
        if max_diff is None:
            max_diff = logit_diffs()
        iters = args.iters if mode == "train" else args.infer_iters
        seconds = [[] for _ in variants]
        for _ in range(args.repeats):
            for index, step in enumerate(steps):
                seconds[index].append(timed(step, device, iters))
        rates = [args.batch_size * iters / statistics.median(times) for times in seconds]
        ratios = [statistics.median(ref / own for ref, own in zip(seconds[0], times)) for times in seconds]
        best = [args.batch_size * iters / min(times) for times in seconds]
        for index, (name, *_) in enumerate(variants):
            gflops = rates[index] * flops * (3 if mode == "train" else 1) / 1e9
            rows.append(
                dict(
                    device=device.type,
                    size=size,
                    mode=mode,
                    variant=name,
                    samples_per_s=rates[index],
                    best_samples_per_s=best[index],
                    ratio_vs_reference=ratios[index],
                    gflops=gflops,
                    peak_gflops=peak,
                    fraction_of_peak=gflops / peak,
                    max_abs_logit_diff=max_diff[index],
                    first_call_s=first_calls[index],
                    step_s=args.batch_size / rates[index],
                    params=vit_lib.count_parameters(models[index]),
                    fwd_gflop_per_sample=flops / 1e9,
                )
            )
            print(
                f"  {size:10s} {mode:5s} {name:40s} {rates[index]:8.1f} samples/s  x{ratios[index]:.2f}"
                f"  first call {first_calls[index]:.1f} s",
                flush=True,
            )
    order = {"train": 0, "infer": 1}
    return sorted(rows, key=lambda r: order[r["mode"]])  # stable: variants keep their order


def prepared_fixture(cache_dir, dataset_name):
    """Fixture corpus -> the processed dataset under cache_dir (kept if already there)."""
    cache_dir = Path(cache_dir)
    corpus = cache_dir / "fixture_audio"
    if not (corpus / "speakers.csv").is_file():
        vit_lib.make_fixture_corpus(corpus)
    vit_lib.prepare_dataset(corpus, dataset_name, "folder", cache_dir, progress=False)
    return cache_dir / dataset_name


def bench_loader(dataset_dir, workers, epochs, batch_size):
    """Loader-only samples/s over `epochs` epochs after one untimed epoch (which starts the workers)."""
    dataset = vit_lib.AudioDataset(
        dataset_dir,
        "train",
        vit_lib.DataConfig.N_MELS,
        vit_lib.SEGMENT_CONFIGS[dataset_dir.name].max_frames_spec,
        augment=True,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=vit_lib.custom_collate_fn,
        persistent_workers=workers > 0,
    )
    start = time.perf_counter()
    for _ in loader:
        pass
    first_epoch = time.perf_counter() - start
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            seen += len(batch[1])
    return dict(
        workers=workers,
        samples=len(dataset),
        epochs=epochs,
        first_epoch_s=first_epoch,
        samples_per_s=seen / (time.perf_counter() - start),
    )


def relevant_cpu_flags():
    """The instruction sets that decide matmul speed and whether bf16 pays, as one text."""
    flags = devices.cpu_flags()
    if not flags:
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", *devices.CPU_BF16_FLAGS, "avx512_fp16", "asimd", "sve", "bf16")
    return " ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def detection_records(pattern):
    """Rows of file-level test EER and training minutes from benchmarks/detection.py's result files
    (one per run or merged), grouped by model and precision: what a precision buys for detection."""
    rows = []
    for path in sorted(Path().glob(pattern)):
        record = json.loads(path.read_text())
        if "runs" not in record:  # a run's training record beside them
            continue
        machines = record["machine"] if isinstance(record["machine"], list) else [record["machine"]]
        for run in record["runs"]:
            rows.append(
                dict(
                    model=run["model"],
                    seed=run["seed"],
                    eer=run["pooled"],
                    minutes=run["train_seconds"] / 60,
                    epochs=record["recipe"]["epochs"],
                    precision=machines[0].get("precision", "fp32").split(" (")[0],
                    cpu=machines[0].get("cpu", "?"),
                    threads=machines[0].get("torch_threads"),
                )
            )
    return rows


def detection_summary(rows):
    """Per model and precision: EER mean +- std, mean minutes and CPU-minutes per run, and the speed-up
    against the model's fp32 runs."""
    groups = {}
    for row in rows:
        groups.setdefault((row["model"], row["precision"]), []).append(row)
    summary = []
    for (model, precision), runs in groups.items():
        eers, minutes = [r["eer"] for r in runs], [r["minutes"] for r in runs]
        summary.append(
            dict(
                model=model,
                precision=precision,
                runs=len(runs),
                epochs=runs[0]["epochs"],
                eer_mean=statistics.mean(eers),
                eer_std=statistics.pstdev(eers),
                minutes=statistics.mean(minutes),
                cpu_minutes=statistics.mean(minutes) * (runs[0]["threads"] or 1),
                cpu=runs[0]["cpu"],
            )
        )
    for row in summary:
        fp32 = next((r for r in summary if r["model"] == row["model"] and r["precision"] == "fp32"), None)
        row["speed_up"] = fp32["minutes"] / row["minutes"] if fp32 else None
    return summary


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row) for _, fmt in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=list(vit_lib.VIT_SIZES),
        choices=list(vit_lib.VIT_SIZES),
        help="model sizes to time (default: all)",
    )
    parser.add_argument("--original", action="store_true", help="the original notebook's model and optimiser")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps, the first call included (>= 1)")
    parser.add_argument("--iters", type=int, default=2, help="timed training steps per repeat")
    parser.add_argument("--infer-iters", type=int, default=6, help="timed inference steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure; the median is reported")
    parser.add_argument(
        "--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"], help="what to time"
    )
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the project's model")
    parser.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="let torch.compile reuse its on-disk cache (default: a fresh one, so compile time is cold)",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=vit_lib.MIXED_PRECISION_SETTINGS,
        default="auto",
        help="the autocast rows: auto (on a CPU, bf16 where the training rule picks it; on CUDA, "
        "bf16 and fp16), on (bf16 on any CPU, even one without bf16 instructions), off (none)",
    )
    parser.add_argument(
        "--dropout-diagnostic",
        action="store_true",
        help="add the project's model with dropout 0: shows what dropout costs (not the training recipe)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: CUDA when present, else the CPU)",
    )
    parser.add_argument(
        "--peak-size",
        type=int,
        default=2048,
        help="matrix side of the fp32 matmul peak measurement (default: %(default)s)",
    )
    parser.add_argument("--no-loader", action="store_true", help="skip the data-loader benchmark")
    parser.add_argument(
        "--loader-epochs",
        type=int,
        default=10,
        help="epochs the data-loader benchmark reads (default: %(default)s)",
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        nargs="+",
        default=None,
        help="default: TrainingConfig().num_workers and 2",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="where the fixture dataset is built (default: a temp folder)"
    )
    parser.add_argument("--json", default=None, help="write every row here")
    parser.add_argument(
        "--detection-results",
        default="results/demo_corpus/precision/*.json",
        help="benchmarks/detection.py result files (a glob) whose EER and training time per "
        "precision are summarised at the end; '' for none",
    )
    args = parser.parse_args(argv)
    args.recipe = vit_lib.TrainingConfig.original() if args.original else vit_lib.TrainingConfig()
    args.warmup = max(1, args.warmup)
    if args.compile and not args.warm_compile_cache:  # first call = a cold compile, as on a fresh machine
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cache_")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.precision = vit_lib.choose_precision(device, args.mixed_precision)

    print(f"# AudioViT throughput, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"command: {shlex.join([Path(sys.executable).name] + sys.argv)}")
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, device {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({devices.cpu_model()}, {os.cpu_count()} logical CPUs, flags: {relevant_cpu_flags()}, "
            f"PyTorch kernels {torch.backends.cpu.get_cpu_capability()})"
        )
    )
    print(f"training precision on this machine: {args.precision}")
    print(f"threads: torch {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}")
    recipe = args.recipe
    print(
        f"model: {recipe.patch_embedding} patch embedding, {vit_lib.DataConfig.N_MELS} x "
        f"{vit_lib.SEGMENT_CONFIGS[recipe.dataset_name].max_frames_spec} spectrograms "
        f"({recipe.dataset_name}), "
        f"{recipe.optimizer}, batch {args.batch_size}"
        + (" (the original notebook's)" if args.original else "")
    )
    snapshot = cpu_snapshot()
    peak = matmul_peak_gflops(device, args.peak_size)
    print(
        f"fp32 matmul peak ({args.peak_size}x{args.peak_size}): {peak:.1f} GFLOP/s "
        "(measured again at the end; the higher one is used)\n",
        flush=True,
    )

    rows = []
    for size in args.sizes:
        rows += bench_model_size(size, args, device, peak)
    peak_end = matmul_peak_gflops(device, args.peak_size)
    print(f"\nfp32 matmul peak at the end: {peak_end:.1f} GFLOP/s")
    if peak_end > peak:
        peak = peak_end
        for row in rows:
            row.update(peak_gflops=peak, fraction_of_peak=row["gflops"] / peak)
    print()
    print(
        markdown_table(
            rows,
            [
                ("device", lambda r: r["device"]),
                ("size", lambda r: r["size"]),
                ("mode", lambda r: r["mode"]),
                ("variant", lambda r: r["variant"]),
                ("samples/s", lambda r: f"{r['samples_per_s']:.1f}"),
                ("best", lambda r: f"{r['best_samples_per_s']:.1f}"),
                ("x reference", lambda r: f"{r['ratio_vs_reference']:.2f}"),
                ("GFLOP/s", lambda r: f"{r['gflops']:.1f}"),
                ("% of matmul peak", lambda r: f"{100 * r['fraction_of_peak']:.0f}%"),
                ("max abs logit diff vs ref", lambda r: f"{r['max_abs_logit_diff']:.1e}"),
            ],
        )
    )
    compiled = [r for r in rows if "compile" in r["variant"]]
    if compiled:
        print(
            "\ntorch.compile cost: first call (compilation) against the steady step, and how many steps "
            "of the compiled model it takes to earn the compilation back against the uncompiled model"
        )
        for r in compiled:
            eager = next(
                e
                for e in rows
                if e["size"] == r["size"] and e["mode"] == r["mode"] and e["variant"] == PROJECT
            )
            saving = eager["step_s"] - r["step_s"]
            payback = (r["first_call_s"] - r["step_s"]) / saving if saving > 0 else None
            print(
                f"  {r['size']} {r['mode']}: first call {r['first_call_s']:.1f} s, step {r['step_s']:.2f} s "
                f"(uncompiled {eager['step_s']:.2f} s) -> "
                + (
                    f"pays back after {payback:.0f} steps ({payback * args.batch_size:.0f} samples)"
                    if payback
                    else "never pays back (no faster)"
                )
            )

    loader_rows = []
    if not args.no_loader:
        workers = args.loader_workers or sorted({vit_lib.TrainingConfig().num_workers, 2})
        with tempfile.TemporaryDirectory() as temp:
            dataset_dir = prepared_fixture(args.cache_dir or temp, args.recipe.dataset_name)
            for count in workers:
                loader_rows.append(bench_loader(dataset_dir, count, args.loader_epochs, args.batch_size))
        small = next(
            (
                r
                for r in rows
                if r["size"] == args.sizes[0] and r["mode"] == "train" and r["variant"] == PROJECT
            ),
            None,
        )
        for row in loader_rows:
            row["training_samples_per_s"] = small["samples_per_s"] if small else None
            row["ratio_vs_training"] = row["samples_per_s"] / small["samples_per_s"] if small else None
        print(
            f"\nData loader only (fixture train split, augment=True, batch {args.batch_size}, "
            f"{args.loader_epochs} timed epochs after one untimed):"
        )
        print(
            markdown_table(
                loader_rows,
                [
                    ("num_workers", lambda r: str(r["workers"])),
                    ("items", lambda r: str(r["samples"])),
                    ("first epoch s", lambda r: f"{r['first_epoch_s']:.2f}"),
                    ("samples/s", lambda r: f"{r['samples_per_s']:.0f}"),
                    (
                        f"x {args.sizes[0]} training",
                        lambda r: f"{r['ratio_vs_training']:.0f}" if r["ratio_vs_training"] else "-",
                    ),
                ],
            )
        )
    detection = detection_summary(detection_records(args.detection_results)) if args.detection_results else []
    if detection:
        print(
            f"\nDetection on the demo corpus per precision (file-level test EER over seeds and the wall time "
            f"of each training run, from {args.detection_results}; benchmarks/detection.py makes them):"
        )
        print(
            markdown_table(
                detection,
                [
                    ("model", lambda r: r["model"]),
                    ("precision", lambda r: r["precision"]),
                    ("runs", lambda r: str(r["runs"])),
                    ("epochs", lambda r: str(r["epochs"])),
                    ("EER", lambda r: f"{r['eer_mean']:.4f} ± {r['eer_std']:.4f}"),
                    ("minutes per run", lambda r: f"{r['minutes']:.1f}"),
                    ("CPU-minutes", lambda r: f"{r['cpu_minutes']:.1f}"),
                    ("x fp32 speed", lambda r: f"{r['speed_up']:.2f}" if r["speed_up"] else "-"),
                    ("CPU", lambda r: r["cpu"]),
                ],
            )
        )
    others = other_load(snapshot, cpu_snapshot())
    if others is not None:
        print(
            f"\nother processes used {100 * others:.0f}% of the CPUs during this run"
            + (": the figures are NOT reliable, run again on an idle machine" if others > 0.05 else "")
        )
    if args.json:
        meta = dict(
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            command=sys.argv,
            device=str(device),
            device_name=(
                torch.cuda.get_device_name(device) if device.type == "cuda" else devices.cpu_model()
            ),
            cpu_flags=relevant_cpu_flags(),
            kernels=torch.backends.cpu.get_cpu_capability(),
            training_precision=str(args.precision),
            peak_gflops=peak,
            batch_size=args.batch_size,
            dataset=args.recipe.dataset_name,
            patch_embedding=args.recipe.patch_embedding,
            optimizer=args.recipe.optimizer,
            other_cpu_share=others,
        )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        vit_lib.save_json_atomic(
            Path(args.json),
            dict(meta=meta, model_rows=rows, loader_rows=loader_rows, detection_rows=detection),
        )
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
