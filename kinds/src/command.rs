//! `command`: run a shell command as a stage, for steps progdiff has no built-in kind for
//! (exporting an Inception network with PyTorch, a custom metric, a data conversion).
//!
//! The command runs under `sh -c` in the manifest's directory. It finds its inputs and writes its
//! outputs through environment variables:
//!
//! | variable | value |
//! |---|---|
//! | `PROGDIFF_OUT` | directory to write outputs into (every file there becomes an output) |
//! | `PROGDIFF_WORK` | per-key directory that survives a crash (resume state) |
//! | `PROGDIFF_STAGE`, `PROGDIFF_GROUP` | instance id (`eval`, `prune[3]`) and group index (if any) |
//! | `PROGDIFF_SEED`, `PROGDIFF_DEVICE` | the manifest seed and the device the engine assigned |
//! | `PROGDIFF_INPUT_<ID>_<NAME>` | path of upstream output `<NAME>` of instance `<ID>` (upper-cased, other characters `_`) |
//! | `PROGDIFF_INPUTS` | the same as JSON: `{ "<id>": { "<name>": "<path>" } }` |
//!
//! The cache key holds the command text, `env`, the seed and the digests of the files listed in
//! `inputs`, so editing the command or an input file re-runs the stage.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::DiffusionConfig;
use crate::context::{FieldError, StageContext};
use crate::kind::{Locations, Sections, StageKind};

/// Stage kind name.
pub const KIND: &str = "command";
/// Implementation version: bump when the way commands run changes their results.
pub const VERSION: u32 = 1;
/// The log file every command stage writes (stdout and stderr together).
pub const LOG_FILE: &str = "command.log";

/// Parameters of a `command` stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandParams {
    /// Shell command, run with `sh -c` in the manifest's directory.
    pub run: String,
    /// Files (relative to the manifest) the command reads; their content digests are part of the
    /// cache key.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// File names the command must write into `$PROGDIFF_OUT`; a missing one fails the stage.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Extra environment variables for the command (part of the cache key).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl CommandParams {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        if self.run.trim().is_empty() {
            errs.push(FieldError::at("run", "must not be empty"));
        }
        for (i, o) in self.outputs.iter().enumerate() {
            if o.is_empty() || o.contains('/') || o == "." || o == ".." || o == LOG_FILE {
                errs.push(FieldError {
                    path: vec!["outputs".into(), i.to_string()],
                    message: format!(
                        "must be a plain file name other than `{LOG_FILE}`, got `{o}`"
                    ),
                });
            }
        }
        errs
    }
}

/// Sanitises an instance id or output name for an environment variable name.
pub fn env_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
        .collect();
    while out.ends_with('_') {
        out.pop();
    }
    out
}

/// What a `command` stage reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandInputs {
    /// Its parameters.
    pub stage: CommandParams,
    /// `seed:` (`PROGDIFF_SEED`).
    pub seed: u64,
    /// The manifest's directory (the command's working directory) and its input files.
    pub at: Locations,
}

/// The `command` kind.
pub struct Command;

impl StageKind for Command {
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const NOT_READ: &'static [&'static str] = &["data", "model", "diffusion"];
    type Params = CommandParams;
    type Inputs = CommandInputs;

    fn validate(params: &CommandParams, _: Option<&DiffusionConfig>) -> Vec<FieldError> {
        params.validate()
    }

    fn inputs(params: &CommandParams, m: &Sections<'_>) -> CommandInputs {
        let mut at = m.locations();
        at.files = params.inputs.iter().map(|i| (i.clone(), m.resolve(i))).collect();
        CommandInputs { stage: params.clone(), seed: m.seed, at }
    }
}

