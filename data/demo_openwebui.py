"""Open WebUI feedback export writer and reader for the demo data (data/demo.py samples what is rated).

Mirrors shared/formats/openwebui_feedbacks_export.json (Open WebUI backend/open_webui/models/feedbacks.py): a list of
FeedbackModel; the rated message is meta.message_id inside snapshot.chat.chat.history.messages (note the double
`chat`), a tree linked by parentId/childrenIds. Arena chats hold two sibling replies from two models.
"""

from __future__ import annotations

import json
import random

MODELS = ("tiny-qwen:sft", "tiny-qwen:ppo")
USERS = tuple(f"b1c2d3e4-0000-4000-8000-00000000000{i}" for i in range(1, 6))
REASONS = {1: ("Accurate information", "Followed instructions perfectly", "Showcased creativity"),
           -1: ("Don't like the style", "Not factually correct", "Didn't fully follow instructions")}
T0 = 1730000000


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"


def feedback_record(rng: random.Random, chat: dict, rated: str, rating: int, models: tuple[str, ...]) -> dict:
    """One FeedbackModel rating message `rated` of `chat`; stores the annotation on the message, then snapshots."""
    messages = chat["history"]["messages"]
    messages[rated]["annotation"] = {"rating": rating, "reason": rng.choice(REASONS[rating]), "comment": "",
                                     "details": {"rating": rng.randint(7, 10) if rating > 0 else rng.randint(1, 4)}}
    path, mid = [], rated
    while mid is not None:
        path.insert(0, {"id": mid, "role": messages[mid]["role"], "content": messages[mid]["content"]})
        mid = messages[mid]["parentId"]
    chat["history"]["currentId"], chat["messages"] = rated, path
    arena = len(models) > 1
    model = messages[rated]["selectedModelId"] if arena else models[0]
    t = chat["timestamp"] // 1000
    note = messages[rated]["annotation"]
    data = {"rating": rating, "model_id": model, "reason": note["reason"], "comment": "", "tags": [],
            "details": note["details"]}
    if arena:
        data["sibling_model_ids"] = [m for m in models if m != model]
    snapshot = {"id": chat["id_"], "user_id": chat["user_"], "title": chat["title"], "created_at": t,
                "updated_at": t + 50, "share_id": None, "archived": False, "pinned": False, "meta": {},
                "folder_id": None, "chat": {k: v for k, v in chat.items() if not k.endswith("_")}}
    return json.loads(json.dumps({
        "id": _uuid(rng), "user_id": chat["user_"], "version": 0, "type": "rating", "data": data,
        "meta": {"arena": arena, "model_id": "arena-model" if arena else model, "message_id": rated,
                 "message_index": len(path), "chat_id": chat["id_"], "base_models": {m: None for m in models}},
        "snapshot": {"chat": snapshot}, "created_at": t + 60, "updated_at": t + 60}))  # deep copy: later edits


def chat_object(rng: random.Random, index: int, prompt: list[dict], replies: list[tuple[str, str]]) -> dict:
    """The inner chat object with a linear history of `prompt` turns and sibling replies [(model, text)]."""
    t, arena = T0 + 3600 * index, len(replies) > 1
    model_name = "arena-model" if arena else replies[0][0]
    messages, parent = {}, None
    for turn in [m for m in prompt if m["role"] != "system"]:
        mid = _uuid(rng)
        messages[mid] = {"id": mid, "parentId": parent, "childrenIds": [], "role": turn["role"],
                         "content": turn["content"], "timestamp": t}
        if turn["role"] == "user":
            messages[mid]["models"] = [model_name]
        else:
            messages[mid].update(model=model_name, modelName=model_name, done=True)
        if parent is not None:
            messages[parent]["childrenIds"].append(mid)
        parent = mid
    for model, text in replies:
        mid = _uuid(rng)
        messages[mid] = {"id": mid, "parentId": parent, "childrenIds": [], "role": "assistant", "content": text,
                         "model": model_name, "modelName": "Arena Model" if arena else model,
                         "timestamp": t + 3, "done": True}
        if arena:
            messages[mid].update(selectedModelId=model, arena=True)
        messages[parent]["childrenIds"].append(mid)
    title = prompt[-1]["content"][:30]
    return {"id": "", "title": title, "models": [model_name], "params": {}, "timestamp": t * 1000, "tags": [],
            "files": [], "history": {"currentId": None, "messages": messages}, "messages": [],
            "id_": f"c-{index:04d}", "user_": USERS[index % len(USERS)]}


def feedback_ratings(feedbacks: list[dict]) -> list[tuple[list[dict], str, int]]:
    """(prompt messages, rated reply, rating) of each feedback, read back from its snapshot tree."""
    out = []
    for fb in feedbacks:
        messages = fb["snapshot"]["chat"]["chat"]["history"]["messages"]
        rated = messages[fb["meta"]["message_id"]]
        prompt, mid = [], rated["parentId"]
        while mid is not None:
            prompt.insert(0, {"role": messages[mid]["role"], "content": messages[mid]["content"]})
            mid = messages[mid]["parentId"]
        out.append((prompt, rated["content"], fb["data"]["rating"]))
    return out
