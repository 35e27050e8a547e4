//! Reading pipeline files: TOML syntax, `extends` / `include`, and the
//! location of every key so later checks can point at it.
//!
//! `extends = "base.toml"` takes the base file as the starting point and lets
//! this file override it: grid variables are replaced, stages with the same
//! name are merged key by key (sub-tables deeply), so an experiment file can
//! be a small diff. `include = ["a.toml", ...]` adds the stages and grid
//! variables of other files; a stage name defined twice that way is an error.
//! `library = ["datasets.toml"]` adds them the same way, but keeps only the
//! stages that another stage needs. `[executors.NAME]` tables (where stage
//! instances run: this machine or a Slurm cluster) merge key by key across
//! all of these, so a site's `cluster.toml` can be included anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::diag::{Diagnostic, Loc, Sources};
use crate::executor::ExecutorSpec;

/// A pipeline file with its includes and bases resolved; not yet validated
/// against stage kinds.
#[derive(Debug)]
pub struct PipelineSpec {
    pub name: String,
    pub description: String,
    /// The file named on the command line.
    pub file: PathBuf,
    pub grid: Vec<GridVar>,
    pub stages: Vec<StageSpec>,
    /// Stage name -> its index in `stages`.
    pub index: std::collections::HashMap<String, usize>,
    /// `[executors.NAME]` tables, validated by `expand`.
    pub executors: Vec<ExecutorSpec>,
    /// `[search]`, validated by `expand` (see `crate::search`).
    pub search: Option<SearchSpec>,
    pub sources: Sources,
}

/// The `[search]` table as written, with where each key was written.
#[derive(Debug, Clone)]
pub struct SearchSpec {
    pub loc: Loc,
    pub table: toml::Table,
    /// Location of each key by dotted path (`budget.eta`, `over[0]`).
    pub locs: BTreeMap<String, Loc>,
}

#[derive(Debug, Clone)]
pub struct GridVar {
    pub name: String,
    pub values: Vec<toml::Value>,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: String,
    /// The `[stages.NAME]` header (or inline table) that declares the stage.
    pub loc: Loc,
    pub kind: String,
    pub kind_loc: Loc,
    pub inputs: Vec<InputSpec>,
    /// Every key but `kind` and `inputs`.
    pub params: toml::Table,
    /// Location of each param by dotted path (`opt.lr`, `layers[1]`): the
    /// key's for tables, the value's for array items.
    pub param_locs: BTreeMap<String, Loc>,
    /// Folder of the file that declared the stage; relative paths resolve here.
    pub base_dir: PathBuf,
    /// Came from a `library` file: runs only when another stage needs it.
    pub library: bool,
    /// `executor = "NAME"`: where its instances run. Not a param: it never
    /// changes what a stage computes, so it stays out of the cache key.
    pub executor: Option<(String, Loc)>,
}

#[derive(Debug, Clone)]
pub struct InputSpec {
    pub slot: String,
    pub loc: Loc,
    pub refs: Vec<OutputRef>,
}

/// `stage`, `stage.output`, `stage[*]` or `stage.output[*]`.
#[derive(Debug, Clone)]
pub struct OutputRef {
    pub stage: String,
    pub output: Option<String>,
    /// Every grid instance of `stage` (a collecting input).
    pub all: bool,
    /// The instance of `stage` that `[search]` picked (`stage[search=best]`).
    pub winner: bool,
    pub loc: Loc,
}

impl std::fmt::Display for OutputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.stage)?;
        if let Some(output) = &self.output {
            write!(f, ".{output}")?;
        }
        if self.all {
            f.write_str("[*]")?;
        }
        if self.winner {
            f.write_str("[search=best]")?;
        }
        Ok(())
    }
}

/// Read `path` and everything it extends or includes.
pub fn load(path: &Path) -> Result<PipelineSpec, Vec<Diagnostic>> {
    let mut sources = Sources::default();
    let mut chain = Vec::new();
    let file = read_file(path, &mut sources, &mut chain)?;
    let name = file.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into())
    });
    let stages = keep_needed_library_stages(file.stages);
    let index = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    Ok(PipelineSpec {
        name,
        description: file.description.unwrap_or_default(),
        file: path.to_path_buf(),
        grid: file.grid,
        stages,
        index,
        executors: file.executors,
        search: file.search,
        sources,
    })
}

