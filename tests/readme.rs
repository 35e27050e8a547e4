//! The README's example pipeline is real: it validates and runs.

mod common;

#[test]
fn readme_example_pipeline_runs() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("```toml\n").expect("README has a toml example") + "```toml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let s = common::Scratch::new();
    s.write("demo.toml", &readme[start..end]);
    assert_eq!(s.ok(&["run", "demo.toml"]).counts(), (8, 0));
    assert_eq!(s.ok(&["run", "demo.toml"]).counts(), (0, 8));
    let plan = s.ok(&["plan", "demo.toml"]).stdout;
    assert!(plan.starts_with("demo: 8 instances: 8 cached"), "{plan}");
}
