//! [`report`]: the checks and timings of `xlpipe bench gpu` on CUDA device 0.

use std::fmt::Write as _;
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, Cuda, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use xlpipe_ml::model::{load_encoder, Encoder, PackedTokens, Pooling, TextTokenizer};

use super::{
    cosines, embed_texts, greedy_nmt, median, pair_batches, random_model, train_flops, train_steps,
    use_bf16, GpuBench, Layout,
};
use crate::bench::{answer_sentences, python_baseline, PythonBaseline};

type Gpu = Cuda<f32, i32>;

/// The two model shapes: name, hidden size, heads, intermediate size.
const SHAPES: [(&str, usize, usize, usize); 2] =
    [("e5-small", 384, 12, 1536), ("xlmr-base", 768, 12, 3072)];

/// Training caps (query, passage tokens), as the benchmark asks.
const LENGTHS: (usize, usize) = (32, 128);
/// Steps before the timed ones: kernels compile and matrix products
/// autotune on first use.
const WARMUP: usize = 3;
/// The parity training run: steps, batches, batch size, learning rate.
const CURVE: (usize, usize, usize, f64) = (12, 6, 32, 1e-4);

/// Device memory in use, sampled by `nvidia-smi` every 50 ms.
struct MemorySampler {
    samples: Arc<Mutex<Vec<(Instant, f64)>>>,
    child: Option<std::process::Child>,
}

impl MemorySampler {
    fn start() -> MemorySampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let child = std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "50",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()
            .map(|mut child| {
                let out = child.stdout.take().expect("piped");
                let samples = samples.clone();
                std::thread::spawn(move || {
                    for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                        if let Ok(mib) = line.trim().parse::<f64>() {
                            samples.lock().expect("sampler").push((Instant::now(), mib));
                        }
                    }
                });
                child
            });
        // Let the first samples arrive.
        std::thread::sleep(std::time::Duration::from_millis(300));
        MemorySampler { samples, child }
    }

    /// The latest sample (MiB), NaN without nvidia-smi.
    fn now(&self) -> f64 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        self.samples
            .lock()
            .expect("sampler")
            .last()
            .map_or(f64::NAN, |s| s.1)
    }

    /// The largest sample since `since` (MiB).
    fn peak_since(&self, since: Instant) -> f64 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        self.samples
            .lock()
            .expect("sampler")
            .iter()
            .filter(|s| s.0 >= since)
            .map(|s| s.1)
            .fold(f64::NAN, f64::max)
    }
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn gpu_name() -> String {
    std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown (no nvidia-smi)".into())
}

/// Run `f`, turning a panic (a kernel the backend cannot build) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            anyhow::bail!("{what} panicked: {message}")
        }
    }
}

/// Show on stderr what `out` gained since `shown`: a run cut off by a time
/// limit still leaves the sections it finished.
fn show_new(out: &str, shown: &mut usize) {
    eprint!("{}", &out[*shown..]);
    *shown = out.len();
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
        .unwrap_or_default()
}

