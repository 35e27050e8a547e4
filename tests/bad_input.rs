//! Every kind of bad pipeline file is refused before anything runs, with an
//! error naming file, line, column and field, and nothing in the cache.

mod common;

use common::Scratch;

/// Run `plan` and `run` on `text`; both must fail with exit code 2 and an
/// error containing every one of `expected`. Returns the error text.
fn refused(text: &str, expected: &[&str]) -> String {
    let s = Scratch::new();
    s.write("p.toml", text);
    refused_in(&s, "p.toml", expected)
}

fn refused_in(s: &Scratch, file: &str, expected: &[&str]) -> String {
    for command in ["plan", "run"] {
        let ran = s.xlpipe(&[command, file]);
        assert_eq!(ran.code, 2, "{command}: {ran}");
        for e in expected {
            assert!(
                ran.stderr.contains(e),
                "{command}: expected {e:?} in\n{ran}"
            );
        }
        assert_eq!(s.records(), 0);
        assert_eq!(common::count_files(&s.cache().join("objects")), 0);
    }
    s.xlpipe(&["plan", file]).stderr
}

const OK_STAGE: &str =
    "[stages.a]\nkind = \"command\"\ncmd = \"echo > {outputs.o}\"\noutputs = [\"o\"]\n";

#[test]
fn toml_syntax_error() {
    let err = refused(
        "[stages.a]\nkind = \"command\"\ncmd = \"unterminated\n",
        &["p.toml:3:", "TOML syntax"],
    );
    assert!(err.contains("3 | cmd = \"unterminated"), "{err}");
}

#[test]
fn unknown_stage_kind_suggests_the_nearest() {
    refused(
        "[stages.a]\nkind = \"comand\"\n",
        &["p.toml:2:8: stages.a.kind: unknown stage kind `comand`; did you mean `command`?"],
    );
}

#[test]
fn unknown_param() {
    refused(
        &format!("{OK_STAGE}cmd_typo = 1\n"),
        &["p.toml:5:1: stages.a.cmd_typo: unknown field `cmd_typo`"],
    );
}

#[test]
fn mistyped_param() {
    refused(
        "[stages.a]\nkind = \"command\"\ncmd = \"true\"\noutputs = [\"o\", 3]\n",
        &["p.toml:4:17: stages.a.outputs[1]: invalid type: integer `3`, expected a string"],
    );
}

#[test]
fn missing_required_param() {
    refused(
        "[stages.a]\nkind = \"command\"\n",
        &["p.toml:1:1: stages.a: missing field `cmd`"],
    );
}

#[test]
fn reference_to_a_missing_stage() {
    refused(
        &format!("{OK_STAGE}\n[stages.b]\nkind = \"command\"\ninputs.x = \"aa\"\ncmd = \"true\"\n"),
        &["p.toml:8:12: stages.b.inputs.x: no stage named `aa`; did you mean `a`?"],
    );
}

#[test]
fn reference_to_a_missing_output() {
    refused(
        &format!(
            "{OK_STAGE}\n[stages.b]\nkind = \"command\"\ninputs.x = \"a.nope\"\ncmd = \"true\"\n"
        ),
        &["p.toml:8:12: stages.b.inputs.x: stage `a` has no output `nope`; its outputs: o"],
    );
}

#[test]
fn dependency_cycle_is_printed() {
    refused(
        r#"
[stages.a]
kind = "command"
inputs.x = "c"
cmd = "cp {inputs.x} {outputs.o}"
outputs = ["o"]

[stages.b]
kind = "command"
inputs.x = "a"
cmd = "cp {inputs.x} {outputs.o}"
outputs = ["o"]

[stages.c]
kind = "command"
inputs.x = "b"
cmd = "cp {inputs.x} {outputs.o}"
outputs = ["o"]
"#,
        &["dependency cycle: a -> b -> c -> a"],
    );
}

#[test]
fn empty_grid_list() {
    refused(
        &format!("[grid]\nalpha = []\n{OK_STAGE}"),
        &["p.toml:2:9: grid.alpha: grid variable `alpha` has no values"],
    );
}

#[test]
fn grid_variable_used_but_not_defined() {
    refused(
        "[grid]\nalpha = [1]\n[stages.a]\nkind = \"command\"\ncmd = \"echo ${alhpa} > {outputs.o}\"\noutputs = [\"o\"]\n",
        &["p.toml:5:1: stages.a.cmd: grid variable `alhpa` is not defined in [grid]; did you mean `alpha`?"],
    );
}

