//! Stored vectors: the element type of embeddings and frozen states, and an
//! `encode` output read back. Evaluation reads embeddings through this
//! module, not through the stage that wrote them.

use serde::{Deserialize, Serialize};

use xlpipe_stage_api::table::{read_parquet, strings};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    F32,
    F16,
}

/// An `encode` output read back: ids, languages and row-major vectors.
pub struct Embeddings {
    pub ids: Vec<String>,
    pub langs: Vec<String>,
    pub dim: usize,
    pub vectors: Vec<f32>,
}

impl Embeddings {
    pub fn read(dir: &std::path::Path) -> anyhow::Result<Embeddings> {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("meta.json"))?)?;
        let dim = meta["dim"].as_u64().unwrap_or(0) as usize;
        let frame = read_parquet(&dir.join("ids.parquet"))?;
        let ids = strings(&frame, "id")?;
        let langs = if frame.column("lang").is_ok() {
            strings(&frame, "lang")?
        } else {
            vec![String::new(); ids.len()]
        };
        let raw = std::fs::read(dir.join("vectors.bin"))?;
        let vectors: Vec<f32> = match meta["dtype"].as_str() {
            Some("f16") => raw
                .chunks_exact(2)
                .map(|c| burn::tensor::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        anyhow::ensure!(
            vectors.len() == ids.len() * dim,
            "{}: {} values for {} rows of {dim}",
            dir.display(),
            vectors.len(),
            ids.len()
        );
        Ok(Embeddings {
            ids,
            langs,
            dim,
            vectors,
        })
    }
}
