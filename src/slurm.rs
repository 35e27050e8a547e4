//! The Slurm executor: one batch job per stage instance.
//!
//! The cache must be on a filesystem that this machine and the nodes share.
//! For each instance the engine writes, under `cache/slurm/<key>/`, the
//! instance's task (`task.json`: kind, canonical params, input hashes) and a
//! job script that runs `xlpipe exec-job task.json` on the node, and
//! submits it with `sbatch`. The job computes exactly that key, the way a
//! local worker does (key lock, temp folder, record written last), so a job
//! or node lost halfway leaves nothing that a later run trusts.
//!
//! One tracker thread asks `squeue` about all live jobs at once, every poll
//! interval, and hands a job's outcome to the scheduler when it leaves the
//! queue: the record it wrote, or a failure with the tail of its output.
//!
//! `job.json` beside the task names the submitted job. A rerun after the
//! engine died adopts a job that is still queued or running instead of
//! submitting the key again; a job that finished meanwhile left its record,
//! so its key is simply cached. Ctrl-C (or SIGTERM) cancels the run's jobs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cache::{remove_path, write_atomic, Cache};
use crate::executor::SlurmOptions;
use crate::task::{Failure, JobResult, Outcome, TaskSpec};

/// How long a job that Slurm calls COMPLETED (or has forgotten) may take to
/// show its record: on a network filesystem the node's writes reach this
/// machine with a delay.
const RECORD_GRACE: Duration = Duration::from_secs(30);

/// States after which a job never runs again (`squeue --states=all`).
const ENDED: &[&str] = &[
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "SPECIAL_EXIT",
    "TIMEOUT",
];

/// Job ids this process is waiting for: what Ctrl-C cancels.
static LIVE_JOBS: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

fn live_jobs() -> std::sync::MutexGuard<'static, BTreeSet<u64>> {
    LIVE_JOBS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `cache/slurm/<key>/job.json`: the job computing a key.
#[derive(Serialize, Deserialize)]
struct JobMarker {
    job: u64,
    instance: String,
    submitted: f64,
}

/// What a run sends to Slurm, and what it learns back.
pub struct SlurmExecutor {
    /// The cache root as the job sees it (absolute).
    cache_root: PathBuf,
    workdir: PathBuf,
    program: PathBuf,
    /// Keys whose jobs, submitted by an earlier run, are still queued or running.
    adoptable: BTreeMap<String, u64>,
    tracker: mpsc::Sender<Tracked>,
}

struct Tracked {
    instance: usize,
    name: String,
    key: String,
    job: u64,
    folder: PathBuf,
    state: String,
    /// When the job ended without its record being visible yet.
    ended: Option<Instant>,
}

impl SlurmExecutor {
    /// Look for jobs of earlier runs and start the tracker, which sends each
    /// job's outcome to `results`.
    pub fn start(
        cache: &Cache,
        poll: Duration,
        results: mpsc::Sender<JobResult>,
    ) -> anyhow::Result<SlurmExecutor> {
        crate::interrupt::on_interrupt(cancel_live_jobs);
        // A zero interval (RunOptions::default()) would ask squeue non-stop.
        let poll = poll.max(Duration::from_millis(100));
        let cache_root = std::path::absolute(cache.root())?;
        let adoptable = earlier_jobs(cache)?;
        let (tracker, submissions) = mpsc::channel();
        let tracker_cache = cache.clone();
        std::thread::Builder::new()
            .name("slurm tracker".into())
            .spawn(move || track(submissions, results, tracker_cache, poll))
            .context("starting the Slurm tracker")?;
        Ok(SlurmExecutor {
            cache_root,
            workdir: std::env::current_dir()?,
            program: std::env::current_exe().context("locating the xlpipe binary")?,
            adoptable,
            tracker,
        })
    }

