//! Where stage instances run: `local` (worker threads of this process) or
//! `slurm` (one batch job per instance on a cluster that shares the cache's
//! filesystem).
//!
//! ```toml
//! [executors.slurm]            # options of every Slurm job
//! account = "proj42"
//! time = "01:00:00"
//! setup = ["module load cuda/12.4"]
//!
//! [executors.gpu]              # a resource class: Slurm jobs on GPU nodes
//! type = "slurm"
//! partition = "gpu"
//! gres = "gpu:1"
//!
//! [stages.train]
//! executor = "gpu"
//! ```
//!
//! `local` and `slurm` always exist. A Slurm executor other than `slurm`
//! takes the options it leaves unset from `[executors.slurm]`, and adds its
//! `setup` lines and `sbatch_args` after those. `xlpipe run --executor NAME`
//! picks the executor of every stage that names none.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::diag::{nearest, Diagnostic, Loc, Sources};

/// An `[executors.NAME]` table as written (merged over bases and includes).
#[derive(Debug, Clone)]
pub struct ExecutorSpec {
    pub name: String,
    pub loc: Loc,
    pub table: toml::Table,
    /// Location of each key, for errors.
    pub key_locs: BTreeMap<String, Loc>,
}

/// The executor of a stage that names none, when `--executor` names none either.
pub const DEFAULT: &str = "local";

#[derive(Debug, Clone, PartialEq)]
pub enum ExecutorConfig {
    Local,
    Slurm(Box<SlurmOptions>),
}

/// How a Slurm job is requested. Every field is optional: what is unset is
/// left to the cluster's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Wall-time limit, in Slurm's format (`01:30:00`, `2-00:00:00`).
    pub time: Option<String>,
    pub cpus_per_task: Option<u32>,
    /// Memory per node, e.g. `32G`.
    pub mem: Option<String>,
    /// Generic resources, e.g. `gpu:a100:1`. When unset, an instance that
    /// holds `gpu = N` asks for `gpu:N`.
    pub gres: Option<String>,
    pub constraint: Option<String>,
    /// Further `sbatch` options, e.g. `["--exclusive"]`.
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// Shell lines run in the job before xlpipe (modules, environments,
    /// containers).
    #[serde(default)]
    pub setup: Vec<String>,
    /// The xlpipe the nodes run; default: the binary running the pipeline.
    pub program: Option<String>,
    /// At most this many of this executor's jobs queued or running at once.
    pub max_jobs: Option<usize>,
}

impl SlurmOptions {
    /// `self` over `base`: unset fields come from `base`; lists add up.
    fn over(self, base: &SlurmOptions) -> SlurmOptions {
        let base = base.clone();
        SlurmOptions {
            partition: self.partition.or(base.partition),
            account: self.account.or(base.account),
            qos: self.qos.or(base.qos),
            time: self.time.or(base.time),
            cpus_per_task: self.cpus_per_task.or(base.cpus_per_task),
            mem: self.mem.or(base.mem),
            gres: self.gres.or(base.gres),
            constraint: self.constraint.or(base.constraint),
            sbatch_args: [base.sbatch_args, self.sbatch_args].concat(),
            setup: [base.setup, self.setup].concat(),
            program: self.program.or(base.program),
            max_jobs: self.max_jobs.or(base.max_jobs),
        }
    }
}

/// The executors a pipeline can name: the built-in `local` and `slurm`, and
/// its `[executors.NAME]` tables.
pub fn resolve(
    specs: &[ExecutorSpec],
    sources: &Sources,
) -> Result<BTreeMap<String, ExecutorConfig>, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut parsed = BTreeMap::new();
    for spec in specs {
        match parse(spec, sources) {
            Ok(config) => {
                parsed.insert(spec.name.clone(), config);
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let slurm_defaults = match parsed.get("slurm") {
        Some(ExecutorConfig::Slurm(options)) => (**options).clone(),
        _ => SlurmOptions::default(),
    };
    let mut executors: BTreeMap<String, ExecutorConfig> = BTreeMap::from([
        ("local".to_string(), ExecutorConfig::Local),
        (
            "slurm".to_string(),
            ExecutorConfig::Slurm(Box::new(slurm_defaults.clone())),
        ),
    ]);
    for (name, config) in parsed {
        let config = match config {
            ExecutorConfig::Slurm(options) if name != "slurm" => {
                ExecutorConfig::Slurm(Box::new(options.over(&slurm_defaults)))
            }
            other => other,
        };
        executors.insert(name, config);
    }
    Ok(executors)
}

const SLURM_FIELDS: &[&str] = &[
    "partition",
    "account",
    "qos",
    "time",
    "cpus_per_task",
    "mem",
    "gres",
    "constraint",
    "sbatch_args",
    "setup",
    "program",
    "max_jobs",
];

fn parse(spec: &ExecutorSpec, sources: &Sources) -> Result<ExecutorConfig, Diagnostic> {
    let field = format!("executors.{}", spec.name);
    let mut table = spec.table.clone();
    let kind = match table.remove("type") {
        None if spec.name == "local" => "local".to_string(),
        None => "slurm".to_string(),
        Some(toml::Value::String(s)) => s,
        Some(_) => {
            return Err(at_key(
                spec,
                sources,
                "type",
                "expected \"slurm\" or \"local\"",
            ));
        }
    };
    match kind.as_str() {
        "local" if spec.name == "slurm" => Err(at_key(
            spec,
            sources,
            "type",
            "`slurm` is the built-in Slurm executor; give a local one another name",
        )),
        "local" => match table.keys().next() {
            Some(key) => Err(at_key(
                spec,
                sources,
                key,
                "a local executor takes no options",
            )),
            None => Ok(ExecutorConfig::Local),
        },
        "slurm" if spec.name == "local" => Err(at_key(
            spec,
            sources,
            "type",
            "`local` is the built-in local executor; give a Slurm one another name",
        )),
        "slurm" => {
            if let Some(key) = table.keys().find(|k| !SLURM_FIELDS.contains(&k.as_str())) {
                let hint = nearest(key, SLURM_FIELDS.iter().copied())
                    .map(|n| format!("did you mean `{n}`?"))
                    .unwrap_or_else(|| format!("known: type, {}", SLURM_FIELDS.join(", ")));
                return Err(at_key(
                    spec,
                    sources,
                    key,
                    format!("unknown Slurm option `{key}`; {hint}"),
                ));
            }
            let options: SlurmOptions = serde_path_to_error::deserialize(toml::Value::Table(table))
                .map_err(|err| {
                    let key = err.path().to_string();
                    let key = key.split(['.', '[']).next().unwrap_or_default().to_string();
                    let message = err.into_inner().to_string();
                    if spec.key_locs.contains_key(&key) {
                        at_key(spec, sources, &key, message)
                    } else {
                        sources.error(spec.loc, &field, message)
                    }
                })?;
            Ok(ExecutorConfig::Slurm(Box::new(options)))
        }
        other => Err(at_key(
            spec,
            sources,
            "type",
            format!("unknown executor type `{other}`; expected \"slurm\" or \"local\""),
        )),
    }
}

fn at_key(
    spec: &ExecutorSpec,
    sources: &Sources,
    key: &str,
    message: impl Into<String>,
) -> Diagnostic {
    let loc = spec.key_locs.get(key).copied().unwrap_or(spec.loc);
    sources.error(loc, &format!("executors.{}.{key}", spec.name), message)
}
