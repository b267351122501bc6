"""The pack in a real browser: Debian's Chromium driven by Playwright against a real ComfyUI server on 127.0.0.1.

Every workflow loads with all its nodes known; the GRPO trainer's live chart holds exactly the rewards the server
logged, survives a page reload mid-run and a save / reopen; stray messages raise no console error; a workflow that
did not queue a run never shows it, live or after a reload; a trainer inside a subgraph (current frontend) gets its
points; a later run of a trainer replaces its chart, or continues it from the step it resumed at. The host's template
browser lists every workflow with its thumbnail.

Screenshots of each workflow go to $UNIPIC2_SCREENSHOTS (the README's pictures), and the template browser's
thumbnails (<name>.jpg beside workflows/<name>.json) to $UNIPIC2_THUMBNAILS, each to a temp folder when unset.
Regenerate both: UNIPIC2_SCREENSHOTS=docs/screenshots UNIPIC2_THUMBNAILS=workflows .venv/bin/python -m pytest
tests/test_browser.py
"""

import io
import json
import os
import re
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from tools.comfyui_runner import PACK_DIR, PACK_NAME
from tools.demo import MODEL_INPUTS, TINY, model_choice

from conftest import tiny_server

CHROMIUM = "/usr/bin/chromium"
# Headless in a closed network: no background connections, no GPU, a throwaway profile (as root: no sandbox).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))
GRPO = PACK_DIR / "workflows" / "unipic2_grpo_t2i.json"
STEP_LINE = re.compile(r"UniPic2 GRPO step (\d+)/(\d+): reward (-?[\d.]+)")
THUMBNAIL_WIDTH, THUMBNAIL_QUALITY, THUMBNAIL_MARGIN = 512, 80, 24  # margin: screen pixels of canvas around the nodes


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_kontext_dir, tiny_metaquery_dir):
    server = tiny_server(tmp_path_factory.mktemp("browser"), tiny_kontext_dir, tiny_metaquery_dir)
    for node, name in MODEL_INPUTS:  # the reward models' stand-ins, before the server lists its model folders
        model_choice(node, name, server.models / "none", server.models / "unipic2")
    server.wait_ready()
    # As a returning user (a first visit opens the frontend's template browser over the canvas), without the canvas
    # info (fps etc.) in the pictures' corner.
    for setting, value in (("Comfy.TutorialCompleted", b"true"), ("Comfy.Graph.CanvasInfo", b"false")):
        urllib.request.urlopen(urllib.request.Request(f"{server.url}/settings/{setting}", data=value, method="POST"),
                               timeout=30)
    yield server
    server.stop()