pub fn report(b: &GpuBench) -> anyhow::Result<String> {
    let root = std::env::temp_dir().join(format!("xlpipe-gpu-models-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let result = measure(b, &root);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn measure(b: &GpuBench, root: &std::path::Path) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut shown = 0;
    let memory = MemorySampler::start();
    let idle = memory.now();
    let gpu = CudaDevice::new(0);
    let cpu = Default::default();
    if b.bf16 {
        use_bf16::<Gpu>(&gpu)?;
    }
    let precision = if b.bf16 { "bf16" } else { "f32" };
    guarded("the first CUDA operation", || {
        Ok(Tensor::<Gpu, 1>::zeros([1], &gpu).into_data())
    })?;
    let context = memory.now();
    writeln!(
        out,
        "GPU: {}; device memory used: {idle:.0} MiB idle, {context:.0} MiB with xlpipe's CUDA context; burn-cuda {} kernel fusion; computing in {precision}",
        gpu_name(),
        if cfg!(feature = "cuda-fusion") {
            "with"
        } else {
            "without"
        }
    )?;

    let models: Vec<(&str, std::path::PathBuf, (usize, usize))> = SHAPES
        .iter()
        .enumerate()
        .filter(|(_, (name, ..))| b.shapes.is_empty() || b.shapes.iter().any(|s| s == name))
        .map(|(i, &(name, hidden, heads, inner))| {
            let dir = root.join(name);
            random_model(b.model, &dir, (hidden, heads, inner), 0.1, 1 + i as u64)
                .map(|m| (name, m, (hidden, inner)))
        })
        .collect::<anyhow::Result<_>>()?;
    let (_, hidden, heads, inner) = SHAPES[0];
    let no_dropout = random_model(
        b.model,
        &root.join("no-dropout"),
        (hidden, heads, inner),
        0.0,
        9,
    )?;
    let tokenizer = TextTokenizer::for_model(&models[0].1)?;

    // The same texts and batches for every side.
    let parity_texts: Vec<String> = answer_sentences(64, 0)
        .into_iter()
        .map(|t| format!("passage: {t}"))
        .collect();
    let curve_batches = pair_batches(CURVE.1, CURVE.2, LENGTHS);
    let speed_batch = pair_batches(1, b.batch, LENGTHS);
    let mut encode_texts: Vec<String> = answer_sentences(b.texts, 64)
        .into_iter()
        .map(|t| format!("passage: {t}"))
        .collect();
    // Length-sorted, as the encode stage batches them (sentence-transformers
    // sorts too).
    let lengths = tokenizer.lengths(&encode_texts)?;
    let mut order: Vec<usize> = (0..encode_texts.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    encode_texts = order.iter().map(|&i| encode_texts[i].clone()).collect();
    let pairs_json = |batches: &[super::PairBatch]| -> serde_json::Value {
        batches
            .iter()
            .map(|p| serde_json::json!({"queries": p.queries, "passages": p.passages}))
            .collect()
    };

    // PyTorch first, in its own process: its memory is gone before ours.
    let torch = if b.speed_only {
        serde_json::Value::Null
    } else {
        match python_baseline(
            &PythonBaseline {
                python: b.python,
                name: "gpu",
                script: include_str!("bench_torch_gpu.py"),
                what: "PyTorch GPU",
                needs: "torch with CUDA and sentence-transformers",
            },
            root,
            &serde_json::json!({
                "models": models.iter().map(|(n, m, _)| (n.to_string(), m.display().to_string())).collect::<std::collections::BTreeMap<_, _>>(),
                "no_dropout": no_dropout.display().to_string(),
                "parity_texts": parity_texts,
                "curve": {"batches": pairs_json(&curve_batches), "steps": CURVE.0, "lr": CURVE.3},
                "train": {"batch": pairs_json(&speed_batch), "steps": b.steps, "warmup": WARMUP},
                "encode": {"texts": encode_texts, "batch": 256, "repeat": 3},
                "lengths": [LENGTHS.0, LENGTHS.1],
            }),
            &[],
        ) {
            Ok(torch) => torch,
            // The CUDA checks and timings still mean something without it.
            Err(e) => {
                writeln!(out, "PyTorch baseline failed, its columns are empty: {e:#}")?;
                serde_json::Value::Null
            }
        }
    };
    writeln!(
        out,
        "PyTorch {} on {}; bf16 matrix product 8192^3: {:.0} TFLOP/s (measured now)",
        torch["torch"].as_str().unwrap_or("?"),
        torch["gpu"].as_str().unwrap_or("?"),
        torch["bf16_matmul_tflops"].as_f64().unwrap_or(f64::NAN)
    )?;
    show_new(&out, &mut shown);
    let ceiling = torch["bf16_matmul_tflops"].as_f64().unwrap_or(f64::NAN) * 1e12;

    if !b.speed_only {
        writeln!(out, "\nparity (same weights, same inputs)")?;
        for (name, model, _) in &models {
            let on_cpu: Encoder<Flex> = load_encoder(model, Pooling::Mean, &cpu)?;
            let on_gpu: Encoder<Gpu> = load_encoder(model, Pooling::Mean, &gpu)?;
            let dim = on_cpu.embeddings.word.weight.dims()[1];
            let reference = embed_texts(&on_cpu, &tokenizer, &parity_texts, 128, 64, &cpu)?;
            let padded = embed_texts(&on_gpu, &tokenizer, &parity_texts, 128, 64, &gpu)?;
            let packed = on_gpu
                .embed_packed(&PackedTokens::from_rows(
                    &tokenizer.rows(&parity_texts, 128)?,
                ))
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let torch_fp32: Vec<f32> = torch["models"][name]["parity_fp32"]
                .as_array()
                .map(|rows| rows.iter().flat_map(floats).map(|x| x as f32).collect())
                .unwrap_or_default();
            let line = |what: &str, (min, mean): (f64, f64)| {
                format!("  {name:<10} {what:<44} cosine min {min:.6}, mean {mean:.6}\n")
            };
            out += &line(
                &format!("CUDA {precision} padded vs CPU f32"),
                cosines(&padded, &reference, dim),
            );
            out += &line(
                &format!("CUDA {precision} packed (train) vs CPU f32"),
                cosines(&packed, &reference, dim),
            );
            out += &line(
                &format!("CUDA {precision} vs PyTorch fp32 (GPU)"),
                cosines(&padded, &torch_fp32, dim),
            );
            show_new(&out, &mut shown);
        }

        let (steps, _, _, lr) = CURVE;
        let curve = |run: anyhow::Result<super::TrainRun>| run.map(|r| r.losses);
        let cpu_curve = curve(train_steps::<Autodiff<Flex>>(
            &no_dropout,
            &tokenizer,
            &curve_batches,
            LENGTHS,
            Layout::Packed,
            steps,
            lr,
            &cpu,
        ))?;
        let gpu_curve = curve(train_steps::<Autodiff<Gpu>>(
            &no_dropout,
            &tokenizer,
            &curve_batches,
            LENGTHS,
            Layout::Packed,
            steps,
            lr,
            &gpu,
        ))?;
        let torch_curve = floats(&torch["curve"]);
        let worst = |a: &[f64], b: &[f64]| {
            if a.len() != b.len() {
                return f64::NAN;
            }
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(
                    0.0,
                    |w: f64, d| if d.is_nan() { f64::NAN } else { w.max(d) },
                )
        };
        let show = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.4}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(
        out,
        "  training, e5-small shape without dropout, {steps} steps of batch {} ({}/{} tokens), lr {lr:e}, AdamW, clip 1.0:",
        CURVE.2, LENGTHS.0, LENGTHS.1
    )?;
        writeln!(out, "    CPU   {}", show(&cpu_curve))?;
        writeln!(out, "    CUDA  {}", show(&gpu_curve))?;
        writeln!(out, "    torch {}", show(&torch_curve))?;
        writeln!(
            out,
            "    largest loss difference: CUDA vs CPU {:.2e}, CUDA vs PyTorch {:.2e}",
            worst(&gpu_curve, &cpu_curve),
            worst(&gpu_curve, &torch_curve)
        )?;
        let (cpu_tokens, golden) = greedy_nmt::<Flex>(b.nmt, &cpu)?;
        let (gpu_tokens, _) = greedy_nmt::<Gpu>(b.nmt, &gpu)?;
        writeln!(
        out,
        "  M2M100 fixture, greedy: CUDA tokens {} the CPU's, {} transformers' golden output ({} sequences)",
        if gpu_tokens == cpu_tokens { "equal" } else { "DIFFER FROM" },
        if gpu_tokens == golden { "equal" } else { "DIFFER FROM" },
        golden.len()
    )?;
        show_new(&out, &mut shown);
    }
    writeln!(
        out,
        "\nspeed (median of {} steps or 3 passes after warm-up; memory: peak above the process's CUDA context, nvidia-smi for xlpipe, max_memory_reserved for PyTorch)",
        b.steps
    )?;
    for (name, model, (hidden, inner)) in &models {
        let flops = train_flops(12, *hidden, *inner, b.batch, LENGTHS.0)
            + train_flops(12, *hidden, *inner, b.batch, LENGTHS.1);
        let tokens = (b.batch * (LENGTHS.0 + LENGTHS.1)) as f64;
        writeln!(
            out,
            "  {name}: training step, batch {} x {}/{} tokens, {:.1} TFLOP a step",
            b.batch,
            LENGTHS.0,
            LENGTHS.1,
            flops * 1e-12
        )?;
        let row = |what: &str, seconds: f64, mib: f64| {
            format!(
                "    {what:<32} {:>8.1} ms/step {:>9.0} tokens/s {:>6.1}% of bf16 peak {:>7.0} MiB\n",
                seconds * 1e3,
                tokens / seconds,
                100.0 * flops / seconds / ceiling,
                mib
            )
        };
        let mut ours = Vec::new();
        for (what, layout) in [
            (
                format!("xlpipe {precision}, packed (as train)"),
                Layout::Packed,
            ),
            (
                format!("xlpipe {precision}, one padded batch"),
                Layout::Padded,
            ),
        ] {
            Gpu::memory_cleanup(&gpu);
            let since = Instant::now();
            let run = train_steps::<Autodiff<Gpu>>(
                model,
                &tokenizer,
                &speed_batch,
                LENGTHS,
                layout,
                WARMUP + b.steps,
                1e-5,
                &gpu,
            )?;
            let seconds = median(&run.step_seconds[WARMUP..]);
            out += &row(&what, seconds, memory.peak_since(since) - context);
            ours.push(seconds);
        }
        let mut theirs = Vec::new();
        for precision in ["fp32", "tf32", "bf16"] {
            let t = &torch["models"][name]["train"][precision];
            let seconds = t["median_seconds"].as_f64().unwrap_or(f64::NAN);
            let mib = t["max_reserved_mib"].as_f64().unwrap_or(f64::NAN);
            out += &row(&format!("PyTorch {precision}"), seconds, mib);
            theirs.push(seconds);
        }
        let best_ours = ours.iter().copied().fold(f64::INFINITY, f64::min);
        writeln!(
            out,
            "    speed ratio xlpipe {precision} / PyTorch fp32: {:.2}x, / TF32: {:.2}x, / bf16 autocast: {:.2}x",
            theirs[0] / best_ours,
            theirs[1] / best_ours,
            theirs[2] / best_ours
        )?;
        show_new(&out, &mut shown);

        writeln!(
            out,
            "  {name}: encoding {} texts, cap 128, batch 256",
            encode_texts.len()
        )?;
        let encode_row = |what: &str, seconds: f64, mib: f64| {
            format!(
                "    {what:<32} {:>8.3} s {:>9.0} texts/s {:>7.0} MiB\n",
                seconds,
                encode_texts.len() as f64 / seconds,
                mib
            )
        };
        let mut encode_ours = Vec::new();
        let pass = timed_encode::<Gpu>(model, &tokenizer, &encode_texts, &gpu, &memory)?;
        out += &encode_row(&format!("xlpipe {precision}"), pass.0, pass.1 - context);
        encode_ours.push(pass.0);
        let mut encode_theirs = Vec::new();
        for precision in ["fp32", "bf16"] {
            let t = &torch["models"][name]["encode"][precision];
            let seconds = t["median_seconds"].as_f64().unwrap_or(f64::NAN);
            out += &encode_row(
                &format!("ST.encode {precision}"),
                seconds,
                t["max_reserved_mib"].as_f64().unwrap_or(f64::NAN),
            );
            encode_theirs.push(seconds);
        }
        writeln!(
            out,
            "    speed ratio xlpipe {precision} / ST fp32: {:.2}x, / ST bf16 autocast: {:.2}x",
            encode_theirs[0] / encode_ours[0],
            encode_theirs[1] / encode_ours[0]
        )?;
        show_new(&out, &mut shown);
    }

    Ok(out)
}

/// Median seconds of 3 encoding passes over `texts` (after one warm-up),
/// and the peak device memory (MiB) meanwhile.
fn timed_encode<B: Backend>(
    model: &std::path::Path,
    tokenizer: &TextTokenizer,
    texts: &[String],
    device: &B::Device,
    memory: &MemorySampler,
) -> anyhow::Result<(f64, f64)> {
    B::memory_cleanup(device);
    let since = Instant::now();
    let encoder: Encoder<B> = load_encoder(model, Pooling::Mean, device)?;
    let mut times = Vec::new();
    for pass in 0..4 {
        let clock = Instant::now();
        embed_texts(&encoder, tokenizer, texts, 128, 256, device)?;
        if pass > 0 {
            times.push(clock.elapsed().as_secs_f64());
        }
    }
    Ok((median(&times), memory.peak_since(since)))
}
