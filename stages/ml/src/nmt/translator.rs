//! Texts in, translations out: the tokenizer, language tokens and batching
//! around [`M2m100`] and [`generate`].
//!
//! Sources are laid out as transformers' M2M100 / NLLB tokenizers do it:
//! `[source language token] tokens </s>`; the target language token is
//! forced as the first generated one. Language tokens are looked up in the
//! tokenizer: NLLB's FLORES-200 codes (`spa_Latn`) or M2M100's `__es__`.

use std::path::Path;

use burn::tensor::backend::Backend;
use tokenizers::Tokenizer;

use super::generate::{generate, GenerationConfig};
use super::m2m100::M2m100;

pub struct NeuralTranslator<B: Backend> {
    model: M2m100<B>,
    tokenizer: Tokenizer,
    source_token: i64,
    target_token: i64,
    generation: GenerationConfig,
    /// Sentences decoded together.
    batch_size: usize,
    /// Source tokens kept (longer sources are cut, keeping `</s>`).
    max_source_len: usize,
}

/// NLLB's FLORES-200 code of a language given by its ISO 639-1 code.
fn flores_code(iso: &str) -> Option<&'static str> {
    Some(match iso {
        "ar" => "arb_Arab",
        "bn" => "ben_Beng",
        "de" => "deu_Latn",
        "el" => "ell_Grek",
        "en" => "eng_Latn",
        "es" => "spa_Latn",
        "fi" => "fin_Latn",
        "fr" => "fra_Latn",
        "hi" => "hin_Deva",
        "id" => "ind_Latn",
        "it" => "ita_Latn",
        "ja" => "jpn_Jpan",
        "ko" => "kor_Hang",
        "nl" => "nld_Latn",
        "pl" => "pol_Latn",
        "pt" => "por_Latn",
        "ro" => "ron_Latn",
        "ru" => "rus_Cyrl",
        "sw" => "swh_Latn",
        "te" => "tel_Telu",
        "th" => "tha_Thai",
        "tr" => "tur_Latn",
        "uk" => "ukr_Cyrl",
        "vi" => "vie_Latn",
        "zh" => "zho_Hans",
        _ => return None,
    })
}

/// The token id of a language: `code` as given (`spa_Latn`, `__es__`), or
/// for an ISO code the FLORES-200 or M2M100 spelling this tokenizer has.
pub fn language_token(tokenizer: &Tokenizer, code: &str) -> anyhow::Result<i64> {
    let mut tried = vec![code.to_string()];
    if let Some(flores) = flores_code(code) {
        tried.push(flores.to_string());
    }
    tried.push(format!("__{code}__"));
    tried
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .map(i64::from)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the tokenizer has no language token for `{code}` (tried {}); give the model's own code, e.g. code = \"spa_Latn\"",
                tried.join(", ")
            )
        })
}

impl<B: Backend> NeuralTranslator<B> {
    pub fn load(
        dir: &Path,
        source: &str,
        target: &str,
        generation: GenerationConfig,
        batch_size: usize,
        device: &B::Device,
    ) -> anyhow::Result<NeuralTranslator<B>> {
        let model = M2m100::<B>::load(dir, device)?;
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?;
        Ok(NeuralTranslator {
            source_token: language_token(&tokenizer, source)?,
            target_token: language_token(&tokenizer, target)?,
            model,
            tokenizer,
            generation,
            batch_size: batch_size.max(1),
            max_source_len: 1024,
        })
    }

    /// Token ids of one source: language token, text tokens, `</s>`.
    fn source_ids(&self, text: &str) -> anyhow::Result<Vec<i64>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let mut ids = vec![self.source_token];
        let room = self.max_source_len.saturating_sub(2);
        ids.extend(encoding.get_ids().iter().take(room).map(|&i| i64::from(i)));
        ids.push(self.model.config.eos_token_id as i64);
        Ok(ids)
    }

    /// Translate `texts`, length-sorted into batches; results in input order.
    pub fn translate_texts(&self, texts: &[String]) -> anyhow::Result<Vec<String>> {
        let sources: Vec<Vec<i64>> = texts
            .iter()
            .map(|t| self.source_ids(t))
            .collect::<anyhow::Result<_>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| (sources[i].len(), i));
        let mut out = vec![String::new(); texts.len()];
        for chunk in order.chunks(self.batch_size) {
            let batch: Vec<Vec<i64>> = chunk.iter().map(|&i| sources[i].clone()).collect();
            let generated = generate(&self.model, &batch, self.target_token, &self.generation);
            for (row, &i) in generated.iter().zip(chunk) {
                let ids: Vec<u32> = row
                    .iter()
                    .skip(2) // decoder start and the forced language token
                    .copied()
                    .filter(|&t| {
                        t != self.model.config.pad_token_id as i64
                            && t != self.model.config.eos_token_id as i64
                    })
                    .map(|t| t as u32)
                    .collect();
                out[i] = self
                    .tokenizer
                    .decode(&ids, true)
                    .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
            }
        }
        Ok(out)
    }
}

/// `xlpipe bench translate`'s measurement: load `dir` on the CPU backend,
/// translate one batch to warm up, then time translating every text.
pub fn benchmark_cpu(
    dir: &Path,
    target: &str,
    generation: GenerationConfig,
    batch_size: usize,
    texts: &[String],
) -> anyhow::Result<(Vec<String>, f64)> {
    let translator = NeuralTranslator::<burn::backend::Flex>::load(
        dir,
        "en",
        target,
        generation,
        batch_size,
        &Default::default(),
    )?;
    translator.translate_texts(&texts[..batch_size.min(texts.len())])?;
    let clock = std::time::Instant::now();
    let out = translator.translate_texts(texts)?;
    Ok((out, clock.elapsed().as_secs_f64()))
}
