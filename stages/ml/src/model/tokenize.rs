//! Texts to padded id batches with a Hugging Face `tokenizer.json`.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use tokenizers::Tokenizer;

pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: u32,
}

/// Right-padded token ids and their attention mask.
pub struct TokenBatch {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub batch: usize,
    pub seq: usize,
}

/// Token ids of several sequences one after another, without padding.
pub struct PackedTokens {
    pub ids: Vec<u32>,
    /// Each sequence's token count, in order; none is empty.
    pub lengths: Vec<usize>,
}

impl PackedTokens {
    pub fn from_rows<R: AsRef<[u32]>>(rows: &[R]) -> PackedTokens {
        let lengths: Vec<usize> = rows.iter().map(|r| r.as_ref().len()).collect();
        assert!(
            lengths.iter().all(|&len| len > 0),
            "packed sequences need a token each"
        );
        PackedTokens {
            ids: rows
                .iter()
                .flat_map(|r| r.as_ref().iter().copied())
                .collect(),
            lengths,
        }
    }
}

impl TextTokenizer {
    pub fn from_file(path: &Path, pad_id: u32) -> anyhow::Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?;
        Ok(TextTokenizer { inner, pad_id })
    }

    /// The tokenizer of a Hugging Face model folder, padding with the pad
    /// token its `config.json` names.
    pub fn for_model(dir: &Path) -> anyhow::Result<Self> {
        let config =
            super::config::EncoderConfig::from_file(&dir.join("config.json"), Default::default())?;
        Self::from_file(&dir.join("tokenizer.json"), config.pad_token_id as u32)
    }

    /// Tokenize with special tokens, cut at `max_len` tokens, into one
    /// right-padded batch.
    pub fn encode(&self, texts: &[String], max_len: usize) -> anyhow::Result<TokenBatch> {
        Ok(TokenBatch::from_rows(
            &self.rows(texts, max_len)?,
            self.pad_id,
        ))
    }

    /// Each text's token ids with special tokens, cut at `max_len`. As in
    /// transformers, a cut sequence keeps its closing special token.
    pub fn rows(&self, texts: &[String], max_len: usize) -> anyhow::Result<Vec<Vec<u32>>> {
        anyhow::ensure!(
            max_len >= 2,
            "max_len must leave room for the special tokens"
        );
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(encodings
            .iter()
            .map(|e| {
                let ids = e.get_ids();
                if ids.len() <= max_len {
                    ids.to_vec()
                } else {
                    let mut cut = ids[..max_len - 1].to_vec();
                    cut.push(*ids.last().expect("non-empty"));
                    cut
                }
            })
            .collect())
    }

    /// The id that pads rows.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token count of each text (with special tokens), for length bucketing.
    pub fn lengths(&self, texts: &[String]) -> anyhow::Result<Vec<usize>> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(encodings.iter().map(|e| e.get_ids().len()).collect())
    }
}

impl TokenBatch {
    /// `rows` right-padded with `pad_id` to the longest of them.
    pub fn from_rows<R: AsRef<[u32]>>(rows: &[R], pad_id: u32) -> TokenBatch {
        let seq = rows
            .iter()
            .map(|r| r.as_ref().len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for row in rows {
            let row = row.as_ref();
            ids.extend(row.iter().map(|&i| i as i64));
            mask.extend(std::iter::repeat_n(1, row.len()));
            ids.extend(std::iter::repeat_n(pad_id as i64, seq - row.len()));
            mask.extend(std::iter::repeat_n(0, seq - row.len()));
        }
        TokenBatch {
            ids,
            mask,
            batch: rows.len(),
            seq,
        }
    }

    pub fn tensors<B: Backend>(
        &self,
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        let shape = [self.batch, self.seq];
        (
            Tensor::from_data(TensorData::new(self.ids.clone(), shape), device),
            Tensor::from_data(TensorData::new(self.mask.clone(), shape), device),
        )
    }
}
