"""The device name every benchmark puts in its results file names (benchmarks/results/<name>_<device>.json)."""
import os


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "_")
    return f"cpu_{os.cpu_count()}cores"
