//! Dataset readers: one stage kind per source format, each normalising to
//! Parquet tables in an output folder with a `meta.json` of counts.
//!
//! | kind       | reads                                                    | writes |
//! |------------|----------------------------------------------------------|--------|
//! | `squad`    | SQuAD JSON, HF-style JSON Lines, `.gz`, encrypted `.zip` | `qa.parquet` |
//! | `lareqa`   | XQuAD-R / MLQA-R (`sentences`, `sentence_breaks`)        | `questions`, `candidates`, `qrels` |
//! | `parallel` | line-aligned translations (NTREX, FLORES, TICO-19, Tatoeba) | `sentences.parquet` |
//! | `miracl`   | topics TSV + TREC qrels (+ a jsonl passage corpus)        | `queries`, `qrels`, `corpus` |

pub mod lareqa;
pub mod miracl;
pub mod parallel;
pub mod squad;

use std::path::{Path, PathBuf};

use anyhow::Context;

use xlpipe_stage_api::{InputSlot, Interface};

/// A range of articles in file order (`articles = { from = 24, to = 48 }`,
/// `to` exclusive and optional): a split by article that every file of a
/// parallel set (XQuAD, XQuAD-R) cuts alike, so that training and
/// evaluation can take disjoint articles.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Articles {
    #[serde(default)]
    pub from: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<usize>,
}

impl Articles {
    pub fn contains(&self, index: usize) -> bool {
        index >= self.from && self.to.is_none_or(|to| index < to)
    }

    /// The param check: a range that holds at least one article.
    pub fn check(&self) -> Result<(), xlpipe_stage_api::ParamError> {
        match self.to {
            Some(to) if to <= self.from => Err(xlpipe_stage_api::ParamError::new(
                "articles.to",
                format!("{to} leaves no article after `from` = {}", self.from),
            )),
            _ => Ok(()),
        }
    }
}

/// Every reader: files in (a `download` / `import` folder), tables out.
pub fn reader_interface() -> Interface {
    Interface {
        inputs: vec![InputSlot::one("files")],
        ..Interface::producing(&["data"])
    }
}

/// A file named in params, inside the input folder `dir`.
pub fn input_file(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        let mut present: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
            .collect();
        present.sort();
        anyhow::bail!(
            "input has no file `{name}`; it has: {}",
            if present.is_empty() {
                "nothing".into()
            } else {
                present.join(", ")
            }
        );
    }
    Ok(path)
}

/// Parse JSON, naming the file, line and column on failure (including
/// invalid UTF-8).
pub fn parse_json(bytes: &[u8], source: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_slice(bytes).map_err(|err| {
        anyhow::anyhow!(
            "{source}:{}:{}: malformed JSON: {err}",
            err.line(),
            err.column()
        )
    })
}

/// Byte offset of character `chars` in `text` (SQuAD offsets count
/// Unicode code points).
pub fn char_to_byte(text: &str, chars: usize) -> Option<usize> {
    if chars == text.chars().count() {
        return Some(text.len());
    }
    text.char_indices().nth(chars).map(|(b, _)| b)
}