#[test]
fn duplicate_stage_names_after_includes() {
    let s = Scratch::new();
    s.write("one.toml", OK_STAGE);
    s.write("two.toml", &format!("\n\n{OK_STAGE}"));
    s.write(
        "p.toml",
        "[pipeline]\ninclude = [\"one.toml\", \"two.toml\"]\n",
    );
    refused_in(
        &s,
        "p.toml",
        &[
            "two.toml:3:1: stages.a: stage `a` is defined twice (also at",
            "one.toml:1)",
        ],
    );
}

#[test]
fn include_cycle_and_missing_file() {
    let s = Scratch::new();
    s.write("p.toml", "[pipeline]\nextends = \"q.toml\"\n");
    s.write("q.toml", "[pipeline]\nextends = \"p.toml\"\n");
    refused_in(
        &s,
        "p.toml",
        &["extends/include cycle:", "p.toml -> ", "q.toml -> "],
    );
    let s = Scratch::new();
    s.write("p.toml", "[pipeline]\ninclude = [\"nope.toml\"]\n");
    refused_in(&s, "p.toml", &["nope.toml: cannot read pipeline file"]);
}

#[test]
fn unknown_input_slot_and_several_errors_at_once() {
    let err = refused(
        r#"
[stages.a]
kind = "command"
cmd = "echo > {outputs.o}"
outputs = ["o"]
colour = 1

[stages.b]
kind = "command"
cmd = "cp {inputs.x} {outputs.o}"
outputs = ["o"]
"#,
        &[
            "p.toml:6:1: stages.a.colour: unknown field `colour`",
            "stages.b.cmd: `{inputs.x}` names an input not connected in `inputs`",
        ],
    );
    assert_eq!(err.matches("error: ").count(), 2, "{err}");
}

#[test]
fn unknown_top_level_table() {
    refused(
        &format!("[stage.a]\nkind = \"command\"\n{OK_STAGE}"),
        &["p.toml:1:2: stage: unknown top-level table"],
    );
}

#[test]
fn bad_executor_tables_and_names() {
    refused(
        &format!("[executors.gpu]\npartiton = \"gpu\"\n{OK_STAGE}"),
        &["p.toml:2:1: executors.gpu.partiton: unknown Slurm option `partiton`; did you mean `partition`?"],
    );
    refused(
        &format!("[executors.gpu]\ncpus_per_task = \"eight\"\n{OK_STAGE}"),
        &["p.toml:2:1: executors.gpu.cpus_per_task:", "expected u32"],
    );
    refused(
        &format!("[executors.gpu]\ntype = \"kubernetes\"\n{OK_STAGE}"),
        &["p.toml:2:1: executors.gpu.type: unknown executor type `kubernetes`"],
    );
    refused(
        &format!("{OK_STAGE}executor = \"slrum\"\n"),
        &["p.toml:5:12: stages.a.executor: no executor named `slrum`; did you mean `slurm`?"],
    );
    // `--executor` is checked before anything runs, too.
    let s = Scratch::new();
    s.write("p.toml", OK_STAGE);
    let ran = s.xlpipe(&["run", "p.toml", "--executor", "gpu"]);
    assert_eq!(ran.code, 1, "{ran}");
    assert!(
        ran.stderr.contains("--executor: no executor named `gpu`"),
        "{ran}"
    );
    assert_eq!(s.records(), 0);
}

#[test]
fn a_missing_include_is_reported_where_it_is_named() {
    refused(
        &format!("[pipeline]\nname = \"x\"\ninclude = [\"missing.toml\"]\n\n{OK_STAGE}"),
        &[
            "p.toml:3:12",
            "pipeline.include",
            "missing.toml",
            "cannot read",
        ],
    );
    refused(
        "[pipeline]\nname = \"x\"\nextends = \"nowhere.toml\"\n",
        &["p.toml:3:11", "pipeline.extends", "nowhere.toml"],
    );
}

#[test]
fn invalid_utf8_is_located() {
    let s = Scratch::new();
    let mut bytes = OK_STAGE.replace("echo", "echo \u{0}").into_bytes();
    let at = bytes.iter().position(|&b| b == 0).unwrap();
    bytes[at] = 0xff;
    std::fs::write(s.path("p.toml"), bytes).unwrap();
    refused_in(
        &s,
        "p.toml",
        &["p.toml", "line 3, column 13", "not valid UTF-8"],
    );
}

