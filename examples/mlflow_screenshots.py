"""Screenshots of what a user sees in MLflow after `rlora train` + `rlora register`, for the README.

Trains a short run of the main job's config (`examples/configs/cpu_demo.yaml`, in this process unless
`--ray`), registers its adapter, starts a real `mlflow ui` on 127.0.0.1 and photographs its pages with
headless Chromium (Debian: `apt-get install -y chromium`), driven over its DevTools protocol (aiohttp) so each
page is photographed once its charts have loaded:

    python examples/mlflow_screenshots.py --out examples/screenshots [--steps 8] [--keep WORK_DIR]

Writes `mlflow_run.png` (run overview: params, tags, registered model), `mlflow_metrics.png` (model
metric charts), `mlflow_system.png` (system metrics), `mlflow_diagnostics.png` (a diagnostics plot in the
artifact browser) and `mlflow_registry.png` (the registered model version).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("error: no Chromium found: install it (Debian: apt-get install -y chromium)")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(work: Path, steps: int, ray: bool) -> tuple[str, str, Path]:
    """(tracking URI, run id, adapter dir) of a short run of the main job's config."""
    from rlora.config import load_config
    from rlora.train.launcher import run_training
    from rlora.tracking.run_record import command_line

    overrides = [f"trainer.max_steps={steps}", f"trainer.output_dir={work}", "trainer.logging_steps=1",
                 f"trainer.save_steps={steps}", f"diagnostics.every_n_steps={max(1, steps // 2)}",
                 "eval.max_examples_per_task=20", "trainer.run_name=demo"]
    cfg_path = REPO / "examples" / "configs" / "cpu_demo.yaml"
    cfg = load_config(cfg_path, overrides)
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")
    argv = ["rlora", "train", str(cfg_path.relative_to(REPO)), *overrides] + ([] if ray else ["--local"])
    res = run_training(cfg, config_yaml=cfg_path.read_text(), local=not ray, verbose=False,
                       command=command_line(argv))
    return res.tracking_uri, res.mlflow_run_id, res.adapter_dir


# run in the page before a photo: close the assistant side panel; answer how many things still load
TIDY_JS = """(() => {
  if (!window.__rloraClosed && (document.body.innerText || '').includes('MLflow Assistant')) {
    let right = null;
    for (const b of document.querySelectorAll('button')) {
      const r = b.getBoundingClientRect();
      if (r.top < 70 && r.width > 0 && (!right || r.left > right.getBoundingClientRect().left)) right = b;
    }
    if (right && right.getBoundingClientRect().left > innerWidth * 0.85) { right.click(); window.__rloraClosed = true; }
  }
  const busy = document.querySelectorAll(
      '[class*=keleton], [class*=spin], [class*=Spin], [role=progressbar], [aria-busy=true]').length;
  const main = document.querySelector('main') || document.body;
  return (main.innerText || '').trim().length < 50 ? 1 + busy : busy;
})()"""
# the metric page opens with the diagnostics (sections are sorted by name): show the evaluation first
SCROLL_TO_EVAL_JS = """(() => {
  const el = [...document.querySelectorAll('h1,h2,h3,h4,span,div')].find(
      e => e.childElementCount <= 1 && /^eval\\/accuracy/.test((e.textContent || '').trim()));
  if (el) el.scrollIntoView({block: 'start'});
  return !!el;
})()"""


async def _shoot_all(browser: str, pages: list, out: Path, settle_s: float) -> None:
    """Photograph each (file name, URL, "W,H") in one headless Chromium over the DevTools protocol, waiting
    in real time until the page has no loading spinner (at most ``settle_s`` seconds)."""
    import aiohttp

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="rlora-chromium-") as profile:
        proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                 f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(120):
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                            targets = [t for t in await r.json() if t.get("type") == "page"]
                            if targets:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.5)
                async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    ids = iter(range(1, 10 ** 6))

                    async def call(method: str, **params):
                        i = next(ids)
                        await ws.send_json({"id": i, "method": method, "params": params})
                        while True:
                            msg = await ws.receive_json()
                            if msg.get("id") == i:
                                return msg.get("result", {})

                    for name, url, size, *extra in pages:
                        w, h = (int(v) for v in size.split(","))
                        await call("Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=1,
                                   mobile=False)
                        await call("Page.navigate", url=url)
                        t0 = time.monotonic()
                        await asyncio.sleep(3)
                        quiet = 0  # seconds in a row with nothing loading
                        while time.monotonic() - t0 < settle_s and quiet < 3:
                            res = await call("Runtime.evaluate", expression=TIDY_JS, returnByValue=True)
                            quiet = quiet + 1 if res.get("result", {}).get("value", 1) == 0 else 0
                            await asyncio.sleep(1)
                        for js in extra:
                            await call("Runtime.evaluate", expression=js, returnByValue=True)
                            await asyncio.sleep(5)
                        await asyncio.sleep(2)
                        shot = await call("Page.captureScreenshot", format="png")
                        (out / name).write_bytes(base64.b64decode(shot["data"]))
                        print(f"[rlora] {out / name} ({time.monotonic() - t0:.0f} s)", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "examples" / "screenshots"), help="folder for the PNGs")
    p.add_argument("--steps", type=int, default=8, help="training steps of the photographed run")
    p.add_argument("--ray", action="store_true", help="train with Ray workers (default: in this process)")
    p.add_argument("--keep", help="work folder to keep (default: a temporary one, removed afterwards); when it holds "
                               "an earlier call's run, that run is photographed again without training")
    p.add_argument("--settle-s", type=float, default=60.0, help="most seconds to wait for a page's charts")
    args = p.parse_args()
    browser = chromium()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rlora-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from mlflow.tracking import MlflowClient

        from rlora.export.registry import register

        if (work / "mlflow.db").is_file():  # --keep of an earlier call: photograph that run again
            uri = f"sqlite:///{(work / 'mlflow.db').resolve()}"
            mv = MlflowClient(uri).get_model_version_by_alias("rlora-demo", "challenger")
            run_id, version = mv.run_id, mv.version
        else:
            uri, run_id, adapter = train(work, args.steps, args.ray)
            version = register(adapter, name="rlora-demo", alias="challenger", tracking_uri=uri).version
        exp = MlflowClient(uri).get_run(run_id).info.experiment_id
        port = free_port()
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("MLFLOW_TRACKING_URI", None)
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                                   "127.0.0.1", "--port", str(port), "--workers", "1"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(240):
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            run = f"{base}/#/experiments/{exp}/runs/{run_id}"
            last = max(int(a.path.rsplit("_", 1)[-1]) for a in MlflowClient(uri).list_artifacts(run_id, "diagnostics"))
            pages = [("mlflow_run.png", run, "1400,1100"),
                     ("mlflow_metrics.png", f"{run}/model-metrics", "1400,1300", SCROLL_TO_EVAL_JS),
                     ("mlflow_system.png", f"{run}/system-metrics", "1400,900"),
                     ("mlflow_diagnostics.png", f"{run}/artifacts/diagnostics/step_{last:06d}/task_weights.png",
                      "1400,900"),
                     ("mlflow_registry.png", f"{base}/#/models/rlora-demo/versions/{version}", "1400,800")]
            asyncio.run(_shoot_all(browser, pages, out, args.settle_s))
        finally:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
