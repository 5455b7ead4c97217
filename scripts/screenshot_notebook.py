"""Run one notebook in JupyterLab in headless Chromium, as a student would, and take screenshots.

The test session executes the notebooks without a browser and with VIT_PROGRESS=0, so it never sees
what a student sees. This maintainer's tool (not run in CI) checks the notebook in JupyterLab itself:
that the tqdm.auto progress bars show as widgets, that the figures appear, and that no cell prints
an error.

Setup, once:

    apt-get install chromium chromium-driver
    .venv/bin/pip install -r requirements-screenshots.txt

Run from the repository root:

    .venv/bin/python scripts/screenshot_notebook.py notebooks/02_vit_walkthrough.ipynb \\
        --out build/screenshots

The notebook is copied to OUT/work/ and only the copy is opened, so JupyterLab's autosave never
touches the committed notebook. `jupyter lab` from this venv serves that folder on a free local port
with a random token, with a fresh JupyterLab profile in OUT/lab-profile/ and its log in
OUT/jupyterlab.log; the kernel gets VIT_DEVICE=cpu. After Run > Run All Cells has finished, OUT/01.png
shows the top of the page and OUT/02.png, 03.png, ... one window height further down each;
OUT/progress.png catches the first widget progress bar while it runs. The summary lists cells run,
figures, widget progress bars and error outputs. Exit status: 0 when no output went to stderr, 1 when
one did (a traceback, a warning, a plain tqdm bar), 2 when the run itself failed.
"""

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parent.parent


def fail(message: str) -> NoReturn:
    """Exit with status 2: the run could not be done (status 1 means it showed error output)."""
    print(f"screenshot_notebook: {message}", file=sys.stderr)
    sys.exit(2)


try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:
    fail(
        f"selenium is missing; install it with: "
        f"{sys.executable} -m pip install -r {REPO_ROOT / 'requirements-screenshots.txt'}"
    )

DEFAULT_NOTEBOOK = REPO_ROOT / "notebooks" / "02_vit_walkthrough.ipynb"
WINDOW_SIZE = (1400, 1000)
# Generous: the machines this runs on may share two cores with a training job.
START_TIMEOUT_S = 300
RUN_TIMEOUT_S = 15 * 60
POLL_S = 1
# Polls in a row with the kernel idle and no [*] prompt before the run counts as finished: Run All
# executes the cells one after the other, and the kernel is briefly idle between two of them.
QUIET_POLLS = 3
SCROLL_OVERLAP_PX = 60  # each screenshot repeats the bottom of the previous one, for context
MAX_SCREENSHOTS = 200
STDERR_MIME = "application/vnd.jupyter.stderr"

# The throw-away JupyterLab profile: the maintainer's own settings and saved workspace would
# otherwise change what the screenshots show.
LAB_SETTINGS = {
    # Every cell stays in the page, so the counts below also see outputs far below the window
    # (the "full" windowing mode would detach them).
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # No "get notified about Jupyter news?" toast over the screenshots, and no request to the internet.
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}

# What the page shows, in one round trip. Errors render like any stderr stream in JupyterLab 4
# (same mime type, no distinguishing class), so a traceback is recognised by its text.
PAGE_STATE_JS = """
const notebook = document.querySelector('.jp-NotebookPanel .jp-Notebook');
const dialog = document.querySelector('.jp-Dialog');
const state = {
  notebook: notebook !== null,
  dialog: dialog ? dialog.innerText.trim().replace(/\\s+/g, ' ') : null,
  waitingForInput: document.querySelector('.jp-NotebookPanel .jp-Stdin') !== null,
};
if (!notebook) return state;
const outputs = [...notebook.querySelectorAll('.jp-OutputArea-output')];
state.prompts = [...notebook.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
  .map(p => p.textContent.trim());
state.figures = notebook.querySelectorAll('.jp-OutputArea-output img').length;
state.widgets = outputs.filter(o => o.querySelector('.jupyter-widgets')).length;
state.progressBars = notebook.querySelectorAll('.jp-OutputArea-output .widget-hprogress').length;
state.stderr = outputs.filter(o => o.dataset.mimeType === arguments[0]).map(o => o.textContent);
state.brokenWidgets = outputs.filter(o => o.textContent.includes('Error displaying widget')).length;
return state;
"""

# Scrolls the notebook one window height down; false once the last cell is in view, because
# JupyterLab lets the notebook scroll on into empty space below it.
SCROLL_DOWN_JS = """
const [scroller, overlap] = arguments;
const cells = scroller.querySelectorAll('.jp-Cell');
if (cells[cells.length - 1].getBoundingClientRect().bottom
    <= scroller.getBoundingClientRect().bottom) return false;
scroller.scrollTop += scroller.clientHeight - overlap;
return true;
"""


