//! Engine semantics through the `xlpipe` binary: caching and reruns, grids,
//! failures, selection flags, crash safety, concurrency, gc.

mod common;

use std::time::{Duration, Instant};

use common::{flip_bit, mount_tmpfs, Scratch};

/// data -> train (alpha x seed) -> report (collects every train instance).
const GRID: &str = r#"
[pipeline]
name = "grid"

[grid]
alpha = [0.0, 0.5, 1.0]
seed = [1, 2]

[stages.data]
kind = "command"
cmd = "seq 1 5 > {outputs.nums}"
outputs = ["nums"]

[stages.train]
kind = "command"
inputs.data = "data"
cmd = "awk '{s+=$1} END {print \"${alpha}\", ${seed}, s}' {inputs.data} > {outputs.model}"
outputs = ["model"]

[stages.report]
kind = "command"
inputs.models = "train[*]"
cmd = "cat {inputs.models} > {outputs.table}"
outputs = ["table"]
"#;

fn report_text(s: &Scratch) -> String {
    let shown = s.ok(&["show", "report"]).stdout;
    let path = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("output   table  "))
        .expect("show lists the output path");
    std::fs::read_to_string(s.path(path)).unwrap()
}

#[test]
fn second_run_executes_nothing_and_grid_instances_share_upstream() {
    let s = Scratch::new();
    s.write("p.toml", GRID);
    let first = s.ok(&["run", "p.toml"]);
    // data once, train 3 x 2, report once.
    assert_eq!(first.counts(), (8, 0), "{first}");
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (0, 8));
    let table = report_text(&s);
    assert_eq!(table.lines().count(), 6, "{table}");
    assert!(table.contains("0.5 2 15"), "{table}");
    let plan = s.ok(&["plan", "p.toml"]).stdout;
    assert!(
        plan.contains("8 instances: 8 cached, 0 to run, 0 pending"),
        "{plan}"
    );
}

#[test]
fn changing_one_param_reruns_exactly_its_dependants() {
    let s = Scratch::new();
    s.write("p.toml", GRID);
    s.ok(&["run", "p.toml"]);
    s.write(
        "p.toml",
        &GRID.replace("cat {inputs.models}", "sort {inputs.models}"),
    );
    let plan = s.ok(&["plan", "p.toml"]).stdout;
    assert!(plan.contains("7 cached, 1 to run"), "{plan}");
    assert!(
        plan.contains("param cmd: \"cat {inputs.models} > {outputs.table}\" -> \"sort"),
        "{plan}"
    );
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (1, 7));
}

#[test]
fn changing_one_grid_value_reruns_only_that_value() {
    let s = Scratch::new();
    s.write("p.toml", GRID);
    s.ok(&["run", "p.toml"]);
    s.write(
        "p.toml",
        &GRID.replace("[0.0, 0.5, 1.0]", "[0.0, 0.5, 2.0]"),
    );
    let plan = s.ok(&["plan", "p.toml"]).stdout;
    assert!(plan.contains("to-run   train[alpha=2.0,seed=1]"), "{plan}");
    assert!(plan.contains("cached   train[alpha=0.5,seed=2]"), "{plan}");
    // Two new train instances, then the report that collects them.
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (3, 5));
}

#[test]
fn identical_rebuilt_output_does_not_rerun_dependants() {
    let s = Scratch::new();
    s.write("p.toml", GRID);
    s.ok(&["run", "p.toml"]);
    // Different command, same bytes out: only `data` reruns.
    s.write("p.toml", &GRID.replace("seq 1 5 >", "seq 5 | cat >"));
    let plan = s.ok(&["plan", "p.toml"]).stdout;
    assert!(
        plan.contains("pending  train[alpha=0.0,seed=1]  after data runs"),
        "{plan}"
    );
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (1, 7));
}

