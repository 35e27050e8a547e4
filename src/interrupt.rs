//! Ctrl-C and SIGTERM: end what this run started, then exit with 130.
//!
//! signal-hook's handler only records the signal; a thread waiting on it
//! runs the cleanups registered with [`on_interrupt`] (end the running
//! commands' process groups, cancel the Slurm jobs) and exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

static CLEANUPS: Mutex<Vec<fn()>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether a signal arrived: what failed after it failed because of it.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Run `cleanup` if this process is interrupted (each function once, in
/// the order registered).
pub fn on_interrupt(cleanup: fn()) {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        if let Err(err) = catch_interrupts() {
            tracing::warn!(
                "cannot catch Ctrl-C, so an interrupted run would leave what it started running: {err}"
            );
        }
    });
    let mut cleanups = CLEANUPS.lock().unwrap_or_else(|e| e.into_inner());
    if !cleanups.contains(&cleanup) {
        cleanups.push(cleanup);
    }
}

fn catch_interrupts() -> std::io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            if signals.forever().next().is_none() {
                return;
            }
            INTERRUPTED.store(true, Ordering::SeqCst);
            let cleanups: Vec<fn()> = CLEANUPS.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for cleanup in cleanups {
                cleanup();
            }
            std::process::exit(130);
        })?;
    Ok(())
}
