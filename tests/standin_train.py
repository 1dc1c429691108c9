"""A stand-in train script for the launcher tests: it records what it was given.

Behaviour is steered by environment variables so one script covers every case:
  STANDIN_RECORD      append one JSON line {argv, config, config_path, pid, ...} to this file
  STANDIN_EXIT_CODE   exit with this status (default 0)
  STANDIN_EXIT_CODE_KEY  exit with the status stored under this key of the config (for sweeps)
  STANDIN_RUN_FOLDER  print "run folder: <value>" (the line our trainers print)
  STANDIN_WAIT_FILE   write this file once started, then wait (up to 30 s) for a signal;
                      on SIGINT/SIGTERM record which one arrived and exit 130/143
  STANDIN_SLEEP       sleep this many seconds before exiting (to make runs overlap)
"""

import json
import os
import signal
import sys
import time


def record(entry: dict) -> None:
    target = os.environ.get("STANDIN_RECORD")
    if not target:
        return
    line = json.dumps(entry, ensure_ascii=False) + "\n"
    # One write of one line with O_APPEND, so concurrent stand-ins do not interleave records.
    descriptor = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line.encode("utf-8"))
    finally:
        os.close(descriptor)


def main() -> int:
    config_path = sys.argv[1]
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    entry = {"argv": sys.argv[1:], "config_path": config_path, "config": config,
             "pid": os.getpid(), "python": sys.executable, "started": time.time(),
             "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN}
    folder = os.environ.get("STANDIN_RUN_FOLDER")
    if folder:
        print(f"run folder: {folder}", flush=True)
    wait_file = os.environ.get("STANDIN_WAIT_FILE")
    if wait_file:
        received = []

        def note(signum, frame):
            received.append(signum)

        signal.signal(signal.SIGINT, note)
        signal.signal(signal.SIGTERM, note)
        with open(wait_file, "w") as handle:
            handle.write(str(os.getpid()))
        deadline = time.time() + 30
        while not received and time.time() < deadline:
            time.sleep(0.02)
        entry["signal"] = signal.Signals(received[0]).name if received else None
        entry["config_exists_at_exit"] = os.path.exists(config_path)
        record(entry)
        return 128 + received[0] if received else 0
    time.sleep(float(os.environ.get("STANDIN_SLEEP", "0")))
    entry["ended"] = time.time()
    record(entry)
    exit_code_key = os.environ.get("STANDIN_EXIT_CODE_KEY")
    if exit_code_key:
        return int(config[exit_code_key])
    return int(os.environ.get("STANDIN_EXIT_CODE", "0"))


if __name__ == "__main__":
    sys.exit(main())
