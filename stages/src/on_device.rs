//! Running a stage's work on the burn backend its `device` param names.

use burn::tensor::backend::Backend;
use xlpipe_ml::model::{DeviceChoice, OnBackend};
use xlpipe_stage_api::StageContext;

/// A stage's work, generic over the backend. Implemented by the params of
/// each stage that has a `device` param, so that one adapter to
/// [`OnBackend`] serves them all.
pub(crate) trait BackendWork {
    fn run<B: Backend>(&self, ctx: &StageContext, device: B::Device) -> anyhow::Result<()>;
}

/// Run `work` on the device `choice` names: the GPU the engine granted
/// `ctx`, or the CPU.
pub(crate) fn run_on<W: BackendWork>(
    choice: DeviceChoice,
    ctx: &StageContext,
    work: &W,
) -> anyhow::Result<()> {
    choice.run(ctx.gpu(), WithContext(work, ctx))
}

struct WithContext<'a, W>(&'a W, &'a StageContext);

impl<W: BackendWork> OnBackend for WithContext<'_, W> {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        self.0.run::<B>(self.1, device)
    }
}
