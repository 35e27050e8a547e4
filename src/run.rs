//! Running a pipeline: schedule ready instances on worker threads, reuse
//! cached keys, and keep going on independent branches when one fails.
//!
//! The scheduler lives on the calling thread. An instance becomes ready when
//! all its producers are done; its key is computed then (it needs their
//! output hashes), and it is either found in the cache or handed to a worker
//! thread, as long as a job slot and its resources (e.g. a GPU) are free,
//! or submitted to Slurm when its stage's executor says so ([`crate::slurm`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use xlpipe_stages::{FetchSettings, InputArtifact, Stage, StageContext};

use crate::cache::{remove_path, Cache, InputRecord, InstanceRef, Record};
use crate::diag::did_you_mean;
use crate::executor::{self, ExecutorConfig};
use crate::pipeline::Pipeline;
use crate::plan::{instance_key, why_run};
use crate::slurm::SlurmExecutor;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Instances run at once.
    pub jobs: usize,
    /// GPUs instances may hold (`resources = { gpu = 1 }`); other resources
    /// have one unit each.
    pub gpus: u32,
    /// Run only these stages/instances (their inputs must be cached).
    pub only: Vec<String>,
    /// Run these and what they depend on, nothing downstream.
    pub until: Vec<String>,
    /// Run these even if cached.
    pub force: Vec<String>,
    /// Mirrors and offline mode for stages that fetch data.
    pub fetch: FetchSettings,
    /// Executor of the stages that name none (default `local`).
    pub executor: Option<String>,
    /// How often the states of Slurm jobs are asked for.
    pub slurm_poll: Duration,
}

/// Pipelines with more instances than this log "will run" per instance
/// only with `-v`.
const GRID_QUIET: usize = 100;

/// A failure as it happens: in full on small pipelines; on grids only in
/// the run's closing summary (and here with `-v`), so it is printed once.
fn log_failure(pipeline: &Pipeline, failure: &Failure) {
    if pipeline.instances.len() <= GRID_QUIET {
        tracing::error!("{} failed: {}", failure.instance, failure.error);
    } else {
        tracing::debug!("{} failed: {}", failure.instance, failure.error);
    }
}

