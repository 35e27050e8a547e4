//! Helpers for tests that drive the `xlpipe` binary in a scratch folder.
#![allow(dead_code)] // each test crate uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub struct Scratch {
    pub dir: tempfile::TempDir,
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
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
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
        self.path("cache")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xlpipe"));
        cmd.arg("--cache")
            .arg(self.cache())
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env_remove("XLPIPE_CACHE")
            .env_remove("CUDA_VISIBLE_DEVICES");
        cmd
    }

    pub fn xlpipe(&self, args: &[&str]) -> Ran {
        let out: Output = self.command(args).output().unwrap();
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
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