    /// Submit one instance (or adopt its job from an earlier run: then
    /// `Ok(true)`).
    pub fn submit(
        &mut self,
        instance: usize,
        task: &TaskSpec,
        options: &SlurmOptions,
        gpus: u32,
    ) -> Result<bool, Failure> {
        let fail = |error: anyhow::Error| Failure {
            instance: task.instance.clone(),
            error: format!("{error:#}"),
            log: None,
        };
        let folder = self.cache_root.join("slurm").join(&task.key);
        let (job, adopted) = match self.adoptable.remove(&task.key) {
            Some(job) => {
                tracing::info!(
                    "{}: adopting Slurm job {job}, submitted by an earlier run",
                    task.instance
                );
                (job, true)
            }
            None => (
                self.sbatch(&folder, task, options, gpus).map_err(fail)?,
                false,
            ),
        };
        live_jobs().insert(job);
        let tracked = Tracked {
            instance,
            name: task.instance.clone(),
            key: task.key.clone(),
            job,
            folder,
            state: "SUBMITTED".into(),
            ended: None,
        };
        // The tracker lives as long as this executor.
        let _ = self.tracker.send(tracked);
        Ok(adopted)
    }

    fn sbatch(
        &self,
        folder: &Path,
        task: &TaskSpec,
        options: &SlurmOptions,
        gpus: u32,
    ) -> anyhow::Result<u64> {
        if folder.exists() {
            remove_path(folder)?;
        }
        std::fs::create_dir_all(folder)
            .with_context(|| format!("creating {}", folder.display()))?;
        let task_file = folder.join("task.json");
        write_atomic(&task_file, &serde_json::to_vec_pretty(task)?)?;
        let program = options
            .program
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.program.clone());
        let args = sbatch_args(&task.instance, folder, &self.workdir, options, gpus);
        let script = job_script(
            &args,
            &options.setup,
            &program,
            &self.cache_root,
            &task_file,
        );
        let script_file = folder.join("job.sh");
        write_atomic(&script_file, script.as_bytes())?;

        let output = Command::new("sbatch")
            .arg("--parsable")
            .args(&args)
            .arg(&script_file)
            .output()
            .context("running sbatch (is Slurm installed and on PATH?)")?;
        if !output.status.success() {
            anyhow::bail!(
                "sbatch refused the job: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        // `--parsable` prints `id` or `id;cluster`.
        let stdout = String::from_utf8_lossy(&output.stdout);
        let job: u64 = stdout
            .trim()
            .split(';')
            .next()
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("sbatch printed `{}`, not a job id", stdout.trim()))?;
        let marker = JobMarker {
            job,
            instance: task.instance.clone(),
            submitted: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        };
        write_atomic(&folder.join("job.json"), &serde_json::to_vec(&marker)?)?;
        tracing::info!("{}: submitted as Slurm job {job}", task.instance);
        Ok(job)
    }
}

/// `sbatch` options for one instance. Given as arguments, not `#SBATCH`
/// lines, so that values need no quoting; the script repeats them in a
/// comment for whoever debugs a job.
fn sbatch_args(
    instance: &str,
    folder: &Path,
    workdir: &Path,
    options: &SlurmOptions,
    gpus: u32,
) -> Vec<String> {
    let name: String = instance
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    let mut args = vec![
        format!("--job-name=xlpipe:{name}"),
        format!("--output={}", folder.join("slurm-%j.out").display()),
        format!("--chdir={}", workdir.display()),
    ];
    let optional = [
        ("partition", &options.partition),
        ("account", &options.account),
        ("qos", &options.qos),
        ("time", &options.time),
        ("mem", &options.mem),
        ("constraint", &options.constraint),
    ];
    for (flag, value) in optional {
        if let Some(value) = value {
            args.push(format!("--{flag}={value}"));
        }
    }
    if let Some(cpus) = options.cpus_per_task {
        args.push(format!("--cpus-per-task={cpus}"));
    }
    match (&options.gres, gpus) {
        (Some(gres), _) => args.push(format!("--gres={gres}")),
        (None, 0) => {}
        (None, n) => args.push(format!("--gres=gpu:{n}")),
    }
    args.extend(options.sbatch_args.iter().cloned());
    args
}

