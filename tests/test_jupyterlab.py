"""JupyterLab starts from the project's environment, lists the chapters and offers the project's kernel.

The server is started from .venv on a free loopback port with a token, asked through its REST
API (status, contents of notebooks/, kernel specs, the /lab page), and stopped.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from latentmed import book
from latentmed.paths import ROOT

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str):
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
        return r.status, (json.loads(body) if r.headers.get_content_type() == "application/json" else body)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lab")
    exe = BIN / "jupyter-lab"
    assert exe.exists(), f"{exe}: JupyterLab is not installed in the environment (requirements.txt)"
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen([str(exe), "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={ROOT}", *(["--allow-root"] if os.geteuid() == 0 else [])],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter-lab exited with {proc.returncode}:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            try:
                if _get(f"{base}/api/status", token)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter-lab did not answer in 90 s:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_jupyterlab_lists_the_chapters_with_the_projects_kernel(lab):
    base, token = lab
    status, contents = _get(f"{base}/api/contents/notebooks", token)
    assert status == 200
    names = {c["name"] for c in contents["content"] if c["type"] == "notebook"}
    chapters = {f"{c.name}.ipynb" for c in book.available()}
    assert chapters and chapters <= names, (chapters, names)
    status, specs = _get(f"{base}/api/kernelspecs", token)
    python3 = specs["kernelspecs"].get("python3")
    assert python3 is not None, specs["kernelspecs"].keys()
    argv0 = Path(python3["spec"]["argv"][0])
    # the kernel the chapters name runs the project's interpreter (env.sh installs it --sys-prefix)
    assert argv0.parent.resolve() == BIN.resolve() and "ipykernel_launcher" in python3["spec"]["argv"], python3["spec"]["argv"]
    status, page = _get(f"{base}/lab", token)
    assert status == 200 and b"JupyterLab" in page


def test_jupyterlab_refuses_requests_without_the_token(lab):
    base, _ = lab
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{base}/api/contents/notebooks", timeout=10)
    assert exc.value.code in (401, 403)