#[test]
fn too_deep_nesting_is_located() {
    let dotted = vec!["k"; 200].join(".");
    refused(
        &format!("{OK_STAGE}\n{dotted} = 1\n"),
        &["p.toml:6:1: TOML syntax: recursion limit"],
    );
    refused(
        &format!("{OK_STAGE}\n[{dotted}]\n"),
        &["p.toml:6:1: TOML syntax: recursion limit"],
    );
    let arrays = format!("{}{}", "[".repeat(200), "]".repeat(200));
    refused(
        &format!("{OK_STAGE}x = {arrays}\n"),
        &["p.toml:5:", "max recursion depth"],
    );
}

#[test]
fn an_unused_grid_variable_is_refused() {
    refused(
        &format!("[grid]\nalpha = [0.0, 1.0]\nsede = [1, 2]\n\n{OK_STAGE}"),
        &["p.toml:2:", "grid.alpha", "used by no stage", "grid.sede"],
    );
}

#[test]
fn a_template_in_a_key_is_refused() {
    refused(
        "[grid]\na = [1, 2]\n\n[stages.s]\nkind = \"command\"\ncmd = \"echo ${a} > {outputs.o}\"\noutputs = [\"o\"]\nenv = { \"${a}\" = \"x\" }\n",
        &["p.toml:8:", "stages.s.env.${a}", "not in keys"],
    );
}

#[test]
fn an_error_is_reported_once_not_again_by_what_depends_on_it() {
    let err = refused(
        "[stages.model]\nkind = \"import\"\npath = \"no-such-folder\"\n\n\
         [stages.use]\nkind = \"command\"\ninputs.m = \"model\"\ncmd = \"ls {inputs.m} > {outputs.o}\"\noutputs = [\"o\"]\n\n\
         [stages.again]\nkind = \"command\"\ninputs.u = \"use\"\ncmd = \"cat {inputs.u} > {outputs.o}\"\noutputs = [\"o\"]\n",
        &["p.toml:3:", "no-such-folder", "2 stage(s) that depend on the stages above were not checked"],
    );
    assert_eq!(err.matches("error:").count(), 2, "{err}");
    assert!(!err.contains("no matching instance"), "{err}");
}

/// Mutations of a shipped pipeline (lines dropped, doubled, swapped,
/// characters changed): `plan` never panics or hangs, and every error names
/// a file (and, for errors in one, its line).
#[test]
fn mutated_pipelines_give_located_errors_and_no_panic() {
    let pipelines = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    // The shipped file, valid where it runs: its library by absolute path,
    // its model folder present.
    let original = std::fs::read_to_string(pipelines.join("quickstart.toml"))
        .unwrap()
        .replace(
            "library = [\"datasets.toml\"]",
            &format!(
                "library = [\"{}\"]",
                pipelines.join("datasets.toml").display()
            ),
        )
        .replace("../models/multilingual-e5-small", "model");
    let lines: Vec<&str> = original.lines().collect();
    let s = Scratch::new();
    s.write("model/config.json", "{}");
    s.write("quickstart.toml", &original);
    assert_eq!(
        s.xlpipe(&["plan", "quickstart.toml"]).code,
        0,
        "the unmutated file plans"
    );
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let specials = [
        "\"", "[", "]", "=", "{", "}", "${", ".", "\n", "#", "0", "-",
    ];
    let mut refused = 0;
    for round in 0..300 {
        let mut mutated: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        for _ in 0..1 + next(3) {
            let at = next(mutated.len());
            match next(4) {
                0 => {
                    mutated.remove(at);
                }
                1 => {
                    let copy = mutated[at].clone();
                    mutated.insert(at, copy);
                }
                2 => {
                    let other = next(mutated.len());
                    mutated.swap(at, other)
                }
                _ => {
                    let line = &mut mutated[at];
                    let cut = line
                        .char_indices()
                        .map(|(i, _)| i)
                        .nth(next(line.chars().count().max(1)))
                        .unwrap_or(line.len());
                    line.insert_str(cut, specials[next(specials.len())]);
                }
            }
        }
        s.write("quickstart.toml", &mutated.join("\n"));
        let ran = s.xlpipe(&["plan", "quickstart.toml"]);
        assert!(
            !ran.stderr.contains("panicked"),
            "round {round}: a panic\n{}\n{ran}",
            mutated.join("\n")
        );
        assert!(matches!(ran.code, 0 | 2), "round {round}: {ran}");
        if ran.code == 2 {
            refused += 1;
            for line in ran.stderr.lines().filter(|l| l.starts_with("error:")) {
                assert!(
                    line.contains(".toml"),
                    "round {round}: unlocated: {line}\n{ran}"
                );
            }
        }
    }
    assert!(
        refused > 100,
        "only {refused} of 300 mutations were refused"
    );
}
