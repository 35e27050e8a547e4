//! Our ranking metrics against pytrec_eval (trec_eval's own code) on the
//! same TREC run and qrels files.

mod common;

use std::collections::HashMap;

use xlpipe_eval::metrics::{
    evaluate_query, read_qrels, read_run, write_qrels, write_run, Qrels, Run,
};
use xlpipe_ml::rng::SplitMix64;

#[test]
fn metrics_match_pytrec_eval() {
    // Random rankings with many ties (scores on a 0.1 grid) and graded qrels,
    // some relevant documents never retrieved.
    let mut rng = SplitMix64(2024);
    let (mut run, mut qrels) = (Run::new(), Qrels::new());
    for q in 0..80 {
        let qid = format!("q{q}");
        let retrieved = 20 + (rng.next_u64() % 90) as usize;
        let mut ranking = Vec::new();
        for d in 0..retrieved {
            let score = (rng.next_u64() % 20) as f64 / 10.0;
            ranking.push((format!("d{}", (d * 7 + q) % 150), score));
        }
        ranking.sort_by(|a, b| a.0.cmp(&b.0));
        ranking.dedup_by(|a, b| a.0 == b.0);
        run.insert(qid.clone(), ranking);
        let mut judged = HashMap::new();
        for d in 0..150 {
            if rng.next_u64().is_multiple_of(6) {
                judged.insert(format!("d{d}"), (rng.next_u64() % 4) as i64);
            }
        }
        qrels.insert(qid, judged);
    }
    let dir = tempfile::tempdir().unwrap();
    let (run_path, qrels_path) = (dir.path().join("run.txt"), dir.path().join("qrels.txt"));
    write_run(&run_path, &run, "test").unwrap();
    write_qrels(&qrels_path, &qrels).unwrap();

    let reference = common::pytrec_eval(&qrels_path, &run_path);

    // Read back our own files: the comparison covers the TREC I/O too.
    let (run, qrels) = (
        read_run(&run_path).unwrap(),
        read_qrels(&qrels_path).unwrap(),
    );
    let mut compared = 0;
    for (qid, expected) in &reference {
        let ours = evaluate_query(&run[qid], &qrels[qid], &[1, 10, 100]);
        let pairs = [
            ("map", ours.average_precision),
            ("recip_rank", ours.reciprocal_rank),
            ("ndcg_cut_10", ours.ndcg_10),
            ("recall_1", ours.recall[&1]),
            ("recall_10", ours.recall[&10]),
            ("recall_100", ours.recall[&100]),
        ];
        for (name, value) in pairs {
            let reference = expected[name];
            assert!(
                (value - reference).abs() <= 1e-6,
                "{qid} {name}: ours {value}, pytrec_eval {reference}"
            );
            compared += 1;
        }
    }
    assert!(compared >= 6 * 70, "only {compared} values compared");
}
