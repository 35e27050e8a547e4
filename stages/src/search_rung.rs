//! `search_rung`: one rung of a successive-halving search (a pipeline's
//! `[search]`): the objective of every configuration that ran at this
//! rung's budget, averaged over its replicates (seeds), and which
//! configurations go on to the next rung (the best 1/eta), or, at the last
//! rung, the winner.
//!
//! The engine creates these instances from `[search]` (one per rung, named
//! `search[steps=100]` after the budget) and reads their decision to decide
//! what runs next; a pipeline file does not declare them. Because a
//! decision is an ordinary cached output, whose key hashes the evaluations
//! it read, a rerun of a finished search recomputes nothing.
//!
//! Output `decision` (a folder): `decision.json` ([`Decision`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use xlpipe_eval::results::{Results, ALL, ANY};
use xlpipe_eval::stats::mean_ci;
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct SearchRungStage;

/// Whether the objective is to be made large or small.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    Max,
    Min,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRungParams {
    /// 0 for the first rung.
    pub rung: usize,
    /// The budget every configuration of this rung trained with.
    pub budget: u64,
    /// The grid variables searched over (a configuration is their values).
    pub over: Vec<String>,
    /// The grid variable averaged within a configuration (e.g. `seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicate: Option<String>,
    /// `setting.metric` of the evaluation's headline rows, e.g. `multi.map`;
    /// the objective is their mean.
    pub metrics: Vec<String>,
    pub goal: Goal,
    /// Keep the best 1/eta of the configurations (at least one).
    pub eta: usize,
    /// The last rung: keep one, the winner.
    pub last: bool,
}

/// One configuration at one rung.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RungRow {
    /// Values of the searched grid variables.
    pub config: BTreeMap<String, serde_json::Value>,
    /// Objective per replicate (its grid value as text) and the instance
    /// whose evaluation gave it.
    pub replicates: BTreeMap<String, f64>,
    pub mean: f64,
    /// Half-width of the 95% t interval over replicates (none with one).
    pub ci: Option<f64>,
    pub promoted: bool,
}

/// What a rung decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub rung: usize,
    pub budget: u64,
    pub metrics: Vec<String>,
    pub goal: Goal,
    /// Best first (ties: the grid's order).
    pub rows: Vec<RungRow>,
    /// The configuration that won (last rung only).
    pub winner: Option<BTreeMap<String, serde_json::Value>>,
    /// The rungs before this one, first first.
    pub history: Vec<Decision>,
}

impl Decision {
    pub const FILE: &'static str = "decision.json";

    /// Read a `search_rung` output folder.
    pub fn read(dir: &Path) -> anyhow::Result<Decision> {
        let path = dir.join(Self::FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Whether `config` goes on to the next rung.
    pub fn promotes(&self, config: &BTreeMap<String, serde_json::Value>) -> bool {
        self.rows.iter().any(|r| r.promoted && r.config == *config)
    }

    /// What became of a row: `winner`, `promoted` or `stopped`.
    pub fn fate(&self, row: &RungRow) -> &'static str {
        match (&self.winner, row.promoted) {
            (Some(w), _) if *w == row.config => "winner",
            (None, true) => "promoted",
            _ => "stopped",
        }
    }

    /// This rung's row of `config`, if it ran here.
    pub fn row(&self, config: &BTreeMap<String, serde_json::Value>) -> Option<&RungRow> {
        self.rows.iter().find(|r| r.config == *config)
    }
}

/// The value of `setting.metric` among an evaluation's headline rows.
pub fn objective_metric(results: &Results, name: &str) -> Option<f64> {
    let (setting, metric) = name.split_once('.')?;
    results
        .rows
        .iter()
        .find(|r| {
            r.setting == setting
                && r.metric == metric
                && r.query_lang == ALL
                && (r.candidate_lang == ALL || r.candidate_lang == ANY)
        })
        .map(|r| r.value)
}

impl TypedStage for SearchRungStage {
    type Params = SearchRungParams;
    const KIND: &'static str = "search_rung";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "one rung of a [search]: objective per configuration, who goes on (made by the engine)";

    fn validate(
        &self,
        p: SearchRungParams,
        _env: &ParamsEnv,
    ) -> Result<SearchRungParams, ParamError> {
        if p.eta < 2 {
            return Err(ParamError::new("eta", "must be at least 2"));
        }
        if p.metrics.is_empty() {
            return Err(ParamError::new("metrics", "name at least one metric"));
        }
        Ok(p)
    }

    fn interface_for(&self, _p: &SearchRungParams, _: &[String]) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![InputSlot::many("results"), InputSlot::optional("previous")],
            outputs: vec!["decision".into()],
            ..Interface::default()
        })
    }

    fn execute(&self, p: &SearchRungParams, ctx: &StageContext) -> anyhow::Result<()> {
        let mut decision = decide(p, ctx)?;
        if let [previous] = ctx.inputs("previous") {
            let mut previous = Decision::read(&previous.path)?;
            decision.history = std::mem::take(&mut previous.history);
            decision.history.push(previous);
        }
        let out = ctx.output("decision");
        std::fs::create_dir_all(&out)?;
        std::fs::write(
            out.join(Decision::FILE),
            serde_json::to_vec_pretty(&decision)?,
        )?;
        if p.last {
            plot_objective(&decision, &out)?;
        }
        Ok(())
    }

    fn render_output(&self, output: &Path) -> anyhow::Result<Option<String>> {
        Ok(Some(render(&Decision::read(output)?)))
    }
}

