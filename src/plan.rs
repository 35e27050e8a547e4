//! What a run would do: for each instance, cached or to-run, and why.
//!
//! An instance's key needs its inputs' content hashes, which are known only
//! once the producing instances are cached. An instance downstream of work
//! still to do is *pending*: after its inputs are rebuilt it may turn out to
//! be cached after all (when they come out byte-identical).

use std::collections::BTreeMap;

use crate::cache::{Cache, InputRecord, Record};
use crate::hashing::{prefix_family, stage_key};
use crate::pipeline::expand::Gate;
use crate::pipeline::Pipeline;
use crate::search::{self, Admission};
use crate::task::PrefixSpec;

#[derive(Debug, Clone)]
pub enum Status {
    /// `note`: what a cached search rung decided.
    Cached {
        key: String,
        note: Option<String>,
    },
    Run {
        key: String,
        reasons: Vec<String>,
    },
    Pending {
        after: String,
    },
    /// Not run: `[search]` stopped it or what it needs.
    Stopped {
        reason: String,
    },
}

/// What instance `i` comes to once everything it depends on is settled
/// (done, or stopped by the search).
pub enum Settled {
    /// A dependency is not settled yet (the first such one).
    Waiting(usize),
    /// The search stopped it.
    Stopped(String),
    /// Its key and the inputs as they go into its record.
    Keyed(String, BTreeMap<String, Vec<InputRecord>>),
}

/// Settle instance `i` given its dependencies' outputs (`None`: not done)
/// and which of them the search stopped.
pub fn settle(
    pipeline: &Pipeline,
    cache: &Cache,
    i: usize,
    outputs: &[Option<BTreeMap<String, String>>],
    stopped: &[bool],
) -> anyhow::Result<Settled> {
    let instance = &pipeline.instances[i];
    if let Some(d) = instance
        .dependencies()
        .find(|&d| outputs[d].is_none() && !stopped[d])
    {
        return Ok(Settled::Waiting(d));
    }
    let gate_decision = match &instance.gate {
        Some(Gate::Promoted { decision, .. } | Gate::Winner { decision }) => Some(*decision),
        None => None,
    };
    if let Some(d) = gate_decision.filter(|&d| stopped[d]) {
        return Ok(Settled::Stopped(format!(
            "{} was stopped",
            pipeline.instances[d].name
        )));
    }
    let winner = match search::admission(
        pipeline,
        cache,
        i,
        gate_decision.and_then(|d| outputs[d].as_ref()),
    )? {
        Admission::Stopped(reason) => return Ok(Settled::Stopped(reason)),
        Admission::Open { winner } => winner,
    };
    let lost = instance
        .inputs
        .iter()
        .filter(|input| !input.collecting && !input.reads_winner)
        .flat_map(|input| &input.sources)
        .find(|(p, _)| stopped[*p]);
    if let Some((p, _)) = lost {
        return Ok(Settled::Stopped(format!(
            "needs {}, which the search stopped",
            pipeline.instances[*p].name
        )));
    }
    let (key, inputs) = instance_key(pipeline, i, outputs, stopped, winner.as_ref())
        .expect("every dependency is settled");
    Ok(Settled::Keyed(key, inputs))
}

/// The key of instance `i` given its producers' outputs, with the input
/// hashes as they go into its record; `None` while a producer is unfinished.
/// Producers the search stopped are left out of collecting inputs, and of
/// a winner's candidates only the `winner` is read.
pub fn instance_key(
    pipeline: &Pipeline,
    i: usize,
    outputs: &[Option<BTreeMap<String, String>>],
    stopped: &[bool],
    winner: Option<&BTreeMap<String, serde_json::Value>>,
) -> Option<(String, BTreeMap<String, Vec<InputRecord>>)> {
    let instance = &pipeline.instances[i];
    let mut inputs = BTreeMap::new();
    for input in &instance.inputs {
        let mut artifacts = Vec::new();
        for (producer, output) in &input.sources {
            let passed_over = input.reads_winner
                && winner.is_some_and(|w| !search::is_winner(pipeline, *producer, w));
            if passed_over || (input.collecting && stopped[*producer]) {
                continue;
            }
            let hash = outputs[*producer].as_ref()?.get(output)?.clone();
            artifacts.push(InputRecord {
                producer: pipeline.instances[*producer].name.clone(),
                hash,
            });
        }
        inputs.insert(input.slot.clone(), artifacts);
    }
    let stage = pipeline.stage_of(i);
    let key = stage_key(
        stage.kind.kind(),
        stage.kind.version(),
        &instance.params,
        &input_hashes(&inputs),
    );
    Some((key, inputs))
}

