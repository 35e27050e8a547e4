//! Text for reading: numbers with their CI and Markdown tables padded so
//! they also read in a terminal.

use std::path::Path;

/// `mean ± ci` (bias to one decimal, the rest to four).
pub(super) fn format_summary(mean: f64, ci95: Option<f64>, bias: bool) -> String {
    let digits = if bias { 1 } else { 4 };
    match ci95 {
        Some(ci) => format!("{mean:.d$} ± {ci:.d$}", d = digits),
        None => format!("{mean:.d$}", d = digits),
    }
}

/// A Markdown table with padded columns, so it also reads in a terminal.
pub(super) fn markdown_table(header: &[String], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
            .chain([header[i].chars().count(), 3])
            .max()
            .unwrap_or(3)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let cell = cells.get(i).map_or("", String::as_str);
                format!("{cell}{}", " ".repeat(w - cell.chars().count()))
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out += &format!("|-{}-|\n", rule.join("-|-"));
    for row in rows {
        out += &line(row);
    }
    out
}

/// The main table of a report folder, formatted for a terminal.
pub(super) fn render_main_table(folder: &Path) -> anyhow::Result<String> {
    let file = folder.join("main.md");
    std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))
}
