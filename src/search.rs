//! `[search]`: successive halving over grid variables, as ordinary cached
//! instances.
//!
//! ```toml
//! [search]
//! over = ["alpha"]                 # grid variables searched
//! replicate = "seed"               # averaged within a configuration
//! budget = { stage = "train", param = "steps", min = 100, max = 400, eta = 2 }
//! objective = { stage = "valid_eval", metrics = ["mono.map", "multi.map"], goal = "max" }
//! ```
//!
//! Expansion ([`prepare`], before the grid is expanded) makes the budget a
//! grid variable named after its param (`steps = [100, 200, 400]`) that the
//! budget stage uses, so every rung is an ordinary grid instance with an
//! ordinary key. [`attach`] (after) adds one `search_rung` instance per
//! rung, `search[steps=100]`, which reads the objective stage's results at
//! that budget and decides who goes on; each budget-stage instance above
//! the first rung is *gated* on the decision below it ([`Gate::Promoted`]),
//! and an input `stage[search=best]` reads only the last rung's winner
//! ([`Gate::Winner`]). The scheduler and `plan` consult gates through
//! [`admission`]; a configuration that is not promoted is *stopped*, as is
//! everything downstream of it. Nothing else in the engine knows about the
//! search: it only reads the decisions' output (`search_rung::Decision`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use xlpipe_stage_api::Stage;
use xlpipe_stages::search_rung::{config_text, Decision, Goal, SearchRungParams};

use crate::cache::Cache;
use crate::diag::{did_you_mean, Diagnostic, Loc};
use crate::pipeline::expand::{Gate, Instance, Pipeline, ResolvedInput, StageDef};
use crate::pipeline::load::{GridVar, PipelineSpec, SearchSpec};

