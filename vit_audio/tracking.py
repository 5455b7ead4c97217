"""Weights & Biases: online with a key, offline without one, never a prompt."""

import os
from pathlib import Path

from vit_audio.storage import REPO_ROOT, display_path

WANDB_PROJECT = "audio-deepfake-detection"


def wandb_api_key():
    """The key from WANDB_API_KEY or a git-ignored wandb_api_key.txt (repo root or working folder)."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    for folder in (Path.cwd(), REPO_ROOT):
        path = folder / "wandb_api_key.txt"
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
    return None


def init_wandb(run_name, config, mode=None, save_dir=REPO_ROOT):
    """A wandb run that never prompts, prints a banner or waits: online only with a key (falling back
    to offline if the service cannot be reached), offline otherwise, or "disabled" on request."""
    os.environ["WANDB_SILENT"] = "true"
    import wandb

    key = wandb_api_key()
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if key else "offline")
    if mode == "online":
        os.environ["WANDB_API_KEY"] = key or ""
    # Unreachable servers are retried until init_timeout: long enough for a slow connection, short
    # enough that a machine without network starts training within seconds.
    settings = wandb.Settings(silent=True, console="off", init_timeout=10, x_disable_stats=True)
    try:
        return wandb.init(
            project=WANDB_PROJECT,
            name=run_name,
            config=config,
            mode=mode,
            dir=str(save_dir),
            settings=settings,
            reinit="finish_previous",
        )
    except Exception:
        if mode != "online":
            raise
        print(
            f"wandb: could not reach the server, logging offline to {display_path(Path(save_dir) / 'wandb')}"
        )
        return wandb.init(
            project=WANDB_PROJECT,
            name=run_name,
            config=config,
            mode="offline",
            dir=str(save_dir),
            settings=settings,
            reinit="finish_previous",
        )


def log_checkpoint(wandb_run, path):
    import wandb

    artifact = wandb.Artifact(Path(path).stem, type="model")  # best_{vit|cnn}_model_{run_name}
    artifact.add_file(str(path))
    wandb_run.log_artifact(artifact)
