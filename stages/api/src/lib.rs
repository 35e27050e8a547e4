//! The stage API: what the engine and every stage kind share.
//!
//! The engine knows stages only through the [`Stage`] trait: it asks a kind
//! to validate and canonicalise its params, to describe its interface (input
//! slots, outputs, resources), and to run with a [`StageContext`] that hands
//! it input paths and output locations. Everything about caching, hashing,
//! scheduling and logging stays in the engine, so a stage is just "read
//! these paths, write those paths". Kinds implement [`TypedStage`]; the
//! helpers every kind uses live here too: [`content`] hashes and [`table`]
//! (Parquet through polars).
//!
//! This crate knows no stage kind and no model code.

pub mod content;
pub mod table;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// One kind of pipeline stage (`kind = "..."` in a pipeline file), as the
/// engine sees it: params in and out as JSON, so that one registry can hold
/// every kind. Stage kinds implement [`TypedStage`] instead; this trait is
/// the blanket implementation over it.
pub trait Stage: Send + Sync {
    /// The name used in pipeline files.
    fn kind(&self) -> &'static str;

    /// Implementation version: bump it whenever a code change alters what the
    /// stage writes, so cached outputs of older code are not reused.
    fn version(&self) -> u32;

    /// One line for `xlpipe kinds` and error messages.
    fn summary(&self) -> &'static str;

    /// Validate the stage's params (everything in its table but `kind` and
    /// `inputs`, grid variables already substituted) and return their
    /// canonical form: typed, defaults filled in, so that two spellings of the
    /// same settings hash alike.
    fn canonical_params(
        &self,
        params: &toml::Table,
        env: &ParamsEnv,
    ) -> Result<serde_json::Value, ParamError>;

    /// Input slots, outputs and resources of a stage with these canonical
    /// params. `input_names` are the slots the pipeline file connects, for
    /// stages whose slots are user-defined.
    fn interface(
        &self,
        params: &serde_json::Value,
        input_names: &[String],
    ) -> Result<Interface, ParamError>;

    /// Do the work: read `ctx.inputs`, write every declared output under
    /// `ctx.output(name)`. Errors fail the stage; nothing it wrote is kept.
    fn run(&self, params: &serde_json::Value, ctx: &StageContext) -> anyhow::Result<()>;

    /// What `xlpipe report` prints for a stored output folder of this kind;
    /// `None` for kinds with nothing to show there.
    fn render_output(&self, output: &Path) -> anyhow::Result<Option<String>>;

    /// Whether an instance with these canonical params may continue from a
    /// stored prefix of another's work (see [`PrefixReuse`]).
    fn prefix_reuse(&self, params: &serde_json::Value) -> Option<PrefixReuse>;
}

/// A stage whose work up to some step does not depend on its budget (a
/// training run under a warmup-stable-decay schedule) shares that prefix
/// with every instance of the same kind, inputs and `shared_params`: the
/// engine stores the state a run reaches at `reusable_until`, and hands
/// another run the longest stored state at or before its own
/// `reusable_until` ([`StageContext::prefixes`]), so it trains only the
/// rest. The outputs must not depend on whether a run resumed.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixReuse {
    /// The canonical params with the budget taken out.
    pub shared_params: serde_json::Value,
    /// The last step (counted from 0 done) whose state no budget decides.
    pub reusable_until: usize,
}

/// The prefixes of one running instance (see [`PrefixReuse`]).
#[derive(Debug, Clone)]
pub struct Prefixes {
    /// The longest stored prefix at or before this instance's
    /// `reusable_until`, if any.
    pub resume: Option<StoredPrefix>,
    /// Where to write the state at `reusable_until` (a folder, in the layout
    /// the stage reads back as `resume`); stored once the stage succeeds.
    pub store_at: PathBuf,
}

/// A prefix in the cache: read-only, verified against its hash.
#[derive(Debug, Clone)]
pub struct StoredPrefix {
    /// Steps done in it.
    pub step: usize,
    pub path: PathBuf,
    /// The instance whose run stored it.
    pub producer: String,
}

