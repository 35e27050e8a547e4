//! Ctrl-C and SIGTERM: end what this run started, then exit with 130.
//!
//! The signal handler only writes a byte to a pipe (all a handler may
//! safely do); a thread blocked on the pipe runs the cleanups registered
//! with [`on_interrupt`] (end the running commands' process groups, cancel
//! the Slurm jobs) and exits.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, Once};

static CLEANUPS: Mutex<Vec<fn()>> = Mutex::new(Vec::new());
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a signal arrived: what failed after it failed because of it.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

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

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let byte = 1u8;
    // SAFETY: write(2) is async-signal-safe; the buffer is a live local.
    unsafe {
        libc::write(fd, (&byte as *const u8).cast(), 1);
    }
}

fn catch_interrupts() -> std::io::Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe(2) fills the two-element array it is given.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let [read_end, write_end] = fds;
    SIGNAL_PIPE.store(write_end, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            let mut byte = 0u8;
            // SAFETY: reads one byte into a live local from a pipe this
            // thread owns the read end of.
            while unsafe { libc::read(read_end, (&mut byte as *mut u8).cast(), 1) } != 1 {}
            INTERRUPTED.store(true, Ordering::SeqCst);
            let cleanups: Vec<fn()> = CLEANUPS.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for cleanup in cleanups {
                cleanup();
            }
            std::process::exit(130);
        })?;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that only calls write(2); the
        // sigaction struct is fully initialised.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}
