"""Where each process's time goes, from a py-spy profile the harness recorded (`--profile-server`).

    python bench/profile_summary.py bench/results/x/profile-c256.txt

py-spy's raw format is one line per distinct stack, `frame;frame;...;frame count`, with the process and
the thread as the first frames (`--subprocesses --threads --idle`). Every thread is sampled, idle or
not; a sample whose innermost frame is a known wait (a selector's poll, a lock or queue wait, a sleep)
counts as waiting, the rest as busy. For each thread: its busy share and the functions its busy
samples ended in (self time), largest first.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# Innermost frames that mean the thread waits (for events, a lock, a queue, a timer).
WAITING = frozenset(
    {
        "select",
        "poll",
        "wait",
        "_wait_for_tstate_lock",
        "get",
        "sleep",
        "accept",
        "acquire",
        "join",
        "_worker",
    }
)
FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def short(frame: str) -> str:
    match = FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['name']} ({Path(match['file']).name})"


def summarize(text: str, top: int) -> str:
    threads: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        process = frames[0]
        thread = frames[1] if len(frames) > 1 and frames[1].startswith("thread") else ""
        threads[process, thread][short(frames[-1])] += int(count)
    waiting = {
        leaf
        for leaves in threads.values()
        for leaf in leaves
        if leaf.split(" (")[0].rsplit(".", 1)[-1] in WAITING
    }
    lines = []
    for (process, thread), leaves in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(leaves.values())
        busy = {leaf: count for leaf, count in leaves.items() if leaf not in waiting}
        busy_total = sum(busy.values())
        if busy_total < total * 0.01:
            continue
        lines.append(f"{process[:90]} {thread}: busy {busy_total / total:.0%} of {total} samples")
        for leaf, count in collections.Counter(busy).most_common(top):
            lines.append(f"    {count / busy_total:6.1%}  {leaf}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    print(summarize(args.profile.read_text(), args.top))


if __name__ == "__main__":
    main()
