//! One instance's computation, wherever it runs: the serialisable
//! [`TaskSpec`] a scheduler hands out (to a local worker thread, or to a
//! Slurm job as `task.json`), and [`Task::execute`], which takes the key's
//! lock, runs the stage in a fresh work folder, stores the outputs and
//! writes the record. The local scheduler ([`crate::run`]) and the Slurm
//! executor ([`crate::slurm`]) both build on it; it depends on neither.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use indicatif::MultiProgress;
use serde::{Deserialize, Serialize};
use xlpipe_stage_api::{FetchSettings, InputArtifact, Prefixes, Stage, StageContext, StoredPrefix};

use crate::cache::{remove_path, Cache, InputRecord, PrefixEntry, Record, ResumedFrom};

#[derive(Debug)]
pub struct Failure {
    pub instance: String,
    pub error: String,
    pub log: Option<PathBuf>,
}

pub enum Outcome {
    Ran(Record),
    /// Another run computed the key while this one waited for its lock.
    FoundCached(Record),
}

/// A finished instance (its index in the pipeline) and how it went.
pub type JobResult = (usize, Result<Outcome, Failure>);

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
    /// For a kind with `PrefixReuse`: the prefixes it may resume from and
    /// store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<PrefixSpec>,
}

/// Which stored prefixes an instance shares (see
/// `xlpipe_stage_api::PrefixReuse`): its family (`hashing::prefix_family`)
/// and the last step whose state no budget decides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixSpec {
    pub family: String,
    pub reusable_until: usize,
}

impl TaskSpec {
    /// For a process started elsewhere (a Slurm job): relative paths would
    /// resolve against its own working folder.
    pub(crate) fn with_absolute_paths(mut self) -> anyhow::Result<TaskSpec> {
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
    crate::interrupt::on_interrupt(xlpipe_stages::command::end_live_commands);
    let task = Task {
        spec,
        stage,
        progress: progress.clone(),
        cache: cache.clone(),
        quiet: false,
    };
    match task.execute() {
        Ok(_) => Ok(()),
        Err(failure) => Err(anyhow::anyhow!("{}", failure.error)),
    }
}

/// One instance to compute here: its spec, its stage kind, and where it
/// reports progress and stores what it made.
pub struct Task {
    pub spec: TaskSpec,
    pub stage: Arc<dyn Stage>,
    pub progress: MultiProgress,
    pub cache: Cache,
    /// One of a grid's many instances: its "finished" line goes to its
    /// stage log, and to the console only with `-v` (target
    /// [`GRID_INSTANCE`]), so a grid's console output grows with its
    /// stages, not its instances.
    pub quiet: bool,
}

/// The log target of lines the console shows only with `-v`.
pub const GRID_INSTANCE: &str = "xlpipe::grid_instance";

impl Task {
    /// Take the key's lock, compute the instance in a fresh `tmp/` folder,
    /// store its outputs and write its record.
    pub fn execute(self) -> Result<Outcome, Failure> {
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
                self.cache.release_key(&self.spec.key, key_lock);
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
        // The command's processes have ended (the command stage waits for
        // its whole group): nothing else holds this lock any more.
        self.cache.release_key(&self.spec.key, key_lock);
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
            prefixes: self.spec.prefix.as_ref().map(|spec| Prefixes {
                resume: self.resume_point(spec),
                store_at: temp.join("prefix"),
            }),
        };
        let resumed_from = context
            .prefixes
            .as_ref()
            .and_then(|p| p.resume.as_ref())
            .map(|r| ResumedFrom {
                step: r.step,
                instance: r.producer.clone(),
            });
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
            resumed_from,
        };
        self.cache.write_record(&record)?;
        if let Some(spec) = &self.spec.prefix {
            // The result stands without it; a prefix only saves later work.
            if let Err(err) = self.store_prefix(spec, &temp.join("prefix")) {
                tracing::warn!("could not store the stable-phase prefix: {err:#}");
            }
        }
        span.in_scope(|| {
            if self.quiet {
                tracing::info!(target: GRID_INSTANCE, "finished in {seconds:.2}s");
            } else {
                tracing::info!("finished in {seconds:.2}s");
            }
        });
        Ok(record)
    }

    /// The longest stored prefix this instance may resume from, re-hashed
    /// before a stage reads it (a damaged one is moved out: none then).
    fn resume_point(&self, spec: &PrefixSpec) -> Option<StoredPrefix> {
        let entry = self.cache.best_prefix(&spec.family, spec.reusable_until)?;
        match self.cache.verify(&entry.object) {
            Ok(path) => Some(StoredPrefix {
                step: entry.step,
                path,
                producer: entry.instance,
            }),
            Err(err) => {
                tracing::warn!("{err:#}; training from the start instead");
                None
            }
        }
    }

    /// Store what the stage left at `path` (if anything) as the family's
    /// prefix at `reusable_until` steps.
    fn store_prefix(&self, spec: &PrefixSpec, path: &std::path::Path) -> anyhow::Result<()> {
        if !path.exists() {
            return Ok(());
        }
        let object = self.cache.store(path)?;
        self.cache.write_prefix(
            &spec.family,
            &PrefixEntry {
                step: spec.reusable_until,
                object,
                key: self.spec.key.clone(),
                instance: self.spec.instance.clone(),
            },
        )
    }
}