#[test]
fn extends_overrides_and_include_adds() {
    let s = Scratch::new();
    s.write("base.toml", GRID);
    s.write(
        "extra.toml",
        r#"
[stages.extra]
kind = "command"
inputs.data = "data"
cmd = "wc -l < {inputs.data} > {outputs.n}"
outputs = ["n"]
"#,
    );
    s.write(
        "exp/child.toml",
        r#"
[pipeline]
name = "child"
extends = "../base.toml"
include = ["../extra.toml"]

[grid]
seed = [7]

[stages.data]
cmd = "seq 1 3 > {outputs.nums}"
"#,
    );
    let dag = s.ok(&["dag", "exp/child.toml"]).stdout;
    assert!(
        dag.contains("pipeline child (grid: alpha[3] x seed[1])"),
        "{dag}"
    );
    assert!(dag.contains("extra"), "{dag}");
    assert_eq!(s.ok(&["run", "exp/child.toml"]).counts(), (6, 0));
    assert!(report_text(&s).contains("1.0 7 6"));
}

#[test]
fn a_failing_stage_stops_its_dependants_only() {
    let s = Scratch::new();
    s.write(
        "p.toml",
        r#"
[stages.bad]
kind = "command"
cmd = "echo something broke >&2; exit 3"
outputs = ["x"]

[stages.after_bad]
kind = "command"
inputs.x = "bad"
cmd = "cp {inputs.x} {outputs.y}"
outputs = ["y"]

[stages.good]
kind = "command"
cmd = "sleep 0.3; echo fine > {outputs.z}"
outputs = ["z"]
"#,
    );
    let ran = s.xlpipe(&["run", "p.toml"]);
    assert_eq!(ran.code, 1, "{ran}");
    assert!(
        ran.stdout.contains("ran 1, cached 0, failed 1, skipped 1"),
        "{ran}"
    );
    assert!(
        ran.stderr
            .contains("error: bad failed: command exited with exit status: 3"),
        "{ran}"
    );
    let log = ran
        .stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("log: "))
        .expect("the log path is printed");
    let log = std::fs::read_to_string(s.path(log)).unwrap();
    assert!(log.contains("something broke"), "{log}");
    assert!(
        ran.stderr
            .contains("not run because an input failed: after_bad"),
        "{ran}"
    );
    // The independent branch is cached now.
    s.write(
        "p.toml",
        &std::fs::read_to_string(s.path("p.toml"))
            .unwrap()
            .replace("exit 3", "echo ok > {outputs.x}"),
    );
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (2, 1));
}

#[test]
fn only_until_and_force_select_instances() {
    let s = Scratch::new();
    s.write("p.toml", GRID);
    let until = s.ok(&["run", "p.toml", "--until", "train[alpha=0.5,seed=1]"]);
    assert_eq!(until.counts(), (2, 0), "{until}");
    // --only needs its inputs cached.
    let only = s.xlpipe(&["run", "p.toml", "--only", "report"]);
    assert_eq!(only.code, 1, "{only}");
    assert!(
        only.stderr.contains("outside the --only selection"),
        "{only}"
    );
    let only = s.ok(&["run", "p.toml", "--only", "train"]);
    assert_eq!(only.counts(), (5, 2), "{only}");
    assert_eq!(
        s.ok(&["run", "p.toml", "--only", "report"]).counts(),
        (1, 7)
    );
    let forced = s.ok(&["run", "p.toml", "--force", "data"]);
    assert_eq!(forced.counts(), (1, 7), "{forced}");
    let bad = s.xlpipe(&["run", "p.toml", "--only", "trian"]);
    assert!(bad.stderr.contains("did you mean `train`?"), "{bad}");
}

#[test]
fn kill_during_a_stage_leaves_nothing_trusted() {
    let s = Scratch::new();
    let marker = s.path("started");
    let gate = s.path("gate");
    s.write(
        "p.toml",
        &format!(
            r#"
[stages.slow]
kind = "command"
cmd = "echo partial > {{outputs.out}}; touch {marker}; {wait}; echo done >> {{outputs.out}}"
outputs = ["out"]
"#,
            marker = marker.display(),
            wait = wait_for_gate(&gate),
        ),
    );
    let mut child = s.spawn(&["run", "p.toml"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(s.records(), 0, "a killed stage left a record");
    let plan = s.ok(&["plan", "p.toml"]).stdout;
    assert!(plan.contains("to-run   slow"), "{plan}");
    // The killed run's command is still waiting; let it (and the rerun's) end.
    std::fs::write(&gate, "").unwrap();
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (1, 0));
    let shown = s.ok(&["show", "slow"]).stdout;
    let out = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("output   out  "))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(s.path(out)).unwrap(),
        "partial\ndone\n"
    );
}

