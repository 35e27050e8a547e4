//! Running a pipeline: schedule ready instances on worker threads, reuse
//! cached keys, and keep going on independent branches when one fails.
//!
//! The scheduler lives on the calling thread. An instance becomes ready when
//! all its producers are done; its key is computed then (it needs their
//! output hashes), and it is either found in the cache or handed to a worker
//! thread, as long as a job slot and its resources (e.g. a GPU) are free,
//! or submitted to Slurm when its stage's executor says so ([`crate::slurm`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use xlpipe_stage_api::FetchSettings;

use crate::cache::{Cache, InputRecord, InstanceRef, Record};
use crate::diag::did_you_mean;
use crate::executor::{self, ExecutorConfig, SlurmOptions};
use crate::pipeline::Pipeline;
use crate::plan::{plan, prefix_spec, settle, why_run, Settled, Status};
use crate::slurm::SlurmExecutor;
use crate::task::{Failure, JobResult, Outcome, PrefixSpec, Task, TaskSpec};

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

/// Pipelines with more instances than this report a failure as it happens
/// only with `-v` (they all come in the closing summary).
const GRID_QUIET: usize = 100;

/// The tracing target of the per-instance "will run" lines, which the
/// console shows only with `-v` (the run's opening lines count per stage).
pub const WILL_RUN: &str = "xlpipe::will_run";

/// A failure as it happens: in full on small pipelines; on grids only in
/// the run's closing summary (and here with `-v`), so it is printed once.
fn log_failure(pipeline: &Pipeline, failure: &Failure) {
    if pipeline.instances.len() <= GRID_QUIET {
        tracing::error!("{} failed: {}", failure.instance, failure.error);
    } else {
        tracing::debug!("{} failed: {}", failure.instance, failure.error);
    }
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
    /// Instances `[search]` did not promote, with the reason.
    pub stopped: Vec<(String, String)>,
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

/// `1h05m`, `12m30s`, `45s`: an estimate needs no more.
fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// Per instance: the number of instances on the longest chain of its
/// producers (0 for a source).
fn depths(pipeline: &Pipeline) -> Vec<usize> {
    let mut depth = vec![0; pipeline.instances.len()];
    // Producers come before consumers, so one forward sweep suffices.
    for (i, instance) in pipeline.instances.iter().enumerate() {
        depth[i] = instance
            .dependencies()
            .map(|d| depth[d] + 1)
            .max()
            .unwrap_or(0);
    }
    depth
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Waiting,
    Running,
    Done,
    Failed,
    /// Not run: `[search]` stopped it (or what it needs).
    Stopped,
}

struct Job {
    instance: usize,
    key: String,
    forced: bool,
    inputs: BTreeMap<String, Vec<InputRecord>>,
    prefix: Option<PrefixSpec>,
}

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
    crate::interrupt::on_interrupt(xlpipe_stages::command::end_live_commands);
    let mut scheduler = Scheduler::new(pipeline, cache, options, progress)?;
    scheduler.announce();
    scheduler.run_to_end()?;
    Ok(scheduler.into_summary())
}

/// One run's bookkeeping: which instances wait, run, are done or failed,
/// the job slots and devices in use, and the channel through which local
/// worker threads and the Slurm tracker report back.
struct Scheduler<'a> {
    pipeline: &'a Pipeline,
    cache: &'a Cache,
    options: &'a RunOptions,
    progress: &'a MultiProgress,
    bar: ProgressBar,
    /// Per instance: run even if cached; part of this run; may execute
    /// (outside `--only`, an instance must be cached).
    forced: Vec<bool>,
    relevant: Vec<bool>,
    may_run: Vec<bool>,
    /// Per instance: its executor's name and configuration.
    executor_name: Vec<&'a str>,
    executor_of: Vec<&'a ExecutorConfig>,
    /// Free devices per resource (local instances).
    capacity: BTreeMap<String, Vec<u32>>,
    dependants: Vec<Vec<usize>>,
    /// Per instance: the longest chain of producers above it. Runnable
    /// instances start deepest first, so a grid finishes one point's
    /// evaluations before it trains the next point's model: an interrupted
    /// grid leaves whole results, not a row of unevaluated models.
    depth: Vec<usize>,
    /// Per instance: producers not done yet.
    waiting_on: Vec<usize>,
    state: Vec<State>,
    outputs: Vec<Option<BTreeMap<String, String>>>,
    /// Producers done: the key can be computed and the cache asked.
    ready: VecDeque<usize>,
    /// Not cached: waiting for a job slot or its resources.
    runnable: Vec<Job>,
    running: BTreeMap<usize, Slot>,
    /// The prefix families of running instances (see
    /// `waits_for_a_shorter_prefix`).
    running_prefixes: BTreeMap<usize, Option<PrefixSpec>>,
    local_running: usize,
    slurm_running: BTreeMap<&'a str, usize>,
    sender: mpsc::Sender<JobResult>,
    receiver: mpsc::Receiver<JobResult>,
    slurm: Option<SlurmExecutor>,
    summary: RunSummary,
    /// For the progress line: when each running instance started, the
    /// instances the opening plan expects to execute (to run, or pending),
    /// and the time the executed ones took.
    started_at: BTreeMap<usize, Instant>,
    expected_runs: usize,
    executed_time: Duration,
}