#[derive(Debug)]
pub struct Failure {
    pub instance: String,
    pub error: String,
    pub log: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct RunSummary {
    pub executed: Vec<String>,
    pub cached: usize,
    pub failed: Vec<Failure>,
    /// Instances not run because something they need failed.
    pub skipped: Vec<String>,
    /// Instances sent to Slurm: submitted, and adopted from an earlier run.
    pub slurm_submitted: usize,
    pub slurm_adopted: usize,
}

/// Instances named by `selectors` (stage names or exact instance names).
pub fn select(pipeline: &Pipeline, selectors: &[String]) -> anyhow::Result<Vec<bool>> {
    let mut chosen = vec![false; pipeline.instances.len()];
    for selector in selectors {
        let mut matched = false;
        for (i, instance) in pipeline.instances.iter().enumerate() {
            if instance.name == *selector || pipeline.stage_of(i).name == *selector {
                chosen[i] = true;
                matched = true;
            }
        }
        if !matched {
            let names = pipeline.stages.iter().map(|s| s.name.as_str());
            let hint = did_you_mean(selector, names);
            anyhow::bail!("no stage or instance named `{selector}`{hint}");
        }
    }
    Ok(chosen)
}

/// Mark everything `chosen` depends on.
fn with_ancestors(pipeline: &Pipeline, chosen: &[bool]) -> Vec<bool> {
    let mut marked = chosen.to_vec();
    // Producers come before consumers, so one backward sweep suffices.
    for i in (0..pipeline.instances.len()).rev() {
        if marked[i] {
            for d in pipeline.instances[i].dependencies() {
                marked[d] = true;
            }
        }
    }
    marked
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Waiting,
    Running,
    Done,
    Failed,
}

struct Job {
    instance: usize,
    key: String,
    forced: bool,
    inputs: BTreeMap<String, Vec<InputRecord>>,
}

pub enum Outcome {
    Ran(Record),
    /// Another run computed the key while this one waited for its lock.
    FoundCached(Record),
}

pub type JobResult = (usize, Result<Outcome, Failure>);

/// Where a started instance runs, and what it holds there.
enum Slot {
    Local(BTreeMap<String, Vec<u32>>),
    Slurm,
}

pub fn run(
    pipeline: &Pipeline,
    cache: &Cache,
    options: &RunOptions,
    progress: &MultiProgress,
) -> anyhow::Result<RunSummary> {
    let _cache_lock = cache.lock_shared()?;
    // Commands run in process groups of their own: an interrupted run
    // ends them itself.
    crate::interrupt::on_interrupt(xlpipe_stages::end_live_commands);
    let n = pipeline.instances.len();
    let forced = select(pipeline, &options.force)?;
    let (relevant, may_run) = if !options.only.is_empty() {
        let only = select(pipeline, &options.only)?;
        (with_ancestors(pipeline, &only), only)
    } else if !options.until.is_empty() {
        let until = with_ancestors(pipeline, &select(pipeline, &options.until)?);
        (until.clone(), until)
    } else {
        (vec![true; n], vec![true; n])
    };

    let default_executor = options.executor.as_deref().unwrap_or(executor::DEFAULT);
    if !pipeline.executors.contains_key(default_executor) {
        let hint = did_you_mean(
            default_executor,
            pipeline.executors.keys().map(String::as_str),
        );
        anyhow::bail!("--executor: no executor named `{default_executor}`{hint}");
    }
    let executor_name: Vec<&str> = (0..n)
        .map(|i| {
            pipeline
                .stage_of(i)
                .executor
                .as_deref()
                .unwrap_or(default_executor)
        })
        .collect();
    let executor_of: Vec<&ExecutorConfig> = executor_name
        .iter()
        .map(|name| &pipeline.executors[*name])
        .collect();

    let mut capacity: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    capacity.insert("gpu".into(), (0..options.gpus).collect());
    for (i, instance) in pipeline.instances.iter().enumerate() {
        if *executor_of[i] != ExecutorConfig::Local {
            continue;
        }
        for (resource, &amount) in &instance.resources {
            let free = capacity.entry(resource.clone()).or_insert_with(|| vec![0]);
            if amount as usize > free.len() {
                anyhow::bail!(
                    "{} needs {amount} {resource}, but this run has {} (see --gpus)",
                    instance.name,
                    free.len()
                );
            }
        }
    }

    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut waiting_on = vec![0usize; n];
    for (i, instance) in pipeline.instances.iter().enumerate() {
        let deps: BTreeSet<usize> = instance.dependencies().collect();
        waiting_on[i] = deps.len();
        for d in deps {
            dependants[d].push(i);
        }
    }

    let total = relevant.iter().filter(|r| **r).count() as u64;
    let bar = progress.add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );

    let mut summary = RunSummary::default();
    let mut state = vec![State::Waiting; n];
    let mut outputs: Vec<Option<BTreeMap<String, String>>> = vec![None; n];
    let mut ready: VecDeque<usize> = (0..n)
        .filter(|&i| relevant[i] && waiting_on[i] == 0)
        .collect();
    let mut runnable: Vec<Job> = Vec::new();
    let mut running: BTreeMap<usize, Slot> = BTreeMap::new();
    let mut local_running = 0;
    let mut slurm_running: BTreeMap<&str, usize> = BTreeMap::new();
    let (sender, receiver) = mpsc::channel::<JobResult>();
    let jobs = options.jobs.max(1);
    let uses_slurm =
        (0..n).any(|i| relevant[i] && matches!(executor_of[i], ExecutorConfig::Slurm(_)));
    let mut slurm = if uses_slurm {
        Some(SlurmExecutor::start(
            cache,
            options.slurm_poll,
            sender.clone(),
        )?)
    } else {
        None
    };

