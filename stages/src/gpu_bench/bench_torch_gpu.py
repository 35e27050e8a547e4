# The PyTorch side of `xlpipe bench gpu`, on the same GPU, weights, texts
# and batches: embeddings for the parity check, the loss curve of a short
# training run without dropout, and the timings of a training step
# (sentence-transformers with MultipleNegativesRankingLoss, AdamW,
# clipping) in fp32, TF32 and bf16 autocast and of SentenceTransformer.encode
# in fp32 and bf16 autocast, each with its peak reserved memory.
# Usage: python bench_torch_gpu.py ROOT DATA.json
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer, losses

data = json.load(open(sys.argv[2]))
query_len, passage_len = data["lengths"]
dev = "cuda"


def reserved_mib():
    return torch.cuda.max_memory_reserved() / 2**20


def fresh():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def model_of(path, train):
    torch.manual_seed(0)
    model = SentenceTransformer(path, device=dev)
    model.train(train)
    return model


def features(model, texts, max_len):
    model.max_seq_length = max_len
    return {k: v.to(dev) if hasattr(v, "to") else v for k, v in model.tokenize(texts).items()}


def train(path, batches, steps, lr, bf16=False):
    """Losses and step times of `steps` steps over `batches` (cycled)."""
    model = model_of(path, True)
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    prepared = [
        (features(model, b["queries"], query_len), features(model, b["passages"], passage_len))
        for b in batches
    ]
    out, times = [], []
    for step in range(steps):
        q, p = prepared[step % len(prepared)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn([dict(q), dict(p)], None)
        out.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, times


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def bf16_matmul_tflops():
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12


result = {
    "torch": torch.__version__,
    "gpu": torch.cuda.get_device_name(0),
    "bf16_matmul_tflops": bf16_matmul_tflops(),
    "models": {},
}
set_tf32(False)
curve = data["curve"]
result["curve"], _ = train(data["no_dropout"], curve["batches"], curve["steps"], curve["lr"])

spec = data["train"]
encode = data["encode"]
for name, path in data["models"].items():
    entry = {}
    model = model_of(path, False)
    model.max_seq_length = 128
    with torch.inference_mode():
        entry["parity_fp32"] = model.encode(
            data["parity_texts"], batch_size=64, normalize_embeddings=True, convert_to_numpy=True
        ).tolist()
    entry["train"] = {}
    for precision in ["fp32", "tf32", "bf16"]:
        set_tf32(precision == "tf32")
        fresh()
        _, times = train(path, spec["batch"], spec["warmup"] + spec["steps"], 1e-5, precision == "bf16")
        entry["train"][precision] = {
            "median_seconds": median(times[spec["warmup"]:]),
            "max_reserved_mib": reserved_mib(),
        }
    set_tf32(False)
    entry["encode"] = {}
    for precision in ["fp32", "bf16"]:
        fresh()
        times = []
        for r in range(encode["repeat"] + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                model.encode(encode["texts"], batch_size=encode["batch"], normalize_embeddings=True)
            torch.cuda.synchronize()
            if r > 0:
                times.append(time.perf_counter() - start)
        entry["encode"][precision] = {"median_seconds": median(times), "max_reserved_mib": reserved_mib()}
    del model
    result["models"][name] = entry

print(json.dumps(result))