fn job_script(
    args: &[String],
    setup: &[String],
    program: &Path,
    cache_root: &Path,
    task_file: &Path,
) -> String {
    let mut script = String::from("#!/bin/bash\n# Written by xlpipe; submitted as:\n");
    script.push_str(&format!("#   sbatch {} job.sh\n", args.join(" ")));
    script.push_str("set -e\n");
    for line in setup {
        script.push_str(line);
        script.push('\n');
    }
    script.push_str(&format!(
        "exec {} --cache {} exec-job {}\n",
        shell_quote(&program.display().to_string()),
        shell_quote(&cache_root.display().to_string()),
        shell_quote(&task_file.display().to_string()),
    ));
    script
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Jobs of earlier runs that are still queued or running, by key. Folders
/// of keys that got their record meanwhile are removed.
fn earlier_jobs(cache: &Cache) -> anyhow::Result<BTreeMap<String, u64>> {
    let root = cache.root().join("slurm");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(BTreeMap::new());
    };
    let mut candidates = BTreeMap::new();
    for entry in entries.flatten() {
        let key = entry.file_name().to_string_lossy().into_owned();
        if cache.record(&key).is_some() {
            remove_path(&entry.path())?;
            continue;
        }
        let marker = std::fs::read(entry.path().join("job.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<JobMarker>(&bytes).ok());
        if let Some(marker) = marker {
            candidates.insert(key, marker.job);
        }
    }
    if candidates.is_empty() {
        return Ok(candidates);
    }
    let ids: Vec<u64> = candidates.values().copied().collect();
    let states = queue_states(&ids)?;
    candidates.retain(|_, job| {
        states
            .get(job)
            .is_some_and(|state| !ENDED.contains(&state.as_str()))
    });
    Ok(candidates)
}

/// The state of each job Slurm still knows, in one `squeue` call per 500 ids.
fn queue_states(ids: &[u64]) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut states = BTreeMap::new();
    for chunk in ids.chunks(500) {
        let list: Vec<String> = chunk.iter().map(u64::to_string).collect();
        let output = Command::new("squeue")
            .args(["--noheader", "--states=all", "--format=%i %T", "--jobs"])
            .arg(list.join(","))
            .output()
            .context("running squeue (is Slurm installed and on PATH?)")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            // Every id in the list has been purged from the controller.
            if stderr.contains("Invalid job id") {
                continue;
            }
            anyhow::bail!("squeue failed: {}", stderr.trim());
        }
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let mut fields = line.split_whitespace();
            if let (Some(id), Some(state)) = (fields.next(), fields.next()) {
                if let Ok(id) = id.parse() {
                    states.insert(id, state.to_string());
                }
            }
        }
    }
    Ok(states)
}

/// The tracker thread: collects submitted jobs, polls their states and
/// reports each one's outcome once it has ended.
fn track(
    submissions: mpsc::Receiver<Tracked>,
    results: mpsc::Sender<JobResult>,
    cache: Cache,
    poll: Duration,
) {
    let mut tracked: Vec<Tracked> = Vec::new();
    let mut next_poll = Instant::now() + poll;
    let mut open = true;
    loop {
        if tracked.is_empty() {
            if !open {
                return;
            }
            match submissions.recv() {
                Ok(job) => tracked.push(job),
                Err(_) => return,
            }
            next_poll = Instant::now() + poll;
            continue;
        }
        let wait = next_poll.saturating_duration_since(Instant::now());
        if open {
            match submissions.recv_timeout(wait) {
                Ok(job) => {
                    tracked.push(job);
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    continue;
                }
            }
        } else {
            std::thread::sleep(wait);
        }
        next_poll = Instant::now() + poll;
        let ids: Vec<u64> = tracked.iter().map(|t| t.job).collect();
        let states = match queue_states(&ids) {
            Ok(states) => states,
            Err(err) => {
                tracing::warn!(
                    "cannot ask Slurm about {} jobs: {err:#}; retrying",
                    ids.len()
                );
                continue;
            }
        };
        let mut still = Vec::with_capacity(tracked.len());
        for mut job in tracked {
            let state = states.get(&job.job).cloned();
            if let Some(state) = &state {
                if *state != job.state {
                    tracing::info!("{}: Slurm job {} {}", job.name, job.job, state);
                    job.state = state.clone();
                }
                if !ENDED.contains(&state.as_str()) {
                    still.push(job);
                    continue;
                }
            }
            match outcome(&cache, &mut job, state.as_deref()) {
                Some(result) => {
                    live_jobs().remove(&job.job);
                    if results.send((job.instance, result)).is_err() {
                        return;
                    }
                }
                None => still.push(job),
            }
        }
        tracked = still;
    }
}