    loop {
        while let Some(i) = ready.pop_front() {
            let (key, inputs) = instance_key(pipeline, i, &outputs)
                .expect("producers of a ready instance are done");
            if !forced[i] {
                if let Some(record) = cache.record(&key) {
                    summary.cached += 1;
                    bar.inc(1);
                    finish(pipeline, cache, i, record, &mut state, &mut outputs)?;
                    release(i, &dependants, &relevant, &mut waiting_on, &mut ready);
                    continue;
                }
            }
            if !may_run[i] {
                state[i] = State::Failed;
                summary.failed.push(Failure {
                    instance: pipeline.instances[i].name.clone(),
                    error: "not cached, and outside the --only selection; run it first".into(),
                    log: None,
                });
                continue;
            }
            let reasons = if forced[i] {
                vec!["forced".to_string()]
            } else {
                why_run(pipeline, cache, i, &key, &inputs)
            };
            // A line per instance helps on small pipelines and buries the
            // rest on grids: there it is a debug line (`-v`).
            if pipeline.instances.len() <= GRID_QUIET {
                tracing::info!(
                    "{} will run: {}",
                    pipeline.instances[i].name,
                    reasons.join("; ")
                );
            } else {
                tracing::debug!(
                    "{} will run: {}",
                    pipeline.instances[i].name,
                    reasons.join("; ")
                );
            }
            runnable.push(Job {
                instance: i,
                key,
                forced: forced[i],
                inputs,
            });
        }

        let mut pos = 0;
        while pos < runnable.len() {
            let i = runnable[pos].instance;
            let startable = match executor_of[i] {
                ExecutorConfig::Local => {
                    local_running < jobs && fits(&pipeline.instances[i].resources, &capacity)
                }
                ExecutorConfig::Slurm(slurm_options) => slurm_options.max_jobs.is_none_or(|max| {
                    slurm_running.get(executor_name[i]).copied().unwrap_or(0) < max
                }),
            };
            if !startable {
                pos += 1;
                continue;
            }
            let job = runnable.remove(pos);
            match executor_of[i] {
                ExecutorConfig::Local => {
                    let devices = take(&pipeline.instances[i].resources, &mut capacity);
                    state[i] = State::Running;
                    local_running += 1;
                    running.insert(i, Slot::Local(devices.clone()));
                    let task = Task {
                        spec: task_spec(pipeline, job, devices, &options.fetch),
                        stage: pipeline.stage_of(i).kind.clone(),
                        progress: progress.clone(),
                        cache: cache.clone(),
                    };
                    spawn_job(i, task, sender.clone())?;
                }
                ExecutorConfig::Slurm(slurm_options) => {
                    let gpus = pipeline.instances[i]
                        .resources
                        .get("gpu")
                        .copied()
                        .unwrap_or(0);
                    // Inside its allocation a job sees its GPUs as 0..N.
                    let devices = match gpus {
                        0 => BTreeMap::new(),
                        n => BTreeMap::from([("gpu".to_string(), (0..n).collect())]),
                    };
                    let spec = task_spec(pipeline, job, devices, &options.fetch);
                    let spec = spec.with_absolute_paths()?;
                    let executor = slurm
                        .as_mut()
                        .expect("started when any instance uses Slurm");
                    match executor.submit(i, &spec, slurm_options, gpus) {
                        Ok(adopted) => {
                            if adopted {
                                summary.slurm_adopted += 1;
                            } else {
                                summary.slurm_submitted += 1;
                            }
                            state[i] = State::Running;
                            *slurm_running.entry(executor_name[i]).or_default() += 1;
                            running.insert(i, Slot::Slurm);
                        }
                        Err(failure) => {
                            log_failure(pipeline, &failure);
                            state[i] = State::Failed;
                            bar.inc(1);
                            summary.failed.push(failure);
                        }
                    }
                }
            }
        }
        let local: Vec<&str> = running
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Local(_)))
            .map(|(&r, _)| pipeline.instances[r].name.as_str())
            .collect();
        let on_slurm = running.len() - local.len();
        bar.set_message(match on_slurm {
            0 => local.join(", "),
            n => format!("{n} on Slurm; {}", local.join(", ")),
        });

        if running.is_empty() {
            debug_assert!(runnable.is_empty() && ready.is_empty());
            break;
        }

        let (i, result) = receiver.recv().context("a worker thread vanished")?;
        match running.remove(&i).expect("finished job was running") {
            Slot::Local(devices) => {
                local_running -= 1;
                give_back(devices, &mut capacity);
            }
            Slot::Slurm => {
                *slurm_running
                    .get_mut(executor_name[i])
                    .expect("counted when submitted") -= 1;
            }
        }
        bar.inc(1);
        match result {
            Ok(Outcome::Ran(record)) => {
                summary.executed.push(pipeline.instances[i].name.clone());
                finish(pipeline, cache, i, record, &mut state, &mut outputs)?;
                release(i, &dependants, &relevant, &mut waiting_on, &mut ready);
            }
            Ok(Outcome::FoundCached(record)) => {
                summary.cached += 1;
                finish(pipeline, cache, i, record, &mut state, &mut outputs)?;
                release(i, &dependants, &relevant, &mut waiting_on, &mut ready);
            }
            Err(failure) => {
                log_failure(pipeline, &failure);
                state[i] = State::Failed;
                summary.failed.push(failure);
            }
        }
    }
    bar.finish_and_clear();
    progress.remove(&bar);

    summary.skipped = (0..n)
        .filter(|&i| relevant[i] && state[i] == State::Waiting)
        .map(|i| pipeline.instances[i].name.clone())
        .collect();
    if options.only.is_empty() && options.until.is_empty() && summary.failed.is_empty() {
        // The pipeline ran whole: forget instances it no longer has.
        let current: BTreeSet<&str> = pipeline.instances.iter().map(|i| i.name.as_str()).collect();
        cache.retain_refs(&pipeline.name, &|name| current.contains(name));
    }
    Ok(summary)
}

