//! A training run's checkpoints: weights, optimizer state and progress,
//! written every `checkpoint_every` steps under the stage's state folder, so
//! that a killed run resumes where it stopped (and, the trainer reseeding
//! every step, trains on exactly as an uninterrupted run would).

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use xlpipe_ml::model::{load_encoder, save_encoder, Encoder};
use xlpipe_ml::optim::AdamW;
use xlpipe_stage_api::StageContext;

#[derive(Serialize, Deserialize, Default)]
/// How far a run got, and a row of metrics per step.
pub(super) struct Progress {
    pub step: usize,
    pub best_val: Option<f64>,
    pub bad_evals: usize,
    pub rows: Vec<MetricRow>,
}

#[derive(Serialize, Deserialize, Clone)]
pub(super) struct MetricRow {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub monolingual: bool,
    pub val_loss: Option<f64>,
    /// When the step ended, in seconds since the epoch.
    pub wall_time: f64,
}

/// The file stem of a state's weights when only the layers above a frozen
/// bottom train (`model` when every weight trains).
const TRAINED_LAYERS: &str = "trained_layers";

/// The checkpoint folder of one stage instance (named by its key).
pub(super) struct Checkpoints {
    dir: PathBuf,
    /// The model the run started from: the config, tokenizer and pooler
    /// that a saved best model carries along.
    model_dir: PathBuf,
    /// With a frozen bottom (embeddings and the layers below this one), a
    /// state holds only the layers above: the rest is the input model, which
    /// a resumed run loads anyway. For multilingual-e5-small trained in its
    /// top layer that is 7 MB instead of 470.
    trained_from: Option<usize>,
    /// Full precision: a resumed run must continue from the exact weights.
    recorder: NamedMpkFileRecorder<FullPrecisionSettings>,
}

/// Where a run continues from.
pub(super) struct Resumed<B: AutodiffBackend> {
    pub encoder: Encoder<B>,
    pub progress: Progress,
    /// The best weights so far by validation loss, if it validated.
    pub best: Option<Encoder<B>>,
}