#[test]
fn two_concurrent_runs_share_one_cache() {
    let s = Scratch::new();
    let counter = s.path("executions");
    let shared = format!(
        r#"
[stages.shared]
kind = "command"
cmd = "echo x >> {counter}; sleep 1; echo shared > {{outputs.out}}"
outputs = ["out"]
"#,
        counter = counter.display()
    );
    let names = ["a", "b", "c", "d"];
    for name in names {
        s.write(
            &format!("{name}.toml"),
            &format!(
                r#"[pipeline]
name = "{name}"
{shared}
[stages.own]
kind = "command"
inputs.in = "shared"
cmd = "cat {{inputs.in}} > {{outputs.out}}; echo {name} >> {{outputs.out}}"
outputs = ["out"]
"#
            ),
        );
    }
    let children: Vec<_> = names
        .iter()
        .map(|name| s.spawn(&["run", &format!("{name}.toml")]))
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The shared key was computed once; the other runs waited and reused
    // it, though its lock file was removed under them when it was done.
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "x\n");
    assert_eq!(s.records(), 5);
    let status = s.ok(&["status"]).stdout;
    assert!(status.contains("a ") && status.contains("d "), "{status}");
    // Every key is complete and unlocked: no lock file is left.
    let locks: Vec<_> = std::fs::read_dir(s.cache().join("locks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(locks.is_empty(), "{locks:?}");
}

#[test]
fn gpu_stages_never_share_a_device() {
    let s = Scratch::new();
    let trace = s.path("trace");
    let mut text = String::from("[grid]\ni = [1, 2, 3]\n");
    text.push_str(&format!(
        r#"
[stages.gpu]
kind = "command"
resources = {{ gpu = 1 }}
cmd = "echo start $CUDA_VISIBLE_DEVICES >> {t}; sleep 0.2; echo end >> {t}; echo ${{i}} > {{outputs.out}}"
outputs = ["out"]
"#,
        t = trace.display()
    ));
    s.write("p.toml", &text);
    s.ok(&["run", "p.toml", "--jobs", "3", "--gpus", "1"]);
    let lines: Vec<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 6);
    for pair in lines.chunks(2) {
        assert_eq!(pair, ["start 0", "end"], "{lines:?}");
    }
    let too_many = s.xlpipe(&["run", "p.toml", "--gpus", "0", "--force", "gpu"]);
    assert!(
        too_many.stderr.contains("needs 1 gpu, but this run has 0"),
        "{too_many}"
    );
}

#[test]
fn damaged_objects_are_detected_and_rebuilt() {
    let s = Scratch::new();
    s.write("p.toml", GRID);
    s.ok(&["run", "p.toml"]);
    let shown = s.ok(&["show", "data"]).stdout;
    let object = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("output   nums  "))
        .unwrap();
    let object = s.path(object);
    // Same size and time: the seal cannot tell, the re-hash on read can.
    flip_bit(&object, 0, 0, true);
    let ran = s.xlpipe(&["run", "p.toml", "--force", "train[alpha=0.0,seed=1]"]);
    assert_eq!(ran.code, 1, "{ran}");
    assert!(ran.stderr.contains("is damaged"), "{ran}");
    // The damaged object was set aside: the next run rebuilds it.
    let plan = s.ok(&["plan", "p.toml"]).stdout;
    assert!(plan.contains("to-run   data"), "{plan}");
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (1, 7));
}

#[test]
fn gc_keeps_what_pipelines_use() {
    let s = Scratch::new();
    s.write("p.toml", GRID);
    s.ok(&["run", "p.toml"]);
    s.write(
        "p.toml",
        &GRID.replace("cat {inputs.models}", "sort -r {inputs.models}"),
    );
    s.ok(&["run", "p.toml"]);
    assert_eq!(s.records(), 9);
    let dry = s.ok(&["gc", "--dry-run"]).stdout;
    assert!(
        dry.contains("would remove 1 records and 1 objects"),
        "{dry}"
    );
    assert_eq!(s.records(), 9);
    s.ok(&["gc"]);
    assert_eq!(s.records(), 8);
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (0, 8));
    s.write("q.toml", "[pipeline]\nname = \"other\"\n[stages.x]\nkind = \"command\"\ncmd = \"echo > {outputs.o}\"\noutputs = [\"o\"]\n");
    s.ok(&["run", "q.toml"]);
    let kept = s.ok(&["gc", "--keep", "other"]).stdout;
    assert!(kept.contains("removed 8 records"), "{kept}");
    assert_eq!(s.records(), 1);
}

