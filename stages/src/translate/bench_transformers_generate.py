# The transformers side of `xlpipe bench translate`: the same length-sorted
# batches, source layout (`[language token] tokens </s>`) and settings.
# Usage: python bench_transformers_generate.py MODEL DATA.json
import json, sys, time
import torch, transformers
model_dir, data = sys.argv[1], json.load(open(sys.argv[2]))
torch.set_num_threads(data["threads"])
tok = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
def lang_id(code):
    for t in [code, {"es": "spa_Latn", "de": "deu_Latn", "zh": "zho_Hans", "en": "eng_Latn"}.get(code, code), f"__{code}__"]:
        i = tok.convert_tokens_to_ids(t)
        if i is not None and i != tok.unk_token_id:
            return i
    raise SystemExit(f"no language token for {code}")
src, tgt = lang_id("en"), lang_id(data["target"])
eos, pad = model.config.eos_token_id, model.config.pad_token_id
rows = [[src] + tok(t, add_special_tokens=False).input_ids + [eos] for t in data["texts"]]
order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
def run(indices):
    out = {}
    for start in range(0, len(indices), data["batch"]):
        chunk = indices[start:start + data["batch"]]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in chunk])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=(ids != pad).long(), forced_bos_token_id=tgt,
                                 num_beams=data["beams"], max_length=data["max_length"], do_sample=False)
        for i, text in zip(chunk, tok.batch_decode(gen, skip_special_tokens=True)):
            out[i] = text
    return out
run(order[:data["batch"]])
start = time.perf_counter()
out = run(order)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "outputs": [out[i] for i in range(len(rows))], "transformers": transformers.__version__}))
