# The PyTorch side of `xlpipe bench train`: sentence-transformers with
# MultipleNegativesRankingLoss on the same model, batch, lengths, threads,
# in fp32 and under torch.autocast("cpu", dtype=torch.bfloat16) (each from
# freshly loaded weights, the same seed).
# Usage: python bench_torch_train.py MODEL DATA.json STEPS THREADS bf16|fp32
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer, losses

model_dir, data_file, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# bf16 autocast only where the CPU computes bf16 natively (xlpipe decides:
# elsewhere PyTorch emulates it, over 10x slower than its own fp32).
bf16 = sys.argv[5] == "bf16"
data = json.load(open(data_file))
torch.set_num_threads(threads)


def timed(bf16):
    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    model.train()
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01)

    def features(texts, max_len):
        model.max_seq_length = max_len
        return model.tokenize(texts)

    q = features(data["queries"], data["query_len"])
    p = features(data["passages"], data["passage_len"])
    tokens = int(q["attention_mask"].sum() + p["attention_mask"].sum())
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn([dict(q), dict(p)], None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step > 0:
            times.append(time.perf_counter() - start)
    times.sort()
    return {"median_seconds": times[len(times) // 2], "tokens_per_step": tokens}


print(json.dumps({"fp32": timed(False), "bf16": timed(True) if bf16 else None, "torch": torch.__version__}))
