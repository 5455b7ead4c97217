"""Test-session settings shared by the unit tests and the notebooks nbval runs (its kernels inherit
this environment): no progress bars, whose redraws depend on timing, and wandb never online.

nbval compares printed losses and the "Device:" line with the committed outputs, which were made on
CPU with two threads; float sums depend on the device and on how work is split among threads, so the
session pins both, whatever the machine has (a GPU, Apple silicon, more cores)."""
import os

os.environ.setdefault("VIT_PROGRESS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["VIT_DEVICE"] = "cpu"
os.environ["OMP_NUM_THREADS"] = "2"
