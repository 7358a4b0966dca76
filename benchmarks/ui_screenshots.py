"""The MLflow UI checked the way a person reviews a run: headless Chromium opens the pages of
a running `mlflow server`, waits until each has rendered what MlflowClient says it should
show, and saves a screenshot of it.

    python benchmarks/ui_screenshots.py --tracking-uri http://127.0.0.1:5000 \\
        --model visiontune-classifier --out docs

Pages (one PNG each in --out) and what must be on them:

- ui_experiment.png: the experiment's runs table (link "all runs"): the parent run, its
  datasets and its registered model;
- ui_parent_run.png: the parent run's overview (link "this run"): Source, Datasets with the
  training, validation and test inputs (the "+N" of the list opened), tags, registered model,
  and the run's description when it has one;
- ui_heatmap.png, ui_misclassified.png, ui_marginal_effects.png: the run's Artifacts tab with
  evaluation/comparison_heatmap.png, evaluation/misclassified.png, then
  evaluation/marginal_effects.png selected and shown;
- ui_param_importance.png: the same with evaluation/param_importance.png, only when the run
  logged it (importance refuses a sweep with too few scored trials): without `--pages` it is
  skipped when absent, named in `--pages` it must be there;
- ui_parallel_coordinates.png: the Artifacts tab with evaluation/parallel_coordinates.html,
  which MLflow shows in a sandboxed iframe: inside it (reached over DevTools as a frame of its
  own), one `path.trial` line per trial run with a best_val_f1, those trials' ids, and an axis
  per searched parameter that varies across them, then best_val_f1;
- ui_chart_parallel.png: MLflow's own "Chart view" of the experiment's runs, filtered to this
  sweep's trial runs (the parent expanded and hidden), with a parallel coordinates chart over
  the searched parameters and best_val_f1: its axes named, its lines drawn, the trials listed.
  The chart is configured the way the UI stores it, in the browser's localStorage (see
  CHART_STATE_KEY), before the page loads; docs/mlflow.md gives the clicks;
- ui_model_version.png: the registered model version (link "the version"): its description,
  aliases and the link to its source run.

The run is the newest visiontune parent run behind the model's `challenger` or `champion`
version, or `--run-id`. The links are built by the pipeline's own `review_links`; with
`--printed FILE` (what `visiontune run` printed, e.g. via `| tee run.log`) the links printed
there must be those links. Every problem found is listed on one line and the exit status is 1;
`--json FILE` records each page's checks. Chromium is driven over the DevTools protocol
(`--remote-debugging-port`, a websocket from aiohttp, which Ray already installs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHOTS = {"runs": "ui_experiment.png", "run": "ui_parent_run.png",
         "heatmap": "ui_heatmap.png", "misclassified": "ui_misclassified.png",
         "importance": "ui_param_importance.png", "marginal_effects": "ui_marginal_effects.png",
         "parallel": "ui_parallel_coordinates.png", "chart": "ui_chart_parallel.png",
         "model": "ui_model_version.png"}
ARTIFACTS = {"heatmap": "evaluation/comparison_heatmap.png",
             "misclassified": "evaluation/misclassified.png",
             "importance": "evaluation/param_importance.png",
             "marginal_effects": "evaluation/marginal_effects.png"}
OPTIONAL = {"importance"}  # taken by default only when the run logged its artifact
PARALLEL_HTML = "evaluation/parallel_coordinates.html"
METRIC = "best_val_f1"  # the trials' score: components.evaluation.search_plots.METRIC

# Where MLflow 3.x keeps an experiment page's view (its charts among them): localStorage,
# LocalStorageUtils.getStoreForComponent("ExperimentPage", JSON.stringify(sorted experiment
# ids)).saveComponentState(...) in the UI's bundle (mlflow/server/js/build). Read once when the
# page loads; the UI writes it back itself after every change.
CHART_STATE_KEY = "MLflowLocalStorage-1.1-ExperimentPage-{ids}-ReactComponentState"
LISTED_ROWS = 15  # runs that the chart view's list shows in a 900 px window, at least

# Set before the app's code runs: the "Model training" side bar instead of GenAI's, and the
# assistant panel closed (it opens by itself on a first visit and covers a third of the page).
LOCAL_STORAGE = {"mlflow.workflowType_v1": json.dumps("machine_learning"),
                 "mlflow.assistant.panelOpen_v1": "false",
                 "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}
ERROR_TEXTS = ("Page Not Found", "An error occurred while rendering", "does not exist",
               "Request failed", "Something went wrong")


class UIError(RuntimeError):
    """A problem a reader must see: printed as one line, exit status 1."""


# ----------------------------------------------------------------------------- the browser

def find_browser(explicit: str | None = None) -> str:
    for name in ([explicit] if explicit else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(name) if name else None
        if path:
            return path
    raise UIError(f"no Chromium found ({explicit or 'chromium'}): apt-get install chromium")


RUNNING: set[Browser] = set()  # stopped on any way out of main(), SIGTERM included


class Browser:
    """Headless Chromium in its own process group with a throw-away profile; the DevTools
    endpoint is read from the profile's DevToolsActivePort file."""

    def __init__(self, binary: str, width: int, height: int):
        self.binary, self.width, self.height = binary, width, height
        self.profile = tempfile.mkdtemp(prefix="ui-shots-chromium-")
        self.proc: subprocess.Popen | None = None
        RUNNING.add(self)

    def start(self, timeout: float = 60) -> str:
        args = [self.binary, "--headless", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-sync", "--disable-background-networking",
                "--disable-component-update", "--mute-audio", "--password-store=basic",
                "--force-device-scale-factor=1", f"--window-size={self.width},{self.height}",
                f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with a sandbox
        self.log = open(Path(self.profile) / "chromium.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while True:
            lines = port_file.read_text().split() if port_file.exists() else []
            if len(lines) >= 2:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise UIError(f"Chromium did not start: {self._log_tail()}")
            time.sleep(0.1)
        while True:  # the endpoint may be up a moment before the first page is
            with urllib.request.urlopen(f"http://127.0.0.1:{lines[0]}/json/list",
                                        timeout=10) as r:
                pages = [t["webSocketDebuggerUrl"] for t in json.load(r) if t["type"] == "page"]
            if pages:
                return pages[0]
            if time.monotonic() > deadline:
                raise UIError(f"Chromium opened no page: {self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            text = (Path(self.profile) / "chromium.log").read_text().strip()
            return " | ".join(text.splitlines()[-3:])[-500:] or "(no output)"
        return "(no output)"

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            # renderers and helpers of the group may outlive the main process by a moment
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
        RUNNING.discard(self)


class Tab:
    """One page over the DevTools protocol: commands, and the requests still in flight."""

    LOADS = {"Document", "Script", "Stylesheet", "Image", "Font", "XHR", "Fetch"}

    def __init__(self, ws):
        self.ws, self.next_id, self.pending = ws, 0, {}
        self.inflight: dict[str, str] = {}
        self.last_network = time.monotonic()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        import aiohttp

        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                future = self.pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                # a worker's own script load never reports its end to the page: not counted
                if params.get("type") in self.LOADS and not url.endswith(".worker.js"):
                    self.inflight[params["requestId"]] = url
                self.last_network = time.monotonic()
            elif method in ("Network.loadingFinished", "Network.loadingFailed"):
                self.inflight.pop(params["requestId"], None)
                self.last_network = time.monotonic()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(UIError("Chromium closed the DevTools connection"))

    async def send(self, method: str, timeout: float = 60, session: str | None = None,
                   **params):
        """A DevTools command to the page, or to the target attached as `session`."""
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        answer = await asyncio.wait_for(future, timeout)
        if "error" in answer:
            raise UIError(f"DevTools {method}: {answer['error'].get('message')}")
        return answer["result"]

    async def eval(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise UIError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def frame_eval(self, url: str, expression: str):
        """`expression`'s value inside the page's iframe that shows `url`; None while there is
        none. A sandboxed iframe (MLflow's HTML preview) runs in a process of its own: it is
        a DevTools target, attached for the call; an iframe in the page's own process is
        reached through an isolated world of its frame (its DOM, not its scripts' globals)."""
        frame = next((t for t in (await self.send("Target.getTargets"))["targetInfos"]
                      if t["type"] == "iframe" and t["url"] == url), None)
        if frame is not None:
            session = (await self.send("Target.attachToTarget", targetId=frame["targetId"],
                                       flatten=True))["sessionId"]
            try:
                result = await self.send("Runtime.evaluate", session=session,
                                         expression=expression, returnByValue=True,
                                         awaitPromise=True)
            finally:
                with contextlib.suppress(UIError, asyncio.TimeoutError):
                    await self.send("Target.detachFromTarget", timeout=10, sessionId=session)
        else:
            def frames(tree):
                yield tree["frame"]
                for child in tree.get("childFrames", []):
                    yield from frames(child)
            tree = (await self.send("Page.getFrameTree"))["frameTree"]
            inside = next((f for f in frames(tree) if f.get("parentId") and
                           f["url"] == url), None)
            if inside is None:
                return None
            world = await self.send("Page.createIsolatedWorld", frameId=inside["id"],
                                    worldName="ui_screenshots")
            result = await self.send("Runtime.evaluate", expression=expression,
                                     contextId=world["executionContextId"],
                                     returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise UIError(f"script in the iframe failed: "
                          f"{result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def text(self) -> str:
        return " ".join((await self.eval("document.body ? document.body.innerText : ''")
                         or "").split())

    async def navigate(self, url: str) -> None:
        # from a blank page: every link is opened as a person pasting it would, the app loaded
        # afresh (a hash change alone would reuse the previous page's state)
        await self.send("Page.navigate", url="about:blank")
        deadline = time.monotonic() + 10  # the previous page gone: nothing of it is checked
        while await self.eval("location.href") != "about:blank":
            if time.monotonic() > deadline:
                raise UIError(f"Chromium did not leave {await self.eval('location.href')}")
            await asyncio.sleep(0.05)
        await self.send("Page.navigate", url=url)

    async def wait_for(self, check, timeout: float):
        """Poll `check()` (async; returns (done, detail)) until done or `timeout`; returns the
        last detail. A page that keeps showing MLflow's error text for 2 s stops the wait."""
        deadline = time.monotonic() + timeout
        error_since = None
        while True:
            done, detail = await check()
            if done:
                return True, detail
            page = await self.text()
            error = next((e for e in ERROR_TEXTS if e in page), None)
            error_since = (error_since or time.monotonic()) if error else None
            if error and time.monotonic() - error_since < 2:
                error = None
            if error or time.monotonic() > deadline:
                if error:
                    at = page.find(error)
                    detail = [f"the page shows {page[max(at - 60, 0):at + 120]!r}"] + list(
                        detail or [])
                return False, detail
            await asyncio.sleep(0.25)

    async def settle(self, quiet: float = 0.5, timeout: float = 15) -> None:
        """Until no request of the page's own origin was in flight for `quiet` seconds, fonts
        are loaded, images decoded and two frames painted (at most `timeout`)."""
        deadline = time.monotonic() + timeout
        origin = await self.eval("location.origin")
        while time.monotonic() < deadline:
            busy = [u for u in self.inflight.values() if u.startswith(origin)]
            if not busy and time.monotonic() - self.last_network >= quiet:
                break
            await asyncio.sleep(0.1)
        await self.eval("""(async () => {
            await document.fonts.ready;
            await Promise.all([...document.images].filter(i => !i.complete).map(
                i => new Promise(r => { i.onload = i.onerror = r; setTimeout(r, 5000); })));
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
        })()""")

    async def click(self, selector_js: str, leave: bool = False) -> bool:
        """A real mouse click in the middle of the element `selector_js` evaluates to; with
        `leave`, the pointer then leaves it and the focus is dropped (no hover decorations in
        the screenshot)."""
        box = await self.eval(f"""(() => {{ const e = {selector_js}; if (!e) return null;
            e.scrollIntoView({{block: 'nearest'}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if not box:
            return False
        x, y = box
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                            clickCount=1)
        if leave:
            await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y + 400)
            await self.eval("document.activeElement && document.activeElement.blur()")
        return True

    async def screenshot(self, path: Path) -> None:
        from PIL import Image

        shot = await self.send("Page.captureScreenshot", format="png")
        image = Image.open(io.BytesIO(base64.b64decode(shot["data"])))
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, optimize=True)


# ----------------------------------------------------------------------------- what to expect

@dataclass
class Expected:
    """What MlflowClient says the pages must show."""

    experiment_id: str
    run_id: str
    run_name: str
    model: str
    version: str
    aliases: list[str]
    description: str
    run_description: str
    source: str
    datasets: list[tuple[str, str, str]]  # (name, digest, context)
    children: list[str]  # the trial runs' names
    artifacts: dict[str, bool] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)  # the trial runs
    searched: list[str] = field(default_factory=list)  # the search space's keys, in order


@dataclass
class Trial:
    """A trial run as MlflowClient reads it."""

    name: str
    trial_id: str
    params: dict[str, str]
    scored: bool  # it logged a best_val_f1


def scored_trials(exp: Expected) -> list[Trial]:
    return [t for t in exp.trials if t.scored]


def varying_axes(exp: Expected) -> list[str]:
    """The searched keys whose value differs between the scored trials (a trial an axis did
    not apply to, `when:`, counts as "n/a"): the axes the pipeline's parallel coordinates page
    draws, best_val_f1 aside (components.evaluation.importance.searched_axes)."""
    trials = scored_trials(exp)
    return [k for k in exp.searched if len({t.params.get(k, "n/a") for t in trials}) > 1]


def searched_keys(params: dict[str, str], trials: list[Trial]) -> list[str]:
    """The keys of the run's search space: its `search.space` param (the config's dict, as
    Python writes it); failing that, every param a trial run logged."""
    import ast

    with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError):
        space = ast.literal_eval(params.get("search.space", ""))
        if isinstance(space, dict):
            return [str(k) for k in space]
    return list(dict.fromkeys(k for t in trials for k in t.params))


def newest_reviewed_run(tracker, model: str):
    """The model version behind `challenger` or `champion` whose run started last."""
    from components.registry import CHALLENGER, CHAMPION, get_alias_version

    versions = [mv for mv in (get_alias_version(tracker, model, a)
                              for a in (CHALLENGER, CHAMPION)) if mv is not None]
    if not versions:
        raise UIError(f"model {model} has no {CHALLENGER} or {CHAMPION} version at "
                      f"{tracker.uri}: register one with `visiontune run`, or pass --run-id")
    return max(versions, key=lambda mv: (tracker.client.get_run(mv.run_id).info.start_time or 0,
                                         int(mv.version)))


def expected_content(uri: str, model: str, run_id: str | None) -> Expected:
    from components.registry import get_version, version_of_run
    from components.tracking import DATASET_CONTEXT_TAG, ROLE_TAG, TRIAL_ID_TAG, Tracker

    tracker = Tracker(uri)
    if run_id:
        mv = version_of_run(tracker, model, run_id)
        if mv is None:
            raise UIError(f"no version of model {model} was registered from run {run_id}")
    else:
        mv = newest_reviewed_run(tracker, model)
    mv = get_version(tracker, model, mv.version)  # with its aliases
    run = tracker.client.get_run(mv.run_id)
    if run.data.tags.get(ROLE_TAG) != "pipeline":
        raise UIError(f"run {mv.run_id} of {model} version {mv.version} is not a visiontune "
                      f"parent run (tag {ROLE_TAG}={run.data.tags.get(ROLE_TAG)!r})")
    datasets = []
    for di in run.inputs.dataset_inputs:
        context = next((t.value for t in di.tags if t.key == DATASET_CONTEXT_TAG), "")
        datasets.append((di.dataset.name, di.dataset.digest, context))
    listed = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "evaluation")}
    child_runs = tracker.child_runs(run.info.experiment_id, run.info.run_id)
    children = sorted(r.info.run_name for r in child_runs)
    trials = [Trial(name=r.info.run_name, trial_id=r.data.tags.get(TRIAL_ID_TAG, ""),
                    params=dict(r.data.params), scored=METRIC in r.data.metrics)
              for r in sorted(child_runs, key=lambda r: r.info.run_name or "")]
    return Expected(
        experiment_id=run.info.experiment_id, run_id=run.info.run_id,
        run_name=run.data.tags.get("mlflow.runName", run.info.run_name or ""), model=model,
        version=str(mv.version), aliases=sorted(mv.aliases), description=mv.description or "",
        run_description=run.data.tags.get("mlflow.note.content", ""),
        source=run.data.tags.get("mlflow.source.name", ""), datasets=datasets,
        children=children,
        artifacts={p: p in listed for p in (*ARTIFACTS.values(), PARALLEL_HTML)},
        trials=trials, searched=searched_keys(run.data.params, trials))


def markdown_words(text: str) -> list[str]:
    """The words a reader sees of a Markdown text: list markers, emphasis and code ticks
    removed."""
    text = re.sub(r"(?m)^\s*[-*+]\s+", "", text)
    text = text.replace("**", "").replace("`", "")
    return text.split()


def contains_words(page: str, words: list[str]) -> bool:
    return " ".join(words) in page


def parse_printed_links(path: Path) -> dict[str, str]:
    """The links of the last "review" block `visiontune run` printed (see
    pipelines.training.review_text)."""
    labels = {"this run": "run", "all runs": "runs", "the version": "model"}
    links: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"\s+(this run|all runs|the version):\s+(\S+)\s*$", line)
        if m:
            if m.group(1) == "this run":
                links = {}  # a later block (a resumed run) replaces an earlier one
            links[labels[m.group(1)]] = m.group(2)
    return links


# ----------------------------------------------------------------------------- the pages

class Review:
    def __init__(self, tab: Tab, exp: Expected, out: Path, timeout: float):
        self.tab, self.exp, self.out, self.timeout = tab, exp, out, timeout
        self.results: list[dict] = []

    def record(self, page: str, url: str, ok: bool, missing: list[str], seconds: float,
               notes: list[str] = (), seen: dict | None = None) -> None:
        self.results.append({"page": page, "url": url, "ok": ok, "missing": list(missing),
                             "notes": list(notes), "seconds": round(seconds, 1),
                             "screenshot": SHOTS[page], **({"seen": seen} if seen else {})})
        state = "ok" if ok else "MISSING " + "; ".join(missing)
        print(f"  {page:<16} {state} ({seconds:.1f}s) -> {self.out / SHOTS[page]}", flush=True)
        for note in notes:
            print(f"  {'':<16} note: {note}", flush=True)

    async def page(self, name: str, url: str, check, ready=None, prepare=None,
                   seen: dict | None = None) -> None:
        """Open `url`; with `prepare`, act on the page (a click) once `ready` holds; wait
        until `check` holds, the page is quiet; screenshot; record what was missing. `seen`:
        what the last check found (it rewrites the dict), recorded with the page; its
        "notes" go with the page's notes."""
        start = time.monotonic()
        await self.tab.navigate(url)
        notes: list[str] = []
        ok = True
        if prepare is not None:
            ok, missing = await self.tab.wait_for(ready, self.timeout)
            if ok:
                await self.tab.settle()
                notes = await prepare()
        if ok:
            ok, missing = await self.tab.wait_for(check, self.timeout)
        await self.tab.settle()
        if ok:  # what was there before settling must still be there
            ok, missing = await check()
        await self.tab.screenshot(self.out / SHOTS[name])
        if seen:
            notes = [*notes, *seen.pop("notes", [])]
        self.record(name, url, ok, missing or [], time.monotonic() - start, notes, seen)

    def words(self, *wanted: tuple[str, str]):
        """A check: every (label, text) must be in the page's visible text."""
        async def check():
            page = await self.tab.text()
            missing = [label for label, text in wanted if text and text not in page]
            return not missing, missing
        return check

    async def runs_table(self, url: str) -> None:
        e = self.exp
        ready = self.words(("the runs table ('matching runs')", "matching runs"),
                           ("parent run " + e.run_name, e.run_name))
        base = self.words(("the runs table ('matching runs')", "matching runs"),
                          ("parent run " + e.run_name, e.run_name),
                          *((f"dataset {n}", n) for n, _, c in e.datasets if c == "training"),
                          ("registered model " + e.model, e.model),
                          *((f"trial run {c}", c) for c in e.children))

        async def expand_trials():
            # the parent's row lists its trial runs once its expander is clicked (the check
            # says whether they are shown)
            if e.children:
                await self.tab.click(f"document.querySelector('[row-id=\"{e.run_id}\"] "
                                     f"[col-id^=\"attributes\"] button')", leave=True)
            return []

        async def check():
            ok, missing = await base()
            linked = await self.tab.eval(
                f"!!document.querySelector('a[href*=\"/runs/{e.run_id}\"]')")
            if not linked:
                missing = [*missing, "a link to the parent run"]
            return ok and linked, missing
        await self.page("runs", url, check, ready=ready, prepare=expand_trials)

    async def run_page(self, url: str) -> None:
        from pipelines.steps import DATASET_CONTEXTS

        e = self.exp
        js_datasets = json.dumps([f"{n} ({d})" for n, d, _ in e.datasets])

        async def check():
            # each dataset's row: "name (digest)" and, beside it, its context
            rows = await self.tab.eval(f"""(() => {{
                const want = {js_datasets}, out = {{}};
                for (const e of document.querySelectorAll('body *')) {{
                    const t = (e.innerText || '').trim();
                    const r = e.getBoundingClientRect();
                    if (e.children.length === 0 && want.includes(t) && r.width > 0 &&
                        r.bottom > 0 && r.top < innerHeight && r.left < innerWidth)
                        out[t] = (e.parentElement.innerText || '').replace(/\\s+/g, ' ');
                }}
                return out; }})()""")
            page = await self.tab.text()
            missing = []
            if "Datasets" not in page:
                missing.append("the Datasets section")
            logged = {c for _, _, c in e.datasets}
            for context in DATASET_CONTEXTS.values():
                if context not in logged:  # not the UI's fault: say so
                    missing.append(f"a {context} dataset (the run logged none: MlflowClient "
                                   f"lists {sorted(logged)})")
            for name, digest, context in e.datasets:
                row = rows.get(f"{name} ({digest})")
                if row is None:
                    missing.append(f"dataset {name} ({context})")
                elif context and context.lower() not in row.lower():
                    missing.append(f"context {context!r} beside dataset {name} (row: {row!r})")
            for label, text in (("run name", e.run_name), ("Source " + e.source, e.source),
                                ("tag visiontune.role", "visiontune.role"),
                                ("registered model " + e.model, e.model)):
                if text and text not in page:
                    missing.append(label)
            if e.run_description and not contains_words(page, markdown_words(
                    e.run_description)[:12]):
                missing.append("the run's description")
            return not missing, missing

        first = f"{e.datasets[0][0]} ({e.datasets[0][1]})" if e.datasets else "Datasets"

        async def open_dataset_list():
            # The run page lists the first dataset and "+N": open it as a reader would.
            notes = []
            if not e.run_description:
                notes.append("the run has no description (tag mlflow.note.content): the "
                             "page says 'No description'")
            opened = await self.tab.click(f"""(() => {{
                let box = [...document.querySelectorAll('body *')].find(e =>
                    e.children.length === 0 && (e.innerText || '').trim() === {json.dumps(first)});
                for (let up = 0; box && up < 5; up++, box = box.parentElement) {{
                    const more = [...box.querySelectorAll('[data-component-type="tag"]')].find(
                        t => /^\\+\\d+$/.test(t.innerText.trim()));
                    if (more) return more;
                }}
                return null; }})()""")
            if opened:
                notes.append("the Datasets list shows one dataset and '+N'; opened it to "
                             "show the others")
            return notes
        ready = self.words(("run name", e.run_name), ("the Datasets section", "Datasets"),
                           ("the first dataset", first))
        await self.page("run", url, check, ready=ready, prepare=open_dataset_list)

    async def artifact_page(self, name: str, url: str) -> None:
        path = ARTIFACTS[name]
        file = path.rsplit("/", 1)[-1]
        words = self.words((f"{path} (the preview's title)", path), *self.tree())

        async def check():
            ok, missing = await words()
            shown = await self.tab.eval("""[...document.images].some(i => i.complete &&
                i.naturalWidth > 50 && i.getBoundingClientRect().width > 100)""")
            if not shown:
                missing = [*missing, f"the image {file} itself"]
            return ok and shown, missing

        if not self.exp.artifacts.get(path):
            self.record(name, url, False, [f"artifact {path} (not logged: MlflowClient does "
                                           f"not list it)"], 0.0)
            return
        await self.page(name, url, check)

    def tree(self) -> list[tuple[str, str]]:
        """The artifacts' names, as checks that the file tree lists them."""
        return [(f"{p.rsplit('/', 1)[-1]} in the file tree", p.rsplit("/", 1)[-1])
                for p in (*ARTIFACTS.values(), PARALLEL_HTML) if self.exp.artifacts.get(p)]

    async def parallel_page(self, url: str) -> None:
        """The parallel coordinates page in MLflow's HTML preview, checked inside its iframe:
        one line per scored trial run, those trials, the axes of the varying searched keys
        and best_val_f1, labels cut off at the frame's edges (a note)."""
        e = self.exp
        trials = scored_trials(e)
        axes = [*varying_axes(e), METRIC]
        ids = sorted(t.trial_id for t in trials)
        words = self.words((f"{PARALLEL_HTML} (the preview's title)", PARALLEL_HTML),
                           *self.tree())
        inside = """(() => {
            const svg = document.querySelector('svg');
            const lines = [...document.querySelectorAll('path.trial')];
            return {title: (document.querySelector('h3') || {}).textContent || '',
                lines: lines.length,
                drawn: lines.filter(p => p.getTotalLength() > 0 &&
                                         getComputedStyle(p).stroke !== 'none').length,
                axes: [...document.querySelectorAll('.axis .name')].map(t => t.textContent),
                ids: typeof DATA === 'undefined' ? null : DATA.trials.map(t => t.id),
                width: innerWidth, svgWidth: svg ? svg.getBoundingClientRect().width : 0,
                cut: [...document.querySelectorAll('svg text')].filter(t => {
                    const r = t.getBoundingClientRect();
                    return r.width > 0 && (r.left < 0 || r.right > innerWidth);
                }).map(t => t.textContent)}; })()"""
        seen: dict = {}

        async def check():
            ok, missing = await words()
            frame = await self.tab.eval("""(() => {
                const f = [...document.querySelectorAll('iframe')].find(f => {
                    const r = f.getBoundingClientRect(); return r.width > 300 && r.height > 200;
                });
                return f ? f.src : null; })()""")
            try:
                got = await self.tab.frame_eval(frame, inside) if frame else None
            except (UIError, asyncio.TimeoutError) as error:  # a frame that came and went
                got, frame = None, f"{frame}: {error}"
            seen.clear()
            if not frame:
                return False, [*missing, "the page in an iframe (MLflow's HTML preview)"]
            if not got:
                return False, [*missing, f"the content of the iframe ({frame}: not reachable "
                                         f"over DevTools)"]
            seen.update({"lines": got["lines"], "trials": len(trials), "axes": got["axes"],
                         "title": got["title"]})
            if got["lines"] != len(trials) or got["drawn"] != got["lines"]:
                missing.append(f"one line per trial run with a {METRIC} ({len(trials)}): "
                               f"{got['lines']} path.trial, {got['drawn']} of them drawn")
            if got["ids"] is not None and sorted(got["ids"]) != ids:
                missing.append(f"the trials {ids} (the page draws {sorted(got['ids'])})")
            if got["axes"] != axes:
                missing.append(f"the axes {axes} (the page draws {got['axes']})")
            if got["svgWidth"] > got["width"]:
                seen["notes"] = [f"the chart ({got['svgWidth']:.0f} px) is wider than the "
                                 f"preview ({got['width']} px): scroll it sideways"]
            if got["cut"]:
                seen.setdefault("notes", []).append(
                    f"labels cut off at the frame's edge: {got['cut'][:6]}")
            return not missing, missing

        if not e.artifacts.get(PARALLEL_HTML):
            self.record("parallel", url, False, [f"artifact {PARALLEL_HTML} (not logged: "
                                                 f"MlflowClient does not list it)"], 0.0)
            return
        await self.page("parallel", url, check, seen=seen)

    def chart_params(self) -> tuple[list[str], list[str]]:
        """The params for MLflow's parallel coordinates chart, and notes: the searched keys
        that vary and that every scored trial has (the chart leaves out a run that lacks
        one); those that every trial has, when none varies."""
        trials = scored_trials(self.exp)
        on_all = [k for k in self.exp.searched if trials and all(k in t.params
                                                                    for t in trials)]
        varying = varying_axes(self.exp)
        params = [k for k in varying if k in on_all]
        notes = []
        if len(params) < len(varying):
            notes.append(f"left out of MLflow's chart, not logged by every trial (the chart "
                         f"would drop those runs): {[k for k in varying if k not in params]}")
        if not params and on_all:
            notes.append(f"no searched parameter varies across the trials: the chart shows "
                         f"{on_all}")
            params = on_all
        return params, notes

    async def chart_page(self, url: str) -> None:
        """MLflow's chart view with the parallel coordinates chart seeded by review():
        its axes (the params and best_val_f1) named and in view, its lines drawn on its
        canvas, the trial runs listed beside it."""
        e = self.exp
        params, notes = self.chart_params()
        names = [t.name for t in scored_trials(e)]
        seen: dict = {}

        async def check():
            got = await self.tab.eval("""(() => {
                const svg = [...document.querySelectorAll('svg')].find(
                    s => s.querySelector('.dimension .label'));
                const labels = svg ? [...svg.querySelectorAll('.dimension .label')] : [];
                const canvas = svg && svg.parentElement.parentElement.querySelector(
                    'canvas.foreground') || document.querySelector('canvas.foreground');
                let inked = 0;
                const ctx = canvas && canvas.width && canvas.getContext('2d');
                if (ctx) {
                    const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
                    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) inked++;
                }
                return {labels: labels.map(t => t.textContent),
                    shown: labels.filter(t => { const r = t.getBoundingClientRect();
                        return r.width > 0 && r.top >= 0 && r.bottom <= innerHeight &&
                               r.left >= 0 && r.right <= innerWidth; }).map(t => t.textContent),
                    inked: inked}; })()""")
            page = await self.tab.text()
            missing = [] if "Parallel Coordinates" in page else [
                "the chart view's 'Parallel Coordinates' chart"]
            # the list renders the rows in view (and a few more): a long sweep's are not all
            listed = [n for n in names if n in page]
            if len(listed) < min(len(names), LISTED_ROWS):
                missing.append(f"the trial runs in the runs list: "
                               f"{[n for n in names if n not in listed][:10]} not listed")
            want = [*params, METRIC]
            seen.clear()
            seen.update({"axes": got["labels"], "inked_pixels": got["inked"],
                         "params": params, "trials_listed": len(listed),
                         "notes": [*notes, *([f"{len(listed)} of the {len(names)} trial runs "
                                              f"in the list's rows in view"]
                                            if len(listed) < len(names) else [])]})
            if sorted(got["labels"]) != sorted(want):
                missing.append(f"the axes {want} (the chart has {got['labels']}; MLflow did "
                               f"not take the chart from localStorage "
                               f"{CHART_STATE_KEY.format(ids=json.dumps([e.experiment_id]))}?)")
            elif sorted(got["shown"]) != sorted(want):
                missing.append(f"the axis names in view: "
                               f"{[k for k in want if k not in got['shown']]}")
            if not got["inked"]:
                missing.append("the chart's lines (its canvas is blank)")
            return not missing, missing

        if not params:
            self.record("chart", url, False, ["a searched parameter logged by the trial runs "
                                              f"(searched: {e.searched})"], 0.0, notes)
            return
        await self.page("chart", url, check, seen=seen)

    async def version_page(self, url: str) -> None:
        e = self.exp
        words = markdown_words(e.description)
        base = self.words((f"'Version {e.version}'", f"Version {e.version}"),
                          ("source run " + e.run_name, e.run_name),
                          *((f"alias {a}", a) for a in e.aliases))

        async def check():
            ok, missing = await base()
            page = await self.tab.text()
            if not e.description:
                missing = [*missing, "a description (the version has none)"]
            elif not contains_words(page, words):
                first = next((w for w in markdown_words(line) if w)
                             for line in e.description.splitlines() if line.strip())
                lost = [line.strip() for line in e.description.splitlines()
                        if line.strip() and not contains_words(page, markdown_words(line))]
                missing = [*missing, f"the description (lines not shown: {lost[:3]}; "
                                     f"starts {first!r})"]
            linked = await self.tab.eval(
                f"!!document.querySelector('a[href*=\"/runs/{e.run_id}\"]')")
            if not linked:
                missing = [*missing, "the link to the source run"]
            return not missing, missing
        await self.page("model", url, check)


def chart_url(links: dict[str, str], exp: Expected) -> str:
    """The experiment's runs in MLflow's chart view, filtered to this sweep's trial runs (the
    UI adds their parent run to the list)."""
    from urllib.parse import quote, urlencode

    query = {"compareRunsMode": "CHART",
             "searchFilter": f"tags.mlflow.parentRunId = '{exp.run_id}'"}
    return f"{links['runs']}?{urlencode(query, quote_via=quote)}"


def chart_state(exp: Expected, params: list[str]) -> dict[str, str]:
    """The localStorage entry that makes the experiment page open with one section, "Sweep
    review", holding a parallel coordinates chart of `params` and best_val_f1 over the
    visible runs: the parent run expanded (its trials listed) and hidden (its config's
    values are not a trial's). The fields are those of MLflow's RunsChartsParallelCardConfig
    and of the experiment page's UI state; the UI fills in the rest with its defaults."""
    section = "visiontune-sweep-review"
    state = {
        "compareRunCharts": [{
            "uuid": "visiontune-parallel", "type": "PARALLEL", "runsCountToCompare": 100,
            "metricSectionId": section, "deleted": False, "isGenerated": False,
            "selectedParams": params, "selectedMetrics": [METRIC], "showAllRuns": False}],
        "compareRunSections": [{
            "uuid": section, "name": "Sweep review", "display": True, "isReordered": False,
            "deleted": False, "isGenerated": False, "columns": 1, "cardHeight": 540}],
        "runsExpanded": {exp.run_id: True},
        "runsHiddenMode": "CUSTOM", "runsHidden": [exp.run_id],
        "runsVisibilityMap": {exp.run_id: False}}
    return {CHART_STATE_KEY.format(ids=json.dumps([exp.experiment_id])): json.dumps(state)}


def local_storage_script(items: dict[str, str]) -> str:
    return "".join(f"try {{ localStorage.setItem({json.dumps(k)}, {json.dumps(v)}); }} "
                   f"catch (e) {{}}\n" for k, v in items.items())


async def review(exp: Expected, links: dict[str, str], out: Path, browser_path: str,
                 width: int, height: int, timeout: float, pages=tuple(SHOTS),
                 skip_absent=frozenset()) -> list[dict]:
    """The pages in `pages`; one in `skip_absent` whose artifact the run did not log is left
    out instead of failing."""
    import aiohttp

    browser = Browser(browser_path, width, height)
    try:
        ws_url = await asyncio.get_running_loop().run_in_executor(None, browser.start)
        async with aiohttp.ClientSession() as session, session.ws_connect(
                ws_url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
            tab = Tab(ws)
            await tab.send("Page.enable")
            await tab.send("Network.enable")
            await tab.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                           deviceScaleFactor=1, mobile=False)
            await tab.send("Page.addScriptToEvaluateOnNewDocument",
                           source=local_storage_script(LOCAL_STORAGE))
            r = Review(tab, exp, out, timeout)
            if "runs" in pages:
                await r.runs_table(links["runs"])
            if "run" in pages:
                await r.run_page(links["run"])
            for name, path in ARTIFACTS.items():
                if name in pages and not (name in skip_absent and not exp.artifacts.get(path)):
                    await r.artifact_page(name, f"{links['run']}/artifacts/{path}")
            if "parallel" in pages:
                await r.parallel_page(f"{links['run']}/artifacts/{PARALLEL_HTML}")
            if "chart" in pages:
                # only for this page: the runs table above opens as the UI's default
                seed = await tab.send("Page.addScriptToEvaluateOnNewDocument",
                                      source=local_storage_script(
                                          chart_state(exp, r.chart_params()[0])))
                try:
                    await r.chart_page(chart_url(links, exp))
                finally:
                    await tab.send("Page.removeScriptToEvaluateOnNewDocument",
                                   identifier=seed["identifier"])
            if "model" in pages:
                await r.version_page(links["model"])
            tab.reader.cancel()
            return r.results
    finally:
        browser.stop()


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", required=True,
                   help="the `mlflow server` (http://HOST:PORT): its UI and its REST API")
    p.add_argument("--model", required=True, help="the registered model name")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    p.add_argument("--json", type=Path, help="write what was checked on each page here")
    p.add_argument("--run-id", help="the parent run to review (default: the newest parent run "
                                    "of the model's challenger/champion version)")
    p.add_argument("--printed", type=Path,
                   help="what `visiontune run` printed: its review links must be these pages")
    p.add_argument("--pages", nargs="+", choices=list(SHOTS),
                   help="only these pages (default: all; importance only when the run logged "
                        "evaluation/param_importance.png)")
    p.add_argument("--browser", help="Chromium binary (default: chromium on PATH)")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--timeout", type=float, default=60, help="seconds per page (default 60)")
    args = p.parse_args(argv)

    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the `finally`s below
    try:
        uri = args.tracking_uri.rstrip("/")
        if not uri.startswith(("http://", "https://")):
            raise UIError(f"--tracking-uri {uri}: the UI needs a running `mlflow server` "
                          f"(http://HOST:PORT)")
        from components.tracking import TrackingError, bound_http_retries, check_tracking_uri
        from components.ui_links import review_links

        browser = find_browser(args.browser)
        bound_http_retries()
        try:
            check_tracking_uri(uri)
        except TrackingError as e:
            raise UIError(str(e)) from None
        try:
            exp = expected_content(uri, args.model, args.run_id)
        except UIError:
            raise
        except Exception as e:  # a registry that fails
            from components.tracking import first_line

            raise UIError(f"cannot read model {args.model} and its run from {uri}: "
                          f"{first_line(e)}") from None
        links = review_links(uri, exp.experiment_id, exp.run_id, exp.model, exp.version)
        problems = []
        if args.printed:
            printed = parse_printed_links(args.printed)
            for key, url in links.items():
                if printed.get(key) != url:
                    problems.append(f"printed link {key!r} is {printed.get(key)!r}, this "
                                    f"run's page is {url}")
        print(f"ui_screenshots: run {exp.run_name} ({exp.run_id}), {exp.model} version "
              f"{exp.version}, {uri}", flush=True)
        results = asyncio.run(review(exp, links, args.out, browser, args.width, args.height,
                                     args.timeout, args.pages or list(SHOTS),
                                     frozenset() if args.pages else frozenset(OPTIONAL)))
    except UIError as e:
        print(f"ui_screenshots: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for running in list(RUNNING):
            running.stop()
    problems += [f"{r['page']} page ({r['url']}): missing {', '.join(r['missing'])}"
                 for r in results if not r["ok"]]
    notes = [f"{r['page']}: {n}" for r in results for n in r["notes"]]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"ok": not problems, "problems": problems, "notes": notes, "run_id": exp.run_id,
             "model": exp.model, "version": exp.version, "links": links, "pages": results,
             "seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n")
    if problems:
        print(f"ui_screenshots: FAILED: {' | '.join(problems)}", file=sys.stderr)
        return 1
    print(f"ui_screenshots: ok, {len(results)} pages checked in "
          f"{time.monotonic() - started:.0f}s; screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