/// The outcome of a job that has ended (`state`) or that Slurm no longer
/// knows (`None`); `None` while its record may still be on its way.
fn outcome(
    cache: &Cache,
    job: &mut Tracked,
    state: Option<&str>,
) -> Option<Result<Outcome, Failure>> {
    if let Some(record) = cache.record(&job.key) {
        if let Err(err) = remove_path(&job.folder) {
            tracing::warn!("could not remove {}: {err}", job.folder.display());
        }
        return Some(Ok(Outcome::Ran(record)));
    }
    let may_be_late = matches!(state, None | Some("COMPLETED"));
    let ended = *job.ended.get_or_insert_with(Instant::now);
    if may_be_late && ended.elapsed() < RECORD_GRACE {
        return None;
    }
    let output = job.folder.join(format!("slurm-{}.out", job.job));
    let tail = std::fs::read_to_string(&output)
        .map(|text| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        })
        .unwrap_or_default();
    let mut error = format!(
        "Slurm job {} {} without a result",
        job.job,
        match state {
            Some(state) => format!("ended {state}"),
            None => "is no longer known to Slurm".to_string(),
        }
    );
    if !tail.trim().is_empty() {
        error.push_str(&format!("; its output ends:\n{tail}"));
    }
    let stage_log = cache.log_path(&job.key);
    Some(Err(Failure {
        instance: job.name.clone(),
        error,
        log: Some(if stage_log.exists() {
            stage_log
        } else {
            output
        }),
    }))
}

fn cancel_live_jobs() {
    let ids: Vec<String> = live_jobs().iter().map(u64::to_string).collect();
    if ids.is_empty() {
        return;
    }
    eprintln!(
        "interrupted: cancelling {} Slurm job(s): {}",
        ids.len(),
        ids.join(" ")
    );
    match Command::new("scancel").args(&ids).status() {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("scancel exited with {status}"),
        Err(err) => eprintln!("could not run scancel: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sbatch_args_follow_the_options() {
        let options = SlurmOptions {
            partition: Some("gpu".into()),
            time: Some("02:00:00".into()),
            cpus_per_task: Some(8),
            sbatch_args: vec!["--exclusive".into()],
            ..SlurmOptions::default()
        };
        let args = sbatch_args(
            "train[alpha=0.5, seed=1]",
            Path::new("/c/slurm/k"),
            Path::new("/w"),
            &options,
            1,
        );
        assert_eq!(
            args,
            [
                "--job-name=xlpipe:train[alpha=0.5,_seed=1]",
                "--output=/c/slurm/k/slurm-%j.out",
                "--chdir=/w",
                "--partition=gpu",
                "--time=02:00:00",
                "--cpus-per-task=8",
                "--gres=gpu:1",
                "--exclusive",
            ]
        );
        let explicit = SlurmOptions {
            gres: Some("gpu:a100:2".into()),
            ..SlurmOptions::default()
        };
        let args = sbatch_args("x", Path::new("/c"), Path::new("/w"), &explicit, 1);
        assert_eq!(args.last().unwrap(), "--gres=gpu:a100:2");
    }

    #[test]
    fn job_script_quotes_paths_and_runs_setup_first() {
        let script = job_script(
            &["--time=1".into()],
            &["module load cuda".into()],
            Path::new("/opt/it's/xlpipe"),
            Path::new("/shared/cache"),
            Path::new("/shared/cache/slurm/k/task.json"),
        );
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "#!/bin/bash");
        assert_eq!(lines[3], "set -e");
        assert_eq!(lines[4], "module load cuda");
        assert_eq!(
            lines[5],
            r"exec '/opt/it'\''s/xlpipe' --cache '/shared/cache' exec-job '/shared/cache/slurm/k/task.json'"
        );
    }
}