impl<'a> Scheduler<'a> {
    fn new(
        pipeline: &'a Pipeline,
        cache: &'a Cache,
        options: &'a RunOptions,
        progress: &'a MultiProgress,
    ) -> anyhow::Result<Scheduler<'a>> {
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

        let depth = depths(pipeline);
        let total = relevant.iter().filter(|r| **r).count() as u64;
        let bar = progress.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );

        let ready: VecDeque<usize> = (0..n)
            .filter(|&i| relevant[i] && waiting_on[i] == 0)
            .collect();
        let (sender, receiver) = mpsc::channel::<JobResult>();
        let uses_slurm =
            (0..n).any(|i| relevant[i] && matches!(executor_of[i], ExecutorConfig::Slurm(_)));
        let slurm = if uses_slurm {
            Some(SlurmExecutor::start(
                cache,
                options.slurm_poll,
                sender.clone(),
            )?)
        } else {
            None
        };
        Ok(Scheduler {
            pipeline,
            cache,
            options,
            progress,
            bar,
            forced,
            relevant,
            may_run,
            executor_name,
            executor_of,
            capacity,
            dependants,
            depth,
            waiting_on,
            state: vec![State::Waiting; n],
            outputs: vec![None; n],
            ready,
            runnable: Vec::new(),
            running: BTreeMap::new(),
            running_prefixes: BTreeMap::new(),
            local_running: 0,
            slurm_running: BTreeMap::new(),
            sender,
            receiver,
            slurm,
            summary: RunSummary::default(),
            started_at: BTreeMap::new(),
            expected_runs: 0,
            executed_time: Duration::ZERO,
        })
    }

    /// The run's first lines: per stage, how many instances will run, wait
    /// on work still to do (pending: they may turn out cached), or are
    /// cached; the stages that are wholly cached on one line.
    fn announce(&mut self) {
        let statuses = plan(self.pipeline, self.cache, &self.forced);
        // (to run, pending, cached) per stage, in pipeline order.
        let mut per_stage: Vec<(&str, [usize; 3])> = Vec::new();
        for (i, status) in statuses.iter().enumerate() {
            if !self.relevant[i] {
                continue;
            }
            let stage = self.pipeline.stage_of(i).name.as_str();
            if per_stage.last().is_none_or(|(s, _)| *s != stage) {
                per_stage.push((stage, [0; 3]));
            }
            let counts = &mut per_stage.last_mut().expect("just pushed").1;
            match status {
                Status::Run { .. } => counts[0] += 1,
                Status::Pending { .. } => counts[1] += 1,
                Status::Cached { .. } | Status::Stopped { .. } => counts[2] += 1,
            }
        }
        let mut cached_stages = Vec::new();
        for (stage, [run, pending, cached]) in &per_stage {
            self.expected_runs += run + pending;
            if run + pending == 0 {
                cached_stages.push(*stage);
                continue;
            }
            let mut parts = Vec::new();
            for (n, what) in [(run, "to run"), (pending, "pending"), (cached, "cached")] {
                if *n > 0 {
                    parts.push(format!("{n} {what}"));
                }
            }
            tracing::info!("{stage}: {}", parts.join(", "));
        }
        if !cached_stages.is_empty() {
            let shown: Vec<&str> = cached_stages.iter().take(8).copied().collect();
            let more = match cached_stages.len() - shown.len() {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            tracing::info!("cached: {}{more}", shown.join(", "));
        }
    }

    /// Until nothing runs and nothing more can start.
    fn run_to_end(&mut self) -> anyhow::Result<()> {
        loop {
            self.look_up_ready()?;
            self.start_runnable()?;
            self.show_running();
            if self.running.is_empty() {
                debug_assert!(self.runnable.is_empty() && self.ready.is_empty());
                break;
            }
            self.collect_one()?;
        }
        self.bar.finish_and_clear();
        self.progress.remove(&self.bar);
        Ok(())
    }

    /// Each ready instance: found in the cache (done), or queued to run.
    fn look_up_ready(&mut self) -> anyhow::Result<()> {
        let pipeline = self.pipeline;
        while let Some(i) = self.ready.pop_front() {
            let stopped: Vec<bool> = self.state.iter().map(|s| *s == State::Stopped).collect();
            let settled = settle(pipeline, self.cache, i, &self.outputs, &stopped);
            let (key, inputs) = match settled {
                Ok(Settled::Keyed(key, inputs)) => (key, inputs),
                Ok(Settled::Stopped(reason)) => {
                    self.drop_stopped_prefixes(i, &stopped);
                    self.stop(i, reason);
                    continue;
                }
                Ok(Settled::Waiting(_)) => {
                    unreachable!("a ready instance's dependencies are settled")
                }
                Err(err) => {
                    self.state[i] = State::Failed;
                    self.bar.inc(1);
                    self.summary.failed.push(Failure {
                        instance: pipeline.instances[i].name.clone(),
                        error: format!("{err:#}"),
                        log: None,
                    });
                    continue;
                }
            };
            if !self.forced[i] {
                if let Some(record) = self.cache.record(&key) {
                    self.summary.cached += 1;
                    self.bar.inc(1);
                    self.complete(i, record)?;
                    continue;
                }
            }
            if self.cache.is_read_only() {
                anyhow::bail!(
                    "the cache {} is read-only, and {} is not cached: running it would write \
                     to the cache (use a writable --cache)",
                    self.cache.root().display(),
                    pipeline.instances[i].name
                );
            }
            if !self.may_run[i] {
                self.state[i] = State::Failed;
                self.summary.failed.push(Failure {
                    instance: pipeline.instances[i].name.clone(),
                    error: "not cached, and outside the --only selection; run it first".into(),
                    log: None,
                });
                continue;
            }
            let reasons = if self.forced[i] {
                vec!["forced".to_string()]
            } else {
                why_run(pipeline, self.cache, i, &key, &inputs)
            };
            // The run's opening lines say what runs per stage; the reasons
            // per instance are `plan`'s, and here only with `-v`.
            let name = &pipeline.instances[i].name;
            tracing::info!(target: WILL_RUN, "{name} will run: {}", reasons.join("; "));
            self.runnable.push(Job {
                instance: i,
                key,
                forced: self.forced[i],
                prefix: prefix_spec(pipeline, i, &inputs),
                inputs,
            });
        }
        Ok(())
    }

    /// Start every queued instance that has a job slot and its resources
    /// (local) or room under its executor's `max_jobs` (Slurm).
    fn start_runnable(&mut self) -> anyhow::Result<()> {
        let jobs = self.options.jobs.max(1);
        let depth = &self.depth;
        self.runnable
            .sort_by_key(|job| (std::cmp::Reverse(depth[job.instance]), job.instance));
        let mut pos = 0;
        while pos < self.runnable.len() {
            let i = self.runnable[pos].instance;
            if self.waits_for_a_shorter_prefix(&self.runnable[pos]) {
                pos += 1;
                continue;
            }
            let executor = self.executor_of[i];
            let startable = match executor {
                ExecutorConfig::Local => {
                    self.local_running < jobs
                        && fits(&self.pipeline.instances[i].resources, &self.capacity)
                }
                ExecutorConfig::Slurm(slurm_options) => slurm_options.max_jobs.is_none_or(|max| {
                    let name = self.executor_name[i];
                    self.slurm_running.get(name).copied().unwrap_or(0) < max
                }),
            };
            if !startable {
                pos += 1;
                continue;
            }
            let job = self.runnable.remove(pos);
            self.running_prefixes.insert(i, job.prefix.clone());
            match executor {
                ExecutorConfig::Local => self.start_local(job)?,
                ExecutorConfig::Slurm(slurm_options) => self.submit(job, slurm_options)?,
            }
        }
        Ok(())
    }

    /// Whether a job of a family that shares prefixes must wait for a
    /// sibling with a shorter stable phase, queued or running: that one
    /// stores the prefix this one then resumes from (a grid over `steps`
    /// trains its longest budget once, not every budget from the start).
    fn waits_for_a_shorter_prefix(&self, job: &Job) -> bool {
        let Some(spec) = &job.prefix else {
            return false;
        };
        let shorter = |other: &Option<PrefixSpec>| {
            other
                .as_ref()
                .is_some_and(|o| o.family == spec.family && o.reusable_until < spec.reusable_until)
        };
        self.runnable.iter().any(|other| shorter(&other.prefix))
            || self.running_prefixes.values().any(shorter)
    }

    /// On a worker thread of this process, with the devices it needs.
    fn start_local(&mut self, job: Job) -> anyhow::Result<()> {
        let i = job.instance;
        let devices = take(&self.pipeline.instances[i].resources, &mut self.capacity);
        self.state[i] = State::Running;
        self.local_running += 1;
        self.running.insert(i, Slot::Local(devices.clone()));
        self.started_at.insert(i, Instant::now());
        let task = Task {
            spec: task_spec(self.pipeline, job, devices, &self.options.fetch),
            stage: self.pipeline.stage_of(i).kind.clone(),
            progress: self.progress.clone(),
            cache: self.cache.clone(),
            quiet: self.pipeline.instances.len() > GRID_QUIET,
        };
        spawn_job(i, task, self.sender.clone())
    }

    /// As a Slurm job (or adopted, when an earlier run's job still has it).
    fn submit(&mut self, job: Job, slurm_options: &SlurmOptions) -> anyhow::Result<()> {
        let i = job.instance;
        let gpus = self.pipeline.instances[i]
            .resources
            .get("gpu")
            .copied()
            .unwrap_or(0);
        // Inside its allocation a job sees its GPUs as 0..N.
        let devices = match gpus {
            0 => BTreeMap::new(),
            n => BTreeMap::from([("gpu".to_string(), (0..n).collect())]),
        };
        let spec = task_spec(self.pipeline, job, devices, &self.options.fetch);
        let spec = spec.with_absolute_paths()?;
        let executor = self
            .slurm
            .as_mut()
            .expect("started when any instance uses Slurm");
        match executor.submit(i, &spec, slurm_options, gpus) {
            Ok(adopted) => {
                if adopted {
                    self.summary.slurm_adopted += 1;
                } else {
                    self.summary.slurm_submitted += 1;
                }
                self.state[i] = State::Running;
                *self.slurm_running.entry(self.executor_name[i]).or_default() += 1;
                self.running.insert(i, Slot::Slurm);
                self.started_at.insert(i, Instant::now());
            }
            Err(failure) => {
                log_failure(self.pipeline, &failure);
                self.running_prefixes.remove(&i);
                self.state[i] = State::Failed;
                self.bar.inc(1);
                self.summary.failed.push(failure);
            }
        }
        Ok(())
    }

    /// The progress line's message: what runs now, failures, and an
    /// estimate of the time left (the mean time of the instances executed
    /// so far, over the instances still expected to execute, per job slot).
    fn show_running(&self) {
        let local: Vec<&str> = self
            .running
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Local(_)))
            .map(|(&r, _)| self.pipeline.instances[r].name.as_str())
            .collect();
        let on_slurm = self.running.len() - local.len();
        let mut message = format!("{} running", self.running.len());
        let failed = self.summary.failed.len();
        if failed > 0 {
            message += &format!(", {failed} failed");
        }
        let executed = self.summary.executed.len();
        if executed > 0 {
            let left = self.expected_runs.saturating_sub(executed + failed);
            let mean = self.executed_time / executed as u32;
            let slots = self.options.jobs.max(1).min(left.max(1)) as u32;
            let eta = mean * left as u32 / slots;
            message += &format!(", ~{} left", human_duration(eta));
        }
        if on_slurm > 0 {
            message += &format!("; {on_slurm} on Slurm");
        }
        if !local.is_empty() {
            message += &format!(": {}", local.join(", "));
        }
        self.bar.set_message(message);
    }

    /// Wait for one running instance to end, and take in its outcome.
    fn collect_one(&mut self) -> anyhow::Result<()> {
        let (i, result) = self.receiver.recv().context("a worker thread vanished")?;
        self.running_prefixes.remove(&i);
        match self.running.remove(&i).expect("finished job was running") {
            Slot::Local(devices) => {
                self.local_running -= 1;
                give_back(devices, &mut self.capacity);
            }
            Slot::Slurm => {
                *self
                    .slurm_running
                    .get_mut(self.executor_name[i])
                    .expect("counted when submitted") -= 1;
            }
        }
        self.bar.inc(1);
        let took = self
            .started_at
            .remove(&i)
            .map_or(Duration::ZERO, |t| t.elapsed());
        match result {
            Ok(Outcome::Ran(record)) => {
                self.executed_time += took;
                self.summary
                    .executed
                    .push(self.pipeline.instances[i].name.clone());
                self.complete(i, record)?;
            }
            Ok(Outcome::FoundCached(record)) => {
                self.summary.cached += 1;
                self.complete(i, record)?;
            }
            Err(mut failure) => {
                if let (true, Some(at)) = (
                    self.pipeline.stage_of(i).name == crate::search::STAGE,
                    &self.pipeline.search_objective_at,
                ) {
                    failure.error += &format!(" (see [search] objective at {at})");
                }
                log_failure(self.pipeline, &failure);
                self.state[i] = State::Failed;
                self.summary.failed.push(failure);
            }
        }
        Ok(())
    }

    /// Instance `i` is done with `record`: point the pipeline's ref at it
    /// and make ready the dependants that waited only on it.
    fn complete(&mut self, i: usize, record: Record) -> anyhow::Result<()> {
        let pipeline = self.pipeline;
        let name = &pipeline.instances[i].name;
        // A read-only cache keeps the refs of whoever wrote it.
        let unchanged = self.cache.is_read_only()
            || self
                .cache
                .instance_ref(&pipeline.name, name)
                .is_some_and(|r| r.key == record.key);
        if !unchanged {
            self.cache.write_ref(
                &pipeline.name,
                &InstanceRef {
                    instance: name.clone(),
                    key: record.key.clone(),
                },
            )?;
        }
        self.state[i] = State::Done;
        self.outputs[i] = Some(record.outputs);
        for &d in &self.dependants[i] {
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 && self.relevant[d] {
                self.ready.push_back(d);
            }
        }
        Ok(())
    }

    /// A training run the search stopped will never continue from the
    /// stable phases its configuration stored at lower rungs (its family:
    /// the same settings and inputs, any budget), so they go. Under full
    /// fine-tuning each is three times the model (weights and AdamW
    /// moments), and every configuration of the first rung stores one.
    fn drop_stopped_prefixes(&mut self, i: usize, stopped: &[bool]) {
        let pipeline = self.pipeline;
        if self.cache.is_read_only()
            || !matches!(
                pipeline.instances[i].gate,
                Some(crate::pipeline::expand::Gate::Promoted { .. })
            )
        {
            return;
        }
        let Some((_, inputs)) =
            crate::plan::instance_key(pipeline, i, &self.outputs, stopped, None)
        else {
            return;
        };
        let Some(spec) = prefix_spec(pipeline, i, &inputs) else {
            return;
        };
        match self.cache.drop_prefixes(&spec.family) {
            Ok(0) => {}
            Ok(freed) => tracing::info!(
                "{}: stopped, so the stable phases of its configuration are deleted ({})",
                pipeline.instances[i].name,
                crate::maintenance::human_bytes(freed)
            ),
            Err(err) => tracing::warn!(
                "{}: could not delete the stable phases of its configuration: {err:#}",
                pipeline.instances[i].name
            ),
        }
    }

    /// Instance `i` will not run: the search stopped it. What waits on it
    /// goes on (a rung's decision reads the others), or stops in turn.
    fn stop(&mut self, i: usize, reason: String) {
        let name = self.pipeline.instances[i].name.clone();
        tracing::info!(target: WILL_RUN, "{name} stopped: {reason}");
        self.state[i] = State::Stopped;
        self.bar.inc(1);
        self.summary.stopped.push((name, reason));
        for &d in &self.dependants[i] {
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 && self.relevant[d] {
                self.ready.push_back(d);
            }
        }
    }

    /// What the run did; what it left waiting was skipped.
    fn into_summary(self) -> RunSummary {
        let Scheduler {
            pipeline,
            cache,
            options,
            relevant,
            state,
            mut summary,
            ..
        } = self;
        summary.skipped = (0..pipeline.instances.len())
            .filter(|&i| relevant[i] && state[i] == State::Waiting)
            .map(|i| pipeline.instances[i].name.clone())
            .collect();
        if options.only.is_empty() && options.until.is_empty() && summary.failed.is_empty() {
            // The pipeline ran whole: forget instances it no longer has.
            let current: BTreeSet<&str> =
                pipeline.instances.iter().map(|i| i.name.as_str()).collect();
            cache.retain_refs(&pipeline.name, &|name| current.contains(name));
        }
        summary
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
        prefix: job.prefix,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human_duration(Duration::from_secs(45)), "45s");
        assert_eq!(human_duration(Duration::from_secs(750)), "12m30s");
        assert_eq!(human_duration(Duration::from_secs(3900)), "1h05m");
    }
}
