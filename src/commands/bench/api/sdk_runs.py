# `mvm bench api`'s Python side: `runs` round trips of `true` through the Python SDK on the
# sandbox (a running VM) named in argv, after warm-up rounds; their times in ms, as JSON.
import json
import sys
import time

from mvm import Sandbox

name, runs, warm_up = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sandbox = Sandbox.connect(name)
times = []
for round in range(warm_up + runs):
    started = time.perf_counter()
    sandbox.commands.run(["true"])
    if round >= warm_up:
        times.append((time.perf_counter() - started) * 1000.0)
print(json.dumps(times))
