//! The `dictionary` backend: word by word through a MUSE dictionary.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

use super::Translator;

/// Word-by-word translation with a MUSE dictionary (`target @ source` per
/// line; the first target of a source word wins). Unknown words stay as
/// they are; a text none of whose words are known counts as untranslatable.
pub(super) struct DictionaryTranslator {
    identity: String,
    words: HashMap<String, String>,
    pub(super) unknown_words: usize,
}

impl DictionaryTranslator {
    pub(super) fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut words = HashMap::new();
        for line in text.lines() {
            if let Some((target, source)) = line.split_once(" @ ") {
                words
                    .entry(source.trim().to_lowercase())
                    .or_insert_with(|| target.trim().to_string());
            }
        }
        anyhow::ensure!(
            !words.is_empty(),
            "{} has no `target @ source` lines",
            path.display()
        );
        Ok(DictionaryTranslator {
            identity: format!("dictionary:{}", blake3::hash(text.as_bytes()).to_hex()),
            words,
            unknown_words: 0,
        })
    }

    fn translate_one(&mut self, text: &str) -> Option<String> {
        let mut out = String::with_capacity(text.len());
        let (mut known, mut total) = (0, 0);
        let mut word = String::new();
        let mut flush = |word: &mut String, out: &mut String, words: &HashMap<String, String>| {
            if word.is_empty() {
                return;
            }
            total += 1;
            match words.get(&word.to_lowercase()) {
                Some(t) => {
                    known += 1;
                    if word.chars().next().is_some_and(char::is_uppercase) {
                        let mut chars = t.chars();
                        if let Some(first) = chars.next() {
                            out.extend(first.to_uppercase());
                            out.push_str(chars.as_str());
                        }
                    } else {
                        out.push_str(t);
                    }
                }
                None => out.push_str(word),
            }
            word.clear();
        };
        for c in text.chars() {
            if c.is_alphanumeric() || c == '\'' {
                word.push(c);
            } else {
                flush(&mut word, &mut out, &self.words);
                out.push(c);
            }
        }
        flush(&mut word, &mut out, &self.words);
        self.unknown_words += total - known;
        (known > 0).then_some(out)
    }
}

impl Translator for DictionaryTranslator {
    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn translate(&mut self, texts: &[String]) -> anyhow::Result<Vec<Option<String>>> {
        Ok(texts.iter().map(|t| self.translate_one(t)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_translates_word_by_word_keeping_case_and_punctuation() {
        let mut t = DictionaryTranslator {
            identity: String::new(),
            words: [("the", "die"), ("house", "haus"), ("is", "ist")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            unknown_words: 0,
        };
        assert_eq!(
            t.translate_one("The house is red."),
            Some("Die haus ist red.".into())
        );
        assert_eq!(t.unknown_words, 1);
        assert_eq!(t.translate_one("Xyz!"), None);
    }
}