fn finish(
    pipeline: &Pipeline,
    cache: &Cache,
    i: usize,
    record: Record,
    state: &mut [State],
    outputs: &mut [Option<BTreeMap<String, String>>],
) -> anyhow::Result<()> {
    let name = &pipeline.instances[i].name;
    let unchanged = cache
        .instance_ref(&pipeline.name, name)
        .is_some_and(|r| r.key == record.key);
    if !unchanged {
        cache.write_ref(
            &pipeline.name,
            &InstanceRef {
                instance: name.clone(),
                key: record.key.clone(),
            },
        )?;
    }
    state[i] = State::Done;
    outputs[i] = Some(record.outputs);
    Ok(())
}

fn release(
    i: usize,
    dependants: &[Vec<usize>],
    relevant: &[bool],
    waiting_on: &mut [usize],
    ready: &mut VecDeque<usize>,
) {
    for &d in &dependants[i] {
        waiting_on[d] -= 1;
        if waiting_on[d] == 0 && relevant[d] {
            ready.push_back(d);
        }
    }
}

fn fits(needs: &BTreeMap<String, u32>, capacity: &BTreeMap<String, Vec<u32>>) -> bool {
    needs
        .iter()
        .all(|(r, &amount)| capacity.get(r).map_or(0, Vec::len) >= amount as usize)
}

fn take(
    needs: &BTreeMap<String, u32>,
    capacity: &mut BTreeMap<String, Vec<u32>>,
) -> BTreeMap<String, Vec<u32>> {
    needs
        .iter()
        .map(|(r, &amount)| {
            let free = capacity.get_mut(r).expect("checked by fits");
            (r.clone(), free.drain(..amount as usize).collect())
        })
        .collect()
}

fn give_back(devices: BTreeMap<String, Vec<u32>>, capacity: &mut BTreeMap<String, Vec<u32>>) {
    for (r, ids) in devices {
        let free = capacity.entry(r).or_default();
        free.extend(ids);
        free.sort_unstable();
    }
}

