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

/// The width of each column: its widest cell, at least 3 (a rule's `---`).
fn column_widths(header: &[String], rows: &[Vec<String>]) -> Vec<usize> {
    (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .chain([header[i].chars().count(), 3])
                .max()
                .unwrap_or(3)
        })
        .collect()
}

/// A Markdown table with padded columns, so it also reads in a terminal.
pub(super) fn markdown_table(header: &[String], rows: &[Vec<String>]) -> String {
    let widths = column_widths(header, rows);
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
    let table = std::fs::read_to_string(&file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    Ok(fit_width(&table, TERMINAL_WIDTH))
}

/// What `xlpipe report` fits its table into.
const TERMINAL_WIDTH: usize = 100;

/// A padded Markdown table (as `markdown_table` writes) split into tables
/// no wider than `width`: each repeats the leading columns that name the
/// row (those without a `/` in their header) and takes as many of the value
/// columns as fit (at least one).
fn fit_width(table: &str, width: usize) -> String {
    if table.lines().all(|l| l.chars().count() <= width) {
        return table.to_string();
    }
    let cells = |line: &str| -> Vec<String> {
        let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
        inner.split(" | ").map(|c| c.trim().to_string()).collect()
    };
    let mut lines = table.lines();
    let header = cells(lines.next().unwrap_or_default());
    let rows: Vec<Vec<String>> = lines.skip(1).map(cells).collect();
    let keys = header.iter().take_while(|h| !h.contains('/')).count();
    // Each column takes its cells' width plus its " | " separator.
    let widths = column_widths(&header, &rows);
    let column_width = |i: usize| widths[i] + 3;
    let key_width: usize = 1 + (0..keys).map(column_width).sum::<usize>();
    let mut out = String::new();
    let mut next = keys;
    while next < header.len() {
        let mut chunk = vec![next];
        let mut used = key_width + column_width(next);
        next += 1;
        while next < header.len() && used + column_width(next) <= width {
            used += column_width(next);
            chunk.push(next);
            next += 1;
        }
        let pick = |row: &[String]| -> Vec<String> {
            (0..keys)
                .chain(chunk.iter().copied())
                .map(|i| row.get(i).cloned().unwrap_or_default())
                .collect()
        };
        if !out.is_empty() {
            out.push('\n');
        }
        let chunk_rows: Vec<Vec<String>> = rows.iter().map(|r| pick(r)).collect();
        out += &markdown_table(&pick(&header), &chunk_rows);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wide_table_splits_into_tables_that_fit() {
        let header: Vec<String> = ["alpha", "seeds"]
            .into_iter()
            .map(String::from)
            .chain((0..9).map(|i| format!("dataset{i}/multi/map")))
            .collect();
        let rows: Vec<Vec<String>> = ["untuned", "0.0", "0.5"]
            .iter()
            .map(|a| {
                [a.to_string(), "3".into()]
                    .into_iter()
                    .chain((0..9).map(|i| format!("0.{i}123 ± 0.0012")))
                    .collect()
            })
            .collect();
        let wide = markdown_table(&header, &rows);
        assert!(wide.lines().next().unwrap().len() > 200);
        let fitted = fit_width(&wide, 100);
        assert!(fitted.lines().all(|l| l.chars().count() <= 100), "{fitted}");
        // Every value column once, every table with the row names.
        for h in &header[2..] {
            assert_eq!(fitted.matches(h.as_str()).count(), 1, "{h}");
        }
        let tables = fitted.split("\n\n").count();
        assert!(tables >= 3, "{fitted}");
        assert_eq!(fitted.matches("| untuned ").count(), tables);
        assert!(fitted.contains("0.8123 ± 0.0012"));
        // A table that fits stays as it is.
        let narrow = markdown_table(&header[..3], &[rows[0][..3].to_vec()]);
        assert_eq!(fit_width(&narrow, 100), narrow);
    }
}
