//! `command`: run any external program, like a dvc stage's `cmd`.
//!
//! ```toml
//! [stages.tokenize]
//! kind = "command"
//! inputs.text = "download"
//! cmd = "python3 tok.py {inputs.text} > {outputs.tokens}"
//! outputs = ["tokens"]
//! deps = ["tok.py"]          # local files whose content joins the cache key
//! ```
//!
//! The command runs under `sh -c` in the pipeline file's folder. Placeholders
//! `{inputs.NAME}` and `{outputs.NAME}` expand to shell-quoted paths (a slot
//! with several artifacts expands to all of them, space separated); the same
//! paths are in `XLPIPE_IN_<NAME>` / `XLPIPE_OUT_<NAME>`. Its stdout and
//! stderr go to the stage's log file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::process::{Command, Stdio};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct CommandStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandParams {
    /// Shell command line.
    cmd: String,
    /// Names of the outputs the command must create.
    #[serde(default)]
    outputs: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Local files or folders the command reads (scripts, configs). In canonical form this
    /// maps each path to its content hash so editing the file reruns the stage.
    #[serde(default)]
    deps: Deps,
    /// Resources held while running, e.g. `{ gpu = 1 }`.
    #[serde(default)]
    resources: BTreeMap<String, u32>,
}

/// As written: a list of paths. Canonical: path -> blake3 of its content.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(untagged)]
enum Deps {
    #[default]
    None,
    Paths(Vec<String>),
    Hashed(BTreeMap<String, String>),
}

impl TypedStage for CommandStage {
    type Params = CommandParams;
    const KIND: &'static str = "command";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "run an external program with declared inputs and outputs";

    fn validate(&self, mut p: CommandParams, env: &ParamsEnv) -> Result<CommandParams, ParamError> {
        for (i, name) in p.outputs.iter().enumerate() {
            if !is_plain_name(name) {
                return Err(ParamError::new(
                    format!("outputs[{i}]"),
                    format!("output name `{name}` must be letters, digits, `_`, `-` or `.`"),
                ));
            }
        }
        for placeholder in placeholders(&p.cmd) {
            if let Some(name) = placeholder.strip_prefix("outputs.") {
                if !p.outputs.iter().any(|o| o == name) {
                    return Err(ParamError::new(
                        "cmd",
                        format!("`{{{placeholder}}}` names an output not listed in `outputs`"),
                    ));
                }
            }
        }
        p.deps = match p.deps {
            Deps::None => Deps::None,
            Deps::Paths(paths) => {
                let mut hashed = BTreeMap::new();
                for (i, path) in paths.into_iter().enumerate() {
                    let full = env.base_dir.join(&path);
                    let hash = xlpipe_stage_api::content::hash_path(&full).map_err(|err| {
                        ParamError::new(
                            format!("deps[{i}]"),
                            format!("cannot read {}: {err}", full.display()),
                        )
                    })?;
                    hashed.insert(path, hash);
                }
                Deps::Hashed(hashed)
            }
            Deps::Hashed(_) => {
                return Err(ParamError::new("deps", "expected a list of file paths"));
            }
        };
        Ok(p)
    }

    fn interface_for(
        &self,
        p: &CommandParams,
        input_names: &[String],
    ) -> Result<Interface, ParamError> {
        for placeholder in placeholders(&p.cmd) {
            match placeholder.split_once('.') {
                Some(("inputs", name)) if input_names.iter().any(|n| n == name) => {}
                Some(("inputs", name)) => {
                    return Err(ParamError::new(
                        "cmd",
                        format!("`{{inputs.{name}}}` names an input not connected in `inputs`"),
                    ))
                }
                _ => {}
            }
        }
        Ok(Interface {
            inputs: input_names
                .iter()
                .map(|name| InputSlot::many(name))
                .collect(),
            outputs: p.outputs.clone(),
            resources: p.resources.clone(),
        })
    }

    fn execute(&self, p: &CommandParams, ctx: &StageContext) -> anyhow::Result<()> {
        let mut vars = BTreeMap::new();
        let mut command = Command::new("sh");
        for (slot, artifacts) in &ctx.inputs {
            let paths: Vec<String> = artifacts
                .iter()
                .map(|a| a.path.display().to_string())
                .collect();
            command.env(env_name("XLPIPE_IN_", slot), paths.join("\n"));
            let quoted: Vec<String> = paths.iter().map(|p| shell_quote(p)).collect();
            vars.insert(format!("inputs.{slot}"), quoted.join(" "));
        }
        for name in &p.outputs {
            let path = ctx.output(name).display().to_string();
            command.env(env_name("XLPIPE_OUT_", name), &path);
            vars.insert(format!("outputs.{name}"), shell_quote(&path));
        }
        if let Some(ids) = ctx.devices.get("gpu") {
            let inherited = std::env::var("CUDA_VISIBLE_DEVICES").ok();
            command.env(
                "CUDA_VISIBLE_DEVICES",
                visible_gpus(ids, inherited.as_deref()),
            );
        }
        let line = expand_placeholders(&p.cmd, &vars);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&ctx.log_path)
            .with_context(|| format!("opening log {}", ctx.log_path.display()))?;
        tracing::info!("$ {line}");
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        command
            .arg("-c")
            .arg(&line)
            .current_dir(&ctx.base_dir)
            .env("XLPIPE_WORK", &ctx.work_dir)
            .envs(&p.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let status = run_in_own_group(command, ctx.key_lock_fd)?;
        if !status.success() {
            anyhow::bail!(
                "command exited with {status}: {line}\n{}",
                output_tail(&ctx.log_path, log_start)
            );
        }
        for name in &p.outputs {
            if !ctx.output(name).exists() {
                anyhow::bail!("command succeeded but did not create output `{name}`");
            }
        }
        Ok(())
    }
}