class Browser:
    def __init__(self, server, page):
        self.server, self.page = server, page
        self.errors: list[str] = []
        # Network noise is not ours: the current frontend reaches for outside resources this closed network lacks.
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                and not m.text.startswith("Failed to load resource") else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self):
        self.page.goto(self.server.url)
        self.wait_for_app()

    def reload(self):
        """One navigation, so a response of the reloaded page stays readable (a second one would discard it)."""
        self.page.reload()
        self.wait_for_app()

    def wait_for_app(self):
        self.page.wait_for_function("() => window.app?.graph && window.LiteGraph?.registered_node_types"
                                    "?.UniPic2GRPOTrainer", timeout=60_000)

    def load(self, workflow: dict):
        self.page.evaluate("async (w) => { await window.app.loadGraphData(w); }", workflow)

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def fit_and_screenshot(self, path: Path, thumbnail: Path | None = None):
        """Screenshot of the page with every node in view; `thumbnail`: also a JPEG of just the nodes."""
        box = self.js("""() => {
            const nodes = window.app.graph._nodes, canvas = window.app.canvas;
            const xs = nodes.flatMap(n => [n.pos[0], n.pos[0] + n.size[0]]);
            const ys = nodes.flatMap(n => [n.pos[1] - 30, n.pos[1] + n.size[1]]);
            const [left, top] = [110, 150];  // the side bar and the menu / tab bars lie over the canvas
            const [w, h] = [canvas.canvas.width - left - 40, canvas.canvas.height - top - 40];
            const scale = Math.min(w / (Math.max(...xs) - Math.min(...xs)), h / (Math.max(...ys) - Math.min(...ys)), 1);
            canvas.ds.scale = scale;
            canvas.ds.offset = [left / scale - Math.min(...xs), top / scale - Math.min(...ys)];
            canvas.setDirty(true, true);
            canvas.draw(true, true);
            const page = canvas.canvas.getBoundingClientRect();
            return { left: page.left + left, top: page.top + top,
                     right: page.left + left + scale * (Math.max(...xs) - Math.min(...xs)),
                     bottom: page.top + top + scale * (Math.max(...ys) - Math.min(...ys)) };
        }""")
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path))
        if thumbnail:
            write_thumbnail(path, box, thumbnail)

    def use_tiny_checkpoints(self):
        """Point the loaders and reward models at the tiny stand-ins (the workflows name the official repos)."""
        self.js("""(tiny) => tiny.forEach(([type, name, value]) => window.app.graph._nodes
            .filter(n => n.type === type).forEach(n => { n.widgets.find(w => w.name === name).value = value; }))""",
                [[node, name, value] for (node, name), value in TINY.items()])

    def shorten_training(self, **widgets):
        """Tiny training steps: the chart's plumbing is under test, not the learning."""
        self.js("""(widgets) => window.app.graph._nodes.filter(n => n.type === "UniPic2GRPOTrainer").forEach(n => {
            Object.entries(widgets).forEach(([name, value]) => n.widgets.find(w => w.name === name).value = value);
        })""", {"group_size": 2, "sampling_steps": 2, "resolution": 64, **widgets})

    def wait_until_stored(self, marker: str):
        """Until the workflow the frontend restores on reload holds `marker` (it stores the graph as it changes)."""
        self.page.wait_for_function("""async (marker) => {
            const { api } = await import("/scripts/api.js");
            const stored = sessionStorage.getItem(`workflow:${api.clientId}`) ?? localStorage.getItem("workflow");
            return stored?.includes(marker);
        }""", arg=marker)

    def wait_for_history(self, steps: int, timeout_s: int = 240):
        try:
            self.page.wait_for_function("""(steps) => (window.app.graph._nodes.find(n => n.type ===
                "UniPic2GRPOTrainer")?.properties?.unipic2_history?.length ?? 0) >= steps""", arg=steps,
                                        timeout=timeout_s * 1000)
        except PlaywrightTimeout:
            pytest.fail(f"no {steps} training steps on the chart; server log:\n{self.server.log()[-4000:]}")

    def trainer_history(self):
        return self.js("""() => {
            const node = window.app.graph._nodes.find(n => n.type === "UniPic2GRPOTrainer");
            return node?.properties?.unipic2_history ?? null;
        }""")


def write_thumbnail(screenshot: Path, box: dict, path: Path) -> None:
    """The nodes' part of a screenshot (box: their page rectangle), THUMBNAIL_WIDTH wide, as a JPEG."""
    with Image.open(screenshot) as image:
        edges = (box["left"] - THUMBNAIL_MARGIN, box["top"] - THUMBNAIL_MARGIN,
                 min(box["right"] + THUMBNAIL_MARGIN, image.width), min(box["bottom"] + THUMBNAIL_MARGIN, image.height))
        nodes = image.convert("RGB").crop(tuple(round(max(edge, 0)) for edge in edges))
    height = round(nodes.height * THUMBNAIL_WIDTH / nodes.width)
    nodes.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(path, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)


@pytest.fixture(scope="module")
def browser(server):
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = chromium.new_page(viewport={"width": 2400, "height": 1300})
        page.set_default_timeout(60_000)
        browser = Browser(server, page)
        browser.open()
        yield browser
        chromium.close()