/// One stage kind written against its own params type: a new kind is its
/// params struct and its `execute`.
///
/// `Params` derives serde with `#[serde(deny_unknown_fields)]`; a field's
/// default is a function named `default_<field>` (one that several fields
/// share is named for what they share, e.g. `default_depth`). The canonical form the cache hashes is
/// `Params` serialised after [`TypedStage::validate`], so every setting that
/// changes the output must be a field, and defaults are written out.
pub trait TypedStage: Send + Sync {
    /// The stage's params, everything in its table but `kind` and `inputs`.
    type Params: Serialize + DeserializeOwned;

    /// The name used in pipeline files.
    const KIND: &'static str;

    /// Implementation version: bump it whenever a code change alters what the
    /// stage writes, so cached outputs of older code are not reused.
    const VERSION: u32;

    /// One line for `xlpipe kinds` and error messages.
    const SUMMARY: &'static str;

    /// Check what serde cannot (ranges, files named in params) and bring the
    /// params to canonical form. Parsed, not yet validated, params come in.
    fn validate(&self, params: Self::Params, _env: &ParamsEnv) -> Result<Self::Params, ParamError> {
        Ok(params)
    }

    /// Input slots, outputs and resources of a stage with these params.
    /// `input_names` are the slots the pipeline file connects, for stages
    /// whose slots are user-defined.
    fn interface_for(
        &self,
        params: &Self::Params,
        input_names: &[String],
    ) -> Result<Interface, ParamError>;

    /// Do the work: read `ctx.inputs`, write every declared output under
    /// `ctx.output(name)`. Errors fail the stage; nothing it wrote is kept.
    fn execute(&self, params: &Self::Params, ctx: &StageContext) -> anyhow::Result<()>;

    /// What `xlpipe report` prints for a stored output folder of this kind;
    /// `None` for kinds with nothing to show there.
    fn render_output(&self, _output: &Path) -> anyhow::Result<Option<String>> {
        Ok(None)
    }

    /// Whether an instance with these params may continue from a stored
    /// prefix of another's work (see [`PrefixReuse`]); most kinds may not.
    fn prefix_reuse(&self, _params: &Self::Params) -> Option<PrefixReuse> {
        None
    }
}

impl<T: TypedStage> Stage for T {
    fn kind(&self) -> &'static str {
        T::KIND
    }

    fn version(&self) -> u32 {
        T::VERSION
    }

    fn summary(&self) -> &'static str {
        T::SUMMARY
    }

    fn canonical_params(
        &self,
        params: &toml::Table,
        env: &ParamsEnv,
    ) -> Result<serde_json::Value, ParamError> {
        let parsed = parse_params(params)?;
        let canonical = self.validate(parsed, env)?;
        Ok(serde_json::to_value(&canonical).expect("stage params serialize to JSON"))
    }

    fn interface(
        &self,
        params: &serde_json::Value,
        input_names: &[String],
    ) -> Result<Interface, ParamError> {
        let params = from_canonical::<T::Params>(params)
            .map_err(|err| ParamError::new("", err.to_string()))?;
        self.interface_for(&params, input_names)
    }

    fn run(&self, params: &serde_json::Value, ctx: &StageContext) -> anyhow::Result<()> {
        self.execute(&from_canonical(params)?, ctx)
    }

    fn render_output(&self, output: &Path) -> anyhow::Result<Option<String>> {
        TypedStage::render_output(self, output)
    }

    fn prefix_reuse(&self, params: &serde_json::Value) -> Option<PrefixReuse> {
        TypedStage::prefix_reuse(self, &from_canonical::<T::Params>(params).ok()?)
    }
}

/// What a stage may consult while canonicalising its params.
pub struct ParamsEnv {
    /// Folder of the pipeline file that declared the stage; relative paths in
    /// params are resolved against it.
    pub base_dir: PathBuf,
}

/// A param that failed validation. `path` is the dotted field path inside the
/// stage's table (empty for the table itself); the engine turns it into a file
/// location.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamError {
    pub path: String,
    pub message: String,
}

