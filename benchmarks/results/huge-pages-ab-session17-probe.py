"""Per-call time and page faults of a saved ispc archive in a fresh process (peers' worker env)."""
import os, sys, time, resource, json
import numpy as np, torch
import ispc
arch, n = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
rng = np.random.default_rng(0)
b = int(os.environ.get("PROBE_BATCH", "32"))
xs = [torch.from_numpy(rng.standard_normal((b, 3, 224, 224), dtype=np.float32)).clone() for _ in range(4)]
t0 = time.perf_counter(); m = ispc.load(arch); load_s = time.perf_counter() - t0
ru = resource.getrusage
rows = []
with torch.no_grad():
    for i in range(n):
        r0 = ru(resource.RUSAGE_SELF); t = time.perf_counter()
        m(xs[i % 4])
        dt = (time.perf_counter() - t) * 1e3; r1 = ru(resource.RUSAGE_SELF)
        rows.append((round(dt, 1), r1.ru_minflt - r0.ru_minflt, r1.ru_majflt - r0.ru_majflt,
                     r1.ru_nivcsw - r0.ru_nivcsw))
def anon():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith(("AnonHugePages", "Rss")): yield line.split()[0] + line.split()[1]
print(json.dumps({"load_s": round(load_s, 2), "calls": rows, "mem": list(anon())}))
