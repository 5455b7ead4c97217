"""Test-session settings shared by the unit tests and the notebooks nbval runs (its kernels inherit
this environment): no progress bars, whose redraws depend on timing, and wandb never online."""
import os

os.environ.setdefault("VIT_PROGRESS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