def picture_folder(variable: str, tmp_path_factory) -> Path:
    """$variable's folder, or a temp one: the pictures are taken either way, so writing them stays tested."""
    folder = Path(os.environ.get(variable) or tmp_path_factory.mktemp(variable.lower()))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return picture_folder("UNIPIC2_SCREENSHOTS", tmp_path_factory)


@pytest.fixture(scope="module")
def thumbnails(tmp_path_factory) -> Path:
    return picture_folder("UNIPIC2_THUMBNAILS", tmp_path_factory)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_workflow_loads_with_every_node_known(browser, screenshots, thumbnails, workflow):
    data = json.loads(workflow.read_text())
    before = len(browser.errors)
    browser.load(data)
    loaded = browser.js("""() => window.app.graph._nodes.map(n => ({
        type: n.type, known: !!window.LiteGraph.registered_node_types[n.type], red: !!n.has_errors,
        widgets: (n.widgets ?? []).length }))""")
    assert sorted(n["type"] for n in loaded) == sorted(n["type"] for n in data["nodes"])
    assert [n for n in loaded if not n["known"] or n["red"]] == []
    assert browser.errors[before:] == []
    path, thumbnail = screenshots / f"{workflow.stem}.png", thumbnails / f"{workflow.stem}.jpg"
    browser.fit_and_screenshot(path, thumbnail)
    assert path.stat().st_size > 10_000
    assert_thumbnail(thumbnail.read_bytes())


def assert_thumbnail(data: bytes) -> None:
    """A thumbnail as the template browser gets it: a JPEG THUMBNAIL_WIDTH wide, not blank, well under 100 kB."""
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.width) == ("JPEG", THUMBNAIL_WIDTH)
        assert 64 <= image.height <= 2 * THUMBNAIL_WIDTH
    assert 5_000 < len(data) < 100_000


def test_the_template_browser_lists_every_workflow_with_its_thumbnail(server):
    assert "Unable to parse pyproject.toml" not in server.log()  # the host reads the pack's registry metadata
    missing = [w.name for w in WORKFLOWS if not w.with_suffix(".jpg").is_file()]
    assert missing == [], "no thumbnail: UNIPIC2_THUMBNAILS=workflows .venv/bin/python -m pytest tests/test_browser.py"
    templates = server.get("/workflow_templates")
    assert sorted(templates[PACK_NAME]) == [w.stem for w in WORKFLOWS]  # workflows/unipic2_sample.png is no template
    for workflow in WORKFLOWS:  # where the frontend's template browser fetches a custom node's thumbnail
        url = f"{server.url}/api/workflow_templates/{PACK_NAME}/{workflow.stem}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.headers["Content-Type"] == "image/jpeg"
            assert_thumbnail(response.read())