#[test]
fn dag_prints_text_and_dot() {
    let s = Scratch::new();
    s.write("p.toml", GRID);
    let text = s.ok(&["dag", "p.toml"]).stdout;
    assert!(
        text.contains("train   command     6 instances  <- data  (varies over alpha, seed)"),
        "{text}"
    );
    assert!(
        text.contains("report  command     1 instance   <- train[*]"),
        "{text}"
    );
    let dot = s.ok(&["dag", "p.toml", "--dot"]).stdout;
    assert!(dot.starts_with("digraph \"grid\""), "{dot}");
    assert!(
        dot.contains("\"train\" -> \"report\" [style=dashed"),
        "{dot}"
    );
    let instances = s.ok(&["dag", "p.toml", "--instances"]).stdout;
    assert!(
        instances.contains("train[alpha=1.0,seed=2]  (data <- data.nums)"),
        "{instances}"
    );
}

#[test]
fn library_stages_run_only_when_needed() {
    let s = Scratch::new();
    s.write(
        "lib.toml",
        r#"
[stages.a]
kind = "command"
cmd = "echo a > {outputs.out}"
outputs = ["out"]
[stages.b]
kind = "command"
inputs.a = "a"
cmd = "cat {inputs.a} > {outputs.out}"
outputs = ["out"]
[stages.unused]
kind = "command"
cmd = "echo never > {outputs.out}"
outputs = ["out"]
"#,
    );
    s.write(
        "p.toml",
        r#"
[pipeline]
name = "uses-a-library"
library = ["lib.toml"]
[stages.mine]
kind = "command"
inputs.b = "b"
cmd = "cat {inputs.b} > {outputs.out}"
outputs = ["out"]
"#,
    );
    let dag = s.ok(&["dag", "p.toml"]).stdout;
    assert!(dag.contains('a') && dag.contains("mine"), "{dag}");
    assert!(!dag.contains("unused"), "{dag}");
    // a, b (needed through b) and mine.
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (3, 0));
    // The library file on its own runs everything.
    assert_eq!(s.ok(&["run", "lib.toml"]).counts(), (1, 2));
}

const DAMAGE: &str = r#"
[pipeline]
name = "damage"

[stages.p]
kind = "command"
cmd = "seq 1 1000 > {outputs.o}"
outputs = ["o"]

[stages.c]
kind = "command"
inputs.x = "p"
cmd = "wc -l < {inputs.x} > {outputs.o}"
outputs = ["o"]
"#;

fn object(s: &Scratch, stage: &str) -> std::path::PathBuf {
    let shown = s.ok(&["show", stage, "--pipeline", "damage"]).stdout;
    s.path(
        shown
            .lines()
            .find_map(|l| l.trim().strip_prefix("output   o  "))
            .unwrap_or_else(|| panic!("no output of {stage}: {shown}")),
    )
}