/// Stages of `library` files (every dataset of `datasets.toml`, say) stay
/// only when another stage needs them, directly or through other library
/// stages, so a pipeline fetches and reads only the data it uses. A
/// pipeline of nothing but library stages keeps them all.
fn keep_needed_library_stages(stages: Vec<StageSpec>) -> Vec<StageSpec> {
    if stages.iter().all(|s| s.library) {
        return stages;
    }
    let mut needed: std::collections::HashSet<&str> = stages
        .iter()
        .filter(|s| !s.library)
        .map(|s| s.name.as_str())
        .collect();
    let by_name: std::collections::HashMap<&str, &StageSpec> =
        stages.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut frontier: Vec<&str> = needed.iter().copied().collect();
    while let Some(name) = frontier.pop() {
        let Some(stage) = by_name.get(name) else {
            continue;
        };
        for r in stage.inputs.iter().flat_map(|i| &i.refs) {
            if needed.insert(r.stage.as_str()) {
                frontier.push(r.stage.as_str());
            }
        }
    }
    let needed: std::collections::HashSet<String> =
        needed.into_iter().map(str::to_string).collect();
    stages
        .into_iter()
        .filter(|s| needed.contains(&s.name))
        .collect()
}

/// One file after merging what it extends and includes.
struct FileSpec {
    name: Option<String>,
    description: Option<String>,
    grid: Vec<GridVar>,
    stages: Vec<StageSpec>,
    executors: Vec<ExecutorSpec>,
    search: Option<SearchSpec>,
}

fn read_file(
    path: &Path,
    sources: &mut Sources,
    chain: &mut Vec<PathBuf>,
) -> Result<FileSpec, Vec<Diagnostic>> {
    let canonical = path.canonicalize().map_err(|err| {
        vec![Diagnostic::file(
            path,
            format!("cannot read pipeline file: {err}"),
        )]
    })?;
    if let Some(first) = chain.iter().position(|p| *p == canonical) {
        let cycle: Vec<String> = chain[first..]
            .iter()
            .chain([&canonical])
            .map(|p| p.display().to_string())
            .collect();
        return Err(vec![Diagnostic::file(
            path,
            format!("extends/include cycle: {}", cycle.join(" -> ")),
        )]);
    }
    let bytes = std::fs::read(path).map_err(|err| {
        vec![Diagnostic::file(
            path,
            format!("cannot read pipeline file: {err}"),
        )]
    })?;
    let text = String::from_utf8(bytes).map_err(|err| {
        let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = valid.len() - valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
        vec![Diagnostic::file(
            path,
            format!(
                "line {line}, column {column} (byte {}): not valid UTF-8 (TOML files are UTF-8)",
                valid.len()
            ),
        )]
    })?;
    let file_id = sources.add(path.to_path_buf(), text);
    let base_dir = canonical
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    chain.push(canonical);
    let result = parse_file(file_id, &base_dir, sources, chain);
    chain.pop();
    result
}

/// [`read_file`] of a file another one names at `loc`: a file that cannot
/// be read is reported there, at the naming line.
fn read_named(
    path: &Path,
    loc: Loc,
    field: &str,
    sources: &mut Sources,
    chain: &mut Vec<PathBuf>,
) -> Result<FileSpec, Vec<Diagnostic>> {
    read_file(path, sources, chain).map_err(|diagnostics| {
        diagnostics
            .into_iter()
            .map(|d| {
                if d.line == 0 && d.file == path {
                    sources.error(loc, field, format!("{}: {}", path.display(), d.message))
                } else {
                    d
                }
            })
            .collect()
    })
}