impl Checkpoints {
    pub(super) fn of(ctx: &StageContext, model_dir: &Path, cut: Option<usize>) -> Checkpoints {
        Checkpoints {
            dir: ctx.state_dir.join(&ctx.key),
            model_dir: model_dir.to_path_buf(),
            trained_from: cut,
            recorder: NamedMpkFileRecorder::new(),
        }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last checkpoint of this instance, its weights loaded into
    /// `encoder` and its optimizer state into `optimizer`; `Err(encoder)`
    /// untouched with no checkpoint.
    pub(super) fn resume<B: AutodiffBackend>(
        &self,
        encoder: Encoder<B>,
        optimizer: &mut AdamW,
        device: &B::Device,
    ) -> anyhow::Result<Result<Resumed<B>, Encoder<B>>> {
        self.recover_swap()?;
        if !self.dir.join("progress.json").is_file() {
            return Ok(Err(encoder));
        }
        Ok(Ok(self.load_state(&self.dir, encoder, optimizer, device)?))
    }

    /// Continue from a stored stable-phase prefix (a folder `write_state`
    /// wrote, in the cache).
    pub(super) fn adopt_prefix<B: AutodiffBackend>(
        &self,
        prefix: &Path,
        encoder: Encoder<B>,
        optimizer: &mut AdamW,
        device: &B::Device,
    ) -> anyhow::Result<Resumed<B>> {
        self.load_state(prefix, encoder, optimizer, device)
    }

    fn load_state<B: AutodiffBackend>(
        &self,
        dir: &Path,
        encoder: Encoder<B>,
        optimizer: &mut AdamW,
        device: &B::Device,
    ) -> anyhow::Result<Resumed<B>> {
        let progress: Progress =
            serde_json::from_str(&std::fs::read_to_string(dir.join("progress.json"))?)?;
        let best = dir
            .join("best")
            .is_dir()
            .then(|| load_encoder(&dir.join("best"), encoder.pooling, device))
            .transpose()?;
        // Loading keeps each parameter's frozen or trainable flag.
        let encoder = if dir.join(format!("{TRAINED_LAYERS}.mpk")).is_file() {
            let cut = self
                .trained_from
                .context("a state of trained layers only, but this run trains every weight")?;
            let mut encoder = encoder;
            let top: Vec<_> = encoder.layers.split_off(cut);
            let top = top.load_record(self.recorder.load(dir.join(TRAINED_LAYERS), device)?);
            encoder.layers.extend(top);
            encoder
        } else {
            encoder.load_record(self.recorder.load(dir.join("model"), device)?)
        };
        optimizer.load(&dir.join("optimizer.bin"))?;
        Ok(Resumed {
            encoder,
            progress,
            best,
        })
    }

    /// `save` swaps checkpoints with two renames (current to `.old`, then
    /// `.partial` to current); a kill between them leaves only `.old`, which
    /// is complete, so it becomes the current checkpoint again.
    fn recover_swap(&self) -> anyhow::Result<()> {
        let old = self.dir.with_extension("old");
        if !self.dir.exists() && old.join("progress.json").is_file() {
            std::fs::rename(&old, &self.dir)?;
        }
        Ok(())
    }

    pub(super) fn save<B: AutodiffBackend>(
        &self,
        encoder: &Encoder<B>,
        best: Option<&Encoder<B>>,
        optimizer: &AdamW,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        // Write everything under a fresh name, then swap, so a kill never leaves
        // a half-written checkpoint behind.
        let partial = self.dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        self.write_state(&partial, encoder, best, optimizer, progress)?;
        let old = self.dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        if self.dir.exists() {
            std::fs::rename(&self.dir, &old)?;
        }
        std::fs::rename(&partial, &self.dir)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The whole state of a run (weights, optimizer, progress, best weights
    /// so far) into the new folder `dir`: a checkpoint, or a stable-phase
    /// prefix for the engine to store.
    pub(super) fn write_state<B: AutodiffBackend>(
        &self,
        dir: &Path,
        encoder: &Encoder<B>,
        best: Option<&Encoder<B>>,
        optimizer: &AdamW,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        match self.trained_from {
            Some(cut) => self.recorder.record(
                encoder.layers[cut..].to_vec().into_record(),
                dir.join(TRAINED_LAYERS),
            )?,
            None => self
                .recorder
                .record(encoder.clone().into_record(), dir.join("model"))?,
        }
        optimizer.save(&dir.join("optimizer.bin"))?;
        std::fs::write(dir.join("progress.json"), serde_json::to_vec(progress)?)?;
        if let Some(best) = best {
            save_encoder(best, &self.model_dir, &dir.join("best"))?;
        }
        Ok(())
    }

    /// A finished stage no longer needs its checkpoints.
    pub(super) fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlpipe_ml::model::{EncoderConfig, Pooling};

    type B = burn::backend::Autodiff<burn::backend::Flex>;

    fn weights(encoder: &Encoder<B>) -> Vec<f32> {
        let mut all = encoder
            .embeddings
            .word
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for layer in &encoder.layers {
            all.extend(
                layer
                    .query
                    .weight
                    .val()
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap(),
            );
            all.extend(
                layer
                    .output
                    .weight
                    .val()
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap(),
            );
        }
        all
    }

    /// A 2-layer BERT config in `root/model`.
    fn tiny_config(root: &Path) -> (PathBuf, EncoderConfig) {
        let model_dir = root.join("model");
        std::fs::create_dir_all(&model_dir).unwrap();
        std::fs::write(
            model_dir.join("config.json"),
            r#"{"model_type": "bert", "vocab_size": 40, "hidden_size": 8,
                "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
                "max_position_embeddings": 16, "type_vocab_size": 1, "pad_token_id": 0,
                "layer_norm_eps": 1e-12}"#,
        )
        .unwrap();
        let config =
            EncoderConfig::from_file(&model_dir.join("config.json"), Pooling::Mean).unwrap();
        (model_dir, config)
    }

    /// With a frozen bottom a state holds the layers above it only; a resumed
    /// run takes the bottom from the model it starts from.
    #[test]
    fn a_state_above_a_frozen_bottom_holds_only_the_trained_layers() {
        let root = tempfile::tempdir().unwrap();
        let (model_dir, config) = tiny_config(root.path());
        let device = Default::default();
        let trained: Encoder<B> = config.init(&device);
        let base: Encoder<B> = config.init(&device);
        // Parameters are initialised lazily, on first read: read them once,
        // so that clones share the values (as weights loaded from a file do).
        weights(&base);
        weights(&trained);
        let checkpoints = Checkpoints {
            dir: root.path().join("key"),
            model_dir,
            trained_from: Some(1),
            recorder: NamedMpkFileRecorder::new(),
        };
        let optimizer = AdamW::new(0.01, None);
        checkpoints
            .save(&trained, None, &optimizer, &Progress::default())
            .unwrap();
        assert!(checkpoints.dir.join("trained_layers.mpk").is_file());
        assert!(!checkpoints.dir.join("model.mpk").exists());
        let mut optimizer = AdamW::new(0.01, None);
        let Ok(resumed) = checkpoints
            .resume(base.clone(), &mut optimizer, &device)
            .unwrap()
        else {
            panic!("no checkpoint");
        };
        let layer = |e: &Encoder<B>, i: usize| {
            e.layers[i]
                .query
                .weight
                .val()
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let word = |e: &Encoder<B>| {
            e.embeddings
                .word
                .weight
                .val()
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        assert_eq!(word(&resumed.encoder), word(&base));
        assert_eq!(layer(&resumed.encoder, 0), layer(&base, 0));
        assert_eq!(layer(&resumed.encoder, 1), layer(&trained, 1));
        assert_ne!(layer(&trained, 1), layer(&base, 1));
    }

    /// A checkpoint holds the run's weights and, apart, its best weights so
    /// far; both come back exactly.
    #[test]
    fn a_checkpoint_keeps_the_weights_and_the_best_weights() {
        let root = tempfile::tempdir().unwrap();
        let (model_dir, config) = tiny_config(root.path());
        let device = Default::default();
        let current: Encoder<B> = config.init(&device);
        let best: Encoder<B> = config.init(&device);
        assert_ne!(weights(&current), weights(&best));
        let checkpoints = Checkpoints {
            dir: root.path().join("key"),
            model_dir,
            trained_from: None,
            recorder: NamedMpkFileRecorder::new(),
        };
        let progress = Progress {
            step: 7,
            best_val: Some(0.5),
            ..Progress::default()
        };
        let optimizer = AdamW::new(0.01, None);
        checkpoints
            .save(&current, Some(&best), &optimizer, &progress)
            .unwrap();
        let mut optimizer = AdamW::new(0.01, None);
        let Ok(resumed) = checkpoints
            .resume(config.init::<B>(&device), &mut optimizer, &device)
            .unwrap()
        else {
            panic!("no checkpoint");
        };
        assert_eq!(resumed.progress.step, 7);
        assert_eq!(weights(&resumed.encoder), weights(&current));
        assert_eq!(
            weights(&resumed.best.expect("best weights")),
            weights(&best)
        );
        // Without best weights (no validation yet) none come back.
        checkpoints
            .save(&current, None, &optimizer, &progress)
            .unwrap();
        let Ok(resumed) = checkpoints
            .resume(config.init::<B>(&device), &mut optimizer, &device)
            .unwrap()
        else {
            panic!("no checkpoint");
        };
        assert!(resumed.best.is_none());
    }

    #[test]
    fn a_kill_between_the_two_renames_keeps_the_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let checkpoints = Checkpoints {
            dir: root.path().join("key"),
            model_dir: root.path().join("model"),
            trained_from: None,
            recorder: NamedMpkFileRecorder::new(),
        };
        // What `save` leaves when killed after its first rename.
        let old = checkpoints.dir.with_extension("old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("progress.json"), b"{\"step\": 20}").unwrap();
        checkpoints.recover_swap().unwrap();
        let text = std::fs::read_to_string(checkpoints.dir.join("progress.json")).unwrap();
        assert_eq!(text, "{\"step\": 20}");
        assert!(!old.exists());
        // A current checkpoint is never replaced by an older one.
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("progress.json"), b"{\"step\": 10}").unwrap();
        checkpoints.recover_swap().unwrap();
        let text = std::fs::read_to_string(checkpoints.dir.join("progress.json")).unwrap();
        assert_eq!(text, "{\"step\": 20}");
    }
}
