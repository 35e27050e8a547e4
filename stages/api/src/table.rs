//! Tables stages hand each other: Parquet files written and read with
//! polars, plus a `meta.json` with counts, and the policy for bad records.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use anyhow::Context;
use polars::prelude::*;
use serde::{Deserialize, Serialize};

/// Write `columns` as one Parquet file.
pub fn write_parquet(path: &Path, columns: Vec<Column>) -> anyhow::Result<()> {
    let mut frame = DataFrame::new_infer_height(columns)?;
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    anyhow::Context::with_context(ParquetWriter::new(file).finish(&mut frame), || {
        format!("writing {}", path.display())
    })?;
    Ok(())
}

pub fn read_parquet(path: &Path) -> anyhow::Result<DataFrame> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    anyhow::Context::with_context(ParquetReader::new(file).finish(), || {
        format!("reading {}", path.display())
    })
}

/// A string column as owned values (nulls are empty strings).
pub fn strings(frame: &DataFrame, name: &str) -> anyhow::Result<Vec<String>> {
    Ok(frame
        .column(name)?
        .str()?
        .iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect())
}

/// A numeric column as f64 (nulls as NaN, so a missing number never
/// passes for a real one).
pub fn floats(frame: &DataFrame, name: &str) -> anyhow::Result<Vec<f64>> {
    let column = frame.column(name)?.cast(&DataType::Float64)?;
    Ok(column
        .f64()?
        .iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

pub fn integers(frame: &DataFrame, name: &str) -> anyhow::Result<Vec<i64>> {
    let column = frame.column(name)?.cast(&DataType::Int64)?;
    Ok(column.i64()?.iter().map(|v| v.unwrap_or(0)).collect())
}

pub fn string_column(name: &str, values: Vec<String>) -> Column {
    Column::new(name.into(), values)
}

pub fn int_column(name: &str, values: Vec<i64>) -> Column {
    Column::new(name.into(), values)
}

/// What to do with a malformed record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Leave it out, count it, and keep going.
    #[default]
    Skip,
    /// Stop the stage with an error naming the file and record.
    Fail,
}

/// Counts of records read, kept and skipped, with the first problems seen;
/// written to the output's `meta.json`.
#[derive(Debug, Default, Serialize)]
pub struct ReadReport {
    #[serde(skip)]
    policy: OnError,
    pub read: usize,
    pub kept: usize,
    pub skipped: usize,
    /// Skipped records by reason.
    pub skipped_by_reason: BTreeMap<String, usize>,
    /// The first problems, as `file: record id: what`.
    pub problems: Vec<String>,
    /// Stage-specific counts (per language, per file, ...).
    pub counts: BTreeMap<String, usize>,
}

const PROBLEMS_KEPT: usize = 50;

impl ReadReport {
    pub fn new(policy: OnError) -> Self {
        ReadReport {
            policy,
            ..ReadReport::default()
        }
    }

    /// A malformed record: an error under `fail`, counted under `skip`.
    pub fn bad_record(
        &mut self,
        file: &str,
        record: &str,
        reason: &str,
        detail: &str,
    ) -> anyhow::Result<()> {
        let problem = format!(
            "{file}: record {record}: {reason}{}",
            if detail.is_empty() {
                String::new()
            } else {
                format!(" ({detail})")
            }
        );
        if self.policy == OnError::Fail {
            anyhow::bail!("{problem} (set on_error = \"skip\" to leave such records out)");
        }
        if self.problems.len() < PROBLEMS_KEPT {
            if self.problems.len() < 5 {
                tracing::warn!("skipping {problem}");
            }
            self.problems.push(problem);
        }
        self.skipped += 1;
        *self
            .skipped_by_reason
            .entry(reason.to_string())
            .or_default() += 1;
        Ok(())
    }

    pub fn count(&mut self, what: impl Into<String>, n: usize) {
        *self.counts.entry(what.into()).or_default() += n;
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if self.skipped > 0 {
            tracing::warn!(
                "{} of {} records skipped: {:?}",
                self.skipped,
                self.read,
                self.skipped_by_reason
            );
        }
        std::fs::write(path, serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }
}
