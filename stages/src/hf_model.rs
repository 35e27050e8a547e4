//! `hf_model`: a model from the Hugging Face hub by id.
//!
//! ```toml
//! [stages.xlmr]
//! kind = "hf_model"
//! id = "FacebookAI/xlm-roberta-base"
//! revision = "main"        # a branch, tag or commit; pin a commit for reproducible keys
//! ```
//!
//! Files are taken from the standard hub cache (`HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`) when a snapshot there has
//! them, and downloaded from `https://huggingface.co` otherwise (with
//! `HF_TOKEN` if set). `HF_HUB_OFFLINE=1` or `--offline` never downloads.
//! A branch name found in the cache's `refs/` is resolved to its commit, so
//! the cache key follows the snapshot actually used. The output `files` is
//! a Hugging Face folder (config, safetensors weights, tokenizer).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::download::download_resuming;
use xlpipe_stage_api::{Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct HfModelStage;

const REQUIRED: &[&str] = &["config.json", "model.safetensors", "tokenizer.json"];
const OPTIONAL: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
];

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfModelParams {
    id: String,
    #[serde(default = "default_revision")]
    revision: String,
    /// The commit `revision` pointed to in the hub cache (canonical form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    commit: Option<String>,
}

fn default_revision() -> String {
    "main".into()
}

/// The hub cache folder, as huggingface_hub finds it.
fn hub_cache() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return Some(dir.into());
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

fn repo_dir(id: &str) -> Option<PathBuf> {
    hub_cache().map(|c| c.join(format!("models--{}", id.replace('/', "--"))))
}

/// `HF_HUB_OFFLINE` set to anything but 0/false.
fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false" | "False"))
}

impl TypedStage for HfModelStage {
    type Params = HfModelParams;
    const KIND: &'static str = "hf_model";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "a Hugging Face hub model by id (hub cache first, HF_HUB_OFFLINE honoured)";

    fn validate(
        &self,
        mut p: HfModelParams,
        _env: &ParamsEnv,
    ) -> Result<HfModelParams, ParamError> {
        if p.commit.is_some() {
            return Err(ParamError::new(
                "commit",
                "is computed from the hub cache, not set",
            ));
        }
        let parts: Vec<&str> = p.id.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|s| s.is_empty()) {
            return Err(ParamError::new("id", "expected `organisation/name`"));
        }
        let is_commit = p.revision.len() == 40 && p.revision.chars().all(|c| c.is_ascii_hexdigit());
        p.commit = if is_commit {
            Some(p.revision.clone())
        } else {
            repo_dir(&p.id)
                .and_then(|d| std::fs::read_to_string(d.join("refs").join(&p.revision)).ok())
                .map(|s| s.trim().to_string())
        };
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &HfModelParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface::producing(&["files"]))
    }

    fn execute(&self, p: &HfModelParams, ctx: &StageContext) -> anyhow::Result<()> {
        let out = ctx.output("files");
        std::fs::create_dir_all(&out)?;
        let snapshot = p
            .commit
            .as_ref()
            .and_then(|c| repo_dir(&p.id).map(|d| d.join("snapshots").join(c)));
        let offline = ctx.fetch.offline || hub_offline();
        for (file, required) in REQUIRED
            .iter()
            .map(|f| (f, true))
            .chain(OPTIONAL.iter().map(|f| (f, false)))
        {
            let target = out.join(file);
            if let Some(cached) = snapshot
                .as_ref()
                .map(|s| s.join(file))
                .filter(|c| c.is_file())
            {
                // Hub snapshots are symlinks into blobs/: copy the content.
                std::fs::copy(&cached, &target)?;
                continue;
            }
            if offline {
                anyhow::ensure!(
                    !required,
                    "{} is not in the hub cache ({}) and the run is offline (HF_HUB_OFFLINE / --offline); \
                     fetch it once with network access, or import a local folder",
                    file,
                    snapshot.as_ref().map_or("no snapshot".into(), |s| s.display().to_string())
                );
                continue;
            }
            let url = format!(
                "https://huggingface.co/{}/resolve/{}/{}",
                p.id,
                p.commit.as_ref().unwrap_or(&p.revision),
                file
            );
            let partial = ctx.work_dir.join(format!("{file}.partial"));
            match download_resuming(
                &url,
                &partial,
                ctx,
                std::env::var("HF_TOKEN").ok().as_deref(),
            ) {
                Ok(()) => std::fs::rename(&partial, &target)?,
                Err(err) if required => {
                    anyhow::bail!("cannot fetch {file} of {}: {err:#}", p.id)
                }
                Err(err) => tracing::debug!("optional {file} not fetched: {err:#}"),
            }
        }
        Ok(())
    }
}