impl ParamError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ParamError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Deserialize a stage's params into its typed struct, reporting the failing
/// field's path (the struct should use `deny_unknown_fields`).
pub fn parse_params<P: DeserializeOwned>(params: &toml::Table) -> Result<P, ParamError> {
    let value = toml::Value::Table(params.clone());
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ParamError::new(path, err.into_inner().to_string())
    })
}

/// Read back canonical params.
fn from_canonical<P: DeserializeOwned>(params: &serde_json::Value) -> anyhow::Result<P> {
    Ok(serde_json::from_value(params.clone())?)
}

/// A stage's declared connections.
#[derive(Debug, Clone, Default)]
pub struct Interface {
    pub inputs: Vec<InputSlot>,
    /// Output names; each becomes one cached artifact (a file or a folder).
    pub outputs: Vec<String>,
    /// Resources an instance holds while it runs, e.g. `gpu = 1`.
    pub resources: BTreeMap<String, u32>,
}

impl Interface {
    /// A stage with no inputs and these outputs (sources: downloads, imports).
    pub fn producing(outputs: &[&str]) -> Self {
        Interface {
            outputs: outputs.iter().map(|o| o.to_string()).collect(),
            ..Interface::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct InputSlot {
    pub name: String,
    /// Takes any number of artifacts (e.g. every grid instance of a stage).
    pub many: bool,
    /// May be left unconnected.
    pub optional: bool,
}

impl InputSlot {
    pub fn one(name: &str) -> Self {
        InputSlot {
            name: name.to_string(),
            many: false,
            optional: false,
        }
    }

    /// A slot that takes one artifact or may be left unconnected.
    pub fn optional(name: &str) -> Self {
        InputSlot {
            optional: true,
            ..InputSlot::one(name)
        }
    }

    /// A required slot that takes any number of artifacts.
    pub fn many(name: &str) -> Self {
        InputSlot {
            many: true,
            ..InputSlot::one(name)
        }
    }
}

/// One artifact handed to a stage.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    /// Read-only path inside the cache (a file or a folder).
    pub path: PathBuf,
    /// Content hash of the artifact.
    pub hash: String,
    /// Instance that produced it, e.g. `train[alpha=0.5,seed=1]`.
    pub producer: String,
    /// Grid values of the producing instance, for collecting stages.
    pub grid: BTreeMap<String, serde_json::Value>,
}

/// How stages that fetch data may reach it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FetchSettings {
    /// Folders laid out as `DIR/HOST/PATH` (a copy of `https://HOST/PATH`),
    /// tried in order before the network.
    pub mirrors: Vec<PathBuf>,
    /// Never use the network.
    pub offline: bool,
}

/// Everything a running stage may touch.
pub struct StageContext {
    pub instance: String,
    /// The instance's cache key: names per-instance state (checkpoints).
    pub key: String,
    pub inputs: BTreeMap<String, Vec<InputArtifact>>,
    /// Folder the outputs are written into (one entry per declared output).
    pub output_dir: PathBuf,
    /// Scratch folder, deleted after the stage.
    pub work_dir: PathBuf,
    /// Folder of the pipeline file, for stage params that name local files.
    pub base_dir: PathBuf,
    /// This stage's log file; external programs should append to it.
    pub log_path: PathBuf,
    /// Devices granted per resource, e.g. `gpu -> [0]`.
    pub devices: BTreeMap<String, Vec<u32>>,
    /// Where data may be fetched from.
    pub fetch: FetchSettings,
    /// Folder that persists across runs for this stage kind: partial
    /// downloads, translation memories, checkpoints. Whatever is kept there
    /// must not change what the stage outputs, only how fast it gets there.
    pub state_dir: PathBuf,
    /// Draws progress bars that cooperate with the engine's display.
    pub progress: indicatif::MultiProgress,
    /// The descriptor of the lock the engine holds on this key, for child
    /// processes to inherit: the lock then lasts until the last of them
    /// exits, even if xlpipe is killed first, so no other run computes the
    /// key while an orphaned command still writes it.
    pub key_lock_fd: Option<i32>,
    /// For a kind with [`PrefixReuse`]: the prefix to resume from and where
    /// to leave this run's own.
    pub prefixes: Option<Prefixes>,
}

impl StageContext {
    /// Where to write output `name`.
    pub fn output(&self, name: &str) -> PathBuf {
        self.output_dir.join(name)
    }