/// The last lines the command wrote to its log (from byte `start`), each
/// cut to a window: why a command failed ("No space left on device", a
/// missing file) is nearly always there.
fn output_tail(log: &std::path::Path, start: u64) -> String {
    const LINES: usize = 5;
    const WIDTH: usize = 200;
    let bytes = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(bytes.get(start as usize..).unwrap_or_default());
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "(it printed nothing)".into();
    }
    let mut out = String::from("its output ended with:");
    for line in &lines[lines.len().saturating_sub(LINES)..] {
        let chars: Vec<char> = line.chars().collect();
        let shown = if chars.len() <= WIDTH {
            line.to_string()
        } else {
            // The reason usually ends the line ("…: No space left on
            // device"), after long paths: keep both ends.
            let head: String = chars[..WIDTH / 3].iter().collect();
            let tail: String = chars[chars.len() - WIDTH * 2 / 3..].iter().collect();
            format!("{head} … {tail}")
        };
        out.push_str(&format!("\n  | {shown}"));
    }
    out
}

/// Process groups of the commands running now, for [`end_live_commands`].
static LIVE_GROUPS: std::sync::Mutex<BTreeSet<i32>> = std::sync::Mutex::new(BTreeSet::new());

/// Run `command` as the leader of a process group of its own, holding the
/// key's lock (inherited), and end whatever it left running in that group
/// when it exits: a background child writing on after the command returned
/// would change outputs after they were hashed.
fn run_in_own_group(
    mut command: Command,
    key_lock_fd: Option<i32>,
) -> anyhow::Result<std::process::ExitStatus> {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    if let Some(fd) = key_lock_fd {
        // SAFETY: between fork and exec the closure only calls fcntl(2),
        // which is async-signal-safe, on a descriptor the parent holds open.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = command.spawn().with_context(|| "starting `sh`")?;
    let group = child.id() as i32;
    LIVE_GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(group);
    let status = child.wait();
    // SAFETY: killpg(2) on the group this function created.
    unsafe {
        libc::killpg(group, libc::SIGKILL);
    }
    // SIGKILL ends a process only when it leaves the kernel: one blocked in
    // a write can still finish it. The outputs are hashed once no member
    // of the group is left to write.
    let gone = wait_for_group_end(group, std::time::Duration::from_secs(30));
    LIVE_GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&group);
    let status = status?;
    if let Err(alive) = gone {
        anyhow::bail!(
            "processes {alive:?} of the command's process group {group} still run 30 s after \
             SIGKILL: its outputs are not trusted"
        );
    }
    Ok(status)
}

/// Wait until no process of `group` is left but zombies (which cannot
/// write); `Err` with the live ones at the deadline.
fn wait_for_group_end(group: i32, limit: std::time::Duration) -> Result<(), Vec<i32>> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let alive = live_members(group);
        if alive.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(alive);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The processes of `group` that are not zombies, from /proc/PID/stat
/// (`pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses,
/// so fields are counted after its last `)`).
fn live_members(group: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut alive = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue; // ended meanwhile
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(pgrp)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        if pgrp.parse::<i32>() == Ok(group) && !matches!(*state, "Z" | "X") {
            alive.push(pid);
        }
    }
    alive
}