#[test]
fn damaged_objects_are_noticed_and_rebuilt() {
    let s = Scratch::new();
    s.write("p.toml", DAMAGE);
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (2, 0));
    let expected = std::fs::read(object(&s, "c")).unwrap();

    // A changed output is not a cache hit: plan says so, run rebuilds it.
    flip_bit(&object(&s, "c"), 0, 0, false);
    let plan = s.ok(&["plan", "p.toml"]).stdout;
    assert!(plan.contains("1 to run"), "{plan}");
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (1, 1));
    assert_eq!(std::fs::read(object(&s, "c")).unwrap(), expected);

    // Upstream damage, and --force: the rebuilt object replaces the damaged
    // one, and the consumer stays cached (same content, same key).
    let p = object(&s, "p");
    flip_bit(&p, 0, 0, false);
    let forced = s.ok(&["run", "p.toml", "--force", "p"]);
    assert_eq!(forced.counts(), (1, 1), "{forced}");
    assert_eq!(std::fs::read(&p).unwrap()[..2], *b"1\n");
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (0, 2));

    // Damage that keeps size and time: only re-hashing finds it.
    flip_bit(&p, 0, 0, true);
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (0, 2));
    let verify = s.xlpipe(&["verify"]);
    assert_eq!(verify.code, 1, "{verify}");
    assert!(verify.stdout.contains("1 damaged"), "{verify}");
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (1, 1));
    assert_eq!(std::fs::read(&p).unwrap()[..2], *b"1\n");
    let clean = s.ok(&["verify"]);
    assert!(clean.stdout.contains("0 damaged"), "{clean}");

    // The same damage, then --force: the rebuilt output hashes to the same
    // name, and the damaged object must not be kept on the strength of its
    // seal.
    flip_bit(&p, 0, 0, true);
    let forced = s.ok(&["run", "p.toml", "--force", "p"]);
    assert_eq!(forced.counts(), (1, 1), "{forced}");
    assert_eq!(std::fs::read(&p).unwrap()[..2], *b"1\n");
    let clean = s.ok(&["verify"]);
    assert!(clean.stdout.contains("0 damaged"), "{clean}");
}

#[test]
fn a_failing_grid_prints_lines_per_stage_not_per_instance() {
    let s = Scratch::new();
    let values: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    s.write(
        "p.toml",
        &format!(
            r#"[grid]
i = [{}]

[stages.prep]
kind = "command"
cmd = "echo no data >&2; exit 1"
outputs = ["x"]

[stages.work]
kind = "command"
inputs.x = "prep"
cmd = "echo ${{i}} > {{outputs.y}}"
outputs = ["y"]
"#,
            values.join(", ")
        ),
    );
    let ran = s.xlpipe(&["run", "p.toml"]);
    assert_eq!(ran.code, 1, "{ran}");
    let bytes = ran.stdout.len() + ran.stderr.len();
    assert!(bytes < 2048, "{bytes} bytes of output:\n{ran}");
    assert!(ran.stdout.contains("failed 1, skipped 1000"), "{ran}");
    assert!(
        ran.stderr
            .contains("not run because an input failed: 1000 instances of work"),
        "{ran}"
    );
    assert_eq!(ran.stderr.matches("prep failed").count(), 1, "{ran}");
    let verbose = s.xlpipe(&["run", "p.toml", "-v"]);
    assert!(verbose.stderr.contains("work[i=999]"), "{verbose}");
}

