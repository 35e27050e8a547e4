//! The translation memory: every text a backend translated, kept across
//! runs in the stage kind's state folder, so a rerun translates only what
//! is new.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::{English, Translator};
use xlpipe_stage_api::table::ReadReport;
use xlpipe_stage_api::StageContext;

/// Translate every English text through `engine`, consulting and then
/// extending the persistent translation memory.
pub(super) fn with_memory(
    engine: &mut dyn Translator,
    lang: &str,
    english: &English,
    batch: usize,
    ctx: &StageContext,
    report: &mut ReadReport,
) -> anyhow::Result<Vec<Option<[String; 3]>>> {
    let mut memory = Memory::open(&ctx.state_dir, &engine.identity(), lang)?;
    let mut todo: Vec<String> = Vec::new();
    let mut distinct = HashSet::new();
    for text in english
        .questions
        .iter()
        .chain(&english.passages)
        .chain(&english.negatives)
    {
        if !text.is_empty() && distinct.insert(text.as_str()) && !memory.entries.contains_key(text)
        {
            todo.push(text.clone());
        }
    }
    report.count(format!("from_memory.{lang}"), distinct.len() - todo.len());
    report.count(format!("translated_now.{lang}"), todo.len());
    let bar = ctx.progress_bar(todo.len() as u64, &format!("translating to {lang}"));
    let started = std::time::Instant::now();
    for chunk in todo.chunks(batch) {
        let translated = engine.translate(chunk)?;
        anyhow::ensure!(
            translated.len() == chunk.len(),
            "translator returned {} texts for {}",
            translated.len(),
            chunk.len()
        );
        memory.append(chunk, &translated)?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if !todo.is_empty() {
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            "translated {} texts to {lang} in {seconds:.1} s ({:.1} texts/s)",
            todo.len(),
            todo.len() as f64 / seconds.max(1e-9)
        );
    }
    let look = |t: &String| -> Option<String> {
        if t.is_empty() {
            Some(String::new())
        } else {
            memory.entries.get(t).cloned().flatten()
        }
    };
    Ok((0..english.ids.len())
        .map(|i| {
            Some([
                look(&english.questions[i])?,
                look(&english.passages[i])?,
                look(&english.negatives[i])?,
            ])
        })
        .collect())
}

/// Append-only JSON Lines: `[source, translation or null]` per line.
struct Memory {
    path: PathBuf,
    entries: HashMap<String, Option<String>>,
}

impl Memory {
    fn open(state_dir: &Path, identity: &str, lang: &str) -> anyhow::Result<Memory> {
        let id = blake3::hash(identity.as_bytes()).to_hex();
        let dir = state_dir.join("memory");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.{lang}.jsonl", &id[..16]));
        let mut entries = HashMap::new();
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).lines() {
                // A line cut short by a kill is simply not in the memory.
                if let Ok((source, target)) =
                    serde_json::from_str::<(String, Option<String>)>(&line?)
                {
                    entries.insert(source, target);
                }
            }
        }
        Ok(Memory { path, entries })
    }

    fn append(&mut self, sources: &[String], targets: &[Option<String>]) -> anyhow::Result<()> {
        let mut text = String::new();
        for (s, t) in sources.iter().zip(targets) {
            text.push_str(&serde_json::to_string(&(s, t))?);
            text.push('\n');
            self.entries.insert(s.clone(), t.clone());
        }
        // Another run may append to the same memory: one locked write per batch.
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.lock()?;
        file.write_all(text.as_bytes())?;
        file.sync_data()?;
        Ok(())
    }
}
