"""Training messages reach only the client that queued the run: live over ComfyUI's websocket, and through
`GET /unipic2/messages/<event>?clientId=` for a reloaded page (as often as it asks), on a real ComfyUI server on
127.0.0.1; each message names the step its run began at (0, or the resumed checkpoint's)."""

import asyncio
import importlib.util
import json

import aiohttp
import pytest

from tools.comfyui_runner import PACK_DIR, Server, prepare_host
from tools.demo import TINY, api_prompt, model_choice

EVENT = "unipic2.grpo"
STEPS = 3
GRPO = PACK_DIR / "workflows" / "unipic2_grpo_t2i.json"
TRAINER = "12"  # the trainer's node id in that workflow


def messages_module():
    """nodes/host/messages.py imports nothing from ComfyUI: load it alone, without the pack's package (which does)."""
    spec = importlib.util.spec_from_file_location("unipic2_messages", PACK_DIR / "nodes" / "host" / "messages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_kontext_dir):
    work = tmp_path_factory.mktemp("messages")
    server = Server(prepare_host(work), work)
    (server.models / "unipic2" / TINY["LoadUniPic2Kontext", "checkpoint"]).symlink_to(tiny_kontext_dir, target_is_directory=True)
    server.wait_ready()
    yield server
    server.stop()


def short_run(server, lora_name: str) -> dict:
    """The GRPO workflow in API format, cut down to a few tiny steps."""
    choose = lambda node, name: model_choice(node, name, server.models / "none", server.models / "unipic2")
    prompt = api_prompt(GRPO, server.get("/object_info"), choose)
    prompt[TRAINER]["inputs"].update(lora_name=lora_name, steps=STEPS, group_size=2, sampling_steps=2,
                                     resolution=64, save_every=0)
    return prompt


async def messages_until_done(socket, prompt_id: str) -> list[dict]:
    """Everything the socket got until its prompt finished (ComfyUI's `executing` with node None)."""
    received = []
    while True:
        frame = await socket.receive(timeout=600)
        if frame.type != aiohttp.WSMsgType.TEXT:
            assert frame.type == aiohttp.WSMsgType.BINARY, f"websocket closed: {frame}"
            continue
        message = json.loads(frame.data)
        received.append(message)
        data = message["data"]
        if message["type"] == "execution_error":
            pytest.fail(f"the run failed: {json.dumps(data)[-3000:]}")
        if message["type"] == "executing" and data["node"] is None and data.get("prompt_id") == prompt_id:
            return received


async def two_clients_train(server) -> tuple[dict, dict, dict]:
    """Clients a and b each queue their own run; returns their prompt ids, what each socket got, and what each
    client's GET answers after a reload (a new socket with the same client id), twice, and an unknown client's."""
    clients = ("unipic2-test-a", "unipic2-test-b")
    async with aiohttp.ClientSession() as http:
        sockets = {c: await http.ws_connect(f"{server.url}/ws?clientId={c}") for c in clients}
        prompt_ids = {}
        for client in clients:
            body = {"prompt": short_run(server, f"messages_{client[-1]}"), "client_id": client}
            async with http.post(f"{server.url}/prompt", json=body) as response:
                prompt_ids[client] = (await response.json())["prompt_id"]
        received = {c: await messages_until_done(sockets[c], prompt_ids[c]) for c in clients}

        async def fetch(client):
            async with http.get(f"{server.url}/unipic2/messages/{EVENT}", params={"clientId": client}) as response:
                return await response.json()

        await sockets[clients[0]].close()  # a page reload: the same client id on a new socket
        sockets[clients[0]] = await http.ws_connect(f"{server.url}/ws?clientId={clients[0]}")
        fetched = {c: [await fetch(c), await fetch(c)] for c in clients}
        fetched["someone-else"] = [await fetch("someone-else")]
        for socket in sockets.values():
            await socket.close()
    return prompt_ids, received, fetched


def test_each_client_gets_only_its_own_runs_live_and_after_a_reload(server):
    prompt_ids, received, fetched = asyncio.run(two_clients_train(server))
    for client, prompt_id in prompt_ids.items():
        live = [m["data"] for m in received[client] if m["type"] == EVENT]
        assert {m["prompt_id"] for m in live} == {prompt_id}  # the other client's run never reached this one
        # each message carries one step's point, not the history so far
        assert all(set(m) == {"prompt_id", "node", "start_step", "total", "point", "preview"} for m in live)
        assert [m["point"]["step"] for m in live] == list(range(1, STEPS + 1))
        assert {(m["node"], m["start_step"], m["total"]) for m in live} == {(TRAINER, 0, STEPS)}

        first, second = fetched[client]
        assert [(run["prompt_id"], run["node"], run["start_step"], run["total"]) for run in first] == [
            (prompt_id, TRAINER, 0, STEPS)]
        assert first[0]["history"] == [m["point"] for m in live]
        assert first[0]["preview"].startswith("data:image/jpeg;base64,")
        assert second == first  # fetching takes nothing away: a second reload still gets the finished run
    assert fetched["someone-else"] == [[]]


async def train_and_resume(server) -> tuple[list[dict], list[dict]]:
    """One client trains STEPS steps, then queues the same LoRA again for two more (resume is on by default);
    returns the live messages of both runs and what the client's GET answers afterwards."""
    client = "unipic2-test-resume"
    async with aiohttp.ClientSession() as http:
        socket = await http.ws_connect(f"{server.url}/ws?clientId={client}")
        live = []
        for steps in (STEPS, STEPS + 2):
            prompt = short_run(server, "messages_resume")
            prompt[TRAINER]["inputs"]["steps"] = steps
            async with http.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client}) as response:
                prompt_id = (await response.json())["prompt_id"]
            live += [m["data"] for m in await messages_until_done(socket, prompt_id) if m["type"] == EVENT]
        async with http.get(f"{server.url}/unipic2/messages/{EVENT}", params={"clientId": client}) as response:
            fetched = await response.json()
        await socket.close()
    return live, fetched


