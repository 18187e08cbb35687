//! Part of `cargo test --workspace`: every committed corpus file passes its target (so a
//! finding, once fixed and its input committed, stays fixed), and a short fuzzing run with a
//! fixed seed passes (the same inputs on every machine). Time-boxed runs are `.ci/run`'s.

use praefect_fuzz::engine::{check_one, corpus_files, run, Budget};
use praefect_fuzz::targets;

#[test]
fn every_target_has_a_corpus_and_every_file_passes() {
    for target in targets::all() {
        let files = corpus_files(target.name);
        assert!(!files.is_empty(), "no corpus for {}", target.name);
        for file in files {
            let input = std::fs::read(&file).unwrap();
            if let Err(finding) = check_one(&target, &input) {
                panic!("{}: {finding}", file.display());
            }
        }
    }
}

#[test]
fn a_short_run_with_a_fixed_seed_finds_nothing() {
    for target in targets::all() {
        if let Err(finding) = run(&target, Budget::Execs(2_000), 20_240_601, false) {
            panic!("{}: {finding}", target.name);
        }
    }
}
