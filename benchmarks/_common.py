"""Shared by the benchmark scripts: machine description, a table printer, JSON output, the shapes object mask."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from difflab.data.shapes import BACKGROUND_RGB

RESULTS = Path(__file__).resolve().parent / "results"
OBJECT_THRESHOLD = 0.25  # |image - background| in [-1, 1] units beyond which a shapes pixel is an object's


def object_mask(images: torch.Tensor, threshold: float = OBJECT_THRESHOLD) -> torch.Tensor:
    """(N, H, W) bool: the pixels of shapes renders more than ``threshold`` from the background colour
    in some channel."""
    background = torch.tensor(BACKGROUND_RGB * 2 - 1).reshape(1, 3, 1, 1)
    return (images - background).abs().amax(1) > threshold


def machine() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_results(script: str, payload: dict, name: str | None = None) -> Path:
    """``benchmarks/results/<name or the script's stem>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name or Path(script).stem}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