fn parse_file(
    file: u32,
    base_dir: &Path,
    sources: &mut Sources,
    chain: &mut Vec<PathBuf>,
) -> Result<FileSpec, Vec<Diagnostic>> {
    // Parse from a copy: `sources` must stay mutable for included files.
    let text = sources.text(file).to_string();
    let root = DeTable::parse(&text).map_err(|err| {
        let span = err
            .span()
            .unwrap_or_else(|| longest_dotted_key(&text).unwrap_or(0..0));
        let loc = Loc::new(file, span);
        vec![sources.error(loc, "", format!("TOML syntax: {}", err.message()))]
    })?;
    let mut errors = Vec::new();
    let mut header = PipelineHeader::default();
    let mut own_grid = Vec::new();
    let mut own_stages = Vec::new();
    let mut own_executors = Vec::new();
    let mut own_search = None;
    for (key, value) in root.get_ref() {
        let loc = Loc::new(file, key.span());
        match key.get_ref().as_ref() {
            "pipeline" => match parse_header(file, value, sources) {
                Ok(h) => header = h,
                Err(mut e) => errors.append(&mut e),
            },
            "grid" => match parse_grid(file, value, sources) {
                Ok(g) => own_grid = g,
                Err(mut e) => errors.append(&mut e),
            },
            "stages" => match value.get_ref().as_table() {
                Some(table) => {
                    for (name, stage) in table {
                        match parse_stage(file, base_dir, name, stage, sources) {
                            Ok(s) => own_stages.push(s),
                            Err(mut e) => errors.append(&mut e),
                        }
                    }
                }
                None => errors.push(sources.error(
                    Loc::new(file, value.span()),
                    "stages",
                    "expected a table of stages, e.g. [stages.train]",
                )),
            },
            "executors" => match parse_executors(file, value, sources) {
                Ok(e) => own_executors = e,
                Err(mut e) => errors.append(&mut e),
            },
            "search" => match value.get_ref().as_table() {
                Some(_) => {
                    let mut locs = BTreeMap::new();
                    record_locs(file, "", loc, value, &mut locs);
                    // Paths relative to the table: `budget.eta`, not `.budget.eta`.
                    let locs = locs
                        .into_iter()
                        .map(|(path, loc)| (path.trim_start_matches('.').to_string(), loc))
                        .collect();
                    let table = match to_value(value) {
                        toml::Value::Table(table) => table,
                        _ => unreachable!("checked to be a table"),
                    };
                    own_search = Some(SearchSpec { loc, table, locs });
                }
                None => errors.push(sources.error(
                    Loc::new(file, value.span()),
                    "search",
                    "expected a table, e.g. [search] with over, budget and objective",
                )),
            },
            other => errors.push(sources.error(
                loc,
                other,
                "unknown top-level table; expected [pipeline], [grid], [search], [stages.NAME] or [executors.NAME]",
            )),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    // Start from the base, add includes, then apply this file on top.
    let mut merged = match &header.extends {
        Some((base, loc)) => read_named(
            &base_dir.join(base),
            *loc,
            "pipeline.extends",
            sources,
            chain,
        )?,
        None => FileSpec {
            name: None,
            description: None,
            grid: Vec::new(),
            stages: Vec::new(),
            executors: Vec::new(),
            search: None,
        },
    };
    // Only stages inherited through `extends` may be overridden below; one
    // that came from an `include` is a duplicate.
    let inherited: std::collections::HashSet<String> =
        merged.stages.iter().map(|s| s.name.clone()).collect();
    // Stage name -> index in `merged.stages`: a lookup per stage, not a scan.
    let mut position: std::collections::HashMap<String, usize> = merged
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let includes = header.include.iter().map(|f| (f, false));
    for ((include, loc), library) in includes.chain(header.library.iter().map(|f| (f, true))) {
        let field = if library {
            "pipeline.library"
        } else {
            "pipeline.include"
        };
        let included = read_named(&base_dir.join(include), *loc, field, sources, chain)?;
        for var in included.grid {
            set_grid_var(&mut merged.grid, var);
        }
        for executor in included.executors {
            merge_executor(&mut merged.executors, executor);
        }
        if included.search.is_some() {
            merged.search = included.search;
        }
        for mut stage in included.stages {
            stage.library |= library;
            if let Some(&existing) = position.get(&stage.name) {
                errors.push(duplicate_stage(sources, &stage, &merged.stages[existing]));
            } else {
                position.insert(stage.name.clone(), merged.stages.len());
                merged.stages.push(stage);
            }
        }
    }
    for var in own_grid {
        set_grid_var(&mut merged.grid, var);
    }
    for executor in own_executors {
        merge_executor(&mut merged.executors, executor);
    }
    if own_search.is_some() {
        merged.search = own_search;
    }
    for stage in own_stages {
        match position.get(&stage.name) {
            Some(&existing) if inherited.contains(&stage.name) => {
                override_stage(&mut merged.stages[existing], stage)
            }
            Some(&existing) => {
                errors.push(duplicate_stage(sources, &stage, &merged.stages[existing]))
            }
            None => {
                position.insert(stage.name.clone(), merged.stages.len());
                merged.stages.push(stage);
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if header.name.is_some() {
        merged.name = header.name;
    }
    if header.description.is_some() {
        merged.description = header.description;
    }
    Ok(merged)
}

fn duplicate_stage(sources: &Sources, stage: &StageSpec, existing: &StageSpec) -> Diagnostic {
    let first = sources.error(existing.loc, "", "");
    sources.error(
        stage.loc,
        &format!("stages.{}", stage.name),
        format!(
            "stage `{}` is defined twice (also at {}:{})",
            stage.name,
            first.file.display(),
            first.line
        ),
    )
}

fn set_grid_var(grid: &mut Vec<GridVar>, var: GridVar) {
    match grid.iter_mut().find(|v| v.name == var.name) {
        Some(existing) => *existing = var,
        None => grid.push(var),
    }
}

fn merge_executor(executors: &mut Vec<ExecutorSpec>, child: ExecutorSpec) {
    match executors.iter_mut().find(|e| e.name == child.name) {
        Some(existing) => {
            deep_merge(&mut existing.table, child.table);
            existing.key_locs.extend(child.key_locs);
            existing.loc = child.loc;
        }
        None => executors.push(child),
    }
}

fn override_stage(base: &mut StageSpec, child: StageSpec) {
    if child.executor.is_some() {
        base.executor = child.executor;
    }
    if !child.kind.is_empty() {
        base.kind = child.kind;
        base.kind_loc = child.kind_loc;
    }
    for input in child.inputs {
        match base.inputs.iter_mut().find(|i| i.slot == input.slot) {
            Some(existing) => *existing = input,
            None => base.inputs.push(input),
        }
    }
    deep_merge(&mut base.params, child.params);
    base.param_locs.extend(child.param_locs);
    base.loc = child.loc;
    base.base_dir = child.base_dir;
}

fn deep_merge(base: &mut toml::Table, child: toml::Table) {
    for (key, value) in child {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(c)) => deep_merge(b, c),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[derive(Default)]
struct PipelineHeader {
    name: Option<String>,
    description: Option<String>,
    /// Each with where it is named, for errors about the file it names.
    extends: Option<(String, Loc)>,
    include: Vec<(String, Loc)>,
    library: Vec<(String, Loc)>,
}

fn parse_header(
    file: u32,
    value: &Spanned<DeValue>,
    sources: &Sources,
) -> Result<PipelineHeader, Vec<Diagnostic>> {
    let Some(table) = value.get_ref().as_table() else {
        return Err(vec![sources.error(
            Loc::new(file, value.span()),
            "pipeline",
            "expected a table",
        )]);
    };
    let mut header = PipelineHeader::default();
    let mut errors = Vec::new();
    for (key, value) in table {
        let field = format!("pipeline.{}", key.get_ref());
        let loc = Loc::new(file, value.span());
        let string = || {
            value
                .get_ref()
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| sources.error(loc, &field, "expected a string"))
        };
        match key.get_ref().as_ref() {
            "name" => match string() {
                Ok(s) if is_identifier(&s) => header.name = Some(s),
                Ok(_) => {
                    errors.push(sources.error(loc, &field, "use letters, digits, `_` and `-` only"))
                }
                Err(e) => errors.push(e),
            },
            "description" => match string() {
                Ok(s) => header.description = Some(s),
                Err(e) => errors.push(e),
            },
            "extends" => match string() {
                Ok(s) => header.extends = Some((s, loc)),
                Err(e) => errors.push(e),
            },
            key @ ("include" | "library") => match value.get_ref().as_array() {
                Some(items) => {
                    let list = if key == "include" {
                        &mut header.include
                    } else {
                        &mut header.library
                    };
                    for item in items.iter() {
                        let loc = Loc::new(file, item.span());
                        match item.get_ref().as_str() {
                            Some(s) => list.push((s.to_string(), loc)),
                            None => errors.push(sources.error(loc, &field, "expected a file path")),
                        }
                    }
                }
                None => errors.push(sources.error(loc, &field, "expected a list of file paths")),
            },
            other => errors.push(sources.error(
                Loc::new(file, key.span()),
                &field,
                format!("unknown key `{other}`; expected name, description, extends, include or library"),
            )),
        }
    }
    if errors.is_empty() {
        Ok(header)
    } else {
        Err(errors)
    }
}

fn parse_grid(
    file: u32,
    value: &Spanned<DeValue>,
    sources: &Sources,
) -> Result<Vec<GridVar>, Vec<Diagnostic>> {
    let Some(table) = value.get_ref().as_table() else {
        return Err(vec![sources.error(
            Loc::new(file, value.span()),
            "grid",
            "expected a table of value lists",
        )]);
    };
    let mut grid = Vec::new();
    let mut errors = Vec::new();
    for (key, value) in table {
        let name = key.get_ref().to_string();
        let field = format!("grid.{name}");
        let loc = Loc::new(file, key.span());
        if !is_identifier(&name) {
            errors.push(sources.error(loc, &field, "use letters, digits, `_` and `-` only"));
            continue;
        }
        let Some(items) = value.get_ref().as_array() else {
            errors.push(sources.error(
                Loc::new(file, value.span()),
                &field,
                "expected a list of values, e.g. [0.0, 0.5, 1.0]",
            ));
            continue;
        };
        if items.is_empty() {
            errors.push(sources.error(
                Loc::new(file, value.span()),
                &field,
                format!("grid variable `{name}` has no values"),
            ));
            continue;
        }
        let mut values = Vec::new();
        for item in items.iter() {
            let value = to_value(item);
            if matches!(value, toml::Value::Array(_) | toml::Value::Table(_)) {
                errors.push(sources.error(
                    Loc::new(file, item.span()),
                    &field,
                    "grid values must be strings, numbers or booleans",
                ));
            } else if values.contains(&value) {
                errors.push(sources.error(
                    Loc::new(file, item.span()),
                    &field,
                    format!("value {value} is listed twice"),
                ));
            } else {
                values.push(value);
            }
        }
        grid.push(GridVar { name, values, loc });
    }
    // The parsed table iterates its keys sorted; the file's order is the
    // grid's order (instances run first variable slowest, last fastest).
    grid.sort_by_key(|var| var.loc.start);
    if errors.is_empty() {
        Ok(grid)
    } else {
        Err(errors)
    }
}

fn parse_stage(
    file: u32,
    base_dir: &Path,
    name: &Spanned<std::borrow::Cow<str>>,
    value: &Spanned<DeValue>,
    sources: &Sources,
) -> Result<StageSpec, Vec<Diagnostic>> {
    let stage_name = name.get_ref().to_string();
    let field = format!("stages.{stage_name}");
    let name_loc = Loc::new(file, name.span());
    if !is_identifier(&stage_name) {
        return Err(vec![sources.error(
            name_loc,
            &field,
            "stage names use letters, digits, `_` and `-` only",
        )]);
    }
    let Some(table) = value.get_ref().as_table() else {
        return Err(vec![sources.error(
            Loc::new(file, value.span()),
            &field,
            "expected a table with at least `kind = \"...\"`",
        )]);
    };
    let mut stage = StageSpec {
        library: false,
        name: stage_name,
        loc: Loc::new(file, value.span()),
        kind: String::new(),
        kind_loc: name_loc,
        inputs: Vec::new(),
        params: toml::Table::new(),
        param_locs: BTreeMap::new(),
        base_dir: base_dir.to_path_buf(),
        executor: None,
    };
    let mut errors = Vec::new();
    for (key, value) in table {
        let key_name = key.get_ref().to_string();
        let key_loc = Loc::new(file, key.span());
        match key_name.as_str() {
            "kind" => match value.get_ref().as_str() {
                Some(kind) => {
                    stage.kind = kind.to_string();
                    stage.kind_loc = Loc::new(file, value.span());
                }
                None => errors.push(sources.error(
                    Loc::new(file, value.span()),
                    &format!("{field}.kind"),
                    "expected a string naming a stage kind",
                )),
            },
            "inputs" => match parse_inputs(file, &field, value, sources) {
                Ok(inputs) => stage.inputs = inputs,
                Err(mut e) => errors.append(&mut e),
            },
            "executor" => match value.get_ref().as_str() {
                Some(name) => stage.executor = Some((name.to_string(), Loc::new(file, value.span()))),
                None => errors.push(sources.error(
                    Loc::new(file, value.span()),
                    &format!("{field}.executor"),
                    "expected a string naming an executor (`local`, `slurm` or an [executors.NAME])",
                )),
            },
            _ => {
                record_locs(file, &key_name, key_loc, value, &mut stage.param_locs);
                stage.params.insert(key_name, to_value(value));
            }
        }
    }
    if errors.is_empty() {
        Ok(stage)
    } else {
        Err(errors)
    }
}

fn parse_executors(
    file: u32,
    value: &Spanned<DeValue>,
    sources: &Sources,
) -> Result<Vec<ExecutorSpec>, Vec<Diagnostic>> {
    let Some(table) = value.get_ref().as_table() else {
        return Err(vec![sources.error(
            Loc::new(file, value.span()),
            "executors",
            "expected a table of executors, e.g. [executors.gpu]",
        )]);
    };
    let mut executors = Vec::new();
    let mut errors = Vec::new();
    for (name, body) in table {
        let field = format!("executors.{}", name.get_ref());
        if !is_identifier(name.get_ref()) {
            errors.push(sources.error(
                Loc::new(file, name.span()),
                &field,
                "executor names use letters, digits, `_` and `-` only",
            ));
            continue;
        }
        let Some(fields) = body.get_ref().as_table() else {
            errors.push(sources.error(
                Loc::new(file, body.span()),
                &field,
                "expected a table, e.g. { type = \"slurm\", partition = \"gpu\" }",
            ));
            continue;
        };
        let mut spec = ExecutorSpec {
            name: name.get_ref().to_string(),
            loc: Loc::new(file, name.span()),
            table: toml::Table::new(),
            key_locs: BTreeMap::new(),
        };
        for (key, item) in fields {
            spec.key_locs
                .insert(key.get_ref().to_string(), Loc::new(file, key.span()));
            spec.table.insert(key.get_ref().to_string(), to_value(item));
        }
        executors.push(spec);
    }
    if errors.is_empty() {
        Ok(executors)
    } else {
        Err(errors)
    }
}

fn parse_inputs(
    file: u32,
    field: &str,
    value: &Spanned<DeValue>,
    sources: &Sources,
) -> Result<Vec<InputSpec>, Vec<Diagnostic>> {
    let Some(table) = value.get_ref().as_table() else {
        return Err(vec![sources.error(
            Loc::new(file, value.span()),
            &format!("{field}.inputs"),
            "expected a table: inputs.SLOT = \"stage\" or \"stage.output\"",
        )]);
    };
    let mut inputs = Vec::new();
    let mut errors = Vec::new();
    for (slot, refs) in table {
        let slot_field = format!("{field}.inputs.{}", slot.get_ref());
        let items: Vec<&Spanned<DeValue>> = match refs.get_ref() {
            DeValue::String(_) => vec![refs],
            DeValue::Array(items) => items.iter().collect(),
            _ => {
                errors.push(sources.error(
                    Loc::new(file, refs.span()),
                    &slot_field,
                    "expected \"stage\", \"stage.output\", \"stage[*]\" or a list of them",
                ));
                continue;
            }
        };
        let mut parsed = Vec::new();
        for item in items {
            let loc = Loc::new(file, item.span());
            match item.get_ref().as_str().map(parse_ref) {
                Some(Some(r)) => parsed.push(OutputRef { loc, ..r }),
                _ => errors.push(sources.error(
                    loc,
                    &slot_field,
                    "expected \"stage\", \"stage.output\", \"stage[*]\", \"stage.output[*]\" \
                     or \"stage[search=best]\"",
                )),
            }
        }
        inputs.push(InputSpec {
            slot: slot.get_ref().to_string(),
            loc: Loc::new(file, slot.span()),
            refs: parsed,
        });
    }
    if errors.is_empty() {
        Ok(inputs)
    } else {
        Err(errors)
    }
}

/// Where a TOML error without a position most likely is: the parser
/// reports a key of too many dotted parts (its recursion limit) with no
/// span, so point at the line whose key (or table header) has the most
/// dots outside quotes.
fn longest_dotted_key(text: &str) -> Option<std::ops::Range<usize>> {
    let mut best: Option<(usize, std::ops::Range<usize>)> = None;
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let key = if trimmed.starts_with('[') {
            trimmed
        } else {
            trimmed.split('=').next().unwrap_or_default()
        };
        let mut quote = None;
        let mut dots = 0;
        for c in key.chars() {
            match (quote, c) {
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), _) if c == q => quote = None,
                (None, '.') => dots += 1,
                _ => {}
            }
        }
        if dots > best.as_ref().map_or(0, |(n, _)| *n) {
            let offset = start + (line.len() - trimmed.len());
            best = Some((dots, offset..offset + key.trim_end().len()));
        }
        start += line.len();
    }
    best.map(|(_, span)| span)
}

/// `stage`, `stage.output`, with `[*]` (every instance) or `[search=best]`
/// (the search's winner) after either.
fn parse_ref(text: &str) -> Option<OutputRef> {
    let (text, all, winner) = if let Some(rest) = text.strip_suffix("[*]") {
        (rest, true, false)
    } else if let Some(rest) = text.strip_suffix("[search=best]") {
        (rest, false, true)
    } else {
        (text, false, false)
    };
    let (stage, output) = match text.split_once('.') {
        Some((stage, output)) if !output.is_empty() => (stage, Some(output.to_string())),
        Some(_) => return None,
        None => (text, None),
    };
    is_identifier(stage).then(|| OutputRef {
        stage: stage.to_string(),
        output,
        all,
        winner,
        loc: Loc::new(0, 0..0),
    })
}

/// Remember where each (nested) param was written.
fn record_locs(
    file: u32,
    path: &str,
    key_loc: Loc,
    value: &Spanned<DeValue>,
    locs: &mut BTreeMap<String, Loc>,
) {
    locs.insert(path.to_string(), key_loc);
    match value.get_ref() {
        DeValue::Table(table) => {
            for (key, item) in table {
                let child = format!("{path}.{}", key.get_ref());
                record_locs(file, &child, Loc::new(file, key.span()), item, locs);
            }
        }
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let child = format!("{path}[{i}]");
                record_locs(file, &child, Loc::new(file, item.span()), item, locs);
            }
        }
        _ => {}
    }
}

fn to_value(value: &Spanned<DeValue>) -> toml::Value {
    toml::Value::deserialize(ValueDeserializer::from(value.clone()))
        .expect("a parsed TOML value converts to toml::Value")
}

pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_output_refs() {
        let parts = |text| parse_ref(text).map(|r| (r.stage, r.output, r.all, r.winner));
        assert_eq!(parts("a"), Some(("a".into(), None, false, false)));
        assert_eq!(
            parts("a.out.txt[*]"),
            Some(("a".into(), Some("out.txt".into()), true, false))
        );
        assert_eq!(
            parts("train.model[search=best]"),
            Some(("train".into(), Some("model".into()), false, true))
        );
        assert!(parse_ref("a.").is_none());
        assert!(parse_ref("a b").is_none());
        assert!(parse_ref("a[search=worst]").is_none());
    }
}
