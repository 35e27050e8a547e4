# The PyTorch side of `xlpipe bench encode`: SentenceTransformer.encode on
# the same model, texts, cap, batch size and threads, in fp32 and under
# torch.autocast("cpu", dtype=torch.bfloat16); mean-pooled, normalised.
# Usage: python bench_torch_encode.py MODEL DATA.json REPEAT THREADS bf16|fp32
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer

model_dir, data_file, repeat, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# bf16 autocast only where the CPU computes bf16 natively (xlpipe decides:
# elsewhere PyTorch emulates it, over 10x slower than its own fp32).
bf16 = sys.argv[5] == "bf16"
data = json.load(open(data_file))
torch.set_num_threads(threads)
model = SentenceTransformer(model_dir, device="cpu")
model.max_seq_length = data["max_len"]
texts = [data["prefix"] + t for t in data["texts"]]


def timed(bf16):
    times = []
    for r in range(repeat + 1):
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.encode(texts, batch_size=data["batch"], normalize_embeddings=True)
        if r > 0:
            times.append(time.perf_counter() - start)
    times.sort()
    return {"median_seconds": times[len(times) // 2]}


print(json.dumps({"fp32": timed(False), "bf16": timed(True) if bf16 else None, "torch": torch.__version__}))