    /// The GPU granted to this instance, if it holds one.
    pub fn gpu(&self) -> Option<u32> {
        self.devices.get("gpu").and_then(|d| d.first()).copied()
    }

    /// All artifacts connected to `slot` (empty if an optional slot is unconnected).
    pub fn inputs(&self, slot: &str) -> &[InputArtifact] {
        self.inputs.get(slot).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The single artifact connected to `slot`.
    pub fn input(&self, slot: &str) -> anyhow::Result<&Path> {
        match self.inputs(slot) {
            [one] => Ok(&one.path),
            [] => anyhow::bail!("input `{slot}` is not connected"),
            many => anyhow::bail!("input `{slot}` has {} artifacts, expected one", many.len()),
        }
    }

    /// A progress bar for `len` units of work, drawn under the run's bar.
    pub fn progress_bar(&self, len: u64, what: &str) -> indicatif::ProgressBar {
        let bar = self.progress.add(indicatif::ProgressBar::new(len));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "  {prefix} {msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(self.instance.clone());
        bar.set_message(what.to_string());
        bar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind with one defaulted field and one checked field.
    struct Echo;

    #[derive(Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct EchoParams {
        words: Vec<String>,
        #[serde(default = "default_repeat")]
        repeat: u32,
    }

    fn default_repeat() -> u32 {
        2
    }

    impl TypedStage for Echo {
        type Params = EchoParams;
        const KIND: &'static str = "echo";
        const VERSION: u32 = 7;
        const SUMMARY: &'static str = "repeat words";

        fn validate(&self, mut p: EchoParams, _env: &ParamsEnv) -> Result<EchoParams, ParamError> {
            if p.repeat == 0 {
                return Err(ParamError::new("repeat", "must be at least 1"));
            }
            p.words.sort();
            Ok(p)
        }

        fn interface_for(&self, p: &EchoParams, _: &[String]) -> Result<Interface, ParamError> {
            Ok(Interface::producing(&[p.words[0].as_str()]))
        }

        fn execute(&self, _p: &EchoParams, _ctx: &StageContext) -> anyhow::Result<()> {
            Ok(())
        }
    }

    fn canonical(toml_text: &str) -> Result<serde_json::Value, ParamError> {
        let env = ParamsEnv {
            base_dir: PathBuf::from("."),
        };
        Echo.canonical_params(&toml_text.parse().unwrap(), &env)
    }

    #[test]
    fn the_json_trait_is_the_typed_stage_with_defaults_written_out_and_validated() {
        let stage: &dyn Stage = &Echo;
        assert_eq!(
            (stage.kind(), stage.version(), stage.summary()),
            ("echo", 7, "repeat words")
        );
        let value = canonical("words = [\"b\", \"a\"]").unwrap();
        assert_eq!(value, serde_json::json!({"words": ["a", "b"], "repeat": 2}));
        let interface = stage.interface(&value, &[]).unwrap();
        assert_eq!(interface.outputs, ["a"]);
        assert!(stage.render_output(Path::new(".")).unwrap().is_none());

        let err = canonical("words = []\nrepeat = 0").unwrap_err();
        assert_eq!(
            (err.path.as_str(), err.message.as_str()),
            ("repeat", "must be at least 1")
        );
        let err = canonical("words = [\"a\"]\nrepeats = 3").unwrap_err();
        assert!(err.message.contains("unknown field `repeats`"), "{err}");
        let err = canonical("words = [1]").unwrap_err();
        assert_eq!(err.path, "words[0]");
        let err = stage
            .interface(&serde_json::json!({"words": "a"}), &[])
            .unwrap_err();
        assert_eq!(err.path, "");
    }
}
