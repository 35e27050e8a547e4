//! `download`: fetch files by URL and sha256 into the cache.
//!
//! ```toml
//! [stages.xquad_r]
//! kind = "download"
//! files = [
//!   { url = "https://raw.githubusercontent.com/.../xquad-r/en.json", sha256 = "..." },
//!   { url = "https://raw.githubusercontent.com/.../xquad-r/de.json", sha256 = "..." },
//! ]
//! # or, for one file: url = "...", sha256 = "..."
//! ```
//!
//! The output `files` is a folder holding each file under its URL's last path
//! segment (or `name`). Mirror folders (`--mirror DIR`, `XLPIPE_MIRROR`) laid
//! out as `DIR/HOST/PATH` are tried first, so the same pipeline runs on
//! air-gapped machines; then the network, resuming a partial download and
//! retrying transient failures. Bytes whose sha256 differs are never kept.
//! The checksum is the file's identity, so mirrors and URLs do not enter the
//! cache key beyond the URL itself.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use xlpipe_stage_api::content::{hex, sha256_file};
use xlpipe_stage_api::{Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct DownloadStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadParams {
    /// One file: its URL ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    /// ... and sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    /// Several files.
    #[serde(default)]
    files: Vec<RemoteFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoteFile {
    url: String,
    sha256: String,
    /// File name in the output folder; defaults to the URL's last segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

/// Retries after a transient failure, with these waits.
const BACKOFF: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(4),
    Duration::from_secs(15),
];

impl TypedStage for DownloadStage {
    type Params = DownloadParams;
    const KIND: &'static str = "download";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "fetch files by URL + sha256, from mirror folders or the network";

    /// The canonical form lists every file in `files`, each with its name.
    fn validate(&self, p: DownloadParams, _env: &ParamsEnv) -> Result<DownloadParams, ParamError> {
        let mut files = p.files;
        let single = p.url.is_some();
        match (p.url, p.sha256) {
            (Some(url), Some(sha256)) => files.insert(
                0,
                RemoteFile {
                    url,
                    sha256,
                    name: None,
                },
            ),
            (None, None) => {}
            (Some(_), None) => return Err(ParamError::new("sha256", "`url` needs its `sha256`")),
            (None, Some(_)) => return Err(ParamError::new("url", "`sha256` needs its `url`")),
        }
        if files.is_empty() {
            return Err(ParamError::new(
                "",
                "give `url` and `sha256`, or `files = [{ url = ..., sha256 = ... }]`",
            ));
        }
        let mut names = Vec::new();
        for (i, file) in files.iter_mut().enumerate() {
            // Point errors at what the user wrote: `url = ...` or `files[i]`.
            let at = |field: &str| match (single, i) {
                (true, 0) => field.to_string(),
                (true, _) => format!("files[{}].{field}", i - 1),
                (false, _) => format!("files[{i}].{field}"),
            };
            let (_, path) = split_url(&file.url).ok_or_else(|| {
                ParamError::new(at("url"), "expected an http:// or https:// URL with a path")
            })?;
            file.sha256 = file.sha256.to_ascii_lowercase();
            if file.sha256.len() != 64 || !file.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ParamError::new(at("sha256"), "expected 64 hex digits"));
            }
            let name = file
                .name
                .clone()
                .unwrap_or_else(|| path.rsplit('/').next().unwrap_or_default().to_string());
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(ParamError::new(
                    at("name"),
                    format!("`{name}` is not a usable file name; set `name`"),
                ));
            }
            if names.contains(&name) {
                return Err(ParamError::new(
                    at("name"),
                    format!("two files would be saved as `{name}`; set `name` on one"),
                ));
            }
            file.name = Some(name.clone());
            names.push(name);
        }
        Ok(DownloadParams {
            url: None,
            sha256: None,
            files,
        })
    }

    fn interface_for(
        &self,
        _p: &DownloadParams,
        _input_names: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface::producing(&["files"]))
    }

    fn execute(&self, p: &DownloadParams, ctx: &StageContext) -> anyhow::Result<()> {
        let out = ctx.output("files");
        fs::create_dir_all(&out)?;
        let partial_dir = ctx.state_dir.join("partial");
        fs::create_dir_all(&partial_dir)?;
        for file in &p.files {
            let name = file
                .name
                .as_deref()
                .expect("canonical params name every file");
            fetch(file, &out.join(name), &partial_dir, ctx)?;
        }
        Ok(())
    }
}

/// `https://host/path?query` -> (`host`, `path?query`).
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let (host, path) = rest.split_once('/')?;
    (!host.is_empty() && !path.is_empty()).then_some((host, path))
}

