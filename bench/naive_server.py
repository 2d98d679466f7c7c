"""The serving benchmark's baseline: the image classifier server most people would write first.

FastAPI + uvicorn with one worker; each request's JPEG is opened with PIL, transformed with the
usual torchvision Resize(256) / CenterCrop(224) / ToTensor / Normalize, and run alone (batch of 1)
through the fp32 eager model under `torch.inference_mode`; the answer is the softmax top 5 as JSON.
Torch keeps its default thread count. It reads the `model.pt` state_dict and `classes.json` of an
artifact folder and answers `GET /ping` and `POST /invocations`, as our server does.

Run: `python -m bench.naive_server MODEL_DIR --port 8080`.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from PIL import Image
from torchvision import models, transforms

__all__ = ["create_app"]

TOP_K = 5

_TRANSFORM = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)


def create_app(model_dir: Path) -> FastAPI:
    """The app for the ResNet-18 whose state_dict and class names are in `model_dir`."""
    classes: list[str] = json.loads((model_dir / "classes.json").read_text())
    model = models.resnet18(num_classes=len(classes))
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu"))
    model.eval()
    app = FastAPI()

    @app.get("/ping")
    def ping() -> Response:
        return Response(status_code=200)

    @app.post("/invocations")
    async def invocations(request: Request) -> dict[str, Any]:
        image = Image.open(io.BytesIO(await request.body())).convert("RGB")
        batch = _TRANSFORM(image).unsqueeze(0)
        with torch.inference_mode():
            probabilities = model(batch).softmax(dim=1)[0]
        top = probabilities.topk(TOP_K)
        return {
            "predictions": [
                {"label": classes[i], "index": i, "probability": p}
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="folder with model.pt and classes.json")
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
    args = parser.parse_args()
    uvicorn.run(create_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