fn lines_of(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn wait_for(what: &str, deadline_s: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(deadline_s);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A shell loop that returns once `gate` exists: commands in these tests
/// wait for the test to let them go, not for a clock, so a slow machine
/// cannot let a command finish before the test has done its part.
fn wait_for_gate(gate: &std::path::Path) -> String {
    format!("while [ ! -e {} ]; do sleep 0.02; done", gate.display())
}

/// A command that logs its start and end to COUNT and ends once GATE exists.
const SLOW: &str = r#"
[stages.slow]
kind = "command"
cmd = "echo start >> COUNT; WAIT; echo end >> COUNT; echo done > {outputs.o}"
outputs = ["o"]
"#;

/// The files of a SLOW command: its log and its gate.
struct Slow {
    count: std::path::PathBuf,
    gate: std::path::PathBuf,
}

impl Slow {
    fn write(s: &Scratch) -> Slow {
        let slow = Slow {
            count: s.path("count"),
            gate: s.path("gate"),
        };
        s.write(
            "p.toml",
            &SLOW
                .replace("COUNT", &slow.count.display().to_string())
                .replace("WAIT", &wait_for_gate(&slow.gate)),
        );
        slow
    }

    fn open_gate(&self) {
        std::fs::write(&self.gate, "").unwrap();
    }
}

/// Run SLOW and SIGKILL xlpipe while its command waits (no chance to
/// clean up), leaving that command running as an orphan until the gate
/// opens.
fn orphan_a_command(s: &Scratch) -> Slow {
    let slow = Slow::write(s);
    let mut first = s.spawn(&["run", "p.toml"]);
    wait_for("the command to start", 30, || {
        lines_of(&slow.count) == ["start"]
    });
    first.kill().unwrap();
    first.wait().unwrap();
    slow
}

#[test]
fn a_killed_runs_command_keeps_its_key_locked_until_it_ends() {
    let s = Scratch::new();
    let slow = orphan_a_command(&s);
    // The orphaned command still holds the key: the rerun waits for it
    // instead of computing the same key beside it.
    let log = s.path("rerun.log");
    let mut rerun = s
        .command(&["run", "p.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("the rerun to wait for the key", 30, || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("another run is computing it"))
    });
    assert_eq!(lines_of(&slow.count), ["start"], "the rerun did not wait");
    slow.open_gate();
    assert!(rerun.wait().unwrap().success());
    assert_eq!(lines_of(&slow.count), ["start", "end", "start", "end"]);
}

#[test]
fn gc_keeps_the_key_lock_of_an_orphaned_command() {
    let s = Scratch::new();
    let slow = orphan_a_command(&s);
    // gc may run (no xlpipe holds the cache), but must not free the key
    // that the orphaned command still computes.
    s.ok(&["gc"]);
    let work_folders = std::fs::read_dir(s.cache().join("tmp")).unwrap().count();
    assert_eq!(work_folders, 1, "gc removed the orphan's work folder");
    slow.open_gate();
    let again = s.ok(&["run", "p.toml"]);
    assert_eq!(again.counts(), (1, 0), "{again}");
    assert_eq!(lines_of(&slow.count), ["start", "end", "start", "end"]);
}

#[test]
fn the_next_run_clears_what_a_killed_run_left_behind() {
    let s = Scratch::new();
    let slow = orphan_a_command(&s);
    // Its work folder is kept while the orphan holds the key; once that
    // ends, nothing owns the folder.
    slow.open_gate();
    wait_for("the orphan to end", 30, || {
        lines_of(&slow.count) == ["start", "end"]
    });
    let locks = s.cache().join("locks");
    wait_for("the orphan to release its key", 30, || {
        std::fs::read_dir(&locks)
            .unwrap()
            .flatten()
            .all(|lock| std::fs::File::open(lock.path()).is_ok_and(|file| file.try_lock().is_ok()))
    });
    let tmp = s.cache().join("tmp");
    assert!(
        std::fs::read_dir(&tmp).unwrap().count() > 0,
        "the killed run left no work folder"
    );
    // A record write cut short by the kill.
    let shard = s.cache().join("records").join("ab");
    std::fs::create_dir_all(&shard).unwrap();
    std::fs::write(shard.join(".partial-1-2-3"), "{\"key\":").unwrap();
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (1, 0));
    let left: Vec<String> = walk_names(&tmp)
        .into_iter()
        .chain(
            walk_names(&s.cache().join("records"))
                .into_iter()
                .filter(|n| n.starts_with(".partial-")),
        )
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn sigterm_ends_the_running_command_and_exits() {
    let s = Scratch::new();
    let slow = Slow::write(&s);
    let mut run = s.spawn(&["run", "p.toml"]);
    wait_for("the command to start", 30, || {
        lines_of(&slow.count) == ["start"]
    });
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(run.id() as i32, libc::SIGTERM);
    }
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    // A command that outlived xlpipe would log its end within its next poll.
    slow.open_gate();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        lines_of(&slow.count),
        ["start"],
        "the command outlived xlpipe"
    );
}

#[test]
fn a_background_child_cannot_change_an_output_after_it_was_hashed() {
    let s = Scratch::new();
    s.write(
        "p.toml",
        r#"
[pipeline]
name = "damage"

[stages.late]
kind = "command"
cmd = "exec 3> {outputs.o}; echo first >&3; ( sleep 1; echo LATE >&3 ) & exit 0"
outputs = ["o"]
"#,
    );
    s.ok(&["run", "p.toml"]);
    std::thread::sleep(Duration::from_millis(1500));
    let shown = s.ok(&["show", "late", "--pipeline", "damage"]).stdout;
    let object = s.path(
        shown
            .lines()
            .find_map(|l| l.trim().strip_prefix("output   o  "))
            .unwrap(),
    );
    assert_eq!(std::fs::read_to_string(object).unwrap(), "first\n");
    assert_eq!(s.ok(&["run", "p.toml"]).counts(), (0, 1));
    assert!(s.ok(&["verify"]).stdout.contains("0 damaged"));
}

