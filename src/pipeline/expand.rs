//! From a loaded [`PipelineSpec`] to runnable stage instances.
//!
//! A stage varies over the grid variables its params use (`"${alpha}"`) and
//! over those of its (non-collecting) inputs; it gets one instance per
//! combination of those variables' values, so a stage that uses none is
//! instantiated once and shared by the whole grid. A collecting input
//! (`stage[*]`) receives every instance of that stage that agrees with the
//! collector's own grid values.
//!
//! Everything is validated here, before anything runs; all problems are
//! reported together, each pointing at its file, line and field.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use xlpipe_stage_api::{Interface, ParamError, ParamsEnv, Stage};

use super::load::{GridVar, OutputRef, PipelineSpec, StageSpec};
use crate::diag::{did_you_mean, nearest, Diagnostic, Diagnostics, Loc, Sources};
use crate::executor::{self, ExecutorConfig};

/// A validated pipeline, expanded over its grid.
pub struct Pipeline {
    pub name: String,
    pub description: String,
    pub file: PathBuf,
    pub grid: Vec<GridVar>,
    /// Stages in dependency order.
    pub stages: Vec<StageDef>,
    /// Instances in dependency order (every input's producer comes first).
    pub instances: Vec<Instance>,
    /// Executors stages may name (built-in `local` and `slurm` included).
    pub executors: BTreeMap<String, ExecutorConfig>,
    /// `[search]`'s objective as `file:line:column`, quoted when a rung
    /// fails on it.
    pub search_objective_at: Option<String>,
}

pub struct StageDef {
    pub name: String,
    pub kind: Arc<dyn Stage>,
    /// Grid variables this stage varies over, in grid order.
    pub vars: Vec<String>,
    /// Stages it reads from, with whether the input collects all instances.
    pub upstream: Vec<(usize, bool)>,
    pub instances: Vec<usize>,
    pub base_dir: PathBuf,
    /// `executor = "NAME"` (validated); none: the run's default.
    pub executor: Option<String>,
}

pub struct Instance {
    pub stage: usize,
    /// `stage` or `stage[alpha=0.5,seed=1]`.
    pub name: String,
    pub grid: Vec<(String, toml::Value)>,
    /// Canonical params (what the cache key hashes).
    pub params: serde_json::Value,
    pub inputs: Vec<ResolvedInput>,
    pub outputs: Vec<String>,
    pub resources: BTreeMap<String, u32>,
    /// Set by `[search]` (see `crate::search`): whether it runs depends on
    /// a rung's decision.
    pub gate: Option<Gate>,
}

/// How a `[search]` decision steers an instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// A budget-stage instance above the first rung: runs only if
    /// `decision` promoted its configuration.
    Promoted {
        decision: usize,
        config: BTreeMap<String, serde_json::Value>,
    },
    /// Reads `stage[search=best]`: of its sources, only the last rung's
    /// winner's.
    Winner { decision: usize },
}

pub struct ResolvedInput {
    pub slot: String,
    /// (producing instance, output name), in grid order.
    pub sources: Vec<(usize, String)>,
    /// Collects instances (`stage[*]`, a search rung's evaluations): a
    /// source the search stopped is left out, not awaited.
    pub collecting: bool,
    /// `stage[search=best]`: of its sources (every configuration at the
    /// last budget), only the winner's is read.
    pub reads_winner: bool,
}

impl Instance {
    /// Instances this one reads from, and the decision its gate waits on.
    pub fn dependencies(&self) -> impl Iterator<Item = usize> + '_ {
        let gate = match self.gate {
            Some(Gate::Promoted { decision, .. } | Gate::Winner { decision }) => Some(decision),
            None => None,
        };
        self.inputs
            .iter()
            .flat_map(|i| i.sources.iter().map(|(producer, _)| *producer))
            .chain(gate)
    }
}

impl Pipeline {
    pub fn stage_of(&self, instance: usize) -> &StageDef {
        &self.stages[self.instances[instance].stage]
    }
}

