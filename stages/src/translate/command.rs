//! The `command` backend: an external translator program.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::Context;

use super::Translator;

/// Any program that reads texts one per line and writes their translations
/// one per line, in order (Apertium, a Moses server wrapper, a script).
pub(super) struct CommandTranslator {
    pub(super) cmd: String,
}

impl Translator for CommandTranslator {
    fn identity(&self) -> String {
        format!("command:{}", self.cmd)
    }

    fn translate(&mut self, texts: &[String]) -> anyhow::Result<Vec<Option<String>>> {
        let mut input = String::new();
        for t in texts {
            // One text per line: line breaks inside a text become spaces.
            input.push_str(&t.replace(['\n', '\r'], " "));
            input.push('\n');
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{}`", self.cmd))?;
        let mut stdin = child.stdin.take().expect("piped");
        // Write from a thread: the program may fill its stdout before reading all input.
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let output = child.wait_with_output()?;
        writer
            .join()
            .expect("writer thread")
            .context("writing to the translator")?;
        if !output.status.success() {
            anyhow::bail!(
                "`{}` failed ({}): {}",
                self.cmd,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = text.lines().collect();
        anyhow::ensure!(
            lines.len() == texts.len(),
            "`{}` answered {} lines for {} input lines; it must translate line by line",
            self.cmd,
            lines.len(),
            texts.len()
        );
        Ok(lines
            .into_iter()
            .map(|l| (!l.trim().is_empty()).then(|| l.trim().to_string()))
            .collect())
    }
}
