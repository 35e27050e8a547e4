//! `xlpipe bench engine`: how long the engine itself takes on a big grid,
//! as a ratio against a baseline measured in the same run. (The stages'
//! benchmarks, `bench search`, `train` and `translate`, live beside the
//! stages they measure, in `xlpipe_stages`.)
//!
//! Generates a grid of trivial `command` stages plus one collecting stage,
//! runs it once, then times the no-op rerun (everything cached) and `plan`.
//! The baseline, measured in the same run, is the floor any cache lookup must
//! pay: reading and parsing every record file once.

use std::fmt::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;

use indicatif::{MultiProgress, ProgressDrawTarget};

use crate::cache::{Cache, Record};
use crate::plan::plan;
use crate::registry::open_pipeline;
use crate::run::{run, RunOptions};
use xlpipe_stages::bench::median_ms;

/// The no-op rerun target from the engine's design brief.
const TARGET_MS: f64 = 100.0;

pub fn engine(instances: usize, repeat: usize) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("xlpipe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = engine_in(&dir, instances, repeat.max(1));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn engine_in(dir: &Path, instances: usize, repeat: usize) -> anyhow::Result<String> {
    let (rows, cols) = if instances.is_multiple_of(10) && instances >= 10 {
        (instances / 10, 10)
    } else {
        (instances, 1)
    };
    let list = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let file = dir.join("grid.toml");
    std::fs::write(
        &file,
        format!(
            r#"[pipeline]
name = "bench-grid"

[grid]
x = [{}]
y = [{}]

[stages.leaf]
kind = "command"
cmd = "echo ${{x}} ${{y}} > {{outputs.out}}"
outputs = ["out"]

[stages.collect]
kind = "command"
inputs.leaves = "leaf[*]"
cmd = "cat {{inputs.leaves}} > {{outputs.out}}"
outputs = ["out"]
"#,
            list(rows),
            list(cols)
        ),
    )?;
    let cache_dir = dir.join("cache");
    let hidden = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
    let options = RunOptions {
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        gpus: 1,
        ..RunOptions::default()
    };

    let exe = std::env::current_exe()?;
    let xlpipe_run = || {
        let mut command = Command::new(&exe);
        command
            .arg("--cache")
            .arg(&cache_dir)
            .arg("run")
            .arg(&file)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null());
        command
    };
    // The cold run in a quiet subprocess: a thousand stages log two thousand lines.
    let clock = Instant::now();
    let status = xlpipe_run().status().context("running xlpipe")?;
    anyhow::ensure!(status.success(), "the cold run failed");
    let cold_s = clock.elapsed().as_secs_f64();
    let total = open_pipeline(&file)?.instances.len();

    let noop = median_ms(repeat, || {
        let pipeline = open_pipeline(&file)?;
        let summary = run(&pipeline, &Cache::open(&cache_dir)?, &options, &hidden)?;
        anyhow::ensure!(summary.executed.is_empty(), "no-op rerun executed stages");
        Ok(())
    })?;
    let planning = median_ms(repeat, || {
        let pipeline = open_pipeline(&file)?;
        let forced = vec![false; pipeline.instances.len()];
        plan(&pipeline, &Cache::open(&cache_dir)?, &forced);
        Ok(())
    })?;
    let floor = median_ms(repeat, || {
        for shard in std::fs::read_dir(cache_dir.join("records"))? {
            for entry in std::fs::read_dir(shard?.path())? {
                let bytes = std::fs::read(entry?.path())?;
                serde_json::from_slice::<Record>(&bytes)?;
            }
        }
        Ok(())
    })?;
    let command = median_ms(repeat, || {
        let status = xlpipe_run().status().context("running xlpipe")?;
        anyhow::ensure!(status.success(), "xlpipe run failed");
        Ok(())
    })?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "engine benchmark: {rows}x{cols} grid of command stages + 1 collector = {total} instances, {} jobs, median of {repeat}",
        options.jobs
    );
    let _ = writeln!(out, "  cold run                           {cold_s:>9.2} s");
    let _ = writeln!(
        out,
        "  no-op rerun, in process            {noop:>9.1} ms  {:.2}x the {TARGET_MS} ms target, {:.1}x the floor",
        noop / TARGET_MS,
        noop / floor
    );
    let _ = writeln!(
        out,
        "  no-op rerun, whole `xlpipe run`    {command:>9.1} ms  {:.2}x the {TARGET_MS} ms target",
        command / TARGET_MS
    );
    let _ = writeln!(
        out,
        "  plan, in process                   {planning:>9.1} ms  {:.1}x the floor",
        planning / floor
    );
    let _ = writeln!(out, "  floor: read + parse every record   {floor:>9.1} ms");
    Ok(out)
}