class ScreenshotError(Exception):
    """The run could not be done (as opposed to a run that showed errors)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "notebook",
        nargs="?",
        type=Path,
        default=DEFAULT_NOTEBOOK,
        help="the notebook to run (default: notebooks/02_vit_walkthrough.ipynb)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "build" / "screenshots",
        help="folder for the screenshots, the working copy and the JupyterLab log",
    )
    args = parser.parse_args()
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        fail(
            "Debian's chromium and chromium-driver packages are missing; "
            "install them with: apt-get install chromium chromium-driver"
        )
    if not args.notebook.is_file():
        fail(f"no notebook at {args.notebook}")

    out_dir = args.out.resolve()
    work_dir = out_dir / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    notebook = work_dir / args.notebook.name
    shutil.copyfile(args.notebook, notebook)
    for old in [*out_dir.glob("[0-9][0-9].png"), out_dir / "progress.png"]:  # none left from an older run
        old.unlink(missing_ok=True)
    try:
        with (
            jupyter_lab(work_dir, out_dir / "lab-profile", out_dir / "jupyterlab.log") as server,
            headless_chromium(chromium, chromedriver) as driver,
        ):
            state = run_notebook(driver, server, notebook.name, out_dir / "progress.png")
            screenshots = take_screenshots(driver, out_dir)
    except ScreenshotError as error:
        fail(str(error))
    except WebDriverException as error:  # its str() appends chromedriver's stack trace
        fail(f"browser: {error.msg}")
    return print_summary(args.notebook, state, screenshots)


class Server:
    """Where the JupyterLab server answers, and its REST API."""

    def __init__(self, port: int, token: str):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.token = token

    def api(self, method: str, path: str):
        # The token travels in a header, so it never appears in a URL that an error message could show.
        request = urllib.request.Request(
            f"{self.base_url}/api/{path}",
            method=method,
            data=b"" if method == "POST" else None,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None


@contextlib.contextmanager
def jupyter_lab(work_dir: Path, profile_dir: Path, log_path: Path):
    """`jupyter lab` from this venv, serving work_dir on a free local port; stopped on the way out."""
    for name, settings in LAB_SETTINGS.items():
        path = profile_dir / "user-settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    server = Server(free_port(), secrets.token_hex(24))
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={server.port}",
        "--ServerApp.port_retries=0",  # fail rather than quietly serve on a port we do not know
        f"--ServerApp.root_dir={work_dir}",
        f"--LabApp.user_settings_dir={profile_dir / 'user-settings'}",
        f"--LabApp.workspaces_dir={profile_dir / 'workspaces'}",
    ]
    if os.geteuid() == 0:  # containers and cloud machines often log in as root; Jupyter refuses it unasked
        command.append("--allow-root")
    # The token goes through the environment rather than argv, so `ps` does not show it and Jupyter
    # logs it as "..." (it prints only tokens it generated itself). The kernel inherits this
    # environment: CPU, as in the tests, and no VIT_PROGRESS=0, because the progress bars are the point.
    env = {**os.environ, "JUPYTER_TOKEN": server.token, "VIT_DEVICE": "cpu"}
    env.pop("VIT_PROGRESS", None)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=work_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_answering(server, process, log_path)
            yield server
        finally:
            stop_jupyter_lab(server, process)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answering(server: Server, process: subprocess.Popen, log_path: Path):
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ScreenshotError(f"jupyter lab exited with status {process.returncode}; see {log_path}")
        try:
            server.api("GET", "status")
            return
        except OSError:  # refused or timed out while it starts
            time.sleep(POLL_S)
    raise ScreenshotError(f"jupyter lab did not answer within {START_TIMEOUT_S} s; see {log_path}")


def stop_jupyter_lab(server: Server, process: subprocess.Popen):
    # /api/shutdown shuts the kernels down before the server exits (terminating the server alone
    # can leave a kernel behind: it runs in a process group of its own); terminate and kill are
    # the fallbacks for a server that does not answer.
    if process.poll() is None:
        with contextlib.suppress(OSError):
            server.api("POST", "shutdown")
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def headless_chromium(chromium: str, chromedriver: str):
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    options.add_argument("--headless=new")
    options.add_argument(f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}")
    options.add_argument("--disable-dev-shm-usage")  # containers often have a /dev/shm too small for Chromium
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox does not start as root
    # Naming the driver keeps Selenium Manager from looking for (or downloading) another one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def run_notebook(driver, server: Server, name: str, progress_path: Path) -> dict:
    """Open the notebook, wait for its kernel, Run All Cells, and return the page state once done,
    with the most progress bars seen at once while it ran (saved to `progress_path` when first seen)."""
    driver.get(f"{server.base_url}/lab/tree/{urllib.parse.quote(name)}?token={server.token}")
    # The kernel's state comes from the server: the notebook toolbar's indicator says "idle" even
    # before the kernel has started.
    poll(
        driver,
        START_TIMEOUT_S,
        "the notebook and its kernel to be ready",
        lambda state: state["notebook"] and kernel_state(server, name) == "idle",
    )
    click_run_all_cells(driver)

    started = time.monotonic()
    quiet_polls = most_bars = 0

    def finished(state) -> bool:
        nonlocal quiet_polls, most_bars
        # tqdm bars with leave=False (the epoch bars) vanish when done: catch them while they run
        if state["progressBars"] > most_bars:
            most_bars = state["progressBars"]
            bar = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-hprogress")[-1]
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", bar)
            driver.save_screenshot(str(progress_path))
        busy = kernel_state(server, name) != "idle" or "[*]:" in state["prompts"]
        quiet_polls = 0 if busy else quiet_polls + 1
        has_run = any(prompt[1:-2].isdigit() for prompt in state["prompts"])
        if not has_run and not busy and time.monotonic() - started > 120:
            raise ScreenshotError("Run All Cells did not start any cell")
        return has_run and quiet_polls >= QUIET_POLLS

    state = poll(driver, RUN_TIMEOUT_S, "Run All Cells to finish", finished)
    return {**state, "progressBarsWhileRunning": most_bars}


def kernel_state(server: Server, name: str):
    """The execution state the server knows for the notebook's kernel, or None before it has one."""
    for session in server.api("GET", "sessions"):
        if session["path"] == name and session.get("kernel"):
            return session["kernel"]["execution_state"]
    return None