fn input_hashes(inputs: &BTreeMap<String, Vec<InputRecord>>) -> BTreeMap<String, Vec<String>> {
    inputs
        .iter()
        .map(|(slot, artifacts)| {
            (
                slot.clone(),
                artifacts.iter().map(|a| a.hash.clone()).collect(),
            )
        })
        .collect()
}

/// The prefixes instance `i` shares, when its kind reuses prefixes (see
/// `xlpipe_stage_api::PrefixReuse`) and these are its inputs.
pub fn prefix_spec(
    pipeline: &Pipeline,
    i: usize,
    inputs: &BTreeMap<String, Vec<InputRecord>>,
) -> Option<PrefixSpec> {
    let stage = pipeline.stage_of(i);
    let reuse = stage.kind.prefix_reuse(&pipeline.instances[i].params)?;
    Some(PrefixSpec {
        family: prefix_family(
            stage.kind.kind(),
            stage.kind.version(),
            &reuse.shared_params,
            &input_hashes(inputs),
        ),
        reusable_until: reuse.reusable_until,
    })
}

/// Statuses of every instance, in the pipeline's (dependency) order.
pub fn plan(pipeline: &Pipeline, cache: &Cache, forced: &[bool]) -> Vec<Status> {
    let mut outputs: Vec<Option<BTreeMap<String, String>>> = vec![None; pipeline.instances.len()];
    let mut statuses = Vec::with_capacity(pipeline.instances.len());
    let mut prefixes: Vec<Option<PrefixSpec>> = vec![None; pipeline.instances.len()];
    let mut stopped = vec![false; pipeline.instances.len()];
    for i in 0..pipeline.instances.len() {
        let status = match settle(pipeline, cache, i, &outputs, &stopped) {
            Ok(Settled::Waiting(d)) => Status::Pending {
                after: pipeline.instances[d].name.clone(),
            },
            Err(err) => Status::Pending {
                after: format!("a search decision that cannot be read ({err:#})"),
            },
            Ok(Settled::Stopped(reason)) => {
                stopped[i] = true;
                Status::Stopped { reason }
            }
            Ok(Settled::Keyed(key, inputs)) => match cache.record(&key) {
                Some(record) if !forced[i] => {
                    let note = (pipeline.stage_of(i).name == search::STAGE)
                        .then(|| search::decision(cache, &record.outputs).ok())
                        .flatten()
                        .map(|d| search::summary(&d));
                    outputs[i] = Some(record.outputs);
                    Status::Cached { key, note }
                }
                _ => {
                    let reasons = if forced[i] {
                        vec!["forced".to_string()]
                    } else {
                        why_run(pipeline, cache, i, &key, &inputs)
                    };
                    prefixes[i] = prefix_spec(pipeline, i, &inputs);
                    Status::Run { key, reasons }
                }
            },
        };
        statuses.push(status);
    }
    for (i, status) in statuses.iter_mut().enumerate() {
        if let (Status::Run { reasons, .. }, Some(spec)) = (status, &prefixes[i]) {
            reasons.extend(resume_note(pipeline, cache, spec, &prefixes));
        }
    }
    statuses
}

