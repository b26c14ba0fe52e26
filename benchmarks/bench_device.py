"""The device name every benchmark puts in its results file names (benchmarks/results/<name>_<device>.json), and
how a results file pair is written."""
import json
import os
from pathlib import Path


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "_")
    return f"cpu_{os.cpu_count()}cores"


def write_results(stem: Path, report: dict, table_text: str) -> None:
    """`stem`.json (the report) and `stem`.md (its table), and the table on stdout."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(table_text)
    print(table_text)