fn task_spec(
    pipeline: &Pipeline,
    job: Job,
    devices: BTreeMap<String, Vec<u32>>,
    fetch: &FetchSettings,
) -> TaskSpec {
    let i = job.instance;
    let instance = &pipeline.instances[i];
    let stage = pipeline.stage_of(i);
    TaskSpec {
        kind: stage.kind.kind().to_string(),
        version: stage.kind.version(),
        params: instance.params.clone(),
        instance: instance.name.clone(),
        key: job.key,
        forced: job.forced,
        inputs: job.inputs,
        producers_grid: instance
            .dependencies()
            .map(|d| {
                let p = &pipeline.instances[d];
                let grid = p
                    .grid
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or_default()))
                    .collect();
                (p.name.clone(), grid)
            })
            .collect(),
        outputs: instance.outputs.clone(),
        base_dir: stage.base_dir.clone(),
        devices,
        fetch: fetch.clone(),
    }
}

fn spawn_job(i: usize, task: Task, sender: mpsc::Sender<JobResult>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name(format!("stage {}", task.spec.instance))
        .spawn(move || {
            let result = task.execute();
            // The receiver only goes away if the scheduler itself failed.
            let _ = sender.send((i, result));
        })
        .context("starting a worker thread")?;
    Ok(())
}

/// Everything needed to compute one instance's key, owned and serialisable:
/// a local worker gets it directly, a Slurm job as `task.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskSpec {
    pub kind: String,
    /// The kind's version the key was computed with.
    pub version: u32,
    pub params: serde_json::Value,
    pub instance: String,
    pub key: String,
    pub forced: bool,
    pub inputs: BTreeMap<String, Vec<InputRecord>>,
    pub producers_grid: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    pub outputs: Vec<String>,
    pub base_dir: PathBuf,
    pub devices: BTreeMap<String, Vec<u32>>,
    pub fetch: FetchSettings,
}

impl TaskSpec {
    /// For a process started elsewhere (a Slurm job): relative paths would
    /// resolve against its own working folder.
    fn with_absolute_paths(mut self) -> anyhow::Result<TaskSpec> {
        self.base_dir = std::path::absolute(&self.base_dir)?;
        for mirror in &mut self.fetch.mirrors {
            *mirror = std::path::absolute(&*mirror)?;
        }
        Ok(self)
    }
}

/// Compute the instance a Slurm job's `task.json` describes (`xlpipe
/// exec-job`). Like a local worker it takes the key's lock, so a key is never
/// computed twice at once, and its record is the only thing that says it
/// succeeded.
pub fn execute_task_file(
    cache: &Cache,
    file: &std::path::Path,
    kinds: &[Arc<dyn Stage>],
    progress: &MultiProgress,
) -> anyhow::Result<()> {
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let spec: TaskSpec =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", file.display()))?;
    let stage = kinds
        .iter()
        .find(|k| k.kind() == spec.kind)
        .cloned()
        .with_context(|| format!("this xlpipe has no stage kind `{}`", spec.kind))?;
    if stage.version() != spec.version {
        anyhow::bail!(
            "this xlpipe has version {} of stage kind `{}`, the run expects {}: \
             the nodes must run the same xlpipe as the machine that submits",
            stage.version(),
            spec.kind,
            spec.version
        );
    }
    let _cache_lock = cache.lock_shared()?;
    crate::interrupt::on_interrupt(xlpipe_stages::end_live_commands);
    let task = Task {
        spec,
        stage,
        progress: progress.clone(),
        cache: cache.clone(),
    };
    match task.execute() {
        Ok(_) => Ok(()),
        Err(failure) => Err(anyhow::anyhow!("{}", failure.error)),
    }
}

struct Task {
    spec: TaskSpec,
    stage: Arc<dyn Stage>,
    progress: MultiProgress,
    cache: Cache,
}

