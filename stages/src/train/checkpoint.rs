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
use xlpipe_ml::model::{load_encoder, Encoder};
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

/// Appended to a weights file's stem when it holds only the layers above a
/// frozen bottom (`model_trained_layers.mpk`; `model.mpk` holds them all).
const TRAINED_LAYERS: &str = "_trained_layers";

/// The checkpoint folder of one stage instance (named by its key).
pub(super) struct Checkpoints {
    dir: PathBuf,
    /// With a frozen bottom (embeddings and the layers below this one), a
    /// state holds only the layers above: the rest is the input model, which
    /// a resumed run loads anyway. For multilingual-e5-small trained in its
    /// top layer that is 7 MB instead of 470, for the weights and for the
    /// best weights alike.
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
    pub(super) fn of(ctx: &StageContext, cut: Option<usize>) -> Checkpoints {
        Checkpoints {
            dir: ctx.state_dir.join(&ctx.key),
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
        let best = match self.load_weights(dir, "best", encoder.clone(), device)? {
            Some(best) => Some(best),
            // Older states hold the best weights as a model folder.
            None => dir
                .join("best")
                .is_dir()
                .then(|| load_encoder(&dir.join("best"), encoder.pooling, device))
                .transpose()?,
        };
        let encoder = self
            .load_weights(dir, "model", encoder, device)?
            .with_context(|| format!("{}: a state without weights", dir.display()))?;
        optimizer.load(&dir.join("optimizer.bin"))?;
        Ok(Resumed {
            encoder,
            progress,
            best,
        })
    }

    /// Record `encoder`'s weights in `dir` under `stem`: all of them, or
    /// with a frozen bottom only the layers above it.
    fn record_weights<B: AutodiffBackend>(
        &self,
        encoder: &Encoder<B>,
        dir: &Path,
        stem: &str,
    ) -> anyhow::Result<()> {
        match self.trained_from {
            Some(cut) => self.recorder.record(
                encoder.layers[cut..].to_vec().into_record(),
                dir.join(format!("{stem}{TRAINED_LAYERS}")),
            )?,
            None => self
                .recorder
                .record(encoder.clone().into_record(), dir.join(stem))?,
        }
        Ok(())
    }

    /// The weights `record_weights` left under `stem`, loaded into `base`
    /// (which keeps each parameter's frozen or trainable flag, and with a
    /// frozen bottom gives that bottom); `None` where there are none.
    fn load_weights<B: AutodiffBackend>(
        &self,
        dir: &Path,
        stem: &str,
        mut base: Encoder<B>,
        device: &B::Device,
    ) -> anyhow::Result<Option<Encoder<B>>> {
        let trained_layers = dir.join(format!("{stem}{TRAINED_LAYERS}"));
        if trained_layers.with_extension("mpk").is_file() {
            let cut = self
                .trained_from
                .context("a state of trained layers only, but this run trains every weight")?;
            let top = base.layers.split_off(cut);
            base.layers
                .extend(top.load_record(self.recorder.load(trained_layers, device)?));
            Ok(Some(base))
        } else if dir.join(stem).with_extension("mpk").is_file() {
            Ok(Some(
                base.load_record(self.recorder.load(dir.join(stem), device)?),
            ))
        } else {
            Ok(None)
        }
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
        self.record_weights(encoder, dir, "model")?;
        if let Some(best) = best {
            self.record_weights(best, dir, "best")?;
        }
        optimizer.save(&dir.join("optimizer.bin"))?;
        std::fs::write(dir.join("progress.json"), serde_json::to_vec(progress)?)?;
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
    use burn::module::Param;
    use burn::tensor::Tensor;
    use xlpipe_ml::model::{EncoderConfig, Pooling};

    type B = burn::backend::Autodiff<burn::backend::Flex>;

    fn values<const D: usize>(param: &Param<Tensor<B, D>>) -> Vec<f32> {
        param.val().into_data().to_vec::<f32>().unwrap()
    }

    /// The word embeddings and each layer's query and output weights.
    fn weights(encoder: &Encoder<B>) -> Vec<f32> {
        let mut all = values(&encoder.embeddings.word.weight);
        for layer in &encoder.layers {
            all.extend(values(&layer.query.weight));
            all.extend(values(&layer.output.weight));
        }
        all
    }

    /// Two layers of BERT, randomly initialised. Parameters are initialised
    /// lazily, on first read: each is read once here, so that clones share
    /// the values (as weights loaded from a file do).
    fn tiny_encoder(root: &Path) -> Encoder<B> {
        let path = root.join("config.json");
        if !path.is_file() {
            std::fs::write(
                &path,
                r#"{"model_type": "bert", "vocab_size": 40, "hidden_size": 8,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
                    "max_position_embeddings": 16, "type_vocab_size": 1, "pad_token_id": 0,
                    "layer_norm_eps": 1e-12}"#,
            )
            .unwrap();
        }
        let config = EncoderConfig::from_file(&path, Pooling::Mean).unwrap();
        let encoder: Encoder<B> = config.init(&Default::default());
        weights(&encoder);
        encoder
    }

    fn checkpoints(root: &Path, trained_from: Option<usize>) -> Checkpoints {
        Checkpoints {
            dir: root.join("key"),
            trained_from,
            recorder: NamedMpkFileRecorder::new(),
        }
    }

    /// With a frozen bottom a state holds the layers above it only, for the
    /// weights and the best weights; a resumed run takes the bottom from the
    /// model it starts from.
    #[test]
    fn a_state_above_a_frozen_bottom_holds_only_the_trained_layers() {
        let root = tempfile::tempdir().unwrap();
        let trained = tiny_encoder(root.path());
        let best = tiny_encoder(root.path());
        let base = tiny_encoder(root.path());
        let checkpoints = checkpoints(root.path(), Some(1));
        let optimizer = AdamW::new(0.01, None);
        checkpoints
            .save(&trained, Some(&best), &optimizer, &Progress::default())
            .unwrap();
        for stem in ["model", "best"] {
            let dir = &checkpoints.dir;
            assert!(dir.join(format!("{stem}_trained_layers.mpk")).is_file());
            assert!(!dir.join(format!("{stem}.mpk")).exists());
        }
        let mut optimizer = AdamW::new(0.01, None);
        let Ok(resumed) = checkpoints
            .resume(base.clone(), &mut optimizer, &Default::default())
            .unwrap()
        else {
            panic!("no checkpoint");
        };
        let layer = |e: &Encoder<B>, i: usize| values(&e.layers[i].query.weight);
        let word = |e: &Encoder<B>| values(&e.embeddings.word.weight);
        let resumed_best = resumed.best.expect("best weights");
        for (resumed, top) in [(&resumed.encoder, &trained), (&resumed_best, &best)] {
            assert_eq!(word(resumed), word(&base));
            assert_eq!(layer(resumed, 0), layer(&base, 0));
            assert_eq!(layer(resumed, 1), layer(top, 1));
            assert_ne!(layer(top, 1), layer(&base, 1));
        }
    }

    /// A checkpoint holds the run's weights and, apart, its best weights so
    /// far; both come back exactly.
    #[test]
    fn a_checkpoint_keeps_the_weights_and_the_best_weights() {
        let root = tempfile::tempdir().unwrap();
        let current = tiny_encoder(root.path());
        let best = tiny_encoder(root.path());
        assert_ne!(weights(&current), weights(&best));
        let checkpoints = checkpoints(root.path(), None);
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
        let device = Default::default();
        let Ok(resumed) = checkpoints
            .resume(tiny_encoder(root.path()), &mut optimizer, &device)
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
            .resume(tiny_encoder(root.path()), &mut optimizer, &device)
            .unwrap()
        else {
            panic!("no checkpoint");
        };
        assert!(resumed.best.is_none());
    }

    /// States written before the best weights were recorded as the weights
    /// hold them as a model folder `best/`; they still load.
    #[test]
    fn best_weights_in_a_model_folder_still_load() {
        let root = tempfile::tempdir().unwrap();
        let current = tiny_encoder(root.path());
        let best = tiny_encoder(root.path());
        let checkpoints = checkpoints(root.path(), None);
        let optimizer = AdamW::new(0.01, None);
        checkpoints
            .save(&current, None, &optimizer, &Progress::default())
            .unwrap();
        xlpipe_ml::model::save_encoder(&best, root.path(), &checkpoints.dir.join("best")).unwrap();
        let mut optimizer = AdamW::new(0.01, None);
        let Ok(resumed) = checkpoints
            .resume(
                tiny_encoder(root.path()),
                &mut optimizer,
                &Default::default(),
            )
            .unwrap()
        else {
            panic!("no checkpoint");
        };
        assert_eq!(
            weights(&resumed.best.expect("best weights")),
            weights(&best)
        );
    }

    #[test]
    fn a_kill_between_the_two_renames_keeps_the_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let checkpoints = checkpoints(root.path(), None);
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