/// End every running command's process group (SIGTERM, then SIGKILL after
/// a grace period): what xlpipe does when it is interrupted. Commands run
/// in groups of their own, so a terminal's Ctrl-C reaches only xlpipe.
pub fn end_live_commands() {
    let groups: Vec<i32> = LIVE_GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect();
    if groups.is_empty() {
        return;
    }
    for &group in &groups {
        // SAFETY: killpg(2) on groups this process created.
        unsafe {
            libc::killpg(group, libc::SIGTERM);
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    // SAFETY: killpg with signal 0 only asks whether the group exists.
    let alive = |g: i32| unsafe { libc::killpg(g, 0) } == 0;
    while groups.iter().any(|&g| alive(g)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for &group in &groups {
        // SAFETY: as above.
        unsafe {
            libc::killpg(group, libc::SIGKILL);
        }
    }
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn env_name(prefix: &str, name: &str) -> String {
    let tail: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}{tail}")
}

/// `{inputs.x}` / `{outputs.y}` placeholders in a command line.
fn placeholders(cmd: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = cmd;
    while let Some(start) = rest.find('{') {
        rest = &rest[start + 1..];
        if let Some(end) = rest.find('}') {
            let inner = &rest[..end];
            if inner.starts_with("inputs.") || inner.starts_with("outputs.") {
                found.push(inner);
            }
        }
    }
    found
}

/// `CUDA_VISIBLE_DEVICES` for a command granted GPUs `ids`. The ids count
/// the GPUs this process sees: where it sees only some of them (a Slurm
/// allocation sets `CUDA_VISIBLE_DEVICES=2,3`), id 0 is the first of those,
/// not the machine's GPU 0.
fn visible_gpus(ids: &[u32], inherited: Option<&str>) -> String {
    let seen: Vec<&str> = inherited
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let ids: Vec<String> = ids
        .iter()
        .map(|&id| match seen.get(id as usize) {
            Some(device) => device.to_string(),
            None => id.to_string(),
        })
        .collect();
    ids.join(",")
}

fn expand_placeholders(cmd: &str, vars: &BTreeMap<String, String>) -> String {
    let mut line = cmd.to_string();
    for (name, value) in vars {
        line = line.replace(&format!("{{{name}}}"), value);
    }
    line
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlpipe_stage_api::Stage;

    #[test]
    fn a_failure_quotes_the_end_of_what_the_command_printed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let earlier = "from an earlier attempt\n";
        let long = format!("{}: No space left on device", "x".repeat(500));
        let text: String = (1..=7).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, format!("{earlier}{text}{long}\n")).unwrap();
        let tail = output_tail(&log, earlier.len() as u64);
        let quoted: Vec<&str> = tail.lines().skip(1).collect();
        assert_eq!(quoted.len(), 5, "{tail}");
        assert_eq!(quoted[0], "  | line 4");
        assert!(quoted[4].len() < 220, "{tail}");
        assert!(quoted[4].contains("x … x"), "{tail}");
        assert!(quoted[4].ends_with(": No space left on device"), "{tail}");
        assert!(!tail.contains("earlier"), "{tail}");
        std::fs::write(&log, earlier).unwrap();
        assert_eq!(
            output_tail(&log, earlier.len() as u64),
            "(it printed nothing)"
        );
    }

    #[test]
    fn a_group_has_ended_when_only_zombies_are_left() {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let group = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while live_members(group).len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                live_members(group)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let short = std::time::Duration::from_millis(100);
        assert_eq!(wait_for_group_end(group, short).unwrap_err().len(), 3);
        // SAFETY: the group this test created.
        unsafe {
            libc::killpg(group, libc::SIGKILL);
        }
        // The leader is our child: a zombie until reaped, and not counted.
        wait_for_group_end(group, std::time::Duration::from_secs(10)).unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn finds_placeholders_and_ignores_shell_braces() {
        let cmd = "for f in {inputs.a}; do echo ${HOME} {x}; done > {outputs.b}";
        assert_eq!(placeholders(cmd), vec!["inputs.a", "outputs.b"]);
    }

    #[test]
    fn granted_gpus_index_the_visible_ones() {
        assert_eq!(visible_gpus(&[0, 1], None), "0,1");
        assert_eq!(visible_gpus(&[0], Some("2,3")), "2");
        assert_eq!(visible_gpus(&[1], Some("2, 3")), "3");
        assert_eq!(visible_gpus(&[0], Some("")), "0");
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
    }

    #[test]
    fn canonical_form_fills_defaults_and_rejects_unknown_fields() {
        let env = ParamsEnv {
            base_dir: std::env::temp_dir(),
        };
        let table: toml::Table = toml::from_str(r#"cmd = "true""#).unwrap();
        let canon = CommandStage.canonical_params(&table, &env).unwrap();
        assert_eq!(canon["outputs"], serde_json::json!([]));
        let table: toml::Table = toml::from_str("cmd = \"true\"\ncmd_typo = 1").unwrap();
        let err = CommandStage.canonical_params(&table, &env).unwrap_err();
        assert!(err.message.contains("unknown field `cmd_typo`"), "{err}");
    }

    #[test]
    fn rejects_output_placeholder_not_declared() {
        let env = ParamsEnv {
            base_dir: std::env::temp_dir(),
        };
        let table: toml::Table = toml::from_str(r#"cmd = "echo > {outputs.x}""#).unwrap();
        let err = CommandStage.canonical_params(&table, &env).unwrap_err();
        assert_eq!(err.path, "cmd");
    }
}