def poll(driver, timeout_s: float, what: str, done) -> dict:
    """Read the page state every POLL_S seconds until done(state); stop early on what would hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = driver.execute_script(PAGE_STATE_JS, STDERR_MIME)
        if state["dialog"]:  # e.g. "Select Kernel" when the notebook's kernel is not installed
            raise ScreenshotError(f"JupyterLab shows a dialog: {state['dialog'][:200]}")
        if state["waitingForInput"]:  # input() or getpass() in a cell: nobody will type the answer
            raise ScreenshotError("a cell is waiting for keyboard input")
        if done(state):
            return state
        time.sleep(POLL_S)
    raise ScreenshotError(f"gave up after {timeout_s:.0f} s waiting for {what}")


def click_run_all_cells(driver):
    # Through the Run menu, as a student would: JupyterLab 4 binds no key to Run All Cells. The entry
    # is found by its command id rather than its label, which may change between versions.
    run_menu = next(
        (item for item in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if item.text == "Run"),
        None,
    )
    if run_menu is None:
        raise ScreenshotError("JupyterLab's menu bar has no Run menu")
    run_menu.click()
    run_all = driver.find_element(By.CSS_SELECTOR, '.lm-Menu-item[data-command="runmenu:run-all"]')
    if "lm-mod-disabled" in run_all.get_attribute("class"):
        raise ScreenshotError("Run > Run All Cells is disabled")
    run_all.click()


def take_screenshots(driver, out_dir: Path) -> list:
    """The window at the top of the notebook, then one window height further down each time."""
    scroller = driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-WindowedPanel-outer")
    driver.execute_script("arguments[0].scrollTop = 0", scroller)
    paths = []
    for number in range(1, MAX_SCREENSHOTS + 1):
        time.sleep(POLL_S)  # let the browser paint what scrolled into view
        path = out_dir / f"{number:02d}.png"
        driver.save_screenshot(str(path))
        paths.append(path)
        if not driver.execute_script(SCROLL_DOWN_JS, scroller, SCROLL_OVERLAP_PX):
            break
    return paths


def print_summary(notebook: Path, state: dict, screenshots: list) -> int:
    prompts = state["prompts"]
    run = sum(prompt[1:-2].isdigit() for prompt in prompts)
    print(f"{notebook}: {run} of {len(prompts)} code cells run")
    print(
        f"figures: {state['figures']}, widget outputs: {state['widgets']}, "
        f"widget progress bars: {state['progressBars']} at the end, "
        f"up to {state['progressBarsWhileRunning']} at once while running"
    )
    problems = [describe_stderr(text) for text in state["stderr"]]
    problems += ["widget failed to display"] * state["brokenWidgets"]
    print(f"error outputs: {len(problems)}")
    for problem in problems:
        print(f"  {problem}")
    print(f"screenshots: {screenshots[0]} ... {screenshots[-1].name} ({len(screenshots)})")
    return 1 if problems else 0


def describe_stderr(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        # A traceback's first line is a rule of dashes; its last names the exception.
        return f"exception: {lines[-1]}"
    return f"stderr: {lines[0] if lines else '(empty)'}"


if __name__ == "__main__":
    sys.exit(main())
