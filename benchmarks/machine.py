"""What every per-package benchmark script shares: its common arguments, a one-paragraph
description of the machine and versions, and writing its Markdown result."""

from __future__ import annotations

import argparse
import os
import platform
from importlib import metadata
from pathlib import Path


def parser(doc: str | None, result: str, repeats: int, threads: int = 1) -> argparse.ArgumentParser:
    """``--repeats``, ``--threads`` and ``--out`` (default ``results/<result>``)."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument(
        "--threads",
        type=int,
        default=threads,
        help="torch CPU threads (1: least sensitive to other processes)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / result)
    return p


def write(text: str, out: Path) -> None:
    """Print the result and write it to ``out``."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def describe() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = []
    for dist in ("torch", "transformers", "archscope"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; " + ", ".join(versions)
    )