/// The name of the engine-made stage that holds the rungs' decisions.
pub const STAGE: &str = "search";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchTable {
    over: Vec<String>,
    #[serde(default)]
    replicate: Option<String>,
    budget: BudgetTable,
    objective: ObjectiveTable,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetTable {
    stage: String,
    param: String,
    min: u64,
    max: u64,
    eta: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectiveTable {
    stage: String,
    #[serde(default)]
    metric: Option<String>,
    #[serde(default)]
    metrics: Vec<String>,
    #[serde(default = "default_goal")]
    goal: Goal,
}

fn default_goal() -> Goal {
    Goal::Max
}

/// A validated `[search]`.
#[derive(Debug, Clone)]
pub struct Search {
    pub over: Vec<String>,
    pub replicate: Option<String>,
    pub budget_stage: String,
    /// The budget param, also the name of its grid variable.
    pub budget_param: String,
    /// Rung budgets: min, min·eta, … up to max.
    pub budgets: Vec<u64>,
    pub eta: usize,
    pub objective_stage: String,
    pub metrics: Vec<String>,
    pub goal: Goal,
    /// Where `objective` was written (`file:line:column`), for errors
    /// found while running (a metric the evaluation does not write).
    pub objective_at: String,
    spec: SearchSpec,
}

impl Search {
    fn loc(&self, path: &str) -> Loc {
        loc_of(&self.spec, path)
    }
}

fn loc_of(spec: &SearchSpec, path: &str) -> Loc {
    crate::diag::nearest_loc(&spec.locs, path, spec.loc)
}

/// Check `[search]` against the pipeline's grid and stages, add the budget
/// grid variable and point the budget stage's param at it. Errors name the
/// file, line and field.
pub fn prepare(spec: &mut PipelineSpec) -> Result<Option<Search>, Vec<Diagnostic>> {
    let Some(search_spec) = spec.search.clone() else {
        return Ok(None);
    };
    let sources = &spec.sources;
    let error = |path: &str, message: String| {
        let field = if path.is_empty() {
            "search".to_string()
        } else {
            format!("search.{path}")
        };
        sources.error(loc_of(&search_spec, path), &field, message)
    };
    let table: SearchTable = serde_path_to_error::deserialize(toml::Value::Table(
        search_spec.table.clone(),
    ))
    .map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = err.into_inner().to_string();
        vec![error(
            &path,
            message.lines().next().unwrap_or_default().to_string(),
        )]
    })?;
    let mut errors = Vec::new();
    let grid_names: Vec<&str> = spec.grid.iter().map(|g| g.name.as_str()).collect();
    if table.over.is_empty() {
        errors.push(error(
            "over",
            "name at least one grid variable to search over".into(),
        ));
    }
    for (i, var) in table.over.iter().enumerate() {
        if !grid_names.contains(&var.as_str()) {
            errors.push(error(
                &format!("over[{i}]"),
                format!(
                    "`{var}` is not a grid variable{}",
                    did_you_mean(var, grid_names.iter().copied())
                ),
            ));
        }
    }
    if let Some(var) = &table.replicate {
        if !grid_names.contains(&var.as_str()) {
            errors.push(error(
                "replicate",
                format!(
                    "`{var}` is not a grid variable{}",
                    did_you_mean(var, grid_names.iter().copied())
                ),
            ));
        } else if table.over.contains(var) {
            errors.push(error(
                "replicate",
                format!("`{var}` is searched over; a replicate is averaged, not searched"),
            ));
        }
    }
    let stage_names: Vec<&str> = spec.stages.iter().map(|s| s.name.as_str()).collect();
    for (path, name) in [
        ("budget.stage", &table.budget.stage),
        ("objective.stage", &table.objective.stage),
    ] {
        if !stage_names.contains(&name.as_str()) {
            errors.push(error(
                path,
                format!(
                    "no stage named `{name}`{}",
                    did_you_mean(name, stage_names.iter().copied())
                ),
            ));
        }
    }
    if let Some(stage) = spec.stages.iter().find(|s| s.name == STAGE) {
        errors.push(spec.sources.error(
            stage.loc,
            &format!("stages.{STAGE}"),
            format!("the stage name `{STAGE}` is taken by [search]'s rungs; rename this stage"),
        ));
    }
    let budget = &table.budget;
    if budget.eta < 2 {
        errors.push(error(
            "budget.eta",
            format!(
                "eta = {} keeps every configuration; successive halving needs eta >= 2",
                budget.eta
            ),
        ));
    }
    if budget.min == 0 {
        errors.push(error("budget.min", "must be at least 1".into()));
    }
    if budget.max < budget.min {
        errors.push(error(
            "budget.max",
            format!("max ({}) is below min ({})", budget.max, budget.min),
        ));
    }
    if grid_names.contains(&budget.param.as_str()) {
        errors.push(error(
            "budget.param",
            format!(
                "`{}` is also a grid variable; [search] makes the budget one: remove it from [grid]",
                budget.param
            ),
        ));
    }
    let metrics = match (&table.objective.metric, table.objective.metrics.is_empty()) {
        (Some(one), true) => vec![one.clone()],
        (None, false) => table.objective.metrics.clone(),
        (Some(_), false) => {
            errors.push(error(
                "objective.metric",
                "give `metric` or `metrics`, not both".into(),
            ));
            Vec::new()
        }
        (None, true) => {
            errors.push(error(
                "objective",
                "name the objective: metric = \"multi.map\" or metrics = [...] (their mean)".into(),
            ));
            Vec::new()
        }
    };
    for (i, metric) in metrics.iter().enumerate() {
        if !metric
            .split_once('.')
            .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        {
            let path = if table.objective.metric.is_some() {
                "objective.metric".to_string()
            } else {
                format!("objective.metrics[{i}]")
            };
            errors.push(error(
                &path,
                format!("`{metric}` is not SETTING.METRIC, e.g. \"multi.map\" or \"mono.ndcg_10\""),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let configurations: usize = table
        .over
        .iter()
        .filter_map(|var| spec.grid.iter().find(|g| &g.name == var))
        .map(|g| g.values.len())
        .product();
    let budgets = rung_budgets(budget.min, budget.max, budget.eta, configurations);
    spec.grid.push(GridVar {
        name: budget.param.clone(),
        values: budgets
            .iter()
            .map(|&b| toml::Value::Integer(b as i64))
            .collect(),
        loc: loc_of(&search_spec, "budget.param"),
    });
    let stage = spec
        .stages
        .iter_mut()
        .find(|s| s.name == budget.stage)
        .expect("checked above");
    stage.params.insert(
        budget.param.clone(),
        toml::Value::String(format!("${{{}}}", budget.param)),
    );
    stage
        .param_locs
        .insert(budget.param.clone(), loc_of(&search_spec, "budget.param"));
    Ok(Some(Search {
        over: table.over,
        replicate: table.replicate,
        budget_stage: budget.stage.clone(),
        budget_param: budget.param.clone(),
        budgets,
        eta: budget.eta,
        objective_stage: table.objective.stage.clone(),
        metrics,
        goal: table.objective.goal,
        objective_at: {
            let at = sources.error(loc_of(&search_spec, "objective"), "", "");
            format!("{}:{}:{}", at.file.display(), at.line, at.column)
        },
        spec: search_spec,
    }))
}

/// The budgets of the rungs: min, min·eta, … up to max, with one
/// shortcut: once a rung would promote a single configuration, the next
/// rung is the last, at max. A lone configuration has nothing left to be
/// compared with, so the rungs between would only pay for evaluations and
/// decay tails that decide nothing (with 5 alphas and eta 3, rung 0 keeps
/// one: 60 → 300 steps, not 60 → 180 → 300).
fn rung_budgets(min: u64, max: u64, eta: usize, configurations: usize) -> Vec<u64> {
    let mut budgets = vec![min];
    let mut alive = configurations;
    while let Some(&last) = budgets.last() {
        if last >= max {
            break;
        }
        alive = (alive / eta).max(1);
        budgets.push(if alive == 1 {
            max
        } else {
            last.saturating_mul(eta as u64).min(max)
        });
    }
    budgets
}

/// A grid value as JSON, as the stages see their producers' grid values.
pub fn json_value(value: &toml::Value) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// The values of the searched variables in an instance's binding.
pub fn config_of(
    search: &Search,
    grid: &[(String, toml::Value)],
) -> BTreeMap<String, serde_json::Value> {
    grid.iter()
        .filter(|(k, _)| search.over.contains(k))
        .map(|(k, v)| (k.clone(), json_value(v)))
        .collect()
}

fn budget_of(search: &Search, grid: &[(String, toml::Value)]) -> Option<u64> {
    grid.iter()
        .find(|(k, _)| *k == search.budget_param)
        .and_then(|(_, v)| v.as_integer())
        .map(|b| b as u64)
}

/// Add the rung instances, the gates on the budget stage, and the winner
/// gates of `stage[search=best]` inputs. `instances` and `stages` are the
/// expanded pipeline (producers first); the caller reorders afterwards.
pub fn attach(
    search: &Search,
    sources: &crate::diag::Sources,
    kinds: &[Arc<dyn Stage>],
    stages: &mut Vec<StageDef>,
    instances: &mut Vec<Instance>,
) -> Result<(), Vec<Diagnostic>> {
    let stage_index = |name: &str| stages.iter().position(|s| s.name == name);
    let objective = stage_index(&search.objective_stage).expect("checked by prepare");
    let budget_stage = stage_index(&search.budget_stage).expect("checked by prepare");
    let mut errors = Vec::new();
    // A gate finds its configuration in the budget stage's grid values.
    let budget_vars = &stages[budget_stage].vars;
    if let Some(var) = search
        .over
        .iter()
        .chain(&search.replicate)
        .find(|v| !budget_vars.contains(v))
    {
        errors.push(sources.error(
            search.loc("budget.stage"),
            "search.budget.stage",
            format!(
                "stage `{}` does not vary over `{var}`: the budget stage must be the one that \
                 trains each configuration and replicate",
                search.budget_stage
            ),
        ));
        return Err(errors);
    }
    let needs = [&search.budget_param]
        .into_iter()
        .chain(&search.over)
        .chain(&search.replicate);
    for var in needs {
        if !stages[objective].vars.contains(var) {
            errors.push(sources.error(
                search.loc("objective.stage"),
                "search.objective.stage",
                format!(
                    "stage `{}` does not vary over `{var}`: the objective must be an evaluation \
                     downstream of `{}` (it varies over {})",
                    search.objective_stage,
                    search.budget_stage,
                    if stages[objective].vars.is_empty() {
                        "nothing".to_string()
                    } else {
                        stages[objective].vars.join(", ")
                    }
                ),
            ));
            return Err(errors);
        }
    }
    let first = stages[objective].instances.first().copied();
    let output = match first.map(|i| instances[i].outputs.clone()) {
        Some(outputs) if outputs.len() == 1 => outputs[0].clone(),
        Some(outputs) if outputs.iter().any(|o| o == "results") => "results".to_string(),
        _ => {
            errors.push(sources.error(
                search.loc("objective.stage"),
                "search.objective.stage",
                format!(
                    "stage `{}` has no `results` output: the objective is read from an \
                     evaluation's results",
                    search.objective_stage
                ),
            ));
            return Err(errors);
        }
    };
    let kind = kinds
        .iter()
        .find(|k| k.kind() == "search_rung")
        .cloned()
        .expect("the search_rung kind is built in");
    let def_index = stages.len();
    let mut def = StageDef {
        name: STAGE.to_string(),
        kind: kind.clone(),
        vars: vec![search.budget_param.clone()],
        upstream: vec![(objective, true)],
        instances: Vec::new(),
        base_dir: stages[objective].base_dir.clone(),
        executor: None,
    };
    let mut rung_instance = Vec::new();
    for (rung, &budget) in search.budgets.iter().enumerate() {
        let params = SearchRungParams {
            rung,
            budget,
            over: search.over.clone(),
            replicate: search.replicate.clone(),
            metrics: search.metrics.clone(),
            goal: search.goal,
            eta: search.eta,
            last: rung + 1 == search.budgets.len(),
        };
        let params = serde_json::to_value(&params).expect("params serialize");
        let sources_at: Vec<(usize, String)> = stages[objective]
            .instances
            .iter()
            .copied()
            .filter(|&i| budget_of(search, &instances[i].grid) == Some(budget))
            .map(|i| (i, output.clone()))
            .collect();
        let grid = vec![(
            search.budget_param.clone(),
            toml::Value::Integer(budget as i64),
        )];
        let mut inputs = vec![ResolvedInput {
            slot: "results".into(),
            sources: sources_at,
            collecting: true,
            reads_winner: false,
        }];
        // Each rung carries the ones before it (the last holds the whole
        // search, and draws it).
        if let Some(&previous) = rung_instance.last() {
            inputs.push(ResolvedInput {
                slot: "previous".into(),
                sources: vec![(previous, "decision".to_string())],
                collecting: false,
                reads_winner: false,
            });
        }
        rung_instance.push(instances.len());
        def.instances.push(instances.len());
        instances.push(Instance {
            stage: def_index,
            name: crate::pipeline::expand::instance_name(STAGE, &grid),
            grid,
            params,
            inputs,
            outputs: vec!["decision".into()],
            resources: BTreeMap::new(),
            gate: None,
        });
    }
    stages.push(def);
    for &i in &stages[budget_stage].instances {
        let rung = budget_of(search, &instances[i].grid)
            .and_then(|b| search.budgets.iter().position(|&x| x == b));
        if let Some(rung) = rung.filter(|&r| r > 0) {
            instances[i].gate = Some(Gate::Promoted {
                decision: rung_instance[rung - 1],
                config: config_of(search, &instances[i].grid),
            });
        }
    }
    let last = *rung_instance.last().expect("at least one rung");
    for instance in instances.iter_mut() {
        if let Some(Gate::Winner { decision }) = &mut instance.gate {
            *decision = last;
        }
    }
    Ok(())
}

/// Whether instance `i` may run, once its producers are done.
pub enum Admission {
    /// Run; a winner-gated instance reads only the winner's artifacts.
    Open {
        winner: Option<BTreeMap<String, serde_json::Value>>,
    },
    /// Stopped by the search (the reason says which rung and why).
    Stopped(String),
}

/// Read a finished rung's decision.
pub fn decision(cache: &Cache, outputs: &BTreeMap<String, String>) -> anyhow::Result<Decision> {
    let hash = outputs
        .get("decision")
        .ok_or_else(|| anyhow::anyhow!("a search rung without its decision"))?;
    Decision::read(&cache.object_path(hash))
}

/// A rung's decision on one line: each configuration's mean objective and
/// what became of it, best first.
pub fn summary(decision: &Decision) -> String {
    let rows: Vec<String> = decision
        .rows
        .iter()
        .map(|r| {
            let ci = r.ci.map_or(String::new(), |ci| format!(" ± {ci:.4}"));
            format!(
                "{} {:.4}{ci} {}",
                config_text(&r.config),
                r.mean,
                decision.fate(r)
            )
        })
        .collect();
    format!("rung {}: {}", decision.rung, rows.join(", "))
}

/// The admission of instance `i`, whose gate's decision (if any) is done
/// with `decision_outputs`.
pub fn admission(
    pipeline: &Pipeline,
    cache: &Cache,
    i: usize,
    decision_outputs: Option<&BTreeMap<String, String>>,
) -> anyhow::Result<Admission> {
    let Some(gate) = &pipeline.instances[i].gate else {
        return Ok(Admission::Open { winner: None });
    };
    let outputs = decision_outputs.expect("a gate's decision is a dependency");
    let decision = decision(cache, outputs)?;
    Ok(match gate {
        Gate::Promoted { config, .. } if decision.promotes(config) => {
            Admission::Open { winner: None }
        }
        Gate::Promoted { config, .. } => {
            let cut = decision
                .rows
                .iter()
                .filter(|r| r.promoted)
                .map(|r| r.mean)
                .next_back();
            let row = decision.row(config);
            Admission::Stopped(match (row, cut) {
                (Some(row), Some(cut)) => format!(
                    "not promoted at rung {} ({}): objective {:.4} against {:.4} for the last promoted",
                    decision.rung,
                    config_text(config),
                    row.mean,
                    cut
                ),
                _ => format!(
                    "not promoted at rung {} ({}): stopped at an earlier rung",
                    decision.rung,
                    config_text(config)
                ),
            })
        }
        Gate::Winner { .. } => Admission::Open {
            winner: decision.winner.clone(),
        },
    })
}

/// Whether producer `p`'s artifact is read by an instance that reads only
/// `winner`'s.
pub fn is_winner(
    pipeline: &Pipeline,
    p: usize,
    winner: &BTreeMap<String, serde_json::Value>,
) -> bool {
    let grid = &pipeline.instances[p].grid;
    winner
        .iter()
        .all(|(k, v)| grid.iter().any(|(gk, gv)| gk == k && json_value(gv) == *v))
}

/// The search's account for `xlpipe report`: every rung's configurations
/// (objective mean ± 95% interval over replicates, promoted or not), the
/// winner, and what it cost against the full grid of the same settings.
/// `None` for a pipeline without `[search]`.
pub fn report(pipeline: &Pipeline, cache: &Cache) -> anyhow::Result<Option<String>> {
    use crate::plan::{plan, Status};
    let Some(rungs) = pipeline.stages.iter().find(|s| s.name == STAGE) else {
        return Ok(None);
    };
    let statuses = plan(pipeline, cache, &vec![false; pipeline.instances.len()]);
    let record_of = |i: usize| match &statuses[i] {
        Status::Cached { key, .. } => cache.record(key),
        _ => None,
    };
    let mut decisions = Vec::new();
    for &i in &rungs.instances {
        if let Some(record) = record_of(i) {
            decisions.push(decision(cache, &record.outputs)?);
        }
    }
    let mut out = String::from("search\n\n| rung | budget | configuration | objective | replicates | |\n|---|---|---|---|---|---|\n");
    for d in &decisions {
        for row in &d.rows {
            let ci = row.ci.map_or(String::new(), |ci| format!(" ± {ci:.4}"));
            out += &format!(
                "| {} | {} | {} | {:.4}{ci} | {} | {} |\n",
                d.rung,
                d.budget,
                config_text(&row.config),
                row.mean,
                row.replicates.len(),
                d.fate(row)
            );
        }
    }
    let Some(first) = decisions.first() else {
        out += "\n(no rung has finished)\n";
        return Ok(Some(out));
    };
    let last = decisions.last().expect("non-empty");
    match &last.winner {
        Some(w) => {
            out += &format!(
                "\nwinner: {} (objective: mean of {})\n",
                config_text(w),
                last.metrics.join(", ")
            )
        }
        None => {
            out += &format!(
                "\nno winner yet: {} of the rungs have finished\n",
                decisions.len()
            )
        }
    }

    // What ran: the budget stage's instances (units of budget trained, less
    // a resumed prefix) and, per trained instance, what evaluated it.
    let budget_stage =
        pipeline
            .instances
            .iter()
            .zip(&statuses)
            .find_map(|(instance, status)| match (&instance.gate, status) {
                (Some(Gate::Promoted { .. }), _) => Some(instance.stage),
                _ => None,
            });
    let budget_var = rungs.vars.first().cloned().unwrap_or_default();
    let (mut units, mut train_seconds, mut trained) = (0u64, 0.0, 0usize);
    let mut eval_seconds = 0.0;
    for (i, instance) in pipeline.instances.iter().enumerate() {
        let Some(record) = record_of(i) else { continue };
        let budget = instance
            .grid
            .iter()
            .find(|(k, _)| *k == budget_var)
            .and_then(|(_, v)| v.as_integer());
        let Some(budget) = budget else { continue };
        if Some(instance.stage) == budget_stage {
            let resumed = record.resumed_from.as_ref().map_or(0, |r| r.step as u64);
            units += budget as u64 - resumed;
            train_seconds += record.seconds;
            trained += 1;
        } else if pipeline.stages[instance.stage].name != STAGE {
            eval_seconds += record.seconds;
        }
    }
    let points = first.rows.len()
        * first
            .rows
            .iter()
            .map(|r| r.replicates.len())
            .max()
            .unwrap_or(1);
    let grid_units = points as u64 * last.budget;
    let per_unit = train_seconds / units.max(1) as f64;
    let per_eval = eval_seconds / trained.max(1) as f64;
    let grid_train = grid_units as f64 * per_unit;
    let grid_eval = points as f64 * per_eval;
    out += &format!(
        "\n| compute | search | full grid ({points} points at budget {}) | search / grid |\n|---|---|---|---|\n",
        last.budget
    );
    out += &format!(
        "| budget units trained | {units} | {grid_units} | {:.2} |\n",
        units as f64 / grid_units.max(1) as f64
    );
    out += &format!(
        "| training wall time | {train_seconds:.0} s | ~{grid_train:.0} s | {:.2} |\n",
        train_seconds / grid_train.max(f64::MIN_POSITIVE)
    );
    out += &format!(
        "| training + evaluation wall time | {:.0} s | ~{:.0} s | {:.2} |\n",
        train_seconds + eval_seconds,
        grid_train + grid_eval,
        (train_seconds + eval_seconds) / (grid_train + grid_eval).max(f64::MIN_POSITIVE)
    );
    out += "\n(~: the grid's times at this search's own seconds per unit of budget and per evaluated point)\n";
    if let Some(record) = rungs.instances.last().and_then(|&i| record_of(i)) {
        if let Some(hash) = record.outputs.get("decision") {
            let plot = cache.object_path(hash).join("objective.svg");
            if plot.is_file() {
                out += &format!("plot: {}\n", plot.display());
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::rung_budgets;

    #[test]
    fn budgets_grow_by_eta_until_one_configuration_is_left() {
        // 9 alphas, eta 3: 9 → 3 → 1, three rungs as the ladder has them.
        assert_eq!(rung_budgets(10, 90, 3, 9), [10, 30, 90]);
        // 5 alphas, eta 3: rung 0 keeps one, which goes straight to max.
        assert_eq!(rung_budgets(60, 300, 3, 5), [60, 300]);
        // 4 alphas, eta 2: 4 → 2 → 1; the last step is capped at max.
        assert_eq!(rung_budgets(2, 7, 2, 4), [2, 4, 7]);
        // Enough configurations: the ladder ends at max.
        assert_eq!(rung_budgets(100, 400, 2, 16), [100, 200, 400]);
        assert_eq!(rung_budgets(5, 5, 2, 3), [5]);
    }
}