/// Split a paragraph into sentences, as byte ranges.
///
/// A rule-based splitter that works across the scripts in our data: a
/// sentence ends at `. ! ?` (and `。！？` `।` `؟` `…`), possibly followed by
/// closing quotes or brackets, when whitespace and then something that does
/// not start with a lower-case letter follow; CJK full stops end a sentence
/// even without a space. Single letters and common abbreviations before a
/// period (`Mr.`, `e.g.`, `U.S.`) do not end one.
pub fn split_sentences(text: &str) -> Vec<(usize, usize)> {
    const ABBREVIATIONS: &[&str] = &[
        "mr", "mrs", "ms", "dr", "prof", "st", "vs", "etc", "e.g", "i.e", "jr", "sr", "no", "inc",
        "ltd", "co", "corp", "mt", "ft", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
        "sept", "oct", "nov", "dec", "gen", "col", "lt", "sgt", "rev", "ca", "cf", "al", "approx",
        "dept", "est", "fig", "vol", "bzw", "usw", "nr",
    ];
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut sentences = Vec::new();
    let mut start = 0usize;
    let mut i = 0usize;
    while i < chars.len() {
        let (_, c) = chars[i];
        let cjk_stop = matches!(c, '。' | '！' | '？');
        let stop = cjk_stop || matches!(c, '.' | '!' | '?' | '।' | '؟' | '…');
        if !stop {
            i += 1;
            continue;
        }
        // Take trailing terminators and closing punctuation into the sentence.
        let mut j = i + 1;
        while j < chars.len()
            && matches!(
                chars[j].1,
                '.' | '!'
                    | '?'
                    | '"'
                    | '\''
                    | '”'
                    | '’'
                    | ')'
                    | ']'
                    | '»'
                    | '」'
                    | '』'
                    | '）'
                    | '。'
                    | '！'
                    | '？'
            )
        {
            j += 1;
        }
        let end = chars.get(j).map_or(text.len(), |&(b, _)| b);
        let followed_by_space = chars.get(j).is_some_and(|&(_, n)| n.is_whitespace());
        let mut k = j;
        while k < chars.len() && chars[k].1.is_whitespace() {
            k += 1;
        }
        let next = chars.get(k).map(|&(_, n)| n);
        let boundary = if j >= chars.len() || cjk_stop {
            true
        } else if !followed_by_space || next.is_some_and(char::is_lowercase) {
            false
        } else if c == '.' {
            // The word before the period: an abbreviation or initial?
            let before = &text[..chars[i].0];
            let word_start = before
                .char_indices()
                .rev()
                .find(|&(_, ch)| ch.is_whitespace() || ch == '(')
                .map_or(0, |(p, ch)| p + ch.len_utf8());
            let word = text[word_start..chars[i].0].to_lowercase();
            let letters = word.chars().filter(|ch| ch.is_alphabetic()).count();
            // `U.S.`, `e.g.`: an inner period marks an initialism.
            !(letters == 1 || word.contains('.') || ABBREVIATIONS.contains(&word.as_str()))
        } else {
            true
        };
        if boundary {
            if text[start..end].trim().is_empty() {
                start = end;
            } else {
                sentences.push(trimmed(text, start, end));
                start = chars.get(k).map_or(text.len(), |&(b, _)| b);
            }
            i = k;
        } else {
            i = j;
        }
    }
    if !text[start..].trim().is_empty() {
        sentences.push(trimmed(text, start, text.len()));
    }
    sentences
}

fn trimmed(text: &str, start: usize, end: usize) -> (usize, usize) {
    let slice = &text[start..end];
    let lead = slice.len() - slice.trim_start().len();
    let trail = slice.len() - slice.trim_end().len();
    (start + lead, end - trail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Vec<&str> {
        split_sentences(text)
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect()
    }

    #[test]
    fn splits_latin_text_but_not_abbreviations() {
        assert_eq!(
            split("Mr. Smith went to the U.S. Army. He said \"yes!\" Then he left.  "),
            vec![
                "Mr. Smith went to the U.S. Army.",
                "He said \"yes!\"",
                "Then he left."
            ]
        );
        assert_eq!(
            split("It costs 3.5 dollars. Ok? No."),
            vec!["It costs 3.5 dollars.", "Ok?", "No."]
        );
        // A lower-case word after a stop continues the sentence.
        assert_eq!(split("Is it ok? yes it is."), vec!["Is it ok? yes it is."]);
    }

    #[test]
    fn splits_cjk_and_other_scripts() {
        assert_eq!(
            split("我们走了。他来了！好"),
            vec!["我们走了。", "他来了！", "好"]
        );
        assert_eq!(split("यह एक है। वह दो है।"), vec!["यह एक है।", "वह दो है।"]);
        // Multi-byte spaces before an abbreviation check.
        assert_eq!(
            split("\u{3000}a. b\u{a0}Mr. C. Done."),
            vec!["a. b\u{a0}Mr. C. Done."]
        );
    }

    #[test]
    fn char_offsets_map_to_bytes() {
        assert_eq!(char_to_byte("añb", 2), Some(3));
        assert_eq!(char_to_byte("añb", 3), Some(4));
        assert_eq!(char_to_byte("añb", 4), None);
    }
}
