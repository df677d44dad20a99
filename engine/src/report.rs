//! `progdiff report`: the evaluated results of one or more manifests as a table like the
//! paper's — one row per `evaluate` stage instance with its FID, params and MACs averaged over
//! the sampled timesteps, sampling time, and the training steps of the model stages upstream.
//!
//! Reports read only the cache: an instance whose current key has no record is a row marked
//! missing, with empty cells, never zeros.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use anyhow::Context as _;
use progdiff_cache::Cache;
use progdiff_kinds::evaluate::{EvaluateMetrics, METRICS_FILE};
use serde::Serialize;

use crate::dag::Dag;
use crate::manifest::{Experiment, Manifest};
use crate::plan;
use progdiff_kinds::evaluate::Evaluate;
use progdiff_kinds::train::Train;

/// One row of a report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportRow {
    /// Manifest name.
    pub manifest: String,
    /// The evaluate stage instance.
    pub stage: String,
    /// Row name: the stage's `label`, or its id.
    pub label: String,
    /// The sweep variant the row belongs to; `None` without a sweep, and for an evaluation
    /// every variant shares (the baseline, typically).
    pub variant: Option<String>,
    /// The evaluation's cache key.
    pub key: String,
    /// Whether the current key's results are in the cache.
    pub evaluated: bool,
    /// FID (absent when missing or evaluated without an extractor).
    pub fid: Option<f64>,
    /// MACs per image averaged over the sampled timesteps.
    pub macs: Option<f64>,
    /// Params averaged over the sampled timesteps.
    pub params: Option<f64>,
    /// Training steps of every `train` stage instance upstream, summed.
    pub training_steps: usize,
    /// Models sampled with (1 or the group count).
    pub models: Option<usize>,
    /// Images sampled.
    pub samples: Option<usize>,
    /// Wall-clock seconds of sampling.
    pub sampling_seconds: Option<f64>,
}

/// The rows of manifest `m`, in the manifest's stage order.
pub fn report(m: &Manifest, cache: &Cache) -> anyhow::Result<Vec<ReportRow>> {
    let dag = Dag::build(m);
    let plan = plan::plan(m, &dag, cache)?;
    let mut rows = Vec::new();
    for (i, inst) in dag.instances.iter().enumerate() {
        let Some(p) = m.stages[inst.stage].params.get::<Evaluate>() else { continue };
        let metrics = match plan.stages[i].record.as_ref().and_then(|r| r.outputs.get(METRICS_FILE))
        {
            Some(o) => {
                let bytes = cache.read_object(&o.digest)?;
                Some(
                    serde_json::from_slice::<EvaluateMetrics>(&bytes)
                        .with_context(|| format!("reading the metrics of `{}`", inst.id))?,
                )
            }
            None => None,
        };
        rows.push(ReportRow {
            manifest: m.name.clone(),
            stage: inst.id.clone(),
            label: p.label_or(&inst.id).to_string(),
            variant: m.variant.clone(),
            key: plan.stages[i].key.to_string(),
            evaluated: metrics.is_some(),
            fid: metrics.as_ref().and_then(|x| x.fid),
            macs: metrics.as_ref().map(|x| x.macs),
            params: metrics.as_ref().map(|x| x.params),
            training_steps: training_steps(m, &dag, i),
            models: metrics.as_ref().map(|x| x.models),
            samples: metrics.as_ref().map(|x| x.samples),
            sampling_seconds: metrics.as_ref().map(|x| x.sampling_seconds),
        });
    }
    // Keep manifest order of stages (the DAG's order is topological).
    let order: Vec<&str> = m.stages.iter().map(|s| s.name.as_str()).collect();
    rows.sort_by_key(|r| {
        let base = r.stage.split('[').next().unwrap_or(&r.stage);
        order.iter().position(|s| *s == base)
    });
    Ok(rows)
}

