//! `import`: bring a local file or folder (a dataset you already have, a
//! model folder) into the cache.
//!
//! ```toml
//! [stages.squad_dev_file]
//! kind = "import"
//! path = "../data/dev-v1.1.json"   # relative to this pipeline file, or absolute
//! sha256 = "…"                     # optional: refuse anything else
//! ```
//!
//! `path` may be a symbolic link (to a file or a folder): it is followed.
//! The content hash of what `path` holds is part of the stage's params, so
//! editing the file reruns what depends on it. The output `files` is a
//! folder: a copy of the imported folder, or one holding the imported file
//! under its own name (the same layout `download` writes).

use std::fs;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use xlpipe_stage_api::content::{copy_tree, hash_path, sha256_file};
use xlpipe_stage_api::{Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct ImportStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    path: String,
    /// Expected sha256 of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    /// Absolute path resolved from `path` (canonical form only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resolved: Option<PathBuf>,
    /// blake3 of the content (canonical form only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

impl TypedStage for ImportStage {
    type Params = ImportParams;
    const KIND: &'static str = "import";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "bring a local file or folder into the cache";

    fn validate(&self, mut p: ImportParams, env: &ParamsEnv) -> Result<ImportParams, ParamError> {
        if p.resolved.is_some() || p.content.is_some() {
            return Err(ParamError::new(
                "",
                "`resolved` and `content` are computed, not set",
            ));
        }
        // A link named as `path` is followed (multi-GB model folders are
        // often links to where the weights live): the key holds the content
        // of what it points to. Links inside an imported folder stay refused
        // (`hash_path` names them): an artifact must be self-contained.
        let named = env.base_dir.join(&p.path);
        let is_link = fs::symlink_metadata(&named).is_ok_and(|m| m.file_type().is_symlink());
        let resolved = if is_link {
            fs::canonicalize(&named).map_err(|err| {
                ParamError::new(
                    "path",
                    format!(
                        "{} is a link that cannot be followed: {err}",
                        named.display()
                    ),
                )
            })?
        } else {
            named
        };
        let content = hash_path(&resolved).map_err(|err| {
            ParamError::new("path", format!("cannot read {}: {err}", resolved.display()))
        })?;
        if let Some(expected) = &p.sha256 {
            let actual = sha256_file(&resolved)
                .map_err(|err| ParamError::new("path", format!("{}: {err}", resolved.display())))?;
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(ParamError::new(
                    "sha256",
                    format!("{} has sha256 {actual}, not {expected}", resolved.display()),
                ));
            }
        }
        p.resolved = Some(resolved);
        p.content = Some(content);
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &ImportParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface::producing(&["files"]))
    }

    fn execute(&self, p: &ImportParams, ctx: &StageContext) -> anyhow::Result<()> {
        let source = p.resolved.as_ref().expect("canonical params are resolved");
        let out = ctx.output("files");
        if source.is_dir() {
            copy_tree(source, &out)?;
        } else {
            fs::create_dir_all(&out)?;
            let name = source
                .file_name()
                .context("imported path has no file name")?;
            fs::copy(source, out.join(name))
                .with_context(|| format!("copying {}", source.display()))?;
        }
        // The source may have changed between planning and now: what was
        // copied must be what the key promised.
        let expected = p.content.as_deref().expect("canonical params are hashed");
        let copied = if source.is_dir() {
            out.clone()
        } else {
            out.join(
                source
                    .file_name()
                    .context("imported path has no file name")?,
            )
        };
        let now = hash_path(&copied)?;
        anyhow::ensure!(
            now == expected,
            "{} changed while the pipeline was running; run again",
            source.display()
        );
        Ok(())
    }
}
