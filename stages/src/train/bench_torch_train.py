# The PyTorch side of `xlpipe bench train`: sentence-transformers with
# MultipleNegativesRankingLoss on the same model, batch, lengths, threads.
# Usage: python bench_torch_train.py MODEL DATA.json STEPS THREADS
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer, losses

model_dir, data_file, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = json.load(open(data_file))
torch.set_num_threads(threads)
torch.manual_seed(0)
model = SentenceTransformer(model_dir, device="cpu")
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
    loss = loss_fn([dict(q), dict(p)], None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    if step > 0:
        times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({"median_seconds": times[len(times) // 2], "tokens_per_step": tokens, "torch": torch.__version__}))
