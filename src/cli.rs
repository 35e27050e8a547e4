//! The `xlpipe` command line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::MultiProgress;
use xlpipe_stage_api::FetchSettings;

use crate::cache::Cache;
use crate::diag::Diagnostics;
use crate::pipeline::Pipeline;
use crate::plan::{plan, Status};
use crate::registry::{kinds, open_pipeline};
use crate::run::{run, select, RunOptions};
use crate::{bench, dag, maintenance};
use xlpipe_stages::gpu_bench::GpuBench;
use xlpipe_stages::translate::bench::TranslateBench;

#[derive(Parser)]
#[command(
    name = "xlpipe",
    version,
    about = "Declarative, cached pipelines for multilingual retrieval research"
)]
struct Cli {
    /// Artifact store.
    #[arg(long, global = true, env = "XLPIPE_CACHE", default_value = "cache")]
    cache: PathBuf,
    /// Folder laid out as HOST/PATH with copies of downloads, tried before
    /// the network. Repeatable; XLPIPE_MIRROR takes a `:`-separated list.
    #[arg(long, global = true, env = "XLPIPE_MIRROR", value_delimiter = ':')]
    mirror: Vec<PathBuf>,
    /// Never use the network (downloads come from mirrors only).
    #[arg(long, global = true, env = "XLPIPE_OFFLINE")]
    offline: bool,
    /// More log output (RUST_LOG overrides).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline; only instances whose key is not cached execute.
    Run {
        file: PathBuf,
        /// Instances run at once.
        #[arg(short, long, default_value_t = default_jobs())]
        jobs: usize,
        /// GPUs available to stages that declare `resources = { gpu = N }`.
        #[arg(long, default_value_t = default_gpus())]
        gpus: u32,
        /// Run only this stage or instance (its inputs must be cached). Repeatable.
        #[arg(long)]
        only: Vec<String>,
        /// Run this stage or instance and what it depends on, nothing after. Repeatable.
        #[arg(long, conflicts_with = "only")]
        until: Vec<String>,
        /// Run this stage or instance even if cached. Repeatable.
        #[arg(long)]
        force: Vec<String>,
        /// Where stages that name no `executor` run: `local`, `slurm`, or
        /// an [executors.NAME] of the pipeline.
        #[arg(long, env = "XLPIPE_EXECUTOR")]
        executor: Option<String>,
        /// Seconds between two questions to Slurm about the run's jobs
        /// (one `squeue` for all of them).
        #[arg(long, env = "XLPIPE_SLURM_POLL", default_value_t = 10.0)]
        slurm_poll: f64,
    },
    /// Compute one instance described by a task file (what a Slurm job runs).
    #[command(hide = true)]
    ExecJob { task: PathBuf },
    /// Show what a run would do, instance by instance, and why.
    Plan {
        file: PathBuf,
        /// Plan as if this stage or instance were forced. Repeatable.
        #[arg(long)]
        force: Vec<String>,
    },
    /// Print the stage graph.
    Dag {
        file: PathBuf,
        /// Graphviz output (`xlpipe dag FILE --dot | dot -Tsvg > dag.svg`).
        #[arg(long)]
        dot: bool,
        /// One node per grid instance instead of per stage.
        #[arg(long)]
        instances: bool,
    },
    /// Print a stage instance's artifact paths, params and timings.
    Show {
        /// A stage name (all its instances) or an instance name like `train[alpha=0.5]`.
        stage: String,
        /// Pipeline name, if several pipelines in the cache have this stage.
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// List the pipelines in the cache and its size.
    Status,
    /// Delete cached results that no pipeline's last run uses.
    Gc {
        /// Keep only these pipelines' results (forget the others). Repeatable.
        #[arg(long)]
        keep: Vec<String>,
        /// Say what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-hash every cached object; move damaged ones out of the store so
    /// the next run rebuilds them (exit code 1 if any was damaged).
    Verify,
    /// List the stage kinds this build knows.
    Kinds,
    /// Print the main table of a pipeline's reports: give the pipeline
    /// file (or its name), or a `report` output folder.
    Report { target: PathBuf },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// No-op rerun and plan time of a large grid of trivial stages.
    Engine {
        /// Instances in the generated grid.
        #[arg(long, default_value_t = 1000)]
        instances: usize,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
    /// Exact search over a pool shaped like XQuAD-R's multilingual one,
    /// next to numpy matmul + argsort in the same run.
    Search {
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Python with numpy for the baseline.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Training step time and tokens/s on this CPU, next to PyTorch
    /// (sentence-transformers MultipleNegativesRankingLoss) in the same run.
    Train {
        /// A Hugging Face model folder (e.g. multilingual-e5-small).
        model: PathBuf,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Top layers trained in the partial fine-tuning comparison.
        #[arg(long, default_value_t = 2)]
        train_layers: usize,
        /// Python with torch and sentence-transformers for the baseline.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Full-model encoding throughput on this CPU, next to
    /// sentence-transformers' encode (fp32 and bf16 autocast) in the same run.
    Encode {
        /// A Hugging Face model folder (e.g. multilingual-e5-small).
        model: PathBuf,
        /// Answer sentences encoded per pass.
        #[arg(long, default_value_t = 1000)]
        texts: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Timed passes (after one warm-up pass).
        #[arg(long, default_value_t = 2)]
        repeat: usize,
        /// Python with torch and sentence-transformers for the baseline.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Decoding throughput of the burn M2M100 / NLLB model on this CPU,
    /// next to transformers' generate on the same model in the same run.
    Translate {
        /// An M2M100 / NLLB folder (e.g. tests/fixtures/tiny-m2m100).
        model: PathBuf,
        /// Target language (ISO code or the model's own language token).
        #[arg(long, default_value = "es")]
        target: String,
        #[arg(long, default_value_t = 64)]
        sentences: usize,
        #[arg(long, default_value_t = 4)]
        beams: usize,
        #[arg(long, default_value_t = 64)]
        max_length: usize,
        /// Sentences decoded together.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Python with torch and transformers for the baseline.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// The CUDA path (a build with `--features cuda`) checked against the
    /// CPU backend and timed next to PyTorch on the same GPU in the same run.
    Gpu {
        /// A Hugging Face encoder folder whose config and tokenizer give the
        /// random models their vocabulary (e.g. multilingual-e5-small).
        model: PathBuf,
        /// An M2M100 / NLLB folder with golden outputs.
        #[arg(long, default_value = "tests/fixtures/tiny-m2m100")]
        nmt: PathBuf,
        /// Training batch size (pairs).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Timed training steps (after warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Texts per timed encoding pass.
        #[arg(long, default_value_t = 8192)]
        texts: usize,
        /// Python with torch (CUDA) and sentence-transformers for the baseline.
        #[arg(long, default_value = "python3")]
        python: String,
        /// Only these model shapes (e5-small, xlmr-base); default both.
        #[arg(long = "shape")]
        shapes: Vec<String>,
        /// Compute in bf16 on the GPU (parity then gives the bf16 figure).
        #[arg(long)]
        bf16: bool,
        /// Only xlpipe's timings: no parity checks, no PyTorch (to profile:
        /// CUBECL_DEBUG_OPTION=profile CUBECL_DEBUG_LOG=FILE).
        #[arg(long)]
        speed_only: bool,
    },
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One per device listed in CUDA_VISIBLE_DEVICES, else one.
fn default_gpus() -> u32 {
    std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .map(|v| v.split(',').filter(|s| !s.trim().is_empty()).count() as u32)
        .unwrap_or(1)
}

/// The end of a run's output: each failure once (its error and log), and
/// the instances skipped because an input failed counted per stage (all
/// named with `-v`), so a failing grid prints lines per stage, not per
/// instance.
fn failure_report(summary: &crate::run::RunSummary, verbose: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let stage_of = |name: &str| name.split('[').next().unwrap_or(name).to_string();
    let mut failed_by_stage: BTreeMap<String, Vec<&crate::task::Failure>> = BTreeMap::new();
    for failure in &summary.failed {
        failed_by_stage
            .entry(stage_of(&failure.instance))
            .or_default()
            .push(failure);
    }
    const SHOWN: usize = 3;
    for (stage, failures) in &failed_by_stage {
        let shown = if verbose { failures.len() } else { SHOWN };
        for failure in failures.iter().take(shown) {
            let _ = writeln!(out, "error: {} failed: {}", failure.instance, failure.error);
            if let Some(log) = &failure.log {
                let _ = writeln!(out, "  log: {}", log.display());
            }
        }
        if failures.len() > shown {
            let _ = writeln!(
                out,
                "error: {} more instances of {stage} failed (-v lists them all)",
                failures.len() - shown
            );
        }
    }
    let mut skipped_by_stage: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for name in &summary.skipped {
        skipped_by_stage
            .entry(stage_of(name))
            .or_default()
            .push(name);
    }
    for (stage, names) in &skipped_by_stage {
        if verbose || names.len() == 1 {
            let _ = writeln!(out, "not run because an input failed: {}", names.join(", "));
        } else {
            let _ = writeln!(
                out,
                "not run because an input failed: {} instances of {stage} (-v lists them)",
                names.len()
            );
        }
    }
    out
}

/// Exit status: 0 success, 1 a stage or the tool failed, 2 invalid pipeline.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = MultiProgress::new();
    crate::logging::init(&progress, cli.verbose);
    match dispatch(cli, &progress) {
        Ok(code) => code,
        Err(err) => {
            if let Some(diagnostics) = err.downcast_ref::<Diagnostics>() {
                eprintln!("{diagnostics}");
                return ExitCode::from(2);
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli, progress: &MultiProgress) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            file,
            jobs,
            gpus,
            only,
            until,
            force,
            executor,
            slurm_poll,
        } => {
            let pipeline = open_pipeline(&file)?;
            let cache = Cache::open(&cli.cache)?;
            if !(slurm_poll.is_finite() && slurm_poll > 0.0) {
                anyhow::bail!("--slurm-poll must be a positive number of seconds");
            }
            let options = RunOptions {
                jobs,
                gpus,
                only,
                until,
                force,
                fetch: FetchSettings {
                    mirrors: cli.mirror,
                    offline: cli.offline,
                },
                executor,
                slurm_poll: std::time::Duration::from_secs_f64(slurm_poll),
            };
            let clock = std::time::Instant::now();
            let summary = run(&pipeline, &cache, &options, progress)?;
            let on_slurm = match (summary.slurm_submitted, summary.slurm_adopted) {
                (0, 0) => String::new(),
                (submitted, 0) => format!(" ({submitted} as Slurm jobs)"),
                (submitted, adopted) => {
                    format!(" ({submitted} as Slurm jobs, {adopted} adopted from an earlier run)")
                }
            };
            let stopped = match summary.stopped.len() {
                0 => String::new(),
                n => format!(", stopped by the search {n}"),
            };
            println!(
                "{}: ran {}{on_slurm}, cached {}, failed {}, skipped {}{stopped} ({:.2}s)",
                pipeline.name,
                summary.executed.len(),
                summary.cached,
                summary.failed.len(),
                summary.skipped.len(),
                clock.elapsed().as_secs_f64()
            );
            eprint!("{}", failure_report(&summary, cli.verbose));
            if crate::interrupt::interrupted() {
                eprintln!("interrupted: the running commands were ended");
                return Ok(ExitCode::from(130));
            }
            Ok(if summary.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::ExecJob { task } => {
            let cache = Cache::open(&cli.cache)?;
            crate::task::execute_task_file(&cache, &task, &kinds(), progress)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { file, force } => {
            let pipeline = open_pipeline(&file)?;
            let cache = Cache::open(&cli.cache)?;
            let forced = select(&pipeline, &force)?;
            print!(
                "{}",
                render_plan(&pipeline, &plan(&pipeline, &cache, &forced))
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dag {
            file,
            dot,
            instances,
        } => {
            let pipeline = open_pipeline(&file)?;
            print!("{}", dag::render(&pipeline, dot, instances));
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { stage, pipeline } => {
            let cache = Cache::open(&cli.cache)?;
            print!(
                "{}",
                maintenance::show(&cache, &stage, pipeline.as_deref())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let cache = Cache::open(&cli.cache)?;
            print!("{}", maintenance::status(&cache));
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify => {
            let cache = Cache::open(&cli.cache)?;
            let (text, clean) = maintenance::verify(&cache)?;
            print!("{text}");
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Gc { keep, dry_run } => {
            let cache = Cache::open(&cli.cache)?;
            print!("{}", maintenance::gc(&cache, &keep, dry_run)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { target } => {
            let cache = Cache::open(&cli.cache)?;
            let pipeline = if target.is_file() {
                Some(open_pipeline(&target)?)
            } else {
                None
            };
            let folders = match &pipeline {
                _ if target.is_dir() => vec![(target.display().to_string(), target.clone())],
                // A search's own account (below) may be all there is.
                Some(pipeline)
                    if pipeline
                        .stages
                        .iter()
                        .any(|s| s.name == crate::search::STAGE) =>
                {
                    maintenance::report_folders(&cache, &pipeline.name).unwrap_or_default()
                }
                Some(pipeline) => maintenance::report_folders(&cache, &pipeline.name)?,
                None => maintenance::report_folders(&cache, &target.display().to_string())?,
            };
            let report = kinds()
                .into_iter()
                .find(|kind| kind.kind() == "report")
                .expect("the registry has the report kind");
            for (instance, folder) in folders {
                println!("{instance}  ({})", folder.display());
                print!("{}", report.render_output(&folder)?.unwrap_or_default());
            }
            // A search's rungs, winner and cost, from the cache.
            if let Some(pipeline) = &pipeline {
                if let Some(search) = crate::search::report(pipeline, &cache)? {
                    print!("{search}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Kinds => {
            for kind in kinds() {
                println!(
                    "{:<16} v{:<3} {}",
                    kind.kind(),
                    kind.version(),
                    kind.summary()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            which: BenchCommand::Engine { instances, repeat },
        } => {
            print!("{}", bench::engine(instances, repeat)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            which: BenchCommand::Search { repeat, python },
        } => {
            print!(
                "{}",
                xlpipe_stages::evaluate::bench::report(repeat, &python)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            which:
                BenchCommand::Train {
                    model,
                    batch,
                    steps,
                    train_layers,
                    python,
                },
        } => {
            print!(
                "{}",
                xlpipe_stages::train::bench::report(&model, batch, steps, train_layers, &python)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            which:
                BenchCommand::Encode {
                    model,
                    texts,
                    batch,
                    repeat,
                    python,
                },
        } => {
            print!(
                "{}",
                xlpipe_stages::encode::bench::report(&model, texts, batch, repeat, &python)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            which:
                BenchCommand::Translate {
                    model,
                    target,
                    sentences,
                    beams,
                    max_length,
                    batch,
                    python,
                },
        } => {
            print!(
                "{}",
                xlpipe_stages::translate::bench::report(&TranslateBench {
                    model: &model,
                    target: &target,
                    sentences,
                    beams,
                    max_length,
                    batch,
                    python: &python,
                })?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            which:
                BenchCommand::Gpu {
                    model,
                    nmt,
                    batch,
                    steps,
                    texts,
                    python,
                    shapes,
                    bf16,
                    speed_only,
                },
        } => {
            print!(
                "{}",
                xlpipe_stages::gpu_bench::report(&GpuBench {
                    model: &model,
                    nmt: &nmt,
                    python: &python,
                    steps,
                    batch,
                    texts,
                    shapes,
                    bf16,
                    speed_only,
                })?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn render_plan(pipeline: &Pipeline, statuses: &[Status]) -> String {
    let count = |f: fn(&Status) -> bool| statuses.iter().filter(|s| f(s)).count();
    let stopped = match count(|s| matches!(s, Status::Stopped { .. })) {
        0 => String::new(),
        n => format!(", {n} stopped by the search"),
    };
    let mut out = format!(
        "{}: {} instances: {} cached, {} to run, {} pending{stopped}\n",
        pipeline.name,
        statuses.len(),
        count(|s| matches!(s, Status::Cached { .. })),
        count(|s| matches!(s, Status::Run { .. })),
        count(|s| matches!(s, Status::Pending { .. })),
    );
    let width = pipeline
        .instances
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(0);
    for (instance, status) in pipeline.instances.iter().zip(statuses) {
        let (label, detail) = match status {
            Status::Cached { key, note } => (
                "cached ",
                match note {
                    Some(note) => format!("key {}; {note}", &key[..12]),
                    None => format!("key {}", &key[..12]),
                },
            ),
            Status::Run { reasons, .. } => ("to-run ", reasons.join("; ")),
            Status::Pending { after } => ("pending", format!("after {after} runs")),
            Status::Stopped { reason } => ("stopped", reason.clone()),
        };
        out.push_str(&format!("  {label}  {:<width$}  {detail}\n", instance.name));
    }
    out
}
