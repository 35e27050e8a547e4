//! Logging: `RUST_LOG`-filtered console output drawn around the progress
//! bars, and a copy of every event inside a `stage` span into that stage's log
//! file in the cache (whatever `RUST_LOG` says), so a failed stage's log is
//! complete.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::sync::Mutex;

use indicatif::MultiProgress;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Install the global subscriber. `verbose` raises the default level when
/// `RUST_LOG` is not set.
pub fn init(progress: &MultiProgress, verbose: bool) {
    let default = if verbose {
        "info".to_string()
    } else {
        // A grid instance's "finished" line (in its stage log) and each
        // instance's "will run" line: here only with -v.
        format!(
            "warn,xlpipe=info,xlpipe_stages=warn,{}=warn,{}=warn",
            crate::task::GRID_INSTANCE,
            crate::run::WILL_RUN
        )
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let console = tracing_subscriber::fmt::layer()
        .with_writer(ConsoleWriter(progress.clone()))
        .event_format(ConsoleFormat)
        .with_filter(filter);
    // A second init (tests calling `main` twice) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(console)
        .with(StageLogLayer.with_filter(LevelFilter::INFO))
        .try_init();
}

/// Writes to stderr without tearing the progress bars.
#[derive(Clone)]
struct ConsoleWriter(MultiProgress);

impl<'a> MakeWriter<'a> for ConsoleWriter {
    type Writer = ConsoleLine;

    fn make_writer(&'a self) -> ConsoleLine {
        ConsoleLine(self.0.clone(), Vec::new())
    }
}

/// Buffers one event, then prints it while the bars are hidden.
struct ConsoleLine(MultiProgress, Vec<u8>);

impl Write for ConsoleLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.1.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleLine {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.1);
        self.0.suspend(|| {
            let _ = io::stderr().write_all(&bytes);
        });
    }
}

/// Sends events inside a `stage` span (field `log` = file path) to that file.
struct StageLogLayer;

struct StageLog {
    instance: String,
    file: Mutex<File>,
}

#[derive(Default)]
struct SpanFields {
    instance: Option<String>,
    log: Option<String>,
}

impl Visit for SpanFields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}").trim_matches('"').to_string();
        match field.name() {
            "instance" => self.instance = Some(text),
            "log" => self.log = Some(text),
            _ => {}
        }
    }
}

/// `LEVEL instance: message`, without span fields: the instance is enough
/// on a terminal, the stage log has the rest.
struct ConsoleFormat;

impl<S, N> FormatEvent<S, N> for ConsoleFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = *event.metadata().level();
        if writer.has_ansi_escapes() {
            let color = match level {
                Level::ERROR => "31",
                Level::WARN => "33",
                Level::INFO => "32",
                _ => "2",
            };
            write!(writer, "\x1b[{color}m{level:>5}\x1b[0m ")?;
        } else {
            write!(writer, "{level:>5} ")?;
        }
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(log) = span.extensions().get::<StageLog>() {
                    write!(writer, "{}: ", log.instance)?;
                }
            }
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// An event's message and fields as one line of text.
#[derive(Default)]
struct EventText(String);

impl Visit for EventText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.0.push_str(&format!("{value:?}")),
            name => self.0.push_str(&format!(" {name}={value:?}")),
        }
    }
}

impl<S> Layer<S> for StageLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "stage" {
            return;
        }
        let mut fields = SpanFields::default();
        attrs.record(&mut fields);
        let (Some(instance), Some(path)) = (fields.instance, fields.log) else {
            return;
        };
        let Ok(file) = OpenOptions::new().create(true).append(true).open(&path) else {
            return;
        };
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(StageLog {
                instance,
                file: Mutex::new(file),
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            let extensions = span.extensions();
            if let Some(StageLog { file, .. }) = extensions.get::<StageLog>() {
                let mut text = EventText::default();
                event.record(&mut text);
                let seconds = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                if let Ok(mut file) = file.lock() {
                    let _ = writeln!(
                        file,
                        "[{seconds:.3}] {} {}",
                        event.metadata().level(),
                        text.0
                    );
                }
                return;
            }
        }
    }
}
