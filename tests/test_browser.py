"""`make lab` the way attendees meet it: JupyterLab in headless Chromium runs lab0's first cells.

The server is started with the Makefile's own `lab` recipe (read with `make -n`, so a change to the
Makefile is tested, not a copy of it) plus `--no-browser`, 127.0.0.1, a free port, a random token and
a scratch root holding a copy of lab0.ipynb (the work tree's notebook is never opened, so nothing can
autosave into it). Jupyter's config/runtime dirs and IPython's dir are temporary, so the user's own
settings do not leak in. Chromium is Debian's `chromium` + `chromium-driver`, driven by Selenium with
both paths given explicitly: nothing downloads a browser or a driver. Without them the test is skipped
and says how to get them.

Checks: the kernel is this venv's "Python 3 (ipykernel)" (kernelspec, the running kernel's process,
the notebook toolbar); lab0's cells up to the first one that shows a tqdm bar (`models.load`) run
through the UI (Shift+Enter) and finish with execution counts, an idle kernel, no Traceback and no
TqdmWarning; the bar is an ipywidgets progress widget, not text. A screenshot goes to
`results.root()/screenshots/make_lab.png`; the server, kernel, Chromium and chromedriver are stopped
in teardown and the port is free afterwards.
"""

import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from labutils import launch, results

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FIRST_BAR_CELL = "models.load("  # lab0's first cell that shows a tqdm bar ("Loading weights")
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,800"]
# JupyterLab settings in the scratch config dir: no autosave, no news/update toast, every cell in the DOM
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}
READY_S, KERNEL_S, CELLS_S = 300, 300, 600  # generous ceilings on a loaded 2-core box, not expectations


def _missing() -> list[str]:
    tools = {"chromium": CHROMIUM, "chromedriver": CHROMEDRIVER, "make": shutil.which("make"),
             "selenium (python)": importlib.util.find_spec("selenium")}
    return [name for name, found in tools.items() if not found]


MISSING = _missing()
pytestmark = [
    pytest.mark.timeout(READY_S + KERNEL_S + CELLS_S + 300),
    pytest.mark.skipif(bool(MISSING), reason=(
        f"browser test NOT RUN: {', '.join(MISSING)} not found. To run it: `apt-get install -y "
        f"--no-install-recommends chromium chromium-driver` (Debian; .ci/run does this) and "
        f"`pip install -r requirements-dev.txt` (selenium); `make` reads the Makefile's lab recipe.")),
]


def _lab_command(extra: list[str]) -> str:
    """The Makefile's `lab` recipe for this venv, with `extra` as LAB_ARGS (setup not re-run)."""
    out = subprocess.run(["make", "-s", "-n", "-o", str(VENV / ".installed"), "lab", f"VENV={VENV}",
                          f"LAB_ARGS={shlex.join(extra)}"], cwd=REPO, capture_output=True, text=True, check=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and " lab " in lines[0], f"`make -n lab` printed more than the lab recipe: {lines}"
    return lines[0]


def _api(port: int, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    return json.loads(body) if body else None


def _wait_ready(port: int, token: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode} before it answered:\n{log.read_text()[-3000:]}")
        try:
            return _api(port, token, "/api/status")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)  # poll interval, not a wait for anything
    pytest.fail(f"JupyterLab did not answer /api/status within {READY_S} s:\n{log.read_text()[-3000:]}")


def _family(p: psutil.Process) -> list[psutil.Process]:
    """``p`` and every process below it, as far as they can still be seen."""
    try:
        return [p] + p.children(recursive=True)
    except psutil.Error:
        return [p]


def _stop(procs: list[psutil.Process], wait_s: float = 30.0):
    """SIGTERM every process still alive, then SIGKILL what is left after ``wait_s``."""
    for sig in ("terminate", "kill"):
        for p in procs:
            try:
                getattr(p, sig)()
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=wait_s)
        if not procs:
            return


def _scratch_root(tmp: Path) -> Path:
    """A copy of lab0.ipynb beside a link to labutils: the notebook imports it as from the repo root."""
    root = tmp / "root"
    root.mkdir()
    shutil.copy(REPO / "lab0.ipynb", root / "lab0.ipynb")
    (root / "labutils").symlink_to(REPO / "labutils", target_is_directory=True)
    return root