/// The rows of every variant of an experiment: an evaluation with the same key in every variant
/// (e.g. of the base model) is one row without a variant; the others are one row per variant.
/// Rows follow the manifest's stage order, variants in sweep order within a stage.
pub fn report_experiment(exp: &Experiment, cache: &Cache) -> anyhow::Result<Vec<ReportRow>> {
    if !exp.is_sweep() {
        return report(&exp.variants[0], cache);
    }
    let mut rows: Vec<ReportRow> = Vec::new();
    let mut seen: HashMap<(String, String), (usize, usize)> = HashMap::new();
    for m in &exp.variants {
        for r in report(m, cache)? {
            match seen.get_mut(&(r.stage.clone(), r.key.clone())) {
                Some((_, n)) => *n += 1,
                None => {
                    seen.insert((r.stage.clone(), r.key.clone()), (rows.len(), 1));
                    rows.push(r);
                }
            }
        }
    }
    for (i, n) in seen.into_values() {
        if n == exp.variants.len() {
            rows[i].variant = None;
        }
    }
    let order: Vec<&str> = exp.variants[0].stages.iter().map(|s| s.name.as_str()).collect();
    rows.sort_by_key(|r| order.iter().position(|s| *s == crate::plan::stage_name(&r.stage)));
    Ok(rows)
}

/// Sum of the `steps` of every `train` instance that instance `i` depends on, transitively.
fn training_steps(m: &Manifest, dag: &Dag, i: usize) -> usize {
    let mut seen = BTreeSet::new();
    let mut stack = dag.instances[i].deps.clone();
    let mut total = 0;
    while let Some(d) = stack.pop() {
        if !seen.insert(d) {
            continue;
        }
        if let Some(p) = m.stages[dag.instances[d].stage].params.get::<Train>() {
            total += p.steps;
        }
        stack.extend(&dag.instances[d].deps);
    }
    total
}

const MISSING: &str = "missing";

fn cell(v: Option<String>, evaluated: bool) -> String {
    match v {
        Some(s) => s,
        None if evaluated => "-".into(),
        None => MISSING.into(),
    }
}

/// `1.23G`-style numbers (the paper's units).
pub fn si(v: f64) -> String {
    let (div, unit) = match v.abs() {
        x if x >= 1e9 => (1e9, "G"),
        x if x >= 1e6 => (1e6, "M"),
        x if x >= 1e3 => (1e3, "k"),
        _ => (1.0, ""),
    };
    format!("{:.2}{unit}", v / div)
}

fn display_cells(r: &ReportRow) -> [String; 9] {
    let e = r.evaluated;
    [
        r.label.clone(),
        r.variant.clone().unwrap_or_else(|| SHARED.into()),
        r.stage.clone(),
        cell(r.fid.map(|f| format!("{f:.2}")), e),
        cell(r.macs.map(si), e),
        cell(r.params.map(si), e),
        r.training_steps.to_string(),
        cell(r.samples.map(|s| s.to_string()), e),
        cell(r.sampling_seconds.map(|s| format!("{s:.1}")), e),
    ]
}

const HEADERS: [&str; 9] = [
    "model",
    "variant",
    "stage",
    "FID",
    "FLOPs (MACs)",
    "params",
    "training steps",
    "samples",
    "sampling s",
];

/// The variant cell of an evaluation every variant shares.
const SHARED: &str = "(all)";

/// A markdown table; with several manifests, a `manifest` column first; with sweep variants, a
/// `variant` column.
pub fn to_markdown(rows: &[ReportRow]) -> String {
    let several = rows.iter().map(|r| &r.manifest).collect::<BTreeSet<_>>().len() > 1;
    let swept = rows.iter().any(|r| r.variant.is_some());
    let keep = |i: usize| swept || i != 1;
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    };
    let mut head: Vec<String> =
        HEADERS.iter().enumerate().filter(|(i, _)| keep(*i)).map(|(_, h)| h.to_string()).collect();
    if several {
        head.insert(0, "manifest".into());
    }
    let rule = head.iter().map(|h| "-".repeat(h.len().max(3))).collect();
    line(head);
    line(rule);
    for r in rows {
        let mut cells: Vec<String> = display_cells(r)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(_, c)| c)
            .collect();
        if several {
            cells.insert(0, r.manifest.clone());
        }
        line(cells);
    }
    out
}

