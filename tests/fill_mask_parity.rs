//! `masklm fill-mask --json` against transformers' `pipeline("fill-mask")` on the fixture
//! models: `tests/fixtures/{roberta-tiny,bert-tiny}/fill_mask_reference.json`, written by
//! `scripts/make_reference.py` (RoBERTa with the byte-level BPE tokenizer-go, BERT with a
//! WordPiece tokenizer and [MASK]).

mod common;

fn check(name: &str) {
    let dir = common::fixture(name);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("fill_mask_reference.json")).unwrap(),
    )
    .unwrap();
    let sentences: Vec<&str> = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let dir_arg = dir.display().to_string();
    let mut args = vec!["fill-mask", "--model", &dir_arg, "--json", "--top-k", "5"];
    args.extend(&sentences);
    let lines: Vec<serde_json::Value> = common::masklm_ok(args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outputs = reference["outputs"].as_array().unwrap();
    assert_eq!(lines.len(), outputs.len());
    for ((sentence, ours), theirs) in sentences.iter().zip(&lines).zip(outputs) {
        // One mask: a flat list of candidates; several: a list per mask, as the pipeline.
        let normalise = |v: &serde_json::Value| -> Vec<Vec<serde_json::Value>> {
            let list = v.as_array().unwrap();
            if list[0].is_object() {
                vec![list.clone()]
            } else {
                list.iter().map(|l| l.as_array().unwrap().clone()).collect()
            }
        };
        let (ours, theirs) = (normalise(ours), normalise(theirs));
        assert_eq!(ours.len(), theirs.len(), "{name}: {sentence}");
        for (o, t) in ours.iter().flatten().zip(theirs.iter().flatten()) {
            assert_eq!(o["token"], t["token"], "{name}: {sentence}");
            assert_eq!(o["token_str"], t["token_str"], "{name}: {sentence}");
            assert_eq!(o["sequence"], t["sequence"], "{name}: {sentence}");
            let diff = (o["score"].as_f64().unwrap() - t["score"].as_f64().unwrap()).abs();
            assert!(diff <= 1e-4, "{name}: {sentence}: score differs by {diff}");
        }
    }
}

#[test]
fn roberta_fill_mask_matches_the_pipeline() {
    check("roberta-tiny");
}

#[test]
fn bert_fill_mask_matches_the_pipeline() {
    check("bert-tiny");
}