/// Runs the command; returns when it exits or `ctx.cancel` fires (then the child is killed).
pub fn run(ctx: &StageContext, inputs: &CommandInputs) -> anyhow::Result<()> {
    let params = &inputs.stage;
    let log_path = ctx.out_dir.join(LOG_FILE);
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating `{}`", log_path.display()))?;
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&params.run)
        .current_dir(&inputs.at.dir)
        .stdin(Stdio::null())
        // Its own process group, so an interruption stops everything the command started.
        .process_group(0)
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("PROGDIFF_OUT", &ctx.out_dir)
        .env("PROGDIFF_WORK", &ctx.work_dir)
        .env("PROGDIFF_STAGE", &ctx.id)
        .env("PROGDIFF_SEED", inputs.seed.to_string())
        .env("PROGDIFF_DEVICE", &ctx.device);
    if let Some(g) = ctx.group {
        cmd.env("PROGDIFF_GROUP", g.to_string());
    }
    let mut all = serde_json::Map::new();
    for up in &ctx.inputs {
        let mut files = serde_json::Map::new();
        for (name, path) in &up.files {
            cmd.env(format!("PROGDIFF_INPUT_{}_{}", env_name(&up.id), env_name(name)), path);
            files.insert(name.clone(), path.display().to_string().into());
        }
        all.insert(up.id.clone(), files.into());
    }
    cmd.env("PROGDIFF_INPUTS", serde_json::Value::Object(all).to_string());
    cmd.envs(&params.env);

    let mut child = cmd.spawn().with_context(|| format!("starting `sh -c {}`", params.run))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if ctx.cancel.is_cancelled() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        anyhow::bail!(
            "command `{}` failed ({status}); last output:\n{}",
            params.run,
            tail(&log_path, 2000)
        );
    }
    for o in &params.outputs {
        if !ctx.out_dir.join(o).is_file() {
            anyhow::bail!("command `{}` did not write its declared output `{o}`", params.run);
        }
    }
    Ok(())
}

fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::UpstreamOutputs;

    fn inputs(dir: &Path, stage: CommandParams) -> CommandInputs {
        let at = Locations { dir: dir.to_path_buf(), ..Locations::default() };
        CommandInputs { stage, seed: 7, at }
    }

    fn ctx(dir: &Path) -> StageContext {
        let out = dir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let mut c = StageContext::new("eval[2]", out, dir.join("work"));
        c.group = Some(2);
        c.inputs = vec![UpstreamOutputs {
            id: "prune[2]".into(),
            kind: "prune".into(),
            group: Some(2),
            files: [("model.safetensors".to_string(), dir.join("m"))].into(),
        }];
        c
    }

    #[test]
    fn command_sees_its_environment_and_writes_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        let p = CommandParams {
            run: "echo \"$PROGDIFF_STAGE $PROGDIFF_GROUP $PROGDIFF_SEED $PROGDIFF_INPUT_PRUNE_2_MODEL_SAFETENSORS $X\" > $PROGDIFF_OUT/r.txt".into(),
            outputs: vec!["r.txt".into()],
            env: [("X".to_string(), "y".to_string())].into(),
            ..Default::default()
        };
        run(&c, &inputs(dir.path(), p.clone())).unwrap();
        let got = std::fs::read_to_string(c.out_dir.join("r.txt")).unwrap();
        assert_eq!(got.trim(), format!("eval[2] 2 7 {} y", dir.path().join("m").display()));
    }

    #[test]
    fn failure_and_missing_outputs_are_errors_with_output() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        let p = CommandParams { run: "echo boom >&2; exit 3".into(), ..Default::default() };
        let e = run(&c, &inputs(dir.path(), p.clone())).unwrap_err().to_string();
        assert!(e.contains("boom") && e.contains("exit status: 3"), "{e}");
        let p =
            CommandParams { run: "true".into(), outputs: vec!["x".into()], ..Default::default() };
        let e = run(&c, &inputs(dir.path(), p.clone())).unwrap_err().to_string();
        assert!(e.contains("declared output `x`"), "{e}");
    }

    #[test]
    fn cancel_kills_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        let cancel = c.cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            cancel.cancel();
        });
        let t = std::time::Instant::now();
        let p = CommandParams { run: "sleep 30".into(), ..Default::default() };
        assert!(run(&c, &inputs(dir.path(), p.clone())).is_err());
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