impl Task {
    fn execute(self) -> Result<Outcome, Failure> {
        let log_path = self.cache.log_path(&self.spec.key);
        let fail = |error: anyhow::Error, log: Option<PathBuf>| Failure {
            instance: self.spec.instance.clone(),
            error: format!("{error:#}"),
            log,
        };
        let key_lock = self
            .cache
            .lock_key(&self.spec.key, &self.spec.instance)
            .map_err(|e| fail(e, None))?;
        if !self.spec.forced {
            if let Some(record) = self.cache.record(&self.spec.key) {
                return Ok(Outcome::FoundCached(record));
            }
        }
        let temp = self
            .cache
            .temp_dir(&self.spec.key)
            .map_err(|e| fail(e, None))?;
        use std::os::fd::AsRawFd;
        let result = self.execute_in(&temp, &log_path, key_lock.as_raw_fd());
        if let Err(err) = remove_path(&temp) {
            tracing::warn!("could not remove {}: {err}", temp.display());
        }
        result
            .map(Outcome::Ran)
            .map_err(|e| fail(e, Some(log_path)))
    }

    fn execute_in(
        &self,
        temp: &std::path::Path,
        log_path: &std::path::Path,
        key_lock_fd: i32,
    ) -> anyhow::Result<Record> {
        let mut inputs = BTreeMap::new();
        for (slot, records) in &self.spec.inputs {
            let mut artifacts = Vec::new();
            for r in records {
                artifacts.push(InputArtifact {
                    path: self.cache.verify(&r.hash)?,
                    hash: r.hash.clone(),
                    producer: r.producer.clone(),
                    grid: self
                        .spec
                        .producers_grid
                        .get(&r.producer)
                        .cloned()
                        .unwrap_or_default(),
                });
            }
            inputs.insert(slot.clone(), artifacts);
        }
        let output_dir = temp.join("out");
        let work_dir = temp.join("work");
        std::fs::create_dir_all(&output_dir)?;
        std::fs::create_dir_all(&work_dir)?;
        std::fs::create_dir_all(log_path.parent().expect("log path has a parent"))?;
        std::fs::write(
            log_path,
            format!("# {} (key {})\n", self.spec.instance, self.spec.key),
        )?;
        let context = StageContext {
            instance: self.spec.instance.clone(),
            key: self.spec.key.clone(),
            inputs,
            output_dir: output_dir.clone(),
            work_dir,
            base_dir: self.spec.base_dir.clone(),
            log_path: log_path.to_path_buf(),
            devices: self.spec.devices.clone(),
            fetch: self.spec.fetch.clone(),
            state_dir: self.cache.state_dir(self.stage.kind())?,
            progress: self.progress.clone(),
            key_lock_fd: Some(key_lock_fd),
        };
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let clock = Instant::now();
        let span =
            tracing::info_span!("stage", instance = %self.spec.instance, log = %log_path.display());
        let outcome = span.in_scope(|| {
            catch_unwind(AssertUnwindSafe(|| {
                self.stage.run(&self.spec.params, &context)
            }))
        });
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(err),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                anyhow::bail!("stage panicked: {message}");
            }
        }
        let seconds = clock.elapsed().as_secs_f64();
        let mut stored = BTreeMap::new();
        for name in &self.spec.outputs {
            let path = output_dir.join(name);
            if !path.exists() {
                anyhow::bail!("stage finished without writing its output `{name}`");
            }
            let hash = self
                .cache
                .store(&path)
                .with_context(|| format!("storing output `{name}` in the cache"))?;
            stored.insert(name.clone(), hash);
        }
        let record = Record {
            key: self.spec.key.clone(),
            instance: self.spec.instance.clone(),
            kind: self.stage.kind().to_string(),
            version: self.stage.version(),
            params: self.spec.params.clone(),
            inputs: self.spec.inputs.clone(),
            outputs: stored,
            started,
            seconds,
            xlpipe_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        self.cache.write_record(&record)?;
        span.in_scope(|| tracing::info!("finished in {seconds:.2}s"));
        Ok(record)
    }
}
