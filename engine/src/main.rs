//! The `progdiff` command line: argument parsing and printing only; the work is in the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use progdiff::dag::Dag;
use progdiff::executor::{self, RunOptions, RunStatus, RunSummary, Workers};
use progdiff::manifest::{Experiment, ManifestError};
use progdiff::plan::{self, Plan, PlanStatus};
use progdiff::profile::{Backend, Profile};
use progdiff::remote::Remote;
use progdiff::resources::Resources;
use progdiff::slurm::SlurmOptions;
use progdiff_cache::Cache;
use progdiff_kinds::context::CancelToken;

/// Declarative, content-cached pipelines for Step-Adaptive Training of diffusion models.
#[derive(Parser)]
#[command(name = "progdiff", version, about)]
struct Cli {
    /// Cache directory [default: .progdiff in the working directory]
    #[arg(long, global = true, env = "PROGDIFF_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Never write to the cache (a shared cache a CI job consumes): `run` serves what it holds
    /// and fails stages it would have to compute. A cache that cannot be written (a read-only
    /// mount) is opened this way anyway.
    #[arg(
        long,
        global = true,
        env = "PROGDIFF_CACHE_READ_ONLY",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    cache_read_only: bool,
    /// A remote cache shared with other machines: s3://bucket/prefix, gs://…, az://… or
    /// http(s)://… (WebDAV) [default: the profile's `remote`]; credentials from the standard
    /// places (AWS_* variables, ...), never stored
    #[arg(long, global = true, env = "PROGDIFF_REMOTE", value_name = "URL")]
    remote: Option<String>,
    /// Only warnings and errors on stderr, no progress bars
    #[arg(short, long, global = true)]
    quiet: bool,
    /// More log detail (debug)
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check manifests; every error with file:line:col
    Validate {
        /// Manifest files
        #[arg(required = true)]
        manifests: Vec<PathBuf>,
    },
    /// Show each stage instance's key and whether it is cached or will run, and why
    Plan {
        /// Manifest file
        manifest: PathBuf,
        /// Only these instances and what they need: a stage (`finetune`), an instance
        /// (`finetune[3]`, `groups=4/finetune[3]`) or a glob of either (`finetune[*]`)
        targets: Vec<String>,
        /// With targets: the instances that need them instead (what a change to them touches)
        #[arg(long)]
        downstream: bool,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        /// Only the stage instances this sweep variant needs
        #[arg(long, value_name = "NAME")]
        variant: Option<String>,
        /// Show what this backend would do (`slurm`: the jobs and arrays it would submit, with
        /// their resources) [default: the profile's, else local]
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
        /// Profile file [default: progdiff.profile.yaml next to the manifest, else
        /// ~/.config/progdiff/profile.yaml]
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
    },
    /// Run what the plan says
    Run {
        /// Manifest file
        manifest: PathBuf,
        /// Only these instances and what they need: a stage (`finetune`), an instance
        /// (`finetune[3]`, `groups=4/finetune[3]`) or a glob of either (`finetune[*]`)
        targets: Vec<String>,
        /// Recompute these instances even when cached (same target syntax; repeatable); the
        /// old results stay until the new ones replace them
        #[arg(long, value_name = "TARGET")]
        force: Vec<String>,
        /// Take hits from the remote cache but upload nothing (a read-only consumer, e.g. CI)
        #[arg(long)]
        no_upload: bool,
        /// Print the summary as JSON
        #[arg(long)]
        json: bool,
        /// Stage instances running at once [default: one per device of `--devices`: 1 on the
        /// CPU, N with N GPUs]
        #[arg(short, long)]
        jobs: Option<usize>,
        /// Device pool: `cpu`, or GPUs like `cuda:0,cuda:1` (one stage per GPU at a time)
        #[arg(long, default_value = "cpu", value_delimiter = ',')]
        devices: Vec<String>,
        /// Run only what this sweep variant needs
        #[arg(long, value_name = "NAME")]
        variant: Option<String>,
        /// Opt-in GPU fast paths, comma-separated: `cudnn_benchmark`, `channels_last`,
        /// `fused_attention`, or `all`. Faster on GPUs, but results are no longer reproducible
        /// bit for bit (not part of the key; nothing changes on the CPU)
        #[arg(long, value_delimiter = ',', value_name = "PATHS", value_parser = fast_path)]
        fast: Vec<String>,
        /// `local` (worker processes here) or `slurm` (one Slurm job or array task per
        /// instance) [default: the profile's, else local]
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
        /// Profile file [default: progdiff.profile.yaml next to the manifest, else
        /// ~/.config/progdiff/profile.yaml]
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
    },
    /// Upload a manifest's cached results to the remote cache (`--remote`)
    Push(TransferArgs),
    /// Download a manifest's results from the remote cache (`--remote`) into the local cache
    Pull(TransferArgs),
    /// Print the worker log of a stage instance (every attempt, oldest first)
    Log {
        /// Manifest file
        manifest: PathBuf,
        /// Stage instance id, as `plan` prints it (`base`, `prune[3]`, `groups=4/finetune[2]`)
        stage: String,
        /// The sweep variant whose instance it is
        #[arg(long, value_name = "NAME")]
        variant: Option<String>,
    },
    /// Draw the stage-instance graph
    Graph {
        /// Manifest file
        manifest: PathBuf,
        /// Output format
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// The evaluated results as a table like the paper's (one row per evaluate stage)
    Report {
        /// Manifest files
        #[arg(required = true)]
        manifests: Vec<PathBuf>,
        /// Output format
        #[arg(long, value_enum, default_value_t = ReportFormat::Markdown)]
        format: ReportFormat,
        /// Also write PNG figures into DIR: training curves, allocation figures, FID and KID bars
        /// with their intervals over seeds, each evaluation's sample grid and all rows' grids
        /// side by side
        #[arg(long, value_name = "DIR")]
        plots: Option<PathBuf>,
    },
    /// FID between two image folders or two `.npz` statistics files, and KID when both hold
    /// feature vectors (progdiff's do, pytorch-fid's do not); with `--save-stats`, writes the
    /// statistics (and feature vectors) of A to the file B instead
    Fid {
        /// Image folder or `.npz` statistics
        a: PathBuf,
        /// Image folder or `.npz` statistics (the output file with `--save-stats`)
        b: PathBuf,
        /// TorchScript feature extractor for image folders (InceptionV3 for FID proper)
        #[arg(long)]
        extractor: Option<PathBuf>,
        /// Square input size of the extractor
        #[arg(long, default_value_t = 299)]
        size: usize,
        /// Images per extractor call
        #[arg(long, default_value_t = 50)]
        batch_size: usize,
        /// `cpu` or `cuda:N`
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Write the statistics of A to B (pytorch-fid's `.npz` format, with the feature vectors
        /// as `features`) instead of comparing
        #[arg(long)]
        save_stats: bool,
        /// KID: pairs of subsets averaged over
        #[arg(long, default_value_t = 100)]
        kid_subsets: usize,
        /// KID: feature vectors per subset (at most the smaller set's count)
        #[arg(long, default_value_t = 1000)]
        kid_subset_size: usize,
    },
    /// Print the manifest JSON Schema (for yaml-language-server)
    Schema,
    /// Inspect and maintain the cache
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Local,
    Slurm,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    Markdown,
    Csv,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// List stage records
    Ls {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every object and check every record
    Verify {
        /// Delete corrupt objects and the records that reference them
        #[arg(long)]
        delete_corrupt: bool,
        /// Instead, re-hash what these manifests need in the remote cache (`--remote`)
        #[arg(long, value_name = "MANIFEST", num_args = 1..)]
        remote_of: Vec<PathBuf>,
    },
    /// Remove everything the given manifests do not reach
    Gc {
        /// Manifests whose current stage instances are kept
        manifests: Vec<PathBuf>,
        /// Only report what would be removed
        #[arg(long)]
        dry_run: bool,
    },
}

/// Exit codes.
const EXIT_FAILED: u8 = 1;
const EXIT_INVALID: u8 = 2;
const EXIT_INTERRUPTED: u8 = 130;

/// One `--fast` name, checked when the command line is parsed.
fn fast_path(name: &str) -> Result<String, String> {
    progdiff_kinds::fast::FastPaths::parse(&[name.to_string()]).map(|_| name.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.quiet, cli.verbose);
    match real_main(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            if let Some(e) = e.downcast_ref::<ManifestError>() {
                print_manifest_error(e);
                return ExitCode::from(EXIT_INVALID);
            }
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// A manifest that cannot be used, however it failed (unreadable or invalid), exits with
/// [`EXIT_INVALID`] from every command; an unreadable one is printed with its cause.
fn print_manifest_error(e: &ManifestError) {
    match e {
        ManifestError::Invalid(_) => eprintln!("{e}"),
        ManifestError::Read { .. } => {
            eprintln!("error: {e}");
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                eprintln!("  caused by: {c}");
                cause = c.source();
            }
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_logging(quiet: bool, verbose: bool) {
    let default = if quiet {
        "warn"
    } else if verbose {
        "debug"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROGDIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .try_init();
}

fn open_cache(cli: &Cli) -> anyhow::Result<Cache> {
    let dir = cli.cache_dir.clone().unwrap_or_else(|| PathBuf::from(".progdiff"));
    let cache = if cli.cache_read_only { Cache::open_read_only(&dir) } else { Cache::open(&dir) };
    cache.with_context(|| format!("opening cache `{}`", dir.display()))
}

fn real_main(cli: Cli) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    match &cli.command {
        Command::Validate { manifests } => {
            let mut failed = false;
            for path in manifests {
                match Experiment::load(path) {
                    Ok(exp) => {
                        let instances: usize =
                            exp.variants.iter().map(|m| Dag::build(m).instances.len()).sum();
                        if exp.is_sweep() {
                            writeln!(
                                out,
                                "{}: ok ({} variants, {instances} stage instances before sharing)",
                                path.display(),
                                exp.variants.len()
                            )?;
                        } else {
                            writeln!(out, "{}: ok ({instances} stage instances)", path.display())?;
                        }
                    }
                    Err(e) => {
                        failed = true;
                        print_manifest_error(&e);
                    }
                }
            }
            Ok(if failed { EXIT_INVALID } else { 0 })
        }
        Command::Plan { manifest, targets, downstream, json, variant, backend, profile } => {
            let exp = Experiment::load(manifest)?;
            let profile = Profile::find(profile.as_deref(), manifest)?;
            let slurm = resolve_backend(*backend, &profile) == Backend::Slurm;
            let cache = open_cache(&cli)?;
            let p = select_variant(&exp, plan::plan_experiment(&exp, &cache)?, variant)?;
            let mut p = select_targets(p, targets, *downstream)?;
            if let Some(remote) =
                Remote::configured(cli.remote.as_deref(), profile.remote.as_deref())?
            {
                p.look_up_remote(&remote)?;
            }
            let submissions = slurm.then(|| slurm_submissions(&exp, &p, &profile));
            if *json {
                let mut v = serde_json::to_value(PlanJson::new(&p))?;
                if let Some(subs) = &submissions {
                    v["backend"] = "slurm".into();
                    v["submissions"] = serde_json::to_value(subs)?;
                }
                serde_json::to_writer_pretty(&mut out, &v)?;
                writeln!(out)?;
            } else {
                print_plan(&mut out, &p)?;
                if let Some(subs) = &submissions {
                    print_submissions(&mut out, subs)?;
                }
            }
            Ok(0)
        }
        Command::Run {
            manifest,
            targets,
            force,
            no_upload,
            json,
            jobs,
            devices,
            variant,
            fast,
            backend,
            profile,
        } => {
            let fast = progdiff_kinds::fast::FastPaths::parse(fast)
                .map_err(|e| anyhow::anyhow!("--fast: {e}"))?;
            // One instance per device slot unless told: each GPU runs one at a time.
            let jobs = &jobs.unwrap_or_else(|| {
                devices.iter().collect::<std::collections::BTreeSet<_>>().len().max(1)
            });
            let profile = Profile::find(profile.as_deref(), manifest)?;
            let backend = resolve_backend(*backend, &profile);
            if backend == Backend::Local {
                check_devices(devices)?;
            }
            // Intra-op threads of each worker: share the cores between concurrently running
            // stages (oversubscribed OpenMP threads spin and slow everything down).
            // `PROGDIFF_THREADS` overrides, e.g. for several progdiff processes on one machine.
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let threads = match std::env::var("PROGDIFF_THREADS") {
                Ok(v) => v.trim().parse::<usize>().ok().filter(|n| *n > 0).with_context(|| {
                    format!("PROGDIFF_THREADS must be a positive integer, got `{v}`")
                })?,
                Err(_) => (cores / (*jobs).max(1)).max(1),
            };
            let worker = progdiff::worker::binary()?;
            let exp = Experiment::load(manifest)?;
            let cache = open_cache(&cli)?;
            let swept = cache.sweep_tmp()?;
            if swept > 0 {
                tracing::info!(
                    "removed {swept} leftovers of an interrupted run from the cache's tmp/"
                );
            }
            let finished = cache.remove_finished_work_dirs()?;
            if finished > 0 {
                tracing::info!("removed {finished} work areas of stages that had completed");
            }
            let p = select_variant(&exp, plan::plan_experiment(&exp, &cache)?, variant)?;
            let mut p = select_targets(p, targets, false)?;
            let forced = p.targets(force)?;
            p.force(&forced);
            let cancel = CancelToken::new();
            let workers = Workers::default();
            let (handler_token, handler_workers) = (cancel.clone(), workers.clone());
            let _ = ctrlc::set_handler(move || {
                if handler_token.is_cancelled() {
                    eprintln!(
                        "\ninterrupted twice: killing the workers (the cache stays consistent)"
                    );
                    handler_workers.signal_all(nix::sys::signal::Signal::SIGKILL);
                    std::process::exit(i32::from(EXIT_INTERRUPTED));
                }
                eprintln!("\ninterrupting: stopping running stages (Ctrl-C again to kill them)");
                handler_token.cancel();
            });
            let opts = RunOptions {
                jobs: *jobs,
                devices: devices.clone(),
                progress: !cli.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                threads,
                worker,
                remote: remote_url(&cli, &profile)?,
                upload: !*no_upload,
                fast,
            };
            let summary = match backend {
                Backend::Local => executor::run(&p, &cache, &opts, &cancel, &workers),
                Backend::Slurm => {
                    let (resources, retries) = stage_resources(&exp, &p, &profile);
                    let opts = SlurmOptions {
                        profile: profile.slurm.clone(),
                        resources,
                        retries,
                        worker: std::path::absolute(&opts.worker)?,
                        fast,
                    };
                    progdiff::slurm::run(&p, &cache, &opts, &cancel)
                }
            };
            if let Some(url) =
                opts.remote.as_deref().filter(|_| opts.upload && !summary.interrupted)
            {
                upload_missing(url, &cache, &summary);
            }
            if *json {
                serde_json::to_writer_pretty(&mut out, &summary)?;
                writeln!(out)?;
            } else {
                print_summary(&mut out, &summary)?;
            }
            Ok(if summary.interrupted {
                EXIT_INTERRUPTED
            } else if summary.success() {
                0
            } else {
                EXIT_FAILED
            })
        }
        Command::Push(args) => transfer(&cli, &mut out, args, true),
        Command::Pull(args) => transfer(&cli, &mut out, args, false),
        Command::Log { manifest, stage, variant } => {
            let exp = Experiment::load(manifest)?;
            let cache = open_cache(&cli)?;
            let p = select_variant(&exp, plan::plan_experiment(&exp, &cache)?, variant)?;
            let Some(s) = p.stages.iter().find(|s| s.id == *stage) else {
                let ids: Vec<String> = p.stages.iter().map(|s| format!("`{}`", s.id)).collect();
                anyhow::bail!(
                    "`{}` has no stage instance `{stage}`; its instances: {}",
                    exp.file,
                    ids.join(", ")
                );
            };
            let path = cache.log_path(&s.key);
            match std::fs::read(&path) {
                Ok(bytes) => {
                    out.write_all(&bytes)?;
                    Ok(0)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!(
                        "`{stage}` (key {}) has no log: it has not run with this cache{}",
                        s.key.short(),
                        if s.status == PlanStatus::Cached {
                            " (its result came from elsewhere)"
                        } else {
                            ""
                        }
                    );
                    Ok(EXIT_FAILED)
                }
                Err(e) => {
                    Err(anyhow::Error::new(e).context(format!("reading `{}`", path.display())))
                }
            }
        }
        Command::Graph { manifest, format } => {
            let exp = Experiment::load(manifest)?;
            let nodes = if exp.is_sweep() {
                // Which instances the variants share depends on their keys: plan them.
                let cache = open_cache(&cli)?;
                plan::plan_experiment(&exp, &cache)?
                    .stages
                    .into_iter()
                    .map(|s| progdiff::dag::GraphNode { id: s.id, kind: s.kind, needs: s.needs })
                    .collect()
            } else {
                let m = &exp.variants[0];
                Dag::build(m).nodes(m)
            };
            let text = match format {
                GraphFormat::Dot => progdiff::dag::to_dot(&exp.name, &nodes),
                GraphFormat::Mermaid => progdiff::dag::to_mermaid(&nodes),
            };
            write!(out, "{text}")?;
            Ok(0)
        }
        Command::Report { manifests, format, plots } => {
            let cache = open_cache(&cli)?;
            let mut rows = Vec::new();
            let mut written = Vec::new();
            for path in manifests {
                let exp = Experiment::load(path)?;
                rows.extend(progdiff::report::report_experiment(&exp, &cache)?);
                if let Some(dir) = plots {
                    for m in &exp.variants {
                        written
                            .extend(progdiff::report_plots::write_manifest_plots(m, &cache, dir)?);
                    }
                }
            }
            if let Some(dir) = plots {
                written.extend(progdiff::report_plots::write_row_plots(&rows, &cache, dir)?);
                for p in &written {
                    eprintln!("wrote {}", p.display());
                }
            }
            match format {
                ReportFormat::Markdown => write!(out, "{}", progdiff::report::to_markdown(&rows))?,
                ReportFormat::Csv => write!(out, "{}", progdiff::report::to_csv(&rows))?,
                ReportFormat::Json => {
                    serde_json::to_writer_pretty(&mut out, &rows)?;
                    writeln!(out)?;
                }
            }
            Ok(0)
        }
        Command::Fid {
            a,
            b,
            extractor,
            size,
            batch_size,
            device,
            save_stats,
            kid_subsets,
            kid_subset_size,
        } => {
            let opts = progdiff::fid::FidOptions {
                extractor: extractor.clone(),
                size: *size,
                batch_size: *batch_size,
                device: device.clone(),
            };
            if *save_stats {
                let measured = progdiff::fid::measured_of(a, &opts)?;
                progdiff::fid::save(&measured, b)?;
                writeln!(out, "wrote the statistics of `{}` to `{}`", a.display(), b.display())?;
            } else {
                // Both sides at once (decompressing a 2048-d `.npz` is a tenth of a second).
                let (ma, mb) = std::thread::scope(|s| {
                    let mb = s.spawn(|| progdiff::fid::measured_of(b, &opts));
                    let ma = progdiff::fid::measured_of(a, &opts);
                    (ma, mb.join().expect("reading statistics does not panic"))
                });
                let kid = progdiff_kinds::fid::KidOptions {
                    subsets: *kid_subsets,
                    subset_size: *kid_subset_size,
                    ..Default::default()
                };
                let d = progdiff::fid::distances((&ma?, a), (&mb?, b), &kid)?;
                writeln!(out, "FID: {}", d.fid)?;
                match d.kid {
                    Ok(k) => writeln!(
                        out,
                        "KID: {} (std {} over {} subsets of {})",
                        k.mean, k.std, k.subsets, k.subset_size
                    )?,
                    Err(why) => eprintln!("{why}"),
                }
            }
            Ok(0)
        }
        Command::Schema => {
            serde_json::to_writer_pretty(&mut out, &progdiff::schema::manifest_schema())?;
            writeln!(out)?;
            Ok(0)
        }
        Command::Cache(cmd) => cache_command(&cli, cmd, &mut out),
    }
}

fn cache_command(cli: &Cli, cmd: &CacheCommand, out: &mut impl Write) -> anyhow::Result<u8> {
    let cache = open_cache(cli)?;
    match cmd {
        CacheCommand::Ls { json } => {
            let records = cache.list()?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &records)?;
                writeln!(out)?;
            } else {
                for r in &records {
                    let size: u64 = r.outputs.values().map(|o| o.size).sum();
                    writeln!(
                        out,
                        "{}  {:<16} {:<14} {:>10}  {:>8.1}s  {}",
                        r.key.short(),
                        r.id,
                        r.kind,
                        human_bytes(size),
                        r.meta.duration_s,
                        r.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                    )?;
                }
                writeln!(out, "{} records", records.len())?;
            }
            Ok(0)
        }
        CacheCommand::Verify { delete_corrupt, remote_of } if !remote_of.is_empty() => {
            anyhow::ensure!(!*delete_corrupt, "`--delete-corrupt` works on the local cache only");
            let remote = remote_for(cli, &remote_of[0])?;
            let (mut checked, mut bad) = (0, 0);
            for path in remote_of {
                let exp = Experiment::load(path)?;
                for s in plan::plan_experiment(&exp, &cache)?.stages {
                    let Some(record) = remote.record(&s.key)? else { continue };
                    checked += 1;
                    for problem in remote.verify(&record)? {
                        bad += 1;
                        writeln!(out, "{} ({}): {problem}", s.id, s.key.short())?;
                    }
                }
            }
            writeln!(
                out,
                "checked {checked} remote records of `{}`: {bad} problems",
                remote.url()
            )?;
            Ok(if bad == 0 { 0 } else { EXIT_FAILED })
        }
        CacheCommand::Verify { delete_corrupt, .. } => {
            let report = cache.verify()?;
            print_verify(out, &report)?;
            if *delete_corrupt && !report.is_clean() {
                let repaired = cache.repair(&report)?;
                writeln!(
                    out,
                    "removed {} corrupt objects, {} records ({} of them computed from removed \
                     ones), {} work dirs, {} temp entries",
                    repaired.objects_removed,
                    repaired.records_removed,
                    repaired.derived_records_removed,
                    repaired.work_dirs_removed,
                    repaired.tmp_removed
                )?;
                if !repaired.skipped_locked.is_empty() {
                    writeln!(
                        out,
                        "left {} keys alone: a running stage holds them",
                        repaired.skipped_locked.len()
                    )?;
                }
            }
            Ok(if report.is_clean() { 0 } else { EXIT_FAILED })
        }
        CacheCommand::Gc { manifests, dry_run } => {
            let mut keep = std::collections::BTreeSet::new();
            for path in manifests {
                let exp = Experiment::load(path)?;
                for s in plan::plan_experiment(&exp, &cache)?.stages {
                    keep.insert(s.key);
                }
            }
            // Read first: a stage a pending or requeued Slurm job will compute keeps its job
            // description and work area even when no manifest keeps it.
            let slurm = progdiff::slurm_gc::SlurmFiles::scan(&cache)?;
            let mut spared = keep.clone();
            spared.extend(slurm.in_flight());
            let r = cache.gc(&spared, *dry_run)?;
            writeln!(
                out,
                "{}{} records, {} objects, {} work dirs, {} prune banks, {} temp entries ({}); kept {} records, {} objects",
                if r.dry_run { "would remove " } else { "removed " },
                r.records_removed,
                r.objects_removed,
                r.work_dirs_removed,
                r.side_dirs_removed,
                r.tmp_removed,
                human_bytes(r.bytes_freed),
                r.records_kept,
                r.objects_kept
            )?;
            if !r.skipped_locked.is_empty() {
                writeln!(
                    out,
                    "left {} keys alone: a running stage holds them",
                    r.skipped_locked.len()
                )?;
            }
            if r.young_jobs_spared > 0 {
                writeln!(
                    out,
                    "left {} job descriptions of unfinished stages alone: written in the last hour, a worker or Slurm job about to start may need them (a later gc takes them)",
                    r.young_jobs_spared
                )?;
            }
            let s = slurm.gc(&keep, *dry_run, progdiff_cache::GcOptions::default().min_age)?;
            if !s.is_empty() {
                writeln!(
                    out,
                    "{}{} Slurm job records, {} exit markers, {} Slurm output files, {} batch scripts ({})",
                    if s.dry_run { "would remove " } else { "removed " },
                    s.key_records_removed,
                    s.markers_removed,
                    s.outputs_removed,
                    s.scripts_removed,
                    human_bytes(s.bytes_freed),
                )?;
            }
            if s.keys_left > 0 {
                match &s.queue_error {
                    Some(e) => writeln!(
                        out,
                        "left {} stages' Slurm files (and, if unfinished, their job descriptions and work areas) alone: the queue could not be read to tell whether their jobs still run ({e})",
                        s.keys_left
                    )?,
                    None => writeln!(
                        out,
                        "left {} stages' Slurm files (and, if unfinished, their job descriptions and work areas) alone: their jobs are still queued or running",
                        s.keys_left
                    )?,
                }
            }
            Ok(0)
        }
    }
}

fn print_verify(out: &mut impl Write, r: &progdiff_cache::VerifyReport) -> anyhow::Result<()> {
    writeln!(
        out,
        "checked {} objects ({}) and {} records",
        r.objects_checked,
        human_bytes(r.bytes_checked),
        r.records_checked
    )?;
    for c in &r.corrupt_objects {
        match (&c.actual, &c.error) {
            (Some(actual), _) => {
                writeln!(out, "corrupt object `{}`: content hashes to {actual}", c.path.display())?
            }
            (None, e) => writeln!(
                out,
                "unreadable object `{}`: {}",
                c.path.display(),
                e.as_deref().unwrap_or("")
            )?,
        }
    }
    for b in &r.bad_records {
        writeln!(out, "bad record `{}`: {}", b.path.display(), b.reason)?;
    }
    for m in &r.missing_objects {
        writeln!(
            out,
            "record of `{}` ({}) names missing object {} for output `{}`",
            m.id,
            m.key.short(),
            m.digest,
            m.output
        )?;
    }
    for m in &r.size_mismatches {
        writeln!(
            out,
            "record of `{}` ({}) says output `{}` is object {} of {} bytes, but that object has {} bytes",
            m.id,
            m.key.short(),
            m.output,
            m.digest,
            m.recorded,
            m.actual
        )?;
    }
    for w in &r.finished_work_dirs {
        writeln!(out, "work dir of a completed stage `{}`", w.display())?;
    }
    for t in &r.stale_tmp {
        writeln!(out, "stale temp entry `{}`", t.display())?;
    }
    for t in &r.stray_files {
        writeln!(out, "stray file `{}`", t.display())?;
    }
    writeln!(
        out,
        "{}",
        if r.is_clean() {
            "cache is consistent"
        } else {
            "cache has problems (`progdiff cache verify --delete-corrupt` removes them)"
        }
    )?;
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn print_plan(out: &mut impl Write, p: &Plan) -> anyhow::Result<()> {
    let width = p.stages.iter().map(|s| s.id.len()).max().unwrap_or(0).min(60); // longer ids overflow their column
    for s in &p.stages {
        let status = match s.status {
            PlanStatus::Cached => "cached",
            PlanStatus::Remote => "remote",
            PlanStatus::Run => "run",
        };
        write!(out, "{status:<6}  {:<width$}  {}  {:<12}", s.id, s.key.short(), s.kind)?;
        if !s.reasons.is_empty() {
            write!(out, "  {}", s.reasons.join("; "))?;
        }
        writeln!(out)?;
    }
    let to_run = p.to_run();
    let remote = p.stages.iter().filter(|s| s.status == PlanStatus::Remote).count();
    let cached = p.stages.len() - to_run - remote;
    let remote = if remote > 0 { format!(", {remote} in the remote cache") } else { String::new() };
    if p.variants.len() > 1 {
        write!(
            out,
            "{} variants -> {} stage instances, {cached} cached{remote}, {to_run} to run",
            p.variants.len(),
            p.stages.len()
        )?;
    } else {
        write!(
            out,
            "{} stage instances: {cached} cached{remote}, {to_run} to run",
            p.stages.len()
        )?;
    }
    if to_run > 0 {
        match p.estimate() {
            Some((seconds, covered)) if covered == to_run => {
                write!(out, "; about {} to run one at a time", human_duration(seconds))?
            }
            Some((seconds, covered)) => write!(
                out,
                "; about {} to run one at a time for the {covered} with recorded durations",
                human_duration(seconds)
            )?,
            None => {}
        }
    }
    writeln!(out)?;
    Ok(())
}

fn human_duration(s: f64) -> String {
    if s < 1.0 {
        return "under 1s".into();
    }
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `plan --json`: the plan with its summary and estimate.
#[derive(serde::Serialize)]
struct PlanJson<'a> {
    #[serde(flatten)]
    plan: &'a Plan,
    cached: usize,
    /// Instances the remote cache holds (`--remote`).
    #[serde(skip_serializing_if = "Option::is_none")]
    remote: Option<usize>,
    to_run: usize,
    /// Serial seconds to run, from recorded durations (see `Plan::estimate`).
    estimate_s: Option<f64>,
}

impl<'a> PlanJson<'a> {
    fn new(plan: &'a Plan) -> Self {
        let to_run = plan.to_run();
        let remote = plan.stages.iter().filter(|s| s.status == PlanStatus::Remote).count();
        PlanJson {
            plan,
            cached: plan.stages.len() - to_run - remote,
            remote: (remote > 0).then_some(remote),
            to_run,
            estimate_s: plan.estimate().map(|(s, _)| s),
        }
    }
}

/// The plan, or with `--variant` its part that variant needs.
fn select_variant(exp: &Experiment, p: Plan, variant: &Option<String>) -> anyhow::Result<Plan> {
    let Some(name) = variant else { return Ok(p) };
    if exp.variant(name).is_some() {
        return Ok(p.only_variant(name));
    }
    let names: Vec<&str> = exp.variants.iter().filter_map(|v| v.variant.as_deref()).collect();
    if names.is_empty() {
        anyhow::bail!("`{}` declares no sweep, so it has no variant `{name}`", exp.file);
    }
    anyhow::bail!(
        "`{}` has no variant `{name}`; its variants: {}",
        exp.file,
        names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    )
}

fn print_summary(out: &mut impl Write, s: &RunSummary) -> anyhow::Result<()> {
    let width = s.stages.iter().map(|s| s.id.len()).max().unwrap_or(0).min(60); // longer ids overflow their column
    for st in &s.stages {
        let status = match st.status {
            RunStatus::Hit if st.remote => "hit (remote)",
            RunStatus::Hit => "hit",
            RunStatus::Ran => "ran",
            RunStatus::Failed => "FAILED",
            RunStatus::Skipped => "skipped",
        };
        write!(out, "{status:<7}  {:<width$}  {:>7.1}s", st.id, st.seconds)?;
        if let Some(e) = &st.error {
            // The error's first line beside the instance, the rest (how the worker ended, the
            // last lines of its log, the log's path) indented below it.
            let mut lines = e.lines();
            writeln!(out, "  {}", lines.next().unwrap_or(""))?;
            for l in lines {
                writeln!(out, "         {l}")?;
            }
            continue;
        } else if st.status == RunStatus::Skipped {
            write!(out, "  {}", st.reasons.join("; "))?;
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "{} ran, {} hit, {} failed, {} skipped{}",
        s.count(RunStatus::Ran),
        s.count(RunStatus::Hit),
        s.count(RunStatus::Failed),
        s.count(RunStatus::Skipped),
        if s.interrupted { " (interrupted)" } else { "" }
    )?;
    Ok(())
}

fn resolve_backend(arg: Option<BackendArg>, profile: &Profile) -> Backend {
    match arg {
        Some(BackendArg::Local) => Backend::Local,
        Some(BackendArg::Slurm) => Backend::Slurm,
        None => profile.backend,
    }
}

/// Each plan instance's resolved resources and `retries:`.
fn stage_resources(exp: &Experiment, p: &Plan, profile: &Profile) -> (Vec<Resources>, Vec<u32>) {
    p.stages
        .iter()
        .map(|s| {
            let m = &exp.variants[s.source];
            let decl = m.stage(plan::stage_name(&s.local_id)).expect("plan ids come from it");
            (profile.resources_for(&s.kind, &decl.resources), decl.retries)
        })
        .unzip()
}

/// What `run --backend slurm` would submit for the instances to run: one job, or one array of
/// the instances of a stage that share their resources.
#[derive(serde::Serialize)]
struct PlannedSubmission {
    stage: String,
    instances: Vec<String>,
    array: bool,
    resources: Resources,
    requeue: bool,
}

fn slurm_submissions(exp: &Experiment, p: &Plan, profile: &Profile) -> Vec<PlannedSubmission> {
    let (resources, _) = stage_resources(exp, p, profile);
    let mut subs: Vec<PlannedSubmission> = Vec::new();
    for (s, r) in p.stages.iter().zip(resources) {
        if s.status != PlanStatus::Run {
            continue;
        }
        let stage = plan::stage_name(&s.id).to_string();
        match subs.iter_mut().find(|x| x.stage == stage && x.resources == r) {
            Some(x) => {
                x.instances.push(s.id.clone());
                x.array = true;
            }
            None => subs.push(PlannedSubmission {
                stage,
                instances: vec![s.id.clone()],
                array: false,
                resources: r,
                requeue: s.kind == progdiff_kinds::train::KIND,
            }),
        }
    }
    subs
}

fn print_submissions(out: &mut impl Write, subs: &[PlannedSubmission]) -> anyhow::Result<()> {
    if subs.is_empty() {
        writeln!(out, "slurm: nothing to submit")?;
        return Ok(());
    }
    writeln!(out, "slurm: {} submissions", subs.len())?;
    for s in subs {
        let r = &s.resources;
        let mut res = Vec::new();
        if let Some(g) = r.gpus {
            res.push(match &r.gpu_type {
                Some(t) => format!("gpus={t}:{g}"),
                None => format!("gpus={g}"),
            });
        }
        if let Some(c) = r.cpus {
            res.push(format!("cpus={c}"));
        }
        if let Some(m) = &r.mem {
            res.push(format!("mem={m}"));
        }
        if let Some(t) = &r.time {
            res.push(format!("time={t}"));
        }
        if let Some(x) = &r.partition {
            res.push(format!("partition={x}"));
        }
        if let Some(x) = &r.constraint {
            res.push(format!("constraint={x}"));
        }
        res.extend(r.extra.iter().cloned());
        if s.requeue {
            res.push("requeue+USR2".into());
        }
        let what = if s.array {
            format!(
                "array of {} ({} .. {})",
                s.instances.len(),
                s.instances[0],
                s.instances[s.instances.len() - 1]
            )
        } else {
            format!("job {}", s.instances[0])
        };
        writeln!(
            out,
            "  {what}  {}",
            if res.is_empty() { "cluster defaults".to_string() } else { res.join(" ") }
        )?;
    }
    Ok(())
}

/// `--devices` before any work: known names, and GPUs this machine has (`/dev/nvidiaN`, without
/// loading CUDA: the coordinator does not link it).
fn check_devices(devices: &[String]) -> anyhow::Result<()> {
    for d in devices {
        if d == "cpu" {
            continue;
        }
        let Some(n) = d.strip_prefix("cuda:").and_then(|i| i.parse::<u32>().ok()) else {
            anyhow::bail!("unknown device `{d}`, expected `cpu` or `cuda:N`");
        };
        if !std::path::Path::new(&format!("/dev/nvidia{n}")).exists() {
            let found = (0..64)
                .filter(|i| std::path::Path::new(&format!("/dev/nvidia{i}")).exists())
                .count();
            anyhow::bail!(
                "device `{d}`: this machine has {}\nhint: `--devices cpu`, or run where the GPU is",
                match found {
                    0 => "no NVIDIA GPU (no /dev/nvidia0)".to_string(),
                    1 => "1 NVIDIA GPU (cuda:0)".to_string(),
                    k => format!("{k} NVIDIA GPUs (cuda:0 to cuda:{})", k - 1),
                }
            );
        }
    }
    Ok(())
}

/// The plan restricted to `targets` and what they need (or, `downstream`, what needs them).
fn select_targets(p: Plan, targets: &[String], downstream: bool) -> anyhow::Result<Plan> {
    if targets.is_empty() {
        anyhow::ensure!(
            !downstream,
            "`--downstream` needs targets: the stages a change is made to"
        );
        return Ok(p);
    }
    let picked = p.targets(targets)?;
    Ok(if downstream { p.downstream_of(&picked) } else { p.upstream_of(&picked) })
}

/// The remote cache URL: `--remote`/`PROGDIFF_REMOTE`, else the profile's; checked to open.
fn remote_url(cli: &Cli, profile: &Profile) -> anyhow::Result<Option<String>> {
    let url = cli.remote.clone().or_else(|| profile.remote.clone());
    if let Some(u) = &url {
        Remote::open(u)?;
    }
    Ok(url)
}

/// The remote cache for commands that need one.
fn remote_for(cli: &Cli, manifest: &std::path::Path) -> anyhow::Result<Remote> {
    let profile = Profile::find(None, manifest)?;
    Remote::configured(cli.remote.as_deref(), profile.remote.as_deref())?.context(
        "no remote cache: pass `--remote URL`, set PROGDIFF_REMOTE, or add `remote:` to the profile",
    )
}

/// After a run: uploads the local hits the remote lacks (an earlier upload was interrupted, or
/// the results were computed without `--remote`), so that a run always leaves the remote
/// holding what it used. One `HEAD` per hit, many at a time; failures are warnings.
fn upload_missing(url: &str, cache: &Cache, summary: &executor::RunSummary) {
    let hits: Vec<&executor::StageOutcome> = summary
        .stages
        .iter()
        .filter(|s| s.status == executor::RunStatus::Hit && !s.remote)
        .collect();
    if hits.is_empty() {
        return;
    }
    let result = (|| -> anyhow::Result<usize> {
        let remote = Remote::open(url)?;
        let keys: Vec<progdiff_cache::Digest> =
            hits.iter().filter_map(|s| s.key.parse().ok()).collect();
        let mut uploaded = 0;
        for key in remote.missing_records(&keys)? {
            let Some(record) = cache.complete_record(&key)? else { continue };
            if let progdiff::remote::Pushed::Created { .. } =
                remote.push(cache, &record, &|_| {})?
            {
                uploaded += 1;
            }
        }
        Ok(uploaded)
    })();
    match result {
        Ok(0) => {}
        Ok(n) => eprintln!("uploaded {n} cached results the remote cache lacked"),
        Err(e) => eprintln!("warning: uploading cached results to the remote cache: {e:#}"),
    }
}

/// What `push` and `pull` move.
#[derive(clap::Args)]
struct TransferArgs {
    /// Manifest file
    manifest: PathBuf,
    /// Only these instances and what they need (as for `run`)
    targets: Vec<String>,
    /// Only these stages (and what they need); the same as naming them as targets
    #[arg(long = "stage", value_name = "STAGE")]
    stages: Vec<String>,
    /// Only this sweep variant's instances
    #[arg(long, value_name = "NAME")]
    variant: Option<String>,
    /// Transfers at once
    #[arg(long, default_value_t = 4)]
    parallel: usize,
}

/// `push`/`pull`: every instance of the plan (with its upstreams), `parallel` at a time, with a
/// byte and object count on stderr.
fn transfer(
    cli: &Cli,
    out: &mut impl Write,
    args: &TransferArgs,
    push: bool,
) -> anyhow::Result<u8> {
    let TransferArgs { manifest, targets, stages, variant, parallel } = args;
    let targets: Vec<String> = targets.iter().chain(stages).cloned().collect();
    let (targets, parallel) = (&targets[..], *parallel);
    let exp = Experiment::load(manifest)?;
    let remote = remote_for(cli, manifest)?;
    let cache = open_cache(cli)?;
    let p = select_variant(&exp, plan::plan_experiment(&exp, &cache)?, variant)?;
    let p = select_targets(p, targets, false)?;
    // What moves: local records (push) or keys the local cache lacks (pull).
    let work: Vec<&plan::PlannedStage> = p
        .stages
        .iter()
        .filter(|s| if push { s.record.is_some() } else { s.record.is_none() })
        .collect();
    let total: u64 = if push {
        work.iter()
            .filter_map(|s| s.record.as_ref())
            .flat_map(|r| r.outputs.values())
            .map(|o| o.size)
            .sum()
    } else {
        0
    };
    let bar = if !cli.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let done = std::sync::atomic::AtomicUsize::new(0);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<(usize, String)>> = std::sync::Mutex::default();
    let t = std::time::Instant::now();
    let moved = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..parallel.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(s) = work.get(i) else { break };
                    let count = |n: u64| {
                        moved.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        bar.inc(n);
                    };
                    let line = if push {
                        let record = s.record.as_ref().expect("filtered");
                        match remote.push(&cache, record, &count) {
                            Ok(progdiff::remote::Pushed::Created { objects, .. }) => {
                                format!("pushed  {} ({objects} objects)", s.id)
                            }
                            Ok(progdiff::remote::Pushed::Existing { adopted: false }) => {
                                format!("there   {}", s.id)
                            }
                            Ok(progdiff::remote::Pushed::Existing { adopted: true }) => {
                                format!(
                                    "adopted {} (the remote's result replaced the local one)",
                                    s.id
                                )
                            }
                            Err(e) => format!("FAILED  {}: {e:#}", s.id),
                        }
                    } else {
                        match remote.fetch(&cache, &s.key, &count) {
                            Ok(progdiff::remote::Fetched::Hit(_)) => format!("pulled  {}", s.id),
                            Ok(progdiff::remote::Fetched::Miss) => format!("missing {}", s.id),
                            Ok(progdiff::remote::Fetched::Unusable(why)) => {
                                format!("FAILED  {}: {why}", s.id)
                            }
                            Err(e) => format!("FAILED  {}: {e:#}", s.id),
                        }
                    };
                    let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    bar.set_message(format!("{n}/{} instances", work.len()));
                    results.lock().unwrap_or_else(|e| e.into_inner()).push((i, line));
                }
            });
        }
    });
    bar.finish_and_clear();
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort();
    let failed = results.iter().filter(|(_, l)| l.starts_with("FAILED")).count();
    for (_, line) in &results {
        writeln!(out, "{line}")?;
    }
    let bytes = moved.load(std::sync::atomic::Ordering::Relaxed);
    let secs = t.elapsed().as_secs_f64();
    writeln!(
        out,
        "{} {} instances, {} in {secs:.1}s ({}/s), {failed} failed",
        if push { "pushed" } else { "pulled" },
        results.len() - failed,
        human_bytes(bytes),
        human_bytes((bytes as f64 / secs.max(1e-9)) as u64)
    )?;
    Ok(if failed == 0 { 0 } else { EXIT_FAILED })
}
