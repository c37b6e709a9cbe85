"""``python -m flashhead.bench``: the same command as ``flashhead bench``; also the entry point of the
per-configuration memory subprocesses (``--memory-child MODEL CONFIG THREADS``)."""

import argparse
import json
import sys

from . import configure_parser, run
from .memory import memory_child

if len(sys.argv) == 5 and sys.argv[1] == "--memory-child":
    print(json.dumps(memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    sys.exit(0)
_p = argparse.ArgumentParser(prog="python -m flashhead.bench")
configure_parser(_p)
sys.exit(run(_p.parse_args()))
