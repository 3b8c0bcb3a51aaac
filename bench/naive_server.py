"""The classification server a user would write today with FastAPI and plain peft.

    .venv/bin/python bench/naive_server.py --registry DIR --adapters a,b,c --port 8100

One ``PeftModel`` holds every adapter (``load_adapter``) next to its own head; each request
names one adapter and is served alone: take the lock, ``set_adapter``, tokenize, one forward,
mean-pool, the head, softmax. FastAPI runs the plain ``def`` route in its thread pool, so the
lock is what keeps two requests from switching the adapter under each other. The request and
answer have the shape of ``peftkit serve``'s ``POST /v1/classify``, so one load generator
drives both. bench_serve.py starts it; it reads the adapter folders of a peftkit registry
(``peft`` loads them as they are) but nothing else of peftkit at serving time.
"""

# no `from __future__ import annotations`: FastAPI reads the route's body type at run time
import argparse
import json
import threading
from pathlib import Path


def build_app(folders: dict[str, Path], model_path: str, max_length: int):
    import torch
    from fastapi import FastAPI, HTTPException
    from peft import PeftModel
    from pydantic import BaseModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    body = AutoModel.from_pretrained(model_path).eval()
    names = list(folders)
    model = PeftModel.from_pretrained(body, str(folders[names[0]]), adapter_name=names[0])
    heads, labels = {}, {}
    for name, folder in folders.items():
        if name != names[0]:
            model.load_adapter(str(folder), adapter_name=name)
        weights = load_file(str(folder / "head.safetensors"))
        head = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
        head.load_state_dict(weights)
        heads[name] = head.eval()
        labels[name] = json.loads((folder / "task.json").read_text())["labels"]
    model.eval()
    lock = threading.Lock()

    class Classify(BaseModel):
        adapter: str
        inputs: list[str]

    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/classify")
    def classify(body: Classify) -> dict:
        if body.adapter not in heads:
            raise HTTPException(404, f"unknown adapter {body.adapter}")
        enc = tokenizer(
            body.inputs, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        with lock, torch.inference_mode():
            model.set_adapter(body.adapter)
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            probs = torch.softmax(heads[body.adapter](pooled), -1)
        names = labels[body.adapter]
        results = []
        for row in probs.tolist():
            k = max(range(len(row)), key=row.__getitem__)
            results.append(
                {
                    "label": names[k],
                    "score": row[k],
                    "probs": dict(zip(names, row, strict=True)),
                    "ref": body.adapter,
                }
            )
        return {"results": results}

    return app


def main() -> None:
    import uvicorn

    from peftkit.models.assets import PACKAGED_MODELS, package_folder
    from peftkit.registry.store import Registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", required=True)
    parser.add_argument("--adapters", required=True, help="comma-separated names")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-length", type=int, default=64)
    ns = parser.parse_args()
    registry = Registry(ns.registry, read_only=True)
    folders = {n: registry.get(n).path for n in ns.adapters.split(",")}
    model_path = str(package_folder(PACKAGED_MODELS["minilm"]))
    app = build_app(folders, model_path, ns.max_length)
    uvicorn.run(app, host="127.0.0.1", port=ns.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
