//! The Slurm executor against a real single-node Slurm (slurmctld + slurmd +
//! munge on this machine, started by `tests/slurm/cluster.sh`), never a fake
//! `sbatch`.
//!
//! Without Slurm installed these tests say so and pass, unless
//! `XLPIPE_REQUIRE_SLURM` is set (as `.ci/run` does after installing it).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{Ran, Scratch};

/// A private cluster, stopped when dropped.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(name: &str) -> Option<Cluster> {
        let installed = ["slurmctld", "slurmd", "sbatch", "munged"].iter().all(|p| {
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {p}"))
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !installed {
            assert!(
                std::env::var_os("XLPIPE_REQUIRE_SLURM").is_none(),
                "XLPIPE_REQUIRE_SLURM is set, but slurm-wlm / munge are not installed"
            );
            eprintln!("skipped: Slurm is not installed (apt-get install slurm-wlm munge)");
            return None;
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("slurm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm/cluster.sh");
        let out = Command::new(&script)
            .arg("start")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the test cluster did not start:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Cluster {
            conf: dir.join("slurm.conf"),
            dir,
        })
    }

    fn tool(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (job id, state, name) of every job the controller knows.
    fn jobs(&self) -> Vec<(u64, String, String)> {
        self.tool(
            "squeue",
            &["--noheader", "--states=all", "--format=%i %T %j"],
        )
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((
                fields.next()?.parse().ok()?,
                fields.next()?.to_string(),
                fields.next()?.to_string(),
            ))
        })
        .collect()
    }

    /// Wait until a job named `name` is in `state`; its id.
    fn wait_for(&self, name: &str, state: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self
                .jobs()
                .into_iter()
                .find(|(_, s, n)| n == name && s == state);
            if let Some((id, _, _)) = found {
                return id;
            }
            assert!(
                Instant::now() < deadline,
                "no job {name} in state {state}: {:?}",
                self.jobs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn xlpipe(&self, s: &Scratch, args: &[&str]) -> Ran {
        self.command(s, args).output().unwrap().into()
    }

    fn spawn(&self, s: &Scratch, args: &[&str]) -> Child {
        self.command(s, args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn command(&self, s: &Scratch, args: &[&str]) -> Command {
        let mut command = s.command(args);
        command
            .env("SLURM_CONF", &self.conf)
            .env("XLPIPE_SLURM_POLL", "0.3");
        command
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm/cluster.sh");
        let _ = Command::new(script).arg("stop").arg(&self.dir).status();
    }
}

fn finished(child: Child) -> Ran {
    child.wait_with_output().unwrap().into()
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Record file names (the keys) in a cache.
fn keys(cache: &Path) -> Vec<String> {
    let mut keys: Vec<String> = walk(&cache.join("records"))
        .into_iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    keys.sort();
    keys
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

const GRID_PIPELINE: &str = r#"
[pipeline]
name = "on-slurm"

[grid]
n = [1, 2, 3]

[executors.slurm]
partition = "debug"
time = "00:10:00"
setup = ["export FROM_SETUP=yes"]

[executors.gpu]
type = "slurm"
cpus_per_task = 1

[stages.base]
kind = "command"
cmd = "echo base > {outputs.out}; echo base $SLURM_JOB_ID $FROM_SETUP >> where.txt"
outputs = ["out"]

[stages.square]
kind = "command"
inputs.base = "base"
cmd = "expr ${n} '*' ${n} > {outputs.out}; cat {inputs.base} >> {outputs.out}; echo square $SLURM_JOB_ID >> where.txt"
outputs = ["out"]

[stages.on_gpu]
kind = "command"
executor = "gpu"
resources = { gpu = 1 }
inputs.base = "base"
cmd = "cp {inputs.base} {outputs.out}; echo gpu $SLURM_JOB_ID $CUDA_VISIBLE_DEVICES >> where.txt"
outputs = ["out"]

[stages.total]
kind = "command"
executor = "local"
inputs.parts = "square[*]"
inputs.gpu = "on_gpu"
cmd = "cat {inputs.parts} {inputs.gpu} > {outputs.out}; echo total $SLURM_JOB_ID >> where.txt"
outputs = ["out"]
"#;

#[test]
fn instances_run_as_slurm_jobs_with_the_keys_of_a_local_run() {
    let Some(cluster) = Cluster::start("grid") else {
        return;
    };
    let s = Scratch::new();
    s.write("p.toml", GRID_PIPELINE);
    let ran = cluster.xlpipe(&s, &["run", "p.toml", "--executor", "slurm"]);
    assert_eq!(ran.code, 0, "{ran}");
    assert!(ran.stdout.contains("ran 6 (5 as Slurm jobs)"), "{ran}");

    // Where each instance ran: grid stages and the GPU one in jobs (the GPU
    // one granted the node's GPU), the collector here.
    let mut lines: Vec<String> = std::fs::read_to_string(s.path("where.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    assert_eq!(lines.len(), 6, "{lines:?}");
    let job_id = |line: &str| line.split_whitespace().nth(1).map(|id| id.parse::<u64>());
    assert!(
        lines[0].starts_with("base ") && lines[0].ends_with(" yes"),
        "{lines:?}"
    );
    assert!(matches!(job_id(&lines[0]), Some(Ok(_))), "{lines:?}");
    assert!(
        lines[1].starts_with("gpu ") && lines[1].ends_with(" 0"),
        "{lines:?}"
    );
    for line in &lines[2..5] {
        assert!(line.starts_with("square "), "{lines:?}");
        assert!(matches!(job_id(line), Some(Ok(_))), "{lines:?}");
    }
    assert_eq!(lines[5].trim(), "total", "{lines:?}");

    let total = s.ok(&["show", "total"]).stdout;
    let out = total
        .lines()
        .find_map(|l| l.trim().strip_prefix("output   out  "))
        .unwrap_or_else(|| panic!("no output path in {total}"));
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        "1\nbase\n4\nbase\n9\nbase\nbase\n"
    );
    // Job folders go once their records are in.
    assert_eq!(
        std::fs::read_dir(s.cache().join("slurm")).unwrap().count(),
        0
    );

    // Where an instance ran is not part of its key.
    let local = Scratch::new();
    local.write("p.toml", &GRID_PIPELINE.replace("executor = \"gpu\"\n", ""));
    local.ok(&["run", "p.toml"]);
    assert_eq!(keys(&s.cache()), keys(&local.cache()));

    let again = cluster.xlpipe(&s, &["run", "p.toml", "--executor", "slurm"]);
    assert_eq!(again.code, 0, "{again}");
    assert_eq!(again.counts(), (0, 6), "{again}");
}

/// Its slurm job runs until the test writes `go` (a gate, not a clock: a
/// slow machine cannot let the job end before the test has done its part).
const SLOW_PIPELINE: &str = r#"
[pipeline]
name = "slow"

[stages.slow]
kind = "command"
executor = "slurm"
cmd = "while [ ! -e go ]; do sleep 0.1; done; echo done > {outputs.out}"
outputs = ["out"]

[stages.after]
kind = "command"
inputs.slow = "slow"
cmd = "cp {inputs.slow} {outputs.out}"
outputs = ["out"]
"#;

#[test]
fn a_failed_job_reports_its_error_and_a_lost_one_is_resubmitted() {
    let Some(cluster) = Cluster::start("fail") else {
        return;
    };
    let s = Scratch::new();
    s.write(
        "bad.toml",
        r#"
[stages.bad]
kind = "command"
executor = "slurm"
cmd = "echo something is wrong >&2; exit 3"
outputs = ["out"]

[stages.after]
kind = "command"
inputs.bad = "bad"
cmd = "cp {inputs.bad} {outputs.out}"
outputs = ["out"]
"#,
    );
    let ran = cluster.xlpipe(&s, &["run", "bad.toml"]);
    assert_eq!(ran.code, 1, "{ran}");
    assert!(ran.stderr.contains("bad failed: Slurm job"), "{ran}");
    assert!(ran.stderr.contains("ended FAILED"), "{ran}");
    assert!(ran.stderr.contains("exit status: 3"), "{ran}");
    assert!(
        ran.stderr
            .contains("not run because an input failed: after"),
        "{ran}"
    );
    assert_eq!(s.records(), 0);
    // The stage's own log, written on the node, is where the error points.
    let log = ran
        .stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("log: "))
        .unwrap_or_else(|| panic!("no log in {ran}"));
    assert!(std::fs::read_to_string(log)
        .unwrap()
        .contains("something is wrong"));

    // A job that dies under us (scancel stands in for a lost node) leaves
    // nothing trusted, and the next run submits it again.
    s.write("slow.toml", SLOW_PIPELINE);
    let run = cluster.spawn(&s, &["run", "slow.toml"]);
    let job = cluster.wait_for("xlpipe:slow", "RUNNING");
    cluster.tool("scancel", &[&job.to_string()]);
    let ran = finished(run);
    assert_eq!(ran.code, 1, "{ran}");
    assert!(
        ran.stderr
            .contains(&format!("Slurm job {job} ended CANCELLED without a result")),
        "{ran}"
    );
    assert_eq!(s.records(), 0);
    s.write("go", "");
    let ran = cluster.xlpipe(&s, &["run", "slow.toml"]);
    assert_eq!(ran.code, 0, "{ran}");
    assert!(ran.stdout.contains("ran 2 (1 as Slurm jobs)"), "{ran}");
}

#[test]
fn interrupting_a_run_cancels_its_jobs() {
    let Some(cluster) = Cluster::start("cancel") else {
        return;
    };
    let s = Scratch::new();
    s.write("slow.toml", SLOW_PIPELINE);
    let run = cluster.spawn(&s, &["run", "slow.toml"]);
    let job = cluster.wait_for("xlpipe:slow", "RUNNING");
    signal(&run, "INT");
    let ran = finished(run);
    assert_eq!(ran.code, 130, "{ran}");
    assert!(
        ran.stderr
            .contains(&format!("cancelling 1 Slurm job(s): {job}")),
        "{ran}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster
        .jobs()
        .iter()
        .any(|(id, state, _)| *id == job && state == "CANCELLED")
    {
        assert!(Instant::now() < deadline, "{:?}", cluster.jobs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(s.records(), 0);
}

#[test]
fn a_rerun_after_a_crash_adopts_the_running_job() {
    let Some(cluster) = Cluster::start("adopt") else {
        return;
    };
    let s = Scratch::new();
    s.write("slow.toml", SLOW_PIPELINE);
    let run = cluster.spawn(&s, &["run", "slow.toml"]);
    let job = cluster.wait_for("xlpipe:slow", "RUNNING");
    // The engine dies without a chance to cancel anything.
    signal(&run, "KILL");
    finished(run);
    // The job may end only once the rerun has adopted it.
    let log = s.path("rerun.log");
    let rerun = cluster
        .command(&s, &["run", "slow.toml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).is_ok_and(|text| text.contains("adopting Slurm job")) {
        assert!(
            Instant::now() < deadline,
            "the rerun adopted nothing: {:?}",
            std::fs::read_to_string(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.write("go", "");
    let ran = finished(rerun);
    assert_eq!(ran.code, 0, "{ran}");
    assert!(
        ran.stdout
            .contains("ran 2 (0 as Slurm jobs, 1 adopted from an earlier run)"),
        "{ran}"
    );
    let slow_jobs: Vec<u64> = cluster
        .jobs()
        .into_iter()
        .filter(|(_, _, name)| name == "xlpipe:slow")
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(slow_jobs, [job], "the key was submitted once");
    let again = cluster.xlpipe(&s, &["run", "slow.toml"]);
    assert_eq!(again.counts(), (0, 2), "{again}");
}

#[test]
fn max_jobs_caps_the_jobs_in_the_queue() {
    let Some(cluster) = Cluster::start("cap") else {
        return;
    };
    let s = Scratch::new();
    s.write(
        "p.toml",
        r#"
[grid]
n = [1, 2, 3]

[executors.slurm]
max_jobs = 1

[stages.step]
kind = "command"
cmd = "echo start ${n} $(date +%s%N) >> t.txt; sleep 1; echo end ${n} $(date +%s%N) >> t.txt; echo > {outputs.out}"
outputs = ["out"]
"#,
    );
    let ran = cluster.xlpipe(&s, &["run", "p.toml", "--executor", "slurm"]);
    assert_eq!(ran.code, 0, "{ran}");
    assert!(ran.stdout.contains("ran 3 (3 as Slurm jobs)"), "{ran}");
    // One at a time: every start follows the previous end.
    let events: Vec<(String, u128)> = std::fs::read_to_string(s.path("t.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[2].parse().unwrap())
        })
        .collect();
    let mut sorted = events.clone();
    sorted.sort_by_key(|e| e.1);
    let kinds: Vec<&str> = sorted.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        kinds,
        ["start", "end", "start", "end", "start", "end"],
        "{events:?}"
    );
}
