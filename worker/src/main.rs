//! `progdiff-worker`: runs exactly one stage instance (a job) on libtorch.
//!
//! `progdiff run` writes each job it starts into the cache (`<cache>/v1/jobs/ab/<key>.json`) and
//! runs `progdiff-worker exec <job.json> --events`; the same command reproduces one stage
//! instance by hand (its log goes to stderr, progress lines too). The worker re-derives the job's
//! key from its description and refuses a mismatch, resolves the upstream outputs from the
//! cache's records, runs the stage, and publishes its outputs and then its record.
//!
//! Exit codes: 0 done (ran, or found in the cache), 1 failed, 130 interrupted (SIGINT/SIGTERM:
//! the stage stops at its next safe point, training after saving its resume state), 75
//! interrupted by SIGUSR2 (Slurm's warning before a time limit or preemption: state saved,
//! requeue me).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use progdiff::job::{self, Job};
use progdiff_cache::Cache;
use progdiff_kinds::context::{CancelToken, Event, EventSink, Reporter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Runs one progdiff stage instance (a job description) on libtorch.
#[derive(Parser)]
#[command(name = "progdiff-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one job description, as `progdiff run` writes them into `<cache>/v1/jobs/`
    Exec {
        /// The job description (JSON)
        job: PathBuf,
        /// Report progress, metrics and the result as JSON lines on stdout (for a coordinator)
        #[arg(long)]
        events: bool,
        /// Use this cache instead of the one the description names
        #[arg(long, env = "PROGDIFF_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// The Slurm job this worker runs in (`123` or `123_4`), for the key's lease
        #[arg(long, value_name = "ID")]
        slurm_job: Option<String>,
    },
    /// Write the FID statistics (pytorch-fid `.npz`) of an image folder through a TorchScript
    /// feature extractor, with the feature vectors themselves (`features`, for KID)
    Stats {
        /// Folder of PNG/JPEG images
        folder: PathBuf,
        /// Output `.npz` file
        out: PathBuf,
        /// TorchScript feature extractor
        #[arg(long)]
        extractor: PathBuf,
        /// Square input size of the extractor
        #[arg(long, default_value_t = 299)]
        size: usize,
        /// Images per extractor call
        #[arg(long, default_value_t = 50)]
        batch_size: usize,
        /// `cpu` or `cuda:N`
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

const EXIT_FAILED: u8 = 1;
const EXIT_INTERRUPTED: u8 = 130;
/// After `SIGUSR2` (a Slurm job's time limit or preemption is near): the resume state is saved,
/// requeue the job (`progdiff::slurm::EXIT_REQUEUE`).
const EXIT_REQUEUE: u8 = progdiff::slurm::EXIT_REQUEUE as u8;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Exec { job, events, cache_dir, slurm_job } => exec(&job, events, cache_dir, slurm_job),
        Cmd::Stats { folder, out, extractor, size, batch_size, device } => {
            init_logging(None);
            match stats(&folder, &out, &extractor, size, batch_size, &device) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
    }
}

/// JSON lines on stdout, one writer at a time.
struct StdoutEvents(Mutex<std::io::Stdout>);

impl EventSink for StdoutEvents {
    fn emit(&self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// Progress as log lines on stderr (a job run by hand), at most one every 5 seconds.
struct LogProgress(Mutex<Option<Instant>>);

impl EventSink for LogProgress {
    fn emit(&self, event: &Event) {
        if let Event::Progress { pos, len, unit, message } = event {
            let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) || pos == len {
                *last = Some(Instant::now());
                tracing::info!("{pos}/{len} {unit} {message}");
            }
        }
    }
}

fn exec(
    path: &std::path::Path,
    events: bool,
    cache_dir: Option<PathBuf>,
    slurm_job: Option<String>,
) -> ExitCode {
    let sink: Arc<dyn EventSink> = if events {
        Arc::new(StdoutEvents(Mutex::new(std::io::stdout())))
    } else {
        Arc::new(LogProgress(Mutex::new(None)))
    };
    init_logging(events.then(|| sink.clone()));
    let report = Reporter::to(sink.clone());
    let cancel = CancelToken::new();
    // A worker started by a local coordinator stops (gracefully) when the coordinator dies.
    if std::env::var_os("PROGDIFF_DIE_WITH_PARENT").is_some() {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
        if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
            cancel.cancel();
        }
    }
    // SIGINT/SIGTERM/SIGHUP: stop at the next safe point (training saves its resume state).
    // Only a second SIGINT (Ctrl-C twice) leaves at once, through `_exit`: exiting normally
    // while another thread is inside libtorch crashes in its destructors. Repeated SIGTERMs are
    // the same request (Slurm signals every process of a job, and the batch script forwards).
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            let handler = cancel.clone();
            std::thread::spawn(move || {
                for signal in signals.forever() {
                    if !handler.is_cancelled() {
                        tracing::warn!("interrupted: stopping at the next safe point");
                        handler.cancel();
                    } else if signal == SIGINT {
                        signal_hook::low_level::exit(i32::from(EXIT_INTERRUPTED));
                    }
                }
            });
        }
    }
    // SIGUSR2: Slurm's warning before a time limit or preemption. Stop like Ctrl-C (training
    // saves its resume state), then ask the batch script to requeue the job.
    let requeue = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR2]) {
        let (cancel, requeue) = (cancel.clone(), requeue.clone());
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                tracing::warn!("SIGUSR2: saving state to be requeued");
                requeue.store(true, std::sync::atomic::Ordering::SeqCst);
                cancel.cancel();
            }
        });
    }
    let result = run_job(path, cache_dir, slurm_job.as_deref(), &report, &cancel);
    match result {
        Ok(done) => {
            report.emit(&Event::Done {
                status: if done.remote {
                    "remote"
                } else if done.hit {
                    "hit"
                } else {
                    "ran"
                }
                .into(),
                outputs: done.outputs,
                seconds: done.seconds,
                error: None,
            });
            tracing::info!(
                "{} in {:.1}s",
                if done.hit { "found in the cache" } else { "done" },
                done.seconds
            );
            ExitCode::SUCCESS
        }
        Err(e) if cancel.is_cancelled() => {
            tracing::warn!("interrupted ({e:#}); nothing was published");
            if requeue.load(std::sync::atomic::Ordering::SeqCst) {
                ExitCode::from(EXIT_REQUEUE)
            } else {
                ExitCode::from(EXIT_INTERRUPTED)
            }
        }
        Err(e) => {
            tracing::error!("failed: {e:#}");
            report.emit(&Event::Done {
                status: "failed".into(),
                outputs: Default::default(),
                seconds: 0.0,
                error: Some(format!("{e:#}")),
            });
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn run_job(
    path: &std::path::Path,
    cache_dir: Option<PathBuf>,
    slurm_job: Option<&str>,
    report: &Reporter,
    cancel: &CancelToken,
) -> anyhow::Result<job::Done> {
    let job = Job::read(path)?;
    tch::set_num_threads(job.threads.max(1) as i32);
    progdiff_stages::fast::apply(job.fast);
    if !job.fast.is_none() {
        tracing::info!(stage = %job.id, fast = ?job.fast, "GPU fast paths on");
    }
    let prepared = progdiff_stages::run::prepare(&job.kind, &job.inputs)
        .with_context(|| format!("job `{}` in `{}`", job.id, path.display()))?;
    let root = cache_dir.unwrap_or_else(|| job.cache.clone());
    let cache =
        Cache::open(&root).with_context(|| format!("opening cache `{}`", root.display()))?;
    tracing::info!(stage = %job.id, kind = %job.kind, key = %job.key.short(), "job");
    job::execute(&job, prepared, &cache, report, cancel, slurm_job)
}

fn stats(
    folder: &std::path::Path,
    out: &std::path::Path,
    module: &std::path::Path,
    size: usize,
    batch_size: usize,
    device: &str,
) -> anyhow::Result<()> {
    use progdiff_stages::fid;
    let device = progdiff_stages::sample::parse_device(device)?;
    let extractor = fid::Extractor::torchscript(module, size, device)?;
    let images = fid::load_folder(folder, 3)?;
    let features = extractor.features(&images, batch_size)?;
    let stats = fid::statistics_from_features(&features)?;
    fid::write_stats_with_features(&stats, Some(&fid::features_from_tensor(&features)?), out)?;
    Ok(())
}

/// Logs to stderr (the job's log file when a coordinator started the worker); with `events`,
/// warnings and errors also go to the coordinator as `message` events.
fn init_logging(events: Option<Arc<dyn EventSink>>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROGDIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(events.map(|sink| Forward { sink }))
        .try_init();
}

/// Forwards warnings and errors to the coordinator.
struct Forward {
    sink: Arc<dyn EventSink>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Forward {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        self.sink.emit(&Event::Message { level: level.to_string().to_lowercase(), text: text.0 });
    }
}

/// An event's fields as `message key=value ...`.
struct Text(String);

impl tracing::field::Visit for Text {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            self.0.push_str(&format!("{value:?}"));
        } else {
            self.0.push_str(&format!("{}={value:?}", field.name()));
        }
    }
}
