"""The one place that talks to the browser: training messages over ComfyUI's websocket, and the catch-up route.

A run's messages go only to the client that queued its prompt, and `GET /unipic2/messages/<event>?clientId=<id>`
answers only that client's runs: on a shared server nobody sees another user's curves or samples.
"""

import math
import sys
import threading
from collections import deque
from dataclasses import dataclass, field

MAX_POINTS = 2000  # per run; the oldest go first (a catch-up fills a reload's gap, the page holds what came before)
MAX_RUNS = 16  # in all, over every client; the least recently updated goes first


@dataclass
class Run:
    """One trainer node's training in one prompt, as kept for the catch-up of the client that queued it."""

    event: str
    client: str
    prompt: str
    node: str
    start_step: int
    total: int
    points: deque = field(default_factory=lambda: deque(maxlen=MAX_POINTS))
    preview: str | None = None

    def as_message(self) -> dict:
        return {"prompt_id": self.prompt, "node": self.node, "start_step": self.start_step, "total": self.total,
                "history": list(self.points), "preview": self.preview}


class Runs:
    """Training runs by (prompt id, node id), for the page of the client that queued them once it reloads.

    Reading takes nothing away: a run, finished or not, stays until newer runs push it out (`max_runs`), so a
    page that reloads twice, or a second tab of the same client, still gets it. Written by the prompt worker
    thread, read by the server's event loop: hence the lock.
    """

    def __init__(self, max_runs: int = MAX_RUNS):
        self.max_runs = max_runs
        self._runs: dict[tuple[str, str], Run] = {}
        self._lock = threading.Lock()

    def add(self, event: str, client: str, prompt: str, node: str, start_step: int, total: int, point: dict,
            preview: str | None) -> None:
        with self._lock:
            run = self._runs.pop((prompt, node), None) or Run(event, client, prompt, node, start_step, total)
            self._runs[(prompt, node)] = run  # (re)inserted last: the dict's order is the eviction order
            run.total, run.preview = total, preview or run.preview
            run.points.append(point)
            while len(self._runs) > self.max_runs:
                del self._runs[next(iter(self._runs))]

    def of_client(self, event: str, client: str) -> list[dict]:
        """The client's runs of this event as messages with their whole kept history, least recently updated
        first."""
        with self._lock:
            return [run.as_message() for run in self._runs.values() if run.client == client and run.event == event]


_RUNS = Runs()


def _server():
    """The running PromptServer, if any. Only looked up: importing ComfyUI's server module where no server runs
    (in-process use) can fail on new hosts."""
    module = sys.modules.get("server")
    return getattr(getattr(module, "PromptServer", None), "instance", None)


def json_safe(value):
    """JSON has no NaN: non-finite numbers (a skipped group's reward) travel as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def send_step(event: str, node_id: str, start_step: int, total: int, point: dict, preview: str | None = None) -> None:
    """One training step's new point (a dict with a 'step', sent json_safe) to the client that queued the running
    prompt (web/ appends it to the node's chart); kept for that client's catch-up. `start_step` is the step this
    run began at (0, or the resumed checkpoint's): the page keeps a chart's earlier points up to it, an older run's
    later ones go. Both hosts set the running prompt's id (`last_prompt_id`) and client (`client_id`) on the
    server before executing it. Without a server or a client (in-process tests, a script, a prompt queued without
    client_id) there is no one to tell."""
    server = _server()
    if server is None or server.client_id is None:
        return
    point = json_safe(point)
    prompt = getattr(server, "last_prompt_id", None)
    if prompt is not None:
        _RUNS.add(event, server.client_id, prompt, node_id, start_step, total, point, preview)
    message = {"prompt_id": prompt, "node": node_id, "start_step": start_step, "total": total, "point": point,
               "preview": preview}
    server.send_sync(event, message, server.client_id)


def register_routes() -> None:
    server = _server()
    if server is None:
        return
    from aiohttp import web

    @server.routes.get("/unipic2/messages/{event}")
    async def runs_of_client(request):
        client = request.rel_url.query.get("clientId")
        if not client:
            return web.json_response({"error": "UniPic2: give the page's client id as ?clientId=<id>"},
                                     status=400)
        return web.json_response(_RUNS.of_client(request.match_info["event"], client))


def jpeg_data_url(image, height: int = 96) -> str:
    """IMAGE [H, W, 3] 0..1 -> a small 'data:image/jpeg;base64,...' for the browser."""
    import base64
    import io

    from ...unipic_core.inference.images import to_pil

    picture = to_pil(image)
    picture = picture.resize((max(1, round(picture.width * height / picture.height)), height))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