def test_a_resumed_run_tells_the_step_it_started_at(server):
    live, fetched = asyncio.run(train_and_resume(server))
    fresh, resumed = fetched
    assert [(m["prompt_id"], m["start_step"], m["total"], m["point"]["step"]) for m in live] == [
        *((fresh["prompt_id"], 0, STEPS, step) for step in range(1, STEPS + 1)),
        *((resumed["prompt_id"], STEPS, STEPS + 2, step) for step in (STEPS + 1, STEPS + 2))]
    assert (fresh["start_step"], resumed["start_step"]) == (0, STEPS)
    assert [point["step"] for point in resumed["history"]] == [STEPS + 1, STEPS + 2]


def test_a_run_keeps_its_latest_points_only():
    messages = messages_module()
    runs = messages.Runs()
    for step in range(1, messages.MAX_POINTS + 2):
        runs.add(EVENT, "a", "p", "12", 0, 10**6, {"step": step}, None)
    (run,) = runs.of_client(EVENT, "a")
    assert [point["step"] for point in run["history"]] == list(range(2, messages.MAX_POINTS + 2))


def test_the_least_recently_updated_run_goes_beyond_the_limit():
    messages = messages_module()
    runs = messages.Runs(max_runs=3)
    for prompt in ("p1", "p2", "p3"):
        runs.add(EVENT, "a", prompt, "12", 0, 5, {"step": 1}, None)
    runs.add(EVENT, "a", "p1", "12", 0, 5, {"step": 2}, None)  # p1 is training again: p2 is now the stalest
    runs.add(EVENT, "b", "p4", "12", 0, 5, {"step": 1}, None)
    assert [run["prompt_id"] for run in runs.of_client(EVENT, "a")] == ["p3", "p1"]
    assert [run["prompt_id"] for run in runs.of_client(EVENT, "b")] == ["p4"]


def test_a_client_fetches_its_runs_of_the_event_as_often_as_it_asks():
    messages = messages_module()
    runs = messages.Runs()
    runs.add(EVENT, "a", "p1", "5:3", 0, 2, {"step": 1}, "data:1")
    runs.add(EVENT, "a", "p1", "5:3", 0, 2, {"step": 2}, None)  # a step without a preview keeps the last one
    runs.add("unipic2.other", "a", "p2", "7", 0, 2, {"step": 1}, None)
    runs.add(EVENT, "a", "p3", "7", 4, 6, {"step": 5}, None)
    expected = [("p1", 0, [1, 2], "data:1"), ("p3", 4, [5], None)]
    for _ in range(2):  # p1 finished: it stays all the same
        assert [(r["prompt_id"], r["start_step"], [p["step"] for p in r["history"]], r["preview"])
                for r in runs.of_client(EVENT, "a")] == expected
    assert runs.of_client(EVENT, "b") == []
