//! The `nllb` backend: a neural model (M2M100 / NLLB) in burn, through the
//! translation memory.

use super::memory::with_memory;
use super::{English, LangSpec, Translator};
use xlpipe_ml::model::OnBackend;
use xlpipe_ml::nmt::{EarlyStopping, GenerationConfig, NeuralTranslator};
use xlpipe_stage_api::table::ReadReport;
use xlpipe_stage_api::StageContext;

/// The `nllb` backend for one language, for [`DeviceChoice::run`]: load the
/// model once, then translate what the memory lacks.
pub(super) struct NllbTranslation<'a> {
    pub(super) spec: &'a LangSpec,
    pub(super) lang: &'a str,
    pub(super) english: &'a English,
    pub(super) batch: usize,
    pub(super) ctx: &'a StageContext,
    pub(super) report: &'a mut ReadReport,
}

impl OnBackend for NllbTranslation<'_> {
    type Output = Vec<Option<[String; 3]>>;
    fn run<B: burn::tensor::backend::Backend>(
        self,
        device: B::Device,
    ) -> anyhow::Result<Self::Output> {
        let NllbTranslation {
            spec,
            lang,
            english,
            batch,
            ctx,
            report,
        } = self;
        let LangSpec::Nllb {
            code,
            source,
            beams,
            max_length,
            length_penalty,
            batch_size,
            ..
        } = spec
        else {
            unreachable!("called for nllb languages only")
        };
        let model = match ctx.inputs("nmt_model") {
            [one] => one,
            _ => anyhow::bail!("the nllb backend needs one `nmt_model` input"),
        };
        let generation = GenerationConfig {
            beams: *beams,
            max_length: *max_length,
            length_penalty: *length_penalty,
            early_stopping: EarlyStopping::Heuristic,
        };
        let target = code.as_deref().unwrap_or(lang);
        let translator = NeuralTranslator::<B>::load(
            &model.path,
            source,
            target,
            generation,
            *batch_size,
            &device,
        )?;
        let mut engine = NllbEngine {
            translator,
            identity: format!(
                "nllb model={} source={source} target={target} beams={beams} max_length={max_length} length_penalty={length_penalty}",
                model.hash
            ),
        };
        with_memory(&mut engine, lang, english, batch, ctx, report)
    }
}

struct NllbEngine<B: burn::tensor::backend::Backend> {
    translator: NeuralTranslator<B>,
    identity: String,
}

impl<B: burn::tensor::backend::Backend> Translator for NllbEngine<B> {
    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn translate(&mut self, texts: &[String]) -> anyhow::Result<Vec<Option<String>>> {
        Ok(self
            .translator
            .translate_texts(texts)?
            .into_iter()
            .map(Some)
            .collect())
    }
}
