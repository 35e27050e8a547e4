//! `report` over a small alpha x seed grid of real `evaluate_lareqa` runs:
//! the tables agree with the evaluations, the intervals and the bootstrap
//! are what they say, and `xlpipe report` prints the main table.

mod common;

use common::{embeddings, qrels, Scratch};
use polars::prelude::Column;
use xlpipe_ml::rng::SplitMix64;
use xlpipe_stage_api::table::{read_parquet, strings, write_parquet};

const DIM: usize = 8;

fn unit(v: [f32; DIM]) -> [f32; DIM] {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.map(|x| x / norm)
}

#[test]
fn report_tables_intervals_bootstrap_and_plots() {
    let s = Scratch::new();
    let mut rng = SplitMix64(5);
    let mut noise = move |scale: f32| -> [f32; DIM] {
        [0; DIM].map(|_| ((rng.next_u64() % 2001) as f32 / 1000.0 - 1.0) * scale)
    };
    let langs = ["de", "en"];
    let meanings: Vec<[f32; DIM]> = (0..40).map(|_| noise(1.0)).collect();
    let mut candidates = Vec::new();
    let mut judged = Vec::new();
    for lang in langs {
        for (i, m) in meanings.iter().enumerate() {
            let n = noise(0.3);
            candidates.push((
                format!("{lang}:{i}"),
                lang.to_string(),
                unit([0; DIM].map(|_| 0.0)).map(|_| 0.0),
            ));
            let last = candidates.last_mut().unwrap();
            last.2 = unit(std::array::from_fn(|d| m[d] + n[d]));
            judged.push((format!("q{i}"), lang.to_string(), format!("{lang}:{i}")));
        }
    }
    embeddings(&s, "c", &candidates);
    qrels(&s, &judged);
    // Question noise falls with alpha: higher alpha, better retrieval.
    for alpha in ["0.0", "0.5", "1.0"] {
        for seed in [1, 2] {
            let scale = 1.2 - alpha.parse::<f32>().unwrap() * 0.6;
            let questions: Vec<(String, String, [f32; DIM])> = langs
                .iter()
                .flat_map(|lang| {
                    meanings
                        .iter()
                        .enumerate()
                        .map(|(i, m)| {
                            let n = noise(scale);
                            (
                                format!("q{i}"),
                                lang.to_string(),
                                unit(std::array::from_fn(|d| m[d] + n[d])),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            embeddings(&s, &format!("q_{alpha}_{seed}"), &questions);
            // A training run's curves and TensorBoard folder, as `train` writes them.
            let run = format!("t_{alpha}_{seed}");
            std::fs::create_dir_all(s.path(&format!(
                "{run}/tensorboard/train[alpha={alpha},seed={seed}]"
            )))
            .unwrap();
            s.write(
                &format!("{run}/tensorboard/train[alpha={alpha},seed={seed}]/events.out.tfevents.1.xlpipe"),
                &run,
            );
            write_parquet(
                &s.path(&format!("{run}/metrics.parquet")),
                vec![
                    Column::new("step".into(), vec![1i64, 2, 3]),
                    Column::new("loss".into(), vec![Some(2.0f64), Some(1.5), Some(1.0)]),
                    Column::new("val_loss".into(), vec![None, Some(1.8f64), None]),
                ],
            )
            .unwrap();
        }
    }
    s.write(
        "p.toml",
        r#"
[pipeline]
name = "report-test"

[grid]
alpha = [0.0, 0.5, 1.0]
seed = [1, 2]

[stages.d]
kind = "import"
path = "d"
[stages.c]
kind = "import"
path = "c"
[stages.q]
kind = "command"
cmd = "cp -r q_${alpha}_${seed} {outputs.vectors}"
outputs = ["vectors"]
deps = ["q_${alpha}_${seed}"]
[stages.eval]
kind = "evaluate_lareqa"
inputs.data = "d"
inputs.questions = "q"
inputs.candidates = "c"
[stages.tr]
kind = "command"
cmd = "cp -r t_${alpha}_${seed} {outputs.training}"
outputs = ["training"]
deps = ["t_${alpha}_${seed}"]
[stages.report]
kind = "report"
inputs.evaluations = "eval[*]"
inputs.training = "tr.training[*]"
in_domain = ["eval"]
bootstrap_samples = 200
"#,
    );
    s.ok(&["run", "p.toml"]);
    if let Ok(keep) = std::env::var("XLPIPE_KEEP_REPORT") {
        let _ = std::fs::remove_dir_all(&keep);
        let _ = std::process::Command::new("cp")
            .args(["-r"])
            .arg(s.path(""))
            .arg(&keep)
            .status();
    }
    let shown = s.ok(&["show", "report"]).stdout;
    let dir = s.path(
        shown
            .lines()
            .find_map(|l| l.trim().strip_prefix("output   report  "))
            .unwrap(),
    );

    // The long table holds each instance's summary numbers.
    let results = read_parquet(&dir.join("results.parquet")).unwrap();
    let value = |alpha: &str, seed: &str, setting: &str, metric: &str| -> f64 {
        let (a, sd, st, m) = (
            strings(&results, "alpha").unwrap(),
            strings(&results, "seed").unwrap(),
            strings(&results, "setting").unwrap(),
            strings(&results, "metric").unwrap(),
        );
        let row = (0..results.height())
            .find(|&i| a[i] == alpha && sd[i] == seed && st[i] == setting && m[i] == metric)
            .unwrap();
        results
            .column("value")
            .unwrap()
            .f64()
            .unwrap()
            .get(row)
            .unwrap()
    };
    // 6 instances x (3 settings x 5 metrics + bias).
    assert_eq!(results.height(), 6 * 16);

    // Main table: mean and t-interval over the two seeds.
    let main = read_parquet(&dir.join("main.parquet")).unwrap();
    assert_eq!(strings(&main, "alpha").unwrap(), ["0.0", "0.5", "1.0"]);
    let cell = |name: &str, row: usize| -> f64 {
        main.column(name).unwrap().f64().unwrap().get(row).unwrap()
    };
    for (row, alpha) in ["0.0", "0.5", "1.0"].iter().enumerate() {
        let (x1, x2) = (
            value(alpha, "1", "mono", "map"),
            value(alpha, "2", "mono", "map"),
        );
        let mean = (x1 + x2) / 2.0;
        let sd = ((x1 - mean).powi(2) + (x2 - mean).powi(2)).sqrt();
        assert!((cell("eval/mono/map", row) - mean).abs() < 1e-12);
        // t(0.975, 1 degree of freedom) from scipy.stats.t.ppf.
        let t = 12.706_204_736_174_698;
        assert!((cell("eval/mono/map/ci95", row) - t * sd / 2f64.sqrt()).abs() < 1e-9);
        // One in-domain dataset: its domain average would repeat its
        // columns, and the table leaves it out.
        assert!(main.column("in-domain/mono/map").is_err());
    }
    assert!(cell("eval/multi/map", 2) > cell("eval/multi/map", 0));

    // Bootstrap: with every query in every pool, the observed difference is
    // the difference of the macro averages.
    let boot = read_parquet(&dir.join("bootstrap.parquet")).unwrap();
    let (a, base, setting, metric) = (
        strings(&boot, "alpha").unwrap(),
        boot.column("baseline_alpha")
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect::<Vec<_>>(),
        strings(&boot, "setting").unwrap(),
        strings(&boot, "metric").unwrap(),
    );
    // Points 0.5 and 1.0 against 0, 0.0 and 0.5 against 1; cells: 3 x map + bias.
    assert_eq!(boot.height(), 4 * 4);
    let delta = boot.column("delta").unwrap().f64().unwrap();
    for row in 0..boot.height() {
        if metric[row] != "map" {
            continue;
        }
        let ours = ["0.0", "0.5", "1.0"]
            .iter()
            .position(|x| *x == a[row])
            .unwrap();
        let theirs = if base[row] == 0.0 { 0 } else { 2 };
        let name = format!("eval/{}/map", setting[row]);
        let expected = cell(&name, ours) - cell(&name, theirs);
        assert!(
            (delta.get(row).unwrap() - expected).abs() < 1e-9,
            "{name} row {row}"
        );
        let (low, high) = (
            boot.column("ci_low")
                .unwrap()
                .f64()
                .unwrap()
                .get(row)
                .unwrap(),
            boot.column("ci_high")
                .unwrap()
                .f64()
                .unwrap()
                .get(row)
                .unwrap(),
        );
        assert!(low <= delta.get(row).unwrap() && delta.get(row).unwrap() <= high);
    }

    // Holm within each family (one baseline, one measure: the two other
    // alphas): the smaller p doubled, the larger kept, made monotone.
    let floats = |frame: &polars::prelude::DataFrame, name: &str| -> Vec<f64> {
        frame
            .column(name)
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect()
    };
    let (p, holm) = (floats(&boot, "p_value"), floats(&boot, "p_holm"));
    for row in 0..boot.height() {
        let sibling = (0..boot.height())
            .find(|&o| {
                o != row
                    && base[o] == base[row]
                    && setting[o] == setting[row]
                    && metric[o] == metric[row]
            })
            .unwrap();
        let (mine, other) = (p[row], p[sibling]);
        let expected = if mine < other || (mine == other && row < sibling) {
            (2.0 * mine).min(1.0)
        } else {
            (2.0 * other).min(1.0).max(mine)
        };
        assert!(
            (holm[row] - expected).abs() < 1e-12,
            "row {row}: p {mine}, sibling {other}, holm {}",
            holm[row]
        );
    }

    // Against the best point of each measure: the best is never compared
    // with itself, every other grid point is, and the answer table has one
    // row per alpha.
    let best = read_parquet(&dir.join("versus_best.parquet")).unwrap();
    let (point, best_label, best_setting) = (
        strings(&best, "alpha").unwrap(),
        strings(&best, "best").unwrap(),
        strings(&best, "setting").unwrap(),
    );
    // 4 measures (3 settings' map and bias), 2 non-best alphas each.
    assert_eq!(best.height(), 4 * 2);
    for row in 0..best.height() {
        assert_ne!(
            format!("alpha={}", point[row]),
            best_label[row],
            "row {row}"
        );
    }
    // multi/map grows with alpha here, so alpha 1 is its best.
    let multi_best = (0..best.height())
        .find(|&r| best_setting[r] == "multi" && strings(&best, "metric").unwrap()[r] == "map")
        .map(|r| best_label[r].clone())
        .unwrap();
    assert_eq!(multi_best, "alpha=1.0");
    let answer = std::fs::read_to_string(dir.join("versus_best.md")).unwrap();
    assert_eq!(answer.lines().count(), 2 + 3, "{answer}");
    assert!(
        answer.contains("within noise of the best on all"),
        "{answer}"
    );

    for file in [
        "main.csv",
        "per_language.parquet",
        "bootstrap.md",
        "report.md",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    for plot in [
        "eval-map",
        "eval-bias",
        "domains-map",
        "eval-mono-vs-multi",
        "eval-mono-vs-bias",
    ] {
        let svg = std::fs::read_to_string(dir.join("plots").join(format!("{plot}.svg"))).unwrap();
        assert!(svg.starts_with("<svg"), "{plot}");
        // The PNG: its signature, and the IHDR size, twice the SVG's 640 x 400.
        let png = std::fs::read(dir.join("plots").join(format!("{plot}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{plot}");
        let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
        assert_eq!((be(16), be(20)), (1280, 800), "{plot}");
    }
    // Training curves, and every run's TensorBoard folder gathered in one.
    assert!(dir.join("plots/validation-loss.svg").is_file());
    let mut runs: Vec<String> = std::fs::read_dir(dir.join("tensorboard"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    runs.sort();
    assert_eq!(runs.len(), 6, "{runs:?}");
    assert_eq!(runs[0], "train[alpha=0.0,seed=1]");
    assert_eq!(
        std::fs::read_to_string(
            dir.join("tensorboard/train[alpha=0.5,seed=2]/events.out.tfevents.1.xlpipe")
        )
        .unwrap(),
        "t_0.5_2"
    );
    // The trade-off chart: one point per alpha, each labelled with it.
    let tradeoff = std::fs::read_to_string(dir.join("plots/eval-mono-vs-multi.svg")).unwrap();
    for alpha in ["0", "0.5", "1"] {
        assert!(
            tradeoff.contains(&format!("font-size=\"10\">{alpha}</text>")),
            "{alpha}: {tradeoff}"
        );
    }
    let csv = std::fs::read_to_string(dir.join("main.csv")).unwrap();
    assert!(
        csv.starts_with("alpha,eval/cross/map,eval/cross/map/ci95"),
        "{csv}"
    );

    let printed = s.ok(&["report", dir.to_str().unwrap()]).stdout;
    assert!(
        printed.contains("alpha") && printed.contains(" ± "),
        "{printed}"
    );

    // Two protocols over one grid: `series` keeps their evaluations apart
    // (without it, two evaluations of one dataset at one point collide).
    let text = std::fs::read_to_string(s.path("p.toml")).unwrap();
    let (stages, _) = text.split_once("[stages.tr]").unwrap();
    s.write(
        "p2.toml",
        &format!(
            "{}\ndataset = \"set\"\n[stages.eval_b]\nkind = \"evaluate_lareqa\"\n\
             inputs.data = \"d\"\ninputs.questions = \"q\"\ninputs.candidates = \"c\"\n\
             dataset = \"set\"\n[stages.both]\nkind = \"report\"\n\
             inputs.evaluations = [\"eval[*]\", \"eval_b[*]\"]\nbootstrap_samples = 50\n\
             series = {{ eval = \"top layer\", eval_b = \"all layers\" }}\n",
            stages.replace("name = \"report-test\"", "name = \"series-test\"")
        ),
    );
    s.ok(&["run", "p2.toml"]);
    let shown = s.ok(&["show", "both", "--pipeline", "series-test"]).stdout;
    let both = s.path(
        shown
            .lines()
            .find_map(|l| l.trim().strip_prefix("output   report  "))
            .unwrap(),
    );
    let main = read_parquet(&both.join("main.parquet")).unwrap();
    let mut series = strings(&main, "series").unwrap();
    series.sort();
    series.dedup();
    assert_eq!(series, ["all layers", "top layer"]);
    assert_eq!(main.height(), 6, "3 alphas x 2 series");
    let tradeoff = std::fs::read_to_string(both.join("plots/set-mono-vs-multi.svg")).unwrap();
    for label in ["series=top layer", "series=all layers"] {
        assert!(tradeoff.contains(label), "{label}: {tradeoff}");
    }
}