/// Validate `spec` against the stage kinds and expand its grid.
pub fn expand(mut spec: PipelineSpec, kinds: &[Arc<dyn Stage>]) -> Result<Pipeline, Diagnostics> {
    let search = crate::search::prepare(&mut spec).map_err(Diagnostics)?;
    let spec = spec;
    let sources = &spec.sources;
    let mut errors = Vec::new();

    // Kinds and references first: nothing else makes sense without them.
    let mut stage_kinds = Vec::new();
    for stage in &spec.stages {
        let found = kinds.iter().find(|k| k.kind() == stage.kind).cloned();
        if found.is_none() {
            let field = format!("stages.{}.kind", stage.name);
            let message = if stage.kind.is_empty() {
                "missing `kind = \"...\"`".to_string()
            } else {
                let mut m = format!("unknown stage kind `{}`", stage.kind);
                match nearest(&stage.kind, kinds.iter().map(|k| k.kind())) {
                    Some(near) => m.push_str(&format!("; did you mean `{near}`?")),
                    None => m.push_str(&format!(
                        "; known kinds: {}",
                        kinds
                            .iter()
                            .map(|k| k.kind())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                }
                m
            };
            errors.push(sources.error(stage.kind_loc, &field, message));
        }
        stage_kinds.push(found);
        for input in &stage.inputs {
            for r in &input.refs {
                if !spec.index.contains_key(&r.stage) {
                    let message = format!(
                        "no stage named `{}`{}",
                        r.stage,
                        did_you_mean(&r.stage, spec.stages.iter().map(|s| s.name.as_str()))
                    );
                    errors.push(sources.error(
                        r.loc,
                        &format!("stages.{}.inputs.{}", stage.name, input.slot),
                        message,
                    ));
                }
            }
        }
    }
    let executors = match executor::resolve(&spec.executors, sources) {
        Ok(executors) => executors,
        Err(mut e) => {
            errors.append(&mut e);
            BTreeMap::new()
        }
    };
    for stage in &spec.stages {
        if let Some((name, loc)) = &stage.executor {
            if !executors.is_empty() && !executors.contains_key(name) {
                let mut message = format!("no executor named `{name}`");
                match nearest(name, executors.keys().map(String::as_str)) {
                    Some(near) => message.push_str(&format!("; did you mean `{near}`?")),
                    None => message.push_str("; declare it as [executors.NAME]"),
                }
                errors.push(sources.error(
                    *loc,
                    &format!("stages.{}.executor", stage.name),
                    message,
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }

    let order = stage_order(&spec).map_err(Diagnostics)?;
    let grid_index: HashMap<&str, usize> = spec
        .grid
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect();

    // Grid variables each stage varies over.
    let mut vars: Vec<Vec<usize>> = vec![Vec::new(); spec.stages.len()];
    for &s in &order {
        let stage = &spec.stages[s];
        let mut own = Vec::new();
        for (var, path) in scan_vars(&stage.params) {
            match grid_index.get(var.as_str()) {
                Some(&i) => own.push(i),
                None => errors.push(sources.error(
                    param_loc(stage, &path),
                    &format!("stages.{}.{path}", stage.name),
                    format!(
                        "grid variable `{var}` is not defined in [grid]{}",
                        did_you_mean(&var, spec.grid.iter().map(|g| g.name.as_str()))
                    ),
                )),
            }
        }
        for input in &stage.inputs {
            for r in input.refs.iter().filter(|r| !r.all) {
                let upstream = vars[stage_index(&spec, &r.stage)].iter().copied();
                if !r.winner {
                    own.extend(upstream);
                    continue;
                }
                // The winner is one configuration at the last budget: what
                // the search chose over does not multiply the reader.
                let Some(search) = &search else {
                    errors.push(sources.error(
                        r.loc,
                        &format!("stages.{}.inputs.{}", stage.name, input.slot),
                        "`[search=best]` needs a [search] table in the pipeline".to_string(),
                    ));
                    continue;
                };
                let searched = |v: &usize| {
                    let name = &spec.grid[*v].name;
                    search.over.contains(name) || *name == search.budget_param
                };
                if !vars[stage_index(&spec, &r.stage)].iter().any(&searched) {
                    errors.push(sources.error(
                        r.loc,
                        &format!("stages.{}.inputs.{}", stage.name, input.slot),
                        format!(
                            "stage `{}` does not vary over what [search] searches: it has no winner",
                            r.stage
                        ),
                    ));
                }
                own.extend(upstream.filter(|v| !searched(v)));
            }
        }
        own.sort_unstable();
        own.dedup();
        vars[s] = own;
        for path in keys_with_templates(&stage.params) {
            errors.push(sources.error(
                param_loc(stage, &path),
                &format!("stages.{}.{path}", stage.name),
                "`${...}` is substituted in values, not in keys: this key would stay literally as written",
            ));
        }
    }
    // A grid variable no stage uses multiplies nothing: almost always a
    // typo or a leftover, and silently running one instance instead of a
    // grid hides it.
    for (i, var) in spec.grid.iter().enumerate() {
        if !vars.iter().any(|v| v.contains(&i)) {
            errors.push(sources.error(
                var.loc,
                &format!("grid.{}", var.name),
                format!(
                    "grid variable `{}` is used by no stage (no param says \"${{{}}}\"): remove it or use it",
                    var.name, var.name
                ),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }

    let mut built = Built {
        stages: Vec::new(),
        position: vec![usize::MAX; spec.stages.len()],
        instances: Vec::new(),
    };
    // Stages whose params or inputs were refused, and those downstream of
    // them: what follows from an error is not reported as errors of its own.
    let mut broken = vec![false; spec.stages.len()];
    let mut held_back = 0usize;
    for &s in &order {
        let stage = &spec.stages[s];
        let kind = stage_kinds[s].clone().expect("kinds checked above");
        let def_index = built.stages.len();
        built.position[s] = def_index;
        let env = ParamsEnv {
            base_dir: stage.base_dir.clone(),
        };
        let mut def = StageDef {
            name: stage.name.clone(),
            kind: kind.clone(),
            vars: vars[s].iter().map(|&i| spec.grid[i].name.clone()).collect(),
            upstream: Vec::new(),
            instances: Vec::new(),
            base_dir: stage.base_dir.clone(),
            executor: stage.executor.as_ref().map(|(name, _)| name.clone()),
        };
        for input in &stage.inputs {
            for r in &input.refs {
                let up = built.position[stage_index(&spec, &r.stage)];
                if !def.upstream.contains(&(up, r.all)) {
                    def.upstream.push((up, r.all));
                }
            }
        }
        let input_names: Vec<String> = stage.inputs.iter().map(|i| i.slot.clone()).collect();
        let upstream_broken = stage
            .inputs
            .iter()
            .flat_map(|i| &i.refs)
            .any(|r| broken[stage_index(&spec, &r.stage)]);
        if upstream_broken {
            broken[s] = true;
            held_back += 1;
            built.stages.push(def);
            continue;
        }
        let errors_before = errors.len();
        for binding in cartesian(&spec.grid, &vars[s]) {
            let name = instance_name(&stage.name, &binding);
            let context = if binding.is_empty() {
                String::new()
            } else {
                format!(" (in instance {name})")
            };
            let values: HashMap<&str, &toml::Value> =
                binding.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let params = substitute_table(&stage.params, &values);
            let canonical = match kind.canonical_params(&params, &env) {
                Ok(p) => p,
                Err(err) => {
                    errors.push(param_error(sources, stage, &err, &context));
                    break;
                }
            };
            let interface = match kind.interface(&canonical, &input_names) {
                Ok(i) => i,
                Err(err) => {
                    errors.push(param_error(sources, stage, &err, &context));
                    break;
                }
            };
            let last_budget = search.as_ref().map(|s| {
                (
                    s.budget_param.as_str(),
                    *s.budgets.last().expect("a rung at least"),
                )
            });
            match resolve_inputs(
                sources,
                &spec,
                stage,
                &interface,
                &binding,
                &built,
                last_budget,
            ) {
                Ok(inputs) => {
                    let reads_winner = stage.inputs.iter().flat_map(|i| &i.refs).any(|r| r.winner);
                    def.instances.push(built.instances.len());
                    built.instances.push(Instance {
                        stage: def_index,
                        name,
                        grid: binding,
                        params: canonical,
                        inputs,
                        outputs: interface.outputs,
                        resources: interface.resources,
                        // The decision is filled in when the rungs exist.
                        gate: reads_winner.then_some(Gate::Winner {
                            decision: usize::MAX,
                        }),
                    });
                }
                Err(mut e) => {
                    errors.append(&mut e);
                    break;
                }
            }
        }
        broken[s] = errors.len() > errors_before;
        built.stages.push(def);
    }
    if held_back > 0 && !errors.is_empty() {
        errors.push(Diagnostic::file(
            &spec.file,
            format!(
                "{held_back} stage(s) that depend on the stages above were not checked; fix those first"
            ),
        ));
    }
    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }
    let Built {
        mut stages,
        mut instances,
        ..
    } = built;
    if let Some(search) = &search {
        crate::search::attach(search, sources, kinds, &mut stages, &mut instances)
            .map_err(Diagnostics)?;
        // Gates run from a rung's decision up to the next rung's training:
        // put every instance after what it waits on.
        (stages, instances) = reorder(stages, instances);
    }
    Ok(Pipeline {
        name: spec.name,
        description: spec.description,
        file: spec.file,
        grid: spec.grid,
        stages,
        instances,
        executors,
        search_objective_at: search.map(|s| s.objective_at),
    })
}

/// Instances in an order where each comes after its dependencies (gates
/// included), the original order kept where nothing forces a change.
fn reorder(mut stages: Vec<StageDef>, instances: Vec<Instance>) -> (Vec<StageDef>, Vec<Instance>) {
    let n = instances.len();
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut waiting = vec![0usize; n];
    for (i, instance) in instances.iter().enumerate() {
        let deps: std::collections::BTreeSet<usize> = instance.dependencies().collect();
        waiting[i] = deps.len();
        for d in deps {
            dependants[d].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &d in &dependants[i] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.insert(d);
            }
        }
    }
    assert_eq!(order.len(), n, "search gates made a cycle");
    let mut new_index = vec![0usize; n];
    for (new, &old) in order.iter().enumerate() {
        new_index[old] = new;
    }
    let mut slots: Vec<Option<Instance>> = instances.into_iter().map(Some).collect();
    let mut reordered = Vec::with_capacity(n);
    for &old in &order {
        let mut instance = slots[old].take().expect("each instance once");
        for input in &mut instance.inputs {
            for (producer, _) in &mut input.sources {
                *producer = new_index[*producer];
            }
        }
        if let Some(Gate::Promoted { decision, .. } | Gate::Winner { decision }) =
            &mut instance.gate
        {
            *decision = new_index[*decision];
        }
        reordered.push(instance);
    }
    for stage in &mut stages {
        for i in &mut stage.instances {
            *i = new_index[*i];
        }
        stage.instances.sort_unstable();
    }
    (stages, reordered)
}

/// Stages and instances expanded so far (producers before consumers).
struct Built {
    stages: Vec<StageDef>,
    /// Spec stage index -> index in `stages`.
    position: Vec<usize>,
    instances: Vec<Instance>,
}

fn stage_index(spec: &PipelineSpec, name: &str) -> usize {
    *spec.index.get(name).expect("references checked")
}

/// Stages in dependency order, or the dependency cycles, each printed in full.
fn stage_order(spec: &PipelineSpec) -> Result<Vec<usize>, Vec<Diagnostic>> {
    let mut graph: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..spec.stages.len()).map(|i| graph.add_node(i)).collect();
    for (s, stage) in spec.stages.iter().enumerate() {
        for input in &stage.inputs {
            for r in &input.refs {
                graph.update_edge(nodes[stage_index(spec, &r.stage)], nodes[s], ());
            }
        }
    }
    if let Ok(order) = toposort(&graph, None) {
        return Ok(order.into_iter().map(|n| graph[n]).collect());
    }
    let mut errors = Vec::new();
    for component in tarjan_scc(&graph) {
        let cyclic = component.len() > 1 || graph.contains_edge(component[0], component[0]);
        if !cyclic {
            continue;
        }
        // Walk edges inside the component, from the stage declared first,
        // until a stage repeats.
        let start = *component
            .iter()
            .min_by_key(|&&n| graph[n])
            .expect("components are non-empty");
        let mut path = vec![start];
        loop {
            let last = *path.last().expect("non-empty");
            let next = graph
                .neighbors(last)
                .find(|n| component.contains(n))
                .expect("a cyclic component has an edge inside it");
            if let Some(start) = path.iter().position(|&n| n == next) {
                path.drain(..start);
                path.push(next);
                break;
            }
            path.push(next);
        }
        let names: Vec<&str> = path
            .iter()
            .map(|&n| spec.stages[graph[n]].name.as_str())
            .collect();
        let first = &spec.stages[graph[path[0]]];
        errors.push(spec.sources.error(
            first.loc,
            &format!("stages.{}.inputs", first.name),
            format!("dependency cycle: {}", names.join(" -> ")),
        ));
    }
    Err(errors)
}

/// Every combination of the given grid variables' values, last varying fastest.
fn cartesian(grid: &[GridVar], vars: &[usize]) -> Vec<Vec<(String, toml::Value)>> {
    let mut combos = vec![Vec::new()];
    for &v in vars {
        let var = &grid[v];
        combos = combos
            .into_iter()
            .flat_map(|combo| {
                var.values.iter().map(move |value| {
                    let mut next = combo.clone();
                    next.push((var.name.clone(), value.clone()));
                    next
                })
            })
            .collect();
    }
    combos
}

pub fn instance_name(stage: &str, binding: &[(String, toml::Value)]) -> String {
    if binding.is_empty() {
        return stage.to_string();
    }
    let parts: Vec<String> = binding
        .iter()
        .map(|(k, v)| format!("{k}={}", display_value(v)))
        .collect();
    format!("{stage}[{}]", parts.join(","))
}

/// A grid value as it appears in instance names and tables.
pub fn display_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) if super::load::is_identifier(s) || s.parse::<f64>().is_ok() => {
            s.clone()
        }
        other => other.to_string(),
    }
}

fn resolve_inputs(
    sources: &Sources,
    spec: &PipelineSpec,
    stage: &StageSpec,
    interface: &Interface,
    binding: &[(String, toml::Value)],
    built: &Built,
    last_budget: Option<(&str, u64)>,
) -> Result<Vec<ResolvedInput>, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut resolved = Vec::new();
    let field = |slot: &str| format!("stages.{}.inputs.{slot}", stage.name);
    for slot in &interface.inputs {
        if !slot.optional && !stage.inputs.iter().any(|i| i.slot == slot.name) {
            errors.push(sources.error(
                stage.loc,
                &field(&slot.name),
                format!(
                    "stage kind `{}` needs input `{}`: add inputs.{} = \"STAGE\"",
                    stage.kind, slot.name, slot.name
                ),
            ));
        }
    }
    for input in &stage.inputs {
        let Some(slot) = interface.inputs.iter().find(|s| s.name == input.slot) else {
            let known: Vec<&str> = interface.inputs.iter().map(|s| s.name.as_str()).collect();
            errors.push(sources.error(
                input.loc,
                &field(&input.slot),
                format!(
                    "stage kind `{}` has no input `{}`; its inputs: {}",
                    stage.kind,
                    input.slot,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
            continue;
        };
        let mut artifacts = Vec::new();
        // A winner's candidates count as the one artifact they narrow to.
        let mut count = 0;
        for r in &input.refs {
            match resolve_ref(r, binding, built, spec, last_budget) {
                Ok(mut found) => {
                    count += if r.winner { 1 } else { found.len() };
                    artifacts.append(&mut found);
                }
                Err(message) => errors.push(sources.error(r.loc, &field(&input.slot), message)),
            }
        }
        if !slot.many && count != 1 {
            errors.push(sources.error(
                input.loc,
                &field(&input.slot),
                format!(
                    "input `{}` takes exactly one artifact, but this resolves to {}",
                    input.slot, count
                ),
            ));
        }
        resolved.push(ResolvedInput {
            slot: input.slot.clone(),
            sources: artifacts,
            collecting: input.refs.iter().any(|r| r.all),
            reads_winner: input.refs.iter().any(|r| r.winner),
        });
    }
    if errors.is_empty() {
        Ok(resolved)
    } else {
        Err(errors)
    }
}

fn resolve_ref(
    r: &OutputRef,
    binding: &[(String, toml::Value)],
    built: &Built,
    spec: &PipelineSpec,
    last_budget: Option<(&str, u64)>,
) -> Result<Vec<(usize, String)>, String> {
    let (stages, instances) = (&built.stages, &built.instances);
    let upstream = &stages[built.position[stage_index(spec, &r.stage)]];
    // Upstream instances that agree with this instance on shared variables
    // (a winner's candidates: every configuration at the last budget).
    let at_last_budget = |grid: &[(String, toml::Value)]| match last_budget {
        Some((var, budget)) if r.winner => grid
            .iter()
            .all(|(k, v)| k != var || v.as_integer() == Some(budget as i64)),
        _ => true,
    };
    let matching: Vec<usize> = upstream
        .instances
        .iter()
        .copied()
        .filter(|&i| {
            instances[i]
                .grid
                .iter()
                .all(|(k, v)| binding.iter().all(|(bk, bv)| bk != k || bv == v))
                && at_last_budget(&instances[i].grid)
        })
        .collect();
    let Some(&first) = matching.first() else {
        return Err(format!("stage `{}` has no matching instance", r.stage));
    };
    let outputs = &instances[first].outputs;
    let output = match &r.output {
        Some(name) if outputs.contains(name) => name.clone(),
        Some(name) => {
            return Err(format!(
                "stage `{}` has no output `{name}`; its outputs: {}",
                r.stage,
                if outputs.is_empty() {
                    "none".to_string()
                } else {
                    outputs.join(", ")
                }
            ))
        }
        None if outputs.len() == 1 => outputs[0].clone(),
        None if outputs.is_empty() => return Err(format!("stage `{}` has no outputs", r.stage)),
        None => {
            return Err(format!(
                "stage `{}` has several outputs ({}); name one, e.g. \"{}.{}\"",
                r.stage,
                outputs.join(", "),
                r.stage,
                outputs[0]
            ))
        }
    };
    if !r.all && !r.winner && matching.len() != 1 {
        return Err(format!(
            "`{}` has {} instances here; use \"{}[*]\" to collect them all",
            r.stage,
            matching.len(),
            r
        ));
    }
    Ok(matching.into_iter().map(|i| (i, output.clone())).collect())
}

fn param_error(
    sources: &Sources,
    stage: &StageSpec,
    err: &ParamError,
    context: &str,
) -> Diagnostic {
    let field = if err.path.is_empty() {
        format!("stages.{}", stage.name)
    } else {
        format!("stages.{}.{}", stage.name, err.path)
    };
    // serde adds "in `path`" lines of its own; the field is already named.
    let message = err.message.lines().next().unwrap_or_default();
    sources.error(
        param_loc(stage, &err.path),
        &field,
        format!("{message}{context}"),
    )
}

/// Where a param path was written: the path itself, else its closest parent,
/// else the stage header.
fn param_loc(stage: &StageSpec, path: &str) -> Loc {
    crate::diag::nearest_loc(&stage.param_locs, path, stage.loc)
}

/// `${var}` uses in params, with the dotted path where each appears.
fn scan_vars(params: &toml::Table) -> Vec<(String, String)> {
    fn walk(value: &toml::Value, path: String, out: &mut Vec<(String, String)>) {
        match value {
            toml::Value::String(s) => {
                for var in template_vars(s) {
                    out.push((var.to_string(), path.clone()));
                }
            }
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, format!("{path}[{i}]"), out);
                }
            }
            toml::Value::Table(table) => {
                for (k, v) in table {
                    walk(v, format!("{path}.{k}"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (k, v) in params {
        walk(v, k.clone(), &mut out);
    }
    out
}

/// Dotted paths of the table keys in `params` that hold a `${...}`.
fn keys_with_templates(params: &toml::Table) -> Vec<String> {
    fn walk(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in table {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if !template_vars(k).is_empty() {
                out.push(path.clone());
            }
            if let toml::Value::Table(inner) = v {
                walk(inner, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(params, "", &mut out);
    out
}

/// Pieces of a `${var}` template: literal text and variable names.
enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

fn template_pieces(s: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            // `$${` is an escaped literal `${`.
            pieces.push(Piece::Text(&rest[..i]));
            pieces.push(Piece::Text("${"));
            rest = escaped;
            continue;
        }
        if let Some(body) = after.strip_prefix('{') {
            if let Some(end) = body.find('}') {
                pieces.push(Piece::Text(&rest[..i]));
                pieces.push(Piece::Var(&body[..end]));
                rest = &body[end + 1..];
                continue;
            }
        }
        pieces.push(Piece::Text(&rest[..=i]));
        rest = after;
    }
    pieces.push(Piece::Text(rest));
    pieces
}

fn template_vars(s: &str) -> Vec<&str> {
    template_pieces(s)
        .into_iter()
        .filter_map(|p| match p {
            Piece::Var(v) => Some(v),
            Piece::Text(_) => None,
        })
        .collect()
}

fn substitute_table(table: &toml::Table, values: &HashMap<&str, &toml::Value>) -> toml::Table {
    table
        .iter()
        .map(|(k, v)| (k.clone(), substitute(v, values)))
        .collect()
}

/// Replace `${var}`: a string that is exactly one variable takes the value's
/// own type (so `lr = "${lr}"` stays a float); otherwise text is interpolated.
fn substitute(value: &toml::Value, values: &HashMap<&str, &toml::Value>) -> toml::Value {
    match value {
        toml::Value::String(s) => {
            let pieces = template_pieces(s);
            let non_empty: Vec<&Piece> = pieces
                .iter()
                .filter(|p| !matches!(p, Piece::Text("")))
                .collect();
            if let [Piece::Var(var)] = non_empty.as_slice() {
                return (*values.get(var).expect("variables checked")).clone();
            }
            let mut out = String::new();
            for piece in pieces {
                match piece {
                    Piece::Text(t) => out.push_str(t),
                    Piece::Var(v) => out.push_str(&display_value(values[v])),
                }
            }
            toml::Value::String(out)
        }
        toml::Value::Array(items) => {
            toml::Value::Array(items.iter().map(|i| substitute(i, values)).collect())
        }
        toml::Value::Table(table) => toml::Value::Table(substitute_table(table, values)),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_substitute_typed_and_interpolated() {
        let alpha = toml::Value::Float(0.5);
        let values: HashMap<&str, &toml::Value> = [("alpha", &alpha)].into_iter().collect();
        assert_eq!(
            substitute(&toml::Value::String("${alpha}".into()), &values),
            alpha
        );
        assert_eq!(
            substitute(
                &toml::Value::String("a=${alpha}, $${x} $HOME".into()),
                &values
            ),
            toml::Value::String("a=0.5, ${x} $HOME".into())
        );
        assert_eq!(template_vars("$${x} ${y}"), vec!["y"]);
    }

    #[test]
    fn cartesian_product_in_grid_order() {
        let var = |name: &str, n: i64| GridVar {
            name: name.into(),
            values: (0..n).map(toml::Value::Integer).collect(),
            loc: Loc::new(0, 0..0),
        };
        let grid = vec![var("a", 2), var("b", 3)];
        let combos = cartesian(&grid, &[0, 1]);
        assert_eq!(combos.len(), 6);
        assert_eq!(instance_name("s", &combos[1]), "s[a=0,b=1]");
        assert_eq!(cartesian(&grid, &[]).len(), 1);
    }
}
