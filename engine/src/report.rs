//! `progdiff report`: the evaluated results of one or more manifests as a table like the
//! paper's — one row per `evaluate` stage instance with its FID and KID, params and MACs
//! averaged over the sampled timesteps, sampling time, and the training steps of the model
//! stages upstream.
//!
//! The variants of a manifest that differ only by their seed axis (`seeds: N`, or
//! `sweep: { product: { seed: [...] } }`) are replicates of one configuration: their rows fold
//! into one, whose numbers are the mean over the seeds, with the sample standard deviation, the
//! 95% confidence interval of the mean (Student t, [`crate::summary`]) and n in
//! [`ReportRow::stats`]; `seeds` keeps every seed's own values (the CSV has one line per seed).
//!
//! Reports read only the cache: an instance whose current key has no record is a row marked
//! missing, with empty cells, never zeros; a folded row's numbers are over the seeds evaluated
//! so far (`n` says how many).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use anyhow::Context as _;
use progdiff_cache::Cache;
use progdiff_kinds::evaluate::{EvaluateMetrics, METRICS_FILE};
use serde::Serialize;

use crate::dag::Dag;
use crate::manifest::{Experiment, Manifest};
use crate::plan;
use crate::summary::Summary;
use progdiff_kinds::evaluate::Evaluate;
use progdiff_kinds::train::Train;

/// One row of a report: one evaluation, or the evaluations of one configuration's seeds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportRow {
    /// Manifest name.
    pub manifest: String,
    /// The evaluate stage instance.
    pub stage: String,
    /// Row name: the stage's `label`, or its id.
    pub label: String,
    /// The sweep variant the row belongs to, without its seed part for folded seeds; `None`
    /// without a sweep, and for an evaluation every variant shares (the baseline, typically).
    pub variant: Option<String>,
    /// The evaluation's cache key (the first seed's, for folded seeds).
    pub key: String,
    /// Whether the current key's results are in the cache (of every seed, for folded seeds).
    pub evaluated: bool,
    /// FID (the mean over the seeds evaluated; absent when none is, or without an extractor).
    pub fid: Option<f64>,
    /// KID, the mean over subsets (and over the seeds evaluated).
    pub kid: Option<f64>,
    /// MACs per image averaged over the sampled timesteps (mean over seeds).
    pub macs: Option<f64>,
    /// Params averaged over the sampled timesteps (mean over seeds).
    pub params: Option<f64>,
    /// Training steps of every `train` stage instance upstream, summed.
    pub training_steps: usize,
    /// Models sampled with (1 or the group count).
    pub models: Option<usize>,
    /// Images sampled (per seed).
    pub samples: Option<usize>,
    /// Wall-clock seconds of sampling (mean over seeds).
    pub sampling_seconds: Option<f64>,
    /// Mean, standard deviation, 95% CI and n of each metric over the seeds evaluated.
    pub stats: Stats,
    /// Each seed's evaluation (one for a row without a seed axis).
    pub seeds: Vec<SeedResult>,
}

/// [`Summary`] of each metric over a row's seeds (absent where no seed has the metric).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    /// FID.
    pub fid: Option<Summary>,
    /// KID (of the per-seed means over subsets).
    pub kid: Option<Summary>,
    /// MACs.
    pub macs: Option<Summary>,
    /// Params.
    pub params: Option<Summary>,
    /// Sampling seconds.
    pub sampling_seconds: Option<Summary>,
}

/// One seed's evaluation in a row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeedResult {
    /// The manifest's `seed:` in this variant.
    pub seed: u64,
    /// The full variant name (`groups=4,seed=1`), for a sweep.
    pub variant: Option<String>,
    /// The evaluation's cache key.
    pub key: String,
    /// Whether its results are in the cache.
    pub evaluated: bool,
    /// FID.
    pub fid: Option<f64>,
    /// KID: mean over subsets.
    pub kid: Option<f64>,
    /// KID: standard deviation over subsets.
    pub kid_std: Option<f64>,
    /// MACs.
    pub macs: Option<f64>,
    /// Params.
    pub params: Option<f64>,
    /// Models sampled with.
    pub models: Option<usize>,
    /// Images sampled.
    pub samples: Option<usize>,
    /// Sampling seconds.
    pub sampling_seconds: Option<f64>,
    /// The evaluation's `samples.png` (a cache object), when it wrote one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grid: Option<progdiff_cache::Digest>,
}