def _write_lab_settings(config_dir: Path):
    for name, value in LAB_SETTINGS.items():
        f = config_dir / "lab" / "user-settings" / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))


@pytest.fixture
def lab(tmp_path):
    """JupyterLab started as `make lab` starts it; yields (port, token, process, log)."""
    port, token, root = launch.free_port(), secrets.token_hex(24), _scratch_root(tmp_path)
    _write_lab_settings(tmp_path / "config")
    cmd = _lab_command(["--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                        f"--ServerApp.root_dir={root}"])
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               IPYTHONDIR=str(tmp_path / "ipython"), SMML_RESULTS_DIR=str(tmp_path / "results"),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    log = tmp_path / "jupyter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = psutil.Process(proc.pid)
    try:
        _wait_ready(port, token, proc, log)
        yield port, token, proc, log
    finally:
        family = _family(server)
        try:
            _api(port, token, "/api/shutdown", "POST")  # stops the kernels, then the server
            proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        _stop(family)
    assert launch.port_is_free(port), (f"port {port} is still taken after JupyterLab was stopped:\n"
                                       f"{log.read_text()[-2000:]}")


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chromium'}"]:
        opts.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    chromedriver = psutil.Process(service.process.pid)
    # the page itself 1280x800 (--window-size counts the window's frame): the screenshot's size
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 800,
                                                                   "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        family = _family(chromedriver)
        try:
            driver.quit()
        finally:
            _stop(family, wait_s=10)


def _is_venv_python(exe: str) -> bool:
    """``exe`` as written (links not followed: a venv's python links to the system one) is in this venv."""
    return Path(os.path.abspath(exe)).parent == VENV / "bin"


def _check_kernelspec(port: int, token: str) -> str:
    """The kernel JupyterLab offers for lab0 ("python3") is this venv's; returns its display name."""
    specs = _api(port, token, "/api/kernelspecs")
    spec = specs["kernelspecs"].get("python3", {}).get("spec")
    assert spec, f"JupyterLab offers no 'python3' kernel (lab0's kernel); it has {sorted(specs['kernelspecs'])}"
    argv0 = spec["argv"][0]
    # jupyter_client runs a bare "python"/"python3" as the server's own interpreter: this venv's
    assert argv0 in ("python", "python3", f"python3.{sys.version_info.minor}") or _is_venv_python(argv0), (
        f"the 'python3' kernelspec runs {argv0!r}, not this venv's python ({VENV}/bin/python): `make lab` would "
        f"give attendees another environment. See `{VENV}/bin/jupyter kernelspec list` (and JUPYTER_PATH); "
        f"remove the stray kernel.json or reinstall with `{VENV}/bin/python -m ipykernel install --sys-prefix`.")
    return spec["display_name"]


def _check_running_kernel(port: int, token: str, server: psutil.Process):
    kernels = _api(port, token, "/api/kernels")
    assert [k["name"] for k in kernels] == ["python3"], f"expected one python3 kernel, the server runs {kernels}"
    procs = [p for p in server.children(recursive=True) if kernels[0]["id"] in " ".join(p.cmdline())]
    assert procs, f"no process of kernel {kernels[0]['id']} among the server's children"
    assert _is_venv_python(procs[0].cmdline()[0]), (
        f"the kernel runs {procs[0].cmdline()[0]!r}, not this venv's python ({VENV}/bin/python)")


def _cells_to_run() -> tuple[int, int]:
    """(cells up to and including lab0's first bar cell, how many of them are code)."""
    cells = json.loads((REPO / "lab0.ipynb").read_text())["cells"]
    for i, c in enumerate(cells):
        if c["cell_type"] == "code" and FIRST_BAR_CELL in "".join(c["source"]):
            return i + 1, sum(c["cell_type"] == "code" for c in cells[: i + 1])
    pytest.fail(f"lab0.ipynb has no code cell calling {FIRST_BAR_CELL!r}: update FIRST_BAR_CELL in this test "
                f"to lab0's first cell that shows a tqdm progress bar")


def _wait(driver, until, timeout: float, what: str):
    """Wait for ``until(driver)``; a JupyterLab dialog (e.g. a kernel that cannot start) fails at once."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):
        dialogs = [e.text for e in d.find_elements("css selector", ".jp-Dialog") if e.text.strip()]
        assert not dialogs, f"JupyterLab showed a dialog while waiting for {what}: {dialogs}"
        return until(d)

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(check)
    except TimeoutException:
        pytest.fail(f"{what}: not seen within {timeout} s (a generous ceiling)")


def _kernel_idle(d) -> bool:
    return bool(d.find_elements("css selector", '.jp-Notebook-ExecutionIndicator[data-status="idle"]'))


def _kernel_status(d) -> str | None:
    """The kernel's name once the status bar says "<name> | Idle" for a real kernel, else None."""
    items = d.find_elements("css selector", '.jp-StatusBar-TextItem[title^="Change kernel"]')
    name, _, state = items[0].text.partition(" | ") if items else ("", "", "")
    return name if state == "Idle" and name not in ("", "No Kernel") and _kernel_idle(d) else None


def _run_first_cells(driver, n_cells: int, n_code: int) -> list:
    """Shift+Enter through the first ``n_cells`` cells; returns them once every code cell has its count."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    cells = driver.find_elements("css selector", ".jp-NotebookPanel .jp-Notebook .jp-Cell")[:n_cells]
    cells[0].click()  # selects the first cell, notebook in command mode
    keys = ActionChains(driver)
    for _ in range(n_cells):
        keys.key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT)
    keys.perform()

    def done(d):
        prompts = [c.find_element("css selector", ".jp-InputPrompt").text for c in cells
                   if "jp-CodeCell" in c.get_attribute("class")]
        return _kernel_idle(d) and len(prompts) == n_code and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts)

    _wait(driver, done, CELLS_S, f"lab0's first {n_code} code cells finished (execution counts, kernel idle)")
    return cells


def _check_outputs(cells, bar_cell):
    stderr = [e.text for c in cells for e in c.find_elements(
        "css selector", '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    bad = [t for t in stderr if "Traceback" in t or "TqdmWarning" in t]
    hint = ("\n(TqdmWarning: ipywidgets is missing from the kernel's venv: `pip install -r requirements.txt`)"
            if any("TqdmWarning" in t for t in bad) else "")
    assert not bad, "lab0's first cells wrote errors or warnings in JupyterLab:\n" + "\n---\n".join(bad) + hint
    bars = bar_cell.find_elements("css selector", ".jp-OutputArea .jupyter-widgets.widget-hprogress .progress-bar")
    assert bars, ("the tqdm bar of lab0's models.load cell did not render as an ipywidgets progress widget "
                  "(is ipywidgets installed in the venv?); its stderr shows: " + " | ".join(stderr)[-1500:])


def test_make_lab_runs_lab0_in_chromium(lab, browser):
    port, token, proc, log = lab
    display_name = _check_kernelspec(port, token)
    assert display_name == "Python 3 (ipykernel)", f"the python3 kernel is called {display_name!r}"
    browser.get(f"http://127.0.0.1:{port}/lab/tree/lab0.ipynb?token={token}")
    status = _wait(browser, _kernel_status, KERNEL_S, "lab0 open with a started, idle kernel")
    shown = browser.find_element("css selector", ".jp-Toolbar-kernelName").get_attribute("aria-label")
    assert status == shown == display_name, (f"JupyterLab shows kernel {status!r} (status bar) / {shown!r} "
                                             f"(toolbar) for lab0, expected {display_name!r}")

    n_cells, n_code = _cells_to_run()
    cells = _run_first_cells(browser, n_cells, n_code)
    _check_outputs(cells, cells[-1])
    _check_running_kernel(port, token, psutil.Process(proc.pid))

    browser.execute_script("arguments[0].scrollIntoView({block: 'end'})", cells[-1])
    shot = results.root() / "screenshots" / "make_lab.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)), f"Chromium could not write the screenshot {shot}"
    print(f"screenshot: {shot}")