/// Rank the configurations of this rung's evaluations.
fn decide(p: &SearchRungParams, ctx: &StageContext) -> anyhow::Result<Decision> {
    // Configurations in the order their evaluations come (the grid's).
    let mut rows: Vec<RungRow> = Vec::new();
    for artifact in ctx.inputs("results") {
        let results = Results::read(&artifact.path)
            .with_context(|| format!("reading the results of {}", artifact.producer))?;
        let mut values = Vec::new();
        for name in &p.metrics {
            let value = objective_metric(&results, name).with_context(|| {
                let mut have: Vec<String> = results
                    .rows
                    .iter()
                    .filter(|r| r.query_lang == ALL)
                    .map(|r| format!("{}.{}", r.setting, r.metric))
                    .collect();
                have.sort();
                have.dedup();
                format!(
                    "objective metric `{name}` is not in the results of {} (they have: {})",
                    artifact.producer,
                    have.join(", ")
                )
            })?;
            values.push(value);
        }
        let objective = values.iter().sum::<f64>() / values.len() as f64;
        anyhow::ensure!(
            objective.is_finite(),
            "the objective of {} is {objective}",
            artifact.producer
        );
        let grid_value = |var: &str| {
            artifact
                .grid
                .get(var)
                .cloned()
                .with_context(|| format!("{} does not vary over `{var}`", artifact.producer))
        };
        let mut config = BTreeMap::new();
        for var in &p.over {
            config.insert(var.clone(), grid_value(var)?);
        }
        let replicate = match &p.replicate {
            Some(var) => grid_value(var)?.to_string(),
            None => String::new(),
        };
        let row = match rows.iter_mut().find(|r| r.config == config) {
            Some(row) => row,
            None => {
                rows.push(RungRow {
                    config,
                    replicates: BTreeMap::new(),
                    mean: f64::NAN,
                    ci: None,
                    promoted: false,
                });
                rows.last_mut().expect("just pushed")
            }
        };
        anyhow::ensure!(
            row.replicates.insert(replicate, objective).is_none(),
            "two evaluations of {} at one replicate",
            artifact.producer
        );
    }
    anyhow::ensure!(!rows.is_empty(), "no evaluation reached this rung");
    for row in &mut rows {
        let values: Vec<f64> = row.replicates.values().copied().collect();
        (row.mean, row.ci) = mean_ci(&values);
    }
    // A stable sort: ties keep the grid's order.
    rows.sort_by(|a, b| {
        let order = a.mean.total_cmp(&b.mean);
        match p.goal {
            Goal::Max => order.reverse(),
            Goal::Min => order,
        }
    });
    let keep = if p.last {
        1
    } else {
        (rows.len() / p.eta).max(1)
    };
    for row in rows.iter_mut().take(keep) {
        row.promoted = true;
    }
    Ok(Decision {
        rung: p.rung,
        budget: p.budget,
        metrics: p.metrics.clone(),
        goal: p.goal,
        winner: p.last.then(|| rows[0].config.clone()),
        rows,
        history: Vec::new(),
    })
}

/// `objective.svg` / `.png`: each configuration's mean objective (with its
/// interval over replicates) at every budget it reached.
fn plot_objective(last: &Decision, dir: &Path) -> anyhow::Result<()> {
    let mut lines: Vec<crate::report::ChartLine> = Vec::new();
    for rung in last.history.iter().chain([last]) {
        for row in &rung.rows {
            let label = config_text(&row.config);
            let point = (rung.budget as f64, row.mean, row.ci);
            match lines.iter_mut().find(|(l, _)| *l == label) {
                Some((_, points)) => points.push(point),
                None => lines.push((label, vec![point])),
            }
        }
    }
    let y_label = format!("mean of {}", last.metrics.join(", "));
    crate::report::write_line_chart(
        dir,
        "objective",
        (
            "search: objective by budget (95% interval over replicates)",
            "budget",
            &y_label,
        ),
        &lines,
    )
}

/// A configuration as `alpha=0.5,lr=0.001`.
pub fn config_text(config: &BTreeMap<String, serde_json::Value>) -> String {
    config
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The rung as a table for `xlpipe report` / `show`.
fn render(d: &Decision) -> String {
    let mut out = format!(
        "rung {} (budget {}): objective = mean of {} ({})\n",
        d.rung,
        d.budget,
        d.metrics.join(", "),
        match d.goal {
            Goal::Max => "higher is better",
            Goal::Min => "lower is better",
        }
    );
    for row in &d.rows {
        let ci = row.ci.map_or(String::new(), |ci| format!(" ± {ci:.4}"));
        let fate = d.fate(row);
        out += &format!(
            "  {:<24} {:.4}{ci} over {} replicate(s)  {fate}\n",
            config_text(&row.config),
            row.mean,
            row.replicates.len()
        );
    }
    out
}
