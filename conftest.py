"""Test-session settings shared by the unit tests and the notebooks nbval runs (its kernels inherit
this environment): no progress bars, whose redraws depend on timing, wandb never online, and fp32
everywhere (bf16 autocast, chosen by the CPU's instructions, would change every trained number).

The session runs on CPU (the "Device:" line is compared, and a GPU's kernels would change every
trained number) with two threads unless OMP_NUM_THREADS says otherwise; `make test-portable` runs the
notebooks with one thread and generic kernels to show that what nbval compares does not depend on them."""

import os

os.environ.setdefault("VIT_PROGRESS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["VIT_DEVICE"] = "cpu"
os.environ["VIT_MIXED_PRECISION"] = "off"
os.environ.setdefault("OMP_NUM_THREADS", "2")
