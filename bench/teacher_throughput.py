"""Teacher throughput (records/s) through the OpenAI-compatible path, at concurrency 1 and 8.

    .venv/bin/python bench/teacher_throughput.py [--records 48]

Starts `maemi teacher-serve` on a free loopback port, then generates caption records for
real ELPV cells with OpenAITeacher (real HTTP, real openai client, base64 images), each run
against a fresh server so every record is measured anew. Also times the in-process
MeasurementTeacher for comparison. The server stops by its own PID at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path

from maemi_core.config import TeacherConfig
from maemi_core.data.sources import list_elpv
from maemi_core.teacher.measurement_teacher import MeasurementTeacher
from maemi_core.teacher.openai_teacher import OpenAITeacher
from maemi_core.teacher.prompt_pack import load_prompt_pack
from maemi_core.teacher.requests import ImageRef, TeacherRequest


def requests(n: int) -> list[TeacherRequest]:
    pack = load_prompt_pack("elpv")
    cells = list_elpv()[:n]
    return [TeacherRequest("caption", pack.caption.prompts[0],
                           [ImageRef(f"img{i}", str(c.path), c.label)], pack.caption.facts,
                           pack.system, pack.technique, pack.subject) for i, c in enumerate(cells)]


def run(teacher, reqs, concurrency: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(teacher.answer, reqs))
    assert all(a.text for a in answers)
    return len(reqs) / (time.perf_counter() - t0)


@contextlib.contextmanager
def teacher_server():
    """A fresh server (empty measurement memo), stopped by its own PID."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "maemi"), "teacher-serve", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        yield re.search(r"(http://127\.0\.0\.1:\d+/v1)", proc.stdout.readline()).group(1)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=48)
    args = ap.parse_args()
    print(f"{args.records} caption records of real ELPV cells per run")
    for concurrency in (1, 8):
        with teacher_server() as url:
            teacher = OpenAITeacher(TeacherConfig(kind="openai", base_url=url, model="m", concurrency=concurrency))
            rate = run(teacher, requests(args.records), concurrency)
        print(f"OpenAITeacher -> teacher-serve over HTTP, concurrency {concurrency}: {rate:7.1f} records/s")
    for concurrency in (1, 8):
        rate = run(MeasurementTeacher(), requests(args.records), concurrency)
        print(f"MeasurementTeacher in process, concurrency {concurrency}:          {rate:7.1f} records/s")


if __name__ == "__main__":
    main()
