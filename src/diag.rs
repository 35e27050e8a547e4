//! Errors in pipeline files, pointing at file, line, column and field.
//!
//! Loading keeps the text of every file it read (a [`Sources`]) and a byte
//! span ([`Loc`]) for every key and value, so any check done later, even one
//! on a grid instance's substituted params, can still point at the line the
//! user has to edit.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Text of every pipeline file read, indexed by [`Loc::file`].
#[derive(Debug, Default)]
pub struct Sources {
    files: Vec<(PathBuf, String)>,
}

impl Sources {
    pub fn add(&mut self, path: PathBuf, text: String) -> u32 {
        self.files.push((path, text));
        (self.files.len() - 1) as u32
    }

    pub fn text(&self, file: u32) -> &str {
        &self.files[file as usize].1
    }

    pub fn path(&self, file: u32) -> &Path {
        &self.files[file as usize].0
    }

    /// Build a diagnostic at `loc`.
    pub fn error(&self, loc: Loc, field: &str, message: impl Into<String>) -> Diagnostic {
        let text = self.text(loc.file);
        let start = (loc.start as usize).min(text.len());
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let column = text[line_start..start].chars().count() + 1;
        let (source_line, caret) = excerpt(&text[line_start..line_end], column);
        Diagnostic {
            file: self.path(loc.file).to_path_buf(),
            line: text[..start].matches('\n').count() + 1,
            column,
            field: field.to_string(),
            message: message.into(),
            source_line,
            caret,
        }
    }
}

/// Characters of a source line quoted on each side of the error's column:
/// a machine-written one-line file (a 100,000-deep inline table) must not
/// put megabytes into the error.
const QUOTE_WINDOW: usize = 60;

/// The part of `line` an error quotes, and the caret's column in it: the
/// whole line when short, else a window around `column` with `…` where it
/// was cut.
fn excerpt(line: &str, column: usize) -> (String, usize) {
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= 2 * QUOTE_WINDOW {
        return (line.to_string(), column);
    }
    let at = column.saturating_sub(1).min(chars.len());
    let from = at.saturating_sub(QUOTE_WINDOW);
    let to = (at + QUOTE_WINDOW).min(chars.len());
    let mut quoted = String::new();
    if from > 0 {
        quoted.push('…');
    }
    quoted.extend(&chars[from..to]);
    if to < chars.len() {
        quoted.push('…');
    }
    (quoted, at - from + 1 + usize::from(from > 0))
}

/// Where a dotted path (`budget.eta`, `layers[1]`) was written: the path
/// itself, else its closest parent, else `fallback` (the table's header).
pub fn nearest_loc(
    locs: &std::collections::BTreeMap<String, Loc>,
    path: &str,
    fallback: Loc,
) -> Loc {
    let mut path = path;
    loop {
        if let Some(loc) = locs.get(path) {
            return *loc;
        }
        match path.rfind(['.', '[']) {
            Some(cut) => path = &path[..cut],
            None => return fallback,
        }
    }
}

/// A byte span inside one of the [`Sources`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub file: u32,
    pub start: u32,
    pub end: u32,
}

impl Loc {
    pub fn new(file: u32, span: Range<usize>) -> Self {
        Loc {
            file,
            start: span.start as u32,
            end: span.end as u32,
        }
    }
}

/// One problem in a pipeline file.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the offending field, e.g. `stages.train.lr`.
    pub field: String,
    pub message: String,
    /// The offending line, or a window of it around the column.
    source_line: String,
    /// The column of the caret under `source_line`.
    caret: usize,
}

impl Diagnostic {
    /// A problem with a file as a whole (cannot be read, include cycle, ...).
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: message.into(),
            source_line: String::new(),
            caret: 0,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)?;
        if self.line > 0 {
            let gutter = self.line.to_string().len();
            write!(
                f,
                "\n{:gutter$} |\n{} | {}\n{:gutter$} | {:>col$}",
                "",
                self.line,
                self.source_line,
                "",
                "^",
                col = self.caret
            )?;
        }
        Ok(())
    }
}

/// Every problem found while validating a pipeline; nothing runs while there is one.
#[derive(Debug)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c)
}

/// `"; did you mean `x`?"` for the nearest candidate, or nothing.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    nearest(word, candidates)
        .map(|near| format!("; did you mean `{near}`?"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_candidates() {
        assert_eq!(nearest("comand", ["command", "train"]), Some("command"));
        assert_eq!(nearest("zzzzzz", ["command", "train"]), None);
        assert_eq!(did_you_mean("trian", ["train"]), "; did you mean `train`?");
        assert_eq!(did_you_mean("zzzzzz", ["train"]), "");
    }

    #[test]
    fn points_at_line_and_column() {
        let mut sources = Sources::default();
        let f = sources.add("p.toml".into(), "a = 1\nbb = 2\n".into());
        let d = sources.error(Loc::new(f, 6..8), "bb", "bad");
        assert_eq!((d.line, d.column), (2, 1));
        assert!(d.to_string().starts_with("p.toml:2:1: bb: bad"));
    }

    #[test]
    fn a_long_line_is_quoted_as_a_window_around_the_column() {
        let mut sources = Sources::default();
        let line = format!("x = {}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let f = sources.add("p.toml".into(), format!("{line}\n"));
        let at = 4 + 100_000;
        let d = sources.error(Loc::new(f, at..at + 1), "x", "bad");
        assert_eq!((d.line, d.column), (1, at + 1));
        let shown = d.to_string();
        assert!(shown.len() < 1_000, "{} bytes", shown.len());
        // The caret sits under the offending character.
        let lines: Vec<&str> = shown.lines().collect();
        let quoted = lines[2].split_once(" | ").unwrap().1;
        let caret = lines[3].split_once(" | ").unwrap().1;
        let under: Vec<char> = quoted.chars().collect();
        assert_eq!(under[caret.chars().count() - 1], '1', "{shown}");
        // Short lines stay whole.
        let g = sources.add("q.toml".into(), "a = 1\n".into());
        assert!(sources
            .error(Loc::new(g, 4..5), "a", "bad")
            .to_string()
            .contains("1 | a = 1"));
    }
}
