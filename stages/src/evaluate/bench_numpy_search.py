# The numpy side of `xlpipe bench search`: a plain matmul and a full
# argsort of every query's scores, on the same vectors.
# Usage: python bench_numpy_search.py QUERIES.f32 CANDIDATES.f32 N_QUERIES N_CANDIDATES
import json, sys, time
import numpy as np
q = np.fromfile(sys.argv[1], dtype=np.float32).reshape(int(sys.argv[3]), -1)
c = np.fromfile(sys.argv[2], dtype=np.float32).reshape(int(sys.argv[4]), -1)
start = time.perf_counter()
scores = q @ c.T
matmul = time.perf_counter() - start
ranking = np.argsort(-scores, axis=1)
total = time.perf_counter() - start
print(json.dumps({"matmul_seconds": matmul, "total_seconds": total, "numpy": np.__version__}))
