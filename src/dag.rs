//! `xlpipe dag`: the pipeline graph as text or Graphviz.

use std::fmt::Write;

use crate::pipeline::expand::Gate;
use crate::pipeline::Pipeline;

pub fn render(pipeline: &Pipeline, dot: bool, instances: bool) -> String {
    match (dot, instances) {
        (false, false) => stages_text(pipeline),
        (false, true) => instances_text(pipeline),
        (true, false) => stages_dot(pipeline),
        (true, true) => instances_dot(pipeline),
    }
}

fn stages_text(p: &Pipeline) -> String {
    let mut out = format!("pipeline {}", p.name);
    if !p.grid.is_empty() {
        let vars: Vec<String> = p
            .grid
            .iter()
            .map(|v| format!("{}[{}]", v.name, v.values.len()))
            .collect();
        let _ = write!(out, " (grid: {})", vars.join(" x "));
    }
    out.push('\n');
    let name_width = p.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let kind_width = p
        .stages
        .iter()
        .map(|s| s.kind.kind().len())
        .max()
        .unwrap_or(0);
    for stage in &p.stages {
        let count = stage.instances.len();
        let _ = write!(
            out,
            "  {:<name_width$}  {:<kind_width$}  {:>4} instance{}",
            stage.name,
            stage.kind.kind(),
            count,
            if count == 1 { " " } else { "s" }
        );
        if !stage.upstream.is_empty() {
            let from: Vec<String> = stage
                .upstream
                .iter()
                .map(|&(u, all)| format!("{}{}", p.stages[u].name, if all { "[*]" } else { "" }))
                .collect();
            let _ = write!(out, "  <- {}", from.join(", "));
        }
        if !stage.vars.is_empty() {
            let _ = write!(out, "  (varies over {})", stage.vars.join(", "));
        }
        let gates = stage.instances.iter().map(|&i| &p.instances[i].gate);
        if let Some(gate) = gates.flatten().next() {
            out.push_str(match gate {
                Gate::Promoted { .. } => "  (above the first rung: runs if [search] promotes it)",
                Gate::Winner { .. } => "  (reads the [search] winner)",
            });
        }
        out.push('\n');
    }
    out
}

fn instances_text(p: &Pipeline) -> String {
    let mut out = String::new();
    for instance in &p.instances {
        out.push_str(&instance.name);
        let inputs: Vec<String> = instance
            .inputs
            .iter()
            .map(|input| {
                let from: Vec<String> = input
                    .sources
                    .iter()
                    .map(|(i, output)| format!("{}.{output}", p.instances[*i].name))
                    .collect();
                format!("{} <- {}", input.slot, from.join(", "))
            })
            .collect();
        if !inputs.is_empty() {
            let _ = write!(out, "  ({})", inputs.join("; "));
        }
        match &instance.gate {
            Some(Gate::Promoted { decision, .. }) => {
                let _ = write!(out, "  [if {} promotes it]", p.instances[*decision].name);
            }
            Some(Gate::Winner { decision }) => {
                let _ = write!(out, "  [the winner of {}]", p.instances[*decision].name);
            }
            None => {}
        }
        out.push('\n');
    }
    out
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn stages_dot(p: &Pipeline) -> String {
    let mut out = format!(
        "digraph {} {{\n  rankdir=LR;\n  node [shape=box];\n",
        quote(&p.name)
    );
    for stage in &p.stages {
        let label = format!(
            "{}\\n{} x{}",
            stage.name,
            stage.kind.kind(),
            stage.instances.len()
        );
        let _ = writeln!(out, "  {} [label=\"{label}\"];", quote(&stage.name));
        for &(u, all) in &stage.upstream {
            let style = if all {
                " [style=dashed, label=\"all\"]"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {} -> {}{style};",
                quote(&p.stages[u].name),
                quote(&stage.name)
            );
        }
    }
    out.push_str("}\n");
    out
}

fn instances_dot(p: &Pipeline) -> String {
    let mut out = format!(
        "digraph {} {{\n  rankdir=LR;\n  node [shape=box];\n",
        quote(&p.name)
    );
    for instance in &p.instances {
        let _ = writeln!(out, "  {};", quote(&instance.name));
        for input in &instance.inputs {
            for (i, _) in &input.sources {
                let _ = writeln!(
                    out,
                    "  {} -> {} [label={}];",
                    quote(&p.instances[*i].name),
                    quote(&instance.name),
                    quote(&input.slot)
                );
            }
        }
    }
    out.push_str("}\n");
    out
}