#[test]
fn a_full_disk_is_named_and_leaves_no_partial_files() {
    let s = Scratch::new();
    let mount = s.path("small");
    let Some(_unmount) = mount_tmpfs(&mount, "256k") else {
        return;
    };
    // The output takes (nearly) all the space: storing it is a rename, but
    // its seal and record cannot be written.
    s.write(
        "p.toml",
        r#"
[stages.fill]
kind = "command"
cmd = "dd if=/dev/zero of={outputs.o} bs=1k count=250 2>/dev/null; true"
outputs = ["o"]
"#,
    );
    let cache = mount.join("cache");
    let ran = s.xlpipe_on(&cache, &["run", "p.toml"]);
    let stderr = &ran.stderr;
    assert_ne!(ran.code, 0, "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    // The step (storing the output: its seal) and the file are named.
    assert!(
        stderr.contains("fill failed: storing output `o` in the cache"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("writing {}", cache.join("seals").display())),
        "no path: {stderr}"
    );
    let partial = walk_names(&cache)
        .into_iter()
        .filter(|n| n.contains(".partial-"))
        .count();
    assert_eq!(partial, 0, "partial files left behind");
}

fn walk_names(dir: &std::path::Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        names.push(entry.file_name().to_string_lossy().into_owned());
        if entry.path().is_dir() {
            names.extend(walk_names(&entry.path()));
        }
    }
    names
}

/// `import` follows a link named as its `path` (model folders are often
/// links to where the weights live) and keys on what it points to; a link
/// inside the imported folder is still refused, and the error names it.
#[test]
fn import_follows_a_linked_path_but_not_links_inside_it() {
    let s = Scratch::new();
    s.write("real/weights.bin", "w1");
    std::os::unix::fs::symlink(s.path("real"), s.path("model")).unwrap();
    s.write(
        "p.toml",
        r#"
[stages.model]
kind = "import"
path = "model"

[stages.use]
kind = "command"
inputs.model = "model"
cmd = "cat {inputs.model}/weights.bin > {outputs.o}"
outputs = ["o"]
"#,
    );
    let first = s.ok(&["run", "p.toml"]);
    assert_eq!(first.counts(), (2, 0), "{first}");
    // The content behind the link is in the key.
    s.write("real/weights.bin", "w2");
    let changed = s.ok(&["run", "p.toml"]);
    assert_eq!(changed.counts(), (2, 0), "{changed}");
    // A link inside the imported folder: refused, named.
    std::os::unix::fs::symlink(s.path("real/weights.bin"), s.path("real/alias.bin")).unwrap();
    let refused = s.xlpipe(&["plan", "p.toml"]);
    assert_ne!(refused.code, 0, "{refused}");
    assert!(refused.stderr.contains("alias.bin"), "{refused}");
}

/// On a grid, what a run prints grows with its stages, not its instances:
/// no line per finished instance without `-v` (they stay in the stage
/// logs), and one failing instance does not bring hundreds of lines.
#[test]
fn a_grid_run_prints_a_bounded_amount() {
    let s = Scratch::new();
    let values: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    s.write(
        "p.toml",
        &format!(
            r#"
[grid]
i = [{}]

[stages.work]
kind = "command"
cmd = "test ${{i}} != 7 && echo ${{i}} > {{outputs.o}}"
outputs = ["o"]
"#,
            values.join(", ")
        ),
    );
    let ran = s.xlpipe(&["run", "p.toml", "--jobs", "2"]);
    assert_eq!(ran.code, 1, "{ran}");
    assert!(!ran.stderr.contains("finished in"), "{ran}");
    let printed = ran.stdout.len() + ran.stderr.len();
    assert!(printed < 4_000, "{printed} bytes:\n{ran}");
    // The failure is still named.
    assert!(
        ran.stderr.contains("work[i=7]") || ran.stdout.contains("work[i=7]"),
        "{ran}"
    );
    // With -v each instance's line is back.
    let verbose = s.xlpipe(&["run", "p.toml", "--force", "work[i=1]", "-v"]);
    assert!(verbose.stderr.contains("finished in"), "{verbose}");
}