fn fetch(
    file: &RemoteFile,
    dest: &Path,
    partial_dir: &Path,
    ctx: &StageContext,
) -> anyhow::Result<()> {
    let (host, path) = split_url(&file.url).expect("validated URL");
    let mut tried = Vec::new();
    for mirror in &ctx.fetch.mirrors {
        let candidate = mirror.join(host).join(path);
        if !candidate.is_file() {
            tried.push(format!("{} (not there)", candidate.display()));
            continue;
        }
        let hash = copy_hashing(&candidate, dest)?;
        if hash == file.sha256 {
            tracing::info!("{}: from mirror {}", file.url, candidate.display());
            return Ok(());
        }
        fs::remove_file(dest)?;
        tracing::warn!(
            "mirror copy {} has sha256 {hash}, expected {}; ignoring it",
            candidate.display(),
            file.sha256
        );
        tried.push(format!(
            "{} (checksum mismatch: {hash})",
            candidate.display()
        ));
    }
    let mirrors = if tried.is_empty() {
        "no mirrors configured (--mirror DIR or XLPIPE_MIRROR)".to_string()
    } else {
        format!("mirrors tried: {}", tried.join(", "))
    };
    if ctx.fetch.offline {
        anyhow::bail!(
            "{} is in no mirror and the run is offline; {mirrors}",
            file.url
        );
    }
    let partial = partial_dir.join(&file.sha256);
    download_resuming(&file.url, &partial, ctx, None)
        .with_context(|| format!("cannot fetch {}; {mirrors}", file.url))?;
    let hash = sha256_file(&partial)?;
    if hash != file.sha256 {
        fs::remove_file(&partial)?;
        anyhow::bail!(
            "checksum mismatch for {}: expected sha256 {}, got {hash}; the bytes were discarded",
            file.url,
            file.sha256
        );
    }
    fs::rename(&partial, dest).or_else(|_| fs::copy(&partial, dest).map(|_| ()))?;
    Ok(())
}

/// Download `url` into `partial`, continuing what an earlier attempt (or an
/// earlier, killed run) left there, retrying transient failures. `token` is
/// sent as a bearer token (gated Hugging Face models).
pub(crate) fn download_resuming(
    url: &str,
    partial: &Path,
    ctx: &StageContext,
    token: Option<&str>,
) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(120)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut attempt = 0;
    loop {
        match download_once(&agent, url, partial, ctx, token) {
            Ok(()) => return Ok(()),
            Err(err) if err.transient && attempt < BACKOFF.len() => {
                tracing::warn!("{url}: {}; retrying in {:?}", err.error, BACKOFF[attempt]);
                std::thread::sleep(BACKOFF[attempt]);
                attempt += 1;
            }
            Err(err) => return Err(err.error),
        }
    }
}

struct FetchError {
    error: anyhow::Error,
    transient: bool,
}

impl FetchError {
    fn fatal(error: impl Into<anyhow::Error>) -> Self {
        FetchError {
            error: error.into(),
            transient: false,
        }
    }
}

fn download_once(
    agent: &ureq::Agent,
    url: &str,
    partial: &Path,
    ctx: &StageContext,
    token: Option<&str>,
) -> Result<(), FetchError> {
    let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let response = request.call().map_err(|err| FetchError {
        transient: match &err {
            ureq::Error::Timeout(_) => true,
            ureq::Error::Io(io) => transient_io(io),
            _ => false,
        },
        error: err.into(),
    })?;
    let status = response.status().as_u16();
    let append = match status {
        206 => true,
        200 => false,
        416 if have > 0 => {
            // Nothing left to fetch: the partial file is complete.
            return Ok(());
        }
        _ => {
            return Err(FetchError {
                error: anyhow::anyhow!("HTTP status {status}"),
                transient: status == 429 || status >= 500,
            })
        }
    };
    let length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(partial)
        .map_err(FetchError::fatal)?;
    let start = if append { have } else { 0 };
    let bar = ctx.progress_bar(
        start + length.unwrap_or(0),
        url.rsplit('/').next().unwrap_or(url),
    );
    bar.set_position(start);
    let mut body = response.into_body();
    let mut reader = body.as_reader();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buffer).map_err(|err| FetchError {
            transient: transient_io(&err),
            error: err.into(),
        })?;
        if n == 0 {
            break;
        }
        out.write_all(&buffer[..n]).map_err(FetchError::fatal)?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    out.sync_all().map_err(FetchError::fatal)?;
    Ok(())
}

/// A connection that broke off may work next time; one refused or an
/// unknown host will not.
fn transient_io(err: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | TimedOut | Interrupted
    ) || err.get_ref().is_some_and(|inner| {
        inner
            .downcast_ref::<ureq::Error>()
            .is_some_and(|e| matches!(e, ureq::Error::Timeout(_)))
    })
}

/// Copy `from` to `to`, returning the sha256 of the bytes copied.
fn copy_hashing(from: &Path, to: &Path) -> io::Result<String> {
    let mut input = File::open(from)?;
    let mut output = File::create(to)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = input.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        output.write_all(&buffer[..n])?;
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use xlpipe_stage_api::Stage;

    #[test]
    fn splits_urls_into_mirror_paths() {
        assert_eq!(
            split_url("https://raw.githubusercontent.com/a/b/c.json"),
            Some(("raw.githubusercontent.com", "a/b/c.json"))
        );
        assert_eq!(split_url("ftp://x/y"), None);
        assert_eq!(split_url("https://host"), None);
    }

    #[test]
    fn single_and_list_forms_share_one_canonical_form() {
        let env = ParamsEnv {
            base_dir: PathBuf::new(),
        };
        let sha = "AB".repeat(32);
        let single: toml::Table =
            toml::from_str(&format!("url = \"https://h/p/f.json\"\nsha256 = \"{sha}\"")).unwrap();
        let list: toml::Table = toml::from_str(&format!(
            "files = [{{ url = \"https://h/p/f.json\", sha256 = \"{}\", name = \"f.json\" }}]",
            sha.to_lowercase()
        ))
        .unwrap();
        assert_eq!(
            DownloadStage.canonical_params(&single, &env).unwrap(),
            DownloadStage.canonical_params(&list, &env).unwrap()
        );
        let bad: toml::Table = toml::from_str("url = \"https://h/p/f\"\nsha256 = \"12\"").unwrap();
        let err = DownloadStage.canonical_params(&bad, &env).unwrap_err();
        assert_eq!(err.path, "sha256");
    }
}