/// Where an instance to run will resume: the longest stored prefix of its
/// family, or a longer one that a sibling in this run stores first (the
/// scheduler starts a family's instances shortest stable phase first).
fn resume_note(
    pipeline: &Pipeline,
    cache: &Cache,
    spec: &PrefixSpec,
    prefixes: &[Option<PrefixSpec>],
) -> Option<String> {
    let stored = cache.best_prefix(&spec.family, spec.reusable_until);
    let sibling = prefixes
        .iter()
        .enumerate()
        .filter_map(|(j, other)| Some((j, other.as_ref()?)))
        .filter(|(_, other)| {
            other.family == spec.family && other.reusable_until < spec.reusable_until
        })
        .max_by_key(|(_, other)| other.reusable_until);
    match (stored, sibling) {
        (stored, Some((j, other)))
            if stored
                .as_ref()
                .is_none_or(|s| s.step < other.reusable_until) =>
        {
            Some(format!(
                "resumes from the stable phase at step {} of {} (which runs first)",
                other.reusable_until, pipeline.instances[j].name
            ))
        }
        (Some(stored), _) => Some(format!(
            "resumes from the stable phase at step {} of {}",
            stored.step, stored.instance
        )),
        _ => None,
    }
}

/// Why instance `i` (with new key `key`) is not cached, compared with what
/// the same instance had at the pipeline's last run.
pub fn why_run(
    pipeline: &Pipeline,
    cache: &Cache,
    i: usize,
    key: &str,
    inputs: &BTreeMap<String, Vec<InputRecord>>,
) -> Vec<String> {
    let instance = &pipeline.instances[i];
    let Some(previous) = cache.instance_ref(&pipeline.name, &instance.name) else {
        return vec!["new: not run before in this pipeline".into()];
    };
    if previous.key == key {
        return vec!["its cached result is missing (removed by gc, or damaged)".into()];
    }
    let Some(old) = cache.record(&previous.key) else {
        return vec!["params or inputs changed (the previous result is no longer cached)".into()];
    };
    let stage = pipeline.stage_of(i);
    let mut reasons = Vec::new();
    if old.kind != stage.kind.kind() {
        reasons.push(format!(
            "kind changed: {} -> {}",
            old.kind,
            stage.kind.kind()
        ));
    } else if old.version != stage.kind.version() {
        reasons.push(format!(
            "stage code changed: version {} -> {}",
            old.version,
            stage.kind.version()
        ));
    }
    diff_json("", &old.params, &instance.params, &mut reasons);
    reasons.extend(diff_inputs(&old, inputs));
    if reasons.is_empty() {
        reasons.push("key changed".into());
    }
    reasons
}

fn diff_inputs(old: &Record, new: &BTreeMap<String, Vec<InputRecord>>) -> Vec<String> {
    let mut reasons = Vec::new();
    for (slot, artifacts) in new {
        let before = old.inputs.get(slot);
        let same = before.is_some_and(|b| {
            b.len() == artifacts.len() && b.iter().zip(artifacts).all(|(x, y)| x.hash == y.hash)
        });
        if !same {
            let producers: Vec<&str> = artifacts.iter().map(|a| a.producer.as_str()).collect();
            let from = match producers.as_slice() {
                [one] => (*one).to_string(),
                many => format!("{} instances", many.len()),
            };
            reasons.push(format!("input `{slot}` changed (from {from})"));
        }
    }
    for slot in old.inputs.keys().filter(|s| !new.contains_key(*s)) {
        reasons.push(format!("input `{slot}` removed"));
    }
    reasons
}

fn diff_json(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_json(&join(k), x, y, out),
                    (None, Some(y)) => out.push(format!("param {} added: {y}", join(k))),
                    (Some(x), None) => out.push(format!("param {} removed (was {x})", join(k))),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("param {path}: {a} -> {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn param_diffs_name_the_path() {
        let mut out = Vec::new();
        diff_json(
            "",
            &json!({"opt": {"lr": 0.1}, "a": 1}),
            &json!({"opt": {"lr": 0.2}, "b": 2}),
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                "param a removed (was 1)",
                "param b added: 2",
                "param opt.lr: 0.1 -> 0.2"
            ]
        );
    }
}