impl ReportRow {
    /// A row of the evaluations `seeds` (in seed order) of one configuration.
    fn fold(first: &ReportRow, seeds: Vec<SeedResult>) -> ReportRow {
        let done: Vec<&SeedResult> = seeds.iter().filter(|s| s.evaluated).collect();
        let summary = |f: &dyn Fn(&SeedResult) -> Option<f64>| {
            Summary::of(&done.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
        };
        let stats = Stats {
            fid: summary(&|s| s.fid),
            kid: summary(&|s| s.kid),
            macs: summary(&|s| s.macs),
            params: summary(&|s| s.params),
            sampling_seconds: summary(&|s| s.sampling_seconds),
        };
        ReportRow {
            manifest: first.manifest.clone(),
            stage: first.stage.clone(),
            label: first.label.clone(),
            variant: first.variant.clone(),
            key: seeds[0].key.clone(),
            evaluated: seeds.iter().all(|s| s.evaluated),
            fid: stats.fid.map(|s| s.mean),
            kid: stats.kid.map(|s| s.mean),
            macs: stats.macs.map(|s| s.mean),
            params: stats.params.map(|s| s.mean),
            training_steps: first.training_steps,
            models: done.first().and_then(|s| s.models),
            samples: done.first().and_then(|s| s.samples),
            sampling_seconds: stats.sampling_seconds.map(|s| s.mean),
            stats,
            seeds,
        }
    }

    /// Seeds evaluated, of how many.
    pub fn seeds_evaluated(&self) -> (usize, usize) {
        (self.seeds.iter().filter(|s| s.evaluated).count(), self.seeds.len())
    }
}

/// The rows of manifest `m`, in the manifest's stage order: one per evaluation, each with its
/// one seed.
pub fn report(m: &Manifest, cache: &Cache) -> anyhow::Result<Vec<ReportRow>> {
    let dag = Dag::build(m);
    let plan = plan::plan(m, &dag, cache)?;
    let mut rows = Vec::new();
    for (i, inst) in dag.instances.iter().enumerate() {
        let Some(p) = m.stages[inst.stage].params.get::<Evaluate>() else { continue };
        let record = plan.stages[i].record.as_ref();
        let metrics = match record.and_then(|r| r.outputs.get(METRICS_FILE)) {
            Some(o) => {
                let bytes = cache.read_object(&o.digest)?;
                Some(
                    serde_json::from_slice::<EvaluateMetrics>(&bytes)
                        .with_context(|| format!("reading the metrics of `{}`", inst.id))?,
                )
            }
            None => None,
        };
        let x = metrics.as_ref();
        let seed = SeedResult {
            seed: m.seed,
            variant: m.variant.clone(),
            key: plan.stages[i].key.to_string(),
            evaluated: metrics.is_some(),
            fid: x.and_then(|x| x.fid),
            kid: x.and_then(|x| x.kid.as_ref()).map(|k| k.mean),
            kid_std: x.and_then(|x| x.kid.as_ref()).map(|k| k.std),
            macs: x.map(|x| x.macs),
            params: x.map(|x| x.params),
            models: x.map(|x| x.models),
            samples: x.map(|x| x.samples),
            sampling_seconds: x.map(|x| x.sampling_seconds),
            grid: metrics
                .as_ref()
                .and(record)
                .and_then(|r| r.outputs.get(progdiff_kinds::evaluate::GRID_FILE))
                .map(|o| o.digest),
        };
        let row = ReportRow {
            manifest: m.name.clone(),
            stage: inst.id.clone(),
            label: p.label_or(&inst.id).to_string(),
            variant: m.variant.clone(),
            key: seed.key.clone(),
            evaluated: false,
            fid: None,
            kid: None,
            macs: None,
            params: None,
            training_steps: training_steps(m, &dag, i),
            models: None,
            samples: None,
            sampling_seconds: None,
            stats: Stats::default(),
            seeds: Vec::new(),
        };
        rows.push(ReportRow::fold(&row, vec![seed]));
    }
    // Keep manifest order of stages (the DAG's order is topological).
    let order: Vec<&str> = m.stages.iter().map(|s| s.name.as_str()).collect();
    rows.sort_by_key(|r| {
        let base = r.stage.split('[').next().unwrap_or(&r.stage);
        order.iter().position(|s| *s == base)
    });
    Ok(rows)
}

/// The rows of every variant of an experiment. The variants that differ only by their seed
/// axis are folded: one row per evaluation stage and configuration, over its seeds. Then an
/// evaluation with the same key(s) in every configuration (e.g. of the base model) is one row
/// without a variant; the others are one row per configuration. Rows follow the manifest's stage
/// order, configurations in sweep order within a stage.
pub fn report_experiment(exp: &Experiment, cache: &Cache) -> anyhow::Result<Vec<ReportRow>> {
    if !exp.is_sweep() {
        return report(&exp.variants[0], cache);
    }
    // Configurations: the variants with one seed group (each variant alone without one).
    let mut groups: Vec<(Option<String>, Vec<Vec<ReportRow>>)> = Vec::new();
    for m in &exp.variants {
        let rows = report(m, cache)?;
        let name = match &m.seed_group {
            Some(g) => (!g.is_empty()).then(|| g.clone()),
            None => m.variant.clone(),
        };
        match groups.iter_mut().find(|(n, _)| m.seed_group.is_some() && *n == name) {
            Some((_, members)) => members.push(rows),
            None => groups.push((name, vec![rows])),
        }
    }
    let mut rows: Vec<ReportRow> = Vec::new();
    let mut seen: HashMap<(String, Vec<String>), (usize, usize)> = HashMap::new();
    for (name, members) in &groups {
        for first in &members[0] {
            // Replicates differ only by their seed: they have the same evaluations.
            let seeds: Vec<SeedResult> = members
                .iter()
                .filter_map(|rows| rows.iter().find(|r| r.stage == first.stage))
                .map(|r| r.seeds[0].clone())
                .collect();
            let mut row = ReportRow::fold(first, seeds);
            row.variant = name.clone();
            let keys = row.seeds.iter().map(|s| s.key.clone()).collect();
            match seen.get_mut(&(row.stage.clone(), keys)) {
                Some((_, n)) => *n += 1,
                None => {
                    let keys = row.seeds.iter().map(|s| s.key.clone()).collect();
                    seen.insert((row.stage.clone(), keys), (rows.len(), 1));
                    rows.push(row);
                }
            }
        }
    }
    for (i, n) in seen.into_values() {
        if n == groups.len() {
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

/// A metric's cell: the value for one seed, `mean ± ci95 (sd std)` over several that differ,
/// `-` where the evaluations have no such value, `missing` where none ran.
fn stat_cell(s: Option<Summary>, r: &ReportRow, f: &dyn Fn(f64) -> String) -> String {
    match s {
        Some(Summary { mean, std: Some(sd), ci95: Some(ci), .. }) if sd > 0.0 => {
            format!("{} ± {} (sd {})", f(mean), f(ci), f(sd))
        }
        Some(s) => f(s.mean),
        None => cell(None, r.seeds_evaluated().0 > 0),
    }
}

/// The columns of the markdown table, in order.
#[derive(Clone, Copy, PartialEq)]
enum Column {
    Model,
    Variant,
    Stage,
    Seeds,
    Fid,
    Kid,
    Macs,
    Params,
    TrainingSteps,
    Samples,
    SamplingSeconds,
}

const COLUMNS: [Column; 11] = [
    Column::Model,
    Column::Variant,
    Column::Stage,
    Column::Seeds,
    Column::Fid,
    Column::Kid,
    Column::Macs,
    Column::Params,
    Column::TrainingSteps,
    Column::Samples,
    Column::SamplingSeconds,
];

impl Column {
    fn header(self, folded: bool) -> &'static str {
        match (self, folded) {
            (Column::Model, _) => "model",
            (Column::Variant, _) => "variant",
            (Column::Stage, _) => "stage",
            (Column::Seeds, _) => "seeds",
            (Column::Fid, false) => "FID",
            (Column::Fid, true) => "FID, mean ± 95% CI (sd)",
            (Column::Kid, false) => "KID ×10³",
            (Column::Kid, true) => "KID ×10³, mean ± 95% CI (sd)",
            (Column::Macs, _) => "FLOPs (MACs)",
            (Column::Params, _) => "params",
            (Column::TrainingSteps, _) => "training steps",
            (Column::Samples, _) => "samples",
            (Column::SamplingSeconds, _) => "sampling s",
        }
    }

    fn cell(self, r: &ReportRow) -> String {
        let e = r.evaluated;
        match self {
            Column::Model => r.label.clone(),
            Column::Variant => r.variant.clone().unwrap_or_else(|| SHARED.into()),
            Column::Stage => r.stage.clone(),
            Column::Seeds => match r.seeds_evaluated() {
                (done, all) if done == all => all.to_string(),
                (done, all) => format!("{done}/{all}"),
            },
            Column::Fid => stat_cell(r.stats.fid, r, &|v| format!("{v:.2}")),
            Column::Kid => stat_cell(r.stats.kid, r, &|v| format!("{:.2}", v * 1e3)),
            Column::Macs => stat_cell(r.stats.macs, r, &|v| si(v)),
            Column::Params => stat_cell(r.stats.params, r, &|v| si(v)),
            Column::TrainingSteps => r.training_steps.to_string(),
            Column::Samples => cell(r.samples.map(|s| s.to_string()), e),
            Column::SamplingSeconds => {
                stat_cell(r.stats.sampling_seconds, r, &|v| format!("{v:.1}"))
            }
        }
    }
}

/// The variant cell of an evaluation every variant shares.
const SHARED: &str = "(all)";

/// A markdown table; with several manifests, a `manifest` column first; with sweep variants, a
/// `variant` column; with folded seeds, a `seeds` column (`2/3` while some are missing) and
/// `mean ± 95% CI (sd)` cells for the metrics that differ between seeds.
pub fn to_markdown(rows: &[ReportRow]) -> String {
    let several = rows.iter().map(|r| &r.manifest).collect::<BTreeSet<_>>().len() > 1;
    let swept = rows.iter().any(|r| r.variant.is_some());
    let folded = rows.iter().any(|r| r.seeds.len() > 1);
    let columns: Vec<Column> = COLUMNS
        .into_iter()
        .filter(|c| match c {
            Column::Variant => swept,
            Column::Seeds => folded,
            _ => true,
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    };
    let mut head: Vec<String> = columns.iter().map(|c| c.header(folded).to_string()).collect();
    if several {
        head.insert(0, "manifest".into());
    }
    let rule = head.iter().map(|h| "-".repeat(h.chars().count().max(3))).collect();
    line(head);
    line(rule);
    for r in rows {
        let mut cells: Vec<String> = columns.iter().map(|c| c.cell(r)).collect();
        if several {
            cells.insert(0, r.manifest.clone());
        }
        line(cells);
    }
    out
}

/// CSV with raw numbers, one line per seed of each row (`variant` is the row's, `seed` the
/// seed's); missing values are empty fields.
pub fn to_csv(rows: &[ReportRow]) -> String {
    let mut out = String::from(
        "manifest,variant,seed,stage,label,evaluated,fid,kid,kid_std,macs,params,training_steps,\
         models,samples,sampling_seconds\n",
    );
    let opt = |v: Option<String>| v.unwrap_or_default();
    for r in rows {
        for s in &r.seeds {
            let fields = [
                csv_field(&r.manifest),
                csv_field(r.variant.as_deref().unwrap_or("")),
                s.seed.to_string(),
                csv_field(&r.stage),
                csv_field(&r.label),
                s.evaluated.to_string(),
                opt(s.fid.map(|v| v.to_string())),
                opt(s.kid.map(|v| v.to_string())),
                opt(s.kid_std.map(|v| v.to_string())),
                opt(s.macs.map(|v| v.to_string())),
                opt(s.params.map(|v| v.to_string())),
                r.training_steps.to_string(),
                opt(s.models.map(|v| v.to_string())),
                opt(s.samples.map(|v| v.to_string())),
                opt(s.sampling_seconds.map(|v| v.to_string())),
            ];
            let _ = writeln!(out, "{}", fields.join(","));
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(seed: u64, evaluated: bool, fid: f64, kid: f64, macs: f64) -> SeedResult {
        SeedResult {
            seed,
            variant: Some(format!("seed={seed}")),
            key: format!("k{seed}"),
            evaluated,
            fid: evaluated.then_some(fid),
            kid: evaluated.then_some(kid),
            kid_std: evaluated.then_some(kid / 10.0),
            macs: evaluated.then_some(macs),
            params: evaluated.then_some(48.7e6),
            models: evaluated.then_some(10),
            samples: evaluated.then_some(50000),
            sampling_seconds: evaluated.then_some(12.0 + seed as f64),
            grid: None,
        }
    }

    fn template() -> ReportRow {
        ReportRow {
            manifest: "m".into(),
            stage: "eval".into(),
            label: "IDDPM, ours".into(),
            variant: None,
            key: String::new(),
            evaluated: false,
            fid: None,
            kid: None,
            macs: None,
            params: None,
            training_steps: 450000,
            models: None,
            samples: None,
            sampling_seconds: None,
            stats: Stats::default(),
            seeds: Vec::new(),
        }
    }

    fn row(evaluated: bool) -> ReportRow {
        ReportRow::fold(&template(), vec![seed(0, evaluated, 3.76, 0.0123, 6.56e9)])
    }

    #[test]
    fn markdown_shows_missing_not_zeros() {
        let md = to_markdown(&[row(true), row(false)]);
        assert!(
            md.contains(
                "| IDDPM, ours | eval | 3.76 | 12.30 | 6.56G | 48.70M | 450000 | 50000 | 12.0 |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| IDDPM, ours | eval | missing | missing | missing | missing | 450000 | missing | \
                 missing |"
            ),
            "{md}"
        );
        assert!(!md.contains("seeds"), "{md}");
    }

    #[test]
    fn csv_quotes_and_leaves_missing_empty() {
        let csv = to_csv(&[row(false)]);
        assert_eq!(csv.lines().nth(1).unwrap(), "m,,0,eval,\"IDDPM, ours\",false,,,,,,450000,,,");
    }

    /// Issue 13: three seeds fold into one row with the mean, sample standard deviation and
    /// Student-t 95% interval computed by hand; CSV and JSON keep each seed's values.
    #[test]
    fn three_seeds_fold_into_one_row() {
        let r = ReportRow::fold(
            &template(),
            vec![
                seed(0, true, 10.0, 0.010, 5e6),
                seed(1, true, 12.0, 0.020, 5e6),
                seed(2, true, 17.0, 0.060, 5e6),
            ],
        );
        // FID 10, 12, 17: mean 13, squared deviations 9 + 1 + 16 = 26, variance 26 / 2 = 13;
        // t(0.975, 2 dof) = 4.302652729749462 (tables), CI half-width t sd / sqrt(3).
        let fid = r.stats.fid.unwrap();
        assert_eq!((fid.mean, fid.n), (13.0, 3));
        assert!((fid.std.unwrap() - 13f64.sqrt()).abs() < 1e-12);
        let ci = 4.302652729749462 * 13f64.sqrt() / 3f64.sqrt();
        assert!((fid.ci95.unwrap() - ci).abs() < 1e-9, "{fid:?}");
        assert_eq!(r.fid, Some(13.0));
        // KID 0.01, 0.02, 0.06: mean 0.03, variance (0.0004 + 0.0001 + 0.0009) / 2 = 0.0007.
        let kid = r.stats.kid.unwrap();
        assert!((kid.mean - 0.03).abs() < 1e-15);
        assert!((kid.std.unwrap() - 0.0007f64.sqrt()).abs() < 1e-15);
        // Equal MACs: no spread. Sampling seconds 12, 13, 14: sd 1.
        let macs = r.stats.macs.unwrap();
        assert_eq!((macs.mean, macs.std), (5e6, Some(0.0)));
        assert_eq!(r.stats.sampling_seconds.unwrap().std, Some(1.0));
        assert!(r.evaluated);
        assert_eq!(r.key, "k0");

        let md = to_markdown(std::slice::from_ref(&r));
        let header = md.lines().next().unwrap();
        assert_eq!(
            header,
            "| model | stage | seeds | FID, mean ± 95% CI (sd) | KID ×10³, mean ± 95% CI (sd) | \
             FLOPs (MACs) | params | training steps | samples | sampling s |"
        );
        let line = md.lines().nth(2).unwrap();
        assert_eq!(
            line,
            format!(
                "| IDDPM, ours | eval | 3 | 13.00 ± {ci:.2} (sd 3.61) | 30.00 ± {:.2} (sd {:.2}) \
                 | 5.00M | 48.70M | 450000 | 50000 | 13.0 ± {:.1} (sd 1.0) |",
                kid.ci95.unwrap() * 1e3,
                0.0007f64.sqrt() * 1e3,
                4.302652729749462 / 3f64.sqrt()
            )
        );
        // CSV: one line per seed, with its own values.
        let csv = to_csv(std::slice::from_ref(&r));
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 4, "{csv}");
        assert!(lines[3].starts_with("m,,2,eval,\"IDDPM, ours\",true,17,0.06,0.006,"), "{csv}");
        // JSON: the stats and every seed.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["seeds"].as_array().unwrap().len(), 3);
        assert_eq!(json["seeds"][1]["fid"], 12.0);
        assert_eq!(json["stats"]["fid"]["n"], 3);
        assert_eq!(json["fid"], 13.0);
    }

    #[test]
    fn a_missing_seed_is_counted_and_left_out_of_the_numbers() {
        let r = ReportRow::fold(
            &template(),
            vec![
                seed(0, true, 10.0, 0.01, 5e6),
                seed(1, false, 0.0, 0.0, 0.0),
                seed(2, true, 12.0, 0.02, 5e6),
            ],
        );
        assert!(!r.evaluated);
        assert_eq!(r.seeds_evaluated(), (2, 3));
        assert_eq!(r.stats.fid.unwrap().n, 2);
        assert_eq!(r.fid, Some(11.0));
        let md = to_markdown(&[r]);
        assert!(md.contains("| IDDPM, ours | eval | 2/3 | 11.00 ± "), "{md}");
    }
}