def test_the_frontend_template_browser_shows_each_thumbnail(browser):
    page = browser.page
    browser.js("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_placeholder("Search").first.fill("unipic2")  # which also opens the Extensions group of the list
    page.get_by_text(PACK_NAME, exact=True).first.click()
    page.wait_for_function("""([count, width]) => {
        const images = [...document.querySelectorAll('[data-testid^="template-workflow-"] img')];
        return images.length === count && images.every(image => image.complete && image.naturalWidth === width);
    }""", arg=[len(WORKFLOWS), THUMBNAIL_WIDTH])
    shown = browser.js("""() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
                          .map(card => card.dataset.testid.replace("template-workflow-", ""))""")
    page.locator("[role=dialog] button:has(.pi-times)").click()  # the dialog ignores Escape
    page.get_by_role("dialog").wait_for(state="detached")
    assert sorted(shown) == [w.stem for w in WORKFLOWS]


def test_training_chart_follows_the_server_and_survives_reload_and_save(browser, server, screenshots):
    browser.load(json.loads(GRPO.read_text()))
    browser.use_tiny_checkpoints()
    browser.shorten_training()
    log_start = len(server.log())
    browser.js("async () => { await window.app.queuePrompt(0, 1); }")
    browser.wait_for_history(3)
    browser.page.wait_for_timeout(1500)  # the frontend stores the workflow every second
    browser.reload()  # mid-run: the restored workflow keeps the chart, later messages complete it
    browser.wait_for_history(3, timeout_s=10)  # restored at once, not rebuilt from later steps
    browser.wait_for_history(10)

    browser.fit_and_screenshot(screenshots / "training_chart.png")
    logged = {int(step): float(reward) for step, _, reward in STEP_LINE.findall(server.log()[log_start:])}
    history = browser.trainer_history()
    assert [entry["step"] for entry in history] == list(range(1, 11))
    assert {entry["step"]: round(entry["rewards"]["total"][0], 4) for entry in history} == logged

    saved = browser.js("() => window.app.graph.serialize()")
    browser.js("() => window.app.graph.clear()")
    assert browser.trainer_history() is None
    browser.load(saved)
    assert browser.trainer_history() == history  # a saved workflow reopened shows the last chart


def test_stray_messages_are_ignored_without_console_errors(browser):
    workflow = json.loads(GRPO.read_text())
    workflow["extra"]["unipic2_prompts"] = ["queued-here"]
    browser.load(workflow)
    before = len(browser.errors)
    trainer_id = browser.js("""async () => {
        const { api } = await import("/scripts/api.js");
        const send = (detail) => api.dispatchEvent(new CustomEvent("unipic2.grpo", { detail }));
        const point = { step: 1, rewards: { total: [0.5, 0.1] }, loss: 0, kl: 0 };
        const trainer = window.app.graph._nodes.find(n => n.type === "UniPic2GRPOTrainer");
        const run = { start_step: 0, total: 1, point };
        send({ prompt_id: "queued-elsewhere", node: trainer.id, ...run });  // another graph's run
        send({ prompt_id: "queued-here", node: 99999, ...run });  // no such node
        send({ prompt_id: "queued-here", node: 1, ...run });  // a node of another type (the loader)
        send({ prompt_id: "queued-here", node: trainer.id, start_step: 0, total: 1, point: "garbage" });
        send({ prompt_id: "queued-here", node: trainer.id, total: 1, point });  // no start_step
        send({ history: "garbage" });
        const stray = trainer.properties.unipic2_history ?? null;
        window.app.graph.remove(trainer);
        send({ prompt_id: "queued-here", node: trainer.id, ...run });  // deleted
        window.app.canvas.draw(true, true);
        return [trainer.id, stray];
    }""")
    browser.page.wait_for_timeout(500)
    assert browser.errors[before:] == []
    assert trainer_id[1] is None
    assert browser.js("(id) => window.app.graph.getNodeById(id)", trainer_id[0]) is None
    assert browser.js("() => window.app.graph.getNodeById(1).properties.unipic2_history ?? null") is None


def test_a_workflow_that_did_not_queue_a_run_never_shows_it(browser):
    browser.load(json.loads(GRPO.read_text()))
    browser.use_tiny_checkpoints()
    browser.shorten_training(steps=3, lora_name="unipic2_grpo_never_run")
    browser.js("""async () => {
        const { api } = await import("/scripts/api.js");
        // ComfyUI's "executing" with no node ends a run, after all its messages on the same socket
        window.unipic2RunEnded = new Promise((ended) => api.addEventListener("executing", (e) => e.detail == null
                                                                              && ended()));
        await window.app.queuePrompt(0, 1);
    }""")
    never_run = json.loads(GRPO.read_text())  # the same trainer node id, never queued
    never_run["extra"]["unipic2_never_run"] = True
    browser.load(never_run)
    browser.js("() => window.unipic2RunEnded")
    assert browser.trainer_history() is None  # the run's live points went past it

    browser.wait_until_stored("unipic2_never_run")
    with browser.page.expect_response(lambda r: "/unipic2/messages/" in r.url) as caught:
        browser.reload()
    assert {run["node"] for run in caught.value.json()} == {"12"}  # the page caught up with the run...
    browser.js("() => fetch('/unipic2/messages/unipic2.grpo?clientId=none')")  # (after the page read the answer)
    assert browser.trainer_history() is None  # ...and kept it off this workflow


def test_a_trainer_inside_a_subgraph_gets_its_points(browser):
    browser.load(json.loads(GRPO.read_text()))
    history = browser.js("""async () => {
        const { api } = await import("/scripts/api.js");
        const graph = window.app.graph;
        const { node } = graph.convertToSubgraph(new Set([graph._nodes.find(n => n.type === "UniPic2GRPOTrainer")]));
        const trainer = node.subgraph.nodes.find(n => n.type === "UniPic2GRPOTrainer");
        graph.extra.unipic2_prompts = ["queued-with-subgraph"];
        const point = { step: 1, rewards: { total: [0.5, 0.1] }, loss: 0, kl: 0 };
        const executionId = `${node.id}:${trainer.id}`;  // what the server names a node inside a subgraph
        const detail = { prompt_id: "queued-with-subgraph", node: executionId, start_step: 0, total: 2, point };
        api.dispatchEvent(new CustomEvent("unipic2.grpo", { detail }));
        return trainer.properties.unipic2_history ?? null;
    }""")
    assert history == [{"step": 1, "rewards": {"total": [0.5, 0.1]}, "loss": 0, "kl": 0}]


def test_a_later_run_of_the_node_replaces_its_chart_or_continues_it_when_resumed(browser):
    browser.load(json.loads(GRPO.read_text()))
    charts = browser.js("""async () => {
        const { api } = await import("/scripts/api.js");
        const graph = window.app.graph;
        const trainer = graph._nodes.find(n => n.type === "UniPic2GRPOTrainer");
        graph.extra.unipic2_prompts = ["long", "fresh", "resumed"];  // queued in this order
        const send = (prompt_id, start_step, total, steps, term) => steps.forEach((step) => {
            const point = { step, run: prompt_id, rewards: { total: [step / 10, 0], [term]: [1, 0] }, loss: 0, kl: 0 };
            const detail = { prompt_id, node: trainer.id, start_step, total, point, preview: null };
            api.dispatchEvent(new CustomEvent("unipic2.grpo", { detail }));
        });
        const steps = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
        const chart = () => {  // the points by run and step, and the texts drawn: header first, then the legend
            const texts = [];
            const ctx = new Proxy({}, { get: (target, key) => key in target ? target[key]
                : key === "fillText" ? (text) => texts.push(text) : () => {} });
            trainer.onDrawForeground(ctx);
            return { points: trainer.properties.unipic2_history.map((p) => `${p.run}:${p.step}`), texts };
        };
        const charts = {};
        send("long", 0, 20, steps(1, 20), "aesthetic");
        charts.long = chart();
        send("fresh", 0, 5, steps(1, 5), "clip");  // the same node queued anew: another LoRA, or its files gone
        charts.fresh = chart();
        send("long", 0, 20, [20], "aesthetic");  // the earlier run again (a catch-up replays it)
        charts.replayed = chart();
        send("resumed", 3, 6, steps(4, 6), "ocr");  // the fresh run's checkpoint at step 3, resumed
        charts.resumed = chart();
        return charts;
    }""")
    run = lambda name, first, last: [f"{name}:{step}" for step in range(first, last + 1)]  # noqa: E731
    assert charts["long"]["points"] == run("long", 1, 20)
    assert charts["fresh"]["points"] == run("fresh", 1, 5)  # nothing of the longer run stays
    assert charts["fresh"]["texts"][0] == "step 5/5  reward 0.5000"
    assert charts["replayed"] == charts["fresh"]
    assert charts["resumed"]["points"] == run("fresh", 1, 3) + run("resumed", 4, 6)
    assert charts["resumed"]["texts"][0] == "step 6/6  reward 0.6000"
    legend = [text for text in charts["resumed"]["texts"] if text in ("total", "aesthetic", "clip", "ocr")]
    assert legend == ["total", "clip", "ocr"]  # every term on the chart, though the last point has no clip