/// A grid runs in the order its file lists the variables, and depth first.
#[test]
fn a_grid_evaluates_each_model_before_it_trains_the_next() {
    let s = Scratch::new();
    let order = s.path("order.txt");
    let order = order.display();
    s.write(
        "p.toml",
        &format!(
            r#"
[grid]
seed = [1, 2]
alpha = [0.0, 1.0]

[stages.train]
kind = "command"
cmd = "echo train ${{seed}} ${{alpha}} >> {order} && echo ${{seed}} ${{alpha}} > {{outputs.model}}"
outputs = ["model"]

[stages.encode]
kind = "command"
inputs.model = "train"
cmd = "echo encode $(cat {{inputs.model}}) >> {order} && cat {{inputs.model}} > {{outputs.vectors}}"
outputs = ["vectors"]

[stages.evaluate]
kind = "command"
inputs.vectors = "encode"
cmd = "echo evaluate $(cat {{inputs.vectors}}) >> {order} && cat {{inputs.vectors}} > {{outputs.scores}}"
outputs = ["scores"]
"#
        ),
    );
    s.ok(&["run", "p.toml", "--jobs", "1"]);
    let ran = std::fs::read_to_string(s.path("order.txt")).unwrap();
    // The file's grid order (seed slowest, though `alpha` sorts first), and
    // each point's model evaluated before the next point trains.
    let expected: Vec<String> = ["1 0.0", "1 1.0", "2 0.0", "2 1.0"]
        .iter()
        .flat_map(|point| ["train", "encode", "evaluate"].map(|step| format!("{step} {point}")))
        .collect();
    assert_eq!(ran.lines().collect::<Vec<_>>(), expected, "{ran}");
}

/// A run opens with one line per stage (what runs, what waits, what is
/// cached), not one per instance.
#[test]
fn a_run_says_per_stage_what_runs_and_what_is_cached() {
    let s = Scratch::new();
    s.write("p.toml", GRID);
    let first = s.ok(&["run", "p.toml"]);
    assert!(first.stderr.contains("data: 1 to run"), "{first}");
    assert!(first.stderr.contains("train: 6 pending"), "{first}");
    assert!(first.stderr.contains("report: 1 pending"), "{first}");
    assert!(!first.stderr.contains("will run"), "{first}");
    let verbose = s.xlpipe(&["run", "p.toml", "--force", "data", "-v"]);
    assert!(
        verbose.stderr.contains("data will run: forced"),
        "{verbose}"
    );
    assert!(verbose.stderr.contains("train: 6 pending"), "{verbose}");
    let again = s.ok(&["run", "p.toml"]);
    assert!(
        again.stderr.contains("cached: data, train, report"),
        "{again}"
    );
}

/// A cache on a read-only file system (an archive of a finished grid, say):
/// what is cached runs, plans, shows and verifies (`report` reads the same
/// way); what would write says so.
#[test]
fn a_read_only_cache_serves_what_is_cached() {
    let s = Scratch::new();
    let mount = s.path("ro");
    let Some(_unmount) = mount_tmpfs(&mount, "4m") else {
        return;
    };
    s.write("p.toml", GRID);
    let cache = mount.join("cache");
    // Exit code, and stdout and stderr as one text.
    let xlpipe = |args: &[&str]| {
        let ran = s.xlpipe_on(&cache, args);
        (Some(ran.code), format!("{}{}", ran.stdout, ran.stderr))
    };
    assert_eq!(xlpipe(&["run", "p.toml"]).0, Some(0));
    let remounted = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&mount)
        .status()
        .unwrap();
    assert!(remounted.success());

    let (code, text) = xlpipe(&["run", "p.toml"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ran 0, cached 8"), "{text}");
    for args in [&["plan", "p.toml"][..], &["show", "report"], &["status"]] {
        let (code, text) = xlpipe(args);
        assert_eq!(code, Some(0), "{args:?}: {text}");
    }
    let (code, text) = xlpipe(&["verify"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("verified 8 objects: 0 damaged"), "{text}");
    let (code, text) = xlpipe(&["gc"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("is read-only: gc cannot write"), "{text}");

    // Something to run: one error naming the cache and the instance.
    s.write("p.toml", &GRID.replace("seq 1 5", "seq 1 6"));
    let (code, text) = xlpipe(&["run", "p.toml"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!(
            "the cache {} is read-only, and data is not cached",
            cache.display()
        )),
        "{text}"
    );
}
