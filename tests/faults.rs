//! The fault-injection suite: random faults, seeded, each followed by the
//! checks of what the cache promises (README, "The cache"):
//!
//! - every object in the store hashes to its name (so every record's
//!   outputs are what was computed);
//! - no key is computed twice at once;
//! - nothing a stage reads is damaged or half-written, and what a run
//!   finally hands over equals what the commands wrote.
//!
//! The commands here keep their own evidence outside the cache: each marks
//! itself running (`mkdir`, which fails if the same work already runs),
//! each keeps a reference copy of what it wrote, and each reader compares
//! its inputs with those copies. Any breach goes to a `violations` file.
//!
//! `XLPIPE_FAULT_SEED` picks the faults (the seed is printed),
//! `XLPIPE_FAULT_TRIES` scales how many tries each fault gets (default:
//! sized for CI), `XLPIPE_TEST_BIN` runs the suite against another build.
//! Run with `--nocapture` to see the per-fault table.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{flip_bit, mount_tmpfs, remount, Scratch};

/// splitmix64: the faults' random numbers, reproducible from one seed.
struct Rng(u64);

impl Rng {
    fn for_fault(fault: &str) -> Rng {
        let seed: u64 = std::env::var("XLPIPE_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20261204);
        println!("{fault}: XLPIPE_FAULT_SEED={seed}");
        let salt = fault
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31) ^ b as u64);
        Rng(seed ^ salt)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How many tries a fault gets: `default` times `XLPIPE_FAULT_TRIES`
/// divided by 10 (so 10 keeps the defaults).
fn tries(default: usize) -> usize {
    let scale: usize = std::env::var("XLPIPE_FAULT_TRIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    (default * scale).div_ceil(10).max(1)
}

/// The evidence the commands keep outside the cache.
struct Evidence {
    running: PathBuf,
    reference: PathBuf,
    violations: PathBuf,
}

impl Evidence {
    fn new(s: &Scratch) -> Evidence {
        let e = Evidence {
            running: s.path("running"),
            reference: s.path("reference"),
            violations: s.path("violations"),
        };
        std::fs::create_dir_all(&e.running).unwrap();
        std::fs::create_dir_all(&e.reference).unwrap();
        e
    }

    /// Shell that marks `name` as being computed, and reports it if it
    /// already is; the mark goes when the shell exits.
    fn mark(&self, name: &str) -> String {
        let (r, v) = (self.running.display(), self.violations.display());
        format!(
            "mkdir {r}/{name} 2>/dev/null || echo \"computed twice at once: {name}\" >> {v}; \
             trap 'rmdir {r}/{name} 2>/dev/null' EXIT; "
        )
    }

    /// Shell that keeps a reference copy of `path` (file or folder) as
    /// `name`, once.
    fn keep(&self, path: &str, name: &str) -> String {
        let r = self.reference.display();
        format!(
            "[ -e {r}/{name} ] || {{ cp -r {path} {r}/.new-$$ && mv {r}/.new-$$ {r}/{name}; }}; "
        )
    }

    /// Shell that reports if `path` differs from the reference copy named
    /// in the file `path/name` (folders) or `name` itself (files).
    fn check(&self, path: &str, name: &str) -> String {
        let (r, v) = (self.reference.display(), self.violations.display());
        format!(
            "diff -r {path} {r}/{name} >/dev/null 2>&1 || \
             echo \"read a damaged or half-written input: {name}\" >> {v}; "
        )
    }

    fn violations(&self) -> Vec<String> {
        std::fs::read_to_string(&self.violations)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Wait until no command of an earlier (killed) run is still computing.
    fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read_dir(&self.running).unwrap().count() > 0 {
            assert!(Instant::now() < deadline, "commands never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What the faults run: `data` -> `work` (a grid of folders) -> `sum`.
/// `salt` changes every key; `late` adds a background writer to `work`
/// that outlives its shell; `bytes` sizes `work`'s output.
struct Grid {
    name: String,
    salt: u64,
    width: usize,
    late: bool,
    bytes: usize,
    /// Pad `data`'s work folder (in the cache's `tmp/`, removed once the
    /// instance is recorded) until (margin) KB are left, so that storing
    /// its output (the seal, the record) meets a full disk; the free space
    /// counted is capped (at the disk's size) so that a rerun on a bigger
    /// disk does not fill that one too.
    leave_free_k: Option<(u64, u64)>,
}

impl Grid {
    fn new(name: &str, salt: u64) -> Grid {
        Grid {
            name: name.into(),
            salt,
            width: 6,
            late: false,
            bytes: 2_000,
            leave_free_k: None,
        }
    }

    fn toml(&self, e: &Evidence) -> String {
        let salt = self.salt;
        let values: Vec<String> = (1..=self.width).map(|i| i.to_string()).collect();
        let pad = match self.leave_free_k {
            Some((k, cap)) => format!(
                "avail=$(df -k --output=avail $(dirname {{outputs.o}}) | tail -1); \
                 [ $avail -le {cap} ] || avail={cap}; \
                 head -c $(( (avail - {k}) * 1024 )) /dev/zero > $XLPIPE_WORK/pad 2>/dev/null || true; "
            ),
            None => String::new(),
        };
        let data = format!(
            "set -e; {mark}{{ echo begin; seq 1 2000; sleep 0.05; echo salt {salt}; echo end; }} > {{outputs.o}}; {pad}{keep}",
            mark = e.mark(&format!("data-{salt}")),
            keep = e.keep("{outputs.o}", &format!("data-{salt}")),
        );
        let late = if self.late {
            // Appends after the shell has exited: one writer still busy
            // when it exits, one that starts later. Only ending the whole
            // process group before hashing keeps their bytes out of a
            // stored object that would then not hash to its name.
            "exec 3>> {outputs.d}/f2; ( yes LATE | head -c 2000000 >&3 ) & \
             ( sleep 0.0${i}; yes LATE | head -c 200000 >&3 ) & "
        } else {
            ""
        };
        let work = format!(
            "set -e; {mark}{check}mkdir {{outputs.d}}; echo work-${{i}}-{salt} > {{outputs.d}}/name; \
             {{ echo begin; head -c {bytes} /dev/zero | tr '\\0' x; echo; echo ${{i}} {salt}; echo end; }} > {{outputs.d}}/f1; \
             sleep 0.0${{i}}; cp {{outputs.d}}/f1 {{outputs.d}}/f2; \
             {keep}{late}exit 0",
            mark = e.mark(&format!("work-${{i}}-{salt}")),
            check = e.check("{inputs.x}", &format!("data-{salt}")),
            bytes = self.bytes,
            keep = if self.late {
                // The late bytes belong to the output: its copy is taken by
                // `sum`, which reads what was stored.
                String::new()
            } else {
                e.keep("{outputs.d}", &format!("work-${{i}}-{salt}"))
            },
        );
        let check_each = if self.late {
            String::new()
        } else {
            e.check("$d", "$(cat $d/name)")
        };
        let sum = format!(
            "set -e; {mark}for d in {{inputs.w}}; do {check_each}cat $d/name $d/f1 >> {{outputs.o}}; done; {keep}",
            mark = e.mark(&format!("sum-{}-{salt}", self.name)),
            keep = e.keep("{outputs.o}", &format!("sum-{}-{salt}", self.name)),
        );
        format!(
            r#"[pipeline]
name = "{name}"

[grid]
i = [{values}]

[stages.data]
kind = "command"
cmd = "{data}"
outputs = ["o"]

[stages.work]
kind = "command"
inputs.x = "data"
cmd = "{work}"
outputs = ["d"]

[stages.sum]
kind = "command"
inputs.w = "work[*]"
cmd = "{sum}"
outputs = ["o"]
"#,
            name = self.name,
            values = values.join(", "),
            data = toml_escape(&data),
            work = toml_escape(&work),
            sum = toml_escape(&sum),
        )
    }

    /// Write the pipeline as `<name>.toml`; returns its file name.
    fn write(&self, s: &Scratch, e: &Evidence) -> String {
        let file = format!("{}.toml", self.name);
        s.write(&file, &self.toml(e));
        file
    }
}

fn toml_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Every breach of the cache's promises in `cache`, as sentences.
fn audit(cache: &Path, e: &Evidence) -> Vec<String> {
    let mut problems: Vec<String> = e.violations();
    for object in sharded(&cache.join("objects")) {
        let name = object.file_name().unwrap().to_string_lossy().into_owned();
        match xlpipe_stage_api::content::hash_path(&object) {
            Ok(hash) if hash == name => {}
            Ok(hash) => problems.push(format!("object {name} hashes to {hash}")),
            Err(err) => problems.push(format!("object {name} unreadable: {err}")),
        }
    }
    for record in sharded(&cache.join("records")) {
        if record.to_string_lossy().contains(".partial-") {
            continue; // a write cut short; never read as a record
        }
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        if serde_json::from_str::<serde_json::Value>(&text).is_err() {
            problems.push(format!("record {} is not whole", record.display()));
        }
    }
    problems
}

/// The entries two levels down (`objects/ab/<hash>`).
fn sharded(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            out.push(entry.path());
        }
    }
    out
}

/// The stored output of `sum` in pipeline `name` equals its reference.
fn final_output_problems(s: &Scratch, e: &Evidence, grid: &Grid) -> Vec<String> {
    let shown = s.xlpipe(&["show", "sum", "--pipeline", &grid.name]).stdout;
    let Some(path) = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("output   o  "))
    else {
        return vec![format!("{}: sum has no output: {shown}", grid.name)];
    };
    let stored = std::fs::read(s.path(path)).unwrap_or_default();
    let reference = std::fs::read(e.reference.join(format!("sum-{}-{}", grid.name, grid.salt)))
        .unwrap_or_default();
    if stored != reference || stored.is_empty() {
        vec![format!(
            "{}: the final output is not what sum wrote",
            grid.name
        )]
    } else {
        Vec::new()
    }
}

/// Tries and failed tries of one fault, printed as a table row, then
/// asserted.
struct Tally {
    fault: &'static str,
    tries: usize,
    failed: Vec<(usize, Vec<String>)>,
}

impl Tally {
    fn new(fault: &'static str) -> Tally {
        Tally {
            fault,
            tries: 0,
            failed: Vec::new(),
        }
    }

    fn record(&mut self, problems: Vec<String>) {
        if !problems.is_empty() {
            self.failed.push((self.tries, problems));
        }
        self.tries += 1;
    }

    fn assert_clean(self, note: &str) {
        println!(
            "| {} | {} tries | {} failed | {note} |",
            self.fault,
            self.tries,
            self.failed.len()
        );
        assert!(
            self.failed.is_empty(),
            "{}: {} of {} tries broke a promise; first: try {} {:#?}",
            self.fault,
            self.failed.len(),
            self.tries,
            self.failed[0].0,
            self.failed[0].1
        );
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

/// A run must succeed; its failure is a problem.
fn must_run(s: &Scratch, args: &[&str]) -> Vec<String> {
    let ran = s.xlpipe(args);
    if ran.code == 0 {
        Vec::new()
    } else {
        vec![format!("`xlpipe {}` failed: {ran}", args.join(" "))]
    }
}

/// `verify` re-hashes everything and must find nothing damaged.
fn verify_clean(s: &Scratch) -> Vec<String> {
    let ran = s.xlpipe(&["verify"]);
    if ran.code == 0 && ran.stdout.contains("0 damaged") {
        Vec::new()
    } else {
        vec![format!("verify: {ran}")]
    }
}

/// SIGKILL a grid run at a random moment and rerun at once: the rerun
/// succeeds, computes no key beside a command the kill orphaned, and
/// everything stored is whole.
#[test]
fn kill_9_at_random_points_then_rerun() {
    let mut rng = Rng::for_fault("kill -9");
    let mut tally = Tally::new("kill -9 during a grid run, rerun, verify");
    let s = Scratch::new();
    let e = Evidence::new(&s);
    let mut interrupted = 0;
    for t in 0..tries(12) {
        // New keys every try; the random moment lands the kill in a
        // command, while storing, or while writing records.
        let grid = Grid::new("kill", t as u64);
        let file = grid.write(&s, &e);
        let jobs = (1 + rng.below(2)).to_string();
        let mut run = s.spawn(&["run", &file, "--jobs", &jobs]);
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        if run.try_wait().unwrap().is_none() {
            interrupted += 1;
        }
        kill(&mut run);
        // Rerun at once: a command the kill orphaned still computes its
        // key, and the rerun must wait for it rather than compute it too.
        let mut problems = must_run(&s, &["run", &file]);
        e.wait_idle();
        problems.extend(audit(&s.cache(), &e));
        if problems.is_empty() {
            problems.extend(final_output_problems(&s, &e, &grid));
            problems.extend(verify_clean(&s));
        }
        tally.record(problems);
    }
    tally.assert_clean(&format!("{interrupted} runs killed before they ended"));
}

/// Several pipelines over the same keys at once, at random offsets: each
/// key computed once, every run succeeds, everything whole.
#[test]
fn concurrent_runs_over_shared_keys() {
    let mut rng = Rng::for_fault("concurrent");
    let mut tally = Tally::new("2-4 concurrent runs over shared keys");
    let s = Scratch::new();
    let e = Evidence::new(&s);
    for t in 0..tries(6) {
        let runs = 2 + rng.below(3) as usize;
        let grids: Vec<Grid> = (0..runs)
            .map(|r| Grid::new(&format!("c{r}"), 100 + t as u64))
            .collect();
        let mut children = Vec::new();
        for grid in &grids {
            let file = grid.write(&s, &e);
            let jobs = (1 + rng.below(2)).to_string();
            children.push(s.spawn(&["run", &file, "--jobs", &jobs]));
            std::thread::sleep(Duration::from_millis(rng.below(150)));
        }
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        for child in children {
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if !out.status.success() {
                problems.push(format!("a concurrent run failed: {stderr}"));
            }
            warnings.extend(
                stderr
                    .lines()
                    .filter(|l| l.contains("WARN"))
                    .map(String::from),
            );
        }
        problems.extend(audit(&s.cache(), &e));
        for grid in &grids {
            problems.extend(final_output_problems(&s, &e, grid));
        }
        if !problems.is_empty() {
            problems.extend(warnings);
        }
        tally.record(problems);
    }
    tally.assert_clean("each key once, all runs succeed");
}

/// `gc` SIGKILLed while it deletes a superseded run's work: the current
/// pipeline stays fully cached, the superseded one reruns correctly.
#[test]
fn gc_killed_mid_deletion() {
    let mut rng = Rng::for_fault("gc");
    let mut tally = Tally::new("gc killed mid-deletion, then run both versions");
    let s = Scratch::new();
    let e = Evidence::new(&s);
    let mut interrupted = 0;
    for t in 0..tries(8) {
        let mut old = Grid::new("gc", 200 + 2 * t as u64);
        old.width = 12;
        old.bytes = 50_000;
        let mut new = Grid::new("gc", old.salt + 1);
        new.width = 12;
        let mut problems = must_run(&s, &["run", &old.write(&s, &e)]);
        problems.extend(must_run(&s, &["run", &new.write(&s, &e)]));
        let mut gc = s.spawn(&["gc"]);
        std::thread::sleep(Duration::from_millis(rng.below(60)));
        if gc.try_wait().unwrap().is_none() {
            interrupted += 1;
        }
        kill(&mut gc);
        // What the current pipeline uses was not touched.
        let current = s.xlpipe(&["run", "gc.toml"]);
        if current.code != 0 || current.counts().0 != 0 {
            problems.push(format!("gc lost work still in use: {current}"));
        }
        problems.extend(audit(&s.cache(), &e));
        // The superseded version, half deleted, reruns to the same result.
        problems.extend(must_run(&s, &["run", &old.write(&s, &e)]));
        problems.extend(audit(&s.cache(), &e));
        if problems.is_empty() {
            problems.extend(final_output_problems(&s, &e, &old));
        }
        tally.record(problems);
    }
    tally.assert_clean(&format!("{interrupted} gc runs killed before they ended"));
}

/// Commands whose background children append to an output after the shell
/// exited: what is stored hashes to its name, and reruns are hits.
#[test]
fn late_writers() {
    let mut rng = Rng::for_fault("late writers");
    let mut tally = Tally::new("late writers in a 20-instance grid");
    let s = Scratch::new();
    let e = Evidence::new(&s);
    for t in 0..tries(4) {
        let mut grid = Grid::new("late", 300 + t as u64);
        grid.width = 20;
        grid.late = true;
        let file = grid.write(&s, &e);
        let jobs = (1 + rng.below(2)).to_string();
        let mut problems = must_run(&s, &["run", &file, "--jobs", &jobs]);
        // Give any writer that escaped time to land.
        std::thread::sleep(Duration::from_millis(300));
        problems.extend(audit(&s.cache(), &e));
        let again = s.xlpipe(&["run", &file]);
        if again.code != 0 || again.counts().0 != 0 {
            problems.push(format!("the rerun was not all hits: {again}"));
        }
        tally.record(problems);
    }
    tally.assert_clean("objects hashed after the whole group ended");
}

/// A cache on a small tmpfs fills up at a random point of a run; once room
/// is made, the rerun completes and everything is whole.
#[test]
fn disk_full_at_random_points() {
    let mut rng = Rng::for_fault("disk full");
    let s = Scratch::new();
    let e = Evidence::new(&s);
    let mount = s.path("small");
    let Some(_unmount) = mount_tmpfs(&mount, "64k") else {
        return;
    };
    let cache = mount.join("cache");
    let mut tally = Tally::new("disk full during a run, then room made");
    let mut failed_runs = 0;
    for t in 0..tries(6) {
        let size_k = 48 + rng.below(400);
        remount(&mount, &format!("{size_k}k"));
        let mut grid = Grid::new("full", 400 + t as u64);
        grid.bytes = 4_000 + rng.below(40_000) as usize;
        // Every other try fills the disk to within a few pages right after
        // `data`'s command, so that storing it (its seal, its record) fails.
        if t % 2 == 1 {
            grid.leave_free_k = Some((rng.below(12), size_k));
        }
        let file = grid.write(&s, &e);
        let ran = s.xlpipe_on(&cache, &["run", &file]);
        let mut problems = Vec::new();
        if ran.code != 0 {
            failed_runs += 1;
            // Named by xlpipe, or in the failing command's own words that
            // xlpipe quotes (dash's `echo` says "I/O error").
            let named =
                ran.stderr.contains("No space left on device") || ran.stderr.contains("I/O error");
            if !named {
                problems.push(format!("a full disk was not named: {ran}"));
            }
        }
        let partial: Vec<String> = walk(&cache)
            .into_iter()
            .filter(|p| {
                // Work folders (`tmp/`) are never trusted and are cleared
                // by the next run; anything else must be whole.
                let inside = Path::new(p).strip_prefix(&cache).unwrap();
                p.contains(".partial-") && !inside.starts_with("tmp")
            })
            .collect();
        if !partial.is_empty() {
            problems.push(format!("partial files left: {partial:?}"));
        }
        problems.extend(audit(&cache, &e));
        remount(&mount, "64m");
        let rerun = s.xlpipe_on(&cache, &["run", &file]);
        if rerun.code != 0 {
            problems.push(format!("the rerun with room failed: {rerun}"));
        }
        problems.extend(audit(&cache, &e));
        tally.record(problems);
        // Start the next try from an empty store, so the disk fills again.
        let _ = std::fs::remove_dir_all(&cache);
    }
    tally.assert_clean(&format!("{failed_runs} runs hit the full disk"));
}

/// One flipped byte in a random stored file (modification time kept or
/// not), then `run`, `run --force <its stage>` or `verify`: nothing reads
/// the damage, and `verify` then `run` always restore a whole cache.
#[test]
fn byte_flips_then_run_force_or_verify() {
    let mut rng = Rng::for_fault("byte flips");
    let mut tally = Tally::new("byte flips (mtime kept or not) then run / --force / verify");
    let s = Scratch::new();
    let e = Evidence::new(&s);
    let grid = Grid::new("flips", 500);
    let file = grid.write(&s, &e);
    s.ok(&["run", &file]);
    let stages = ["data", "work[i=1]", "work[i=4]", "sum"];
    let mut undetected = 0;
    for _ in 0..tries(12) {
        let stage = stages[rng.below(stages.len() as u64) as usize];
        let shown = s.ok(&["show", stage, "--pipeline", "flips"]).stdout;
        let object = s.path(
            shown
                .lines()
                .find_map(|l| {
                    let l = l.trim();
                    l.strip_prefix("output   o  ")
                        .or_else(|| l.strip_prefix("output   d  "))
                })
                .unwrap(),
        );
        let files = if object.is_dir() {
            walk(&object).into_iter().map(PathBuf::from).collect()
        } else {
            vec![object.clone()]
        };
        let target = &files[rng.below(files.len() as u64) as usize];
        let keep_time = rng.below(2) == 0;
        let at = rng.below(std::fs::metadata(target).unwrap().len()) as usize;
        flip_bit(target, at, rng.below(8) as u32, keep_time);
        let action = rng.below(3);
        let mut problems = match action {
            0 => {
                // A plain run either notices (size or time changed) and
                // rebuilds, or trusts the seal (damage that kept both:
                // the documented limit) without anything reading it.
                let ran = s.xlpipe(&["run", &file]);
                if ran.code == 0 && ran.counts().0 == 0 {
                    undetected += 1;
                }
                let mut p = e.violations();
                if ran.code != 0 && !ran.stderr.contains("is damaged") {
                    p.push(format!("run failed without naming the damage: {ran}"));
                }
                if !keep_time && !audit(&s.cache(), &e).is_empty() {
                    p.push("a changed modification time went unnoticed".into());
                }
                p
            }
            1 => {
                let ran = s.xlpipe(&["run", &file, "--force", stage]);
                let mut p = e.violations();
                if ran.code != 0 {
                    p.push(format!("run --force {stage} failed: {ran}"));
                }
                p.extend(audit(&s.cache(), &e));
                p
            }
            _ => {
                let ran = s.xlpipe(&["verify"]);
                let mut p = Vec::new();
                if ran.code != 1 || !ran.stdout.contains("1 damaged") {
                    p.push(format!("verify did not find the flip: {ran}"));
                }
                p.extend(audit(&s.cache(), &e));
                p
            }
        };
        // Whatever the action, verify then run restore a whole cache.
        let _ = s.xlpipe(&["verify"]);
        problems.extend(must_run(&s, &["run", &file]));
        problems.extend(audit(&s.cache(), &e));
        problems.extend(final_output_problems(&s, &e, &grid));
        problems.extend(verify_clean(&s));
        tally.record(problems);
    }
    tally.assert_clean(&format!(
        "{undetected} flips left for verify (size and time kept, nothing read them)"
    ));
}

/// Every file under `dir`, as paths.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            out.extend(walk(&entry.path()));
        } else {
            out.push(entry.path().display().to_string());
        }
    }
    out
}
