//! Looking into and cleaning the cache: `show`, `status`, `gc`.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::cache::{disk_usage, key_lock_held, list_dir, sharded_entries, Cache, InstanceRef};

/// `xlpipe show STAGE`: params, artifacts and timings of matching instances.
pub fn show(cache: &Cache, selector: &str, pipeline: Option<&str>) -> anyhow::Result<String> {
    let pipelines = match pipeline {
        Some(p) => vec![p.to_string()],
        None => cache.pipelines(),
    };
    let mut matches: Vec<(String, InstanceRef)> = Vec::new();
    for p in &pipelines {
        for r in cache.refs(p) {
            let stage = r.instance.split('[').next().unwrap_or_default();
            if r.instance == selector || stage == selector {
                matches.push((p.clone(), r));
            }
        }
    }
    let found_in: BTreeSet<&str> = matches.iter().map(|(p, _)| p.as_str()).collect();
    if matches.is_empty() {
        anyhow::bail!(
            "no instance `{selector}` in the cache's pipelines ({}); has the pipeline run?",
            if pipelines.is_empty() {
                "none".to_string()
            } else {
                pipelines.join(", ")
            }
        );
    }
    if found_in.len() > 1 {
        anyhow::bail!(
            "`{selector}` is in several pipelines ({}); choose one with --pipeline",
            found_in.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    matches.sort_by(|a, b| a.1.instance.cmp(&b.1.instance));
    let mut out = String::new();
    for (p, r) in matches {
        let _ = writeln!(out, "{}  (pipeline {p})", r.instance);
        let _ = writeln!(out, "  key      {}", r.key);
        let Some(record) = cache.record(&r.key) else {
            let _ = writeln!(
                out,
                "  (result no longer in the cache; run the pipeline again)\n"
            );
            continue;
        };
        let _ = writeln!(out, "  kind     {} v{}", record.kind, record.version);
        let _ = writeln!(
            out,
            "  ran      {} for {:.2}s (xlpipe {})",
            format_unix(record.started),
            record.seconds,
            record.xlpipe_version
        );
        let _ = writeln!(out, "  log      {}", cache.log_path(&r.key).display());
        if let Some(resumed) = &record.resumed_from {
            let _ = writeln!(
                out,
                "  resumed  from the stable phase at step {} of {}",
                resumed.step, resumed.instance
            );
        }
        let params = serde_json::to_string_pretty(&record.params)?;
        let _ = writeln!(out, "  params   {}", params.replace('\n', "\n           "));
        for (slot, artifacts) in &record.inputs {
            for a in artifacts {
                let _ = writeln!(
                    out,
                    "  input    {slot} <- {}  {}",
                    a.producer,
                    cache.object_path(&a.hash).display()
                );
            }
        }
        for (name, hash) in &record.outputs {
            let _ = writeln!(
                out,
                "  output   {name}  {}",
                cache.object_path(hash).display()
            );
        }
        out.push('\n');
    }
    Ok(out)
}

/// `xlpipe status`: pipelines and cache size.
/// Output folders of the `report` instances of pipeline `name`'s last run.
pub fn report_folders(cache: &Cache, name: &str) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut folders = Vec::new();
    for r in cache.refs(name) {
        let Some(record) = cache.record(&r.key) else {
            continue;
        };
        if let (true, Some(hash)) = (record.kind == "report", record.outputs.get("report")) {
            folders.push((r.instance.clone(), cache.object_path(hash)));
        }
    }
    anyhow::ensure!(
        !folders.is_empty(),
        "pipeline `{name}` has no report in the cache; has it run to the end?"
    );
    folders.sort();
    Ok(folders)
}

pub fn status(cache: &Cache) -> String {
    let count = |dir: &str| sharded_entries(cache.root(), dir).len();
    let mut out = format!(
        "cache {}: {} records, {} objects, {}\n",
        cache.root().display(),
        count("records"),
        count("objects"),
        human_bytes(disk_usage(cache.root()))
    );
    let pipelines = cache.pipelines();
    if pipelines.is_empty() {
        out.push_str("no pipelines have run with this cache\n");
    }
    for p in pipelines {
        let refs = cache.refs(&p);
        let cached = refs
            .iter()
            .filter(|r| cache.record(&r.key).is_some())
            .count();
        let _ = writeln!(
            out,
            "  {p:<24} {} instances at last run, {cached} of them cached",
            refs.len()
        );
    }
    out
}

/// `xlpipe verify`: re-hash every object; damaged ones leave the store (the
/// next run rebuilds them and what depends on them).
pub fn verify(cache: &Cache) -> anyhow::Result<(String, bool)> {
    // Exclusive: a run may be reading an object this moves away. A
    // read-only cache is only checked: nothing moves.
    let _lock = if cache.is_read_only() {
        cache.lock_shared()?
    } else {
        cache.lock_exclusive()?
    };
    let objects = sharded_entries(cache.root(), "objects");
    let mut damaged = Vec::new();
    for path in &objects {
        let Some(hash) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let intact = if cache.is_read_only() {
            cache.hashes_to_its_name(hash)
        } else {
            cache.reverify(hash)?
        };
        if !intact {
            damaged.push(path);
        }
    }
    let checked = objects.len();
    let mut out = format!("verified {checked} objects: {} damaged\n", damaged.len());
    let fate = if cache.is_read_only() {
        "left in place: the cache is read-only"
    } else {
        "moved out of the store; the next run rebuilds it"
    };
    for path in &damaged {
        out += &format!("  damaged: {} ({fate})\n", path.display());
    }
    Ok((out, damaged.is_empty()))
}

/// `xlpipe gc`: delete records and objects that no kept pipeline's last run uses.
pub fn gc(cache: &Cache, keep: &[String], dry_run: bool) -> anyhow::Result<String> {
    cache.ensure_writable("gc")?;
    let _lock = cache.lock_exclusive()?;
    let pipelines = cache.pipelines();
    for p in keep {
        if !pipelines.contains(p) {
            anyhow::bail!(
                "--keep {p}: no such pipeline in the cache (known: {})",
                pipelines.join(", ")
            );
        }
    }
    let kept_pipelines: Vec<&String> = pipelines
        .iter()
        .filter(|p| keep.is_empty() || keep.contains(p))
        .collect();
    let mut keys = BTreeSet::new();
    let mut objects = BTreeSet::new();
    for p in &kept_pipelines {
        for r in cache.refs(p) {
            if let Some(record) = cache.record(&r.key) {
                objects.extend(record.outputs.values().cloned());
                objects.extend(record.inputs.values().flatten().map(|a| a.hash.clone()));
            }
            keys.insert(r.key);
        }
    }

    let mut doomed: Vec<PathBuf> = Vec::new();
    for p in pipelines.iter().filter(|p| !kept_pipelines.contains(p)) {
        doomed.push(cache.refs_dir(p));
    }
    // A stored training prefix lives as long as the record of the run
    // that stored it.
    for (path, entry) in cache.prefix_entries() {
        if keys.contains(&entry.key) {
            objects.insert(entry.object);
        } else {
            doomed.push(path);
        }
    }
    let stem_kept = |path: &Path, set: &BTreeSet<String>| {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        set.contains(name.split('.').next().unwrap_or_default())
    };
    let (mut records, mut removed_objects) = (0usize, 0usize);
    for path in sharded_entries(cache.root(), "records") {
        if !stem_kept(&path, &keys) {
            records += 1;
            doomed.push(path);
        }
    }
    for path in sharded_entries(cache.root(), "logs") {
        if !stem_kept(&path, &keys) {
            doomed.push(path);
        }
    }
    for path in sharded_entries(cache.root(), "objects") {
        if !stem_kept(&path, &objects) {
            removed_objects += 1;
            doomed.push(path);
        }
    }
    for path in sharded_entries(cache.root(), "seals") {
        if !stem_kept(&path, &objects) {
            doomed.push(path);
        }
    }
    // No run holds the cache now, so work in progress and key locks are
    // stale, except a key still being computed (by a command orphaned by a
    // killed run, or an adopted Slurm job): removing its lock would let a
    // rerun compute the key beside it.
    doomed.extend(cache.unowned_work_folders());
    doomed.extend(
        list_dir(&cache.root().join("locks"))
            .into_iter()
            .filter(|lock| !key_lock_held(lock)),
    );
    let bytes: u64 = doomed.iter().map(|p| disk_usage(p)).sum();
    if !dry_run {
        for path in &doomed {
            cache.remove_whole(path)?;
        }
        for family in list_dir(&cache.root().join("prefixes")) {
            // Only an emptied one goes: remove_dir refuses the others.
            let _ = std::fs::remove_dir(family);
        }
    }
    Ok(format!(
        "{} {records} records and {removed_objects} objects ({}); kept {} records of {} pipeline(s)\n",
        if dry_run { "would remove" } else { "removed" },
        human_bytes(bytes),
        keys.len(),
        kept_pipelines.len()
    ))
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, no time zone data needed).
fn format_unix(seconds: f64) -> String {
    let secs = seconds as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates_and_sizes() {
        assert_eq!(format_unix(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix(1_764_028_800.0), "2025-11-25 00:00:00 UTC");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
