//! A training run's checkpoints: weights, optimizer state and progress,
//! written every `checkpoint_every` steps under the stage's state folder, so
//! that a killed run resumes where it stopped (and, the trainer reseeding
//! every step, trains on exactly as an uninterrupted run would).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use xlpipe_ml::model::Encoder;
use xlpipe_ml::optim::AdamW;
use xlpipe_stage_api::content::copy_tree;
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

/// The checkpoint folder of one stage instance (named by its key).
pub(super) struct Checkpoints {
    dir: PathBuf,
    /// Full precision: a resumed run must continue from the exact weights.
    recorder: NamedMpkFileRecorder<FullPrecisionSettings>,
}

impl Checkpoints {
    pub(super) fn of(ctx: &StageContext) -> Checkpoints {
        Checkpoints {
            dir: ctx.state_dir.join(&ctx.key),
            recorder: NamedMpkFileRecorder::new(),
        }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the best weights so far (by validation loss) are kept.
    pub(super) fn best_dir(&self) -> PathBuf {
        self.dir.join("best")
    }

    /// The last checkpoint's progress, its weights loaded into `encoder`
    /// and its optimizer state into `optimizer`; `None` with no checkpoint.
    pub(super) fn resume<B: AutodiffBackend>(
        &self,
        encoder: Encoder<B>,
        optimizer: &mut AdamW,
        device: &B::Device,
    ) -> anyhow::Result<(Encoder<B>, Option<Progress>)> {
        self.recover_swap()?;
        if !self.dir.join("progress.json").is_file() {
            return Ok((encoder, None));
        }
        let (encoder, progress) = self.load_state(&self.dir, encoder, optimizer, device)?;
        Ok((encoder, Some(progress)))
    }

    /// Continue from a stored stable-phase prefix (a folder `write_state`
    /// wrote, in the cache): its state, and its best weights so far copied
    /// to where this run keeps its own.
    pub(super) fn adopt_prefix<B: AutodiffBackend>(
        &self,
        prefix: &Path,
        encoder: Encoder<B>,
        optimizer: &mut AdamW,
        device: &B::Device,
    ) -> anyhow::Result<(Encoder<B>, Progress)> {
        let loaded = self.load_state(prefix, encoder, optimizer, device)?;
        let _ = std::fs::remove_dir_all(self.best_dir());
        if prefix.join("best").is_dir() {
            std::fs::create_dir_all(&self.dir)?;
            copy_tree(&prefix.join("best"), &self.best_dir())?;
        }
        Ok(loaded)
    }

    fn load_state<B: AutodiffBackend>(
        &self,
        dir: &Path,
        encoder: Encoder<B>,
        optimizer: &mut AdamW,
        device: &B::Device,
    ) -> anyhow::Result<(Encoder<B>, Progress)> {
        let progress: Progress =
            serde_json::from_str(&std::fs::read_to_string(dir.join("progress.json"))?)?;
        // Loading keeps each parameter's frozen or trainable flag.
        let encoder = encoder.load_record(self.recorder.load(dir.join("model"), device)?);
        optimizer.load(&dir.join("optimizer.bin"))?;
        Ok((encoder, progress))
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
        optimizer: &AdamW,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        // Write everything under a fresh name, then swap, so a kill never leaves
        // a half-written checkpoint behind.
        let partial = self.dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        self.write_state(&partial, encoder, optimizer, progress)?;
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
        optimizer: &AdamW,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        self.recorder
            .record(encoder.clone().into_record(), dir.join("model"))?;
        optimizer.save(&dir.join("optimizer.bin"))?;
        std::fs::write(dir.join("progress.json"), serde_json::to_vec(progress)?)?;
        if self.best_dir().is_dir() {
            copy_tree(&self.best_dir(), &dir.join("best"))?;
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

    #[test]
    fn a_kill_between_the_two_renames_keeps_the_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let checkpoints = Checkpoints {
            dir: root.path().join("key"),
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