/// CSV with raw numbers; missing values are empty fields.
pub fn to_csv(rows: &[ReportRow]) -> String {
    let mut out = String::from(
        "manifest,variant,stage,label,evaluated,fid,macs,params,training_steps,models,samples,sampling_seconds\n",
    );
    let opt = |v: Option<String>| v.unwrap_or_default();
    for r in rows {
        let fields = [
            csv_field(&r.manifest),
            csv_field(r.variant.as_deref().unwrap_or("")),
            csv_field(&r.stage),
            csv_field(&r.label),
            r.evaluated.to_string(),
            opt(r.fid.map(|v| v.to_string())),
            opt(r.macs.map(|v| v.to_string())),
            opt(r.params.map(|v| v.to_string())),
            r.training_steps.to_string(),
            opt(r.models.map(|v| v.to_string())),
            opt(r.samples.map(|v| v.to_string())),
            opt(r.sampling_seconds.map(|v| v.to_string())),
        ];
        let _ = writeln!(out, "{}", fields.join(","));
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(evaluated: bool) -> ReportRow {
        ReportRow {
            manifest: "m".into(),
            stage: "eval".into(),
            label: "IDDPM, ours".into(),
            variant: None,
            key: "k".into(),
            evaluated,
            fid: evaluated.then_some(3.76),
            macs: evaluated.then_some(6.56e9),
            params: evaluated.then_some(48.7e6),
            training_steps: 450000,
            models: evaluated.then_some(10),
            samples: evaluated.then_some(50000),
            sampling_seconds: evaluated.then_some(12.0),
        }
    }

    #[test]
    fn markdown_shows_missing_not_zeros() {
        let md = to_markdown(&[row(true), row(false)]);
        assert!(
            md.contains("| IDDPM, ours | eval | 3.76 | 6.56G | 48.70M | 450000 | 50000 | 12.0 |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| IDDPM, ours | eval | missing | missing | missing | 450000 | missing | missing |"
            ),
            "{md}"
        );
    }

    #[test]
    fn csv_quotes_and_leaves_missing_empty() {
        let csv = to_csv(&[row(false)]);
        assert_eq!(csv.lines().nth(1).unwrap(), "m,,eval,\"IDDPM, ours\",false,,,,450000,,,");
    }
}

/// How `progdiff fid` gets features from image folders.
#[derive(Clone, Debug)]
pub struct FidOptions {
    /// A TorchScript extractor (e.g. pytorch-fid's InceptionV3 exported by `torch.jit.trace`).
    pub extractor: Option<std::path::PathBuf>,
    /// Its square input size.
    pub size: usize,
    /// Images per extractor call.
    pub batch_size: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

/// The statistics of `path`: a pytorch-fid `.npz` file (read here), or a folder of images run
/// through the extractor by `progdiff-worker stats` (feature extraction needs libtorch).
pub fn statistics_of(
    path: &std::path::Path,
    opts: &FidOptions,
) -> anyhow::Result<progdiff_kinds::fid::Statistics> {
    use progdiff_kinds::fid;
    if path.is_file() {
        return Ok(fid::read_stats(path)?);
    }
    anyhow::ensure!(
        path.is_dir(),
        "`{}` is neither a statistics file nor a folder",
        path.display()
    );
    let module = opts.extractor.as_ref().context(
        "computing statistics of an image folder needs a feature extractor\nhint: pass \
         `--extractor inception.pt` (a TorchScript module; see the README)",
    )?;
    let tmp = tempfile::Builder::new().prefix("progdiff-stats-").suffix(".npz").tempfile()?;
    let worker = crate::worker::binary()?;
    let status = std::process::Command::new(&worker)
        .arg("stats")
        .arg(path)
        .arg(tmp.path())
        .arg("--extractor")
        .arg(module)
        .args(["--size", &opts.size.to_string()])
        .args(["--batch-size", &opts.batch_size.to_string()])
        .args(["--device", &opts.device])
        .status()
        .with_context(|| format!("starting `{}`", worker.display()))?;
    anyhow::ensure!(
        status.success(),
        "computing the statistics of `{}` failed ({status})",
        path.display()
    );
    Ok(fid::read_stats(tmp.path())?)
}
